//! Session stores (DESIGN §4): the session record, one [`Store`] trait, its backends.
//!
//! - [`Session`], [`SessionId`], [`Timeout`]: erlmcp's session plus a per-record `version`
//!   and a `tombstone` flag; sliding expiry ([`Session::is_expired`]).
//! - [`TouchPolicy`]: which touches are written, so reads do not all become writes.
//! - [`Store`]: the contract every backend implements; [`StoreError`]: its one error enum.
//! - [`MemoryStore`]: a sharded concurrent map, no global lock.
//! - `DiskStore` (feature `disk`): a checksummed write-ahead log in front of one redb
//!   file; acknowledged writes are durable (fdatasync), concurrent writers share one log
//!   append and sync (group commit), redb is brought up to date in the background.
//! - `EtcdStore` (feature `etcd`): a replicated etcd cluster; acknowledged writes are
//!   committed by the etcd quorum.
//! - [`codec`]: the versioned binary record encoding persistent backends store.
//! - [`uri`]: store URIs (`memory:`, `disk:PATH`, `etcd:HOST:PORT,...`) and opening them.
//! - [`shared`]: stores shared inside one process, opened once per [`shared::StoreKey`].
//!
//! Time comes from a [`Clock`] (the same trait the flag schedules use), so tests move it
//! by hand with [`ManualClock`].
//!
//! # Examples
//! ```
//! use erlmcp_rollout::session::{ManualClock, MemoryStore, Session, SessionId, Store, StoreOptions, Timeout};
//!
//! let clock = ManualClock::new(0);
//! let store = MemoryStore::new(StoreOptions::with_clock(clock.clone()));
//! let id = SessionId::new("s1")?;
//! store.create(Session::new(id.clone(), 0, Timeout::ms(1_000)?, b"meta".to_vec()))?;
//! assert_eq!(store.get(&id)?.metadata.as_ref(), b"meta");
//! clock.advance_ms(1_001);
//! assert!(store.get(&id).is_err()); // expired: never returned
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod codec;
#[cfg(feature = "disk")]
mod disk;
#[cfg(feature = "etcd")]
mod etcd;
mod memory;
mod model;
pub mod shared;
mod stats;
pub mod uri;
#[cfg(feature = "disk")]
mod wal;

use std::sync::Arc;

pub use crate::clock::{Clock, ManualClock, PinnableClock, SystemClock};
#[cfg(feature = "etcd")]
pub use crate::etcd::{EtcdOptions, DEFAULT_ETCD_MAX_REQUEST_BYTES};
#[cfg(feature = "disk")]
pub use disk::{DiskOptions, DiskStore};
#[cfg(feature = "etcd")]
pub use etcd::EtcdStore;
pub use memory::{MemoryStore, DEFAULT_SHARDS};
pub use model::{MetaFormat, Session, SessionId, Timeout, TouchPolicy, MAX_ID_LEN, MAX_METADATA_LEN};
pub use stats::{stats, StoreStats};

/// Input a store rejects before touching any record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidInput {
    /// The id has no bytes.
    #[error("session id is empty")]
    EmptyId,
    /// The id is longer than [`MAX_ID_LEN`].
    #[error("session id is {len} bytes, the limit is {max}")]
    IdTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The metadata is larger than [`MAX_METADATA_LEN`].
    #[error("session metadata is {len} bytes, the limit is {max}")]
    MetadataTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A finite timeout of 0 ms (erlmcp requires a positive integer).
    #[error("timeout_ms must be positive (or infinity)")]
    ZeroTimeout,
    /// Text was required and the bytes are not UTF-8.
    #[error("not valid UTF-8 (valid up to byte {valid_up_to})")]
    NotUtf8 {
        /// Length of the valid prefix.
        valid_up_to: usize,
    },
    /// A touch fraction above 1000 permille.
    #[error("touch fraction {permille} permille is above 1000")]
    TouchFraction {
        /// The rejected value.
        permille: u16,
    },
    /// A scan with limit 0.
    #[error("scan limit must be at least 1")]
    ZeroLimit,
    /// The encoded record does not fit in one request of the backend (etcd's
    /// `--max-request-bytes`, 1.5 MiB by default); nothing was written.
    #[error("session {key} encodes to {len} bytes; this store accepts records of at most {max} bytes")]
    RecordTooLarge {
        /// The record's key.
        key: SessionId,
        /// Its encoded length.
        len: usize,
        /// The largest record the store accepts for this key.
        max: usize,
    },
    /// A store endpoint (e.g. an etcd URL) is missing or malformed.
    #[error("endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The endpoint as given (empty when none was given).
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A batch record with version 0 (versions start at 1).
    #[error("batch record {key} has version 0; versions start at 1")]
    ZeroVersion {
        /// The record's key.
        key: SessionId,
    },
    /// A store URI names a backend this build does not include.
    #[error("{backend} store not built in{hint}")]
    NotBuiltIn {
        /// The backend (`disk`, `etcd`).
        backend: String,
        /// How to get it, e.g. ` (cargo feature `disk`)`; may be empty.
        hint: String,
    },
}

