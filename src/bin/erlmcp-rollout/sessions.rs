//! `erlmcp-rollout sessions ...`: inspect session stores (and migrate between them).

use std::io::{BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::{Args, Subcommand};
use erlmcp_rollout::flags::format_time;
use erlmcp_rollout::migrate::backfill::{backfill, BackfillConfig, BackfillProgress};
use erlmcp_rollout::migrate::dual::{Migrator, MigratorConfig};
use erlmcp_rollout::migrate::etcd_phase::EtcdPhaseStore;
use erlmcp_rollout::migrate::outbox::Outbox;
use erlmcp_rollout::migrate::phase::{FilePhaseStore, Phase, PhaseState, PhaseStore};
use erlmcp_rollout::migrate::verify::{repair, verify, TargetOnly, VerifyConfig, VerifyReport};
use erlmcp_rollout::session::uri::{etcd_prefix, Endpoint, StoreUri};
use erlmcp_rollout::session::{
    codec, stats, Clock, EtcdOptions, Session, SessionId, StoreOptions, SystemClock, Timeout, Visibility,
};
use serde_json::{json, Value};

use crate::access::EtcdAccessArgs;
use crate::exit;

const STORE_HELP: &str = "\
Stores are URIs: memory:, disk:PATH (a redb file), etcd:HOST:PORT[,HOST:PORT...][/PREFIX].
Session ids are text, or hex:HEX for any bytes.";

const READ_EXIT_CODES: &str = "\
Stores are URIs: memory:, disk:PATH (a redb file), etcd:HOST:PORT[,HOST:PORT...][/PREFIX].
Session ids are text, or hex:HEX for any bytes.

Exit codes:
   0  done
   1  the store could not be opened or read (the message says which and why)
   2  bad command-line usage (including a malformed store URI)
  14  get: no record is stored under the id";

const MIGRATE_EXIT_CODES: &str = "\
Stores are URIs: memory:, disk:PATH (a redb file), etcd:HOST:PORT[,HOST:PORT...][/PREFIX].
--state is a phase file, or etcd:HOST:PORT[,HOST:PORT...][/PREFIX] for the phase kept in etcd
under PREFIX/phase (default prefix erlmcp/migration/), with each node's ack under PREFIX/acks/.

Exit codes:
   0  done (and, with --verify / after --repair, the stores are equal)
   1  a store, checkpoint, outbox, phase file or etcd phase store failed (the message says
      which and why)
   2  bad command-line usage (including a malformed store URI)
  15  phase advance/rollback refused by a gate, or the etcd phase changed meanwhile
      (the reason is printed; nothing changed)
  16  verification found differences (listed)";

#[derive(Subcommand)]
pub enum Command {
    /// Count live, expired and tombstoned records and their bytes.
    #[command(after_help = READ_EXIT_CODES)]
    Stats(StatsArgs),
    /// Show one stored record (any state) with its version and times.
    #[command(after_help = READ_EXIT_CODES)]
    Get(GetArgs),
    /// List sessions in key order, a page at a time.
    #[command(after_help = READ_EXIT_CODES)]
    List(ListArgs),
    /// Backfill one store into another (resumable, rate-limited, with progress).
    #[command(after_help = MIGRATE_EXIT_CODES)]
    Migrate(MigrateArgs),
    /// Compare two stores (Merkle-style digests per key range); optionally repair.
    #[command(after_help = MIGRATE_EXIT_CODES)]
    Verify(VerifyArgs),
    /// Show or change the dual-write migration phase.
    #[command(subcommand)]
    Phase(PhaseCommand),
}

#[derive(Args)]
pub struct MigrateArgs {
    /// The store to copy from (must exist).
    #[arg(long, value_name = "STORE")]
    from: StoreUri,
    /// The store to copy to (created if absent).
    #[arg(long, value_name = "STORE")]
    to: StoreUri,
    /// Keep progress in this file (JSON), updated durably after every chunk.
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<PathBuf>,
    /// Continue from the checkpoint (requires --checkpoint).
    #[arg(long, requires = "checkpoint")]
    resume: bool,
    /// At most N records per second.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    rate: Option<u64>,
    /// Records per chunk (one read, one write-if-newer batch, one checkpoint).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    chunk: u64,
    /// Verify the stores after copying (exit 16 when they differ).
    #[arg(long)]
    verify: bool,
    /// Machine-readable result on stdout (progress stays on stderr).
    #[arg(long)]
    json: bool,
    /// No progress on stderr.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    etcd: EtcdAccessArgs,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// The reference store (must exist).
    #[arg(long, value_name = "STORE")]
    from: StoreUri,
    /// The store checked against it (must exist).
    #[arg(long, value_name = "STORE")]
    to: StoreUri,
    /// Re-copy differing keys from --from (write-if-newer), then verify again.
    #[arg(long)]
    repair: bool,
    /// With --repair: delete keys only --to has (default: report them).
    #[arg(long, requires = "repair")]
    delete_target_only: bool,
    /// Source keys per compared range.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    leaf: u64,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    etcd: EtcdAccessArgs,
}

#[derive(Subcommand)]
pub enum PhaseCommand {
    /// Print the phase, the reverse-outbox setting and the history.
    #[command(after_help = MIGRATE_EXIT_CODES)]
    Show(PhaseShowArgs),
    /// Force a phase, bypassing the gates (recorded as "force" in the history). The gated
    /// move is `advance`/`rollback` here and `step_to/2` in Erlang. `set` is the old name.
    #[command(after_help = MIGRATE_EXIT_CODES, alias = "set")]
    Force(PhaseForceArgs),
    /// Move one phase forward if the gates pass: outbox drained, stores verified.
    #[command(after_help = MIGRATE_EXIT_CODES)]
    Advance(PhaseMoveArgs),
    /// Move one phase back (phase2 -> phase1 -> off always; phase3 only with a drained reverse outbox).
    #[command(after_help = MIGRATE_EXIT_CODES)]
    Rollback(PhaseMoveArgs),
}

#[derive(Args)]
pub struct PhaseShowArgs {
    /// The phase file, or etcd:HOST:PORT,...[/PREFIX] (then the nodes' acks are shown too).
    #[arg(long, value_name = "FILE|ETCD")]
    state: PhaseLocation,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    etcd: EtcdAccessArgs,
}

#[derive(Args)]
pub struct PhaseForceArgs {
    /// off, phase1, phase2, phase3 or cleanup.
    phase: Phase,
    /// The phase file (created if absent), or etcd:HOST:PORT,...[/PREFIX].
    #[arg(long, value_name = "FILE|ETCD")]
    state: PhaseLocation,
    /// Also set the phase-3 reverse outbox on or off.
    #[arg(long, value_name = "BOOL")]
    reverse_outbox: Option<bool>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    etcd: EtcdAccessArgs,
}

#[derive(Args)]
pub struct PhaseMoveArgs {
    /// The phase file (created in phase off if absent), or etcd:HOST:PORT,...[/PREFIX].
    #[arg(long, value_name = "FILE|ETCD")]
    state: PhaseLocation,
    /// With an etcd --state: refuse to advance until every one of these nodes has
    /// acknowledged the current phase (comma-separated node ids).
    #[arg(long, value_name = "NODES", value_delimiter = ',')]
    expect_nodes: Vec<String>,
    /// The primary (old) store.
    #[arg(long, value_name = "STORE")]
    from: StoreUri,
    /// The secondary (new) store.
    #[arg(long, value_name = "STORE")]
    to: StoreUri,
    /// The migrator's outbox file (redb); it is drained into the stores first. The
    /// service that owns it must be stopped (redb locks the file).
    #[arg(long, value_name = "FILE")]
    outbox: PathBuf,
    /// How long draining may take, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    etcd: EtcdAccessArgs,
}

#[derive(Args)]
pub struct StatsArgs {
    /// The store.
    #[arg(value_name = "STORE", long_help = STORE_HELP)]
    store: StoreUri,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    etcd: EtcdAccessArgs,
}

#[derive(Args)]
pub struct GetArgs {
    /// The store.
    #[arg(value_name = "STORE")]
    store: StoreUri,
    /// The session id (text, or hex:HEX).
    #[arg(value_name = "ID", value_parser = parse_id)]
    id: SessionId,
    /// Show the metadata as hex instead of escaped text.
    #[arg(long)]
    hex: bool,
    /// Machine-readable output (metadata as hex).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    etcd: EtcdAccessArgs,
}

#[derive(Args)]
pub struct ListArgs {
    /// The store.
    #[arg(value_name = "STORE")]
    store: StoreUri,
    /// At most this many sessions.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    limit: u64,
    /// Start after this id (text, or hex:HEX); the previous page's `next`.
    #[arg(long, value_name = "ID", value_parser = parse_id)]
    after: Option<SessionId>,
    /// Every stored record: tombstones and expired sessions too.
    #[arg(long)]
    raw: bool,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    etcd: EtcdAccessArgs,
}

/// A session id argument: text, or `hex:` followed by hex digits.
pub fn parse_id(text: &str) -> Result<SessionId, String> {
    let bytes = match text.strip_prefix("hex:") {
        Some(h) => codec::from_hex(h)?,
        None => text.as_bytes().to_vec(),
    };
    SessionId::new(bytes).map_err(|e| e.to_string())
}

/// How an id is written back so that [`parse_id`] reads it: text when it is printable
/// UTF-8 without a `hex:` prefix, else `hex:...`.
pub fn id_arg(id: &SessionId) -> String {
    match std::str::from_utf8(id.as_bytes()) {
        Ok(s) if !s.starts_with("hex:") && s.chars().all(|c| !c.is_control() && !c.is_whitespace()) => s.to_owned(),
        _ => format!("hex:{}", codec::to_hex(id.as_bytes())),
    }
}

pub fn run(cmd: Command) -> Result<u8> {
    match cmd {
        Command::Stats(a) => stats_cmd(a),
        Command::Get(a) => get(a),
        Command::List(a) => list(a),
        Command::Migrate(a) => migrate(a),
        Command::Verify(a) => verify_cmd(a),
        Command::Phase(PhaseCommand::Show(a)) => phase_show(a),
        Command::Phase(PhaseCommand::Force(a)) => phase_force(a),
        Command::Phase(PhaseCommand::Advance(a)) => phase_move(a, true),
        Command::Phase(PhaseCommand::Rollback(a)) => phase_move(a, false),
    }
}

/// Opens a store that must already exist (a read must not create an empty file).
pub fn open_existing(uri: &StoreUri, etcd: &EtcdAccessArgs) -> Result<Box<dyn erlmcp_rollout::session::Store>> {
    if let StoreUri::Disk(path) = uri {
        if !path.exists() {
            anyhow::bail!("store {uri}: no such file {}", path.display());
        }
    }
    uri.open_with(StoreOptions::default(), &etcd.security())
        .with_context(|| format!("opening store {uri}"))
}

fn state(s: &Session, now: i64) -> &'static str {
    if s.tombstone {
        "tombstone"
    } else if s.is_expired(now) {
        "expired"
    } else {
        "live"
    }
}

