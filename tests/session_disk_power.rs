//! Power loss, simulated: `DiskStore` with redb and both log files on backends that keep
//! only what `sync_data` made durable (`SimMachine`: three `SimDisk`s cut at one instant),
//! writers on many threads, checkpoints running (small thresholds, so cuts land before,
//! during and after them), the power cut at a random moment, the store reopened on the
//! surviving bytes: every acknowledged write is there, at least at its acknowledged
//! version, with intact contents. Half the rounds also let a random subset of the writes
//! issued since the last sync survive (a disk may persist some), on the log disks also
//! as torn prefixes of writes.
//!
//! Rounds: `ERLMCP_POWER_ROUNDS` (default 20); seed: `ERLMCP_POWER_SEED` (default: time).

#![cfg(feature = "disk")]

#[path = "session_support/sim_disk.rs"]
mod sim_disk;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[path = "session_support/seeded.rs"]
mod seeded;
use seeded::{env_u64, xorshift};
#[path = "session_support/versioned.rs"]
mod versioned;
use versioned::{check_acked, write_next};

use erlmcp_rollout::session::{DiskOptions, DiskStore, StoreOptions};
use sim_disk::SimMachine;

const THREADS: usize = 8;
const KEYS_PER_THREAD: usize = 20;

/// The metadata of `key` at `version`: derived from both, of varying length.
fn meta(key: &str, version: u64) -> Vec<u8> {
    format!("{key}@{version};")
        .repeat(1 + (version % 7) as usize * 9)
        .into_bytes()
}

/// Writes on `THREADS` threads until the store fails; returns each key's highest
/// acknowledged version.
fn write_until_failure(
    store: &Arc<DiskStore>,
    acked: &Arc<Mutex<BTreeMap<String, u64>>>,
) -> Vec<std::thread::JoinHandle<u64>> {
    (0..THREADS)
        .map(|t| {
            let (store, acked) = (Arc::clone(store), Arc::clone(acked));
            std::thread::spawn(move || {
                let mut count = 0;
                for step in 0.. {
                    let key = format!("p{t}-{}", step % KEYS_PER_THREAD);
                    let result = write_next(&*store, &key, step, meta);
                    match result {
                        Ok(s) => {
                            count += 1;
                            let mut acked = acked.lock().unwrap();
                            let v = acked.entry(key).or_default();
                            *v = (*v).max(s.version);
                        }
                        Err(e) if e.is_retryable() => return count,
                        Err(e) => panic!("{key}: unexpected {e}"),
                    }
                }
                count
            })
        })
        .collect()
}

#[test]
fn acknowledged_writes_survive_simulated_power_loss() {
    let rounds = env_u64("ERLMCP_POWER_ROUNDS").unwrap_or(20);
    let mut seed = env_u64("ERLMCP_POWER_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1
    });
    println!("power-loss rounds {rounds}, ERLMCP_POWER_SEED={seed}");
    let acked: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let mut images: [Vec<u8>; 3] = Default::default();
    let mut total = 0;
    for round in 0..rounds {
        let machine = SimMachine::from_images(images);
        // Checkpoints every few KiB of log or every few ms: cuts land in all their steps.
        let checkpoint_bytes = 1 << (10 + xorshift(&mut seed) % 8);
        let settings = DiskOptions {
            checkpoint_bytes,
            checkpoint_interval: Some(Duration::from_millis(1 + xorshift(&mut seed) % 20)),
            checkpoint_on_close: true,
            // Files that grow to each frame's end, by small extents (many growths per
            // checkpoint) or by large ones (room to spare); it may change between opens.
            log_extent_bytes: [0, 512, checkpoint_bytes][(xorshift(&mut seed) % 3) as usize],
        };
        let store = Arc::new(machine.open(StoreOptions::default(), settings).unwrap());
        check_acked(&*store, &acked.lock().unwrap(), meta, "power loss");
        let writers = write_until_failure(&store, &acked);
        std::thread::sleep(Duration::from_micros(500 + xorshift(&mut seed) % 30_000));
        let torn = (round % 2 == 1).then(|| xorshift(&mut seed));
        images = machine.power_cut(torn);
        let writes: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
        total += writes;
        drop(store);
        println!(
            "round {round}: cut{} after {writes} acknowledged writes; {} keys acknowledged, {}/{}/{} bytes survive (redb/log 0/log 1)",
            if torn.is_some() { " (torn)" } else { "" },
            acked.lock().unwrap().len(),
            images[0].len(),
            images[1].len(),
            images[2].len()
        );
    }
    let store = SimMachine::from_images(images)
        .open(StoreOptions::default(), DiskOptions::default())
        .unwrap();
    let acked = acked.lock().unwrap();
    assert!(!acked.is_empty(), "no write was acknowledged in {rounds} rounds");
    println!("{total} acknowledged writes in {rounds} rounds, all present");
    check_acked(&store, &acked, meta, "power loss");
}
