//! Verify: do two stores hold the same records? Counts and content digests per key
//! range, Merkle-style, then the differing keys; [`repair`] re-copies them.
//!
//! **Digest.** A record's digest is SipHash-1-3 (128 bit, fixed keys) over its
//! [`codec`] encoding, which holds every field: id, version,
//! tombstone flag, both times, timeout and metadata. Two records digest equal exactly
//! when they encode equal (up to hash collisions, 2^-128 per pair).
//!
//! **Tree.** The key space is cut into ranges by the source's keys: each run of
//! `leaf` consecutive source keys (in key order) is one range `(previous end, last key]`,
//! and the last range is open-ended so it also covers target keys beyond the source's
//! last. A range's digest hashes its records' digests in key order; the root hashes the
//! ranges' digests. Pass 1 streams both stores once (paged raw scans, `O(leaf)` memory)
//! and compares each range's count and digest; pass 2 descends only into the ranges that
//! differ, re-reads them from both stores and lists each differing key. The `Store`
//! trait has no server-side digest, so pass 1 reads every record of both stores once;
//! what the tree saves is the per-key work and memory, and the report stays small.
//!
//! Verification is a snapshot of moving stores: a key written during the run can show
//! up as a difference. The dual-write gate ([`super::dual`]) re-checks such keys after
//! draining the outbox.
//!
//! # Examples
//! ```
//! use erlmcp_rollout::migrate::verify::{verify, DiffKind, VerifyConfig};
//! use erlmcp_rollout::session::{MemoryStore, Session, SessionId, Store, StoreOptions, Timeout};
//!
//! let a = MemoryStore::new(StoreOptions::default());
//! let b = MemoryStore::new(StoreOptions::default());
//! for s in [&a, &b] {
//!     s.put(Session::new(SessionId::new("same")?, 0, Timeout::Infinity, vec![]))?;
//! }
//! a.put(Session::new(SessionId::new("only-a")?, 0, Timeout::Infinity, vec![]))?;
//! let report = verify(&a, &b, &VerifyConfig::default())?;
//! assert!(!report.is_clean());
//! assert_eq!(report.differences[0].kind, DiffKind::MissingOnTarget);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::VecDeque;
use std::hash::Hasher;

use serde::Serialize;
use siphasher::sip128::{Hasher128, SipHasher13};

use super::{MigrateError, Role};
use crate::session::{codec, Session, SessionId, Store, StoreError, Visibility};

/// How [`verify`] runs.
#[derive(Clone, Debug)]
pub struct VerifyConfig {
    /// Source keys per range (the tree's leaves).
    pub leaf: usize,
    /// At most this many differences are listed (all are counted).
    pub max_listed: usize,
}

impl Default for VerifyConfig {
    /// Ranges of 1024 keys; up to 10 000 differences listed.
    fn default() -> Self {
        VerifyConfig {
            leaf: 1024,
            max_listed: 10_000,
        }
    }
}

/// How a key differs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum DiffKind {
    /// The source has a record, the target none.
    MissingOnTarget,
    /// The target has a record, the source none.
    MissingOnSource,
    /// Both have the key at different versions.
    Version {
        /// The source's version.
        source: u64,
        /// The target's version.
        target: u64,
    },
    /// Same version, different content (a version reused with other data).
    Content {
        /// The version both hold.
        version: u64,
    },
}

/// One differing key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// The key.
    #[serde(serialize_with = "ser_id")]
    pub key: SessionId,
    /// How it differs.
    #[serde(flatten)]
    pub kind: DiffKind,
}

fn ser_id<S: serde::Serializer>(id: &SessionId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&codec::to_hex(id.as_bytes()))
}

/// What [`verify`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Records in the source.
    pub source_records: u64,
    /// Records in the target.
    pub target_records: u64,
    /// Key ranges compared (leaves).
    pub ranges: u64,
    /// Ranges whose count or digest differed (descended into).
    pub differing_ranges: u64,
    /// Hex of the source's root digest.
    pub source_root: String,
    /// Hex of the target's root digest.
    pub target_root: String,
    /// Differing keys found (all counted, at most `max_listed` listed).
    pub difference_count: u64,
    /// The differing keys, in key order.
    pub differences: Vec<Difference>,
}

impl VerifyReport {
    /// No difference at all: same records, same content.
    pub fn is_clean(&self) -> bool {
        self.difference_count == 0 && self.source_root == self.target_root
    }
}

/// The digest of one record ([module docs](self)).
///
/// # Errors
/// [`StoreError::Invalid`] for a record the codec rejects (oversized metadata).
pub fn record_digest(s: &Session) -> Result<u128, StoreError> {
    let bytes = codec::encode(s)?;
    let mut h = SipHasher13::new_with_keys(0x6572_6c6d_6370_2d72, 0x6f6c_6c6f_7574_2d76);
    h.write(&bytes);
    Ok(h.finish128().as_u128())
}

