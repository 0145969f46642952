//! Refreshing one repository's mirror: list the remote's refs, and when they differ from the
//! published generation, build the next generation from it (hard links: the refresh costs the
//! delta), fetch, make it fast to read, verify it, publish it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use git2::{ConfigLevel, Repository};
use stateless_core::failure_kind::{classify, FailureKind};
use stateless_core::git_command::{Git, GitCommand};
use stateless_core::git_runner::{self, GitFailure, RunOptions};
use stateless_core::mirror_inspect::Mirror;
use stateless_core::repo_url::{Redactor, RepoUrl};

use crate::submodules;
use crate::volume::{Generation, Volume, VolumeError};

/// What a mirror holds: branches and tags, and pull-request refs when asked for.
const HEADS: &str = "+refs/heads/*:refs/heads/*";
const TAGS: &str = "+refs/tags/*:refs/tags/*";
const PULLS: &str = "+refs/pull/*:refs/pull/*";

/// Above this many packs a generation is repacked into one.
const MAX_PACKS: usize = 8;

pub struct Options {
    pub pull_requests: bool,
    /// Run `git fsck --connectivity-only` on every new generation before publishing it.
    pub fsck: bool,
    pub submodules: bool,
    pub stall_timeout: Duration,
    pub progress_every: Duration,
    pub keep_generations: usize,
    pub retain_for: Duration,
}

/// One repository to refresh, and where its mirror is published.
pub struct Job {
    pub url: RepoUrl,
    /// The published path, relative to the root.
    pub rel: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A new generation was published.
    Published,
    /// The remote's refs match the published generation: nothing was written.
    Unchanged,
}

/// A refreshed mirror, described for the manifest.
pub struct Refreshed {
    pub change: Change,
    pub generation: Generation,
    pub default_branch: Option<String>,
    pub head_commit: Option<String>,
    pub ref_count: usize,
    pub size_bytes: u64,
    /// Submodule URLs named by the default branch's `.gitmodules`, relative ones resolved.
    pub submodules: Vec<String>,
}

/// The step of a refresh, for logs and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    List,
    Prepare,
    Fetch,
    Optimize,
    Verify,
    Publish,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::List => "list",
            Phase::Prepare => "prepare",
            Phase::Fetch => "fetch",
            Phase::Optimize => "optimize",
            Phase::Verify => "verify",
            Phase::Publish => "publish",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("{} failed: {failure}; {}", phase.name(), hint(*kind))]
    Git {
        phase: Phase,
        kind: FailureKind,
        failure: GitFailure,
    },
    #[error("{} failed: {detail}; check free space on the volume", phase.name())]
    Local { phase: Phase, detail: String },
    #[error("the new generation failed verification ({0}); it was not published and the previous generation stays")]
    Verify(String),
    #[error("the refresh took longer than --timeout ({}s) and was stopped", .0.as_secs())]
    TimedOut(Duration),
}

fn hint(kind: FailureKind) -> &'static str {
    match kind {
        FailureKind::Network => "check that the server is reachable and the credentials are valid",
        FailureKind::NotFound => "check the repository URL",
        FailureKind::Config => {
            "check the Job's git credentials (docs/credentials.md): the git-ssh Secret's key and known_hosts, the git-credentials or github-app Secret"
        }
        FailureKind::Local => {
            "check free space on the volume; the previous generation stays published"
        }
    }
}

impl RefreshError {
    /// Worth another attempt: the network's or the server's failures.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            RefreshError::Git {
                kind: FailureKind::Network,
                ..
            }
        )
    }
}

/// The remote's refs as `git ls-remote --symref` lists them.
#[derive(Debug, Default, PartialEq, Eq)]
struct RemoteRefs {
    /// The branch HEAD points at.
    head: Option<String>,
    /// Ref name → object id (tags: the tag object, as a mirror stores them).
    refs: BTreeMap<String, String>,
}

pub struct Refresher<'a> {
    git: &'a Git,
    volume: &'a Volume,
    options: &'a Options,
}

