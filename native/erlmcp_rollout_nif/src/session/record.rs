//! Session records as terms: `{CreatedAt, LastAccessed, Timeout, Meta[,
//! Version]}` both ways, session ids, and store errors.

use std::sync::Arc;

use erlmcp_rollout::session::{MetaFormat, Session, SessionId, StoreError, Timeout, MAX_METADATA_LEN};
use rustler::types::tuple::get_tuple;
use rustler::{Atom, Encoder, Env, Term};

use super::spec::pair;
use crate::atoms;
use crate::etf;
use crate::term::{binary_bytes, bytes_term};

fn timeout_term<'a>(env: Env<'a>, t: Timeout) -> Term<'a> {
    match t {
        Timeout::Infinity => atoms::infinity().encode(env),
        Timeout::Ms(ms) => ms.get().encode(env),
    }
}

/// `{CreatedAt, LastAccessed, TimeoutMs | infinity, Metadata, Version}` with
/// Metadata `{etf, Bin}` when the writer said the bytes are external term
/// format (the Erlang side decodes them with `[safe]`), else the bytes.
pub fn session_tuple<'a>(env: Env<'a>, s: &Session) -> Term<'a> {
    let bytes = bytes_term(env, &s.metadata);
    let meta = match s.meta_format {
        MetaFormat::Etf => (atoms::etf(), bytes).encode(env),
        MetaFormat::Opaque => bytes,
    };
    (
        s.created_at,
        s.last_accessed,
        timeout_term(env, s.timeout),
        meta,
        s.version,
    )
        .encode(env)
}

/// Metadata bytes as given: `Bin` (opaque) or `{etf, Bin}` (external term
/// format), its size checked before anything is copied.
pub fn meta_bytes<'a>(meta: Term<'a>) -> Result<Option<(&'a [u8], MetaFormat)>, String> {
    let found = match binary_bytes(meta) {
        Some(b) => Some((b, MetaFormat::Opaque)),
        None => match pair(meta) {
            Some([tag, bin]) if tag.decode::<Atom>().ok() == Some(atoms::etf()) => Some((
                binary_bytes(bin).ok_or("{etf, Bin}: Bin must be a binary")?,
                MetaFormat::Etf,
            )),
            _ => None,
        },
    };
    if let Some((b, _)) = found {
        if b.len() > MAX_METADATA_LEN {
            return Err(format!(
                "metadata of {} bytes exceeds the limit of {MAX_METADATA_LEN}",
                b.len()
            ));
        }
    }
    Ok(found)
}

/// `not_found | already_exists | {conflict, Expected, Actual} |
/// {unavailable | corrupt | invalid, Message} | {etcd_access, Kind, Message}`.
pub fn error_term<'a>(env: Env<'a>, e: &StoreError) -> Term<'a> {
    match e {
        StoreError::NotFound { .. } => atoms::not_found().encode(env),
        StoreError::AlreadyExists { .. } => atoms::already_exists().encode(env),
        StoreError::Conflict { expected, actual, .. } => (atoms::conflict(), *expected, *actual).encode(env),
        StoreError::Unavailable { .. } => (atoms::unavailable(), e.to_string()).encode(env),
        StoreError::Corrupt { .. } => (atoms::corrupt(), e.to_string()).encode(env),
        StoreError::Invalid(_) => (atoms::invalid(), e.to_string()).encode(env),
        StoreError::Access(a) => crate::etcd::access_error_term(env, a),
        other => (atoms::internal(), other.to_string()).encode(env),
    }
}

pub fn invalid<'a>(env: Env<'a>, what: &str) -> Term<'a> {
    (atoms::error(), (atoms::invalid(), what)).encode(env)
}

pub fn session_id(term: Term<'_>) -> Result<SessionId, String> {
    let bytes = binary_bytes(term).ok_or("session id must be a binary")?;
    SessionId::new(bytes).map_err(|e| e.to_string())
}

pub fn decode_timeout(term: Term<'_>) -> Result<Timeout, String> {
    if let Ok(a) = term.decode::<Atom>() {
        if a == atoms::infinity() {
            return Ok(Timeout::Infinity);
        }
    }
    let ms: u64 = term
        .decode()
        .map_err(|_| "timeout_ms must be a positive integer or infinity".to_string())?;
    Timeout::ms(ms).map_err(|e| e.to_string())
}

pub fn decode_time(term: Term<'_>, field: &str) -> Result<i64, String> {
    term.decode::<i64>()
        .map_err(|_| format!("{field} must be an integer (milliseconds, fits 64 bits)"))
}

pub struct Fields<'a> {
    pub id: SessionId,
    pub created_at: i64,
    pub last_accessed: i64,
    pub timeout: Timeout,
    pub meta: Term<'a>,
}

impl Fields<'_> {
    pub fn decode<'a>(id: Term<'a>, fields: Term<'a>) -> Result<Fields<'a>, String> {
        let id = session_id(id)?;
        let [created, accessed, timeout, meta]: [Term<'a>; 4] = get_tuple(fields)
            .ok()
            .and_then(|t| t.try_into().ok())
            .ok_or("session fields must be {CreatedAt, LastAccessed, TimeoutMs | infinity, Metadata}")?;
        Ok(Fields {
            id,
            created_at: decode_time(created, "created_at")?,
            last_accessed: decode_time(accessed, "last_accessed")?,
            timeout: decode_timeout(timeout)?,
            meta,
        })
    }

    pub fn into_session(self, meta: Arc<[u8]>, format: MetaFormat) -> Session {
        let mut s = Session::new(self.id, self.created_at, self.timeout, meta);
        s.last_accessed = self.last_accessed;
        s.meta_format = format;
        s
    }
}

/// A session from `Id` and `{CreatedAt, LastAccessed, Timeout, Bin | {etf, Bin}}`.
pub fn decode_session<'a>(id: Term<'a>, fields: Term<'a>) -> Result<Session, String> {
    let f = Fields::decode(id, fields)?;
    let (meta, format) = meta_bytes(f.meta)?.ok_or("metadata must be a binary or {etf, Binary}")?;
    Ok(f.into_session(Arc::from(meta), format))
}

thread_local! {
    /// This scheduler thread's metadata encoder.
    static ENCODER: std::cell::RefCell<etf::Scratch> = std::cell::RefCell::new(etf::Scratch::default());
}

/// `Meta` in external term format, encoded here when the encoder takes it.
pub fn encode_meta(meta: Term<'_>) -> Result<Arc<[u8]>, etf::NotHere> {
    ENCODER.with_borrow_mut(|e| e.encode(meta).map(Arc::from))
}
