//! The manifest populate-mirror writes at the mirror root: which repositories the volume holds,
//! where, and how fresh. Readers treat it as a hint: a missing or unreadable manifest only means
//! the mirror is looked up by its layout names instead.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::repo_url::RepoUrl;

/// File name of the manifest, directly under the mirror root.
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Format version, bumped on incompatible changes.
    pub version: u32,
    /// Unix seconds when this manifest was written.
    pub generated_at: u64,
    pub tool_version: String,
    pub repositories: Vec<ManifestEntry>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ManifestEntry {
    /// The repository URL, credentials removed.
    pub url: String,
    /// The published mirror, relative to the root (the path readers use; it may be a symlink
    /// to the current generation).
    pub path: String,
    /// Unix seconds of the last fetch that confirmed the published generation is current.
    #[serde(default)]
    pub fetched_at: Option<u64>,
    /// The published generation's number (populate-mirror's layout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_branch: Option<String>,
    /// The default branch's commit in the published generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ref_count: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// How long the last refresh took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_duration_ms: Option<u64>,
    /// `ok`, `unchanged` or `failed` for the last refresh; a failed refresh leaves the previous
    /// generation published and says why in `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid manifest ({source}); rerun populate-mirror to rewrite it")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl Manifest {
    /// Reads `root/manifest.json`; `Ok(None)` when there is none.
    pub fn load(root: &Path) -> Result<Option<Manifest>, ManifestError> {
        let path = root.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ManifestError::Read { path, source }),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| ManifestError::Parse { path, source })
    }

    /// Writes `root/manifest.json` atomically.
    pub fn write(&self, root: &Path) -> std::io::Result<()> {
        crate::atomic_file::write_json(&root.join(MANIFEST_FILE), self)
    }

    /// The entry for `url` (compared by [`RepoUrl::identity`]) whose path stays inside the root.
    pub fn find(&self, url: &RepoUrl) -> Option<&ManifestEntry> {
        let want = url.identity();
        self.repositories.iter().find(|e| {
            RepoUrl::parse(&e.url).is_ok_and(|u| u.identity() == want)
                && e.relative_path().is_some()
        })
    }
}

impl ManifestEntry {
    /// The entry's path if it is relative and has no `..`: a manifest must not point a reader
    /// outside the volume.
    pub fn relative_path(&self) -> Option<PathBuf> {
        let path = Path::new(&self.path);
        let plain = path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        (plain && !self.path.is_empty()).then(|| path.to_path_buf())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(url: &str, path: &str) -> ManifestEntry {
        ManifestEntry {
            url: url.into(),
            path: path.into(),
            fetched_at: Some(1),
            ..Default::default()
        }
    }

    #[test]
    fn finds_an_entry_by_any_spelling_and_refuses_paths_leaving_the_root() {
        let manifest = Manifest {
            version: 1,
            generated_at: 0,
            tool_version: "t".into(),
            repositories: vec![
                entry("https://h/evil/x.git", "../outside"),
                entry("https://h/evil/y.git", "/abs"),
                entry("https://h/acme/widgets.git", "acme/widgets.reference"),
            ],
        };
        let found = manifest.find(&RepoUrl::parse("git@h:acme/widgets").unwrap());
        assert_eq!(found.unwrap().path, "acme/widgets.reference");
        assert!(manifest
            .find(&RepoUrl::parse("https://h/evil/x.git").unwrap())
            .is_none());
        assert!(manifest
            .find(&RepoUrl::parse("https://h/evil/y.git").unwrap())
            .is_none());
    }

    #[test]
    fn a_missing_manifest_is_none_and_a_broken_one_says_how_to_fix_it() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Manifest::load(dir.path()).unwrap().is_none());
        std::fs::write(dir.path().join(MANIFEST_FILE), "{").unwrap();
        let err = Manifest::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("rerun populate-mirror"), "{err}");
    }
}
