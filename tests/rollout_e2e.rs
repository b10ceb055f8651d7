//! `erlmcp-rollout rollout run` end to end with real parts (DESIGN §6.6): a real
//! 3-member etcd cluster holds the flag config; a real Erlang node (erl, the app
//! from erlang/_build and the NIF) serves synthetic requests, picks each one's
//! cohort with `erlmcp_feature_flags:is_enabled/2` following the etcd key, and
//! exports cohort-labelled request, error and latency-histogram metrics
//! (erlang/test/erlmcp_rollout_synth.erl); a real Prometheus scrapes it every
//! second; the controller is the real CLI binary. Plans have windows of seconds.
//!
//! The cases run in one test, in order, sharing the cluster, the node and
//! Prometheus (each case on its own flag): healthy -> 100 % (exit 0, and a
//! second controller for the same flag is refused, naming the holder); 2 %
//! canary errors -> rolled back in the first window (exit 11) and the node's
//! canary share drops to 0; latency 2x -> pause, `approve` continues to 100 %;
//! latency 2x -> pause, `abort` rolls back (exit 12); the controller killed with
//! -9 mid-window and restarted -> each publish exactly once in the audit log;
//! a human edit of another flag is built upon, one of this flag pauses the run
//! and `approve` publishes on top of it;
//! the etcd leader killed mid-run (state in etcd) -> completes; Prometheus
//! stopped mid-run -> judgements are errors, then a rollback as the plan says,
//! never a promote; without Prometheus and `"on_inconclusive": "pause"` ->
//! paused past the window, never promoted, `abort` rolls back. Fault
//! injection (an extra layer): the controller exits right before and right
//! after a publish; restarted, each publish still happens once.

#[path = "session_support/etcd_cluster.rs"]
mod etcd_cluster;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use erlmcp_rollout::flags::push_flags;
use serde_json::Value;

const KEY: &str = "erlmcp/feature_flags";
const FLAGS: [&str; 11] = [
    "f_healthy",
    "f_conflict",
    "f_fault_before",
    "f_fault_after",
    "f_prometheus_pause",
    "f_errors",
    "f_latency_approve",
    "f_latency_abort",
    "f_kill",
    "f_leader",
    "f_prometheus",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// The app's ebin; builds erlang/ (and the NIF through rebar3's pre-hook) when
/// it is missing.
fn ebin() -> PathBuf {
    let ebin = root().join("erlang/_build/default/lib/erlmcp_rollout/ebin");
    let nif = root().join("erlang/priv/liberlmcp_rollout_nif.so");
    if !ebin.join("erlmcp_feature_flags.beam").is_file() || !nif.is_file() {
        let st = Command::new("rebar3")
            .arg("compile")
            .current_dir(root().join("erlang"))
            .status()
            .expect("rebar3 (scripts/setup installs it)");
        assert!(st.success(), "rebar3 compile failed");
    }
    ebin
}

/// A child process killed (SIGKILL) on drop, and by a watchdog shell if this
/// test process dies first.
struct Proc {
    child: Option<Child>,
    watchdog: Child,
    stdin: Option<ChildStdin>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd.stdin(Stdio::piped()).spawn().expect("spawn");
        let stdin = child.stdin.take();
        let script = format!(
            "while kill -0 {} 2>/dev/null && kill -0 {} 2>/dev/null; do sleep 0.5; done; kill -9 {} 2>/dev/null",
            std::process::id(),
            child.id(),
            child.id()
        );
        let watchdog = Command::new("bash")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bash");
        Proc {
            child: Some(child),
            watchdog,
            stdin,
        }
    }

    fn kill(&mut self) {
        self.stdin.take();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.contains(" 200 ").then(|| body.to_owned())
}

fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Node {
    _proc: Proc,
    port: u16,
}

impl Node {
    fn start(endpoints: &[String], synth_dir: &Path) -> Node {
        let eps: Vec<String> = endpoints
            .iter()
            .map(|e| format!("<<\"{}\">>", e.trim_start_matches("http://")))
            .collect();
        let flags: Vec<String> = FLAGS.iter().map(|f| format!("<<\"{f}\">>")).collect();
        let eval = format!(
            "erlmcp_rollout_synth:start(#{{etcd => [{}], key => <<\"{KEY}\">>, flags => [{}], rps => 2000}})",
            eps.join(","),
            flags.join(",")
        );
        let mut cmd = Command::new("erl");
        cmd.arg("-noshell")
            .arg("-pa")
            .arg(ebin())
            .arg("-pa")
            .arg(synth_dir)
            .args(["-eval", &eval])
            .stdout(Stdio::piped());
        let mut p = Proc::spawn(cmd);
        let stdout = p.child.as_mut().and_then(|c| c.stdout.take()).expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("node output");
        let port = line
            .trim()
            .strip_prefix("READY ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the Erlang node did not start: {line:?}"));
        Node { _proc: p, port }
    }

    fn set(&self, flag: &str, cohort: &str, params: &str) {
        let r = http_get(self.port, &format!("/set?flag={flag}&cohort={cohort}&{params}"));
        assert_eq!(r.as_deref(), Some("ok\n"));
    }

    /// Requests served so far for `flag`: (canary, stable).
    fn counts(&self, flag: &str) -> (u64, u64) {
        let body = http_get(self.port, "/stats").expect("node stats");
        let mut out = (0, 0);
        for line in body.lines() {
            let parts: Vec<&str> = line.split(' ').collect();
            if let [f, cohort, n] = parts[..] {
                if f == flag {
                    let n = n.parse().unwrap_or(0);
                    if cohort == "canary" {
                        out.0 = n;
                    } else {
                        out.1 = n;
                    }
                }
            }
        }
        out
    }

    /// Canary and stable requests served for `flag` during `d`.
    fn share_during(&self, flag: &str, d: Duration) -> (u64, u64) {
        let a = self.counts(flag);
        std::thread::sleep(d);
        let b = self.counts(flag);
        (b.0 - a.0, b.1 - a.1)
    }
}

