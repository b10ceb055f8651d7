//! Small files kept atomically and durably.
//!
//! - [`write_atomic`]: write a temporary file next to the target, fsync it, rename it over
//!   the target, fsync the directory. A reader sees the old or the new content, never a
//!   mix, and after it returns the new content survives a crash or power loss. For rare
//!   writes (phase files).
//! - [`SlotFile`]: two alternating fixed slots, one `fdatasync` per write. For frequent
//!   writes (backfill checkpoints).

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Replaces `path` with `bytes` atomically and durably (see the module docs).
///
/// # Errors
/// Any I/O error; the old content is then intact (a stray temporary file may remain).
///
/// # Examples
/// ```
/// use erlmcp_rollout::migrate::durable::write_atomic;
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("state.json");
/// write_atomic(&path, b"{\"a\":1}")?;
/// write_atomic(&path, b"{\"a\":2}")?;
/// assert_eq!(std::fs::read(&path)?, b"{\"a\":2}");
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Reads a file that may not exist: `Ok(None)` when absent.
///
/// # Errors
/// Any other I/O error.
pub fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Size of one slot of a [`SlotFile`].
pub const SLOT_LEN: usize = 16 * 1024;
const SLOT_HEADER: usize = 24;
const SLOT_MAGIC: &[u8; 4] = b"EMS1";

/// A small record rewritten often and durably at the cost of one `fdatasync` (no file
/// creation, rename or directory sync, which cost tens of milliseconds on ext4): a file of
/// two fixed slots of [`SLOT_LEN`] bytes, written alternately. Each slot holds a magic,
/// a sequence number, the payload length and a SipHash of the three, then the payload.
/// Reading takes the valid slot with the highest sequence number, so a write torn by a
/// crash leaves the previous record readable.
///
/// # Examples
/// ```
/// use erlmcp_rollout::migrate::durable::SlotFile;
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("cp");
/// let mut f = SlotFile::open(&path)?;
/// assert_eq!(f.latest(), None);
/// f.write(b"one")?;
/// f.write(b"two")?;
/// assert_eq!(SlotFile::read(&path)?, Some(b"two".to_vec()));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct SlotFile {
    file: File,
    seq: u64,
    latest: Option<Vec<u8>>,
}

fn slot_digest(seq: u64, payload: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = siphasher::sip::SipHasher13::new_with_keys(0x736c_6f74, 0x6669_6c65);
    h.write(&seq.to_be_bytes());
    h.write(&(payload.len() as u64).to_be_bytes());
    h.write(payload);
    h.finish()
}

/// The valid slot with the highest sequence number, if any.
fn best_slot(bytes: &[u8]) -> io::Result<Option<(u64, Vec<u8>)>> {
    if bytes.iter().all(|b| *b == 0) {
        return Ok(None); // created, never written
    }
    let mut best: Option<(u64, Vec<u8>)> = None;
    for slot in bytes.chunks(SLOT_LEN).take(2) {
        if slot.len() < SLOT_HEADER || &slot[..4] != SLOT_MAGIC {
            continue;
        }
        let mut b8 = [0u8; 8];
        b8.copy_from_slice(&slot[4..12]);
        let seq = u64::from_be_bytes(b8);
        let mut b4 = [0u8; 4];
        b4.copy_from_slice(&slot[12..16]);
        let len = u32::from_be_bytes(b4) as usize;
        b8.copy_from_slice(&slot[16..24]);
        let digest = u64::from_be_bytes(b8);
        let Some(payload) = slot.get(SLOT_HEADER..SLOT_HEADER + len) else {
            continue;
        };
        if slot_digest(seq, payload) == digest && best.as_ref().is_none_or(|(s, _)| seq > *s) {
            best = Some((seq, payload.to_vec()));
        }
    }
    match best {
        Some(b) => Ok(Some(b)),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "neither slot holds a valid record (not a slot file, or both slots damaged)",
        )),
    }
}

