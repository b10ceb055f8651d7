//! Evaluation does not allocate (DESIGN §3.3): counted with a global
//! allocator that tallies allocations made by the measuring thread.

#![allow(unsafe_code)] // a counting global allocator needs it; test-only

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use erlmcp_rollout::flags::{Context, Engine, FlagsConfig, ManualClock, Value};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct SliceCtx<'a>(&'a [(&'a str, Value<'a>)]);

impl Context for SliceCtx<'_> {
    fn get(&self, key: &str) -> Option<Value<'_>> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }
}

#[test]
fn evaluation_does_not_allocate() {
    let config = FlagsConfig::from_json(
        br#"{
        "static": {"enabled": true},
        "off": {},
        "rollout": {"enabled": true, "rollout_percentage": 50},
        "salted": {"enabled": true, "rollout_percentage": 50, "salt": "s1", "stickiness": "user_id"},
        "conditions": {"enabled": true, "conditions": [
            {"user_id": "u-1"}, {"attribute": "tier", "op": "in", "values": ["gold", 3]},
            {"attribute": "client", "op": "contains", "values": ["mcp"]}, {"attribute": "load", "op": "lt", "values": [2.5]},
            {"attribute": "version", "op": "semver_gte", "values": ["1.2.0"]}]},
        "scheduled": {"schedule": [{"at": "2026-01-01T00:00:00Z", "enabled": true, "rollout_percentage": 30}]}
    }"#,
    )
    .unwrap();
    let engine = Engine::builder()
        .environment("production")
        .clock(Arc::new(ManualClock::at_rfc3339("2026-06-01").unwrap()))
        .build(config);
    let big = [0xffu8; 12];
    let values = [
        ("session_id", Value::Binary(b"session-123")),
        ("user_id", Value::Atom("u-1")),
        ("tier", Value::Int(3)),
        ("client", Value::Binary(b"mcp-inspector")),
        ("load", Value::Binary(b"1.5")),
        ("version", Value::Binary(b"1.10.0")),
        (
            "n",
            Value::BigInt {
                negative: true,
                magnitude: &big,
            },
        ),
    ];
    let ctx = SliceCtx(&values);
    let flags = [
        "static",
        "off",
        "rollout",
        "salted",
        "conditions",
        "scheduled",
        "unknown",
    ];
    // Warm up: arc-swap registers this thread on first use.
    for f in flags {
        engine.evaluate(f, &ctx);
    }
    let before = ALLOCATIONS.with(Cell::get);
    let mut on = 0;
    for _ in 0..1000 {
        for f in flags {
            on += usize::from(engine.evaluate(f, &ctx).enabled);
        }
    }
    let allocations = ALLOCATIONS.with(Cell::get) - before;
    assert_eq!(
        allocations, 0,
        "evaluate allocated {allocations} times in 7000 evaluations"
    );
    assert!(on >= 2000, "the flags under test mostly evaluate to true: {on}");
    assert!(
        engine.is_enabled("conditions", &ctx),
        "every condition kind was exercised and held"
    );
}