struct Prometheus {
    proc: Proc,
    url: String,
}

impl Prometheus {
    fn start(dir: &Path, target_port: u16) -> Prometheus {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
            l.local_addr().expect("addr").port()
        };
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: erlmcp\n    \
                 static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
            ),
        )
        .expect("config");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let proc = Proc::spawn(cmd);
        wait_until("Prometheus ready", Duration::from_secs(30), || {
            http_get(port, "/-/ready").is_some()
        });
        Prometheus {
            proc,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    fn has_data(&self, flag: &str) -> bool {
        let port: u16 = self.url.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let q = format!("/api/v1/query?query=count(erlmcp_flag_requests_total%7Bflag%3D%22{flag}%22%7D)");
        http_get(port, &q).is_some_and(|b| b.contains("\"value\""))
    }
}

fn write_plan(dir: &Path, name: &str, observe: &str, extra: &str) -> PathBuf {
    let path = dir.join(format!("{name}.plan.json"));
    let text = format!(
        r#"{{
  "stages": [{{"percent": 10, "observe": "{observe}"}}, {{"percent": 50, "observe": "{observe}"}},
             {{"percent": 100, "observe": "{observe}"}}],
  "interval": "1s",
  "inconclusive_limit": 10,
  "consecutive_error_limit": 2,
  "max_sample_age": "5s",
  "thresholds": {{"min_requests": 150}},
  "queries": {{"restarts": "sum(changes(process_start_time_seconds{{job=\"erlmcp\"}}[{{range}}]))"}}{extra}
}}"#
    );
    std::fs::write(&path, text).expect("plan");
    path
}

struct Env {
    dir: PathBuf,
    flags_spec: String,
    prometheus: String,
}

