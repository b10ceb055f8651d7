%% @doc erlmcp session backend for an online migration between two native
%% stores (DESIGN §5): erlmcp's `erlmcp_session_backend' callbacks over the
%% dual-write migrator, replacing the reference's hybrid backend (whose
%% secondary writes were a bare `spawn': any failure lost them).
%%
%% ```
%% {ok, S} = erlmcp_session_backend_hybrid:init(#{primary => {disk, "old.redb"},
%%                                                 secondary => {etcd, [<<"10.0.0.1:2379">>]},
%%                                                 migration_phase => phase1,
%%                                                 state_dir => "/var/lib/erlmcp/migration"}).
%% '''
%%
%% Phases: `off' (primary only), `phase1' (writes to the primary, acknowledged,
%% plus the secondary through a durable outbox and a relay with retries;
%% reads from the primary with sampled shadow reads), `phase2' (reads from
%% the secondary, falling back to the primary), `phase3' (secondary only),
%% `cleanup'. The phase is saved in `state_dir' (with the outbox) and is
%% authoritative; `migration_phase' is the phase to be in: init steps there
%% one phase at a time, and a step forward passes only with the outbox
%% drained and the stores verified equal (otherwise init returns
%% `{error, {gate, Why}}' and nothing changes). Going back is always allowed.
%% `advance/1', `rollback/1', `set_phase/2', `drain/2' and `status/1' do
%% the same at run time. `state_dir' identifies the migration: every init
%% naming it in this VM shares one migrator and relay.
%%
%% Options: `primary', `secondary' (store specs as in
%% `erlmcp_session_native'), `migration_phase', `state_dir' (default
%% `"erlmcp_session_migration"', created if missing), `shadow_sample' (one
%% read in N is shadow-read in phase 1; default 100), and the options of
%% `erlmcp_session_native' (`touch_permille', ...).
%%
%% A legacy erlmcp backend module as a side (`{erlmcp_session_dets, Opts}')
%% is not supported here: cut over from DETS/Mnesia/ETS with
%% `erlmcp_session_migrate:import/3' and `drain/3' (or scripts/session-cutover).
-module(erlmcp_session_backend_hybrid).

-export([init/1, store/3, fetch/2, delete/2, list/1, cleanup_expired/1]).
-export([advance/1, rollback/1, set_phase/2, drain/2, status/1]).

-define(STEP_TIMEOUT, 30000).

-spec init(map()) -> {ok, erlmcp_session_native:state()} | {error, term()}.
init(#{primary := P, secondary := S} = Opts) when is_tuple(P); is_atom(P) ->
    case legacy_side(P) orelse legacy_side(S) of
        true ->
            {error, {unsupported, <<"a legacy erlmcp backend module as a side: use erlmcp_session_migrate:import/3">>}};
        false ->
            Dir = maps:get(state_dir, Opts, "erlmcp_session_migration"),
            case filelib:ensure_path(Dir) of
                ok ->
                    Native = maps:without([primary, secondary], Opts),
                    erlmcp_session_native:init(Native#{store => {hybrid, P, S}, state_dir => Dir});
                {error, Reason} ->
                    {error, {bad_option, state_dir, Reason}}
            end
    end;
init(Opts) when is_map(Opts) ->
    {error, {bad_option, <<"primary and secondary store specs are required">>}};
init(Opts) ->
    {error, {bad_option, options, Opts}}.

legacy_side({Module, Opts}) when is_atom(Module), Module =/= disk, Module =/= etcd, is_map(Opts) -> true;
legacy_side(_) -> false.

-spec store(binary(), map(), erlmcp_session_native:state()) -> {ok, erlmcp_session_native:state()} | {error, term()}.
store(Id, Session, S) -> erlmcp_session_native:store(Id, Session, S).

-spec fetch(binary(), erlmcp_session_native:state()) ->
    {ok, map(), erlmcp_session_native:state()} | {error, term(), erlmcp_session_native:state()}.
fetch(Id, S) -> erlmcp_session_native:fetch(Id, S).

-spec delete(binary(), erlmcp_session_native:state()) ->
    {ok, erlmcp_session_native:state()} | {error, term(), erlmcp_session_native:state()}.
delete(Id, S) -> erlmcp_session_native:delete(Id, S).

-spec list(erlmcp_session_native:state()) -> {ok, [binary()], erlmcp_session_native:state()}.
list(S) -> erlmcp_session_native:list(S).

-spec cleanup_expired(erlmcp_session_native:state()) -> {ok, non_neg_integer(), erlmcp_session_native:state()}.
cleanup_expired(S) -> erlmcp_session_native:cleanup_expired(S).

%% @doc One phase forward, if the gates pass (outbox drained, stores verified).
-spec advance(erlmcp_session_native:state()) -> {ok, atom()} | {error, term()}.
advance(S) -> phase_result(erlmcp_session_native:migration(advance, ?STEP_TIMEOUT, S)).

%% @doc One phase back.
-spec rollback(erlmcp_session_native:state()) -> {ok, atom()} | {error, term()}.
rollback(S) -> phase_result(erlmcp_session_native:migration(rollback, ?STEP_TIMEOUT, S)).

%% @doc Step (gated) to `Phase'.
-spec set_phase(off | phase1 | phase2 | phase3 | cleanup, erlmcp_session_native:state()) -> {ok, atom()} | {error, term()}.
set_phase(Phase, S) -> phase_result(erlmcp_session_native:migration({set, Phase}, ?STEP_TIMEOUT, S)).

%% @doc Wait until the outbox is empty (at most `TimeoutMs'); returns how many intents moved.
-spec drain(non_neg_integer(), erlmcp_session_native:state()) -> {ok, non_neg_integer()} | {error, term()}.
drain(TimeoutMs, S) -> erlmcp_session_native:migration(drain, TimeoutMs, S).

%% @doc The phase and the counters (shadow match/mismatch/missing, fallbacks,
%% relay applied/retried/failed, outbox depth).
-spec status(erlmcp_session_native:state()) -> {ok, atom(), map()} | {error, term()}.
status(S) -> erlmcp_session_native:migration_status(S).

phase_result({ok, P}) when is_atom(P) -> {ok, P};
phase_result({ok, Other}) -> {error, {unexpected, Other}};
phase_result({error, _} = E) -> E.