impl SlotFile {
    /// Opens (creating, sized and synced, if absent or empty) a slot file and reads its
    /// latest record. An existing file of another size is refused, never resized.
    ///
    /// # Errors
    /// I/O errors; [`io::ErrorKind::InvalidData`] when the file exists but is not a slot
    /// file or no slot is valid.
    pub fn open(path: &Path) -> io::Result<SlotFile> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = file.metadata()?.len();
        if len != 0 && len != 2 * SLOT_LEN as u64 {
            // Never resize someone else's file (a mistyped path must not damage it).
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not a slot file: {len} bytes, a slot file has {}", 2 * SLOT_LEN),
            ));
        }
        if len == 0 {
            file.set_len(2 * SLOT_LEN as u64)?;
            file.sync_all()?;
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            File::open(dir)?.sync_all()?;
        }
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut bytes)?;
        let (seq, latest) = match best_slot(&bytes)? {
            Some((seq, payload)) => (seq, Some(payload)),
            None => (0, None),
        };
        Ok(SlotFile { file, seq, latest })
    }

    /// Reads the latest record of a slot file without opening it for writing; `Ok(None)`
    /// when the file does not exist or was never written.
    ///
    /// # Errors
    /// I/O errors; [`io::ErrorKind::InvalidData`] when no slot is valid.
    pub fn read(path: &Path) -> io::Result<Option<Vec<u8>>> {
        match read_optional(path)? {
            Some(bytes) => Ok(best_slot(&bytes)?.map(|(_, p)| p)),
            None => Ok(None),
        }
    }

    /// The record read at open or last written.
    pub fn latest(&self) -> Option<&[u8]> {
        self.latest.as_deref()
    }

    /// Writes `payload` into the older slot and `fdatasync`s.
    ///
    /// # Errors
    /// [`io::ErrorKind::InvalidInput`] when the payload exceeds a slot; I/O errors (the
    /// previous record then stays readable).
    pub fn write(&mut self, payload: &[u8]) -> io::Result<()> {
        use std::io::{Seek, SeekFrom};
        if payload.len() > SLOT_LEN - SLOT_HEADER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "record of {} bytes exceeds a slot ({} bytes)",
                    payload.len(),
                    SLOT_LEN - SLOT_HEADER
                ),
            ));
        }
        let seq = self.seq + 1;
        let mut buf = Vec::with_capacity(SLOT_HEADER + payload.len());
        buf.extend_from_slice(SLOT_MAGIC);
        buf.extend_from_slice(&seq.to_be_bytes());
        buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        buf.extend_from_slice(&slot_digest(seq, payload).to_be_bytes());
        buf.extend_from_slice(payload);
        self.file.seek(SeekFrom::Start((seq % 2) * SLOT_LEN as u64))?;
        self.file.write_all(&buf)?;
        self.file.sync_data()?;
        self.seq = seq;
        self.latest = Some(payload.to_vec());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_slot_falls_back_to_the_previous_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp");
        let mut f = SlotFile::open(&path).unwrap();
        for i in 0..5u8 {
            f.write(&[i; 100]).unwrap();
        }
        drop(f);
        assert_eq!(SlotFile::read(&path).unwrap(), Some(vec![4; 100]));
        // Record 5 went to slot 1 (seq 5); damage one payload byte of it.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[SLOT_LEN + SLOT_HEADER + 50] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(SlotFile::read(&path).unwrap(), Some(vec![3; 100]));
        // Writing continues after the highest valid sequence number.
        let mut f = SlotFile::open(&path).unwrap();
        assert_eq!(f.latest(), Some(&[3u8; 100][..]));
        f.write(b"next").unwrap();
        assert_eq!(SlotFile::read(&path).unwrap(), Some(b"next".to_vec()));
        // Both slots damaged: an error, not an empty checkpoint.
        std::fs::write(&path, vec![7u8; 2 * SLOT_LEN]).unwrap();
        assert_eq!(SlotFile::read(&path).unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert!(SlotFile::write(
            &mut SlotFile::open(&dir.path().join("big")).unwrap(),
            &vec![0; SLOT_LEN]
        )
        .is_err());
    }
}
