//! Session store benchmarks: `MemoryStore` get / put / touch, each with a same-run
//! baseline, a `std::sync::RwLock<HashMap<SessionId, Session>>` (one global lock):
//! - `*/get`, `*/put`, `*/touch`: one thread, 10 000 sessions (40-byte ids, 64-byte
//!   metadata), keys visited in a fixed pseudo-random order;
//! - `*/get_with_writer`: the same gets while a second thread puts continuously
//!   (the machine has 2 cores), where a global lock makes readers wait;
//! - `disk/*`: the disk store on the same sessions, one thread, after a checkpoint (the
//!   log's tail index empty: reads go to redb); `disk/get_redb_direct` is the same-run
//!   baseline for `disk/get`: the read path `DiskStore::get` had before the write-ahead
//!   log (one redb read transaction, get, decode, liveness check) on a raw redb file with
//!   the same records; `disk/get_paired` alternates the two every 64 gets in one run and
//!   prints their time ratio; `disk/get_log_tail` reads records still in the log's tail index;
//! - `disk_writes/*`: durable acknowledged writes per second with 1, 16 and 64 writer
//!   threads: `group_commit` is `DiskStore::put` (writers share one log append and one
//!   fdatasync), `bare_fdatasync` (run right before each writer count) is the disk's
//!   floor measured in the same run (a 512-byte append + `fdatasync` on a file in the
//!   same directory), and `one_commit_per_write` is what `DiskStore::put` did before
//!   group commit (one redb write transaction with `Durability::Immediate` per put: load,
//!   decode, next version, encode, insert, commit), on raw redb. At the end the table
//!   writers / durable writes/s / bare fdatasyncs/s / ratio is printed;
//! - `disk_reopen/1m_records`: opening a store whose log holds 1 000 000 un-checkpointed
//!   records (1 000 000 distinct keys, written as 100 frames of 10 000), i.e. the replay
//!   after a crash;
//! - `disk_writes/paired_1_thread`: one thread alternating the two paths every 8 writes
//!   (same disk weather for both), ratio printed;
//! - `disk_writes_in_memory/paired_1_thread`: the same on redb's in-memory backend (no
//!   fsync): what the group-commit machinery costs a lone writer in CPU.

#![allow(missing_docs)] // criterion_group! generates undocumented items

#[path = "support/workload.rs"]
#[allow(dead_code)] // the shared workload; the harness-less benches' helpers are not used here
mod workload;

use workload::{bare_append, ids, order, session};

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, RwLock};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use erlmcp_rollout::session::{
    codec, Clock, DiskOptions, DiskStore, MemoryStore, Session, SessionId, Store, StoreOptions, SystemClock,
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

/// The disk store: reads on the tail index over a redb snapshot; each write one durable
/// log append (fdatasync).
fn bench_disk(c: &mut Criterion) {
    let ids = ids(N);
    let order = order(N);
    let dir = tempfile::tempdir().unwrap();
    let disk = DiskStore::create(dir.path().join("bench.redb"), StoreOptions::default()).unwrap();
    let records: Vec<Session> = ids
        .iter()
        .map(|id| Session {
            version: 1,
            ..session(id)
        })
        .collect();
    disk.apply_batch_if_newer(records.clone()).unwrap();
    // Reads as in steady state: everything checkpointed, the tail index empty.
    disk.checkpoint().unwrap();
    let direct = OneCommitPerWrite(redb::Database::create(dir.path().join("direct.redb")).unwrap());
    direct.load(&records);
    let mut g = c.benchmark_group("sessions");
    let mut i = 0;
    g.bench_function("disk/get", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            black_box(disk.get(&ids[order[i]]).unwrap())
        })
    });
    g.bench_function("disk/get_redb_direct", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            black_box(direct.get(&ids[order[i]]).unwrap())
        })
    });
    // Criterion's separate runs of the two read paths see different machine load; also
    // alternate them every 64 gets in one run (`disk/get_paired`), ratio printed.
    let mut sums = Sums::default();
    g.bench_function("disk/get_paired", |b| {
        b.iter_custom(|iters| {
            alternate(
                iters,
                64,
                &mut sums,
                |k| {
                    black_box(disk.get(&ids[order[k % N]]).unwrap());
                },
                |k| {
                    black_box(direct.get(&ids[order[k % N]]).unwrap());
                },
            )
        })
    });
    let Sums(new_time, old_time, gets) = sums;
    if gets > 0 {
        println!(
            "sessions/disk/get_paired: {gets} gets per path; disk/get {:.0} ns, disk/get_redb_direct {:.0} ns, \
             disk/get time / get_redb_direct time {:.3}",
            new_time.as_nanos() as f64 / gets as f64,
            old_time.as_nanos() as f64 / gets as f64,
            new_time.as_secs_f64() / old_time.as_secs_f64()
        );
    }
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
    // The same gets while every record is in the log's tail index (not checkpointed).
    let tail = DiskStore::create_with(
        dir.path().join("tail.redb"),
        StoreOptions::default(),
        DiskOptions {
            checkpoint_bytes: 0,
            checkpoint_interval: None,
            checkpoint_on_close: false,
            ..DiskOptions::default()
        },
    )
    .unwrap();
    tail.apply_batch_if_newer(records).unwrap();
    let mut g = c.benchmark_group("sessions");
    g.bench_function("disk/get_log_tail", |b| {
        b.iter(|| {
            i = (i + 1) % N;
            black_box(tail.get(&ids[order[i]]).unwrap())
        })
    });
    g.finish();
}

