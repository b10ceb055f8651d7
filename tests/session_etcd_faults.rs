//! etcd member failures under load: SIGKILL of the leader while writers run loses no
//! acknowledged write, and a restarted member catches up. The cluster is this test's own.
//!
//! Prints the longest stall a writer saw (from a call's start to its acknowledgement,
//! retries included); run with `--nocapture` to see it. `ERLMCP_ETCD_KILL_ROUNDS=N`
//! (default 1, ~10 s per round) repeats the leader kill N times.

#![cfg(feature = "etcd")]

#[path = "session_support/etcd_cluster.rs"]
mod etcd_cluster;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use erlmcp_rollout::session::{EtcdOptions, EtcdStore, Session, SessionId, Store, StoreError, StoreOptions, Timeout};

const WRITERS: usize = 6;

struct WriterLog {
    /// key -> metadata of its last acknowledged put.
    acked: Vec<(SessionId, Vec<u8>)>,
    longest_stall: Duration,
    unavailable: usize,
}

fn writer(store: Arc<EtcdStore>, t: usize, stop: Arc<AtomicBool>) -> WriterLog {
    let mut log = WriterLog {
        acked: Vec::new(),
        longest_stall: Duration::ZERO,
        unavailable: 0,
    };
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // New keys and rewrites of older ones.
        let key = SessionId::new(format!("w{t}-{}", n % 200)).unwrap();
        let meta = n.to_be_bytes().to_vec();
        let started = Instant::now();
        loop {
            let now = store.options().clock.now_unix_ms();
            match store.put(Session::new(key.clone(), now, Timeout::Infinity, meta.clone())) {
                Ok(_) => break,
                Err(e @ StoreError::Unavailable { .. }) => {
                    log.unavailable += 1;
                    assert!(started.elapsed() < Duration::from_secs(60), "writer {t} stuck: {e}");
                }
                Err(e) => panic!("writer {t}: {e}"),
            }
        }
        log.longest_stall = log.longest_stall.max(started.elapsed());
        match log.acked.iter_mut().find(|(k, _)| k == &key) {
            Some(entry) => entry.1 = meta,
            None => log.acked.push((key, meta)),
        }
        n += 1;
    }
    log
}

/// A counter incremented by compare-and-set: each acknowledged increment must be in the
/// final value; increments whose outcome was unknown (Unavailable) may or may not be.
fn counter(store: Arc<EtcdStore>, stop: Arc<AtomicBool>) -> (u64, u64) {
    let key = SessionId::new("counter").unwrap();
    let (mut acked, mut unknown) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let cur = match store.get(&key) {
            Ok(s) => s,
            Err(StoreError::Unavailable { .. }) => continue,
            Err(e) => panic!("counter get: {e}"),
        };
        let n = u64::from_be_bytes(cur.metadata.as_ref().try_into().unwrap());
        let next = Session::new(
            key.clone(),
            cur.created_at,
            Timeout::Infinity,
            (n + 1).to_be_bytes().to_vec(),
        );
        match store.update_if_version(next, cur.version) {
            Ok(_) => acked += 1,
            Err(StoreError::Unavailable { .. }) => unknown += 1,
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => panic!("counter update: {e}"),
        }
    }
    (acked, unknown)
}

#[test]
fn killing_the_leader_during_writes_loses_no_acknowledged_write_and_a_restarted_member_catches_up() {
    let mut cluster = etcd_cluster::Cluster::start();
    let prefix = "faults/";
    let store = Arc::new(
        EtcdStore::connect(
            &cluster.endpoints(),
            prefix,
            EtcdOptions::default(),
            StoreOptions::default(),
        )
        .unwrap(),
    );
    store
        .create(Session::new(
            SessionId::new("counter").unwrap(),
            0,
            Timeout::Infinity,
            0u64.to_be_bytes().to_vec(),
        ))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
            std::thread::spawn(move || writer(store, t, stop))
        })
        .collect();
    let counter_thread = {
        let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
        std::thread::spawn(move || counter(store, stop))
    };
    // ERLMCP_ETCD_KILL_ROUNDS=N (default 1): kill the leader N times, restarting the
    // killed member between rounds while the writers keep going.
    let rounds: usize = std::env::var("ERLMCP_ETCD_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let mut killed = Vec::new();
    let mut killed_at = Instant::now();
    for round in 0..rounds {
        std::thread::sleep(Duration::from_millis(1_500));
        let leader = (0..50)
            .find_map(|_| {
                cluster.leader().or_else(|| {
                    std::thread::sleep(Duration::from_millis(100));
                    None
                })
            })
            .expect("a leader within 5 s");
        cluster.kill(leader);
        killed_at = Instant::now();
        killed.push(leader + 1);
        std::thread::sleep(Duration::from_secs(4));
        if round + 1 < rounds {
            cluster.restart(leader);
            cluster.wait_healthy(Duration::from_secs(30));
        }
    }
    let leader = killed[killed.len() - 1] - 1;
    stop.store(true, Ordering::Relaxed);
    let logs: Vec<WriterLog> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    let (acked_increments, unknown_increments) = counter_thread.join().unwrap();

    // Every acknowledged write is there, read back through the surviving members.
    let mut keys = 0;
    for log in &logs {
        for (key, meta) in &log.acked {
            let got = store.get(key).unwrap();
            assert_eq!(
                got.metadata.as_ref(),
                meta.as_slice(),
                "{key}: last acknowledged put lost"
            );
            keys += 1;
        }
    }
    let n = u64::from_be_bytes(
        store
            .get(&SessionId::new("counter").unwrap())
            .unwrap()
            .metadata
            .as_ref()
            .try_into()
            .unwrap(),
    );
    assert!(
        (acked_increments..=acked_increments + unknown_increments).contains(&n),
        "counter {n}: {acked_increments} acknowledged, {unknown_increments} unknown"
    );
    let stall = logs.iter().map(|l| l.longest_stall).max().unwrap();
    let unavailable: usize = logs.iter().map(|l| l.unavailable).sum();
    let writes: usize = logs.iter().map(|l| l.acked.len()).sum();
    eprintln!(
        "{rounds} round(s), leaders killed {killed:?}, the last {:?} before the writers stopped: {keys} keys \
         verified ({writes} distinct), counter {n} ({acked_increments} acked, {unknown_increments} unknown), \
         longest stall {stall:?}, {unavailable} Unavailable answers retried",
        killed_at.elapsed()
    );

    // The killed member restarts on its data and catches up with what it missed.
    cluster.restart(leader);
    cluster.wait_healthy(Duration::from_secs(30));
    let expected = keys as u64 + 1; // + the counter
    let deadline = Instant::now() + Duration::from_secs(30);
    for member in 0..3 {
        loop {
            let seen = cluster.member_count(member, prefix);
            if seen == Some(expected) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "member n{} sees {seen:?} keys, expected {expected}",
                member + 1
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
