//! The dual-write [`Migrator`]: a [`Store`] over a primary (old) and a secondary (new)
//! store that moves sessions from one to the other without downtime and without losing
//! an acknowledged write (DESIGN §5).
//!
//! **Write path** (phases 1 and 2): the key's intent is recorded durably in the
//! [`Outbox`], then the primary is written, then the call returns. Nothing is written to
//! the secondary on the caller's thread. In phase 3 the same happens with the roles
//! swapped when the reverse outbox is on (the secondary is written, the primary follows).
//!
//! **Relay** ([`Migrator::relay_step`], run by [`Migrator::start_relay`]'s thread or by
//! [`Migrator::drain`]): takes intents in order, reads the store of record's *current*
//! raw record of each key ([`Store::get_raw`]: tombstones included) and writes it to the
//! other store with [`Store::apply_batch_if_newer`], then removes the intents. Applying
//! is idempotent (write-if-newer by version), so retries and re-applied intents after a
//! crash are harmless; a delete is a tombstone with a higher version, so a late copy of
//! an older record can never resurrect it. Failed steps are retried with exponential
//! backoff and jitter until they succeed; intents are never dropped.
//!
//! A key whose write is still in flight (intent recorded, store write not yet returned)
//! is not relayed in that step: its record may be about to change, and removing the
//! intent now could lose that change. After a crash nothing is in flight, so every
//! intent is relayed; one whose write never happened just copies the current record.
//!
//! **Reads.** Phase 1 reads the primary; one read in [`MigratorConfig::shadow_sample`]
//! also reads both stores' raw records and counts match / mismatch / missing (keys with
//! intents pending are not compared: the secondary is allowed to lag them). Phase 2
//! reads the secondary — except keys with intents pending or in flight, which are read
//! from the primary so a caller always reads its own writes — and falls back to the
//! primary (counted) when the secondary does not have the session or fails. Scans and
//! `get_raw` are served by the store of record (the primary until phase 3).
//!
//! **Tombstones** must outlive the migration: set `tombstone_retention_ms` of both stores
//! above the time from the first dual write to the last verification. A tombstone swept
//! before the relay copies it simply leaves nothing to copy; the secondary's own sweep
//! removes its copy, and verify reports any leftover as missing on the source.
//!
//! **Gates** ([`Migrator::advance`]): `off -> phase1` is free; `phase1 -> phase2` and
//! `phase2 -> phase3` need the outbox drained and [`verify`] clean; `phase3 -> cleanup`
//! needs the reverse outbox (if on) drained. The final check runs with writes paused
//! (the phase lock), so nothing slips in between the check and the change. Rollbacks
//! ([`Migrator::rollback`]) are always allowed one step back, except out of `phase3`
//! without a reverse outbox (the primary lacks phase 3's writes) and out of `cleanup`.
//! Every change is saved in the [`PhaseStore`] before it takes effect, and read back by
//! [`Migrator::open`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::outbox::{Direction, Outbox};
use super::phase::{GateRefusal, Phase, PhaseState, PhaseStore};
use super::verify::{compare, verify, VerifyConfig, VerifyReport};
use super::{MigrateError, Role};
use crate::session::{
    BatchOutcome, Clock, ScanPage, Session, SessionId, Store, StoreError, SweepOutcome, SystemClock, TouchPolicy,
    Visibility,
};

/// Settings of a [`Migrator`].
#[derive(Clone)]
pub struct MigratorConfig {
    /// In phase 1, one read in this many is shadow-read from the secondary (0: none).
    pub shadow_sample: u64,
    /// Intents taken per relay step.
    pub relay_batch: usize,
    /// First retry delay after a failed relay step; doubles up to [`MigratorConfig::backoff_max`].
    pub backoff_base: Duration,
    /// Longest retry delay (before jitter).
    pub backoff_max: Duration,
    /// How long the relay thread sleeps when the outbox is empty (a write wakes it).
    pub idle_poll: Duration,
    /// The touch policy of the stores: a touch that will be written records its intent
    /// first. (A touch the policy did not predict is still recorded, right after.)
    pub touch: TouchPolicy,
    /// "Now" for touch decisions and shadow comparisons.
    pub clock: Arc<dyn Clock>,
    /// How verification (for the gates) runs.
    pub verify: VerifyConfig,
    /// An extra gate [`Migrator::advance`] runs first, given the current and the requested
    /// phase; an error refuses the move (nothing changed). With an etcd phase store,
    /// `EtcdPhaseStore::ack_gate` refuses while some node has not applied the current phase.
    pub advance_gate: Option<AdvanceGate>,
}

/// A gate for [`MigratorConfig::advance_gate`]: `(from, to)`, `Err` refuses the move.
pub type AdvanceGate = Arc<dyn Fn(Phase, Phase) -> Result<(), MigrateError> + Send + Sync>;