fn time_text(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map(format_time)
        .unwrap_or_else(|_| "out of range".into())
}

fn timeout_json(t: Timeout) -> Value {
    match t {
        Timeout::Ms(ms) => json!(ms.get()),
        Timeout::Infinity => json!("infinity"),
    }
}

fn session_json(s: &Session, now: i64, with_metadata: bool) -> Value {
    let mut v = json!({
        "id": s.id.as_bytes().escape_ascii().to_string(),
        "id_hex": codec::to_hex(s.id.as_bytes()),
        "state": state(s, now),
        "version": s.version,
        "tombstone": s.tombstone,
        "created_at": s.created_at,
        "last_accessed": s.last_accessed,
        "timeout_ms": timeout_json(s.timeout),
        "metadata_len": s.metadata.len(),
    });
    if with_metadata {
        v["metadata_hex"] = json!(codec::to_hex(&s.metadata));
    }
    v
}

fn stats_cmd(a: StatsArgs) -> Result<u8> {
    let store = open_existing(&a.store, &a.etcd)?;
    let now = SystemClock.now_unix_ms();
    let st = stats(store.as_ref(), now, 10_000).with_context(|| format!("scanning store {}", a.store))?;
    let mut o = BufWriter::new(std::io::stdout().lock());
    if a.json {
        let mut v = serde_json::to_value(st)?;
        v["store"] = json!(a.store.to_string());
        writeln!(o, "{v}")?;
    } else {
        writeln!(o, "store: {}", a.store)?;
        writeln!(
            o,
            "records: {} (live {}, expired {}, tombstones {})",
            st.records, st.live, st.expired, st.tombstones
        )?;
        writeln!(o, "bytes: {} (encoded records)", st.bytes)?;
    }
    o.flush()?;
    Ok(exit::OK)
}

