//! Submodules, in parity with the agent's default checkout: each submodule is checked out at
//! the commit the superproject records, borrowing from its own mirror when the volume has one.

use stateless_e2e::git::git;
use stateless_e2e::parity::{stock_name, MirrorState, Parity};
use stateless_e2e::scenario::Served;

/// `acme/widgets.git` with `vendor/gadgets` a submodule of `acme/gadgets.git` (served too); the
/// submodule's mirror exists whenever the main one does.
fn with_submodule(state: MirrorState) -> (Parity, String) {
    let served = Served::new("acme/widgets.git");
    let gadgets = served.sandbox.upstream("acme/gadgets.git");
    let sub_url = served.server.url("acme/gadgets.git");
    let work = &served.upstream.work;
    git(
        work,
        &["submodule", "add", "-q", &sub_url, "vendor/gadgets"],
    );
    git(work, &["commit", "-q", "-m", "Vendor the gadgets"]);
    served.upstream.publish();
    if state != MirrorState::Absent {
        served.sandbox.mirror(&sub_url, &stock_name(&sub_url));
    }
    drop(gadgets);
    (Parity::around(served, state), sub_url)
}

#[test]
fn submodules_are_checked_out_each_from_its_own_mirror() {
    for state in MirrorState::ALL {
        let (p, _) = with_submodule(state);
        let main = p.served.upstream.rev("main");
        let Some(c) = p.compare(&[
            ("BUILDKITE_COMMIT", main.as_str()),
            ("BUILDKITE_BRANCH", "main"),
            (
                "BUILDKITE_GIT_SUBMODULE_CLONE_CONFIG",
                "protocol.version=2,http.lowSpeedTime=30",
            ),
        ]) else {
            return;
        };
        let seen = c.assert_same();
        assert!(
            seen.tree.contains_key("vendor/gadgets/src/lib.rs"),
            "{state:?}"
        );
        assert!(seen.submodules.contains("vendor/gadgets"), "{state:?}");
        let alternates = p
            .sandbox()
            .checkout
            .join(".git/modules/vendor/gadgets/objects/info/alternates");
        assert_eq!(
            alternates.exists(),
            state != MirrorState::Absent,
            "{state:?}"
        );
    }
}

#[test]
fn submodules_turned_off_are_left_uninitialised() {
    let (p, _) = with_submodule(MirrorState::UpToDate);
    let main = p.served.upstream.rev("main");
    let Some(c) = p.compare(&[
        ("BUILDKITE_COMMIT", main.as_str()),
        ("BUILDKITE_BRANCH", "main"),
        ("BUILDKITE_GIT_SUBMODULES", "false"),
    ]) else {
        return;
    };
    let seen = c.assert_same();
    assert!(!seen.tree.contains_key("vendor/gadgets/src/lib.rs"));
    assert!(c
        .ours
        .output
        .log()
        .contains("BUILDKITE_GIT_SUBMODULES is false"));
}

#[test]
fn a_damaged_submodule_mirror_is_bypassed() {
    let (p, sub_url) = with_submodule(MirrorState::UpToDate);
    let mirror = p.sandbox().mirrors.join(stock_name(&sub_url));
    for pack in std::fs::read_dir(mirror.join("objects/pack"))
        .unwrap()
        .flatten()
    {
        if pack.path().extension().is_some_and(|e| e == "pack") {
            let len = pack.metadata().unwrap().len();
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(pack.path())
                .unwrap();
            f.set_len(len / 2).unwrap();
        }
    }
    let main = p.served.upstream.rev("main");

    let out = p.served.hook(&main, "main").run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert!(
        out.log().contains("submodule vendor/gadgets: no mirror"),
        "{}",
        out.log()
    );
    assert_eq!(
        p.sandbox()
            .git(&["-C", "vendor/gadgets", "rev-parse", "HEAD"]),
        git(
            &p.served.upstream.work,
            &["rev-parse", "HEAD:vendor/gadgets"]
        )
    );
}

/// Row 37 of the gap note: a sparse checkout skips submodules with the agent's warning, in
/// every mirror state (the replay has no sparse mode, so this is not a parity case).
#[test]
fn a_sparse_checkout_skips_submodules_as_the_agent_does() {
    for state in MirrorState::ALL {
        let (p, _) = with_submodule(state);
        let main = p.served.upstream.rev("main");
        let out = p
            .served
            .hook(&main, "main")
            .env("BUILDKITE_GIT_SPARSE_CHECKOUT_PATHS", "src")
            .run();
        assert_eq!(out.code(), Some(0), "{state:?}: {}", out.log());
        assert!(
            out.log()
                .contains("Submodule initialization skipped during sparse checkout"),
            "{state:?}: {}",
            out.log()
        );
        let checkout = &p.sandbox().checkout;
        assert!(checkout.join("src/lib.rs").exists(), "{state:?}");
        assert!(
            !checkout.join("vendor/gadgets/src/lib.rs").exists(),
            "{state:?}"
        );
        assert!(!checkout.join(".git/modules").exists(), "{state:?}");
    }
}
