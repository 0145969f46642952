//! Parity with the agent's default checkout: run `checkout-hook` and the reference replay
//! (`../shared/bench/bk-default-checkout.sh`) on the same fixture, with the same job
//! environment, into two checkout directories, and compare what a pipeline can observe.
//!
//! Both sides find the mirror the same way: fixtures put mirrors under the stock agent's name
//! (`$BUILDKITE_GIT_MIRRORS_PATH/<URL with non-alphanumerics as ->`), which the replay derives
//! and the hook accepts as its third choice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::git::{git, output};
use crate::sandbox::{Finished, Sandbox};
use crate::scenario::Served;

/// The replay of the agent's default checkout, or `None` (with a message) when `../shared` is
/// not beside the repository.
pub fn reference_script() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let script = root.join("shared/bench/bk-default-checkout.sh");
    if script.is_file() {
        Some(script)
    } else {
        eprintln!(
            "skipping parity: {} is absent (it lives in ../shared beside the repository)",
            script.display()
        );
        None
    }
}

/// The mirror's state when the job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorState {
    /// No mirror in the volume.
    Absent,
    /// Made after the upstream's last push.
    UpToDate,
    /// Made, then the upstream moved on by two commits on `main`.
    Stale,
}

impl MirrorState {
    /// Runs `case` on a new fixture in every mirror state.
    pub fn each(case: impl Fn(&Parity)) {
        for state in MirrorState::ALL {
            eprintln!("mirror: {state:?}");
            case(&Parity::new(state));
        }
    }

    pub const ALL: [MirrorState; 3] = [
        MirrorState::Absent,
        MirrorState::UpToDate,
        MirrorState::Stale,
    ];
}

/// The stock agent's mirror directory name for `url`.
/// A job's commit and branch, for [`Parity::compare`].
pub fn job<'a>(commit: &'a str, branch: &'a str) -> Vec<(&'static str, &'a str)> {
    vec![("BUILDKITE_COMMIT", commit), ("BUILDKITE_BRANCH", branch)]
}

