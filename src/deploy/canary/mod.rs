//! Canary verdicts (DESIGN §6.3): canary vs stable metrics in, `promote`,
//! `continue` or `rollback` out, with every rule's inputs and outcome.
//!
//! # "No data" is a value, not a number
//! Every comparison with NaN is false, so `if error_rate > limit` lets a NaN
//! error rate through (the reference's `bc` script fails open the same way).
//! Here a metric is a [`Reading`]: either a finite, non-negative
//! [`Reading::Value`] or [`Reading::NoData`] with the reason (`null`, NaN,
//! ±Inf, missing, empty result). Rules match on the reading before any
//! comparison, and a rule that lacks an input has the outcome
//! [`Outcome::NoData`], which is never a promote.
//!
//! # Rules, in order ([`decide`])
//! | rule | fires when | outcome |
//! |---|---|---|
//! | `restarts` | canary restarts > `max_restarts` (0) | rollback ([`TriggerId::PodCrashLoop`](crate::deploy::plan::TriggerId::PodCrashLoop)) |
//! | `error_rate` | canary error rate > `max_error_rate` (0.1 %) | rollback ([`TriggerId::ErrorRateAbsolute`](crate::deploy::plan::TriggerId::ErrorRateAbsolute)) |
//! | `error_rate_vs_stable` | canary > `error_rate_ratio` (2) x stable **and** canary > `error_rate_floor` (0.05 %) | rollback ([`TriggerId::ErrorRateRelative`](crate::deploy::plan::TriggerId::ErrorRateRelative)) |
//! | `freshness` | a side's data is stale or its targets are down (Prometheus only) | no data |
//! | `min_requests` | canary or stable served fewer than `min_requests` (1000) | continue |
//! | `latency_p95` | canary p95 > `max_latency_p95_ms` (10 ms) | warning |
//! | `latency_p95_vs_stable` | canary p95 > `latency_ratio` (1.5) x stable **and** > `latency_floor_ms` (1 ms) | warning ([`TriggerId::LatencyRelative`](crate::deploy::plan::TriggerId::LatencyRelative)) |
//! | `latency_p99` | canary p99 > `max_latency_p99_ms` (20 ms) | warning |
//! | `cpu`, `memory` | canary usage > `max_cpu`, `max_memory` (80 %) | warning |
//!
//! Relative rules multiply (`canary > k * stable`) instead of dividing, so a
//! zero baseline never divides by zero, and the floor keeps a zero baseline
//! from turning a handful of errors into a rollback.
//!
//! The decision is the worst outcome: any rollback -> `rollback`; else any
//! no data -> [`Thresholds::on_no_data`] (`continue` by default); else too
//! little traffic -> `continue`; else `promote`. Warnings do not block a
//! promote unless [`Thresholds::hold_on_warning`] is set.
//!
//! The input model and its parsing (metrics files, readings, sides) are in
//! [`input`]; the thresholds, the rules and the verdict in [`rules`].

pub mod input;
pub mod rules;

pub use input::*;
pub use rules::*;

use crate::flags::SyntaxError;

/// Why metrics or thresholds could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CanaryError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The metrics file is not JSON.
    #[error("invalid JSON at {0}")]
    Syntax(SyntaxError),
    /// JSON, but not the metrics format: every problem found.
    #[error("{} problem(s) in the metrics:\n  {}", .0.len(), .0.join("\n  "))]
    InvalidMetrics(Vec<String>),
    /// A threshold is unknown or out of range.
    #[error("invalid thresholds: {0}")]
    InvalidThresholds(String),
}

