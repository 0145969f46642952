//! job-dispatcher, the real binary, against the fake Kubernetes API server and the fake Buildkite
//! metrics API: it dispatches a Job sized to the queue's demand and no more, survives restarts
//! and a second replica without a duplicate dispatch, stops and says why when pods cannot be
//! scheduled, a quota refuses them or they register elsewhere, keeps serving through Buildkite
//! and API-server faults, refuses a template for another queue, and never shows its token.
//! (Pods here are the test's, to set each state exactly; `dispatcher_end_to_end.rs` runs them
//! through the fake cluster's Job controller, scheduler and kubelet.)

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stateless_e2e::dispatch_world::token_secret;
use stateless_e2e::dispatcher_process::{job_dispatcher, Running};
use stateless_e2e::fake_buildkite::{BuildkiteFault, FakeBuildkite, QueueState};
use stateless_e2e::fake_kube::{pod_of_job, FakeKube};
use stateless_e2e::loopback::{self, free_port};
use stateless_e2e::sandbox::{wait_for, Sandbox};

const QUEUE: &str = "kubernetes";
const TOKEN: &str = "bkua_s3cret-dispatcher-t0ken";
const NS: &str = "ci";

struct World {
    /// Holds the kubeconfig's directory.
    _sandbox: Sandbox,
    kube: FakeKube,
    buildkite: FakeBuildkite,
    kubeconfig: PathBuf,
}

impl World {
    fn new() -> World {
        let sandbox = Sandbox::new();
        let kube = FakeKube::start();
        let kubeconfig = kube.kubeconfig(sandbox.dir.path(), NS);
        World {
            _sandbox: sandbox,
            kube,
            buildkite: FakeBuildkite::start(TOKEN, QUEUE),
            kubeconfig,
        }
    }

    /// The dispatcher, as replica `name`, ticking every 200 ms; returns it and its metrics port.
    fn dispatcher(&self, name: &str, queue: &str) -> (Running, u16) {
        self.dispatcher_at(name, queue, &self.buildkite.endpoint())
    }

    /// The dispatcher, asking Buildkite at `endpoint`.
    fn dispatcher_at(&self, name: &str, queue: &str, endpoint: &str) -> (Running, u16) {
        let port = free_port();
        let child = Running::spawn(
            self.command(name, queue, port)
                .env("BUILDKITE_AGENT_ENDPOINT", endpoint),
        );
        (child, port)
    }

    /// The dispatcher for [`QUEUE`], with `settings` added to its environment.
    fn dispatcher_with(&self, name: &str, settings: &[(&str, &str)]) -> (Running, u16) {
        let port = free_port();
        let mut command = self.command(name, QUEUE, port);
        command.envs(settings.iter().copied());
        (Running::spawn(&mut command), port)
    }

    fn command(&self, name: &str, queue: &str, port: u16) -> std::process::Command {
        let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/k8s/agent-job.yaml");
        let mut command = job_dispatcher(&self.kubeconfig, &self.buildkite, TOKEN, name);
        command
            .env("DISPATCHER_QUEUE", queue)
            .env("DISPATCHER_TEMPLATE", template)
            .env("DISPATCHER_POLL_INTERVAL", "200ms")
            .env("DISPATCHER_LISTEN", format!("127.0.0.1:{port}"));
        command
    }

    fn jobs(&self) -> Vec<Value> {
        self.kube.objects("jobs", NS)
    }

    /// A pod of `job` in `phase`, as the kubelet would report it.
    fn pod(&self, job: &Value, name: &str, status: Value) {
        self.kube.create("pods", NS, pod_of_job(job, name));
        self.kube.set_status("pods", NS, name, status);
    }
}

fn http_get(port: u16, path: &str) -> (u16, String) {
    loopback::http(&format!("127.0.0.1:{port}"), "GET", path, None)
}

/// Waits for `ticks` more polls of Buildkite.
fn ticks(world: &World, ticks: usize) {
    let target = world.buildkite.polls() + ticks;
    wait_for("the dispatcher's ticks", || {
        world.buildkite.polls() >= target
    });
}

