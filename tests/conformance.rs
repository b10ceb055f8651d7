//! Runs every conformance fixture in `tests/fixtures/flags/` (the same files
//! the Erlang suites run through the NIF) against the Rust engine.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use erlmcp_rollout::flags::{
    Engine, EnvOverrides, FlagsConfig, ManualClock, MapContext, OwnedValue, Reason, SystemClock,
};
use serde_json::Value as J;

fn fixture_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flags");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "json")
                && !p.file_name().unwrap().to_string_lossy().starts_with("reference_")
        })
        .collect();
    files.sort();
    files
}

fn context_value(v: &J) -> OwnedValue {
    match v {
        J::String(s) => OwnedValue::Binary(s.as_bytes().to_vec()),
        J::Number(n) => OwnedValue::parse_integer(&n.to_string()).expect("integer context value"),
        J::Object(m) if m.len() == 1 => {
            let (k, v) = m.iter().next().unwrap();
            let s = v.as_str().expect("tagged value is a string");
            match k.as_str() {
                "atom" => OwnedValue::Atom(s.to_owned()),
                "hex" => OwnedValue::Binary(
                    (0..s.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                        .collect(),
                ),
                "int" => OwnedValue::parse_integer(s).expect("decimal integer"),
                other => panic!("unknown tagged context value {other:?}"),
            }
        }
        other => panic!("unsupported context value {other}"),
    }
}

fn run_file(path: &Path) -> usize {
    let text = std::fs::read(path).unwrap();
    let doc: J = serde_json::from_slice(&text).unwrap();
    let config_text = serde_json::to_vec(&doc["config"]).unwrap();
    let config = FlagsConfig::from_json(&config_text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut builder = Engine::builder().environment(doc["environment"].as_str().unwrap());
    builder = match doc.get("now").and_then(J::as_str) {
        Some(now) => builder.clock(Arc::new(ManualClock::at_rfc3339(now).unwrap())),
        None => builder.clock(Arc::new(SystemClock)),
    };
    if let Some(env) = doc.get("env_overrides").and_then(J::as_str) {
        builder = builder.env_overrides(EnvOverrides::parse(env).unwrap());
    }
    let engine = builder.build(config);
    if let Some(J::Object(rt)) = doc.get("runtime_overrides") {
        for (flag, on) in rt {
            if on.as_bool().unwrap() {
                engine.enable(flag)
            } else {
                engine.disable(flag)
            }
        }
    }
    let cases = doc["cases"].as_array().unwrap();
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let flag = case["flag"].as_str().unwrap();
        let mut ctx = MapContext::new();
        for (k, v) in case["context"].as_object().unwrap() {
            ctx.insert(k.clone(), context_value(v));
        }
        let got = engine.evaluate(flag, &ctx);
        let explained = engine.explain(flag, &ctx);
        assert_eq!(explained.result, got, "{name}: explain must agree with evaluate");
        let mut ok =
            got.enabled == case["enabled"].as_bool().unwrap() && got.reason.code() == case["reason"].as_str().unwrap();
        match (got.reason, case.get("bucket"), case.get("condition_index")) {
            (Reason::Rollout { bucket, .. }, Some(b), _) => ok &= u64::from(bucket) == b.as_u64().unwrap(),
            (Reason::Condition { index, .. }, _, Some(i)) => ok &= u64::from(index) == i.as_u64().unwrap(),
            (_, None, None) => {}
            _ => ok = false,
        }
        if !ok {
            failures.push(format!("  {name}: {flag} -> {got:?}, expected {case}"));
        }
    }
    assert!(failures.is_empty(), "{}:\n{}", path.display(), failures.join("\n"));
    cases.len()
}

#[test]
fn every_fixture_file_passes() {
    let files = fixture_files();
    assert!(files.len() >= 6, "fixtures missing: {files:?}");
    let total: usize = files.iter().map(|f| run_file(f)).sum();
    assert!(total >= 80, "only {total} cases");
}
