//! The dual-write migrator: gates and rollbacks, persisted phases, shadow-read counters,
//! secondary fault injection (errors, latency, outage then recovery), a model-based
//! proptest with simulated crashes, and `kill -9` of a process in the middle of dual
//! writes (0 acknowledged writes lost, 0 resurrected deletes, digests equal).

#![cfg(feature = "disk")]

mod migrate_support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use erlmcp_rollout::migrate::backfill::{backfill, BackfillConfig};
use erlmcp_rollout::migrate::dual::{Migrator, MigratorConfig};
use erlmcp_rollout::migrate::outbox::Outbox;
use erlmcp_rollout::migrate::phase::{FilePhaseStore, GateRefusal, Phase, PhaseStore};
use erlmcp_rollout::migrate::verify::{verify, VerifyConfig};
use erlmcp_rollout::migrate::MigrateError;
use erlmcp_rollout::session::{
    DiskStore, ManualClock, MemoryStore, Session, Store, StoreError, StoreOptions, Timeout, TouchPolicy,
};
use migrate_support::{contents, id, Faulty};
use proptest::prelude::*;

const T0: i64 = 1_700_000_000_000;
const SECS: Duration = Duration::from_secs(10);

fn open(dir: &Path, primary: Arc<dyn Store>, secondary: Arc<dyn Store>, config: MigratorConfig) -> Migrator {
    Migrator::open(
        primary,
        secondary,
        Outbox::open(dir.join("outbox.redb")).unwrap(),
        Box::new(FilePhaseStore::new(dir.join("phase.json"))),
        config,
    )
    .unwrap()
}

fn memory() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new(StoreOptions::default()))
}

fn sess(key: &str, meta: &str) -> Session {
    Session::new(id(key), T0, Timeout::Infinity, meta.as_bytes().to_vec())
}

fn fast_backoff() -> MigratorConfig {
    MigratorConfig {
        backoff_base: Duration::from_millis(1),
        backoff_max: Duration::from_millis(20),
        ..Default::default()
    }
}

#[test]
fn gates_refuse_with_reasons_and_rollbacks_are_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let (p, s) = (memory(), memory());
    // Written before the migration: the secondary lacks it until a backfill.
    p.put(sess("old", "before")).unwrap();
    let m = open(dir.path(), p.clone(), s.clone(), MigratorConfig::default());
    assert_eq!(m.phase(), Phase::Off);
    assert!(matches!(
        m.rollback(SECS),
        Err(MigrateError::Gate(GateRefusal::NotAllowed { .. }))
    ));
    assert_eq!(m.advance(SECS).unwrap(), Phase::Phase1);
    m.put(sess("new", "during")).unwrap();
    let err = m.advance(SECS).unwrap_err();
    assert!(
        matches!(
            &err,
            MigrateError::Gate(GateRefusal::NotVerified {
                from: Phase::Phase1,
                to: Phase::Phase2,
                differences: 1,
                ..
            })
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("verification found 1 differing key(s) (first: \"old\")"),
        "{err}"
    );
    assert_eq!(m.phase(), Phase::Phase1);
    backfill(p.as_ref(), s.as_ref(), &BackfillConfig::default(), &mut |_| {}).unwrap();
    assert_eq!(m.advance(SECS).unwrap(), Phase::Phase2);
    // Rollbacks: phase2 -> phase1 -> off, each saved.
    assert_eq!(m.rollback(SECS).unwrap(), Phase::Phase1);
    assert_eq!(m.rollback(SECS).unwrap(), Phase::Off);
    let saved = FilePhaseStore::new(dir.path().join("phase.json"))
        .load()
        .unwrap()
        .unwrap();
    assert_eq!(saved.phase, Phase::Off);
    let hows: Vec<&str> = saved.history.iter().map(|c| c.how.as_str()).collect();
    assert_eq!(hows, ["advance", "advance", "rollback", "rollback"]);
    // Phase 3 without the reverse outbox cannot roll back; cleanup is final.
    m.advance(SECS).unwrap();
    m.advance(SECS).unwrap();
    assert_eq!(m.advance(SECS).unwrap(), Phase::Phase3);
    let err = m.rollback(SECS).unwrap_err();
    assert!(err.to_string().contains("no reverse outbox"), "{err}");
    assert!(m.set_reverse_outbox(true).is_err());
    assert_eq!(m.advance(SECS).unwrap(), Phase::Cleanup);
    assert!(m.advance(SECS).unwrap_err().to_string().contains("last phase"));
    assert!(m.rollback(SECS).is_err());
    // The phase is read back at start.
    drop(m);
    let m = open(dir.path(), p, s, MigratorConfig::default());
    assert_eq!(m.phase(), Phase::Cleanup);
}

