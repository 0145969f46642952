//! Every way a mirror can be unusable: the checkout still succeeds, without the mirror, and the
//! log and the record say why.

use stateless_e2e::git::git;
use stateless_e2e::sandbox::Finished;
use stateless_e2e::scenario::Served;

const REPO: &str = "acme/widgets.git";
const REFERENCE: &str = "acme/widgets.reference";

struct Case {
    s: Served,
    commit: String,
}

fn case() -> Case {
    let s = Served::new(REPO);
    Case {
        commit: s.upstream.head(),
        s,
    }
}

impl Case {
    fn run(&self) -> Finished {
        self.s
            .sandbox
            .hook()
            .job(&self.s.url, &self.commit, "main")
            .run()
    }

    /// The checkout succeeded, is right, and the record says `status` because of `why`.
    fn assert_checked_out(&self, out: &Finished, status: &str, why: &str) {
        assert_eq!(out.code(), Some(0), "{}", out.log());
        assert_eq!(self.s.sandbox.git(&["rev-parse", "HEAD"]), self.commit);
        assert_eq!(self.s.sandbox.git(&["status", "--porcelain"]), "");
        git(
            &self.s.sandbox.checkout,
            &["fsck", "--connectivity-only", "--no-progress"],
        );
        let record = self.s.sandbox.record();
        assert_eq!(record["mirror"]["status"], status, "{record:#}");
        let reason = record["mirror"]["reason"].as_str().unwrap_or_default();
        assert!(reason.contains(why), "reason {reason:?} lacks {why:?}");
        assert!(out.log().contains(why), "the log says why: {}", out.log());
    }
}

#[test]
fn mirror_root_missing() {
    let c = case();
    let out =
        c.s.sandbox
            .hook()
            .job(&c.s.url, &c.commit, "main")
            .env("BUILDKITE_GIT_MIRRORS_PATH", "/nonexistent/mirrors")
            .run();
    c.assert_checked_out(
        &out,
        "miss",
        "mirror root /nonexistent/mirrors does not exist",
    );
    assert_eq!(c.s.sandbox.exported("BUILDKITE_REPO_MIRROR").unwrap(), "");
}

#[test]
fn no_mirror_for_this_repository() {
    let c = case();
    let out = c.run();
    c.assert_checked_out(&out, "miss", "no mirror of");
}

#[test]
fn mirror_is_an_empty_repository() {
    let c = case();
    let m = c.s.sandbox.mirrors.join(REFERENCE);
    std::fs::create_dir_all(&m).unwrap();
    git(&m, &["init", "-q", "--bare"]);
    c.assert_checked_out(&c.run(), "miss", "is an empty repository");
}

#[test]
fn mirror_is_not_a_repository() {
    let c = case();
    let m = c.s.sandbox.mirrors.join(REFERENCE);
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(m.join("README"), "not git").unwrap();
    c.assert_checked_out(&c.run(), "miss", "is not a bare git repository");
}

#[test]
fn mirror_of_another_repository() {
    let c = case();
    c.s.sandbox.upstream("acme/gadgets.git");
    c.s.sandbox
        .mirror(&c.s.server.url("acme/gadgets.git"), REFERENCE);
    c.assert_checked_out(&c.run(), "miss", "acme/gadgets.git, not this repository");
}

/// A damaged blob passes every cheap check and the commit lookup; only checkout reads it.
#[test]
fn corrupt_pack_that_fails_only_at_checkout() {
    let c = case();
    let mirror = c.s.sandbox.mirror(&c.s.url, REFERENCE);
    let blob = git(&mirror, &["rev-parse", &format!("{}:README.md", c.commit)]);
    let pack = single_pack(&mirror);
    let idx = pack.with_extension("idx");
    let listing = git(&mirror, &["verify-pack", "-v", idx.to_str().unwrap()]);
    let line = listing
        .lines()
        .find(|l| l.starts_with(&blob))
        .expect("blob in pack");
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(2)
        .take(3)
        .map(|f| f.parse().unwrap())
        .collect();
    let (size_in_pack, offset) = (fields[1], fields[2]);
    let mut bytes = std::fs::read(&pack).unwrap();
    for b in &mut bytes[(offset + 3) as usize..(offset + size_in_pack) as usize] {
        *b ^= 0x5a;
    }
    make_writable(&pack);
    std::fs::write(&pack, bytes).unwrap();

    let out = c.run();

    c.assert_checked_out(&out, "fallback", "checking out");
    assert!(
        out.log().contains("redoing it without the mirror"),
        "{}",
        out.log()
    );
    assert!(!c
        .s
        .sandbox
        .checkout
        .join(".git/objects/info/alternates")
        .exists());
    assert_eq!(
        c.s.sandbox.exported("BUILDKITE_REPO_MIRROR").unwrap(),
        "",
        "a mirror not used is not exported"
    );
}

#[test]
fn truncated_pack() {
    let c = case();
    let mirror = c.s.sandbox.mirror(&c.s.url, REFERENCE);
    let pack = single_pack(&mirror);
    let len = std::fs::metadata(&pack).unwrap().len();
    make_writable(&pack);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let out = c.run();

    c.assert_checked_out(&out, "miss", "is truncated or does not match its index");
}

fn single_pack(mirror: &std::path::Path) -> std::path::PathBuf {
    let packs: Vec<_> = std::fs::read_dir(mirror.join("objects/pack"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .collect();
    assert_eq!(packs.len(), 1, "a fresh mirror has one pack");
    packs[0].clone()
}

fn make_writable(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}
