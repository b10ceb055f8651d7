//! The etcd session store against raw `etcd-client` calls doing the equivalent etcd
//! operation, in the same run, on a 3-member cluster the bench starts itself (loopback):
//! - `etcd_store/get` vs `etcd_raw/get`: one linearizable range read of one key;
//! - `etcd_store/touch` (default policy: not written) vs `etcd_raw/get`;
//! - `etcd_store/put` vs `etcd_raw/put`: replacing one session; the raw side sends the
//!   same guarded txn a careful hand-written client would (`mod_revision ==` the one it
//!   last wrote, put with a lease, read back on failure), the store adds versioning,
//!   encoding and its retry bookkeeping.
//!
//! - `etcd_store/apply_batch_64`: migration's write-if-newer, 64 new records per call
//!   (no raw counterpart; records per second = 64 / time);
//! - `*_16_threads/put`: the same puts from 16 threads at once (each thread its own keys),
//!   where etcd batches concurrent proposals into one Raft round.
//!
//! 1 000 sessions (40-byte ids, 64-byte metadata), visited in a fixed scattered order.

#![allow(missing_docs)] // criterion_group! generates undocumented items

#[path = "support/workload.rs"]
#[allow(dead_code)]
// the shared workload; the disk floor (`bare_append`) and the harness-less benches' helpers are not used here
mod workload;

use workload::{ids, order, session};

#[path = "../tests/session_support/etcd_cluster.rs"]
mod etcd_cluster;

use std::hint::black_box;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use erlmcp_rollout::session::{codec, EtcdOptions, EtcdStore, Session, SessionId, Store, StoreOptions};
use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};

const N: usize = 1_000;

fn bench(c: &mut Criterion) {
    let cluster = etcd_cluster::Cluster::start();
    let endpoints = cluster.endpoints();
    let ids = ids(N);
    let order = order(N);
    let store = EtcdStore::connect(
        &endpoints,
        "bench/store/",
        EtcdOptions::default(),
        StoreOptions::default(),
    )
    .unwrap();
    for id in &ids {
        store.put(session(id)).unwrap();
    }

    // The raw side: one client on the first member (the store also sends to one member
    // at a time), its own runtime, the same records under another prefix.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(Client::connect([endpoints[0].as_str()], None)).unwrap();
    let mut kv = client.kv_client();
    let mut lease = client.lease_client();
    let lease_id = rt.block_on(lease.grant(7_200, None)).unwrap().id();
    let raw_key = |id: &SessionId| [b"bench/raw/".as_slice(), id.as_bytes()].concat();
    let mut raw_revs = vec![0i64; N];
    for (i, id) in ids.iter().enumerate() {
        let value = codec::encode(&session(id)).unwrap();
        let resp = rt
            .block_on(kv.put(raw_key(id), value, Some(PutOptions::new().with_lease(lease_id))))
            .unwrap();
        raw_revs[i] = resp.header().unwrap().revision();
    }

    let mut g = c.benchmark_group("sessions");
    g.measurement_time(Duration::from_secs(8));
    let mut i = 0;
    g.bench_function("etcd_store/get", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            black_box(store.get(&ids[order[i]]).unwrap())
        })
    });
    g.bench_function("etcd_raw/get", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            let resp = rt.block_on(kv.get(raw_key(&ids[order[i]]), None)).unwrap();
            black_box(resp.kvs().len())
        })
    });
    g.bench_function("etcd_store/touch", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            black_box(store.touch(&ids[order[i]]).unwrap())
        })
    });
    g.bench_function("etcd_store/put", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            black_box(store.put(session(&ids[order[i]])).unwrap())
        })
    });
    g.bench_function("etcd_raw/put", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            let k = order[i];
            let key = raw_key(&ids[k]);
            let value = codec::encode(&session(&ids[k])).unwrap();
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, raw_revs[k])])
                .and_then([TxnOp::put(
                    key.clone(),
                    value,
                    Some(PutOptions::new().with_lease(lease_id)),
                )])
                .or_else([TxnOp::get(key, None)]);
            let resp = rt.block_on(kv.txn(txn)).unwrap();
            assert!(resp.succeeded());
            raw_revs[k] = resp.header().unwrap().revision();
        })
    });
    // Migration's write path: batches of 64 new records (new keys, so every one is applied).
    let mut next = 0u64;
    g.bench_function("etcd_store/apply_batch_64", |b| {
        b.iter(|| {
            let batch: Vec<Session> = (0..64)
                .map(|_| {
                    next += 1;
                    let mut s = session(&SessionId::new(format!("batch-{next:012}")).unwrap());
                    s.version = 1;
                    s
                })
                .collect();
            let outcome = store.apply_batch_if_newer(batch).unwrap();
            assert_eq!(outcome.applied, 64);
        })
    });
    g.finish();

    const THREADS: u64 = 16;
    let revs: Vec<AtomicI64> = raw_revs.iter().map(|&r| AtomicI64::new(r)).collect();
    let mut g = c.benchmark_group("sessions_concurrent");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    // Each of THREADS threads does `iters / THREADS` puts on keys t, t + THREADS, ...
    let per_thread = |iters: u64| iters.div_ceil(THREADS).max(1);
    let scaled = |elapsed: Duration, iters: u64| elapsed.mul_f64(iters as f64 / (per_thread(iters) * THREADS) as f64);
    g.bench_function("etcd_store_16_threads/put", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for t in 0..THREADS {
                    let (store, ids) = (&store, &ids);
                    s.spawn(move || {
                        for j in 0..per_thread(iters) {
                            let k = ((t + j * THREADS) % (N as u64 / THREADS * THREADS)) as usize;
                            black_box(store.put(session(&ids[k])).unwrap());
                        }
                    });
                }
            });
            scaled(start.elapsed(), iters)
        })
    });
    g.bench_function("etcd_raw_16_threads/put", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for t in 0..THREADS {
                    let (rt, ids, revs, raw_key) = (&rt, &ids, &revs, &raw_key);
                    let mut kv = kv.clone();
                    s.spawn(move || {
                        for j in 0..per_thread(iters) {
                            let k = ((t + j * THREADS) % (N as u64 / THREADS * THREADS)) as usize;
                            let key = raw_key(&ids[k]);
                            let value = codec::encode(&session(&ids[k])).unwrap();
                            let txn = Txn::new()
                                .when([Compare::mod_revision(
                                    key.clone(),
                                    CompareOp::Equal,
                                    revs[k].load(Ordering::Relaxed),
                                )])
                                .and_then([TxnOp::put(
                                    key.clone(),
                                    value,
                                    Some(PutOptions::new().with_lease(lease_id)),
                                )])
                                .or_else([TxnOp::get(key, None)]);
                            let resp = rt.block_on(kv.txn(txn)).unwrap();
                            assert!(resp.succeeded());
                            revs[k].store(resp.header().unwrap().revision(), Ordering::Relaxed);
                        }
                    });
                }
            });
            scaled(start.elapsed(), iters)
        })
    });
    g.finish();
    drop(store);
    drop(cluster);
}

criterion_group!(benches, bench);
criterion_main!(benches);
