//! The flags' audit trail: every change of the effective flags as one JSON
//! line, appended and synced (`fdatasync`) before the change is reported.
//!
//! Off by default; [`AuditLog::open`] and [`super::EngineBuilder::audit_log`]
//! (or [`super::Engine::set_audit_log`]) turn it on. The CLI's
//! `flags push --audit-log FILE` appends the push, and
//! `erlmcp-rollout flags history FILE` reads the file.
//!
//! # Format (one object per line, `format` = 1)
//!
//! ```json
//! {"format":1,"time":"2026-12-03T09:00:00.123Z","actor":"alice","source":"push:erlmcp/feature_flags@42",
//!  "changes":[{"flag":"mcp_tasks","change":"changed","fields":{"rollout_percentage":{"before":10,"after":25}}},
//!             {"flag":"mcp_new","change":"added","fields":{"enabled":{"before":null,"after":true}, ...}},
//!             {"flag":"mcp_old","change":"override","fields":{"override":{"before":null,"after":false}}}]}
//! ```
//!
//! - `time`: UTC, RFC 3339 with milliseconds, when the change was applied.
//! - `actor`: who: `--actor` of `flags push`, the Erlang caller of
//!   `enable/1`/`disable/1`/`clear/1` (`erlang:<node>:<pid>`), or the log's
//!   default actor for reloads.
//! - `source`: what: `file:<path>`, `etcd:<key>@<revision>`,
//!   `push:<key>@<revision>`, `json`, `reload`, `override`, `env`.
//! - `changes`: per flag, `added` (every configured field, `before` null),
//!   `removed` (`after` null), `changed` (only the fields that differ) or
//!   `override` (the runtime or `ERLMCP_FEATURE_FLAGS` override of `enabled`:
//!   `true`, `false` or null for none). Field values are as in the config file.
//!
//! A reload that leaves every flag as it was (same content, or only
//! formatting changed) writes nothing. Schedule stages taking effect as time
//! passes are not changes (the config states them in advance).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::config::FlagsConfig;

/// The format version written in every line.
pub const AUDIT_FORMAT: u32 = 1;

/// One audit line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// [`AUDIT_FORMAT`].
    pub format: u32,
    /// UTC, RFC 3339 with milliseconds.
    pub time: String,
    /// Who made the change.
    pub actor: String,
    /// Where the change came from (see the module doc).
    pub source: String,
    /// What changed, per flag, in name order.
    pub changes: Vec<FlagChange>,
}

impl AuditRecord {
    /// A record of `changes` made now by `actor` from `source`.
    pub fn now(actor: impl Into<String>, source: impl Into<String>, changes: Vec<FlagChange>) -> AuditRecord {
        use crate::clock::Clock as _;
        AuditRecord {
            format: AUDIT_FORMAT,
            time: format_ms(crate::clock::SystemClock.now_unix_ms()),
            actor: actor.into(),
            source: source.into(),
            changes,
        }
    }
}

/// What happened to one flag.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlagChange {
    /// The flag.
    pub flag: String,
    /// `added`, `removed`, `changed` or `override`.
    pub change: ChangeKind,
    /// Field name -> before and after (as in the config file; null = absent).
    pub fields: BTreeMap<String, FieldDiff>,
}

/// The kind of a [`FlagChange`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// The flag is new in the config.
    Added,
    /// The flag left the config.
    Removed,
    /// Some of its fields changed.
    Changed,
    /// Its override of `enabled` changed.
    Override,
}

/// One field's values before and after.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldDiff {
    /// Before (null = absent).
    pub before: serde_json::Value,
    /// After (null = absent).
    pub after: serde_json::Value,
}

/// Why the audit trail could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The file could not be opened, written, synced or read.
    #[error("audit log {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A line of the file is not an audit record.
    #[error("audit log {path}, line {line}: {message}")]
    BadLine {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// An append-only audit file. Each [`AuditLog::append`] writes one line with
/// one `write` call and syncs it before returning.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
    actor: String,
}

