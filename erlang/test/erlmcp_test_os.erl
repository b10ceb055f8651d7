%% @doc Test helpers: the repository's scripts and external commands, run as
%% ports (no shell), with their exit status and output.
-module(erlmcp_test_os).
-export([repo_root/0, script/1, run/2]).

%% The repository (tests run from erlang/_build/test/lib/erlmcp_rollout).
-spec repo_root() -> file:filename().
repo_root() ->
    find_root(filename:dirname(code:lib_dir(erlmcp_rollout))).

find_root("/") -> error(repository_root_not_found);
find_root(Dir) ->
    case filelib:is_regular(filename:join([Dir, "scripts", "test"])) of
        true -> Dir;
        false -> find_root(filename:dirname(Dir))
    end.

%% The path of scripts/Name.
-spec script(string()) -> file:filename().
script(Name) ->
    filename:join([repo_root(), "scripts", Name]).

%% Runs Exe with Args (stderr merged into stdout) and waits for it (at most 2 min).
-spec run(file:filename(), [string()]) -> {non_neg_integer(), binary()}.
run(Exe, Args) ->
    Port = open_port({spawn_executable, Exe}, [{args, Args}, exit_status, stderr_to_stdout, binary]),
    collect(Port, []).

collect(Port, Acc) ->
    receive
        {Port, {data, D}} -> collect(Port, [D | Acc]);
        {Port, {exit_status, St}} -> {St, iolist_to_binary(lists:reverse(Acc))}
    after 120000 -> error({command_timeout, Port})
    end.
