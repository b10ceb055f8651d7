//! Runtime overrides of `enabled` (DESIGN §3.5): `enable/1`, `disable/1` and
//! the `ERLMCP_FEATURE_FLAGS` environment variable.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// The environment variable read at start.
pub const ENV_VAR: &str = "ERLMCP_FEATURE_FLAGS";

/// Where an override came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OverrideSource {
    /// `enable/1` / `disable/1` at runtime.
    Runtime,
    /// A `name:enabled|disabled` entry of `ERLMCP_FEATURE_FLAGS`.
    EnvFlag,
    /// `all_enabled` / `all_disabled` in `ERLMCP_FEATURE_FLAGS`.
    EnvAll,
}

impl fmt::Display for OverrideSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OverrideSource::Runtime => "runtime override",
            OverrideSource::EnvFlag => "ERLMCP_FEATURE_FLAGS entry",
            OverrideSource::EnvAll => "ERLMCP_FEATURE_FLAGS all_enabled/all_disabled",
        })
    }
}

/// An override in force for one flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Override {
    /// The value that replaces `enabled`.
    pub enabled: bool,
    /// Where it came from.
    pub source: OverrideSource,
}

/// The parsed `ERLMCP_FEATURE_FLAGS` value.
///
/// Syntax: `all_enabled`, `all_disabled`, or a comma-separated list of
/// `name:enabled` / `name:disabled` entries, where `name` matches a flag
/// exactly or as `mcp_<name>`. `all_enabled` / `all_disabled` may also appear
/// in the list; named entries win over them. Whitespace around entries is
/// ignored; an empty value means no overrides.
///
/// # Examples
/// ```
/// use erlmcp_rollout::flags::EnvOverrides;
/// let env = EnvOverrides::parse("all_disabled, sampling:enabled")?;
/// assert_eq!(env.lookup("mcp_sampling").map(|o| o.enabled), Some(true));
/// assert_eq!(env.lookup("mcp_tasks").map(|o| o.enabled), Some(false));
/// assert!(EnvOverrides::parse("sampling:on").is_err());
/// # Ok::<(), erlmcp_rollout::flags::EnvOverrideError>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvOverrides {
    all: Option<bool>,
    flags: BTreeMap<String, bool>,
}

/// A bad `ERLMCP_FEATURE_FLAGS` value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{ENV_VAR}: entry {index} {entry:?}: {message}")]
pub struct EnvOverrideError {
    /// 1-based position of the entry in the comma-separated list.
    pub index: usize,
    /// The entry's text.
    pub entry: String,
    /// What is wrong.
    pub message: String,
}

