//! The stacks mode end to end, through the real binaries: jobs are queued on the fake Buildkite,
//! whose fake Stacks API (`tests/src/fake_buildkite.rs`, modelled on Buildkite's docs and the
//! stacksapi Go client) the real job-dispatcher lists and reserves; it creates one Job per
//! Buildkite job on the fake API server; the fake cluster runs each pod as a real container, whose
//! stand-in agent acquires exactly its job (`--acquire-job`, as buildkite/agent v3.137.0 does).
//! Each scenario checks that every job ran once or was finished with its reason, that nothing is
//! left reserved, and that the token is nowhere. Without root (the kubelet's namespaces) these
//! say so and skip.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use stateless_e2e::dispatch_world::*;
use stateless_e2e::dispatcher_process::Running;
use stateless_e2e::fake_buildkite::{BuildkiteFault, JobState};
use stateless_e2e::sandbox::Finished;

/// A tag nobody pushed.
const BROKEN: &str = "registry.example.com/stateless-agent:no-such-tag";

/// The stack key the dispatcher derives from the namespace and queue.
const STACK: &str = "job-dispatcher-ci-kubernetes";

/// The dispatcher in stacks mode, with `settings` added.
fn stacks(w: &World, name: &str, settings: &[(&str, &str)]) -> Running {
    let mut command = w.dispatcher_command(name);
    command.env("DISPATCHER_SOURCE", "stacks");
    command.envs(settings.iter().copied());
    Running::spawn(&mut command)
}

/// Every job ran exactly once (one successful acquire), and none is left scheduled or reserved.
fn assert_each_ran_once(w: &World) {
    for job in w.buildkite.jobs() {
        assert_eq!(job.state, JobState::Finished, "{job:?}");
        assert_eq!(job.acquired, 1, "{job:?}");
    }
}

/// The scopes of the Stacks calls made so far, with their statuses.
fn calls(w: &World, scope: &str) -> usize {
    let calls = w.buildkite.stack_calls();
    calls.iter().filter(|c| c.scope == scope).count()
}

#[test]
fn a_burst_of_50_jobs_each_runs_once_in_a_pod_of_its_own() {
    if skip() {
        return;
    }
    let w = World::new(60, None);
    w.schedule(50);
    let dispatcher = stacks(&w, "replica-a", &[]);
    let outcome = w.outcome(dispatcher, 50, Duration::from_secs(240));
    assert_each_ran_once(&w);
    // One pod per job, each agent registered to acquire and never dispatched other work.
    assert_eq!(outcome.pods.len(), 50);
    assert_eq!(outcome.jobs.len(), 50);
    assert_eq!(w.buildkite.registrations_ignoring_dispatches(), 50);
    for job in &outcome.jobs {
        let uuid = &job["metadata"]["labels"]["stateless-agent/job-uuid"];
        assert_eq!(
            job["metadata"]["name"],
            format!("buildkite-{}", uuid.as_str().unwrap())
        );
        assert!(ended(job, "Complete"), "{job:#}");
    }
    // Each job's timeline was told its Job was made, then each stage its pod reached before the
    // job ended (these jobs take a moment: some end before a tick sees their agent), once each.
    let jobs = w.buildkite.jobs();
    for job in &jobs {
        let told = job.notifications.join("\n");
        assert!(told.starts_with("Kubernetes Job buildkite-"), "{told}");
        let k = outcome
            .jobs
            .iter()
            .find(|k| k["metadata"]["name"] == format!("buildkite-{}", job.id))
            .unwrap();
        assert!(
            job.notifications.len() <= 4,
            "{told}\n{}\n{}",
            k["metadata"],
            outcome
                .dispatcher
                .lines()
                .filter(|l| l.contains(&job.id))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(job.notifications.iter().all(|n| n.len() <= 256));
    }
    let started = jobs.iter().filter(|j| {
        j.notifications
            .iter()
            .any(|n| n.starts_with("Agent started in pod"))
    });
    assert!(started.count() > 0);
    // Registered once per start, deregistered on the way out.
    let stacks = w.buildkite.stacks();
    assert_eq!(stacks.len(), 1);
    assert_eq!(stacks[0].key, STACK);
    assert!(!stacks[0].registered, "{stacks:?}");
    // Every reservation said how long it lasts.
    let reserves = w.buildkite.stack_calls();
    let reserves = reserves.iter().filter(|c| c.scope == "batch-reserve");
    assert!(reserves
        .clone()
        .all(|c| c.body["reservation_expiry_seconds"].as_u64() == Some(300)));
    assert!(reserves.count() >= 1);
}

/// A queue deeper than `--max-agents`: never more unfinished Jobs than that, each job reserved
/// only when its pod can be made, and the higher `priority` taken first.
#[test]
fn jobs_are_taken_by_priority_and_never_past_max_agents() {
    if skip() {
        return;
    }
    let mut w = World::new(10, None);
    w.job_env
        .insert("BUILDKITE_COMMAND".into(), "sleep 1".into());
    w.buildkite.schedule_with_priority(QUEUE, 6, &w.job_env, 0);
    let urgent = w.buildkite.schedule_with_priority(QUEUE, 3, &w.job_env, 10);
    let most = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::atomic::AtomicBool::new(false);
    let outcome = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let jobs = w.kube.objects("jobs", NS);
                let unfinished = jobs
                    .iter()
                    .filter(|j| !ended(j, "Complete") && !ended(j, "Failed"))
                    .count();
                most.fetch_max(unfinished, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let dispatcher = stacks(&w, "replica-a", &[("DISPATCHER_MAX_AGENTS", "2")]);
        let outcome = w.outcome(dispatcher, 9, Duration::from_secs(120));
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        outcome
    });
    assert_each_ran_once(&w);
    let most = most.into_inner();
    assert!((1..=2).contains(&most), "{most} unfinished Jobs at once");
    outcome.assert_held("at-max");
    // The order jobs were first reserved in: the three urgent ones before any other.
    let mut reserved: Vec<String> = Vec::new();
    for call in w
        .buildkite
        .stack_calls()
        .iter()
        .filter(|c| c.scope == "batch-reserve")
    {
        for job in call.body["job_uuids"].as_array().into_iter().flatten() {
            let job = job.as_str().unwrap().to_string();
            if !reserved.contains(&job) {
                reserved.push(job);
            }
        }
    }
    let first: BTreeSet<&String> = reserved.iter().take(3).collect();
    assert_eq!(first, urgent.iter().collect(), "{reserved:?}");
}

