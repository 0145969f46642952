//! The whole flow through the real binaries: jobs are queued on the fake Buildkite; the real
//! job-dispatcher reads the demand and creates Jobs on the fake API server; the fake cluster's
//! Job controller makes their pods, its scheduler binds them, and its kubelet runs each as a
//! real container: agent-wrapper as PID 1, the stand-in agent taking its job from the fake
//! Buildkite, and the real checkout hook borrowing from a mirror that populate-mirror filled.
//! Without root (the kubelet's mount namespaces) these say so and skip.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stateless_e2e::dispatch_world::*;
use stateless_e2e::dispatcher_process::Running;
use stateless_e2e::fake_buildkite::JobState;
use stateless_e2e::fake_kube::kubectl_installed;

#[test]
fn a_burst_of_50_jobs_all_run_with_no_more_pods_than_demand_and_buffer() {
    if skip() {
        return;
    }
    let w = World::new(80, None);
    w.schedule(50);
    let dispatcher = w.dispatcher("replica-a");
    let outcome = w.outcome(dispatcher, 50, Duration::from_secs(180));
    // 50 jobs, and a buffer of 10 % (5): the agents that found no job idled out.
    assert!(outcome.pods.len() <= 55, "{} pods", outcome.pods.len());
    let idle = outcome
        .reports
        .iter()
        .filter(|r| r["reason"] == "idle-timeout");
    assert_eq!(idle.count(), outcome.pods.len() - 50);
    // Every pod's agent registered, and only once.
    assert_eq!(w.buildkite.registrations(), outcome.pods.len());
    assert_eq!(outcome.decisions("dispatch").len(), outcome.jobs.len());
    for job in &outcome.jobs {
        assert!(ended(job, "Complete"), "{job:#}");
    }
}

#[test]
fn a_trickle_is_met_without_a_pod_per_tick() {
    if skip() {
        return;
    }
    let w = World::new(20, None);
    let dispatcher = w.dispatcher("replica-a");
    for _ in 0..8 {
        w.schedule(1);
        std::thread::sleep(Duration::from_millis(700));
    }
    let outcome = w.outcome(dispatcher, 8, Duration::from_secs(60));
    // Agents already alive (the buffer) take later jobs: far fewer pods than ticks.
    assert!(
        outcome.pods.len() <= 8 + 2 * 2,
        "{} pods",
        outcome.pods.len()
    );
}

#[test]
fn a_cancelled_build_leaves_no_pods_waiting_and_no_new_dispatch() {
    if skip() {
        return;
    }
    let mut w = World::new(6, None);
    // Long jobs, so most of the build is still waiting when it is cancelled.
    w.job_env
        .insert("BUILDKITE_COMMAND".into(), "sleep 2".into());
    w.schedule(30);
    let dispatcher = w.dispatcher("replica-a");
    wait("the first jobs running", Duration::from_secs(30), || {
        w.buildkite
            .jobs()
            .iter()
            .filter(|j| j.state == JobState::Running)
            .count()
            >= 3
    });
    let cancelled = w.buildkite.cancel_scheduled(QUEUE);
    assert!(cancelled > 0);
    let taken = w.buildkite.jobs().len() - cancelled;
    let jobs_at_cancel = w.kube.objects("jobs", NS).len();
    let outcome = w.outcome(dispatcher, taken, Duration::from_secs(60));
    assert_eq!(
        outcome.jobs.len(),
        jobs_at_cancel,
        "no dispatch after the cancel"
    );
    // The pods the cancelled jobs were for idled out (or never started): none is left waiting.
    assert!(outcome
        .pods
        .iter()
        .all(|p| p["status"]["phase"] == "Succeeded"));
}

#[test]
fn a_restart_mid_dispatch_and_two_replicas_make_no_duplicate_pods() {
    if skip() {
        return;
    }
    let w = World::new(40, None);
    w.schedule(20);
    let mut first = w.dispatcher("replica-a");
    wait("a dispatch", Duration::from_secs(30), || {
        !w.kube.objects("jobs", NS).is_empty()
    });
    // Killed at once, with its Job's pods not yet running: no chance to tidy up.
    first.kill();
    first.finish();
    let second = w.dispatcher("replica-b");
    let third = w.dispatcher("replica-c");
    let outcome = w.outcome(second, 20, Duration::from_secs(90));
    let third = third.stop();
    assert_eq!(
        outcome.jobs.len(),
        1,
        "{}\n{}",
        outcome.dispatcher,
        third.log()
    );
    assert!(outcome.pods.len() <= 20 + 2, "{} pods", outcome.pods.len());
}

