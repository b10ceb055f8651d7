//! The disk store's write-ahead log, from the user's side: the model test with a
//! checkpoint after every group and with the store reopened (log replayed) every few
//! operations; a torn last frame dropped and nothing before it; damage before the end
//! refused without touching the files; checkpoints emptying the log; a recycled log
//! file's stale frames never replayed; and readers that always see their acknowledged
//! writes while checkpoints prune the tail index.

#![cfg(feature = "disk")]

#[path = "session_support/model.rs"]
mod model;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use erlmcp_rollout::session::{
    BatchOutcome, DiskOptions, DiskStore, ManualClock, ScanPage, Session, SessionId, Store, StoreError, StoreOptions,
    SweepOutcome, Timeout, Visibility,
};

const T0: i64 = 1_700_000_000_000;

fn id(s: &str) -> SessionId {
    SessionId::new(s).unwrap()
}

/// Checkpoints as often as possible: one per group (in the background), and every ms.
fn eager() -> DiskOptions {
    DiskOptions {
        checkpoint_bytes: 1,
        checkpoint_interval: Some(Duration::from_millis(1)),
        checkpoint_on_close: true,
        log_extent_bytes: 4096,
    }
}

fn eager_store(opts: StoreOptions) -> DiskStore {
    let dir = tempfile::tempdir().unwrap();
    DiskStore::create_with(dir.path().join("sessions.redb"), opts, eager()).unwrap()
}

store_model!(disk_checkpoint_every_group, eager_store, cases = 64);

/// A `DiskStore` that is closed and reopened every third write: alternately with a
/// checkpoint on close (the next open reads redb) and without (the next open replays
/// the log), so every kind of record goes through the log format and the replay.
struct Reopening {
    dir: tempfile::TempDir,
    opts: StoreOptions,
    store: Mutex<Option<DiskStore>>,
    writes: AtomicUsize,
}

impl Reopening {
    fn new(opts: StoreOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Self::open(&dir, &opts, true);
        Reopening {
            dir,
            opts,
            store: Mutex::new(Some(store)),
            writes: AtomicUsize::new(0),
        }
    }

    fn open(dir: &tempfile::TempDir, opts: &StoreOptions, checkpoint_on_close: bool) -> DiskStore {
        let settings = DiskOptions {
            checkpoint_bytes: 0,
            checkpoint_interval: None,
            checkpoint_on_close,
            log_extent_bytes: 4096,
        };
        DiskStore::create_with(dir.path().join("s.redb"), opts.clone(), settings).unwrap()
    }

    fn with<T>(&self, f: impl FnOnce(&DiskStore) -> T) -> T {
        let guard = self.store.lock().unwrap();
        f(guard.as_ref().unwrap())
    }

    fn write<T>(&self, f: impl FnOnce(&DiskStore) -> T) -> T {
        let mut guard = self.store.lock().unwrap();
        let out = f(guard.as_ref().unwrap());
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if n % 3 == 0 {
            drop(guard.take());
            *guard = Some(Self::open(&self.dir, &self.opts, n % 6 == 0));
        }
        out
    }
}

impl Store for Reopening {
    fn create(&self, s: Session) -> Result<Session, StoreError> {
        self.write(|st| st.create(s))
    }
    fn get(&self, id: &SessionId) -> Result<Session, StoreError> {
        self.with(|st| st.get(id))
    }
    fn get_raw(&self, id: &SessionId) -> Result<Option<Session>, StoreError> {
        self.with(|st| st.get_raw(id))
    }
    fn put(&self, s: Session) -> Result<Session, StoreError> {
        self.write(|st| st.put(s))
    }
    fn update_if_version(&self, s: Session, expected: u64) -> Result<Session, StoreError> {
        self.write(|st| st.update_if_version(s, expected))
    }
    fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        self.write(|st| st.delete(id))
    }
    fn touch(&self, id: &SessionId) -> Result<Session, StoreError> {
        self.write(|st| st.touch(id))
    }
    fn scan(&self, after: Option<&SessionId>, limit: usize, v: Visibility) -> Result<ScanPage, StoreError> {
        self.with(|st| st.scan(after, limit, v))
    }
    fn apply_batch_if_newer(&self, records: Vec<Session>) -> Result<BatchOutcome, StoreError> {
        self.write(|st| st.apply_batch_if_newer(records))
    }
    fn sweep_expired(&self, now_ms: i64) -> Result<SweepOutcome, StoreError> {
        self.write(|st| st.sweep_expired(now_ms))
    }
}

store_model!(disk_reopened_every_third_write, Reopening::new, cases = 64);

/// Options that leave every write in the log when the store is dropped; no extents, so
/// a log file ends where its last frame does.
fn keep_log() -> DiskOptions {
    DiskOptions {
        checkpoint_bytes: 0,
        checkpoint_interval: None,
        checkpoint_on_close: false,
        log_extent_bytes: 0,
    }
}

fn opts() -> StoreOptions {
    StoreOptions::with_clock(ManualClock::new(T0))
}