#[test]
fn step_to_moves_through_every_gate_and_stops_at_the_first_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let (p, s) = (memory(), memory());
    let config = MigratorConfig {
        advance_gate: Some(Arc::new(|from, to| {
            if to == Phase::Phase3 {
                Err(GateRefusal::NotAllowed {
                    from,
                    to,
                    reason: "held by the test".into(),
                }
                .into())
            } else {
                Ok(())
            }
        })),
        ..MigratorConfig::default()
    };
    let m = open(dir.path(), p, s, config);
    assert_eq!(m.step_to(Phase::Phase2, SECS).unwrap(), Phase::Phase2);
    // Phase 3 is refused: the move stops at phase 2, saved, and says why.
    let err = m.step_to(Phase::Cleanup, SECS).unwrap_err();
    assert!(err.to_string().contains("held by the test"), "{err}");
    assert_eq!(m.phase(), Phase::Phase2);
    assert_eq!(m.step_to(Phase::Off, SECS).unwrap(), Phase::Off);
    let saved = FilePhaseStore::new(dir.path().join("phase.json"))
        .load()
        .unwrap()
        .unwrap();
    let hows: Vec<&str> = saved.history.iter().map(|c| c.how.as_str()).collect();
    // One history entry per gated step, never a forced jump.
    assert_eq!(hows, ["advance", "advance", "rollback", "rollback"]);
    assert_eq!(m.step_to(Phase::Off, SECS).unwrap(), Phase::Off);
}

#[test]
fn an_undrainable_outbox_blocks_the_gate_and_names_the_depth() {
    let dir = tempfile::tempdir().unwrap();
    let faulty = Faulty::new(memory());
    let m = open(dir.path(), memory(), faulty.clone(), fast_backoff());
    m.advance(SECS).unwrap();
    faulty.set_outage(true);
    for i in 0..5 {
        m.put(sess(&format!("k{i}"), "x")).unwrap(); // acknowledged by the primary alone
    }
    let err = m.advance(Duration::from_millis(200)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot move from phase1 to phase2: the outbox still holds 5 intent(s); drain it first"
    );
    assert_eq!(m.phase(), Phase::Phase1);
    assert!(m.counters().unwrap().relay_failed > 0);
    faulty.set_outage(false);
    assert_eq!(m.advance(SECS).unwrap(), Phase::Phase2);
}