/// A tag nobody pushed: each pod waits in `ErrImagePull`/`ImagePullBackOff`; after the start
/// timeout its job is finished in Buildkite with the kubelet's reason and message and what
/// fixes it, and its Job deleted with a Warning Event. Nothing waits on. (Finish answered with
/// the 204 of stacksapi's test server, not the docs' 200: either is success.)
#[test]
fn a_broken_image_fails_each_job_in_buildkite_with_the_reason_within_the_start_timeout() {
    if skip() {
        return;
    }
    let took = failed_by_image(
        "registry.example.com/stateless-agent:no-such-tag",
        "4s",
        204,
    );
    // Within the start timeout of the pod's creation, give or take a tick and the pod's start.
    assert!(
        *took.iter().max().unwrap() < Duration::from_secs(4 + 4),
        "{took:?}"
    );
    eprintln!(
        "broken image: jobs failed in Buildkite {took:?} after they were queued (start timeout 4s)"
    );
}

/// An image reference that can never work fails its jobs at once, whatever the start timeout.
#[test]
fn an_invalid_image_name_fails_each_job_at_once() {
    if skip() {
        return;
    }
    let took = failed_by_image("Registry.Example.com/Stateless::agent", "5m", 200);
    assert!(
        *took.iter().max().unwrap() < Duration::from_secs(10),
        "{took:?}"
    );
    eprintln!("invalid image name: jobs failed in Buildkite {took:?} after they were queued (start timeout 5m)");
}

