//! Flag evaluation and reload benchmarks (issue targets: static <= 30 ns,
//! one condition <= 50 ns, rollout <= 80 ns, 1000-flag reload <= 5 ms with
//! readers never blocked). Each group also measures a baseline in the same
//! run so BENCHMARKS.md can state ratios:
//! - `baseline/hashmap_get`: a plain `HashMap<String, bool>` lookup (no
//!   rollout, no counters) — the floor of any keyed lookup;
//! - `baseline/mutex_hashmap_get`: the same behind a `Mutex` — what a
//!   single-owner service (the reference's gen_server) amounts to in Rust.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use erlmcp_rollout::flags::{Context, Engine, FlagsConfig, Value};

/// A borrowed context like the NIF builds from an Erlang map: no allocation.
struct SliceCtx<'a>(&'a [(&'a str, Value<'a>)]);

impl Context for SliceCtx<'_> {
    #[inline]
    fn get(&self, key: &str) -> Option<Value<'_>> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

fn many_flags(n: usize) -> String {
    let body: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#""flag_{i}": {{"enabled": true, "rollout_percentage": {}, "environments": ["dev", "production"],
                   "conditions": [{{"attribute": "tier", "op": "in", "values": ["gold", "silver"]}}], "metadata": {{"phase": {}}}}}"#,
                i % 101,
                i % 4 + 1
            )
        })
        .collect();
    format!("{{{}}}", body.join(","))
}

fn engine() -> Engine {
    let mut json = many_flags(50);
    json.pop();
    json.push_str(
        r#", "mcp_static": {"enabled": true},
            "mcp_condition": {"enabled": true, "conditions": [{"user_id": "u-1"}]},
            "mcp_rollout": {"enabled": true, "rollout_percentage": 50}}"#,
    );
    Engine::builder()
        .environment("production")
        .build(FlagsConfig::from_json(json.as_bytes()).unwrap())
}

fn evaluation(c: &mut Criterion) {
    let engine = engine();
    let ctx_values = [
        ("session_id", Value::Binary(b"session-0001")),
        ("user_id", Value::Binary(b"u-1")),
    ];
    let ctx = SliceCtx(&ctx_values);
    assert!(engine.is_enabled("mcp_static", &ctx));
    assert!(engine.is_enabled("mcp_condition", &ctx));
    let mut g = c.benchmark_group("evaluate");
    g.bench_function("static", |b| {
        b.iter(|| black_box(engine.evaluate(black_box("mcp_static"), &ctx)))
    });
    g.bench_function("one_condition", |b| {
        b.iter(|| black_box(engine.evaluate(black_box("mcp_condition"), &ctx)))
    });
    g.bench_function("rollout", |b| {
        b.iter(|| black_box(engine.evaluate(black_box("mcp_rollout"), &ctx)))
    });
    g.bench_function("unknown", |b| {
        b.iter(|| black_box(engine.evaluate(black_box("mcp_nope"), &ctx)))
    });

    let mut plain: HashMap<String, bool> = (0..50).map(|i| (format!("flag_{i}"), true)).collect();
    plain.insert("mcp_static".into(), true);
    g.bench_function("baseline/hashmap_get", |b| {
        b.iter(|| black_box(plain.get(black_box("mcp_static")).copied()))
    });
    let locked = Mutex::new(plain.clone());
    g.bench_function("baseline/mutex_hashmap_get", |b| {
        b.iter(|| black_box(locked.lock().unwrap().get(black_box("mcp_static")).copied()))
    });
    g.finish();
}

/// The issue-18 additions, on their own engine (so the `evaluate` group's
/// snapshot is the one the earlier runs measured): a basis-point rollout and
/// a one-prerequisite flag through the boolean path (out of line), and
/// `details` of a plain flag and of a three-variant flag.
fn extended(c: &mut Criterion) {
    let engine = Engine::builder().environment("production").build(
        FlagsConfig::from_json(
            br##"{"mcp_static": {"enabled": true},
                 "mcp_fine": {"enabled": true, "rollout_basis_points": 5000},
                 "mcp_child": {"enabled": true, "prerequisites": [{"flag": "mcp_static"}]},
                 "mcp_variants": {"enabled": true, "variants": {"a": {"value": "A", "weight": 5},
                                  "b": {"value": "B", "weight": 3}, "c": {"value": "C", "weight": 2}}}}"##,
        )
        .unwrap(),
    );
    let ctx_values = [("session_id", Value::Binary(b"session-0001"))];
    let ctx = SliceCtx(&ctx_values);
    assert!(engine.is_enabled("mcp_child", &ctx));
    let mut g = c.benchmark_group("extended");
    g.bench_function("fine_rollout", |b| {
        b.iter(|| black_box(engine.evaluate(black_box("mcp_fine"), &ctx)))
    });
    g.bench_function("one_prerequisite", |b| {
        b.iter(|| black_box(engine.evaluate(black_box("mcp_child"), &ctx)))
    });
    g.bench_function("details_static", |b| {
        b.iter(|| black_box(engine.details(black_box("mcp_static"), &ctx)))
    });
    g.bench_function("details_three_variants", |b| {
        b.iter(|| black_box(engine.details(black_box("mcp_variants"), &ctx)))
    });
    g.finish();
}

