//! `erlmcp-rollout canary ...`

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Args, Subcommand};
use erlmcp_rollout::deploy::plan::{render_matrix, render_ramp, Ramp, ROLLBACK_MATRIX};
use erlmcp_rollout::deploy::prometheus::{self, Client, Collected, Source, Templates};
use erlmcp_rollout::deploy::{decide, CanaryMetrics, Decision, Thresholds};
use erlmcp_rollout::flags::parse_time;
use serde_json::json;

use crate::access::PrometheusAccessArgs;
use crate::exit;

const DECIDE_EXIT_CODES: &str = "\
Exit codes:
   0  promote
  10  continue (too little traffic, or no data: never a promote)
  11  rollback
   1  invalid input (malformed metrics file, bad thresholds or queries)
   2  bad command-line usage
  12  Prometheus failed (unreachable, query rejected with HTTP 400/422/503, unexpected answer)";

#[derive(Subcommand)]
pub enum Command {
    /// Decide promote, continue or rollback from canary vs stable metrics.
    #[command(after_help = DECIDE_EXIT_CODES)]
    Decide(Box<DecideArgs>),
    /// Print the ramp (traffic stages and observation periods) and the rollback matrix.
    Plan(PlanArgs),
}

#[derive(Args)]
pub struct DecideArgs {
    /// Metrics file: {"canary": {...}, "stable": {...}} (see docs/deploy.md).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "prometheus",
        conflicts_with = "prometheus"
    )]
    metrics: Option<PathBuf>,
    /// Prometheus base URL, e.g. http://127.0.0.1:9090 or https://prometheus.internal
    /// (then see the Prometheus connection options).
    #[arg(long, value_name = "URL")]
    prometheus: Option<String>,
    /// Range for rates and increases ($window in the queries).
    #[arg(long, default_value = "5m")]
    window: String,
    /// Evaluate at this time (RFC 3339, YYYY-MM-DD or unix seconds) instead of now.
    #[arg(long, value_name = "TIME")]
    at: Option<String>,
    /// Label value of the canary ($deployment).
    #[arg(long, default_value = "canary")]
    canary_label: String,
    /// Label value of stable ($deployment).
    #[arg(long, default_value = "stable")]
    stable_label: String,
    /// Replace a query: NAME=PROMQL, NAME one of requests, error_rate, latency_p95_ms,
    /// latency_p99_ms, cpu, memory, restarts, up, last_sample (up= and last_sample= disable
    /// those checks). Repeatable.
    #[arg(long = "query", value_name = "NAME=PROMQL")]
    queries: Vec<String>,
    /// Queries from a JSON file {"requests": PROMQL, ...} (applied before --query).
    #[arg(long, value_name = "FILE")]
    queries_file: Option<PathBuf>,
    /// A side whose newest sample is older than this many seconds is stale (no data).
    #[arg(long, default_value_t = 120.0, value_name = "SECONDS")]
    max_sample_age: f64,
    /// Ask Prometheus to abort each query after this duration (e.g. 10s); it answers 503.
    #[arg(long, value_name = "DURATION")]
    query_timeout: Option<String>,
    /// HTTP timeout per request, in seconds.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    http_timeout: f64,
    /// Thresholds from a JSON file (partial; unknown keys rejected).
    #[arg(long, value_name = "FILE")]
    thresholds: Option<PathBuf>,
    /// Set one threshold: NAME=VALUE (e.g. max_error_rate=0.002, on_no_data=rollback). Repeatable.
    #[arg(long = "threshold", value_name = "NAME=VALUE")]
    threshold: Vec<String>,
    /// Machine-readable output.
    #[arg(long, conflicts_with = "github_output")]
    json: bool,
    /// Print key=value lines for $GITHUB_OUTPUT (decision, triggers, warnings).
    #[arg(long)]
    github_output: bool,
    #[command(flatten)]
    access: PrometheusAccessArgs,
}

#[derive(Args)]
pub struct PlanArgs {
    /// The ramp as PERCENT:MINUTES stages.
    #[arg(long, default_value = "5:60,25:30,50:30,100:60")]
    ramp: String,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: Command) -> Result<u8> {
    match cmd {
        Command::Decide(a) => decide_cmd(*a),
        Command::Plan(a) => plan_cmd(a),
    }
}

fn out() -> BufWriter<std::io::StdoutLock<'static>> {
    BufWriter::new(std::io::stdout().lock())
}

fn split_kv<'a>(arg: &'a str, flag: &str) -> Result<(&'a str, &'a str)> {
    match arg.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.trim(), v)),
        _ => anyhow::bail!("{flag} {arg:?}: expected NAME=VALUE"),
    }
}

fn thresholds(a: &DecideArgs) -> Result<Thresholds> {
    let mut t = match &a.thresholds {
        Some(path) => Thresholds::from_file(path)?,
        None => Thresholds::default(),
    };
    for kv in &a.threshold {
        let (k, v) = split_kv(kv, "--threshold")?;
        t.set(k, v)?;
    }
    Ok(t)
}

