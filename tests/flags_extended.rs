//! Variants, basis-point rollouts, prerequisites, evaluation details and the
//! audit trail, from a Rust user's side.

use std::collections::BTreeMap;

use erlmcp_rollout::flags::{
    audit_diff, AuditLog, ChangeKind, ConfigError, Engine, ErrorCode, FlagsConfig, MapContext, Problem, Reason,
    ResolutionReason,
};

fn config(json: &str) -> FlagsConfig {
    FlagsConfig::from_json(json.as_bytes()).unwrap()
}

fn problems(json: &str) -> Vec<Problem> {
    match FlagsConfig::from_json(json.as_bytes()) {
        Err(ConfigError::Invalid(p)) => p,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn session(id: &str) -> MapContext {
    MapContext::new().binary("session_id", id)
}

#[test]
fn variants_are_validated_strictly_with_positions() {
    let p = problems(
        r#"{
  "a": {"variants": {"": {"value": 1, "weight": 1}, "ok": {"value": null, "weight": 1}}},
  "b": {"variants": {"x": {"value": "s", "weight": -1}, "y": {"value": "t"}, "z": {"weight": 1, "colour": 2}}},
  "c": {"variants": {"x": {"value": "s", "weight": 1}, "y": {"value": 2, "weight": 1}}},
  "d": {"variants": {"x": {"value": 1, "weight": 1}, "y": {"value": 1.5, "weight": 1}}},
  "e": {"variants": {"x": {"value": true, "weight": 0}}},
  "f": {"variants": {}},
  "g": {"rollout_percentage": 5, "rollout_basis_points": 10001},
  "h": {"rollout_basis_points": 5, "rollout_percentage": 5,
        "schedule": [{"at": "2026-01-01", "rollout_basis_points": 1, "rollout_percentage": 1}]}
}"#,
    );
    let got: Vec<(&str, &str, u32)> = p
        .iter()
        .map(|p| (p.flag.as_deref().unwrap(), p.path.as_str(), p.line.unwrap()))
        .collect();
    assert_eq!(
        got,
        [
            ("a", "$.a.variants[\"\"]", 2),
            ("a", "$.a.variants.ok.value", 2),
            ("b", "$.b.variants.x.weight", 3),
            ("b", "$.b.variants.y", 3),
            ("b", "$.b.variants.z.colour", 3),
            ("b", "$.b.variants.z", 3),
            ("c", "$.c.variants.y.value", 4),
            ("d", "$.d.variants.y.value", 5),
            ("e", "$.e.variants", 6),
            ("f", "$.f.variants", 7),
            ("g", "$.g.rollout_basis_points", 8),
            ("g", "$.g.rollout_basis_points", 8),
            ("h", "$.h.schedule[0].rollout_basis_points", 10),
            ("h", "$.h.rollout_percentage", 9),
        ],
        "{p:#?}"
    );
    let msgs: Vec<&str> = p.iter().map(|p| p.message.as_str()).collect();
    assert!(msgs[6].contains("\"y\" is integer, but \"x\" is string"), "{}", msgs[6]);
    assert!(msgs[7].contains("is float, but"), "{}", msgs[7]);
    assert!(msgs[8].contains("weight above 0"), "{}", msgs[8]);
    assert!(msgs[10].contains("0..10000"), "{}", msgs[10]);
    assert!(msgs[11].contains("not both"), "{}", msgs[11]);
}

#[test]
fn prerequisites_are_validated_and_cycles_are_named() {
    let p = problems(
        r#"{
  "a": {"prerequisites": [{"flag": "b"}]},
  "b": {"prerequisites": [{"flag": "c", "is": "on"}]},
  "c": {"prerequisites": [{"flag": "a", "is": "off"}]},
  "d": {"prerequisites": [{"flag": "d"}]}
}"#,
    );
    assert_eq!(p.len(), 1, "{p:#?}");
    assert_eq!(p[0].path, "$.d.prerequisites[0]");
    assert!(p[0].message.contains("own prerequisite"));

    let p = problems(
        r#"{
  "a": {"prerequisites": [{"flag": "b"}]},
  "b": {"prerequisites": [{"flag": "c", "is": "on"}]},
  "c": {"prerequisites": [{"flag": "a", "is": "off"}]}
}"#,
    );
    assert_eq!(p.len(), 1, "{p:#?}");
    assert_eq!(
        (p[0].flag.as_deref(), p[0].path.as_str(), p[0].line),
        (Some("a"), "$.a.prerequisites[0]", Some(2))
    );
    assert_eq!(p[0].message, "prerequisites form a cycle: a -> b -> c -> a");

    let p = problems(
        r#"{
  "v": {"variants": {"x": {"value": 1, "weight": 1}}},
  "w": {},
  "a": {"prerequisites": [{"flag": "nope"}, {"flag": "v", "variant": "y"}, {"flag": "w", "variant": "x"},
                          {"flag": "v", "is": "maybe"}, {"flag": "w", "is": "on", "variant": "x"}, {"is": "on"},
                          {"flag": "w"}]}
}"#,
    );
    let msgs: Vec<String> = p.iter().map(|p| format!("{} {}", p.path, p.message)).collect();
    assert_eq!(p.len(), 7, "{msgs:#?}");
    for needle in [
        "$.a.prerequisites[3].is \"maybe\" is not \"on\" or \"off\"",
        "$.a.prerequisites[4] give \"is\" or \"variant\", not both",
        "$.a.prerequisites[5] prerequisite is missing \"flag\"",
        "$.a.prerequisites[6] flag \"w\" is already a prerequisite",
        "$.a.prerequisites[0] prerequisite flag \"nope\" is not in the config",
        "$.a.prerequisites[1] flag \"v\" has no variant \"y\"",
        "$.a.prerequisites[2] flag \"w\" has no variants",
    ] {
        assert!(msgs.iter().any(|m| m.starts_with(needle)), "{needle}\n{msgs:#?}");
    }

    // Depth is bounded (a chain of 10).
    let chain: Vec<String> = (0..10)
        .map(|i| format!("\"f{i}\": {{\"prerequisites\": [{{\"flag\": \"f{}\"}}]}}", i + 1))
        .chain(std::iter::once("\"f10\": {}".to_owned()))
        .collect();
    let p = problems(&format!("{{{}}}", chain.join(",\n")));
    assert!(p.iter().all(|p| p.message.contains("levels deep")), "{p:#?}");
    assert_eq!(p[0].flag.as_deref(), Some("f0"));
}

