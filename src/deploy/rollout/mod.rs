//! Closed-loop progressive delivery of a feature flag (DESIGN §6.6): the ramp
//! executed on a flag's `rollout_percentage`, judged every interval, rolled
//! back by itself (`erlmcp-rollout rollout run|status|approve|abort`).
//!
//! - [`plan`]: the plan file ([`RolloutPlan`]): stages, interval, limits,
//!   thresholds, PromQL templates; strict validation with positions.
//! - [`stats`]: the two-proportion test for error rates and the
//!   Mann-Whitney comparison of latency histogram buckets.
//! - [`mod@judge`]: one judgement of a window: `canary decide` rules plus the
//!   tests -> pass, inconclusive, error, approval or rollback.
//! - [`target`]: the flag config in a file or an etcd key; guarded publishes
//!   that change one number in place.
//! - [`state`]: the durable run state, approve/abort commands, the
//!   single-controller lock.
//! - [`audit`]: the synced JSON-lines audit log.
//! - [`controller`]: the state machine that ties them together ([`run`]).
//!
//! # Example
//! ```no_run
//! use std::time::Duration;
//! use erlmcp_rollout::deploy::prometheus::Client;
//! use erlmcp_rollout::deploy::rollout::{run, FlagTarget, RolloutPlan, RunOptions, StateStore};
//! let opts = RunOptions {
//!     flag: "mcp_sampling".into(),
//!     target: FlagTarget::parse("config/feature_flags.json", Duration::from_secs(5))?,
//!     prometheus_url: "http://127.0.0.1:9090".into(),
//!     client: Client::new("http://127.0.0.1:9090")?,
//!     plan: RolloutPlan::default(),
//!     store: StateStore::parse("rollout-mcp_sampling.state.json", Duration::from_secs(5))?,
//!     audit: "rollout-mcp_sampling.audit.jsonl".into(),
//!     actor: "alice".into(),
//!     dry_run: false,
//!     tick: Duration::from_millis(200),
//! };
//! let outcome = run(opts, &mut |event| println!("{event:?}"))?;
//! println!("{outcome:?}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod audit;
pub mod controller;
pub mod judge;
pub mod plan;
pub mod state;
pub mod stats;
pub mod target;

pub use audit::AuditLog;
pub use controller::{run, Event, Progress, RunOptions, RunOutcome};
pub use judge::{judge, Judgement, JudgementOutcome};
pub use plan::{LimitAction, Queries, RolloutPlan, Stage};
pub use state::{Command, ControllerLock, Holder, Phase, RunState, StateStore};
pub use target::{FlagTarget, PublishError};

/// Why a rollout command failed (exit 1).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RolloutError {
    /// Bad options or plan.
    #[error("{0}")]
    Usage(String),
    /// The plan file is invalid.
    #[error(transparent)]
    Plan(#[from] plan::PlanProblems),
    /// Another controller holds the flag.
    #[error("{0}")]
    Locked(String),
    /// The flag config cannot be used or published.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The run state cannot be read or written.
    #[error("rollout state: {0}")]
    State(String),
    /// The audit log cannot be written.
    #[error("audit log: {0}")]
    Audit(String),
}

/// Now, unix seconds.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
