//! Session store benchmarks: `MemoryStore` get / put / touch, each with a same-run
//! baseline, a `std::sync::RwLock<HashMap<SessionId, Session>>` (one global lock):
//! - `*/get`, `*/put`, `*/touch`: one thread, 10 000 sessions (40-byte ids, 64-byte
//!   metadata), keys visited in a fixed pseudo-random order;
//! - `*/get_with_writer`: the same gets while a second thread puts continuously
//!   (the machine has 2 cores), where a global lock makes readers wait;
//! - `disk/*`: the redb store on the same sessions, one thread;
//! - `disk_writes/*`: durable acknowledged writes per second with 1, 16 and 64 writer
//!   threads: `group_commit` is `DiskStore::put` (writers share commits), and the
//!   same-run baseline `one_commit_per_write` is what `DiskStore::put` did before group
//!   commit (one redb write transaction with `Durability::Immediate` per put: load,
//!   decode, next version, encode, insert, commit), on raw redb;
//! - `disk_writes/paired_1_thread`: one thread alternating the two paths every 8 writes
//!   (same disk weather for both), ratio printed;
//! - `disk_writes_in_memory/paired_1_thread`: the same on redb's in-memory backend (no
//!   fsync): what the group-commit machinery costs a lone writer in CPU.

#![allow(missing_docs)] // criterion_group! generates undocumented items

#[path = "support/workload.rs"]
mod workload;

use workload::{ids, order, session};

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, RwLock};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use erlmcp_rollout::session::{
    codec, Clock, DiskStore, MemoryStore, Session, SessionId, Store, StoreOptions, SystemClock,
};

const N: usize = 10_000;

/// The baseline: one global `RwLock` around a std `HashMap`.
#[derive(Default)]
struct Baseline(RwLock<HashMap<SessionId, Session>>);

impl Baseline {
    fn get(&self, id: &SessionId) -> Option<Session> {
        self.0.read().unwrap().get(id).cloned()
    }
    fn put(&self, s: Session) {
        self.0.write().unwrap().insert(s.id.clone(), s);
    }
}

fn bench_single(c: &mut Criterion) {
    let ids = ids(N);
    let order = order(N);
    let memory = MemoryStore::new(StoreOptions::default());
    let baseline = Baseline::default();
    for id in &ids {
        memory.put(session(id)).unwrap();
        baseline.put(session(id));
    }
    let mut g = c.benchmark_group("sessions");
    let mut i = 0;
    g.bench_function("memory/get", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            black_box(memory.get(&ids[order[i]]).unwrap())
        })
    });
    g.bench_function("baseline/get", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            black_box(baseline.get(&ids[order[i]]).unwrap())
        })
    });
    let prepared: Vec<Session> = ids.iter().map(session).collect();
    g.bench_function("memory/put", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            black_box(memory.put(prepared[order[i]].clone()).unwrap())
        })
    });
    g.bench_function("baseline/put", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            baseline.put(black_box(prepared[order[i]].clone()))
        })
    });
    // Touches within 10 % of the timeout: read-only under the default policy.
    g.bench_function("memory/touch", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            black_box(memory.touch(&ids[order[i]]).unwrap())
        })
    });
    // What a store that writes every touch pays: a write-locked update.
    g.bench_function("baseline/touch", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            let mut map = baseline.0.write().unwrap();
            let s = map.get_mut(&ids[order[i]]).unwrap();
            s.last_accessed = SystemClock.now_unix_ms();
            black_box(s.clone())
        })
    });
    g.finish();
}

/// Times `iters` gets on this thread while another thread puts without pause.
fn gets_with_writer(
    iters: u64,
    ids: &Arc<Vec<SessionId>>,
    get: impl Fn(&SessionId),
    put: impl Fn(Session) + Send + 'static,
) -> Duration {
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        let ids = Arc::clone(ids);
        std::thread::spawn(move || {
            let mut j = 0;
            while !stop.load(Ordering::Relaxed) {
                j = (j + 13) % N;
                put(session(&ids[j]));
            }
        })
    };
    let order = order(N);
    let start = Instant::now();
    for k in 0..iters as usize {
        get(&ids[order[k % N]]);
    }
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    elapsed
}

