//! Time sources for schedules: the system clock, or one a test moves by hand.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;

/// Where schedules read "now" from.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch (UTC).
    fn now_unix_ms(&self) -> i64;
}

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
        }
    }
}

/// A clock that only moves when told to; clones share the same time.
///
/// # Examples
/// ```
/// use erlmcp_rollout::flags::{Clock, ManualClock};
/// let clock = ManualClock::at_rfc3339("2026-02-09T00:00:00Z").unwrap();
/// clock.advance_ms(1_000);
/// assert_eq!(clock.now_unix_ms(), 1_770_595_201_000);
/// ```
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock showing `unix_ms`.
    pub fn new(unix_ms: i64) -> Self {
        ManualClock(Arc::new(AtomicI64::new(unix_ms)))
    }

    /// A clock showing an RFC 3339 time or a date (see [`crate::flags::parse_time`]).
    ///
    /// # Errors
    /// The text is not a time.
    pub fn at_rfc3339(text: &str) -> Result<Self, String> {
        crate::time_text::parse_time(text).map(|t| ManualClock::new(unix_ms(t)))
    }

    /// Set the time.
    pub fn set_unix_ms(&self, unix_ms: i64) {
        self.0.store(unix_ms, Ordering::Relaxed);
    }

    /// Move the time forward (or back, with a negative delta).
    pub fn advance_ms(&self, delta: i64) {
        self.0.fetch_add(delta, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_unix_ms(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The system clock unless pinned to a fixed time (tests, and "what will
/// this look like at T" checks on a running node); one relaxed atomic load
/// per read.
///
/// # Examples
/// ```
/// use erlmcp_rollout::flags::{Clock, PinnableClock};
/// let clock = PinnableClock::default();
/// assert!(clock.pin(1_000));
/// assert_eq!(clock.now_unix_ms(), 1_000);
/// clock.unpin();
/// assert!(clock.now_unix_ms() > 1_000);
/// assert!(!clock.pin(i64::MIN)); // the one time that cannot be pinned
/// ```
#[derive(Debug)]
pub struct PinnableClock(AtomicI64);

/// Stored for "not pinned".
const UNPINNED: i64 = i64::MIN;

impl Default for PinnableClock {
    fn default() -> Self {
        PinnableClock(AtomicI64::new(UNPINNED))
    }
}

impl PinnableClock {
    /// Show `unix_ms` from now on; `false` (and no change) for `i64::MIN`,
    /// which stands for "not pinned".
    pub fn pin(&self, unix_ms: i64) -> bool {
        if unix_ms == UNPINNED {
            return false;
        }
        self.0.store(unix_ms, Ordering::Relaxed);
        true
    }

    /// Back to the system clock.
    pub fn unpin(&self) {
        self.0.store(UNPINNED, Ordering::Relaxed);
    }
}

impl Clock for PinnableClock {
    fn now_unix_ms(&self) -> i64 {
        match self.0.load(Ordering::Relaxed) {
            UNPINNED => SystemClock.now_unix_ms(),
            pinned => pinned,
        }
    }
}

/// Milliseconds since the epoch of a time (saturating).
pub fn unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(if t.unix_timestamp() < 0 {
        i64::MIN
    } else {
        i64::MAX
    })
}