#[test]
fn a_burst_is_met_by_one_job_sized_to_demand_and_no_more() {
    let w = World::new();
    w.buildkite.set(QueueState {
        scheduled: 10,
        ..QueueState::default()
    });
    let (dispatcher, port) = w.dispatcher("replica-a", QUEUE);

    wait_for("a dispatch", || !w.jobs().is_empty());
    ticks(&w, 5);
    let out = dispatcher.stop();

    let jobs = w.jobs();
    assert_eq!(jobs.len(), 1, "{}", out.log());
    let job = &jobs[0];
    let labels = &job["metadata"]["labels"];
    assert_eq!(labels["stateless-agent/queue"], QUEUE);
    assert_eq!(labels["app.kubernetes.io/managed-by"], "job-dispatcher");
    let id = labels["stateless-agent/dispatch-id"].as_str().unwrap();
    assert_eq!(id.len(), 32);
    assert_eq!(
        job["spec"]["template"]["metadata"]["labels"]["stateless-agent/dispatch-id"],
        id
    );
    // 10 waiting jobs + the buffer (2, more than 10 % of 10).
    assert_eq!(job["spec"]["parallelism"], 12);
    assert_eq!(job["spec"]["completions"], 12);
    assert_eq!(job["spec"]["activeDeadlineSeconds"], 14400);
    assert_eq!(job["spec"]["ttlSecondsAfterFinished"], 600);
    let events = w.kube.objects("events", NS);
    assert!(events
        .iter()
        .any(|e| e["reason"] == "Dispatched"
            && e["involvedObject"]["name"] == job["metadata"]["name"]));
    // One JSON line per decision, with the dispatch ID and the figures it used.
    let dispatched = out
        .stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["decision"] == "dispatch")
        .unwrap_or_else(|| panic!("{}", out.log()));
    assert_eq!(dispatched["dispatch_id"], id);
    assert!(dispatched["figures"]
        .as_str()
        .unwrap()
        .contains("scheduled=10"));
    let _ = port;
}

#[test]
fn a_restart_and_a_second_replica_make_no_duplicate_dispatch() {
    let w = World::new();
    w.buildkite.set(QueueState {
        scheduled: 6,
        ..QueueState::default()
    });
    let (first, _) = w.dispatcher("replica-a", QUEUE);
    wait_for("a dispatch", || !w.jobs().is_empty());
    first.stop();

    // Two replicas at once, the demand unchanged: the new leader reads the dispatch back.
    let (b, port_b) = w.dispatcher("replica-b", QUEUE);
    let (c, port_c) = w.dispatcher("replica-c", QUEUE);
    wait_for("a leader", || {
        w.kube.objects("leases", NS).iter().any(|l| {
            l["spec"]["holderIdentity"]
                .as_str()
                .is_some_and(|h| h != "replica-a")
        })
    });
    ticks(&w, 5);
    let metrics = |port| http_get(port, "/metrics").1;
    let leaders = [metrics(port_b), metrics(port_c)]
        .iter()
        .filter(|m| {
            m.lines()
                .any(|l| l == "dispatcher_leader{queue=\"kubernetes\"} 1")
        })
        .count();
    let (out_b, out_c) = (b.stop(), c.stop());
    assert_eq!(w.jobs().len(), 1, "{}\n{}", out_b.log(), out_c.log());
    assert_eq!(
        leaders,
        1,
        "exactly one replica leads: {:?}\n{}\n{}",
        w.kube.objects("leases", NS),
        out_b.log(),
        out_c.log()
    );
}

