//! Buildkite agent hooks for stateless pods. `checkout-hook` replaces the agent's default
//! checkout with one that borrows objects from a read-only mirror volume; this library is all of
//! it but the thin `main`.

pub mod checkout;
pub mod checkout_plan;
pub mod error;
pub mod git_flags;
pub mod job_api;
pub mod logging;
pub mod mirror_select;
pub mod settings;
pub mod ssh;
mod submodules;
mod summary;

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use stateless_core::git_command::Git;
use tokio::signal::unix::{signal, Signal, SignalKind};

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
    let ssh = SshSetup::prepare(&plan.ssh)?;
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

/// SIGTERM and SIGINT, caught from before any git starts: the agent cancels a job by signalling
/// the hook, and a hook that died by the signal's default action would leave its git children
/// (in their own process groups) running.
pub struct Interrupts {
    term: Signal,
    int: Signal,
}

impl Interrupts {
    pub fn install() -> std::io::Result<Interrupts> {
        Ok(Interrupts {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The number of the first signal received.
    pub async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.term.recv() => SignalKind::terminate().as_raw_value(),
            _ = self.int.recv() => SignalKind::interrupt().as_raw_value(),
        }
    }
}

/// Death by signal N is reported as 128+N, like a shell.
pub fn signal_exit_code(signal: i32) -> ExitCode {
    ExitCode::from(128u8.saturating_add(signal as u8))
}
