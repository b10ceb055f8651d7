//! Session-store NIFs (behind `erlmcp_session_native`): a handle per open
//! store, shared by every `init/1` that names the same store (the core's
//! `session::shared::StoreRegistry`).
//!
//! Scheduling: memory-store calls run in the caller on its normal scheduler
//! (microseconds). Calls that may wait for I/O (disk, etcd) and whole-store
//! walks (sweep) never block a scheduler: the NIF hands the call to a worker
//! thread (the core's `workers::WorkerPool`) and returns `async`; the worker
//! sends `{Tag, Result}` to the caller (the Erlang side waits for it with a
//! selective receive on `Tag`, a fresh reference). Worker threads are not
//! scheduler threads, so many concurrent callers do not queue behind the ten
//! dirty I/O schedulers, and concurrent durable writes share commits. Writes
//! (`session_put`, `session_delete`) to a store that can start them
//! (`Store::start`: disk) skip the worker: the NIF queues the write for the
//! store's next group commit (bounded: a lock and a push) and the thread that
//! commits the group sends `{Tag, Result}` after its fdatasync.
//!
//! Files: `handle` (the resource and its lifecycle), `spec` (store specs and
//! options), `record` (sessions and errors as terms), `migration` (hybrid
//! stores and phases); the store NIFs are here.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use erlmcp_rollout::migrate::hybrid::HybridRegistry;
use erlmcp_rollout::session::shared::{OpenError, StoreRegistry};
use erlmcp_rollout::session::{
    Clock, MetaFormat, PinnableClock, Session, SessionId, Store, StoreError, Visibility, WriteOp, Written,
    MAX_METADATA_LEN,
};
use erlmcp_rollout::workers::{Job, WorkerPool};
use rustler::env::SavedTerm;
use rustler::types::tuple::get_tuple;
use rustler::{Atom, Encoder, Env, LocalPid, NifResult, OwnedEnv, Term};

use crate::atoms;
use crate::etf;
use crate::term::{bytes_term, set_clock};

mod handle;
mod migration;
mod record;
mod spec;

pub use handle::open_handle_type;
use handle::{handle_term, StoreHandle};
use migration::open_hybrid;
use record::invalid;
use record::{decode_session, encode_meta, error_term, meta_bytes, session_id, session_tuple, Fields};
use spec::{decode_open_options, decode_spec, triple};

/// The clock every store opened here uses: the system clock unless pinned
/// with `session_set_clock/1` (tests move time by hand).
static CLOCK: LazyLock<Arc<PinnableClock>> = LazyLock::new(|| Arc::new(PinnableClock::default()));

/// The stores open in this VM: two `init`s of one store share it.
static STORES: LazyLock<StoreRegistry> = LazyLock::new(|| StoreRegistry::new(CLOCK.clone()));

/// The hybrid migrations open in this VM, one per state directory.
static HYBRIDS: LazyLock<HybridRegistry> = LazyLock::new(|| HybridRegistry::new(CLOCK.clone()));

/// Runs blocking store calls; grows up to 512 threads (a call never waits for
/// a busy worker); idle ones exit after a minute.
static POOL: WorkerPool = WorkerPool::new("erlmcp_session_io", 512, Duration::from_secs(60));

/// `{error, {bad_store, Message}}` or `{error, StoreError}`.
fn open_error_term<'a>(env: Env<'a>, e: &OpenError) -> Term<'a> {
    match e {
        OpenError::Store(e) => (atoms::error(), error_term(env, e)).encode(env),
        OpenError::BadSpec(m) | OpenError::Mismatch(m) => {
            (atoms::error(), (atoms::bad_store(), m.as_str())).encode(env)
        }
    }
}

