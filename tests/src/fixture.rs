//! Upstream repositories for scenarios: a work tree to commit in, pushed to a bare repository
//! under a server root (`<root>/<org>/<name>.git`), which the HTTP server, `git daemon` and
//! `file://` URLs all serve.

use std::path::{Path, PathBuf};

use crate::git::git;

pub struct Upstream {
    pub work: PathBuf,
    pub bare: PathBuf,
    /// `acme/widgets.git`: the path under the server root.
    pub name: String,
    commits: usize,
}

impl Upstream {
    /// `main` with three commits, a `feature` branch and a `v1.0.0` tag, published.
    pub fn create(server_root: &Path, scratch: &Path, name: &str) -> Upstream {
        let bare = server_root.join(name);
        let work = scratch.join(format!("work-{}", name.replace('/', "-")));
        std::fs::create_dir_all(&bare).unwrap();
        git(&bare, &["init", "-q", "--bare", "-b", "main"]);
        // Lets the fast path fetch an exact commit over protocol v0 too (v2 allows it anyway).
        git(&bare, &["config", "uploadpack.allowAnySHA1InWant", "true"]);
        std::fs::create_dir_all(&work).unwrap();
        git(&work, &["init", "-q", "-b", "main"]);
        git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
        let mut up = Upstream {
            work,
            bare,
            name: name.to_string(),
            commits: 0,
        };
        up.commit("README.md", "# widgets\n", "Initial commit");
        up.commit(
            "src/lib.rs",
            "pub fn answer() -> u32 { 42 }\n",
            "Add the answer",
        );
        git(&up.work, &["branch", "feature"]);
        git(&up.work, &["tag", "-a", "-m", "first release", "v1.0.0"]);
        up.commit(
            "docs/guide.md",
            "Read me.\n",
            "Write the guide\n\nWith a body line.",
        );
        up.publish();
        up
    }

    /// Commits one file on the current branch; returns the new commit.
    pub fn commit(&mut self, path: &str, contents: &str, message: &str) -> String {
        let file = self.work.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, contents).unwrap();
        git(&self.work, &["add", "--", path]);
        git(&self.work, &["commit", "-q", "-m", message]);
        self.commits += 1;
        self.head()
    }

    /// `n` more commits on `main`, published.
    pub fn advance(&mut self, n: usize) -> String {
        for _ in 0..n {
            let i = self.commits;
            self.commit(
                &format!("changes/{i}.txt"),
                &format!("change {i}\n"),
                &format!("Change {i}"),
            );
        }
        self.publish();
        self.head()
    }

    pub fn head(&self) -> String {
        git(&self.work, &["rev-parse", "HEAD"])
    }

    pub fn rev(&self, rev: &str) -> String {
        git(&self.work, &["rev-parse", rev])
    }

    /// Makes the bare repository match the work repository exactly (branches and tags).
    pub fn publish(&self) {
        git(
            &self.work,
            &[
                "push",
                "-q",
                "--force",
                "--prune",
                "origin",
                "refs/heads/*:refs/heads/*",
                "refs/tags/*:refs/tags/*",
            ],
        );
    }
}
