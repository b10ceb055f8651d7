//! The rollout controller (DESIGN §6.6): a state machine over [`RunState`],
//! saved after every step.
//!
//! ```text
//!   start ──> publish stage i ──> observe (judge every interval) ──pass at window end──> stage i+1 ... 100 % ──> completed (exit 0)
//!                                   │ rollback verdict (past failure_limit) ──> publish rollback_to ──> rolled back (exit 11)
//!                                   │ approval verdict, conflict, limit ──> paused ──approve──> observe
//!                                   │                                          └─abort──> publish rollback_to ──> aborted (exit 12)
//! ```
//!
//! # Exactly-once publishes
//! A publish is saved as [`Pending`] (with its sequence number and the guard
//! of the config it is computed from) **before** it is made, and cleared
//! after its audit line is written. A restarted controller that finds a
//! pending publish reads the config: still at the guard -> not made, make it;
//! changed and the flag at the target percentage -> made (its audit line is
//! written unless the log already has that sequence number); changed
//! otherwise -> a concurrent edit, pause. So each publish happens once and is
//! logged once, whenever the controller is killed.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::audit::AuditLog;
use super::judge::{judge, JudgementOutcome};
use super::plan::{LimitAction, RolloutPlan};
use super::state::{Command, ControllerLock, Holder, JudgementSummary, Pause, Pending, Phase, RunState, StateStore};
use super::target::{flag_spec, flag_state, set_percentage, FlagTarget, PublishError};
use super::{now, RolloutError};
use crate::deploy::prometheus::Client;

/// What [`run`] needs.
#[derive(Debug)]
pub struct RunOptions {
    /// The flag.
    pub flag: String,
    /// Where its config lives.
    pub target: FlagTarget,
    /// The Prometheus base URL (recorded in the state, for `rollout abort`).
    pub prometheus_url: String,
    /// The Prometheus client.
    pub client: Client,
    /// The plan (a resumed run keeps the plan it started with).
    pub plan: RolloutPlan,
    /// Where the state lives.
    pub store: StateStore,
    /// The audit log file.
    pub audit: PathBuf,
    /// Who runs it.
    pub actor: String,
    /// Judge and log without publishing.
    pub dry_run: bool,
    /// How often to look for commands and report progress.
    pub tick: Duration,
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    /// 100 % with the last window passing (exit 0).
    Completed,
    /// Rolled back by a verdict or limit (exit 11).
    RolledBack,
    /// Rolled back by `rollout abort` (exit 12).
    Aborted,
}

/// Where a run is, for a progress line.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Progress {
    /// 1-based stage.
    pub stage: usize,
    /// Number of stages.
    pub stages: usize,
    /// Published percentage.
    pub percent: u8,
    /// `running`, `paused`, ...
    pub phase: Phase,
    /// Seconds into the window.
    pub window_elapsed: f64,
    /// The window's length in seconds.
    pub window_seconds: f64,
    /// The last judgement's outcome.
    pub last_verdict: Option<String>,
    /// And why.
    pub last_summary: Option<String>,
    /// The pause reason, when paused; or what the controller waits for.
    pub note: Option<String>,
}

impl Progress {
    /// One line for a terminal.
    pub fn line(&self) -> String {
        let remaining = (self.window_seconds - self.window_elapsed).max(0.0);
        let mut s = format!(
            "stage {}/{} {:>3} % | window {:.0}s/{:.0}s ({:.0}s left)",
            self.stage, self.stages, self.percent, self.window_elapsed, self.window_seconds, remaining
        );
        if self.phase == Phase::Paused {
            s.push_str(" | PAUSED");
        }
        if let Some(v) = &self.last_verdict {
            s.push_str(&format!(" | last: {v}"));
            if let Some(w) = &self.last_summary {
                s.push_str(&format!(" ({w})"));
            }
        }
        if let Some(n) = &self.note {
            s.push_str(&format!(" | {n}"));
        }
        // One terminal line: a wrapped line could not be redrawn in place.
        if s.chars().count() > Self::MAX_CHARS {
            s = s.chars().take(Self::MAX_CHARS - 3).collect::<String>() + "...";
        }
        s
    }

