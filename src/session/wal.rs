//! The write-ahead log in front of [`DiskStore`](super::DiskStore)'s redb file: its
//! on-disk format, how a file is parsed on open, and the file backend.
//!
//! The full description, with the invariants the store keeps, is `docs/disk-log.md`;
//! this is the summary the code is checked against.
//!
//! # Files
//! Two log files next to the redb file, `PATH.wal-0` and `PATH.wal-1` (both always
//! exist). Each starts with a 16-byte header, written when the file is created (and when
//! a format-1 file is recycled as format 2), then synced before any frame:
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 8 | magic `ERMCPWAL` |
//! | 8 | 4 | format, `2` (u32, big-endian; `1` is still read) |
//! | 12 | 4 | salt (u32): random, chosen when the header is written; `0` in format 1 |
//!
//! Frames follow the header back to back. In format 2 the file is zero-filled ahead of
//! them (preallocated) and recycled after a checkpoint without being truncated, so after
//! the last frame come zeros or *stale* frames of an earlier generation.
//!
//! # Frames
//! One frame is one group commit: every record the group wrote, in one `write` and one
//! `fdatasync`. All integers are big-endian.
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 4 | frame magic `WALF` |
//! | 4 | 4 | CRC-32 (IEEE) over the file's salt (format 2 only), the magic, `body_len` and the body |
//! | 8 | 8 | `body_len` (u64) |
//! | 16 | `body_len` | body |
//!
//! Body: `seq` (u64; frames are numbered 1, 2, 3, ... across both files, without gaps),
//! `count` (u32), then `count` entries, each `kind` (u8: 1 = put, 2 = remove),
//! `key_len` (u16, 1..=[`MAX_ID_LEN`]), `value_len` (u32; 0 for a remove), the key, the
//! value (a [`codec`](super::codec) record whose id is the key). Keys are unique within a
//! frame and ascending.
//!
//! The salt is why bytes a client chose (session metadata inside a stale frame) can never
//! pass for a frame: without the salt, which never leaves the file, a forged frame's
//! checksum is a guess.
//!
//! # Reading a file
//! [`parse`] walks the frames from the header, given the *floor*: the highest seq redb
//! already holds (the checkpoint mark). A checksum-valid frame whose seq is at most the
//! floor (for the file's first frame) or at most its predecessor's is *stale*: it was
//! written by an earlier generation of the file, and the valid log ends before it. The
//! first frame that is cut short or fails its checksum also ends the valid log: it is a
//! torn last write (its group was never acknowledged, since acknowledgement follows the
//! `fdatasync`), or zeros, or the remains of a stale frame, and it is dropped with
//! everything after it. Nothing before it is ever dropped. If a checksum-valid frame that
//! is newer than the last valid one follows the bad one where the bad one's length says
//! it ends, the damage is in the middle of the log, not a torn tail: [`parse`] refuses (an
//! error) instead of dropping acknowledged frames. A checksum-valid frame that is
//! malformed inside, or newer than its predecessor by more than one, is refused the same
//! way.

use std::fs::File;
use std::io::{Error as IoError, ErrorKind};
use std::os::unix::fs::FileExt;
use std::path::Path;

use redb::StorageBackend;

use super::MAX_ID_LEN;

/// The file header's magic.
pub(crate) const FILE_MAGIC: [u8; 8] = *b"ERMCPWAL";
/// The file format written by this code (salted checksums, preallocated, recycled).
pub(crate) const FILE_FORMAT: u32 = 2;
/// The first format (unsalted checksums, files grow and are truncated): still read, and
/// appended to until the file is next recycled.
pub(crate) const FILE_FORMAT_1: u32 = 1;
/// Length of the file header; frames start here.
pub(crate) const HEADER_LEN: u64 = 16;
/// The magic that starts every frame.
const FRAME_MAGIC: [u8; 4] = *b"WALF";
/// Length of a frame's header (magic, CRC, body length).
const FRAME_HEADER_LEN: usize = 16;
/// Length of a body's fixed part (seq, count).
const BODY_FIXED_LEN: usize = 12;
/// Length of an entry's fixed part (kind, key_len, value_len).
const ENTRY_FIXED_LEN: usize = 7;

const KIND_PUT: u8 = 1;
const KIND_REMOVE: u8 = 2;

