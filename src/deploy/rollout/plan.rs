//! The rollout plan file (JSON; DESIGN §6.6): stages, judgement interval,
//! limits, thresholds and PromQL templates. Strictly validated, every problem
//! reported with its JSON path and position, like the flags config.
//!
//! ```json
//! {
//!   "stages": [{"percent": 5, "observe": "60m"}, {"percent": 25, "observe": "30m"},
//!              {"percent": 50, "observe": "30m"}, {"percent": 100, "observe": "60m"}],
//!   "interval": "1m",
//!   "rollback_to": 0,
//!   "failure_limit": 0,
//!   "inconclusive_limit": 5,
//!   "consecutive_error_limit": 4,
//!   "on_inconclusive": "pause",
//!   "max_sample_age": "2m",
//!   "significance": 0.05,
//!   "thresholds": {"max_error_rate": 0.001},
//!   "queries": {"requests": "sum(increase(erlmcp_flag_requests_total{flag=\"{flag}\",cohort=\"{cohort}\"}[{range}]))"}
//! }
//! ```
//! Every key is optional; the defaults are [`RolloutPlan::default`] (the
//! reference ramp 5/25/50/100 % observing 60/30/30/60 min).

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::deploy::canary::Thresholds;
use crate::deploy::plan::{Ramp, RampStage};
use crate::json::{self, Kind, Node};

/// A problem in a plan file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} problem(s) in the rollout plan:\n  {}", .0.len(), .0.join("\n  "))]
pub struct PlanProblems(pub Vec<String>);

/// One stage: publish `percent`, then observe for `observe`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Stage {
    /// Rollout percentage of the flag, 1..=100.
    pub percent: u8,
    /// How long to observe at this percentage, in milliseconds.
    pub observe_ms: u64,
}

/// What to do when the inconclusive or Prometheus-error limit is passed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitAction {
    /// Pause for `rollout approve` (go on) or `rollout abort` (roll back).
    #[default]
    Pause,
    /// Roll back at once.
    Rollback,
}

/// The PromQL templates. Placeholders: `{flag}` (the flag name), `{cohort}`
/// (`canary` or `stable`), `{range}` (the window so far, e.g. `37s`). An
/// empty `cpu`, `memory`, `restarts` or `last_sample` is not judged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Queries {
    /// Requests of the cohort in the window (a count).
    pub requests: String,
    /// Failed requests of the cohort in the window (a count).
    pub errors: String,
    /// Latency histogram of the cohort in the window: one series per `le`
    /// (`sum by (le) (increase(..._bucket[...]))`), in seconds.
    pub latency_buckets: String,
    /// Unix time of the cohort's newest sample (freshness).
    pub last_sample: String,
    /// CPU usage as a fraction of the limit.
    pub cpu: String,
    /// Memory usage as a fraction of the limit.
    pub memory: String,
    /// Restarts in the window.
    pub restarts: String,
}

/// The documented default metric names (the node exports them).
pub const REQUESTS_METRIC: &str = "erlmcp_flag_requests_total";
/// Failed requests, same labels as [`REQUESTS_METRIC`].
pub const ERRORS_METRIC: &str = "erlmcp_flag_request_errors_total";
/// Latency histogram (seconds), same labels plus `le`.
pub const LATENCY_METRIC: &str = "erlmcp_flag_request_duration_seconds";

impl Default for Queries {
    fn default() -> Self {
        let sel = r#"{flag="{flag}",cohort="{cohort}"}"#;
        Queries {
            requests: format!("sum(increase({REQUESTS_METRIC}{sel}[{{range}}]))"),
            errors: format!("sum(increase({ERRORS_METRIC}{sel}[{{range}}]))"),
            latency_buckets: format!("sum by (le) (increase({LATENCY_METRIC}_bucket{sel}[{{range}}]))"),
            last_sample: format!("max(timestamp({REQUESTS_METRIC}{sel}))"),
            cpu: String::new(),
            memory: String::new(),
            restarts: String::new(),
        }
    }
}

impl Queries {
    const NAMES: [&'static str; 7] = [
        "requests",
        "errors",
        "latency_buckets",
        "last_sample",
        "cpu",
        "memory",
        "restarts",
    ];

    fn slot(&mut self, name: &str) -> Option<&mut String> {
        Some(match name {
            "requests" => &mut self.requests,
            "errors" => &mut self.errors,
            "latency_buckets" => &mut self.latency_buckets,
            "last_sample" => &mut self.last_sample,
            "cpu" => &mut self.cpu,
            "memory" => &mut self.memory,
            "restarts" => &mut self.restarts,
            _ => return None,
        })
    }

