//! The session record (DESIGN §4.1), its limits, sliding expiry and the touch policy.

use std::fmt;
use std::num::NonZeroU64;
use std::sync::Arc;

use super::InvalidInput;

/// Longest accepted session id, in bytes (1 KiB).
pub const MAX_ID_LEN: usize = 1024;

/// Largest accepted metadata, in bytes (16 MiB).
pub const MAX_METADATA_LEN: usize = 16 * 1024 * 1024;

/// A session id: 1 to [`MAX_ID_LEN`] opaque bytes (erlmcp uses binaries).
///
/// Ids order by their bytes; that is the key order of [`super::Store::scan`].
/// Cloning is cheap (a reference count).
///
/// # Examples
/// ```
/// use erlmcp_rollout::session::SessionId;
/// let id = SessionId::new("session-1")?;
/// assert_eq!(id.as_bytes(), b"session-1");
/// assert!(SessionId::new("").is_err());
/// # Ok::<(), erlmcp_rollout::session::InvalidInput>(())
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(Arc<[u8]>);

impl SessionId {
    /// A validated id.
    ///
    /// # Errors
    /// [`InvalidInput::EmptyId`] or [`InvalidInput::IdTooLong`].
    pub fn new(bytes: impl AsRef<[u8]>) -> Result<Self, InvalidInput> {
        let bytes = bytes.as_ref();
        if bytes.is_empty() {
            return Err(InvalidInput::EmptyId);
        }
        if bytes.len() > MAX_ID_LEN {
            return Err(InvalidInput::IdTooLong {
                len: bytes.len(),
                max: MAX_ID_LEN,
            });
        }
        Ok(SessionId(Arc::from(bytes)))
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The id as text, for callers that require UTF-8 (e.g. to build a text key).
    ///
    /// # Errors
    /// [`InvalidInput::NotUtf8`] when the id is not valid UTF-8.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::session::SessionId;
    /// assert_eq!(SessionId::new("abc")?.to_str()?, "abc");
    /// assert!(SessionId::new([0xff, 0xfe])?.to_str().is_err());
    /// # Ok::<(), erlmcp_rollout::session::InvalidInput>(())
    /// ```
    pub fn to_str(&self) -> Result<&str, InvalidInput> {
        std::str::from_utf8(&self.0).map_err(|e| InvalidInput::NotUtf8 {
            valid_up_to: e.valid_up_to(),
        })
    }
}

/// Shows the id as a quoted, escaped string, cut after 64 bytes.
impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = &self.0[..self.0.len().min(64)];
        write!(f, "\"{}\"", shown.escape_ascii())?;
        if self.0.len() > 64 {
            write!(f, "... ({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// How long a session lives after its last access: erlmcp's `pos_integer() | infinity`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Timeout {
    /// Expires `ms` milliseconds after the last access.
    Ms(NonZeroU64),
    /// Never expires.
    Infinity,
}

impl Timeout {
    /// A finite timeout.
    ///
    /// # Errors
    /// [`InvalidInput::ZeroTimeout`] for `0` (erlmcp requires a positive integer).
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::session::Timeout;
    /// assert!(Timeout::ms(30_000).is_ok());
    /// assert!(Timeout::ms(0).is_err());
    /// ```
    pub fn ms(ms: u64) -> Result<Self, InvalidInput> {
        NonZeroU64::new(ms).map(Timeout::Ms).ok_or(InvalidInput::ZeroTimeout)
    }
}

/// How a record's metadata bytes are encoded: said by the writer, stored with the record,
/// never guessed from the bytes (bytes another program wrote may look like anything).
///
/// Records written before this distinction existed (codec format 1 without the
/// `metadata is ETF` flag bit) read back as [`MetaFormat::Opaque`]: the Erlang side returns
/// their metadata as the raw binary, never decoding it.
///
/// # Examples
/// ```
/// use erlmcp_rollout::session::{MetaFormat, Session, SessionId, Timeout};
/// let s = Session::new(SessionId::new("s1")?, 0, Timeout::Infinity, b"raw".to_vec());
/// assert_eq!(s.meta_format, MetaFormat::Opaque);
/// # Ok::<(), erlmcp_rollout::session::InvalidInput>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MetaFormat {
    /// Any bytes (Rust programs, the CLI, records of unknown origin): returned as bytes.
    #[default]
    Opaque,
    /// Erlang external term format written by the Erlang side (`term_to_binary/1`); the
    /// Erlang side decodes it with `binary_to_term(_, [safe])`.
    Etf,
}

/// One session record: erlmcp's fields plus the store's `version` and `tombstone`.
///
/// Times are milliseconds since the Unix epoch (`erlang:system_time(millisecond)`).
/// `version` and `tombstone` are owned by the store: [`super::Store::create`],
/// [`super::Store::put`] and friends ignore the values passed in and assign them;
/// only [`super::Store::apply_batch_if_newer`] writes them as given.
///
/// # Examples
/// ```
/// use erlmcp_rollout::session::{Session, SessionId, Timeout};
/// let s = Session::new(SessionId::new("s1")?, 1_000, Timeout::ms(60_000)?, b"meta".to_vec());
/// assert!(!s.is_expired(61_000));
/// assert!(s.is_expired(61_001));
/// # Ok::<(), erlmcp_rollout::session::InvalidInput>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// The key.
    pub id: SessionId,
    /// Creation time (ms).
    pub created_at: i64,
    /// Last access time (ms); expiry slides from here.
    pub last_accessed: i64,
    /// Sliding timeout.
    pub timeout: Timeout,
    /// Opaque bytes (Erlang external term format when written from Erlang); at most
    /// [`MAX_METADATA_LEN`]. Empty in a tombstone.
    pub metadata: Arc<[u8]>,
    /// How `metadata` is encoded (set by the writer).
    pub meta_format: MetaFormat,
    /// Per-record version, assigned by the store: 1 on first write, +1 on every write
    /// (including deletes and persisted touches). Never reused for a key while its
    /// tombstone is retained.
    pub version: u64,
    /// `true` for a deleted record kept so that migration does not resurrect it.
    pub tombstone: bool,
}