fn get(a: GetArgs) -> Result<u8> {
    let store = open_existing(&a.store, &a.etcd)?;
    let now = SystemClock.now_unix_ms();
    let record = store
        .get_raw(&a.id)
        .with_context(|| format!("reading {} from store {}", a.id, a.store))?;
    let mut o = BufWriter::new(std::io::stdout().lock());
    let Some(s) = record else {
        if a.json {
            writeln!(
                o,
                "{}",
                json!({"found": false, "id_hex": codec::to_hex(a.id.as_bytes())})
            )?;
        } else {
            writeln!(o, "no record stored under {} in {}", a.id, a.store)?;
        }
        o.flush()?;
        return Ok(exit::NOT_FOUND);
    };
    if a.json {
        let mut v = session_json(&s, now, true);
        v["found"] = json!(true);
        writeln!(o, "{v}")?;
    } else {
        writeln!(o, "id: \"{}\"", s.id.as_bytes().escape_ascii())?;
        writeln!(o, "state: {}", state(&s, now))?;
        writeln!(o, "version: {}", s.version)?;
        writeln!(o, "created_at: {} ({})", s.created_at, time_text(s.created_at))?;
        writeln!(o, "last_accessed: {} ({})", s.last_accessed, time_text(s.last_accessed))?;
        match s.timeout {
            Timeout::Ms(ms) => writeln!(o, "timeout_ms: {ms}")?,
            Timeout::Infinity => writeln!(o, "timeout_ms: infinity")?,
        }
        if a.hex {
            writeln!(
                o,
                "metadata ({} bytes, hex): {}",
                s.metadata.len(),
                codec::to_hex(&s.metadata)
            )?;
        } else {
            writeln!(
                o,
                "metadata ({} bytes, escaped): \"{}\"",
                s.metadata.len(),
                s.metadata.escape_ascii()
            )?;
        }
    }
    o.flush()?;
    Ok(exit::OK)
}