/// A running digest over a sequence of 128-bit digests.
struct Digest {
    h: SipHasher13,
    n: u64,
}

impl Digest {
    fn new() -> Self {
        Digest {
            h: SipHasher13::new_with_keys(0x7261_6e67_652d_6469, 0x6765_7374_2d76_3100),
            n: 0,
        }
    }

    fn add(&mut self, d: u128) {
        self.h.write(&d.to_be_bytes());
        self.n += 1;
    }

    fn finish(&self) -> u128 {
        let mut h = self.h;
        h.write_u64(self.n);
        h.finish128().as_u128()
    }
}

/// A paged raw scan of a store as an iterator over records, with one record of look-ahead.
struct Cursor<'a> {
    store: &'a dyn Store,
    role: Role,
    page: usize,
    buf: VecDeque<Session>,
    next: Option<SessionId>,
    exhausted: bool,
}

impl<'a> Cursor<'a> {
    fn new(store: &'a dyn Store, role: Role, page: usize, after: Option<SessionId>) -> Self {
        Cursor {
            store,
            role,
            page,
            buf: VecDeque::new(),
            next: after,
            exhausted: false,
        }
    }

    fn fill(&mut self) -> Result<(), MigrateError> {
        while self.buf.is_empty() && !self.exhausted {
            let p =
                super::backfill::with_retries(3, || self.store.scan(self.next.as_ref(), self.page, Visibility::Raw))
                    .map_err(MigrateError::store(self.role))?;
            self.buf.extend(p.records);
            match p.next {
                Some(n) => self.next = Some(n),
                None => self.exhausted = true,
            }
        }
        Ok(())
    }

    fn peek(&mut self) -> Result<Option<&Session>, MigrateError> {
        self.fill()?;
        Ok(self.buf.front())
    }

    fn pop(&mut self) -> Result<Option<Session>, MigrateError> {
        self.fill()?;
        Ok(self.buf.pop_front())
    }

    /// Takes every record with key <= `hi` (all remaining when `hi` is `None`).
    fn take_through(&mut self, hi: Option<&SessionId>, mut f: impl FnMut(Session)) -> Result<(), MigrateError> {
        loop {
            match self.peek()? {
                Some(s) if hi.is_none_or(|h| &s.id <= h) => {}
                _ => return Ok(()),
            }
            if let Some(s) = self.pop()? {
                f(s);
            }
        }
    }
}

/// One leaf: the keys `(lo, hi]` (`hi = None`: unbounded).
struct Range {
    lo: Option<SessionId>,
    hi: Option<SessionId>,
}

fn digest_of(s: &Session, role: Role) -> Result<u128, MigrateError> {
    record_digest(s).map_err(MigrateError::store(role))
}

/// Compares `source` and `target` (see the [module docs](self)).
///
/// # Errors
/// [`MigrateError::Invalid`] for `leaf == 0`; [`MigrateError::Store`] naming the store
/// whose scan failed (after 3 retries of a retryable error).
pub fn verify(source: &dyn Store, target: &dyn Store, config: &VerifyConfig) -> Result<VerifyReport, MigrateError> {
    if config.leaf == 0 {
        return Err(MigrateError::Invalid("verify leaf size must be at least 1".into()));
    }
    let mut report = VerifyReport::default();
    let mut src = Cursor::new(source, Role::Source, config.leaf, None);
    let mut tgt = Cursor::new(target, Role::Target, config.leaf, None);
    let (mut src_root, mut tgt_root) = (Digest::new(), Digest::new());
    let mut differing = Vec::new();
    let mut lo: Option<SessionId> = None;
    loop {
        // The next leaf: up to `leaf` source records.
        let mut sd = Digest::new();
        let mut last = None;
        for _ in 0..config.leaf {
            match src.pop()? {
                Some(s) => {
                    sd.add(digest_of(&s, Role::Source)?);
                    last = Some(s.id);
                }
                None => break,
            }
        }
        let final_leaf = src.peek()?.is_none();
        let hi = if final_leaf { None } else { last };
        let mut td = Digest::new();
        let mut bad = None;
        tgt.take_through(hi.as_ref(), |s| match record_digest(&s) {
            Ok(d) => td.add(d),
            Err(e) => bad = Some(e),
        })?;
        if let Some(e) = bad {
            return Err(MigrateError::Store {
                role: Role::Target,
                source: e,
            });
        }
        report.ranges += 1;
        report.source_records += sd.n;
        report.target_records += td.n;
        let (s_fin, t_fin) = (sd.finish(), td.finish());
        src_root.add(s_fin);
        tgt_root.add(t_fin);
        if s_fin != t_fin {
            differing.push(Range {
                lo: lo.clone(),
                hi: hi.clone(),
            });
        }
        match hi {
            Some(h) => lo = Some(h),
            None => break,
        }
    }
    report.source_root = format!("{:032x}", src_root.finish());
    report.target_root = format!("{:032x}", tgt_root.finish());
    report.differing_ranges = differing.len() as u64;
    for range in differing {
        diff_range(source, target, &range, config, &mut report)?;
    }
    Ok(report)
}

