%% @doc Feature flags for erlmcp, evaluated in Rust (DESIGN §3.6).
%%
%% A drop-in for the reference's and erlmcp's `erlmcp_feature_flags'.
%% `is_enabled/1,2' is one NIF call in the caller's process: no message to
%% any process, no ETS, no lock. The flags live in the NIF library (an
%% immutable snapshot behind an atomic pointer), so they outlive this
%% gen_server: if it crashes and restarts, callers keep seeing the last loaded
%% flags. The gen_server owns reloading: every `reload_interval_ms' (60 s by
%% default, with +-10 % jitter) and at once when the file changes (checked every
%% `check_interval_ms', 1 s by default). A reload that fails keeps the last good
%% flags serving.
%%
%% With `etcd => #{endpoints => [<<"10.0.0.1:2379">>, ...], key => Key}' (instead
%% of `config') the flags follow the config JSON stored under `Key' (default
%% `erlmcp/feature_flags'; publish it with `erlmcp-rollout flags push FILE
%% --etcd ENDPOINTS', which validates first): every change reaches this node's
%% callers milliseconds after the commit; invalid values, a deleted key and
%% etcd outages keep the last good flags. `start_link/1' waits up to 5 s for
%% the first read (`{error, {etcd_unavailable, Why}}'), but not when the
%% cluster refuses the TLS settings, the credentials or the key's permission:
%% that is `{error, {etcd_access, Kind, Message}}' at once (the session
%% store's shape). `reload_now/0' then reports the watch's health. A secured
%% cluster: add `tls => #{cacertfile => F, certfile => F, keyfile => F}'
%% (certfile and keyfile for `--client-cert-auth') and `auth => #{user => U,
%% password_file => F}' (the user needs read permission on `Key'); the
%% password is read from the file, never passed as a term.
%%
%% `details/2' and `variant/2' add OpenFeature-style evaluation details
%% (value, variant, reason, error code, metadata) for flags with variants,
%% prerequisites and basis-point rollouts (docs/flags.md). With
%% `audit_log => Path' every change of the effective flags (reloads, etcd
%% updates, `enable/1', `disable/1', `clear/1') is appended to `Path' as one
%% synced JSON line naming the actor (`erlang:<node>:<pid>' of the caller for
%% overrides, the node for reloads); `erlmcp-rollout flags history Path' reads it.
%%
%% Custom conditions (`{"custom": Name}' in the config) run the fun registered
%% with `register_condition/2' in the caller's process; an unregistered name,
%% a fun that crashes or returns a non-boolean makes the condition false.
-module(erlmcp_feature_flags).

-include_lib("kernel/include/file.hrl").
-behaviour(gen_server).

%% API
-export([start_link/0, start_link/1, stop/0,
         is_enabled/1, is_enabled/2,
         enable/1, disable/1, clear/1,
         get_all/0, details/0, details/2, variant/2,
         reload/0, reload_now/0,
         explain/2,
         register_condition/2, unregister_condition/1,
         metrics/0, metrics_text/0]).

%% erlmcp's own module's functions (docs/flags.md, "erlmcp's own flags module")
-export([get_flag/1, get_flag/2, set_flag/2, set_flag/3, list_flags/0, list_flags/1,
         get_rollout_percentage/1, evaluate_rollout/2, load_flags/0, load_flags/1, reload_flags/0,
         export_flags/0, import_flags/1, watch_config/0]).

%% gen_server callbacks
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2, code_change/3]).

%% A string name (erlmcp's `flag_name()' includes `string()') is the flag
%% of the same UTF-8 text as a binary name.
-type flag_name() :: binary() | atom() | string().
-type context() :: #{atom() | binary() => binary() | atom() | integer()}.
-type options() :: #{config => file:filename_all(),
                     environment => atom() | binary(),
                     reload_interval_ms => pos_integer(),
                     check_interval_ms => pos_integer(),
                     etcd => #{endpoints := [binary() | string()], key => binary() | string(),
                               tls => #{cacertfile := file:filename_all(), certfile => file:filename_all(),
                                        keyfile => file:filename_all()},
                               auth => #{user := binary() | string(), password_file := file:filename_all()}},
                     audit_log => file:filename_all()}.
-type details() :: #{binary() => term()}.
-type problem() :: erlmcp_rollout_nif:problem().
%% erlmcp's `feature_flag()': JSON objects as maps with binary keys.
-type feature_flag() :: #{name := binary(),
                          category => binary() | custom,
                          state => enabled | disabled | rollout,
                          value => term(),
                          rollout_percentage => 0..100,
                          rollout_strategy => all | none | canary | percentage | user_segment,
                          conditions => map(),
                          description => binary(),
                          updated_at => integer()}.
