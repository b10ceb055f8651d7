%% @doc Variants, basis-point rollouts, prerequisites, `details/2' and
%% `variant/2', and the audit trail, through the real NIF in a real BEAM.
%% Cohorts are checked against `erlang:phash2/2' computed here, from the
%% formulas of docs/flags.md (hash contract v1).
-module(erlmcp_feature_flags_extended_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").
-compile([export_all, nowarn_export_all]).

-define(CONFIG, <<"{
  \"kill\": {\"enabled\": true},
  \"banner\": {\"enabled\": true, \"salt\": \"banner-v1\", \"metadata\": {\"owner\": \"web\", \"phase\": 2},
             \"variants\": {\"blue\": {\"value\": \"#00f\", \"weight\": 5}, \"green\": {\"value\": \"#0f0\", \"weight\": 3},
                          \"red\": {\"value\": \"#f00\", \"weight\": 2}},
             \"prerequisites\": [{\"flag\": \"kill\"}]},
  \"green_only\": {\"enabled\": true, \"prerequisites\": [{\"flag\": \"banner\", \"variant\": \"green\"}]},
  \"staff_parent\": {\"enabled\": true, \"conditions\": [{\"custom\": \"staff\"}]},
  \"staff_child\": {\"enabled\": true, \"prerequisites\": [{\"flag\": \"staff_parent\"}]},
  \"fine\": {\"enabled\": true, \"rollout_basis_points\": 1234},
  \"pct\": {\"enabled\": true, \"rollout_percentage\": 37},
  \"targeted\": {\"enabled\": true, \"conditions\": [{\"user_id\": \"u-1\"}]},
  \"static\": {\"enabled\": true}
}">>).

all() ->
    [details_carry_openfeature_reasons, variants_follow_the_hash_contract, basis_points_follow_phash2,
     a_disabled_parent_turns_dependants_off, custom_conditions_of_parents_run_in_the_caller,
     audit_trail_records_overrides_and_reloads, bad_audit_options_are_refused].

init_per_suite(Config) ->
    {ok, _} = application:ensure_all_started(erlmcp_rollout),
    Config.

end_per_suite(_Config) ->
    ok.

init_per_testcase(_Case, Config) ->
    Dir = ?config(priv_dir, Config),
    ok = erlmcp_rollout_nif:flags_set_clock(system),
    ok = erlmcp_rollout_nif:flags_configure(dev, <<>>),
    Path = iolist_to_binary(filename:join(Dir, "flags.json")),
    ok = file:write_file(Path, ?CONFIG),
    [{dir, Dir}, {path, Path} | Config].

end_per_testcase(_Case, _Config) ->
    stop_server(),
    ok = erlmcp_feature_flags:unregister_condition(staff),
    [ok = erlmcp_rollout_nif:flags_set_override(F, clear) || F <- [<<"kill">>, <<"banner">>]],
    ok.

stop_server() ->
    case whereis(erlmcp_feature_flags) of
        undefined -> ok;
        Pid -> unlink(Pid), ok = erlmcp_feature_flags:stop()
    end.

start(Config) ->
    start(Config, #{}).
start(Config, Extra) ->
    {ok, Pid} = erlmcp_feature_flags:start_link(maps:merge(#{config => ?config(path, Config)}, Extra)),
    unlink(Pid),
    Pid.

%% The documented variant formula, in Erlang.
expected_variant(Salt, V, Weights) ->
    B = erlang:phash2({Salt, V}, 10000),
    Scores = [{-math:log((erlang:phash2({Name, B}, 4294967296) + 0.5) / 4294967296) / W, Name}
              || {Name, W} <- Weights, W > 0],
    {_, Best} = lists:min(Scores),
    Best.

details_carry_openfeature_reasons(Config) ->
    %% doc: details/2 maps with binary keys; reasons and error codes in OpenFeature's vocabulary.
    start(Config),
    S = #{session_id => <<"s-1">>},
    D = erlmcp_feature_flags:details(banner, S),
    #{<<"flag">> := <<"banner">>, <<"reason">> := <<"SPLIT">>, <<"variant">> := V, <<"value">> := _,
      <<"error_code">> := undefined, <<"metadata">> := #{<<"owner">> := <<"web">>, <<"phase">> := 2},
      <<"evaluation">> := #{<<"enabled">> := true}} = D,
    ?assert(lists:member(V, [<<"blue">>, <<"green">>, <<"red">>])),
    ?assertMatch(#{<<"reason">> := <<"STATIC">>, <<"value">> := true, <<"variant">> := undefined},
                 erlmcp_feature_flags:details(<<"static">>, #{})),
    ?assertMatch(#{<<"reason">> := <<"TARGETING_MATCH">>, <<"value">> := true},
                 erlmcp_feature_flags:details(targeted, #{user_id => <<"u-1">>})),
    ?assertMatch(#{<<"reason">> := <<"DEFAULT">>, <<"value">> := false},
                 erlmcp_feature_flags:details(targeted, #{user_id => <<"u-2">>})),
    ?assertMatch(#{<<"reason">> := <<"ERROR">>, <<"error_code">> := <<"FLAG_NOT_FOUND">>, <<"value">> := undefined},
                 erlmcp_feature_flags:details(no_such_flag, #{})),
    ?assertMatch(#{<<"reason">> := <<"ERROR">>, <<"error_code">> := <<"TARGETING_KEY_MISSING">>},
                 erlmcp_feature_flags:details(pct, #{})),
    %% A context value of any other type equals no configured value (the
    %% reference's `=:='): the condition does not hold, no error.
    ?assertMatch(#{<<"reason">> := <<"DEFAULT">>, <<"error_code">> := undefined, <<"value">> := false},
                 erlmcp_feature_flags:details(targeted, #{user_id => self()})),
    ?assertEqual(false, erlmcp_feature_flags:is_enabled(targeted, #{user_id => self()})),
    ?assertError(badarg, erlmcp_feature_flags:details(targeted, not_a_map)),
    ?assertError(badarg, erlmcp_feature_flags:details("a list", #{})),
    %% variant/2
    ?assertEqual(#{<<"variant">> => V, <<"value">> => maps:get(<<"value">>, D)},
                 erlmcp_feature_flags:variant(banner, S)),
    ?assertEqual(undefined, erlmcp_feature_flags:variant(static, #{})),
    ?assertEqual(undefined, erlmcp_feature_flags:variant(no_such_flag, #{})).

variants_follow_the_hash_contract(Config) ->
    %% doc: the variant of every session is the documented rendezvous on phash2({Salt, V}, 10000).
    start(Config),
    Weights = [{<<"blue">>, 5}, {<<"green">>, 3}, {<<"red">>, 2}],
    Values = #{<<"blue">> => <<"#00f">>, <<"green">> => <<"#0f0">>, <<"red">> => <<"#f00">>},
    Ids = [<<"session-", (integer_to_binary(I))/binary>> || I <- lists:seq(1, 3000)]
        ++ [list_to_atom("atom_session_" ++ integer_to_list(I)) || I <- lists:seq(1, 100)]
        ++ lists:seq(-50, 50),
    Got = [begin
               Expected = expected_variant(<<"banner-v1">>, Id, Weights),
               #{<<"variant">> := Expected, <<"value">> := Value} =
                   erlmcp_feature_flags:variant(banner, #{session_id => Id}),
               ?assertEqual(maps:get(Expected, Values), Value),
               ?assertEqual(Expected =:= <<"green">>, erlmcp_feature_flags:is_enabled(green_only, #{session_id => Id})),
               Expected
           end || Id <- Ids],
    Blue = length([x || <<"blue">> <- Got]) / length(Got),
    ?assert(abs(Blue - 0.5) < 0.04).

basis_points_follow_phash2(Config) ->
    %% doc: rollout_basis_points is phash2(V, 10000) < BP; rollout_percentage stays phash2(V, 100) < P.
    start(Config),
    Ids = [<<"session-", (integer_to_binary(I))/binary>> || I <- lists:seq(1, 5000)] ++ lists:seq(1, 200),
    [begin
         ?assertEqual(erlang:phash2(Id, 10000) < 1234, erlmcp_feature_flags:is_enabled(fine, #{session_id => Id})),
         ?assertEqual(erlang:phash2(Id, 100) < 37, erlmcp_feature_flags:is_enabled(pct, #{<<"session_id">> => Id}))
     end || Id <- Ids],
    Out = hd([Id || Id <- Ids, erlang:phash2(Id, 10000) >= 1234]),
    #{<<"result">> := #{<<"reason">> := #{<<"reason">> := <<"fine_rollout">>, <<"basis_points">> := 1234,
                                          <<"bucket">> := B}}} = erlmcp_feature_flags:explain(fine, #{session_id => Out}),
    ?assertEqual(erlang:phash2(Out, 10000), B).

a_disabled_parent_turns_dependants_off(Config) ->
    %% doc: a prerequisite is a kill switch: disable/1 of the parent turns every dependant off.
    start(Config),
    Green = hd([S || I <- lists:seq(1, 1000), S <- [#{session_id => integer_to_binary(I)}],
                     erlmcp_feature_flags:is_enabled(green_only, S)]),
    ok = erlmcp_feature_flags:disable(kill),
    ?assertNot(erlmcp_feature_flags:is_enabled(banner, Green)),
    ?assertNot(erlmcp_feature_flags:is_enabled(green_only, Green)),
    ?assertMatch(#{<<"reason">> := <<"DISABLED">>, <<"value">> := undefined, <<"variant">> := undefined},
                 erlmcp_feature_flags:details(banner, Green)),
    #{<<"steps">> := Steps} = erlmcp_feature_flags:explain(green_only, Green),
    Checks = [{C, P} || #{<<"check">> := C, <<"passed">> := P} <- Steps],
    ?assert(lists:member({<<"prerequisite[0]">>, false}, Checks)),
    ?assert(lists:member({<<"prerequisite[0].prerequisite[0]">>, false}, Checks)),
    ok = erlmcp_feature_flags:clear(kill),
    ?assert(erlmcp_feature_flags:is_enabled(green_only, Green)).

custom_conditions_of_parents_run_in_the_caller(Config) ->
    %% doc: a parent's custom condition runs the registered fun for the dependant too.
    start(Config),
    ?assertNot(erlmcp_feature_flags:is_enabled(staff_child, #{email => <<"a@example.com">>})),
    ok = erlmcp_feature_flags:register_condition(staff, fun(#{email := E}) -> binary:longest_common_suffix([E, <<"@example.com">>]) =:= 12;
                                                           (_) -> false end),
    ?assert(erlmcp_feature_flags:is_enabled(staff_child, #{email => <<"a@example.com">>})),
    ?assertNot(erlmcp_feature_flags:is_enabled(staff_child, #{email => <<"a@elsewhere.org">>})),
    ?assertMatch(#{<<"reason">> := <<"TARGETING_MATCH">>, <<"value">> := true},
                 erlmcp_feature_flags:details(staff_child, #{email => <<"a@example.com">>})).

audit_trail_records_overrides_and_reloads(Config) ->
    %% doc: with audit_log, overrides and reloads append synced JSON lines naming the actor.
    Log = filename:join(?config(dir, Config), "audit.jsonl"),
    %% Load the config first, so that the start with audit_log changes nothing.
    start(Config),
    stop_server(),
    start(Config, #{audit_log => Log}),
    ok = erlmcp_feature_flags:disable(kill),
    ok = erlmcp_feature_flags:disable(kill),
    ok = erlmcp_feature_flags:clear(kill),
    Changed = binary:replace(?CONFIG, <<"\"rollout_percentage\": 37">>, <<"\"rollout_percentage\": 40">>),
    ok = file:write_file(?config(path, Config), Changed),
    ok = erlmcp_feature_flags:reload_now(),
    Lines = read_lines(Log),
    ?assertEqual(3, length(Lines)),
    [Off, Clear, Reload] = Lines,
    Actor = iolist_to_binary(["erlang:", atom_to_binary(node(), utf8), ":", pid_to_list(self())]),
    ?assertMatch(#{<<"format">> := 1, <<"actor">> := Actor, <<"source">> := <<"override">>,
                   <<"changes">> := [#{<<"flag">> := <<"kill">>, <<"change">> := <<"override">>,
                                       <<"fields">> := #{<<"override">> := #{<<"before">> := null,
                                                                             <<"after">> := false}}}]}, Off),
    ?assertMatch(#{<<"changes">> := [#{<<"fields">> := #{<<"override">> := #{<<"before">> := false}}}]}, Clear),
    NodeActor = atom_to_binary(node(), utf8),
    Source = <<"file:", (?config(path, Config))/binary>>,
    ?assertMatch(#{<<"actor">> := NodeActor, <<"source">> := Source,
                   <<"changes">> := [#{<<"flag">> := <<"pct">>, <<"change">> := <<"changed">>,
                                       <<"fields">> := #{<<"rollout_percentage">> := #{<<"before">> := 37,
                                                                                        <<"after">> := 40}}}]},
                 Reload),
    %% A server started without audit_log turns it off.
    stop_server(),
    start(Config),
    ok = erlmcp_feature_flags:disable(kill),
    ?assertEqual(3, length(read_lines(Log))).

bad_audit_options_are_refused(Config) ->
    %% doc: a bad audit_log value or an unwritable file stops start_link naming the option.
    process_flag(trap_exit, true),
    Path = ?config(path, Config),
    ?assertEqual({error, {bad_option, audit_log}}, erlmcp_feature_flags:start_link(#{config => Path, audit_log => 42})),
    ?assertMatch({error, {bad_option, audit_log, _}},
                 erlmcp_feature_flags:start_link(#{config => Path,
                                                   audit_log => filename:join([?config(dir, Config), "no", "such", "dir"])})).

read_lines(Path) ->
    {ok, Text} = file:read_file(Path),
    [erlmcp_test_json:decode(L) || L <- binary:split(Text, <<"\n">>, [global, trim_all])].
