//! The rustler NIF of erlmcp_rollout, loaded by the Erlang module
//! `erlmcp_rollout_nif`. It converts Erlang terms to core types, calls the
//! core crate and encodes the results: no logic of its own.
//!
//! One file per area (`flags.rs`; sessions and migration follow), NIF names
//! prefixed by area, errors as atoms or tagged tuples.
//!
//! Scheduling: evaluation runs on the caller's normal scheduler (well under
//! a microsecond); anything that recompiles the snapshot or walks every flag
//! (load, configure, overrides, details, metrics, get_all) can take
//! milliseconds with a thousand flags and runs on a dirty scheduler.

mod flags;
mod session;
mod term;

/// Atoms the NIFs return or compare with.
pub mod atoms {
    rustler::atoms! {
    ok,
    error,
    unknown,
    custom,
    true_ = "true",
    false_ = "false",
    undefined,
    enabled,
    reason,
    bucket,
    percentage,
    index,
    failure,
    changed,
    flags,
    generation,
    flag,
    path,
    line,
    column,
    message,
    syntax,
    io,
    invalid,
    bad_env_overrides,
    check,
    passed,
    detail,
    environment,
    result,
    steps,
    counts,
    unknown_flag_evaluations,
    reloads,
    reload_failures,
    effective_enabled,
    environment_allowed,
    rollout_percentage,
    schedule_stage,
    override_ = "override",
    source,
    config,
    nil,
    clear,
        system,
    }
}

rustler::init!("erlmcp_rollout_nif");
