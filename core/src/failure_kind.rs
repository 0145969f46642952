//! What a git failure says about its cause, from git's own wording (commands run in the C
//! locale): it decides whether to retry, to give up on a mirror, or to tell the user what to fix.

use crate::git_runner::GitFailure;

/// What a failure says about its cause, which decides retries and the mirror fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The server or the network: retry, and do not blame the mirror.
    Network,
    /// The server answered that the commit or branch does not exist: final.
    NotFound,
    /// Anything local — a damaged mirror object, a failed checkout: redo without the mirror.
    Local,
    /// Input or environment the user must fix: final.
    Config,
}

/// git's wording for failures of the transport rather than the repository (C locale). Ambiguous
/// messages (`index-pack failed`) are left out on purpose: they count as local, so a damaged
/// mirror is abandoned instead of being retried six times.
const NETWORK_MARKERS: &[&str] = &[
    "unable to access",
    "Could not resolve host",
    "Failed to connect",
    "Connection refused",
    "Connection reset",
    "Connection timed out",
    "timed out",
    "RPC failed",
    "early EOF",
    "the remote end hung up",
    "transfer closed",
    "Empty reply from server",
    "returned error: 5",
    "Could not read from remote repository",
    "unable to connect",
    "protocol error",
    "expected flush after",
];

/// ssh's wording when the job's host keys or SSH key are wrong: retrying cannot help.
const SSH_CONFIG_MARKERS: &[&str] = &[
    "Host key verification failed",
    "Permission denied (publickey",
    "REMOTE HOST IDENTIFICATION HAS CHANGED",
];

/// git's wording when the server does not have what we asked for.
const NOT_FOUND_MARKERS: &[&str] = &[
    "not our ref",
    "couldn't find remote ref",
    "Couldn't find remote ref",
    "unadvertised object",
];

/// Classifies a git failure by what git printed.
pub fn classify(failure: &GitFailure) -> FailureKind {
    let any = |markers: &[&str]| markers.iter().any(|m| failure.stderr_contains(m));
    match failure {
        GitFailure::Stalled { .. } => FailureKind::Network,
        GitFailure::Spawn { .. } => FailureKind::Config,
        GitFailure::Exited { .. } if any(NOT_FOUND_MARKERS) => FailureKind::NotFound,
        GitFailure::Exited { .. } if any(SSH_CONFIG_MARKERS) => FailureKind::Config,
        GitFailure::Exited { .. } if any(NETWORK_MARKERS) => FailureKind::Network,
        GitFailure::Exited { .. } => FailureKind::Local,
    }
}
