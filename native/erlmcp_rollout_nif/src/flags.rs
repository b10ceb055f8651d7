//! Feature-flag NIFs: one process-wide engine that outlives any Erlang
//! process (a restarted `erlmcp_feature_flags` server finds the last loaded
//! flags still serving).

use std::cell::RefCell;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use arc_swap::{ArcSwap, Cache};
use erlmcp_rollout::flags::{
    erlmcp_flags, export_json, phash2, AuditLog, Clock, ConditionFailure, ConfigError, Context, Deferred, Engine,
    EnvOverrides, ErlmcpFlag, ErlmcpState, ErrorCode, FlagId, FlagsConfig, PinnableClock, Problem, Reason,
    ReloadOutcome, Snapshot, Strategy, Value,
};
use erlmcp_rollout::flags::{EtcdFlagsOptions, EtcdWatcher};
use rustler::{Atom, Encoder, Env, Error, NifResult, OwnedEnv, Term};

use crate::atoms;
use crate::term::{bytes_term, name_text, proper_list, set_clock, KeyAtom, MapCtx, Tables};

/// The flags' clock: the system clock unless pinned with `flags_set_clock/1`
/// (tests, and "what will this look like at T" checks).
static CLOCK: LazyLock<Arc<PinnableClock>> = LazyLock::new(|| Arc::new(PinnableClock::default()));

static ENGINE: LazyLock<Arc<Engine>> =
    LazyLock::new(|| Arc::new(Engine::builder().clock(CLOCK.clone()).build(FlagsConfig::default())));

/// The etcd source, when the flags follow an etcd key (`flags_watch_etcd/2`).
static WATCHER: Mutex<Option<EtcdWatcher>> = Mutex::new(None);

/// What the hot path reads, published together in one atomic pointer: the
/// engine's current snapshot and the atoms for its context keys and flag
/// names (made once per change, so evaluation never touches the atom table).
struct Published {
    snapshot: Arc<Snapshot>,
    tables: Tables,
}

static PUBLISHED: LazyLock<ArcSwap<Published>> = LazyLock::new(|| {
    ArcSwap::from_pointee(Published {
        snapshot: ENGINE.snapshot(),
        tables: Tables::default(),
    })
});

thread_local! {
    /// Each thread's cached handle on `PUBLISHED`: while nothing was
    /// published since, a load is one relaxed pointer compare instead of
    /// `ArcSwap::load`'s debt-slot bookkeeping (two locked instructions).
    static LOCAL: RefCell<Option<Cache<&'static ArcSwap<Published>, Arc<Published>>>> =
        const { RefCell::new(None) };
}

/// The published snapshot and tables, through this thread's cache; `None`
/// only while the thread exits (its cache is gone). The pointer stays valid
/// until this thread's next call here: the cache holds a strong reference,
/// and only this thread replaces it. Invariant: it returns one pointer-sized
/// word (not a closure or a guard), so the hot path reads no multi-word value
/// back from memory (BENCHMARKS.md, "Why the NIF is shaped this way").
#[inline(always)]
fn published_here() -> Option<*const Published> {
    LOCAL
        .try_with(|local| {
            let mut slot = local.try_borrow_mut().ok()?;
            let cache = slot.get_or_insert_with(|| Cache::new(&*PUBLISHED));
            Some(Arc::as_ptr(cache.load()))
        })
        .ok()
        .flatten()
}

/// Published values replaced since, kept until no thread's cache holds them
/// (checked at every publish), so that a scheduler thread refreshing its
/// cache never frees a snapshot on the hot path.
static RETIRED: Mutex<Vec<Arc<Published>>> = Mutex::new(Vec::new());

/// Serializes engine changes with their publication, so that a slower
/// writer can never publish an older snapshot over a newer one.
static WRITER: Mutex<()> = Mutex::new(());

fn writer() -> MutexGuard<'static, ()> {
    WRITER.lock().unwrap_or_else(|p| p.into_inner())
}

/// The atom named `text` if it already exists: a pushed config never creates
/// atoms (the atom table never shrinks). Names without an atom yet are still
/// served: flag names by text on a table miss (`Tables::flag_id`), context
/// keys by an existing-atom lookup and then binary keys (`MapCtx`).
fn atom(env: Env<'_>, text: &str) -> Option<Atom> {
    (text.chars().count() <= 255)
        .then(|| Atom::existing_from_utf8_bytes(env, text.as_bytes()).ok())
        .flatten()
}

/// Runs `change` on the engine under the writer lock and publishes what it
/// left, so that a slower writer never publishes an older snapshot.
fn changing<T>(env: Env<'_>, change: impl FnOnce(&Engine) -> T) -> T {
    let _w = writer();
    let r = change(&ENGINE);
    publish(env);
    r
}