-type flags() :: #{binary() => feature_flag()}.
-export_type([flag_name/0, context/0, options/0, problem/0, details/0, feature_flag/0, flags/0]).

-define(SERVER, ?MODULE).
-define(DEFAULT_CONFIG, "config/feature_flags.json").
%% erlmcp's module reads FEATURE_FLAGS_PATH, else its ConfigMap mount.
-define(ERLMCP_CONFIG, "/opt/erlmcp/etc/feature-flags.json").
%% Rounds of `{hash, Wanted}' answers one evaluation can ask for: each round
%% answers every hash the last asked for, and one evaluation hashes at most
%% one value per flag of its prerequisite tree (64 + the flag).
-define(HASH_ROUNDS, 65).
-define(DEFAULT_RELOAD_MS, 60000).
-define(DEFAULT_CHECK_MS, 1000).
-define(CUSTOM_KEY(Name), {?MODULE, custom, Name}).

-define(ETCD_KEY, <<"erlmcp/feature_flags">>).
-define(ETCD_FIRST_READ_MS, 5000).

-record(state, {
    config :: binary(),
    %% Endpoints, key, and the connection options (tls, auth) for the NIF.
    etcd = undefined :: undefined | {[binary() | string()], binary() | string(), map()},
    environment :: atom() | binary(),
    reload_ms :: pos_integer(),
    check_ms :: pos_integer(),
    stamp :: term(),
    last_error = undefined :: undefined | [problem()],
    audit = undefined :: undefined | binary()
}).

%%% API

%% @doc Start with the application env of `erlmcp_core', as the reference
%% does: `feature_flags_config' (default: the OS variable
%% `FEATURE_FLAGS_PATH', as erlmcp's module reads, else
%% "config/feature_flags.json") and `environment' (default `dev').
-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() ->
    Config = application:get_env(erlmcp_core, feature_flags_config, feature_flags_path(?DEFAULT_CONFIG)),
    Env = application:get_env(erlmcp_core, environment, dev),
    start_link(#{config => Config, environment => Env}).

%% @doc Start with options: `config' (path), `environment', `reload_interval_ms',
%% `check_interval_ms'. Fails with `{error, {invalid_config, Path, Problems}}'
%% when the first load fails (every problem listed), `{error, {bad_option, Key}}'
%% for an option it does not know or a bad value, and
%% `{error, {bad_env_overrides, Message}}' for a malformed `ERLMCP_FEATURE_FLAGS'.
-spec start_link(Options :: options()) -> {ok, pid()} | {error, term()}.
start_link(Options) when is_map(Options) ->
    gen_server:start_link({local, ?SERVER}, ?MODULE, Options, []).

%% @doc Stop the server. The flags keep serving from the NIF.
-spec stop() -> ok.
stop() ->
    gen_server:stop(?SERVER).

%% @doc `is_enabled(Name, #{})'.
-spec is_enabled(Name :: flag_name()) -> boolean().
is_enabled(Name) ->
    eval(flag(Name), #{}, false).

%% @doc Whether flag `Name' is on for `Context'. For erlmcp compatibility the
%% second argument may instead be a boolean: the result for a flag the config
%% does not have (otherwise `false'). A string name is the flag of the same
%% text (`"f"' and `<<"f">>' are one flag). Context values may be any term,
%% as in the reference: a value that is not a binary, atom or integer equals
%% no configured value and is bucketed by `erlang:phash2/2' (the NIF asks
%% this process for the hash). Raises `badarg' for a name that is not a
%% binary, atom or string, or a context that is not a map.
-spec is_enabled(Name :: flag_name(), ContextOrDefault :: context() | boolean()) -> boolean().
is_enabled(Name, ContextOrDefault) when is_list(Name) ->
    %% Off the hot path: binary and atom names skip this clause.
    is_enabled(list_name(Name), ContextOrDefault);
is_enabled(Name, Context) when is_map(Context) ->
    %% The hot path, spelled out (no extra local call).
    case erlmcp_rollout_nif:flags_eval(Name, Context) of
        true -> true;
        false -> false;
        unknown -> false;
        {custom, Names} -> eval_custom(Name, Context, Names, false);
        {hash, Wanted} -> eval_hashed(Name, Context, Wanted, false)
    end;
is_enabled(Name, Default) when is_boolean(Default) ->
    eval(Name, #{}, Default);
is_enabled(_Name, _Other) ->
    erlang:error(badarg).

eval(Name, Context, Default) ->
    case erlmcp_rollout_nif:flags_eval(Name, Context) of
        true -> true;
        false -> false;
        unknown -> Default;
        {custom, Names} -> eval_custom(Name, Context, Names, Default);
        {hash, Wanted} -> eval_hashed(Name, Context, Wanted, Default)
    end.

eval_custom(Name, Context, Names, Default) ->
    eval_answered(Name, Context, [{N, run_custom(N, Context)} || N <- Names], [], Default).

%% A context value that is not a binary, atom or integer (a float, tuple,
%% list, pid, ...): its bucket is `erlang:phash2/2''s, as in the reference.
eval_hashed(Name, Context, Wanted, Default) ->
    eval_answered(Name, Context, [], hashes(Wanted), Default).

eval_answered(Name, Context, Answers, Hashes, Default) ->
    Eval = fun(Known) -> erlmcp_rollout_nif:flags_eval_custom(Name, Context, Answers, Known) end,
    case answered(Eval, Hashes, ?HASH_ROUNDS) of
        unknown -> Default;
        Bool -> Bool
    end.

%% Call `Eval' with the hashes known so far until it stops asking for more
%% (`{hash, Wanted}'). Every round answers all it asked for, so it ends
%% within `?HASH_ROUNDS'; one that does not is a bug, reported as such.
answered(Eval, Hashes, Rounds) ->
    case Eval(Hashes) of
        {hash, Wanted} when Rounds > 0 -> answered(Eval, hashes(Wanted) ++ Hashes, Rounds - 1);
        {hash, Wanted} -> erlang:error({unanswered_hashes, Wanted});
        Result -> Result
    end.

hashes(Wanted) ->
    [{T, erlang:phash2(T, 4294967296)} || T <- Wanted].

run_custom(Name, Context) ->
    case persistent_term:get(?CUSTOM_KEY(Name), undefined) of
        undefined ->
            false;
        Fun ->
            try Fun(Context) of
                true -> true;
                _ -> false
            catch
                Class:Reason ->
                    logger:warning("feature flag custom condition ~ts crashed: ~p:~p", [Name, Class, Reason]),
                    false
            end
    end.

%% @doc Force `Name' on (replaces its `enabled') until `clear/1'; survives reloads.
-spec enable(Name :: flag_name()) -> ok.
enable(Name) ->
    set_override(Name, true).

%% @doc Force `Name' off until `clear/1'; survives reloads.
-spec disable(Name :: flag_name()) -> ok.
disable(Name) ->
    set_override(Name, false).

%% @doc Remove the runtime override of `Name'.
-spec clear(Name :: flag_name()) -> ok.
clear(Name) ->
    set_override(Name, clear).

set_override(Name, Value) when is_binary(Name); is_atom(Name); is_list(Name) ->
    gen_server:call(?SERVER, {override, to_binary(Name), Value});
set_override(_Name, _Value) ->
    erlang:error(badarg).

%% @doc Name -> effective `enabled' (after schedule and overrides), as the reference.
-spec get_all() -> #{binary() => boolean()}.
get_all() ->
    erlmcp_rollout_nif:flags_get_all().

%% @doc Each flag's config, what is in force, override and counters.
-spec details() -> [map()].
details() ->
    erlmcp_rollout_nif:flags_details().

%% @doc OpenFeature-style evaluation details of `Name' for `Context': a map
%% with binary keys `<<"flag">>', `<<"value">>' (the variant's value, or the
%% boolean for a flag without variants; `undefined' when off with variants or
%% on error), `<<"variant">>' (binary or `undefined'), `<<"reason">>'
%% (`<<"STATIC">>', `<<"TARGETING_MATCH">>', `<<"SPLIT">>', `<<"DISABLED">>',
%% `<<"DEFAULT">>' or `<<"ERROR">>'), `<<"error_code">>' (`<<"FLAG_NOT_FOUND">>',
%% `<<"PARSE_ERROR">>', `<<"TARGETING_KEY_MISSING">>' or `undefined'),
%% `<<"error_message">>', `<<"metadata">>' (the flag's metadata) and
%% `<<"evaluation">>' (`is_enabled/2''s answer and the engine's reason).
%% Counted like `is_enabled/2'. Raises `badarg' for a name that is not a binary
%% or atom or a context that is not a map.
-spec details(Name :: flag_name(), Context :: context()) -> details().
details(Name, Context) when (is_binary(Name) orelse is_atom(Name)), is_map(Context) ->
    Answers = [{N, run_custom(N, Context)} || N <- erlmcp_rollout_nif:flags_custom_names(Name)],
    answered(fun(Hashes) -> erlmcp_rollout_nif:flags_eval_details(Name, Context, Answers, Hashes) end,
             [], ?HASH_ROUNDS);
details(_Name, _Context) ->
    erlang:error(badarg).

%% @doc The variant `Name' serves to `Context':
%% `#{<<"variant">> := binary(), <<"value">> := term()}', or `undefined' when
%% the flag is off, has no variants, is unknown or cannot be evaluated (see
%% `details/2' for why).
-spec variant(Name :: flag_name(), Context :: context()) ->
    #{binary() => term()} | undefined.
variant(Name, Context) ->
    case details(Name, Context) of
        #{<<"variant">> := Variant, <<"value">> := Value} when is_binary(Variant) ->
            #{<<"variant">> => Variant, <<"value">> => Value};
        _ ->
            undefined
    end.

%% @doc Reload asynchronously (the result is logged).
-spec reload() -> ok.
reload() ->
    gen_server:cast(?SERVER, reload).

%% @doc Reload now: `ok', or `{error, Problems}' with every problem (the
%% previous flags keep serving).
-spec reload_now() -> ok | {error, [problem()]}.
reload_now() ->
    gen_server:call(?SERVER, reload_now, 30000).

%% @doc The full reason chain for `Name' and `Context' (binary keys:
%% `<<"result">>', `<<"steps">>', ...).
-spec explain(Name :: flag_name(), Context :: context()) -> map().
explain(Name, Context) ->
    answered(fun(Hashes) -> erlmcp_rollout_nif:flags_explain(flag(Name), Context, Hashes) end, [], ?HASH_ROUNDS).

%% @doc Register the predicate behind `{"custom": Name}'. It runs in the
%% caller of `is_enabled/2' with the context map.
-spec register_condition(Name :: flag_name(), Fun :: fun((map()) -> boolean())) -> ok.
register_condition(Name, Fun) when (is_binary(Name) orelse is_atom(Name) orelse is_list(Name)), is_function(Fun, 1) ->
    persistent_term:put(?CUSTOM_KEY(to_binary(Name)), Fun);
register_condition(_Name, _Fun) ->
    erlang:error(badarg).

%% @doc Remove a custom predicate (its conditions become false).
-spec unregister_condition(Name :: flag_name()) -> ok.
unregister_condition(Name) when is_binary(Name); is_atom(Name); is_list(Name) ->
    _ = persistent_term:erase(?CUSTOM_KEY(to_binary(Name))),
    ok.

%% @doc Per-flag true/false counts, unknown-flag evaluations, reload counts.
-spec metrics() -> map().
metrics() ->
    erlmcp_rollout_nif:flags_metrics().

%% @doc The metrics in the Prometheus text format.
-spec metrics_text() -> binary().
metrics_text() ->
    erlmcp_rollout_nif:flags_metrics_text().

%%% erlmcp's own module's interface. Its file format is read by every load
%%% (detected by its "flags" list); cohorts of its rollouts are its own,
%%% `erlang:phash2(Id) rem 100 < rollout_percentage'. Where its code does
%%% not do what it evidently means, these follow the intent (docs/flags.md).

%% @doc erlmcp's `get_flag(Name, undefined)'.
-spec get_flag(Name :: flag_name()) -> term().
get_flag(Name) ->
    get_flag(Name, undefined).

%% @doc The flag's `value' (erlmcp's field; `true' by default, the flag's
%% `enabled' for a flag in our format), or `Default' for a flag the config
%% does not have.
-spec get_flag(Name :: flag_name(), Default :: term()) -> term().
get_flag(Name, Default) ->
    case erlmcp_rollout_nif:flags_erlmcp_get(flag(Name)) of
        undefined -> Default;
        #{value := Value} -> Value
    end.

%% @doc erlmcp's `set_flag(Name, Value, #{})'.
-spec set_flag(Name :: flag_name(), Value :: term()) -> ok | {error, term()}.
set_flag(Name, Value) ->
    set_flag(Name, Value, #{}).

%% @doc Define or replace flag `Name' at runtime with erlmcp's fields:
%% `Value' and the options `state' (default `enabled'), `category',
%% `rollout_percentage' (100), `rollout_strategy' (`all'), `conditions',
%% `description'. It serves until the flags' source changes (a changed file
%% or etcd key, `load_flags/1', `reload_flags/0'), as in erlmcp, where a
%% load replaces it. `{error, {bad_option, Key}}' for an option erlmcp does
%% not have, `{error, {invalid_flag, Problems}}' naming a bad field,
%% `{error, {bad_value, Message}}' for a value JSON cannot hold (a pid, a
%% tuple); nothing changes then.
-spec set_flag(Name :: flag_name(), Value :: term(), Options :: map()) -> ok | {error, term()}.
set_flag(Name, Value, Options) when is_map(Options) ->
    Known = [state, category, rollout_percentage, rollout_strategy, conditions, description],
    case [K || K <- maps:keys(Options), not lists:member(K, Known)] of
        [Unknown | _] ->
            {error, {bad_option, Unknown}};
        [] ->
            Fields = maps:merge(Options, #{value => Value, updated_at => erlang:system_time(millisecond)}),
            case erlmcp_rollout_nif:flags_erlmcp_set(flag(Name), Fields, actor(self())) of
                ok -> ok;
                {error, {bad_value, _} = Bad} -> {error, Bad};
                {error, Problems} -> {error, {invalid_flag, Problems}}
            end
    end;
set_flag(_Name, _Value, _Options) ->
    {error, {bad_option, options}}.

%% @doc Every flag in erlmcp's `feature_flag()' shape, by name.
-spec list_flags() -> flags().
list_flags() ->
    erlmcp_rollout_nif:flags_erlmcp_list().

%% @doc The flags of `Category' (`custom', the default category, matches
%% flags without one; `<<"x">>', `x' and `"x"' are one category).
-spec list_flags(Category :: binary() | atom() | string()) -> [feature_flag()].
list_flags(Category) ->
    Want = to_binary(Category),
    [F || #{category := C} = F <- maps:values(list_flags()), to_binary(C) =:= Want].

%% @doc The flag's `rollout_percentage' (0 for a flag the config does not have).
-spec get_rollout_percentage(Name :: flag_name()) -> 0..100.
get_rollout_percentage(Name) ->
    case erlmcp_rollout_nif:flags_erlmcp_get(flag(Name)) of
        undefined -> 0;
        #{rollout_percentage := P} -> P
    end.

%% @doc Whether flag `Name' is on for `Identifier' (any term) as its
%% stickiness value: for an erlmcp flag, `state' and `rollout_strategy'
%% decide, a partial rollout by `erlang:phash2(Identifier) rem 100 <
%% rollout_percentage' (erlmcp's own bucket), and `value' `false' is off.
%% (erlmcp's code returns a boolean `value' first and skips the percentage.)
%% `false' for a flag the config does not have.
-spec evaluate_rollout(Name :: flag_name(), Identifier :: term()) -> boolean().
evaluate_rollout(Name, Identifier) ->
    N = flag(Name),
    Eval = fun(Hashes) -> erlmcp_rollout_nif:flags_eval_rollout(N, Identifier, [], Hashes) end,
    answered(Eval, [], ?HASH_ROUNDS) =:= true.

%% @doc erlmcp's `load_flags(default)'.
-spec load_flags() -> {ok, flags()} | {error, term()}.
load_flags() ->
    load_flags(default).

%% @doc Load flags from `default' (the OS variable `FEATURE_FLAGS_PATH',
%% else "/opt/erlmcp/etc/feature-flags.json"), a file (it becomes the
%% running server's source, reloaded on change) or JSON text (as
%% `import_flags/1'); either format. `{ok, Flags}' as `list_flags/0', or
%% `{error, {file_error, Reason}}', `{error, {invalid_config, Problems}}';
%% a failed load changes nothing.
-spec load_flags(Source :: default | file:filename_all()) -> {ok, flags()} | {error, term()}.
load_flags(default) ->
    load_flags(erlmcp_path());
load_flags(Json) when is_binary(Json) ->
    case import_flags(Json) of
        ok -> {ok, list_flags()};
        Error -> Error
    end;
load_flags(Path) when is_list(Path) ->
    case file:read_file_info(Path) of
        {error, Reason} ->
            {error, {file_error, Reason}};
        {ok, _} ->
            Bin = unicode:characters_to_binary(Path),
            Result = case whereis(?SERVER) of
                         undefined -> load_now(Bin);
                         _Pid -> gen_server:call(?SERVER, {load_flags, Bin}, 30000)
                     end,
            case Result of
                ok -> {ok, list_flags()};
                {error, Problems} -> {error, {invalid_config, Problems}}
            end
    end.

%% @doc Re-read the flags' source even when unchanged (undoing `set_flag/3'
%% and `import_flags/1'): the running server's file, or erlmcp's default
%% source without a server. With an etcd source, the flags in force (etcd
%% pushes every change).
-spec reload_flags() -> {ok, flags()} | {error, term()}.
reload_flags() ->
    case whereis(?SERVER) of
        undefined ->
            load_flags();
        _Pid ->
            case gen_server:call(?SERVER, reload_flags, 30000) of
                ok -> {ok, list_flags()};
                {error, Problems} -> {error, {invalid_config, Problems}}
            end
    end.

%% @doc erlmcp's export: `{ok, JSON}' with `version', `environment',
%% `last_updated' and `flags' (erlmcp's format, which `import_flags/1' and
%% erlmcp's module read back).
-spec export_flags() -> {ok, binary()}.
export_flags() ->
    {ok, erlmcp_rollout_nif:flags_erlmcp_export()}.

%% @doc Replace the flags with `Json' (either format) until the source
%% changes: `ok', `{error, {invalid_config, Problems}}' (nothing changes) or
%% `{error, invalid_input}' for a non-binary.
-spec import_flags(Json :: binary()) -> ok | {error, term()}.
import_flags(Json) when is_binary(Json) ->
    case erlmcp_rollout_nif:flags_import_json(Json, actor(self())) of
        {ok, _Info} -> ok;
        {error, Problems} -> {error, {invalid_config, Problems}}
    end;
import_flags(_Other) ->
    {error, invalid_input}.

%% @doc The server that follows the flags' source (it reloads a changed file
%% within `check_interval_ms'): the running one, or one started (linked) on
%% erlmcp's default source.
-spec watch_config() -> {ok, pid()} | {error, term()}.
watch_config() ->
    case whereis(?SERVER) of
        undefined -> start_link(#{config => erlmcp_path()});
        Pid -> {ok, Pid}
    end.

erlmcp_path() ->
    feature_flags_path(?ERLMCP_CONFIG).

%% The OS variable erlmcp's module reads, else `Default'.
feature_flags_path(Default) ->
    os:getenv("FEATURE_FLAGS_PATH", Default).

load_now(Path) ->
    case erlmcp_rollout_nif:flags_load_file_now(Path) of
        {ok, _Info} -> ok;
        {error, _Problems} = Error -> Error
    end.

actor(Pid) ->
    iolist_to_binary(["erlang:", atom_to_binary(node(Pid), utf8), ":", pid_to_list(Pid)]).

%%% gen_server callbacks

%% @private
-spec init(options()) -> {ok, #state{}} | {stop, term()}.
init(Options) ->
    case options(Options) of
        {ok, State} ->
            case configure(State) of
                ok ->
                    case audit(State) of
                        ok -> first_load(State);
                        {error, Reason} -> {stop, Reason}
                    end;
                {error, Reason} -> {stop, Reason}
            end;
        {error, Reason} ->
            {stop, Reason}
    end.

first_load(#state{etcd = {Endpoints, Key, Conn}} = State) ->
    case erlmcp_rollout_nif:flags_watch_etcd(Endpoints, Key, Conn) of
        ok ->
            case await_etcd(erlang:monotonic_time(millisecond) + ?ETCD_FIRST_READ_MS) of
                ok ->
                    {ok, State};
                {error, Why} ->
                    case erlmcp_rollout_nif:flags_status() of
                        {_Gen, _Flags, Reloads} when Reloads > 0 ->
                            %% A restart: keep serving; the watcher keeps trying.
                            logger:warning("feature flags: etcd not reachable yet (~0p), keeping the flags loaded "
                                           "before", [Why]),
                            {ok, State};
                        _ ->
                            ok = erlmcp_rollout_nif:flags_unwatch_etcd(),
                            case Why of
                                {etcd_access, _, _} -> {stop, Why};
                                _ -> {stop, {etcd_unavailable, Why}}
                            end
                    end
            end;
        {error, Why} ->
            {stop, {bad_option, etcd, Why}}
    end;
first_load(#state{config = Path} = State) ->
    case erlmcp_rollout_nif:flags_load_file(Path) of
        {ok, _Info} ->
            {ok, schedule(State#state{stamp = stamp(Path)})};
        {error, Problems} ->
            case erlmcp_rollout_nif:flags_status() of
                {_Gen, _Flags, Reloads} when Reloads > 0 ->
                    %% A restart: keep serving what was loaded before.
                    logger:warning("feature flags: ~ts is invalid, keeping the flags loaded before: ~p",
                                   [Path, Problems]),
                    {ok, schedule(State#state{stamp = stamp(Path), last_error = Problems})};
                _ ->
                    {stop, {invalid_config, Path, Problems}}
            end
    end.

%% @private
-spec handle_call(term(), gen_server:from(), #state{}) -> {reply, term(), #state{}}.
handle_call(reload_now, _From, #state{etcd = {_, _, _}} = State) ->
    %% The etcd watcher reloads every change as it arrives: report how that goes.
    {reply, etcd_health(), State};
handle_call(reload_now, _From, State) ->
    {Reply, NewState} = load(State),
    {reply, Reply, NewState};
handle_call({override, Name, Value}, {Pid, _Tag}, State) ->
    {reply, erlmcp_rollout_nif:flags_set_override_by(Name, Value, actor(Pid)), State};
handle_call({load_flags, Path}, _From, #state{etcd = {_, _, _}} = State) ->
    {reply, {error, [#{flag => undefined, path => Path, line => undefined, column => undefined,
                       message => <<"the flags follow etcd; start the server with config => Path instead">>}]},
     State};
handle_call({load_flags, Path}, _From, State) ->
    case load_now(Path) of
        ok ->
            %% The new file is the source from now on.
            {reply, ok, State#state{config = Path, stamp = stamp(Path), last_error = undefined}};
        Error ->
            {reply, Error, State}
    end;
handle_call(reload_flags, _From, #state{etcd = {_, _, _}} = State) ->
    {reply, etcd_health(), State};
handle_call(reload_flags, _From, #state{config = Path} = State) ->
    Reply = load_now(Path),
    {reply, Reply, State#state{stamp = stamp(Path)}};
handle_call(_Request, _From, State) ->
    {reply, {error, unknown_call}, State}.

%% @private
-spec handle_cast(term(), #state{}) -> {noreply, #state{}}.
handle_cast(reload, #state{etcd = {_, _, _}} = State) ->
    {noreply, State};
handle_cast(reload, State) ->
    {_Reply, NewState} = load(State),
    {noreply, NewState};
handle_cast(_Msg, State) ->
    {noreply, State}.

%% @private
-spec handle_info(term(), #state{}) -> {noreply, #state{}}.
handle_info(reload, State) ->
    {_Reply, NewState} = load(State),
    erlang:send_after(jitter(State#state.reload_ms), self(), reload),
    {noreply, NewState};
handle_info(check, #state{config = Path, stamp = Old} = State) ->
    erlang:send_after(State#state.check_ms, self(), check),
    case stamp(Path) of
        Old -> {noreply, State};
        _New -> {_Reply, NewState} = load(State), {noreply, NewState}
    end;
handle_info(_Info, State) ->
    {noreply, State}.

%% @private
-spec terminate(term(), #state{}) -> ok.
terminate(Reason, #state{etcd = {_, _, _}}) when Reason =:= normal; Reason =:= shutdown ->
    %% Stopped on purpose: stop following etcd (the flags stay loaded).
    ok = erlmcp_rollout_nif:flags_unwatch_etcd();
terminate(_Reason, _State) ->
    ok.

etcd_health() ->
    case erlmcp_rollout_nif:flags_etcd_status() of
        #{<<"connected">> := true, <<"last_error">> := undefined} -> ok;
        #{<<"last_error">> := E} when is_binary(E) ->
            {error, [#{flag => undefined, path => <<"etcd">>, line => undefined, column => undefined, message => E}]};
        _ ->
            {error, [#{flag => undefined, path => <<"etcd">>, line => undefined, column => undefined,
                       message => <<"not connected to etcd">>}]}
    end.

%% @private
-spec code_change(term(), #state{}, term()) -> {ok, #state{}}.
code_change(_OldVsn, State, _Extra) ->
    {ok, State}.

%%% Internal

%% The watcher has read the key once (connected), or the deadline passed.
await_etcd(Deadline) ->
    case erlmcp_rollout_nif:flags_etcd_status() of
        #{<<"connected">> := true} ->
            ok;
        #{<<"refused">> := {etcd_access, _Kind, _Message} = Refused} ->
            %% TLS, credentials or permission: waiting longer would not help.
            {error, Refused};
        Status ->
            case erlang:monotonic_time(millisecond) >= Deadline of
                true ->
                    {error, case Status of
                                #{<<"last_error">> := E} when is_binary(E) -> E;
                                _ -> <<"no answer from etcd">>
                            end};
                false ->
                    timer:sleep(20),
                    await_etcd(Deadline)
            end
    end.

%% The audit trail is on only while a server started with `audit_log' runs
%% (a restart without it turns it off).
audit(#state{audit = undefined}) ->
    erlmcp_rollout_nif:flags_audit(off);
audit(#state{audit = Path}) ->
    case erlmcp_rollout_nif:flags_audit({file, Path, atom_to_binary(node(), utf8)}) of
        ok -> ok;
        {error, Why} -> {error, {bad_option, audit_log, Why}}
    end.

options(Options) ->
    Known = [config, environment, reload_interval_ms, check_interval_ms, etcd, audit_log],
    case [K || K <- maps:keys(Options), not lists:member(K, Known)] of
        [Unknown | _] ->
            {error, {bad_option, Unknown}};
        [] ->
            case audit_option(maps:get(audit_log, Options, undefined)) of
                {ok, Audit} ->
                    case options_rest(Options) of
                        {ok, State} -> {ok, State#state{audit = Audit}};
                        Error -> Error
                    end;
                Error ->
                    Error
            end
    end.

audit_option(undefined) ->
    {ok, undefined};
audit_option(Path) when is_binary(Path); is_list(Path) ->
    case unicode:characters_to_binary(Path) of
        Bin when is_binary(Bin), Bin =/= <<>> -> {ok, Bin};
        _ -> {error, {bad_option, audit_log}}
    end;
audit_option(_Other) ->
    {error, {bad_option, audit_log}}.

options_rest(Options) ->
    Config = maps:get(config, Options, ?DEFAULT_CONFIG),
    Env = maps:get(environment, Options, dev),
    Reload = maps:get(reload_interval_ms, Options, ?DEFAULT_RELOAD_MS),
    Check = maps:get(check_interval_ms, Options, ?DEFAULT_CHECK_MS),
    Etcd = maps:get(etcd, Options, undefined),
    if
        Etcd =/= undefined, is_map_key(config, Options) ->
            {error, {bad_option, etcd, <<"give config (a file) or etcd, not both">>}};
        Etcd =/= undefined ->
            etcd_options(Etcd, Env, Reload, Check);
        not (is_binary(Config) orelse is_list(Config)) ->
            {error, {bad_option, config}};
        not (is_atom(Env) orelse is_binary(Env)) ->
            {error, {bad_option, environment}};
        not (is_integer(Reload) andalso Reload > 0) ->
            {error, {bad_option, reload_interval_ms}};
        not (is_integer(Check) andalso Check > 0) ->
            {error, {bad_option, check_interval_ms}};
        true ->
            case unicode:characters_to_binary(Config) of
                Path when is_binary(Path) ->
                    {ok, #state{config = Path, environment = Env, reload_ms = Reload, check_ms = Check}};
                _ ->
                    {error, {bad_option, config}}
            end
    end.

etcd_options(#{endpoints := [_ | _] = Endpoints} = Etcd, Env, Reload, Check) when is_atom(Env); is_binary(Env) ->
    Key = maps:get(key, Etcd, ?ETCD_KEY),
    Conn = maps:with([tls, auth], Etcd),
    {ok, #state{config = <<>>, etcd = {Endpoints, Key, Conn}, environment = Env, reload_ms = Reload, check_ms = Check}};
etcd_options(#{endpoints := [_ | _]}, _Env, _Reload, _Check) ->
    {error, {bad_option, environment}};
etcd_options(_Etcd, _Env, _Reload, _Check) ->
    {error, {bad_option, etcd, <<"etcd => #{endpoints => [<<\"host:port\">>, ...], key => Key, tls => #{...}, auth => #{...}}">>}}.

configure(#state{environment = Env}) ->
    Overrides = case os:getenv("ERLMCP_FEATURE_FLAGS") of
                    false -> <<>>;
                    Value -> unicode:characters_to_binary(Value)
                end,
    erlmcp_rollout_nif:flags_configure(Env, Overrides).

load(#state{config = Path} = State) ->
    Stamp = stamp(Path),
    case erlmcp_rollout_nif:flags_load_file(Path) of
        {ok, #{changed := true, flags := N}} ->
            logger:info("feature flags reloaded from ~ts: ~b flags", [Path, N]),
            {ok, State#state{stamp = Stamp, last_error = undefined}};
        {ok, _Unchanged} ->
            {ok, State#state{stamp = Stamp, last_error = undefined}};
        {error, Problems} ->
            case State#state.last_error of
                Problems -> ok;
                _ -> logger:warning("feature flags: reload of ~ts failed, keeping the last good flags: ~p",
                                    [Path, Problems])
            end,
            {{error, Problems}, State#state{stamp = Stamp, last_error = Problems}}
    end.

schedule(#state{reload_ms = Reload, check_ms = Check} = State) ->
    erlang:send_after(jitter(Reload), self(), reload),
    erlang:send_after(Check, self(), check),
    State.

%% +-10 % so that a fleet started together does not reload in lockstep.
jitter(Ms) ->
    Spread = max(1, Ms div 10),
    max(1, Ms - Spread + rand:uniform(2 * Spread)).

stamp(Path) ->
    case file:read_file_info(Path, [{time, posix}]) of
        {ok, #file_info{size = Size, mtime = MTime, inode = Inode}} -> {Size, MTime, Inode};
        {error, Reason} -> {error, Reason}
    end.

to_binary(Name) when is_binary(Name) -> Name;
to_binary(Name) when is_atom(Name) -> atom_to_binary(Name, utf8);
to_binary(Name) when is_list(Name) -> list_name(Name).

%% The name the NIF takes: binaries and atoms as they are, a string as its
%% UTF-8 binary.
flag(Name) when is_list(Name) -> list_name(Name);
flag(Name) -> Name.

%% A string name as a binary; `badarg' if it is not Unicode text.
list_name(Name) ->
    case unicode:characters_to_binary(Name) of
        Bin when is_binary(Bin) -> Bin;
        _ -> erlang:error(badarg)
    end.
