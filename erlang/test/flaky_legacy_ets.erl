%% @doc Fault injection over `legacy_session_ets': every Nth store/3 and every
%% Nth delete/2 fails (before touching the table), as a legacy backend with a
%% failing disk or a Mnesia abort would. `init(#{table_name => T, fail_every => N})'.
-module(flaky_legacy_ets).
-export([init/1, store/3, fetch/2, delete/2, list/1, cleanup_expired/1]).

init(#{fail_every := N} = Opts) ->
    {ok, L} = legacy_session_ets:init(Opts),
    Counter = counters:new(2, []),
    {ok, L#{fail_every => N, counter => Counter}}.

store(Id, Session, S) ->
    case failing(1, S) of
        true -> {error, injected_store_failure};
        false -> legacy_session_ets:store(Id, Session, S)
    end.

delete(Id, S) ->
    case failing(2, S) of
        true -> {error, injected_delete_failure, S};
        false -> legacy_session_ets:delete(Id, S)
    end.

fetch(Id, S) -> legacy_session_ets:fetch(Id, S).
list(S) -> legacy_session_ets:list(S).
cleanup_expired(S) -> legacy_session_ets:cleanup_expired(S).

failing(Ix, #{fail_every := N, counter := C}) ->
    ok = counters:add(C, Ix, 1),
    counters:get(C, Ix) rem N =:= 0.
