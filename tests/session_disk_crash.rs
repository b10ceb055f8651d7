//! kill -9 loop on the disk store (DESIGN §7): a child process writes with several
//! threads (checkpointing its log into redb every few KiB or ms, so kills land in every
//! step of a checkpoint too) and prints each acknowledged write (key and version) only
//! after `Ok`; the test kills it with SIGKILL at a random moment, then kills a second
//! child while it reopens the crashed store (redb's repair, then the log replay, then a
//! checkpoint), then reopens the store itself (timed) and checks that every write ever
//! acknowledged is present, at least at that version, with intact contents, and that
//! redb's integrity check passes.
//!
//! The children are this test binary itself, running the ignored test `crash_child`
//! (selected by `ERLMCP_CRASH_CHILD=writer|reopen`). Iterations: `ERLMCP_CRASH_ITERATIONS`
//! (default 10); seed: `ERLMCP_CRASH_SEED` (default: time).

#![cfg(feature = "disk")]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[path = "session_support/seeded.rs"]
mod seeded;
use seeded::{env_u64, xorshift};
#[path = "session_support/versioned.rs"]
mod versioned;
use versioned::{check_acked, write_next};

use erlmcp_rollout::session::{DiskOptions, DiskStore, StoreOptions};

const CHILD_ENV: &str = "ERLMCP_CRASH_CHILD";
const PATH_ENV: &str = "ERLMCP_CRASH_PATH";
const CHECKPOINT_ENV: &str = "ERLMCP_CRASH_CHECKPOINT";
const THREADS: usize = 8;
const KEYS_PER_THREAD: usize = 100;

/// The metadata of `key` at `version`: derived from both, 20 bytes to ~2 KiB.
fn meta(key: &str, version: u64) -> Vec<u8> {
    format!("{key}@{version};")
        .repeat(1 + (version % 11) as usize * 14)
        .into_bytes()
}

fn println_flushed(line: &str) {
    let mut out = std::io::stdout().lock();
    // The parent reads lines; a write error means it is gone: stop.
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(1);
    }
}

