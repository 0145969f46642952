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

    /// After SIGTERM the agent may finish its job this long; then the job is cancelled (SIGQUIT)
    /// so Buildkite records it as cancelled. Keep it, plus --cancel-grace, below the pod's
    /// terminationGracePeriodSeconds.
    #[arg(long, env = "AGENT_WRAPPER_STOP_DEADLINE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub stop_deadline: Duration,

    /// After cancelling, the agent may take this long to exit; then everything is killed.
    #[arg(long, env = "AGENT_WRAPPER_CANCEL_GRACE", default_value = "15s", value_parser = humantime::parse_duration)]
    pub cancel_grace: Duration,

    /// After its job ended (the pre-exit hook ran), the agent must exit within this long, or it
    /// is stopped (TERM, then QUIT, then KILL, each --cancel-grace apart).
    #[arg(long, env = "AGENT_WRAPPER_WATCHDOG", default_value = "60s", value_parser = humantime::parse_duration)]
    pub watchdog: Duration,

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
