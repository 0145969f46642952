//! The image as a fleet runs it, in a real container runtime (podman with runc): the project's
//! Dockerfile built against local stand-ins for its bases, populate-mirror filling a mirror
//! directory mounted read-write, and agent pods with that directory mounted read-only, one job
//! each, ending the ways docs/agent-wrapper.md documents. Without podman they say so and skip;
//! CI provisions with `--require`, so there they always run. The agent runs with the image's real
//! `buildkite-agent.cfg` (the stand-in reads it as the agent does), so configuration → job
//! environment → checkout hook is what the first scenario checks. The image says what it is: its
//! version label (the release pipeline's `VERSION` build argument) is the workspace's version, the
//! one its binaries print.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stateless_e2e::container::{
    agent_image, missing_runtime, Container, Podman, IMAGE, IMAGE_UID, VERSION,
};
use stateless_e2e::sandbox::AGENT_TOKEN;
use stateless_e2e::scenario::Served;

/// Where the image's checkout hook looks for the mirror volume.
const MIRRORS: &str = "/buildkite-git-references";

/// Whether to skip: the container runtime is not installed here (said once per scenario).
fn no_runtime() -> bool {
    let missing = missing_runtime();
    if let Some(tool) = missing {
        eprintln!("skipping: {tool} is not installed (bash tests/provision.sh installs it)");
    }
    missing.is_some()
}

fn podman() -> &'static Podman {
    agent_image(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("container-image"))
}

/// A served repository and a mirror directory populate-mirror filled from a container, owned by
/// the image's user as a claim mounted with `fsGroup` is.
fn populated() -> (Served, PathBuf) {
    let s = Served::new("acme/widgets.git");
    let mirrors = s.sandbox.dir.path().join("volume");
    std::fs::create_dir(&mirrors).unwrap();
    std::os::unix::fs::chown(&mirrors, Some(IMAGE_UID), Some(IMAGE_UID)).unwrap();
    // As image/storage/shared/populate-cronjob.yaml runs it: the repository list from a mounted ConfigMap.
    let list = s.sandbox.dir.path().join("populate-config");
    std::fs::create_dir(&list).unwrap();
    std::fs::write(
        list.join("repositories"),
        format!("# served on loopback\n{}\n", s.url),
    )
    .unwrap();
    let out = podman()
        .container(IMAGE)
        .mount(&mirrors, MIRRORS, false)
        .mount(&list, "/etc/populate-mirror", true)
        .env(
            "POPULATE_MIRROR_REPOS_FILE",
            "/etc/populate-mirror/repositories",
        )
        .entrypoint("/usr/local/bin/populate-mirror")
        .run();
    assert_eq!(out.code(), Some(0), "populate-mirror: {}", out.log());
    assert!(mirrors.join("manifest.json").is_file());
    assert!(mirrors.join("acme/widgets.reference").is_symlink());
    (s, mirrors)
}

/// The host side of the pod's termination message file.
fn termination_log(s: &Served) -> PathBuf {
    s.sandbox.dir.path().join("termination-log")
}

/// An agent pod for one job of the served repository, with the termination message file mounted
/// where the kubelet puts it.
fn agent_pod<'p>(s: &Served) -> Container<'p> {
    let termination_log = termination_log(s);
    std::fs::write(&termination_log, "").unwrap();
    // The kubelet makes the file writable by any user.
    std::fs::set_permissions(
        &termination_log,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    podman()
        .container(IMAGE)
        .mount(&termination_log, "/dev/termination-log", false)
        .env("BUILDKITE_AGENT_TOKEN", AGENT_TOKEN)
        .env("BUILDKITE_STANDIN_JOB_AFTER", "0.1")
        .env("AGENT_WRAPPER_CANCEL_GRACE", "3s")
        .env("BUILDKITE_REPO", &s.url)
        .env("BUILDKITE_COMMIT", &s.upstream.head())
        .env("BUILDKITE_BRANCH", "main")
}

/// The report the wrapper left in the termination message file.
fn termination_message(s: &Served) -> serde_json::Value {
    let text = std::fs::read_to_string(termination_log(s)).unwrap();
    assert!(!text.contains(AGENT_TOKEN), "the token leaked: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"))
}

#[test]
fn one_job_checks_out_from_the_read_only_mirror_and_the_pod_reports_it() {
    if no_runtime() {
        return;
    }
    let (s, mirrors) = populated();
    let before = std::fs::read_link(mirrors.join("acme/widgets.reference")).unwrap();

    let out = agent_pod(&s)
        .mount(&mirrors, MIRRORS, true)
        .env(
            "BUILDKITE_STANDIN_COMMAND",
            // The job sees the checkout, runs as the image's user, and can change neither the
            // mirror volume nor the global hooks the next job would run.
            "test -f README.md && test \"$(id -u)\" = 10001 \
             && ! touch /buildkite-git-references/x 2>/dev/null \
             && ! ln -sf /bin/true /buildkite/hooks/checkout 2>/dev/null && echo built",
        )
        .run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert!(out.stdout.contains("built"), "{}", out.log());
    let report = termination_message(&s);
    assert_eq!(report["reason"], "job-finished");
    assert_eq!(report["exit_code"], 0);
    assert_eq!(report["job"]["command_exit_status"], 0);
    assert_eq!(report["checkout"]["outcome"], "succeeded");
    assert_eq!(report["checkout"]["mirror"], "hit");
    assert_eq!(report["checkout"]["commit"], s.upstream.head().as_str());
    let last_line = out.stdout.lines().last().unwrap_or_default();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(last_line).ok(),
        Some(report),
        "the report is also the last line on stdout"
    );
    assert!(!out.log().contains(AGENT_TOKEN));
    assert_eq!(
        std::fs::read_link(mirrors.join("acme/widgets.reference")).unwrap(),
        before
    );
    assert!(!mirrors.join("x").exists());
}

