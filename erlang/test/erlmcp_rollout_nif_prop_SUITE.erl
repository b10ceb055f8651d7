%% @doc PropEr properties and garbage terms against the real NIF (DESIGN §3.2, §7):
%%
%%  * `erlmcp_rollout_nif:flags_phash2/2' equals `erlang:phash2/2' on random
%%    binaries (any bytes, 0..2000 long), atoms (up to 255 characters, any
%%    code point), integers (small, boundaries, bignums) and `{Salt, Value}';
%%  * every exported NIF, given garbage in each argument position, returns or
%%    raises `error:badarg' (never `nif_panicked', never a VM crash), and the
%%    flags evaluate correctly afterwards;
%%  * evaluations in 8 processes during reloads, overrides and reconfiguration
%%    all return booleans;
%%  * `erlmcp_feature_flags:is_enabled/2' equals an Erlang model of §3.2 on
%%    random contexts (atom or binary keys; binary, atom or integer values).
%%
%% Two NIF bugs this suite found keep their own regression cases:
%% `phash2_full_range' (Range 2^32) and `eval_custom_improper_answers'.
%%
%% Needs PropEr's headers (Debian: erlang-proper-dev). Run with
%% `rebar3 ct --suite erlmcp_rollout_nif_prop_SUITE'.
-module(erlmcp_rollout_nif_prop_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("proper/include/proper.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1,
         init_per_testcase/2, end_per_testcase/2]).
-export([phash2_binaries/1, phash2_atoms/1, phash2_integers/1, phash2_salted/1,
         phash2_full_range/1,
         garbage_random/0, garbage_random/1, garbage_nasty/1, eval_custom_improper_answers/1, concurrent_reload/1,
         model_is_enabled/1]).

-define(NIF, erlmcp_rollout_nif).
-define(ENV, production).
%% Ranges the NIF must agree on: the rollout range, 2^32-1, 2^31 (with 2^32-1
%% it pins down all 32 bits of the hash), 2^27 (phash2/1's range) and 7.
-define(RANGES, [100, 4294967295, 2147483648, 134217728, 7]).

suite() ->
    [{timetrap, {seconds, 120}}].

all() ->
    [phash2_binaries, phash2_atoms, phash2_integers, phash2_salted, phash2_full_range,
     model_is_enabled, garbage_random, garbage_nasty, eval_custom_improper_answers, concurrent_reload].

init_per_suite(Config) ->
    {module, ?NIF} = code:ensure_loaded(?NIF),
    {_, _, _} = ?NIF:flags_status(),  % the library is loaded, not the stubs
    Priv = ?config(priv_dir, Config),
    Path = filename:join(Priv, "prop_flags.json"),
    ok = file:write_file(Path, config_json()),
    persistent_term:put({?MODULE, config_path}, list_to_binary(Path)),
    {ok, Mem, memory} = ?NIF:session_open(memory, #{name => prop_garbage}),
    {ok, Disk, disk} = ?NIF:session_open({disk, filename:join(Priv, "garbage.redb")}, #{}),
    persistent_term:put({?MODULE, store_handles}, [Mem, Disk]),
    [{config_path, list_to_binary(Path)} | Config].

end_per_suite(_Config) ->
    _ = persistent_term:erase({?MODULE, config_path}),
    _ = persistent_term:erase({?MODULE, store_handles}),
    ok.

init_per_testcase(_Case, Config) ->
    restore(Config),
    Config.

end_per_testcase(_Case, Config) ->
    restore(Config),
    ok.

%% A known state: environment, no env overrides, the suite's config, no
%% runtime overrides of its flags, the system clock.
restore(Config) ->
    %% Garbage may have started an etcd watch (on an unreachable endpoint): stop it.
    ok = ?NIF:flags_unwatch_etcd(),
    ok = ?NIF:flags_configure(?ENV, <<>>),
    case ?NIF:flags_load_json(config_json()) of
        {ok, _} -> ok;
        {error, Problems} -> ct:fail({config_rejected, Problems})
    end,
    [ok = ?NIF:flags_set_override(N, clear) || N <- maps:keys(model_flags())],
    _ = [?NIF:flags_set_clock(system) || erlang:function_exported(?NIF, flags_set_clock, 1)],
    _ = Config,
    ok.

%%% Helpers

check(Prop, NumTests) ->
    Opts = [{numtests, NumTests}, {on_output, fun(F, A) -> ct:log(F, A) end}],
    case proper:quickcheck(Prop, Opts) of
        true -> ok;
        Other -> ct:fail({property_failed, Other, proper:counterexample()})
    end.

%% NIF hash equals erlang:phash2 for every range in ?RANGES and 2^32.
same_hash(T) ->
    Ranges = [4294967296 | ?RANGES],
    Bad = [{R, Want, Got} || R <- Ranges,
                             {Want, Got} <- [{erlang:phash2(T, R), ?NIF:flags_phash2(T, R)}],
                             Got =/= Want],
    ?WHENFAIL(ct:pal("phash2 mismatch for ~p:~n~p", [T, Bad]), Bad =:= []).

%%% Generators (names must not clash with PropEr's imports)

gen_bin() ->
    oneof([?LET(N, choose(0, 2000), binary(N)),
           ?LET(N, choose(0, 16), binary(N)),
           binary(),
           ?LET(S, utf8(), S)]).

gen_char() ->
    frequency([{4, choose(0, 127)}, {3, choose(128, 255)}, {2, choose(256, 16#7FF)},
               {1, choose(16#800, 16#D7FF)}, {1, choose(16#E000, 16#FFFD)},
               {1, choose(16#10000, 16#10FFFF)}]).

gen_atom() ->
    ?LET(Chars, oneof([?LET(N, choose(0, 255), vector(N, gen_char())), list(gen_char())]),
         binary_to_atom(unicode:characters_to_binary(Chars), utf8)).

gen_int() ->
    oneof([integer(),
           choose(-(1 bsl 27), 1 bsl 27),
           %% around the small/big boundary (2^59..2^60) and i64/u64 limits
           ?LET({B, D, Neg}, {choose(26, 70), choose(-3, 3), boolean()},
                case Neg of true -> -((1 bsl B) + D); false -> (1 bsl B) + D end),
           ?LET({N, S}, {integer(), choose(0, 400)}, N bsl S),
           ?LET({N, S}, {integer(), choose(0, 400)}, (N bsl S) + 1),
           ?LET(N, integer(), N bsl 200)]).

gen_value() ->
    oneof([gen_bin(), gen_atom(), gen_int()]).

%%% 1. phash2 parity

phash2_binaries(_Config) ->
    check(?FORALL(B, gen_bin(), same_hash(B)), 3000).

phash2_atoms(_Config) ->
    Fixed = [a, '', 'ä', 'Ω', '日本', binary_to_atom(<<16#10FFFF/utf8>>, utf8),
             list_to_atom(lists:duplicate(255, $z)), list_to_atom(lists:duplicate(255, 255)),
             binary_to_atom(unicode:characters_to_binary(lists:duplicate(255, 16#1F600)), utf8)],
    [true = (?NIF:flags_phash2(A, R) =:= erlang:phash2(A, R)) || A <- Fixed, R <- ?RANGES],
    check(?FORALL(A, gen_atom(), same_hash(A)), 2000).

phash2_integers(_Config) ->
    Fixed = [0, 1, -1, (1 bsl 27) - 1, 1 bsl 27, (1 bsl 59) - 1, 1 bsl 59, -(1 bsl 59), -(1 bsl 59) - 1,
             (1 bsl 63) - 1, 1 bsl 63, -(1 bsl 63), -(1 bsl 63) - 1, (1 bsl 64) - 1, 1 bsl 64,
             1 bsl 1000, -(1 bsl 1000), 1 bsl 100000],
    [true = (?NIF:flags_phash2(I, R) =:= erlang:phash2(I, R)) || I <- Fixed, R <- ?RANGES],
    check(?FORALL(I, gen_int(), same_hash(I)), 3000).

phash2_salted(_Config) ->
    check(?FORALL({Salt, V}, {oneof([gen_bin(), binary()]), gen_value()}, same_hash({Salt, V})), 3000).

%% erlang:phash2(T, 4294967296) is valid (the whole 32-bit hash, DESIGN
%% §3.2/NOTES); the NIF's spec says `pos_integer()'.
phash2_full_range(_Config) ->
    %% doc: Range 2^32 gives the whole 32-bit hash, as erlang:phash2/2 does.
    check(?FORALL(V, gen_value(), ?NIF:flags_phash2(V, 4294967296) =:= erlang:phash2(V, 4294967296)), 1000).

