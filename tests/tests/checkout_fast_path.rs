//! The common path: a fresh pod checks out from an up-to-date (or slightly stale) mirror.

use stateless_e2e::git::git;
use stateless_e2e::git_daemon::GitDaemon;
use stateless_e2e::sandbox::Sandbox;
use stateless_e2e::scenario::Served;

const REPO: &str = "acme/widgets.git";
const REFERENCE: &str = "acme/widgets.reference";

/// Contract: after any checkout the agent sends `buildkite:git:commit` in this exact format.
fn expected_commit_metadata(sandbox: &Sandbox, commit: &str) -> String {
    let out = stateless_e2e::git::command(&sandbox.checkout)
        .args(["--no-pager", "log", "-1", commit, "-s", "--no-color"])
        .arg("--format=commit %H%nabbrev-commit %h%nAuthor: %an <%ae>%n%n%w(0,4,4)%B")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn up_to_date_mirror_checks_out_with_no_object_transfer_and_looks_like_a_clone() {
    let s = Served::new(REPO);
    let mirror = s.mirror(REFERENCE);
    let before = Sandbox::snapshot(&mirror);
    s.server.reset_counters();
    let commit = s.upstream.rev("main~1");

    let out = s.checkout(&commit, "main");

    assert_eq!(out.code(), Some(0), "{}", out.log());
    // HEAD detached at the commit, clean tree, origin like a clone.
    assert_eq!(s.sandbox.git(&["rev-parse", "HEAD"]), commit);
    let detached = stateless_e2e::git::output(&s.sandbox.checkout, &["symbolic-ref", "-q", "HEAD"]);
    assert_eq!(detached.status.code(), Some(1), "HEAD is detached");
    assert_eq!(s.sandbox.git(&["status", "--porcelain"]), "");
    assert_eq!(s.sandbox.git(&["remote", "get-url", "origin"]), s.url);
    assert_eq!(
        s.sandbox.git(&["rev-parse", "origin/main"]),
        s.upstream.rev("main")
    );
    assert_eq!(
        s.sandbox.git(&["rev-parse", "origin/feature"]),
        s.upstream.rev("feature")
    );
    assert_eq!(s.sandbox.git(&["tag", "--list"]), "v1.0.0");
    assert_eq!(
        s.sandbox.git(&["rev-parse", "v1.0.0^{commit}"]),
        s.upstream.rev("v1.0.0^{commit}")
    );
    s.sandbox.assert_borrows_from(&mirror);
    // No object crossed the wire: refs were listed, nothing was fetched.
    assert_eq!(
        s.server.pack_bytes_sent(),
        0,
        "requests: {:?}",
        s.server.requests()
    );
    assert!(
        !s.server.requests().contains(&"fetch".to_string()),
        "{:?}",
        s.server.requests()
    );
    // The record, the exports and the meta-data.
    let record = s.sandbox.record();
    assert_eq!(record["outcome"], "succeeded");
    assert_eq!(record["commit"], commit.as_str());
    assert_eq!(record["mirror"]["status"], "hit");
    assert_eq!(record["mirror"]["had_commit"], true);
    assert_eq!(record["mirror"]["source"], "reference");
    assert_eq!(record["bytes_fetched"], 0);
    assert_eq!(record["attempts"], 1);
    assert_eq!(
        s.sandbox.exported("BUILDKITE_REPO_MIRROR").unwrap(),
        mirror.canonicalize().unwrap().to_str().unwrap()
    );
    assert_eq!(s.sandbox.exported("BUILDKITE_COMMIT").unwrap(), commit);
    assert_eq!(
        s.sandbox.metadata("buildkite:git:commit").unwrap(),
        expected_commit_metadata(&s.sandbox, &commit)
    );
    assert!(out.log().contains("checked out"), "{}", out.log());
    assert!(out.log().contains("mirror hit"), "{}", out.log());
    // One line per ref, or git's advice, would flood the job log of a large repository.
    assert!(!out.log().contains("[new branch]"), "{}", out.log());
    assert!(!out.log().contains("warning:"), "{}", out.log());
    // The mirror was not written to.
    assert_eq!(Sandbox::snapshot(&mirror), before);
}

#[test]
fn head_of_a_branch_resolves_to_the_servers_tip_and_is_exported() {
    let s = Served::new(REPO);
    s.mirror(REFERENCE);

    let out = s.checkout("HEAD", "feature");

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let tip = s.upstream.rev("feature");
    assert_eq!(s.sandbox.git(&["rev-parse", "HEAD"]), tip);
    assert_eq!(s.sandbox.exported("BUILDKITE_COMMIT").unwrap(), tip);
    assert_eq!(s.sandbox.record()["commit"], tip.as_str());
}

#[test]
fn mirror_behind_the_server_fetches_only_the_missing_commits() {
    let mut s = Served::new(REPO);
    let mirror = s.mirror(REFERENCE);
    let before = Sandbox::snapshot(&mirror);
    let commit = s.upstream.advance(5);
    s.server.reset_counters();

    let out = s.checkout(&commit, "main");

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(s.sandbox.git(&["rev-parse", "HEAD"]), commit);
    assert_eq!(s.sandbox.git(&["rev-parse", "origin/main"]), commit);
    let record = s.sandbox.record();
    assert_eq!(record["mirror"]["status"], "hit");
    assert_eq!(record["mirror"]["had_commit"], false);
    let fetched = record["bytes_fetched"].as_u64().unwrap();
    assert!(fetched > 0, "the delta was fetched");
    // Only the delta: far less than the whole history (the mirror's objects).
    let mirror_bytes: u64 = Sandbox::snapshot(&mirror.join("objects"))
        .iter()
        .map(|f| f.1)
        .sum();
    assert!(
        fetched < mirror_bytes,
        "fetched {fetched} vs mirror {mirror_bytes}"
    );
    assert_eq!(Sandbox::snapshot(&mirror), before);
}

#[test]
fn dissociate_mode_leaves_a_checkout_that_outlives_the_mirror() {
    let s = Served::new(REPO);
    let mirror = s.mirror(REFERENCE);

    let out = s
        .hook(&s.upstream.head(), "main")
        .env("BUILDKITE_GIT_MIRROR_CHECKOUT_MODE", "dissociate")
        .run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert!(!s
        .sandbox
        .checkout
        .join(".git/objects/info/alternates")
        .exists());
    std::fs::remove_dir_all(&mirror).unwrap();
    assert_eq!(s.sandbox.git(&["rev-parse", "HEAD"]), s.upstream.head());
    git(
        &s.sandbox.checkout,
        &["fsck", "--connectivity-only", "--no-progress"],
    );
}

#[test]
fn stock_agent_mirror_layout_is_found() {
    let s = Served::new(REPO);
    let stock_name: String = s
        .url
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    s.mirror(&stock_name);

    let out = s.checkout(&s.upstream.head(), "main");

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let record = s.sandbox.record();
    assert_eq!(record["mirror"]["status"], "hit");
    assert_eq!(record["mirror"]["source"], "stock");
}

#[test]
fn the_manifest_is_preferred_and_gives_the_mirror_age() {
    let s = Served::new(REPO);
    // A stale mirror where the layout points, a good one only the manifest names.
    s.mirror(REFERENCE);
    let generation = s.mirror("generations/7/widgets");
    let fetched_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 600;
    let manifest = serde_json::json!({
        "version": 1, "generated_at": fetched_at, "tool_version": "test",
        "repositories": [{"url": s.url, "path": "generations/7/widgets", "fetched_at": fetched_at}]
    });
    std::fs::write(
        s.sandbox.mirrors.join("manifest.json"),
        manifest.to_string(),
    )
    .unwrap();

    let out = s.checkout(&s.upstream.head(), "main");

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let record = s.sandbox.record();
    assert_eq!(record["mirror"]["source"], "manifest");
    assert_eq!(record["mirror"]["path"], generation.to_str().unwrap());
    let age = record["mirror"]["age_secs"].as_u64().unwrap();
    assert!((600..700).contains(&age), "age {age}");
}

#[test]
fn a_mirror_published_through_a_symlink_is_borrowed_by_its_real_path() {
    let s = Served::new(REPO);
    let generation = s.mirror("acme/.generations/widgets.1");
    std::os::unix::fs::symlink(&generation, s.sandbox.mirrors.join(REFERENCE)).unwrap();

    let out = s.checkout(&s.upstream.head(), "main");

    assert_eq!(out.code(), Some(0), "{}", out.log());
    s.sandbox.assert_borrows_from(&generation);
    assert_eq!(
        s.sandbox.exported("BUILDKITE_REPO_MIRROR").unwrap(),
        generation.canonicalize().unwrap().to_str().unwrap(),
        "what a container must mount for the alternates to resolve"
    );
}

#[test]
fn a_mirror_owned_by_another_uid_is_used() {
    let s = Served::new(REPO);
    let mirror = s.mirror(REFERENCE);
    let status = std::process::Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&mirror)
        .status()
        .unwrap();
    assert!(status.success());

    let out = s.checkout(&s.upstream.head(), "main");

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(s.sandbox.record()["mirror"]["status"], "hit");
    assert_eq!(s.sandbox.git(&["rev-parse", "HEAD"]), s.upstream.head());
}