    /// A template with its placeholders filled in.
    pub fn render(template: &str, flag: &str, cohort: &str, range: &str) -> String {
        let esc = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"");
        template
            .replace("{flag}", &esc(flag))
            .replace("{cohort}", &esc(cohort))
            .replace("{range}", range)
    }
}

/// A validated rollout plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RolloutPlan {
    /// Stages, percentages strictly rising, the last at 100.
    pub stages: Vec<Stage>,
    /// Time between judgements inside a window (ms).
    pub interval_ms: u64,
    /// The percentage a rollback publishes (default 0).
    pub rollback_to: u8,
    /// Rollback verdicts tolerated in a stage before rolling back (default 0:
    /// the first one rolls back).
    pub failure_limit: u32,
    /// Consecutive inconclusive judgements tolerated (default 5); one more
    /// triggers `on_inconclusive`.
    pub inconclusive_limit: u32,
    /// Consecutive judgements without an answer from Prometheus tolerated
    /// (default 4); one more triggers `on_inconclusive`.
    pub consecutive_error_limit: u32,
    /// What passing either limit does (default pause).
    pub on_inconclusive: LimitAction,
    /// A cohort whose newest sample is older than this is stale (ms; default 2 min).
    pub max_sample_age_ms: u64,
    /// One-sided significance level of the statistical tests (default 0.05).
    pub significance: f64,
    /// The `canary decide` thresholds (`min_requests` is also the minimum
    /// sample of the statistical tests).
    pub thresholds: Thresholds,
    /// PromQL templates.
    pub queries: Queries,
}

impl Default for RolloutPlan {
    fn default() -> Self {
        RolloutPlan::from_ramp(&Ramp::reference())
    }
}

/// Parse a duration: one or more `NUMBER UNIT` groups, units `ms`, `s`, `m`,
/// `h` (e.g. `90s`, `30m`, `1h30m`, `500ms`).
///
/// # Examples
/// ```
/// use erlmcp_rollout::deploy::rollout::plan::parse_duration;
/// assert_eq!(parse_duration("1h30m").unwrap().as_secs(), 5400);
/// assert_eq!(parse_duration("750ms").unwrap().as_millis(), 750);
/// assert!(parse_duration("30").is_none() && parse_duration("").is_none());
/// ```
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, ms) = [("ms", 1u64), ("s", 1000), ("m", 60_000), ("h", 3_600_000)]
            .into_iter()
            .find(|(u, _)| rest.starts_with(u) && !(*u == "m" && rest.starts_with("ms")))?;
        rest = &rest[unit.len()..];
        total = total.checked_add(n.checked_mul(ms)?)?;
    }
    Some(Duration::from_millis(total))
}

