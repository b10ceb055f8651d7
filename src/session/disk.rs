//! [`DiskStore`]: sessions in one redb file behind a write-ahead log (feature `disk`),
//! with group commit.
//!
//! Every write is an operation (a closure) queued for the next group commit. The first
//! writer that finds no commit running becomes the *leader*: it takes every queued
//! operation, runs them in order against the current state (the group's own earlier
//! writes, the log's un-checkpointed tail, redb), appends the group's records to the log
//! as one checksummed frame, `fdatasync`s it once, publishes the records to the in-memory
//! tail index and hands each waiting writer its own result. Writers that arrive while a
//! group commits queue up; when it ends, one of them leads the next group with everything
//! queued meanwhile. A lone writer leads its own group at once: there is no linger.
//!
//! A background thread checkpoints: it seals the active log file (the next group goes to
//! the other one), copies the sealed file's records into redb in one durable write
//! transaction that also records the last frame it holds, drops those records from the
//! tail index and recycles the sealed file. The log format and the invariants are in
//! [`super::wal`] and `docs/disk-log.md`.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadOnlyTable, ReadableDatabase, ReadableTable, StorageBackend, TableDefinition};

use super::wal::{self, FileLog, HEADER_LEN};
use super::{
    codec, next_version, validate_batch, BatchOutcome, InvalidInput, ScanPage, Session, SessionId, Store, StoreError,
    StoreOptions, SweepOutcome, Unstarted, Visibility, WriteDone, WriteOp, Written,
};

/// Records by id bytes; values are [`codec`] records.
const SESSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sessions");

/// The log's mark in redb, written in the same transaction as each checkpoint's records:
/// [`CHECKPOINT_SEQ`] is the last log frame whose records redb holds (0: none).
const WAL_META: TableDefinition<&str, u64> = TableDefinition::new("erlmcp_wal");
const CHECKPOINT_SEQ: &str = "checkpoint_seq";

/// Tail-index entries removed per lock hold after a checkpoint, so that readers and the
/// group leader wait for at most one chunk.
const PRUNE_CHUNK: usize = 1024;

/// How [`DiskStore`] checkpoints its log into redb.
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use erlmcp_rollout::session::DiskOptions;
/// let opts = DiskOptions { checkpoint_interval: Some(Duration::from_millis(500)), ..DiskOptions::default() };
/// assert_eq!(opts.checkpoint_bytes, 16 << 20);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskOptions {
    /// Checkpoint once the active log file holds this many bytes of frames (0: never
    /// because of size).
    pub checkpoint_bytes: u64,
    /// Checkpoint this long after the previous one when the log holds anything (`None`:
    /// never because of time).
    pub checkpoint_interval: Option<Duration>,
    /// Checkpoint everything when the store is dropped, leaving nothing in the log to
    /// replay. With `false` the log is kept and replayed by the next open, as after a
    /// crash.
    pub checkpoint_on_close: bool,
    /// A log file that needs room for a frame grows by this many zero-filled bytes past
    /// it (written with that frame, under its group's one `fdatasync`). Log files are
    /// recycled after a checkpoint, not truncated, so once a file has reached its working
    /// size (about [`checkpoint_bytes`](Self::checkpoint_bytes)) a group's append
    /// overwrites blocks the file already has and its `fdatasync` commits no new file
    /// size. `0`: a file grows exactly to each frame's end.
    pub log_extent_bytes: u64,
}

impl Default for DiskOptions {
    /// Checkpoints at 16 MiB, every 2 s, and on close; log files grow in 1 MiB extents.
    fn default() -> Self {
        DiskOptions {
            checkpoint_bytes: 16 << 20,
            checkpoint_interval: Some(Duration::from_secs(2)),
            checkpoint_on_close: true,
            log_extent_bytes: 1 << 20,
        }
    }
}

/// Sessions in one redb file behind a write-ahead log, written with **group commit**.
///
/// **Acknowledged** means durable. A write method returns only after the log frame that
/// holds its records has been written and `fdatasync`ed, or has failed. So `Ok` means the
/// write survives a process crash (`kill -9`) and a power loss. Refusals decided inside
/// a group ([`StoreError::AlreadyExists`], [`StoreError::Conflict`],
/// [`StoreError::NotFound`]) are also returned only once the group is durable, since they
/// may rest on writes earlier in the same group. [`StoreError::Invalid`] input is
/// rejected before anything is queued.
///
/// **Group commit.** Concurrent writers share one log append and one `fdatasync`: each
/// write is an operation queued for the next group; one writer (the leader) runs every
/// queued operation in order, appends the group's records as one frame, syncs once, and
/// only then hands each writer its result. Within a group every operation sees the
/// effects of the ones before it, and one that fails writes nothing and does not affect
/// the others. A group whose operations wrote nothing appends nothing. If the append or
/// the sync fails, every operation in the group gets [`StoreError::Unavailable`]
/// (retryable; as for any `Unavailable`, the write may or may not be on disk), none is
/// acknowledged, and every later write fails the same way until the store is dropped and
/// opened again (after a failed `fdatasync` the file's state is unknown; reopening
/// replays what is valid). A lone writer commits at once (no waiting for company).
///
/// **Checkpoints.** redb is brought up to date in the background: when the active log
/// file holds [`DiskOptions::checkpoint_bytes`], every
/// [`DiskOptions::checkpoint_interval`], on [`DiskStore::checkpoint`] and on drop. A
/// checkpoint seals the active log file (writers go on in the other one, waiting at most
/// for the group in flight), writes the sealed records into redb in one durable
/// transaction, then recycles the sealed file for later appends. Opening replays the log's un-checkpointed
/// tail into memory; a torn last frame is dropped (it was never acknowledged), and damage
/// anywhere else refuses to open ([`StoreError::Corrupt`]) rather than drop acknowledged
/// writes.
///
/// **Reads** see every acknowledged write: the log's un-checkpointed tail is held in an
/// in-memory index consulted before redb's last committed snapshot. A scan page holds the
/// index's read lock while it runs (a group waits for at most one page to publish).
/// Records use the [`codec`] encoding; one that does not decode (or holds another id than
/// its key) is [`StoreError::Corrupt`] and is never returned. Writes to a corrupt key,
/// scans over it and sweeps fail with `Corrupt` too (its version is unknown, so
/// overwriting could move versions back) until the record is repaired or removed.
///
/// **Files.** `PATH` (redb) and the two log files [`DiskStore::log_paths`]`(PATH)`; they
/// belong together (copy all three, with the store closed). A store dropped with
/// [`DiskOptions::checkpoint_on_close`] leaves nothing in its logs to replay and redb complete.
///
/// # Examples
/// ```
/// use erlmcp_rollout::session::{DiskStore, Session, SessionId, Store, StoreOptions, Timeout};
/// let dir = tempfile::tempdir()?;
/// let store = DiskStore::create(dir.path().join("sessions.redb"), StoreOptions::default())?;
/// let now = store.options().clock.now_unix_ms();
/// let s = store.create(Session::new(SessionId::new("s1")?, now, Timeout::Infinity, vec![]))?;
/// assert_eq!(store.get(&s.id)?, s); // `create` returned after its log frame was fsynced
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct DiskStore {
    inner: Arc<Inner>,
    checkpointer: Option<JoinHandle<()>>,
    /// Leads groups that hold only started writes ([`Store::start`]); started on the
    /// first one.
    committer: Mutex<Option<JoinHandle<()>>>,
}

