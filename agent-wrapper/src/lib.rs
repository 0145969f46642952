//! agent-wrapper: the container's PID 1 for one Buildkite job. This library is all of it but the
//! thin `main`; docs/agent-wrapper.md describes the behaviour and the exit codes.

pub mod agent_process;
pub mod agent_status;
pub mod agent_version;
pub mod exit_report;
pub mod preflight;
pub mod settings;
pub mod supervisor;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::Command;

use stateless_core::checkout_record::RECORD_PATH_ENV;
use stateless_core::job_record::{JOB_EVENTS_PATH_ENV, JOB_RECORD_PATH_ENV};

use crate::agent_process::SpawnError;
use crate::agent_status::StatusServer;
use crate::agent_version::Version;
use crate::exit_report::Ending;
use crate::preflight::PreflightError;
use crate::settings::Settings;
use crate::supervisor::{SuperviseError, Supervision, Timings};
use nix::sys::signalfd::SignalFd;

/// The wrapper's own log lines go to stderr: JSON when stdout is not a terminal (a pod's log),
/// text when it is. The agent's output passes through untouched.
/// `AGENT_WRAPPER_LOG` is a level (`debug`, `warn`, …): a level, not a filter expression,
/// because the filter's regex engine would double the wrapper's resident memory.
pub fn init_logging() {
    let level = std::env::var("AGENT_WRAPPER_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing_subscriber::filter::LevelFilter>().ok())
        .unwrap_or(tracing_subscriber::filter::LevelFilter::INFO);
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false);
    if std::io::stdout().is_terminal() {
        builder.without_time().init();
    } else {
        builder.json().flatten_event(true).init();
    }
}

/// Where the records of this pod's job go.
pub struct Records {
    pub checkout: PathBuf,
    pub job: PathBuf,
    pub job_events: PathBuf,
}

impl Records {
    pub fn in_dir(settings: &Settings) -> Records {
        let dir = settings
            .state_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("stateless-agent"));
        Records {
            checkout: dir.join("checkout-record.json"),
            job: supervisor::job_record_path(&dir),
            job_events: supervisor::job_events_path(&dir),
        }
    }
}

/// Preflight, start the agent, supervise it to the end. `signals` must have been taken first
/// thing in `main` ([`supervisor::take_signals`]).
pub fn run(
    settings: &Settings,
    records: &Records,
    signals: Result<SignalFd, SuperviseError>,
) -> Ending {
    let signals = match signals {
        Ok(signals) => signals,
        Err(e) => return Ending::Internal(e.to_string()),
    };
    if !is_pid1() {
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::warn!(
                "cannot become a subreaper ({e}); orphans of the agent will not be reaped here"
            );
        }
    }
    // An `fd://N` token is the agent's to read: keep that descriptor open for it.
    agent_process::close_inherited_fds(preflight::token_fd());
    let preflight = || -> Result<(PathBuf, Version), PreflightError> {
        preflight::check_token()?;
        let agent = preflight::resolve_agent(&settings.agent)?;
        let version = preflight::check_version(&agent, &settings.agent_version_file)?;
        preflight::check_build_path(settings.build_path.as_deref())?;
        Ok((agent, version))
    };
    let (agent, version) = match preflight() {
        Ok(found) => found,
        Err(e @ PreflightError::AgentNotFound(_)) => return Ending::AgentNotFound(e.to_string()),
        Err(e @ PreflightError::AgentNotExecutable(_)) => {
            return Ending::AgentNotExecutable(e.to_string())
        }
        Err(e) => return Ending::Config(e.to_string()),
    };
    preflight::log_mirror_volume(&settings.mirrors_path);
    if let Err(e) = preflight::run_entrypoint_d(&settings.entrypoint_d) {
        return Ending::Config(e.to_string());
    }
    let status = match StatusServer::pick() {
        Ok(status) => status,
        Err(e) => {
            return Ending::Internal(format!(
                "cannot pick a loopback port for the agent's health server: {e}"
            ))
        }
    };
    for record in [&records.checkout, &records.job] {
        if let Some(dir) = record.parent().filter(|d| !d.is_dir()) {
            if let Err(e) = std::fs::create_dir_all(dir) {
                return Ending::Config(format!(
                    "cannot create the record directory {} ({e}); set AGENT_WRAPPER_STATE_DIR to a writable directory",
                    dir.display()
                ));
            }
        }
        // A record left by an earlier run in this directory must not describe this pod.
        let _ = std::fs::remove_file(record);
    }
    // As the official image's entrypoint does: through ssh-env-config.sh, which sets up SSH from
    // `SSH_*` variables and execs the agent (same pid).
    let ssh_env_config = Some(&settings.ssh_env_config).filter(|p| p.is_file());
    let mut command = match ssh_env_config {
        Some(script) => {
            let mut command = Command::new(script);
            command.arg(&agent);
            command
        }
        None => Command::new(&agent),
    };
    command
        .args(["start", "--disconnect-after-job"])
        .arg("--disconnect-after-idle-timeout")
        .arg(settings.idle_timeout.as_secs().to_string())
        .arg(format!("--health-check-addr={}", status.0))
        .args(version.cancel_args(settings.cancel_grace))
        .args(&settings.agent_args)
        .env(RECORD_PATH_ENV, &records.checkout)
        .env(JOB_RECORD_PATH_ENV, &records.job)
        .env(JOB_EVENTS_PATH_ENV, &records.job_events);
    let program = ssh_env_config.unwrap_or(&agent);
    let pid = match agent_process::spawn(command, program) {
        Ok(pid) => pid,
        Err(e @ SpawnError::NotFound { .. }) => return Ending::AgentNotFound(e.to_string()),
        Err(e @ SpawnError::NotExecutable { .. }) => {
            return Ending::AgentNotExecutable(e.to_string())
        }
    };
    let acquire_job = settings.acquire_job();
    tracing::info!(
        pid = pid.as_raw(),
        agent_version = %version,
        acquire_job = acquire_job.as_deref(),
        "started {} {version} start --disconnect-after-job",
        agent.display()
    );
    let nonzero = |d: std::time::Duration| (!d.is_zero()).then_some(d);
    let timings = Timings {
        stop_deadline: settings.stop_deadline,
        cancel_window: version.cancel_window(settings.cancel_grace),
        watchdog: settings.watchdog,
        report_deadline: settings.report_deadline,
        status_interval: settings.status_interval,
        job_deadline: nonzero(settings.job_deadline),
        idle_timeout: nonzero(settings.idle_timeout),
    };
    let supervised = supervisor::supervise(
        signals,
        pid,
        status,
        &records.job,
        &records.job_events,
        &timings,
    );
    match supervised {
        Ok(supervision) => Ending::Supervised(Supervision {
            acquire_job,
            ..supervision
        }),
        Err(e) => Ending::Internal(e.to_string()),
    }
}

fn is_pid1() -> bool {
    std::process::id() == 1
}
