//! The flag engine (DESIGN §3.3): the current [`Snapshot`] behind an
//! [`ArcSwap`], and everything that replaces it — reloads, overrides,
//! custom predicates — on the writer side.
//!
//! Readers call [`Engine::evaluate`]: one `ArcSwap::load`, a hash lookup, a
//! few branches and a relaxed counter increment. They never lock, block or
//! allocate. Writers serialize on a mutex, build a complete new snapshot off
//! to the side and publish it with one atomic store; a reader sees either the
//! old or the new snapshot, never a mix.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Serialize;

use super::audit::{audit_diff, override_change, AuditLog, FlagChange};
use super::config::{ConfigError, FlagsConfig};
use super::details::EvaluationDetails;
use super::metrics::{Counts, FlagCounters, Metrics};
use super::overrides::{EnvOverrides, Overrides};
use super::snapshot::{CompileInput, CustomPredicate, Evaluation, Explanation, FlagDetails, Snapshot};
use super::value::Context;
use crate::clock::{Clock, SystemClock};

/// The environment used when none is given, as in the reference.
pub const DEFAULT_ENVIRONMENT: &str = "dev";

/// Builds an [`Engine`].
#[derive(Clone)]
pub struct EngineBuilder {
    environment: String,
    clock: Arc<dyn Clock>,
    env_overrides: EnvOverrides,
    audit: Option<Arc<AuditLog>>,
}

impl Default for EngineBuilder {
    fn default() -> Self {
        EngineBuilder {
            environment: DEFAULT_ENVIRONMENT.to_owned(),
            clock: Arc::new(SystemClock),
            env_overrides: EnvOverrides::default(),
            audit: None,
        }
    }
}

impl EngineBuilder {
    /// The environment flags are evaluated in (default `dev`).
    pub fn environment(mut self, environment: impl Into<String>) -> Self {
        self.environment = environment.into();
        self
    }

    /// The clock schedules read (default the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Overrides from `ERLMCP_FEATURE_FLAGS` (see [`EnvOverrides::from_env`]).
    pub fn env_overrides(mut self, overrides: EnvOverrides) -> Self {
        self.env_overrides = overrides;
        self
    }

    /// Append every change of the effective flags to `log` (see
    /// [`AuditLog`]); off unless given.
    pub fn audit_log(mut self, log: AuditLog) -> Self {
        self.audit = Some(Arc::new(log));
        self
    }

    /// Compile `config` and start serving it.
    pub fn build(self, config: FlagsConfig) -> Engine {
        let mut state = State {
            environment: self.environment,
            config: Arc::new(config),
            overrides: Overrides {
                runtime: BTreeMap::new(),
                env: self.env_overrides,
            },
            customs: BTreeMap::new(),
            counters: BTreeMap::new(),
            generation: 0,
            fingerprint: None,
            retired: None,
            audit: self.audit,
        };
        let unknown = Arc::new(FlagCounters::default());
        let snapshot = compile(&mut state, &unknown, &self.clock);
        Engine {
            current: ArcSwap::from_pointee(snapshot),
            state: Mutex::new(state),
            clock: self.clock,
            unknown,
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            audit_failures: AtomicU64::new(0),
        }
    }
}

struct State {
    environment: String,
    config: Arc<FlagsConfig>,
    overrides: Overrides,
    customs: BTreeMap<String, CustomPredicate>,
    /// Per-flag counters survive reloads (and flags leaving the config).
    counters: BTreeMap<String, Arc<FlagCounters>>,
    generation: u64,
    /// Content fingerprint of the last file loaded.
    fingerprint: Option<u64>,
    /// The previously published snapshot (see `Engine::publish`).
    retired: Option<Arc<Snapshot>>,
    /// Where changes are recorded, when on.
    audit: Option<Arc<AuditLog>>,
}

