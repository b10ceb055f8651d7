//! Feature flags: config, evaluation, engine (DESIGN §3).
//!
//! - [`FlagsConfig`]: the JSON config, strictly validated ([`FlagsConfig::from_json`]).
//! - [`Engine`]: a compiled [`Snapshot`] behind an `ArcSwap`; [`Engine::evaluate`]
//!   returns an [`Evaluation`] with its [`Reason`], lock-free.
//! - [`Context`]: where evaluation reads attributes ([`MapContext`] is a simple one).
//! - [`phash2`]: rollout buckets identical to `erlang:phash2/2`.
//! - [`plan`]: week plans to schedules and timelines; [`matrix`]: CI feature sets.
//! - [`Engine::details`]: value, variant, OpenFeature reason and error code;
//!   `EngineProvider` (feature `openfeature`): an OpenFeature provider.
//! - [`AuditLog`]: the audit trail of flag changes (JSON lines).
//! - [`batch`]: JSON-lines evaluation for scripts.
//! - [`ErlmcpFlag`], [`export_json`]: erlmcp's own flags interface (its file
//!   format is read by [`FlagsConfig::from_json`]; its hash contract is
//!   [`Bucketing::Erlmcp`]).
//! - `push_flags` and `Engine::watch_etcd` (feature `etcd`): a config published in an
//!   etcd key, reloaded by every watching engine within milliseconds.

mod audit;
pub mod batch;
mod config;
mod details;
mod engine;
mod erlmcp;
#[cfg(feature = "etcd")]
pub(crate) mod etcd;
mod listing;
pub mod matrix;
mod metrics;
#[cfg(feature = "openfeature")]
mod openfeature;
mod overrides;
pub mod phash2;
pub mod plan;
mod snapshot;
mod table;
mod value;

pub use crate::clock::{unix_ms, Clock, ManualClock, PinnableClock, SystemClock};
pub use crate::json::{Pos, SyntaxError};
pub use audit::{audit_diff, AuditError, AuditLog, AuditRecord, ChangeKind, FieldDiff, FlagChange, AUDIT_FORMAT};
pub use config::{
    format_time, parse_time, value_kind, BasisPoints, Bucketing, Condition, ConfigError, FlagSpec, FlagsConfig,
    Literal, Number, Operator, Percentage, Prerequisite, Problem, Requirement, Schedule, Stage, Variant, Variants,
    DEFAULT_STICKINESS, MAX_FLAG_NAME_CHARS, MAX_PREREQUISITE_DEPTH, MAX_PREREQUISITE_EVALUATIONS, MAX_VARIANTS,
    MAX_VARIANT_NAME_CHARS, MAX_VARIANT_WEIGHT, OPERATORS,
};
pub use details::{ErrorCode, EvaluationDetails, ResolutionReason};
pub use engine::{
    Engine, EngineBuilder, EngineError, FileWatcher, ReloadOutcome, WatchCallback, WatchEvent, WatchOptions,
    WatchStatus, DEFAULT_ENVIRONMENT,
};
pub use erlmcp::{
    erlmcp_flags, export_json, ErlmcpFlag, ErlmcpState, Strategy, EXPORT_VERSION, METADATA_KEY as ERLMCP_METADATA_KEY,
};
#[cfg(feature = "etcd")]
pub use etcd::{
    push_flags, push_flags_guarded, push_flags_with, read_flags, EtcdFlagsOptions, EtcdWatchStatus, EtcdWatcher,
    PushError, PushOutcome, DEFAULT_FLAGS_KEY,
};
pub use listing::{environments_named, state_table, FlagStateRow};
pub use metrics::{Counts, Metrics};
#[cfg(feature = "openfeature")]
pub use openfeature::{EngineProvider, PROVIDER_NAME};
pub use overrides::{EnvOverrideError, EnvOverrides, Override, OverrideSource, ENV_VAR};
pub use snapshot::{
    ConditionFailure, CustomPredicate, Deferred, Evaluation, Explanation, FlagDetails, Reason, Snapshot, Step,
};
pub use table::FlagId;
pub use value::{Context, ForeignTerm, MapContext, OwnedValue, Value};
