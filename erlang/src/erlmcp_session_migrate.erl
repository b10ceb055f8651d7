%% @doc Legacy cutover: import erlmcp's DETS files, Mnesia tables and live
%% ETS tables into a native session store, verify what was copied, and drain
%% a running erlmcp session service into a native store. Replaces the
%% reference's `scripts/migrate_session_backend.erl' (counts only, no
%% resume, no verification).
%%
%% ```
%% {ok, #{copied := C, skipped := 0, verified := C}} =
%%     erlmcp_session_migrate:import({dets, "data/sessions.dets"},
%%                                   {disk, "data/sessions.redb"}, #{}).
%% '''
%%
%% Formats (erlmcp's own): DETS and ETS objects `{Id, SessionMap}', Mnesia
%% records `{erlmcp_session, Id, SessionMap, LastAccessedMs}'. Sessions are
%% stored exactly as `erlmcp_session_native:store/3' would (so they read
%% back identical, metadata terms included).
%%
%% Import is write-if-absent (each record goes in at version 1, which never
%% overwrites anything the target already holds): running it again, or
%% after a crash part-way, copies only what is missing, and a session the
%% target already has (e.g. written by the new code since) is counted as
%% `skipped', never overwritten. Expired sessions are not copied
%% (`expired'). Objects that are not sessions (wrong shape, id not a binary,
%% bad field types) are counted and listed in `invalid', and change nothing.
%% With `verify' (default true) every source session is read back from the
%% target after its batch: `verified' counts those the target holds
%% identically (copied now or by an earlier run), `newer' those the target
%% holds at a later version (updated by the new code since), `mismatched'
%% lists the ids of the others.
-module(erlmcp_session_migrate).

-export([import/3, drain/3]).

-type source() :: {dets, file:filename_all()} | {ets, ets:table()} | {mnesia, atom()}.
-type target() :: erlmcp_session_native:store_spec() | {erlmcp_session_native:store_spec(), map()}.
-type progress() :: #{read := non_neg_integer(), copied := non_neg_integer(), skipped := non_neg_integer(),
                      expired := non_neg_integer(), invalid := non_neg_integer(), total := non_neg_integer() | unknown,
                      rate := float(), eta_s := float() | unknown}.
-type report() :: #{copied := non_neg_integer(), skipped := non_neg_integer(), expired := non_neg_integer(),
                    invalid := [{term(), binary()}], verified := non_neg_integer(), newer := non_neg_integer(),
                    mismatched := [binary()], read := non_neg_integer(), seconds := float()}.
-export_type([source/0, target/0, progress/0, report/0]).

-define(BATCH, 500).

%% @doc Copy every live session of `Source' into `Target' (a store spec as
%% `erlmcp_session_native:init/1' takes in `store', optionally with its other
%% options as `{Spec, Opts}'). Options: `batch_size' (1..10000, default 500),
%% `verify' (default true), `progress' (a fun called with a `progress()' map
%% after each batch).
-spec import(source(), target(), map()) -> {ok, report()} | {error, term()}.
import(Source, Target, Opts) when is_map(Opts) ->
    case open_target(Target) of
        {ok, S} ->
            Batch = maps:get(batch_size, Opts, ?BATCH),
            case is_integer(Batch) andalso Batch >= 1 andalso Batch =< 10000 of
                true -> with_source(Source, Batch, fun(Reader, Total) -> run_import(Reader, Total, S, Opts) end);
                false -> {error, {bad_option, batch_size, Batch}}
            end;
        {error, Reason} ->
            {error, {target, Reason}}
    end;
import(_Source, _Target, Opts) ->
    {error, {bad_option, options, Opts}}.

