//! A memory store outside a migration ([`MemoryStore::without_tombstones`]) frees the dead:
//! its own record count after fill, expiry, sweep and refill is the live count, deletes
//! free at once, and tombstones (the migration kind) carry no metadata.

use erlmcp_rollout::session::{
    ManualClock, MemoryStore, MetaFormat, Session, SessionId, Store, StoreOptions, Timeout, Visibility,
};

const T0: i64 = 1_700_000_000_000;

fn fill(store: &MemoryStore, prefix: &str, n: usize, now: i64) {
    for i in 0..n {
        let id = SessionId::new(format!("{prefix}{i:06}")).unwrap();
        store
            .put(Session::new(id, now, Timeout::ms(1_000).unwrap(), vec![7u8; 256]))
            .unwrap();
    }
}

#[test]
fn sweep_and_delete_free_records_outside_a_migration() {
    let clock = ManualClock::new(T0);
    let store = MemoryStore::without_tombstones(StoreOptions::with_clock(clock.clone()));
    assert!(!store.keeps_tombstones());
    fill(&store, "a-", 20_000, T0);
    assert_eq!(store.raw_len(), 20_000);
    for i in 0..5_000 {
        assert!(store.delete(&SessionId::new(format!("a-{i:06}")).unwrap()).unwrap());
    }
    assert_eq!(store.raw_len(), 15_000, "a delete frees the record at once");
    clock.set_unix_ms(T0 + 1_001);
    let swept = store.sweep_expired(T0 + 1_001).unwrap();
    assert_eq!((swept.expired, store.raw_len()), (15_000, 0));
    fill(&store, "b-", 1_000, T0 + 1_001);
    assert_eq!(store.raw_len(), 1_000, "the second fill holds only its own records");
    let page = store.scan(None, 2_000, Visibility::Raw).unwrap();
    assert_eq!(page.records.len(), 1_000);
    // A deleted key starts again (no tombstone to remember its version).
    let id = SessionId::new("b-000000").unwrap();
    assert!(store.delete(&id).unwrap());
    assert!(!store.delete(&id).unwrap());
    assert!(store.get_raw(&id).unwrap().is_none());
}

#[test]
fn migration_tombstones_hold_no_metadata() {
    let clock = ManualClock::new(T0);
    let store = MemoryStore::new(StoreOptions::with_clock(clock));
    assert!(store.keeps_tombstones());
    let id = SessionId::new("t").unwrap();
    let mut s = Session::new(id.clone(), T0, Timeout::Infinity, vec![1u8; 4096]);
    s.meta_format = MetaFormat::Etf;
    store.put(s).unwrap();
    assert!(store.delete(&id).unwrap());
    let tomb = store
        .get_raw(&id)
        .unwrap()
        .expect("a migration store keeps a tombstone");
    assert!(tomb.tombstone);
    assert!(tomb.metadata.is_empty());
    assert_eq!(tomb.meta_format, MetaFormat::Opaque);
}

#[test]
fn a_scan_page_visits_a_bounded_number_of_dead_records() {
    let clock = ManualClock::new(T0);
    let store = MemoryStore::new(StoreOptions::with_clock(clock.clone()));
    fill(&store, "dead-", 50_000, T0);
    for i in 0..5 {
        let id = SessionId::new(format!("live-{i}")).unwrap();
        store
            .put(Session::new(id, T0 + 5_000, Timeout::Infinity, vec![]))
            .unwrap();
    }
    clock.set_unix_ms(T0 + 5_000); // every "dead-" record has expired, none swept
    let first = store.scan(None, 10, Visibility::Live).unwrap();
    assert!(first.records.is_empty(), "the page stops after its visit budget");
    assert!(first.next.is_some());
    let (mut live, mut pages, mut after) = (Vec::new(), 0, None);
    loop {
        let page = store.scan(after.as_ref(), 10, Visibility::Live).unwrap();
        pages += 1;
        live.extend(page.records.into_iter().map(|s| s.id));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(live.len(), 5);
    assert!(pages >= 50_000 / 1024, "{pages} pages");
}
