%% @doc The legacy cutover command behind `scripts/session-cutover': import
%% an erlmcp DETS file or Mnesia table into a native store, with progress on
%% stderr and verification, then print a report.
%%
%% ```
%% scripts/session-cutover --dets data/sessions.dets --to disk:data/sessions.redb
%% scripts/session-cutover --mnesia-dir Mnesia.node@host --table erlmcp_session --to disk:sessions.redb
%% '''
%%
%% Targets use the store URIs of the `erlmcp-rollout' CLI: `disk:PATH',
%% `memory:' (a dry run: nothing is kept) and `etcd:HOST:PORT[,...][/prefix]'.
%% Exit status: 0 all copied and verified; 1 bad arguments or a source or
%% target error (nothing is half-reported: the error says which and where);
%% 2 the import ran but some sessions did not verify or were not sessions
%% (listed in the report).
-module(erlmcp_session_cutover).

-export([main/1, parse_args/1, parse_store_uri/1]).

-spec main([string()]) -> no_return().
main(Args) ->
    Status = try run(Args)
             catch C:R:St ->
                 io:format(standard_error, "session-cutover: crashed: ~p:~p~n~p~n", [C, R, St]),
                 1
             end,
    erlang:halt(Status).

run(Args) ->
    case parse_args(Args) of
        {ok, #{source := Source, target := Target} = Opts} ->
            ok = start_source(Opts),
            Json = maps:get(json, Opts, false),
            Result = erlmcp_session_migrate:import(Source, Target, #{progress => progress_fun(Json),
                                                                     batch_size => maps:get(batch, Opts, 500)}),
            _ = Json orelse io:format(standard_error, "~n", []),
            report(Result, Json);
        {error, Msg} ->
            io:format(standard_error, "session-cutover: ~s~n~s", [Msg, usage()]),
            1
    end.

usage() ->
    "usage: session-cutover (--dets FILE | --mnesia-dir DIR [--table NAME]) --to STORE [--batch N] [--json]\n"
    "  STORE: disk:PATH | memory: | etcd:HOST:PORT[,HOST:PORT...][/prefix]\n".

%% @doc The command line as a map (`source', `target', `json', `batch',
%% `mnesia_dir') or the first problem found.
-spec parse_args([string()]) -> {ok, map()} | {error, string()}.
parse_args(Args) ->
    case parse(Args, #{}) of
        {ok, #{source := _, target := _} = M} -> {ok, M};
        {ok, #{source := _}} -> {error, "--to STORE is required"};
        {ok, _} -> {error, "a source is required: --dets FILE or --mnesia-dir DIR"};
        {error, _} = E -> E
    end.

parse([], M) ->
    case M of
        #{mnesia_dir := _, source := {mnesia, _}} -> {ok, M};
        #{mnesia_dir := _} -> {ok, M#{source => {mnesia, erlmcp_session}}};
        _ -> {ok, M}
    end;
parse(["--dets", File | Rest], M) ->
    only_source(M, fun() -> parse(Rest, M#{source => {dets, File}}) end);
parse(["--mnesia-dir", Dir | Rest], M) ->
    only_source(M, fun() -> parse(Rest, M#{mnesia_dir => Dir}) end);
parse(["--table", Name | Rest], M) ->
    parse(Rest, M#{source => {mnesia, list_to_atom(Name)}});
parse(["--to", Uri | Rest], M) ->
    case parse_store_uri(Uri) of
        {ok, Target} -> parse(Rest, M#{target => Target});
        {error, _} = E -> E
    end;
parse(["--batch", N | Rest], M) ->
    case string:to_integer(N) of
        {B, ""} when B >= 1, B =< 10000 -> parse(Rest, M#{batch => B});
        _ -> {error, "--batch must be an integer 1..10000, got " ++ N}
    end;
parse(["--json" | Rest], M) ->
    parse(Rest, M#{json => true});
parse([Flag], _M) when Flag =:= "--dets"; Flag =:= "--mnesia-dir"; Flag =:= "--table"; Flag =:= "--to";
                       Flag =:= "--batch" ->
    {error, Flag ++ " needs a value"};
parse([Other | _], _M) ->
    {error, "unknown argument " ++ Other}.

only_source(#{source := {dets, _}}, _) -> {error, "give one source: --dets or --mnesia-dir"};
only_source(#{mnesia_dir := _}, _) -> {error, "give one source: --dets or --mnesia-dir"};
only_source(_, Next) -> Next().

%% @doc A store URI of the CLI as a store spec of `erlmcp_session_native'.
-spec parse_store_uri(string()) -> {ok, erlmcp_session_migrate:target()} | {error, string()}.
parse_store_uri("memory:") ->
    {ok, {memory, #{name => erlmcp_session_cutover_dry_run}}};
parse_store_uri("disk:" ++ Path) when Path =/= "" ->
    {ok, {disk, Path}};
parse_store_uri("etcd:" ++ Rest) when Rest =/= "" ->
    {Hosts, Prefix} = case string:split(Rest, "/") of
                          [H] -> {H, ""};
                          [H, P] -> {H, P}
                      end,
    Endpoints = [list_to_binary(E) || E <- string:split(Hosts, ",", all)],
    case lists:all(fun valid_endpoint/1, Endpoints) of
        true when Prefix =:= "" -> {ok, {etcd, Endpoints}};
        true -> {ok, {{etcd, Endpoints}, #{prefix => list_to_binary(Prefix)}}};
        false -> {error, "etcd endpoints must be HOST:PORT[,HOST:PORT...], got " ++ Hosts}
    end;
parse_store_uri(Uri) ->
    {error, "store must be disk:PATH, memory: or etcd:HOST:PORT[,...][/prefix], got " ++ Uri}.

valid_endpoint(E) ->
    case binary:split(E, <<":">>, [global]) of
        [Host, Port] when Host =/= <<>> ->
            case string:to_integer(binary_to_list(Port)) of
                {P, ""} -> P > 0 andalso P < 65536;
                _ -> false
            end;
        _ -> false
    end.

start_source(#{mnesia_dir := Dir}) ->
    ok = application:set_env(mnesia, dir, Dir),
    ok = mnesia:start(),
    Tables = mnesia:system_info(tables),
    _ = mnesia:wait_for_tables(Tables, 60000),
    ok;
start_source(_) ->
    ok.

progress_fun(true) ->
    fun(P) -> io:format(standard_error, "~s~n", [json(P)]) end;
progress_fun(false) ->
    Tty = is_list(element(2, io:columns(standard_error))) orelse is_integer(element(2, io:columns(standard_error))),
    fun(#{read := R, total := T, rate := Rate, eta_s := Eta, copied := C}) ->
            Line = io_lib:format("~b/~p read, ~b copied, ~b/s, ETA ~s", [R, T, C, round(Rate), eta(Eta)]),
            case Tty of
                true -> io:format(standard_error, "\r~s   ", [Line]);
                false -> every_second(fun() -> io:format(standard_error, "~s~n", [Line]) end)
            end
    end.

%% Not a terminal (a log): one progress line a second at most.
every_second(F) ->
    Now = erlang:monotonic_time(millisecond),
    case get(last_progress) of
        T when is_integer(T), Now - T < 1000 -> ok;
        _ -> put(last_progress, Now), F()
    end.

eta(unknown) -> "?";
eta(S) -> io_lib:format("~bs", [round(S)]).

report({ok, R}, Json) ->
    #{invalid := Invalid, mismatched := Mismatched} = R,
    _ = case Json of
        true ->
            io:format("~s~n", [json(R#{invalid => [iolist_to_binary(io_lib:format("~0p: ~s", [K, W]))
                                                 || {K, W} <- Invalid]})]);
        false ->
            io:format("read ~b, copied ~b, skipped (already there) ~b, expired (not copied) ~b, "
                      "verified ~b, newer in target ~b, in ~.2f s~n",
                      [maps:get(read, R), maps:get(copied, R), maps:get(skipped, R), maps:get(expired, R),
                       maps:get(verified, R), maps:get(newer, R), maps:get(seconds, R)]),
            [io:format("not a session: ~0p: ~s~n", [K, W]) || {K, W} <- Invalid],
            [io:format("did not verify: ~0p~n", [Id]) || Id <- Mismatched]
    end,
    case Invalid =:= [] andalso Mismatched =:= [] of
        true -> 0;
        false -> 2
    end;
report({error, Reason}, _Json) ->
    io:format(standard_error, "session-cutover: failed, nothing reported as copied: ~0p~n", [Reason]),
    1.

%% Small JSON writer for flat reports (numbers, atoms, binaries, lists of
%% those). Bytes outside printable ASCII are written as \u00XX (session ids
%% are bytes, not text).
json(M) when is_map(M) ->
    ["{", lists:join(",", [[json(atom_to_binary(K)), ":", json(V)] || {K, V} <- lists:sort(maps:to_list(M))]), "}"];
json(L) when is_list(L) -> ["[", lists:join(",", [json(E) || E <- L]), "]"];
json(B) when is_binary(B) -> [$", escape(B), $"];
json(A) when is_atom(A) -> json(atom_to_binary(A));
json(I) when is_integer(I) -> integer_to_binary(I);
json(F) when is_float(F) -> float_to_binary(F, [{decimals, 3}, compact]).

escape(B) ->
    [case C of
         $" -> "\\\"";
         $\\ -> "\\\\";
         C when C < 32; C > 126 -> io_lib:format("\\u~4.16.0b", [C]);
         C -> C
     end || <<C>> <= B].
