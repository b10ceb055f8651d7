//! The controller's durable state, its commands (approve, abort) and the
//! single-controller lock (DESIGN §6.6).
//!
//! - [`RunState`] is saved after every step ([`StateStore::save`]): in a file
//!   (written atomically: temporary file, fsync, rename) or in etcd
//!   (`PREFIX/FLAG/state`). A restarted controller loads it and resumes the
//!   same stage and window.
//! - `rollout approve` and `rollout abort` leave a [`Command`] next to the
//!   state (`STATE.command`, or `PREFIX/FLAG/command`); the controller takes
//!   it (read, then delete) on its next tick, so the state has one writer.
//! - [`ControllerLock`]: one controller per flag. On a file target, an
//!   exclusive `flock` on a lock file next to the flags file (released by the
//!   kernel when the process dies, even by `kill -9`); on an etcd target, a
//!   key under a lease kept alive by a background thread. Either way the lock
//!   names its [`Holder`], and the second controller's error says who it is.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::target::{write_atomically, FlagTarget, Guard};
use super::RolloutError;

/// Where a run is: running, paused, or finished (and how).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Publishing and judging.
    Running,
    /// Waiting for `rollout approve` or `rollout abort`.
    Paused,
    /// The last stage (100 %) passed its window.
    Completed,
    /// Rolled back by a verdict or a limit.
    RolledBack,
    /// Rolled back by `rollout abort`.
    Aborted,
}

impl Phase {
    /// Whether the run is over.
    pub fn finished(self) -> bool {
        matches!(self, Phase::Completed | Phase::RolledBack | Phase::Aborted)
    }
}

/// Why a run is paused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pause {
    /// `approval` (a manual-review trigger), `conflict` (the config was edited
    /// concurrently) or `limit` (too many inconclusive judgements or
    /// Prometheus errors).
    pub kind: String,
    /// What happened, for people.
    pub reason: String,
    /// Unix seconds.
    pub since: f64,
    /// The rules that asked for approval (acknowledged by `approve`).
    #[serde(default)]
    pub rules: Vec<String>,
    /// Who must approve (from the rollback matrix), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approver: Option<String>,
}

/// A publish whose intent is saved before it is made (exactly-once across restarts).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// Its sequence number (the audit line carries it).
    pub seq: u64,
    /// Percentage before.
    pub from: u8,
    /// Percentage after.
    pub to: u8,
    /// `stage`, `rollback` or `abort`.
    pub reason: String,
    /// The guard of the config it was computed from.
    pub based_on: Guard,
}

/// One judgement, summarised for the state and `rollout status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JudgementSummary {
    /// Unix seconds.
    pub at: f64,
    /// 1-based stage.
    pub stage: usize,
    /// Percentage judged.
    pub percent: u8,
    /// `pass`, `inconclusive`, `error`, `approval` or `rollback`.
    pub outcome: String,
    /// Why, in one line.
    pub summary: String,
}

/// The durable state of one run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Format version (1).
    pub version: u32,
    /// Unique per run.
    pub run_id: String,
    /// The flag.
    pub flag: String,
    /// The flag config location, as given.
    pub target: String,
    /// The Prometheus base URL.
    #[serde(default)]
    pub prometheus: String,
    /// The plan (as a plan file), fixed for the run.
    pub plan: serde_json::Value,
    /// Who started it.
    pub actor: String,
    /// Judging and logging only, no publishing.
    pub dry_run: bool,
    /// The audit log file.
    pub audit: Option<String>,
    /// Unix seconds.
    pub started_at: f64,
    /// Unix seconds of the last save.
    pub updated_at: f64,
    /// Where the run is.
    pub phase: Phase,
    /// 0-based stage index.
    pub stage: usize,
    /// The percentage published now.
    pub percent: u8,
    /// The percentage before the run.
    pub initial_percent: u8,
    /// When the current stage's window started (its publish), unix seconds.
    pub window_start: Option<f64>,
    /// When the next judgement is due, unix seconds.
    pub next_judgement_at: Option<f64>,
    /// The guard of the config as last read or written.
    pub guard: Guard,
    /// The flag's spec in that config: an edit elsewhere in the config is
    /// rebased onto, an edit of this flag is a conflict.
    #[serde(default)]
    pub flag_spec: serde_json::Value,
    /// A publish saved before it was made, cleared after.
    pub pending: Option<Pending>,
    /// The last publish sequence number used.
    pub publish_seq: u64,
    /// Consecutive inconclusive judgements.
    pub consecutive_inconclusive: u32,
    /// Consecutive judgements without an answer from Prometheus.
    pub consecutive_errors: u32,
    /// Rollback verdicts in this stage.
    pub failures: u32,
    /// Rules acknowledged by `approve` for the rest of this stage.
    pub acknowledged: Vec<String>,
    /// Set while paused.
    pub pause: Option<Pause>,
    /// Recent judgements (at most [`RunState::KEEP`]).
    pub judgements: Vec<JudgementSummary>,
    /// How the run ended, for people.
    pub result: Option<String>,
}

