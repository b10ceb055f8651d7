%% @doc erlmcp_feature_flags through the real NIF: the shared conformance
%% fixtures, reloading, restarts, concurrency, hot code loading and the NIF
%% upgrade procedure.
-module(erlmcp_feature_flags_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("kernel/include/file.hrl").
-include_lib("stdlib/include/assert.hrl").
-compile([export_all, nowarn_export_all]).

-define(FIXTURES, ["rollout", "conditions", "environments", "schedule", "overrides", "reference"]).

all() ->
    [{group, conformance}, {group, lifecycle}, {group, concurrency}, {group, etcd}].

groups() ->
    [{conformance, [], [fixture_rollout, fixture_conditions, fixture_environments, fixture_schedule,
                        fixture_overrides, fixture_reference, every_fixture_file_runs]},
     {lifecycle, [sequence], [start_link_0_reads_erlmcp_core_env, bad_start_reports_every_problem,
                              bad_options_are_refused, reload_now_failure_keeps_last_good,
                              file_change_is_picked_up, file_replaced_with_same_size_and_mtime_is_picked_up, overrides_survive_reloads,
                              env_var_overrides, restart_keeps_flags_serving,
                              custom_conditions_run_in_the_caller, string_names_are_the_flag_of_that_text]},
     {concurrency, [sequence], [readers_during_reloads_see_whole_snapshots,
                                hot_code_loading_fails_no_call, nif_stub_reload_fails_safely]},
     {etcd, [sequence], [flags_follow_an_etcd_key]}].

init_per_group(etcd, Config) ->
    %% A real 3-member cluster on free loopback ports (scripts/etcd-cluster).
    Dir = filename:join(?config(priv_dir, Config), "etcd"),
    {0, Out} = run(script("etcd-cluster"), ["start", Dir]),
    ct:log("~s", [Out]),
    {ok, Eps} = file:read_file(filename:join(Dir, "endpoints")),
    [{etcd_dir, Dir}, {endpoints, string:trim(Eps)} | Config];
init_per_group(_Group, Config) ->
    Config.

end_per_group(etcd, Config) ->
    ok = erlmcp_rollout_nif:flags_unwatch_etcd(),
    _ = run(script("etcd-cluster"), ["stop", ?config(etcd_dir, Config)]),
    ok;
end_per_group(_Group, _Config) ->
    ok.

script(Name) ->
    erlmcp_test_os:script(Name).

run(Exe, Args) ->
    erlmcp_test_os:run(Exe, Args).

etcd_put(Config, Key, Value) ->
    {0, _} = run(os:find_executable("etcdctl"),
                 ["--endpoints=" ++ binary_to_list(?config(endpoints, Config)), "put", Key, Value]),
    ok.

%% Polls until F() returns true (a watch delivers in milliseconds; allow 3 s).
eventually(F) ->
    eventually(F, erlang:monotonic_time(millisecond) + 3000).
eventually(F, Deadline) ->
    case F() of
        true -> ok;
        false ->
            erlang:monotonic_time(millisecond) < Deadline orelse ct:fail(not_within_3_seconds),
            timer:sleep(10),
            eventually(F, Deadline)
    end.

flags_follow_an_etcd_key(Config) ->
    %% doc: DESIGN §3.3 etcd source: a change reaches callers within a second; an invalid
    %% value, a deleted key and an outage keep the last good flags.
    process_flag(trap_exit, true),
    Eps = [list_to_binary(E) || E <- string:split(binary_to_list(?config(endpoints, Config)), ",", all)],
    Key = "ct/feature_flags",
    ok = etcd_put(Config, Key, "{\"f_etcd\": {\"enabled\": true}}"),
    {ok, Pid} = erlmcp_feature_flags:start_link(#{etcd => #{endpoints => Eps, key => list_to_binary(Key)},
                                                   environment => production}),
    ?assert(erlmcp_feature_flags:is_enabled(<<"f_etcd">>, #{})),
    ?assertEqual(ok, erlmcp_feature_flags:reload_now()),
    T0 = erlang:monotonic_time(millisecond),
    ok = etcd_put(Config, Key, "{\"f_etcd\": {\"enabled\": false}, \"f_new\": {\"enabled\": true}}"),
    eventually(fun() -> erlmcp_feature_flags:is_enabled(<<"f_new">>, #{}) end),
    ct:log("change visible to callers after ~b ms (including the etcdctl run)",
           [erlang:monotonic_time(millisecond) - T0]),
    ?assertNot(erlmcp_feature_flags:is_enabled(<<"f_etcd">>, #{})),
    %% an invalid value: the last good flags keep serving, reload_now says why
    ok = etcd_put(Config, Key, "{\"f_new\": {\"enabled\": \"yes\"}}"),
    eventually(fun() -> maps:get(<<"failures">>, erlmcp_rollout_nif:flags_etcd_status()) >= 1 end),
    ?assert(erlmcp_feature_flags:is_enabled(<<"f_new">>, #{})),
    ?assertMatch({error, [#{message := _}]}, erlmcp_feature_flags:reload_now()),
    %% etcd down: still serving
    {0, _} = run(script("etcd-cluster"), ["stop", ?config(etcd_dir, Config)]),
    timer:sleep(500),
    ?assert(erlmcp_feature_flags:is_enabled(<<"f_new">>, #{})),
    %% both sources at once, or a bad etcd option, are refused
    unlink(Pid),
    ok = erlmcp_feature_flags:stop(),
    ?assertMatch({error, {bad_option, etcd, _}},
                 erlmcp_feature_flags:start_link(#{etcd => #{endpoints => Eps}, config => "x.json"})),
    ?assertMatch({error, {bad_option, etcd, _}}, erlmcp_feature_flags:start_link(#{etcd => #{endpoints => []}})),
    %% start with etcd unreachable and nothing loaded before in this VM would stop; here
    %% flags were loaded, so it starts and keeps serving them
    {ok, Pid2} = erlmcp_feature_flags:start_link(#{etcd => #{endpoints => Eps}, environment => production}),
    ?assert(erlmcp_feature_flags:is_enabled(<<"f_new">>, #{})),
    unlink(Pid2),
    ok = erlmcp_feature_flags:stop().

init_per_suite(Config) ->
    {ok, _} = application:ensure_all_started(erlmcp_rollout),
    Config.

end_per_suite(_Config) ->
    ok.

init_per_testcase(_Case, Config) ->
    Dir = ?config(priv_dir, Config),
    ok = erlmcp_rollout_nif:flags_set_clock(system),
    ok = erlmcp_rollout_nif:flags_configure(dev, <<>>),
    [{dir, Dir} | Config].

end_per_testcase(_Case, _Config) ->
    %% The case may have stopped the server itself, or never started it.
    try erlmcp_feature_flags:stop() catch exit:_ -> ok end,
    os:unsetenv("ERLMCP_FEATURE_FLAGS"),
    ok = erlmcp_rollout_nif:flags_set_clock(system),
    ok.

%%% Conformance: the same fixture files the Rust tests run.

fixture_rollout(_) -> run_fixture("rollout").
fixture_conditions(_) -> run_fixture("conditions").
fixture_environments(_) -> run_fixture("environments").
fixture_schedule(_) -> run_fixture("schedule").
fixture_overrides(_) -> run_fixture("overrides").
fixture_reference(_) -> run_fixture("reference").

every_fixture_file_runs(_) ->
    %% doc: no fixture file is left out of this suite.
    Files = filelib:wildcard(filename:join(fixture_dir(), "*.json")),
    Names = [filename:basename(F, ".json") || F <- Files, not lists:prefix("reference_", filename:basename(F))],
    ?assertEqual(lists:sort(?FIXTURES), lists:sort(Names)).

fixture_dir() ->
    %% erlang/_build/test/lib/erlmcp_rollout/ -> repository root
    Root = filename:dirname(filename:dirname(code:lib_dir(erlmcp_rollout))),
    find_fixtures(Root).

find_fixtures("/") -> error(fixtures_not_found);
find_fixtures(Dir) ->
    Candidate = filename:join([Dir, "tests", "fixtures", "flags"]),
    case filelib:is_dir(Candidate) of
        true -> Candidate;
        false -> find_fixtures(filename:dirname(Dir))
    end.

run_fixture(Name) ->
    {ok, Text} = file:read_file(filename:join(fixture_dir(), Name ++ ".json")),
    Doc = erlmcp_test_json:decode(Text),
    Env = maps:get(<<"environment">>, Doc),
    Overrides = maps:get(<<"env_overrides">>, Doc, <<>>),
    ok = erlmcp_rollout_nif:flags_configure(Env, Overrides),
    case maps:get(<<"now">>, Doc, undefined) of
        undefined -> ok = erlmcp_rollout_nif:flags_set_clock(system);
        Now -> ok = erlmcp_rollout_nif:flags_set_clock(unix_ms(Now))
    end,
    {ok, _} = erlmcp_rollout_nif:flags_load_json(erlmcp_test_json:encode(maps:get(<<"config">>, Doc))),
    Runtime = maps:get(<<"runtime_overrides">>, Doc, #{}),
    [ok = erlmcp_rollout_nif:flags_set_override(F, V) || {F, V} <- maps:to_list(Runtime)],
    try
        Failures = [Case || Case <- maps:get(<<"cases">>, Doc), not case_passes(Case)],
        ?assertEqual([], Failures)
    after
        [ok = erlmcp_rollout_nif:flags_set_override(F, clear) || F <- maps:keys(Runtime)]
    end.

case_passes(#{<<"flag">> := Flag, <<"context">> := Ctx0, <<"enabled">> := Expected} = Case) ->
    Ctx = maps:map(fun(_K, V) -> context_value(V) end, Ctx0),
    %% Keys as atoms (erlmcp's usual form) and as binaries must agree.
    AtomCtx = maps:from_list([{binary_to_atom(K, utf8), V} || {K, V} <- maps:to_list(Ctx)]),
    Got1 = erlmcp_feature_flags:is_enabled(Flag, Ctx),
    Got2 = erlmcp_feature_flags:is_enabled(binary_to_atom(Flag, utf8), AtomCtx),
    #{<<"result">> := #{<<"reason">> := Reason}} = erlmcp_feature_flags:explain(Flag, AtomCtx),
    ReasonOk = maps:get(<<"reason">>, Reason) =:= maps:get(<<"reason">>, Case)
        andalso maps:get(<<"bucket">>, Reason, none) =:= maps:get(<<"bucket">>, Case, maps:get(<<"bucket">>, Reason, none))
        andalso maps:get(<<"index">>, Reason, none) =:= maps:get(<<"condition_index">>, Case, maps:get(<<"index">>, Reason, none)),
    Ok = Got1 =:= Expected andalso Got2 =:= Expected andalso ReasonOk,
    Ok orelse ct:pal("case ~s: got ~p/~p reason ~p", [maps:get(<<"name">>, Case), Got1, Got2, Reason]),
    Ok.

context_value(#{<<"atom">> := A}) -> binary_to_atom(A, utf8);
context_value(#{<<"hex">> := H}) -> binary:decode_hex(H);
context_value(#{<<"int">> := I}) -> binary_to_integer(I);
context_value(V) when is_binary(V); is_integer(V) -> V.

unix_ms(Rfc3339) ->
    calendar:rfc3339_to_system_time(binary_to_list(Rfc3339), [{unit, millisecond}]).

%%% Lifecycle

write(Config, Name, Text) ->
    Path = filename:join(?config(dir, Config), Name),
    ok = file:write_file(Path, Text),
    Path.

start_link_0_reads_erlmcp_core_env(Config) ->
    %% doc: start_link/0 reads feature_flags_config and environment of erlmcp_core.
    Path = write(Config, "env.json", <<"{\"f\": {\"enabled\": true, \"environments\": [\"staging\"]}}">>),
    ok = application:set_env(erlmcp_core, feature_flags_config, Path),
    ok = application:set_env(erlmcp_core, environment, staging),
    try
        {ok, _} = erlmcp_feature_flags:start_link(),
        ?assert(erlmcp_feature_flags:is_enabled(<<"f">>)),
        ?assert(erlmcp_feature_flags:is_enabled(f, #{}))
    after
        application:unset_env(erlmcp_core, feature_flags_config),
        application:unset_env(erlmcp_core, environment)
    end.

bad_start_reports_every_problem(Config) ->
    %% doc: a first load that fails stops start_link with every problem.
    Path = write(Config, "bad.json", <<"{\"a\": {\"enabled\": 1}, \"b\": {\"rollout_percentage\": 900}}">>),
    process_flag(trap_exit, true),
    case erlmcp_rollout_nif:flags_status() of
        {_, _, 0} ->
            {error, {invalid_config, _, Problems}} = erlmcp_feature_flags:start_link(#{config => Path}),
            ?assertEqual([<<"a">>, <<"b">>], [F || #{flag := F} <- Problems]);
        _ ->
            %% Flags were loaded earlier in this VM: a start with a bad file
            %% keeps them (the restart case) and reports through reload_now.
            {ok, _} = erlmcp_feature_flags:start_link(#{config => Path}),
            {error, Problems} = erlmcp_feature_flags:reload_now(),
            ?assertEqual([<<"a">>, <<"b">>], [F || #{flag := F} <- Problems])
    end.

bad_options_are_refused(Config) ->
    %% doc: unknown options and bad values are errors naming the option.
    process_flag(trap_exit, true),
    Path = write(Config, "ok.json", <<"{}">>),
    ?assertEqual({error, {bad_option, colour}}, erlmcp_feature_flags:start_link(#{config => Path, colour => red})),
    ?assertEqual({error, {bad_option, reload_interval_ms}},
                 erlmcp_feature_flags:start_link(#{config => Path, reload_interval_ms => 0})),
    ?assertMatch({error, {bad_option, etcd, _}}, erlmcp_feature_flags:start_link(#{config => Path, etcd => x})).

reload_now_failure_keeps_last_good(Config) ->
    %% doc: a failed reload_now returns every problem and changes nothing.
    Path = write(Config, "r.json", <<"{\"f\": {\"enabled\": true}}">>),
    {ok, _} = erlmcp_feature_flags:start_link(#{config => Path}),
    ?assert(erlmcp_feature_flags:is_enabled(<<"f">>, #{})),
    ok = file:write_file(Path, <<"{\"f\": {\"enabled\": \"no\"}, \"g\": {\"conditions\": [{\"op\": 1}]}}">>),
    {error, Problems} = erlmcp_feature_flags:reload_now(),
    ?assertEqual([<<"f">>, <<"g">>], [F || #{flag := F} <- Problems]),
    ?assert(erlmcp_feature_flags:is_enabled(<<"f">>, #{})),
    ok = file:write_file(Path, <<"{\"f\": {\"enabled\": false}}">>),
    ok = erlmcp_feature_flags:reload_now(),
    ?assertNot(erlmcp_feature_flags:is_enabled(<<"f">>, #{})).

file_change_is_picked_up(Config) ->
    %% doc: a changed file is reloaded within the check interval, without reload/0.
    Path = write(Config, "w.json", <<"{\"f\": {\"enabled\": false}}">>),
    {ok, _} = erlmcp_feature_flags:start_link(#{config => Path, check_interval_ms => 50}),
    timer:sleep(1100),  % a different mtime second, whatever the filesystem
    ok = file:write_file(Path, <<"{\"f\": {\"enabled\": true}, \"g\": {}}">>),
    ok = wait_until(fun() -> erlmcp_feature_flags:is_enabled(<<"f">>, #{}) end, 5000).

file_replaced_with_same_size_and_mtime_is_picked_up(Config) ->
    %% doc: a config replaced by rename (a new inode) with the same size and mtime
    %% is still a change: the file stamp includes the inode.
    Path = write(Config, "r.json", <<"{\"f\": {\"enabled\": false}}">>),
    {ok, _} = erlmcp_feature_flags:start_link(#{config => Path, check_interval_ms => 50}),
    ?assertNot(erlmcp_feature_flags:is_enabled(<<"f">>, #{})),
    {ok, #file_info{mtime = MTime}} = file:read_file_info(Path, [{time, posix}]),
    Tmp = Path ++ ".tmp",
    ok = file:write_file(Tmp, <<"{\"f\": {\"enabled\": true }}">>),
    ok = file:write_file_info(Tmp, #file_info{mtime = MTime, atime = MTime}, [{time, posix}]),
    ok = file:rename(Tmp, Path),
    ok = wait_until(fun() -> erlmcp_feature_flags:is_enabled(<<"f">>, #{}) end, 3000).

overrides_survive_reloads(Config) ->
    %% doc: enable/disable survive reloads until clear.
    Path = write(Config, "o.json", <<"{\"f\": {\"enabled\": true}, \"g\": {}}">>),
    {ok, _} = erlmcp_feature_flags:start_link(#{config => Path}),
    ok = erlmcp_feature_flags:disable(<<"f">>),
    ok = erlmcp_feature_flags:enable(g),
    ok = file:write_file(Path, <<"{\"f\": {\"enabled\": true}, \"g\": {}, \"h\": {}}">>),
    ok = erlmcp_feature_flags:reload_now(),
    ?assertEqual(#{<<"f">> => false, <<"g">> => true, <<"h">> => false}, erlmcp_feature_flags:get_all()),
    ok = erlmcp_feature_flags:clear(f),
    ok = erlmcp_feature_flags:clear(g),
    ?assertEqual(#{<<"f">> => true, <<"g">> => false, <<"h">> => false}, erlmcp_feature_flags:get_all()).

env_var_overrides(Config) ->
    %% doc: ERLMCP_FEATURE_FLAGS is read at start; a malformed value is refused.
    Path = write(Config, "e.json", <<"{\"mcp_sampling\": {}, \"mcp_tasks\": {\"enabled\": true}}">>),
    os:putenv("ERLMCP_FEATURE_FLAGS", "all_disabled,sampling:enabled"),
    {ok, _} = erlmcp_feature_flags:start_link(#{config => Path}),
    ?assertEqual(#{<<"mcp_sampling">> => true, <<"mcp_tasks">> => false}, erlmcp_feature_flags:get_all()),
    ok = erlmcp_feature_flags:stop(),
    os:putenv("ERLMCP_FEATURE_FLAGS", "sampling:maybe"),
    process_flag(trap_exit, true),
    ?assertMatch({error, {bad_env_overrides, _}}, erlmcp_feature_flags:start_link(#{config => Path})).

restart_keeps_flags_serving(Config) ->
    %% doc: killing the server does not touch the flags; a restart with a broken file keeps them.
    Path = write(Config, "k.json", <<"{\"f\": {\"enabled\": true}}">>),
    {ok, Pid} = erlmcp_feature_flags:start_link(#{config => Path}),
    unlink(Pid),
    exit(Pid, kill),
    ok = wait_until(fun() -> whereis(erlmcp_feature_flags) =:= undefined end, 1000),
    ?assert(erlmcp_feature_flags:is_enabled(<<"f">>, #{})),
    ok = file:write_file(Path, <<"{not json">>),
    {ok, _} = erlmcp_feature_flags:start_link(#{config => Path}),
    ?assert(erlmcp_feature_flags:is_enabled(<<"f">>, #{})),
    ?assertMatch({error, [#{line := 1, column := 2}]}, erlmcp_feature_flags:reload_now()).

custom_conditions_run_in_the_caller(Config) ->
    %% doc: custom funs run in the caller; unregistered or crashing ones are false.
    Path = write(Config, "c.json",
                 <<"{\"beta\": {\"enabled\": true, \"conditions\": [{\"custom\": \"staff\"}, {\"user_id\": \"u-1\"}]}}">>),
    {ok, _} = erlmcp_feature_flags:start_link(#{config => Path}),
    Ctx = #{user_id => <<"u-1">>, email => <<"a@corp">>},
    ?assertNot(erlmcp_feature_flags:is_enabled(beta, Ctx)),
    Self = self(),
    ok = erlmcp_feature_flags:register_condition(staff, fun(#{email := E}) -> Self ! {ran_in, self()}, E =:= <<"a@corp">> end),
    ?assert(erlmcp_feature_flags:is_enabled(beta, Ctx)),
    receive {ran_in, Who} -> ?assertEqual(self(), Who) after 0 -> ct:fail(fun_did_not_run) end,
    ?assertNot(erlmcp_feature_flags:is_enabled(beta, Ctx#{user_id => <<"u-2">>})),
    ?assertNot(erlmcp_feature_flags:is_enabled(beta, #{user_id => <<"u-1">>})), % fun crashes: no email
    ok = erlmcp_feature_flags:unregister_condition(staff),
    ?assertNot(erlmcp_feature_flags:is_enabled(beta, Ctx)).

string_names_are_the_flag_of_that_text(Config) ->
    %% doc: erlmcp's flag_name() includes string(): a string name is the flag
    %% of the same text in every call taking a name (was badarg).
    Path = write(Config, "c.json",
                 <<"{\"beta\": {\"enabled\": true, \"conditions\": [{\"user_id\": \"u-1\"}]},"
                   " \"b\\u00e9ta\": {\"enabled\": true}}">>),
    {ok, _} = erlmcp_feature_flags:start_link(#{config => Path}),
    Ctx = #{user_id => <<"u-1">>},
    ?assert(erlmcp_feature_flags:is_enabled("beta", Ctx)),
    ?assertNot(erlmcp_feature_flags:is_enabled("beta", #{user_id => <<"u-2">>})),
    ?assertNot(erlmcp_feature_flags:is_enabled("beta")),
    ?assert(erlmcp_feature_flags:is_enabled([$b, 16#e9, "ta"])),
    ?assert(erlmcp_feature_flags:is_enabled("b\x{e9}ta", #{})),
    %% unknown: false, or the boolean default
    ?assertNot(erlmcp_feature_flags:is_enabled("gamma", Ctx)),
    ?assert(erlmcp_feature_flags:is_enabled("gamma", true)),
    ok = erlmcp_feature_flags:disable("beta"),
    ?assertNot(erlmcp_feature_flags:is_enabled(<<"beta">>, Ctx)),
    ok = erlmcp_feature_flags:clear("beta"),
    ?assert(erlmcp_feature_flags:is_enabled(beta, Ctx)),
    ?assertMatch(#{<<"result">> := _}, erlmcp_feature_flags:explain("beta", Ctx)),
    %% not text: still badarg
    ?assertError(badarg, erlmcp_feature_flags:is_enabled([{no, text}], Ctx)),
    ?assertError(badarg, erlmcp_feature_flags:is_enabled(42, Ctx)).

%%% Concurrency

flags_json(N, Enabled) ->
    Body = lists:join(<<",">>, [io_lib:format("\"f~b\": {\"enabled\": ~s}", [I, Enabled]) || I <- lists:seq(1, N)]),
    iolist_to_binary([${, Body, $}]).

readers_during_reloads_see_whole_snapshots(Config) ->
    %% doc: 50 readers during 100 reloads: every get_all is all-true or all-false; is_enabled never fails.
    Path = write(Config, "c.json", flags_json(40, true)),
    {ok, _} = erlmcp_feature_flags:start_link(#{config => Path}),
    Parent = self(),
    Stop = make_ref(),
    Readers = [spawn_link(fun() -> reader(Parent, Stop, 0, 0) end) || _ <- lists:seq(1, 50)],
    [begin
         {ok, _} = erlmcp_rollout_nif:flags_load_json(flags_json(40, I rem 2 =:= 0))
     end || I <- lists:seq(1, 100)],
    [R ! Stop || R <- Readers],
    Results = [receive {reader_done, R, Checks, Mixed} -> {Checks, Mixed} end || R <- Readers],
    ?assertEqual(0, lists:sum([M || {_, M} <- Results])),
    ?assert(lists:sum([C || {C, _} <- Results]) > 0).

reader(Parent, Stop, Checks, Mixed) ->
    receive
        Stop -> Parent ! {reader_done, self(), Checks, Mixed}
    after 0 ->
        Values = lists:usort(maps:values(erlmcp_feature_flags:get_all())),
        B = erlmcp_feature_flags:is_enabled(<<"f7">>, #{session_id => <<"s">>}),
        true = is_boolean(B),
        reader(Parent, Stop, Checks + 1, Mixed + (length(Values) - 1))
    end.

hot_code_loading_fails_no_call(Config) ->
    %% doc: loading 8 new versions of erlmcp_feature_flags while 2000 processes call is_enabled/2 fails no call.
    Path = write(Config, "h.json", <<"{\"f\": {\"enabled\": true, \"rollout_percentage\": 50}}">>),
    {ok, _} = erlmcp_feature_flags:start_link(#{config => Path}),
    {erlmcp_feature_flags, Beam, File} = code:get_object_code(erlmcp_feature_flags),
    Parent = self(),
    Stop = make_ref(),
    Callers = [spawn_link(fun() -> caller(Parent, Stop, I, 0, 0) end) || I <- lists:seq(1, 2000)],
    timer:sleep(200),
    [begin
         true = wait_soft_purge(erlmcp_feature_flags, 500),
         {module, erlmcp_feature_flags} = code:load_binary(erlmcp_feature_flags, File, Beam),
         timer:sleep(20)
     end || _ <- lists:seq(1, 8)],
    [C ! Stop || C <- Callers],
    Results = [receive {caller_done, C, Calls, Failures} -> {Calls, Failures} end || C <- Callers],
    Calls = lists:sum([N || {N, _} <- Results]),
    ct:pal("~b calls during 8 code loads", [Calls]),
    ?assertEqual(0, lists:sum([F || {_, F} <- Results])),
    ?assert(Calls > 2000),
    ?assert(is_process_alive(whereis(erlmcp_feature_flags))).

caller(Parent, Stop, I, Calls, Failures) ->
    receive
        Stop -> Parent ! {caller_done, self(), Calls, Failures}
    after 0 ->
        Ctx = #{session_id => integer_to_binary(I * 7919 + Calls)},
        Expected = erlang:phash2(maps:get(session_id, Ctx), 100) < 50,
        Ok = try erlmcp_feature_flags:is_enabled(<<"f">>, Ctx) =:= Expected
             catch _:_ -> false
             end,
        erlang:yield(),
        caller(Parent, Stop, I, Calls + 1, Failures + (case Ok of true -> 0; false -> 1 end))
    end.

wait_soft_purge(_Mod, 0) -> false;
wait_soft_purge(Mod, N) ->
    case code:soft_purge(Mod) of
        true -> true;
        false -> timer:sleep(10), wait_soft_purge(Mod, N - 1)
    end.

nif_stub_reload_fails_safely(Config) ->
    %% doc: code:load_file of the NIF stub under 200 busy callers fails with {upgrade, _} and no call fails.
    Path = write(Config, "u.json", <<"{\"f\": {\"enabled\": true}}">>),
    {ok, _} = erlmcp_feature_flags:start_link(#{config => Path}),
    Parent = self(),
    Stop = make_ref(),
    Callers = [spawn_link(fun() -> upgrade_caller(Parent, Stop, 0, 0, 0) end) || _ <- lists:seq(1, 200)],
    timer:sleep(100),
    ?assertMatch({error, _}, code:load_file(erlmcp_rollout_nif)),
    timer:sleep(100),
    [C ! Stop || C <- Callers],
    Results = [receive {upgrade_done, C, Calls, Crashes, Wrong} -> {Calls, Crashes, Wrong} end || C <- Callers],
    ?assertEqual(0, lists:sum([Cr || {_, Cr, _} <- Results])),
    ?assertEqual(0, lists:sum([W || {_, _, W} <- Results])),
    ?assert(lists:sum([N || {N, _, _} <- Results]) > 200),
    ?assert(erlmcp_feature_flags:is_enabled(f, #{})).

upgrade_caller(Parent, Stop, Calls, Crashes, Wrong) ->
    receive
        Stop -> Parent ! {upgrade_done, self(), Calls, Crashes, Wrong}
    after 0 ->
        {C, W} = try erlmcp_feature_flags:is_enabled(f, #{}) of
                     true -> {0, 0};
                     false -> {0, 1}
                 catch _:_ -> {1, 0}
                 end,
        upgrade_caller(Parent, Stop, Calls + 1, Crashes + C, Wrong + W)
    end.

%%% Helpers

wait_until(Fun, Timeout) when Timeout =< 0 ->
    case Fun() of true -> ok; _ -> {error, timeout} end;
wait_until(Fun, Timeout) ->
    case Fun() of
        true -> ok;
        _ -> timer:sleep(20), wait_until(Fun, Timeout - 20)
    end.