/// The fix for a broken image is a new template (a rollout of the dispatcher): pods made from
/// the old one never start, so their jobs are failed at once, saying so, and their places under
/// `--max-agents` go to the new template's pods, not after the start timeout.
#[test]
fn a_fixed_image_frees_the_broken_pods_places_at_once() {
    if skip() {
        return;
    }
    let w = World::with_missing_image(BROKEN);
    w.schedule(2);
    let limit = [("DISPATCHER_MAX_AGENTS", "2")];
    let broken = stacks(&w, "replica-a", &limit);
    wait("two pods failing to pull", Duration::from_secs(30), || {
        let pods = w.pods();
        let pulling = pods.iter().filter(|p| {
            let reason = &p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"];
            reason == "ErrImagePull" || reason == "ImagePullBackOff"
        });
        pulling.count() == 2
    });
    broken.stop();
    w.schedule(2);
    let (took, out) = roll_out_the_fix(&w, &limit);
    let jobs = w.buildkite.jobs();
    for old in &jobs[..2] {
        assert_eq!(
            old.exit_status.as_deref(),
            Some("-1"),
            "{old:?}\n{}",
            out.log()
        );
        let detail = old.finish_detail.clone().unwrap_or_default();
        assert!(detail.contains("older template"), "{detail}");
    }
    assert!(jobs[2..].iter().all(|j| j.acquired == 1));
    // Not the 5 minutes of the start timeout.
    assert!(took < Duration::from_secs(30), "{took:?}");
    eprintln!("a fixed image: the new jobs ran {took:?} after the rollout (max agents 2, start timeout 5m)");
}

/// While the image stays broken, the jobs queued after the first stuck pods are not taken onto
/// more broken pods: they wait, each told why on its timeline once, the hold is logged and
/// `dispatcher_blocked{reason="stuck"}` is 1, and no Job is made for them. The fix (a new
/// template) ends the streak, and they run at once.
#[test]
fn a_broken_image_holds_the_next_jobs_with_a_note_until_the_template_is_fixed() {
    if skip() {
        return;
    }
    let w = World::with_missing_image(BROKEN);
    w.schedule(2);
    let port = stateless_e2e::loopback::free_port();
    let listen = format!("127.0.0.1:{port}");
    let settings = [
        ("DISPATCHER_START_TIMEOUT", "3s"),
        ("DISPATCHER_STUCK_BACKOFF", "1h"),
        ("DISPATCHER_LISTEN", listen.as_str()),
    ];
    let broken = stacks(&w, "replica-a", &settings);
    wait("the first jobs failed", Duration::from_secs(60), || {
        let jobs = w.buildkite.jobs();
        jobs.iter().all(|j| j.state == JobState::Finished)
    });
    // The dispatcher has seen its streak (its own Event back), waiting jobs or not.
    wait_blocked(&listen, "stuck");
    w.schedule(3);
    wait_told(&w);
    // A few more ticks: still held, told once, no Job made.
    std::thread::sleep(Duration::from_secs(2));
    let metrics = stateless_e2e::loopback::http(&listen, "GET", "/metrics", None).1;
    let out = broken.stop();
    let jobs = w.buildkite.jobs();
    for held in &jobs[2..] {
        assert_eq!(held.state, JobState::Scheduled, "{held:?}\n{}", out.log());
        assert_eq!(held.notifications.len(), 1, "{held:?}");
        let note = &held.notifications[0];
        assert!(
            note.contains("never started (ErrImagePull")
                || note.contains("never started (ImagePullBackOff"),
            "{note}"
        );
        assert!(note.len() <= 256, "{note}");
    }
    assert!(w.kube.objects("jobs", NS).is_empty(), "{}", out.log());
    let blocked = "dispatcher_blocked{queue=\"kubernetes\",reason=\"stuck\"} 1";
    assert!(metrics.contains(blocked), "{metrics}");
    assert!(out.stderr.contains("\"reason\":\"stuck\""), "{}", out.log());
    let (took, out) = roll_out_the_fix(&w, &settings);
    let jobs = w.buildkite.jobs();
    assert!(jobs[..2]
        .iter()
        .all(|j| j.exit_status.as_deref() == Some("-1")));
    assert!(jobs[2..].iter().all(|j| j.acquired == 1), "{}", out.log());
    w.assert_no_secret(&out);
    eprintln!("a broken image: 2 jobs failed, 3 held with a note and no Job; after the fix they ran {took:?} after the rollout");
}

