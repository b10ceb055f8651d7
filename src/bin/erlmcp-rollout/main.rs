//! `erlmcp-rollout`: the operator CLI. Each command is a thin layer over a
//! library function of the `erlmcp_rollout` crate.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod access;
mod canary;
mod ci;
mod flags;
mod rollout;
mod sessions;

/// Exit codes shared by every command.
pub mod exit {
    /// Success (for `flags check`: the config is valid).
    pub const OK: u8 = 0;
    /// The input was invalid (config problems, bad context, bad batch lines)
    /// or an operation failed; the message says what and where.
    pub const INVALID: u8 = 1;
    /// Bad command-line usage (clap's own code).
    pub const USAGE: u8 = 2;
    /// `canary decide`: keep observing (too little traffic, or no data).
    pub const CONTINUE: u8 = 10;
    /// `canary decide`: roll back.
    pub const ROLLBACK: u8 = 11;
    /// The metrics source failed: Prometheus unreachable, a rejected or
    /// failed query (HTTP 400/422/503), an unexpected answer. No verdict.
    pub const SOURCE: u8 = 12;
    /// `ci scope`: git failed (not a repository, unknown revision, no merge
    /// base, git missing).
    pub const GIT: u8 = 13;
    /// `sessions get`: no record is stored under the id.
    pub const NOT_FOUND: u8 = 14;
    /// `sessions phase advance|rollback`: a gate refused the move, or the etcd phase changed
    /// meanwhile; nothing changed.
    pub const GATE: u8 = 15;
    /// `sessions verify` / `migrate --verify`: the stores differ.
    pub const DIFFERENCES: u8 = 16;
    /// `rollout run`: the run was aborted by `rollout abort` (rolled back).
    pub const ABORTED: u8 = 12;
    /// `canary decide`: promote (the same as [`OK`]).
    pub const PROMOTE: u8 = OK;
}

/// Rollout toolkit for erlmcp: feature flags, session stores, migration and
/// deployment decisions.
#[derive(Parser)]
#[command(name = "erlmcp-rollout", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate, evaluate and plan feature flags.
    #[command(subcommand)]
    Flags(flags::Command),
    /// Canary verdicts from Prometheus or a metrics file; the ramp and rollback matrix.
    #[command(subcommand)]
    Canary(canary::Command),
    /// CI helpers: which tests a change needs.
    #[command(subcommand)]
    Ci(ci::Command),
    /// Session stores: inspect, migrate, verify, migration phases.
    #[command(subcommand)]
    Sessions(sessions::Command),
    /// Closed-loop progressive delivery of a flag: run the ramp, judge every window, roll back.
    #[command(subcommand)]
    Rollout(rollout::Command),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Flags(cmd) => flags::run(cmd),
        Command::Canary(cmd) => canary::run(cmd),
        Command::Ci(cmd) => ci::run(cmd),
        Command::Sessions(cmd) => sessions::run(cmd),
        Command::Rollout(cmd) => rollout::run_cmd(cmd),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if is_broken_pipe(&e) {
                // `erlmcp-rollout ... | head` is not an error.
                return ExitCode::from(exit::OK);
            }
            let mut stderr = std::io::stderr().lock();
            let _ = writeln!(stderr, "error: {e}");
            for cause in e.chain().skip(1) {
                let _ = writeln!(stderr, "  caused by: {cause}");
            }
            ExitCode::from(error_code(&e))
        }
    }
}

/// The exit code for an error: [`exit::SOURCE`] when Prometheus failed,
/// [`exit::GIT`] when git did, [`exit::INVALID`] otherwise.
fn error_code(e: &anyhow::Error) -> u8 {
    use erlmcp_rollout::deploy::{PrometheusError, ScopeError};
    for cause in e.chain() {
        if let Some(p) = cause.downcast_ref::<PrometheusError>() {
            return match p {
                PrometheusError::BadUrl { .. } | PrometheusError::Config(_) | PrometheusError::File { .. } => {
                    exit::INVALID
                }
                _ => exit::SOURCE,
            };
        }
        if cause.downcast_ref::<ScopeError>().is_some() {
            return exit::GIT;
        }
        if let Some(
            erlmcp_rollout::migrate::MigrateError::Gate(_) | erlmcp_rollout::migrate::MigrateError::Conflict { .. },
        ) = cause.downcast_ref()
        {
            return exit::GATE;
        }
    }
    exit::INVALID
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}
