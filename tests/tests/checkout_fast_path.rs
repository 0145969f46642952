//! The common path: a fresh pod checks out from an up-to-date (or slightly stale) mirror.

use stateless_e2e::git::git;
use stateless_e2e::git_daemon::GitDaemon;
use stateless_e2e::http_server::GitHttpServer;
use stateless_e2e::sandbox::Sandbox;

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
    let sandbox = Sandbox::new();
    let upstream = sandbox.upstream(REPO);
    let server = GitHttpServer::start(&sandbox.server_root);
    let url = server.url(REPO);
    let mirror = sandbox.mirror(&url, REFERENCE);
    let before = Sandbox::snapshot(&mirror);
    server.reset_counters();
    let commit = upstream.rev("main~1");

    let out = sandbox.hook().job(&url, &commit, "main").run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    // HEAD detached at the commit, clean tree, origin like a clone.
    assert_eq!(sandbox.git(&["rev-parse", "HEAD"]), commit);
    let detached = stateless_e2e::git::output(&sandbox.checkout, &["symbolic-ref", "-q", "HEAD"]);
    assert_eq!(detached.status.code(), Some(1), "HEAD is detached");
    assert_eq!(sandbox.git(&["status", "--porcelain"]), "");
    assert_eq!(sandbox.git(&["remote", "get-url", "origin"]), url);
    assert_eq!(
        sandbox.git(&["rev-parse", "origin/main"]),
        upstream.rev("main")
    );
    assert_eq!(
        sandbox.git(&["rev-parse", "origin/feature"]),
        upstream.rev("feature")
    );
    assert_eq!(sandbox.git(&["tag", "--list"]), "v1.0.0");
    assert_eq!(
        sandbox.git(&["rev-parse", "v1.0.0^{commit}"]),
        upstream.rev("v1.0.0^{commit}")
    );
    let alternates =
        std::fs::read_to_string(sandbox.checkout.join(".git/objects/info/alternates")).unwrap();
    assert_eq!(
        alternates.trim(),
        mirror
            .canonicalize()
            .unwrap()
            .join("objects")
            .to_str()
            .unwrap()
    );
    // No object crossed the wire: refs were listed, nothing was fetched.
    assert_eq!(
        server.pack_bytes_sent(),
        0,
        "requests: {:?}",
        server.requests()
    );
    assert!(
        !server.requests().contains(&"fetch".to_string()),
        "{:?}",
        server.requests()
    );
    // The record, the exports and the meta-data.
    let record = sandbox.record();
    assert_eq!(record["outcome"], "succeeded");
    assert_eq!(record["commit"], commit.as_str());
    assert_eq!(record["mirror"]["status"], "hit");
    assert_eq!(record["mirror"]["had_commit"], true);
    assert_eq!(record["mirror"]["source"], "reference");
    assert_eq!(record["bytes_fetched"], 0);
    assert_eq!(record["attempts"], 1);
    assert_eq!(
        sandbox.exported("BUILDKITE_REPO_MIRROR").unwrap(),
        mirror.to_str().unwrap()
    );
    assert_eq!(sandbox.exported("BUILDKITE_COMMIT").unwrap(), commit);
    assert_eq!(
        sandbox.metadata("buildkite:git:commit").unwrap(),
        expected_commit_metadata(&sandbox, &commit)
    );
    assert!(out.log().contains("checked out"), "{}", out.log());
    assert!(out.log().contains("mirror hit"), "{}", out.log());
    // The mirror was not written to.
    assert_eq!(Sandbox::snapshot(&mirror), before);
}

#[test]
fn head_of_a_branch_resolves_to_the_servers_tip_and_is_exported() {
    let sandbox = Sandbox::new();
    let upstream = sandbox.upstream(REPO);
    let server = GitHttpServer::start(&sandbox.server_root);
    let url = server.url(REPO);
    sandbox.mirror(&url, REFERENCE);

    let out = sandbox.hook().job(&url, "HEAD", "feature").run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let tip = upstream.rev("feature");
    assert_eq!(sandbox.git(&["rev-parse", "HEAD"]), tip);
    assert_eq!(sandbox.exported("BUILDKITE_COMMIT").unwrap(), tip);
    assert_eq!(sandbox.record()["commit"], tip.as_str());
}

#[test]
fn mirror_behind_the_server_fetches_only_the_missing_commits() {
    let sandbox = Sandbox::new();
    let mut upstream = sandbox.upstream(REPO);
    let server = GitHttpServer::start(&sandbox.server_root);
    let url = server.url(REPO);
    let mirror = sandbox.mirror(&url, REFERENCE);
    let before = Sandbox::snapshot(&mirror);
    let commit = upstream.advance(5);
    server.reset_counters();

    let out = sandbox.hook().job(&url, &commit, "main").run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(sandbox.git(&["rev-parse", "HEAD"]), commit);
    assert_eq!(sandbox.git(&["rev-parse", "origin/main"]), commit);
    let record = sandbox.record();
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
    let sandbox = Sandbox::new();
    let upstream = sandbox.upstream(REPO);
    let server = GitHttpServer::start(&sandbox.server_root);
    let url = server.url(REPO);
    let mirror = sandbox.mirror(&url, REFERENCE);

    let out = sandbox
        .hook()
        .job(&url, &upstream.head(), "main")
        .env("BUILDKITE_GIT_MIRROR_CHECKOUT_MODE", "dissociate")
        .run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert!(!sandbox
        .checkout
        .join(".git/objects/info/alternates")
        .exists());
    std::fs::remove_dir_all(&mirror).unwrap();
    assert_eq!(sandbox.git(&["rev-parse", "HEAD"]), upstream.head());
    git(
        &sandbox.checkout,
        &["fsck", "--connectivity-only", "--no-progress"],
    );
}

