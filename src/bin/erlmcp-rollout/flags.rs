//! `erlmcp-rollout flags ...`

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand};
use erlmcp_rollout::flags::{
    audit_diff, batch, matrix, parse_time, plan, unix_ms, AuditError, AuditLog, AuditRecord, ChangeKind, Clock,
    ConfigError, Engine, EnvOverrides, FlagsConfig, ManualClock, MapContext, OwnedValue, Reason, SystemClock,
    DEFAULT_ENVIRONMENT,
};
use serde_json::json;

use crate::exit;

#[derive(Subcommand)]
pub enum Command {
    /// Validate a config; exit 0 when valid, 1 with every problem listed.
    Check(CheckArgs),
    /// Evaluate a flag for a context (or JSON lines on stdin with --batch).
    Eval(EvalArgs),
    /// Evaluate a flag and show every check on the way.
    Explain(ExplainArgs),
    /// List flags and their effective state per environment.
    List(ListArgs),
    /// Turn a week plan (week_N -> stage) into schedules and print the timeline.
    Plan(PlanArgs),
    /// Emit the CI feature matrix (baseline, phaseN, all_enabled).
    Matrix(MatrixArgs),
    /// Validate a config (as `check` does) and publish it to an etcd key; an invalid
    /// config is never published (exit 1, every problem listed).
    Push(PushArgs),
    /// Show the audit trail (the JSON-lines file of `--audit-log` / `audit_log`).
    History(HistoryArgs),
}

#[derive(Args)]
pub struct HistoryArgs {
    /// The audit log (JSON lines).
    file: PathBuf,
    /// Only changes of this flag (repeatable).
    #[arg(long = "flag")]
    flags: Vec<String>,
    /// Only the last N records (after filtering).
    #[arg(long, value_name = "N")]
    last: Option<usize>,
    /// Machine-readable output (the records as JSON lines).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct PushArgs {
    /// The flag config (JSON).
    file: PathBuf,
    /// etcd endpoints, comma separated (host:port, http:// or https:// URLs).
    #[arg(long, value_name = "ENDPOINTS", value_delimiter = ',', required = true)]
    etcd: Vec<String>,
    /// The key watchers read.
    #[arg(long, default_value = erlmcp_rollout::flags::DEFAULT_FLAGS_KEY)]
    key: String,
    /// Give up after this many seconds without an answer.
    #[arg(long, default_value_t = 5)]
    timeout_s: u64,
    /// Who is pushing, for the audit trail (default: $USER@hostname).
    #[arg(long)]
    actor: Option<String>,
    /// Append the push (actor, key@revision, per-flag diff against the key's previous
    /// value) to this audit log (JSON lines, synced).
    #[arg(long, value_name = "FILE")]
    audit_log: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    access: crate::access::EtcdAccessArgs,
}

#[derive(Args)]
pub struct CheckArgs {
    /// The flag config (JSON).
    file: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone)]
