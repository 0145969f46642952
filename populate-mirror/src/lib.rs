//! populate-mirror: builds and refreshes the mirror volume checkout-hook borrows from. This
//! library is all of it but the thin `main`; `docs/populate-mirror.md` describes the volume.

pub mod logging;
pub mod refresh;
pub mod repo_list;
pub mod settings;
mod submodules;
pub mod volume;

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backon::{ExponentialBuilder, Retryable};
use futures_util::future::join_all;
use stateless_core::git_command::{Git, GitNotFound};
use stateless_core::manifest::{Manifest, ManifestEntry};
use stateless_core::repo_url::RepoUrl;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::refresh::{Change, Job, Options, RefreshError, Refreshed, Refresher};
use crate::repo_list::RepoListError;
use crate::settings::{Layout, Settings};
use crate::volume::{Volume, VolumeError};

/// How deep submodules of submodules are followed.
const MAX_SUBMODULE_DEPTH: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum PopulateError {
    #[error(transparent)]
    Repos(#[from] RepoListError),
    #[error(transparent)]
    GitNotFound(#[from] GitNotFound),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("cannot write the manifest in {}: {source}; check free space on the volume", root.display())]
    Manifest {
        root: PathBuf,
        source: std::io::Error,
    },
}

/// How many repositories were refreshed and how many failed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub succeeded: usize,
    pub failed: usize,
}

impl PopulateError {
    /// Whether the next round would meet it again: the repository list cannot be read, or git
    /// is missing. A held lock, a full volume or a failing server may pass.
    pub fn is_lasting(&self) -> bool {
        matches!(
            self,
            PopulateError::Repos(_) | PopulateError::GitNotFound(_)
        )
    }
}

/// `--every`: a [`run`] each `interval` (give or take a tenth) for as long as the process lives;
/// returns only an error no later round could get past. Each round is one log line with its
/// figures.
pub async fn run_every(settings: Settings, interval: Duration) -> PopulateError {
    let mut round: u64 = 0;
    loop {
        round += 1;
        let started = Instant::now();
        let result = run(settings.clone()).await;
        let duration_ms = started.elapsed().as_millis() as u64;
        let next = jittered(interval);
        let next_in_s = next.as_secs();
        match result {
            Ok(Summary { succeeded, failed: 0 }) => tracing::info!(
                round,
                succeeded,
                failed = 0,
                duration_ms,
                next_in_s,
                "round {round}: {succeeded} repositories refreshed; the next in {next_in_s}s"
            ),
            Ok(Summary { succeeded, failed }) => tracing::warn!(
                round,
                succeeded,
                failed,
                duration_ms,
                next_in_s,
                "round {round}: {succeeded} repositories refreshed, {failed} failed (logged above); the next in {next_in_s}s"
            ),
            Err(e) if e.is_lasting() => return e,
            Err(e) => tracing::warn!(
                round,
                duration_ms,
                next_in_s,
                "round {round} failed: {e}; trying again in {next_in_s}s"
            ),
        }
        tokio::time::sleep(next).await;
    }
}

/// `interval` × a factor in [0.9, 1.1), from the clock's nanoseconds: nodes whose pods started
/// together drift apart instead of all fetching from the git server at once.
fn jittered(interval: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    interval.mul_f64(0.9 + 0.2 * f64::from(nanos) / 1e9)
}

/// Refreshes every repository (and the submodules they name), concurrently up to the bound; one
/// failing repository does not stop the others. The manifest is rewritten after each round.
pub async fn run(settings: Settings) -> Result<Summary, PopulateError> {
    let repos = repo_list::collect(&settings.urls, settings.repos_file.as_deref())?;
    let git = Git::locate()?;
    let volume = Volume::open(&settings.root)?;
    let options = Options {
        pull_requests: settings.pull_requests,
        fsck: settings.fsck,
        submodules: settings.submodules,
        stall_timeout: settings.stall_timeout,
        progress_every: settings.progress_interval,
        keep_generations: settings.keep_generations,
        retain_for: settings.retain_for,
    };
    let refresher = Refresher::new(&git, &volume, &options);
    let mut manifest = Manifest::load(&settings.root)
        .unwrap_or_else(|e| {
            tracing::warn!("rewriting the manifest: {e}");
            None
        })
        .unwrap_or_else(|| Manifest {
            version: 1,
            generated_at: 0,
            tool_version: String::new(),
            repositories: Vec::new(),
        });
    let permits = Semaphore::new(settings.concurrency.into());
    let mut known: Vec<String> = repos.iter().map(RepoUrl::identity).collect();
    let mut summary = Summary::default();
    let mut round = repos;
    for _ in 0..=MAX_SUBMODULE_DEPTH {
        if round.is_empty() {
            break;
        }
        let jobs: Vec<Job> = round
            .into_iter()
            .map(|url| job(url, settings.layout))
            .collect();
        let results = join_all(jobs.iter().map(|job| async {
            let _permit = permits.acquire().await;
            let started = Instant::now();
            let result = refresh_with_retries(&refresher, job, &settings).await;
            (result, started.elapsed().as_millis() as u64)
        }))
        .await;
        let mut next = Vec::new();
        for (job, (result, took_ms)) in jobs.iter().zip(results) {
            match &result {
                Ok(refreshed) => {
                    summary.succeeded += 1;
                    stock_alias(&volume, job);
                    for raw in &refreshed.submodules {
                        match RepoUrl::parse(raw) {
                            Ok(url) if !known.contains(&url.identity()) => {
                                known.push(url.identity());
                                next.push(url);
                            }
                            Ok(_) => {}
                            Err(e) => tracing::warn!("{}: skipping a submodule URL: {e}", job.url),
                        }
                    }
                }
                Err(e) => {
                    summary.failed += 1;
                    tracing::error!(repo = %job.url, "{}: {e}", job.url);
                }
            }
            record(&mut manifest, job, &result, took_ms);
        }
        manifest.generated_at = unix_now();
        manifest.tool_version = format!("populate-mirror {}", env!("CARGO_PKG_VERSION"));
        manifest
            .write(&settings.root)
            .map_err(|source| PopulateError::Manifest {
                root: settings.root.clone(),
                source,
            })?;
        round = if settings.submodules {
            next
        } else {
            Vec::new()
        };
    }
    tracing::info!(
        succeeded = summary.succeeded,
        failed = summary.failed,
        "{} repositories refreshed, {} failed",
        summary.succeeded,
        summary.failed
    );
    Ok(summary)
}

/// Where `url`'s mirror is published under the chosen layout. A URL whose segments are not plain
/// names has no reference directory and takes the stock name.
fn job(url: RepoUrl, layout: Layout) -> Job {
    let rel = match layout {
        Layout::Reference => url.reference_dir(),
        Layout::Stock => None,
    }
    .unwrap_or_else(|| PathBuf::from(url.stock_dir_name()));
    Job { url, rel }
}

/// The stock agent's name for the mirror, linked to the published path, so that an agent's own
/// checkout (`git-mirrors-path` with `git-mirrors-skip-update`: a bypassed hook,
/// agent-stack-k8s's `gitMirrors`, a VM fleet) finds the same generation. Not fatal: the
/// reference name still serves the hook.
fn stock_alias(volume: &Volume, job: &Job) {
    let stock = PathBuf::from(job.url.stock_dir_name());
    if stock == job.rel {
        return;
    }
    if let Err(e) = volume.link_alias(&stock, &job.rel) {
        tracing::warn!(
            "{}: not published under the stock agent's name: {e}",
            job.url
        );
    }
}

async fn refresh_with_retries(
    refresher: &Refresher<'_>,
    job: &Job,
    settings: &Settings,
) -> Result<Refreshed, RefreshError> {
    let span = tracing::info_span!("repository", repo = %job.url, path = %job.rel.display());
    let backoff = ExponentialBuilder::default()
        .with_min_delay(settings.retry_delay)
        .with_factor(2.0)
        .with_jitter()
        .with_max_times(settings.attempts as usize - 1);
    let attempts = (|| refresher.refresh(job))
        .retry(backoff)
        .sleep(tokio::time::sleep)
        .when(RefreshError::is_retryable)
        .notify(|e, wait| {
            tracing::warn!("{e}; retrying in {:.1}s", wait.as_secs_f64());
        });
    async {
        match tokio::time::timeout(settings.timeout, attempts).await {
            Ok(result) => result,
            Err(_) => Err(RefreshError::TimedOut(settings.timeout)),
        }
    }
    .instrument(span)
    .await
}

/// Updates `job`'s manifest entry. A failure keeps the entry of the generation still published.
fn record(
    manifest: &mut Manifest,
    job: &Job,
    result: &Result<Refreshed, RefreshError>,
    took_ms: u64,
) {
    let url = job.url.without_credentials();
    let index = manifest
        .repositories
        .iter()
        .position(|e| RepoUrl::parse(&e.url).is_ok_and(|u| u.identity() == job.url.identity()));
    let previous = index.map(|i| manifest.repositories[i].clone());
    let entry = match result {
        Ok(r) => ManifestEntry {
            url,
            path: job.rel.display().to_string(),
            fetched_at: Some(unix_now()),
            generation: Some(r.generation.number),
            default_branch: r.default_branch.clone(),
            head_commit: r.head_commit.clone(),
            ref_count: Some(r.ref_count),
            size_bytes: Some(r.size_bytes),
            fetch_duration_ms: Some(took_ms),
            status: Some(
                match r.change {
                    Change::Published => "ok",
                    Change::Unchanged => "unchanged",
                }
                .into(),
            ),
            error: None,
        },
        Err(e) => ManifestEntry {
            url,
            path: job.rel.display().to_string(),
            fetch_duration_ms: Some(took_ms),
            status: Some("failed".into()),
            error: Some(e.to_string()),
            ..previous.unwrap_or_default()
        },
    };
    match index {
        Some(i) => manifest.repositories[i] = entry,
        None => manifest.repositories.push(entry),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_is_jittered_by_a_tenth_at_most() {
        let interval = Duration::from_secs(900);
        for _ in 0..100 {
            let next = jittered(interval);
            assert!(next >= Duration::from_secs(810) && next < Duration::from_secs(990));
        }
    }
}