fn compile(state: &mut State, unknown: &Arc<FlagCounters>, clock: &Arc<dyn Clock>) -> Snapshot {
    state.generation += 1;
    Snapshot::compile(CompileInput {
        config: state.config.clone(),
        environment: &state.environment,
        overrides: &state.overrides,
        customs: &state.customs,
        counters: &mut state.counters,
        unknown: unknown.clone(),
        clock: clock.clone(),
        generation: state.generation,
    })
}

/// The feature-flag engine. Share it with `Arc`; every method takes `&self`.
///
/// # Examples
/// ```
/// use erlmcp_rollout::flags::{Engine, FlagsConfig, MapContext, Reason};
/// let engine = Engine::builder()
///     .environment("production")
///     .build(FlagsConfig::from_json(br#"{"mcp_tasks": {"enabled": true, "environments": ["dev"]}}"#)?);
/// assert_eq!(engine.evaluate("mcp_tasks", &()).reason, Reason::Environment);
/// assert_eq!(engine.evaluate("nope", &()).reason, Reason::UnknownFlag);
/// engine.disable("mcp_tasks");
/// assert!(!engine.get_all()["mcp_tasks"]);
/// # Ok::<(), erlmcp_rollout::flags::ConfigError>(())
/// ```
pub struct Engine {
    current: ArcSwap<Snapshot>,
    state: Mutex<State>,
    clock: Arc<dyn Clock>,
    unknown: Arc<FlagCounters>,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
    audit_failures: AtomicU64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("snapshot", &*self.current.load())
            .finish()
    }
}

/// What a successful reload did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ReloadOutcome {
    /// `false` when the file's content was what is already loaded (nothing swapped).
    pub changed: bool,
    /// Flags in the config now serving.
    pub flags: usize,
    /// Generation of the snapshot now serving.
    pub generation: u64,
}

impl Engine {
    /// A builder with the defaults (environment `dev`, system clock, no overrides).
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// Load `path` and build an engine for `environment`, applying
    /// `ERLMCP_FEATURE_FLAGS` from the process environment.
    ///
    /// # Errors
    /// The config is unreadable or invalid, or the environment variable is malformed.
    pub fn from_file(path: impl AsRef<Path>, environment: &str) -> Result<Engine, EngineError> {
        let bytes = read(path.as_ref())?;
        let config = FlagsConfig::from_json(&bytes)?;
        let engine = Engine::builder()
            .environment(environment)
            .env_overrides(EnvOverrides::from_env()?)
            .build(config);
        engine.lock().fingerprint = Some(fingerprint(&bytes));
        Ok(engine)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated in a
        // way readers see (they read the published snapshot), so keep going.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish(&self, state: &mut State) {
        let snapshot = compile(state, &self.unknown, &self.clock);
        let previous = self.current.swap(Arc::new(snapshot));
        // Keep the snapshot just replaced alive until the next publish, so
        // that a reader finishing an evaluation on it never ends up dropping
        // the last reference (freeing a whole snapshot on the hot path); the
        // one retired before it is freed here, on the writer's thread.
        state.retired = Some(previous);
    }

    /// Evaluate `name` for `ctx`. Lock-free and allocation-free; never fails.
    #[inline]
    pub fn evaluate<N: AsRef<[u8]> + ?Sized, C: Context>(&self, name: &N, ctx: &C) -> Evaluation {
        self.current.load().evaluate(name.as_ref(), ctx)
    }

    /// `evaluate(name, ctx).enabled`.
    #[inline]
    pub fn is_enabled<N: AsRef<[u8]> + ?Sized, C: Context>(&self, name: &N, ctx: &C) -> bool {
        self.evaluate(name, ctx).enabled
    }

    /// Evaluate with the full reason chain.
    pub fn explain<C: Context>(&self, name: &str, ctx: &C) -> Explanation {
        self.current.load().explain(name, ctx)
    }

    /// The snapshot serving now; evaluate many flags against one consistent config.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The environment this engine evaluates in.
    pub fn environment(&self) -> String {
        self.lock().environment.clone()
    }

