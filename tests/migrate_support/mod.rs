//! Shared helpers of the migration tests: a fault-injecting store wrapper, store
//! contents, random records.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use erlmcp_rollout::session::{
    BatchOutcome, ScanPage, Session, SessionId, Store, StoreError, SweepOutcome, Timeout, Visibility,
};

/// A real store behind injected faults: a share of calls fails with `Unavailable`
/// (`error_permille`), every call can be delayed (`latency_us`), and `outage` fails all.
/// A failed write is not applied (faults are decided before the call).
pub struct Faulty {
    pub inner: Arc<dyn Store>,
    pub error_permille: AtomicU32,
    pub latency_us: AtomicU64,
    pub outage: AtomicBool,
    pub injected: AtomicU64,
    seed: AtomicU64,
}

impl Faulty {
    pub fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Faulty {
            inner,
            error_permille: AtomicU32::new(0),
            latency_us: AtomicU64::new(0),
            outage: AtomicBool::new(false),
            injected: AtomicU64::new(0),
            seed: AtomicU64::new(0x2545_f491_4f6c_dd1d),
        })
    }

    pub fn set_errors(&self, permille: u32) {
        self.error_permille.store(permille, Ordering::SeqCst);
    }

    pub fn set_latency(&self, d: Duration) {
        self.latency_us.store(d.as_micros() as u64, Ordering::SeqCst);
    }

    pub fn set_outage(&self, on: bool) {
        self.outage.store(on, Ordering::SeqCst);
    }

    fn fault(&self, op: &str) -> Result<(), StoreError> {
        let us = self.latency_us.load(Ordering::Relaxed);
        if us > 0 {
            std::thread::sleep(Duration::from_micros(us));
        }
        let mut x = self.seed.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        let p = u64::from(self.error_permille.load(Ordering::Relaxed));
        if self.outage.load(Ordering::Relaxed) || x % 1000 < p {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Unavailable {
                reason: format!("injected fault in {op}"),
            });
        }
        Ok(())
    }
}

impl Store for Faulty {
    fn create(&self, s: Session) -> Result<Session, StoreError> {
        self.fault("create")?;
        self.inner.create(s)
    }
    fn get(&self, id: &SessionId) -> Result<Session, StoreError> {
        self.fault("get")?;
        self.inner.get(id)
    }
    fn get_raw(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        self.fault("get_raw")?;
        self.inner.get_raw(id)
    }
    fn put(&self, s: Session) -> Result<Session, StoreError> {
        self.fault("put")?;
        self.inner.put(s)
    }
    fn update_if_version(&self, s: Session, expected: u64) -> Result<Session, StoreError> {
        self.fault("update")?;
        self.inner.update_if_version(s, expected)
    }
    fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        self.fault("delete")?;
        self.inner.delete(id)
    }
    fn touch(&self, id: &SessionId) -> Result<Session, StoreError> {
        self.fault("touch")?;
        self.inner.touch(id)
    }
    fn scan(&self, after: Option<&SessionId>, limit: usize, v: Visibility) -> Result<ScanPage, StoreError> {
        self.fault("scan")?;
        self.inner.scan(after, limit, v)
    }
    fn apply_batch_if_newer(&self, records: Vec<Session>) -> Result<BatchOutcome, StoreError> {
        self.fault("apply_batch_if_newer")?;
        self.inner.apply_batch_if_newer(records)
    }
    fn sweep_expired(&self, now_ms: i64) -> Result<SweepOutcome, StoreError> {
        self.fault("sweep_expired")?;
        self.inner.sweep_expired(now_ms)
    }
}

/// Every raw record of a store, in key order.
pub fn contents(store: &dyn Store) -> Vec<Session> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let p = store.scan(after.as_ref(), 1000, Visibility::Raw).unwrap();
        out.extend(p.records);
        match p.next {
            Some(n) => after = Some(n),
            None => return out,
        }
    }
}

pub fn id(s: impl AsRef<[u8]>) -> SessionId {
    SessionId::new(s).unwrap()
}

/// A record as a backfill source would hold it: key `k{i:06}`, version, tombstone or
/// an expired timeout chosen from `i`.
pub fn record(i: u64, now: i64) -> Session {
    let mut s = Session::new(
        id(format!("k{i:06}")),
        now - 1000,
        if i % 7 == 0 {
            Timeout::ms(10).unwrap()
        } else {
            Timeout::Infinity
        },
        format!("meta-{i}").into_bytes(),
    );
    s.version = 1 + i % 5;
    s.tombstone = i % 11 == 0;
    s
}
