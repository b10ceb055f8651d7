//! erlmcp's own `erlmcp_feature_flags` interface over this engine.
//!
//! erlmcp ships a flags module of its own with a file format
//! (`{"flags": [{"name", "category", "state", "value", "rollout_percentage",
//! "rollout_strategy", "conditions", "description", "updated_at"}]}`) and
//! functions (`get_flag/1,2`, `list_flags/0,1`, `get_rollout_percentage/1`,
//! `evaluate_rollout/2`, `export_flags/0`, ...) whose callers must keep
//! working when our module replaces it. [`FlagsConfig::from_json`] reads that
//! format (detected by its `"flags"` list); this module gives each flag — of
//! either format — the shape erlmcp's functions return ([`ErlmcpFlag`]) and
//! writes erlmcp's export format ([`export_json`]).
//!
//! # How an erlmcp flag evaluates
//!
//! Its evident intent, not its code (which returns a boolean `value` before
//! looking at `state` and never reaches the percentage):
//!
//! | `state` | `rollout_strategy` | on for |
//! |---|---|---|
//! | `enabled` (default) | any | everyone |
//! | `disabled` | any | nobody |
//! | `rollout` | `all` (default) | everyone |
//! | `rollout` | `none` | nobody |
//! | `rollout` | `percentage`, `canary`, `user_segment` | `erlang:phash2(Id) rem 100 < rollout_percentage` |
//!
//! and a `value` of `false` turns the flag off for everyone (erlmcp's
//! `set_flag(Name, false)`). `Id` is the stickiness value (`session_id` in an
//! `is_enabled/2` context, the identifier of `evaluate_rollout/2`); the
//! bucket is erlmcp's hash contract ([`Bucketing::Erlmcp`]), so switching
//! modules moves no session between cohorts.

use serde::Serialize;

#[cfg(doc)]
use super::config::Bucketing;
use super::config::{FlagSpec, FlagsConfig};

/// Where a flag keeps erlmcp's fields: `metadata.erlmcp`.
pub const METADATA_KEY: &str = "erlmcp";

/// The version string erlmcp's `export_flags/0` writes.
pub const EXPORT_VERSION: &str = "3.0.0";

/// erlmcp's `flag_state()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErlmcpState {
    /// On (subject to `value`).
    Enabled,
    /// Off.
    Disabled,
    /// On as `rollout_strategy` says.
    Rollout,
}

impl ErlmcpState {
    /// The name in files and atoms.
    pub fn name(self) -> &'static str {
        match self {
            ErlmcpState::Enabled => "enabled",
            ErlmcpState::Disabled => "disabled",
            ErlmcpState::Rollout => "rollout",
        }
    }

    /// The state named `name`.
    pub fn from_name(name: &str) -> Option<ErlmcpState> {
        [ErlmcpState::Enabled, ErlmcpState::Disabled, ErlmcpState::Rollout]
            .into_iter()
            .find(|s| s.name() == name)
    }

    /// Whether the flag is on for anyone (before `value`).
    pub fn is_on(self, strategy: Strategy) -> bool {
        match self {
            ErlmcpState::Enabled => true,
            ErlmcpState::Disabled => false,
            ErlmcpState::Rollout => strategy != Strategy::None,
        }
    }

    /// Whether the percentage decides (a partial rollout).
    pub fn is_partial(self, strategy: Strategy) -> bool {
        self == ErlmcpState::Rollout
            && matches!(
                strategy,
                Strategy::Percentage | Strategy::Canary | Strategy::UserSegment
            )
    }
}

/// erlmcp's `rollout_strategy()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Everyone.
    All,
    /// Nobody.
    None,
    /// By bucket (erlmcp: the same formula as `Percentage`).
    Canary,
    /// By bucket.
    Percentage,
    /// By bucket (erlmcp does not read `conditions` for it either).
    UserSegment,
}

impl Strategy {
    /// The name in files and atoms.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::All => "all",
            Strategy::None => "none",
            Strategy::Canary => "canary",
            Strategy::Percentage => "percentage",
            Strategy::UserSegment => "user_segment",
        }
    }

    /// The strategy named `name`.
    pub fn from_name(name: &str) -> Option<Strategy> {
        [
            Strategy::All,
            Strategy::None,
            Strategy::Canary,
            Strategy::Percentage,
            Strategy::UserSegment,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }
}

/// One flag as erlmcp's functions return it (its `feature_flag()` map).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ErlmcpFlag {
    /// The flag's name.
    pub name: String,
    /// `None`: erlmcp's default, the atom `custom`.
    pub category: Option<String>,
    /// The state.
    pub state: ErlmcpState,
    /// What `get_flag/1` returns (default `true`).
    pub value: serde_json::Value,
    /// 0..=100 (default 100).
    pub rollout_percentage: u8,
    /// The strategy (default `all`).
    pub rollout_strategy: Strategy,
    /// Kept as written; erlmcp's module does not evaluate them.
    pub conditions: serde_json::Map<String, serde_json::Value>,
    /// Default empty.
    pub description: String,
    /// Milliseconds since the epoch, when the file or `set_flag` said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<i64>,
}

