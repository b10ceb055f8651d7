//! Backfill: copy every record of one store into another, in key order, resumably.
//!
//! The source is read with [`Visibility::Raw`] scans, so tombstones, expired records and
//! versions are copied as they are, and written to the target with
//! [`Store::apply_batch_if_newer`], so a record the target already holds at the same or a
//! newer version (e.g. written meanwhile by the dual-write relay) is never overwritten.
//! Running a backfill twice, or re-running a chunk after a crash, is therefore harmless.
//!
//! **Checkpoint.** After each chunk has been applied (acknowledged by the target), the
//! last key copied and the counts ([`Checkpoint`], JSON) are written durably to the
//! checkpoint file, a [`SlotFile`] (two alternating slots, one `fdatasync` per chunk; a
//! torn write leaves the previous checkpoint readable). A killed backfill resumes ([`BackfillConfig::resume`]) after that key; the
//! chunk in flight at the kill is copied again (its records then count as skipped).
//!
//! **Progress and ETA.** Unless [`BackfillConfig::count_total`] is off, a first pass
//! counts the source's records (a raw scan of keys and values, no writes): it costs one
//! read of the source and gives an exact total, so the ETA is `(total - scanned) / rate`,
//! with the rate measured over this run. Records written to the source during the
//! backfill can make `scanned` end above or below the total.
//!
//! # Examples
//! ```
//! use erlmcp_rollout::migrate::backfill::{backfill, BackfillConfig};
//! use erlmcp_rollout::session::{MemoryStore, Session, SessionId, Store, StoreOptions, Timeout};
//!
//! let source = MemoryStore::new(StoreOptions::default());
//! let target = MemoryStore::new(StoreOptions::default());
//! for i in 0..10 {
//!     source.put(Session::new(SessionId::new(format!("s{i}"))?, 0, Timeout::Infinity, vec![]))?;
//! }
//! source.delete(&SessionId::new("s3")?)?;
//! let report = backfill(&source, &target, &BackfillConfig { chunk: 4, ..Default::default() }, &mut |_| {})?;
//! assert_eq!((report.scanned, report.applied, report.total), (10, 10, Some(10)));
//! assert!(target.get_raw(&SessionId::new("s3")?)?.is_some_and(|s| s.tombstone));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::durable::SlotFile;
use super::{MigrateError, Role};
use crate::session::{codec, SessionId, Store, StoreError, Visibility};

/// How a backfill runs.
#[derive(Clone, Debug)]
pub struct BackfillConfig {
    /// Records per chunk (one scan page, one `apply_batch_if_newer`, one checkpoint).
    pub chunk: usize,
    /// At most this many records per second (`None`: as fast as the stores go).
    pub rate: Option<u64>,
    /// Where the checkpoint is kept (`None`: no checkpoint, not resumable).
    pub checkpoint: Option<PathBuf>,
    /// Continue from the checkpoint. Without it an unfinished checkpoint is refused (so
    /// that a backfill is not restarted from scratch by accident).
    pub resume: bool,
    /// Count the source first, for an exact total and an ETA.
    pub count_total: bool,
    /// Names of the stores, kept in the checkpoint; a resume with other names is refused.
    pub source_label: String,
    /// See [`BackfillConfig::source_label`].
    pub target_label: String,
    /// Retries of a retryable ([`StoreError::Unavailable`]) error per chunk, with
    /// exponential backoff from 50 ms, before the backfill stops with the error.
    pub retries: u32,
}

impl Default for BackfillConfig {
    /// Chunks of 1000, no rate limit, no checkpoint, counting first, 5 retries.
    fn default() -> Self {
        BackfillConfig {
            chunk: 1000,
            rate: None,
            checkpoint: None,
            resume: false,
            count_total: true,
            source_label: String::new(),
            target_label: String::new(),
            retries: 5,
        }
    }
}

/// The persisted state of a backfill (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Format of this file, `1`.
    pub format: u32,
    /// [`BackfillConfig::source_label`] of the run that wrote it.
    pub source: String,
    /// [`BackfillConfig::target_label`] of the run that wrote it.
    pub target: String,
    /// Hex of the last key copied (`None`: nothing yet).
    pub after_hex: Option<String>,
    /// Records read from the source so far.
    pub scanned: u64,
    /// Records written to the target so far.
    pub applied: u64,
    /// Records the target already had at the same or a newer version.
    pub skipped: u64,
    /// The whole source has been copied.
    pub done: bool,
}