impl RunState {
    /// Judgements kept in the state (the audit log keeps all).
    pub const KEEP: usize = 100;
}

/// `approve` or `abort`, left for the controller.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// `approve` or `abort`.
    pub action: String,
    /// Who.
    pub actor: String,
    /// Unix seconds.
    pub at: f64,
    /// Why (optional).
    #[serde(default)]
    pub note: String,
}

/// Where run states and commands live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateStore {
    /// `FILE` (commands in `FILE.command`).
    File(PathBuf),
    /// `etcd:HOST:PORT[,..][/PREFIX]`: `PREFIX/FLAG/state` and `PREFIX/FLAG/command`.
    #[cfg(feature = "etcd")]
    Etcd {
        /// Endpoints (`host:port` or URLs).
        endpoints: Vec<String>,
        /// Key prefix, ending in `/`.
        prefix: String,
        /// Time limit of one operation.
        timeout: Duration,
        /// TLS and the etcd user ([`crate::etcd`]); the user needs read and write
        /// permission on the prefix.
        security: crate::etcd::EtcdSecurity,
    },
}

/// The default etcd prefix of run states.
pub const DEFAULT_STATE_PREFIX: &str = "erlmcp/rollouts/";

impl std::fmt::Display for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateStore::File(p) => write!(f, "{}", p.display()),
            #[cfg(feature = "etcd")]
            StateStore::Etcd { endpoints, prefix, .. } => write!(
                f,
                "etcd:{}/{}",
                super::target::spec_endpoints(endpoints),
                prefix.trim_end_matches('/')
            ),
        }
    }
}

