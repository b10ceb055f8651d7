%% @doc The reference's feature-flag service (deployment-pipeline-design.md
%% §II.A.1), reimplemented faithfully for the benchmark, with its key-type bug
%% fixed so that it evaluates:
%%
%%  * the config is what `jsx:decode(Data, [return_maps])' produces, so flag
%%    fields are read with binary keys (`<<"enabled">>', ...) instead of atoms;
%%  * environments are JSON strings (binaries), so the environment atom from
%%    the application env is compared as a binary;
%%  * conditions are JSON objects (`#{<<"user_id">> => <<"u-1">>}',
%%    `#{<<"session_type">> => <<"streaming">>}'); an atom context value equals
%%    the string of its name.
%%
%% Everything else is as in the reference: one registered gen_server, a
%% `gen_server:call' per evaluation, the environment read with
%% `application:get_env/3' on every evaluation, environment, rollout
%% (`erlang:phash2(SessionId, 100)', missing session id hashes `<<>>') and
%% conditions all computed before they are combined, a reload every 60 s.
%% Context keys are atoms, as in the reference. The config is passed in
%% (OTP 25 has no JSON decoder; the benchmark builds the decoded map).
-module(ref_flags_server).
-behaviour(gen_server).

-export([start_link/1, stop/0, is_enabled/1, is_enabled/2, enable/1, disable/1, get_all/0, reload/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

-record(state, {
    flags :: #{binary() => map()},
    source :: #{binary() => map()},
    reload_timer :: reference()
}).

start_link(Flags) ->
    gen_server:start_link({local, ?MODULE}, ?MODULE, Flags, []).

stop() ->
    gen_server:stop(?MODULE).

is_enabled(FeatureName, Context) ->
    gen_server:call(?MODULE, {is_enabled, FeatureName, Context}).

is_enabled(FeatureName) ->
    is_enabled(FeatureName, #{}).

enable(FeatureName) ->
    gen_server:call(?MODULE, {enable, FeatureName}).

disable(FeatureName) ->
    gen_server:call(?MODULE, {disable, FeatureName}).

get_all() ->
    gen_server:call(?MODULE, get_all).

reload() ->
    gen_server:cast(?MODULE, reload).

init(Flags) ->
    Timer = erlang:send_after(60000, self(), reload),
    {ok, #state{flags = Flags, source = Flags, reload_timer = Timer}}.

handle_call({is_enabled, FeatureName, Context}, _From, State) ->
    Result = evaluate_flag(FeatureName, Context, State#state.flags),
    {reply, Result, State};
handle_call({enable, FeatureName}, _From, State) ->
    NewFlags = update_flag(FeatureName, #{<<"enabled">> => true}, State#state.flags),
    {reply, ok, State#state{flags = NewFlags}};
handle_call({disable, FeatureName}, _From, State) ->
    NewFlags = update_flag(FeatureName, #{<<"enabled">> => false}, State#state.flags),
    {reply, ok, State#state{flags = NewFlags}};
handle_call(get_all, _From, State) ->
    Result = maps:map(fun(_K, V) -> maps:get(<<"enabled">>, V, false) end, State#state.flags),
    {reply, Result, State}.

handle_cast(reload, State) ->
    %% The reference re-reads and re-decodes the file; here the decoded map.
    {noreply, State#state{flags = State#state.source}}.

handle_info(reload, State) ->
    gen_server:cast(self(), reload),
    Timer = erlang:send_after(60000, self(), reload),
    {noreply, State#state{reload_timer = Timer}}.

%%% Internal (the reference's, keys fixed)

evaluate_flag(FeatureName, Context, Flags) ->
    case maps:get(FeatureName, Flags, undefined) of
        undefined ->
            false;
        FlagConfig ->
            case maps:get(<<"enabled">>, FlagConfig, false) of
                false -> false;
                true ->
                    Env = atom_to_binary(application:get_env(erlmcp_core, environment, dev), utf8),
                    EnvAllowed = lists:member(Env, maps:get(<<"environments">>, FlagConfig, [Env])),
                    RolloutPct = maps:get(<<"rollout_percentage">>, FlagConfig, 100),
                    InRollout = check_rollout(Context, RolloutPct),
                    Conditions = maps:get(<<"conditions">>, FlagConfig, []),
                    ConditionsMet = check_conditions(Conditions, Context),
                    EnvAllowed andalso InRollout andalso ConditionsMet
            end
    end.

check_rollout(_Context, 100) ->
    true;
check_rollout(Context, Percentage) when Percentage >= 0, Percentage =< 100 ->
    SessionId = maps:get(session_id, Context, <<>>),
    Hash = erlang:phash2(SessionId, 100),
    Hash < Percentage;
check_rollout(_, _) ->
    false.

check_conditions([], _Context) ->
    true;
check_conditions([#{<<"user_id">> := UserId} | Rest], Context) ->
    case text(maps:get(user_id, Context, undefined)) of
        UserId -> check_conditions(Rest, Context);
        _ -> false
    end;
check_conditions([#{<<"session_type">> := Type} | Rest], Context) ->
    case text(maps:get(session_type, Context, undefined)) of
        Type -> check_conditions(Rest, Context);
        _ -> false
    end;
check_conditions([{custom, Fun} | Rest], Context) ->
    case Fun(Context) of
        true -> check_conditions(Rest, Context);
        false -> false
    end;
check_conditions([_Unknown | _], _Context) ->
    false.

%% An atom equals the string of its name (JSON cannot hold atoms).
text(undefined) -> undefined;
text(A) when is_atom(A) -> atom_to_binary(A, utf8);
text(V) -> V.

update_flag(FeatureName, Updates, Flags) ->
    ExistingConfig = maps:get(FeatureName, Flags, #{}),
    NewConfig = maps:merge(ExistingConfig, Updates),
    maps:put(FeatureName, NewConfig, Flags).
