//! Evaluate flags from a config file for a few contexts, with reasons.
//!
//! ```sh
//! cargo run --example evaluate -- tests/fixtures/flags/reference_config.json production
//! ```

use erlmcp_rollout::flags::{Engine, MapContext};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .unwrap_or_else(|| "tests/fixtures/flags/reference_config.json".into());
    let environment = args.next().unwrap_or_else(|| "production".into());
    // Applies ERLMCP_FEATURE_FLAGS, as erlmcp does at start.
    let engine = Engine::from_file(&path, &environment)?;

    let contexts = [
        ("no context", MapContext::new()),
        ("session-123", MapContext::new().binary("session_id", "session-123")),
        (
            "streaming user",
            MapContext::new()
                .binary("session_id", "s-9")
                .atom("session_type", "streaming"),
        ),
    ];
    for (name, _) in engine.get_all() {
        for (label, ctx) in &contexts {
            let e = engine.evaluate(&name, ctx);
            println!("{name:<30} {label:<16} {:<5} {}", e.enabled, e.reason);
        }
    }
    println!(
        "\nWhy is mcp_tasks off?\n{}",
        engine.explain("mcp_tasks", &contexts[1].1)
    );
    print!("{}", engine.metrics().to_prometheus());
    Ok(())
}
