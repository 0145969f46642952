//! agent-wrapper against tini and dumb-init (Debian packages), in the same run: start-up
//! overhead of `X -- true` over `true` alone, resident memory while supervising (Pss, VmHWM), and
//! voluntary wake-ups while the child sleeps; then how often the wrapper asks the agent's
//! `/status.json` during a job (the stand-in agent, one 10 s job).
//!
//! The wrapper reads the agent's version from a file, as in the image (image/install.sh records
//! it at build); a second row runs it without, so it runs `--version` itself.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench -p stateless-e2e --bench wrapper`
//! (`BENCH_RUNS`, default 300 start-ups per init; `BENCH_TMPDIR`, default `/dev/shm`, holds the
//! wrapper's records and termination message). Inits that are not installed are skipped with a
//! note; `apt-get install tini dumb-init` adds them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stateless_e2e::bench::{env_or, median, proc_field};
use stateless_e2e::sandbox::{bin, Sandbox, AGENT_TOKEN};

struct Init {
    name: &'static str,
    /// The command line before the child's.
    prefix: Vec<String>,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs = env_or("BENCH_RUNS", 300);
    // tmpfs, as in the other benchmarks: on this machine's ext4 with online discard, truncating
    // the termination message file alone costs ~0.5 ms, which would be measured instead of the
    // wrapper. (In a pod the kubelet's file is written once per pod.)
    let tmp = std::env::var("BENCH_TMPDIR").unwrap_or_else(|_| "/dev/shm".into());
    if Path::new(&tmp).is_dir() {
        std::env::set_var("TMPDIR", &tmp);
    }
    let sandbox = Sandbox::new();
    let wrapper = bin("agent-wrapper");
    let mut inits = vec![
        Init {
            name: "agent-wrapper",
            prefix: vec![wrapper.display().to_string(), "--agent".into()],
        },
        Init {
            name: "agent-wrapper, no version file",
            prefix: vec![
                wrapper.display().to_string(),
                "--agent-version-file=/nonexistent".into(),
                "--agent".into(),
            ],
        },
    ];
    for (name, prefix) in [
        ("tini", vec!["tini", "-s", "--"]),
        ("dumb-init", vec!["dumb-init"]),
    ] {
        if Path::new("/usr/bin").join(name).exists() {
            inits.push(Init {
                name,
                prefix: prefix.into_iter().map(String::from).collect(),
            });
        } else {
            eprintln!("note: {name} is not installed; its rows are skipped");
        }
    }
    let env = environment(&sandbox);

