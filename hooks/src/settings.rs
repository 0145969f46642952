//! The checkout hook's inputs: the agent's job environment, plus our own knobs. Every input is
//! an environment variable (that is how the agent talks to hooks) and also a flag, so
//! `checkout-hook --help` documents them all.

use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser, ValueEnum};
use stateless_core::checkout_record::RECORD_PATH_ENV;
use stateless_core::mirror_layout::DEFAULT_MIRRORS_PATH;

/// Checks out the job's commit, borrowing objects from a read-only mirror volume.
///
/// Install it as the agent's global `checkout` hook. It reads the job environment the agent
/// sets, leaves HEAD detached at the commit with `origin/*` branches and tags like a clone, and
/// falls back to a checkout without the mirror whenever the mirror is missing or unusable.
// No `Debug`: `repo` may hold credentials, and nothing should be able to print it whole.
#[derive(Parser)]
#[command(name = "checkout-hook", version)]
pub struct Settings {
    /// Repository to check out. Empty: no checkout, as the agent does.
    #[arg(long, env = "BUILDKITE_REPO", default_value = "")]
    pub repo: String,

    /// Full 40-character commit SHA, or HEAD to build the tip of BUILDKITE_BRANCH.
    #[arg(long, env = "BUILDKITE_COMMIT", default_value = "HEAD")]
    pub commit: String,

    /// Branch being built; names the commit when BUILDKITE_COMMIT is HEAD.
    #[arg(long, env = "BUILDKITE_BRANCH", default_value = "")]
    pub branch: String,

    /// Where to check out; defaults to the current directory, as the agent runs hooks there.
    #[arg(long, env = "BUILDKITE_BUILD_CHECKOUT_PATH")]
    pub checkout_path: Option<PathBuf>,

    /// Root of the mirror volume. Set but empty: no mirror, as the agent reads it.
    #[arg(long, env = "BUILDKITE_GIT_MIRRORS_PATH", default_value = DEFAULT_MIRRORS_PATH)]
    pub mirrors_path: String,

    /// `reference` borrows objects from the mirror for the job's life; `dissociate` copies the
    /// objects the checkout needs, so the checkout outlives the mirror.
    #[arg(long, env = "BUILDKITE_GIT_MIRROR_CHECKOUT_MODE", value_enum, default_value_t = MirrorMode::Reference)]
    pub mirror_checkout_mode: MirrorMode,

    /// Checkout attempts before giving up (the agent's default is 6).
    #[arg(long, env = "BUILDKITE_CHECKOUT_ATTEMPTS", default_value_t = 6)]
    pub checkout_attempts: u32,

    /// Seconds one attempt may take; 0 means no limit.
    #[arg(long, env = "BUILDKITE_GIT_CHECKOUT_TIMEOUT", default_value_t = 0)]
    pub checkout_timeout: u64,

    /// A fetch that reports no progress for this long is killed and retried (e.g. `60s`).
    #[arg(long, env = "STATELESS_AGENT_STALL_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,

    /// First wait between attempts; it doubles each time, plus jitter (the agent waits 1 s, 2 s,
    /// 4 s, …).
    #[arg(long, env = "STATELESS_AGENT_RETRY_DELAY", default_value = "1s", value_parser = humantime::parse_duration)]
    pub retry_delay: Duration,

    /// Where to write the machine-readable checkout record that agent-wrapper reads
    /// [default: $TMPDIR/stateless-agent/checkout-record.json].
    #[arg(long, env = RECORD_PATH_ENV)]
    pub record: Option<PathBuf>,

    /// The agent binary used for `env set` and `meta-data` (found on PATH).
    #[arg(long, env = "BUILDKITE_AGENT_BIN", default_value = "buildkite-agent")]
    pub agent_bin: PathBuf,
}

/// Variables whose empty value means something other than "the default".
const EMPTY_IS_MEANINGFUL: &[&str] = &["BUILDKITE_REPO", "BUILDKITE_GIT_MIRRORS_PATH"];

impl Settings {
    /// Parses flags and the environment. An agent passes settings nobody set as empty variables;
    /// for those the default applies, where clap alone would reject the empty value. Called
    /// first thing in `main`, before any thread exists, so changing the environment is safe.
    pub fn from_args_and_env() -> Settings {
        for arg in Settings::command().get_arguments() {
            let Some(name) = arg.get_env() else { continue };
            let empty = std::env::var_os(name).is_some_and(|v| v.is_empty());
            if empty && !EMPTY_IS_MEANINGFUL.iter().any(|m| name == *m) {
                std::env::remove_var(name);
            }
        }
        Settings::parse()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MirrorMode {
    Reference,
    Dissociate,
}
