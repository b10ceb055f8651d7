//! Group commit in `DiskStore`: concurrent writers share durable log appends (one
//! fdatasync per group), compare-and-set stays exact, every operation gets its own
//! result, and a failed commit acknowledges nothing. Started writes (`Store::start`)
//! join the same groups, alone or with waiting writers, are answered once durable, and
//! are committed before a dropped store closes.

#![cfg(feature = "disk")]

#[path = "session_support/sim_disk.rs"]
mod sim_disk;

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use erlmcp_rollout::session::{
    DiskOptions, DiskStore, ManualClock, Session, SessionId, Store, StoreError, StoreOptions, Timeout, Unstarted,
    WriteOp, Written,
};
use sim_disk::SimMachine;

const T0: i64 = 1_700_000_000_000;

fn opts() -> StoreOptions {
    StoreOptions::with_clock(ManualClock::new(T0))
}

fn id(s: &str) -> SessionId {
    SessionId::new(s).unwrap()
}

fn file_store() -> (tempfile::TempDir, Arc<DiskStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::create(dir.path().join("s.redb"), opts()).unwrap();
    (dir, Arc::new(store))
}

/// Many threads compare-and-set the same keys: for each key, no expected version is
/// ever won twice, the winners form the chain 1, 2, 3, ... and the final version counts
/// them; each winner's metadata is what is stored at its version.
#[test]
fn compare_and_set_has_one_winner_per_version() {
    const THREADS: usize = 16;
    const KEYS: usize = 3;
    const ROUNDS: usize = 40;
    let (_dir, store) = file_store();
    for k in 0..KEYS {
        store
            .create(Session::new(
                id(&format!("k{k}")),
                T0,
                Timeout::Infinity,
                b"t-1".to_vec(),
            ))
            .unwrap();
    }
    let wins: Arc<Mutex<Vec<(usize, u64, String)>>> = Arc::default();
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, wins, barrier) = (Arc::clone(&store), Arc::clone(&wins), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                let mut conflicts = 0;
                for r in 0..ROUNDS {
                    let k = (t + r) % KEYS;
                    let key = id(&format!("k{k}"));
                    let seen = store.get(&key).unwrap().version;
                    let meta = format!("t{t}-r{r}");
                    let new = Session::new(key, T0, Timeout::Infinity, meta.clone().into_bytes());
                    match store.update_if_version(new, seen) {
                        Ok(stored) => {
                            assert_eq!(stored.version, seen + 1);
                            wins.lock().unwrap().push((k, seen, meta));
                        }
                        Err(StoreError::Conflict { expected, actual, .. }) => {
                            assert_eq!(expected, seen);
                            assert!(actual > seen, "a conflict reports a newer version: {actual} vs {seen}");
                            conflicts += 1;
                        }
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
                conflicts
            })
        })
        .collect();
    let conflicts: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let wins = wins.lock().unwrap();
    assert_eq!(wins.len() + conflicts, THREADS * ROUNDS);
    let mut per_key: BTreeMap<usize, BTreeMap<u64, String>> = BTreeMap::new();
    for (k, expected, meta) in wins.iter() {
        let previous = per_key.entry(*k).or_default().insert(*expected, meta.clone());
        assert!(
            previous.is_none(),
            "key k{k}: two writers won expected version {expected}"
        );
    }
    for k in 0..KEYS {
        let won = per_key.remove(&k).unwrap_or_default();
        let stored = store.get(&id(&format!("k{k}"))).unwrap();
        assert_eq!(stored.version, 1 + won.len() as u64, "key k{k}: one version per win");
        let expected: Vec<u64> = (1..stored.version).collect();
        assert_eq!(
            won.keys().copied().collect::<Vec<_>>(),
            expected,
            "key k{k}: a chain of wins"
        );
        if let Some(last) = won.get(&(stored.version - 1)) {
            assert_eq!(
                stored.metadata.as_ref(),
                last.as_bytes(),
                "key k{k}: the last winner is stored"
            );
        }
    }
}