/// Kubernetes refuses the pods (a quota): the jobs already taken wait for theirs, the next ones
/// are not taken onto more refused Jobs but told why on their timelines in Kubernetes' words,
/// and `dispatcher_blocked{reason="failed-create"}` is 1. Once the quota frees up, every job
/// runs once, none failed.
#[test]
fn a_quota_refusal_holds_the_next_jobs_with_a_note_until_it_frees() {
    if skip() {
        return;
    }
    let w = World::new(20, Some(0));
    w.schedule(2);
    let port = stateless_e2e::loopback::free_port();
    let listen = format!("127.0.0.1:{port}");
    let dispatcher = stacks(&w, "replica-a", &[("DISPATCHER_LISTEN", listen.as_str())]);
    // The dispatcher has seen the refusal, waiting jobs or not.
    wait_blocked(&listen, "failed-create");
    w.schedule(2);
    wait_told(&w);
    let metrics = stateless_e2e::loopback::http(&listen, "GET", "/metrics", None).1;
    let blocked = "dispatcher_blocked{queue=\"kubernetes\",reason=\"failed-create\"} 1";
    assert!(metrics.contains(blocked), "{metrics}");
    assert_eq!(w.kube.objects("jobs", NS).len(), 2);
    for held in &w.buildkite.jobs()[2..] {
        assert_eq!(held.state, JobState::Scheduled, "{held:?}");
        let note = &held.notifications[0];
        assert!(
            note.starts_with("Kubernetes refuses this queue's agent pods"),
            "{note}"
        );
        assert!(note.contains("exceeded quota"), "{note}");
    }
    w.cluster.change(|spec| spec.quota_pods = None);
    let freed = Instant::now();
    let outcome = w.outcome(dispatcher, 4, Duration::from_secs(120));
    assert_each_ran_once(&w);
    outcome.assert_held("failed-create");
    for job in w.buildkite.jobs() {
        assert_eq!(job.exit_status.as_deref(), Some("0"), "{job:?}");
    }
    eprintln!(
        "quota refusal: 2 jobs held with a note; every job ran {:?} after the quota freed",
        freed.elapsed()
    );
}

/// Waits until every job after the first two has a note on its timeline.
fn wait_told(w: &World) {
    wait(
        "the next jobs told why they wait",
        Duration::from_secs(30),
        || {
            let jobs = w.buildkite.jobs();
            jobs[2..].iter().all(|j| !j.notifications.is_empty())
        },
    );
}

/// Waits until the dispatcher listening on `listen` reports `dispatcher_blocked{reason}` 1.
fn wait_blocked(listen: &str, reason: &str) {
    let blocked = format!("dispatcher_blocked{{queue=\"kubernetes\",reason=\"{reason}\"}} 1");
    wait(&blocked.clone(), Duration::from_secs(60), || {
        let metrics = stateless_e2e::loopback::http(listen, "GET", "/metrics", None).1;
        metrics.contains(&blocked)
    });
}

/// The fixed image rolled out (replica-b with `settings`) and the jobs after the first two run:
/// how long that took after the rollout, and what the dispatcher said.
fn roll_out_the_fix(w: &World, settings: &[(&str, &str)]) -> (Duration, Finished) {
    set_image(&w.template, stateless_e2e::dispatcher_process::AGENT_IMAGE);
    let rolled_out = Instant::now();
    let fixed = stacks(w, "replica-b", settings);
    wait("the later jobs run", Duration::from_secs(60), || {
        let jobs = w.buildkite.jobs();
        jobs[2..].iter().all(|j| j.state == JobState::Finished)
    });
    (rolled_out.elapsed(), fixed.stop())
}

/// Three jobs queued with the template's image set to `image`, which the cluster cannot run:
/// each is finished in Buildkite with exit status -1, the kubelet's reason and the fix, and its
/// Job goes with a Warning Event. How long after the queueing each job failed.
fn failed_by_image(image: &str, start_timeout: &str, finish_status: u16) -> Vec<Duration> {
    let w = World::with_missing_image(image);
    w.buildkite.finish_status(finish_status);
    let queued = Instant::now();
    w.schedule(3);
    let dispatcher = stacks(
        &w,
        "replica-a",
        &[("DISPATCHER_START_TIMEOUT", start_timeout)],
    );
    let mut took = Vec::new();
    wait("every job finished", Duration::from_secs(60), || {
        let jobs = w.buildkite.jobs();
        let done = jobs
            .iter()
            .filter(|j| j.state == JobState::Finished)
            .count();
        while took.len() < done {
            took.push(queued.elapsed());
        }
        done == 3
    });
    wait("the stuck Jobs gone", Duration::from_secs(10), || {
        w.kube.objects("jobs", NS).is_empty()
    });
    let out = dispatcher.stop();
    for job in w.buildkite.jobs() {
        assert_eq!(job.exit_status.as_deref(), Some("-1"), "{job:?}");
        assert_eq!(job.acquired, 0);
        let detail = job.finish_detail.clone().unwrap_or_default();
        let named = ["ErrImagePull", "ImagePullBackOff", "InvalidImageName"];
        assert!(named.iter().any(|r| detail.contains(r)), "{detail}");
        assert!(detail.contains("fix the template's image"), "{detail}");
        assert!(detail.len() <= 4096);
    }
    // No Stacks call failed (a finish answered 204 included).
    assert!(!out.stderr.contains("\"error\":"), "{}", out.log());
    let events = w.kube.objects("events", NS);
    let stuck = |e: &serde_json::Value| e["reason"] == "PodsStuck" && e["type"] == "Warning";
    assert!(events.iter().any(stuck));
    w.assert_no_secret(&out);
    took
}