#[test]
fn git_daemon_and_file_urls_work_too() {
    let s = Served::new(REPO);
    let daemon = GitDaemon::start(&s.sandbox.server_root);
    let file_url = format!("file://{}", s.upstream.bare.display());
    for url in [daemon.url(REPO), file_url] {
        let _ = std::fs::remove_dir_all(s.sandbox.mirrors.join("acme"));
        s.sandbox.mirror(&url, REFERENCE);

        let out = s.sandbox.hook().job(&url, &s.upstream.head(), "main").run();

        assert_eq!(out.code(), Some(0), "{url}: {}", out.log());
        assert_eq!(s.sandbox.record()["mirror"]["status"], "hit", "{url}");
        assert_eq!(s.sandbox.git(&["rev-parse", "HEAD"]), s.upstream.head());
        assert_eq!(
            s.sandbox.git(&["rev-parse", "origin/feature"]),
            s.upstream.rev("feature")
        );
    }
}

#[test]
fn an_agent_without_the_job_api_only_warns() {
    let s = Served::new(REPO);
    s.mirror(REFERENCE);

    let out = s
        .hook(&s.upstream.head(), "main")
        .env("BUILDKITE_AGENT_JOB_API_SOCKET", "")
        .run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert!(
        out.log().contains(
            "could not export BUILDKITE_REPO_MIRROR, BUILDKITE_COMMIT through the Job API"
        ),
        "{}",
        out.log()
    );
    assert_eq!(s.sandbox.exported("BUILDKITE_COMMIT"), None);
}

#[test]
fn existing_commit_metadata_is_left_alone() {
    let s = Served::new(REPO);
    std::fs::create_dir_all(s.sandbox.agent_state.join("meta-data")).unwrap();
    std::fs::write(
        s.sandbox.agent_state.join("meta-data/buildkite:git:commit"),
        "set by someone else",
    )
    .unwrap();

    let out = s.checkout(&s.upstream.head(), "main");

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(
        s.sandbox.metadata("buildkite:git:commit").unwrap(),
        "set by someone else"
    );
}
