//! Where the flag config lives and how a new `rollout_percentage` is published
//! (DESIGN §6.6): a file (validated, atomic replace) or an etcd key (the same
//! validated push as `flags push`, guarded on the key's revision).
//!
//! Every publish is guarded: it names the [`Guard`] of the config it was
//! computed from (the etcd `mod_revision`, or a hash of the file's bytes) and
//! fails with [`PublishError::Conflict`] when the config changed since, so a
//! concurrent human edit is never overwritten.
//!
//! The new config is the old one with one number changed in place
//! ([`set_percentage`]): the rest of the bytes, including the operator's
//! formatting and key order, stay as they were.

use std::hash::Hasher;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::flags::{FlagSpec, FlagsConfig};
use crate::json::{self, Kind, Node, Pos};

/// The version of the config a publish is based on: an etcd `mod_revision`, or
/// a 64-bit SipHash of a file's bytes.
pub type Guard = u64;

/// Why a publish or read failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The config changed since it was read: a concurrent edit. Nothing was written.
    #[error("the flag config changed concurrently ({0}); nothing was written")]
    Conflict(String),
    /// The config is unusable: invalid, or without the flag.
    #[error("{0}")]
    Invalid(String),
    /// The file or etcd could not be reached (for etcd: the write may have happened).
    #[error("{0}")]
    Unavailable(String),
}

/// The flag config as read: bytes and their guard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Current {
    /// The config JSON.
    pub bytes: Vec<u8>,
    /// Its version.
    pub guard: Guard,
}

/// A flag config location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlagTarget {
    /// A JSON file, replaced atomically (temporary file, fsync, rename, fsync of the directory).
    File(PathBuf),
    /// An etcd key (feature `etcd`).
    #[cfg(feature = "etcd")]
    Etcd {
        /// Endpoints (`host:port`, the scheme following `security`, or URLs).
        endpoints: Vec<String>,
        /// The key.
        key: String,
        /// Time limit of one read or publish.
        timeout: Duration,
        /// TLS and the etcd user ([`crate::etcd`]); the user needs read and write
        /// permission on `key` and on `KEY/rollout-lock/`.
        security: crate::etcd::EtcdSecurity,
    },
}

impl std::fmt::Display for FlagTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FlagTarget::File(p) => write!(f, "{}", p.display()),
            #[cfg(feature = "etcd")]
            FlagTarget::Etcd { endpoints, key, .. } => write!(f, "etcd:{}/{key}", spec_endpoints(endpoints)),
        }
    }
}

/// Split `etcd:HOST:PORT[,HOST:PORT...][/REST]` into `HOST:PORT` endpoints (the
/// scheme follows the connection's TLS settings: `http://` without, `https://` with)
/// and the rest (parsed as a store URI: the same syntax and errors as `sessions`).
/// `Ok(None)` when `spec` does not start with `etcd:`.
///
/// # Errors
/// The URI problem and its column.
///
/// # Examples
/// ```
/// use erlmcp_rollout::deploy::rollout::target::split_etcd_spec;
/// let (eps, rest) = split_etcd_spec("etcd:127.0.0.1:2379,127.0.0.1:22379/erlmcp/flags")?.unwrap();
/// assert_eq!((eps[0].as_str(), rest.as_deref()), ("127.0.0.1:2379", Some("erlmcp/flags")));
/// assert!(split_etcd_spec("flags.json")?.is_none());
/// assert!(split_etcd_spec("etcd:host").is_err());
/// # Ok::<(), erlmcp_rollout::session::uri::UriError>(())
/// ```
#[allow(clippy::type_complexity)]
pub fn split_etcd_spec(spec: &str) -> Result<Option<(Vec<String>, Option<String>)>, crate::session::uri::UriError> {
    if !spec.starts_with("etcd:") {
        return Ok(None);
    }
    match crate::session::uri::StoreUri::parse(spec)? {
        crate::session::uri::StoreUri::Etcd { endpoints, prefix } => {
            Ok(Some((endpoints.iter().map(ToString::to_string).collect(), prefix)))
        }
        _ => Ok(None),
    }
}