impl<'a> Refresher<'a> {
    pub fn new(git: &'a Git, volume: &'a Volume, options: &'a Options) -> Self {
        Refresher {
            git,
            volume,
            options,
        }
    }

    pub async fn refresh(&self, job: &Job) -> Result<Refreshed, RefreshError> {
        let run = RunOptions {
            redactor: Redactor::new(job.url.secrets()),
            progress_every: Some(self.options.progress_every),
            ..RunOptions::default()
        };
        let network = RunOptions {
            stall_timeout: Some(self.options.stall_timeout),
            ..run.clone()
        };
        let mut phases = Phases::default();
        self.volume.remove_unpublished(&job.rel)?;
        let current = self.volume.current(&job.rel)?;
        let staged = match &current {
            Some(current) => {
                phases.start(Phase::List);
                let remote = self.list_remote(job, &network).await?;
                if published_refs(&current.path, self.options.pull_requests).as_ref()
                    == Some(&remote)
                    && Mirror::inspect(&current.path, &job.url).is_ok()
                {
                    tracing::info!(
                        phase = "list",
                        generation = current.number,
                        "unchanged: the published generation has every ref the remote has"
                    );
                    return Ok(self.describe(job, Change::Unchanged, current.clone()));
                }
                phases.start(Phase::Prepare);
                let staged = self.volume.stage(&job.rel)?;
                copy_generation(&current.path, &staged).map_err(|e| local(Phase::Prepare, e))?;
                configure(&staged, job, self.options.pull_requests)
                    .map_err(|e| local(Phase::Prepare, e))?;
                phases.start(Phase::Fetch);
                self.fetch(&staged, job, &network).await?;
                if let Some(head) = &remote.head {
                    Repository::open_bare(&staged)
                        .and_then(|r| r.set_head(&format!("refs/heads/{head}")))
                        .map_err(|e| local(Phase::Fetch, e))?;
                }
                staged
            }
            None => {
                // A first populate is a bare clone: git's clone verifies the pack is
                // self-contained and connected while indexing it, which a fetch into an empty
                // repository would repeat with a full walk.
                phases.start(Phase::Fetch);
                let staged = self.volume.stage(&job.rel)?;
                let url = job.url.without_credentials();
                let mut clone = self.command(self.volume.root(), job);
                clone
                    .args(["clone", "--bare", "--quiet", "--progress", "--no-hardlinks"])
                    .args(["--template="])
                    .operands([url.as_str(), &staged.to_string_lossy()]);
                self.step(Phase::Fetch, clone, &network).await?;
                configure(&staged, job, self.options.pull_requests)
                    .map_err(|e| local(Phase::Fetch, e))?;
                if self.options.pull_requests {
                    self.fetch(&staged, job, &network).await?;
                }
                staged
            }
        };
        phases.start(Phase::Optimize);
        self.optimize(&staged, job, &run).await?;
        phases.start(Phase::Verify);
        self.verify(&staged, job, &run).await?;
        phases.start(Phase::Publish);
        let generation = self.volume.publish(&job.rel, &staged)?;
        tracing::info!(
            phase = "publish",
            generation = generation.number,
            "published generation {} ({})",
            generation.number,
            phases.summary()
        );
        let removed = self.volume.prune(
            &job.rel,
            self.options.keep_generations,
            self.options.retain_for,
        )?;
        if !removed.is_empty() {
            tracing::info!(phase = "publish", "removed old generations {removed:?}");
        }
        Ok(self.describe(job, Change::Published, generation))
    }

    async fn list_remote(
        &self,
        job: &Job,
        options: &RunOptions,
    ) -> Result<RemoteRefs, RefreshError> {
        let url = job.url.without_credentials();
        let mut cmd = self.command(self.volume.root(), job);
        cmd.args(["ls-remote", "--symref"]).operands([
            url.as_str(),
            "HEAD",
            "refs/heads/*",
            "refs/tags/*",
        ]);
        if self.options.pull_requests {
            cmd.arg("refs/pull/*");
        }
        let listed = self.git_step(Phase::List, cmd, options).await?;
        Ok(parse_ls_remote(&String::from_utf8_lossy(&listed)))
    }

