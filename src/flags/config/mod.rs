//! The flag config file (DESIGN §3.1): a typed model that is valid by
//! construction, and the strict loader that builds it from JSON, reporting
//! every problem at once with the flag name, the JSON path and the position.
//!
//! One idea per file: [`model`] (the typed flags, valid by construction),
//! [`error`] (what a failed load reports), `validate` (the strict JSON to
//! model pass, and the week-plan reader). Time text is read and written by
//! [`parse_time`] and [`format_time`].

use std::collections::BTreeMap;

use serde::Serialize;

pub mod error;
pub mod model;
mod validate;

pub use crate::time_text::{format_time, parse_time};
pub use error::{ConfigError, Problem};
pub use model::*;
pub(crate) use validate::parse_week_plan;

use crate::json;
use validate::Validator;

/// Longest flag name: Erlang atoms hold at most 255 characters.
pub const MAX_FLAG_NAME_CHARS: usize = 255;

/// A whole config file: flag name -> flag, in name order.
///
/// # Examples
/// ```
/// use erlmcp_rollout::flags::FlagsConfig;
/// let config = FlagsConfig::from_json(br#"{"mcp_tasks": {"enabled": true, "rollout_percentage": 10}}"#)?;
/// assert_eq!(config.get("mcp_tasks").map(|f| f.rollout_percentage.get()), Some(10));
/// # Ok::<(), erlmcp_rollout::flags::ConfigError>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct FlagsConfig {
    flags: BTreeMap<String, FlagSpec>,
}

impl FlagsConfig {
    /// Parse and validate a config. On failure, every problem is reported.
    ///
    /// # Errors
    /// [`ConfigError::Syntax`] for malformed JSON (with line and column),
    /// [`ConfigError::Invalid`] listing every problem otherwise.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::flags::{ConfigError, FlagsConfig};
    /// let err = FlagsConfig::from_json(br#"{"a": {"rollout_percentage": 150, "colour": "red"}}"#).unwrap_err();
    /// let ConfigError::Invalid(problems) = err else { panic!() };
    /// assert_eq!(problems.len(), 2);
    /// assert_eq!(problems[0].path, "$.a.rollout_percentage");
    /// ```
    pub fn from_json(input: &[u8]) -> Result<FlagsConfig, ConfigError> {
        let root = json::parse(input)?;
        let mut v = Validator::default();
        let config = v.config(&root);
        if v.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(v.problems))
        }
    }

    /// Read and validate a config file.
    ///
    /// # Errors
    /// As [`FlagsConfig::from_json`], plus [`ConfigError::Io`].
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<FlagsConfig, ConfigError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        FlagsConfig::from_json(&bytes)
    }

    /// Build from flags made in code.
    pub fn from_flags(flags: impl IntoIterator<Item = (String, FlagSpec)>) -> FlagsConfig {
        FlagsConfig {
            flags: flags.into_iter().collect(),
        }
    }

    /// The flag named `name`.
    pub fn get(&self, name: &str) -> Option<&FlagSpec> {
        self.flags.get(name)
    }

    /// Add or replace flag `name` (not validated against the other flags:
    /// re-read [`FlagsConfig::to_json_pretty`] for that).
    pub(crate) fn insert(&mut self, name: String, spec: FlagSpec) {
        self.flags.insert(name, spec);
    }

    /// Mutable access, e.g. to attach a schedule.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut FlagSpec> {
        self.flags.get_mut(name)
    }

    /// Flags in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &FlagSpec)> {
        self.flags.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of flags.
    pub fn len(&self) -> usize {
        self.flags.len()
    }

    /// `true` when there are no flags.
    pub fn is_empty(&self) -> bool {
        self.flags.is_empty()
    }

    /// Pretty JSON that [`FlagsConfig::from_json`] reads back unchanged.
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(json: &str) -> Vec<Problem> {
        match FlagsConfig::from_json(json.as_bytes()) {
            Err(ConfigError::Invalid(p)) => p,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_design() {
        let c = FlagsConfig::from_json(br#"{"f": {}}"#).unwrap();
        let f = c.get("f").unwrap();
        assert!(!f.enabled);
        assert_eq!(f.rollout_percentage.get(), 100);
        assert_eq!(f.environments, None);
        assert_eq!(f.stickiness, "session_id");
        assert!(f.conditions.is_empty() && f.salt.is_none() && f.schedule.is_none());
    }

    #[test]
    fn reports_every_problem_with_flag_path_and_position() {
        let p = problems(
            r#"{
  "a": {"enabled": "yes", "rollout_percentage": 101},
  "b": {"conditions": [{"attribute": "x", "op": "regex", "values": ["."]}, {"tier": "gold"}],
        "schedule": [{"at": "2026-02-10T00:00:00Z"}, {"at": "2026-02-09"}]},
  "a": {}
}"#,
        );
        let summary: Vec<(Option<&str>, &str, u32)> = p
            .iter()
            .map(|p| (p.flag.as_deref(), p.path.as_str(), p.line.unwrap()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (Some("a"), "$.a", 5),
                (Some("a"), "$.a.enabled", 2),
                (Some("a"), "$.a.rollout_percentage", 2),
                (Some("b"), "$.b.conditions[0].op", 3),
                (Some("b"), "$.b.conditions[1].tier", 3),
                (Some("b"), "$.b.schedule[1].at", 4),
            ]
        );
        assert!(p[3].message.contains("semver_gte"), "{}", p[3].message);
    }

    #[test]
    fn the_reference_config_is_valid() {
        let text = include_str!("../../../tests/fixtures/flags/reference_config.json");
        let c = FlagsConfig::from_json(text.as_bytes()).unwrap();
        assert_eq!(c.len(), 5);
        assert_eq!(c.get("mcp_tasks").unwrap().phase(), Some(2));
    }

    #[test]
    fn serialization_round_trips() {
        let text = r#"{"f": {"enabled": true, "rollout_percentage": 5, "environments": ["dev"],
            "conditions": [{"user_id": "u"}, {"custom": "beta"}, {"attribute": "v", "op": "semver_gte", "values": ["1.2.3"]},
                           {"attribute": "n", "op": "in", "values": ["a", 7]}, {"attribute": "t", "op": "lt", "values": [2.5]}],
            "metadata": {"phase": 2, "x": [1, {"y": null}]}, "stickiness": "user_id", "salt": "s1",
            "schedule": [{"at": "2026-02-09T00:00:00Z", "rollout_percentage": 10}, {"at": "2026-02-16", "environments": []}]}}"#;
        let c = FlagsConfig::from_json(text.as_bytes()).unwrap();
        let again = FlagsConfig::from_json(c.to_json_pretty().as_bytes()).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn wrong_shapes_name_what_was_expected() {
        let p = problems(
            r#"{"f": {"conditions": [{"attribute": "v", "op": "lt", "values": [1, 2]}, {"attribute": "v", "op": "semver_lt", "values": ["x"]}, {"op": "in"}], "metadata": {"phase": 5}, "environments": ["a", "a", 3]}}"#,
        );
        let msgs: Vec<&str> = p.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(p.len(), 6, "{msgs:#?}");
        assert!(msgs[0].contains("exactly one value"));
        assert!(msgs[1].contains("not a semantic version"));
        assert!(msgs[2].contains("missing attribute, values"));
        assert!(msgs[3].contains("phase"));
        assert!(msgs[4].contains("listed twice"));
        assert!(msgs[5].contains("expected a string, got a number"));
        assert_eq!(
            problems("[]")[0].message,
            "expected an object mapping flag names to flags, got an array"
        );
    }
}
