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
//! | `restarts` | canary restarts > `max_restarts` (0) | rollback ([`TriggerId::PodCrashLoop`]) |
//! | `error_rate` | canary error rate > `max_error_rate` (0.1 %) | rollback ([`TriggerId::ErrorRateAbsolute`]) |
//! | `error_rate_vs_stable` | canary > `error_rate_ratio` (2) x stable **and** canary > `error_rate_floor` (0.05 %) | rollback ([`TriggerId::ErrorRateRelative`]) |
//! | `freshness` | a side's data is stale or its targets are down (Prometheus only) | no data |
//! | `min_requests` | canary or stable served fewer than `min_requests` (1000) | continue |
//! | `latency_p95` | canary p95 > `max_latency_p95_ms` (10 ms) | warning |
//! | `latency_p95_vs_stable` | canary p95 > `latency_ratio` (1.5) x stable **and** > `latency_floor_ms` (1 ms) | warning ([`TriggerId::LatencyRelative`]) |
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

use std::fmt;
use std::path::Path;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use super::plan::{trigger, Trigger, TriggerId};
use crate::flags::json::{self, Kind, Node};
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

/// Why a metric has no usable value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum NoData {
    /// The key is absent from the metrics file.
    Missing,
    /// The value is `null`.
    Null,
    /// The value is NaN (e.g. `0/0`: an error rate without requests).
    Nan,
    /// The value is +Inf (e.g. `x/0`, or a quantile in the `+Inf` bucket).
    PosInf,
    /// The value is -Inf.
    NegInf,
    /// Prometheus returned no series.
    Empty,
    /// A negative value where only non-negative ones make sense.
    Negative,
}

impl NoData {
    /// A short explanation for messages.
    pub fn describe(self) -> &'static str {
        match self {
            NoData::Missing => "missing",
            NoData::Null => "null",
            NoData::Nan => "NaN",
            NoData::PosInf => "+Inf",
            NoData::NegInf => "-Inf",
            NoData::Empty => "no series",
            NoData::Negative => "negative",
        }
    }
}

/// One metric: a finite, non-negative number, or no data with the reason.
///
/// # Examples
/// ```
/// use erlmcp_rollout::deploy::canary::{NoData, Reading};
/// assert_eq!(Reading::from_f64(0.5), Reading::Value(0.5));
/// assert_eq!(Reading::from_f64(f64::NAN), Reading::NoData(NoData::Nan));
/// assert_eq!(Reading::from_f64(f64::INFINITY).value(), None);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Reading {
    /// A usable value: finite and `>= 0` (see [`Reading::from_f64`]).
    Value(f64),
    /// No usable value.
    NoData(NoData),
}

impl Reading {
    /// Classify a raw number: NaN, ±Inf and negative numbers are no data.
    /// `-0.0` becomes `0.0`.
    pub fn from_f64(x: f64) -> Reading {
        if x.is_nan() {
            Reading::NoData(NoData::Nan)
        } else if x == f64::INFINITY {
            Reading::NoData(NoData::PosInf)
        } else if x == f64::NEG_INFINITY {
            Reading::NoData(NoData::NegInf)
        } else if x < 0.0 {
            Reading::NoData(NoData::Negative)
        } else {
            Reading::Value(x + 0.0)
        }
    }

    /// The value, if there is one.
    pub fn value(self) -> Option<f64> {
        match self {
            Reading::Value(v) => Some(v),
            Reading::NoData(_) => None,
        }
    }
}

impl Default for Reading {
    fn default() -> Self {
        Reading::NoData(NoData::Missing)
    }
}

impl fmt::Display for Reading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reading::Value(v) => write!(f, "{v}"),
            Reading::NoData(r) => write!(f, "no data ({})", r.describe()),
        }
    }
}

/// Serialized as the number, or `{"no_data": REASON}`.
impl Serialize for Reading {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Reading::Value(v) => s.serialize_f64(*v),
            Reading::NoData(r) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("no_data", r)?;
                m.end()
            }
        }
    }
}

/// The metrics of one side, each a [`Reading`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct SideMetrics {
    /// Requests served in the window (a count; may be fractional when it
    /// comes from Prometheus' extrapolating `increase()`).
    pub requests: Reading,
    /// Failed requests / requests, a fraction (0.001 = 0.1 %).
    pub error_rate: Reading,
    /// 95th percentile latency in milliseconds.
    pub latency_p95_ms: Reading,
    /// 99th percentile latency in milliseconds.
    pub latency_p99_ms: Reading,
    /// CPU usage as a fraction of the limit (0.8 = 80 %).
    pub cpu: Reading,
    /// Memory usage as a fraction of the limit.
    pub memory: Reading,
    /// Pod restarts in the window.
    pub restarts: Reading,
    /// Whether the data is current (only a live source can tell).
    #[serde(skip_serializing_if = "Freshness::is_unchecked")]
    pub freshness: Freshness,
}

