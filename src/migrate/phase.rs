//! Migration phases (DESIGN §5), the moves between them, and where the current phase is
//! kept.
//!
//! | phase | writes | reads |
//! |---|---|---|
//! | `off` | primary | primary |
//! | `phase1` | primary (acknowledged) + secondary through the outbox | primary; sampled shadow reads of the secondary |
//! | `phase2` | as `phase1` | secondary, falling back to the primary |
//! | `phase3` | secondary (+ the primary through a reverse outbox, if enabled) | secondary |
//! | `cleanup` | secondary | secondary; the primary may be removed |
//!
//! Forward moves go one step at a time and pass gates (outbox drained, verification
//! clean; checked by [`super::dual::Migrator::advance`]). Going back one step is a
//! rollback: `phase1 -> off` and `phase2 -> phase1` are always allowed; `phase3 -> phase2`
//! only when the reverse outbox kept the primary up to date; nothing leaves `cleanup`.
//!
//! # Examples
//! ```
//! use erlmcp_rollout::migrate::phase::Phase;
//! assert_eq!("phase2".parse::<Phase>()?, Phase::Phase2);
//! assert_eq!(Phase::Phase1.next(), Some(Phase::Phase2));
//! assert_eq!(Phase::Phase2.previous(), Some(Phase::Phase1));
//! assert_eq!(Phase::Cleanup.previous(), None);
//! # Ok::<(), String>(())
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::durable::{read_optional, write_atomic};
use super::MigrateError;

/// A migration phase; see the [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// No migration: the primary only.
    #[default]
    Off,
    /// Dual-write; reads from the primary with shadow reads.
    Phase1,
    /// Dual-write; reads from the secondary with fallback.
    Phase2,
    /// The secondary only (+ optional reverse outbox).
    Phase3,
    /// Done: the secondary only; the primary may be removed.
    Cleanup,
}

impl Phase {
    /// Every phase in order.
    pub const ALL: [Phase; 5] = [Phase::Off, Phase::Phase1, Phase::Phase2, Phase::Phase3, Phase::Cleanup];

    /// The phase's name (`off`, `phase1`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Off => "off",
            Phase::Phase1 => "phase1",
            Phase::Phase2 => "phase2",
            Phase::Phase3 => "phase3",
            Phase::Cleanup => "cleanup",
        }
    }

    /// The next phase forward.
    pub fn next(self) -> Option<Phase> {
        match self {
            Phase::Off => Some(Phase::Phase1),
            Phase::Phase1 => Some(Phase::Phase2),
            Phase::Phase2 => Some(Phase::Phase3),
            Phase::Phase3 => Some(Phase::Cleanup),
            Phase::Cleanup => None,
        }
    }

    /// The phase a rollback goes to (`None` from `off` and `cleanup`).
    pub fn previous(self) -> Option<Phase> {
        match self {
            Phase::Off | Phase::Cleanup => None,
            Phase::Phase1 => Some(Phase::Off),
            Phase::Phase2 => Some(Phase::Phase1),
            Phase::Phase3 => Some(Phase::Phase2),
        }
    }

    /// Whether writes go to the primary and, through the outbox, to the secondary.
    pub fn dual_writes(self) -> bool {
        matches!(self, Phase::Phase1 | Phase::Phase2)
    }

    /// Whether the secondary is the store of record (writes and reads go there).
    pub fn secondary_is_authoritative(self) -> bool {
        matches!(self, Phase::Phase3 | Phase::Cleanup)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Phase {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Phase::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown phase {s:?}; expected off, phase1, phase2, phase3 or cleanup"))
    }
}

/// Why a phase change was refused. Nothing changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(tag = "gate", rename_all = "snake_case")]
pub enum GateRefusal {
    /// The outbox still holds intents not yet applied to the other store.
    #[error("cannot move from {from} to {to}: the outbox still holds {depth} intent(s); drain it first")]
    OutboxNotDrained {
        /// The current phase.
        from: Phase,
        /// The requested phase.
        to: Phase,
        /// Intents left.
        depth: u64,
    },
    /// Verification found differences between the stores.
    #[error(
        "cannot move from {from} to {to}: verification found {differences} differing key(s){}",
        first.as_ref().map(|k| format!(" (first: {k})")).unwrap_or_default()
    )]
    NotVerified {
        /// The current phase.
        from: Phase,
        /// The requested phase.
        to: Phase,
        /// Differing keys.
        differences: u64,
        /// The first differing key, escaped.
        first: Option<String>,
    },
    /// Some nodes have not applied (acknowledged) the current phase yet, so moving on
    /// could leave them two phases behind (see `EtcdPhaseStore::check_all_acked`).
    #[error("cannot move from {from} to {to}: not every node applies {from} yet ({})", lagging.join(", "))]
    NotAcknowledged {
        /// The current phase.
        from: Phase,
        /// The requested phase.
        to: Phase,
        /// Each lagging node with what it applies (`b: phase1`, `c: no acknowledgement`).
        lagging: Vec<String>,
    },
    /// There is no such move (e.g. skipping a phase, leaving `cleanup`).
    #[error("cannot move from {from} to {to}: {reason}")]
    NotAllowed {
        /// The current phase.
        from: Phase,
        /// The requested phase.
        to: Phase,
        /// Why.
        reason: String,
    },
}

/// One recorded phase change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseChange {
    /// The phase left.
    pub from: Phase,
    /// The phase entered.
    pub to: Phase,
    /// When (ms since the Unix epoch).
    pub at_ms: i64,
    /// `advance`, `rollback` or `set` (a forced change).
    pub how: String,
}