/// RFC 3339, a date, or unix seconds.
fn parse_at(text: &str) -> Result<f64> {
    if let Ok(secs) = text.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok(secs);
        }
    }
    let t = parse_time(text).map_err(|e| anyhow::anyhow!("--at: {e}, or unix seconds"))?;
    Ok(t.unix_timestamp_nanos() as f64 / 1e9)
}

fn source(a: &DecideArgs) -> Result<Source> {
    let mut templates = match &a.queries_file {
        Some(path) => {
            let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            serde_json::from_slice::<Templates>(&bytes)
                .with_context(|| format!("{} is not a queries file", path.display()))?
        }
        None => Templates::default(),
    };
    for kv in &a.queries {
        let (k, v) = split_kv(kv, "--query")?;
        templates.set(k, v)?;
    }
    Ok(Source {
        templates,
        canary: a.canary_label.clone(),
        stable: a.stable_label.clone(),
        window: a.window.clone(),
        max_sample_age_seconds: a.max_sample_age,
    })
}

fn decide_cmd(a: DecideArgs) -> Result<u8> {
    if a.metrics.is_some() {
        let prometheus_only = [
            ("--at", a.at.is_some()),
            ("--query", !a.queries.is_empty()),
            ("--queries-file", a.queries_file.is_some()),
            ("--query-timeout", a.query_timeout.is_some()),
            (
                "--prometheus-cacert, --prometheus-token-file, --prometheus-user",
                a.access.any(),
            ),
        ];
        if let Some((flag, _)) = prometheus_only.iter().find(|(_, set)| *set) {
            anyhow::bail!("{flag} applies to --prometheus, not to --metrics");
        }
    }
    let t = thresholds(&a)?;
    let (metrics, collected, origin) = match (&a.metrics, &a.prometheus) {
        (Some(path), _) => {
            let m = CanaryMetrics::from_file(path).with_context(|| format!("metrics file {}", path.display()))?;
            (m, None, path.display().to_string())
        }
        (None, Some(url)) => {
            let src = source(&a)?;
            let at = a.at.as_deref().map(parse_at).transpose()?;
            if !(a.http_timeout.is_finite() && a.http_timeout > 0.0) {
                anyhow::bail!("--http-timeout must be a positive number of seconds");
            }
            let options = a.access.client_options(Some(Duration::from_secs_f64(a.http_timeout)));
            let client = Client::with_options(url, options)?.query_timeout(a.query_timeout.clone());
            let c = prometheus::collect(&client, &src, at)?;
            (c.metrics, Some(c), url.clone())
        }
        (None, None) => anyhow::bail!("give --metrics FILE or --prometheus URL"),
    };
    let verdict = decide(&metrics, &t);
    let mut o = out();
    if a.github_output {
        let ids: Vec<&str> = verdict.triggers.iter().map(|t| t.id.as_str()).collect();
        writeln!(o, "decision={}", verdict.decision)?;
        writeln!(o, "triggers={}", ids.join(","))?;
        writeln!(o, "warnings={}", verdict.warnings.len())?;
    } else if a.json {
        let source = match &collected {
            Some(Collected { at, queries, .. }) => json!({"prometheus": origin, "at": at, "queries": queries}),
            None => json!({"metrics_file": origin}),
        };
        let mut doc = serde_json::to_value(&verdict)?;
        if let Some(map) = doc.as_object_mut() {
            map.insert("metrics".into(), serde_json::to_value(metrics)?);
            map.insert("thresholds".into(), serde_json::to_value(&t)?);
            map.insert("source".into(), source);
        }
        serde_json::to_writer_pretty(&mut o, &doc)?;
        writeln!(o)?;
    } else {
        match &collected {
            Some(c) => writeln!(o, "source: {origin} at {}", c.at)?,
            None => writeln!(o, "source: {origin}")?,
        }
        write!(o, "{}", verdict.render())?;
    }
    o.flush()?;
    Ok(match verdict.decision {
        Decision::Promote => exit::PROMOTE,
        Decision::Continue => exit::CONTINUE,
        Decision::Rollback => exit::ROLLBACK,
    })
}

fn plan_cmd(a: PlanArgs) -> Result<u8> {
    let ramp = Ramp::parse(&a.ramp).context("--ramp")?;
    let mut o = out();
    if a.json {
        let doc = json!({
            "ramp": ramp.schedule(),
            "total_minutes": ramp.total_minutes(),
            "rollback_matrix": ROLLBACK_MATRIX,
        });
        serde_json::to_writer_pretty(&mut o, &doc)?;
        writeln!(o)?;
    } else {
        writeln!(o, "ramp:")?;
        write!(o, "{}", render_ramp(&ramp))?;
        writeln!(o, "\nrollback decision matrix:")?;
        write!(o, "{}", render_matrix(&ROLLBACK_MATRIX))?;
    }
    o.flush()?;
    Ok(exit::OK)
}
