//! [`DiskStore`]: sessions in one redb file (feature `disk`), with group commit.
//!
//! Every write is an operation (a closure) queued for the next durable commit. The first
//! writer that finds no commit running becomes the *leader*: it takes every queued
//! operation, runs them in order in one redb write transaction, commits it with
//! `Durability::Immediate` and hands each waiting writer its own result. Writers that
//! arrive while a commit runs queue up and wait; when it ends, one of them leads the next
//! commit with everything queued meanwhile. A lone writer leads its own commit at once:
//! there is no linger and no background thread.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, StorageBackend, Table, TableDefinition};

use super::{
    codec, next_version, validate_batch, BatchOutcome, InvalidInput, ScanPage, Session, SessionId, Store, StoreError,
    StoreOptions, SweepOutcome, Visibility,
};

/// Records by id bytes; values are [`codec`] records.
const SESSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sessions");

/// Sessions in one redb file, written with **group commit**.
///
/// **Acknowledged** means durable. A write method returns only after the redb write
/// transaction that ran it has been committed with `Durability::Immediate` (flushed with
/// fsync), or has failed. So `Ok` means the write survives a process crash (`kill -9`)
/// and a power loss. Refusals decided inside the transaction ([`StoreError::AlreadyExists`],
/// [`StoreError::Conflict`], [`StoreError::NotFound`]) are also returned only once it is
/// durable, since they may rest on writes earlier in the same commit.
/// [`StoreError::Invalid`] input is rejected before anything is queued.
///
/// **Group commit.** Concurrent writers share commits: each write is an operation queued
/// for the next commit; one writer (the leader) runs every queued operation in order in
/// one write transaction, commits once, and only then hands each writer its result.
/// Within a commit every operation sees the effects of the ones before it, and one that
/// fails writes nothing and does not affect the others. If the commit itself fails, every
/// operation in it gets [`StoreError::Unavailable`] (retryable; as for any `Unavailable`,
/// the write may or may not be on disk) and none is acknowledged. After an I/O error in a
/// commit, redb refuses every later write ("Previous I/O error occurred. Please close and
/// re-open the database"), so writes keep failing with `Unavailable` until the store is
/// dropped and opened again (which runs crash recovery). A lone writer commits at
/// once (no waiting for company), so it pays one fsync per write; with many writers the
/// fsyncs are shared. There is no background thread: dropping the store closes the file,
/// and nothing is pending then (every call has returned, each acknowledged write is
/// already durable).
///
/// Reads run concurrently with writes on the last committed snapshot. Records use the
/// [`codec`] encoding; one that does not decode (or holds another id than its key) is
/// [`StoreError::Corrupt`] and is never returned. Writes to a corrupt key, scans over it
/// and sweeps fail with `Corrupt` too (its version is unknown, so overwriting could move
/// versions back) until the record is repaired or removed.
///
/// # Examples
/// ```
/// use erlmcp_rollout::session::{DiskStore, Session, SessionId, Store, StoreOptions, Timeout};
/// let dir = tempfile::tempdir()?;
/// let store = DiskStore::create(dir.path().join("sessions.redb"), StoreOptions::default())?;
/// let now = store.options().clock.now_unix_ms();
/// let s = store.create(Session::new(SessionId::new("s1")?, now, Timeout::Infinity, vec![]))?;
/// assert_eq!(store.get(&s.id)?, s); // `create` returned after its commit was fsynced
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct DiskStore {
    db: Database,
    options: StoreOptions,
    group: Group,
}

impl std::fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStore")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        redb::Error::Corrupted(reason) => StoreError::Corrupt { key: None, reason },
        other => StoreError::Unavailable {
            reason: format!("redb: {other}"),
        },
    }
}

/// A failed commit: whatever redb said, the operations in it are retryable.
fn commit_failed(e: StoreError) -> StoreError {
    let reason = match e {
        StoreError::Unavailable { reason } => reason,
        other => other.to_string(),
    };
    StoreError::Unavailable {
        reason: format!("group commit failed, nothing in it is acknowledged: {reason}"),
    }
}

