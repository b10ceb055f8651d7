%% @doc erlmcp session backend over the Rust session stores: a drop-in for
%% `erlmcp_session_ets', `erlmcp_session_dets' and `erlmcp_session_mnesia'
%% (erlmcp's `erlmcp_session_backend' callbacks, same return shapes):
%%
%% ```
%% {ok, S} = erlmcp_session_native:init(#{store => {disk, "/var/lib/erlmcp/sessions.redb"}}),
%% {ok, S} = erlmcp_session_native:store(<<"s1">>, Session, S),
%% {ok, Session1, S} = erlmcp_session_native:fetch(<<"s1">>, S).
%% '''
%%
%% Stores: `memory' (the default; sharded map in Rust, calls run in the
%% caller), `{disk, Path}' (one redb file; `store/3' returns after the write
%% is durable (fsync), concurrent writers share commits) and
%% `{etcd, Endpoints}' (replicated; acknowledged = committed by the quorum).
%% Options: `name' (memory: stores with the same name are shared; default
%% `erlmcp_session_native'), `touch_permille' (a fetch writes the new
%% `last_accessed' only when it moved by more than this fraction of the
%% timeout; default 0 for memory: every fetch slides, as erlmcp's ETS backend
%% does; 100 for disk and etcd, where each write is an fsync or a quorum
%% commit), `tombstone_retention_ms', `prefix' (etcd).
%%
%% A secured etcd cluster (TLS, `--client-cert-auth', authentication):
%% `tls => #{cacertfile => File, certfile => File, keyfile => File}' (the
%% `ssl' application's names; `certfile' and `keyfile' for mutual TLS; with
%% `tls', `"host:port"' endpoints are `https://') and `auth => #{user => Name,
%% password_file => File}' (the password is read from the file). They apply
%% to `{etcd, Endpoints}'; `{etcd, Endpoints, #{tls => .., auth => ..}}' gives
%% one store its own. A refused handshake, password or permission is
%% `{error, {etcd_access, Kind, Message}}' at once (Kind: `unknown_ca',
%% `certificate_expired', `certificate_mismatch',
%% `client_certificate_required', `client_certificate_rejected', `tls',
%% `wrong_password', `auth_required', `auth_not_enabled',
%% `permission_denied', `file', `settings'), never a retry loop:
%%
%% ```
%% {ok, S} = erlmcp_session_native:init(#{store => {etcd, [<<"10.0.0.1:2379">>]},
%%     tls => #{cacertfile => "/etc/erlmcp/etcd-ca.pem",
%%              certfile => "/etc/erlmcp/etcd-client.pem", keyfile => "/etc/erlmcp/etcd-client-key.pem"},
%%     auth => #{user => <<"erlmcp">>, password_file => "/etc/erlmcp/etcd-password"}}).
%% '''
%%
%% `init/1' on a store already open in this VM (same disk file, same memory
%% name) shares it; asking for it with other settings (`touch_permille',
%% `tombstone_retention_ms') is `{error, {bad_store, Why}}'. The State is an
%% opaque handle that never changes.
%%
%% Memory: a memory store opened here takes no part in a migration, so it
%% keeps no tombstones: `delete/2' frees the session at once and
%% `cleanup_expired/1' frees every expired one (memory and `list/1' work
%% follow the live sessions, not the dead). A memory store that is a side of
%% a hybrid (`{memory, Name}' in `erlmcp_session_backend_hybrid') keeps
%% tombstones, without metadata, for `tombstone_retention_ms'; a plain
%% `init/1' of it shares it as it is. Disk and etcd stores keep tombstones
%% (without metadata) for `tombstone_retention_ms' (default 7 days), since
%% either may later be a migration's source.
%%
%% Semantics that differ from erlmcp's ETS/DETS backends, on purpose
%% (DESIGN §4.1): an expired session is never returned (`fetch' says
%% `not_found' and `list' leaves it out, before any cleanup ran);
%% `cleanup_expired/1' returns how many sessions it expired; on disk and
%% etcd `fetch' slides `last_accessed' without turning every read into a
%% write (it is written only when it moved by more than `touch_permille' of
%% the timeout, and never for a session whose timeout is `infinity'). A memory
%% store keeps erlmcp's exact sliding expiry by default (every fetch is
%% written; `touch_permille' changes that).
%%
%% Sessions round-trip exactly. A session in erlmcp's shape (exactly `id',
%% `created_at', `last_accessed', `timeout_ms', `metadata', with `id' equal
%% to the key and `metadata' a map) is stored field by field with the
%% metadata in external term format (readable from Rust and the CLI; the
%% record is marked as such and read back with `binary_to_term(_, [safe])':
%% stored bytes never create an atom; see `from_native/2'): the
%% bytes `term_to_binary/1' writes, encoded by the NIF itself for the usual
%% terms and by `term_to_binary/1' here for the rest (pids, funs, large or
%% deep terms; see `erlmcp_rollout_nif:session_put/4'). Any
%% other map (extra or missing keys) is stored whole; missing times default
%% to now, a missing timeout to `infinity'. A present `created_at',
%% `last_accessed' or `timeout_ms' of the wrong type is rejected with
%% `{error, {invalid, Message}}'. `fetch/2' returns the stored map with
%% `last_accessed' set to the access time, as erlmcp's backends do.
%%
%% Scheduling: memory calls run on the caller's scheduler (microseconds);
%% disk and etcd calls run on threads of the NIF and reply by message, so no
%% scheduler waits for I/O.
-module(erlmcp_session_native).

-export([init/1, store/3, fetch/2, delete/2, list/1, cleanup_expired/1]).
-export([get/2, to_native/2, from_native/2, apply_batch/2, stored/2, stored_many/2]).
-export([migration/3, migration_status/1, migration_phase/1]).
-export([store_errors/0, known/2]).

-on_load(on_load/0).

-record(native, {handle :: erlmcp_rollout_nif:store_handle(),
                 kind :: erlmcp_rollout_nif:store_kind()}).

-opaque state() :: #native{}.
-type session_id() :: binary().
-type session() :: map().
-type store_spec() :: memory | {memory, atom()} | {disk, file:filename_all()} | {etcd, [binary() | string()]}
                    | {etcd, [binary() | string()], #{tls => map(), auth => map()}}
                    | {hybrid, store_spec(), store_spec()}.
-export_type([state/0, store_spec/0]).

%% A session stored whole (not in erlmcp's exact shape).
-define(WHOLE, '$erlmcp_session_native_whole').

%% Runs a session NIF and waits for its reply when it went to a worker.
%% Invariant: `Tag' is a `make_ref()' made in the same function as this
%% receive (the compiler then skips the messages that were queued before
%% the call instead of scanning them: erlmcp calls from one busy gen_server;
%% `scripts/recv-opt-check' and an EUnit test hold every receive here to it).
-define(AWAIT(Tag, Call), case Call of async -> receive {Tag, Reply__} -> Reply__ end; Now__ -> Now__ end).

%% A call that a memory store answers at once (no reference to make, ~30 ns,
%% a tenth of a memory store/3) and any other store maybe later.
-define(CALL(Kind, Tag, Call),
        case Kind of
            memory -> Tag = sync, Call;
            _ -> Tag = make_ref(), ?AWAIT(Tag, Call)
        end).

-define(PAGE, 1000).

%% Store errors that the callback shapes cannot return (`list/1',
%% `cleanup_expired/1'), counted for operators: a `counters' array under
%% this persistent_term key, made by the first load of this module and kept
%% by reloads (so a count is never reset and the term is never replaced,
%% which would cost a global GC). Index per call: ?LIST_ERRORS,
%% ?CLEANUP_ERRORS.
-define(ERRORS, {?MODULE, store_errors}).
-define(LIST_ERRORS, 1).
-define(CLEANUP_ERRORS, 2).

on_load() ->
    case persistent_term:get(?ERRORS, undefined) of
        undefined -> persistent_term:put(?ERRORS, counters:new(2, [write_concurrency]));
        _ -> ok
    end.

%% @doc Store errors since the VM started that `list/1' and
%% `cleanup_expired/1' could not return (erlmcp's callbacks allow no error:
%% they answer `{ok, [], S}' / `{ok, 0, S}'); each is also logged (logger
%% error, metadata `#{erlmcp_session_native => store_error, call => Call}').
-spec store_errors() -> #{list := non_neg_integer(), cleanup_expired := non_neg_integer()}.
store_errors() ->
    C = persistent_term:get(?ERRORS),
    #{list => counters:get(C, ?LIST_ERRORS), cleanup_expired => counters:get(C, ?CLEANUP_ERRORS)}.

store_error(Call, Index, Error) ->
    counters:add(persistent_term:get(?ERRORS), Index, 1),
    logger:error("erlmcp_session_native: ~s failed: ~p", [Call, Error],
                 #{erlmcp_session_native => store_error, call => Call}).

-spec init(map()) -> {ok, state()} | {error, term()}.
init(Opts) when is_map(Opts) ->
    case maps:keys(Opts) -- accepted_options() of
        [] ->
            Spec = maps:get(store, Opts, memory),
            case erlmcp_rollout_nif:session_open(Spec, maps:without([store], Opts)) of
                {ok, Handle, Kind} -> {ok, #native{handle = Handle, kind = Kind}};
                {error, _} = E -> E
            end;
        Unknown ->
            {error, {bad_option, unknown_options(lists:sort(Unknown))}}
    end;
init(Opts) ->
    {error, {bad_option, options, Opts}}.

%% Every option init/1 takes (the NIF reads them); anything else is an error
%% naming it, so a misspelt or foreign option never silently yields a
%% default store. Add new options here.
accepted_options() ->
    [store, name, touch_permille, tombstone_retention_ms, prefix,
     %% a secured etcd cluster (TLS, etcd users)
     tls, auth,
     %% a hybrid store's (erlmcp_session_backend_hybrid passes them through)
     state_dir, migration_phase, shadow_sample, phase_etcd].

unknown_options(Unknown) ->
    Hints = [Hint || K <- Unknown, Hint <- [foreign_option(K)], Hint =/= none],
    iolist_to_binary([io_lib:format("unknown option(s) ~0p; accepted: ~0p", [Unknown, accepted_options()])
                      | [[<<"; ">>, H] || H <- Hints]]).

%% erlmcp's own backends' option names: say which store spec replaces them.
foreign_option(file_path) ->
    <<"file_path is erlmcp_session_dets's option: use store => {disk, Path} (one redb file)">>;
foreign_option(auto_save) ->
    <<"auto_save is erlmcp_session_dets's option: a {disk, Path} store makes every store/3 durable">>;
foreign_option(table_name) ->
    <<"table_name is an option of erlmcp's ETS/Mnesia backends: use store => memory with name => Atom, "
      "or store => {etcd, Endpoints} for a replicated store">>;
foreign_option(nodes) ->
    <<"nodes is erlmcp_session_mnesia's option: use store => {etcd, Endpoints} for a replicated store">>;
foreign_option(disc_copies) ->
    <<"disc_copies is erlmcp_session_mnesia's option: use store => {etcd, Endpoints} or {disk, Path}">>;
foreign_option(_) ->
    none.

-spec store(session_id(), session(), state()) -> {ok, state()} | {error, term()}.
store(Id, Session, #native{} = S) when is_binary(Id), is_map(Session) ->
    case fields(Id, Session) of
        {ok, Fields} -> put(Id, Fields, S);
        {error, _} = E -> E
    end;
store(Id, Session, #native{}) ->
    {error, {invalid, bad_arguments(Id, Session)}}.

put(Id, Fields, #native{handle = H, kind = Kind} = S) ->
    case ?CALL(Kind, Tag, erlmcp_rollout_nif:session_put(H, Tag, Id, Fields)) of
        ok -> {ok, S};
        %% Metadata the NIF does not encode itself (a pid, a fun, a deep or
        %% large term, ...): term_to_binary/1 here, which yields.
        term_to_binary -> {C, L, T, M} = Fields, put(Id, {C, L, T, {etf, term_to_binary(M)}}, S);
        {error, E} -> {error, E}
    end.

-spec fetch(session_id(), state()) -> {ok, session(), state()} | {error, not_found | term(), state()}.
fetch(Id, #native{handle = H, kind = Kind} = S) when is_binary(Id) ->
    case ?CALL(Kind, Tag, erlmcp_rollout_nif:session_touch(H, Tag, Id)) of
        {ok, Stored} -> decoded(Id, Stored, S);
        {error, E} -> {error, E, S}
    end;
fetch(_Id, #native{} = S) ->
    {error, {invalid, <<"session id must be a binary">>}, S}.

%% @doc Like `fetch/2' without sliding the expiry (no write ever).
-spec get(session_id(), state()) -> {ok, session(), state()} | {error, not_found | term(), state()}.
get(Id, #native{handle = H, kind = Kind} = S) when is_binary(Id) ->
    case ?CALL(Kind, Tag, erlmcp_rollout_nif:session_get(H, Tag, Id)) of
        {ok, Stored} -> decoded(Id, Stored, S);
        {error, E} -> {error, E, S}
    end;
get(_Id, #native{} = S) ->
    {error, {invalid, <<"session id must be a binary">>}, S}.

%% @doc What the store holds under `Id', read without touching it: `absent'
%% (no record: never written, or a tombstone a sweep removed), `live', or
%% `dead' (deleted, or expired). For a hybrid store: its store of record.
-spec known(session_id(), state()) -> {ok, absent | live | dead} | {error, term()}.
known(Id, #native{handle = H, kind = Kind}) when is_binary(Id) ->
    ?CALL(Kind, Tag, erlmcp_rollout_nif:session_known(H, Tag, Id));
known(_Id, #native{}) ->
    {error, {invalid, <<"session id must be a binary">>}}.

-spec delete(session_id(), state()) -> {ok, state()} | {error, term(), state()}.
delete(Id, #native{handle = H, kind = Kind} = S) when is_binary(Id) ->
    case ?CALL(Kind, Tag, erlmcp_rollout_nif:session_delete(H, Tag, Id)) of
        {ok, _WasLive} -> {ok, S};
        {error, E} -> {error, E, S}
    end;
delete(_Id, #native{} = S) ->
    {error, {invalid, <<"session id must be a binary">>}, S}.

-spec list(state()) -> {ok, [session_id()], state()}.
list(#native{} = S) ->
    case list_from(start, S, []) of
        {ok, Ids} -> {ok, Ids, S};
        %% The callback allows no error: an unreachable store lists nothing,
        %% and says so in the log and in store_errors/0.
        {error, E} ->
            store_error(list, ?LIST_ERRORS, E),
            {ok, [], S}
    end.

list_from(After, #native{handle = H, kind = Kind} = S, Acc) ->
    case ?CALL(Kind, Tag, erlmcp_rollout_nif:session_list_page(H, Tag, After, ?PAGE)) of
        {ok, Ids, done} -> {ok, lists:append(lists:reverse([Ids | Acc]))};
        {ok, Ids, Next} -> list_from(Next, S, [Ids | Acc]);
        {error, _} = E -> E
    end.

-spec cleanup_expired(state()) -> {ok, non_neg_integer(), state()}.
cleanup_expired(#native{handle = H} = S) ->
    Tag = make_ref(),
    case ?AWAIT(Tag, erlmcp_rollout_nif:session_sweep(H, Tag)) of
        {ok, Expired, _TombstonesRemoved} ->
            {ok, Expired, S};
        {error, E} ->
            store_error(cleanup_expired, ?CLEANUP_ERRORS, E),
            {ok, 0, S}
    end.

%% @doc Writes each `{Id, Fields, Version}' whose version is newer than the
%% stored record's (or where none is stored), exactly as given; version 1
%% therefore means "only where absent" (legacy import). At most 10 000
%% records. Returns how many were applied and skipped.
-spec apply_batch([{session_id(), erlmcp_rollout_nif:native_fields(), pos_integer()}], state()) ->
    {ok, Applied :: non_neg_integer(), Skipped :: non_neg_integer()} | {error, term()}.
apply_batch([], #native{}) ->
    {ok, 0, 0};
apply_batch(Records, #native{handle = H}) ->
    Tag = make_ref(),
    ?AWAIT(Tag, erlmcp_rollout_nif:session_apply_batch(H, Tag, Records)).

%% @doc The stored fields and version of a live session, without touching it.
-spec stored(session_id(), state()) -> {ok, erlmcp_rollout_nif:stored()} | {error, term()}.
stored(Id, #native{handle = H, kind = Kind}) ->
    ?CALL(Kind, Tag, erlmcp_rollout_nif:session_get(H, Tag, Id)).

%% @doc A migration step of a hybrid store (see `erlmcp_session_backend_hybrid').
-spec migration(advance | rollback | drain | {step_to, atom()} | {set, atom()}, non_neg_integer(), state()) ->
    {ok, atom() | non_neg_integer()} | {error, term()}.
migration(Action, TimeoutMs, #native{handle = H}) ->
    Tag = make_ref(),
    ?AWAIT(Tag, erlmcp_rollout_nif:session_migration(H, Tag, Action, TimeoutMs)).

%% @doc The phase a hybrid store applies now (cheap).
-spec migration_phase(state()) -> atom() | {error, term()}.
migration_phase(#native{handle = H}) ->
    erlmcp_rollout_nif:session_migration_phase(H).

%% @doc The phase and counters of a hybrid store.
-spec migration_status(state()) -> {ok, atom(), map()} | {error, term()}.
migration_status(#native{handle = H}) ->
    erlmcp_rollout_nif:session_migration_status(H).

%% @doc `stored/2' for many ids in one call (at most 10 000), in order.
-spec stored_many([session_id()], state()) ->
    {ok, [{ok, erlmcp_rollout_nif:stored()} | {error, term()}]} | {error, term()}.
stored_many([], #native{}) ->
    {ok, []};
stored_many(Ids, #native{handle = H}) ->
    Tag = make_ref(),
    ?AWAIT(Tag, erlmcp_rollout_nif:session_get_many(H, Tag, Ids)).

%% @doc The stored fields of an erlmcp session map (see the module doc).
-spec to_native(session_id(), session()) ->
    {ok, erlmcp_rollout_nif:native_fields()} | {error, {invalid, binary()}}.
to_native(Id, Session) ->
    case fields(Id, Session) of
        {ok, {C, L, T, M}} when is_map(M) -> {ok, {C, L, T, {etf, term_to_binary(M)}}};
        Other -> Other
    end.

%% `to_native/2', except that erlmcp's metadata map is left a term: the
%% session_put NIF encodes it (the same bytes, without an intermediate binary).
fields(Id, #{id := Id, created_at := C, last_accessed := L, timeout_ms := T, metadata := M} = S)
  when map_size(S) =:= 5, is_integer(C), is_integer(L), is_map(M),
       (T =:= infinity orelse (is_integer(T) andalso T > 0)) ->
    {ok, {C, L, T, M}};
fields(_Id, S) when is_map(S) ->
    Now = erlmcp_rollout_nif:session_now(),
    maybe_fields(time(created_at, S, Now), time(last_accessed, S, Now), timeout(S), S);
fields(_Id, _) ->
    {error, {invalid, <<"a session must be a map">>}}.

maybe_fields({ok, C}, {ok, L}, {ok, T}, S) -> {ok, {C, L, T, {etf, term_to_binary({?WHOLE, S})}}};
maybe_fields({error, _} = E, _, _, _) -> E;
maybe_fields(_, {error, _} = E, _, _) -> E;
maybe_fields(_, _, {error, _} = E, _) -> E.

time(Key, S, Default) ->
    case maps:find(Key, S) of
        error -> {ok, Default};
        {ok, V} when is_integer(V) -> {ok, V};
        {ok, V} -> {error, {invalid, iolist_to_binary(io_lib:format("~s must be an integer, got ~0p", [Key, V]))}}
    end.

timeout(S) ->
    case maps:find(timeout_ms, S) of
        error -> {ok, infinity};
        {ok, infinity} -> {ok, infinity};
        {ok, V} when is_integer(V), V > 0 -> {ok, V};
        {ok, V} ->
            {error, {invalid, iolist_to_binary(io_lib:format("timeout_ms must be a positive integer or infinity, got ~0p",
                                                             [V]))}}
    end.

%% @doc The session map of stored fields (inverse of `to_native/2'; the
%% returned `last_accessed' is the stored one). The record says how its
%% metadata is encoded: `{etf, Bin}' (written by this module) is decoded with
%% `binary_to_term(Bin, [safe])', so it never creates an atom or an external
%% fun; bytes that fail that are `{error, {undecodable_metadata, Id}}'. Any
%% other metadata (written from Rust, the CLI, or a record stored before
%% records carried their encoding) comes back as the binary itself, never
%% decoded.
-spec from_native(session_id(), erlmcp_rollout_nif:stored()) ->
    {ok, session()} | {error, {undecodable_metadata, session_id()}}.
from_native(Id, {C, L, T, {etf, Bin}, _Version}) when is_binary(Bin) ->
    try binary_to_term(Bin, [safe]) of
        {?WHOLE, S} when is_map(S) -> {ok, S#{last_accessed => L}};
        M -> {ok, #{id => Id, created_at => C, last_accessed => L, timeout_ms => T, metadata => M}}
    catch
        error:badarg -> {error, {undecodable_metadata, Id}}
    end;
from_native(Id, {C, L, T, Meta, _Version}) when is_binary(Meta) ->
    {ok, #{id => Id, created_at => C, last_accessed => L, timeout_ms => T, metadata => Meta}}.

decoded(Id, Stored, S) ->
    case from_native(Id, Stored) of
        {ok, Session} -> {ok, Session, S};
        {error, Reason} -> {error, Reason, S}
    end.

bad_arguments(Id, _Session) when not is_binary(Id) -> <<"session id must be a binary">>;
bad_arguments(_Id, _Session) -> <<"a session must be a map">>.
