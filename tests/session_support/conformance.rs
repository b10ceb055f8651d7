//! The `Store` conformance suite, written once. Each case takes a factory
//! `Fn(StoreOptions) -> S`; `store_conformance!(name, factory)` stamps out one `#[test]`
//! per case for a backend.

use std::sync::Arc;

use erlmcp_rollout::session::{
    InvalidInput, ManualClock, Session, SessionId, Store, StoreError, StoreOptions, Timeout, TouchPolicy, Visibility,
    MAX_METADATA_LEN,
};

/// The suite's start time (ms).
pub const T0: i64 = 1_700_000_000_000;

/// A store whose clock starts at [`T0`], with a touch policy and tombstone retention.
pub fn setup<S: Store>(make: &impl Fn(StoreOptions) -> S, touch: TouchPolicy, retention: u64) -> (S, ManualClock) {
    let clock = ManualClock::new(T0);
    let mut opts = StoreOptions::with_clock(clock.clone());
    opts.touch = touch;
    opts.tombstone_retention_ms = retention;
    (make(opts), clock)
}

fn plain<S: Store>(make: &impl Fn(StoreOptions) -> S) -> (S, ManualClock) {
    setup(make, TouchPolicy::default(), 1_000)
}

pub fn id(s: impl AsRef<[u8]>) -> SessionId {
    SessionId::new(s).unwrap()
}

pub fn session(key: &str, clock: &ManualClock, timeout_ms: u64, meta: &[u8]) -> Session {
    Session::new(
        id(key),
        clock_now(clock),
        Timeout::ms(timeout_ms).unwrap(),
        meta.to_vec(),
    )
}

fn clock_now(clock: &ManualClock) -> i64 {
    use erlmcp_rollout::session::Clock;
    clock.now_unix_ms()
}

fn raw<S: Store>(store: &S, key: &str) -> Option<Session> {
    let all = store.scan(None, 10_000, Visibility::Raw).unwrap();
    all.records.into_iter().find(|s| s.id.as_bytes() == key.as_bytes())
}

pub fn create_is_create_if_absent<S: Store>(make: impl Fn(StoreOptions) -> S) {
    let (store, clock) = plain(&make);
    let mut s = session("a", &clock, 60_000, b"m1");
    s.version = 99; // ignored
    s.tombstone = true; // ignored
    let created = store.create(s).unwrap();
    assert_eq!((created.version, created.tombstone), (1, false));
    let err = store.create(session("a", &clock, 60_000, b"m2")).unwrap_err();
    assert_eq!(err, StoreError::AlreadyExists { key: id("a") });
    assert!(err.to_string().contains("\"a\""), "{err}");
    assert_eq!(store.get(&id("a")).unwrap().metadata.as_ref(), b"m1");
}

pub fn create_over_dead_record_continues_versions<S: Store>(make: impl Fn(StoreOptions) -> S) {
    let (store, clock) = plain(&make);
    store.create(session("d", &clock, 60_000, b"")).unwrap();
    assert!(store.delete(&id("d")).unwrap());
    assert_eq!(store.create(session("d", &clock, 60_000, b"")).unwrap().version, 3);
    store.create(session("e", &clock, 10, b"")).unwrap();
    clock.advance_ms(11);
    assert_eq!(store.create(session("e", &clock, 10, b"x")).unwrap().version, 2);
}

pub fn get_returns_what_was_stored<S: Store>(make: impl Fn(StoreOptions) -> S) {
    let (store, clock) = plain(&make);
    let err = store.get(&id("nope")).unwrap_err();
    assert_eq!(err, StoreError::NotFound { key: id("nope") });
    assert!(err.to_string().contains("\"nope\""));
    let mut s = session("g", &clock, 5_000, &[0, 1, 2, 255]);
    s.created_at = T0 - 7;
    let stored = store.create(s.clone()).unwrap();
    let got = store.get(&id("g")).unwrap();
    assert_eq!(got, stored);
    assert_eq!(
        (got.created_at, got.last_accessed, got.timeout),
        (T0 - 7, T0, s.timeout)
    );
    assert_eq!(got.metadata.as_ref(), &[0, 1, 2, 255]);
}