impl From<SyntaxError> for CanaryError {
    fn from(e: SyntaxError) -> Self {
        CanaryError::Syntax(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::plan::TriggerId;

    fn healthy() -> CanaryMetrics {
        let side = SideMetrics {
            requests: Reading::Value(10_000.0),
            error_rate: Reading::Value(0.0002),
            latency_p95_ms: Reading::Value(5.0),
            latency_p99_ms: Reading::Value(12.0),
            cpu: Reading::Value(0.3),
            memory: Reading::Value(0.4),
            restarts: Reading::Value(0.0),
            freshness: Freshness::Unchecked,
        };
        CanaryMetrics {
            canary: side,
            stable: side,
        }
    }

    #[test]
    fn healthy_promotes() {
        let v = decide(&healthy(), &Thresholds::default());
        assert_eq!(v.decision, Decision::Promote, "{}", v.render());
        assert!(v.warnings.is_empty());
        assert!(v.triggers.is_empty());
    }

    #[test]
    fn without_a_baseline_only_the_canary_is_judged() {
        let mut m = healthy();
        m.stable = SideMetrics::default();
        let opts = DecideOptions {
            unjudged: vec![Metric::Cpu],
            no_baseline: true,
        };
        let v = decide_with(&m, &Thresholds::default(), &opts);
        assert_eq!(v.decision, Decision::Promote, "{}", v.render());
        let names: Vec<&str> = v.rules.iter().map(|r| r.rule).collect();
        assert!(
            !names.contains(&"error_rate_vs_stable") && !names.contains(&"cpu"),
            "{names:?}"
        );
        let min = v.rules.iter().find(|r| r.rule == "min_requests").unwrap();
        assert!(
            min.message.contains("no stable cohort") && min.inputs.len() == 2,
            "{min:?}"
        );
        m.canary.requests = Reading::Value(10.0);
        assert_eq!(
            decide_with(&m, &Thresholds::default(), &opts).decision,
            Decision::Continue
        );
    }

    #[test]
    fn nan_error_rate_is_no_data() {
        let mut m = healthy();
        m.canary.error_rate = Reading::from_f64(f64::NAN);
        let v = decide(&m, &Thresholds::default());
        assert_eq!(v.decision, Decision::Continue);
        assert_eq!(v.rules[1].outcome, Outcome::NoData);
        let t = Thresholds {
            on_no_data: NoDataPolicy::Rollback,
            ..Thresholds::default()
        };
        let v = decide(&m, &t);
        assert_eq!(v.decision, Decision::Rollback);
        assert_eq!(v.triggers[0].id, TriggerId::HealthCheckFailures);
    }

    #[test]
    fn rollback_beats_too_little_traffic() {
        let mut m = healthy();
        m.canary.requests = Reading::Value(10.0);
        m.canary.restarts = Reading::Value(1.0);
        let v = decide(&m, &Thresholds::default());
        assert_eq!(v.decision, Decision::Rollback);
        assert_eq!(v.triggers[0].id, TriggerId::PodCrashLoop);
    }

    #[test]
    fn warnings_and_hold() {
        let mut m = healthy();
        m.canary.latency_p95_ms = Reading::Value(11.0);
        m.canary.memory = Reading::Value(0.9);
        let v = decide(&m, &Thresholds::default());
        assert_eq!(v.decision, Decision::Promote);
        let metrics: Vec<Metric> = v.warnings.iter().map(|w| w.metric).collect();
        assert_eq!(metrics, [Metric::LatencyP95Ms, Metric::LatencyP95Ms, Metric::Memory]);
        assert_eq!(v.triggers[0].id, TriggerId::LatencyRelative);
        let t = Thresholds {
            hold_on_warning: true,
            ..Thresholds::default()
        };
        assert_eq!(decide(&m, &t).decision, Decision::Continue);
    }

    #[test]
    fn stale_side_is_never_promoted() {
        let mut m = healthy();
        m.canary.freshness = Freshness::Stale {
            age_seconds: 300.0,
            max_age_seconds: 120.0,
        };
        m.stable.freshness = Freshness::Fresh { age_seconds: 5.0 };
        assert_eq!(decide(&m, &Thresholds::default()).decision, Decision::Continue);
    }

    #[test]
    fn thresholds_set_and_validate() {
        let mut t = Thresholds::default();
        t.set("on_no_data", "rollback").unwrap();
        assert_eq!(t.on_no_data, NoDataPolicy::Rollback);
        t.set("hold_on_warning", "true").unwrap();
        assert!(t.hold_on_warning);
        assert!(t.set("max_cpu", "-1").is_err());
        assert!(t.set("latency_ratio", "0").is_err());
        assert!(t.set("max_cpu", "lots").is_err());
        assert!(Thresholds::from_json(br#"{"max_cpu": 0.9, "bogus": 1}"#).is_err());
    }

    #[test]
    fn metrics_file_problems_are_all_reported() {
        let err = CanaryMetrics::from_json(
            br#"{"canary": {"requests": -1, "error_rate": 5, "cpu": "high", "lag": 1, "restarts": [0]}, "x": {}}"#,
        )
        .unwrap_err();
        let CanaryError::InvalidMetrics(p) = err else {
            panic!("{err}")
        };
        assert_eq!(p.len(), 7, "{p:#?}");
    }
}