#[test]
fn reads_follow_the_phase_with_shadow_and_fallback_counters() {
    let dir = tempfile::tempdir().unwrap();
    let (p, s) = (memory(), memory());
    let m = open(
        dir.path(),
        p.clone(),
        s.clone(),
        MigratorConfig {
            shadow_sample: 1,
            ..Default::default()
        },
    );
    m.advance(SECS).unwrap();
    m.put(sess("a", "1")).unwrap();
    m.put(sess("b", "1")).unwrap();
    // Pending keys are not shadow-compared; after the drain they match.
    m.get(&id("a")).unwrap();
    assert_eq!(m.counters().unwrap().shadow_match, 0);
    m.drain(SECS).unwrap();
    m.get(&id("a")).unwrap();
    // A primary written behind the migrator's back: the secondary lags (mismatch), or
    // lacks the key (missing).
    p.put(sess("b", "behind the migrator")).unwrap();
    m.get(&id("b")).unwrap();
    p.put(sess("c", "primary only")).unwrap();
    m.get(&id("c")).unwrap();
    let c = m.counters().unwrap();
    assert_eq!((c.shadow_match, c.shadow_mismatch, c.shadow_missing), (1, 1, 1));
    let text = c.prometheus_text();
    assert!(
        text.contains("erlmcp_migration_shadow_reads_total{result=\"mismatch\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("erlmcp_migration_phase{phase=\"phase1\"} 1\n"), "{text}");
    assert!(text.contains("erlmcp_migration_outbox_depth 0\n"), "{text}");
    // Phase 2: reads come from the secondary, and fall back when it lacks the session.
    m.put(sess("b", "2")).unwrap(); // pending -> read from the primary
    assert_eq!(m.get(&id("b")).unwrap().metadata.as_ref(), b"2");
    m.drain(SECS).unwrap();
    backfill(p.as_ref(), s.as_ref(), &BackfillConfig::default(), &mut |_| {}).unwrap();
    let report = verify(p.as_ref(), s.as_ref(), &VerifyConfig::default()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    m.advance(SECS).unwrap();
    m.put(sess("d", "x")).unwrap();
    assert_eq!(m.get(&id("d")).unwrap().metadata.as_ref(), b"x");
    assert_eq!(m.counters().unwrap().pending_reads, 1);
    m.drain(SECS).unwrap();
    s.delete(&id("d")).unwrap(); // the secondary lost it: fall back
    assert_eq!(m.get(&id("d")).unwrap().metadata.as_ref(), b"x");
    assert_eq!(m.counters().unwrap().fallbacks, 1);
}

#[test]
fn phase3_reverse_outbox_keeps_the_primary_current_for_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let (p, s) = (memory(), memory());
    let m = open(dir.path(), p.clone(), s.clone(), MigratorConfig::default());
    m.set_reverse_outbox(true).unwrap();
    for _ in 0..3 {
        m.advance(SECS).unwrap();
    }
    assert_eq!(m.phase(), Phase::Phase3);
    m.put(sess("p3", "x")).unwrap();
    assert!(p.get(&id("p3")).is_err(), "phase 3 writes the secondary first");
    assert_eq!(m.rollback(SECS).unwrap(), Phase::Phase2);
    assert_eq!(p.get(&id("p3")).unwrap().metadata.as_ref(), b"x");
    assert!(verify(p.as_ref(), s.as_ref(), &VerifyConfig::default())
        .unwrap()
        .is_clean());
}

/// Writers through the migrator while the secondary misbehaves; after recovery the outbox
/// drains and the stores verify clean.
fn fault_run(setup: impl Fn(&Faulty), recover_after_ms: u64) -> erlmcp_rollout::migrate::dual::MigratorCounters {
    let dir = tempfile::tempdir().unwrap();
    let p = memory();
    let faulty = Faulty::new(memory());
    // One intent per relay step: many calls to the secondary, so even 1 % of them fail.
    let config = MigratorConfig {
        relay_batch: 1,
        ..fast_backoff()
    };
    let m = Arc::new(open(dir.path(), p.clone(), faulty.clone(), config));
    m.advance(SECS).unwrap();
    setup(&faulty);
    let relay = m.start_relay();
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let m = Arc::clone(&m);
            std::thread::spawn(move || {
                for n in 0..300u32 {
                    let key = format!("w{w}-k{}", n % 37);
                    if n % 5 == 4 {
                        m.delete(&id(&key)).unwrap();
                    } else {
                        m.put(sess(&key, &format!("{n}"))).unwrap();
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    std::thread::sleep(Duration::from_millis(recover_after_ms));
    faulty.set_errors(0);
    faulty.set_outage(false);
    faulty.set_latency(Duration::ZERO);
    m.drain(Duration::from_secs(60)).unwrap();
    relay.stop();
    assert_eq!(m.outbox_depth().unwrap(), 0);
    let report = verify(p.as_ref(), faulty.inner.as_ref(), &VerifyConfig::default()).unwrap();
    assert!(report.is_clean(), "{:?}", report.differences);
    assert_eq!(contents(p.as_ref()), contents(faulty.inner.as_ref()));
    let c = m.counters().unwrap();
    // Every injected fault hit a relay step (only the relay calls the secondary).
    assert_eq!(
        c.relay_failed,
        faulty.injected.load(std::sync::atomic::Ordering::SeqCst)
    );
    c
}

#[test]
fn secondary_errors_1_10_100_percent_then_recovery() {
    for permille in [10, 100, 1000] {
        let c = fault_run(|f| f.set_errors(permille), 20);
        assert!(c.relay_failed > 0, "{permille}: {c:?}");
        assert!(c.relay_retried > 0, "{permille}: {c:?}");
        assert!(c.relay_applied > 0);
    }
}

#[test]
fn secondary_latency_and_outage_then_recovery() {
    let c = fault_run(|f| f.set_latency(Duration::from_millis(2)), 0);
    assert_eq!(c.relay_failed, 0);
    let c = fault_run(|f| f.set_outage(true), 50);
    assert!(c.relay_failed > 0, "{c:?}");
}

// ---------------------------------------------------------------------------------------
// Model-based test: random operations, phase changes (rollbacks included), relay steps and
// simulated crashes (drop the migrator, reopen its outbox and phase files) against a
// BTreeMap of live sessions. Every read must see the caller's own acknowledged writes, in
// every phase, across crashes.

#[derive(Clone, Debug)]
enum Op {
    Put(u8, u8),
    Create(u8, u8),
    Delete(u8),
    Get(u8),
    Touch(u8),
    Relay,
    Advance,
    Rollback,
    Crash,
    Backfill,
    Reverse(bool),
}

const KEYS: u8 = 6;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..KEYS, any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
        2 => (0u8..KEYS, any::<u8>()).prop_map(|(k, v)| Op::Create(k, v)),
        3 => (0u8..KEYS).prop_map(Op::Delete),
        8 => (0u8..KEYS).prop_map(Op::Get),
        2 => (0u8..KEYS).prop_map(Op::Touch),
        3 => Just(Op::Relay),
        3 => Just(Op::Advance),
        1 => Just(Op::Rollback),
        2 => Just(Op::Crash),
        2 => Just(Op::Backfill),
        1 => any::<bool>().prop_map(Op::Reverse),
    ]
}

/// The model run. With `disk`, the primary and secondary are `DiskStore`s and a crash
/// also drops and reopens them from their files; otherwise they are `MemoryStore`s that
/// outlive the crash (like remote stores) and only the migrator's own files are reopened.
fn run_model(ops: &[Op], disk: bool) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let mut opts = StoreOptions::with_clock(clock.clone());
    opts.touch = TouchPolicy::always();
    let stores = |opts: &StoreOptions| -> (Arc<dyn Store>, Arc<dyn Store>) {
        if disk {
            (
                Arc::new(DiskStore::create(dir.path().join("p.redb"), opts.clone()).unwrap()),
                Arc::new(DiskStore::create(dir.path().join("s.redb"), opts.clone()).unwrap()),
            )
        } else {
            (
                Arc::new(MemoryStore::new(opts.clone())),
                Arc::new(MemoryStore::new(opts.clone())),
            )
        }
    };
    let (mut p, mut s) = stores(&opts);
    let config = MigratorConfig {
        touch: TouchPolicy::always(),
        clock: Arc::new(clock.clone()),
        shadow_sample: 1,
        relay_batch: 3,
        ..fast_backoff()
    };
    let mut m = open(dir.path(), p.clone(), s.clone(), config.clone());
    let mut model: BTreeMap<u8, Vec<u8>> = BTreeMap::new();
    let key = |k: u8| id(format!("key-{k:02}"));
    for op in ops {
        clock.advance_ms(7);
        match *op {
            Op::Put(k, v) => {
                m.put(Session::new(key(k), T0, Timeout::ms(3_600_000).unwrap(), vec![v]))
                    .unwrap();
                model.insert(k, vec![v]);
            }
            Op::Create(k, v) => {
                let r = m.create(Session::new(key(k), T0, Timeout::ms(3_600_000).unwrap(), vec![v]));
                if let std::collections::btree_map::Entry::Vacant(e) = model.entry(k) {
                    prop_assert!(r.is_ok(), "{r:?}");
                    e.insert(vec![v]);
                } else {
                    prop_assert!(matches!(r, Err(StoreError::AlreadyExists { .. })), "{r:?}");
                }
            }
            Op::Delete(k) => {
                prop_assert_eq!(m.delete(&key(k)).unwrap(), model.remove(&k).is_some());
            }
            Op::Get(k) => match (m.get(&key(k)), model.get(&k)) {
                (Ok(s), Some(v)) => prop_assert_eq!(s.metadata.as_ref(), v.as_slice(), "phase {}", m.phase()),
                (Err(StoreError::NotFound { .. }), None) => {}
                (r, v) => prop_assert!(false, "get {k} in {}: {r:?}, model {v:?}", m.phase()),
            },
            Op::Touch(k) => match (m.touch(&key(k)), model.get(&k)) {
                (Ok(s), Some(v)) => prop_assert_eq!(s.metadata.as_ref(), v.as_slice()),
                (Err(StoreError::NotFound { .. }), None) => {}
                (r, v) => prop_assert!(false, "touch {k} in {}: {r:?}, model {v:?}", m.phase()),
            },
            Op::Relay => {
                m.relay_step().unwrap();
            }
            Op::Advance => {
                let before = m.phase();
                match m.advance(SECS) {
                    Ok(to) => prop_assert_eq!(Some(to), before.next()),
                    Err(MigrateError::Gate(GateRefusal::NotVerified { .. })) => {
                        prop_assert!(!verify(p.as_ref(), s.as_ref(), &VerifyConfig::default())
                            .unwrap()
                            .is_clean());
                        prop_assert_eq!(m.phase(), before);
                    }
                    Err(MigrateError::Gate(GateRefusal::NotAllowed { .. })) => {
                        prop_assert_eq!(before, Phase::Cleanup)
                    }
                    Err(e) => prop_assert!(false, "advance from {before}: {e}"),
                }
            }
            Op::Rollback => {
                let before = m.phase();
                let reverse = m.state().reverse_outbox;
                match m.rollback(SECS) {
                    Ok(to) => prop_assert_eq!(Some(to), before.previous()),
                    Err(MigrateError::Gate(GateRefusal::NotAllowed { .. })) => prop_assert!(
                        matches!(before, Phase::Off | Phase::Cleanup) || (before == Phase::Phase3 && !reverse),
                        "rollback from {before} refused"
                    ),
                    Err(e) => prop_assert!(false, "rollback from {before}: {e}"),
                }
            }
            Op::Crash => {
                let phase = m.phase();
                drop(m);
                if disk {
                    drop((p, s));
                    (p, s) = stores(&opts);
                }
                m = open(dir.path(), p.clone(), s.clone(), config.clone());
                prop_assert_eq!(m.phase(), phase);
            }
            Op::Backfill => {
                backfill(p.as_ref(), s.as_ref(), &BackfillConfig::default(), &mut |_| {}).unwrap();
            }
            Op::Reverse(on) => {
                let _ = m.set_reverse_outbox(on);
            }
        }
    }
    if std::env::var_os("ERLMCP_TEST_VERBOSE").is_some() {
        eprintln!("model run ended in {}", m.phase());
    }
    // The end: every live session of the model is what the migrator returns, and once
    // drained, dual-writing phases leave the secondary no further behind than a backfill.
    m.drain(SECS).unwrap();
    for k in 0u8..KEYS {
        match (m.get(&key(k)), model.get(&k)) {
            (Ok(s), Some(v)) => prop_assert_eq!(s.metadata.as_ref(), v.as_slice()),
            (Err(StoreError::NotFound { .. }), None) => {}
            (r, v) => prop_assert!(false, "final get {k} in {}: {r:?}, model {v:?}", m.phase()),
        }
    }
    if m.phase().dual_writes() {
        backfill(p.as_ref(), s.as_ref(), &BackfillConfig::default(), &mut |_| {}).unwrap();
        let r = verify(p.as_ref(), s.as_ref(), &VerifyConfig::default()).unwrap();
        prop_assert!(r.is_clean(), "{:?}", r.differences);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn migrator_matches_the_model(ops in prop::collection::vec(op(), 1..120)) {
        run_model(&ops, false)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// The same on disk stores, reopened from their files at each simulated crash.
    #[test]
    fn migrator_matches_the_model_on_disk(ops in prop::collection::vec(op(), 1..80)) {
        run_model(&ops, true)?;
    }
}

// ---------------------------------------------------------------------------------------
// kill -9 during dual writes.

fn child_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("primary.redb"), dir.join("secondary.redb"))
}

fn open_disk(dir: &Path) -> Migrator {
    let (pp, sp) = child_paths(dir);
    let p: Arc<dyn Store> = Arc::new(DiskStore::create(pp, StoreOptions::default()).unwrap());
    let s: Arc<dyn Store> = Arc::new(DiskStore::create(sp, StoreOptions::default()).unwrap());
    open(dir, p, s, fast_backoff())
}

/// The child role of `kill_9_during_dual_writes_loses_nothing`: two writers in phase 1
/// (relay running) that print `B w n op key meta` before and `A w n` after each write.
#[test]
#[ignore = "child process of kill_9_during_dual_writes_loses_nothing"]
fn child_dual_writer() {
    let Ok(dir) = std::env::var("ERLMCP_TEST_CHILD_DUAL") else {
        return;
    };
    let round: u64 = std::env::var("ERLMCP_TEST_ROUND").unwrap().parse().unwrap();
    let m = Arc::new(open_disk(Path::new(&dir)));
    let _relay = m.start_relay();
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (m, out) = (Arc::clone(&m), Arc::clone(&out));
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (round << 8) ^ w;
                for n in 0u64.. {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let key = format!("w{w}-{:02}", x % 20);
                    let meta = format!("r{round}-w{w}-{n}");
                    let del = x % 4 == 0;
                    {
                        let mut o = out.lock().unwrap();
                        writeln!(o, "@@B {w} {n} {} {key} {meta}", if del { "del" } else { "put" }).unwrap();
                        o.flush().unwrap();
                    }
                    if del {
                        m.delete(&id(&key)).unwrap();
                    } else {
                        m.put(sess(&key, &meta)).unwrap();
                    }
                    let mut o = out.lock().unwrap();
                    writeln!(o, "@@A {w} {n}").unwrap();
                    o.flush().unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
}

#[test]
fn kill_9_during_dual_writes_loses_nothing() {
    let rounds = std::env::var("ERLMCP_MIGRATE_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3u64);
    let dir = tempfile::tempdir().unwrap();
    {
        let m = open_disk(dir.path());
        m.advance(SECS).unwrap();
    }
    // Expected live state per key: Some(meta) or None (deleted / never written).
    let mut expected: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut total_acked = 0;
    for round in 0..rounds {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_dual_writer",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("ERLMCP_TEST_CHILD_DUAL", dir.path())
            .env("ERLMCP_TEST_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let reader = {
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    seen.lock().unwrap().push(line);
                }
            })
        };
        // Kill once the child has acknowledged a few writes (how many varies by round),
        // plus a moment, so that the kill lands among writes in flight.
        let want_acks = 5 + (round * 7919) % 40;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let acks = seen.lock().unwrap().iter().filter(|l| l.contains("@@A ")).count() as u64;
            if acks >= want_acks || child.try_wait().unwrap().is_some() || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_micros((round * 104_729) % 20_000));
        let _ = child.kill(); // SIGKILL (a child that already died is caught below)
        child.wait().unwrap();
        reader.join().unwrap();
        let lines = std::mem::take(&mut *seen.lock().unwrap());
        // Per writer: the begun ops, and which were acknowledged.
        let mut begun: BTreeMap<(String, String), (String, String, String)> = BTreeMap::new();
        let mut unacked: BTreeMap<String, (String, String, String)> = BTreeMap::new();
        for line in &lines {
            // The test harness may print on the same line before the first marker.
            let Some(at) = line.find("@@") else { continue };
            let f: Vec<&str> = line[at + 2..].split(' ').collect();
            match f.as_slice() {
                ["B", w, n, op, key, meta] => {
                    begun.insert(
                        (w.to_string(), n.to_string()),
                        (op.to_string(), key.to_string(), meta.to_string()),
                    );
                    unacked.insert(w.to_string(), (op.to_string(), key.to_string(), meta.to_string()));
                }
                ["A", w, n] => {
                    let (op, key, meta) = begun[&(w.to_string(), n.to_string())].clone();
                    expected.insert(key, (op == "put").then_some(meta));
                    unacked.remove(*w);
                    total_acked += 1;
                }
                _ => {} // a line cut by the kill, or the test harness's own output
            }
        }
        let m = open_disk(dir.path());
        m.drain(SECS).unwrap();
        for (key, want) in expected.clone() {
            let got = match m.primary().get(&id(&key)) {
                Ok(s) => Some(String::from_utf8(s.metadata.to_vec()).unwrap()),
                Err(StoreError::NotFound { .. }) => None,
                Err(e) => panic!("{key}: {e}"),
            };
            if got == want {
                continue;
            }
            // Only a write that was begun and not acknowledged may have changed the key.
            let in_flight = unacked.values().find(|(_, k, _)| *k == key);
            let allowed = in_flight.map(|(op, _, meta)| (op == "put").then(|| meta.clone()));
            assert_eq!(Some(got.clone()), allowed, "round {round} key {key}: want {want:?}");
            expected.insert(key, got);
        }
        for (_, key, meta) in unacked.values() {
            // Settle keys touched only by an unacknowledged write.
            let got = m
                .primary()
                .get(&id(key))
                .ok()
                .map(|s| String::from_utf8(s.metadata.to_vec()).unwrap());
            let _ = meta;
            expected.insert(key.clone(), got);
        }
        let report = verify(m.primary().as_ref(), m.secondary().as_ref(), &VerifyConfig::default()).unwrap();
        assert!(report.is_clean(), "round {round}: {:?}", report.differences);
        assert_eq!(report.source_root, report.target_root);
        // No resurrected deletes on the secondary either: it equals the primary record for record.
        assert_eq!(contents(m.primary().as_ref()), contents(m.secondary().as_ref()));
    }
    assert!(total_acked >= 5 * rounds, "too few writes acknowledged: {total_acked}");
    if std::env::var_os("ERLMCP_TEST_VERBOSE").is_some() {
        eprintln!("{rounds} kills, {total_acked} acknowledged writes checked");
    }
}

