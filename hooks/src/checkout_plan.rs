//! Turning the job's environment into a validated plan, before any I/O: every value that will
//! reach git is checked here, so hostile input fails fast with a message naming the variable.

use std::path::PathBuf;
use std::time::Duration;

use git2::Oid;
use stateless_core::agent_environ::wrapper_setting;
use stateless_core::checkout_record::{default_record_path, RECORD_PATH_ENV};
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
    /// A branch or tag name given as `BUILDKITE_COMMIT` (the REST API takes "ref, SHA or
    /// tag"): fetched, then checked out by name, as the agent runs `git checkout NAME`.
    Named(String),
    /// Whatever the first fetched refspec names: the branch (or tag) for `BUILDKITE_COMMIT=HEAD`,
    /// or the custom refspec or pull-request ref. The agent checks out `FETCH_HEAD`.
    FetchHead,
    /// `HEAD` with no branch: the remote's default branch, which the agent's bare
    /// `git fetch origin` leaves in `FETCH_HEAD`.
    DefaultBranch,
}

/// Whether and how the commit is checked to be on its branch (`BUILDKITE_GIT_COMMIT_VERIFICATION`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    Off,
    /// Turned on, but this build is not one the agent verifies; the reason is logged.
    Skipped(String),
    /// Verify the commit against `branch`; `strict` fails the checkout when it is not on it.
    Check {
        branch: String,
        strict: bool,
    },
}

/// Whether the commit is first fetched from `BUILDKITE_GIT_REMOTE_MIRROR_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteMirror {
    /// Not used, with the agent's reason (`no-url`, `not-https`, …) for its log line.
    Skipped(&'static str),
    Try(RepoUrl),
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
    pub verification: Verification,
    /// A pull request's head ref fetched at HEAD: GitHub makes it asynchronously, so a missing
    /// one is waited for longer (the agent's 10 tries).
    pub waits_for_pull_request_ref: bool,
    /// For a HEAD build of a merge ref: the pull request head its second parent must be.
    pub merge_head: Option<String>,
    pub remote_mirror: RemoteMirror,
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
        "BUILDKITE_COMMIT {0:?} is not a commit SHA, a branch or tag name, or HEAD; pass the commit's SHA"
    )]
    Commit(String),
    #[error("BUILDKITE_COMMIT {0:?} names a SHA-256 object; the checkout hook supports SHA-1 repositories only, so remove the hook for this pipeline or pass a SHA-1 commit")]
    Sha256(String),
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
        let pull_request = github_pull_request(&s)?;
        let mut target = parse_target(&s.commit)?;
        // The branch is fetched only for a HEAD build without a refspec or pull request: only
        // then must it be a ref name. Elsewhere a fork's `owner:branch` is normal.
        let fetches_branch =
            target == Target::FetchHead && s.refspec.is_empty() && pull_request.is_none();
        if fetches_branch && s.branch.is_empty() {
            target = Target::DefaultBranch;
        } else if fetches_branch && !is_valid_branch(&s.branch) {
            return Err(ConfigError::Branch(s.branch));
        }
        let target_refspecs = target_refspecs(&s, &target, pull_request)?;
        let mut clone_flags = CloneFlags::parse(git_flags::split(
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
        if !sparse_paths.is_empty() {
            // The agent's sparse clone is blobless unless the user chose a filter: objects
            // outside the sparse paths are never downloaded, even when the mirror misses.
            clone_flags.ensure_filter("blob:none");
        }
        let verification = verification(&s, &target);
        let remote_mirror = remote_mirror(&s, &target, fetch_flags.as_deref());
        let at_head = target == Target::FetchHead;
        let merge_head = (at_head && pull_request.is_some() && s.pull_request_using_merge_refspec)
            .then(|| s.pull_request_head_commit.clone())
            .filter(|c| !c.is_empty());
        let waits_for_pull_request_ref = at_head
            && pull_request.is_some()
            && !s.pull_request_using_merge_refspec
            && s.refspec.is_empty();
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
            // The agent's own setting first: a pipeline's env cannot move the record.
            record_path: wrapper_setting(RECORD_PATH_ENV)
                .map(PathBuf::from)
                .or(s.record)
                .unwrap_or_else(default_record_path),
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
            verification,
            waits_for_pull_request_ref,
            merge_head,
            remote_mirror,
        }))
    }
}

/// The agent's `verifyCommit` (internal/job/commit_verification.go, v3.137): which builds are
/// verified. `off` is 4.x's spelling of "no check"; any other unknown value verifies and warns,
/// as v3 does.
fn verification(s: &Settings, target: &Target) -> Verification {
    let mode = s.commit_verification.as_str();
    if mode.is_empty() || mode == "off" {
        return Verification::Off;
    }
    let skip = |why: String| Verification::Skipped(why);
    if matches!(target, Target::FetchHead | Target::DefaultBranch) {
        return skip("commit is HEAD".into());
    }
    if s.branch.is_empty() {
        return skip("no branch specified".into());
    }
    if !s.tag.is_empty() {
        return skip(format!("tag build ({})", s.tag));
    }
    if s.pull_request != "false" && !s.pull_request.is_empty() {
        return skip(format!("pull request build (#{})", s.pull_request));
    }
    if !s.refspec.is_empty() {
        return skip(format!("custom refspec is set ({})", s.refspec));
    }
    Verification::Check {
        branch: s.branch.clone(),
        strict: mode == "strict",
    }
}

