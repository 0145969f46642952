//! The stand-in agent builds each job's environment from its configuration file, flags and
//! environment as buildkite-agent v3.137.0 does (`tests/src/standin_config.rs` names the source
//! files), so that configuration → job environment → checkout hook is one tested path: an agent
//! without `git-mirrors-path` turns every job's mirror off, the image's configuration turns the
//! volume on, and pipeline env cannot override the agent's checkout flags unless the checkout
//! override mode allows it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use stateless_e2e::sandbox::{bin, Sandbox, AGENT_TOKEN};
use stateless_e2e::scenario::Served;

/// The image's real agent configuration.
fn image_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/buildkite-agent.cfg")
}

/// One job through the stand-in's `start`, with an `environment` hook that records the job's
/// environment and the real checkout hook; the job's backend environment is `job`.
struct Job<'a> {
    sandbox: &'a Sandbox,
    cmd: Command,
}

impl<'a> Job<'a> {
    fn new(sandbox: &'a Sandbox, job: &[(&str, &str)]) -> Job<'a> {
        let hooks = sandbox.dir.path().join("agent-hooks");
        std::fs::create_dir_all(&hooks).unwrap();
        let dump = sandbox.dir.path().join("job-env");
        let script = format!("#!/bin/sh\nenv > {}\n", dump.display());
        let environment = hooks.join("environment");
        std::fs::write(&environment, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&environment, std::fs::Permissions::from_mode(0o755)).unwrap();
        let checkout = hooks.join("checkout");
        if !checkout.exists() {
            std::os::unix::fs::symlink(bin("checkout-hook"), checkout).unwrap();
        }
        let job: BTreeMap<&str, &str> = job.iter().copied().collect();
        let job_file = sandbox.dir.path().join("backend-job-env.json");
        std::fs::write(&job_file, serde_json::to_string(&job).unwrap()).unwrap();
        let mut cmd = Command::new(bin("buildkite-agent"));
        sandbox
            .job_environment(&mut cmd)
            .args(["start", "--disconnect-after-job"])
            .env("BUILDKITE_AGENT_TOKEN", AGENT_TOKEN)
            .env("BUILDKITE_BUILD_PATH", sandbox.dir.path().join("builds"))
            .env("BUILDKITE_HOOKS_PATH", &hooks)
            .env("BUILDKITE_STANDIN_STATE", &sandbox.agent_state)
            .env("BUILDKITE_STANDIN_JOB_AFTER", "0")
            .env("BUILDKITE_STANDIN_JOB_ENV", &job_file)
            .env("STATELESS_AGENT_CHECKOUT_RECORD", &sandbox.record);
        Job { sandbox, cmd }
    }

    fn agent_env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.cmd.env(key, value);
        self
    }

