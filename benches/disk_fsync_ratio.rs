//! Durable writes per bare `fdatasync`, measured in alternation on the same disk: the
//! table of issue 17 (writers 1 / 16 / 64, durable writes/s, bare fdatasyncs/s, ratio).
//!
//! `cargo bench --bench disk_fsync_ratio` prints it as markdown. For each writer count,
//! `ROUNDS` rounds each run the two paths back to back for `ROUND_MS` each (the order
//! swapped every round), so both see the same disk weather:
//! - `bare`: one thread appending 512 bytes to a file in the store's directory, then
//!   `fdatasync` (the disk's floor for one durable append);
//! - `store`: `writers` threads calling `DiskStore::put` on their own keys (10 000
//!   sessions, 40-byte ids, 64-byte metadata) on a store with the default
//!   [`DiskOptions`] (background checkpoints into redb included); a write counts once
//!   `put` has returned `Ok`, i.e. once its log frame was fsynced.
//!
//! The ratio column is total durable writes/s over total bare fdatasyncs/s, with the
//! per-round ratios' median and range. The lone writer has a second row alternating
//! the two paths every 8 operations on one thread (the finest pairing there is); its
//! "one write costs" figure is bare fdatasyncs/s over writes/s.
//!
//! Environment: `ROUNDS` (default 6), `ROUND_MS` (default 1000), `BENCH_DIR` (default
//! the system temporary directory). A filter argument (`cargo bench -- FILTER`) that is
//! not part of `disk_fsync_ratio` skips it.

#[path = "support/workload.rs"]
#[allow(dead_code)] // the shared workload; this bench visits keys in its own order
mod workload;
use workload::bare_append;

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use erlmcp_rollout::session::{DiskOptions, DiskStore, Session, Store, StoreOptions};

const N: usize = 10_000;

/// Bare durable appends for `span`: (count, elapsed).
fn bare_for(file: &mut File, span: Duration) -> (u64, Duration) {
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < span {
        bare_append(file);
        n += 1;
    }
    (n, start.elapsed())
}

/// `writers` threads putting their own keys for `span`, started together: (acknowledged
/// writes, elapsed until the last writer returned).
fn store_for(store: &DiskStore, prepared: &[Session], writers: usize, span: Duration) -> (u64, Duration) {
    let done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(writers + 1);
    let per_thread = N / writers;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..writers)
            .map(|t| {
                let (done, stop, barrier) = (&done, &stop, &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    let mut k = 0;
                    while !stop.load(Ordering::Relaxed) {
                        store.put(prepared[t * per_thread + k % per_thread].clone()).unwrap();
                        done.fetch_add(1, Ordering::Relaxed);
                        k += 1;
                    }
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        std::thread::sleep(span);
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().unwrap();
        }
        (done.load(Ordering::Relaxed), start.elapsed())
    })
}

/// Sums of one path over the rounds.
#[derive(Default)]
struct Sum {
    ops: u64,
    time: Duration,
}

impl Sum {
    fn add(&mut self, (ops, time): (u64, Duration)) -> f64 {
        self.ops += ops;
        self.time += time;
        ops as f64 / time.as_secs_f64()
    }
    fn per_sec(&self) -> f64 {
        self.ops as f64 / self.time.as_secs_f64()
    }
}

fn median_and_range(mut xs: Vec<f64>) -> (f64, f64, f64) {
    xs.sort_by(f64::total_cmp);
    let mid = xs.len() / 2;
    let median = if xs.len() % 2 == 0 {
        (xs[mid - 1] + xs[mid]) / 2.0
    } else {
        xs[mid]
    };
    (median, xs[0], xs[xs.len() - 1])
}

fn main() {
    // `cargo bench -- FILTER` passes FILTER to every bench: run only when it is part of
    // this bench's name (or absent).
    let name = "disk_fsync_ratio";
    if !workload::selected(name) {
        return;
    }
    let rounds = workload::env_or("ROUNDS", 6).max(1);
    let span = Duration::from_millis(workload::env_or("ROUND_MS", 1000).max(10));
    let dir = workload::bench_dir();
    let prepared: Vec<Session> = workload::ids(N).iter().map(workload::session).collect();
    let mut probe = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("bare.probe"))
        .unwrap();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "disk_fsync_ratio: {rounds} rounds x {} ms per path, in {}; load average at start: {}",
        span.as_millis(),
        dir.path().display(),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    let mut rows = Vec::new();
    for writers in [1usize, 16, 64] {
        let store = DiskStore::create_with(
            dir.path().join(format!("ratio-{writers}.redb")),
            StoreOptions::default(),
            DiskOptions::default(),
        )
        .unwrap();
        // Warm-up: the store's first frames and the probe's first blocks.
        store_for(&store, &prepared, writers, span / 4);
        bare_for(&mut probe, span / 4);
        let (mut bare, mut put, mut ratios) = (Sum::default(), Sum::default(), Vec::new());
        for r in 0..rounds {
            let (b, p) = if r % 2 == 0 {
                let b = bare.add(bare_for(&mut probe, span));
                (b, put.add(store_for(&store, &prepared, writers, span)))
            } else {
                let p = put.add(store_for(&store, &prepared, writers, span));
                (bare.add(bare_for(&mut probe, span)), p)
            };
            eprintln!(
                "  writers {writers:>2} round {r}: {p:>8.0} writes/s, {b:>6.0} bare fdatasyncs/s, ratio {:.2}",
                p / b
            );
            ratios.push(p / b);
        }
        rows.push((
            writers.to_string(),
            put.per_sec(),
            bare.per_sec(),
            Some(median_and_range(ratios)),
        ));
        if writers == 1 {
            rows.push(("1, alternating every 8 ops".into(), 0.0, 0.0, None));
            let (p, b) = interleaved(&store, &prepared, &mut probe, span * rounds as u32);
            let last = rows.last_mut().unwrap();
            (last.1, last.2) = (p, b);
        }
    }
    println!("\n| writers | durable writes/s (`DiskStore::put`) | bare fdatasyncs/s (512-byte append) | writes per bare fdatasync (per-round median, range) |");
    println!("|---|---:|---:|---:|");
    for (writers, w, f, rounds) in rows {
        let spread = match rounds {
            Some((m, lo, hi)) => format!(" (median {m:.2}, {lo:.2}-{hi:.2})"),
            None => String::new(),
        };
        let cost = if writers.starts_with('1') && !writers.starts_with("16") {
            format!("; one write = {:.2} bare fdatasyncs", f / w)
        } else {
            String::new()
        };
        println!("| {writers} | {w:.0} | {f:.0} | **{:.2}**{spread}{cost} |", w / f);
    }
}

/// One thread alternating 8 bare durable appends and 8 `put`s for `span`: (writes/s,
/// bare fdatasyncs/s), each over its own share of the time.
fn interleaved(store: &DiskStore, prepared: &[Session], probe: &mut File, span: Duration) -> (f64, f64) {
    let (mut put_time, mut bare_time, mut n) = (Duration::ZERO, Duration::ZERO, 0u64);
    let start = Instant::now();
    let mut k = 0;
    while start.elapsed() < span {
        let t = Instant::now();
        for _ in 0..8 {
            bare_append(probe);
        }
        bare_time += t.elapsed();
        let t = Instant::now();
        for j in 0..8 {
            store.put(prepared[(k + j) % N].clone()).unwrap();
        }
        put_time += t.elapsed();
        k += 8;
        n += 8;
    }
    (n as f64 / put_time.as_secs_f64(), n as f64 / bare_time.as_secs_f64())
}
