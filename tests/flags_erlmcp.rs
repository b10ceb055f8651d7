//! erlmcp's own flag file format and functions (issue 15, item 9): the file
//! is detected by shape and validated strictly (every problem with flag,
//! path, line and column), an erlmcp flag evaluates as its module evidently
//! intends, its cohorts are `erlang:phash2(Id) rem 100 < P` computed by a
//! real `erl`, and set/import/export keep erlmcp's shapes.

#[path = "support/erl.rs"]
mod erl;

use std::fmt::Write as _;

use erlmcp_rollout::flags::{
    export_json, Bucketing, ConfigError, Engine, ErlmcpFlag, ErlmcpState, FlagsConfig, MapContext, Problem, Strategy,
};

const ERLMCP_FILE: &str = r#"{
  "flags": [
    {"name": "on", "category": "core", "state": "enabled", "value": true},
    {"name": "off", "state": "disabled", "value": true},
    {"name": "valued_off", "state": "enabled", "value": false},
    {"name": "canary", "category": "rollout", "state": "rollout", "rollout_strategy": "canary",
     "rollout_percentage": 30, "conditions": {"region": "eu"}, "description": "new transport",
     "updated_at": 1764800000000},
    {"name": "pct", "state": "rollout", "rollout_strategy": "percentage", "rollout_percentage": 62},
    {"name": "segment", "state": "rollout", "rollout_strategy": "user_segment", "rollout_percentage": 5},
    {"name": "all", "state": "rollout", "rollout_strategy": "all", "rollout_percentage": 10},
    {"name": "none", "state": "rollout", "rollout_strategy": "none", "rollout_percentage": 90},
    {"name": "limit", "value": 250},
    {"name": "defaults"}
  ]
}"#;

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
fn erlmcp_file_is_read_and_evaluates_as_intended() {
    let config = FlagsConfig::from_json(ERLMCP_FILE.as_bytes()).unwrap();
    assert_eq!(config.len(), 10);
    assert!(config.iter().all(|(_, f)| f.bucketing == Bucketing::Erlmcp));
    let engine = Engine::builder().build(config);
    let ids: Vec<String> = (0..2000).map(|i| format!("session-{i}")).collect();
    let share = |flag: &str| ids.iter().filter(|id| engine.is_enabled(flag, &session(id))).count();
    assert_eq!(share("on"), 2000);
    assert_eq!(share("off"), 0, "state disabled wins over value true");
    assert_eq!(
        share("valued_off"),
        0,
        "value false is off (erlmcp's set_flag(Name, false))"
    );
    assert_eq!(share("all"), 2000, "strategy all ignores the percentage");
    assert_eq!(share("none"), 0);
    assert_eq!(share("limit"), 2000, "a non-boolean value is on by its state");
    assert_eq!(share("defaults"), 2000, "erlmcp's defaults: enabled, value true");
    for (flag, p) in [("canary", 30), ("pct", 62), ("segment", 5)] {
        let expected = ids.iter().filter(|id| erlmcp_bucket_by_hand(id) < p).count();
        assert_eq!(share(flag), expected, "{flag}");
    }
    assert!(!engine.is_enabled("missing", &session("s")));
}

/// `erlang:phash2(Id) rem 100` through the crate's public phash2 (the 27-bit
/// phash2/1 is phash2(Id, 2^27)); the test against `erl` below checks both.
fn erlmcp_bucket_by_hand(id: &str) -> u32 {
    erlmcp_rollout::flags::phash2::phash2(&erlmcp_rollout::flags::Value::Binary(id.as_bytes()), 1 << 27) % 100
}

