%% @doc A synthetic erlmcp node for the rollout controller's end-to-end test
%% and the demo (DESIGN §6.6): it serves synthetic requests in a loop, picks
%% the cohort of each with `erlmcp_feature_flags:is_enabled/2' (flags followed
%% from etcd), and exports cohort-labelled metrics over HTTP (gen_tcp):
%%
%%   erlmcp_flag_requests_total{flag, cohort}          counter
%%   erlmcp_flag_request_errors_total{flag, cohort}    counter
%%   erlmcp_flag_request_duration_seconds{flag, cohort} histogram (seconds)
%%   process_start_time_seconds                         gauge
%%
%% HTTP: `GET /metrics'; `GET /set?flag=F&cohort=canary&error_rate=0.02&latency_ms=4'
%% (each request of the cohort fails with probability `error_rate'; its
%% latency is uniform in [0.5, 1.5] x `latency_ms'); `GET /stats' (requests per
%% flag and cohort, as `flag cohort count' lines). Defaults: 2 ms, no errors.
%%
%% Start: `erlmcp_rollout_synth:start(#{etcd => [<<"127.0.0.1:2379">>], key =>
%% <<"erlmcp/feature_flags">>, flags => [<<"f">>], rps => 2000})'. It prints
%% `READY <port>' and halts when its standard input closes (its parent died).
-module(erlmcp_rollout_synth).
-export([start/1]).

-define(TAB, erlmcp_rollout_synth).
-define(BOUNDS, [0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1]).
-define(TICK_MS, 10).

-spec start(map()) -> no_return().
start(Opts) ->
    Eps = maps:get(etcd, Opts),
    Key = maps:get(key, Opts, <<"erlmcp/feature_flags">>),
    {ok, _} = erlmcp_feature_flags:start_link(#{etcd => #{endpoints => Eps, key => Key}}),
    ?TAB = ets:new(?TAB, [named_table, public, set, {write_concurrency, true}]),
    true = ets:insert(?TAB, {start_time, erlang:system_time(millisecond) / 1000}),
    [set_behaviour(F, C, 0.0, 2.0) || F <- maps:get(flags, Opts, []), C <- [canary, stable]],
    Rps = maps:get(rps, Opts, 2000),
    {ok, L} = gen_tcp:listen(maps:get(port, Opts, 0),
                             [binary, {active, false}, {reuseaddr, true}, {ip, {127, 0, 0, 1}},
                              {packet, http_bin}]),
    {ok, Port} = inet:port(L),
    _ = spawn_link(fun() -> accept(L) end),
    _ = spawn_link(fun() -> traffic(Rps) end),
    Self = self(),
    _ = spawn_link(fun() -> _ = io:get_line(""), Self ! stdin_closed end),
    io:format("READY ~b~n", [Port]),
    receive stdin_closed -> erlang:halt(0) end.

set_behaviour(Flag, Cohort, ErrorRate, LatencyMs) ->
    true = ets:insert(?TAB, {{behaviour, Flag, Cohort}, ErrorRate, LatencyMs}),
    [_ = ets:insert_new(?TAB, {{count, Flag, Cohort, K}, 0})
     || K <- [requests, errors, sum_us | lists:seq(1, length(?BOUNDS) + 1)]],
    ok.

flags() ->
    lists:usort([F || [F] <- ets:match(?TAB, {{behaviour, '$1', '_'}, '_', '_'})]).

%%% Traffic: every tick, Rps/100 requests per flag.

traffic(Rps) ->
    PerTick = max(1, Rps * ?TICK_MS div 1000),
    loop(PerTick, erlang:monotonic_time(millisecond)).

loop(PerTick, Next) ->
    [request(F) || F <- flags(), _ <- lists:seq(1, PerTick)],
    Next2 = Next + ?TICK_MS,
    Wait = Next2 - erlang:monotonic_time(millisecond),
    case Wait > 0 of
        true -> timer:sleep(Wait);
        false -> ok
    end,
    loop(PerTick, max(Next2, erlang:monotonic_time(millisecond) - 100)).

request(Flag) ->
    Session = integer_to_binary(rand:uniform(1 bsl 40)),
    Cohort = case erlmcp_feature_flags:is_enabled(Flag, #{session_id => Session}) of
                 true -> canary;
                 false -> stable
             end,
    [{_, ErrorRate, LatencyMs}] = ets:lookup(?TAB, {behaviour, Flag, Cohort}),
    Latency = LatencyMs * (0.5 + rand:uniform()) / 1000,
    Bucket = bucket(Latency, ?BOUNDS, 1),
    Failed = case rand:uniform() < ErrorRate of true -> 1; false -> 0 end,
    C = fun(K, N) -> ets:update_counter(?TAB, {count, Flag, Cohort, K}, N) end,
    _ = C(requests, 1),
    _ = C(errors, Failed),
    _ = C(sum_us, round(Latency * 1000000)),
    _ = C(Bucket, 1),
    ok.

bucket(_, [], N) -> N;
bucket(L, [B | Rest], N) when L > B -> bucket(L, Rest, N + 1);
bucket(_, _, N) -> N.

%%% HTTP

accept(L) ->
    {ok, S} = gen_tcp:accept(L),
    Pid = spawn(fun() -> receive go -> serve(S) end end),
    ok = gen_tcp:controlling_process(S, Pid),
    Pid ! go,
    accept(L).

serve(S) ->
    case gen_tcp:recv(S, 0, 5000) of
        {ok, {http_request, 'GET', {abs_path, Path}, _}} ->
            _ = skip_headers(S),
            {Code, Body} = route(Path),
            _ = gen_tcp:send(S, [<<"HTTP/1.0 ">>, Code, <<"\r\nContent-Type: text/plain; version=0.0.4\r\n">>,
                                 <<"Content-Length: ">>, integer_to_binary(iolist_size(Body)),
                                 <<"\r\nConnection: close\r\n\r\n">>, Body]);
        _ ->
            ok
    end,
    gen_tcp:close(S).

skip_headers(S) ->
    case gen_tcp:recv(S, 0, 5000) of
        {ok, {http_header, _, _, _, _}} -> skip_headers(S);
        _ -> ok
    end.

route(Path) ->
    case binary:split(Path, <<"?">>) of
        [<<"/metrics">> | _] -> {<<"200 OK">>, metrics()};
        [<<"/stats">> | _] -> {<<"200 OK">>, stats()};
        [<<"/set">>, Query] -> set(uri_string:dissect_query(Query));
        _ -> {<<"404 Not Found">>, <<"not found\n">>}
    end.

set(Params) ->
    try
        Flag = proplists:get_value(<<"flag">>, Params),
        Cohort = case proplists:get_value(<<"cohort">>, Params) of
                     <<"canary">> -> canary;
                     <<"stable">> -> stable
                 end,
        [{_, E0, L0}] = case ets:lookup(?TAB, {behaviour, Flag, Cohort}) of
                            [] -> [{x, 0.0, 2.0}];
                            Found -> Found
                        end,
        Num = fun(K, D) -> case proplists:get_value(K, Params) of
                               undefined -> D;
                               V -> binary_to_number(V)
                           end end,
        ok = set_behaviour(Flag, Cohort, Num(<<"error_rate">>, E0), Num(<<"latency_ms">>, L0)),
        {<<"200 OK">>, <<"ok\n">>}
    catch
        _:_ -> {<<"400 Bad Request">>, <<"expected flag=F&cohort=canary|stable[&error_rate=X][&latency_ms=Y]\n">>}
    end.

binary_to_number(B) ->
    try binary_to_float(B)
    catch error:badarg -> float(binary_to_integer(B))
    end.

count(F, C, K) ->
    ets:lookup_element(?TAB, {count, F, C, K}, 2).

stats() ->
    [[F, <<" ">>, atom_to_binary(C), <<" ">>, integer_to_binary(count(F, C, requests)), <<"\n">>]
     || F <- flags(), C <- [canary, stable]].

metrics() ->
    Fs = flags(),
    Labels = fun(F, C) -> [<<"flag=\"">>, F, <<"\",cohort=\"">>, atom_to_binary(C), <<"\"">>] end,
    Cs = [canary, stable],
    Counter = fun(Name, K) ->
                      [<<"# TYPE ">>, Name, <<" counter\n">>,
                       [[Name, <<"{">>, Labels(F, C), <<"} ">>, integer_to_binary(count(F, C, K)), <<"\n">>]
                        || F <- Fs, C <- Cs]]
              end,
    H = <<"erlmcp_flag_request_duration_seconds">>,
    Les = [float_to_binary(B, [short]) || B <- ?BOUNDS] ++ [<<"+Inf">>],
    Hist = [[<<"# TYPE ">>, H, <<" histogram\n">>],
            [begin
                 Counts = [count(F, C, I) || I <- lists:seq(1, length(?BOUNDS) + 1)],
                 {Lines, Total} = lists:foldl(
                                    fun({Le, N}, {Acc, Cum}) ->
                                            Cum2 = Cum + N,
                                            {[[H, <<"_bucket{">>, Labels(F, C), <<",le=\"">>, Le, <<"\"} ">>,
                                               integer_to_binary(Cum2), <<"\n">>] | Acc], Cum2}
                                    end, {[], 0}, lists:zip(Les, Counts)),
                 [lists:reverse(Lines),
                  H, <<"_sum{">>, Labels(F, C), <<"} ">>,
                  float_to_binary(count(F, C, sum_us) / 1000000, [short]), <<"\n">>,
                  H, <<"_count{">>, Labels(F, C), <<"} ">>, integer_to_binary(Total), <<"\n">>]
             end || F <- Fs, C <- Cs]],
    [{start_time, Start}] = ets:lookup(?TAB, start_time),
    [Counter(<<"erlmcp_flag_requests_total">>, requests),
     Counter(<<"erlmcp_flag_request_errors_total">>, errors),
     Hist,
     <<"# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds ">>,
     float_to_binary(Start, [short]), <<"\n">>].