impl std::fmt::Debug for MigratorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigratorConfig")
            .field("shadow_sample", &self.shadow_sample)
            .field("relay_batch", &self.relay_batch)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_max", &self.backoff_max)
            .field("advance_gate", &self.advance_gate.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for MigratorConfig {
    /// Shadow-read 1 % of reads, 512 intents per step, backoff 10 ms .. 5 s, idle poll
    /// 50 ms, the default touch policy, the system clock.
    fn default() -> Self {
        MigratorConfig {
            shadow_sample: 100,
            relay_batch: 512,
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_secs(5),
            idle_poll: Duration::from_millis(50),
            touch: TouchPolicy::default(),
            clock: Arc::new(SystemClock),
            verify: VerifyConfig::default(),
            advance_gate: None,
        }
    }
}

/// What a migrator has counted since it was opened ([`Migrator::counters`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MigratorCounters {
    /// The phase applied.
    pub phase: Phase,
    /// Shadow reads whose records matched.
    pub shadow_match: u64,
    /// Shadow reads whose records differed.
    pub shadow_mismatch: u64,
    /// Shadow reads where the secondary had no record and the primary had one.
    pub shadow_missing: u64,
    /// Shadow reads that failed (a store error).
    pub shadow_errors: u64,
    /// Phase 2 reads answered by the primary because the secondary lacked the session or failed.
    pub fallbacks: u64,
    /// Phase 2 reads sent to the primary because the key had intents pending.
    pub pending_reads: u64,
    /// Records written by the relay.
    pub relay_applied: u64,
    /// Records the relay found already there (same or newer version).
    pub relay_skipped: u64,
    /// Relay steps that failed (each is retried).
    pub relay_failed: u64,
    /// Relay steps run after a failure (retries).
    pub relay_retried: u64,
    /// Intents in the outbox now.
    pub outbox_depth: u64,
}

impl MigratorCounters {
    /// The counters in the Prometheus text exposition format.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::migrate::dual::MigratorCounters;
    /// let text = MigratorCounters { fallbacks: 3, ..Default::default() }.prometheus_text();
    /// assert!(text.contains("erlmcp_migration_fallback_reads_total 3\n"));
    /// assert!(text.contains("erlmcp_migration_phase{phase=\"off\"} 1\n"));
    /// ```
    pub fn prometheus_text(&self) -> String {
        let mut o = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            o.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (labels, v) in samples {
                o.push_str(&format!("{name}{labels} {v}\n"));
            }
        };
        let phases: Vec<(String, u64)> = Phase::ALL
            .iter()
            .map(|p| (format!("{{phase=\"{p}\"}}"), u64::from(*p == self.phase)))
            .collect();
        let phases: Vec<(&str, u64)> = phases.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        metric(
            "erlmcp_migration_phase",
            "gauge",
            "The migration phase this node applies (1 for the current one).",
            &phases,
        );
        metric(
            "erlmcp_migration_shadow_reads_total",
            "counter",
            "Phase 1 shadow reads of the secondary, by result.",
            &[
                ("{result=\"match\"}", self.shadow_match),
                ("{result=\"mismatch\"}", self.shadow_mismatch),
                ("{result=\"missing\"}", self.shadow_missing),
                ("{result=\"error\"}", self.shadow_errors),
            ],
        );
        metric(
            "erlmcp_migration_fallback_reads_total",
            "counter",
            "Phase 2 reads answered by the primary after the secondary lacked the session or failed.",
            &[("", self.fallbacks)],
        );
        metric(
            "erlmcp_migration_pending_reads_total",
            "counter",
            "Phase 2 reads sent to the primary because the key had writes not yet relayed.",
            &[("", self.pending_reads)],
        );
        metric(
            "erlmcp_migration_relay_records_total",
            "counter",
            "Records the relay copied (applied) or found already current (skipped).",
            &[
                ("{result=\"applied\"}", self.relay_applied),
                ("{result=\"skipped\"}", self.relay_skipped),
            ],
        );
        metric(
            "erlmcp_migration_relay_failures_total",
            "counter",
            "Relay steps that failed and will be retried.",
            &[("", self.relay_failed)],
        );
        metric(
            "erlmcp_migration_relay_retries_total",
            "counter",
            "Relay steps run after a failure.",
            &[("", self.relay_retried)],
        );
        metric(
            "erlmcp_migration_outbox_depth",
            "gauge",
            "Intents recorded and not yet applied to the other store.",
            &[("", self.outbox_depth)],
        );
        o
    }
}

