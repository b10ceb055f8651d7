//! Hot reload: a watcher re-reads the config when it changes, readers keep
//! evaluating lock-free, and a broken file never replaces the last good one.
//!
//! ```sh
//! cargo run --example hot_reload
//! ```

use std::sync::Arc;
use std::time::Duration;

use erlmcp_rollout::flags::{Engine, WatchEvent, WatchOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("erlmcp-hot-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("feature_flags.json");
    std::fs::write(&path, r#"{"mcp_tasks": {"enabled": false}}"#)?;

    let engine = Arc::new(Engine::from_file(&path, "dev")?);
    let watcher = engine.watch_file(
        &path,
        WatchOptions {
            check_interval: Duration::from_millis(100),
            on_event: Some(Box::new(|event| match event {
                WatchEvent::Reloaded(o) => println!("  reloaded: {} flags, generation {}", o.flags, o.generation),
                WatchEvent::Failed(e) => println!("  reload failed, still serving the last good config:\n    {e}"),
            })),
            ..WatchOptions::default()
        },
    )?;

    let show = |when: &str| println!("{when}: mcp_tasks = {}", engine.is_enabled("mcp_tasks", &()));
    show("start");

    println!("writing a config that enables mcp_tasks");
    write_atomically(&path, r#"{"mcp_tasks": {"enabled": true}}"#)?;
    std::thread::sleep(Duration::from_millis(500));
    show("after the change");

    println!("writing a broken config");
    write_atomically(
        &path,
        r#"{"mcp_tasks": {"enabled": "maybe", "rollout_percentage": 180}}"#,
    )?;
    std::thread::sleep(Duration::from_millis(500));
    show("after the broken write");

    println!("disabling at runtime (survives reloads until clear)");
    engine.disable("mcp_tasks");
    write_atomically(
        &path,
        r#"{"mcp_tasks": {"enabled": true}, "mcp_sampling": {"enabled": true}}"#,
    )?;
    std::thread::sleep(Duration::from_millis(500));
    show("after another reload");
    engine.clear("mcp_tasks");
    show("after clear");
    println!("watcher status: {:?}", watcher.status());

    drop(watcher);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Write to a temporary file and rename it over the target, as config
/// management tools do: readers never see a half-written file.
fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}
