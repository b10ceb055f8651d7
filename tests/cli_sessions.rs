//! `erlmcp-rollout sessions ...` from the operator's side: the built binary over real
//! redb files.

use std::path::Path;
use std::process::{Command, Output};

use erlmcp_rollout::session::{DiskStore, Session, SessionId, Store, StoreOptions, Timeout};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_erlmcp-rollout"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

fn id(s: impl AsRef<[u8]>) -> SessionId {
    SessionId::new(s).unwrap()
}

/// A disk store with 3 live sessions (one with binary metadata and a non-UTF-8 id), one
/// expired and one tombstone. Times are real (the CLI uses the system clock).
fn fixture(path: &Path) {
    let store = DiskStore::create(path, StoreOptions::default()).unwrap();
    let now = store.options().clock.now_unix_ms();
    let hour = Timeout::ms(3_600_000).unwrap();
    store
        .create(Session::new(id("alpha"), now, hour, b"m-a".to_vec()))
        .unwrap();
    store
        .create(Session::new(
            id("beta"),
            now,
            Timeout::Infinity,
            vec![0, 255, b'"', b'\\'],
        ))
        .unwrap();
    store.create(Session::new(id([0xff, 0x01]), now, hour, vec![])).unwrap();
    let mut old = Session::new(id("old"), now - 10_000, Timeout::ms(1_000).unwrap(), b"o".to_vec());
    old.version = 1;
    store.apply_batch_if_newer(vec![old]).unwrap();
    store
        .create(Session::new(id("gone"), now, hour, b"g".to_vec()))
        .unwrap();
    store.delete(&id("gone")).unwrap();
}

/// A temporary disk store holding [`fixture`], and its store URI (the store lives as long
/// as the directory).
fn fixture_store() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    fixture(&path);
    let uri = format!("disk:{}", path.display());
    (dir, uri)
}