/// The connector and member URLs of an etcd location; a bad endpoint or an unreadable
/// certificate or password file is a usage error (nothing was tried).
#[cfg(feature = "etcd")]
fn etcd_connector(
    endpoints: &[String],
    security: &crate::etcd::EtcdSecurity,
) -> Result<(crate::etcd::Connector, Vec<String>), RolloutError> {
    crate::etcd::Connector::with_urls(endpoints, security).map_err(|e| RolloutError::Usage(e.to_string()))
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> RolloutError {
    move |e| RolloutError::State(format!("{what}: {e}"))
}

impl StateStore {
    /// `FILE` or `etcd:HOST:PORT[,..][/PREFIX]`.
    ///
    /// # Errors
    /// [`RolloutError::Usage`] for a malformed etcd spec.
    pub fn parse(spec: &str, timeout: Duration) -> Result<StateStore, RolloutError> {
        let split = super::target::split_etcd_spec(spec).map_err(|e| RolloutError::Usage(e.to_string()))?;
        match split {
            None => {
                let _ = timeout;
                Ok(StateStore::File(PathBuf::from(spec)))
            }
            #[cfg(feature = "etcd")]
            Some((endpoints, prefix)) => Ok(StateStore::Etcd {
                endpoints,
                prefix: crate::session::uri::etcd_prefix(Some(prefix.as_deref().unwrap_or(DEFAULT_STATE_PREFIX))),
                timeout,
                security: crate::etcd::EtcdSecurity::default(),
            }),
            #[cfg(not(feature = "etcd"))]
            Some(_) => Err(RolloutError::Usage(format!("{spec:?}: built without etcd support"))),
        }
    }

    /// The same store reached with TLS and/or an etcd user (a file store is unchanged).
    #[must_use]
    pub fn with_etcd_security(self, security: crate::etcd::EtcdSecurity) -> StateStore {
        match self {
            #[cfg(feature = "etcd")]
            StateStore::Etcd {
                endpoints,
                prefix,
                timeout,
                ..
            } => StateStore::Etcd {
                endpoints,
                prefix,
                timeout,
                security,
            },
            other => {
                let _ = security;
                other
            }
        }
    }

    fn command_path(path: &Path) -> PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(".command");
        PathBuf::from(p)
    }

    /// Load the state of `flag`'s run (`None`: no run recorded).
    ///
    /// # Errors
    /// [`RolloutError::State`] when it cannot be read or parsed.
    pub fn load(&self, flag: &str) -> Result<Option<RunState>, RolloutError> {
        let bytes = match self {
            StateStore::File(path) => match std::fs::read(path) {
                Ok(b) => Some(b),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(io_err(format!("cannot read {}", path.display()))(e)),
            },
            #[cfg(feature = "etcd")]
            StateStore::Etcd { .. } => self.etcd_get(&self.key(flag, "state"))?,
        };
        let Some(bytes) = bytes else { return Ok(None) };
        let state: RunState = serde_json::from_slice(&bytes)
            .map_err(|e| RolloutError::State(format!("{self}: not a rollout state: {e}")))?;
        if state.flag != flag && !flag.is_empty() {
            return Err(RolloutError::State(format!(
                "{self} holds the run of flag {:?}, not {flag:?}",
                state.flag
            )));
        }
        Ok(Some(state))
    }

    /// Save a state durably.
    ///
    /// # Errors
    /// [`RolloutError::State`].
    pub fn save(&self, state: &RunState) -> Result<(), RolloutError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| RolloutError::State(e.to_string()))?;
        match self {
            StateStore::File(path) => {
                write_atomically(path, &bytes).map_err(io_err(format!("cannot write {}", path.display())))
            }
            #[cfg(feature = "etcd")]
            StateStore::Etcd { .. } => self.etcd_put(&self.key(&state.flag, "state"), bytes),
        }
    }

    /// Leave a command for `flag`'s controller (replacing an unread one).
    ///
    /// # Errors
    /// [`RolloutError::State`].
    pub fn put_command(&self, flag: &str, c: &Command) -> Result<(), RolloutError> {
        let bytes = serde_json::to_vec(c).map_err(|e| RolloutError::State(e.to_string()))?;
        match self {
            StateStore::File(path) => {
                let p = Self::command_path(path);
                write_atomically(&p, &bytes).map_err(io_err(format!("cannot write {}", p.display())))
            }
            #[cfg(feature = "etcd")]
            StateStore::Etcd { .. } => self.etcd_put(&self.key(flag, "command"), bytes),
        }
    }

    /// Take (read and delete) the command left for `flag`'s controller.
    ///
    /// # Errors
    /// [`RolloutError::State`].
    pub fn take_command(&self, flag: &str) -> Result<Option<Command>, RolloutError> {
        let bytes = match self {
            StateStore::File(path) => {
                let p = Self::command_path(path);
                match std::fs::read(&p) {
                    Ok(b) => {
                        std::fs::remove_file(&p).map_err(io_err(format!("cannot remove {}", p.display())))?;
                        Some(b)
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => return Err(io_err(format!("cannot read {}", p.display()))(e)),
                }
            }
            #[cfg(feature = "etcd")]
            StateStore::Etcd { .. } => self.etcd_take(&self.key(flag, "command"))?,
        };
        match bytes {
            None => Ok(None),
            Some(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| RolloutError::State(format!("unreadable command for {flag:?}: {e}"))),
        }
    }

    #[cfg(feature = "etcd")]
    fn key(&self, flag: &str, what: &str) -> String {
        match self {
            StateStore::Etcd { prefix, .. } => format!("{prefix}{flag}/{what}"),
            StateStore::File(_) => String::new(),
        }
    }

    /// The connection of an etcd store: connector, member URLs, time limit.
    #[cfg(feature = "etcd")]
    fn etcd(&self) -> Result<(crate::etcd::Connector, Vec<String>, Duration), RolloutError> {
        match self {
            StateStore::Etcd {
                endpoints,
                timeout,
                security,
                ..
            } => {
                let (connector, urls) = etcd_connector(endpoints, security)?;
                Ok((connector, urls, *timeout))
            }
            StateStore::File(_) => Err(RolloutError::Usage("not an etcd state store".into())),
        }
    }

    #[cfg(feature = "etcd")]
    fn etcd_get(&self, key: &str) -> Result<Option<Vec<u8>>, RolloutError> {
        let (connector, urls, timeout) = self.etcd()?;
        crate::etcd::with_member(
            &connector,
            &urls,
            timeout,
            "reading the rollout state",
            |mut c| async move {
                let r = c.get(key, None).await?;
                Ok(Ok(r.kvs().first().map(|kv| kv.value().to_vec())))
            },
        )
        .map_err(|e: crate::etcd::OneShotError| RolloutError::State(e.to_string()))
    }

    #[cfg(feature = "etcd")]
    fn etcd_put(&self, key: &str, value: Vec<u8>) -> Result<(), RolloutError> {
        let (connector, urls, timeout) = self.etcd()?;
        let value = &value;
        crate::etcd::with_member(
            &connector,
            &urls,
            timeout,
            "writing the rollout state",
            |mut c| async move {
                c.put(key, value.clone(), None).await?;
                Ok(Ok(()))
            },
        )
        .map_err(|e: crate::etcd::OneShotError| RolloutError::State(e.to_string()))
    }

    #[cfg(feature = "etcd")]
    fn etcd_take(&self, key: &str) -> Result<Option<Vec<u8>>, RolloutError> {
        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
        let (connector, urls, timeout) = self.etcd()?;
        crate::etcd::with_member(
            &connector,
            &urls,
            timeout,
            "taking a rollout command",
            |mut c| async move {
                let r = c.get(key, None).await?;
                let Some(kv) = r.kvs().first() else { return Ok(Ok(None)) };
                let (value, rev) = (kv.value().to_vec(), kv.mod_revision());
                // Delete only what was read: a newer command stays for the next tick.
                let txn = Txn::new()
                    .when([Compare::mod_revision(key, CompareOp::Equal, rev)])
                    .and_then([TxnOp::delete(key, None)]);
                let done = c.txn(txn).await?;
                Ok(Ok(done.succeeded().then_some(value)))
            },
        )
        .map_err(|e: crate::etcd::OneShotError| RolloutError::State(e.to_string()))
    }
}

