//! [`EtcdStore`]: sessions in a replicated etcd cluster (feature `etcd`).
//!
//! One layer per file, each building on the ones above it:
//! - `client`: one request on one member, what its failure means (retry, grant another
//!   lease, refuse), and requests retried across the members until a deadline;
//! - `read`: linearizable reads of one key and of a range of keys, decoded;
//! - `cache`: the last record and `mod_revision` the store saw per key, the guess a
//!   write is guarded on;
//! - `lease`: the leases shared by every record whose removal time falls in one bucket;
//! - `write`: the guarded write loop (safe after an indeterminate failure) and batches;
//! - `sweep`: what a sweep changes and how it commits a page of changes;
//! - `store`: the [`Store`](super::Store) methods, each one decision over the layers below.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use etcd_client::GetOptions;

use crate::etcd::{run_on, Connector, Dial, EtcdAccessError, EtcdOptions, Members};

use super::{InvalidInput, SessionId, StoreError, StoreOptions};

mod cache;
mod client;
mod lease;
mod read;
mod store;
mod sweep;
mod write;

use cache::{Stored, KNOWN_SHARDS};
use client::Member;
use lease::CachedLease;

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
/// bytes and order bytewise, so a range over the prefix is the [`Store::scan`](super::Store::scan) order). The
/// value is the [`codec`](super::codec) record, so `version`, `tombstone` and the times live in the value.
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

/// The store's state, shared by the calls in flight.
struct Inner {
    members: Members<Member>,
    prefix: Vec<u8>,
    range_end: Vec<u8>,
    options: StoreOptions,
    etcd: EtcdOptions,
    leases: Mutex<HashMap<i64, CachedLease>>,
    known: Vec<Mutex<HashMap<SessionId, Stored>>>,
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
        let dial = Dial::requests(&etcd);
        connector
            .check_all(&runtime, &urls, &dial)
            .map_err(|e| InvalidInput::Endpoint {
                endpoint: e.endpoint,
                reason: e.reason,
            })?;
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
