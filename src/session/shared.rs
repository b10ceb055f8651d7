//! Stores shared inside one process: every open of the same store gets the same
//! [`Store`], opened once.
//!
//! A host that opens stores by description, many times over (the Erlang NIF: every
//! `erlmcp_session_native:init/1` names its store), keeps one [`StoreRegistry`]. A
//! [`StoreKey`] says which store is meant: a named memory store, a redb file (by its
//! canonical path, so two spellings of one file are one store) or an etcd cluster's
//! prefix (members sorted, with the TLS and user). Two opens of one key share the store
//! while either holds it; when the last holder drops it, the next open opens it anew.
//!
//! Invariants:
//! - One file, one [`DiskStore`](super::DiskStore) in the process: redb locks its file,
//!   and two instances would not see each other's writes.
//! - A second open must ask for the settings the store has ([`ShareOptions`]), or it is
//!   refused ([`OpenError::Mismatch`]): it would silently get the first one's.
//! - A memory store opened plainly frees deleted sessions at once; a migration side keeps
//!   tombstones (migration relies on them), so a plain memory store never becomes one.
//!
//! # Examples
//! ```
//! use std::sync::Arc;
//! use erlmcp_rollout::session::shared::{ShareOptions, StoreKey, StoreRegistry};
//! use erlmcp_rollout::session::SystemClock;
//! let registry = StoreRegistry::new(Arc::new(SystemClock));
//! let a = registry.open(&StoreKey::memory("cache"), ShareOptions::default())?;
//! let b = registry.open(&StoreKey::memory("cache"), ShareOptions::default())?;
//! assert!(Arc::ptr_eq(&a, &b));
//! # Ok::<(), erlmcp_rollout::session::shared::OpenError>(())
//! ```

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};
#[cfg(feature = "disk")]
use std::time::{Duration, Instant};

use super::uri::{Endpoint, StoreUri};
use super::{Clock, MemoryStore, Store, StoreError, StoreOptions, TouchPolicy};
use crate::etcd::EtcdSecurity;

/// Which store an open means; equal keys are the same store.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum StoreKey {
    /// An in-memory store, by name.
    Memory(String),
    /// A redb file, by its canonical path ([`StoreKey::disk`]).
    Disk(PathBuf),
    /// An etcd cluster's key prefix.
    Etcd {
        /// The members as given (`HOST:PORT`, or a `http://`/`https://` URL), sorted.
        members: Vec<String>,
        /// The key prefix, ending in `/`.
        prefix: Vec<u8>,
        /// TLS and user.
        security: EtcdSecurity,
    },
}

impl fmt::Debug for StoreKey {
    /// Names the store; an etcd key shows whether TLS and a user are set, no file names.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreKey::Memory(name) => write!(f, "memory store {name:?}"),
            StoreKey::Disk(path) => write!(f, "disk store {}", path.display()),
            StoreKey::Etcd {
                members,
                prefix,
                security,
            } => write!(
                f,
                "etcd store {} prefix {:?}{}{}",
                members.join(","),
                String::from_utf8_lossy(prefix),
                if security.tls.is_some() { " (TLS)" } else { "" },
                match &security.auth {
                    Some(a) => format!(" (user {})", a.user),
                    None => String::new(),
                }
            ),
        }
    }
}

impl StoreKey {
    /// A named in-memory store.
    pub fn memory(name: impl Into<String>) -> StoreKey {
        StoreKey::Memory(name.into())
    }

    /// The redb file `path`, made absolute without requiring the file to exist (its
    /// directory must): two spellings of one file give one key.
    ///
    /// # Errors
    /// [`OpenError::BadSpec`] for an empty path, a path without a file name, or a
    /// directory that does not exist.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::session::shared::StoreKey;
    /// let dir = std::env::temp_dir();
    /// assert_eq!(StoreKey::disk(dir.join("a.redb"))?, StoreKey::disk(dir.join(".").join("a.redb"))?);
    /// assert!(StoreKey::disk("/no/such/dir/a.redb").is_err());
    /// # Ok::<(), erlmcp_rollout::session::shared::OpenError>(())
    /// ```
    pub fn disk(path: impl AsRef<Path>) -> Result<StoreKey, OpenError> {
        let path = path.as_ref();
        if path.as_os_str().is_empty() {
            return Err(OpenError::BadSpec("disk store path is empty".into()));
        }
        let name = path
            .file_name()
            .ok_or_else(|| OpenError::BadSpec(format!("disk store path {} has no file name", path.display())))?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let dir = parent
            .canonicalize()
            .map_err(|e| OpenError::BadSpec(format!("disk store directory {}: {e}", parent.display())))?;
        Ok(StoreKey::Disk(dir.join(name)))
    }

