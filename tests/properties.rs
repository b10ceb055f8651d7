//! Property tests of the flag core.

use std::sync::Arc;

use erlmcp_rollout::flags::{
    phash2, ConfigError, Engine, FlagsConfig, ManualClock, MapContext, OwnedValue, Reason, Value,
};
use proptest::prelude::*;

fn value_strategy() -> impl Strategy<Value = OwnedValue> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(OwnedValue::Binary),
        "[a-z_]{0,20}".prop_map(OwnedValue::Atom),
        any::<i64>().prop_map(OwnedValue::Int),
        (any::<bool>(), proptest::collection::vec(any::<u8>(), 9..24))
            .prop_map(|(negative, magnitude)| OwnedValue::BigInt { negative, magnitude }),
    ]
}

fn engine_with(json: &str) -> Engine {
    Engine::builder()
        .environment("prod")
        .build(FlagsConfig::from_json(json.as_bytes()).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Raising a percentage only adds buckets: whoever is in at p is in at every q >= p.
    #[test]
    fn raising_a_percentage_only_adds(value in value_strategy(), p in 0u8..=100, q in 0u8..=100, salt in proptest::option::of("[a-z0-9]{0,8}")) {
        let (lo, hi) = (p.min(q), p.max(q));
        let salt_field = salt.as_ref().map(|s| format!(r#", "salt": "{s}""#)).unwrap_or_default();
        let engine = engine_with(&format!(
            r#"{{"lo": {{"enabled": true, "rollout_percentage": {lo}{salt_field}}}, "hi": {{"enabled": true, "rollout_percentage": {hi}{salt_field}}}}}"#
        ));
        let ctx = MapContext::new().with("session_id", value);
        let in_lo = engine.is_enabled("lo", &ctx);
        let in_hi = engine.is_enabled("hi", &ctx);
        prop_assert!(!in_lo || in_hi, "in at {lo}% but not at {hi}%");
    }

    /// The config parser never panics, whatever the bytes.
    #[test]
    fn parser_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = FlagsConfig::from_json(&bytes);
    }

    /// Nor on a valid config with bytes changed, dropped or inserted; and
    /// whatever it returns is either a config or a non-empty problem list.
    #[test]
    fn parser_never_panics_on_mutated_configs(edits in proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..8)) {
        let mut bytes = include_bytes!("fixtures/flags/reference_config.json").to_vec();
        for (pos, byte, kind) in edits {
            let at = pos % (bytes.len() + 1);
            match kind {
                0 if at < bytes.len() => bytes[at] = byte,
                1 if at < bytes.len() => { bytes.remove(at); }
                _ => bytes.insert(at, byte),
            }
        }
        match FlagsConfig::from_json(&bytes) {
            Ok(_) => {}
            Err(ConfigError::Invalid(p)) => prop_assert!(!p.is_empty()),
            Err(e) => prop_assert!(!e.problems().is_empty()),
        }
    }
}

/// A deliberately naive model of DESIGN §3.2 for flags without schedules.
#[derive(Debug, Clone)]
struct ModelFlag {
    enabled: bool,
    pct: u8,
    envs: Option<Vec<String>>,
    /// (attribute, allowed values) pairs, `in` semantics on binaries.
    conditions: Vec<(String, Vec<String>)>,
    salt: Option<String>,
}

fn model(
    flag: Option<&ModelFlag>,
    env: &str,
    ctx: &[(String, String)],
    override_: Option<bool>,
) -> (bool, &'static str) {
    let Some(f) = flag else { return (false, "unknown_flag") };
    let get = |k: &str| ctx.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_bytes());
    if !override_.unwrap_or(f.enabled) {
        return (false, "disabled");
    }
    if let Some(envs) = &f.envs {
        if !envs.iter().any(|e| e == env) {
            return (false, "environment");
        }
    }
    if f.pct < 100 {
        let v = Value::Binary(get("session_id").unwrap_or(b""));
        let bucket = match &f.salt {
            Some(s) => phash2::phash2_salted(s.as_bytes(), &v, 100),
            None => phash2::phash2(&v, 100),
        };
        if bucket >= u32::from(f.pct) {
            return (false, "rollout");
        }
    }
    for (attr, allowed) in &f.conditions {
        match get(attr) {
            Some(v) if allowed.iter().any(|a| a.as_bytes() == v) => {}
            _ => return (false, "condition"),
        }
    }
    (true, "enabled")
}

