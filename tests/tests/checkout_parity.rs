//! Parity with the agent's default checkout: for each input, with no mirror, an up-to-date one
//! and a stale one, `checkout-hook` and the replay of the default checkout
//! (`../shared/bench/bk-default-checkout.sh`) run on the same fixture over smart HTTP, and a
//! pipeline must not be able to tell the results apart: commit, working tree, branches, tags,
//! `origin/HEAD`, submodules, sparse state and the commit meta-data.

use stateless_e2e::git::git;
use stateless_e2e::parity::{job, MirrorState, Parity};

#[test]
fn a_full_sha() {
    MirrorState::each(|p| {
        let main = p.served.upstream.rev("main");
        let Some(c) = p.compare(&job(&main, "main")) else {
            return;
        };
        let seen = c.assert_same();
        assert_eq!(seen.head, main);
        assert_eq!(seen.origin_head, "refs/remotes/origin/main");
        assert!(seen
            .commit_metadata
            .unwrap()
            .starts_with(&format!("commit {main}")));
        // Deliberate difference: we also export the resolved commit through the Job API (the
        // replay leaves that to the agent's resolve-commit step).
        assert_eq!(
            p.sandbox().exported("BUILDKITE_COMMIT").as_deref(),
            Some(main.as_str())
        );
    });
}

#[test]
fn an_older_commit_and_a_short_sha() {
    MirrorState::each(|p| {
        let older = p.served.upstream.rev("main~1");
        for commit in [older.clone(), older[..7].to_string()] {
            p.next_job();
            let Some(c) = p.compare(&job(&commit, "main")) else {
                return;
            };
            assert_eq!(c.assert_same().head, older);
        }
        // Deliberate difference: we export the full SHA a short one resolved to.
        assert_eq!(
            p.sandbox().exported("BUILDKITE_COMMIT").as_deref(),
            Some(older.as_str())
        );
    });
}

#[test]
fn the_tip_of_a_branch_and_of_a_tag() {
    MirrorState::each(|p| {
        let Some(c) = p.compare(&job("HEAD", "feature")) else {
            return;
        };
        assert_eq!(c.assert_same().head, p.served.upstream.rev("feature"));
    });
    MirrorState::each(|p| {
        let mut env = job("HEAD", "v1.0.0");
        env.push(("BUILDKITE_TAG", "v1.0.0"));
        let Some(c) = p.compare(&env) else { return };
        assert_eq!(
            c.assert_same().head,
            p.served.upstream.rev("v1.0.0^{commit}")
        );
    });
}

#[test]
fn a_custom_refspec() {
    MirrorState::each(|p| {
        let mut env = job("HEAD", "main");
        env.push(("BUILDKITE_REFSPEC", "refs/heads/feature"));
        let Some(c) = p.compare(&env) else { return };
        assert_eq!(c.assert_same().head, p.served.upstream.rev("feature"));
    });
}

#[test]
fn a_github_pull_request_by_head_and_by_merge_ref() {
    MirrorState::each(|p| {
        let feature = p.served.upstream.rev("feature");
        let mut env = job(&feature, "feature");
        env.extend([
            ("BUILDKITE_PULL_REQUEST", "1"),
            ("BUILDKITE_PIPELINE_PROVIDER", "github"),
        ]);
        let Some(c) = p.compare(&env) else { return };
        assert_eq!(c.assert_same().head, feature);
    });
    MirrorState::each(|p| {
        let mut env = job("HEAD", "feature");
        env.extend([
            ("BUILDKITE_PULL_REQUEST", "1"),
            ("BUILDKITE_PIPELINE_PROVIDER", "github"),
            ("BUILDKITE_PULL_REQUEST_USING_MERGE_REFSPEC", "true"),
        ]);
        let Some(c) = p.compare(&env) else { return };
        let merge = git(&p.served.upstream.bare, &["rev-parse", "refs/pull/1/merge"]);
        assert_eq!(c.assert_same().head, merge);
    });
}

#[test]
fn a_force_pushed_pull_request_still_builds_its_commit() {
    MirrorState::each(|p| {
        let up = &p.served.upstream;
        let bare = &up.bare;
        // The build's commit is no longer the PR's head and no branch holds it.
        let orphan = git(
            &up.work,
            &["commit-tree", "-p", "HEAD", "-m", "WIP", "HEAD^{tree}"],
        );
        git(
            &up.work,
            &["push", "-q", "origin", &format!("{orphan}:refs/heads/tmp")],
        );
        git(bare, &["update-ref", "-d", "refs/heads/tmp"]);
        let Some(c) = p.compare(&[
            ("BUILDKITE_COMMIT", orphan.as_str()),
            ("BUILDKITE_BRANCH", "feature"),
            ("BUILDKITE_PULL_REQUEST", "1"),
            ("BUILDKITE_PIPELINE_PROVIDER", "github"),
        ]) else {
            return;
        };
        assert_eq!(c.assert_same().head, orphan);
    });
}

#[test]
fn pull_request_refs_only_on_github() {
    MirrorState::each(|p| {
        let main = p.served.upstream.rev("main");
        let mut env = job(&main, "main");
        env.extend([
            ("BUILDKITE_PULL_REQUEST", "1"),
            ("BUILDKITE_PIPELINE_PROVIDER", "bitbucket"),
        ]);
        let Some(c) = p.compare(&env) else { return };
        c.assert_same();
    });
}

