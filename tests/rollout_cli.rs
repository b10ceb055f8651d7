//! `erlmcp-rollout rollout ...` from the command line, on a flags file and
//! without a Prometheus (nothing listens on its port: every judgement is an
//! error, which is never a promote). Fast; the full loop with real parts is
//! tests/rollout_e2e.rs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const FLAGS: &str = "{\n  \"f\": {\"enabled\": true, \"rollout_percentage\": 0},\n  \"off\": {\"enabled\": false}\n}\n";

fn dead_prometheus() -> String {
    // Bound and released: nothing listens there.
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    format!("http://{}", l.local_addr().expect("addr"))
}

struct Dir {
    tmp: tempfile::TempDir,
    prometheus: String,
}

impl Dir {
    fn new(plan: &str) -> Dir {
        let tmp = tempfile::tempdir().expect("tmp");
        std::fs::write(tmp.path().join("flags.json"), FLAGS).expect("flags");
        std::fs::write(tmp.path().join("plan.json"), plan).expect("plan");
        Dir {
            tmp,
            prometheus: dead_prometheus(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn s(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    fn run_args(&self, flag: &str, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = ["rollout", "run", "--flag", flag, "--flags"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.push(self.s("flags.json"));
        a.extend([
            "--prometheus".into(),
            self.prometheus.clone(),
            "--plan".into(),
            self.s("plan.json"),
        ]);
        a.extend([
            "--state".into(),
            self.s("state.json"),
            "--audit".into(),
            self.s("audit.jsonl"),
        ]);
        a.extend(["--actor".into(), "tester".into()]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.path("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn state(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.path("state.json")).unwrap_or_default()).unwrap_or(Value::Null)
    }
}

fn cli(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_erlmcp-rollout"))
        .args(args)
        .output()
        .expect("erlmcp-rollout")
}

fn spawn(args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_erlmcp-rollout"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("erlmcp-rollout")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(c: &mut Child) -> i32 {
    let start = Instant::now();
    loop {
        if let Some(st) = c.try_wait().expect("wait") {
            return st.code().unwrap_or(-1);
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the controller did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn percent(dir: &Path) -> u64 {
    let v: Value = serde_json::from_slice(&std::fs::read(dir.join("flags.json")).expect("flags")).expect("json");
    v["f"]["rollout_percentage"].as_u64().expect("percentage")
}

const PAUSE_PLAN: &str = r#"{"stages": [{"percent": 10, "observe": "2s"}, {"percent": 100, "observe": "2s"}],
  "interval": "200ms", "consecutive_error_limit": 1}"#;

#[test]
fn bad_plans_and_flags_are_refused_with_positions() {
    let d = Dir::new("{\n  \"stages\": [{\"percent\": 50, \"observe\": \"1m\"}, {\"percent\": 40, \"observe\": \"soon\"}],\n  \"interval\": 5\n}");
    let o = cli(&d.run_args("f", &[]));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("3 problem(s) in the rollout plan"), "{t}");
    assert!(
        t.contains("$.stages[1].percent (line 2, column 60): 40 must be above the previous stage's 50"),
        "{t}"
    );
    assert!(t.contains("$.stages[1].observe (line 2, column 75)"), "{t}");
    assert!(t.contains("$.interval (line 3, column 15)"), "{t}");
    let d = Dir::new(PAUSE_PLAN);
    let o = cli(&d.run_args("off", &[]));
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("flag \"off\" is disabled"), "{}", text(&o));
    let o = cli(&d.run_args("nope", &[]));
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("no flag \"nope\""), "{}", text(&o));
    assert_eq!(
        std::fs::read_to_string(d.path("flags.json")).expect("flags"),
        FLAGS,
        "nothing published"
    );
}

#[test]
fn dry_run_judges_and_logs_without_publishing() {
    let d = Dir::new(
        r#"{"stages": [{"percent": 10, "observe": "1s"}, {"percent": 100, "observe": "1s"}],
        "interval": "200ms", "consecutive_error_limit": 1, "on_inconclusive": "rollback"}"#,
    );
    let o = cli(&d.run_args("f", &["--dry-run", "--json"]));
    assert_eq!(o.status.code(), Some(11), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(d.path("flags.json")).expect("flags"), FLAGS);
    let lines = d.audit();
    let pubs: Vec<&Value> = lines.iter().filter(|l| l["event"] == "publish").collect();
    assert_eq!(pubs.len(), 2);
    assert!(pubs.iter().all(|p| p["dry_run"] == true));
    // --json: one event per line on stdout, the same lines as the audit log.
    let events: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert!(events.iter().filter(|e| e["event"] != "progress").count() == lines.len());
    assert!(lines
        .iter()
        .all(|l| l["actor"] == "tester" && l["flag"] == "f" && l["time"].is_string()));
}

#[test]
fn a_second_controller_is_refused_and_abort_rolls_back() {
    let d = Dir::new(PAUSE_PLAN);
    let args = d.run_args("f", &[]);
    let mut c = spawn(&args);
    wait_until("the limit pause", || d.state()["phase"] == "paused");
    assert_eq!(d.state()["pause"]["kind"], "limit");
    assert_eq!(percent(d.tmp.path()), 10);
    // Another controller, even with another state file: the flag is locked.
    let mut other = args.clone();
    let at = other.iter().position(|a| a == "--state").expect("--state") + 1;
    other[at] = d.s("other.json");
    let o = cli(&other);
    assert_eq!(o.status.code(), Some(1));
    let t = text(&o);
    assert!(
        t.contains("flag \"f\" is already being rolled out by pid") && t.contains("\"tester\""),
        "{t}"
    );
    let status = cli(&["rollout".into(), "status".into(), "--state".into(), d.s("state.json")]);
    let st = text(&status);
    assert!(
        st.contains("phase:    paused") && st.contains("paused:   limit"),
        "{st}"
    );
    assert!(
        st.contains("control:  a controller runs: pid") && st.contains("\"tester\""),
        "{st}"
    );
    // approve: goes on (and pauses again: Prometheus is still not there).
    let o = cli(&[
        "rollout".into(),
        "approve".into(),
        "--state".into(),
        d.s("state.json"),
        "--note".into(),
        "go".into(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    wait_until("the approval", || d.audit().iter().any(|l| l["event"] == "approve"));
    wait_until("paused again", || {
        d.audit().iter().filter(|l| l["event"] == "pause").count() == 2 && d.state()["phase"] == "paused"
    });
    let o = cli(&["rollout".into(), "abort".into(), "--state".into(), d.s("state.json")]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(wait_exit(&mut c), 12);
    assert_eq!(
        std::fs::read_to_string(d.path("flags.json")).expect("flags"),
        FLAGS,
        "back to 0 %, byte for byte"
    );
    assert!(d.audit().iter().all(|l| l["event"] != "promote"));
    let o = cli(&["rollout".into(), "abort".into(), "--state".into(), d.s("state.json")]);
    assert_eq!(o.status.code(), Some(1), "the run is over");
}

#[test]
fn abort_without_a_controller_rolls_back_itself() {
    let d = Dir::new(PAUSE_PLAN);
    let mut c = spawn(&d.run_args("f", &[]));
    wait_until("the limit pause", || d.state()["phase"] == "paused");
    c.kill().expect("kill -9");
    let _ = c.wait();
    let status = cli(&["rollout".into(), "status".into(), "--state".into(), d.s("state.json")]);
    assert!(
        text(&status).contains("control:  no controller runs"),
        "{}",
        text(&status)
    );
    let o = cli(&[
        "rollout".into(),
        "abort".into(),
        "--state".into(),
        d.s("state.json"),
        "--actor".into(),
        "ops".into(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("no controller was running; rolled back here"),
        "{}",
        text(&o)
    );
    assert_eq!(percent(d.tmp.path()), 0);
    assert_eq!(d.state()["phase"], "aborted");
    let lines = d.audit();
    let by: Vec<&Value> = lines
        .iter()
        .filter(|l| l["event"] == "abort")
        .map(|l| &l["by"])
        .collect();
    assert_eq!(by, ["ops"]);
}