    /// The configured refspecs, pruning what the remote deleted. git checks that the new refs'
    /// history is complete before it updates them.
    async fn fetch(
        &self,
        staged: &Path,
        job: &Job,
        options: &RunOptions,
    ) -> Result<(), RefreshError> {
        let mut fetch = self.command(staged, job);
        fetch
            .config("core.logAllRefUpdates", "false")
            .args(["fetch", "--prune", "--no-write-fetch-head", "--no-auto-gc"])
            // Quiet: no line per ref (thousands on a big repository); progress stays, for the
            // periodic progress lines and stall detection.
            .args(["--quiet", "--progress", "--no-tags"])
            .operands(["origin"]);
        self.step(Phase::Fetch, fetch, options).await
    }

    /// Few packs, packed refs, a commit graph. A refresh adds one small pack; packs are merged
    /// geometrically (each at least twice the size of the next smaller), which keeps their
    /// number logarithmic at the cost of the new data only, with a multi-pack index so a reader
    /// looks objects up in one index. Past `MAX_PACKS` everything is repacked into one.
    async fn optimize(
        &self,
        staged: &Path,
        job: &Job,
        options: &RunOptions,
    ) -> Result<(), RefreshError> {
        let packs = pack_count(staged);
        if packs > 1 {
            let mut repack = self.command(staged, job);
            repack.args(["repack", "-d", "-q"]);
            if packs > MAX_PACKS {
                repack.arg("-a");
            } else {
                repack.args(["--geometric=2", "--write-midx"]);
            }
            self.step(Phase::Optimize, repack, options).await?;
        }
        let mut pack_refs = self.command(staged, job);
        pack_refs.args(["pack-refs", "--all", "--prune"]);
        self.step(Phase::Optimize, pack_refs, options).await?;
        let mut graph = self.command(staged, job);
        graph.args(["commit-graph", "write", "--reachable", "--no-progress"]);
        self.step(Phase::Optimize, graph, options).await
    }

    /// Before publishing: HEAD and every ref name an object that is present, every pack matches
    /// its index, and the mirror identifies as `job`'s repository (what checkout-hook's
    /// inspection will ask). The history's connectivity was checked by git's clone or fetch;
    /// `--fsck` checks it again over the whole generation.
    async fn verify(
        &self,
        staged: &Path,
        job: &Job,
        options: &RunOptions,
    ) -> Result<(), RefreshError> {
        let repo =
            Repository::open_bare(staged).map_err(|e| RefreshError::Verify(e.to_string()))?;
        let odb = repo
            .odb()
            .map_err(|e| RefreshError::Verify(e.to_string()))?;
        let has_branch = repo
            .references_glob("refs/heads/*")
            .is_ok_and(|mut r| r.next().is_some());
        if !has_branch {
            return Err(RefreshError::Verify("it has no branches".into()));
        }
        if repo.head().and_then(|h| h.peel_to_commit()).is_err() {
            tracing::warn!("the remote's HEAD names no branch it has; the mirror's HEAD is unborn");
        }
        for reference in repo
            .references()
            .map_err(|e| RefreshError::Verify(e.to_string()))?
            .flatten()
        {
            if let Some(target) = reference.target().filter(|t| !odb.exists(*t)) {
                let name = reference.name().unwrap_or("?").to_string();
                return Err(RefreshError::Verify(format!(
                    "{name} names {target}, which is missing"
                )));
            }
        }
        Mirror::inspect(staged, &job.url).map_err(|e| RefreshError::Verify(e.to_string()))?;
        if self.options.fsck {
            let mut fsck = self.command(staged, job);
            fsck.args([
                "fsck",
                "--connectivity-only",
                "--no-dangling",
                "--no-progress",
            ]);
            self.git_step(Phase::Verify, fsck, options)
                .await
                .map_err(|e| RefreshError::Verify(e.to_string()))?;
        }
        Ok(())
    }

