%% @doc A small JSON decoder/encoder for the test suites (OTP 25 has no
%% `json' module and hex is not reachable). Objects decode to maps with
%% binary keys, arrays to lists, strings to binaries, `null' to `null'.
-module(erlmcp_test_json).
-export([decode/1, encode/1]).

decode(Bin) when is_binary(Bin) ->
    {Value, Rest} = value(skip(Bin)),
    <<>> = skip(Rest),
    Value.

value(<<${, R/binary>>) -> object(skip(R), #{});
value(<<$[, R/binary>>) -> array(skip(R), []);
value(<<$", R/binary>>) -> string(R, <<>>);
value(<<"true", R/binary>>) -> {true, R};
value(<<"false", R/binary>>) -> {false, R};
value(<<"null", R/binary>>) -> {null, R};
value(Bin) -> number(Bin).

object(<<$}, R/binary>>, Acc) -> {Acc, R};
object(<<$", R/binary>>, Acc) ->
    {Key, R1} = string(R, <<>>),
    <<$:, R2/binary>> = skip(R1),
    {Val, R3} = value(skip(R2)),
    case skip(R3) of
        <<$,, R4/binary>> -> object(skip(R4), Acc#{Key => Val});
        <<$}, R4/binary>> -> {Acc#{Key => Val}, R4}
    end.

array(<<$], R/binary>>, []) -> {[], R};
array(Bin, Acc) ->
    {Val, R} = value(Bin),
    case skip(R) of
        <<$,, R1/binary>> -> array(skip(R1), [Val | Acc]);
        <<$], R1/binary>> -> {lists:reverse([Val | Acc]), R1}
    end.

string(<<$", R/binary>>, Acc) -> {Acc, R};
string(<<$\\, $u, H:4/binary, R/binary>>, Acc) ->
    C = binary_to_integer(H, 16),
    case {C >= 16#D800 andalso C < 16#DC00, R} of
        {true, <<$\\, $u, L:4/binary, R1/binary>>} ->
            Lo = binary_to_integer(L, 16),
            Code = 16#10000 + ((C - 16#D800) bsl 10) + (Lo - 16#DC00),
            string(R1, <<Acc/binary, Code/utf8>>);
        _ ->
            string(R, <<Acc/binary, C/utf8>>)
    end;
string(<<$\\, E, R/binary>>, Acc) ->
    C = case E of $n -> $\n; $t -> $\t; $r -> $\r; $b -> $\b; $f -> $\f; _ -> E end,
    string(R, <<Acc/binary, C>>);
string(<<C, R/binary>>, Acc) -> string(R, <<Acc/binary, C>>).

number(Bin) ->
    {Num, Rest} = take_number(Bin, <<>>),
    Value = case binary:match(Num, [<<".">>, <<"e">>, <<"E">>]) of
                nomatch -> binary_to_integer(Num);
                _ -> float_value(Num)
            end,
    {Value, Rest}.

float_value(Num) ->
    try binary_to_float(Num)
    catch error:badarg ->
        %% "1e5" and "2.5E3" forms binary_to_float rejects.
        [M, E] = binary:split(string:lowercase(Num), <<"e">>),
        Mant = case binary:match(M, <<".">>) of nomatch -> binary_to_integer(M) * 1.0; _ -> binary_to_float(M) end,
        Mant * math:pow(10, binary_to_integer(E))
    end.

take_number(<<C, R/binary>>, Acc) when C >= $0, C =< $9; C =:= $-; C =:= $+; C =:= $.; C =:= $e; C =:= $E ->
    take_number(R, <<Acc/binary, C>>);
take_number(R, Acc) -> {Acc, R}.

skip(<<C, R/binary>>) when C =:= $\s; C =:= $\t; C =:= $\n; C =:= $\r -> skip(R);
skip(Bin) -> Bin.

encode(null) -> <<"null">>;
encode(true) -> <<"true">>;
encode(false) -> <<"false">>;
encode(N) when is_integer(N) -> integer_to_binary(N);
encode(F) when is_float(F) -> float_to_binary(F, [short]);
encode(B) when is_binary(B) -> encode_string(B);
encode(A) when is_atom(A) -> encode_string(atom_to_binary(A, utf8));
encode(L) when is_list(L) -> iolist_to_binary([$[, lists:join($,, [encode(V) || V <- L]), $]]);
encode(M) when is_map(M) ->
    Pairs = [[encode_string(to_bin(K)), $:, encode(V)] || {K, V} <- lists:sort(maps:to_list(M))],
    iolist_to_binary([${, lists:join($,, Pairs), $}]).

to_bin(K) when is_binary(K) -> K;
to_bin(K) when is_atom(K) -> atom_to_binary(K, utf8).

encode_string(B) ->
    Escaped = << <<(escape(C))/binary>> || <<C>> <= B >>,
    <<$", Escaped/binary, $">>.

escape($") -> <<"\\\"">>;
escape($\\) -> <<"\\\\">>;
escape($\n) -> <<"\\n">>;
escape(C) when C < 16#20 -> list_to_binary(io_lib:format("\\u~4.16.0b", [C]));
escape(C) -> <<C>>.
