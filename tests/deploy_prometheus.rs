//! `canary decide --prometheus` against a real Prometheus (Debian
//! `prometheus` 2.42, which ships `promtool`).
//!
//! One dataset holds every scenario in its own hour ("slot"), written as
//! OpenMetrics and loaded with `promtool tsdb create-blocks-from openmetrics`.
//! One server on a free loopback port serves the whole file's tests; each test
//! queries its slot with `--at`. The server's lifetime is tied to a pipe from
//! this test process: when the process exits (passing, failing or killed), the
//! pipe closes and the wrapper shell kills Prometheus.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use erlmcp_rollout::deploy::prometheus::{Client, PrometheusError, QueryResult};

/// 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600;
/// Samples every 15 s for 10 min per slot; queries run at the slot's end.
const STEP: i64 = 15;
const SPAN: i64 = 600;

#[derive(Clone, Copy)]
struct SideSpec {
    present: bool,
    rps: f64,
    /// Fraction of failed requests; NaN writes a NaN counter.
    error_rate: f64,
    cpu: f64,
    memory: f64,
    /// Restarts counted in the last 5 minutes.
    restarts: u32,
    up: f64,
    /// No samples after this offset into the slot.
    until: i64,
}

const HEALTHY: SideSpec = SideSpec {
    present: true,
    rps: 20.0,
    error_rate: 0.0002,
    cpu: 0.35,
    memory: 0.5,
    restarts: 0,
    up: 1.0,
    until: SPAN,
};

const STABLE: SideSpec = SideSpec { rps: 380.0, ..HEALTHY };

struct Scenario {
    name: &'static str,
    canary: SideSpec,
    stable: SideSpec,
}

fn scenarios() -> Vec<Scenario> {
    let s = |name, canary| Scenario {
        name,
        canary,
        stable: STABLE,
    };
    vec![
        s("healthy", HEALTHY),
        s(
            "failing",
            SideSpec {
                error_rate: 0.004,
                ..HEALTHY
            },
        ),
        s(
            "no_data",
            SideSpec {
                present: false,
                ..HEALTHY
            },
        ),
        s(
            "stale",
            SideSpec {
                until: SPAN - 180,
                ..HEALTHY
            },
        ),
        s("target_down", SideSpec { up: 0.0, ..HEALTHY }),
        s(
            "nan",
            SideSpec {
                error_rate: f64::NAN,
                ..HEALTHY
            },
        ),
        s("crashloop", SideSpec { restarts: 2, ..HEALTHY }),
        s("low_traffic", SideSpec { rps: 1.0, ..HEALTHY }),
    ]
}

/// Evaluation time of a scenario: the end of its slot.
fn at(name: &str) -> i64 {
    let slot = scenarios().iter().position(|s| s.name == name).unwrap_or(usize::MAX);
    assert!(slot != usize::MAX, "no scenario {name}");
    T0 + slot as i64 * 3600 + SPAN
}

/// Cumulative bucket fractions for le = 5 ms, 10 ms, 25 ms, 50 ms, +Inf:
/// p95 = 8.6 ms, p99 = 10 ms.
const BUCKETS: [(&str, f64); 5] = [
    ("0.005", 0.85),
    ("0.01", 0.99),
    ("0.025", 1.0),
    ("0.05", 1.0),
    ("+Inf", 1.0),
];

