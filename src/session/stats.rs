//! Counting what a store holds: [`stats`].

use super::{codec, Store, StoreError, Visibility};

/// What [`stats`] counted over a raw scan of a store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    /// Every stored record (the sum of the three counts below).
    pub records: u64,
    /// Sessions neither deleted nor expired.
    pub live: u64,
    /// Sessions expired but not yet swept.
    pub expired: u64,
    /// Deleted (or swept) records kept as tombstones.
    pub tombstones: u64,
    /// Sum of the records' encoded sizes ([`codec::encoded_len`]), the payload a
    /// persistent backend stores (its own overhead excluded).
    pub bytes: u64,
}

/// Counts live, expired and tombstoned records and their encoded bytes, scanning the
/// whole store in pages of `page` records ([`Visibility::Raw`]); expiry is judged at `now_ms`.
///
/// # Errors
/// The scan's errors ([`StoreError::Invalid`] for `page == 0`, backend errors, `Corrupt`).
///
/// # Examples
/// ```
/// use erlmcp_rollout::session::{stats, MemoryStore, Session, SessionId, Store, StoreOptions, Timeout};
/// let store = MemoryStore::new(StoreOptions::default());
/// let now = store.options().clock.now_unix_ms();
/// store.create(Session::new(SessionId::new("a")?, now, Timeout::Infinity, b"xy".to_vec()))?;
/// store.create(Session::new(SessionId::new("b")?, now, Timeout::Infinity, vec![]))?;
/// store.delete(&SessionId::new("b")?)?;
/// let st = stats(&store, now, 100)?;
/// assert_eq!((st.records, st.live, st.tombstones), (2, 1, 1));
/// assert_eq!(st.bytes, (42 + 1 + 2) + (42 + 1));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn stats(store: &dyn Store, now_ms: i64, page: usize) -> Result<StoreStats, StoreError> {
    let mut st = StoreStats::default();
    let mut after = None;
    loop {
        let p = store.scan(after.as_ref(), page, Visibility::Raw)?;
        for s in &p.records {
            st.records += 1;
            st.bytes += codec::encoded_len(s) as u64;
            if s.tombstone {
                st.tombstones += 1;
            } else if s.is_expired(now_ms) {
                st.expired += 1;
            } else {
                st.live += 1;
            }
        }
        match p.next {
            Some(n) => after = Some(n),
            None => return Ok(st),
        }
    }
}
