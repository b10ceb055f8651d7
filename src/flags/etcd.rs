//! Flag configs in etcd (DESIGN §3.3, feature `etcd`): [`push_flags`] publishes a
//! validated config to a key; [`Engine::watch_etcd`] keeps an engine on that key.
//!
//! The key holds the config JSON as-is (the same bytes `flags check` validates). A watcher
//! reads the key, then watches it from the next revision: every change is reloaded as it
//! arrives (etcd delivers watch events milliseconds after the commit). When the watch
//! breaks (member down, leader lost, history compacted) the watcher reconnects, trying
//! the endpoints in turn, and re-reads the key in full. An invalid value, a deleted key
//! or an unreachable cluster never replaces the snapshot: the last good config keeps
//! serving and [`EtcdWatcher::status`] says why.

use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions as EtcdWatchOptions};
use serde::Serialize;

use super::config::{ConfigError, FlagsConfig};
use super::engine::{Engine, WatchCallback, WatchEvent};
use crate::etcd::{with_member, Connector, Dial, EtcdAccessError, EtcdSecurity, OneShotError};

/// The key [`push_flags`] and [`Engine::watch_etcd`] use unless told otherwise.
pub const DEFAULT_FLAGS_KEY: &str = "erlmcp/feature_flags";

/// Why [`push_flags`] published nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// The config is invalid (every problem listed); nothing was published.
    #[error("the flag config is invalid; nothing was published")]
    Invalid(#[source] ConfigError),
    /// No endpoint was given, or one is malformed.
    #[error("etcd endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
    /// [`push_flags_guarded`]: the key changed since `expected` (a concurrent edit);
    /// nothing was written.
    #[error(
        "etcd key {key:?} changed concurrently (expected revision {expected}, found {actual}); nothing was written"
    )]
    Conflict {
        /// The key.
        key: String,
        /// The revision the write was guarded on.
        expected: i64,
        /// The key's revision now (0: the key is absent).
        actual: i64,
    },
    /// The TLS settings, the credentials or the user's permission on the key refused the
    /// push (an unreadable file, unknown CA, wrong password, permission denied, ...); it
    /// was not retried and nothing was published.
    #[error(transparent)]
    Access(#[from] EtcdAccessError),
    /// No member accepted the write in time (it may or may not have been applied).
    #[error("etcd at [{endpoints}] unavailable: {reason}")]
    Unavailable {
        /// The endpoints tried.
        endpoints: String,
        /// The last failure.
        reason: String,
    },
}

/// What [`push_flags`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PushOutcome {
    /// Flags in the published config.
    pub flags: usize,
    /// `false` when the key already held exactly these bytes (nothing written).
    pub changed: bool,
    /// The etcd revision of the key's value after the push.
    pub revision: i64,
    /// The key's value before the push, for the audit trail's diff. `None`: the key
    /// was absent, or a guarded push found its own write already made (a lost
    /// acknowledgement retried), so the value before it is no longer known.
    #[serde(skip)]
    pub previous: Option<Vec<u8>>,
}

impl From<OneShotError> for PushError {
    fn from(e: OneShotError) -> Self {
        match e {
            OneShotError::Endpoint { endpoint, reason } => PushError::Endpoint { endpoint, reason },
            OneShotError::Access(e) => PushError::Access(e),
            OneShotError::Unavailable { endpoints, reason } => PushError::Unavailable { endpoints, reason },
        }
    }
}

/// Validates `json` exactly as `flags check` does and, only if it is valid, writes it to
/// `key` (acknowledged = committed by the etcd quorum). Every watcher of the key reloads it.
///
/// # Errors
/// [`PushError::Invalid`] (nothing published), [`PushError::Endpoint`],
/// [`PushError::Unavailable`] when no member answered within `timeout`.
///
/// # Examples
/// ```no_run
/// use std::time::Duration;
/// use erlmcp_rollout::flags::{push_flags, DEFAULT_FLAGS_KEY};
/// let json = br#"{"mcp_tasks": {"enabled": true}}"#;
/// let endpoints = vec!["http://127.0.0.1:2379".to_string()];
/// let pushed = push_flags(&endpoints, DEFAULT_FLAGS_KEY, json, Duration::from_secs(5))?;
/// assert_eq!(pushed.flags, 1);
/// # Ok::<(), erlmcp_rollout::flags::PushError>(())
/// ```
pub fn push_flags(endpoints: &[String], key: &str, json: &[u8], timeout: Duration) -> Result<PushOutcome, PushError> {
    push_flags_with(endpoints, key, json, timeout, &EtcdSecurity::default())
}