struct Inner {
    db: Database,
    options: StoreOptions,
    settings: DiskOptions,
    group: Group,
    /// The un-checkpointed tail: for each key written since the last checkpoint that
    /// covered it, its latest record (`None`: removed) and the frame that wrote it.
    /// Invariant: an entry is removed only after redb durably holds that frame (or a
    /// later one), and only under `planning`.
    index: RwLock<BTreeMap<SessionId, Pending>>,
    /// Held by the group leader while it runs the group's operations, and by the
    /// checkpointer for each chunk of index removals: a leader's redb snapshot, opened
    /// under it, therefore holds every record missing from the index.
    planning: Mutex<()>,
    /// The two log files.
    files: [Box<dyn StorageBackend>; 2],
    /// Where the log is; held by the leader for its append + sync + publish.
    log: Mutex<Log>,
    /// One checkpoint at a time (background thread, [`DiskStore::checkpoint`], drop).
    checkpointing: Mutex<()>,
    signal: Mutex<Signal>,
    wake: Condvar,
}

struct Pending {
    seq: u64,
    value: Option<Session>,
}

/// Log bookkeeping. Invariant: when `sealed` is `None`, the file that is not `active`
/// holds no frames.
struct Log {
    active: usize,
    /// Where each file's valid frames end (the next append goes to `ends[active]`).
    ends: [u64; 2],
    /// Each file's length (appends within it change no file size).
    lens: [u64; 2],
    /// Each file's header salt (`None`: a format-1 file, until it is recycled).
    salts: [Option<u32>; 2],
    /// Whether each file holds frames.
    has_frames: [bool; 2],
    /// The seq of the next frame.
    next_seq: u64,
    /// The file sealed for the checkpoint in progress (or found at open).
    sealed: Option<usize>,
    /// Set by a failed append or sync: every later write is refused with it.
    failed: Option<String>,
}

#[derive(Default)]
struct Signal {
    requested: bool,
    shutdown: bool,
}

impl std::fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStore")
            .field("options", &self.inner.options)
            .field("settings", &self.inner.settings)
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

fn log_io(what: &str, e: std::io::Error) -> StoreError {
    StoreError::Unavailable {
        reason: format!("session log: {what}: {e}"),
    }
}

fn log_corrupt(file: usize, reason: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: None,
        reason: format!("session log {file}: {reason}"),
    }
}

/// A failed group: whatever failed, the operations in it are retryable.
fn commit_failed(e: StoreError) -> StoreError {
    let reason = match e {
        StoreError::Unavailable { reason } => reason,
        other => other.to_string(),
    };
    StoreError::Unavailable {
        reason: format!("group commit failed, nothing in it is acknowledged: {reason}"),
    }
}

type SessionsTable = ReadOnlyTable<&'static [u8], &'static [u8]>;

fn load(table: &SessionsTable, id: &SessionId) -> Result<Option<Session>, StoreError> {
    match table.get(id.as_bytes()).map_err(unavailable)? {
        Some(bytes) => codec::decode_keyed(id, bytes.value()).map(Some),
        None => Ok(None),
    }
}

/// A stored record read from redb, checked against its key.
/// Writes `data` at `at`, growing the file first when it ends before `at + data.len()`:
/// a file grows on its own, but a [`StorageBackend`] need not (redb's
/// `InMemoryBackend` refuses a write past its end), and the log only ever appends.
fn write_at(file: &dyn StorageBackend, at: u64, data: &[u8]) -> Result<(), std::io::Error> {
    let end = at + data.len() as u64;
    if file.len()? < end {
        file.set_len(end)?;
    }
    file.write(at, data)
}

/// Writes `frame` at `at` into a log file `len` bytes long, growing the file by
/// `extent` zero-filled bytes past the frame when it does not fit, then syncs. Returns
/// the file's new length. (redb's backend contract does not let a write reach past the
/// end, hence the `set_len` first; the zeros make the extent real blocks, so later
/// frames overwrite them without changing the file's metadata.)
fn append_frame(file: &dyn StorageBackend, len: u64, at: u64, frame: &[u8], extent: u64) -> std::io::Result<u64> {
    const CHUNK: u64 = 1 << 20;
    let end = at + frame.len() as u64;
    let new_len = if end > len { end + extent } else { len };
    if new_len > len {
        file.set_len(new_len)?;
    }
    file.write(at, frame)?;
    let mut zero_from = end.max(len);
    if zero_from < new_len {
        let zeros = vec![0u8; CHUNK.min(new_len - zero_from) as usize];
        while zero_from < new_len {
            let n = (new_len - zero_from).min(CHUNK);
            file.write(zero_from, &zeros[..n as usize])?;
            zero_from += n;
        }
    }
    file.sync_data()?;
    Ok(new_len)
}

/// Writes a fresh format-2 log file (a header with a new salt), synced; returns the
/// salt. A crash part way leaves a file shorter than its header or all zeros, which an
/// open initialises again.
fn init_log_file(file: &dyn StorageBackend) -> Result<u32, std::io::Error> {
    let salt = wal::new_salt();
    file.set_len(0)?;
    write_at(file, 0, &wal::header(salt))?;
    file.sync_data()?;
    Ok(salt)
}

fn decode_stored(key: &[u8], value: &[u8]) -> Result<Session, StoreError> {
    let id = SessionId::new(key).map_err(|e| StoreError::Corrupt {
        key: None,
        reason: format!("stored key: {e}"),
    })?;
    codec::decode_keyed(&id, value)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; should something, the state they guard
    // is still consistent (every update is a single assignment, push or map insert), so go on.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(PoisonError::into_inner)
}

/// Writes decided on: key -> new record (`None`: remove).
type Writes = BTreeMap<SessionId, Option<Session>>;

/// Two key-ordered streams of overlay entries merged, `left` winning on equal keys.
struct UnionLeft<L: Iterator, R: Iterator> {
    l: std::iter::Peekable<L>,
    r: std::iter::Peekable<R>,
}

