%% @doc The NIF stub module: loads `priv/liberlmcp_rollout_nif.so' (built by
%% cargo from `native/erlmcp_rollout_nif') and declares every NIF. Call the
%% API modules, not this one.
%%
%% Reloading the NIF library (tested in erlmcp_rollout_nif_reload_SUITE):
%% - `code:load_file(erlmcp_rollout_nif)' over the loaded module fails with
%%   `{error, on_load_failure}' (rustler libraries have no NIF `upgrade'
%%   callback), harmlessly: the loaded library keeps serving.
%% - `code:purge/1', `code:delete/1', `code:purge/1', then
%%   `code:load_file/1' loads again: the VM keeps the library mapped while
%%   store handles live, so the second load runs in the same library
%%   instance (same stores, threads and flag engine); it opens a new handle
%%   type and keeps accepting handles of the earlier ones, so live handles
%%   keep working. At most 64 such reloads per OS process; beyond that the
%%   load fails ("Library load-call unsuccessful").
%% - A library at another path is refused: a second instance would start
%%   with empty stores and flags while the first one's threads keep running
%%   and its handles would be `badarg'. The load fails with
%%   `{error, on_load_failure}' and `init/0' returns (and the VM logs)
%%   `{error, {library_already_loaded, LoadedPath, NewPath, Hint}}'. The
%%   library's path is kept in persistent_term `{erlmcp_rollout_nif,
%%   library}' from the first successful load on (the library is never
%%   unloaded from the OS process either). The same path always gives the
%%   first instance back (even if the file was replaced: the OS reuses the
%%   mapping), so a new build takes a node restart: drain the node, stop
%%   it, install the new `priv/' and start it (a rolling restart across the
%%   cluster). The API modules are pure Erlang and hot-load freely; the flag
%%   engine lives in the library, not in any process.
-module(erlmcp_rollout_nif).

-export([flags_eval/2, flags_eval_custom/4, flags_status/0, flags_configure/2,
         flags_load_file/1, flags_load_json/1, flags_set_override/2, flags_get_all/0,
         flags_details/0, flags_explain/3, flags_metrics/0, flags_metrics_text/0,
         flags_phash2/2, flags_set_clock/1, flags_watch_etcd/3, flags_unwatch_etcd/0, flags_etcd_status/0,
         flags_custom_names/1, flags_eval_details/4, flags_set_override_by/3, flags_audit/1,
         flags_eval_rollout/4, flags_erlmcp_get/1, flags_erlmcp_list/0, flags_erlmcp_export/0,
         flags_erlmcp_set/3, flags_import_json/2, flags_load_file_now/1]).
-export([session_open/2, session_put/4, session_touch/3, session_get/3, session_known/3, session_delete/3,
         session_list_page/4, session_sweep/2, session_apply_batch/3, session_get_many/3, session_migration/4, session_migration_status/1, session_migration_phase/1, session_set_clock/1, session_now/0]).

%% The benchmarks' calibration NIFs (defined at the end): bench builds only.
-ifdef(ERLMCP_ROLLOUT_BENCH).
-export([flags_nop/2, session_copy_probe/1]).
-endif.

-on_load(init/0).

-type name() :: binary() | atom().
-type problem() :: #{flag := binary() | undefined, path := binary(),
                     line := pos_integer() | undefined, column := pos_integer() | undefined,
                     message := binary()}.
-type load_info() :: #{changed := boolean(), flags := non_neg_integer(), generation := pos_integer()}.
-export_type([problem/0, load_info/0]).

-type store_handle() :: reference().
-type store_kind() :: memory | disk | etcd | hybrid.
%% What a session NIF returns, now or (`async') later as `{Tag, Result}'.
-type store_error() :: not_found | already_exists | {conflict, non_neg_integer(), non_neg_integer()}
                     | {unavailable | corrupt | invalid | internal, binary()} | nif_panicked.
