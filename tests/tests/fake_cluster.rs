//! The fake cluster behind the fake API server, driven by a real `kubectl` as a user would: a
//! pod really runs and writes to its claim's volume, and a claim deleted while a pod object
//! names it stays Terminating (the pvc-protection finalizer) until that object is gone, finished
//! or not, while a new pod naming it is never scheduled; a snapshot of a claim restores into a
//! new one; Jobs fail past their deadline and go after their TTL. Then the states a real cluster
//! puts pods in: the first matching podFailurePolicy rule decides, `FailureTarget` before
//! `Failed`, a failed index's next pod after the backoff delay, evictions (the API's through
//! `kubectl drain` and a raw POST, the kubelet's, preemption, taint eviction), images that do
//! not pull or parse, a missing Secret or ConfigMap, the autoscaler, a freed quota, PodGC.
//! Needs root and `kubectl`; without them it says so and skips.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use stateless_e2e::fake_cluster::{Autoscaler, ClusterSpec, FakeCluster};
use stateless_e2e::fake_kube::{kubectl_installed, FakeKube};
use stateless_e2e::sandbox::{wait_for, Sandbox};

fn kubectl(config: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new("kubectl")
        .env("KUBECONFIG", config)
        .args(["--request-timeout=10s"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input = stdin.unwrap_or("").to_string();
    let mut pipe = child.stdin.take().unwrap();
    std::thread::spawn(move || std::io::Write::write_all(&mut pipe, input.as_bytes()));
    child.wait_with_output().unwrap()
}

fn get(config: &Path, what: &[&str]) -> Option<Value> {
    let mut args = vec!["get"];
    args.extend(what);
    args.extend(["-o", "json"]);
    let out = kubectl(config, &args, None);
    serde_json::from_slice(&out.stdout).ok()
}

/// A pod that runs `script` as root with claim `claim` at `/data`.
fn pod(name: &str, claim: &str, script: &str) -> String {
    pod_as(name, claim, script, "runAsUser: 0\n    runAsGroup: 0")
}

/// A pod that runs `script` with the pod security context `security` and `claim` at `/data`.
fn pod_as(name: &str, claim: &str, script: &str, security: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  restartPolicy: Never\n  securityContext:\n    {security}\n  containers:\n  - name: main\n    image: stateless-agent\n    command: [/bin/sh, -c, '{script}']\n    volumeMounts:\n    - {{name: data, mountPath: /data}}\n  volumes:\n  - name: data\n    persistentVolumeClaim: {{claimName: {claim}}}\n"
    )
}

/// A pod of container `main` running `script` as root from `image`, with `container` added to
/// the container and `spec` to the pod spec (YAML lines, indented for their place).
fn bare_pod(name: &str, image: &str, script: &str, container: &str, spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 2\n  securityContext: {{runAsUser: 0, runAsGroup: 0}}\n{spec}  containers:\n  - name: main\n    image: {image}\n    command: [/bin/sh, -c, '{script}']\n{container}"
    )
}

/// A Job whose container `agent` runs `script` as root, stopped within 5 s, with `spec` added
/// to the Job's spec (YAML lines indented by two).
fn job(name: &str, spec: &str, script: &str) -> String {
    format!("apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: {name}\nspec:\n{spec}  template:\n    spec:\n      restartPolicy: Never\n      terminationGracePeriodSeconds: 5\n      securityContext: {{runAsUser: 0, runAsGroup: 0}}\n      containers:\n      - name: agent\n        image: stateless-agent\n        command: [/bin/sh, -c, '{script}']\n")
}

/// A script that idles until SIGTERM, then exits `code` (as the agent's wrapper does, 81 for an
/// agent stopped before any job).
fn until_term(code: u8) -> String {
    format!("trap \"exit {code}\" TERM; echo trapped; while true; do sleep 0.2; done")
}

/// Waits until `pod`'s [`until_term`] script has its trap: a SIGTERM before it reaches the shell
/// as PID 1 of its namespace, which ignores what it does not handle.
fn wait_trapped(setup: &Setup, pod: &str) {
    wait_for("the TERM trap set", || {
        setup.cluster.log(pod).contains("trapped")
    });
}

/// A script that takes 3 s to stop on SIGTERM, long enough to read its pod while it does.
const SLOW_STOP: &str = "trap \"sleep 3; exit 0\" TERM; while true; do sleep 0.2; done";

fn scheduling_message(config: &Path, pod: &str) -> String {
    let pod = get(config, &["pod", pod]).unwrap_or_default();
    condition(&pod, "PodScheduled")["message"]
        .as_str()
        .unwrap_or("")
        .into()
}

/// An object's status condition of `kind` (null if none).
fn condition(object: &Value, kind: &str) -> Value {
    let conditions = object["status"]["conditions"].as_array().cloned();
    let found = conditions
        .unwrap_or_default()
        .into_iter()
        .find(|c| c["type"] == kind);
    found.unwrap_or_default()
}