    fn describe(&self, job: &Job, change: Change, generation: Generation) -> Refreshed {
        let repo = Repository::open_bare(&generation.path).ok();
        let refs = published_refs(&generation.path, self.options.pull_requests);
        let head_commit = repo
            .as_ref()
            .and_then(|r| r.head().ok()?.peel_to_commit().ok())
            .map(|c| c.id().to_string());
        let submodules = match (&repo, self.options.submodules) {
            (Some(repo), true) => submodules::urls(repo, &job.url),
            _ => Vec::new(),
        };
        Refreshed {
            change,
            default_branch: refs.as_ref().and_then(|r| r.head.clone()),
            head_commit,
            ref_count: refs.map_or(0, |r| r.refs.len()),
            size_bytes: directory_size(&generation.path),
            generation,
            submodules,
        }
    }

    /// A git command in `dir` that fetches with the URL's credentials without storing them:
    /// the mirror's config names the credential-free URL, and an `insteadOf` rule passed
    /// through the environment (`GIT_CONFIG_COUNT`, never written, never on the command line)
    /// maps it to the URL with credentials.
    fn command(&self, dir: &Path, job: &Job) -> GitCommand {
        let mut cmd = self.git.command(dir);
        if !job.url.secrets().is_empty() {
            let base: usize = std::env::var("GIT_CONFIG_COUNT")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            cmd.env(
                &format!("GIT_CONFIG_KEY_{base}"),
                format!("url.{}.insteadOf", job.url.as_git_arg()),
            )
            .env(
                &format!("GIT_CONFIG_VALUE_{base}"),
                job.url.without_credentials(),
            )
            .env("GIT_CONFIG_COUNT", (base + 1).to_string());
        }
        cmd
    }

    async fn step(
        &self,
        phase: Phase,
        cmd: GitCommand,
        options: &RunOptions,
    ) -> Result<(), RefreshError> {
        self.git_step(phase, cmd, options).await.map(drop)
    }

    async fn git_step(
        &self,
        phase: Phase,
        cmd: GitCommand,
        options: &RunOptions,
    ) -> Result<Vec<u8>, RefreshError> {
        git_runner::run(cmd, options)
            .await
            .map(|done| done.stdout)
            .map_err(|failure| RefreshError::Git {
                phase,
                kind: classify(&failure),
                failure,
            })
    }
}

/// Phase starts, logged as they happen (so a Job's log shows where a refresh is) and timed for
/// the summary line.
#[derive(Default)]
struct Phases {
    started: Vec<(Phase, Instant)>,
}

impl Phases {
    fn start(&mut self, phase: Phase) {
        tracing::info!(phase = phase.name(), "{}", phase.name());
        self.started.push((phase, Instant::now()));
    }

