//! [`EtcdStore`]: sessions in a replicated etcd cluster (feature `etcd`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, GetOptions, KvClient, LeaseClient, PutOptions, Txn, TxnOp, TxnOpResponse};

use crate::etcd::{run_on, Connector, Dial, EtcdAccessError, EtcdOptions, Members, REJECTED_GRPC_CODES};

use super::{
    codec, next_version, validate_batch, BatchOutcome, InvalidInput, ScanPage, Session, SessionId, Store, StoreError,
    StoreOptions, SweepOutcome, Timeout, Visibility,
};

/// Room left in a request for the txn's framing, its guard and its other operations.
const REQUEST_OVERHEAD: usize = 512;

/// Records fetched per range request of a scan or sweep.
const SCAN_CHUNK: usize = 256;

/// Records per multi-record txn of a batch (etcd's default `--max-txn-ops` is 128).
const BATCH_TXN_RECORDS: usize = 64;

/// Writes a sweep or a batch runs at once.
const PARALLEL_WRITES: usize = 64;

/// Guard failures (someone else wrote the key between our read and our write) a call
/// absorbs before it gives up as unavailable.
const MAX_GUARD_FAILURES: u32 = 1_000;

/// Extra lifetime of every lease beyond its bucket's end.
const LEASE_MARGIN_MS: i64 = 60_000;

/// Removal times further ahead than this get no lease.
const NO_LEASE_BEYOND_MS: i64 = 10 * 365 * 24 * 3_600_000;

/// Remembered records per cache shard before the shard is cleared.
const KNOWN_PER_SHARD: usize = 4_096;
const KNOWN_SHARDS: usize = 16;

/// Sessions in a replicated etcd cluster (etcd 3.4+, v3 API).
///
/// **Acknowledged** means committed by the etcd quorum: when a write method returns `Ok`,
/// its txn was applied by the Raft log of a majority of members (each of which has
/// fsynced it), so it survives the loss of any minority of members, the leader included.
/// A [`StoreError::Unavailable`] write may or may not have been applied (see *Writes*
/// below for how retries stay safe). Reads are linearizable (served through the leader's
/// read index), so a read sees every write acknowledged before it started, whichever
/// member answers.
///
/// The methods are synchronous: the store owns a small tokio runtime and blocks the
/// calling thread on it. Many threads may call one store at once. Called from inside
/// another tokio runtime, a call still works (it runs on the store's own runtime and the
/// caller's thread waits on a channel) but blocks that runtime's worker: async callers
/// should use `spawn_blocking`.
///
/// # Layout
/// One etcd key per session: `prefix ++ id bytes` (ids may be any bytes; etcd keys are
/// bytes and order bytewise, so a range over the prefix is the [`Store::scan`] order). The
/// value is the [`codec`] record, so `version`, `tombstone` and the times live in the value.
///
/// # Writes
/// Every write is one etcd `Txn` guarded on the key's `mod_revision` as read (or
/// `create_revision == 0` when the key was absent): it applies only if nobody wrote the
/// key since. A guard failure returns the current record in the same round trip and the
/// decision is taken again (bounded). After an *indeterminate* error (the connection broke
/// or timed out: the write may or may not have been committed) the store re-reads the key:
/// if it holds exactly the bytes one of its attempts wrote, that attempt is the answer; if
/// the key is unchanged, the attempt did not apply and is retried under the same guard (so
/// at most one of the two can ever apply); if someone else changed the key meanwhile, an
/// operation whose answer depends on the old value (`create`, `update_if_version`) returns
/// [`StoreError::Unavailable`] ("outcome unknown"), the others decide again.
///
/// To save a round trip, the store remembers the last record (and `mod_revision`) it read
/// or wrote per key and guards a write on it; a stale guess only costs the failed guard.
///
/// # Expiry and leases
/// `last_accessed + timeout` in the value is the truth: the store clock decides what is
/// live, so a [`ManualClock`](super::ManualClock) works. etcd leases are only garbage
/// collection: each record is attached to a lease *shared by every record whose removal
/// time falls in the same time bucket* (never one lease per session), where the removal
/// time is `expiry + tombstone_retention_ms` for a live session and
/// `deleted_at + tombstone_retention_ms` for a tombstone, so a lease never removes a record
/// before it is expired *and* past the tombstone retention. Buckets are 1 minute wide for
/// removal times up to 2 hours ahead, 1 hour up to 10 days, 1 day beyond; a lease's TTL is
/// the time to its bucket's end plus one minute. Sessions with an infinite timeout (and
/// removal times more than 10 years ahead) get no lease. The cluster should run with
/// `--experimental-enable-lease-checkpoint` (and `-persist`) so a leader change does not
/// reset TTLs; without it, a leader change only *extends* them.
///
/// # Operating the cluster
/// Every write is a new etcd revision and the store never compacts: run the cluster with
/// `--auto-compaction-mode=periodic --auto-compaction-retention=1h` (as
/// `scripts/etcd-cluster` does) or compact otherwise, and size `--quota-backend-bytes`
/// for the sessions plus that history. Records larger than the cluster's
/// `--max-request-bytes` are refused ([`EtcdOptions::max_request_bytes`]).
///
/// # Failures
/// The store keeps one connection per endpoint and sends each request to one member,
/// moving to the next member when a request fails, so it fails over across the cluster.
/// Each request has [`EtcdOptions::request_timeout`]; a call retries transport errors,
/// timeouts and "no leader" until [`EtcdOptions::operation_timeout`] has passed, then
/// returns [`StoreError::Unavailable`] naming the endpoints and the last error.///
/// # Examples
/// ```no_run
/// use erlmcp_rollout::session::{EtcdOptions, EtcdStore, Session, SessionId, Store, StoreOptions, Timeout};
/// let endpoints = vec!["http://127.0.0.1:2379".to_string()];
/// let store = EtcdStore::connect(&endpoints, "erlmcp/sessions/", EtcdOptions::default(), StoreOptions::default())?;
/// let now = store.options().clock.now_unix_ms();
/// let s = store.create(Session::new(SessionId::new("s1")?, now, Timeout::ms(60_000)?, vec![]))?;
/// assert_eq!(store.get(&s.id)?, s);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct EtcdStore {
    inner: Arc<Inner>,
    /// `Some` until dropped (taken in `Drop` to shut it down without blocking).
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.members.urls())
            .field("prefix", &String::from_utf8_lossy(&self.inner.prefix))
            .field("etcd", &self.inner.etcd)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            // Never blocks, so dropping the store inside an async context is fine too.
            rt.shutdown_background();
        }
    }
}