open_target({Spec, TOpts}) when is_map(TOpts) ->
    erlmcp_session_native:init(TOpts#{store => Spec});
open_target(Spec) ->
    erlmcp_session_native:init(#{store => Spec}).

%% @doc Drain a running erlmcp session service into a native store: suspend
%% the server process (`sys:suspend/2': it finishes the request in hand and
%% takes no new one; callers queue), waiting at most `timeout' ms (default
%% 5000) for the request in hand, then import `Source' (the store that
%% server writes) into `Target' and report. The server stays suspended,
%% so nothing written after the copy is lost by being missed: stop it (or
%% `sys:resume/1' it to roll back) when switching over.
-spec drain(pid() | atom(), {source(), target()}, map()) -> {ok, report()} | {error, term()}.
drain(Server, {Source, Target}, Opts) when is_map(Opts) ->
    Timeout = maps:get(timeout, Opts, 5000),
    try sys:suspend(Server, Timeout) of
        ok -> import(Source, Target, maps:remove(timeout, Opts))
    catch
        exit:{timeout, _} -> {error, {drain_timeout, Server, Timeout}};
        exit:{noproc, _} -> {error, {no_server, Server}};
        exit:Reason -> {error, {drain_failed, Server, Reason}}
    end.

%%% Sources: a reader is fun(Continuation | start) -> {[Object], Continuation} | done.

with_source({dets, File}, Batch, F) ->
    Name = make_ref(),
    case dets:open_file(Name, [{file, to_list(File)}, {access, read}]) of
        {ok, Tab} ->
            try F(dets_reader(Tab, Batch), dets:info(Tab, size))
            after dets:close(Tab)
            end;
        {error, Reason} ->
            {error, {source, {dets, File}, Reason}}
    end;
with_source({ets, Tab}, Batch, F) ->
    case ets:info(Tab, size) of
        undefined -> {error, {source, {ets, Tab}, no_such_table}};
        Size -> F(ets_reader(Tab, Batch), Size)
    end;
with_source({mnesia, Tab}, Batch, F) ->
    try mnesia:table_info(Tab, size) of
        Size -> F(mnesia_reader(Tab, Batch), Size)
    catch
        exit:{aborted, Reason} -> {error, {source, {mnesia, Tab}, Reason}}
    end;
with_source(Other, _Batch, _F) ->
    {error, {bad_source, Other}}.

to_list(F) when is_binary(F) -> binary_to_list(F);
to_list(F) -> F.

-define(ALL, [{'_', [], ['$_']}]).

dets_reader(Tab, Batch) ->
    fun(start) -> chunk(dets:select(Tab, ?ALL, Batch));
       (Cont) -> chunk(dets:select(Cont))
    end.

ets_reader(Tab, Batch) ->
    fun(start) -> chunk(ets:select(Tab, ?ALL, Batch));
       (Cont) -> chunk(ets:select(Cont))
    end.

%% Mnesia continuations live inside one activity: read the table in one
%% async_dirty pass of chunks, handing each chunk to the importer.
mnesia_reader(Tab, Batch) ->
    {mnesia, Tab, Batch}.

chunk('$end_of_table') -> done;
chunk({error, Reason}) -> {error, Reason};
chunk({Objects, Cont}) -> {Objects, Cont}.

%%% Import

-record(acc, {s, opts, read = 0, copied = 0, skipped = 0, expired = 0, invalid = [], verified = 0, newer = 0,
              mismatched = [], total, t0}).

run_import({mnesia, Tab, Batch}, Total, S, Opts) ->
    Acc0 = acc(S, Opts, Total),
    Step = fun(Objects, Acc) -> import_batch([mnesia_object(O) || O <- Objects], Acc) end,
    try mnesia:activity(async_dirty, fun() -> mnesia_fold(mnesia:select(Tab, ?ALL, Batch, read), Step, Acc0) end) of
        {ok, Acc} -> finish(Acc);
        {error, _} = E -> E
    catch
        exit:Reason -> {error, {source, {mnesia, Tab}, Reason}}
    end;
run_import(Reader, Total, S, Opts) ->
    read_all(Reader, start, acc(S, Opts, Total)).

acc(S, Opts, Total) ->
    #acc{s = S, opts = Opts, total = Total, t0 = erlang:monotonic_time(millisecond)}.

mnesia_fold('$end_of_table', _Step, Acc) ->
    {ok, Acc};
mnesia_fold({Objects, Cont}, Step, Acc) ->
    case Step(Objects, Acc) of
        {ok, Acc2} -> mnesia_fold(mnesia:select(Cont), Step, Acc2);
        {error, _} = E -> E
    end.

mnesia_object({_Rec, Id, Session, _LastAccessed}) -> {Id, Session};
mnesia_object(Other) -> {bad_object, Other}.

read_all(Reader, Cont, Acc) ->
    case Reader(Cont) of
        done ->
            finish(Acc);
        {error, Reason} ->
            {error, {source, Reason}};
        {Objects, Next} ->
            case import_batch(Objects, Acc) of
                {ok, Acc2} -> read_all(Reader, Next, Acc2);
                {error, _} = E -> E
            end
    end.

import_batch(Objects, #acc{s = S} = Acc0) ->
    Now = erlmcp_rollout_nif:session_now(),
    {Records, Acc1} = lists:foldl(fun(O, A) -> classify(O, Now, A) end, {[], Acc0}, Objects),
    Batch = [R || {R, _Source} <- lists:reverse(Records)],
    Acc2 = Acc1#acc{read = Acc1#acc.read + length(Objects)},
    case erlmcp_session_native:apply_batch(Batch, S) of
        {ok, Applied, Skipped} ->
            Acc3 = Acc2#acc{copied = Acc2#acc.copied + Applied, skipped = Acc2#acc.skipped + Skipped},
            Acc = case maps:get(verify, Acc3#acc.opts, true) of
                      true -> verify(lists:reverse(Records), Acc3);
                      false -> Acc3
                  end,
            progress(Acc),
            {ok, Acc};
        {error, Reason} ->
            {error, {target, Reason, #{copied_before => Acc2#acc.copied}}}
    end.

%% Reads the batch back: a source session is `verified' when the target holds
%% it identically (copied now or by an earlier run), `newer' when the target
%% holds a later version of it (written by the new code since: legitimate),
%% `mismatched' otherwise (missing, or a different first version).
verify(Records, #acc{s = S} = Acc0) ->
    case erlmcp_session_native:stored_many([Id || {{Id, _, _}, _} <- Records], S) of
        {ok, Results} ->
            lists:foldl(fun verify_one/2, Acc0, lists:zip(Records, Results));
        {error, _} ->
            Acc0#acc{mismatched = lists:reverse([Id || {{Id, _, _}, _} <- Records], Acc0#acc.mismatched)}
    end.

verify_one({{{Id, _Fields, 1}, Source}, Result}, Acc) ->
    case Result of
        {ok, {_, _, _, _, 1} = Stored} ->
            case same(erlmcp_session_native:from_native(Id, Stored), Source) of
                true -> Acc#acc{verified = Acc#acc.verified + 1};
                false -> Acc#acc{mismatched = [Id | Acc#acc.mismatched]}
            end;
        {ok, _Newer} ->
            Acc#acc{newer = Acc#acc.newer + 1};
        {error, _} ->
            Acc#acc{mismatched = [Id | Acc#acc.mismatched]}
    end.

%% A source session without `last_accessed' got the import time: compare the rest.
same({error, _}, _Source) -> false;
same({ok, Got}, Source) -> same(Got, Source);
same(Got, Source) when is_map_key(last_accessed, Source) -> Got =:= Source;
same(Got, Source) -> maps:remove(last_accessed, Got) =:= Source.

classify({Id, Session} = O, Now, {Records, Acc}) when is_binary(Id), is_map(Session) ->
    case erlmcp_session_native:to_native(Id, Session) of
        {ok, {_C, L, T, _M} = Fields} ->
            case T =/= infinity andalso Now - L > T of
                true -> {Records, Acc#acc{expired = Acc#acc.expired + 1}};
                false -> {[{{Id, Fields, 1}, Session} | Records], Acc}
            end;
        {error, {invalid, Why}} ->
            {Records, invalid(O, Why, Acc)}
    end;
classify({Id, _} = O, _Now, {Records, Acc}) when is_binary(Id) ->
    {Records, invalid(O, <<"the session is not a map">>, Acc)};
classify({bad_object, O}, _Now, {Records, Acc}) ->
    {Records, invalid(O, <<"not an erlmcp_session record {erlmcp_session, Id, Session, LastAccessed}">>, Acc)};
classify(O, _Now, {Records, Acc}) ->
    {Records, invalid(O, <<"not an {Id, Session} object with a binary id">>, Acc)}.

invalid(O, Why, #acc{invalid = L} = Acc) ->
    Key = case O of
              {K, _} -> K;
              {_, K, _, _} -> K;
              _ -> O
          end,
    Acc#acc{invalid = [{Key, Why} | L]}.

progress(#acc{opts = #{progress := F}} = Acc) when is_function(F, 1) ->
    Secs = max(1, erlang:monotonic_time(millisecond) - Acc#acc.t0) / 1000,
    Rate = Acc#acc.read / Secs,
    Eta = case Acc#acc.total of
              N when is_integer(N), Rate > 0 -> max(0, N - Acc#acc.read) / Rate;
              _ -> unknown
          end,
    _ = F(#{read => Acc#acc.read, copied => Acc#acc.copied, skipped => Acc#acc.skipped,
            expired => Acc#acc.expired, invalid => length(Acc#acc.invalid), total => Acc#acc.total,
            rate => Rate, eta_s => Eta}),
    ok;
progress(_Acc) ->
    ok.

finish(Acc) ->
    {ok, #{read => Acc#acc.read, copied => Acc#acc.copied, skipped => Acc#acc.skipped,
           expired => Acc#acc.expired, invalid => lists:reverse(Acc#acc.invalid),
           verified => Acc#acc.verified, newer => Acc#acc.newer, mismatched => lists:reverse(Acc#acc.mismatched),
           seconds => (erlang:monotonic_time(millisecond) - Acc#acc.t0) / 1000}}.