/// Whether a side's data is current; a metrics file cannot say, a Prometheus
/// source checks sample timestamps and `up`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Freshness {
    /// Not checked (metrics file).
    #[default]
    Unchecked,
    /// Newest sample `age_seconds` old, targets up.
    Fresh {
        /// Age of the newest sample at the evaluation time.
        age_seconds: f64,
    },
    /// The newest sample is older than allowed.
    Stale {
        /// Age of the newest sample at the evaluation time.
        age_seconds: f64,
        /// The allowed age.
        max_age_seconds: f64,
    },
    /// At least one target's `up` is 0.
    TargetDown,
    /// The freshness queries returned no usable value.
    Unknown {
        /// Why.
        reason: NoData,
        /// Which check (`last_sample` or `up`).
        check: &'static str,
    },
}

impl Freshness {
    /// `true` for [`Freshness::Unchecked`].
    pub fn is_unchecked(&self) -> bool {
        matches!(self, Freshness::Unchecked)
    }
}

/// A metric name, as in the metrics file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// [`SideMetrics::requests`].
    Requests,
    /// [`SideMetrics::error_rate`].
    ErrorRate,
    /// [`SideMetrics::latency_p95_ms`].
    LatencyP95Ms,
    /// [`SideMetrics::latency_p99_ms`].
    LatencyP99Ms,
    /// [`SideMetrics::cpu`].
    Cpu,
    /// [`SideMetrics::memory`].
    Memory,
    /// [`SideMetrics::restarts`].
    Restarts,
}

impl Metric {
    /// Every metric, in file order.
    pub const ALL: [Metric; 7] = [
        Metric::Requests,
        Metric::ErrorRate,
        Metric::LatencyP95Ms,
        Metric::LatencyP99Ms,
        Metric::Cpu,
        Metric::Memory,
        Metric::Restarts,
    ];

    /// The key in the metrics file.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Requests => "requests",
            Metric::ErrorRate => "error_rate",
            Metric::LatencyP95Ms => "latency_p95_ms",
            Metric::LatencyP99Ms => "latency_p99_ms",
            Metric::Cpu => "cpu",
            Metric::Memory => "memory",
            Metric::Restarts => "restarts",
        }
    }

    /// The metric named `name` (a metrics-file key).
    pub fn from_name(name: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.as_str() == name)
    }

    /// Whether the value is a fraction that cannot exceed 1.
    fn at_most_one(self) -> bool {
        self == Metric::ErrorRate
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl SideMetrics {
    /// The reading of `metric`.
    pub fn get(&self, metric: Metric) -> Reading {
        match metric {
            Metric::Requests => self.requests,
            Metric::ErrorRate => self.error_rate,
            Metric::LatencyP95Ms => self.latency_p95_ms,
            Metric::LatencyP99Ms => self.latency_p99_ms,
            Metric::Cpu => self.cpu,
            Metric::Memory => self.memory,
            Metric::Restarts => self.restarts,
        }
    }

    /// Replace the reading of `metric`.
    pub fn set(&mut self, metric: Metric, reading: Reading) {
        let slot = match metric {
            Metric::Requests => &mut self.requests,
            Metric::ErrorRate => &mut self.error_rate,
            Metric::LatencyP95Ms => &mut self.latency_p95_ms,
            Metric::LatencyP99Ms => &mut self.latency_p99_ms,
            Metric::Cpu => &mut self.cpu,
            Metric::Memory => &mut self.memory,
            Metric::Restarts => &mut self.restarts,
        };
        *slot = reading;
    }
}

/// Which deployment a metric belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The new version.
    Canary,
    /// The current version (the baseline).
    Stable,
}

impl Side {
    /// Both sides, canary first.
    pub const BOTH: [Side; 2] = [Side::Canary, Side::Stable];

    /// `canary` or `stable`.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Canary => "canary",
            Side::Stable => "stable",
        }
    }
}

/// Canary and stable metrics side by side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct CanaryMetrics {
    /// The new version.
    pub canary: SideMetrics,
    /// The current version.
    pub stable: SideMetrics,
}

impl CanaryMetrics {
    /// One side.
    pub fn side(&self, side: Side) -> &SideMetrics {
        match side {
            Side::Canary => &self.canary,
            Side::Stable => &self.stable,
        }
    }

    /// One side, mutably.
    pub fn side_mut(&mut self, side: Side) -> &mut SideMetrics {
        match side {
            Side::Canary => &mut self.canary,
            Side::Stable => &mut self.stable,
        }
    }