type SessionTable<'txn> = Table<'txn, &'static [u8], &'static [u8]>;

fn load(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    id: &SessionId,
) -> Result<Option<Session>, StoreError> {
    match table.get(id.as_bytes()).map_err(unavailable)? {
        Some(bytes) => codec::decode_keyed(id, bytes.value()).map(Some),
        None => Ok(None),
    }
}

/// Writes an operation has decided on: key -> new value (`None`: remove).
type Writes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// What one operation sees inside the shared write transaction: the table (with the
/// effects of the operations before it) plus its own staged writes, which reach the table
/// only if the operation succeeds.
struct Stage<'a, 'txn> {
    table: &'a SessionTable<'txn>,
    writes: Writes,
}

impl Stage<'_, '_> {
    /// The record of `id`, the operation's own staged writes included.
    fn load(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        match self.writes.get(id.as_bytes()) {
            Some(Some(bytes)) => codec::decode_keyed(id, bytes).map(Some),
            Some(None) => Ok(None),
            None => load(self.table, id),
        }
    }

    fn save(&mut self, s: &Session) -> Result<(), StoreError> {
        let bytes = codec::encode(s)?;
        self.writes.insert(s.id.as_bytes().to_vec(), Some(bytes));
        Ok(())
    }

    fn remove(&mut self, id: &SessionId) {
        self.writes.insert(id.as_bytes().to_vec(), None);
    }
}

