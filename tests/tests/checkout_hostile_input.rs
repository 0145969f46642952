//! Input that tries to make git run something, escape the mirror root, or leak a secret.

use stateless_e2e::http_server::GitHttpServer;
use stateless_e2e::sandbox::Sandbox;

#[test]
fn option_injection_and_remote_helpers_are_refused_before_git_runs() {
    let sandbox = Sandbox::new();
    let pwned = sandbox.dir.path().join("pwned");
    let p = pwned.display();
    let sha = "0123456789abcdef0123456789abcdef01234567";
    let cases = [
        (
            format!("--upload-pack=touch {p}"),
            sha.to_string(),
            "main".to_string(),
            "BUILDKITE_REPO",
        ),
        (
            format!("ext::sh -c touch% {p}"),
            sha.into(),
            "main".into(),
            "BUILDKITE_REPO",
        ),
        ("ext::sh".into(), sha.into(), "main".into(), "remote helper"),
        (
            "https://example.com/acme/../../etc/passwd.git".into(),
            sha.into(),
            "main".into(),
            "'..'",
        ),
        (
            "https://example.com/acme/widgets.git".into(),
            format!("--upload-pack=touch {p}"),
            "main".into(),
            "BUILDKITE_COMMIT",
        ),
        (
            "https://example.com/acme/widgets.git".into(),
            "HEAD".into(),
            format!("--upload-pack=touch {p}"),
            "BUILDKITE_BRANCH",
        ),
        (
            "https://example.com/acme/widgets.git".into(),
            "HEAD".into(),
            "-b".into(),
            "BUILDKITE_BRANCH",
        ),
    ];
    for (repo, commit, branch, names) in cases {
        let out = sandbox.hook().job(&repo, &commit, &branch).run();
        // 1: what the agent exits with for a value it refuses.
        assert_eq!(
            out.code(),
            Some(1),
            "{repo} {commit} {branch}: {}",
            out.log()
        );
        assert!(out.log().contains(names), "{}", out.log());
        assert_eq!(out.log().lines().count(), 1, "one line: {}", out.log());
        assert!(!pwned.exists());
    }
}

#[test]
fn hostile_or_malformed_settings_are_refused_with_one_line_naming_the_variable() {
    let sandbox = Sandbox::new();
    let pwned = sandbox.dir.path().join("pwned");
    let p = pwned.display().to_string();
    let sha = "0123456789abcdef0123456789abcdef01234567";
    let upload_pack = format!("--upload-pack=touch {p}");
    // The variable refused, its value; every case runs as a GitHub pull-request build, which
    // only BUILDKITE_PULL_REQUEST looks at.
    let cases = [
        ("BUILDKITE_REFSPEC", upload_pack.as_str()),
        ("BUILDKITE_REFSPEC", "a:b:c"),
        ("BUILDKITE_PULL_REQUEST", "1;touch x"),
        ("BUILDKITE_GIT_FETCH_FLAGS", "-c 'unclosed"),
        ("BUILDKITE_GIT_CLONE_FLAGS", "\"x"),
        ("BUILDKITE_GIT_SPARSE_CHECKOUT_PATHS", "src,--stdin"),
        ("BUILDKITE_GIT_SUBMODULE_CLONE_CONFIG", "novalue"),
        ("BUILDKITE_GIT_SSH_KEY", "/no/such/key"),
        ("BUILDKITE_GIT_SPARSE_CHECKOUT_MODE", "sideways"),
    ];
    for (name, value) in cases {
        let out = sandbox
            .hook()
            .job("https://example.com/acme/widgets.git", sha, "main")
            .env("BUILDKITE_PIPELINE_PROVIDER", "github")
            .env(name, value)
            .run();
        assert_eq!(out.code(), Some(1), "{name}={value}: {}", out.log());
        assert!(out.log().contains(name), "{name}={value}: {}", out.log());
        assert_eq!(out.log().lines().count(), 1, "one line: {}", out.log());
        assert!(!pwned.exists());
    }
}

#[test]
fn an_empty_repository_url_means_no_checkout() {
    let sandbox = Sandbox::new();
    let out = sandbox.hook().job("", "HEAD", "main").run();
    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(std::fs::read_dir(&sandbox.checkout).unwrap().count(), 0);
}

