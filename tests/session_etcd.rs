//! The `Store` contract and the model-based proptest against a real 3-member etcd
//! cluster (started by this test binary, shared by its tests, one key prefix per store),
//! plus what only the etcd store has: typed errors for oversized records and for an
//! unreachable cluster.

#![cfg(feature = "etcd")]

#[path = "session_support/conformance.rs"]
mod conformance;
#[path = "session_support/etcd_cluster.rs"]
mod etcd_cluster;
#[path = "session_support/model.rs"]
mod model;

use std::sync::Arc;
use std::time::{Duration, Instant};

use erlmcp_rollout::session::{
    EtcdOptions, EtcdStore, InvalidInput, ManualClock, Session, SessionId, Store, StoreError, StoreOptions, Timeout,
    Visibility,
};

store_conformance!(etcd, etcd_cluster::store);
store_model!(etcd_model, etcd_cluster::store, cases = 24);

const T0: i64 = 1_700_000_000_000;

fn id(s: &str) -> SessionId {
    SessionId::new(s).unwrap()
}

#[test]
fn oversized_records_are_a_typed_error_naming_the_limit() {
    let store = etcd_cluster::store(StoreOptions::with_clock(ManualClock::new(T0)));
    let meta = vec![7u8; 2 * 1024 * 1024];
    let err = store
        .put(Session::new(id("big"), T0, Timeout::Infinity, meta.clone()))
        .unwrap_err();
    match &err {
        StoreError::Invalid(InvalidInput::RecordTooLarge { key, len, max }) => {
            assert_eq!(key, &id("big"));
            assert!(*len > meta.len() && *max < 1_572_864, "{err}");
        }
        other => panic!("expected RecordTooLarge, got {other:?}"),
    }
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("\"big\""), "{err}");
    assert!(
        matches!(store.get(&id("big")), Err(StoreError::NotFound { .. })),
        "nothing written"
    );
    // The largest accepted record is really accepted by the cluster.
    let StoreError::Invalid(InvalidInput::RecordTooLarge { max, .. }) = err else {
        unreachable!()
    };
    let fits = max - erlmcp_rollout::session::codec::HEADER_LEN - 3;
    let stored = store
        .put(Session::new(id("big"), T0, Timeout::Infinity, vec![1u8; fits]))
        .unwrap();
    assert_eq!(store.get(&id("big")).unwrap(), stored);
    // A cluster limit below the configured one still gives the typed error, not a gRPC string.
    let lying = EtcdStore::connect(
        &etcd_cluster::shared().endpoints(),
        etcd_cluster::unique_prefix(),
        EtcdOptions {
            max_request_bytes: 8 * 1024 * 1024,
            ..EtcdOptions::default()
        },
        StoreOptions::with_clock(ManualClock::new(T0)),
    )
    .unwrap();
    let err = lying
        .put(Session::new(id("big"), T0, Timeout::Infinity, meta))
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Invalid(InvalidInput::RecordTooLarge { .. })),
        "{err:?}"
    );
}

#[test]
fn unreachable_cluster_is_unavailable_within_the_timeout() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoints = vec![format!("http://127.0.0.1:{port}")];
    let etcd = EtcdOptions {
        connect_timeout: Duration::from_millis(800),
        request_timeout: Duration::from_millis(300),
        operation_timeout: Duration::from_millis(800),
        ..EtcdOptions::default()
    };
    let started = Instant::now();
    let err = EtcdStore::connect(&endpoints, "x/", etcd.clone(), StoreOptions::default()).unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(err.to_string().contains(&endpoints[0]), "names the endpoint: {err}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());

    // Bad endpoints are input errors, not outages.
    assert!(matches!(
        EtcdStore::connect(&[], "x/", etcd.clone(), StoreOptions::default()),
        Err(StoreError::Invalid(InvalidInput::Endpoint { .. }))
    ));
    assert!(matches!(
        EtcdStore::connect(
            &["https://127.0.0.1:2379".to_string()],
            "x/",
            etcd.clone(),
            StoreOptions::default()
        ),
        Err(StoreError::Invalid(InvalidInput::Endpoint { .. }))
    ));
    // host:port without a scheme means http://.
    let bare: Vec<String> = etcd_cluster::shared()
        .endpoints()
        .iter()
        .map(|e| e.trim_start_matches("http://").to_string())
        .collect();
    let store = EtcdStore::connect(&bare, etcd_cluster::unique_prefix(), etcd, StoreOptions::default()).unwrap();
    assert!(matches!(store.get(&id("none")), Err(StoreError::NotFound { .. })));
}

