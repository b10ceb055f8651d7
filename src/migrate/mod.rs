//! Online migration between session stores (DESIGN §5), written once against the
//! [`Store`](crate::session::Store) trait so it works for every backend.
//!
//! - [`backfill`]: copy one store into another in key order, in chunks, write-if-newer,
//!   with a durable checkpoint (resumable after a kill), a rate limit and progress.
//! - [`verify`]: compare two stores by counts and content digests per key range
//!   (Merkle-style), list each differing key, and [`verify::repair`] them.
//! - [`phase`]: the migration phases (`off`, `phase1`, `phase2`, `phase3`, `cleanup`),
//!   which moves are allowed, and where the current phase is persisted ([`phase::PhaseStore`]).
//! - `outbox` and `dual` (feature `disk`): the durable outbox of write intents and the
//!   dual-write [`dual::Migrator`], itself a `Store`, with its relay, shadow reads, gates
//!   and counters.
//! - `etcd_phase` (feature `etcd`): the phase kept cluster-wide in etcd (guarded saves,
//!   per-node acknowledgements, a watcher that applies changes on every node).
//! - [`durable`]: small files replaced atomically and durably (checkpoints, phase files).
//!
//! `docs/migration.md` walks through a migration end to end.

pub mod backfill;
#[cfg(feature = "disk")]
pub mod dual;
pub mod durable;
#[cfg(feature = "etcd")]
pub mod etcd_phase;
#[cfg(feature = "disk")]
pub mod hybrid;
#[cfg(feature = "disk")]
pub mod outbox;
pub mod phase;
pub mod verify;

use std::fmt;
use std::path::PathBuf;

use crate::session::StoreError;

/// Which store an error came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The store copied from (backfill, verify).
    Source,
    /// The store copied to (backfill, verify).
    Target,
    /// The old store of a dual-write migration.
    Primary,
    /// The new store of a dual-write migration.
    Secondary,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Source => "source",
            Role::Target => "target",
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        })
    }
}

/// The one error of the migration module.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// A store operation failed.
    #[error("{role} store: {source}")]
    Store {
        /// Which store.
        role: Role,
        /// What it returned.
        #[source]
        source: StoreError,
    },
    /// A checkpoint, phase or outbox file could not be read, written or understood.
    #[error("{what} {}: {reason}", path.display())]
    File {
        /// What the file is (`checkpoint`, `phase file`, `outbox`).
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A phase change was refused; nothing changed.
    #[error(transparent)]
    Gate(#[from] phase::GateRefusal),
    /// The phase store's backend (etcd) did not answer within its timeout or refused the
    /// request. A failed save may or may not have been applied; load again to know.
    #[error("{what} unavailable: {reason}")]
    Unavailable {
        /// What was tried (`etcd phase store at [endpoints]: save key ...`).
        what: String,
        /// The last failure.
        reason: String,
    },
    /// The phase store's TLS settings, credentials or the user's permission on its keys
    /// refused the request (etcd); it was not retried and nothing was written.
    #[error(transparent)]
    Access(#[from] crate::etcd::EtcdAccessError),
    /// A guarded save lost a race: `key` was changed by someone else since this process
    /// last loaded it. Nothing was written; load, decide again, save.
    #[error("{key} was changed by someone else since it was last loaded (now at revision {revision}); nothing was written: load it again and retry")]
    Conflict {
        /// The key (or file) that changed.
        key: String,
        /// Its revision now (0 when it is absent).
        revision: i64,
    },
    /// A stored value (an etcd key) is not what it should be (not valid JSON, unknown format).
    #[error("{key}: {reason}")]
    Unreadable {
        /// The key.
        key: String,
        /// What is wrong with its value.
        reason: String,
    },
    /// Bad arguments (e.g. chunk size 0).
    #[error("invalid migration setting: {0}")]
    Invalid(String),
}

impl MigrateError {
    pub(crate) fn store(role: Role) -> impl FnOnce(StoreError) -> MigrateError {
        move |source| MigrateError::Store { role, source }
    }

    pub(crate) fn file(what: &'static str, path: &std::path::Path, reason: impl fmt::Display) -> MigrateError {
        MigrateError::File {
            what,
            path: path.to_owned(),
            reason: reason.to_string(),
        }
    }
}