#[test]
fn an_in_memory_outbox_relays_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    let (p, s) = (memory(), memory());
    let m = Arc::new(
        Migrator::open(
            p.clone(),
            s.clone(),
            Outbox::in_memory(),
            Box::new(FilePhaseStore::new(dir.path().join("phase.json"))),
            MigratorConfig::default(),
        )
        .unwrap(),
    );
    m.advance(SECS).unwrap();
    let relay = m.start_relay();
    for i in 0..200 {
        m.put(sess(&format!("k{}", i % 50), &i.to_string())).unwrap();
        if i % 3 == 0 {
            m.delete(&id(format!("k{}", i % 7))).unwrap();
        }
    }
    m.drain(SECS).unwrap();
    relay.stop();
    assert_eq!(m.outbox_depth().unwrap(), 0);
    assert!(verify(p.as_ref(), s.as_ref(), &VerifyConfig::default())
        .unwrap()
        .is_clean());
    assert_eq!(m.advance(SECS).unwrap(), Phase::Phase2);
}

#[test]
fn a_phase_saved_elsewhere_is_applied_after_draining() {
    let dir = tempfile::tempdir().unwrap();
    let p = memory();
    let faulty = Faulty::new(memory());
    let m = open(dir.path(), p.clone(), faulty.clone(), fast_backoff());
    m.advance(SECS).unwrap();
    m.put(sess("a", "1")).unwrap();
    // Another process (the CLI) forces phase3 in the shared phase file.
    let file = FilePhaseStore::new(dir.path().join("phase.json"));
    let mut saved = file.load().unwrap().unwrap();
    saved.record(Phase::Phase3, T0, "set");
    file.save(&saved).unwrap();
    // This node still has an intent for "a": the switch waits for it.
    faulty.set_outage(true);
    let err = m.sync_phase(Duration::from_millis(100)).unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot move from phase1 to phase3: the outbox still holds 1"),
        "{err}"
    );
    assert_eq!(m.phase(), Phase::Phase1);
    faulty.set_outage(false);
    assert_eq!(m.sync_phase(SECS).unwrap(), Phase::Phase3);
    assert_eq!(m.counters().unwrap().phase, Phase::Phase3);
    // Phase 3: reads and writes go to the secondary, which has "a".
    assert_eq!(m.get(&id("a")).unwrap().metadata.as_ref(), b"1");
    m.put(sess("b", "2")).unwrap();
    assert!(p.get(&id("b")).is_err());
    // Nothing changed: nothing to do.
    assert_eq!(m.sync_phase(SECS).unwrap(), Phase::Phase3);
}