/// A duration as the plan writes it (`90s`, `30m`, `1h`, `1500ms`).
pub fn format_duration(ms: u64) -> String {
    if ms % 3_600_000 == 0 && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

impl RolloutPlan {
    /// The defaults with the stages of `ramp` (minutes).
    pub fn from_ramp(ramp: &Ramp) -> RolloutPlan {
        RolloutPlan {
            stages: ramp
                .stages()
                .iter()
                .map(|s: &RampStage| Stage {
                    percent: s.percent,
                    observe_ms: u64::from(s.observe_minutes) * 60_000,
                })
                .collect(),
            interval_ms: 60_000,
            rollback_to: 0,
            failure_limit: 0,
            inconclusive_limit: 5,
            consecutive_error_limit: 4,
            on_inconclusive: LimitAction::Pause,
            max_sample_age_ms: 120_000,
            significance: 0.05,
            thresholds: Thresholds::default(),
            queries: Queries::default(),
        }
    }

    /// Parse and validate a plan file (see the module docs).
    ///
    /// # Errors
    /// [`PlanProblems`] listing every problem with its path and position.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::deploy::rollout::plan::RolloutPlan;
    /// let plan = RolloutPlan::from_json(br#"{"stages": [{"percent": 10, "observe": "90s"},
    ///                                                   {"percent": 100, "observe": "2m"}],
    ///                                        "interval": "10s"}"#)?;
    /// assert_eq!((plan.stages[0].observe_ms, plan.interval_ms), (90_000, 10_000));
    /// let err = RolloutPlan::from_json(br#"{"stages": [{"percent": 50, "observe": "1x"}]}"#).unwrap_err();
    /// assert!(err.to_string().contains("$.stages[0].observe (line 1, column 40)"), "{err}");
    /// # Ok::<(), erlmcp_rollout::deploy::rollout::plan::PlanProblems>(())
    /// ```
    pub fn from_json(input: &[u8]) -> Result<RolloutPlan, PlanProblems> {
        let root = json::parse(input).map_err(|e| PlanProblems(vec![format!("invalid JSON at {e}")]))?;
        let mut plan = RolloutPlan::default();
        let mut p = Vec::new();
        let Kind::Object(members) = &root.kind else {
            return Err(PlanProblems(vec![format!(
                "$ ({}): expected an object, got {}",
                root.pos,
                root.kind.type_name()
            )]));
        };
        let mut seen: Vec<&str> = Vec::new();
        for m in members {
            let path = format!("$.{}", m.key);
            if seen.contains(&m.key.as_str()) {
                p.push(format!("{path} ({}): duplicate key", m.key_pos));
                continue;
            }
            seen.push(&m.key);
            let v = &m.value;
            match m.key.as_str() {
                "stages" => {
                    if let Some(stages) = stages(v, &mut p) {
                        plan.stages = stages;
                    }
                }
                "interval" => {
                    if let Some(ms) = duration(&path, v, &mut p) {
                        plan.interval_ms = ms;
                    }
                }
                "max_sample_age" => {
                    if let Some(ms) = duration(&path, v, &mut p) {
                        plan.max_sample_age_ms = ms;
                    }
                }
                "rollback_to" => {
                    if let Some(n) = integer(&path, v, 0, 99, &mut p) {
                        plan.rollback_to = n as u8;
                    }
                }
                "failure_limit" => {
                    if let Some(n) = integer(&path, v, 0, 1000, &mut p) {
                        plan.failure_limit = n as u32;
                    }
                }
                "inconclusive_limit" => {
                    if let Some(n) = integer(&path, v, 0, 1000, &mut p) {
                        plan.inconclusive_limit = n as u32;
                    }
                }
                "consecutive_error_limit" => {
                    if let Some(n) = integer(&path, v, 0, 1000, &mut p) {
                        plan.consecutive_error_limit = n as u32;
                    }
                }
                "on_inconclusive" => match &v.kind {
                    Kind::String(s) if s == "pause" => plan.on_inconclusive = LimitAction::Pause,
                    Kind::String(s) if s == "rollback" => plan.on_inconclusive = LimitAction::Rollback,
                    _ => p.push(format!("{path} ({}): expected \"pause\" or \"rollback\"", v.pos)),
                },
                "significance" => match number(v) {
                    Some(x) if x > 0.0 && x < 0.5 => plan.significance = x,
                    _ => p.push(format!("{path} ({}): expected a number in (0, 0.5), e.g. 0.05", v.pos)),
                },
                "thresholds" => thresholds(v, &mut plan.thresholds, &mut p),
                "queries" => queries(v, &mut plan.queries, &mut p),
                other => p.push(format!(
                    "$ ({}): unknown key {other:?}; expected one of stages, interval, rollback_to, failure_limit, \
                     inconclusive_limit, consecutive_error_limit, on_inconclusive, max_sample_age, significance, \
                     thresholds, queries",
                    m.key_pos
                )),
            }
        }
        if plan.stages.first().is_some_and(|s| s.percent <= plan.rollback_to) {
            p.push(format!(
                "$.rollback_to: {} must be below the first stage's {} %",
                plan.rollback_to, plan.stages[0].percent
            ));
        }
        if p.is_empty() {
            Ok(plan)
        } else {
            Err(PlanProblems(p))
        }
    }

    /// As [`RolloutPlan::from_json`], reading `path`.
    ///
    /// # Errors
    /// As [`RolloutPlan::from_json`]; an unreadable file is one problem.
    pub fn from_file(path: &std::path::Path) -> Result<RolloutPlan, PlanProblems> {
        let bytes =
            std::fs::read(path).map_err(|e| PlanProblems(vec![format!("cannot read {}: {e}", path.display())]))?;
        RolloutPlan::from_json(&bytes).map_err(|PlanProblems(p)| {
            PlanProblems(p.into_iter().map(|x| format!("{}: {x}", path.display())).collect())
        })
    }

    /// The plan as a plan file (round-trips through [`RolloutPlan::from_json`]).
    pub fn to_json(&self) -> serde_json::Value {
        let stages: Vec<serde_json::Value> = self
            .stages
            .iter()
            .map(|s| serde_json::json!({"percent": s.percent, "observe": format_duration(s.observe_ms)}))
            .collect();
        let on = match self.on_inconclusive {
            LimitAction::Pause => "pause",
            LimitAction::Rollback => "rollback",
        };
        let q = &self.queries;
        serde_json::json!({
            "stages": stages,
            "interval": format_duration(self.interval_ms),
            "rollback_to": self.rollback_to,
            "failure_limit": self.failure_limit,
            "inconclusive_limit": self.inconclusive_limit,
            "consecutive_error_limit": self.consecutive_error_limit,
            "on_inconclusive": on,
            "max_sample_age": format_duration(self.max_sample_age_ms),
            "significance": self.significance,
            "thresholds": self.thresholds,
            "queries": {
                "requests": q.requests, "errors": q.errors, "latency_buckets": q.latency_buckets,
                "last_sample": q.last_sample, "cpu": q.cpu, "memory": q.memory, "restarts": q.restarts,
            },
        })
    }
}

impl fmt::Display for RolloutPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stages: Vec<String> = self
            .stages
            .iter()
            .map(|s| format!("{}% for {}", s.percent, format_duration(s.observe_ms)))
            .collect();
        write!(
            f,
            "{} (judged every {})",
            stages.join(" -> "),
            format_duration(self.interval_ms)
        )
    }
}

