//! Why a checkout failed, what kind of failure that is, and the exit code each kind maps to.
//! This module is the only place exit codes are decided (`docs/checkout-hook.md` lists them).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use stateless_core::failure_kind::FailureKind;
use stateless_core::git_command::GitNotFound;
use stateless_core::git_runner::GitFailure;

use crate::checkout_plan::ConfigError;

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
    #[error("{what} was not found on {repo} (asked for it directly, then fetched all branches and tags); check BUILDKITE_COMMIT and BUILDKITE_BRANCH, or push the commit")]
    NotFound { what: String, repo: String },
    #[error("BUILDKITE_COMMIT {0:?} is an abbreviation of more than one object; pass more digits or the full SHA")]
    AmbiguousCommit(String),
    #[error("a checkout attempt ran longer than BUILDKITE_GIT_CHECKOUT_TIMEOUT ({}s) and was stopped; raise the timeout or check the server", after.as_secs())]
    TimedOut { after: Duration },
    #[error("the checkout directory {} holds files but no git checkout; refusing to delete them. Set BUILDKITE_BUILD_CHECKOUT_PATH to the job's own checkout directory", path.display())]
    NotACheckoutDir { path: PathBuf },
    #[error("cannot prepare the checkout in {}: {detail}; check that the build directory is writable and has free space", path.display())]
    Prepare { path: PathBuf, detail: String },
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
            "check that git runs, and for SSH remotes the host's key in known_hosts (or BUILDKITE_SSH_KEYSCAN) and BUILDKITE_GIT_SSH_KEY"
        }
    }
}

impl CheckoutError {
    pub fn kind(&self) -> FailureKind {
        match self {
            CheckoutError::Config(_)
            | CheckoutError::GitNotFound(_)
            | CheckoutError::NotACheckoutDir { .. }
            | CheckoutError::AmbiguousCommit(_) => FailureKind::Config,
            CheckoutError::Git { kind, .. } => *kind,
            CheckoutError::NotFound { .. } => FailureKind::NotFound,
            CheckoutError::TimedOut { .. } => FailureKind::Network,
            CheckoutError::Prepare { .. } => FailureKind::Local,
        }
    }

    /// Worth another attempt: everything but a missing commit and input the user must fix.
    pub fn is_retryable(&self) -> bool {
        !matches!(self.kind(), FailureKind::NotFound | FailureKind::Config)
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

    /// The hook's exit code: 2 for input to fix, 3 for a commit the server does not have, 1
    /// for a checkout that failed after its retries. (128+N for signal N is decided in main.)
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self.kind() {
            FailureKind::Config => 2,
            FailureKind::NotFound => 3,
            FailureKind::Network | FailureKind::Local => 1,
        })
    }
}
