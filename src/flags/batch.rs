//! Batch evaluation over JSON lines (`flags eval --batch`).
//!
//! Input, one object per line: `{"flag": NAME, "context": {KEY: STRING|INTEGER}}`
//! (`context` may be left out). Strings are hashed as Erlang binaries,
//! integers (of any size) as integers. Output, one line per input line in
//! the same order: `{"flag": NAME, "enabled": BOOL, "reason": STRING}`, or
//! `{"line": N, "error": MESSAGE}` for a line that could not be read. Blank
//! lines are skipped.

use std::io::{self, BufRead, Write};

use serde::Serialize;

use super::snapshot::Snapshot;
use super::value::{MapContext, OwnedValue};
use crate::json::{self, Kind, Node};

/// Counts of one batch run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BatchSummary {
    /// Lines evaluated.
    pub evaluated: u64,
    /// Lines rejected (each reported in the output).
    pub errors: u64,
}

#[derive(Serialize)]
struct OutLine<'a> {
    flag: &'a str,
    enabled: bool,
    reason: &'static str,
}

#[derive(Serialize)]
struct ErrLine<'a> {
    line: u64,
    error: &'a str,
}

/// Parse one input line into (flag, context).
///
/// # Errors
/// What is wrong with the line, with the column where known.
///
/// # Examples
/// ```
/// use erlmcp_rollout::flags::{batch::parse_line, Context, Value};
/// let (flag, ctx) = parse_line(br#"{"flag": "f", "context": {"session_id": "s", "n": 18446744073709551616}}"#)?;
/// assert_eq!(flag, "f");
/// assert_eq!(ctx.get("session_id"), Some(Value::Binary(b"s")));
/// assert!(matches!(ctx.get("n"), Some(Value::BigInt { negative: false, .. })));
/// # Ok::<(), String>(())
/// ```
pub fn parse_line(line: &[u8]) -> Result<(String, MapContext), String> {
    let node = json::parse(line).map_err(|e| format!("invalid JSON at column {}: {}", e.pos.column, e.message))?;
    let Kind::Object(members) = node.kind else {
        return Err(format!(
            "expected an object {{\"flag\": ..., \"context\": {{...}}}}, got {}",
            node.kind.type_name()
        ));
    };
    let mut flag = None;
    let mut ctx = MapContext::new();
    for m in members {
        match (m.key.as_str(), m.value.kind) {
            ("flag", Kind::String(s)) => flag = Some(s),
            ("flag", other) => return Err(format!("\"flag\" must be a string, got {}", other.type_name())),
            ("context", Kind::Object(entries)) => {
                for e in entries {
                    let v = context_value(&e.key, &e.value)?;
                    ctx.insert(e.key, v);
                }
            }
            ("context", other) => return Err(format!("\"context\" must be an object, got {}", other.type_name())),
            (other, _) => return Err(format!("unknown field {other:?}; a line has \"flag\" and \"context\"")),
        }
    }
    let flag = flag.ok_or_else(|| "missing \"flag\"".to_owned())?;
    Ok((flag, ctx))
}

fn context_value(key: &str, node: &Node) -> Result<OwnedValue, String> {
    match &node.kind {
        Kind::String(s) => Ok(OwnedValue::Binary(s.as_bytes().to_vec())),
        Kind::Number(t) => OwnedValue::parse_integer(t)
            .ok_or_else(|| format!("context key {key:?}: {t} is not an integer (values are strings or integers)")),
        other => Err(format!(
            "context key {key:?}: values are strings or integers, got {}",
            other.type_name()
        )),
    }
}

/// Evaluate every line of `input` against `snapshot`, writing results to
/// `output` in input order.
///
/// # Errors
/// Only I/O errors on `input` or `output`; bad lines are reported inline.
pub fn run<R: BufRead, W: Write>(snapshot: &Snapshot, input: R, mut output: W) -> io::Result<BatchSummary> {
    let mut summary = BatchSummary::default();
    let mut buf = Vec::with_capacity(256);
    for (i, line) in input.split(b'\n').enumerate() {
        let line = line?;
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        buf.clear();
        match parse_line(line) {
            Ok((flag, ctx)) => {
                let e = snapshot.evaluate(flag.as_bytes(), &ctx);
                serde_json::to_writer(
                    &mut buf,
                    &OutLine {
                        flag: &flag,
                        enabled: e.enabled,
                        reason: e.reason.code(),
                    },
                )?;
                summary.evaluated += 1;
            }
            Err(msg) => {
                serde_json::to_writer(
                    &mut buf,
                    &ErrLine {
                        line: i as u64 + 1,
                        error: &msg,
                    },
                )?;
                summary.errors += 1;
            }
        }
        buf.push(b'\n');
        output.write_all(&buf)?;
    }
    output.flush()?;
    Ok(summary)
}
