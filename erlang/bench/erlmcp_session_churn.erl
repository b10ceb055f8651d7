%% @doc Churn figures of a memory store (erlmcp's ETS replacement), run by
%% scripts/bench-erlang-churn: fill N short-lived sessions, expire them,
%% cleanup_expired/1, fill N new ones; prints the VM's RSS growth of each
%% fill, list/1 time over the cleaned store (0 live) and over 1000 live
%% sessions, and the longest normal-scheduler stretch seen by
%% erlang:system_monitor(self(), [{long_schedule, 10}]) per phase.
-module(erlmcp_session_churn).
-export([main/1]).

main([NStr]) ->
    N = list_to_integer(NStr),
    {ok, _} = application:ensure_all_started(erlmcp_rollout),
    T0 = erlang:system_time(millisecond),
    ok = erlmcp_rollout_nif:session_set_clock(T0),
    {ok, S} = erlmcp_session_native:init(#{store => memory, name => churn_bench}),
    ok = erlmcp_bench_monitor:start(10),
    Rss0 = rss(),
    {FillMs1, _} = timed(fun() -> fill(S, <<"a-">>, N, T0) end),
    Long1 = erlmcp_bench_monitor:longest(),
    Rss1 = rss(),
    ok = erlmcp_rollout_nif:session_set_clock(T0 + 61000),
    {ListDeadMs, {ok, [], S}} = timed(fun() -> erlmcp_session_native:list(S) end),
    {CleanMs, {ok, Expired, S}} = timed(fun() -> erlmcp_session_native:cleanup_expired(S) end),
    LongClean = erlmcp_bench_monitor:longest(),
    {ListCleanMs, {ok, [], S}} = timed(fun() -> erlmcp_session_native:list(S) end),
    Rss2 = rss(),
    {FillMs2, _} = timed(fun() -> fill(S, <<"b-">>, N, T0 + 61000) end),
    Long2 = erlmcp_bench_monitor:longest(),
    Rss3 = rss(),
    ok = erlmcp_rollout_nif:session_set_clock(T0 + 200000),
    {ok, _, S} = erlmcp_session_native:cleanup_expired(S),
    fill(S, <<"c-">>, 1000, T0 + 200000),
    {List1000Ms, {ok, L1000, S}} = timed(fun() -> erlmcp_session_native:list(S) end),
    1000 = length(L1000),
    LongList = erlmcp_bench_monitor:longest(),
    io:format("sessions per fill: ~b~n", [N]),
    io:format("fill 1: ~.1f s, RSS +~.1f MiB; fill 2 (after expiry + cleanup_expired): ~.1f s, RSS +~.1f MiB; "
              "ratio ~.2f~n", [FillMs1 / 1000, mib(Rss1 - Rss0), FillMs2 / 1000, mib(Rss3 - Rss2),
                               (Rss3 - Rss2) / max(1, Rss1 - Rss0)]),
    io:format("RSS above the start: ~.1f MiB after fill 1, ~.1f MiB after cleanup, ~.1f MiB after fill 2 "
              "(~.2f of fill 1's)~n", [mib(Rss1 - Rss0), mib(Rss2 - Rss0), mib(Rss3 - Rss0),
                                       (Rss3 - Rss0) / max(1, Rss1 - Rss0)]),
    io:format("cleanup_expired/1: ~b expired in ~.1f ms~n", [Expired, CleanMs]),
    io:format("list/1: ~.2f ms with ~b expired not yet cleaned, ~.2f ms with 0 live after cleanup, "
              "~.2f ms with 1000 live~n", [ListDeadMs, N, ListCleanMs, List1000Ms]),
    io:format("longest normal-scheduler stretch (long_schedule >= 10 ms reports): store/3 fills ~s / ~s, "
              "list+cleanup ~s, list 1000 ~s~n", [fmt(Long1), fmt(Long2), fmt(LongClean), fmt(LongList)]),
    halt(0).

fill(S, Prefix, N, Now) ->
    lists:foreach(fun(I) ->
                          Id = <<Prefix/binary, (integer_to_binary(I))/binary>>,
                          {ok, S} = erlmcp_session_native:store(
                                      Id, #{id => Id, created_at => Now, last_accessed => Now,
                                            timeout_ms => 60000, metadata => #{user => I, tag => <<"x">>}}, S)
                  end, lists:seq(1, N)).

%% The caller's own garbage (the fill's lists) is collected first, so that a
%% collection it would trigger is not counted as the call's time.
timed(F) ->
    true = erlang:garbage_collect(),
    T = erlang:monotonic_time(microsecond),
    R = F(),
    {(erlang:monotonic_time(microsecond) - T) / 1000, R}.

fmt(none) -> "none";
fmt(Ms) -> io_lib:format("~b ms", [Ms]).

rss() ->
    {ok, B} = file:read_file("/proc/self/status"),
    [Line] = [L || L <- binary:split(B, <<"\n">>, [global]), binary:match(L, <<"VmRSS:">>) =/= nomatch],
    [_, Kb | _] = binary:split(Line, [<<" ">>, <<"\t">>], [global, trim_all]),
    binary_to_integer(Kb) * 1024.

mib(Bytes) -> Bytes / 1048576.