/// Publish the engine's current snapshot; call with the writer lock held.
fn publish(env: Env<'_>) {
    let snapshot = ENGINE.snapshot();
    let key_atoms = snapshot
        .context_keys()
        .into_iter()
        .filter_map(|k| {
            atom(env, k).map(|a| KeyAtom {
                addr: k.as_ptr() as usize,
                text: Box::from(k),
                atom: a,
            })
        })
        .collect();
    let flag_atoms = snapshot
        .config()
        .iter()
        .filter_map(|(name, _)| Some((atom(env, name)?.as_c_arg(), snapshot.flag_id(name.as_bytes())?)))
        .collect();
    let old = PUBLISHED.swap(Arc::new(Published {
        snapshot,
        tables: Tables { key_atoms, flag_atoms },
    }));
    let mut retired = RETIRED.lock().unwrap_or_else(|p| p.into_inner());
    retired.push(old);
    // Only this list holds them: no cache can reach them any more.
    retired.retain(|p| Arc::strong_count(p) > 1);
}

/// `true | false | unknown | {custom, [Name]} | {hash, [Term]}`: the hot
/// path of `erlmcp_feature_flags:is_enabled/2`. `{custom, Names}` asks the
/// caller to run the Erlang funs registered for the flag's custom conditions
/// and call `flags_eval_custom/4` with the answers; `{hash, Terms}` asks for
/// `erlang:phash2(T, 4294967296)` of context values of other types than
/// binary, atom and integer (nothing was counted). `badarg` when the name is
/// not a binary or atom or the context not a map.
fn flags_eval<'a>(env: Env<'a>, name: Term<'a>, ctx: Term<'a>) -> NifResult<Term<'a>> {
    match published_here() {
        // SAFETY: valid for this call (see `published_here`); evaluation
        // never re-enters it on this thread.
        Some(p) => eval_published(env, unsafe { &*p }, name, ctx),
        None => eval_published(env, &PUBLISHED.load(), name, ctx),
    }
}

#[inline(always)]
fn eval_published<'a>(env: Env<'a>, published: &Published, name: Term<'a>, ctx: Term<'a>) -> NifResult<Term<'a>> {
    let tables = &published.tables;
    let Some(id) = tables.flag_id(&published.snapshot, name)? else {
        MapCtx::new(ctx, &[], &[])?;
        published.snapshot.count_unknown();
        return Ok(atoms::unknown().encode(env));
    };
    let c = MapCtx::new(ctx, &tables.key_atoms, &[])?;
    match published.snapshot.evaluate_or_defer_id(Some(id), &c) {
        Deferred::NeedsCustom(names) => {
            let names: Vec<&str> = names.iter().map(|n| &**n).collect();
            Ok((atoms::custom(), names).encode(env))
        }
        Deferred::NeedsHashes => Ok(wanted_reply(env, &c)),
        Deferred::Evaluated(_) if c.saw_bad_value() => Err(Error::BadArg),
        Deferred::Evaluated(e) => Ok(reason_atom(e.reason).encode(env)),
    }
}

/// `{hash, [Term]}`: the terms whose `erlang:phash2(Term, 4294967296)` the
/// caller computes and passes back (`[{Term, Hash}]`) to evaluate a foreign
/// context value (a float, tuple, list, ...) exactly as the reference would.
#[cold]
#[inline(never)]
fn wanted_reply<'a>(env: Env<'a>, c: &MapCtx<'a, '_>) -> Term<'a> {
    (atoms::hash(), c.wanted()).encode(env)
}

/// `[{Term, Hash :: 0..2^32-1}]` decoded; `badarg` for anything else.
fn hashes_of<'a>(hashes: Term<'a>) -> NifResult<Vec<(Term<'a>, u32)>> {
    proper_list(hashes)
        .ok_or(Error::BadArg)?
        .into_iter()
        .map(|t| t.decode())
        .collect()
}

// The hot path of `erlmcp_feature_flags:is_enabled/2`.
nif_by_hand!(c"flags_eval", flags_eval_raw, flags_eval, [name, ctx]);

/// `{Generation, Flags, Reloads}`: the snapshot serving now and how many
/// successful loads this library has seen (0 = nothing loaded since the
/// VM loaded the library).
#[rustler::nif]
fn flags_status() -> (u64, usize, u64) {
    let published = PUBLISHED.load();
    let (generation, flags) = (published.snapshot.generation(), published.snapshot.config().len());
    (generation, flags, ENGINE.metrics().reloads)
}

