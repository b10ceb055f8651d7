//! The migration phase kept cluster-wide in etcd (DESIGN §5, feature `etcd`).
//!
//! [`EtcdPhaseStore`] is a [`PhaseStore`]: the [`PhaseState`] JSON lives under
//! `{prefix}phase`. Every save is one etcd txn guarded on the key's `mod_revision` as this
//! process last loaded (or saved) it, or on the key being absent when it loaded none, so
//! two operators (or two nodes) can never silently overwrite each other: the loser gets
//! [`MigrateError::Conflict`] naming the key, and nothing was written.
//!
//! Each node reports the phase it applies under `{prefix}acks/{node_id}`
//! ([`EtcdPhaseStore::ack`], read back by [`EtcdPhaseStore::acks`]).
//! [`EtcdPhaseStore::watch`] (feature `disk`, which the [`Migrator`] needs) runs a thread
//! that follows `{prefix}phase`: on start, on every change and after every reconnect
//! (with a full re-read) it calls [`Migrator::sync_phase`] and then acknowledges the phase
//! the node applies. [`EtcdPhaseStore::ack_gate`] plugs into
//! [`MigratorConfig::advance_gate`](super::dual::MigratorConfig::advance_gate) so
//! [`Migrator::advance`] refuses to move on while some expected node has not applied the
//! current phase ([`GateRefusal::NotAcknowledged`]).
//!
//! # Cluster procedure
//! 1. Every node opens its [`Migrator`] with a clone of one `EtcdPhaseStore` (same
//!    endpoints and prefix, its own `node_id`) and starts [`EtcdPhaseStore::watch`].
//! 2. One operator (node or CLI) calls [`Migrator::advance`] (or `rollback`); the guarded
//!    save makes it the only change at that revision.
//! 3. The watchers apply it on every node (milliseconds after the commit) and ack it.
//! 4. Before the next advance, [`EtcdPhaseStore::check_all_acked`] (or the advance gate)
//!    confirms every node applies the current phase.
//!
//! [`Migrator`]: super::dual::Migrator
//! [`Migrator::sync_phase`]: super::dual::Migrator::sync_phase
//! [`Migrator::advance`]: super::dual::Migrator::advance

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, GetOptions, KvClient, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};

use super::phase::{GateRefusal, Phase, PhaseState, PhaseStore};
use super::MigrateError;
use crate::etcd::{Connector, Dial, EtcdOptions, Members, REJECTED_GRPC_CODES};

/// What a node stores under `{prefix}acks/{node_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The phase the node applies.
    pub phase: Phase,
    /// When it acknowledged it (ms since the Unix epoch).
    pub at_ms: i64,
}

/// The migration phase in etcd; see the [module docs](self). Clones share one connection
/// set and one view of the key's revision (give the [`Migrator`](super::dual::Migrator) a
/// clone and keep one for acks and the watcher).
///
/// # Examples
/// ```no_run
/// use erlmcp_rollout::migrate::etcd_phase::EtcdPhaseStore;
/// use erlmcp_rollout::migrate::phase::{Phase, PhaseState, PhaseStore};
/// use erlmcp_rollout::session::EtcdOptions;
/// let endpoints = vec!["http://127.0.0.1:2379".to_string()];
/// let store = EtcdPhaseStore::connect(&endpoints, "erlmcp/migration/", "node-a", EtcdOptions::default())?;
/// let state = store.load()?.unwrap_or_else(|| PhaseState::new(Phase::Off));
/// store.save(&state)?; // fails with MigrateError::Conflict if someone saved meanwhile
/// store.ack(state.phase)?;
/// assert_eq!(store.acks()?.get("node-a"), Some(&state.phase));
/// # Ok::<(), erlmcp_rollout::migrate::MigrateError>(())
/// ```
#[derive(Clone)]
pub struct EtcdPhaseStore {
    inner: Arc<Inner>,
    runtime: Arc<RuntimeGuard>,
}

