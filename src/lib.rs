//! # erlmcp_rollout
//!
//! The rollout toolkit for [erlmcp](https://github.com/erlsci/erlmcp), an Erlang
//! Model Context Protocol server: feature flags evaluated from an immutable,
//! lock-free snapshot with cohorts bit-identical to `erlang:phash2/2`, and the
//! deployment decisions built on them. The same core is exposed to Erlang
//! through a rustler NIF and to operators through the `erlmcp-rollout` CLI.
//!
//! ## Modules
//! - [`flags`]: config model and strict validation, evaluation with reasons,
//!   the hot-reloading [`flags::Engine`], schedules, overrides, metrics.
//! - [`flags::phash2`]: a pure-Rust `erlang:phash2/2` for binaries, atoms and
//!   integers.
//! - [`session`]: the session record (versions, tombstones, sliding expiry, touch
//!   policy), the [`session::Store`] contract, its binary encoding and the sharded
//!   [`session::MemoryStore`].
//! - [`migrate`]: online migration between session stores: backfill with
//!   checkpoints, Merkle-style verify and repair, phases, and (feature `disk`) the
//!   dual-write migrator with its durable outbox.
//! - [`deploy`] (feature `deploy`): canary verdicts from Prometheus or a
//!   metrics file, the ramp and rollback matrix, CI test scope.
//! - [`etcd`]: how every etcd client of the crate connects: endpoints, TLS
//!   (server CA, client certificate), etcd users, and the typed failures that
//!   retrying cannot fix.
//! - [`clock`]: where "now" comes from (system, manual, pinnable), for flag
//!   schedules and session expiry alike.
//! - [`workers`]: a growing pool of threads for blocking calls, for hosts whose
//!   own threads must not block (the NIF).
//!
//! ## Features
//! - `cli` (default): the `erlmcp-rollout` binary and its dependencies. Depend
//!   with `default-features = false` to get flag evaluation alone.
//! - `disk` (included in `cli`): `session::DiskStore`, the session store in one
//!   redb file.
//! - `deploy` (included in `cli`): the [`deploy`] module and its HTTP client
//!   (`ureq` with rustls: `http://`, or `https://` with a CA file and a bearer
//!   token or basic auth).
//! - `etcd` (included in `cli`): the etcd session store, flags and migration
//!   phase in etcd, over `http://` or TLS with etcd users.
//!
//! ## Example
//! ```
//! use erlmcp_rollout::flags::{Engine, FlagsConfig, MapContext};
//!
//! let config = FlagsConfig::from_json(br#"{
//!     "mcp_sampling": {"enabled": true, "rollout_percentage": 25,
//!                      "environments": ["dev", "production"]}
//! }"#)?;
//! let engine = Engine::builder().environment("production").build(config);
//! let ctx = MapContext::new().binary("session_id", "session-123");
//! let eval = engine.evaluate("mcp_sampling", &ctx);
//! // phash2(<<"session-123">>, 100) = 98, which is not below 25.
//! assert!(!eval.enabled);
//! println!("{}", eval.reason);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod clock;
#[cfg(feature = "deploy")]
pub mod deploy;
pub mod etcd;
pub mod flags;
pub(crate) mod json;
pub mod migrate;
pub mod session;
pub(crate) mod time_text;
#[cfg(any(feature = "etcd", feature = "deploy"))]
mod tls;
pub mod workers;