    /// Parse the metrics file format:
    /// `{"canary": {"requests": N, "error_rate": F, "latency_p95_ms": F,
    /// "latency_p99_ms": F, "cpu": F, "memory": F, "restarts": N}, "stable":
    /// {...}}`. Each value is a non-negative number, `null`, `"NaN"`,
    /// `"+Inf"` or `"-Inf"` (the last four, and a missing key, are no data).
    /// `error_rate`, `cpu` and `memory` are fractions (0.001 = 0.1 %).
    ///
    /// # Errors
    /// [`CanaryError::Syntax`] for malformed JSON; [`CanaryError::InvalidMetrics`]
    /// listing every problem (unknown or duplicate keys, a missing side,
    /// negative numbers, an error rate above 1, other strings or types).
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::deploy::canary::{CanaryMetrics, NoData, Reading};
    /// let m = CanaryMetrics::from_json(br#"{
    ///   "canary": {"requests": 5000, "error_rate": "NaN", "restarts": 0},
    ///   "stable": {"requests": 90000, "error_rate": 0.0002, "cpu": null}
    /// }"#)?;
    /// assert_eq!(m.canary.requests, Reading::Value(5000.0));
    /// assert_eq!(m.canary.error_rate, Reading::NoData(NoData::Nan));
    /// assert_eq!(m.canary.cpu, Reading::NoData(NoData::Missing));
    /// assert_eq!(m.stable.cpu, Reading::NoData(NoData::Null));
    /// assert!(CanaryMetrics::from_json(br#"{"canary": {}, "stable": {"requests": -1}}"#).is_err());
    /// # Ok::<(), erlmcp_rollout::deploy::canary::CanaryError>(())
    /// ```
    pub fn from_json(input: &[u8]) -> Result<CanaryMetrics, CanaryError> {
        let root = json::parse(input)?;
        let mut problems = Vec::new();
        let mut metrics = CanaryMetrics::default();
        let mut seen = [false, false];
        let Kind::Object(members) = &root.kind else {
            return Err(CanaryError::InvalidMetrics(vec![format!(
                "$ ({}): expected an object with \"canary\" and \"stable\", got {}",
                root.pos,
                root.kind.type_name()
            )]));
        };
        for m in members {
            let (i, side) = match m.key.as_str() {
                "canary" => (0, Side::Canary),
                "stable" => (1, Side::Stable),
                other => {
                    problems.push(format!(
                        "$ ({}): unknown key {other:?}; expected \"canary\" and \"stable\"",
                        m.key_pos
                    ));
                    continue;
                }
            };
            if seen[i] {
                problems.push(format!("$.{} ({}): duplicate key", m.key, m.key_pos));
                continue;
            }
            seen[i] = true;
            *metrics.side_mut(side) = parse_side(side, &m.value, &mut problems);
        }
        for (i, side) in Side::BOTH.iter().enumerate() {
            if !seen[i] {
                problems.push(format!("$: missing the \"{}\" object", side.as_str()));
            }
        }
        if problems.is_empty() {
            Ok(metrics)
        } else {
            Err(CanaryError::InvalidMetrics(problems))
        }
    }