fn apply(table: &mut SessionTable<'_>, writes: Writes) -> Result<(), StoreError> {
    for (key, value) in writes {
        match value {
            Some(bytes) => {
                table.insert(key.as_slice(), bytes.as_slice()).map_err(unavailable)?;
            }
            None => {
                table.remove(key.as_slice()).map_err(unavailable)?;
            }
        }
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; should something, the state they guard
    // is still consistent (every update is a single assignment or push), so go on.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One queued write, type-erased so one queue holds every kind.
trait Job: Send {
    /// Runs the operation against the shared transaction's table at `now`; keeps its
    /// result and returns its writes if it succeeded.
    fn plan(&mut self, table: &SessionTable<'_>, now: i64) -> Option<Writes>;

    /// Hands the caller its result and wakes it: the operation's own result when the
    /// commit succeeded, `Unavailable` when it failed.
    fn finish(self: Box<Self>, commit: &Result<(), StoreError>);

    /// Wakes the waiting caller to lead the next commit.
    fn kick(&self);
}

/// Where a waiting writer finds its result, or is told to lead.
struct Slot<T> {
    state: Mutex<SlotState<T>>,
    wake: Condvar,
}

struct SlotState<T> {
    result: Option<Result<T, StoreError>>,
    /// Leadership is free and this writer is first in the queue.
    kicked: bool,
}

impl<T> Slot<T> {
    fn new() -> Self {
        Slot {
            state: Mutex::new(SlotState {
                result: None,
                kicked: false,
            }),
            wake: Condvar::new(),
        }
    }

    fn take_result(&self) -> Option<Result<T, StoreError>> {
        lock(&self.state).result.take()
    }

    /// Sets the result unless one is there, and wakes the writer.
    fn answer(&self, result: Result<T, StoreError>) {
        let mut state = lock(&self.state);
        if state.result.is_none() {
            state.result = Some(result);
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Waits until the result is in or the writer is told to lead.
    fn wait(&self) {
        let mut state = lock(&self.state);
        while state.result.is_none() && !state.kicked {
            state = self.wake.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        state.kicked = false;
    }
}

struct Op<T, F> {
    f: Option<F>,
    result: Option<Result<T, StoreError>>,
    slot: Arc<Slot<T>>,
    answered: bool,
}

impl<T, F> Job for Op<T, F>
where
    T: Send,
    F: FnOnce(&mut Stage<'_, '_>, i64) -> Result<T, StoreError> + Send,
{
    fn plan(&mut self, table: &SessionTable<'_>, now: i64) -> Option<Writes> {
        let f = self.f.take()?;
        let mut stage = Stage {
            table,
            writes: Writes::new(),
        };
        match f(&mut stage, now) {
            Ok(v) => {
                self.result = Some(Ok(v));
                Some(stage.writes)
            }
            Err(e) => {
                self.result = Some(Err(e));
                None
            }
        }
    }

    fn finish(mut self: Box<Self>, commit: &Result<(), StoreError>) {
        let result = match (commit, self.result.take()) {
            (Ok(()), Some(r)) => r,
            (Err(e), _) => Err(e.clone()),
            (Ok(()), None) => Err(StoreError::Unavailable {
                reason: "the write was not run by the group commit".into(),
            }),
        };
        self.slot.answer(result);
        self.answered = true;
    }

    fn kick(&self) {
        lock(&self.slot.state).kicked = true;
        self.slot.wake.notify_one();
    }
}

impl<T, F> Drop for Op<T, F> {
    /// A job dropped without [`Job::finish`] (a leader that unwound) still answers.
    fn drop(&mut self) {
        if !self.answered {
            self.slot.answer(Err(StoreError::Unavailable {
                reason: "the group commit was abandoned; nothing in it is acknowledged".into(),
            }));
        }
    }
}

/// The group-commit queue. Each waiting writer waits on its own slot; a leader wakes
/// the first queued writer to lead the next commit, then exactly the writers whose
/// results it delivered.
#[derive(Default)]
struct Group {
    state: Mutex<GroupState>,
}

#[derive(Default)]
struct GroupState {
    queue: Vec<Box<dyn Job>>,
    committing: bool,
}

impl DiskStore {
    /// Opens the store at `path`, creating the file if needed (crash recovery runs here).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the file cannot be opened or created,
    /// [`StoreError::Corrupt`] when redb finds it corrupted.
    pub fn create(path: impl AsRef<Path>, options: StoreOptions) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(unavailable)?;
        Self::from_db(db, options)
    }

    /// Opens the store on any redb [`StorageBackend`] instead of a file (crash recovery
    /// runs here): fault injection, power-loss simulation, or redb's
    /// [`InMemoryBackend`](redb::backends::InMemoryBackend). "Durable" then means what
    /// the backend's `sync_data` guarantees.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::session::{DiskStore, Session, SessionId, Store, StoreOptions, Timeout};
    /// let store = DiskStore::with_backend(redb::backends::InMemoryBackend::new(), StoreOptions::default())?;
    /// let s = store.put(Session::new(SessionId::new("s1")?, 0, Timeout::Infinity, vec![]))?;
    /// assert_eq!(s.version, 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the backend fails, [`StoreError::Corrupt`] when
    /// redb finds its bytes corrupted.
    pub fn with_backend(backend: impl StorageBackend, options: StoreOptions) -> Result<Self, StoreError> {
        let db = Database::builder().create_with_backend(backend).map_err(unavailable)?;
        Self::from_db(db, options)
    }

    fn from_db(db: Database, options: StoreOptions) -> Result<Self, StoreError> {
        let store = DiskStore {
            db,
            options,
            group: Group::default(),
        };
        // Create the table now, so reads of a fresh file find it.
        store.commit_batch(&mut [])?;
        Ok(store)
    }

    /// The options the store was built with.
    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// Queues `f` for the next group commit and returns its result once that commit is
    /// durable (or has failed). `f` sees the table as left by the operations before it in
    /// the same commit and the store clock's now; its writes are applied only if it
    /// returns `Ok`.
    fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Stage<'_, '_>, i64) -> Result<T, StoreError> + Send + 'static,
    {
        let slot = Arc::new(Slot::new());
        let mut state = lock(&self.group.state);
        state.queue.push(Box::new(Op {
            f: Some(f),
            result: None,
            slot: Arc::clone(&slot),
            answered: false,
        }));
        loop {
            if let Some(result) = slot.take_result() {
                return result;
            }
            if !state.committing {
                // Lead: commit everything queued so far (our own operation included).
                state.committing = true;
                let mut batch = std::mem::take(&mut state.queue);
                drop(state);
                let commit = catch_unwind(AssertUnwindSafe(|| self.commit_batch(&mut batch)))
                    .unwrap_or_else(|_| {
                        Err(StoreError::Unavailable {
                            reason: "a panic interrupted it".into(),
                        })
                    })
                    .map_err(commit_failed);
                {
                    // The next leader first: the disk should not wait for the wake-ups.
                    let mut state = lock(&self.group.state);
                    state.committing = false;
                    if let Some(next) = state.queue.first() {
                        next.kick();
                    }
                }
                for job in batch {
                    job.finish(&commit);
                }
            } else {
                drop(state);
                // Until our result is in, or we are told to lead.
                slot.wait();
            }
            state = lock(&self.group.state);
        }
    }

    /// Runs `batch` in one write transaction and commits it durably.
    fn commit_batch(&self, batch: &mut [Box<dyn Job>]) -> Result<(), StoreError> {
        let now = self.options.clock.now_unix_ms();
        let mut txn = self.db.begin_write().map_err(unavailable)?;
        let planned = txn
            .set_durability(Durability::Immediate)
            .map_err(|e| unavailable(redb::Error::from(e)))
            .and_then(|()| {
                let mut table = txn.open_table(SESSIONS).map_err(unavailable)?;
                for job in batch.iter_mut() {
                    if let Some(writes) = job.plan(&table, now) {
                        apply(&mut table, writes)?;
                    }
                }
                Ok(())
            });
        match planned {
            Ok(()) => txn.commit().map_err(unavailable),
            Err(e) => {
                // Best effort: an abort that fails leaves nothing committed either.
                let _ = txn.abort();
                Err(e)
            }
        }
    }

    fn read_live(&self, id: &SessionId) -> Result<Session, StoreError> {
        let now = self.options.clock.now_unix_ms();
        let txn = self.db.begin_read().map_err(unavailable)?;
        let table = txn.open_table(SESSIONS).map_err(unavailable)?;
        match load(&table, id)? {
            Some(s) if s.is_live(now) => Ok(s),
            _ => Err(StoreError::NotFound { key: id.clone() }),
        }
    }
}

impl Store for DiskStore {
    fn create(&self, mut session: Session) -> Result<Session, StoreError> {
        session.validate()?;
        self.write(move |stage, now| {
            let stored = stage.load(&session.id)?;
            if stored.as_ref().is_some_and(|s| s.is_live(now)) {
                return Err(StoreError::AlreadyExists {
                    key: session.id.clone(),
                });
            }
            session.version = next_version(stored.as_ref());
            session.tombstone = false;
            stage.save(&session)?;
            Ok(session)
        })
    }

    fn get(&self, id: &SessionId) -> Result<Session, StoreError> {
        self.read_live(id)
    }

    fn get_raw(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        let txn = self.db.begin_read().map_err(unavailable)?;
        let table = txn.open_table(SESSIONS).map_err(unavailable)?;
        load(&table, id)
    }

    fn put(&self, mut session: Session) -> Result<Session, StoreError> {
        session.validate()?;
        self.write(move |stage, _| {
            session.version = next_version(stage.load(&session.id)?.as_ref());
            session.tombstone = false;
            stage.save(&session)?;
            Ok(session)
        })
    }

    fn update_if_version(&self, mut session: Session, expected: u64) -> Result<Session, StoreError> {
        session.validate()?;
        self.write(move |stage, now| {
            match stage.load(&session.id)? {
                Some(s) if s.is_live(now) => {
                    if s.version != expected {
                        return Err(StoreError::Conflict {
                            key: session.id.clone(),
                            expected,
                            actual: s.version,
                        });
                    }
                }
                _ => {
                    return Err(StoreError::NotFound {
                        key: session.id.clone(),
                    })
                }
            }
            session.version = expected.saturating_add(1);
            session.tombstone = false;
            stage.save(&session)?;
            Ok(session)
        })
    }

    fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        let id = id.clone();
        self.write(move |stage, now| match stage.load(&id)? {
            Some(mut s) if !s.tombstone => {
                let was_live = s.is_live(now);
                s.bury(now);
                stage.save(&s)?;
                Ok(was_live)
            }
            _ => Ok(false),
        })
    }

    fn touch(&self, id: &SessionId) -> Result<Session, StoreError> {
        let now = self.options.clock.now_unix_ms();
        let policy = self.options.touch;
        let s = self.read_live(id)?;
        if !policy.should_persist(s.last_accessed, now, s.timeout) {
            return Ok(Session {
                last_accessed: s.last_accessed.max(now),
                ..s
            });
        }
        // Decide again inside the write transaction: another writer may have run meanwhile.
        let id = id.clone();
        self.write(move |stage, now| {
            let mut s = stage
                .load(&id)?
                .filter(|s| s.is_live(now))
                .ok_or_else(|| StoreError::NotFound { key: id.clone() })?;
            if policy.should_persist(s.last_accessed, now, s.timeout) {
                s.last_accessed = now;
                s.version = s.version.saturating_add(1);
                stage.save(&s)?;
            } else {
                s.last_accessed = s.last_accessed.max(now);
            }
            Ok(s)
        })
    }

    fn scan(&self, after: Option<&SessionId>, limit: usize, visibility: Visibility) -> Result<ScanPage, StoreError> {
        if limit == 0 {
            return Err(InvalidInput::ZeroLimit.into());
        }
        let now = self.options.clock.now_unix_ms();
        let txn = self.db.begin_read().map_err(unavailable)?;
        let table = txn.open_table(SESSIONS).map_err(unavailable)?;
        let lower = after.map_or(std::ops::Bound::Unbounded, |a| std::ops::Bound::Excluded(a.as_bytes()));
        let range = table
            .range::<&[u8]>((lower, std::ops::Bound::Unbounded))
            .map_err(unavailable)?;
        let mut records = Vec::new();
        for entry in range {
            let (key, value) = entry.map_err(unavailable)?;
            let id = SessionId::new(key.value()).map_err(|e| StoreError::Corrupt {
                key: None,
                reason: format!("stored key: {e}"),
            })?;
            let s = codec::decode_keyed(&id, value.value())?;
            if visibility == Visibility::Raw || s.is_live(now) {
                records.push(s);
                if records.len() > limit {
                    break;
                }
            }
        }
        Ok(ScanPage::from_overfetch(records, limit))
    }

    fn apply_batch_if_newer(&self, records: Vec<Session>) -> Result<BatchOutcome, StoreError> {
        validate_batch(&records)?;
        // One operation: the whole batch is applied atomically here (the contract only
        // requires each record to be); a later record of the same key sees an earlier one.
        self.write(move |stage, _| {
            let mut outcome = BatchOutcome::default();
            for r in &records {
                if stage.load(&r.id)?.is_some_and(|s| s.version >= r.version) {
                    outcome.skipped += 1;
                } else {
                    stage.save(r)?;
                    outcome.applied += 1;
                }
            }
            Ok(outcome)
        })
    }

    fn sweep_expired(&self, now_ms: i64) -> Result<SweepOutcome, StoreError> {
        let retention = i128::from(self.options.tombstone_retention_ms);
        self.write(move |stage, _| {
            let mut outcome = SweepOutcome::default();
            let mut expire = Vec::new();
            let mut purge = Vec::new();
            for entry in stage.table.iter().map_err(unavailable)? {
                let (key, value) = entry.map_err(unavailable)?;
                let s = codec::decode(value.value()).map_err(|e| match e {
                    StoreError::Corrupt { reason, .. } => StoreError::Corrupt {
                        key: SessionId::new(key.value()).ok(),
                        reason,
                    },
                    other => other,
                })?;
                if s.tombstone {
                    if i128::from(now_ms) - i128::from(s.last_accessed) > retention {
                        purge.push(s.id);
                    }
                } else if s.is_expired(now_ms) {
                    expire.push(s);
                }
            }
            for id in &purge {
                stage.remove(id);
            }
            outcome.tombstones = purge.len();
            outcome.expired = expire.len();
            for mut s in expire {
                s.bury(now_ms);
                stage.save(&s)?;
            }
            Ok(outcome)
        })
    }
}