%%% 2. garbage to every NIF

nifs() ->
    [{F, A} || {F, A} <- ?NIF:module_info(exports), F =/= module_info].

%% One valid argument list per NIF (so garbage can go in one position only).
valid_args(flags_eval) -> [<<"f_roll">>, #{session_id => <<"s-1">>}];
valid_args(flags_eval_custom) -> [<<"f_cond">>, #{user_id => <<"u-1">>}, [{<<"beta">>, true}], []];
valid_args(flags_eval_details) -> [<<"f_cond">>, #{user_id => <<"u-1">>}, [], [{{1.5}, 7}]];
valid_args(flags_eval_rollout) -> [<<"f_roll">>, {<<"any">>, 1.5}, [], []];
valid_args(flags_erlmcp_get) -> [<<"f_roll">>];
valid_args(flags_erlmcp_set) -> [<<"prop_garbage_set">>, #{value => true, state => rollout}, <<"prop">>];
valid_args(flags_import_json) -> [config_json(), <<"prop">>];
valid_args(flags_load_file_now) -> [persistent_term:get({?MODULE, config_path})];
valid_args(flags_configure) -> [?ENV, <<>>];
valid_args(flags_load_json) -> [config_json()];
valid_args(flags_load_file) -> [persistent_term:get({?MODULE, config_path})];
valid_args(flags_set_override) -> [<<"no_such_flag_garbage">>, clear];
valid_args(flags_explain) -> [<<"f_cond">>, #{user_id => 'u-1'}, []];
valid_args(flags_phash2) -> [<<"session-1">>, 100];
valid_args(flags_set_clock) -> [system];
valid_args(flags_watch_etcd) -> [[<<"127.0.0.1:1">>], <<"prop/flags">>, #{}];
valid_args(session_open) -> [memory, #{name => prop_garbage}];
valid_args(session_put) -> [store_handle(), make_ref(), <<"g-1">>, {0, 0, 1000, <<>>}];
valid_args(session_touch) -> [store_handle(), make_ref(), <<"g-1">>];
valid_args(session_get) -> [store_handle(), make_ref(), <<"g-1">>];
valid_args(session_delete) -> [store_handle(), make_ref(), <<"g-1">>];
valid_args(session_list_page) -> [store_handle(), make_ref(), start, 10];
valid_args(session_sweep) -> [store_handle(), make_ref()];
valid_args(session_get_many) -> [store_handle(), make_ref(), [<<"g-1">>, <<"g-2">>]];
valid_args(session_apply_batch) -> [store_handle(), make_ref(), [{<<"g-2">>, {0, 0, infinity, <<>>}, 1}]];
valid_args(session_set_clock) -> [system];
valid_args(_) -> undefined.

%% A memory or a disk store (the disk one answers by message).
store_handle() ->
    Handles = persistent_term:get({?MODULE, store_handles}),
    lists:nth(rand:uniform(length(Handles)), Handles).

%% Call F with Args; true if it returned or raised error:badarg.
call_ok(F, Args0) ->
    Args = safe_args(F, Args0),
    T0 = erlang:monotonic_time(millisecond),
    try apply(?NIF, F, Args) of
        _ -> slow(F, Args, T0), true
    catch
        error:badarg -> slow(F, Args, T0), true;
        Class:Reason -> unexpected(F, Args, Class, Reason)
    end.

slow(F, Args, T0) ->
    case erlang:monotonic_time(millisecond) - T0 of
        Ms when Ms > 100 -> ct:log("slow: ~p/~b took ~b ms with ~P", [F, length(Args), Ms, Args, 8]);
        _ -> ok
    end.

unexpected(F, Args, Class, Reason) ->
    ct:pal("~p/~b raised ~p:~P with ~P", [F, length(Args), Class, Reason, 30, Args, 12]),
    false.

%% flags_load_file must not read arbitrary (huge or special) files: a path
%% that names anything existing (but the suite's config) becomes one that does not.
safe_args(F, [P]) when (F =:= flags_load_file orelse F =:= flags_load_file_now), is_binary(P) ->
    Ours = persistent_term:get({?MODULE, config_path}),
    Exists = P =/= Ours andalso try file:read_file_info(P) of
                 {ok, _} -> true;
                 _ -> false
             catch _:_ -> false
             end,
    case Exists of
        true -> [<<"/nonexistent/erlmcp_prop/flags.json">>];
        false -> [P]
    end;
safe_args(_F, Args) ->
    Args.

%% Atoms made once (generating long atoms is slow in PropEr).
some_atoms() ->
    [binary_to_atom(unicode:characters_to_binary(Cs), utf8)
     || Cs <- ["a", "", "\x{e4}", "\x{3a9}\x{65e5}", [16#10FFFF], lists:duplicate(255, $z),
               lists:duplicate(255, 255), lists:duplicate(255, 16#1F600), "session_id", "f_roll", "f_all"]].

leaf() ->
    oneof([integer(), float(), gen_int(), elements(some_atoms()), binary(), bitstring(),
           ?LET(N, choose(0, 300), binary(N)),
           elements([true, false, clear, system, undefined, nil, ok, production, dev, '',
                     <<"f_roll">>, <<"f_cond">>, f_all, <<"mcp_sampling">>, <<>>, [], {},
                     -1, 0, 4294967296, 1 bsl 64, -(1 bsl 64), 1.0e308, -0.0, 100,
                     <<"all_enabled">>, <<"all_disabled">>, <<"f_all:disabled">>, <<"x:bogus">>,
                     <<"{}">>, <<"{\"f\": {\"enabled\": true}}">>, <<"[1,2">>, <<255, 0, 254>>,
                     <<"/nonexistent/x.json">>, "f_roll", [{<<"beta">>, true}], [{<<"beta">>, 1}],
                     [{beta, true} | x], {<<"salt">>, 1.5}, {<<"salt">>}, {<<"salt">>, <<"v">>, x}]),
           exactly(self()), exactly(make_ref()), exactly(fun(X) -> X end), exactly(fun lists:map/2),
           exactly(hd(erlang:ports()))]).

%% Capped size: PropEr's generation of large nested terms takes 100s of ms;
%% the nasty case covers the huge and deep terms.
garbage() ->
    ?SIZED(S, garbage(min(S, 12))).

garbage(S) when S < 2 ->
    leaf();
garbage(S) ->
    Sub = ?LAZY(garbage(S div 3)),
    frequency([{6, leaf()},
               {1, list(Sub)},
               {1, ?LET(L, list(Sub), list_to_tuple(L))},
               {1, ?LET({L, T}, {list(Sub), leaf()}, improper(L, T))},
               {2, ?LET(L, list({Sub, Sub}), maps:from_list(L))},
               {2, ?LET(L, list({elements([session_id, <<"session_id">>, user_id, <<"user_id">>,
                                            session_type, tier, <<"tier">>]), Sub}),
                    maps:from_list(L))}]).

improper([], T) -> T;
improper(L, T) -> lists:foldr(fun(E, Acc) -> [E | Acc] end, T, L).

%% Each position: garbage, or the valid argument.
args_gen(F, A) ->
    case valid_args(F) of
        undefined -> vector(A, garbage());
        Valid -> [frequency([{2, garbage()}, {1, exactly(V)}]) || V <- Valid]
    end.

%% 4000 calls with random garbage take about a minute on an idle 2-core machine; the
%% suite's 120 s would fail it on a loaded one, which says nothing about the NIFs.
garbage_random() ->
    [{timetrap, {seconds, 600}}].

garbage_random(Config) ->
    Nifs = nifs(),
    ct:log("NIFs: ~p", [Nifs]),
    Prop = ?FORALL({F, Args}, ?LET({F, A}, elements(Nifs), {F, args_gen(F, A)}), call_ok(F, Args)),
    check(Prop, 4000),
    restore(Config),
    still_evaluates().

garbage_nasty(Config) ->
    Nasty = nasty_terms(),
    Nifs = nifs(),
    Failures =
        [{F, Pos, describe(T)}
         || {F, A} <- Nifs, A > 0,
            Pos <- lists:seq(1, A),
            T <- Nasty,
            not call_ok(F, put_at(Pos, T, base_args(F, A)))],
    %% All positions garbage at once.
    Failures2 = [{F, all, describe(T)} || {F, A} <- Nifs, A > 0, T <- Nasty,
                                         not call_ok(F, lists:duplicate(A, T))],
    %% Zero-arity NIFs after all that.
    [true = call_ok(F, []) || {F, 0} <- Nifs],
    restore(Config),
    still_evaluates(),
    case Failures ++ Failures2 of
        [] -> ok;
        Fs -> ct:fail({not_badarg, Fs})
    end.

base_args(F, A) ->
    case valid_args(F) of
        undefined -> lists:duplicate(A, undefined);
        Valid -> Valid
    end.

put_at(Pos, T, Args) ->
    {Before, [_ | After]} = lists:split(Pos - 1, Args),
    Before ++ [T | After].

describe(T) when is_binary(T), byte_size(T) > 64 -> {binary, byte_size(T)};
describe(T) when is_map(T), map_size(T) > 16 -> {map, map_size(T)};
describe(T) -> {term, lists:flatten(io_lib:format("~0P", [T, 6]))}.

nasty_terms() ->
    Deep = 10000,
    DeepList = lists:foldl(fun(_, Acc) -> [Acc] end, [], lists:seq(1, Deep)),
    DeepTuple = lists:foldl(fun(_, Acc) -> {Acc} end, {}, lists:seq(1, Deep)),
    DeepMap = lists:foldl(fun(_, Acc) -> #{session_id => Acc} end, #{}, lists:seq(1, Deep)),
    Big = rand:bytes(10 bsl 20),
    BigSub = binary:part(Big, 1, (10 bsl 20) - 2),
    HugeMap = maps:from_list([{integer_to_binary(I), I} || I <- lists:seq(1, 100000)]),
    HugeAtomMap = maps:from_list([{{k, I}, I} || I <- lists:seq(1, 50000)] ++ [{session_id, 1.5}]),
    DeepJson = iolist_to_binary([lists:duplicate(Deep, $[), lists:duplicate(Deep, $])]),
    DeepJsonObj = iolist_to_binary([lists:duplicate(Deep, <<"{\"a\":">>), <<"1">>, lists:duplicate(Deep, $})]),
    BigJson = iolist_to_binary([<<"{">>, lists:join(<<",">>, [[<<"\"f">>, integer_to_binary(I), <<"\":{\"enabled\":true}">>]
                                                              || I <- lists:seq(1, 20000)]), <<"}">>]),
    Bad = [1.5, -0.0, 1.0e308, self(), make_ref(), fun(X) -> X end, fun lists:map/2, hd(erlang:ports()),
           {}, {a}, {a, b, c, d, e, f, g}, {<<"salt">>}, {<<"salt">>, 1.5}, {<<"salt">>, {x}},
           {1, <<"v">>}, {salt, <<"v">>}, {<<"salt">>, <<"v">>, extra},
           [a | b], [<<"a">> | <<"b">>], [{<<"beta">>, true} | tail], [{<<"beta">>, 'maybe'}], [{1, true}],
           "f_roll", [], <<1:3>>, <<>>, <<0>>, <<255, 254, 253>>, <<"f_roll", 0>>,
           DeepList, DeepTuple, DeepMap, Big, BigSub, HugeMap, HugeAtomMap, DeepJson, DeepJsonObj, BigJson,
           1 bsl 100000, -(1 bsl 64), 1 bsl 64, 4294967296, -1, 0, 1 bsl 63, -(1 bsl 63) - 1,
           '', 'ok', 'clear', 'system', '日本語', list_to_atom(lists:duplicate(255, 16#10FFFF)),
           #{}, #{session_id => 1.5}, #{session_id => {a, b}}, #{<<"session_id">> => [1, 2]},
           #{user_id => self(), session_type => make_ref()}, #{user_id => 1.0e10, tier => {1}},
           #{session_id => DeepList}, #{session_id => Big}, #{user_id => Big},
           #{session_id => 1 bsl 100000}, #{1.5 => 1, {a} => 2, [x] => 3},
           #{session_id => <<"s">>, <<"session_id">> => 1.5, user_id => 'u-1', session_type => streaming}],
    Bad.

%% After garbage, the restored config still evaluates as the model says.
still_evaluates() ->
    true = erlmcp_feature_flags:is_enabled(<<"f_all">>, #{}),
    false = erlmcp_feature_flags:is_enabled(<<"f_disabled">>, #{}),
    true = erlmcp_feature_flags:is_enabled(f_ops, #{tier => gold, user_id => <<"u-7">>}),
    ok = ?NIF:session_set_clock(system),
    [sessions_still_work(H) || H <- persistent_term:get({?MODULE, store_handles})],
    check(prop_model(), 300).

%% After garbage, each session store still stores and reads back.
sessions_still_work(H) ->
    Fields = {1, ?NIF:session_now(), infinity, <<"after garbage">>},
    Put = make_ref(),
    ok = await(Put, ?NIF:session_put(H, Put, <<"survivor">>, Fields)),
    Get = make_ref(),
    {ok, {1, _, infinity, <<"after garbage">>, _}} = await(Get, ?NIF:session_get(H, Get, <<"survivor">>)).

await(Tag, async) -> receive {Tag, R} -> R after 10000 -> error(no_reply) end;
await(_Tag, R) -> R.

%% rustler 0.39 decodes `Vec<T>' with a list iterator that panics at an
%% improper tail ("list iterator found improper list"); flags_eval_custom/4
%% checks the lists first, so Answers = [{Name, Bool} | NotAList] is badarg,
%% and so are such Hashes.
eval_custom_improper_answers(_Config) ->
    %% doc: improper answer lists are badarg (rustler's Vec decoding would panic on them).
    Cases = [[{<<"beta">>, true} | tail], [{<<"beta">>, true}, {<<"x">>, false} | <<"t">>],
             [{<<"beta">>, true} | #{}]],
    [?assertError(badarg, ?NIF:flags_eval_custom(<<"f_cond">>, #{user_id => <<"u-1">>}, A, [])) || A <- Cases],
    HashCases = [[{{1.5}, 1} | tail], [{{1.5}, -1}], [{{1.5}, 1 bsl 32}], [{{1.5}}]],
    [?assertError(badarg, ?NIF:flags_eval_custom(<<"f_roll">>, #{session_id => {1.5}}, [], H)) || H <- HashCases],
    ok.

%% Evaluations in 8 processes while another process reloads valid and
%% invalid configs, sets and clears overrides and reconfigures: every
%% evaluation returns a boolean, every reload ok or {error, _}; then the
%% suite's config evaluates as the model says.
concurrent_reload(Config) ->
    Other = <<"{\"f_roll\": {\"enabled\": false}, \"f_new\": {\"enabled\": true, \"rollout_percentage\": 5,
               \"stickiness\": \"tenant\", \"salt\": \"x\"}}">>,
    Invalid = <<"{\"f_roll\": {\"enabled\": 1}}">>,
    Self = self(),
    Deadline = erlang:monotonic_time(millisecond) + 3000,
    Names = [<<"f_roll">>, f_roll, <<"f_cond">>, f_new, <<"f_new">>, <<"f_ops">>, <<"nope">>],
    Eval = fun Loop(I, N) ->
                   case erlang:monotonic_time(millisecond) < Deadline of
                       false -> Self ! {evals, N};
                       true ->
                           Ctx = #{session_id => integer_to_binary(I), <<"tenant">> => I,
                                   user_id => <<"u-1">>, session_type => streaming, tier => gold},
                           [true = is_boolean(erlmcp_feature_flags:is_enabled(Nm, Ctx)) || Nm <- Names],
                           Loop(I + 1, N + length(Names))
                   end
           end,
    Evaluators = [spawn_link(fun() -> Eval(I * 1000000, 0) end) || I <- lists:seq(1, 8)],
    Reload = fun Loop(N) ->
                         case erlang:monotonic_time(millisecond) < Deadline of
                             false -> Self ! {reloads, N};
                             true ->
                                 {ok, _} = ?NIF:flags_load_json(Other),
                                 ok = ?NIF:flags_set_override(f_new, false),
                                 {error, [_ | _]} = ?NIF:flags_load_json(Invalid),
                                 {ok, _} = ?NIF:flags_load_json(config_json()),
                                 ok = ?NIF:flags_set_override(<<"f_new">>, clear),
                                 ok = ?NIF:flags_configure(dev, <<"all_enabled">>),
                                 ok = ?NIF:flags_configure(?ENV, <<>>),
                                 _ = ?NIF:flags_details(),
                                 _ = ?NIF:flags_metrics_text(),
                                 Loop(N + 1)
                         end
             end,
    Reloader = spawn_link(fun() -> Reload(0) end),
    Evals = lists:sum([receive {evals, N} -> N after 30000 -> ct:fail(evaluator_stuck) end || _ <- Evaluators]),
    Reloads = receive {reloads, R} -> R after 30000 -> ct:fail({reloader_stuck, Reloader}) end,
    ct:log("~b evaluations during ~b reload rounds", [Evals, Reloads]),
    true = Reloads > 0,
    restore(Config),
    still_evaluates().

%%% 3. is_enabled/2 against a model of DESIGN §3.2

config_json() ->
    <<"{
  \"f_all\": {\"enabled\": true},
  \"f_disabled\": {\"enabled\": false, \"rollout_percentage\": 100},
  \"f_env_off\": {\"enabled\": true, \"environments\": [\"dev\", \"test\"]},
  \"f_env_none\": {\"enabled\": true, \"environments\": []},
  \"f_roll\": {\"enabled\": true, \"rollout_percentage\": 30, \"environments\": [\"staging\", \"production\"]},
  \"f_salt\": {\"enabled\": true, \"rollout_percentage\": 50, \"salt\": \"s1\"},
  \"f_sticky\": {\"enabled\": true, \"rollout_percentage\": 40, \"stickiness\": \"user_id\", \"salt\": \"cohort-2\"},
  \"f_cond\": {\"enabled\": true, \"rollout_percentage\": 70,
             \"conditions\": [{\"user_id\": \"u-1\"}, {\"session_type\": \"streaming\"}]},
  \"f_ops\": {\"enabled\": true, \"environments\": [\"production\"],
            \"conditions\": [{\"attribute\": \"tier\", \"op\": \"in\", \"values\": [\"gold\", \"silver\", 7]},
                           {\"attribute\": \"user_id\", \"op\": \"prefix\", \"values\": [\"u-\", \"admin\"]}]},
  \"f_zero\": {\"enabled\": true, \"rollout_percentage\": 0, \"metadata\": {\"phase\": 2}}
}">>.

%% The same config as the model reads it.
model_flags() ->
    D = #{enabled => false, pct => 100, envs => all, salt => undefined, sticky => <<"session_id">>, conds => []},
    #{<<"f_all">> => D#{enabled => true},
      <<"f_disabled">> => D,
      <<"f_env_off">> => D#{enabled => true, envs => [<<"dev">>, <<"test">>]},
      <<"f_env_none">> => D#{enabled => true, envs => []},
      <<"f_roll">> => D#{enabled => true, pct => 30, envs => [<<"staging">>, <<"production">>]},
      <<"f_salt">> => D#{enabled => true, pct => 50, salt => <<"s1">>},
      <<"f_sticky">> => D#{enabled => true, pct => 40, sticky => <<"user_id">>, salt => <<"cohort-2">>},
      <<"f_cond">> => D#{enabled => true, pct => 70,
                         conds => [{eq, <<"user_id">>, <<"u-1">>}, {eq, <<"session_type">>, <<"streaming">>}]},
      <<"f_ops">> => D#{enabled => true, envs => [<<"production">>],
                        conds => [{in, <<"tier">>, [<<"gold">>, <<"silver">>], [7]},
                                  {prefix, <<"user_id">>, [<<"u-">>, <<"admin">>]}]},
      <<"f_zero">> => D#{enabled => true, pct => 0}}.

%% DESIGN §3.2 (no overrides, no schedules in this config).
model(Name, Ctx) ->
    case maps:find(name_bin(Name), model_flags()) of
        error -> false;                                          % 1. unknown
        {ok, #{enabled := false}} -> false;                      % 4. disabled
        {ok, #{envs := Envs} = F} ->
            Env = atom_to_binary(?ENV, utf8),
            (Envs =:= all orelse lists:member(Env, Envs))        % 5. environment
                andalso in_rollout(F, Ctx)                       % 6. rollout
                andalso lists:all(fun(C) -> cond_holds(C, Ctx) end, maps:get(conds, F))  % 7.
    end.

name_bin(N) when is_atom(N) -> atom_to_binary(N, utf8);
name_bin(N) -> N.

in_rollout(#{pct := 100}, _Ctx) -> true;
in_rollout(#{pct := Pct, salt := Salt, sticky := Key}, Ctx) ->
    V = case ctx_get(Key, Ctx) of
            {ok, X} -> X;
            error -> <<>>
        end,
    Bucket = case Salt of
                 undefined -> erlang:phash2(V, 100);
                 _ -> erlang:phash2({Salt, V}, 100)
             end,
    Bucket < Pct.

cond_holds({eq, Key, Text}, Ctx) ->
    case ctx_get(Key, Ctx) of
        {ok, V} -> text(V) =:= Text;
        error -> false
    end;
cond_holds({in, Key, Texts, Ints}, Ctx) ->
    case ctx_get(Key, Ctx) of
        {ok, V} when is_integer(V) -> lists:member(V, Ints);
        {ok, V} -> lists:member(text(V), Texts);
        error -> false
    end;
cond_holds({prefix, Key, Prefixes}, Ctx) ->
    case ctx_get(Key, Ctx) of
        {ok, V} ->
            case text(V) of
                none -> false;
                T -> lists:any(fun(P) -> binary:longest_common_prefix([T, P]) =:= byte_size(P) end, Prefixes)
            end;
        error -> false
    end.

%% Atom key first, then binary key.
ctx_get(Key, Ctx) ->
    A = binary_to_atom(Key, utf8),
    case Ctx of
        #{A := V} -> {ok, V};
        #{Key := V} -> {ok, V};
        #{} -> error
    end.

text(V) when is_atom(V) -> atom_to_binary(V, utf8);
text(V) when is_binary(V) -> V;
text(_) -> none.

ctx_key() ->
    elements([session_id, <<"session_id">>, user_id, <<"user_id">>, session_type, <<"session_type">>,
              tier, <<"tier">>, transport, <<"other">>]).

ctx_value() ->
    frequency([{4, elements([<<"u-1">>, 'u-1', <<"u-2">>, 'u-', <<"u-">>, <<"admin-7">>, <<"streaming">>,
                             streaming, batch, <<"gold">>, gold, silver, <<"silver ">>, 7, <<"7">>, '7',
                             <<>>, '', 0, -7, 1 bsl 70])},
               {2, ?LET(I, choose(1, 100000), <<"session-", (integer_to_binary(I))/binary>>)},
               {1, gen_bin()}, {1, gen_atom()}, {1, gen_int()}, {2, foreign_value()}]).

%% Terms the reference accepts as context values and the NIF does not read
%% itself: never equal to a configured value, bucketed by erlang:phash2/2.
foreign_value() ->
    oneof([float(), {gen_bin()}, {<<"u-1">>}, [<<"u-1">>], list(int()), "u-1", ?LET(I, int(), #{k => I}),
           elements([self(), make_ref(), 1.0, -0.0, {}, []])]).

ctx_gen() ->
    ?LET(Pairs, list({ctx_key(), ctx_value()}), maps:from_list(Pairs)).

flag_name() ->
    ?LET({N, AsAtom}, {elements(maps:keys(model_flags()) ++ [<<"f_unknown">>, <<"F_ALL">>, <<>>]), boolean()},
         case AsAtom of true -> binary_to_atom(N, utf8); false -> N end).

%% For a failure report: the NIF's explanation, or what it raised.
explain_or_exception(Name, Ctx) ->
    try erlmcp_feature_flags:explain(Name, Ctx)
    catch C:E -> {C, E}
    end.

prop_model() ->
    ?FORALL({Name, Ctx}, {flag_name(), ctx_gen()},
            begin
                Got = erlmcp_feature_flags:is_enabled(Name, Ctx),
                Want = model(Name, Ctx),
                ?WHENFAIL(ct:pal("~p ~p: is_enabled ~p, model ~p~nexplain: ~p",
                                 [Name, Ctx, Got, Want, explain_or_exception(Name, Ctx)]),
                          Got =:= Want)
            end).

model_is_enabled(_Config) ->
    %% Every flag gets both outcomes over a few contexts (the model is not vacuous).
    Outcomes = [{N, lists:usort([model(N, #{session_id => <<"session-", (integer_to_binary(I))/binary>>,
                                            user_id => U, session_type => streaming, tier => gold})
                                 || I <- lists:seq(1, 200),
                                    U <- [<<"u-1">>, <<"x">> | [integer_to_binary(J) || J <- lists:seq(1, 20)]]])}
                || N <- [<<"f_roll">>, <<"f_salt">>, <<"f_sticky">>, <<"f_cond">>, <<"f_ops">>]],
    [] = [O || {_, L} = O <- Outcomes, L =/= [false, true]],
    check(prop_model(), 4000).
