//! Week plans (reference §II.A.3) made executable: `week_N` stages plus a
//! start date become a [`Schedule`] per flag, and a printable timeline.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use time::{Duration, OffsetDateTime};

use super::config::{format_time, parse_week_plan, ConfigError, FlagsConfig, Problem, Schedule, Stage};

/// A week plan turned into schedules.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    /// When week 1 starts.
    #[serde(serialize_with = "ser_time")]
    pub start: OffsetDateTime,
    /// Flag -> its schedule.
    pub schedules: BTreeMap<String, Schedule>,
}

fn ser_time<S: serde::Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(*t))
}

/// One row of a timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TimelineRow {
    /// When the stage starts (RFC 3339).
    pub at: String,
    /// Week number (1-based) relative to the plan's start.
    pub week: i64,
    /// The flag.
    pub flag: String,
    /// `enabled` from then on (`None`: unchanged).
    pub enabled: Option<bool>,
    /// Percentage from then on (`None`: unchanged).
    pub rollout_percentage: Option<u8>,
    /// Basis points from then on (`None`: unchanged or a percentage).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout_basis_points: Option<u16>,
    /// Environments from then on (`None`: unchanged).
    pub environments: Option<Vec<String>>,
}

impl Plan {
    /// Parse a week plan and anchor week 1 at `start`: week N begins
    /// `(N - 1) * 7` days later. Weeks sort numerically (`week_10` after
    /// `week_2`).
    ///
    /// # Errors
    /// Every problem in the plan, with flag, path and position.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::flags::{parse_time, plan::Plan};
    /// let plan = Plan::from_json(
    ///     br#"{"mcp_sampling": {"week_10": {"rollout_percentage": 100}, "week_2": {"enabled": true, "rollout_percentage": 25}}}"#,
    ///     parse_time("2026-02-09").unwrap(),
    /// )?;
    /// let rows = plan.timeline();
    /// assert_eq!((rows[0].week, rows[0].at.as_str()), (2, "2026-02-16T00:00:00Z"));
    /// assert_eq!((rows[1].week, rows[1].at.as_str()), (10, "2026-04-13T00:00:00Z"));
    /// # Ok::<(), erlmcp_rollout::flags::ConfigError>(())
    /// ```
    pub fn from_json(input: &[u8], start: OffsetDateTime) -> Result<Plan, ConfigError> {
        let weeks = parse_week_plan(input)?;
        let mut schedules = BTreeMap::new();
        for (flag, stages) in weeks {
            let stages: Vec<Stage> = stages
                .into_iter()
                .map(|w| Stage {
                    at: start + Duration::weeks(i64::from(w.week) - 1),
                    ..w.stage
                })
                .collect();
            if let Ok(s) = Schedule::new(stages) {
                schedules.insert(flag, s);
            }
        }
        Ok(Plan { start, schedules })
    }

    /// Every stage of every flag, by time then flag name.
    pub fn timeline(&self) -> Vec<TimelineRow> {
        let mut rows: Vec<(OffsetDateTime, TimelineRow)> = self
            .schedules
            .iter()
            .flat_map(|(flag, s)| {
                s.stages().iter().map(move |st| {
                    let week = (st.at - self.start).whole_weeks() + 1;
                    (
                        st.at,
                        TimelineRow {
                            at: format_time(st.at),
                            week,
                            flag: flag.clone(),
                            enabled: st.enabled,
                            rollout_percentage: st.rollout_percentage.map(|p| p.get()),
                            rollout_basis_points: st.rollout_basis_points.map(|b| b.get()),
                            environments: st.environments.clone(),
                        },
                    )
                })
            })
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.flag.cmp(&b.1.flag)));
        rows.into_iter().map(|(_, r)| r).collect()
    }

    /// Attach the schedules to the flags of `config`.
    ///
    /// # Errors
    /// A problem per planned flag that the config does not have; `config`
    /// is unchanged then.
    pub fn apply_to(&self, config: &mut FlagsConfig) -> Result<(), Vec<Problem>> {
        let missing: Vec<Problem> = self
            .schedules
            .keys()
            .filter(|f| config.get(f).is_none())
            .map(|f| Problem {
                flag: Some(f.clone()),
                path: format!("$.{f}"),
                line: None,
                column: None,
                message: "the plan schedules a flag that the config does not define".into(),
            })
            .collect();
        if !missing.is_empty() {
            return Err(missing);
        }
        for (flag, schedule) in &self.schedules {
            if let Some(spec) = config.get_mut(flag) {
                spec.schedule = Some(schedule.clone());
            }
        }
        Ok(())
    }
}

/// A timeline as an aligned text table.
pub fn render_timeline(rows: &[TimelineRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<22} {:>4}  {:<28} {:<8} {:>7}  environments",
        "from", "week", "flag", "enabled", "rollout"
    );
    for r in rows {
        let enabled = r.enabled.map_or("-".to_owned(), |b| b.to_string());
        let pct = match (r.rollout_basis_points, r.rollout_percentage) {
            (Some(bp), _) => format!("{}.{:02}%", bp / 100, bp % 100),
            (None, Some(p)) => format!("{p}%"),
            (None, None) => "-".to_owned(),
        };
        let envs =
            r.environments.as_ref().map_or(
                "-".to_owned(),
                |e| if e.is_empty() { "(none)".into() } else { e.join(",") },
            );
        let _ = writeln!(
            out,
            "{:<22} {:>4}  {:<28} {:<8} {:>7}  {}",
            r.at, r.week, r.flag, enabled, pct, envs
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::parse_time;

    #[test]
    fn reference_plan_sorts_week_10_last() {
        let text = include_str!("../../tests/fixtures/flags/reference_week_plan.json");
        let plan = Plan::from_json(text.as_bytes(), parse_time("2026-02-09").unwrap()).unwrap();
        let weeks: Vec<i64> = plan.timeline().iter().map(|r| r.week).collect();
        assert_eq!(weeks, vec![1, 2, 4, 6, 8, 10]);
        let last = plan.timeline().pop().unwrap();
        assert_eq!(last.at, "2026-04-13T00:00:00Z");
        assert_eq!(last.environments, Some(vec!["production".to_owned()]));
    }

    #[test]
    fn bad_week_keys_are_reported_with_the_flag() {
        let e = Plan::from_json(
            br#"{"f": {"week_0": {}, "wk_2": {}, "week_3": {"at": "x"}, "week_4": {"rollout_percentage": 300}}}"#,
            OffsetDateTime::UNIX_EPOCH,
        )
        .unwrap_err();
        let p = e.problems();
        assert_eq!(p.len(), 4, "{p:#?}");
        assert!(p.iter().all(|p| p.flag.as_deref() == Some("f")));
        assert_eq!(p[3].path, "$.f.week_4.rollout_percentage");
    }

    #[test]
    fn apply_refuses_unknown_flags_and_changes_nothing() {
        let plan = Plan::from_json(
            br#"{"ghost": {"week_1": {"enabled": true}}}"#,
            OffsetDateTime::UNIX_EPOCH,
        )
        .unwrap();
        let mut config = FlagsConfig::from_json(br#"{"real": {}}"#).unwrap();
        let before = config.clone();
        assert_eq!(
            plan.apply_to(&mut config).unwrap_err()[0].flag.as_deref(),
            Some("ghost")
        );
        assert_eq!(config, before);
    }
}