// Invariant: inlined into every evaluation, so the `Reason` stays in
// registers (BENCHMARKS.md, "Why the NIF is shaped this way").
#[inline(always)]
fn reason_atom(reason: Reason) -> Atom {
    match reason {
        Reason::UnknownFlag => atoms::unknown(),
        Reason::Enabled => atoms::true_(),
        _ => atoms::false_(),
    }
}

/// `[{Name :: binary(), boolean()}]` decoded; `badarg` for anything else.
fn answers_of<'a>(answers: Term<'a>) -> NifResult<Vec<(Vec<u8>, bool)>> {
    // Not `Vec<_>` as the argument type: rustler 0.39's list decoding panics
    // on an improper list; `proper_list` refuses one first.
    let items = proper_list(answers).ok_or(Error::BadArg)?;
    items
        .into_iter()
        .map(|item| {
            let (n, b): (Term<'a>, bool) = item.decode()?;
            Ok((name_text(n)?.into_bytes(), b))
        })
        .collect()
}

/// Like `flags_eval/2` with the custom conditions answered
/// (`Answers :: [{Name :: binary(), boolean()}]`; a name without an answer is
/// false) and foreign values' hashes (`Hashes :: [{Term, Hash}]`, see
/// `{hash, Wanted}`).
#[rustler::nif]
fn flags_eval_custom<'a>(
    env: Env<'a>,
    name: Term<'a>,
    ctx: Term<'a>,
    answers: Term<'a>,
    hashes: Term<'a>,
) -> NifResult<Term<'a>> {
    let published = PUBLISHED.load();
    let Some(id) = published.tables.flag_id(&published.snapshot, name)? else {
        return Ok(atoms::unknown().encode(env));
    };
    eval_answered(env, &published, id, ctx, answers, hashes)
}

/// Flag `id` of `published` for `ctx` with custom answers and hashes.
fn eval_answered<'a>(
    env: Env<'a>,
    published: &Published,
    id: FlagId,
    ctx: Term<'a>,
    answers: Term<'a>,
    hashes: Term<'a>,
) -> NifResult<Term<'a>> {
    let customs = answers_of(answers)?;
    let hashes = hashes_of(hashes)?;
    let c = MapCtx::new(ctx, &published.tables.key_atoms, &customs)?.with_hashes(hashes);
    let e = published.snapshot.evaluate_id(Some(id), &c);
    if c.saw_bad_value() {
        return Err(Error::BadArg);
    }
    if !c.complete() {
        return Ok(wanted_reply(env, &c));
    }
    let reason = match e.reason {
        Reason::Condition {
            failure: ConditionFailure::Unregistered,
            ..
        } => Reason::Disabled,
        r => r,
    };
    Ok(reason_atom(reason).encode(env))
}

/// erlmcp's `evaluate_rollout/2`: flag `Name` for a context whose only value
/// is `Identifier` (any term) under the flag's stickiness key; answers as
/// `flags_eval_custom/4` (custom conditions see no other value).
#[rustler::nif]
fn flags_eval_rollout<'a>(
    env: Env<'a>,
    name: Term<'a>,
    identifier: Term<'a>,
    answers: Term<'a>,
    hashes: Term<'a>,
) -> NifResult<Term<'a>> {
    let published = PUBLISHED.load();
    let Some(id) = published.tables.flag_id(&published.snapshot, name)? else {
        published.snapshot.count_unknown();
        return Ok(atoms::unknown().encode(env));
    };
    let key = published
        .snapshot
        .stickiness_of(id)
        .unwrap_or(erlmcp_rollout::flags::DEFAULT_STICKINESS);
    let ctx = Term::map_from_pairs(env, &[(bytes_term(env, key.as_bytes()), identifier)])?;
    eval_answered(env, &published, id, ctx, answers, hashes)
}

/// `[Name :: binary()]`: the custom conditions (of the flag and of its
/// prerequisites) that `flags_eval_details/3` needs answers for; `[]` for
/// an unknown flag.
#[rustler::nif]
fn flags_custom_names<'a>(env: Env<'a>, name: Term<'a>) -> NifResult<Term<'a>> {
    let text = name_text(name)?;
    let published = PUBLISHED.load();
    let names: Vec<&str> = published
        .snapshot
        .unregistered_conditions(text.as_bytes())
        .iter()
        .map(|n| &**n)
        .collect();
    Ok(names.encode(env))
}

