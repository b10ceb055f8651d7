//! The guarded write loop (see *Writes* in the [`EtcdStore`](super::EtcdStore) docs) and
//! batches of writes: one txn per chunk of distinct keys, falling back to the loop.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, PoisonError};
use std::time::Instant;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};

use super::super::{codec, BatchOutcome, InvalidInput, Session, SessionId, StoreError};
use super::cache::Stored;
use super::client::Failure;
use super::Inner;

/// Room left in a request for the txn's framing, its guard and its other operations.
pub(super) const REQUEST_OVERHEAD: usize = 512;

/// Records per multi-record txn of a batch (etcd's default `--max-txn-ops` is 128).
pub(super) const BATCH_TXN_RECORDS: usize = 64;

/// Writes a sweep or a batch runs at once.
const PARALLEL_WRITES: usize = 64;

/// Guard failures (someone else wrote the key between our read and our write) a call
/// absorbs before it gives up as unavailable.
const MAX_GUARD_FAILURES: u32 = 1_000;

/// A write job of a sweep or batch (one key each).
pub(super) type Job<T> = std::pin::Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// A write attempt whose outcome is unknown (the request failed in flight).
struct Attempt<T> {
    /// The bytes it wrote; `None` for a removal.
    bytes: Option<Arc<[u8]>>,
    /// Its answer, if it applied.
    answer: T,
    /// The `mod_revision` it was guarded on.
    guard: i64,
}

/// One decision of a write: what to do given the stored record.
pub(super) enum Step<T> {
    /// Nothing to write; the answer.
    Done(T),
    /// Write this record; the answer once it is committed.
    Write(Session, T),
    /// Remove the key; the answer once it is committed.
    Remove(T),
}

impl Inner {
    /// The largest encoded record a request for `key` can carry.
    fn max_record(&self, key_len: usize) -> usize {
        self.etcd
            .max_request_bytes
            .saturating_sub(REQUEST_OVERHEAD + 3 * key_len)
    }

    /// The guard of a write decided on `stored`: unchanged since it was read.
    pub(super) fn guard(key: Vec<u8>, stored: &Stored) -> Compare {
        if stored.mod_rev == 0 {
            Compare::create_revision(key, CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key, CompareOp::Equal, stored.mod_rev)
        }
    }

    /// Write-if-newer of one record through the write loop; `true` when written.
    async fn apply_one(&self, r: Session, first: Option<Stored>) -> Result<bool, StoreError> {
        let id = r.id.clone();
        self.write(&id, first, true, move |stored, _| {
            if stored.is_some_and(|s| s.version >= r.version) {
                Ok(Step::Done(false))
            } else {
                Ok(Step::Write(r.clone(), true))
            }
        })
        .await
    }