fn model_flag() -> impl Strategy<Value = ModelFlag> {
    (
        any::<bool>(),
        prop_oneof![Just(0u8), Just(100u8), 0u8..=100],
        proptest::option::of(proptest::collection::vec(
            prop_oneof![Just("dev"), Just("prod"), Just("test")],
            0..3,
        )),
        proptest::collection::vec(("[ab]", proptest::collection::vec("[xyz]", 1..3)), 0..3),
        proptest::option::of("[a-z]{1,4}"),
    )
        .prop_map(|(enabled, pct, envs, conditions, salt)| ModelFlag {
            enabled,
            pct,
            envs: envs.map(|v| {
                let mut v: Vec<String> = v.into_iter().map(str::to_owned).collect();
                v.dedup();
                v.sort();
                v.dedup();
                v
            }),
            conditions: conditions.into_iter().map(|(a, vals)| (a.to_string(), vals)).collect(),
            salt,
        })
}

fn to_json(name: &str, f: &ModelFlag) -> String {
    let mut fields = vec![
        format!(r#""enabled": {}"#, f.enabled),
        format!(r#""rollout_percentage": {}"#, f.pct),
    ];
    if let Some(e) = &f.envs {
        fields.push(format!(r#""environments": {}"#, serde_json::to_string(e).unwrap()));
    }
    let conds: Vec<String> = f
        .conditions
        .iter()
        .map(|(a, v)| {
            format!(
                r#"{{"attribute": "{a}", "op": "in", "values": {}}}"#,
                serde_json::to_string(v).unwrap()
            )
        })
        .collect();
    fields.push(format!(r#""conditions": [{}]"#, conds.join(",")));
    if let Some(s) = &f.salt {
        fields.push(format!(r#""salt": "{s}""#));
    }
    format!(r#""{name}": {{{}}}"#, fields.join(", "))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Evaluation equals the naive model, overrides included.
    #[test]
    fn evaluation_equals_the_model(
        flags in proptest::collection::vec(model_flag(), 1..5),
        env in prop_oneof![Just("dev"), Just("prod"), Just("test")],
        ctx in proptest::collection::vec((prop_oneof![Just("a"), Just("b"), Just("session_id")], "[xyz]|s-[0-9]{1,3}"), 0..4),
        which in 0usize..6,
        overrides in proptest::collection::vec(proptest::option::of(any::<bool>()), 5),
    ) {
        let body: Vec<String> = flags.iter().enumerate().map(|(i, f)| to_json(&format!("f{i}"), f)).collect();
        let config = FlagsConfig::from_json(format!("{{{}}}", body.join(",")).as_bytes()).unwrap();
        let engine = Engine::builder().environment(env).clock(Arc::new(ManualClock::new(0))).build(config);
        for (i, o) in overrides.iter().enumerate() {
            match o {
                Some(true) => engine.enable(&format!("f{i}")),
                Some(false) => engine.disable(&format!("f{i}")),
                None => {}
            }
        }
        let mut context = MapContext::new();
        let mut pairs: Vec<(String, String)> = Vec::new();
        for (k, v) in ctx {
            context.insert(k, OwnedValue::Binary(v.as_bytes().to_vec()));
            pairs.retain(|(key, _)| key != k);
            pairs.push((k.to_owned(), v));
        }
        let name = format!("f{which}");
        let got = engine.evaluate(&name, &context);
        let expected = model(flags.get(which), env, &pairs, overrides.get(which).copied().flatten());
        prop_assert_eq!((got.enabled, got.reason.code()), expected, "flag {:?}", flags.get(which));
        if let Reason::Rollout { percentage, .. } = got.reason {
            prop_assert_eq!(Some(percentage), flags.get(which).map(|f| f.pct));
        }
    }
}