pub fn expired_session_is_never_returned<S: Store>(make: impl Fn(StoreOptions) -> S) {
    let (store, clock) = plain(&make);
    store.create(session("x", &clock, 100, b"")).unwrap();
    clock.advance_ms(100);
    assert!(
        store.get(&id("x")).is_ok(),
        "now - last_accessed == timeout is not expired"
    );
    clock.advance_ms(1);
    let nf = StoreError::NotFound { key: id("x") };
    assert_eq!(store.get(&id("x")).unwrap_err(), nf);
    assert_eq!(store.touch(&id("x")).unwrap_err(), nf);
    assert_eq!(
        store.update_if_version(session("x", &clock, 100, b""), 1).unwrap_err(),
        nf
    );
    assert!(store.scan(None, 10, Visibility::Live).unwrap().records.is_empty());
    assert_eq!(
        raw(&store, "x").unwrap().version,
        1,
        "raw scans still see it before a sweep"
    );
}

pub fn infinite_timeout_never_expires<S: Store>(make: impl Fn(StoreOptions) -> S) {
    let (store, clock) = plain(&make);
    store
        .create(Session::new(id("inf"), T0, Timeout::Infinity, vec![]))
        .unwrap();
    clock.advance_ms(i64::MAX / 4);
    assert!(store.get(&id("inf")).is_ok());
    assert_eq!(store.sweep_expired(clock_now(&clock)).unwrap().expired, 0);
    let touched = store.touch(&id("inf")).unwrap();
    assert_eq!(touched.version, 1, "touches of infinite sessions are never written");
    assert_eq!(touched.last_accessed, clock_now(&clock));
}

pub fn put_creates_or_replaces<S: Store>(make: impl Fn(StoreOptions) -> S) {
    let (store, clock) = plain(&make);
    let mut s = session("p", &clock, 60_000, b"1");
    s.version = 50;
    assert_eq!(store.put(s).unwrap().version, 1);
    let second = store.put(session("p", &clock, 60_000, b"2")).unwrap();
    assert_eq!(second.version, 2);
    assert_eq!(store.get(&id("p")).unwrap(), second);
    store.delete(&id("p")).unwrap();
    let mut revived = session("p", &clock, 60_000, b"3");
    revived.tombstone = true; // ignored: put always stores a live session
    let revived = store.put(revived).unwrap();
    assert_eq!((revived.version, revived.tombstone), (4, false));
    assert_eq!(store.get(&id("p")).unwrap().metadata.as_ref(), b"3");
}

pub fn update_if_version_is_compare_and_set<S: Store>(make: impl Fn(StoreOptions) -> S) {
    let (store, clock) = plain(&make);
    assert_eq!(
        store
            .update_if_version(session("u", &clock, 60_000, b""), 1)
            .unwrap_err(),
        StoreError::NotFound { key: id("u") }
    );
    store.create(session("u", &clock, 60_000, b"0")).unwrap();
    let v2 = store.update_if_version(session("u", &clock, 60_000, b"1"), 1).unwrap();
    assert_eq!(v2.version, 2);
    let err = store
        .update_if_version(session("u", &clock, 60_000, b"x"), 1)
        .unwrap_err();
    assert_eq!(
        err,
        StoreError::Conflict {
            key: id("u"),
            expected: 1,
            actual: 2
        }
    );
    assert!(err.to_string().contains("\"u\""), "{err}");
    assert_eq!(store.get(&id("u")).unwrap().metadata.as_ref(), b"1");
    store.delete(&id("u")).unwrap();
    assert_eq!(
        store
            .update_if_version(session("u", &clock, 60_000, b""), 3)
            .unwrap_err(),
        StoreError::NotFound { key: id("u") }
    );
}