/// A build cancelled while most of its pods wait for room: their Jobs are deleted within two
/// polls of the job states, and the running jobs finish as their agents see fit.
#[test]
fn a_cancelled_build_has_its_pending_pods_gone_within_two_polls() {
    if skip() {
        return;
    }
    let mut w = World::new(3, None);
    w.job_env
        .insert("BUILDKITE_COMMAND".into(), "sleep 3".into());
    w.schedule(12);
    let dispatcher = stacks(&w, "replica-a", &[("DISPATCHER_POLL_INTERVAL", "1s")]);
    wait("three jobs running", Duration::from_secs(60), || {
        let jobs = w.buildkite.jobs();
        jobs.iter().filter(|j| j.state == JobState::Running).count() == 3
    });
    let polls_before = calls(&w, "batch-load-job-states");
    let cancelled = w.buildkite.cancel_scheduled(QUEUE);
    assert_eq!(cancelled, 9);
    let canceled: BTreeSet<String> = w
        .buildkite
        .jobs()
        .into_iter()
        .filter(|j| j.state == JobState::Canceled)
        .map(|j| j.id)
        .collect();
    wait(
        "the cancelled jobs' Jobs gone",
        Duration::from_secs(20),
        || {
            let jobs = w.kube.objects("jobs", NS);
            !jobs.iter().any(|j| {
                let uuid = j["metadata"]["labels"]["stateless-agent/job-uuid"]
                    .as_str()
                    .unwrap_or("");
                canceled.contains(uuid) && j["metadata"]["deletionTimestamp"].is_null()
            })
        },
    );
    let polls = calls(&w, "batch-load-job-states") - polls_before;
    assert!(polls <= 2, "{polls} polls of the job states");
    wait("the three jobs finished", Duration::from_secs(60), || {
        w.finished_jobs() == 3
    });
    let out = dispatcher.stop();
    let canceled_log = out
        .stderr
        .lines()
        .filter(|l| l.contains("\"decision\":\"cancel\""))
        .count();
    assert_eq!(canceled_log, 9, "{}", out.log());
    for job in w.buildkite.jobs() {
        let expected = if canceled.contains(&job.id) { 0 } else { 1 };
        assert_eq!(job.acquired, expected, "{job:?}");
    }
    wait("no container left", Duration::from_secs(20), || {
        w.cluster.leftover_processes().is_empty()
    });
}

/// A dispatcher killed mid-reservation (no chance to tidy up), then two replicas: each job runs
/// once, a Job each, and none is left reserved.
#[test]
fn a_restart_mid_reservation_and_two_replicas_run_no_job_twice_and_leave_none_reserved() {
    if skip() {
        return;
    }
    let mut w = World::new(40, None);
    w.job_env
        .insert("BUILDKITE_COMMAND".into(), "sleep 1".into());
    w.schedule(20);
    let mut first = stacks(&w, "replica-a", &[]);
    wait("a Job", Duration::from_secs(30), || {
        !w.kube.objects("jobs", NS).is_empty()
    });
    first.kill();
    let first = first.finish();
    let second = stacks(&w, "replica-b", &[]);
    let third = stacks(&w, "replica-c", &[]);
    let outcome = w.outcome(second, 20, Duration::from_secs(120));
    let third = third.stop();
    assert_each_ran_once(&w);
    assert_eq!(
        outcome.jobs.len(),
        20,
        "{}\n{}",
        outcome.dispatcher,
        third.log()
    );
    assert_eq!(outcome.pods.len(), 20);
    // One Job a job (their names are the jobs'), and of the two replicas only the leader, whichever
    // won the Lease, created any.
    let created = |log: &str| log.matches("\"decision\":\"dispatch\"").count();
    let (b, c) = (created(&outcome.dispatcher), created(&third.stderr));
    assert!(b == 0 || c == 0, "both replicas created Jobs: {b} and {c}");
    assert!(created(&first.stderr) + b + c <= 20);
}