fn bench_contended(c: &mut Criterion) {
    let ids = Arc::new(ids(N));
    let memory = Arc::new(MemoryStore::new(StoreOptions::default()));
    let baseline = Arc::new(Baseline::default());
    for id in ids.iter() {
        memory.put(session(id)).unwrap();
        baseline.put(session(id));
    }
    let mut g = c.benchmark_group("sessions");
    g.bench_function("memory/get_with_writer", |b| {
        b.iter_custom(|iters| {
            let w = Arc::clone(&memory);
            gets_with_writer(
                iters,
                &ids,
                |id| {
                    black_box(memory.get(id).unwrap());
                },
                move |s| {
                    w.put(s).unwrap();
                },
            )
        })
    });
    g.bench_function("baseline/get_with_writer", |b| {
        b.iter_custom(|iters| {
            let w = Arc::clone(&baseline);
            gets_with_writer(
                iters,
                &ids,
                |id| {
                    black_box(baseline.get(id).unwrap());
                },
                move |s| w.put(s),
            )
        })
    });
    g.finish();
}

/// The redb store: reads on a snapshot; each write one durable commit (fsync).
fn bench_disk(c: &mut Criterion) {
    let ids = ids(N);
    let order = order(N);
    let dir = tempfile::tempdir().unwrap();
    let disk = DiskStore::create(dir.path().join("bench.redb"), StoreOptions::default()).unwrap();
    disk.apply_batch_if_newer(
        ids.iter()
            .map(|id| Session {
                version: 1,
                ..session(id)
            })
            .collect(),
    )
    .unwrap();
    let mut g = c.benchmark_group("sessions");
    let mut i = 0;
    g.bench_function("disk/get", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            black_box(disk.get(&ids[order[i]]).unwrap())
        })
    });
    g.bench_function("disk/touch", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            black_box(disk.touch(&ids[order[i]]).unwrap())
        })
    });
    let prepared: Vec<Session> = ids.iter().map(session).collect();
    g.sample_size(20);
    g.bench_function("disk/put", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            black_box(disk.put(prepared[order[i]].clone()).unwrap())
        })
    });
    g.finish();
}

/// The write path of `DiskStore::put` before group commit, on raw redb: one write
/// transaction per put, committed with `Durability::Immediate`.
struct OneCommitPerWrite(redb::Database);

const SESSIONS: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("sessions");

