//! The binary record encoding that persistent backends store (format 1).
//!
//! All integers are big-endian. A record is exactly `42 + id_len + meta_len` bytes:
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 1 | format, `1` |
//! | 1 | 1 | flags: bit 0 tombstone, bit 1 timeout is `infinity`, bit 2 metadata is Erlang external term format ([`MetaFormat::Etf`]); other bits must be 0 |
//! | 2 | 8 | `version` (u64) |
//! | 10 | 8 | `created_at` (i64, ms) |
//! | 18 | 8 | `last_accessed` (i64, ms) |
//! | 26 | 8 | `timeout_ms` (u64); `0` if and only if infinity |
//! | 34 | 4 | `id_len` (u32), 1..=[`MAX_ID_LEN`] |
//! | 38 | 4 | `meta_len` (u32), 0..=[`MAX_METADATA_LEN`] |
//! | 42 | `id_len` | id bytes |
//! | 42 + `id_len` | `meta_len` | metadata bytes |
//!
//! The id is repeated in the value so a record can be checked against its key and read
//! alone (scans, verify). Decoding rejects every deviation (unknown format or flag bits,
//! a zero finite timeout, lengths out of range, trailing or missing bytes) with
//! [`StoreError::Corrupt`]; it never panics.
//!
//! Bit 2 was added without a new format number: every record written before it has the bit
//! clear and reads back as [`MetaFormat::Opaque`] (its metadata returned as bytes, never
//! decoded), which is safe for bytes of unknown origin; old readers reject records with the
//! bit set as corrupt rather than misread them.

use std::num::NonZeroU64;

use super::{InvalidInput, MetaFormat, Session, SessionId, StoreError, Timeout, MAX_ID_LEN, MAX_METADATA_LEN};

/// The format byte written by [`encode`].
pub const FORMAT: u8 = 1;

/// Length of the fixed header.
pub const HEADER_LEN: usize = 42;

const FLAG_TOMBSTONE: u8 = 1;
const FLAG_INFINITY: u8 = 2;
const FLAG_META_ETF: u8 = 4;

/// Encodes a record (format [`FORMAT`]).
///
/// # Errors
/// [`InvalidInput::MetadataTooLarge`] above [`MAX_METADATA_LEN`] (what [`decode`] would
/// reject); ids are valid by construction.
///
/// # Examples
/// ```
/// use erlmcp_rollout::session::{codec, Session, SessionId, Timeout};
/// let s = Session::new(SessionId::new("s1")?, 5, Timeout::Infinity, b"m".to_vec());
/// let bytes = codec::encode(&s)?;
/// assert_eq!(bytes.len(), codec::HEADER_LEN + 2 + 1);
/// assert_eq!(codec::decode(&bytes)?, s);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn encode(s: &Session) -> Result<Vec<u8>, InvalidInput> {
    s.validate()?;
    let id = s.id.as_bytes();
    let mut out = Vec::with_capacity(HEADER_LEN + id.len() + s.metadata.len());
    let mut flags = 0;
    if s.tombstone {
        flags |= FLAG_TOMBSTONE;
    }
    if s.meta_format == MetaFormat::Etf {
        flags |= FLAG_META_ETF;
    }
    let timeout_ms = match s.timeout {
        Timeout::Ms(t) => t.get(),
        Timeout::Infinity => {
            flags |= FLAG_INFINITY;
            0
        }
    };
    out.push(FORMAT);
    out.push(flags);
    out.extend_from_slice(&s.version.to_be_bytes());
    out.extend_from_slice(&s.created_at.to_be_bytes());
    out.extend_from_slice(&s.last_accessed.to_be_bytes());
    out.extend_from_slice(&timeout_ms.to_be_bytes());
    // Lengths fit in u32: ids are at most MAX_ID_LEN, metadata was validated above.
    out.extend_from_slice(&(id.len() as u32).to_be_bytes());
    out.extend_from_slice(&(s.metadata.len() as u32).to_be_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(&s.metadata);
    Ok(out)
}