%% Metadata: opaque bytes, or `{etf, Bytes}' for external term format
%% written by the Erlang side (the record keeps which it is).
-type metadata() :: binary() | {etf, binary()}.
-type native_fields() :: {CreatedAt :: integer(), LastAccessed :: integer(),
                          TimeoutMs :: pos_integer() | infinity, Metadata :: metadata()}.
-type stored() :: {CreatedAt :: integer(), LastAccessed :: integer(),
                   TimeoutMs :: pos_integer() | infinity, Metadata :: metadata(), Version :: pos_integer()}.
-export_type([store_handle/0, store_kind/0, store_error/0, metadata/0, native_fields/0, stored/0]).

%% The absolute path of the library loaded in this VM (set once).
-define(LOADED, {?MODULE, library}).

-spec init() -> ok | {error, term()}.
init() ->
    Path = filename:absname(lib_path()),
    case persistent_term:get(?LOADED, Path) of
        Path ->
            case erlang:load_nif(Path, 0) of
                ok -> remember(Path);
                {error, _} = E -> E
            end;
        Loaded ->
            {error, {library_already_loaded, Loaded, Path,
                     <<"this VM already runs the erlmcp_rollout NIF library from another path; "
                       "a second instance would not see its stores, flags or handles: "
                       "restart the node to change the library">>}}
    end.

%% Invariant: the key is written once per VM (a later put of the same value
%% would still be a persistent_term update, which costs a global GC).
remember(Path) ->
    case persistent_term:get(?LOADED, undefined) of
        undefined -> persistent_term:put(?LOADED, Path);
        Path -> ok
    end.

lib_path() ->
    Priv = case code:priv_dir(erlmcp_rollout) of
               {error, bad_name} ->
                   filename:join(filename:dirname(filename:dirname(code:which(?MODULE))), "priv");
               Dir ->
                   Dir
           end,
    filename:join(Priv, "liberlmcp_rollout_nif").

-define(NOT_LOADED, erlang:nif_error(nif_not_loaded)).

%% `{hash, Wanted}': a context value of another type than binary, atom or
%% integer needs `erlang:phash2(T, 4294967296)' for each `T' in `Wanted';
%% evaluate again with `flags_eval_custom/4' and those `[{T, Hash}]'.
-spec flags_eval(Name :: name(), Context :: map()) ->
    boolean() | unknown | {custom, [binary()]} | {hash, [term()]}.
flags_eval(_Name, _Context) -> ?NOT_LOADED.

-spec flags_eval_custom(Name :: name(), Context :: map(), Answers :: [{binary(), boolean()}],
                        Hashes :: [{term(), non_neg_integer()}]) ->
    boolean() | unknown | {hash, [term()]}.
flags_eval_custom(_Name, _Context, _Answers, _Hashes) -> ?NOT_LOADED.