#[test]
fn erlmcp_cohorts_match_real_erl() {
    let config = FlagsConfig::from_json(ERLMCP_FILE.as_bytes()).unwrap();
    let engine = Engine::builder().build(config);
    let ids: Vec<String> = (0..3000).map(|i| format!("{:x}-{i}", i * 104_729)).collect();
    let mut text = String::new();
    for id in &ids {
        id.bytes().for_each(|b| {
            let _ = write!(text, "{b:02x}");
        });
        text.push('\n');
    }
    // erlmcp's formula, as its evaluate_flag_rollout/2 writes it.
    let script = r#"
[In, Out] = init:get_plain_arguments(),
{ok, Data} = file:read_file(In),
Ids = [binary:decode_hex(L) || L <- binary:split(Data, <<"\n">>, [global, trim_all])],
Line = fun (Id) -> Hash = erlang:phash2(Id),
    io_lib:format("~p ~p ~p~n", [Hash rem 100 < 30, Hash rem 100 < 62, Hash rem 100 < 5]) end,
ok = file:write_file(Out, [Line(Id) || Id <- Ids]),
halt(0).
"#;
    let erl = erl::erl_lines(script, &text);
    assert_eq!(erl.len(), ids.len());
    let mut differs_from_v1 = 0;
    for (id, line) in ids.iter().zip(&erl) {
        let ctx = session(id);
        let ours = format!(
            "{} {} {}",
            engine.is_enabled("canary", &ctx),
            engine.is_enabled("pct", &ctx),
            engine.is_enabled("segment", &ctx)
        );
        assert_eq!(ours, *line, "id {id}");
        let v1 = erlmcp_rollout::flags::phash2::phash2(&erlmcp_rollout::flags::Value::Binary(id.as_bytes()), 100);
        differs_from_v1 += usize::from(v1 != erlmcp_bucket_by_hand(id));
    }
    // The two contracts really are different buckets (why each is named).
    assert!(differs_from_v1 > ids.len() / 2, "{differs_from_v1}");
}

#[test]
fn every_problem_is_reported_with_its_place() {
    let p = problems(
        r#"{"flags": [
  {"name": "a", "state": "maybe", "rollout_percentage": 150},
  {"name": "b", "rollout_strategy": "sometimes", "value": null, "colour": "red"},
  {"state": "enabled"},
  {"name": "a"},
  {"name": "", "value": [1]},
  "c"
], "owner": "me"}"#,
    );
    let text: Vec<String> = p.iter().map(ToString::to_string).collect();
    let has = |needle: &str| text.iter().any(|t| t.contains(needle));
    assert!(
        has("$.owner (line 8, column 4): unknown top-level field \"owner\""),
        "{text:#?}"
    );
    assert!(has("flag \"a\": $.flags[0].state (line 2, column 26): state must be enabled, disabled or rollout, got \"maybe\""), "{text:#?}");
    assert!(
        has("flag \"a\": $.flags[0].rollout_percentage (line 2, column 57): must be an integer 0..100, got 150"),
        "{text:#?}"
    );
    assert!(has("flag \"b\": $.flags[1].rollout_strategy"), "{text:#?}");
    assert!(
        has("flag \"b\": $.flags[1].value (line 3, column 59): expected a boolean, number, string or object"),
        "{text:#?}"
    );
    assert!(
        has("flag \"b\": $.flags[1].colour (line 3, column 65): unknown field \"colour\""),
        "{text:#?}"
    );
    assert!(
        has("$.flags[2] (line 4, column 3): flag is missing \"name\""),
        "{text:#?}"
    );
    assert!(
        has("$.flags[3].name (line 5, column 12): flag \"a\" is listed twice (first at line 2, column 12)"),
        "{text:#?}"
    );
    assert!(
        has("flag \"\": $.flags[4].name (line 6, column 12): flag name is empty"),
        "{text:#?}"
    );
    assert!(has("$.flags[4].value"), "{text:#?}");
    assert!(
        has("$.flags[5] (line 7, column 3): expected a flag object"),
        "{text:#?}"
    );
    assert_eq!(p.len(), 11, "{text:#?}");
}

