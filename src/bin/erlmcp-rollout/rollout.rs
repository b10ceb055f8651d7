//! `erlmcp-rollout rollout ...`: the closed-loop ramp of a flag (a thin layer
//! over `erlmcp_rollout::deploy::rollout`).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand};
use erlmcp_rollout::deploy::prometheus::Client;
use erlmcp_rollout::deploy::rollout::audit::{render_line, rfc3339};
use erlmcp_rollout::deploy::rollout::{
    now, run, AuditLog, Command as RunCommand, ControllerLock, Event, FlagTarget, Phase, RolloutPlan, RunOptions,
    RunOutcome, RunState, StateStore,
};
use serde_json::json;

use crate::access::{EtcdAccessArgs, PrometheusAccessArgs};
use crate::exit;

const RUN_EXIT_CODES: &str = "\
Exit codes:
   0  completed: 100 % with the last window passing
  11  rolled back (a rollback verdict, or a limit with on_inconclusive = rollback)
  12  aborted (rollout abort)
   1  error (bad options or plan, flag missing or disabled, another controller holds the flag, state or audit not writable)
   2  bad command-line usage";

#[derive(Subcommand)]
pub enum Command {
    /// Move a flag's rollout_percentage through the plan's stages, judging every interval;
    /// roll back by itself, pause for approval when the rollback matrix says so.
    #[command(after_help = RUN_EXIT_CODES)]
    Run(Box<RunArgs>),
    /// Show a run's state and its last audit entries.
    Status(StatusArgs),
    /// Let a paused run go on (acknowledges the rules that paused it for the rest of the stage).
    Approve(CommandArgs),
    /// Roll a run back to the plan's rollback_to and end it (exit 12 for its controller).
    Abort(CommandArgs),
}

#[derive(Args)]
pub struct RunArgs {
    /// The flag to roll out.
    #[arg(long, value_name = "NAME")]
    flag: String,
    /// The flag config: a JSON file, or etcd:HOST:PORT[,HOST:PORT...]/KEY.
    #[arg(long, value_name = "FILE | etcd:HOST:PORT[,..]/KEY")]
    flags: String,
    /// Prometheus base URL, e.g. http://127.0.0.1:9090.
    #[arg(long, value_name = "URL")]
    prometheus: String,
    /// The rollout plan (JSON, see docs/deploy.md); default: the reference ramp
    /// 5/25/50/100 % observing 60/30/30/60 min.
    #[arg(long, value_name = "PLAN.json")]
    plan: Option<PathBuf>,
    /// Where the run state lives: a file, or etcd:HOST:PORT[,..][/PREFIX]
    /// (default: rollout-FLAG.state.json).
    #[arg(long, value_name = "FILE | etcd:HOST:PORT[,..][/PREFIX]")]
    state: Option<String>,
    /// The audit log (JSON lines; default: rollout-FLAG.audit.jsonl).
    #[arg(long, value_name = "FILE")]
    audit: Option<PathBuf>,
    /// Who runs it (recorded in the audit log; default $USER).
    #[arg(long, value_name = "NAME")]
    actor: Option<String>,
    /// Judge and log, publish nothing.
    #[arg(long)]
    dry_run: bool,
    /// One JSON event per line on stdout instead of the progress line.
    #[arg(long)]
    json: bool,
    /// Time limit of one etcd operation, in seconds.
    #[arg(long, default_value_t = 5, value_name = "SECONDS")]
    etcd_timeout_s: u64,
    #[command(flatten)]
    etcd: EtcdAccessArgs,
    #[command(flatten)]
    prometheus_access: PrometheusAccessArgs,
}

#[derive(Args)]
pub struct StatusArgs {
    /// The run state: a file, or etcd:HOST:PORT[,..][/PREFIX].
    #[arg(long, value_name = "FILE | etcd:HOST:PORT[,..][/PREFIX]")]
    state: String,
    /// The flag (needed with an etcd state).
    #[arg(long, value_name = "NAME")]
    flag: Option<String>,
    /// How many audit entries to show.
    #[arg(long, default_value_t = 10)]
    last: usize,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    etcd: EtcdAccessArgs,
}

#[derive(Args)]
pub struct CommandArgs {
    /// The run state: a file, or etcd:HOST:PORT[,..][/PREFIX].
    #[arg(long, value_name = "FILE | etcd:HOST:PORT[,..][/PREFIX]")]
    state: String,
    /// The flag (needed with an etcd state).
    #[arg(long, value_name = "NAME")]
    flag: Option<String>,
    /// Who (recorded in the audit log; default $USER).
    #[arg(long, value_name = "NAME")]
    actor: Option<String>,
    /// Why (recorded in the audit log).
    #[arg(long, default_value = "")]
    note: String,
    #[command(flatten)]
    etcd: EtcdAccessArgs,
    /// With `abort` and no controller running, the rollback is judged by nobody but
    /// published here; these reach the run's Prometheus if it needs them.
    #[command(flatten)]
    prometheus_access: PrometheusAccessArgs,
}