/// The types of an object's conditions, in order.
fn condition_types(object: &Value) -> Vec<String> {
    let conditions = object["status"]["conditions"].as_array().cloned();
    let types = conditions.unwrap_or_default().into_iter();
    types
        .map(|c| c["type"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Seconds since the epoch of an RFC 3339 time, as `date` reads it.
fn seconds(time: &Value) -> i64 {
    let out = Command::new("date")
        .args(["-u", "-d", time.as_str().unwrap_or(""), "+%s"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// A fake API server with a cluster behind it, and `kubectl`'s configuration for it.
struct Setup {
    /// Stops the containers before the files they use go away.
    cluster: FakeCluster,
    config: PathBuf,
    /// The kubelet's directory: each pod's, and the volumes it provisions.
    pods: PathBuf,
    _kube: FakeKube,
    _sandbox: Sandbox,
}

impl Setup {
    /// `kubectl create -f -` of `yaml` (the fake serves no OpenAPI to validate against).
    fn create(&self, yaml: &str) {
        let args = ["create", "--validate=false", "-f", "-"];
        let out = kubectl(&self.config, &args, Some(yaml));
        assert!(out.status.success(), "{out:?}");
    }

    fn get(&self, what: &[&str]) -> Option<Value> {
        get(&self.config, what)
    }

    /// The pods of Job `job`.
    fn job_pods(&self, job: &str) -> Vec<Value> {
        let list = self.get(&["pods", "-l", &format!("job-name={job}")]);
        let items = list.and_then(|l| l["items"].as_array().cloned());
        items.unwrap_or_default()
    }

    /// The name of Job `job`'s pod that is running, if one is.
    fn running_pod(&self, job: &str) -> Option<String> {
        let pods = self.job_pods(job);
        let running = pods
            .into_iter()
            .find(|p| p["status"]["phase"] == "Running")?;
        running["metadata"]["name"].as_str().map(String::from)
    }

    /// The Events about object `name`.
    fn events(&self, name: &str) -> Vec<Value> {
        let selector = format!("involvedObject.name={name}");
        let list = self.get(&["events", "--field-selector", &selector]);
        let items = list.and_then(|l| l["items"].as_array().cloned());
        items.unwrap_or_default()
    }

    /// Whether `name` has an Event of `reason` from `component` whose message contains `text`.
    fn has_event(&self, name: &str, reason: &str, component: &str, text: &str) -> bool {
        self.events(name).iter().any(|e| {
            e["reason"] == reason
                && e["source"]["component"] == component
                && e["message"].as_str().is_some_and(|m| m.contains(text))
        })
    }

    /// A cluster of one node of 4 pods.
    fn new() -> Option<Setup> {
        Setup::with(ClusterSpec {
            capacity: 4,
            ..ClusterSpec::default()
        })
    }

    /// [`Setup::new`] whose registry lacks [`MISSING`].
    fn missing_image() -> Option<Setup> {
        Setup::with(ClusterSpec {
            capacity: 4,
            missing_images: BTreeSet::from([MISSING.to_string()]),
            ..ClusterSpec::default()
        })
    }

    /// `None` (having said why) where the cluster or `kubectl` cannot run.
    fn with(spec: ClusterSpec) -> Option<Setup> {
        if let Some(why) = FakeCluster::unavailable() {
            eprintln!("skipping: {why}");
            return None;
        }
        if !kubectl_installed() {
            return None;
        }
        let sandbox = Sandbox::new();
        let kube = FakeKube::start();
        let config = kube.kubeconfig(sandbox.dir.path(), "ci");
        let pods = sandbox.dir.path().join("cluster");
        std::fs::create_dir(&pods).unwrap();
        Some(Setup {
            cluster: FakeCluster::start(&kube, &pods, spec),
            config,
            pods,
            _kube: kube,
            _sandbox: sandbox,
        })
    }
}

/// Waits up to `limit` for `done`.
fn wait(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_claim_in_use_stays_terminating_until_its_last_pod_object_goes() {
    let Some(setup) = Setup::new() else {
        return;
    };
    let (cluster, config, pods) = (&setup.cluster, &setup.config, &setup.pods);
    let create = |yaml: &str| setup.create(yaml);
    create("apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: data\nspec:\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 1Gi\n");
    wait_for("the claim bound", || {
        get(config, &["pvc", "data"]).is_some_and(|c| c["status"]["phase"] == "Bound")
    });
    let claim = get(config, &["pvc", "data"]).unwrap();
    assert_eq!(
        claim["metadata"]["finalizers"][0],
        "kubernetes.io/pvc-protection"
    );

    // A pod really runs, and writes to the claim's volume.
    create(&pod("writer", "data", "echo written > /data/file"));
    wait_for("the writer finished", || {
        get(config, &["pod", "writer"]).is_some_and(|p| p["status"]["phase"] == "Succeeded")
    });
    let volume = pods.join(".volumes/ci/data");
    let written = std::fs::read_to_string(volume.join("file")).unwrap_or_default();
    assert_eq!(written, "written\n", "{}", cluster.log("writer"));

    // Deleted while a finished pod object still names it: Terminating, not gone.
    let out = kubectl(config, &["delete", "pvc", "data", "--wait=false"], None);
    assert!(out.status.success(), "{out:?}");
    std::thread::sleep(Duration::from_millis(500));
    let claim = get(config, &["pvc", "data"]).expect("the claim stays");
    assert!(claim["metadata"]["deletionTimestamp"].is_string());

    // A new pod naming it is never scheduled.
    create(&pod("late", "data", "true"));
    wait_for("the late pod refused", || {
        scheduling_message(config, "late")
            .contains("persistentvolumeclaim \"data\" is being deleted")
    });

    // The last scheduled pod object goes: so does the claim, and its volume.
    let out = kubectl(config, &["delete", "pod", "writer"], None);
    assert!(out.status.success(), "{out:?}");
    wait_for("the claim gone", || get(config, &["pvc", "data"]).is_none());
    assert!(!volume.exists());
    let late = get(config, &["pod", "late"]).unwrap();
    assert_eq!(late["status"]["phase"], "Pending");
    assert!(late["spec"]["nodeName"].is_null());
}

/// A Job running past `activeDeadlineSeconds` fails and its pod is stopped (SIGTERM through the
/// kubelet); a finished Job goes `ttlSecondsAfterFinished` later, its pods with it. Both get the
/// interim condition first: `FailureTarget`, `SuccessCriteriaMet`.
#[test]
fn a_job_past_its_deadline_fails_and_a_finished_one_goes_after_its_ttl() {
    let Some(setup) = Setup::new() else {
        return;
    };
    setup.create(&job("slow", "  activeDeadlineSeconds: 2\n", "sleep 60"));
    setup.create(&job("quick", "  ttlSecondsAfterFinished: 2\n", "true"));
    let types = |name: &str| setup.get(&["job", name]).map(|j| condition_types(&j));
    wait_for("the quick Job complete", || {
        types("quick").is_some_and(|t| t.contains(&"Complete".to_string()))
    });
    let started = Instant::now();
    let quick = setup.get(&["job", "quick"]).unwrap();
    assert_eq!(condition_types(&quick), ["SuccessCriteriaMet", "Complete"]);
    let met = condition(&quick, "SuccessCriteriaMet");
    assert_eq!(met["reason"], "CompletionsReached");
    assert_eq!(met["message"], "Reached expected number of succeeded pods");
    wait_for("the quick Job gone after its TTL", || {
        setup.get(&["job", "quick"]).is_none()
    });
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(setup.job_pods("quick").len(), 0);
    wait_for("the slow Job past its deadline", || {
        setup
            .get(&["job", "slow"])
            .is_some_and(|j| condition(&j, "FailureTarget")["reason"] == "DeadlineExceeded")
    });
    // Its pod is stopped and removed: its PID 1, a shell, has no SIGTERM handler, so it is the
    // SIGKILL after the 5 s grace period that ends it, as on a node.
    wait_for("the slow Job's pod gone", || {
        setup.job_pods("slow").is_empty()
    });
    wait_for("the slow Job failed", || {
        types("slow").is_some_and(|t| t == ["FailureTarget", "Failed"])
    });
}

/// The shipped agent Job's rules, `Ignore` on `DisruptionTarget` then `FailJob` on exit codes
/// with 81 among them, as YAML lines, in their order or reversed.
fn shipped_rules(reversed: bool) -> String {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/k8s/agent-job.yaml");
    let shipped: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(shipped).unwrap()).unwrap();
    let mut rules = shipped["spec"]["podFailurePolicy"]["rules"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(rules[0]["action"], "Ignore");
    assert_eq!(rules[1]["action"], "FailJob");
    assert!(rules[1]["onExitCodes"]["values"]
        .as_array()
        .unwrap()
        .contains(&json!(81)));
    if reversed {
        rules.reverse();
    }
    format!("  podFailurePolicy: {}\n", json!({"rules": rules}))
}

/// A pod that has `DisruptionTarget` and exits 81 (an idle agent drained): under the shipped
/// order the `Ignore` rule matches first, so the failure is not counted (not even against
/// `backoffLimitPerIndex: 0`) and the index gets a new pod, after the backoff delay, marked as
/// one ignored failure; with the rules the other way round, `FailJob` matches first and the Job
/// fails.
#[test]
fn the_first_matching_pod_failure_rule_decides() {
    let Some(setup) = Setup::new() else {
        return;
    };
    let indexed = "  completionMode: Indexed\n  completions: 1\n  backoffLimitPerIndex: 0\n";
    let spec = |reversed| format!("{indexed}{}", shipped_rules(reversed));
    setup.create(&job("ignored", &spec(false), &until_term(81)));
    setup.create(&job("failing", &spec(true), &until_term(81)));
    let evicted: Vec<String> = ["ignored", "failing"]
        .into_iter()
        .map(|job| {
            wait_for("the agent running", || setup.running_pod(job).is_some());
            let pod = setup.running_pod(job).unwrap();
            wait_trapped(&setup, &pod);
            setup.cluster.evict("ci", &pod);
            pod
        })
        .collect();
    let evicted_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;

    wait_for("the failing Job failed", || {
        setup
            .get(&["job", "failing"])
            .is_some_and(|j| condition(&j, "Failed").is_object())
    });
    let failing = setup.get(&["job", "failing"]).unwrap();
    let failed = condition(&failing, "Failed");
    assert_eq!(failed["reason"], "PodFailurePolicy");
    let said = format!(
        "Container agent for pod ci/{} failed with exit code 81 matching FailJob rule at index 0",
        evicted[1]
    );
    assert_eq!(failed["message"], said);
    assert_eq!(failing["status"]["failed"], 1, "{failing:#}");
    assert_ignored_and_replaced(&setup, &evicted[0], evicted_at);
}

/// The ignored failure's pod stays, held by the Job's finalizer, until its index's next pod,
/// which comes after the backoff delay marked as one ignored failure; the Job counts none.
fn assert_ignored_and_replaced(setup: &Setup, old: &str, evicted_at: i64) {
    let pod = || setup.get(&["pod", old]).unwrap_or_default();
    wait_for("the evicted agent failed", || {
        pod()["status"]["phase"] == "Failed"
    });
    let target = condition(&pod(), "DisruptionTarget");
    assert_eq!(target["reason"], "EvictionByEvictionAPI");
    let terminated = &pod()["status"]["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(terminated["exitCode"], 81);
    let new = || {
        let mut pods = setup.job_pods("ignored").into_iter();
        pods.find(|p| p["metadata"]["name"] != old)
    };
    wait("the index's next pod", Duration::from_secs(40), || {
        new().is_some()
    });
    let new = new().unwrap();
    let created = seconds(&new["metadata"]["creationTimestamp"]);
    assert!(created - evicted_at >= 9, "after {}s", created - evicted_at);
    let annotations = &new["metadata"]["annotations"];
    let count = |name: &str| annotations[format!("batch.kubernetes.io/{name}")].clone();
    assert_eq!(count("job-index-failure-count"), "0");
    assert_eq!(count("job-index-ignored-failure-count"), "1");
    wait_for("the evicted pod gone", || {
        setup.get(&["pod", old]).is_none()
    });
    let ignored = setup.get(&["job", "ignored"]).unwrap();
    assert_eq!(ignored["status"]["failed"], 0, "{ignored:#}");
    assert!(condition_types(&ignored).is_empty(), "{ignored:#}");
}

/// A Job whose one pod fails by a `FailJob` rule while the other takes a while to stop: the
/// Job is `FailureTarget` (the pod being deleted counted as terminating) and only `Failed`,
/// with the same reason and message, once that pod is gone.
#[test]
fn a_failing_job_is_failure_target_until_its_pods_have_stopped() {
    let Some(setup) = Setup::new() else {
        return;
    };
    let rules = "  podFailurePolicy:\n    rules:\n    - action: FailJob\n      onExitCodes: {operator: In, values: [3]}\n";
    let spec = format!("  completionMode: Indexed\n  completions: 2\n  parallelism: 2\n{rules}");
    let script = "if [ \"$JOB_COMPLETION_INDEX\" = 0 ]; then sleep 1; exit 3; fi; trap \"sleep 3; exit 0\" TERM; while true; do sleep 0.2; done";
    setup.create(&job("split", &spec, script));
    let job = || setup.get(&["job", "split"]).unwrap_or_default();
    wait_for("the Job's failure target", || {
        condition(&job(), "FailureTarget").is_object()
    });
    let target = job();
    assert!(condition(&target, "Failed").is_null(), "{target:#}");
    assert_eq!(target["status"]["terminating"], 1, "{target:#}");
    let stopping = setup.job_pods("split").into_iter().find(|p| {
        p["metadata"]["deletionTimestamp"].is_string() && p["status"]["phase"] == "Running"
    });
    assert!(stopping.is_some(), "a pod still stopping");
    let reason = condition(&target, "FailureTarget")["message"].clone();
    assert!(reason
        .as_str()
        .unwrap()
        .contains("matching FailJob rule at index 0"));

    wait_for("the Job failed", || condition(&job(), "Failed").is_object());
    let failed = job();
    assert_eq!(condition_types(&failed), ["FailureTarget", "Failed"]);
    assert_eq!(condition(&failed, "Failed")["message"], reason);
    assert_eq!(condition(&failed, "Failed")["reason"], "PodFailurePolicy");
    assert_eq!(failed["status"]["terminating"], 0);
    assert!(setup.has_event("split", "PodFailurePolicy", "job-controller", "exit code 3"));
}

/// With `backoffLimitPerIndex`, a failed index's next pod comes 10 s after the failure (the
/// first backoff delay), carrying the failure count; past the limit the index fails, and with
/// it the Job (`FailedIndexes`).
#[test]
fn a_failed_index_gets_its_next_pod_after_the_backoff_delay() {
    let Some(setup) = Setup::new() else {
        return;
    };
    let spec = "  completionMode: Indexed\n  completions: 1\n  backoffLimitPerIndex: 1\n";
    setup.create(&job("retried", spec, "exit 1"));
    wait("the index's second pod", Duration::from_secs(40), || {
        setup.job_pods("retried").len() == 2
    });
    let mut pods = setup.job_pods("retried");
    pods.sort_by_key(|p| seconds(&p["metadata"]["creationTimestamp"]));
    let failed_at =
        seconds(&pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"]);
    let next_at = seconds(&pods[1]["metadata"]["creationTimestamp"]);
    assert!(
        next_at - failed_at >= 10,
        "the next pod {}s after",
        next_at - failed_at
    );
    let count = |p: &Value| {
        p["metadata"]["annotations"]["batch.kubernetes.io/job-index-failure-count"].clone()
    };
    assert_eq!((count(&pods[0]), count(&pods[1])), (json!("0"), json!("1")));
    let first = pods[0]["metadata"]["name"].as_str().unwrap().to_string();
    wait_for("the failure counted, its finalizer off", || {
        let pod = setup.get(&["pod", &first]).unwrap_or_default();
        pod["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| f.is_empty())
    });

    wait("the Job failed", Duration::from_secs(20), || {
        setup
            .get(&["job", "retried"])
            .is_some_and(|j| condition(&j, "Failed").is_object())
    });
    let job = setup.get(&["job", "retried"]).unwrap();
    assert_eq!(condition(&job, "Failed")["reason"], "FailedIndexes");
    assert_eq!(
        (&job["status"]["failedIndexes"], &job["status"]["failed"]),
        (&json!("0"), &json!(2))
    );
}

/// `kubectl drain` cordons the node and evicts its pods through the Eviction API: the Job's pod
/// gets `DisruptionTarget` and goes, its replacement waits on the cordoned node until
/// `kubectl uncordon`.
#[test]
fn kubectl_drain_evicts_through_the_eviction_api() {
    let Some(setup) = Setup::new() else {
        return;
    };
    setup.create(&job("drained", "", &until_term(81)));
    wait_for("the pod running", || setup.running_pod("drained").is_some());
    let first = setup.running_pod("drained").unwrap();
    wait_trapped(&setup, &first);
    let args = [
        "drain",
        "fake-node-1",
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        "--grace-period=2",
        "--timeout=60s",
    ];
    let out = kubectl(&setup.config, &args, None);
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains(&format!("evicting pod ci/{first}")), "{said}");
    let node = setup.get(&["node", "fake-node-1"]).unwrap();
    assert_eq!(node["spec"]["unschedulable"], true);
    assert!(
        setup.get(&["pod", &first]).is_none(),
        "drain waits for the pod to go"
    );

    let next = || {
        setup
            .job_pods("drained")
            .into_iter()
            .next()
            .unwrap_or_default()
    };
    wait_for("a replacement refused by the cordoned node", || {
        condition(&next(), "PodScheduled")["message"]
            .as_str()
            .is_some_and(|m| {
                m.starts_with("0/1 nodes are available: 1 node(s) were unschedulable.")
            })
    });
    let out = kubectl(&setup.config, &["uncordon", "fake-node-1"], None);
    assert!(out.status.success(), "{out:?}");
    wait_for("the replacement running", || {
        next()["status"]["phase"] == "Running"
    });
}

/// The eviction subresource as a raw POST: 201 and a success Status, the pod marked
/// `DisruptionTarget` `EvictionByEvictionAPI` and deleted with the eviction's grace period.
#[test]
fn a_raw_eviction_answers_201_and_marks_the_pod() {
    let Some(setup) = Setup::new() else {
        return;
    };
    setup.create(&bare_pod("evicted", "stateless-agent", SLOW_STOP, "", ""));
    wait_for("the pod running", || {
        setup
            .get(&["pod", "evicted"])
            .is_some_and(|p| p["status"]["phase"] == "Running")
    });
    let eviction = json!({"apiVersion": "policy/v1", "kind": "Eviction",
        "metadata": {"name": "evicted", "namespace": "ci"}, "deleteOptions": {"gracePeriodSeconds": 30}});
    let path = "/api/v1/namespaces/ci/pods/evicted/eviction";
    let out = kubectl(
        &setup.config,
        &["create", "--raw", path, "-f", "-"],
        Some(&eviction.to_string()),
    );
    assert!(out.status.success(), "{out:?}");
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&answer["kind"], &answer["status"]),
        (&json!("Status"), &json!("Success"))
    );
    let pod = setup.get(&["pod", "evicted"]).expect("still stopping");
    let target = condition(&pod, "DisruptionTarget");
    assert_eq!(
        (&target["reason"], &target["message"]),
        (
            &json!("EvictionByEvictionAPI"),
            &json!("Eviction API: evicting")
        )
    );
    assert_eq!(pod["metadata"]["deletionGracePeriodSeconds"], 30);
    wait_for("the pod gone", || setup.get(&["pod", "evicted"]).is_none());
}

/// The kubelet's node-pressure eviction: SIGTERM, the pod failed in place (phase Failed, reason
/// `Evicted`, the eviction manager's message) with `DisruptionTarget` `TerminationByKubelet`,
/// and a Warning `Evicted` from the kubelet; the pod object stays.
#[test]
fn the_kubelet_evicts_a_pod_in_place() {
    let Some(setup) = Setup::new() else {
        return;
    };
    setup.create(&bare_pod(
        "pressed",
        "stateless-agent",
        &until_term(81),
        "",
        "",
    ));
    let pod = || setup.get(&["pod", "pressed"]).unwrap_or_default();
    wait_for("the pod running", || pod()["status"]["phase"] == "Running");
    wait_trapped(&setup, "pressed");
    setup.cluster.kubelet_evict("ci", "pressed");
    wait_for("the pod failed", || pod()["status"]["phase"] == "Failed");
    let pod = pod();
    assert_eq!(pod["status"]["reason"], "Evicted");
    let message = "The node was low on resource: memory. ";
    assert!(
        pod["status"]["message"]
            .as_str()
            .unwrap()
            .starts_with(message),
        "{pod:#}"
    );
    assert_eq!(
        condition(&pod, "DisruptionTarget")["reason"],
        "TerminationByKubelet"
    );
    let terminated = &pod["status"]["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(terminated["exitCode"], 81, "{pod:#}");
    assert!(pod["metadata"]["deletionTimestamp"].is_null());
    assert!(setup.has_event("pressed", "Evicted", "kubelet", message));
}

/// The scheduler's preemption and the taint eviction controller each mark the pod with their
/// `DisruptionTarget` reason and message, then delete it; a user's delete marks nothing.
#[test]
fn preemption_and_taint_eviction_mark_the_pod_before_deleting_it() {
    let Some(setup) = Setup::new() else {
        return;
    };
    for name in ["preempted", "tainted", "deleted"] {
        setup.create(&bare_pod(name, "stateless-agent", SLOW_STOP, "", ""));
    }
    let phase =
        |name: &str| setup.get(&["pod", name]).unwrap_or_default()["status"]["phase"].clone();
    for name in ["preempted", "tainted", "deleted"] {
        wait_for("the pod running", || phase(name) == "Running");
    }
    setup.cluster.preempt("ci", "preempted");
    setup.cluster.taint_evict("ci", "tainted");
    let out = kubectl(
        &setup.config,
        &["delete", "pod", "deleted", "--wait=false"],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    let target = |name: &str| condition(&setup.get(&["pod", name]).unwrap(), "DisruptionTarget");
    let preempted = target("preempted");
    assert_eq!(preempted["reason"], "PreemptionByScheduler");
    assert_eq!(
        preempted["message"],
        "default-scheduler: preempting to accommodate a higher priority pod"
    );
    let tainted = target("tainted");
    assert_eq!(tainted["reason"], "DeletionByTaintManager");
    assert_eq!(
        tainted["message"],
        "Taint manager: deleting due to NoExecute taint"
    );
    assert!(target("deleted").is_null());
    for name in ["preempted", "tainted", "deleted"] {
        wait_for("the pod gone", || setup.get(&["pod", name]).is_none());
    }
}

const MISSING: &str = "registry.example.com/stateless-agent:missing";

/// An image the registry does not have: `ErrImagePull` with containerd's error, then
/// `ImagePullBackOff`, the kubelet's Events; the pod Pending, scheduled, started. Once the
/// image is pushed, the pod starts at its next pull.
#[test]
fn an_image_pull_backs_off_until_the_image_is_pushed() {
    let Some(setup) = Setup::missing_image() else {
        return;
    };
    setup.create(&bare_pod("pulling", MISSING, "true", "", ""));
    let pod = || setup.get(&["pod", "pulling"]).unwrap_or_default();
    let waiting = || pod()["status"]["containerStatuses"][0]["state"]["waiting"].clone();
    wait_for("the pull failed", || waiting()["reason"] == "ErrImagePull");
    let error = format!("rpc error: code = NotFound desc = failed to pull and unpack image \"{MISSING}\": failed to resolve reference \"{MISSING}\": {MISSING}: not found");
    assert_eq!(waiting()["message"], error);
    wait_for("the pull backing off", || {
        waiting()["reason"] == "ImagePullBackOff"
    });
    assert_eq!(
        waiting()["message"],
        format!("Back-off pulling image \"{MISSING}\"")
    );
    let pending = pod();
    assert_eq!(pending["status"]["phase"], "Pending");
    assert_eq!(condition(&pending, "PodScheduled")["status"], "True");
    assert!(pending["status"]["startTime"].is_string());
    assert!(setup.has_event(
        "pulling",
        "Failed",
        "kubelet",
        &format!("Failed to pull image \"{MISSING}\": {error}")
    ));
    assert!(setup.has_event("pulling", "Failed", "kubelet", "Error: ImagePullBackOff"));
    assert!(setup.has_event("pulling", "BackOff", "kubelet", "Back-off pulling image"));

    setup.cluster.change(|spec| {
        spec.missing_images.clear();
    });
    wait(
        "the pod started after the push",
        Duration::from_secs(40),
        || pod()["status"]["phase"] == "Succeeded",
    );
}

/// An image reference that does not parse is `InvalidImageName` with the kubelet's message,
/// never retried; a missing image with `imagePullPolicy: Never` is `ErrImageNeverPull`.
#[test]
fn an_invalid_image_name_or_a_never_pulled_image_never_starts() {
    let Some(setup) = Setup::missing_image() else {
        return;
    };
    setup.create(&bare_pod("invalid", "Stateless-Agent", "true", "", ""));
    let never = "    imagePullPolicy: Never\n";
    setup.create(&bare_pod("never", MISSING, "true", never, ""));
    let waiting = |name: &str| {
        let pod = setup.get(&["pod", name]).unwrap_or_default();
        pod["status"]["containerStatuses"][0]["state"]["waiting"].clone()
    };
    wait_for("the invalid name", || {
        waiting("invalid")["reason"] == "InvalidImageName"
    });
    wait_for("the image never pulled", || {
        waiting("never")["reason"] == "ErrImageNeverPull"
    });
    let invalid = "Failed to apply default image tag \"Stateless-Agent\": couldn't parse image name \"Stateless-Agent\": invalid reference format: repository name (library/Stateless-Agent) must be lowercase";
    assert_eq!(waiting("invalid")["message"], invalid);
    let message = format!("Container image \"{MISSING}\" is not present with pull policy of Never");
    assert_eq!(waiting("never")["message"], message);
    assert!(setup.has_event("invalid", "InspectFailed", "kubelet", invalid));
    assert!(setup.has_event("never", "ErrImageNeverPull", "kubelet", &message));
    // Never retried: no more Events, still waiting.
    let count = |name: &str| {
        setup
            .events(name)
            .iter()
            .map(|e| e["count"].as_u64().unwrap())
            .sum::<u64>()
    };
    let before = (count("invalid"), count("never"));
    setup.cluster.change(|spec| spec.missing_images.clear());
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!((count("invalid"), count("never")), before);
    assert_eq!(waiting("never")["reason"], "ErrImageNeverPull");
}

/// Env from a Secret that is missing, then lacks the key: `CreateContainerConfigError` with the
/// kubelet's messages; once the Secret has the key, the pod starts by itself.
#[test]
fn a_missing_secret_holds_the_pod_until_it_is_created() {
    let Some(setup) = Setup::new() else {
        return;
    };
    let env =
        "    env:\n    - name: TOKEN\n      valueFrom: {secretKeyRef: {name: late, key: token}}\n";
    setup.create(&bare_pod(
        "secretive",
        "stateless-agent",
        "test \"$TOKEN\" = s3cret",
        env,
        "",
    ));
    let pod = || setup.get(&["pod", "secretive"]).unwrap_or_default();
    let waiting = || pod()["status"]["containerStatuses"][0]["state"]["waiting"].clone();
    wait_for("the config error", || {
        waiting()["reason"] == "CreateContainerConfigError"
    });
    assert_eq!(waiting()["message"], "secret \"late\" not found");
    assert!(setup.has_event(
        "secretive",
        "Failed",
        "kubelet",
        "Error: secret \"late\" not found"
    ));
    setup
        .create("apiVersion: v1\nkind: Secret\nmetadata:\n  name: late\nstringData:\n  other: x\n");
    wait_for("the key missing", || {
        waiting()["message"] == "couldn't find key token in Secret ci/late"
    });
    let out = kubectl(&setup.config, &["delete", "secret", "late"], None);
    assert!(out.status.success(), "{out:?}");
    setup.create(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: late\nstringData:\n  token: s3cret\n",
    );
    wait_for("the pod done", || pod()["status"]["phase"] == "Succeeded");
}

/// A runtime that fails `CreateContainer`: `CreateContainerError` with its message, and the
/// kubelet's Event; once the runtime recovers, the pod starts by itself.
#[test]
fn a_runtime_that_cannot_create_containers_holds_the_pod_until_it_recovers() {
    let Some(setup) = Setup::with(ClusterSpec {
        capacity: 4,
        runtime_error: Some("context deadline exceeded".into()),
        ..ClusterSpec::default()
    }) else {
        return;
    };
    setup.create(&bare_pod("slow", "stateless-agent", "true", "", ""));
    let pod = || setup.get(&["pod", "slow"]).unwrap_or_default();
    let waiting = || pod()["status"]["containerStatuses"][0]["state"]["waiting"].clone();
    wait_for("the create error", || {
        waiting()["reason"] == "CreateContainerError"
    });
    assert_eq!(waiting()["message"], "context deadline exceeded");
    assert!(setup.has_event(
        "slow",
        "Failed",
        "kubelet",
        "Error: context deadline exceeded"
    ));
    setup.cluster.change(|spec| spec.runtime_error = None);
    wait_for("the pod done", || pod()["status"]["phase"] == "Succeeded");
}

/// A ConfigMap volume whose ConfigMap is missing: `ContainerCreating` and a `FailedMount` Event;
/// once created, the pod starts and reads it.
#[test]
fn a_missing_config_map_volume_holds_the_pod_until_it_is_created() {
    let Some(setup) = Setup::new() else {
        return;
    };
    let mount = "    volumeMounts:\n    - {name: settings, mountPath: /settings}\n";
    let volume = "  volumes:\n  - name: settings\n    configMap: {name: settings}\n";
    setup.create(&bare_pod(
        "configured",
        "stateless-agent",
        "grep -qx on /settings/mode",
        mount,
        volume,
    ));
    let pod = || setup.get(&["pod", "configured"]).unwrap_or_default();
    let message =
        "MountVolume.SetUp failed for volume \"settings\" : configmap \"settings\" not found";
    wait_for("the mount failed", || {
        setup.has_event("configured", "FailedMount", "kubelet", message)
    });
    let pending = pod();
    assert_eq!(pending["status"]["phase"], "Pending");
    let waiting = &pending["status"]["containerStatuses"][0]["state"]["waiting"];
    assert_eq!(waiting["reason"], "ContainerCreating", "{pending:#}");
    setup.create(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  mode: \"on\"\n",
    );
    wait_for("the pod done", || pod()["status"]["phase"] == "Succeeded");
}

/// Pods that do not fit make the autoscaler add a node, up to its maximum: a `TriggeredScaleUp`
/// Event on each, then the node, where they run.
#[test]
fn the_autoscaler_adds_a_node_for_pods_that_do_not_fit() {
    let Some(setup) = Setup::with(ClusterSpec {
        capacity: 1,
        autoscaler: Some(Autoscaler {
            max_nodes: 2,
            delay: Duration::from_secs(2),
        }),
        ..ClusterSpec::default()
    }) else {
        return;
    };
    for name in ["first", "second"] {
        setup.create(&bare_pod(name, "stateless-agent", "sleep 30", "", ""));
    }
    let node =
        |name: &str| setup.get(&["pod", name]).unwrap_or_default()["spec"]["nodeName"].clone();
    wait_for("one pod bound", || {
        node("first").is_string() || node("second").is_string()
    });
    let waiting = if node("first").is_string() {
        "second"
    } else {
        "first"
    };
    let message = "pod triggered scale-up: [{fake-node-group 1->2 (max: 2)}]";
    wait_for("the scale-up", || {
        setup.has_event(waiting, "TriggeredScaleUp", "cluster-autoscaler", message)
    });
    assert_eq!(setup.cluster.nodes(), 1);
    wait_for("the new node", || {
        setup.get(&["node", "fake-node-2"]).is_some()
    });
    wait_for("the pod on it", || node(waiting) == "fake-node-2");
    assert_eq!(setup.cluster.nodes(), 2);
}

/// A quota that refuses the Job's pod: `FailedCreate` aggregated as the controller backs off;
/// freed, the pod is created at the controller's next attempt.
#[test]
fn a_freed_quota_lets_the_job_create_its_pod() {
    let Some(setup) = Setup::with(ClusterSpec {
        capacity: 4,
        quota_pods: Some(0),
        ..ClusterSpec::default()
    }) else {
        return;
    };
    setup.create(&job("quota", "", "true"));
    let refusals = || {
        let events = setup.events("quota");
        let refused = events.into_iter().find(|e| e["reason"] == "FailedCreate");
        refused.map_or(0, |e| e["count"].as_u64().unwrap())
    };
    wait_for("three refusals", || refusals() >= 3);
    let event = setup
        .events("quota")
        .into_iter()
        .find(|e| e["reason"] == "FailedCreate")
        .unwrap();
    let message = event["message"].as_str().unwrap();
    assert!(
        message.contains("is forbidden: exceeded quota: agent-pods"),
        "{message}"
    );
    // 1 s, then 2 s, 4 s between attempts: three refusals take at least 3 s.
    let span = seconds(&event["lastTimestamp"]) - seconds(&event["firstTimestamp"]);
    assert!(span >= 2, "three refusals in {span}s");
    setup.cluster.change(|spec| spec.quota_pods = Some(1));
    wait_for("the Job's pod created", || {
        !setup.job_pods("quota").is_empty()
    });
    wait_for("the Job complete", || {
        setup
            .get(&["job", "quota"])
            .is_some_and(|j| condition(&j, "Complete").is_object())
    });
}

/// A LimitRange refuses a container without a CPU limit, and one above its `max.cpu`, in the
/// LimitRanger's words; raised, the pod is created at the controller's next attempt.
#[test]
fn a_limit_range_refuses_the_pod_until_it_admits_it() {
    let Some(setup) = Setup::with(ClusterSpec {
        capacity: 4,
        max_container_cpu: Some(2000),
        ..ClusterSpec::default()
    }) else {
        return;
    };
    let refusal = |name: &str| {
        let events = setup.events(name);
        let refused = events.into_iter().find(|e| e["reason"] == "FailedCreate");
        refused.map(|e| e["message"].as_str().unwrap().to_string())
    };
    setup.create(&job("unlimited", "", "true"));
    let limited = job("limited", "", "true") + "        resources: {limits: {cpu: \"4\"}}\n";
    setup.create(&limited);
    wait_for("both refused", || {
        refusal("unlimited").is_some() && refusal("limited").is_some()
    });
    let said = refusal("limited").unwrap();
    assert!(
        said.starts_with("Error creating: pods \"limited-"),
        "{said}"
    );
    assert!(
        said.ends_with(" is forbidden: maximum cpu usage per Container is 2, but limit is 4."),
        "{said}"
    );
    let said = refusal("unlimited").unwrap();
    assert!(
        said.ends_with("maximum cpu usage per Container is 2.  No limit is specified."),
        "{said}"
    );
    setup
        .cluster
        .change(|spec| spec.max_container_cpu = Some(4000));
    wait_for("the limited Job's pod created", || {
        !setup.job_pods("limited").is_empty()
    });
    assert!(setup.job_pods("unlimited").is_empty());
}

/// A Job's pod deleted before it was scheduled (its claim missing) stays, held by the Job's
/// finalizer, until PodGC fails it and the Job counts it (no `DisruptionTarget`: PodGC gives
/// unscheduled pods none).
#[test]
fn podgc_fails_a_deleted_unscheduled_pod_for_the_job_to_count() {
    let Some(setup) = Setup::new() else {
        return;
    };
    let rules = "  podFailurePolicy:\n    rules:\n    - action: Ignore\n      onPodConditions: [{type: DisruptionTarget, status: \"True\"}]\n";
    let spec = format!("{rules}  backoffLimit: 3\n");
    let claimed = job("unplaced", &spec, "true").replace(
        "        command:",
        "        volumeMounts: [{name: data, mountPath: /data}]\n        command:",
    ) + "      volumes: [{name: data, persistentVolumeClaim: {claimName: absent}}]\n";
    setup.create(&claimed);
    let first = || {
        setup
            .job_pods("unplaced")
            .into_iter()
            .next()
            .unwrap_or_default()
    };
    wait_for("the pod unschedulable", || {
        condition(&first(), "PodScheduled")["status"] == "False"
    });
    assert_eq!(
        first()["metadata"]["finalizers"][0],
        "batch.kubernetes.io/job-tracking"
    );
    let name = first()["metadata"]["name"].as_str().unwrap().to_string();
    let out = kubectl(
        &setup.config,
        &["delete", "pod", &name, "--wait=false"],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    wait_for("the failure counted", || {
        setup
            .get(&["job", "unplaced"])
            .is_some_and(|j| j["status"]["failed"] == 1)
    });
    wait_for("the pod gone", || setup.get(&["pod", &name]).is_none());
    assert_eq!(setup.job_pods("unplaced").len(), 1, "a replacement");
}

/// A claim written by a non-root pod (its `fsGroup` makes the new volume writable), then
/// snapshotted, and the snapshot restored into a new claim that another pod reads; the
/// snapshot's copy goes when it is deleted.
#[test]
fn a_snapshot_restores_a_claim_written_under_its_fs_group() {
    let Some(setup) = Setup::new() else {
        return;
    };
    let config = &setup.config;
    let create = |yaml: &str| setup.create(yaml);
    let phase = |pod: &str| {
        let pod = get(config, &["pod", pod]).unwrap_or_default();
        pod["status"]["phase"].as_str().unwrap_or("").to_string()
    };
    let claim = |name: &str, source: &str| {
        format!("apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: {name}\nspec:\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 1Gi\n{source}")
    };
    create(&claim("source", ""));
    let writer = "runAsUser: 10001\n    runAsGroup: 10001\n    fsGroup: 10001";
    create(&pod_as(
        "writer",
        "source",
        "echo written > /data/file",
        writer,
    ));
    wait_for("the writer done", || phase("writer") == "Succeeded");

    create("apiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshot\nmetadata:\n  name: snap\nspec:\n  source:\n    persistentVolumeClaimName: source\n");
    wait_for("the snapshot ready", || {
        get(config, &["volumesnapshot", "snap"]).is_some_and(|s| s["status"]["readyToUse"] == true)
    });
    let from_snapshot = "  dataSource:\n    apiGroup: snapshot.storage.k8s.io\n    kind: VolumeSnapshot\n    name: snap\n";
    create(&claim("restored", from_snapshot));
    create(&pod("reader", "restored", "grep -qx written /data/file"));
    wait_for("the reader done", || {
        matches!(phase("reader").as_str(), "Succeeded" | "Failed")
    });
    assert_eq!(
        phase("reader"),
        "Succeeded",
        "{}",
        setup.cluster.log("reader")
    );

    let copy = setup.pods.join(".snapshots/ci/snap");
    assert!(copy.join("file").is_file());
    let out = kubectl(config, &["delete", "volumesnapshot", "snap"], None);
    assert!(out.status.success(), "{out:?}");
    wait_for("the snapshot's copy gone", || !copy.exists());
}
