//! The repositories to mirror: URLs from the command line and the repos file, validated like the
//! checkout hook validates `BUILDKITE_REPO` (no option-like values, no remote helpers, no `..`),
//! and deduplicated by identity (`https://h/o/x.git` and `git@h:o/x` are one repository).

use std::path::{Path, PathBuf};

use stateless_core::repo_url::{RepoUrl, UrlError};

#[derive(Debug, thiserror::Error)]
pub enum RepoListError {
    #[error("cannot read the repos file {}: {source}; check --repos-file", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {error}")]
    Url { origin: String, error: UrlError },
    #[error("no repositories to mirror; pass URLs or --repos-file")]
    Empty,
}

/// Every URL once, in the order given.
pub fn collect(urls: &[String], file: Option<&Path>) -> Result<Vec<RepoUrl>, RepoListError> {
    let mut entries: Vec<(String, String)> = urls
        .iter()
        .filter(|u| !u.is_empty())
        .enumerate()
        .map(|(i, u)| (format!("argument {}", i + 1), u.clone()))
        .collect();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|source| RepoListError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if !line.is_empty() {
                entries.push((format!("{}:{}", path.display(), n + 1), line.to_string()));
            }
        }
    }
    let mut repos: Vec<RepoUrl> = Vec::new();
    for (origin, raw) in entries {
        let url = RepoUrl::parse(&raw).map_err(|error| RepoListError::Url { origin, error })?;
        if !repos.iter().any(|r| r.identity() == url.identity()) {
            repos.push(url);
        }
    }
    if repos.is_empty() {
        return Err(RepoListError::Empty);
    }
    Ok(repos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_blank_lines_and_duplicate_spellings_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("repos");
        std::fs::write(
            &file,
            "# fleet\n\nhttps://h/acme/widgets.git  # main app\ngit@h:acme/widgets\nhttps://h/acme/gadgets\n",
        )
        .unwrap();
        let got = collect(&["https://h/acme/tools.git".into()], Some(&file)).unwrap();
        let names: Vec<String> = got.iter().map(|u| u.identity()).collect();
        assert_eq!(names, ["h/acme/tools", "h/acme/widgets", "h/acme/gadgets"]);
    }

    #[test]
    fn a_hostile_line_is_refused_naming_where_it_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("repos");
        std::fs::write(&file, "https://h/a/b.git\n--upload-pack=touch /tmp/x\n").unwrap();
        let err = collect(&[], Some(&file)).unwrap_err().to_string();
        assert!(err.contains("repos:2"), "{err}");
        assert!(matches!(collect(&[], None), Err(RepoListError::Empty)));
    }
}
