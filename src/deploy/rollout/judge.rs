//! One judgement of a window (DESIGN §6.6): read canary and stable cohorts
//! from Prometheus over the window so far, apply the `canary decide` rules and
//! the statistical tests, and classify.
//!
//! | outcome | when |
//! |---|---|
//! | `rollback` | a `canary decide` rollback rule fires (absolute error rate, error rate > k x stable, restarts), or the error-rate test finds the canary worse (p < `significance`) with its rate above `error_rate_floor` |
//! | `approval` | a rule that wants manual review fires: p95 > k x stable **confirmed** by the histogram test (matrix row "Latency >1.5x baseline", approval SRE on-call), or an absolute warning (p95, p99, CPU, memory) |
//! | `inconclusive` | no data, NaN, a stale cohort, too few requests, a test without enough sample, or a p95 above k x stable that the histogram test does not confirm |
//! | `error` | Prometheus did not answer (counts toward `consecutive_error_limit`) |
//! | `pass` | none of the above |
//!
//! Rules acknowledged by `rollout approve` in the current stage do not ask
//! for approval again. At 100 % there is no stable cohort: the relative rules
//! and the tests do not apply, and the canary is judged on the absolute rules.

use serde::Serialize;
use serde_json::{json, Value};

use super::plan::{Queries, RolloutPlan};
use super::stats::{compare_histograms, two_proportion, Histogram, HistogramComparison, Test};
use crate::deploy::canary::{
    decide_with, CanaryMetrics, DecideOptions, Decision, Freshness, Metric, NoData, Outcome, Reading, Side, Verdict,
};
use crate::deploy::plan::{trigger, TriggerId};
use crate::deploy::prometheus::{parse_value, Client, PrometheusError, QueryResult};

/// The class of a judgement (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JudgementOutcome {
    /// Healthy.
    Pass,
    /// Prometheus did not answer.
    Error,
    /// Not enough evidence either way.
    Inconclusive,
    /// Manual review needed: pause.
    Approval,
    /// Roll back.
    Rollback,
}

impl JudgementOutcome {
    /// snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            JudgementOutcome::Pass => "pass",
            JudgementOutcome::Error => "error",
            JudgementOutcome::Inconclusive => "inconclusive",
            JudgementOutcome::Approval => "approval",
            JudgementOutcome::Rollback => "rollback",
        }
    }
}

/// The statistical tests of a judgement.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Tests {
    /// Error rate, canary vs stable (two-proportion z-test).
    pub error_rate: Test,
    /// Latency histograms, canary vs stable (Mann-Whitney on the buckets).
    pub latency: Option<HistogramComparison>,
}

/// One judgement.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Judgement {
    /// Evaluation time, unix seconds.
    pub at: f64,
    /// The range the queries covered (the window so far), e.g. `37s`.
    pub range: String,
    /// The class.
    pub outcome: JudgementOutcome,
    /// Why, in one line.
    pub summary: String,
    /// Every rule and test as `OUTCOME NAME: message`.
    pub rules: Vec<String>,
    /// The rules asking for approval (names to acknowledge).
    pub approval_rules: Vec<String>,
    /// Who approves, from the rollback matrix.
    pub approver: Option<String>,
    /// Matrix rows cited.
    pub triggers: Vec<TriggerId>,
    /// The metric values behind it.
    pub values: Value,
    /// The tests.
    pub tests: Option<Tests>,
    /// The `canary decide` verdict.
    #[serde(skip)]
    pub verdict: Option<Verdict>,
}

/// What one cohort's queries returned.
struct Cohort {
    requests: Reading,
    errors: Reading,
    histogram: Result<Histogram, String>,
    last_sample: Option<Reading>,
    extra: Vec<(Metric, Reading)>,
}

fn single(client: &Client, query: &str, at: f64) -> Result<Reading, PrometheusError> {
    client.query(query, Some(at))?.single(query)
}