/// A format-2 file header with `salt`.
pub(crate) fn header(salt: u32) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(&FILE_MAGIC);
    h[8..12].copy_from_slice(&FILE_FORMAT.to_be_bytes());
    h[12..16].copy_from_slice(&salt.to_be_bytes());
    h
}

/// A fresh salt for a header: random (the standard library's per-process random keys,
/// mixed with the time), never shown to clients.
pub(crate) fn new_salt() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(now);
    h.finish() as u32
}

/// One record of a frame: `value` is `None` for a remove.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry<'a> {
    pub key: &'a [u8],
    pub value: Option<&'a [u8]>,
}

/// Encodes one frame for a file with `salt` (`None`: a format-1 file). `entries` must
/// have unique keys, ascending, each 1..=`MAX_ID_LEN` bytes, values under 4 GiB (the
/// store's limits guarantee all of it).
pub(crate) fn encode_frame<'a>(
    seq: u64,
    entries: impl ExactSizeIterator<Item = Entry<'a>>,
    salt: Option<u32>,
) -> Vec<u8> {
    let count = entries.len();
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + BODY_FIXED_LEN + count * 64);
    out.extend_from_slice(&FRAME_MAGIC);
    out.extend_from_slice(&[0; 4]); // CRC, below
    out.extend_from_slice(&[0; 8]); // body_len, below
    out.extend_from_slice(&seq.to_be_bytes());
    // At most one entry per session id: far below u32::MAX in any real group.
    out.extend_from_slice(&(count as u32).to_be_bytes());
    for e in entries {
        let (kind, value) = match e.value {
            Some(v) => (KIND_PUT, v),
            None => (KIND_REMOVE, &[][..]),
        };
        out.push(kind);
        out.extend_from_slice(&(e.key.len() as u16).to_be_bytes());
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(e.key);
        out.extend_from_slice(value);
    }
    let body_len = (out.len() - FRAME_HEADER_LEN) as u64;
    out[8..16].copy_from_slice(&body_len.to_be_bytes());
    let crc = frame_crc(salt, &out[..4], &out[8..]);
    out[4..8].copy_from_slice(&crc.to_be_bytes());
    out
}

fn frame_crc(salt: Option<u32>, magic: &[u8], rest: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    if let Some(salt) = salt {
        h.update(&salt.to_be_bytes());
    }
    h.update(magic);
    h.update(rest);
    h.finalize()
}

/// A checksum-valid frame found by [`parse`]: its `seq` and where its body is in the
/// parsed bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FrameRef {
    pub seq: u64,
    pub body: std::ops::Range<usize>,
}

impl FrameRef {
    /// The frame's entries (its body was checked by [`parse`], so this cannot fail).
    pub(crate) fn entries<'a>(&self, file: &'a [u8]) -> impl Iterator<Item = Entry<'a>> + 'a {
        let body = &file[self.body.clone()];
        let count = u32_at(body, 8) as usize;
        let mut at = BODY_FIXED_LEN;
        (0..count).map(move |_| {
            let kind = body[at];
            let key_len = usize::from(u16::from_be_bytes([body[at + 1], body[at + 2]]));
            let value_len = u32_at(body, at + 3) as usize;
            let key_start = at + ENTRY_FIXED_LEN;
            let value_start = key_start + key_len;
            at = value_start + value_len;
            Entry {
                key: &body[key_start..value_start],
                value: (kind == KIND_PUT).then(|| &body[value_start..at]),
            }
        })
    }
}