#[test]
fn a_disabled_parent_turns_every_dependant_off() {
    let engine = Engine::builder().build(config(
        r#"{
  "kill": {"enabled": true},
  "child": {"enabled": true, "prerequisites": [{"flag": "kill"}]},
  "grandchild": {"enabled": true, "prerequisites": [{"flag": "child"}]},
  "fallback": {"enabled": true, "prerequisites": [{"flag": "kill", "is": "off"}]},
  "exp": {"enabled": true, "variants": {"a": {"value": "A", "weight": 1}, "b": {"value": "B", "weight": 1}}},
  "only_b": {"enabled": true, "prerequisites": [{"flag": "exp", "variant": "b"}]}
}"#,
    ));
    let ctx = session("s-1");
    assert!(engine.is_enabled("grandchild", &ctx));
    assert!(!engine.is_enabled("fallback", &ctx));
    engine.disable("kill");
    assert_eq!(engine.evaluate("child", &ctx).reason, Reason::Prerequisite { index: 0 });
    assert_eq!(
        engine.evaluate("grandchild", &ctx).reason,
        Reason::Prerequisite { index: 0 }
    );
    assert!(engine.is_enabled("fallback", &ctx));
    // Even a forced dependant stays off: the kill switch wins.
    engine.enable("grandchild");
    assert!(!engine.is_enabled("grandchild", &ctx));
    let d = engine.details("grandchild", &ctx);
    assert_eq!((d.reason, d.value), (ResolutionReason::Disabled, Some(false.into())));
    engine.clear("kill");
    assert!(engine.is_enabled("grandchild", &ctx));

    // A variant prerequisite: on exactly for the sessions served "b".
    let mut seen = [0; 2];
    for i in 0..400 {
        let ctx = session(&format!("s-{i}"));
        let b = engine.details("exp", &ctx).variant.as_deref() == Some("b");
        assert_eq!(engine.is_enabled("only_b", &ctx), b);
        seen[usize::from(b)] += 1;
    }
    assert!(seen[0] > 100 && seen[1] > 100, "{seen:?}");

    // explain shows the chain.
    engine.disable("kill");
    let x = engine.explain("grandchild", &ctx);
    let steps: Vec<(&str, Option<bool>)> = x.steps.iter().map(|s| (s.check.as_str(), s.passed)).collect();
    assert!(steps.contains(&("prerequisite[0]", Some(false))), "{x}");
    assert!(steps.contains(&("prerequisite[0].prerequisite[0]", Some(false))), "{x}");
    let text = x.to_string();
    assert!(
        text.contains("\"child\" is on: \"child\" is off (prerequisite (#0 not met))"),
        "{text}"
    );
    assert!(text.contains("\"kill\" is on: \"kill\" is off (disabled)"), "{text}");
}

