//! Model-based property test of every `Store` backend against a `BTreeMap` model.

#[path = "session_support/model.rs"]
mod model;

use erlmcp_rollout::session::{MemoryStore, StoreOptions};

store_model!(memory, MemoryStore::new);
store_model!(memory_four_shards, |opts: StoreOptions| MemoryStore::with_shards(
    opts, 4
));
store_model!(memory_one_shard, |opts: StoreOptions| MemoryStore::with_shards(opts, 1));
