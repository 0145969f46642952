//! Choosing the mirror for the job's repository, or saying why there is none.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use stateless_core::manifest::Manifest;
use stateless_core::mirror_inspect::{Mirror, MirrorProblem};
use stateless_core::mirror_layout::{candidates, LayoutSource, DEFAULT_MIRRORS_PATH};
use stateless_core::repo_url::RepoUrl;

/// The outcome of looking for a mirror.
#[derive(Debug)]
pub struct MirrorChoice {
    pub mirror: Option<Mirror>,
    pub source: Option<LayoutSource>,
    pub age_secs: Option<u64>,
    /// Why no mirror is used, when none is.
    pub miss_reason: Option<String>,
}

/// Looks at the manifest's path, then the reference layout, then the stock agent's, and takes
/// the first that passes inspection. A broken candidate does not stop the search: the stock
/// agent's mirror may still be good when ours is not.
pub fn choose(root: Option<&Path>, url: &RepoUrl) -> MirrorChoice {
    let miss = |reason: String| MirrorChoice {
        mirror: None,
        source: None,
        age_secs: None,
        miss_reason: Some(reason),
    };
    let Some(root) = root else {
        // The agent passes an empty value whenever `git-mirrors-path` is not configured: a
        // volume mounted at the default path then goes unused, silently but for this line.
        let mounted = Path::new(DEFAULT_MIRRORS_PATH).is_dir();
        return miss(match mounted {
            true => format!("BUILDKITE_GIT_MIRRORS_PATH is empty, which turns mirrors off, but a mirror volume is mounted at {DEFAULT_MIRRORS_PATH}; set git-mirrors-path=\"{DEFAULT_MIRRORS_PATH}\" in the agent's configuration"),
            false => "BUILDKITE_GIT_MIRRORS_PATH is empty, which turns mirrors off; set git-mirrors-path in the agent's configuration to use a mirror volume".into(),
        });
    };
    if !root.is_dir() {
        return miss(format!(
            "mirror root {} does not exist; mount the mirror volume there or set BUILDKITE_GIT_MIRRORS_PATH",
            root.display()
        ));
    }
    let manifest = Manifest::load(root).unwrap_or_else(|e| {
        tracing::warn!("ignoring the mirror manifest: {e}");
        None
    });
    let mut problems = Vec::new();
    let mut looked_at = Vec::new();
    for candidate in candidates(root, url, manifest.as_ref()) {
        match Mirror::inspect(&candidate.path, url) {
            Ok(mirror) => {
                let age_secs = candidate
                    .fetched_at
                    .map(seconds_since)
                    .or_else(|| mirror.age_from_files());
                return MirrorChoice {
                    mirror: Some(mirror),
                    source: Some(candidate.source),
                    age_secs,
                    miss_reason: None,
                };
            }
            Err(MirrorProblem::Missing(path)) => looked_at.push(path.display().to_string()),
            Err(problem) => problems.push(problem.to_string()),
        }
    }
    match problems.into_iter().next() {
        Some(problem) => miss(problem),
        None => miss(format!(
            "no mirror of {url} in the volume (looked at {}); add it to populate-mirror's repositories",
            looked_at.join(", ")
        )),
    }
}

fn seconds_since(unix_secs: u64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    now.saturating_sub(unix_secs)
}
