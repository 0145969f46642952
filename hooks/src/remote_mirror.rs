//! `BUILDKITE_GIT_REMOTE_MIRROR_URL` (the pipeline's `clone_mirror_url`, agent 3.136+): on the
//! first attempt, fetch the commit from an HTTPS mirror before the repository itself, so that a
//! commit the mirror volume lacks still comes from somewhere close. Modelled on the agent's
//! `internal/job/checkout_remote_mirror.go` (v3.137) for a fresh checkout: the same eligibility
//! (see `checkout_plan::remote_mirror`), 30 s for the mirror, the agent's credential helper and
//! git settings, and its one log line. Whatever happens there, the fetch from BUILDKITE_REPO
//! follows and supplies what the mirror did not.

use std::time::{Duration, Instant};

use git2::Oid;
use stateless_core::failure_kind::{classify, FailureKind};
use stateless_core::git_runner::{self, RunOptions};
use stateless_core::repo_url::Redactor;

use crate::checkout::Checkout;
use crate::checkout_plan::RemoteMirror;

/// The agent's `remoteMirrorProbeTimeout`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

impl Checkout<'_> {
    pub(crate) async fn fetch_from_remote_mirror(&self, commit: Oid) {
        let url = match &self.plan.remote_mirror {
            RemoteMirror::Skipped("no-url") => return,
            RemoteMirror::Skipped(reason) => {
                tracing::info!(
                    "Remote Git mirror: outcome=skipped site=fresh-clone skip_reason={reason}"
                );
                return;
            }
            RemoteMirror::Try(url) => url,
        };
        let started = Instant::now();
        // The agent's credential helper, quoted as the agent quotes it: the mirror is
        // Buildkite's, and the agent answers for its credentials.
        let agent = self.plan.agent_bin.display().to_string();
        let helper = format!("!'{}' git-credentials-helper", agent.replace('\'', r"'\''"));
        let mut cmd = self.command();
        cmd.config("credential.useHttpPath", "true")
            .config("credential.helper", "")
            .config("credential.helper", &helper)
            .config("http.extraHeader", "")
            .config("protocol.version", "2")
            .config("http.lowSpeedLimit", "1000")
            .config("http.lowSpeedTime", "60")
            .args(["fetch", "--quiet", "--no-tags", "--no-write-fetch-head"])
            .operands([url.as_git_arg(), commit.to_string().as_str()]);
        let options = RunOptions {
            redactor: Redactor::new(url.secrets()),
            ..RunOptions::default()
        };
        let fetched = tokio::time::timeout(PROBE_TIMEOUT, git_runner::run(cmd, &options)).await;
        let has_commit = || {
            git2::Repository::open(&self.plan.checkout_dir)
                .is_ok_and(|repo| repo.find_commit(commit).is_ok())
        };
        let outcome = match fetched {
            Err(_) => "timeout",
            Ok(Err(failure)) if classify(&failure) == FailureKind::NotFound => "miss",
            Ok(Err(failure)) => {
                tracing::info!("the remote mirror failed: {failure}");
                "error"
            }
            Ok(Ok(_)) if has_commit() => "hit",
            Ok(Ok(_)) => "miss",
        };
        tracing::info!(
            "Remote Git mirror: outcome={outcome} site=fresh-clone duration={}ms url={}",
            started.elapsed().as_millis(),
            url.redacted()
        );
    }
}