/// A rollout: SIGTERM makes the leader stop dispatching, give its Lease up and exit 0, and the
/// standby takes over at its next retry (2 s), not when the Lease would have expired (15 s).
/// Every replica checks the token at start: one with a refused token says so at once, in its log
/// and `/readyz`, and does not campaign for the Lease.
#[test]
fn a_rollout_hands_the_lease_over_at_once_and_every_replica_checks_its_token() {
    let w = World::new();
    let holder = || {
        let leases = w.kube.objects("leases", NS);
        leases.first().map(|l| {
            l["spec"]["holderIdentity"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
    };
    let (a, _) = w.dispatcher("replica-a", QUEUE);
    wait_for("replica-a leading", || {
        holder().as_deref() == Some("replica-a")
    });
    let (b, _) = w.dispatcher("replica-b", QUEUE);
    let port_c = free_port();
    let mut wrong = w.command("replica-c", QUEUE, port_c);
    wrong.env("BUILDKITE_AGENT_TOKEN", "bkua_revoked-t0ken");
    let c = Running::spawn(&mut wrong);
    wait_for("the refused standby unready", || {
        http_get(port_c, "/metrics").0 == 200 && http_get(port_c, "/readyz").0 == 503
    });
    ticks(&w, 2);
    let stopped = Instant::now();
    let out = a.stop();
    assert!(out.status.success(), "exit 0 on SIGTERM: {}", out.log());
    assert!(stopped.elapsed() < Duration::from_secs(3), "{}", out.log());
    assert!(out.stderr.contains("released the Lease"), "{}", out.log());
    let released = Instant::now();
    wait_for("replica-b leading", || {
        holder().as_deref() == Some("replica-b")
    });
    let handover = released.elapsed();
    assert!(handover < Duration::from_secs(4), "took {handover:?}");
    w.buildkite.set(QueueState {
        scheduled: 3,
        ..QueueState::default()
    });
    wait_for("replica-b dispatching", || !w.jobs().is_empty());
    let (out_b, out_c) = (b.stop(), c.stop());
    assert_eq!(w.jobs().len(), 1, "{}", out_b.log());
    let refused = json_lines(&out_c.stderr);
    let said = refused.iter().find(|l| l["level"] == "ERROR");
    let said = said.map(|l| l["message"].to_string()).unwrap_or_default();
    assert!(said.contains("BUILDKITE_AGENT_TOKEN"), "{}", out_c.log());
    // It never took the Lease a replica able to serve could hold.
    assert!(
        out_c.stderr.contains("not campaigning for the Lease"),
        "{}",
        out_c.log()
    );
    eprintln!("lease handed over in {handover:?}");
}

/// Now, as the API server would write `lastTimestamp`.
fn now() -> String {
    format!("{:.0}", k8s_openapi::jiff::Timestamp::now())
}

/// Unschedulable pods are coming (an autoscaler adds nodes for pods that exist) until the start
/// timeout; then they are stuck: the Job goes with them (none started), each pod is reported
/// (log line, Warning Event on the Job, counter by reason) and dispatches back off, a backoff a
/// restarted dispatcher reads back from its Events rather than dispatching again at once.
#[test]
fn unschedulable_pods_are_coming_until_the_start_timeout_then_let_go_with_a_backoff() {
    let w = World::new();
    w.buildkite.set(QueueState {
        scheduled: 4,
        ..QueueState::default()
    });
    let settings = [
        ("DISPATCHER_START_TIMEOUT", "3s"),
        ("DISPATCHER_STUCK_BACKOFF", "1h"),
    ];
    let (dispatcher, port) = w.dispatcher_with("replica-a", &settings);
    wait_for("a dispatch", || !w.jobs().is_empty());
    let job = w.jobs()[0].clone();
    let pending = json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
        "status": "False", "reason": "Unschedulable", "message": "0/3 nodes are available: 3 Insufficient cpu."}]});
    for i in 0..6 {
        w.pod(&job, &format!("p{i}"), pending.clone());
    }
    ticks(&w, 3);
    assert_eq!(w.jobs().len(), 1, "six pods coming: enough");
    wait_for("the stuck pods let go", || w.jobs().is_empty());
    ticks(&w, 3);
    let metrics = http_get(port, "/metrics").1;
    let out = dispatcher.stop();
    assert!(w.jobs().is_empty(), "backing off: {}", out.log());
    assert!(
        metrics.contains(
            "dispatcher_stuck_pods_total{queue=\"kubernetes\",reason=\"Unschedulable\"} 6"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("dispatcher_blocked{queue=\"kubernetes\",reason=\"stuck\"} 1"),
        "{metrics}"
    );
    let lines = json_lines(&out.stderr);
    let stuck: Vec<&Value> = lines.iter().filter(|l| l["decision"] == "stuck").collect();
    assert_eq!(stuck.len(), 6, "{}", out.log());
    assert_eq!(stuck[0]["job"], job["metadata"]["name"]);
    assert_eq!(stuck[0]["reason"], "Unschedulable");
    assert!(stuck[0]["kubelet_message"]
        .as_str()
        .unwrap()
        .contains("Insufficient cpu"));
    assert!(stuck[0]["dispatch_id"].as_str().unwrap().len() == 32);
    let events = w.kube.objects("events", NS);
    let warned = events
        .iter()
        .find(|e| e["reason"] == "PodsStuck")
        .expect("a Warning Event on the Job");
    assert_eq!(warned["type"], "Warning");
    assert_eq!(warned["involvedObject"]["uid"], job["metadata"]["uid"]);
    assert!(warned["message"]
        .as_str()
        .unwrap()
        .contains("6 agent pods never started: Unschedulable"));
    // Restarted: the backoff is read back; no dispatch, no second report.
    let (again, _) = w.dispatcher_with("replica-a", &settings);
    ticks(&w, 4);
    let out = again.stop();
    assert!(w.jobs().is_empty(), "{}", out.log());
    assert!(
        out.stderr.contains("never started (Unschedulable)"),
        "{}",
        out.log()
    );
}

