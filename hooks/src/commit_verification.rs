//! `BUILDKITE_GIT_COMMIT_VERIFICATION`: is the commit on the build's branch? Modelled on the
//! agent's `checkCommitOnBranch` and `verifyCommit` (internal/job/commit_verification.go,
//! v3.137): fetch the branch tip into a ref of its own, ask `merge-base --is-ancestor`, and
//! deepen a shallow checkout before trusting a "no". Only a definite "no" under `strict` fails
//! the checkout; a check that cannot be made only warns, in every mode, as in the agent.

use git2::Oid;
use stateless_core::git_runner::{self, GitFailure};

use crate::checkout::Checkout;
use crate::checkout_plan::Verification;
use crate::error::CheckoutError;

/// Where the branch tip is fetched to, and deleted from afterwards (the agent's name).
const BRANCH_TIP_REF: &str = "refs/buildkite-agent/commit-verification-branch-tip";
const TIP_FETCH_TRIES: u32 = 3;

/// Why a check could not say yes.
enum Unverified {
    NotOnBranch,
    Unavailable(String),
}

impl Checkout<'_> {
    pub(crate) async fn verify_commit(&self, commit: Oid) -> Result<(), CheckoutError> {
        let (branch, strict) = match &self.plan.verification {
            Verification::Off => return Ok(()),
            Verification::Skipped(why) => {
                tracing::info!("Skipping commit verification: {why}");
                return Ok(());
            }
            Verification::Check { branch, strict } => (branch, *strict),
        };
        tracing::info!("Verifying commit {commit} is on branch {branch:?}");
        let result = self.commit_on_branch(commit, branch).await;
        let mut delete = self.command();
        delete.args(["update-ref", "-d", BRANCH_TIP_REF]);
        let _ = git_runner::run(delete, &self.local).await;
        match result {
            Ok(()) => Ok(()),
            Err(Unverified::NotOnBranch) if strict => Err(CheckoutError::NotOnBranch {
                commit: commit.to_string(),
                branch: branch.clone(),
            }),
            Err(Unverified::NotOnBranch) => {
                tracing::warn!(
                    "commit verification failed: commit {commit} is not on branch {branch:?}"
                );
                Ok(())
            }
            Err(Unverified::Unavailable(why)) => {
                tracing::warn!(
                    "commit verification unavailable: {why}; the job goes on unverified"
                );
                Ok(())
            }
        }
    }

    async fn commit_on_branch(&self, commit: Oid, branch: &str) -> Result<(), Unverified> {
        let unavailable = |why: String| Unverified::Unavailable(why);
        // One argument, never split: a branch name may hold quotes or spaces.
        let refspec = format!("+refs/heads/{branch}:{BRANCH_TIP_REF}");
        if !git2::Reference::is_valid_name(&format!("refs/heads/{branch}")) {
            return Err(unavailable(format!(
                "branch {branch:?} is not a valid branch name"
            )));
        }
        let mut last = None;
        for n in 0..TIP_FETCH_TRIES {
            if n > 0 {
                tokio::time::sleep(self.plan.retry_delay * n).await;
            }
            match self.fetch_branch_tip(&refspec, None).await {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            return Err(unavailable(format!(
                "unable to fetch branch {branch:?}: {e}"
            )));
        }
        let repo = git2::Repository::open(&self.plan.checkout_dir)
            .map_err(|e| unavailable(e.to_string()))?;
        let tip = repo
            .refname_to_id(BRANCH_TIP_REF)
            .map_err(|e| unavailable(format!("unable to resolve branch {branch:?}: {e}")))?;
        for deepen in [None, Some("--deepen=50"), Some("--unshallow")] {
            if let Some(flag) = deepen {
                tracing::info!("Deepening checkout to verify commit ({flag})...");
                self.fetch_branch_tip(&refspec, Some(flag))
                    .await
                    .map_err(|e| unavailable(e.to_string()))?;
            }
            let mut cmd = self.command();
            cmd.args(["merge-base", "--is-ancestor"])
                .args([commit.to_string().as_str(), tip.to_string().as_str()]);
            let no = match git_runner::run(cmd, &self.local).await {
                Ok(_) => return Ok(()),
                Err(GitFailure::Exited { status, .. }) => status.code() == Some(1),
                Err(e) => return Err(unavailable(e.to_string())),
            };
            // A shallow history can hide the connection: deepen before believing a "no".
            if !repo.is_shallow() {
                return Err(match no {
                    true => Unverified::NotOnBranch,
                    false => unavailable(format!(
                        "unable to verify commit {commit} on branch {branch:?}"
                    )),
                });
            }
        }
        Err(unavailable(format!(
            "unable to verify commit {commit} on branch {branch:?} after exhausting fetch strategies"
        )))
    }

    /// The branch tip fetch, with the user's fetch flags minus those that would leave the ref
    /// unwritten or fight the deepening (the agent strips the same).
    async fn fetch_branch_tip(
        &self,
        refspec: &str,
        deepen: Option<&str>,
    ) -> Result<(), CheckoutError> {
        let mut cmd = self.command();
        cmd.config("core.logAllRefUpdates", "false")
            .args(["fetch", "--quiet"]);
        let flags = self.plan.fetch_flags.as_deref().unwrap_or_default();
        cmd.args(verification_fetch_flags(flags).iter().map(String::as_str));
        cmd.args(deepen).operands(["origin", refspec]);
        self.git_step(crate::error::Step::Fetch, cmd, &self.network)
            .await
    }
}

/// The user's fetch flags without `--dry-run`, `--prefetch`, `--negotiate-only` (the ref would
/// not be written) and `--depth`/`--deepen`/`--shallow-*`/`--unshallow` (git refuses them with
/// the deepening), including the abbreviations git accepts, as the agent's
/// `stripRefSuppressingFetchFlags` and `stripShallowFetchFlags` do.
fn verification_fetch_flags(flags: &[String]) -> Vec<String> {
    const DROPPED: &[&str] = &["dry-run", "prefetch", "negotiate-only", "unshallow"];
    const WITH_VALUE: &[&str] = &["depth", "deepen", "shallow-since", "shallow-exclude"];
    let mut kept = Vec::new();
    let mut words = flags.iter();
    while let Some(word) = words.next() {
        let Some(long) = word.strip_prefix("--").filter(|l| !l.is_empty()) else {
            kept.push(word.clone());
            continue;
        };
        let (name, inline) = match long.split_once('=') {
            Some((name, _)) => (name, true),
            None => (long, false),
        };
        if DROPPED.iter().any(|m| m.starts_with(name)) {
            continue;
        }
        if WITH_VALUE.iter().any(|m| m.starts_with(name)) {
            if !inline {
                words.next();
            }
            continue;
        }
        kept.push(word.clone());
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip(flags: &str) -> Vec<String> {
        verification_fetch_flags(&shell_words::split(flags).unwrap())
    }

    #[test]
    fn ref_suppressing_and_shallow_flags_are_dropped_with_their_values() {
        assert_eq!(
            strip("-v --prune --depth 1 --dept=2 --deepen=3 --dry --prefe --unsh --shallow-since 2020-01-01 --upload-pack=x"),
            ["-v", "--prune", "--upload-pack=x"]
        );
        assert_eq!(strip("--negotiation-tip=x"), ["--negotiation-tip=x"]);
    }
}