/// A rollout: the leader stops (SIGTERM), deregisters the stack and gives the Lease up; the
/// standby takes over, finds the stack gone (404), registers it again and serves the queue.
#[test]
fn a_rollout_deregisters_and_the_next_leader_registers_the_stack_again() {
    if skip() {
        return;
    }
    let w = World::new(10, None);
    w.schedule(2);
    let mut replicas = vec![
        ("replica-a", stacks(&w, "replica-a", &[])),
        ("replica-b", stacks(&w, "replica-b", &[])),
    ];
    wait("the first jobs run", Duration::from_secs(60), || {
        w.finished_jobs() == 2
    });
    let lease = w.kube.objects("leases", NS);
    let holder = lease[0]["spec"]["holderIdentity"]
        .as_str()
        .unwrap()
        .to_string();
    let at = replicas
        .iter()
        .position(|(name, _)| *name == holder)
        .unwrap();
    let (_, leader) = replicas.remove(at);
    let out = leader.stop();
    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert!(!w.buildkite.stacks()[0].registered, "{}", out.log());
    w.schedule(2);
    let (_, standby) = replicas.remove(0);
    let outcome = w.outcome(standby, 4, Duration::from_secs(60));
    let stack = &w.buildkite.stacks()[0];
    // Each replica registered at start; the standby again on the 404.
    assert!(
        stack.registrations >= 3,
        "{stack:?}\n{}",
        outcome.dispatcher
    );
    assert!(
        outcome.dispatcher.contains("HTTP 404"),
        "{}",
        outcome.dispatcher
    );
    assert_each_ran_once(&w);
}

/// The organization's stack limit reached (403 on register): one line with the fix, the
/// replica unready and not campaigning; once a stack is freed, the queue is served.
#[test]
fn a_full_stack_quota_is_reported_with_its_fix_and_served_once_freed() {
    if skip() {
        return;
    }
    let w = World::new(4, None);
    w.schedule(2);
    w.buildkite.inject_stacks(BuildkiteFault::Status(403), 2);
    let dispatcher = stacks(&w, "replica-a", &[]);
    let outcome = w.outcome(dispatcher, 2, Duration::from_secs(60));
    let refused = outcome
        .dispatcher
        .lines()
        .filter(|l| l.contains("stack limit is reached"));
    assert_eq!(refused.count(), 2, "{}", outcome.dispatcher);
    assert!(outcome
        .dispatcher
        .contains("deregister unused stacks or use --source metrics"));
    assert_each_ran_once(&w);
}

/// A queue whose dispatch is paused in Buildkite: polled (so it stays Connected), nothing
/// reserved, under either name of the pause field; resumed, every job runs.
#[test]
fn a_paused_queue_has_nothing_reserved_until_it_is_resumed() {
    if skip() {
        return;
    }
    let w = World::new(10, None);
    w.buildkite.pause(true);
    w.schedule(4);
    let dispatcher = stacks(&w, "replica-a", &[]);
    wait("five polls", Duration::from_secs(30), || {
        calls(&w, "list-scheduled-jobs") >= 5
    });
    // stacksapi's name for the same flag.
    w.buildkite.pause_field("paused");
    let polls = calls(&w, "list-scheduled-jobs");
    wait("five more polls", Duration::from_secs(30), || {
        calls(&w, "list-scheduled-jobs") >= polls + 5
    });
    assert_eq!(calls(&w, "batch-reserve"), 0);
    assert!(w.kube.objects("jobs", NS).is_empty());
    assert!(w
        .buildkite
        .jobs()
        .iter()
        .all(|j| j.state == JobState::Scheduled));
    w.buildkite.pause(false);
    let outcome = w.outcome(dispatcher, 4, Duration::from_secs(90));
    outcome.assert_held("paused");
    assert_each_ran_once(&w);
}