#[test]
fn credentials_in_the_url_reach_only_the_checkouts_own_config() {
    let sandbox = Sandbox::new();
    let upstream = sandbox.upstream("acme/widgets.git");
    let server = GitHttpServer::start(&sandbox.server_root);
    let mirror = sandbox.mirror(&server.url("acme/widgets.git"), "acme/widgets.reference");
    let url = server.url_with_credentials("acme/widgets.git", "bob:s3cret-t0ken");

    let out = sandbox.hook().job(&url, &upstream.head(), "main").run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(
        sandbox.record()["mirror"]["status"],
        "hit",
        "the same repository, whatever the credentials"
    );
    let agent_state = Sandbox::snapshot(&sandbox.agent_state)
        .iter()
        .map(|f| std::fs::read_to_string(&f.0).unwrap_or_default())
        .collect::<String>();
    let mirror_files = Sandbox::snapshot(&mirror)
        .iter()
        .map(|f| String::from_utf8_lossy(&std::fs::read(&f.0).unwrap_or_default()).into_owned())
        .collect::<String>();
    for (place, text) in [
        ("log", out.log()),
        ("record", std::fs::read_to_string(&sandbox.record).unwrap()),
        ("agent", agent_state),
        ("mirror", mirror_files),
    ] {
        assert!(
            !text.contains("s3cret-t0ken"),
            "the secret reached the {place}"
        );
    }
    let config = std::fs::read_to_string(sandbox.checkout.join(".git/config")).unwrap();
    assert!(
        config.contains(&url),
        "git needs them in the clone's config, like a clone"
    );
}

/// A read-only bind mount of the mirror proves the hook never writes to it.
#[test]
fn checkout_from_a_read_only_bind_mount_of_the_mirror() {
    let sandbox = Sandbox::new();
    let upstream = sandbox.upstream("acme/widgets.git");
    let server = GitHttpServer::start(&sandbox.server_root);
    let url = server.url("acme/widgets.git");
    sandbox.mirror(&url, "acme/widgets.reference");

    let out = sandbox
        .hook()
        .job(&url, &upstream.head(), "main")
        .with_read_only(&sandbox.mirrors)
        .run();

    assert_ne!(out.code(), Some(99), "the mount was writable");
    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(sandbox.record()["mirror"]["status"], "hit");
    assert_eq!(sandbox.git(&["rev-parse", "HEAD"]), upstream.head());
}

/// A misconfigured checkout path (a home directory, `/`) must never be wiped.
#[test]
fn a_checkout_directory_holding_other_files_is_not_emptied() {
    let sandbox = Sandbox::new();
    let upstream = sandbox.upstream("acme/widgets.git");
    std::fs::write(sandbox.checkout.join("precious.txt"), "keep me").unwrap();

    let out = sandbox
        .hook()
        .job(
            &format!("file://{}", upstream.bare.display()),
            &upstream.head(),
            "main",
        )
        .run();

    assert_eq!(out.code(), Some(1), "{}", out.log());
    assert!(
        out.log().contains("refusing to delete them"),
        "{}",
        out.log()
    );
    assert_eq!(
        std::fs::read_to_string(sandbox.checkout.join("precious.txt")).unwrap(),
        "keep me"
    );
}

/// A previous checkout in the directory (a reused build path) is replaced.
#[test]
fn a_previous_checkout_is_replaced() {
    let sandbox = Sandbox::new();
    let upstream = sandbox.upstream("acme/widgets.git");
    let url = format!("file://{}", upstream.bare.display());
    let first = sandbox
        .hook()
        .job(&url, &upstream.rev("main~1"), "main")
        .run();
    assert_eq!(first.code(), Some(0), "{}", first.log());
    std::fs::write(sandbox.checkout.join("build-output.o"), "stale").unwrap();

    let out = sandbox.hook().job(&url, &upstream.head(), "main").run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(sandbox.git(&["rev-parse", "HEAD"]), upstream.head());
    assert!(!sandbox.checkout.join("build-output.o").exists());
}

/// The agent passes settings nobody set as empty variables: they mean the default, and an
/// empty mirrors path turns mirrors off, as the agent reads it.
#[test]
fn empty_settings_mean_their_defaults_and_an_empty_mirrors_path_means_no_mirror() {
    let sandbox = Sandbox::new();
    let upstream = sandbox.upstream("acme/widgets.git");
    let url = format!("file://{}", upstream.bare.display());
    sandbox.mirror(&url, "acme/widgets.reference");
    let mut hook = sandbox.hook().job(&url, &upstream.head(), "main");
    for var in [
        "BUILDKITE_GIT_MIRRORS_PATH",
        "BUILDKITE_CHECKOUT_ATTEMPTS",
        "BUILDKITE_GIT_CHECKOUT_TIMEOUT",
        "BUILDKITE_GIT_MIRROR_CHECKOUT_MODE",
        "STATELESS_AGENT_STALL_TIMEOUT",
    ] {
        hook = hook.env(var, "");
    }

    let out = hook.run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let record = sandbox.record();
    assert_eq!(record["mirror"]["status"], "miss");
    assert!(record["mirror"]["reason"]
        .as_str()
        .unwrap()
        .contains("turns mirrors off"));
}

