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
%% `advance/1', `rollback/1', `step_to/2', `drain/2' and `status/1' do
%% the same at run time. `state_dir' identifies the migration: every init
%% naming it in this VM shares one migrator and relay.
%%
%% Options: `primary', `secondary' (store specs as in
%% `erlmcp_session_native', `{etcd, Endpoints, #{tls => .., auth => ..}}'
%% included), `tls' and `auth' (for every etcd store and `phase_etcd'; see
%% `erlmcp_session_native'), `migration_phase', `state_dir' (default
%% `"erlmcp_session_migration"', created if missing), `phase_etcd' (keep
%% the phase cluster-wide in etcd instead of a file: `#{endpoints => [...],
%% node => Name, prefix => P, expect_nodes => [Name, ...]}'; each node's
%% watcher applies a change within milliseconds and acknowledges it, and an
%% advance waits until every expected node acknowledged; `tls' and `auth' in
%% it, as in `erlmcp_session_native', give the phase store its own TLS and
%% user, else the top-level `tls' and `auth' apply), `shadow_sample' (one
%% read in N is shadow-read in phase 1; default 100), and the options of
%% `erlmcp_session_native' (`touch_permille', ...).
%%
%% <b>Live cutover from a legacy erlmcp backend.</b> `primary' may be an
%% erlmcp backend module with its options (`{erlmcp_session_dets,
%% #{file_path => ...}}', ETS, Mnesia): erlmcp then moves to a native
%% `secondary' without downtime. Every write goes first to a local native
%% disk store in `state_dir' (the mirror, written durably with its outbox
%% intent), then to the legacy backend, and is acknowledged after both; the
%% relay copies the mirror into the secondary with retries. When the legacy
%% write or delete fails, the mirror's prior copy is written back (or the key
%% deleted again), so the caller's error means nothing changed on any side
%% (in phase 2 a secondary read may see the undone write until the undo is
%% relayed). In `off' and
%% `phase1' reads come from the legacy backend (a fetch whose access time
%% moved by more than 10 % of the timeout is mirrored too, so sliding expiry
%% carries over); in `phase2' from the secondary, falling back to the mirror
%% and then, only for a session the native side has no record of (not
%% imported yet), to the legacy backend: never for one it knows as deleted
%% or expired (`erlmcp_session_native:known/2'); from `phase3' on the legacy backend is no
%% longer written. In `phase1', copy the sessions that existed before the
%% cutover with `import_legacy/3' (through the mirror and the relay,
%% write-if-absent: it never overwrites a session written since), drain, then
%% advance to `phase2' (the gate verifies mirror and secondary; it cannot see
%% the legacy backend, so import first: until then `phase2' reads fall back to
%% the legacy backend, but `list/1' shows only what was copied). A legacy
%% module as the `secondary' (moving back to DETS) is not supported.
-module(erlmcp_session_backend_hybrid).

-export([init/1, store/3, fetch/2, delete/2, list/1, cleanup_expired/1]).
-export([advance/1, rollback/1, step_to/2, set_phase/2, drain/2, status/1, import_legacy/3]).

-define(STEP_TIMEOUT, 30000).

%% A legacy backend module as the primary: its state and the native hybrid
%% (mirror -> secondary).
-record(legacy, {module :: module(), lstate :: term(), native :: erlmcp_session_native:state(),
                 target :: erlmcp_session_migrate:target()}).
-opaque state() :: erlmcp_session_native:state() | #legacy{}.
-export_type([state/0]).

