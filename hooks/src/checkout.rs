//! The checkout itself: one attempt is the fast reference sequence, wrapped in a fallback that
//! redoes it without the mirror, wrapped in retries with backoff.
//!
//! The sequence (measured fastest in `../shared/notes/git-mirror-facts.md`): a new repository
//! whose alternates name the mirror's real path, `core.alternateRefsPrefixes` so negotiation
//! reads only the mirror's branches and tags, an exact-object fetch that makes no request when
//! the mirror has the commit, and parallel checkout. When the mirror already has the commit, the
//! checkout (disk) runs while the ref update (network) is in flight: they touch disjoint files
//! (the index and HEAD versus `refs/remotes` and `refs/tags`).

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use git2::{ConfigLevel, Oid, Repository, RepositoryInitOptions};
use stateless_core::checkout_record::MirrorStatus;
use stateless_core::failure_kind::{classify, FailureKind};
use stateless_core::git_command::{Git, GitCommand};
use stateless_core::git_runner::{self, RunOptions};
use stateless_core::mirror_inspect::Mirror;
use stateless_core::repo_url::Redactor;

use crate::checkout_plan::{CheckoutPlan, Target};
use crate::error::{CheckoutError, Step};
use crate::settings::{MirrorMode, SparseMode};
use crate::ssh::SshSetup;

/// What a clone fetches: every branch as `origin/*`, and every tag.
const HEADS_REFSPEC: &str = "+refs/heads/*:refs/remotes/origin/*";
const TAGS_REFSPEC: &str = "+refs/tags/*:refs/tags/*";

/// Paths per `git lfs checkout`, as the agent batches them.
const LFS_CHECKOUT_BATCH: usize = 1000;

/// The agent's tries for `refs/pull/N/head` at HEAD (`internal/job/git.go`, about 2m17s).
const PULL_REQUEST_REF_TRIES: u32 = 10;

/// A finished attempt.
#[derive(Debug)]
pub struct Attempt {
    pub commit: Oid,
    /// The mirror already held the commit.
    pub had_commit: bool,
    pub bytes_fetched: u64,
    pub fetch: Duration,
    pub checkout: Duration,
}

/// The result of all attempts, with what the record needs either way.
pub struct CheckoutRun {
    pub result: Result<Attempt, CheckoutError>,
    pub attempts: u32,
    pub mirror_status: MirrorStatus,
    /// Why the mirror was abandoned, when it was.
    pub fallback_reason: Option<String>,
}

pub struct Checkout<'a> {
    git: &'a Git,
    pub(crate) plan: &'a CheckoutPlan,
    ssh: &'a SshSetup,
    pub(crate) local: RunOptions,
    pub(crate) network: RunOptions,
}

impl<'a> Checkout<'a> {
    pub fn new(git: &'a Git, plan: &'a CheckoutPlan, ssh: &'a SshSetup) -> Self {
        let local = RunOptions {
            redactor: Redactor::new(plan.repo.secrets()),
            ..RunOptions::default()
        };
        let network = RunOptions {
            stall_timeout: Some(plan.stall_timeout),
            ..local.clone()
        };
        Checkout {
            git,
            plan,
            ssh,
            local,
            network,
        }
    }