#[derive(Default)]
struct Counters {
    shadow_match: AtomicU64,
    shadow_mismatch: AtomicU64,
    shadow_missing: AtomicU64,
    shadow_errors: AtomicU64,
    fallbacks: AtomicU64,
    pending_reads: AtomicU64,
    relay_applied: AtomicU64,
    relay_skipped: AtomicU64,
    relay_failed: AtomicU64,
    relay_retried: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Per key: writes in flight and intents recorded but not yet relayed.
#[derive(Default, Clone, Copy)]
struct KeyState {
    inflight: u32,
    intents: u32,
}

/// What one [`Migrator::relay_step`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStep {
    /// Intents taken from the outbox and removed.
    pub intents: usize,
    /// Records written to the other store.
    pub applied: usize,
    /// Records the other store already had (same or newer version).
    pub skipped: usize,
    /// Intents left for a later step because their key's write is in flight.
    pub deferred: usize,
}

/// The dual-write migrator; see the [module docs](self).
///
/// # Examples
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use erlmcp_rollout::migrate::dual::{Migrator, MigratorConfig};
/// use erlmcp_rollout::migrate::outbox::Outbox;
/// use erlmcp_rollout::migrate::phase::{FilePhaseStore, Phase};
/// use erlmcp_rollout::session::{MemoryStore, Session, SessionId, Store, StoreOptions, Timeout};
///
/// let dir = tempfile::tempdir()?;
/// let old: Arc<dyn Store> = Arc::new(MemoryStore::new(StoreOptions::default()));
/// let new: Arc<dyn Store> = Arc::new(MemoryStore::new(StoreOptions::default()));
/// let m = Migrator::open(
///     old.clone(),
///     new.clone(),
///     Outbox::open(dir.path().join("outbox.redb"))?,
///     Box::new(FilePhaseStore::new(dir.path().join("phase.json"))),
///     MigratorConfig::default(),
/// )?;
/// assert_eq!(m.advance(Duration::from_secs(5))?, Phase::Phase1);
/// let id = SessionId::new("s1")?;
/// m.put(Session::new(id.clone(), 0, Timeout::Infinity, b"x".to_vec()))?;
/// m.drain(Duration::from_secs(5))?;
/// assert_eq!(new.get(&id)?.metadata.as_ref(), b"x");
/// assert_eq!(m.advance(Duration::from_secs(5))?, Phase::Phase2); // drained and verified
/// assert_eq!(m.get(&id)?.version, 1); // now read from the secondary
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Migrator {
    primary: Arc<dyn Store>,
    secondary: Arc<dyn Store>,
    outbox: Outbox,
    phases: Box<dyn PhaseStore>,
    state: RwLock<PhaseState>,
    keys: Mutex<HashMap<SessionId, KeyState>>,
    counters: Counters,
    relay_lock: Mutex<()>,
    reads: AtomicU64,
    wake: (Mutex<bool>, Condvar),
    config: MigratorConfig,
}

impl std::fmt::Debug for Migrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migrator")
            .field("phase", &self.phase())
            .field("outbox", &self.outbox)
            .finish_non_exhaustive()
    }
}

fn outbox_unavailable(e: MigrateError) -> StoreError {
    StoreError::Unavailable {
        reason: format!("migration outbox: {e}"),
    }
}

/// Releases a key's in-flight mark when the write is over (also on error or panic).
struct InFlight<'a> {
    m: &'a Migrator,
    key: SessionId,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut keys = self.m.lock_keys();
        if let Some(k) = keys.get_mut(&self.key) {
            k.inflight = k.inflight.saturating_sub(1);
            if k.inflight == 0 && k.intents == 0 {
                keys.remove(&self.key);
            }
        }
    }
}

impl Migrator {
    /// A migrator over `primary` and `secondary`, in the phase `phases` holds (`off` when
    /// none was saved), with the intents `outbox` still holds pending (a restart after a
    /// crash continues where it stopped). Call [`Migrator::start_relay`] (or
    /// [`Migrator::drain`]) to move intents.
    ///
    /// # Errors
    /// [`MigrateError::File`] when the phase or the outbox cannot be read.
    pub fn open(
        primary: Arc<dyn Store>,
        secondary: Arc<dyn Store>,
        outbox: Outbox,
        phases: Box<dyn PhaseStore>,
        config: MigratorConfig,
    ) -> Result<Self, MigrateError> {
        let state = phases.load()?.unwrap_or_else(|| PhaseState::new(Phase::Off));
        let mut keys: HashMap<SessionId, KeyState> = HashMap::new();
        for intent in outbox.peek(usize::MAX)? {
            keys.entry(intent.key).or_default().intents += 1;
        }
        Ok(Migrator {
            primary,
            secondary,
            outbox,
            phases,
            state: RwLock::new(state),
            keys: Mutex::new(keys),
            counters: Counters::default(),
            relay_lock: Mutex::new(()),
            reads: AtomicU64::new(0),
            wake: (Mutex::new(false), Condvar::new()),
            config,
        })
    }

    /// The phase applied now.
    pub fn phase(&self) -> Phase {
        self.state.read().unwrap_or_else(PoisonError::into_inner).phase
    }

