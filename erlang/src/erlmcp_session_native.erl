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
%% timeout; default 100), `tombstone_retention_ms', `prefix' (etcd).
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
%% name) shares it. The State is an opaque handle that never changes.
%%
%% Semantics that differ from erlmcp's ETS/DETS backends, on purpose
%% (DESIGN §4.1): an expired session is never returned (`fetch' says
%% `not_found' and `list' leaves it out, before any cleanup ran);
%% `cleanup_expired/1' returns how many sessions it expired; `fetch' slides
%% `last_accessed' without turning every read into a write (it is written
%% only when it moved by more than `touch_permille' of the timeout, and
%% never for a session whose timeout is `infinity').
%%
%% Sessions round-trip exactly. A session in erlmcp's shape (exactly `id',
%% `created_at', `last_accessed', `timeout_ms', `metadata', with `id' equal
%% to the key and `metadata' a map) is stored field by field with the
%% metadata in external term format (readable from Rust and the CLI): the
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

-record(native, {handle :: erlmcp_rollout_nif:store_handle(),
                 kind :: erlmcp_rollout_nif:store_kind()}).

-opaque state() :: #native{}.
-type session_id() :: binary().
-type session() :: map().
-type store_spec() :: memory | {disk, file:filename_all()} | {etcd, [binary() | string()]}
                    | {etcd, [binary() | string()], #{tls => map(), auth => map()}}
                    | {hybrid, store_spec(), store_spec()}.
-export_type([state/0, store_spec/0]).

%% A session stored whole (not in erlmcp's exact shape).
-define(WHOLE, '$erlmcp_session_native_whole').

%% Runs a session NIF and waits for its reply when it went to a worker.
-define(AWAIT(Tag, Call), case Call of async -> receive {Tag, Reply__} -> Reply__ end; Now__ -> Now__ end).

-define(PAGE, 1000).

-spec init(map()) -> {ok, state()} | {error, term()}.
init(Opts) when is_map(Opts) ->
    Spec = maps:get(store, Opts, memory),
    case erlmcp_rollout_nif:session_open(Spec, maps:without([store], Opts)) of
        {ok, Handle, Kind} -> {ok, #native{handle = Handle, kind = Kind}};
        {error, _} = E -> E
    end;
init(Opts) ->
    {error, {bad_option, options, Opts}}.

-spec store(session_id(), session(), state()) -> {ok, state()} | {error, term()}.
store(Id, Session, #native{} = S) when is_binary(Id), is_map(Session) ->
    case fields(Id, Session) of
        {ok, Fields} -> put(Id, Fields, S);
        {error, _} = E -> E
    end;
store(Id, Session, #native{}) ->
    {error, {invalid, bad_arguments(Id, Session)}}.

put(Id, Fields, #native{handle = H, kind = Kind} = S) ->
    Tag = tag(Kind),
    case ?AWAIT(Tag, erlmcp_rollout_nif:session_put(H, Tag, Id, Fields)) of
        ok -> {ok, S};
        %% Metadata the NIF does not encode itself (a pid, a fun, a deep or
        %% large term, ...): term_to_binary/1 here, which yields.
        term_to_binary -> {C, L, T, M} = Fields, put(Id, {C, L, T, term_to_binary(M)}, S);
        {error, E} -> {error, E}
    end.

-spec fetch(session_id(), state()) -> {ok, session(), state()} | {error, not_found | term(), state()}.
fetch(Id, #native{handle = H, kind = Kind} = S) when is_binary(Id) ->
    Tag = tag(Kind),
    case ?AWAIT(Tag, erlmcp_rollout_nif:session_touch(H, Tag, Id)) of
        {ok, Stored} -> decoded(Id, Stored, S);
        {error, E} -> {error, E, S}
    end;
fetch(_Id, #native{} = S) ->
    {error, {invalid, <<"session id must be a binary">>}, S}.

%% @doc Like `fetch/2' without sliding the expiry (no write ever).
-spec get(session_id(), state()) -> {ok, session(), state()} | {error, not_found | term(), state()}.
get(Id, #native{handle = H, kind = Kind} = S) when is_binary(Id) ->
    Tag = tag(Kind),
    case ?AWAIT(Tag, erlmcp_rollout_nif:session_get(H, Tag, Id)) of
        {ok, Stored} -> decoded(Id, Stored, S);
        {error, E} -> {error, E, S}
    end;
get(_Id, #native{} = S) ->
    {error, {invalid, <<"session id must be a binary">>}, S}.

-spec delete(session_id(), state()) -> {ok, state()} | {error, term(), state()}.
delete(Id, #native{handle = H, kind = Kind} = S) when is_binary(Id) ->
    Tag = tag(Kind),
    case ?AWAIT(Tag, erlmcp_rollout_nif:session_delete(H, Tag, Id)) of
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
        %% and says so in the log.
        {error, E} ->
            logger:error("erlmcp_session_native: list failed: ~p", [E]),
            {ok, [], S}
    end.

list_from(After, #native{handle = H, kind = Kind} = S, Acc) ->
    Tag = tag(Kind),
    case ?AWAIT(Tag, erlmcp_rollout_nif:session_list_page(H, Tag, After, ?PAGE)) of
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
            logger:error("erlmcp_session_native: cleanup_expired failed: ~p", [E]),
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
    Tag = tag(Kind),
    ?AWAIT(Tag, erlmcp_rollout_nif:session_get(H, Tag, Id)).

%% @doc A migration step of a hybrid store (see `erlmcp_session_backend_hybrid').
-spec migration(advance | rollback | drain | {set, atom()}, non_neg_integer(), state()) ->
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

%% The tag of a NIF call's reply. A memory store answers at once (but for
%% sweeps and batches, which take a fresh reference): no reference to make
%% (~30 ns, a tenth of a memory store/3).
tag(memory) -> sync;
tag(_) -> make_ref().

%% @doc The stored fields of an erlmcp session map (see the module doc).
-spec to_native(session_id(), session()) ->
    {ok, erlmcp_rollout_nif:native_fields()} | {error, {invalid, binary()}}.
to_native(Id, Session) ->
    case fields(Id, Session) of
        {ok, {C, L, T, M}} when is_map(M) -> {ok, {C, L, T, term_to_binary(M)}};
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

maybe_fields({ok, C}, {ok, L}, {ok, T}, S) -> {ok, {C, L, T, term_to_binary({?WHOLE, S})}};
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
%% returned `last_accessed' is the stored one). Metadata bytes that are not
%% external term format (a session written from Rust) come back as the
%% binary itself.
-spec from_native(session_id(), erlmcp_rollout_nif:stored()) -> session().
from_native(Id, {C, L, T, Meta, _Version}) ->
    case decode_meta(Meta) of
        {ok, {?WHOLE, S}} when is_map(S) -> S#{last_accessed => L};
        {ok, M} -> #{id => Id, created_at => C, last_accessed => L, timeout_ms => T, metadata => M};
        error -> #{id => Id, created_at => C, last_accessed => L, timeout_ms => T, metadata => Meta}
    end.

decode_meta(Bin) ->
    try {ok, binary_to_term(Bin)}
    catch error:badarg -> error
    end.

decoded(Id, Stored, S) ->
    {ok, from_native(Id, Stored), S}.

bad_arguments(Id, _Session) when not is_binary(Id) -> <<"session id must be a binary">>;
bad_arguments(_Id, _Session) -> <<"a session must be a map">>.