/// Every sample of one series family for one side of one slot.
fn side_samples(out: &mut String, family: &str, slot_start: i64, dep: &str, spec: &SideSpec) {
    if !spec.present {
        return;
    }
    let pod = format!("erlmcp-{dep}-0");
    let labels = format!("deployment=\"{dep}\",pod=\"{pod}\"");
    let mut t = 0;
    while t <= spec.until {
        let ts = slot_start + t;
        let steps = (t / STEP) as f64;
        let n = spec.rps * STEP as f64 * steps;
        match family {
            "erlmcp_requests" => writeln!(out, "erlmcp_requests_total{{{labels}}} {n} {ts}"),
            "erlmcp_requests_failed" => {
                let failed = n * spec.error_rate;
                let v = if failed.is_nan() {
                    "NaN".to_owned()
                } else {
                    failed.to_string()
                };
                writeln!(out, "erlmcp_requests_failed_total{{{labels}}} {v} {ts}")
            }
            "erlmcp_request_duration_seconds" => {
                for (le, frac) in BUCKETS {
                    let _ = writeln!(
                        out,
                        "erlmcp_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {} {ts}",
                        n * frac
                    );
                }
                let _ = writeln!(out, "erlmcp_request_duration_seconds_count{{{labels}}} {n} {ts}");
                writeln!(
                    out,
                    "erlmcp_request_duration_seconds_sum{{{labels}}} {} {ts}",
                    n * 0.004
                )
            }
            "container_cpu_usage_seconds" => writeln!(
                out,
                "container_cpu_usage_seconds_total{{{labels}}} {} {ts}",
                spec.cpu * t as f64
            ),
            "container_memory_working_set_bytes" => writeln!(
                out,
                "container_memory_working_set_bytes{{{labels}}} {} {ts}",
                spec.memory * 1_073_741_824.0
            ),
            "kube_pod_container_resource_limits" => {
                let _ = writeln!(
                    out,
                    "kube_pod_container_resource_limits{{{labels},resource=\"cpu\"}} 1 {ts}"
                );
                writeln!(
                    out,
                    "kube_pod_container_resource_limits{{{labels},resource=\"memory\"}} 1073741824 {ts}"
                )
            }
            "kube_pod_container_status_restarts" => {
                let r = if t >= SPAN - 150 { spec.restarts } else { 0 };
                writeln!(out, "kube_pod_container_status_restarts_total{{{labels}}} {r} {ts}")
            }
            "up" => writeln!(out, "up{{{labels}}} {} {ts}", spec.up),
            other => panic!("unknown family {other}"),
        }
        .unwrap_or_default();
        t += STEP;
    }
}

/// The whole dataset as OpenMetrics text.
fn openmetrics() -> String {
    let families = [
        ("erlmcp_requests", "counter"),
        ("erlmcp_requests_failed", "counter"),
        ("erlmcp_request_duration_seconds", "histogram"),
        ("container_cpu_usage_seconds", "counter"),
        ("container_memory_working_set_bytes", "gauge"),
        ("kube_pod_container_resource_limits", "gauge"),
        ("kube_pod_container_status_restarts", "counter"),
        ("up", "gauge"),
    ];
    let mut out = String::new();
    for (family, kind) in families {
        writeln!(out, "# TYPE {family} {kind}").unwrap_or_default();
        for (slot, sc) in scenarios().iter().enumerate() {
            let start = T0 + slot as i64 * 3600;
            side_samples(&mut out, family, start, "canary", &sc.canary);
            side_samples(&mut out, family, start, "stable", &sc.stable);
        }
    }
    out.push_str("# EOF\n");
    out
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.is_file())
}

fn require_tools() {
    for tool in ["prometheus", "promtool"] {
        assert!(
            which(tool).is_some(),
            "`{tool}` is not on PATH: these tests need a real Prometheus. Run scripts/setup \
             (or `apt-get install prometheus`, which ships promtool) and try again."
        );
    }
}