    /// Evaluate in another environment from now on (recompiles the snapshot).
    pub fn set_environment(&self, environment: &str) {
        let mut state = self.lock();
        if state.environment != environment {
            state.environment = environment.to_owned();
            self.publish(&mut state);
        }
    }

    /// Replace the `ERLMCP_FEATURE_FLAGS` overrides (runtime overrides stay).
    pub fn set_env_overrides(&self, overrides: EnvOverrides) {
        let mut state = self.lock();
        let before: Vec<(String, Option<bool>)> = state
            .config
            .iter()
            .map(|(n, _)| (n.to_owned(), state.overrides.lookup(n).map(|o| o.enabled)))
            .collect();
        state.overrides.env = overrides;
        self.audit(&state, "env", None, || {
            before
                .iter()
                .filter_map(|(n, b)| override_change(n, *b, state.overrides.lookup(n).map(|o| o.enabled)))
                .collect()
        });
        self.publish(&mut state);
    }

    /// Name -> effective `enabled` (see [`Snapshot::get_all`]).
    pub fn get_all(&self) -> BTreeMap<String, bool> {
        self.current.load().get_all()
    }

    /// Each flag's config, override and counters.
    pub fn all_details(&self) -> Vec<FlagDetails> {
        self.current.load().all_details()
    }

    /// Evaluate `flag` for `ctx` with OpenFeature-style details: value,
    /// variant, reason, error code, flag metadata (see
    /// [`EvaluationDetails`]). Counted like [`Engine::evaluate`].
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::flags::{Engine, ErrorCode, FlagsConfig, MapContext, ResolutionReason};
    /// let engine = Engine::builder().build(FlagsConfig::from_json(br##"{"banner": {"enabled": true,
    ///     "variants": {"blue": {"value": "#00f", "weight": 1}, "green": {"value": "#0f0", "weight": 1}}}}"##)?);
    /// let d = engine.details("banner", &MapContext::new().binary("session_id", "s-1"));
    /// assert_eq!(d.reason, ResolutionReason::Split);
    /// assert!(matches!(d.variant.as_deref(), Some("blue" | "green")));
    /// assert_eq!(engine.details("nope", &()).error_code, Some(ErrorCode::FlagNotFound));
    /// # Ok::<(), erlmcp_rollout::flags::ConfigError>(())
    /// ```
    pub fn details<C: Context>(&self, flag: &str, ctx: &C) -> EvaluationDetails {
        self.current.load().details(flag, ctx)
    }

    /// Replace the config. Overrides and custom predicates carry over.
    pub fn reload(&self, config: FlagsConfig) -> ReloadOutcome {
        self.reload_from(config, Fingerprint::Set(None), "reload", None)
    }

    /// [`Engine::reload`], recording `source` and `actor` (default: the
    /// audit log's) in the audit trail when it is on.
    pub fn reload_by(&self, config: FlagsConfig, source: &str, actor: Option<&str>) -> ReloadOutcome {
        self.reload_from(config, Fingerprint::Set(None), source, actor)
    }

    fn reload_from(
        &self,
        config: FlagsConfig,
        fingerprint: Fingerprint,
        source: &str,
        actor: Option<&str>,
    ) -> ReloadOutcome {
        let mut state = self.lock();
        self.install(&mut state, config, fingerprint, source, actor)
    }

    /// Swap `config` in; call with the state lock held.
    fn install(
        &self,
        state: &mut State,
        config: FlagsConfig,
        fingerprint: Fingerprint,
        source: &str,
        actor: Option<&str>,
    ) -> ReloadOutcome {
        let config = Arc::new(config);
        self.audit(state, source, actor, || audit_diff(&state.config, &config));
        state.config = config;
        if let Fingerprint::Set(fp) = fingerprint {
            state.fingerprint = fp;
        }
        self.publish(state);
        self.reloads.fetch_add(1, Ordering::Relaxed);
        ReloadOutcome {
            changed: true,
            flags: state.config.len(),
            generation: state.generation,
        }
    }