/// [`push_flags`] to a cluster with TLS and/or authentication ([`crate::etcd`]): with
/// TLS, `host:port` endpoints are `https://`. The user needs read and write permission
/// on `key`.
///
/// # Errors
/// As [`push_flags`], and [`PushError::Access`] (at once, not retried) for an unreadable
/// file, a TLS handshake the settings cannot pass, a wrong password, or no permission on
/// `key`.
///
/// # Examples
/// ```no_run
/// use std::time::Duration;
/// use erlmcp_rollout::etcd::{EtcdAuth, EtcdSecurity, EtcdTls};
/// use erlmcp_rollout::flags::{push_flags_with, DEFAULT_FLAGS_KEY};
/// let security = EtcdSecurity {
///     tls: Some(EtcdTls { ca_cert_file: "ca.pem".into(), cert_file: None, key_file: None }),
///     auth: Some(EtcdAuth { user: "flags-admin".into(), password_file: "password".into() }),
/// };
/// let endpoints = vec!["10.0.0.1:2379".to_string()];
/// let json = br#"{"mcp_tasks": {"enabled": true}}"#;
/// push_flags_with(&endpoints, DEFAULT_FLAGS_KEY, json, Duration::from_secs(5), &security)?;
/// # Ok::<(), erlmcp_rollout::flags::PushError>(())
/// ```
pub fn push_flags_with(
    endpoints: &[String],
    key: &str,
    json: &[u8],
    timeout: Duration,
    security: &EtcdSecurity,
) -> Result<PushOutcome, PushError> {
    let config = FlagsConfig::from_json(json).map_err(PushError::Invalid)?;
    let (connector, urls) = Connector::with_urls(endpoints, security)?;
    let doing = format!("pushing key {key}");
    with_member(&connector, &urls, timeout, &doing, |mut client| async move {
        let current = client.get(key, None).await?;
        let previous = current.kvs().first().map(|kv| kv.value().to_vec());
        if let Some(kv) = current.kvs().first() {
            if kv.value() == json {
                return Ok(Ok((false, kv.mod_revision(), previous)));
            }
        }
        let put = client.put(key, json, None).await?;
        Ok(Ok((true, put.header().map_or(0, |h| h.revision()), previous)))
    })
    .map(|(changed, revision, previous)| PushOutcome {
        flags: config.len(),
        changed,
        revision,
        previous,
    })
}

/// Reads `key`: its value and `mod_revision`, or `None` when the key is absent (a
/// linearizable read through the leader).
///
/// # Errors
/// [`PushError::Endpoint`], [`PushError::Access`], [`PushError::Unavailable`] when no
/// member answered within `timeout`.
pub fn read_flags(
    endpoints: &[String],
    key: &str,
    timeout: Duration,
    security: &EtcdSecurity,
) -> Result<Option<(Vec<u8>, i64)>, PushError> {
    let (connector, urls) = Connector::with_urls(endpoints, security)?;
    let doing = format!("reading key {key}");
    with_member(&connector, &urls, timeout, &doing, |mut client| async move {
        let current = client.get(key, None).await?;
        Ok(Ok(current
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision()))))
    })
}