/// Endpoints as an `etcd:` spec lists them (`host:port`, also from URLs), so a
/// target's or state store's `Display` parses back.
pub(crate) fn spec_endpoints(endpoints: &[String]) -> String {
    let hosts: Vec<&str> = endpoints
        .iter()
        .map(|e| e.trim_start_matches("http://").trim_start_matches("https://"))
        .collect();
    hosts.join(",")
}

fn hash(bytes: &[u8]) -> Guard {
    let mut h = siphasher::sip::SipHasher13::new_with_keys(0x0000_6572_6c6d_6370, 0x0072_6f6c_6c6f_7574);
    h.write(bytes);
    h.finish()
}

impl FlagTarget {
    /// `etcd:HOST:PORT[,..]/KEY` or a file path.
    ///
    /// # Errors
    /// [`PublishError::Invalid`] for an etcd spec without endpoints or key.
    pub fn parse(spec: &str, timeout: Duration) -> Result<FlagTarget, PublishError> {
        let split = split_etcd_spec(spec).map_err(|e| PublishError::Invalid(e.to_string()))?;
        match split {
            None => {
                let _ = timeout;
                Ok(FlagTarget::File(PathBuf::from(spec)))
            }
            #[cfg(feature = "etcd")]
            Some((endpoints, key)) => {
                let Some(key) = key else {
                    return Err(PublishError::Invalid(format!(
                        "{spec:?}: expected etcd:HOST:PORT[,HOST:PORT...]/KEY (no key given)"
                    )));
                };
                Ok(FlagTarget::Etcd {
                    endpoints,
                    key,
                    timeout,
                    security: crate::etcd::EtcdSecurity::default(),
                })
            }
            #[cfg(not(feature = "etcd"))]
            Some(_) => Err(PublishError::Invalid(format!("{spec:?}: built without etcd support"))),
        }
    }

    /// The same target reached with TLS and/or an etcd user (a file target is unchanged).
    #[must_use]
    pub fn with_etcd_security(self, security: crate::etcd::EtcdSecurity) -> FlagTarget {
        match self {
            #[cfg(feature = "etcd")]
            FlagTarget::Etcd {
                endpoints,
                key,
                timeout,
                ..
            } => FlagTarget::Etcd {
                endpoints,
                key,
                timeout,
                security,
            },
            other => {
                let _ = security;
                other
            }
        }
    }

    /// Read the config and its guard.
    ///
    /// # Errors
    /// [`PublishError::Unavailable`]; [`PublishError::Invalid`] when an etcd key is absent.
    pub fn read(&self) -> Result<Current, PublishError> {
        match self {
            FlagTarget::File(path) => {
                let bytes = std::fs::read(path)
                    .map_err(|e| PublishError::Unavailable(format!("cannot read {}: {e}", path.display())))?;
                Ok(Current {
                    guard: hash(&bytes),
                    bytes,
                })
            }
            #[cfg(feature = "etcd")]
            FlagTarget::Etcd {
                endpoints,
                key,
                timeout,
                security,
            } => match crate::flags::read_flags(endpoints, key, *timeout, security) {
                Ok(Some((bytes, revision))) => Ok(Current {
                    bytes,
                    guard: revision as u64,
                }),
                Ok(None) => Err(PublishError::Invalid(format!(
                    "etcd key {key:?} is absent; publish the flag config first (flags push)"
                ))),
                // A bad endpoint or a refusal of the TLS settings, credentials or
                // permission does not heal by waiting: an error, not an outage.
                Err(e @ (crate::flags::PushError::Endpoint { .. } | crate::flags::PushError::Access(_))) => {
                    Err(PublishError::Invalid(e.to_string()))
                }
                Err(e) => Err(PublishError::Unavailable(e.to_string())),
            },
        }
    }

