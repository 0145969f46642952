//! The world the dispatcher's end-to-end scenarios run in: the fake Buildkite, the fake API
//! server and the fake cluster behind it (a kubelet that runs each pod as a real container), a
//! served repository with its mirror on the claim the shipped template mounts, and what every
//! run must leave (each checkout a mirror hit, every pod's report, no container left, the token
//! nowhere). Shared by `tests/dispatcher_end_to_end.rs` and `tests/dispatcher_real_cluster.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::dispatcher_process::{job_dispatcher, Running};
use crate::fake_buildkite::{FakeBuildkite, JobState};
use crate::fake_cluster::{ClusterSpec, FakeCluster};
use crate::fake_kube::FakeKube;
use crate::loopback::free_port;
use crate::sandbox::Finished;
use crate::scenario::Served;

pub const QUEUE: &str = "kubernetes";
pub const TOKEN: &str = "bkua_e2e-s3cret-agent-t0ken";
pub const NS: &str = "ci";
pub const CLAIM: &str = "buildkite-git-mirrors";

pub struct World {
    /// Stops the containers before the files they use go away.
    pub cluster: FakeCluster,
    pub kube: FakeKube,
    pub buildkite: FakeBuildkite,
    pub kubeconfig: PathBuf,
    pub template: PathBuf,
    pub job_env: BTreeMap<String, String>,
    pub served: Served,
}

/// Why these scenarios cannot run here, said once each.
pub fn skip() -> bool {
    match FakeCluster::unavailable() {
        Some(why) => {
            eprintln!("skipping: {why}");
            true
        }
        None => false,
    }
}

impl World {
    /// A cluster of `capacity` pods with a pod quota, a served repository, its mirror on the
    /// claim the shipped template mounts, and the agent token in the Secret it reads.
    pub fn new(capacity: usize, quota_pods: Option<usize>) -> World {
        World::on_nodes(1, capacity, quota_pods)
    }

    /// [`World::new`] on `nodes` nodes of `capacity` pods each.
    pub fn on_nodes(nodes: usize, capacity: usize, quota_pods: Option<usize>) -> World {
        World::with_cluster(ClusterSpec {
            nodes,
            capacity,
            quota_pods,
            ..ClusterSpec::default()
        })
    }

    /// The world on a cluster made as `spec` says (the mirror's claim added to its claims).
    pub fn with_cluster(mut spec: ClusterSpec) -> World {
        let served = Served::new("acme/widgets.git");
        let out = served.sandbox.populate_mirror().arg(&served.url).run();
        assert_eq!(out.code(), Some(0), "populate-mirror: {}", out.log());
        let dir = served.sandbox.dir.path();
        let kube = FakeKube::start();
        let kubeconfig = kube.kubeconfig(dir, NS);
        if std::env::var("PROBE").is_err() {
            kube.create(
                "secrets",
                NS,
                json!({"metadata": {"name": "buildkite-agent"}, "stringData": {"token": TOKEN}}),
            );
        }
        // The shipped claim, bound to the directory populate-mirror filled.
        let claim =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/storage/shared/claim.yaml");
        let claim = serde_yaml_ng::from_str(&std::fs::read_to_string(claim).unwrap()).unwrap();
        kube.create("persistentvolumeclaims", NS, claim);
        let buildkite = FakeBuildkite::start(TOKEN, QUEUE);
        let template = dir.join("agent-job.yaml");
        write_template(&template, &buildkite.endpoint());
        let pods = dir.join("pods");
        std::fs::create_dir(&pods).unwrap();
        spec.claims
            .insert(CLAIM.to_string(), served.sandbox.mirrors.clone());
        let cluster = FakeCluster::start(&kube, &pods, spec);
        let job_env = job_env(&served);
        World {
            cluster,
            kube,
            buildkite,
            kubeconfig,
            template,
            job_env,
            served,
        }
    }

    /// Room for 20 pods, and the template's image set to `image`, which the registry lacks.
    pub fn with_missing_image(image: &str) -> World {
        let spec = ClusterSpec {
            capacity: 20,
            missing_images: std::collections::BTreeSet::from([image.to_string()]),
            ..ClusterSpec::default()
        };
        let w = World::with_cluster(spec);
        set_image(&w.template, image);
        w
    }

