%% @doc erlmcp_session_backend_hybrid through the real NIF: a dual-write
%% migration between two disk stores (and memory -> disk), phase by phase,
%% with the gates, rollbacks, deletes and the saved phase.
-module(erlmcp_session_hybrid_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").
-compile([export_all, nowarn_export_all]).

all() ->
    [phase_in_etcd_reaches_every_node, phases_end_to_end, gate_refuses_unverified_advance, deletes_are_not_resurrected,
     phase_is_saved_and_authoritative, memory_to_disk, bad_options, live_cutover_from_a_legacy_backend,
     failed_legacy_writes_change_nothing, phase2_fallback_never_returns_the_dead].

init_per_suite(Config) ->
    {ok, _} = application:ensure_all_started(erlmcp_rollout),
    Config.

end_per_suite(_Config) ->
    ok.

init_per_testcase(Case, Config) ->
    Dir = filename:join(?config(priv_dir, Config), atom_to_list(Case)),
    ok = filelib:ensure_path(filename:join(Dir, "state")),
    [{dir, Dir} | Config].

end_per_testcase(_Case, _Config) ->
    ok.

sides(Config) ->
    Dir = ?config(dir, Config),
    {{disk, filename:join(Dir, "old.redb")}, {disk, filename:join(Dir, "new.redb")}}.

init(Config, Phase) ->
    {P, S} = sides(Config),
    erlmcp_session_backend_hybrid:init(#{primary => P, secondary => S, migration_phase => Phase,
                                         state_dir => filename:join(?config(dir, Config), "state"),
                                         shadow_sample => 1}).