fn reload(c: &mut Criterion) {
    let json = many_flags(1000);
    let config = FlagsConfig::from_json(json.as_bytes()).unwrap();
    let engine = Arc::new(Engine::builder().environment("production").build(config.clone()));
    // phase 0: reader alone (baseline), 1: reader during reloads, 2: stop.
    let phase = Arc::new(AtomicU8::new(0));
    // One background reader (the machine has 2 cores) times every batch of
    // 16 evaluations into a log-scale histogram per phase.
    let reader = {
        let (engine, phase) = (engine.clone(), phase.clone());
        std::thread::spawn(move || {
            let vals = [("session_id", Value::Binary(b"s-1")), ("tier", Value::Binary(b"gold"))];
            let ctx = SliceCtx(&vals);
            let mut hist = [Histogram::default(), Histogram::default()];
            loop {
                let p = phase.load(Ordering::Relaxed) as usize;
                let Some(h) = hist.get_mut(p) else { break };
                let t = Instant::now();
                for i in 0..16 {
                    black_box(engine.evaluate(black_box(["flag_1", "flag_500", "flag_999", "x"][i % 4]), &ctx));
                }
                h.record(t.elapsed().as_nanos() as u64);
            }
            hist
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    phase.store(1, Ordering::Relaxed);
    let mut g = c.benchmark_group("reload_1000_flags");
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("compile_and_swap", |b| {
        b.iter(|| engine.reload(black_box(config.clone())))
    });
    g.bench_function("parse_validate_compile_swap", |b| {
        b.iter(|| engine.reload_json(black_box(json.as_bytes())).unwrap())
    });
    g.bench_function("baseline/parse_with_serde_json_value", |b| {
        b.iter(|| black_box(serde_json::from_str::<serde_json::Value>(black_box(&json)).unwrap()))
    });
    g.finish();
    phase.store(2, Ordering::Relaxed);
    let [alone, during] = reader.join().unwrap();
    for (name, h) in [("reader alone (baseline)", alone), ("reader during reloads", during)] {
        println!(
            "{name}: {} batches of 16; ns/evaluation p50 <= {}, p99 <= {}, p99.9 <= {}, p99.99 <= {}, max <= {} \
             (upper bucket bounds; max includes the OS descheduling the reader)",
            h.count,
            h.quantile(0.5) / 16,
            h.quantile(0.99) / 16,
            h.quantile(0.999) / 16,
            h.quantile(0.9999) / 16,
            h.quantile(1.0) / 16
        );
    }
}

/// Log-scale latency histogram: 8 buckets per power of two (~9 % wide).
struct Histogram {
    buckets: Vec<u64>,
    count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: vec![0; 64 * 8],
            count: 0,
        }
    }
}

impl Histogram {
    fn index(ns: u64) -> usize {
        let ns = ns.max(1);
        let log = 63 - ns.leading_zeros() as usize;
        let frac = if log >= 3 { ((ns >> (log - 3)) & 7) as usize } else { 0 };
        log * 8 + frac
    }
    fn upper(i: usize) -> u64 {
        let (log, frac) = (i / 8, (i % 8) as u64);
        if log >= 3 {
            (8 + frac + 1) << (log - 3)
        } else {
            1 << (log + 1)
        }
    }
    fn record(&mut self, ns: u64) {
        self.buckets[Self::index(ns)] += 1;
        self.count += 1;
    }
    fn quantile(&self, q: f64) -> u64 {
        let target = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                return Self::upper(i);
            }
        }
        0
    }
}

criterion_group!(benches, evaluation, extended, reload);
criterion_main!(benches);
