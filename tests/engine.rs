//! The engine from a Rust user's side: reloads, overrides, watchers,
//! counters, custom conditions, concurrency.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use erlmcp_rollout::flags::{
    ConfigError, Context, Engine, EnvOverrides, FlagsConfig, ManualClock, MapContext, OverrideSource, Reason, Value,
    WatchOptions,
};

fn config(json: &str) -> FlagsConfig {
    FlagsConfig::from_json(json.as_bytes()).unwrap()
}

#[test]
fn a_failed_reload_keeps_the_last_good_snapshot_and_lists_every_reason() {
    let engine = Engine::builder().build(config(r#"{"a": {"enabled": true}}"#));
    let before = engine.snapshot().generation();
    let err = engine
        .reload_json(br#"{"a": {"enabled": 1}, "b": {"rollout_percentage": -1}, "c": {"conditions": [{"op": "x"}]}}"#)
        .unwrap_err();
    let ConfigError::Invalid(problems) = err else {
        panic!("{err}")
    };
    let flags: Vec<_> = problems.iter().map(|p| p.flag.as_deref().unwrap()).collect();
    assert_eq!(flags, ["a", "b", "c"]);
    assert!(engine.is_enabled("a", &()));
    assert_eq!(engine.snapshot().generation(), before);
    assert!(engine.reload_json(b"{\"a\": ").is_err());
    assert_eq!(engine.metrics().reload_failures, 2);
    assert!(engine.is_enabled("a", &()));
}

#[test]
fn overrides_survive_reloads_until_cleared() {
    let engine = Engine::builder()
        .env_overrides(EnvOverrides::parse("tasks:enabled").unwrap())
        .build(config(r#"{"mcp_tasks": {}, "mcp_sampling": {"enabled": true}}"#));
    assert!(engine.is_enabled("mcp_tasks", &()), "env var override");
    engine.disable("mcp_sampling");
    engine.enable("mcp_later");
    engine.reload(config(
        r#"{"mcp_tasks": {}, "mcp_sampling": {"enabled": true}, "mcp_later": {}}"#,
    ));
    assert!(
        !engine.is_enabled("mcp_sampling", &()),
        "runtime override survives the reload"
    );
    assert!(
        engine.is_enabled("mcp_later", &()),
        "an override set before the flag existed applies once it does"
    );
    assert!(engine.is_enabled("mcp_tasks", &()));
    let d = engine
        .all_details()
        .into_iter()
        .find(|d| d.name == "mcp_sampling")
        .unwrap();
    assert_eq!(d.r#override.map(|o| o.source), Some(OverrideSource::Runtime));
    engine.clear("mcp_sampling");
    assert!(engine.is_enabled("mcp_sampling", &()));
    let x = engine.explain("mcp_tasks", &());
    assert!(
        x.steps
            .iter()
            .any(|s| s.check == "override" && s.detail.contains("ERLMCP_FEATURE_FLAGS")),
        "{x}"
    );
}

#[test]
fn get_all_reports_effective_enabled() {
    let clock = ManualClock::at_rfc3339("2026-01-01").unwrap();
    let engine = Engine::builder().clock(Arc::new(clock.clone())).build(config(
        r#"{"on": {"enabled": true, "environments": []}, "off": {},
            "later": {"schedule": [{"at": "2026-02-01T00:00:00Z", "enabled": true}]}}"#,
    ));
    let all = engine.get_all();
    assert_eq!(
        all.into_iter().collect::<Vec<_>>(),
        [("later".into(), false), ("off".into(), false), ("on".into(), true)]
    );
    clock.set_unix_ms(erlmcp_rollout::flags::unix_ms(
        erlmcp_rollout::flags::parse_time("2026-02-01").unwrap(),
    ));
    assert!(engine.get_all()["later"]);
    assert!(
        engine.is_enabled("later", &()),
        "the schedule is read at evaluation time, no reload needed"
    );
}

#[test]
fn counters_count_every_evaluation_and_render_for_prometheus() {
    let engine = Engine::builder().build(config(r#"{"f": {"enabled": true, "rollout_percentage": 50}}"#));
    let mut expected_true = 0;
    for i in 0..1000 {
        let ctx = MapContext::new().binary("session_id", format!("s-{i}"));
        if engine.is_enabled("f", &ctx) {
            expected_true += 1;
        }
    }
    engine.is_enabled("ghost", &());
    let c = engine.counts("f");
    assert_eq!((c.true_count, c.false_count), (expected_true, 1000 - expected_true));
    assert!((400..600).contains(&expected_true), "50% of 1000 ids: {expected_true}");
    let text = engine.metrics().to_prometheus();
    assert!(text.contains(&format!(
        "erlmcp_feature_flag_evaluations_total{{flag=\"f\",result=\"true\"}} {expected_true}\n"
    )));
    assert!(text.contains("erlmcp_feature_flag_unknown_evaluations_total 1\n"));
    // Counters survive reloads.
    engine.reload(config(r#"{"f": {"enabled": false}}"#));
    engine.is_enabled("f", &());
    assert_eq!(engine.counts("f").false_count, 1000 - expected_true + 1);
}

#[test]
fn custom_conditions_are_closures_and_unregistered_ones_are_false() {
    let engine = Engine::builder().build(config(
        r#"{"beta": {"enabled": true, "conditions": [{"custom": "staff"}]}}"#,
    ));
    let e = engine.evaluate("beta", &());
    assert_eq!(e.reason.code(), "condition");
    let x = engine.explain("beta", &());
    assert!(x.to_string().contains("no custom condition registered"), "{x}");
    assert_eq!(engine.snapshot().unregistered_conditions(b"beta"), [Box::from("staff")]);
    engine.register_condition(
        "staff",
        Arc::new(|ctx: &dyn Context| matches!(ctx.get("email"), Some(Value::Binary(e)) if e.ends_with(b"@corp"))),
    );
    assert!(engine.is_enabled("beta", &MapContext::new().binary("email", "a@corp")));
    assert!(!engine.is_enabled("beta", &MapContext::new().binary("email", "a@else")));
    engine.reload(config(
        r#"{"beta": {"enabled": true, "conditions": [{"custom": "staff"}]}}"#,
    ));
    assert!(
        engine.is_enabled("beta", &MapContext::new().binary("email", "a@corp")),
        "registrations survive reloads"
    );
    engine.unregister_condition("staff");
    assert!(!engine.is_enabled("beta", &MapContext::new().binary("email", "a@corp")));
}

#[test]
fn explain_lists_every_check_and_agrees_with_evaluate() {
    let engine = Engine::builder().environment("staging").build(config(
        r#"{"f": {"enabled": true, "environments": ["staging"], "rollout_percentage": 50, "salt": "s1",
                  "conditions": [{"session_type": "streaming"}, {"attribute": "tier", "op": "in", "values": ["gold"]}]}}"#,
    ));
    let ctx = MapContext::new()
        .binary("session_id", "session-123")
        .atom("session_type", "streaming");
    let x = engine.explain("f", &ctx);
    assert_eq!(x.result, engine.evaluate("f", &ctx));
    assert_eq!(
        x.result.reason,
        Reason::Condition {
            index: 1,
            failure: erlmcp_rollout::flags::ConditionFailure::MissingAttribute
        }
    );
    let checks: Vec<&str> = x.steps.iter().map(|s| s.check.as_str()).collect();
    assert_eq!(
        checks,
        ["enabled", "environment", "rollout", "condition[0]", "condition[1]"]
    );
    assert!(
        x.steps[2].detail.contains("phash2({<<\"s1\">>, Value}, 100) = 29"),
        "{}",
        x.steps[2].detail
    );
    let unknown = engine.explain("g", &ctx);
    assert_eq!(unknown.result.reason, Reason::UnknownFlag);
    let typo = engine.explain("ff", &ctx);
    assert!(typo.steps[0].detail.contains("did you mean \"f\""), "{typo}");
}

#[test]
fn the_watcher_reloads_on_change_and_keeps_serving_through_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flags.json");
    std::fs::write(&path, br#"{"f": {"enabled": false}}"#).unwrap();
    let engine = Arc::new(Engine::from_file(&path, "dev").unwrap());
    let watcher = engine
        .watch_file(
            &path,
            WatchOptions {
                check_interval: Duration::from_millis(20),
                poll_interval: Duration::from_secs(3600),
                ..WatchOptions::default()
            },
        )
        .unwrap();
    let wait_for = |what: &str, cond: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    std::fs::write(&path, br#"{"f": {"enabled": true}}"#).unwrap();
    wait_for("the reload", &|| engine.is_enabled("f", &()));
    std::fs::write(&path, br#"{"f": {"enabled": "yes please"}}"#).unwrap();
    wait_for("the failure", &|| watcher.status().failures >= 1);
    assert!(engine.is_enabled("f", &()), "the last good snapshot keeps serving");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(watcher.status().failures, 1, "the same bad content is reported once");
    let problems = watcher.status().last_error.unwrap();
    assert_eq!(problems[0].path, "$.f.enabled");
    // A rename over the file (how editors and config management write) is seen too.
    let tmp = dir.path().join("flags.json.new");
    std::fs::write(&tmp, br#"{"f": {"enabled": false}, "g": {}}"#).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    wait_for("the rename", &|| !engine.is_enabled("f", &()));
    assert_eq!(watcher.status().last_error, None);
    drop(watcher);
}

#[test]
fn reload_file_skips_unchanged_content() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flags.json");
    std::fs::write(&path, br#"{"f": {}}"#).unwrap();
    let engine = Engine::from_file(&path, "dev").unwrap();
    let outcome = engine.reload_file(&path).unwrap();
    assert!(!outcome.changed);
    std::fs::write(&path, br#"{"f": {}, "g": {}}"#).unwrap();
    let outcome = engine.reload_file(&path).unwrap();
    assert!(outcome.changed);
    assert_eq!(outcome.flags, 2);
    let missing = engine.reload_file(dir.path().join("nope.json")).unwrap_err();
    assert!(missing.to_string().contains("nope.json"), "{missing}");
    assert_eq!(engine.snapshot().config().len(), 2);
}

#[test]
fn readers_during_reloads_see_whole_snapshots() {
    // Config A: every flag on; config B: every flag disabled. A reader that
    // evaluates all flags against one snapshot must see all-on or all-off.
    let names: Vec<String> = (0..50).map(|i| format!("f{i}")).collect();
    let make = |on: bool| {
        let body: Vec<String> = names.iter().map(|n| format!(r#""{n}": {{"enabled": {on}}}"#)).collect();
        config(&format!("{{{}}}", body.join(",")))
    };
    let engine = Arc::new(Engine::builder().build(make(true)));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let engine = engine.clone();
            let names = names.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut checks = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let snap = engine.snapshot();
                    let on: Vec<bool> = names.iter().map(|n| snap.evaluate(n.as_bytes(), &()).enabled).collect();
                    assert!(on.iter().all(|b| *b == on[0]), "mixed snapshot: {on:?}");
                    // Single evaluations are one snapshot each: the reason matches the value.
                    let e = engine.evaluate("f7", &());
                    assert_eq!(e.enabled, e.reason == Reason::Enabled);
                    checks += 1;
                }
                checks
            })
        })
        .collect();
    for i in 0..300 {
        engine.reload(make(i % 2 == 1));
        if i % 50 == 0 {
            engine.disable("f3");
            engine.clear("f3");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let total: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(total > 0);
}

/// A context that answers custom conditions itself (how the NIF passes the
/// results of Erlang funs).
struct Answering<'a> {
    inner: MapContext,
    answers: &'a [(&'a str, bool)],
}

impl Context for Answering<'_> {
    fn get(&self, key: &str) -> Option<Value<'_>> {
        self.inner.get(key)
    }
    fn custom(&self, name: &str) -> Option<bool> {
        self.answers.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
    }
}

#[test]
fn evaluate_or_defer_asks_for_custom_answers_then_evaluates_once() {
    use erlmcp_rollout::flags::Deferred;
    let engine = Engine::builder().build(config(
        r#"{"beta": {"enabled": true, "conditions": [{"custom": "staff"}, {"custom": "staff"}, {"custom": "paid"}]},
            "plain": {"enabled": true}}"#,
    ));
    let snap = engine.snapshot();
    let plain = Answering {
        inner: MapContext::new(),
        answers: &[],
    };
    match snap.evaluate_or_defer(b"beta", &plain) {
        Deferred::NeedsCustom(names) => assert_eq!(names, [Box::from("staff"), Box::from("paid")]),
        other => panic!("{other:?}"),
    }
    assert_eq!(engine.counts("beta"), Default::default(), "deferring counts nothing");
    assert!(matches!(snap.evaluate_or_defer(b"plain", &plain), Deferred::Evaluated(e) if e.enabled));
    let yes = Answering {
        inner: MapContext::new(),
        answers: &[("staff", true), ("paid", true)],
    };
    let half = Answering {
        inner: MapContext::new(),
        answers: &[("staff", true)],
    };
    assert!(snap.evaluate(b"beta", &yes).enabled);
    assert_eq!(
        snap.evaluate(b"beta", &half).reason,
        Reason::Condition {
            index: 2,
            failure: erlmcp_rollout::flags::ConditionFailure::Unregistered
        }
    );
    assert_eq!(engine.counts("beta").true_count, 1);
}
