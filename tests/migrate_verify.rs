//! Verify and repair: every kind of difference is found and listed by key, ranges that
//! agree are not descended into, repair settles what write-if-newer may settle, and a
//! property test compares verify with a naive per-key diff.

mod migrate_support;

use std::collections::BTreeMap;

use erlmcp_rollout::migrate::verify::{repair, verify, DiffKind, Difference, TargetOnly, VerifyConfig};
use erlmcp_rollout::session::{MemoryStore, Session, Store, StoreOptions};
use migrate_support::{contents, id, record};
use proptest::prelude::*;

const NOW: i64 = 1_700_000_000_000;

fn memory() -> MemoryStore {
    MemoryStore::new(StoreOptions::default())
}

fn pair(n: u64) -> (MemoryStore, MemoryStore) {
    let (a, b) = (memory(), memory());
    let records: Vec<_> = (0..n).map(|i| record(i, NOW)).collect();
    a.apply_batch_if_newer(records.clone()).unwrap();
    b.apply_batch_if_newer(records).unwrap();
    (a, b)
}

fn cfg(leaf: usize) -> VerifyConfig {
    VerifyConfig {
        leaf,
        ..Default::default()
    }
}

#[test]
fn equal_stores_are_clean_with_equal_roots() {
    for leaf in [1, 3, 100, 5000] {
        let (a, b) = pair(1000);
        let r = verify(&a, &b, &cfg(leaf)).unwrap();
        assert!(r.is_clean(), "{r:?}");
        assert_eq!(
            (r.source_records, r.target_records, r.differing_ranges),
            (1000, 1000, 0)
        );
        assert_eq!(r.ranges, 1000u64.div_ceil(leaf as u64).max(1));
    }
    let r = verify(&memory(), &memory(), &cfg(10)).unwrap();
    assert!(r.is_clean() && r.ranges == 1);
}

#[test]
fn finds_each_kind_and_descends_only_into_differing_ranges() {
    let (a, b) = pair(1000);
    b.apply_batch_if_newer(vec![{
        let mut s = record(10, NOW);
        s.version += 1;
        s
    }])
    .unwrap();
    // Same version, other content: only visible through the digest.
    let b2 = memory();
    let mut all = contents(&b);
    all.retain(|s| s.id != id("k000500"));
    for s in all.iter_mut() {
        if s.id == id("k000700") {
            s.metadata = b"tampered".to_vec().into();
        }
    }
    all.push(record(1, NOW).with_id("zz-target-only"));
    b2.apply_batch_if_newer(all).unwrap();
    let r = verify(&a, &b2, &cfg(100)).unwrap();
    assert!(!r.is_clean());
    assert_eq!(r.difference_count, 4);
    assert_eq!(
        r.differing_ranges, 4,
        "ranges holding k000010, k000500, k000700 and the open last one"
    );
    assert_eq!(r.ranges, 10);
    let kinds: Vec<(String, DiffKind)> = r
        .differences
        .iter()
        .map(|d| (String::from_utf8(d.key.as_bytes().to_vec()).unwrap(), d.kind.clone()))
        .collect();
    let v10 = record(10, NOW).version;
    assert_eq!(
        kinds,
        vec![
            (
                "k000010".into(),
                DiffKind::Version {
                    source: v10,
                    target: v10 + 1
                }
            ),
            ("k000500".into(), DiffKind::MissingOnTarget),
            (
                "k000700".into(),
                DiffKind::Content {
                    version: record(700, NOW).version
                }
            ),
            ("zz-target-only".into(), DiffKind::MissingOnSource),
        ]
    );
    // Repair: k000500 copied; k000010 is newer on the target and k000700 has the same
    // version: reported, not overwritten; the target-only key is reported, then deleted.
    let fixed = repair(&a, &b2, &r.differences, TargetOnly::Report).unwrap();
    assert_eq!((fixed.copied, fixed.deleted), (1, 0));
    let unresolved: Vec<&[u8]> = fixed.unresolved.iter().map(|d| d.key.as_bytes()).collect();
    assert_eq!(unresolved, [&b"k000010"[..], b"k000700", b"zz-target-only"]);
    let fixed = repair(&a, &b2, &r.differences, TargetOnly::Delete).unwrap();
    assert_eq!(fixed.deleted, 1);
    assert!(b2.get_raw(&id("zz-target-only")).unwrap().unwrap().tombstone);
    assert_eq!(b2.get_raw(&id("k000500")).unwrap(), Some(record(500, NOW)));
}