fn put(store: &DiskStore, key: &str, meta: &str) -> Session {
    store
        .put(Session::new(id(key), T0, Timeout::Infinity, meta.as_bytes().to_vec()))
        .unwrap()
}

/// The log file holding the frames (the other one is header-only).
fn written_log(path: &std::path::Path) -> std::path::PathBuf {
    DiskStore::log_paths(path)
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap()
}

#[test]
fn a_torn_last_frame_is_dropped_and_nothing_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let before_last = {
        let store = DiskStore::create_with(&path, opts(), keep_log()).unwrap();
        for i in 0..20 {
            put(&store, &format!("k{i}"), &format!("v{i}"));
        }
        let before_last = std::fs::metadata(written_log(&path)).unwrap().len();
        put(&store, "k0", "the last write");
        before_last
    };
    let log = written_log(&path);
    let full = std::fs::metadata(&log).unwrap().len();
    // Every cut inside the last frame (a torn write), and garbage after it.
    for cut in [before_last + 1, before_last + 17, full - 1] {
        let bytes = std::fs::read(&log).unwrap();
        std::fs::write(&log, &bytes[..cut as usize]).unwrap();
        let store = DiskStore::create_with(&path, opts(), keep_log()).unwrap();
        // (The torn bytes stay past the valid end until overwritten: k0's version below
        // shows they were not replayed.)
        for i in 0..20 {
            let s = store.get(&id(&format!("k{i}"))).unwrap();
            assert_eq!((s.version, s.metadata.as_ref()), (1, format!("v{i}").as_bytes()));
        }
        // The store goes on after the cut: the next frame follows the last valid one.
        put(&store, "k0", "the last write");
        drop(store);
        assert_eq!(std::fs::metadata(&log).unwrap().len(), full);
    }
    let mut bytes = std::fs::read(&log).unwrap();
    bytes.extend_from_slice(&[0xAB; 100]);
    std::fs::write(&log, &bytes).unwrap();
    let store = DiskStore::create_with(&path, opts(), keep_log()).unwrap();
    let s = store.get(&id("k0")).unwrap();
    assert_eq!((s.version, s.metadata.as_ref()), (2, &b"the last write"[..]));
}

#[test]
fn damage_before_the_end_of_the_log_refuses_to_open_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    {
        let store = DiskStore::create_with(&path, opts(), keep_log()).unwrap();
        for i in 0..5 {
            put(&store, &format!("k{i}"), "v");
        }
    }
    let log = written_log(&path);
    let mut bytes = std::fs::read(&log).unwrap();
    bytes[16 + 40] ^= 0x01; // inside the first frame; four valid frames follow
    std::fs::write(&log, &bytes).unwrap();
    let e = DiskStore::create(&path, opts()).unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}");
    assert!(e.to_string().contains("damaged before its end"), "{e}");
    assert_eq!(std::fs::read(&log).unwrap(), bytes, "nothing was cut or rewritten");
}

#[test]
fn a_checkpoint_empties_the_log_and_redb_holds_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = DiskStore::create_with(&path, opts(), keep_log()).unwrap();
    for i in 0..50 {
        put(&store, &format!("k{i}"), "v");
    }
    assert!(store.delete(&id("k7")).unwrap());
    store.checkpoint().unwrap();
    drop(store);
    // Reopened with the logs as they are, nothing is replayed on top of redb (the frames
    // in the recycled file are at or below the checkpoint mark).
    let store = DiskStore::create_with(&path, opts(), keep_log()).unwrap();
    assert_eq!(store.scan(None, 100, Visibility::Raw).unwrap().records.len(), 50);
    drop(store);
    // redb alone (the logs removed) holds every record, the tombstone included.
    for log in DiskStore::log_paths(&path) {
        std::fs::remove_file(log).unwrap();
    }
    let store = DiskStore::create(&path, opts()).unwrap();
    assert_eq!(store.scan(None, 100, Visibility::Raw).unwrap().records.len(), 50);
    assert!(store.get_raw(&id("k7")).unwrap().unwrap().tombstone);
}

