%% @doc erlmcp's own `erlmcp_feature_flags' interface (its file format read
%% from `FEATURE_FLAGS_PATH', `get_flag/1,2', `set_flag/2,3', `list_flags/0,1',
%% `get_rollout_percentage/1', `evaluate_rollout/2', `load_flags/0,1',
%% `reload_flags/0', `export_flags/0', `import_flags/1', `watch_config/0'),
%% and context values of any type, through the real NIF in a real BEAM.
%% Cohorts are computed here with erlmcp's formula, `erlang:phash2(Id) rem
%% 100 < P', and the reference's, `erlang:phash2(V, 100) < P'.
-module(erlmcp_feature_flags_erlmcp_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").
-compile([export_all, nowarn_export_all]).

%% A file in erlmcp's format, as its module reads it.
-define(ERLMCP_FILE, <<"{\"flags\": [
  {\"name\": \"on\", \"category\": \"core\", \"state\": \"enabled\", \"value\": true},
  {\"name\": \"off\", \"category\": \"core\", \"state\": \"disabled\", \"value\": true},
  {\"name\": \"canary\", \"category\": \"rollout\", \"state\": \"rollout\", \"rollout_strategy\": \"canary\",
   \"rollout_percentage\": 30, \"conditions\": {\"region\": \"eu\"}, \"description\": \"new transport\",
   \"updated_at\": 1764800000000},
  {\"name\": \"pct\", \"state\": \"rollout\", \"rollout_strategy\": \"percentage\", \"rollout_percentage\": 62},
  {\"name\": \"limit\", \"value\": 250},
  {\"name\": \"banner\", \"value\": {\"colour\": \"blue\"}}
]}">>).

-define(OURS, <<"{\"roll\": {\"enabled\": true, \"rollout_percentage\": 40},
  \"salted\": {\"enabled\": true, \"rollout_percentage\": 55, \"salt\": \"s1\"},
  \"fine\": {\"enabled\": true, \"rollout_basis_points\": 3333, \"salt\": \"f\"},
  \"by_user\": {\"enabled\": true, \"conditions\": [{\"user_id\": \"u-1\"}]},
  \"not_gold\": {\"enabled\": true, \"conditions\": [{\"attribute\": \"tier\", \"op\": \"not_in\", \"values\": [\"gold\"]}]},
  \"child\": {\"enabled\": true, \"rollout_percentage\": 70, \"salt\": \"c\",
              \"prerequisites\": [{\"flag\": \"salted\"}]}}">>).

all() ->
    [erlmcp_file_is_served_in_erlmcp_shapes, cohorts_are_erlmcps, load_flags_sources_and_errors,
     set_flag_layers_until_reload, export_and_import_round_trip, watch_config_is_the_server,
     any_context_value_type, details_and_explain_take_any_value].

init_per_suite(Config) ->
    {ok, _} = application:ensure_all_started(erlmcp_rollout),
    Config.

end_per_suite(_Config) ->
    ok.

init_per_testcase(_Case, Config) ->
    Dir = ?config(priv_dir, Config),
    ok = erlmcp_rollout_nif:flags_set_clock(system),
    ok = erlmcp_rollout_nif:flags_configure(dev, <<>>),
    Path = filename:join(Dir, "feature-flags.json"),
    ok = file:write_file(Path, ?ERLMCP_FILE),
    Ours = filename:join(Dir, "ours.json"),
    ok = file:write_file(Ours, ?OURS),
    [{path, Path}, {ours, Ours} | Config].

end_per_testcase(_Case, _Config) ->
    true = os:unsetenv("FEATURE_FLAGS_PATH"),
    case whereis(erlmcp_feature_flags) of
        undefined -> ok;
        Pid -> unlink(Pid), ok = erlmcp_feature_flags:stop()
    end.

start(Path) ->
    {ok, Pid} = erlmcp_feature_flags:start_link(#{config => Path}),
    unlink(Pid),
    Pid.

ids() ->
    [<<"session-", (integer_to_binary(I))/binary>> || I <- lists:seq(1, 2000)].

erlmcp_bucket(Id) ->
    erlang:phash2(Id) rem 100.

erlmcp_file_is_served_in_erlmcp_shapes(Config) ->
    %% doc: a file in erlmcp's format loads; get_flag, list_flags, get_rollout_percentage answer in its shapes.
    start(?config(path, Config)),
    M = erlmcp_feature_flags,
    ?assertEqual(true, M:get_flag(on)),
    ?assertEqual(true, M:get_flag("off")),
    ?assertEqual(250, M:get_flag(<<"limit">>)),
    ?assertEqual(#{<<"colour">> => <<"blue">>}, M:get_flag(banner)),
    ?assertEqual(undefined, M:get_flag(missing)),
    ?assertEqual(fallback, M:get_flag(missing, fallback)),
    ?assertEqual(30, M:get_rollout_percentage(canary)),
    ?assertEqual(100, M:get_rollout_percentage(on)),
    ?assertEqual(0, M:get_rollout_percentage(missing)),
    %% is_enabled/2 with erlmcp's boolean default.
    ?assertEqual(true, M:is_enabled(on, false)),
    ?assertEqual(false, M:is_enabled(off, true)),
    ?assertEqual(true, M:is_enabled("missing", true)),
    ?assertEqual(false, M:is_enabled(missing)),
    Flags = M:list_flags(),
    ?assertEqual(lists:sort([<<"on">>, <<"off">>, <<"canary">>, <<"pct">>, <<"limit">>, <<"banner">>]),
                 lists:sort(maps:keys(Flags))),
    ?assertMatch(#{name := <<"canary">>, category := <<"rollout">>, state := rollout, value := true,
                   rollout_percentage := 30, rollout_strategy := canary,
                   conditions := #{<<"region">> := <<"eu">>}, description := <<"new transport">>,
                   updated_at := 1764800000000},
                 maps:get(<<"canary">>, Flags)),
    ?assertMatch(#{name := <<"limit">>, category := custom, state := enabled, rollout_strategy := all,
                   conditions := #{}, description := <<>>},
                 maps:get(<<"limit">>, Flags)),
    ?assertEqual([<<"off">>, <<"on">>], lists:sort([N || #{name := N} <- M:list_flags(<<"core">>)])),
    ?assertEqual([<<"off">>, <<"on">>], lists:sort([N || #{name := N} <- M:list_flags(core)])),
    ?assertEqual(3, length(M:list_flags(custom))),
    ?assertEqual([], M:list_flags("nope")).

cohorts_are_erlmcps(Config) ->
    %% doc: evaluate_rollout/2 and is_enabled/2 place every id where erlmcp's phash2(Id) rem 100 does.
    start(?config(path, Config)),
    M = erlmcp_feature_flags,
    Ids = ids() ++ [42, -7, 1 bsl 70, atom_id, {tuple, 1}, [1, 2, 3], 1.5, <<>>, "s-1"],
    [begin
         Want = erlmcp_bucket(Id) < P,
         ?assertEqual({F, Id, Want}, {F, Id, M:evaluate_rollout(F, Id)}),
         ?assertEqual({F, Id, Want}, {F, Id, M:is_enabled(F, #{session_id => Id})})
     end || Id <- Ids, {F, P} <- [{canary, 30}, {<<"pct">>, 62}]],
    %% Both outcomes occur, and the two hash contracts really differ.
    In = [Id || Id <- ids(), M:evaluate_rollout(pct, Id)],
    ?assert(length(In) > 1000 andalso length(In) < 1500),
    ?assert(length([Id || Id <- ids(), erlmcp_bucket(Id) =/= erlang:phash2(Id, 100)]) > 1500),
    ?assertEqual(true, M:evaluate_rollout(on, <<"x">>)),
    ?assertEqual(false, M:evaluate_rollout(off, <<"x">>)),
    ?assertEqual(false, M:evaluate_rollout(missing, <<"x">>)),
    %% Our format's rollouts: the identifier under the stickiness key, hash contract v1.
    ok = element(1, M:load_flags(?config(ours, Config))),
    [?assertEqual(erlang:phash2(Id, 100) < 40, M:evaluate_rollout(roll, Id)) || Id <- ids()],
    ok.

load_flags_sources_and_errors(Config) ->
    %% doc: load_flags/0 reads FEATURE_FLAGS_PATH; a missing file is {file_error, enoent}; an invalid one names every problem and changes nothing.
    M = erlmcp_feature_flags,
    true = os:putenv("FEATURE_FLAGS_PATH", ?config(path, Config)),
    {ok, Flags} = M:load_flags(),
    ?assertEqual(6, map_size(Flags)),
    ?assertEqual({error, {file_error, enoent}}, M:load_flags("/nonexistent/feature-flags.json")),
    Bad = filename:join(?config(priv_dir, Config), "bad.json"),
    ok = file:write_file(Bad, <<"{\"flags\": [\n  {\"name\": \"x\", \"state\": \"maybe\"},\n  {\"name\": \"y\", \"rollout_percentage\": 101}]}">>),
    {error, {invalid_config, Problems}} = M:load_flags(Bad),
    ?assertMatch([#{flag := <<"x">>, path := <<"$.flags[0].state">>, line := 2, column := 26},
                  #{flag := <<"y">>, path := <<"$.flags[1].rollout_percentage">>, line := 3}], Problems),
    ?assertEqual(250, M:get_flag(limit)),
    %% With a server, load_flags(Path) switches its source.
    start(?config(path, Config)),
    {ok, Ours} = M:load_flags(?config(ours, Config)),
    ?assert(maps:is_key(<<"roll">>, Ours)),
    ?assertEqual(undefined, M:get_flag(limit)),
    ok = M:reload_now(),
    ?assertEqual(undefined, M:get_flag(limit)),
    {error, {invalid_config, _}} = M:load_flags(Bad),
    ?assert(maps:is_key(<<"roll">>, M:list_flags())),
    %% JSON text is an import.
    {ok, Imported} = M:load_flags(?ERLMCP_FILE),
    ?assertEqual(6, map_size(Imported)).

set_flag_layers_until_reload(Config) ->
    %% doc: set_flag/2,3 define a flag at runtime (validated; unknown options named) until reload_flags/0.
    start(?config(path, Config)),
    M = erlmcp_feature_flags,
    ok = M:set_flag(on, false),
    ?assertEqual(false, M:is_enabled(on, true)),
    ?assertEqual(false, M:get_flag(on)),
    ok = M:reload_now(),
    ?assertEqual(false, M:is_enabled(on, true), "an unchanged source keeps it"),
    ok = M:set_flag("fresh", <<"v2">>, #{state => rollout, rollout_strategy => percentage,
                                        rollout_percentage => 25, category => experiments}),
    ?assertMatch(#{value := <<"v2">>, state := rollout, rollout_percentage := 25,
                   category := <<"experiments">>, updated_at := T} when is_integer(T),
                 maps:get(<<"fresh">>, M:list_flags())),
    [?assertEqual(erlmcp_bucket(Id) < 25, M:evaluate_rollout(fresh, Id)) || Id <- ids()],
    ?assertEqual({error, {bad_option, colour}}, M:set_flag(on, true, #{colour => red})),
    {error, {invalid_flag, [#{path := <<"$.flags[0].rollout_percentage">>, message := Msg}]}} =
        M:set_flag(on, true, #{rollout_percentage => 101}),
    ?assertMatch({_, _}, binary:match(Msg, <<"0..100">>)),
    {error, {invalid_flag, [#{path := <<"$.flags[0].state">>}]}} = M:set_flag(on, true, #{state => sometimes}),
    {error, {bad_value, _}} = M:set_flag(on, {not_json, self()}),
    ?assertEqual(false, M:get_flag(on), "failed sets change nothing"),
    {ok, _} = M:reload_flags(),
    ?assertEqual(true, M:get_flag(on)),
    ?assertEqual(undefined, M:get_flag(fresh)).

export_and_import_round_trip(Config) ->
    %% doc: export_flags/0 writes erlmcp's export format; import_flags/1 reads it back with the same cohorts.
    start(?config(path, Config)),
    M = erlmcp_feature_flags,
    {ok, Json} = M:export_flags(),
    ?assertMatch({_, _}, binary:match(Json, <<"\"version\":\"3.0.0\"">>)),
    ?assertMatch({_, _}, binary:match(Json, <<"\"environment\":\"dev\"">>)),
    Before = [{F, Id, M:evaluate_rollout(F, Id)} || F <- [canary, pct, on, off], Id <- ids()],
    ok = M:import_flags(<<"{\"flags\": [{\"name\": \"only\"}]}">>),
    ?assertEqual([<<"only">>], maps:keys(M:list_flags())),
    ok = M:import_flags(Json),
    ?assertEqual(Before, [{F, Id, M:evaluate_rollout(F, Id)} || F <- [canary, pct, on, off], Id <- ids()]),
    {error, {invalid_config, [_ | _]}} = M:import_flags(<<"{\"flags\": [{\"name\": 1}]}">>),
    {error, {invalid_config, [_ | _]}} = M:import_flags(<<"not json">>),
    ?assertEqual({error, invalid_input}, M:import_flags(42)),
    ?assertEqual(6, map_size(M:list_flags())).

watch_config_is_the_server(Config) ->
    %% doc: watch_config/0 returns the running server, or starts one on FEATURE_FLAGS_PATH.
    true = os:putenv("FEATURE_FLAGS_PATH", ?config(path, Config)),
    {ok, Pid} = erlmcp_feature_flags:watch_config(),
    unlink(Pid),
    ?assertEqual(Pid, whereis(erlmcp_feature_flags)),
    ?assertEqual({ok, Pid}, erlmcp_feature_flags:watch_config()),
    ?assertEqual(250, erlmcp_feature_flags:get_flag(limit)).

any_context_value_type(Config) ->
    %% doc: any term as a context value: bucketed by erlang:phash2/2 as the reference, equal to no configured value.
    start(?config(ours, Config)),
    M = erlmcp_feature_flags,
    Terms = [1.5, -0.0, {<<"s">>, 1}, [1, 2], "session-1", #{k => v}, self(), make_ref(), {}, [],
             <<1:3>>, fun lists:map/2, 1 bsl 80, 0.1 + 0.2]
        ++ [{I, <<"x">>} || I <- lists:seq(1, 400)],
    [begin
         ?assertEqual({roll, T, erlang:phash2(T, 100) < 40}, {roll, T, M:is_enabled(roll, #{session_id => T})}),
         ?assertEqual({salted, T, erlang:phash2({<<"s1">>, T}, 100) < 55},
                      {salted, T, M:is_enabled(salted, #{session_id => T})}),
         ?assertEqual({fine, T, erlang:phash2({<<"f">>, T}, 10000) < 3333},
                      {fine, T, M:is_enabled(fine, #{<<"session_id">> => T})}),
         %% A prerequisite's salt too: two hashes of one value.
         ?assertEqual({child, T, erlang:phash2({<<"s1">>, T}, 100) < 55 andalso erlang:phash2({<<"c">>, T}, 100) < 70},
                      {child, T, M:is_enabled(child, #{session_id => T})})
     end || T <- Terms],
    ?assertEqual(false, M:is_enabled(by_user, #{user_id => {<<"u-1">>}})),
    ?assertEqual(false, M:is_enabled(by_user, #{user_id => [<<"u-1">>]})),
    ?assertEqual(true, M:is_enabled(by_user, #{user_id => <<"u-1">>})),
    ?assertEqual(true, M:is_enabled(not_gold, #{tier => {gold}})),
    ?assertEqual(false, M:is_enabled(not_gold, #{tier => gold})),
    %% Counted once per call.
    Before = evaluations(<<"roll">>),
    [M:is_enabled(roll, #{session_id => {I}}) || I <- lists:seq(1, 100)],
    ?assertEqual(100, evaluations(<<"roll">>) - Before).

evaluations(Flag) ->
    #{<<"flags">> := Counts} = erlmcp_feature_flags:metrics(),
    [N] = [T + F || [Name, #{<<"true">> := T, <<"false">> := F}] <- Counts, Name =:= Flag],
    N.

details_and_explain_take_any_value(Config) ->
    %% doc: details/2 and explain/2 with a foreign stickiness value agree with is_enabled/2.
    start(?config(ours, Config)),
    M = erlmcp_feature_flags,
    [begin
         Ctx = #{session_id => {I, 2.5}},
         Want = M:is_enabled(salted, Ctx),
         ?assertMatch(#{<<"evaluation">> := #{<<"enabled">> := Want}, <<"error_code">> := undefined},
                      M:details(salted, Ctx)),
         ?assertMatch(#{<<"result">> := #{<<"enabled">> := Want}}, M:explain(salted, Ctx))
     end || I <- lists:seq(1, 50)],
    ok.