/// A burst beyond the cluster's room: the pods that cannot be scheduled yet count as coming (an
/// autoscaler would add nodes for them), so one dispatch asks for the whole demand and no more;
/// they run as room frees, within the start timeout.
#[test]
fn exhausted_capacity_is_met_by_one_dispatch_that_waits_for_room() {
    if skip() {
        return;
    }
    let outcome = World::new(4, None).run_slow_jobs(12);
    assert_eq!(outcome.jobs.len(), 1, "{}", outcome.dispatcher);
    assert!(outcome.pods.len() <= 12 + 2, "{} pods", outcome.pods.len());
    assert!(
        outcome.decisions("stuck").is_empty(),
        "{}",
        outcome.dispatcher
    );
}

#[test]
fn an_exceeded_quota_is_reported_and_the_jobs_still_run() {
    if skip() {
        return;
    }
    let w = World::new(20, Some(3));
    let outcome = w.run_slow_jobs(8);
    let events = w.kube.objects("events", NS);
    assert!(events.iter().any(|e| e["reason"] == "FailedCreate"
        && e["message"].as_str().unwrap().contains("exceeded quota")));
    outcome.assert_held("failed-create");
    assert!(outcome.pods.len() <= 8 + 2, "{} pods", outcome.pods.len());
}

#[test]
fn buildkite_and_api_server_faults_mid_run_lose_no_job_and_duplicate_no_pod() {
    if skip() {
        return;
    }
    let w = World::new(20, None);
    w.buildkite.inject(
        stateless_e2e::fake_buildkite::BuildkiteFault::Status(502),
        2,
    );
    w.buildkite.inject(
        stateless_e2e::fake_buildkite::BuildkiteFault::Status(429),
        1,
    );
    w.kube.inject(Some("POST"), Some("jobs"), 503, 1);
    w.schedule(10);
    let dispatcher = w.dispatcher("replica-a");
    wait("a dispatch", Duration::from_secs(30), || {
        !w.kube.objects("jobs", NS).is_empty()
    });
    // The watch history is compacted mid-run: watches resume through 410 Gone.
    w.kube.compact();
    let outcome = w.outcome(dispatcher, 10, Duration::from_secs(90));
    assert_eq!(outcome.jobs.len(), 1, "{}", outcome.dispatcher);
    assert!(outcome.pods.len() <= 10 + 2, "{} pods", outcome.pods.len());
}

/// A real `kubectl delete` of a pod whose agent is mid-job: the kubelet's SIGTERM is a graceful
/// stop, so the job finishes and is reported to Buildkite before the pod goes.
#[test]
fn kubectl_deleting_a_busy_pod_lets_its_job_finish_first() {
    if skip() {
        return;
    }
    if !kubectl_installed() {
        return;
    }
    let mut w = World::new(5, None);
    w.job_env
        .insert("BUILDKITE_COMMAND".into(), "sleep 3".into());
    w.schedule(1);
    let dispatcher = w.dispatcher("replica-a");
    wait("the job running", Duration::from_secs(30), || {
        w.buildkite.jobs()[0].state == JobState::Running
    });
    let busy = w
        .pods()
        .into_iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .find(|name| w.cluster.log(name).contains("running job"))
        .expect("the pod running the job");
    let deleted = Command::new("kubectl")
        .env("KUBECONFIG", &w.kubeconfig)
        .args(["delete", "pod", &busy, "--wait=true", "--timeout=60s"])
        .output()
        .unwrap();
    assert!(deleted.status.success(), "{deleted:?}");
    // kubectl returned once the pod was gone, which was after the job's end.
    let job = &w.buildkite.jobs()[0];
    assert_eq!(job.state, JobState::Finished);
    assert_eq!(job.exit_status.as_deref(), Some("0"));
    let log = w.cluster.log(&busy);
    let report: Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(report["reason"], "stopped", "{log}");
    assert_eq!(report["job"]["command_exit_status"], 0, "{log}");
    assert!(!w
        .pods()
        .iter()
        .any(|p| p["metadata"]["name"] == busy.as_str()));
    let out = dispatcher.stop();
    w.assert_no_secret(&out);
}