impl<'a, L, R> Iterator for UnionLeft<L, R>
where
    L: Iterator<Item = (&'a SessionId, &'a Option<Session>)>,
    R: Iterator<Item = (&'a SessionId, &'a Option<Session>)>,
{
    type Item = (&'a SessionId, &'a Option<Session>);

    fn next(&mut self) -> Option<Self::Item> {
        match (self.l.peek(), self.r.peek()) {
            (Some((lk, _)), Some((rk, _))) => match lk.cmp(rk) {
                std::cmp::Ordering::Less => self.l.next(),
                std::cmp::Ordering::Equal => {
                    self.r.next();
                    self.l.next()
                }
                std::cmp::Ordering::Greater => self.r.next(),
            },
            (Some(_), None) => self.l.next(),
            (None, _) => self.r.next(),
        }
    }
}

/// Overlay entries (the tail index, a group's writes) over redb records, in key order:
/// an overlay entry hides redb's record of its key, and a `None` one hides the key.
struct OverTable<L: Iterator, R: Iterator> {
    l: std::iter::Peekable<L>,
    r: std::iter::Peekable<R>,
}

impl<'a, L, R> Iterator for OverTable<L, R>
where
    L: Iterator<Item = (&'a SessionId, &'a Option<Session>)>,
    R: Iterator<Item = Result<Session, StoreError>>,
{
    type Item = Result<Session, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let take_left = match (self.l.peek(), self.r.peek()) {
                (None, None) => return None,
                (None, Some(_)) | (Some(_), Some(Err(_))) => false,
                (Some(_), None) => true,
                (Some((lk, _)), Some(Ok(rs))) => match (*lk).cmp(&rs.id) {
                    std::cmp::Ordering::Less => true,
                    std::cmp::Ordering::Equal => {
                        self.r.next();
                        true
                    }
                    std::cmp::Ordering::Greater => false,
                },
            };
            if !take_left {
                return self.r.next();
            }
            if let Some((_, Some(s))) = self.l.next() {
                return Some(Ok(s.clone()));
            }
        }
    }
}

/// What the leader's operations see: the group's earlier writes, over the tail index,
/// over a redb snapshot opened under `planning`.
struct View<'a> {
    index: &'a RwLock<BTreeMap<SessionId, Pending>>,
    table: &'a SessionsTable,
    group: &'a Writes,
}

impl View<'_> {
    fn load(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        if let Some(v) = self.group.get(id) {
            return Ok(v.clone());
        }
        if let Some(p) = read(self.index).get(id) {
            return Ok(p.value.clone());
        }
        load(self.table, id)
    }

    /// Calls `f` with every stored record in key order (tombstones and expired ones
    /// included).
    fn for_each(&self, mut f: impl FnMut(Session) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let index = read(self.index);
        let overlay = UnionLeft {
            l: self.group.iter().peekable(),
            r: index.iter().map(|(k, p)| (k, &p.value)).peekable(),
        };
        let table = self.table.iter().map_err(unavailable)?.map(|entry| {
            let (k, v) = entry.map_err(unavailable)?;
            decode_stored(k.value(), v.value())
        });
        let merged = OverTable {
            l: overlay.peekable(),
            r: table.peekable(),
        };
        for s in merged {
            f(s?)?;
        }
        Ok(())
    }
}

/// What one operation sees: the [`View`] plus its own staged writes, which join the
/// group only if the operation succeeds.
struct Stage<'a, 'v> {
    view: &'a View<'v>,
    writes: Writes,
}

impl Stage<'_, '_> {
    /// The record of `id`, the operation's own staged writes included.
    fn load(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        match self.writes.get(id) {
            Some(v) => Ok(v.clone()),
            None => self.view.load(id),
        }
    }

    fn save(&mut self, s: &Session) -> Result<(), StoreError> {
        s.validate()?;
        self.writes.insert(s.id.clone(), Some(s.clone()));
        Ok(())
    }

    fn remove(&mut self, id: &SessionId) {
        self.writes.insert(id.clone(), None);
    }
}

/// One queued write, type-erased so one queue holds every kind.
trait Job: Send {
    /// Runs the operation against `view` at `now`; keeps its result and returns its
    /// writes if it succeeded.
    fn plan(&mut self, view: &View<'_>, now: i64) -> Option<Writes>;

    /// Hands the caller its result and wakes it: the operation's own result when the
    /// group committed, `Unavailable` when it failed.
    fn finish(self: Box<Self>, commit: &Result<(), StoreError>);

    /// Wakes the waiting caller to lead the next group; `false` when no caller waits (a
    /// started write), so the committer thread must lead.
    fn kick(&self) -> bool;
}

/// Where a job's result goes: a waiting caller's [`Slot`], or a started write's callback.
trait Answer<T>: Send {
    /// Delivers the result (called once).
    fn answer(&mut self, result: Result<T, StoreError>);

    /// See [`Job::kick`].
    fn kick(&self) -> bool;
}

impl<T: Send> Answer<T> for Arc<Slot<T>> {
    fn answer(&mut self, result: Result<T, StoreError>) {
        Slot::answer(self, result);
    }

