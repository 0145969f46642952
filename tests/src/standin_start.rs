//! The stand-in agent's `start`: one agent lifetime, modelled on the documented contract
//! (`../shared/notes/buildkite-agent-contract.md`).
//!
//! What it models:
//! - `start` needs `BUILDKITE_AGENT_TOKEN` and a build path, else it exits 1. Its settings come
//!   from flags, the environment and the configuration file, and each job's environment is
//!   built from them, as buildkite-agent v3.137.0 does ([`crate::standin_config`] names the
//!   files it follows). `--disconnect-after-job`: exit 0 after one job,
//!   whether it passed or failed. `--disconnect-after-idle-timeout N`: exit 0 when no job arrived
//!   for N seconds (0: never).
//! - A job "arrives" `BUILDKITE_STANDIN_JOB_AFTER` seconds after start (unset: never). It runs the
//!   global hooks from `--hooks-path`/`BUILDKITE_HOOKS_PATH` in the agent's order — environment,
//!   pre-checkout, checkout (the global hook; the default checkout is not modelled), post-checkout,
//!   pre-command, command (`BUILDKITE_STANDIN_COMMAND` through `sh -c`), post-command, pre-exit —
//!   in `BUILDKITE_BUILD_CHECKOUT_PATH`, each in its own process group, with the job environment:
//!   the agent's own minus `BUILDKITE_AGENT_TOKEN`, overlaid by the job's (the backend's from
//!   `BUILDKITE_STANDIN_JOB_ENV`, and every checkout setting of the agent's), plus
//!   `BUILDKITE_JOB_ID`, `BUILDKITE_BUILD_CHECKOUT_PATH`, `BUILDKITE_HOOK_PHASE`/`_PATH`/`_SCOPE`
//!   and the Job API variables; what a hook exports with `env set` is seen by the later ones. A
//!   failing hook before the command fails the job; pre-exit always runs;
//!   `BUILDKITE_COMMAND_EXIT_STATUS` reaches post-command and pre-exit.
//! - Signals: the first TERM or INT is graceful (no new job; a running job finishes); the second
//!   cancels the job (TERM to its process group, KILL after `BUILDKITE_STANDIN_SIGNAL_GRACE`
//!   seconds, default 9); the third exits 1 at once. QUIT cancels the job at once. HUP is ignored.
//! - Misbehaviour for tests, `BUILDKITE_STANDIN_MISBEHAVE` (comma-separated): `hang-after-job`
//!   (never exits after its job), `ignore-term` (TERM and INT do nothing), `crash=N` (exits N right
//!   after start).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, SigSet, Signal};

use crate::standin_config::AgentConfig;
use nix::unistd::Pid;

const PHASES: [&str; 8] = [
    "environment",
    "pre-checkout",
    "checkout",
    "post-checkout",
    "pre-command",
    "command",
    "post-command",
    "pre-exit",
];

struct Agent {
    signals: Receiver<Signal>,
    terms: u32,
    ignore_term: bool,
    signal_grace: Duration,
    /// A cancel was asked for (second TERM, or QUIT).
    cancelled: bool,
}

