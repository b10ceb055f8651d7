//! Real `erl` as an oracle: a script reads an input file and writes an output file.

use std::io::ErrorKind;
use std::process::Command;

/// Runs `script` with `erl -noshell -eval`, its plain arguments `[In, Out]`:
/// `input` is written to `In`, and the lines the script wrote to `Out` come
/// back. Panics (never skips) when `erl` is not installed or the script fails.
pub fn erl_lines(script: &str, input: &str) -> Vec<String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let (in_path, out_path) = (dir.path().join("in.txt"), dir.path().join("out.txt"));
    std::fs::write(&in_path, input).expect("write erl input");
    let run = match Command::new("erl")
        .args(["-noshell", "-eval", script, "-extra"])
        .arg(&in_path)
        .arg(&out_path)
        .output()
    {
        Ok(run) => run,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            panic!("erl not found on PATH: run scripts/setup (installs erlang-nox)")
        }
        Err(e) => panic!("could not run erl: {e}"),
    };
    assert!(
        run.status.success(),
        "erl failed ({}):\n{}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    std::fs::read_to_string(&out_path)
        .expect("read erl output")
        .lines()
        .map(str::to_owned)
        .collect()
}
