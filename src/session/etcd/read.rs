//! Linearizable reads: one key, or the keys after a start key in key order.

use std::time::Instant;

use etcd_client::GetOptions;

use super::super::{codec, Session, SessionId, StoreError, Visibility};
use super::cache::Stored;
use super::Inner;

/// Records fetched per range request of a scan or sweep.
pub(super) const SCAN_CHUNK: usize = 256;

impl Inner {
    pub(super) fn decode(&self, id: &SessionId, kv: &etcd_client::KeyValue) -> Result<Stored, StoreError> {
        let session = codec::decode_keyed(id, kv.value())?;
        Ok(Stored {
            session: Some(session),
            raw: Some(kv.value().into()),
            mod_rev: kv.mod_revision(),
            guessed: false,
        })
    }

    /// Reads a key (linearizable).
    pub(super) async fn read(&self, id: &SessionId, deadline: Instant) -> Result<Stored, StoreError> {
        let key = self.key(id);
        let resp = self
            .retrying(&format!("reading key {}", self.key_text(id)), deadline, |mut kv, _| {
                let key = key.clone();
                async move { kv.get(key, None).await }
            })
            .await?;
        let stored = match resp.kvs().first() {
            Some(kv) => self.decode(id, kv)?,
            None => Stored::absent(false),
        };
        self.remember(id, &stored);
        Ok(stored)
    }

    /// Up to `limit` records after `after`, in key order, each with its `mod_revision`.
    pub(super) async fn scan(
        &self,
        after: Option<SessionId>,
        limit: usize,
        visibility: Visibility,
        now: i64,
        deadline: Instant,
    ) -> Result<Scanned, StoreError> {
        let mut start = match &after {
            Some(a) => {
                let mut k = self.key(a);
                k.push(0);
                k
            }
            None => self.prefix.clone(),
        };
        let mut records = Vec::new();
        // A call visits at most this many keys, live or not, so that a prefix full of
        // expired records or tombstones (before a sweep removes them) costs a bounded time
        // per page; a short page then continues after the last key visited.
        let budget = crate::session::visit_budget(limit);
        let mut visited = 0usize;
        loop {
            let chunk = (limit.saturating_add(1) - records.len()).clamp(1, SCAN_CHUNK);
            let resp = self
                .retrying(
                    &format!("reading keys under {}", self.prefix_text()),
                    deadline,
                    |mut kv, _| {
                        let opts = GetOptions::new()
                            .with_range(self.range_end.clone())
                            .with_limit(i64::try_from(chunk).unwrap_or(i64::MAX));
                        let start = start.clone();
                        async move { kv.get(start, Some(opts)).await }
                    },
                )
                .await?;
            let mut last = None;
            for kv in resp.kvs() {
                let raw_id = kv.key().get(self.prefix.len()..).unwrap_or_default();
                let id = SessionId::new(raw_id).map_err(|e| StoreError::Corrupt {
                    key: None,
                    reason: format!("etcd key {:?}: {e}", String::from_utf8_lossy(kv.key())),
                })?;
                visited += 1;
                let stored = self.decode(&id, kv)?;
                if let Some(s) = stored.session.clone() {
                    if visibility == Visibility::Raw || s.is_live(now) {
                        records.push((s, stored));
                        if records.len() > limit {
                            return Ok(Scanned {
                                records,
                                more: true,
                                last_visited: None,
                            });
                        }
                    }
                }
                last = Some(id);
            }
            match resp.kvs().last() {
                Some(_) if resp.more() && visited >= budget => {
                    return Ok(Scanned {
                        records,
                        more: true,
                        last_visited: last,
                    });
                }
                Some(kv) if resp.more() => {
                    start = kv.key().to_vec();
                    start.push(0);
                }
                _ => {
                    return Ok(Scanned {
                        records,
                        more: false,
                        last_visited: last,
                    })
                }
            }
        }
    }
}

/// One call of [`Inner::scan`](super::Inner).
pub(super) struct Scanned {
    /// Up to `limit + 1` records in key order.
    pub(super) records: Vec<(Session, Stored)>,
    /// Keys follow (after the last record, or after `last_visited`).
    pub(super) more: bool,
    /// The last key visited, when it is not the last record's (set when the visit
    /// budget ended the call or keys after the last record were skipped).
    pub(super) last_visited: Option<SessionId>,
}
