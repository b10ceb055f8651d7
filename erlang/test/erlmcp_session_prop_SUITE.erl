%% @doc PropEr model test of erlmcp_session_native (DESIGN §4.1, §4.4):
%% random sequences of store / fetch / get / delete / list / cleanup_expired
%% and clock moves, run against a store through the real NIF and against a
%% map model of erlmcp's callbacks with sliding expiry; every answer must
%% agree. The same property runs on the memory and the disk store. A fetch
%% writes its access time (touch fraction 0) unless the session never
%% expires.
%%
%% A second property checks the metadata encoder of the session_put NIF:
%% any metadata map stored through store/3 is held as exactly the bytes
%% term_to_binary/1 writes for it (whether the NIF encoded it or handed it
%% back to Erlang), and comes back equal.
-module(erlmcp_session_prop_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("proper/include/proper.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1, end_per_testcase/2]).
-export([model_memory/1, model_disk/1, metadata_bytes_are_term_to_binary/1]).

-define(T0, 1800000000000).
-define(KEYS, [<<"a">>, <<"b">>, <<"c">>, <<"d">>, <<0, 255>>]).

suite() ->
    [{timetrap, {seconds, 300}}].

all() ->
    [model_memory, model_disk, metadata_bytes_are_term_to_binary].

init_per_suite(Config) ->
    {ok, _} = application:ensure_all_started(erlmcp_rollout),
    Config.

end_per_suite(_Config) ->
    ok.

end_per_testcase(_Case, _Config) ->
    ok = erlmcp_rollout_nif:session_set_clock(system).

model_memory(_Config) ->
    run(fun(N) -> #{store => memory, name => list_to_atom("prop_mem_" ++ integer_to_list(N))} end, 300).

model_disk(Config) ->
    Dir = ?config(priv_dir, Config),
    run(fun(N) -> #{store => {disk, filename:join(Dir, "prop_" ++ integer_to_list(N) ++ ".redb")}} end, 100).

run(Spec, NumTests) ->
    Counter = counters:new(1, []),
    Prop = ?FORALL(Ops, list(op()),
                   begin
                       counters:add(Counter, 1, 1),
                       Opts = (Spec(counters:get(Counter, 1)))#{touch_permille => 0},
                       run_ops(Opts, Ops)
                   end),
    true = proper:quickcheck(Prop, [{numtests, NumTests}, {to_file, user}, long_result]) =:= true
        orelse ct:fail(counterexample).

metadata_bytes_are_term_to_binary(_Config) ->
    {ok, S} = erlmcp_session_native:init(#{store => memory, name => prop_metadata_bytes}),
    {ok, H, memory} = erlmcp_rollout_nif:session_open(memory, #{name => prop_metadata_bytes}),
    Counts = counters:new(2, []),
    Prop = ?FORALL(Meta, meta_map(),
                   try
                       Now = erlang:system_time(millisecond),
                       Bin = term_to_binary(Meta),
                       %% The NIF itself: it encodes exactly what its contract says it does.
                       Answer = erlmcp_rollout_nif:session_put(H, make_ref(), <<"n">>, {Now, Now, 60000, Meta}),
                       Want = case encoder_takes(Meta, Bin) of
                                  yes -> [ok];
                                  no -> [term_to_binary];
                                  either -> [ok, term_to_binary]
                              end,
                       counters:add(Counts, case Answer of ok -> 1; _ -> 2 end, 1),
                       NifBytes = case Answer of
                                      ok ->
                                          {ok, {_, _, _, {etf, B}, _}} = erlmcp_rollout_nif:session_get(H, make_ref(), <<"n">>),
                                          B;
                                      _ -> Bin
                                  end,
                       %% And store/3 whichever way it encodes.
                       Sess = #{id => <<"m">>, created_at => Now, last_accessed => Now, timeout_ms => 60000,
                                metadata => Meta},
                       {ok, S} = erlmcp_session_native:store(<<"m">>, Sess, S),
                       {ok, {Now, Now, 60000, {etf, Bytes}, _}} = erlmcp_session_native:stored(<<"m">>, S),
                       {ok, Back, S} = erlmcp_session_native:get(<<"m">>, S),
                       ?WHENFAIL(ct:pal("meta ~P~nNIF answered ~p (want one of ~p)~nNIF bytes ~P~nstored ~P~n"
                                        "term_to_binary ~P",
                                        [Meta, 40, Answer, Want, NifBytes, 60, Bytes, 60, Bin, 60]),
                                 lists:member(Answer, Want) andalso NifBytes =:= Bin andalso Bytes =:= Bin
                                 andalso Back =:= Sess)
                   catch
                       %% This PropEr reports exceptions through erlang:get_stacktrace/0, gone in OTP 23.
                       C:E:St ->
                           ct:pal("meta ~P~nraised ~p:~P~n~p", [Meta, 30, C, E, 30, St]),
                           false
                   end),
    true = proper:quickcheck(Prop, [{numtests, 500}, {to_file, user}, long_result]) =:= true
        orelse ct:fail(counterexample),
    {Encoded, Declined} = {counters:get(Counts, 1), counters:get(Counts, 2)},
    ct:pal("the NIF encoded ~b maps and declined ~b", [Encoded, Declined]),
    %% Both paths were exercised.
    ?assert(Encoded > 100 andalso Declined > 20).

%% Whether session_put's encoder (native/erlmcp_rollout_nif/src/etf.rs)
%% takes a term: not with a pid, port, reference, fun, integer beyond 64
%% bits, bitstring, atom beyond latin-1, map over 32 keys, nesting deeper
%% than 64 or over 64 KiB encoded (checked as it writes: 300 bytes either
%% way).
encoder_takes(Term, Bin) ->
    case {exotic(Term), height(Term) > 64, byte_size(Bin)} of
        {true, _, _} -> no;
        {_, true, _} -> no;
        {false, false, Size} when Size > 65536 -> no;
        {false, false, Size} when Size > 65536 - 300 -> either;
        {false, false, _} -> yes
    end.

exotic(T) when is_pid(T); is_port(T); is_reference(T); is_function(T) -> true;
exotic(T) when is_integer(T) -> T < -(1 bsl 63) orelse T >= 1 bsl 64;
exotic(T) when is_bitstring(T) -> bit_size(T) rem 8 =/= 0;
exotic(T) when is_atom(T) -> lists:any(fun(C) -> C > 255 end, atom_to_list(T));
exotic(T) when is_map(T) -> map_size(T) > 32 orelse lists:any(fun exotic/1, lists:append([[K, V] || {K, V} <- maps:to_list(T)]));
exotic(T) when is_tuple(T) -> lists:any(fun exotic/1, tuple_to_list(T));
exotic([H | T]) -> exotic(H) orelse exotic(T);
exotic(_) -> false.

height([_ | _] = L) -> 1 + lists:max(list_parts(L));
height(T) when is_tuple(T), tuple_size(T) > 0 -> 1 + lists:max([height(E) || E <- tuple_to_list(T)]);
height(T) when is_map(T), map_size(T) > 0 -> 1 + lists:max([height(E) || {K, V} <- maps:to_list(T), E <- [K, V]]);
height(_) -> 0.

list_parts([H | T]) -> [height(H) | list_parts(T)];
list_parts([]) -> [];
list_parts(Tail) -> [height(Tail)].

%% Maps of every kind of term: mostly those the NIF encodes, sometimes one
%% it leaves to term_to_binary/1 (pids, references, funs, big integers,
%% bitstrings, atoms beyond latin-1, maps over 32 keys, deep nesting, over
%% 64 KiB).
meta_map() ->
    frequency([{12, ?SIZED(Size, map_of(min(Size, 24)))},
               {6, ?LET({M, E, Where}, {?SIZED(Size, map_of(min(Size, 16))), exotic_leaf(), choose(1, 3)},
                        case Where of
                            1 -> M#{odd => E};
                            2 -> M#{odd => [1, {a, #{E => x}}]};
                            3 -> M#{[b | E] => ok}
                        end)},
               {1, ?LET({M, Big}, {?SIZED(Size, map_of(min(Size, 8))),
                                   oneof([exactly(lists:duplicate(70000, $a)), exactly(binary:copy(<<"x">>, 70000)),
                                          exactly(binary:copy(<<"x">>, 65536 - 5 - 12 - 100))])},
                        M#{big => Big})}]).

%% Containers of at most N (a map) or 5 (lists, tuples) elements, each
%% smaller: PropEr's list/1 takes its length from the size alone.
map_of(N) ->
    ?LET(Pairs, ?LET(K, choose(0, N), vector(K, {value(N div 3), value(N div 3)})), maps:from_list(Pairs)).

value(0) ->
    leaf();
value(N) ->
    Elements = ?LET(K, choose(0, 5), vector(K, value(N div 2))),
    frequency([{6, leaf()},
               {1, Elements},
               {1, ?LET(L, Elements, list_to_tuple(L))},
               {1, map_of(N div 2)},
               {1, ?LET({L, T}, {Elements, leaf()}, improper([x | L], T))}]).

improper(L, Tail) ->
    lists:foldr(fun(H, Acc) -> [H | Acc] end, Tail, L).

leaf() ->
    frequency([{60, oneof([integer(), float(), atom(), binary(), list(byte()), list(choose(0, 300)), exactly(""),
                           exactly(-0.0), ?LET(B, binary(), <<B/binary, 1:8>>)])},
               {4, oneof([exactly(255), exactly(256), exactly(-1 bsl 31), exactly((1 bsl 31) - 1),
                          exactly(1 bsl 31), exactly(-1 bsl 63), exactly((1 bsl 64) - 1), exactly('caf\x{e9}'),
                          exactly(lists:seq(1, 40)), exactly(list_to_tuple(lists:seq(1, 300))),
                          exactly(maps:from_list([{K, K} || K <- lists:seq(1, 32)]))])}]).

exotic_leaf() ->
    ?LAZY(oneof([integer(-1 bsl 80, 1 bsl 80), ?SUCHTHAT(B, bitstring(), bit_size(B) rem 8 =/= 0), exactly(1 bsl 64),
                 exactly(-(1 bsl 63) - 1), exactly('\x{444}\x{430}\x{439}\x{43b}'),
                 exactly(self()), exactly(make_ref()), exactly(fun lists:reverse/1),
                 exactly(maps:from_list([{K, K} || K <- lists:seq(1, 33)])),
                 exactly(lists:foldl(fun(_, A) -> [A] end, [], lists:seq(1, 70)))])).

op() ->
    Key = elements(?KEYS),
    frequency([{4, {store, Key, oneof([choose(1, 3000), exactly(infinity)]), choose(0, 3), term_meta()}},
               {4, {fetch, Key}},
               {2, {get, Key}},
               {2, {delete, Key}},
               {1, list},
               {1, cleanup},
               {3, {advance, choose(0, 2000)}},
               {1, {store_whole, Key, oneof([exactly(#{}), exactly(#{data => x}),
                                             ?LET(T, choose(1, 3000), #{timeout_ms => T, tag => T})])}}]).

term_meta() ->
    oneof([exactly(#{}), ?LET(I, integer(), #{n => I}), ?LET(B, binary(), #{b => B, l => [B]})]).

run_ops(Opts, Ops) ->
    ok = erlmcp_rollout_nif:session_set_clock(?T0),
    {ok, S} = erlmcp_session_native:init(Opts),
    Result = step(Ops, S, #{}, ?T0),
    Result.

%% Model: Key => session map as stored (last_accessed moved by fetches).
step([], _S, _M, _Now) ->
    true;
step([Op | Ops], S, M, Now) ->
    case apply_op(Op, S, M, Now) of
        {ok, M2, Now2} ->
            step(Ops, S, M2, Now2);
        {mismatch, Got, Want} ->
            ct:pal("op ~p at ~b: got ~p, model says ~p", [Op, Now - ?T0, Got, Want]),
            false
    end.

live(M, Key, Now) ->
    case maps:find(Key, M) of
        {ok, Sess} -> not expired(Sess, Now) andalso {ok, Sess};
        error -> false
    end.

expired(#{timeout_ms := infinity}, _Now) -> false;
expired(#{last_accessed := L, timeout_ms := T}, Now) -> Now - L > T;
expired(_, _Now) -> false.

check(Got, Want, M, Now) when Got =:= Want -> {ok, M, Now};
check(Got, Want, _M, _Now) -> {mismatch, Got, Want}.

apply_op({store, Key, Timeout, Back, Meta}, S, M, Now) ->
    Sess = #{id => Key, created_at => Now - 1, last_accessed => Now - Back, timeout_ms => Timeout, metadata => Meta},
    check(erlmcp_session_native:store(Key, Sess, S), {ok, S}, M#{Key => Sess}, Now);
apply_op({store_whole, Key, Map}, S, M, Now) ->
    Stored = Map#{last_accessed => Now},
    check(erlmcp_session_native:store(Key, Map, S), {ok, S}, M#{Key => Stored}, Now);
apply_op({fetch, Key}, S, M, Now) ->
    case live(M, Key, Now) of
        {ok, Sess} ->
            Touched = Sess#{last_accessed => max(Now, maps:get(last_accessed, Sess))},
            %% The access time of a session that never expires is not written.
            Stored = case maps:get(timeout_ms, Sess, infinity) of
                         infinity -> Sess;
                         _ -> Touched
                     end,
            check(erlmcp_session_native:fetch(Key, S), {ok, Touched, S}, M#{Key => Stored}, Now);
        false ->
            check(erlmcp_session_native:fetch(Key, S), {error, not_found, S}, M, Now)
    end;
apply_op({get, Key}, S, M, Now) ->
    Want = case live(M, Key, Now) of
               {ok, Sess} -> {ok, Sess, S};
               false -> {error, not_found, S}
           end,
    check(erlmcp_session_native:get(Key, S), Want, M, Now);
apply_op({delete, Key}, S, M, Now) ->
    check(erlmcp_session_native:delete(Key, S), {ok, S}, maps:remove(Key, M), Now);
apply_op(list, S, M, Now) ->
    Want = lists:sort([K || K <- maps:keys(M), live(M, K, Now) =/= false]),
    check(erlmcp_session_native:list(S), {ok, Want, S}, M, Now);
apply_op(cleanup, S, M, Now) ->
    Expired = [K || {K, Sess} <- maps:to_list(M), expired(Sess, Now)],
    check(erlmcp_session_native:cleanup_expired(S), {ok, length(Expired), S}, maps:without(Expired, M), Now);
apply_op({advance, Ms}, _S, M, Now) ->
    ok = erlmcp_rollout_nif:session_set_clock(Now + Ms),
    {ok, M, Now + Ms}.