pub fn start(state: &Path, args: &[&str]) -> ExitCode {
    let flag = |name: &str| {
        args.iter()
            .position(|a| *a == name)
            .and_then(|i| args.get(i + 1))
    };
    let misbehave = std::env::var("BUILDKITE_STANDIN_MISBEHAVE").unwrap_or_default();
    let has = |what: &str| misbehave.split(',').any(|m| m == what);
    let number = |name: &str| {
        misbehave
            .split(',')
            .find_map(|m| m.strip_prefix(name)?.parse::<u64>().ok())
    };
    if let Some(code) = number("crash=") {
        eprintln!("buildkite-agent (stand-in): crashing as asked");
        return ExitCode::from(code as u8);
    }
    if std::env::var("BUILDKITE_AGENT_TOKEN")
        .unwrap_or_default()
        .is_empty()
    {
        return fail("Missing token, set BUILDKITE_AGENT_TOKEN");
    }
    let config = match AgentConfig::load(args) {
        Ok(config) => config,
        Err(e) => return fail(&e),
    };
    let build_path = config.get("build-path");
    if build_path.is_empty() {
        return fail("Missing build-path, set BUILDKITE_BUILD_PATH");
    }
    let build_path = PathBuf::from(build_path);
    let hooks = Some(config.get("hooks-path"))
        .filter(|h| !h.is_empty())
        .map(PathBuf::from);
    let idle = flag("--disconnect-after-idle-timeout")
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs);
    let job_after = std::env::var("BUILDKITE_STANDIN_JOB_AFTER")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map(Duration::from_secs_f64);
    let mut agent = Agent {
        signals: signal_thread(),
        terms: 0,
        ignore_term: has("ignore-term"),
        signal_grace: Duration::from_secs(
            std::env::var("BUILDKITE_STANDIN_SIGNAL_GRACE")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(9),
        ),
        cancelled: false,
    };
    println!("buildkite-agent (stand-in): started, waiting for a job");
    let started = Instant::now();
    // Waiting for work.
    loop {
        let job_due = job_after.map(|d| started + d);
        let idle_due = idle.map(|d| started + d);
        let due = [job_due, idle_due].into_iter().flatten().min();
        match agent.next_signal(due) {
            Some(Event::Stop) | Some(Event::Cancel) => {
                println!("buildkite-agent (stand-in): stopping; there is no job");
                return ExitCode::SUCCESS;
            }
            Some(Event::Exit) => return ExitCode::FAILURE,
            None if job_due.is_some_and(|d| Instant::now() >= d) => break,
            None if idle_due.is_some_and(|d| Instant::now() >= d) => {
                println!("buildkite-agent (stand-in): idle timeout reached, disconnecting");
                return ExitCode::SUCCESS;
            }
            None => {}
        }
    }
    let stopping_before = agent.terms > 0;
    let outcome = agent.run_job(state, &config, &build_path, hooks.as_deref());
    if let Err(code) = outcome {
        return code;
    }
    if has("hang-after-job") {
        println!("buildkite-agent (stand-in): job done; hanging instead of disconnecting");
        loop {
            match agent.next_signal(None) {
                Some(Event::Exit) => return ExitCode::FAILURE,
                Some(_) if !agent.ignore_term && !stopping_before => return ExitCode::SUCCESS,
                _ => {}
            }
        }
    }
    println!("buildkite-agent (stand-in): job done, disconnecting (--disconnect-after-job)");
    ExitCode::SUCCESS
}

/// What a signal means to the agent now.
enum Event {
    /// First TERM/INT: graceful.
    Stop,
    /// Second TERM/INT or QUIT: cancel the job.
    Cancel,
    /// Third TERM/INT: give up.
    Exit,
}

impl Agent {
    /// Waits for a signal until `until` (forever if `None`); `None` when the time came first.
    fn next_signal(&mut self, until: Option<Instant>) -> Option<Event> {
        loop {
            let signal = match until {
                None => self.signals.recv().ok()?,
                Some(at) => {
                    let left = at.saturating_duration_since(Instant::now());
                    match self.signals.recv_timeout(left) {
                        Ok(s) => s,
                        Err(RecvTimeoutError::Timeout) => return None,
                        Err(RecvTimeoutError::Disconnected) => return None,
                    }
                }
            };
            match signal {
                Signal::SIGTERM | Signal::SIGINT if self.ignore_term => {
                    println!("buildkite-agent (stand-in): ignoring {signal} (misbehaving)");
                }
                Signal::SIGTERM | Signal::SIGINT => {
                    self.terms += 1;
                    return Some(match self.terms {
                        1 => Event::Stop,
                        2 => Event::Cancel,
                        _ => Event::Exit,
                    });
                }
                Signal::SIGQUIT => return Some(Event::Cancel),
                _ => {} // HUP and the rest: ignored
            }
        }
    }

