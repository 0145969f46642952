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
use stateless_core::git_command::Git;
use stateless_core::git_runner::{self, RunOptions};
use stateless_core::mirror_inspect::Mirror;
use stateless_core::repo_url::Redactor;

use crate::checkout_plan::{CheckoutPlan, Target};
use crate::error::{classify, CheckoutError, FailureKind, Step};
use crate::settings::MirrorMode;

/// What a clone fetches: every branch as `origin/*`, and every tag.
const HEADS_REFSPEC: &str = "+refs/heads/*:refs/remotes/origin/*";
const TAGS_REFSPEC: &str = "+refs/tags/*:refs/tags/*";

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
    plan: &'a CheckoutPlan,
    local: RunOptions,
    network: RunOptions,
}

impl<'a> Checkout<'a> {
    pub fn new(git: &'a Git, plan: &'a CheckoutPlan) -> Self {
        let local = RunOptions {
            stall_timeout: None,
            redactor: Redactor::new(plan.repo.secrets()),
        };
        let network = RunOptions {
            stall_timeout: Some(plan.stall_timeout),
            ..local.clone()
        };
        Checkout {
            git,
            plan,
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
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.plan.retry_delay)
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(self.plan.attempts as usize - 1);
        let result = (|| async {
            attempts.set(attempts.get() + 1);
            let with_mirror = mirror.filter(|_| abandoned.borrow().is_none());
            let Some(m) = with_mirror else {
                return self.timed_attempt(None).await;
            };
            match self.timed_attempt(Some(m)).await {
                Err(e) if e.blames_mirror() => {
                    tracing::warn!(
                        "the checkout failed with the mirror ({e}); redoing it without the mirror"
                    );
                    *abandoned.borrow_mut() = Some(e.to_string());
                    self.timed_attempt(None).await
                }
                other => other,
            }
        })
        .retry(backoff)
        .sleep(tokio::time::sleep)
        .when(CheckoutError::is_retryable)
        .notify(|e, wait| {
            tracing::warn!(
                "checkout attempt {}/{} failed: {e}; retrying in {:.1}s",
                attempts.get(),
                self.plan.attempts,
                wait.as_secs_f64()
            )
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

    async fn timed_attempt(&self, mirror: Option<&Mirror>) -> Result<Attempt, CheckoutError> {
        match self.plan.attempt_timeout {
            Some(limit) => tokio::time::timeout(limit, self.attempt(mirror))
                .await
                .unwrap_or(Err(CheckoutError::TimedOut { after: limit })),
            None => self.attempt(mirror).await,
        }
    }

    async fn attempt(&self, mirror: Option<&Mirror>) -> Result<Attempt, CheckoutError> {
        let dir = &self.plan.checkout_dir;
        let repo = self.init_repository(mirror)?;
        let (commit, had_commit, fetch, checkout) = match &self.plan.target {
            Target::Commit(oid) if mirror.is_some_and(|m| m.has_commit(*oid)) => {
                let ((), fetch, (), checkout) =
                    try_join_timed(self.fetch(None), self.checkout(*oid)).await?;
                (*oid, true, fetch, checkout)
            }
            Target::Commit(oid) => {
                let ((), fetch) = timed(self.fetch_commit(&repo, *oid)).await?;
                let ((), checkout) = timed(self.checkout(*oid)).await?;
                (*oid, false, fetch, checkout)
            }
            Target::BranchHead(branch) => {
                let ((), fetch) = timed(self.fetch(None)).await?;
                let oid = self.branch_tip(&repo, branch)?;
                let ((), checkout) = timed(self.checkout(oid)).await?;
                (oid, false, fetch, checkout)
            }
        };
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

    /// An empty checkout directory holding a new repository configured like a clone of the
    /// job's repository, borrowing from `mirror`.
    fn init_repository(&self, mirror: Option<&Mirror>) -> Result<Repository, CheckoutError> {
        let dir = &self.plan.checkout_dir;
        let fail = |e: &dyn std::fmt::Display| self.prepare_error(e.to_string());
        if holds_other_files(dir) {
            return Err(CheckoutError::NotACheckoutDir { path: dir.clone() });
        }
        empty_directory(dir).map_err(|e| fail(&e))?;
        let mut options = RepositoryInitOptions::new();
        // No template: sample hooks are never run, and copying them costs time on every job.
        options.no_reinit(true).external_template(false);
        let repo = Repository::init_opts(dir, &options).map_err(|e| fail(&e))?;
        let set = || -> Result<(), git2::Error> {
            let mut config = repo.config()?.open_level(ConfigLevel::Local)?;
            config.set_str("remote.origin.url", self.plan.repo.as_git_arg())?;
            config.set_str("remote.origin.fetch", HEADS_REFSPEC)?;
            config.set_str("core.alternateRefsPrefixes", "refs/heads/ refs/tags/")?;
            config.set_i32("checkout.workers", checkout_workers())?;
            // A one-job checkout never benefits from gc; it would only compete with the build.
            config.set_i32("gc.auto", 0)?;
            config.set_bool("maintenance.auto", false)?;
            Ok(())
        };
        set().map_err(|e| fail(&e))?;
        if let Some(mirror) = mirror {
            let info = dir.join(".git/objects/info");
            std::fs::create_dir_all(&info).map_err(|e| fail(&e))?;
            let line = format!("{}\n", mirror.objects_dir().display());
            std::fs::write(info.join("alternates"), line).map_err(|e| fail(&e))?;
        }
        Ok(repo)
    }

    /// Updates `origin/*` and tags as a clone would, plus `commit` when given. With the
    /// objects already borrowed from the mirror, git transfers refs only.
    async fn fetch(&self, commit: Option<Oid>) -> Result<(), CheckoutError> {
        let sha = commit.map(|c| c.to_string());
        let mut cmd = self.git.command(&self.plan.checkout_dir);
        // A clone keeps no reflogs for `origin/*` either; hundreds of branches would mean
        // hundreds of extra files.
        cmd.config("core.logAllRefUpdates", "false")
            // Quiet: one line per new branch would flood the job log on a repository with
            // thousands. Progress stays on: it is how a stall is told from a slow transfer.
            .args(["fetch", "--quiet", "--progress", "--no-tags"])
            .operands(["origin"])
            .args(sha.as_deref())
            .args([HEADS_REFSPEC, TAGS_REFSPEC]);
        self.git_step(Step::Fetch, cmd, &self.network).await
    }

    /// Fetches `commit` with the refs; when the server will not serve it by id, fetches all
    /// branches and tags and looks for it there, as the agent's default checkout does.
    async fn fetch_commit(&self, repo: &Repository, commit: Oid) -> Result<(), CheckoutError> {
        match self.fetch(Some(commit)).await {
            Err(e) if e.kind() == FailureKind::NotFound => {
                tracing::info!(
                    "the server does not serve {commit} by id; fetching all branches and tags"
                );
                self.fetch(None).await?;
                match repo.find_commit(commit) {
                    Ok(_) => Ok(()),
                    Err(_) => Err(self.not_found(format!("commit {commit}"))),
                }
            }
            other => other,
        }
    }

    fn branch_tip(&self, repo: &Repository, branch: &str) -> Result<Oid, CheckoutError> {
        repo.find_reference(&format!("refs/remotes/origin/{branch}"))
            .and_then(|r| r.peel_to_commit())
            .map(|c| c.id())
            .map_err(|_| self.not_found(format!("branch {branch}")))
    }

    async fn checkout(&self, commit: Oid) -> Result<(), CheckoutError> {
        let mut cmd = self.git.command(&self.plan.checkout_dir);
        cmd.config("advice.detachedHead", "false")
            .args(["checkout", "--force", "--detach"])
            // A validated hex object id: it cannot be read as an option.
            .arg(&commit.to_string());
        self.git_step(Step::Checkout, cmd, &self.local).await
    }

    /// What `clone --dissociate` does: copy every borrowed object into the checkout's own
    /// store, then stop borrowing.
    async fn dissociate(&self) -> Result<(), CheckoutError> {
        let mut cmd = self.git.command(&self.plan.checkout_dir);
        cmd.args(["repack", "-a", "-d", "-q"]);
        self.git_step(Step::Dissociate, cmd, &self.local).await?;
        let alternates = self.plan.checkout_dir.join(".git/objects/info/alternates");
        std::fs::remove_file(&alternates).map_err(|e| self.prepare_error(e.to_string()))
    }

    async fn git_step(
        &self,
        step: Step,
        cmd: stateless_core::git_command::GitCommand,
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

    fn not_found(&self, what: String) -> CheckoutError {
        CheckoutError::NotFound {
            what,
            repo: self.plan.repo.redacted(),
        }
    }

    fn prepare_error(&self, detail: String) -> CheckoutError {
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