    fn kick(&self) -> bool {
        lock(&self.state).kicked = true;
        self.wake.notify_one();
        true
    }
}

/// A started write's callback (see [`Store::start`]).
struct Callback<D>(Option<D>);

impl<T, D> Answer<T> for Callback<D>
where
    D: FnOnce(Result<T, StoreError>) + Send,
{
    fn answer(&mut self, result: Result<T, StoreError>) {
        if let Some(done) = self.0.take() {
            // A panicking callback loses its own answer only, never the leader's others.
            let _ = catch_unwind(AssertUnwindSafe(|| done(result)));
        }
    }

    fn kick(&self) -> bool {
        false
    }
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

struct Op<T, F, A: Answer<T>> {
    f: Option<F>,
    result: Option<Result<T, StoreError>>,
    to: A,
    answered: bool,
}

impl<T, F, A> Job for Op<T, F, A>
where
    T: Send,
    F: FnOnce(&mut Stage<'_, '_>, i64) -> Result<T, StoreError> + Send,
    A: Answer<T>,
{
    fn plan(&mut self, view: &View<'_>, now: i64) -> Option<Writes> {
        let f = self.f.take()?;
        let mut stage = Stage {
            view,
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
        self.to.answer(result);
        self.answered = true;
    }

    fn kick(&self) -> bool {
        self.to.kick()
    }
}

impl<T, F, A: Answer<T>> Drop for Op<T, F, A> {
    /// A job dropped without [`Job::finish`] (a leader that unwound) still answers.
    fn drop(&mut self) {
        if !self.answered {
            self.to.answer(Err(StoreError::Unavailable {
                reason: "the group commit was abandoned; nothing in it is acknowledged".into(),
            }));
        }
    }
}

/// The group-commit queue. Each waiting writer waits on its own slot; a leader wakes
/// the first queued writer to lead the next group, then exactly the writers whose
/// results it delivered. When the first queued job is a started write (no caller waits
/// for it), the committer thread leads instead.
#[derive(Default)]
struct Group {
    state: Mutex<GroupState>,
    /// The committer thread waits here for a group only it can lead.
    committer: Condvar,
}

#[derive(Default)]
struct GroupState {
    queue: Vec<Box<dyn Job>>,
    committing: bool,
    /// Set by drop: the committer thread leads what is queued, then exits.
    shutdown: bool,
}

impl DiskStore {
    /// Opens the store at `path` with [`DiskOptions::default`], creating the files if
    /// needed (redb's crash recovery and the log replay run here).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when a file cannot be opened or created,
    /// [`StoreError::Corrupt`] when redb finds its file corrupted or the log is damaged
    /// anywhere but in its last frame.
    pub fn create(path: impl AsRef<Path>, options: StoreOptions) -> Result<Self, StoreError> {
        Self::create_with(path, options, DiskOptions::default())
    }

    /// [`DiskStore::create`] with checkpoint settings.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::session::{DiskOptions, DiskStore, Session, SessionId, Store, StoreOptions, Timeout};
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("s.redb");
    /// let keep_log = DiskOptions { checkpoint_on_close: false, checkpoint_interval: None, ..DiskOptions::default() };
    /// let store = DiskStore::create_with(&path, StoreOptions::default(), keep_log)?;
    /// store.put(Session::new(SessionId::new("s1")?, 0, Timeout::Infinity, vec![]))?;
    /// drop(store); // the write is only in the log now
    /// let store = DiskStore::create(&path, StoreOptions::default())?; // replays it
    /// assert_eq!(store.get(&SessionId::new("s1")?)?.version, 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`DiskStore::create`].
    pub fn create_with(
        path: impl AsRef<Path>,
        options: StoreOptions,
        settings: DiskOptions,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref();
        let db = Database::create(path).map_err(unavailable)?;
        let [p0, p1] = Self::log_paths(path);
        let fresh = !p0.exists() || !p1.exists();
        let open = |p: &Path| FileLog::open(p).map_err(|e| log_io(&format!("open {}", p.display()), e));
        let files: [Box<dyn StorageBackend>; 2] = [Box::new(open(&p0)?), Box::new(open(&p1)?)];
        if fresh {
            // A new file's directory entry must be durable before anything in it is
            // acknowledged.
            let dir = p0
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| log_io(&format!("sync directory {}", dir.display()), e))?;
        }
        Self::from_parts(db, files, options, settings)
    }

    /// The two log files of the store at `path`: `PATH.wal-0` and `PATH.wal-1`.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::session::DiskStore;
    /// let [a, b] = DiskStore::log_paths("data/sessions.redb");
    /// assert_eq!(a, std::path::Path::new("data/sessions.redb.wal-0"));
    /// assert_eq!(b, std::path::Path::new("data/sessions.redb.wal-1"));
    /// ```
    pub fn log_paths(path: impl AsRef<Path>) -> [PathBuf; 2] {
        [".wal-0", ".wal-1"].map(|suffix| {
            let mut p = path.as_ref().as_os_str().to_owned();
            p.push(suffix);
            PathBuf::from(p)
        })
    }

    /// Opens the store on any redb [`StorageBackend`] for redb and two more for the log
    /// files (redb's crash recovery and the log replay run here): fault injection,
    /// power-loss simulation, or redb's [`InMemoryBackend`](redb::backends::InMemoryBackend).
    /// "Durable" then means what the backends' `sync_data` guarantees.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::session::{DiskOptions, DiskStore, Session, SessionId, Store, StoreOptions, Timeout};
    /// use redb::backends::InMemoryBackend;
    /// let store = DiskStore::with_backends(
    ///     InMemoryBackend::new(),
    ///     [InMemoryBackend::new(), InMemoryBackend::new()],
    ///     StoreOptions::default(),
    ///     DiskOptions::default(),
    /// )?;
    /// let s = store.put(Session::new(SessionId::new("s1")?, 0, Timeout::Infinity, vec![]))?;
    /// assert_eq!(s.version, 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when a backend fails, [`StoreError::Corrupt`] when
    /// redb finds its bytes corrupted or the log is damaged anywhere but in its last frame.
    pub fn with_backends<B: StorageBackend, L: StorageBackend>(
        backend: B,
        logs: [L; 2],
        options: StoreOptions,
        settings: DiskOptions,
    ) -> Result<Self, StoreError> {
        let db = Database::builder().create_with_backend(backend).map_err(unavailable)?;
        let [a, b] = logs;
        Self::from_parts(db, [Box::new(a), Box::new(b)], options, settings)
    }

    /// Recovery: the checkpoint mark from redb, each log file checked (a torn last frame
    /// cut off), the frames after the mark replayed into the tail index in order.
    fn from_parts(
        db: Database,
        files: [Box<dyn StorageBackend>; 2],
        options: StoreOptions,
        settings: DiskOptions,
    ) -> Result<Self, StoreError> {
        // Read the mark; a file without both tables gets them now, in a durable commit
        // (so reads of a fresh file find them).
        let existing = {
            let txn = db.begin_read().map_err(unavailable)?;
            match (txn.open_table(SESSIONS), txn.open_table(WAL_META)) {
                (Ok(_), Ok(meta)) => Some(meta.get(CHECKPOINT_SEQ).map_err(unavailable)?.map_or(0, |v| v.value())),
                _ => None,
            }
        };
        let done = if let Some(done) = existing {
            done
        } else {
            let mut txn = db.begin_write().map_err(unavailable)?;
            txn.set_durability(Durability::Immediate)
                .map_err(|e| unavailable(redb::Error::from(e)))?;
            let done = {
                txn.open_table(SESSIONS).map_err(unavailable)?;
                let meta = txn.open_table(WAL_META).map_err(unavailable)?;
                let done = meta.get(CHECKPOINT_SEQ).map_err(unavailable)?.map(|v| v.value());
                done.unwrap_or(0)
            };
            txn.commit().map_err(unavailable)?;
            done
        };
        let mut contents = [Vec::new(), Vec::new()];
        let mut parsed: [wal::Parsed; 2] = Default::default();
        let mut lens = [0u64; 2];
        for (i, file) in files.iter().enumerate() {
            let mut bytes = wal::read_all(&**file).map_err(|e| log_io(&format!("read log {i}"), e))?;
            // A file shorter than its header, or all zeros, is one whose creation was cut
            // short: nothing in it was ever acknowledged (frames follow a synced header).
            if bytes.len() < HEADER_LEN as usize || bytes.iter().all(|&b| b == 0) {
                let salt = init_log_file(&**file).map_err(|e| log_io(&format!("initialise log {i}"), e))?;
                bytes = wal::header(salt).to_vec();
            }
            // Frames up to the mark are in redb: for the parse they are stale.
            let mut p = wal::parse(&bytes, done).map_err(|reason| log_corrupt(i, reason))?;
            if p.salt.is_none() && p.frames.is_empty() {
                // A format-1 file with nothing to replay: rewritten as format 2.
                let salt = init_log_file(&**file).map_err(|e| log_io(&format!("rewrite log {i} as format 2"), e))?;
                bytes = wal::header(salt).to_vec();
                p = wal::parse(&bytes, done).map_err(|reason| log_corrupt(i, reason))?;
            } else if p.salt.is_none() && p.dropped > 0 {
                // Format 1: cut the torn last frame off before anything is appended after
                // it (its bytes carry no salt, so none may stay past the end).
                file.set_len(p.valid_end)
                    .and_then(|()| file.sync_data())
                    .map_err(|e| log_io(&format!("cut the torn tail of log {i}"), e))?;
            }
            // Format 2 keeps what follows its valid end (zeros, a torn frame, stale frames):
            // appends overwrite it, and no frame there can pass as newer (invariant 9).
            lens[i] = file
                .len()
                .map_err(|e| log_io(&format!("read the length of log {i}"), e))?;
            contents[i] = bytes;
            parsed[i] = p;
        }
        // Frames after the mark, in seq order, must continue it without a gap.
        let newer = |i: usize| parsed[i].frames.iter().filter(move |f| f.seq > done);
        let firsts = [0, 1].map(|i| newer(i).next().map(|f| f.seq));
        let order: Vec<usize> = match firsts {
            [Some(a), Some(b)] if a < b => vec![0, 1],
            [Some(_), Some(_)] => vec![1, 0],
            [Some(_), None] => vec![0],
            [None, Some(_)] => vec![1],
            [None, None] => vec![],
        };
        let mut expect = done.saturating_add(1);
        // Every entry after the mark, in log order: (entry, its frame's seq, its file).
        let mut entries = Vec::new();
        for &i in &order {
            for frame in newer(i) {
                if frame.seq != expect {
                    return Err(log_corrupt(
                        i,
                        format!(
                            "frame {} follows checkpoint {done} and frame {}: frames are missing",
                            frame.seq,
                            expect - 1
                        ),
                    ));
                }
                expect += 1;
                entries.extend(frame.entries(&contents[i]).map(|e| (e, frame.seq, i)));
            }
        }
        // The stable sort keeps log order among entries of one key: the last is the latest.
        entries.sort_by(|a, b| a.0.key.cmp(b.0.key));
        let mut latest = Vec::with_capacity(entries.len());
        for (n, &(e, seq, i)) in entries.iter().enumerate() {
            // Every record is checked, the superseded ones too.
            let value = match e.value {
                Some(bytes) => {
                    let s = codec::decode(bytes).map_err(|e| log_corrupt(i, format!("frame {seq}: {e}")))?;
                    if s.id.as_bytes() != e.key {
                        return Err(log_corrupt(i, format!("frame {seq}: a record filed under another key")));
                    }
                    Some(s)
                }
                None => None,
            };
            if entries.get(n + 1).is_some_and(|next| next.0.key == e.key) {
                continue;
            }
            let id = match &value {
                Some(s) => s.id.clone(),
                None => SessionId::new(e.key).map_err(|e| log_corrupt(i, e))?,
            };
            latest.push((id, Pending { seq, value }));
        }
        drop(entries);
        // Keys ascending and unique (`SessionId` orders as its bytes): built in bulk.
        let index: BTreeMap<SessionId, Pending> = latest.into_iter().collect();
        // (A file whose frames redb already holds, a checkpoint that ended before its
        // recycle, parsed as empty: its frames are at or below the mark.)
        let last_seq = [0, 1]
            .iter()
            .filter_map(|&i| parsed[i].frames.last().map(|f| f.seq))
            .max()
            .unwrap_or(0);
        let (active, sealed) = match order.as_slice() {
            [older, newer] => (*newer, Some(*older)),
            [only] => (*only, None),
            _ => (0, None),
        };
        let log = Log {
            active,
            ends: [parsed[0].valid_end, parsed[1].valid_end],
            lens,
            salts: [parsed[0].salt, parsed[1].salt],
            has_frames: [!parsed[0].frames.is_empty(), !parsed[1].frames.is_empty()],
            next_seq: last_seq.max(done) + 1,
            sealed,
            failed: None,
        };
        drop(contents);
        let inner = Arc::new(Inner {
            db,
            options,
            settings,
            group: Group::default(),
            index: RwLock::new(index),
            planning: Mutex::new(()),
            files,
            log: Mutex::new(log),
            checkpointing: Mutex::new(()),
            signal: Mutex::new(Signal {
                requested: sealed.is_some(),
                shutdown: false,
            }),
            wake: Condvar::new(),
        });
        let checkpointer = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("erlmcp-session-checkpoint".into())
                .spawn(move || inner.run_checkpointer())
                .map_err(|e| StoreError::Unavailable {
                    reason: format!("cannot start the checkpoint thread: {e}"),
                })?
        };
        Ok(DiskStore {
            inner,
            checkpointer: Some(checkpointer),
            committer: Mutex::new(None),
        })
    }

    /// The options the store was built with.
    pub fn options(&self) -> &StoreOptions {
        &self.inner.options
    }

    /// Brings redb up to date with every write acknowledged before the call and empties
    /// the log (what the background checkpoints do; writers go on meanwhile, waiting at
    /// most for the group in flight when the active log file is sealed). The log files
    /// keep their length ([`DiskOptions::log_extent_bytes`]): they are recycled, not
    /// truncated.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::session::{DiskOptions, DiskStore, Session, SessionId, Store, StoreOptions, Timeout};
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("s.redb");
    /// let settings = DiskOptions { log_extent_bytes: 4096, ..DiskOptions::default() };
    /// let store = DiskStore::create_with(&path, StoreOptions::default(), settings)?;
    /// let s = store.put(Session::new(SessionId::new("s1")?, 0, Timeout::Infinity, vec![]))?;
    /// let [log, _] = DiskStore::log_paths(&path);
    /// let len = std::fs::metadata(&log)?.len(); // header, frame, then 4 KiB of zeros
    /// store.checkpoint()?;
    /// assert_eq!(store.get(&s.id)?, s); // now from redb
    /// assert_eq!(std::fs::metadata(&log)?.len(), len); // recycled, not truncated
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when redb or a log file fails (nothing acknowledged is
    /// lost: the log is recycled only after redb's commit), [`StoreError::Corrupt`] when
    /// a sealed log file no longer reads back as it was written.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.inner.checkpoint()
    }

    /// Queues `f` for the next group commit and returns its result once that group is
    /// durable (or has failed). `f` sees the state as left by the operations before it in
    /// the same group and the store clock's now; its writes are applied only if it
    /// returns `Ok`.
    fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Stage<'_, '_>, i64) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = &*self.inner;
        let slot = Arc::new(Slot::new());
        let mut state = lock(&inner.group.state);
        state.queue.push(Box::new(Op {
            f: Some(f),
            result: None,
            to: Arc::clone(&slot),
            answered: false,
        }));
        loop {
            if let Some(result) = slot.take_result() {
                return result;
            }
            if !state.committing {
                // Lead: commit everything queued so far (our own operation included).
                inner.lead(state);
            } else {
                drop(state);
                // Until our result is in, or we are told to lead.
                slot.wait();
            }
            state = lock(&inner.group.state);
        }
    }

    /// Starts the committer thread unless it runs.
    fn ensure_committer(&self) -> Result<(), std::io::Error> {
        let mut committer = lock(&self.committer);
        if committer.is_none() {
            let inner = Arc::clone(&self.inner);
            let handle = std::thread::Builder::new()
                .name("erlmcp-session-commit".into())
                .spawn(move || inner.run_committer())?;
            *committer = Some(handle);
        }
        Ok(())
    }

    /// Queues `f` like [`DiskStore::write`] without waiting: `done` gets its result from
    /// the thread that finishes its group. The committer thread must run.
    fn enqueue<T, F, D>(&self, f: F, done: D)
    where
        T: Send + 'static,
        F: FnOnce(&mut Stage<'_, '_>, i64) -> Result<T, StoreError> + Send + 'static,
        D: FnOnce(Result<T, StoreError>) + Send + 'static,
    {
        let inner = &*self.inner;
        let mut state = lock(&inner.group.state);
        state.queue.push(Box::new(Op {
            f: Some(f),
            result: None,
            to: Callback(Some(done)),
            answered: false,
        }));
        if !state.committing {
            // Nobody leads: the committer does (a kicked writer may beat it; either leads).
            inner.group.committer.notify_one();
        }
    }

    /// The record of `id` whatever its state: the tail index, else redb. (An index miss
    /// followed by a fresh redb snapshot is safe: entries leave the index only after redb
    /// durably holds them.)
    fn lookup(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        if let Some(p) = read(&self.inner.index).get(id) {
            return Ok(p.value.clone());
        }
        let txn = self.inner.db.begin_read().map_err(unavailable)?;
        let table = txn.open_table(SESSIONS).map_err(unavailable)?;
        load(&table, id)
    }

    fn read_live(&self, id: &SessionId) -> Result<Session, StoreError> {
        let now = self.inner.options.clock.now_unix_ms();
        match self.lookup(id)? {
            Some(s) if s.is_live(now) => Ok(s),
            _ => Err(StoreError::NotFound { key: id.clone() }),
        }
    }
}