    /// Runs attempts until one succeeds, a failure is final, or attempts run out. A failure the
    /// mirror may have caused is redone at once without the mirror, which is then left alone
    /// for the remaining attempts.
    pub async fn run(&self, mirror: Option<&Mirror>) -> CheckoutRun {
        let attempts = Cell::new(0u32);
        let abandoned: RefCell<Option<String>> = RefCell::new(None);
        let limit = self.attempt_limit();
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.plan.retry_delay)
            .with_factor(2.0)
            // The agent's 10 tries for a pull request's head ref span about 2m17s: 1, 2, 4, 8,
            // 16 s, then 26 s each. Six ordinary attempts never reach the cap.
            .with_max_delay(self.plan.retry_delay * 26)
            .with_jitter()
            .with_max_times(limit.max(self.plan.attempts) as usize - 1);
        let result = (|| async {
            attempts.set(attempts.get() + 1);
            let with_mirror = mirror.filter(|_| abandoned.borrow().is_none());
            let Some(m) = with_mirror else {
                return self.timed_attempt(None, attempts.get()).await;
            };
            match self.timed_attempt(Some(m), attempts.get()).await {
                Err(e) if e.blames_mirror() => {
                    tracing::warn!(
                        "the checkout failed with the mirror ({e}); redoing it without the mirror"
                    );
                    *abandoned.borrow_mut() = Some(e.to_string());
                    self.timed_attempt(None, attempts.get()).await
                }
                other => other,
            }
        })
        .retry(backoff)
        .sleep(tokio::time::sleep)
        .when(|e| e.is_retryable() && attempts.get() < self.limit_for(e))
        .notify(|e, wait| {
            let of = self.limit_for(e);
            match e.kind() {
                FailureKind::NotFound => tracing::warn!(
                    "checkout attempt {}/{of}: {e}; GitHub can deliver a build before a fresh push or a new pull request's ref can be fetched, so waiting {:.1}s for it to appear",
                    attempts.get(),
                    wait.as_secs_f64()
                ),
                _ => tracing::warn!(
                    "checkout attempt {}/{of} failed: {e}; retrying in {:.1}s",
                    attempts.get(),
                    wait.as_secs_f64()
                ),
            }
        })
        .await;
        let fallback_reason = abandoned.into_inner();
        let mirror_status = match (mirror, &fallback_reason) {
            (None, _) => MirrorStatus::Miss,
            (Some(_), None) => MirrorStatus::Hit,
            (Some(_), Some(_)) => MirrorStatus::Fallback,
        };
        CheckoutRun {
            result,
            attempts: attempts.get(),
            mirror_status,
            fallback_reason,
        }
    }

    /// The most attempts any failure gets: a pull request's head ref fetched at HEAD gets the
    /// agent's 10 tries, since GitHub makes it asynchronously.
    fn attempt_limit(&self) -> u32 {
        match self.plan.waits_for_pull_request_ref {
            true => self.plan.attempts.max(PULL_REQUEST_REF_TRIES),
            false => self.plan.attempts,
        }
    }

    fn limit_for(&self, e: &CheckoutError) -> u32 {
        match e.kind() {
            FailureKind::NotFound => self.attempt_limit(),
            _ => self.plan.attempts,
        }
    }

    async fn timed_attempt(
        &self,
        mirror: Option<&Mirror>,
        number: u32,
    ) -> Result<Attempt, CheckoutError> {
        match self.plan.attempt_timeout {
            Some(limit) => tokio::time::timeout(limit, self.attempt(mirror, number))
                .await
                .unwrap_or(Err(CheckoutError::TimedOut { after: limit })),
            None => self.attempt(mirror, number).await,
        }
    }

    async fn attempt(
        &self,
        mirror: Option<&Mirror>,
        number: u32,
    ) -> Result<Attempt, CheckoutError> {
        let dir = &self.plan.checkout_dir;
        let repo = self.prepare(mirror).await?;
        let present = |oid: Oid| mirror.is_some_and(|m| m.has_commit(oid));
        // A HEAD build without a branch must know the default branch before it can fetch.
        let known_default = match self.plan.target {
            Target::DefaultBranch => Some(self.default_branch(mirror).await),
            _ => None,
        };
        let fetch_and_checkout = async {
            Ok(match &self.plan.target {
                // The common case: the mirror has the commit, so the checkout need not wait for
                // the network. Only the extra refs (a pull request's, a custom refspec) and the
                // branches and tags are fetched, alongside.
                Target::Commit(oid) if present(*oid) => {
                    let specs = self.target_specs_without(*oid);
                    let joined = try_join_timed(self.fetch(&specs), self.checkout(*oid)).await;
                    let (fetch, checkout) = match joined {
                        Ok(((), fetch, (), checkout)) => (fetch, checkout),
                        Err(e) if e.kind() == FailureKind::NotFound => {
                            let ((), fetch) = timed(self.fetch_all_heads_and_tags(&e)).await?;
                            let ((), checkout) = timed(self.checkout(*oid)).await?;
                            (fetch, checkout)
                        }
                        Err(e) => return Err(e),
                    };
                    (*oid, true, fetch, checkout)
                }
                Target::Commit(oid) => {
                    // The agent tries the remote mirror on the first attempt only.
                    if number == 1 {
                        self.fetch_from_remote_mirror(*oid).await;
                    }
                    let (commit, fetch) = timed(self.fetch_target(&repo, None)).await?;
                    let ((), checkout) = timed(self.checkout(commit)).await?;
                    (commit, false, fetch, checkout)
                }
                Target::Named(name) => {
                    let ((), fetch) = timed(self.fetch_named(name)).await?;
                    let (commit, checkout) = timed(self.checkout_named(&repo, name)).await?;
                    (commit, false, fetch, checkout)
                }
                _ => {
                    let default = known_default.clone().flatten();
                    let (commit, fetch) = timed(self.fetch_target(&repo, default)).await?;
                    let ((), checkout) = timed(self.checkout(commit)).await?;
                    (commit, false, fetch, checkout)
                }
            })
        };
        // Which branch is the default costs a request only without a mirror: overlap it with
        // the fetch, and drop it if the fetch fails.
        let default_branch = async {
            Ok(match &known_default {
                Some(known) => known.clone(),
                None => self.default_branch(mirror).await,
            })
        };
        let ((commit, had_commit, fetch, checkout), default_branch) =
            tokio::try_join!(fetch_and_checkout, default_branch)?;
        if let Some(branch) = default_branch {
            self.set_default_branch(&repo, &branch);
        }
        self.update_submodules().await?;
        if self.plan.lfs {
            self.lfs_checkout().await?;
        }
        self.verify_commit(commit).await?;
        let bytes_fetched = object_bytes(&dir.join(".git/objects"));
        if let (Some(_), MirrorMode::Dissociate) = (mirror, self.plan.mode) {
            self.dissociate().await?;
        }
        let head = repo.head().ok().and_then(|h| h.target());
        if head != Some(commit) {
            return Err(self.prepare_error(format!("HEAD is {head:?} after checking out {commit}")));
        }
        Ok(Attempt {
            commit,
            had_commit,
            bytes_fetched,
            fetch,
            checkout,
        })
    }

    /// The fetch's target refspecs, minus the commit the mirror already has (and all of them
    /// with `BUILDKITE_GIT_SKIP_FETCH_EXISTING_COMMITS`).
    fn target_specs_without(&self, present: Oid) -> Vec<String> {
        if self.plan.skip_fetch_existing_commits {
            tracing::info!("commit {present} is already in the mirror; not fetching it");
            return Vec::new();
        }
        let sha = present.to_string();
        let specs = self.plan.target_refspecs.iter();
        specs.filter(|s| **s != sha).cloned().collect()
    }

    /// Fetches what the target names, with the branches and tags, and resolves the commit to
    /// check out. When the server lacks a named ref or will not serve the SHA by id, fetches
    /// all branches and tags and looks for the commit there, as the agent does.
    async fn fetch_target(
        &self,
        repo: &Repository,
        default_branch: Option<String>,
    ) -> Result<Oid, CheckoutError> {
        let target = &self.plan.target;
        let specs = match target {
            Target::DefaultBranch => {
                match default_branch {
                    Some(branch) => {
                        tracing::info!("BUILDKITE_BRANCH is empty: building the remote's default branch, {branch}");
                        vec![branch]
                    }
                    None => return Err(self.not_found("the remote's default branch (HEAD)".into())),
                }
            }
            _ => self.plan.target_refspecs.clone(),
        };
        match self.fetch(&specs).await {
            Err(e) if e.kind() == FailureKind::NotFound && *target != Target::FetchHead => {
                self.fetch_all_heads_and_tags(&e).await?;
            }
            other => other?,
        }
        let commit = self.resolve(repo, target).await?;
        if let Some(expected) = &self.plan.merge_head {
            self.check_merge_head(repo, commit, expected)?;
        }
        Ok(commit)
    }

    /// A branch or tag name as `BUILDKITE_COMMIT`: fetched by name (falling back to all branches
    /// and tags when the server has no such ref), as the agent does.
    async fn fetch_named(&self, name: &str) -> Result<(), CheckoutError> {
        match self.fetch(&self.plan.target_refspecs).await {
            Err(e) if e.kind() == FailureKind::NotFound => self.fetch_all_heads_and_tags(&e).await,
            other => other,
        }
        .map_err(|e| match e.kind() {
            FailureKind::NotFound => self.not_found(format!("ref {name}")),
            _ => e,
        })
    }

    /// `git checkout NAME`, as the agent runs it: a branch becomes a local branch tracking
    /// `origin/NAME`, a tag a detached HEAD. The commit is whatever HEAD then is.
    async fn checkout_named(&self, repo: &Repository, name: &str) -> Result<Oid, CheckoutError> {
        let mut cmd = self.command();
        // A validated ref name (never an option), without `--`, which would stop git from
        // creating the tracking branch.
        cmd.config("advice.detachedHead", "false")
            .arg("checkout")
            .args(self.plan.checkout_flags.iter().map(String::as_str))
            .arg(name);
        match self.git_step(Step::Checkout, cmd, &self.local).await {
            Err(CheckoutError::Git { failure, .. }) if failure.stderr_contains("did not match") => {
                Err(self.not_found(format!("ref {name}")))
            }
            other => other,
        }?;
        repo.head()
            .ok()
            .and_then(|h| h.peel_to_commit().ok())
            .map(|c| c.id())
            .ok_or_else(|| self.not_found(format!("ref {name}")))
    }

    /// The merge ref GitHub made may predate the pull request's last push: its second parent
    /// must be the head the build is for (the agent's `validateGithubPRMergeHead`, main after
    /// v3.137). A stale one is fetched again on the next attempt.
    fn check_merge_head(
        &self,
        repo: &Repository,
        merge: Oid,
        expected: &str,
    ) -> Result<(), CheckoutError> {
        let actual = repo
            .find_commit(merge)
            .ok()
            .and_then(|c| c.parent_id(1).ok())
            .map(|p| p.to_string())
            .unwrap_or_else(|| "a commit with fewer than two parents".into());
        if actual.eq_ignore_ascii_case(expected) {
            return Ok(());
        }
        Err(CheckoutError::StaleMergeRef {
            expected: expected.to_string(),
            actual,
        })
    }

    /// What git makes of an abbreviation: like `git checkout`, it prefers the commit when other
    /// objects share the prefix, which libgit2 would call ambiguous.
    async fn resolve_short(&self, short: &str) -> Result<Oid, CheckoutError> {
        let mut cmd = self.command();
        cmd.args(["rev-parse", "--verify", "--end-of-options"])
            .arg(&format!("{short}^{{commit}}"));
        match git_runner::run(cmd, &self.local).await {
            Ok(done) => Oid::from_str(String::from_utf8_lossy(&done.stdout).trim())
                .map_err(|_| self.not_found(format!("commit {short}"))),
            Err(failure) if failure.stderr_contains("is ambiguous") => {
                Err(CheckoutError::AmbiguousCommit(short.to_string()))
            }
            Err(_) => Err(self.not_found(format!("commit {short}"))),
        }
    }

    async fn fetch_all_heads_and_tags(&self, why: &CheckoutError) -> Result<(), CheckoutError> {
        tracing::info!("{why}; fetching all branches and tags instead");
        // After a real clone, `fetch` adds no refspecs of its own: name them.
        let all = match self.plan.clone_flags.unmapped {
            Some(_) => vec![HEADS_REFSPEC.to_string(), TAGS_REFSPEC.to_string()],
            None => Vec::new(),
        };
        self.fetch(&all).await
    }

    /// The commit `target` names, now that the fetch is done.
    async fn resolve(&self, repo: &Repository, target: &Target) -> Result<Oid, CheckoutError> {
        match target {
            Target::Commit(oid) => repo
                .find_commit(*oid)
                .map(|c| c.id())
                .map_err(|_| self.not_found(format!("commit {oid}"))),
            Target::ShortCommit(short) => self.resolve_short(short).await,
            // Checked out by name instead (`checkout_named`).
            Target::Named(name) => Err(self.not_found(format!("ref {name}"))),
            Target::FetchHead | Target::DefaultBranch => {
                fetch_head(repo).ok_or_else(|| self.not_found(self.plan.target_refspecs.join(" ")))
            }
        }
    }

    /// The new repository in the emptied checkout directory: created in-process and configured
    /// like a clone, or, for clone flags the fast path cannot express, made by a real
    /// `git clone --reference` with those flags.
    async fn prepare(&self, mirror: Option<&Mirror>) -> Result<Repository, CheckoutError> {
        let dir = &self.plan.checkout_dir;
        if !self.plan.clean_checkout && holds_other_files(dir) {
            return Err(CheckoutError::NotACheckoutDir { path: dir.clone() });
        }
        empty_directory(dir).map_err(|e| self.prepare_error(e.to_string()))?;
        let repo = match &self.plan.clone_flags.unmapped {
            None => self.init_repository(mirror)?,
            Some(flag) => {
                tracing::info!("clone flag {flag} has no fast-path equivalent; running git clone");
                self.real_clone(mirror).await?
            }
        };
        if let Some(sparse) = &self.plan.sparse {
            let mut cmd = self.command();
            cmd.args(["sparse-checkout", "set"]).arg(match sparse.mode {
                SparseMode::Cone => "--cone",
                SparseMode::NoCone => "--no-cone",
            });
            cmd.args(sparse.paths.iter().map(String::as_str));
            self.git_step(Step::Sparse, cmd, &self.local).await?;
        }
        Ok(repo)
    }

    async fn real_clone(&self, mirror: Option<&Mirror>) -> Result<Repository, CheckoutError> {
        let reference = mirror.map(|m| m.real_path.display().to_string());
        let mut cmd = self.command();
        cmd.args(["clone", "--progress"])
            .args(self.plan.clone_flags.words.iter().map(String::as_str));
        if let Some(path) = &reference {
            cmd.args(["--reference", path]);
        }
        cmd.operands([self.plan.repo.as_git_arg(), "."]);
        self.git_step(Step::Clone, cmd, &self.network).await?;
        let fail = |e: &dyn std::fmt::Display| self.prepare_error(e.to_string());
        let repo = Repository::open(&self.plan.checkout_dir).map_err(|e| fail(&e))?;
        self.configure(&repo).map_err(|e| fail(&e))?;
        Ok(repo)
    }

    /// A new repository configured like a clone of the job's repository, borrowing from
    /// `mirror`.
    fn init_repository(&self, mirror: Option<&Mirror>) -> Result<Repository, CheckoutError> {
        let dir = &self.plan.checkout_dir;
        let fail = |e: &dyn std::fmt::Display| self.prepare_error(e.to_string());
        let mut options = RepositoryInitOptions::new();
        // No template: sample hooks are never run, and copying them costs time on every job.
        options.no_reinit(true).external_template(false);
        let repo = Repository::init_opts(dir, &options).map_err(|e| fail(&e))?;
        let flags = &self.plan.clone_flags;
        let set = || -> Result<(), git2::Error> {
            let mut config = repo.config()?.open_level(ConfigLevel::Local)?;
            config.set_str("remote.origin.url", self.plan.repo.as_git_arg())?;
            config.set_str("remote.origin.fetch", HEADS_REFSPEC)?;
            if flags.no_tags {
                config.set_str("remote.origin.tagOpt", "--no-tags")?;
            }
            if let Some(filter) = &flags.filter {
                config.set_bool("remote.origin.promisor", true)?;
                config.set_str("remote.origin.partialclonefilter", filter)?;
            }
            for (key, value) in &flags.config {
                config.set_str(key, value)?;
            }
            Ok(())
        };
        set().map_err(|e| fail(&e))?;
        self.configure(&repo).map_err(|e| fail(&e))?;
        if let Some(mirror) = mirror {
            let info = dir.join(".git/objects/info");
            std::fs::create_dir_all(&info).map_err(|e| fail(&e))?;
            let line = format!("{}\n", mirror.objects_dir().display());
            std::fs::write(info.join("alternates"), line).map_err(|e| fail(&e))?;
        }
        Ok(repo)
    }

    /// What every checkout gets, however its repository was made.
    fn configure(&self, repo: &Repository) -> Result<(), git2::Error> {
        let mut config = repo.config()?.open_level(ConfigLevel::Local)?;
        config.set_str("core.alternateRefsPrefixes", "refs/heads/ refs/tags/")?;
        config.set_i32("checkout.workers", checkout_workers())?;
        // A one-job checkout never benefits from gc; it would only compete with the build.
        config.set_i32("gc.auto", 0)?;
        config.set_bool("maintenance.auto", false)
    }

    /// Fetches `specs` first (so the first becomes `FETCH_HEAD`, as in the agent's fetch), then
    /// `origin/*` and tags as a clone has them. With the objects already borrowed from the
    /// mirror, git transfers refs only. After a real clone, which made those refs, only `specs`
    /// are fetched, as the agent does.
    ///
    /// The user's `BUILDKITE_GIT_FETCH_FLAGS` apply to `specs` only: in the agent the branches
    /// and tags come from the clone, which they never touch, so `--depth` must not shallow every
    /// `origin/*` and `-v` must not list every branch. They then take a fetch of their own,
    /// after the branches and tags, so that `FETCH_HEAD` is still the target.
    async fn fetch(&self, specs: &[String]) -> Result<(), CheckoutError> {
        let cloned = self.plan.clone_flags.unmapped.is_some();
        match (&self.plan.fetch_flags, cloned) {
            (_, true) if specs.is_empty() => Ok(()),
            (Some(flags), false) if !specs.is_empty() => {
                self.fetch_with(&[], &[], true).await?;
                self.fetch_with(specs, flags, false).await
            }
            (Some(_), false) => self.fetch_with(&[], &[], true).await,
            (flags, cloned) => {
                let flags = flags.as_deref().unwrap_or_default();
                self.fetch_with(specs, flags, !cloned).await
            }
        }
    }

    async fn fetch_with(
        &self,
        specs: &[String],
        user_flags: &[String],
        heads_and_tags: bool,
    ) -> Result<(), CheckoutError> {
        let mut cmd = self.command();
        // A clone keeps no reflogs for `origin/*` either; hundreds of branches would mean
        // hundreds of extra files.
        cmd.config("core.logAllRefUpdates", "false")
            // Quiet: one line per new branch would flood the job log on a repository with
            // thousands. Progress stays on: it is how a stall is told from a slow transfer.
            .args(["fetch", "--quiet", "--progress"]);
        if heads_and_tags {
            cmd.arg("--no-tags")
                .args(self.plan.clone_flags.fetch_args.iter().map(String::as_str));
        } else if specs.is_empty() {
            return Ok(());
        }
        cmd.args(user_flags.iter().map(String::as_str))
            .operands(["origin"])
            .args(specs.iter().map(String::as_str));
        if heads_and_tags {
            cmd.arg(HEADS_REFSPEC);
            if !self.plan.clone_flags.no_tags {
                cmd.arg(TAGS_REFSPEC);
            }
        }
        self.git_step(Step::Fetch, cmd, &self.network).await
    }

    /// The remote's default branch. The mirror's HEAD names it without a request; without a
    /// mirror the server is asked.
    async fn default_branch(&self, mirror: Option<&Mirror>) -> Option<String> {
        match mirror.and_then(Mirror::default_branch) {
            Some(branch) => Some(branch),
            None => self.remote_default_branch().await,
        }
    }

    /// `origin/HEAD` and a local branch for the remote's default branch, as a clone leaves them,
    /// for pipelines that ask git which branch is the default. Never fatal.
    fn set_default_branch(&self, repo: &Repository, branch: &str) {
        let tracking = format!("refs/remotes/origin/{branch}");
        let Ok(tip) = repo.refname_to_id(&tracking) else {
            return;
        };
        let local = format!("refs/heads/{branch}");
        let set = || -> Result<(), git2::Error> {
            repo.reference_symbolic("refs/remotes/origin/HEAD", &tracking, true, "clone")?;
            if repo.find_reference(&local).is_err() {
                repo.reference(&local, tip, false, "clone")?;
                let mut config = repo.config()?.open_level(ConfigLevel::Local)?;
                config.set_str(&format!("branch.{branch}.remote"), "origin")?;
                config.set_str(&format!("branch.{branch}.merge"), &local)?;
            }
            Ok(())
        };
        if let Err(e) = set() {
            tracing::warn!("could not set origin/HEAD to {branch}: {e}");
        }
    }

    async fn remote_default_branch(&self) -> Option<String> {
        let mut cmd = self.command();
        cmd.args(["ls-remote", "--symref"])
            .operands(["origin", "HEAD"]);
        let out = git_runner::run(cmd, &self.network).await.ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("ref: refs/heads/")?.strip_suffix("\tHEAD"))
            .map(str::to_string)
    }

    async fn checkout(&self, commit: Oid) -> Result<(), CheckoutError> {
        let mut cmd = self.command();
        cmd.config("advice.detachedHead", "false")
            .arg("checkout")
            .args(self.plan.checkout_flags.iter().map(String::as_str))
            // A validated hex object id, then `--`: it can only be read as the commit.
            .args([commit.to_string().as_str(), "--"]);
        self.git_step(Step::Checkout, cmd, &self.local).await
    }

    /// What `clone --dissociate` does: copy every borrowed object into the checkout's own
    /// store, then stop borrowing.
    async fn dissociate(&self) -> Result<(), CheckoutError> {
        let mut cmd = self.command();
        cmd.args(["repack", "-a", "-d", "-q"]);
        self.git_step(Step::Dissociate, cmd, &self.local).await?;
        let alternates = self.plan.checkout_dir.join(".git/objects/info/alternates");
        std::fs::remove_file(&alternates).map_err(|e| self.prepare_error(e.to_string()))
    }

    /// LFS files, after a checkout that left pointers in their place: smudging is off during
    /// it, as in the agent, so LFS trouble shows as its own step. In a sparse checkout only the
    /// sparse working tree's files are fetched and checked out, as the agent does: cone
    /// directories scope both, no-cone patterns (which `--include` cannot express) scope the
    /// checkout to the LFS files present in the working tree, so excluded files stay out.
    async fn lfs_checkout(&self) -> Result<(), CheckoutError> {
        let mut install = self.command();
        install.args(["lfs", "install", "--local"]);
        self.git_step(Step::Lfs, install, &self.local).await?;
        let sparse = self.plan.sparse.as_ref();
        let cone = sparse.filter(|s| s.mode == SparseMode::Cone);
        let mut fetch = self.command();
        fetch.args(["lfs", "fetch"]);
        if let Some(cone) = cone {
            fetch.arg(&format!("--include={}", cone.paths.join(",")));
        }
        self.git_step(Step::Lfs, fetch, &self.network).await?;
        let paths = match (sparse, cone) {
            (None, _) => None,
            (Some(_), Some(cone)) => Some(cone.paths.clone()),
            (Some(_), None) => Some(self.materialized_lfs_paths().await?),
        };
        let Some(paths) = paths else {
            let mut checkout = self.command();
            checkout.args(["lfs", "checkout"]);
            return self.git_step(Step::Lfs, checkout, &self.local).await;
        };
        for batch in paths.chunks(LFS_CHECKOUT_BATCH) {
            let mut checkout = self.command();
            checkout
                .args(["lfs", "checkout"])
                .operands(batch.iter().map(String::as_str));
            self.git_step(Step::Lfs, checkout, &self.local).await?;
        }
        Ok(())
    }

    /// LFS files in the sparse working tree: those `git lfs ls-files` lists that are not marked
    /// skip-worktree (the agent's `materializedLFSPaths`).
    async fn materialized_lfs_paths(&self) -> Result<Vec<String>, CheckoutError> {
        let listed = |args: &'static [&'static str]| async move {
            let mut cmd = self.command();
            cmd.args(args.iter().copied());
            git_runner::run(cmd, &self.local)
                .await
                .map(|done| String::from_utf8_lossy(&done.stdout).into_owned())
                .map_err(|failure| CheckoutError::Git {
                    step: Step::Lfs,
                    repo: self.plan.repo.redacted(),
                    kind: classify(&failure),
                    failure,
                })
        };
        let index = listed(&["ls-files", "-t", "-z"]).await?;
        let skipped: std::collections::HashSet<&str> = index
            .split('\0')
            .filter_map(|e| e.strip_prefix("S "))
            .collect();
        let lfs = listed(&["lfs", "ls-files", "-n"]).await?;
        Ok(lfs
            .lines()
            .filter(|p| !p.is_empty() && !skipped.contains(p))
            .map(String::from)
            .collect())
    }

    /// A git command in the checkout, with the job's SSH and LFS settings.
    pub(crate) fn command(&self) -> GitCommand {
        let mut cmd = self.git.command(&self.plan.checkout_dir);
        if let Some((key, value)) = self.ssh.env() {
            cmd.env(key, value);
        }
        if self.plan.lfs {
            cmd.env("GIT_LFS_SKIP_SMUDGE", "1");
        }
        cmd
    }

    pub(crate) async fn git_step(
        &self,
        step: Step,
        cmd: GitCommand,
        options: &RunOptions,
    ) -> Result<(), CheckoutError> {
        git_runner::run(cmd, options)
            .await
            .map(drop)
            .map_err(|failure| CheckoutError::Git {
                step,
                repo: self.plan.repo.redacted(),
                kind: classify(&failure),
                failure,
            })
    }

    pub(crate) fn not_found(&self, what: String) -> CheckoutError {
        CheckoutError::NotFound {
            what,
            repo: self.plan.repo.redacted(),
        }
    }

    pub(crate) fn prepare_error(&self, detail: String) -> CheckoutError {
        CheckoutError::Prepare {
            path: self.plan.checkout_dir.clone(),
            detail,
        }
    }
}

