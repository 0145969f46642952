//! Buildkite agent hooks for stateless pods. `checkout-hook` replaces the agent's default
//! checkout with one that borrows objects from a read-only mirror volume; this library is all of
//! it but the thin `main`.

pub mod checkout;
pub mod checkout_plan;
mod commit_verification;
pub mod error;
pub mod git_flags;
pub mod job_api;
pub mod logging;
pub mod mirror_select;
mod remote_mirror;
pub mod settings;
pub mod ssh;
mod submodules;
mod summary;

use std::path::Path;
use std::time::Instant;

use stateless_core::git_command::Git;

use crate::checkout::Checkout;
use crate::checkout_plan::{CheckoutPlan, ConfigError};
use crate::error::CheckoutError;
use crate::job_api::Agent;
use crate::settings::Settings;
use crate::ssh::SshSetup;

/// Plans, checks out, records, and reports back to the agent.
pub async fn run(settings: Settings) -> Result<(), CheckoutError> {
    if settings.skip_checkout {
        tracing::info!("BUILDKITE_SKIP_CHECKOUT is set: not checking out");
        return Ok(());
    }
    let Some(plan) = CheckoutPlan::from_settings(settings)? else {
        tracing::info!("BUILDKITE_REPO is empty: nothing to check out");
        return Ok(());
    };
    let started = Instant::now();
    let git = Git::locate()?;
    if plan.lfs && !lfs_installed(&git).await {
        return Err(ConfigError::LfsMissing.into());
    }
    let ssh = SshSetup::prepare(&git, &plan.ssh)?;
    tracing::info!(
        "~~~ :git: Checking out {} with the mirror volume",
        plan.repo
    );
    let choice = mirror_select::choose(plan.mirrors_root.as_deref(), &plan.repo);
    let inspected = started.elapsed();
    match (&choice.mirror, &choice.miss_reason) {
        (Some(m), _) => tracing::info!(
            "using mirror {} ({})",
            m.path.display(),
            m.real_path.display()
        ),
        (None, Some(why)) => tracing::warn!("checking out without a mirror: {why}"),
        (None, None) => {}
    }
    let outcome = Checkout::new(&git, &plan, &ssh)
        .run(choice.mirror.as_ref())
        .await;
    let record = summary::record(&plan, &choice, &outcome, inspected, started.elapsed());
    if let Err(e) = record.write(&plan.record_path) {
        tracing::warn!(
            "could not write the checkout record to {}: {e}",
            plan.record_path.display()
        );
    }
    let attempt = outcome.result?;
    let commit = attempt.commit.to_string();
    // The real path, which the alternates name: a container that mounts BUILDKITE_REPO_MIRROR
    // (the docker-compose plugin does) must see the generation this checkout borrows from.
    let mirror_path = choice
        .mirror
        .as_ref()
        .filter(|_| outcome.fallback_reason.is_none())
        .map(|m| m.real_path.display().to_string())
        .unwrap_or_default();
    let agent = Agent {
        bin: &plan.agent_bin,
    };
    let exports = [
        ("BUILDKITE_REPO_MIRROR", mirror_path.as_str()),
        ("BUILDKITE_COMMIT", commit.as_str()),
    ];
    // Independent calls to the agent: run them side by side.
    tokio::join!(
        agent.export(&exports),
        agent.send_commit_metadata(&git, &plan.checkout_dir, &commit),
    );
    tracing::info!("{}", summary::line(&record));
    Ok(())
}

/// Whether `git lfs` runs: checked before anything else, so a missing git-lfs fails the job at
/// once with the fix, not after a full checkout.
async fn lfs_installed(git: &Git) -> bool {
    let mut cmd = git.command(Path::new("."));
    cmd.args(["lfs", "version"]);
    stateless_core::git_runner::run(cmd, &Default::default())
        .await
        .is_ok()
}
