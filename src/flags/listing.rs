//! `flags list`: each flag's effective state per environment.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::Serialize;

use super::config::FlagsConfig;
use super::engine::{Engine, DEFAULT_ENVIRONMENT};
use crate::clock::Clock;

/// One flag's state in each environment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlagStateRow {
    /// The flag.
    pub flag: String,
    /// Environment -> `on`, `off (disabled)`, `off (environment)`, `25%`,
    /// `on + 2 conditions`, `25% + 1 condition`.
    pub environments: BTreeMap<String, String>,
}

/// Every environment the config names (in `environments` or a schedule
/// stage), sorted; `dev` if it names none.
pub fn environments_named(config: &FlagsConfig) -> Vec<String> {
    let mut set = BTreeSet::new();
    for (_, f) in config.iter() {
        set.extend(f.environments.iter().flatten().cloned());
        for st in f.schedule.iter().flat_map(|s| s.stages()) {
            set.extend(st.environments.iter().flatten().cloned());
        }
    }
    if set.is_empty() {
        set.insert(DEFAULT_ENVIRONMENT.to_owned());
    }
    set.into_iter().collect()
}

/// The state of every flag of `config` in each of `environments` at the
/// clock's time (schedules applied; runtime overrides are not part of a file).
///
/// # Examples
/// ```
/// use std::sync::Arc;
/// use erlmcp_rollout::flags::{state_table, FlagsConfig, SystemClock};
/// let c = FlagsConfig::from_json(br#"{"f": {"enabled": true, "rollout_percentage": 25, "environments": ["dev"]}}"#)?;
/// let rows = state_table(&c, &["dev".into(), "production".into()], Arc::new(SystemClock));
/// assert_eq!(rows[0].environments["dev"], "25%");
/// assert_eq!(rows[0].environments["production"], "off (environment)");
/// # Ok::<(), erlmcp_rollout::flags::ConfigError>(())
/// ```
pub fn state_table(config: &FlagsConfig, environments: &[String], clock: Arc<dyn Clock>) -> Vec<FlagStateRow> {
    let mut rows: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for env in environments {
        let engine = Engine::builder()
            .environment(env.clone())
            .clock(clock.clone())
            .build(config.clone());
        for d in engine.all_details() {
            let conditions = d.config.conditions.len();
            let state = if !d.effective_enabled {
                "off (disabled)".to_owned()
            } else if !d.environment_allowed {
                "off (environment)".to_owned()
            } else {
                let base = match d.rollout_basis_points {
                    Some(10_000) => "on".to_owned(),
                    Some(bp) => format!("{}.{:02}%", bp / 100, bp % 100),
                    None if d.rollout_percentage == 100 => "on".to_owned(),
                    None => format!("{}%", d.rollout_percentage),
                };
                match conditions {
                    0 => base,
                    1 => format!("{base} + 1 condition"),
                    n => format!("{base} + {n} conditions"),
                }
            };
            rows.entry(d.name).or_default().insert(env.clone(), state);
        }
    }
    rows.into_iter()
        .map(|(flag, environments)| FlagStateRow { flag, environments })
        .collect()
}