fn list(a: ListArgs) -> Result<u8> {
    let store = open_existing(&a.store, &a.etcd)?;
    let now = SystemClock.now_unix_ms();
    let visibility = if a.raw { Visibility::Raw } else { Visibility::Live };
    let limit = usize::try_from(a.limit)?;
    let page = store
        .scan(a.after.as_ref(), limit, visibility)
        .with_context(|| format!("scanning store {}", a.store))?;
    let mut o = BufWriter::new(std::io::stdout().lock());
    if a.json {
        let sessions: Vec<Value> = page.records.iter().map(|s| session_json(s, now, false)).collect();
        let next = page.next.as_ref().map(id_arg);
        writeln!(o, "{}", json!({"sessions": sessions, "next": next}))?;
    } else {
        for s in &page.records {
            writeln!(
                o,
                "{}\tv{}\t{}\tlast_accessed={}",
                id_arg(&s.id),
                s.version,
                state(s, now),
                time_text(s.last_accessed)
            )?;
        }
        if let Some(next) = &page.next {
            writeln!(o, "# more: --after {}", id_arg(next))?;
        }
    }
    o.flush()?;
    Ok(exit::OK)
}

fn hms(d: Duration) -> String {
    let s = d.as_secs();
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn progress_line(p: &BackfillProgress) -> String {
    let of = match p.total {
        Some(t) if t > 0 => format!("/{t} ({:.1}%)", 100.0 * p.scanned as f64 / t as f64),
        Some(t) => format!("/{t}"),
        None => String::new(),
    };
    let eta = p.eta.map_or_else(|| "unknown".to_owned(), hms);
    format!(
        "backfill: {}{of}, {:.0} records/s, ETA {eta}, applied {}, skipped {}",
        p.scanned, p.rate, p.applied, p.skipped
    )
}

/// Progress on stderr: `\r` updates on a terminal, a line every 2 s otherwise.
struct ProgressPrinter {
    tty: bool,
    quiet: bool,
    last: Option<Instant>,
}

impl ProgressPrinter {
    fn show(&mut self, p: &BackfillProgress) {
        if self.quiet {
            return;
        }
        let mut e = std::io::stderr().lock();
        if self.tty {
            let _ = write!(e, "\r\x1b[2K{}", progress_line(p));
            if p.done {
                let _ = writeln!(e);
            }
        } else if p.done || self.last.is_none_or(|t| t.elapsed() >= Duration::from_secs(2)) {
            let _ = writeln!(e, "{}", progress_line(p));
            self.last = Some(Instant::now());
        }
        let _ = e.flush();
    }
}

fn migrate(a: MigrateArgs) -> Result<u8> {
    let source = open_existing(&a.from, &a.etcd)?;
    let target =
        a.to.open_with(StoreOptions::default(), &a.etcd.security())
            .with_context(|| format!("opening store {}", a.to))?;
    let config = BackfillConfig {
        chunk: usize::try_from(a.chunk)?,
        rate: a.rate,
        checkpoint: a.checkpoint.clone(),
        resume: a.resume,
        count_total: true,
        source_label: a.from.to_string(),
        target_label: a.to.to_string(),
        ..Default::default()
    };
    let mut printer = ProgressPrinter {
        tty: std::io::stderr().is_terminal(),
        quiet: a.quiet,
        last: None,
    };
    let done = backfill(source.as_ref(), target.as_ref(), &config, &mut |p| printer.show(p))
        .with_context(|| format!("backfill from {} to {}", a.from, a.to))?;
    let report = if a.verify {
        Some(
            verify(source.as_ref(), target.as_ref(), &VerifyConfig::default())
                .with_context(|| format!("verifying {} against {}", a.to, a.from))?,
        )
    } else {
        None
    };
    let mut o = BufWriter::new(std::io::stdout().lock());
    if a.json {
        writeln!(o, "{}", json!({"backfill": done, "verify": report}))?;
    } else {
        writeln!(
            o,
            "copied {} records from {} to {} ({} written, {} already current) in {:.1} s",
            done.scanned,
            a.from,
            a.to,
            done.applied,
            done.skipped,
            done.elapsed.as_secs_f64()
        )?;
        if let Some(r) = &report {
            write_report(&mut o, r)?;
        }
    }
    o.flush()?;
    Ok(match report {
        Some(r) if !r.is_clean() => exit::DIFFERENCES,
        _ => exit::OK,
    })
}

fn write_report(o: &mut impl Write, r: &VerifyReport) -> Result<()> {
    writeln!(
        o,
        "verify: {} source records, {} target records, {} ranges ({} differing), {} differing key(s)",
        r.source_records, r.target_records, r.ranges, r.differing_ranges, r.difference_count
    )?;
    for d in r.differences.iter().take(20) {
        writeln!(o, "  {}: {}", id_arg(&d.key), serde_json::to_value(&d.kind)?["kind"])?;
    }
    if r.difference_count > 20 {
        writeln!(o, "  ... ({} more; --json lists them)", r.difference_count - 20)?;
    }
    Ok(())
}

fn verify_cmd(a: VerifyArgs) -> Result<u8> {
    let source = open_existing(&a.from, &a.etcd)?;
    let target = open_existing(&a.to, &a.etcd)?;
    let cfg = VerifyConfig {
        leaf: usize::try_from(a.leaf)?,
        ..Default::default()
    };
    let ctx = || format!("verifying {} against {}", a.to, a.from);
    let first = verify(source.as_ref(), target.as_ref(), &cfg).with_context(ctx)?;
    let mut fixed = None;
    let mut last = first.clone();
    if a.repair && !first.is_clean() {
        let mode = if a.delete_target_only {
            TargetOnly::Delete
        } else {
            TargetOnly::Report
        };
        fixed = Some(
            repair(source.as_ref(), target.as_ref(), &first.differences, mode)
                .with_context(|| format!("repairing {} from {}", a.to, a.from))?,
        );
        last = verify(source.as_ref(), target.as_ref(), &cfg).with_context(ctx)?;
    }
    let mut o = BufWriter::new(std::io::stdout().lock());
    if a.json {
        let after = fixed.as_ref().map(|_| &last);
        writeln!(
            o,
            "{}",
            json!({"clean": last.is_clean(), "verify": first, "repair": fixed, "after_repair": after})
        )?;
    } else {
        write_report(&mut o, &first)?;
        if let Some(f) = &fixed {
            writeln!(
                o,
                "repair: {} copied, {} deleted, {} unresolved",
                f.copied,
                f.deleted,
                f.unresolved.len()
            )?;
            for d in f.unresolved.iter().take(20) {
                writeln!(
                    o,
                    "  unresolved {}: {}",
                    id_arg(&d.key),
                    serde_json::to_value(&d.kind)?["kind"]
                )?;
            }
            write_report(&mut o, &last)?;
        }
        writeln!(o, "{}", if last.is_clean() { "clean" } else { "DIFFERENT" })?;
    }
    o.flush()?;
    Ok(if last.is_clean() { exit::OK } else { exit::DIFFERENCES })
}

fn print_state(state: &PhaseState, json_out: bool, extra: Value) -> Result<()> {
    let mut o = BufWriter::new(std::io::stdout().lock());
    if json_out {
        let mut v = serde_json::to_value(state)?;
        if let (Some(obj), Value::Object(more)) = (v.as_object_mut(), extra) {
            obj.extend(more);
        }
        writeln!(o, "{v}")?;
    } else {
        writeln!(o, "phase: {}", state.phase)?;
        writeln!(o, "reverse outbox: {}", if state.reverse_outbox { "on" } else { "off" })?;
        for c in &state.history {
            writeln!(o, "  {} {} -> {} ({})", time_text(c.at_ms), c.from, c.to, c.how)?;
        }
    }
    o.flush()?;
    Ok(())
}

/// Where `--state` keeps the phase.
#[derive(Clone, Debug)]
pub enum PhaseLocation {
    /// A JSON file.
    File(PathBuf),
    /// etcd: members (`host:port`) and the key prefix.
    Etcd(Vec<String>, String),
}

/// The default key prefix of an etcd `--state`.
const DEFAULT_PHASE_PREFIX: &str = "erlmcp/migration/";

impl std::str::FromStr for PhaseLocation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !s.starts_with("etcd:") {
            return Ok(PhaseLocation::File(PathBuf::from(s)));
        }
        match StoreUri::parse(s).map_err(|e| e.to_string())? {
            StoreUri::Etcd { endpoints, prefix } => Ok(PhaseLocation::Etcd(
                // host:port: the scheme follows the TLS settings.
                endpoints.iter().map(Endpoint::to_string).collect(),
                prefix.map_or_else(|| DEFAULT_PHASE_PREFIX.to_owned(), |p| etcd_prefix(Some(&p))),
            )),
            other => Err(format!("expected an etcd: location, got {other:?}")),
        }
    }
}

