//! Why a checkout failed, what kind of failure that is, and the exit code each kind maps to.
//! This module is the only place exit codes are decided (`docs/checkout-hook.md` lists them).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use stateless_core::failure_kind::FailureKind;
use stateless_core::git_command::GitNotFound;
use stateless_core::git_runner::GitFailure;

use crate::checkout_plan::ConfigError;

/// git's status for a fatal error (`die()`), which the agent passes on.
const GIT_FATAL: u8 = 128;

/// The step of a checkout attempt that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Clone,
    Sparse,
    Fetch,
    Checkout,
    Submodules,
    Lfs,
    Dissociate,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Clone => "cloning",
            Step::Sparse => "setting up the sparse checkout of",
            Step::Fetch => "fetching",
            Step::Checkout => "checking out",
            Step::Submodules => "checking out the submodules of",
            Step::Lfs => "fetching the LFS files of",
            Step::Dissociate => "copying objects out of the mirror",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    GitNotFound(#[from] GitNotFound),
    #[error("{step} {repo} failed: {failure}; {}", hint(*step, *kind))]
    Git {
        step: Step,
        repo: String,
        kind: FailureKind,
        failure: GitFailure,
    },
    #[error("{what} was not found on {repo} (asked for it directly, then fetched all branches and tags){}; check BUILDKITE_COMMIT and BUILDKITE_BRANCH, or push the commit", merge_hint(what))]
    NotFound { what: String, repo: String },
    #[error("the merge commit GitHub made for this pull request does not match the build's pull request head: expected {expected}, got {actual}; this is possibly due to a merge conflict, or GitHub being unable to create the merge ref automatically")]
    StaleMergeRef { expected: String, actual: String },
    #[error("commit verification failed: commit {commit} is not on branch {branch:?}; the build's commit must be reachable from its branch (BUILDKITE_GIT_COMMIT_VERIFICATION=strict)")]
    NotOnBranch { commit: String, branch: String },
    #[error("BUILDKITE_COMMIT {0:?} is an abbreviation of more than one object; pass more digits or the full SHA")]
    AmbiguousCommit(String),
    #[error("a checkout attempt ran longer than BUILDKITE_GIT_CHECKOUT_TIMEOUT ({}s) and was stopped; raise the timeout or check the server", after.as_secs())]
    TimedOut { after: Duration },
    #[error("the checkout directory {} holds files but no git checkout; refusing to delete them. Set BUILDKITE_BUILD_CHECKOUT_PATH to the job's own checkout directory", path.display())]
    NotACheckoutDir { path: PathBuf },
    #[error("cannot prepare the checkout in {}: {detail}; check that the build directory is writable and has free space", path.display())]
    Prepare { path: PathBuf, detail: String },
}

/// The agent's hint for a pull request's merge ref that cannot be fetched.
fn merge_hint(what: &str) -> &'static str {
    if what.contains("/merge") {
        ". This is possibly due to a merge conflict, or GitHub being unable to create the merge ref automatically"
    } else {
        ""
    }
}

fn hint(step: Step, kind: FailureKind) -> &'static str {
    if step == Step::Lfs && kind != FailureKind::Network {
        return "check that the LFS server (lfs.url, .lfsconfig) has the objects and the job's credentials reach it";
    }
    match kind {
        FailureKind::Network => {
            "check that the server is reachable from the pod and the credentials are valid"
        }
        FailureKind::NotFound => "check BUILDKITE_COMMIT and BUILDKITE_BRANCH",
        FailureKind::Local => {
            "check free space in the build directory; if it persists, repopulate the mirror"
        }
        FailureKind::Config => {
            "check the pod's git credentials (docs/credentials.md): for SSH the host's key in known_hosts and the key (the git-ssh Secret, BUILDKITE_GIT_SSH_KEY, BUILDKITE_SSH_KEYSCAN), for HTTPS the git-credentials or github-app Secret"
        }
    }
}

impl CheckoutError {
    pub fn kind(&self) -> FailureKind {
        match self {
            CheckoutError::Config(_)
            | CheckoutError::GitNotFound(_)
            | CheckoutError::NotACheckoutDir { .. }
            | CheckoutError::AmbiguousCommit(_)
            | CheckoutError::NotOnBranch { .. } => FailureKind::Config,
            CheckoutError::Git { kind, .. } => *kind,
            CheckoutError::NotFound { .. } | CheckoutError::StaleMergeRef { .. } => {
                FailureKind::NotFound
            }
            CheckoutError::TimedOut { .. } => FailureKind::Network,
            CheckoutError::Prepare { .. } => FailureKind::Local,
        }
    }

    /// Worth another attempt: everything but input the user must fix. A commit or ref the
    /// server does not have is retried too: GitHub can deliver the webhook before the commit or
    /// `refs/pull/N/head` can be fetched, and the agent retries those for the same reason.
    pub fn is_retryable(&self) -> bool {
        self.kind() != FailureKind::Config
    }

    /// A git failure that a damaged mirror can cause: redo the attempt without it.
    /// LFS objects never come from the mirror, so an LFS failure does not blame it.
    pub fn blames_mirror(&self) -> bool {
        matches!(
            self,
            CheckoutError::Git {
                kind: FailureKind::Local,
                step,
                ..
            } if *step != Step::Lfs
        )
    }

    /// The hook's exit status, the agent's default checkout's for the same failure, so that
    /// `retry: automatic: exit_status` rules keep matching (docs/checkout-hook.md has the table):
    /// git's own status when a git command failed (128 for nearly every fetch or checkout
    /// failure), 128 for a commit that is not on the server or an attempt stopped by its
    /// timeout, and 1 for anything else. The cause stays in the log line and the record.
    /// (128+N for signal N is decided in `interrupts`.)
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            CheckoutError::Git {
                failure: GitFailure::Exited { status, .. },
                ..
            } => status.code().map_or(GIT_FATAL, |c| c.clamp(1, 255) as u8),
            CheckoutError::Git {
                failure: GitFailure::Stalled { .. },
                ..
            }
            | CheckoutError::NotFound { .. }
            | CheckoutError::TimedOut { .. } => GIT_FATAL,
            _ => 1,
        })
    }

    /// The cause, for the record: what a retry rule cannot tell apart by exit status.
    pub fn cause(&self) -> &'static str {
        match self {
            CheckoutError::NotOnBranch { .. } => "commit-verification",
            CheckoutError::StaleMergeRef { .. } => "stale-merge-ref",
            CheckoutError::TimedOut { .. } => "timeout",
            _ => match self.kind() {
                FailureKind::Config => "config",
                FailureKind::NotFound => "not-found",
                FailureKind::Network => "network",
                FailureKind::Local => "local",
            },
        }
    }
}
