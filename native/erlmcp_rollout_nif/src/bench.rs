//! Calibration NIFs for the Erlang benchmarks (cargo feature `bench`; the
//! stub module exports them only when compiled with `ERLMCP_ROLLOUT_BENCH`,
//! as `scripts/bench-app` does). A production build has neither.

use rustler::{Atom, Env, NifResult, OwnedEnv, Term};

use crate::atoms;

/// `flags_nop(A, B) -> A`: the cost of a NIF call itself, registered like
/// `flags_eval/2` (without rustler's wrapper).
fn flags_nop<'a>(_env: Env<'a>, first: Term<'a>, _second: Term<'a>) -> NifResult<Term<'a>> {
    Ok(first)
}

nif_by_hand!(c"flags_nop", flags_nop_raw, flags_nop, [first, second]);

/// `session_copy_probe(Term) -> ok`: copies `Term` into a process-independent
/// environment and frees it: what keeping a session's metadata as an Erlang
/// term (instead of its external term format) would cost per store. No store
/// is touched.
#[rustler::nif]
fn session_copy_probe(term: Term<'_>) -> Atom {
    let owned = OwnedEnv::new();
    drop(owned.save(term));
    atoms::ok()
}
