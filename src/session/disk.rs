//! [`DiskStore`]: sessions in one redb file (feature `disk`).

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition};

use super::{
    codec, next_version, validate_batch, BatchOutcome, InvalidInput, ScanPage, Session, SessionId, Store, StoreError,
    StoreOptions, SweepOutcome, Visibility,
};

/// Records by id bytes; values are [`codec`] records.
const SESSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sessions");

/// Sessions in one redb file. Every write is one redb write transaction committed with
/// `Durability::Immediate`.
///
/// **Acknowledged** means durable: when a write method returns `Ok`, its commit has been
/// flushed (fsync) and survives a crash or power loss. Writers are serialized by redb and
/// each pays its own flush (no group commit yet: ~2 k writes/s on this project's VM);
/// reads run concurrently with writes on a snapshot. Records use the [`codec`] encoding;
/// one that does not decode (or holds another id than its key) is [`StoreError::Corrupt`]
/// and is never returned. Writes to a corrupt key, scans over it and sweeps fail with
/// `Corrupt` too (its version is unknown, so overwriting could move versions back) until
/// the record is repaired or removed.
///
/// # Examples
/// ```
/// use erlmcp_rollout::session::{DiskStore, Session, SessionId, Store, StoreOptions, Timeout};
/// let dir = tempfile::tempdir()?;
/// let store = DiskStore::create(dir.path().join("sessions.redb"), StoreOptions::default())?;
/// let now = store.options().clock.now_unix_ms();
/// let s = store.create(Session::new(SessionId::new("s1")?, now, Timeout::Infinity, vec![]))?;
/// assert_eq!(store.get(&s.id)?, s);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct DiskStore {
    db: Database,
    options: StoreOptions,
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

fn save(table: &mut SessionTable<'_>, s: &Session) -> Result<(), StoreError> {
    let bytes = codec::encode(s)?;
    table.insert(s.id.as_bytes(), bytes.as_slice()).map_err(unavailable)?;
    Ok(())
}

impl DiskStore {
    /// Opens the store at `path`, creating the file if needed (crash recovery runs here).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the file cannot be opened or created,
    /// [`StoreError::Corrupt`] when redb finds it corrupted.
    pub fn create(path: impl AsRef<Path>, options: StoreOptions) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(unavailable)?;
        let store = DiskStore { db, options };
        store.write(|_, _| Ok(()))?;
        Ok(store)
    }

    /// The options the store was built with.
    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// Runs `f` in one write transaction; commits (durably) if it returns `Ok`, aborts otherwise.
    fn write<T>(&self, f: impl FnOnce(&mut SessionTable<'_>, i64) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let now = self.options.clock.now_unix_ms();
        let txn = self.db.begin_write().map_err(unavailable)?;
        let result = {
            let mut table = txn.open_table(SESSIONS).map_err(unavailable)?;
            f(&mut table, now)
        };
        match result {
            Ok(v) => {
                txn.commit().map_err(unavailable)?;
                Ok(v)
            }
            Err(e) => {
                txn.abort().map_err(unavailable)?;
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
        self.write(|table, now| {
            let stored = load(table, &session.id)?;
            if stored.as_ref().is_some_and(|s| s.is_live(now)) {
                return Err(StoreError::AlreadyExists {
                    key: session.id.clone(),
                });
            }
            session.version = next_version(stored.as_ref());
            session.tombstone = false;
            save(table, &session)?;
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
        self.write(|table, _| {
            session.version = next_version(load(table, &session.id)?.as_ref());
            session.tombstone = false;
            save(table, &session)?;
            Ok(session)
        })
    }

    fn update_if_version(&self, mut session: Session, expected: u64) -> Result<Session, StoreError> {
        session.validate()?;
        self.write(|table, now| {
            match load(table, &session.id)? {
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
            save(table, &session)?;
            Ok(session)
        })
    }

    fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        self.write(|table, now| match load(table, id)? {
            Some(mut s) if !s.tombstone => {
                let was_live = s.is_live(now);
                s.bury(now);
                save(table, &s)?;
                Ok(was_live)
            }
            _ => Ok(false),
        })
    }

    fn touch(&self, id: &SessionId) -> Result<Session, StoreError> {
        let now = self.options.clock.now_unix_ms();
        let s = self.read_live(id)?;
        if !self.options.touch.should_persist(s.last_accessed, now, s.timeout) {
            return Ok(Session {
                last_accessed: s.last_accessed.max(now),
                ..s
            });
        }
        // Decide again inside the write transaction: another writer may have run meanwhile.
        self.write(|table, now| {
            let mut s = load(table, id)?
                .filter(|s| s.is_live(now))
                .ok_or_else(|| StoreError::NotFound { key: id.clone() })?;
            if self.options.touch.should_persist(s.last_accessed, now, s.timeout) {
                s.last_accessed = now;
                s.version = s.version.saturating_add(1);
                save(table, &s)?;
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
        // One transaction: the whole batch is applied atomically here (the contract only
        // requires each record to be).
        self.write(|table, _| {
            let mut outcome = BatchOutcome::default();
            for r in &records {
                if load(table, &r.id)?.is_some_and(|s| s.version >= r.version) {
                    outcome.skipped += 1;
                } else {
                    save(table, r)?;
                    outcome.applied += 1;
                }
            }
            Ok(outcome)
        })
    }

    fn sweep_expired(&self, now_ms: i64) -> Result<SweepOutcome, StoreError> {
        let retention = i128::from(self.options.tombstone_retention_ms);
        self.write(|table, _| {
            let mut outcome = SweepOutcome::default();
            let mut expire = Vec::new();
            let mut purge = Vec::new();
            for entry in table.iter().map_err(unavailable)? {
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
                table.remove(id.as_bytes()).map_err(unavailable)?;
            }
            outcome.tombstones = purge.len();
            outcome.expired = expire.len();
            for mut s in expire {
                s.bury(now_ms);
                save(table, &s)?;
            }
            Ok(outcome)
        })
    }
}