impl ErlmcpFlag {
    /// The erlmcp view of flag `name`: the fields kept from an erlmcp file
    /// (with erlmcp's defaults), or, for a flag in our format, its
    /// equivalent (`value` = `enabled`, `state` = `rollout` below 100 %).
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::flags::{ErlmcpFlag, ErlmcpState, FlagsConfig};
    /// let config = FlagsConfig::from_json(br#"{"flags": [
    ///     {"name": "new_ui", "state": "rollout", "rollout_strategy": "percentage", "rollout_percentage": 25}]}"#)?;
    /// let flag = ErlmcpFlag::of("new_ui", config.get("new_ui").unwrap());
    /// assert_eq!((flag.state, flag.rollout_percentage, flag.value), (ErlmcpState::Rollout, 25, true.into()));
    /// # Ok::<(), erlmcp_rollout::flags::ConfigError>(())
    /// ```
    pub fn of(name: &str, spec: &FlagSpec) -> ErlmcpFlag {
        let text = |m: &serde_json::Map<String, serde_json::Value>, k: &str| {
            m.get(k).and_then(serde_json::Value::as_str).map(str::to_owned)
        };
        if let Some(serde_json::Value::Object(kept)) = spec.metadata.get(METADATA_KEY) {
            return ErlmcpFlag {
                name: name.to_owned(),
                category: text(kept, "category"),
                state: text(kept, "state")
                    .and_then(|s| ErlmcpState::from_name(&s))
                    .unwrap_or(ErlmcpState::Enabled),
                value: kept.get("value").cloned().unwrap_or(serde_json::Value::Bool(true)),
                rollout_percentage: kept
                    .get("rollout_percentage")
                    .and_then(serde_json::Value::as_u64)
                    .and_then(|p| u8::try_from(p).ok())
                    .filter(|p| *p <= 100)
                    .unwrap_or(100),
                rollout_strategy: text(kept, "rollout_strategy")
                    .and_then(|s| Strategy::from_name(&s))
                    .unwrap_or(Strategy::All),
                conditions: match kept.get("conditions") {
                    Some(serde_json::Value::Object(c)) => c.clone(),
                    _ => serde_json::Map::new(),
                },
                description: text(kept, "description").unwrap_or_default(),
                updated_at: kept.get("updated_at").and_then(serde_json::Value::as_i64),
            };
        }
        let percentage = match spec.rollout_basis_points {
            Some(bp) => u8::try_from(bp.get() / 100).unwrap_or(100),
            None => spec.rollout_percentage.get(),
        };
        let partial = spec.rollout_basis_points.is_some_and(|bp| bp.get() < 10_000) || percentage < 100;
        ErlmcpFlag {
            name: name.to_owned(),
            category: text(&spec.metadata, "category"),
            state: match (spec.enabled, partial) {
                (false, _) => ErlmcpState::Disabled,
                (true, true) => ErlmcpState::Rollout,
                (true, false) => ErlmcpState::Enabled,
            },
            value: serde_json::Value::Bool(spec.enabled),
            rollout_percentage: percentage,
            rollout_strategy: if partial { Strategy::Percentage } else { Strategy::All },
            conditions: serde_json::Map::new(),
            description: text(&spec.metadata, "description").unwrap_or_default(),
            updated_at: None,
        }
    }

    /// The flag as an element of erlmcp's `"flags"` list.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("name".into(), self.name.clone().into());
        m.insert("category".into(), self.category.as_deref().unwrap_or("custom").into());
        m.insert("state".into(), self.state.name().into());
        m.insert("value".into(), self.value.clone());
        m.insert("rollout_percentage".into(), self.rollout_percentage.into());
        m.insert("rollout_strategy".into(), self.rollout_strategy.name().into());
        m.insert("conditions".into(), serde_json::Value::Object(self.conditions.clone()));
        m.insert("description".into(), self.description.clone().into());
        if let Some(t) = self.updated_at {
            m.insert("updated_at".into(), t.into());
        }
        serde_json::Value::Object(m)
    }
}

/// Every flag of `config` in erlmcp's view, in name order.
pub fn erlmcp_flags(config: &FlagsConfig) -> Vec<ErlmcpFlag> {
    config.iter().map(|(n, spec)| ErlmcpFlag::of(n, spec)).collect()
}

/// erlmcp's export format (`export_flags/0`): `{"version": "3.0.0",
/// "environment", "last_updated", "flags": [...]}`, which both erlmcp's
/// module and [`FlagsConfig::from_json`] read back. A flag in our format is
/// exported as its erlmcp equivalent (its conditions, environments and
/// schedule have no erlmcp spelling and are left out).
///
/// # Examples
/// ```
/// use erlmcp_rollout::flags::{export_json, FlagsConfig};
/// let config = FlagsConfig::from_json(br#"{"flags": [{"name": "a", "state": "disabled"}]}"#)?;
/// let text = export_json(&config, "production", 1_700_000_000_000);
/// let back = FlagsConfig::from_json(text.as_bytes())?;
/// assert_eq!(back.get("a").map(|f| f.enabled), Some(false));
/// # Ok::<(), erlmcp_rollout::flags::ConfigError>(())
/// ```
pub fn export_json(config: &FlagsConfig, environment: &str, now_ms: i64) -> String {
    let flags: Vec<serde_json::Value> = erlmcp_flags(config).iter().map(ErlmcpFlag::to_json).collect();
    serde_json::json!({
        "version": EXPORT_VERSION,
        "environment": environment,
        "last_updated": now_ms,
        "flags": flags,
    })
    .to_string()
}