pub struct ContextArgs {
    /// Environment to evaluate in.
    #[arg(long, default_value = DEFAULT_ENVIRONMENT)]
    env: String,
    /// Context entry KEY=VALUE; the value is an Erlang binary. Repeatable.
    #[arg(long = "ctx", value_name = "KEY=VALUE")]
    ctx: Vec<String>,
    /// Context entry KEY=INTEGER (any size). Repeatable.
    #[arg(long = "ctx-int", value_name = "KEY=INTEGER")]
    ctx_int: Vec<String>,
    /// Context entry KEY=ATOM. Repeatable.
    #[arg(long = "ctx-atom", value_name = "KEY=ATOM")]
    ctx_atom: Vec<String>,
    /// Evaluate schedules as of this time (RFC 3339 or YYYY-MM-DD) instead of now.
    #[arg(long, value_name = "TIME")]
    at: Option<String>,
    /// Ignore ERLMCP_FEATURE_FLAGS (by default it applies, as at erlmcp start).
    #[arg(long)]
    no_env_overrides: bool,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct EvalArgs {
    /// The flag config (JSON).
    file: PathBuf,
    /// The flag to evaluate (omit with --batch).
    #[arg(required_unless_present = "batch")]
    flag: Option<String>,
    /// Read JSON lines {"flag": NAME, "context": {...}} on stdin, write results on stdout.
    #[arg(long, conflicts_with_all = ["flag", "ctx", "ctx_int", "ctx_atom"])]
    batch: bool,
    /// Print OpenFeature-style details (value, variant, reason, error code, metadata).
    #[arg(long, conflicts_with = "batch")]
    details: bool,
    #[command(flatten)]
    context: ContextArgs,
}

#[derive(Args)]
pub struct ExplainArgs {
    /// The flag config (JSON).
    file: PathBuf,
    /// The flag to explain.
    flag: String,
    #[command(flatten)]
    context: ContextArgs,
}

#[derive(Args)]
pub struct ListArgs {
    /// The flag config (JSON).
    file: PathBuf,
    /// Environments to show (repeatable; default: every environment the config names).
    #[arg(long = "env")]
    envs: Vec<String>,
    /// Show the state as of this time (RFC 3339 or YYYY-MM-DD).
    #[arg(long, value_name = "TIME")]
    at: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct PlanArgs {
    /// The week plan: {"flag": {"week_1": {...}, "week_2": {...}}}.
    plan: PathBuf,
    /// Date (YYYY-MM-DD) or RFC 3339 time when week 1 starts.
    #[arg(long)]
    start: String,
    /// A flag config to attach the schedules to (written to --output).
    #[arg(long, requires = "output")]
    config: Option<PathBuf>,
    /// Where to write the config with schedules attached (validated first).
    #[arg(long, requires = "config")]
    output: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct MatrixArgs {
    /// The flag config (JSON).
    file: PathBuf,
    /// Print `matrix=<json>` for $GITHUB_OUTPUT instead.
    #[arg(long, conflicts_with = "json")]
    github_output: bool,
    /// Machine-readable output (compact JSON, `{"include": [...]}`).
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: Command) -> Result<u8> {
    match cmd {
        Command::Check(a) => check(a),
        Command::Eval(a) => eval(a),
        Command::Explain(a) => explain(a),
        Command::List(a) => list(a),
        Command::Plan(a) => plan_cmd(a),
        Command::Matrix(a) => matrix_cmd(a),
        Command::Push(a) => push(a),
        Command::History(a) => history(a),
    }
}

fn default_actor() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    format!("{user}@{host}")
}

fn history(a: HistoryArgs) -> Result<u8> {
    let records = match AuditLog::read(&a.file) {
        Ok(r) => r,
        Err(e @ AuditError::BadLine { .. }) => {
            eprintln!("{e}");
            return Ok(exit::INVALID);
        }
        Err(e) => return Err(e.into()),
    };
    let mut records: Vec<_> = records
        .into_iter()
        .filter_map(|mut r| {
            if !a.flags.is_empty() {
                r.changes.retain(|c| a.flags.contains(&c.flag));
                if r.changes.is_empty() {
                    return None;
                }
            }
            Some(r)
        })
        .collect();
    if let Some(n) = a.last {
        let skip = records.len().saturating_sub(n);
        records.drain(..skip);
    }
    let mut o = out();
    for r in &records {
        if a.json {
            writeln!(o, "{}", serde_json::to_string(r)?)?;
            continue;
        }
        writeln!(o, "{}  {}  {}", r.time, r.actor, r.source)?;
        for c in &r.changes {
            let kind = match c.change {
                ChangeKind::Added => "added",
                ChangeKind::Removed => "removed",
                ChangeKind::Changed => "changed",
                ChangeKind::Override => "override",
            };
            let fields: Vec<String> = c
                .fields
                .iter()
                .map(|(k, d)| format!("{k}: {} -> {}", d.before, d.after))
                .collect();
            match c.change {
                ChangeKind::Added | ChangeKind::Removed => writeln!(o, "  {:<24} {kind}", c.flag)?,
                _ => writeln!(o, "  {:<24} {kind:<8} {}", c.flag, fields.join("; "))?,
            }
        }
    }
    o.flush()?;
    Ok(exit::OK)
}

fn push(a: PushArgs) -> Result<u8> {
    use erlmcp_rollout::flags::{push_flags_with, PushError};
    let bytes = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let timeout = std::time::Duration::from_secs(a.timeout_s.max(1));
    let mut o = out();
    let audit = match &a.audit_log {
        Some(path) => Some(AuditLog::open(path, a.actor.clone().unwrap_or_else(default_actor))?),
        None => None,
    };
    let result = push_flags_with(&a.etcd, &a.key, &bytes, timeout, &a.access.security());
    if let (Some(log), Ok(p)) = (&audit, &result) {
        if p.changed {
            let previous = p
                .previous
                .as_deref()
                .and_then(|b| FlagsConfig::from_json(b).ok())
                .unwrap_or_default();
            let new = FlagsConfig::from_json(&bytes)?;
            log.append(&AuditRecord::now(
                log.actor(),
                format!("push:{}@{}", a.key, p.revision),
                audit_diff(&previous, &new),
            ))
            .context("the push is published, but its audit line could not be written")?;
        }
    }
    match result {
        Ok(p) if a.json => writeln!(
            o,
            "{}",
            json!({"published": true, "key": a.key, "flags": p.flags, "changed": p.changed, "revision": p.revision})
        )?,
        Ok(p) => writeln!(
            o,
            "{}: {} flags to {} (revision {})",
            if p.changed { "published" } else { "unchanged" },
            p.flags,
            a.key,
            p.revision
        )?,
        Err(PushError::Invalid(e)) => {
            if a.json {
                writeln!(
                    o,
                    "{}",
                    json!({"published": false, "valid": false, "problems": e.problems()})
                )?;
            } else {
                let p = e.problems();
                writeln!(o, "{}: {} problem(s); nothing was published", a.file.display(), p.len())?;
                for p in p {
                    writeln!(o, "  {p}")?;
                }
            }
            o.flush()?;
            return Ok(exit::INVALID);
        }
        Err(e) => return Err(e.into()),
    }
    o.flush()?;
    Ok(exit::OK)
}

fn out() -> BufWriter<std::io::StdoutLock<'static>> {
    BufWriter::new(std::io::stdout().lock())
}

fn load(file: &Path) -> Result<FlagsConfig> {
    FlagsConfig::from_file(file).map_err(|e| match e {
        ConfigError::Invalid(_) | ConfigError::Syntax(_) => {
            anyhow::anyhow!(
                "{} is not a valid flag config:\n  {}",
                file.display(),
                problems_text(&e)
            )
        }
        other => anyhow::Error::new(other),
    })
}

fn problems_text(e: &ConfigError) -> String {
    e.problems()
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n  ")
}

fn check(a: CheckArgs) -> Result<u8> {
    let result = FlagsConfig::from_file(&a.file);
    let mut o = out();
    match (&result, a.json) {
        (Ok(c), true) => writeln!(o, "{}", json!({"valid": true, "flags": c.len(), "problems": []}))?,
        (Ok(c), false) => writeln!(o, "ok: {} is valid ({} flags)", a.file.display(), c.len())?,
        (Err(e), true) => writeln!(o, "{}", json!({"valid": false, "problems": e.problems()}))?,
        (Err(e), false) => {
            let p = e.problems();
            writeln!(o, "{}: {} problem(s)", a.file.display(), p.len())?;
            for p in p {
                writeln!(o, "  {p}")?;
            }
        }
    }
    o.flush()?;
    Ok(if result.is_ok() { exit::OK } else { exit::INVALID })
}

fn split_kv<'a>(arg: &'a str, flag: &str) -> Result<(&'a str, &'a str)> {
    match arg.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k, v)),
        _ => bail!("{flag} {arg:?}: expected KEY=VALUE with a non-empty KEY"),
    }
}