impl Inner {
    /// Leads one group (the caller holds the group lock and nobody is committing): runs
    /// and commits every queued job, hands leadership to the next queued one, then
    /// answers this group's jobs.
    fn lead(&self, mut state: MutexGuard<'_, GroupState>) {
        state.committing = true;
        let mut batch = std::mem::take(&mut state.queue);
        drop(state);
        let commit = catch_unwind(AssertUnwindSafe(|| self.commit_group(&mut batch)))
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
                if !next.kick() {
                    self.group.committer.notify_one();
                }
            }
        }
        for job in batch {
            job.finish(&commit);
        }
    }

    /// The committer thread: leads whenever jobs are queued and nobody leads (it is
    /// woken when the first queued job is a started write); after shutdown, until the
    /// queue is empty.
    fn run_committer(&self) {
        let mut state = lock(&self.group.state);
        loop {
            if !state.committing && !state.queue.is_empty() {
                self.lead(state);
                state = lock(&self.group.state);
                continue;
            }
            if state.shutdown && state.queue.is_empty() {
                return;
            }
            state = self.group.committer.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Runs `batch` as one group: plans every operation, appends the group's records as
    /// one frame, syncs it, publishes the records to the tail index.
    fn commit_group(&self, batch: &mut [Box<dyn Job>]) -> Result<(), StoreError> {
        if let Some(reason) = &lock(&self.log).failed {
            return Err(StoreError::Unavailable { reason: reason.clone() });
        }
        let now = self.options.clock.now_unix_ms();
        let mut group = Writes::new();
        {
            let _planning = lock(&self.planning);
            let txn = self.db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(SESSIONS).map_err(unavailable)?;
            for job in batch.iter_mut() {
                let writes = {
                    let view = View {
                        index: &self.index,
                        table: &table,
                        group: &group,
                    };
                    job.plan(&view, now)
                };
                if let Some(writes) = writes {
                    group.extend(writes);
                }
            }
        }
        if group.is_empty() {
            return Ok(());
        }
        let encoded = group
            .iter()
            .map(|(k, v)| Ok((k, v.as_ref().map(codec::encode).transpose()?)))
            .collect::<Result<Vec<_>, InvalidInput>>()?;
        let mut log = lock(&self.log);
        if let Some(reason) = &log.failed {
            return Err(StoreError::Unavailable { reason: reason.clone() });
        }
        let seq = log.next_seq;
        let file = log.active;
        let frame = wal::encode_frame(
            seq,
            encoded.iter().map(|(k, v)| wal::Entry {
                key: k.as_bytes(),
                value: v.as_deref(),
            }),
            log.salts[file],
        );
        let at = log.ends[file];
        let appended = append_frame(
            &*self.files[file],
            log.lens[file],
            at,
            &frame,
            self.settings.log_extent_bytes,
        );
        let appended = appended.map(|len| log.lens[file] = len);
        if let Err(e) = appended {
            let reason = format!(
                "session log {file}: append at offset {at} failed ({e}); writes are refused until the store is reopened"
            );
            log.failed = Some(reason.clone());
            return Err(StoreError::Unavailable { reason });
        }
        log.ends[file] = at + frame.len() as u64;
        log.has_frames[file] = true;
        log.next_seq = seq + 1;
        let full = self.settings.checkpoint_bytes > 0 && log.ends[file] - HEADER_LEN >= self.settings.checkpoint_bytes;
        {
            // Published before the log lock is released, so a checkpoint that seals this
            // file finds these entries in the index when it prunes.
            let mut index = write(&self.index);
            for (k, value) in group {
                index.insert(k, Pending { seq, value });
            }
        }
        drop(log);
        if full {
            let mut signal = lock(&self.signal);
            if !signal.requested {
                signal.requested = true;
                self.wake.notify_one();
            }
        }
        Ok(())
    }

    /// The background checkpointer: waits for a request, the interval or shutdown.
    fn run_checkpointer(&self) {
        loop {
            {
                let deadline = self.settings.checkpoint_interval.map(|d| Instant::now() + d);
                let mut signal = lock(&self.signal);
                while !signal.shutdown && !signal.requested {
                    match deadline {
                        Some(d) => {
                            let now = Instant::now();
                            if now >= d {
                                break;
                            }
                            signal = self
                                .wake
                                .wait_timeout(signal, d - now)
                                .unwrap_or_else(PoisonError::into_inner)
                                .0;
                        }
                        None => signal = self.wake.wait(signal).unwrap_or_else(PoisonError::into_inner),
                    }
                }
                if signal.shutdown {
                    return;
                }
                signal.requested = false;
            }
            // A failure leaves the log as it was (nothing is lost); the next round retries.
            let _ = self.checkpoint();
        }
    }

    /// A file sealed earlier (found at open, or left by a failed checkpoint) first, then
    /// the active file.
    fn checkpoint(&self) -> Result<(), StoreError> {
        let _one = lock(&self.checkpointing);
        let sealed = lock(&self.log).sealed;
        if let Some(sealed) = sealed {
            self.checkpoint_file(sealed)?;
        }
        let sealed = {
            let mut log = lock(&self.log);
            let active = log.active;
            if !log.has_frames[active] {
                return Ok(());
            }
            // Invariant: with nothing sealed, the other file holds no frames.
            log.sealed = Some(active);
            log.active = 1 - active;
            active
        };
        self.checkpoint_file(sealed)
    }

    /// Copies the sealed file's records into redb (one durable transaction that also
    /// moves the mark), prunes them from the index, recycles the file.
    fn checkpoint_file(&self, f: usize) -> Result<(), StoreError> {
        let end = lock(&self.log).ends[f];
        let mut bytes = vec![0u8; usize::try_from(end).unwrap_or(usize::MAX)];
        self.files[f]
            .read(0, &mut bytes)
            .map_err(|e| log_io(&format!("read sealed log {f}"), e))?;
        // Everything before `end` was written in this generation of the file: no floor.
        let parsed = wal::parse(&bytes, 0).map_err(|reason| log_corrupt(f, reason))?;
        if parsed.valid_end != end {
            return Err(log_corrupt(
                f,
                format!("sealed log reads back valid up to {} of {end} bytes", parsed.valid_end),
            ));
        }
        let Some(last) = parsed.frames.last().map(|fr| fr.seq) else {
            return self.recycle(f);
        };
        let mut txn = self.db.begin_write().map_err(unavailable)?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| unavailable(redb::Error::from(e)))?;
        let mut latest: BTreeMap<&[u8], Option<&[u8]>> = BTreeMap::new();
        {
            let mut meta = txn.open_table(WAL_META).map_err(unavailable)?;
            let done = meta.get(CHECKPOINT_SEQ).map_err(unavailable)?.map_or(0, |v| v.value());
            for frame in parsed.frames.iter().filter(|fr| fr.seq > done) {
                for e in frame.entries(&bytes) {
                    latest.insert(e.key, e.value);
                }
            }
            let mut table = txn.open_table(SESSIONS).map_err(unavailable)?;
            for (key, value) in &latest {
                match value {
                    Some(v) => {
                        table.insert(*key, *v).map_err(unavailable)?;
                    }
                    None => {
                        table.remove(*key).map_err(unavailable)?;
                    }
                }
            }
            meta.insert(CHECKPOINT_SEQ, last.max(done)).map_err(unavailable)?;
        }
        txn.commit().map_err(unavailable)?;
        // redb now holds every frame up to `last`: their index entries may go, unless a
        // later frame rewrote the key.
        let keys: Vec<&[u8]> = latest.keys().copied().collect();
        for chunk in keys.chunks(PRUNE_CHUNK) {
            let _planning = lock(&self.planning);
            let mut index = write(&self.index);
            for key in chunk {
                let Ok(id) = SessionId::new(key) else { continue };
                if index.get(&id).is_some_and(|p| p.seq <= last) {
                    index.remove(&id);
                }
            }
        }
        self.recycle(f)
    }

    /// Makes a checkpointed (sealed) file the next to fill, from its header on. Its old
    /// frames stay until overwritten: every one is at or below the durable checkpoint
    /// mark, so an open parses them as stale. A format-1 file is rewritten as format 2
    /// here (its frames carry no salt, so they may not stay past the end).
    fn recycle(&self, f: usize) -> Result<(), StoreError> {
        if lock(&self.log).salts[f].is_none() {
            let salt =
                init_log_file(&*self.files[f]).map_err(|e| log_io(&format!("rewrite log {f} as format 2"), e))?;
            let mut log = lock(&self.log);
            log.salts[f] = Some(salt);
            log.lens[f] = HEADER_LEN;
        }
        let mut log = lock(&self.log);
        log.ends[f] = HEADER_LEN;
        log.has_frames[f] = false;
        if log.sealed == Some(f) {
            log.sealed = None;
        }
        Ok(())
    }
}