/// The agent's `resolveRemoteMirrorAttempt` (internal/job/checkout_remote_mirror.go, v3.137), for
/// a fresh checkout: which builds may take their commit from the remote mirror.
fn remote_mirror(s: &Settings, target: &Target, fetch_flags: Option<&[String]>) -> RemoteMirror {
    use RemoteMirror::Skipped;
    if s.remote_mirror_url.is_empty() {
        return Skipped("no-url");
    }
    let url = match RepoUrl::parse(&s.remote_mirror_url) {
        Ok(url) if s.remote_mirror_url.starts_with("https://") => url,
        _ => return Skipped("not-https"),
    };
    if !matches!(target, Target::Commit(_)) {
        return Skipped("not-full-object-id");
    }
    if s.branch.is_empty() {
        return Skipped("empty-branch");
    }
    let component = s.branch.replace(|c: char| !c.is_ascii_alphanumeric(), "-");
    if component.len() > 240 {
        return Skipped("branch-too-long");
    }
    if !s.refspec.is_empty() {
        return Skipped("custom-refspec");
    }
    if !s.tag.is_empty() {
        return Skipped("tag-build");
    }
    if s.pull_request_using_merge_refspec {
        return Skipped("pull-request-merge-ref");
    }
    let refmap = fetch_flags
        .into_iter()
        .flatten()
        .any(|f| f.starts_with("--ref"));
    if s.pull_request != "false" && refmap {
        return Skipped("pull-request-refmap");
    }
    RemoteMirror::Try(url)
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
        64 if is_hex => Err(ConfigError::Sha256(commit.to_string())),
        4..=39 if is_hex => Ok(Target::ShortCommit(commit.to_ascii_lowercase())),
        // Like the agent's `gitCheckRefFormat`: a name git accepts as a ref, never an option.
        _ if is_valid_ref_name(commit) => Ok(Target::Named(commit.to_string())),
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
        Target::Named(name) => vec![name.clone()],
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

/// A branch, tag or full ref name (`main`, `v1.0`, `refs/tags/v1.0`).
fn is_valid_ref_name(name: &str) -> bool {
    is_valid_branch(name) || (name.starts_with("refs/") && git2::Reference::is_valid_name(name))
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
        for name in [
            "main",
            "v1.0.0",
            "release/2026",
            "refs/tags/v1",
            "abc",
            "0123456g",
        ] {
            assert_eq!(parse_target(name).unwrap(), Target::Named(name.into()));
        }
        let sha256 = "a".repeat(64);
        assert!(parse_target(&sha256)
            .unwrap_err()
            .to_string()
            .contains("SHA-256"));
    }

    #[test]
    fn option_like_or_malformed_values_are_refused() {
        for commit in ["--upload-pack=touch /tmp/x", "-f", "a..b", "x y", "x\ny"] {
            let err = parse_target(commit).unwrap_err().to_string();
            assert!(err.contains("BUILDKITE_COMMIT"), "{commit:?}: {err}");
        }
        for branch in ["-x", "--upload-pack=evil", "a..b", "x\ny"] {
            assert!(!is_valid_branch(branch), "{branch:?}");
        }
    }

    fn settings(args: &[&str]) -> Settings {
        use clap::Parser;
        let base = ["checkout-hook", "--repo", "https://example.com/a/b.git"];
        let branch = match args.contains(&"--branch") {
            true => &[][..],
            false => &["--branch", "main"][..],
        };
        Settings::try_parse_from(base.iter().chain(branch).chain(args)).unwrap()
    }

    #[test]
    fn remote_mirror_eligibility_follows_the_agent() {
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let mirror = "https://mirror.example.com/a/b.git";
        let reason = |args: &[&str]| {
            let s = settings(args);
            let target = parse_target(&s.commit).unwrap();
            match remote_mirror(&s, &target, None) {
                RemoteMirror::Skipped(why) => why,
                RemoteMirror::Try(_) => "try",
            }
        };
        assert_eq!(reason(&["--commit", sha]), "no-url");
        assert_eq!(
            reason(&["--commit", sha, "--remote-mirror-url", mirror]),
            "try"
        );
        let http = "http://mirror.example.com/a/b.git";
        assert_eq!(
            reason(&["--commit", sha, "--remote-mirror-url", http]),
            "not-https"
        );
        for (args, why) in [
            (&["--commit", "0123abc"][..], "not-full-object-id"),
            (&["--commit", "HEAD"], "not-full-object-id"),
            (&["--commit", sha, "--branch", ""], "empty-branch"),
            (
                &["--commit", sha, "--refspec", "refs/heads/x"],
                "custom-refspec",
            ),
            (&["--commit", sha, "--tag", "v1"], "tag-build"),
            (
                &[
                    "--commit",
                    sha,
                    "--pull-request-using-merge-refspec",
                    "true",
                ],
                "pull-request-merge-ref",
            ),
        ] {
            let mut all = args.to_vec();
            all.extend(["--remote-mirror-url", mirror]);
            assert_eq!(reason(&all), why, "{args:?}");
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