/// What [`parse`] found in one log file.
#[derive(Debug, Default)]
pub(crate) struct Parsed {
    /// The valid frames, in file order (their `seq`s consecutive).
    pub frames: Vec<FrameRef>,
    /// Where the valid log ends: the next frame is written here.
    pub valid_end: u64,
    /// Bytes after `valid_end` (a torn last frame, zeros, stale frames), dropped.
    pub dropped: u64,
    /// The header's salt; `None` for a format-1 file.
    pub salt: Option<u32>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// A frame starting at `at` that is complete and passes its checksum: its total length
/// and body range. `None` when it is cut short, has no frame magic or fails its checksum.
fn checked_frame(file: &[u8], at: usize, salt: Option<u32>) -> Option<(usize, std::ops::Range<usize>)> {
    let head = file.get(at..at.checked_add(FRAME_HEADER_LEN)?)?;
    if head[..4] != FRAME_MAGIC {
        return None;
    }
    let body_len = usize::try_from(u64_at(head, 8)).ok()?;
    let body_start = at + FRAME_HEADER_LEN;
    let body_end = body_start.checked_add(body_len)?;
    if body_end > file.len() {
        return None;
    }
    if frame_crc(salt, &head[..4], &file[at + 8..body_end]) != u32_at(head, 4) {
        return None;
    }
    Some((FRAME_HEADER_LEN + body_len, body_start..body_end))
}

/// Checks a checksum-valid body's structure; returns its `seq`.
fn check_body(body: &[u8]) -> Result<u64, String> {
    if body.len() < BODY_FIXED_LEN {
        return Err(format!("a body of {} bytes is shorter than its fixed part", body.len()));
    }
    let seq = u64_at(body, 0);
    let count = u32_at(body, 8);
    let mut at = BODY_FIXED_LEN;
    let mut last_key: Option<&[u8]> = None;
    for i in 0..count {
        let fixed = body
            .get(at..at + ENTRY_FIXED_LEN)
            .ok_or_else(|| format!("entry {i} of {count} is cut short"))?;
        let kind = fixed[0];
        let key_len = usize::from(u16::from_be_bytes([fixed[1], fixed[2]]));
        let value_len = u32_at(fixed, 3) as usize;
        if kind != KIND_PUT && kind != KIND_REMOVE {
            return Err(format!("entry {i}: unknown kind {kind}"));
        }
        if key_len == 0 || key_len > MAX_ID_LEN {
            return Err(format!("entry {i}: key length {key_len} is outside 1..={MAX_ID_LEN}"));
        }
        if kind == KIND_REMOVE && value_len != 0 {
            return Err(format!("entry {i}: a remove with a {value_len}-byte value"));
        }
        let key_start = at + ENTRY_FIXED_LEN;
        let end = key_start + key_len + value_len;
        if end > body.len() {
            return Err(format!("entry {i} runs past the end of its frame"));
        }
        let key = &body[key_start..key_start + key_len];
        if last_key.is_some_and(|k| k >= key) {
            return Err(format!("entry {i}: keys are not unique and ascending"));
        }
        last_key = Some(key);
        at = end;
    }
    if at != body.len() {
        return Err(format!("{} bytes after the last entry", body.len() - at));
    }
    Ok(seq)
}

/// Parses one whole log file whose frames up to seq `floor` redb already holds (see the
/// module docs for what is stale, what is dropped and what is refused).
///
/// # Errors
/// A message when the header is not this format's, or the damage is not a torn tail.
pub(crate) fn parse(file: &[u8], floor: u64) -> Result<Parsed, String> {
    let header_len = HEADER_LEN as usize;
    let head = file
        .get(..header_len)
        .ok_or_else(|| format!("{} bytes are shorter than the header", file.len()))?;
    if head[..8] != FILE_MAGIC {
        return Err("not an erlmcp session log (bad magic)".into());
    }
    let salt = match u32_at(head, 8) {
        FILE_FORMAT => Some(u32_at(head, 12)),
        FILE_FORMAT_1 => None,
        other => {
            return Err(format!(
                "log format {other}; this build reads formats 1 and {FILE_FORMAT}"
            ))
        }
    };
    let mut parsed = Parsed {
        salt,
        ..Parsed::default()
    };
    let mut at = header_len;
    // A frame is current only if its seq is above this: the floor, then the last frame's.
    let mut newest = floor;
    while at < file.len() {
        let Some((len, body)) = checked_frame(file, at, salt) else {
            // Not a valid frame: a torn tail (or zeros, or a stale frame's remains), unless
            // a newer valid frame follows where this one says it ends (then it is damage in
            // the middle, and dropping would lose acknowledged frames).
            if let Some(next) = file
                .get(at + 8..at + FRAME_HEADER_LEN)
                .and_then(|b| usize::try_from(u64_at(b, 0)).ok())
                .and_then(|body_len| (at + FRAME_HEADER_LEN).checked_add(body_len))
            {
                let newer = next < file.len()
                    && checked_frame(file, next, salt)
                        .is_some_and(|(_, b)| file.get(b.start..b.start + 8).is_some_and(|s| u64_at(s, 0) > newest));
                if newer {
                    return Err(format!(
                        "the frame at offset {at} is damaged and a valid frame follows at offset {next}: \
                         the log is damaged before its end; refusing to drop acknowledged writes"
                    ));
                }
            }
            break;
        };
        let seq = check_body(&file[body.clone()]).map_err(|e| format!("frame at offset {at}: {e}"))?;
        if seq <= newest {
            // Stale: an earlier generation of this file; the valid log ends here.
            break;
        }
        if let Some(prev) = parsed.frames.last() {
            if prev.seq.checked_add(1) != Some(seq) {
                return Err(format!(
                    "frame at offset {at} has seq {seq} after seq {}: frames are missing",
                    prev.seq
                ));
            }
        }
        newest = seq;
        parsed.frames.push(FrameRef { seq, body });
        at += len;
    }
    parsed.valid_end = at as u64;
    parsed.dropped = (file.len() - at) as u64;
    Ok(parsed)
}

/// A log file on the file system: positional reads and writes, `fdatasync`.
#[derive(Debug)]
pub(crate) struct FileLog(File);

impl FileLog {
    /// Opens (or creates) the log file at `path`, read-write.
    pub(crate) fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        Ok(FileLog(file))
    }
}

