//! The versioned writers of the disk reliability loops (kill -9, power loss):
//! each write stores the next version of a key with contents derived from
//! (key, version), so a check can tell whether an acknowledged write survived
//! intact.

use std::collections::BTreeMap;

use erlmcp_rollout::session::{Session, SessionId, Store, StoreError, Timeout, Visibility};

/// Contents of `key` at `version`.
pub type Meta = fn(&str, u64) -> Vec<u8>;

/// Write the next version of `key`, exercising every write path: create when
/// absent, otherwise an unconditional put on every third `step` and a
/// version-guarded update on the others.
pub fn write_next(store: &impl Store, key: &str, step: usize, meta: Meta) -> Result<Session, StoreError> {
    let sid = SessionId::new(key).unwrap();
    match store.get(&sid) {
        Err(StoreError::NotFound { .. }) => store.create(Session::new(sid, 0, Timeout::Infinity, meta(key, 1))),
        Ok(s) if step % 3 == 0 => store.put(Session::new(sid, 0, Timeout::Infinity, meta(key, s.version + 1))),
        Ok(s) => store.update_if_version(
            Session::new(sid, 0, Timeout::Infinity, meta(key, s.version + 1)),
            s.version,
        ),
        Err(e) => Err(e),
    }
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
