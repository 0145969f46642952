//! The stand-in agent's `start`: one agent lifetime, modelled on buildkite-agent **v3.137.0**
//! (and 4.0.0-beta.15, main 5c219808, where 4.x differs), read from its source; the rows of
//! `../shared/notes/agent-wrapper-gap.md` name the files and lines.
//!
//! What it models:
//! - **Configuration.** `start` needs `BUILDKITE_AGENT_TOKEN` (plain, `file://` or `fd://N`,
//!   read as `clicommand/register_token_unix.go` reads it) and a build path, else it exits 1.
//!   Its settings come from flags, the environment and the configuration file, and each job's
//!   environment is built from them ([`crate::standin_config`]). `--version` prints
//!   `buildkite-agent version V, build standin`, V from `BUILDKITE_STANDIN_VERSION` (default
//!   3.137.0); a 3.x refuses the 4.x cancel flags and a 4.x the 3.x ones (urfave/cli: "flag
//!   provided but not defined"), exit 1.
//! - **Registration, then signal handlers** (`clicommand/agent_start.go:1426-1488`): for
//!   `BUILDKITE_STANDIN_REGISTER_DELAY` seconds (default 0) the agent registers with Go's default
//!   signal behaviour: TERM, INT and HUP kill it, QUIT exits 2. Then it installs its handlers and,
//!   with `--health-check-addr`, starts the health server: `/` and `/status.json`
//!   (`agent/agent_pool.go` `statusJSONHandler`), the worker `busy` with its `current_job_id` from
//!   accepting a job until FinishJob returned, `idle` otherwise.
//! - **Waiting for work.** With an `http://` endpoint (the scenarios' fake Buildkite), the agent
//!   registers there with its `tags`, pings each `ping_interval` plus jitter (the first one
//!   too), and accepts and
//!   starts the job a ping hands it, whose `env` is the backend's job environment; FinishJob
//!   reports the job's exit status with `ignore_agent_in_dispatches`, then it disconnects
//!   ([`crate::standin_api`]). Otherwise (the default HTTPS endpoint, unreachable here) a job
//!   "arrives" `BUILDKITE_STANDIN_JOB_AFTER` seconds after registration (unset: never), its
//!   environment from `BUILDKITE_STANDIN_JOB_ENV`. `--disconnect-after-idle-timeout N`: exit 0 when no job came
//!   for N seconds after registration (0: never). A `pause` misbehaviour is a paused agent: no job,
//!   and no idle timeout (`agent/idle_monitor.go` counts a paused agent as busy), status idle.
//! - **Acquiring one job** (`--acquire-job ID` / `BUILDKITE_AGENT_ACQUIRE_JOB`, v3.137.0; needs
//!   the `http://` endpoint): `--spawn` must be 1 (else exit 1, before registering), and the agent
//!   registers with `ignore_in_dispatches` (`clicommand/agent_start.go`). Its worker acquires the
//!   job before any ping (`agent/agent_worker.go` `Start`, `AcquireAndRunJob`) with
//!   `core/client.go` `AcquireJob`'s retrier: 7 attempts within 330 s, each followed by a wait of
//!   2^attempt s plus a jitter in [-1 s, 5 s) (roko v1.4.0 `Exponential(2s, 0)`,
//!   `WithJitterRange`), or the answer's `Retry-After`; 423, 429, 5xx and no answer are tried
//!   again, 422 and other 4xx are not; a graceful stop ends the retries. Acquired, the job runs
//!   as a dispatched one does (StartJob, the hooks, FinishJob without
//!   `ignore_agent_in_dispatches`). 422: the worker's error reaches `main`, which exits **27**.
//!   Any other failure (still locked after the retries, 404, no answer) is only logged ("Failed
//!   to acquire and run job"); the ping loop then starts, and its first answer that is not
//!   `pause` ends an acquire-job worker (`agent/agent_worker_action.go`): the agent disconnects
//!   and exits **0**. Exit 28, which `agent_start.go` declares for a locked job, is not reached
//!   at v3.137.0. `BUILDKITE_STANDIN_ACQUIRE_SCALE` (the stand-in's, not the agent's; default 1)
//!   multiplies the retrier's waits and its 330 s so that scenarios run in seconds.
//! - **The job.** It runs the global hooks from the hooks path in the agent's order —
//!   environment, pre-checkout, checkout (the global hook; the default checkout is not modelled),
//!   post-checkout, pre-command, command (through `sh -c`: the job's `BUILDKITE_COMMAND` when it
//!   came through the API, else `BUILDKITE_STANDIN_COMMAND`),
//!   post-command, pre-exit — in `BUILDKITE_BUILD_CHECKOUT_PATH`, each in its own process group,
//!   with the job environment: the agent's own minus `BUILDKITE_AGENT_TOKEN`, overlaid by the
//!   job's (the backend's from `BUILDKITE_STANDIN_JOB_ENV`, and every checkout setting of the
//!   agent's), plus `BUILDKITE_JOB_ID`, `BUILDKITE_BUILD_CHECKOUT_PATH`,
//!   `BUILDKITE_HOOK_PHASE`/`_PATH`/`_SCOPE` and the Job API variables; what a hook exports with
//!   `env set` is seen by the later ones. A failing hook before the command fails the job;
//!   `BUILDKITE_COMMAND_EXIT_STATUS` reaches post-command and pre-exit. A `refuse-job`
//!   misbehaviour refuses the job before the bootstrap (signature, allowlist:
//!   `agent/run_job.go:137-217`): no hook runs, and the agent still counts it as its one job.
//! - **After the job** (`agent/run_job.go:406-469`): the log tail and FinishJob, taking
//!   `BUILDKITE_STANDIN_FINISH_DELAY` seconds (default 0) while the worker stays busy; then the
//!   result is recorded in `$BUILDKITE_STANDIN_STATE/finished/<job id>` (what Buildkite would
//!   have), the worker turns idle, and the agent disconnects and exits 0. TERM during that work
//!   changes nothing (its context cannot be cancelled).
//! - **Signals** (`agent_start.go:1540-1621`): the first TERM or INT is graceful (no new job; a
//!   running job finishes); the second, or QUIT, stops ungracefully: the job is cancelled (TERM
//!   to its process group, KILL after the signal grace: 3.x `signal-grace-period-seconds`,
//!   default cancel-grace-period − 1; 4.x `cancel-signal-timeout`), and the agent exits 1 by
//!   itself after 3.x `cancel-grace-period` + 1 s (4.x: signal timeout + cleanup timeout + 1 s)
//!   if it has not exited, with any unsent result lost. The third TERM exits 1 at once. HUP is
//!   ignored. A job killed by the cancel's SIGKILL runs no `pre-exit` (the agent kills the
//!   bootstrap's group, so its tear-down never runs).
//! - **Misbehaviour for tests**, `BUILDKITE_STANDIN_MISBEHAVE` (comma-separated):
//!   `hang-after-job` (idle after its job, never exits), `ignore-term` (TERM and INT do nothing),
//!   `crash=N` (exits N right after start), `pause`, `refuse-job`, `no-health` (the health server
//!   accepts connections and closes them unanswered).
//!
//! Not modelled: plugins and their pre-exit hooks (3.x runs them after the global one), the
//! agent's log output, artifact upload, ping intervals, `--reflect-exit-status`, a paused
//! acquire-job agent (it acquires and runs its job, then stays until resumed).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, SigSet, Signal};
use nix::unistd::Pid;

