//! The durable outbox of the dual-write migrator: write intents `{seq, direction, key}`
//! in one redb file (feature `disk`).
//!
//! An intent says "key K was (or is being) written on the store of record; copy its
//! current record to the other store". It carries no data: the relay reads the record
//! of record when it applies the intent, so applying is idempotent and an intent
//! recorded for a write that then failed (or a crash before the write) is harmless.
//!
//! [`Outbox::record`] returns only after the intent is durable (fsync). Concurrent
//! callers share commits (group commit): one of them commits every intent queued so far
//! in one durable transaction while the others wait for it, so the cost of the fsync is
//! spread over all writers in flight. [`Outbox::remove`] commits without fsync: if a
//! crash loses a removal, the intent comes back and is applied again, which is harmless.
//!
//! # Examples
//! ```
//! use erlmcp_rollout::migrate::outbox::{Direction, Outbox};
//! use erlmcp_rollout::session::SessionId;
//! let dir = tempfile::tempdir()?;
//! let outbox = Outbox::open(dir.path().join("outbox.redb"))?;
//! let seq = outbox.record(Direction::Forward, &SessionId::new("s1")?)?;
//! let intents = outbox.peek(10)?;
//! assert_eq!((intents[0].seq, intents[0].key.as_bytes()), (seq, &b"s1"[..]));
//! outbox.remove(&[seq])?;
//! assert_eq!(outbox.depth()?, 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::MigrateError;
use crate::session::SessionId;

/// seq -> direction byte + key bytes.
const INTENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("intents");

/// Which way an intent copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Primary -> secondary (phases 1 and 2).
    Forward,
    /// Secondary -> primary (the reverse outbox of phase 3).
    Reverse,
}

impl Direction {
    fn byte(self) -> u8 {
        match self {
            Direction::Forward => 0,
            Direction::Reverse => 1,
        }
    }
}

/// One recorded intent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intent {
    /// Its sequence number (increasing in recording order within a process).
    pub seq: u64,
    /// Which way to copy.
    pub direction: Direction,
    /// The key to copy.
    pub key: SessionId,
}

#[derive(Default)]
struct Group {
    pending: Vec<(u64, Direction, SessionId)>,
    leader: bool,
    /// The batch that intents recorded now join.
    open: u64,
    /// Every batch up to this one has been committed (or has failed).
    done: u64,
    /// Recent failed batches and why.
    failures: VecDeque<(u64, String)>,
}

/// The outbox file; see the [module docs](self).
pub struct Outbox {
    /// `None` for [`Outbox::in_memory`].
    db: Option<Database>,
    /// The intents of an in-memory outbox.
    memory: Mutex<BTreeMap<u64, (Direction, SessionId)>>,
    path: PathBuf,
    next_seq: AtomicU64,
    group: Mutex<Group>,
    committed: Condvar,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Outbox {
    /// Opens (creating if needed) the outbox file; redb's crash recovery runs here.
    ///
    /// # Errors
    /// [`MigrateError::File`] when the file cannot be opened or read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, MigrateError> {
        let path = path.as_ref().to_owned();
        let err = |e: &dyn std::fmt::Display| MigrateError::file("outbox", &path, e);
        let db = Database::create(&path).map_err(|e| err(&e))?;
        let txn = db.begin_write().map_err(|e| err(&e))?;
        let last = {
            let table = txn.open_table(INTENTS).map_err(|e| err(&e))?;
            let last = table.last().map_err(|e| err(&e))?.map(|(k, _)| k.value());
            last
        };
        txn.commit().map_err(|e| err(&e))?;
        Ok(Outbox::with(Some(db), path, last.map_or(1, |l| l + 1)))
    }