pub fn run_cmd(cmd: Command) -> Result<u8> {
    match cmd {
        Command::Run(a) => run_rollout(*a),
        Command::Status(a) => status(a),
        Command::Approve(a) => command(a, "approve"),
        Command::Abort(a) => command(a, "abort"),
    }
}

const ETCD_TIMEOUT: Duration = Duration::from_secs(5);

/// The Prometheus client of the rollout commands (the one place it is built).
fn prometheus_client(url: &str, access: &PrometheusAccessArgs) -> Result<Client> {
    Ok(Client::with_options(url, access.client_options(None))?)
}

fn actor(a: Option<String>) -> String {
    a.or_else(|| std::env::var("USER").ok())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn exit_code(o: RunOutcome) -> u8 {
    match o {
        RunOutcome::Completed => exit::OK,
        RunOutcome::RolledBack => exit::ROLLBACK,
        RunOutcome::Aborted => exit::ABORTED,
    }
}

/// Prints events: audit lines (text or JSON) on stdout, the progress line on a terminal.
struct Printer {
    json: bool,
    tty: bool,
    last_progress: Option<Instant>,
    progress_shown: bool,
}

impl Printer {
    fn new(json: bool) -> Printer {
        Printer {
            json,
            tty: !json && std::io::stderr().is_terminal(),
            last_progress: None,
            progress_shown: false,
        }
    }

    fn event(&mut self, e: &Event) {
        let mut out = std::io::stdout().lock();
        match e {
            Event::Audit(line) => {
                if self.progress_shown {
                    let _ = write!(std::io::stderr(), "\r\x1b[2K");
                    self.progress_shown = false;
                }
                let _ = if self.json {
                    writeln!(out, "{line}")
                } else {
                    writeln!(out, "{}", render_line(line))
                };
                let _ = out.flush();
            }
            Event::Progress(p) => {
                let every = if self.tty {
                    Duration::from_millis(250)
                } else {
                    Duration::from_secs(1)
                };
                if self.last_progress.is_some_and(|t| t.elapsed() < every) {
                    return;
                }
                self.last_progress = Some(Instant::now());
                if self.json {
                    let _ = writeln!(
                        out,
                        "{}",
                        json!({"event": "progress", "time": rfc3339(now()), "progress": p})
                    );
                    let _ = out.flush();
                } else if self.tty {
                    let _ = write!(std::io::stderr(), "\r\x1b[2K{}", p.line());
                    let _ = std::io::stderr().flush();
                    self.progress_shown = true;
                }
            }
        }
    }

    fn finish(&mut self) {
        if self.progress_shown {
            let _ = writeln!(std::io::stderr());
        }
    }
}

fn run_rollout(a: RunArgs) -> Result<u8> {
    let timeout = Duration::from_secs(a.etcd_timeout_s.max(1));
    let plan = match &a.plan {
        Some(p) => RolloutPlan::from_file(p)?,
        None => RolloutPlan::default(),
    };
    let security = a.etcd.security();
    let target = FlagTarget::parse(&a.flags, timeout)
        .context("--flags")?
        .with_etcd_security(security.clone());
    let state = a
        .state
        .clone()
        .unwrap_or_else(|| format!("rollout-{}.state.json", a.flag));
    let store = StateStore::parse(&state, timeout)
        .context("--state")?
        .with_etcd_security(security);
    let audit = a
        .audit
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("rollout-{}.audit.jsonl", a.flag)));
    let opts = RunOptions {
        flag: a.flag.clone(),
        target,
        prometheus_url: a.prometheus.clone(),
        client: prometheus_client(&a.prometheus, &a.prometheus_access)?,
        plan,
        store,
        audit,
        actor: actor(a.actor),
        dry_run: a.dry_run,
        tick: Duration::from_millis(200),
    };
    let mut printer = Printer::new(a.json);
    let result = run(opts, &mut |e| printer.event(e));
    printer.finish();
    Ok(exit_code(result?))
}

fn load(state: &str, flag: Option<&str>, etcd: &EtcdAccessArgs) -> Result<(StateStore, RunState)> {
    let store = StateStore::parse(state, ETCD_TIMEOUT)
        .context("--state")?
        .with_etcd_security(etcd.security());
    if matches!(store, StateStore::Etcd { .. }) && flag.is_none() {
        bail!("--flag is needed with an etcd state (runs are stored per flag)");
    }
    let st = store
        .load(flag.unwrap_or(""))?
        .with_context(|| format!("no rollout run recorded in {store}"))?;
    Ok((store, st))
}

