//! A stand-in for `buildkite-agent`, for machines where the real one cannot be installed.
//!
//! What it models, from the agent's documented contract (`../shared/notes/buildkite-agent-contract.md`):
//! - `meta-data set KEY [VALUE]` (VALUE read from stdin when absent), `meta-data get KEY`, and
//!   `meta-data exists KEY` (exit 0 when present, **100** when absent). Like the real agent,
//!   meta-data needs `BUILDKITE_AGENT_ACCESS_TOKEN`.
//! - `env set NAME=VALUE…` and `env get` through the Job API: they need
//!   `BUILDKITE_AGENT_JOB_API_SOCKET` and `BUILDKITE_AGENT_JOB_API_TOKEN`, as the real agent
//!   (v3.128+) does; without them they fail the way an agent without the Job API does.
//!
//! State lives in `$BUILDKITE_STANDIN_STATE`: `meta-data/<key>` and `env/<NAME>` files, plus
//! `calls.log`, one line per invocation, so tests can assert what a hook asked for.
//! - `start`: one agent lifetime running at most one job through the hooks; see
//!   [`crate::standin_start`] for exactly what it models, and the agent version it follows.
//! - `--version`: `buildkite-agent version <BUILDKITE_STANDIN_VERSION or 3.137.0>, build standin`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

const METADATA_ABSENT: u8 = 100;

pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "--version") {
        println!(
            "buildkite-agent version {}, build standin",
            crate::standin_api::version()
        );
        return ExitCode::SUCCESS;
    }
    let Some(state) = std::env::var_os("BUILDKITE_STANDIN_STATE").map(PathBuf::from) else {
        return fail(
            "BUILDKITE_STANDIN_STATE is not set (the stand-in agent keeps its state there)",
        );
    };
    let _ = std::fs::create_dir_all(&state);
    if let Ok(mut log) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.join("calls.log"))
    {
        let _ = writeln!(log, "{}", args.join(" "));
    }
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["meta-data", rest @ ..] => meta_data(&state, rest),
        ["env", rest @ ..] => env(&state, rest),
        ["start", rest @ ..] => crate::standin_start::start(&state, rest),
        _ => fail(&format!(
            "the stand-in agent does not model `{}`",
            args.join(" ")
        )),
    }
}

fn meta_data(state: &std::path::Path, args: &[&str]) -> ExitCode {
    if std::env::var("BUILDKITE_AGENT_ACCESS_TOKEN")
        .unwrap_or_default()
        .is_empty()
    {
        return fail("Missing access token, set BUILDKITE_AGENT_ACCESS_TOKEN");
    }
    let dir = state.join("meta-data");
    let file = |key: &str| dir.join(key.replace('/', "%2F"));
    match args {
        ["set", key, rest @ ..] => {
            let value = match rest {
                [value] => value.to_string(),
                [] => {
                    let mut s = String::new();
                    let _ = std::io::stdin().read_to_string(&mut s);
                    s
                }
                _ => return fail("meta-data set takes KEY [VALUE]"),
            };
            if value.trim().is_empty() {
                return fail("value cannot be empty, or composed of only whitespace characters");
            }
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(file(key), value).unwrap();
            ExitCode::SUCCESS
        }
        ["get", key] => match std::fs::read_to_string(file(key)) {
            Ok(v) => {
                print!("{v}");
                ExitCode::SUCCESS
            }
            Err(_) => fail(&format!("meta-data key {key:?} not found")),
        },
        ["exists", key] if file(key).exists() => ExitCode::SUCCESS,
        ["exists", _] => ExitCode::from(METADATA_ABSENT),
        _ => fail("meta-data takes set|get|exists KEY"),
    }
}

fn env(state: &std::path::Path, args: &[&str]) -> ExitCode {
    for var in [
        "BUILDKITE_AGENT_JOB_API_SOCKET",
        "BUILDKITE_AGENT_JOB_API_TOKEN",
    ] {
        if std::env::var(var).unwrap_or_default().is_empty() {
            return fail(&format!("Error: {var} empty or undefined"));
        }
    }
    let dir = state.join("env");
    match args {
        ["set", assignments @ ..] => {
            std::fs::create_dir_all(&dir).unwrap();
            println!("Added:");
            for a in assignments {
                let Some((name, value)) = a.split_once('=') else {
                    return fail(&format!("{a:?} is not NAME=VALUE"));
                };
                std::fs::write(dir.join(name), value).unwrap();
                println!("+ {name}");
            }
            ExitCode::SUCCESS
        }
        ["get"] => {
            let mut vars = serde_json::Map::new();
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let value = std::fs::read_to_string(entry.path()).unwrap_or_default();
                vars.insert(
                    entry.file_name().to_string_lossy().into_owned(),
                    value.into(),
                );
            }
            println!("{}", serde_json::Value::Object(vars));
            ExitCode::SUCCESS
        }
        _ => fail("env takes set NAME=VALUE… | get"),
    }
}

fn fail(message: &str) -> ExitCode {
    let _ = writeln!(
        std::io::stderr(),
        "buildkite-agent (stand-in): fatal: {message}"
    );
    ExitCode::FAILURE
}
