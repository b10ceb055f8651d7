//! The `erlmcp-rollout` binary: `canary decide --metrics`, `canary plan` and
//! `ci scope` in temporary git repositories.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_erlmcp-rollout");

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run_in(dir: Option<&Path>, args: &[&str]) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = cmd.output().expect("run erlmcp-rollout");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn run(args: &[&str]) -> Run {
    run_in(None, args)
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/deploy/{name}.json", env!("CARGO_MANIFEST_DIR"))
}

fn decide_json(name: &str, extra: &[&str]) -> (i32, serde_json::Value) {
    let f = fixture(name);
    let mut args = vec!["canary", "decide", "--metrics", &f, "--json"];
    args.extend_from_slice(extra);
    let r = run(&args);
    let v = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}{}", r.stdout, r.stderr));
    (r.code, v)
}

#[test]
fn decide_exit_codes_per_decision() {
    for (name, code, decision) in [
        ("healthy", 0, "promote"),
        ("slow", 0, "promote"),
        ("zero_baseline", 0, "promote"),
        ("low_traffic", 10, "continue"),
        ("no_data", 10, "continue"),
        ("failing", 11, "rollback"),
        ("restarts", 11, "rollback"),
    ] {
        let (c, v) = decide_json(name, &[]);
        assert_eq!((c, v["decision"].as_str()), (code, Some(decision)), "{name}: {v:#}");
        assert!(v["warnings"].is_array() && v["rules"].is_array(), "{v:#}");
        for r in v["rules"].as_array().into_iter().flatten() {
            assert!(
                r["rule"].is_string() && r["inputs"].is_object() && r["outcome"].is_string(),
                "{r:#}"
            );
        }
    }
}