fn context(a: &ContextArgs) -> Result<MapContext> {
    let mut ctx = MapContext::new();
    for kv in &a.ctx {
        let (k, v) = split_kv(kv, "--ctx")?;
        ctx.insert(k, OwnedValue::Binary(v.as_bytes().to_vec()));
    }
    for kv in &a.ctx_int {
        let (k, v) = split_kv(kv, "--ctx-int")?;
        let n = OwnedValue::parse_integer(v).with_context(|| format!("--ctx-int {kv:?}: {v:?} is not an integer"))?;
        ctx.insert(k, n);
    }
    for kv in &a.ctx_atom {
        let (k, v) = split_kv(kv, "--ctx-atom")?;
        if v.chars().count() > 255 {
            bail!("--ctx-atom {k}: atoms hold at most 255 characters");
        }
        ctx.insert(k, OwnedValue::Atom(v.to_owned()));
    }
    Ok(ctx)
}

fn clock_at(at: Option<&str>) -> Result<Arc<dyn Clock>> {
    Ok(match at {
        Some(t) => {
            let t = parse_time(t).map_err(|e| anyhow::anyhow!("--at: {e}"))?;
            Arc::new(ManualClock::new(unix_ms(t)))
        }
        None => Arc::new(SystemClock),
    })
}