-spec init(map()) -> {ok, state()} | {error, term()}.
init(#{primary := P, secondary := S} = Opts) when is_tuple(P); is_atom(P) ->
    case {legacy_side(P), legacy_side(S)} of
        {_, true} ->
            {error, {unsupported, <<"a legacy erlmcp backend module as the secondary">>}};
        {true, false} ->
            init_legacy(P, S, Opts);
        {false, false} ->
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

init_legacy({Module, ModOpts}, Secondary, Opts) ->
    Dir = maps:get(state_dir, Opts, "erlmcp_session_migration"),
    case filelib:ensure_path(Dir) of
        ok ->
            Mirror = {disk, filename:join(Dir, "mirror.redb")},
            Native = maps:without([primary, secondary], Opts),
            case erlmcp_session_native:init(Native#{store => {hybrid, Mirror, Secondary}, state_dir => Dir}) of
                {ok, N} ->
                    try Module:init(ModOpts) of
                        {ok, L} ->
                            Target = {{hybrid, Mirror, Secondary}, #{state_dir => Dir}},
                            {ok, #legacy{module = Module, lstate = L, native = N, target = Target}};
                        {error, Reason} -> {error, {primary, Module, Reason}}
                    catch
                        error:undef -> {error, {primary, Module, <<"no such backend module">>}}
                    end;
                {error, _} = E ->
                    E
            end;
        {error, Reason} ->
            {error, {bad_option, state_dir, Reason}}
    end.

-spec store(binary(), map(), state()) -> {ok, state()} | {error, term()}.
store(Id, Session, #legacy{module = M, lstate = L, native = N} = St) ->
    case legacy_writes(N) of
        true ->
            %% The mirror (and its outbox intent) first, durably; then the legacy
            %% backend. If the legacy write fails, the mirror gets its prior
            %% record back (see compensate/3): the caller's error means the
            %% session is as it was everywhere.
            Prior = mirror_prior(Id, N),
            case erlmcp_session_native:store(Id, Session, N) of
                {ok, N} ->
                    case legacy_call(fun() -> M:store(Id, Session, L) end) of
                        {ok, L2} -> {ok, St#legacy{lstate = L2}};
                        {error, Reason} -> compensate(Id, Prior, N), {error, Reason};
                        Other -> compensate(Id, Prior, N), {error, {legacy, Other}}
                    end;
                {error, _} = E ->
                    E
            end;
        false ->
            case erlmcp_session_native:store(Id, Session, N) of
                {ok, N} -> {ok, St};
                {error, _} = E -> E
            end
    end;
store(Id, Session, S) -> erlmcp_session_native:store(Id, Session, S).

-spec fetch(binary(), state()) -> {ok, map(), state()} | {error, term(), state()}.
fetch(Id, #legacy{module = M, lstate = L, native = N} = St) ->
    case erlmcp_session_native:migration_phase(N) of
        Phase when Phase =:= off; Phase =:= phase1 ->
            case M:fetch(Id, L) of
                {ok, Session, L2} ->
                    St2 = St#legacy{lstate = L2},
                    _ = Phase =:= phase1 andalso mirror_touch(Id, Session, N),
                    {ok, Session, St2};
                {error, Reason, L2} ->
                    {error, Reason, St#legacy{lstate = L2}}
            end;
        phase2 ->
            case erlmcp_session_native:fetch(Id, N) of
                {ok, Session, N} ->
                    {ok, Session, St};
                {error, not_found, N} ->
                    %% Only a session the native side never had (not copied
                    %% yet: the import is still running) comes from the
                    %% legacy backend. One it knows as dead (deleted, or
                    %% expired: a legacy backend keeps those readable until
                    %% its own cleanup, and its fetch would touch it back to
                    %% life) stays not_found.
                    case erlmcp_session_native:known(Id, N) of
                        {ok, absent} ->
                            case M:fetch(Id, L) of
                                {ok, Session, L2} -> {ok, Session, St#legacy{lstate = L2}};
                                {error, Reason, L2} -> {error, Reason, St#legacy{lstate = L2}}
                            end;
                        {ok, live} ->
                            %% Written since the first read: read it again.
                            case erlmcp_session_native:fetch(Id, N) of
                                {ok, Session, N} -> {ok, Session, St};
                                {error, Reason, N} -> {error, Reason, St}
                            end;
                        {ok, dead} ->
                            {error, not_found, St};
                        {error, Reason} ->
                            {error, Reason, St}
                    end;
                {error, Reason, N} ->
                    {error, Reason, St}
            end;
        _ ->
            case erlmcp_session_native:fetch(Id, N) of
                {ok, Session, N} -> {ok, Session, St};
                {error, Reason, N} -> {error, Reason, St}
            end
    end;
fetch(Id, S) -> erlmcp_session_native:fetch(Id, S).

%% A legacy fetch slid the session's expiry: mirror it when it moved by more
%% than a tenth of the timeout since the mirrored copy (or none is mirrored).
mirror_touch(Id, #{last_accessed := LA} = Session, N) when is_integer(LA) ->
    Stale = case erlmcp_session_native:get(Id, N) of
                {ok, #{last_accessed := Old, timeout_ms := T}, N} when is_integer(Old), is_integer(T) ->
                    LA - Old > T div 10;
                {ok, _, N} -> false;
                {error, _, N} -> true
            end,
    _ = Stale andalso erlmcp_session_native:store(Id, Session, N),
    ok;
mirror_touch(_Id, _Session, _N) ->
    ok.

-spec delete(binary(), state()) -> {ok, state()} | {error, term(), state()}.
delete(Id, #legacy{module = M, lstate = L, native = N} = St) ->
    Writes = legacy_writes(N),
    Prior = case Writes of
                true -> mirror_prior(Id, N);
                false -> none
            end,
    case erlmcp_session_native:delete(Id, N) of
        {ok, N} when Writes ->
            case legacy_call(fun() -> M:delete(Id, L) end) of
                {ok, L2} -> {ok, St#legacy{lstate = L2}};
                {error, Reason} -> compensate(Id, Prior, N), {error, Reason, St};
                {error, Reason, L2} -> compensate(Id, Prior, N), {error, Reason, St#legacy{lstate = L2}}
            end;
        {ok, N} ->
            {ok, St};
        {error, Reason, N} ->
            {error, Reason, St}
    end;
delete(Id, S) -> erlmcp_session_native:delete(Id, S).

%% The mirror's live copy of Id before a dual write (`none' if it holds none).
mirror_prior(Id, N) ->
    case erlmcp_session_native:get(Id, N) of
        {ok, Session, N} -> {session, Session};
        {error, _, N} -> none
    end.

%% Undo a mirror write whose legacy write failed: put the prior copy back, or
%% delete the key when there was none. The relay carries the undo to the
%% secondary after the write it undoes (same outbox, same order), so the
%% secondary ends as it was; in phase 2 a read of the secondary may see the
%% undone write in between. An undo that fails itself is logged (the two
%% sides then differ until the next write of the key or a verify/repair).
compensate(Id, Prior, N) ->
    Undo = case Prior of
               {session, S} -> erlmcp_session_native:store(Id, S, N);
               none -> erlmcp_session_native:delete(Id, N)
           end,
    case Undo of
        {ok, N} -> ok;
        Failed -> logger:error("erlmcp_session_backend_hybrid: undo of ~p after a failed legacy write failed: ~p",
                               [Id, Failed])
    end.

%% A legacy backend call; an exception is a failed call like an error return.
legacy_call(F) ->
    try F()
    catch
        Class:Reason -> {error, {Class, Reason}}
    end.

-spec list(state()) -> {ok, [binary()], state()}.
list(#legacy{module = M, lstate = L, native = N} = St) ->
    case erlmcp_session_native:migration_phase(N) of
        Phase when Phase =:= off; Phase =:= phase1 ->
            {ok, Ids, L2} = M:list(L),
            {ok, Ids, St#legacy{lstate = L2}};
        _ ->
            {ok, Ids, N} = erlmcp_session_native:list(N),
            {ok, Ids, St}
    end;
list(S) -> erlmcp_session_native:list(S).

-spec cleanup_expired(state()) -> {ok, non_neg_integer(), state()}.
cleanup_expired(#legacy{module = M, lstate = L, native = N} = St) ->
    {ok, Native, N} = erlmcp_session_native:cleanup_expired(N),
    case legacy_writes(N) of
        true ->
            {ok, Legacy, L2} = M:cleanup_expired(L),
            {ok, max(Legacy, Native), St#legacy{lstate = L2}};
        false ->
            {ok, Native, St}
    end;
cleanup_expired(S) -> erlmcp_session_native:cleanup_expired(S).

%% The legacy backend is written until the secondary becomes the store of record.
legacy_writes(N) ->
    lists:member(erlmcp_session_native:migration_phase(N), [off, phase1, phase2]).

%% @doc Copy the legacy backend's sessions (`{dets, File} | {ets, Tab} |
%% {mnesia, Tab}', as `erlmcp_session_migrate:import/3' reads them) through
%% the mirror into the secondary: write-if-absent, verified; the relay
%% carries them over. Only for a legacy primary.
-spec import_legacy(erlmcp_session_migrate:source(), state(), map()) ->
    {ok, erlmcp_session_migrate:report()} | {error, term()}.
import_legacy(Source, #legacy{target = Target}, Opts) ->
    erlmcp_session_migrate:import(Source, Target, Opts);
import_legacy(_Source, _S, _Opts) ->
    {error, {unsupported, <<"import_legacy/3 needs a legacy backend module as the primary">>}}.

native(#legacy{native = N}) -> N;
native(S) -> S.

%% @doc One phase forward, if the gates pass (outbox drained, stores verified).
-spec advance(state()) -> {ok, atom()} | {error, term()}.
advance(S) -> phase_result(erlmcp_session_native:migration(advance, ?STEP_TIMEOUT, native(S))).

%% @doc One phase back.
-spec rollback(state()) -> {ok, atom()} | {error, term()}.
rollback(S) -> phase_result(erlmcp_session_native:migration(rollback, ?STEP_TIMEOUT, native(S))).

%% @doc Steps to `Phase' one gated phase at a time (`advance/1' or
%% `rollback/1' per step, each saved); a refused step stops there with the
%% gate's reason. Forcing a phase past the gates is an operator's act:
%% `erlmcp-rollout sessions phase force'.
-spec step_to(off | phase1 | phase2 | phase3 | cleanup, state()) -> {ok, atom()} | {error, term()}.
step_to(Phase, S) -> phase_result(erlmcp_session_native:migration({step_to, Phase}, ?STEP_TIMEOUT, native(S))).

%% @doc The old name of `step_to/2' (gated as well), kept for callers.
-spec set_phase(off | phase1 | phase2 | phase3 | cleanup, state()) -> {ok, atom()} | {error, term()}.
set_phase(Phase, S) -> step_to(Phase, S).

%% @doc Wait until the outbox is empty (at most `TimeoutMs'); returns how many intents moved.
-spec drain(non_neg_integer(), state()) -> {ok, non_neg_integer()} | {error, term()}.
drain(TimeoutMs, S) -> erlmcp_session_native:migration(drain, TimeoutMs, native(S)).

%% @doc The phase and the counters (shadow match/mismatch/missing, fallbacks,
%% relay applied/retried/failed, outbox depth); with `phase_etcd', also
%% `<<"phase_watch">> => #{<<"connected">>, <<"applied">>, <<"syncs">>,
%% <<"reconnects">>, <<"last_error">>}' (the phase watcher: whether it follows the
%% phase key now, the phase it applied and acknowledged, why it last failed).
-spec status(state()) -> {ok, atom(), map()} | {error, term()}.
status(S) -> erlmcp_session_native:migration_status(native(S)).

phase_result({ok, P}) when is_atom(P) -> {ok, P};
phase_result({ok, Other}) -> {error, {unexpected, Other}};
phase_result({error, _} = E) -> E.