#[derive(Clone)]
struct Member {
    kv: KvClient,
    lease: LeaseClient,
}

struct CachedLease {
    id: i64,
    granted: Instant,
    ttl: Duration,
}

/// What the store knows of a key: its record (None when absent), the raw value, and its
/// `mod_revision` (0 when absent).
#[derive(Clone)]
struct Stored {
    session: Option<Session>,
    raw: Option<Arc<[u8]>>,
    mod_rev: i64,
    /// Taken from the cache rather than read now: a decision not to write must be confirmed.
    guessed: bool,
}

impl Stored {
    fn absent(guessed: bool) -> Self {
        Stored {
            session: None,
            raw: None,
            mod_rev: 0,
            guessed,
        }
    }
}

struct Inner {
    members: Members<Member>,
    prefix: Vec<u8>,
    range_end: Vec<u8>,
    options: StoreOptions,
    etcd: EtcdOptions,
    leases: Mutex<HashMap<i64, CachedLease>>,
    known: Vec<Mutex<HashMap<SessionId, Stored>>>,
}

/// Why one request failed.
enum Failure {
    /// Transport error, timeout, no leader...: may have applied; retry.
    Transient(String),
    /// The lease of a put no longer exists: grant another.
    LeaseNotFound,
    /// etcd says the request exceeds its limit.
    TooLarge(String),
    /// etcd refused the request (bad argument, ...): retrying will not help.
    Rejected(String),
    /// TLS settings, credentials or the user's permission: retrying will not help.
    Access(EtcdAccessError),
}

fn classify(e: etcd_client::Error, connector: &Connector, url: &str) -> Failure {
    if let Some(access) = connector.access_failure(&e, url) {
        return Failure::Access(access);
    }
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            // gRPC status codes (fixed by the gRPC spec).
            const INVALID_ARGUMENT: i32 = 3;
            const NOT_FOUND: i32 = 5;
            const RESOURCE_EXHAUSTED: i32 = 8;
            let msg = status.message().to_string();
            let code = status.code();
            match i32::from(code) {
                NOT_FOUND if msg.contains("lease not found") => Failure::LeaseNotFound,
                // etcd: "request is too large"; gRPC: "received message larger than max".
                INVALID_ARGUMENT | RESOURCE_EXHAUSTED
                    if msg.contains("too large") || msg.contains("larger than max") =>
                {
                    Failure::TooLarge(msg)
                }
                c if REJECTED_GRPC_CODES.contains(&c) => Failure::Rejected(format!("{code:?}: {msg}")),
                _ => Failure::Transient(format!("{code:?}: {msg}")),
            }
        }
        other => Failure::Transient(other.to_string()),
    }
}

