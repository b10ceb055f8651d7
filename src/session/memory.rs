//! [`MemoryStore`]: sessions in a sharded concurrent map.

use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::ops::Bound;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{
    next_version, validate_batch, BatchOutcome, InvalidInput, ScanPage, Session, SessionId, Store, StoreError,
    StoreOptions, SweepOutcome, Visibility,
};

/// Shards of a [`MemoryStore::new`] store.
pub const DEFAULT_SHARDS: usize = 64;

/// At most this many shards (so the shard choice cannot overflow).
const MAX_SHARDS: usize = 1 << 16;

/// A shard's lock on its own cache lines, so that locking one shard does not slow
/// readers of its neighbours (false sharing).
#[repr(align(128))]
struct Shard(RwLock<ShardMap>);

/// One shard: records by key for point operations, plus the keys in order for scans.
/// Invariant: `order` holds exactly the keys of `records`.
#[derive(Default)]
struct ShardMap {
    records: HashMap<SessionId, Session, rustc_hash::FxBuildHasher>,
    order: BTreeSet<SessionId>,
}

impl ShardMap {
    fn get(&self, id: &SessionId) -> Option<&Session> {
        self.records.get(id)
    }

    fn get_mut(&mut self, id: &SessionId) -> Option<&mut Session> {
        self.records.get_mut(id)
    }

    /// Stores `s`; returns the record it replaced, for the caller to drop
    /// after unlocking (freeing its metadata need not hold the lock).
    fn insert(&mut self, s: Session) -> Option<Session> {
        if let Some(slot) = self.records.get_mut(&s.id) {
            return Some(std::mem::replace(slot, s));
        }
        let id = s.id.clone();
        self.order.insert(id.clone());
        self.records.insert(id, s);
        None
    }

    /// Stores `s` with the next version of its key (one hash lookup when
    /// the key exists); returns a copy as stored and the record it replaced.
    fn put(&mut self, mut s: Session) -> (Session, Option<Session>) {
        s.tombstone = false;
        if let Some(slot) = self.records.get_mut(&s.id) {
            s.version = next_version(Some(slot));
            let stored = s.clone();
            return (stored, Some(std::mem::replace(slot, s)));
        }
        s.version = next_version(None);
        let stored = s.clone();
        (stored, self.insert(s))
    }

    /// Removes the record of `id`; returns it for the caller to drop after unlocking.
    fn remove(&mut self, id: &SessionId) -> Option<Session> {
        let removed = self.records.remove(id);
        if removed.is_some() {
            self.order.remove(id);
        }
        removed
    }

    fn len(&self) -> usize {
        self.records.len()
    }
}

/// Sessions in memory: `N` shards chosen by a hash of the id, each an `RwLock` around a
/// hash map (point operations) and an ordered key set (scans; updated only when a key is
/// added or removed). Operations on one key lock one shard (reads share it); there is no
/// global lock. A scan page read-locks every shard at once and merges their ordered key
/// sets (a k-way merge), so writers wait for at most one page.
///
/// Acknowledged means applied in memory: nothing survives the process.
///
/// # Examples
/// ```
/// use erlmcp_rollout::session::{MemoryStore, Session, SessionId, Store, StoreOptions, Timeout};
/// let store = MemoryStore::new(StoreOptions::default());
/// let now = store.options().clock.now_unix_ms();
/// let s = store.create(Session::new(SessionId::new("s1")?, now, Timeout::Infinity, vec![]))?;
/// assert_eq!(s.version, 1);
/// assert!(store.delete(&s.id)?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct MemoryStore {
    shards: Box<[Shard]>,
    options: StoreOptions,
    /// Whether deletes and sweeps leave tombstones (see [`MemoryStore::without_tombstones`]).
    tombstones: bool,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.shards.len())
            .field("options", &self.options)
            .field("tombstones", &self.tombstones)
            .finish_non_exhaustive()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new(StoreOptions::default())
    }
}

impl MemoryStore {
    /// A store with [`DEFAULT_SHARDS`] shards.
    pub fn new(options: StoreOptions) -> Self {
        MemoryStore::with_shards(options, DEFAULT_SHARDS)
    }

    /// A store with `shards` shards, clamped to `1..=65536`.
    pub fn with_shards(options: StoreOptions, shards: usize) -> Self {
        MemoryStore {
            shards: (0..shards.clamp(1, MAX_SHARDS))
                .map(|_| Shard(RwLock::new(ShardMap::default())))
                .collect(),
            options,
            tombstones: true,
        }
    }

