//! Sweeps: which records a sweep at a time changes (expired ones tombstoned, tombstones
//! past the retention removed) and how a page of changes is committed.

use std::sync::{Arc, PoisonError};
use std::time::Instant;

use etcd_client::{PutOptions, Txn, TxnOp};

use super::super::{codec, Session, StoreError, SweepOutcome, Visibility};
use super::cache::Stored;
use super::client::Failure;
use super::read::SCAN_CHUNK;
use super::write::{Job, Step, BATCH_TXN_RECORDS, REQUEST_OVERHEAD};
use super::Inner;

/// What a sweep at `now_ms` changes.
#[derive(Clone, Copy)]
struct SweepRule {
    now_ms: i64,
    retention: i128,
}

impl SweepRule {
    /// A tombstone older than the retention: removed.
    fn purgeable(&self, s: &Session) -> bool {
        s.tombstone && i128::from(self.now_ms) - i128::from(s.last_accessed) > self.retention
    }

    /// A live record expired at `now_ms`: tombstoned.
    fn expired(&self, s: &Session) -> bool {
        !s.tombstone && s.is_expired(self.now_ms)
    }

    fn applies(&self, s: &Session) -> bool {
        self.purgeable(s) || self.expired(s)
    }

    /// The change for the record as stored now: (write, counts).
    fn step(&self, stored: Option<&Session>) -> Step<SweepOutcome> {
        match stored {
            Some(s) if self.purgeable(s) => Step::Remove(SweepOutcome {
                expired: 0,
                tombstones: 1,
            }),
            Some(s) if self.expired(s) => {
                let mut s = s.clone();
                s.bury(self.now_ms);
                Step::Write(
                    s,
                    SweepOutcome {
                        expired: 1,
                        tombstones: 0,
                    },
                )
            }
            _ => Step::Done(SweepOutcome::default()),
        }
    }
}