/// The CLI reads and saves the phase but never acknowledges one (it applies none).
const CLI_NODE_ID: &str = "erlmcp-rollout-cli";

fn open_phases(at: &PhaseLocation, etcd: &EtcdAccessArgs) -> Result<(Box<dyn PhaseStore>, Option<EtcdPhaseStore>)> {
    Ok(match at {
        PhaseLocation::File(path) => (Box::new(FilePhaseStore::new(path)), None),
        PhaseLocation::Etcd(urls, prefix) => {
            let options = EtcdOptions {
                security: etcd.security(),
                ..EtcdOptions::default()
            };
            let store = EtcdPhaseStore::connect(urls, prefix.as_str(), CLI_NODE_ID, options)?;
            (Box::new(store.clone()), Some(store))
        }
    })
}

fn phase_show(a: PhaseShowArgs) -> Result<u8> {
    let (store, etcd) = open_phases(&a.state, &a.etcd)?;
    let state = store.load()?;
    let found = state.is_some();
    let acks = etcd.map(|e| e.acks()).transpose()?;
    let state = state.unwrap_or_else(|| PhaseState::new(Phase::Off));
    print_state(&state, a.json, json!({"saved": found, "acks": acks}))?;
    if let (Some(acks), false) = (acks, a.json) {
        let mut o = BufWriter::new(std::io::stdout().lock());
        for (node, phase) in acks {
            let mark = if phase == state.phase { "" } else { " (lagging)" };
            writeln!(o, "node {node}: applies {phase}{mark}")?;
        }
        o.flush()?;
    }
    Ok(exit::OK)
}

