//! A node's dual-write migration as a host runs it: the [`Migrator`] between two stores,
//! its relay thread and (with the phase in etcd) its phase watcher, shared by every
//! open that names the same state directory.
//!
//! A host that opens the hybrid store many times over (the Erlang NIF: every
//! `erlmcp_session_backend_hybrid:init/1`) keeps one [`HybridRegistry`] next to its
//! [`StoreRegistry`]. Invariants:
//! - One migrator per state directory in the process: the outbox (a redb file) and the
//!   phase file live there, and two migrators would relay and advance independently.
//! - The two sides are different stores: one store on both sides would copy every write
//!   onto itself and verify it against itself.
//! - The relay and the phase watcher run while some holder keeps the [`Hybrid`]; the
//!   last drop stops them (after a relay batch or a sync in progress).
//!
//! # Examples
//! ```
//! use std::sync::Arc;
//! use erlmcp_rollout::migrate::hybrid::{HybridOptions, HybridRegistry};
//! use erlmcp_rollout::migrate::phase::Phase;
//! use erlmcp_rollout::session::shared::{StoreKey, StoreRegistry};
//! use erlmcp_rollout::session::SystemClock;
//! let dir = std::env::temp_dir().join(format!("hybrid-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let clock = Arc::new(SystemClock);
//! let (stores, hybrids) = (StoreRegistry::new(clock.clone()), HybridRegistry::new(clock));
//! let h = hybrids.open(&stores, &StoreKey::memory("old"), &StoreKey::memory("new"), HybridOptions::new(&dir))?;
//! assert_eq!(h.migrator().phase(), Phase::Off);
//! assert!(!h.blocking());
//! # drop(h); std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use super::dual::{Migrator, MigratorConfig, RelayHandle};
#[cfg(feature = "etcd")]
use super::etcd_phase::{EtcdPhaseStore, PhaseWatchOptions, PhaseWatchStatus, PhaseWatcher};
use super::outbox::Outbox;
use super::phase::{FilePhaseStore, Phase, PhaseStore};
use super::MigrateError;
use crate::etcd::EtcdSecurity;
use crate::session::shared::{open_while_closing, OpenError, ShareOptions, StoreKey, StoreRegistry};
use crate::session::{Clock, Store, TouchPolicy};

/// How long each gated step of [`HybridOptions::step_to`] may wait for the outbox to drain.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The phase kept cluster-wide in etcd rather than in the state directory's file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseEtcd {
    /// The members (`HOST:PORT` or URLs).
    pub endpoints: Vec<String>,
    /// Key prefix of the phase and the acknowledgements.
    pub prefix: String,
    /// This node's id (its acknowledgement key).
    pub node: String,
    /// Nodes that must acknowledge a phase before an advance from it; empty: no gate.
    pub expect_nodes: Vec<String>,
    /// TLS and user.
    pub security: EtcdSecurity,
}

/// How [`HybridRegistry::open`] opens a node's migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HybridOptions {
    /// Holds `outbox.redb` and (without [`HybridOptions::phase_etcd`]) `phase.json`; must exist.
    pub state_dir: PathBuf,
    /// Which touches the sides write; `None`: each side's default
    /// ([`StoreKey::default_touch`]), as a plain open of that store would have.
    pub touch: Option<TouchPolicy>,
    /// Tombstone retention of the sides (ms); `None` for the default.
    pub tombstone_retention_ms: Option<u64>,
    /// Shadow-read sampling (one in N); `None` for [`MigratorConfig`]'s default.
    pub shadow_sample: Option<u64>,
    /// The phase to be in after opening, reached one gated step at a time from the saved one.
    pub step_to: Option<Phase>,
    /// The phase in etcd (feature `etcd`).
    pub phase_etcd: Option<PhaseEtcd>,
}

impl HybridOptions {
    /// Defaults with `state_dir`.
    pub fn new(state_dir: impl AsRef<Path>) -> HybridOptions {
        HybridOptions {
            state_dir: state_dir.as_ref().to_path_buf(),
            touch: None,
            tombstone_retention_ms: None,
            shadow_sample: None,
            step_to: None,
            phase_etcd: None,
        }
    }
}

/// Why [`HybridRegistry::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum HybridOpenError {
    /// An unusable option (the state directory).
    #[error("{0}")]
    BadOption(String),
    /// A side could not be opened, or both sides are one store.
    #[error(transparent)]
    Side(#[from] OpenError),
    /// The outbox, the phase store, the watcher or a step refused.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
}

/// A node's running migration; see the [module documentation](self).
pub struct Hybrid {
    migrator: Arc<Migrator>,
    _relay: RelayHandle,
    #[cfg(feature = "etcd")]
    phase_watcher: Option<PhaseWatcher>,
    blocking: bool,
}

impl Hybrid {
    /// The migrator (the [`Store`] that routes by phase).
    pub fn migrator(&self) -> &Arc<Migrator> {
        &self.migrator
    }

    /// Whether either side may wait for I/O.
    pub fn blocking(&self) -> bool {
        self.blocking
    }

    /// The etcd phase watcher's state, when the phase is in etcd.
    #[cfg(feature = "etcd")]
    pub fn phase_watch(&self) -> Option<PhaseWatchStatus> {
        self.phase_watcher.as_ref().map(PhaseWatcher::status)
    }
}