/// OpenFeature-style evaluation details of one flag (binary keys: `flag`,
/// `value`, `variant`, `reason`, `error_code`, `error_message`, `metadata`,
/// `evaluation`), custom conditions and hashes answered as in
/// `flags_eval_custom/4` (or `{hash, Wanted}`). A context value that cannot
/// be decoded gives `reason` `ERROR` with `error_code` `PARSE_ERROR` (not
/// `badarg`).
#[rustler::nif]
fn flags_eval_details<'a>(
    env: Env<'a>,
    name: Term<'a>,
    ctx: Term<'a>,
    answers: Term<'a>,
    hashes: Term<'a>,
) -> NifResult<Term<'a>> {
    let customs = answers_of(answers)?;
    let hashes = hashes_of(hashes)?;
    let text = name_text(name)?;
    let published = PUBLISHED.load();
    let c = MapCtx::new(ctx, &published.tables.key_atoms, &customs)?.with_hashes(hashes);
    let mut d = published.snapshot.details(&text, &c);
    if !c.complete() {
        return Ok(wanted_reply(env, &c));
    }
    if c.saw_bad_value() {
        d = d.with_error(
            ErrorCode::ParseError,
            "a context value this flag reads cannot be decoded",
        );
    }
    Ok(to_term(env, &d))
}

/// Set the environment and the `ERLMCP_FEATURE_FLAGS` value (`<<>>` = none).
#[rustler::nif(schedule = "DirtyCpu")]
fn flags_configure<'a>(env: Env<'a>, environment: Term<'a>, overrides: &str) -> NifResult<Term<'a>> {
    let environment = name_text(environment)?;
    match EnvOverrides::parse(overrides) {
        Ok(o) => {
            changing(env, |engine| {
                engine.set_env_overrides(o);
                engine.set_environment(&environment);
            });
            Ok(atoms::ok().encode(env))
        }
        Err(e) => Ok((atoms::error(), (atoms::bad_env_overrides(), e.to_string())).encode(env)),
    }
}

fn reload_result<'a>(env: Env<'a>, r: Result<ReloadOutcome, ConfigError>) -> Term<'a> {
    match r {
        Ok(o) => {
            let info = Term::map_from_pairs(
                env,
                &[
                    (atoms::changed(), o.changed.encode(env)),
                    (atoms::flags(), o.flags.encode(env)),
                    (atoms::generation(), o.generation.encode(env)),
                ],
            )
            .unwrap_or_else(|_| atoms::ok().encode(env));
            (atoms::ok(), info).encode(env)
        }
        Err(e) => {
            let problems: Vec<Term<'a>> = e.problems().iter().map(|p| problem(env, p)).collect();
            (atoms::error(), problems).encode(env)
        }
    }
}

fn opt<'a, T: Encoder>(env: Env<'a>, v: Option<T>) -> Term<'a> {
    match v {
        Some(v) => v.encode(env),
        None => atoms::undefined().encode(env),
    }
}

fn problem<'a>(env: Env<'a>, p: &Problem) -> Term<'a> {
    Term::map_from_pairs(
        env,
        &[
            (atoms::flag(), opt(env, p.flag.as_deref())),
            (atoms::path(), p.path.encode(env)),
            (atoms::line(), opt(env, p.line)),
            (atoms::column(), opt(env, p.column)),
            (atoms::message(), p.message.encode(env)),
        ],
    )
    .unwrap_or_else(|_| p.to_string().encode(env))
}

/// Load a config file (unless its content is what is loaded already).
/// Runs on a dirty I/O scheduler: it reads a file.
#[rustler::nif(schedule = "DirtyIo")]
fn flags_load_file<'a>(env: Env<'a>, path: &str) -> Term<'a> {
    let r = changing(env, |engine| engine.reload_file(path));
    reload_result(env, r)
}

/// Load a config from JSON text (dirty I/O: a large config takes
/// milliseconds, and the audit trail, when on, syncs a line).
#[rustler::nif(schedule = "DirtyIo")]
fn flags_load_json<'a>(env: Env<'a>, json: rustler::Binary<'a>) -> Term<'a> {
    let r = changing(env, |engine| engine.reload_json(json.as_slice()));
    reload_result(env, r)
}

/// `Value :: true | false | clear`.
#[rustler::nif(schedule = "DirtyIo")]
fn flags_set_override<'a>(env: Env<'a>, name: Term<'a>, value: Atom) -> NifResult<Atom> {
    set_override(env, name, value, None)
}

/// `flags_set_override/2` recording `Actor` (a binary) in the audit trail.
/// Dirty I/O: with the audit trail on, it syncs a line to disk.
#[rustler::nif(schedule = "DirtyIo")]
fn flags_set_override_by<'a>(env: Env<'a>, name: Term<'a>, value: Atom, actor: Term<'a>) -> NifResult<Atom> {
    let actor = name_text(actor)?;
    set_override(env, name, value, Some(&actor))
}