    /// Record changes in the audit trail, when it is on (a failed write is
    /// counted in [`Engine::audit_failures`]; the change still applies: a
    /// kill switch must not depend on a disk).
    fn audit(&self, state: &State, source: &str, actor: Option<&str>, changes: impl FnOnce() -> Vec<FlagChange>) {
        if let Some(log) = &state.audit {
            if log.record(SystemClock.now_unix_ms(), actor, source, changes()).is_err() {
                self.audit_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Turn the audit trail on (`Some`) or off (`None`).
    pub fn set_audit_log(&self, log: Option<AuditLog>) {
        self.lock().audit = log.map(Arc::new);
    }

    /// Audit lines that could not be written or synced.
    pub fn audit_failures(&self) -> u64 {
        self.audit_failures.load(Ordering::Relaxed)
    }

    /// Parse and validate `json`, then swap it in.
    ///
    /// # Errors
    /// Every problem in the config; the previous snapshot keeps serving.
    pub fn reload_json(&self, json: &[u8]) -> Result<ReloadOutcome, ConfigError> {
        self.load_json(json, Fingerprint::Set(None), "json", None)
    }

    /// Parse `json` and swap it in; a config that does not parse is a counted
    /// failure and changes nothing.
    fn load_json(
        &self,
        json: &[u8],
        fingerprint: Fingerprint,
        source: &str,
        actor: Option<&str>,
    ) -> Result<ReloadOutcome, ConfigError> {
        match FlagsConfig::from_json(json) {
            Ok(config) => Ok(self.reload_from(config, fingerprint, source, actor)),
            Err(e) => {
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Read `path` and reload it, unless its content equals what was last
    /// loaded from a file (then nothing is swapped and `changed` is false).
    ///
    /// # Errors
    /// The file is unreadable or invalid; the previous snapshot keeps serving.
    pub fn reload_file(&self, path: impl AsRef<Path>) -> Result<ReloadOutcome, ConfigError> {
        self.reload_path(path.as_ref(), true)
    }

    fn reload_path(&self, path: &Path, only_changed: bool) -> Result<ReloadOutcome, ConfigError> {
        match read(path) {
            Ok(bytes) => self.reload_bytes_if(&bytes, &format!("file:{}", path.display()), only_changed),
            Err(e) => {
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Reload from file content unless it equals what was last loaded from a
    /// file; `source` goes to the audit trail.
    pub(crate) fn reload_bytes(&self, bytes: &[u8], source: &str) -> Result<ReloadOutcome, ConfigError> {
        self.reload_bytes_if(bytes, source, true)
    }

    /// Read `path` and swap it in even when its content is what was last
    /// loaded (erlmcp's `reload_flags/0`: undoes [`Engine::set_erlmcp_flag`]
    /// and [`Engine::import_json`]).
    ///
    /// # Errors
    /// The file is unreadable or invalid; the previous snapshot keeps serving.
    pub fn reload_file_now(&self, path: impl AsRef<Path>) -> Result<ReloadOutcome, ConfigError> {
        self.reload_path(path.as_ref(), false)
    }

    fn reload_bytes_if(&self, bytes: &[u8], source: &str, only_changed: bool) -> Result<ReloadOutcome, ConfigError> {
        let fp = fingerprint(bytes);
        if only_changed {
            let state = self.lock();
            if state.fingerprint == Some(fp) {
                return Ok(ReloadOutcome {
                    changed: false,
                    flags: state.config.len(),
                    generation: state.generation,
                });
            }
        }
        self.load_json(bytes, Fingerprint::Set(Some(fp)), source, None)
    }

    /// erlmcp's `import_flags/1`: parse and validate `json` (either format)
    /// and swap it in until the source changes. Unlike
    /// [`Engine::reload_json`] it keeps the fingerprint of the last file or
    /// etcd value, so that re-reading an unchanged source does not undo it
    /// (in erlmcp a load replaces what an import set; so does a changed file
    /// or key here, or [`Engine::reload_file_now`]).
    ///
    /// # Errors
    /// Every problem in `json`; nothing changes.
    pub fn import_json(&self, json: &[u8], actor: Option<&str>) -> Result<ReloadOutcome, ConfigError> {
        self.load_json(json, Fingerprint::Keep, "import", actor)
    }

    /// erlmcp's `set_flag/3`: add or replace flag `name` from erlmcp's fields
    /// (`value`, `state`, `rollout_percentage`, `rollout_strategy`,
    /// `category`, `conditions`, `description`, `updated_at`; validated as
    /// in an erlmcp file), on top of the config in force. Like
    /// [`Engine::import_json`] it serves until the source changes.
    ///
    /// # Errors
    /// A field is invalid, or the config with this flag is not (a flag that
    /// requires a variant of the replaced one); nothing changes.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::flags::{Engine, FlagsConfig, MapContext};
    /// let engine = Engine::builder().build(FlagsConfig::default());
    /// let fields = serde_json::json!({"value": true, "state": "rollout",
    ///     "rollout_strategy": "percentage", "rollout_percentage": 100});
    /// engine.set_erlmcp_flag("new_ui", fields.as_object().unwrap().clone(), None)?;
    /// assert!(engine.is_enabled("new_ui", &MapContext::new().binary("session_id", "s-1")));
    /// let bad = serde_json::json!({"state": "maybe"});
    /// assert!(engine.set_erlmcp_flag("new_ui", bad.as_object().unwrap().clone(), None).is_err());
    /// # Ok::<(), erlmcp_rollout::flags::ConfigError>(())
    /// ```
    pub fn set_erlmcp_flag(
        &self,
        name: &str,
        fields: serde_json::Map<String, serde_json::Value>,
        actor: Option<&str>,
    ) -> Result<ReloadOutcome, ConfigError> {
        let mut flag = fields;
        flag.insert("name".to_owned(), name.into());
        let doc = serde_json::json!({ "flags": [flag] }).to_string();
        let one = FlagsConfig::from_json(doc.as_bytes())?;
        let spec = one.get(name).cloned().unwrap_or_default();
        let mut state = self.lock();
        let mut merged = (*state.config).clone();
        merged.insert(name.to_owned(), spec);
        // Valid as a whole: the same strict pass a file gets.
        let merged = FlagsConfig::from_json(merged.to_json_pretty().as_bytes())?;
        Ok(self.install(&mut state, merged, Fingerprint::Keep, "set_flag", actor))
    }

    /// Set (`Some`) or clear (`None`) the runtime override of `name`,
    /// recording `actor` (default: the audit log's) in the audit trail.
    pub fn set_override_by(&self, name: &str, value: Option<bool>, actor: Option<&str>) {
        let mut state = self.lock();
        let before = state.overrides.lookup(name).map(|o| o.enabled);
        let changed = match value {
            Some(v) => state.overrides.runtime.insert(name.to_owned(), v) != Some(v),
            None => state.overrides.runtime.remove(name).is_some(),
        };
        if changed {
            let after = state.overrides.lookup(name).map(|o| o.enabled);
            self.audit(&state, "override", actor, || {
                override_change(name, before, after).into_iter().collect()
            });
            self.publish(&mut state);
        }
    }

    fn set_override(&self, name: &str, value: Option<bool>) {
        self.set_override_by(name, value, None);
    }

    /// Force `name` on (replaces its `enabled`) until [`Engine::clear`];
    /// survives reloads. A name not in the config is remembered and applies
    /// once a reload brings the flag.
    pub fn enable(&self, name: &str) {
        self.set_override(name, Some(true));
    }

    /// Force `name` off until [`Engine::clear`]; survives reloads.
    pub fn disable(&self, name: &str) {
        self.set_override(name, Some(false));
    }

    /// Remove the runtime override of `name` (the environment variable's, if
    /// any, applies again).
    pub fn clear(&self, name: &str) {
        self.set_override(name, None);
    }

    /// Register (or replace) the predicate behind `{"custom": name}`.
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use erlmcp_rollout::flags::{Context, Engine, FlagsConfig, MapContext, Value};
    /// let engine = Engine::builder().build(FlagsConfig::from_json(
    ///     br#"{"beta": {"enabled": true, "conditions": [{"custom": "staff"}]}}"#)?);
    /// assert!(!engine.is_enabled("beta", &()));   // unregistered: false
    /// engine.register_condition("staff", Arc::new(|ctx: &dyn Context| {
    ///     matches!(ctx.get("email"), Some(Value::Binary(e)) if e.ends_with(b"@example.com"))
    /// }));
    /// assert!(engine.is_enabled("beta", &MapContext::new().binary("email", "ann@example.com")));
    /// # Ok::<(), erlmcp_rollout::flags::ConfigError>(())
    /// ```
    pub fn register_condition(&self, name: &str, predicate: CustomPredicate) {
        let mut state = self.lock();
        state.customs.insert(name.to_owned(), predicate);
        self.publish(&mut state);
    }

    /// Remove a custom predicate; conditions naming it evaluate to false again.
    pub fn unregister_condition(&self, name: &str) {
        let mut state = self.lock();
        if state.customs.remove(name).is_some() {
            self.publish(&mut state);
        }
    }

    /// Evaluation counters and reload counts.
    pub fn metrics(&self) -> Metrics {
        let state = self.lock();
        Metrics {
            flags: state.counters.iter().map(|(k, c)| (k.clone(), c.read())).collect(),
            unknown_flag_evaluations: self.unknown.read().false_count,
            reloads: self.reloads.load(Ordering::Relaxed),
            reload_failures: self.reload_failures.load(Ordering::Relaxed),
        }
    }

    /// The counts of one flag.
    pub fn counts(&self, name: &str) -> Counts {
        self.lock().counters.get(name).map(|c| c.read()).unwrap_or_default()
    }

    /// Watch a config file: check its metadata every `options.check_interval`
    /// and reload at once when it changed, and re-read it every
    /// `options.poll_interval` regardless (reloading only if the content
    /// changed). Failed reloads keep the last good snapshot and are reported
    /// through [`FileWatcher::status`] and `options.on_event`.
    ///
    /// The watcher thread stops when the returned handle is dropped.
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn watch_file(
        self: &Arc<Self>,
        path: impl Into<PathBuf>,
        options: WatchOptions,
    ) -> std::io::Result<FileWatcher> {
        let path = path.into();
        let status = Arc::new(Mutex::new(WatchStatus::default()));
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let engine = Arc::clone(self);
        let thread_status = Arc::clone(&status);
        let handle = std::thread::Builder::new()
            .name("erlmcp-flags-watch".into())
            .spawn(move || watch_loop(&engine, &path, &options, &stop_rx, &thread_status))?;
        Ok(FileWatcher {
            stop: Some(stop_tx),
            handle: Some(handle),
            status,
        })
    }
}

/// Why an engine could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The config is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `ERLMCP_FEATURE_FLAGS` is malformed.
    #[error(transparent)]
    EnvOverrides(#[from] super::overrides::EnvOverrideError),
}

fn read(path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// What a reload does to the fingerprint of the last source content.
enum Fingerprint {
    /// Replace it (`None`: the config came from no file or key).
    Set(Option<u64>),
    /// Keep it: the change layers over the source until the source changes.
    Keep,
}

fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Called by a watcher after a reload attempt.
pub type WatchCallback = Box<dyn Fn(&WatchEvent) + Send>;

/// How a [`FileWatcher`] polls.
pub struct WatchOptions {
    /// Full re-read interval (default 60 s, as in the reference).
    pub poll_interval: Duration,
    /// Metadata (size, mtime, inode) check interval (default 1 s).
    pub check_interval: Duration,
    /// Called after every reload attempt that changed something or failed.
    pub on_event: Option<WatchCallback>,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            poll_interval: Duration::from_secs(60),
            check_interval: Duration::from_secs(1),
            on_event: None,
        }
    }
}

/// A reload attempt by a watcher.
#[derive(Debug)]
pub enum WatchEvent {
    /// A new snapshot serves.
    Reloaded(ReloadOutcome),
    /// The file is bad; the previous snapshot keeps serving.
    Failed(ConfigError),
}

/// What a watcher has done so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WatchStatus {
    /// Reloads that swapped a new snapshot in.
    pub reloads: u64,
    /// Failed attempts.
    pub failures: u64,
    /// Every problem of the last failed attempt, cleared by the next success.
    pub last_error: Option<Vec<super::config::Problem>>,
}

/// A running file watcher; dropping it stops the thread.
pub struct FileWatcher {
    stop: Option<mpsc::Sender<()>>,
    handle: Option<JoinHandle<()>>,
    status: Arc<Mutex<WatchStatus>>,
}

impl FileWatcher {
    /// Reloads and failures so far.
    pub fn status(&self) -> WatchStatus {
        self.status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

impl Drop for FileWatcher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[derive(PartialEq, Eq, Clone, Copy)]
struct FileStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    #[cfg(unix)]
    inode: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        len: m.len(),
        modified: m.modified().ok(),
        #[cfg(unix)]
        inode: std::os::unix::fs::MetadataExt::ino(&m),
    })
}

/// How long after a modification the watcher compares content, not only metadata.
const RACY_WINDOW: Duration = Duration::from_secs(2);

fn watch_loop(
    engine: &Engine,
    path: &Path,
    options: &WatchOptions,
    stop: &mpsc::Receiver<()>,
    status: &Mutex<WatchStatus>,
) {
    let mut last_stamp = stamp(path);
    let mut last_full = Instant::now();
    let mut last_attempt: Option<Result<u64, std::io::ErrorKind>> = None;
    let tick = options
        .check_interval
        .min(options.poll_interval)
        .max(Duration::from_millis(10));
    loop {
        match stop.recv_timeout(tick) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
        let now_stamp = stamp(path);
        let due = last_full.elapsed() >= options.poll_interval;
        // A rewrite within the filesystem's timestamp granularity can keep
        // size, mtime and inode: while the mtime is recent, compare content
        // too (reload_file is a no-op when the content is unchanged).
        let racy = now_stamp.and_then(|s| s.modified).is_some_and(|m| {
            std::time::SystemTime::now()
                .duration_since(m)
                .map_or(true, |age| age < RACY_WINDOW)
        });
        if now_stamp == last_stamp && !due && !racy {
            continue;
        }
        last_stamp = now_stamp;
        last_full = Instant::now();
        // Each distinct content (or read error) is tried and reported once.
        let attempt = match read(path) {
            Ok(bytes) => {
                let fp = fingerprint(&bytes);
                (last_attempt != Some(Ok(fp)))
                    .then(|| (Ok(fp), engine.reload_bytes(&bytes, &format!("file:{}", path.display()))))
            }
            Err(e) => {
                let kind = match &e {
                    ConfigError::Io { source, .. } => source.kind(),
                    _ => std::io::ErrorKind::Other,
                };
                (last_attempt != Some(Err(kind))).then(|| {
                    engine.reload_failures.fetch_add(1, Ordering::Relaxed);
                    (Err(kind), Err(e))
                })
            }
        };
        let Some((key, result)) = attempt else { continue };
        last_attempt = Some(key);
        let event = match result {
            Ok(outcome) if !outcome.changed => continue,
            Ok(outcome) => WatchEvent::Reloaded(outcome),
            Err(e) => WatchEvent::Failed(e),
        };
        if let Ok(mut s) = status.lock() {
            match &event {
                WatchEvent::Reloaded(_) => {
                    s.reloads += 1;
                    s.last_error = None;
                }
                WatchEvent::Failed(e) => {
                    s.failures += 1;
                    s.last_error = Some(e.problems());
                }
            }
        }
        if let Some(cb) = &options.on_event {
            cb(&event);
        }
    }
}