#[test]
fn podman_stop_during_a_long_job_stops_gracefully_then_cancels_at_the_deadline() {
    if no_runtime() {
        return;
    }
    let (s, mirrors) = populated();
    let pod = agent_pod(&s)
        .mount(&mirrors, MIRRORS, true)
        .env("AGENT_WRAPPER_STOP_DEADLINE", "3s")
        .env("AGENT_WRAPPER_CANCEL_GRACE", "5s")
        .env("BUILDKITE_STANDIN_COMMAND", "echo job-running; sleep 300")
        .start();
    pod.wait_for_output("job-running", Duration::from_secs(60));

    let stopping = Instant::now();
    // A grace period longer than deadline + cancel grace, as the Job template sets it.
    pod.stop(Duration::from_secs(30));
    let code = pod.wait();
    let took = stopping.elapsed();

    // The agent cancelled the job at the deadline and exited 0 itself: not killed by podman.
    assert_eq!(code, 0, "{}", pod.logs());
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(20),
        "stopped after {took:?}"
    );
    let report = termination_message(&s);
    assert_eq!(report["reason"], "stopped", "{report}");
    assert_eq!(report["stop"], "signal 15, escalated to Quit", "{report}");
    assert_eq!(report["signals_forwarded"], serde_json::json!([15]));
    assert!(report["job"]["started_at"].is_u64(), "{report}");
    assert_eq!(report["checkout"]["mirror"], "hit");
}

#[test]
fn an_agent_that_hangs_after_its_job_is_ended_by_the_watchdog() {
    if no_runtime() {
        return;
    }
    let (s, mirrors) = populated();
    let out = agent_pod(&s)
        .mount(&mirrors, MIRRORS, true)
        .env("BUILDKITE_STANDIN_MISBEHAVE", "hang-after-job")
        .env("BUILDKITE_STANDIN_COMMAND", "true")
        .env("AGENT_WRAPPER_WATCHDOG", "1s")
        .env("AGENT_WRAPPER_STATUS_INTERVAL", "500ms")
        .run();

    assert_eq!(out.code(), Some(80), "{}", out.log());
    let report = termination_message(&s);
    assert_eq!(report["reason"], "watchdog");
    assert_eq!(report["exit_code"], 80);
    assert_eq!(report["job"]["command_exit_status"], 0);
}

#[test]
fn a_pod_without_a_token_fails_at_once_with_the_configuration_code() {
    if no_runtime() {
        return;
    }
    let s = Served::new("acme/widgets.git");
    let out = agent_pod(&s).env("BUILDKITE_AGENT_TOKEN", "").run();

    assert_eq!(out.code(), Some(78), "{}", out.log());
    let report = termination_message(&s);
    assert_eq!(report["reason"], "config-error");
    assert!(
        report["message"]
            .as_str()
            .unwrap()
            .contains("BUILDKITE_AGENT_TOKEN"),
        "{report}"
    );
}

#[test]
fn a_pod_without_the_mirror_volume_checks_out_from_the_server_and_says_so() {
    if no_runtime() {
        return;
    }
    let s = Served::new("acme/widgets.git");
    let out = agent_pod(&s)
        .env("BUILDKITE_STANDIN_COMMAND", "test -f README.md")
        .run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert!(
        out.stderr
            .contains("no mirror volume at /buildkite-git-references"),
        "{}",
        out.stderr
    );
    let report = termination_message(&s);
    assert_eq!(report["checkout"]["outcome"], "succeeded");
    assert_eq!(report["checkout"]["mirror"], "miss");
}

#[test]
fn a_mirror_volume_mounted_writable_is_warned_about() {
    if no_runtime() {
        return;
    }
    let (s, mirrors) = populated();
    let out = agent_pod(&s)
        .mount(&mirrors, MIRRORS, false)
        .env("BUILDKITE_STANDIN_COMMAND", "true")
        .run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert!(
        out.stderr
            .contains("the mirror volume is writable; mount it read-only in agent pods"),
        "{}",
        out.stderr
    );
}

/// The workspace's version: this crate inherits it (`version.workspace = true`).
fn workspace_version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

#[test]
fn the_image_is_labelled_with_the_workspace_version_its_binaries_print() {
    if no_runtime() {
        return;
    }
    let version = workspace_version();
    assert_eq!(
        VERSION, version,
        "the image is built as the workspace's version"
    );
    let label = |name: &str| {
        let format = format!("{{{{index .Labels \"org.opencontainers.image.{name}\"}}}}");
        podman()
            .ok(&["image", "inspect", "--format", &format, IMAGE])
            .trim()
            .to_string()
    };

    assert_eq!(label("version"), version);
    assert_eq!(label("title"), "stateless-agent");
    assert_eq!(label("licenses"), "MIT");
    assert_eq!(
        label("source"),
        "https://github.com/stateless-agent/stateless-agent"
    );
    for binary in [
        "job-dispatcher",
        "agent-wrapper",
        "checkout-hook",
        "populate-mirror",
    ] {
        let entrypoint = format!("/usr/local/bin/{binary}");
        let said = podman().ok(&[
            "run",
            "--rm",
            "--entrypoint",
            &entrypoint,
            IMAGE,
            "--version",
        ]);
        assert_eq!(
            said.trim(),
            format!("{binary} {version}"),
            "{binary} --version"
        );
    }
}
