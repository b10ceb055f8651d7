//! What the store last saw of each key (its record and `mod_revision`): the guess a
//! write is guarded on, so a write usually needs no read first. A stale guess only costs
//! the failed guard, which returns the current record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::super::{Session, SessionId};
use super::Inner;

/// Remembered records per cache shard before the shard is cleared.
const KNOWN_PER_SHARD: usize = 4_096;
pub(super) const KNOWN_SHARDS: usize = 16;

/// What the store knows of a key: its record (None when absent), the raw value, and its
/// `mod_revision` (0 when absent).
#[derive(Clone)]
pub(super) struct Stored {
    pub(super) session: Option<Session>,
    pub(super) raw: Option<Arc<[u8]>>,
    pub(super) mod_rev: i64,
    /// Taken from the cache rather than read now: a decision not to write must be confirmed.
    pub(super) guessed: bool,
}

impl Stored {
    pub(super) fn absent(guessed: bool) -> Self {
        Stored {
            session: None,
            raw: None,
            mod_rev: 0,
            guessed,
        }
    }
}

impl Inner {
    fn known_shard(&self, id: &SessionId) -> &Mutex<HashMap<SessionId, Stored>> {
        use std::hash::BuildHasher;
        let h = rustc_hash::FxBuildHasher.hash_one(id);
        &self.known[(h % KNOWN_SHARDS as u64) as usize]
    }

    pub(super) fn remember(&self, id: &SessionId, stored: &Stored) {
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

    pub(super) fn forget(&self, id: &SessionId) {
        let mut map = self.known_shard(id).lock().unwrap_or_else(PoisonError::into_inner);
        map.remove(id);
    }

    /// The remembered record of `id`, or "absent" as a guess.
    pub(super) fn guess(&self, id: &SessionId) -> Stored {
        let map = self.known_shard(id).lock().unwrap_or_else(PoisonError::into_inner);
        map.get(id).cloned().unwrap_or_else(|| Stored::absent(true))
    }
}
