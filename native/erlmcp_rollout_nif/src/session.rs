//! Session-store NIFs (behind `erlmcp_session_native`): a handle per open
//! store, shared by every `init/1` that names the same store.
//!
//! Scheduling: memory-store calls run in the caller on its normal scheduler
//! (microseconds). Calls that may wait for I/O (disk, etcd) and whole-store
//! walks (sweep) never block a scheduler: the NIF hands the call to a worker
//! thread and returns `async`; the worker sends `{Tag, Result}` to the caller
//! (the Erlang side waits for it with a selective receive on `Tag`, a fresh
//! reference). Worker threads are not scheduler threads, so many concurrent
//! callers do not queue behind the ten dirty I/O schedulers, and concurrent
//! durable writes share commits.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex, Weak};
use std::time::Duration;

use erlmcp_rollout::etcd::EtcdSecurity;
use erlmcp_rollout::migrate::dual::{Migrator, MigratorConfig, RelayHandle};
use erlmcp_rollout::migrate::etcd_phase::{EtcdPhaseStore, PhaseWatchOptions, PhaseWatcher};
use erlmcp_rollout::migrate::outbox::Outbox;
use erlmcp_rollout::migrate::phase::PhaseStore;
use erlmcp_rollout::migrate::phase::{FilePhaseStore, Phase};
use erlmcp_rollout::migrate::MigrateError;
use erlmcp_rollout::session::{
    Clock, DiskStore, EtcdOptions, EtcdStore, MemoryStore, MetaFormat, PinnableClock, Session, SessionId, Store,
    StoreError, StoreOptions, Timeout, TouchPolicy, Visibility, MAX_METADATA_LEN,
};
use rustler::env::SavedTerm;
use rustler::sys::{
    c_void, enif_alloc_resource, enif_get_resource, enif_make_resource, enif_open_resource_type, enif_release_resource,
    ErlNifEnv, ErlNifResourceFlags, ErlNifResourceType,
};
use rustler::types::tuple::get_tuple;
use rustler::{Atom, Binary, Decoder, Encoder, Env, LocalPid, NewBinary, NifResult, OwnedEnv, Term};

use crate::etf;
use crate::term::{binary_bytes, proper_list, set_clock, text};

mod atoms {
    rustler::atoms! {
        ok,
        error,
        memory,
        disk,
        etcd,
        infinity,
        not_found,
        already_exists,
        conflict,
        unavailable,
        corrupt,
        invalid,
        internal,
        done,
        system,
        name,
        touch_permille,
        tombstone_retention_ms,
        prefix,
        store,
        bad_option,
        bad_store,
        nif_panicked,
        expired,
        tombstones,
        async_ = "async",
        term_to_binary,
        hybrid,
        state_dir,
        migration_phase,
        shadow_sample,
        phase_etcd,
        gate,
        migration,
        off,
        phase1,
        phase2,
        phase3,
        cleanup,
        etf,
        absent,
        live,
        dead,
    }
}

/// The clock every store opened here uses: the system clock unless pinned
/// with `session_set_clock/1` (tests move time by hand).
static CLOCK: LazyLock<Arc<PinnableClock>> = LazyLock::new(|| Arc::new(PinnableClock::default()));

/// Which store a handle is; also the registry key that makes two `init`s of
/// the same store share it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum StoreKey {
    Memory(String),
    Disk(PathBuf),
    /// Endpoints (sorted), key prefix, TLS and user.
    Etcd(Vec<String>, Vec<u8>, EtcdSecurity),
}

/// An open store, as the Erlang side holds it.
pub struct StoreHandle {
    store: Arc<dyn Store>,
    /// Calls may wait for I/O: run them on a worker thread.
    blocking: bool,
    /// For a dual-write migration (`{hybrid, Primary, Secondary}`).
    hybrid: Option<Arc<Hybrid>>,
}

/// A dual-write migrator and its relay thread (stopped when the last handle goes).
struct Hybrid {
    migrator: Arc<Migrator>,
    _relay: RelayHandle,
    /// With the phase in etcd: applies changes made elsewhere and acks them.
    phase_watcher: Option<PhaseWatcher>,
}

/// `phase_etcd => #{endpoints := [..], node := Name, prefix => P, expect_nodes => [Name],
/// tls => #{..}, auth => #{..}}`.
struct PhaseEtcd {
    endpoints: Vec<String>,
    prefix: String,
    node: String,
    expect: Vec<String>,
    security: EtcdSecurity,
}

/// `base`: the `tls` and `auth` of the init options, unless the map has its own.
fn decode_phase_etcd(v: Term<'_>, base: &EtcdSecurity) -> Result<PhaseEtcd, String> {
    let usage = "phase_etcd must be #{endpoints => [\"host:port\"], node => Name, prefix => P, expect_nodes => [Name], tls => #{..}, auth => #{..}}";
    let iter = rustler::types::map::MapIterator::new(v).ok_or(usage)?;
    let mut p = PhaseEtcd {
        endpoints: Vec::new(),
        prefix: "erlmcp/migration/".into(),
        node: String::new(),
        expect: Vec::new(),
        security: crate::etcd::decode_security(v, base)?,
    };
    let names = |t: Term<'_>| -> Option<Vec<String>> {
        proper_list(t)?
            .into_iter()
            .map(|e| text(e).or_else(|| e.atom_to_string().ok()))
            .collect()
    };
    for (k, v) in iter {
        match k.atom_to_string().as_deref() {
            Ok("endpoints") => p.endpoints = names(v).ok_or(usage)?,
            Ok("prefix") => p.prefix = text(v).ok_or(usage)?,
            Ok("node") => p.node = text(v).or_else(|| v.atom_to_string().ok()).ok_or(usage)?,
            Ok("expect_nodes") => p.expect = names(v).ok_or(usage)?,
            _ => {}
        }
    }
    if p.endpoints.is_empty() || p.node.is_empty() {
        return Err(usage.into());
    }
    Ok(p)
}

static HYBRIDS: LazyLock<Mutex<HashMap<PathBuf, Weak<Hybrid>>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

// ------------------------------------------------ the handle resource
//
// Store handles are a resource type of this library's own rather than
// rustler's `#[resource_impl]`: rustler finds the resource type on every
// decode in a SipHash map keyed by `TypeId` (~20 ns of each session call,
// perf); here it is one pointer, opened by the load callback.

static HANDLE_TYPE: AtomicPtr<ErlNifResourceType> = AtomicPtr::new(std::ptr::null_mut());

// enif_alloc_resource returns word-aligned memory.
const _: () = assert!(std::mem::align_of::<StoreHandle>() <= std::mem::align_of::<usize>());

/// The VM's destructor of a handle: the last reference is gone. It runs on
/// whatever scheduler ran the garbage collection, and dropping the last
/// handle of a store may close it (a redb commit and fsync) or stop a hybrid's
/// relay and phase watcher (thread joins, an etcd retry): so the handle is
/// moved out and handed to the reaper thread, which drops it. Only if the
/// reaper cannot be reached is it dropped here.
unsafe extern "C" fn drop_handle(_env: *mut ErlNifEnv, obj: *mut c_void) {
    // SAFETY: `obj` holds the StoreHandle `handle_term` wrote; it is read out
    // exactly once (the VM calls the destructor once) and never used again.
    let handle = unsafe { std::ptr::read(obj as *mut StoreHandle) };
    let _ = catch_unwind(AssertUnwindSafe(move || reap(handle)));
}