#[test]
fn custom_conditions_of_parents_are_asked_for() {
    let engine = Engine::builder().build(config(
        r#"{"parent": {"enabled": true, "conditions": [{"custom": "staff"}]},
            "child": {"enabled": true, "prerequisites": [{"flag": "parent"}]}}"#,
    ));
    assert_eq!(
        engine.snapshot().unregistered_conditions(b"child"),
        [Box::from("staff")]
    );
}

#[test]
fn basis_points_are_a_finer_rollout_and_percentages_keep_their_cohorts() {
    use erlmcp_rollout::flags::phash2::{phash2, phash2_salted};
    use erlmcp_rollout::flags::Value;
    let engine = Engine::builder().build(config(
        r#"{"fine": {"enabled": true, "rollout_basis_points": 25},
            "fine_salted": {"enabled": true, "rollout_basis_points": 2500, "salt": "x"},
            "pct": {"enabled": true, "rollout_percentage": 25},
            "staged": {"enabled": true, "rollout_percentage": 1,
                       "schedule": [{"at": "2000-01-01", "rollout_basis_points": 150}, {"at": "2100-01-01", "rollout_percentage": 2}]}}"#,
    ));
    let mut fine = 0;
    for i in 0..20_000 {
        let id = format!("session-{i}");
        let v = Value::Binary(id.as_bytes());
        let ctx = session(&id);
        assert_eq!(engine.is_enabled("fine", &ctx), phash2(&v, 10_000) < 25, "{id}");
        assert_eq!(
            engine.is_enabled("fine_salted", &ctx),
            phash2_salted(b"x", &v, 10_000) < 2500
        );
        assert_eq!(engine.is_enabled("pct", &ctx), phash2(&v, 100) < 25);
        assert_eq!(engine.is_enabled("staged", &ctx), phash2(&v, 10_000) < 150);
        fine += usize::from(engine.is_enabled("fine", &ctx));
    }
    assert!((20..=80).contains(&fine), "0.25 % of 20000 is 50, got {fine}");
    let out = (0..100)
        .map(|i| session(&format!("session-{i}")))
        .find(|c| !engine.is_enabled("fine", c))
        .unwrap();
    assert!(matches!(
        engine.evaluate("fine", &out).reason,
        Reason::FineRollout { basis_points: 25, bucket } if bucket >= 25
    ));
    let x = engine.explain("fine", &out).to_string();
    assert!(x.contains("phash2(Value, 10000) = "), "{x}");
}

/// Sessions of a variant whose weight did not change stay where they were
/// when another variant's weight grows or a variant is added.
#[test]
fn growing_one_weight_moves_sessions_only_into_that_variant() {
    let variants = |a: u32, b: u32, c: u32, extra: &str| {
        Engine::builder().build(config(&format!(
            r#"{{"v": {{"enabled": true, "salt": "v1", "variants": {{"a": {{"value": "a", "weight": {a}}},
                "b": {{"value": "b", "weight": {b}}}, "c": {{"value": "c", "weight": {c}}}{extra}}}}}}}"#
        )))
    };
    let assign = |e: &Engine| -> Vec<String> {
        (0..5000)
            .map(|i| e.details("v", &session(&format!("s{i}"))).variant.unwrap())
            .collect()
    };
    let before = assign(&variants(10, 10, 80, ""));
    let after = assign(&variants(30, 10, 80, ""));
    let added = assign(&variants(10, 10, 80, r#", "d": {"value": "d", "weight": 20}"#));
    let mut moved = BTreeMap::<(String, String), usize>::new();
    for (x, y) in before.iter().zip(&after) {
        if x != y {
            *moved.entry((x.clone(), y.clone())).or_default() += 1;
            assert_eq!(y, "a", "a session moved from {x} to {y}, not into the grown variant");
        }
    }
    assert!(moved.values().sum::<usize>() > 500, "{moved:?}");
    for (x, y) in before.iter().zip(&added) {
        assert!(x == y || y == "d", "{x} -> {y}");
    }
    let share = |v: &[String], n: &str| v.iter().filter(|x| *x == n).count() as f64 / v.len() as f64;
    assert!((share(&before, "c") - 0.8).abs() < 0.03);
    assert!((share(&after, "a") - 0.25).abs() < 0.03);
}

#[test]
fn details_map_onto_openfeature_reasons() {
    let engine = Engine::builder().build(config(
        r#"{"static": {"enabled": true, "metadata": {"owner": "x"}},
            "off": {"enabled": false},
            "elsewhere": {"enabled": true, "environments": ["production"]},
            "half": {"enabled": true, "rollout_percentage": 50},
            "cond": {"enabled": true, "conditions": [{"user_id": "u-1"}]},
            "one_variant": {"enabled": true, "variants": {"only": {"value": [1, 2], "weight": 3}}}}"#,
    ));
    let user = MapContext::new().binary("user_id", "u-1");
    let d = engine.details("static", &());
    assert_eq!(
        (d.reason, d.value.clone(), d.metadata["owner"].clone()),
        (ResolutionReason::Static, Some(true.into()), "x".into())
    );
    assert_eq!(engine.details("off", &()).reason, ResolutionReason::Disabled);
    assert_eq!(engine.details("elsewhere", &()).reason, ResolutionReason::Disabled);
    assert_eq!(engine.details("cond", &user).reason, ResolutionReason::TargetingMatch);
    assert_eq!(engine.details("cond", &()).reason, ResolutionReason::Default);
    assert_eq!(engine.details("half", &session("a")).reason, ResolutionReason::Split);
    let d = engine.details("one_variant", &());
    assert_eq!(
        (d.reason, d.variant.as_deref()),
        (ResolutionReason::Static, Some("only"))
    );
    assert_eq!(d.value, Some(serde_json::json!([1, 2])));
    let d = engine.details("half", &());
    assert_eq!(
        (d.reason, d.error_code, d.value),
        (ResolutionReason::Error, Some(ErrorCode::TargetingKeyMissing), None)
    );
    assert_eq!(d.evaluation, engine.evaluate("half", &()));
    let d = engine.details("nope", &());
    assert_eq!(
        (d.reason, d.error_code),
        (ResolutionReason::Error, Some(ErrorCode::FlagNotFound))
    );
    let json = serde_json::to_value(engine.details("static", &())).unwrap();
    assert_eq!(json["reason"], "STATIC");
    assert_eq!(json["evaluation"]["reason"]["reason"], "enabled");
}

