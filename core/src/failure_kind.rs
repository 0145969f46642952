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

/// git's wording when an HTTPS server wants credentials that are missing or wrong, or a
/// credential helper gave up (the GitHub App helper says why on the line before): retrying
/// cannot help. Checked after the network's markers, so a helper's "unable to access" (its API
/// unreachable) is retried.
const CREDENTIAL_MARKERS: &[&str] = &[
    "could not read Username",
    "could not read Password",
    "Authentication failed",
    "told us to quit",
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
        GitFailure::Exited { .. } if any(CREDENTIAL_MARKERS) => FailureKind::Config,
        GitFailure::Exited { .. } => FailureKind::Local,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn failed(stderr: &[&str]) -> FailureKind {
        classify(&GitFailure::Exited {
            command: "git fetch".into(),
            status: std::process::ExitStatus::from_raw(128 << 8),
            stderr: stderr.iter().map(|l| l.to_string()).collect(),
        })
    }

    #[test]
    fn missing_or_refused_credentials_are_final_but_an_unreachable_token_api_is_retried() {
        let no_credentials =
            "fatal: could not read Username for 'https://h': terminal prompts disabled";
        assert_eq!(failed(&[no_credentials]), FailureKind::Config);
        let refused = "fatal: Authentication failed for 'https://h/a.git/'";
        assert_eq!(failed(&[refused]), FailureKind::Config);
        let quit = "fatal: credential helper 'github-app' told us to quit";
        let not_found = "git-credential-github-app: installation 4 of App 1 was not found (404 Not Found); set …";
        assert_eq!(failed(&[not_found, quit]), FailureKind::Config);
        let unreachable = "git-credential-github-app: unable to access the GitHub API at https://api.github.com: …";
        assert_eq!(failed(&[unreachable, quit]), FailureKind::Network);
    }
}