/// Hands `handle` to the reaper thread (started on first use).
fn reap(handle: StoreHandle) {
    static REAPER: LazyLock<Option<Mutex<std::sync::mpsc::Sender<StoreHandle>>>> = LazyLock::new(|| {
        let (tx, rx) = std::sync::mpsc::channel::<StoreHandle>();
        std::thread::Builder::new()
            .name("erlmcp_session_reaper".into())
            .spawn(move || {
                for h in rx {
                    let _ = catch_unwind(AssertUnwindSafe(move || drop(h)));
                }
            })
            .ok()
            .map(|_| Mutex::new(tx))
    });
    match REAPER.as_ref() {
        Some(tx) => {
            let sent = tx.lock().unwrap_or_else(|p| p.into_inner()).send(handle);
            // The reaper is gone (cannot happen while the library is loaded): drop here.
            if let Err(std::sync::mpsc::SendError(h)) = sent {
                drop(h);
            }
        }
        None => drop(handle),
    }
}

// A second load of this library (the stub module purged, deleted, purged,
// then loaded again) runs `load` again in the *same* library instance: the
// VM keeps a library mapped while resources of its types live, and the
// dlopen of the same path returns that mapping, so every static (stores,
// registry, reaper, flag engine, threads) is shared and keeps running. The
// VM cannot hand the old resource type over after a purge (the purge
// unlinks it: `ERL_NIF_RT_TAKEOVER` finds nothing, and rustler's flag enum
// cannot say CREATE|TAKEOVER), so the load creates a new type (with
// `ERL_NIF_RT_CREATE` a type of the same name still linked fails the load
// cleanly), and handles made before the
// reload carry an earlier type: decoding tries the current type, then the
// earlier ones of this instance (`EARLIER`).
//
// Invariants:
// - every type ever stored in `HANDLE_TYPE` has a pin: one resource of that
//   type, allocated by the load that opened it and never released, so the
//   VM never frees the type and its pointer stays unique to this library;
//   the pin's destructor therefore never runs (it has no StoreHandle);
// - `EARLIER[..EARLIER_LEN]` are such pinned types, written before
//   `EARLIER_LEN` is raised (Release) and never changed after;
// - every type's destructor is `drop_handle` of this instance and every
//   resource of every type holds a `StoreHandle` written by `handle_term`.
//
// A library at another path (or a rebuilt one after the old mapping went
// away) is another instance with its own statics: its handles and this
// instance's do not mix (decoding them is `badarg`, never a misread), and
// this instance's threads keep running until the node stops.

/// How many reloads one library instance serves; a load beyond it fails
/// ("Library load-call unsuccessful") and the node needs a restart.
pub const MAX_RELOADS: usize = 64;

static EARLIER: [AtomicPtr<ErlNifResourceType>; MAX_RELOADS] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_RELOADS];
static EARLIER_LEN: AtomicUsize = AtomicUsize::new(0);

/// Opens the store handle resource type: from the library's load callback,
/// on the first load and on every later load of the same instance.
pub fn open_handle_type(env: Env<'_>) -> bool {
    let previous = HANDLE_TYPE.load(Ordering::Acquire);
    let kept = EARLIER_LEN.load(Ordering::Acquire);
    if !previous.is_null() && kept >= MAX_RELOADS {
        return false;
    }
    let mut tried = std::mem::MaybeUninit::uninit();
    // SAFETY: called from the load callback with its env; the name is a
    // NUL-terminated static.
    let t = unsafe {
        enif_open_resource_type(
            env.as_c_arg(),
            std::ptr::null(),
            c"erlmcp_session_store".as_ptr(),
            Some(drop_handle),
            ErlNifResourceFlags::ERL_NIF_RT_CREATE,
            tried.as_mut_ptr(),
        )
    };
    if t.is_null() {
        // The load fails; nothing of this instance changed.
        return false;
    }
    let t = t.cast_mut();
    if t != previous {
        // The pin (see the invariants above): never released.
        // SAFETY: `t` is the type just opened; a zero-sized resource.
        let pin = unsafe { enif_alloc_resource(t, 0) };
        if pin.is_null() {
            return false;
        }
        if !previous.is_null() {
            EARLIER[kept].store(previous, Ordering::Relaxed);
            EARLIER_LEN.store(kept + 1, Ordering::Release);
        }
    }
    HANDLE_TYPE.store(t, Ordering::Release);
    true
}

/// The handle in `term` if it is a resource of a type of an earlier load of
/// this instance (the slow path of decoding: handles older than a reload).
#[cold]
fn earlier_handle(env: Env<'_>, term: Term<'_>) -> *const c_void {
    let mut obj: *const c_void = std::ptr::null();
    for slot in &EARLIER[..EARLIER_LEN.load(Ordering::Acquire)] {
        // SAFETY: a pinned type of this instance (invariants above).
        if unsafe { enif_get_resource(env.as_c_arg(), term.as_c_arg(), slot.load(Ordering::Relaxed), &mut obj) } != 0 {
            return obj;
        }
    }
    std::ptr::null()
}

/// A new handle term that owns `handle`.
fn handle_term(env: Env<'_>, handle: StoreHandle) -> Term<'_> {
    // SAFETY: the type was opened at load (no NIF runs otherwise); the
    // memory is fresh, word-aligned and large enough; the term keeps the
    // resource alive once this function's reference is released.
    unsafe {
        let obj = enif_alloc_resource(HANDLE_TYPE.load(Ordering::Acquire), std::mem::size_of::<StoreHandle>());
        (obj as *mut StoreHandle).write(handle);
        let term = enif_make_resource(env.as_c_arg(), obj);
        enif_release_resource(obj);
        Term::new(env, term)
    }
}

impl<'a> Decoder<'a> for &'a StoreHandle {
    fn decode(term: Term<'a>) -> NifResult<Self> {
        let mut obj: *const c_void = std::ptr::null();
        // SAFETY: a handle term holds a StoreHandle written by
        // `handle_term`, alive while the term is (`'a`).
        unsafe {
            if enif_get_resource(
                term.get_env().as_c_arg(),
                term.as_c_arg(),
                HANDLE_TYPE.load(Ordering::Relaxed),
                &mut obj,
            ) == 0
            {
                obj = earlier_handle(term.get_env(), term);
                if obj.is_null() {
                    return Err(rustler::Error::BadArg);
                }
            }
            Ok(&*(obj as *const StoreHandle))
        }
    }
}

/// An open store and what it was opened with: a second open must ask for the
/// same, or it is an error (it would silently get the first one's settings).
struct Registered {
    store: Weak<dyn Store>,
    settings: Settings,
}

/// The options that shape an open store, compared on re-open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Settings {
    touch: TouchPolicy,
    tombstone_retention_ms: Option<u64>,
    /// A side of a migration (keeps tombstones); a plain memory store frees the dead.
    migration: bool,
}

static REGISTRY: LazyLock<Mutex<HashMap<StoreKey, Registered>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// Why a store could not be opened.
enum OpenFail {
    Store(StoreError),
    /// The store is open with other settings.
    Conflict(String),
}