impl EnvOverrides {
    /// Parse a value of `ERLMCP_FEATURE_FLAGS`.
    ///
    /// # Errors
    /// The first malformed entry, with its position.
    pub fn parse(text: &str) -> Result<EnvOverrides, EnvOverrideError> {
        let mut out = EnvOverrides::default();
        if text.trim().is_empty() {
            return Ok(out);
        }
        for (i, raw) in text.split(',').enumerate() {
            let entry = raw.trim();
            let err = |message: &str| EnvOverrideError {
                index: i + 1,
                entry: entry.to_owned(),
                message: message.to_owned(),
            };
            match entry {
                "" => return Err(err("empty entry (stray comma?)")),
                "all_enabled" => out.all = Some(true),
                "all_disabled" => out.all = Some(false),
                _ => {
                    let Some((name, state)) = entry.rsplit_once(':') else {
                        return Err(err("expected name:enabled, name:disabled, all_enabled or all_disabled"));
                    };
                    let name = name.trim();
                    let value = match state.trim() {
                        "enabled" => true,
                        "disabled" => false,
                        _ => return Err(err("the state after ':' must be enabled or disabled")),
                    };
                    if name.is_empty() {
                        return Err(err("the flag name before ':' is empty"));
                    }
                    if out.flags.insert(name.to_owned(), value).is_some() {
                        return Err(err("this flag is named twice"));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Read and parse the environment variable; unset means no overrides.
    ///
    /// # Errors
    /// As [`EnvOverrides::parse`]; a value that is not Unicode is an error too.
    pub fn from_env() -> Result<EnvOverrides, EnvOverrideError> {
        match std::env::var(ENV_VAR) {
            Ok(v) => EnvOverrides::parse(&v),
            Err(std::env::VarError::NotPresent) => Ok(EnvOverrides::default()),
            Err(std::env::VarError::NotUnicode(_)) => Err(EnvOverrideError {
                index: 0,
                entry: String::new(),
                message: "the value is not valid Unicode".into(),
            }),
        }
    }

    /// `true` when there is nothing to override.
    pub fn is_empty(&self) -> bool {
        self.all.is_none() && self.flags.is_empty()
    }

    /// The override this value sets for `flag`: an exact entry, else an
    /// entry for the name without its `mcp_` prefix, else `all_*`.
    pub fn lookup(&self, flag: &str) -> Option<Override> {
        let named = self
            .flags
            .get(flag)
            .or_else(|| flag.strip_prefix("mcp_").and_then(|short| self.flags.get(short)));
        match (named, self.all) {
            (Some(&enabled), _) => Some(Override {
                enabled,
                source: OverrideSource::EnvFlag,
            }),
            (None, Some(enabled)) => Some(Override {
                enabled,
                source: OverrideSource::EnvAll,
            }),
            (None, None) => None,
        }
    }

    /// Named entries that match no flag in `names` (likely typos).
    pub fn unmatched<'a>(&'a self, names: &[&str]) -> Vec<&'a str> {
        self.flags
            .keys()
            .filter(|k| {
                !names
                    .iter()
                    .any(|n| n == k || n.strip_prefix("mcp_") == Some(k.as_str()))
            })
            .map(String::as_str)
            .collect()
    }
}

/// Every override layer: runtime overrides win over the environment.
#[derive(Clone, Debug, Default)]
pub(crate) struct Overrides {
    pub runtime: BTreeMap<String, bool>,
    pub env: EnvOverrides,
}

impl Overrides {
    pub(crate) fn lookup(&self, flag: &str) -> Option<Override> {
        match self.runtime.get(flag) {
            Some(&enabled) => Some(Override {
                enabled,
                source: OverrideSource::Runtime,
            }),
            None => self.env.lookup(flag),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_names_win_over_the_mcp_prefix_and_all() {
        let e = EnvOverrides::parse("all_enabled,mcp_tasks:disabled,tasks:enabled").unwrap();
        assert_eq!(
            e.lookup("mcp_tasks"),
            Some(Override {
                enabled: false,
                source: OverrideSource::EnvFlag
            })
        );
        assert_eq!(
            e.lookup("tasks"),
            Some(Override {
                enabled: true,
                source: OverrideSource::EnvFlag
            })
        );
        assert_eq!(
            e.lookup("other"),
            Some(Override {
                enabled: true,
                source: OverrideSource::EnvAll
            })
        );
        assert_eq!(e.unmatched(&["mcp_tasks"]), Vec::<&str>::new());
        assert_eq!(e.unmatched(&["x"]), vec!["mcp_tasks", "tasks"]);
    }

    #[test]
    fn errors_name_the_entry() {
        let e = EnvOverrides::parse("a:enabled,,b").unwrap_err();
        assert_eq!((e.index, e.entry.as_str()), (2, ""));
        let e = EnvOverrides::parse("a:enabled, b:maybe").unwrap_err();
        assert_eq!(
            e.to_string(),
            "ERLMCP_FEATURE_FLAGS: entry 2 \"b:maybe\": the state after ':' must be enabled or disabled"
        );
        assert!(EnvOverrides::parse("a:enabled,a:disabled").is_err());
        assert!(EnvOverrides::parse("   ").unwrap().is_empty());
    }

    #[test]
    fn runtime_wins_over_env() {
        let mut o = Overrides {
            env: EnvOverrides::parse("all_disabled").unwrap(),
            ..Default::default()
        };
        o.runtime.insert("f".into(), true);
        assert_eq!(o.lookup("f").map(|x| x.source), Some(OverrideSource::Runtime));
        assert_eq!(o.lookup("g").map(|x| x.enabled), Some(false));
    }
}
