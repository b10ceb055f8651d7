//! The session workload the session benches share: `n` ids of 40 bytes (scattered
//! 128-bit hex), sessions with an hour's timeout and 64 bytes of metadata, and a fixed
//! scattered visiting order; and the disk's floor for one durable write.

use erlmcp_rollout::session::{Clock, Session, SessionId, SystemClock, Timeout};

pub fn ids(n: usize) -> Vec<SessionId> {
    (0..n)
        .map(|i| {
            SessionId::new(format!(
                "session-{:032x}",
                (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ))
            .unwrap()
        })
        .collect()
}

pub fn session(id: &SessionId) -> Session {
    let now = SystemClock.now_unix_ms();
    Session::new(id.clone(), now, Timeout::ms(3_600_000).unwrap(), vec![7u8; 64])
}

/// `0..n` visited with stride 7 919 (a prime: every index once when `n` is not a multiple).
pub fn order(n: usize) -> Vec<usize> {
    (0..n).map(|i| (i * 7_919) % n).collect()
}

/// One bare durable append, the floor a durable write is measured against: 512 bytes
/// appended to `file`, then `fdatasync`.
pub fn bare_append(file: &mut std::fs::File) {
    use std::io::Write;
    file.write_all(&[b'x'; 512]).unwrap();
    file.sync_data().unwrap();
}

/// For a bench without criterion's harness: whether it runs. `cargo bench -- FILTER`
/// passes FILTER to every bench; run only when it is part of `name` (or absent).
pub fn selected(name: &str) -> bool {
    !std::env::args()
        .skip(1)
        .any(|a| !a.starts_with('-') && !name.contains(a.as_str()))
}

/// The environment variable `name` as a number, else `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A fresh temporary directory in `BENCH_DIR` (default: the system's).
pub fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .unwrap()
}