impl StorageBackend for FileLog {
    fn len(&self) -> Result<u64, IoError> {
        Ok(self.0.metadata()?.len())
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), IoError> {
        self.0.read_exact_at(out, offset)
    }

    fn set_len(&self, len: u64) -> Result<(), IoError> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> Result<(), IoError> {
        self.0.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        self.0.write_all_at(data, offset)
    }
}

/// Reads a whole backend.
pub(crate) fn read_all(b: &dyn StorageBackend) -> Result<Vec<u8>, IoError> {
    let len = usize::try_from(b.len()?).map_err(|_| IoError::new(ErrorKind::InvalidData, "log too large"))?;
    let mut buf = vec![0u8; len];
    b.read(0, &mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SALT: u32 = 0x5EED_1234;

    fn file_with(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut f = header(SALT).to_vec();
        for fr in frames {
            f.extend_from_slice(fr);
        }
        f
    }

    fn frame(seq: u64, keys: &[&str]) -> Vec<u8> {
        salted_frame(seq, keys, Some(SALT))
    }

    fn salted_frame(seq: u64, keys: &[&str], salt: Option<u32>) -> Vec<u8> {
        let entries: Vec<Entry<'_>> = keys
            .iter()
            .map(|k| Entry {
                key: k.as_bytes(),
                value: (!k.starts_with('-')).then_some(k.as_bytes()),
            })
            .collect();
        encode_frame(seq, entries.into_iter(), salt)
    }

    #[test]
    fn frames_round_trip() {
        let f = file_with(&[frame(1, &["a", "b"]), frame(2, &["-c"])]);
        let p = parse(&f, 0).unwrap();
        assert_eq!(p.valid_end, f.len() as u64);
        assert_eq!(p.frames.iter().map(|fr| fr.seq).collect::<Vec<_>>(), vec![1, 2]);
        let e: Vec<_> = p.frames[0].entries(&f).collect();
        assert_eq!(
            e,
            vec![
                Entry {
                    key: b"a",
                    value: Some(b"a")
                },
                Entry {
                    key: b"b",
                    value: Some(b"b")
                }
            ]
        );
        assert_eq!(
            p.frames[1].entries(&f).collect::<Vec<_>>(),
            vec![Entry {
                key: b"-c",
                value: None
            }]
        );
    }

    #[test]
    fn every_cut_of_the_last_frame_is_dropped_and_nothing_before_it() {
        let whole = file_with(&[frame(1, &["a"]), frame(2, &["b", "c"])]);
        let first_end = (HEADER_LEN as usize) + frame(1, &["a"]).len();
        for cut in first_end..whole.len() {
            let p = parse(&whole[..cut], 0).unwrap();
            assert_eq!(p.frames.len(), 1, "cut at {cut}");
            assert_eq!(p.valid_end, first_end as u64);
            assert_eq!(p.dropped, (cut - first_end) as u64);
        }
    }

    #[test]
    fn a_flipped_bit_in_the_last_frame_drops_it() {
        let whole = file_with(&[frame(1, &["a"]), frame(2, &["b"])]);
        let first_end = (HEADER_LEN as usize) + frame(1, &["a"]).len();
        for byte in first_end..whole.len() {
            let mut f = whole.clone();
            f[byte] ^= 0x10;
            let p = parse(&f, 0).unwrap();
            assert_eq!(p.frames.len(), 1, "flip at {byte}");
        }
    }

    #[test]
    fn damage_before_a_valid_frame_is_refused() {
        let f1 = frame(1, &["a"]);
        let mut f = file_with(&[f1.clone(), frame(2, &["b"]), frame(3, &["c"])]);
        let at = HEADER_LEN as usize + f1.len() + FRAME_HEADER_LEN + 3; // inside frame 2's body
        f[at] ^= 1;
        let e = parse(&f, 0).unwrap_err();
        assert!(e.contains("damaged before its end"), "{e}");
    }

    #[test]
    fn a_gap_in_seq_is_refused() {
        let f = file_with(&[frame(1, &["a"]), frame(3, &["b"])]);
        assert!(parse(&f, 0).unwrap_err().contains("frames are missing"));
    }

    #[test]
    fn a_foreign_header_is_refused() {
        assert!(parse(b"SQLite format 3\0", 0).unwrap_err().contains("bad magic"));
        let mut h = header(SALT);
        h[11] = 9;
        assert!(parse(&h, 0).unwrap_err().contains("format 9"));
        assert!(parse(&h[..5], 0).is_err());
    }

    #[test]
    fn a_frame_checksummed_under_another_salt_is_not_a_frame() {
        // Bytes a client wrote (say, session metadata that holds a frame) cannot pass
        // for a frame without the file's salt.
        for salt in [None, Some(SALT ^ 1), Some(0)] {
            let f = file_with(&[frame(1, &["a"]), salted_frame(2, &["b"], salt)]);
            let p = parse(&f, 0).unwrap();
            assert_eq!(p.frames.len(), 1, "{salt:?}");
        }
        // Nor can a frame under the wrong salt make a damaged frame before it look like
        // damage in the middle.
        let f1 = frame(1, &["a"]);
        let mut f = file_with(&[f1.clone(), frame(2, &["b"]), salted_frame(3, &["c"], None)]);
        f[HEADER_LEN as usize + f1.len() + FRAME_HEADER_LEN + 3] ^= 1;
        assert_eq!(parse(&f, 0).unwrap().frames.len(), 1);
    }

    #[test]
    fn stale_frames_end_the_log() {
        // Generation 2 (seqs 41, 42) over generation 1 (seqs 1..=5) of a recycled file:
        // the frames that follow directly are older, so the log ends there.
        let old: Vec<Vec<u8>> = (1..=5).map(|q| frame(q, &["k"])).collect();
        let mut f = file_with(&old);
        let new = [frame(41, &["k"]), frame(42, &["k"])];
        let at = HEADER_LEN as usize;
        let new_len = new[0].len() + new[1].len();
        f[at..at + new_len].copy_from_slice(&[new[0].clone(), new[1].clone()].concat());
        let p = parse(&f, 40).unwrap();
        assert_eq!(p.frames.iter().map(|fr| fr.seq).collect::<Vec<_>>(), vec![41, 42]);
        assert_eq!(p.valid_end, (at + new_len) as u64);
        // The first frame at or below the floor: nothing is current (a file whose
        // frames redb already holds).
        let p = parse(&file_with(&old), 5).unwrap();
        assert!(p.frames.is_empty() && p.valid_end == HEADER_LEN);
        // A torn frame followed by a stale one is a torn tail, not damage.
        let mut torn = f.clone();
        torn[at + new[0].len() + FRAME_HEADER_LEN + 2] ^= 1;
        assert_eq!(parse(&torn, 40).unwrap().frames.len(), 1);
    }

    #[test]
    fn format_1_files_are_read() {
        let mut f = header(0).to_vec();
        f[8..12].copy_from_slice(&FILE_FORMAT_1.to_be_bytes());
        for q in 1..=3 {
            f.extend_from_slice(&salted_frame(q, &["a"], None));
        }
        let p = parse(&f, 0).unwrap();
        assert_eq!((p.frames.len(), p.salt), (3, None));
        // A salted frame is not a format-1 frame.
        f.extend_from_slice(&frame(4, &["a"]));
        assert_eq!(parse(&f, 0).unwrap().frames.len(), 3);
    }
}