/// The persisted migration state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PhaseState {
    /// Format of the record, `1`.
    pub format: u32,
    /// The current phase.
    pub phase: Phase,
    /// In `phase3`, also copy writes back to the primary (so `phase3 -> phase2` stays safe).
    pub reverse_outbox: bool,
    /// The last changes, oldest first (at most [`PhaseState::HISTORY`]).
    pub history: Vec<PhaseChange>,
}

impl PhaseState {
    /// How many changes the history keeps.
    pub const HISTORY: usize = 50;

    /// A state in `phase`.
    pub fn new(phase: Phase) -> Self {
        PhaseState {
            format: 1,
            phase,
            reverse_outbox: false,
            history: Vec::new(),
        }
    }

    /// Records a change to `to` (and moves there).
    pub fn record(&mut self, to: Phase, at_ms: i64, how: &str) {
        self.history.push(PhaseChange {
            from: self.phase,
            to,
            at_ms,
            how: how.to_owned(),
        });
        if self.history.len() > Self::HISTORY {
            let extra = self.history.len() - Self::HISTORY;
            self.history.drain(..extra);
        }
        self.phase = to;
    }

    /// Whether going from the current phase to `to` is a rollback that is allowed,
    /// or a one-step advance (which still has to pass the gates). Returns `true` for an
    /// advance, `false` for a rollback.
    ///
    /// # Errors
    /// [`GateRefusal::NotAllowed`] for any other move.
    pub fn check_move(&self, to: Phase) -> Result<bool, GateRefusal> {
        let from = self.phase;
        let refuse = |reason: &str| GateRefusal::NotAllowed {
            from,
            to,
            reason: reason.to_owned(),
        };
        if from.next() == Some(to) {
            return Ok(true);
        }
        if from.previous() == Some(to) {
            if from == Phase::Phase3 && !self.reverse_outbox {
                return Err(refuse(
                    "phase3 wrote only to the secondary (no reverse outbox), so the primary lacks those writes",
                ));
            }
            return Ok(false);
        }
        if from == to {
            return Err(refuse("already there"));
        }
        if from == Phase::Cleanup {
            return Err(refuse("cleanup is final"));
        }
        Err(refuse("phases move one step at a time"))
    }
}

/// Where the migration state is persisted. Implementations: [`FilePhaseStore`] and, with
/// feature `etcd`, `EtcdPhaseStore` (cluster-wide, guarded saves).
pub trait PhaseStore: Send + Sync {
    /// The stored state; `Ok(None)` when none has been saved.
    ///
    /// # Errors
    /// [`MigrateError::File`] (or the backend's error) when it cannot be read.
    fn load(&self) -> Result<Option<PhaseState>, MigrateError>;

    /// Saves the state durably before returning.
    ///
    /// # Errors
    /// [`MigrateError::File`] (or the backend's error, e.g. `Unavailable`) when it cannot be
    /// written; the previous state is then intact. A backend that guards saves returns
    /// [`MigrateError::Conflict`] when someone else saved since this process last loaded.
    fn save(&self, state: &PhaseState) -> Result<(), MigrateError>;
}

/// The state in a JSON file, replaced atomically and durably on each save.
///
/// # Examples
/// ```
/// use erlmcp_rollout::migrate::phase::{FilePhaseStore, Phase, PhaseState, PhaseStore};
/// let dir = tempfile::tempdir()?;
/// let store = FilePhaseStore::new(dir.path().join("phase.json"));
/// assert_eq!(store.load()?, None);
/// store.save(&PhaseState::new(Phase::Phase1))?;
/// assert_eq!(store.load()?.map(|s| s.phase), Some(Phase::Phase1));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct FilePhaseStore {
    path: PathBuf,
}

impl FilePhaseStore {
    /// A store in `path` (created on the first save).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FilePhaseStore { path: path.into() }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl PhaseStore for FilePhaseStore {
    fn load(&self) -> Result<Option<PhaseState>, MigrateError> {
        let what = "phase file";
        let Some(bytes) = read_optional(&self.path).map_err(|e| MigrateError::file(what, &self.path, e))? else {
            return Ok(None);
        };
        let state: PhaseState = serde_json::from_slice(&bytes).map_err(|e| MigrateError::file(what, &self.path, e))?;
        if state.format != 1 {
            return Err(MigrateError::file(
                what,
                &self.path,
                format!("unknown format {}", state.format),
            ));
        }
        Ok(Some(state))
    }

    fn save(&self, state: &PhaseState) -> Result<(), MigrateError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| MigrateError::file("phase file", &self.path, e))?;
        write_atomic(&self.path, &bytes).map_err(|e| MigrateError::file("phase file", &self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves() {
        let mut s = PhaseState::new(Phase::Off);
        assert_eq!(s.check_move(Phase::Phase1), Ok(true));
        assert!(s.check_move(Phase::Phase2).is_err());
        s.phase = Phase::Phase2;
        assert_eq!(s.check_move(Phase::Phase1), Ok(false));
        s.phase = Phase::Phase3;
        assert!(s
            .check_move(Phase::Phase2)
            .unwrap_err()
            .to_string()
            .contains("reverse outbox"));
        s.reverse_outbox = true;
        assert_eq!(s.check_move(Phase::Phase2), Ok(false));
        s.phase = Phase::Cleanup;
        assert!(s.check_move(Phase::Phase3).unwrap_err().to_string().contains("final"));
        assert!(s
            .check_move(Phase::Cleanup)
            .unwrap_err()
            .to_string()
            .contains("already"));
    }
}