/// A Secret holding a wrong token: every agent dies before taking a job. The dispatcher makes one
/// dispatch, not one a tick: once its Job has failed with no agent succeeding, it holds and says
/// what the pods said, until `--start-deadline` has passed; with the Secret fixed, the next
/// dispatch runs the jobs.
#[test]
fn agents_that_cannot_register_get_one_dispatch_not_one_a_tick() {
    if skip() {
        return;
    }
    let w = World::new(20, None);
    let secret = |token: &str| json!({"metadata": {"name": "buildkite-agent"}, "stringData": {"token": token}});
    w.kube.replace("secrets", NS, secret("bkua_revoked-t0ken"));
    w.schedule(3);
    let dispatcher = Running::spawn(
        w.dispatcher_command("replica-a")
            .env("DISPATCHER_START_DEADLINE", "8s"),
    );
    wait("the first dispatch failed", Duration::from_secs(60), || {
        let jobs = w.kube.objects("jobs", NS);
        jobs.iter().any(|j| ended(j, "Failed"))
    });
    std::thread::sleep(Duration::from_secs(3));
    let jobs = w.kube.objects("jobs", NS);
    assert_eq!(jobs.len(), 1, "one dispatch while failing: {jobs:#?}");
    // Fixed: after the start deadline, the next dispatch runs the jobs.
    w.kube.replace("secrets", NS, secret(TOKEN));
    let outcome = w.outcome(dispatcher, 3, Duration::from_secs(60));
    assert_eq!(outcome.jobs.len(), 2);
    let held = outcome.decisions("hold");
    let failing = held.iter().find(|l| l["reason"] == "failing");
    let message = failing
        .map(|l| l["message"].to_string())
        .unwrap_or_default();
    // What the failed pods reported, in the dispatcher's own words.
    assert!(
        message.contains("none succeeded; a pod said: the agent failed"),
        "{}",
        outcome.dispatcher
    );
    // The failed Job's pods failed with the wrapper's report, each index on its own.
    let failed = outcome
        .jobs
        .iter()
        .find(|j| j["status"]["failedIndexes"] != "");
    assert!(failed.is_some(), "{:?}", outcome.jobs);
}