/// Concurrent creates of the same keys: exactly one wins each key, the others get
/// `AlreadyExists` (decided after the winner's write, possibly in the same commit).
#[test]
fn concurrent_creates_have_one_winner_per_key() {
    const THREADS: usize = 12;
    const KEYS: usize = 30;
    let (_dir, store) = file_store();
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                let mut won = Vec::new();
                for k in 0..KEYS {
                    let s = Session::new(
                        id(&format!("c{k}")),
                        T0,
                        Timeout::Infinity,
                        format!("t{t}").into_bytes(),
                    );
                    match store.create(s) {
                        Ok(s) => {
                            assert_eq!(s.version, 1);
                            won.push((k, t));
                        }
                        Err(StoreError::AlreadyExists { .. }) => {}
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
                won
            })
        })
        .collect();
    let mut winners: BTreeMap<usize, usize> = BTreeMap::new();
    for h in handles {
        for (k, t) in h.join().unwrap() {
            assert!(winners.insert(k, t).is_none(), "key c{k} created twice");
        }
    }
    assert_eq!(winners.len(), KEYS);
    for (k, t) in winners {
        let stored = store.get(&id(&format!("c{k}"))).unwrap();
        assert_eq!(stored.metadata.as_ref(), format!("t{t}").as_bytes());
    }
}

/// With a slow log disk (2 ms per fsync) and 16 writers, log appends are shared: fewer
/// log syncs than writes, and every acknowledged write is there with its own version.
#[test]
fn concurrent_writers_share_commits() {
    const THREADS: usize = 16;
    const WRITES: usize = 25;
    let machine = SimMachine::default();
    let store = Arc::new(machine.open(opts(), DiskOptions::default()).unwrap());
    for log in &machine.logs {
        log.sync_delay(Duration::from_millis(2));
    }
    let before = machine.log_syncs();
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                for w in 0..WRITES {
                    let s = Session::new(id(&format!("t{t}")), T0, Timeout::Infinity, format!("{w}").into_bytes());
                    assert_eq!(store.put(s).unwrap().version, w as u64 + 1);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let syncs = machine.log_syncs() - before;
    let writes = (THREADS * WRITES) as u64;
    println!("{writes} writes in {syncs} log fsyncs");
    assert!(
        syncs < writes,
        "{writes} writes took {syncs} fsyncs: no commit was shared"
    );
    for t in 0..THREADS {
        let s = store.get(&id(&format!("t{t}"))).unwrap();
        assert_eq!(
            (s.version, s.metadata.as_ref()),
            (WRITES as u64, format!("{}", WRITES - 1).as_bytes())
        );
    }
}

/// Operations in one commit do not affect each other: a batch that fails part-way
/// (a corrupt record after one it already staged) writes nothing, and the others in
/// flight still succeed.
#[test]
fn a_failing_operation_leaves_no_partial_effect() {
    use redb::{Database, TableDefinition};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn
                .open_table(TableDefinition::<&[u8], &[u8]>::new("sessions"))
                .unwrap();
            table.insert(&b"bad"[..], &b"\x01garbage"[..]).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = Arc::new(DiskStore::create(&path, opts()).unwrap());
    let record = |key: &str| Session {
        version: 5,
        ..Session::new(id(key), T0, Timeout::Infinity, vec![])
    };
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                for r in 0..10 {
                    if t % 2 == 0 {
                        let batch = vec![record(&format!("staged-{t}-{r}")), record("bad")];
                        let e = store.apply_batch_if_newer(batch).unwrap_err();
                        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
                    } else {
                        let s = Session::new(id(&format!("ok-{t}-{r}")), T0, Timeout::Infinity, vec![]);
                        store.create(s).unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    for t in 0..8 {
        for r in 0..10 {
            let staged = store.get(&id(&format!("staged-{t}-{r}")));
            assert!(
                matches!(staged, Err(StoreError::NotFound { .. })),
                "staged-{t}-{r}: {staged:?}"
            );
            if t % 2 == 1 {
                assert!(store.get(&id(&format!("ok-{t}-{r}"))).is_ok());
            }
        }
    }
}

/// When the commit fails (log fsync error), every write in it is `Unavailable` and none
/// is acknowledged; writes acknowledged before are still there after reopening.
#[test]
fn a_failed_commit_acknowledges_nothing() {
    const THREADS: usize = 8;
    let machine = SimMachine::default();
    let store = Arc::new(machine.open(opts(), DiskOptions::default()).unwrap());
    for log in &machine.logs {
        log.sync_delay(Duration::from_millis(1));
    }
    let acked: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(THREADS + 1));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, acked, failing, barrier) = (
                Arc::clone(&store),
                Arc::clone(&acked),
                Arc::clone(&failing),
                Arc::clone(&barrier),
            );
            std::thread::spawn(move || {
                barrier.wait();
                let mut unavailable_after_failure = 0;
                for w in 0..200 {
                    let key = format!("t{t}-{}", w % 7);
                    let started_failing = failing.load(std::sync::atomic::Ordering::SeqCst);
                    let s = Session::new(id(&key), T0, Timeout::Infinity, vec![w as u8]);
                    match store.put(s) {
                        Ok(s) => {
                            assert!(!started_failing, "{key}: acknowledged while every fsync fails");
                            acked.lock().unwrap().insert(key, s.version);
                        }
                        Err(e) => {
                            assert!(e.is_retryable(), "{key}: {e}");
                            assert!(e.to_string().contains("nothing in it is acknowledged"), "{e}");
                            if started_failing {
                                unavailable_after_failure += 1;
                            }
                        }
                    }
                }
                unavailable_after_failure
            })
        })
        .collect();
    barrier.wait();
    std::thread::sleep(Duration::from_millis(30));
    for log in &machine.logs {
        log.fail_sync(true);
    }
    failing.store(true, std::sync::atomic::Ordering::SeqCst);
    let refused: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(refused > 0, "no write ran after the failure");
    drop(store);
    for log in &machine.logs {
        log.fail_sync(false);
    }
    let images = machine.power_cut(None);
    let reopened = SimMachine::from_images(images)
        .open(opts(), DiskOptions::default())
        .unwrap();
    for (key, version) in acked.lock().unwrap().iter() {
        let s = reopened.get(&id(key)).unwrap();
        assert!(
            s.version >= *version,
            "{key}: acknowledged v{version}, found v{}",
            s.version
        );
    }
}

