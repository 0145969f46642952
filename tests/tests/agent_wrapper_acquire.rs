//! agent-wrapper as PID 1 running the stand-in agent in acquire mode (`BUILDKITE_AGENT_ACQUIRE_JOB`,
//! as a Stacks-API dispatcher starts one pod per job) against the fake Buildkite: each outcome of
//! the acquire as buildkite/agent v3.137.0 has it (`core/client.go` `AcquireJob`,
//! `agent/agent_worker.go`, `clicommand/agent_start.go`), and the reason and code the wrapper
//! gives it. The stand-in's acquire waits are scaled down by `BUILDKITE_STANDIN_ACQUIRE_SCALE`.

use stateless_e2e::dispatch_world::{job_env, QUEUE};
use stateless_e2e::fake_buildkite::{BuildkiteFault, FakeBuildkite, JobState};
use stateless_e2e::sandbox::{finish, wait_for, Finished, Invocation, AGENT_TOKEN};
use stateless_e2e::scenario::Served;

/// A repository to check out, and a Buildkite with one scheduled job of it.
fn world() -> (Served, FakeBuildkite, String) {
    let served = Served::new("acme/widgets.git");
    let buildkite = FakeBuildkite::start(AGENT_TOKEN, QUEUE);
    buildkite.schedule(QUEUE, 1, &job_env(&served));
    let job = buildkite.jobs()[0].id.clone();
    (served, buildkite, job)
}

/// The wrapper, as PID 1, whose agent is told to acquire `job`.
fn acquiring(served: &Served, buildkite: &FakeBuildkite, job: &str) -> Invocation {
    served
        .sandbox
        .agent_wrapper()
        .env("AGENT_WRAPPER_IDLE_TIMEOUT", "20s")
        .env("AGENT_WRAPPER_STATUS_INTERVAL", "300ms")
        .env("BUILDKITE_AGENT_ENDPOINT", buildkite.endpoint())
        .env("BUILDKITE_AGENT_TAGS", format!("queue={QUEUE}"))
        .env("BUILDKITE_AGENT_ACQUIRE_JOB", job)
        .env("BUILDKITE_STANDIN_ACQUIRE_SCALE", "0.05")
        .as_pid1()
}

fn state(buildkite: &FakeBuildkite, job: &str) -> JobState {
    buildkite.jobs().iter().find(|j| j.id == job).unwrap().state
}

/// The report, after checking that nothing the pod started is still running.
fn report(served: &Served, out: &Finished) -> serde_json::Value {
    served.sandbox.assert_no_leftover_processes();
    served.sandbox.exit_report(out)
}

#[test]
fn a_scheduled_job_is_acquired_and_run_and_the_report_names_it() {
    let (served, buildkite, job) = world();

    let out = acquiring(&served, &buildkite, &job).run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let r = report(&served, &out);
    assert_eq!(r["reason"], "job-finished");
    assert_eq!(r["acquire_job"], job.as_str());
    assert_eq!(r["job"]["job_id"], job.as_str());
    assert_eq!(r["job"]["command_exit_status"], 0);
    assert_eq!(r["checkout"]["outcome"], "succeeded");
    let done = buildkite.jobs()[0].clone();
    assert_eq!(done.state, JobState::Finished);
    assert_eq!(done.exit_status.as_deref(), Some("0"));
    // Registered out of Buildkite's dispatch, acquired at the first try with the agent's headers.
    assert_eq!(buildkite.registrations_ignoring_dispatches(), 1);
    let acquires = buildkite.acquires();
    assert_eq!(acquires.len(), 1);
    assert_eq!(acquires[0].job, job);
    assert_eq!(acquires[0].lock.as_deref(), Some("1"));
    assert_eq!(acquires[0].backoff_sequence.as_deref(), Some("0"));
}