impl Drop for DiskStore {
    /// Stops the checkpointer, then (with [`DiskOptions::checkpoint_on_close`])
    /// checkpoints everything; a failure there loses nothing (the next open replays).
    fn drop(&mut self) {
        // Started writes still queued are committed (and answered) first.
        lock(&self.inner.group.state).shutdown = true;
        self.inner.group.committer.notify_all();
        if let Some(h) = lock(&self.committer).take() {
            // A started write's callback may drop the last handle: then this runs on the
            // commit thread itself, which cannot be joined; it leads what is queued and
            // exits once its current group is answered.
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
        lock(&self.inner.signal).shutdown = true;
        self.inner.wake.notify_all();
        if let Some(h) = self.checkpointer.take() {
            let _ = h.join();
        }
        if self.inner.settings.checkpoint_on_close {
            let _ = self.inner.checkpoint();
        }
    }
}

/// The group-commit operations of the writing [`Store`] calls, shared by the waiting
/// calls and [`Store::start`]. Input was validated before.
fn create_op(mut session: Session) -> impl FnOnce(&mut Stage<'_, '_>, i64) -> Result<Session, StoreError> + Send {
    move |stage, now| {
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
    }
}

fn put_op(mut session: Session) -> impl FnOnce(&mut Stage<'_, '_>, i64) -> Result<Session, StoreError> + Send {
    move |stage, _| {
        session.version = next_version(stage.load(&session.id)?.as_ref());
        session.tombstone = false;
        stage.save(&session)?;
        Ok(session)
    }
}

fn update_op(
    mut session: Session,
    expected: u64,
) -> impl FnOnce(&mut Stage<'_, '_>, i64) -> Result<Session, StoreError> + Send {
    move |stage, now| {
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
    }
}

fn delete_op(id: SessionId) -> impl FnOnce(&mut Stage<'_, '_>, i64) -> Result<bool, StoreError> + Send {
    move |stage, now| match stage.load(&id)? {
        Some(mut s) if !s.tombstone => {
            let was_live = s.is_live(now);
            s.bury(now);
            stage.save(&s)?;
            Ok(was_live)
        }
        _ => Ok(false),
    }
}

impl Store for DiskStore {
    fn create(&self, session: Session) -> Result<Session, StoreError> {
        session.validate()?;
        self.write(create_op(session))
    }

