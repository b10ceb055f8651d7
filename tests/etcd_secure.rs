//! Every etcd client of the crate against a real secured cluster: 3 members with TLS on
//! client and peer ports, `--client-cert-auth`, authentication on (a root user and a user
//! whose role reaches only `erlmcp/`, plus read-only `readonly/`), certificates made by
//! this test (a CA and leaf certificates for 127.0.0.1). The session store, flag push and
//! watch and the phase store work through it; a wrong CA, a missing or expired client
//! certificate, a mismatched host name, a wrong password and a write outside the role's
//! prefix each fail with their own typed error, at once, and write nothing. No secret
//! shows in an error, a `Debug` output or the CLI's output. A leader kill is ridden out.

#[path = "session_support/etcd_cluster.rs"]
mod etcd_cluster;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use erlmcp_rollout::etcd::{AccessKind, EtcdAccessError, EtcdAuth, EtcdOptions, EtcdSecurity, EtcdTls};
use erlmcp_rollout::flags::{push_flags_with, Engine, EtcdFlagsOptions, FlagsConfig, MapContext, PushError};
use erlmcp_rollout::migrate::etcd_phase::EtcdPhaseStore;
use erlmcp_rollout::migrate::phase::{Phase, PhaseState, PhaseStore};
use erlmcp_rollout::migrate::MigrateError;
use erlmcp_rollout::session::{EtcdStore, Session, SessionId, Store, StoreError, StoreOptions, Timeout};
use etcd_cluster::{wait_for, Cluster, ClusterTls};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};

const APP_PASSWORD: &str = "app-Pw-7Qx!never-shown";
const WRONG_PASSWORD: &str = "wrong-Pw-3Zk!never-shown";
const ROOT_PASSWORD: &str = "root-Pw-9Lm";

/// A CA and a certificate signed by it; `not_after_days < 0` makes an expired one.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ca {
        cert: p.self_signed(&key).unwrap(),
        key,
    }
}

/// Writes `NAME.pem` and `NAME-key.pem` for a leaf certificate signed by `ca`.
fn leaf(dir: &Path, ca: &Ca, name: &str, sans: &[&str], server: bool, expired: bool) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages = if server {
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    let now = time::OffsetDateTime::now_utc();
    if expired {
        p.not_before = now - time::Duration::days(30);
        p.not_after = now - time::Duration::days(1);
    } else {
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(30);
    }
    let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
    let (c, k) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

struct Secured {
    cluster: Cluster,
    pki: PathBuf,
}

fn pki(dir: &Path) -> ClusterTls {
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let root = ca("erlmcp test CA");
    let other = ca("some other CA");
    std::fs::write(pki.join("ca.pem"), root.cert.pem()).unwrap();
    std::fs::write(pki.join("other-ca.pem"), other.cert.pem()).unwrap();
    let (member_cert, member_key) = leaf(&pki, &root, "member", &["127.0.0.1"], true, false);
    let (client_cert, client_key) = leaf(&pki, &root, "etcdctl", &[], false, false);
    leaf(&pki, &root, "client", &[], false, false);
    leaf(&pki, &root, "expired", &[], false, true);
    std::fs::write(pki.join("app-password"), format!("{APP_PASSWORD}\n")).unwrap();
    std::fs::write(pki.join("wrong-password"), format!("{WRONG_PASSWORD}\n")).unwrap();
    ClusterTls {
        ca: pki.join("ca.pem"),
        member_cert,
        member_key,
        client_cert,
        client_key,
    }
}

/// The secured cluster of this test binary: user `app` with role `erlmcp` (read and
/// write under `erlmcp/`, read only under `readonly/`).
fn secured() -> &'static Secured {
    static S: OnceLock<Secured> = OnceLock::new();
    S.get_or_init(|| {
        let mut cluster = Cluster::start_secure(pki);
        cluster.enable_auth(ROOT_PASSWORD);
        cluster.ctl(&["role", "add", "erlmcp"]);
        cluster.ctl(&[
            "role",
            "grant-permission",
            "erlmcp",
            "--prefix=true",
            "readwrite",
            "erlmcp/",
        ]);
        cluster.ctl(&[
            "role",
            "grant-permission",
            "erlmcp",
            "--prefix=true",
            "read",
            "readonly/",
        ]);
        cluster.ctl(&["user", "add", &format!("app:{APP_PASSWORD}")]);
        cluster.ctl(&["user", "grant-role", "app", "erlmcp"]);
        let pki = cluster.dir().join("pki");
        Secured { cluster, pki }
    })
}