/// The one error of every [`Store`] method.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No live session has this key (absent, deleted or expired).
    #[error("session {key} not found (absent, deleted or expired)")]
    NotFound {
        /// The key.
        key: SessionId,
    },
    /// [`Store::create`] found a live session with this key.
    #[error("session {key} already exists")]
    AlreadyExists {
        /// The key.
        key: SessionId,
    },
    /// [`Store::update_if_version`] found another version; re-read and retry.
    #[error("session {key} is at version {actual}, not the expected {expected}; re-read and retry")]
    Conflict {
        /// The key.
        key: SessionId,
        /// The version the caller expected.
        expected: u64,
        /// The version stored.
        actual: u64,
    },
    /// The backend cannot answer now (I/O, network, quorum); retrying may succeed, and
    /// the write may or may not have been applied.
    #[error("store unavailable (retryable): {reason}")]
    Unavailable {
        /// What failed.
        reason: String,
    },
    /// The backend refused the connection or the request for a reason retrying cannot
    /// fix: its TLS settings, the user's credentials, or the user's permission on the
    /// key (etcd). Nothing was written.
    #[error(transparent)]
    Access(#[from] crate::etcd::EtcdAccessError),
    /// A stored record cannot be decoded; it is not returned.
    #[error("corrupt session record{}: {reason}", key.as_ref().map(|k| format!(" {k}")).unwrap_or_default())]
    Corrupt {
        /// The key, when known.
        key: Option<SessionId>,
        /// What is wrong.
        reason: String,
    },
    /// The input was rejected; nothing was written.
    #[error("invalid input: {0}")]
    Invalid(#[from] InvalidInput),
}

impl StoreError {
    /// Whether retrying the same call may succeed ([`StoreError::Unavailable`]).
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}

/// Which records [`Store::scan`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Visibility {
    /// Live sessions only (not tombstoned, not expired at the store clock's now): `list`.
    Live,
    /// Every stored record, tombstones and expired ones included: backfill and verify.
    Raw,
}

/// One page of [`Store::scan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanPage {
    /// Records in ascending key order (bytewise), at most `limit`.
    pub records: Vec<Session>,
    /// Pass as `after` to get the next page; `None` when the scan is complete.
    pub next: Option<SessionId>,
}

/// How many records one [`Store::scan`] call visits at most, live or not: a
/// store full of expired records or tombstones (before a sweep frees them)
/// then costs a bounded time per page, and a short page with `next` set
/// continues after the last record visited.
pub(crate) fn visit_budget(limit: usize) -> usize {
    limit.saturating_mul(2).max(1024)
}

impl ScanPage {
    /// A page from up to `limit + 1` records in key order: the extra one only says that
    /// more follow.
    pub(crate) fn from_overfetch(mut records: Vec<Session>, limit: usize) -> Self {
        let more = records.len() > limit;
        records.truncate(limit);
        let next = if more {
            records.last().map(|s| s.id.clone())
        } else {
            None
        };
        ScanPage { records, next }
    }
}

/// What [`Store::apply_batch_if_newer`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Records written (their version was newer than the stored one, or none was stored).
    pub applied: usize,
    /// Records left out (the stored version was the same or newer).
    pub skipped: usize,
}

