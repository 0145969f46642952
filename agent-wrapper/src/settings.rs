//! agent-wrapper's options; each is also an environment variable, so the image's ENTRYPOINT
//! needs no arguments and a Job template sets what it wants.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use stateless_core::mirror_layout::DEFAULT_MIRRORS_PATH;

/// Runs `buildkite-agent start --disconnect-after-job` as the container's PID 1 for exactly one
/// job: forwards signals, reaps orphans, stops an agent that does not exit after its job, and
/// reports how the pod ended (a JSON line on stdout and the Kubernetes termination message).
/// docs/agent-wrapper.md has the exit-code table.
#[derive(Parser, Debug)]
#[command(name = "agent-wrapper", version)]
pub struct Settings {
    /// The agent executable (found on PATH).
    #[arg(long, env = "AGENT_WRAPPER_AGENT", default_value = "buildkite-agent")]
    pub agent: PathBuf,

    /// The agent exits when no job arrived for this long
    /// (`--disconnect-after-idle-timeout`); 0 waits forever.
    #[arg(long, env = "AGENT_WRAPPER_IDLE_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// After SIGTERM the agent may finish its job this long; then a job whose command is still
    /// running is cancelled (SIGQUIT). A job whose command has ended is never signalled: the
    /// agent is reporting its result. Keep it, plus the cancel window, below the pod's
    /// terminationGracePeriodSeconds (docs/agent-wrapper.md).
    #[arg(long, env = "AGENT_WRAPPER_STOP_DEADLINE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub stop_deadline: Duration,

    /// How long a cancelled job's command gets before SIGKILL. Passed to the agent (3.x
    /// `--cancel-grace-period`, 4.x `--cancel-signal-timeout` with `--cancel-cleanup-timeout=5s`),
    /// so the wrapper knows when the agent will exit by itself after a cancel (3.x: this plus
    /// 1 s, 4.x: this plus 6 s) and kills it only after that. Do not pass those flags to the
    /// agent yourself.
    #[arg(long, env = "AGENT_WRAPPER_CANCEL_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub cancel_grace: Duration,

    /// After its job is over (the agent says it is idle: the result is reported), the agent
    /// must exit within this long, or it is stopped (TERM, then QUIT, then KILL). A job still
    /// reporting (the agent busy after its command) is never signalled.
    #[arg(long, env = "AGENT_WRAPPER_WATCHDOG", default_value = "60s", value_parser = humantime::parse_duration)]
    pub watchdog: Duration,

    /// After the job's command ended (its pre-exit hook ran), how long the agent may stay busy
    /// reporting the result, or not answer its status, before the watchdog acts anyway. Above
    /// the agent's own retries of the log upload and FinishJob (about 10 minutes each).
    #[arg(long, env = "AGENT_WRAPPER_REPORT_DEADLINE", default_value = "25m", value_parser = humantime::parse_duration)]
    pub report_deadline: Duration,

    /// While a job runs or reports, the agent's status is asked this often (besides when a hook
    /// reports and at the watchdog's deadline), so a job whose pre-exit hook never ran is still
    /// seen to end. Nothing is asked while the agent waits for its job.
    #[arg(long, env = "AGENT_WRAPPER_STATUS_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub status_interval: Duration,

    /// When no job has started this long after the agent started (a paused agent, or one never
    /// given a job; neither idles out), the agent is stopped: exit 0, reason `no-job`. Keep it
    /// above --idle-timeout. 0: never.
    #[arg(long, env = "AGENT_WRAPPER_JOB_DEADLINE", default_value = "15m", value_parser = humantime::parse_duration)]
    pub job_deadline: Duration,

    /// The agent's `--version` output, recorded when the image was built (image/install.sh): read
    /// instead of running the agent once more at every pod start. Absent: the wrapper runs
    /// `buildkite-agent --version`.
    #[arg(
        long,
        env = "AGENT_WRAPPER_AGENT_VERSION_FILE",
        default_value = "/etc/stateless-agent/agent-version"
    )]
    pub agent_version_file: PathBuf,

    /// Scripts run (with `run-parts --exit-on-error`) before the agent starts, as the official
    /// image's entrypoint runs them. Skipped when the directory does not exist.
    #[arg(
        long,
        env = "AGENT_WRAPPER_ENTRYPOINT_D",
        default_value = "/docker-entrypoint.d"
    )]
    pub entrypoint_d: PathBuf,

    /// The official image's `ssh-env-config.sh` (SSH keys, known_hosts and config from `SSH_*`
    /// variables): the agent is started through it, as the official entrypoint does, when it
    /// exists. Empty: never.
    #[arg(
        long,
        env = "AGENT_WRAPPER_SSH_ENV_CONFIG",
        default_value = "/usr/local/bin/ssh-env-config.sh"
    )]
    pub ssh_env_config: PathBuf,

    /// Where the exit report goes for Kubernetes (`terminationMessagePath`). An unwritable path
    /// only warns.
    #[arg(
        long,
        env = "AGENT_WRAPPER_TERMINATION_LOG",
        default_value = "/dev/termination-log"
    )]
    pub termination_log: PathBuf,

    /// Where the hooks write their records for the wrapper [default: $TMPDIR/stateless-agent].
    #[arg(long, env = "AGENT_WRAPPER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// The agent's build directory; it must be writable.
    #[arg(long, env = "BUILDKITE_BUILD_PATH")]
    pub build_path: Option<PathBuf>,

    /// The mirror volume, whose state is logged before the agent starts.
    #[arg(long, env = "BUILDKITE_GIT_MIRRORS_PATH", default_value = DEFAULT_MIRRORS_PATH)]
    pub mirrors_path: PathBuf,

    /// Extra arguments for `buildkite-agent start`, after `--`.
    #[arg(last = true)]
    pub agent_args: Vec<String>,
}

impl Settings {
    /// The job the agent is told to acquire: `--acquire-job` among the extra arguments, else
    /// `BUILDKITE_AGENT_ACQUIRE_JOB`, which the agent inherits with the rest of the environment
    /// (buildkite/agent v3.137.0 `clicommand/agent_start.go`: the flag wins over the variable).
    pub fn acquire_job(&self) -> Option<String> {
        let mut args = self.agent_args.iter();
        let mut flag = None;
        while let Some(arg) = args.next() {
            let name = arg.trim_start_matches('-');
            if let Some(value) = name.strip_prefix("acquire-job=") {
                flag = Some(value.to_string());
            } else if name == "acquire-job" && arg.starts_with('-') {
                flag = args.next().cloned();
            }
        }
        flag.or_else(|| std::env::var("BUILDKITE_AGENT_ACQUIRE_JOB").ok())
            .filter(|job| !job.trim().is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_to_acquire_is_read_from_the_agents_arguments() {
        for args in [
            &["--", "--acquire-job", "0190-a"][..],
            &["--", "--tags", "queue=x", "--acquire-job=0190-a"][..],
            &["--", "-acquire-job", "0190-a"][..],
        ] {
            let settings = Settings::try_parse_from(
                std::iter::once("agent-wrapper").chain(args.iter().copied()),
            )
            .unwrap();
            assert_eq!(
                settings.acquire_job().as_deref(),
                Some("0190-a"),
                "{args:?}"
            );
        }
    }
}