impl Checkpoint {
    /// Reads a checkpoint file; `Ok(None)` when it does not exist.
    ///
    /// # Errors
    /// [`MigrateError::File`] when it cannot be read or is not a checkpoint.
    pub fn load(path: &std::path::Path) -> Result<Option<Checkpoint>, MigrateError> {
        let Some(bytes) = SlotFile::read(path).map_err(|e| MigrateError::file("checkpoint", path, e))? else {
            return Ok(None);
        };
        Checkpoint::parse(path, &bytes).map(Some)
    }

    fn parse(path: &std::path::Path, bytes: &[u8]) -> Result<Checkpoint, MigrateError> {
        let cp: Checkpoint = serde_json::from_slice(bytes).map_err(|e| MigrateError::file("checkpoint", path, e))?;
        if cp.format != 1 {
            return Err(MigrateError::file(
                "checkpoint",
                path,
                format!("unknown format {}", cp.format),
            ));
        }
        Ok(cp)
    }

    /// The key to continue after.
    ///
    /// # Errors
    /// [`MigrateError::File`]-style message when `after_hex` is not a valid id.
    fn after(&self, path: &std::path::Path) -> Result<Option<SessionId>, MigrateError> {
        self.after_hex
            .as_deref()
            .map(|h| {
                codec::from_hex(h)
                    .and_then(|b| SessionId::new(b).map_err(|e| e.to_string()))
                    .map_err(|e| MigrateError::file("checkpoint", path, format!("after_hex: {e}")))
            })
            .transpose()
    }
}

/// A progress report, given to the callback after each chunk and at the end.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackfillProgress {
    /// Records read from the source (including those of a resumed run).
    pub scanned: u64,
    /// Records written to the target.
    pub applied: u64,
    /// Records skipped because the target had the same or a newer version.
    pub skipped: u64,
    /// The source's record count from the first pass, if counted.
    pub total: Option<u64>,
    /// Time this run has taken.
    #[serde(serialize_with = "ser_secs")]
    pub elapsed: Duration,
    /// Records per second over this run.
    pub rate: f64,
    /// Estimated time left, when the total is known and the rate is positive.
    #[serde(serialize_with = "ser_opt_secs")]
    pub eta: Option<Duration>,
    /// Whether the backfill has finished.
    pub done: bool,
    /// Whether this run continued from a checkpoint.
    pub resumed: bool,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn ser_opt_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

/// Counts the records of a store (raw scan in pages of `page`).
///
/// # Errors
/// The scan's errors.
pub fn count_records(store: &dyn Store, page: usize) -> Result<u64, StoreError> {
    let mut n = 0u64;
    let mut after = None;
    loop {
        let p = store.scan(after.as_ref(), page, Visibility::Raw)?;
        n += p.records.len() as u64;
        match p.next {
            Some(next) => after = Some(next),
            None => return Ok(n),
        }
    }
}