fn cohort(
    client: &Client,
    plan: &RolloutPlan,
    flag: &str,
    side: Side,
    range: &str,
    at: f64,
) -> Result<Cohort, PrometheusError> {
    let q = &plan.queries;
    let render = |t: &str| Queries::render(t, flag, side.as_str(), range);
    let requests = single(client, &render(&q.requests), at)?;
    let errors = single(client, &render(&q.errors), at)?;
    let hq = render(&q.latency_buckets);
    let histogram = match client.query(&hq, Some(at))? {
        QueryResult::Vector(samples) if samples.is_empty() => Err("no series".to_owned()),
        QueryResult::Vector(samples) => {
            let mut pairs = Vec::with_capacity(samples.len());
            let mut bad = None;
            for s in samples {
                match s.labels.get("le").and_then(|le| parse_value(le)) {
                    Some(le) => pairs.push((le, s.value)),
                    None => bad = Some("a bucket series without a numeric le label (aggregate with sum by (le))"),
                }
            }
            match bad {
                Some(b) => Err(b.to_owned()),
                None => Histogram::from_cumulative(pairs),
            }
        }
        _ => Err("the latency query must return an instant vector, one series per le".to_owned()),
    };
    let last_sample = if q.last_sample.trim().is_empty() {
        None
    } else {
        Some(single(client, &render(&q.last_sample), at)?)
    };
    let mut extra = Vec::new();
    for (m, t) in [
        (Metric::Cpu, &q.cpu),
        (Metric::Memory, &q.memory),
        (Metric::Restarts, &q.restarts),
    ] {
        if !t.trim().is_empty() {
            extra.push((m, single(client, &render(t), at)?));
        }
    }
    Ok(Cohort {
        requests,
        errors,
        histogram,
        last_sample,
        extra,
    })
}

fn reading_json(r: Reading) -> Value {
    match r {
        Reading::Value(v) => json!((v * 1e6).round() / 1e6),
        Reading::NoData(why) => json!({"no_data": why.describe()}),
    }
}

