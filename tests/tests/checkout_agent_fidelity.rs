//! What the agent's default checkout does and pipelines rely on, where the hook used to differ
//! (the rows of `../shared/notes/agent-checkout-gap.md`, agent v3.137 and main 5c219808): fork
//! pull requests, commits given by name, HEAD without a branch, commits and refs that are not on
//! the server yet, commit verification, stale merge refs, custom fetch flags and values the
//! agent tolerates. Each runs in parity with the replay of the default checkout
//! (`../shared/bench/bk-default-checkout.sh`) wherever the replay covers it.

use std::io::{BufRead, BufReader};
use std::process::ChildStderr;
use std::time::{Duration, Instant};

use stateless_e2e::git::git;
use stateless_e2e::parity::{job, MirrorState, Parity};
use stateless_e2e::scenario::Served;

const REPO: &str = "acme/widgets.git";
const REFERENCE: &str = "acme/widgets.reference";

/// Row 15: GitHub names a fork's branch `owner:branch` (the agent's own integration test uses
/// `forker:update-test-txt`); the branch is never fetched for such a build, so it must not be
/// refused.
#[test]
fn a_fork_pull_request_builds_with_its_owner_prefixed_branch() {
    MirrorState::each(|p| {
        let feature = p.served.upstream.rev("feature");
        let mut env = job(&feature, "forker:update-test-txt");
        env.extend([
            ("BUILDKITE_PULL_REQUEST", "1"),
            ("BUILDKITE_PIPELINE_PROVIDER", "github"),
        ]);
        let Some(c) = p.compare(&env) else { return };
        assert_eq!(c.assert_same().head, feature);
    });
}

/// Row 12: the REST API takes "ref, SHA or tag" as the commit; the agent fetches the name and
/// runs `git checkout NAME` (a branch becomes a local branch, a tag a detached HEAD).
#[test]
fn a_branch_or_tag_name_as_the_commit() {
    MirrorState::each(|p| {
        for (commit, expected) in [
            ("feature", "feature"),
            ("main", "main"),
            ("v1.0.0", "v1.0.0^{commit}"),
        ] {
            p.next_job();
            let Some(c) = p.compare(&job(commit, "main")) else {
                return;
            };
            let seen = c.assert_same();
            assert_eq!(seen.head, p.served.upstream.rev(expected), "{commit}");
        }
        assert_eq!(
            p.sandbox().exported("BUILDKITE_COMMIT").as_deref(),
            Some(p.served.upstream.rev("v1.0.0^{commit}").as_str())
        );
    });
}

/// Row 16: HEAD with an empty branch builds the remote's default branch.
#[test]
fn head_without_a_branch_builds_the_default_branch() {
    MirrorState::each(|p| {
        let Some(c) = p.compare(&job("HEAD", "")) else {
            return;
        };
        assert_eq!(c.assert_same().head, p.served.upstream.rev("main"));
    });
}

/// Rows 24 and 10: the user's fetch flags are for the commit's fetch; the branches and tags came
/// from the agent's clone, so `--depth` must not shallow `origin/*`.
#[test]
fn custom_fetch_flags_apply_to_the_commit_fetch_only() {
    MirrorState::each(|p| {
        let main = p.served.upstream.rev("main");
        let mut env = job(&main, "main");
        env.push(("BUILDKITE_GIT_FETCH_FLAGS", "-v --depth=1"));
        let Some(c) = p.compare(&env) else { return };
        c.assert_same();
        let history = |side: &stateless_e2e::parity::Side| {
            side.git(&["rev-list", "--count", "origin/feature"])
        };
        assert_eq!(history(&c.ours), history(&c.reference));
        // `-v` on the commit's fetch only: no line per branch.
        assert!(
            !c.ours.output.log().contains("[new branch]"),
            "{}",
            c.ours.output.log()
        );
    });
}

/// A commit only `topic` holds, pushed as `topic`: on no other branch.
fn commit_off_main(p: &Parity) -> String {
    let up = &p.served.upstream;
    let off = git(
        &up.work,
        &["commit-tree", "-p", "main", "-m", "Off main", "main^{tree}"],
    );
    git(
        &up.work,
        &["push", "-q", "origin", &format!("{off}:refs/heads/topic")],
    );
    off
}

