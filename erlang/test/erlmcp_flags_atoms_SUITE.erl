%% @doc Atom creation from pushed flag configs is bounded (issue 15, item 8):
%% publishing a config takes only atoms that already exist, so flag names
%% and context keys of a config create no atoms; names without an atom are
%% still evaluated (binary names and keys, and atoms made after the push).
-module(erlmcp_flags_atoms_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, init_per_suite/1, end_per_suite/1]).
-export([pushed_config_creates_no_atoms/1]).

-define(N, 2000).
%% Atoms the test run itself may make meanwhile (code loading, logger):
%% far below the 2 x N names of the config.
-define(SLACK, 100).

all() ->
    [pushed_config_creates_no_atoms].

init_per_suite(Config) ->
    {ok, _} = application:ensure_all_started(erlmcp_rollout),
    Config.

end_per_suite(_Config) ->
    ok.

pushed_config_creates_no_atoms(_Config) ->
    %% doc: a config naming 2000 never-seen flags, each reading a never-seen
    %% context key, grows the atom table by (nearly) nothing; evaluation by
    %% binary name/key, and by atoms made after the push, still works.
    U = integer_to_list(erlang:unique_integer([positive])),
    Flag = fun(I) -> "never_seen_flag_" ++ U ++ "_" ++ integer_to_list(I) end,
    Key = fun(I) -> "never_seen_key_" ++ U ++ "_" ++ integer_to_list(I) end,
    Entries = [["\"", Flag(I), "\": {\"enabled\": true, \"conditions\": [{\"attribute\": \"", Key(I),
                "\", \"op\": \"in\", \"values\": [\"x\"]}]}"] || I <- lists:seq(1, ?N)],
    Json = iolist_to_binary(["{", lists:join(", ", Entries), "}"]),
    Before = erlang:system_info(atom_count),
    {ok, #{flags := ?N}} = erlmcp_rollout_nif:flags_load_json(Json),
    Grown = erlang:system_info(atom_count) - Before,
    ct:log("atom_count grew by ~p while publishing ~p flag names and ~p keys", [Grown, ?N, ?N]),
    ?assert(Grown < ?SLACK),
    ?assertEqual(false, lists:any(fun(I) -> exists(Flag(I)) orelse exists(Key(I)) end, lists:seq(1, ?N))),
    %% binary names and keys
    B = fun(S) -> list_to_binary(S) end,
    ?assertEqual(true, erlmcp_rollout_nif:flags_eval(B(Flag(1)), #{B(Key(1)) => <<"x">>})),
    ?assertEqual(false, erlmcp_rollout_nif:flags_eval(B(Flag(1)), #{B(Key(1)) => <<"y">>})),
    %% atoms made after the push (the test makes them on purpose)
    A = list_to_atom(Flag(2)),
    K = list_to_atom(Key(2)),
    ?assertEqual(true, erlmcp_rollout_nif:flags_eval(A, #{K => <<"x">>})),
    ?assertEqual(false, erlmcp_rollout_nif:flags_eval(A, #{K => <<"y">>})),
    ?assertEqual(unknown, erlmcp_rollout_nif:flags_eval(list_to_atom("never_seen_other_" ++ U), #{})).

exists(Name) ->
    try list_to_existing_atom(Name) of
        _ -> true
    catch
        error:badarg -> false
    end.