%% The secondary store itself (shared with the migrator: same file in this VM).
secondary(Config) ->
    {_, S} = sides(Config),
    {ok, St} = erlmcp_session_native:init(#{store => S}),
    St.

primary(Config) ->
    {P, _} = sides(Config),
    {ok, St} = erlmcp_session_native:init(#{store => P}),
    St.

session(Id, N) ->
    Now = erlang:system_time(millisecond),
    #{id => Id, created_at => Now, last_accessed => Now, timeout_ms => 3600000, metadata => #{n => N}}.

ids(N) -> [<<"h-", (integer_to_binary(I))/binary>> || I <- lists:seq(1, N)].

phases_end_to_end(Config) ->
    %% doc: off -> phase1 (dual write) -> phase2 (gates pass) -> phase3 -> back to phase1.
    {ok, H} = init(Config, phase1),
    Ids = ids(300),
    [{ok, H} = erlmcp_session_backend_hybrid:store(Id, session(Id, 1), H) || Id <- Ids],
    {ok, _Moved} = erlmcp_session_backend_hybrid:drain(10000, H),
    %% reads (after the drain, so shadow reads are not skipped as pending)
    [{ok, #{metadata := #{n := 1}}, H} = erlmcp_session_backend_hybrid:fetch(Id, H) || Id <- Ids],
    Sec = secondary(Config),
    [?assertMatch({ok, #{metadata := #{n := 1}}, Sec}, erlmcp_session_native:get(Id, Sec)) || Id <- Ids],
    {ok, phase1, C1} = erlmcp_session_backend_hybrid:status(H),
    ct:log("phase1 counters ~p", [C1]),
    ?assert(maps:get(<<"shadow_match">>, C1) > 0),
    ?assertEqual(0, maps:get(<<"shadow_mismatch">>, C1)),
    ?assertEqual({ok, phase2}, erlmcp_session_backend_hybrid:advance(H)),
    %% phase 2: writes still go to both; reads come from the secondary
    [{ok, H} = erlmcp_session_backend_hybrid:store(Id, session(Id, 2), H) || Id <- lists:sublist(Ids, 50)],
    [{ok, #{metadata := #{n := 2}}, H} = erlmcp_session_backend_hybrid:fetch(Id, H) || Id <- lists:sublist(Ids, 50)],
    {ok, _} = erlmcp_session_backend_hybrid:drain(10000, H),
    Pri = primary(Config),
    [?assertMatch({ok, #{metadata := #{n := 2}}, Pri}, erlmcp_session_native:get(Id, Pri))
     || Id <- lists:sublist(Ids, 50)],
    ?assertEqual({ok, phase3}, erlmcp_session_backend_hybrid:advance(H)),
    {ok, H} = erlmcp_session_backend_hybrid:store(<<"only-new">>, session(<<"only-new">>, 3), H),
    ?assertMatch({ok, #{metadata := #{n := 3}}, Sec}, erlmcp_session_native:get(<<"only-new">>, Sec)),
    ?assertMatch({error, not_found, Pri}, erlmcp_session_native:get(<<"only-new">>, Pri)),
    {ok, Listed, H} = erlmcp_session_backend_hybrid:list(H),
    ?assertEqual(lists:sort([<<"only-new">> | Ids]), Listed),
    %% phase 3 -> phase 2 needs the reverse outbox (turned on before phase 3): refused here
    ?assertMatch({error, {gate, _}}, erlmcp_session_backend_hybrid:rollback(H)),
    ?assertMatch({ok, phase3, _}, erlmcp_session_backend_hybrid:status(H)).

gate_refuses_unverified_advance(Config) ->
    %% doc: a difference the outbox does not explain blocks phase1 -> phase2; nothing changes.
    {ok, H} = init(Config, phase1),
    Ids = ids(20),
    [{ok, H} = erlmcp_session_backend_hybrid:store(Id, session(Id, 1), H) || Id <- Ids],
    {ok, _} = erlmcp_session_backend_hybrid:drain(10000, H),
    %% written behind the migrator's back, into the primary only
    Pri = primary(Config),
    {ok, Pri} = erlmcp_session_native:store(<<"sneaky">>, session(<<"sneaky">>, 9), Pri),
    {error, {gate, Why}} = erlmcp_session_backend_hybrid:advance(H),
    ct:log("gate said: ~s", [Why]),
    ?assertMatch({ok, phase1, _}, erlmcp_session_backend_hybrid:status(H)),
    %% a backfill (here: a write through the migrator) repairs it, then the gate passes
    {ok, H} = erlmcp_session_backend_hybrid:store(<<"sneaky">>, session(<<"sneaky">>, 9), H),
    {ok, _} = erlmcp_session_backend_hybrid:drain(10000, H),
    ?assertEqual({ok, phase2}, erlmcp_session_backend_hybrid:advance(H)),
    ?assertEqual({ok, phase1}, erlmcp_session_backend_hybrid:rollback(H)),
    ?assertEqual({ok, off}, erlmcp_session_backend_hybrid:rollback(H)).

deletes_are_not_resurrected(Config) ->
    {ok, H} = init(Config, phase1),
    Ids = ids(40),
    [{ok, H} = erlmcp_session_backend_hybrid:store(Id, session(Id, 1), H) || Id <- Ids],
    {Gone, Kept} = lists:split(15, Ids),
    [{ok, H} = erlmcp_session_backend_hybrid:delete(Id, H) || Id <- Gone],
    {ok, _} = erlmcp_session_backend_hybrid:drain(10000, H),
    Sec = secondary(Config),
    [?assertMatch({error, not_found, Sec}, erlmcp_session_native:get(Id, Sec)) || Id <- Gone],
    [?assertMatch({ok, _, Sec}, erlmcp_session_native:get(Id, Sec)) || Id <- Kept],
    ?assertEqual({ok, phase2}, erlmcp_session_backend_hybrid:advance(H)),
    [?assertMatch({error, not_found, H}, erlmcp_session_backend_hybrid:fetch(Id, H)) || Id <- Gone].

phase_is_saved_and_authoritative(Config) ->
    %% doc: the phase lives in state_dir; an init asking for another phase steps there (gated).
    {ok, H} = init(Config, phase1),
    {ok, H} = erlmcp_session_backend_hybrid:store(<<"a">>, session(<<"a">>, 1), H),
    {ok, _} = erlmcp_session_backend_hybrid:drain(10000, H),
    {ok, H2} = init(Config, phase2),
    ?assertMatch({ok, phase2, _}, erlmcp_session_backend_hybrid:status(H)),
    ?assertMatch({ok, phase2, _}, erlmcp_session_backend_hybrid:status(H2)),
    {ok, State} = file:read_file(filename:join([?config(dir, Config), "state", "phase.json"])),
    ?assertNotEqual(nomatch, binary:match(State, <<"phase2">>)),
    {ok, H3} = init(Config, off),
    ?assertMatch({ok, off, _}, erlmcp_session_backend_hybrid:status(H3)).

memory_to_disk(Config) ->
    Dir = ?config(dir, Config),
    {ok, H} = erlmcp_session_backend_hybrid:init(#{primary => memory, name => hybrid_mem,
                                                   secondary => {disk, filename:join(Dir, "new.redb")},
                                                   migration_phase => phase1,
                                                   state_dir => filename:join(Dir, "state")}),
    [{ok, H} = erlmcp_session_backend_hybrid:store(Id, session(Id, 7), H) || Id <- ids(100)],
    ?assertEqual({ok, phase2}, erlmcp_session_backend_hybrid:step_to(phase2, H)),
    [{ok, #{metadata := #{n := 7}}, H} = erlmcp_session_backend_hybrid:fetch(Id, H) || Id <- ids(100)],
    %% The old name is the same gated move; an unknown phase is a clear error.
    ?assertEqual({ok, off}, erlmcp_session_backend_hybrid:set_phase(off, H)),
    ?assertEqual({ok, phase2}, erlmcp_session_backend_hybrid:step_to(phase2, H)),
    ?assertMatch({error, {invalid, _}}, erlmcp_session_backend_hybrid:step_to(phase9, H)).

bad_options(Config) ->
    Dir = ?config(dir, Config),
    ?assertMatch({error, {bad_option, _}}, erlmcp_session_backend_hybrid:init(#{primary => memory})),
    ?assertMatch({error, {unsupported, _}},
                 erlmcp_session_backend_hybrid:init(#{primary => memory, secondary => {legacy_session_ets, #{}},
                                                      state_dir => Dir})),
    ?assertMatch({error, {primary, no_such_backend_xyz, _}},
                 erlmcp_session_backend_hybrid:init(#{primary => {no_such_backend_xyz, #{}}, secondary => memory,
                                                      state_dir => Dir})),
    ?assertMatch({error, {bad_option, _}},
                 erlmcp_session_backend_hybrid:init(#{primary => memory, secondary => memory,
                                                      state_dir => Dir, migration_phase => phase9})),
    ?assertMatch({error, {bad_store, _}},
                 erlmcp_session_backend_hybrid:init(#{primary => {tape, x}, secondary => memory, state_dir => Dir})),
    %% both sides one store: refused at open (it would copy every write onto itself)
    ?assertMatch({error, {bad_store, _}},
                 erlmcp_session_backend_hybrid:init(#{primary => memory, secondary => memory, state_dir => Dir})),
    ?assertMatch({error, {bad_store, _}},
                 erlmcp_session_backend_hybrid:init(#{primary => {memory, same_side}, secondary => {memory, same_side},
                                                      state_dir => Dir})),
    {ok, Plain} = erlmcp_session_native:init(#{}),
    ?assertMatch({error, {invalid, _}}, erlmcp_session_native:migration(advance, 1000, Plain)).

live_cutover_from_a_legacy_backend(Config) ->
    %% doc: DESIGN §5 live cutover: erlmcp keeps running on a legacy backend
    %% (here an ETS backend like erlmcp_session_ets) while its sessions move to a
    %% native disk store: dual-write through the mirror, import of the old
    %% sessions, gate, reads from the new store, legacy writes stop at phase3.
    Dir = ?config(dir, Config),
    Legacy = {legacy_session_ets, #{table_name => cutover_legacy}},
    {ok, L0} = legacy_session_ets:init(#{table_name => cutover_legacy}),
    Old = [<<"old-", (integer_to_binary(I))/binary>> || I <- lists:seq(1, 200)],
    [{ok, _} = legacy_session_ets:store(Id, session(Id, 0), L0) || Id <- Old],
    New = {disk, filename:join(Dir, "new.redb")},
    {ok, H0} = erlmcp_session_backend_hybrid:init(#{primary => Legacy, secondary => New, migration_phase => phase1,
                                                    state_dir => filename:join(Dir, "state")}),
    %% live traffic during the cutover: writes go to the mirror (durably) and to the legacy backend
    {H1, Live} = lists:foldl(fun(I, {H, Acc}) ->
                                     Id = <<"live-", (integer_to_binary(I))/binary>>,
                                     {ok, H2} = erlmcp_session_backend_hybrid:store(Id, session(Id, 1), H),
                                     {H2, [Id | Acc]}
                             end, {H0, []}, lists:seq(1, 50)),
    ?assertMatch([{_, #{metadata := #{n := 1}}}], ets:lookup(cutover_legacy, <<"live-1">>)),
    %% phase1 reads come from the legacy backend
    {ok, #{metadata := #{n := 0}}, H1b} = erlmcp_session_backend_hybrid:fetch(<<"old-1">>, H1),
    %% a delete reaches both sides
    {ok, H1c} = erlmcp_session_backend_hybrid:delete(<<"old-2">>, H1b),
    ?assertEqual([], ets:lookup(cutover_legacy, <<"old-2">>)),
    {ok, _} = erlmcp_session_backend_hybrid:drain(10000, H1c),
    %% copy the sessions that existed before the cutover (write-if-absent)
    {ok, #{copied := Copied, verified := Verified}} =
        erlmcp_session_backend_hybrid:import_legacy({ets, cutover_legacy}, H1c, #{}),
    ct:log("import: copied ~b, verified ~b", [Copied, Verified]),
    ?assertEqual(199 + 50, Verified),
    {ok, _} = erlmcp_session_backend_hybrid:drain(10000, H1c),
    ?assertEqual({ok, phase2}, erlmcp_session_backend_hybrid:advance(H1c)),
    %% phase2: reads from the new store
    {ok, #{metadata := #{n := 1}}, H2} = erlmcp_session_backend_hybrid:fetch(<<"live-7">>, H1c),
    {ok, Ids, H3} = erlmcp_session_backend_hybrid:list(H2),
    ?assertEqual(lists:sort(Live ++ (Old -- [<<"old-2">>])), Ids),
    ?assertMatch({error, not_found, _}, erlmcp_session_backend_hybrid:fetch(<<"old-2">>, H3)),
    ?assertEqual({ok, phase3}, erlmcp_session_backend_hybrid:advance(H3)),
    {ok, H4} = erlmcp_session_backend_hybrid:store(<<"after">>, session(<<"after">>, 3), H3),
    ?assertEqual([], ets:lookup(cutover_legacy, <<"after">>)),
    {ok, #{metadata := #{n := 3}}, _} = erlmcp_session_backend_hybrid:fetch(<<"after">>, H4),
    %% the new store holds everything on its own
    {ok, NS} = erlmcp_session_native:init(#{store => New}),
    {ok, NewIds, NS} = erlmcp_session_native:list(NS),
    ?assertEqual(lists:sort([<<"after">> | Live ++ (Old -- [<<"old-2">>])]), NewIds).

phase2_fallback_never_returns_the_dead(Config) ->
    %% doc: in phase2, a session the native side knows as expired, or as
    %% deleted, is not_found although the legacy backend (which keeps expired
    %% sessions readable until its own cleanup) still has it, and the legacy
    %% copy is not touched back to life; a session the native side never had
    %% (not imported yet) still comes from the legacy backend.
    Dir = ?config(dir, Config),
    Table = fallback_legacy,
    {ok, L0} = legacy_session_ets:init(#{table_name => Table}),
    New = {disk, filename:join(Dir, "new.redb")},
    {ok, H} = erlmcp_session_backend_hybrid:init(#{primary => {legacy_session_ets, #{table_name => Table}},
                                                   secondary => New, migration_phase => phase1,
                                                   state_dir => filename:join(Dir, "state")}),
    Now = erlang:system_time(millisecond),
    Short = #{id => <<"short">>, created_at => Now, last_accessed => Now, timeout_ms => 1000, metadata => #{n => 1}},
    {ok, H} = erlmcp_session_backend_hybrid:store(<<"short">>, Short, H),
    {ok, H} = erlmcp_session_backend_hybrid:store(<<"gone">>, session(<<"gone">>, 2), H),
    {ok, _} = erlmcp_session_backend_hybrid:drain(10000, H),
    ?assertEqual({ok, phase2}, erlmcp_session_backend_hybrid:advance(H)),
    {ok, _} = legacy_session_ets:store(<<"legacy-only">>, session(<<"legacy-only">>, 3), L0),
    %% deleted on the native side only (the hybrid's own native store)
    {ok, _} = erlmcp_session_native:delete(<<"gone">>, element(4, H)),
    ?assertMatch([{_, _}], ets:lookup(Table, <<"gone">>)),
    ?assertMatch({error, not_found, _}, erlmcp_session_backend_hybrid:fetch(<<"gone">>, H)),
    ?assertMatch({ok, #{metadata := #{n := 3}}, _}, erlmcp_session_backend_hybrid:fetch(<<"legacy-only">>, H)),
    ok = erlmcp_rollout_nif:session_set_clock(Now + 5000),
    try
        ?assertMatch({error, not_found, _}, erlmcp_session_backend_hybrid:fetch(<<"short">>, H)),
        ?assertMatch([{_, #{last_accessed := Now}}], ets:lookup(Table, <<"short">>)),
        ?assertEqual({ok, dead}, erlmcp_session_native:known(<<"short">>, element(4, H))),
        ?assertEqual({ok, absent}, erlmcp_session_native:known(<<"legacy-only">>, element(4, H)))
    after
        ok = erlmcp_rollout_nif:session_set_clock(system)
    end.

failed_legacy_writes_change_nothing(Config) ->
    %% doc: the legacy backend fails every 3rd store and delete: each call that
    %% returned an error left every side (legacy, mirror, and after the relay drained,
    %% the secondary) as it was before the call; each call that returned ok is on all.
    Dir = ?config(dir, Config),
    Table = flaky_legacy,
    Legacy = {flaky_legacy_ets, #{table_name => Table, fail_every => 3}},
    New = {disk, filename:join(Dir, "new.redb")},
    {ok, H0} = erlmcp_session_backend_hybrid:init(#{primary => Legacy, secondary => New, migration_phase => phase1,
                                                    state_dir => filename:join(Dir, "state")}),
    Ids = [<<"f-", (integer_to_binary(I))/binary>> || I <- lists:seq(1, 30)],
    %% Expected: Id => what every side must hold (absent | N).
    Step = fun({Op, Id, N}, {H, Want, Errors}) ->
                   Before = maps:get(Id, Want, absent),
                   R = case Op of
                           store -> erlmcp_session_backend_hybrid:store(Id, session(Id, N), H);
                           delete -> erlmcp_session_backend_hybrid:delete(Id, H)
                       end,
                   case R of
                       {ok, H2} when Op =:= store -> {H2, Want#{Id => N}, Errors};
                       {ok, H2} -> {H2, Want#{Id => absent}, Errors};
                       {error, _} -> {H, Want#{Id => Before}, Errors + 1};
                       {error, _, H2} -> {H2, Want#{Id => Before}, Errors + 1}
                   end
           end,
    Ops = [{store, Id, 1} || Id <- Ids] ++ [{store, Id, 2} || Id <- lists:sublist(Ids, 15)]
          ++ [{delete, Id, 0} || Id <- lists:sublist(Ids, 10, 12)],
    {H1, Want, Errors} = lists:foldl(Step, {H0, #{}, 0}, Ops),
    ?assert(Errors >= 15),
    {ok, _} = erlmcp_session_backend_hybrid:drain(10000, H1),
    {ok, Sec} = erlmcp_session_native:init(#{store => New}),
    maps:foreach(
      fun(Id, absent) ->
              ?assertEqual({Id, []}, {Id, ets:lookup(Table, Id)}),
              ?assertMatch({Id, {error, not_found, _}}, {Id, erlmcp_session_native:get(Id, Sec)});
         (Id, N) ->
              ?assertMatch({Id, [{_, #{metadata := #{n := N}}}]}, {Id, ets:lookup(Table, Id)}),
              ?assertMatch({Id, {ok, #{metadata := #{n := N}}, _}}, {Id, erlmcp_session_native:get(Id, Sec)})
      end, Want).

phase_in_etcd_reaches_every_node(Config) ->
    %% doc: with phase_etcd the phase is cluster-wide: node a advances, node b (its own
    %% stores and outbox) applies the change from its etcd watch and acknowledges it; an
    %% advance waits for every expected node's acknowledgement.
    Dir = ?config(dir, Config),
    Script = erlmcp_test_os:script("etcd-cluster"),
    EtcdDir = filename:join(Dir, "etcd"),
    {0, _} = run(Script, ["start", EtcdDir]),
    try
        {ok, Eps} = file:read_file(filename:join(EtcdDir, "endpoints")),
        Endpoints = binary:split(string:trim(Eps), <<",">>, [global]),
        Node = fun(Name) ->
                       NDir = filename:join(Dir, atom_to_list(Name)),
                       ok = filelib:ensure_path(filename:join(NDir, "x")),
                       {ok, H} = erlmcp_session_backend_hybrid:init(
                                   #{primary => {disk, filename:join(NDir, "old.redb")},
                                     secondary => {disk, filename:join(NDir, "new.redb")},
                                     state_dir => NDir,
                                     phase_etcd => #{endpoints => Endpoints, node => Name,
                                                     prefix => <<"ct/migration/">>, expect_nodes => [a, b]}}),
                       H
               end,
        A = Node(a),
        B = Node(b),
        ?assertMatch({ok, off, _}, erlmcp_session_backend_hybrid:status(B)),
        %% refused until b's watcher has acknowledged the phase it applies (off)
        advance_when_acked(A, phase1, erlang:monotonic_time(millisecond) + 3000),
        T0 = erlang:monotonic_time(millisecond),
        wait_phase(B, phase1, T0 + 1000),
        ct:log("node b applied phase1 ~b ms after node a's advance returned", [erlang:monotonic_time(millisecond) - T0]),
        %% both nodes dual-write; a's advance passes once both acknowledged phase1
        {ok, A} = erlmcp_session_backend_hybrid:store(<<"x">>, session(<<"x">>, 1), A),
        {ok, _} = erlmcp_session_backend_hybrid:drain(10000, A),
        advance_when_acked(A, phase2, erlang:monotonic_time(millisecond) + 3000),
        wait_phase(B, phase2, erlang:monotonic_time(millisecond) + 1000)
    after
        run(Script, ["stop", EtcdDir])
    end.

advance_when_acked(H, To, Deadline) ->
    case erlmcp_session_backend_hybrid:advance(H) of
        {ok, To} -> ok;
        {error, {gate, Why}} = E ->
            erlang:monotonic_time(millisecond) < Deadline orelse ct:fail({gate_never_opened, E}),
            %% The only refusal allowed here: some node (the advancing one included: its
            %% own watcher acknowledges too) has not acknowledged the current phase yet.
            binary:match(Why, <<"not every node applies">>) =/= nomatch orelse ct:fail({unexpected_gate, E}),
            timer:sleep(10),
            advance_when_acked(H, To, Deadline)
    end.

wait_phase(H, Phase, Deadline) ->
    case erlmcp_session_backend_hybrid:status(H) of
        {ok, Phase, _} -> ok;
        Other ->
            erlang:monotonic_time(millisecond) < Deadline orelse ct:fail({phase_not_applied, Phase, Other}),
            timer:sleep(5),
            wait_phase(H, Phase, Deadline)
    end.

run(Exe, Args) ->
    erlmcp_test_os:run(Exe, Args).
