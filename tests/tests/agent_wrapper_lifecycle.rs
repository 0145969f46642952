//! agent-wrapper under the real agent's lifecycle (`../shared/notes/agent-wrapper-gap.md`): after
//! the job's command ends the agent still reports the result (log tail, FinishJob) while busy, so
//! the wrapper takes the agent's own `/status.json` as the truth and never signals a job that is
//! reporting; cancel timing follows the agent's version; a paused agent, a refused job, a HUP
//! during registration and an old agent each end as documented. Each scenario runs the real
//! wrapper as PID 1 of its own PID namespace with the stand-in agent (`tests/src/standin_start.rs`
//! says what of v3.137 / 4.0 it models).

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use serde_json::Value;
use stateless_e2e::sandbox::{finish, namespace_init, wait_for, Invocation, Sandbox};

fn wrapper(s: &Sandbox) -> Invocation {
    s.agent_wrapper()
        .env("AGENT_WRAPPER_IDLE_TIMEOUT", "20s")
        .env("AGENT_WRAPPER_STATUS_INTERVAL", "500ms")
        .env("BUILDKITE_STANDIN_JOB_AFTER", "0")
}

/// Whether the stand-in reported its job's result to "Buildkite" (FinishJob returned).
fn result_reported(s: &Sandbox) -> bool {
    std::fs::read_dir(s.agent_state.join("finished")).is_ok_and(|mut d| d.next().is_some())
}

