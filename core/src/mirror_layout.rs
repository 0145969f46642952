//! Where a repository's mirror lives under the mirror root.
//!
//! Two layouts are in use on volumes: the stock agent's (`--git-mirrors-path`, one directory per
//! URL with every non-alphanumeric character replaced by `-`) and ours, `<org>/<name>.reference`,
//! which gives every spelling of a URL one directory. A manifest, when populate-mirror wrote one,
//! names the path outright and wins.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::manifest::{Manifest, ManifestEntry};
use crate::repo_url::RepoUrl;

/// The default mirror root, where the pods mount the mirror volume.
pub const DEFAULT_MIRRORS_PATH: &str = "/buildkite-git-references";

/// How a candidate path was derived, reported in the checkout record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayoutSource {
    Manifest,
    Reference,
    Stock,
}

impl fmt::Display for LayoutSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LayoutSource::Manifest => "manifest",
            LayoutSource::Reference => "reference layout",
            LayoutSource::Stock => "stock agent layout",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub path: PathBuf,
    pub source: LayoutSource,
    /// Unix seconds of the mirror's last fetch, when the manifest says.
    pub fetched_at: Option<u64>,
}

/// The places to look for `url`'s mirror, in order of preference, without touching the disk
/// beyond the manifest already loaded.
pub fn candidates(root: &Path, url: &RepoUrl, manifest: Option<&Manifest>) -> Vec<Candidate> {
    let mut out = Vec::new();
    if let Some(entry) = manifest.and_then(|m| m.find(url)) {
        out.push(from_manifest(root, entry));
    }
    if let Some(dir) = url.reference_dir() {
        out.push(Candidate {
            path: root.join(dir),
            source: LayoutSource::Reference,
            fetched_at: None,
        });
    }
    out.push(Candidate {
        path: root.join(url.stock_dir_name()),
        source: LayoutSource::Stock,
        fetched_at: None,
    });
    out.dedup_by(|a, b| a.path == b.path);
    out
}

fn from_manifest(root: &Path, entry: &ManifestEntry) -> Candidate {
    Candidate {
        // `find` only returns entries whose path is relative and free of `..`.
        path: root.join(entry.relative_path().unwrap_or_default()),
        source: LayoutSource::Manifest,
        fetched_at: entry.fetched_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_first_then_reference_then_stock() {
        let url = RepoUrl::parse("https://github.com/acme/widgets.git").unwrap();
        let manifest = Manifest {
            version: 1,
            generated_at: 0,
            tool_version: "t".into(),
            repositories: vec![ManifestEntry {
                url: "git@github.com:acme/widgets.git".into(),
                path: "gen/acme-widgets".into(),
                fetched_at: Some(42),
                ..Default::default()
            }],
        };
        let got = candidates(Path::new("/m"), &url, Some(&manifest));
        let paths: Vec<_> = got
            .iter()
            .map(|c| (c.path.to_str().unwrap(), c.source))
            .collect();
        assert_eq!(
            paths,
            vec![
                ("/m/gen/acme-widgets", LayoutSource::Manifest),
                ("/m/acme/widgets.reference", LayoutSource::Reference),
                (
                    "/m/https---github-com-acme-widgets-git",
                    LayoutSource::Stock
                ),
            ]
        );
        assert_eq!(got[0].fetched_at, Some(42));
    }

    #[test]
    fn a_url_with_odd_segments_is_looked_up_only_by_its_stock_name() {
        let url = RepoUrl::parse("https://h/acme/we%2Fird.git").unwrap();
        let got = candidates(Path::new("/m"), &url, None);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].source, LayoutSource::Stock);
        assert!(got[0].path.starts_with("/m"));
    }
}