    /// Write-if-newer of records with distinct keys in one txn: each record's decision is
    /// taken on the remembered record of its key (or "absent") and the txn is guarded on
    /// all of them, so it applies only if every decision was right. Otherwise (a guard
    /// failed, the request is too large, a lease vanished, or the answer was lost) the
    /// records go one by one; after a lost answer, a record found stored exactly as this
    /// txn would have written it counts as applied.
    async fn apply_chunk(&self, chunk: Vec<Session>) -> Result<BatchOutcome, StoreError> {
        let deadline = Instant::now() + self.etcd.operation_timeout;
        let now = self.now();
        let mut compares = Vec::with_capacity(chunk.len());
        let mut puts = Vec::new();
        let mut written: Vec<(SessionId, Arc<[u8]>)> = Vec::new();
        let mut skipped = 0;
        let mut size = REQUEST_OVERHEAD;
        let mut one_by_one = false;
        for r in &chunk {
            let key = self.key(&r.id);
            let guess = self.guess(&r.id);
            size += key.len();
            compares.push(Self::guard(key.clone(), &guess));
            if guess.session.as_ref().is_some_and(|s| s.version >= r.version) {
                skipped += 1;
                continue;
            }
            let bytes: Arc<[u8]> = codec::encode(r)?.into();
            let max = self.max_record(key.len());
            if bytes.len() > max {
                return Err(InvalidInput::RecordTooLarge {
                    key: r.id.clone(),
                    len: bytes.len(),
                    max,
                }
                .into());
            }
            size += key.len() + bytes.len() + 16;
            let lease = match self.lease_for(r, now, deadline).await {
                Ok(lease) => lease,
                Err(_) => {
                    one_by_one = true;
                    break;
                }
            };
            let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
            puts.push(TxnOp::put(key, bytes.to_vec(), opts));
            written.push((r.id.clone(), bytes));
        }
        let mut lost: HashMap<SessionId, Arc<[u8]>> = HashMap::new();
        if !one_by_one && size <= self.etcd.max_request_bytes {
            let txn = Txn::new().when(compares).and_then(puts);
            match self
                .request(deadline, |mut kv, _| async move { kv.txn(txn).await })
                .await
            {
                Ok(resp) if resp.succeeded() => {
                    let rev = resp.header().map_or(0, |h| h.revision());
                    for (id, bytes) in &written {
                        if rev > 0 {
                            self.remember(
                                id,
                                &Stored {
                                    session: codec::decode(bytes).ok(),
                                    raw: Some(bytes.clone()),
                                    mod_rev: rev,
                                    guessed: true,
                                },
                            );
                        } else {
                            self.forget(id);
                        }
                    }
                    return Ok(BatchOutcome {
                        applied: written.len(),
                        skipped,
                    });
                }
                Ok(_) => {}
                Err(Failure::Transient(_)) => lost = written.into_iter().collect(),
                Err(Failure::LeaseNotFound) => self.leases.lock().unwrap_or_else(PoisonError::into_inner).clear(),
                Err(Failure::TooLarge(_)) => {}
                Err(Failure::Rejected(reason)) => {
                    return Err(self.unavailable("writing a batch", format!("rejected: {reason}")))
                }
                Err(Failure::Access(e)) => return Err(self.denied(&self.batch_what(chunk.len()), e)),
            }
        }
        let mut outcome = BatchOutcome::default();
        for r in chunk {
            let first = match lost.get(&r.id) {
                Some(bytes) => {
                    let stored = self.read(&r.id, deadline).await?;
                    if stored.raw.as_ref() == Some(bytes) {
                        outcome.applied += 1;
                        continue;
                    }
                    Some(stored)
                }
                None => {
                    self.forget(&r.id);
                    None
                }
            };
            if self.apply_one(r, first).await? {
                outcome.applied += 1;
            } else {
                outcome.skipped += 1;
            }
        }
        Ok(outcome)
    }

