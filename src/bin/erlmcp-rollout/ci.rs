//! `erlmcp-rollout ci ...`

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use erlmcp_rollout::deploy::ci_scope::{detect, ScopeConfig};
use serde_json::json;

use crate::exit;

const SCOPE_EXIT_CODES: &str = "\
Exit codes:
   0  scope printed
   2  bad command-line usage
  13  git failed (not a git repository, unknown revision, no merge base)";

#[derive(Subcommand)]
pub enum Command {
    /// Which tests a change needs: smoke, quick (changed apps) or full.
    #[command(after_help = SCOPE_EXIT_CODES)]
    Scope(ScopeArgs),
}

#[derive(Args)]
pub struct ScopeArgs {
    /// The base revision (e.g. origin/main); files are diffed as BASE...HEAD.
    #[arg(long)]
    base: String,
    /// The revision under test.
    #[arg(long, default_value = "HEAD")]
    head: String,
    /// The repository.
    #[arg(long, value_name = "DIR", default_value = ".")]
    repo: PathBuf,
    /// A path that forces the full suite (exact, or a directory ending in /). Repeatable;
    /// replaces the default four erlmcp_core modules.
    #[arg(long = "critical-path", value_name = "PATH")]
    critical_paths: Vec<String>,
    /// Machine-readable output: {"scope", "apps", "test_cmd", ...}.
    #[arg(long, conflicts_with = "github_output")]
    json: bool,
    /// Print key=value lines for $GITHUB_OUTPUT (scope, apps, apps_json, test_cmd).
    #[arg(long)]
    github_output: bool,
}

pub fn run(cmd: Command) -> Result<u8> {
    match cmd {
        Command::Scope(a) => scope(a),
    }
}

fn scope(a: ScopeArgs) -> Result<u8> {
    let mut cfg = ScopeConfig::default();
    if !a.critical_paths.is_empty() {
        cfg.critical_paths = a.critical_paths.clone();
    }
    let r = detect(&a.repo, &a.base, &a.head, &cfg)?;
    let mut o = BufWriter::new(std::io::stdout().lock());
    if a.github_output {
        writeln!(o, "scope={}", r.scope.as_str())?;
        writeln!(o, "apps={}", r.apps.join(","))?;
        writeln!(o, "apps_json={}", serde_json::to_string(&r.apps)?)?;
        writeln!(o, "test_cmd={}", r.test_cmd)?;
    } else if a.json {
        let doc = json!({
            "scope": r.scope,
            "apps": r.apps,
            "test_cmd": r.test_cmd,
            "reasons": r.reasons,
            "changed_files": r.changed_files,
        });
        writeln!(o, "{doc}")?;
    } else {
        writeln!(o, "scope: {}", r.scope.as_str())?;
        writeln!(
            o,
            "apps: {}",
            if r.apps.is_empty() {
                "-".into()
            } else {
                r.apps.join(", ")
            }
        )?;
        writeln!(o, "test_cmd: {}", r.test_cmd)?;
        writeln!(o, "because:")?;
        for reason in &r.reasons {
            writeln!(o, "  {reason}")?;
        }
        writeln!(o, "{} changed file(s)", r.changed_files.len())?;
    }
    o.flush()?;
    Ok(exit::OK)
}