fn set_override<'a>(env: Env<'a>, name: Term<'a>, value: Atom, actor: Option<&str>) -> NifResult<Atom> {
    let name = name_text(name)?;
    let value = if value == atoms::true_() {
        Some(true)
    } else if value == atoms::false_() {
        Some(false)
    } else if value == atoms::clear() {
        None
    } else {
        return Err(Error::BadArg);
    };
    changing(env, |engine| engine.set_override_by(&name, value, actor));
    Ok(atoms::ok())
}

/// `flags_audit({file, Path, Actor}) -> ok | {error, Message}` turns the
/// audit trail on (appending to `Path`, recording `Actor` for reloads);
/// `flags_audit(off) -> ok` turns it off.
#[rustler::nif(schedule = "DirtyIo")]
fn flags_audit<'a>(env: Env<'a>, spec: Term<'a>) -> NifResult<Term<'a>> {
    if let Ok(a) = spec.decode::<Atom>() {
        if a == atoms::off() {
            ENGINE.set_audit_log(None);
            return Ok(atoms::ok().encode(env));
        }
        return Err(Error::BadArg);
    }
    let (tag, path, actor): (Atom, Term<'a>, Term<'a>) = spec.decode()?;
    if tag != atoms::file() {
        return Err(Error::BadArg);
    }
    let path = crate::term::text(path).ok_or(Error::BadArg)?;
    let actor = name_text(actor)?;
    match AuditLog::open(&path, actor) {
        Ok(log) => {
            ENGINE.set_audit_log(Some(log));
            Ok(atoms::ok().encode(env))
        }
        Err(e) => Ok((atoms::error(), e.to_string()).encode(env)),
    }
}

/// `#{Name :: binary() => boolean()}`: effective `enabled` per flag.
#[rustler::nif(schedule = "DirtyCpu")]
fn flags_get_all(env: Env<'_>) -> Term<'_> {
    let all = PUBLISHED.load().snapshot.get_all();
    let pairs: Vec<(&str, bool)> = all.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    Term::map_from_pairs(env, &pairs).unwrap_or_else(|_| atoms::error().encode(env))
}

fn json_term<'a>(env: Env<'a>, v: &serde_json::Value) -> Term<'a> {
    use serde_json::Value as J;
    match v {
        J::Null => atoms::undefined().encode(env),
        J::Bool(b) => b.encode(env),
        J::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.encode(env),
            (None, Some(u), _) => u.encode(env),
            (_, _, Some(f)) => f.encode(env),
            _ => n.to_string().encode(env),
        },
        J::String(s) => s.encode(env),
        J::Array(items) => items.iter().map(|i| json_term(env, i)).collect::<Vec<_>>().encode(env),
        J::Object(m) => {
            let pairs: Vec<(Term<'a>, Term<'a>)> = m.iter().map(|(k, v)| (k.encode(env), json_term(env, v))).collect();
            Term::map_from_pairs(env, &pairs).unwrap_or_else(|_| atoms::error().encode(env))
        }
    }
}

pub(crate) fn to_term<'a, T: serde::Serialize>(env: Env<'a>, v: &T) -> Term<'a> {
    match serde_json::to_value(v) {
        Ok(j) => json_term(env, &j),
        Err(e) => (atoms::error(), e.to_string()).encode(env),
    }
}