/// The job record the hooks write in the wrapper's state directory.
fn job_record(s: &Sandbox) -> Option<Value> {
    let path = s.record.parent().unwrap().join("job-record.json");
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// Runs `wrapper` as PID 1, stops the pod (SIGTERM) once the job's command has ended, and
/// waits for the end.
fn stop_once_the_command_ended(
    s: &Sandbox,
    wrapper: Invocation,
) -> stateless_e2e::sandbox::Finished {
    let child = wrapper.as_pid1().spawn();
    let init = namespace_init(&child);
    wait_for("the job's command to end", || {
        job_record(s).is_some_and(|r| !r["finished_at"].is_null())
    });
    kill(init, Signal::SIGTERM).unwrap();
    finish(child)
}

/// Row A2/A3: FinishJob (with the log tail) takes 90 s, past the 60 s watchdog. The agent is busy
/// all along, so nothing is signalled, and the job's result reaches Buildkite.
#[test]
fn a_finish_that_takes_90s_is_never_signalled() {
    let s = Sandbox::new();
    let out = wrapper(&s)
        .env("AGENT_WRAPPER_WATCHDOG", "60s")
        .env("BUILDKITE_STANDIN_FINISH_DELAY", "90")
        .as_pid1()
        .run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let r = s.exit_report(&out);
    assert_eq!(r["reason"], "job-finished", "{r}");
    assert!(r.get("stop").is_none(), "{r}");
    assert!(r.get("signals_forwarded").is_none(), "{r}");
    assert!(result_reported(&s));
    assert!(r["duration_ms"].as_u64().unwrap() >= 90_000, "{r}");
}

/// W1: a pod stop while the job reports its result. The stop deadline passes during the report;
/// no QUIT follows, the pod's TERM stays the cause, the result is sent.
#[test]
fn a_pod_stop_while_the_job_reports_sends_no_quit() {
    let s = Sandbox::new();
    let out = stop_once_the_command_ended(
        &s,
        wrapper(&s)
            .env("AGENT_WRAPPER_STOP_DEADLINE", "1s")
            .env("BUILDKITE_STANDIN_FINISH_DELAY", "5"),
    );

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let r = s.exit_report(&out);
    assert_eq!(r["reason"], "stopped", "{r}");
    assert_eq!(r["stop"], "signal 15", "no escalation: {r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("the job finished first"),
        "{r}"
    );
    assert_eq!(r["signals_forwarded"], serde_json::json!([15]));
    assert!(result_reported(&s));
    assert!(
        out.log()
            .contains("not signalling the agent while it reports"),
        "{}",
        out.log()
    );
}

/// A5: a cancel whose command ignores TERM is SIGKILLed, so pre-exit never runs. The wrapper
/// still sees the job end (the agent turns idle), and the pod ends as a stop.
#[test]
fn a_cancel_that_kills_the_job_before_pre_exit_still_ends_the_pod_correctly() {
    let s = Sandbox::new();
    let started = s.dir.path().join("command-started");
    let child = wrapper(&s)
        .env("AGENT_WRAPPER_STOP_DEADLINE", "500ms")
        .env(
            "BUILDKITE_STANDIN_COMMAND",
            format!("trap '' TERM; touch {}; sleep 300", started.display()),
        )
        .as_pid1()
        .spawn();
    let init = namespace_init(&child);
    wait_for("the command", || started.exists());
    kill(init, Signal::SIGTERM).unwrap();
    let out = finish(child);

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let r = s.exit_report(&out);
    assert_eq!(r["reason"], "stopped", "{r}");
    assert!(r["stop"].as_str().unwrap().contains("Quit"), "{r}");
    assert!(r["job"]["finished_at"].is_null(), "pre-exit never ran: {r}");
    assert!(
        out.log().contains("its pre-exit hook did not run"),
        "{}",
        out.log()
    );
    assert!(result_reported(&s));
    s.assert_no_leftover_processes();
}

/// B7: cancel timing follows the agent's version. The wrapper passes its cancel grace to the agent
/// (3.x `--cancel-grace-period`, 4.x `--cancel-signal-timeout` and `--cancel-cleanup-timeout`),
/// and kills only after the agent's own forced exit was due: here the agent, stuck reporting a
/// cancelled job, exits 1 by itself at its window (3 s on 3.x, 2 + 5 + 1 = 8 s on 4.x).
#[test]
fn cancel_timing_follows_the_agents_version() {
    for (version, window) in [("3.137.0", 3), ("4.0.0-beta.15", 8)] {
        let s = Sandbox::new();
        let started = s.dir.path().join("command-started");
        let child = wrapper(&s)
            .env("BUILDKITE_STANDIN_VERSION", version)
            .env("AGENT_WRAPPER_STOP_DEADLINE", "200ms")
            .env("BUILDKITE_STANDIN_FINISH_DELAY", "60")
            .env(
                "BUILDKITE_STANDIN_COMMAND",
                format!("touch {}; sleep 300", started.display()),
            )
            .as_pid1()
            .spawn();
        let init = namespace_init(&child);
        wait_for("the command", || started.exists());
        let stopped = Instant::now();
        kill(init, Signal::SIGTERM).unwrap();
        let out = finish(child);
        let took = stopped.elapsed();

        let r = s.exit_report(&out);
        assert_eq!(
            r["agent_exit_code"], 1,
            "{version}: the agent's forced exit: {r}"
        );
        assert!(
            r["stop"].as_str().unwrap().contains("Quit"),
            "{version}: {r}"
        );
        let window = Duration::from_secs(window);
        assert!(
            took >= window && took < window + Duration::from_secs(2),
            "{version}: {took:?}"
        );
        assert!(
            out.log().contains("Timed out waiting for agents to exit"),
            "{}",
            out.log()
        );
    }
}

/// A7: a paused agent never gets a job and never idles out; the wrapper's job deadline ends it.
#[test]
fn a_paused_agent_is_stopped_at_the_job_deadline() {
    let s = Sandbox::new();
    let started = Instant::now();
    let out = wrapper(&s)
        .env("AGENT_WRAPPER_IDLE_TIMEOUT", "1s")
        .env("AGENT_WRAPPER_JOB_DEADLINE", "2s")
        .env("BUILDKITE_STANDIN_MISBEHAVE", "pause")
        .as_pid1()
        .run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let r = s.exit_report(&out);
    assert_eq!(r["reason"], "no-job", "{r}");
    assert!(
        r["stop"].as_str().unwrap().starts_with("job deadline"),
        "{r}"
    );
    assert!(started.elapsed() < Duration::from_secs(6));
}

/// A6: a job refused before its hooks (signature, allowlist) is the agent's one job: it exits 0
/// without a hook having run. That is not an idle timeout.
#[test]
fn a_job_refused_before_its_hooks_is_job_not_run() {
    let s = Sandbox::new();
    let out = wrapper(&s)
        .env("BUILDKITE_STANDIN_MISBEHAVE", "refuse-job")
        .as_pid1()
        .run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let r = s.exit_report(&out);
    assert_eq!(r["reason"], "job-not-run", "{r}");
}

/// B1: a HUP while the agent registers (it has no handlers yet, so HUP would kill it) is held,
/// not forwarded; once the agent is up, HUP is forwarded (and ignored by it).
#[test]
fn a_hup_during_registration_is_held_and_the_agent_lives() {
    let s = Sandbox::new();
    let child = wrapper(&s)
        .env("BUILDKITE_STANDIN_REGISTER_DELAY", "2")
        .env("BUILDKITE_STANDIN_JOB_AFTER", "1")
        .env("BUILDKITE_STANDIN_COMMAND", "sleep 1")
        .as_pid1()
        .spawn();
    let init = namespace_init(&child);
    std::thread::sleep(Duration::from_millis(500));
    kill(init, Signal::SIGHUP).unwrap();
    wait_for("the job", || job_record(&s).is_some());
    kill(init, Signal::SIGHUP).unwrap();
    let out = finish(child);

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let r = s.exit_report(&out);
    assert_eq!(r["reason"], "job-finished", "{r}");
    assert_eq!(r["signals_held"], serde_json::json!([1]), "{r}");
    assert_eq!(r["signals_forwarded"], serde_json::json!([1]), "{r}");
}

/// A9/A10: agents older than 3.136 are refused before they start, naming the minimum.
#[test]
fn an_agent_older_than_the_minimum_is_refused_at_preflight() {
    let s = Sandbox::new();
    let out = wrapper(&s)
        .env("BUILDKITE_STANDIN_VERSION", "3.127.0")
        .as_pid1()
        .run();

    assert_eq!(out.code(), Some(78), "{}", out.log());
    let r = s.exit_report(&out);
    assert_eq!(r["reason"], "config-error");
    let message = r["message"].as_str().unwrap();
    assert!(
        message.contains("3.127.0") && message.contains("3.136.0"),
        "{message}"
    );
    assert!(
        !s.agent_state.join("finished").exists(),
        "the agent never started"
    );
}

/// C3: pipeline env cannot move the records the wrapper reads; C4: an `fd://` token reaches the
/// agent; C6: `/docker-entrypoint.d` scripts run first and the agent starts through
/// `ssh-env-config.sh`, as the official image's entrypoint does.
#[test]
fn records_tokens_and_the_official_entrypoint() {
    let s = Sandbox::new();
    let job_env = s.dir.path().join("job-env.json");
    let elsewhere = s.dir.path().join("elsewhere");
    std::fs::write(
        &job_env,
        serde_json::json!({
            "STATELESS_AGENT_JOB_RECORD": elsewhere.join("job.json"),
            "AGENT_WRAPPER_JOB_EVENTS": elsewhere.join("events"),
        })
        .to_string(),
    )
    .unwrap();
    let entrypoint_d = s.dir.path().join("entrypoint.d");
    std::fs::create_dir(&entrypoint_d).unwrap();
    let ran = s.dir.path().join("entrypoint-ran");
    executable(
        &entrypoint_d.join("10-mark"),
        &format!("#!/bin/sh\ntouch {}\n", ran.display()),
    );
    let ssh_marker = s.dir.path().join("ssh-env-config-ran");
    let ssh_env_config = s.dir.path().join("ssh-env-config.sh");
    // What the official script does last: `exec "$@"` (buildkite/docker-ssh-env-config).
    executable(
        &ssh_env_config,
        &format!("#!/bin/sh\ntouch {}\nexec \"$@\"\n", ssh_marker.display()),
    );
    let token = s.dir.path().join("token");
    std::fs::write(&token, "s3cret-from-fd\n").unwrap();

    let out = wrapper(&s)
        .env("BUILDKITE_STANDIN_JOB_ENV", &job_env)
        .env("AGENT_WRAPPER_ENTRYPOINT_D", &entrypoint_d)
        .env("AGENT_WRAPPER_SSH_ENV_CONFIG", &ssh_env_config)
        .env("BUILDKITE_AGENT_TOKEN", "fd://7")
        .wrapped(&[
            "sh",
            "-c",
            &format!("exec 7<{}; exec \"$@\"", token.display()),
            "sh",
        ])
        .as_pid1()
        .run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let r = s.exit_report(&out);
    assert_eq!(r["reason"], "job-finished", "{r}");
    assert!(r["job"]["started_at"].is_u64(), "the wrapper's record: {r}");
    assert!(!elsewhere.exists(), "the pipeline's paths were not used");
    assert!(ran.exists() && ssh_marker.exists());
    assert!(!out.log().contains("s3cret-from-fd"));

    // A failing script stops the pod before the agent, as `run-parts --exit-on-error` does.
    executable(&entrypoint_d.join("20-fail"), "#!/bin/sh\nexit 3\n");
    let out = wrapper(&s)
        .env("AGENT_WRAPPER_ENTRYPOINT_D", &entrypoint_d)
        .as_pid1()
        .run();
    assert_eq!(out.code(), Some(78), "{}", out.log());
    assert!(s.exit_report(&out)["message"]
        .as_str()
        .unwrap()
        .contains("entrypoint.d"));
}

fn executable(path: &Path, script: &str) {
    std::fs::write(path, script).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// W2: the watchdog acting during a pod stop (an agent idle after its job, deaf to TERM) does not
/// turn the stop into a watchdog failure: the pod's signal stays the cause.
#[test]
fn a_watchdog_during_a_pod_stop_keeps_the_stop_as_the_cause() {
    let s = Sandbox::new();
    let out = stop_once_the_command_ended(
        &s,
        wrapper(&s)
            .env("AGENT_WRAPPER_WATCHDOG", "500ms")
            .env("BUILDKITE_STANDIN_MISBEHAVE", "hang-after-job,ignore-term"),
    );

    let r = s.exit_report(&out);
    assert_eq!(r["reason"], "stopped", "{r}");
    assert_ne!(r["exit_code"], 80, "{r}");
    assert!(r["stop"].as_str().unwrap().starts_with("signal 15"), "{r}");
    assert!(result_reported(&s), "the job's result was reported first");
}

/// An agent whose health server never answers is never signalled while its job reports, and one
/// that then hangs is still bounded: the report deadline lets the watchdog act.
#[test]
fn an_agent_that_never_answers_its_status_is_bounded_by_the_report_deadline() {
    let s = Sandbox::new();
    let out = wrapper(&s)
        .env("BUILDKITE_STANDIN_MISBEHAVE", "no-health")
        .env("BUILDKITE_STANDIN_FINISH_DELAY", "2")
        .env("AGENT_WRAPPER_WATCHDOG", "500ms")
        .as_pid1()
        .run();
    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(s.exit_report(&out)["reason"], "job-finished");
    assert!(result_reported(&s));

    let s = Sandbox::new();
    let started = Instant::now();
    let out = wrapper(&s)
        .env("BUILDKITE_STANDIN_MISBEHAVE", "no-health,hang-after-job")
        .env("AGENT_WRAPPER_REPORT_DEADLINE", "2s")
        .as_pid1()
        .run();
    assert_eq!(out.code(), Some(80), "{}", out.log());
    let r = s.exit_report(&out);
    assert_eq!(r["reason"], "watchdog", "{r}");
    assert!(
        out.log().contains("AGENT_WRAPPER_REPORT_DEADLINE"),
        "{}",
        out.log()
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}
