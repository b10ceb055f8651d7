%% @doc NIF lifecycle (issue 15, item 6): the NIF stub module is reloaded in
%% a running VM while store handles are alive, and everything keeps serving.
%%
%% Two ways to reload `erlmcp_rollout_nif':
%% - `code:load_file/1' over the loaded module (an upgrade): the library has
%%   no upgrade callback, so the load fails cleanly and the loaded instance
%%   keeps serving;
%% - purge, delete, purge, then `code:load_file/1' (a second load): the same
%%   library instance takes its resource type over, so live handles, the
%%   open store registry and the flag engine carry on;
%% - the same, with the stub found in another application directory (a
%%   library at another path): refused, and a load from the first path then
%%   serves the live handles again.
-module(erlmcp_rollout_nif_reload_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, init_per_suite/1, end_per_suite/1]).
-export([upgrade_fails_cleanly_and_old_instance_serves/1,
         purge_and_reload_keeps_live_handles/1,
         another_library_path_is_refused/1]).

-define(M, erlmcp_rollout_nif).
-define(FLAGS, <<"{\"reload-flag\": {\"enabled\": true, \"rollout_percentage\": 100}}">>).

all() ->
    [upgrade_fails_cleanly_and_old_instance_serves, purge_and_reload_keeps_live_handles,
     another_library_path_is_refused].

init_per_suite(Config) ->
    {ok, _} = application:ensure_all_started(erlmcp_rollout),
    Config.

end_per_suite(_Config) ->
    ok.

upgrade_fails_cleanly_and_old_instance_serves(_Config) ->
    %% doc: code:load_file over the loaded stub fails (no upgrade callback)
    %% and the loaded library keeps serving handles and flags.
    {ok, S} = erlmcp_session_native:init(#{}),
    {ok, S} = erlmcp_session_native:store(<<"up-1">>, #{data => 1}, S),
    {ok, _} = ?M:flags_load_json(?FLAGS),
    ?assertMatch({error, _}, code:load_file(?M)),
    ?assert(erlang:function_exported(?M, session_get, 3)),
    ?assertMatch({ok, #{data := 1}, _}, erlmcp_session_native:fetch(<<"up-1">>, S)),
    ?assertEqual(true, ?M:flags_eval(<<"reload-flag">>, #{})).

purge_and_reload_keeps_live_handles(_Config) ->
    %% doc: with a live handle, purge + delete + purge + load of the stub
    %% module loads again; the handle still works (not badarg), new stores
    %% open, the flag engine keeps its configuration, and a handle opened
    %% after the reload is freed by the (taken-over) destructor.
    {ok, S} = erlmcp_session_native:init(#{}),
    {ok, S} = erlmcp_session_native:store(<<"live-1">>, #{data => live}, S),
    {ok, _} = ?M:flags_load_json(?FLAGS),
    Gen = element(1, ?M:flags_status()),
    reload(),
    ?assertMatch({ok, #{data := live}, _}, erlmcp_session_native:fetch(<<"live-1">>, S)),
    {ok, S} = erlmcp_session_native:store(<<"live-2">>, #{data => two}, S),
    ?assertMatch({ok, [_, _], _}, erlmcp_session_native:list(S)),
    ?assertEqual(true, ?M:flags_eval(<<"reload-flag">>, #{})),
    ?assertEqual(Gen, element(1, ?M:flags_status())),
    %% a store opened after the reload works, and dropping its handles is fine
    {ok, D} = erlmcp_session_native:init(#{store => {memory, after_reload}}),
    {ok, D} = erlmcp_session_native:store(<<"d">>, #{data => d}, D),
    ?assertMatch({ok, #{data := d}, _}, erlmcp_session_native:fetch(<<"d">>, D)),
    %% and a second round, with the first handle still alive
    reload(),
    ?assertMatch({ok, #{data := two}, _}, erlmcp_session_native:fetch(<<"live-2">>, S)),
    ?assertMatch({ok, #{data := d}, _}, erlmcp_session_native:fetch(<<"d">>, D)),
    erlang:garbage_collect(),
    ok.

another_library_path_is_refused(Config) ->
    %% doc: a copy of the application (stub and library) first in the code
    %% path: its load is refused with library_already_loaded (a second
    %% library instance would not know the live stores and handles); loading
    %% from the first path again serves the live handle and the flags.
    {ok, S} = erlmcp_session_native:init(#{}),
    {ok, S} = erlmcp_session_native:store(<<"path-1">>, #{data => path}, S),
    {ok, _} = ?M:flags_load_json(?FLAGS),
    Copy = filename:join(?config(priv_dir, Config), "copy/erlmcp_rollout"),
    Ebin = filename:join(Copy, "ebin"),
    ok = filelib:ensure_dir(filename:join(Ebin, "x")),
    ok = filelib:ensure_dir(filename:join([Copy, "priv", "x"])),
    {ok, _} = file:copy(code:which(?M), filename:join(Ebin, "erlmcp_rollout_nif.beam")),
    Lib = "liberlmcp_rollout_nif.so",
    {ok, _} = file:copy(filename:join(code:priv_dir(erlmcp_rollout), Lib), filename:join([Copy, "priv", Lib])),
    true = code:add_patha(Ebin),
    try
        ?assertEqual(filename:join(Copy, "priv"), code:priv_dir(erlmcp_rollout)),
        unload(),
        ?assertEqual({error, on_load_failure}, code:load_file(?M)),
        ?assertEqual(false, erlang:module_loaded(?M))
    after
        true = code:del_path(Ebin)
    end,
    ?assertEqual({module, ?M}, code:load_file(?M)),
    ?assertMatch({ok, #{data := path}, _}, erlmcp_session_native:fetch(<<"path-1">>, S)),
    ?assertEqual(true, ?M:flags_eval(<<"reload-flag">>, #{})).

%% Purge, delete, purge: the stub and its library are gone from the module table.
unload() ->
    _ = code:purge(?M),
    true = code:delete(?M),
    _ = code:purge(?M),
    ?assertEqual(false, erlang:module_loaded(?M)).

%% Purge, delete, purge, load: the second load of the NIF library.
reload() ->
    _ = code:purge(?M),
    true = code:delete(?M),
    _ = code:purge(?M),
    ?assertEqual(false, erlang:module_loaded(?M)),
    ?assertEqual({module, ?M}, code:load_file(?M)).