    pub fn schedule(&self, count: usize) {
        self.buildkite.schedule(QUEUE, count, &self.job_env);
    }

    /// The dispatcher, as replica `name`, ticking every 300 ms; agents it starts idle out after
    /// 4 s without a job.
    pub fn dispatcher(&self, name: &str) -> Running {
        Running::spawn(&mut self.dispatcher_command(name))
    }

    pub fn dispatcher_command(&self, name: &str) -> Command {
        let mut command = job_dispatcher(&self.kubeconfig, &self.buildkite, TOKEN, name);
        command
            .env("DISPATCHER_QUEUE", QUEUE)
            .env("DISPATCHER_TEMPLATE", &self.template)
            .env("DISPATCHER_POLL_INTERVAL", "300ms")
            .env("DISPATCHER_IDLE_TIMEOUT", "4s")
            .env("DISPATCHER_MAX_AGENTS", "80")
            .env("DISPATCHER_LISTEN", format!("127.0.0.1:{}", free_port()));
        command
    }

    /// What the shipped populate Job reads: the repository list (one URL, `url`) and its
    /// credentials' Secret.
    pub fn populate_inputs(&self, url: &str) {
        let list = json!({"metadata": {"name": "populate-mirror-repositories"},
                          "data": {"repositories": format!("{url}\n")}});
        self.kube.replace("configmaps", NS, list);
        self.kube.replace(
            "secrets",
            NS,
            json!({"metadata": {"name": "git-credentials"},
                   "stringData": {".git-credentials": "https://x:y@github.com\n"}}),
        );
    }

    /// The dispatcher in claims mode, with the shipped claim and populate templates, a new
    /// generation every `refresh`, one kept.
    pub fn claims_dispatcher(&self, name: &str, refresh: &str) -> Command {
        let snapshots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/storage/snapshots");
        let mut command = self.dispatcher_command(name);
        command
            .env("DISPATCHER_MIRROR_MODE", "claims")
            .env(
                "DISPATCHER_CLAIM_TEMPLATE",
                snapshots.join("mirror-claim.yaml"),
            )
            .env(
                "DISPATCHER_POPULATE_TEMPLATE",
                snapshots.join("populate-job.yaml"),
            )
            .env("DISPATCHER_MIRROR_REFRESH", refresh)
            .env("DISPATCHER_MIRROR_KEEP", "1");
        command
    }

    /// Generation `generation`'s claim, if it exists.
    pub fn claim(&self, generation: u64) -> Option<Value> {
        let name = format!("{CLAIM}-{generation}");
        let claims = self.kube.objects("persistentvolumeclaims", NS);
        claims
            .into_iter()
            .find(|c| c["metadata"]["name"] == name.as_str())
    }

    /// Its `stateless-agent/mirror-state` label (null when the claim is gone).
    pub fn claim_state(&self, generation: u64) -> Value {
        let claim = self.claim(generation).unwrap_or_default();
        claim["metadata"]["labels"]["stateless-agent/mirror-state"].clone()
    }

    /// The agent pods: those of this queue's dispatches.
    pub fn pods(&self) -> Vec<Value> {
        let pods = self.kube.objects("pods", NS).into_iter();
        pods.filter(|p| p["metadata"]["labels"]["stateless-agent/queue"] == QUEUE)
            .collect()
    }

    pub fn finished_jobs(&self) -> usize {
        let jobs = self.buildkite.jobs();
        jobs.iter()
            .filter(|j| j.state == JobState::Finished)
            .count()
    }

    /// Neither the registration token nor an agent's access token (the fake's are
    /// `bkaa_fake-access-NNNN`) in a pod's log, the dispatcher's, or an object.
    pub fn assert_no_secret(&self, dispatcher: &Finished) {
        let everything = self.everything_but_the_secret(dispatcher);
        assert!(!everything.contains(TOKEN), "the agent token leaked");
        assert!(
            !everything.contains("bkaa_fake-access"),
            "an access token leaked"
        );
    }