/// An image without git (or a wrong `GIT`) fails fast with what to install, not six retries.
#[test]
fn a_missing_git_is_a_configuration_error() {
    let sandbox = Sandbox::new();
    let out = sandbox
        .hook()
        .job("https://example.com/acme/widgets.git", "HEAD", "main")
        .env("GIT", "/nonexistent/git")
        .run();
    assert_eq!(out.code(), Some(1), "{}", out.log());
    assert!(out.log().contains("git was not found"), "{}", out.log());
    assert!(out.log().contains("set GIT to its path"), "{}", out.log());
}

/// A checkout directory that cannot be created: the error names it and what to check.
#[test]
fn an_unusable_checkout_directory_says_where_and_what_to_check() {
    let sandbox = Sandbox::new();
    let upstream = sandbox.upstream("acme/widgets.git");
    let blocker = sandbox.dir.path().join("a-file");
    std::fs::write(&blocker, "").unwrap();

    let out = sandbox
        .hook()
        .job(
            &format!("file://{}", upstream.bare.display()),
            &upstream.head(),
            "main",
        )
        .env("BUILDKITE_BUILD_CHECKOUT_PATH", blocker.join("checkout"))
        .env("BUILDKITE_CHECKOUT_ATTEMPTS", "2")
        .run();

    assert_eq!(out.code(), Some(1), "{}", out.log());
    let log = out.log();
    assert!(
        log.contains(&format!(
            "cannot prepare the checkout in {}",
            blocker.join("checkout").display()
        )),
        "{log}"
    );
    assert!(
        log.contains("check that the build directory is writable"),
        "{log}"
    );
    assert_eq!(sandbox.record()["attempts"], 2);
}

/// Abbreviations are resolved as git resolves them: a prefix shared by two commits is refused
/// (exit 1, "pass more digits"); a prefix a commit shares only with trees or blobs names the commit,
/// as `git checkout` would.
#[test]
fn an_abbreviation_is_refused_only_when_commits_share_it() {
    use std::collections::HashMap;
    let sandbox = Sandbox::new();
    let bare = sandbox.server_root.join("acme/many.git");
    let shape = stateless_e2e::synthetic::Shape {
        files: 300,
        commits: 1500,
        branches: 1,
        tags: 0,
        pulls: 0,
    };
    stateless_e2e::synthetic::generate(&bare, shape);
    let server = GitHttpServer::start(&sandbox.server_root);
    let url = server.url("acme/many.git");
    let objects = stateless_e2e::git::git(
        &bare,
        &[
            "cat-file",
            "--batch-all-objects",
            "--batch-check=%(objectname) %(objecttype)",
        ],
    );
    let mut by_prefix: HashMap<&str, Vec<(&str, &str)>> = HashMap::new();
    for line in objects.lines() {
        let (id, kind) = line.split_once(' ').unwrap();
        by_prefix.entry(&id[..4]).or_default().push((id, kind));
    }
    let commits = |v: &Vec<(&str, &str)>| v.iter().filter(|(_, k)| *k == "commit").count();
    let ambiguous = by_prefix
        .iter()
        .find(|(_, v)| commits(v) >= 2)
        .map(|(p, _)| *p);
    let shared = by_prefix
        .iter()
        .find(|(_, v)| commits(v) == 1 && v.len() >= 2)
        .map(|(p, v)| (*p, v.iter().find(|(_, k)| *k == "commit").unwrap().0));

    let ambiguous = ambiguous.expect("1,500 commits share some 4-digit prefix");
    let out = sandbox.hook().job(&url, ambiguous, "main").run();
    assert_eq!(out.code(), Some(1), "{}", out.log());
    assert!(out.log().contains("more digits"), "{}", out.log());

    let (prefix, commit) = shared.expect("a commit shares a prefix with a tree or blob");
    sandbox.fresh_checkout_dir();
    let out = sandbox.hook().job(&url, prefix, "main").run();
    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(sandbox.git(&["rev-parse", "HEAD"]), commit);
}
