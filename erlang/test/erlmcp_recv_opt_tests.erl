%% @doc Every receive in the application's modules compiles with the
%% reference-tag optimization (`erlc +recv_opt_info' says OPTIMIZED): a reply
%% receive inside erlmcp's busy session gen_server then skips the messages
%% queued before the call instead of scanning them. A receive the compiler
%% reports NOT OPTIMIZED fails this test with its file and line.
-module(erlmcp_recv_opt_tests).
-include_lib("eunit/include/eunit.hrl").

every_receive_is_optimized_test_() ->
    _ = application:load(erlmcp_rollout),
    {ok, Mods} = application:get_key(erlmcp_rollout, modules),
    [{atom_to_list(M), fun() -> ?assertEqual([], not_optimized(source(M))) end} || M <- Mods].

source(M) ->
    proplists:get_value(source, M:module_info(compile)).

%% The compiler's NOT OPTIMIZED reports for File, as {Line, Text}.
not_optimized(File) ->
    {ok, _, _, Warnings} = compile:file(File, [recv_opt_info, binary, return_warnings, return_errors]),
    [{Loc, lists:flatten(Mod:format_error(W))}
     || {_, Ws} <- Warnings, {Loc, Mod, W} <- Ws,
        string:find(lists:flatten(Mod:format_error(W)), "NOT OPTIMIZED") =/= nomatch].