/// Pass 2: the per-key comparison of one range.
fn diff_range(
    source: &dyn Store,
    target: &dyn Store,
    range: &Range,
    config: &VerifyConfig,
    report: &mut VerifyReport,
) -> Result<(), MigrateError> {
    let mut src = Cursor::new(source, Role::Source, config.leaf, range.lo.clone());
    let mut tgt = Cursor::new(target, Role::Target, config.leaf, range.lo.clone());
    let in_range = |s: &Session| range.hi.as_ref().is_none_or(|h| &s.id <= h);
    loop {
        let s = src.peek()?.filter(|s| in_range(s)).cloned();
        let t = tgt.peek()?.filter(|t| in_range(t)).cloned();
        let found = match (s, t) {
            (None, None) => return Ok(()),
            (Some(s), None) => {
                src.pop()?;
                Some((s.id, DiffKind::MissingOnTarget))
            }
            (None, Some(t)) => {
                tgt.pop()?;
                Some((t.id, DiffKind::MissingOnSource))
            }
            (Some(s), Some(t)) => match s.id.cmp(&t.id) {
                std::cmp::Ordering::Less => {
                    src.pop()?;
                    Some((s.id, DiffKind::MissingOnTarget))
                }
                std::cmp::Ordering::Greater => {
                    tgt.pop()?;
                    Some((t.id, DiffKind::MissingOnSource))
                }
                std::cmp::Ordering::Equal => {
                    src.pop()?;
                    tgt.pop()?;
                    compare(&s, &t).map(|k| (s.id, k))
                }
            },
        };
        if let Some((key, kind)) = found {
            report.difference_count += 1;
            if report.differences.len() < config.max_listed {
                report.differences.push(Difference { key, kind });
            }
        }
    }
}

/// How two records of one key differ, if they do.
pub fn compare(s: &Session, t: &Session) -> Option<DiffKind> {
    if s.version != t.version {
        Some(DiffKind::Version {
            source: s.version,
            target: t.version,
        })
    } else if s != t {
        Some(DiffKind::Content { version: s.version })
    } else {
        None
    }
}

/// How [`repair`] treats keys only the target has (the source holds no record at all,
/// not even a tombstone).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TargetOnly {
    /// Leave them and report them as unresolved (the default: nothing is lost).
    #[default]
    Report,
    /// Delete them on the target (a tombstone there).
    Delete,
}

/// What [`repair`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RepairReport {
    /// Records re-copied from the source (write-if-newer).
    pub copied: u64,
    /// Target-only keys deleted on the target ([`TargetOnly::Delete`]).
    pub deleted: u64,
    /// Keys left as they are: the target holds a newer version than the source, or the
    /// key exists only on the target and [`TargetOnly::Report`] applies.
    pub unresolved: Vec<Difference>,
}

/// Repairs the listed differences: each key is read again from both stores
/// ([`Store::get_raw`], so a key that changed since the verify is judged by its current
/// records) and the source's record is written to the target if newer
/// ([`Store::apply_batch_if_newer`]: tombstones included, so a key deleted on the source
/// is deleted on the target). Keys whose source record is gone follow `target_only`; a
/// target holding a newer version than the source, or the same version with other
/// content, is reported, never overwritten.
///
/// # Errors
/// [`MigrateError::Store`] naming the store that failed.
pub fn repair(
    source: &dyn Store,
    target: &dyn Store,
    differences: &[Difference],
    target_only: TargetOnly,
) -> Result<RepairReport, MigrateError> {
    let mut out = RepairReport::default();
    for d in differences {
        let s = source.get_raw(&d.key).map_err(MigrateError::store(Role::Source))?;
        let t = target.get_raw(&d.key).map_err(MigrateError::store(Role::Target))?;
        match (s, t) {
            (Some(s), t) => {
                if let Some(t) = &t {
                    if t == &s {
                        continue;
                    }
                    if t.version >= s.version {
                        // Newer on the target, or the same version with other content:
                        // write-if-newer cannot (and must not) settle it.
                        if let Some(kind) = compare(&s, t) {
                            out.unresolved.push(Difference {
                                key: d.key.clone(),
                                kind,
                            });
                        }
                        continue;
                    }
                }
                let r = target
                    .apply_batch_if_newer(vec![s])
                    .map_err(MigrateError::store(Role::Target))?;
                out.copied += r.applied as u64;
            }
            (None, Some(t)) => match target_only {
                TargetOnly::Delete if !t.tombstone => {
                    target.delete(&d.key).map_err(MigrateError::store(Role::Target))?;
                    out.deleted += 1;
                }
                TargetOnly::Delete => {}
                TargetOnly::Report => out.unresolved.push(Difference {
                    key: d.key.clone(),
                    kind: DiffKind::MissingOnSource,
                }),
            },
            (None, None) => {}
        }
    }
    Ok(out)
}