    /// As [`CanaryMetrics::from_json`], reading `path`.
    ///
    /// # Errors
    /// As [`CanaryMetrics::from_json`], plus [`CanaryError::Io`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<CanaryMetrics, CanaryError> {
        CanaryMetrics::from_json(&read(path.as_ref())?)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CanaryError> {
    std::fs::read(path).map_err(|source| CanaryError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn parse_side(side: Side, node: &Node, problems: &mut Vec<String>) -> SideMetrics {
    let mut out = SideMetrics::default();
    let base = format!("$.{}", side.as_str());
    let Kind::Object(members) = &node.kind else {
        problems.push(format!(
            "{base} ({}): expected an object of metrics, got {}",
            node.pos,
            node.kind.type_name()
        ));
        return out;
    };
    let mut seen = Vec::new();
    for m in members {
        let path = format!("{base}.{}", m.key);
        let Some(metric) = Metric::from_name(&m.key) else {
            let known: Vec<&str> = Metric::ALL.iter().map(|m| m.as_str()).collect();
            problems.push(format!(
                "{base} ({}): unknown metric {:?}; expected one of {}",
                m.key_pos,
                m.key,
                known.join(", ")
            ));
            continue;
        };
        if seen.contains(&metric) {
            problems.push(format!("{path} ({}): duplicate key", m.key_pos));
            continue;
        }
        seen.push(metric);
        match parse_reading(metric, &m.value) {
            Ok(r) => out.set(metric, r),
            Err(msg) => problems.push(format!("{path} ({}): {msg}", m.value.pos)),
        }
    }
    out
}

fn parse_reading(metric: Metric, node: &Node) -> Result<Reading, String> {
    match &node.kind {
        Kind::Null => Ok(Reading::NoData(NoData::Null)),
        Kind::String(s) => match s.as_str() {
            "NaN" => Ok(Reading::NoData(NoData::Nan)),
            "+Inf" => Ok(Reading::NoData(NoData::PosInf)),
            "-Inf" => Ok(Reading::NoData(NoData::NegInf)),
            other => Err(format!(
                "{other:?} is not a value; expected a number, null, \"NaN\", \"+Inf\" or \"-Inf\""
            )),
        },
        Kind::Number(text) => {
            let v: f64 = text.parse().map_err(|_| format!("{text} is not a number"))?;
            if !v.is_finite() {
                Err(format!("{text} is out of range"))
            } else if v < 0.0 {
                Err(format!("{text} is negative; {metric} cannot be"))
            } else if metric.at_most_one() && v > 1.0 {
                Err(format!(
                    "{text} is above 1; {metric} is a fraction (0.001 = 0.1 %), not a percentage"
                ))
            } else {
                Ok(Reading::from_f64(v))
            }
        }
        other => Err(format!(
            "expected a number, null, \"NaN\", \"+Inf\" or \"-Inf\", got {}",
            other.type_name()
        )),
    }
}

/// What to decide when a rule lacks data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoDataPolicy {
    /// Keep observing (the default): no data is never a promote.
    #[default]
    Continue,
    /// Treat missing data like a failed health check and roll back.
    Rollback,
}

/// The limits the rules use. Defaults are the reference's (§III.C).
/// Deserializes from JSON with every field optional and unknown fields
/// rejected.
///
/// # Examples
/// ```
/// use erlmcp_rollout::deploy::canary::Thresholds;
/// let mut t = Thresholds::from_json(br#"{"max_error_rate": 0.005}"#)?;
/// t.set("min_requests", "200")?;
/// assert_eq!((t.max_error_rate, t.min_requests, t.error_rate_ratio), (0.005, 200.0, 2.0));
/// assert!(t.set("max_eror_rate", "1").is_err());
/// # Ok::<(), erlmcp_rollout::deploy::canary::CanaryError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Thresholds {
    /// Canary error rate above this -> rollback (fraction; 0.001 = 0.1 %).
    pub max_error_rate: f64,
    /// Canary error rate above this many times stable's -> rollback...
    pub error_rate_ratio: f64,
    /// ...but only when the canary error rate is also above this floor.
    pub error_rate_floor: f64,
    /// Canary restarts above this -> rollback.
    pub max_restarts: f64,
    /// Fewer requests than this on either side -> continue.
    pub min_requests: f64,
    /// Canary p95 above this (ms) -> warning.
    pub max_latency_p95_ms: f64,
    /// Canary p95 above this many times stable's -> warning...
    pub latency_ratio: f64,
    /// ...but only when the canary p95 is also above this floor (ms).
    pub latency_floor_ms: f64,
    /// Canary p99 above this (ms) -> warning.
    pub max_latency_p99_ms: f64,
    /// Canary CPU above this fraction of its limit -> warning.
    pub max_cpu: f64,
    /// Canary memory above this fraction of its limit -> warning.
    pub max_memory: f64,
    /// The decision when a rule lacks data.
    pub on_no_data: NoDataPolicy,
    /// When true, warnings turn a promote into a continue.
    pub hold_on_warning: bool,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_error_rate: 0.001,
            error_rate_ratio: 2.0,
            error_rate_floor: 0.0005,
            max_restarts: 0.0,
            min_requests: 1000.0,
            max_latency_p95_ms: 10.0,
            latency_ratio: 1.5,
            latency_floor_ms: 1.0,
            max_latency_p99_ms: 20.0,
            max_cpu: 0.8,
            max_memory: 0.8,
            on_no_data: NoDataPolicy::Continue,
            hold_on_warning: false,
        }
    }
}

impl Thresholds {
    /// Defaults overridden by a JSON object (see the type's docs).
    ///
    /// # Errors
    /// [`CanaryError::InvalidThresholds`] for malformed JSON, unknown keys or
    /// out-of-range values.
    pub fn from_json(input: &[u8]) -> Result<Thresholds, CanaryError> {
        let t: Thresholds = serde_json::from_slice(input).map_err(|e| CanaryError::InvalidThresholds(e.to_string()))?;
        t.validate()?;
        Ok(t)
    }

