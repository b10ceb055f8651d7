%% @doc The benches' view of normal-scheduler stretches: a collector process
%% made the VM's long_schedule monitor (the VM does not report the monitoring
%% process's own stretches, so the calling process cannot be the monitor), and
%% the longest report since the last look.
-module(erlmcp_bench_monitor).
-export([start/1, longest/0]).

%% @doc Reports every stretch of `Ms' or more of any process from now on.
-spec start(pos_integer()) -> ok.
start(Ms) ->
    Collector = spawn_link(fun() -> collect(none) end),
    put(?MODULE, Collector),
    _ = erlang:system_monitor(Collector, [{long_schedule, Ms}]),
    ok.

%% @doc The longest stretch reported since the last call (ms), or `none'.
-spec longest() -> non_neg_integer() | none.
longest() ->
    %% A report is sent when the long stretch ends; let it arrive first.
    timer:sleep(50),
    Ref = make_ref(),
    get(?MODULE) ! {take, self(), Ref},
    receive {Ref, Longest} -> Longest end.

collect(Acc) ->
    receive
        {monitor, Who, long_schedule, Info} ->
            T = proplists:get_value(timeout, Info),
            %% ERLMCP_BENCH_STRETCHES=1: each report, for attributing it.
            _ = os:getenv("ERLMCP_BENCH_STRETCHES") =:= "1" andalso
                io:format(standard_error, "  stretch ~b ms: ~p ~p~n", [T, Who, Info]),
            collect(case Acc of none -> T; _ -> max(Acc, T) end);
        {take, From, Ref} ->
            From ! {Ref, Acc},
            collect(none)
    end.
