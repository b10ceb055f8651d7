%% @doc What reaping a big memory store leaves behind (scripts/bench-erlang-reap):
%% one process per scheduler fills a memory store (200k sessions each, 200-byte
%% metadata) and exits, so the store's last handle is garbage collected and the
%% reaper thread frees the records; 3 s later a fresh store's first `store/3'
%% with 4 KiB of metadata is timed on each scheduler, then a second one (the
%% same-run baseline), and the VM's RSS is printed.
-module(erlmcp_session_reap).
-export([main/1]).

-define(PER_SCHEDULER, 200000).

main(_Args) ->
    {ok, _} = application:ensure_all_started(erlmcp_rollout),
    Parent = self(),
    T0 = erlang:system_time(millisecond),
    Meta = binary:copy(<<"x">>, 200),
    Schedulers = lists:seq(1, erlang:system_info(schedulers_online)),
    Fillers = [spawn_opt(fun() -> fill(N, T0, Meta, Parent) end, [{scheduler, N}]) || N <- Schedulers],
    [receive {filled, P} -> ok end || P <- Fillers],
    [P ! stop || P <- Fillers],
    timer:sleep(3000),
    Big = binary:copy(<<"y">>, 4096),
    Times = [first_two(N, T0, Big) || N <- Schedulers],
    io:format("first 4 KiB store/3 per scheduler {scheduler, first us, second us}: ~p; RSS ~b MB~n",
              [Times, rss_kb() div 1024]),
    halt(0).

fill(N, T0, Meta, Parent) ->
    {ok, S} = erlmcp_session_native:init(#{store => memory, name => reap_big}),
    lists:foreach(fun(I) ->
                          Id = <<"s-", (integer_to_binary(N))/binary, "-", (integer_to_binary(I))/binary>>,
                          {ok, S} = erlmcp_session_native:store(Id, session(I, T0, Meta), S)
                  end, lists:seq(1, ?PER_SCHEDULER)),
    Parent ! {filled, self()},
    receive stop -> ok end.

first_two(N, T0, Big) ->
    Self = self(),
    spawn_opt(fun() ->
                      {ok, S} = erlmcp_session_native:init(#{store => memory, name => reap_small}),
                      {T1, {ok, S}} = timer:tc(erlmcp_session_native, store, [<<"k1">>, session(1, T0, Big), S]),
                      {T2, {ok, S}} = timer:tc(erlmcp_session_native, store, [<<"k2">>, session(2, T0, Big), S]),
                      Self ! {times, N, T1, T2}
              end, [{scheduler, N}]),
    receive {times, N, T1, T2} -> {N, T1, T2} end.

session(I, T0, Meta) ->
    #{id => I, created_at => T0, last_accessed => T0, timeout_ms => 600000, metadata => #{m => Meta}}.

rss_kb() ->
    {ok, Status} = file:read_file("/proc/self/status"),
    [Kb] = [binary_to_integer(hd(binary:split(string:trim(Rest), <<" ">>)))
            || <<"VmRSS:", Rest/binary>> <- binary:split(Status, <<"\n">>, [global])],
    Kb.
