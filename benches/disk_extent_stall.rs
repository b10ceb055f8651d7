//! What growing a log file costs the one group that grows it, and what recycling
//! saves: a lone writer's `DiskStore::put` latencies on a fresh store (the first pass
//! through the log: every `log_extent_bytes` a group writes a zero-filled extent under
//! its fdatasync) and then on the same store after two checkpoints (both files recycled:
//! the same appends overwrite blocks the files already have).
//!
//! `cargo bench --bench disk_extent_stall` prints, for each pass, the puts' p50 / p99 /
//! max latency and the puts that grew the active log file (seen as a change of its
//! length) with their latencies. `MIB` (default 4): MiB of log per pass; `BENCH_DIR`
//! (default the system temporary directory). A filter argument (`cargo bench --
//! FILTER`) that is not part of `disk_extent_stall` skips it.

#[path = "support/workload.rs"]
#[allow(dead_code)] // the shared workload; this bench uses ids and sessions only
mod workload;

use std::path::Path;
use std::time::{Duration, Instant};

use erlmcp_rollout::session::{DiskOptions, DiskStore, Session, Store, StoreOptions};

const N: usize = 10_000;

fn log_len(path: &Path) -> u64 {
    DiskStore::log_paths(path)
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum()
}

/// `puts` puts (keys cycling through `prepared`):
/// every put's latency, and the latencies of the puts during which the logs grew.
fn pass(store: &DiskStore, path: &Path, prepared: &[Session], puts: usize) -> (Vec<Duration>, Vec<(u64, Duration)>) {
    let mut lat = Vec::with_capacity(puts);
    let mut grew = Vec::new();
    let mut len = log_len(path);
    for k in 0..puts {
        let s = prepared[k % prepared.len()].clone();
        let t = Instant::now();
        store.put(s).unwrap();
        let d = t.elapsed();
        lat.push(d);
        let now = log_len(path);
        if now != len {
            grew.push((now, d));
            len = now;
        }
    }
    (lat, grew)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn report(name: &str, mut lat: Vec<Duration>, grew: &[(u64, Duration)]) {
    let grown: Vec<String> = grew
        .iter()
        .map(|(len, d)| format!("{:.0} µs (to {len} B)", us(*d)))
        .collect();
    lat.sort_unstable();
    let at = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
    println!(
        "| {name} | {} | {:.0} | {:.0} | {:.0} | {} |",
        lat.len(),
        us(at(0.5)),
        us(at(0.99)),
        us(*lat.last().unwrap()),
        if grown.is_empty() {
            "none".to_string()
        } else {
            grown.join(", ")
        }
    );
}

fn main() {
    let name = "disk_extent_stall";
    if !workload::selected(name) {
        return;
    }
    let mib = workload::env_or("MIB", 4).max(1);
    let dir = workload::bench_dir();
    let path = dir.path().join("stall.redb");
    let settings = DiskOptions {
        checkpoint_bytes: 0,
        checkpoint_interval: None,
        ..DiskOptions::default()
    };
    let prepared: Vec<Session> = workload::ids(N).iter().map(workload::session).collect();
    let store = DiskStore::create_with(&path, StoreOptions::default(), settings.clone()).unwrap();
    // The size of one lone writer's frame, from the first put.
    let before = log_len(&path);
    store.put(prepared[0].clone()).unwrap();
    let frame = (log_len(&path) - before)
        .saturating_sub(settings.log_extent_bytes)
        .max(1);
    let puts = usize::try_from((mib << 20) / frame).unwrap_or(usize::MAX);
    eprintln!(
        "disk_extent_stall: {puts} puts per pass ({mib} MiB of {frame}-byte frames), extents of {} bytes, in {}",
        settings.log_extent_bytes,
        dir.path().display()
    );
    let (first, first_grew) = pass(&store, &path, &prepared, puts);
    // Both files recycled: the active one is written again from its header.
    store.checkpoint().unwrap();
    store.put(prepared[1].clone()).unwrap();
    store.checkpoint().unwrap();
    let (again, again_grew) = pass(&store, &path, &prepared, puts);
    println!("\n| pass | puts | p50 µs | p99 µs | max µs | puts that grew the log (latency, new total length) |");
    println!("|---|---:|---:|---:|---:|---|");
    report("first (fresh files, extents written)", first, &first_grew);
    report("again (recycled files)", again, &again_grew);
}