/// Child: write forever with `THREADS` threads, each on its own keys, printing
/// `ack KEY VERSION` after each `Ok`; checkpoints run every 4-512 KiB of log or 1-20 ms
/// (chosen by the `ERLMCP_CRASH_CHECKPOINT` seed the parent passes).
fn writer(path: &Path) {
    let mut seed = env_u64(CHECKPOINT_ENV).unwrap_or(1) | 1;
    let checkpoint_bytes = 4096 << (xorshift(&mut seed) % 8);
    let settings = DiskOptions {
        checkpoint_bytes,
        checkpoint_interval: Some(Duration::from_millis(1 + xorshift(&mut seed) % 20)),
        checkpoint_on_close: true,
        // Files that grow to each frame's end, by small extents (many growths per
        // checkpoint) or by large ones (room to spare).
        log_extent_bytes: [0, 512, checkpoint_bytes][(xorshift(&mut seed) % 3) as usize],
    };
    let store = std::sync::Arc::new(DiskStore::create_with(path, StoreOptions::default(), settings).unwrap());
    println_flushed("opened");
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = std::sync::Arc::clone(&store);
            std::thread::spawn(move || {
                for step in 0usize.. {
                    let key = format!("w{t}-{}", step % KEYS_PER_THREAD);
                    let result = write_next(&*store, &key, step, meta);
                    match result {
                        Ok(s) => println_flushed(&format!("ack {key} {}", s.version)),
                        Err(e) => panic!("{key}: {e}"),
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// Child: reopen the crashed file through redb's repair (printing `repair P` from the
/// repair callback), then the store through `DiskStore::create` (printing `replay`
/// before: the log replay runs there), then checkpoint it (printing `checkpoint` before),
/// then close it without a checkpoint (as a crash would leave it).
fn reopen(path: &Path) {
    let start = Instant::now();
    let db = redb::Database::builder()
        .set_repair_callback(|session| println_flushed(&format!("repair {:.3}", session.progress())))
        .create(path)
        .unwrap();
    let repaired = start.elapsed();
    drop(db);
    println_flushed("replay");
    let keep = DiskOptions {
        checkpoint_on_close: false,
        ..DiskOptions::default()
    };
    let store = DiskStore::create_with(path, StoreOptions::default(), keep).unwrap();
    println_flushed(&format!("opened {}", repaired.as_micros()));
    println_flushed("checkpoint");
    store.checkpoint().unwrap();
    println_flushed("checkpointed");
}

#[test]
#[ignore = "the child process of the kill -9 loop; it runs when that loop spawns it"]
fn crash_child() {
    let Ok(role) = std::env::var(CHILD_ENV) else {
        println!("{CHILD_ENV} is not set: not spawned by the kill -9 loop, nothing to do");
        return;
    };
    let path = PathBuf::from(std::env::var(PATH_ENV).expect("ERLMCP_CRASH_PATH"));
    match role.as_str() {
        "writer" => writer(&path),
        "reopen" => reopen(&path),
        other => panic!("{CHILD_ENV}={other:?}: expected writer or reopen"),
    }
}

/// Starts a child; its complete stdout lines arrive on the returned channel.
fn spawn(role: &str, path: &Path, seed: u64) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .env(CHILD_ENV, role)
        .env(PATH_ENV, path)
        .env(CHECKPOINT_ENV, seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        // A line cut by the kill has no newline: it was not printed in full, so not counted.
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line.ends_with('\n') {
            if tx.send(line.trim_end().to_string()).is_err() {
                break;
            }
            line.clear();
        }
    });
    (child, rx)
}

fn kill(mut child: Child) {
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

fn check(path: &Path, acked: &BTreeMap<String, u64>) -> Duration {
    let start = Instant::now();
    let store = DiskStore::create(path, StoreOptions::default()).unwrap();
    let reopen = start.elapsed();
    check_acked(&store, acked, meta, "kill -9");
    drop(store);
    let mut db = redb::Database::create(path).unwrap();
    assert!(db.check_integrity().unwrap(), "redb integrity check failed");
    reopen
}

#[test]
fn kill_9_loop_loses_no_acknowledged_write() {
    let iterations = env_u64("ERLMCP_CRASH_ITERATIONS").unwrap_or(10);
    let mut seed = env_u64("ERLMCP_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1
    });
    println!("kill -9 loop: {iterations} iterations, ERLMCP_CRASH_SEED={seed}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessions.redb");
    let mut acked: BTreeMap<String, u64> = BTreeMap::new();
    let (mut writes, mut reopen_times) = (0u64, Vec::new());
    let (mut repairs_seen, mut killed_in_repair, mut killed_before_open) = (0, 0, 0);
    let (mut killed_in_replay, mut killed_in_checkpoint) = (0, 0);
    // Open times (ms) of the reopen children that finished: repair after a kill -9.
    let mut child_repairs: Vec<f64> = Vec::new();
    for i in 0..iterations {
        // 1. Writer, killed at a random moment (sometimes while it still opens the file).
        let (child, lines) = spawn("writer", &path, xorshift(&mut seed));
        std::thread::sleep(Duration::from_millis(20 + xorshift(&mut seed) % 400));
        kill(child);
        for line in lines.iter() {
            let mut parts = line.split(' ');
            if let (Some("ack"), Some(key), Some(v)) = (parts.next(), parts.next(), parts.next()) {
                let v: u64 = v.parse().unwrap();
                let e = acked.entry(key.to_string()).or_default();
                *e = (*e).max(v);
                writes += 1;
            }
        }
        // 2. A reopen of the crashed store, killed during redb's repair (as soon as it
        //    reports repairing), during the log replay (as soon as it reports starting
        //    it), during its checkpoint, or after a random short delay.
        let (child, lines) = spawn("reopen", &path, 0);
        let mut outcome = "finished before the kill";
        if i % 2 == 0 {
            outcome = "said nothing";
            let target = ["repair", "replay", "checkpoint"][((i / 2) % 3) as usize];
            // Skip the test harness's own lines.
            while let Ok(l) = lines.recv_timeout(Duration::from_secs(10)) {
                if l.starts_with(target) {
                    outcome = match target {
                        "repair" => "killed when it reported repairing",
                        "replay" => "killed when it reported replaying the log",
                        _ => "killed when it reported checkpointing",
                    };
                    break;
                }
                if l.starts_with("checkpointed") {
                    outcome = "finished without reporting that step";
                    break;
                }
            }
            kill(child);
            let said: Vec<String> = lines.iter().collect();
            let finished = |step: &str| said.iter().any(|l| l.starts_with(step));
            match target {
                "repair" if outcome.starts_with("killed") => {
                    repairs_seen += 1;
                    if finished("replay") {
                        outcome = "finished repairing before the kill landed";
                    } else {
                        killed_in_repair += 1;
                    }
                }
                "replay" if outcome.starts_with("killed") => {
                    if finished("opened") {
                        outcome = "finished replaying before the kill landed";
                    } else {
                        killed_in_replay += 1;
                    }
                }
                "checkpoint" if outcome.starts_with("killed") => {
                    if finished("checkpointed") {
                        outcome = "finished checkpointing before the kill landed";
                    } else {
                        killed_in_checkpoint += 1;
                    }
                }
                _ => {}
            }
        } else {
            std::thread::sleep(Duration::from_micros(xorshift(&mut seed) % 30_000));
            kill(child);
            let said: Vec<String> = lines.iter().collect();
            if said.iter().any(|l| l.starts_with("repair")) {
                repairs_seen += 1;
            }
            for l in &said {
                if let Some(us) = l.strip_prefix("opened ").and_then(|us| us.parse::<u64>().ok()) {
                    child_repairs.push(us as f64 / 1e3);
                }
            }
            if !said.iter().any(|l| l.starts_with("opened")) {
                killed_before_open += 1;
                outcome = "killed before it had opened";
            }
        }
        // 3. Reopen here and check everything acknowledged so far.
        let t = check(&path, &acked);
        reopen_times.push(t);
        println!(
            "iteration {i}: {} keys acknowledged ({writes} writes so far); reopen child {outcome}; reopen {:.1} ms",
            acked.len(),
            t.as_secs_f64() * 1e3
        );
    }
    let ms: Vec<f64> = reopen_times.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    let mean = ms.iter().sum::<f64>() / ms.len().max(1) as f64;
    let max = ms.iter().copied().fold(0.0, f64::max);
    let child_mean = child_repairs.iter().sum::<f64>() / child_repairs.len().max(1) as f64;
    let child_max = child_repairs.iter().copied().fold(0.0, f64::max);
    println!(
        "kill -9 loop: {iterations} iterations, {writes} acknowledged writes, 0 lost; \
         open of the file right after the writer's kill -9 (redb repair, in {} reopen children): \
         mean {child_mean:.1} ms, max {child_max:.1} ms; reopen here after the reopen child: mean {mean:.1} ms, \
         max {max:.1} ms; reopen children: {repairs_seen} reported repairing, {killed_in_repair} killed during \
         repair, {killed_in_replay} killed during the log replay, {killed_in_checkpoint} killed during a \
         checkpoint, {killed_before_open} killed before they had opened",
        child_repairs.len()
    );
    assert!(writes > 0, "no write was acknowledged in {iterations} iterations");
}