/// Judge the window `[at - window_seconds, at]` at `percent` % (see the module docs).
pub fn judge(
    client: &Client,
    plan: &RolloutPlan,
    flag: &str,
    percent: u8,
    window_seconds: f64,
    at: f64,
    acknowledged: &[String],
) -> Judgement {
    let range_ms = (window_seconds * 1000.0).ceil().max(1000.0) as u64;
    let range = format!("{range_ms}ms");
    let mut j = Judgement {
        at,
        range: range.clone(),
        outcome: JudgementOutcome::Error,
        summary: String::new(),
        rules: Vec::new(),
        approval_rules: Vec::new(),
        approver: None,
        triggers: Vec::new(),
        values: Value::Null,
        tests: None,
        verdict: None,
    };
    let no_baseline = percent >= 100;
    let read = cohort(client, plan, flag, Side::Canary, &range, at).and_then(|c| {
        let s = if no_baseline {
            None
        } else {
            Some(cohort(client, plan, flag, Side::Stable, &range, at)?)
        };
        Ok((c, s))
    });
    let (canary, stable) = match read {
        Ok(x) => x,
        Err(e) => {
            j.summary = format!("no answer from Prometheus: {e}");
            j.rules.push(format!("error prometheus: {e}"));
            return j;
        }
    };
    let t = &plan.thresholds;
    let max_age = plan.max_sample_age_ms as f64 / 1000.0;
    let to_side = |c: &Cohort| {
        let mut m = crate::deploy::canary::SideMetrics {
            requests: c.requests,
            ..Default::default()
        };
        m.error_rate = match (c.errors, c.requests) {
            (Reading::Value(e), Reading::Value(n)) if n > 0.0 => Reading::from_f64((e / n).min(1.0)),
            (Reading::Value(_), Reading::Value(_)) => Reading::NoData(NoData::Nan),
            (Reading::NoData(w), _) | (_, Reading::NoData(w)) => Reading::NoData(w),
        };
        let q = |p: f64| match &c.histogram {
            Ok(h) => h
                .quantile(p)
                .map_or(Reading::NoData(NoData::Nan), |s| Reading::from_f64(s * 1000.0)),
            Err(_) => Reading::NoData(NoData::Empty),
        };
        m.latency_p95_ms = q(0.95);
        m.latency_p99_ms = q(0.99);
        for (metric, r) in &c.extra {
            m.set(*metric, *r);
        }
        m.freshness = match c.last_sample {
            None => Freshness::Unchecked,
            Some(Reading::Value(ts)) => {
                let age_seconds = ((at - ts) * 1000.0).round() / 1000.0;
                if age_seconds > max_age {
                    Freshness::Stale {
                        age_seconds,
                        max_age_seconds: max_age,
                    }
                } else {
                    Freshness::Fresh { age_seconds }
                }
            }
            Some(Reading::NoData(reason)) => Freshness::Unknown {
                reason,
                check: "last_sample",
            },
        };
        m
    };
    let mut metrics = CanaryMetrics {
        canary: to_side(&canary),
        ..Default::default()
    };
    if let Some(s) = &stable {
        metrics.stable = to_side(s);
    }
    let mut unjudged = Vec::new();
    for (m, tpl) in [
        (Metric::Cpu, &plan.queries.cpu),
        (Metric::Memory, &plan.queries.memory),
        (Metric::Restarts, &plan.queries.restarts),
    ] {
        if tpl.trim().is_empty() {
            unjudged.push(m);
        }
    }
    let verdict = decide_with(&metrics, t, &DecideOptions { unjudged, no_baseline });

    let mut outcome = JudgementOutcome::Pass;
    let mut reasons: Vec<String> = Vec::new();
    let bump = |o: JudgementOutcome, why: String, outcome: &mut JudgementOutcome, reasons: &mut Vec<String>| {
        if o > *outcome {
            *outcome = o;
            reasons.clear();
        }
        if o == *outcome && o != JudgementOutcome::Pass {
            reasons.push(why);
        }
    };
    let mut latency_relative_fired = false;
    for r in &verdict.rules {
        j.rules
            .push(format!("{} {}: {}", r.outcome.as_str(), r.rule, r.message));
        match r.outcome {
            Outcome::Pass => {}
            Outcome::Rollback => bump(
                JudgementOutcome::Rollback,
                r.message.clone(),
                &mut outcome,
                &mut reasons,
            ),
            Outcome::NoData | Outcome::Continue => bump(
                JudgementOutcome::Inconclusive,
                r.message.clone(),
                &mut outcome,
                &mut reasons,
            ),
            Outcome::Warn if r.rule == "latency_p95_vs_stable" => latency_relative_fired = true,
            Outcome::Warn => {
                if !acknowledged.iter().any(|a| a == r.rule) {
                    j.approval_rules.push(r.rule.to_owned());
                    bump(
                        JudgementOutcome::Approval,
                        format!("{} (manual review)", r.message),
                        &mut outcome,
                        &mut reasons,
                    );
                }
            }
        }
    }
    if verdict.decision == Decision::Rollback && outcome != JudgementOutcome::Rollback {
        // on_no_data = rollback turns missing data into a health-check rollback.
        bump(
            JudgementOutcome::Rollback,
            "no data, and the thresholds say on_no_data = rollback".into(),
            &mut outcome,
            &mut reasons,
        );
    }
    j.triggers = verdict.triggers.iter().map(|t| t.id).collect();

    let mut tests = None;
    if let Some(s) = &stable {
        let val = |r: Reading| r.value().unwrap_or(f64::NAN);
        let et = two_proportion(
            val(canary.errors),
            val(canary.requests),
            val(s.errors),
            val(s.requests),
            t.min_requests,
        );
        match &et {
            Test::Done { z, p_value } => {
                let rate = |c: &Cohort| val(c.errors) / val(c.requests);
                let worse = *p_value < plan.significance && rate(&canary) > t.error_rate_floor;
                let msg = format!(
                    "canary error rate {:.4} % vs stable {:.4} %: z = {z:.3}, one-sided p = {p_value:.3e} (significance {})",
                    rate(&canary) * 100.0,
                    rate(s) * 100.0,
                    plan.significance
                );
                if worse {
                    j.rules.push(format!("rollback error_rate_test: {msg}"));
                    if !j.triggers.contains(&TriggerId::ErrorRateRelative) {
                        j.triggers.push(TriggerId::ErrorRateRelative);
                    }
                    bump(
                        JudgementOutcome::Rollback,
                        format!("{msg}: significantly worse"),
                        &mut outcome,
                        &mut reasons,
                    );
                } else {
                    j.rules.push(format!("pass error_rate_test: {msg}"));
                }
            }
            Test::Inconclusive { reason } => {
                j.rules.push(format!("no_data error_rate_test: {reason}"));
                bump(
                    JudgementOutcome::Inconclusive,
                    reason.clone(),
                    &mut outcome,
                    &mut reasons,
                );
            }
        }
        let lat = match (&canary.histogram, &s.histogram) {
            (Ok(hc), Ok(hs)) => Some(compare_histograms(hc, hs, t.min_requests)),
            _ => None,
        };
        let confirmed = match &lat {
            Some(HistogramComparison {
                test: Test::Done { z, p_value },
                prob_canary_slower,
                ..
            }) => {
                let msg = format!(
                    "P(canary slower) = {:.3}, Mann-Whitney z = {z:.3}, one-sided p = {p_value:.3e}",
                    prob_canary_slower.unwrap_or(f64::NAN)
                );
                let sig = *p_value < plan.significance;
                j.rules.push(format!(
                    "{} latency_histogram_test: {msg}",
                    if sig { "slower" } else { "pass" }
                ));
                Some(sig)
            }
            Some(HistogramComparison {
                test: Test::Inconclusive { reason },
                ..
            }) => {
                j.rules.push(format!("no_data latency_histogram_test: {reason}"));
                bump(
                    JudgementOutcome::Inconclusive,
                    reason.clone(),
                    &mut outcome,
                    &mut reasons,
                );
                None
            }
            None => {
                let why = match (&canary.histogram, &s.histogram) {
                    (Err(e), _) => format!("canary latency histogram: {e}"),
                    (_, Err(e)) => format!("stable latency histogram: {e}"),
                    _ => String::new(),
                };
                j.rules.push(format!("no_data latency_histogram_test: {why}"));
                bump(JudgementOutcome::Inconclusive, why, &mut outcome, &mut reasons);
                None
            }
        };
        if latency_relative_fired && !acknowledged.iter().any(|a| a == "latency_p95_vs_stable") {
            let msg = verdict
                .rules
                .iter()
                .find(|r| r.rule == "latency_p95_vs_stable")
                .map_or_else(String::new, |r| r.message.clone());
            match confirmed {
                Some(true) => {
                    j.approval_rules.push("latency_p95_vs_stable".into());
                    j.approver = trigger(TriggerId::LatencyRelative).approval.map(str::to_owned);
                    bump(
                        JudgementOutcome::Approval,
                        format!("{msg}, confirmed by the histogram test (approval: SRE on-call)"),
                        &mut outcome,
                        &mut reasons,
                    );
                }
                _ => bump(
                    JudgementOutcome::Inconclusive,
                    format!("{msg}, not confirmed by the histogram test"),
                    &mut outcome,
                    &mut reasons,
                ),
            }
        }
        tests = Some(Tests {
            error_rate: et,
            latency: lat,
        });
    }
    if outcome == JudgementOutcome::Approval && j.approver.is_none() {
        j.approver = Some("SRE on-call".into());
    }
    j.outcome = outcome;
    j.summary = if reasons.is_empty() {
        if no_baseline {
            "canary within every absolute limit (100 %: no stable cohort to compare)".into()
        } else {
            "canary within every limit and not worse than stable".into()
        }
    } else {
        // Several rules lacking the same input say the same thing: once each,
        // and the first few (every rule is in `rules`).
        let mut unique: Vec<&String> = Vec::new();
        for r in &reasons {
            if !unique.contains(&r) {
                unique.push(r);
            }
        }
        let shown: Vec<&str> = unique.iter().take(3).map(|s| s.as_str()).collect();
        let more = unique.len().saturating_sub(shown.len());
        if more > 0 {
            format!("{} (+{more} more)", shown.join("; "))
        } else {
            shown.join("; ")
        }
    };
    let side_values = |m: &crate::deploy::canary::SideMetrics, c: &Cohort| {
        let mut o = json!({
            "requests": reading_json(m.requests),
            "errors": reading_json(c.errors),
            "error_rate": reading_json(m.error_rate),
            "latency_p95_ms": reading_json(m.latency_p95_ms),
            "latency_p99_ms": reading_json(m.latency_p99_ms),
        });
        for (metric, r) in &c.extra {
            o[metric.as_str()] = reading_json(*r);
        }
        if let Ok(h) = &c.histogram {
            o["latency_buckets"] = json!(h
                .buckets
                .iter()
                .map(|(le, n)| json!([
                    if le.is_finite() { json!(le) } else { json!("+Inf") },
                    (n * 1000.0).round() / 1000.0
                ]))
                .collect::<Vec<_>>());
        }
        o["freshness"] = serde_json::to_value(m.freshness).unwrap_or(Value::Null);
        o
    };
    j.values = json!({"canary": side_values(&metrics.canary, &canary)});
    if let Some(s) = &stable {
        j.values["stable"] = side_values(&metrics.stable, s);
    }
    j.tests = tests;
    j.verdict = Some(verdict);
    j
}