fn status(a: StatusArgs) -> Result<u8> {
    let (store, st) = load(&a.state, a.flag.as_deref(), &a.etcd)?;
    let audit = st.audit.as_ref().map(AuditLog::new);
    let entries = match &audit {
        Some(log) => log.tail(a.last)?,
        None => Vec::new(),
    };
    let plan = RolloutPlan::from_json(st.plan.to_string().as_bytes())?;
    let mut o = std::io::stdout().lock();
    if a.json {
        let doc = json!({"state": st, "audit": entries});
        serde_json::to_writer_pretty(&mut o, &doc)?;
        writeln!(o)?;
        return Ok(exit::OK);
    }
    let phase = serde_json::to_value(st.phase)?;
    writeln!(o, "flag:     {} ({})", st.flag, st.target)?;
    writeln!(
        o,
        "run:      {} by {}, started {}{}",
        st.run_id,
        st.actor,
        rfc3339(st.started_at),
        if st.dry_run { " [dry run]" } else { "" }
    )?;
    writeln!(o, "plan:     {plan}")?;
    writeln!(o, "phase:    {}", phase.as_str().unwrap_or("?"))?;
    let stage = plan.stages.get(st.stage);
    writeln!(
        o,
        "stage:    {}/{} (target {} %), published {} %",
        st.stage + 1,
        plan.stages.len(),
        stage.map_or(0, |s| s.percent),
        st.percent
    )?;
    if let (Some(w), Some(s)) = (st.window_start, stage) {
        if st.phase == Phase::Running || st.phase == Phase::Paused {
            let el = now() - w;
            let len = s.observe_ms as f64 / 1000.0;
            writeln!(
                o,
                "window:   {:.0}s of {:.0}s ({:.0}s left)",
                el,
                len,
                (len - el).max(0.0)
            )?;
        }
    }
    if let Some(p) = &st.pause {
        writeln!(
            o,
            "paused:   {} since {}: {}{}",
            p.kind,
            rfc3339(p.since),
            p.reason,
            p.approver
                .as_deref()
                .map(|a| format!(" (approval: {a})"))
                .unwrap_or_default()
        )?;
        writeln!(
            o,
            "          erlmcp-rollout rollout approve|abort --state {store} --flag {}",
            st.flag
        )?;
    }
    if !st.phase.finished() {
        let who = FlagTarget::parse(&st.target, ETCD_TIMEOUT)
            .map(|t| t.with_etcd_security(a.etcd.security()))
            .map_err(anyhow::Error::from)
            .and_then(|t| Ok(ControllerLock::holder(&t, &st.flag)?));
        match who {
            Ok(Some(h)) => writeln!(o, "control:  a controller runs: {h}")?,
            Ok(None) if st.dry_run => writeln!(o, "control:  dry run (no lock)")?,
            Ok(None) => writeln!(o, "control:  no controller runs; start `rollout run` again to resume")?,
            Err(e) => writeln!(o, "control:  unknown ({e})")?,
        }
    }
    if let Some(p) = &st.pending {
        writeln!(
            o,
            "pending:  publish #{} {} % -> {} % ({})",
            p.seq, p.from, p.to, p.reason
        )?;
    }
    if let Some(r) = &st.result {
        writeln!(o, "result:   {r}")?;
    }
    if let Some(log) = &audit {
        writeln!(o, "audit ({}), last {}:", log.path().display(), entries.len())?;
        for e in &entries {
            writeln!(o, "  {}", render_line(e))?;
        }
    }
    Ok(exit::OK)
}

fn command(a: CommandArgs, action: &str) -> Result<u8> {
    let (store, st) = load(&a.state, a.flag.as_deref(), &a.etcd)?;
    if st.phase.finished() {
        bail!(
            "the run of flag {:?} is over ({}); nothing to {action}",
            st.flag,
            st.result.as_deref().unwrap_or("finished")
        );
    }
    let cmd = RunCommand {
        action: action.into(),
        actor: actor(a.actor.clone()),
        at: now(),
        note: a.note.clone(),
    };
    store.put_command(&st.flag, &cmd)?;
    if action == "approve" {
        println!(
            "approval stored for flag {:?}; its controller goes on at its next tick",
            st.flag
        );
        return Ok(exit::OK);
    }
    // An abort must roll back even when no controller runs: try to be the
    // controller; if one runs, it takes the command itself.
    let plan = RolloutPlan::from_json(st.plan.to_string().as_bytes())?;
    let prometheus = st.prometheus.clone();
    let opts = RunOptions {
        flag: st.flag.clone(),
        target: FlagTarget::parse(&st.target, ETCD_TIMEOUT)?.with_etcd_security(a.etcd.security()),
        prometheus_url: prometheus.clone(),
        client: prometheus_client(&prometheus, &a.prometheus_access)?,
        plan,
        store,
        audit: PathBuf::from(
            st.audit
                .clone()
                .unwrap_or_else(|| format!("rollout-{}.audit.jsonl", st.flag)),
        ),
        actor: cmd.actor.clone(),
        dry_run: st.dry_run,
        tick: Duration::from_millis(200),
    };
    let mut printer = Printer::new(false);
    match run(opts, &mut |e| {
        if matches!(e, Event::Audit(_)) {
            printer.event(e)
        }
    }) {
        Ok(o) => {
            println!("no controller was running; rolled back here ({o:?})");
            Ok(exit::OK)
        }
        Err(erlmcp_rollout::deploy::rollout::RolloutError::Locked(who)) => {
            println!(
                "abort stored for flag {:?}; its controller rolls back at its next tick ({who})",
                st.flag
            );
            Ok(exit::OK)
        }
        Err(e) => Err(e.into()),
    }
}