%% erlmcp's `evaluate_rollout/2': `Identifier' (any term) under the flag's
%% stickiness key.
-spec flags_eval_rollout(Name :: name(), Identifier :: term(), Answers :: [{binary(), boolean()}],
                         Hashes :: [{term(), non_neg_integer()}]) ->
    boolean() | unknown | {hash, [term()]}.
flags_eval_rollout(_Name, _Identifier, _Answers, _Hashes) -> ?NOT_LOADED.

-spec flags_erlmcp_get(Name :: name()) -> undefined | map().
flags_erlmcp_get(_Name) -> ?NOT_LOADED.

-spec flags_erlmcp_list() -> #{binary() => map()}.
flags_erlmcp_list() -> ?NOT_LOADED.

-spec flags_erlmcp_export() -> binary().
flags_erlmcp_export() -> ?NOT_LOADED.

-spec flags_erlmcp_set(Name :: name(), Fields :: map(), Actor :: binary()) ->
    ok | {error, [problem()] | {bad_value, binary()}}.
flags_erlmcp_set(_Name, _Fields, _Actor) -> ?NOT_LOADED.

-spec flags_import_json(Json :: binary(), Actor :: binary()) -> {ok, load_info()} | {error, [problem()]}.
flags_import_json(_Json, _Actor) -> ?NOT_LOADED.

-spec flags_load_file_now(Path :: binary()) -> {ok, load_info()} | {error, [problem()]}.
flags_load_file_now(_Path) -> ?NOT_LOADED.

-spec flags_status() -> {Generation :: pos_integer(), Flags :: non_neg_integer(), Reloads :: non_neg_integer()}.
flags_status() -> ?NOT_LOADED.

-spec flags_configure(Environment :: name(), EnvOverrides :: binary()) -> ok | {error, {bad_env_overrides, binary()}}.
flags_configure(_Environment, _EnvOverrides) -> ?NOT_LOADED.

-spec flags_load_file(Path :: binary()) -> {ok, load_info()} | {error, [problem()]}.
flags_load_file(_Path) -> ?NOT_LOADED.

-spec flags_load_json(Json :: binary()) -> {ok, load_info()} | {error, [problem()]}.
flags_load_json(_Json) -> ?NOT_LOADED.

-spec flags_set_override(Name :: name(), Value :: true | false | clear) -> ok.
flags_set_override(_Name, _Value) -> ?NOT_LOADED.

-spec flags_set_override_by(Name :: name(), Value :: true | false | clear, Actor :: binary()) -> ok.
flags_set_override_by(_Name, _Value, _Actor) -> ?NOT_LOADED.

-spec flags_custom_names(Name :: name()) -> [binary()].
flags_custom_names(_Name) -> ?NOT_LOADED.

-spec flags_eval_details(Name :: name(), Context :: map(), Answers :: [{binary(), boolean()}],
                         Hashes :: [{term(), non_neg_integer()}]) ->
    #{binary() => term()} | {hash, [term()]}.
flags_eval_details(_Name, _Context, _Answers, _Hashes) -> ?NOT_LOADED.

-spec flags_audit({file, Path :: binary() | string(), Actor :: binary()} | off) -> ok | {error, binary()}.
flags_audit(_Spec) -> ?NOT_LOADED.

-spec flags_get_all() -> #{binary() => boolean()}.
flags_get_all() -> ?NOT_LOADED.

-spec flags_details() -> [map()].
flags_details() -> ?NOT_LOADED.

-spec flags_explain(Name :: name(), Context :: map(), Hashes :: [{term(), non_neg_integer()}]) ->
    map() | {hash, [term()]}.
flags_explain(_Name, _Context, _Hashes) -> ?NOT_LOADED.

-spec flags_metrics() -> map().
flags_metrics() -> ?NOT_LOADED.

-spec flags_metrics_text() -> binary().
flags_metrics_text() -> ?NOT_LOADED.

-spec flags_phash2(Term :: binary() | atom() | integer() | {binary(), binary() | atom() | integer()},
                   Range :: 1..4294967296) -> non_neg_integer().
flags_phash2(_Term, _Range) -> ?NOT_LOADED.

-spec flags_set_clock(UnixMs :: integer() | system) -> ok.
flags_set_clock(_UnixMs) -> ?NOT_LOADED.

%% Calibration for the benchmark: a NIF that returns its first argument.

%% `Opts': `tls => #{cacertfile, certfile, keyfile}', `auth => #{user, password_file}'.
-spec flags_watch_etcd(Endpoints :: [binary() | string()], Key :: binary() | string(), Opts :: map()) ->
    ok | {error, binary()}.
flags_watch_etcd(_Endpoints, _Key, _Opts) -> ?NOT_LOADED.

-spec flags_unwatch_etcd() -> ok.
flags_unwatch_etcd() -> ?NOT_LOADED.

-spec flags_etcd_status() -> undefined | #{binary() => term()}.
flags_etcd_status() -> ?NOT_LOADED.

%% Sessions. Every call taking a `Tag' either answers at once or returns
%% `async' and later sends `{Tag, Result}' to the caller (disk and etcd
%% stores, and every sweep); see `erlmcp_session_native'. A fresh
%% reference makes the reply unique; the five point calls to a memory
%% store always answer at once and take any term.
-type reply_tag() :: reference() | atom().

-spec session_open(Spec :: memory | {disk, file:filename_all()} | {etcd, [binary() | string()]}
                         | {etcd, [binary() | string()], map()}, Opts :: map()) ->
    {ok, store_handle(), store_kind()} | {error, {bad_option | bad_store, binary()} | store_error()}.
session_open(_Spec, _Opts) -> ?NOT_LOADED.

%% `Metadata' may also be a map for the NIF to encode (the bytes
%% `term_to_binary/1' writes); `term_to_binary' asks the caller to encode it
%% and call again (a pid, a fun, a large or deep term, ...).
-spec session_put(store_handle(), Tag :: reply_tag(), Id :: binary(),
                  native_fields() | {integer(), integer(), pos_integer() | infinity, map()}) ->
    ok | {error, store_error()} | async | term_to_binary.