    fn run_job(
        &mut self,
        state: &Path,
        config: &AgentConfig,
        build_path: &Path,
        hooks: Option<&Path>,
    ) -> Result<(), ExitCode> {
        let job_id = format!("standin-job-{}", std::process::id());
        let checkout = build_path.join("standin/pipeline");
        std::fs::create_dir_all(&checkout).map_err(|_| fail("cannot create the checkout"))?;
        // The bootstrap's environment: the agent's own, overlaid by the job's.
        let mut env: BTreeMap<String, String> = std::env::vars().collect();
        env.remove("BUILDKITE_AGENT_TOKEN");
        env.extend(config.job_environment(backend_job_env()?));
        env.insert("BUILDKITE_JOB_ID".into(), job_id.clone());
        env.insert(
            "BUILDKITE_BUILD_CHECKOUT_PATH".into(),
            checkout.display().to_string(),
        );
        env.insert(
            "BUILDKITE_AGENT_JOB_API_SOCKET".into(),
            state.join("job-api.sock").display().to_string(),
        );
        env.insert(
            "BUILDKITE_AGENT_JOB_API_TOKEN".into(),
            "standin-job-api".into(),
        );
        env.insert(
            "BUILDKITE_STANDIN_STATE".into(),
            state.display().to_string(),
        );
        println!("buildkite-agent (stand-in): running job {job_id}");
        let mut failed = false;
        let mut command_status: Option<i32> = None;
        for phase in PHASES {
            if (failed || self.cancelled) && phase != "pre-exit" {
                continue;
            }
            let hook = hooks.map(|h| h.join(phase)).filter(|h| h.is_file());
            let mut step = match (phase, &hook) {
                ("command", _) => {
                    let script =
                        std::env::var("BUILDKITE_STANDIN_COMMAND").unwrap_or("true".into());
                    let mut c = Command::new("sh");
                    c.args(["-c", &script]);
                    c
                }
                (_, Some(hook)) => {
                    println!("~~~ Running global {phase} hook");
                    let mut c = Command::new(hook);
                    c.env("BUILDKITE_HOOK_PHASE", phase)
                        .env("BUILDKITE_HOOK_PATH", hook)
                        .env("BUILDKITE_HOOK_SCOPE", "global");
                    c
                }
                ("checkout", None) => {
                    println!("buildkite-agent (stand-in): no checkout hook; the default checkout is not modelled");
                    continue;
                }
                _ => continue,
            };
            if let Some(status) = command_status {
                env.insert("BUILDKITE_COMMAND_EXIT_STATUS".into(), status.to_string());
            }
            step.env_clear().envs(&env).current_dir(&checkout);
            std::os::unix::process::CommandExt::process_group(&mut step, 0);
            let status = self.run_step(step)?;
            if phase == "command" {
                command_status = Some(status);
            } else if status != 0 && phase != "pre-exit" {
                println!("🚨 the {phase} hook failed with {status}; the job fails");
                failed = true;
            }
            // What hooks exported through the Job API is part of the job's environment now.
            for entry in std::fs::read_dir(state.join("env"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let value = std::fs::read_to_string(entry.path()).unwrap_or_default();
                env.insert(entry.file_name().to_string_lossy().into_owned(), value);
            }
        }
        Ok(())
    }

    /// Runs one step to its end, acting on signals meanwhile. Err: the agent must exit now.
    fn run_step(&mut self, mut command: Command) -> Result<i32, ExitCode> {
        let mut child = command
            .spawn()
            .map_err(|e| fail(&format!("cannot run a job step: {e}")))?;
        let group = Pid::from_raw(child.id() as i32);
        let mut kill_at: Option<Instant> = None;
        loop {
            if let Some(status) = child.try_wait().ok().flatten() {
                return Ok(exit_status(status));
            }
            let tick = Instant::now() + Duration::from_millis(20);
            match self.next_signal(Some(tick)) {
                Some(Event::Stop) => {
                    println!("buildkite-agent (stand-in): stopping after the running job");
                }
                Some(Event::Cancel) if !self.cancelled => {
                    println!("buildkite-agent (stand-in): cancelling the job");
                    self.cancelled = true;
                    let _ = killpg(group, Signal::SIGTERM);
                    kill_at = Some(Instant::now() + self.signal_grace);
                }
                Some(Event::Exit) => {
                    kill_now(&mut child, group);
                    return Err(ExitCode::FAILURE);
                }
                _ => {}
            }
            if kill_at.is_some_and(|at| Instant::now() >= at) {
                kill_now(&mut child, group);
            }
        }
    }
}

fn kill_now(child: &mut Child, group: Pid) {
    let _ = killpg(group, Signal::SIGKILL);
    let _ = child.wait();
}

fn exit_status(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// TERM, INT, QUIT and HUP, delivered to a channel by a thread that waits for them: the main
/// thread blocks them first, so every thread inherits the mask and none is interrupted.
fn signal_thread() -> Receiver<Signal> {
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGHUP,
    ] {
        mask.add(s);
    }
    mask.thread_block().expect("block signals");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        while let Ok(signal) = mask.wait() {
            if tx.send(signal).is_err() {
                return;
            }
        }
    });
    rx
}

/// The environment Buildkite sends with the job (repository, commit, pipeline `env:`): the JSON
/// object in the file `BUILDKITE_STANDIN_JOB_ENV` names, or nothing.
fn backend_job_env() -> Result<BTreeMap<String, String>, ExitCode> {
    let Some(path) = std::env::var_os("BUILDKITE_STANDIN_JOB_ENV") else {
        return Ok(BTreeMap::new());
    };
    let text =
        std::fs::read_to_string(&path).map_err(|e| fail(&format!("reading the job env: {e}")))?;
    serde_json::from_str(&text)
        .map_err(|e| fail(&format!("the job env is not a JSON object of strings: {e}")))
}

fn fail(message: &str) -> ExitCode {
    eprintln!("buildkite-agent (stand-in): fatal: {message}");
    ExitCode::FAILURE
}