/// Who holds a controller lock.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Holder {
    /// Process id.
    pub pid: u32,
    /// Host name.
    pub host: String,
    /// `--actor`.
    pub actor: String,
    /// Unix seconds.
    pub since: f64,
    /// The etcd lease, for an etcd lock.
    #[serde(default)]
    pub lease: i64,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} on {} (actor {:?}, since {})",
            self.pid,
            self.host,
            self.actor,
            super::audit::rfc3339(self.since)
        )
    }
}

impl Holder {
    /// This process.
    pub fn me(actor: &str) -> Holder {
        Holder {
            pid: std::process::id(),
            host: hostname(),
            actor: actor.to_owned(),
            since: super::now(),
            lease: 0,
        }
    }

    /// Whether this holder is a dead process on this host (its lock can be taken over).
    fn dead_here(&self) -> bool {
        self.host == hostname() && !Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".into())
}

/// The single-controller lock of one flag; released on drop (and by the
/// kernel or the lease's expiry if the process dies).
pub struct ControllerLock {
    inner: LockInner,
}

enum LockInner {
    File {
        _file: std::fs::File,
    },
    #[cfg(feature = "etcd")]
    Etcd {
        lost: std::sync::Arc<std::sync::atomic::AtomicBool>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    },
}

impl std::fmt::Debug for ControllerLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControllerLock")
    }
}

impl Drop for ControllerLock {
    fn drop(&mut self) {
        match &mut self.inner {
            LockInner::File { .. } => {}
            #[cfg(feature = "etcd")]
            LockInner::Etcd { stop, thread, .. } => {
                if let Some(s) = stop.take() {
                    let _ = s.send(());
                }
                if let Some(t) = thread.take() {
                    let _ = t.join();
                }
            }
        }
    }
}

/// Lease time-to-live of an etcd controller lock.
pub const LOCK_TTL_SECONDS: i64 = 10;

impl ControllerLock {
    /// Whether the lock is still held (an etcd lease can be lost when the
    /// keep-alive fails longer than its TTL).
    pub fn held(&self) -> bool {
        match &self.inner {
            LockInner::File { .. } => true,
            #[cfg(feature = "etcd")]
            LockInner::Etcd { lost, .. } => !lost.load(std::sync::atomic::Ordering::SeqCst),
        }
    }