async fn timed<T, E>(
    step: impl std::future::Future<Output = Result<T, E>>,
) -> Result<(T, Duration), E> {
    let start = Instant::now();
    step.await.map(|v| (v, start.elapsed()))
}

/// Runs two steps concurrently; the first failure cancels the other (its git is killed).
async fn try_join_timed<A, B, E>(
    a: impl std::future::Future<Output = Result<A, E>>,
    b: impl std::future::Future<Output = Result<B, E>>,
) -> Result<(A, Duration, B, Duration), E> {
    let ((a, da), (b, db)) = tokio::try_join!(timed(a), timed(b))?;
    Ok((a, da, b, db))
}

/// Parallel checkout workers: four per core. A worker alternates between inflating blobs (CPU)
/// and creating files (syscalls, I/O waits), so more workers than cores keep the cores busy:
/// on the benchmark's 20,000-file tree with 2 cores, 8 workers check out in ~350 ms against
/// ~400 ms for git's one-per-core (`docs/benchmarks.md`).
fn checkout_workers() -> i32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores * 4).clamp(4, 32) as i32
}

/// Whether `dir` has entries but no `.git`: not an earlier checkout, maybe not ours at all.
fn holds_other_files(dir: &Path) -> bool {
    let has_entries = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
    has_entries && !dir.join(".git").exists()
}

/// Removes everything inside `dir` but keeps `dir`: the agent created it, and its inode may be
/// someone's cwd.
fn empty_directory(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for entry in std::fs::read_dir(dir)? {
        let path: PathBuf = entry?.path();
        if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// The commit the first line of `FETCH_HEAD` names (a tag is peeled), as `git rev-parse
/// FETCH_HEAD^{commit}` would give. libgit2 does not read `FETCH_HEAD` as a reference.
fn fetch_head(repo: &Repository) -> Option<Oid> {
    let text = std::fs::read_to_string(repo.path().join("FETCH_HEAD")).ok()?;
    let oid = Oid::from_str(text.lines().next()?.split('\t').next()?).ok()?;
    repo.find_object(oid, None)
        .ok()?
        .peel_to_commit()
        .ok()
        .map(|c| c.id())
}

/// Bytes in the checkout's own object store: what the fetch wrote beyond the mirror.
fn object_bytes(objects: &Path) -> u64 {
    walkdir::WalkDir::new(objects)
        .into_iter()
        .filter_entry(|e| e.file_name() != "info")
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}
