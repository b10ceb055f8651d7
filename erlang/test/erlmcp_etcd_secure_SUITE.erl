%% @doc The Erlang API over the real NIF against a real secured etcd cluster:
%% 3 members with TLS on client and peer ports, `--client-cert-auth' and
%% authentication on (scripts/etcd-cluster start-secure: user `erlmcp' may
%% read and write under `erlmcp/' only). The session store, the feature flags
%% and the hybrid backend's etcd phase work with `tls' and `auth'; a wrong
%% password, a missing client certificate and a prefix outside the role are
%% each their own `{etcd_access, Kind, Message}' error, without the password.
-module(erlmcp_etcd_secure_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, init_per_suite/1, end_per_suite/1]).
-export([session_store_over_mutual_tls_as_a_user/1, refusals_are_typed_and_show_no_secret/1,
         flags_follow_a_key_over_tls/1, flags_refused_at_once_with_a_typed_error/1,
         hybrid_phase_in_a_secured_etcd/1]).

all() ->
    %% flags_refused_at_once_with_a_typed_error runs before any case loads flags in
    %% this VM: it checks a first start.
    [session_store_over_mutual_tls_as_a_user, refusals_are_typed_and_show_no_secret,
     flags_refused_at_once_with_a_typed_error, flags_follow_a_key_over_tls,
     hybrid_phase_in_a_secured_etcd].

init_per_suite(Config) ->
    Dir = filename:join(?config(priv_dir, Config), "etcd"),
    {0, Out} = erlmcp_test_os:run(erlmcp_test_os:script("etcd-cluster"), ["start-secure", Dir]),
    ct:log("~s", [Out]),
    {ok, Eps} = file:read_file(filename:join(Dir, "endpoints")),
    %% host:port: with tls the scheme is https.
    Members = [string:prefix(E, <<"https://">>) || E <- binary:split(string:trim(Eps), <<",">>, [global])],
    Pki = filename:join(Dir, "pki"),
    %% The password stays in its file (CT logs the Config of every case).
    [{etcd_dir, Dir}, {members, Members}, {pki, Pki} | Config].

end_per_suite(Config) ->
    _ = erlmcp_test_os:run(erlmcp_test_os:script("etcd-cluster"), ["stop", ?config(etcd_dir, Config)]),
    ok.

%% The password of user erlmcp, for checking that no message holds it.
password(Config) ->
    {ok, P} = file:read_file(pki(Config, "password")),
    string:trim(P).

pki(Config, Name) ->
    filename:join(?config(pki, Config), Name).

tls(Config) ->
    #{cacertfile => pki(Config, "ca.pem"), certfile => pki(Config, "client.pem"),
      keyfile => pki(Config, "client-key.pem")}.

auth(Config) ->
    #{user => <<"erlmcp">>, password_file => pki(Config, "password")}.

session(Id) ->
    Now = erlang:system_time(millisecond),
    #{id => Id, created_at => Now, last_accessed => Now, timeout_ms => 60000, metadata => #{n => 1}}.

%% etcdctl as root (the cluster's etcdctl-flags file), for what the test checks behind the API.
etcdctl(Config, Args) ->
    Dir = ?config(etcd_dir, Config),
    {ok, Flags} = file:read_file(filename:join(Dir, "etcdctl-flags")),
    {ok, Eps} = file:read_file(filename:join(Dir, "endpoints")),
    Split = [binary_to_list(F) || F <- binary:split(string:trim(Flags), <<" ">>, [global])],
    erlmcp_test_os:run(os:find_executable("etcdctl"), ["--endpoints=" ++ binary_to_list(string:trim(Eps)) | Split] ++ Args).

session_store_over_mutual_tls_as_a_user(Config) ->
    %% doc: init/1 with tls and auth: store, fetch, list and delete through TLS as user erlmcp.
    {ok, S} = erlmcp_session_native:init(#{store => {etcd, ?config(members, Config)},
                                            prefix => <<"erlmcp/sessions/ct/">>,
                                            tls => tls(Config), auth => auth(Config)}),
    {ok, S} = erlmcp_session_native:store(<<"s1">>, session(<<"s1">>), S),
    {ok, #{id := <<"s1">>, metadata := #{n := 1}}, S} = erlmcp_session_native:fetch(<<"s1">>, S),
    {ok, [<<"s1">>], S} = erlmcp_session_native:list(S),
    {ok, S} = erlmcp_session_native:delete(<<"s1">>, S),
    {error, not_found, S} = erlmcp_session_native:fetch(<<"s1">>, S),
    %% A spec with its own options works too.
    {ok, S2} = erlmcp_session_native:init(#{store => {etcd, ?config(members, Config),
                                                      #{tls => tls(Config), auth => auth(Config)}},
                                             prefix => <<"erlmcp/sessions/ct2/">>}),
    {ok, S2} = erlmcp_session_native:store(<<"s2">>, session(<<"s2">>), S2).

refusals_are_typed_and_show_no_secret(Config) ->
    %% doc: a wrong password, a missing client certificate and a prefix outside the role
    %% are each their own {etcd_access, Kind, Message}; nothing is written; no password shows.
    Dir = ?config(priv_dir, Config),
    Wrong = filename:join(Dir, "wrong-password"),
    WrongPassword = <<"not-the-Password-4Qx">>,
    ok = file:write_file(Wrong, [WrongPassword, "\n"]),
    Members = ?config(members, Config),
    {error, {etcd_access, wrong_password, M1}} =
        erlmcp_session_native:init(#{store => {etcd, Members}, prefix => <<"erlmcp/sessions/ct3/">>,
                                     tls => tls(Config), auth => #{user => <<"erlmcp">>, password_file => Wrong}}),
    {error, {etcd_access, client_certificate_required, M2}} =
        erlmcp_session_native:init(#{store => {etcd, Members}, prefix => <<"erlmcp/sessions/ct3/">>,
                                     tls => maps:with([cacertfile], tls(Config)), auth => auth(Config)}),
    {error, {etcd_access, permission_denied, M3}} =
        erlmcp_session_native:init(#{store => {etcd, Members}, prefix => <<"outside/ct/">>,
                                     tls => tls(Config), auth => auth(Config)}),
    ct:log("~ts~n~ts~n~ts", [M1, M2, M3]),
    [?assertEqual(nomatch, binary:match(M, [WrongPassword, password(Config)])) || M <- [M1, M2, M3]],
    %% bad options are rejected before any connection
    {error, {bad_option, _}} = erlmcp_session_native:init(#{store => {etcd, Members}, tls => #{certfile => "x"}}),
    {error, {bad_option, _}} = erlmcp_session_native:init(#{store => {etcd, Members}, auth => #{user => <<"u">>}}),
    {0, Keys} = etcdctl(Config, ["get", "--prefix", "--keys-only", "erlmcp/sessions/ct3/"]),
    ?assertEqual(<<>>, string:trim(Keys)).

flags_follow_a_key_over_tls(Config) ->
    %% doc: erlmcp_feature_flags with etcd => #{..., tls, auth} follows the key.
    Key = "erlmcp/feature_flags_ct",
    {0, _} = etcdctl(Config, ["put", Key, "{\"f_tls\": {\"enabled\": true}}"]),
    {ok, Pid} = erlmcp_feature_flags:start_link(#{etcd => #{endpoints => ?config(members, Config),
                                                            key => list_to_binary(Key),
                                                            tls => tls(Config), auth => auth(Config)},
                                                  environment => production}),
    try
        ?assert(erlmcp_feature_flags:is_enabled(<<"f_tls">>, #{})),
        {0, _} = etcdctl(Config, ["put", Key, "{\"f_tls\": {\"enabled\": false}}"]),
        eventually(fun() -> not erlmcp_feature_flags:is_enabled(<<"f_tls">>, #{}) end)
    after
        unlink(Pid),
        gen_server:stop(Pid)
    end.

flags_refused_at_once_with_a_typed_error(Config) ->
    %% doc: a first erlmcp_feature_flags:start_link with a wrong password, with a CA that
    %% did not sign the members' certificates, or with a key outside the role fails with
    %% the typed {etcd_access, Kind, Message} (not {etcd_unavailable, _} after the connect
    %% timeout); the message names what failed and holds no password; nothing keeps
    %% retrying in the background.
    Wrong = filename:join(?config(priv_dir, Config), "wrong-flags-password"),
    WrongPassword = <<"not-the-Password-7Zk">>,
    ok = file:write_file(Wrong, [WrongPassword, "\n"]),
    Start = fun(Key, Tls, Auth) ->
                    R = erlmcp_feature_flags:start_link(
                          #{etcd => #{endpoints => ?config(members, Config), key => Key,
                                      tls => Tls, auth => Auth},
                            environment => production}),
                    %% OTP 25 delivers the failed server's exit signal as a message
                    %% (trapped here); OTP 26+ start_link consumes it.
                    receive {'EXIT', _, _} -> R after 500 -> R end
            end,
    %% A server restarted after flags were loaded keeps serving them (and warns); the
    %% refusal is an error only for a first start, which this VM must still be at.
    {_, _, 0} = erlmcp_rollout_nif:flags_status(),
    process_flag(trap_exit, true),
    try
        Key = <<"erlmcp/feature_flags_ct">>,
        {error, {etcd_access, wrong_password, M1}} =
            Start(Key, tls(Config), #{user => <<"erlmcp">>, password_file => Wrong}),
        %% The client certificate as the "CA": it did not sign the members' certificates.
        {error, {etcd_access, unknown_ca, M2}} =
            Start(Key, (tls(Config))#{cacertfile => pki(Config, "client.pem")}, auth(Config)),
        {error, {etcd_access, permission_denied, M3}} =
            Start(<<"outside/feature_flags">>, tls(Config), auth(Config)),
        ct:log("~ts~n~ts~n~ts", [M1, M2, M3]),
        ?assertNotEqual(nomatch, binary:match(M1, <<"erlmcp">>)),
        ?assertNotEqual(nomatch, binary:match(M2, <<"unknown CA">>)),
        [?assertEqual(nomatch, binary:match(M, [WrongPassword, password(Config)])) || M <- [M1, M2, M3]],
        ?assertEqual(undefined, erlmcp_rollout_nif:flags_etcd_status())
    after
        process_flag(trap_exit, false)
    end.

hybrid_phase_in_a_secured_etcd(Config) ->
    %% doc: the hybrid backend with an etcd secondary and the phase in etcd, both over TLS as
    %% user erlmcp (top-level tls and auth): the advance is saved in etcd and the relay
    %% copies the write into the etcd secondary.
    Dir = filename:join(?config(priv_dir, Config), "hybrid"),
    ok = filelib:ensure_path(Dir),
    {ok, H} = erlmcp_session_backend_hybrid:init(
                #{primary => {disk, filename:join(Dir, "old.redb")},
                  secondary => {etcd, ?config(members, Config)},
                  prefix => <<"erlmcp/sessions/hybrid/">>,
                  state_dir => Dir, tls => tls(Config), auth => auth(Config),
                  phase_etcd => #{endpoints => ?config(members, Config), node => ct_node,
                                  prefix => <<"erlmcp/migration/ct/">>}}),
    {ok, phase1} = erlmcp_session_backend_hybrid:advance(H),
    {ok, H} = erlmcp_session_backend_hybrid:store(<<"h2">>, session(<<"h2">>), H),
    {ok, _} = erlmcp_session_backend_hybrid:drain(10000, H),
    {0, Phase} = etcdctl(Config, ["get", "erlmcp/migration/ct/phase", "--print-value-only"]),
    ?assertMatch({match, _}, re:run(Phase, <<"\"phase\": \"phase1\"">>)),
    %% The phase watcher running in this VM applied and acknowledged it.
    try
        eventually(fun() ->
                           case etcdctl(Config, ["get", "erlmcp/migration/ct/acks/ct_node", "--print-value-only"]) of
                               {0, Ack} -> re:run(Ack, <<"phase1">>) =/= nomatch;
                               _ -> false
                           end
                   end)
    after
        {ok, _, #{<<"phase_watch">> := Watch}} = erlmcp_session_backend_hybrid:status(H),
        ct:log("phase watcher: ~tp", [Watch])
    end,
    {0, Keys} = etcdctl(Config, ["get", "--prefix", "--keys-only", "erlmcp/sessions/hybrid/"]),
    ?assertMatch({match, _}, re:run(Keys, <<"h2">>)).

eventually(F) ->
    eventually(F, erlang:monotonic_time(millisecond) + 5000).
eventually(F, Deadline) ->
    case F() of
        true -> ok;
        false ->
            erlang:monotonic_time(millisecond) < Deadline orelse ct:fail(not_within_5_seconds),
            timer:sleep(20),
            eventually(F, Deadline)
    end.