#[test]
fn stock_agent_mirror_layout_is_found() {
    let sandbox = Sandbox::new();
    let upstream = sandbox.upstream(REPO);
    let server = GitHttpServer::start(&sandbox.server_root);
    let url = server.url(REPO);
    let stock_name: String = url
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    sandbox.mirror(&url, &stock_name);

    let out = sandbox.hook().job(&url, &upstream.head(), "main").run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let record = sandbox.record();
    assert_eq!(record["mirror"]["status"], "hit");
    assert_eq!(record["mirror"]["source"], "stock");
}

#[test]
fn the_manifest_is_preferred_and_gives_the_mirror_age() {
    let sandbox = Sandbox::new();
    let upstream = sandbox.upstream(REPO);
    let server = GitHttpServer::start(&sandbox.server_root);
    let url = server.url(REPO);
    // A stale mirror where the layout points, a good one only the manifest names.
    sandbox.mirror(&url, REFERENCE);
    let generation = sandbox.mirror(&url, "generations/7/widgets");
    let fetched_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 600;
    let manifest = serde_json::json!({
        "version": 1, "generated_at": fetched_at, "tool_version": "test",
        "repositories": [{"url": url, "path": "generations/7/widgets", "fetched_at": fetched_at}]
    });
    std::fs::write(sandbox.mirrors.join("manifest.json"), manifest.to_string()).unwrap();

    let out = sandbox.hook().job(&url, &upstream.head(), "main").run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let record = sandbox.record();
    assert_eq!(record["mirror"]["source"], "manifest");
    assert_eq!(record["mirror"]["path"], generation.to_str().unwrap());
    let age = record["mirror"]["age_secs"].as_u64().unwrap();
    assert!((600..700).contains(&age), "age {age}");
}

#[test]
fn a_mirror_published_through_a_symlink_is_borrowed_by_its_real_path() {
    let sandbox = Sandbox::new();
    let upstream = sandbox.upstream(REPO);
    let server = GitHttpServer::start(&sandbox.server_root);
    let url = server.url(REPO);
    let generation = sandbox.mirror(&url, "acme/.generations/widgets.1");
    std::os::unix::fs::symlink(&generation, sandbox.mirrors.join(REFERENCE)).unwrap();

    let out = sandbox.hook().job(&url, &upstream.head(), "main").run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let alternates =
        std::fs::read_to_string(sandbox.checkout.join(".git/objects/info/alternates")).unwrap();
    assert_eq!(
        alternates.trim(),
        generation
            .canonicalize()
            .unwrap()
            .join("objects")
            .to_str()
            .unwrap()
    );
}

#[test]
fn a_mirror_owned_by_another_uid_is_used() {
    let sandbox = Sandbox::new();
    let upstream = sandbox.upstream(REPO);
    let server = GitHttpServer::start(&sandbox.server_root);
    let url = server.url(REPO);
    let mirror = sandbox.mirror(&url, REFERENCE);
    let status = std::process::Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&mirror)
        .status()
        .unwrap();
    assert!(status.success());

    let out = sandbox.hook().job(&url, &upstream.head(), "main").run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(sandbox.record()["mirror"]["status"], "hit");
    assert_eq!(sandbox.git(&["rev-parse", "HEAD"]), upstream.head());
}

#[test]
fn git_daemon_and_file_urls_work_too() {
    let sandbox = Sandbox::new();
    let upstream = sandbox.upstream(REPO);
    let daemon = GitDaemon::start(&sandbox.server_root);
    let file_url = format!("file://{}", upstream.bare.display());
    for url in [daemon.url(REPO), file_url] {
        let mirror_parent = sandbox.mirrors.join("acme");
        let _ = std::fs::remove_dir_all(&mirror_parent);
        sandbox.mirror(&url, REFERENCE);

        let out = sandbox.hook().job(&url, &upstream.head(), "main").run();

        assert_eq!(out.code(), Some(0), "{url}: {}", out.log());
        assert_eq!(sandbox.record()["mirror"]["status"], "hit", "{url}");
        assert_eq!(sandbox.git(&["rev-parse", "HEAD"]), upstream.head());
        assert_eq!(
            sandbox.git(&["rev-parse", "origin/feature"]),
            upstream.rev("feature")
        );
    }
}

#[test]
fn an_agent_without_the_job_api_only_warns() {
    let sandbox = Sandbox::new();
    let upstream = sandbox.upstream(REPO);
    let server = GitHttpServer::start(&sandbox.server_root);
    let url = server.url(REPO);
    sandbox.mirror(&url, REFERENCE);

    let out = sandbox
        .hook()
        .job(&url, &upstream.head(), "main")
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
    assert_eq!(sandbox.exported("BUILDKITE_COMMIT"), None);
}

#[test]
fn existing_commit_metadata_is_left_alone() {
    let sandbox = Sandbox::new();
    let upstream = sandbox.upstream(REPO);
    let server = GitHttpServer::start(&sandbox.server_root);
    let url = server.url(REPO);
    std::fs::create_dir_all(sandbox.agent_state.join("meta-data")).unwrap();
    std::fs::write(
        sandbox.agent_state.join("meta-data/buildkite:git:commit"),
        "set by someone else",
    )
    .unwrap();

    let out = sandbox.hook().job(&url, &upstream.head(), "main").run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(
        sandbox.metadata("buildkite:git:commit").unwrap(),
        "set by someone else"
    );
}