pub fn delete_writes_a_tombstone<S: Store>(make: impl Fn(StoreOptions) -> S) {
    let (store, clock) = plain(&make);
    assert!(!store.delete(&id("none")).unwrap(), "absent: nothing deleted");
    assert!(raw(&store, "none").is_none(), "absent: no tombstone written");
    store.create(session("t", &clock, 60_000, b"m")).unwrap();
    clock.advance_ms(5);
    assert!(store.delete(&id("t")).unwrap());
    assert_eq!(store.get(&id("t")).unwrap_err(), StoreError::NotFound { key: id("t") });
    let tomb = raw(&store, "t").unwrap();
    assert!(tomb.tombstone);
    assert_eq!((tomb.version, tomb.last_accessed), (2, T0 + 5));
    assert!(!store.delete(&id("t")).unwrap(), "idempotent");
    assert_eq!(raw(&store, "t").unwrap().version, 2, "a second delete writes nothing");
    // Deleting an expired session tombstones it too, but reports no live session deleted.
    store.create(session("old", &clock, 10, b"")).unwrap();
    clock.advance_ms(11);
    assert!(!store.delete(&id("old")).unwrap());
    assert!(raw(&store, "old").unwrap().tombstone);
}

pub fn touch_follows_the_policy<S: Store>(make: impl Fn(StoreOptions) -> S) {
    let (store, clock) = setup(&make, TouchPolicy::permille(100).unwrap(), 1_000);
    store.create(session("s", &clock, 1_000, b"")).unwrap();
    clock.advance_ms(100);
    let t = store.touch(&id("s")).unwrap();
    assert_eq!(
        (t.last_accessed, t.version),
        (T0 + 100, 1),
        "moved by 10 %: returned, not written"
    );
    assert_eq!(store.get(&id("s")).unwrap().last_accessed, T0);
    clock.advance_ms(1);
    let t = store.touch(&id("s")).unwrap();
    assert_eq!(
        (t.last_accessed, t.version),
        (T0 + 101, 2),
        "moved by more than 10 %: written"
    );
    assert_eq!(store.get(&id("s")).unwrap(), t);
    // Touching every 900 ms keeps a 1000 ms session alive indefinitely.
    for _ in 0..10 {
        clock.advance_ms(900);
        store.touch(&id("s")).unwrap();
    }
    assert!(store.get(&id("s")).is_ok());
    assert_eq!(store.get(&id("s")).unwrap().version, 12);
}

pub fn touch_always_policy_writes_every_move<S: Store>(make: impl Fn(StoreOptions) -> S) {
    let (store, clock) = setup(&make, TouchPolicy::always(), 1_000);
    store.create(session("s", &clock, 1_000, b"")).unwrap();
    assert_eq!(store.touch(&id("s")).unwrap().version, 1, "time did not move");
    clock.advance_ms(1);
    assert_eq!(store.touch(&id("s")).unwrap().version, 2);
    assert_eq!(store.get(&id("s")).unwrap().last_accessed, T0 + 1);
}

pub fn scan_pages_in_key_order<S: Store>(make: impl Fn(StoreOptions) -> S) {
    let (store, _clock) = plain(&make);
    let mut keys: Vec<Vec<u8>> = (0u32..300)
        .map(|i| {
            let mut k = (i.wrapping_mul(2_654_435_761) % 1000).to_be_bytes().to_vec();
            k.push((i % 7) as u8 * 40);
            k
        })
        .collect();
    keys.push(vec![0]);
    keys.push(vec![0xff; 9]);
    keys.sort();
    keys.dedup();
    for k in keys.iter().rev() {
        store
            .put(Session::new(id(k), T0, Timeout::ms(60_000).unwrap(), vec![]))
            .unwrap();
    }
    for limit in [1, 7, 64, 1000] {
        let mut seen = Vec::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let page = store.scan(after.as_ref(), limit, Visibility::Live).unwrap();
            assert!(page.records.len() <= limit);
            pages += 1;
            seen.extend(page.records.iter().map(|s| s.id.as_bytes().to_vec()));
            match page.next {
                Some(next) => {
                    assert_eq!(Some(&next), page.records.last().map(|s| &s.id));
                    after = Some(next);
                }
                None => break,
            }
        }
        assert_eq!(seen, keys, "limit {limit}");
        assert_eq!(pages, keys.len().div_ceil(limit).max(1), "limit {limit}");
    }
    assert_eq!(
        store.scan(None, 0, Visibility::Live).unwrap_err(),
        StoreError::Invalid(InvalidInput::ZeroLimit)
    );
    let empty_tail = store.scan(Some(&id([0xff; 10])), 5, Visibility::Live).unwrap();
    assert!(empty_tail.records.is_empty() && empty_tail.next.is_none());
}

