//! Stores and migrations shared inside one process (`session::shared`, `migrate::hybrid`),
//! as a host that opens them by description uses them (the NIF does exactly this).

use std::sync::Arc;
use std::time::Duration;

use erlmcp_rollout::etcd::EtcdSecurity;
use erlmcp_rollout::migrate::hybrid::{HybridOpenError, HybridOptions, HybridRegistry};
use erlmcp_rollout::migrate::phase::Phase;
use erlmcp_rollout::session::shared::{OpenError, ShareOptions, StoreKey, StoreRegistry};
use erlmcp_rollout::session::uri::StoreUri;
use erlmcp_rollout::session::{Session, SessionId, Store, SystemClock, Timeout, TouchPolicy};

fn registry() -> StoreRegistry {
    StoreRegistry::new(Arc::new(SystemClock))
}

fn session(id: &str, meta: &[u8]) -> Session {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    Session::new(
        SessionId::new(id).unwrap(),
        now,
        Timeout::ms(3_600_000).unwrap(),
        meta.to_vec(),
    )
}

fn migration() -> ShareOptions {
    ShareOptions {
        migration: true,
        ..ShareOptions::default()
    }
}

#[test]
fn memory_stores_are_shared_by_name_and_settings_must_match() {
    let r = registry();
    let a = r.open(&StoreKey::memory("a"), ShareOptions::default()).unwrap();
    let a2 = r.open(&StoreKey::memory("a"), ShareOptions::default()).unwrap();
    let b = r.open(&StoreKey::memory("b"), ShareOptions::default()).unwrap();
    assert!(Arc::ptr_eq(&a, &a2));
    assert!(!Arc::ptr_eq(&a, &b));
    a.put(session("s1", b"x")).unwrap();
    assert_eq!(a2.get(&SessionId::new("s1").unwrap()).unwrap().metadata.as_ref(), b"x");
    assert_eq!(r.open_count(), 2);

    let other = ShareOptions {
        touch: Some(TouchPolicy::permille(5).unwrap()),
        ..ShareOptions::default()
    };
    let err = r.open(&StoreKey::memory("a"), other).err().unwrap();
    assert!(matches!(err, OpenError::Mismatch(_)), "{err:?}");
    assert!(err.to_string().contains("memory store \"a\""), "{err}");
    assert!(err.to_string().contains("other settings"), "{err}");

    // A plain memory store frees the dead at once: it cannot become a migration side.
    let err = r.open(&StoreKey::memory("a"), migration()).err().unwrap();
    assert!(err.to_string().contains("no tombstones"), "{err}");
    // A migration side can be opened plainly (it is shared as it is).
    let m = r.open(&StoreKey::memory("m"), migration()).unwrap();
    assert!(Arc::ptr_eq(
        &m,
        &r.open(&StoreKey::memory("m"), ShareOptions::default()).unwrap()
    ));
}

#[test]
fn a_store_held_by_nobody_is_opened_anew() {
    let r = registry();
    let a = r.open(&StoreKey::memory("gone"), ShareOptions::default()).unwrap();
    a.put(session("s1", b"x")).unwrap();
    drop(a);
    assert_eq!(r.open_count(), 0);
    // A memory store lives as long as its holders: a new one is empty, and may now
    // have other settings.
    let other = ShareOptions {
        touch: Some(TouchPolicy::permille(5).unwrap()),
        ..ShareOptions::default()
    };
    let b = r.open(&StoreKey::memory("gone"), other).unwrap();
    assert!(b.get(&SessionId::new("s1").unwrap()).is_err());
}