impl Session {
    /// A live session created and last accessed at `now_ms`, version 0 (unassigned).
    pub fn new(id: SessionId, now_ms: i64, timeout: Timeout, metadata: impl Into<Arc<[u8]>>) -> Self {
        Session {
            id,
            created_at: now_ms,
            last_accessed: now_ms,
            timeout,
            metadata: metadata.into(),
            meta_format: MetaFormat::Opaque,
            version: 0,
            tombstone: false,
        }
    }

    /// Sliding expiry: `now_ms - last_accessed > timeout_ms` (never for [`Timeout::Infinity`]).
    pub fn is_expired(&self, now_ms: i64) -> bool {
        match self.timeout {
            Timeout::Infinity => false,
            Timeout::Ms(t) => i128::from(now_ms) - i128::from(self.last_accessed) > i128::from(t.get()),
        }
    }

    /// Neither a tombstone nor expired at `now_ms`: what [`super::Store::get`] may return.
    pub fn is_live(&self, now_ms: i64) -> bool {
        !self.tombstone && !self.is_expired(now_ms)
    }

    /// Turns the record into a tombstone at `now_ms`: the next version, `last_accessed` set
    /// to the deletion time (tombstone retention counts from it). A tombstone keeps no
    /// metadata: only its key and version matter (a late copy must not resurrect it).
    pub(crate) fn bury(&mut self, now_ms: i64) {
        self.tombstone = true;
        self.metadata = Arc::from(&[][..]);
        self.meta_format = MetaFormat::Opaque;
        self.version = self.version.saturating_add(1);
        self.last_accessed = now_ms;
    }

    /// Checks the limits a store enforces on every write.
    ///
    /// # Errors
    /// [`InvalidInput::MetadataTooLarge`] (the id is valid by construction).
    pub fn validate(&self) -> Result<(), InvalidInput> {
        if self.metadata.len() > MAX_METADATA_LEN {
            return Err(InvalidInput::MetadataTooLarge {
                len: self.metadata.len(),
                max: MAX_METADATA_LEN,
            });
        }
        Ok(())
    }
}

/// When a [`super::Store::touch`] is persisted, so that reads do not all become writes.
///
/// A touch always returns the session with `last_accessed = now`, but writes it (a new
/// version; durable on durable backends) only when `now - stored last_accessed` exceeds
/// `permille / 1000` of the timeout. Sessions with [`Timeout::Infinity`] are never written
/// by a touch. The price: a session may expire up to that fraction of its timeout earlier
/// than a store that persisted every touch (the stored `last_accessed` lags by at most the
/// threshold). `permille = 0` persists every touch that moves the time forward.
///
/// # Examples
/// ```
/// use erlmcp_rollout::session::{TouchPolicy, Timeout};
/// let p = TouchPolicy::permille(100)?; // 10 % of the timeout
/// let t = Timeout::ms(60_000)?;
/// assert!(!p.should_persist(0, 6_000, t));
/// assert!(p.should_persist(0, 6_001, t));
/// # Ok::<(), erlmcp_rollout::session::InvalidInput>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TouchPolicy {
    permille: u16,
}

impl Default for TouchPolicy {
    /// 10 % of the timeout.
    fn default() -> Self {
        TouchPolicy { permille: 100 }
    }
}

impl TouchPolicy {
    /// Persist a touch when it moved `last_accessed` by more than `permille / 1000` of the timeout.
    ///
    /// # Errors
    /// [`InvalidInput::TouchFraction`] above 1000.
    pub fn permille(permille: u16) -> Result<Self, InvalidInput> {
        if permille > 1000 {
            return Err(InvalidInput::TouchFraction { permille });
        }
        Ok(TouchPolicy { permille })
    }

    /// Persist every touch that moves `last_accessed` forward.
    pub fn always() -> Self {
        TouchPolicy { permille: 0 }
    }

    /// The configured fraction, in thousandths of the timeout.
    pub fn as_permille(&self) -> u16 {
        self.permille
    }

    /// Whether a touch at `now_ms` of a record stored with `stored_last_accessed` is written.
    pub fn should_persist(&self, stored_last_accessed: i64, now_ms: i64, timeout: Timeout) -> bool {
        match timeout {
            Timeout::Infinity => false,
            Timeout::Ms(t) => {
                let moved = i128::from(now_ms) - i128::from(stored_last_accessed);
                let threshold = i128::from(t.get()) * i128::from(self.permille) / 1000;
                moved > 0 && moved > threshold
            }
        }
    }
}