#[test]
fn a_job_already_run_or_cancelled_is_refused_with_its_own_code() {
    let (served, buildkite, job) = world();
    let first = acquiring(&served, &buildkite, &job).run();
    assert_eq!(first.code(), Some(0), "{}", first.log());

    // The same job again: Buildkite answers 422, the agent exits 27, and is not retried.
    let again = acquiring(&served, &buildkite, &job).run();

    assert_eq!(again.code(), Some(82), "{}", again.log());
    let r = report(&served, &again);
    assert_eq!(r["reason"], "acquire-rejected");
    assert_eq!(r["agent_exit_code"], 27);
    assert_eq!(r["acquire_job"], job.as_str());
    assert!(r.get("job").is_none(), "no job ran: {r}");
    assert_eq!(buildkite.acquires().len(), 2);
    assert_eq!(state(&buildkite, &job), JobState::Finished);

    // A job cancelled before any agent took it.
    buildkite.schedule(QUEUE, 1, &job_env(&served));
    let cancelled = buildkite.jobs()[1].id.clone();
    assert_eq!(buildkite.cancel_scheduled(QUEUE), 1);
    let out = acquiring(&served, &buildkite, &cancelled).run();
    assert_eq!(out.code(), Some(82), "{}", out.log());
    assert_eq!(report(&served, &out)["reason"], "acquire-rejected");
}

#[test]
fn a_job_unlocked_within_the_agents_retries_runs() {
    let (served, buildkite, job) = world();
    buildkite.lock(&job);

    let wrapper = acquiring(&served, &buildkite, &job).spawn();
    wait_for("two acquire attempts", || buildkite.acquires().len() >= 2);
    buildkite.unlock(&job);
    let out = finish(wrapper);

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let r = report(&served, &out);
    assert_eq!(r["reason"], "job-finished");
    assert_eq!(r["job"]["job_id"], job.as_str());
    assert_eq!(state(&buildkite, &job), JobState::Finished);
    let sequence: Vec<_> = buildkite
        .acquires()
        .into_iter()
        .map(|a| a.backoff_sequence.unwrap())
        .collect();
    let expected: Vec<_> = (0..sequence.len()).map(|n| n.to_string()).collect();
    assert_eq!(
        sequence, expected,
        "each retry counts in the backoff header"
    );
}

#[test]
fn a_job_locked_throughout_is_not_acquired_and_says_so() {
    let (served, buildkite, job) = world();
    buildkite.lock(&job);

    let out = acquiring(&served, &buildkite, &job).run();

    // v3.137.0 logs the failure and exits 0 at its first ping; the wrapper gives it its own code.
    assert_eq!(out.code(), Some(83), "{}", out.log());
    let r = report(&served, &out);
    assert_eq!(r["reason"], "acquire-failed");
    assert_eq!(r["agent_exit_code"], 0);
    assert_eq!(r["acquire_job"], job.as_str());
    assert!(out.stdout.contains("Failed to acquire and run job"));
    let sequence: Vec<_> = buildkite
        .acquires()
        .into_iter()
        .map(|a| a.backoff_sequence.unwrap())
        .collect();
    assert_eq!(sequence, ["0", "1", "2", "3", "4", "5", "6"]);
    assert_eq!(state(&buildkite, &job), JobState::Scheduled);
}

#[test]
fn a_job_buildkite_does_not_know_is_not_retried() {
    let (served, buildkite, _) = world();
    let unknown = "01900000-0000-7000-8000-999999999999";

    let out = acquiring(&served, &buildkite, unknown).run();

    assert_eq!(out.code(), Some(83), "{}", out.log());
    assert_eq!(report(&served, &out)["reason"], "acquire-failed");
    assert_eq!(buildkite.acquires().len(), 1, "a 404 is not retried");
    assert_eq!(buildkite.jobs()[0].state, JobState::Scheduled);
}

#[test]
fn rate_limits_and_server_errors_are_retried_then_the_job_runs() {
    let (served, buildkite, job) = world();
    buildkite.inject_acquire(BuildkiteFault::Status(429), 1);
    buildkite.inject_acquire(BuildkiteFault::Status(503), 1);

    let out = acquiring(&served, &buildkite, &job).run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let r = report(&served, &out);
    assert_eq!(r["reason"], "job-finished");
    assert_eq!(r["job"]["job_id"], job.as_str());
    assert_eq!(buildkite.acquires().len(), 3);
    assert_eq!(state(&buildkite, &job), JobState::Finished);
}
