//! The canary ramp and the rollback decision matrix as data (reference §III.C
//! "Observation Periods" and §IV.A "Rollback Decision Matrix"; DESIGN §6.3,
//! §6.5).
//!
//! [`Ramp::reference`] is 5 -> 25 -> 50 -> 100 % with 60/30/30/60 minutes of
//! observation; [`Ramp::parse`] reads another one from `PERCENT:MINUTES,...`.
//! [`ROLLBACK_MATRIX`] lists every trigger with its severity, whether the
//! rollback is automatic, its deadline and who approves it; canary decisions
//! cite a row of it by [`TriggerId`].

use std::fmt;

use serde::Serialize;

/// Why a ramp could not be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// A ramp needs at least one stage.
    #[error("the ramp has no stages")]
    Empty,
    /// A stage is not written `PERCENT:MINUTES`.
    #[error("stage {stage} ({text:?}): expected PERCENT:MINUTES, e.g. 25:30")]
    Syntax {
        /// 1-based stage number.
        stage: usize,
        /// The text of the stage.
        text: String,
    },
    /// Percentages must rise strictly, each in 1..=100.
    #[error("stage {stage}: {percent} % must be in 1..=100 and above the previous stage's percentage")]
    Percent {
        /// 1-based stage number.
        stage: usize,
        /// The offending percentage.
        percent: u8,
    },
    /// The last stage must send all traffic to the new version.
    #[error("the last stage is {percent} %; a ramp ends at 100 %")]
    NotFull {
        /// The last stage's percentage.
        percent: u8,
    },
    /// Every stage needs an observation period.
    #[error("stage {stage}: the observation period must be at least 1 minute")]
    NoObservation {
        /// 1-based stage number.
        stage: usize,
    },
}

/// One ramp stage: send `percent` of the traffic to the canary and observe it
/// for `observe_minutes` before the next decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RampStage {
    /// Share of traffic on the new version, 1..=100.
    pub percent: u8,
    /// Observation period in minutes.
    pub observe_minutes: u32,
}

/// A validated ramp: percentages strictly rising, ending at 100 %, every stage
/// observed for at least a minute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Ramp {
    stages: Vec<RampStage>,
}

/// One stage of a ramp laid out in time (see [`Ramp::schedule`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ScheduledStage {
    /// 1-based stage number.
    pub stage: usize,
    /// Share of traffic on the new version.
    pub percent: u8,
    /// Observation period in minutes.
    pub observe_minutes: u32,
    /// Minutes from the start of the ramp to the start of this stage.
    pub starts_at_minute: u64,
}

impl Ramp {
    /// The reference ramp: 5 % for 60 min, 25 % for 30, 50 % for 30, 100 % for 60.
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::deploy::plan::Ramp;
    /// let ramp = Ramp::reference();
    /// let pct: Vec<u8> = ramp.stages().iter().map(|s| s.percent).collect();
    /// assert_eq!(pct, [5, 25, 50, 100]);
    /// assert_eq!(ramp.total_minutes(), 180);
    /// ```
    pub fn reference() -> Ramp {
        let stage = |percent, observe_minutes| RampStage {
            percent,
            observe_minutes,
        };
        Ramp {
            stages: vec![stage(5, 60), stage(25, 30), stage(50, 30), stage(100, 60)],
        }
    }

    /// Validate stages into a ramp.
    ///
    /// # Errors
    /// [`PlanError`] naming the first offending stage.
    pub fn new(stages: Vec<RampStage>) -> Result<Ramp, PlanError> {
        let mut previous = 0u8;
        for (i, s) in stages.iter().enumerate() {
            if s.percent == 0 || s.percent > 100 || s.percent <= previous {
                return Err(PlanError::Percent {
                    stage: i + 1,
                    percent: s.percent,
                });
            }
            if s.observe_minutes == 0 {
                return Err(PlanError::NoObservation { stage: i + 1 });
            }
            previous = s.percent;
        }
        match stages.last() {
            None => Err(PlanError::Empty),
            Some(last) if last.percent != 100 => Err(PlanError::NotFull { percent: last.percent }),
            Some(_) => Ok(Ramp { stages }),
        }
    }

