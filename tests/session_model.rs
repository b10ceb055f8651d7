//! Model-based property test of every `Store` backend against a `BTreeMap` model.

#[path = "session_support/model.rs"]
mod model;

use erlmcp_rollout::session::{MemoryStore, StoreOptions};

store_model!(memory, MemoryStore::new);
store_model!(memory_four_shards, |opts: StoreOptions| MemoryStore::with_shards(
    opts, 4
));
store_model!(memory_one_shard, |opts: StoreOptions| MemoryStore::with_shards(opts, 1));

/// A store in a fresh file; the directory is removed at once and the open file lives on
/// (Linux) until the store is dropped.
#[cfg(feature = "disk")]
fn disk_store(opts: StoreOptions) -> erlmcp_rollout::session::DiskStore {
    let dir = tempfile::tempdir().unwrap();
    erlmcp_rollout::session::DiskStore::create(dir.path().join("sessions.redb"), opts).unwrap()
}

#[cfg(feature = "disk")]
store_model!(disk, disk_store, cases = 256);