/// Decodes a record written by [`encode`].
///
/// # Errors
/// [`StoreError::Corrupt`] (with no key when the id itself cannot be read) for any
/// malformed input.
pub fn decode(bytes: &[u8]) -> Result<Session, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { key: None, reason };
    let header = bytes
        .get(..HEADER_LEN)
        .ok_or_else(|| corrupt(format!("record of {} bytes is shorter than its header", bytes.len())))?;
    if header[0] != FORMAT {
        return Err(corrupt(format!("unknown record format {}", header[0])));
    }
    let flags = header[1];
    if flags & !(FLAG_TOMBSTONE | FLAG_INFINITY | FLAG_META_ETF) != 0 {
        return Err(corrupt(format!("unknown flag bits {flags:#04x}")));
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[at..at + 8]);
        u64::from_be_bytes(b)
    };
    let u32_at = |at: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&header[at..at + 4]);
        u32::from_be_bytes(b) as usize
    };
    let version = u64_at(2);
    let created_at = u64_at(10) as i64;
    let last_accessed = u64_at(18) as i64;
    let timeout_ms = u64_at(26);
    let id_len = u32_at(34);
    let meta_len = u32_at(38);
    let timeout = match (flags & FLAG_INFINITY != 0, NonZeroU64::new(timeout_ms)) {
        (true, None) => Timeout::Infinity,
        (false, Some(t)) => Timeout::Ms(t),
        (true, Some(_)) => return Err(corrupt("infinite timeout with a non-zero timeout_ms".into())),
        (false, None) => return Err(corrupt("finite timeout of 0 ms".into())),
    };
    if id_len == 0 || id_len > MAX_ID_LEN {
        return Err(corrupt(format!("id length {id_len} is outside 1..={MAX_ID_LEN}")));
    }
    if meta_len > MAX_METADATA_LEN {
        return Err(corrupt(format!(
            "metadata length {meta_len} exceeds {MAX_METADATA_LEN}"
        )));
    }
    let expected = HEADER_LEN + id_len + meta_len;
    if bytes.len() != expected {
        return Err(corrupt(format!(
            "record is {} bytes, its header says {expected}",
            bytes.len()
        )));
    }
    let id = SessionId::new(&bytes[HEADER_LEN..HEADER_LEN + id_len]).map_err(|e| corrupt(e.to_string()))?;
    Ok(Session {
        id,
        created_at,
        last_accessed,
        timeout,
        metadata: bytes[HEADER_LEN + id_len..].into(),
        meta_format: if flags & FLAG_META_ETF != 0 {
            MetaFormat::Etf
        } else {
            MetaFormat::Opaque
        },
        version,
        tombstone: flags & FLAG_TOMBSTONE != 0,
    })
}

/// Decodes the record stored under `key`, as a backend reads it: a [`StoreError::Corrupt`]
/// names the key, and a record whose id differs from its key is corrupt too.
///
/// # Errors
/// [`StoreError::Corrupt`] for malformed bytes or a mismatched id.
///
/// # Examples
/// ```
/// use erlmcp_rollout::session::{codec, Session, SessionId, StoreError, Timeout};
/// let s = Session::new(SessionId::new("a")?, 0, Timeout::Infinity, vec![]);
/// let bytes = codec::encode(&s)?;
/// assert_eq!(codec::decode_keyed(&s.id, &bytes)?, s);
/// let other = SessionId::new("b")?;
/// assert!(matches!(codec::decode_keyed(&other, &bytes), Err(StoreError::Corrupt { key: Some(_), .. })));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn decode_keyed(key: &SessionId, bytes: &[u8]) -> Result<Session, StoreError> {
    let session = decode(bytes).map_err(|e| match e {
        StoreError::Corrupt { key: None, reason } => StoreError::Corrupt {
            key: Some(key.clone()),
            reason,
        },
        other => other,
    })?;
    if &session.id != key {
        return Err(StoreError::Corrupt {
            key: Some(key.clone()),
            reason: format!("the record holds id {}", session.id),
        });
    }
    Ok(session)
}

/// The length of [`encode`]'s output for `s`, without encoding it.
///
/// # Examples
/// ```
/// use erlmcp_rollout::session::{codec, Session, SessionId, Timeout};
/// let s = Session::new(SessionId::new("abc")?, 0, Timeout::Infinity, vec![7; 10]);
/// assert_eq!(codec::encoded_len(&s), codec::encode(&s)?.len());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn encoded_len(s: &Session) -> usize {
    HEADER_LEN + s.id.as_bytes().len() + s.metadata.len()
}

/// Lower-case hex of `bytes` (ids and metadata in machine-readable output).
///
/// # Examples
/// ```
/// assert_eq!(erlmcp_rollout::session::codec::to_hex(&[0, 0xab, 0x10]), "00ab10");
/// ```
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

/// Bytes from hex (either case).
///
/// # Errors
/// A message naming the first bad character's position, or an odd length.
///
/// # Examples
/// ```
/// use erlmcp_rollout::session::codec::from_hex;
/// assert_eq!(from_hex("00AB10").unwrap(), vec![0, 0xab, 0x10]);
/// assert!(from_hex("0g").unwrap_err().contains("position 2"));
/// ```
pub fn from_hex(text: &str) -> Result<Vec<u8>, String> {
    if text.len() % 2 != 0 {
        return Err(format!("hex text has an odd length ({})", text.len()));
    }
    let digit = |i: usize, c: u8| {
        char::from(c)
            .to_digit(16)
            .map(|d| d as u8)
            .ok_or_else(|| format!("{:?} at position {} is not a hex digit", char::from(c), i + 1))
    };
    text.as_bytes()
        .chunks(2)
        .enumerate()
        .map(|(i, pair)| Ok(digit(2 * i, pair[0])? << 4 | digit(2 * i + 1, pair[1])?))
        .collect()
}