pub fn stock_name(url: &str) -> String {
    url.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// A served fixture, a mirror in the given state, and a second checkout directory and agent
/// state for the reference side.
pub struct Parity {
    pub served: Served,
    /// The job's `BUILDKITE_REPO`.
    pub url: String,
    pub state: MirrorState,
    pub reference_checkout: PathBuf,
    pub reference_agent: PathBuf,
}

impl Parity {
    /// `acme/widgets.git` with a pull request (`refs/pull/1/head` on `feature`, plus a merge
    /// ref), the mirror in `state`.
    pub fn new(state: MirrorState) -> Parity {
        let served = Served::new("acme/widgets.git");
        Parity::around(served, state)
    }

    /// A parity fixture around an already served repository (extend it before calling).
    pub fn around(served: Served, state: MirrorState) -> Parity {
        let url = served.url.clone();
        Parity::around_url(served, url, state)
    }

    /// The same, with the job's repository reached at `url` (e.g. over SSH).
    pub fn around_url(mut served: Served, url: String, state: MirrorState) -> Parity {
        let bare = served.upstream.bare.clone();
        let feature = served.upstream.rev("feature");
        let main = served.upstream.rev("main");
        git(&bare, &["update-ref", "refs/pull/1/head", &feature]);
        git(&bare, &["update-ref", "refs/pull/1/merge", &main]);
        if state != MirrorState::Absent {
            served.sandbox.mirror_of(&bare, &url, &stock_name(&url));
        }
        if state == MirrorState::Stale {
            served.upstream.advance(2);
        }
        let dir = served.sandbox.dir.path();
        let reference_checkout = dir.join("reference/builds/acme/widgets");
        let reference_agent = dir.join("reference/agent");
        std::fs::create_dir_all(&reference_checkout).unwrap();
        Parity {
            served,
            url,
            state,
            reference_checkout,
            reference_agent,
        }
    }

    /// Fresh checkout directories on both sides, for another job on the same fixture.
    pub fn next_job(&self) {
        self.sandbox().fresh_checkout_dir();
        let _ = std::fs::remove_dir_all(&self.reference_checkout);
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.served.sandbox
    }

    /// Runs both sides with `env` on top of the job's repository, returns both outcomes.
    /// `None` when the reference script is unavailable.
    pub fn compare(&self, env: &[(&str, &str)]) -> Option<Compared> {
        let script = reference_script()?;
        let sandbox = self.sandbox();
        std::fs::create_dir_all(&self.reference_checkout).unwrap();
        let mut hook = sandbox.hook().env("BUILDKITE_REPO", &self.url);
        for (k, v) in env {
            hook = hook.env(k, v);
        }
        let ours = hook.run();

        let mut cmd = Command::new("bash");
        sandbox
            .job_environment(cmd.arg(script))
            .current_dir(&self.reference_checkout)
            .env("CHECKOUT_DIR", &self.reference_checkout)
            .env("BUILDKITE_GIT_MIRRORS_PATH", &sandbox.mirrors)
            .env("BUILDKITE_STANDIN_STATE", &self.reference_agent)
            .env("BUILDKITE_REPO", &self.url);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("bash runs the reference script");
        let reference = Finished {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        Some(Compared {
            ours: Side {
                output: ours,
                checkout: sandbox.checkout.clone(),
                agent: sandbox.agent_state.clone(),
            },
            reference: Side {
                output: reference,
                checkout: self.reference_checkout.clone(),
                agent: self.reference_agent.clone(),
            },
        })
    }
}

/// One side's run.
pub struct Side {
    pub output: Finished,
    pub checkout: PathBuf,
    pub agent: PathBuf,
}

impl Side {
    pub fn git(&self, args: &[&str]) -> String {
        git(&self.checkout, args)
    }

    /// What a pipeline can observe of the checkout.
    pub fn observed(&self) -> Observed {
        let refs = self.git(&[
            "for-each-ref",
            "--format=%(refname) %(objectname)",
            "refs/heads",
            "refs/remotes",
            "refs/tags",
        ]);
        let symref = |name: &str| {
            let out = output(&self.checkout, &["symbolic-ref", "-q", name]);
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let sparse = output(&self.checkout, &["sparse-checkout", "list"]);
        Observed {
            head: self.git(&["rev-parse", "HEAD"]),
            head_symref: symref("HEAD"),
            origin_head: symref("refs/remotes/origin/HEAD"),
            refs,
            tree: tree(&self.checkout),
            status: self.git(&["status", "--porcelain", "--ignore-submodules=none"]),
            submodules: self.git(&["submodule", "status", "--recursive"]),
            sparse: String::from_utf8_lossy(&sparse.stdout).trim().to_string(),
            commit_metadata: std::fs::read_to_string(
                self.agent.join("meta-data/buildkite:git:commit"),
            )
            .ok(),
        }
    }
}

/// What a pipeline can observe of a checkout; equal on both sides means parity.
#[derive(Debug, PartialEq, Eq)]
pub struct Observed {
    pub head: String,
    /// Empty: HEAD is detached.
    pub head_symref: String,
    pub origin_head: String,
    /// `refname sha` of every local branch, remote-tracking branch and tag.
    pub refs: String,
    /// Every file of the working tree (submodules included, `.git` excluded) and its bytes.
    pub tree: BTreeMap<String, String>,
    pub status: String,
    pub submodules: String,
    pub sparse: String,
    pub commit_metadata: Option<String>,
}

pub struct Compared {
    pub ours: Side,
    pub reference: Side,
}

impl Compared {
    /// Both sides succeeded and a pipeline could not tell them apart.
    pub fn assert_same(&self) -> Observed {
        self.assert_both_succeeded();
        let ours = self.ours.observed();
        let reference = self.reference.observed();
        assert_eq!(
            ours,
            reference,
            "checkout-hook (left) and the default checkout (right) differ\n--- hook log:\n{}\n--- reference log:\n{}",
            self.ours.output.log(),
            self.reference.output.log()
        );
        ours
    }

    pub fn assert_both_succeeded(&self) {
        for (name, side) in [
            ("checkout-hook", &self.ours),
            ("reference", &self.reference),
        ] {
            assert_eq!(
                side.output.code(),
                Some(0),
                "{name} failed:\n{}",
                side.output.log()
            );
        }
    }
}

/// Every file under `dir` but `.git` entries, with its contents (symlinks: their target).
fn tree(dir: &Path) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_name() == ".git" {
                continue;
            }
            let meta = path.symlink_metadata().unwrap();
            let rel = path.strip_prefix(dir).unwrap().display().to_string();
            if meta.is_dir() {
                stack.push(path);
            } else if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                files.insert(rel, format!("-> {}", target.display()));
            } else {
                use std::os::unix::fs::PermissionsExt;
                let exec = if meta.permissions().mode() & 0o111 != 0 {
                    "x "
                } else {
                    ""
                };
                let bytes = std::fs::read(&path).unwrap();
                files.insert(rel, format!("{exec}{}", String::from_utf8_lossy(&bytes)));
            }
        }
    }
    files
}