impl Env {
    fn args(&self, flag: &str, plan: &Path, state: Option<&str>) -> Vec<String> {
        let state = state.map_or_else(
            || self.dir.join(format!("{flag}.state.json")).display().to_string(),
            str::to_owned,
        );
        vec![
            "rollout".into(),
            "run".into(),
            "--flag".into(),
            flag.into(),
            "--flags".into(),
            self.flags_spec.clone(),
            "--prometheus".into(),
            self.prometheus.clone(),
            "--plan".into(),
            plan.display().to_string(),
            "--state".into(),
            state,
            "--audit".into(),
            self.audit(flag).display().to_string(),
            "--actor".into(),
            "e2e".into(),
            "--json".into(),
        ]
    }

    fn audit(&self, flag: &str) -> PathBuf {
        self.dir.join(format!("{flag}.audit.jsonl"))
    }

    fn spawn(&self, args: &[String]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_erlmcp-rollout"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("erlmcp-rollout")
    }

    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_erlmcp-rollout"))
            .args(args)
            .output()
            .expect("erlmcp-rollout");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn lines(&self, flag: &str) -> Vec<Value> {
        std::fs::read_to_string(self.audit(flag))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn events<'a>(lines: &'a [Value], event: &str) -> Vec<&'a Value> {
        lines.iter().filter(|l| l["event"] == event).collect()
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> (i32, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            return (status.code().unwrap_or(-1), err);
        }
        if start.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the controller did not finish within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn etcd_percent(endpoints: &[String], flag: &str) -> u64 {
    let (bytes, _) = erlmcp_rollout::flags::read_flags(endpoints, KEY, Duration::from_secs(5), &Default::default())
        .expect("read flags")
        .expect("key");
    let v: Value = serde_json::from_slice(&bytes).expect("json");
    v[flag]["rollout_percentage"].as_u64().expect("percentage")
}

fn publishes(lines: &[Value]) -> Vec<u64> {
    Env::events(lines, "publish")
        .iter()
        .map(|l| l["to"].as_u64().unwrap_or(999))
        .collect()
}

#[test]
fn rollout_end_to_end() {
    for tool in ["erl", "erlc", "prometheus", "etcd", "etcdctl"] {
        assert!(which(tool), "`{tool}` is not on PATH: run scripts/setup");
    }
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tmp");
    let synth = tmp.path().join("synth");
    std::fs::create_dir_all(&synth).expect("dir");
    let st = Command::new("erlc")
        .arg("-o")
        .arg(&synth)
        .arg(root().join("erlang/test/erlmcp_rollout_synth.erl"))
        .status()
        .expect("erlc");
    assert!(st.success());

    let mut cluster = etcd_cluster::Cluster::start();
    let endpoints = cluster.endpoints();
    let config: serde_json::Map<String, Value> = FLAGS
        .iter()
        .map(|f| {
            (
                f.to_string(),
                serde_json::json!({"enabled": true, "rollout_percentage": 0}),
            )
        })
        .collect();
    push_flags(
        &endpoints,
        KEY,
        Value::Object(config).to_string().as_bytes(),
        Duration::from_secs(5),
    )
    .expect("push flags");
    let node = Node::start(&endpoints, &synth);
    let prom = Prometheus::start(tmp.path(), node.port);
    wait_until("Prometheus has scraped the node", Duration::from_secs(30), || {
        prom.has_data("f_healthy")
    });
    let hosts: Vec<&str> = endpoints.iter().map(|e| e.trim_start_matches("http://")).collect();
    let env = Env {
        dir: tmp.path().to_path_buf(),
        flags_spec: format!("etcd:{}/{KEY}", hosts.join(",")),
        prometheus: prom.url.clone(),
    };
    let plan = write_plan(tmp.path(), "e2e", "3s", "");
    eprintln!("setup: {:?}", started.elapsed());

    // 1. Healthy: 10 -> 50 -> 100 %, exit 0; a second controller is refused.
    let t = Instant::now();
    let mut c = env.spawn(&env.args("f_healthy", &plan, None));
    wait_until("the first publish", Duration::from_secs(20), || {
        !publishes(&env.lines("f_healthy")).is_empty()
    });
    let other_state = tmp.path().join("other.state.json").display().to_string();
    let (code, _, err) = env.cli(
        &env.args("f_healthy", &plan, Some(&other_state))
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("is already being rolled out by pid") && err.contains("e2e"),
        "{err}"
    );
    let (code, err) = wait_exit(&mut c, Duration::from_secs(90));
    let lines = env.lines("f_healthy");
    assert_eq!(code, 0, "{err}\n{lines:#?}");
    assert_eq!(publishes(&lines), [10, 50, 100]);
    assert_eq!(Env::events(&lines, "complete").len(), 1);
    assert!(Env::events(&lines, "judgement").iter().any(|j| j["verdict"] == "pass"));
    assert_eq!(etcd_percent(&endpoints, "f_healthy"), 100);
    let (canary, stable) = node.share_during("f_healthy", Duration::from_millis(700));
    assert!(
        canary > 0 && stable == 0,
        "after 100 %: canary {canary}, stable {stable}"
    );
    let (code, out, _) = env.cli(&[
        "rollout",
        "status",
        "--state",
        &env.dir.join("f_healthy.state.json").display().to_string(),
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("phase:    completed") && out.contains("complete"), "{out}");
    eprintln!("healthy: {:?}", t.elapsed());

    // 2. 2 % canary errors: rolled back within the first window, canary share 0.
    let t = Instant::now();
    node.set("f_errors", "canary", "error_rate=0.02");
    let mut c = env.spawn(&env.args("f_errors", &plan, None));
    let (code, err) = wait_exit(&mut c, Duration::from_secs(60));
    let lines = env.lines("f_errors");
    assert_eq!(code, 11, "{err}\n{lines:#?}");
    assert_eq!(publishes(&lines), [10, 0]);
    let pubs = Env::events(&lines, "publish");
    assert_eq!(pubs[1]["stage"], 1, "rolled back in the first stage");
    let took = pubs[1]["unix"].as_f64().unwrap_or(0.0) - pubs[0]["unix"].as_f64().unwrap_or(0.0);
    assert!(
        // Stage 1 never passes while the canary fails (no promote below); the
        // slack is for a loaded machine's late judgements.
        took <= 5.0,
        "rolled back {took} s after the first publish; the window is 3 s"
    );
    assert!(Env::events(&lines, "promote").is_empty());
    let rollback = Env::events(&lines, "rollback");
    assert!(
        rollback[0]["reason"].as_str().unwrap_or("").contains("error rate"),
        "{rollback:#?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let (canary, stable) = node.share_during("f_errors", Duration::from_millis(700));
    assert!(
        canary == 0 && stable > 0,
        "after the rollback: canary {canary}, stable {stable}"
    );
    assert_eq!(etcd_percent(&endpoints, "f_errors"), 0);
    eprintln!(
        "errors: rolled back {took:.2} s after the first publish ({:?})",
        t.elapsed()
    );

    // 3. Latency 2x: pause for approval; approve goes on to 100 %.
    let t = Instant::now();
    node.set("f_latency_approve", "canary", "latency_ms=4");
    let state = env.dir.join("f_latency_approve.state.json").display().to_string();
    let mut c = env.spawn(&env.args("f_latency_approve", &plan, None));
    let mut approvals = 0;
    let (code, err) = loop {
        if let Some(status) = c.try_wait().expect("wait") {
            let mut err = String::new();
            if let Some(mut e) = c.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            break (status.code().unwrap_or(-1), err);
        }
        let st: Value = serde_json::from_slice(&std::fs::read(&state).unwrap_or_default()).unwrap_or(Value::Null);
        if st["phase"] == "paused" {
            assert_eq!(st["pause"]["kind"], "approval", "{st:#}");
            assert!(
                st["pause"]["rules"].to_string().contains("latency_p95_vs_stable"),
                "{st:#}"
            );
            assert_eq!(st["pause"]["approver"], "SRE on-call");
            let (code, out, err) = env.cli(&[
                "rollout", "approve", "--state", &state, "--actor", "sre", "--note", "known",
            ]);
            assert_eq!(code, 0, "{out}{err}");
            approvals += 1;
            wait_until("the approval taken", Duration::from_secs(10), || {
                let st: Value =
                    serde_json::from_slice(&std::fs::read(&state).unwrap_or_default()).unwrap_or(Value::Null);
                st["phase"] != "paused"
            });
        }
        assert!(t.elapsed() < Duration::from_secs(120), "latency approve case too slow");
        std::thread::sleep(Duration::from_millis(50));
    };
    let lines = env.lines("f_latency_approve");
    assert_eq!(code, 0, "{err}\n{lines:#?}");
    assert!(approvals >= 1);
    assert_eq!(Env::events(&lines, "approve").len(), approvals);
    assert_eq!(publishes(&lines), [10, 50, 100]);
    let pause = Env::events(&lines, "pause");
    assert!(
        pause[0]["reason"].as_str().unwrap_or("").contains("histogram test"),
        "{pause:#?}"
    );
    eprintln!("latency + approve: {approvals} approval(s), {:?}", t.elapsed());

    // 4. Latency 2x: pause; abort rolls back, exit 12.
    let t = Instant::now();
    node.set("f_latency_abort", "canary", "latency_ms=4");
    let state = env.dir.join("f_latency_abort.state.json").display().to_string();
    let mut c = env.spawn(&env.args("f_latency_abort", &plan, None));
    wait_until("the pause", Duration::from_secs(60), || {
        let st: Value = serde_json::from_slice(&std::fs::read(&state).unwrap_or_default()).unwrap_or(Value::Null);
        st["phase"] == "paused"
    });
    let (code, out, err) = env.cli(&["rollout", "abort", "--state", &state, "--actor", "sre"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("its controller rolls back"), "{out}");
    let (code, err) = wait_exit(&mut c, Duration::from_secs(30));
    let lines = env.lines("f_latency_abort");
    assert_eq!(code, 12, "{err}\n{lines:#?}");
    assert_eq!(*publishes(&lines).last().unwrap_or(&999), 0);
    assert_eq!(Env::events(&lines, "abort")[0]["by"], "sre");
    assert_eq!(etcd_percent(&endpoints, "f_latency_abort"), 0);
    eprintln!("latency + abort: {:?}", t.elapsed());

    // 5. kill -9 mid-window, restart: each publish exactly once.
    let t = Instant::now();
    let args = env.args("f_kill", &plan, None);
    let mut c = env.spawn(&args);
    wait_until("a judgement in stage 2", Duration::from_secs(60), || {
        Env::events(&env.lines("f_kill"), "judgement")
            .iter()
            .any(|j| j["stage"] == 2)
    });
    c.kill().expect("kill -9");
    let _ = c.wait();
    let before = env.lines("f_kill").len();
    let mut c = env.spawn(&args);
    let (code, err) = wait_exit(&mut c, Duration::from_secs(90));
    let lines = env.lines("f_kill");
    assert_eq!(code, 0, "{err}\n{lines:#?}");
    assert_eq!(publishes(&lines), [10, 50, 100], "{lines:#?}");
    let seqs: Vec<u64> = Env::events(&lines, "publish")
        .iter()
        .filter_map(|l| l["seq"].as_u64())
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
    let resume = Env::events(&lines[before..], "resume");
    assert_eq!(resume.len(), 1);
    assert_eq!(resume[0]["stage"], 2, "resumed the same stage");
    eprintln!("kill -9 + restart: {:?}", t.elapsed());

    // 5a. Killed right before and right after a publish (fault injection, the
    // process exits as if killed): still each publish exactly once.
    let t = Instant::now();
    for (flag, fault) in [
        ("f_fault_before", "exit_before_publish:2"),
        ("f_fault_after", "exit_after_publish:2"),
    ] {
        let args = env.args(flag, &plan, None);
        let mut c = Command::new(env!("CARGO_BIN_EXE_erlmcp-rollout"))
            .args(&args)
            .env("ERLMCP_ROLLOUT_FAULT", fault)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("erlmcp-rollout");
        let (code, err) = wait_exit(&mut c, Duration::from_secs(60));
        assert_eq!(code, 137, "{fault}: {err}");
        let expect_now = if fault.starts_with("exit_before") { 10 } else { 50 };
        assert_eq!(etcd_percent(&endpoints, flag), expect_now, "{fault}");
        let mut c = env.spawn(&args);
        let (code, err) = wait_exit(&mut c, Duration::from_secs(60));
        let lines = env.lines(flag);
        assert_eq!(code, 0, "{fault}: {err}\n{lines:#?}");
        assert_eq!(publishes(&lines), [10, 50, 100], "{fault}: {lines:#?}");
        let resume = Env::events(&lines, "resume");
        assert_eq!(resume[0]["pending_publish"]["seq"], 2, "{fault}: {resume:#?}");
    }
    eprintln!("exit right before / after a publish + restart: {:?}", t.elapsed());

    // 5b. Concurrent human edits: one to another flag is built upon (no pause);
    // one to this flag pauses the run; approve publishes on top of it.
    let t = Instant::now();
    let human_edit = |f: &dyn Fn(&mut Value)| {
        let (bytes, _) =
            erlmcp_rollout::flags::read_flags(&endpoints, KEY, Duration::from_secs(5), &Default::default())
                .expect("read")
                .expect("key");
        let mut v: Value = serde_json::from_slice(&bytes).expect("json");
        f(&mut v);
        push_flags(&endpoints, KEY, v.to_string().as_bytes(), Duration::from_secs(5)).expect("human push");
    };
    let state = env.dir.join("f_conflict.state.json").display().to_string();
    let mut c = env.spawn(&env.args("f_conflict", &plan, None));
    wait_until("the first publish", Duration::from_secs(30), || {
        publishes(&env.lines("f_conflict")) == [10]
    });
    human_edit(&|v| v["f_healthy"]["metadata"] = serde_json::json!({"note": "edited by a human"}));
    wait_until("the second publish", Duration::from_secs(30), || {
        publishes(&env.lines("f_conflict")) == [10, 50]
    });
    human_edit(&|v| {
        v["f_conflict"]["rollout_percentage"] = 20.into();
        v["f_conflict"]["metadata"] = serde_json::json!({"owner": "bob"});
    });
    wait_until("the conflict pause", Duration::from_secs(30), || {
        let st: Value = serde_json::from_slice(&std::fs::read(&state).unwrap_or_default()).unwrap_or(Value::Null);
        st["phase"] == "paused" && st["pause"]["kind"] == "conflict"
    });
    assert_eq!(
        etcd_percent(&endpoints, "f_conflict"),
        20,
        "the human's edit is not overwritten while paused"
    );
    let (code, out, err) = env.cli(&["rollout", "approve", "--state", &state, "--actor", "bob"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, err) = wait_exit(&mut c, Duration::from_secs(60));
    let lines = env.lines("f_conflict");
    assert_eq!(code, 0, "{err}\n{lines:#?}");
    assert_eq!(publishes(&lines), [10, 50, 100]);
    assert_eq!(
        Env::events(&lines, "pause").len(),
        1,
        "only the edit of this flag pauses"
    );
    let (bytes, _) = erlmcp_rollout::flags::read_flags(&endpoints, KEY, Duration::from_secs(5), &Default::default())
        .expect("read")
        .expect("key");
    let v: Value = serde_json::from_slice(&bytes).expect("json");
    assert_eq!(v["f_conflict"]["metadata"]["owner"], "bob", "{v:#}");
    assert_eq!(v["f_healthy"]["metadata"]["note"], "edited by a human", "{v:#}");
    assert_eq!(v["f_conflict"]["rollout_percentage"], 100);
    eprintln!("concurrent edits: {:?}", t.elapsed());

    // 6. The etcd leader killed mid-run (the state in etcd too): completes.
    let t = Instant::now();
    let state_spec = format!("etcd:{}/rollouts", hosts.join(","));
    let mut c = env.spawn(&env.args("f_leader", &plan, Some(&state_spec)));
    wait_until("a judgement in stage 1", Duration::from_secs(60), || {
        Env::events(&env.lines("f_leader"), "judgement")
            .iter()
            .any(|j| j["stage"] == 1)
    });
    let leader = cluster.leader().expect("a leader");
    cluster.kill(leader);
    let (code, err) = wait_exit(&mut c, Duration::from_secs(120));
    let lines = env.lines("f_leader");
    assert_eq!(code, 0, "{err}\n{lines:#?}");
    assert_eq!(publishes(&lines), [10, 50, 100]);
    let (code, out, err) = env.cli(&[
        "rollout",
        "status",
        "--state",
        &state_spec,
        "--flag",
        "f_leader",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let status: Value = serde_json::from_str(&out).expect("status json");
    assert_eq!(status["state"]["phase"], "completed");
    cluster.restart(leader);
    cluster.wait_healthy(Duration::from_secs(30));
    eprintln!("etcd leader n{} killed mid-run: {:?}", leader + 1, t.elapsed());

    // 7. Prometheus stopped mid-run: errors, then the plan's rollback; never a promote.
    let t = Instant::now();
    let plan = write_plan(tmp.path(), "prometheus", "8s", r#", "on_inconclusive": "rollback""#);
    let mut c = env.spawn(&env.args("f_prometheus", &plan, None));
    wait_until("a judgement in stage 1", Duration::from_secs(60), || {
        Env::events(&env.lines("f_prometheus"), "judgement")
            .iter()
            .any(|j| j["stage"] == 1)
    });
    let mut prom = prom;
    prom.proc.kill();
    let stopped = env.lines("f_prometheus").len();
    let (code, err) = wait_exit(&mut c, Duration::from_secs(60));
    let lines = env.lines("f_prometheus");
    assert_eq!(code, 11, "{err}\n{lines:#?}");
    let after = &lines[stopped..];
    assert!(Env::events(after, "promote").is_empty(), "{after:#?}");
    let judged: Vec<&str> = Env::events(after, "judgement")
        .iter()
        .map(|j| j["verdict"].as_str().unwrap_or(""))
        .collect();
    // (A judgement in flight at the stop may still have had its answer.)
    assert!(
        judged.len() >= 3 && judged[judged.len() - 3..].iter().all(|v| *v == "error"),
        "{judged:?}"
    );
    assert!(Env::events(after, "rollback")[0]["reason"]
        .as_str()
        .unwrap_or("")
        .contains("without an answer from Prometheus"));
    assert_eq!(publishes(&lines), [10, 0]);
    eprintln!("Prometheus stopped: {:?}", t.elapsed());

    // 8. No Prometheus and "on_inconclusive": "pause": paused past the limit,
    // never promoted; abort rolls back.
    let t = Instant::now();
    let plan = write_plan(tmp.path(), "pause", "3s", "");
    let state = env.dir.join("f_prometheus_pause.state.json").display().to_string();
    let mut c = env.spawn(&env.args("f_prometheus_pause", &plan, None));
    wait_until("the limit pause", Duration::from_secs(30), || {
        let st: Value = serde_json::from_slice(&std::fs::read(&state).unwrap_or_default()).unwrap_or(Value::Null);
        st["phase"] == "paused" && st["pause"]["kind"] == "limit"
    });
    std::thread::sleep(Duration::from_secs(4)); // past the window: still paused, never promoted
    let lines = env.lines("f_prometheus_pause");
    assert!(Env::events(&lines, "promote").is_empty(), "{lines:#?}");
    assert_eq!(publishes(&lines), [10]);
    let (code, out, err) = env.cli(&["rollout", "abort", "--state", &state]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, err) = wait_exit(&mut c, Duration::from_secs(30));
    assert_eq!(code, 12, "{err}");
    assert_eq!(publishes(&env.lines("f_prometheus_pause")), [10, 0]);
    eprintln!("no Prometheus, pause: {:?}; total {:?}", t.elapsed(), started.elapsed());
}