    // Start-up: every init and `true` alone, interleaved round by round.
    let truth = which("true");
    let versioned_true = sandbox.dir.path().join("versioned-true");
    std::fs::write(
        &versioned_true,
        format!("#!/bin/sh\n{VERSION_ANSWER}\nexit 0\n"),
    )
    .unwrap();
    std::fs::set_permissions(
        &versioned_true,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut alone = Vec::new();
    let mut startup: Vec<Vec<Duration>> = vec![Vec::new(); inits.len()];
    for _ in 0..runs {
        alone.push(time(&[truth.display().to_string()], &env));
        for (i, init) in inits.iter().enumerate() {
            let mut argv = init.prefix.clone();
            // Without the version file the wrapper asks the agent: one that answers.
            let child = match init.name {
                "agent-wrapper, no version file" => versioned_true.display().to_string(),
                _ => truth.display().to_string(),
            };
            argv.push(child);
            startup[i].push(time(&argv, &env));
        }
    }
    let base = median(alone.clone());

    println!();
    println!("`true` alone: {:.2} ms (median of {runs})", ms(base));
    println!();
    println!("| init | `X true` median | overhead over `true` | Pss while supervising | VmHWM | voluntary wake-ups in 2 s idle |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut overheads = Vec::new();
    let mut footprint = Vec::new();
    for (i, init) in inits.iter().enumerate() {
        let took = median(startup[i].clone());
        let overhead = took.saturating_sub(base);
        let (pss, hwm, wakeups) = supervising(init, &env);
        println!(
            "| {} | {:.2} ms | {:.2} ms | {pss} kB | {hwm} kB | {wakeups} |",
            init.name,
            ms(took),
            ms(overhead)
        );
        overheads.push((init.name, overhead));
        footprint.push((init.name, pss, wakeups));
    }
    println!();
    let ours = overheads[0].1;
    if let Some((_, tini)) = overheads.iter().find(|(n, _)| *n == "tini") {
        let limit = *tini + Duration::from_micros(500);
        println!(
            "target overhead ≤ tini's + 0.5 ms ({:.2} ms): {:.2} ms {}",
            ms(limit),
            ms(ours),
            verdict(ours <= limit)
        );
    }
    let (_, pss, wakeups) = footprint[0];
    println!("target Pss ≤ 1.5 MB: {pss} kB {}", verdict(pss <= 1536));
    println!(
        "target 0 idle wake-ups: {wakeups} {}",
        verdict(wakeups == 0)
    );
    status_rate(&sandbox);
}

/// One 10 s job through the stand-in agent with the default status interval: how many times the
/// wrapper asked `/status.json`, and its wake-ups over the whole pod.
fn status_rate(sandbox: &Sandbox) {
    let job = Duration::from_secs(10);
    let started = Instant::now();
    let out = sandbox
        .agent_wrapper()
        .env("AGENT_WRAPPER_LOG", "error")
        .env("BUILDKITE_STANDIN_JOB_AFTER", "0")
        .env(
            "BUILDKITE_STANDIN_COMMAND",
            format!("sleep {}", job.as_secs()),
        )
        .run();
    let took = started.elapsed();
    let report: serde_json::Value =
        serde_json::from_str(out.stdout.lines().last().unwrap_or_default()).unwrap_or_default();
    let queries = report["status_queries"].as_u64().unwrap_or(0);
    println!();
    println!(
        "status queries during one {}s job: {queries} over {:.1}s ({}); expected: one per hook report (environment, pre-exit) plus one per 30s status interval while the job runs",
        job.as_secs(),
        took.as_secs_f64(),
        report["reason"].as_str().unwrap_or("?"),
    );
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

/// What agent-wrapper's preflight needs; the other inits ignore it.
fn environment(sandbox: &Sandbox) -> Vec<(&'static str, PathBuf)> {
    vec![
        ("PATH", "/usr/local/bin:/usr/bin:/bin".into()),
        ("BUILDKITE_AGENT_TOKEN", AGENT_TOKEN.into()),
        ("BUILDKITE_BUILD_PATH", sandbox.dir.path().join("builds")),
        (
            "AGENT_WRAPPER_STATE_DIR",
            sandbox.dir.path().join("records"),
        ),
        (
            "AGENT_WRAPPER_TERMINATION_LOG",
            sandbox.dir.path().join("termination-log"),
        ),
        ("BUILDKITE_GIT_MIRRORS_PATH", sandbox.mirrors.clone()),
        ("AGENT_WRAPPER_LOG", "error".into()),
        ("AGENT_WRAPPER_AGENT_VERSION_FILE", version_file(sandbox)),
    ]
}

/// A script agent's answer to `--version`, as a current agent's.
const VERSION_ANSWER: &str =
    "[ \"$1\" = --version ] && { echo 'buildkite-agent version 3.137.0, build 1'; exit 0; }";

/// The version a current agent prints, recorded as image/install.sh records it.
fn version_file(sandbox: &Sandbox) -> PathBuf {
    let path = sandbox.dir.path().join("agent-version");
    std::fs::write(&path, "buildkite-agent version 3.137.0, build 1\n").unwrap();
    path
}

/// `argv` with exactly `env`, its output discarded.
fn command(argv: &[String], env: &[(&str, PathBuf)]) -> Command {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

fn time(argv: &[String], env: &[(&str, PathBuf)]) -> Duration {
    let started = Instant::now();
    let status = command(argv, env).status().unwrap();
    let took = started.elapsed();
    assert!(status.success(), "{argv:?} failed: {status}");
    took
}

/// Pss and VmHWM (kB) of the init 1 s into supervising `sleep 3`, and its voluntary context
/// switches over the next 2 s.
fn supervising(init: &Init, env: &[(&str, PathBuf)]) -> (u64, u64, u64) {
    let mut argv = init.prefix.clone();
    // The wrapper passes `start --disconnect-after-job …` to its agent: a script ignores them.
    let sleeper = init.name.starts_with("agent-wrapper").then(|| {
        let script = std::env::temp_dir().join(format!("bench-sleeper-{}", std::process::id()));
        std::fs::write(
            &script,
            format!("#!/bin/sh\n{VERSION_ANSWER}\nexec sleep 3\n"),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        script
    });
    match &sleeper {
        Some(script) => argv.push(script.display().to_string()),
        None => argv.extend([which("sleep").display().to_string(), "3".into()]),
    }
    let mut child = command(&argv, env).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let pid = child.id();
    let field = |file: &str, name: &str| proc_field(pid, file, name);
    let pss = field("smaps_rollup", "Pss:");
    let hwm = field("status", "VmHWM:");
    let before = field("status", "voluntary_ctxt_switches:");
    std::thread::sleep(Duration::from_secs(2));
    let after = field("status", "voluntary_ctxt_switches:");
    let _ = child.wait();
    if let Some(script) = sleeper {
        let _ = std::fs::remove_file(script);
    }
    (pss, hwm, after.saturating_sub(before))
}

fn which(program: &str) -> PathBuf {
    ["/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(program))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{program} not found"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