    /// An outbox in memory: nothing survives the process. Only for a primary that does
    /// not survive a crash itself (a `MemoryStore`), where a durable intent would protect
    /// nothing and cost a commit per write.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::migrate::outbox::{Direction, Outbox};
    /// use erlmcp_rollout::session::SessionId;
    /// let outbox = Outbox::in_memory();
    /// outbox.record(Direction::Forward, &SessionId::new("s1")?)?;
    /// assert_eq!(outbox.depth()?, 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn in_memory() -> Self {
        Outbox::with(None, PathBuf::from("(memory)"), 1)
    }

    fn with(db: Option<Database>, path: PathBuf, next_seq: u64) -> Self {
        Outbox {
            db,
            memory: Mutex::new(BTreeMap::new()),
            next_seq: AtomicU64::new(next_seq),
            path,
            group: Mutex::new(Group {
                open: 1,
                ..Group::default()
            }),
            committed: Condvar::new(),
        }
    }

    fn memory(&self) -> MutexGuard<'_, BTreeMap<u64, (Direction, SessionId)>> {
        self.memory.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The file (`(memory)` for [`Outbox::in_memory`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl std::fmt::Display) -> MigrateError {
        MigrateError::file("outbox", &self.path, e)
    }

    fn lock(&self) -> MutexGuard<'_, Group> {
        self.group.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records an intent durably (group commit) and returns its sequence number.
    ///
    /// # Errors
    /// [`MigrateError::File`] when the commit failed; the intent is then not recorded
    /// (and the caller must not write the store).
    pub fn record(&self, direction: Direction, key: &SessionId) -> Result<u64, MigrateError> {
        self.record_many(direction, std::slice::from_ref(key))
    }

    /// Records one intent per key in one durable commit (shared with concurrent callers)
    /// and returns the first sequence number (0 when `keys` is empty).
    ///
    /// # Errors
    /// As [`Outbox::record`]; then none of them is recorded.
    pub fn record_many(&self, direction: Direction, keys: &[SessionId]) -> Result<u64, MigrateError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let first = self.next_seq.fetch_add(keys.len() as u64, Ordering::Relaxed);
        if self.db.is_none() {
            let mut map = self.memory();
            for (i, key) in keys.iter().enumerate() {
                map.insert(first + i as u64, (direction, key.clone()));
            }
            return Ok(first);
        }
        let mut g = self.lock();
        for (i, key) in keys.iter().enumerate() {
            g.pending.push((first + i as u64, direction, key.clone()));
        }
        let mine = g.open;
        loop {
            if g.done >= mine {
                return match g.failures.iter().find(|(b, _)| *b == mine) {
                    Some((_, why)) => Err(self.err(format!("recording intent for {}: {why}", keys[0]))),
                    None => Ok(first),
                };
            }
            if !g.leader {
                g.leader = true;
                let batch = g.open;
                g.open += 1;
                let items = std::mem::take(&mut g.pending);
                drop(g);
                let result = self.commit(&items);
                g = self.lock();
                g.leader = false;
                g.done = batch;
                if let Err(why) = result {
                    g.failures.push_back((batch, why));
                    if g.failures.len() > 64 {
                        g.failures.pop_front();
                    }
                }
                self.committed.notify_all();
                continue;
            }
            g = self.committed.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn commit(&self, items: &[(u64, Direction, SessionId)]) -> Result<(), String> {
        let Some(db) = &self.db else {
            return Ok(());
        };
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut table = txn.open_table(INTENTS).map_err(|e| e.to_string())?;
            let mut value = Vec::new();
            for (seq, dir, key) in items {
                value.clear();
                value.push(dir.byte());
                value.extend_from_slice(key.as_bytes());
                table.insert(*seq, value.as_slice()).map_err(|e| e.to_string())?;
            }
        }
        txn.commit().map_err(|e| e.to_string())
    }

    /// Up to `limit` intents, oldest first.
    ///
    /// # Errors
    /// [`MigrateError::File`] when the file cannot be read or holds a malformed intent.
    pub fn peek(&self, limit: usize) -> Result<Vec<Intent>, MigrateError> {
        let Some(db) = &self.db else {
            let map = self.memory();
            return Ok(map
                .iter()
                .take(limit)
                .map(|(seq, (direction, key))| Intent {
                    seq: *seq,
                    direction: *direction,
                    key: key.clone(),
                })
                .collect());
        };
        let txn = db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(INTENTS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.err(e))?.take(limit) {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let seq = k.value();
            let bytes = v.value();
            let direction = match bytes.first() {
                Some(0) => Direction::Forward,
                Some(1) => Direction::Reverse,
                other => return Err(self.err(format!("intent {seq}: bad direction byte {other:?}"))),
            };
            let key = SessionId::new(&bytes[1..]).map_err(|e| self.err(format!("intent {seq}: {e}")))?;
            out.push(Intent { seq, direction, key });
        }
        Ok(out)
    }

    /// Removes applied intents (no fsync: a lost removal only re-applies an intent).
    ///
    /// # Errors
    /// [`MigrateError::File`] when the commit failed.
    pub fn remove(&self, seqs: &[u64]) -> Result<(), MigrateError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let Some(db) = &self.db else {
            let mut map = self.memory();
            for seq in seqs {
                map.remove(seq);
            }
            return Ok(());
        };
        let mut txn = db.begin_write().map_err(|e| self.err(e))?;
        txn.set_durability(Durability::None).map_err(|e| self.err(e))?;
        {
            let mut table = txn.open_table(INTENTS).map_err(|e| self.err(e))?;
            for seq in seqs {
                table.remove(*seq).map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// Intents not yet removed.
    ///
    /// # Errors
    /// [`MigrateError::File`] when the file cannot be read.
    pub fn depth(&self) -> Result<u64, MigrateError> {
        let Some(db) = &self.db else {
            return Ok(self.memory().len() as u64);
        };
        let txn = db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(INTENTS).map_err(|e| self.err(e))?;
        table.len().map_err(|e| self.err(e))
    }
}