    /// The longest [`Progress::line`].
    pub const MAX_CHARS: usize = 150;
}

/// What the controller reports as it goes.
#[derive(Clone, Debug)]
pub enum Event {
    /// A line appended to the audit log.
    Audit(Value),
    /// Progress (every tick).
    Progress(Progress),
}

struct Ctl<'a> {
    o: &'a RunOptions,
    plan: RolloutPlan,
    audit: AuditLog,
    st: RunState,
    common: Map<String, Value>,
    on_event: &'a mut dyn FnMut(&Event),
    note: Option<String>,
}

/// Run (or resume) the rollout of `opts.flag` until it completes, rolls back
/// or is aborted. Paused runs wait for `rollout approve` or `rollout abort`.
///
/// # Errors
/// [`RolloutError`]: another controller holds the flag, the flag config is
/// unusable, the state or audit log cannot be written. The state then says
/// where the run stopped, and a new controller resumes it.
pub fn run(opts: RunOptions, on_event: &mut dyn FnMut(&Event)) -> Result<RunOutcome, RolloutError> {
    let me = Holder::me(&opts.actor);
    let lock = if opts.dry_run {
        None
    } else {
        Some(ControllerLock::acquire(&opts.target, &opts.flag, &me)?)
    };
    let mut ctl = Ctl::start(&opts, on_event)?;
    loop {
        if let Some(l) = &lock {
            if !l.held() {
                return Err(RolloutError::Locked(format!(
                    "lost the controller lock of flag {:?} (etcd lease expired); the state is saved, start the controller again",
                    opts.flag
                )));
            }
        }
        if let Some(done) = ctl.step()? {
            return Ok(done);
        }
    }
}