fn engine(file: &Path, env: &str, at: Option<&str>, env_overrides: bool) -> Result<Engine> {
    let config = load(file)?;
    let overrides = if env_overrides {
        EnvOverrides::from_env()?
    } else {
        EnvOverrides::default()
    };
    Ok(Engine::builder()
        .environment(env)
        .clock(clock_at(at)?)
        .env_overrides(overrides)
        .build(config))
}

fn eval(a: EvalArgs) -> Result<u8> {
    let c = &a.context;
    let engine = engine(&a.file, &c.env, c.at.as_deref(), !c.no_env_overrides)?;
    if a.batch {
        let stdin = std::io::stdin().lock();
        let summary = batch::run(&engine.snapshot(), stdin, out())?;
        if summary.errors > 0 {
            eprintln!(
                "{} line(s) could not be evaluated (see {{\"line\": N, \"error\": ...}} in the output)",
                summary.errors
            );
            return Ok(exit::INVALID);
        }
        return Ok(exit::OK);
    }
    let flag = a.flag.as_deref().unwrap_or_default();
    let ctx = context(c)?;
    if a.details {
        let d = engine.details(flag, &ctx);
        let mut o = out();
        if c.json {
            writeln!(o, "{}", serde_json::to_string(&d)?)?;
        } else {
            let value = d.value.as_ref().map_or("(none)".to_owned(), ToString::to_string);
            write!(o, "{flag}: value {value}")?;
            if let Some(v) = &d.variant {
                write!(o, ", variant {v:?}")?;
            }
            write!(o, ", reason {}", d.reason.as_str())?;
            if let (Some(code), Some(msg)) = (d.error_code, &d.error_message) {
                write!(o, " ({}: {msg})", code.as_str())?;
            }
            writeln!(o, "; enabled={} ({})", d.evaluation.enabled, d.evaluation.reason)?;
        }
        o.flush()?;
        return Ok(exit::OK);
    }
    let e = engine.evaluate(flag, &ctx);
    let mut o = out();
    if c.json {
        writeln!(
            o,
            "{}",
            json!({"flag": flag, "environment": c.env, "enabled": e.enabled, "reason": e.reason.code(), "detail": e.reason})
        )?;
    } else {
        writeln!(o, "{flag}: {} ({})", e.enabled, e.reason)?;
    }
    o.flush()?;
    if e.reason == Reason::UnknownFlag {
        eprintln!(
            "warning: {flag:?} is not in {} (unknown flags evaluate to false)",
            a.file.display()
        );
    }
    Ok(exit::OK)
}

