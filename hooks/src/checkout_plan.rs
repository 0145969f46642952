//! Turning the job's environment into a validated plan, before any I/O: every value that will
//! reach git is checked here, so hostile input fails fast with a message naming the variable.

use std::path::PathBuf;
use std::time::Duration;

use git2::Oid;
use stateless_core::checkout_record::default_record_path;
use stateless_core::repo_url::{RepoUrl, UrlError};

use crate::settings::{MirrorMode, Settings};

/// What to check out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A full commit SHA.
    Commit(Oid),
    /// The server's current tip of this branch (`BUILDKITE_COMMIT=HEAD`).
    BranchHead(String),
}

#[derive(Debug)]
pub struct CheckoutPlan {
    pub repo: RepoUrl,
    pub target: Target,
    pub checkout_dir: PathBuf,
    /// `None` when mirrors are turned off (`BUILDKITE_GIT_MIRRORS_PATH` set but empty).
    pub mirrors_root: Option<PathBuf>,
    pub mode: MirrorMode,
    pub attempts: u32,
    pub attempt_timeout: Option<Duration>,
    pub stall_timeout: Duration,
    pub retry_delay: Duration,
    pub record_path: PathBuf,
    pub agent_bin: PathBuf,
}

/// Input the user must fix. Exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("BUILDKITE_REPO: {0}")]
    Repo(#[from] UrlError),
    #[error("BUILDKITE_COMMIT is HEAD but BUILDKITE_BRANCH is empty; set the branch to build or a full commit SHA")]
    HeadWithoutBranch,
    #[error(
        "BUILDKITE_COMMIT {0:?} is not a full 40-character commit SHA or HEAD; pass the full SHA"
    )]
    Commit(String),
    #[error("BUILDKITE_BRANCH {0:?} is not a valid branch name; check the branch the build was created for")]
    Branch(String),
    #[error("BUILDKITE_CHECKOUT_ATTEMPTS must be at least 1")]
    Attempts,
    #[error("cannot determine the checkout directory ({0}); set BUILDKITE_BUILD_CHECKOUT_PATH")]
    CheckoutDir(std::io::Error),
}

impl CheckoutPlan {
    /// `Ok(None)` when there is nothing to check out (empty `BUILDKITE_REPO`, as the agent does).
    pub fn from_settings(s: Settings) -> Result<Option<CheckoutPlan>, ConfigError> {
        if s.repo.is_empty() {
            return Ok(None);
        }
        let repo = RepoUrl::parse(&s.repo)?;
        let target = parse_target(&s.commit, &s.branch)?;
        if s.checkout_attempts == 0 {
            return Err(ConfigError::Attempts);
        }
        let checkout_dir = match s.checkout_path {
            Some(dir) => dir,
            None => std::env::current_dir().map_err(ConfigError::CheckoutDir)?,
        };
        Ok(Some(CheckoutPlan {
            repo,
            target,
            checkout_dir,
            mirrors_root: (!s.mirrors_path.is_empty()).then(|| PathBuf::from(s.mirrors_path)),
            mode: s.mirror_checkout_mode,
            attempts: s.checkout_attempts,
            attempt_timeout: (s.checkout_timeout > 0)
                .then(|| Duration::from_secs(s.checkout_timeout)),
            stall_timeout: s.stall_timeout,
            retry_delay: s.retry_delay,
            record_path: s.record.unwrap_or_else(default_record_path),
            agent_bin: s.agent_bin,
        }))
    }
}

fn parse_target(commit: &str, branch: &str) -> Result<Target, ConfigError> {
    if !branch.is_empty() && !is_valid_branch(branch) {
        return Err(ConfigError::Branch(branch.to_string()));
    }
    if commit == "HEAD" {
        if branch.is_empty() {
            return Err(ConfigError::HeadWithoutBranch);
        }
        return Ok(Target::BranchHead(branch.to_string()));
    }
    let is_full_sha = commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit());
    match is_full_sha.then(|| Oid::from_str(commit)) {
        Some(Ok(oid)) => Ok(Target::Commit(oid)),
        _ => Err(ConfigError::Commit(commit.to_string())),
    }
}

fn is_valid_branch(branch: &str) -> bool {
    !branch.starts_with('-') && git2::Reference::is_valid_name(&format!("refs/heads/{branch}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_shas_and_branch_heads_are_targets() {
        let sha = "0123456789abcdef0123456789ABCDEF01234567";
        assert_eq!(
            parse_target(sha, "main").unwrap(),
            Target::Commit(Oid::from_str(sha).unwrap())
        );
        assert_eq!(
            parse_target("HEAD", "feature/x").unwrap(),
            Target::BranchHead("feature/x".into())
        );
    }

    #[test]
    fn option_like_or_malformed_values_are_refused() {
        for (commit, branch) in [
            ("--upload-pack=touch /tmp/x", "main"),
            ("-f", "main"),
            ("0123456", "main"),
            ("HEAD", ""),
            ("HEAD", "-x"),
            ("HEAD", "--upload-pack=evil"),
            ("HEAD", "a..b"),
            ("HEAD", "x\ny"),
        ] {
            let err = parse_target(commit, branch).unwrap_err().to_string();
            assert!(err.contains("BUILDKITE_"), "{commit:?} {branch:?}: {err}");
        }
    }
}