    /// Parse `PERCENT:MINUTES` stages separated by commas (`%` and spaces
    /// allowed), e.g. `"5:60,25:30,50:30,100:60"`.
    ///
    /// # Errors
    /// [`PlanError::Syntax`] for unreadable stages, otherwise as [`Ramp::new`].
    ///
    /// # Examples
    /// ```
    /// use erlmcp_rollout::deploy::plan::Ramp;
    /// let ramp = Ramp::parse("10%:15, 100%:30")?;
    /// assert_eq!(ramp.total_minutes(), 45);
    /// assert!(Ramp::parse("50:10,25:10").is_err());
    /// # Ok::<(), erlmcp_rollout::deploy::plan::PlanError>(())
    /// ```
    pub fn parse(text: &str) -> Result<Ramp, PlanError> {
        let mut stages = Vec::new();
        for (i, part) in text.split(',').enumerate() {
            let syntax = || PlanError::Syntax {
                stage: i + 1,
                text: part.trim().to_owned(),
            };
            let (p, m) = part.split_once(':').ok_or_else(syntax)?;
            let percent = p.trim().trim_end_matches('%').trim().parse().map_err(|_| syntax())?;
            let observe_minutes = m.trim().parse().map_err(|_| syntax())?;
            stages.push(RampStage {
                percent,
                observe_minutes,
            });
        }
        Ramp::new(stages)
    }

    /// The stages, first to last.
    pub fn stages(&self) -> &[RampStage] {
        &self.stages
    }

    /// Sum of the observation periods.
    pub fn total_minutes(&self) -> u64 {
        self.stages.iter().map(|s| u64::from(s.observe_minutes)).sum()
    }

    /// The stages with their start minute relative to the start of the ramp.
    pub fn schedule(&self) -> Vec<ScheduledStage> {
        let mut at = 0u64;
        self.stages
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let row = ScheduledStage {
                    stage: i + 1,
                    percent: s.percent,
                    observe_minutes: s.observe_minutes,
                    starts_at_minute: at,
                };
                at += u64::from(s.observe_minutes);
                row
            })
            .collect()
    }
}

impl Default for Ramp {
    fn default() -> Self {
        Ramp::reference()
    }
}

/// A row of the rollback decision matrix, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TriggerId {
    /// Canary error rate above the absolute limit (0.1 %).
    ErrorRateAbsolute,
    /// Canary error rate above k x the stable error rate (k = 2).
    ErrorRateRelative,
    /// Canary pods restarting.
    PodCrashLoop,
    /// Canary targets down or not reporting.
    HealthCheckFailures,
    /// Canary p95 latency above k x stable (k = 1.5).
    LatencyRelative,
    /// A customer reports a problem.
    CustomerComplaint,
    /// An integration test fails against the canary.
    FailedIntegrationTest,
}

impl TriggerId {
    /// The snake_case name used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerId::ErrorRateAbsolute => "error_rate_absolute",
            TriggerId::ErrorRateRelative => "error_rate_relative",
            TriggerId::PodCrashLoop => "pod_crash_loop",
            TriggerId::HealthCheckFailures => "health_check_failures",
            TriggerId::LatencyRelative => "latency_relative",
            TriggerId::CustomerComplaint => "customer_complaint",
            TriggerId::FailedIntegrationTest => "failed_integration_test",
        }
    }
}

impl fmt::Display for TriggerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How bad a trigger is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Low.
    Low,
    /// Medium.
    Medium,
    /// High.
    High,
    /// Critical.
    Critical,
}

/// Who performs the rollback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackKind {
    /// The pipeline rolls back by itself.
    Automatic,
    /// A person decides and rolls back.
    Manual,
}

/// One row of the rollback decision matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Trigger {
    /// Its name.
    pub id: TriggerId,
    /// The trigger as the reference words it.
    pub description: &'static str,
    /// How bad it is.
    pub severity: Severity,
    /// Automatic or manual rollback.
    pub rollback: RollbackKind,
    /// The rollback must be under way within this many seconds.
    pub deadline_seconds: u32,
    /// The deadline as the reference words it.
    pub timeline: &'static str,
    /// Who must approve the rollback (`None`: nobody, it is automatic).
    pub approval: Option<&'static str>,
}