/// A write job of a sweep or batch (one key each).
type Job<T> = std::pin::Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

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
enum Step<T> {
    /// Nothing to write; the answer.
    Done(T),
    /// Write this record; the answer once it is committed.
    Write(Session, T),
    /// Remove the key; the answer once it is committed.
    Remove(T),
}

impl Inner {
    fn unavailable(&self, what: &str, reason: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable {
            reason: format!("etcd at [{}]: {what}: {reason}", self.members.urls().join(", ")),
        }
    }

    fn denied(&self, what: &str, e: EtcdAccessError) -> StoreError {
        StoreError::Access(e.doing(what))
    }

    fn prefix_text(&self) -> String {
        String::from_utf8_lossy(&self.prefix).into_owned()
    }

    /// The etcd key of `id` as text (for messages).
    fn key_text(&self, id: &SessionId) -> String {
        String::from_utf8_lossy(&self.key(id)).into_owned()
    }

    fn batch_what(&self, records: usize) -> String {
        format!("writing {records} keys under {}", self.prefix_text())
    }

    fn key(&self, id: &SessionId) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + id.as_bytes().len());
        k.extend_from_slice(&self.prefix);
        k.extend_from_slice(id.as_bytes());
        k
    }

    fn now(&self) -> i64 {
        self.options.clock.now_unix_ms()
    }

    /// One request on the current member, bounded by the request timeout and `deadline`.
    async fn request<R, Fut>(
        &self,
        deadline: Instant,
        f: impl FnOnce(KvClient, LeaseClient) -> Fut,
    ) -> Result<R, Failure>
    where
        Fut: Future<Output = Result<R, etcd_client::Error>>,
    {
        let i = self.members.current();
        let limit = self
            .etcd
            .request_timeout
            .min(deadline.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(1));
        let url = &self.members.urls()[i];
        // Connecting (on first use of the member) counts against the same limit.
        let attempt = async {
            let m = self.members.client(i).await?;
            f(m.kv, m.lease).await
        };
        let outcome = match tokio::time::timeout(limit, attempt).await {
            Ok(Ok(r)) => return Ok(r),
            Ok(Err(e)) => classify(e, self.members.connector(), url),
            Err(_) => Failure::Transient(format!("no answer within {limit:?}")),
        };
        match outcome {
            Failure::Transient(reason) => {
                self.members.rotate(i);
                Err(Failure::Transient(format!("{url}: {reason}")))
            }
            other => Err(other),
        }
    }

    /// Waits before retrying after the `attempt`-th failure; `false` when `deadline` has passed.
    async fn backoff(attempt: u32, deadline: Instant) -> bool {
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        let wait = Duration::from_millis(20u64 << attempt.min(4)).min(deadline - now);
        tokio::time::sleep(wait).await;
        true
    }

    /// A request retried (on other members) until it succeeds or `deadline` passes: for
    /// reads, and for writes that are safe to repeat.
    async fn retrying<R, Fut>(
        &self,
        what: &str,
        deadline: Instant,
        f: impl Fn(KvClient, LeaseClient) -> Fut,
    ) -> Result<R, StoreError>
    where
        Fut: Future<Output = Result<R, etcd_client::Error>>,
    {
        let mut attempt = 0;
        loop {
            match self.request(deadline, &f).await {
                Ok(r) => return Ok(r),
                Err(Failure::Transient(reason)) => {
                    attempt += 1;
                    if !Self::backoff(attempt, deadline).await {
                        return Err(self.unavailable(what, format!("gave up after {attempt} attempts: {reason}")));
                    }
                }
                Err(Failure::Rejected(reason) | Failure::TooLarge(reason)) => {
                    return Err(self.unavailable(what, format!("rejected: {reason}")))
                }
                Err(Failure::LeaseNotFound) => return Err(self.unavailable(what, "lease not found")),
                Err(Failure::Access(e)) => return Err(self.denied(what, e)),
            }
        }
    }

    fn decode(&self, id: &SessionId, kv: &etcd_client::KeyValue) -> Result<Stored, StoreError> {
        let session = codec::decode_keyed(id, kv.value())?;
        Ok(Stored {
            session: Some(session),
            raw: Some(kv.value().into()),
            mod_rev: kv.mod_revision(),
            guessed: false,
        })
    }

    /// Reads a key (linearizable).
    async fn read(&self, id: &SessionId, deadline: Instant) -> Result<Stored, StoreError> {
        let key = self.key(id);
        let resp = self
            .retrying(&format!("reading key {}", self.key_text(id)), deadline, |mut kv, _| {
                let key = key.clone();
                async move { kv.get(key, None).await }
            })
            .await?;
        let stored = match resp.kvs().first() {
            Some(kv) => self.decode(id, kv)?,
            None => Stored::absent(false),
        };
        self.remember(id, &stored);
        Ok(stored)
    }

    fn known_shard(&self, id: &SessionId) -> &Mutex<HashMap<SessionId, Stored>> {
        use std::hash::BuildHasher;
        let h = rustc_hash::FxBuildHasher.hash_one(id);
        &self.known[(h % KNOWN_SHARDS as u64) as usize]
    }

    fn remember(&self, id: &SessionId, stored: &Stored) {
        let mut map = self.known_shard(id).lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= KNOWN_PER_SHARD && !map.contains_key(id) {
            map.clear();
        }
        map.insert(
            id.clone(),
            Stored {
                guessed: true,
                ..stored.clone()
            },
        );
    }

    fn forget(&self, id: &SessionId) {
        let mut map = self.known_shard(id).lock().unwrap_or_else(PoisonError::into_inner);
        map.remove(id);
    }

    /// The remembered record of `id`, or "absent" as a guess.
    fn guess(&self, id: &SessionId) -> Stored {
        let map = self.known_shard(id).lock().unwrap_or_else(PoisonError::into_inner);
        map.get(id).cloned().unwrap_or_else(|| Stored::absent(true))
    }

    /// The largest encoded record a request for `key` can carry.
    fn max_record(&self, key_len: usize) -> usize {
        self.etcd
            .max_request_bytes
            .saturating_sub(REQUEST_OVERHEAD + 3 * key_len)
    }

    /// The lease a record is attached to (0: none), granting its bucket's lease if needed.
    async fn lease_for(&self, record: &Session, now: i64, deadline: Instant) -> Result<i64, Failure> {
        let retention = i128::from(self.options.tombstone_retention_ms);
        let removal = match (record.tombstone, record.timeout) {
            (true, _) => i128::from(record.last_accessed) + retention,
            (false, Timeout::Infinity) => return Ok(0),
            (false, Timeout::Ms(t)) => i128::from(record.last_accessed) + i128::from(t.get()) + retention,
        };
        let ahead = removal - i128::from(now);
        if ahead > i128::from(NO_LEASE_BEYOND_MS) {
            return Ok(0);
        }
        let width: i128 = if ahead <= 2 * 3_600_000 {
            60_000
        } else if ahead <= 10 * 24 * 3_600_000 {
            3_600_000
        } else {
            24 * 3_600_000
        };
        // The bucket's end: the first multiple of `width` at or after the removal time.
        let end = (removal + width - 1).div_euclid(width) * width;
        let until_end_ms = u64::try_from((end - i128::from(now)).max(0)).unwrap_or(u64::MAX);
        let needed = Duration::from_millis(until_end_ms);
        let bucket = i64::try_from(end).unwrap_or(i64::MAX);
        {
            let leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(l) = leases.get(&bucket) {
                // Reuse only while it outlives the bucket in real time, whatever the store clock does.
                if l.granted.elapsed() + needed + Duration::from_millis(LEASE_MARGIN_MS as u64 / 2) <= l.ttl {
                    return Ok(l.id);
                }
            }
        }
        let ttl_s = i64::try_from(until_end_ms.div_ceil(1000)).unwrap_or(i64::MAX / 2) + LEASE_MARGIN_MS / 1000;
        let granted = Instant::now();
        let resp = self
            .request(deadline, |_, mut lease| async move { lease.grant(ttl_s, None).await })
            .await?;
        let ttl = Duration::from_secs(u64::try_from(resp.ttl()).unwrap_or(0));
        let mut leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        leases.retain(|_, l| l.granted.elapsed() < l.ttl);
        leases.insert(
            bucket,
            CachedLease {
                id: resp.id(),
                granted,
                ttl,
            },
        );
        Ok(resp.id())
    }

    fn forget_lease(&self, id: i64) {
        let mut leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        leases.retain(|_, l| l.id != id);
    }

    /// The guard of a write decided on `stored`: unchanged since it was read.
    fn guard(key: Vec<u8>, stored: &Stored) -> Compare {
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
    async fn write<T: Clone>(
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
}

/// The smallest key greater than every key starting with `prefix` (etcd's `range_end` for
/// a prefix); `[0]` (all keys from the start key on) when there is none.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Inner {
    /// Up to `limit` records after `after`, in key order, each with its `mod_revision`.
    async fn scan(
        &self,
        after: Option<SessionId>,
        limit: usize,
        visibility: Visibility,
        now: i64,
        deadline: Instant,
    ) -> Result<(Vec<(Session, Stored)>, bool), StoreError> {
        let mut start = match &after {
            Some(a) => {
                let mut k = self.key(a);
                k.push(0);
                k
            }
            None => self.prefix.clone(),
        };
        let mut records = Vec::new();
        loop {
            let chunk = (limit.saturating_add(1) - records.len()).clamp(1, SCAN_CHUNK);
            let resp = self
                .retrying(
                    &format!("reading keys under {}", self.prefix_text()),
                    deadline,
                    |mut kv, _| {
                        let opts = GetOptions::new()
                            .with_range(self.range_end.clone())
                            .with_limit(i64::try_from(chunk).unwrap_or(i64::MAX));
                        let start = start.clone();
                        async move { kv.get(start, Some(opts)).await }
                    },
                )
                .await?;
            for kv in resp.kvs() {
                let raw_id = kv.key().get(self.prefix.len()..).unwrap_or_default();
                let id = SessionId::new(raw_id).map_err(|e| StoreError::Corrupt {
                    key: None,
                    reason: format!("etcd key {:?}: {e}", String::from_utf8_lossy(kv.key())),
                })?;
                let stored = self.decode(&id, kv)?;
                if let Some(s) = stored.session.clone() {
                    if visibility == Visibility::Raw || s.is_live(now) {
                        records.push((s, stored));
                        if records.len() > limit {
                            return Ok((records, true));
                        }
                    }
                }
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok((records, false)),
            }
        }
    }

    /// Runs `jobs` (independent keys) at most [`PARALLEL_WRITES`] at a time.
    async fn parallel<T: Send + 'static>(self: &Arc<Self>, jobs: Vec<Job<T>>) -> Result<Vec<T>, StoreError> {
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

impl EtcdStore {
    /// Connects to the cluster at `endpoints` (client URLs such as `http://127.0.0.1:2379`,
    /// or `host:port`; give every member so the store can fail over) and stores sessions
    /// under `prefix`.
    /// Checks that some member answers a linearizable read within
    /// [`EtcdOptions::connect_timeout`].
    ///
    /// TLS and the etcd user come from [`EtcdOptions::security`] (see [`crate::etcd`]);
    /// with TLS, `host:port` endpoints are `https://`.
    ///
    /// # Errors
    /// [`InvalidInput::Endpoint`] when no endpoint is given or one is neither `host:port`
    /// nor a URL whose scheme agrees with the TLS settings;
    /// [`StoreError::Access`] for an unreadable CA, certificate, key or password file, a
    /// TLS handshake the settings cannot pass (unknown CA, expired or mismatched
    /// certificate, missing client certificate), a wrong password, or a user that may not
    /// read the prefix: at once, without retrying;
    /// [`StoreError::Unavailable`] when no member answers in time.
    ///
    /// # Examples
    /// ```no_run
    /// use erlmcp_rollout::session::{EtcdOptions, EtcdStore, StoreOptions};
    /// let endpoints: Vec<String> = "http://127.0.0.1:2379,http://127.0.0.1:22379,http://127.0.0.1:32379"
    ///     .split(',').map(String::from).collect();
    /// let store = EtcdStore::connect(&endpoints, "erlmcp/sessions/", EtcdOptions::default(), StoreOptions::default())?;
    /// # Ok::<(), erlmcp_rollout::session::StoreError>(())
    /// ```
    pub fn connect(
        endpoints: &[String],
        prefix: impl Into<Vec<u8>>,
        etcd: EtcdOptions,
        options: StoreOptions,
    ) -> Result<Self, StoreError> {
        let connector = Connector::new(&etcd.security)?;
        let urls = connector.urls(endpoints).map_err(|e| InvalidInput::Endpoint {
            endpoint: e.endpoint,
            reason: e.reason,
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("erlmcp-etcd")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable {
                reason: format!("cannot start the etcd client runtime: {e}"),
            })?;
        let dial = Dial {
            request_timeout: Some(etcd.request_timeout),
            keep_alive: Some((Duration::from_secs(2), etcd.request_timeout)),
            ..Dial::new(etcd.connect_timeout)
        };
        for url in &urls {
            let (c, d, u) = (connector.clone(), dial.clone(), url.clone());
            runtime
                .block_on(async move { c.check(&u, &d).await })
                .map_err(|err| InvalidInput::Endpoint {
                    endpoint: url.clone(),
                    reason: err.to_string(),
                })?;
        }
        let members = Members::new(urls, connector, dial, |client| Member {
            kv: client.kv_client().max_decoding_message_size(i32::MAX as usize),
            lease: client.lease_client(),
        });
        let prefix = prefix.into();
        let inner = Arc::new(Inner {
            members,
            range_end: prefix_end(&prefix),
            prefix,
            options,
            etcd,
            leases: Mutex::new(HashMap::new()),
            known: (0..KNOWN_SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        });
        let store = EtcdStore {
            inner,
            runtime: Some(runtime),
        };
        let probe = Arc::clone(&store.inner);
        store.run(async move {
            let deadline = Instant::now() + probe.etcd.connect_timeout;
            let key = probe.prefix.clone();
            probe
                .retrying(
                    &format!("connecting (reading keys under {})", probe.prefix_text()),
                    deadline,
                    |mut kv, _| {
                        let key = key.clone();
                        async move { kv.get(key, Some(GetOptions::new().with_count_only())).await }
                    },
                )
                .await
                .map(|_| ())
        })?;
        Ok(store)
    }

    /// The options the store was built with.
    pub fn options(&self) -> &StoreOptions {
        &self.inner.options
    }

    /// The etcd options the store was built with.
    pub fn etcd_options(&self) -> &EtcdOptions {
        &self.inner.etcd
    }

    /// The key prefix of every record.
    pub fn prefix(&self) -> &[u8] {
        &self.inner.prefix
    }

    /// Runs `fut` on the store's runtime and waits for it (see the type docs).
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let Some(rt) = self.runtime.as_ref() else {
            return Err(StoreError::Unavailable {
                reason: "the etcd store is shutting down".into(),
            });
        };
        run_on(rt, fut, || StoreError::Unavailable {
            reason: "the etcd store's runtime stopped before answering".into(),
        })
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.inner.etcd.operation_timeout
    }
}

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
            let (records, _) = inner.scan(after, limit, visibility, now, deadline).await?;
            Ok(ScanPage::from_overfetch(
                records.into_iter().map(|(s, _)| s).collect(),
                limit,
            ))
        })
    }

    /// Records with distinct keys go 64 to a txn guarded on every key (one Raft commit for
    /// all of them), falling back to one guarded txn per record when a guard fails; a
    /// record counted as applied is committed by the etcd quorum. Batches that repeat a
    /// key apply record by record, each key's records in batch order.
    fn apply_batch_if_newer(&self, records: Vec<Session>) -> Result<BatchOutcome, StoreError> {
        validate_batch(&records)?;
        let inner = Arc::clone(&self.inner);
        self.run(async move {
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
        })
    }

    /// Pages through the prefix (256 keys per read); the changes of a page (tombstone puts,
    /// removals of old tombstones) go up to 64 to a txn guarded on each key's
    /// `mod_revision` as scanned, counted once committed by the etcd quorum. A key changed
    /// meanwhile is decided again on its new value, one by one.
    fn sweep_expired(&self, now_ms: i64) -> Result<SweepOutcome, StoreError> {
        let inner = Arc::clone(&self.inner);
        self.run(async move {
            let rule = SweepRule {
                now_ms,
                retention: i128::from(inner.options.tombstone_retention_ms),
            };
            let mut outcome = SweepOutcome::default();
            let mut after = None;
            loop {
                let deadline = Instant::now() + inner.etcd.operation_timeout;
                let (page, more) = inner
                    .scan(after.clone(), SCAN_CHUNK, Visibility::Raw, now_ms, deadline)
                    .await?;
                after = page.last().map(|(s, _)| s.id.clone());
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
        })
    }
}
