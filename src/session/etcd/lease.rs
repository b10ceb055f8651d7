//! Leases as garbage collection: every record is attached to the lease of its removal
//! time's bucket (see *Expiry and leases* in the [`EtcdStore`](super::EtcdStore) docs),
//! granted once per bucket and reused while it outlives the bucket.

use std::sync::PoisonError;
use std::time::{Duration, Instant};

use super::super::{Session, Timeout};
use super::client::Failure;
use super::Inner;

/// Extra lifetime of every lease beyond its bucket's end.
const LEASE_MARGIN_MS: i64 = 60_000;

/// Removal times further ahead than this get no lease.
const NO_LEASE_BEYOND_MS: i64 = 10 * 365 * 24 * 3_600_000;

/// A granted lease, reusable while `granted + ttl` is after its bucket's end.
pub(super) struct CachedLease {
    id: i64,
    granted: Instant,
    ttl: Duration,
}

impl Inner {
    /// The lease a record is attached to (0: none), granting its bucket's lease if needed.
    pub(super) async fn lease_for(&self, record: &Session, now: i64, deadline: Instant) -> Result<i64, Failure> {
        let retention = i128::from(self.options.tombstone_retention_ms);
        let removal = match (record.tombstone, record.timeout) {
            (true, _) => i128::from(record.last_accessed) + retention,
            (false, Timeout::Infinity) => return Ok(0),
            (false, Timeout::Ms(t)) => i128::from(record.last_accessed) + i128::from(t.get()) + retention,
        };
        let ahead = removal - i128::from(now);
        if ahead > i128::from(NO_LEASE_BEYOND_MS) {
            return Ok(0);
        }
        let width: i128 = if ahead <= 2 * 3_600_000 {
            60_000
        } else if ahead <= 10 * 24 * 3_600_000 {
            3_600_000
        } else {
            24 * 3_600_000
        };
        // The bucket's end: the first multiple of `width` at or after the removal time.
        let end = (removal + width - 1).div_euclid(width) * width;
        let until_end_ms = u64::try_from((end - i128::from(now)).max(0)).unwrap_or(u64::MAX);
        let needed = Duration::from_millis(until_end_ms);
        let bucket = i64::try_from(end).unwrap_or(i64::MAX);
        {
            let leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(l) = leases.get(&bucket) {
                // Reuse only while it outlives the bucket in real time, whatever the store clock does.
                if l.granted.elapsed() + needed + Duration::from_millis(LEASE_MARGIN_MS as u64 / 2) <= l.ttl {
                    return Ok(l.id);
                }
            }
        }
        let ttl_s = i64::try_from(until_end_ms.div_ceil(1000)).unwrap_or(i64::MAX / 2) + LEASE_MARGIN_MS / 1000;
        let granted = Instant::now();
        let resp = self
            .request(deadline, |_, mut lease| async move { lease.grant(ttl_s, None).await })
            .await?;
        let ttl = Duration::from_secs(u64::try_from(resp.ttl()).unwrap_or(0));
        let mut leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        leases.retain(|_, l| l.granted.elapsed() < l.ttl);
        leases.insert(
            bucket,
            CachedLease {
                id: resp.id(),
                granted,
                ttl,
            },
        );
        Ok(resp.id())
    }

    pub(super) fn forget_lease(&self, id: i64) {
        let mut leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        leases.retain(|_, l| l.id != id);
    }
}
