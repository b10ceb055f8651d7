//! `SimDisk`: a redb `StorageBackend` in memory that knows which bytes a power loss
//! would keep, plus fault injection (failing or slow `sync_data`); `SimMachine`: the
//! three files of a `DiskStore` (redb and its two log files) on such disks, cut at one
//! instant.
//!
//! Every write goes to the *live* image at once (what the process reads back, like the
//! page cache). `sync_data` makes the live image *durable*. [`SimDisk::power_cut`]
//! returns the bytes that survive a power loss at that instant (the durable image, plus
//! optionally a random subset of the writes issued since the last sync, as a disk may
//! persist some of them) and makes every later I/O call fail, as the machine is off.

#![allow(dead_code)] // each test file uses a part

use std::io::{Error, ErrorKind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redb::StorageBackend;

#[derive(Debug, Default)]
struct State {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Writes since the last sync, in order: (offset, bytes); `None` bytes: a `set_len`.
    unsynced: Vec<(u64, Option<Vec<u8>>)>,
    off: bool,
    fail_sync: bool,
    sync_delay: Duration,
}

/// An in-memory disk with power-loss semantics; clones share the disk.
#[derive(Clone, Debug, Default)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
    syncs: Arc<AtomicU64>,
}

fn io(kind: ErrorKind, what: &str) -> Error {
    Error::new(kind, what.to_string())
}

impl SimDisk {
    /// A disk holding `image` (durable), e.g. what a power cut left.
    pub fn from_image(image: Vec<u8>) -> Self {
        let disk = SimDisk::default();
        {
            let mut s = disk.lock();
            s.live = image.clone();
            s.durable = image;
        }
        disk
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Successful `sync_data` calls so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }

    /// Makes `sync_data` fail (`true`) or work again (`false`).
    pub fn fail_sync(&self, fail: bool) {
        self.lock().fail_sync = fail;
    }

    /// Makes each `sync_data` take `delay` (a slow disk).
    pub fn sync_delay(&self, delay: Duration) {
        self.lock().sync_delay = delay;
    }

    /// Power loss now: returns the bytes that survive and turns the disk off (every later
    /// call fails). With `torn = Some(seed)`, each write issued since the last sync also
    /// survives with probability 1/2 (chosen by `seed`), in issue order.
    pub fn power_cut(&self, torn: Option<u64>) -> Vec<u8> {
        cut(&mut self.lock(), torn, false)
    }
}

/// What survives on one disk (see [`SimDisk::power_cut`]); the disk is off afterwards.
/// With `tear`, a surviving unsynced write may also survive only in part: a random
/// prefix of it (one in four), as a write cut by the power loss mid-way.
fn cut(s: &mut State, torn: Option<u64>, tear: bool) -> Vec<u8> {
    s.off = true;
    let mut image = s.durable.clone();
    if let Some(mut seed) = torn {
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for (offset, data) in &s.unsynced {
            if next() & 1 == 0 {
                continue;
            }
            let offset = usize::try_from(*offset).unwrap_or(usize::MAX);
            match data {
                Some(bytes) => {
                    let kept = if tear && next() % 4 == 0 {
                        &bytes[..(next() % (bytes.len() as u64 + 1)) as usize]
                    } else {
                        &bytes[..]
                    };
                    if image.len() < offset + kept.len() {
                        image.resize(offset + kept.len(), 0);
                    }
                    image[offset..offset + kept.len()].copy_from_slice(kept);
                }
                None => image.resize(offset, 0),
            }
        }
    }
    image
}

/// The files of one `DiskStore` on simulated disks of one machine: redb and the two log
/// files. Clones share the disks.
#[derive(Clone, Debug, Default)]
pub struct SimMachine {
    pub db: SimDisk,
    pub logs: [SimDisk; 2],
}

impl SimMachine {
    /// A machine whose disks hold `images` (durable): redb, log 0, log 1.
    pub fn from_images([db, l0, l1]: [Vec<u8>; 3]) -> Self {
        SimMachine {
            db: SimDisk::from_image(db),
            logs: [SimDisk::from_image(l0), SimDisk::from_image(l1)],
        }
    }

    /// A store on these disks.
    pub fn open(
        &self,
        options: erlmcp_rollout::session::StoreOptions,
        settings: erlmcp_rollout::session::DiskOptions,
    ) -> Result<erlmcp_rollout::session::DiskStore, erlmcp_rollout::session::StoreError> {
        erlmcp_rollout::session::DiskStore::with_backends(self.db.clone(), self.logs.clone(), options, settings)
    }

    /// Power loss on all three disks at one instant (every disk is locked while the
    /// images are taken): redb, log 0, log 1. `torn` as for [`SimDisk::power_cut`], with
    /// a different stream per disk; on the log disks a surviving write may also survive
    /// only in part (a prefix), since the log does not rely on whole writes.
    pub fn power_cut(&self, torn: Option<u64>) -> [Vec<u8>; 3] {
        let mut db = self.db.lock();
        let mut l0 = self.logs[0].lock();
        let mut l1 = self.logs[1].lock();
        let seed = |k: u64| torn.map(|t| t.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(k) | 1);
        [
            cut(&mut db, seed(1), false),
            cut(&mut l0, seed(2), true),
            cut(&mut l1, seed(3), true),
        ]
    }

    /// Successful `sync_data` calls on the log disks.
    pub fn log_syncs(&self) -> u64 {
        self.logs[0].syncs() + self.logs[1].syncs()
    }
}

impl StorageBackend for SimDisk {
    fn len(&self) -> Result<u64, Error> {
        let s = self.lock();
        if s.off {
            return Err(io(ErrorKind::Other, "power is off"));
        }
        Ok(s.live.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), Error> {
        let s = self.lock();
        if s.off {
            return Err(io(ErrorKind::Other, "power is off"));
        }
        let start = usize::try_from(offset).map_err(|_| io(ErrorKind::UnexpectedEof, "offset"))?;
        let end = start.checked_add(out.len()).filter(|&e| e <= s.live.len());
        let end = end.ok_or_else(|| io(ErrorKind::UnexpectedEof, "read past the end"))?;
        out.copy_from_slice(&s.live[start..end]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), Error> {
        let mut s = self.lock();
        if s.off {
            return Err(io(ErrorKind::Other, "power is off"));
        }
        let n = usize::try_from(len).map_err(|_| io(ErrorKind::InvalidInput, "length"))?;
        s.live.resize(n, 0);
        s.unsynced.push((len, None));
        Ok(())
    }

    fn sync_data(&self) -> Result<(), Error> {
        let delay = self.lock().sync_delay;
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let mut s = self.lock();
        if s.off {
            return Err(io(ErrorKind::Other, "power is off"));
        }
        if s.fail_sync {
            return Err(io(ErrorKind::Other, "injected sync_data failure"));
        }
        s.durable = s.live.clone();
        s.unsynced.clear();
        self.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        let mut s = self.lock();
        if s.off {
            return Err(io(ErrorKind::Other, "power is off"));
        }
        let start = usize::try_from(offset).map_err(|_| io(ErrorKind::InvalidInput, "offset"))?;
        let end = start + data.len();
        if s.live.len() < end {
            s.live.resize(end, 0);
        }
        s.live[start..end].copy_from_slice(data);
        s.unsynced.push((offset, Some(data.to_vec())));
        Ok(())
    }
}