    /// As [`Thresholds::from_json`], reading `path`.
    ///
    /// # Errors
    /// As [`Thresholds::from_json`], plus [`CanaryError::Io`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<Thresholds, CanaryError> {
        let path = path.as_ref();
        Thresholds::from_json(&read(path)?).map_err(|e| match e {
            CanaryError::InvalidThresholds(msg) => CanaryError::InvalidThresholds(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Set one threshold by name; `value` is JSON (`0.002`, `true`,
    /// `rollback` or `"rollback"`).
    ///
    /// # Errors
    /// [`CanaryError::InvalidThresholds`] for unknown names or bad values.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), CanaryError> {
        let invalid = |msg: String| CanaryError::InvalidThresholds(msg);
        let mut obj = match serde_json::to_value(&*self) {
            Ok(serde_json::Value::Object(o)) => o,
            _ => return Err(invalid("internal: thresholds do not serialize to an object".into())),
        };
        if !obj.contains_key(name) {
            let names: Vec<&str> = obj.keys().map(String::as_str).collect();
            return Err(invalid(format!(
                "unknown threshold {name:?}; known: {}",
                names.join(", ")
            )));
        }
        let parsed = serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_owned()));
        obj.insert(name.to_owned(), parsed);
        let t: Thresholds = serde_json::from_value(serde_json::Value::Object(obj))
            .map_err(|e| invalid(format!("{name}={value}: {e}")))?;
        t.validate()?;
        *self = t;
        Ok(())
    }

    /// Check that every limit is finite and non-negative and every ratio positive.
    ///
    /// # Errors
    /// [`CanaryError::InvalidThresholds`] naming the first bad value.
    pub fn validate(&self) -> Result<(), CanaryError> {
        let limits = [
            ("max_error_rate", self.max_error_rate),
            ("error_rate_floor", self.error_rate_floor),
            ("max_restarts", self.max_restarts),
            ("min_requests", self.min_requests),
            ("max_latency_p95_ms", self.max_latency_p95_ms),
            ("latency_floor_ms", self.latency_floor_ms),
            ("max_latency_p99_ms", self.max_latency_p99_ms),
            ("max_cpu", self.max_cpu),
            ("max_memory", self.max_memory),
        ];
        for (name, v) in limits {
            if !(v.is_finite() && v >= 0.0) {
                return Err(CanaryError::InvalidThresholds(format!(
                    "{name} = {v}: must be a finite number >= 0"
                )));
            }
        }
        for (name, v) in [
            ("error_rate_ratio", self.error_rate_ratio),
            ("latency_ratio", self.latency_ratio),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(CanaryError::InvalidThresholds(format!(
                    "{name} = {v}: must be a finite number > 0"
                )));
            }
        }
        Ok(())
    }
}

/// The verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Move to the next ramp stage.
    Promote,
    /// Keep observing at the current stage.
    Continue,
    /// Send all traffic back to stable.
    Rollback,
}

impl Decision {
    /// `promote`, `continue` or `rollback`.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Promote => "promote",
            Decision::Continue => "continue",
            Decision::Rollback => "rollback",
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one rule concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Within limits.
    Pass,
    /// Beyond a warning limit: manual review.
    Warn,
    /// Not enough traffic yet.
    Continue,
    /// An input has no data.
    NoData,
    /// Beyond a rollback limit.
    Rollback,
}

impl Outcome {
    /// `pass`, `warn`, `continue`, `no_data` or `rollback`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Warn => "warn",
            Outcome::Continue => "continue",
            Outcome::NoData => "no_data",
            Outcome::Rollback => "rollback",
        }
    }
}

/// One rule's inputs, outcome and explanation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RuleResult {
    /// The rule's name (see the module docs).
    pub rule: &'static str,
    /// The metric it judges.
    pub metric: Metric,
    /// Every input by name (`canary.error_rate`, `max_error_rate`, ...), in order.
    #[serde(serialize_with = "ser_inputs")]
    pub inputs: Vec<(String, Reading)>,
    /// What it concluded.
    pub outcome: Outcome,
    /// One sentence saying why.
    pub message: String,
    /// The rollback matrix row it matches, when it fired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trigger: Option<TriggerId>,
}

fn ser_inputs<S: Serializer>(inputs: &[(String, Reading)], s: S) -> Result<S::Ok, S::Error> {
    let mut m = s.serialize_map(Some(inputs.len()))?;
    for (k, v) in inputs {
        m.serialize_entry(k, v)?;
    }
    m.end()
}

/// A finding for manual review, naming its metric.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Warning {
    /// The metric (`latency_p95_ms`, `cpu`, ...).
    pub metric: Metric,
    /// The rule that raised it.
    pub rule: &'static str,
    /// What is wrong.
    pub message: String,
}

/// The result of [`decide`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Verdict {
    /// The decision.
    pub decision: Decision,
    /// Warnings (rules that warned or lacked data).
    pub warnings: Vec<Warning>,
    /// Every rule, in evaluation order.
    pub rules: Vec<RuleResult>,
    /// The rollback matrix rows cited by the rules that fired, most severe first.
    pub triggers: Vec<&'static Trigger>,
}

impl Verdict {
    /// The verdict as text for people: decision, cited triggers, rules, warnings.
    pub fn render(&self) -> String {
        let mut out = format!("decision: {}\n", self.decision);
        for t in &self.triggers {
            out.push_str(&format!(
                "  trigger: {} ({:?}, {:?} rollback, {}, approval: {})\n",
                t.description,
                t.severity,
                t.rollback,
                t.timeline,
                t.approval.unwrap_or("none")
            ));
        }
        out.push_str("rules:\n");
        for r in &self.rules {
            out.push_str(&format!("  {:<8} {:<22} {}\n", r.outcome.as_str(), r.rule, r.message));
        }
        if !self.warnings.is_empty() {
            out.push_str("warnings:\n");
            for w in &self.warnings {
                out.push_str(&format!("  {}: {}\n", w.metric, w.message));
            }
        }
        out
    }
}