/// What [`Store::sweep_expired`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepOutcome {
    /// Expired sessions turned into tombstones (the true count; each counted once).
    pub expired: usize,
    /// Tombstones older than [`StoreOptions::tombstone_retention_ms`] removed.
    pub tombstones: usize,
}

/// Settings shared by every backend.
#[derive(Clone)]
pub struct StoreOptions {
    /// Where "now" comes from for expiry and touches.
    pub clock: Arc<dyn Clock>,
    /// Which touches are written.
    pub touch: TouchPolicy,
    /// How long a tombstone is kept after its delete (ms) before a sweep may remove it.
    /// Migration relies on tombstones: keep this longer than any migration runs.
    pub tombstone_retention_ms: u64,
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("now_unix_ms", &self.clock.now_unix_ms())
            .field("touch", &self.touch)
            .field("tombstone_retention_ms", &self.tombstone_retention_ms)
            .finish()
    }
}

/// Seven days.
pub const DEFAULT_TOMBSTONE_RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;

impl Default for StoreOptions {
    /// The system clock, [`TouchPolicy::default`], [`DEFAULT_TOMBSTONE_RETENTION_MS`].
    fn default() -> Self {
        StoreOptions::with_clock(SystemClock)
    }
}

impl StoreOptions {
    /// Defaults with another clock.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::session::{ManualClock, StoreOptions};
    /// let opts = StoreOptions::with_clock(ManualClock::new(0));
    /// assert_eq!(opts.clock.now_unix_ms(), 0);
    /// ```
    pub fn with_clock(clock: impl Clock) -> Self {
        StoreOptions {
            clock: Arc::new(clock),
            touch: TouchPolicy::default(),
            tombstone_retention_ms: DEFAULT_TOMBSTONE_RETENTION_MS,
        }
    }
}

/// The version of the next write of a key whose stored record is `stored`.
pub(crate) fn next_version(stored: Option<&Session>) -> u64 {
    stored.map_or(1, |s| s.version.saturating_add(1))
}

/// The checks of [`Store::apply_batch_if_newer`] before anything is written.
pub(crate) fn validate_batch(records: &[Session]) -> Result<(), StoreError> {
    for r in records {
        r.validate()?;
        if r.version == 0 {
            return Err(InvalidInput::ZeroVersion { key: r.id.clone() }.into());
        }
    }
    Ok(())
}

/// A session store. Every backend implements this one contract, and one conformance
/// suite (`tests/session_conformance.rs`) checks it for each.
///
/// **Visibility.** A record is *live* when it is not a tombstone and not expired at the
/// store clock's now ([`Session::is_expired`]). Only live sessions are ever returned by
/// [`get`](Store::get), [`touch`](Store::touch) and [`Visibility::Live`] scans; an expired
/// or deleted one is [`StoreError::NotFound`], whether or not a sweep has removed it yet.
///
/// **Versions.** The store assigns versions: a key's first write is version 1, every
/// later write of the key (create over a dead record, put, update, delete, persisted
/// touch) is the stored version + 1, tombstones and expired records included. Versions of
/// a key therefore never go back while its record (or tombstone) is retained. The
/// `version` and `tombstone` fields of a [`Session`] passed to create, put and update are
/// ignored.
///
/// **Acknowledged.** A method that returns `Ok` has applied its write atomically for that
/// key; what survives a crash depends on the backend: for [`MemoryStore`], in memory
/// only (nothing survives the process). Durable backends state their own guarantee.
///
/// **Errors.** Bad input is [`StoreError::Invalid`] and writes nothing. A record that
/// cannot be decoded is [`StoreError::Corrupt`] and is never returned as a session.
/// [`StoreError::Unavailable`] is the only retryable error.
///
/// The trait is object safe (`Box<dyn Store>`), synchronous, and `Send + Sync`.
pub trait Store: Send + Sync {
    /// Creates `session` if no live session has its key (create-if-absent); its version
    /// is 1, or the dead (tombstoned or expired) record's version + 1.
    ///
    /// # Errors
    /// [`StoreError::AlreadyExists`] when a live session has the key.
    fn create(&self, session: Session) -> Result<Session, StoreError>;