use crate::standin_api::{version, AcquireAnswer, AgentApi};
use crate::standin_config::{AgentConfig, ONLY_IN_3, ONLY_IN_4};

/// `core/client.go` `AcquireJob` (v3.137.0): attempts, and the timeout around all of them.
const ACQUIRE_ATTEMPTS: u32 = 7;
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(330);

/// `clicommand/agent_start.go`: the acquire was rejected (422).
const ACQUISITION_REJECTED: u8 = 27;

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

fn major() -> u32 {
    version()
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(3)
}

/// The worker's state, as `/status.json` shows it.
#[derive(Default)]
struct Worker {
    job: Option<String>,
}

type Shared = Arc<Mutex<Worker>>;

struct Agent {
    signals: Receiver<Signal>,
    worker: Shared,
    terms: u32,
    ignore_term: bool,
    signal_grace: Duration,
    /// From an ungraceful stop to the forced exit.
    forced_exit_after: Duration,
    /// A cancel was asked for (second TERM, or QUIT).
    cancelled: bool,
    /// The cancel had to SIGKILL a step.
    killed: bool,
}

/// How acquiring the job ended.
enum Acquisition {
    Acquired(BTreeMap<String, String>),
    /// 422.
    Rejected(String),
    /// Still locked or failing after the retries, or a 4xx but 422.
    Failed(String),
    /// A graceful stop (or a cancel) ended the retries.
    Stopped,
    /// The third TERM: exit 1 at once.
    Exit,
}

