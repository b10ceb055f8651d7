//! Model-based test of a `Store`: random operation sequences (with clock moves and
//! sweeps) run against the store and against a `BTreeMap` model of the contract; every
//! result must match. `store_model!(name, factory)` stamps it out per backend.

use std::collections::BTreeMap;

use erlmcp_rollout::session::{
    BatchOutcome, Clock, ManualClock, ScanPage, Session, SessionId, Store, StoreError, StoreOptions, SweepOutcome,
    Timeout, TouchPolicy, Visibility,
};
use proptest::prelude::*;

pub const T0: i64 = 1_700_000_000_000;
pub const RETENTION_MS: u64 = 80;
pub const TOUCH_PERMILLE: u16 = 250;

/// Keys: a few, so operations collide; some share prefixes, one is not UTF-8.
const KEYS: &[&[u8]] = &[
    b"a",
    b"ab",
    b"b",
    b"\x00",
    b"\xff\xfe",
    b"session-1",
    b"session-10",
    b"z",
];

#[derive(Clone, Debug)]
pub struct Rec {
    key: usize,
    timeout: Option<u64>,
    meta: u8,
}

#[derive(Clone, Debug)]
pub enum Op {
    Create(Rec),
    Get(usize),
    Put(Rec),
    Update(Rec, i8),
    Delete(usize),
    Touch(usize),
    Advance(u16),
    Sweep,
    Scan(Option<usize>, usize, bool),
    Batch(Vec<(Rec, u64, bool, u16)>),
}

fn rec() -> impl Strategy<Value = Rec> {
    (
        0..KEYS.len(),
        prop_oneof![3 => (1u64..60).prop_map(Some), 1 => Just(None)],
        any::<u8>(),
    )
        .prop_map(|(key, timeout, meta)| Rec { key, timeout, meta })
}

pub fn op() -> impl Strategy<Value = Op> {
    let key = 0..KEYS.len();
    prop_oneof![
        3 => rec().prop_map(Op::Create),
        3 => key.clone().prop_map(Op::Get),
        2 => rec().prop_map(Op::Put),
        2 => (rec(), -1i8..=1).prop_map(|(r, d)| Op::Update(r, d)),
        2 => key.clone().prop_map(Op::Delete),
        3 => key.clone().prop_map(Op::Touch),
        3 => (0u16..40).prop_map(Op::Advance),
        1 => Just(Op::Sweep),
        1 => (proptest::option::of(key), 1usize..5, any::<bool>()).prop_map(|(a, l, raw)| Op::Scan(a, l, raw)),
        1 => proptest::collection::vec((rec(), 1u64..8, any::<bool>(), 0u16..50), 0..4).prop_map(Op::Batch),
    ]
}

fn id(key: usize) -> SessionId {
    SessionId::new(KEYS[key]).unwrap()
}

fn session(r: &Rec, now: i64) -> Session {
    let timeout = r.timeout.map_or(Timeout::Infinity, |t| Timeout::ms(t).unwrap());
    Session::new(id(r.key), now, timeout, vec![r.meta; usize::from(r.meta % 4)])
}

/// The contract, written as plainly as possible.
#[derive(Default)]
pub struct Model {
    map: BTreeMap<SessionId, Session>,
}

impl Model {
    fn live(&self, key: &SessionId, now: i64) -> Option<&Session> {
        self.map.get(key).filter(|s| !s.tombstone && !s.is_expired(now))
    }

    fn next_version(&self, key: &SessionId) -> u64 {
        self.map.get(key).map_or(1, |s| s.version + 1)
    }

    fn store(&mut self, mut s: Session, version: u64) -> Session {
        s.version = version;
        s.tombstone = false;
        self.map.insert(s.id.clone(), s.clone());
        s
    }

    fn create(&mut self, s: Session, now: i64) -> Result<Session, StoreError> {
        if self.live(&s.id, now).is_some() {
            return Err(StoreError::AlreadyExists { key: s.id });
        }
        let v = self.next_version(&s.id);
        Ok(self.store(s, v))
    }

    fn get(&self, key: &SessionId, now: i64) -> Result<Session, StoreError> {
        self.live(key, now)
            .cloned()
            .ok_or(StoreError::NotFound { key: key.clone() })
    }

    fn put(&mut self, s: Session) -> Result<Session, StoreError> {
        let v = self.next_version(&s.id);
        Ok(self.store(s, v))
    }

    fn update(&mut self, s: Session, expected: u64, now: i64) -> Result<Session, StoreError> {
        let actual = self
            .live(&s.id, now)
            .ok_or(StoreError::NotFound { key: s.id.clone() })?
            .version;
        if actual != expected {
            return Err(StoreError::Conflict {
                key: s.id,
                expected,
                actual,
            });
        }
        Ok(self.store(s, expected + 1))
    }

    fn delete(&mut self, key: &SessionId, now: i64) -> Result<bool, StoreError> {
        let was_live = self.live(key, now).is_some();
        if let Some(s) = self.map.get_mut(key).filter(|s| !s.tombstone) {
            s.tombstone = true;
            s.version += 1;
            s.last_accessed = now;
            s.metadata = Vec::new().into(); // a tombstone keeps no metadata
        }
        Ok(was_live)
    }

    fn touch(&mut self, key: &SessionId, now: i64) -> Result<Session, StoreError> {
        let s = self.get(key, now)?;
        let Timeout::Ms(t) = s.timeout else {
            return Ok(Session {
                last_accessed: s.last_accessed.max(now),
                ..s
            });
        };
        let moved = now - s.last_accessed;
        if moved > 0 && moved > (t.get() as i64) * i64::from(TOUCH_PERMILLE) / 1000 {
            let stored = Session {
                last_accessed: now,
                version: s.version + 1,
                ..s
            };
            self.map.insert(key.clone(), stored.clone());
            Ok(stored)
        } else {
            Ok(Session {
                last_accessed: s.last_accessed.max(now),
                ..s
            })
        }
    }