#[test]
fn a_stopped_cluster_makes_every_call_unavailable_without_panicking() {
    let mut cluster = etcd_cluster::Cluster::start();
    let etcd = EtcdOptions {
        request_timeout: Duration::from_millis(300),
        operation_timeout: Duration::from_millis(1_000),
        ..EtcdOptions::default()
    };
    let store = EtcdStore::connect(
        &cluster.endpoints(),
        "s/",
        etcd,
        StoreOptions::with_clock(ManualClock::new(T0)),
    )
    .unwrap();
    store.put(Session::new(id("a"), T0, Timeout::Infinity, vec![])).unwrap();
    for i in 0..3 {
        cluster.kill(i);
    }
    type Call<'a> = Box<dyn Fn() -> Result<(), StoreError> + 'a>;
    let calls: Vec<(&str, Call)> = vec![
        ("get", Box::new(|| store.get(&id("a")).map(drop))),
        (
            "put",
            Box::new(|| {
                store
                    .put(Session::new(id("a"), T0, Timeout::Infinity, vec![]))
                    .map(drop)
            }),
        ),
        (
            "create",
            Box::new(|| {
                store
                    .create(Session::new(id("b"), T0, Timeout::Infinity, vec![]))
                    .map(drop)
            }),
        ),
        ("delete", Box::new(|| store.delete(&id("a")).map(drop))),
        ("touch", Box::new(|| store.touch(&id("a")).map(drop))),
        ("scan", Box::new(|| store.scan(None, 10, Visibility::Raw).map(drop))),
        ("sweep", Box::new(|| store.sweep_expired(T0).map(drop))),
    ];
    for (name, call) in calls {
        let started = Instant::now();
        let err = call().unwrap_err();
        assert!(err.is_retryable(), "{name}: {err:?}");
        assert!(err.to_string().contains("etcd at [http://127.0.0.1:"), "{name}: {err}");
        // operation_timeout (1 s) plus at most one request timeout, with slack for a loaded CI box.
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{name}: {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn callable_from_inside_a_tokio_runtime() {
    let store = Arc::new(etcd_cluster::store(StoreOptions::with_clock(ManualClock::new(T0))));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = Arc::clone(&store);
    let got = rt.block_on(async move {
        s.put(Session::new(id("in-async"), T0, Timeout::Infinity, b"x".to_vec()))
            .unwrap();
        s.get(&id("in-async")).unwrap()
    });
    assert_eq!(got.metadata.as_ref(), b"x");
    // Dropping the store inside a runtime must not panic either.
    rt.block_on(async move { drop(store) });
}

#[test]
fn records_are_plain_codec_values_under_the_prefix() {
    let cluster = etcd_cluster::shared();
    let prefix = etcd_cluster::unique_prefix();
    let store = EtcdStore::connect(
        &cluster.endpoints(),
        prefix.clone(),
        EtcdOptions::default(),
        StoreOptions::with_clock(ManualClock::new(T0)),
    )
    .unwrap();
    let s = store
        .create(Session::new(
            SessionId::new([0xff, 0x00, b'k']).unwrap(),
            T0,
            Timeout::ms(60_000).unwrap(),
            vec![9],
        ))
        .unwrap();
    let out = etcd_cluster::etcdctl(&cluster.endpoints(), &["get", &prefix, "--prefix", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let kv = &v["kvs"][0];
    let key = base64_decode(kv["key"].as_str().unwrap());
    let mut expected_key = prefix.into_bytes();
    expected_key.extend_from_slice(&[0xff, 0x00, b'k']);
    assert_eq!(key, expected_key);
    let value = base64_decode(kv["value"].as_str().unwrap());
    assert_eq!(erlmcp_rollout::session::codec::decode(&value).unwrap(), s);
    assert_ne!(
        kv["lease"].as_i64().unwrap_or(0),
        0,
        "a finite session is attached to a bucket lease"
    );
}

/// Standard base64 (etcdctl's JSON output), enough for this test.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= u32::from(val(c)) << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push((acc >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// `etcdctl get PREFIX --prefix -w json`: (key without the prefix, value, lease) per key.
fn etcdctl_records(prefix: &str) -> Vec<(Vec<u8>, Vec<u8>, i64)> {
    let out = etcd_cluster::etcdctl(
        &etcd_cluster::shared().endpoints(),
        &["get", prefix, "--prefix", "-w", "json"],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["kvs"]
        .as_array()
        .map(|kvs| {
            kvs.iter()
                .map(|kv| {
                    let key = base64_decode(kv["key"].as_str().unwrap());
                    (
                        key[prefix.len()..].to_vec(),
                        base64_decode(kv["value"].as_str().unwrap()),
                        kv["lease"].as_i64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Remaining TTL (s) of a lease, as etcd reports it.
fn lease_ttl(lease: i64) -> i64 {
    let out = etcd_cluster::etcdctl(
        &etcd_cluster::shared().endpoints(),
        &["lease", "timetolive", &format!("{lease:x}"), "-w", "json"],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["ttl"].as_i64().unwrap()
}

#[test]
fn leases_are_shared_per_bucket_and_outlive_expiry_plus_retention() {
    use erlmcp_rollout::session::{Clock, SystemClock};
    // The system clock: leases run in real time, so their TTLs can be compared with it.
    let prefix = etcd_cluster::unique_prefix();
    let opts = StoreOptions {
        tombstone_retention_ms: 120_000,
        ..StoreOptions::default()
    };
    let store = EtcdStore::connect(
        &etcd_cluster::shared().endpoints(),
        prefix.clone(),
        EtcdOptions::default(),
        opts,
    )
    .unwrap();
    let now = SystemClock.now_unix_ms();
    for i in 0..20 {
        store
            .create(Session::new(
                id(&format!("s{i:02}")),
                now,
                Timeout::ms(30_000).unwrap(),
                vec![],
            ))
            .unwrap();
    }
    store
        .create(Session::new(id("forever"), now, Timeout::Infinity, vec![]))
        .unwrap();
    store
        .create(Session::new(id("gone"), now, Timeout::ms(3_600_000).unwrap(), vec![]))
        .unwrap();
    store.delete(&id("gone")).unwrap();

    let records = etcdctl_records(&prefix);
    assert_eq!(records.len(), 22);
    let mut leases: Vec<i64> = records.iter().filter(|r| r.0.starts_with(b"s")).map(|r| r.2).collect();
    leases.sort_unstable();
    leases.dedup();
    assert!(
        !leases.contains(&0) && leases.len() <= 2,
        "20 sessions expiring together share one bucket lease (two if a minute boundary fell between): {leases:?}"
    );
    let checked_at = SystemClock.now_unix_ms();
    for (key, value, lease) in &records {
        let s = erlmcp_rollout::session::codec::decode(value).unwrap();
        let removal = match (s.tombstone, s.timeout) {
            (true, _) => s.last_accessed + 120_000,
            (false, Timeout::Infinity) => {
                assert_eq!(*lease, 0, "an infinite session has no lease");
                continue;
            }
            (false, Timeout::Ms(t)) => s.last_accessed + t.get() as i64 + 120_000,
        };
        assert_ne!(*lease, 0, "{}", String::from_utf8_lossy(key));
        let ttl_ms = lease_ttl(*lease) * 1000;
        assert!(
            checked_at + ttl_ms >= removal,
            "{}: lease ends {ttl_ms} ms from now, before expiry + retention ({} ms from now)",
            String::from_utf8_lossy(key),
            removal - checked_at
        );
    }
}

#[path = "session_support/blackhole_proxy.rs"]
mod blackhole_proxy;

/// A store whose first endpoint is a proxy to member 0 (then members 1 and 2 directly),
/// with short timeouts; the proxy's connection is established before it is returned.
fn store_behind_proxy(prefix: &str) -> (EtcdStore, blackhole_proxy::Proxy) {
    store_behind_proxy_with(prefix, StoreOptions::with_clock(ManualClock::new(T0)))
}

fn store_behind_proxy_with(prefix: &str, opts: StoreOptions) -> (EtcdStore, blackhole_proxy::Proxy) {
    let endpoints = etcd_cluster::shared().endpoints();
    let proxy = blackhole_proxy::Proxy::start(endpoints[0].trim_start_matches("http://"));
    let etcd = EtcdOptions {
        request_timeout: Duration::from_millis(400),
        operation_timeout: Duration::from_secs(5),
        ..EtcdOptions::default()
    };
    let store = EtcdStore::connect(
        &[proxy.url(), endpoints[1].clone(), endpoints[2].clone()],
        prefix,
        etcd,
        opts,
    )
    .unwrap();
    (store, proxy)
}

#[test]
fn writes_whose_answer_was_lost_are_recognised_not_repeated() {
    let prefix = etcd_cluster::unique_prefix();
    let observer = EtcdStore::connect(
        &etcd_cluster::shared().endpoints(),
        prefix.clone(),
        EtcdOptions::default(),
        StoreOptions::with_clock(ManualClock::new(T0)),
    )
    .unwrap();
    // Infinite sessions have no lease, so the txn is the first request after arming.
    let fresh = |key: &str, meta: &[u8]| Session::new(id(key), T0, Timeout::Infinity, meta.to_vec());

    // create: applied, answer lost; the retry finds its own record: Ok, not AlreadyExists.
    let (store, proxy) = store_behind_proxy(&prefix);
    proxy.arm();
    let created = store.create(fresh("c", b"1")).unwrap();
    assert_eq!(created.version, 1);
    assert_eq!(observer.get(&id("c")).unwrap(), created);

    // update_if_version: applied, answer lost: Ok, not Conflict.
    let (store, proxy) = store_behind_proxy(&prefix);
    proxy.arm();
    let updated = store.update_if_version(fresh("c", b"2"), 1).unwrap();
    assert_eq!(updated.version, 2);
    assert_eq!(observer.get(&id("c")).unwrap(), updated);

    // put: applied once, not twice.
    let (store, proxy) = store_behind_proxy(&prefix);
    proxy.arm();
    let put = store.put(fresh("c", b"3")).unwrap();
    assert_eq!(put.version, 3, "applied exactly once");
    assert_eq!(observer.get(&id("c")).unwrap(), put);

    // delete: the tombstone is written once and the answer is still "a live session was deleted".
    let (store, proxy) = store_behind_proxy(&prefix);
    store.create(fresh("warm", b"")).unwrap();
    store.delete(&id("warm")).unwrap(); // grants the tombstones' bucket lease before arming
    proxy.arm();
    assert!(store.delete(&id("c")).unwrap());
    let raw = observer.scan(None, 10, Visibility::Raw).unwrap().records;
    assert_eq!((&raw[0].id, raw[0].version, raw[0].tombstone), (&id("c"), 4, true));

    // A batch (one multi-record txn) whose answer is lost: every record counts as applied,
    // none as skipped, and each is stored exactly as given.
    let (store, proxy) = store_behind_proxy(&prefix);
    let batch: Vec<Session> = (0..10)
        .map(|i| {
            let mut s = fresh(&format!("b{i}"), &[i]);
            s.version = 5;
            s
        })
        .collect();
    proxy.arm();
    let outcome = store.apply_batch_if_newer(batch.clone()).unwrap();
    assert_eq!((outcome.applied, outcome.skipped), (10, 0));
    for s in &batch {
        assert_eq!(&observer.get(&s.id).unwrap(), s);
    }

    proxy.disarm();
}

#[test]
fn an_etcd_store_uri_opens_the_cluster_under_its_prefix() {
    use erlmcp_rollout::session::uri::StoreUri;
    let endpoints = etcd_cluster::shared().endpoints();
    let members: Vec<&str> = endpoints.iter().map(|e| e.trim_start_matches("http://")).collect();
    let prefix = etcd_cluster::unique_prefix();
    let uri = StoreUri::parse(&format!("etcd:{}/{}", members.join(","), prefix.trim_end_matches('/'))).unwrap();
    let store = uri.open(StoreOptions::with_clock(ManualClock::new(T0))).unwrap();
    let s = store
        .create(Session::new(id("via-uri"), T0, Timeout::Infinity, vec![1]))
        .unwrap();
    // The same record through a store on the same prefix, built directly.
    let direct = EtcdStore::connect(
        &endpoints,
        prefix,
        EtcdOptions::default(),
        StoreOptions::with_clock(ManualClock::new(T0)),
    )
    .unwrap();
    assert_eq!(direct.get(&id("via-uri")).unwrap(), s);
}

#[test]
fn a_sweep_whose_answer_was_lost_counts_what_it_changed() {
    let prefix = etcd_cluster::unique_prefix();
    let clock = ManualClock::new(T0);
    let opts = StoreOptions {
        tombstone_retention_ms: 5,
        ..StoreOptions::with_clock(clock.clone())
    };
    let (store, proxy) = store_behind_proxy_with(&prefix, opts);
    for i in 0..5 {
        store
            .create(Session::new(id(&format!("s{i}")), T0, Timeout::ms(10).unwrap(), vec![]))
            .unwrap();
    }
    store
        .create(Session::new(id("old"), T0, Timeout::Infinity, vec![]))
        .unwrap();
    store.delete(&id("old")).unwrap(); // also grants the tombstones' bucket lease before arming
    clock.advance_ms(20);
    // The sweep's small range read gets its answer; its large txn (six records) does not.
    // (Were the read over the threshold, the store would move to another member and the
    // txn would not be lost: the counts would still be right, the path merely untested.)
    proxy.arm_after_request_bytes(400);
    let outcome = store.sweep_expired(T0 + 20).unwrap();
    assert_eq!((outcome.expired, outcome.tombstones), (5, 1));
    let observer = EtcdStore::connect(
        &etcd_cluster::shared().endpoints(),
        prefix,
        EtcdOptions::default(),
        StoreOptions::with_clock(ManualClock::new(T0 + 20)),
    )
    .unwrap();
    let raw = observer.scan(None, 10, Visibility::Raw).unwrap().records;
    assert_eq!(raw.len(), 5, "the old tombstone is gone: {raw:?}");
    assert!(raw
        .iter()
        .all(|s| s.tombstone && s.version == 2 && s.last_accessed == T0 + 20));
}

#[test]
fn a_page_over_expired_records_visits_a_bounded_number_of_keys() {
    // 2500 expired sessions before 3 live ones: each scan call visits at most
    // 2 x limit (at least 1024) keys and, short of `limit`, continues after the
    // last key visited (a whole-prefix list no longer runs out of one call's time).
    let clock = ManualClock::new(T0);
    let store = etcd_cluster::store(StoreOptions::with_clock(clock.clone()));
    let dead: Vec<Session> = (0..2500)
        .map(|i| {
            let mut s = Session::new(id(&format!("a-{i:05}")), T0, Timeout::ms(1000).unwrap(), vec![]);
            s.version = 1;
            s
        })
        .collect();
    for chunk in dead.chunks(500) {
        assert_eq!(store.apply_batch_if_newer(chunk.to_vec()).unwrap().applied, chunk.len());
    }
    for i in 1..=3 {
        store
            .put(Session::new(id(&format!("z-{i}")), T0, Timeout::Infinity, vec![]))
            .unwrap();
    }
    clock.advance_ms(10_000);
    let mut after: Option<SessionId> = None;
    let mut live = Vec::new();
    let mut calls = 0;
    loop {
        calls += 1;
        let page = store.scan(after.as_ref(), 10, Visibility::Live).unwrap();
        assert!(page.records.len() <= 10);
        live.extend(page.records.iter().map(|s| s.id.clone()));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(live, vec![id("z-1"), id("z-2"), id("z-3")]);
    // 2503 keys at <= 1024 visited per call: at least 3 calls.
    assert!(calls >= 3, "{calls} calls");
}
