//! `erlmcp-rollout`: the operator CLI. Each command is a thin layer over a
//! library function of the `erlmcp_rollout` crate.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod flags;

/// Exit codes shared by every command.
pub mod exit {
    /// Success (for `flags check`: the config is valid).
    pub const OK: u8 = 0;
    /// The input was invalid (config problems, bad context, bad batch lines)
    /// or an operation failed; the message says what and where.
    pub const INVALID: u8 = 1;
    /// Bad command-line usage (clap's own code).
    pub const USAGE: u8 = 2;
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Flags(cmd) => flags::run(cmd),
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
            ExitCode::from(exit::INVALID)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}