#[test]
fn decide_json_cites_the_matrix_and_names_metrics_in_warnings() {
    let (_, v) = decide_json("restarts", &[]);
    let t = &v["triggers"][0];
    assert_eq!(t["id"], "pod_crash_loop");
    assert_eq!(t["rollback"], "automatic");
    assert_eq!(t["deadline_seconds"], 60);
    let (_, v) = decide_json("slow", &[]);
    let metrics: Vec<&str> = v["warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["metric"].as_str())
        .collect();
    assert_eq!(metrics, ["latency_p95_ms", "latency_p95_ms", "latency_p99_ms", "cpu"]);
    assert_eq!(v["triggers"][0]["approval"], "SRE on-call");
}

#[test]
fn decide_human_output() {
    let f = fixture("failing");
    let r = run(&["canary", "decide", "--metrics", &f]);
    assert_eq!(r.code, 11);
    assert!(r.stdout.contains("decision: rollback"), "{}", r.stdout);
    assert!(r.stdout.contains("rollback error_rate"), "{}", r.stdout);
    assert!(r.stdout.contains("trigger: Error rate >0.1%"), "{}", r.stdout);
}

#[test]
fn decide_github_output() {
    let f = fixture("failing");
    let r = run(&["canary", "decide", "--metrics", &f, "--github-output"]);
    assert_eq!(r.code, 11);
    assert_eq!(
        r.stdout,
        "decision=rollback\ntriggers=error_rate_absolute,error_rate_relative\nwarnings=0\n"
    );
}

#[test]
fn thresholds_from_flags_and_files() {
    let (code, _) = decide_json(
        "failing",
        &[
            "--threshold",
            "max_error_rate=0.01",
            "--threshold",
            "error_rate_ratio=100",
        ],
    );
    assert_eq!(code, 0);
    let dir = tempfile::tempdir().expect("tempdir");
    let t = dir.path().join("t.json");
    std::fs::write(&t, r#"{"hold_on_warning": true}"#).expect("write");
    let (code, v) = decide_json("slow", &["--thresholds", t.to_str().unwrap_or_default()]);
    assert_eq!((code, v["decision"].as_str()), (10, Some("continue")));
    let f = fixture("healthy");
    let r = run(&["canary", "decide", "--metrics", &f, "--threshold", "max_eror_rate=1"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("unknown threshold \"max_eror_rate\""), "{}", r.stderr);
}

#[test]
fn malformed_metrics_are_an_error_not_a_verdict() {
    for name in ["malformed", "invalid"] {
        let f = fixture(name);
        let r = run(&["canary", "decide", "--metrics", &f, "--json"]);
        assert_eq!(r.code, 1, "{name}: {}{}", r.stdout, r.stderr);
        assert!(r.stdout.is_empty(), "no verdict on stdout: {}", r.stdout);
        assert!(r.stderr.contains("line "), "errors name their position: {}", r.stderr);
    }
    let r = run(&["canary", "decide", "--metrics", "/nonexistent/metrics.json"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("cannot read /nonexistent/metrics.json"),
        "{}",
        r.stderr
    );
    // No source at all is a usage error.
    assert_eq!(run(&["canary", "decide"]).code, 2);
    // Prometheus-only options with a file are refused.
    let f = fixture("healthy");
    assert_eq!(
        run(&["canary", "decide", "--metrics", &f, "--at", "2026-01-01"]).code,
        1
    );
}

#[test]
fn bad_prometheus_options_are_invalid_input_before_any_query() {
    // Nothing listens on port 1, so exit 1 (not 12) proves nothing was sent.
    for args in [
        &["--prometheus", "http://127.0.0.1:1", "--window", "5"][..],
        // Credentials are never sent over plain http://.
        &[
            "--prometheus",
            "http://127.0.0.1:1",
            "--prometheus-token-file",
            "Cargo.toml",
        ],
        &[
            "--prometheus",
            "https://127.0.0.1:1",
            "--prometheus-cacert",
            "/nonexistent/ca.pem",
        ],
        &["--prometheus", "127.0.0.1:9090"],
        &["--prometheus", "http://127.0.0.1:1", "--at", "yesterday"],
        &["--prometheus", "http://127.0.0.1:1", "--query", "bogus=up"],
        &["--prometheus", "http://127.0.0.1:1", "--query", "requests="],
    ] {
        let mut all = vec!["canary", "decide"];
        all.extend_from_slice(args);
        let r = run(&all);
        assert_eq!(r.code, 1, "{args:?}: {}", r.stderr);
        assert!(r.stdout.is_empty());
    }
    let r = run(&["canary", "decide", "--prometheus", "http://127.0.0.1:1"]);
    assert_eq!(r.code, 12, "{}", r.stderr);
}

#[test]
fn decide_help_documents_exit_codes() {
    let r = run(&["canary", "decide", "--help"]);
    for line in [
        "0  promote",
        "10  continue",
        "11  rollback",
        "1  invalid input",
        "12  Prometheus failed",
    ] {
        assert!(r.stdout.contains(line), "{line:?} missing from:\n{}", r.stdout);
    }
}

#[test]
fn plan_prints_ramp_and_matrix() {
    let r = run(&["canary", "plan"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("total observation: 180 min"), "{}", r.stdout);
    assert!(r.stdout.contains("Pod crash loop"), "{}", r.stdout);
    let r = run(&["canary", "plan", "--json", "--ramp", "10:15,50:15,100:30"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    let pct: Vec<u64> = v["ramp"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["percent"].as_u64())
        .collect();
    assert_eq!(pct, [10, 50, 100]);
    assert_eq!(v["total_minutes"], 60);
    assert_eq!(v["rollback_matrix"].as_array().map(Vec::len), Some(7));
    let r = run(&["canary", "plan", "--ramp", "50:10,25:10"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("stage 2"), "{}", r.stderr);
}

/// A temporary git repository with a base commit; returns (dir, base sha).
fn repo() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    git(dir.path(), &["init", "-q", "-b", "main"]);
    write(dir.path(), "README.md", "erlmcp\n");
    write(
        dir.path(),
        "apps/erlmcp_core/src/erlmcp_server.erl",
        "-module(erlmcp_server).\n",
    );
    write(
        dir.path(),
        "apps/erlmcp_core/src/erlmcp_util.erl",
        "-module(erlmcp_util).\n",
    );
    write(
        dir.path(),
        "apps/erlmcp_transports/src/erlmcp_tcp.erl",
        "-module(erlmcp_tcp).\n",
    );
    write(
        dir.path(),
        "apps/erlmcp_core/test/erlmcp_util_tests.erl",
        "-module(erlmcp_util_tests).\n",
    );
    commit(dir.path(), "base");
    let base = git(dir.path(), &["rev-parse", "HEAD"]);
    (dir, base)
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn write(dir: &Path, path: &str, text: &str) {
    let p = dir.join(path);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).expect("mkdir");
    }
    std::fs::write(p, text).expect("write");
}

fn commit(dir: &Path, msg: &str) {
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", msg]);
}

/// Branch off `base`, change `files`, and run `ci scope --json`.
fn scope_after(files: &[&str]) -> serde_json::Value {
    let (dir, base) = repo();
    git(dir.path(), &["checkout", "-q", "-b", "change"]);
    for f in files {
        write(dir.path(), f, "changed\n");
    }
    commit(dir.path(), "change");
    let d = dir.path().to_str().unwrap_or_default();
    let r = run(&["ci", "scope", "--repo", d, "--base", &base, "--head", "HEAD", "--json"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

#[test]
fn scope_docs_only_is_smoke() {
    let v = scope_after(&["README.md", "docs/guide.md"]);
    assert_eq!(v["scope"], "smoke");
    assert_eq!(v["apps"], serde_json::json!([]));
    assert_eq!(v["test_cmd"], "rebar3 eunit --module=erlmcp_json_rpc_tests");
}

#[test]
fn scope_app_sources_are_quick_with_those_apps() {
    let v = scope_after(&[
        "apps/erlmcp_transports/src/erlmcp_tcp.erl",
        "apps/erlmcp_core/src/erlmcp_util.erl",
    ]);
    assert_eq!(v["scope"], "quick");
    assert_eq!(v["apps"], serde_json::json!(["erlmcp_core", "erlmcp_transports"]));
    assert_eq!(v["test_cmd"], "rebar3 eunit --app=erlmcp_core,erlmcp_transports");
}

#[test]
fn scope_test_files_and_critical_paths_are_full() {
    let v = scope_after(&["apps/erlmcp_core/test/erlmcp_util_tests.erl"]);
    assert_eq!(v["scope"], "full");
    let v = scope_after(&["apps/erlmcp_observability/test/erlmcp_metrics_SUITE.erl"]);
    assert_eq!(v["scope"], "full");
    let v = scope_after(&["apps/erlmcp_core/src/erlmcp_server.erl"]);
    assert_eq!(v["scope"], "full");
    assert_eq!(v["apps"], serde_json::json!(["erlmcp_core"]));
    assert_eq!(v["test_cmd"], "rebar3 do eunit --cover, ct --cover");
}

#[test]
fn scope_uses_the_merge_base_and_custom_critical_paths() {
    let (dir, base) = repo();
    let d = dir.path().to_str().unwrap_or_default().to_owned();
    git(dir.path(), &["checkout", "-q", "-b", "change"]);
    write(dir.path(), "rebar.config", "{erl_opts, []}.\n");
    commit(dir.path(), "config");
    // main moves on with a test change; BASE...HEAD ignores it.
    git(dir.path(), &["checkout", "-q", "main"]);
    write(
        dir.path(),
        "apps/erlmcp_core/test/erlmcp_util_tests.erl",
        "changed on main\n",
    );
    commit(dir.path(), "main moves");
    let r = run(&[
        "ci", "scope", "--repo", &d, "--base", "main", "--head", "change", "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    assert_eq!(v["scope"], "smoke", "{v:#}");
    assert_eq!(v["changed_files"], serde_json::json!(["rebar.config"]));
    let r = run(&[
        "ci",
        "scope",
        "--repo",
        &d,
        "--base",
        "main",
        "--head",
        "change",
        "--critical-path",
        "rebar.config",
        "--github-output",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout,
        "scope=full\napps=\napps_json=[]\ntest_cmd=rebar3 do eunit --cover, ct --cover\n"
    );
    let _ = base;
}

#[test]
fn scope_github_output_and_human_output() {
    let (dir, base) = repo();
    write(dir.path(), "apps/erlmcp_transports/src/erlmcp_tcp.erl", "changed\n");
    commit(dir.path(), "tcp");
    // Run from inside the repository (the default --repo is the current directory).
    let r = run_in(Some(dir.path()), &["ci", "scope", "--base", &base, "--github-output"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout,
        "scope=quick\napps=erlmcp_transports\napps_json=[\"erlmcp_transports\"]\ntest_cmd=rebar3 eunit --app=erlmcp_transports\n"
    );
    let r = run_in(Some(dir.path()), &["ci", "scope", "--base", &base]);
    assert!(
        r.stdout.starts_with("scope: quick\napps: erlmcp_transports\n"),
        "{}",
        r.stdout
    );
}

#[test]
fn scope_errors_have_their_own_exit_code() {
    let (dir, _) = repo();
    let d = dir.path().to_str().unwrap_or_default();
    let r = run(&["ci", "scope", "--repo", d, "--base", "no-such-branch"]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(r.stderr.contains("unknown revision \"no-such-branch\""), "{}", r.stderr);
    let r = run(&["ci", "scope", "--repo", d, "--base=--output=/tmp/x"]);
    assert_eq!(r.code, 13, "options are not revisions: {}", r.stderr);
    let plain = tempfile::tempdir().expect("tempdir");
    let p = plain.path().to_str().unwrap_or_default();
    let r = run(&["ci", "scope", "--repo", p, "--base", "HEAD~1"]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(r.stderr.contains("is not a git repository"), "{}", r.stderr);
    // Unrelated histories have no merge base.
    git(dir.path(), &["checkout", "-q", "--orphan", "other"]);
    write(dir.path(), "x.txt", "x\n");
    commit(dir.path(), "orphan");
    let r = run(&["ci", "scope", "--repo", d, "--base", "main", "--head", "other"]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(r.stderr.contains("no merge base"), "{}", r.stderr);
}
