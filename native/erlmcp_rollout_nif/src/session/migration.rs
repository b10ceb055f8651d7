//! Migration NIFs: opening `{hybrid, Primary, Secondary}` and driving its
//! phases. The migrator, its registry by state directory and phase stepping
//! are the core's (`migrate::hybrid`, `Migrator::step_to`); these convert
//! terms and reply.

use std::sync::Arc;
use std::time::Duration;

use erlmcp_rollout::migrate::hybrid::{Hybrid, HybridOpenError, STEP_TIMEOUT};
use erlmcp_rollout::migrate::phase::Phase;
use erlmcp_rollout::migrate::MigrateError;
use erlmcp_rollout::session::StoreError;
use erlmcp_rollout::workers::Job;
use rustler::env::SavedTerm;
use rustler::{Atom, Encoder, Env, LocalPid, OwnedEnv, Term};

use super::handle::{handle_term, StoreHandle};
use super::spec::{decode_hybrid_options, decode_spec, pair, OpenOptions};
use super::{invalid, open_error_term, submit, HYBRIDS, STORES};
use crate::atoms;

pub fn phase_atom(p: Phase) -> Atom {
    match p {
        Phase::Off => atoms::off(),
        Phase::Phase1 => atoms::phase1(),
        Phase::Phase2 => atoms::phase2(),
        Phase::Phase3 => atoms::phase3(),
        Phase::Cleanup => atoms::cleanup(),
    }
}

pub fn decode_phase(term: Term<'_>) -> Option<Phase> {
    let a: Atom = term.decode().ok()?;
    Phase::ALL.into_iter().find(|p| phase_atom(*p) == a)
}

/// `{etcd_access, Kind, Message} | {gate | unavailable | migration, Message}`.
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
/// a time from the saved one), `shadow_sample` and `phase_etcd`. One
/// migrator per state directory in the VM.
pub fn open_hybrid<'a>(
    env: Env<'a>,
    primary: Term<'a>,
    secondary: Term<'a>,
    opts: Term<'a>,
    o: &OpenOptions,
) -> Term<'a> {
    let options = match decode_hybrid_options(opts, o) {
        Ok(h) => h,
        Err(e) => return (atoms::error(), (atoms::bad_option(), e)).encode(env),
    };
    let sides = decode_spec(primary, o).and_then(|(p, _)| Ok((p, decode_spec(secondary, o)?.0)));
    let (p, s) = match sides {
        Ok(x) => x,
        Err(e) => return (atoms::error(), (atoms::bad_store(), e)).encode(env),
    };
    match HYBRIDS.open(&STORES, &p, &s, options) {
        Ok(hybrid) => {
            let handle = StoreHandle {
                store: hybrid.migrator().clone(),
                blocking: hybrid.blocking(),
                hybrid: Some(hybrid),
            };
            (atoms::ok(), handle_term(env, handle), atoms::hybrid()).encode(env)
        }
        Err(HybridOpenError::BadOption(e)) => (atoms::error(), (atoms::bad_option(), e)).encode(env),
        Err(HybridOpenError::Side(e)) => open_error_term(env, &e),
        Err(HybridOpenError::Migrate(e)) => (atoms::error(), migrate_error_term(env, &e)).encode(env),
    }
}

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
        let m = hybrid.migrator();
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
    submit(env, job)
}

/// `session_migration_phase(Handle) -> Phase | {error, {invalid, _}}`: the
/// phase applied now (cheap: a read lock; for per-call routing).
#[rustler::nif]
fn session_migration_phase<'a>(env: Env<'a>, handle: &StoreHandle) -> Term<'a> {
    match hybrid_of(handle) {
        Ok(h) => phase_atom(h.migrator().phase()).encode(env),
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
    match hybrid.migrator().counters() {
        Ok(c) => {
            let map = crate::flags::to_term(env, &c);
            // With the phase in etcd: `<<"phase_watch">> => #{connected, applied, syncs,
            // reconnects, last_error}` (the watcher's state; no secret in it).
            let map = match hybrid.phase_watch() {
                Some(w) => map
                    .map_put("phase_watch", crate::flags::to_term(env, &w))
                    .unwrap_or(map),
                None => map,
            };
            (atoms::ok(), phase_atom(c.phase), map).encode(env)
        }
        Err(e) => (atoms::error(), migrate_error_term(env, &e)).encode(env),
    }
}
