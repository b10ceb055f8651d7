%% @doc erlmcp_session_native through the real NIF: the same cases against
%% every store (memory, disk, and etcd on a real 3-member cluster the suite
%% starts with scripts/etcd-cluster),
%% plus a kill -9 test of a separate VM writing to a disk store.
-module(erlmcp_session_native_SUITE).
-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").
-compile([export_all, nowarn_export_all]).

-define(T0, 1700000000000).

all() ->
    [{group, memory}, {group, disk}, {group, etcd}, {group, crash}, {group, store_down}].

cases() ->
    [round_trip_is_exact, state_never_changes, missing_and_deleted, expired_never_returned,
     fetch_slides_expiry, list_in_key_order_across_pages, init_shares_the_store, bad_input_is_refused,
     concurrent_writers_and_readers, callbacks_match_erlmcp_shapes, stored_bytes_create_no_atoms].

groups() ->
    [{memory, [], cases() ++ [memory_frees_the_dead, reopen_with_other_settings_is_an_error,
                              a_reaped_store_gives_its_memory_back]},
     {disk, [], cases()},
     {etcd, [], cases()},
     {crash, [sequence], [disk_kill9_loses_no_acknowledged_session]},
     {store_down, [sequence], [store_errors_are_logged_and_counted]}].

init_per_suite(Config) ->
    {ok, _} = application:ensure_all_started(erlmcp_rollout),
    Config.

end_per_suite(_Config) ->
    ok.

init_per_group(Group, Config) when Group =:= etcd; Group =:= store_down ->
    %% A real 3-member cluster on free loopback ports (scripts/etcd-cluster).
    Dir = filename:join(?config(priv_dir, Config), atom_to_list(Group)),
    {0, Out} = script(["start", Dir]),
    ct:log("~s", [Out]),
    {ok, Eps} = file:read_file(filename:join(Dir, "endpoints")),
    Endpoints = binary:split(string:trim(Eps), <<",">>, [global]),
    [{store, etcd}, {etcd_dir, Dir}, {endpoints, Endpoints} | Config];
init_per_group(Group, Config) ->
    [{store, Group} | Config].

end_per_group(Group, Config) when Group =:= etcd; Group =:= store_down ->
    {_, Out} = script(["stop", ?config(etcd_dir, Config)]),
    ct:log("~s", [Out]),
    ok;
end_per_group(_Group, _Config) ->
    ok.

script(Args) ->
    erlmcp_test_os:run(erlmcp_test_os:script("etcd-cluster"), Args).

init_per_testcase(Case, Config) ->
    ok = erlmcp_rollout_nif:session_set_clock(?T0),
    [{case_name, Case} | Config].

end_per_testcase(_Case, _Config) ->
    ok = erlmcp_rollout_nif:session_set_clock(system),
    ok.

%% A fresh store for this case (and the options that open it again).
spec(Config) ->
    spec(Config, "").

spec(Config, Suffix) ->
    Case = atom_to_list(?config(case_name, Config)) ++ Suffix,
    case ?config(store, Config) of
        memory -> #{store => memory, name => list_to_atom("ct_" ++ Case)};
        disk -> #{store => {disk, filename:join(?config(priv_dir, Config), Case ++ ".redb")}};
        etcd -> #{store => {etcd, ?config(endpoints, Config)}, prefix => list_to_binary("ct/" ++ Case ++ "/")}
    end.

open(Config) ->
    {ok, S} = erlmcp_session_native:init(spec(Config)),
    S.

session(Id, Meta) ->
    session(Id, ?T0, 60000, Meta).

session(Id, LastAccessed, Timeout, Meta) ->
    #{id => Id, created_at => ?T0 - 5, last_accessed => LastAccessed, timeout_ms => Timeout, metadata => Meta}.

set_clock(Ms) ->
    ok = erlmcp_rollout_nif:session_set_clock(Ms).

%%% Cases

