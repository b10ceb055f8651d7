//! Flag configs published to etcd and followed by engines (DESIGN §3.3), against a real
//! 3-member cluster started by this test binary: pushes validate first, watchers reload
//! every change, invalid values and outages keep the last good snapshot, and a watcher
//! fails over to another member. Also the CLI's `flags push`.

#[path = "session_support/etcd_cluster.rs"]
mod etcd_cluster;

use etcd_cluster::{etcdctl, wait_for};

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use erlmcp_rollout::flags::{push_flags, Engine, EtcdFlagsOptions, EtcdWatcher, FlagsConfig, PushError};

const TIMEOUT: Duration = Duration::from_secs(5);

fn config(flag: &str, enabled: bool) -> Vec<u8> {
    format!(r#"{{"{flag}": {{"enabled": {enabled}}}}}"#).into_bytes()
}

fn empty_engine() -> Arc<Engine> {
    Arc::new(Engine::builder().build(FlagsConfig::from_json(b"{}").unwrap()))
}

fn watch(engine: &Arc<Engine>, endpoints: &[String], key: &str) -> EtcdWatcher {
    let options = EtcdFlagsOptions {
        key: key.to_string(),
        retry_interval: Duration::from_millis(200),
        ..EtcdFlagsOptions::default()
    };
    engine.watch_etcd(endpoints, options).unwrap()
}

fn flag(engine: &Engine, name: &str) -> Option<bool> {
    engine.get_all().get(name).copied()
}

#[test]
fn every_watching_engine_reloads_each_pushed_config() {
    let endpoints = etcd_cluster::shared().endpoints();
    let key = format!("{}flags", etcd_cluster::unique_prefix());
    let (a, b) = (empty_engine(), empty_engine());
    let (wa, wb) = (watch(&a, &endpoints, &key), watch(&b, &endpoints, &key));
    wait_for("both watchers connected", || {
        wa.status().connected && wb.status().connected
    });

    let first = push_flags(&endpoints, &key, &config("mcp_tasks", true), TIMEOUT).unwrap();
    assert!(first.changed && first.flags == 1);
    let took = wait_for("both engines serve the pushed config", || {
        flag(&a, "mcp_tasks") == Some(true) && flag(&b, "mcp_tasks") == Some(true)
    });
    let second = push_flags(&endpoints, &key, &config("mcp_tasks", false), TIMEOUT).unwrap();
    assert!(second.revision > first.revision);
    let took2 = wait_for("both engines serve the change", || {
        flag(&a, "mcp_tasks") == Some(false) && flag(&b, "mcp_tasks") == Some(false)
    });
    eprintln!("push -> both engines reloaded in {took:?} and {took2:?}");
    // Pushing the same bytes again changes nothing.
    let same = push_flags(&endpoints, &key, &config("mcp_tasks", false), TIMEOUT).unwrap();
    assert!(!same.changed);
    assert_eq!(same.revision, second.revision);
    let st = wa.status();
    assert_eq!((st.reloads, st.failures, st.last_error), (2, 0, None));
    assert_eq!(st.revision, second.revision);

    // A watcher started later reads the current value at once.
    let c = empty_engine();
    let _wc = watch(&c, &endpoints, &key);
    wait_for("a late watcher reads the current config", || {
        flag(&c, "mcp_tasks") == Some(false)
    });
}

#[test]
fn an_invalid_config_is_never_published_and_never_replaces_the_good_one() {
    let endpoints = etcd_cluster::shared().endpoints();
    let key = format!("{}flags", etcd_cluster::unique_prefix());
    let bad = br#"{"mcp_tasks": {"enabled": "yes"}}"#;
    match push_flags(&endpoints, &key, bad, TIMEOUT) {
        Err(PushError::Invalid(e)) => assert!(!e.problems().is_empty()),
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert!(
        !etcdctl(&endpoints, &["get", &key]).contains("mcp_tasks"),
        "nothing published"
    );

    let engine = empty_engine();
    let w = watch(&engine, &endpoints, &key);
    push_flags(&endpoints, &key, &config("mcp_tasks", true), TIMEOUT).unwrap();
    wait_for("the good config", || flag(&engine, "mcp_tasks") == Some(true));

    // Someone bypasses validation: the watcher refuses the value and keeps serving.
    etcdctl(&endpoints, &["put", &key, std::str::from_utf8(bad).unwrap()]);
    wait_for("the bad value to be seen", || w.status().failures == 1);
    assert_eq!(flag(&engine, "mcp_tasks"), Some(true));
    let err = w.status().last_error.unwrap();
    assert!(err.contains(&key) && err.contains("enabled"), "{err}");
    // Deleting the key keeps the last good config too.
    etcdctl(&endpoints, &["del", &key]);
    wait_for("the delete to be seen", || w.status().failures == 2);
    assert_eq!(flag(&engine, "mcp_tasks"), Some(true));
    assert!(w.status().last_error.unwrap().contains("deleted"));
    // The next good push serves again and clears the error.
    push_flags(&endpoints, &key, &config("other", true), TIMEOUT).unwrap();
    wait_for("the next good config", || flag(&engine, "other") == Some(true));
    assert_eq!(w.status().last_error, None);
}

#[test]
fn a_watcher_survives_member_loss_and_rereads_after_reconnecting() {
    let mut cluster = etcd_cluster::Cluster::start();
    let endpoints = cluster.endpoints();
    let key = "flags";
    let engine = empty_engine();
    // The watcher tries the endpoints in order, so it is on member 0.
    let w = watch(&engine, &endpoints, key);
    push_flags(&endpoints, key, &config("f", true), TIMEOUT).unwrap();
    wait_for("v1", || flag(&engine, "f") == Some(true));

    // Its member dies; a change made meanwhile arrives through another member.
    cluster.kill(0);
    push_flags(&endpoints[1..], key, &config("f", false), TIMEOUT).unwrap();
    let took = wait_for("v2 through another member", || flag(&engine, "f") == Some(false));
    eprintln!("watcher failed over and reloaded {took:?} after the push");
    assert!(w.status().reconnects >= 1);

    // The whole cluster down: the last good snapshot keeps serving.
    cluster.kill(1);
    cluster.kill(2);
    wait_for("the watcher to notice", || !w.status().connected);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(flag(&engine, "f"), Some(false));
    assert!(w.status().last_error.unwrap().contains("serving the last good config"));

    // Back up: it reconnects, re-reads, and follows new pushes.
    for i in 0..3 {
        cluster.restart(i);
    }
    cluster.wait_healthy(Duration::from_secs(30));
    push_flags(&endpoints, key, &config("g", true), TIMEOUT).unwrap();
    wait_for("v3 after the outage", || flag(&engine, "g") == Some(true));
    wait_for("connected again", || w.status().connected);
}

#[test]
fn cli_push_validates_first_and_publishes_only_valid_configs() {
    let endpoints = etcd_cluster::shared().endpoints();
    let key = format!("{}flags", etcd_cluster::unique_prefix());
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.json");
    let bad = dir.path().join("bad.json");
    std::fs::write(&good, config("mcp_tasks", true)).unwrap();
    std::fs::write(&bad, br#"{"mcp_tasks": {"enabled": true, "rollout_percentage": 101}}"#).unwrap();
    let run = |file: &std::path::Path, eps: &str| {
        Command::new(env!("CARGO_BIN_EXE_erlmcp-rollout"))
            .args(["flags", "push"])
            .arg(file)
            .args(["--etcd", eps, "--key", &key, "--timeout-s", "2"])
            .output()
            .unwrap()
    };
    let o = run(&bad, &endpoints.join(","));
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("nothing was published") && out.contains("rollout_percentage"),
        "{out}"
    );
    assert!(!etcdctl(&endpoints, &["get", &key]).contains("mcp_tasks"));

    let o = run(&good, &endpoints.join(","));
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("published: 1 flags"),
        "{o:?}"
    );
    let stored = etcdctl(&endpoints, &["get", &key, "--print-value-only"]);
    assert_eq!(stored.trim_end().as_bytes(), config("mcp_tasks", true).as_slice());

    // Unreachable etcd: an error naming the endpoint, not a success.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = run(&good, &format!("127.0.0.1:{port}"));
    assert_ne!(o.status.code(), Some(0), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&format!("127.0.0.1:{port}")),
        "{o:?}"
    );
}