/// A fresh `FailedCreate` on a Job still missing pods holds new dispatches and says what
/// Kubernetes said; once the refusals stop (the quota freed), the hold ends with them.
#[test]
fn a_quota_refusal_holds_while_it_lasts_and_not_a_tick_longer() {
    let w = World::new();
    w.buildkite.set(QueueState {
        scheduled: 4,
        ..QueueState::default()
    });
    let (dispatcher, port) = w.dispatcher("replica-a", QUEUE);
    wait_for("a dispatch", || !w.jobs().is_empty());
    let job = w.jobs()[0].clone();
    w.pod(&job, "p0", json!({"phase": "Pending"}));
    w.kube.create("events", NS, json!({"metadata": {"generateName": "quota."}, "reason": "FailedCreate",
        "type": "Warning", "message": "Error creating: pods \"x\" is forbidden: exceeded quota: agents",
        "lastTimestamp": now(),
        "involvedObject": {"kind": "Job", "name": job["metadata"]["name"], "uid": job["metadata"]["uid"]}}));
    w.buildkite.set(QueueState {
        scheduled: 40,
        ..QueueState::default()
    });
    ticks(&w, 4);
    assert_eq!(w.jobs().len(), 1);
    let blocked = "dispatcher_blocked{queue=\"kubernetes\",reason=\"failed-create\"} 1";
    assert!(http_get(port, "/metrics").1.contains(blocked));
    // The quota freed: the Job controller made the pods, which started; the refusals stopped.
    for i in 1..6 {
        w.pod(
            &job,
            &format!("p{i}"),
            json!({"phase": "Running", "startTime": now()}),
        );
    }
    wait_for("a dispatch for the rest", || w.jobs().len() == 2);
    ticks(&w, 1);
    assert!(!http_get(port, "/metrics").1.contains(blocked));
    let out = dispatcher.stop();
    let warnings = json_lines(&out.stderr);
    assert!(
        warnings.iter().any(|l| l["reason"] == "failed-create"
            && l["message"].as_str().unwrap().contains("exceeded quota")),
        "{}",
        out.log()
    );
}

/// What the dispatcher printed as JSON lines.
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn a_wrong_queue_stops_dispatching_and_says_why() {
    // Pods running for long while the queue has no agent: they register somewhere else.
    let w = World::new();
    w.buildkite.set(QueueState {
        scheduled: 2,
        ..QueueState::default()
    });
    let (dispatcher, port) = w.dispatcher("replica-a", QUEUE);
    wait_for("a dispatch", || !w.jobs().is_empty());
    let job = w.jobs()[0].clone();
    for i in 0..4 {
        w.pod(
            &job,
            &format!("r{i}"),
            json!({"phase": "Running", "startTime": "2026-01-01T00:00:00Z"}),
        );
    }
    w.buildkite.set(QueueState {
        scheduled: 30,
        ..QueueState::default()
    });
    ticks(&w, 4);
    assert_eq!(w.jobs().len(), 1);
    assert!(http_get(port, "/metrics")
        .1
        .contains("dispatcher_blocked{queue=\"kubernetes\",reason=\"wrong-queue\"} 1"));
    let out = dispatcher.stop();
    assert!(
        out.stderr.contains("register in another queue"),
        "{}",
        out.log()
    );
}