/// The reference's rollback decision matrix (§IV.A), most severe first.
pub const ROLLBACK_MATRIX: [Trigger; 7] = [
    Trigger {
        id: TriggerId::ErrorRateAbsolute,
        description: "Error rate >0.1%",
        severity: Severity::Critical,
        rollback: RollbackKind::Automatic,
        deadline_seconds: 120,
        timeline: "Immediate (<2 min)",
        approval: None,
    },
    Trigger {
        id: TriggerId::ErrorRateRelative,
        description: "Error rate >2x baseline",
        severity: Severity::Critical,
        rollback: RollbackKind::Automatic,
        deadline_seconds: 120,
        timeline: "Immediate (<2 min)",
        approval: None,
    },
    Trigger {
        id: TriggerId::PodCrashLoop,
        description: "Pod crash loop",
        severity: Severity::Critical,
        rollback: RollbackKind::Automatic,
        deadline_seconds: 60,
        timeline: "Immediate (<1 min)",
        approval: None,
    },
    Trigger {
        id: TriggerId::HealthCheckFailures,
        description: "Health check failures",
        severity: Severity::High,
        rollback: RollbackKind::Automatic,
        deadline_seconds: 30,
        timeline: "30 seconds",
        approval: None,
    },
    Trigger {
        id: TriggerId::LatencyRelative,
        description: "Latency >1.5x baseline",
        severity: Severity::Medium,
        rollback: RollbackKind::Manual,
        deadline_seconds: 600,
        timeline: "10 minutes",
        approval: Some("SRE on-call"),
    },
    Trigger {
        id: TriggerId::CustomerComplaint,
        description: "Customer complaint",
        severity: Severity::Medium,
        rollback: RollbackKind::Manual,
        deadline_seconds: 900,
        timeline: "15 minutes",
        approval: Some("Product manager"),
    },
    Trigger {
        id: TriggerId::FailedIntegrationTest,
        description: "Failed integration test",
        severity: Severity::Low,
        rollback: RollbackKind::Manual,
        deadline_seconds: 1800,
        timeline: "30 minutes",
        approval: Some("Engineering lead"),
    },
];

/// The matrix row for `id`.
///
/// # Examples
/// ```
/// use erlmcp_rollout::deploy::plan::{trigger, RollbackKind, TriggerId};
/// let t = trigger(TriggerId::PodCrashLoop);
/// assert_eq!((t.rollback, t.deadline_seconds), (RollbackKind::Automatic, 60));
/// ```
pub fn trigger(id: TriggerId) -> &'static Trigger {
    // ROLLBACK_MATRIX holds one row per TriggerId, in declaration order.
    let index = match id {
        TriggerId::ErrorRateAbsolute => 0,
        TriggerId::ErrorRateRelative => 1,
        TriggerId::PodCrashLoop => 2,
        TriggerId::HealthCheckFailures => 3,
        TriggerId::LatencyRelative => 4,
        TriggerId::CustomerComplaint => 5,
        TriggerId::FailedIntegrationTest => 6,
    };
    &ROLLBACK_MATRIX[index]
}

/// The ramp as a text table, one stage per line.
pub fn render_ramp(ramp: &Ramp) -> String {
    let mut out = String::from("stage  traffic  observe   starts at\n");
    for s in ramp.schedule() {
        out.push_str(&format!(
            "{:>5}  {:>6} %  {:>4} min  +{}h{:02}\n",
            s.stage,
            s.percent,
            s.observe_minutes,
            s.starts_at_minute / 60,
            s.starts_at_minute % 60
        ));
    }
    out.push_str(&format!("total observation: {} min\n", ramp.total_minutes()));
    out
}

/// The rollback matrix as a text table.
pub fn render_matrix(rows: &[Trigger]) -> String {
    let mut out = format!(
        "{:<24} {:<9} {:<10} {:<19} {}\n",
        "trigger", "severity", "rollback", "timeline", "approval"
    );
    for t in rows {
        let severity = format!("{:?}", t.severity).to_lowercase();
        let kind = format!("{:?}", t.rollback).to_lowercase();
        out.push_str(&format!(
            "{:<24} {:<9} {:<10} {:<19} {}\n",
            t.description,
            severity,
            kind,
            t.timeline,
            t.approval.unwrap_or("no")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_rows_match_their_ids() {
        for row in &ROLLBACK_MATRIX {
            assert_eq!(trigger(row.id), row);
        }
    }

    #[test]
    fn ramp_validation() {
        assert_eq!(
            Ramp::parse(""),
            Err(PlanError::Syntax {
                stage: 1,
                text: String::new()
            })
        );
        assert_eq!(
            Ramp::parse("5:60,5:30"),
            Err(PlanError::Percent { stage: 2, percent: 5 })
        );
        assert_eq!(Ramp::parse("5:60,50:30"), Err(PlanError::NotFull { percent: 50 }));
        assert_eq!(Ramp::parse("100:0"), Err(PlanError::NoObservation { stage: 1 }));
        assert_eq!(
            Ramp::parse("0:5,100:5"),
            Err(PlanError::Percent { stage: 1, percent: 0 })
        );
        assert_eq!(Ramp::parse("5:60, 25:30, 50:30, 100%:60"), Ok(Ramp::reference()));
        let starts: Vec<u64> = Ramp::reference()
            .schedule()
            .iter()
            .map(|s| s.starts_at_minute)
            .collect();
        assert_eq!(starts, [0, 60, 90, 120]);
    }
}