#[test]
fn repair_copies_source_tombstones_over_target_records() {
    let (a, b) = pair(50);
    assert!(a.delete(&id("k000001")).unwrap());
    let r = verify(&a, &b, &cfg(8)).unwrap();
    assert_eq!(r.difference_count, 1);
    let fixed = repair(&a, &b, &r.differences, TargetOnly::Report).unwrap();
    assert_eq!(fixed.copied, 1);
    assert!(b.get_raw(&id("k000001")).unwrap().unwrap().tombstone);
    assert!(verify(&a, &b, &cfg(8)).unwrap().is_clean());
}

#[test]
fn lists_at_most_max_listed_but_counts_all() {
    let (a, _) = pair(300);
    let r = verify(
        &a,
        &memory(),
        &VerifyConfig {
            leaf: 16,
            max_listed: 7,
        },
    )
    .unwrap();
    assert_eq!((r.difference_count, r.differences.len()), (300, 7));
}

trait WithId {
    fn with_id(self, key: &str) -> Session;
}

impl WithId for Session {
    fn with_id(mut self, key: &str) -> Session {
        self.id = id(key);
        self
    }
}

#[derive(Clone, Debug)]
enum Change {
    Drop(u8),
    Bump(u8),
    Tamper(u8),
    Extra(u8),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        any::<u8>().prop_map(Change::Drop),
        any::<u8>().prop_map(Change::Bump),
        any::<u8>().prop_map(Change::Tamper),
        any::<u8>().prop_map(Change::Extra),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Verify lists exactly the keys a naive per-key comparison finds, for any leaf size
    /// and any mix of dropped, re-versioned, altered and extra records.
    #[test]
    fn verify_matches_a_naive_diff(n in 0u64..200, leaf in 1usize..40, changes in prop::collection::vec(change(), 0..20)) {
        let base: Vec<Session> = (0..n).map(|i| record(i, NOW)).collect();
        let mut target: BTreeMap<Vec<u8>, Session> =
            base.iter().map(|s| (s.id.as_bytes().to_vec(), s.clone())).collect();
        let key = |i: u8| format!("k{:06}", u64::from(i) % n.max(1)).into_bytes();
        for c in &changes {
            match *c {
                Change::Drop(i) => {
                    target.remove(&key(i));
                }
                Change::Bump(i) => {
                    if let Some(s) = target.get_mut(&key(i)) {
                        s.version += 1;
                    }
                }
                Change::Tamper(i) => {
                    if let Some(s) = target.get_mut(&key(i)) {
                        s.last_accessed += 1;
                    }
                }
                Change::Extra(i) => {
                    let s = record(1000 + u64::from(i), NOW);
                    target.insert(s.id.as_bytes().to_vec(), s);
                }
            }
        }
        let (a, b) = (memory(), memory());
        a.apply_batch_if_newer(base.clone()).unwrap();
        b.apply_batch_if_newer(target.values().cloned().collect()).unwrap();
        let naive = naive_diff(&contents(&a), &contents(&b));
        let r = verify(&a, &b, &cfg(leaf)).unwrap();
        prop_assert_eq!(&r.differences, &naive);
        prop_assert_eq!(r.is_clean(), naive.is_empty());
        prop_assert_eq!(r.source_records, n);
        prop_assert_eq!(r.target_records, target.len() as u64);
        // Repair settles everything except what write-if-newer must not touch.
        let fixed = repair(&a, &b, &r.differences, TargetOnly::Report).unwrap();
        let after = verify(&a, &b, &cfg(leaf)).unwrap();
        prop_assert_eq!(after.difference_count, fixed.unresolved.len() as u64);
    }
}

fn naive_diff(a: &[Session], b: &[Session]) -> Vec<Difference> {
    let am: BTreeMap<_, _> = a.iter().map(|s| (s.id.clone(), s)).collect();
    let bm: BTreeMap<_, _> = b.iter().map(|s| (s.id.clone(), s)).collect();
    let mut keys: Vec<_> = am.keys().chain(bm.keys()).cloned().collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let kind = match (am.get(&k), bm.get(&k)) {
                (Some(_), None) => DiffKind::MissingOnTarget,
                (None, Some(_)) => DiffKind::MissingOnSource,
                (Some(s), Some(t)) if s.version != t.version => DiffKind::Version {
                    source: s.version,
                    target: t.version,
                },
                (Some(s), Some(t)) if s != t => DiffKind::Content { version: s.version },
                _ => return None,
            };
            Some(Difference { key: k, kind })
        })
        .collect()
}