    /// The persisted migration state (phase, reverse outbox, history).
    pub fn state(&self) -> PhaseState {
        self.state.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The primary (old) store.
    pub fn primary(&self) -> &Arc<dyn Store> {
        &self.primary
    }

    /// The secondary (new) store.
    pub fn secondary(&self) -> &Arc<dyn Store> {
        &self.secondary
    }

    fn lock_keys(&self) -> MutexGuard<'_, HashMap<SessionId, KeyState>> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_pending(&self, id: &SessionId) -> bool {
        self.lock_keys().contains_key(id)
    }

    /// Current counters.
    ///
    /// # Errors
    /// [`MigrateError::File`] when the outbox depth cannot be read.
    pub fn counters(&self) -> Result<MigratorCounters, MigrateError> {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Ok(MigratorCounters {
            phase: self.phase(),
            shadow_match: get(&c.shadow_match),
            shadow_mismatch: get(&c.shadow_mismatch),
            shadow_missing: get(&c.shadow_missing),
            shadow_errors: get(&c.shadow_errors),
            fallbacks: get(&c.fallbacks),
            pending_reads: get(&c.pending_reads),
            relay_applied: get(&c.relay_applied),
            relay_skipped: get(&c.relay_skipped),
            relay_failed: get(&c.relay_failed),
            relay_retried: get(&c.relay_retried),
            outbox_depth: self.outbox.depth()?,
        })
    }

    /// Intents in the outbox.
    ///
    /// # Errors
    /// [`MigrateError::File`] when the outbox cannot be read.
    pub fn outbox_depth(&self) -> Result<u64, MigrateError> {
        self.outbox.depth()
    }

    /// Runs a write of `keys` under the current phase: records the intents first when the
    /// phase copies writes, then calls `write` on the store of record.
    fn write<T>(
        &self,
        keys: &[SessionId],
        write: impl FnOnce(&dyn Store, Option<&dyn Fn() -> Result<(), StoreError>>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let (store, direction) = self.route(&state);
        let Some(direction) = direction else {
            return write(store.as_ref(), None);
        };
        let _marks: Vec<InFlight<'_>> = {
            let mut map = self.lock_keys();
            keys.iter()
                .map(|k| {
                    map.entry(k.clone()).or_default().inflight += 1;
                    InFlight {
                        m: self,
                        key: k.clone(),
                    }
                })
                .collect()
        };
        let recorded = std::sync::atomic::AtomicBool::new(false);
        let record = || -> Result<(), StoreError> {
            if recorded.swap(true, Ordering::AcqRel) {
                return Ok(());
            }
            self.outbox.record_many(direction, keys).map_err(outbox_unavailable)?;
            let mut map = self.lock_keys();
            for k in keys {
                map.entry(k.clone()).or_default().intents += 1;
            }
            drop(map);
            self.wake_relay();
            Ok(())
        };
        write(store.as_ref(), Some(&record))
    }

    /// The store of record and the direction its writes are copied in (if they are).
    fn route(&self, state: &PhaseState) -> (&Arc<dyn Store>, Option<Direction>) {
        match state.phase {
            Phase::Off => (&self.primary, None),
            Phase::Phase1 | Phase::Phase2 => (&self.primary, Some(Direction::Forward)),
            Phase::Phase3 if state.reverse_outbox => (&self.secondary, Some(Direction::Reverse)),
            Phase::Phase3 | Phase::Cleanup => (&self.secondary, None),
        }
    }

    fn wake_relay(&self) {
        let (flag, cv) = &self.wake;
        *flag.lock().unwrap_or_else(PoisonError::into_inner) = true;
        cv.notify_one();
    }