#[test]
fn the_audit_trail_records_reloads_and_overrides_with_actor_and_diff() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let file = dir.path().join("flags.json");
    std::fs::write(&file, r#"{"a": {"enabled": true, "rollout_percentage": 10}, "b": {}}"#).unwrap();
    let engine = Engine::builder()
        .audit_log(AuditLog::open(&log, "node-1").unwrap())
        .build(FlagsConfig::from_file(&file).unwrap());
    std::fs::write(
        &file,
        r#"{"a": {"enabled": true, "rollout_percentage": 25}, "c": {"enabled": true}}"#,
    )
    .unwrap();
    engine.reload_file(&file).unwrap();
    engine.reload_file(&file).unwrap(); // unchanged: no line
    engine
        .reload_json(br#"{ "a": {"rollout_percentage": 25, "enabled": true},  "c": {"enabled": true} }"#)
        .unwrap(); // same flags: no line
    engine.set_override_by("a", Some(false), Some("alice"));
    engine.disable("a"); // no change: no line
    engine.clear("a");

    let h = AuditLog::read(&log).unwrap();
    assert_eq!(h.len(), 3, "{h:#?}");
    assert_eq!(
        (h[0].actor.as_str(), h[0].source.as_str()),
        ("node-1", &*format!("file:{}", file.display()))
    );
    let kinds: Vec<(&str, ChangeKind)> = h[0].changes.iter().map(|c| (c.flag.as_str(), c.change)).collect();
    assert_eq!(
        kinds,
        [
            ("a", ChangeKind::Changed),
            ("b", ChangeKind::Removed),
            ("c", ChangeKind::Added)
        ]
    );
    let a = &h[0].changes[0].fields;
    assert_eq!(a.keys().collect::<Vec<_>>(), ["rollout_percentage"]);
    assert_eq!(
        (
            a["rollout_percentage"].before.clone(),
            a["rollout_percentage"].after.clone()
        ),
        (10.into(), 25.into())
    );
    assert_eq!((h[1].actor.as_str(), h[1].source.as_str()), ("alice", "override"));
    assert_eq!(h[1].changes[0].change, ChangeKind::Override);
    assert_eq!(h[1].changes[0].fields["override"].after, false);
    assert_eq!(h[2].changes[0].fields["override"].before, false);
    assert_eq!(h[2].changes[0].fields["override"].after, serde_json::Value::Null);
    assert!(h[0].time.ends_with('Z') && h[0].time.len() == 24, "{}", h[0].time);
    assert_eq!(engine.audit_failures(), 0);

    // Every line is one JSON object with the documented keys.
    let text = std::fs::read_to_string(&log).unwrap();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["actor", "changes", "format", "source", "time"]);
    }

    // Off: nothing more is written.
    engine.set_audit_log(None);
    engine.enable("b");
    assert_eq!(AuditLog::read(&log).unwrap().len(), 3);
    assert!(audit_diff(&config("{}"), &config("{}")).is_empty());
}
