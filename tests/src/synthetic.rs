//! Large repositories generated with `git fast-import`, deterministic for a given shape: many
//! files in nested directories, a long linear history touching a few files per commit, and many
//! branches and tags. The demo and the benchmarks use them where a real repository is too big
//! to ship.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use crate::git::{command, git};

#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub files: usize,
    pub commits: usize,
    pub branches: usize,
    pub tags: usize,
    /// `refs/pull/N/head` refs, as a GitHub repository carries (and `clone --mirror` copies).
    pub pulls: usize,
}

/// A bare repository at `bare` with `shape`; returns the tip of `main`.
pub fn generate(bare: &Path, shape: Shape) -> String {
    std::fs::create_dir_all(bare).unwrap();
    git(bare, &["init", "-q", "--bare", "-b", "main"]);
    git(bare, &["config", "uploadpack.allowAnySHA1InWant", "true"]);
    let mut stream = Vec::new();
    let mut rng = Lcg(0x5eed);
    // The first commit adds every file; each later one edits a few.
    write_commit(&mut stream, 1, None, "Import the tree", |out| {
        for f in 0..shape.files {
            file(out, f, &mut rng, 0);
        }
    });
    for c in 2..=shape.commits {
        change(&mut stream, c, Some(c - 1), shape, &mut rng);
    }
    refs(&mut stream, shape, 1, shape.commits);
    import(bare, &stream);
    git(bare, &["rev-parse", "main"])
}

/// Appends `commits` commits to `main` of a repository made by [`generate`]; returns the tip.
pub fn extend(bare: &Path, shape: Shape, commits: usize) -> String {
    let base = git(bare, &["rev-list", "--count", "main"])
        .parse::<usize>()
        .unwrap();
    let mut stream = Vec::new();
    let mut rng = Lcg(0x5eed ^ base as u64);
    writeln!(
        stream,
        "reset refs/heads/main\nfrom {}\n",
        git(bare, &["rev-parse", "main"])
    )
    .unwrap();
    for i in 1..=commits {
        let c = base + i;
        let from = (i > 1).then_some(c - 1);
        change(&mut stream, c, from, shape, &mut rng);
    }
    import(bare, &stream);
    git(bare, &["rev-parse", "main"])
}

/// Commit `mark`: five files edited.
fn change(out: &mut Vec<u8>, mark: usize, parent: Option<usize>, shape: Shape, rng: &mut Lcg) {
    write_commit(out, mark, parent, &format!("Change {mark}"), |out| {
        for _ in 0..5 {
            let f = rng.below(shape.files);
            file(out, f, rng, mark);
        }
    });
}

fn write_commit(
    out: &mut Vec<u8>,
    mark: usize,
    parent: Option<usize>,
    message: &str,
    body: impl FnOnce(&mut Vec<u8>),
) {
    let when = 1_767_225_600 + mark as u64 * 60;
    writeln!(out, "commit refs/heads/main\nmark :{mark}").unwrap();
    writeln!(out, "author Ada Lovelace <ada@example.com> {when} +0000").unwrap();
    writeln!(out, "committer Ada Lovelace <ada@example.com> {when} +0000").unwrap();
    writeln!(out, "data {}\n{message}", message.len()).unwrap();
    if let Some(p) = parent {
        writeln!(out, "from :{p}").unwrap();
    }
    body(out);
    writeln!(out).unwrap();
}

fn file(out: &mut Vec<u8>, index: usize, rng: &mut Lcg, revision: usize) {
    let path = format!(
        "src/d{:02}/m{:02}/file_{index}.txt",
        index % 97,
        (index / 97) % 31
    );
    let mut data = String::new();
    for line in 0..(8 + rng.below(24)) {
        data.push_str(&format!(
            "{index} rev {revision} line {line}: {:016x} {:016x}\n",
            rng.next(),
            rng.next()
        ));
    }
    writeln!(out, "M 100644 inline {path}\ndata {}\n{data}", data.len()).unwrap();
}

/// Branches, lightweight tags and pull-request refs spread over commits `first..=last`.
fn refs(out: &mut Vec<u8>, shape: Shape, first: usize, last: usize) {
    let span = last - first + 1;
    let kinds: [(&str, &str, usize, usize); 3] = [
        ("refs/heads/branch-", "", shape.branches, 7_919),
        ("refs/tags/v", "", shape.tags, 104_729),
        ("refs/pull/", "/head", shape.pulls, 15_485_863),
    ];
    for (prefix, suffix, count, stride) in kinds {
        for i in 0..count {
            writeln!(
                out,
                "reset {prefix}{i}{suffix}\nfrom :{}\n",
                first + (i * stride) % span
            )
            .unwrap();
        }
    }
}

fn import(bare: &Path, stream: &[u8]) {
    let mut child = command(bare)
        .args(["fast-import", "--quiet", "--force"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stream).unwrap();
    assert!(child.wait().unwrap().success(), "git fast-import failed");
    git(bare, &["repack", "-a", "-d", "-q"]);
}

/// A small deterministic generator: the same shape gives the same repository everywhere.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 11
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}