session_put(_Handle, _Tag, _Id, _Fields) -> ?NOT_LOADED.

-spec session_touch(store_handle(), Tag :: reply_tag(), Id :: binary()) ->
    {ok, stored()} | {error, store_error()} | async.
session_touch(_Handle, _Tag, _Id) -> ?NOT_LOADED.

-spec session_get(store_handle(), Tag :: reply_tag(), Id :: binary()) ->
    {ok, stored()} | {error, store_error()} | async.
session_get(_Handle, _Tag, _Id) -> ?NOT_LOADED.

%% What the store holds under `Id', without touching it: no record, a live
%% session, or a dead one (deleted or expired).
-spec session_known(store_handle(), Tag :: reply_tag(), Id :: binary()) ->
    {ok, absent | live | dead} | {error, store_error()} | async.
session_known(_Handle, _Tag, _Id) -> ?NOT_LOADED.

-spec session_delete(store_handle(), Tag :: reply_tag(), Id :: binary()) ->
    {ok, WasLive :: boolean()} | {error, store_error()} | async.
session_delete(_Handle, _Tag, _Id) -> ?NOT_LOADED.

-spec session_list_page(store_handle(), Tag :: reply_tag(), After :: binary() | start, Limit :: 1..1000) ->
    {ok, [binary()], Next :: binary() | done} | {error, store_error()} | async.
session_list_page(_Handle, _Tag, _After, _Limit) -> ?NOT_LOADED.

-spec session_apply_batch(store_handle(), Tag :: reference(),
                          [{Id :: binary(), native_fields(), Version :: pos_integer()}]) ->
    async | {error, store_error()}.
session_apply_batch(_Handle, _Tag, _Records) -> ?NOT_LOADED.

-spec session_get_many(store_handle(), Tag :: reference(), [binary()]) ->
    {ok, [{ok, stored()} | {error, store_error()}]} | {error, store_error()} | async.
session_get_many(_Handle, _Tag, _Ids) -> ?NOT_LOADED.

-spec session_migration(store_handle(), Tag :: reference(),
                        Action :: advance | rollback | drain | {step_to, atom()} | {set, atom()}, TimeoutMs :: non_neg_integer()) ->
    async | {error, {invalid, binary()}}.
session_migration(_Handle, _Tag, _Action, _TimeoutMs) -> ?NOT_LOADED.

-spec session_migration_phase(store_handle()) -> atom() | {error, {invalid, binary()}}.
session_migration_phase(_Handle) -> ?NOT_LOADED.

-spec session_migration_status(store_handle()) -> {ok, atom(), map()} | {error, term()}.
session_migration_status(_Handle) -> ?NOT_LOADED.

-spec session_sweep(store_handle(), Tag :: reference()) -> async | {error, store_error()}.
session_sweep(_Handle, _Tag) -> ?NOT_LOADED.

-spec session_set_clock(Ms :: integer() | system) -> ok.
session_set_clock(_At) -> ?NOT_LOADED.

-spec session_now() -> integer().
session_now() -> ?NOT_LOADED.

%% Benchmark calibration: copies Term into NIF-owned memory and frees it
%% (what keeping session metadata as a term would cost per store).

%% The benchmarks' calibration NIFs: in a build made by scripts/bench-app only
%% (the library has them with cargo feature `bench`; module and library must
%% agree, or the load fails).
-ifdef(ERLMCP_ROLLOUT_BENCH).
-spec flags_nop(term(), term()) -> term().
flags_nop(_A, _B) -> ?NOT_LOADED.

-spec session_copy_probe(term()) -> ok.
session_copy_probe(_Term) -> ?NOT_LOADED.
-endif.