impl Secured {
    fn file(&self, name: &str) -> PathBuf {
        self.pki.join(name)
    }

    /// Full settings: the right CA, the app's client certificate, user app.
    fn security(&self) -> EtcdSecurity {
        EtcdSecurity {
            tls: Some(EtcdTls {
                ca_cert_file: self.file("ca.pem"),
                cert_file: Some(self.file("client.pem")),
                key_file: Some(self.file("client-key.pem")),
            }),
            auth: Some(EtcdAuth {
                user: "app".into(),
                password_file: self.file("app-password"),
            }),
        }
    }

    fn options(&self, security: EtcdSecurity) -> EtcdOptions {
        EtcdOptions {
            security,
            ..EtcdOptions::default()
        }
    }

    /// Keys under `prefix` as root sees them.
    fn keys(&self, prefix: &str) -> Vec<String> {
        self.cluster
            .ctl(&["get", prefix, "--prefix", "--keys-only"])
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

fn unique(what: &str) -> String {
    format!("{what}{}", etcd_cluster::unique_prefix().trim_start_matches("test/"))
}

fn session(id: &str) -> Session {
    Session::new(SessionId::new(id).unwrap(), 1_000, Timeout::Infinity, b"meta".to_vec())
}

fn access(e: StoreError) -> EtcdAccessError {
    match e {
        StoreError::Access(a) => a,
        other => panic!("expected an access error, got {other:?}"),
    }
}

/// No secret in the error's message or `Debug`.
fn no_secret(shown: &str) {
    for secret in [APP_PASSWORD, WRONG_PASSWORD, ROOT_PASSWORD] {
        assert!(!shown.contains(secret), "a password shows in: {shown}");
    }
}

#[test]
fn session_store_works_over_mutual_tls_as_a_user() {
    let s = secured();
    let prefix = unique("erlmcp/sessions/");
    let store = EtcdStore::connect(
        &s.cluster.members(),
        prefix.clone(),
        s.options(s.security()),
        StoreOptions::default(),
    )
    .unwrap();
    no_secret(&format!("{store:?}"));
    let created = store.create(session("s1")).unwrap();
    assert_eq!(store.get(&created.id).unwrap(), created);
    store.put(session("s2")).unwrap();
    assert!(store.delete(&SessionId::new("s2").unwrap()).unwrap());
    let page = store.scan(None, 10, erlmcp_rollout::session::Visibility::Live).unwrap();
    assert_eq!(page.records.len(), 1);
    assert_eq!(s.keys(&prefix).len(), 2, "s1 and the tombstone of s2");
    // The https:// form of the endpoints works the same.
    let urls: Vec<String> = s.cluster.endpoints();
    assert!(urls[0].starts_with("https://"));
    EtcdStore::connect(&urls, prefix, s.options(s.security()), StoreOptions::default()).unwrap();
}

#[test]
fn flags_push_and_watch_work_over_tls_as_a_user() {
    let s = secured();
    let key = format!("{}flags", unique("erlmcp/"));
    let security = s.security();
    let members = s.cluster.members();
    let pushed = push_flags_with(
        &members,
        &key,
        br#"{"f": {"enabled": true}}"#,
        Duration::from_secs(5),
        &security,
    )
    .unwrap();
    assert!(pushed.changed);
    let engine = Arc::new(Engine::builder().build(FlagsConfig::from_json(b"{}").unwrap()));
    let watcher = engine
        .watch_etcd(
            &members,
            EtcdFlagsOptions {
                key: key.clone(),
                security: security.clone(),
                ..EtcdFlagsOptions::default()
            },
        )
        .unwrap();
    let ctx = MapContext::new();
    wait_for("the first read through TLS", || engine.evaluate("f", &ctx).enabled);
    push_flags_with(
        &members,
        &key,
        br#"{"f": {"enabled": false}}"#,
        Duration::from_secs(5),
        &security,
    )
    .unwrap();
    wait_for("the watched change", || !engine.evaluate("f", &ctx).enabled);
    assert!(watcher.status().connected);
}

#[test]
fn the_rollout_controller_reads_publishes_locks_and_keeps_state_over_tls() {
    use erlmcp_rollout::deploy::rollout::{Command as RunCommand, ControllerLock, FlagTarget, Holder, StateStore};
    let s = secured();
    let base = unique("erlmcp/");
    let key = format!("{base}flags");
    let security = s.security();
    let members = s.cluster.members();
    push_flags_with(
        &members,
        &key,
        br#"{"f": {"enabled": true, "rollout_percentage": 0}}"#,
        Duration::from_secs(5),
        &security,
    )
    .unwrap();
    let spec = format!("etcd:{}/{key}", members.join(","));
    let target = FlagTarget::parse(&spec, Duration::from_secs(5)).unwrap();
    // Without the settings the cluster refuses: an error, never a publish.
    assert!(target.read().is_err());
    let target = target.with_etcd_security(security.clone());
    let now = target.read().unwrap();
    let next = br#"{"f": {"enabled": true, "rollout_percentage": 5}}"#;
    let guard = target.publish(now.guard, next).unwrap();
    assert_eq!(target.read().unwrap().bytes, next.to_vec());
    // A publish guarded on the old revision is a conflict: nothing written.
    assert!(target.publish(now.guard, b"{}").is_err());
    assert_eq!(target.read().unwrap().guard, guard);
    // The controller lock (a lease-bound key under KEY/rollout-lock/) over TLS as app.
    let me = Holder::me("ci");
    let lock = ControllerLock::acquire(&target, "f", &me).unwrap();
    assert!(ControllerLock::holder(&target, "f").unwrap().is_some());
    assert!(ControllerLock::acquire(&target, "f", &Holder::me("other")).is_err());
    drop(lock);
    // Commands in an etcd state store over TLS.
    let state = StateStore::parse(
        &format!("etcd:{}/{base}rollouts", members.join(",")),
        Duration::from_secs(5),
    )
    .unwrap()
    .with_etcd_security(security);
    let cmd = RunCommand {
        action: "approve".into(),
        actor: "ci".into(),
        at: 1.0,
        note: String::new(),
    };
    state.put_command("f", &cmd).unwrap();
    assert_eq!(
        state.take_command("f").unwrap().map(|c| c.action),
        Some("approve".into())
    );
    assert!(state.load("f").unwrap().is_none());
}

#[test]
fn a_refused_flag_watch_says_so_in_its_status() {
    let s = secured();
    let engine = Arc::new(Engine::builder().build(FlagsConfig::from_json(b"{}").unwrap()));
    let mut security = s.security();
    if let Some(auth) = security.auth.as_mut() {
        auth.password_file = s.file("wrong-password");
    }
    let watcher = engine
        .watch_etcd(
            &s.cluster.members(),
            EtcdFlagsOptions {
                key: "erlmcp/feature_flags".into(),
                security,
                ..EtcdFlagsOptions::default()
            },
        )
        .unwrap();
    wait_for("the refusal in the watcher's status", || {
        watcher.status().refused.is_some()
    });
    let status = watcher.status();
    let refused = status.refused.unwrap();
    assert!(matches!(refused.kind, AccessKind::WrongPassword { .. }), "{refused}");
    assert!(!status.connected);
    no_secret(&refused.to_string());
}

#[test]
fn phase_store_works_over_tls_as_a_user() {
    let s = secured();
    let prefix = unique("erlmcp/migration/");
    let store =
        EtcdPhaseStore::connect(&s.cluster.members(), prefix.clone(), "node-a", s.options(s.security())).unwrap();
    assert_eq!(store.load().unwrap(), None);
    let state = PhaseState::new(Phase::Phase1);
    store.save(&state).unwrap();
    assert_eq!(store.load().unwrap().map(|p| p.phase), Some(Phase::Phase1));
    store.ack(Phase::Phase1).unwrap();
    assert_eq!(store.acks().unwrap().get("node-a"), Some(&Phase::Phase1));
    assert_eq!(
        s.keys(&prefix),
        [format!("{prefix}acks/node-a"), format!("{prefix}phase")]
    );
}

#[test]
fn the_phase_watcher_applies_and_acknowledges_over_tls() {
    use erlmcp_rollout::migrate::dual::{Migrator, MigratorConfig};
    use erlmcp_rollout::migrate::etcd_phase::PhaseWatchOptions;
    use erlmcp_rollout::migrate::outbox::Outbox;
    use erlmcp_rollout::session::MemoryStore;
    let s = secured();
    let prefix = unique("erlmcp/migration/");
    let phases =
        EtcdPhaseStore::connect(&s.cluster.members(), prefix.clone(), "node-w", s.options(s.security())).unwrap();
    let secondary = EtcdStore::connect(
        &s.cluster.members(),
        unique("erlmcp/sessions/"),
        s.options(s.security()),
        StoreOptions::default(),
    )
    .unwrap();
    let m = Arc::new(
        Migrator::open(
            Arc::new(MemoryStore::new(StoreOptions::default())),
            Arc::new(secondary),
            Outbox::in_memory(),
            Box::new(phases.clone()),
            MigratorConfig::default(),
        )
        .unwrap(),
    );
    let watcher = phases.watch(Arc::clone(&m), PhaseWatchOptions::default()).unwrap();
    // As erlmcp does: advance at once, while the watcher is still connecting.
    m.advance(Duration::from_secs(5)).unwrap();
    wait_for("the acknowledgement of phase1", || {
        phases.acks().unwrap().get("node-w") == Some(&Phase::Phase1)
    });
    assert!(watcher.status().connected, "{:?}", watcher.status());
}

#[test]
fn a_wrong_ca_is_an_unknown_ca_error_and_nothing_is_written() {
    let s = secured();
    let mut security = s.security();
    security.tls.as_mut().unwrap().ca_cert_file = s.file("other-ca.pem");
    let prefix = unique("erlmcp/sessions/");
    let e = access(
        EtcdStore::connect(
            &s.cluster.members(),
            prefix.clone(),
            s.options(security.clone()),
            StoreOptions::default(),
        )
        .unwrap_err(),
    );
    assert!(matches!(e.kind, AccessKind::UnknownCa { .. }), "{e}");
    assert!(e.to_string().contains("unknown CA"), "{e}");
    let key = format!("{prefix}flags");
    match push_flags_with(&s.cluster.members(), &key, b"{}", Duration::from_secs(5), &security) {
        Err(PushError::Access(a)) => assert!(matches!(a.kind, AccessKind::UnknownCa { .. }), "{a}"),
        other => panic!("{other:?}"),
    }
    match EtcdPhaseStore::connect(&s.cluster.members(), prefix.clone(), "n", s.options(security)) {
        Err(MigrateError::Access(a)) => assert!(matches!(a.kind, AccessKind::UnknownCa { .. }), "{a}"),
        other => panic!("{other:?}"),
    }
    assert!(s.keys(&prefix).is_empty());
}

#[test]
fn a_missing_client_certificate_is_its_own_error() {
    let s = secured();
    let mut security = s.security();
    let tls = security.tls.as_mut().unwrap();
    (tls.cert_file, tls.key_file) = (None, None);
    let e = access(
        EtcdStore::connect(
            &s.cluster.members(),
            unique("erlmcp/sessions/"),
            s.options(security),
            StoreOptions::default(),
        )
        .unwrap_err(),
    );
    assert_eq!(e.kind, AccessKind::ClientCertificateRequired, "{e}");
}

#[test]
fn an_expired_client_certificate_is_rejected() {
    let s = secured();
    let mut security = s.security();
    let tls = security.tls.as_mut().unwrap();
    (tls.cert_file, tls.key_file) = (Some(s.file("expired.pem")), Some(s.file("expired-key.pem")));
    let e = access(
        EtcdStore::connect(
            &s.cluster.members(),
            unique("erlmcp/sessions/"),
            s.options(security),
            StoreOptions::default(),
        )
        .unwrap_err(),
    );
    assert!(matches!(e.kind, AccessKind::ClientCertificateRejected { .. }), "{e}");
}

#[test]
fn a_host_name_the_certificate_does_not_name_is_a_mismatch() {
    let s = secured();
    // The members' certificate names 127.0.0.1 only.
    let members: Vec<String> = s
        .cluster
        .members()
        .iter()
        .map(|m| m.replace("127.0.0.1", "localhost"))
        .collect();
    let e = access(
        EtcdStore::connect(
            &members,
            unique("erlmcp/sessions/"),
            s.options(s.security()),
            StoreOptions::default(),
        )
        .unwrap_err(),
    );
    assert!(matches!(e.kind, AccessKind::CertificateMismatch { .. }), "{e}");
}

#[test]
fn a_wrong_password_is_its_own_error_and_never_shown() {
    let s = secured();
    let mut security = s.security();
    security.auth.as_mut().unwrap().password_file = s.file("wrong-password");
    let prefix = unique("erlmcp/sessions/");
    let e = access(
        EtcdStore::connect(
            &s.cluster.members(),
            prefix.clone(),
            s.options(security.clone()),
            StoreOptions::default(),
        )
        .unwrap_err(),
    );
    assert_eq!(e.kind, AccessKind::WrongPassword { user: "app".into() }, "{e}");
    no_secret(&format!("{e} {e:?} {security:?} {:?}", s.options(security.clone())));
    match push_flags_with(
        &s.cluster.members(),
        &format!("{prefix}f"),
        b"{}",
        Duration::from_secs(5),
        &security,
    ) {
        Err(e @ PushError::Access(_)) => no_secret(&format!("{e} {e:?}")),
        other => panic!("{other:?}"),
    }
    assert!(s.keys(&prefix).is_empty());
}

#[test]
fn a_write_outside_the_role_is_permission_denied_and_nothing_is_written() {
    let s = secured();
    // Readable, not writable: the store opens, the write is refused.
    let prefix = unique("readonly/");
    let store = EtcdStore::connect(
        &s.cluster.members(),
        prefix.clone(),
        s.options(s.security()),
        StoreOptions::default(),
    )
    .unwrap();
    let e = access(store.create(session("s1")).unwrap_err());
    match &e.kind {
        AccessKind::PermissionDenied { user, action } => {
            assert_eq!(user.as_deref(), Some("app"));
            assert!(action.contains(&format!("{prefix}s1")), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(s.keys(&prefix).is_empty());
    // Not even readable: refused when connecting.
    let outside = unique("elsewhere/");
    let e = access(
        EtcdStore::connect(
            &s.cluster.members(),
            outside.clone(),
            s.options(s.security()),
            StoreOptions::default(),
        )
        .unwrap_err(),
    );
    assert!(matches!(e.kind, AccessKind::PermissionDenied { .. }), "{e}");
    match push_flags_with(
        &s.cluster.members(),
        &format!("{outside}flags"),
        b"{}",
        Duration::from_secs(5),
        &s.security(),
    ) {
        Err(PushError::Access(a)) => assert!(matches!(a.kind, AccessKind::PermissionDenied { .. }), "{a}"),
        other => panic!("{other:?}"),
    }
    assert!(s.keys(&outside).is_empty());
}

#[test]
fn plain_http_to_a_tls_cluster_and_no_user_are_refused_clearly() {
    let s = secured();
    // No user on a cluster with authentication on.
    let mut security = s.security();
    security.auth = None;
    let e = access(
        EtcdStore::connect(
            &s.cluster.members(),
            unique("erlmcp/sessions/"),
            s.options(security),
            StoreOptions::default(),
        )
        .unwrap_err(),
    );
    // The client certificate's CN (`app`) is etcd's user when no password is given.
    assert!(
        matches!(
            e.kind,
            AccessKind::AuthRequired | AccessKind::PermissionDenied { .. } | AccessKind::WrongPassword { .. }
        ),
        "{e}"
    );
    // http:// with TLS settings is refused before any connection.
    let http: Vec<String> = s.cluster.members().iter().map(|m| format!("http://{m}")).collect();
    let e = EtcdStore::connect(&http, "erlmcp/x/", s.options(s.security()), StoreOptions::default()).unwrap_err();
    assert!(e.to_string().contains("TLS settings"), "{e}");
}

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_erlmcp-rollout"))
}

#[test]
fn cli_commands_take_the_etcd_options_from_flags_and_environment() {
    let s = secured();
    let prefix = unique("erlmcp/cli/");
    let uri = format!(
        "etcd:{}/{}",
        s.cluster.members().join(","),
        prefix.trim_end_matches('/')
    );
    let flags_file = s.cluster.dir().join(format!("flags-{}.json", std::process::id()));
    std::fs::write(&flags_file, r#"{"f": {"enabled": true}}"#).unwrap();
    let key = format!("{}flags", unique("erlmcp/cli-flags/"));
    // flags push with command-line options.
    let out = cli()
        .args(["flags", "push"])
        .arg(&flags_file)
        .args(["--etcd", &s.cluster.members().join(","), "--key", &key, "--json"])
        .arg("--etcd-cacert")
        .arg(s.file("ca.pem"))
        .arg("--etcd-cert")
        .arg(s.file("client.pem"))
        .arg("--etcd-key")
        .arg(s.file("client-key.pem"))
        .args(["--etcd-user", "app"])
        .arg("--etcd-password-file")
        .arg(s.file("app-password"))
        .output()
        .unwrap();
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("\"published\":true"), "{shown}");
    no_secret(&shown);
    // sessions stats from the environment.
    let env = |c: &mut Command, password: &str| {
        c.env("ERLMCP_ETCD_CACERT", s.file("ca.pem"))
            .env("ERLMCP_ETCD_CERT", s.file("client.pem"))
            .env("ERLMCP_ETCD_KEY", s.file("client-key.pem"))
            .env("ERLMCP_ETCD_USER", "app")
            .env("ERLMCP_ETCD_PASSWORD_FILE", s.file(password));
    };
    let mut c = cli();
    c.args(["sessions", "stats", &uri, "--json"]);
    env(&mut c, "app-password");
    let out = c.output().unwrap();
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{shown}");
    no_secret(&shown);
    // A wrong password: a clear error naming the user, exit 1, never the password.
    let mut c = cli();
    c.args(["sessions", "stats", &uri, "--json"]);
    env(&mut c, "wrong-password");
    let out = c.output().unwrap();
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(shown.contains("wrong user name or password"), "{shown}");
    no_secret(&shown);
    // The phase commands too.
    let mut c = cli();
    c.args(["sessions", "phase", "show", "--state", &uri, "--json"]);
    env(&mut c, "app-password");
    let out = c.output().unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn a_leader_kill_is_ridden_out_under_tls_and_auth() {
    // A cluster of its own: this test kills members.
    let mut cluster = Cluster::start_secure(pki);
    cluster.enable_auth(ROOT_PASSWORD);
    cluster.ctl(&["role", "add", "erlmcp"]);
    cluster.ctl(&[
        "role",
        "grant-permission",
        "erlmcp",
        "--prefix=true",
        "readwrite",
        "erlmcp/",
    ]);
    cluster.ctl(&["user", "add", &format!("app:{APP_PASSWORD}")]);
    cluster.ctl(&["user", "grant-role", "app", "erlmcp"]);
    let pki = cluster.dir().join("pki");
    let security = EtcdSecurity {
        tls: Some(EtcdTls {
            ca_cert_file: pki.join("ca.pem"),
            cert_file: Some(pki.join("client.pem")),
            key_file: Some(pki.join("client-key.pem")),
        }),
        auth: Some(EtcdAuth {
            user: "app".into(),
            password_file: pki.join("app-password"),
        }),
    };
    let options = EtcdOptions {
        security,
        ..EtcdOptions::default()
    };
    let store = EtcdStore::connect(&cluster.members(), "erlmcp/kill/", options, StoreOptions::default()).unwrap();
    let mut acked = Vec::new();
    for i in 0..30 {
        if i == 10 {
            let leader = cluster.leader().expect("a leader");
            cluster.kill(leader);
            wait_for("a new leader", || cluster.leader().is_some());
        }
        if i == 20 {
            let down = (0..3).find(|&m| cluster.member_count(m, "erlmcp/").is_none()).unwrap();
            cluster.restart(down);
            cluster.wait_healthy(Duration::from_secs(30));
        }
        let id = format!("k{i:02}");
        store.put(session(&id)).unwrap();
        acked.push(id);
    }
    for id in &acked {
        store.get(&SessionId::new(id.as_str()).unwrap()).unwrap();
    }
}