fn explain(a: ExplainArgs) -> Result<u8> {
    let c = &a.context;
    let engine = engine(&a.file, &c.env, c.at.as_deref(), !c.no_env_overrides)?;
    let ctx = context(c)?;
    let x = engine.explain(&a.flag, &ctx);
    let mut o = out();
    if c.json {
        serde_json::to_writer_pretty(&mut o, &x)?;
        writeln!(o)?;
    } else {
        write!(o, "{x}")?;
    }
    o.flush()?;
    Ok(exit::OK)
}

fn list(a: ListArgs) -> Result<u8> {
    let config = load(&a.file)?;
    let envs = if a.envs.is_empty() {
        erlmcp_rollout::flags::environments_named(&config)
    } else {
        a.envs.clone()
    };
    let clock = clock_at(a.at.as_deref())?;
    let table = erlmcp_rollout::flags::state_table(&config, &envs, clock);
    let mut o = out();
    if a.json {
        serde_json::to_writer_pretty(&mut o, &table)?;
        writeln!(o)?;
    } else {
        let width = table.iter().map(|r| r.flag.len()).max().unwrap_or(4).max(4);
        write!(o, "{:<width$}", "flag")?;
        for e in &envs {
            write!(o, "  {e:<18}")?;
        }
        writeln!(o)?;
        for row in &table {
            write!(o, "{:<width$}", row.flag)?;
            for e in &envs {
                let s = row.environments.get(e).map(String::as_str).unwrap_or("?");
                write!(o, "  {s:<18}")?;
            }
            writeln!(o)?;
        }
    }
    o.flush()?;
    Ok(exit::OK)
}

fn plan_cmd(a: PlanArgs) -> Result<u8> {
    let start = parse_time(&a.start).map_err(|e| anyhow::anyhow!("--start: {e}"))?;
    let bytes = std::fs::read(&a.plan).with_context(|| format!("cannot read {}", a.plan.display()))?;
    let plan = plan::Plan::from_json(&bytes, start).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a valid week plan:\n  {}",
            a.plan.display(),
            problems_text(&e)
        )
    })?;
    if let (Some(config_path), Some(output)) = (&a.config, &a.output) {
        let mut config = load(config_path)?;
        plan.apply_to(&mut config).map_err(|p| {
            let text: Vec<String> = p.iter().map(ToString::to_string).collect();
            anyhow::anyhow!(
                "cannot attach the plan to {}:\n  {}",
                config_path.display(),
                text.join("\n  ")
            )
        })?;
        let text = config.to_json_pretty();
        // Never write a config that would not load.
        FlagsConfig::from_json(text.as_bytes())
            .map_err(|e| anyhow::anyhow!("internal: merged config is invalid: {e}"))?;
        write_atomically(output, text.as_bytes())?;
        eprintln!(
            "wrote {} with schedules for {} flag(s)",
            output.display(),
            plan.schedules.len()
        );
    }
    let rows = plan.timeline();
    let mut o = out();
    if a.json {
        serde_json::to_writer_pretty(
            &mut o,
            &json!({"start": erlmcp_rollout::flags::format_time(start), "schedules": plan.schedules, "timeline": rows}),
        )?;
        writeln!(o)?;
    } else {
        write!(o, "{}", plan::render_timeline(&rows))?;
    }
    o.flush()?;
    Ok(exit::OK)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile_in(dir, path)?;
    tmp.1.write_all(bytes)?;
    tmp.1.sync_all()?;
    std::fs::rename(&tmp.0, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn tempfile_in(dir: &Path, target: &Path) -> Result<(PathBuf, std::fs::File)> {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    Ok((tmp, f))
}

fn matrix_cmd(a: MatrixArgs) -> Result<u8> {
    let config = load(&a.file)?;
    let m = matrix::matrix(&config);
    let mut o = out();
    if a.github_output {
        writeln!(o, "matrix={}", serde_json::to_string(&m)?)?;
    } else if a.json {
        writeln!(o, "{}", serde_json::to_string(&m)?)?;
    } else {
        for s in &m.include {
            writeln!(o, "{:<12} ERLMCP_FEATURE_FLAGS={}", s.name, s.erlmcp_feature_flags)?;
        }
    }
    o.flush()?;
    Ok(exit::OK)
}
