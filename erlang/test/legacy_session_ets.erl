%% @doc A stand-in for erlmcp's `erlmcp_session_ets' backend (erlmcp is not a
%% dependency): the same callbacks and behaviour — `{Id, Session}' objects in
%% a named ordered_set, a fetch rewrites `last_accessed', expired sessions
%% stay readable until cleanup_expired/1.
-module(legacy_session_ets).
-export([init/1, store/3, fetch/2, delete/2, list/1, cleanup_expired/1]).

init(Opts) ->
    Name = maps:get(table_name, Opts, legacy_sessions_ets),
    case ets:whereis(Name) of
        undefined -> _ = ets:new(Name, [ordered_set, public, named_table]), ok;
        _ -> ok
    end,
    {ok, #{table_name => Name}}.

store(Id, Session, #{table_name := T} = S) ->
    true = ets:insert(T, {Id, Session}),
    {ok, S}.

fetch(Id, #{table_name := T} = S) ->
    case ets:lookup(T, Id) of
        [{Id, Session}] ->
            Updated = Session#{last_accessed => erlang:system_time(millisecond)},
            true = ets:insert(T, {Id, Updated}),
            {ok, Updated, S};
        [] ->
            {error, not_found, S}
    end.

delete(Id, #{table_name := T} = S) ->
    true = ets:delete(T, Id),
    {ok, S}.

list(#{table_name := T} = S) ->
    {ok, lists:usort([Id || {Id, _} <- ets:tab2list(T)]), S}.

cleanup_expired(#{table_name := T} = S) ->
    Now = erlang:system_time(millisecond),
    Expired = [Id || {Id, #{last_accessed := L, timeout_ms := To}} <- ets:tab2list(T),
                     To =/= infinity, Now - L > To],
    [ets:delete(T, Id) || Id <- Expired],
    {ok, length(Expired), S}.