struct Inner {
    members: Members<KvClient>,
    prefix: String,
    node_id: String,
    options: EtcdOptions,
    /// `mod_revision` of the phase key as last loaded or saved (0: absent or never loaded).
    known: Mutex<i64>,
}

/// Owns the client runtime; shuts it down without blocking when the last clone goes.
struct RuntimeGuard(Option<tokio::runtime::Runtime>);

impl Drop for RuntimeGuard {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for EtcdPhaseStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdPhaseStore")
            .field("endpoints", &self.inner.members.urls())
            .field("prefix", &self.inner.prefix)
            .field("node_id", &self.inner.node_id)
            .finish_non_exhaustive()
    }
}

/// Whether etcd refused the request for good (retrying elsewhere will not help).
fn rejected(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => REJECTED_GRPC_CODES.contains(&i32::from(status.code())),
        _ => false,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Inner {
    fn phase_key(&self) -> String {
        format!("{}phase", self.prefix)
    }

    fn acks_prefix(&self) -> String {
        format!("{}acks/", self.prefix)
    }

    fn unavailable(&self, what: &str, reason: impl std::fmt::Display) -> MigrateError {
        MigrateError::Unavailable {
            what: format!("etcd phase store at [{}]: {what}", self.members.urls().join(", ")),
            reason: reason.to_string(),
        }
    }

    /// `f` on one member after another (transport errors, timeouts and "no leader" move to
    /// the next member, with a short backoff) until it succeeds or the operation timeout
    /// passes. Only for requests that are safe to repeat.
    async fn retrying<R, Fut>(&self, what: &str, f: impl Fn(KvClient) -> Fut) -> Result<R, MigrateError>
    where
        Fut: Future<Output = Result<R, etcd_client::Error>>,
    {
        self.retrying_for(what, self.options.operation_timeout, f).await
    }

    /// [`Inner::retrying`] for at most `timeout`.
    async fn retrying_for<R, Fut>(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(KvClient) -> Fut,
    ) -> Result<R, MigrateError>
    where
        Fut: Future<Output = Result<R, etcd_client::Error>>,
    {
        let deadline = Instant::now() + timeout;
        let mut attempt = 0u32;
        loop {
            let i = self.members.current();
            let limit = self
                .options
                .request_timeout
                .min(deadline.saturating_duration_since(Instant::now()))
                .max(Duration::from_millis(1));
            let url = &self.members.urls()[i];
            // Connecting (on first use of the member) counts against the same limit.
            let request = async { f(self.members.client(i).await?).await };
            let last = match tokio::time::timeout(limit, request).await {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) => {
                    if let Some(denied) = self.members.connector().access_failure(&e, url) {
                        return Err(MigrateError::Access(denied.doing(what)));
                    }
                    if rejected(&e) {
                        return Err(self.unavailable(what, format!("{url} rejected it: {e}")));
                    }
                    format!("{url}: {e}")
                }
                Err(_) => format!("{url}: no answer within {limit:?}"),
            };
            self.members.rotate(i);
            attempt += 1;
            let now = Instant::now();
            if now >= deadline {
                return Err(self.unavailable(what, format!("gave up after {attempt} attempt(s): {last}")));
            }
            tokio::time::sleep(Duration::from_millis(20u64 << attempt.min(4)).min(deadline - now)).await;
        }
    }

    fn decode(&self, key: &str, bytes: &[u8]) -> Result<PhaseState, MigrateError> {
        let unreadable = |reason: String| MigrateError::Unreadable {
            key: key.to_owned(),
            reason,
        };
        let state: PhaseState =
            serde_json::from_slice(bytes).map_err(|e| unreadable(format!("not a migration phase state: {e}")))?;
        if state.format != 1 {
            return Err(unreadable(format!("unknown phase state format {}", state.format)));
        }
        Ok(state)
    }

    async fn load(self: Arc<Self>) -> Result<Option<PhaseState>, MigrateError> {
        let key = self.phase_key();
        let what = format!("load {key}");
        let resp = self
            .retrying(&what, |mut kv| {
                let key = key.clone();
                async move { kv.get(key, None).await }
            })
            .await?;
        let Some(kv) = resp.kvs().first() else {
            *self.known.lock().unwrap_or_else(PoisonError::into_inner) = 0;
            return Ok(None);
        };
        let state = self.decode(&key, kv.value())?;
        *self.known.lock().unwrap_or_else(PoisonError::into_inner) = kv.mod_revision();
        Ok(Some(state))
    }

    async fn save(self: Arc<Self>, bytes: Vec<u8>) -> Result<(), MigrateError> {
        let key = self.phase_key();
        let what = format!("save {key}");
        let guard_rev = *self.known.lock().unwrap_or_else(PoisonError::into_inner);
        let guard = if guard_rev == 0 {
            Compare::create_revision(key.clone(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key.clone(), CompareOp::Equal, guard_rev)
        };
        // Repeating the txn is safe: once one attempt applied, the guard fails and the
        // else branch shows our own bytes, which counts as success.
        let resp = self
            .retrying(&what, |mut kv| {
                let txn = Txn::new()
                    .when([guard.clone()])
                    .and_then([TxnOp::put(key.clone(), bytes.clone(), None)])
                    .or_else([TxnOp::get(key.clone(), None)]);
                async move { kv.txn(txn).await }
            })
            .await?;
        if resp.succeeded() {
            let revision = resp.header().map_or(0, |h| h.revision());
            *self.known.lock().unwrap_or_else(PoisonError::into_inner) = revision;
            return Ok(());
        }
        let current = resp.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| (kv.value().to_vec(), kv.mod_revision())),
            _ => None,
        });
        match current {
            Some((value, revision)) if value == bytes => {
                *self.known.lock().unwrap_or_else(PoisonError::into_inner) = revision;
                Ok(())
            }
            other => Err(MigrateError::Conflict {
                key,
                revision: other.map_or(0, |(_, r)| r),
            }),
        }
    }

    async fn ack(self: Arc<Self>, phase: Phase) -> Result<(), MigrateError> {
        let key = format!("{}{}", self.acks_prefix(), self.node_id);
        let what = format!("ack {key}");
        let bytes = serde_json::to_vec(&Ack { phase, at_ms: now_ms() })
            .map_err(|e| self.unavailable(&what, format!("cannot encode the acknowledgement: {e}")))?;
        self.retrying(&what, |mut kv| {
            let (key, bytes) = (key.clone(), bytes.clone());
            async move { kv.put(key, bytes, None).await }
        })
        .await
        .map(|_| ())
    }

    async fn acks(self: Arc<Self>) -> Result<BTreeMap<String, Ack>, MigrateError> {
        let prefix = self.acks_prefix();
        let what = format!("read acknowledgements {prefix}*");
        let resp = self
            .retrying(&what, |mut kv| {
                let prefix = prefix.clone();
                async move { kv.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let mut acks = BTreeMap::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let ack: Ack = serde_json::from_slice(kv.value()).map_err(|e| MigrateError::Unreadable {
                key: key.clone(),
                reason: format!("not a phase acknowledgement: {e}"),
            })?;
            let node = key.strip_prefix(prefix.as_str()).unwrap_or(&key).to_owned();
            acks.insert(node, ack);
        }
        Ok(acks)
    }

    async fn remove_ack(self: Arc<Self>, node_id: String) -> Result<(), MigrateError> {
        let key = format!("{}{node_id}", self.acks_prefix());
        let what = format!("remove {key}");
        self.retrying(&what, |mut kv| {
            let key = key.clone();
            async move { kv.delete(key, None).await }
        })
        .await
        .map(|_| ())
    }
}

impl EtcdPhaseStore {
    /// Connects to the cluster at `endpoints` (client URLs such as `http://127.0.0.1:2379`
    /// or `host:port`; give every member so the store can fail over), keeps the phase
    /// under `{prefix}phase` and acknowledges as `node_id`. Checks that some member answers
    /// within [`EtcdOptions::connect_timeout`]. Each call retries on other members until
    /// [`EtcdOptions::operation_timeout`], each request bounded by
    /// [`EtcdOptions::request_timeout`].
    ///
    /// TLS and the etcd user come from [`EtcdOptions::security`] ([`crate::etcd`]); the
    /// user needs read and write permission on the keys under `prefix`.
    ///
    /// # Errors
    /// [`MigrateError::Invalid`] for no endpoint, a malformed one or an empty `node_id`;
    /// [`MigrateError::Access`] (at once, not retried) for an unreadable file, a TLS
    /// handshake the settings cannot pass, a wrong password or no permission on the prefix;
    /// [`MigrateError::Unavailable`] when no member answers in time.
    ///
    /// # Examples
    /// ```no_run
    /// use erlmcp_rollout::migrate::etcd_phase::EtcdPhaseStore;
    /// use erlmcp_rollout::session::EtcdOptions;
    /// let endpoints = vec!["127.0.0.1:2379".to_string(), "127.0.0.1:22379".to_string()];
    /// let store = EtcdPhaseStore::connect(&endpoints, "erlmcp/migration/", "node-a", EtcdOptions::default())?;
    /// assert_eq!(store.phase_key(), "erlmcp/migration/phase");
    /// # Ok::<(), erlmcp_rollout::migrate::MigrateError>(())
    /// ```
    pub fn connect(
        endpoints: &[String],
        prefix: impl Into<String>,
        node_id: impl Into<String>,
        options: EtcdOptions,
    ) -> Result<Self, MigrateError> {
        let connector = Connector::new(&options.security)?;
        let endpoints = connector
            .urls(endpoints)
            .map_err(|e| MigrateError::Invalid(format!("phase store: endpoint {:?}: {}", e.endpoint, e.reason)))?;
        let node_id = node_id.into();
        if node_id.is_empty() || node_id.contains('/') {
            return Err(MigrateError::Invalid(format!(
                "phase store node id {node_id:?}: must be non-empty and contain no '/'"
            )));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("erlmcp-etcd-phase")
            .enable_all()
            .build()
            .map_err(|e| MigrateError::Unavailable {
                what: "etcd phase store".into(),
                reason: format!("cannot start the etcd client runtime: {e}"),
            })?;
        let dial = Dial::requests(&options);
        connector
            .check_all(&runtime, &endpoints, &dial)
            .map_err(|e| MigrateError::Unavailable {
                what: format!("etcd phase store: connecting to {}", e.endpoint),
                reason: e.reason,
            })?;
        let inner = Arc::new(Inner {
            members: Members::new(endpoints, connector, dial, |client| client.kv_client()),
            prefix: prefix.into(),
            node_id,
            options,
            known: Mutex::new(0),
        });
        let store = EtcdPhaseStore {
            inner,
            runtime: Arc::new(RuntimeGuard(Some(runtime))),
        };
        let probe = Arc::clone(&store.inner);
        store.run(async move {
            let key = probe.phase_key();
            probe
                .retrying_for("connecting", probe.options.connect_timeout, |mut kv| {
                    let key = key.clone();
                    async move { kv.get(key, Some(GetOptions::new().with_count_only())).await }
                })
                .await
                .map(|_| ())
        })?;
        Ok(store)
    }

    /// The key holding the phase state (`{prefix}phase`).
    pub fn phase_key(&self) -> String {
        self.inner.phase_key()
    }

    /// This node's id (its acknowledgement key is `{prefix}acks/{node_id}`).
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// The endpoints (as URLs).
    pub fn endpoints(&self) -> &[String] {
        self.inner.members.urls()
    }

    /// Runs `fut` on the store's runtime and waits for it. Inside another runtime
    /// (`block_on` would panic there) it runs on ours and this thread waits on a channel.
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, MigrateError>> + Send + 'static,
    ) -> Result<T, MigrateError> {
        let Some(rt) = self.runtime.0.as_ref() else {
            return Err(self.inner.unavailable("call", "the store is shutting down"));
        };
        crate::etcd::run_on(rt, fut, || {
            self.inner
                .unavailable("call", "the client runtime stopped before answering")
        })
    }

    /// Records that this node applies `phase` (`{prefix}acks/{node_id}` = `{"phase", "at_ms"}`).
    ///
    /// # Errors
    /// [`MigrateError::Unavailable`] when no member accepted it in time.
    pub fn ack(&self, phase: Phase) -> Result<(), MigrateError> {
        self.run(Arc::clone(&self.inner).ack(phase))
    }

    /// The phase each node last acknowledged, by node id.
    ///
    /// # Errors
    /// [`MigrateError::Unavailable`]; [`MigrateError::Unreadable`] naming a key that holds
    /// no valid acknowledgement.
    pub fn acks(&self) -> Result<BTreeMap<String, Phase>, MigrateError> {
        Ok(self.ack_records()?.into_iter().map(|(n, a)| (n, a.phase)).collect())
    }

    /// Every node's acknowledgement with its time.
    ///
    /// # Errors
    /// As [`EtcdPhaseStore::acks`].
    pub fn ack_records(&self) -> Result<BTreeMap<String, Ack>, MigrateError> {
        self.run(Arc::clone(&self.inner).acks())
    }

    /// Removes `node_id`'s acknowledgement (a node taken out of the cluster for good).
    ///
    /// # Errors
    /// [`MigrateError::Unavailable`].
    pub fn remove_ack(&self, node_id: &str) -> Result<(), MigrateError> {
        self.run(Arc::clone(&self.inner).remove_ack(node_id.to_owned()))
    }

    /// The nodes of `expected_nodes` that have not acknowledged `phase`, each as
    /// `node: phase it applies` or `node: no acknowledgement`. Empty when all have.
    ///
    /// # Errors
    /// As [`EtcdPhaseStore::acks`].
    pub fn lagging(&self, phase: Phase, expected_nodes: &[String]) -> Result<Vec<String>, MigrateError> {
        let acks = self.acks()?;
        Ok(expected_nodes
            .iter()
            .filter_map(|n| match acks.get(n) {
                Some(p) if *p == phase => None,
                Some(p) => Some(format!("{n}: {p}")),
                None => Some(format!("{n}: no acknowledgement")),
            })
            .collect())
    }

    /// `Ok` when every node of `expected_nodes` has acknowledged `phase`: safe to move on.
    ///
    /// # Errors
    /// [`MigrateError::Gate`] with [`GateRefusal::NotAcknowledged`] listing the lagging
    /// nodes (`to` is `phase`'s next phase); as [`EtcdPhaseStore::acks`].
    pub fn check_all_acked(&self, phase: Phase, expected_nodes: &[String]) -> Result<(), MigrateError> {
        self.check(phase, phase.next().unwrap_or(phase), expected_nodes)
    }

    fn check(&self, from: Phase, to: Phase, expected_nodes: &[String]) -> Result<(), MigrateError> {
        let lagging = self.lagging(from, expected_nodes)?;
        if lagging.is_empty() {
            Ok(())
        } else {
            Err(GateRefusal::NotAcknowledged { from, to, lagging }.into())
        }
    }
}

#[cfg(feature = "disk")]
impl EtcdPhaseStore {
    /// An advance gate for [`MigratorConfig::advance_gate`](super::dual::MigratorConfig::advance_gate):
    /// refuses to move from a phase until every node of `expected_nodes` acknowledges it.
    ///
    /// # Examples
    /// ```no_run
    /// use erlmcp_rollout::migrate::dual::MigratorConfig;
    /// use erlmcp_rollout::migrate::etcd_phase::EtcdPhaseStore;
    /// use erlmcp_rollout::session::EtcdOptions;
    /// let endpoints = vec!["http://127.0.0.1:2379".to_string()];
    /// let store = EtcdPhaseStore::connect(&endpoints, "erlmcp/migration/", "node-a", EtcdOptions::default())?;
    /// let config = MigratorConfig {
    ///     advance_gate: Some(store.ack_gate(vec!["node-a".into(), "node-b".into()])),
    ///     ..MigratorConfig::default()
    /// };
    /// # Ok::<(), erlmcp_rollout::migrate::MigrateError>(())
    /// ```
    pub fn ack_gate(&self, expected_nodes: Vec<String>) -> super::dual::AdvanceGate {
        let store = self.clone();
        Arc::new(move |from, to| store.check(from, to, &expected_nodes))
    }
}

impl PhaseStore for EtcdPhaseStore {
    /// A linearizable read of `{prefix}phase`; remembers its `mod_revision` for the next save.
    fn load(&self) -> Result<Option<PhaseState>, MigrateError> {
        self.run(Arc::clone(&self.inner).load())
    }

    /// Committed by the etcd quorum, guarded on the revision last loaded or saved (the key
    /// absent when none was): [`MigrateError::Conflict`] when someone else saved since.
    fn save(&self, state: &PhaseState) -> Result<(), MigrateError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| MigrateError::Unreadable {
            key: self.phase_key(),
            reason: format!("cannot encode the phase state: {e}"),
        })?;
        self.run(Arc::clone(&self.inner).save(bytes))
    }
}

