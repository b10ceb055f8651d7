//! Canary rules from the user's side: the fixtures, the limits, and properties
//! that no-data inputs never promote and zero baselines never divide.

use erlmcp_rollout::deploy::canary::{
    decide, CanaryMetrics, Decision, Metric, NoData, NoDataPolicy, Outcome, Reading, Side, SideMetrics, Thresholds,
};
use proptest::prelude::*;

fn fixture(name: &str) -> CanaryMetrics {
    let path = format!("{}/tests/fixtures/deploy/{name}.json", env!("CARGO_MANIFEST_DIR"));
    CanaryMetrics::from_file(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn verdict(name: &str) -> Decision {
    decide(&fixture(name), &Thresholds::default()).decision
}

#[test]
fn fixtures_decide_as_documented() {
    assert_eq!(verdict("healthy"), Decision::Promote);
    assert_eq!(verdict("failing"), Decision::Rollback);
    assert_eq!(verdict("restarts"), Decision::Rollback);
    assert_eq!(verdict("low_traffic"), Decision::Continue);
    assert_eq!(verdict("no_data"), Decision::Continue);
    assert_eq!(verdict("zero_baseline"), Decision::Promote);
    assert_eq!(verdict("slow"), Decision::Promote);
    assert!(CanaryMetrics::from_file(format!(
        "{}/tests/fixtures/deploy/invalid.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .is_err());
}

#[test]
fn slow_canary_warns_by_metric_name() {
    let v = decide(&fixture("slow"), &Thresholds::default());
    let named: Vec<&str> = v.warnings.iter().map(|w| w.metric.as_str()).collect();
    assert_eq!(named, ["latency_p95_ms", "latency_p95_ms", "latency_p99_ms", "cpu"]);
    assert!(v.warnings.iter().all(|w| w.message.contains("manual review")));
    // Holding on warnings turns the promote into a continue.
    let hold = Thresholds {
        hold_on_warning: true,
        ..Thresholds::default()
    };
    assert_eq!(decide(&fixture("slow"), &hold).decision, Decision::Continue);
}

#[test]
fn limits_are_strict_and_configurable() {
    let mut m = fixture("healthy");
    // Exactly at the limit passes; just above rolls back.
    m.canary.error_rate = Reading::Value(0.001);
    m.stable.error_rate = Reading::Value(0.001);
    assert_eq!(decide(&m, &Thresholds::default()).decision, Decision::Promote);
    m.canary.error_rate = Reading::Value(0.0011);
    assert_eq!(decide(&m, &Thresholds::default()).decision, Decision::Rollback);
    let mut t = Thresholds::default();
    t.set("max_error_rate", "0.002").expect("set");
    assert_eq!(decide(&m, &t).decision, Decision::Promote);
    // Relative: 2x stable plus the floor.
    m.canary.error_rate = Reading::Value(0.0009);
    m.stable.error_rate = Reading::Value(0.0004);
    let v = decide(&m, &Thresholds::default());
    assert_eq!(v.decision, Decision::Rollback);
    assert_eq!(v.rules[2].rule, "error_rate_vs_stable");
    assert_eq!(v.rules[2].outcome, Outcome::Rollback);
}

#[test]
fn every_rule_reports_its_inputs() {
    let v = decide(&fixture("failing"), &Thresholds::default());
    let json = serde_json::to_value(&v).expect("serialize");
    let rule = &json["rules"][1];
    assert_eq!(rule["rule"], "error_rate");
    assert_eq!(rule["inputs"]["canary.error_rate"], 0.004);
    assert_eq!(rule["inputs"]["max_error_rate"], 0.001);
    assert_eq!(rule["outcome"], "rollback");
    assert_eq!(rule["trigger"], "error_rate_absolute");
    let nd = decide(&fixture("no_data"), &Thresholds::default());
    let json = serde_json::to_value(&nd).expect("serialize");
    assert_eq!(json["rules"][1]["inputs"]["canary.error_rate"]["no_data"], "nan");
}

#[test]
fn zero_baseline_compares_without_dividing() {
    let mut m = fixture("zero_baseline");
    for side in Side::BOTH {
        let s = m.side_mut(side);
        s.latency_p95_ms = Reading::Value(0.0);
    }
    m.stable.error_rate = Reading::Value(0.0);
    m.canary.error_rate = Reading::Value(0.0);
    assert_eq!(decide(&m, &Thresholds::default()).decision, Decision::Promote);
    // Above the floor, anything above 2 x 0 is a rollback.
    m.canary.error_rate = Reading::Value(0.0006);
    assert_eq!(decide(&m, &Thresholds::default()).decision, Decision::Rollback);
}

/// Any metric value, including the ones that mean "no data".
fn raw() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        4 => (0.0f64..0.01).prop_map(|v| serde_json::json!(v)),
        2 => (0.0f64..50.0).prop_map(|v| serde_json::json!(v)),
        2 => (0u32..20_000).prop_map(|v| serde_json::json!(v)),
        1 => Just(serde_json::json!(0)),
        1 => Just(serde_json::Value::Null),
        1 => Just(serde_json::json!("NaN")),
        1 => Just(serde_json::json!("+Inf")),
        1 => Just(serde_json::json!("-Inf")),
    ]
}

/// A side object with some keys left out.
fn side_json() -> impl Strategy<Value = serde_json::Value> {
    proptest::collection::vec((any::<bool>(), raw()), 7).prop_map(|vals| {
        let mut obj = serde_json::Map::new();
        for (m, (present, v)) in Metric::ALL.iter().zip(vals) {
            if present || !v.is_null() {
                // Error rates above 1 are invalid input, not no data.
                let v = match (m, v.as_f64()) {
                    (Metric::ErrorRate, Some(x)) if x > 1.0 => serde_json::json!(x / 50_000.0),
                    _ => v,
                };
                obj.insert(m.as_str().to_owned(), v);
            }
        }
        serde_json::Value::Object(obj)
    })
}

fn inputs_used_by_rules(m: &CanaryMetrics) -> Vec<Reading> {
    let mut v: Vec<Reading> = Metric::ALL.iter().map(|x| m.canary.get(*x)).collect();
    v.extend([m.stable.requests, m.stable.error_rate, m.stable.latency_p95_ms]);
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// A promote needs every input the rules use to be a finite value, and
    /// no rule that rolled back, lacked data or asked to continue.
    #[test]
    fn no_data_never_promotes(canary in side_json(), stable in side_json()) {
        let text = serde_json::json!({"canary": canary, "stable": stable}).to_string();
        let m = CanaryMetrics::from_json(text.as_bytes()).map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
        for policy in [NoDataPolicy::Continue, NoDataPolicy::Rollback] {
            let t = Thresholds { on_no_data: policy, ..Thresholds::default() };
            let v = decide(&m, &t);
            let any_no_data = inputs_used_by_rules(&m).iter().any(|r| matches!(r, Reading::NoData(_)));
            if any_no_data {
                prop_assert_ne!(v.decision, Decision::Promote, "{}", v.render());
            }
            if v.decision == Decision::Promote {
                prop_assert!(v.rules.iter().all(|r| matches!(r.outcome, Outcome::Pass | Outcome::Warn)));
                prop_assert!(v.rules.iter().all(|r| r.inputs.iter().all(|(_, x)| x.value().is_some_and(f64::is_finite))));
            }
        }
    }

    /// NaN/Inf from any source is classified before any comparison.
    #[test]
    fn non_finite_error_rate_never_promotes(x in prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY), -1.0f64..-1e-9], side in 0usize..2) {
        let mut m = fixture("healthy");
        let s = if side == 0 { &mut m.canary } else { &mut m.stable };
        s.error_rate = Reading::from_f64(x);
        prop_assert!(matches!(s.error_rate, Reading::NoData(_)));
        prop_assert_ne!(decide(&m, &Thresholds::default()).decision, Decision::Promote);
    }

    /// Zero baselines with any canary values: no panic, and a canary error
    /// rate above both the floor and the absolute limit is a rollback.
    #[test]
    fn zero_baseline_never_panics(ce in 0.0f64..1.0, cl in 0.0f64..1e6, floor in 0.0f64..0.01, ratio in 0.1f64..10.0) {
        let mut m = fixture("healthy");
        m.stable = SideMetrics { error_rate: Reading::Value(0.0), latency_p95_ms: Reading::Value(0.0), ..m.stable };
        m.canary.error_rate = Reading::Value(ce);
        m.canary.latency_p95_ms = Reading::Value(cl);
        let t = Thresholds { error_rate_floor: floor, error_rate_ratio: ratio, ..Thresholds::default() };
        let v = decide(&m, &t);
        if ce > floor && ce > 0.0 {
            prop_assert_eq!(v.decision, Decision::Rollback);
        }
        prop_assert!(serde_json::to_string(&v).is_ok());
    }

    /// A worse canary error rate never gives a better decision.
    #[test]
    fn worse_error_rate_is_never_better(a in 0.0f64..0.01, b in 0.0f64..0.01) {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let mut m = fixture("healthy");
        m.canary.error_rate = Reading::Value(lo);
        let d_lo = decide(&m, &Thresholds::default()).decision;
        m.canary.error_rate = Reading::Value(hi);
        let d_hi = decide(&m, &Thresholds::default()).decision;
        prop_assert!(d_hi >= d_lo, "{lo} -> {d_lo}, {hi} -> {d_hi}");
    }
}

#[test]
fn missing_keys_are_no_data_but_missing_sides_are_errors() {
    let m = CanaryMetrics::from_json(br#"{"canary": {}, "stable": {}}"#).expect("parse");
    assert_eq!(m.canary.requests, Reading::NoData(NoData::Missing));
    assert_eq!(decide(&m, &Thresholds::default()).decision, Decision::Continue);
    assert!(CanaryMetrics::from_json(br#"{"canary": {}}"#).is_err());
    assert!(CanaryMetrics::from_json(br#"{"canary": {}, "stable": {}, "stable": {}}"#).is_err());
    assert!(CanaryMetrics::from_json(br#"{"canary": {"cpu": NaN}, "stable": {}}"#).is_err());
}