    fn scan(&self, after: Option<&SessionId>, limit: usize, raw: bool, now: i64) -> Result<ScanPage, StoreError> {
        let mut records: Vec<Session> = self
            .map
            .values()
            .filter(|s| after.is_none_or(|a| &s.id > a))
            .filter(|s| raw || (!s.tombstone && !s.is_expired(now)))
            .take(limit + 1)
            .cloned()
            .collect();
        let more = records.len() > limit;
        records.truncate(limit);
        let next = if more {
            records.last().map(|s| s.id.clone())
        } else {
            None
        };
        Ok(ScanPage { records, next })
    }

    fn batch(&mut self, records: Vec<Session>) -> Result<BatchOutcome, StoreError> {
        let mut out = BatchOutcome::default();
        for r in records {
            if self.map.get(&r.id).is_some_and(|s| s.version >= r.version) {
                out.skipped += 1;
            } else {
                self.map.insert(r.id.clone(), r);
                out.applied += 1;
            }
        }
        Ok(out)
    }

    fn sweep(&mut self, now: i64) -> Result<SweepOutcome, StoreError> {
        let mut out = SweepOutcome::default();
        self.map.retain(|_, s| {
            if s.tombstone {
                let keep = now - s.last_accessed <= RETENTION_MS as i64;
                out.tombstones += usize::from(!keep);
                keep
            } else {
                if s.is_expired(now) {
                    s.tombstone = true;
                    s.version += 1;
                    s.last_accessed = now;
                    s.metadata = Vec::new().into();
                    out.expired += 1;
                }
                true
            }
        });
        Ok(out)
    }
}

/// Runs `ops` against a fresh store from `make` and the model; fails at the first difference.
pub fn run<S: Store>(make: impl Fn(StoreOptions) -> S, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let clock = ManualClock::new(T0);
    let mut opts = StoreOptions::with_clock(clock.clone());
    opts.touch = TouchPolicy::permille(TOUCH_PERMILLE).unwrap();
    opts.tombstone_retention_ms = RETENTION_MS;
    let store = make(opts);
    let mut model = Model::default();
    for (step, op) in ops.into_iter().enumerate() {
        let now = clock.now_unix_ms();
        let what = format!("step {step}: {op:?}");
        match op {
            Op::Create(r) => prop_assert_eq!(
                store.create(session(&r, now)),
                model.create(session(&r, now), now),
                "{}",
                what
            ),
            Op::Get(k) => prop_assert_eq!(store.get(&id(k)), model.get(&id(k), now), "{}", what),
            Op::Put(r) => prop_assert_eq!(store.put(session(&r, now)), model.put(session(&r, now)), "{}", what),
            Op::Update(r, delta) => {
                let base = model.map.get(&id(r.key)).map_or(1, |s| s.version);
                let expected = base.saturating_add_signed(i64::from(delta)).max(1);
                prop_assert_eq!(
                    store.update_if_version(session(&r, now), expected),
                    model.update(session(&r, now), expected, now),
                    "{}",
                    what
                );
            }
            Op::Delete(k) => prop_assert_eq!(store.delete(&id(k)), model.delete(&id(k), now), "{}", what),
            Op::Touch(k) => prop_assert_eq!(store.touch(&id(k)), model.touch(&id(k), now), "{}", what),
            Op::Advance(ms) => clock.advance_ms(i64::from(ms)),
            Op::Sweep => prop_assert_eq!(store.sweep_expired(now), model.sweep(now), "{}", what),
            Op::Scan(after, limit, raw) => {
                let after = after.map(id);
                let vis = if raw { Visibility::Raw } else { Visibility::Live };
                prop_assert_eq!(
                    store.scan(after.as_ref(), limit, vis),
                    model.scan(after.as_ref(), limit, raw, now),
                    "{}",
                    what
                );
            }
            Op::Batch(items) => {
                let records: Vec<Session> = items
                    .iter()
                    .map(|(r, version, tombstone, age)| {
                        let mut s = session(r, now - i64::from(*age));
                        s.version = *version;
                        s.tombstone = *tombstone;
                        s
                    })
                    .collect();
                prop_assert_eq!(
                    store.apply_batch_if_newer(records.clone()),
                    model.batch(records),
                    "{}",
                    what
                );
            }
        }
    }
    // Finally the whole content, raw, page by page.
    let now = clock.now_unix_ms();
    let mut after = None;
    let mut all = Vec::new();
    loop {
        let page = store.scan(after.as_ref(), 3, Visibility::Raw).unwrap();
        all.extend(page.records);
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    prop_assert_eq!(all, model.scan(None, usize::MAX - 1, true, now).unwrap().records);
    Ok(())
}

/// `store_model!(name, factory)`: the model-based proptest for one backend (512 cases;
/// `store_model!(name, factory, cases = N)` for slow backends).
#[macro_export]
macro_rules! store_model {
    ($name:ident, $make:expr) => {
        $crate::store_model!($name, $make, cases = 512);
    };
    ($name:ident, $make:expr, cases = $cases:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            use proptest::prelude::*;

            proptest! {
                #![proptest_config(ProptestConfig { cases: $cases, ..ProptestConfig::default() })]
                #[test]
                fn behaves_like_the_model(ops in proptest::collection::vec($crate::model::op(), 1..80)) {
                    $crate::model::run($make, ops)?;
                }
            }
        }
    };
}
