//! The store handle: a resource of this library's own type that owns a
//! [`StoreHandle`], and its lifecycle across reloads of the library.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use erlmcp_rollout::migrate::hybrid::Hybrid;
use erlmcp_rollout::session::Store;
use rustler::sys::{
    c_void, enif_alloc_resource, enif_get_resource, enif_make_resource, enif_open_resource_type, enif_release_resource,
    ErlNifEnv, ErlNifResourceFlags, ErlNifResourceType,
};
use rustler::{Decoder, Env, NifResult, Term};

/// An open store, as the Erlang side holds it.
pub struct StoreHandle {
    pub store: Arc<dyn Store>,
    /// Calls may wait for I/O: run them on a worker thread.
    pub blocking: bool,
    /// For a dual-write migration (`{hybrid, Primary, Secondary}`).
    pub hybrid: Option<Arc<Hybrid>>,
}

// Store handles are a resource type of this library's own (not rustler's
// `#[resource_impl]`): decoding a handle, on every session call, is one
// `enif_get_resource` against `HANDLE_TYPE`, a pointer the load callback
// opened, with no lookup of the type (BENCHMARKS.md, "Why the NIF is shaped
// this way").

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
                    // The store's last handle: dropping it frees every record, most of
                    // them allocated on scheduler threads; hand that memory back here
                    // (see `trim_heap`) rather than on the next large allocation of a
                    // scheduler (28-37 ms inside a NIF after a 400k-session store was
                    // reaped; BENCHMARKS.md, memory-store churn).
                    let last = Arc::strong_count(&h.store) == 1;
                    let _ = catch_unwind(AssertUnwindSafe(move || drop(h)));
                    if last {
                        super::trim_heap();
                    }
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
pub fn handle_term(env: Env<'_>, handle: StoreHandle) -> Term<'_> {
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