    /// The write loop (see *Writes* in the [`EtcdStore`] docs). `first` is what the caller already knows of
    /// the key (`None`: use the remembered record or guess "absent"); `redo_safe` says
    /// whether `decide` may simply run again when the key changed after an indeterminate
    /// attempt.
    pub(super) async fn write<T: Clone>(
        &self,
        id: &SessionId,
        first: Option<Stored>,
        redo_safe: bool,
        mut decide: impl FnMut(Option<&Session>, i64) -> Result<Step<T>, StoreError>,
    ) -> Result<T, StoreError> {
        let key = self.key(id);
        let deadline = Instant::now() + self.etcd.operation_timeout;
        let what = || format!("writing key {}", self.key_text(id));
        let mut cur = first.unwrap_or_else(|| self.guess(id));
        // Attempts whose outcome is unknown: the bytes they wrote (None: a removal), their
        // answer, and the revision they were guarded on.
        let mut uncertain: Vec<Attempt<T>> = Vec::new();
        let mut guard_failures = 0u32;
        let mut transient = 0u32;
        loop {
            if !uncertain.is_empty() && !cur.guessed {
                if let Some(a) = uncertain.iter().find(|a| a.bytes == cur.raw) {
                    self.remember(id, &cur);
                    return Ok(a.answer.clone());
                }
                let changed = uncertain.iter().all(|a| a.guard != cur.mod_rev);
                if changed && !redo_safe {
                    self.forget(id);
                    return Err(self.unavailable(
                        &what(),
                        "outcome unknown: a request failed in flight and the key has changed since",
                    ));
                }
            }
            let now = self.now();
            let step = match decide(cur.session.as_ref(), now) {
                Ok(step) => step,
                // A refusal based on a guess is confirmed by a real read.
                Err(_) if cur.guessed => {
                    cur = self.read(id, deadline).await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut lease = 0;
            let (op, bytes, answer) = match step {
                Step::Done(answer) => {
                    if cur.guessed {
                        cur = self.read(id, deadline).await?;
                        continue;
                    }
                    return Ok(answer);
                }
                Step::Write(record, answer) => {
                    let bytes: Arc<[u8]> = codec::encode(&record)?.into();
                    let max = self.max_record(key.len());
                    if bytes.len() > max {
                        return Err(InvalidInput::RecordTooLarge {
                            key: id.clone(),
                            len: bytes.len(),
                            max,
                        }
                        .into());
                    }
                    lease = match self.lease_for(&record, now, deadline).await {
                        Ok(lease) => lease,
                        Err(Failure::Transient(reason)) => {
                            transient += 1;
                            if !Self::backoff(transient, deadline).await {
                                return Err(self.unavailable(&what(), format!("granting a lease: {reason}")));
                            }
                            continue;
                        }
                        Err(Failure::LeaseNotFound) => continue,
                        Err(Failure::Rejected(reason) | Failure::TooLarge(reason)) => {
                            return Err(self.unavailable(&what(), format!("granting a lease: {reason}")))
                        }
                        Err(Failure::Access(e)) => return Err(self.denied(&format!("{} (lease grant)", what()), e)),
                    };
                    let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
                    (TxnOp::put(key.clone(), bytes.to_vec(), opts), Some(bytes), answer)
                }
                Step::Remove(answer) => (TxnOp::delete(key.clone(), None), None, answer),
            };
            let guard = Self::guard(key.clone(), &cur);
            let txn = Txn::new()
                .when([guard])
                .and_then([op])
                .or_else([TxnOp::get(key.clone(), None)]);
            let result = self
                .request(deadline, |mut kv, _| async move { kv.txn(txn).await })
                .await;
            match result {
                Ok(resp) if resp.succeeded() => {
                    let rev = resp.header().map_or(0, |h| h.revision());
                    match &bytes {
                        Some(b) if rev > 0 => self.remember(
                            id,
                            &Stored {
                                session: codec::decode(b).ok(),
                                raw: Some(b.clone()),
                                mod_rev: rev,
                                guessed: true,
                            },
                        ),
                        Some(_) => self.forget(id),
                        None => self.remember(id, &Stored::absent(true)),
                    }
                    return Ok(answer);
                }
                Ok(resp) => {
                    guard_failures += 1;
                    if guard_failures > MAX_GUARD_FAILURES {
                        return Err(self.unavailable(&what(), "too much contention on the key"));
                    }
                    let mut found = Stored::absent(false);
                    for r in resp.op_responses() {
                        if let TxnOpResponse::Get(get) = r {
                            if let Some(kv) = get.kvs().first() {
                                found = self.decode(id, kv)?;
                            }
                        }
                    }
                    self.remember(id, &found);
                    cur = found;
                }
                // The bucket's lease is gone (e.g. the store clock runs slower than real
                // time): forget it and grant a new one. Nothing was written.
                Err(Failure::LeaseNotFound) => {
                    self.forget_lease(lease);
                    guard_failures += 1;
                    if guard_failures > MAX_GUARD_FAILURES {
                        return Err(self.unavailable(&what(), "etcd keeps reporting fresh leases as not found"));
                    }
                }
                // The cluster's limit is below `max_request_bytes`: still a typed error.
                Err(Failure::TooLarge(_)) => {
                    return Err(InvalidInput::RecordTooLarge {
                        key: id.clone(),
                        len: bytes.as_ref().map_or(0, |b| b.len()),
                        max: self.max_record(key.len()),
                    }
                    .into())
                }
                Err(Failure::Rejected(reason)) => return Err(self.unavailable(&what(), format!("rejected: {reason}"))),
                Err(Failure::Access(e)) => return Err(self.denied(&what(), e)),
                Err(Failure::Transient(reason)) => {
                    uncertain.push(Attempt {
                        bytes,
                        answer,
                        guard: cur.mod_rev,
                    });
                    transient += 1;
                    if !Self::backoff(transient, deadline).await {
                        self.forget(id);
                        return Err(self.unavailable(&what(), format!("gave up after {transient} attempts: {reason}")));
                    }
                    cur = self.read(id, deadline).await.map_err(|e| match e {
                        StoreError::Unavailable { reason: read } => {
                            self.unavailable(&what(), format!("{reason}; then re-reading failed: {read}"))
                        }
                        other => other,
                    })?;
                }
            }
        }
    }

    /// Write-if-newer of `records` (see [`Store::apply_batch_if_newer`](super::super::Store::apply_batch_if_newer)).
    pub(super) async fn apply_batch(self: Arc<Self>, records: Vec<Session>) -> Result<BatchOutcome, StoreError> {
        let inner = self;
        let mut seen = std::collections::HashSet::with_capacity(records.len());
        let distinct = records.iter().all(|r| seen.insert(r.id.clone()));
        let jobs: Vec<Job<BatchOutcome>> = if distinct {
            // Up to 64 records per txn.
            let mut chunks = Vec::new();
            let mut rest = records;
            while !rest.is_empty() {
                let tail = rest.split_off(rest.len().min(BATCH_TXN_RECORDS));
                chunks.push(std::mem::replace(&mut rest, tail));
            }
            chunks
                .into_iter()
                .map(|chunk| {
                    let inner = Arc::clone(&inner);
                    Box::pin(async move { inner.apply_chunk(chunk).await }) as Job<BatchOutcome>
                })
                .collect()
        } else {
            // One lane per key, in batch order, so repeated keys apply as listed.
            let mut lanes: Vec<Vec<Session>> = Vec::new();
            let mut lane_of: HashMap<SessionId, usize> = HashMap::new();
            for r in records {
                let i = *lane_of.entry(r.id.clone()).or_insert_with(|| {
                    lanes.push(Vec::new());
                    lanes.len() - 1
                });
                lanes[i].push(r);
            }
            lanes
                .into_iter()
                .map(|lane| {
                    let inner = Arc::clone(&inner);
                    Box::pin(async move {
                        let mut outcome = BatchOutcome::default();
                        for r in lane {
                            if inner.apply_one(r, None).await? {
                                outcome.applied += 1;
                            } else {
                                outcome.skipped += 1;
                            }
                        }
                        Ok(outcome)
                    }) as Job<BatchOutcome>
                })
                .collect()
        };
        let outcomes = inner.parallel(jobs).await?;
        Ok(outcomes.into_iter().fold(BatchOutcome::default(), |a, b| BatchOutcome {
            applied: a.applied + b.applied,
            skipped: a.skipped + b.skipped,
        }))
    }

    /// Runs `jobs` (independent keys) at most [`PARALLEL_WRITES`] at a time.
    pub(super) async fn parallel<T: Send + 'static>(self: &Arc<Self>, jobs: Vec<Job<T>>) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::with_capacity(jobs.len());
        let mut set = tokio::task::JoinSet::new();
        let mut first_err = None;
        for job in jobs {
            if set.len() >= PARALLEL_WRITES {
                if let Some(done) = set.join_next().await {
                    collect(done, &mut out, &mut first_err);
                }
            }
            set.spawn(job);
        }
        while let Some(done) = set.join_next().await {
            collect(done, &mut out, &mut first_err);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

fn collect<T>(
    done: Result<Result<T, StoreError>, tokio::task::JoinError>,
    out: &mut Vec<T>,
    first_err: &mut Option<StoreError>,
) {
    let result = done.unwrap_or_else(|e| {
        Err(StoreError::Unavailable {
            reason: format!("etcd write task failed: {e}"),
        })
    });
    match result {
        Ok(v) => out.push(v),
        Err(e) => {
            first_err.get_or_insert(e);
        }
    }
}