#[test]
fn our_format_is_unchanged_and_bucketing_is_strict_there() {
    // A flag of ours named "flags" is an object, not erlmcp's list.
    let ours = FlagsConfig::from_json(br#"{"flags": {"enabled": true}}"#).unwrap();
    assert_eq!(ours.get("flags").map(|f| f.bucketing), Some(Bucketing::V1));
    let p = problems(r#"{"x": {"enabled": true, "bucketing": "erlmcp", "salt": "s", "rollout_basis_points": 5}}"#);
    assert_eq!(p.len(), 2, "{p:#?}");
    assert!(
        p.iter()
            .all(|p| p.message.contains("cannot be used with \"bucketing\": \"erlmcp\"")),
        "{p:#?}"
    );
    let p = problems(r#"{"x": {"enabled": true, "bucketing": "v2"}}"#);
    assert_eq!(p[0].path, "$.x.bucketing");
    // An erlmcp file written back in our format keeps its contract and fields.
    let config = FlagsConfig::from_json(ERLMCP_FILE.as_bytes()).unwrap();
    let again = FlagsConfig::from_json(config.to_json_pretty().as_bytes()).unwrap();
    assert_eq!(again, config);
}

#[test]
fn erlmcp_view_and_export_round_trip() {
    let config = FlagsConfig::from_json(ERLMCP_FILE.as_bytes()).unwrap();
    let canary = ErlmcpFlag::of("canary", config.get("canary").unwrap());
    assert_eq!(canary.category.as_deref(), Some("rollout"));
    assert_eq!(
        (canary.state, canary.rollout_strategy),
        (ErlmcpState::Rollout, Strategy::Canary)
    );
    assert_eq!(canary.rollout_percentage, 30);
    assert_eq!(canary.conditions.get("region"), Some(&serde_json::json!("eu")));
    assert_eq!(canary.description, "new transport");
    assert_eq!(canary.updated_at, Some(1_764_800_000_000));
    let defaults = ErlmcpFlag::of("defaults", config.get("defaults").unwrap());
    assert_eq!(defaults.category, None);
    assert_eq!(defaults.value, serde_json::json!(true));
    assert_eq!(
        (defaults.rollout_percentage, defaults.rollout_strategy),
        (100, Strategy::All)
    );
    assert_eq!(
        ErlmcpFlag::of("limit", config.get("limit").unwrap()).value,
        serde_json::json!(250)
    );

    let text = export_json(&config, "production", 42);
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["version"], "3.0.0");
    assert_eq!(doc["environment"], "production");
    assert_eq!(doc["last_updated"], 42);
    assert_eq!(doc["flags"].as_array().map(Vec::len), Some(10));
    let back = FlagsConfig::from_json(text.as_bytes()).unwrap();
    let engine = (
        Engine::builder().build(config.clone()),
        Engine::builder().build(back.clone()),
    );
    for (name, _) in config.iter() {
        for i in 0..300 {
            let ctx = session(&format!("s{i}"));
            assert_eq!(
                engine.0.is_enabled(name, &ctx),
                engine.1.is_enabled(name, &ctx),
                "{name}"
            );
        }
    }
    // A flag in our format has an erlmcp equivalent.
    let ours = FlagsConfig::from_json(
        br#"{"x": {"enabled": true, "rollout_percentage": 20, "metadata": {"category": "ui"}}}"#,
    )
    .unwrap();
    let x = ErlmcpFlag::of("x", ours.get("x").unwrap());
    assert_eq!(
        (x.state, x.rollout_strategy, x.rollout_percentage),
        (ErlmcpState::Rollout, Strategy::Percentage, 20)
    );
    assert_eq!(
        (x.category.as_deref(), &x.value),
        (Some("ui"), &serde_json::json!(true))
    );
}

#[test]
fn set_flag_and_import_layer_over_the_source_until_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("feature-flags.json");
    std::fs::write(&path, ERLMCP_FILE).unwrap();
    let engine = Engine::builder().build(FlagsConfig::default());
    assert!(engine.reload_file(&path).unwrap().changed);
    let fields = |v: serde_json::Value| v.as_object().unwrap().clone();

    engine
        .set_erlmcp_flag("on", fields(serde_json::json!({"value": false})), None)
        .unwrap();
    assert!(!engine.is_enabled("on", &session("s")));
    // Re-reading the unchanged file keeps it (erlmcp: only a load replaces it) ...
    assert!(!engine.reload_file(&path).unwrap().changed);
    assert!(!engine.is_enabled("on", &session("s")));
    // ... reload_flags/0 (a forced re-read) undoes it.
    engine.reload_file_now(&path).unwrap();
    assert!(engine.is_enabled("on", &session("s")));

    // A bad field changes nothing and says which.
    let err = engine
        .set_erlmcp_flag("on", fields(serde_json::json!({"rollout_percentage": 101})), None)
        .unwrap_err();
    assert!(err.to_string().contains("$.flags[0].rollout_percentage"), "{err}");
    assert!(engine.is_enabled("on", &session("s")));

    engine
        .import_json(br#"{"flags": [{"name": "only", "state": "enabled"}]}"#, None)
        .unwrap();
    assert_eq!(engine.get_all().len(), 1);
    assert!(!engine.reload_file(&path).unwrap().changed);
    assert_eq!(engine.get_all().len(), 1);
    std::fs::write(&path, ERLMCP_FILE.replace("\"limit\"", "\"limit2\"")).unwrap();
    assert!(
        engine.reload_file(&path).unwrap().changed,
        "a changed source replaces the import"
    );
    assert!(engine.get_all().contains_key("limit2"));
    assert!(engine.import_json(b"{\"flags\": [{}]}", None).is_err());
    assert!(
        engine.get_all().contains_key("limit2"),
        "a failed import changes nothing"
    );
}

/// A foreign value (a term the evaluator cannot hash itself) as the NIF
/// presents one: a known 27-bit hash, full hashes only once answered.
#[derive(Debug)]
struct Foreign {
    phash2_27: u32,
    answers: Vec<(Option<Vec<u8>>, u32)>,
    asked: std::cell::RefCell<Vec<Option<Vec<u8>>>>,
}

impl erlmcp_rollout::flags::ForeignTerm for Foreign {
    fn hash(&self, salt: Option<&[u8]>) -> Option<u32> {
        let key = salt.map(<[u8]>::to_vec);
        let found = self.answers.iter().find(|(s, _)| *s == key).map(|(_, h)| *h);
        if found.is_none() {
            self.asked.borrow_mut().push(key);
        }
        found
    }
    fn phash2_27(&self) -> u32 {
        self.phash2_27
    }
}

struct ForeignCtx<'f>(&'f Foreign);

impl erlmcp_rollout::flags::Context for ForeignCtx<'_> {
    fn get(&self, key: &str) -> Option<erlmcp_rollout::flags::Value<'_>> {
        (key == "session_id").then_some(erlmcp_rollout::flags::Value::Foreign(self.0))
    }
    fn complete(&self) -> bool {
        self.0.asked.borrow().is_empty()
    }
}