fn number(v: &Node) -> Option<f64> {
    match &v.kind {
        Kind::Number(t) => t.parse::<f64>().ok().filter(|x| x.is_finite()),
        _ => None,
    }
}

fn integer(path: &str, v: &Node, min: u64, max: u64, p: &mut Vec<String>) -> Option<u64> {
    match &v.kind {
        Kind::Number(t) => match t.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                p.push(format!("{path} ({}): {t} must be an integer in {min}..={max}", v.pos));
                None
            }
        },
        other => {
            p.push(format!(
                "{path} ({}): expected an integer in {min}..={max}, got {}",
                v.pos,
                other.type_name()
            ));
            None
        }
    }
}

fn duration(path: &str, v: &Node, p: &mut Vec<String>) -> Option<u64> {
    let parsed = match &v.kind {
        Kind::String(s) => parse_duration(s).map(|d| d.as_millis() as u64),
        _ => None,
    };
    match parsed {
        Some(ms) if ms > 0 => Some(ms),
        _ => {
            p.push(format!(
                "{path} ({}): expected a positive duration string such as \"90s\", \"30m\", \"1h30m\"",
                v.pos
            ));
            None
        }
    }
}

fn stages(v: &Node, p: &mut Vec<String>) -> Option<Vec<Stage>> {
    let Kind::Array(items) = &v.kind else {
        p.push(format!(
            "$.stages ({}): expected an array of {{\"percent\": N, \"observe\": DURATION}}",
            v.pos
        ));
        return None;
    };
    if items.is_empty() {
        p.push(format!("$.stages ({}): a plan needs at least one stage", v.pos));
        return None;
    }
    let before = p.len();
    let mut out = Vec::new();
    let mut previous = 0u64;
    for (i, item) in items.iter().enumerate() {
        let base = format!("$.stages[{i}]");
        let Kind::Object(members) = &item.kind else {
            p.push(format!("{base} ({}): expected an object", item.pos));
            continue;
        };
        let (mut percent, mut observe) = (None, None);
        for m in members {
            let path = format!("{base}.{}", m.key);
            match m.key.as_str() {
                "percent" if percent.is_none() => {
                    percent = integer(&path, &m.value, 1, 100, p);
                    if let Some(pc) = percent {
                        if pc <= previous {
                            p.push(format!(
                                "{path} ({}): {pc} must be above the previous stage's {previous}",
                                m.value.pos
                            ));
                        }
                        previous = pc;
                    }
                }
                "observe" if observe.is_none() => observe = duration(&path, &m.value, p),
                "percent" | "observe" => p.push(format!("{path} ({}): duplicate key", m.key_pos)),
                other => p.push(format!(
                    "{base} ({}): unknown key {other:?}; expected percent and observe",
                    m.key_pos
                )),
            }
        }
        match (percent, observe) {
            (Some(percent), Some(observe_ms)) => out.push(Stage {
                percent: percent as u8,
                observe_ms,
            }),
            (None, _) if !members.iter().any(|m| m.key == "percent") => {
                p.push(format!("{base} ({}): missing \"percent\"", item.pos))
            }
            (_, None) if !members.iter().any(|m| m.key == "observe") => {
                p.push(format!("{base} ({}): missing \"observe\"", item.pos))
            }
            _ => {}
        }
    }
    if p.len() == before {
        if let Some(last) = out.last() {
            if last.percent != 100 {
                p.push(format!(
                    "$.stages ({}): the last stage is {} %; a ramp ends at 100 %",
                    v.pos, last.percent
                ));
            }
        }
    }
    (p.len() == before).then_some(out)
}