struct Server {
    url: String,
    port: u16,
    /// Removed by the wrapper once Prometheus is gone.
    _dir: PathBuf,
    child: Mutex<Child>,
    /// Closing this pipe makes the wrapper kill Prometheus.
    lifeline: Mutex<Option<ChildStdin>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(mut l) = self.lifeline.lock() {
            l.take();
        }
        if let Ok(mut c) = self.child.lock() {
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Runs Prometheus in the background; when stdin closes (the test process
/// exited, however it exited) kills it and removes its directory.
const WRAPPER: &str = r#"
dir="$1"; shift
prometheus "$@" >"$dir/prometheus.log" 2>&1 &
p=$!
echo "$p"
cat >/dev/null
kill "$p" 2>/dev/null
wait "$p" 2>/dev/null
rm -rf "$dir"
exit 0
"#;

fn ready(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /-/ready HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = String::new();
    let _ = s.read_to_string(&mut head);
    head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200")
}

fn start_server() -> Server {
    start_server_with(false)
}

fn start_server_with(secure: bool) -> Server {
    require_tools();
    for _attempt in 0..3 {
        match try_start_server(secure) {
            Ok(server) => return server,
            // The port was taken between free_port() and bind: try another one.
            Err(PortTaken) => continue,
        }
    }
    panic!("no free loopback port for Prometheus after 3 attempts");
}

struct PortTaken;

/// Write the dataset into a fresh directory, load it and start Prometheus on
/// it. The wrapper removes the directory when it stops Prometheus (a static
/// server is never dropped).
/// With `secure`, Prometheus serves https:// with a certificate for 127.0.0.1 signed by
/// `DIR/ca.pem` and requires basic auth (user `canary`, password in `DIR/password`), from
/// a web config file; `DIR/other-ca.pem` is a CA that signed nothing it serves.
fn try_start_server(secure: bool) -> Result<Server, PortTaken> {
    let dir = tempfile::tempdir().expect("temp dir").keep();
    let web_config = secure.then(|| secure_web_config(&dir));
    let data = dir.join("data.om");
    std::fs::write(&data, openmetrics()).expect("write data.om");
    let tsdb = dir.join("tsdb");
    let out = Command::new("promtool")
        .args(["tsdb", "create-blocks-from", "openmetrics"])
        .arg(&data)
        .arg(&tsdb)
        .output()
        .expect("run promtool");
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&dir);
        panic!(
            "promtool failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let config = dir.join("empty.yml");
    std::fs::write(&config, "").expect("write config");
    let log = dir.join("prometheus.log");
    let port = free_port();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(WRAPPER)
        .arg("sh")
        .arg(&dir)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", tsdb.display()))
        .arg("--storage.tsdb.retention.time=100y")
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .args(web_config.iter().map(|w| format!("--web.config.file={}", w.display())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn sh");
    let mut lifeline = child.stdin.take();
    let mut pid = String::new();
    if let Some(stdout) = child.stdout.take() {
        let _ = BufReader::new(stdout).read_line(&mut pid);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut text = String::new();
    while Instant::now() < deadline {
        // Over TLS the log says when it serves (a plain-text probe cannot ask).
        let up = if secure {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("Server is ready to receive web requests"))
        } else {
            ready(port)
        };
        if up {
            return Ok(Server {
                url: format!("{}://127.0.0.1:{port}", if secure { "https" } else { "http" }),
                port,
                _dir: dir,
                child: Mutex::new(child),
                lifeline: Mutex::new(lifeline),
            });
        }
        // The wrapper outlives a Prometheus that failed to start: read its log.
        text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("address already in use") || text.contains("level=error") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Stop it (the wrapper also removes the directory), then report.
    lifeline.take();
    let _ = child.wait();
    if text.contains("address already in use") {
        return Err(PortTaken);
    }
    panic!("Prometheus (pid {}) did not become ready:\n{text}", pid.trim());
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(start_server)
}

const PROM_PASSWORD: &str = "prom-Pw-5Tz!never-shown";

/// Certificates (made here with rcgen), the password file, its bcrypt hash and the web
/// config file in `dir`; returns the web config's path.
fn secure_web_config(dir: &std::path::Path) -> PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        (p.self_signed(&key).unwrap(), key)
    };
    let (ca_cert, ca_key) = ca("prometheus test CA");
    let (other, _) = ca("some other CA");
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, "prometheus");
    let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("other-ca.pem"), other.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server-key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("password"), format!("{PROM_PASSWORD}\n")).unwrap();
    std::fs::write(dir.join("wrong-password"), "not-the-password\n").unwrap();
    std::fs::write(dir.join("token"), "some-bearer-token-never-shown\n").unwrap();
    let hash = bcrypt::hash(PROM_PASSWORD, 4).unwrap();
    let web = dir.join("web.yml");
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\nbasic_auth_users:\n  canary: '{hash}'\n",
            dir.join("server.pem").display(),
            dir.join("server-key.pem").display()
        ),
    )
    .unwrap();
    web
}

/// A second Prometheus, over https:// with basic auth.
fn secure_server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| start_server_with(true))
}