#[test]
fn foreign_values_are_bucketed_by_their_answers_and_never_counted_unanswered() {
    use erlmcp_rollout::flags::Deferred;
    let engine = Engine::builder().build(
        FlagsConfig::from_json(
            br#"{"v1": {"enabled": true, "rollout_percentage": 50, "salt": "s"},
                 "erl": {"enabled": true, "rollout_percentage": 50, "bucketing": "erlmcp"}}"#,
        )
        .unwrap(),
    );
    let snap = engine.snapshot();
    // erlmcp's contract needs only phash2/1, which the VM gives directly.
    for (h27, want) in [(149, true), (1_000_050, false)] {
        let f = Foreign {
            phash2_27: h27,
            answers: vec![],
            asked: Default::default(),
        };
        assert!(
            matches!(snap.evaluate_or_defer_id(snap.flag_id(b"erl"), &ForeignCtx(&f)),
                         Deferred::Evaluated(e) if e.enabled == want)
        );
    }
    // v1 with a salt needs phash2({Salt, T}, 2^32): asked for, not counted ...
    let before = engine.counts("v1");
    let f = Foreign {
        phash2_27: 0,
        answers: vec![],
        asked: Default::default(),
    };
    assert!(matches!(
        snap.evaluate_or_defer_id(snap.flag_id(b"v1"), &ForeignCtx(&f)),
        Deferred::NeedsHashes
    ));
    assert_eq!(f.asked.borrow().as_slice(), &[Some(b"s".to_vec())]);
    assert_eq!(engine.counts("v1"), before);
    // ... then bucketed by the answer (149 rem 100 = 49 < 50; 150 rem 100 = 50) and counted.
    for (h, want) in [(149, true), (150, false)] {
        let f = Foreign {
            phash2_27: 0,
            answers: vec![(Some(b"s".to_vec()), h)],
            asked: Default::default(),
        };
        assert!(
            matches!(snap.evaluate_or_defer_id(snap.flag_id(b"v1"), &ForeignCtx(&f)),
                         Deferred::Evaluated(e) if e.enabled == want)
        );
    }
    let after = engine.counts("v1");
    assert_eq!(
        after.true_count + after.false_count,
        before.true_count + before.false_count + 2
    );
}