pub fn scan_visibility<S: Store>(make: impl Fn(StoreOptions) -> S) {
    let (store, clock) = plain(&make);
    store.create(session("a-live", &clock, 60_000, b"")).unwrap();
    store.create(session("b-deleted", &clock, 60_000, b"")).unwrap();
    store.create(session("c-expiring", &clock, 10, b"")).unwrap();
    store.delete(&id("b-deleted")).unwrap();
    clock.advance_ms(11);
    let live = store.scan(None, 10, Visibility::Live).unwrap();
    let live_ids: Vec<_> = live.records.iter().map(|s| s.id.clone()).collect();
    assert_eq!(live_ids, vec![id("a-live")]);
    let raw = store.scan(None, 10, Visibility::Raw).unwrap();
    let raw_ids: Vec<_> = raw.records.iter().map(|s| s.id.clone()).collect();
    assert_eq!(raw_ids, vec![id("a-live"), id("b-deleted"), id("c-expiring")]);
    assert!(raw.records[1].tombstone);
}

pub fn batch_write_if_newer_never_overwrites_newer<S: Store>(make: impl Fn(StoreOptions) -> S) {
    let (store, clock) = plain(&make);
    store.put(session("k", &clock, 60_000, b"v1")).unwrap();
    store.put(session("k", &clock, 60_000, b"v2")).unwrap();
    store.put(session("k", &clock, 60_000, b"v3")).unwrap();
    let rec = |key: &str, version: u64, meta: &[u8], tombstone: bool| {
        let mut s = session(key, &clock, 60_000, meta);
        s.version = version;
        s.tombstone = tombstone;
        s.last_accessed = T0 - 1;
        s
    };
    let outcome = store
        .apply_batch_if_newer(vec![
            rec("k", 2, b"old", false),
            rec("k", 3, b"same", false),
            rec("new", 7, b"n", false),
            rec("gone", 4, b"", true),
        ])
        .unwrap();
    assert_eq!((outcome.applied, outcome.skipped), (2, 2));
    assert_eq!(store.get(&id("k")).unwrap().metadata.as_ref(), b"v3");
    let new = store.get(&id("new")).unwrap();
    assert_eq!(
        (new.version, new.last_accessed),
        (7, T0 - 1),
        "written exactly as given"
    );
    assert!(store.get(&id("gone")).is_err());
    assert_eq!(raw(&store, "gone").unwrap().version, 4);
    // A newer tombstone deletes; an older live record cannot resurrect it.
    let outcome = store
        .apply_batch_if_newer(vec![rec("k", 4, b"", true), rec("k", 3, b"back", false)])
        .unwrap();
    assert_eq!((outcome.applied, outcome.skipped), (1, 1));
    assert!(store.get(&id("k")).is_err());
    // Re-applying is idempotent.
    let outcome = store.apply_batch_if_newer(vec![rec("new", 7, b"n", false)]).unwrap();
    assert_eq!((outcome.applied, outcome.skipped), (0, 1));
    // Invalid records reject the whole batch before anything is written.
    let err = store
        .apply_batch_if_newer(vec![rec("z", 9, b"", false), rec("zero", 0, b"", false)])
        .unwrap_err();
    assert_eq!(err, StoreError::Invalid(InvalidInput::ZeroVersion { key: id("zero") }));
    assert!(raw(&store, "z").is_none());
    assert_eq!(store.apply_batch_if_newer(vec![]).unwrap(), Default::default());
}