    /// One relay step: up to [`MigratorConfig::relay_batch`] intents applied and removed
    /// (see the [module docs](self)). Safe to call from any thread, also while the relay
    /// thread runs (steps take turns).
    ///
    /// # Errors
    /// [`MigrateError::Store`] naming the store that failed, or an outbox error; the
    /// intents stay and a later step retries them.
    pub fn relay_step(&self) -> Result<RelayStep, MigrateError> {
        let _turn = self.relay_lock.lock().unwrap_or_else(PoisonError::into_inner);
        let intents = self.outbox.peek(self.config.relay_batch.max(1))?;
        let mut step = RelayStep::default();
        if intents.is_empty() {
            return Ok(step);
        }
        // Group by (direction, key); leave keys with a write in flight for later.
        let mut groups: HashMap<(Direction, SessionId), Vec<u64>> = HashMap::new();
        {
            let keys = self.lock_keys();
            for i in intents {
                if keys.get(&i.key).is_some_and(|k| k.inflight > 0) {
                    step.deferred += 1;
                } else {
                    groups.entry((i.direction, i.key)).or_default().push(i.seq);
                }
            }
        }
        for direction in [Direction::Forward, Direction::Reverse] {
            let (from, to, from_role, to_role) = match direction {
                Direction::Forward => (&self.primary, &self.secondary, Role::Primary, Role::Secondary),
                Direction::Reverse => (&self.secondary, &self.primary, Role::Secondary, Role::Primary),
            };
            let mut records = Vec::new();
            let mut seqs = Vec::new();
            let mut keys = Vec::new();
            for ((d, key), s) in &groups {
                if *d != direction {
                    continue;
                }
                if let Some(r) = from.get_raw(key).map_err(MigrateError::store(from_role))? {
                    records.push(r);
                }
                seqs.extend_from_slice(s);
                keys.push((key.clone(), s.len() as u32));
            }
            if seqs.is_empty() {
                continue;
            }
            let outcome = if records.is_empty() {
                BatchOutcome::default()
            } else {
                to.apply_batch_if_newer(records).map_err(MigrateError::store(to_role))?
            };
            self.outbox.remove(&seqs)?;
            let mut map = self.lock_keys();
            for (key, n) in keys {
                if let Some(k) = map.get_mut(&key) {
                    k.intents = k.intents.saturating_sub(n);
                    if k.intents == 0 && k.inflight == 0 {
                        map.remove(&key);
                    }
                }
            }
            drop(map);
            step.intents += seqs.len();
            step.applied += outcome.applied;
            step.skipped += outcome.skipped;
            self.counters
                .relay_applied
                .fetch_add(outcome.applied as u64, Ordering::Relaxed);
            self.counters
                .relay_skipped
                .fetch_add(outcome.skipped as u64, Ordering::Relaxed);
        }
        Ok(step)
    }

    /// Relays until the outbox is empty or `timeout` has passed, retrying failed steps
    /// with backoff. Returns the number of intents relayed.
    ///
    /// # Errors
    /// [`MigrateError::Gate`] ([`GateRefusal::OutboxNotDrained`]) when intents are left at
    /// the timeout.
    pub fn drain(&self, timeout: Duration) -> Result<usize, MigrateError> {
        let phase = self.phase();
        self.drain_until(Instant::now() + timeout, phase, phase)
    }