impl AuditLog {
    /// Open (create if absent) `path` for appending; `actor` is recorded for
    /// changes that do not name one (reloads, and overrides set from Rust).
    ///
    /// # Errors
    /// The file cannot be opened for appending.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::flags::{AuditLog, Engine, FlagsConfig};
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("flags-audit.jsonl");
    /// let engine = Engine::builder()
    ///     .audit_log(AuditLog::open(&path, "deployer").unwrap())
    ///     .build(FlagsConfig::from_json(br#"{"f": {}}"#).unwrap());
    /// engine.enable("f");
    /// let history = AuditLog::read(&path).unwrap();
    /// assert_eq!(history[0].changes[0].flag, "f");
    /// assert_eq!(history[0].source, "override");
    /// ```
    pub fn open(path: impl AsRef<Path>, actor: impl Into<String>) -> Result<AuditLog, AuditError> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| AuditError::Io {
                path: path.display().to_string(),
                source,
            })?;
        Ok(AuditLog {
            path,
            file: Mutex::new(file),
            actor: actor.into(),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The default actor.
    pub fn actor(&self) -> &str {
        &self.actor
    }

    /// Append `record` as one line and sync it to disk.
    ///
    /// # Errors
    /// Writing or syncing failed (the line may be partly written; readers
    /// report such a torn last line by its number).
    pub fn append(&self, record: &AuditRecord) -> Result<(), AuditError> {
        let io = |source| AuditError::Io {
            path: self.path.display().to_string(),
            source,
        };
        let mut line = serde_json::to_vec(record).map_err(|e| io(std::io::Error::other(e)))?;
        line.push(b'\n');
        let mut f = self.file.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f.write_all(&line).map_err(io)?;
        f.sync_data().map_err(io)
    }

    /// Record `changes` (nothing when empty) by `actor` (default: the log's).
    pub(crate) fn record(
        &self,
        time_ms: i64,
        actor: Option<&str>,
        source: &str,
        changes: Vec<FlagChange>,
    ) -> Result<(), AuditError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.append(&AuditRecord {
            format: AUDIT_FORMAT,
            time: format_ms(time_ms),
            actor: actor.unwrap_or(&self.actor).to_owned(),
            source: source.to_owned(),
            changes,
        })
    }

    /// Every record of the file at `path`, oldest first.
    ///
    /// # Errors
    /// The file cannot be read, or a line is not a record (named by number).
    pub fn read(path: impl AsRef<Path>) -> Result<Vec<AuditRecord>, AuditError> {
        let path = path.as_ref();
        let shown = || path.display().to_string();
        let f = File::open(path).map_err(|source| AuditError::Io { path: shown(), source })?;
        let mut out = Vec::new();
        for (i, line) in BufReader::new(f).lines().enumerate() {
            let line = line.map_err(|source| AuditError::Io { path: shown(), source })?;
            if line.trim().is_empty() {
                continue;
            }
            let r: AuditRecord = serde_json::from_str(&line).map_err(|e| AuditError::BadLine {
                path: shown(),
                line: i + 1,
                message: e.to_string(),
            })?;
            out.push(r);
        }
        Ok(out)
    }
}

/// RFC 3339 UTC with milliseconds.
pub(crate) fn format_ms(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    t.format(&fmt).unwrap_or_else(|_| ms.to_string())
}

fn fields_of(config: &FlagsConfig, name: &str) -> serde_json::Map<String, serde_json::Value> {
    match config.get(name).map(serde_json::to_value) {
        Some(Ok(serde_json::Value::Object(m))) => m,
        _ => serde_json::Map::new(),
    }
}

/// The per-flag difference between two configs (flags in name order).
///
/// # Examples
/// ```
/// use erlmcp_rollout::flags::{audit_diff, ChangeKind, FlagsConfig};
/// let old = FlagsConfig::from_json(br#"{"a": {"rollout_percentage": 10}, "b": {}}"#).unwrap();
/// let new = FlagsConfig::from_json(br#"{"a": {"rollout_percentage": 25}, "c": {}}"#).unwrap();
/// let d = audit_diff(&old, &new);
/// assert_eq!(d.iter().map(|c| (c.flag.as_str(), c.change)).collect::<Vec<_>>(),
///            [("a", ChangeKind::Changed), ("b", ChangeKind::Removed), ("c", ChangeKind::Added)]);
/// assert_eq!(d[0].fields["rollout_percentage"].after, 25);
/// ```
pub fn audit_diff(old: &FlagsConfig, new: &FlagsConfig) -> Vec<FlagChange> {
    let names: BTreeSet<&str> = old.iter().map(|(n, _)| n).chain(new.iter().map(|(n, _)| n)).collect();
    let mut out = Vec::new();
    for name in names {
        let (before, after) = (fields_of(old, name), fields_of(new, name));
        let change = match (old.get(name).is_some(), new.get(name).is_some()) {
            (false, true) => ChangeKind::Added,
            (true, false) => ChangeKind::Removed,
            _ => ChangeKind::Changed,
        };
        let keys: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
        let fields: BTreeMap<String, FieldDiff> = keys
            .into_iter()
            .filter_map(|k| {
                let b = before.get(k).cloned().unwrap_or(serde_json::Value::Null);
                let a = after.get(k).cloned().unwrap_or(serde_json::Value::Null);
                (b != a).then(|| (k.clone(), FieldDiff { before: b, after: a }))
            })
            .collect();
        if !fields.is_empty() {
            out.push(FlagChange {
                flag: name.to_owned(),
                change,
                fields,
            });
        }
    }
    out
}

/// An override change of `flag` (`None` = no override).
pub(crate) fn override_change(flag: &str, before: Option<bool>, after: Option<bool>) -> Option<FlagChange> {
    (before != after).then(|| FlagChange {
        flag: flag.to_owned(),
        change: ChangeKind::Override,
        fields: BTreeMap::from([(
            "override".to_owned(),
            FieldDiff {
                before: before.map_or(serde_json::Value::Null, serde_json::Value::Bool),
                after: after.map_or(serde_json::Value::Null, serde_json::Value::Bool),
            },
        )]),
    })
}