    /// Publish `bytes` (validated as a flag config first) if the config is
    /// still at `expected`; returns the new guard.
    ///
    /// # Errors
    /// [`PublishError::Conflict`] (nothing written), [`PublishError::Invalid`],
    /// [`PublishError::Unavailable`].
    pub fn publish(&self, expected: Guard, bytes: &[u8]) -> Result<Guard, PublishError> {
        FlagsConfig::from_json(bytes).map_err(|e| {
            let problems: Vec<String> = e.problems().iter().map(ToString::to_string).collect();
            PublishError::Invalid(format!("the new config is invalid: {}", problems.join("; ")))
        })?;
        match self {
            FlagTarget::File(path) => {
                let now = self.read()?;
                if now.guard != expected {
                    return Err(PublishError::Conflict(format!("{} was edited", path.display())));
                }
                write_atomically(path, bytes)
                    .map_err(|e| PublishError::Unavailable(format!("cannot write {}: {e}", path.display())))?;
                Ok(hash(bytes))
            }
            #[cfg(feature = "etcd")]
            FlagTarget::Etcd {
                endpoints,
                key,
                timeout,
                security,
            } => match crate::flags::push_flags_guarded(endpoints, key, bytes, expected as i64, *timeout, security) {
                Ok(out) => Ok(out.revision as u64),
                Err(e @ crate::flags::PushError::Conflict { .. }) => Err(PublishError::Conflict(e.to_string())),
                Err(e @ crate::flags::PushError::Unavailable { .. }) => Err(PublishError::Unavailable(e.to_string())),
                Err(e) => Err(PublishError::Invalid(e.to_string())),
            },
        }
    }
}

/// Write `bytes` to `path` atomically and durably: a temporary file in the same
/// directory, fsync, rename over `path`, fsync of the directory.
///
/// # Errors
/// The I/O error; `path` is then unchanged.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Validate a config and run `f` on flag `flag`'s spec.
fn with_flag<T>(bytes: &[u8], flag: &str, f: impl FnOnce(&FlagSpec) -> T) -> Result<T, PublishError> {
    let config = FlagsConfig::from_json(bytes).map_err(|e| {
        let problems: Vec<String> = e.problems().iter().map(ToString::to_string).collect();
        PublishError::Invalid(format!("the flag config is invalid: {}", problems.join("; ")))
    })?;
    let spec = config
        .get(flag)
        .ok_or_else(|| PublishError::Invalid(format!("the flag config has no flag {flag:?}")))?;
    Ok(f(spec))
}

/// The flag's `enabled` and `rollout_percentage` in a config.
///
/// # Errors
/// [`PublishError::Invalid`] when the config is invalid or has no such flag.
pub fn flag_state(bytes: &[u8], flag: &str) -> Result<(bool, u8), PublishError> {
    with_flag(bytes, flag, |spec| (spec.enabled, spec.rollout_percentage.get()))
}

/// The flag's whole spec as JSON (after validation), to tell whether a
/// concurrent edit touched this flag or only others.
///
/// # Errors
/// [`PublishError::Invalid`] when the config is invalid or has no such flag.
pub fn flag_spec(bytes: &[u8], flag: &str) -> Result<serde_json::Value, PublishError> {
    with_flag(bytes, flag, |spec| serde_json::to_value(spec))?.map_err(|e| PublishError::Invalid(e.to_string()))
}

/// The config `bytes` with flag `flag`'s `rollout_percentage` set to `percent`,
/// every other byte unchanged (the member is added first in the flag's object
/// when absent). The result is validated.
///
/// # Errors
/// [`PublishError::Invalid`] when the config is invalid or has no such flag.
///
/// # Examples
/// ```
/// use erlmcp_rollout::deploy::rollout::target::set_percentage;
/// let before = br#"{"a": {"enabled": true, "rollout_percentage": 5},
///  "b": {}}"#;
/// let after = set_percentage(before, "a", 25)?;
/// assert_eq!(after, br#"{"a": {"enabled": true, "rollout_percentage": 25},
///  "b": {}}"#);
/// assert_eq!(set_percentage(&after, "b", 0)?, br#"{"a": {"enabled": true, "rollout_percentage": 25},
///  "b": {"rollout_percentage": 0}}"#);
/// # Ok::<(), erlmcp_rollout::deploy::rollout::target::PublishError>(())
/// ```
pub fn set_percentage(bytes: &[u8], flag: &str, percent: u8) -> Result<Vec<u8>, PublishError> {
    flag_state(bytes, flag)?;
    let invalid = |m: &str| PublishError::Invalid(format!("flag {flag:?}: {m}"));
    let root = json::parse(bytes).map_err(|e| invalid(&e.to_string()))?;
    let flag_node: &Node = root
        .kind_members()
        .and_then(|ms| ms.iter().find(|m| m.key == flag))
        .map(|m| &m.value)
        .ok_or_else(|| invalid("not found"))?;
    let Kind::Object(members) = &flag_node.kind else {
        return Err(invalid("not an object"));
    };
    let mut out = Vec::with_capacity(bytes.len() + 32);
    match members.iter().find(|m| m.key == "rollout_percentage") {
        Some(m) => {
            let Kind::Number(text) = &m.value.kind else {
                return Err(invalid("rollout_percentage is not a number"));
            };
            let at = offset(bytes, m.value.pos).ok_or_else(|| invalid("position out of range"))?;
            out.extend_from_slice(&bytes[..at]);
            out.extend_from_slice(percent.to_string().as_bytes());
            out.extend_from_slice(&bytes[at + text.len()..]);
        }
        None => {
            let at = offset(bytes, flag_node.pos).ok_or_else(|| invalid("position out of range"))? + 1;
            out.extend_from_slice(&bytes[..at]);
            let sep = if members.is_empty() { "" } else { ", " };
            out.extend_from_slice(format!("\"rollout_percentage\": {percent}{sep}").as_bytes());
            out.extend_from_slice(&bytes[at..]);
        }
    }
    match flag_state(&out, flag)? {
        (_, p) if p == percent => Ok(out),
        _ => Err(invalid("internal: the edit did not take")),
    }
}