impl<'a> Ctl<'a> {
    fn start(o: &'a RunOptions, on_event: &'a mut dyn FnMut(&Event)) -> Result<Ctl<'a>, RolloutError> {
        let audit = AuditLog::new(&o.audit);
        let existing = o.store.load(&o.flag)?;
        let (st, plan, resumed) = match existing {
            Some(st) if !st.phase.finished() => {
                let plan = RolloutPlan::from_json(st.plan.to_string().as_bytes())?;
                if st.stage >= plan.stages.len() {
                    return Err(RolloutError::State(format!(
                        "{}: stage {} of a {}-stage plan",
                        o.store,
                        st.stage + 1,
                        plan.stages.len()
                    )));
                }
                (st, plan, true)
            }
            _ => {
                let cur = o.target.read()?;
                let (enabled, percent) = flag_state(&cur.bytes, &o.flag)?;
                if !enabled {
                    return Err(RolloutError::Usage(format!(
                        "flag {:?} is disabled (\"enabled\": false): a rollout percentage would have no effect; \
                         enable it with \"rollout_percentage\": 0 first",
                        o.flag
                    )));
                }
                let Some(stage) = o.plan.stages.iter().position(|s| s.percent >= percent) else {
                    return Err(RolloutError::Usage(format!(
                        "flag {:?} is already at {percent} %, beyond the plan's last stage",
                        o.flag
                    )));
                };
                let t = now();
                let st = RunState {
                    version: 1,
                    run_id: format!("{}-{}", o.flag, (t * 1000.0) as u64),
                    flag: o.flag.clone(),
                    target: o.target.to_string(),
                    prometheus: o.prometheus_url.clone(),
                    plan: o.plan.to_json(),
                    actor: o.actor.clone(),
                    dry_run: o.dry_run,
                    audit: Some(o.audit.display().to_string()),
                    started_at: t,
                    updated_at: t,
                    phase: Phase::Running,
                    stage,
                    percent,
                    initial_percent: percent,
                    window_start: None,
                    next_judgement_at: None,
                    guard: cur.guard,
                    flag_spec: flag_spec(&cur.bytes, &o.flag)?,
                    pending: None,
                    publish_seq: 0,
                    consecutive_inconclusive: 0,
                    consecutive_errors: 0,
                    failures: 0,
                    acknowledged: Vec::new(),
                    pause: None,
                    judgements: Vec::new(),
                    result: None,
                };
                (st, o.plan.clone(), false)
            }
        };
        let mut common = Map::new();
        common.insert("actor".into(), json!(o.actor));
        common.insert("flag".into(), json!(o.flag));
        common.insert("run_id".into(), json!(st.run_id));
        let mut ctl = Ctl {
            o,
            plan,
            audit,
            st,
            common,
            on_event,
            note: None,
        };
        if resumed {
            let fields = json!({
                "pid": std::process::id(),
                "stage": ctl.st.stage + 1,
                "percent": ctl.st.percent,
                "phase": ctl.st.phase,
                "pending_publish": ctl.st.pending,
                "plan_differs": ctl.plan != o.plan,
                "reason": "a controller resumed the saved run",
            });
            ctl.log("resume", fields)?;
        } else {
            let fields = json!({
                "pid": std::process::id(),
                "target": o.target.to_string(),
                "state": o.store.to_string(),
                "prometheus": o.prometheus_url,
                "from": ctl.st.percent,
                "plan": ctl.st.plan,
                "dry_run": o.dry_run,
                "reason": format!("ramp {}", ctl.plan),
            });
            ctl.log("start", fields)?;
        }
        ctl.save()?;
        Ok(ctl)
    }

    fn log(&mut self, event: &str, fields: Value) -> Result<(), RolloutError> {
        let line = self.audit.append(now(), event, &self.common, fields)?;
        (self.on_event)(&Event::Audit(line));
        Ok(())
    }

    fn save(&mut self) -> Result<(), RolloutError> {
        self.st.updated_at = now();
        // An etcd state store can be briefly unavailable (an election): retry
        // before giving up; the run must not go on unsaved.
        let mut attempt = 0;
        loop {
            match self.o.store.save(&self.st) {
                Ok(()) => return Ok(()),
                Err(e) if attempt >= 3 => return Err(e),
                Err(_) => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }

    fn window_seconds(&self) -> f64 {
        self.plan
            .stages
            .get(self.st.stage)
            .map_or(0.0, |s| s.observe_ms as f64 / 1000.0)
    }

    fn progress(&mut self) {
        let t = now();
        let last = self.st.judgements.last();
        let p = Progress {
            stage: self.st.stage + 1,
            stages: self.plan.stages.len(),
            percent: self.st.percent,
            phase: self.st.phase,
            window_elapsed: self.st.window_start.map_or(0.0, |w| (t - w).max(0.0)),
            window_seconds: self.window_seconds(),
            last_verdict: last.map(|j| j.outcome.clone()),
            last_summary: last.map(|j| j.summary.clone()),
            note: self
                .st
                .pause
                .as_ref()
                .map(|p| format!("{}: rollout approve | rollout abort", p.reason))
                .or_else(|| self.note.clone()),
        };
        (self.on_event)(&Event::Progress(p));
    }

    fn outcome(&self) -> Option<RunOutcome> {
        match self.st.phase {
            Phase::Completed => Some(RunOutcome::Completed),
            Phase::RolledBack => Some(RunOutcome::RolledBack),
            Phase::Aborted => Some(RunOutcome::Aborted),
            Phase::Running | Phase::Paused => None,
        }
    }

    fn sleep(&mut self, until: Option<f64>) {
        self.progress();
        let mut d = self.o.tick;
        if let Some(u) = until {
            let left = u - now();
            if left > 0.0 {
                d = d.min(Duration::from_secs_f64(left));
            } else {
                d = Duration::ZERO;
            }
        }
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }

    /// One step; `Some` when the run is over.
    fn step(&mut self) -> Result<Option<RunOutcome>, RolloutError> {
        if let Some(done) = self.outcome() {
            return Ok(Some(done));
        }
        // A publish in flight is settled (made and logged, or found not made)
        // before any command, so an abort never leaves a made publish unlogged.
        if let Some(p) = self.st.pending.clone() {
            if self.st.phase == Phase::Running {
                self.finish_publish(p)?;
                return Ok(self.outcome());
            }
        }
        match self.o.store.take_command(&self.o.flag) {
            Ok(Some(cmd)) => {
                self.command(cmd)?;
                return Ok(self.outcome());
            }
            Ok(None) => {}
            // Commands wait in the store; the next tick looks again.
            Err(e) => self.note = Some(format!("cannot read commands: {e}")),
        }
        match self.st.phase {
            Phase::Paused => {
                self.sleep(None);
                Ok(None)
            }
            Phase::Running => {
                let Some(window_start) = self.st.window_start else {
                    let to = self.plan.stages[self.st.stage].percent;
                    if self.st.percent == to {
                        self.start_window(now());
                        self.save()?;
                    } else {
                        self.begin_publish(to, "stage")?;
                    }
                    return Ok(self.outcome());
                };
                let due = self.st.next_judgement_at.unwrap_or(window_start);
                if now() < due {
                    self.sleep(Some(due));
                    return Ok(None);
                }
                self.judge_now(window_start)?;
                Ok(self.outcome())
            }
            _ => Ok(self.outcome()),
        }
    }

    fn start_window(&mut self, at: f64) {
        self.st.window_start = Some(at);
        let interval = self.plan.interval_ms as f64 / 1000.0;
        self.st.next_judgement_at = Some(at + interval.min(self.window_seconds()));
        self.st.consecutive_inconclusive = 0;
        self.st.consecutive_errors = 0;
        self.st.failures = 0;
        self.st.acknowledged.clear();
    }

    fn judge_now(&mut self, window_start: f64) -> Result<(), RolloutError> {
        let t = now();
        let elapsed = t - window_start;
        let j = judge(
            &self.o.client,
            &self.plan,
            &self.o.flag,
            self.st.percent,
            elapsed,
            t,
            &self.st.acknowledged,
        );
        let stage = self.st.stage + 1;
        self.log(
            "judgement",
            json!({
                "stage": stage,
                "percent": self.st.percent,
                "window_elapsed_s": (elapsed * 1000.0).round() / 1000.0,
                "range": j.range,
                "verdict": j.outcome.as_str(),
                "summary": j.summary,
                "rules": j.rules,
                "values": j.values,
                "tests": j.tests,
                "triggers": j.triggers,
                "dry_run": self.o.dry_run,
            }),
        )?;
        self.st.judgements.push(JudgementSummary {
            at: t,
            stage,
            percent: self.st.percent,
            outcome: j.outcome.as_str().into(),
            summary: j.summary.clone(),
        });
        if self.st.judgements.len() > RunState::KEEP {
            self.st.judgements.remove(0);
        }
        let window_end = window_start + self.window_seconds();
        let interval = self.plan.interval_ms as f64 / 1000.0;
        let mut next = t + interval;
        if t < window_end {
            next = next.min(window_end);
        }
        self.st.next_judgement_at = Some(next);
        match j.outcome {
            JudgementOutcome::Pass => {
                self.st.consecutive_inconclusive = 0;
                self.st.consecutive_errors = 0;
                if t >= window_end {
                    if self.st.stage + 1 >= self.plan.stages.len() {
                        self.st.phase = Phase::Completed;
                        self.st.result = Some(format!(
                            "completed at {} % with the last window passing",
                            self.st.percent
                        ));
                        self.log(
                            "complete",
                            json!({"percent": self.st.percent, "reason": "the last stage's window passed"}),
                        )?;
                    } else {
                        let next_pct = self.plan.stages[self.st.stage + 1].percent;
                        self.log(
                            "promote",
                            json!({"stage": stage, "from": self.st.percent, "to": next_pct,
                                   "reason": format!("stage {stage} passed its {:.0}s window", self.window_seconds())}),
                        )?;
                        self.st.stage += 1;
                        self.st.window_start = None;
                        self.st.next_judgement_at = None;
                    }
                }
                self.save()
            }
            JudgementOutcome::Inconclusive | JudgementOutcome::Error => {
                if j.outcome == JudgementOutcome::Error {
                    self.st.consecutive_errors += 1;
                } else {
                    self.st.consecutive_errors = 0;
                    self.st.consecutive_inconclusive += 1;
                }
                let over = if self.st.consecutive_errors > self.plan.consecutive_error_limit {
                    Some(format!(
                        "{} consecutive judgements without an answer from Prometheus (limit {})",
                        self.st.consecutive_errors, self.plan.consecutive_error_limit
                    ))
                } else if self.st.consecutive_inconclusive > self.plan.inconclusive_limit {
                    Some(format!(
                        "{} consecutive inconclusive judgements (limit {})",
                        self.st.consecutive_inconclusive, self.plan.inconclusive_limit
                    ))
                } else {
                    None
                };
                match over {
                    None => self.save(),
                    Some(why) => match self.plan.on_inconclusive {
                        LimitAction::Pause => {
                            self.pause("limit", format!("{why}; last: {}", j.summary), Vec::new(), None)
                        }
                        LimitAction::Rollback => {
                            self.log(
                                "rollback",
                                json!({"reason": format!("{why} (on_inconclusive = rollback)")}),
                            )?;
                            self.begin_publish(self.plan.rollback_to, "rollback")
                        }
                    },
                }
            }
            JudgementOutcome::Approval => self.pause(
                "approval",
                j.summary.clone(),
                j.approval_rules.clone(),
                j.approver.clone(),
            ),
            JudgementOutcome::Rollback => {
                self.st.failures += 1;
                if self.st.failures > self.plan.failure_limit {
                    let fields = json!({
                        "reason": j.summary,
                        "triggers": j.triggers,
                        "failures": self.st.failures,
                        "failure_limit": self.plan.failure_limit,
                    });
                    self.log("rollback", fields)?;
                    self.begin_publish(self.plan.rollback_to, "rollback")
                } else {
                    self.save()
                }
            }
        }
    }

    fn pause(
        &mut self,
        kind: &str,
        reason: String,
        rules: Vec<String>,
        approver: Option<String>,
    ) -> Result<(), RolloutError> {
        self.st.phase = Phase::Paused;
        let p = Pause {
            kind: kind.into(),
            reason,
            since: now(),
            rules,
            approver,
        };
        self.log(
            "pause",
            json!({"kind": p.kind, "reason": p.reason, "rules": p.rules, "approver": p.approver,
                   "stage": self.st.stage + 1, "percent": self.st.percent}),
        )?;
        self.st.pause = Some(p);
        self.save()
    }

    fn command(&mut self, cmd: Command) -> Result<(), RolloutError> {
        match cmd.action.as_str() {
            "abort" => {
                self.log(
                    "abort",
                    json!({"by": cmd.actor, "note": cmd.note, "percent": self.st.percent}),
                )?;
                self.st.pause = None;
                self.st.phase = Phase::Running;
                // Roll back on top of the config as it is now (a human asked for it).
                let cur = self.o.target.read()?;
                self.st.guard = cur.guard;
                self.st.flag_spec = flag_spec(&cur.bytes, &self.o.flag)?;
                self.st.pending = None;
                self.begin_publish(self.plan.rollback_to, "abort")
            }
            "approve" => {
                let Some(p) = self.st.pause.take() else {
                    return self.log(
                        "approve",
                        json!({"by": cmd.actor, "note": cmd.note, "reason": "nothing to approve: the run is not paused"}),
                    );
                };
                match p.kind.as_str() {
                    "approval" => self.st.acknowledged.extend(p.rules.iter().cloned()),
                    "conflict" => {
                        // Re-apply the pending publish on top of the edited config.
                        let cur = self.o.target.read()?;
                        self.st.guard = cur.guard;
                        self.st.flag_spec = flag_spec(&cur.bytes, &self.o.flag)?;
                        if let Some(pending) = &mut self.st.pending {
                            pending.based_on = cur.guard;
                        }
                    }
                    _ => {
                        self.st.consecutive_errors = 0;
                        self.st.consecutive_inconclusive = 0;
                    }
                }
                self.st.phase = Phase::Running;
                self.st.next_judgement_at = Some(now());
                self.log(
                    "approve",
                    json!({"by": cmd.actor, "note": cmd.note, "kind": p.kind, "rules": p.rules,
                           "reason": format!("approved: {}", p.reason)}),
                )?;
                self.save()
            }
            other => self.log(
                "command",
                json!({"by": cmd.actor, "reason": format!("unknown command {other:?} ignored")}),
            ),
        }
    }

    fn begin_publish(&mut self, to: u8, reason: &str) -> Result<(), RolloutError> {
        self.st.publish_seq += 1;
        let p = Pending {
            seq: self.st.publish_seq,
            from: self.st.percent,
            to,
            reason: reason.into(),
            based_on: self.st.guard,
        };
        self.st.pending = Some(p.clone());
        // The intent is durable before the publish.
        self.save()?;
        self.finish_publish(p)
    }

    fn finish_publish(&mut self, p: Pending) -> Result<(), RolloutError> {
        if self.o.dry_run {
            return self.published(&p, self.st.guard, None);
        }
        let cur = match self.o.target.read() {
            Ok(c) => c,
            Err(PublishError::Unavailable(why)) => {
                self.note = Some(format!("publishing {} %: {why}; retrying", p.to));
                self.sleep(None);
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        if cur.guard == p.based_on {
            let bytes = set_percentage(&cur.bytes, &self.o.flag, p.to)?;
            fault("exit_before_publish", p.seq);
            return match self.o.target.publish(p.based_on, &bytes) {
                Ok(guard) => {
                    fault("exit_after_publish", p.seq);
                    self.published(&p, guard, Some(flag_spec(&bytes, &self.o.flag)?))
                }
                // Both resolve on the next read: made (ours) or not (a conflict).
                Err(PublishError::Conflict(why) | PublishError::Unavailable(why)) => {
                    self.note = Some(format!("publishing {} %: {why}; re-checking", p.to));
                    self.sleep(None);
                    Ok(())
                }
                Err(e) => Err(e.into()),
            };
        }
        let (_, now_pct) = flag_state(&cur.bytes, &self.o.flag)?;
        let spec_now = flag_spec(&cur.bytes, &self.o.flag)?;
        if now_pct == p.to && p.from != p.to {
            // The config moved on from the guard and holds our percentage: our
            // publish was made (its acknowledgement or our save was lost).
            return self.published(&p, cur.guard, Some(spec_now));
        }
        if spec_now == self.st.flag_spec {
            // Someone edited other flags, not this one: the publish changes one
            // number of this flag, so it is recomputed on top of their edit
            // (nothing of theirs is overwritten), still guarded.
            self.st.guard = cur.guard;
            let mut rebased = p.clone();
            rebased.based_on = cur.guard;
            self.st.pending = Some(rebased);
            return self.save();
        }
        self.pause(
            "conflict",
            format!(
                "the flag config changed under the controller (now rollout_percentage {now_pct} %, expected {} % -> {} %); \
                 approve to publish {} % on top of the change, abort to roll back",
                p.from, p.to, p.to
            ),
            Vec::new(),
            None,
        )
    }

    fn published(&mut self, p: &Pending, guard: u64, spec: Option<Value>) -> Result<(), RolloutError> {
        self.note = None;
        if let Some(spec) = spec {
            self.st.flag_spec = spec;
        }
        if !self.audit.has_publish(&self.st.run_id, p.seq)? {
            self.log(
                "publish",
                json!({"seq": p.seq, "from": p.from, "to": p.to, "reason": p.reason,
                       "stage": self.st.stage + 1, "guard": guard, "dry_run": self.o.dry_run,
                       "target": self.o.target.to_string()}),
            )?;
        }
        self.st.guard = guard;
        self.st.percent = p.to;
        self.st.pending = None;
        match p.reason.as_str() {
            "stage" => self.start_window(now()),
            "rollback" => {
                self.st.phase = Phase::RolledBack;
                self.st.result = Some(format!("rolled back to {} %", p.to));
            }
            _ => {
                self.st.phase = Phase::Aborted;
                self.st.result = Some(format!("aborted, rolled back to {} %", p.to));
            }
        }
        self.save()
    }
}

/// Fault injection for the crash tests, an extra layer over the real `kill -9`
/// test: with `ERLMCP_ROLLOUT_FAULT=exit_before_publish:N` or
/// `exit_after_publish:N` the process exits at once (no destructors, no
/// state save, as if killed) just before or just after publish number `N`
/// is made.
fn fault(point: &str, seq: u64) {
    if std::env::var("ERLMCP_ROLLOUT_FAULT").is_ok_and(|v| v == format!("{point}:{seq}")) {
        std::process::exit(137);
    }
}