#[cfg(feature = "disk")]
pub use watcher::{PhaseWatchOptions, PhaseWatchStatus, PhaseWatcher};

#[cfg(feature = "disk")]
mod watcher {
    use std::sync::{Arc, Mutex, PoisonError};
    use std::thread::JoinHandle;
    use std::time::Duration;

    use etcd_client::WatchOptions;
    use serde::Serialize;

    use super::super::dual::Migrator;
    use super::super::phase::Phase;
    use super::super::MigrateError;
    use super::EtcdPhaseStore;
    use crate::etcd::Dial;

    /// Settings of [`EtcdPhaseStore::watch`].
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct PhaseWatchOptions {
        /// How long [`Migrator::sync_phase`] may drain this node's outbox when the store
        /// of record changes (default 5 s); on failure it is retried.
        pub sync_timeout: Duration,
        /// Pause before retrying a failed sync or ack, and between rounds of reconnection
        /// attempts (default 500 ms).
        pub retry_interval: Duration,
    }

    impl Default for PhaseWatchOptions {
        fn default() -> Self {
            PhaseWatchOptions {
                sync_timeout: Duration::from_secs(5),
                retry_interval: Duration::from_millis(500),
            }
        }
    }

    /// What a [`PhaseWatcher`] has done so far.
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
    pub struct PhaseWatchStatus {
        /// Whether a watch on the phase key is established now.
        pub connected: bool,
        /// The phase this node applied at the last sync.
        pub applied: Phase,
        /// Syncs that succeeded (each followed by an ack).
        pub syncs: u64,
        /// Watches that broke (then re-established with a full re-read).
        pub reconnects: u64,
        /// The last sync or ack failure, or why the watch is down; cleared by the next good sync.
        pub last_error: Option<String>,
    }

