//! Feature-flag NIFs: one process-wide engine that outlives any Erlang
//! process (a restarted `erlmcp_feature_flags` server finds the last loaded
//! flags still serving).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, LazyLock};

use arc_swap::ArcSwap;
use erlmcp_rollout::flags::{
    phash2, Clock, ConditionFailure, ConfigError, Engine, EnvOverrides, FlagsConfig, Problem, Reason, ReloadOutcome,
    SystemClock, Value,
};
use rustc_hash::FxHashMap;
use rustler::{Atom, Encoder, Env, Error, NifResult, Term};

use crate::atoms;
use crate::term::{MapCtx, Name};

/// The system clock unless a time is pinned (`flags_set_clock/1`, for
/// tests and "what will this look like at T" checks).
struct PinnableClock(AtomicI64);

const UNPINNED: i64 = i64::MIN;

impl Clock for PinnableClock {
    fn now_unix_ms(&self) -> i64 {
        match self.0.load(Ordering::Relaxed) {
            UNPINNED => SystemClock.now_unix_ms(),
            pinned => pinned,
        }
    }
}

static CLOCK: LazyLock<Arc<PinnableClock>> = LazyLock::new(|| Arc::new(PinnableClock(AtomicI64::new(UNPINNED))));

static ENGINE: LazyLock<Engine> =
    LazyLock::new(|| Engine::builder().clock(CLOCK.clone()).build(FlagsConfig::default()));

/// Atoms for every context key the current config reads, made once per load
/// so the hot path looks keys up without touching the atom table.
static KEY_ATOMS: LazyLock<ArcSwap<FxHashMap<Box<str>, Atom>>> = LazyLock::new(Default::default);

fn refresh_key_atoms(env: Env<'_>) {
    let snapshot = ENGINE.snapshot();
    let map: FxHashMap<Box<str>, Atom> = snapshot
        .context_keys()
        .into_iter()
        .filter(|k| k.chars().count() <= 255)
        .filter_map(|k| Atom::from_str(env, k).ok().map(|a| (Box::from(k), a)))
        .collect();
    KEY_ATOMS.store(Arc::new(map));
}

/// Evaluate with `customs` answering custom conditions; `badarg` when the
/// context is not a map or a value evaluation reads has an unsupported type.
fn evaluate<'a>(name: Term<'a>, ctx: Term<'a>, customs: &[(Vec<u8>, bool)]) -> NifResult<(Name<'a>, Reason)> {
    let name = Name::decode(name)?;
    let keys = KEY_ATOMS.load();
    let c = MapCtx::new(ctx, &keys, customs)?;
    let e = ENGINE.evaluate(name.bytes(), &c);
    if c.saw_bad_value() {
        return Err(Error::BadArg);
    }
    Ok((name, e.reason))
}

/// `true | false | unknown | {custom, [Name]}`: the hot path of
/// `erlmcp_feature_flags:is_enabled/2`. `{custom, Names}` asks the caller to
/// run the Erlang funs registered for the flag's custom conditions and call
/// `flags_eval_custom/3` with the answers.
#[rustler::nif]
fn flags_eval<'a>(env: Env<'a>, name: Term<'a>, ctx: Term<'a>) -> NifResult<Term<'a>> {
    let n = Name::decode(name)?;
    let keys = KEY_ATOMS.load();
    let c = MapCtx::new(ctx, &keys, &[])?;
    ENGINE.with_snapshot(|s| {
        let external = s.unregistered_conditions(n.bytes());
        if !external.is_empty() {
            let names: Vec<&str> = external.iter().map(|s| &**s).collect();
            return Ok((atoms::custom(), names).encode(env));
        }
        let e = s.evaluate(n.bytes(), &c);
        if c.saw_bad_value() {
            return Err(Error::BadArg);
        }
        Ok(reason_atom(e.reason).encode(env))
    })
}

/// `{Generation, Flags, Reloads}`: the snapshot serving now and how many
/// successful loads this library has seen (0 = nothing loaded since the
/// VM loaded the library).
#[rustler::nif]
fn flags_status() -> (u64, usize, u64) {
    let (generation, flags) = ENGINE.with_snapshot(|s| (s.generation(), s.config().len()));
    (generation, flags, ENGINE.metrics().reloads)
}

fn reason_atom(reason: Reason) -> Atom {
    match reason {
        Reason::UnknownFlag => atoms::unknown(),
        Reason::Enabled => atoms::true_(),
        _ => atoms::false_(),
    }
}

/// Like `flags_eval/2` with the custom conditions answered:
/// `Answers :: [{Name :: binary(), boolean()}]`; a name without an answer is false.
#[rustler::nif]
fn flags_eval_custom<'a>(
    env: Env<'a>,
    name: Term<'a>,
    ctx: Term<'a>,
    answers: Vec<(Term<'a>, bool)>,
) -> NifResult<Term<'a>> {
    let mut customs = Vec::with_capacity(answers.len());
    for (n, b) in answers {
        customs.push((Name::decode(n)?.bytes().to_vec(), b));
    }
    let (_, reason) = evaluate(name, ctx, &customs)?;
    let reason = match reason {
        Reason::Condition {
            failure: ConditionFailure::Unregistered,
            ..
        } => Reason::Disabled,
        r => r,
    };
    Ok(reason_atom(reason).encode(env))
}