/// The Stacks API answering 429 (with `Retry-After`) to a run of calls, and a reserve limit of
/// 2 a second: the dispatcher waits as told, calls no closed endpoint meanwhile, and loses no
/// job.
#[test]
fn rate_limits_are_respected_and_lose_no_job() {
    if skip() {
        return;
    }
    let w = World::new(20, None);
    w.buildkite.rate_limit("batch-reserve", 2);
    w.schedule(12);
    w.buildkite.inject_stacks(BuildkiteFault::Status(429), 6);
    let dispatcher = stacks(&w, "replica-a", &[]);
    let outcome = w.outcome(dispatcher, 12, Duration::from_secs(120));
    assert_each_ran_once(&w);
    let calls = w.buildkite.stack_calls();
    let throttled: Vec<_> = calls.iter().filter(|c| c.status == 429).collect();
    assert!(throttled.len() >= 6);
    for refused in &throttled {
        let next = calls
            .iter()
            .find(|c| c.scope == refused.scope && c.at > refused.at);
        if let Some(next) = next {
            let gap = next.at - refused.at;
            assert!(
                gap >= Duration::from_millis(900),
                "{} again after {gap:?}",
                refused.scope
            );
        }
    }
    assert!(
        outcome.dispatcher.contains("asked to slow down"),
        "{}",
        outcome.dispatcher
    );
}

/// A token Buildkite refuses: one line that names the fix, no stack registered, nothing created,
/// and a clean stop.
#[test]
fn a_refused_token_is_reported_and_nothing_is_reserved() {
    if skip() {
        return;
    }
    let w = World::new(4, None);
    w.schedule(2);
    let mut command = w.dispatcher_command("replica-a");
    command
        .env("DISPATCHER_SOURCE", "stacks")
        .env("BUILDKITE_AGENT_TOKEN", "bkct_not-the-token");
    let dispatcher = Running::spawn(&mut command);
    wait("two registrations refused", Duration::from_secs(30), || {
        let calls = w.buildkite.stack_calls();
        calls
            .iter()
            .filter(|c| c.path.ends_with("/stacks/register") && c.status == 401)
            .count()
            >= 2
    });
    let out = dispatcher.stop();
    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert!(out.stderr.contains("cluster agent token"), "{}", out.log());
    assert!(w.buildkite.stacks().is_empty());
    assert!(w.kube.objects("jobs", NS).is_empty());
    assert!(!out.log().contains("bkct_not-the-token"));
}

/// A pod deleted before its agent acquired the job (here while it waits for room): the job is
/// finished in Buildkite at once with what Kubernetes said, not left reserved for the whole
/// expiry (agent-stack-k8s #873).
#[test]
fn a_pod_deleted_before_its_agent_acquires_fails_its_job_at_once() {
    if skip() {
        return;
    }
    let mut w = World::new(1, None);
    w.job_env
        .insert("BUILDKITE_COMMAND".into(), "sleep 2".into());
    w.schedule(3);
    let dispatcher = stacks(&w, "replica-a", &[]);
    let waiting = || {
        w.pods().into_iter().find(|p| {
            p["spec"]["nodeName"].is_null() && p["metadata"]["deletionTimestamp"].is_null()
        })
    };
    wait("a pod waiting for room", Duration::from_secs(30), || {
        waiting().is_some()
    });
    let pod = waiting().unwrap();
    let uuid = pod["metadata"]["labels"]["stateless-agent/job-uuid"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let deleted = Instant::now();
    w.kube
        .delete("pods", NS, pod["metadata"]["name"].as_str().unwrap());
    wait("its job finished", Duration::from_secs(20), || {
        w.buildkite
            .jobs()
            .iter()
            .any(|j| j.id == uuid && j.state == JobState::Finished)
    });
    let took = deleted.elapsed();
    let job = w
        .buildkite
        .jobs()
        .into_iter()
        .find(|j| j.id == uuid)
        .unwrap();
    assert_eq!(job.exit_status.as_deref(), Some("-1"));
    let detail = job.finish_detail.unwrap_or_default();
    assert!(detail.contains("before its agent acquired"), "{detail}");
    eprintln!("a pod deleted before acquiring: its job failed {took:?} later");
    wait("the other jobs finished", Duration::from_secs(60), || {
        w.finished_jobs() == 3
    });
    let out = dispatcher.stop();
    let ran = w
        .buildkite
        .jobs()
        .iter()
        .filter(|j| j.acquired == 1)
        .count();
    assert_eq!(ran, 2, "{}", out.log());
    w.assert_no_secret(&out);
}
