//! The cohort contract (hash contract v1) against real `erl`: basis-point
//! rollouts (`phash2(Value, 10000) < BP`), integer percentages
//! (`phash2(Value, 100) < P`, unchanged) and variant assignment (weighted
//! rendezvous on the fine bucket) computed by `erl -noshell` from the
//! formulas in docs/flags.md, and by the engine, for thousands of session
//! ids. Fails (never skips) when `erl` is not installed.

#[path = "support/erl.rs"]
mod erl;

use std::fmt::Write as _;

use erlmcp_rollout::flags::{Engine, FlagsConfig, MapContext, OwnedValue};

const CONFIG: &str = r#"{
  "fine": {"enabled": true, "rollout_basis_points": 1234},
  "fine_salted": {"enabled": true, "rollout_basis_points": 50, "salt": "s1"},
  "pct": {"enabled": true, "rollout_percentage": 37},
  "colour": {"enabled": true, "salt": "colour-v1",
             "variants": {"blue": {"value": 1, "weight": 5}, "green": {"value": 2, "weight": 3},
                          "red": {"value": 3, "weight": 2}, "never": {"value": 4, "weight": 0}}},
  "plain": {"enabled": true,
            "variants": {"a": {"value": "a", "weight": 1}, "b": {"value": "b", "weight": 1}}}
}"#;

/// Reads hex-encoded binaries (or `i:N` integers), one per line; writes
/// `Fine FineSalted Pct Colour Plain` per line, from the documented formulas.
const ERL_SCRIPT: &str = r#"
[In, Out] = init:get_plain_arguments(),
Variant = fun (Salt, V, Vs) ->
    B = case Salt of none -> erlang:phash2(V, 10000); _ -> erlang:phash2({Salt, V}, 10000) end,
    Scores = [{-math:log((erlang:phash2({Name, B}, 4294967296) + 0.5) / 4294967296) / W, Name}
              || {Name, W} <- Vs, W > 0],
    {_, Best} = lists:min(Scores),
    Best
end,
Line = fun (L) ->
    V = case L of <<"i:", N/binary>> -> binary_to_integer(N); _ -> binary:decode_hex(L) end,
    Fine = erlang:phash2(V, 10000) < 1234,
    FineSalted = erlang:phash2({<<"s1">>, V}, 10000) < 50,
    Pct = erlang:phash2(V, 100) < 37,
    Colour = Variant(<<"colour-v1">>, V, [{<<"blue">>, 5}, {<<"green">>, 3}, {<<"red">>, 2}, {<<"never">>, 0}]),
    Plain = Variant(none, V, [{<<"a">>, 1}, {<<"b">>, 1}]),
    io_lib:format("~p ~p ~p ~s ~s~n", [Fine, FineSalted, Pct, Colour, Plain])
end,
try
    {ok, Data} = file:read_file(In),
    Lines = binary:split(Data, <<"\n">>, [global, trim_all]),
    ok = file:write_file(Out, [Line(L) || L <- Lines]),
    halt(0)
catch C:R:St ->
    io:format(standard_error, "~p:~p~n~p~n", [C, R, St]),
    halt(1)
end.
"#;

#[test]
fn basis_points_percentages_and_variants_match_real_erl() {
    let mut values: Vec<OwnedValue> = (0..4000)
        .map(|i| OwnedValue::Binary(format!("session-{i}").into_bytes()))
        .collect();
    values.extend((0..500).map(|i| OwnedValue::Binary(format!("{:x}-{i}", i * 7919).repeat(i % 7 + 1).into_bytes())));
    values.extend([-5i64, 0, 1, 42, 1 << 40].map(OwnedValue::Int));
    let mut text = String::new();
    for v in &values {
        match v {
            OwnedValue::Binary(b) => b.iter().for_each(|x| {
                let _ = write!(text, "{x:02x}");
            }),
            OwnedValue::Int(i) => {
                let _ = write!(text, "i:{i}");
            }
            _ => unreachable!(),
        }
        text.push('\n');
    }
    let erl = erl::erl_lines(ERL_SCRIPT, &text);
    assert_eq!(erl.len(), values.len());

    let engine = Engine::builder().build(FlagsConfig::from_json(CONFIG.as_bytes()).unwrap());
    let mut counts = [0usize; 3];
    let mut colours = std::collections::BTreeMap::<String, usize>::new();
    for (v, line) in values.iter().zip(&erl) {
        let mut ctx = MapContext::new();
        ctx.insert("session_id", v.clone());
        let colour = engine.details("colour", &ctx).variant.unwrap();
        let plain = engine.details("plain", &ctx).variant.unwrap();
        let ours = format!(
            "{} {} {} {colour} {plain}",
            engine.is_enabled("fine", &ctx),
            engine.is_enabled("fine_salted", &ctx),
            engine.is_enabled("pct", &ctx),
        );
        assert_eq!(ours, *line, "value {v:?}");
        counts[0] += usize::from(engine.is_enabled("fine", &ctx));
        counts[1] += usize::from(engine.is_enabled("fine_salted", &ctx));
        counts[2] += usize::from(engine.is_enabled("pct", &ctx));
        *colours.entry(colour).or_default() += 1;
    }
    // Shares near the configured ones (4505 values): 12.34 %, 0.5 %, 37 %, 5:3:2.
    let n = values.len() as f64;
    assert!((counts[0] as f64 / n - 0.1234).abs() < 0.02, "{counts:?}");
    assert!((1..=60).contains(&counts[1]), "{counts:?}");
    assert!((counts[2] as f64 / n - 0.37).abs() < 0.03, "{counts:?}");
    assert!(!colours.contains_key("never"));
    for (name, share) in [("blue", 0.5), ("green", 0.3), ("red", 0.2)] {
        let got = colours[name] as f64 / n;
        assert!((got - share).abs() < 0.04, "{name}: {got} ({colours:?})");
    }
}
