//! The canary's rules: thresholds, each rule's outcome with its inputs, and
//! the verdict (the worst outcome wins; no data is never a promote).

use std::fmt;
use std::path::Path;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use super::input::{read, *};
use super::CanaryError;
use crate::deploy::plan::{trigger, Trigger, TriggerId};

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