/// Builds one rule's result.
struct Rule {
    rule: &'static str,
    metric: Metric,
    inputs: Vec<(String, Reading)>,
}

impl Rule {
    fn new(rule: &'static str, metric: Metric) -> Rule {
        Rule {
            rule,
            metric,
            inputs: Vec::new(),
        }
    }

    fn input(mut self, name: impl Into<String>, r: Reading) -> Rule {
        self.inputs.push((name.into(), r));
        self
    }

    fn limit(self, name: &str, v: f64) -> Rule {
        self.input(name, Reading::Value(v))
    }

    /// The values of the inputs, or the first one without data.
    fn values<const N: usize>(&self) -> Result<[f64; N], (String, NoData)> {
        let mut out = [0.0; N];
        for (slot, (name, r)) in out.iter_mut().zip(&self.inputs) {
            match r {
                Reading::Value(v) => *slot = *v,
                Reading::NoData(why) => return Err((name.clone(), *why)),
            }
        }
        Ok(out)
    }

    fn finish(self, outcome: Outcome, message: String, trigger: Option<TriggerId>) -> RuleResult {
        RuleResult {
            rule: self.rule,
            metric: self.metric,
            inputs: self.inputs,
            outcome,
            message,
            trigger,
        }
    }

    /// Evaluate with `check` over the input values; no data short-circuits.
    fn eval<const N: usize>(
        self,
        fired: Outcome,
        trigger: Option<TriggerId>,
        check: impl FnOnce([f64; N]) -> (bool, String),
    ) -> RuleResult {
        match self.values::<N>() {
            Err((name, why)) => {
                let msg = format!("no data for {name} ({}); cannot judge {}", why.describe(), self.metric);
                self.finish(Outcome::NoData, msg, None)
            }
            Ok(v) => {
                let (hit, msg) = check(v);
                if hit {
                    self.finish(fired, msg, trigger)
                } else {
                    self.finish(Outcome::Pass, msg, None)
                }
            }
        }
    }
}

fn pct(v: f64) -> String {
    format!("{} %", round(v * 100.0))
}

fn round(v: f64) -> f64 {
    (v * 10_000.0).round() / 10_000.0
}

/// Apply the rules (see the module docs) to `m` and decide.
///
/// # Examples
/// ```
/// use erlmcp_rollout::deploy::canary::{decide, CanaryMetrics, Decision, Thresholds};
/// let m = CanaryMetrics::from_json(br#"{
///   "canary": {"requests": 5000, "error_rate": 0.0002, "latency_p95_ms": 6, "latency_p99_ms": 12,
///              "cpu": 0.4, "memory": 0.5, "restarts": 0},
///   "stable": {"requests": 95000, "error_rate": 0, "latency_p95_ms": 5, "latency_p99_ms": 11,
///              "cpu": 0.4, "memory": 0.5, "restarts": 0}
/// }"#)?;
/// // 0.02 % against a zero baseline: above 2 x 0, but within the 0.05 % floor.
/// let v = decide(&m, &Thresholds::default());
/// assert_eq!(v.decision, Decision::Promote);
///
/// let mut strict = Thresholds::default();
/// strict.error_rate_floor = 0.0001;
/// let v = decide(&m, &strict);
/// assert_eq!(v.decision, Decision::Rollback);
/// assert_eq!(v.rules[2].rule, "error_rate_vs_stable");
/// # Ok::<(), erlmcp_rollout::deploy::canary::CanaryError>(())
/// ```
pub fn decide(m: &CanaryMetrics, t: &Thresholds) -> Verdict {
    decide_with(m, t, &DecideOptions::default())
}

/// Options of [`decide_with`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecideOptions {
    /// Metrics nobody measures here (e.g. CPU without a query): their rules are
    /// left out instead of reporting no data.
    pub unjudged: Vec<Metric>,
    /// There is no stable side (all traffic is on the canary, a 100 % stage):
    /// the canary-vs-stable rules are left out and `min_requests` and
    /// freshness apply to the canary alone.
    pub no_baseline: bool,
}