fn open_fail_term<'a>(env: Env<'a>, e: &OpenFail) -> Term<'a> {
    match e {
        OpenFail::Store(e) => (atoms::error(), error_term(env, e)).encode(env),
        OpenFail::Conflict(m) => (atoms::error(), (atoms::bad_store(), m.as_str())).encode(env),
    }
}

fn err_text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Where `path` points, made absolute without requiring the file to exist
/// (the directory must): two spellings of one file get one store.
fn canonical_file(path: &Path) -> Result<PathBuf, String> {
    let name = path
        .file_name()
        .ok_or_else(|| format!("disk store path {} has no file name", path.display()))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = parent
        .canonicalize()
        .map_err(|e| format!("disk store directory {}: {e}", parent.display()))?;
    Ok(dir.join(name))
}

struct OpenOptions {
    name: String,
    prefix: Vec<u8>,
    touch: TouchPolicy,
    tombstone_retention_ms: Option<u64>,
    /// `tls` and `auth`: for every etcd store and the etcd phase (unless they have their own).
    etcd: EtcdSecurity,
}

fn store_options(o: &OpenOptions) -> StoreOptions {
    let defaults = StoreOptions::default();
    StoreOptions {
        clock: CLOCK.clone(),
        touch: o.touch,
        tombstone_retention_ms: o.tombstone_retention_ms.unwrap_or(defaults.tombstone_retention_ms),
    }
}

fn open_shared(key: StoreKey, o: &OpenOptions, migration: bool) -> Result<Arc<dyn Store>, OpenFail> {
    let settings = Settings {
        touch: o.touch,
        tombstone_retention_ms: o.tombstone_retention_ms,
        migration,
    };
    // Held while opening: two inits of one file open it once.
    let mut registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = registry.get(&key) {
        if let Some(store) = r.store.upgrade() {
            let same = Settings {
                migration: r.settings.migration,
                ..settings
            } == r.settings;
            if !same {
                return Err(OpenFail::Conflict(format!(
                    "{key:?} is already open in this VM with other settings ({:?}); open it with the same options",
                    r.settings
                )));
            }
            // A plain open shares a migration side as it is (it keeps the tombstones the
            // migration needs); a memory store opened plainly frees the dead at once, so it
            // cannot become a migration side.
            if migration && !r.settings.migration && matches!(key, StoreKey::Memory(_)) {
                return Err(OpenFail::Conflict(format!(
                    "{key:?} is open in this VM as a plain memory store, which frees deleted sessions \
                     at once (no tombstones): a migration side needs a memory store of its own, \
                     {{memory, OtherName}}"
                )));
            }
            return Ok(store);
        }
    }
    // A handle of this store may be being dropped right now (its last
    // reference was garbage collected): its file stays locked until the drop
    // ends, so wait for that briefly rather than fail.
    let closing = registry.contains_key(&key);
    registry.retain(|_, r| r.store.strong_count() > 0);
    let store: Arc<dyn Store> = match &key {
        StoreKey::Memory(_) if migration => Arc::new(MemoryStore::new(store_options(o))),
        StoreKey::Memory(_) => Arc::new(MemoryStore::without_tombstones(store_options(o))),
        StoreKey::Etcd(endpoints, prefix, security) => Arc::new(
            EtcdStore::connect(
                endpoints,
                prefix.clone(),
                EtcdOptions {
                    security: security.clone(),
                    ..EtcdOptions::default()
                },
                store_options(o),
            )
            .map_err(OpenFail::Store)?,
        ),
        StoreKey::Disk(path) => {
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            loop {
                match DiskStore::create(path, store_options(o)) {
                    Ok(store) => break Arc::new(store),
                    Err(StoreError::Unavailable { .. }) if closing && std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(OpenFail::Store(e)),
                }
            }
        }
    };
    registry.insert(
        key,
        Registered {
            store: Arc::downgrade(&store),
            settings,
        },
    );
    Ok(store)
}

// ---------------------------------------------------------------- workers

type Job = Box<dyn FnOnce() + Send>;

/// Threads that run blocking store calls and reply by message. Grows on
/// demand (a call never waits for a busy worker, so concurrent writers reach
/// the store together and share commits) up to `MAX_WORKERS`; idle workers
/// exit after a minute.
struct Pool {
    state: Mutex<PoolState>,
    ready: Condvar,
}

struct PoolState {
    queue: VecDeque<Job>,
    idle: usize,
    threads: usize,
}

const MAX_WORKERS: usize = 512;
const IDLE_EXIT: Duration = Duration::from_secs(60);

static POOL: Pool = Pool {
    state: Mutex::new(PoolState {
        queue: VecDeque::new(),
        idle: 0,
        threads: 0,
    }),
    ready: Condvar::new(),
};

impl Pool {
    fn submit(&'static self, job: Job) -> Result<(), String> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.queue.push_back(job);
        if st.idle < st.queue.len() && st.threads < MAX_WORKERS {
            let spawned = std::thread::Builder::new()
                .name("erlmcp_session_io".into())
                .spawn(move || self.work());
            match spawned {
                Ok(_) => st.threads += 1,
                Err(e) if st.threads == 0 => {
                    st.queue.pop_back();
                    return Err(format!("cannot start a session worker thread: {e}"));
                }
                // Some worker exists and will get to it.
                Err(_) => {}
            }
        }
        drop(st);
        self.ready.notify_one();
        Ok(())
    }

    fn work(&'static self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(job) = st.queue.pop_front() {
                drop(st);
                // A job catches its own call's panic and replies (see `run`); keep the thread.
                let _ = catch_unwind(AssertUnwindSafe(job));
                st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                continue;
            }
            st.idle += 1;
            let (next, timeout) = self
                .ready
                .wait_timeout(st, IDLE_EXIT)
                .unwrap_or_else(|p| p.into_inner());
            st = next;
            st.idle -= 1;
            if timeout.timed_out() && st.queue.is_empty() {
                st.threads -= 1;
                return;
            }
        }
    }
}

/// What a store holds under a key (`session_known/3`).
#[derive(Clone, Copy)]
enum Known {
    /// No record: never written, or a tombstone a sweep removed.
    Absent,
    Live,
    /// A tombstone (deleted) or an expired session.
    Dead,
}

/// The owned result of a store call, turned into a term by the replier.
enum Reply {
    Ok,
    Session(Session),
    Deleted(bool),
    Page(Vec<SessionId>, Option<SessionId>),
    Swept(usize, usize),
    Batch(usize, usize),
    Many(Vec<Result<Session, StoreError>>),
    Known(Known),
    Failed(StoreError),
    Panicked,
}