    /// Runs the agent; returns the job's environment as the `environment` hook saw it.
    fn run(mut self) -> BTreeMap<String, String> {
        let out = self.cmd.output().unwrap();
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(0), "{log}");
        let dump = std::fs::read_to_string(self.sandbox.dir.path().join("job-env")).unwrap();
        dump.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

#[test]
fn an_agent_without_git_mirrors_path_gives_every_job_an_empty_one_and_no_mirror() {
    let s = Served::new("acme/widgets.git");
    s.mirror("acme/widgets.reference");
    let commit = s.upstream.head();
    let job = [
        ("BUILDKITE_REPO", s.url.as_str()),
        ("BUILDKITE_COMMIT", commit.as_str()),
        ("BUILDKITE_BRANCH", "main"),
    ];

    let env = Job::new(&s.sandbox, &job).run();

    // Set, and empty: what the real agent gives every job when unconfigured.
    assert_eq!(
        env.get("BUILDKITE_GIT_MIRRORS_PATH").map(String::as_str),
        Some("")
    );
    assert_eq!(env["BUILDKITE_GIT_MIRRORS_SKIP_UPDATE"], "false");
    assert_eq!(env["BUILDKITE_GIT_CLONE_FLAGS"], "-v");
    assert_eq!(env["BUILDKITE_GIT_FETCH_FLAGS"], "-v --prune");
    assert_eq!(env["BUILDKITE_CHECKOUT_ATTEMPTS"], "6");
    assert_eq!(env["BUILDKITE_GIT_REMOTE_MIRROR_URL"], "");
    assert!(!env.contains_key("BUILDKITE_AGENT_TOKEN"));
    let record = s.sandbox.record();
    assert_eq!(record["outcome"], "succeeded");
    assert_eq!(record["mirror"]["status"], "miss");
    assert!(
        record["mirror"]["reason"]
            .as_str()
            .unwrap()
            .contains("set git-mirrors-path"),
        "{record}"
    );
}

#[test]
fn the_images_configuration_turns_the_mirror_volume_on() {
    let s = Served::new("acme/widgets.git");
    let commit = s.upstream.head();
    let job = [
        ("BUILDKITE_REPO", s.url.as_str()),
        ("BUILDKITE_COMMIT", commit.as_str()),
        ("BUILDKITE_BRANCH", "main"),
    ];

    let env = Job::new(&s.sandbox, &job)
        .agent_env("BUILDKITE_AGENT_CONFIG", image_config())
        .run();

    assert_eq!(
        env["BUILDKITE_GIT_MIRRORS_PATH"],
        "/buildkite-git-references"
    );
    assert_eq!(env["BUILDKITE_GIT_MIRRORS_SKIP_UPDATE"], "true");
    assert_eq!(env["BUILDKITE_PLUGINS_PATH"], "/buildkite/plugins");
    // A non-empty variable beats the file, as in the agent's loader.
    assert_eq!(
        env["BUILDKITE_BUILD_PATH"],
        s.sandbox.dir.path().join("builds").display().to_string()
    );
    assert_eq!(
        env["BUILDKITE_CONFIG_PATH"],
        image_config().display().to_string()
    );
}

#[test]
fn pipeline_env_can_choose_sparse_paths_but_not_the_agents_checkout_flags() {
    let s = Served::new("acme/widgets.git");
    s.mirror("acme/widgets.reference");
    let commit = s.upstream.head();
    let url = s.url.clone();
    let job = [
        ("BUILDKITE_REPO", url.as_str()),
        ("BUILDKITE_COMMIT", commit.as_str()),
        ("BUILDKITE_BRANCH", "main"),
        ("BUILDKITE_GIT_CLONE_FLAGS", "--depth=1"),
        ("BUILDKITE_GIT_SPARSE_CHECKOUT_PATHS", "src"),
        ("BUILDKITE_GIT_MIRRORS_PATH", "/elsewhere"),
    ];
    let mirrors = s.sandbox.mirrors.display().to_string();

    let env = Job::new(&s.sandbox, &job)
        .agent_env("BUILDKITE_GIT_MIRRORS_PATH", &mirrors)
        .run();
    assert_eq!(env["BUILDKITE_CHECKOUT_OVERRIDE_MODE"], "from-job");
    assert_eq!(env["BUILDKITE_GIT_CLONE_FLAGS"], "-v");
    assert_eq!(env["BUILDKITE_GIT_SPARSE_CHECKOUT_PATHS"], "src");
    assert_eq!(
        env["BUILDKITE_GIT_MIRRORS_PATH"], mirrors,
        "never the job's"
    );
    assert_eq!(s.sandbox.record()["mirror"]["status"], "hit");
    let checkout = s.sandbox.dir.path().join("builds/standin/pipeline");
    assert!(checkout.join("src/lib.rs").exists());
    assert!(!checkout.join("docs/guide.md").exists(), "sparse");

    s.sandbox.fresh_checkout_dir();
    let env = Job::new(&s.sandbox, &job)
        .agent_env("BUILDKITE_GIT_MIRRORS_PATH", &mirrors)
        .agent_env("BUILDKITE_CHECKOUT_OVERRIDE_MODE", "none")
        .run();
    assert_eq!(env["BUILDKITE_GIT_CLONE_FLAGS"], "--depth=1");

    let env = Job::new(&s.sandbox, &job)
        .agent_env("BUILDKITE_GIT_MIRRORS_PATH", &mirrors)
        .agent_env("BUILDKITE_NO_COMMAND_EVAL", "true")
        .run();
    assert_eq!(env["BUILDKITE_CHECKOUT_OVERRIDE_MODE"], "strict");
    assert_eq!(env["BUILDKITE_GIT_SPARSE_CHECKOUT_PATHS"], "");
}