fn decide(args: &[&str]) -> (i32, String, String) {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_erlmcp-rollout"))
        .args(["canary", "decide"])
        .args(args)
        .output()
        .expect("run erlmcp-rollout");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn decide_at(scenario: &str, extra: &[&str]) -> (i32, serde_json::Value, String) {
    let s = server();
    let at = at(scenario).to_string();
    let mut args = vec!["--prometheus", &s.url, "--at", &at, "--json"];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = decide(&args);
    let json = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (code, json, stderr)
}

fn rule<'a>(v: &'a serde_json::Value, name: &str) -> Vec<&'a serde_json::Value> {
    v["rules"]
        .as_array()
        .map(|rules| rules.iter().filter(|r| r["rule"] == name).collect())
        .unwrap_or_default()
}

#[test]
fn healthy_canary_is_promoted() {
    let (code, v, err) = decide_at("healthy", &[]);
    assert_eq!(code, 0, "{v:#}\n{err}");
    assert_eq!(v["decision"], "promote");
    assert_eq!(v["warnings"].as_array().map(Vec::len), Some(0), "{v:#}");
    // The data's own numbers come back: 6000 canary requests in 5 minutes, p95 8.57 ms.
    let c = &v["metrics"]["canary"];
    assert_eq!(c["requests"].as_f64().map(f64::round), Some(6000.0), "{c:#}");
    let p95 = c["latency_p95_ms"].as_f64().unwrap_or_default();
    assert!((p95 - 8.571).abs() < 0.01, "{p95}");
    assert_eq!(c["freshness"]["status"], "fresh", "{c:#}");
}

#[test]
fn failing_canary_is_rolled_back() {
    let (code, v, err) = decide_at("failing", &[]);
    assert_eq!(code, 11, "{v:#}\n{err}");
    assert_eq!(v["decision"], "rollback");
    assert_eq!(rule(&v, "error_rate")[0]["outcome"], "rollback");
    assert_eq!(v["triggers"][0]["id"], "error_rate_absolute");
}

#[test]
fn crashlooping_canary_is_rolled_back() {
    let (code, v, err) = decide_at("crashloop", &[]);
    assert_eq!(code, 11, "{v:#}\n{err}");
    assert_eq!(rule(&v, "restarts")[0]["outcome"], "rollback");
    assert_eq!(v["triggers"][0]["id"], "pod_crash_loop");
}

#[test]
fn no_canary_series_is_never_promoted() {
    let (code, v, err) = decide_at("no_data", &[]);
    assert_eq!(code, 10, "{v:#}\n{err}");
    assert_eq!(rule(&v, "error_rate")[0]["outcome"], "no_data");
    assert_eq!(v["metrics"]["canary"]["requests"]["no_data"], "empty", "{v:#}");
    // With the stricter policy, no data rolls back and cites the health-check trigger.
    let (code, v, _) = decide_at("no_data", &["--threshold", "on_no_data=rollback"]);
    assert_eq!(code, 11, "{v:#}");
    assert!(v["triggers"]
        .as_array()
        .is_some_and(|t| t.iter().any(|t| t["id"] == "health_check_failures")));
}

#[test]
fn stale_target_is_never_promoted() {
    // The canary stopped reporting 3 minutes ago; rate() still answers from older samples.
    let (code, v, err) = decide_at("stale", &[]);
    assert_eq!(code, 10, "{v:#}\n{err}");
    assert!(
        v["metrics"]["canary"]["requests"].as_f64().is_some(),
        "rate() still has data: {v:#}"
    );
    let f = rule(&v, "freshness");
    assert_eq!(f[0]["outcome"], "no_data", "{f:#?}");
    assert_eq!(v["metrics"]["canary"]["freshness"]["status"], "stale");
    assert_eq!(v["metrics"]["canary"]["freshness"]["age_seconds"], 180.0);
    assert_eq!(f[1]["outcome"], "pass", "stable is fresh: {f:#?}");
}

#[test]
fn target_down_is_never_promoted() {
    let (code, v, err) = decide_at("target_down", &[]);
    assert_eq!(code, 10, "{v:#}\n{err}");
    assert_eq!(v["metrics"]["canary"]["freshness"]["status"], "target_down");
}