    /// `list 12 ms, prepare 3 ms, …`
    fn summary(&self) -> String {
        let ends = self
            .started
            .iter()
            .skip(1)
            .map(|(_, t)| *t)
            .chain([Instant::now()]);
        self.started
            .iter()
            .zip(ends)
            .map(|((phase, start), end)| {
                format!("{} {} ms", phase.name(), (end - *start).as_millis())
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Configures a staged generation as a mirror of `job`.
fn configure(staged: &Path, job: &Job, pull_requests: bool) -> Result<(), git2::Error> {
    let repo = Repository::open_bare(staged)?;
    let mut config = repo.config()?.open_level(ConfigLevel::Local)?;
    // Only the credential-free URL is ever stored on the volume.
    config.set_str("remote.origin.url", &job.url.without_credentials())?;
    let _ = config.remove_multivar("remote.origin.fetch", ".*");
    for refspec in [HEADS, TAGS]
        .into_iter()
        .chain(pull_requests.then_some(PULLS))
    {
        config.set_multivar("remote.origin.fetch", "^$", refspec)?;
    }
    // Readers never write here, and the next generation is repacked by us, not by gc.
    config.set_i32("gc.auto", 0)?;
    config.set_bool("maintenance.auto", false)?;
    // Keep every fetch as a pack (never loose objects), so repacks see whole packs.
    config.set_i32("fetch.unpackLimit", 1)?;
    // Bitmaps speed up serving clones, which a mirror read through alternates never does.
    config.set_bool("repack.writeBitmaps", false)?;
    config.set_bool("core.logAllRefUpdates", false)
}

fn local(phase: Phase, error: impl std::fmt::Display) -> RefreshError {
    RefreshError::Local {
        phase,
        detail: error.to_string(),
    }
}

/// Copies a generation cheaply: object files are immutable once written, so they are hard
/// linked; refs, config and the rest are copied, because git rewrites some files in place and
/// the published generation must never change.
fn copy_generation(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in walkdir::WalkDir::new(from) {
        let entry = entry.map_err(std::io::Error::other)?;
        let rel = entry.path().strip_prefix(from).unwrap_or(entry.path());
        let target = to.join(rel);
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&target)?;
            continue;
        }
        let name = entry.file_name().to_string_lossy();
        if name.ends_with(".lock") || name == "FETCH_HEAD" {
            continue;
        }
        let immutable = rel.starts_with("objects") && !rel.starts_with("objects/info");
        if !immutable || std::fs::hard_link(entry.path(), &target).is_err() {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The refs a published generation holds, in the form `ls-remote` lists them.
fn published_refs(path: &Path, pull_requests: bool) -> Option<RemoteRefs> {
    let repo = Repository::open_bare(path).ok()?;
    let head = repo.find_reference("HEAD").ok()?;
    let head = head
        .symbolic_target()
        .ok()
        .flatten()
        .and_then(|t| t.strip_prefix("refs/heads/"))
        .map(str::to_string);
    let mut refs = BTreeMap::new();
    for reference in repo.references().ok()?.flatten() {
        let (Ok(name), Some(target)) = (reference.name(), reference.target()) else {
            continue;
        };
        let wanted = name.starts_with("refs/heads/")
            || name.starts_with("refs/tags/")
            || (pull_requests && name.starts_with("refs/pull/"));
        if wanted {
            refs.insert(name.to_string(), target.to_string());
        }
    }
    Some(RemoteRefs { head, refs })
}

fn parse_ls_remote(listing: &str) -> RemoteRefs {
    let mut remote = RemoteRefs::default();
    for line in listing.lines() {
        if let Some(symref) = line.strip_prefix("ref: ") {
            if let Some(branch) = symref
                .strip_suffix("\tHEAD")
                .and_then(|t| t.strip_prefix("refs/heads/"))
            {
                remote.head = Some(branch.to_string());
            }
            continue;
        }
        let Some((oid, name)) = line.split_once('\t') else {
            continue;
        };
        if name != "HEAD" && !name.ends_with("^{}") {
            remote.refs.insert(name.to_string(), oid.to_string());
        }
    }
    remote
}

fn pack_count(repo: &Path) -> usize {
    std::fs::read_dir(repo.join("objects/pack"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
                .count()
        })
        .unwrap_or(0)
}

fn directory_size(path: &Path) -> u64 {
    walkdir::WalkDir::new(path)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ls_remote_listings_keep_head_and_unpeeled_refs() {
        let listing = "ref: refs/heads/main\tHEAD\n\
            aaaa\tHEAD\n\
            aaaa\trefs/heads/main\n\
            bbbb\trefs/tags/v1\n\
            cccc\trefs/tags/v1^{}\n";
        let remote = parse_ls_remote(listing);
        assert_eq!(remote.head.as_deref(), Some("main"));
        assert_eq!(
            remote.refs.into_iter().collect::<Vec<_>>(),
            [
                ("refs/heads/main".to_string(), "aaaa".to_string()),
                ("refs/tags/v1".to_string(), "bbbb".to_string())
            ]
        );
    }
}