    /// Everything that must never hold the token: pod logs, the API server's objects.
    pub fn everything_but_the_secret(&self, dispatcher: &Finished) -> String {
        let objects: Vec<Value> = ["pods", "jobs", "events", "leases"]
            .iter()
            .flat_map(|plural| self.kube.objects(plural, NS))
            .collect();
        format!(
            "{}{}{}",
            self.cluster.all_logs(),
            dispatcher.log(),
            serde_json::to_string(&objects).unwrap()
        )
    }
}

/// The shipped template, with the agent API's endpoint set to the fake's (the one change a
/// real deployment does not need).
pub fn write_template(path: &Path, endpoint: &str) {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/k8s/agent-job.yaml");
    let shipped = std::fs::read_to_string(shipped).unwrap();
    std::fs::write(path, with_endpoint(&shipped, endpoint)).unwrap();
}

/// `path`'s template with the agent's image set to `image`.
pub fn set_image(path: &Path, image: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut job: Value = serde_yaml_ng::from_str(&text).unwrap();
    job["spec"]["template"]["spec"]["containers"][0]["image"] = image.into();
    std::fs::write(path, serde_yaml_ng::to_string(&job).unwrap()).unwrap();
}

/// `path`'s template with the agent container's CPU limit set to `cpu`.
pub fn set_cpu_limit(path: &Path, cpu: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut job: Value = serde_yaml_ng::from_str(&text).unwrap();
    job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] = json!({"cpu": cpu});
    std::fs::write(path, serde_yaml_ng::to_string(&job).unwrap()).unwrap();
}

/// An agent template's text with the agent API's endpoint set to `endpoint`.
pub fn with_endpoint(template: &str, endpoint: &str) -> String {
    let mut job: serde_json::Value = serde_yaml_ng::from_str(template).unwrap();
    let env = job["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array_mut()
        .unwrap();
    env.push(json!({"name": "BUILDKITE_AGENT_ENDPOINT", "value": endpoint}));
    serde_yaml_ng::to_string(&job).unwrap()
}

/// A job of `served`'s main branch, whose command checks that its checkout is there.
pub fn job_env(served: &Served) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("BUILDKITE_REPO".to_string(), served.url.clone()),
        ("BUILDKITE_COMMIT".to_string(), served.upstream.head()),
        ("BUILDKITE_BRANCH".to_string(), "main".to_string()),
        ("BUILDKITE_PIPELINE_SLUG".to_string(), "widgets".to_string()),
        (
            "BUILDKITE_COMMAND".to_string(),
            "test -f README.md".to_string(),
        ),
    ])
}

/// The Secret an agent container's `BUILDKITE_AGENT_TOKEN` is taken from (null if none).
pub fn token_secret(container: &Value) -> &Value {
    let env = container["env"].as_array().into_iter().flatten();
    let token = env.clone().find(|e| e["name"] == "BUILDKITE_AGENT_TOKEN");
    token.map_or(&Value::Null, |t| &t["valueFrom"]["secretKeyRef"]["name"])
}

/// Whether `job` has the condition `kind` True (a finished Job's conditions start with the
/// interim `SuccessCriteriaMet` or `FailureTarget`, so the one sought is looked for by type).
pub fn ended(job: &Value, kind: &str) -> bool {
    let conditions = job["status"]["conditions"].as_array();
    conditions.is_some_and(|c| c.iter().any(|c| c["type"] == kind && c["status"] == "True"))
}