pub fn sweep_counts_and_tombstones<S: Store>(make: impl Fn(StoreOptions) -> S) {
    let (store, clock) = setup(&make, TouchPolicy::default(), 1_000);
    for i in 0..10 {
        store.create(session(&format!("short{i}"), &clock, 10, b"")).unwrap();
    }
    store.create(session("long", &clock, 60_000, b"")).unwrap();
    store.create(session("del", &clock, 60_000, b"")).unwrap();
    store.delete(&id("del")).unwrap();
    clock.advance_ms(11);
    let now = clock_now(&clock);
    let first = store.sweep_expired(now).unwrap();
    assert_eq!((first.expired, first.tombstones), (10, 0));
    assert_eq!(store.sweep_expired(now).unwrap().expired, 0, "counted once");
    let swept = raw(&store, "short3").unwrap();
    assert!(swept.tombstone);
    assert_eq!((swept.version, swept.last_accessed), (2, now));
    assert_eq!(store.create(session("short3", &clock, 10, b"")).unwrap().version, 3);
    assert!(store.get(&id("long")).is_ok());
    // Tombstones go once older than the retention (1000 ms).
    clock.advance_ms(1_000);
    let second = store.sweep_expired(clock_now(&clock)).unwrap();
    assert_eq!(
        (second.expired, second.tombstones),
        (1, 1),
        "short3 expired again; only `del` is older than the retention"
    );
    clock.advance_ms(1);
    let third = store.sweep_expired(clock_now(&clock)).unwrap();
    assert_eq!(
        (third.expired, third.tombstones),
        (0, 9),
        "the nine first sweep tombstones go"
    );
    assert!(raw(&store, "del").is_none());
    assert!(store.get(&id("long")).is_ok());
}

pub fn bad_input_is_a_typed_error<S: Store>(make: impl Fn(StoreOptions) -> S) {
    let (store, clock) = plain(&make);
    assert_eq!(SessionId::new(b"").unwrap_err(), InvalidInput::EmptyId);
    assert!(matches!(
        SessionId::new(vec![b'x'; 1025]).unwrap_err(),
        InvalidInput::IdTooLong { len: 1025, max: 1024 }
    ));
    assert!(SessionId::new(vec![b'x'; 1024]).is_ok());
    assert_eq!(Timeout::ms(0).unwrap_err(), InvalidInput::ZeroTimeout);
    assert!(TouchPolicy::permille(1001).is_err());
    assert!(matches!(
        id([b'a', 0xff]).to_str(),
        Err(InvalidInput::NotUtf8 { valid_up_to: 1 })
    ));
    let big: Arc<[u8]> = vec![0u8; MAX_METADATA_LEN + 1].into();
    let mut s = session("big", &clock, 60_000, b"");
    s.metadata = big;
    let too_large = StoreError::Invalid(InvalidInput::MetadataTooLarge {
        len: MAX_METADATA_LEN + 1,
        max: MAX_METADATA_LEN,
    });
    assert_eq!(store.create(s.clone()).unwrap_err(), too_large);
    assert_eq!(store.put(s.clone()).unwrap_err(), too_large);
    s.version = 1;
    assert_eq!(store.apply_batch_if_newer(vec![s.clone()]).unwrap_err(), too_large);
    store.create(session("big", &clock, 60_000, b"")).unwrap();
    assert_eq!(store.update_if_version(s, 1).unwrap_err(), too_large);
    assert_eq!(store.get(&id("big")).unwrap().metadata.len(), 0, "nothing was written");
    assert!(!too_large.is_retryable());
}