/// A clock that panics on demand (user code running inside the leader's commit).
struct PanickyClock(Arc<std::sync::atomic::AtomicBool>);

impl erlmcp_rollout::session::Clock for PanickyClock {
    fn now_unix_ms(&self) -> i64 {
        if self.0.load(std::sync::atomic::Ordering::SeqCst) {
            panic!("clock failure (injected)");
        }
        T0
    }
}

/// A panic inside the commit (here: the store's clock, called by the leader) reaches no
/// caller as a panic: every writer in that commit gets `Unavailable`, nothing of it is
/// stored, and the next commits work (leadership was released).
#[test]
fn a_panic_in_the_commit_is_unavailable_and_the_store_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let panicking = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let store = Arc::new(
        DiskStore::create(
            dir.path().join("s.redb"),
            StoreOptions::with_clock(PanickyClock(Arc::clone(&panicking))),
        )
        .unwrap(),
    );
    panicking.store(true, std::sync::atomic::Ordering::SeqCst);
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || store.put(Session::new(id(&format!("p{t}")), T0, Timeout::Infinity, vec![])))
        })
        .collect();
    for h in handles {
        let e = h.join().expect("no panic reaches a writer").unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert!(e.to_string().contains("panic"), "{e}");
    }
    panicking.store(false, std::sync::atomic::Ordering::SeqCst);
    for t in 0..4 {
        assert!(matches!(
            store.get(&id(&format!("p{t}"))),
            Err(StoreError::NotFound { .. })
        ));
        let s = store
            .put(Session::new(id(&format!("p{t}")), T0, Timeout::Infinity, vec![]))
            .unwrap();
        assert_eq!(s.version, 1);
    }
}