/// Hands `job` to a worker: `async`, or `{error, {unavailable, Why}}` when no
/// worker thread can be started (the job is dropped unrun).
fn submit(env: Env<'_>, job: Job) -> Term<'_> {
    match POOL.submit(job) {
        Ok(()) => atoms::async_().encode(env),
        Err(reason) => (atoms::error(), (atoms::unavailable(), reason.as_str()).encode(env)).encode(env),
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
    submit(env, job)
}

/// Starts the write `op` on a store that can start writes (disk: it joins the next
/// group commit, and the thread that commits it sends `{Tag, Result}`; no worker
/// thread waits per write), else runs it like [`run`]. `reply` turns its result into
/// the reply.
fn run_write<'a>(
    env: Env<'a>,
    handle: &StoreHandle,
    tag: Term<'a>,
    op: WriteOp,
    reply: fn(Result<Written, StoreError>) -> Reply,
) -> Term<'a> {
    if !handle.blocking {
        return run(env, handle, tag, false, move |store| reply(op.run(store)));
    }
    let pid: LocalPid = env.pid();
    let mut owned = OwnedEnv::new();
    let saved: SavedTerm = owned.save(tag);
    let done: erlmcp_rollout::session::WriteDone = Box::new(move |result| {
        let reply = reply(result);
        let mut send = move || {
            // The caller may have died meanwhile: nothing to do then.
            let _ = owned.send_and_clear(&pid, |env| {
                let tag = saved.load(env);
                (tag, encode_reply(env, &reply))
            });
        };
        // The committing thread is the store's or a worker, never a scheduler, unless
        // some caller wrote on a scheduler thread; enif_send may not run there.
        if rustler::thread::is_scheduler_thread() {
            let _ = POOL.submit(Box::new(send));
        } else {
            send();
        }
    });
    match handle.store.start(op, done) {
        Ok(()) => atoms::async_().encode(env),
        // Not started (invalid input, no commit thread): a worker runs it.
        Err(erlmcp_rollout::session::Unstarted { op, done }) => {
            let store = handle.store.clone();
            submit(env, Box::new(move || done(op.run(store.as_ref()))))
        }
    }
}

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
    match STORES.open(&key, o.share(false)) {
        Ok(store) => {
            let handle = StoreHandle {
                store,
                blocking: key.blocking(),
                hybrid: None,
            };
            (atoms::ok(), handle_term(env, handle), kind).encode(env)
        }
        Err(e) => open_error_term(env, &e),
    }
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
    Ok(run_write(env, handle, tag, WriteOp::Put(session), |r| match r {
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
    run_write(env, handle, tag, WriteOp::Delete(id), |r| match r {
        Ok(Written::Deleted(d)) => Reply::Deleted(d),
        Ok(Written::Session(_)) => Reply::Failed(StoreError::Unavailable {
            reason: "a delete answered with a session".into(),
        }),
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
    let reply = run(env, handle, tag, false, move |store| {
        match store.scan(after.as_ref(), limit, Visibility::Live) {
            Ok(page) => Reply::Page(page.records.into_iter().map(|s| s.id).collect(), page.next),
            Err(e) => Reply::Failed(e),
        }
    });
    if !handle.blocking {
        // An inline page visits up to 2 x limit records (live or not), about half a
        // timeslice at the largest limit: charged as such, so a caller paging through a
        // large store is scheduled out every few pages instead of holding its scheduler
        // for the whole listing (a NIF call otherwise counts as one reduction).
        rustler::schedule::consume_timeslice(env, 50);
    }
    reply
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
        Ok(o) => {
            if o.expired.saturating_add(o.tombstones) >= TRIM_AFTER_FREEING {
                trim_heap();
            }
            Reply::Swept(o.expired, o.tombstones)
        }
        Err(e) => Reply::Failed(e),
    })
}

/// Records a sweep must free before the worker hands the freed memory back.
const TRIM_AFTER_FREEING: usize = 10_000;

/// Runs on a worker thread after a sweep freed many records. With glibc, records
/// freed here that a scheduler thread allocated sit in that scheduler's arena as
/// unconsolidated small chunks, and the next large allocation on that scheduler
/// consolidates them all first: 120-140 ms on a normal scheduler after 400k were
/// freed (BENCHMARKS.md, memory-store churn). `malloc_trim` does that work here, for
/// every arena, and returns the free pages to the OS. (The reaper calls it too,
/// after dropping a store's last handle.)
pub(super) fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: glibc's malloc_trim takes no pointers and is thread-safe.
        unsafe {
            malloc_trim(0);
        }
    }
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
