//! Feature flags: config, evaluation, engine (DESIGN §3).
//!
//! - [`FlagsConfig`]: the JSON config, strictly validated ([`FlagsConfig::from_json`]).
//! - [`Engine`]: a compiled [`Snapshot`] behind an `ArcSwap`; [`Engine::evaluate`]
//!   returns an [`Evaluation`] with its [`Reason`], lock-free.
//! - [`Context`]: where evaluation reads attributes ([`MapContext`] is a simple one).
//! - [`phash2`]: rollout buckets identical to `erlang:phash2/2`.
//! - [`plan`]: week plans to schedules and timelines; [`matrix`]: CI feature sets.
//! - [`batch`]: JSON-lines evaluation for scripts.
//! - `push_flags` and `Engine::watch_etcd` (feature `etcd`): a config published in an
//!   etcd key, reloaded by every watching engine within milliseconds.

pub mod batch;
mod clock;
mod config;
mod engine;
#[cfg(feature = "etcd")]
mod etcd;
pub(crate) mod json;
mod listing;
pub mod matrix;
mod metrics;
mod overrides;
pub mod phash2;
pub mod plan;
mod snapshot;
mod table;
mod value;

pub use clock::{unix_ms, Clock, ManualClock, PinnableClock, SystemClock};
pub use config::{
    format_time, parse_time, Condition, ConfigError, FlagSpec, FlagsConfig, Literal, Number, Operator, Percentage,
    Problem, Schedule, Stage, DEFAULT_STICKINESS, MAX_FLAG_NAME_CHARS, OPERATORS,
};
pub use engine::{
    Engine, EngineBuilder, EngineError, FileWatcher, ReloadOutcome, WatchCallback, WatchEvent, WatchOptions,
    WatchStatus, DEFAULT_ENVIRONMENT,
};
#[cfg(feature = "etcd")]
pub use etcd::{
    push_flags, push_flags_with, EtcdFlagsOptions, EtcdWatchStatus, EtcdWatcher, PushError, PushOutcome,
    DEFAULT_FLAGS_KEY,
};
pub use json::{Pos, SyntaxError};
pub use listing::{environments_named, state_table, FlagStateRow};
pub use metrics::{Counts, Metrics};
pub use overrides::{EnvOverrideError, EnvOverrides, Override, OverrideSource, ENV_VAR};
pub use snapshot::{
    ConditionFailure, CustomPredicate, Deferred, Evaluation, Explanation, FlagDetails, Reason, Snapshot, Step,
};
pub use table::FlagId;
pub use value::{Context, MapContext, OwnedValue, Value};