#[test]
fn nan_error_rate_is_never_promoted() {
    let (code, v, err) = decide_at("nan", &[]);
    assert_eq!(code, 10, "{v:#}\n{err}");
    assert_eq!(v["metrics"]["canary"]["error_rate"]["no_data"], "nan");
    assert_eq!(rule(&v, "error_rate")[0]["outcome"], "no_data");
}

#[test]
fn too_little_traffic_continues() {
    let (code, v, err) = decide_at("low_traffic", &[]);
    assert_eq!(code, 10, "{v:#}\n{err}");
    assert_eq!(rule(&v, "min_requests")[0]["outcome"], "continue");
}

#[test]
fn human_output_names_the_decision_and_source() {
    let s = server();
    let at = at("failing").to_string();
    let (code, out, _) = decide(&["--prometheus", &s.url, "--at", &at]);
    assert_eq!(code, 11);
    // --at also takes RFC 3339: the healthy slot ends at 00:10 on 2026-01-01.
    let (code, healthy, err) = decide(&["--prometheus", &s.url, "--at", "2026-01-01T00:10:00Z"]);
    assert_eq!(code, 0, "{healthy}{err}");
    assert!(healthy.contains("decision: promote"), "{healthy}");
    assert!(out.contains("decision: rollback"), "{out}");
    assert!(out.contains("Error rate >0.1%"), "{out}");
}

#[test]
fn promql_errors_are_the_source_exit_code() {
    // 400 bad_data: a syntax error.
    let (code, _, err) = decide_at("healthy", &["--query", "requests=sum(rate(erlmcp_requests_total[5m])"]);
    assert_eq!(code, 12, "{err}");
    assert!(err.contains("HTTP 400 (bad_data)"), "{err}");
    // 422 execution: rate() drops __name__, leaving two series with one label set.
    let dup = r#"requests=rate({__name__=~"erlmcp_requests_total|erlmcp_requests_failed_total", deployment="$deployment"}[5m])"#;
    let (code, _, err) = decide_at("healthy", &["--query", dup]);
    assert_eq!(code, 12, "{err}");
    assert!(err.contains("HTTP 422 (execution)"), "{err}");
    // 503 timeout: a heavy query with a 1 ms query timeout.
    let heavy = "requests=sum(count_over_time(vector(1)[2d:1s]))";
    let (code, _, err) = decide_at("healthy", &["--query", heavy, "--query-timeout", "1ms"]);
    assert_eq!(code, 12, "{err}");
    assert!(err.contains("HTTP 503 (timeout)"), "{err}");
    // Several series where one is expected: no guessing.
    let ambiguous = "latency_p95_ms=histogram_quantile(0.95, rate(erlmcp_request_duration_seconds_bucket[5m]))";
    let (code, _, err) = decide_at("healthy", &["--query", ambiguous]);
    assert_eq!(code, 12, "{err}");
    assert!(err.contains("series, expected one"), "{err}");
}

#[test]
fn unreachable_or_wrong_url_is_the_source_exit_code() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let (code, out, err) = decide(&["--prometheus", &url, "--at", "1767226200"]);
    assert_eq!(code, 12, "{out}{err}");
    assert!(err.contains("cannot reach Prometheus"), "{err}");
    // A path that is not the API: Prometheus' plain-text 404.
    let wrong = format!("{}/nope", server().url);
    let (code, _, err) = decide(&["--prometheus", &wrong, "--at", "1767226200"]);
    assert_eq!(code, 12, "{err}");
    assert!(err.contains("HTTP 404"), "{err}");
}