/// As [`push_flags`], but only if the key's `mod_revision` is still `expected_revision`
/// (one etcd transaction), so a concurrent edit is never overwritten: then
/// [`PushError::Conflict`] and nothing is written. A write whose acknowledgement was
/// lost (leader change) is recognised on the retry: the key then already holds `json`.
///
/// # Errors
/// [`PushError::Invalid`], [`PushError::Conflict`], [`PushError::Endpoint`],
/// [`PushError::Access`], [`PushError::Unavailable`] (the write may or may not have
/// happened).
pub fn push_flags_guarded(
    endpoints: &[String],
    key: &str,
    json: &[u8],
    expected_revision: i64,
    timeout: Duration,
    security: &EtcdSecurity,
) -> Result<PushOutcome, PushError> {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    let config = FlagsConfig::from_json(json).map_err(PushError::Invalid)?;
    let (connector, urls) = Connector::with_urls(endpoints, security)?;
    let doing = format!("pushing key {key}");
    with_member(&connector, &urls, timeout, &doing, |mut client| async move {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, expected_revision)])
            .and_then([TxnOp::put(
                key,
                json,
                Some(etcd_client::PutOptions::new().with_prev_key()),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = client.txn(txn).await?;
        if resp.succeeded() {
            let revision = resp.header().map_or(0, |h| h.revision());
            let previous = resp.op_responses().into_iter().find_map(|op| match op {
                etcd_client::TxnOpResponse::Put(p) => p.prev_key().map(|kv| kv.value().to_vec()),
                _ => None,
            });
            return Ok(Ok((true, revision, previous)));
        }
        let current = resp.op_responses().into_iter().find_map(|op| match op {
            etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| (kv.value().to_vec(), kv.mod_revision())),
            _ => None,
        });
        Ok(match current {
            Some((value, revision)) if value == json => Ok((true, revision, None)),
            other => Err(PushError::Conflict {
                key: key.to_owned(),
                expected: expected_revision,
                actual: other.map_or(0, |(_, r)| r),
            }),
        })
    })
    .map(|(changed, revision, previous)| PushOutcome {
        flags: config.len(),
        changed,
        revision,
        previous,
    })
}

/// Settings of [`Engine::watch_etcd`].
pub struct EtcdFlagsOptions {
    /// The key holding the config JSON (default [`DEFAULT_FLAGS_KEY`]).
    pub key: String,
    /// Time to connect to a member and read the key (default 5 s).
    pub connect_timeout: Duration,
    /// Pause between reconnection attempts while the cluster is unreachable (default 500 ms).
    pub retry_interval: Duration,
    /// Called after every reload attempt that changed something or failed.
    pub on_event: Option<WatchCallback>,
    /// TLS and the etcd user ([`crate::etcd`]); the user needs read permission on `key`.
    pub security: EtcdSecurity,
}

impl Default for EtcdFlagsOptions {
    fn default() -> Self {
        EtcdFlagsOptions {
            key: DEFAULT_FLAGS_KEY.to_owned(),
            connect_timeout: Duration::from_secs(5),
            retry_interval: Duration::from_millis(500),
            on_event: None,
            security: EtcdSecurity::default(),
        }
    }
}

/// What an [`EtcdWatcher`] has done so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EtcdWatchStatus {
    /// Whether a watch on the key is established now.
    pub connected: bool,
    /// Reloads that swapped a new snapshot in.
    pub reloads: u64,
    /// Values that could not be used (an invalid config, a delete of the key); the last
    /// good snapshot kept serving. A key that is simply absent is not a failure.
    pub failures: u64,
    /// Connections or watches that broke (then re-established with a full re-read).
    pub reconnects: u64,
    /// The etcd revision of the last value seen.
    pub revision: i64,
    /// Why the last value could not be used, or why the connection is down; cleared by
    /// the next good reload.
    pub last_error: Option<String>,
    /// Set when the last connection attempt was refused by the TLS settings, the
    /// credentials or the user's permission on the key (what was refused, where, never a
    /// secret); cleared when a watch is established. Retrying does not cure a refusal
    /// (the watcher still retries, in case an operator fixes the cluster side), so a
    /// caller waiting for the first read stops waiting when it is set.
    #[serde(skip)]
    pub refused: Option<EtcdAccessError>,
}

/// A running etcd watcher; dropping it stops its thread.
pub struct EtcdWatcher {
    stop: Option<tokio::sync::watch::Sender<bool>>,
    handle: Option<JoinHandle<()>>,
    status: Arc<Mutex<EtcdWatchStatus>>,
}

