//! The [`Store`] methods of [`EtcdStore`]: each decides over the record as stored, through
//! the write loop, the reads and the batch and sweep paths.

use std::sync::Arc;

use super::super::{
    next_version, validate_batch, BatchOutcome, InvalidInput, ScanPage, Session, SessionId, Store, StoreError,
    SweepOutcome, Visibility,
};
use super::write::Step;
use super::EtcdStore;

impl Store for EtcdStore {
    /// Acknowledged: the create is committed by the etcd quorum. After an indeterminate
    /// failure the answer may be [`StoreError::Unavailable`] with the session created.
    fn create(&self, session: Session) -> Result<Session, StoreError> {
        session.validate()?;
        let inner = Arc::clone(&self.inner);
        self.run(async move {
            let id = session.id.clone();
            inner
                .write(&id, None, false, move |stored, now| {
                    if stored.is_some_and(|s| s.is_live(now)) {
                        return Err(StoreError::AlreadyExists {
                            key: session.id.clone(),
                        });
                    }
                    let mut s = session.clone();
                    s.version = next_version(stored);
                    s.tombstone = false;
                    Ok(Step::Write(s.clone(), s))
                })
                .await
        })
    }

    /// A linearizable read: sees every write acknowledged before the call.
    fn get(&self, id: &SessionId) -> Result<Session, StoreError> {
        let inner = Arc::clone(&self.inner);
        let deadline = self.deadline();
        let id = id.clone();
        self.run(async move {
            let stored = inner.read(&id, deadline).await?;
            let now = inner.now();
            match stored.session {
                Some(s) if s.is_live(now) => Ok(s),
                _ => Err(StoreError::NotFound { key: id }),
            }
        })
    }

    /// A linearizable read of the stored record, whatever its state.
    fn get_raw(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        let inner = Arc::clone(&self.inner);
        let deadline = self.deadline();
        let id = id.clone();
        self.run(async move { Ok(inner.read(&id, deadline).await?.session) })
    }

    /// Acknowledged: committed by the etcd quorum.
    fn put(&self, session: Session) -> Result<Session, StoreError> {
        session.validate()?;
        let inner = Arc::clone(&self.inner);
        self.run(async move {
            let id = session.id.clone();
            inner
                .write(&id, None, true, move |stored, _| {
                    let mut s = session.clone();
                    s.version = next_version(stored);
                    s.tombstone = false;
                    Ok(Step::Write(s.clone(), s))
                })
                .await
        })
    }

    /// Acknowledged: committed by the etcd quorum. After an indeterminate failure the
    /// answer may be [`StoreError::Unavailable`] with the update applied.
    fn update_if_version(&self, session: Session, expected: u64) -> Result<Session, StoreError> {
        session.validate()?;
        let inner = Arc::clone(&self.inner);
        self.run(async move {
            let id = session.id.clone();
            inner
                .write(&id, None, false, move |stored, now| {
                    let actual = match stored {
                        Some(s) if s.is_live(now) => s.version,
                        _ => {
                            return Err(StoreError::NotFound {
                                key: session.id.clone(),
                            })
                        }
                    };
                    if actual != expected {
                        return Err(StoreError::Conflict {
                            key: session.id.clone(),
                            expected,
                            actual,
                        });
                    }
                    let mut s = session.clone();
                    s.version = expected.saturating_add(1);
                    s.tombstone = false;
                    Ok(Step::Write(s.clone(), s))
                })
                .await
        })
    }

    /// Acknowledged: the tombstone is committed by the etcd quorum.
    fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        let inner = Arc::clone(&self.inner);
        let id = id.clone();
        self.run(async move {
            inner
                .write(&id, None, true, |stored, now| match stored {
                    Some(s) if !s.tombstone => {
                        let was_live = s.is_live(now);
                        let mut s = s.clone();
                        s.bury(now);
                        Ok(Step::Write(s, was_live))
                    }
                    _ => Ok(Step::Done(false)),
                })
                .await
        })
    }

    /// One linearizable read; a persisted touch is then a guarded write committed by the
    /// etcd quorum.
    fn touch(&self, id: &SessionId) -> Result<Session, StoreError> {
        let inner = Arc::clone(&self.inner);
        let deadline = self.deadline();
        let id = id.clone();
        self.run(async move {
            let stored = inner.read(&id, deadline).await?;
            let policy = inner.options.touch;
            let key = id.clone();
            inner
                .write(&id, Some(stored), true, move |stored, now| {
                    let s = stored
                        .filter(|s| s.is_live(now))
                        .ok_or_else(|| StoreError::NotFound { key: key.clone() })?;
                    let mut s = s.clone();
                    if policy.should_persist(s.last_accessed, now, s.timeout) {
                        s.last_accessed = now;
                        s.version = s.version.saturating_add(1);
                        Ok(Step::Write(s.clone(), s))
                    } else {
                        s.last_accessed = s.last_accessed.max(now);
                        Ok(Step::Done(s))
                    }
                })
                .await
        })
    }

    /// Linearizable range reads of up to 256 keys each.
    fn scan(&self, after: Option<&SessionId>, limit: usize, visibility: Visibility) -> Result<ScanPage, StoreError> {
        if limit == 0 {
            return Err(InvalidInput::ZeroLimit.into());
        }
        let inner = Arc::clone(&self.inner);
        let deadline = self.deadline();
        let after = after.cloned();
        self.run(async move {
            let now = inner.now();
            let scanned = inner.scan(after, limit, visibility, now, deadline).await?;
            let records: Vec<Session> = scanned.records.into_iter().map(|(s, _)| s).collect();
            Ok(match scanned.last_visited {
                // The visit budget ended the call short of `limit`: go on after the last key visited.
                Some(last) if scanned.more && records.len() <= limit => ScanPage {
                    records,
                    next: Some(last),
                },
                _ => ScanPage::from_overfetch(records, limit),
            })
        })
    }

    /// Records with distinct keys go 64 to a txn guarded on every key (one Raft commit for
    /// all of them), falling back to one guarded txn per record when a guard fails; a
    /// record counted as applied is committed by the etcd quorum. Batches that repeat a
    /// key apply record by record, each key's records in batch order.
    fn apply_batch_if_newer(&self, records: Vec<Session>) -> Result<BatchOutcome, StoreError> {
        validate_batch(&records)?;
        let inner = Arc::clone(&self.inner);
        self.run(async move { inner.apply_batch(records).await })
    }

    /// Pages through the prefix (256 keys per read); the changes of a page (tombstone puts,
    /// removals of old tombstones) go up to 64 to a txn guarded on each key's
    /// `mod_revision` as scanned, counted once committed by the etcd quorum. A key changed
    /// meanwhile is decided again on its new value, one by one.
    fn sweep_expired(&self, now_ms: i64) -> Result<SweepOutcome, StoreError> {
        let inner = Arc::clone(&self.inner);
        self.run(async move { inner.sweep(now_ms).await })
    }
}