/// A checkpointed log file is recycled, not truncated: its old frames stay until new
/// ones overwrite them. Written again from its start by a later generation and replayed
/// after a crash, the file's stale frames must end the log, never be replayed, and never
/// make the open refuse: whether a stale frame follows the new one directly (same
/// length as the frame it overwrote) or the remains of one do (shorter).
#[test]
fn stale_frames_of_a_recycled_log_file_are_never_replayed() {
    let long = "x".repeat(300);
    for extent in [0, 1 << 20] {
        for gen2 in ["z".repeat(300), "short".to_string()] {
            let case = format!("extent {extent}, {} bytes", gen2.len());
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("s.redb");
            let settings = DiskOptions {
                log_extent_bytes: extent,
                ..keep_log()
            };
            let store = DiskStore::create_with(&path, opts(), settings.clone()).unwrap();
            // Generation 1 of file A: 40 frames, one long record each.
            for i in 0..40 {
                put(&store, &format!("k{i}"), &long);
            }
            store.checkpoint().unwrap(); // A sealed, checkpointed, recycled; B active
            put(&store, "k1", "in B");
            store.checkpoint().unwrap(); // B recycled; A active again
                                         // Generation 2 of file A: one frame over the first of generation 1.
            put(&store, "k0", &gen2);
            drop(store); // no checkpoint: generation 2 is replayed by the next open
            let store = DiskStore::create_with(&path, opts(), settings).unwrap();
            let k0 = store.get(&id("k0")).unwrap();
            assert_eq!((k0.version, k0.metadata.as_ref()), (2, gen2.as_bytes()), "{case}");
            let k1 = store.get(&id("k1")).unwrap();
            assert_eq!((k1.version, k1.metadata.as_ref()), (2, &b"in B"[..]), "{case}");
            for i in 2..40 {
                let s = store.get(&id(&format!("k{i}"))).unwrap();
                assert_eq!((s.version, s.metadata.as_ref()), (1, long.as_bytes()), "k{i}, {case}");
            }
            // The store goes on: the next frame follows generation 2's, and a further
            // open replays both.
            put(&store, "k2", "after");
            drop(store);
            let store = DiskStore::create(&path, opts()).unwrap();
            assert_eq!(store.get(&id("k0")).unwrap().version, 2, "{case}");
            assert_eq!(store.get(&id("k2")).unwrap().version, 2, "{case}");
            assert_eq!(
                store.scan(None, 100, Visibility::Raw).unwrap().records.len(),
                40,
                "{case}"
            );
        }
    }
}

/// A log file grows by zero-filled extents past the frame that needs room, and keeps
/// its length through checkpoints (recycled) and reopens: appends within it change no
/// file size.
#[test]
fn log_files_grow_by_extents_and_keep_their_length() {
    const EXTENT: u64 = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let settings = DiskOptions {
        log_extent_bytes: EXTENT,
        ..keep_log()
    };
    let lens = || DiskStore::log_paths(&path).map(|p| std::fs::metadata(p).unwrap().len());
    let store = DiskStore::create_with(&path, opts(), settings.clone()).unwrap();
    assert_eq!(lens(), [16, 16], "a new file is its header");
    put(&store, "k0", "v");
    let [grown, other] = lens();
    assert!(
        grown > 16 + EXTENT && grown < 16 + EXTENT + 200 && other == 16,
        "{grown} {other}"
    );
    for i in 1..20 {
        put(&store, &format!("k{i}"), "v");
    }
    assert_eq!(lens(), [grown, 16], "frames within the extent");
    store.checkpoint().unwrap(); // file 0 recycled, file 1 active
    assert_eq!(lens()[0], grown, "recycled, not truncated");
    put(&store, "k0", "w");
    store.checkpoint().unwrap(); // file 1 recycled, file 0 active again
    put(&store, "k1", "w");
    assert_eq!(lens()[0], grown, "the recycled file is written from its start");
    drop(store);
    let store = DiskStore::create_with(&path, opts(), settings).unwrap();
    // 100 records of 1 KiB: past the extent, so the file grows again.
    let kib = "y".repeat(1024);
    for i in 0..100 {
        put(&store, &format!("g{i}"), &kib);
    }
    assert!(lens()[0] > 100 * 1024, "{:?}", lens());
    drop(store);
    let store = DiskStore::create(&path, opts()).unwrap();
    assert_eq!(store.scan(None, 200, Visibility::Raw).unwrap().records.len(), 120);
    assert_eq!(store.get(&id("k1")).unwrap().metadata.as_ref(), b"w");
}

/// Writers read back each acknowledged write at once (get, get_raw, a scan page) while
/// checkpoints run continuously and prune the tail index: an entry that left the index
/// before redb held it would show up as a stale or missing read.
#[test]
fn acknowledged_writes_stay_visible_while_checkpoints_prune() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DiskStore::create_with(dir.path().join("s.redb"), opts(), eager()).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let checkpointer = {
        let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                store.checkpoint().unwrap();
                n += 1;
            }
            n
        })
    };
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                for w in 1..=150u64 {
                    let key = id(&format!("t{t}-{}", w % 5));
                    let s = store
                        .put(Session::new(
                            key.clone(),
                            T0,
                            Timeout::Infinity,
                            w.to_be_bytes().to_vec(),
                        ))
                        .unwrap();
                    let got = store.get(&key).unwrap();
                    assert_eq!((got.version, got.metadata.as_ref()), (s.version, &w.to_be_bytes()[..]));
                    assert_eq!(store.get_raw(&key).unwrap().unwrap().version, s.version);
                    let page = store.scan(None, 1000, Visibility::Raw).unwrap();
                    let seen = page.records.iter().find(|r| r.id == key).unwrap();
                    assert!(
                        seen.version >= s.version,
                        "scan saw v{} after v{} was acknowledged",
                        seen.version,
                        s.version
                    );
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let checkpoints = checkpointer.join().unwrap();
    assert!(checkpoints > 1, "only {checkpoints} checkpoints ran");
}