/// Row 34: `BUILDKITE_GIT_COMMIT_VERIFICATION`. A commit on its branch passes; one that is not
/// fails under `strict` (exit 1, not retried, as the agent) and only warns under `warn`.
#[test]
fn commit_verification_in_strict_and_warn_mode() {
    MirrorState::each(|p| {
        let older = p.served.upstream.rev("main~1");
        let mut env = job(&older, "main");
        env.push(("BUILDKITE_GIT_COMMIT_VERIFICATION", "strict"));
        let Some(c) = p.compare(&env) else { return };
        assert_eq!(c.assert_same().head, older);
        assert!(
            c.ours.output.log().contains("Verifying commit"),
            "{}",
            c.ours.output.log()
        );
        let refs = c.ours.git(&["for-each-ref", "refs/buildkite-agent/"]);
        assert_eq!(refs, "", "the verification ref is removed");

        let off = commit_off_main(p);
        p.next_job();
        let mut env = job(&off, "main");
        env.push(("BUILDKITE_GIT_COMMIT_VERIFICATION", "strict"));
        let c = p.compare(&env).unwrap();
        // 1: the agent's status for this error (a plain error, internal/shell/shell.go
        // `ExitCode`); the replay marks it with a status of its own (97).
        assert_eq!(c.ours.output.code(), Some(1), "{}", c.ours.output.log());
        assert_ne!(
            c.reference.output.code(),
            Some(0),
            "{}",
            c.reference.output.log()
        );
        let log = c.ours.output.log();
        assert!(
            log.contains(&format!("commit {off} is not on branch \"main\"")),
            "{log}"
        );
        let record = p.sandbox().record();
        assert_eq!(record["attempts"], 1, "a definite no is not retried");
        assert_eq!(record["cause"], "commit-verification");

        p.next_job();
        let mut env = job(&off, "main");
        env.push(("BUILDKITE_GIT_COMMIT_VERIFICATION", "warn"));
        let c = p.compare(&env).unwrap();
        assert_eq!(c.assert_same().head, off);
        assert!(
            c.ours.output.log().contains("commit verification failed"),
            "{}",
            c.ours.output.log()
        );
    });
}

/// Verification the agent skips (pull requests, tags, HEAD) is skipped with the agent's reason,
/// and one that cannot be made (the branch is gone) only warns, even under `strict`.
#[test]
fn commit_verification_skipped_or_unavailable_never_blocks() {
    let s = Served::new(REPO);
    s.mirror(REFERENCE);
    let main = s.upstream.rev("main");
    let out = s
        .hook(&main, "feature")
        .env("BUILDKITE_GIT_COMMIT_VERIFICATION", "strict")
        .env("BUILDKITE_PULL_REQUEST", "4")
        .run();
    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert!(
        out.log()
            .contains("Skipping commit verification: pull request build (#4)"),
        "{}",
        out.log()
    );

    s.sandbox.fresh_checkout_dir();
    let out = s
        .hook(&main, "deleted-branch")
        .env("BUILDKITE_GIT_COMMIT_VERIFICATION", "strict")
        .run();
    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert!(
        out.log().contains("commit verification unavailable"),
        "{}",
        out.log()
    );
}

/// Rows 45 and 10: GitHub can deliver the build before a fresh push can be fetched. The agent
/// keeps trying across its attempts; so does the hook, saying what it waits for.
#[test]
fn a_fresh_push_not_yet_on_the_server_is_waited_for() {
    let mut s = Served::new(REPO);
    s.mirror(REFERENCE);
    // Committed, not yet pushed: the webhook arrived first.
    let fresh = s.upstream.commit("late.txt", "late\n", "Pushed late");
    let mut hook = s
        .hook(&fresh, "main")
        .env("STATELESS_AGENT_RETRY_DELAY", "200ms")
        .spawn();
    let (mut stderr, mut log) = log_until(&mut hook, "attempt 1/");
    s.upstream.publish();
    std::io::Read::read_to_string(&mut stderr, &mut log).unwrap();
    let out = hook.wait_with_output().unwrap();
    log.push_str(&String::from_utf8_lossy(&out.stdout));

    assert_eq!(out.status.code(), Some(0), "{log}");
    assert_eq!(s.sandbox.git(&["rev-parse", "HEAD"]), fresh);
    assert!(
        log.contains(&format!("commit {fresh} was not found")),
        "{log}"
    );
    assert!(log.contains("waiting"), "{log}");
    let attempts = s.sandbox.record()["attempts"].as_u64().unwrap();
    assert!((2..=6).contains(&attempts), "{attempts}");
}

/// Reads the hook's log until `needle` appears (the moment a scenario changes the server: a
/// sleep would race the hook's jittered waits on a loaded machine); the rest is left to read.
fn log_until(hook: &mut std::process::Child, needle: &str) -> (BufReader<ChildStderr>, String) {
    let mut stderr = BufReader::new(hook.stderr.take().unwrap());
    let mut log = String::new();
    while !log.contains(needle) {
        let before = log.len();
        stderr.read_line(&mut log).unwrap();
        assert!(
            log.len() > before,
            "the hook ended before {needle:?}: {log}"
        );
    }
    (stderr, log)
}

