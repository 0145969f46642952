//! Which buildkite-agent runs, and what follows from it: whether it is new enough, and how its
//! cancel timing is set and how long it takes.
//!
//! The minimum is 3.136.0, for two hangs the wrapper cannot tell from a slow job:
//! - before 3.128.0 a streaming agent waits for the server's next keepalive, about 60 s, after
//!   its job before it disconnects (`agent/agent_worker_debouncer.go`, commit 7961127);
//! - before 3.136.0 a hook that leaves a background process holding its output hangs the job
//!   forever (`internal/process/process.go`, fix 09e7a61).
//!
//! Cancel timing has one source, the wrapper's `--cancel-grace`, passed to the agent:
//! - 3.x: `--cancel-grace-period` (the job gets SIGKILL one second before it ends, the default
//!   signal grace); after a QUIT or a second TERM the agent exits by itself at the grace period
//!   plus 1 s (`clicommand/agent_start.go` `ungracefulStop`, `clicommand/cancel_signal.go`);
//! - 4.x: `--cancel-signal-timeout` (then SIGKILL) and `--cancel-cleanup-timeout` (5 s, the
//!   agent's default, to upload logs and artifacts); the forced exit comes at their sum plus 1 s.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The oldest agent the wrapper runs.
pub const MINIMUM: Version = Version(3, 136, 0);

/// 4.x's `--cancel-cleanup-timeout` default, which the wrapper passes explicitly.
pub const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

impl Version {
    /// From `buildkite-agent --version`: `buildkite-agent version 3.137.0, build 11234` (a
    /// pre-release such as `4.0.0-beta.15` counts as its release).
    pub fn parse(output: &str) -> Option<Version> {
        let word = output
            .split_whitespace()
            .skip_while(|w| *w != "version")
            .nth(1)?;
        let core = word.trim_end_matches(',').split(['-', '+']).next()?;
        let mut numbers = core.split('.').map(|n| n.parse::<u32>().ok());
        Some(Version(
            numbers.next()??,
            numbers.next()??,
            numbers.next().flatten().unwrap_or(0),
        ))
    }

    /// Runs `agent --version`.
    pub fn of(agent: &Path) -> Result<Version, String> {
        let out = Command::new(agent)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {} --version: {e}", agent.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        Version::parse(&text).ok_or_else(|| {
            format!(
                "{} --version printed no version ({:?})",
                agent.display(),
                text.trim()
            )
        })
    }

    /// The agent's cancel flags for a cancel grace of `grace`.
    pub fn cancel_args(self, grace: Duration) -> Vec<String> {
        match self.0 {
            0..=3 => vec![format!("--cancel-grace-period={}", grace.as_secs().max(2))],
            _ => vec![
                format!("--cancel-signal-timeout={}s", grace.as_secs().max(1)),
                format!("--cancel-cleanup-timeout={}s", CLEANUP_TIMEOUT.as_secs()),
            ],
        }
    }

    /// From a QUIT (or a second TERM) to the agent's own forced exit, with `grace` passed by
    /// [`Version::cancel_args`].
    pub fn cancel_window(self, grace: Duration) -> Duration {
        let one = Duration::from_secs(1);
        match self.0 {
            0..=3 => Duration::from_secs(grace.as_secs().max(2)) + one,
            _ => Duration::from_secs(grace.as_secs().max(1)) + CLEANUP_TIMEOUT + one,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_as_the_agent_prints_them() {
        assert_eq!(
            Version::parse("buildkite-agent version 3.137.0, build 11234\n"),
            Some(Version(3, 137, 0))
        );
        assert_eq!(
            Version::parse("buildkite-agent version 4.0.0-beta.15+41, build x"),
            Some(Version(4, 0, 0))
        );
        assert_eq!(Version::parse("nonsense"), None);
        assert!(Version(3, 127, 9) < MINIMUM && Version(3, 136, 0) >= MINIMUM);
    }

    #[test]
    fn the_cancel_window_follows_the_agents_own_timers() {
        let ten = Duration::from_secs(10);
        assert_eq!(
            Version(3, 137, 0).cancel_window(ten),
            Duration::from_secs(11)
        );
        assert_eq!(Version(4, 0, 0).cancel_window(ten), Duration::from_secs(16));
        assert_eq!(
            Version(3, 137, 0).cancel_args(ten),
            ["--cancel-grace-period=10"]
        );
        assert_eq!(
            Version(4, 0, 0).cancel_args(ten),
            ["--cancel-signal-timeout=10s", "--cancel-cleanup-timeout=5s"]
        );
    }
}