impl EtcdWatcher {
    /// Reloads, failures and the connection state so far.
    pub fn status(&self) -> EtcdWatchStatus {
        self.status.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl Drop for EtcdWatcher {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl std::fmt::Debug for EtcdWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdWatcher").field("status", &self.status()).finish()
    }
}

impl Engine {
    /// Keeps this engine on the config JSON stored in etcd under `options.key` (written
    /// by [`push_flags`]): reads the key, then watches it from the next revision and
    /// reloads every change as it arrives (milliseconds after the commit). When the watch
    /// breaks (member down, leader lost, history compacted) it reconnects, trying the
    /// endpoints in turn, and re-reads the key in full. Invalid values, a deleted key and
    /// outages keep the last good snapshot serving; [`EtcdWatcher::status`] says why.
    ///
    /// The watcher runs on its own thread; dropping the returned handle stops it.
    ///
    /// With [`EtcdFlagsOptions::security`] it connects with TLS and as an etcd user; a
    /// refused handshake, password or permission shows in [`EtcdWatchStatus::last_error`]
    /// (the watcher keeps trying, after [`EtcdFlagsOptions::retry_interval`]).
    ///
    /// # Errors
    /// [`PushError::Endpoint`] for a missing or malformed endpoint;
    /// [`PushError::Access`] for an unreadable CA, certificate, key or password file; the
    /// thread could not be spawned ([`PushError::Unavailable`]).
    ///
    /// # Examples
    /// ```no_run
    /// use std::sync::Arc;
    /// use erlmcp_rollout::flags::{Engine, EtcdFlagsOptions, FlagsConfig};
    /// let engine = Arc::new(Engine::builder().build(FlagsConfig::from_json(b"{}")?));
    /// let endpoints = vec!["http://127.0.0.1:2379".to_string()];
    /// let watcher = engine.watch_etcd(&endpoints, EtcdFlagsOptions::default())?;
    /// println!("{:?}", watcher.status());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn watch_etcd(
        self: &Arc<Self>,
        endpoints: &[String],
        options: EtcdFlagsOptions,
    ) -> Result<EtcdWatcher, PushError> {
        let (connector, urls) = Connector::with_urls(endpoints, &options.security)?;
        let status = Arc::new(Mutex::new(EtcdWatchStatus::default()));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let engine = Arc::clone(self);
        let thread_status = Arc::clone(&status);
        let handle = std::thread::Builder::new()
            .name("erlmcp-flags-etcd".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                    let mut s = thread_status.lock().unwrap_or_else(PoisonError::into_inner);
                    s.last_error = Some("cannot start the watcher's runtime".into());
                    return;
                };
                rt.block_on(watch_loop(
                    &engine,
                    &connector,
                    &urls,
                    &options,
                    stop_rx,
                    &thread_status,
                ));
            })
            .map_err(|e| PushError::Unavailable {
                endpoints: endpoints.join(", "),
                reason: format!("cannot spawn the watcher thread: {e}"),
            })?;
        Ok(EtcdWatcher {
            stop: Some(stop_tx),
            handle: Some(handle),
            status,
        })
    }
}

/// How one watch session ended.
enum End {
    Stopped,
    /// Broken (with why): reconnect after the retry interval.
    Broken(String),
    /// Refused by the TLS settings, the credentials or a permission.
    Refused(EtcdAccessError),
}

async fn watch_loop(
    engine: &Engine,
    connector: &Connector,
    urls: &[String],
    options: &EtcdFlagsOptions,
    mut stop: tokio::sync::watch::Receiver<bool>,
    status: &Mutex<EtcdWatchStatus>,
) {
    let mut i = 0usize;
    loop {
        let url = &urls[i % urls.len()];
        let ended = tokio::select! {
            _ = stop.changed() => End::Stopped,
            end = session(engine, connector, url, options, status) => end,
        };
        let (reason, refused) = match ended {
            End::Stopped => return,
            End::Broken(reason) => (reason, None),
            End::Refused(denied) => (denied.kind.to_string(), Some(denied)),
        };
        {
            let mut s = status.lock().unwrap_or_else(PoisonError::into_inner);
            s.connected = false;
            s.reconnects += 1;
            s.last_error = Some(format!("{url}: {reason}; serving the last good config"));
            s.refused = refused;
        }
        i += 1;
        // Try the next member at once; pause after a full round of failures.
        if i % urls.len() == 0 {
            tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep(options.retry_interval) => {}
            }
        }
    }
}

