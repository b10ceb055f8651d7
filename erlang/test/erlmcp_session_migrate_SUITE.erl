%% @doc Legacy cutover through the real NIF: DETS files, Mnesia tables and
%% live ETS tables made by real Erlang in erlmcp's formats, imported into
%% native stores, read back identical; re-runs, newer target data, corrupt
%% sources, unreachable targets; draining a live service.
-module(erlmcp_session_migrate_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").
-compile([export_all, nowarn_export_all]).

all() ->
    [dets_into_disk, dets_into_memory, ets_into_disk, mnesia_into_disk, rerun_copies_nothing_twice,
     newer_target_data_is_kept, corrupt_dets_changes_nothing, bad_target_is_reported,
     invalid_objects_are_listed, drain_a_live_service, cutover_arguments, cutover_command_end_to_end].

init_per_suite(Config) ->
    {ok, _} = application:ensure_all_started(erlmcp_rollout),
    Config.

end_per_suite(_Config) ->
    ok.

init_per_testcase(_Case, Config) ->
    ok = erlmcp_rollout_nif:session_set_clock(system),
    Config.

end_per_testcase(mnesia_into_disk, _Config) ->
    stopped = mnesia:stop(),
    ok;
end_per_testcase(_Case, _Config) ->
    ok.

%%% erlmcp-format data

now_ms() -> erlang:system_time(millisecond).

%% N sessions in erlmcp's shape with varied metadata, plus (when asked) some
%% already expired and some in shapes erlmcp tests use.
sessions(N) ->
    Now = now_ms(),
    [{Id, #{id => Id, created_at => Now - 1000, last_accessed => Now - I, timeout_ms => 3600000,
            metadata => #{n => I, user => <<"u", (integer_to_binary(I))/binary>>, tags => [a, {b, I}],
                          blob => crypto:strong_rand_bytes(I rem 64)}}}
     || I <- lists:seq(1, N), Id <- [<<"sess-", (integer_to_binary(I))/binary>>]]
    ++ [{<<"odd-shape">>, #{data => failover_test}}, {<<255, 0>>, #{}}].

expired_sessions() ->
    Now = now_ms(),
    [{<<"old-", (integer_to_binary(I))/binary>>,
      #{id => <<"old">>, created_at => 0, last_accessed => Now - 100000, timeout_ms => 1000, metadata => #{}}}
     || I <- lists:seq(1, 7)].

make_dets(Path, Objects) ->
    %% As erlmcp_session_dets does: a set of {Id, Session}.
    {ok, T} = dets:open_file(make_ref(), [{file, Path}, {type, set}]),
    ok = dets:insert(T, Objects),
    ok = dets:close(T).

disk(Config, Name) ->
    {disk, filename:join(?config(priv_dir, Config), Name)}.

assert_all_present(Target, Objects) ->
    {ok, S} = erlmcp_session_native:init(#{store => Target}),
    lists:foreach(
      fun({Id, Session}) ->
              Want = Session#{last_accessed => maps:get(last_accessed, Session, any)},
              case erlmcp_session_native:get(Id, S) of
                  {ok, Got, S} when map_get(last_accessed, Want) =:= any ->
                      ?assertEqual(maps:remove(last_accessed, Want), maps:remove(last_accessed, Got));
                  {ok, Got, S} ->
                      ?assertEqual(Want, Got);
                  Other ->
                      ct:fail({missing, Id, Other})
              end
      end, Objects),
    S.

%%% Cases

dets_into_disk(Config) ->
    %% doc: a DETS file in erlmcp's format -> disk store; identical read-back; expired ones not copied.
    Dets = filename:join(?config(priv_dir, Config), "legacy.dets"),
    Live = sessions(1500),
    make_dets(Dets, Live ++ expired_sessions()),
    Target = disk(Config, "from_dets.redb"),
    Self = self(),
    {ok, Report} = erlmcp_session_migrate:import({dets, Dets}, Target,
                                                 #{progress => fun(P) -> Self ! {progress, P} end}),
    N = length(Live),
    ?assertMatch(#{read := _, copied := N, skipped := 0, expired := 7, invalid := [], verified := N,
                   newer := 0, mismatched := []}, Report),
    ?assertEqual(N + 7, maps:get(read, Report)),
    Progress = flush_progress([]),
    ?assert(length(Progress) >= 3),
    #{total := Total, eta_s := _, rate := Rate} = lists:last(Progress),
    ?assertEqual(N + 7, Total),
    ?assert(Rate > 0),
    _ = assert_all_present(Target, Live).

flush_progress(Acc) ->
    receive {progress, P} -> flush_progress([P | Acc])
    after 0 -> lists:reverse(Acc)
    end.

dets_into_memory(Config) ->
    Dets = filename:join(?config(priv_dir, Config), "legacy_mem.dets"),
    Live = sessions(200),
    make_dets(Dets, Live),
    {ok, #{copied := 202, verified := 202}} =
        erlmcp_session_migrate:import({dets, list_to_binary(Dets)}, {memory, #{name => from_dets}}, #{}),
    {ok, S} = erlmcp_session_native:init(#{store => memory, name => from_dets}),
    ?assertEqual({ok, lists:sort([Id || {Id, _} <- Live]), S}, erlmcp_session_native:list(S)).

ets_into_disk(Config) ->
    T = ets:new(erlmcp_sessions_ets, [ordered_set, public]),
    Live = sessions(700),
    true = ets:insert(T, Live ++ expired_sessions()),
    Target = disk(Config, "from_ets.redb"),
    {ok, #{copied := 702, expired := 7, verified := 702, mismatched := []}} =
        erlmcp_session_migrate:import({ets, T}, Target, #{batch_size => 100}),
    _ = assert_all_present(Target, Live).

mnesia_into_disk(Config) ->
    %% doc: erlmcp's Mnesia table: records {erlmcp_session, Id, SessionMap, LastAccessed}, disc_copies.
    Dir = filename:join(?config(priv_dir, Config), "mnesia"),
    ok = filelib:ensure_path(Dir),
    ok = application:set_env(mnesia, dir, Dir),
    ok = mnesia:create_schema([node()]),
    ok = mnesia:start(),
    {atomic, ok} = mnesia:create_table(erlmcp_session, [{disc_copies, [node()]},
                                                        {attributes, [session_id, session_data, last_accessed]}]),
    ok = mnesia:wait_for_tables([erlmcp_session], 10000),
    Live = sessions(900),
    {atomic, ok} = mnesia:transaction(
                     fun() ->
                             lists:foreach(fun({Id, S}) ->
                                                   mnesia:write({erlmcp_session, Id, S,
                                                                 maps:get(last_accessed, S, 0)})
                                           end, Live ++ expired_sessions())
                     end),
    Target = disk(Config, "from_mnesia.redb"),
    {ok, #{copied := 902, expired := 7, verified := 902, mismatched := []}} =
        erlmcp_session_migrate:import({mnesia, erlmcp_session}, Target, #{}),
    _ = assert_all_present(Target, Live),
    ?assertMatch({error, {source, {mnesia, nope}, _}},
                 erlmcp_session_migrate:import({mnesia, nope}, Target, #{})).

rerun_copies_nothing_twice(Config) ->
    %% doc: import is write-if-absent: a second run (or a resumed one) copies nothing again.
    Dets = filename:join(?config(priv_dir, Config), "rerun.dets"),
    make_dets(Dets, sessions(300)),
    Target = disk(Config, "rerun.redb"),
    {ok, #{copied := 302, skipped := 0}} = erlmcp_session_migrate:import({dets, Dets}, Target, #{}),
    {ok, #{copied := 0, skipped := 302, verified := 302, mismatched := []}} =
        erlmcp_session_migrate:import({dets, Dets}, Target, #{}).

newer_target_data_is_kept(Config) ->
    %% doc: a session the new store already has (written since) is never overwritten by the import.
    Target = disk(Config, "newer.redb"),
    {ok, S} = erlmcp_session_native:init(#{store => Target}),
    Now = now_ms(),
    New = #{id => <<"sess-1">>, created_at => Now, last_accessed => Now, timeout_ms => 3600000,
            metadata => #{written_by => new_code}},
    {ok, S} = erlmcp_session_native:store(<<"sess-1">>, New, S),
    {ok, S} = erlmcp_session_native:store(<<"sess-1">>, New, S),   % version 2
    Dets = filename:join(?config(priv_dir, Config), "newer.dets"),
    make_dets(Dets, sessions(5)),
    {ok, #{copied := 6, skipped := 1, verified := 6, newer := 1}} =
        erlmcp_session_migrate:import({dets, Dets}, Target, #{}),
    ?assertEqual({ok, New, S}, erlmcp_session_native:get(<<"sess-1">>, S)).

corrupt_dets_changes_nothing(Config) ->
    Bad = filename:join(?config(priv_dir, Config), "corrupt.dets"),
    ok = file:write_file(Bad, crypto:strong_rand_bytes(4096)),
    Target = disk(Config, "corrupt_target.redb"),
    ?assertMatch({error, {source, {dets, Bad}, _}}, erlmcp_session_migrate:import({dets, Bad}, Target, #{})),
    ?assertMatch({error, {source, {dets, _}, _}},
                 erlmcp_session_migrate:import({dets, "/nonexistent/x.dets"}, Target, #{})),
    {ok, S} = erlmcp_session_native:init(#{store => Target}),
    ?assertEqual({ok, [], S}, erlmcp_session_native:list(S)).

bad_target_is_reported(Config) ->
    Dets = filename:join(?config(priv_dir, Config), "bad_target.dets"),
    make_dets(Dets, sessions(3)),
    ?assertMatch({error, {target, {bad_store, _}}},
                 erlmcp_session_migrate:import({dets, Dets}, {disk, "/nonexistent/dir/x.redb"}, #{})),
    ?assertMatch({error, {target, {bad_store, _}}}, erlmcp_session_migrate:import({dets, Dets}, {tape, x}, #{})),
    ?assertMatch({error, {bad_source, _}}, erlmcp_session_migrate:import({csv, "x"}, memory, #{})),
    ?assertMatch({error, {bad_option, options, _}}, erlmcp_session_migrate:import({dets, Dets}, memory, [])).

invalid_objects_are_listed(_Config) ->
    %% doc: objects that are not sessions are listed with the reason, and the rest is copied.
    T = ets:new(mixed, [set, public]),
    Now = now_ms(),
    true = ets:insert(T, [{<<"good">>, #{id => <<"good">>, created_at => Now, last_accessed => Now,
                                          timeout_ms => 60000, metadata => #{}}},
                          {not_a_binary_id, #{}},
                          {<<"not-a-map">>, [1, 2]},
                          {<<"bad-timeout">>, #{timeout_ms => -5}}]),
    {ok, #{copied := 1, invalid := Invalid, verified := 1}} =
        erlmcp_session_migrate:import({ets, T}, {memory, #{name => mixed}}, #{}),
    ?assertEqual([not_a_binary_id, <<"bad-timeout">>, <<"not-a-map">>], lists:sort([K || {K, _} <- Invalid])),
    [?assert(is_binary(Why)) || {_, Why} <- Invalid].

drain_a_live_service(Config) ->
    %% doc: writers keep storing through a legacy service while it is drained;
    %% every store the service acknowledged is in the target afterwards.
    Tab = ets:new(drained, [ordered_set, public]),
    Parent = self(),
    Server = spawn_link(fun() -> legacy_loop(Parent, Tab) end),
    Writers = [spawn_link(fun() -> writer(Server, W, 0, Parent) end) || W <- lists:seq(1, 8)],
    timer:sleep(200),
    Target = disk(Config, "drained.redb"),
    {ok, Report} = erlmcp_session_migrate:drain(Server, {{ets, Tab}, Target}, #{timeout => 2000}),
    %% The service is suspended: writers are stuck in their calls; stop them.
    [begin unlink(W), exit(W, kill) end || W <- Writers],
    Acked = collect_acks([]),
    ct:log("drain report ~p, ~b acknowledged stores", [Report, length(Acked)]),
    ?assert(length(Acked) > 0),
    {ok, S} = erlmcp_session_native:init(#{store => Target}),
    [?assertMatch({ok, #{metadata := #{n := _}}, S}, erlmcp_session_native:get(Id, S)) || Id <- Acked],
    ?assertMatch({error, {no_server, _}},
                 erlmcp_session_migrate:drain(no_such_server, {{ets, Tab}, Target}, #{})),
    unlink(Server),
    exit(Server, kill).

%% A stand-in for erlmcp_session_backend's gen_server (answers calls and
%% system messages): stores into ETS on a call.
legacy_loop(Parent, Tab) ->
    receive
        {'$gen_call', From, {store, Id, S}} ->
            true = ets:insert(Tab, {Id, S}),
            gen:reply(From, ok),
            legacy_loop(Parent, Tab);
        {system, From, Req} ->
            sys:handle_system_msg(Req, From, Parent, ?MODULE, [], Tab)
    end.

system_continue(Parent, _Debug, Tab) -> legacy_loop(Parent, Tab).
system_terminate(Reason, _Parent, _Debug, _Tab) -> exit(Reason).
system_code_change(Tab, _Module, _OldVsn, _Extra) -> {ok, Tab}.

writer(Server, W, N, Parent) ->
    Id = iolist_to_binary(io_lib:format("w~b-~b", [W, N])),
    Now = now_ms(),
    ok = gen_server:call(Server, {store, Id, #{id => Id, created_at => Now, last_accessed => Now,
                                               timeout_ms => 600000, metadata => #{n => N}}}, infinity),
    Parent ! {acked, Id},
    writer(Server, W, N + 1, Parent).

collect_acks(Acc) ->
    receive {acked, Id} -> collect_acks([Id | Acc])
    after 100 -> Acc
    end.

%%% The cutover command

cutover_arguments(_Config) ->
    %% doc: every bad command line is refused with the reason.
    P = fun erlmcp_session_cutover:parse_args/1,
    ?assertMatch({ok, #{source := {dets, "a.dets"}, target := {disk, "b.redb"}}},
                 P(["--dets", "a.dets", "--to", "disk:b.redb"])),
    ?assertMatch({ok, #{source := {mnesia, erlmcp_session}, mnesia_dir := "M"}},
                 P(["--mnesia-dir", "M", "--to", "disk:b.redb"])),
    ?assertMatch({ok, #{source := {mnesia, sessions}}}, P(["--mnesia-dir", "M", "--table", "sessions", "--to", "memory:"])),
    ?assertMatch({ok, #{target := {{etcd, [<<"127.0.0.1:2379">>, <<"h:1">>]}, #{prefix := <<"p">>}}}},
                 P(["--dets", "a", "--to", "etcd:127.0.0.1:2379,h:1/p"])),
    [?assertMatch({error, _}, P(A))
     || A <- [[], ["--dets", "a"], ["--to", "disk:x"], ["--dets", "a", "--mnesia-dir", "m", "--to", "disk:x"],
              ["--dets", "a", "--to", "tape:x"], ["--dets", "a", "--to", "disk:"], ["--dets", "a", "--to"],
              ["--dets", "a", "--to", "etcd:host"], ["--dets", "a", "--to", "etcd:h:99999"],
              ["--dets", "a", "--to", "disk:x", "--batch", "0"], ["--dets", "a", "--to", "disk:x", "--frobnicate"]]].

cutover_command_end_to_end(Config) ->
    %% doc: scripts/session-cutover imports a legacy DETS file; exit status 0, JSON report.
    Dets = filename:join(?config(priv_dir, Config), "cutover.dets"),
    Live = sessions(250),
    make_dets(Dets, Live),
    Target = filename:join(?config(priv_dir, Config), "cutover.redb"),
    {0, Out} = run_script(["--dets", Dets, "--to", "disk:" ++ Target, "--json"]),
    Last = lists:last(string:lexemes(Out, "\n")),
    ?assertNotEqual(nomatch, string:find(Last, "\"copied\":252")),
    ?assertNotEqual(nomatch, string:find(Last, "\"verified\":252")),
    %% The command's VM has exited: the file is free to open here.
    {Pid, Mon} = spawn_monitor(fun() -> assert_all_present({disk, Target}, Live) end),
    receive {'DOWN', Mon, process, Pid, R} -> ?assertEqual(normal, R) end,
    %% The last handle's store is closed by the NIF's reaper thread shortly after
    %% the process above exited: until then the file is still locked.
    {1, Err} = until_released(fun() -> run_script(["--dets", "/nonexistent.dets", "--to", "disk:" ++ Target]) end, 50),
    ct:log("~s", [Err]),
    ?assertNotEqual(nomatch, string:find(Err, "nonexistent")),
    {1, _} = run_script(["--to", "disk:" ++ Target]).

until_released(Run, Tries) ->
    case Run() of
        {1, Out} when Tries > 1 ->
            case string:find(Out, "unavailable") of
                nomatch -> {1, Out};
                _ -> timer:sleep(100), until_released(Run, Tries - 1)
            end;
        Other -> Other
    end.

run_script(Args) ->
    {St, Out} = erlmcp_test_os:run(erlmcp_test_os:script("session-cutover"), Args),
    {St, binary_to_list(Out)}.
