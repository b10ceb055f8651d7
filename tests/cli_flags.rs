//! `erlmcp-rollout flags ...` from the operator's side: the built binary.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_erlmcp-rollout"));
    c.env_remove("ERLMCP_FEATURE_FLAGS");
    c
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/flags")
        .join(name)
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn write_tmp(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn check_accepts_the_reference_config() {
    let o = run(&["flags", "check", fixture("reference_config.json").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(stdout(&o).contains("5 flags"));
}

#[test]
fn check_lists_every_problem_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let f = write_tmp(
        &dir,
        "bad.json",
        r#"{
  "mcp_a": {"enabled": "yes"},
  "mcp_b": {"rollout_percentage": 250, "environments": "prod"},
  "mcp_c": {"conditions": [{"attribute": "v", "op": "like", "values": ["x"]}], "schedule": [{"at": "next tuesday"}]}
}"#,
    );
    let o = run(&["flags", "check", &f]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.contains("5 problem(s)"), "{out}");
    for needle in [
        "flag \"mcp_a\": $.mcp_a.enabled (line 2, column 24)",
        "flag \"mcp_b\": $.mcp_b.rollout_percentage (line 3, column 35): must be an integer 0..100, got 250",
        "flag \"mcp_b\": $.mcp_b.environments",
        "flag \"mcp_c\": $.mcp_c.conditions[0].op",
        "flag \"mcp_c\": $.mcp_c.schedule[0].at",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in\n{out}");
    }
    let o = run(&["flags", "check", &f, "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["problems"].as_array().unwrap().len(), 5);
    assert_eq!(v["problems"][0]["flag"], "mcp_a");
    assert_eq!(v["problems"][0]["line"], 2);
}

#[test]
fn check_reports_syntax_errors_with_line_and_column_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let f = write_tmp(&dir, "syntax.json", "{\n  \"a\": {\"enabled\": true,}\n}");
    let o = run(&["flags", "check", &f]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("line 2, column 25"), "{}", stdout(&o));
    let o = run(&["flags", "check", "/nonexistent/flags.json"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("/nonexistent/flags.json"));
}

#[test]
fn eval_and_explain_with_context() {
    let f = fixture("reference_config.json");
    let f = f.to_str().unwrap();
    let o = run(&[
        "flags",
        "eval",
        f,
        "mcp_sampling",
        "--env",
        "production",
        "--ctx",
        "session_id=abc",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["enabled"].as_bool(), v["reason"].as_str()),
        (Some(true), Some("enabled"))
    );

    let dir = tempfile::tempdir().unwrap();
    let cfg = write_tmp(
        &dir,
        "c.json",
        r#"{"f": {"enabled": true, "rollout_percentage": 50, "conditions": [{"session_type": "streaming"}]}}"#,
    );
    let o = run(&["flags", "eval", &cfg, "f", "--ctx", "session_id=session-123"]);
    assert_eq!(stdout(&o).trim(), "f: false (rollout (bucket 98 is not below 50%))");
    let o = run(&[
        "flags",
        "eval",
        &cfg,
        "f",
        "--ctx-int",
        "session_id=42",
        "--ctx-atom",
        "session_type=streaming",
    ]);
    assert_eq!(stdout(&o).trim(), "f: false (rollout (bucket 68 is not below 50%))");
    let o = run(&[
        "flags",
        "eval",
        &cfg,
        "f",
        "--ctx",
        "session_id=user-7",
        "--ctx-atom",
        "session_type=streaming",
    ]);
    assert_eq!(stdout(&o).trim(), "f: true (enabled)");
    let o = run(&["flags", "explain", &cfg, "f", "--ctx", "session_id=user-7"]);
    let out = stdout(&o);
    assert!(out.contains("[pass] rollout"), "{out}");
    assert!(out.contains("[FAIL] condition[0]"), "{out}");
    assert!(out.contains("attribute missing"), "{out}");
    let o = run(&["flags", "explain", &cfg, "f", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["result"]["reason"]["reason"], "condition",
        "no session_id hashes <<>> (bucket 29 < 50)"
    );

    let o = run(&["flags", "eval", &cfg, "f", "--ctx", "novalue"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--ctx \"novalue\": expected KEY=VALUE"));
    let o = run(&["flags", "eval", &cfg, "f", "--ctx-int", "n=4.5"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not an integer"));
    let o = run(&["flags", "eval", &cfg]);
    assert_eq!(o.status.code(), Some(2), "a missing FLAG is a usage error");
}

#[test]
fn eval_applies_erlmcp_feature_flags_unless_told_not_to() {
    let f = fixture("reference_config.json");
    let f = f.to_str().unwrap();
    let o = bin()
        .args(["flags", "eval", f, "mcp_sampling"])
        .env("ERLMCP_FEATURE_FLAGS", "sampling:disabled")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "mcp_sampling: false (disabled)"
    );
    let o = bin()
        .args(["flags", "eval", f, "mcp_sampling", "--no-env-overrides"])
        .env("ERLMCP_FEATURE_FLAGS", "sampling:disabled")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "mcp_sampling: true (enabled)"
    );
    let o = bin()
        .args(["flags", "eval", f, "mcp_tasks"])
        .env("ERLMCP_FEATURE_FLAGS", "tasks:yes")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("entry 1 \"tasks:yes\""));
}

#[test]
fn batch_keeps_input_order_and_reports_bad_lines_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_tmp(
        &dir,
        "c.json",
        r#"{"half": {"enabled": true, "rollout_percentage": 50}}"#,
    );
    let n = 100_000;
    let mut input = String::new();
    for i in 0..n {
        if i == 500 {
            input.push_str("{\"flag\": \"half\", \"context\": {\"session_id\": 1.5}}\n");
        } else if i % 3 == 0 {
            input.push_str(&format!(
                "{{\"flag\": \"half\", \"context\": {{\"session_id\": {i}}}}}\n"
            ));
        } else {
            input.push_str(&format!(
                "{{\"flag\": \"half\", \"context\": {{\"session_id\": \"s-{i}\"}}}}\n"
            ));
        }
    }
    let mut child = bin()
        .args(["flags", "eval", &cfg, "--env", "prod", "--batch"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()).unwrap());
    let o = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert_eq!(o.status.code(), Some(1), "one bad line");
    let lines: Vec<serde_json::Value> = o
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(lines.len(), n);
    assert_eq!(lines[500]["line"], 501);
    assert!(lines[500]["error"].as_str().unwrap().contains("not an integer"));
    // Spot-check against the library, which the phash2 tests tie to real erl.
    let engine = erlmcp_rollout::flags::Engine::builder()
        .environment("prod")
        .build(erlmcp_rollout::flags::FlagsConfig::from_file(&cfg).unwrap());
    for i in (0..n).step_by(997).filter(|i| *i != 500) {
        let ctx = if i % 3 == 0 {
            erlmcp_rollout::flags::MapContext::new().int("session_id", i as i64)
        } else {
            erlmcp_rollout::flags::MapContext::new().binary("session_id", format!("s-{i}"))
        };
        let e = engine.evaluate("half", &ctx);
        assert_eq!(lines[i]["enabled"], e.enabled, "line {i}");
        assert_eq!(lines[i]["reason"], e.reason.code(), "line {i}");
    }
}

#[test]
fn list_plan_and_matrix() {
    let f = fixture("reference_config.json");
    let f = f.to_str().unwrap();
    let o = run(&["flags", "list", f, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[1]["flag"], "mcp_sampling");
    assert_eq!(v[1]["environments"]["production"], "on");

    let plan = fixture("reference_week_plan.json");
    let o = run(&["flags", "plan", plan.to_str().unwrap(), "--start", "2026-02-09"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let out = stdout(&o);
    let weeks: Vec<&str> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(weeks, ["1", "2", "4", "6", "8", "10"], "{out}");

    let dir = tempfile::tempdir().unwrap();
    let merged = dir.path().join("merged.json");
    let o = run(&[
        "flags",
        "plan",
        plan.to_str().unwrap(),
        "--start",
        "2026-02-09",
        "--config",
        f,
        "--output",
        merged.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let eval_at = |at: &str| {
        let o = run(&[
            "flags",
            "eval",
            merged.to_str().unwrap(),
            "mcp_sampling",
            "--env",
            "production",
            "--at",
            at,
        ]);
        stdout(&o).trim().to_owned()
    };
    assert_eq!(
        eval_at("2026-04-01"),
        "mcp_sampling: false (environment)",
        "week 8: staging only"
    );
    assert_eq!(
        eval_at("2026-04-13"),
        "mcp_sampling: true (enabled)",
        "week 10: production at 100%"
    );
    let o = run(&["flags", "plan", plan.to_str().unwrap(), "--start", "someday"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--start"));

    let o = run(&["flags", "matrix", f, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = v["include"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["baseline", "phase1", "phase2", "phase3", "phase4", "all_enabled"]
    );
    assert_eq!(v["include"][1]["enabled"], serde_json::json!(["mcp_sampling"]));
    let o = run(&["flags", "matrix", f, "--github-output"]);
    assert!(stdout(&o).starts_with("matrix={\"include\":["));
}

#[test]
fn a_closed_pipe_is_not_an_error() {
    let f = fixture("reference_config.json");
    let mut child = bin()
        .args(["flags", "list", f.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn erlmcp_format_files_are_checked_and_evaluated_with_erlmcps_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_tmp(
        &dir,
        "feature-flags.json",
        r#"{"flags": [
  {"name": "new_transport", "state": "rollout", "rollout_strategy": "canary", "rollout_percentage": 70},
  {"name": "max_batch", "value": 250}
]}"#,
    );
    let o = run(&["flags", "check", &good]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(stdout(&o).contains("2 flags"), "{}", stdout(&o));
    // phash2(<<"session-123">>) = 86828266: bucket 66 < 70 (phash2(_, 100) would be 98).
    let o = run(&[
        "flags",
        "explain",
        &good,
        "new_transport",
        "--ctx",
        "session_id=session-123",
    ]);
    let out = stdout(&o);
    assert!(out.contains("phash2(Value) rem 100 = 66, below 70%"), "{out}");
    let bad = write_tmp(
        &dir,
        "bad.json",
        "{\"flags\": [\n  {\"name\": \"x\", \"state\": \"on\"},\n  {\"name\": \"x\"}\n]}",
    );
    let o = run(&["flags", "check", &bad]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.contains("2 problem(s)"), "{out}");
    assert!(
        out.contains("flag \"x\": $.flags[0].state (line 2, column 26): state must be enabled, disabled or rollout"),
        "{out}"
    );
    assert!(
        out.contains("$.flags[1].name (line 3, column 12): flag \"x\" is listed twice"),
        "{out}"
    );
}
