//! Git LFS, in parity with the agent's default checkout: smudging is skipped during the checkout
//! (`GIT_LFS_SKIP_SMUDGE=1`), then `git lfs fetch` and `git lfs checkout` replace the pointers.
//! The LFS store is the upstream repository itself, reached through a `file://` `lfs.url` in
//! the repository's `.lfsconfig` (git-lfs's standalone transfer), so no LFS server is needed.

use std::path::Path;

use stateless_e2e::git::git;
use stateless_e2e::parity::{MirrorState, Parity};
use stateless_e2e::scenario::Served;

/// Random-looking bytes that only LFS can deliver.
const ASSET: &[u8] = &[
    0x89, b'P', b'N', b'G', 0, 1, 2, 3, 0xff, 0xfe, 42, 7, 0, 0, 9,
];

fn lfs_installed() -> bool {
    let ok = stateless_e2e::git::command(Path::new("/"))
        .args(["lfs", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipping: git-lfs is not installed (apt-get install git-lfs)");
    }
    ok
}

/// The fixture with `assets/logo.png` stored in LFS.
fn with_lfs(state: MirrorState) -> Parity {
    let served = Served::new("acme/widgets.git");
    let up = &served.upstream;
    git(&up.work, &["lfs", "install", "--local"]);
    git(&up.work, &["lfs", "track", "*.png"]);
    let lfsconfig = format!("[lfs]\n\turl = file://{}\n", up.bare.display());
    std::fs::write(up.work.join(".lfsconfig"), lfsconfig).unwrap();
    std::fs::create_dir_all(up.work.join("assets")).unwrap();
    std::fs::write(up.work.join("assets/logo.png"), ASSET).unwrap();
    git(&up.work, &["add", "-A"]);
    git(&up.work, &["commit", "-q", "-m", "Add the logo"]);
    up.publish();
    Parity::around(served, state)
}

#[test]
fn lfs_files_are_fetched_after_the_checkout() {
    if !lfs_installed() {
        return;
    }
    for state in MirrorState::ALL {
        let p = with_lfs(state);
        let main = p.served.upstream.rev("main");
        let Some(c) = p.compare(&[
            ("BUILDKITE_COMMIT", main.as_str()),
            ("BUILDKITE_BRANCH", "main"),
            ("BUILDKITE_GIT_LFS_ENABLED", "true"),
        ]) else {
            return;
        };
        c.assert_same();
        let logo = std::fs::read(p.sandbox().checkout.join("assets/logo.png")).unwrap();
        assert_eq!(logo, ASSET, "{state:?}: the real file, not its pointer");
    }
}

#[test]
fn without_lfs_the_pointers_stay() {
    if !lfs_installed() {
        return;
    }
    let p = with_lfs(MirrorState::UpToDate);
    let main = p.served.upstream.rev("main");
    let Some(c) = p.compare(&[
        ("BUILDKITE_COMMIT", main.as_str()),
        ("BUILDKITE_BRANCH", "main"),
    ]) else {
        return;
    };
    c.assert_same();
    let logo = std::fs::read_to_string(p.sandbox().checkout.join("assets/logo.png")).unwrap();
    assert!(logo.starts_with("version https://git-lfs"), "{logo}");
}

#[test]
fn lfs_enabled_without_git_lfs_fails_at_once_naming_the_fix() {
    let p = with_lfs(MirrorState::UpToDate);
    let main = p.served.upstream.rev("main");
    let git = stateless_e2e::git::command(Path::new("/"))
        .args(["--exec-path"])
        .output()
        .unwrap();
    let exec_path = String::from_utf8(git.stdout).unwrap();
    let real_git = Path::new(exec_path.trim()).join("git");

    // Only the stand-in agent on PATH, git named explicitly: git finds no git-lfs.
    let out = p
        .served
        .hook(&main, "main")
        .env("PATH", &p.sandbox().bin)
        .env("GIT", &real_git)
        .env("BUILDKITE_GIT_LFS_ENABLED", "true")
        .run();

    assert_eq!(out.code(), Some(1), "{}", out.log());
    assert!(out.log().contains("install git-lfs"), "{}", out.log());
    assert!(
        !p.sandbox().checkout.join(".git").exists(),
        "nothing was checked out"
    );
}

#[test]
fn an_lfs_object_missing_from_the_store_fails_the_checkout_naming_the_step() {
    if !lfs_installed() {
        return;
    }
    let p = with_lfs(MirrorState::UpToDate);
    let store = p.served.upstream.bare.join("lfs");
    std::fs::remove_dir_all(&store).unwrap();
    let main = p.served.upstream.rev("main");

    let out = p
        .served
        .hook(&main, "main")
        .env("BUILDKITE_GIT_LFS_ENABLED", "true")
        .env("BUILDKITE_CHECKOUT_ATTEMPTS", "2")
        .run();

    // git-lfs's own status, passed on as the agent does.
    assert_eq!(out.code(), Some(2), "{}", out.log());
    let last = out.log().lines().last().unwrap_or_default().to_string();
    assert!(last.contains("fetching the LFS files of"), "{last}");
    assert!(last.contains("LFS server"), "{last}");
    // LFS objects never come from the mirror: it was not abandoned for this.
    assert_eq!(p.sandbox().record()["mirror"]["status"], "hit");
    p.sandbox().assert_no_leftover_processes();
}

/// Row 38 of the gap note: in a sparse checkout only the sparse working tree's LFS files are
/// fetched and checked out, as the agent does. Cone directories scope the fetch too; no-cone
/// patterns scope the checkout, so an excluded LFS file is never recreated.
#[test]
fn a_sparse_checkout_fetches_and_checks_out_only_its_own_lfs_files() {
    if !lfs_installed() {
        return;
    }
    let p = with_lfs(MirrorState::UpToDate);
    let main = p.served.upstream.rev("main");
    let checkout = p.sandbox().checkout.clone();
    let lfs_objects = |dir: &Path| {
        walkdir::WalkDir::new(dir.join(".git/lfs/objects"))
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .count()
    };
    for (mode, paths, logo_expected) in [
        ("cone", "src", false),
        ("cone", "assets", true),
        ("no-cone", "/src/", false),
        ("no-cone", "/assets/", true),
    ] {
        p.next_job();
        let out = p
            .served
            .hook(&main, "main")
            .env("BUILDKITE_GIT_LFS_ENABLED", "true")
            .env("BUILDKITE_GIT_SPARSE_CHECKOUT_MODE", mode)
            .env("BUILDKITE_GIT_SPARSE_CHECKOUT_PATHS", paths)
            .run();
        assert_eq!(out.code(), Some(0), "{mode} {paths}: {}", out.log());
        let logo = checkout.join("assets/logo.png");
        assert_eq!(logo.exists(), logo_expected, "{mode} {paths}");
        if logo_expected {
            assert_eq!(std::fs::read(&logo).unwrap(), ASSET, "{mode} {paths}");
        } else if mode == "cone" {
            assert_eq!(lfs_objects(&checkout), 0, "{mode} {paths}: nothing fetched");
        }
    }
}