fn encode_reply<'a>(env: Env<'a>, reply: &Reply) -> Term<'a> {
    match reply {
        Reply::Ok => atoms::ok().encode(env),
        Reply::Session(s) => (atoms::ok(), session_tuple(env, s)).encode(env),
        Reply::Deleted(d) => (atoms::ok(), *d).encode(env),
        Reply::Page(ids, next) => {
            let list: Vec<Term<'a>> = ids.iter().map(|id| bytes_term(env, id.as_bytes())).collect();
            let next = match next {
                Some(id) => bytes_term(env, id.as_bytes()),
                None => atoms::done().encode(env),
            };
            (atoms::ok(), list, next).encode(env)
        }
        Reply::Swept(expired, tombstones) => (atoms::ok(), *expired, *tombstones).encode(env),
        Reply::Batch(applied, skipped) => (atoms::ok(), *applied, *skipped).encode(env),
        Reply::Many(results) => {
            let list: Vec<Term<'a>> = results
                .iter()
                .map(|r| match r {
                    Ok(s) => (atoms::ok(), session_tuple(env, s)).encode(env),
                    Err(e) => (atoms::error(), error_term(env, e)).encode(env),
                })
                .collect();
            (atoms::ok(), list).encode(env)
        }
        Reply::Known(k) => {
            let k = match k {
                Known::Absent => atoms::absent(),
                Known::Live => atoms::live(),
                Known::Dead => atoms::dead(),
            };
            (atoms::ok(), k).encode(env)
        }
        Reply::Failed(e) => (atoms::error(), error_term(env, e)).encode(env),
        Reply::Panicked => (atoms::error(), atoms::nif_panicked()).encode(env),
    }
}

/// Runs `call` inline (memory store) or on a worker that sends
/// `{Tag, Result}` to the caller (returns `async`).
fn run<'a>(
    env: Env<'a>,
    handle: &StoreHandle,
    tag: Term<'a>,
    always_async: bool,
    call: impl FnOnce(&dyn Store) -> Reply + Send + 'static,
) -> Term<'a> {
    if !handle.blocking && !always_async {
        let reply = catch_unwind(AssertUnwindSafe(|| call(handle.store.as_ref()))).unwrap_or(Reply::Panicked);
        return encode_reply(env, &reply);
    }
    let pid: LocalPid = env.pid();
    let mut owned = OwnedEnv::new();
    let saved: SavedTerm = owned.save(tag);
    let store = handle.store.clone();
    let job: Job = Box::new(move || {
        let reply = catch_unwind(AssertUnwindSafe(|| call(store.as_ref()))).unwrap_or(Reply::Panicked);
        // The caller may have died meanwhile: nothing to do then.
        let _ = owned.send_and_clear(&pid, |env| {
            let tag = saved.load(env);
            (tag, encode_reply(env, &reply))
        });
    });
    match POOL.submit(job) {
        Ok(()) => atoms::async_().encode(env),
        Err(reason) => (atoms::error(), (atoms::unavailable(), reason.as_str()).encode(env)).encode(env),
    }
}

// ---------------------------------------------------------------- terms

fn bytes_term<'a>(env: Env<'a>, bytes: &[u8]) -> Term<'a> {
    let mut bin = NewBinary::new(env, bytes.len());
    bin.as_mut_slice().copy_from_slice(bytes);
    Binary::from(bin).to_term(env)
}

fn timeout_term<'a>(env: Env<'a>, t: Timeout) -> Term<'a> {
    match t {
        Timeout::Infinity => atoms::infinity().encode(env),
        Timeout::Ms(ms) => ms.get().encode(env),
    }
}

/// `{CreatedAt, LastAccessed, TimeoutMs | infinity, Metadata, Version}` with
/// Metadata `{etf, Bin}` when the writer said the bytes are external term
/// format (the Erlang side decodes them with `[safe]`), else the bytes.
fn session_tuple<'a>(env: Env<'a>, s: &Session) -> Term<'a> {
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
fn meta_bytes<'a>(meta: Term<'a>) -> Result<Option<(&'a [u8], MetaFormat)>, String> {
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
fn error_term<'a>(env: Env<'a>, e: &StoreError) -> Term<'a> {
    match e {
        StoreError::NotFound { .. } => atoms::not_found().encode(env),
        StoreError::AlreadyExists { .. } => atoms::already_exists().encode(env),
        StoreError::Conflict { expected, actual, .. } => (atoms::conflict(), *expected, *actual).encode(env),
        StoreError::Unavailable { .. } => (atoms::unavailable(), err_text(e)).encode(env),
        StoreError::Corrupt { .. } => (atoms::corrupt(), err_text(e)).encode(env),
        StoreError::Invalid(_) => (atoms::invalid(), err_text(e)).encode(env),
        StoreError::Access(a) => crate::etcd::access_error_term(env, a),
        other => (atoms::internal(), err_text(other)).encode(env),
    }
}

fn invalid<'a>(env: Env<'a>, what: &str) -> Term<'a> {
    (atoms::error(), (atoms::invalid(), what)).encode(env)
}

fn session_id(term: Term<'_>) -> Result<SessionId, String> {
    let bytes = binary_bytes(term).ok_or("session id must be a binary")?;
    SessionId::new(bytes).map_err(err_text)
}

fn decode_timeout(term: Term<'_>) -> Result<Timeout, String> {
    if let Ok(a) = term.decode::<Atom>() {
        if a == atoms::infinity() {
            return Ok(Timeout::Infinity);
        }
    }
    let ms: u64 = term
        .decode()
        .map_err(|_| "timeout_ms must be a positive integer or infinity".to_string())?;
    Timeout::ms(ms).map_err(err_text)
}

fn decode_time(term: Term<'_>, field: &str) -> Result<i64, String> {
    term.decode::<i64>()
        .map_err(|_| format!("{field} must be an integer (milliseconds, fits 64 bits)"))
}

// ---------------------------------------------------------------- NIFs

/// `session_open(Spec, Opts) -> {ok, Handle, Kind} | {error, Reason}` with
/// Spec `memory | {disk, Path} | {etcd, Endpoints} | {hybrid, Primary,
/// Secondary}` and Opts a map (`name`, `prefix`, `touch_permille`,
/// `tombstone_retention_ms`; for hybrid see `open_hybrid`). Opening a disk file runs crash recovery: a
/// dirty I/O scheduler.
#[rustler::nif(schedule = "DirtyIo")]
fn session_open<'a>(env: Env<'a>, spec: Term<'a>, opts: Term<'a>) -> Term<'a> {
    let o = match decode_open_options(opts) {
        Ok(o) => o,
        Err(e) => return (atoms::error(), (atoms::bad_option(), e)).encode(env),
    };
    if let Some([tag, primary, secondary]) = triple(spec) {
        if tag.decode::<Atom>().ok() == Some(atoms::hybrid()) {
            return open_hybrid(env, primary, secondary, opts, &o);
        }
    }
    let (key, kind) = match decode_spec(spec, &o) {
        Ok(k) => k,
        Err(e) => return (atoms::error(), (atoms::bad_store(), e)).encode(env),
    };
    match open_shared(key, &o, false) {
        Ok(store) => {
            let blocking = kind != atoms::memory();
            let handle = StoreHandle {
                store,
                blocking,
                hybrid: None,
            };
            (atoms::ok(), handle_term(env, handle), kind).encode(env)
        }
        Err(e) => open_fail_term(env, &e),
    }
}

fn triple(term: Term<'_>) -> Option<[Term<'_>; 3]> {
    get_tuple(term).ok()?.try_into().ok()
}

fn phase_atom(p: Phase) -> Atom {
    match p {
        Phase::Off => atoms::off(),
        Phase::Phase1 => atoms::phase1(),
        Phase::Phase2 => atoms::phase2(),
        Phase::Phase3 => atoms::phase3(),
        Phase::Cleanup => atoms::cleanup(),
    }
}

