//! The server misbehaves: transient failures are retried with backoff, stalls are detected and
//! killed, a missing commit is final, and the final error names the URL (redacted) and the cause.

use std::time::{Duration, Instant};

use stateless_e2e::http_server::{Fault, GitHttpServer, On};
use stateless_e2e::sandbox::Sandbox;

const REPO: &str = "acme/widgets.git";

fn served() -> (Sandbox, GitHttpServer, String, String) {
    let sandbox = Sandbox::new();
    let upstream = sandbox.upstream(REPO);
    let server = GitHttpServer::start(&sandbox.server_root);
    let url = server.url(REPO);
    (sandbox, server, url, upstream.head())
}

#[test]
fn unreachable_server_is_retried_then_fails_naming_url_and_cause() {
    let sandbox = Sandbox::new();
    let url = "http://bob:s3cret@127.0.0.1:1/acme/widgets.git";

    let out = sandbox
        .hook()
        .job(url, &"a".repeat(40), "main")
        .env("BUILDKITE_CHECKOUT_ATTEMPTS", "3")
        .run();

    assert_eq!(out.code(), Some(1), "{}", out.log());
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
    assert!(sandbox.leftover_processes().is_empty());
}

#[test]
fn connection_dropped_mid_transfer_is_retried() {
    let (sandbox, server, url, commit) = served();
    server.inject(On::PackTransfer, Fault::DropAfter(300), 1);

    let out = sandbox.hook().job(&url, &commit, "main").run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(sandbox.record()["attempts"], 2);
    assert_eq!(sandbox.git(&["rev-parse", "HEAD"]), commit);
}

#[test]
fn server_errors_are_retried() {
    let (sandbox, server, url, commit) = served();
    server.inject(On::AnyRequest, Fault::Status(503), 2);

    let out = sandbox.hook().job(&url, &commit, "main").run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(sandbox.record()["attempts"], 3);
}

#[test]
fn a_stalled_transfer_is_killed_and_retried() {
    let (sandbox, server, url, commit) = served();
    server.inject(On::PackTransfer, Fault::StallAfter(200), 1);
    let started = Instant::now();

    let out = sandbox
        .hook()
        .job(&url, &commit, "main")
        .env("STATELESS_AGENT_STALL_TIMEOUT", "1s")
        .run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert!(
        out.log().contains("made no progress for 1s and was killed"),
        "{}",
        out.log()
    );
    assert_eq!(sandbox.record()["attempts"], 2);
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(
        sandbox.leftover_processes().is_empty(),
        "{:?}",
        sandbox.leftover_processes()
    );
}

#[test]
fn a_server_that_never_answers_fails_after_the_attempts() {
    let (sandbox, server, url, commit) = served();
    server.inject(On::AnyRequest, Fault::StallAfter(0), 10);

    let out = sandbox
        .hook()
        .job(&url, &commit, "main")
        .env("STATELESS_AGENT_STALL_TIMEOUT", "500ms")
        .env("BUILDKITE_CHECKOUT_ATTEMPTS", "2")
        .run();

    assert_eq!(out.code(), Some(1), "{}", out.log());
    assert!(out.log().contains("made no progress"), "{}", out.log());
    assert!(out.log().contains(&url), "{}", out.log());
    assert!(
        sandbox.leftover_processes().is_empty(),
        "{:?}",
        sandbox.leftover_processes()
    );
}

#[test]
fn the_per_attempt_timeout_stops_a_slow_attempt() {
    let (sandbox, server, url, commit) = served();
    server.inject(On::AnyRequest, Fault::StallAfter(0), 10);

    let out = sandbox
        .hook()
        .job(&url, &commit, "main")
        .env("BUILDKITE_GIT_CHECKOUT_TIMEOUT", "1")
        .env("BUILDKITE_CHECKOUT_ATTEMPTS", "2")
        .run();

    assert_eq!(out.code(), Some(1), "{}", out.log());
    assert!(
        out.log()
            .contains("ran longer than BUILDKITE_GIT_CHECKOUT_TIMEOUT (1s)"),
        "{}",
        out.log()
    );
    assert_eq!(sandbox.record()["attempts"], 2);
    assert!(
        sandbox.leftover_processes().is_empty(),
        "{:?}",
        sandbox.leftover_processes()
    );
}

#[test]
fn a_commit_the_server_does_not_have_fails_at_once_with_its_own_exit_code() {
    let (sandbox, _server, url, _) = served();
    let missing = "0123456789abcdef0123456789abcdef01234567";

    let out = sandbox.hook().job(&url, missing, "main").run();

    assert_eq!(out.code(), Some(3), "{}", out.log());
    assert!(
        out.log()
            .contains(&format!("commit {missing} was not found on {url}")),
        "{}",
        out.log()
    );
    assert!(
        out.log().contains("fetching all branches and tags"),
        "{}",
        out.log()
    );
    assert_eq!(sandbox.record()["attempts"], 1, "not retried");
}

#[test]
fn a_branch_the_server_does_not_have_fails_with_the_same_code() {
    let (sandbox, _server, url, _) = served();

    let out = sandbox.hook().job(&url, "HEAD", "no-such-branch").run();

    assert_eq!(out.code(), Some(3), "{}", out.log());
    assert!(
        out.log().contains("branch no-such-branch was not found"),
        "{}",
        out.log()
    );
}

#[test]
fn a_commit_only_reachable_by_id_is_fetched_by_id() {
    let (sandbox, _server, url, _) = served();
    let upstream_bare = sandbox.server_root.join(REPO);
    // A commit on no branch: only an exact-object fetch can get it.
    let tree = stateless_e2e::git::git(&upstream_bare, &["rev-parse", "main^{tree}"]);
    let dangling = stateless_e2e::git::git(
        &upstream_bare,
        &["commit-tree", "-p", "main", "-m", "detached", &tree],
    );

    let out = sandbox.hook().job(&url, &dangling, "main").run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(sandbox.git(&["rev-parse", "HEAD"]), dangling);
}