    /// [`Migrator::drain`] without reading the phase (callers may hold the phase lock);
    /// a timeout is reported as a refused move `from -> to`.
    fn drain_until(&self, deadline: Instant, from: Phase, to: Phase) -> Result<usize, MigrateError> {
        let mut relayed = 0;
        let mut backoff = Backoff::new(&self.config);
        loop {
            match self.relay_step() {
                Ok(step) => {
                    relayed += step.intents;
                    backoff.reset();
                    if step.intents == 0 {
                        if self.outbox.depth()? == 0 {
                            return Ok(relayed);
                        }
                        // Only deferred (in-flight) intents: give the writers a moment.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                Err(_) => {
                    inc(&self.counters.relay_failed);
                    inc(&self.counters.relay_retried);
                    std::thread::sleep(backoff.next().min(deadline.saturating_duration_since(Instant::now())));
                }
            }
            if Instant::now() >= deadline {
                let depth = self.outbox.depth()?;
                if depth == 0 {
                    return Ok(relayed);
                }
                return Err(GateRefusal::OutboxNotDrained { from, to, depth }.into());
            }
        }
    }

    /// Starts the relay thread (retries with exponential backoff and jitter; woken by
    /// writes, else polling every [`MigratorConfig::idle_poll`]). Stop it with
    /// [`RelayHandle::stop`] (or by dropping the handle).
    pub fn start_relay(self: &Arc<Self>) -> RelayHandle {
        let stop = Arc::new(AtomicBool::new(false));
        let m = Arc::clone(self);
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("erlmcp-migrate-relay".into())
            .spawn(move || m.relay_loop(&stop2))
            .ok();
        RelayHandle {
            stop,
            migrator: Arc::clone(self),
            thread,
        }
    }

    fn relay_loop(&self, stop: &AtomicBool) {
        let mut backoff = Backoff::new(&self.config);
        let mut failing = false;
        while !stop.load(Ordering::Acquire) {
            if failing {
                inc(&self.counters.relay_retried);
            }
            match self.relay_step() {
                Ok(step) if step.intents > 0 => {
                    failing = false;
                    backoff.reset();
                }
                Ok(step) => {
                    failing = false;
                    backoff.reset();
                    let (flag, cv) = &self.wake;
                    let mut woken = flag.lock().unwrap_or_else(PoisonError::into_inner);
                    if !*woken {
                        let wait = if step.deferred > 0 {
                            Duration::from_millis(1)
                        } else {
                            self.config.idle_poll
                        };
                        woken = cv
                            .wait_timeout(woken, wait)
                            .map(|(g, _)| g)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                    *woken = false;
                }
                Err(_) => {
                    failing = true;
                    inc(&self.counters.relay_failed);
                    let (flag, cv) = &self.wake;
                    let woken = flag.lock().unwrap_or_else(PoisonError::into_inner);
                    // Sleep the backoff (a stop request wakes us early).
                    let _ = cv.wait_timeout(woken, backoff.next());
                }
            }
        }
    }

    /// Moves one phase forward if the gates pass (see the [module docs](self)): runs
    /// [`MigratorConfig::advance_gate`] if set, drains
    /// the outbox (up to `timeout`), verifies the stores, then, with writes paused,
    /// drains what arrived meanwhile, re-checks the keys verify reported, saves the new
    /// phase and applies it. Returns the new phase.
    ///
    /// # Errors
    /// [`MigrateError::Gate`] naming the gate that failed (nothing changed);
    /// [`MigrateError::Store`] / [`MigrateError::File`] when a store, the outbox or the
    /// phase store failed.
    pub fn advance(&self, timeout: Duration) -> Result<Phase, MigrateError> {
        let from = self.phase();
        let to = from.next().ok_or_else(|| GateRefusal::NotAllowed {
            from,
            to: from,
            reason: "cleanup is the last phase".into(),
        })?;
        if let Some(gate) = &self.config.advance_gate {
            gate(from, to)?;
        }
        let needs_verify = matches!(to, Phase::Phase2 | Phase::Phase3);
        let drains = from.dual_writes() || (from == Phase::Phase3 && self.state().reverse_outbox);
        let mut report = None;
        if drains {
            self.drain_until(Instant::now() + timeout, from, to)?;
        }
        if needs_verify {
            report = Some(verify(
                self.primary.as_ref(),
                self.secondary.as_ref(),
                &self.config.verify,
            )?);
        }
        // Writes pause here until the change is applied.
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        if state.phase != from {
            return Err(GateRefusal::NotAllowed {
                from: state.phase,
                to,
                reason: format!("the phase changed to {} meanwhile", state.phase),
            }
            .into());
        }
        state.check_move(to)?;
        if drains {
            self.drain_until(Instant::now() + timeout, from, to)?;
        }
        if let Some(report) = report {
            self.recheck(&report, from, to)?;
        }
        let mut next = state.clone();
        next.record(to, self.config.clock.now_unix_ms(), "advance");
        self.phases.save(&next)?;
        *state = next;
        Ok(to)
    }

    /// The keys verify reported, compared again now (writes are paused and the outbox is
    /// drained, so a difference now is real).
    fn recheck(&self, report: &VerifyReport, from: Phase, to: Phase) -> Result<(), MigrateError> {
        let truncated = report.difference_count > report.differences.len() as u64;
        let mut left = 0u64;
        let mut first = None;
        for d in &report.differences {
            let p = self
                .primary
                .get_raw(&d.key)
                .map_err(MigrateError::store(Role::Primary))?;
            let s = self
                .secondary
                .get_raw(&d.key)
                .map_err(MigrateError::store(Role::Secondary))?;
            let differs = match (&p, &s) {
                (Some(p), Some(s)) => compare(p, s).is_some(),
                (None, None) => false,
                _ => true,
            };
            if differs {
                left += 1;
                first.get_or_insert_with(|| d.key.to_string());
            }
        }
        if truncated {
            // Not every difference was listed: count the rest as still there.
            left += report.difference_count - report.differences.len() as u64;
        }
        if left > 0 {
            return Err(GateRefusal::NotVerified {
                from,
                to,
                differences: left,
                first,
            }
            .into());
        }
        Ok(())
    }

    /// Moves one phase back (always allowed from `phase1` and `phase2`; from `phase3`
    /// only with the reverse outbox on, after draining it). Returns the new phase.
    ///
    /// # Errors
    /// [`MigrateError::Gate`] when there is no step back or the reverse outbox does not
    /// drain within `timeout`; [`MigrateError::File`] when the phase cannot be saved.
    pub fn rollback(&self, timeout: Duration) -> Result<Phase, MigrateError> {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let from = state.phase;
        let to = from.previous().ok_or_else(|| GateRefusal::NotAllowed {
            from,
            to: from,
            reason: "there is no phase to roll back to".into(),
        })?;
        state.check_move(to)?;
        if from == Phase::Phase3 {
            // The primary must hold every phase 3 write before it is the store of record again.
            self.drain_until(Instant::now() + timeout, from, to)?;
        }
        let mut next = state.clone();
        next.record(to, self.config.clock.now_unix_ms(), "rollback");
        self.phases.save(&next)?;
        *state = next;
        Ok(to)
    }

    /// Steps to `want` one gated phase at a time: [`Migrator::advance`] while behind it,
    /// [`Migrator::rollback`] while ahead, each step with its own `step_timeout`. Every
    /// step is saved as it completes, so a refused step leaves the migration at the
    /// last phase reached (the error says which gate, from where). This is the gated
    /// move of erlmcp's `step_to/2`; forcing a phase past the gates is the CLI's
    /// `sessions phase force`, a different verb on purpose.
    ///
    /// # Errors
    /// The first step's error, as [`Migrator::advance`] / [`Migrator::rollback`].
    ///
    /// # Examples
    /// ```
    /// # use std::{sync::Arc, time::Duration};
    /// # use erlmcp_rollout::migrate::{dual::{Migrator, MigratorConfig}, outbox::Outbox, phase::{FilePhaseStore, Phase}};
    /// # use erlmcp_rollout::session::{MemoryStore, StoreOptions};
    /// # let dir = tempfile::tempdir()?;
    /// let m = Migrator::open(
    ///     Arc::new(MemoryStore::new(StoreOptions::default())),
    ///     Arc::new(MemoryStore::new(StoreOptions::default())),
    ///     Outbox::open(dir.path().join("outbox.redb"))?,
    ///     Box::new(FilePhaseStore::new(dir.path().join("phase.json"))),
    ///     MigratorConfig::default(),
    /// )?;
    /// assert_eq!(m.step_to(Phase::Phase2, Duration::from_secs(5))?, Phase::Phase2);
    /// assert_eq!(m.step_to(Phase::Off, Duration::from_secs(5))?, Phase::Off);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn step_to(&self, want: Phase, step_timeout: Duration) -> Result<Phase, MigrateError> {
        loop {
            let now = self.phase();
            if now == want {
                return Ok(now);
            }
            if now < want {
                self.advance(step_timeout)?;
            } else {
                self.rollback(step_timeout)?;
            }
        }
    }

    /// Turns the phase 3 reverse outbox on or off (saved). It can be turned on only
    /// before phase 3 (turned on later, the primary would lack the earlier phase 3 writes).
    ///
    /// # Errors
    /// [`MigrateError::Gate`] when turning it on in `phase3` or `cleanup`;
    /// [`MigrateError::File`] when the state cannot be saved.
    pub fn set_reverse_outbox(&self, on: bool) -> Result<(), MigrateError> {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        if on && !state.reverse_outbox && state.phase.secondary_is_authoritative() {
            return Err(GateRefusal::NotAllowed {
                from: state.phase,
                to: state.phase,
                reason: "the reverse outbox must be on before phase3 starts".into(),
            }
            .into());
        }
        let mut next = state.clone();
        next.reverse_outbox = on;
        self.phases.save(&next)?;
        *state = next;
        Ok(())
    }

    /// Applies the phase saved in the [`PhaseStore`] if it differs from the one applied
    /// (it was changed by another process: the CLI, another node, an etcd watch). Call it
    /// periodically or on a change notification; [`MigratorCounters::phase`] reports the
    /// phase this node applies. Gates are not re-run (whoever saved the phase ran them, or
    /// forced it); but when the store of record changes (to or from phase 3), this node's
    /// own outbox is drained first with writes paused, so none of its intents is left
    /// behind. Writes also pause while the phase store is read (one file read, or one
    /// etcd round trip). Returns the phase applied.
    ///
    /// # Errors
    /// [`MigrateError::Gate`] when the outbox does not drain within `timeout` (the old
    /// phase stays applied; call again); [`MigrateError::File`] when the state cannot be read.
    pub fn sync_phase(&self, timeout: Duration) -> Result<Phase, MigrateError> {
        // Loaded with the phase lock held, so the state this node applies and the version
        // the phase store last saw (an etcd store guards its next save on it) never differ
        // while an `advance` or `rollback` of this node saves.
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let Some(saved) = self.phases.load()? else {
            return Ok(state.phase);
        };
        if *state == saved {
            return Ok(state.phase);
        }
        let (from, to) = (state.phase, saved.phase);
        if from.secondary_is_authoritative() != to.secondary_is_authoritative() {
            self.drain_until(Instant::now() + timeout, from, to)?;
        }
        *state = saved;
        Ok(to)
    }

    fn shadow(&self, id: &SessionId) {
        let n = self.config.shadow_sample;
        if n == 0 || self.reads.fetch_add(1, Ordering::Relaxed) % n != 0 || self.is_pending(id) {
            return;
        }
        let c = &self.counters;
        match (self.primary.get_raw(id), self.secondary.get_raw(id)) {
            (Ok(p), Ok(s)) => match (p, s) {
                (None, None) => inc(&c.shadow_match),
                (Some(_), None) => inc(&c.shadow_missing),
                (Some(p), Some(s)) if p == s => inc(&c.shadow_match),
                _ => inc(&c.shadow_mismatch),
            },
            _ => inc(&c.shadow_errors),
        }
    }
}

/// Exponential backoff with jitter (0.5x .. 1.5x of the nominal delay).
struct Backoff {
    base: Duration,
    max: Duration,
    current: Duration,
    seed: u64,
}

impl Backoff {
    fn new(c: &MigratorConfig) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
            | 1;
        Backoff {
            base: c.backoff_base,
            max: c.backoff_max,
            current: c.backoff_base,
            seed,
        }
    }