/// Each flag's config, what is in force, override and counters (binary keys).
#[rustler::nif(schedule = "DirtyCpu")]
fn flags_details(env: Env<'_>) -> Term<'_> {
    to_term(env, &PUBLISHED.load().snapshot.all_details())
}

/// The full reason chain (binary keys), as `erlmcp-rollout flags explain --json`.
#[rustler::nif]
fn flags_explain<'a>(env: Env<'a>, name: Term<'a>, ctx: Term<'a>, hashes: Term<'a>) -> NifResult<Term<'a>> {
    let text = name_text(name)?;
    let hashes = hashes_of(hashes)?;
    let published = PUBLISHED.load();
    let c = MapCtx::new(ctx, &published.tables.key_atoms, &[])?.with_hashes(hashes);
    let x = published.snapshot.explain(&text, &c);
    if c.saw_bad_value() {
        return Err(Error::BadArg);
    }
    if !c.complete() {
        return Ok(wanted_reply(env, &c));
    }
    Ok(to_term(env, &x))
}

/// Counters and reload counts (binary keys).
#[rustler::nif(schedule = "DirtyCpu")]
fn flags_metrics(env: Env<'_>) -> Term<'_> {
    to_term(env, &ENGINE.metrics())
}

/// The same in the Prometheus text format.
#[rustler::nif(schedule = "DirtyCpu")]
fn flags_metrics_text(env: Env<'_>) -> Term<'_> {
    ENGINE.metrics().to_prometheus().encode(env)
}

/// `erlang:phash2(Term, Range)` computed by the core (for parity tests);
/// Term a binary, atom or integer; `{Salt, Term}` with a binary Salt.
#[rustler::nif]
fn flags_phash2<'a>(term: Term<'a>, range: u64) -> NifResult<u64> {
    // 1..=2^32 as erlang:phash2/2 takes; 2^32 is the whole 32-bit hash.
    if range == 0 || range > 1 << 32 {
        return Err(Error::BadArg);
    }
    let holder = MapCtx::holder(term, &[]);
    // The core's own hash only: a foreign value would be the VM's answer.
    let core_value = |t: Term<'a>| match holder.value_of(t) {
        Some(v) if !matches!(v, Value::Foreign(_)) => Ok(v),
        _ => Err(Error::BadArg),
    };
    let hash = if term.is_tuple() {
        let (salt, inner) = term.decode::<(rustler::Binary<'a>, Term<'a>)>()?;
        phash2::hash_salted(salt.as_slice(), &core_value(inner)?)
    } else {
        phash2::hash(&core_value(term)?)
    };
    Ok(u64::from(hash) % range)
}

/// Pin schedule evaluation to `UnixMs` (milliseconds since the epoch), or
/// back to the system clock with `system`.
#[rustler::nif]
fn flags_set_clock(at: Term<'_>) -> NifResult<Atom> {
    set_clock(&CLOCK, at)
}

/// `flags_watch_etcd(Endpoints, Key, Opts) -> ok | {error, Message}`: the
/// flags follow the config JSON under `Key` in etcd (written by
/// `erlmcp-rollout flags push`): every change is reloaded and published to
/// the hot path as it arrives; invalid values, a deleted key and outages keep
/// the last good flags. Replaces any earlier watch. `flags_etcd_status/0`
/// tells how it goes. Opts: `tls => #{cacertfile, certfile, keyfile}`,
/// `auth => #{user, password_file}`.
#[rustler::nif(schedule = "DirtyIo")]
fn flags_watch_etcd<'a>(env: Env<'a>, endpoints: Term<'a>, key: Term<'a>, opts: Term<'a>) -> Term<'a> {
    let fail = |msg: String| (atoms::error(), msg).encode(env);
    let Some(list) = crate::term::proper_list(endpoints) else {
        return fail("endpoints must be a list of \"host:port\" binaries or strings".into());
    };
    let mut eps = Vec::with_capacity(list.len());
    for t in list {
        match crate::term::text(t) {
            Some(e) => eps.push(e),
            None => return fail("each endpoint must be a binary or a string".into()),
        }
    }
    let Some(key) = crate::term::text(key) else {
        return fail("key must be a binary or a string".into());
    };
    if !opts.is_map() {
        return fail("options must be a map (tls, auth)".into());
    }
    let security = match crate::etcd::decode_security(opts, &Default::default()) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let options = EtcdFlagsOptions {
        key,
        security,
        on_event: Some(Box::new(|_event| {
            // A reload happened on the watcher's thread: publish it for the hot path.
            let _w = writer();
            OwnedEnv::new().run(|env| publish(env));
        })),
        ..EtcdFlagsOptions::default()
    };
    // Stop the old watch first: one source at a time. Invariant: WATCHER is
    // never held across a watcher's drop (it joins a thread that may sit in
    // an etcd retry), so `flags_etcd_status/0` on a normal scheduler only
    // ever waits for a pointer swap.
    let old = WATCHER.lock().unwrap_or_else(|p| p.into_inner()).take();
    drop(old);
    match ENGINE.watch_etcd(&eps, options) {
        Ok(w) => {
            let raced = WATCHER.lock().unwrap_or_else(|p| p.into_inner()).replace(w);
            drop(raced);
            atoms::ok().encode(env)
        }
        Err(e) => fail(e.to_string()),
    }
}

/// `flags_unwatch_etcd() -> ok`: stop following etcd (the flags stay).
#[rustler::nif(schedule = "DirtyIo")]
fn flags_unwatch_etcd() -> Atom {
    // Dropped after the lock is released (see flags_watch_etcd).
    let old = WATCHER.lock().unwrap_or_else(|p| p.into_inner()).take();
    drop(old);
    atoms::ok()
}

/// `flags_etcd_status() -> undefined | #{connected, reloads, failures,
/// reconnects, revision, last_error[, refused]}` (binary keys; `refused =>
/// {etcd_access, Kind, Message}` while the cluster refuses TLS, credentials or
/// permission).
#[rustler::nif]
fn flags_etcd_status(env: Env<'_>) -> Term<'_> {
    let status = {
        let watcher = WATCHER.lock().unwrap_or_else(|p| p.into_inner());
        match watcher.as_ref() {
            Some(w) => w.status(),
            None => return atoms::undefined().encode(env),
        }
    };
    let map = to_term(env, &status);
    match &status.refused {
        // `refused => {etcd_access, Kind, Message}`, the session store's error shape.
        Some(denied) => map
            .map_put("refused".encode(env), crate::etcd::access_error_term(env, denied))
            .unwrap_or(map),
        None => map,
    }
}

/// One flag in erlmcp's `feature_flag()` shape: `#{name := binary(),
/// category => binary() | custom, state => enabled | disabled | rollout,
/// value => term(), rollout_percentage => 0..100, rollout_strategy => atom(),
/// conditions => map(), description => binary(), updated_at => integer()}`
/// (JSON objects as maps with binary keys, as OTP's `json:decode/1`).
fn erlmcp_flag_term<'a>(env: Env<'a>, f: &ErlmcpFlag) -> Term<'a> {
    let state = match f.state {
        ErlmcpState::Enabled => atoms::enabled(),
        ErlmcpState::Disabled => atoms::disabled(),
        ErlmcpState::Rollout => atoms::rollout(),
    };
    let strategy = match f.rollout_strategy {
        Strategy::All => atoms::all(),
        Strategy::None => atoms::none(),
        Strategy::Canary => atoms::canary(),
        Strategy::Percentage => atoms::percentage(),
        Strategy::UserSegment => atoms::user_segment(),
    };
    let mut pairs = vec![
        (atoms::name().encode(env), f.name.encode(env)),
        (
            atoms::category().encode(env),
            match &f.category {
                Some(c) => c.encode(env),
                None => atoms::custom().encode(env),
            },
        ),
        (atoms::state().encode(env), state.encode(env)),
        (atoms::value().encode(env), json_term(env, &f.value)),
        (
            atoms::rollout_percentage().encode(env),
            f.rollout_percentage.encode(env),
        ),
        (atoms::rollout_strategy().encode(env), strategy.encode(env)),
        (
            atoms::conditions().encode(env),
            json_term(env, &serde_json::Value::Object(f.conditions.clone())),
        ),
        (atoms::description().encode(env), f.description.encode(env)),
    ];
    if let Some(t) = f.updated_at {
        pairs.push((atoms::updated_at().encode(env), t.encode(env)));
    }
    Term::map_from_pairs(env, &pairs).unwrap_or_else(|_| atoms::error().encode(env))
}

