//! Migration benchmarks, each with a same-run baseline:
//! - `backfill/memory_to_disk/chunk_N`: `backfill` of 100 000 sessions (40-byte ids,
//!   64-byte metadata) from a `MemoryStore` into a fresh `DiskStore`, checkpoint file
//!   included (one durable checkpoint per chunk), counting pass included; baseline
//!   `backfill/baseline_apply_batch/chunk_N`: the same records, pre-built, written with
//!   `apply_batch_if_newer` in chunks of the same size (no scan, no checkpoint).
//! - `dual_write/{memory,disk}/{store_put,migrator_put}`: one put, straight into the store
//!   vs through the phase-1 `Migrator` (durable outbox intent + the same store put; the
//!   relay thread copies to a `MemoryStore` secondary meanwhile). `..._4threads`: four
//!   writers at once, time per put (outbox intents share commits). The memory migrator
//!   uses `Outbox::in_memory` (its primary does not survive a crash either);
//!   `memory_durable_outbox` and `disk` use the durable outbox file.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use erlmcp_rollout::migrate::backfill::{backfill, BackfillConfig};
use erlmcp_rollout::migrate::dual::{Migrator, MigratorConfig};
use erlmcp_rollout::migrate::outbox::Outbox;
use erlmcp_rollout::migrate::phase::FilePhaseStore;
use erlmcp_rollout::session::{DiskStore, MemoryStore, Session, SessionId, Store, StoreOptions, Timeout};

const N: usize = 100_000;
const T0: i64 = 1_700_000_000_000;

fn record(i: usize) -> Session {
    let id = SessionId::new(format!(
        "session-{:032x}",
        (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    ))
    .unwrap();
    let mut s = Session::new(id, T0, Timeout::Infinity, vec![7u8; 64]);
    s.version = 1;
    s
}

fn bench_backfill(c: &mut Criterion) {
    let source = MemoryStore::new(StoreOptions::default());
    let records: Vec<Session> = (0..N).map(record).collect();
    source.apply_batch_if_newer(records.clone()).unwrap();
    let mut g = c.benchmark_group("backfill");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Elements(N as u64));
    for chunk in [1_000usize, 10_000] {
        g.bench_with_input(
            BenchmarkId::new("memory_to_disk", format!("chunk_{chunk}")),
            &chunk,
            |b, &chunk| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let dir = tempfile::tempdir().unwrap();
                        let target = DiskStore::create(dir.path().join("t.redb"), StoreOptions::default()).unwrap();
                        let cfg = BackfillConfig {
                            chunk,
                            checkpoint: Some(dir.path().join("cp.json")),
                            ..Default::default()
                        };
                        let start = Instant::now();
                        let done = backfill(&source, &target, &cfg, &mut |_| {}).unwrap();
                        total += start.elapsed();
                        assert_eq!(done.applied, N as u64);
                    }
                    total
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("baseline_apply_batch", format!("chunk_{chunk}")),
            &chunk,
            |b, &chunk| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let dir = tempfile::tempdir().unwrap();
                        let target = DiskStore::create(dir.path().join("t.redb"), StoreOptions::default()).unwrap();
                        let start = Instant::now();
                        for c in records.chunks(chunk) {
                            target.apply_batch_if_newer(c.to_vec()).unwrap();
                        }
                        total += start.elapsed();
                    }
                    total
                })
            },
        );
    }
    g.finish();
}

struct Setup {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    migrator: Arc<Migrator>,
    _relay: erlmcp_rollout::migrate::dual::RelayHandle,
}

fn setup(disk: bool, durable_outbox: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = if disk {
        Arc::new(DiskStore::create(dir.path().join("p.redb"), StoreOptions::default()).unwrap())
    } else {
        Arc::new(MemoryStore::new(StoreOptions::default()))
    };
    // The migrator's primary is a second store of the same kind, so both puts write
    // equally sized stores.
    let primary: Arc<dyn Store> = if disk {
        Arc::new(DiskStore::create(dir.path().join("m.redb"), StoreOptions::default()).unwrap())
    } else {
        Arc::new(MemoryStore::new(StoreOptions::default()))
    };
    let migrator = Arc::new(
        Migrator::open(
            primary,
            Arc::new(MemoryStore::new(StoreOptions::default())),
            if durable_outbox {
                Outbox::open(dir.path().join("outbox.redb")).unwrap()
            } else {
                // A memory primary does not survive a crash: neither need its intents.
                Outbox::in_memory()
            },
            Box::new(FilePhaseStore::new(dir.path().join("phase.json"))),
            MigratorConfig::default(),
        )
        .unwrap(),
    );
    migrator.advance(Duration::from_secs(5)).unwrap();
    let relay = migrator.start_relay();
    Setup {
        _dir: dir,
        store,
        migrator,
        _relay: relay,
    }
}

fn puts(store: Arc<dyn Store>, threads: usize, iters: u64) -> Duration {
    let per = iters.div_ceil(threads as u64);
    let start = Instant::now();
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                for i in 0..per {
                    store.put(record((t * 1_000_003 + i as usize) % 10_000)).unwrap();
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    start.elapsed().mul_f64(iters as f64 / (per * threads as u64) as f64)
}

fn bench_dual_write(c: &mut Criterion) {
    for (kind, disk, durable_outbox) in [
        ("memory", false, false),
        ("memory_durable_outbox", false, true),
        ("disk", true, true),
    ] {
        let s = setup(disk, durable_outbox);
        let mut g = c.benchmark_group(format!("dual_write/{kind}"));
        if durable_outbox {
            g.sample_size(20);
            g.measurement_time(Duration::from_secs(10));
        }
        let migrator: Arc<dyn Store> = s.migrator.clone();
        for threads in [1usize, 4] {
            let suffix = if threads == 1 {
                String::new()
            } else {
                format!("_{threads}threads")
            };
            let store = Arc::clone(&s.store);
            g.bench_function(format!("store_put{suffix}"), |b| {
                b.iter_custom(|iters| puts(Arc::clone(&store), threads, iters))
            });
            let m = Arc::clone(&migrator);
            g.bench_function(format!("migrator_put{suffix}"), |b| {
                b.iter_custom(|iters| puts(Arc::clone(&m), threads, iters))
            });
        }
        g.finish();
        s.migrator.drain(Duration::from_secs(60)).unwrap();
    }
}

criterion_group!(benches, bench_backfill, bench_dual_write);
criterion_main!(benches);