fn decode_phase(term: Term<'_>) -> Option<Phase> {
    let a: Atom = term.decode().ok()?;
    Phase::ALL.into_iter().find(|p| phase_atom(*p) == a)
}

fn migrate_error_term<'a>(env: Env<'a>, e: &MigrateError) -> Term<'a> {
    match e {
        MigrateError::Access(a)
        | MigrateError::Store {
            source: StoreError::Access(a),
            ..
        } => crate::etcd::access_error_term(env, a),
        MigrateError::Gate(g) => (atoms::gate(), g.to_string()).encode(env),
        MigrateError::Store {
            source: StoreError::Unavailable { .. },
            ..
        } => (atoms::unavailable(), e.to_string()).encode(env),
        other => (atoms::migration(), other.to_string()).encode(env),
    }
}

/// `{hybrid, Primary, Secondary}` with `state_dir` (outbox and phase file),
/// optional `migration_phase` (the phase to be in: reached one gated step at
/// a time from the saved one) and `shadow_sample`. One migrator per state
/// directory in the VM.
fn open_hybrid<'a>(env: Env<'a>, primary: Term<'a>, secondary: Term<'a>, opts: Term<'a>, o: &OpenOptions) -> Term<'a> {
    let bad = |e: String| (atoms::error(), (atoms::bad_option(), e)).encode(env);
    let mut state_dir = None;
    let mut want_phase = None;
    let mut shadow = None;
    let mut phase_etcd = None;
    if let Some(iter) = rustler::types::map::MapIterator::new(opts) {
        for (k, v) in iter {
            let Ok(key) = k.decode::<Atom>() else { continue };
            if key == atoms::state_dir() {
                match path_text(v) {
                    Some(p) if !p.is_empty() => state_dir = Some(PathBuf::from(p)),
                    _ => return bad("state_dir must be a non-empty string or binary".into()),
                }
            } else if key == atoms::migration_phase() {
                match decode_phase(v) {
                    Some(p) => want_phase = Some(p),
                    None => return bad("migration_phase must be off, phase1, phase2, phase3 or cleanup".into()),
                }
            } else if key == atoms::phase_etcd() {
                match decode_phase_etcd(v, &o.etcd) {
                    Ok(p) => phase_etcd = Some(p),
                    Err(e) => return bad(e),
                }
            } else if key == atoms::shadow_sample() {
                match v.decode::<u64>() {
                    Ok(n) => shadow = Some(n),
                    Err(_) => return bad("shadow_sample must be a non-negative integer".into()),
                }
            }
        }
    }
    let Some(dir) = state_dir else {
        return bad("a hybrid store needs state_dir (its outbox and phase file live there)".into());
    };
    let dir = match dir.canonicalize() {
        Ok(d) => d,
        Err(e) => return bad(format!("state_dir {}: {e}", dir.display())),
    };
    let side = |spec: Term<'a>| decode_spec(spec, o).map_err(|e| (atoms::error(), (atoms::bad_store(), e)).encode(env));
    let (p_key, p_kind) = match side(primary) {
        Ok(x) => x,
        Err(t) => return t,
    };
    let (s_key, s_kind) = match side(secondary) {
        Ok(x) => x,
        Err(t) => return t,
    };
    // One store on both sides would copy every write onto itself and verify it against itself.
    if p_key == s_key {
        return (
            atoms::error(),
            (
                atoms::bad_store(),
                format!("primary and secondary are the same store ({p_key:?}); two memory sides need distinct names: {{memory, Name1}} and {{memory, Name2}}"),
            ),
        )
            .encode(env);
    }
    let open_side = |key: StoreKey, kind: Atom| -> Result<(Arc<dyn Store>, bool), Term<'a>> {
        let store = open_shared(key, o, true).map_err(|e| open_fail_term(env, &e))?;
        Ok((store, kind != atoms::memory()))
    };
    let (p, p_blocking) = match open_side(p_key, p_kind) {
        Ok(x) => x,
        Err(t) => return t,
    };
    let (s, s_blocking) = match open_side(s_key, s_kind) {
        Ok(x) => x,
        Err(t) => return t,
    };
    let mut registry = HYBRIDS.lock().unwrap_or_else(|p| p.into_inner());
    registry.retain(|_, w| w.strong_count() > 0);
    let hybrid = match registry.get(&dir).and_then(Weak::upgrade) {
        Some(h) => h,
        None => {
            let mut config = MigratorConfig {
                touch: o.touch,
                clock: CLOCK.clone(),
                ..MigratorConfig::default()
            };
            if let Some(n) = shadow {
                config.shadow_sample = n;
            }
            // The phase: a file in state_dir, or (phase_etcd) cluster-wide in etcd.
            let etcd_phases = match &phase_etcd {
                Some(p) => match EtcdPhaseStore::connect(
                    &p.endpoints,
                    p.prefix.clone(),
                    p.node.clone(),
                    EtcdOptions {
                        security: p.security.clone(),
                        ..EtcdOptions::default()
                    },
                ) {
                    Ok(store) => {
                        if !p.expect.is_empty() {
                            config.advance_gate = Some(store.ack_gate(p.expect.clone()));
                        }
                        Some(store)
                    }
                    Err(e) => return (atoms::error(), migrate_error_term(env, &e)).encode(env),
                },
                None => None,
            };
            let phases: Box<dyn PhaseStore> = match &etcd_phases {
                Some(store) => Box::new(store.clone()),
                None => Box::new(FilePhaseStore::new(dir.join("phase.json"))),
            };
            let opened =
                Outbox::open(dir.join("outbox.redb")).and_then(|outbox| Migrator::open(p, s, outbox, phases, config));
            let migrator = match opened {
                Ok(m) => Arc::new(m),
                Err(e) => return (atoms::error(), migrate_error_term(env, &e)).encode(env),
            };
            let relay = migrator.start_relay();
            let watcher = match etcd_phases {
                Some(store) => match store.watch(migrator.clone(), PhaseWatchOptions::default()) {
                    Ok(w) => Some(w),
                    Err(e) => return (atoms::error(), migrate_error_term(env, &e)).encode(env),
                },
                None => None,
            };
            let h = Arc::new(Hybrid {
                migrator,
                _relay: relay,
                phase_watcher: watcher,
            });
            registry.insert(dir, Arc::downgrade(&h));
            h
        }
    };
    drop(registry);
    if let Some(want) = want_phase {
        if let Err(e) = hybrid.migrator.step_to(want, STEP_TIMEOUT) {
            return (atoms::error(), migrate_error_term(env, &e)).encode(env);
        }
    }
    let handle = StoreHandle {
        store: hybrid.migrator.clone(),
        blocking: p_blocking || s_blocking,
        hybrid: Some(hybrid),
    };
    (atoms::ok(), handle_term(env, handle), atoms::hybrid()).encode(env)
}

/// How long each gated step may wait for the outbox to drain.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

fn hybrid_of(handle: &StoreHandle) -> Result<&Arc<Hybrid>, String> {
    handle
        .hybrid
        .as_ref()
        .ok_or_else(|| "not a hybrid (migration) store".to_string())
}

