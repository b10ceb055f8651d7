//! What only the disk store has: records survive reopening the file, and damaged records
//! on disk come back as typed `Corrupt` errors naming the key.

#![cfg(feature = "disk")]

use erlmcp_rollout::session::{
    DiskStore, ManualClock, Session, SessionId, Store, StoreError, StoreOptions, Timeout, Visibility,
};
use redb::{Database, TableDefinition};

const SESSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sessions");
const T0: i64 = 1_700_000_000_000;

fn opts() -> StoreOptions {
    StoreOptions::with_clock(ManualClock::new(T0))
}

fn id(s: &str) -> SessionId {
    SessionId::new(s).unwrap()
}

#[test]
fn acknowledged_writes_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    {
        let store = DiskStore::create(&path, opts()).unwrap();
        store
            .create(Session::new(
                id("kept"),
                T0,
                Timeout::ms(60_000).unwrap(),
                b"m".to_vec(),
            ))
            .unwrap();
        store
            .create(Session::new(id("gone"), T0, Timeout::Infinity, vec![]))
            .unwrap();
        assert!(store.delete(&id("gone")).unwrap());
    }
    let store = DiskStore::create(&path, opts()).unwrap();
    let kept = store.get(&id("kept")).unwrap();
    assert_eq!((kept.version, kept.metadata.as_ref()), (1, &b"m"[..]));
    assert!(store.get(&id("gone")).is_err());
    let raw = store.scan(None, 10, Visibility::Raw).unwrap();
    assert!(raw.records[0].tombstone, "the tombstone is on disk too");
}

#[test]
fn corrupt_records_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    {
        let store = DiskStore::create(&path, opts()).unwrap();
        store
            .create(Session::new(id("good"), T0, Timeout::Infinity, vec![]))
            .unwrap();
    }
    {
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(SESSIONS).unwrap();
            table.insert(&b"bad"[..], &b"\x01garbage"[..]).unwrap();
            let good = Session::new(id("elsewhere"), T0, Timeout::Infinity, vec![]);
            let bytes = erlmcp_rollout::session::codec::encode(&good).unwrap();
            table.insert(&b"moved"[..], bytes.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = DiskStore::create(&path, opts()).unwrap();
    assert!(store.get(&id("good")).is_ok());
    let e = store.get(&id("bad")).unwrap_err();
    assert!(
        matches!(e, StoreError::Corrupt { key: Some(ref k), .. } if k == &id("bad")),
        "{e:?}"
    );
    assert!(e.to_string().contains("\"bad\""), "{e}");
    let e = store.get(&id("moved")).unwrap_err();
    assert!(e.to_string().contains("holds id \"elsewhere\""), "{e}");
    assert!(matches!(
        store.scan(None, 10, Visibility::Raw),
        Err(StoreError::Corrupt { .. })
    ));
    assert!(matches!(
        store.put(Session::new(id("bad"), T0, Timeout::Infinity, vec![])),
        Err(StoreError::Corrupt { .. })
    ));
    assert!(matches!(store.sweep_expired(T0), Err(StoreError::Corrupt { .. })));
}