#[test]
fn an_erlmcp_format_file_is_pushed_and_served_with_erlmcps_cohorts() {
    // erlmcp's own {"flags": [...]} format through `flags push` and a watcher: the
    // partial rollout buckets by phash2(Id) rem 100, as erlmcp's module does.
    let endpoints = etcd_cluster::shared().endpoints();
    let key = format!("{}flags", etcd_cluster::unique_prefix());
    let engine = empty_engine();
    let w = watch(&engine, &endpoints, &key);
    wait_for("the watcher connected", || w.status().connected);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("feature-flags.json");
    std::fs::write(
        &file,
        br#"{"flags": [{"name": "new_transport", "state": "rollout", "rollout_strategy": "canary",
                         "rollout_percentage": 70}, {"name": "off", "state": "disabled"}]}"#,
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_erlmcp-rollout"))
        .args(["flags", "push"])
        .arg(&file)
        .args(["--etcd", &endpoints.join(","), "--key", &key, "--timeout-s", "2"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("published: 2 flags"),
        "{o:?}"
    );
    wait_for("the engine serves the pushed erlmcp file", || {
        flag(&engine, "new_transport") == Some(true) && flag(&engine, "off") == Some(false)
    });
    use erlmcp_rollout::flags::{phash2, MapContext, Value};
    for i in 0..500 {
        let id = format!("session-{i}");
        let want = phash2::phash2(&Value::Binary(id.as_bytes()), 1 << 27) % 100 < 70;
        let ctx = MapContext::new().binary("session_id", &id);
        assert_eq!(engine.is_enabled("new_transport", &ctx), want, "{id}");
    }
    // phash2(<<"session-123">>) = 86828266: bucket 66 (phash2(_, 100) would be 98, out).
    assert!(engine.is_enabled("new_transport", &MapContext::new().binary("session_id", "session-123")));
}