#[test]
fn buildkite_and_api_server_faults_are_survived_and_reported() {
    let w = World::new();
    let (dispatcher, port) = w.dispatcher("replica-a", QUEUE);
    // A token Buildkite refuses: not ready, the log names the token, nothing dispatched.
    // (Readiness is read while the refusals last: a tick that follows them makes it ready again.)
    w.buildkite.inject(BuildkiteFault::Status(401), 5);
    wait_for("unready", || http_get(port, "/readyz").0 == 503);
    assert_eq!(http_get(port, "/healthz").0, 200);
    ticks(&w, 5);
    // Throttled, then the API server fails the create once: one Job all the same, next tick.
    w.buildkite.inject(BuildkiteFault::Status(429), 1);
    // An answer that is not the metrics (a wrong endpoint): nothing dispatched on it.
    w.buildkite
        .inject(BuildkiteFault::Answer("<html>sign in</html>"), 1);
    w.kube.inject(Some("POST"), Some("jobs"), 500, 1);
    w.kube.inject(Some("POST"), Some("jobs"), 409, 1);
    w.kube.inject(Some("POST"), Some("jobs"), 429, 1);
    w.buildkite.set(QueueState {
        scheduled: 3,
        ..QueueState::default()
    });
    wait_for("a dispatch", || !w.jobs().is_empty());
    ticks(&w, 3);
    assert_eq!(http_get(port, "/readyz").0, 200);
    let metrics = http_get(port, "/metrics").1;
    let out = dispatcher.stop();
    assert_eq!(w.jobs().len(), 1, "{}", out.log());
    assert!(
        out.stderr.contains("BUILDKITE_AGENT_TOKEN"),
        "{}",
        out.log()
    );
    assert!(
        metrics.contains("dispatcher_api_errors_total{queue=\"kubernetes\",api=\"buildkite\",kind=\"unauthorized\"} 5"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dispatcher_api_errors_total{queue=\"kubernetes\",api=\"buildkite\",kind=\"throttled\"} 1"),
        "{metrics}"
    );
    for kind in ["server", "conflict"] {
        let line = format!("dispatcher_api_errors_total{{queue=\"kubernetes\",api=\"kubernetes\",kind=\"{kind}\"}} 1");
        assert!(metrics.contains(&line), "{metrics}");
    }
    // The 429 is retried by the client itself (kube-client 5.0.0 `src/client/retry.rs` retries
    // 429, 503 and 504 with backoff): four creates asked, one Job made.
    let creates = w
        .kube
        .requests()
        .iter()
        .filter(|r| *r == "POST jobs")
        .count();
    assert_eq!(creates, 4);
    assert!(
        metrics.contains("dispatcher_api_errors_total{queue=\"kubernetes\",api=\"buildkite\",kind=\"invalid\"} 1"),
        "{metrics}"
    );
    assert!(
        out.stderr.contains("check that BUILDKITE_AGENT_ENDPOINT"),
        "{}",
        out.log()
    );

    // The token: in the Authorization header to Buildkite, and nowhere else.
    assert!(w
        .buildkite
        .authorizations()
        .iter()
        .all(|a| a == &format!("Token {TOKEN}")));
    let everything = format!(
        "{}{}{:?}{:?}{}",
        out.log(),
        metrics,
        w.kube.objects("jobs", NS),
        w.kube.objects("events", NS),
        serde_json::to_string(&w.kube.objects("leases", NS)).unwrap()
    );
    assert!(!everything.contains(TOKEN));
}

/// RBAC that does not let it list pods: it dispatches nothing while it cannot count its supply
/// (never a Job on a supply it cannot see), is not ready, and says which permission to grant;
/// once granted, it dispatches.
#[test]
fn a_forbidden_watch_dispatches_nothing_and_names_the_permission() {
    let w = World::new();
    w.kube.inject(Some("GET"), Some("pods"), 403, 2);
    w.buildkite.set(QueueState {
        scheduled: 3,
        ..QueueState::default()
    });
    let (dispatcher, port) = w.dispatcher("replica-a", QUEUE);
    wait_for("two refused lists of pods", || {
        w.kube
            .requests()
            .iter()
            .filter(|r| *r == "GET pods")
            .count()
            >= 2
    });
    assert!(w.jobs().is_empty());
    assert_eq!(http_get(port, "/readyz").0, 503);
    wait_for("a dispatch once pods can be listed", || {
        !w.jobs().is_empty()
    });
    let out = dispatcher.stop();
    assert!(
        out.stderr.contains("watching pods is forbidden")
            && out.stderr.contains("list and watch on pods"),
        "{}",
        out.log()
    );
}

#[test]
fn the_poll_interval_follows_what_buildkite_asks() {
    let w = World::new();
    w.buildkite.ask_poll_duration(1);
    let (dispatcher, _) = w.dispatcher("replica-a", QUEUE);
    // The token check at start, then the first tick.
    ticks(&w, 2);
    let started = Instant::now();
    ticks(&w, 3);
    dispatcher.stop();
    // 200 ms asked of it, 1 s asked by Buildkite: the slower wins.
    assert!(
        started.elapsed() >= Duration::from_millis(2800),
        "{:?}",
        started.elapsed()
    );
}

/// Without `BUILDKITE_AGENT_TOKEN` the dispatcher reads its token from the Secret
/// `DISPATCHER_TOKEN_SECRET` names: missing, it stops with the configuration code and a line
/// saying how to create it; present, it is read and used, and never logged.
#[test]
fn the_token_comes_from_its_secret_or_the_dispatcher_says_how_to_make_it() {
    let w = World::new();
    let mut command = w.command("replica-a", QUEUE, free_port());
    command.env_remove("BUILDKITE_AGENT_TOKEN");
    command.env("DISPATCHER_TOKEN_SECRET", "bk-token");
    let out = Running::spawn(&mut command).finish();
    assert_eq!(out.code(), Some(78), "{}", out.log());
    assert!(
        out.stderr
            .contains("kubectl create secret generic bk-token"),
        "{}",
        out.log()
    );

    w.kube.create(
        "secrets",
        NS,
        json!({"metadata": {"name": "bk-token"}, "stringData": {"token": TOKEN}}),
    );
    w.buildkite.set(QueueState {
        scheduled: 2,
        ..QueueState::default()
    });
    let mut command = w.command("replica-a", QUEUE, free_port());
    command.env_remove("BUILDKITE_AGENT_TOKEN");
    command.env("DISPATCHER_TOKEN_SECRET", "bk-token");
    let dispatcher = Running::spawn(&mut command);
    wait_for("a dispatch with the Secret's token", || {
        !w.jobs().is_empty()
    });
    let out = dispatcher.stop();
    assert!(!out.log().contains(TOKEN), "the token reached the log");
    let job = &w.jobs()[0];
    let agent = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(token_secret(agent), "bk-token");
}

/// The shipped template names the image placeholder; a dispatcher that is given no image and
/// cannot read its own pod's stops at start, saying which setting gives one.
#[test]
fn a_dispatcher_without_an_image_for_its_agents_says_which_setting_gives_one() {
    let w = World::new();
    let mut command = w.command("replica-not-a-pod", QUEUE, free_port());
    command.env_remove("DISPATCHER_IMAGE");
    let out = Running::spawn(&mut command).finish();
    assert_eq!(out.code(), Some(1), "{}", out.log());
    assert!(
        out.stderr.contains("stateless-agent") && out.stderr.contains("DISPATCHER_IMAGE"),
        "{}",
        out.log()
    );
    assert!(w.jobs().is_empty());
}

#[test]
fn a_template_for_another_queue_is_refused_naming_both() {
    let w = World::new();
    // The shipped template names no queue (the dispatcher's is the one); this one does.
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/k8s/agent-job.yaml");
    let tagged = std::fs::read_to_string(shipped).unwrap().replace(
        "            - name: AGENT_WRAPPER_STOP_DEADLINE",
        "            - name: BUILDKITE_AGENT_TAGS\n              value: queue=kubernetes\n            - name: AGENT_WRAPPER_STOP_DEADLINE",
    );
    let template = w.kubeconfig.with_file_name("agent-job.yaml");
    std::fs::write(&template, tagged).unwrap();
    let mut command = w.command("replica-a", "linux-large", free_port());
    let out = Running::spawn(command.env("DISPATCHER_TEMPLATE", &template)).finish();
    assert_eq!(out.code(), Some(78), "{}", out.log());
    assert!(
        out.stderr.contains("\\\"kubernetes\\\"") && out.stderr.contains("\\\"linux-large\\\""),
        "{}",
        out.log()
    );
    assert!(w.jobs().is_empty());
}

/// Buildkite unreachable, then answering nothing for longer than the 15 s timeout: nothing is
/// dispatched on either, the log says where it could not reach, the metrics and health endpoints
/// keep answering meanwhile, and the first good answer is acted on.
#[test]
fn buildkite_unreachable_or_stalled_dispatches_nothing_and_serves_on() {
    let w = World::new();
    w.buildkite.set(QueueState {
        scheduled: 3,
        ..QueueState::default()
    });
    let nowhere = format!("http://127.0.0.1:{}/v3", free_port());
    let (dispatcher, port) = w.dispatcher_at("replica-a", QUEUE, &nowhere);
    wait_for("a failed poll counted", || {
        http_get(port, "/metrics")
            .1
            .contains("dispatcher_api_errors_total{queue=\"kubernetes\",api=\"buildkite\",kind=\"unreachable\"}")
    });
    let out = dispatcher.stop();
    assert!(w.jobs().is_empty());
    assert!(
        out.stderr
            .contains(&format!("cannot reach Buildkite at {nowhere}")),
        "{}",
        out.log()
    );

    w.buildkite
        .inject(BuildkiteFault::Stall(Duration::from_secs(20)), 1);
    // Counted before it starts: its first poll (the stalled one) may come at once.
    let polled = w.buildkite.polls();
    let (dispatcher, port) = w.dispatcher("replica-a", QUEUE);
    wait_for("the stalled poll", || w.buildkite.polls() > polled);
    // The poll hangs: the health and metrics endpoints still answer, and nothing is dispatched.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(http_get(port, "/healthz").0, 200);
    assert_eq!(http_get(port, "/metrics").0, 200);
    assert!(w.jobs().is_empty());
    wait_for("a dispatch after the stall", || !w.jobs().is_empty());
    let out = dispatcher.stop();
    assert_eq!(w.jobs().len(), 1, "{}", out.log());
    assert!(out.stderr.contains("timed out"), "{}", out.log());
}

/// The claims mode's templates are read at start: a populate template with no Job in it, or none
/// at the path, stops the dispatcher with the configuration code and a line saying which
/// setting to fix.
#[test]
fn unreadable_claims_templates_are_refused_at_start() {
    let w = World::new();
    let k8s = Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/k8s");
    let claim = k8s.join("../storage/snapshots/mirror-claim.yaml");
    for (populate, says) in [
        (claim.clone(), "no Job in it"),
        (k8s.join("no-such-file.yaml"), "No such file"),
    ] {
        let port = free_port();
        let child = Running::spawn(
            job_dispatcher(&w.kubeconfig, &w.buildkite, TOKEN, "replica-a")
                .env("DISPATCHER_QUEUE", QUEUE)
                .env("DISPATCHER_TEMPLATE", k8s.join("agent-job.yaml"))
                .env("DISPATCHER_LISTEN", format!("127.0.0.1:{port}"))
                .env("DISPATCHER_MIRROR_MODE", "claims")
                .env("DISPATCHER_CLAIM_TEMPLATE", &claim)
                .env("DISPATCHER_POPULATE_TEMPLATE", &populate),
        );
        let out = child.finish();
        assert_eq!(out.code(), Some(78), "{}", out.log());
        assert!(
            out.stderr.contains(says) && out.stderr.contains("DISPATCHER_POPULATE_TEMPLATE"),
            "{}",
            out.log()
        );
    }
    assert!(w.jobs().is_empty());
}