    fn reset(&mut self) {
        self.current = self.base;
    }

    fn next(&mut self) -> Duration {
        // xorshift64
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let factor = 0.5 + (self.seed % 1000) as f64 / 1000.0;
        let d = self.current.mul_f64(factor);
        self.current = (self.current * 2).min(self.max);
        d
    }
}

/// The relay thread of [`Migrator::start_relay`].
pub struct RelayHandle {
    stop: Arc<AtomicBool>,
    migrator: Arc<Migrator>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl RelayHandle {
    /// Stops the thread and waits for it (the step in progress finishes).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.migrator.wake_relay();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Store for Migrator {
    fn create(&self, session: Session) -> Result<Session, StoreError> {
        let key = [session.id.clone()];
        self.write(&key, |store, record| {
            if let Some(record) = record {
                record()?;
            }
            store.create(session)
        })
    }

    fn get(&self, id: &SessionId) -> Result<Session, StoreError> {
        let phase = self.phase();
        match phase {
            Phase::Off => self.primary.get(id),
            Phase::Phase1 => {
                let r = self.primary.get(id);
                self.shadow(id);
                r
            }
            Phase::Phase2 => {
                if self.is_pending(id) {
                    inc(&self.counters.pending_reads);
                    return self.primary.get(id);
                }
                match self.secondary.get(id) {
                    Ok(s) => Ok(s),
                    Err(_) => {
                        inc(&self.counters.fallbacks);
                        self.primary.get(id)
                    }
                }
            }
            Phase::Phase3 | Phase::Cleanup => self.secondary.get(id),
        }
    }

    fn get_raw(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        self.route(&state).0.get_raw(id)
    }

    fn put(&self, session: Session) -> Result<Session, StoreError> {
        let key = [session.id.clone()];
        self.write(&key, |store, record| {
            if let Some(record) = record {
                record()?;
            }
            store.put(session)
        })
    }

    fn update_if_version(&self, session: Session, expected: u64) -> Result<Session, StoreError> {
        let key = [session.id.clone()];
        self.write(&key, |store, record| {
            if let Some(record) = record {
                record()?;
            }
            store.update_if_version(session, expected)
        })
    }

    fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        let key = [id.clone()];
        self.write(&key, |store, record| {
            if let Some(record) = record {
                record()?;
            }
            store.delete(id)
        })
    }