    /// The live session with this key, as stored (a `get` does not touch).
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when absent, deleted or expired.
    fn get(&self, id: &SessionId) -> Result<Session, StoreError>;

    /// The record stored under `id` whatever its state — live, expired or tombstone —
    /// exactly as [`Visibility::Raw`] scans return it, or `None` when no record is
    /// stored (never written, or a tombstone a sweep has removed). Migration reads keys
    /// with it (the relay copies the current record, deletes included; verify compares
    /// records). It never touches and never writes.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] when the stored record cannot be decoded; backend errors.
    fn get_raw(&self, id: &SessionId) -> Result<Option<Session>, StoreError>;

    /// Creates or replaces the record of `session.id` with a live session, at the stored
    /// version + 1 (1 when none). Returns what was stored.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for oversized metadata.
    fn put(&self, session: Session) -> Result<Session, StoreError>;

    /// Compare-and-set: replaces the live session of `session.id` only if its version is
    /// `expected`; the new version is `expected + 1`. Returns what was stored.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when no live session has the key;
    /// [`StoreError::Conflict`] when its version is not `expected`.
    fn update_if_version(&self, session: Session, expected: u64) -> Result<Session, StoreError>;

    /// Deletes the session: replaces any stored record (live or expired) with a tombstone
    /// at version + 1 and `last_accessed = now` (its deletion time, from which
    /// [`StoreOptions::tombstone_retention_ms`] counts). Returns whether a *live* session
    /// was deleted. Deleting an absent key or a tombstone writes nothing and returns `false`
    /// (idempotent).
    ///
    /// # Errors
    /// Only backend errors.
    fn delete(&self, id: &SessionId) -> Result<bool, StoreError>;

    /// Reads the live session and slides its expiry: returns it with
    /// `last_accessed = now` (never moved backwards). The store writes it (version + 1)
    /// only when the [`TouchPolicy`] says so; otherwise nothing is written and the
    /// returned version is the stored one.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when absent, deleted or expired.
    fn touch(&self, id: &SessionId) -> Result<Session, StoreError>;

    /// Up to `limit` records with keys strictly after `after` (from the start when `None`),
    /// in ascending bytewise key order, filtered by `visibility`. A page's `next` is
    /// `None` only when no further records exist at scan time. Writes concurrent with a
    /// multi-page scan may or may not be seen; each record returned is consistent.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for `limit == 0`.
    fn scan(&self, after: Option<&SessionId>, limit: usize, visibility: Visibility) -> Result<ScanPage, StoreError>;