/// Connects to one member, reads the key in full, then follows it until the watch breaks.
async fn session(
    engine: &Engine,
    connector: &Connector,
    url: &str,
    options: &EtcdFlagsOptions,
    status: &Mutex<EtcdWatchStatus>,
) -> End {
    let dial = Dial::watch(options.connect_timeout);
    let first = tokio::time::timeout(options.connect_timeout, async {
        let mut client = connector.connect(url, &dial).await?;
        let resp = client.get(options.key.as_str(), None).await?;
        Ok::<_, etcd_client::Error>((client, resp))
    })
    .await;
    let (mut client, resp) = match first {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return match connector.access_failure(&e, url) {
                Some(denied) => End::Refused(denied.doing(&format!("reading key {}", options.key))),
                None => End::Broken(e.to_string()),
            }
        }
        Err(_) => return End::Broken(format!("no answer within {:?}", options.connect_timeout)),
    };
    let revision = resp.header().map_or(0, |h| h.revision());
    match resp.kvs().first() {
        Some(kv) => apply(engine, options, status, Some((kv.value(), kv.mod_revision()))),
        // Nothing published yet: keep what serves, without counting a failure.
        None => {
            status.lock().unwrap_or_else(PoisonError::into_inner).last_error = Some(format!(
                "flag key {:?} is absent; serving the config the engine already has",
                options.key
            ))
        }
    }
    let watch = EtcdWatchOptions::new().with_start_revision(revision + 1);
    let mut stream = match client.watch(options.key.as_str(), Some(watch)).await {
        Ok(s) => s,
        Err(e) => return End::Broken(format!("cannot watch: {e}")),
    };
    {
        let mut s = status.lock().unwrap_or_else(PoisonError::into_inner);
        s.connected = true;
        s.refused = None;
    }
    loop {
        match stream.message().await {
            Ok(Some(resp)) => {
                if resp.compact_revision() > 0 {
                    return End::Broken(format!(
                        "history compacted at revision {}; re-reading",
                        resp.compact_revision()
                    ));
                }
                if resp.canceled() {
                    return End::Broken(format!("watch canceled: {}", resp.cancel_reason()));
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    match ev.event_type() {
                        EventType::Put => apply(engine, options, status, Some((kv.value(), kv.mod_revision()))),
                        EventType::Delete => apply(engine, options, status, None),
                    }
                }
            }
            Ok(None) => return End::Broken("watch stream closed".into()),
            Err(e) => return End::Broken(format!("watch failed: {e}")),
        }
    }
}

/// Reloads the engine from the key's value (`None`: the key was deleted).
fn apply(engine: &Engine, options: &EtcdFlagsOptions, status: &Mutex<EtcdWatchStatus>, value: Option<(&[u8], i64)>) {
    let event = match value {
        None => {
            let mut s = status.lock().unwrap_or_else(PoisonError::into_inner);
            s.failures += 1;
            s.last_error = Some(format!(
                "flag key {:?} was deleted; serving the last good config",
                options.key
            ));
            return;
        }
        Some((bytes, revision)) => {
            let result = engine.reload_bytes(bytes, &format!("etcd:{}@{revision}", options.key));
            let mut s = status.lock().unwrap_or_else(PoisonError::into_inner);
            s.revision = revision;
            match result {
                Ok(outcome) if !outcome.changed => return,
                Ok(outcome) => {
                    s.reloads += 1;
                    s.last_error = None;
                    WatchEvent::Reloaded(outcome)
                }
                Err(e) => {
                    s.failures += 1;
                    let problems: Vec<String> = e.problems().iter().map(ToString::to_string).collect();
                    s.last_error = Some(format!(
                        "flag key {:?} at revision {revision} is not a valid config ({}); serving the last good config",
                        options.key,
                        problems.join("; ")
                    ));
                    WatchEvent::Failed(e)
                }
            }
        }
    };
    if let Some(cb) = &options.on_event {
        cb(&event);
    }
}