/// erlmcp's view of flag `Name` (`undefined` when the config has none).
/// Invariant: one flag's fields, bounded by the config's own size; the
/// whole-config NIFs below run dirty.
#[rustler::nif]
fn flags_erlmcp_get<'a>(env: Env<'a>, name: Term<'a>) -> NifResult<Term<'a>> {
    let text = name_text(name)?;
    let published = PUBLISHED.load();
    Ok(match published.snapshot.config().get(&text) {
        Some(spec) => erlmcp_flag_term(env, &ErlmcpFlag::of(&text, spec)),
        None => atoms::undefined().encode(env),
    })
}

/// `#{Name :: binary() => feature_flag()}` of every flag (erlmcp's `list_flags/0`).
#[rustler::nif(schedule = "DirtyCpu")]
fn flags_erlmcp_list(env: Env<'_>) -> Term<'_> {
    let published = PUBLISHED.load();
    let pairs: Vec<(Term<'_>, Term<'_>)> = erlmcp_flags(published.snapshot.config())
        .iter()
        .map(|f| (f.name.encode(env), erlmcp_flag_term(env, f)))
        .collect();
    Term::map_from_pairs(env, &pairs).unwrap_or_else(|_| atoms::error().encode(env))
}

/// erlmcp's export JSON (binary) of the flags in force.
#[rustler::nif(schedule = "DirtyCpu")]
fn flags_erlmcp_export(env: Env<'_>) -> Term<'_> {
    let published = PUBLISHED.load();
    let snapshot = &published.snapshot;
    let text = export_json(snapshot.config(), snapshot.environment(), CLOCK.now_unix_ms());
    bytes_term(env, text.as_bytes())
}

/// erlmcp's `set_flag/3`: `Fields` a map of erlmcp's field names (binaries
/// or atoms) to values (binaries as strings, booleans, numbers, maps, lists);
/// `ok`, `{error, Problems}` (the field named) or `{error, {bad_value,
/// Message}}` for a term JSON cannot hold. Dirty I/O: the audit trail, when
/// on, syncs a line.
#[rustler::nif(schedule = "DirtyIo")]
fn flags_erlmcp_set<'a>(env: Env<'a>, name: Term<'a>, fields: Term<'a>, actor: Term<'a>) -> NifResult<Term<'a>> {
    let name = name_text(name)?;
    let actor = name_text(actor)?;
    let fields = match term_json(fields, 0) {
        Ok(serde_json::Value::Object(m)) => m,
        Ok(_) => return Err(Error::BadArg),
        Err(message) => return Ok((atoms::error(), (atoms::bad_value(), message)).encode(env)),
    };
    let r = changing(env, |engine| engine.set_erlmcp_flag(&name, fields, Some(&actor)));
    Ok(match r {
        Ok(_) => atoms::ok().encode(env),
        Err(e) => reload_result(env, Err(e)),
    })
}

/// erlmcp's `import_flags/1`: JSON of either format, in force until the
/// source changes; `{ok, Info}` or `{error, Problems}`.
#[rustler::nif(schedule = "DirtyIo")]
fn flags_import_json<'a>(env: Env<'a>, json: rustler::Binary<'a>, actor: Term<'a>) -> NifResult<Term<'a>> {
    let actor = name_text(actor)?;
    let r = changing(env, |engine| engine.import_json(json.as_slice(), Some(&actor)));
    Ok(reload_result(env, r))
}