pub fn concurrent_compare_and_set_loses_no_update<S: Store + 'static>(make: impl Fn(StoreOptions) -> S) {
    let (store, clock) = plain(&make);
    let store = Arc::new(store);
    store
        .create(session("ctr", &clock, 600_000, &0u64.to_be_bytes()))
        .unwrap();
    let threads = 8;
    let per_thread = 250u64;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let store = Arc::clone(&store);
            let clock = clock.clone();
            std::thread::spawn(move || {
                for i in 0..per_thread {
                    // Unrelated keys in other shards meanwhile.
                    store
                        .put(session(&format!("other-{t}-{}", i % 5), &clock, 60_000, b""))
                        .unwrap();
                    loop {
                        let cur = store.get(&id("ctr")).unwrap();
                        let n = u64::from_be_bytes(cur.metadata.as_ref().try_into().unwrap());
                        let next = session("ctr", &clock, 600_000, &(n + 1).to_be_bytes());
                        match store.update_if_version(next, cur.version) {
                            Ok(_) => break,
                            Err(StoreError::Conflict { .. }) => continue,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let end = store.get(&id("ctr")).unwrap();
    let total = threads as u64 * per_thread;
    assert_eq!(end.metadata.as_ref(), &total.to_be_bytes());
    assert_eq!(end.version, 1 + total);
}

pub fn get_raw_returns_every_stored_state<S: Store>(make: impl Fn(StoreOptions) -> S) {
    let (store, clock) = plain(&make);
    assert_eq!(store.get_raw(&id("none")).unwrap(), None);
    let live = store.create(session("live", &clock, 60_000, b"l")).unwrap();
    let short = store.create(session("short", &clock, 10, b"s")).unwrap();
    store.create(session("dead", &clock, 60_000, b"d")).unwrap();
    assert!(store.delete(&id("dead")).unwrap());
    clock.advance_ms(11);
    assert_eq!(store.get_raw(&id("live")).unwrap(), Some(live));
    // Expired: not returned by get, returned raw as stored.
    assert!(store.get(&id("short")).is_err());
    assert_eq!(store.get_raw(&id("short")).unwrap(), Some(short));
    let dead = store.get_raw(&id("dead")).unwrap().unwrap();
    assert!(dead.tombstone);
    assert_eq!(dead.version, 2);
    // The same records as a raw scan, key by key.
    for key in ["live", "short", "dead"] {
        assert_eq!(store.get_raw(&id(key)).unwrap(), raw(&store, key), "{key}");
    }
    // get_raw writes nothing: no touch, no version change.
    clock.advance_ms(50_000);
    let again = store.get_raw(&id("live")).unwrap().unwrap();
    assert_eq!((again.version, again.last_accessed), (1, T0));
    // A batch-written record comes back exactly as given; a swept tombstone is gone.
    let mut given = session("given", &clock, 5, b"g");
    given.version = 41;
    given.tombstone = true;
    store.apply_batch_if_newer(vec![given.clone()]).unwrap();
    assert_eq!(store.get_raw(&id("given")).unwrap(), Some(given));
    clock.advance_ms(10_000);
    store.sweep_expired(clock_now(&clock)).unwrap();
    assert_eq!(store.get_raw(&id("dead")).unwrap(), None);
}

pub fn usable_as_trait_object<S: Store + 'static>(make: impl Fn(StoreOptions) -> S) {
    let (store, clock) = plain(&make);
    let store: Box<dyn Store> = Box::new(store);
    store.create(session("dyn", &clock, 60_000, b"")).unwrap();
    assert!(store.get(&id("dyn")).is_ok());
}

/// `store_conformance!(name, factory)`: one `#[test]` per contract case, in `mod name`.
#[macro_export]
macro_rules! store_conformance {
    ($name:ident, $make:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::store_conformance!(@cases $make;
                create_is_create_if_absent,
                create_over_dead_record_continues_versions,
                get_returns_what_was_stored,
                expired_session_is_never_returned,
                infinite_timeout_never_expires,
                put_creates_or_replaces,
                update_if_version_is_compare_and_set,
                delete_writes_a_tombstone,
                touch_follows_the_policy,
                touch_always_policy_writes_every_move,
                scan_pages_in_key_order,
                scan_visibility,
                batch_write_if_newer_never_overwrites_newer,
                sweep_counts_and_tombstones,
                bad_input_is_a_typed_error,
                concurrent_compare_and_set_loses_no_update,
                get_raw_returns_every_stored_state,
                usable_as_trait_object,
            );
        }
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::conformance::$case($make);
            }
        )*
    };
}
