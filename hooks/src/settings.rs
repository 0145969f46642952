//! The checkout hook's inputs: the agent's job environment, plus our own knobs. Every input is
//! an environment variable (that is how the agent talks to hooks) and also a flag, so
//! `checkout-hook --help` documents them all.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, CommandFactory, Parser, ValueEnum};
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

    /// Commit SHA (full, or abbreviated to at least 4 digits), a branch or tag name (checked
    /// out as `git checkout NAME` would), or HEAD to build the tip of BUILDKITE_BRANCH (the
    /// remote's default branch when that is empty).
    #[arg(long, env = "BUILDKITE_COMMIT", default_value = "HEAD")]
    pub commit: String,

    /// Branch being built. Fetched only for HEAD builds, and used by commit verification;
    /// otherwise never read, so a fork's `owner:branch` is fine.
    #[arg(long, env = "BUILDKITE_BRANCH", default_value = "")]
    pub branch: String,

    /// The tag being built, for tag builds: commit verification and the remote mirror skip them.
    #[arg(long, env = "BUILDKITE_TAG", default_value = "")]
    pub tag: String,

    /// Custom refspecs to fetch instead of the commit, space-separated.
    #[arg(long, env = "BUILDKITE_REFSPEC", default_value = "")]
    pub refspec: String,

    /// Pull request number, or `false`. GitHub pull requests fetch `refs/pull/N/head` with the
    /// commit, so a force-pushed head still builds.
    #[arg(long, env = "BUILDKITE_PULL_REQUEST", default_value = "false")]
    pub pull_request: String,

    /// The pipeline's provider (`github`, …): pull-request refs exist only on GitHub.
    #[arg(long, env = "BUILDKITE_PIPELINE_PROVIDER", default_value = "")]
    pub pipeline_provider: String,

    /// Fetch `refs/pull/N/merge` instead of `refs/pull/N/head`.
    #[arg(long, env = "BUILDKITE_PULL_REQUEST_USING_MERGE_REFSPEC", default_value = "false", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub pull_request_using_merge_refspec: bool,

    /// The pull request's head commit. For a HEAD build of the merge ref, the merge commit's
    /// second parent must be this commit, or the merge ref is stale and is fetched again.
    #[arg(long, env = "BUILDKITE_PULL_REQUEST_HEAD_COMMIT", default_value = "")]
    pub pull_request_head_commit: String,

    /// `warn` or `strict`: check that the commit is on BUILDKITE_BRANCH (`off` or empty: no
    /// check). `strict` fails the checkout when it is not; `warn` only says so.
    #[arg(long, env = "BUILDKITE_GIT_COMMIT_VERIFICATION", default_value = "")]
    pub commit_verification: String,

    /// An HTTPS mirror of the repository to fetch the commit from first (the pipeline's
    /// `clone_mirror_url`); anything it lacks still comes from BUILDKITE_REPO.
    #[arg(long, env = "BUILDKITE_GIT_REMOTE_MIRROR_URL", default_value = "")]
    pub remote_mirror_url: String,

    /// Flags for `git clone`, in git's syntax. Those the fast path can express are mapped onto
    /// it (docs/checkout-hook.md has the table); any other makes the hook run a real
    /// `git clone --reference` with them.
    #[arg(
        long,
        env = "BUILDKITE_GIT_CLONE_FLAGS",
        default_value = "-v",
        allow_hyphen_values = true
    )]
    pub clone_flags: String,

    /// Flags for `git fetch`. The agent's default (`-v --prune`) is replaced by quiet progress:
    /// `-v` would print a line per branch, and a fresh directory has nothing to prune.
    #[arg(long, env = "BUILDKITE_GIT_FETCH_FLAGS", default_value = DEFAULT_FETCH_FLAGS, allow_hyphen_values = true)]
    pub fetch_flags: String,

    /// Flags for `git checkout`.
    #[arg(
        long,
        env = "BUILDKITE_GIT_CHECKOUT_FLAGS",
        default_value = "-f",
        allow_hyphen_values = true
    )]
    pub checkout_flags: String,

    /// Flags for `git clean`. Checked, but there is nothing to clean: every checkout starts in an
    /// emptied directory.
    #[arg(
        long,
        env = "BUILDKITE_GIT_CLEAN_FLAGS",
        default_value = "-ffxdq",
        allow_hyphen_values = true
    )]
    pub clean_flags: String,

    /// Check out submodules, each borrowing from its own mirror when the volume has one.
    #[arg(long, env = "BUILDKITE_GIT_SUBMODULES", default_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub submodules: bool,

    /// Comma-separated `key=value` git config for submodule clones.
    #[arg(long, env = "BUILDKITE_GIT_SUBMODULE_CLONE_CONFIG", default_value = "")]
    pub submodule_clone_config: String,

    /// Comma-separated paths (cone mode) or patterns (no-cone) for a sparse checkout.
    #[arg(long, env = "BUILDKITE_GIT_SPARSE_CHECKOUT_PATHS", default_value = "")]
    pub sparse_checkout_paths: String,

    /// How the sparse paths are read: `cone` (directories) or `no-cone` (patterns).
    #[arg(long, env = "BUILDKITE_GIT_SPARSE_CHECKOUT_MODE", value_enum, default_value_t = SparseMode::Cone)]
    pub sparse_checkout_mode: SparseMode,

    /// Fetch and check out Git LFS files after the checkout (smudging is skipped during it).
    #[arg(long, env = "BUILDKITE_GIT_LFS_ENABLED", default_value = "false", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub lfs_enabled: bool,

    /// Do not fetch the commit (or refspec) when the mirror already has it.
    #[arg(long, env = "BUILDKITE_GIT_SKIP_FETCH_EXISTING_COMMITS", default_value = "false", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub skip_fetch_existing_commits: bool,

    /// Empty the checkout directory even when it holds files that are not a checkout.
    #[arg(long, env = "BUILDKITE_CLEAN_CHECKOUT", default_value = "false", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub clean_checkout: bool,

    /// Do nothing at all.
    #[arg(long, env = "BUILDKITE_SKIP_CHECKOUT", default_value = "false", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub skip_checkout: bool,

    /// Private key for SSH remotes: the key itself, or the path of a file holding it.
    #[arg(long, env = "BUILDKITE_GIT_SSH_KEY", hide_env_values = true)]
    pub ssh_key: Option<String>,

    /// Accept an SSH host's key on first contact (`StrictHostKeyChecking=accept-new`, the
    /// agent's 4.x behaviour); `false` accepts only hosts already in known_hosts.
    #[arg(long, env = "BUILDKITE_SSH_KEYSCAN", default_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub ssh_keyscan: bool,

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
    #[arg(long, env = "BUILDKITE_CHECKOUT_ATTEMPTS", default_value_t = DEFAULT_ATTEMPTS)]
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

    /// Values ignored in favour of their defaults, as the agent ignores them (one line each).
    #[arg(skip)]
    pub warnings: Vec<String>,
}

