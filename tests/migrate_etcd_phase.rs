//! The migration phase kept in etcd (DESIGN §5), against a real 3-member cluster started by
//! this test binary: guarded saves (a lost race is a typed conflict), per-node acks, two
//! migrator "nodes" following one phase key through their watchers, the ack gate, and
//! typed errors when the cluster is down.

#[path = "session_support/blackhole_proxy.rs"]
mod blackhole_proxy;
#[path = "session_support/etcd_cluster.rs"]
mod etcd_cluster;

use etcd_cluster::{etcdctl, wait_for};

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use erlmcp_rollout::migrate::dual::{Migrator, MigratorConfig};
use erlmcp_rollout::migrate::etcd_phase::{EtcdPhaseStore, PhaseWatchOptions, PhaseWatcher};
use erlmcp_rollout::migrate::outbox::Outbox;
use erlmcp_rollout::migrate::phase::{GateRefusal, Phase, PhaseState, PhaseStore};
use erlmcp_rollout::migrate::MigrateError;
use erlmcp_rollout::session::{EtcdOptions, MemoryStore, Session, SessionId, Store, StoreOptions, Timeout};

/// Waits until `node`'s ack in etcd reads `phase`.
fn wait_for_ack(store: &EtcdPhaseStore, node: &str, phase: Phase) {
    wait_for(&format!("{node} to ack {phase}"), || {
        store.acks().unwrap().get(node) == Some(&phase)
    });
}

fn connect(endpoints: &[String], prefix: &str, node: &str) -> EtcdPhaseStore {
    EtcdPhaseStore::connect(endpoints, prefix, node, EtcdOptions::default()).unwrap()
}

#[test]
fn save_and_load_round_trip() {
    let cluster = etcd_cluster::shared();
    let prefix = etcd_cluster::unique_prefix();
    let store = connect(&cluster.endpoints(), &prefix, "a");
    assert_eq!(store.phase_key(), format!("{prefix}phase"));
    assert_eq!(store.load().unwrap(), None);
    let mut state = PhaseState::new(Phase::Off);
    state.reverse_outbox = true;
    state.record(Phase::Phase1, 1_234, "advance");
    store.save(&state).unwrap();
    assert_eq!(store.load().unwrap(), Some(state.clone()));
    // Another process sees the same state, and a save after a load goes through.
    let other = connect(&cluster.endpoints(), &prefix, "b");
    assert_eq!(other.load().unwrap(), Some(state.clone()));
    state.record(Phase::Phase2, 2_345, "advance");
    other.save(&state).unwrap();
    assert_eq!(store.load().unwrap().map(|s| s.phase), Some(Phase::Phase2));
}

