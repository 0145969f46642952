//! The repositories a mirror's default branch names as submodules, so the volume can hold their
//! mirrors too (checkout-hook borrows from each submodule's own mirror).

use git2::Repository;
use stateless_core::repo_url::RepoUrl;

/// The URLs in `.gitmodules` at HEAD, relative ones resolved against `superproject` as git does.
/// A missing or unreadable `.gitmodules` means none.
pub fn urls(repo: &Repository, superproject: &RepoUrl) -> Vec<String> {
    let Some(text) = gitmodules(repo) else {
        return Vec::new();
    };
    let Ok(dir) = tempfile::tempdir() else {
        return Vec::new();
    };
    let file = dir.path().join("gitmodules");
    if std::fs::write(&file, text).is_err() {
        return Vec::new();
    }
    let Ok(config) = git2::Config::open(&file) else {
        return Vec::new();
    };
    let mut urls = Vec::new();
    if let Ok(mut entries) = config.entries(Some(r"submodule\..*\.url")) {
        while let Some(Ok(entry)) = entries.next() {
            if let Ok(url) = entry.value() {
                urls.push(resolve(superproject.as_git_arg(), url));
            }
        }
    }
    urls
}

fn gitmodules(repo: &Repository) -> Option<Vec<u8>> {
    let tree = repo.head().ok()?.peel_to_tree().ok()?;
    let entry = tree.get_name(".gitmodules")?;
    let blob = repo.find_blob(entry.id()).ok()?;
    Some(blob.content().to_vec())
}

/// `../lib.git` relative to `https://h/acme/app.git` is `https://h/acme/lib.git`: each `../`
/// drops one trailing component of the superproject's URL, `./` drops none.
fn resolve(base: &str, url: &str) -> String {
    if !(url.starts_with("./") || url.starts_with("../")) {
        return url.to_string();
    }
    let mut base = base.trim_end_matches('/').to_string();
    let mut rest = url;
    loop {
        if let Some(r) = rest.strip_prefix("./") {
            rest = r;
        } else if let Some(r) = rest.strip_prefix("../") {
            rest = r;
            let cut = base.rfind(['/', ':']).unwrap_or(0);
            base.truncate(cut);
        } else {
            break;
        }
    }
    let separator = if base.ends_with(':') { "" } else { "/" };
    format!("{base}{separator}{rest}")
}

#[cfg(test)]
mod tests {
    use super::resolve;

    #[test]
    fn relative_urls_resolve_against_the_superproject() {
        assert_eq!(
            resolve("https://h/acme/app.git", "../lib.git"),
            "https://h/acme/lib.git"
        );
        assert_eq!(
            resolve("https://h/acme/app.git", "../../x/lib"),
            "https://h/x/lib"
        );
        assert_eq!(
            resolve("git@h:acme/app.git", "../lib.git"),
            "git@h:acme/lib.git"
        );
        assert_eq!(
            resolve("https://h/acme/app", "./sub"),
            "https://h/acme/app/sub"
        );
        assert_eq!(
            resolve("https://h/a/app", "https://o/b/c.git"),
            "https://o/b/c.git"
        );
    }
}
