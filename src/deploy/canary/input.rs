//! The canary's input: per-side metric readings, where "no data" is a value,
//! and the strict metrics-file reader.

use std::fmt;
use std::path::Path;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use super::CanaryError;
use crate::json::{self, Kind, Node};

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

pub(super) fn read(path: &Path) -> Result<Vec<u8>, CanaryError> {
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
