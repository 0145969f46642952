//! Turning the job's environment into a validated plan, before any I/O: every value that will
//! reach git is checked here, so hostile input fails fast with a message naming the variable.

use std::path::PathBuf;
use std::time::Duration;

use git2::Oid;
use stateless_core::checkout_record::default_record_path;
use stateless_core::repo_url::{RepoUrl, UrlError};

use crate::git_flags::{self, CloneFlags, FlagsError};
use crate::settings::{MirrorMode, Settings, SparseMode, DEFAULT_FETCH_FLAGS};

/// What to check out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A full commit SHA.
    Commit(Oid),
    /// An abbreviated SHA: servers do not serve those by id, so it is looked up among the
    /// fetched branches and tags (and the mirror).
    ShortCommit(String),
    /// Whatever the first fetched refspec names: the branch (or tag) for `BUILDKITE_COMMIT=HEAD`,
    /// or the custom refspec or pull-request ref. The agent checks out `FETCH_HEAD`.
    FetchHead,
}

#[derive(Debug)]
pub struct CheckoutPlan {
    pub repo: RepoUrl,
    pub target: Target,
    /// What the fetch names besides branches and tags, first (so it becomes `FETCH_HEAD`): the
    /// custom refspec, the pull-request ref, the branch for `HEAD` builds, or the SHA.
    pub target_refspecs: Vec<String>,
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
    pub clone_flags: CloneFlags,
    /// The user's fetch flags; `None` for the agent's default, which we replace.
    pub fetch_flags: Option<Vec<String>>,
    pub checkout_flags: Vec<String>,
    pub submodules: Option<Submodules>,
    pub sparse: Option<Sparse>,
    pub lfs: bool,
    pub skip_fetch_existing_commits: bool,
    /// `BUILDKITE_CLEAN_CHECKOUT`: the user allows emptying a directory that is not a checkout.
    pub clean_checkout: bool,
    pub ssh: SshOptions,
}

/// Submodules are checked out (`BUILDKITE_GIT_SUBMODULES`), with this config for their clones.
#[derive(Debug)]
pub struct Submodules {
    pub clone_config: Vec<String>,
}

#[derive(Debug)]
pub struct Sparse {
    pub paths: Vec<String>,
    pub mode: SparseMode,
}

/// How git reaches SSH remotes.
pub struct SshOptions {
    /// `BUILDKITE_GIT_SSH_KEY`: a key, or a key file's path. Never printed.
    pub key: Option<String>,
    /// Accept new host keys on first contact.
    pub accept_new_hosts: bool,
}

impl std::fmt::Debug for SshOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshOptions")
            .field("key", &self.key.as_ref().map(|_| "<set>"))
            .field("accept_new_hosts", &self.accept_new_hosts)
            .finish()
    }
}

