//! The versioned writers of the disk reliability loops (kill -9, power loss):
//! each write stores the next version of a key with contents derived from
//! (key, version), so a check can tell whether an acknowledged write survived
//! intact.

use std::collections::BTreeMap;

use erlmcp_rollout::session::{
    Session, SessionId, Store, StoreError, Timeout, Unstarted, Visibility, WriteOp, Written,
};

/// Contents of `key` at `version`.
pub type Meta = fn(&str, u64) -> Vec<u8>;

/// Write the next version of `key`, exercising every write path: create when
/// absent, otherwise an unconditional put on every third `step` and a
/// version-guarded update on the others; on odd steps as a started write
/// (`Store::start`, its answer awaited here), so both ways into the group commit
/// (a waiting writer, the commit thread) lead groups.
pub fn write_next(store: &impl Store, key: &str, step: usize, meta: Meta) -> Result<Session, StoreError> {
    let sid = SessionId::new(key).unwrap();
    let op = match store.get(&sid) {
        Err(StoreError::NotFound { .. }) => WriteOp::Create(Session::new(sid, 0, Timeout::Infinity, meta(key, 1))),
        Ok(s) if step % 3 == 0 => WriteOp::Put(Session::new(sid, 0, Timeout::Infinity, meta(key, s.version + 1))),
        Ok(s) => WriteOp::UpdateIfVersion(
            Session::new(sid, 0, Timeout::Infinity, meta(key, s.version + 1)),
            s.version,
        ),
        Err(e) => return Err(e),
    };
    let written = if step % 2 == 1 {
        let (tx, rx) = std::sync::mpsc::channel();
        match store.start(
            op,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        ) {
            Ok(()) => rx.recv().unwrap_or_else(|_| {
                Err(StoreError::Unavailable {
                    reason: "a started write was never answered".into(),
                })
            }),
            Err(Unstarted { op, .. }) => op.run(store),
        }
    } else {
        op.run(store)
    };
    written.map(|w| match w {
        Written::Session(s) => s,
        Written::Deleted(d) => panic!("{key}: a write answered Deleted({d})"),
    })
}

/// Every acknowledged key is present at its acknowledged version or later,
/// with that version's contents; every stored record decodes. `after` names
/// the failure for the message ("kill -9", "power loss").
pub fn check_acked(store: &impl Store, acked: &BTreeMap<String, u64>, meta: Meta, after: &str) {
    for (key, version) in acked {
        let s = store
            .get(&SessionId::new(key).unwrap())
            .unwrap_or_else(|e| panic!("{key}: acknowledged at v{version}, lost after {after}: {e}"));
        assert!(
            s.version >= *version,
            "{key}: acknowledged v{version}, found v{}",
            s.version
        );
        assert_eq!(s.metadata.as_ref(), meta(key, s.version).as_slice(), "{key}: contents");
    }
    let all = store.scan(None, usize::MAX, Visibility::Raw).unwrap();
    assert!(all.records.len() >= acked.len());
}