#[test]
fn stats_counts_each_state_and_bytes() {
    let (_dir, uri) = fixture_store();
    let o = run(&["sessions", "stats", &uri, "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["records"], 5);
    assert_eq!(v["live"], 3);
    assert_eq!(v["expired"], 1);
    assert_eq!(v["tombstones"], 1);
    // 42-byte headers + ids (5+4+2+3+4) + metadata (3+4+0+1; the tombstone keeps none).
    assert_eq!(v["bytes"], 5 * 42 + 18 + 8);
    let o = run(&["sessions", "stats", &uri]);
    assert!(
        stdout(&o).contains("records: 5 (live 3, expired 1, tombstones 1)"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn get_shows_every_state_losslessly() {
    let (_dir, uri) = fixture_store();
    let o = run(&["sessions", "get", &uri, "beta"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("state: live"), "{out}");
    assert!(out.contains("version: 1"), "{out}");
    assert!(out.contains("timeout_ms: infinity"), "{out}");
    assert!(out.contains(r#"metadata (4 bytes, escaped): "\x00\xff\"\\""#), "{out}");
    let o = run(&["sessions", "get", &uri, "beta", "--hex"]);
    assert!(
        stdout(&o).contains("metadata (4 bytes, hex): 00ff225c"),
        "{}",
        stdout(&o)
    );
    let o = run(&["sessions", "get", &uri, "gone", "--json"]);
    let v = json(&o);
    assert_eq!(
        (v["state"].as_str(), v["version"].as_u64()),
        (Some("tombstone"), Some(2))
    );
    let o = run(&["sessions", "get", &uri, "old", "--json"]);
    assert_eq!(json(&o)["state"], "expired");
    let o = run(&["sessions", "get", &uri, "hex:ff01", "--json"]);
    assert_eq!(json(&o)["id_hex"], "ff01");
    let o = run(&["sessions", "get", &uri, "nobody"]);
    assert_eq!(o.status.code(), Some(14));
    assert!(
        stdout(&o).contains("no record stored under \"nobody\""),
        "{}",
        stdout(&o)
    );
    let o = run(&["sessions", "get", &uri, "hex:zz"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not a hex digit"), "{}", stderr(&o));
}

#[test]
fn list_pages_with_limit_after_and_raw() {
    let (_dir, uri) = fixture_store();
    let o = run(&["sessions", "list", &uri, "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json(&o);
    let ids: Vec<&str> = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id_hex"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["616c706861", "62657461", "ff01"]);
    assert!(v["next"].is_null());
    let o = run(&["sessions", "list", &uri, "--raw", "--limit", "2", "--json"]);
    let v = json(&o);
    assert_eq!(v["sessions"].as_array().unwrap().len(), 2);
    assert_eq!(v["next"], "beta");
    let o = run(&["sessions", "list", &uri, "--raw", "--limit", "2", "--after", "beta"]);
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("gone\tv2\ttombstone"), "{out}");
    assert!(lines[1].starts_with("old\tv1\texpired"), "{out}");
    assert_eq!(lines[2], "# more: --after old");
    // ff01 comes last and is printed in hex form; the printed form is accepted back.
    let o = run(&["sessions", "list", &uri, "--raw", "--after", "old"]);
    assert!(stdout(&o).starts_with("hex:ff01\tv1\tlive"), "{}", stdout(&o));
    let o = run(&["sessions", "list", &uri, "--raw", "--after", "hex:ff01"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(stdout(&o).trim(), "");
}

#[test]
fn bad_store_uris_and_missing_files_are_clear_errors() {
    let o = run(&["sessions", "stats", "etcd:host:99999"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("column 11: port 99999 is outside 1..=65535"),
        "{}",
        stderr(&o)
    );
    let o = run(&["sessions", "stats", "/tmp/x.redb"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no scheme"), "{}", stderr(&o));
    let o = run(&["sessions", "stats", "disk:/nonexistent/dir/s.redb"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no such file /nonexistent/dir/s.redb"),
        "{}",
        stderr(&o)
    );
    assert!(!Path::new("/nonexistent/dir/s.redb").exists());
    // An etcd store nobody serves: unavailable, naming the endpoint (after the connect timeout).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uri = format!("etcd:127.0.0.1:{port}");
    let o = run(&["sessions", "stats", &uri]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("store unavailable") && err.contains(&format!("http://127.0.0.1:{port}")),
        "{err}"
    );
}

fn big_store(path: &Path, n: u64) {
    let store = DiskStore::create(path, StoreOptions::default()).unwrap();
    let now = 1_700_000_000_000; // fixed: two stores built apart hold equal records
    let records: Vec<Session> = (0..n)
        .map(|i| {
            let mut s = Session::new(id(format!("s{i:05}")), now, Timeout::Infinity, vec![i as u8]);
            s.version = 1 + i % 3;
            s.tombstone = i % 10 == 0;
            s
        })
        .collect();
    store.apply_batch_if_newer(records).unwrap();
}

#[test]
fn migrate_copies_verifies_and_resumes_with_progress_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst, cp) = (
        dir.path().join("a.redb"),
        dir.path().join("b.redb"),
        dir.path().join("cp.json"),
    );
    big_store(&src, 3000);
    let from = format!("disk:{}", src.display());
    let to = format!("disk:{}", dst.display());
    let cp_s = cp.to_str().unwrap();
    let o = run(&[
        "sessions",
        "migrate",
        "--from",
        &from,
        "--to",
        &to,
        "--checkpoint",
        cp_s,
        "--chunk",
        "500",
        "--verify",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["backfill"]["scanned"], 3000);
    assert_eq!(v["backfill"]["applied"], 3000);
    assert_eq!(v["verify"]["difference_count"], 0);
    // Not a terminal: plain progress lines, the last one complete.
    let err = stderr(&o);
    assert!(!err.contains('\r'), "{err:?}");
    assert!(
        err.lines().last().unwrap().starts_with("backfill: 3000/3000 (100.0%)"),
        "{err}"
    );
    // A finished checkpoint refuses a second run without --resume; with it, nothing to do.
    let o = run(&[
        "sessions",
        "migrate",
        "--from",
        &from,
        "--to",
        &to,
        "--checkpoint",
        cp_s,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("finished; remove it"), "{}", stderr(&o));
    let o = run(&[
        "sessions",
        "migrate",
        "--from",
        &from,
        "--to",
        &to,
        "--checkpoint",
        cp_s,
        "--resume",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(json(&o)["backfill"]["resumed"], true);
    // A checkpoint path naming some other file (a mistyped path) is refused, the file untouched.
    let other = dir.path().join("notes.txt");
    std::fs::write(&other, b"precious").unwrap();
    let o = run(&[
        "sessions",
        "migrate",
        "--from",
        &from,
        "--to",
        &to,
        "--checkpoint",
        other.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not a slot file"), "{}", stderr(&o));
    assert!(std::fs::read(&other).unwrap() == b"precious");
    // --resume needs --checkpoint; a missing source is an error, not an empty copy.
    let o = run(&["sessions", "migrate", "--from", &from, "--to", &to, "--resume"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["sessions", "migrate", "--from", "disk:/nonexistent/a.redb", "--to", &to]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no such file"), "{}", stderr(&o));
}

#[test]
fn verify_reports_differences_and_repairs_them() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("a.redb"), dir.path().join("b.redb"));
    big_store(&src, 200);
    big_store(&dst, 150);
    {
        let b = DiskStore::create(&dst, StoreOptions::default()).unwrap();
        let now = b.options().clock.now_unix_ms();
        b.create(Session::new(id("zz-only-b"), now, Timeout::Infinity, vec![]))
            .unwrap();
    }
    let from = format!("disk:{}", src.display());
    let to = format!("disk:{}", dst.display());
    let o = run(&["sessions", "verify", "--from", &from, "--to", &to, "--leaf", "16"]);
    assert_eq!(o.status.code(), Some(16), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("200 source records, 151 target records"), "{out}");
    assert!(out.contains("51 differing key(s)"), "{out}");
    assert!(out.contains("s00150: \"missing_on_target\""), "{out}");
    assert!(out.trim_end().ends_with("DIFFERENT"), "{out}");
    let o = run(&["sessions", "verify", "--from", &from, "--to", &to, "--repair", "--json"]);
    assert_eq!(o.status.code(), Some(16), "target-only key left: {}", stdout(&o));
    let v = json(&o);
    assert_eq!(v["repair"]["copied"], 50);
    assert_eq!(v["after_repair"]["difference_count"], 1);
    let o = run(&[
        "sessions",
        "verify",
        "--from",
        &from,
        "--to",
        &to,
        "--repair",
        "--delete-target-only",
    ]);
    // The tombstone left on the target still differs from "no record" on the source.
    assert_eq!(o.status.code(), Some(16), "{}", stdout(&o));
    assert!(stdout(&o).contains("1 deleted"), "{}", stdout(&o));
    let twin = dir.path().join("c.redb");
    big_store(&twin, 200);
    let o = run(&[
        "sessions",
        "verify",
        "--from",
        &from,
        "--to",
        &format!("disk:{}", twin.display()),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).trim_end().ends_with("clean"));
}

#[test]
fn phase_show_set_advance_rollback_with_gates() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("a.redb"), dir.path().join("b.redb"));
    big_store(&src, 100);
    let state = dir.path().join("phase.json");
    let state_s = state.to_str().unwrap();
    let outbox = dir.path().join("outbox.redb");
    let outbox_s = outbox.to_str().unwrap();
    let from = format!("disk:{}", src.display());
    let to = format!("disk:{}", dst.display());
    let o = run(&["sessions", "phase", "show", "--state", state_s, "--json"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        (json(&o)["phase"].as_str(), json(&o)["saved"].as_bool()),
        (Some("off"), Some(false))
    );
    let mv = |dir: &str| {
        run(&[
            "sessions", "phase", dir, "--state", state_s, "--from", &from, "--to", &to, "--outbox", outbox_s, "--json",
        ])
    };
    let o = mv("advance");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(json(&o)["phase"], "phase1");
    // The secondary is empty: the verify gate refuses phase2, with the reason.
    let o = mv("advance");
    assert_eq!(o.status.code(), Some(15), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot move from phase1 to phase2: verification found 100 differing key(s)"),
        "{}",
        stderr(&o)
    );
    let o = run(&["sessions", "migrate", "--from", &from, "--to", &to, "--quiet"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = mv("advance");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(json(&o)["phase"], "phase2");
    let o = mv("rollback");
    assert_eq!((o.status.code(), json(&o)["phase"].as_str()), (Some(0), Some("phase1")));
    let o = run(&["sessions", "phase", "force", "cleanup", "--state", state_s]);
    assert_eq!(o.status.code(), Some(0));
    let o = mv("rollback");
    assert_eq!(o.status.code(), Some(15));
    assert!(stderr(&o).contains("cleanup"), "{}", stderr(&o));
    let o = run(&["sessions", "phase", "show", "--state", state_s]);
    let out = stdout(&o);
    assert!(out.starts_with("phase: cleanup\nreverse outbox: off\n"), "{out}");
    assert!(out.contains("phase1 -> cleanup (force)"), "{out}");
    let o = run(&["sessions", "phase", "force", "phase9", "--state", state_s]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("unknown phase \"phase9\""), "{}", stderr(&o));
}
