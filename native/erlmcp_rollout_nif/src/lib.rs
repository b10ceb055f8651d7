//! The rustler NIF of erlmcp_rollout, loaded by the Erlang module
//! `erlmcp_rollout_nif`. It converts Erlang terms to core types, calls the
//! core crate and encodes the results: no logic of its own.
//!
//! One file or directory per area (`flags.rs`, `session/`, `etcd.rs` for the
//! etcd options both share), NIF names prefixed by area, errors as atoms or
//! tagged tuples; the atoms of every area in [`atoms`].
//!
//! Scheduling: evaluation runs on the caller's normal scheduler (well under
//! a microsecond); anything that recompiles the snapshot or walks every flag
//! (load, configure, overrides, details, metrics, get_all) can take
//! milliseconds with a thousand flags and runs on a dirty scheduler.

/// Registers `$f` (`fn(Env, Term, ...) -> NifResult<Term>`, one `Term` per
/// name in `[$arg, ...]`) as the NIF `$name` of that arity, by hand rather
/// than with `#[rustler::nif]`, so that a call allocates nothing (rustler
/// 0.39's wrapper collects the arguments into a `Vec`; BENCHMARKS.md, "Why
/// the NIF is shaped this way"). Same contract otherwise: panics are caught
/// and raised as `nif_panicked`, errors become `badarg`. For the hot paths only.
macro_rules! nif_by_hand {
    ($name:literal, $raw:ident, $f:path, [$($arg:ident),+]) => {
        rustler::codegen_runtime::inventory::submit!(rustler::Nif {
            name: $name.as_ptr(),
            arity: nif_by_hand!(@count $($arg)+),
            flags: rustler::SchedulerFlags::Normal as rustler::codegen_runtime::c_uint,
            raw_func: $raw,
        });

        unsafe extern "C" fn $raw(
            nif_env: *mut rustler::sys::ErlNifEnv,
            argc: rustler::codegen_runtime::c_int,
            argv: *const rustler::sys::ErlNifTerm,
        ) -> rustler::sys::ErlNifTerm {
            let lifetime = ();
            // SAFETY: the VM calls this with a valid env and `argc` terms at
            // `argv` (the arity registered above); the terms live as long as
            // the env.
            unsafe {
                let env = rustler::Env::new(&lifetime, nif_env);
                if argc != nif_by_hand!(@count $($arg)+) as rustler::codegen_runtime::c_int || argv.is_null() {
                    return rustler::sys::enif_make_badarg(nif_env);
                }
                let mut at = argv;
                $(
                    let $arg = rustler::Term::new(env, *at);
                    at = at.add(1);
                )+
                let _ = at;
                // Invariant: the closure returns one term word (the
                // error case is turned into a term inside it), so what
                // `catch_unwind` hands back through memory is written and
                // read as one word (BENCHMARKS.md, "Why the NIF is shaped
                // this way").
                let answer = std::panic::catch_unwind(move || match $f(env, $($arg),+) {
                    Ok(term) => term.as_c_arg(),
                    Err(e) => rustler::codegen_runtime::handle_nif_result::<rustler::Term<'_>>(Ok(Err(e)), env)
                        .apply(env),
                });
                match answer {
                    Ok(term) => term,
                    Err(panic) => {
                        rustler::codegen_runtime::handle_nif_result::<rustler::Term<'_>>(Err(panic), env).apply(env)
                    }
                }
            }
        }
    };
    (@count $($arg:ident)+) => { 0 $(+ nif_by_hand!(@one $arg))+ };
    (@one $arg:ident) => { 1 };
}

#[cfg(feature = "bench")]
mod bench;
mod etcd;
mod etf;
mod flags;
mod session;
mod term;

/// Atoms the NIFs return or compare with.
pub mod atoms {
    rustler::atoms! {
        // flags
        ok,
        off,
        file,
        error,
        unknown,
        custom,
        true_ = "true",
        false_ = "false",
        undefined,
        changed,
        flags,
        generation,
        flag,
        path,
        line,
        column,
        message,
        invalid,
        bad_env_overrides,
        config,
        clear,
        system,
        hash,
        category,
        state,
        value,
        rollout_percentage,
        rollout_strategy,
        conditions,
        description,
        updated_at,
        enabled,
        disabled,
        rollout,
        all,
        none,
        canary,
        percentage,
        user_segment,
        bad_value,
        // sessions and migration
        memory,
        disk,
        etcd,
        infinity,
        not_found,
        already_exists,
        conflict,
        unavailable,
        corrupt,
        internal,
        done,
        name,
        touch_permille,
        tombstone_retention_ms,
        prefix,
        bad_option,
        bad_store,
        nif_panicked,
        async_ = "async",
        term_to_binary,
        hybrid,
        state_dir,
        migration_phase,
        shadow_sample,
        phase_etcd,
        gate,
        migration,
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

rustler::init!("erlmcp_rollout_nif", load = load);

fn load(env: rustler::Env<'_>, _info: rustler::Term<'_>) -> bool {
    etf::probe_atom_tags(env) && session::open_handle_type(env)
}
