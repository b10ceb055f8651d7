//! The audit log (DESIGN §6.6): one JSON object per line, appended and synced
//! (`fdatasync`) before the controller goes on, for every publish, verdict,
//! pause, approval, abort and rollback.
//!
//! Every line has `time` (RFC 3339), `unix` (seconds), `event`, `actor`,
//! `flag` and `run_id`; a publish has `from`, `to`, `seq` and the config's
//! new `guard`; a judgement has `verdict`, the rule lines (`rules`) and the
//! metric values behind it (`values`, `tests`).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::RolloutError;

/// An append-only, synced JSON-lines file.
#[derive(Clone, Debug)]
pub struct AuditLog {
    path: PathBuf,
}

/// Unix seconds as RFC 3339 UTC with milliseconds.
pub fn rfc3339(unix: f64) -> String {
    let nanos = (unix * 1e9) as i128;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            ))
            .ok()
        })
        .unwrap_or_else(|| format!("{unix}"))
}

impl AuditLog {
    /// The log at `path` (created on the first append).
    pub fn new(path: impl Into<PathBuf>) -> AuditLog {
        AuditLog { path: path.into() }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one line: `common` fields (actor, flag, run_id), then `event`,
    /// then `fields`; synced before returning. Returns the line.
    ///
    /// # Errors
    /// [`RolloutError::Audit`]: the controller stops rather than act unrecorded.
    pub fn append(
        &self,
        at: f64,
        event: &str,
        common: &Map<String, Value>,
        fields: Value,
    ) -> Result<Value, RolloutError> {
        let mut line = Map::new();
        line.insert("time".into(), json!(rfc3339(at)));
        line.insert("unix".into(), json!((at * 1000.0).round() / 1000.0));
        line.insert("event".into(), json!(event));
        for (k, v) in common {
            line.insert(k.clone(), v.clone());
        }
        if let Value::Object(f) = fields {
            for (k, v) in f {
                line.insert(k, v);
            }
        }
        let line = Value::Object(line);
        let mut text = serde_json::to_vec(&line).map_err(|e| RolloutError::Audit(e.to_string()))?;
        text.push(b'\n');
        let err = |e: std::io::Error| RolloutError::Audit(format!("cannot append to {}: {e}", self.path.display()));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(err)?;
        f.write_all(&text).map_err(err)?;
        f.sync_data().map_err(err)?;
        Ok(line)
    }

    /// Every line (unparseable ones, e.g. a line torn by a crash, are skipped).
    ///
    /// # Errors
    /// [`RolloutError::Audit`] when the file exists but cannot be read.
    pub fn read(&self) -> Result<Vec<Value>, RolloutError> {
        let f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(RolloutError::Audit(format!("cannot read {}: {e}", self.path.display()))),
        };
        Ok(std::io::BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect())
    }

    /// The last `n` lines.
    ///
    /// # Errors
    /// As [`AuditLog::read`].
    pub fn tail(&self, n: usize) -> Result<Vec<Value>, RolloutError> {
        let all = self.read()?;
        Ok(all[all.len().saturating_sub(n)..].to_vec())
    }

    /// Whether the publish with sequence number `seq` of run `run_id` is logged.
    ///
    /// # Errors
    /// As [`AuditLog::read`].
    pub fn has_publish(&self, run_id: &str, seq: u64) -> Result<bool, RolloutError> {
        Ok(self
            .read()?
            .iter()
            .any(|l| l["event"] == "publish" && l["run_id"] == run_id && l["seq"].as_u64() == Some(seq)))
    }
}

/// One audit line for people: `TIME EVENT details`.
pub fn render_line(l: &Value) -> String {
    let s = |k: &str| l[k].as_str().unwrap_or("").to_owned();
    let mut out = format!("{} {:<10}", s("time"), s("event"));
    match l["event"].as_str().unwrap_or("") {
        "publish" => out.push_str(&format!(
            " {} % -> {} % ({}){}",
            l["from"],
            l["to"],
            s("reason"),
            if l["dry_run"] == true { " [dry run]" } else { "" }
        )),
        "judgement" => out.push_str(&format!(
            " stage {} at {} %: {} - {}",
            l["stage"],
            l["percent"],
            s("verdict"),
            s("summary")
        )),
        _ => {
            for k in ["reason", "note", "summary", "message"] {
                if let Some(v) = l[k].as_str() {
                    if !v.is_empty() {
                        out.push_str(&format!(" {v}"));
                        break;
                    }
                }
            }
        }
    }
    if let Some(a) = l["actor"].as_str() {
        out.push_str(&format!(" [{a}]"));
    }
    out
}
