//! The operator's side of the flag additions: `flags push --actor
//! --audit-log`, `flags history`, `flags eval --details`, and `flags check`
//! naming a prerequisite cycle; an engine watching etcd records each pushed
//! change in its own audit trail. Starts its own 3-member etcd cluster.

#[path = "session_support/etcd_cluster.rs"]
mod etcd_cluster;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use erlmcp_rollout::flags::{AuditLog, ChangeKind, Engine, EtcdFlagsOptions, FlagsConfig};

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_erlmcp-rollout"))
        .env_remove("ERLMCP_FEATURE_FLAGS")
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn push_records_the_actor_and_history_reads_it_and_watchers_audit_too() {
    let endpoints = etcd_cluster::shared().endpoints();
    let key = format!("{}flags", etcd_cluster::unique_prefix());
    let dir = tempfile::tempdir().unwrap();
    let (v1, v2) = (dir.path().join("v1.json"), dir.path().join("v2.json"));
    let (log, node_log) = (dir.path().join("push-audit.jsonl"), dir.path().join("node-audit.jsonl"));
    std::fs::write(&v1, r#"{"mcp_tasks": {"enabled": true, "rollout_percentage": 10}}"#).unwrap();
    std::fs::write(
        &v2,
        r#"{"mcp_tasks": {"enabled": true, "rollout_basis_points": 1500}, "mcp_new": {"enabled": true}}"#,
    )
    .unwrap();

    // A node following the key, with its audit trail on.
    let engine = Arc::new(
        Engine::builder()
            .audit_log(AuditLog::open(&node_log, "node-a").unwrap())
            .build(FlagsConfig::default()),
    );
    let options = EtcdFlagsOptions {
        key: key.clone(),
        ..EtcdFlagsOptions::default()
    };
    let watcher = engine.watch_etcd(&endpoints, options).unwrap();
    etcd_cluster::wait_for("watcher connected", || watcher.status().connected);

    let eps = endpoints.join(",");
    let push = |file: &Path, actor: &str| {
        cli(&[
            "flags",
            "push",
            path(file),
            "--etcd",
            &eps,
            "--key",
            &key,
            "--actor",
            actor,
            "--audit-log",
            path(&log),
        ])
    };
    let o = push(&v1, "alice");
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let o = push(&v1, "alice"); // unchanged: no line
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let o = push(&v2, "bob");
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    etcd_cluster::wait_for("the node serves v2", || engine.get_all().contains_key("mcp_new"));

    let h = AuditLog::read(&log).unwrap();
    assert_eq!(h.len(), 2, "{h:#?}");
    assert_eq!(h[0].actor, "alice");
    assert!(h[0].source.starts_with(&format!("push:{key}@")), "{}", h[0].source);
    assert_eq!(h[0].changes[0].change, ChangeKind::Added);
    assert_eq!(h[1].actor, "bob");
    let tasks = &h[1].changes.iter().find(|c| c.flag == "mcp_tasks").unwrap().fields;
    assert_eq!(tasks["rollout_basis_points"].after, 1500);
    assert_eq!(tasks["rollout_percentage"].before, 10);
    assert_eq!(tasks["rollout_percentage"].after, serde_json::Value::Null);

    // The node's own trail: the same two changes, from etcd at the pushes' revisions.
    let n = AuditLog::read(&node_log).unwrap();
    assert_eq!(n.len(), 2, "{n:#?}");
    assert_eq!(n[0].actor, "node-a");
    for (node, pushed) in n.iter().zip(&h) {
        assert_eq!(node.source, pushed.source.replacen("push:", "etcd:", 1));
        assert_eq!(node.changes, pushed.changes);
    }

    // history: human, filtered, last N, JSON.
    let o = cli(&["flags", "history", path(&log)]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let text = stdout(&o);
    assert!(
        text.contains("  alice  push:") && text.contains("  bob  push:"),
        "{text}"
    );
    assert!(
        text.contains(
            "mcp_tasks                changed  rollout_basis_points: null -> 1500; rollout_percentage: 10 -> null"
        ),
        "{text}"
    );
    assert!(text.contains("mcp_new                  added"), "{text}");
    let o = cli(&["flags", "history", path(&log), "--flag", "mcp_new", "--json"]);
    let lines: Vec<serde_json::Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["actor"], "bob");
    assert_eq!(lines[0]["changes"].as_array().unwrap().len(), 1);
    let o = cli(&["flags", "history", path(&log), "--last", "1", "--json"]);
    assert_eq!(stdout(&o).lines().count(), 1);
    drop(watcher);
}

#[test]
fn history_names_a_bad_line_and_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    std::fs::write(
        &log,
        "{\"format\":1,\"time\":\"2026-12-03T09:00:00.000Z\",\"actor\":\"a\",\"source\":\"json\",\"changes\":[]}\nnot json\n",
    )
    .unwrap();
    let o = cli(&["flags", "history", path(&log)]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("line 2"), "{o:?}");
    let o = cli(&["flags", "history", path(&dir.path().join("none.jsonl"))]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("none.jsonl"), "{o:?}");
}

#[test]
fn eval_details_and_check_of_the_new_fields() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("flags.json");
    std::fs::write(
        &file,
        r##"{"kill": {"enabled": true},
            "banner": {"enabled": true, "metadata": {"owner": "web"}, "prerequisites": [{"flag": "kill"}],
                       "variants": {"blue": {"value": "#00f", "weight": 1}}}}"##,
    )
    .unwrap();
    let o = cli(&[
        "flags",
        "eval",
        path(&file),
        "banner",
        "--details",
        "--ctx",
        "session_id=s-1",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let d: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        (d["value"].as_str(), d["variant"].as_str(), d["reason"].as_str()),
        (Some("#00f"), Some("blue"), Some("TARGETING_MATCH"))
    );
    assert_eq!(d["metadata"]["owner"], "web");
    let o = cli(&["flags", "eval", path(&file), "nope", "--details"]);
    assert!(stdout(&o).contains("reason ERROR (FLAG_NOT_FOUND"), "{o:?}");
    let o = cli(&["flags", "explain", path(&file), "banner"]);
    assert!(
        stdout(&o).contains("prerequisite[0]") && stdout(&o).contains("serves \"blue\""),
        "{o:?}"
    );

    std::fs::write(
        &file,
        r#"{"a": {"prerequisites": [{"flag": "b"}]}, "b": {"prerequisites": [{"flag": "a"}]}}"#,
    )
    .unwrap();
    let o = cli(&["flags", "check", path(&file)]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(stdout(&o).contains("prerequisites form a cycle: a -> b -> a"), "{o:?}");
}