fn phase_force(a: PhaseForceArgs) -> Result<u8> {
    let (store, _) = open_phases(&a.state, &a.etcd)?;
    let mut state = store.load()?.unwrap_or_else(|| PhaseState::new(Phase::Off));
    if state.phase != a.phase {
        state.record(a.phase, SystemClock.now_unix_ms(), "force");
    }
    if let Some(r) = a.reverse_outbox {
        state.reverse_outbox = r;
    }
    store.save(&state)?;
    print_state(&state, a.json, json!({}))?;
    Ok(exit::OK)
}

fn phase_move(a: PhaseMoveArgs, forward: bool) -> Result<u8> {
    let primary: Arc<dyn erlmcp_rollout::session::Store> = open_existing(&a.from, &a.etcd)?.into();
    let secondary: Arc<dyn erlmcp_rollout::session::Store> =
        a.to.open_with(StoreOptions::default(), &a.etcd.security())
            .with_context(|| format!("opening store {}", a.to))?
            .into();
    let (phases, etcd) = open_phases(&a.state, &a.etcd)?;
    let advance_gate = match (etcd, a.expect_nodes.is_empty()) {
        (_, true) => None,
        (Some(etcd), false) => Some(etcd.ack_gate(a.expect_nodes.clone())),
        (None, false) => anyhow::bail!("--expect-nodes needs an etcd --state (nodes acknowledge phases there)"),
    };
    let config = MigratorConfig {
        advance_gate,
        ..MigratorConfig::default()
    };
    let m = Migrator::open(primary, secondary, Outbox::open(&a.outbox)?, phases, config)?;
    let timeout = Duration::from_secs(a.timeout);
    let from = m.phase();
    if forward {
        m.advance(timeout)?;
    } else {
        m.rollback(timeout)?;
    }
    print_state(&m.state(), a.json, json!({"from": from}))?;
    Ok(exit::OK)
}