    /// A store for use outside any migration (erlmcp's ETS replacement): a delete removes
    /// the record at once and a sweep removes every expired record, so the memory of the
    /// dead is freed and scans visit only what is still stored. No tombstones are kept, so
    /// versions of a deleted key start again at 1 and a late [`Store::apply_batch_if_newer`]
    /// copy could bring a deleted key back: never use such a store as a side of a migration
    /// (the NIF refuses to).
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::session::{MemoryStore, Session, SessionId, Store, StoreOptions, Timeout};
    /// let store = MemoryStore::without_tombstones(StoreOptions::default());
    /// let now = store.options().clock.now_unix_ms();
    /// store.put(Session::new(SessionId::new("s1")?, now, Timeout::Infinity, vec![1; 100]))?;
    /// assert!(store.delete(&SessionId::new("s1")?)?);
    /// assert_eq!(store.raw_len(), 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn without_tombstones(options: StoreOptions) -> Self {
        MemoryStore {
            tombstones: false,
            ..MemoryStore::new(options)
        }
    }

    /// Whether deletes and sweeps keep tombstones (`false` for [`MemoryStore::without_tombstones`]).
    pub fn keeps_tombstones(&self) -> bool {
        self.tombstones
    }

    /// The options the store was built with.
    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// Number of records held, tombstones and expired sessions included.
    pub fn raw_len(&self) -> usize {
        self.shards.iter().map(|s| read(s).len()).sum()
    }

    fn shard(&self, id: &SessionId) -> &Shard {
        // Bits 24..56 of the hash pick the shard (multiply-shift keeps the index below the
        // shard count); the shard's own map uses the low bits and the top 7, so keys in one
        // shard still spread over its buckets.
        let h = rustc_hash::FxBuildHasher.hash_one(id);
        let i = (((h >> 24) & 0xffff_ffff) * self.shards.len() as u64) >> 32;
        &self.shards[i as usize]
    }

    fn now(&self) -> i64 {
        self.options.clock.now_unix_ms()
    }
}

fn read(shard: &Shard) -> RwLockReadGuard<'_, ShardMap> {
    // No code panics while holding a shard lock, so a poisoned lock holds consistent data.
    shard.0.read().unwrap_or_else(PoisonError::into_inner)
}

fn write(shard: &Shard) -> RwLockWriteGuard<'_, ShardMap> {
    shard.0.write().unwrap_or_else(PoisonError::into_inner)
}

impl Store for MemoryStore {
    fn create(&self, mut session: Session) -> Result<Session, StoreError> {
        session.validate()?;
        let now = self.now();
        let mut map = write(self.shard(&session.id));
        let stored = map.get(&session.id);
        if stored.is_some_and(|s| s.is_live(now)) {
            return Err(StoreError::AlreadyExists { key: session.id });
        }
        session.version = next_version(stored);
        session.tombstone = false;
        map.insert(session.clone());
        Ok(session)
    }

    fn get(&self, id: &SessionId) -> Result<Session, StoreError> {
        let now = self.now();
        let map = read(self.shard(id));
        match map.get(id) {
            Some(s) if s.is_live(now) => Ok(s.clone()),
            _ => Err(StoreError::NotFound { key: id.clone() }),
        }
    }

    fn get_raw(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        Ok(read(self.shard(id)).get(id).cloned())
    }

    fn put(&self, session: Session) -> Result<Session, StoreError> {
        session.validate()?;
        let (stored, replaced) = write(self.shard(&session.id)).put(session);
        drop(replaced);
        Ok(stored)
    }

    fn update_if_version(&self, mut session: Session, expected: u64) -> Result<Session, StoreError> {
        session.validate()?;
        let now = self.now();
        let mut map = write(self.shard(&session.id));
        match map.get(&session.id) {
            Some(s) if s.is_live(now) => {
                if s.version != expected {
                    return Err(StoreError::Conflict {
                        key: session.id,
                        expected,
                        actual: s.version,
                    });
                }
            }
            _ => return Err(StoreError::NotFound { key: session.id }),
        }
        session.version = expected.saturating_add(1);
        session.tombstone = false;
        map.insert(session.clone());
        Ok(session)
    }

    fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        let now = self.now();
        let mut map = write(self.shard(id));
        if !self.tombstones {
            let removed = map.remove(id);
            drop(map);
            return Ok(removed.is_some_and(|s| s.is_live(now)));
        }
        match map.get_mut(id) {
            Some(s) if !s.tombstone => {
                let was_live = s.is_live(now);
                s.bury(now);
                Ok(was_live)
            }
            _ => Ok(false),
        }
    }

    fn touch(&self, id: &SessionId) -> Result<Session, StoreError> {
        let now = self.now();
        let not_found = || StoreError::NotFound { key: id.clone() };
        let shard = self.shard(id);
        {
            let map = read(shard);
            let s = map.get(id).filter(|s| s.is_live(now)).ok_or_else(not_found)?;
            if !self.options.touch.should_persist(s.last_accessed, now, s.timeout) {
                let mut s = s.clone();
                s.last_accessed = s.last_accessed.max(now);
                return Ok(s);
            }
        }
        // Decide again under the write lock: another touch may have written meanwhile.
        let mut map = write(shard);
        let s = map.get_mut(id).filter(|s| s.is_live(now)).ok_or_else(not_found)?;
        if self.options.touch.should_persist(s.last_accessed, now, s.timeout) {
            s.last_accessed = now;
            s.version = s.version.saturating_add(1);
            return Ok(s.clone());
        }
        let mut s = s.clone();
        s.last_accessed = s.last_accessed.max(now);
        Ok(s)
    }

    fn scan(&self, after: Option<&SessionId>, limit: usize, visibility: Visibility) -> Result<ScanPage, StoreError> {
        if limit == 0 {
            return Err(InvalidInput::ZeroLimit.into());
        }
        let now = self.now();
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let keep = |s: &Session| visibility == Visibility::Raw || s.is_live(now);
        // All shards' read locks at once (taken in shard order; writers hold one lock at a
        // time, so this cannot deadlock), then a k-way merge of their ordered key sets:
        // the page costs O(limit * log shards), not O(limit * shards).
        let guards: Vec<RwLockReadGuard<'_, ShardMap>> = self.shards.iter().map(read).collect();
        let mut iters: Vec<_> = guards
            .iter()
            .map(|map| map.order.range::<SessionId, _>((lower, Bound::Unbounded)))
            .collect();
        let mut heap = std::collections::BinaryHeap::with_capacity(iters.len());
        for (i, it) in iters.iter_mut().enumerate() {
            if let Some(id) = it.next() {
                heap.push(std::cmp::Reverse((id, i)));
            }
        }
        let mut records = Vec::with_capacity(limit.saturating_add(1).min(4096));
        // A page visits at most this many records, live or not, so that a store full of
        // expired records (before a sweep frees them) costs a bounded time per page under
        // the shard locks; a short page then continues after the last key visited.
        let budget = super::visit_budget(limit);
        let mut visited = 0usize;
        while let Some(std::cmp::Reverse((id, i))) = heap.pop() {
            if let Some(s) = guards[i].records.get(id).filter(|s| keep(s)) {
                records.push(s.clone());
                if records.len() > limit {
                    break;
                }
            }
            visited += 1;
            if visited >= budget && records.len() <= limit {
                let more = iters[i].next().is_some() || !heap.is_empty();
                return Ok(ScanPage {
                    records,
                    next: more.then(|| id.clone()),
                });
            }
            if let Some(next) = iters[i].next() {
                heap.push(std::cmp::Reverse((next, i)));
            }
        }
        Ok(ScanPage::from_overfetch(records, limit))
    }

    fn apply_batch_if_newer(&self, records: Vec<Session>) -> Result<BatchOutcome, StoreError> {
        validate_batch(&records)?;
        let mut outcome = BatchOutcome::default();
        for r in records {
            let mut map = write(self.shard(&r.id));
            if map.get(&r.id).is_some_and(|s| s.version >= r.version) {
                outcome.skipped += 1;
            } else if r.tombstone && !self.tombstones {
                let removed = map.remove(&r.id);
                drop(map);
                drop(removed);
                outcome.applied += 1;
            } else {
                map.insert(r);
                outcome.applied += 1;
            }
        }
        Ok(outcome)
    }

    fn sweep_expired(&self, now_ms: i64) -> Result<SweepOutcome, StoreError> {
        let retention = i128::from(self.options.tombstone_retention_ms);
        let keep_tombstones = self.tombstones;
        let mut outcome = SweepOutcome::default();
        for shard in self.shards.iter() {
            let mut guard = write(shard);
            let map = &mut *guard;
            let before = map.records.len();
            map.records.retain(|_, s| {
                if !keep_tombstones {
                    // Outside a migration the dead are freed, not buried.
                    if s.tombstone {
                        outcome.tombstones += 1;
                        return false;
                    }
                    if s.is_expired(now_ms) {
                        outcome.expired += 1;
                        return false;
                    }
                    return true;
                }
                if s.tombstone {
                    let keep = i128::from(now_ms) - i128::from(s.last_accessed) <= retention;
                    if !keep {
                        outcome.tombstones += 1;
                    }
                    keep
                } else {
                    if s.is_expired(now_ms) {
                        s.bury(now_ms);
                        outcome.expired += 1;
                    }
                    true
                }
            });
            if map.records.len() != before {
                let records = &map.records;
                map.order.retain(|id| records.contains_key(id));
                // Give back what the dead held (a shard's table never shrinks by itself).
                if map.records.len() < map.records.capacity() / 4 {
                    map.records.shrink_to_fit();
                }
            }
        }
        Ok(outcome)
    }
}