/// [`decide`] with [`DecideOptions`].
///
/// # Examples
/// ```
/// use erlmcp_rollout::deploy::canary::{decide_with, CanaryMetrics, Decision, DecideOptions, Metric, Thresholds};
/// let m = CanaryMetrics::from_json(br#"{
///   "canary": {"requests": 5000, "error_rate": 0.0002, "latency_p95_ms": 6, "latency_p99_ms": 12},
///   "stable": {"requests": 0}
/// }"#)?;
/// let opts = DecideOptions { unjudged: vec![Metric::Cpu, Metric::Memory, Metric::Restarts], no_baseline: true };
/// assert_eq!(decide_with(&m, &Thresholds::default(), &opts).decision, Decision::Promote);
/// # Ok::<(), erlmcp_rollout::deploy::canary::CanaryError>(())
/// ```
pub fn decide_with(m: &CanaryMetrics, t: &Thresholds, opts: &DecideOptions) -> Verdict {
    let mut m = *m;
    if opts.no_baseline {
        // The canary is its own reference: the relative rules are dropped
        // below, and the two-sided checks see the canary on both sides.
        m.stable = m.canary;
    }
    let m = &m;
    let c = &m.canary;
    let s = &m.stable;
    let mut rules = Vec::new();

    rules.push(
        Rule::new("restarts", Metric::Restarts)
            .input("canary.restarts", c.restarts)
            .limit("max_restarts", t.max_restarts)
            .eval(Outcome::Rollback, Some(TriggerId::PodCrashLoop), |[r, max]| {
                (r > max, format!("canary restarted {r} time(s) (allowed: {max})"))
            }),
    );
    rules.push(
        Rule::new("error_rate", Metric::ErrorRate)
            .input("canary.error_rate", c.error_rate)
            .limit("max_error_rate", t.max_error_rate)
            .eval(Outcome::Rollback, Some(TriggerId::ErrorRateAbsolute), |[e, max]| {
                let cmp = if e > max { ">" } else { "<=" };
                (e > max, format!("canary error rate {} {cmp} {}", pct(e), pct(max)))
            }),
    );
    rules.push(
        Rule::new("error_rate_vs_stable", Metric::ErrorRate)
            .input("canary.error_rate", c.error_rate)
            .input("stable.error_rate", s.error_rate)
            .limit("error_rate_ratio", t.error_rate_ratio)
            .limit("error_rate_floor", t.error_rate_floor)
            .eval(
                Outcome::Rollback,
                Some(TriggerId::ErrorRateRelative),
                |[ce, se, k, floor]| relative("error rate", ce, se, k, floor, pct),
            ),
    );
    for side in Side::BOTH {
        if let Some(r) = freshness_rule(side, m.side(side).freshness) {
            rules.push(r);
        }
    }
    rules.push(
        Rule::new("min_requests", Metric::Requests)
            .input("canary.requests", c.requests)
            .input("stable.requests", s.requests)
            .limit("min_requests", t.min_requests)
            .eval(Outcome::Continue, None, |[cr, sr, min]| {
                let low = cr < min || sr < min;
                let msg = if low {
                    format!("too little traffic to judge: canary {cr}, stable {sr} requests (minimum {min} each)")
                } else {
                    format!("canary {cr}, stable {sr} requests (minimum {min} each)")
                };
                (low, msg)
            }),
    );
    let ms = |v: f64| format!("{} ms", round(v));
    rules.push(
        Rule::new("latency_p95", Metric::LatencyP95Ms)
            .input("canary.latency_p95_ms", c.latency_p95_ms)
            .limit("max_latency_p95_ms", t.max_latency_p95_ms)
            .eval(Outcome::Warn, None, |[l, max]| above("canary p95 latency", l, max, ms)),
    );
    rules.push(
        Rule::new("latency_p95_vs_stable", Metric::LatencyP95Ms)
            .input("canary.latency_p95_ms", c.latency_p95_ms)
            .input("stable.latency_p95_ms", s.latency_p95_ms)
            .limit("latency_ratio", t.latency_ratio)
            .limit("latency_floor_ms", t.latency_floor_ms)
            .eval(Outcome::Warn, Some(TriggerId::LatencyRelative), |[cl, sl, k, floor]| {
                relative("p95 latency", cl, sl, k, floor, ms)
            }),
    );
    rules.push(
        Rule::new("latency_p99", Metric::LatencyP99Ms)
            .input("canary.latency_p99_ms", c.latency_p99_ms)
            .limit("max_latency_p99_ms", t.max_latency_p99_ms)
            .eval(Outcome::Warn, None, |[l, max]| above("canary p99 latency", l, max, ms)),
    );
    rules.push(
        Rule::new("cpu", Metric::Cpu)
            .input("canary.cpu", c.cpu)
            .limit("max_cpu", t.max_cpu)
            .eval(Outcome::Warn, None, |[u, max]| above("canary CPU usage", u, max, pct)),
    );
    rules.push(
        Rule::new("memory", Metric::Memory)
            .input("canary.memory", c.memory)
            .limit("max_memory", t.max_memory)
            .eval(Outcome::Warn, None, |[u, max]| {
                above("canary memory usage", u, max, pct)
            }),
    );
    rules.retain(|r| {
        let relative = matches!(r.rule, "error_rate_vs_stable" | "latency_p95_vs_stable");
        !(opts.unjudged.contains(&r.metric) || (opts.no_baseline && relative))
    });
    if opts.no_baseline {
        // One freshness rule (the canary's), not a copy for "stable".
        let mut seen_freshness = false;
        rules.retain(|r| {
            let dup = r.rule == "freshness" && seen_freshness;
            seen_freshness |= r.rule == "freshness";
            !dup
        });
        // min_requests saw the canary on both sides: say so once.
        for r in rules.iter_mut().filter(|r| r.rule == "min_requests") {
            r.inputs.retain(|(name, _)| name != "stable.requests");
            if let [(_, Reading::Value(n)), (_, Reading::Value(min))] = r.inputs[..] {
                r.message = if r.outcome == Outcome::Continue {
                    format!("too little traffic to judge: canary {n} requests (minimum {min}; no stable cohort)")
                } else {
                    format!("canary {n} requests (minimum {min}; no stable cohort)")
                };
            }
        }
    }

    finish(rules, t)
}