/// Input the user must fix. Exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("BUILDKITE_REPO: {0}")]
    Repo(#[from] UrlError),
    #[error("BUILDKITE_COMMIT is HEAD but BUILDKITE_BRANCH is empty; set the branch to build or a full commit SHA")]
    HeadWithoutBranch,
    #[error(
        "BUILDKITE_COMMIT {0:?} is not a commit SHA (4 to 40 hex digits) or HEAD; pass the commit's SHA"
    )]
    Commit(String),
    #[error("BUILDKITE_PULL_REQUEST {0:?} is not a pull request number or false; check the build's pull request")]
    PullRequest(String),
    #[error("BUILDKITE_REFSPEC {0:?} is not a refspec git accepts; check the pipeline's refspec")]
    Refspec(String),
    #[error("BUILDKITE_GIT_SUBMODULE_CLONE_CONFIG entry {0:?} is not key=value; separate entries with commas")]
    SubmoduleConfig(String),
    #[error("BUILDKITE_GIT_SPARSE_CHECKOUT_PATHS entry {0:?} starts with '-'; name paths inside the repository")]
    SparsePath(String),
    #[error(transparent)]
    Flags(#[from] FlagsError),
    #[error("BUILDKITE_GIT_SSH_KEY is neither a private key nor the path of a key file; set it to the key's contents or its path")]
    SshKey,
    #[error("cannot write BUILDKITE_GIT_SSH_KEY to a private temporary file ({0}); check TMPDIR")]
    SshKeyFile(std::io::Error),
    #[error("BUILDKITE_GIT_LFS_ENABLED is true but git-lfs is not installed; install git-lfs in the image or turn LFS off")]
    LfsMissing,
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
        if !s.branch.is_empty() && !is_valid_branch(&s.branch) {
            return Err(ConfigError::Branch(s.branch));
        }
        let target = parse_target(&s.commit)?;
        let pull_request = github_pull_request(&s)?;
        let target_refspecs = target_refspecs(&s, &target, pull_request)?;
        if target == Target::FetchHead && target_refspecs.iter().all(String::is_empty) {
            return Err(ConfigError::HeadWithoutBranch);
        }
        if s.checkout_attempts == 0 {
            return Err(ConfigError::Attempts);
        }
        let clone_flags = CloneFlags::parse(git_flags::split(
            "BUILDKITE_GIT_CLONE_FLAGS",
            &s.clone_flags,
        )?);
        let fetch_flags = (s.fetch_flags != DEFAULT_FETCH_FLAGS)
            .then(|| git_flags::split("BUILDKITE_GIT_FETCH_FLAGS", &s.fetch_flags))
            .transpose()?;
        let checkout_flags = git_flags::split("BUILDKITE_GIT_CHECKOUT_FLAGS", &s.checkout_flags)?;
        git_flags::split("BUILDKITE_GIT_CLEAN_FLAGS", &s.clean_flags)?;
        let clone_config = comma_list(&s.submodule_clone_config);
        if let Some(bad) = clone_config.iter().find(|kv| !kv.contains('=')) {
            return Err(ConfigError::SubmoduleConfig(bad.clone()));
        }
        let sparse_paths = comma_list(&s.sparse_checkout_paths);
        if let Some(bad) = sparse_paths.iter().find(|p| p.starts_with('-')) {
            return Err(ConfigError::SparsePath(bad.clone()));
        }
        let checkout_dir = match s.checkout_path {
            Some(dir) => dir,
            None => std::env::current_dir().map_err(ConfigError::CheckoutDir)?,
        };
        Ok(Some(CheckoutPlan {
            repo,
            target,
            target_refspecs,
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
            clone_flags,
            fetch_flags,
            checkout_flags,
            submodules: s.submodules.then_some(Submodules { clone_config }),
            sparse: (!sparse_paths.is_empty()).then_some(Sparse {
                paths: sparse_paths,
                mode: s.sparse_checkout_mode,
            }),
            lfs: s.lfs_enabled,
            skip_fetch_existing_commits: s.skip_fetch_existing_commits,
            clean_checkout: s.clean_checkout,
            ssh: SshOptions {
                key: s.ssh_key.filter(|k| !k.is_empty()),
                accept_new_hosts: s.ssh_keyscan,
            },
        }))
    }
}

fn parse_target(commit: &str) -> Result<Target, ConfigError> {
    if commit == "HEAD" {
        return Ok(Target::FetchHead);
    }
    let is_hex = commit.bytes().all(|b| b.is_ascii_hexdigit());
    match commit.len() {
        40 if is_hex => Oid::from_str(commit)
            .map(Target::Commit)
            .map_err(|_| ConfigError::Commit(commit.to_string())),
        4..=39 if is_hex => Ok(Target::ShortCommit(commit.to_ascii_lowercase())),
        _ => Err(ConfigError::Commit(commit.to_string())),
    }
}