    fn get(&self, id: &SessionId) -> Result<Session, StoreError> {
        self.read_live(id)
    }

    fn get_raw(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        self.lookup(id)
    }

    fn put(&self, session: Session) -> Result<Session, StoreError> {
        session.validate()?;
        self.write(put_op(session))
    }

    fn update_if_version(&self, session: Session, expected: u64) -> Result<Session, StoreError> {
        session.validate()?;
        self.write(update_op(session, expected))
    }

    fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        self.write(delete_op(id.clone()))
    }

    fn start(&self, op: WriteOp, done: WriteDone) -> Result<(), Unstarted> {
        // Invalid input: the caller's own run of `op` reports it.
        if op.validate().is_err() || self.ensure_committer().is_err() {
            return Err(Unstarted { op, done });
        }
        match op {
            WriteOp::Create(s) => self.enqueue(create_op(s), move |r| done(r.map(Written::Session))),
            WriteOp::Put(s) => self.enqueue(put_op(s), move |r| done(r.map(Written::Session))),
            WriteOp::UpdateIfVersion(s, expected) => {
                self.enqueue(update_op(s, expected), move |r| done(r.map(Written::Session)))
            }
            WriteOp::Delete(id) => self.enqueue(delete_op(id), move |r| done(r.map(Written::Deleted))),
        }
        Ok(())
    }