    /// A running phase watcher; dropping it stops its thread (after a sync in progress).
    pub struct PhaseWatcher {
        stop: Option<tokio::sync::watch::Sender<bool>>,
        handle: Option<JoinHandle<()>>,
        status: Arc<Mutex<PhaseWatchStatus>>,
    }

    impl PhaseWatcher {
        /// Syncs, failures and the connection state so far.
        pub fn status(&self) -> PhaseWatchStatus {
            self.status.lock().unwrap_or_else(PoisonError::into_inner).clone()
        }
    }

    impl Drop for PhaseWatcher {
        fn drop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(true);
            }
            if let Some(h) = self.handle.take() {
                let _ = h.join();
            }
        }
    }

    impl std::fmt::Debug for PhaseWatcher {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("PhaseWatcher").field("status", &self.status()).finish()
        }
    }

    struct Ctx {
        store: EtcdPhaseStore,
        migrator: Arc<Migrator>,
        options: PhaseWatchOptions,
        status: Arc<Mutex<PhaseWatchStatus>>,
    }

    impl Ctx {
        /// Applies the stored phase and acks what the node applies; `false` on failure
        /// (recorded in the status; the caller retries).
        fn sync(&self) -> bool {
            let synced = self.migrator.sync_phase(self.options.sync_timeout);
            let applied = self.migrator.phase();
            // The status says what the node applies before the cluster hears of it.
            self.status.lock().unwrap_or_else(PoisonError::into_inner).applied = applied;
            let acked = self.store.ack(applied);
            let mut s = self.status.lock().unwrap_or_else(PoisonError::into_inner);
            match (synced, acked) {
                (Ok(_), Ok(())) => {
                    s.syncs += 1;
                    s.last_error = None;
                    true
                }
                (Err(e), _) => {
                    s.last_error = Some(format!("cannot apply the stored phase (still applying {applied}): {e}"));
                    false
                }
                (Ok(_), Err(e)) => {
                    s.last_error = Some(format!("applied {applied} but cannot acknowledge it: {e}"));
                    false
                }
            }
        }
    }

    impl EtcdPhaseStore {
        /// Follows `{prefix}phase` on a thread of its own: on start, on every change and
        /// after every reconnect (trying the endpoints in turn, with a full re-read) it calls
        /// `migrator.sync_phase` and then [`EtcdPhaseStore::ack`]s the phase the node applies.
        /// A failed sync (the outbox did not drain) or ack is retried after
        /// [`PhaseWatchOptions::retry_interval`]. `migrator` should have been opened with a
        /// clone of this store. Dropping the handle stops the thread.
        ///
        /// # Errors
        /// [`MigrateError::Unavailable`] when the thread cannot be spawned.
        ///
        /// # Examples
        /// ```no_run
        /// use std::sync::Arc;
        /// use erlmcp_rollout::migrate::dual::{Migrator, MigratorConfig};
        /// use erlmcp_rollout::migrate::etcd_phase::{EtcdPhaseStore, PhaseWatchOptions};
        /// use erlmcp_rollout::migrate::outbox::Outbox;
        /// use erlmcp_rollout::session::{EtcdOptions, MemoryStore, StoreOptions};
        /// let endpoints = vec!["http://127.0.0.1:2379".to_string()];
        /// let phases = EtcdPhaseStore::connect(&endpoints, "erlmcp/migration/", "node-a", EtcdOptions::default())?;
        /// let m = Arc::new(Migrator::open(
        ///     Arc::new(MemoryStore::new(StoreOptions::default())),
        ///     Arc::new(MemoryStore::new(StoreOptions::default())),
        ///     Outbox::in_memory(),
        ///     Box::new(phases.clone()),
        ///     MigratorConfig::default(),
        /// )?);
        /// let watcher = phases.watch(Arc::clone(&m), PhaseWatchOptions::default())?;
        /// println!("{:?}", watcher.status());
        /// # Ok::<(), erlmcp_rollout::migrate::MigrateError>(())
        /// ```
        pub fn watch(&self, migrator: Arc<Migrator>, options: PhaseWatchOptions) -> Result<PhaseWatcher, MigrateError> {
            let status = Arc::new(Mutex::new(PhaseWatchStatus {
                applied: migrator.phase(),
                ..PhaseWatchStatus::default()
            }));
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let ctx = Arc::new(Ctx {
                store: self.clone(),
                migrator,
                options,
                status: Arc::clone(&status),
            });
            let handle = std::thread::Builder::new()
                .name("erlmcp-phase-watch".into())
                .spawn(move || {
                    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                        let mut s = ctx.status.lock().unwrap_or_else(PoisonError::into_inner);
                        s.last_error = Some("cannot start the watcher's runtime".into());
                        return;
                    };
                    rt.block_on(watch_loop(&ctx, stop_rx));
                    // Dropping `rt` waits for a sync still running on its blocking pool
                    // (bounded by the sync and operation timeouts).
                })
                .map_err(|e| {
                    self.inner
                        .unavailable("watch", format!("cannot spawn the watcher thread: {e}"))
                })?;
            Ok(PhaseWatcher {
                stop: Some(stop_tx),
                handle: Some(handle),
                status,
            })
        }
    }

    /// Runs [`Ctx::sync`] on the runtime's blocking pool and waits for it.
    ///
    /// Invariant: the watcher's runtime thread never blocks. It drives the watcher's own
    /// etcd connection (TLS, HTTP/2 keep-alive pings, the watch stream); a sync holds the
    /// phase lock, drains the outbox and makes etcd round trips on the store's runtime,
    /// which takes seconds when a member is slow, and if it ran on this thread the
    /// connection would stall meanwhile: keep-alive timeouts would close it, every
    /// reconnect would sync (and stall it) again, and the phase would never be acknowledged.
    async fn sync(ctx: &Arc<Ctx>) -> bool {
        let c = Arc::clone(ctx);
        // A panicking sync counts as failed (retried); the panic stays on the pool thread.
        tokio::task::spawn_blocking(move || c.sync()).await.unwrap_or(false)
    }

    async fn watch_loop(ctx: &Arc<Ctx>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let urls = ctx.store.endpoints().to_vec();
        let mut i = 0usize;
        loop {
            let url = &urls[i % urls.len()];
            let reason = tokio::select! {
                _ = stop.changed() => return,
                reason = session(ctx, url) => reason,
            };
            {
                let mut s = ctx.status.lock().unwrap_or_else(PoisonError::into_inner);
                s.connected = false;
                s.reconnects += 1;
                s.last_error = Some(format!("watch on {url}: {reason}; reconnecting"));
            }
            i += 1;
            // Try the next member at once; pause after a full round of failures.
            if i % urls.len() == 0 {
                tokio::select! {
                    _ = stop.changed() => return,
                    () = tokio::time::sleep(ctx.options.retry_interval) => {}
                }
            }
        }
    }

    /// Connects to one member, syncs (full re-read), then syncs on every change of the
    /// phase key until the watch breaks; returns why it broke.
    async fn session(ctx: &Arc<Ctx>, url: &str) -> String {
        let connect = ctx.store.inner.options.connect_timeout;
        let dial = Dial::watch(connect);
        let key = ctx.store.phase_key();
        let first = tokio::time::timeout(connect, async {
            let mut client = ctx.store.inner.members.connector().connect(url, &dial).await?;
            let resp = client.get(key.as_str(), None).await?;
            Ok::<_, etcd_client::Error>((client, resp))
        })
        .await;
        let (mut client, resp) = match first {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return match ctx.store.inner.members.connector().access_failure(&e, url) {
                    Some(denied) => denied.doing(&format!("reading key {key}")).kind.to_string(),
                    None => e.to_string(),
                }
            }
            Err(_) => return format!("no answer within {connect:?}"),
        };
        let revision = resp.header().map_or(0, |h| h.revision());
        // Bounded like the connection: a member that accepts the request but never answers
        // must not hold the watcher (the next member is tried instead).
        let watch = tokio::time::timeout(
            connect,
            client.watch(
                key.as_str(),
                Some(WatchOptions::new().with_start_revision(revision + 1)),
            ),
        )
        .await;
        let mut stream = match watch {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return format!("cannot watch: {e}"),
            Err(_) => return format!("cannot watch: no answer within {connect:?}"),
        };
        ctx.status.lock().unwrap_or_else(PoisonError::into_inner).connected = true;
        let mut pending = !sync(ctx).await;
        loop {
            let retry = async {
                if pending {
                    tokio::time::sleep(ctx.options.retry_interval).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(resp)) => {
                        if resp.compact_revision() > 0 {
                            return format!("history compacted at revision {}; re-reading", resp.compact_revision());
                        }
                        if resp.canceled() {
                            return format!("watch canceled: {}", resp.cancel_reason());
                        }
                        if !resp.events().is_empty() {
                            pending = !sync(ctx).await;
                        }
                    }
                    Ok(None) => return "watch stream closed".into(),
                    Err(e) => return format!("watch failed: {e}"),
                },
                () = retry => pending = !sync(ctx).await,
            }
        }
    }
}