    /// Take the lock of `flag` on `target` for `me`.
    ///
    /// # Errors
    /// [`RolloutError::Locked`] naming the holder; [`RolloutError::State`].
    pub fn acquire(target: &FlagTarget, flag: &str, me: &Holder) -> Result<ControllerLock, RolloutError> {
        match target {
            FlagTarget::File(path) => Self::file(path, flag, me),
            #[cfg(feature = "etcd")]
            FlagTarget::Etcd {
                endpoints,
                key,
                timeout,
                security,
            } => Self::etcd(
                endpoints,
                security,
                &format!("{key}/rollout-lock/{flag}"),
                *timeout,
                flag,
                me,
            ),
        }
    }

    /// Who holds the lock of `flag` on `target` now (`None`: no controller runs).
    ///
    /// # Errors
    /// [`RolloutError::State`] when the lock cannot be inspected.
    pub fn holder(target: &FlagTarget, flag: &str) -> Result<Option<Holder>, RolloutError> {
        match target {
            FlagTarget::File(path) => {
                use rustix::fs::{flock, FlockOperation};
                let path = Self::lock_path(path, flag);
                let file = match std::fs::File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(io_err(format!("cannot open {}", path.display()))(e)),
                };
                // A shared lock is granted unless a controller holds the exclusive one;
                // it is dropped with `file`.
                if flock(&file, FlockOperation::NonBlockingLockShared).is_ok() {
                    return Ok(None);
                }
                let text = std::fs::read(&path).map_err(io_err(format!("cannot read {}", path.display())))?;
                Ok(serde_json::from_slice(&text).ok())
            }
            #[cfg(feature = "etcd")]
            FlagTarget::Etcd {
                endpoints,
                key,
                timeout,
                security,
            } => {
                let (connector, urls) = etcd_connector(endpoints, security)?;
                let key = format!("{key}/rollout-lock/{flag}");
                let key = key.as_str();
                let value = crate::etcd::with_member(
                    &connector,
                    &urls,
                    *timeout,
                    "reading the controller lock",
                    |mut c| async move {
                        let r = c.get(key, None).await?;
                        Ok(Ok(r.kvs().first().map(|kv| kv.value().to_vec())))
                    },
                )
                .map_err(|e: crate::etcd::OneShotError| RolloutError::State(format!("controller lock: {e}")))?;
                Ok(value.and_then(|v| serde_json::from_slice(&v).ok()))
            }
        }
    }

    /// The lock file of `flag` for a flags file.
    pub fn lock_path(flags_file: &Path, flag: &str) -> PathBuf {
        let dir = match flags_file.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = flags_file
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        dir.join(format!(".{name}.{flag}.rollout-lock"))
    }

    fn file(flags_file: &Path, flag: &str, me: &Holder) -> Result<ControllerLock, RolloutError> {
        use rustix::fs::{flock, FlockOperation};
        use std::io::{Read, Seek, Write};
        let path = Self::lock_path(flags_file, flag);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(format!("cannot open the lock file {}", path.display())))?;
        if flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = serde_json::from_str::<Holder>(&text)
                .map(|h| h.to_string())
                .unwrap_or_else(|_| "another process".into());
            return Err(RolloutError::Locked(format!(
                "flag {flag:?} is already being rolled out by {holder} (lock {})",
                path.display()
            )));
        }
        let text = serde_json::to_vec(me).map_err(|e| RolloutError::State(e.to_string()))?;
        (|| {
            file.set_len(0)?;
            file.rewind()?;
            file.write_all(&text)?;
            file.sync_all()
        })()
        .map_err(io_err(format!("cannot write the lock file {}", path.display())))?;
        Ok(ControllerLock {
            inner: LockInner::File { _file: file },
        })
    }

    #[cfg(feature = "etcd")]
    fn etcd(
        endpoints: &[String],
        security: &crate::etcd::EtcdSecurity,
        key: &str,
        timeout: Duration,
        flag: &str,
        me: &Holder,
    ) -> Result<ControllerLock, RolloutError> {
        use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
        let (connector, urls) = etcd_connector(endpoints, security)?;
        let state_err = |e: crate::etcd::OneShotError| RolloutError::State(format!("controller lock: {e}"));
        for attempt in 0..2 {
            let mut holder = me.clone();
            let got = crate::etcd::with_member(&connector, &urls, timeout, "taking the controller lock", |mut c| {
                let mut holder = holder.clone();
                async move {
                    let lease = c.lease_grant(LOCK_TTL_SECONDS, None).await?.id();
                    holder.lease = lease;
                    let value = serde_json::to_vec(&holder).unwrap_or_default();
                    let txn = Txn::new()
                        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)))])
                        .or_else([TxnOp::get(key, None)]);
                    let r = c.txn(txn).await?;
                    if r.succeeded() {
                        return Ok(Ok(Ok(lease)));
                    }
                    let _ = c.lease_revoke(lease).await;
                    let other = r.op_responses().into_iter().find_map(|op| match op {
                        etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
                        _ => None,
                    });
                    Ok(Ok(Err(other.and_then(|b| serde_json::from_slice::<Holder>(&b).ok()))))
                }
            })
            .map_err(state_err)?;
            match got {
                Ok(lease) => {
                    holder.lease = lease;
                    return Ok(Self::keep_alive(connector, urls, lease));
                }
                Err(Some(other)) if attempt == 0 && other.dead_here() => {
                    // A controller killed on this host: its lease would expire
                    // within the TTL anyway; revoke it and take over now.
                    let lease = other.lease;
                    crate::etcd::with_member(
                        &connector,
                        &urls,
                        timeout,
                        "taking over a dead controller's lock",
                        |mut c| async move {
                            let _ = c.lease_revoke(lease).await;
                            Ok(Ok(()))
                        },
                    )
                    .map_err(state_err)?;
                }
                Err(other) => {
                    let who = other.map_or_else(|| "another controller".into(), |h| h.to_string());
                    return Err(RolloutError::Locked(format!(
                        "flag {flag:?} is already being rolled out by {who} (etcd lock {key:?}, lease TTL {LOCK_TTL_SECONDS} s)"
                    )));
                }
            }
        }
        Err(RolloutError::Locked(format!(
            "flag {flag:?}: could not take the etcd lock {key:?}"
        )))
    }

    #[cfg(feature = "etcd")]
    fn keep_alive(connector: crate::etcd::Connector, urls: Vec<String>, lease: i64) -> ControllerLock {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let lost = Arc::new(AtomicBool::new(false));
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let flag = Arc::clone(&lost);
        let thread = std::thread::Builder::new()
            .name("erlmcp-rollout-lease".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                    flag.store(true, Ordering::SeqCst);
                    return;
                };
                rt.block_on(async {
                    let ttl = Duration::from_secs(LOCK_TTL_SECONDS as u64);
                    let mut last_ok = tokio::time::Instant::now();
                    let mut i = 0usize;
                    loop {
                        let url = &urls[i % urls.len()];
                        let beat = async {
                            let mut c = connector.connect_within(url, Duration::from_secs(2)).await?;
                            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
                            loop {
                                keeper.keep_alive().await?;
                                match stream.message().await? {
                                    Some(r) if r.ttl() > 0 => {
                                        last_ok = tokio::time::Instant::now();
                                    }
                                    _ => return Ok::<bool, etcd_client::Error>(true),
                                }
                                tokio::time::sleep(ttl / 4).await;
                            }
                        };
                        let expired = tokio::select! {
                            _ = &mut stop_rx => {
                                if let Ok(mut c) = connector.connect_within(url, Duration::from_secs(2)).await {
                                    let _ = c.lease_revoke(lease).await;
                                }
                                return;
                            }
                            r = beat => matches!(r, Ok(true)),
                        };
                        if expired || last_ok.elapsed() >= ttl {
                            flag.store(true, Ordering::SeqCst);
                        }
                        i += 1;
                        tokio::select! {
                            _ = &mut stop_rx => return,
                            () = tokio::time::sleep(Duration::from_millis(200)) => {}
                        }
                    }
                });
            });
        let thread = match thread {
            Ok(t) => Some(t),
            Err(_) => {
                lost.store(true, Ordering::SeqCst);
                None
            }
        };
        ControllerLock {
            inner: LockInner::Etcd {
                lost,
                stop: Some(stop_tx),
                thread,
            },
        }
    }
}