/// The migrations open in this process, by canonical state directory.
pub struct HybridRegistry {
    clock: Arc<dyn Clock>,
    by_dir: Mutex<HashMap<PathBuf, Weak<Hybrid>>>,
}

impl HybridRegistry {
    /// An empty registry whose migrators read "now" from `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> HybridRegistry {
        HybridRegistry {
            clock,
            by_dir: Mutex::new(HashMap::new()),
        }
    }

    /// Opens both sides through `stores` (as migration sides: they keep tombstones) and
    /// the migration of `options.state_dir`, or joins the one open there; then steps to
    /// [`HybridOptions::step_to`] if given.
    ///
    /// # Errors
    /// [`HybridOpenError::BadOption`] for a state directory that does not exist;
    /// [`HybridOpenError::Side`] when a side cannot be opened or both are one store;
    /// [`HybridOpenError::Migrate`] from the outbox, the phase store, the watcher, or a
    /// gate that refuses a step (the migration stays open and in the phase it reached).
    pub fn open(
        &self,
        stores: &StoreRegistry,
        primary: &StoreKey,
        secondary: &StoreKey,
        options: HybridOptions,
    ) -> Result<Arc<Hybrid>, HybridOpenError> {
        let dir = options
            .state_dir
            .canonicalize()
            .map_err(|e| HybridOpenError::BadOption(format!("state_dir {}: {e}", options.state_dir.display())))?;
        #[cfg(not(feature = "etcd"))]
        if options.phase_etcd.is_some() {
            return Err(HybridOpenError::BadOption(
                "phase_etcd: this build does not include etcd (cargo feature `etcd`)".into(),
            ));
        }
        if primary == secondary {
            return Err(OpenError::Mismatch(format!(
                "primary and secondary are the same store ({primary:?}); two memory sides need distinct names: \
                 {{memory, Name1}} and {{memory, Name2}}"
            ))
            .into());
        }
        let share = ShareOptions {
            touch: options.touch,
            tombstone_retention_ms: options.tombstone_retention_ms,
            migration: true,
        };
        let p = stores.open(primary, share)?;
        let s = stores.open(secondary, share)?;
        let blocking = primary.blocking() || secondary.blocking();
        let hybrid = {
            let mut by_dir = self.by_dir.lock().unwrap_or_else(PoisonError::into_inner);
            // The previous migration of this directory may still be closing on another
            // thread (its last handle was just dropped) and hold the outbox.
            let closing = by_dir.get(&dir).is_some_and(|w| w.strong_count() == 0);
            by_dir.retain(|_, w| w.strong_count() > 0);
            match by_dir.get(&dir).and_then(Weak::upgrade) {
                Some(h) => h,
                None => {
                    let h = Arc::new(self.start(p, s, &dir, &options, blocking, closing)?);
                    by_dir.insert(dir, Arc::downgrade(&h));
                    h
                }
            }
        };
        if let Some(want) = options.step_to {
            hybrid.migrator.step_to(want, STEP_TIMEOUT)?;
        }
        Ok(hybrid)
    }

    fn start(
        &self,
        primary: Arc<dyn Store>,
        secondary: Arc<dyn Store>,
        dir: &Path,
        options: &HybridOptions,
        blocking: bool,
        closing: bool,
    ) -> Result<Hybrid, MigrateError> {
        let mut config = MigratorConfig {
            touch: options.touch.unwrap_or_default(),
            clock: Arc::clone(&self.clock),
            ..MigratorConfig::default()
        };
        if let Some(n) = options.shadow_sample {
            config.shadow_sample = n;
        }
        #[cfg(feature = "etcd")]
        let etcd_phases = match &options.phase_etcd {
            Some(p) => {
                let store = EtcdPhaseStore::connect(
                    &p.endpoints,
                    p.prefix.clone(),
                    p.node.clone(),
                    crate::etcd::EtcdOptions {
                        security: p.security.clone(),
                        ..crate::etcd::EtcdOptions::default()
                    },
                )?;
                if !p.expect_nodes.is_empty() {
                    config.advance_gate = Some(store.ack_gate(p.expect_nodes.clone()));
                }
                Some(store)
            }
            None => None,
        };
        #[cfg(feature = "etcd")]
        let phases: Box<dyn PhaseStore> = match &etcd_phases {
            Some(store) => Box::new(store.clone()),
            None => Box::new(FilePhaseStore::new(dir.join("phase.json"))),
        };
        #[cfg(not(feature = "etcd"))]
        let phases: Box<dyn PhaseStore> = Box::new(FilePhaseStore::new(dir.join("phase.json")));
        // Any failure may be the closing instance's lock; after the wait, the real one.
        let outbox = open_while_closing(closing, || Outbox::open(dir.join("outbox.redb")), |_| true)?;
        let migrator = Arc::new(Migrator::open(primary, secondary, outbox, phases, config)?);
        let relay = migrator.start_relay();
        #[cfg(feature = "etcd")]
        let phase_watcher = match etcd_phases {
            Some(store) => Some(store.watch(Arc::clone(&migrator), PhaseWatchOptions::default())?),
            None => None,
        };
        Ok(Hybrid {
            migrator,
            _relay: relay,
            #[cfg(feature = "etcd")]
            phase_watcher,
            blocking,
        })
    }
}