/// Started writes only, from one thread that never blocks: 8 keys x 50 puts, all
/// started before any answer is awaited. Every answer is the put's own result (versions
/// 1..=50 per key, in start order), groups are shared, and everything answered `Ok` is
/// durable: it survives a power cut right after the last answer.
#[test]
fn started_writes_are_answered_once_durable_and_share_commits() {
    const KEYS: usize = 8;
    const PUTS: u64 = 50;
    let machine = SimMachine::default();
    let store = machine.open(opts(), DiskOptions::default()).unwrap();
    for log in &machine.logs {
        log.sync_delay(Duration::from_millis(1));
    }
    let before = machine.log_syncs();
    let (tx, rx) = std::sync::mpsc::channel();
    for w in 0..PUTS {
        for k in 0..KEYS {
            let s = Session::new(id(&format!("k{k}")), T0, Timeout::Infinity, format!("{w}").into_bytes());
            let tx = tx.clone();
            let started = store.start(WriteOp::Put(s), Box::new(move |r| tx.send((k, w, r)).unwrap()));
            assert!(started.is_ok());
        }
    }
    drop(tx);
    let answers: Vec<_> = rx.iter().take(KEYS * PUTS as usize).collect();
    let syncs = machine.log_syncs() - before;
    assert_eq!(answers.len(), KEYS * PUTS as usize);
    for (k, w, r) in &answers {
        match r {
            Ok(Written::Session(s)) => {
                assert_eq!(
                    (s.version, s.metadata.as_ref()),
                    (w + 1, format!("{w}").as_bytes()),
                    "k{k}"
                )
            }
            other => panic!("k{k} put {w}: {other:?}"),
        }
    }
    assert!(
        syncs < (KEYS as u64 * PUTS) / 4,
        "{} started writes took {syncs} fsyncs",
        KEYS as u64 * PUTS
    );
    let reopened = SimMachine::from_images(machine.power_cut(None))
        .open(opts(), DiskOptions::default())
        .unwrap();
    for k in 0..KEYS {
        assert_eq!(reopened.get(&id(&format!("k{k}"))).unwrap().version, PUTS);
    }
    drop(store);
}

/// Started and waiting writers on the same keys: waiting writers lead groups that hold
/// started writes and the commit thread leads groups that hold waiting ones; every key's
/// versions form one chain (each version answered exactly once, to whichever kind wrote
/// it), and creates, compare-and-set and deletes answer as their waiting calls would.
#[test]
fn started_and_waiting_writes_mix_in_one_chain() {
    const THREADS: usize = 4;
    const WRITES: usize = 200;
    let (_dir, store) = file_store();
    let (tx, rx) = std::sync::mpsc::channel();
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, tx) = (Arc::clone(&store), tx.clone());
            std::thread::spawn(move || {
                let mut waited = Vec::new();
                for w in 0..WRITES {
                    let s = Session::new(id(&format!("k{}", w % 3)), T0, Timeout::Infinity, vec![t as u8]);
                    if (w + t) % 2 == 0 {
                        let s = store.put(s).unwrap();
                        waited.push((s.id, s.version));
                    } else {
                        let tx = tx.clone();
                        store
                            .start(WriteOp::Put(s), Box::new(move |r| tx.send(r).unwrap()))
                            .unwrap();
                    }
                }
                waited
            })
        })
        .collect();
    drop(tx);
    let mut versions: BTreeMap<SessionId, Vec<u64>> = BTreeMap::new();
    for h in handles {
        for (key, v) in h.join().unwrap() {
            versions.entry(key).or_default().push(v);
        }
    }
    let started: Vec<_> = rx.iter().collect();
    assert_eq!(started.len(), THREADS * WRITES / 2);
    for r in started {
        let Ok(Written::Session(s)) = r else { panic!("{r:?}") };
        versions.entry(s.id).or_default().push(s.version);
    }
    // Started and waited answers together: each key's chain is 1..=n, each version
    // answered once, n the stored version.
    assert_eq!(versions.len(), 3);
    for (key, mut vs) in versions {
        vs.sort_unstable();
        let n = store.get(&key).unwrap().version;
        assert_eq!(vs, (1..=n).collect::<Vec<_>>(), "{key:?}");
    }
    // The other writing calls.
    let (tx, rx) = std::sync::mpsc::channel();
    let ask = |op: WriteOp| {
        let tx = tx.clone();
        store.start(op, Box::new(move |r| tx.send(r).unwrap())).unwrap();
        rx.recv().unwrap()
    };
    let fresh = Session::new(id("new"), T0, Timeout::Infinity, vec![]);
    let Ok(Written::Session(created)) = ask(WriteOp::Create(fresh.clone())) else {
        panic!()
    };
    assert_eq!(created.version, 1);
    assert!(matches!(
        ask(WriteOp::Create(fresh.clone())),
        Err(StoreError::AlreadyExists { .. })
    ));
    assert!(matches!(
        ask(WriteOp::UpdateIfVersion(fresh.clone(), 7)),
        Err(StoreError::Conflict {
            expected: 7,
            actual: 1,
            ..
        })
    ));
    assert_eq!(
        ask(WriteOp::UpdateIfVersion(fresh, 1)).unwrap(),
        Written::Session(store.get(&id("new")).unwrap())
    );
    assert_eq!(ask(WriteOp::Delete(id("new"))).unwrap(), Written::Deleted(true));
    assert_eq!(ask(WriteOp::Delete(id("new"))).unwrap(), Written::Deleted(false));
}