#[test]
fn git_flag_settings_mapped_onto_the_fast_path() {
    MirrorState::each(|p| {
        let main = p.served.upstream.rev("main");
        let mut env = job(&main, "main");
        env.extend([
            (
                "BUILDKITE_GIT_CLONE_FLAGS",
                "-v --no-tags -c user.name='CI Bot'",
            ),
            ("BUILDKITE_GIT_FETCH_FLAGS", "--prune -q"),
            ("BUILDKITE_GIT_CHECKOUT_FLAGS", "-f -q"),
            ("BUILDKITE_GIT_CLEAN_FLAGS", "-ffxdq -e keep"),
        ]);
        let Some(c) = p.compare(&env) else { return };
        let seen = c.assert_same();
        assert!(
            !seen.refs.contains("refs/tags/"),
            "--no-tags: {}",
            seen.refs
        );
        assert_eq!(c.ours.git(&["config", "user.name"]), "CI Bot");
    });
}

#[test]
fn clone_flags_without_a_fast_path_equivalent_run_a_real_clone() {
    MirrorState::each(|p| {
        let older = p.served.upstream.rev("main~1");
        for flags in ["-v --single-branch", "--depth=1", "--no-hardlinks -q"] {
            p.next_job();
            let mut env = job(&older, "main");
            env.push(("BUILDKITE_GIT_CLONE_FLAGS", flags));
            let Some(c) = p.compare(&env) else { return };
            assert_eq!(c.assert_same().head, older, "{flags}");
            let log = c.ours.output.log();
            assert!(log.contains(" clone --progress "), "{flags}: {log}");
        }
    });
}

#[test]
fn skipping_the_fetch_of_a_commit_the_mirror_has() {
    MirrorState::each(|p| {
        let feature = p.served.upstream.rev("feature");
        let Some(c) = p.compare(&[
            ("BUILDKITE_COMMIT", feature.as_str()),
            ("BUILDKITE_BRANCH", "feature"),
            ("BUILDKITE_PULL_REQUEST", "1"),
            ("BUILDKITE_PIPELINE_PROVIDER", "github"),
            ("BUILDKITE_GIT_SKIP_FETCH_EXISTING_COMMITS", "true"),
        ]) else {
            return;
        };
        c.assert_same();
    });
}

#[test]
fn sparse_checkouts_in_cone_and_no_cone_mode() {
    MirrorState::each(|p| {
        let main = p.served.upstream.rev("main");
        for (mode, paths, set_args) in [
            ("cone", "src", vec!["--cone", "src"]),
            (
                "no-cone",
                "/docs/,/README.md",
                vec!["--no-cone", "/docs/", "/README.md"],
            ),
        ] {
            p.next_job();
            let mut env = job(&main, "main");
            env.extend([
                ("BUILDKITE_GIT_SPARSE_CHECKOUT_PATHS", paths),
                ("BUILDKITE_GIT_SPARSE_CHECKOUT_MODE", mode),
            ]);
            let Some(c) = p.compare(&env) else { return };
            // The replay has no sparse checkout: the expected result is its full checkout
            // narrowed by git itself.
            let mut args = vec!["sparse-checkout", "set"];
            args.extend(set_args);
            c.reference.git(&args);
            let seen = c.assert_same();
            assert!(
                !seen.tree.contains_key("src/lib.rs") || mode == "cone",
                "{mode}"
            );
            assert!(seen.tree.contains_key("README.md"), "{mode}");
        }
    });
}

#[test]
fn nothing_to_check_out() {
    let p = Parity::new(MirrorState::UpToDate);
    for env in [
        vec![("BUILDKITE_SKIP_CHECKOUT", "true")],
        vec![("BUILDKITE_REPO", "")],
    ] {
        let Some(c) = p.compare(&env) else { return };
        c.assert_both_succeeded();
        for side in [&c.ours.checkout, &c.reference.checkout] {
            assert_eq!(std::fs::read_dir(side).unwrap().count(), 0, "{env:?}");
        }
    }
}

#[test]
fn dissociate_mode_leaves_a_checkout_that_needs_no_mirror() {
    MirrorState::each(|p| {
        let main = p.served.upstream.rev("main");
        let mut env = job(&main, "main");
        env.push(("BUILDKITE_GIT_MIRROR_CHECKOUT_MODE", "dissociate"));
        let Some(c) = p.compare(&env) else { return };
        c.assert_same();
        for side in [&c.ours, &c.reference] {
            assert!(!side.checkout.join(".git/objects/info/alternates").exists());
        }
    });
}

#[test]
fn a_clean_checkout_may_empty_a_directory_that_is_not_a_checkout() {
    let p = Parity::new(MirrorState::UpToDate);
    let main = p.served.upstream.rev("main");
    for dir in [&p.sandbox().checkout, &p.reference_checkout] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("left-behind.txt"), "from another job").unwrap();
    }
    let mut env = job(&main, "main");
    env.push(("BUILDKITE_CLEAN_CHECKOUT", "true"));
    let Some(c) = p.compare(&env) else { return };
    assert!(!c.assert_same().tree.contains_key("left-behind.txt"));
}