/// The pull request to fetch, when this is a GitHub pull-request build (only GitHub has
/// `refs/pull/*`, so the agent checks the provider too).
fn github_pull_request(s: &Settings) -> Result<Option<u64>, ConfigError> {
    if s.pull_request == "false" || !s.pipeline_provider.contains("github") {
        return Ok(None);
    }
    s.pull_request
        .parse()
        .map(Some)
        .map_err(|_| ConfigError::PullRequest(s.pull_request.clone()))
}

/// What the fetch names first, in the agent's order of precedence: custom refspec, pull request,
/// branch for `HEAD`, the full SHA. An abbreviated SHA names nothing: no server serves one.
fn target_refspecs(
    s: &Settings,
    target: &Target,
    pull_request: Option<u64>,
) -> Result<Vec<String>, ConfigError> {
    let sha = match target {
        Target::Commit(oid) => Some(oid.to_string()),
        _ => None,
    };
    if !s.refspec.is_empty() {
        let words: Vec<String> = s.refspec.split_whitespace().map(String::from).collect();
        if let Some(bad) = words.iter().find(|w| !is_valid_refspec(w)) {
            return Err(ConfigError::Refspec(bad.clone()));
        }
        return Ok(words);
    }
    if let Some(n) = pull_request {
        let kind = if s.pull_request_using_merge_refspec {
            "merge"
        } else {
            "head"
        };
        return Ok(std::iter::once(format!("refs/pull/{n}/{kind}"))
            .chain(sha)
            .collect());
    }
    Ok(match target {
        Target::FetchHead => vec![s.branch.clone()],
        _ => sha.into_iter().collect(),
    })
}

/// A refspec word git will read as one: not an option, no control characters or spaces, and
/// each side a plausible ref pattern or object name.
fn is_valid_refspec(word: &str) -> bool {
    let spec = word.strip_prefix('+').unwrap_or(word);
    !spec.starts_with('-')
        && !spec.is_empty()
        && spec.split(':').count() <= 2
        && spec.split(':').all(|side| {
            side.is_empty()
                || git2::Reference::is_valid_name(&format!("refs/x/{}", side.replace('*', "x")))
                || git2::Reference::is_valid_name(&side.replace('*', "x"))
        })
}

fn comma_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(String::from)
        .collect()
}

fn is_valid_branch(branch: &str) -> bool {
    !branch.starts_with('-') && git2::Reference::is_valid_name(&format!("refs/heads/{branch}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_and_short_shas_and_head_are_targets() {
        let sha = "0123456789abcdef0123456789ABCDEF01234567";
        assert_eq!(
            parse_target(sha).unwrap(),
            Target::Commit(Oid::from_str(sha).unwrap())
        );
        assert_eq!(
            parse_target("ABCD123").unwrap(),
            Target::ShortCommit("abcd123".into())
        );
        assert_eq!(parse_target("HEAD").unwrap(), Target::FetchHead);
    }

    #[test]
    fn option_like_or_malformed_values_are_refused() {
        for commit in [
            "--upload-pack=touch /tmp/x",
            "-f",
            "abc",
            "main",
            "0123456g",
        ] {
            let err = parse_target(commit).unwrap_err().to_string();
            assert!(err.contains("BUILDKITE_COMMIT"), "{commit:?}: {err}");
        }
        for branch in ["-x", "--upload-pack=evil", "a..b", "x\ny"] {
            assert!(!is_valid_branch(branch), "{branch:?}");
        }
    }

    #[test]
    fn refspecs_are_ref_patterns_not_options() {
        for good in [
            "refs/pull/1/head",
            "+refs/heads/*:refs/remotes/origin/*",
            "main",
            "refs/heads/x:refs/tmp/x",
        ] {
            assert!(is_valid_refspec(good), "{good}");
        }
        for bad in ["--upload-pack=x", "+-x", "a:b:c", "a..b", "x\u{7}"] {
            assert!(!is_valid_refspec(bad), "{bad}");
        }
    }
}