/// Row 17: a new pull request's `refs/pull/N/head` is made by GitHub asynchronously; at HEAD the
/// agent tries it 10 times (about 2m17s), past the six ordinary attempts.
#[test]
fn a_new_pull_requests_head_ref_is_waited_for_longer_than_six_attempts() {
    let s = Served::new(REPO);
    s.mirror(REFERENCE);
    let feature = s.upstream.rev("feature");
    let started = Instant::now();
    let mut hook = s
        .hook("HEAD", "feature")
        .env("BUILDKITE_PULL_REQUEST", "5")
        .env("BUILDKITE_PIPELINE_PROVIDER", "github")
        .env("STATELESS_AGENT_RETRY_DELAY", "100ms")
        .spawn();
    // The ref appears once the sixth attempt has failed, read from the hook's own log (not a
    // sleep: jittered waits and a loaded machine move when that attempt runs).
    let (mut stderr, mut log) = log_until(&mut hook, "attempt 6/10");
    git(
        &s.upstream.bare,
        &["update-ref", "refs/pull/5/head", &feature],
    );
    std::io::Read::read_to_string(&mut stderr, &mut log).unwrap();
    let out = hook.wait_with_output().unwrap();

    assert_eq!(out.status.code(), Some(0), "{log}");
    assert_eq!(s.sandbox.git(&["rev-parse", "HEAD"]), feature);
    let attempts = s.sandbox.record()["attempts"].as_u64().unwrap();
    assert!(attempts > 6, "{attempts}: {log}");
    assert!(
        log.contains("/10:"),
        "counts to the agent's 10 tries: {log}"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
}

/// Row 19: at HEAD with the merge refspec, the merge commit's second parent must be the pull
/// request head the build is for; a stale merge ref is fetched again, then fails with the
/// agent's message.
#[test]
fn a_stale_merge_ref_is_refetched_then_fails_naming_the_cause() {
    let s = Served::new(REPO);
    s.mirror(REFERENCE);
    let bare = &s.upstream.bare;
    let main = s.upstream.rev("main");
    let feature = s.upstream.rev("feature");
    let merge = git(
        bare,
        &[
            "commit-tree",
            "-p",
            &main,
            "-p",
            &feature,
            "-m",
            "Merge",
            "main^{tree}",
        ],
    );
    git(bare, &["update-ref", "refs/pull/3/merge", &merge]);
    let hook = |head: &str| {
        s.hook("HEAD", "feature")
            .env("BUILDKITE_PULL_REQUEST", "3")
            .env("BUILDKITE_PIPELINE_PROVIDER", "github")
            .env("BUILDKITE_PULL_REQUEST_USING_MERGE_REFSPEC", "true")
            .env("BUILDKITE_PULL_REQUEST_HEAD_COMMIT", head)
            .env("BUILDKITE_CHECKOUT_ATTEMPTS", "3")
            .run()
    };

    let out = hook(&feature);
    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(s.sandbox.git(&["rev-parse", "HEAD"]), merge);

    s.sandbox.fresh_checkout_dir();
    let pushed_since = s.upstream.rev("main~2");
    let out = hook(&pushed_since);
    assert_eq!(out.code(), Some(1), "{}", out.log());
    assert!(
        out.log().contains(&format!(
            "does not match the build's pull request head: expected {pushed_since}, got {feature}"
        )),
        "{}",
        out.log()
    );
    assert!(
        out.log().contains("possibly due to a merge conflict"),
        "{}",
        out.log()
    );
    let record = s.sandbox.record();
    assert_eq!(record["attempts"], 3, "refetched, as the agent does");
    assert_eq!(record["cause"], "stale-merge-ref");
}

/// Row 50: a boolean or number the agent cannot read is ignored with a warning and the default
/// applies; attempts of 0 or less mean the agent's 6.
#[test]
fn values_the_agent_tolerates_are_warned_about_and_defaulted() {
    let s = Served::new(REPO);
    s.mirror(REFERENCE);
    let main = s.upstream.rev("main");
    for (name, value) in [
        ("BUILDKITE_GIT_SUBMODULES", "maybe"),
        ("BUILDKITE_GIT_LFS_ENABLED", "perhaps"),
        ("BUILDKITE_CHECKOUT_ATTEMPTS", "-2"),
        ("BUILDKITE_CHECKOUT_ATTEMPTS", "0"),
        ("BUILDKITE_GIT_CHECKOUT_TIMEOUT", "soon"),
    ] {
        s.sandbox.fresh_checkout_dir();
        let out = s.hook(&main, "main").env(name, value).run();
        assert_eq!(out.code(), Some(0), "{name}={value}: {}", out.log());
        assert!(out.log().contains(name), "{name}={value}: {}", out.log());
        assert_eq!(s.sandbox.git(&["rev-parse", "HEAD"]), main);
    }
}

/// Row 36: a sparse checkout is a blobless partial clone, as the agent's `--sparse
/// --filter=blob:none`: on a mirror miss, files outside the sparse paths are never downloaded.
#[test]
fn a_sparse_checkout_without_a_mirror_downloads_only_its_own_blobs() {
    let s = Served::new(REPO);
    // As GitHub and GitLab do.
    git(
        &s.upstream.bare,
        &["config", "uploadpack.allowFilter", "true"],
    );
    let main = s.upstream.rev("main");

    let out = s
        .hook(&main, "main")
        .env("BUILDKITE_GIT_SPARSE_CHECKOUT_PATHS", "src")
        .run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(s.sandbox.record()["mirror"]["status"], "miss");
    assert_eq!(
        s.sandbox
            .git(&["config", "remote.origin.partialclonefilter"]),
        "blob:none"
    );
    assert!(s.sandbox.checkout.join("src/lib.rs").exists());
    let missing = s
        .sandbox
        .git(&["rev-list", "--objects", "--missing=print", "HEAD"]);
    let guide = s.upstream.rev("main:docs/guide.md");
    assert!(missing.contains(&format!("?{guide}")), "{missing}");
}

/// Row 33: `BUILDKITE_GIT_REMOTE_MIRROR_URL`. The commit the volume's mirror lacks comes from
/// the HTTPS remote mirror on the first attempt, the repository itself supplies only refs; a
/// remote mirror without the commit is a miss and the checkout still succeeds; plain HTTP is
/// skipped, as the agent skips it.
#[test]
fn a_remote_mirror_supplies_the_commit_the_volume_lacks() {
    use stateless_e2e::http_server::GitHttpServer;
    use stateless_e2e::tls_front::TlsFront;

    let mut s = Served::new(REPO);
    s.mirror(REFERENCE);
    let fresh = s.upstream.advance(3);
    let remote_root = s.sandbox.dir.path().join("remote-mirror");
    std::fs::create_dir_all(remote_root.join("acme")).unwrap();
    git(
        s.sandbox.dir.path(),
        &[
            "clone",
            "-q",
            "--mirror",
            s.upstream.bare.to_str().unwrap(),
            remote_root.join(REPO).to_str().unwrap(),
        ],
    );
    let remote = GitHttpServer::start(&remote_root);
    let Some(tls) = TlsFront::start(s.sandbox.dir.path(), &remote.url(REPO)) else {
        return;
    };
    let with_remote_mirror = |s: &Served, commit: &str, url: &str| {
        s.hook(commit, "main")
            .env("BUILDKITE_GIT_REMOTE_MIRROR_URL", url)
            .env("GIT_SSL_CAINFO", &tls.certificate)
            .run()
    };
    s.server.reset_counters();

    let out = with_remote_mirror(&s, &fresh, &tls.url(REPO));

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert!(
        out.log()
            .contains("Remote Git mirror: outcome=hit site=fresh-clone"),
        "{}",
        out.log()
    );
    assert_eq!(s.sandbox.git(&["rev-parse", "HEAD"]), fresh);
    assert!(remote.pack_bytes_sent() > 0);
    assert_eq!(
        s.server.pack_bytes_sent(),
        0,
        "the repository sent no objects"
    );

    // A commit the remote mirror does not have yet.
    s.sandbox.fresh_checkout_dir();
    let newer = s.upstream.advance(1);
    let out = with_remote_mirror(&s, &newer, &tls.url(REPO));
    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert!(out.log().contains("outcome=miss"), "{}", out.log());
    assert_eq!(s.sandbox.git(&["rev-parse", "HEAD"]), newer);

    s.sandbox.fresh_checkout_dir();
    let out = with_remote_mirror(&s, &newer, &remote.url(REPO));
    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert!(out.log().contains("skip_reason=not-https"), "{}", out.log());
}

/// A name that is neither a branch nor a tag anywhere is waited for like a missing commit, then
/// fails with 128.
#[test]
fn a_commit_name_that_is_nowhere_fails_like_a_missing_commit() {
    let s = Served::new(REPO);
    s.mirror(REFERENCE);

    let out = s.checkout("no-such-ref", "main");

    assert_eq!(out.code(), Some(128), "{}", out.log());
    assert!(
        out.log().contains("ref no-such-ref was not found"),
        "{}",
        out.log()
    );
    let record = s.sandbox.record();
    assert_eq!(record["cause"], "not-found");
    assert_eq!(record["attempts"], 6);
}