    fn touch(&self, id: &SessionId) -> Result<Session, StoreError> {
        let now = self.inner.options.clock.now_unix_ms();
        let policy = self.inner.options.touch;
        let s = self.read_live(id)?;
        if !policy.should_persist(s.last_accessed, now, s.timeout) {
            return Ok(Session {
                last_accessed: s.last_accessed.max(now),
                ..s
            });
        }
        // Decide again inside the group: another writer may have run meanwhile.
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
        let now = self.inner.options.clock.now_unix_ms();
        // The snapshot is opened under the index's read lock: no entry leaves the index
        // while the page is read, and every entry that left it before is in the snapshot.
        let index = read(&self.inner.index);
        let txn = self.inner.db.begin_read().map_err(unavailable)?;
        let table = txn.open_table(SESSIONS).map_err(unavailable)?;
        let overlay = match after {
            Some(a) => index.range::<SessionId, _>((Bound::Excluded(a), Bound::Unbounded)),
            None => index.range::<SessionId, _>(..),
        };
        let lower = after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.as_bytes()));
        let range = table
            .range::<&[u8]>((lower, Bound::Unbounded))
            .map_err(unavailable)?
            .map(|entry| {
                let (k, v) = entry.map_err(unavailable)?;
                decode_stored(k.value(), v.value())
            });
        let merged = OverTable {
            l: overlay.map(|(k, p)| (k, &p.value)).peekable(),
            r: range.peekable(),
        };
        let mut records = Vec::new();
        for s in merged {
            let s = s?;
            if visibility == Visibility::Raw || s.is_live(now) {
                records.push(s);
                if records.len() > limit {
                    break;
                }
            }
        }
        drop(index);
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
        let retention = i128::from(self.inner.options.tombstone_retention_ms);
        self.write(move |stage, _| {
            let mut outcome = SweepOutcome::default();
            let mut expire = Vec::new();
            let mut purge = Vec::new();
            stage.view.for_each(|s| {
                if s.tombstone {
                    if i128::from(now_ms) - i128::from(s.last_accessed) > retention {
                        purge.push(s.id);
                    }
                } else if s.is_expired(now_ms) {
                    expire.push(s);
                }
                Ok(())
            })?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Timeout;

    /// A format-1 log file (the first format: no salt, no preallocation) holding one
    /// frame per session, seqs from 1.
    fn format_1_log(sessions: &[Session]) -> Vec<u8> {
        let mut f = wal::header(0).to_vec();
        f[8..12].copy_from_slice(&wal::FILE_FORMAT_1.to_be_bytes());
        for (n, s) in sessions.iter().enumerate() {
            let value = codec::encode(s).unwrap();
            let entry = wal::Entry {
                key: s.id.as_bytes(),
                value: Some(&value),
            };
            f.extend_from_slice(&wal::encode_frame(n as u64 + 1, std::iter::once(entry), None));
        }
        f
    }

    fn session(key: &str, meta: &str) -> Session {
        let mut s = Session::new(
            SessionId::new(key).unwrap(),
            0,
            Timeout::Infinity,
            meta.as_bytes().to_vec(),
        );
        s.version = 1;
        s
    }

    /// Logs written by the first format are replayed (a torn last frame cut off), then
    /// each file is rewritten as format 2 when it is next recycled (or at once, when it
    /// has nothing to replay).
    #[test]
    fn format_1_logs_are_replayed_then_rewritten_as_format_2() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let [log0, log1] = DiskStore::log_paths(&path);
        let sessions: Vec<Session> = (0..5).map(|i| session(&format!("k{i}"), "v1")).collect();
        let mut bytes = format_1_log(&sessions);
        let whole = bytes.len();
        bytes.extend_from_slice(&format_1_log(&[session("torn", "x")])[16..40]);
        std::fs::write(&log0, &bytes).unwrap();
        std::fs::write(&log1, format_1_log(&[])).unwrap();
        let format = |p: &Path| u32::from_be_bytes(std::fs::read(p).unwrap()[8..12].try_into().unwrap());
        let settings = DiskOptions {
            log_extent_bytes: 4096,
            checkpoint_interval: None,
            checkpoint_on_close: false,
            ..DiskOptions::default()
        };
        let store = DiskStore::create_with(&path, StoreOptions::default(), settings.clone()).unwrap();
        assert_eq!(std::fs::metadata(&log0).unwrap().len(), whole as u64, "torn tail cut");
        assert_eq!(
            (format(&log0), format(&log1)),
            (1, 2),
            "the empty file is rewritten at once"
        );
        for s in &sessions {
            assert_eq!(store.get(&s.id).unwrap(), *s);
        }
        // Appends go on in format 1 (frame 6 follows frame 5 in the same file).
        let s = store.put(session("k0", "v2")).unwrap();
        assert_eq!(s.version, 2);
        drop(store);
        let store = DiskStore::create_with(&path, StoreOptions::default(), settings).unwrap();
        assert_eq!(store.get(&s.id).unwrap(), s);
        store.checkpoint().unwrap();
        assert_eq!((format(&log0), format(&log1)), (2, 2));
        assert_eq!(
            std::fs::metadata(&log0).unwrap().len(),
            HEADER_LEN,
            "rewritten: the header only"
        );
        assert!(store.get_raw(&SessionId::new("torn").unwrap()).unwrap().is_none());
        drop(store);
        let store = DiskStore::create(&path, StoreOptions::default()).unwrap();
        assert_eq!(store.get(&s.id).unwrap(), s);
        assert_eq!(store.scan(None, 10, Visibility::Raw).unwrap().records.len(), 5);
    }
}