    /// Writes each record exactly as given (version, tombstone, times) if its version is
    /// greater than the stored record's, or no record is stored; otherwise skips it, so a
    /// newer version is never overwritten (migration's write-if-newer). All records are
    /// validated before any is written; each record is applied atomically, the batch is
    /// not (a failure part-way leaves earlier records applied, and re-applying is safe).
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for a record with version 0 or oversized metadata (nothing
    /// written).
    fn apply_batch_if_newer(&self, records: Vec<Session>) -> Result<BatchOutcome, StoreError>;

    /// Turns every session expired at `now_ms` into a tombstone (version + 1,
    /// `last_accessed = now_ms`, so a key's versions never go back and a migration cannot
    /// resurrect it), and removes tombstones deleted more than
    /// [`StoreOptions::tombstone_retention_ms`] before `now_ms`. Returns how many of each
    /// it actually changed. Sweeping is housekeeping: expired sessions are invisible
    /// before it runs.
    ///
    /// # Errors
    /// Only backend errors.
    fn sweep_expired(&self, now_ms: i64) -> Result<SweepOutcome, StoreError>;

    /// Starts the write `op` without blocking the calling thread, when this store can:
    /// then `done` later receives exactly what [`WriteOp::run`] would have returned,
    /// on a thread of the store's, and this returns `Ok(())`. A store that cannot (the
    /// default, and any store for input that is invalid) hands both back unrun: run
    /// `op` with [`WriteOp::run`] on a thread that may block.
    ///
    /// [`DiskStore`] can: the write joins its next group commit, and `done` runs on the
    /// thread that finishes that group, right after its `fdatasync` (after the next
    /// group's leader was woken). `done` should be quick (it delays the other answers of
    /// its group, not the disk); a panic in it is contained.
    ///
    /// # Errors
    /// [`Unstarted`] (holding `op` and `done`): not started; nothing was written and
    /// `done` was not called.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::session::{DiskStore, Session, SessionId, Store, StoreOptions, Timeout, WriteOp, Written};
    /// let dir = tempfile::tempdir()?;
    /// let store = DiskStore::create(dir.path().join("s.redb"), StoreOptions::default())?;
    /// let (tx, rx) = std::sync::mpsc::channel();
    /// let op = WriteOp::Put(Session::new(SessionId::new("s1")?, 0, Timeout::Infinity, vec![]));
    /// let started = store.start(op, Box::new(move |r| tx.send(r).unwrap()));
    /// assert!(started.is_ok()); // this thread goes on; the answer comes once durable
    /// let Written::Session(s) = rx.recv()?? else { unreachable!() };
    /// assert_eq!(store.get(&s.id)?, s);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[allow(clippy::result_large_err)] // the unstarted op goes back by value, unboxed
    fn start(&self, op: WriteOp, done: WriteDone) -> Result<(), Unstarted> {
        Err(Unstarted { op, done })
    }
}

/// A write for [`Store::start`] (or [`WriteOp::run`]): one of the writing calls of
/// [`Store`], with its arguments.
#[derive(Clone, Debug, PartialEq)]
pub enum WriteOp {
    /// [`Store::create`].
    Create(Session),
    /// [`Store::put`].
    Put(Session),
    /// [`Store::update_if_version`] with the expected version.
    UpdateIfVersion(Session, u64),
    /// [`Store::delete`].
    Delete(SessionId),
}

/// What a [`WriteOp`] returns.
#[derive(Clone, Debug, PartialEq)]
pub enum Written {
    /// The stored session ([`WriteOp::Create`], [`WriteOp::Put`],
    /// [`WriteOp::UpdateIfVersion`]).
    Session(Session),
    /// Whether a live session was deleted ([`WriteOp::Delete`]).
    Deleted(bool),
}

/// Receives the result of a started write ([`Store::start`]).
pub type WriteDone = Box<dyn FnOnce(Result<Written, StoreError>) + Send>;

/// A write [`Store::start`] did not start, given back: run `op` (and hand its result to
/// `done`) on a thread that may block.
pub struct Unstarted {
    /// The write.
    pub op: WriteOp,
    /// Its callback, not called.
    pub done: WriteDone,
}

impl std::fmt::Debug for Unstarted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unstarted")
            .field("op", &self.op)
            .finish_non_exhaustive()
    }
}

impl WriteOp {
    /// Runs the write on `store`, waiting for it (the calling thread may block).
    ///
    /// # Errors
    /// As the [`Store`] method it stands for.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::session::{MemoryStore, Store, SessionId, StoreOptions, WriteOp, Written};
    /// let store = MemoryStore::new(StoreOptions::default());
    /// let deleted = WriteOp::Delete(SessionId::new("absent")?).run(&store)?;
    /// assert_eq!(deleted, Written::Deleted(false));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn run(self, store: &dyn Store) -> Result<Written, StoreError> {
        match self {
            WriteOp::Create(s) => store.create(s).map(Written::Session),
            WriteOp::Put(s) => store.put(s).map(Written::Session),
            WriteOp::UpdateIfVersion(s, expected) => store.update_if_version(s, expected).map(Written::Session),
            WriteOp::Delete(id) => store.delete(&id).map(Written::Deleted),
        }
    }

    /// The input checks every store makes before writing (metadata size).
    fn validate(&self) -> Result<(), InvalidInput> {
        match self {
            WriteOp::Create(s) | WriteOp::Put(s) | WriteOp::UpdateIfVersion(s, _) => s.validate(),
            WriteOp::Delete(_) => Ok(()),
        }
    }
}