impl Inner {
    /// Sweeps records just scanned (distinct keys) in one txn guarded on every key's
    /// `mod_revision` as scanned; when a guard fails (a key changed since), the answer is
    /// lost or the request is too large, the records go one by one through the write loop.
    async fn sweep_chunk(&self, chunk: Vec<(Session, Stored)>, rule: SweepRule) -> Result<SweepOutcome, StoreError> {
        let deadline = Instant::now() + self.etcd.operation_timeout;
        let now = self.now();
        let mut compares = Vec::with_capacity(chunk.len());
        let mut ops = Vec::with_capacity(chunk.len());
        // Per record: what the txn writes (None: a removal) and what it counts.
        let mut plans: Vec<(Option<Arc<[u8]>>, SweepOutcome)> = Vec::with_capacity(chunk.len());
        let mut size = REQUEST_OVERHEAD;
        let mut one_by_one = false;
        for (s, stored) in &chunk {
            let key = self.key(&s.id);
            size += 2 * key.len() + 16;
            compares.push(Self::guard(key.clone(), stored));
            match rule.step(Some(s)) {
                Step::Remove(counts) => {
                    ops.push(TxnOp::delete(key, None));
                    plans.push((None, counts));
                }
                Step::Write(record, counts) => {
                    let bytes: Arc<[u8]> = codec::encode(&record)?.into();
                    size += bytes.len();
                    let Ok(lease) = self.lease_for(&record, now, deadline).await else {
                        one_by_one = true;
                        break;
                    };
                    let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
                    ops.push(TxnOp::put(key, bytes.to_vec(), opts));
                    plans.push((Some(bytes), counts));
                }
                Step::Done(counts) => plans.push((None, counts)),
            }
        }
        let mut lost = false;
        if !one_by_one && size <= self.etcd.max_request_bytes {
            let txn = Txn::new().when(compares).and_then(ops);
            match self
                .request(deadline, |mut kv, _| async move { kv.txn(txn).await })
                .await
            {
                Ok(resp) if resp.succeeded() => {
                    let rev = resp.header().map_or(0, |h| h.revision());
                    let mut outcome = SweepOutcome::default();
                    for ((s, _), (bytes, counts)) in chunk.iter().zip(&plans) {
                        outcome.expired += counts.expired;
                        outcome.tombstones += counts.tombstones;
                        match bytes {
                            Some(b) if rev > 0 => self.remember(
                                &s.id,
                                &Stored {
                                    session: codec::decode(b).ok(),
                                    raw: Some(b.clone()),
                                    mod_rev: rev,
                                    guessed: true,
                                },
                            ),
                            Some(_) => self.forget(&s.id),
                            None => self.remember(&s.id, &Stored::absent(true)),
                        }
                    }
                    return Ok(outcome);
                }
                Ok(_) | Err(Failure::TooLarge(_)) => {}
                Err(Failure::LeaseNotFound) => self.leases.lock().unwrap_or_else(PoisonError::into_inner).clear(),
                Err(Failure::Transient(_)) => lost = true,
                Err(Failure::Rejected(reason)) => {
                    return Err(self.unavailable("sweeping", format!("rejected: {reason}")))
                }
                Err(Failure::Access(e)) => return Err(self.denied(&self.batch_what(chunk.len()), e)),
            }
        }
        let mut outcome = SweepOutcome::default();
        for (i, (s, stored)) in chunk.into_iter().enumerate() {
            let first = if lost {
                let now_stored = self.read(&s.id, deadline).await?;
                // The txn's own change, committed before its answer was lost: the key moved
                // on from the scanned revision to exactly what the txn wrote (or is gone).
                if let Some((bytes, counts)) = plans.get(i) {
                    let ours = now_stored.mod_rev != stored.mod_rev && now_stored.raw.as_ref() == bytes.as_ref();
                    if ours && counts.expired + counts.tombstones > 0 {
                        outcome.expired += counts.expired;
                        outcome.tombstones += counts.tombstones;
                        continue;
                    }
                }
                now_stored
            } else {
                stored
            };
            let o = self
                .write(&s.id, Some(first), true, move |stored, _| Ok(rule.step(stored)))
                .await?;
            outcome.expired += o.expired;
            outcome.tombstones += o.tombstones;
        }
        Ok(outcome)
    }

    /// Tombstones the records expired at `now_ms` and removes the tombstones past the
    /// retention (see [`Store::sweep_expired`](super::super::Store::sweep_expired)).
    pub(super) async fn sweep(self: Arc<Self>, now_ms: i64) -> Result<SweepOutcome, StoreError> {
        let inner = self;
        let rule = SweepRule {
            now_ms,
            retention: i128::from(inner.options.tombstone_retention_ms),
        };
        let mut outcome = SweepOutcome::default();
        let mut after = None;
        loop {
            let deadline = Instant::now() + inner.etcd.operation_timeout;
            let scanned = inner
                .scan(after.clone(), SCAN_CHUNK, Visibility::Raw, now_ms, deadline)
                .await?;
            let (page, more) = (scanned.records, scanned.more);
            after = scanned.last_visited.or_else(|| page.last().map(|(s, _)| s.id.clone()));
            let due: Vec<(Session, Stored)> = page.into_iter().filter(|(s, _)| rule.applies(s)).collect();
            let mut chunks = Vec::new();
            let mut rest = due;
            while !rest.is_empty() {
                let tail = rest.split_off(rest.len().min(BATCH_TXN_RECORDS));
                chunks.push(std::mem::replace(&mut rest, tail));
            }
            let jobs = chunks
                .into_iter()
                .map(|chunk| {
                    let inner = Arc::clone(&inner);
                    Box::pin(async move { inner.sweep_chunk(chunk, rule).await }) as Job<SweepOutcome>
                })
                .collect();
            for o in inner.parallel(jobs).await? {
                outcome.expired += o.expired;
                outcome.tombstones += o.tombstones;
            }
            if !more {
                return Ok(outcome);
            }
        }
    }
}
