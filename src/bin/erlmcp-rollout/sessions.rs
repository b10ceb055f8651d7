//! `erlmcp-rollout sessions ...`: inspect session stores (and migrate between them).

use std::io::{BufWriter, Write};

use anyhow::{Context as _, Result};
use clap::{Args, Subcommand};
use erlmcp_rollout::flags::format_time;
use erlmcp_rollout::session::uri::StoreUri;
use erlmcp_rollout::session::{
    codec, stats, Clock, Session, SessionId, StoreOptions, SystemClock, Timeout, Visibility,
};
use serde_json::{json, Value};

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
}

#[derive(Args)]
pub struct StatsArgs {
    /// The store.
    #[arg(value_name = "STORE", long_help = STORE_HELP)]
    store: StoreUri,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
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
    }
}

/// Opens a store that must already exist (a read must not create an empty file).
pub fn open_existing(uri: &StoreUri) -> Result<Box<dyn erlmcp_rollout::session::Store>> {
    if let StoreUri::Disk(path) = uri {
        if !path.exists() {
            anyhow::bail!("store {uri}: no such file {}", path.display());
        }
    }
    uri.open(StoreOptions::default())
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
    let store = open_existing(&a.store)?;
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
    let store = open_existing(&a.store)?;
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
    let store = open_existing(&a.store)?;
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