/// `session_migration(Handle, Tag, Action, TimeoutMs)`, Action `advance |
/// rollback | drain | {step_to, Phase}` (`{set, Phase}` is the old name of
/// `step_to`, still accepted): always on a worker. Replies `{ok, Phase}`
/// (advance, rollback, step_to), `{ok, Moved}` (drain) or `{error,
/// {gate | unavailable | migration, Message}}`.
#[rustler::nif]
fn session_migration<'a>(
    env: Env<'a>,
    handle: &StoreHandle,
    tag: Term<'a>,
    action: Term<'a>,
    timeout_ms: u64,
) -> Term<'a> {
    let hybrid = match hybrid_of(handle) {
        Ok(h) => h.clone(),
        Err(e) => return invalid(env, &e),
    };
    let timeout = Duration::from_millis(timeout_ms);
    enum Action {
        Advance,
        Rollback,
        Drain,
        StepTo(Phase),
    }
    let act = if let Ok(a) = action.decode::<Atom>() {
        match a.to_term(env).atom_to_string().as_deref() {
            Ok("advance") => Action::Advance,
            Ok("rollback") => Action::Rollback,
            Ok("drain") => Action::Drain,
            _ => return invalid(env, "action must be advance, rollback, drain or {step_to, Phase}"),
        }
    } else {
        let verb = |t: Term<'_>| matches!(t.atom_to_string().as_deref(), Ok("step_to" | "set"));
        match pair(action).and_then(|[t, p]| verb(t).then_some(p)) {
            Some(p) => match decode_phase(p) {
                Some(p) => Action::StepTo(p),
                None => {
                    return invalid(
                        env,
                        "{step_to, Phase}: Phase must be off, phase1, phase2, phase3 or cleanup",
                    )
                }
            },
            None => return invalid(env, "action must be advance, rollback, drain or {step_to, Phase}"),
        }
    };
    let pid: LocalPid = env.pid();
    let mut owned = OwnedEnv::new();
    let saved: SavedTerm = owned.save(tag);
    let job: Job = Box::new(move || {
        let m = &hybrid.migrator;
        let result: Result<Result<Phase, usize>, MigrateError> = match act {
            Action::Advance => m.advance(timeout).map(Ok),
            Action::Rollback => m.rollback(timeout).map(Ok),
            Action::StepTo(p) => m.step_to(p, STEP_TIMEOUT).map(Ok),
            Action::Drain => m.drain(timeout).map(Err),
        };
        let _ = owned.send_and_clear(&pid, |env| {
            let tag = saved.load(env);
            let reply = match &result {
                Ok(Ok(p)) => (atoms::ok(), phase_atom(*p)).encode(env),
                Ok(Err(n)) => (atoms::ok(), *n).encode(env),
                Err(e) => (atoms::error(), migrate_error_term(env, e)).encode(env),
            };
            (tag, reply)
        });
    });
    match POOL.submit(job) {
        Ok(()) => atoms::async_().encode(env),
        Err(reason) => (atoms::error(), (atoms::unavailable(), reason.as_str()).encode(env)).encode(env),
    }
}

/// `session_migration_phase(Handle) -> Phase | {error, {invalid, _}}`: the
/// phase applied now (cheap: a read lock; for per-call routing).
#[rustler::nif]
fn session_migration_phase<'a>(env: Env<'a>, handle: &StoreHandle) -> Term<'a> {
    match hybrid_of(handle) {
        Ok(h) => phase_atom(h.migrator.phase()).encode(env),
        Err(e) => invalid(env, &e),
    }
}

/// `session_migration_status(Handle) -> {ok, Phase, Counters} | {error,
/// {invalid, _}}`: the phase applied now and the migrator's counters (a map).
#[rustler::nif(schedule = "DirtyIo")]
fn session_migration_status<'a>(env: Env<'a>, handle: &StoreHandle) -> Term<'a> {
    let hybrid = match hybrid_of(handle) {
        Ok(h) => h,
        Err(e) => return invalid(env, &e),
    };
    match hybrid.migrator.counters() {
        Ok(c) => {
            let map = crate::flags::to_term(env, &c);
            // With the phase in etcd: `<<"phase_watch">> => #{connected, applied, syncs,
            // reconnects, last_error}` (the watcher's state; no secret in it).
            let map = match &hybrid.phase_watcher {
                Some(w) => map
                    .map_put("phase_watch", crate::flags::to_term(env, &w.status()))
                    .unwrap_or(map),
                None => map,
            };
            (atoms::ok(), phase_atom(c.phase), map).encode(env)
        }
        Err(e) => (atoms::error(), migrate_error_term(env, &e)).encode(env),
    }
}

fn decode_spec(spec: Term<'_>, o: &OpenOptions) -> Result<(StoreKey, Atom), String> {
    if let Ok(a) = spec.decode::<Atom>() {
        if a == atoms::memory() {
            return Ok((StoreKey::Memory(o.name.clone()), atoms::memory()));
        }
    }
    if let Some([tag, arg]) = pair(spec) {
        if tag.decode::<Atom>().ok() == Some(atoms::memory()) {
            let name = arg
                .is_atom()
                .then(|| arg.atom_to_string().ok())
                .flatten()
                .ok_or("{memory, Name}: Name must be an atom")?;
            return Ok((StoreKey::Memory(name), atoms::memory()));
        }
        if tag.decode::<Atom>().ok() == Some(atoms::disk()) {
            let path = path_text(arg).ok_or("{disk, Path}: Path must be a string or a binary (UTF-8)")?;
            if path.is_empty() {
                return Err("{disk, Path}: Path is empty".into());
            }
            return Ok((StoreKey::Disk(canonical_file(Path::new(&path))?), atoms::disk()));
        }
        if tag.decode::<Atom>().ok() == Some(atoms::etcd()) {
            return etcd_spec(arg, o.etcd.clone(), o);
        }
    }
    // `{etcd, Endpoints, #{tls => .., auth => ..}}`: this store's own TLS and user.
    if let Some([tag, arg, opts]) = triple(spec) {
        if tag.decode::<Atom>().ok() == Some(atoms::etcd()) {
            if !opts.is_map() {
                return Err("{etcd, Endpoints, Options}: Options must be a map (tls, auth)".into());
            }
            return etcd_spec(arg, crate::etcd::decode_security(opts, &o.etcd)?, o);
        }
    }
    Err(
        "store must be memory, {memory, Name}, {disk, Path}, {etcd, Endpoints} or {etcd, Endpoints, #{tls, auth}}"
            .into(),
    )
}

fn etcd_spec(arg: Term<'_>, security: EtcdSecurity, o: &OpenOptions) -> Result<(StoreKey, Atom), String> {
    let list =
        proper_list(arg).ok_or("{etcd, Endpoints}: Endpoints must be a list of \"host:port\" strings or binaries")?;
    let mut endpoints = Vec::with_capacity(list.len());
    for e in list {
        endpoints.push(path_text(e).ok_or("{etcd, Endpoints}: each endpoint must be a string or a binary")?);
    }
    if endpoints.is_empty() {
        return Err("{etcd, Endpoints}: no endpoint given".into());
    }
    endpoints.sort();
    Ok((StoreKey::Etcd(endpoints, o.prefix.clone(), security), atoms::etcd()))
}

fn pair(term: Term<'_>) -> Option<[Term<'_>; 2]> {
    get_tuple(term).ok()?.try_into().ok()
}

fn path_text(term: Term<'_>) -> Option<String> {
    text(term)
}