    /// An etcd cluster's `prefix` (a `/` is appended when missing, so that `a` never
    /// covers another store's `ab/...`). Each member is `HOST:PORT` in the grammar of
    /// store URIs ([`Endpoint::parse`]), optionally written as a `http://` or `https://`
    /// URL.
    ///
    /// # Errors
    /// [`OpenError::BadSpec`] naming the member that does not parse, or no member.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::etcd::EtcdSecurity;
    /// use erlmcp_rollout::session::shared::StoreKey;
    /// let a = StoreKey::etcd(&["h2:2379", "h1:2379"], b"s".to_vec(), EtcdSecurity::default())?;
    /// let b = StoreKey::etcd(&["h1:2379", "h2:2379"], b"s/".to_vec(), EtcdSecurity::default())?;
    /// assert_eq!(a, b);
    /// let e = StoreKey::etcd(&["h1"], b"s/".to_vec(), EtcdSecurity::default()).unwrap_err();
    /// assert!(e.to_string().contains("no port"), "{e}");
    /// # Ok::<(), erlmcp_rollout::session::shared::OpenError>(())
    /// ```
    pub fn etcd(
        members: &[impl AsRef<str>],
        mut prefix: Vec<u8>,
        security: EtcdSecurity,
    ) -> Result<StoreKey, OpenError> {
        if members.is_empty() {
            return Err(OpenError::BadSpec("etcd store: no endpoint given".into()));
        }
        let mut sorted = Vec::with_capacity(members.len());
        for m in members {
            let m = m.as_ref();
            let bare = m
                .strip_prefix("http://")
                .or_else(|| m.strip_prefix("https://"))
                .unwrap_or(m);
            Endpoint::parse(bare).map_err(|e| OpenError::BadSpec(format!("etcd endpoint {m:?}: {}", e.problem)))?;
            sorted.push(m.to_owned());
        }
        sorted.sort();
        if prefix.last().is_some_and(|b| *b != b'/') {
            prefix.push(b'/');
        }
        Ok(StoreKey::Etcd {
            members: sorted,
            prefix,
            security,
        })
    }

    /// The key of a store URI: `memory:` is the memory store `memory_name`; an `etcd:`
    /// URI without a prefix uses the default prefix.
    ///
    /// # Errors
    /// As [`StoreKey::disk`].
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::etcd::EtcdSecurity;
    /// use erlmcp_rollout::session::{shared::StoreKey, uri::StoreUri};
    /// let key = StoreKey::from_uri(&StoreUri::parse("etcd:h1:2379/app")?, "unused", &EtcdSecurity::default())?;
    /// assert_eq!(key, StoreKey::etcd(&["h1:2379"], b"app/".to_vec(), EtcdSecurity::default())?);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_uri(uri: &StoreUri, memory_name: &str, security: &EtcdSecurity) -> Result<StoreKey, OpenError> {
        match uri {
            StoreUri::Memory => Ok(StoreKey::memory(memory_name)),
            StoreUri::Disk(path) => StoreKey::disk(path),
            StoreUri::Etcd { endpoints, prefix } => {
                let members: Vec<String> = endpoints.iter().map(Endpoint::to_string).collect();
                StoreKey::etcd(
                    &members,
                    super::uri::etcd_prefix(prefix.as_deref()).into_bytes(),
                    security.clone(),
                )
            }
        }
    }

    /// The touch policy a store opened without one gets. A memory store slides its
    /// expiry on every fetch ([`TouchPolicy::always`]), exactly as erlmcp's ETS backend
    /// does: a memory write costs about what the read did, so there is nothing to save.
    /// Disk and etcd stores write a touch only when it moved `last_accessed` by more than
    /// 10 % of the timeout ([`TouchPolicy::default`]): there every written touch is an
    /// fsync or a quorum commit.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::session::shared::StoreKey;
    /// use erlmcp_rollout::session::TouchPolicy;
    /// assert_eq!(StoreKey::memory("m").default_touch(), TouchPolicy::always());
    /// ```
    pub fn default_touch(&self) -> TouchPolicy {
        match self {
            StoreKey::Memory(_) => TouchPolicy::always(),
            _ => TouchPolicy::default(),
        }
    }

    /// Whether calls on this store may wait for I/O (disk, network): a host with
    /// latency-sensitive threads runs them elsewhere.
    pub fn blocking(&self) -> bool {
        !matches!(self, StoreKey::Memory(_))
    }
}