fn above(what: &str, v: f64, max: f64, unit: impl Fn(f64) -> String) -> (bool, String) {
    let cmp = if v > max { ">" } else { "<=" };
    (v > max, format!("{what} {} {cmp} {}", unit(v), unit(max)))
}

/// `canary > k * stable && canary > floor`, with a message that explains it.
fn relative(what: &str, c: f64, s: f64, k: f64, floor: f64, unit: impl Fn(f64) -> String) -> (bool, String) {
    let limit = k * s;
    let hit = c > limit && c > floor;
    let msg = if hit {
        format!(
            "canary {what} {} > {k} x stable {} and above the {} floor",
            unit(c),
            unit(s),
            unit(floor)
        )
    } else if c <= floor {
        format!("canary {what} {} is within the {} floor", unit(c), unit(floor))
    } else {
        format!("canary {what} {} <= {k} x stable {}", unit(c), unit(s))
    };
    (hit, msg)
}

fn freshness_rule(side: Side, f: Freshness) -> Option<RuleResult> {
    let name = side.as_str();
    let rule = Rule::new("freshness", Metric::Requests);
    let no_data = |rule: Rule, msg: String| Some(rule.finish(Outcome::NoData, msg, None));
    match f {
        Freshness::Unchecked => None,
        Freshness::Fresh { age_seconds } => {
            let rule = rule.input(format!("{name}.last_sample_age_seconds"), Reading::Value(age_seconds));
            let msg = format!("{name}: newest sample {age_seconds} s old, targets up");
            Some(rule.finish(Outcome::Pass, msg, None))
        }
        Freshness::Stale {
            age_seconds,
            max_age_seconds,
        } => {
            let rule = rule
                .input(format!("{name}.last_sample_age_seconds"), Reading::Value(age_seconds))
                .input("max_sample_age_seconds", Reading::Value(max_age_seconds));
            let msg = format!("{name}: stale data, newest sample {age_seconds} s old (allowed: {max_age_seconds} s)");
            no_data(rule, msg)
        }
        Freshness::TargetDown => {
            let rule = rule.input(format!("{name}.up"), Reading::Value(0.0));
            no_data(rule, format!("{name}: a target is down (up == 0)"))
        }
        Freshness::Unknown { reason, check } => {
            let rule = rule.input(format!("{name}.{check}"), Reading::NoData(reason));
            let msg = format!("{name}: no data for the {check} check ({})", reason.describe());
            no_data(rule, msg)
        }
    }
}

fn finish(mut rules: Vec<RuleResult>, t: &Thresholds) -> Verdict {
    let mut decision = Decision::Promote;
    let mut warnings = Vec::new();
    for r in &mut rules {
        let d = match r.outcome {
            Outcome::Pass => Decision::Promote,
            Outcome::Warn => {
                warnings.push(Warning {
                    metric: r.metric,
                    rule: r.rule,
                    message: format!("{} (manual review)", r.message),
                });
                if t.hold_on_warning {
                    Decision::Continue
                } else {
                    Decision::Promote
                }
            }
            Outcome::Continue => Decision::Continue,
            Outcome::NoData => {
                let message = format!("{}; not promoting", r.message);
                // Two rules that lack the same input say the same thing once.
                if !warnings.iter().any(|w: &Warning| w.message == message) {
                    warnings.push(Warning {
                        metric: r.metric,
                        rule: r.rule,
                        message,
                    });
                }
                match t.on_no_data {
                    NoDataPolicy::Continue => Decision::Continue,
                    NoDataPolicy::Rollback => {
                        r.trigger = Some(TriggerId::HealthCheckFailures);
                        Decision::Rollback
                    }
                }
            }
            Outcome::Rollback => Decision::Rollback,
        };
        decision = decision.max(d);
    }
    let mut ids: Vec<TriggerId> = rules.iter().filter_map(|r| r.trigger).collect();
    ids.sort();
    ids.dedup();
    Verdict {
        decision,
        warnings,
        rules,
        triggers: ids.into_iter().map(trigger).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