    fn touch(&self, id: &SessionId) -> Result<Session, StoreError> {
        let key = [id.clone()];
        let now = self.config.clock.now_unix_ms();
        let touch = self.config.touch;
        self.write(&key, |store, record| {
            let Some(record) = record else {
                return store.touch(id);
            };
            let before = store.get_raw(id)?;
            let predicted = before
                .as_ref()
                .is_some_and(|s| s.is_live(now) && touch.should_persist(s.last_accessed, now, s.timeout));
            if predicted {
                record()?;
            }
            let after = store.touch(id)?;
            if before.as_ref().is_none_or(|b| after.version != b.version) {
                // Written although not predicted (another policy, a concurrent write):
                // record it now so the relay copies it.
                record()?;
            }
            Ok(after)
        })
        .inspect(|_| {
            // erlmcp reads through touch (its fetch): sample these too.
            if self.phase() == Phase::Phase1 {
                self.shadow(id);
            }
        })
    }

    fn scan(&self, after: Option<&SessionId>, limit: usize, visibility: Visibility) -> Result<ScanPage, StoreError> {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        self.route(&state).0.scan(after, limit, visibility)
    }

    fn apply_batch_if_newer(&self, records: Vec<Session>) -> Result<BatchOutcome, StoreError> {
        let keys: Vec<SessionId> = records.iter().map(|r| r.id.clone()).collect();
        self.write(&keys, |store, record| {
            if let Some(record) = record {
                record()?;
            }
            store.apply_batch_if_newer(records)
        })
    }

    fn sweep_expired(&self, now_ms: i64) -> Result<SweepOutcome, StoreError> {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        // Both stores turn the same expired records into the same tombstones (version + 1,
        // last_accessed = now_ms), so sweeping both keeps them equal; the store of record's
        // outcome is returned.
        let (of_record, copied) = self.route(&state);
        let outcome = of_record.sweep_expired(now_ms)?;
        if copied.is_some() {
            let other = if Arc::ptr_eq(of_record, &self.primary) {
                &self.secondary
            } else {
                &self.primary
            };
            other.sweep_expired(now_ms)?;
        }
        Ok(outcome)
    }
}