/// Runs `f`, retrying a retryable error up to `retries` times with exponential backoff.
pub(crate) fn with_retries<T>(retries: u32, mut f: impl FnMut() -> Result<T, StoreError>) -> Result<T, StoreError> {
    let mut delay = Duration::from_millis(50);
    let mut attempt = 0;
    loop {
        match f() {
            Err(e) if e.is_retryable() && attempt < retries => {
                attempt += 1;
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// Copies `source` into `target` (see the module docs), calling `progress` after every
/// chunk and once at the end (with `done: true`). Returns the final progress.
///
/// # Errors
/// [`MigrateError::Invalid`] for a chunk of 0; [`MigrateError::File`] when the
/// checkpoint cannot be read or written, belongs to other stores, or is unfinished and
/// `resume` is off; [`MigrateError::Store`] naming the store that failed (after the
/// retries). Everything copied before an error stays copied and checkpointed.
pub fn backfill(
    source: &dyn Store,
    target: &dyn Store,
    config: &BackfillConfig,
    progress: &mut dyn FnMut(&BackfillProgress),
) -> Result<BackfillProgress, MigrateError> {
    if config.chunk == 0 {
        return Err(MigrateError::Invalid("backfill chunk must be at least 1".into()));
    }
    let start = Instant::now();
    let mut cp = Checkpoint {
        format: 1,
        source: config.source_label.clone(),
        target: config.target_label.clone(),
        after_hex: None,
        scanned: 0,
        applied: 0,
        skipped: 0,
        done: false,
    };
    let mut resumed = false;
    let mut slots = None;
    if let Some(path) = &config.checkpoint {
        let file = SlotFile::open(path).map_err(|e| MigrateError::file("checkpoint", path, e))?;
        let old = file.latest().map(|b| Checkpoint::parse(path, b)).transpose()?;
        slots = Some(file);
        if let Some(old) = old {
            if old.source != cp.source || old.target != cp.target {
                return Err(MigrateError::file(
                    "checkpoint",
                    path,
                    format!(
                        "it belongs to a backfill from {:?} to {:?}, not from {:?} to {:?}",
                        old.source, old.target, cp.source, cp.target
                    ),
                ));
            }
            if !config.resume {
                return Err(MigrateError::file(
                    "checkpoint",
                    path,
                    if old.done {
                        "exists and says the backfill finished; remove it to copy again"
                    } else {
                        "exists (an unfinished backfill); resume it or remove the file"
                    },
                ));
            }
            cp = old;
            resumed = true;
        }
    }
    let total = if config.count_total && !cp.done {
        Some(count_records(source, config.chunk.max(1000)).map_err(MigrateError::store(Role::Source))?)
    } else {
        None
    };
    // A slow rate limit gets small chunks, so that the limit is smooth.
    let chunk = match config.rate {
        Some(r) => config.chunk.min(usize::try_from(r / 4).unwrap_or(usize::MAX).max(1)),
        None => config.chunk,
    };
    let path = config.checkpoint.as_deref();
    let mut after = match path {
        Some(p) => cp.after(p)?,
        None => None,
    };
    let scanned_before = cp.scanned;
    let report = |cp: &Checkpoint, done: bool| {
        let elapsed = start.elapsed();
        let this_run = cp.scanned.saturating_sub(scanned_before);
        let rate = if elapsed.as_secs_f64() > 0.0 {
            this_run as f64 / elapsed.as_secs_f64()
        } else {
            0.0
        };
        let eta = match total {
            Some(t) if rate > 0.0 && !done => Some(Duration::from_secs_f64(t.saturating_sub(cp.scanned) as f64 / rate)),
            Some(_) if done => Some(Duration::ZERO),
            _ => None,
        };
        BackfillProgress {
            scanned: cp.scanned,
            applied: cp.applied,
            skipped: cp.skipped,
            total,
            elapsed,
            rate,
            eta,
            done,
            resumed,
        }
    };
    while !cp.done {
        let page = with_retries(config.retries, || source.scan(after.as_ref(), chunk, Visibility::Raw))
            .map_err(MigrateError::store(Role::Source))?;
        let last = page.records.last().map(|s| s.id.clone());
        let n = page.records.len() as u64;
        if n > 0 {
            let records = page.records;
            let outcome = with_retries(config.retries, || target.apply_batch_if_newer(records.clone()))
                .map_err(MigrateError::store(Role::Target))?;
            cp.scanned += n;
            cp.applied += outcome.applied as u64;
            cp.skipped += outcome.skipped as u64;
        }
        if let Some(l) = &last {
            cp.after_hex = Some(codec::to_hex(l.as_bytes()));
            after = Some(l.clone());
        }
        cp.done = page.next.is_none();
        if let (Some(p), Some(file)) = (path, slots.as_mut()) {
            let bytes = serde_json::to_vec(&cp).map_err(|e| MigrateError::file("checkpoint", p, e))?;
            file.write(&bytes).map_err(|e| MigrateError::file("checkpoint", p, e))?;
        }
        if !cp.done {
            progress(&report(&cp, false));
        }
        if let Some(r) = config.rate.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(cp.scanned.saturating_sub(scanned_before) as f64 / r as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    let done = report(&cp, true);
    progress(&done);
    Ok(done)
}