/// Waits up to `limit` for `done`.
pub fn wait(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The exit reports of the pods that ran a job, from their termination messages.
pub fn reports(pods: &[Value]) -> Vec<Value> {
    pods.iter()
        .filter_map(|p| {
            p["status"]["containerStatuses"][0]["state"]["terminated"]["message"]
                .as_str()
                .and_then(|m| serde_json::from_str(m).ok())
        })
        .collect()
}

/// What a run left behind, read once everything has ended.
pub struct Outcome {
    pub pods: Vec<Value>,
    pub reports: Vec<Value>,
    pub jobs: Vec<Value>,
    pub dispatcher: String,
}

impl Outcome {
    pub fn ran_a_job(&self) -> Vec<&Value> {
        let ran = self.reports.iter();
        ran.filter(|r| r["reason"] == "job-finished").collect()
    }

    /// Asserts the dispatcher held back at least once for `reason`.
    pub fn assert_held(&self, reason: &str) {
        let held = self.decisions("hold");
        let said = held.iter().any(|l| l["reason"] == reason);
        assert!(said, "no hold for {reason}: {}", self.dispatcher);
    }

    /// The dispatcher's JSON log lines whose `decision` is `decision`.
    pub fn decisions(&self, decision: &str) -> Vec<Value> {
        self.dispatcher
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["decision"] == decision)
            .collect()
    }
}

impl World {
    /// `count` jobs of a second each, run to the end by one dispatcher.
    pub fn run_slow_jobs(&self, count: usize) -> Outcome {
        let mut env = self.job_env.clone();
        env.insert("BUILDKITE_COMMAND".into(), "sleep 1".into());
        self.buildkite.schedule(QUEUE, count, &env);
        let dispatcher = self.dispatcher("replica-a");
        self.outcome(dispatcher, count, Duration::from_secs(120))
    }

    /// Waits for `jobs` finished jobs and every pod ended, stops the dispatcher, and checks
    /// what every run must leave: each job's checkout a mirror hit at the right commit, every
    /// pod ended with exit 0 and a report, no container left, and the token nowhere.
    pub fn outcome(&self, dispatcher: Running, jobs: usize, limit: Duration) -> Outcome {
        wait(&format!("{jobs} jobs finished"), limit, || {
            self.finished_jobs() == jobs
        });
        // A Job ends once none of its pods is active; one whose parallelism was lowered (stuck
        // pods let go), or whose evicted pods come back after the per-index backoff, makes
        // pods for its open indexes until then.
        wait("every Job finished", Duration::from_secs(120), || {
            let jobs = self.kube.objects("jobs", NS);
            jobs.iter()
                .all(|j| ended(j, "Complete") || ended(j, "Failed"))
        });
        wait("every pod ended", Duration::from_secs(60), || {
            self.pods()
                .iter()
                .all(|p| matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed")))
        });
        let out = dispatcher.stop();
        let pods = self.pods();
        let outcome = Outcome {
            reports: reports(&pods),
            pods,
            jobs: self.kube.objects("jobs", NS),
            dispatcher: out.stderr.clone(),
        };
        let context = || format!("{}\n{}", out.log(), self.cluster.all_logs());
        assert_eq!(outcome.ran_a_job().len(), jobs, "{}", context());
        for report in outcome.ran_a_job() {
            assert_eq!(report["checkout"]["mirror"], "hit", "{report:#}");
            let head = self.served.upstream.head();
            assert_eq!(report["checkout"]["commit"], head.as_str());
        }
        // Every pod of a Job that completed ended 0, and every pod left its report.
        let complete: Vec<&Value> = outcome
            .jobs
            .iter()
            .filter(|j| ended(j, "Complete"))
            .map(|j| &j["metadata"]["uid"])
            .collect();
        for pod in &outcome.pods {
            let owner = &pod["metadata"]["ownerReferences"][0]["uid"];
            let state = &pod["status"]["containerStatuses"][0]["state"]["terminated"];
            if complete.contains(&owner) {
                assert_eq!(state["exitCode"], 0, "{pod:#}\n{}", context());
            }
        }
        assert_eq!(outcome.reports.len(), outcome.pods.len(), "{}", context());
        let finished = self.buildkite.jobs();
        assert!(finished
            .iter()
            .all(|j| j.exit_status.as_deref() != Some("1")));
        wait("no container left", Duration::from_secs(10), || {
            self.cluster.leftover_processes().is_empty()
        });
        self.assert_no_secret(&out);
        eprintln!(
            "{jobs} jobs: {} pods in {} Jobs",
            outcome.pods.len(),
            outcome.jobs.len()
        );
        outcome
    }
}
