//! Deployment decisions (DESIGN §6.3-6.5): canary verdicts from metrics, the
//! ramp and rollback matrix, CI test scope. Enabled by the `deploy` feature.
//!
//! - [`canary`]: the metrics model ([`CanaryMetrics`], [`Reading`]: a value or
//!   *no data*), [`Thresholds`] and [`decide`], which returns a [`Verdict`]
//!   (`promote | continue | rollback`, warnings, every rule's inputs and
//!   outcome, the rollback matrix rows it cites).
//! - [`prometheus`]: a blocking client for `/api/v1/query` and
//!   `/api/v1/query_range` (plain `http://`), PromQL [`Templates`], and
//!   [`collect`], which reads canary and stable metrics at one time and checks
//!   their freshness.
//! - [`plan`]: the ramp ([`Ramp`], 5 -> 25 -> 50 -> 100 %) and the
//!   [`ROLLBACK_MATRIX`].
//! - [`ci_scope`]: changed files -> `smoke | quick | full` and the apps.
//!
//! # Example
//! ```
//! use erlmcp_rollout::deploy::{decide, CanaryMetrics, Decision, Thresholds};
//! let m = CanaryMetrics::from_json(br#"{
//!   "canary": {"requests": 4000, "error_rate": 0.004, "latency_p95_ms": 6, "latency_p99_ms": 12,
//!              "cpu": 0.4, "memory": 0.5, "restarts": 0},
//!   "stable": {"requests": 76000, "error_rate": 0.0003, "latency_p95_ms": 5, "latency_p99_ms": 11,
//!              "cpu": 0.4, "memory": 0.5, "restarts": 0}
//! }"#)?;
//! let v = decide(&m, &Thresholds::default());
//! assert_eq!(v.decision, Decision::Rollback);
//! assert_eq!(v.triggers[0].description, "Error rate >0.1%");
//! # Ok::<(), erlmcp_rollout::deploy::CanaryError>(())
//! ```

pub mod canary;
pub mod ci_scope;
pub mod plan;
pub mod prometheus;
#[cfg(feature = "rollout")]
pub mod rollout;

pub use canary::{
    decide, decide_with, CanaryError, CanaryMetrics, DecideOptions, Decision, Freshness, Metric, NoData, NoDataPolicy,
    Outcome, Reading, RuleResult, Side, SideMetrics, Thresholds, Verdict, Warning,
};
pub use ci_scope::{classify, ScopeConfig, ScopeError, ScopeReport};
pub use plan::{PlanError, Ramp, RampStage, Trigger, TriggerId, ROLLBACK_MATRIX};
pub use prometheus::{collect, Client, ClientOptions, Collected, HttpAuth, PrometheusError, Source, Templates};
