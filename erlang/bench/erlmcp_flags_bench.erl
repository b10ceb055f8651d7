%% @doc Feature-flag evaluation benchmark, one VM, one run (run it with
%% `scripts/bench-erlang-flags'):
%%
%%  (a) `ref_flags_server': the reference's gen_server service (key-type bug fixed);
%%  (b) the best pure-Erlang evaluator: each flag compiled for the environment
%%      into a small term under its own `persistent_term' key, evaluated in the
%%      caller with `erlang:phash2/2';
%%  (c) `erlmcp_feature_flags:is_enabled/2' (one NIF call in the caller).
%%
%% All three evaluate the same config (built here as the Erlang map a JSON
%% decoder produces, and written as JSON for (c)), in environment `production'.
%% Each measurement is a compiled loop per variant over 1024 prebuilt contexts,
%% run with 1 caller and with 16 concurrent callers, repeated (variants
%% interleaved) and reported as the median. ns/call = wall time / total calls;
%% for 16 callers also the per-caller latency (each caller's own time / its calls).
%% A breakdown (1 caller) follows: loop overhead, phash2 BIF vs NIF, a near
%% no-op NIF, the NIF's unknown-flag path, flags_eval vs is_enabled, (b) with a
%% persistent_term key per flag, and the same evaluator over ets:lookup/2.
%% The process exits 0 after printing (PASS/FAIL are in the table), 2 if the
%% variants disagree, 3 if the bench itself crashed.
-module(erlmcp_flags_bench).

-export([main/1]).
-export([caller/6, shape_nop/2]).

-define(NCTX, 1024).
-define(PT(Name), {?MODULE, flag, Name}).
%% All flags in one map under one atom key: faster to look up than a key per
%% flag ({M, flag, Name} hashes a tuple and a binary), so it is (b).
-define(PT_ALL, erlmcp_flags_bench_flags).
%% DESIGN §7 also asks for ets:lookup/2: the same compiled flags in a named
%% read_concurrency table (by name, and by tid kept in a persistent_term).
-define(ETS, erlmcp_flags_bench_ets).
-define(ETS_TID, erlmcp_flags_bench_ets_tid).

%% One loop function per measured expression: no fun in the inner loop.
%% Each counts `true' results so the work cannot be dropped and the
%% variants can be checked against each other.
-define(LOOP(Fn, Expr),
Fn(0, _Name, _Ctxs, Acc) -> Acc;
Fn(N, Name, Ctxs, Acc) ->
    Ctx = element((N band (?NCTX - 1)) + 1, Ctxs),
    case Expr of
        true -> Fn(N - 1, Name, Ctxs, Acc + 1);
        _ -> Fn(N - 1, Name, Ctxs, Acc)
    end).

?LOOP(loop_a, ref_flags_server:is_enabled(Name, Ctx)).
?LOOP(loop_b, pt_is_enabled(Name, Ctx)).
?LOOP(loop_c, erlmcp_feature_flags:is_enabled(Name, Ctx)).
%% Breakdown of (c) and of (b).
?LOOP(loop_empty, empty(Name, Ctx)).
?LOOP(loop_nif_eval, erlmcp_rollout_nif:flags_eval(Name, Ctx)).
?LOOP(loop_nif_eval_empty_ctx, is_map(Ctx) andalso erlmcp_rollout_nif:flags_eval(Name, #{})).
?LOOP(loop_nif_phash2, erlmcp_rollout_nif:flags_phash2(ctx_sid(Ctx), 100) < 50).
?LOOP(loop_bif_phash2, erlang:phash2(ctx_sid(Ctx), 100) < 50).
?LOOP(loop_pt_get, is_map(Ctx) andalso is_tuple(persistent_term:get(?PT(Name), false))).
?LOOP(loop_pt_get_all, is_map(Ctx) andalso is_map_key(Name, persistent_term:get(?PT_ALL))).
?LOOP(loop_b_per_key, pt_is_enabled_per_key(Name, Ctx)).
?LOOP(loop_ets_named, ets_is_enabled(?ETS, Name, Ctx)).
?LOOP(loop_ets_tid, ets_is_enabled(persistent_term:get(?ETS_TID), Name, Ctx)).
?LOOP(loop_nif_noop, is_map(Ctx) andalso erlmcp_rollout_nif:flags_set_clock(system) =:= ok).
?LOOP(loop_nif_status, is_map(Ctx) andalso is_tuple(erlmcp_rollout_nif:flags_status())).
?LOOP(loop_nif_nop, erlmcp_rollout_nif:flags_nop(Name, Ctx) =:= Name).
?LOOP(loop_shape_nop, ?MODULE:shape_nop(Name, Ctx)).

empty(_Name, _Ctx) -> true.

%% `is_enabled/2''s shape (remote call, guard, one NIF call, case on its
%% answer) around a NIF that does nothing: the floor of the design.
shape_nop(Name, Ctx) when is_map(Ctx) ->
    case erlmcp_rollout_nif:flags_nop(true, Name) of
        true -> true;
        false -> false;
        unknown -> false;
        {custom, _} -> false
    end.

ctx_sid(#{session_id := S}) -> S;
ctx_sid(_) -> <<>>.

run_loop(a, N, Name, Ctxs) -> loop_a(N, Name, Ctxs, 0);
run_loop(b, N, Name, Ctxs) -> loop_b(N, Name, Ctxs, 0);
run_loop(c, N, Name, Ctxs) -> loop_c(N, Name, Ctxs, 0);
run_loop(empty, N, Name, Ctxs) -> loop_empty(N, Name, Ctxs, 0);
run_loop(nif_eval, N, Name, Ctxs) -> loop_nif_eval(N, Name, Ctxs, 0);
run_loop(nif_eval_empty_ctx, N, Name, Ctxs) -> loop_nif_eval_empty_ctx(N, Name, Ctxs, 0);
run_loop(nif_phash2, N, Name, Ctxs) -> loop_nif_phash2(N, Name, Ctxs, 0);
run_loop(bif_phash2, N, Name, Ctxs) -> loop_bif_phash2(N, Name, Ctxs, 0);
run_loop(pt_get, N, Name, Ctxs) -> loop_pt_get(N, Name, Ctxs, 0);
run_loop(pt_get_all, N, Name, Ctxs) -> loop_pt_get_all(N, Name, Ctxs, 0);
run_loop(b_per_key, N, Name, Ctxs) -> loop_b_per_key(N, Name, Ctxs, 0);
run_loop(ets_named, N, Name, Ctxs) -> loop_ets_named(N, Name, Ctxs, 0);
run_loop(ets_tid, N, Name, Ctxs) -> loop_ets_tid(N, Name, Ctxs, 0);
run_loop(nif_noop, N, Name, Ctxs) -> loop_nif_noop(N, Name, Ctxs, 0);
run_loop(nif_status, N, Name, Ctxs) -> loop_nif_status(N, Name, Ctxs, 0);
run_loop(nif_nop, N, Name, Ctxs) -> loop_nif_nop(N, Name, Ctxs, 0);
run_loop(shape_nop, N, Name, Ctxs) -> loop_shape_nop(N, Name, Ctxs, 0).

%%% The config

%% The decoded JSON (binary keys, as jsx:decode(_, [return_maps]) gives):
%% the reference's five flags plus the three the scenarios evaluate.
config() ->
    Ref = fun(Enabled, Pct, Envs, Phase) ->
                  #{<<"enabled">> => Enabled, <<"rollout_percentage">> => Pct,
                    <<"environments">> => Envs, <<"conditions">> => [],
                    <<"metadata">> => #{<<"phase">> => Phase}}
          end,
    All = [<<"dev">>, <<"test">>, <<"staging">>, <<"production">>],
    #{<<"mcp_sampling">> => Ref(true, 100, All, 1),
      <<"mcp_tasks">> => Ref(false, 0, [<<"dev">>, <<"test">>], 2),
      <<"mcp_elicitation">> => Ref(false, 0, [<<"dev">>, <<"test">>], 2),
      <<"mcp_streaming_optimizations">> => Ref(false, 0, [<<"dev">>], 3),
      <<"mcp_sona_hybrid">> => Ref(false, 0, [<<"dev">>], 4),
      <<"mcp_rollout_half">> => Ref(true, 50, [<<"staging">>, <<"production">>], 2),
      <<"mcp_beta_user">> =>
          #{<<"enabled">> => true, <<"rollout_percentage">> => 100,
            <<"environments">> => [<<"production">>],
            <<"conditions">> => [#{<<"user_id">> => <<"u-1">>}],
            <<"metadata">> => #{<<"phase">> => 3}}}.

environment() -> production.

%% A minimal JSON encoder for the config above (maps with binary keys,
%% lists, binaries without escapes, integers, booleans).
json(M) when is_map(M) ->
    Members = [[json(K), $:, json(V)] || {K, V} <- lists:sort(maps:to_list(M))],
    [${, lists:join($,, Members), $}];
json(L) when is_list(L) -> [$[, lists:join($,, [json(E) || E <- L]), $]];
json(B) when is_binary(B) -> [$", B, $"];
json(I) when is_integer(I) -> integer_to_binary(I);
json(true) -> <<"true">>;
json(false) -> <<"false">>.

%%% (b) the best pure-Erlang evaluator

%% Compile each flag for the environment into `true', `false' or
%% `{Pct, StickyAtom, StickyBin, Conds}' with Conds `[{KeyAtom, KeyBin, Text}]',
%% kept in one map under one atom key (and, for the breakdown, under a key per flag).
pt_load(Config, Env) ->
    EnvBin = atom_to_binary(Env, utf8),
    Compiled = maps:map(fun(_Name, Cfg) -> pt_compile(Cfg, EnvBin) end, Config),
    persistent_term:put(?PT_ALL, Compiled),
    Tid = ets:new(?ETS, [named_table, public, set, {read_concurrency, true}]),
    true = ets:insert(?ETS, maps:to_list(Compiled)),
    persistent_term:put(?ETS_TID, Tid),
    maps:foreach(fun(Name, F) -> persistent_term:put(?PT(Name), F) end, Compiled).

pt_compile(Cfg, Env) ->
    Enabled = maps:get(<<"enabled">>, Cfg, false),
    EnvOk = lists:member(Env, maps:get(<<"environments">>, Cfg, [Env])),
    Pct = maps:get(<<"rollout_percentage">>, Cfg, 100),
    Conds = [pt_cond(C) || C <- maps:get(<<"conditions">>, Cfg, [])],
    Sticky = maps:get(<<"stickiness">>, Cfg, <<"session_id">>),
    if
        not Enabled; not EnvOk; Pct =:= 0 -> false;
        Pct =:= 100, Conds =:= [] -> true;
        true -> {Pct, binary_to_atom(Sticky, utf8), Sticky, Conds}
    end.

pt_cond(C) ->
    [{K, V}] = maps:to_list(C),
    {binary_to_atom(K, utf8), K, V}.

pt_is_enabled(Name, Ctx) ->
    case persistent_term:get(?PT_ALL) of
        #{Name := F} -> pt_eval(F, Ctx);
        #{} -> false
    end.

%% The same from ETS (breakdown only).
ets_is_enabled(Tab, Name, Ctx) ->
    case ets:lookup(Tab, Name) of
        [{_, F}] -> pt_eval(F, Ctx);
        [] -> false
    end.

%% The same with a persistent_term key per flag (breakdown only).
pt_is_enabled_per_key(Name, Ctx) ->
    pt_eval(persistent_term:get(?PT(Name), false), Ctx).

pt_eval(F, Ctx) ->
    case F of
        true -> true;
        false -> false;
        {100, _, _, Conds} -> pt_conds(Conds, Ctx);
        {Pct, KA, KB, Conds} ->
            Value = case Ctx of
                        #{KA := V} -> V;
                        #{KB := V} -> V;
                        #{} -> <<>>
                    end,
            erlang:phash2(Value, 100) < Pct andalso pt_conds(Conds, Ctx)
    end.

pt_conds([], _Ctx) -> true;
pt_conds([{KA, KB, Text} | Rest], Ctx) ->
    Ok = case Ctx of
             #{KA := Text} -> true;
             #{KA := V} when is_atom(V) -> atom_to_binary(V, utf8) =:= Text;
             #{KA := _} -> false;
             #{KB := Text} -> true;
             #{KB := V} when is_atom(V) -> atom_to_binary(V, utf8) =:= Text;
             #{} -> false
         end,
    Ok andalso pt_conds(Rest, Ctx).

%%% Scenarios

sid(I) -> <<"session-", (integer_to_binary(100000 + I * 7919))/binary>>.

scenarios() ->
    Idx = lists:seq(1, ?NCTX),
    [{"static", <<"mcp_sampling">>, list_to_tuple([#{session_id => sid(I)} || I <- Idx])},
     {"rollout 50%", <<"mcp_rollout_half">>, list_to_tuple([#{session_id => sid(I)} || I <- Idx])},
     {"1 condition", <<"mcp_beta_user">>,
      list_to_tuple([#{user_id => <<"u-1">>, session_id => sid(I)} || I <- Idx])}].

%% Extra contexts for the agreement check only.
check_contexts() ->
    [#{}, #{session_id => <<>>}, #{user_id => <<"u-2">>}, #{user_id => 'u-1'}, #{user_id => <<"u-1">>},
     #{user_id => 'u-2', session_id => sid(7)}, #{user_id => 1, session_id => sid(3)},
     #{session_id => 'session-1'}, #{session_id => 42}, #{session_id => -7}, #{session_id => 1 bsl 70}]
        ++ [#{user_id => lists:nth(1 + I rem 3, [<<"u-1">>, <<"u-3">>, 'u-1']), session_id => sid(I)}
            || I <- lists:seq(1, 2000)].

%%% Measuring

%% Time N calls split over P processes. Returns {WallNs, PerCallerNsPerCall, Trues}.
measure(Variant, P, N, Name, Ctxs) ->
    Self = self(),
    Per = N div P,
    Pids = [spawn_opt(?MODULE, caller, [Self, Variant, Per, Name, Ctxs, I], [link, {priority, normal}])
            || I <- lists:seq(1, P)],
    [receive {ready, Pid} -> ok end || Pid <- Pids],
    erlang:garbage_collect(),
    T0 = erlang:monotonic_time(nanosecond),
    [Pid ! go || Pid <- Pids],
    Results = [receive {done, Pid, Ns, Trues} -> {Ns, Trues} end || Pid <- Pids],
    Wall = erlang:monotonic_time(nanosecond) - T0,
    Own = lists:sum([Ns || {Ns, _} <- Results]) / P,
    {Wall / (Per * P), Own / Per, lists:sum([T || {_, T} <- Results])}.

caller(Parent, Variant, N, Name, Ctxs, _I) ->
    Parent ! {ready, self()},
    receive go -> ok end,
    T0 = erlang:monotonic_time(nanosecond),
    Trues = run_loop(Variant, N, Name, Ctxs),
    T1 = erlang:monotonic_time(nanosecond),
    Parent ! {done, self(), T1 - T0, Trues}.

median(L) ->
    S = lists:sort(L),
    lists:nth((length(S) + 1) div 2, S).

%%% Main

main(Args) ->
    try run(Args) of
        ok -> halt(0)
    catch
        throw:{abort, Msg} ->
            io:format(standard_error, "ABORT: ~ts~n", [Msg]),
            halt(2);
        C:R:St ->
            io:format(standard_error, "bench crashed: ~p:~p~n~p~n", [C, R, St]),
            halt(3)
    end.

run([TmpDir | Rest]) ->
    Quick = Rest =:= ["quick"],
    {Reps, NFast, NRef, NBreak} = case Quick of
                                      true -> {3, 200000, 20000, 200000};
                                      false -> {5, 2000000, 200000, 2000000}
                                  end,
    Env = environment(),
    Config = config(),
    JsonPath = filename:join(TmpDir, "feature_flags.json"),
    ok = file:write_file(JsonPath, json(Config)),
    ok = application:set_env(erlmcp_core, environment, Env),
    {ok, _} = ref_flags_server:start_link(Config),
    pt_load(Config, Env),
    case erlmcp_feature_flags:start_link(#{config => JsonPath, environment => Env}) of
        {ok, _} -> ok;
        Err -> throw({abort, io_lib:format("erlmcp_feature_flags:start_link failed: ~p", [Err])})
    end,
    Scenarios = scenarios(),
    verify(Config, Scenarios),
    io:format("erlmcp feature-flag benchmark (one VM, one run)~n"),
    io:format("OTP ~s, ERTS ~s, ~b schedulers online (~b logical CPUs), JIT: ~p~n",
              [erlang:system_info(otp_release), erlang:system_info(version),
               erlang:system_info(schedulers_online), erlang:system_info(logical_processors_available),
               erlang:system_info(emu_flavor)]),
    io:format("load average at start: ~ts~n", [loadavg()]),
    io:format("calls per measurement: (a) ~b, (b)/(c) ~b; median of ~b interleaved repetitions~n~n",
              [NRef, NFast, Reps]),
    %% Warm up every variant in every scenario.
    [measure(V, P, Nw, Name, Ctxs) || {_, Name, Ctxs} <- Scenarios, P <- [1, 16],
                                      {V, Nw} <- [{a, NRef div 10}, {b, NFast div 10}, {c, NFast div 10}]],
    Rows = [row(S, P, Reps, NFast, NRef) || S <- Scenarios, P <- [1, 16]],
    print_table(Rows),
    breakdown(Scenarios, Reps, NBreak),
    io:format("~nload average at end: ~ts~n", [loadavg()]),
    ok.

loadavg() ->
    case file:read_file("/proc/loadavg") of
        {ok, B} -> string:trim(B);
        _ -> "?"
    end.

verify(_Config, Scenarios) ->
    Extra = check_contexts(),
    Names = [N || {_, N, _} <- Scenarios] ++
        [<<"mcp_tasks">>, <<"mcp_sona_hybrid">>, <<"no_such_flag">>],
    Checked = lists:foldl(
                fun(Name, Acc) ->
                        Ctxs = Extra ++ lists:append([tuple_to_list(C) || {_, _, C} <- Scenarios]),
                        lists:foreach(
                          fun(Ctx) ->
                                  A = ref_flags_server:is_enabled(Name, Ctx),
                                  B = pt_is_enabled(Name, Ctx),
                                  C = erlmcp_feature_flags:is_enabled(Name, Ctx),
                                  B2 = pt_is_enabled_per_key(Name, Ctx),
                                  B3 = ets_is_enabled(?ETS, Name, Ctx),
                                  case {A, B, C, B2, B3} of
                                      {X, X, X, X, X} when is_boolean(X) -> ok;
                                      _ -> throw({abort, io_lib:format("disagreement on ~ts ~p: a=~p b=~p c=~p",
                                                                       [Name, Ctx, A, B, C])})
                                  end
                          end, Ctxs),
                        Acc + length(Ctxs)
                end, 0, Names),
    io:format("agreement check: (a), (b), (c), (b) with a key per flag and from ETS return identical booleans on ~b (flag, context) pairs~n",
              [Checked]).

row({Label, Name, Ctxs}, P, Reps, NFast, NRef) ->
    Runs = [[{V, measure(V, P, N, Name, Ctxs)} || {V, N} <- [{a, NRef}, {b, NFast}, {c, NFast}]]
            || _ <- lists:seq(1, Reps)],
    Get = fun(V, Pos) -> median([element(Pos, proplists:get_value(V, R)) || R <- Runs]) end,
    %% Trues must agree (per call) across variants.
    TrueShare = fun(V, N) -> element(3, proplists:get_value(V, hd(Runs))) / N end,
    Shares = {TrueShare(a, NRef), TrueShare(b, NFast), TrueShare(c, NFast)},
    {Label, P, {Get(a, 1), Get(b, 1), Get(c, 1)}, {Get(a, 2), Get(b, 2), Get(c, 2)}, Shares}.

print_table(Rows) ->
    io:format("ns/call (wall time / total calls; for 16 callers also per-caller latency = own time / own calls)~n"),
    Hdr = io_lib:format("~-12s ~7s ~-10s ~9s ~8s ~8s ~8s ~7s  ~s~n",
                        ["scenario", "callers", "measure", "a:ref", "b:pt", "c:nif", "a/c", "c/b", "targets (a/c>=30, c/b<=0.8)"]),
    io:format("~ts~ts~n", [Hdr, lists:duplicate(104, $-)]),
    lists:foreach(
      fun({Label, P, {A, B, C}, {PA, PB, PC}, {SA, SB, SC}}) ->
              line(Label, P, "wall", A, B, C),
              case P of
                  1 -> ok;
                  _ -> line("", P, "per-caller", PA, PB, PC)
              end,
              case abs(SA - SB) < 0.02 andalso abs(SB - SC) < 0.02 of
                  true -> ok;
                  false -> io:format("  WARNING: share of true differs: a ~.3f b ~.3f c ~.3f~n", [SA, SB, SC])
              end
      end, Rows).

line(Label, P, What, A, B, C) ->
    AC = A / C,
    CB = C / B,
    Verdict = case What of
                  "wall" -> io_lib:format("a/c ~s, c/b ~s", [pf(AC >= 30), pf(CB =< 0.8)]);
                  _ -> ""
              end,
    io:format("~-12ts ~7b ~-10s ~9.1f ~8.1f ~8.1f ~7.1f ~7.2f  ~ts~n",
              [Label, P, What, A, B, C, AC, CB, Verdict]).

pf(true) -> "PASS";
pf(false) -> "FAIL".

%% Where the time of (b) and (c) goes: 1 caller, same loop shape.
breakdown(Scenarios, Reps, N) ->
    io:format("~nbreakdown, 1 caller, ns/call including the loop (median of ~b):~n", [Reps]),
    [{_, Static, SCtxs}, {_, Rollout, RCtxs}, {_, Cond, CCtxs}] = Scenarios,
    Items = [{"loop + element/2 + local call returning true (overhead)", empty, Static, SCtxs},
             {"erlang:phash2(SessionId, 100) BIF", bif_phash2, Static, RCtxs},
             {"erlmcp_rollout_nif:flags_phash2(SessionId, 100) (NIF: decode + hash)", nif_phash2, Static, RCtxs},
             {"persistent_term:get(Atom) + is_map_key(Name, Map) (b's lookup)", pt_get_all, Static, SCtxs},
             {"persistent_term:get({M, flag, Name}) (a key per flag)", pt_get, Static, SCtxs}] ++
        [{"flags_set_clock(system) (NIF: atom arg, one atomic store ~ no-op)", nif_noop, Static, SCtxs}
         || erlang:function_exported(erlmcp_rollout_nif, flags_set_clock, 1)] ++
        [{"flags_nop(Name, Ctx) (raw NIF returning its argument: a NIF call's floor)", nif_nop, Static, SCtxs}
         || erlang:function_exported(erlmcp_rollout_nif, flags_nop, 2)] ++
        [{"is_enabled's shape (remote call + guard + case) over flags_nop: the floor", shape_nop, Static, SCtxs}
         || erlang:function_exported(erlmcp_rollout_nif, flags_nop, 2)] ++
        [{"erlmcp_rollout_nif:flags_status() (NIF, no arguments; builds metrics)", nif_status, Static, SCtxs},
             {"flags_eval(<<\"no_such_flag\">>, #{}) (NIF, unknown flag)", nif_eval_empty_ctx, <<"no_such_flag">>, SCtxs},
             {"flags_eval(<<\"no_such_flag\">>, Ctx)", nif_eval, <<"no_such_flag">>, SCtxs},
             {"flags_eval(mcp_sampling (atom name), Ctx)", nif_eval, mcp_sampling, SCtxs},
             {"flags_eval(static, #{})", nif_eval_empty_ctx, Static, SCtxs},
             {"flags_eval(static, Ctx) direct", nif_eval, Static, SCtxs},
             {"is_enabled(static, Ctx)", c, Static, SCtxs},
             {"pt evaluator (b), static", b, Static, SCtxs},
             {"pt evaluator with a key per flag, static", b_per_key, Static, SCtxs},
             {"ets:lookup(named table) + same evaluator, static", ets_named, Static, SCtxs},
             {"ets:lookup(tid from persistent_term) + same evaluator, static", ets_tid, Static, SCtxs},
             {"flags_eval(rollout, Ctx) direct", nif_eval, Rollout, RCtxs},
             {"is_enabled(rollout, Ctx)", c, Rollout, RCtxs},
             {"pt evaluator (b), rollout", b, Rollout, RCtxs},
             {"pt evaluator with a key per flag, rollout", b_per_key, Rollout, RCtxs},
             {"ets:lookup(named table) + same evaluator, rollout", ets_named, Rollout, RCtxs},
             {"flags_eval(condition, Ctx) direct", nif_eval, Cond, CCtxs},
             {"is_enabled(condition, Ctx)", c, Cond, CCtxs},
             {"pt evaluator (b), condition", b, Cond, CCtxs}],
    [measure(V, 1, N div 10, Name, Ctxs) || {_, V, Name, Ctxs} <- Items],
    Runs = [[element(1, measure(V, 1, N, Name, Ctxs)) || {_, V, Name, Ctxs} <- Items]
            || _ <- lists:seq(1, Reps)],
    Medians = [median([lists:nth(I, R) || R <- Runs]) || I <- lists:seq(1, length(Items))],
    lists:foreach(fun({{Label, _, _, _}, M}) -> io:format("  ~-70ts ~7.1f~n", [Label, M]) end,
                  lists:zip(Items, Medians)).