/// The write path of `DiskStore::put` before group commit, on raw redb: one write
/// transaction per put, committed with `Durability::Immediate`.
struct OneCommitPerWrite(redb::Database);

const SESSIONS: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("sessions");

impl OneCommitPerWrite {
    /// Stores `records` as given, in one commit.
    fn load(&self, records: &[Session]) {
        let txn = self.0.begin_write().unwrap();
        {
            let mut table = txn.open_table(SESSIONS).unwrap();
            for s in records {
                table
                    .insert(s.id.as_bytes(), codec::encode(s).unwrap().as_slice())
                    .unwrap();
            }
        }
        txn.commit().unwrap();
    }

    /// `DiskStore::get` before the write-ahead log: one read transaction, get, decode,
    /// liveness at the system clock's now.
    fn get(&self, id: &SessionId) -> Option<Session> {
        use redb::ReadableDatabase;
        let now = SystemClock.now_unix_ms();
        let txn = self.0.begin_read().unwrap();
        let table = txn.open_table(SESSIONS).unwrap();
        let s = table
            .get(id.as_bytes())
            .unwrap()
            .map(|v| codec::decode_keyed(id, v.value()).unwrap());
        s.filter(|s| s.is_live(now))
    }

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

/// `iters` bare durable appends: 512 bytes appended to `file`, then `fdatasync`.
fn bare_fdatasyncs(file: &mut std::fs::File, iters: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        bare_append(file);
    }
    start.elapsed()
}

/// Operations and time summed over every criterion call of one benchmark.
#[derive(Default)]
struct Tally(std::cell::Cell<(u64, Duration)>);

impl Tally {
    fn add(&self, iters: u64, t: Duration) -> Duration {
        let (n, total) = self.0.get();
        self.0.set((n + iters, total + t));
        t
    }
    fn per_sec(&self) -> f64 {
        let (n, total) = self.0.get();
        n as f64 / total.as_secs_f64()
    }
}

/// Durable acknowledged writes per second, 1 / 16 / 64 writer threads: group commit
/// against the bare fdatasync rate measured right before it (and against one commit per
/// write), in the same run; prints the table at the end.
fn bench_disk_writes(c: &mut Criterion) {
    let ids = ids(N);
    let prepared: Vec<Session> = ids.iter().map(session).collect();
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("disk_writes");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(2));
    g.measurement_time(Duration::from_secs(10));
    let mut rows = Vec::new();
    for threads in [1usize, 16, 64] {
        let bare = Tally::default();
        let mut probe = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join(format!("bare-{threads}.probe")))
            .unwrap();
        g.bench_with_input(BenchmarkId::new("bare_fdatasync", threads), &threads, |b, _| {
            b.iter_custom(|iters| bare.add(iters, bare_fdatasyncs(&mut probe, iters)))
        });
        let store = DiskStore::create(
            dir.path().join(format!("group-{threads}.redb")),
            StoreOptions::default(),
        )
        .unwrap();
        let group = Tally::default();
        g.bench_with_input(BenchmarkId::new("group_commit", threads), &threads, |b, &threads| {
            b.iter_custom(|iters| {
                group.add(
                    iters,
                    timed_writes(iters, threads, &prepared, &|s| {
                        store.put(s).unwrap();
                    }),
                )
            })
        });
        drop(store);
        rows.push((threads, group, bare));
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
    if rows
        .iter()
        .all(|(_, group, bare)| group.0.get().0 > 0 && bare.0.get().0 > 0)
    {
        println!("\ndisk_writes: durable writes (DiskStore::put) per bare fdatasync, same run");
        println!("| writers | durable writes/s | bare fdatasyncs/s (512-byte append) | writes per bare fdatasync |");
        println!("|---:|---:|---:|---:|");
        for (threads, group, bare) in &rows {
            let (w, f) = (group.per_sec(), bare.per_sec());
            let cost = if *threads == 1 {
                format!(" (one write = {:.2} bare fdatasyncs)", f / w)
            } else {
                String::new()
            };
            println!("| {threads} | {w:.0} | {f:.0} | {:.2}{cost} |", w / f);
        }
    }
}