/// The node-local mode on two nodes: the shipped DaemonSet runs `populate-mirror --every` on each
/// node into its own directory, the dispatcher (`node-local`) mounts that directory read-only
/// into its agents in place of the claim, and every checkout, on either node, is a mirror hit.
#[test]
fn node_local_mirrors_serve_every_checkout_on_two_nodes() {
    if skip() {
        return;
    }
    let w = World::on_nodes(2, 10, None);
    let repositories = format!("{}\n", w.served.url);
    w.kube.create(
        "configmaps",
        NS,
        json!({"metadata": {"name": "populate-mirror-repositories"},
               "data": {"repositories": repositories}}),
    );
    w.kube.create(
        "secrets",
        NS,
        json!({"metadata": {"name": "git-credentials"},
               "stringData": {".git-credentials": "https://x:y@github.com\n"}}),
    );
    let shipped =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/storage/node-local/daemonset.yaml");
    let daemonset: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(shipped).unwrap()).unwrap();
    let path = daemonset["spec"]["template"]["spec"]["volumes"][0]["hostPath"]["path"]
        .as_str()
        .unwrap()
        .to_string();
    w.kube.create("daemonsets", NS, daemonset);
    let nodes = ["fake-node-1", "fake-node-2"];
    let populated = || {
        nodes.iter().all(|node| {
            let dir = w.cluster.host_path(node, &path);
            dir.join("acme/widgets.reference").exists()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !populated() {
        let pods = w.kube.objects("pods", NS);
        let statuses: Vec<&Value> = pods.iter().map(|p| &p["status"]).collect();
        let logs = w.cluster.all_logs();
        assert!(
            Instant::now() < deadline,
            "no populate on each node: {statuses:#?}\n{logs}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    w.schedule(6);
    let dispatcher = Running::spawn(
        w.dispatcher_command("replica-a")
            .env("DISPATCHER_MIRROR_MODE", "node-local"),
    );
    wait("6 jobs finished", Duration::from_secs(60), || {
        w.finished_jobs() == 6
    });
    // The DaemonSet goes; its pods are stopped by SIGTERM between or during rounds.
    w.kube.delete("daemonsets", NS, "populate-mirror");
    let outcome = w.outcome(dispatcher, 6, Duration::from_secs(60));
    let used: std::collections::BTreeSet<&str> = outcome
        .pods
        .iter()
        .filter_map(|p| p["spec"]["nodeName"].as_str())
        .collect();
    assert_eq!(used.len(), 2, "agents ran on both nodes: {used:?}");
    for pod in &outcome.pods {
        let volumes = pod["spec"]["volumes"].as_array().unwrap();
        let mirror = volumes.iter().find(|v| v["name"] == "git-mirrors").unwrap();
        assert_eq!(mirror["hostPath"]["path"], path.as_str(), "{mirror}");
    }
}

/// The claims mode (block disks): the dispatcher makes a claim per generation from the shipped
/// claim template, populates it with the shipped populate Job, and hands the newest ready one
/// out read-only. A refresh while jobs run: the running pods keep generation 1, new pods get 2,
/// and claim 1, expired, is deleted only once no pod object names it.
#[test]
fn claims_mode_hands_out_the_newest_generation_and_deletes_the_old_only_when_unused() {
    if skip() {
        return;
    }
    let mut w = World::new(20, None);
    w.populate_inputs(&w.served.url);
    let dispatcher = Running::spawn(
        w.claims_dispatcher("replica-a", "5s")
            .env("DISPATCHER_JOB_TTL", "2s"),
    );
    wait("generation 1 ready", Duration::from_secs(60), || {
        w.claim_state(1) == "ready"
    });
    // Jobs long enough to outlive generation 1.
    w.job_env
        .insert("BUILDKITE_COMMAND".into(), "sleep 8".into());
    w.schedule(2);
    wait("the first jobs running", Duration::from_secs(30), || {
        let jobs = w.buildkite.jobs();
        jobs.iter().filter(|j| j.state == JobState::Running).count() == 2
    });
    wait("generation 2 ready", Duration::from_secs(60), || {
        w.claim_state(2) == "ready"
    });
    // Expired, but pods still name it: kept.
    wait("generation 1 expired", Duration::from_secs(30), || {
        w.claim_state(1) == "expired"
    });
    assert!(w.claim(1).is_some());
    w.job_env.insert("BUILDKITE_COMMAND".into(), "true".into());
    w.schedule(2);
    wait("the later jobs finished", Duration::from_secs(60), || {
        w.finished_jobs() == 4
    });
    // Once the first dispatch's Job and pods are gone (their TTL), so is claim 1.
    wait("claim 1 deleted", Duration::from_secs(60), || {
        w.claim(1).is_none()
    });
    let out = dispatcher.stop();
    // Every job ran to exit 0 (a failed checkout fails its job).
    let jobs = w.buildkite.jobs();
    assert!(
        jobs.iter().all(|j| j.exit_status.as_deref() == Some("0")),
        "{jobs:?}"
    );
    // Pods and Jobs go with their TTL, so what they mounted is read from the dispatcher's
    // lines (each dispatch names its claim) and how their checkouts went from their logs.
    let lines: Vec<Value> = out
        .stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    let claims: Vec<&str> = lines
        .iter()
        .filter(|l| l["decision"] == "dispatch")
        .filter_map(|l| l["mirror_claim"].as_str())
        .collect();
    assert_eq!(
        claims.first(),
        Some(&format!("{CLAIM}-1").as_str()),
        "{claims:?}"
    );
    assert!(
        claims.len() >= 2 && claims.last() != claims.first(),
        "{claims:?}"
    );
    let logs = w.cluster.all_logs();
    let ran: Vec<Value> = logs
        .lines()
        .filter(|l| l.contains("\"wrapper_version\""))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["reason"] == "job-finished")
        .collect();
    assert_eq!(ran.len(), 4, "{logs}");
    assert!(
        ran.iter().all(|r| r["checkout"]["mirror"] == "hit"),
        "{ran:#?}"
    );
    // The pods still there mounted their generation read-only.
    for pod in w.pods() {
        let volumes = pod["spec"]["volumes"].as_array().unwrap().clone();
        let mirror = volumes.iter().find(|v| v["name"] == "git-mirrors").unwrap();
        assert_eq!(
            mirror["persistentVolumeClaim"]["readOnly"], true,
            "{mirror}"
        );
    }
    let took = |step: &str| lines.iter().any(|l| l["mirror_step"] == step);
    assert!(
        took("MarkExpired(1)") && took("DeleteClaim(1)"),
        "{}",
        out.log()
    );
    w.assert_no_secret(&out);
}

/// The claims mode's faults: a populate that fails leaves the generation in service and waits a
/// refresh interval before trying again; a dispatcher killed while a populate runs is replaced,
/// and the new one finishes the cycle (no second populate); a claim deleted by hand (Terminating
/// while a pod names it) is never handed to a new pod.
#[test]
fn claims_mode_survives_a_failed_populate_a_restart_and_a_deleted_claim() {
    if skip() {
        return;
    }
    let w = World::new(20, None);
    w.populate_inputs(&w.served.url);
    let first = Running::spawn(&mut w.claims_dispatcher("replica-a", "3s"));
    wait("generation 1 ready", Duration::from_secs(60), || {
        w.claim_state(1) == "ready"
    });
    // The repository list now holds a URL populate-mirror refuses (exit 2, which the shipped
    // Job's failure policy does not retry): generation 2's populate fails.
    w.populate_inputs("ext::sh -c false");
    // Discarded: its claim deleted (Terminating while the failed pod's object names it).
    wait("generation 2 discarded", Duration::from_secs(60), || {
        let claim = w.claim(2).unwrap_or_default();
        !claim["metadata"]["deletionTimestamp"].is_null()
    });
    assert_eq!(w.claim_state(1), "ready", "generation 1 stays in service");

    // Repaired; the dispatcher is killed while generation 3 populates.
    w.populate_inputs(&w.served.url);
    wait("generation 3 populating", Duration::from_secs(60), || {
        w.claim_state(3) == "populating"
    });
    let mut first = first;
    first.kill();
    let first = first.finish();
    let second = Running::spawn(&mut w.claims_dispatcher("replica-b", "1h"));
    wait("generation 3 ready", Duration::from_secs(60), || {
        w.claim_state(3) == "ready"
    });
    let populates = w
        .kube
        .requests()
        .iter()
        .filter(|r| *r == "POST jobs")
        .count();

    // Generation 3 deleted by hand while a pod names it: Terminating, never handed out.
    w.kube.create(
        "pods",
        NS,
        json!({"metadata": {"name": "holder"}, "spec": {"nodeName": "fake-node-1",
            "containers": [{"name": "c", "image": "x", "command": ["/bin/sh", "-c", "sleep 30"]}],
            "volumes": [{"name": "m", "persistentVolumeClaim": {"claimName": format!("{CLAIM}-3")}}]}}),
    );
    w.kube
        .delete("persistentvolumeclaims", NS, &format!("{CLAIM}-3"));
    w.schedule(1);
    wait("the job done", Duration::from_secs(60), || {
        w.finished_jobs() == 1
    });
    let second = second.stop();
    let agent = w.pods().into_iter().next().unwrap();
    let volumes = agent["spec"]["volumes"].as_array().unwrap().clone();
    let mirror = volumes.iter().find(|v| v["name"] == "git-mirrors").unwrap();
    assert_ne!(
        mirror["persistentVolumeClaim"]["claimName"],
        format!("{CLAIM}-3").as_str(),
        "{mirror}"
    );
    let said = format!("{}\n{}", first.log(), second.log());
    // One populate Job per generation: 1, 2, 3 (the restart made no second one for 3).
    assert_eq!(populates, 3, "{said}");
    w.assert_no_secret(&second);
}

/// The claims mode with a VolumeSnapshotClass: generation 2 is made from a snapshot of
/// generation 1, so its populate is a refresh (nothing new: unchanged), and generation 1's
/// snapshot goes once generation 2 is out.
#[test]
fn claims_mode_seeds_each_generation_from_a_snapshot_of_the_last() {
    if skip() {
        return;
    }
    let w = World::new(20, None);
    w.populate_inputs(&w.served.url);
    let dispatcher = Running::spawn(
        w.claims_dispatcher("replica-a", "3s")
            .env("DISPATCHER_SNAPSHOT_CLASS", "fake-snapshots"),
    );
    wait("generation 2 ready", Duration::from_secs(60), || {
        w.claim_state(2) == "ready"
    });
    let seeded = w.claim(2).unwrap();
    let source = &seeded["spec"]["dataSource"];
    assert_eq!(source["kind"], "VolumeSnapshot");
    assert_eq!(source["name"], format!("{CLAIM}-1").as_str());
    wait(
        "generation 1's snapshot deleted",
        Duration::from_secs(30),
        || {
            let snapshots = w.kube.objects("volumesnapshots", NS);
            !snapshots
                .iter()
                .any(|s| s["metadata"]["name"] == format!("{CLAIM}-1").as_str())
        },
    );
    let out = dispatcher.stop();
    // The seeded populate found its mirror up to date: nothing fetched, nothing published anew.
    let logs = w.cluster.all_logs();
    assert!(logs.contains("unchanged"), "{logs}\n{}", out.log());
    w.assert_no_secret(&out);
}

/// The claims cycle restarted over and over, in whatever phase each kill finds it (making a
/// claim, populating, labelling, expiring, deleting): each generation is made once and populated
/// once, never two populates at once, no claim is left behind, and the cycle gets on.
#[test]
fn claims_mode_restarted_in_every_phase_makes_each_generation_once() {
    if skip() {
        return;
    }
    let w = World::new(20, None);
    w.populate_inputs(&w.served.url);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut most_populating = 0;
    let mut round = 0u64;
    while w.claim_state(3) != "ready" {
        assert!(
            Instant::now() < deadline,
            "the cycle did not get to generation 3"
        );
        round += 1;
        // The same pod's container restarted (its name, so its Lease, is the same).
        let mut dispatcher = Running::spawn(&mut w.claims_dispatcher("replica-a", "2s"));
        // A kill 0.2–1.1 s in: each lands in another phase.
        std::thread::sleep(Duration::from_millis(200 + (round * 300) % 900));
        let populating = w
            .kube
            .objects("persistentvolumeclaims", NS)
            .iter()
            .filter(|c| c["metadata"]["labels"]["stateless-agent/mirror-state"] == "populating")
            .filter(|c| c["metadata"]["deletionTimestamp"].is_null())
            .count();
        most_populating = most_populating.max(populating);
        dispatcher.kill();
        dispatcher.finish();
    }
    assert!(most_populating <= 1, "two generations populating at once");
    let created = |plural: &str| {
        w.kube
            .requests()
            .iter()
            .filter(|r| **r == format!("POST {plural}"))
            .count()
    };
    // Generations 1, 2, 3 (and perhaps 4, begun by the last replica): one claim and one Job
    // each, none made twice across the restarts.
    let claims = created("persistentvolumeclaims");
    let populates = created("jobs");
    assert!(
        (3..=4).contains(&claims),
        "{claims} claims made in {round} restarts"
    );
    assert_eq!(populates, claims, "one populate per generation");
    // Only generations that are meant to exist are left: ready, expired in use, or the next.
    let left: Vec<Value> = w.kube.objects("persistentvolumeclaims", NS);
    for claim in &left {
        let state = &claim["metadata"]["labels"]["stateless-agent/mirror-state"];
        assert!(
            state.is_null()
                || ["ready", "expired", "populating"].contains(&state.as_str().unwrap()),
            "{claim:#}"
        );
    }
}