/// The settings that shape an open store; a second open of the store must ask for the same.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShareOptions {
    /// Which touches are written; `None`: the store kind's default
    /// ([`StoreKey::default_touch`]), resolved when the store is opened.
    pub touch: Option<TouchPolicy>,
    /// Tombstone retention (ms); `None` for [`StoreOptions`]' default.
    pub tombstone_retention_ms: Option<u64>,
    /// A side of a migration: keeps tombstones (a plain memory store frees the dead).
    pub migration: bool,
}

impl ShareOptions {
    /// The touch policy these options give the store `key` names.
    fn touch_for(&self, key: &StoreKey) -> TouchPolicy {
        self.touch.unwrap_or_else(|| key.default_touch())
    }
}

/// Why [`StoreRegistry::open`] (or a [`StoreKey`] constructor) failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The store description is unusable (path, endpoint).
    #[error("{0}")]
    BadSpec(String),
    /// The store is open in this process with other settings, or cannot serve as asked.
    #[error("{0}")]
    Mismatch(String),
    /// The backend could not open it.
    #[error(transparent)]
    Store(#[from] StoreError),
}

struct Registered {
    store: Weak<dyn Store>,
    options: ShareOptions,
}

/// The stores open in this process, by [`StoreKey`]; see the [module documentation](self).
pub struct StoreRegistry {
    clock: Arc<dyn Clock>,
    stores: Mutex<HashMap<StoreKey, Registered>>,
}

/// How long an open waits for a closing instance of the same file to let go of it.
#[cfg(feature = "disk")]
const CLOSING_WAIT: Duration = Duration::from_secs(2);