#[test]
fn concurrent_saves_one_wins_the_other_gets_a_typed_conflict() {
    let cluster = etcd_cluster::shared();
    let prefix = etcd_cluster::unique_prefix();
    for round in 0..3 {
        let stores: Vec<EtcdPhaseStore> = ["op1", "op2"]
            .iter()
            .map(|n| connect(&cluster.endpoints(), &prefix, n))
            .collect();
        let base = stores[0].load().unwrap();
        assert_eq!(stores[1].load().unwrap(), base);
        let barrier = Arc::new(Barrier::new(2));
        let results: Vec<(usize, Result<(), MigrateError>)> = std::thread::scope(|s| {
            let handles: Vec<_> = stores
                .iter()
                .enumerate()
                .map(|(i, store)| {
                    let barrier = Arc::clone(&barrier);
                    let mut next = base.clone().unwrap_or_else(|| PhaseState::new(Phase::Off));
                    next.record(Phase::Phase1, 1_000 * round + i as i64, &format!("set by op{}", i + 1));
                    s.spawn(move || {
                        barrier.wait();
                        (i, store.save(&next))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<usize> = results.iter().filter(|(_, r)| r.is_ok()).map(|(i, _)| *i).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        let (loser, err) = results.iter().find(|(_, r)| r.is_err()).unwrap();
        match err {
            Err(MigrateError::Conflict { key, revision }) => {
                assert_eq!(key, &format!("{prefix}phase"));
                assert!(*revision > 0);
                assert!(err.as_ref().unwrap_err().to_string().contains(key.as_str()));
            }
            other => panic!("round {round}: expected a conflict, got {other:?}"),
        }
        // Nothing of the loser was written: the winner's state is stored.
        let stored = stores[*loser].load().unwrap().unwrap();
        let how = &stored.history.last().unwrap().how;
        assert_eq!(how, &format!("set by op{}", winners[0] + 1));
        // After loading again, the loser may save.
        stores[*loser].save(&stored).unwrap();
    }
}

#[test]
fn a_save_whose_answer_is_lost_is_retried_safely() {
    let cluster = etcd_cluster::shared();
    let mut endpoints = cluster.endpoints();
    // The first member is reached through a proxy that can drop every answer: the txn is
    // applied by etcd, the store never hears so, times out and retries on the next member.
    let proxy = blackhole_proxy::Proxy::start(endpoints[0].trim_start_matches("http://"));
    endpoints[0] = proxy.url();
    let prefix = etcd_cluster::unique_prefix();
    let options = EtcdOptions {
        request_timeout: Duration::from_millis(300),
        ..EtcdOptions::default()
    };
    let store = EtcdPhaseStore::connect(&endpoints, prefix.as_str(), "a", options).unwrap();
    assert_eq!(store.load().unwrap(), None);
    let mut state = PhaseState::new(Phase::Off);
    state.record(Phase::Phase1, 1, "advance");
    proxy.arm();
    // The retry's guard fails (the first attempt applied), but the key holds our own
    // bytes: that is success, not a conflict.
    store.save(&state).unwrap();
    proxy.disarm();
    let other = connect(&cluster.endpoints(), &prefix, "b");
    assert_eq!(other.load().unwrap(), Some(state.clone()));
    // The store knows the revision it wrote: the next save goes through, once.
    state.record(Phase::Phase2, 2, "advance");
    store.save(&state).unwrap();
    assert_eq!(other.load().unwrap().map(|s| s.history.len()), Some(2));
}

#[test]
fn contending_load_modify_save_loops_lose_no_update() {
    let cluster = etcd_cluster::shared();
    let prefix = etcd_cluster::unique_prefix();
    let (writers, each) = (4, 10);
    let conflicts: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..writers)
            .map(|w| {
                let store = connect(&cluster.endpoints(), &prefix, &format!("w{w}"));
                s.spawn(move || {
                    let mut conflicts = 0;
                    for i in 0..each {
                        loop {
                            let mut state = store.load().unwrap().unwrap_or_else(|| PhaseState::new(Phase::Off));
                            let to = if state.phase == Phase::Off {
                                Phase::Phase1
                            } else {
                                Phase::Off
                            };
                            state.record(to, 0, &format!("w{w}-{i}"));
                            match store.save(&state) {
                                Ok(()) => break,
                                Err(MigrateError::Conflict { .. }) => conflicts += 1,
                                Err(e) => panic!("{e}"),
                            }
                        }
                    }
                    conflicts
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let state = connect(&cluster.endpoints(), &prefix, "reader")
        .load()
        .unwrap()
        .unwrap();
    // Every acknowledged save is in the history exactly once: none overwrote another.
    let mut hows: Vec<&str> = state.history.iter().map(|c| c.how.as_str()).collect();
    assert_eq!(hows.len(), writers * each, "{conflicts} conflicts");
    hows.sort_unstable();
    hows.dedup();
    assert_eq!(hows.len(), writers * each);
    // The moves chain: each change starts where the previous one ended.
    assert!(state.history.windows(2).all(|w| w[0].to == w[1].from));
    eprintln!(
        "{} saves by {writers} contending writers, {conflicts} conflicts",
        writers * each
    );
}

fn node(phases: &EtcdPhaseStore, gate_nodes: &[&str]) -> Arc<Migrator> {
    let mem = || -> Arc<dyn Store> { Arc::new(MemoryStore::new(StoreOptions::default())) };
    let config = MigratorConfig {
        advance_gate: Some(phases.ack_gate(gate_nodes.iter().map(|n| n.to_string()).collect())),
        ..MigratorConfig::default()
    };
    Arc::new(Migrator::open(mem(), mem(), Outbox::in_memory(), Box::new(phases.clone()), config).unwrap())
}

fn watch(phases: &EtcdPhaseStore, m: &Arc<Migrator>) -> PhaseWatcher {
    let options = PhaseWatchOptions {
        sync_timeout: Duration::from_secs(5),
        retry_interval: Duration::from_millis(100),
    };
    phases.watch(Arc::clone(m), options).unwrap()
}

#[test]
fn two_nodes_follow_one_phase_and_the_ack_gate_holds_back_an_advance() {
    let cluster = etcd_cluster::shared();
    let endpoints = cluster.endpoints();
    let prefix = etcd_cluster::unique_prefix();
    let (pa, pb) = (connect(&endpoints, &prefix, "a"), connect(&endpoints, &prefix, "b"));
    let nodes = ["a", "b"];
    let (a, b) = (node(&pa, &nodes), node(&pb, &nodes));
    let wa = watch(&pa, &a);
    let mut wb = Some(watch(&pb, &b));
    let off = [("a".to_string(), Phase::Off), ("b".to_string(), Phase::Off)].into();
    wait_for("both nodes to ack off", || pa.acks().unwrap() == off);

    // Node A advances; node B's watcher applies the change and acks it.
    let mut propagation = Vec::new();
    let called = Instant::now();
    assert_eq!(a.advance(Duration::from_secs(5)).unwrap(), Phase::Phase1);
    let saved = Instant::now();
    wait_for("b to apply phase1", || b.phase() == Phase::Phase1);
    propagation.push((saved.elapsed(), called.elapsed()));
    wait_for("both nodes to ack phase1", || {
        pa.acks().unwrap().values().all(|p| *p == Phase::Phase1)
    });

    // Both nodes dual-write; each node's relay fills its own secondary.
    for (m, name) in [(&a, "a"), (&b, "b")] {
        let id = SessionId::new(format!("s-{name}")).unwrap();
        m.put(Session::new(id, 0, Timeout::Infinity, name.as_bytes().to_vec()))
            .unwrap();
    }

    // B stops watching: it keeps applying phase1. A moves on to phase2 (B acked phase1) ...
    drop(wb.take());
    assert_eq!(a.advance(Duration::from_secs(5)).unwrap(), Phase::Phase2);
    wait_for_ack(&pa, "a", Phase::Phase2);
    assert_eq!(b.phase(), Phase::Phase1);
    // ... but not to phase3: B has not applied phase2. Nothing changed.
    match a.advance(Duration::from_secs(5)) {
        Err(MigrateError::Gate(GateRefusal::NotAcknowledged { from, to, lagging })) => {
            assert_eq!((from, to), (Phase::Phase2, Phase::Phase3));
            assert_eq!(lagging, vec!["b: phase1".to_string()]);
        }
        other => panic!("expected the ack gate to refuse, got {other:?}"),
    }
    assert_eq!(a.phase(), Phase::Phase2);
    assert_eq!(pa.load().unwrap().map(|s| s.phase), Some(Phase::Phase2));
    let err = pa
        .check_all_acked(Phase::Phase2, &["a".into(), "b".into()])
        .unwrap_err();
    assert!(err.to_string().contains("b: phase1"), "{err}");

    // B, still in phase1, cannot overwrite A's phase2 with a change of its own: its save is
    // guarded on the revision it last loaded. Nothing changed on either side.
    match b.rollback(Duration::from_secs(5)) {
        Err(MigrateError::Conflict { key, .. }) => assert_eq!(key, format!("{prefix}phase")),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(b.phase(), Phase::Phase1);
    assert_eq!(pa.load().unwrap().map(|s| s.phase), Some(Phase::Phase2));

    // B's watcher starts again: the full re-read applies phase2 and acks it.
    wb = Some(watch(&pb, &b));
    wait_for("b to apply phase2", || b.phase() == Phase::Phase2);
    wait_for_ack(&pa, "b", Phase::Phase2);
    pa.check_all_acked(Phase::Phase2, &["a".into(), "b".into()]).unwrap();

    // Into phase3: B drains its outbox before the store of record changes.
    let called = Instant::now();
    assert_eq!(a.advance(Duration::from_secs(5)).unwrap(), Phase::Phase3);
    let saved = Instant::now();
    wait_for("b to apply phase3", || b.phase() == Phase::Phase3);
    propagation.push((saved.elapsed(), called.elapsed()));
    assert_eq!(b.outbox_depth().unwrap(), 0);
    let id = SessionId::new("s-b").unwrap();
    assert_eq!(b.secondary().get(&id).unwrap().metadata.as_ref(), b"b");
    wait_for("both nodes to ack phase3", || {
        pa.acks().unwrap() == [("a".to_string(), Phase::Phase3), ("b".to_string(), Phase::Phase3)].into()
    });

    // Out of phase3 without a reverse outbox there is no way back, on either node.
    assert!(b.rollback(Duration::from_secs(5)).is_err());
    assert_eq!(wa.status().applied, Phase::Phase3);
    assert!(wb.as_ref().unwrap().status().connected);
    // The save commits between the call and the return of `advance`: the propagation time
    // lies between the two figures.
    eprintln!("phase applied on b (after advance returned on a, after it was called): {propagation:?}");
    for (p, _) in &propagation {
        assert!(*p < Duration::from_secs(1), "propagation took {p:?}");
    }
}

#[test]
fn an_invalid_stored_phase_is_a_typed_error_and_changes_nothing() {
    let cluster = etcd_cluster::shared();
    let endpoints = cluster.endpoints();
    let prefix = etcd_cluster::unique_prefix();
    let phases = connect(&endpoints, &prefix, "b");
    let b = node(&phases, &["b"]);
    let w = watch(&phases, &b);
    wait_for_ack(&phases, "b", Phase::Off);
    assert_eq!(b.advance(Duration::from_secs(5)).unwrap(), Phase::Phase1);
    wait_for_ack(&phases, "b", Phase::Phase1);
    let key = format!("{prefix}phase");
    etcdctl(&endpoints, &["put", &key, "{not json"]);
    match phases.load() {
        Err(MigrateError::Unreadable { key: k, .. }) => assert_eq!(k, key),
        other => panic!("expected Unreadable, got {other:?}"),
    }
    wait_for("the watcher to report the bad value", || {
        w.status().last_error.is_some_and(|e| e.contains(&key))
    });
    assert_eq!(b.phase(), Phase::Phase1);
    // A valid value again (written by someone else): the watcher applies it.
    let mut state = PhaseState::new(Phase::Phase1);
    state.record(Phase::Phase2, 1, "set");
    etcdctl(&endpoints, &["put", &key, &serde_json::to_string(&state).unwrap()]);
    wait_for("b to apply phase2", || b.phase() == Phase::Phase2);
    wait_for_ack(&phases, "b", Phase::Phase2);
    let bad_ack = format!("{prefix}acks/zz");
    etcdctl(&endpoints, &["put", &bad_ack, "phase2"]);
    match phases.acks() {
        Err(MigrateError::Unreadable { key: k, .. }) => assert_eq!(k, bad_ack),
        other => panic!("expected Unreadable, got {other:?}"),
    }
}

#[test]
fn a_watcher_fails_over_and_a_cluster_down_gives_typed_errors_within_the_timeout() {
    let mut cluster = etcd_cluster::Cluster::start();
    let endpoints = cluster.endpoints();
    let prefix = etcd_cluster::unique_prefix();
    let options = EtcdOptions {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_millis(300),
        operation_timeout: Duration::from_secs(1),
        ..EtcdOptions::default()
    };
    let store = EtcdPhaseStore::connect(&endpoints, prefix.as_str(), "a", options.clone()).unwrap();
    store.save(&PhaseState::new(Phase::Off)).unwrap();

    // B watches through the first member; that member dies; a change still reaches B.
    let pb = EtcdPhaseStore::connect(&endpoints, prefix.as_str(), "b", options.clone()).unwrap();
    let b = node(&pb, &["b"]);
    let wb = watch(&pb, &b);
    wait_for("b to connect", || wb.status().connected);
    let a = node(&store, &["b"]);
    wait_for_ack(&pb, "b", Phase::Off);
    // (If n1 led, the election takes about a second: the advance is retried meanwhile.)
    cluster.kill(0);
    wait_for("a quorum without n1", || a.advance(Duration::from_secs(5)).is_ok());
    wait_for("b to apply phase1 through another member", || {
        b.phase() == Phase::Phase1
    });
    wait_for("b to ack phase1", || {
        pb.acks().is_ok_and(|acks| acks.get("b") == Some(&Phase::Phase1))
    });
    assert!(wb.status().reconnects >= 1, "{:?}", wb.status());

    for i in 1..3 {
        cluster.kill(i);
    }
    let limit = options.operation_timeout + Duration::from_secs(2);
    let unavailable = |r: Result<(), MigrateError>, what: &str| match r {
        Err(e @ MigrateError::Unavailable { .. }) => assert!(e.to_string().contains("etcd phase store"), "{e}"),
        other => panic!("{what}: expected Unavailable, got {other:?}"),
    };
    let t = Instant::now();
    unavailable(store.load().map(|_| ()), "load");
    assert!(t.elapsed() < limit, "load took {:?}", t.elapsed());
    let t = Instant::now();
    unavailable(store.save(&PhaseState::new(Phase::Phase3)), "save");
    assert!(t.elapsed() < limit, "save took {:?}", t.elapsed());
    unavailable(store.ack(Phase::Phase1), "ack");
    unavailable(store.acks().map(|_| ()), "acks");
    // Connecting to a dead cluster is typed too.
    match EtcdPhaseStore::connect(&endpoints, prefix.as_str(), "c", options) {
        Err(MigrateError::Unavailable { .. }) => {}
        other => panic!("connect: expected Unavailable, got {other:?}"),
    }
    // Bad arguments are refused before any connection.
    assert!(matches!(
        EtcdPhaseStore::connect(&[], "p/", "a", EtcdOptions::default()),
        Err(MigrateError::Invalid(_))
    ));
    assert!(matches!(
        EtcdPhaseStore::connect(&["https://x:1".into()], "p/", "a", EtcdOptions::default()),
        Err(MigrateError::Invalid(_))
    ));
}

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_erlmcp-rollout"))
        .args(args)
        .output()
        .unwrap()
}

fn cli_json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {o:?}"))
}

#[test]
fn cli_phase_commands_on_an_etcd_state() {
    let cluster = etcd_cluster::shared();
    let endpoints = cluster.endpoints();
    let prefix = etcd_cluster::unique_prefix();
    let hosts: Vec<&str> = endpoints.iter().map(|e| e.trim_start_matches("http://")).collect();
    let state = format!("etcd:{}/{prefix}", hosts.join(","));
    let dir = tempfile::tempdir().unwrap();
    let (from, to) = (dir.path().join("a.redb"), dir.path().join("b.redb"));
    for f in [&from, &to] {
        erlmcp_rollout::session::DiskStore::create(f, StoreOptions::default()).unwrap();
    }
    let (from, to) = (format!("disk:{}", from.display()), format!("disk:{}", to.display()));
    let outbox = dir.path().join("outbox.redb");
    let outbox = outbox.to_str().unwrap();
    let advance = |nodes: &str| {
        cli(&[
            "sessions",
            "phase",
            "advance",
            "--state",
            &state,
            "--from",
            &from,
            "--to",
            &to,
            "--outbox",
            outbox,
            "--expect-nodes",
            nodes,
            "--json",
        ])
    };

    let o = cli(&["sessions", "phase", "show", "--state", &state, "--json"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(
        (cli_json(&o)["phase"].as_str(), cli_json(&o)["saved"].as_bool()),
        (Some("off"), Some(false))
    );
    // Node b has not acknowledged anything: the gate refuses (exit 15), nothing changes.
    let o = advance("b");
    assert_eq!(o.status.code(), Some(15), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("b: no acknowledgement"),
        "{o:?}"
    );
    let b = connect(&endpoints, &prefix, "b");
    assert_eq!(b.load().unwrap(), None);
    b.ack(Phase::Off).unwrap();
    let o = advance("b");
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(cli_json(&o)["phase"], "phase1");
    assert_eq!(b.load().unwrap().map(|s| s.phase), Some(Phase::Phase1));
    // show lists the acks and marks b as lagging.
    let o = cli(&["sessions", "phase", "show", "--state", &state]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("phase: phase1\n"), "{out}");
    assert!(out.contains("node b: applies off (lagging)"), "{out}");
    let o = cli(&["sessions", "phase", "show", "--state", &state, "--json"]);
    assert_eq!(cli_json(&o)["acks"], serde_json::json!({"b": "off"}));
    // force sets a phase past the gates (here by its old name `set`, which scripts may
    // still use); a file-only flag combination is refused.
    let o = cli(&["sessions", "phase", "set", "off", "--state", &state, "--json"]);
    assert_eq!(
        (o.status.code(), cli_json(&o)["phase"].as_str()),
        (Some(0), Some("off"))
    );
    assert_eq!(b.load().unwrap().map(|s| s.phase), Some(Phase::Off));
    let file_state = dir.path().join("phase.json");
    let o = cli(&[
        "sessions",
        "phase",
        "advance",
        "--state",
        file_state.to_str().unwrap(),
        "--from",
        &from,
        "--to",
        &to,
        "--outbox",
        outbox,
        "--expect-nodes",
        "b",
    ]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--expect-nodes needs an etcd --state"),
        "{o:?}"
    );
}
