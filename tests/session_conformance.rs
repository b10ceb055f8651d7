//! The `Store` contract, checked for every backend (DESIGN §4.2).

#[path = "session_support/conformance.rs"]
mod conformance;

use erlmcp_rollout::session::{MemoryStore, StoreOptions};

store_conformance!(memory, MemoryStore::new);
store_conformance!(memory_one_shard, |opts: StoreOptions| MemoryStore::with_shards(opts, 1));
store_conformance!(memory_many_shards, |opts: StoreOptions| MemoryStore::with_shards(
    opts, 257
));

/// A store in a fresh file; the directory is removed at once and the open file lives on
/// (Linux) until the store is dropped.
#[cfg(feature = "disk")]
fn disk_store(opts: StoreOptions) -> erlmcp_rollout::session::DiskStore {
    let dir = tempfile::tempdir().unwrap();
    erlmcp_rollout::session::DiskStore::create(dir.path().join("sessions.redb"), opts).unwrap()
}

#[cfg(feature = "disk")]
store_conformance!(disk, disk_store);