/// Runs `open`; while `closing` (an instance of the same file is being dropped on
/// another thread and may still hold the file's lock), retries the failures `busy`
/// accepts for up to [`CLOSING_WAIT`]. Every registry that reopens a file (stores here,
/// a migration's outbox in `migrate::hybrid`) waits this way.
#[cfg(feature = "disk")]
pub(crate) fn open_while_closing<T, E>(
    closing: bool,
    mut open: impl FnMut() -> Result<T, E>,
    busy: impl Fn(&E) -> bool,
) -> Result<T, E> {
    let deadline = Instant::now() + CLOSING_WAIT;
    loop {
        match open() {
            Err(e) if closing && busy(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            result => return result,
        }
    }
}

impl StoreRegistry {
    /// An empty registry whose stores read "now" from `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> StoreRegistry {
        StoreRegistry {
            clock,
            stores: Mutex::new(HashMap::new()),
        }
    }

    fn store_options(&self, key: &StoreKey, o: ShareOptions) -> StoreOptions {
        let defaults = StoreOptions::default();
        StoreOptions {
            clock: Arc::clone(&self.clock),
            touch: o.touch_for(key),
            tombstone_retention_ms: o.tombstone_retention_ms.unwrap_or(defaults.tombstone_retention_ms),
        }
    }

    /// The open store `key` names, or opens it (creating a disk file if absent).
    ///
    /// A plain open (`migration: false`) shares a migration side as it is. The lock is
    /// held while opening, so concurrent opens of one store open it once. When the
    /// previous instance of a file is still being dropped (its last holder let go a
    /// moment ago), the open waits up to 2 s for the file to be released.
    ///
    /// # Errors
    /// [`OpenError::Mismatch`] when the store is open with other [`ShareOptions`], or is a
    /// plain memory store asked for as a migration side; [`OpenError::Store`] from the
    /// backend ([`StoreError::Unavailable`], [`StoreError::Access`], ...);
    /// [`OpenError::BadSpec`] for a backend this build does not include.
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use erlmcp_rollout::session::shared::{OpenError, ShareOptions, StoreKey, StoreRegistry};
    /// use erlmcp_rollout::session::{SystemClock, TouchPolicy};
    /// let registry = StoreRegistry::new(Arc::new(SystemClock));
    /// let _s = registry.open(&StoreKey::memory("m"), ShareOptions::default())?;
    /// let other = ShareOptions { touch: Some(TouchPolicy::permille(10).unwrap()), ..ShareOptions::default() };
    /// assert!(matches!(registry.open(&StoreKey::memory("m"), other), Err(OpenError::Mismatch(_))));
    /// # Ok::<(), OpenError>(())
    /// ```
    pub fn open(&self, key: &StoreKey, options: ShareOptions) -> Result<Arc<dyn Store>, OpenError> {
        // Compared and kept resolved: "the kind's default" and that default spelled out
        // are the same settings.
        let options = ShareOptions {
            touch: Some(options.touch_for(key)),
            ..options
        };
        let mut stores = self.stores.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = stores.get(key) {
            if let Some(store) = r.store.upgrade() {
                let same = ShareOptions {
                    migration: r.options.migration,
                    ..options
                } == r.options;
                if !same {
                    return Err(OpenError::Mismatch(format!(
                        "{key:?} is already open in this VM with other settings ({:?}); open it with the same options",
                        r.options
                    )));
                }
                if options.migration && !r.options.migration && matches!(key, StoreKey::Memory(_)) {
                    return Err(OpenError::Mismatch(format!(
                        "{key:?} is open in this VM as a plain memory store, which frees deleted sessions \
                         at once (no tombstones): a migration side needs a memory store of its own, \
                         {{memory, OtherName}}"
                    )));
                }
                return Ok(store);
            }
        }
        let closing = stores.contains_key(key);
        stores.retain(|_, r| r.store.strong_count() > 0);
        let store = self.open_new(key, options, closing)?;
        stores.insert(
            key.clone(),
            Registered {
                store: Arc::downgrade(&store),
                options,
            },
        );
        Ok(store)
    }

    #[cfg_attr(not(feature = "disk"), allow(unused_variables))]
    fn open_new(&self, key: &StoreKey, options: ShareOptions, closing: bool) -> Result<Arc<dyn Store>, OpenError> {
        let so = self.store_options(key, options);
        match key {
            StoreKey::Memory(_) if options.migration => Ok(Arc::new(MemoryStore::new(so))),
            StoreKey::Memory(_) => Ok(Arc::new(MemoryStore::without_tombstones(so))),
            #[cfg(feature = "disk")]
            StoreKey::Disk(path) => {
                let store = open_while_closing(
                    closing,
                    || super::DiskStore::create(path, so.clone()),
                    |e| matches!(e, StoreError::Unavailable { .. }),
                )?;
                Ok(Arc::new(store))
            }
            #[cfg(feature = "etcd")]
            StoreKey::Etcd {
                members,
                prefix,
                security,
            } => Ok(Arc::new(super::EtcdStore::connect(
                members,
                prefix.clone(),
                super::EtcdOptions {
                    security: security.clone(),
                    ..super::EtcdOptions::default()
                },
                so,
            )?)),
            #[allow(unreachable_patterns)]
            other => Err(OpenError::BadSpec(format!(
                "{other:?}: this build does not include its backend"
            ))),
        }
    }

    /// How many stores are open now (held by someone).
    pub fn open_count(&self) -> usize {
        let stores = self.stores.lock().unwrap_or_else(PoisonError::into_inner);
        stores.values().filter(|r| r.store.strong_count() > 0).count()
    }
}