impl OneCommitPerWrite {
    fn put(&self, mut s: Session) {
        use redb::ReadableTable;
        let mut txn = self.0.begin_write().unwrap();
        txn.set_durability(redb::Durability::Immediate).unwrap();
        {
            let mut table = txn.open_table(SESSIONS).unwrap();
            let stored = table
                .get(s.id.as_bytes())
                .unwrap()
                .map(|v| codec::decode_keyed(&s.id, v.value()).unwrap());
            s.version = stored.map_or(1, |old| old.version + 1);
            let bytes = codec::encode(&s).unwrap();
            table.insert(s.id.as_bytes(), bytes.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
}

/// Wall time of `iters` puts spread over `threads` threads (thread `t` writes its own
/// keys), timed from a barrier after the threads started to the last one's end.
fn timed_writes(iters: u64, threads: usize, prepared: &[Session], put: &(impl Fn(Session) + Sync)) -> Duration {
    let barrier = Barrier::new(threads + 1);
    let per_thread = N / threads;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                let n = iters / threads as u64 + u64::from((t as u64) < iters % threads as u64);
                scope.spawn(move || {
                    barrier.wait();
                    for k in 0..n as usize {
                        put(prepared[t * per_thread + k % per_thread].clone());
                    }
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        for h in handles {
            h.join().unwrap();
        }
        start.elapsed()
    })
}

/// Durable acknowledged writes per second, 1 / 16 / 64 writer threads: group commit vs
/// one commit per write, in the same run.
fn bench_disk_writes(c: &mut Criterion) {
    let ids = ids(N);
    let prepared: Vec<Session> = ids.iter().map(session).collect();
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("disk_writes");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(2));
    g.measurement_time(Duration::from_secs(10));
    for threads in [1usize, 16, 64] {
        let store = DiskStore::create(
            dir.path().join(format!("group-{threads}.redb")),
            StoreOptions::default(),
        )
        .unwrap();
        g.bench_with_input(BenchmarkId::new("group_commit", threads), &threads, |b, &threads| {
            b.iter_custom(|iters| {
                timed_writes(iters, threads, &prepared, &|s| {
                    store.put(s).unwrap();
                })
            })
        });
        drop(store);
        let db = redb::Database::create(dir.path().join(format!("baseline-{threads}.redb"))).unwrap();
        let baseline = OneCommitPerWrite(db);
        g.bench_with_input(
            BenchmarkId::new("one_commit_per_write", threads),
            &threads,
            |b, &threads| b.iter_custom(|iters| timed_writes(iters, threads, &prepared, &|s| baseline.put(s))),
        );
    }
    // A lone writer on a noisy shared disk: criterion's separate runs of the two paths
    // see different disk weather, so also alternate them in one run (`paired`).
    let store = DiskStore::create(dir.path().join("paired-group.redb"), StoreOptions::default()).unwrap();
    let baseline = OneCommitPerWrite(redb::Database::create(dir.path().join("paired-baseline.redb")).unwrap());
    paired(&mut g, "disk_writes/paired_1_thread", &prepared, &store, &baseline);
    g.finish();
}

/// One thread alternating the two write paths every 8 writes; criterion's number is the
/// two together, and the sums per path and their ratio are printed.
fn paired(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    label: &str,
    prepared: &[Session],
    store: &DiskStore,
    baseline: &OneCommitPerWrite,
) {
    let (mut group_time, mut baseline_time, mut writes) = (Duration::ZERO, Duration::ZERO, 0u64);
    let name = label.rsplit('/').next().unwrap_or(label);
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut k = 0;
            let mut total = Duration::ZERO;
            while (k as u64) < iters {
                for group in [true, false] {
                    let start = Instant::now();
                    for j in 0..8 {
                        let s = prepared[(k + j) % N].clone();
                        if group {
                            store.put(s).unwrap();
                        } else {
                            baseline.put(s);
                        }
                    }
                    let t = start.elapsed();
                    total += t;
                    if group {
                        group_time += t;
                    } else {
                        baseline_time += t;
                    }
                }
                k += 16;
                writes += 8;
            }
            total
        })
    });
    if writes == 0 {
        return; // filtered out
    }
    println!(
        "{label}: {writes} writes per path; group_commit {:.0}/s, one_commit_per_write {:.0}/s, \
         group_commit/one_commit_per_write throughput ratio {:.3}",
        writes as f64 / group_time.as_secs_f64(),
        writes as f64 / baseline_time.as_secs_f64(),
        baseline_time.as_secs_f64() / group_time.as_secs_f64()
    );
}

/// The CPU cost of the group-commit machinery for a lone writer: the same two write
/// paths on redb's `InMemoryBackend` (no fsync), one thread, alternating.
fn bench_disk_writes_cpu(c: &mut Criterion) {
    let ids = ids(N);
    let prepared: Vec<Session> = ids.iter().map(session).collect();
    let mut g = c.benchmark_group("disk_writes_in_memory");
    g.throughput(Throughput::Elements(1));
    let memory = redb::backends::InMemoryBackend::new;
    let store = DiskStore::with_backends(
        memory(),
        [memory(), memory()],
        StoreOptions::default(),
        Default::default(),
    )
    .unwrap();
    let db = redb::Database::builder()
        .create_with_backend(redb::backends::InMemoryBackend::new())
        .unwrap();
    paired(
        &mut g,
        "disk_writes_in_memory/paired_1_thread",
        &prepared,
        &store,
        &OneCommitPerWrite(db),
    );
    g.finish();
}
criterion_group!(
    benches,
    bench_single,
    bench_contended,
    bench_disk,
    bench_disk_writes,
    bench_disk_writes_cpu
);
criterion_main!(benches);