/// Reopening a store whose log holds 1 000 000 un-checkpointed records (the replay a
/// crash leaves): 1 000 000 distinct keys (40-byte ids, 64-byte metadata) written in
/// 100 frames of 10 000, the store closed without a checkpoint, then opened (timed).
fn bench_disk_reopen(c: &mut Criterion) {
    const RECORDS: usize = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replay.redb");
    let keep = DiskOptions {
        checkpoint_bytes: 0,
        checkpoint_interval: None,
        checkpoint_on_close: false,
        ..DiskOptions::default()
    };
    // Written on the first call only (criterion skips the closure when filtered out).
    let mut written = false;
    let write_log = || {
        let store = DiskStore::create_with(&path, StoreOptions::default(), keep.clone()).unwrap();
        let all = ids(RECORDS);
        for chunk in all.chunks(10_000) {
            let batch = chunk
                .iter()
                .map(|id| Session {
                    version: 1,
                    ..session(id)
                })
                .collect();
            store.apply_batch_if_newer(batch).unwrap();
        }
        drop(store);
        let log_bytes: u64 = DiskStore::log_paths(&path)
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum();
        println!(
            "disk_reopen: {RECORDS} records in {:.1} MB of log",
            log_bytes as f64 / 1e6
        );
    };
    let mut g = c.benchmark_group("disk_reopen");
    g.sample_size(10);
    g.bench_function("1m_records", |b| {
        b.iter_custom(|iters| {
            if !written {
                write_log();
                written = true;
            }
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let store = DiskStore::create_with(&path, StoreOptions::default(), keep.clone()).unwrap();
                total += start.elapsed();
                assert!(store.get(&ids(1)[0]).is_ok());
                drop(store);
            }
            total
        })
    });
    g.finish();
}

/// Time spent in each of two alternated paths, and calls made per path.
#[derive(Default)]
struct Sums(Duration, Duration, u64);

/// Calls `a(k)` and `b(k)` for `block` consecutive `k` each, in turns (which goes first
/// swapped every turn), until `iters` calls in all: both paths see the same machine and
/// disk weather. Adds each path's time to `sums` and returns the total.
fn alternate(
    iters: u64,
    block: usize,
    sums: &mut Sums,
    mut a: impl FnMut(usize),
    mut b: impl FnMut(usize),
) -> Duration {
    let mut total = Duration::ZERO;
    let mut k = 0;
    let timed = |f: &mut dyn FnMut(usize), k: usize| {
        let start = Instant::now();
        (k..k + block).for_each(f);
        start.elapsed()
    };
    while (k as u64) < iters {
        let (ta, tb) = if (k / (2 * block)) % 2 == 0 {
            let ta = timed(&mut a, k);
            (ta, timed(&mut b, k))
        } else {
            let tb = timed(&mut b, k);
            (timed(&mut a, k), tb)
        };
        sums.0 += ta;
        sums.1 += tb;
        sums.2 += block as u64;
        total += ta + tb;
        k += 2 * block;
    }
    total
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
    let mut sums = Sums::default();
    let name = label.rsplit('/').next().unwrap_or(label);
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            alternate(
                iters,
                8,
                &mut sums,
                |k| {
                    store.put(prepared[k % N].clone()).unwrap();
                },
                |k| baseline.put(prepared[k % N].clone()),
            )
        })
    });
    let Sums(group_time, baseline_time, writes) = sums;
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
    bench_disk_writes_cpu,
    bench_disk_reopen
);
criterion_main!(benches);
