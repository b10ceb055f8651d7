//! The `Store` contract, checked for every backend (DESIGN §4.2).

#[path = "session_support/conformance.rs"]
mod conformance;

use erlmcp_rollout::session::{MemoryStore, StoreOptions};

store_conformance!(memory, MemoryStore::new);
store_conformance!(memory_one_shard, |opts: StoreOptions| MemoryStore::with_shards(opts, 1));
store_conformance!(memory_many_shards, |opts: StoreOptions| MemoryStore::with_shards(
    opts, 257
));