fn decode_open_options(opts: Term<'_>) -> Result<OpenOptions, String> {
    let mut o = OpenOptions {
        name: "erlmcp_session_native".into(),
        prefix: b"erlmcp/sessions/".to_vec(),
        touch: TouchPolicy::default(),
        tombstone_retention_ms: None,
        etcd: EtcdSecurity::default(),
    };
    o.etcd = crate::etcd::decode_security(opts, &o.etcd)?;
    let iter = rustler::types::map::MapIterator::new(opts).ok_or("options must be a map")?;
    for (k, v) in iter {
        let Ok(key) = k.decode::<Atom>() else { continue };
        if key == atoms::name() {
            if !v.is_atom() {
                return Err("name must be an atom".into());
            }
            o.name = v.atom_to_string().map_err(|_| "name must be an atom")?;
        } else if key == atoms::prefix() {
            let p = binary_bytes(v)
                .map(<[u8]>::to_vec)
                .or_else(|| path_text(v).map(String::into_bytes))
                .ok_or("prefix must be a binary or a string")?;
            // As store URIs do: "a" would otherwise also cover another store's "ab/...".
            o.prefix = p;
            if o.prefix.last().is_some_and(|b| *b != b'/') {
                o.prefix.push(b'/');
            }
        } else if key == atoms::touch_permille() {
            let p: u16 = v.decode().map_err(|_| "touch_permille must be an integer 0..1000")?;
            o.touch = TouchPolicy::permille(p).map_err(err_text)?;
        } else if key == atoms::tombstone_retention_ms() {
            o.tombstone_retention_ms = Some(
                v.decode()
                    .map_err(|_| "tombstone_retention_ms must be a non-negative integer")?,
            );
        }
    }
    Ok(o)
}

/// A session from `Id` and `{CreatedAt, LastAccessed, Timeout, Meta}`, its
/// metadata still a term.
struct Fields<'a> {
    id: SessionId,
    created_at: i64,
    last_accessed: i64,
    timeout: Timeout,
    meta: Term<'a>,
}

impl Fields<'_> {
    fn decode<'a>(id: Term<'a>, fields: Term<'a>) -> Result<Fields<'a>, String> {
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

    fn into_session(self, meta: Arc<[u8]>, format: MetaFormat) -> Session {
        let mut s = Session::new(self.id, self.created_at, self.timeout, meta);
        s.last_accessed = self.last_accessed;
        s.meta_format = format;
        s
    }
}

/// A session from `Id` and `{CreatedAt, LastAccessed, Timeout, Bin | {etf, Bin}}`.
fn decode_session<'a>(id: Term<'a>, fields: Term<'a>) -> Result<Session, String> {
    let f = Fields::decode(id, fields)?;
    let (meta, format) = meta_bytes(f.meta)?.ok_or("metadata must be a binary or {etf, Binary}")?;
    Ok(f.into_session(Arc::from(meta), format))
}

thread_local! {
    /// This scheduler thread's metadata encoder.
    static ENCODER: std::cell::RefCell<etf::Scratch> = std::cell::RefCell::new(etf::Scratch::default());
}

/// `Meta` in external term format, encoded here when the encoder takes it.
fn encode_meta(meta: Term<'_>) -> Result<Arc<[u8]>, etf::NotHere> {
    ENCODER.with_borrow_mut(|e| e.encode(meta).map(Arc::from))
}

/// `session_put(Handle, Tag, Id, {CreatedAt, LastAccessed, Timeout, Meta})
/// -> ok | {error, E} | async | term_to_binary`: create or replace. `Meta`
/// is opaque bytes, `{etf, Bytes}` (external term format), or a map that this
/// NIF encodes itself (the bytes `term_to_binary/1` would write, stored as
/// external term format); its size is checked before it is copied; `term_to_binary` asks the
/// caller to encode that map and call again (see `etf`). Registered by
/// hand: `erlmcp_session_native:store/3` runs it on every write.
fn session_put<'a>(
    env: Env<'a>,
    handle: Term<'a>,
    tag: Term<'a>,
    id: Term<'a>,
    fields: Term<'a>,
) -> NifResult<Term<'a>> {
    let handle: &StoreHandle = handle.decode()?;
    let f = match Fields::decode(id, fields) {
        Ok(f) => f,
        Err(e) => return Ok(invalid(env, &e)),
    };
    let (meta, format) = match meta_bytes(f.meta) {
        Ok(Some((bytes, format))) => (Arc::from(bytes), format),
        Err(e) => return Ok(invalid(env, &e)),
        Ok(None) if f.meta.is_map() => match encode_meta(f.meta) {
            Ok(meta) if meta.len() > MAX_METADATA_LEN => {
                return Ok(invalid(
                    env,
                    &format!(
                        "metadata of {} bytes exceeds the limit of {MAX_METADATA_LEN}",
                        meta.len()
                    ),
                ))
            }
            Ok(meta) => (meta, MetaFormat::Etf),
            Err(etf::NotHere) => return Ok(atoms::term_to_binary().encode(env)),
        },
        Ok(None) => {
            return Ok(invalid(
                env,
                "metadata must be a binary (opaque), {etf, Binary} (external term format) or a map",
            ))
        }
    };
    let session = f.into_session(meta, format);
    Ok(run(env, handle, tag, false, move |store| match store.put(session) {
        Ok(_) => Reply::Ok,
        Err(e) => Reply::Failed(e),
    }))
}

nif_by_hand!(c"session_put", session_put_raw, session_put, [handle, tag, id, fields]);

/// `session_touch(Handle, Tag, Id) -> {ok, {Created, LastAccessed, Timeout,
/// Meta, Version}} | {error, not_found | E} | async`: read and slide expiry.
/// Registered by hand: `erlmcp_session_native:fetch/2` runs it on every read.
fn session_touch<'a>(env: Env<'a>, handle: Term<'a>, tag: Term<'a>, id: Term<'a>) -> NifResult<Term<'a>> {
    let handle: &StoreHandle = handle.decode()?;
    let id = match session_id(id) {
        Ok(id) => id,
        Err(e) => return Ok(invalid(env, &e)),
    };
    Ok(run(env, handle, tag, false, move |store| match store.touch(&id) {
        Ok(s) => Reply::Session(s),
        Err(e) => Reply::Failed(e),
    }))
}

nif_by_hand!(c"session_touch", session_touch_raw, session_touch, [handle, tag, id]);

/// `session_get(Handle, Tag, Id)`: like `session_touch/3` without touching.
#[rustler::nif]
fn session_get<'a>(env: Env<'a>, handle: &StoreHandle, tag: Term<'a>, id: Term<'a>) -> Term<'a> {
    let id = match session_id(id) {
        Ok(id) => id,
        Err(e) => return invalid(env, &e),
    };
    run(env, handle, tag, false, move |store| match store.get(&id) {
        Ok(s) => Reply::Session(s),
        Err(e) => Reply::Failed(e),
    })
}