store_errors_are_logged_and_counted(Config) ->
    %% doc: list/1 and cleanup_expired/1 cannot return an error in erlmcp's
    %% callback shapes: with the etcd cluster gone they answer {ok, [], S} /
    %% {ok, 0, S}, log a logger error each (metadata call => list |
    %% cleanup_expired) and count it in store_errors/0.
    S = open(Config),
    {ok, S} = erlmcp_session_native:store(<<"s1">>, session(<<"s1">>, #{}), S),
    {ok, [<<"s1">>], S} = erlmcp_session_native:list(S),
    ok = logger:add_handler(?MODULE, ?MODULE, #{config => #{pid => self()}}),
    try
        {0, Out} = script(["stop", ?config(etcd_dir, Config)]),
        ct:log("~s", [Out]),
        Before = erlmcp_session_native:store_errors(),
        ?assertEqual({ok, [], S}, erlmcp_session_native:list(S)),
        ?assertEqual({ok, 0, S}, erlmcp_session_native:cleanup_expired(S)),
        After = erlmcp_session_native:store_errors(),
        ?assertEqual(#{list => maps:get(list, Before) + 1,
                       cleanup_expired => maps:get(cleanup_expired, Before) + 1}, After),
        [receive
             {logged, error, #{erlmcp_session_native := store_error, call := Call}} -> ok
         after 5000 -> ct:fail({not_logged, Call})
         end || Call <- [list, cleanup_expired]]
    after
        logger:remove_handler(?MODULE)
    end.

%% A logger handler (this module): sends the store-error events to the test.
log(#{level := Level, meta := Meta}, #{config := #{pid := Pid}}) ->
    case Meta of
        #{erlmcp_session_native := _} -> Pid ! {logged, Level, Meta};
        _ -> ok
    end.

round_trip_is_exact(Config) ->
    %% doc: any session map, any metadata term, comes back identical
    %% (fetch sets last_accessed to the access time, which is the stored one here).
    S = open(Config),
    Ref = make_ref(),
    Sessions =
        [session(<<"plain">>, #{}),
         session(<<"deep">>, #{user => <<"u1">>, roles => [admin, <<"ops">>], n => 42, f => 1.5,
                               nested => #{a => {tuple, [1, 2, 3]}, b => <<0, 255, 128>>},
                               big => 1 bsl 200, neg => -7, ref => Ref, pid => self(),
                               'ünïcode_atom' => "chars"}),
         session(<<"infinite">>, ?T0, infinity, #{k => v}),
         #{data => failover_test},
         #{},
         (session(<<"extra">>, #{}))#{history => [1, 2], extra_key => true},
         #{id => <<"other-id">>, created_at => 1, last_accessed => ?T0, timeout_ms => 1000, metadata => #{}},
         session(<<"non-map-meta">>, [not_a_map])],
    Ids = [<<"plain">>, <<"deep">>, <<"infinite">>, <<"whole1">>, <<"whole2">>, <<"extra">>,
           <<"mismatch">>, <<"non-map-meta">>],
    Pairs = lists:zip(Ids, Sessions),
    [{ok, S} = erlmcp_session_native:store(Id, Sess, S) || {Id, Sess} <- Pairs],
    lists:foreach(
      fun({Id, Sess}) ->
              Expected = Sess#{last_accessed => maps:get(last_accessed, Sess, ?T0)},
              ?assertEqual({ok, Expected, S}, erlmcp_session_native:get(Id, S)),
              ?assertEqual({ok, Expected, S}, erlmcp_session_native:fetch(Id, S))
      end, Pairs),
    %% a non-UTF-8 id, and binary metadata through the whole-map path
    Odd = <<255, 0, 1>>,
    {ok, S} = erlmcp_session_native:store(Odd, session(Odd, #{bin => <<1:1>>}), S),
    ?assertEqual({ok, session(Odd, #{bin => <<1:1>>}), S}, erlmcp_session_native:fetch(Odd, S)).

state_never_changes(Config) ->
    %% doc: erlmcp's own backend tests compare the returned State with the one passed in.
    S = open(Config),
    ?assertMatch({ok, S}, erlmcp_session_native:store(<<"a">>, session(<<"a">>, #{}), S)),
    ?assertMatch({ok, _, S}, erlmcp_session_native:fetch(<<"a">>, S)),
    ?assertMatch({error, not_found, S}, erlmcp_session_native:fetch(<<"b">>, S)),
    ?assertMatch({ok, [<<"a">>], S}, erlmcp_session_native:list(S)),
    ?assertMatch({ok, 0, S}, erlmcp_session_native:cleanup_expired(S)),
    ?assertMatch({ok, S}, erlmcp_session_native:delete(<<"a">>, S)).

missing_and_deleted(Config) ->
    S = open(Config),
    ?assertEqual({error, not_found, S}, erlmcp_session_native:fetch(<<"nope">>, S)),
    ?assertEqual({ok, S}, erlmcp_session_native:delete(<<"nope">>, S)),
    {ok, S} = erlmcp_session_native:store(<<"x">>, session(<<"x">>, #{v => 1}), S),
    ?assertEqual({ok, S}, erlmcp_session_native:delete(<<"x">>, S)),
    ?assertEqual({error, not_found, S}, erlmcp_session_native:fetch(<<"x">>, S)),
    ?assertEqual({ok, [], S}, erlmcp_session_native:list(S)),
    ?assertEqual({ok, S}, erlmcp_session_native:delete(<<"x">>, S)),
    %% stored again after a delete: the new one, not the old one
    {ok, S} = erlmcp_session_native:store(<<"x">>, session(<<"x">>, #{v => 2}), S),
    ?assertMatch({ok, #{metadata := #{v := 2}}, S}, erlmcp_session_native:fetch(<<"x">>, S)).

expired_never_returned(Config) ->
    %% doc: expired sessions are invisible before any cleanup; cleanup returns the true count.
    S = open(Config),
    {ok, S} = erlmcp_session_native:store(<<"short">>, session(<<"short">>, ?T0, 1000, #{}), S),
    {ok, S} = erlmcp_session_native:store(<<"short2">>, session(<<"short2">>, ?T0, 1000, #{}), S),
    {ok, S} = erlmcp_session_native:store(<<"long">>, session(<<"long">>, ?T0, 5000, #{}), S),
    {ok, S} = erlmcp_session_native:store(<<"forever">>, session(<<"forever">>, ?T0, infinity, #{}), S),
    set_clock(?T0 + 1000),
    ?assertMatch({ok, _, S}, erlmcp_session_native:get(<<"short">>, S)),
    set_clock(?T0 + 1001),
    ?assertEqual({error, not_found, S}, erlmcp_session_native:fetch(<<"short">>, S)),
    ?assertEqual({ok, [<<"forever">>, <<"long">>], S}, erlmcp_session_native:list(S)),
    ?assertEqual({ok, 2, S}, erlmcp_session_native:cleanup_expired(S)),
    ?assertEqual({ok, 0, S}, erlmcp_session_native:cleanup_expired(S)),
    set_clock(?T0 + 100000000),
    ?assertEqual({ok, [<<"forever">>], S}, erlmcp_session_native:list(S)),
    ?assertEqual({ok, 1, S}, erlmcp_session_native:cleanup_expired(S)),
    ?assertMatch({ok, #{id := <<"forever">>}, S}, erlmcp_session_native:fetch(<<"forever">>, S)).

fetch_slides_expiry(Config) ->
    S = open(Config),
    {ok, S} = erlmcp_session_native:store(<<"s">>, session(<<"s">>, ?T0, 1000, #{}), S),
    set_clock(?T0 + 900),
    ?assertMatch({ok, #{last_accessed := ?T0 + 900}, S}, erlmcp_session_native:fetch(<<"s">>, S)),
    set_clock(?T0 + 1800),
    ?assertMatch({ok, #{last_accessed := ?T0 + 1800}, S}, erlmcp_session_native:fetch(<<"s">>, S)),
    set_clock(?T0 + 1850),
    ?assertMatch({ok, #{last_accessed := ?T0 + 1850}, S}, erlmcp_session_native:fetch(<<"s">>, S)),
    set_clock(?T0 + 2801),
    case ?config(store, Config) of
        memory ->
            %% doc: a memory store slides on every fetch, as erlmcp's ETS backend does
            %% (a fetch at 0.2 s of a 4 s timeout keeps the session alive at 4.1 s).
            ?assertMatch({ok, #{last_accessed := ?T0 + 2801}, S}, erlmcp_session_native:fetch(<<"s">>, S)),
            set_clock(?T0 + 3802),
            ?assertEqual({error, not_found, S}, erlmcp_session_native:fetch(<<"s">>, S));
        _ ->
            %% doc: disk and etcd write a fetch only when it moved last_accessed by more
            %% than the touch fraction (10 % of the timeout): every write is an fsync or a
            %% quorum commit. The session expires from the last written access.
            ?assertEqual({error, not_found, S}, erlmcp_session_native:fetch(<<"s">>, S))
    end.

list_in_key_order_across_pages(Config) ->
    %% doc: list/1 pages through the store (1000 ids per NIF call).
    S = open(Config),
    N = 2345,
    Ids = [iolist_to_binary(io_lib:format("id-~6..0b", [I])) || I <- lists:seq(1, N)],
    parallel(32, Ids, fun(Id) -> {ok, S} = erlmcp_session_native:store(Id, session(Id, #{}), S) end),
    {ok, Listed, S} = erlmcp_session_native:list(S),
    ?assertEqual(lists:sort(Ids), Listed).

init_shares_the_store(Config) ->
    S1 = open(Config),
    {ok, S1} = erlmcp_session_native:store(<<"shared">>, session(<<"shared">>, #{n => 1}), S1),
    Spec = spec(Config),
    Again = case Spec of
                #{store := {disk, Path}} ->
                    Spec#{store := {disk, filename:join([filename:dirname(Path), ".", filename:basename(Path)])}};
                _ ->
                    Spec
            end,
    {ok, S2} = erlmcp_session_native:init(Again),
    ?assertMatch({ok, #{metadata := #{n := 1}}, S2}, erlmcp_session_native:fetch(<<"shared">>, S2)),
    {ok, S2} = erlmcp_session_native:store(<<"second">>, session(<<"second">>, #{n => 2}), S2),
    ?assertMatch({ok, #{metadata := #{n := 2}}, S1}, erlmcp_session_native:fetch(<<"second">>, S1)),
    {ok, Other} = erlmcp_session_native:init(spec(Config, "_other")),
    ?assertMatch({error, not_found, Other}, erlmcp_session_native:fetch(<<"shared">>, Other)).

bad_input_is_refused(Config) ->
    %% doc: every bad argument gets a clear error naming what is wrong, and writes nothing.
    S = open(Config),
    Invalid = fun(R) -> ?assertMatch({error, {invalid, Msg}} when is_binary(Msg), R) end,
    Invalid(erlmcp_session_native:store(not_binary, #{}, S)),
    Invalid(erlmcp_session_native:store(<<"a">>, not_a_map, S)),
    Invalid(erlmcp_session_native:store(<<>>, #{}, S)),
    Invalid(erlmcp_session_native:store(binary:copy(<<"x">>, 1025), #{}, S)),
    Invalid(erlmcp_session_native:store(<<"a">>, #{timeout_ms => 0}, S)),
    Invalid(erlmcp_session_native:store(<<"a">>, #{timeout_ms => -1}, S)),
    Invalid(erlmcp_session_native:store(<<"a">>, #{timeout_ms => "1000"}, S)),
    Invalid(erlmcp_session_native:store(<<"a">>, #{created_at => 1.5}, S)),
    Invalid(erlmcp_session_native:store(<<"a">>, #{last_accessed => 1 bsl 70}, S)),
    Invalid(erlmcp_session_native:store(<<"a">>, #{metadata => binary:copy(<<1>>, 16 * 1024 * 1024 + 1)}, S)),
    ?assertMatch({error, {invalid, _}, S}, erlmcp_session_native:fetch(42, S)),
    ?assertMatch({error, {invalid, _}, S}, erlmcp_session_native:delete(<<>>, S)),
    ?assertEqual({ok, [], S}, erlmcp_session_native:list(S)),
    ?assertMatch({error, {bad_store, _}}, erlmcp_session_native:init(#{store => {tape, "/dev/st0"}})),
    ?assertMatch({error, {bad_store, _}}, erlmcp_session_native:init(#{store => {disk, "/nonexistent-dir/x.redb"}})),
    ?assertMatch({error, {bad_store, _}}, erlmcp_session_native:init(#{store => {disk, <<>>}})),
    %% A malformed etcd member is refused at open, named, before any connection attempt.
    {error, {bad_store, NoPort}} = erlmcp_session_native:init(#{store => {etcd, ["127.0.0.1:2379", "etcd-b"]}}),
    ?assertNotEqual(nomatch, binary:match(iolist_to_binary(NoPort), <<"etcd-b">>)),
    ?assertMatch({error, {bad_store, _}}, erlmcp_session_native:init(#{store => {etcd, []}})),
    ?assertMatch({error, {bad_option, _}}, erlmcp_session_native:init(#{name => "not an atom"})),
    ?assertMatch({error, {bad_option, _}}, erlmcp_session_native:init(#{touch_permille => 1001})),
    ?assertMatch({error, {bad_option, _, _}}, erlmcp_session_native:init(not_a_map)),
    %% unknown options are an error naming them; erlmcp's DETS option names the spec to use
    {error, {bad_option, Unknown}} = erlmcp_session_native:init(#{frobnicate => 1, touch_permille => 10}),
    ?assertNotEqual(nomatch, binary:match(Unknown, <<"frobnicate">>)),
    {error, {bad_option, Dets}} = erlmcp_session_native:init(#{file_path => "/tmp/sessions.dets"}),
    ?assertNotEqual(nomatch, binary:match(Dets, <<"file_path">>)),
    ?assertNotEqual(nomatch, binary:match(Dets, <<"{disk, Path}">>)).

concurrent_writers_and_readers(Config) ->
    %% doc: 64 processes store and read back their own sessions at once.
    S = open(Config),
    Ids = [<<"c-", (integer_to_binary(I))/binary>> || I <- lists:seq(1, 64 * 20)],
    parallel(64, Ids,
             fun(Id) ->
                     Sess = session(Id, #{owner => Id}),
                     {ok, S} = erlmcp_session_native:store(Id, Sess, S),
                     {ok, Sess, S} = erlmcp_session_native:fetch(Id, S)
             end),
    {ok, Listed, S} = erlmcp_session_native:list(S),
    ?assertEqual(length(Ids), length(Listed)).

callbacks_match_erlmcp_shapes(Config) ->
    %% doc: the return shapes of erlmcp's erlmcp_session_backend callbacks.
    S = open(Config),
    Exports = erlmcp_session_native:module_info(exports),
    [?assert(lists:member(F, Exports))
     || F <- [{init, 1}, {store, 3}, {fetch, 2}, {delete, 2}, {list, 1}, {cleanup_expired, 1}]],
    ?assertMatch({ok, S}, erlmcp_session_native:store(<<"k">>, session(<<"k">>, #{}), S)),
    ?assertMatch({ok, #{}, S}, erlmcp_session_native:fetch(<<"k">>, S)),
    ?assertMatch({ok, [_ | _], S}, erlmcp_session_native:list(S)),
    ?assertMatch({ok, N, S} when is_integer(N), erlmcp_session_native:cleanup_expired(S)),
    ?assertMatch({ok, S}, erlmcp_session_native:delete(<<"k">>, S)),
    %% erlmcp owns the behaviour module: this application must not ship one.
    {ok, Mods} = application:get_key(erlmcp_rollout, modules),
    ?assertNot(lists:member(erlmcp_session_backend, Mods)).

stored_bytes_create_no_atoms(Config) ->
    %% doc: metadata bytes another program wrote never create an atom (or a fun) in
    %% this VM: opaque bytes come back as the binary itself; bytes marked as external
    %% term format are decoded with [safe], and bytes that fail that are a clear error.
    S = open(Config),
    Name = <<"erlmcp_never_seen_", (integer_to_binary(erlang:unique_integer([positive])))/binary>>,
    %% #{Name => 1} as external term format, built by hand: no atom made here.
    Etf = <<131, 116, 1:32, 119, (byte_size(Name)), Name/binary, 97, 1>>,
    Fields = {?T0, ?T0, 60000, Etf},
    ?assertEqual({ok, 1, 0}, erlmcp_session_native:apply_batch([{<<"rust">>, Fields, 1}], S)),
    ?assertMatch({ok, #{metadata := Etf}, S}, erlmcp_session_native:fetch(<<"rust">>, S)),
    ?assertMatch({ok, #{metadata := Etf}, S}, erlmcp_session_native:get(<<"rust">>, S)),
    ?assertNot(atom_exists(Name)),
    ?assertEqual({ok, 1, 0},
                 erlmcp_session_native:apply_batch([{<<"marked">>, {?T0, ?T0, 60000, {etf, Etf}}, 1}], S)),
    ?assertEqual({error, {undecodable_metadata, <<"marked">>}, S}, erlmcp_session_native:fetch(<<"marked">>, S)),
    ?assertNot(atom_exists(Name)),
    %% what this module writes is marked and reads back as the term
    {ok, S} = erlmcp_session_native:store(<<"erl">>, session(<<"erl">>, #{k => v}), S),
    ?assertMatch({ok, {_, _, _, {etf, _}, _}}, erlmcp_session_native:stored(<<"erl">>, S)),
    ?assertMatch({ok, #{metadata := #{k := v}}, S}, erlmcp_session_native:fetch(<<"erl">>, S)).

atom_exists(Name) ->
    try binary_to_existing_atom(Name, utf8) of
        _ -> true
    catch
        error:badarg -> false
    end.

memory_frees_the_dead(Config) ->
    %% doc: a memory store outside a migration frees expired and deleted sessions at
    %% cleanup_expired/1 instead of keeping tombstones: a later sweep (past every
    %% tombstone retention) finds no record of them left, and list/1 shows the live ones.
    S = open(Config),
    Fill = fun(Prefix, N) ->
                   Now = erlmcp_rollout_nif:session_now(),
                   [{ok, S} = erlmcp_session_native:store(Id, session(Id, Now, 60000, #{n => I}), S)
                    || I <- lists:seq(1, N), Id <- [<<Prefix/binary, (integer_to_binary(I))/binary>>]]
           end,
    Fill(<<"a-">>, 3000),
    [{ok, S} = erlmcp_session_native:delete(<<"a-", (integer_to_binary(I))/binary>>, S) || I <- lists:seq(1, 1000)],
    set_clock(?T0 + 60001),
    ?assertEqual({ok, 2000, S}, erlmcp_session_native:cleanup_expired(S)),
    Fill(<<"b-">>, 1000),
    {ok, Live, S} = erlmcp_session_native:list(S),
    ?assertEqual(1000, length(Live)),
    %% The store's own record count: a raw sweep far past any tombstone retention
    %% reports the records it still held besides the live ones (the 1000 deleted and
    %% 2000 expired ones on a store that buries them; none here).
    set_clock(?T0 + 60001 + 8 * 24 * 3600 * 1000),
    ?assertEqual({ok, 1000, 0}, sweep(S)).

a_reaped_store_gives_its_memory_back(_Config) ->
    %% doc: when the last handle of a big memory store is garbage collected, the reaper
    %% frees its records and gives the memory back to the OS (malloc_trim), instead of
    %% leaving it in the schedulers' malloc arenas for the next large allocation there
    %% to consolidate inside a NIF. Measured here as the VM's RSS falling back.
    Base = rss_kb(),
    Parent = self(),
    Meta = binary:copy(<<"m">>, 200),
    Now = erlmcp_rollout_nif:session_now(),
    Fillers = [spawn_opt(fun() ->
                                 {ok, S} = erlmcp_session_native:init(#{store => memory, name => reap_probe}),
                                 lists:foreach(
                                   fun(I) ->
                                           Id = <<"r-", (integer_to_binary(N))/binary, "-", (integer_to_binary(I))/binary>>,
                                           {ok, S} = erlmcp_session_native:store(Id, session(Id, Now, 600000, #{m => Meta}), S)
                                   end, lists:seq(1, 150000)),
                                 Parent ! {filled, self()},
                                 receive stop -> ok end
                         end, [{scheduler, N}]) || N <- lists:seq(1, erlang:system_info(schedulers_online))],
    [receive {filled, P} -> ok end || P <- Fillers],
    Peak = rss_kb(),
    ?assert(Peak - Base > 50000),  % the records really took memory (> 50 MB)
    [P ! stop || P <- Fillers],    % the last handles die with these processes
    Target = Base + (Peak - Base) div 2,
    ?assertEqual(ok, until(fun() -> rss_kb() < Target end, 100)),
    ok.

rss_kb() ->
    {ok, Status} = file:read_file("/proc/self/status"),
    [Kb] = [binary_to_integer(hd(binary:split(string:trim(Rest), <<" ">>)))
            || <<"VmRSS:", Rest/binary>> <- binary:split(Status, <<"\n">>, [global])],
    Kb.

%% Polls F every 100 ms, at most Tries times.
until(_F, 0) -> timeout;
until(F, Tries) ->
    case F() of
        true -> ok;
        false -> timer:sleep(100), until(F, Tries - 1)
    end.

sweep(S) ->
    H = element(2, S),
    Tag = make_ref(),
    async = erlmcp_rollout_nif:session_sweep(H, Tag),
    receive {Tag, R} -> R end.

reopen_with_other_settings_is_an_error(Config) ->
    %% doc: opening an already-open store with other settings is an error naming
    %% them, not a silent share of the first one's settings.
    Spec = spec(Config),
    {ok, S} = erlmcp_session_native:init(Spec),
    ?assertMatch({ok, _}, erlmcp_session_native:init(Spec)),
    %% 0 (every fetch written) is a memory store's default: the same settings.
    ?assertMatch({ok, _}, erlmcp_session_native:init(Spec#{touch_permille => 0})),
    ?assertMatch({error, {bad_store, _}}, erlmcp_session_native:init(Spec#{touch_permille => 5})),
    %% S is used after the checks: its store stays open (not garbage collected) until here.
    ?assertMatch({ok, [], S}, erlmcp_session_native:list(S)).

%%% kill -9

disk_kill9_loses_no_acknowledged_session(Config) ->
    %% doc: a separate VM stores sessions into a disk store from 16 processes and
    %% prints each id after store/3 returned ok; it is killed with SIGKILL; every
    %% printed (acknowledged) session is then in the store, intact.
    Iterations = list_to_integer(os:getenv("ERLMCP_SESSION_CRASH_ITERATIONS", "3")),
    Path = filename:join(?config(priv_dir, Config), "crash.redb"),
    set_clock(system),
    lists:foreach(fun(I) -> crash_once(Path, I) end, lists:seq(1, Iterations)).

crash_once(Path, Iteration) ->
    Acked = run_and_kill(Path, Iteration, 150 + rand:uniform(300)),
    ?assert(length(Acked) > 0),
    %% Check from a process of its own: when it exits, its store handle is
    %% released and the next child VM can open (lock) the file.
    {Pid, Mon} = spawn_monitor(fun() -> check_acked(Path, Acked) end),
    receive {'DOWN', Mon, process, Pid, normal} -> ok;
            {'DOWN', Mon, process, Pid, Why} -> ct:fail({check_failed, Why})
    end,
    ct:log("iteration ~b: ~b acknowledged sessions present after kill -9", [Iteration, length(Acked)]).

check_acked(Path, Acked) ->
    {ok, S} = erlmcp_session_native:init(#{store => {disk, Path}}),
    lists:foreach(
      fun(Id) ->
              case erlmcp_session_native:get(Id, S) of
                  {ok, #{metadata := #{writer_id := Id, payload := P}}, S} ->
                      ?assertEqual(expected_payload(Id), P);
                  Other ->
                      ct:fail({acknowledged_session_lost, Id, Other})
              end
      end, Acked).

expected_payload(Id) ->
    binary:copy(Id, 20).

run_and_kill(Path, Iteration, KillAfter) ->
    Ebin = filename:dirname(code:which(erlmcp_session_native)),
    Child = lists:flatten(io_lib:format(
        "{ok, S} = erlmcp_session_native:init(#{store => {disk, ~p}}),"
        "Self = self(),"
        "W = fun W(P, N) -> Id = iolist_to_binary(io_lib:format(\"i~~b-p~~b-n~~b\", [~b, P, N])),"
        "  Sess = #{id => Id, created_at => 0, last_accessed => erlang:system_time(millisecond),"
        "           timeout_ms => infinity, metadata => #{writer_id => Id, payload => binary:copy(Id, 20)}},"
        "  {ok, S} = erlmcp_session_native:store(Id, Sess, S), Self ! {acked, Id}, W(P, N + 1) end,"
        "[spawn_link(fun() -> W(P, 0) end) || P <- lists:seq(1, 16)],"
        "L = fun L() -> receive {acked, Id} -> io:put_chars([Id, $\\n]), L() end end, L().",
        [Path, Iteration])),
    Erl = os:find_executable("erl"),
    Port = open_port({spawn_executable, Erl},
                     [{args, ["-noshell", "-pa", Ebin, "-eval", Child]}, {line, 4096}, exit_status,
                      stderr_to_stdout, binary]),
    {os_pid, OsPid} = erlang:port_info(Port, os_pid),
    Acked = collect(Port, KillAfter, []),
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
    drain(Port, Acked).

collect(_Port, 0, Acc) ->
    Acc;
collect(Port, Left, Acc) ->
    receive
        {Port, {data, {eol, <<"i", _/binary>> = Id}}} -> collect(Port, Left - 1, [Id | Acc]);
        {Port, {data, Other}} -> ct:fail({child_said, Other});
        {Port, {exit_status, St}} -> ct:fail({child_exited, St, length(Acc)})
    after 60000 -> ct:fail({child_too_slow, length(Acc)})
    end.

%% Lines printed before the kill are acknowledged too.
drain(Port, Acc) ->
    receive
        {Port, {data, {eol, <<"i", _/binary>> = Id}}} -> drain(Port, [Id | Acc]);
        {Port, {data, _}} -> drain(Port, Acc);
        {Port, {exit_status, _}} -> Acc
    after 30000 -> ct:fail(child_not_dead)
    end.

%%% helpers

%% Runs F on every element of L from N processes; fails if any fails.
parallel(N, L, F) ->
    Chunks = chunks(L, max(1, (length(L) + N - 1) div N)),
    Parent = self(),
    Pids = [spawn_link(fun() -> lists:foreach(F, C), Parent ! {done, self()} end) || C <- Chunks],
    [receive {done, P} -> ok after 120000 -> ct:fail(parallel_timeout) end || P <- Pids],
    ok.

chunks([], _) -> [];
chunks(L, N) when length(L) =< N -> [L];
chunks(L, N) -> {H, T} = lists:split(N, L), [H | chunks(T, N)].
