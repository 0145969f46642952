//! The server misbehaves: transient failures are retried with backoff, stalls are detected and
//! killed, a missing commit is waited for as long as the agent waits, and the final error names
//! the URL (redacted) and the cause. Exit statuses are git's, as the agent passes them on (128).

use std::time::{Duration, Instant};

use stateless_e2e::http_server::{Fault, On};
use stateless_e2e::sandbox::Sandbox;
use stateless_e2e::scenario::Served;

const REPO: &str = "acme/widgets.git";

#[test]
fn unreachable_server_is_retried_then_fails_naming_url_and_cause() {
    let sandbox = Sandbox::new();
    let url = "http://bob:s3cret@127.0.0.1:1/acme/widgets.git";

    let out = sandbox
        .hook()
        .job(url, &"a".repeat(40), "main")
        .env("BUILDKITE_CHECKOUT_ATTEMPTS", "3")
        .run();

    assert_eq!(out.code(), Some(128), "{}", out.log());
    let log = out.log();
    assert!(
        log.contains("http://***@127.0.0.1:1/acme/widgets.git"),
        "{log}"
    );
    assert!(
        log.contains("Failed to connect") || log.contains("Could not connect"),
        "{log}"
    );
    assert!(log.contains("check that the server is reachable"), "{log}");
    assert_eq!(log.matches("retrying in").count(), 2, "{log}");
    let record = sandbox.record();
    assert_eq!(record["outcome"], "failed");
    assert_eq!(record["attempts"], 3);
    for shown in [log, record.to_string()] {
        assert!(
            !shown.contains("s3cret") && !shown.contains("bob"),
            "{shown}"
        );
    }
    sandbox.assert_no_leftover_processes();
}

#[test]
fn connection_dropped_mid_transfer_is_retried() {
    let s = Served::new(REPO);
    let commit = s.upstream.head();
    s.server.inject(On::PackTransfer, Fault::DropAfter(300), 1);

    let out = s.checkout(&commit, "main");

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(s.sandbox.record()["attempts"], 2);
    assert_eq!(s.sandbox.git(&["rev-parse", "HEAD"]), commit);
}

#[test]
fn server_errors_are_retried() {
    let s = Served::new(REPO);
    let commit = s.upstream.head();
    // On pack transfers: without a mirror the hook also asks for the default branch (ls-refs)
    // alongside the fetch, and which of the two meets an error first would be a race.
    s.server.inject(On::PackTransfer, Fault::Status(503), 2);

    let out = s.checkout(&commit, "main");

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(s.sandbox.record()["attempts"], 3);
}

#[test]
fn a_stalled_transfer_is_killed_and_retried() {
    let s = Served::new(REPO);
    let commit = s.upstream.head();
    s.server.inject(On::PackTransfer, Fault::StallAfter(200), 1);
    let started = Instant::now();

    let out = s
        .hook(&commit, "main")
        .env("STATELESS_AGENT_STALL_TIMEOUT", "1s")
        .run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert!(
        out.log().contains("made no progress for 1s and was killed"),
        "{}",
        out.log()
    );
    assert_eq!(s.sandbox.record()["attempts"], 2);
    assert!(started.elapsed() < Duration::from_secs(20));
    s.sandbox.assert_no_leftover_processes();
}

#[test]
fn a_server_that_never_answers_fails_after_the_attempts() {
    let s = Served::new(REPO);
    let commit = s.upstream.head();
    s.server.inject(On::AnyRequest, Fault::StallAfter(0), 10);

    let out = s
        .hook(&commit, "main")
        .env("STATELESS_AGENT_STALL_TIMEOUT", "500ms")
        .env("BUILDKITE_CHECKOUT_ATTEMPTS", "2")
        .run();

    assert_eq!(out.code(), Some(128), "{}", out.log());
    assert!(out.log().contains("made no progress"), "{}", out.log());
    assert!(out.log().contains(&s.url), "{}", out.log());
    s.sandbox.assert_no_leftover_processes();
}

#[test]
fn the_per_attempt_timeout_stops_a_slow_attempt() {
    let s = Served::new(REPO);
    let commit = s.upstream.head();
    s.server.inject(On::AnyRequest, Fault::StallAfter(0), 10);

    let out = s
        .hook(&commit, "main")
        .env("BUILDKITE_GIT_CHECKOUT_TIMEOUT", "1")
        .env("BUILDKITE_CHECKOUT_ATTEMPTS", "2")
        .run();

    assert_eq!(out.code(), Some(128), "{}", out.log());
    assert!(
        out.log()
            .contains("ran longer than BUILDKITE_GIT_CHECKOUT_TIMEOUT (1s)"),
        "{}",
        out.log()
    );
    assert_eq!(s.sandbox.record()["attempts"], 2);
    s.sandbox.assert_no_leftover_processes();
}

#[test]
fn a_commit_the_server_does_not_have_is_waited_for_then_fails_with_gits_status() {
    let s = Served::new(REPO);
    let missing = "0123456789abcdef0123456789abcdef01234567";

    let out = s.checkout(missing, "main");

    assert_eq!(out.code(), Some(128), "{}", out.log());
    assert!(
        out.log()
            .contains(&format!("commit {missing} was not found on {}", s.url)),
        "{}",
        out.log()
    );
    assert!(
        out.log().contains("fetching all branches and tags"),
        "{}",
        out.log()
    );
    // As long as the agent waits: its six attempts, each saying what it waits for.
    let record = s.sandbox.record();
    assert_eq!(record["attempts"], 6, "{record}");
    assert_eq!(record["cause"], "not-found", "{record}");
    assert_eq!(
        out.log().matches("waiting").count(),
        5,
        "one line per wait: {}",
        out.log()
    );
    assert!(
        out.log()
            .contains("GitHub can deliver a build before a fresh push"),
        "{}",
        out.log()
    );
}

#[test]
fn a_branch_the_server_does_not_have_fails_with_the_same_code() {
    let s = Served::new(REPO);

    let out = s.sandbox.hook().job(&s.url, "HEAD", "no-such-branch").run();

    assert_eq!(out.code(), Some(128), "{}", out.log());
    assert!(
        out.log()
            .contains("couldn't find remote ref no-such-branch"),
        "{}",
        out.log()
    );
}

#[test]
fn a_commit_only_reachable_by_id_is_fetched_by_id() {
    let s = Served::new(REPO);
    let upstream_bare = s.sandbox.server_root.join(REPO);
    // A commit on no branch: only an exact-object fetch can get it.
    let tree = stateless_e2e::git::git(&upstream_bare, &["rev-parse", "main^{tree}"]);
    let dangling = stateless_e2e::git::git(
        &upstream_bare,
        &["commit-tree", "-p", "main", "-m", "detached", &tree],
    );

    let out = s.checkout(&dangling, "main");

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(s.sandbox.git(&["rev-parse", "HEAD"]), dangling);
}