/// `session_known(Handle, Tag, Id) -> {ok, absent | live | dead} | {error, E}
/// | async`: what the store holds under `Id`, read without touching or
/// writing it (`Store::get_raw`; for a hybrid, the store of record). `dead`
/// is a tombstone or an expired session; `absent` means no record at all.
/// Bounded: one key.
#[rustler::nif]
fn session_known<'a>(env: Env<'a>, handle: &StoreHandle, tag: Term<'a>, id: Term<'a>) -> Term<'a> {
    let id = match session_id(id) {
        Ok(id) => id,
        Err(e) => return invalid(env, &e),
    };
    run(env, handle, tag, false, move |store| match store.get_raw(&id) {
        Ok(None) => Reply::Known(Known::Absent),
        Ok(Some(s)) if s.is_live(CLOCK.now_unix_ms()) => Reply::Known(Known::Live),
        Ok(Some(_)) => Reply::Known(Known::Dead),
        Err(e) => Reply::Failed(e),
    })
}

/// `session_delete(Handle, Tag, Id) -> {ok, WasLive} | {error, E} | async`.
#[rustler::nif]
fn session_delete<'a>(env: Env<'a>, handle: &StoreHandle, tag: Term<'a>, id: Term<'a>) -> Term<'a> {
    let id = match session_id(id) {
        Ok(id) => id,
        Err(e) => return invalid(env, &e),
    };
    run(env, handle, tag, false, move |store| match store.delete(&id) {
        Ok(d) => Reply::Deleted(d),
        Err(e) => Reply::Failed(e),
    })
}

/// Longest page `session_list_page/4` returns (bounds the time of one
/// memory-store call on a normal scheduler).
const MAX_PAGE: usize = 1000;

/// `session_list_page(Handle, Tag, After | start, Limit) -> {ok, [Id], Next |
/// done} | {error, E} | async`: live ids in key order.
#[rustler::nif]
fn session_list_page<'a>(
    env: Env<'a>,
    handle: &StoreHandle,
    tag: Term<'a>,
    after: Term<'a>,
    limit: Term<'a>,
) -> Term<'a> {
    let after = if after.is_atom() {
        None
    } else {
        match session_id(after) {
            Ok(id) => Some(id),
            Err(e) => return invalid(env, &e),
        }
    };
    let limit = match limit.decode::<usize>() {
        Ok(l) if (1..=MAX_PAGE).contains(&l) => l,
        _ => return invalid(env, &format!("limit must be an integer 1..{MAX_PAGE}")),
    };
    run(env, handle, tag, false, move |store| {
        match store.scan(after.as_ref(), limit, Visibility::Live) {
            Ok(page) => Reply::Page(page.records.into_iter().map(|s| s.id).collect(), page.next),
            Err(e) => Reply::Failed(e),
        }
    })
}

/// Most records one `session_apply_batch/3` takes.
const MAX_BATCH: usize = 10_000;

/// `session_apply_batch(Handle, Tag, [{Id, Fields, Version}]) -> {ok,
/// Applied, Skipped} | {error, E} | async`: write each record whose version
/// is newer than the stored one (or when none is stored), as given; with
/// version 1 that is "only where absent" (legacy import). Always on a worker;
/// the decoding and copying of up to 10 000 records before that runs on a
/// dirty CPU scheduler (the size is checked first).
#[rustler::nif(schedule = "DirtyCpu")]
fn session_apply_batch<'a>(env: Env<'a>, handle: &StoreHandle, tag: Term<'a>, records: Term<'a>) -> Term<'a> {
    let Ok(n) = records.list_length() else {
        return invalid(env, "records must be a proper list of {Id, Fields, Version}");
    };
    if n > MAX_BATCH {
        return invalid(env, &format!("a batch holds at most {MAX_BATCH} records, got {n}"));
    }
    let mut batch = Vec::with_capacity(n);
    let Ok(iter) = records.into_list_iterator() else {
        return invalid(env, "records must be a proper list");
    };
    for (i, r) in iter.enumerate() {
        let decoded = get_tuple(r)
            .ok()
            .and_then(|t| <[Term<'a>; 3]>::try_from(t).ok())
            .ok_or_else(|| "each record must be {Id, Fields, Version}".to_string())
            .and_then(|[id, fields, version]| {
                let mut s = decode_session(id, fields)?;
                s.version = version
                    .decode::<u64>()
                    .ok()
                    .filter(|v| *v > 0)
                    .ok_or("Version must be a positive integer")?;
                Ok(s)
            });
        match decoded {
            Ok(s) => batch.push(s),
            Err(e) => return invalid(env, &format!("record {}: {e}", i + 1)),
        }
    }
    run(env, handle, tag, true, move |store| {
        match store.apply_batch_if_newer(batch) {
            Ok(o) => Reply::Batch(o.applied, o.skipped),
            Err(e) => Reply::Failed(e),
        }
    })
}

/// `session_get_many(Handle, Tag, [Id]) -> {ok, [{ok, Stored} | {error,
/// E}]} | {error, E} | async`: `session_get/3` for each id, in order, in one
/// call (verification reads batches back). At most 10 000 ids: a dirty CPU
/// scheduler (decoding the ids and, for a memory store, the gets are
/// proportional to the list).
#[rustler::nif(schedule = "DirtyCpu")]
fn session_get_many<'a>(env: Env<'a>, handle: &StoreHandle, tag: Term<'a>, ids: Term<'a>) -> Term<'a> {
    let Ok(n) = ids.list_length() else {
        return invalid(env, "ids must be a proper list of binaries");
    };
    if n > MAX_BATCH {
        return invalid(env, &format!("at most {MAX_BATCH} ids, got {n}"));
    }
    let Ok(iter) = ids.into_list_iterator() else {
        return invalid(env, "ids must be a proper list");
    };
    let mut keys = Vec::with_capacity(n);
    for (i, t) in iter.enumerate() {
        match session_id(t) {
            Ok(id) => keys.push(id),
            Err(e) => return invalid(env, &format!("id {}: {e}", i + 1)),
        }
    }
    run(env, handle, tag, false, move |store| {
        Reply::Many(keys.iter().map(|id| store.get(id)).collect())
    })
}

/// `session_sweep(Handle, Tag) -> async`; replies `{ok, Expired,
/// TombstonesRemoved} | {error, E}`. Always on a worker: it walks the store.
#[rustler::nif]
fn session_sweep<'a>(env: Env<'a>, handle: &StoreHandle, tag: Term<'a>) -> Term<'a> {
    let now = CLOCK.now_unix_ms();
    run(env, handle, tag, true, move |store| match store.sweep_expired(now) {
        Ok(o) => Reply::Swept(o.expired, o.tombstones),
        Err(e) => Reply::Failed(e),
    })
}

/// `session_set_clock(Ms | system) -> ok`: pin the sessions' clock (tests).
#[rustler::nif]
fn session_set_clock(at: Term<'_>) -> NifResult<Atom> {
    set_clock(&CLOCK, at)
}

/// `session_now() -> Ms`: the sessions' clock.
#[rustler::nif]
fn session_now() -> i64 {
    CLOCK.now_unix_ms()
}

/// Benchmark calibration, `session_copy_probe(Term) -> ok`: copies `Term`
/// into a process-independent environment and frees it: what keeping a
/// session's metadata as an Erlang term (instead of its external term
/// format) would cost per store. No store is touched.
#[rustler::nif]
fn session_copy_probe(term: Term<'_>) -> rustler::Atom {
    let owned = OwnedEnv::new();
    drop(owned.save(term));
    atoms::ok()
}
