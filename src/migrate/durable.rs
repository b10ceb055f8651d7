//! Small files replaced atomically and durably: write a temporary file next to the
//! target, fsync it, rename it over the target, fsync the directory. A reader sees the
//! old or the new content, never a mix, and after `write_atomic` returns the new content
//! survives a crash or power loss.

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
