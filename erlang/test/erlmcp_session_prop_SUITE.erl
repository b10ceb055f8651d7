%% @doc PropEr model test of erlmcp_session_native (DESIGN §4.1, §4.4):
%% random sequences of store / fetch / get / delete / list / cleanup_expired
%% and clock moves, run against a store through the real NIF and against a
%% map model of erlmcp's callbacks with sliding expiry; every answer must
%% agree. The same property runs on the memory and the disk store. A fetch
%% writes its access time (touch fraction 0) unless the session never
%% expires.
-module(erlmcp_session_prop_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("proper/include/proper.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1, end_per_testcase/2]).
-export([model_memory/1, model_disk/1]).

-define(T0, 1800000000000).
-define(KEYS, [<<"a">>, <<"b">>, <<"c">>, <<"d">>, <<0, 255>>]).

suite() ->
    [{timetrap, {seconds, 300}}].

all() ->
    [model_memory, model_disk].

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