fn thresholds(v: &Node, t: &mut Thresholds, p: &mut Vec<String>) {
    let Kind::Object(members) = &v.kind else {
        p.push(format!("$.thresholds ({}): expected an object", v.pos));
        return;
    };
    for m in members {
        let path = format!("$.thresholds.{}", m.key);
        let text = match &m.value.kind {
            Kind::Number(n) => n.clone(),
            Kind::Bool(b) => b.to_string(),
            Kind::String(s) => format!("{s:?}"),
            other => {
                p.push(format!("{path} ({}): unexpected {}", m.value.pos, other.type_name()));
                continue;
            }
        };
        if let Err(e) = t.set(&m.key, &text) {
            p.push(format!("{path} ({}): {e}", m.key_pos));
        }
    }
}

fn queries(v: &Node, q: &mut Queries, p: &mut Vec<String>) {
    let Kind::Object(members) = &v.kind else {
        p.push(format!("$.queries ({}): expected an object of PromQL strings", v.pos));
        return;
    };
    for m in members {
        let path = format!("$.queries.{}", m.key);
        let Some(slot) = q.slot(&m.key) else {
            p.push(format!(
                "$.queries ({}): unknown query {:?}; expected one of {}",
                m.key_pos,
                m.key,
                Queries::NAMES.join(", ")
            ));
            continue;
        };
        match &m.value.kind {
            Kind::String(s) => {
                let required = matches!(m.key.as_str(), "requests" | "errors" | "latency_buckets");
                if required && s.trim().is_empty() {
                    p.push(format!("{path} ({}): the {} query cannot be empty", m.value.pos, m.key));
                } else if required && !s.contains("{cohort}") {
                    p.push(format!(
                        "{path} ({}): the query must select a cohort with the {{cohort}} placeholder",
                        m.value.pos
                    ));
                } else {
                    *slot = s.clone();
                }
            }
            other => p.push(format!(
                "{path} ({}): expected a PromQL string, got {}",
                m.value.pos,
                other.type_name()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_reference_ramp() {
        let plan = RolloutPlan::default();
        let s: Vec<(u8, u64)> = plan.stages.iter().map(|s| (s.percent, s.observe_ms / 60_000)).collect();
        assert_eq!(s, [(5, 60), (25, 30), (50, 30), (100, 60)]);
        let again = RolloutPlan::from_json(plan.to_json().to_string().as_bytes()).unwrap();
        assert_eq!(again, plan);
    }

    #[test]
    fn every_problem_is_reported_with_its_position() {
        let err = RolloutPlan::from_json(
            br#"{
  "stages": [{"percent": 50, "observe": "1m"}, {"percent": 25, "observe": "x"}],
  "interval": 5,
  "thresholds": {"max_eror_rate": 0.1},
  "queries": {"requests": "sum(x)"},
  "bogus": 1
}"#,
        )
        .unwrap_err();
        let text = err.0.join("\n");
        for needle in [
            "$.stages[1].percent (line 2, column 60): 25 must be above the previous stage's 50",
            "$.stages[1].observe (line 2, column 75)",
            "$.interval (line 3, column 15)",
            "$.thresholds.max_eror_rate (line 4, column 18): invalid thresholds: unknown threshold",
            "$.queries.requests (line 5, column 27)",
            "$ (line 6, column 3): unknown key \"bogus\"",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        assert_eq!(err.0.len(), 6, "{text}");
        assert!(RolloutPlan::from_json(br#"{"stages": [{"percent": 50, "observe": "1m"}]}"#).is_err());
        assert!(RolloutPlan::from_json(
            br#"{"stages": [{"percent": 5, "observe": "1m"}, {"percent": 100, "observe": "1m"}], "rollback_to": 5}"#
        )
        .is_err());
    }
}
