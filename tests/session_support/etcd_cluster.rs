//! A real 3-member etcd cluster on free loopback ports, started by the tests themselves
//! (Debian `etcd-server` 3.4 and `etcdctl`). Members are killed with SIGKILL on drop; a
//! watchdog shell kills them and removes the data too if the test process dies first.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use erlmcp_rollout::session::{EtcdOptions, EtcdStore, StoreOptions};

/// TLS files of a secured cluster (see [`Cluster::start_secure`]).
#[derive(Clone, Debug)]
pub struct ClusterTls {
    /// The CA that signed every certificate below.
    pub ca: PathBuf,
    /// The members' certificate (server and peer, for 127.0.0.1) and key.
    pub member_cert: PathBuf,
    pub member_key: PathBuf,
    /// A client certificate etcdctl uses (CN `etcdctl`).
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

pub struct Cluster {
    dir: tempfile::TempDir,
    tls: Option<ClusterTls>,
    /// `root:password` once authentication is on (etcdctl then runs as root).
    root: Option<String>,
    token: String,
    client_ports: Vec<u16>,
    peer_ports: Vec<u16>,
    members: Vec<Option<Child>>,
    watchdog: Option<Child>,
}

fn free_ports(n: usize) -> Vec<u16> {
    // Hold all listeners at once so the kernel hands out distinct ports.
    let listeners: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

impl Cluster {
    /// Starts n1..n3 and waits until every member is healthy.
    pub fn start() -> Cluster {
        Cluster::start_with(None)
    }

    /// Starts n1..n3 with TLS on client and peer ports and `--client-cert-auth` (and
    /// `--peer-client-cert-auth`), the certificates made by `tls` in the cluster's
    /// directory (`tls` gets that directory). Authentication is off until
    /// [`Cluster::enable_auth`].
    pub fn start_secure(tls: impl FnOnce(&Path) -> ClusterTls) -> Cluster {
        Cluster::start_with(Some(Box::new(tls)))
    }

    #[allow(clippy::type_complexity)]
    fn start_with(tls: Option<Box<dyn FnOnce(&Path) -> ClusterTls + '_>>) -> Cluster {
        let ports = free_ports(6);
        let dir = tempfile::Builder::new().prefix("erlmcp-etcd-").tempdir().unwrap();
        let tls = tls.map(|make| make(dir.path()));
        let mut cluster = Cluster {
            tls,
            root: None,
            token: format!("erlmcp-test-{}", std::process::id()),
            client_ports: ports[..3].to_vec(),
            peer_ports: ports[3..].to_vec(),
            dir,
            members: vec![None, None, None],
            watchdog: None,
        };
        for i in 0..3 {
            cluster.spawn(i, "new");
        }
        cluster.write_pids();
        let script = format!(
            "while kill -0 {me} 2>/dev/null; do sleep 0.5; done; kill -9 $(cat '{pids}') 2>/dev/null; rm -rf '{dir}'",
            me = std::process::id(),
            pids = cluster.dir.path().join("pids").display(),
            dir = cluster.dir.path().display(),
        );
        cluster.watchdog = Some(
            Command::new("bash")
                .args(["-c", &script])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        cluster.wait_healthy(Duration::from_secs(30));
        cluster
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn log(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("n{}.log", i + 1))
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The TLS files, for a cluster from [`Cluster::start_secure`].
    pub fn tls(&self) -> Option<&ClusterTls> {
        self.tls.as_ref()
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let scheme = self.scheme();
        let url = |p: u16| format!("{scheme}://127.0.0.1:{p}");
        let initial: Vec<String> = (0..3)
            .map(|j| format!("n{}={}", j + 1, url(self.peer_ports[j])))
            .collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(i))
            .unwrap();
        let mut etcd = Command::new("etcd");
        if let Some(t) = &self.tls {
            for side in ["", "peer-"] {
                etcd.arg(format!("--{side}trusted-ca-file")).arg(&t.ca);
                etcd.arg(format!("--{side}cert-file")).arg(&t.member_cert);
                etcd.arg(format!("--{side}key-file")).arg(&t.member_key);
                etcd.arg(format!("--{side}client-cert-auth"));
            }
        }
        let child = etcd
            .arg("--name")
            .arg(format!("n{}", i + 1))
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("n{}", i + 1)))
            .args(["--listen-client-urls", &url(self.client_ports[i])])
            .args(["--advertise-client-urls", &url(self.client_ports[i])])
            .args(["--listen-peer-urls", &url(self.peer_ports[i])])
            .args(["--initial-advertise-peer-urls", &url(self.peer_ports[i])])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", state])
            .args([
                "--experimental-enable-lease-checkpoint",
                "--experimental-enable-lease-checkpoint-persist",
                "--logger=zap",
                "--log-outputs=stderr",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("etcd must be installed (Debian etcd-server; scripts/setup installs it)");
        self.members[i] = Some(child);
    }

    fn write_pids(&self) {
        let pids: Vec<String> = self.members.iter().flatten().map(|c| c.id().to_string()).collect();
        std::fs::write(self.dir.path().join("pids"), pids.join("\n")).unwrap();
    }

    /// Client URLs of all three members (also of stopped ones).
    pub fn endpoints(&self) -> Vec<String> {
        let scheme = self.scheme();
        self.client_ports
            .iter()
            .map(|p| format!("{scheme}://127.0.0.1:{p}"))
            .collect()
    }

    /// The members as `host:port` (the scheme then follows the client's TLS settings).
    pub fn members(&self) -> Vec<String> {
        self.client_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect()
    }

    fn running_endpoints(&self) -> Vec<String> {
        let scheme = self.scheme();
        (0..3)
            .filter(|&i| self.members[i].is_some())
            .map(|i| format!("{scheme}://127.0.0.1:{}", self.client_ports[i]))
            .collect()
    }

    /// etcdctl with this cluster's client certificate and, once auth is on, as root.
    fn ctl_command(&self) -> Command {
        let mut c = Command::new("etcdctl");
        c.env("ETCDCTL_API", "3");
        if let Some(t) = &self.tls {
            c.arg("--cacert").arg(&t.ca);
            c.arg("--cert").arg(&t.client_cert);
            c.arg("--key").arg(&t.client_key);
        }
        if let Some(root) = &self.root {
            // From the environment, not an argument: arguments show in `ps`.
            c.env("ETCDCTL_USER", root);
        }
        c
    }

    /// `etcdctl ARGS...` against the running members (as root on a secured cluster):
    /// its standard output. Panics with the output when it fails.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = self
            .ctl_command()
            .arg("--endpoints")
            .arg(self.running_endpoints().join(","))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "etcdctl {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Turns authentication on with a `root` user (password `root_password`); etcdctl
    /// runs as root from then on.
    pub fn enable_auth(&mut self, root_password: &str) {
        self.ctl(&["user", "add", &format!("root:{root_password}")]);
        self.ctl(&["user", "grant-role", "root", "root"]);
        self.ctl(&["auth", "enable"]);
        self.root = Some(format!("root:{root_password}"));
    }

    fn etcdctl(&self, endpoints: &[String], args: &[&str]) -> Option<String> {
        let out = self
            .ctl_command()
            .arg("--endpoints")
            .arg(endpoints.join(","))
            .arg("--command-timeout=2s")
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until every running member answers a quorum read.
    pub fn wait_healthy(&mut self, within: Duration) {
        let start = Instant::now();
        loop {
            for (i, m) in self.members.iter_mut().enumerate() {
                if let Some(child) = m {
                    if let Ok(Some(status)) = child.try_wait() {
                        let log = std::fs::read_to_string(self.dir.path().join(format!("n{}.log", i + 1)))
                            .unwrap_or_default();
                        let tail: Vec<&str> = log.lines().rev().take(10).collect();
                        panic!("etcd n{} exited ({status}); log tail: {tail:#?}", i + 1);
                    }
                }
            }
            if self
                .etcdctl(&self.running_endpoints(), &["endpoint", "health"])
                .is_some()
            {
                return;
            }
            assert!(start.elapsed() < within, "etcd cluster not healthy after {within:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The index (0..3) of the current leader, as the running members report it.
    pub fn leader(&self) -> Option<usize> {
        let out = self.etcdctl(&self.running_endpoints(), &["endpoint", "status", "-w", "json"])?;
        let statuses: serde_json::Value = serde_json::from_str(&out).ok()?;
        for st in statuses.as_array()? {
            let endpoint = st["Endpoint"].as_str()?;
            let member = st["Status"]["header"]["member_id"].as_u64()?;
            let leader = st["Status"]["leader"].as_u64()?;
            if member == leader {
                return self
                    .client_ports
                    .iter()
                    .position(|p| endpoint.ends_with(&format!(":{p}")));
            }
        }
        None
    }

    /// SIGKILL member `i` and reap it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        self.write_pids();
    }

    /// Restarts member `i` on its old data directory and ports.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].is_none(), "member {i} is running");
        self.spawn(i, "existing");
        self.write_pids();
    }

    /// The number of keys under `prefix` as member `i` alone sees them (a serializable,
    /// member-local read), or `None` when it does not answer.
    pub fn member_count(&self, i: usize, prefix: &str) -> Option<u64> {
        let ep = vec![format!("{}://127.0.0.1:{}", self.scheme(), self.client_ports[i])];
        let out = self.etcdctl(
            &ep,
            &[
                "get",
                prefix,
                "--prefix",
                "--keys-only",
                "--limit=1",
                "--consistency=s",
                "-w",
                "json",
            ],
        )?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        Some(v["count"].as_u64().unwrap_or(0))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in self.members.iter_mut() {
            if let Some(mut child) = m.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// One cluster per test binary, shared by all its tests (each on its own prefix). It
/// lives in a static, so the watchdog stops it when the test process exits.
pub fn shared() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(Cluster::start)
}

/// A prefix no other store of this test process uses.
pub fn unique_prefix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("test/{}/{}/", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A store on the shared cluster under a fresh prefix.
pub fn store(opts: StoreOptions) -> EtcdStore {
    let cluster = shared();
    EtcdStore::connect(&cluster.endpoints(), unique_prefix(), EtcdOptions::default(), opts).unwrap()
}

/// Waits (functionally, up to 20 s, polling every millisecond) until `cond` holds; returns
/// how long it took. For what a cluster does asynchronously (a watch event, an election).
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    start.elapsed()
}

/// `etcdctl --endpoints ENDPOINTS ARGS...` (API v3): its standard output. Panics with the
/// output when it fails.
pub fn etcdctl(endpoints: &[String], args: &[&str]) -> String {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(endpoints.join(","))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "etcdctl {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