/// Variables whose empty value means something other than "the default".
const EMPTY_IS_MEANINGFUL: &[&str] = &["BUILDKITE_REPO", "BUILDKITE_GIT_MIRRORS_PATH"];

/// Booleans and numbers: a value the agent cannot read is ignored with a warning and the default
/// applies (the agent's `internal/job/config.go` does the same), rather than failing the job.
const TOLERATED: &[&str] = &[
    "BUILDKITE_PULL_REQUEST_USING_MERGE_REFSPEC",
    "BUILDKITE_GIT_SUBMODULES",
    "BUILDKITE_GIT_LFS_ENABLED",
    "BUILDKITE_GIT_SKIP_FETCH_EXISTING_COMMITS",
    "BUILDKITE_CLEAN_CHECKOUT",
    "BUILDKITE_SKIP_CHECKOUT",
    "BUILDKITE_SSH_KEYSCAN",
    "BUILDKITE_CHECKOUT_ATTEMPTS",
    "BUILDKITE_GIT_CHECKOUT_TIMEOUT",
];

impl Settings {
    /// Parses flags and the environment. An agent passes settings nobody set as empty variables;
    /// for those the default applies, where clap alone would reject the empty value. Called
    /// first thing in `main`, before any thread exists, so changing the environment is safe.
    /// A bad value is reported by the variable's name: hooks get their input from the
    /// environment, and `--submodules` would mean nothing to whoever set
    /// `BUILDKITE_GIT_SUBMODULES`.
    pub fn from_args_and_env() -> Result<Settings, clap::Error> {
        for arg in Settings::command().get_arguments() {
            let Some(name) = arg.get_env() else { continue };
            let empty = std::env::var_os(name).is_some_and(|v| v.is_empty());
            if empty && !EMPTY_IS_MEANINGFUL.iter().any(|m| name == *m) {
                std::env::remove_var(name);
            }
        }
        let mut warnings = Vec::new();
        loop {
            match Settings::try_parse() {
                Ok(mut settings) => {
                    if settings.checkout_attempts == 0 {
                        warnings.push("BUILDKITE_CHECKOUT_ATTEMPTS is 0; using the agent's default of 6 attempts".to_string());
                        settings.checkout_attempts = DEFAULT_ATTEMPTS;
                    }
                    settings.warnings = warnings;
                    return Ok(settings);
                }
                Err(error) => match invalid_env_value(&error) {
                    Some((name, value)) if TOLERATED.contains(&name.as_str()) => {
                        warnings.push(format!(
                            "{name} has the invalid value {value:?}; ignoring it and using the default, as the agent does"
                        ));
                        std::env::remove_var(&name);
                    }
                    Some((name, value)) => {
                        // `raw`: one line, without clap's usage text.
                        return Err(clap::Error::raw(
                            clap::error::ErrorKind::ValueValidation,
                            format!("{name} has the invalid value {value:?}; see `checkout-hook --help` for what it accepts\n"),
                        ));
                    }
                    None => return Err(error),
                },
            }
        }
    }
}

/// The environment variable, and its value, behind clap's "invalid value for '--flag'", when the
/// value came from there.
fn invalid_env_value(error: &clap::Error) -> Option<(String, String)> {
    use clap::error::{ContextKind, ContextValue};
    let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) = (
        error.get(ContextKind::InvalidArg),
        error.get(ContextKind::InvalidValue),
    ) else {
        return None;
    };
    let long = arg.split_whitespace().next().unwrap_or("");
    let command = Settings::command();
    let name = command
        .get_arguments()
        .find(|a| a.get_long().is_some_and(|l| long == format!("--{l}")))
        .and_then(|a| a.get_env())
        .filter(|name| std::env::var_os(name).is_some_and(|v| v == value.as_str()))?;
    Some((name.to_string_lossy().into_owned(), value.clone()))
}

/// The agent's `checkout-attempts` default, also used for a value of 0 or less.
const DEFAULT_ATTEMPTS: u32 = 6;

/// The agent's default fetch flags, which the hook replaces with quiet progress.
pub const DEFAULT_FETCH_FLAGS: &str = "-v --prune";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SparseMode {
    Cone,
    NoCone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MirrorMode {
    Reference,
    Dissociate,
}
