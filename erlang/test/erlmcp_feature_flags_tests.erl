%% @doc EUnit tests of erlmcp_feature_flags' API surface through the real NIF.
-module(erlmcp_feature_flags_tests).
-include_lib("eunit/include/eunit.hrl").

-define(CONFIG, <<"{\"mcp_sampling\": {\"enabled\": true, \"rollout_percentage\": 50},"
                  " \"mcp_tasks\": {\"enabled\": true, \"environments\": [\"dev\"]},"
                  " \"mcp_off\": {}}">>).

setup() ->
    Path = filename:join(os:getenv("TMPDIR", "/tmp"), "erlmcp_ff_eunit_" ++ os:getpid() ++ ".json"),
    ok = file:write_file(Path, ?CONFIG),
    ok = erlmcp_rollout_nif:flags_configure(dev, <<>>),
    {ok, Pid} = erlmcp_feature_flags:start_link(#{config => Path, environment => production}),
    {Pid, Path}.

cleanup({_Pid, Path}) ->
    ok = erlmcp_feature_flags:stop(),
    file:delete(Path).

api_test_() ->
    {setup, fun setup/0, fun cleanup/1,
     [{"is_enabled/1 and /2 with binary and atom names", fun names/0},
      {"a boolean second argument is the default for unknown flags", fun defaults/0},
      {"buckets are erlang:phash2(Term, 100) of the term passed", fun buckets/0},
      {"bad arguments raise badarg, never crash the VM", fun bad_arguments/0},
      {"get_all, details, metrics, explain shapes", fun introspection/0},
      {"enable/disable/clear", fun overrides/0},
      {"register_condition validates its arguments", fun register_condition/0},
      {"unknown flags are counted, by binary and by atom name", fun unknown_counted/0}]}.

unknown_counted() ->
    #{<<"unknown_flag_evaluations">> := Before} = erlmcp_feature_flags:metrics(),
    false = erlmcp_feature_flags:is_enabled(<<"not_a_flag">>, #{}),
    false = erlmcp_feature_flags:is_enabled(not_a_flag_atom, #{}),
    #{<<"unknown_flag_evaluations">> := After} = erlmcp_feature_flags:metrics(),
    ?assertEqual(Before + 2, After).

names() ->
    ?assert(erlmcp_feature_flags:is_enabled(<<"mcp_sampling">>, #{session_id => <<"user-7">>})),
    ?assert(erlmcp_feature_flags:is_enabled(mcp_sampling, #{<<"session_id">> => <<"user-7">>})),
    ?assertNot(erlmcp_feature_flags:is_enabled(mcp_tasks)),  % environment dev only
    ?assertNot(erlmcp_feature_flags:is_enabled(<<"mcp_off">>)).

defaults() ->
    ?assert(erlmcp_feature_flags:is_enabled(<<"no_such_flag">>, true)),
    ?assertNot(erlmcp_feature_flags:is_enabled(<<"no_such_flag">>, false)),
    ?assertNot(erlmcp_feature_flags:is_enabled(no_such_flag)),
    %% A known flag ignores the default.
    ?assertNot(erlmcp_feature_flags:is_enabled(mcp_off, true)).

buckets() ->
    Terms = [<<"session-123">>, <<255, 0, 128>>, <<>>, streaming, 'ünïcødé', 42, -7, 1 bsl 70, -(1 bsl 64)],
    [?assertEqual({T, erlang:phash2(T, 100) < 50},
                  {T, erlmcp_feature_flags:is_enabled(mcp_sampling, #{session_id => T})}) || T <- Terms],
    %% A missing key hashes <<>> as the reference does.
    ?assertEqual(erlang:phash2(<<>>, 100) < 50, erlmcp_feature_flags:is_enabled(mcp_sampling, #{})).

bad_arguments() ->
    ?assertError(badarg, erlmcp_feature_flags:is_enabled({not_a_name}, #{})),
    ?assertError(badarg, erlmcp_feature_flags:is_enabled(<<"mcp_sampling">>, [not_a_map])),
    %% A string is a name (erlmcp's flag_name() includes string()); a list
    %% that is not text is not.
    ?assertEqual(erlmcp_feature_flags:is_enabled(<<"mcp_sampling">>, #{session_id => <<"s">>}),
                 erlmcp_feature_flags:is_enabled("mcp_sampling", #{session_id => <<"s">>})),
    ?assertError(badarg, erlmcp_feature_flags:is_enabled([not_text], #{})),
    %% Any context value, as in the reference (erlmcp_feature_flags_erlmcp_SUITE checks the buckets).
    ?assert(is_boolean(erlmcp_feature_flags:is_enabled(mcp_sampling, #{session_id => 1.5}))),
    ?assert(is_boolean(erlmcp_feature_flags:is_enabled(mcp_sampling, #{session_id => {tuple}}))),
    %% Values evaluation does not read are not looked at.
    ?assert(is_boolean(erlmcp_feature_flags:is_enabled(mcp_sampling, #{other => self(), session_id => <<"s">>}))),
    ?assertError(badarg, erlmcp_feature_flags:enable(42)),
    ?assertError(badarg, erlmcp_rollout_nif:flags_phash2(1.5, 100)),
    ?assertError(badarg, erlmcp_rollout_nif:flags_phash2(<<"x">>, 0)).

introspection() ->
    ?assertEqual(#{<<"mcp_sampling">> => true, <<"mcp_tasks">> => true, <<"mcp_off">> => false},
                 erlmcp_feature_flags:get_all()),
    Details = erlmcp_feature_flags:details(),
    ?assertEqual([<<"mcp_off">>, <<"mcp_sampling">>, <<"mcp_tasks">>], [maps:get(<<"name">>, D) || D <- Details]),
    #{<<"flags">> := Counts, <<"reloads">> := Reloads} = erlmcp_feature_flags:metrics(),
    ?assert(is_list(Counts) andalso Reloads >= 1),
    ?assertMatch(<<"# HELP", _/binary>>, erlmcp_feature_flags:metrics_text()),
    #{<<"result">> := #{<<"enabled">> := false, <<"reason">> := #{<<"reason">> := <<"environment">>}},
      <<"steps">> := [_ | _]} = erlmcp_feature_flags:explain(mcp_tasks, #{}),
    #{<<"result">> := #{<<"reason">> := #{<<"reason">> := <<"unknown_flag">>}}} =
        erlmcp_feature_flags:explain(<<"mcp_sampilng">>, #{}).

overrides() ->
    ok = erlmcp_feature_flags:enable(mcp_off),
    ?assert(erlmcp_feature_flags:is_enabled(mcp_off)),
    ok = erlmcp_feature_flags:disable(<<"mcp_off">>),
    ?assertNot(erlmcp_feature_flags:is_enabled(mcp_off)),
    ok = erlmcp_feature_flags:clear(mcp_off),
    ?assertNot(erlmcp_feature_flags:is_enabled(mcp_off)),
    ok = erlmcp_feature_flags:reload(),
    ok = erlmcp_feature_flags:reload_now().

register_condition() ->
    ?assertError(badarg, erlmcp_feature_flags:register_condition(x, not_a_fun)),
    ?assertError(badarg, erlmcp_feature_flags:register_condition(x, fun(_, _) -> true end)),
    ok = erlmcp_feature_flags:register_condition(x, fun(_) -> true end),
    ok = erlmcp_feature_flags:unregister_condition(x).