/// Set the environment and the `ERLMCP_FEATURE_FLAGS` value (`<<>>` = none).
#[rustler::nif]
fn flags_configure<'a>(env: Env<'a>, environment: Term<'a>, overrides: &str) -> NifResult<Term<'a>> {
    let environment = Name::decode(environment)?;
    let environment = environment.text()?;
    match EnvOverrides::parse(overrides) {
        Ok(o) => {
            ENGINE.set_env_overrides(o);
            ENGINE.set_environment(environment);
            refresh_key_atoms(env);
            Ok(atoms::ok().encode(env))
        }
        Err(e) => Ok((atoms::error(), (atoms::bad_env_overrides(), e.to_string())).encode(env)),
    }
}

fn reload_result<'a>(env: Env<'a>, r: Result<ReloadOutcome, ConfigError>) -> Term<'a> {
    match r {
        Ok(o) => {
            refresh_key_atoms(env);
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
    reload_result(env, ENGINE.reload_file(path))
}

/// Load a config from JSON text (dirty CPU: a large config takes milliseconds).
#[rustler::nif(schedule = "DirtyCpu")]
fn flags_load_json<'a>(env: Env<'a>, json: rustler::Binary<'a>) -> Term<'a> {
    reload_result(env, ENGINE.reload_json(json.as_slice()))
}

/// `Value :: true | false | clear`.
#[rustler::nif]
fn flags_set_override(name: Term<'_>, value: Atom) -> NifResult<Atom> {
    let name = Name::decode(name)?;
    let name = name.text()?;
    if value == atoms::true_() {
        ENGINE.enable(name);
    } else if value == atoms::false_() {
        ENGINE.disable(name);
    } else if value == atoms::clear() {
        ENGINE.clear(name);
    } else {
        return Err(Error::BadArg);
    }
    Ok(atoms::ok())
}

/// `#{Name :: binary() => boolean()}`: effective `enabled` per flag.
#[rustler::nif]
fn flags_get_all(env: Env<'_>) -> Term<'_> {
    let all = ENGINE.get_all();
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

fn to_term<'a, T: serde::Serialize>(env: Env<'a>, v: &T) -> Term<'a> {
    match serde_json::to_value(v) {
        Ok(j) => json_term(env, &j),
        Err(e) => (atoms::error(), e.to_string()).encode(env),
    }
}

/// Each flag's config, what is in force, override and counters (binary keys).
#[rustler::nif]
fn flags_details(env: Env<'_>) -> Term<'_> {
    to_term(env, &ENGINE.details())
}

/// The full reason chain (binary keys), as `erlmcp-rollout flags explain --json`.
#[rustler::nif]
fn flags_explain<'a>(env: Env<'a>, name: Term<'a>, ctx: Term<'a>) -> NifResult<Term<'a>> {
    let name = Name::decode(name)?;
    let text = name.text()?;
    let keys = KEY_ATOMS.load();
    let c = MapCtx::new(ctx, &keys, &[])?;
    let x = ENGINE.explain(text, &c);
    if c.saw_bad_value() {
        return Err(Error::BadArg);
    }
    Ok(to_term(env, &x))
}

/// Counters and reload counts (binary keys).
#[rustler::nif]
fn flags_metrics(env: Env<'_>) -> Term<'_> {
    to_term(env, &ENGINE.metrics())
}

/// The same in the Prometheus text format.
#[rustler::nif]
fn flags_metrics_text(env: Env<'_>) -> Term<'_> {
    ENGINE.metrics().to_prometheus().encode(env)
}

/// `erlang:phash2(Term, Range)` computed by the core (for parity tests);
/// Term a binary, atom or integer; `{Salt, Term}` with a binary Salt.
#[rustler::nif]
fn flags_phash2<'a>(term: Term<'a>, range: u32) -> NifResult<u32> {
    if range == 0 {
        return Err(Error::BadArg);
    }
    let keys = FxHashMap::default();
    let holder = MapCtx::holder(term, &keys);
    if let Ok((salt, inner)) = term.decode::<(rustler::Binary<'a>, Term<'a>)>() {
        let v = holder.value_of(inner).ok_or(Error::BadArg)?;
        return Ok(phash2::phash2_salted(salt.as_slice(), &v, range));
    }
    let v: Value<'_> = holder.value_of(term).ok_or(Error::BadArg)?;
    Ok(phash2::phash2(&v, range))
}

/// Pin schedule evaluation to `UnixMs` (milliseconds since the epoch), or
/// back to the system clock with `system`.
#[rustler::nif]
fn flags_set_clock(at: Term<'_>) -> NifResult<Atom> {
    let v = if at.decode::<Atom>().ok() == Some(atoms::system()) {
        UNPINNED
    } else {
        let ms: i64 = at.decode()?;
        if ms == UNPINNED {
            return Err(Error::BadArg);
        }
        ms
    };
    CLOCK.0.store(v, Ordering::Relaxed);
    Ok(atoms::ok())
}