pub fn start(state: &Path, args: &[&str]) -> ExitCode {
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
    let unknown = if major() >= 4 { ONLY_IN_3 } else { ONLY_IN_4 };
    if let Some(flag) = args.iter().find(|a| {
        unknown
            .iter()
            .any(|u| a.trim_start_matches('-').split('=').next() == Some(u))
    }) {
        return fail(&format!("flag provided but not defined: {flag}"));
    }
    let token = match read_token() {
        Ok(token) => token,
        Err(e) => return fail(&e),
    };
    let config = match AgentConfig::load(args) {
        Ok(config) => config,
        Err(e) => return fail(&e),
    };
    let mut api = AgentApi::for_endpoint(config.get("endpoint"), &token);
    if config.get("build-path").is_empty() {
        return fail("Missing build-path, set BUILDKITE_BUILD_PATH");
    }
    let acquire = config.get("acquire-job").to_string();
    if !acquire.is_empty() && config.get("spawn") != "1" {
        return fail("you can't spawn multiple agents and acquire a job at the same time");
    }
    if !acquire.is_empty() && api.is_none() {
        return fail("the stand-in acquires a job only from an http:// endpoint");
    }
    let seconds = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .map(Duration::from_secs_f64)
    };
    let idle = config
        .get("disconnect-after-idle-timeout")
        .parse::<u64>()
        .ok()
        .filter(|s| *s > 0 && !has("pause"))
        .map(Duration::from_secs);
    let job_after =
        seconds("BUILDKITE_STANDIN_JOB_AFTER").filter(|_| !has("pause") && api.is_none());
    let (signal_grace, forced_exit_after) = config.cancel_timing(major());

    // Registering: Go's default signal behaviour until the handlers are installed.
    let registered = Arc::new(AtomicBool::new(false));
    let signals = signal_thread(registered.clone());
    if let Some(delay) = seconds("BUILDKITE_STANDIN_REGISTER_DELAY") {
        println!("buildkite-agent (stand-in): registering");
        std::thread::sleep(delay);
    }
    if let Some(api) = &mut api {
        let tags: Vec<String> = config
            .get("tags")
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(String::from)
            .collect();
        let name = std::env::var("HOSTNAME").unwrap_or_else(|_| "standin".into());
        if let Err(e) = api.register(&name, &tags, !acquire.is_empty()) {
            return fail(&e);
        }
    }
    block(&[Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP]);
    registered.store(true, Ordering::SeqCst);
    let worker = Shared::default();
    let addr = config.get("health-check-addr");
    if !addr.is_empty() {
        if let Err(e) = health_server(addr, worker.clone(), has("no-health")) {
            return fail(&format!("cannot start the health server on {addr}: {e}"));
        }
    }
    let mut agent = Agent {
        signals,
        worker,
        terms: 0,
        ignore_term: has("ignore-term"),
        signal_grace,
        forced_exit_after,
        cancelled: false,
        killed: false,
    };
    match has("pause") {
        true => println!("buildkite-agent (stand-in): started; paused"),
        false => println!("buildkite-agent (stand-in): started, waiting for a job"),
    }
    let job = match &api {
        Some(api) if !acquire.is_empty() => agent.acquired_job(api, &acquire),
        _ => agent.dispatched_job(api.as_ref(), job_after, idle),
    };
    let (job_id, job_env) = match job {
        Ok(job) => job,
        Err(code) => return code,
    };
    let stopping_before = agent.terms > 0;
    // A refused job fails without running (`agent/run_job.go` finishes it with -1).
    let exit_status = if has("refuse-job") {
        println!("buildkite-agent (stand-in): job {job_id} refused: signature verification failed");
        -1
    } else {
        // The job's command: Buildkite's (`BUILDKITE_COMMAND`) when it came through the API,
        // else the test's.
        let command = match &api {
            Some(_) => job_env.get("BUILDKITE_COMMAND").cloned(),
            None => std::env::var("BUILDKITE_STANDIN_COMMAND").ok(),
        };
        let command = command.unwrap_or_else(|| "true".into());
        match agent.run_job(state, &job_id, &config, job_env, &command) {
            Ok(status) => status,
            Err(code) => return code,
        }
    };
    let acquired = !acquire.is_empty();
    if let Err(code) = agent.report(state, &job_id, api.as_ref(), exit_status, acquired) {
        return code;
    }
    agent.worker.lock().unwrap().job = None;
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
    if let Some(api) = &api {
        api.disconnect();
    }
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
            let event = match signal {
                Signal::SIGTERM | Signal::SIGINT if self.ignore_term => {
                    println!("buildkite-agent (stand-in): ignoring {signal} (misbehaving)");
                    continue;
                }
                Signal::SIGTERM | Signal::SIGINT => {
                    self.terms += 1;
                    match self.terms {
                        1 => Event::Stop,
                        2 => Event::Cancel,
                        _ => Event::Exit,
                    }
                }
                Signal::SIGQUIT => Event::Cancel,
                _ => continue, // HUP: ignored
            };
            if matches!(event, Event::Cancel) {
                self.arm_forced_exit();
            }
            return Some(event);
        }
    }

    /// `ungracefulStop`: every one arms a timer that exits 1 if the agent is still running.
    fn arm_forced_exit(&self) {
        let after = self.forced_exit_after;
        std::thread::spawn(move || {
            std::thread::sleep(after);
            println!("buildkite-agent (stand-in): Timed out waiting for agents to exit; exiting immediately with status 1");
            std::process::exit(1);
        });
    }

    /// The job Buildkite dispatches: through the API's pings (accepted and started), else after
    /// `BUILDKITE_STANDIN_JOB_AFTER`; the idle timeout or a stop may come first. Err: the agent
    /// exits with that code.
    fn dispatched_job(
        &mut self,
        api: Option<&AgentApi>,
        job_after: Option<Duration>,
        idle: Option<Duration>,
    ) -> Result<(String, BTreeMap<String, String>), ExitCode> {
        let started = Instant::now();
        // The ping loop (`agent/agent_worker_ping.go` at main 5c219808): the first ping skips the
        // ticker but not the jitter of up to an interval; then one each interval plus that jitter.
        let mut ping_due = api.map(|api| started + jitter(api.ping_interval));
        let leave = |code| {
            if let Some(api) = api {
                api.disconnect();
            }
            Err(code)
        };
        let job_id = loop {
            let job_due = job_after.map(|d| started + d);
            let idle_due = idle.map(|d| started + d);
            let due = [job_due, idle_due, ping_due].into_iter().flatten().min();
            match self.next_signal(due) {
                Some(Event::Stop) | Some(Event::Cancel) => {
                    println!("buildkite-agent (stand-in): stopping; there is no job");
                    return leave(ExitCode::SUCCESS);
                }
                Some(Event::Exit) => return Err(ExitCode::FAILURE),
                None if job_due.is_some_and(|d| Instant::now() >= d) => {
                    break format!("standin-job-{}", std::process::id());
                }
                None if idle_due.is_some_and(|d| Instant::now() >= d) => {
                    println!("buildkite-agent (stand-in): idle timeout reached, disconnecting");
                    return leave(ExitCode::SUCCESS);
                }
                None if ping_due.is_some_and(|d| Instant::now() >= d) => {
                    let api = api.unwrap();
                    if let Some(job) = api.ping() {
                        break job;
                    }
                    ping_due = Some(Instant::now() + api.ping_interval + jitter(api.ping_interval));
                }
                None => {}
            }
        };
        self.worker.lock().unwrap().job = Some(job_id.clone());
        let Some(api) = api else {
            return Ok((job_id, backend_job_env()?));
        };
        println!("buildkite-agent (stand-in): Assigned job {job_id}. Accepting...");
        let env = api
            .accept(&job_id)
            .and_then(|env| api.start(&job_id).map(|_| env))
            .map_err(|e| fail(&e))?;
        Ok((job_id, env))
    }

    /// `--acquire-job` (`agent/agent_worker.go` `Start`, v3.137.0): the job is acquired before
    /// the ping loop. Acquired, it is started and runs as a dispatched one. Rejected (422): the
    /// worker fails, and `main` exits 27. Otherwise the failure is only logged, and the first
    /// ping's answer ends an acquire-job worker: exit 0.
    fn acquired_job(
        &mut self,
        api: &AgentApi,
        job: &str,
    ) -> Result<(String, BTreeMap<String, String>), ExitCode> {
        let leave = |code| {
            api.disconnect();
            Err(code)
        };
        println!("buildkite-agent (stand-in): Attempting to acquire job {job}...");
        match self.acquire(api, job) {
            Acquisition::Acquired(env) => {
                self.worker.lock().unwrap().job = Some(job.to_string());
                api.start(job).map_err(|e| fail(&e))?;
                Ok((job.to_string(), env))
            }
            Acquisition::Rejected(e) => {
                eprintln!("buildkite-agent (stand-in): failed to acquire job {job:?}: job acquisition rejected: {e}");
                leave(ExitCode::from(ACQUISITION_REJECTED))
            }
            Acquisition::Failed(e) => {
                println!("buildkite-agent (stand-in): Failed to acquire and run job: {e}");
                match self.next_signal(Some(Instant::now() + jitter(api.ping_interval))) {
                    Some(Event::Exit) => return Err(ExitCode::FAILURE),
                    Some(_) => {}
                    None => drop(api.ping()),
                }
                leave(ExitCode::SUCCESS)
            }
            Acquisition::Stopped => leave(ExitCode::SUCCESS),
            Acquisition::Exit => Err(ExitCode::FAILURE),
        }
    }

    /// `core/client.go` `AcquireJob`'s retrier (v3.137.0, roko v1.4.0): up to
    /// [`ACQUIRE_ATTEMPTS`] within [`ACQUIRE_TIMEOUT`], the waits scaled by
    /// `BUILDKITE_STANDIN_ACQUIRE_SCALE`; a signal ends it (the agent cancels the acquire's
    /// context on stop).
    fn acquire(&mut self, api: &AgentApi, job: &str) -> Acquisition {
        let scale = std::env::var("BUILDKITE_STANDIN_ACQUIRE_SCALE")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(1.0);
        let deadline = Instant::now() + ACQUIRE_TIMEOUT.mul_f64(scale);
        let mut last = String::new();
        for attempt in 0..ACQUIRE_ATTEMPTS {
            // roko picks the wait before each try: 2^attempt s and a jitter in [-1 s, 5 s).
            let backoff = Duration::from_secs(1 << attempt) + jitter(Duration::from_secs(6))
                - Duration::from_secs(1);
            let wait = match api.acquire(job, attempt) {
                AcquireAnswer::Acquired(env) => return Acquisition::Acquired(env),
                AcquireAnswer::Rejected(e) => return Acquisition::Rejected(e),
                AcquireAnswer::Refused(e) => return Acquisition::Failed(e),
                AcquireAnswer::Retry {
                    locked,
                    retry_after,
                    error,
                } => {
                    last = match locked {
                        true => format!("job is locked: {error}"),
                        false => error,
                    };
                    retry_after.unwrap_or(backoff)
                }
            };
            if attempt + 1 == ACQUIRE_ATTEMPTS {
                break;
            }
            println!(
                "buildkite-agent (stand-in): {last} (Attempt {}/{ACQUIRE_ATTEMPTS} Retrying in {wait:?})",
                attempt + 1
            );
            let wake = Instant::now() + wait.mul_f64(scale);
            match self.next_signal(Some(wake.min(deadline))) {
                Some(Event::Exit) => return Acquisition::Exit,
                Some(_) => return Acquisition::Stopped,
                None if wake > deadline => {
                    return Acquisition::Failed(format!("{last}: context deadline exceeded"))
                }
                None => {}
            }
        }
        Acquisition::Failed(last)
    }

    /// Runs the job's hooks and command; the job's exit status, as FinishJob reports it.
    fn run_job(
        &mut self,
        state: &Path,
        job_id: &str,
        config: &AgentConfig,
        job_env: BTreeMap<String, String>,
        command: &str,
    ) -> Result<i32, ExitCode> {
        let checkout = Path::new(config.get("build-path")).join("standin/pipeline");
        let hooks = Some(config.get("hooks-path"))
            .filter(|h| !h.is_empty())
            .map(Path::new);
        std::fs::create_dir_all(&checkout).map_err(|_| fail("cannot create the checkout"))?;
        // The bootstrap's environment: the agent's own, overlaid by the job's.
        let mut env: BTreeMap<String, String> = std::env::vars().collect();
        env.remove("BUILDKITE_AGENT_TOKEN");
        env.extend(config.job_environment(job_env));
        env.insert("BUILDKITE_JOB_ID".into(), job_id.to_string());
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
            if self.killed || ((failed || self.cancelled) && phase != "pre-exit") {
                continue;
            }
            let hook = hooks.map(|h| h.join(phase)).filter(|h| h.is_file());
            let mut step = match (phase, &hook) {
                ("command", _) => {
                    let mut c = Command::new("sh");
                    c.args(["-c", command]);
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
        if self.killed {
            println!(
                "buildkite-agent (stand-in): the job was killed; its pre-exit hook did not run"
            );
        }
        Ok(match (failed, command_status) {
            (false, Some(status)) => status,
            _ => 1,
        })
    }

    /// The log tail and FinishJob (through `api` when there is one; recorded in the state
    /// directory either way); the worker stays busy meanwhile. A graceful TERM changes nothing;
    /// an ungraceful stop's forced exit can end the agent first, and the result is then lost.
    fn report(
        &mut self,
        state: &Path,
        job_id: &str,
        api: Option<&AgentApi>,
        exit_status: i32,
        acquired: bool,
    ) -> Result<(), ExitCode> {
        let delay = std::env::var("BUILDKITE_STANDIN_FINISH_DELAY")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .map_or(Duration::ZERO, Duration::from_secs_f64);
        if !delay.is_zero() {
            println!(
                "buildkite-agent (stand-in): uploading the log and finishing the job ({}s)",
                delay.as_secs_f64()
            );
        }
        let done = Instant::now() + delay;
        while Instant::now() < done {
            if let Some(Event::Exit) = self.next_signal(Some(done)) {
                return Err(ExitCode::FAILURE);
            }
        }
        if let Some(api) = api {
            api.finish(job_id, exit_status, acquired)
                .map_err(|e| fail(&e))?;
        }
        let finished = state.join("finished");
        std::fs::create_dir_all(&finished).map_err(|_| fail("cannot record the result"))?;
        std::fs::write(finished.join(job_id), "finished\n")
            .map_err(|_| fail("cannot record the result"))?;
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
                self.killed = true;
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

/// Blocks `signals` in the calling (main) thread.
fn block(signals: &[Signal]) {
    let mut mask = SigSet::empty();
    for s in signals {
        mask.add(*s);
    }
    mask.thread_block().expect("block signals");
}

/// TERM, INT, QUIT and HUP, delivered to a channel by a thread that waits for them. Until
/// `registered`, only QUIT is blocked in the main thread, so TERM, INT and HUP keep their default
/// action (death), and a QUIT exits 2 as Go's runtime does; [`block`] then hands the rest to this
/// thread too. Children get a clean mask (std resets it).
fn signal_thread(registered: Arc<AtomicBool>) -> Receiver<Signal> {
    let all = [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGHUP,
    ];
    block(&[Signal::SIGQUIT]);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut mask = SigSet::empty();
        for s in all {
            mask.add(s);
        }
        mask.thread_block().expect("block signals");
        while let Ok(signal) = mask.wait() {
            if signal == Signal::SIGQUIT && !registered.load(Ordering::SeqCst) {
                eprintln!("SIGQUIT: quit");
                std::process::exit(2);
            }
            if tx.send(signal).is_err() {
                return;
            }
        }
    });
    rx
}

/// The health server: `/` and `/status.json`, one request per connection (HTTP/1.0). `broken`:
/// it accepts and closes without an answer.
fn health_server(addr: &str, worker: Shared, broken: bool) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            if broken {
                continue;
            }
            let mut stream = stream;
            let mut request = [0u8; 1024];
            let n = stream.read(&mut request).unwrap_or(0);
            let request = String::from_utf8_lossy(&request[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let body = match path {
                "/status.json" => {
                    let job = worker.lock().unwrap().job.clone();
                    let status = if job.is_some() { "busy" } else { "idle" };
                    let mut w = serde_json::json!({"status": status, "id": "standin-agent", "spawn_index": 1});
                    if let Some(job) = job {
                        w["current_job_id"] = job.into();
                    }
                    format!(
                        "{}\n",
                        serde_json::json!({"health": "ok", "aggregate_status": status, "workers": [w]})
                    )
                }
                "/" => "OK: Buildkite agent is running".to_string(),
                _ => {
                    let _ = stream.write_all(b"HTTP/1.0 404 Not Found\r\n\r\n404 page not found\n");
                    continue;
                }
            };
            let _ = write!(
                stream,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(())
}

/// The registration token, as `clicommand/register_token_unix.go` reads it: plain, `file://PATH`
/// or `fd://N` (an inherited descriptor).
fn read_token() -> Result<String, String> {
    let token = std::env::var("BUILDKITE_AGENT_TOKEN").unwrap_or_default();
    let read = |path: String, what: &str| match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        _ => Err(format!("could not read the token from {what}")),
    };
    if let Some(fd) = token.strip_prefix("fd://") {
        return read(format!("/proc/self/fd/{fd}"), &token);
    }
    if let Some(path) = token.strip_prefix("file://") {
        return read(path.to_string(), &token);
    }
    match token.is_empty() {
        true => Err("Missing token, set BUILDKITE_AGENT_TOKEN".into()),
        false => Ok(token),
    }
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

/// Up to `interval`, from the clock's nanoseconds (the stand-in needs no better randomness).
fn jitter(interval: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    interval.mul_f64(f64::from(nanos) / 1e9)
}

fn fail(message: &str) -> ExitCode {
    eprintln!("buildkite-agent (stand-in): fatal: {message}");
    ExitCode::FAILURE
}