#[test]
fn one_file_is_one_store_however_it_is_spelled_and_from_any_thread() {
    let dir = tempfile::tempdir().unwrap();
    let r = Arc::new(registry());
    let plain = StoreKey::disk(dir.path().join("s.redb")).unwrap();
    let dotted = StoreKey::disk(dir.path().join(".").join("s.redb")).unwrap();
    let from_uri = StoreKey::from_uri(
        &StoreUri::Disk(dir.path().join("sub/../s.redb")),
        "unused",
        &EtcdSecurity::default(),
    );
    // `sub` does not exist: its directory cannot be resolved.
    let err = from_uri.err().unwrap();
    assert!(err.to_string().contains("disk store directory"), "{err}");
    assert_eq!(plain, dotted);

    let stores: Vec<Arc<dyn Store>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (r, key) = (Arc::clone(&r), dotted.clone());
                s.spawn(move || r.open(&key, ShareOptions::default()).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(stores.iter().all(|s| Arc::ptr_eq(s, &stores[0])));
    stores[0].put(session("d1", b"disk")).unwrap();
    drop(stores);
    // Reopened after the last holder let go: the file is free again and keeps the write.
    let again = r.open(&plain, ShareOptions::default()).unwrap();
    assert_eq!(
        again.get(&SessionId::new("d1").unwrap()).unwrap().metadata.as_ref(),
        b"disk"
    );

    let err = StoreKey::disk(dir.path().join("no-such-dir").join("s.redb"))
        .err()
        .unwrap();
    assert!(matches!(err, OpenError::BadSpec(_)), "{err:?}");
    assert!(err.to_string().contains("no-such-dir"), "{err}");
}

#[test]
fn etcd_keys_name_one_cluster_prefix_and_reject_bad_members() {
    let sec = EtcdSecurity::default();
    let a = StoreKey::etcd(&["127.0.0.1:2380", "127.0.0.1:2379"], b"p".to_vec(), sec.clone()).unwrap();
    let b = StoreKey::etcd(&["127.0.0.1:2379", "127.0.0.1:2380"], b"p/".to_vec(), sec.clone()).unwrap();
    assert_eq!(a, b);
    assert!(a.blocking() && !StoreKey::memory("m").blocking());
    let uri = StoreUri::parse("etcd:127.0.0.1:2379,127.0.0.1:2380/p").unwrap();
    assert_eq!(StoreKey::from_uri(&uri, "unused", &sec).unwrap(), a);
    // Explicit URLs are members too (the scheme is checked against TLS when connecting).
    StoreKey::etcd(&["http://127.0.0.1:2379"], b"p/".to_vec(), sec.clone()).unwrap();
    for (member, says) in [
        ("127.0.0.1", "no port"),
        ("h:99999", "outside 1..=65535"),
        ("h o:1", "in host"),
    ] {
        let err = StoreKey::etcd(&[member], b"p/".to_vec(), sec.clone()).err().unwrap();
        assert!(
            err.to_string().contains(member) && err.to_string().contains(says),
            "{member}: {err}"
        );
    }
    let none: [&str; 0] = [];
    assert!(StoreKey::etcd(&none, b"p/".to_vec(), sec).is_err());
}

#[test]
fn a_migration_is_one_per_state_directory_and_keeps_its_phase() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(SystemClock);
    let (stores, hybrids) = (StoreRegistry::new(clock.clone()), HybridRegistry::new(clock));
    let old = StoreKey::memory("old");
    let new = StoreKey::disk(dir.path().join("new.redb")).unwrap();
    let mut options = HybridOptions::new(dir.path());
    options.step_to = Some(Phase::Phase1);
    let h = hybrids.open(&stores, &old, &new, options.clone()).unwrap();
    assert_eq!(h.migrator().phase(), Phase::Phase1);
    assert!(h.blocking(), "a disk side may wait for I/O");
    let again = hybrids
        .open(&stores, &old, &new, HybridOptions::new(dir.path()))
        .unwrap();
    assert!(Arc::ptr_eq(&h, &again));

    // Phase 1 dual-writes: after the drain the secondary (opened plainly: the same store) has it.
    h.migrator().put(session("h1", b"both")).unwrap();
    h.migrator().drain(Duration::from_secs(10)).unwrap();
    let secondary = stores.open(&new, ShareOptions::default()).unwrap();
    assert_eq!(
        secondary.get(&SessionId::new("h1").unwrap()).unwrap().metadata.as_ref(),
        b"both"
    );
    drop((h, again, secondary));

    // Every holder gone: the next open starts the migration again from its saved phase.
    let h = hybrids
        .open(&stores, &old, &new, HybridOptions::new(dir.path()))
        .unwrap();
    assert_eq!(h.migrator().phase(), Phase::Phase1);
}

#[test]
fn hybrid_refusals_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(SystemClock);
    let (stores, hybrids) = (StoreRegistry::new(clock.clone()), HybridRegistry::new(clock));
    let same = StoreKey::memory("same");
    let err = hybrids
        .open(&stores, &same, &same, HybridOptions::new(dir.path()))
        .err()
        .unwrap();
    assert!(matches!(err, HybridOpenError::Side(OpenError::Mismatch(_))), "{err:?}");
    assert!(err.to_string().contains("the same store"), "{err}");

    let missing = dir.path().join("missing");
    let err = hybrids
        .open(
            &stores,
            &StoreKey::memory("a"),
            &StoreKey::memory("b"),
            HybridOptions::new(&missing),
        )
        .err()
        .unwrap();
    assert!(matches!(err, HybridOpenError::BadOption(_)), "{err:?}");
    assert!(err.to_string().contains("missing"), "{err}");

    // A plain memory store in use cannot be a migration side; nothing was started.
    let _plain = stores
        .open(&StoreKey::memory("plain"), ShareOptions::default())
        .unwrap();
    let err = hybrids
        .open(
            &stores,
            &StoreKey::memory("plain"),
            &StoreKey::memory("b"),
            HybridOptions::new(dir.path()),
        )
        .err()
        .unwrap();
    assert!(err.to_string().contains("no tombstones"), "{err}");
    assert!(!dir.path().join("outbox.redb").exists());
}

#[test]
fn a_memory_store_slides_expiry_on_every_fetch_and_a_disk_store_keeps_the_touch_policy() {
    // erlmcp's ETS backend slides `last_accessed` on every fetch: a session fetched at
    // 0.2 s of a 4 s timeout is alive at 4.1 s. The memory store does the same by
    // default; disk writes a touch only past 10 % of the timeout (an fsync each).
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(erlmcp_rollout::session::ManualClock::new(1_000_000));
    let r = StoreRegistry::new(clock.clone());
    let memory = StoreKey::memory("sliding");
    let disk = StoreKey::disk(dir.path().join("s.redb")).unwrap();
    for (key, alive_at_4100) in [(&memory, true), (&disk, false)] {
        clock.set_unix_ms(1_000_000);
        let store = r.open(key, ShareOptions::default()).unwrap();
        let id = SessionId::new("s").unwrap();
        store
            .put(Session::new(id.clone(), 1_000_000, Timeout::ms(4_000).unwrap(), vec![]))
            .unwrap();
        clock.set_unix_ms(1_000_200);
        assert_eq!(store.touch(&id).unwrap().last_accessed, 1_000_200);
        clock.set_unix_ms(1_004_100);
        assert_eq!(store.get(&id).is_ok(), alive_at_4100, "{key:?}");
        // The kind's default spelled out is the same settings: shared, not refused.
        let spelled = ShareOptions {
            touch: Some(key.default_touch()),
            ..ShareOptions::default()
        };
        assert!(Arc::ptr_eq(&store, &r.open(key, spelled).unwrap()));
    }
    assert_eq!(memory.default_touch(), TouchPolicy::always());
    assert_eq!(disk.default_touch(), TouchPolicy::default());
}