/// Load a config file even when its content is what is loaded (erlmcp's
/// `reload_flags/0` undoes `set_flag` and `import_flags`).
#[rustler::nif(schedule = "DirtyIo")]
fn flags_load_file_now<'a>(env: Env<'a>, path: &str) -> Term<'a> {
    let r = changing(env, |engine| engine.reload_file_now(path));
    reload_result(env, r)
}

/// Deepest nesting `term_json` follows (the config parser's own limit).
const MAX_JSON_DEPTH: usize = 64;

/// An Erlang term as JSON: binaries (UTF-8) as strings, `true`/`false` as
/// booleans, other atoms as their names, integers and floats as numbers,
/// maps (binary or atom keys) as objects, proper lists as arrays. `Err`
/// names what JSON cannot hold.
fn term_json(term: Term<'_>, depth: usize) -> Result<serde_json::Value, String> {
    use serde_json::Value as J;
    if depth > MAX_JSON_DEPTH {
        return Err(format!("nested deeper than {MAX_JSON_DEPTH} levels"));
    }
    if let Some(bytes) = crate::term::binary_bytes(term) {
        return std::str::from_utf8(bytes)
            .map(|s| J::String(s.to_owned()))
            .map_err(|_| "a binary that is not UTF-8 text".to_owned());
    }
    match term.get_type() {
        rustler::TermType::Atom => {
            let mut buf = [0u8; crate::term::ATOM_BUF];
            let text = crate::term::atom_text(term, &mut buf).ok_or("an unreadable atom")?;
            Ok(match text {
                "true" => J::Bool(true),
                "false" => J::Bool(false),
                other => J::String(other.to_owned()),
            })
        }
        rustler::TermType::Integer => match term.decode::<i64>() {
            Ok(i) => Ok(J::from(i)),
            Err(_) => term
                .decode::<u64>()
                .map(J::from)
                .map_err(|_| "an integer beyond 64 bits".to_owned()),
        },
        rustler::TermType::Float => {
            let f: f64 = term.decode().map_err(|_| "an unreadable float")?;
            serde_json::Number::from_f64(f)
                .map(J::Number)
                .ok_or_else(|| "a float JSON cannot hold".to_owned())
        }
        rustler::TermType::Map => {
            let mut m = serde_json::Map::new();
            for (k, v) in rustler::types::map::MapIterator::new(term).ok_or("an unreadable map")? {
                let key = match term_json(k, depth + 1)? {
                    J::String(s) => s,
                    _ => return Err(format!("a map key that is not a binary or atom: {k:?}")),
                };
                m.insert(key, term_json(v, depth + 1)?);
            }
            Ok(J::Object(m))
        }
        rustler::TermType::List => {
            let items = crate::term::proper_list(term).ok_or("an improper list")?;
            items
                .into_iter()
                .map(|t| term_json(t, depth + 1))
                .collect::<Result<_, _>>()
                .map(J::Array)
        }
        _ => Err(format!("{term:?} has no JSON form")),
    }
}
