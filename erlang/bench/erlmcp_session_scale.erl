%% @doc Scale run of `erlmcp_session_native' (scripts/bench-erlang-scale): N
%% sessions through every call kind of one store (memory or disk), and per
%% call kind the wall time and the longest normal-scheduler stretch that
%% erlang:system_monitor(Collector, [{long_schedule, 10}]) reported while it
%% ran (any process of the VM; the collector is its own process, since the VM
%% does not report the monitoring process's own stretches).
-module(erlmcp_session_scale).
-export([main/1]).

-define(WRITERS, 8).
-define(CHUNK, 10000).

main(Args) ->
    try run(Args)
    catch Class:Reason:Stack ->
            io:format(standard_error, "scale run failed: ~p:~p~n~p~n", [Class, Reason, Stack]),
            halt(1)
    end.

run([NStr, KindStr, Dir]) ->
    N = list_to_integer(NStr),
    {ok, _} = application:ensure_all_started(erlmcp_rollout),
    T0 = erlang:system_time(millisecond),
    ok = erlmcp_rollout_nif:session_set_clock(T0),
    Spec = case KindStr of
               "memory" -> #{store => memory, name => scale_bench};
               "disk" -> #{store => {disk, filename:join(Dir, "scale.redb")}};
               %% scripts/etcd-cluster wrote the members' URLs there.
               "etcd" -> #{store => {etcd, etcd_endpoints(Dir)}}
           end,
    {ok, S} = erlmcp_session_native:init(Spec),
    ok = erlmcp_bench_monitor:start(10),
    M = max(1, N div 10),
    Tenth = [id(<<"s-">>, I) || I <- lists:seq(1, M)],
    New = [id(<<"n-">>, I) || I <- lists:seq(1, M)],
    Ets = ets:new(scale_control, [set, public, {write_concurrency, true}, {read_concurrency, true}]),
    Control = fun() -> parallel(<<"s-">>, N, fun(Id) -> true = ets:insert(Ets, {Id, session(Id, T0)}) end) end,
    Phases =
        %% The control: the same writes into ETS, no NIF involved. A stretch
        %% here is the VM's or the OS's (preemption on a loaded 2-core host),
        %% the yardstick for the NIF's stretches below.
        [{"control: ets:insert/2 (no NIF)", N, Control},
         {"store/3", N, fun() -> parallel(<<"s-">>, N, fun(Id) -> {ok, S} = erlmcp_session_native:store(Id, session(Id, T0), S) end) end},
         {"fetch/2", N, fun() -> parallel(<<"s-">>, N, fun(Id) -> {ok, _, S} = erlmcp_session_native:fetch(Id, S) end) end},
         {"get/2", M, fun() -> parallel(<<"s-">>, M, fun(Id) -> {ok, _, S} = erlmcp_session_native:get(Id, S) end) end},
         {"stored_many/2 (10k ids a call)", M,
          fun() -> [{ok, _} = erlmcp_session_native:stored_many(C, S) || C <- chunks(Tenth)] end},
         {"apply_batch/2 (10k records a call)", M,
          fun() ->
                  [{ok, _, 0} = erlmcp_session_native:apply_batch([{Id, native(Id, T0), 1} || Id <- C], S)
                   || C <- chunks(New)]
          end},
         {"list/1", 1, fun() -> {ok, L, S} = erlmcp_session_native:list(S), true = length(L) =:= N + M end},
         {"delete/2", M, fun() -> parallel(<<"s-">>, M, fun(Id) -> {ok, S} = erlmcp_session_native:delete(Id, S) end) end},
         {"cleanup_expired/1 (all expired)", 1,
          fun() ->
                  ok = erlmcp_rollout_nif:session_set_clock(T0 + 120000),
                  {ok, _, S} = erlmcp_session_native:cleanup_expired(S)
          end},
         {"list/1 after cleanup", 1,
          fun() ->
                  {ok, Left, S} = erlmcp_session_native:list(S),
                  %% etcd expires by its own leases, on etcd's clock, not the pinned one.
                  true = Left =:= [] orelse KindStr =:= "etcd"
          end},
         {"control again: ets:insert/2 (no NIF)", N,
          fun() -> true = ets:delete_all_objects(Ets), Control() end}],
    io:format("~s store, ~b sessions, ~b writer processes, OTP ~s, ~b schedulers~n",
              [KindStr, N, ?WRITERS, erlang:system_info(otp_release), erlang:system_info(schedulers)]),
    io:format("~-36s ~10s ~12s ~14s~n", ["call", "calls", "wall ms", "longest ms"]),
    _ = erlmcp_bench_monitor:longest(),
    lists:foreach(fun({Name, Calls, F}) ->
                          true = erlang:garbage_collect(),
                          T = erlang:monotonic_time(microsecond),
                          _ = F(),
                          Ms = (erlang:monotonic_time(microsecond) - T) / 1000,
                          io:format("~-36s ~10b ~12.1f ~14s~n", [Name, Calls, Ms, fmt(erlmcp_bench_monitor:longest())])
                  end, Phases),
    halt(0).

id(Prefix, I) -> <<Prefix/binary, (integer_to_binary(I))/binary>>.

etcd_endpoints(Dir) ->
    {ok, Text} = file:read_file(filename:join([Dir, "etcd", "endpoints"])),
    binary:split(string:trim(Text), <<",">>, [global, trim_all]).

session(Id, Now) ->
    #{id => Id, created_at => Now, last_accessed => Now, timeout_ms => 60000,
      metadata => #{user => Id, tag => <<"x">>}}.

native(Id, Now) ->
    {ok, F} = erlmcp_session_native:to_native(Id, session(Id, Now)),
    F.

chunks([]) -> [];
chunks(L) when length(L) =< ?CHUNK -> [L];
chunks(L) ->
    {A, B} = lists:split(?CHUNK, L),
    [A | chunks(B)].

%% Runs F on the ids Prefix ++ 1..Count, spread over ?WRITERS processes,
%% each of which makes its own ids: nothing large is copied at spawn, since a
%% copied id list would be a long stretch of the spawning process (the bench's
%% own, not the store's). A crash of one stops the run with its reason.
parallel(Prefix, Count, F) ->
    Per = (Count + ?WRITERS - 1) div ?WRITERS,
    Monitors = [spawn_monitor(fun() -> each(F, Prefix, First, min(Count, First + Per - 1)) end)
                || First <- lists:seq(1, Count, max(1, Per))],
    [receive
         {'DOWN', Ref, process, Pid, normal} -> ok;
         {'DOWN', Ref, process, Pid, Reason} -> erlang:error({worker_failed, Reason})
     end || {Pid, Ref} <- Monitors],
    ok.

each(_F, _Prefix, I, Last) when I > Last -> ok;
each(F, Prefix, I, Last) ->
    _ = F(id(Prefix, I)),
    each(F, Prefix, I + 1, Last).

fmt(none) -> "none";
fmt(Ms) -> integer_to_list(Ms).