/// The byte offset of a parser position (1-based line, column in characters).
fn offset(bytes: &[u8], pos: Pos) -> Option<usize> {
    let start = if bytes.starts_with(b"\xEF\xBB\xBF") { 3 } else { 0 };
    let text = std::str::from_utf8(&bytes[start..]).ok()?;
    let mut line = 1u32;
    let mut line_start = 0usize;
    if pos.line > 1 {
        for (i, b) in text.bytes().enumerate() {
            if b == b'\n' {
                line += 1;
                if line == pos.line {
                    line_start = i + 1;
                    break;
                }
            }
        }
        if line != pos.line {
            return None;
        }
    }
    let col = text[line_start..].char_indices().nth(pos.column as usize - 1)?.0;
    Some(start + line_start + col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_keep_every_other_byte() {
        let before = "\u{feff}{\n  \"é\": {\"enabled\": true},\n  \"f\": {\n    \"rollout_percentage\": 100,\n    \"enabled\": true\n  }\n}\n";
        let after = set_percentage(before.as_bytes(), "f", 7).unwrap();
        assert_eq!(String::from_utf8(after).unwrap(), before.replace("100", "7"));
        let e = set_percentage(before.as_bytes(), "é", 50).unwrap();
        assert!(String::from_utf8(e)
            .unwrap()
            .contains("\"é\": {\"rollout_percentage\": 50, \"enabled\": true}"));
        assert!(set_percentage(before.as_bytes(), "nope", 5).is_err());
        assert!(set_percentage(b"{\"f\": {\"enabled\": 1}}", "f", 5).is_err());
    }

    #[test]
    fn specs_parse_back() {
        let spec = "etcd:127.0.0.1:2379,h-2:22379/erlmcp/feature_flags";
        let t = FlagTarget::parse(spec, Duration::from_secs(1)).unwrap();
        assert_eq!(t.to_string(), spec);
        assert_eq!(FlagTarget::parse(&t.to_string(), Duration::from_secs(1)).unwrap(), t);
        assert!(FlagTarget::parse("etcd:127.0.0.1:2379", Duration::from_secs(1)).is_err());
        let s = crate::deploy::rollout::StateStore::parse("etcd:h:1/rollouts", Duration::from_secs(1)).unwrap();
        assert_eq!(s.to_string(), "etcd:h:1/rollouts");
    }

    #[test]
    fn file_publish_is_guarded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flags.json");
        std::fs::write(&path, br#"{"f": {"enabled": true, "rollout_percentage": 0}}"#).unwrap();
        let t = FlagTarget::File(path.clone());
        let cur = t.read().unwrap();
        let next = set_percentage(&cur.bytes, "f", 5).unwrap();
        let g = t.publish(cur.guard, &next).unwrap();
        assert_eq!(flag_state(&std::fs::read(&path).unwrap(), "f").unwrap(), (true, 5));
        // A stale guard: a concurrent edit is never overwritten.
        assert!(matches!(t.publish(cur.guard, &next), Err(PublishError::Conflict(_))));
        assert!(matches!(t.publish(g, b"{\"f\": 1}"), Err(PublishError::Invalid(_))));
    }
}