/// Invalid input is not started: the op and its callback come back unrun, and the
/// caller's own run reports the error. A store dropped with started writes still queued
/// commits and answers them before it closes; a panicking callback loses only its own
/// answer.
#[test]
fn unstarted_invalid_writes_and_started_writes_at_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = DiskStore::create(&path, opts()).unwrap();
    let big = Session::new(
        id("big"),
        T0,
        Timeout::Infinity,
        vec![0; erlmcp_rollout::session::MAX_METADATA_LEN + 1],
    );
    let called = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&called);
    let Err(Unstarted { op, .. }) = store.start(
        WriteOp::Put(big),
        Box::new(move |_| flag.store(true, std::sync::atomic::Ordering::SeqCst)),
    ) else {
        panic!("an oversized put was started")
    };
    assert!(matches!(op.run(&store), Err(StoreError::Invalid { .. })));
    assert!(!called.load(std::sync::atomic::Ordering::SeqCst));
    let (tx, rx) = std::sync::mpsc::channel();
    store
        .start(
            WriteOp::Put(Session::new(id("p"), T0, Timeout::Infinity, vec![])),
            Box::new(|_| panic!("a callback that panics (injected)")),
        )
        .unwrap();
    for i in 0..100 {
        let tx = tx.clone();
        let s = Session::new(id(&format!("c{i}")), T0, Timeout::Infinity, vec![]);
        store
            .start(WriteOp::Put(s), Box::new(move |r| tx.send(r).unwrap()))
            .unwrap();
    }
    drop(tx);
    drop(store);
    let answers: Vec<_> = rx.iter().collect();
    assert_eq!(answers.len(), 100);
    assert!(answers
        .iter()
        .all(|r| matches!(r, Ok(Written::Session(s)) if s.version == 1)));
    let store = DiskStore::create(&path, opts()).unwrap();
    for i in 0..100 {
        assert_eq!(store.get(&id(&format!("c{i}"))).unwrap().version, 1);
    }
    assert_eq!(store.get(&id("p")).unwrap().version, 1);
}

/// A started write's callback that holds the last handle to the store: the store closes
/// on its own commit thread, cleanly (it cannot join that thread; it checkpoints on close
/// as usual), and the write is kept.
#[test]
fn a_callback_may_drop_the_last_handle() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = Arc::new(DiskStore::create(&path, opts()).unwrap());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let last = Arc::clone(&store);
    let s = Session::new(id("kept"), T0, Timeout::Infinity, b"v".to_vec());
    store
        .start(
            WriteOp::Put(s),
            Box::new(move |r| {
                ready_rx.recv().unwrap();
                let ok = r.is_ok();
                drop(last); // the last handle: the store closes here, on its commit thread
                done_tx.send(ok).unwrap();
            }),
        )
        .unwrap();
    drop(store);
    ready_tx.send(()).unwrap();
    // A panic in the close (a thread joining itself) would drop `done_tx` unsent.
    assert_eq!(done_rx.recv(), Ok(true));
    // Closed with a checkpoint: redb alone holds the write. (The commit thread releases
    // the files a moment after the callback returns: retry the open until it has.)
    for log in DiskStore::log_paths(&path) {
        std::fs::remove_file(log).unwrap();
    }
    let reopened = (0..500)
        .find_map(|_| {
            DiskStore::create(&path, opts()).ok().or_else(|| {
                std::thread::sleep(Duration::from_millis(10));
                None
            })
        })
        .expect("the store's files were never released");
    assert_eq!(reopened.get(&id("kept")).unwrap().metadata.as_ref(), b"v");
}