#[test]
fn client_reads_vectors_matrices_scalars_and_errors() {
    let s = server();
    let client = Client::new(&s.url).expect("client");
    let end = at("healthy") as f64;
    let r = client
        .query_range(r#"erlmcp_requests_total{deployment="canary"}"#, end - 60.0, end, 30.0)
        .expect("query_range");
    let QueryResult::Matrix(series) = r else {
        panic!("{r:?}")
    };
    let values: Vec<f64> = series[0].points.iter().map(|p| p.1).collect();
    assert_eq!(values, [10_800.0, 11_400.0, 12_000.0]);
    let r = client.query("1/0", Some(end)).expect("scalar");
    assert!(matches!(r, QueryResult::Scalar(_, v) if v == f64::INFINITY), "{r:?}");
    let nan_at = at("nan") as f64;
    let r = client
        .query(
            r#"rate(erlmcp_requests_failed_total{deployment="canary"}[5m])"#,
            Some(nan_at),
        )
        .expect("vector");
    let QueryResult::Vector(v) = r else { panic!("{r:?}") };
    assert!(v[0].value.is_nan());
    let e = client.query("rate(", Some(end)).unwrap_err();
    assert!(
        matches!(e, PrometheusError::Query { status: 400, ref error_type, .. } if error_type == "bad_data"),
        "{e}"
    );
}

#[test]
fn the_server_stays_up_for_the_whole_file() {
    // A cheap sanity check that every test above shares one process.
    let s = server();
    assert!(ready(s.port));
}

/// `canary decide` against the https:// Prometheus with `access` options.
fn decide_secure(access: &[&str]) -> (i32, serde_json::Value, String) {
    let s = secure_server();
    let at = at("healthy").to_string();
    let mut args = vec!["--prometheus", &s.url, "--at", &at, "--json"];
    args.extend_from_slice(access);
    let (code, stdout, stderr) = decide(&args);
    for secret in [PROM_PASSWORD, "some-bearer-token-never-shown"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "a secret shows: {stdout}{stderr}"
        );
    }
    let json = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (code, json, stderr)
}

fn file(name: &str) -> String {
    secure_server()._dir.join(name).display().to_string()
}

#[test]
fn https_with_a_ca_and_basic_auth_gives_a_verdict() {
    let (ca, pw) = (file("ca.pem"), file("password"));
    let (code, v, err) = decide_secure(&[
        "--prometheus-cacert",
        &ca,
        "--prometheus-user",
        "canary",
        "--prometheus-password-file",
        &pw,
    ]);
    assert_eq!(code, 0, "{v:#}\n{err}");
    assert_eq!(v["decision"], "promote");
}

#[test]
fn wrong_or_missing_credentials_are_a_clear_error_never_a_verdict() {
    let (ca, wrong, token) = (file("ca.pem"), file("wrong-password"), file("token"));
    for access in [
        vec![
            "--prometheus-cacert",
            &ca,
            "--prometheus-user",
            "canary",
            "--prometheus-password-file",
            &wrong,
        ],
        vec!["--prometheus-cacert", &ca],
        vec!["--prometheus-cacert", &ca, "--prometheus-token-file", &token],
    ] {
        let (code, v, err) = decide_secure(&access);
        assert_eq!(code, 12, "{access:?}: {v:#}\n{err}");
        assert_eq!(v, serde_json::Value::Null, "no verdict: {v:#}");
        assert!(
            err.contains("HTTP 401") && err.contains("no verdict"),
            "{access:?}: {err}"
        );
    }
}

#[test]
fn an_unknown_ca_is_a_clear_tls_error() {
    let (other, pw) = (file("other-ca.pem"), file("password"));
    let (code, v, err) = decide_secure(&[
        "--prometheus-cacert",
        &other,
        "--prometheus-user",
        "canary",
        "--prometheus-password-file",
        &pw,
    ]);
    assert_eq!(code, 12, "{v:#}\n{err}");
    assert!(err.contains("unknown CA"), "{err}");
    // The library says the same with a typed error.
    let client = Client::with_options(
        &secure_server().url,
        erlmcp_rollout::deploy::prometheus::ClientOptions {
            ca_cert_file: Some(other.into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(matches!(client.query("up", None), Err(PrometheusError::Tls { .. })));
}

#[test]
fn credentials_are_never_sent_over_plain_http() {
    let pw = file("password");
    let (code, _, stderr) = decide(&[
        "--prometheus",
        "http://127.0.0.1:9",
        "--prometheus-user",
        "canary",
        "--prometheus-password-file",
        &pw,
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("https:// only"), "{stderr}");
}
