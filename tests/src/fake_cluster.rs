//! The rest of a cluster behind [`FakeKube`]: a Job controller, a scheduler with one node of
//! fixed capacity, a namespace pod quota, and a kubelet stand-in that runs every pod bound to
//! its node for real. They read and write the fake API server's store as the real ones do the
//! API, so the dispatcher and `kubectl` see their work through lists and watches.
//!
//! Modelled on Kubernetes 1.33 as its documentation describes it (kubernetes.io "Jobs",
//! "Pod Lifecycle", "Resource Quotas", "Determine the Reason for Pod Failure"), with the Job
//! controller's words and names checked against kubernetes/kubernetes `pkg/controller/job/`:
//! `job_controller.go` (the `BackoffLimitExceeded`, `DeadlineExceeded` and `FailedIndexes`
//! conditions and their messages) and `indexed_job_utils.go` (`podGenerateNameWithIndex`, the
//! completion-index annotation and label, `JOB_COMPLETION_INDEX` from a field reference). Where
//! neither says, this says what it chose. Not modelled: the interim `FailureTarget` and
//! `SuccessCriteriaMet` conditions (1.31+) that precede `Failed` and `Complete` while pods are
//! still being stopped.
//!
//! - **Job controller** (`batch/v1`): keeps `min(parallelism, completions − succeeded)` pods
//!   active, each from the template with `generateName: <job>-`, the `batch.kubernetes.io/
//!   controller-uid` and `job-name` labels (and the legacy unprefixed pair) and a controller
//!   owner reference; a `SuccessfulCreate` Event per pod. Status `active`, `ready`,
//!   `succeeded`, `failed`, `startTime`. Complete when `succeeded ≥ completions`; Failed on a
//!   `podFailurePolicy` `FailJob` exit-code rule (reason `PodFailurePolicy`), on more failed pods
//!   than `backoffLimit` (`BackoffLimitExceeded`) or past `activeDeadlineSeconds`
//!   (`DeadlineExceeded`), its active pods then deleted. `completionMode: Indexed`: one pod per
//!   open index (`<job>-<i>-` names, the `job-completion-index` annotation and label,
//!   `JOB_COMPLETION_INDEX`); with `backoffLimitPerIndex`, an index fails alone (past that many
//!   failures, or on a `FailIndex` rule) while the others go on, and the Job ends when every
//!   index has: Failed (`FailedIndexes`) if any failed, with `completedIndexes` and
//!   `failedIndexes` (comma lists, not the API's ranges). `maxFailedIndexes`, the pod-failure
//!   backoff delay and `successPolicy` are not modelled. A finished Job is deleted
//!   `ttlSecondsAfterFinished` later, its pods with it. A pod the quota refuses is a
//!   `FailedCreate` Warning on the Job, `Error creating: pods "<name>" is forbidden: exceeded
//!   quota: ...` as the quota admission words it, at most once a second per Job (the controller
//!   backs off), counted as the event recorder aggregates.
//! - **Claims**: a new claim is bound to a volume, a directory: the one the test provisioned
//!   for it, else a new one, deleted with the claim. The pvc-protection controller lets a
//!   deleted claim go only once no scheduled pod object names it, whatever that pod's phase; the
//!   scheduler leaves a pod naming a missing, Terminating or unbound claim Pending and
//!   `Unschedulable` with the volume binding's message (`../shared/notes/dispatch-peers.md` §6).
//! - **Snapshots** (`snapshot.storage.k8s.io/v1`): a VolumeSnapshot of a bound claim copies its
//!   volume and becomes `readyToUse` (of an unbound one, `status.error` says so); a claim whose
//!   `dataSource` is a snapshot is bound, to a copy of it, once the snapshot is ready. No
//!   VolumeSnapshotContent or class objects.
//! - **Quota**: a `pods` limit on the namespace's pods that have not ended (a ResourceQuota's
//!   `count/pods` counts pods in a non-terminal phase). Not a served kind: set on the cluster.
//! - **Scheduler**: `nodes` nodes, `fake-node-1` to `fake-node-N`, each running at most
//!   `capacity` pods that have not ended. A pending pod is bound to the least loaded node with
//!   room; without one, its `PodScheduled` condition is `False`, reason `Unschedulable`, with the
//!   scheduler's message.
//! - **DaemonSet controller**: a pod of each DaemonSet on each node, created bound to it (the
//!   real controller leaves the binding to the scheduler, through node affinity); one that ended
//!   is replaced, where a real kubelet would restart its container (`restartPolicy: Always`).
//! - **Kubelet**: a bound pod runs as a real container: a new PID and mount namespace
//!   (`unshare`), a root made of the host's `/usr` and `/etc` read-only, the image's files (the
//!   Dockerfile's final stage: its `/usr/local/bin` binaries from this workspace's build, the
//!   stand-in as `buildkite-agent`, `image/buildkite-agent.cfg`, `image/install.sh`'s hook
//!   links, its `ENV`, `USER`, `WORKDIR` and `ENTRYPOINT`), its own `/tmp`, `/proc` and
//!   `/dev`, and each volume mount bound at its path: `emptyDir` a fresh directory owned by the
//!   `fsGroup`, `persistentVolumeClaim` its claim's volume (read-only when the mount or the volume
//!   says so; mounted read-write with an `fsGroup`, its files are given to that group, group
//!   writable, directories setgid, as the kubelet's `SetVolumeOwnership` does), `hostPath` that
//!   node's own directory for the path (created for
//!   `DirectoryOrCreate`), `configMap` its data as files, read-only. The entrypoint is PID 1, as the user the security context
//!   names; its env is the image's, then the container's (`value`, `secretKeyRef` from the
//!   store's Secrets, `fieldRef` `metadata.name`/`namespace`), and `HOSTNAME`. The pod goes
//!   `Running`, then `Succeeded` or `Failed` with the container's exit code and its termination
//!   message (the file at `terminationMessagePath`, else with `FallbackToLogsOnError` the log's
//!   tail). A deleted pod gets SIGTERM, SIGKILL after its grace period, and is then removed. A
//!   missing Secret leaves the pod Pending with `CreateContainerConfigError`, as the kubelet
//!   does. The test image's one addition to the real one: `BUILDKITE_STANDIN_STATE`, the
//!   stand-in agent's state directory, in `/tmp`.
//!
//! Needs root (mount namespaces) and util-linux's `unshare`; [`FakeCluster::unavailable`] says
//! why it cannot run.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::fake_kube::{kind_of, now_rfc3339, FakeKube, Key, Store, PVC_PROTECTION};
use crate::sandbox::bin;

/// What the cluster is made of; change it while it runs with [`FakeCluster::change`].
#[derive(Debug, Clone, Default)]
pub struct ClusterSpec {
    /// Nodes, `fake-node-1` to `fake-node-N` (0 counts as 1).
    pub nodes: usize,
    /// Pods each node can run at once.
    pub capacity: usize,
    /// The namespace's quota of pods that have not ended, if any.
    pub quota_pods: Option<usize>,
    /// Volumes provisioned beforehand: claim name → the directory that is its volume. Other
    /// claims get a new directory when bound, deleted with the claim.
    pub claims: BTreeMap<String, PathBuf>,
}

impl ClusterSpec {
    /// The nodes' names.
    pub fn node_names(&self) -> Vec<String> {
        (1..=self.nodes.max(1))
            .map(|i| format!("fake-node-{i}"))
            .collect()
    }

    /// The directory that is claim `name`'s volume in `namespace`.
    fn volume(&self, dir: &Path, namespace: &str, name: &str) -> PathBuf {
        match self.claims.get(name) {
            Some(given) => given.clone(),
            None => dir.join(".volumes").join(namespace).join(name),
        }
    }
}

struct Inner {
    kube: FakeKube,
    dir: PathBuf,
    spec: Mutex<ClusterSpec>,
    stop: AtomicBool,
}

pub struct FakeCluster {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

/// A running pod's container.
struct Container {
    key: Key,
    /// The pod as it was started.
    pod: Value,
    /// The `unshare` process; its child is the container's PID 1.
    child: Child,
    dir: PathBuf,
    started_at: String,
    fallback_to_logs: bool,
    /// When SIGTERM was sent, and the grace period.
    stopping: Option<(Instant, Duration)>,
}

impl FakeCluster {
    /// Why the kubelet cannot run here, if it cannot.
    pub fn unavailable() -> Option<String> {
        // The owner of /proc/self is the effective user.
        let root = std::fs::metadata("/proc/self")
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
        if !root {
            return Some("the kubelet stand-in needs root for mount namespaces".into());
        }
        let unshare = Command::new("unshare").arg("--version").output();
        if !unshare.is_ok_and(|o| o.status.success()) {
            return Some("util-linux's unshare is not installed".into());
        }
        None
    }

    /// Starts the controllers against `kube`; pods' files go under `dir`.
    pub fn start(kube: &FakeKube, dir: &Path, spec: ClusterSpec) -> FakeCluster {
        let inner = Arc::new(Inner {
            kube: kube.clone(),
            dir: dir.to_path_buf(),
            spec: Mutex::new(spec),
            stop: AtomicBool::new(false),
        });
        let running = inner.clone();
        let thread = std::thread::spawn(move || run(&running));
        FakeCluster {
            inner,
            thread: Some(thread),
        }
    }

    pub fn change(&self, change: impl FnOnce(&mut ClusterSpec)) {
        change(&mut self.inner.spec.lock().unwrap());
    }

    /// Node `node`'s directory for the host path `path`.
    pub fn host_path(&self, node: &str, path: &str) -> PathBuf {
        node_dir(&self.inner.dir, node, path)
    }

    /// What pod `name`'s container printed.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.inner.dir.join(name).join("log")).unwrap_or_default()
    }

    /// Processes of this cluster's containers still alive (their command lines name its
    /// directory).
    pub fn leftover_processes(&self) -> Vec<String> {
        let dir = self.inner.dir.display().to_string();
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&dir))
            .collect()
    }

    /// Every pod's log, to search for what must never be printed.
    pub fn all_logs(&self) -> String {
        std::fs::read_dir(&self.inner.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| std::fs::read_to_string(e.path().join("log")).unwrap_or_default())
            .collect()
    }
}

impl Drop for FakeCluster {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The controllers' loop; on stop, every container is killed.
fn run(inner: &Inner) {
    let mut containers: HashMap<String, Container> = HashMap::new();
    let mut backoff: HashMap<String, Instant> = HashMap::new();
    while !inner.stop.load(Ordering::SeqCst) {
        let spec = inner.spec.lock().unwrap().clone();
        let now = epoch_now();
        let (to_start, to_stop, to_remove) = inner.kube.with_store(|store| {
            job_controller(store, &spec, now, &mut backoff);
            snapshot_controller(store, &spec, &inner.dir);
            claims_controller(store, &spec, &inner.dir);
            scheduler(store, &spec);
            daemonset_controller(store, &spec);
            kubelet_plan(store, &spec, &containers)
        });
        for (key, pod, inputs) in to_start {
            let uid = pod["metadata"]["uid"].as_str().unwrap_or("").to_string();
            match inputs.and_then(|inputs| start_container(inner, &spec, &key, &pod, inputs)) {
                Ok(container) => {
                    let status = running_status(&pod, &container.started_at);
                    inner
                        .kube
                        .with_store(|store| set_status(store, &key, status));
                    containers.insert(uid, container);
                }
                Err(reason) => {
                    let status = waiting_status(&pod, &reason);
                    inner
                        .kube
                        .with_store(|store| set_status(store, &key, status));
                }
            }
        }
        for uid in to_stop {
            if let Some(c) = containers.get_mut(&uid) {
                stop_container(c, inner);
            }
        }
        for key in to_remove {
            inner.kube.with_store(|store| {
                store.remove(kind_of("pods").unwrap(), &key);
            });
        }
        let ended: Vec<String> = containers
            .iter_mut()
            .filter_map(|(uid, c)| {
                if let Some((sent, grace)) = c.stopping {
                    if sent.elapsed() >= grace {
                        kill_container(c);
                    }
                }
                c.child.try_wait().ok().flatten().map(|_| uid.clone())
            })
            .collect();
        for uid in ended {
            let mut c = containers.remove(&uid).unwrap();
            let code = exit_code(c.child.wait().unwrap());
            let status = ended_status(&c, code);
            inner.kube.with_store(|store| {
                let deleting = store
                    .objects
                    .get(&c.key)
                    .is_some_and(|p| !p["metadata"]["deletionTimestamp"].is_null());
                set_status(store, &c.key, status);
                if deleting {
                    store.remove(kind_of("pods").unwrap(), &c.key);
                }
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for c in containers.values_mut() {
        kill_container(c);
        let _ = c.child.wait();
    }
}

fn set_status(store: &mut Store, key: &Key, status: Value) {
    if let Some(mut pod) = store.objects.get(key).cloned() {
        if pod["status"] != status {
            pod["status"] = status;
            store.put(kind_of(key.0).unwrap(), pod);
        }
    }
}

fn owned_by<'s>(store: &'s Store, job: &Value) -> Vec<(&'s Key, &'s Value)> {
    let uid = &job["metadata"]["uid"];
    store
        .objects
        .iter()
        .filter(|((plural, ns, _), pod)| {
            *plural == "pods"
                && *ns == job["metadata"]["namespace"]
                && pod["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|r| r["uid"] == *uid))
        })
        .collect()
}

fn phase(pod: &Value) -> &str {
    pod["status"]["phase"].as_str().unwrap_or("Pending")
}

fn ended(pod: &Value) -> bool {
    matches!(phase(pod), "Succeeded" | "Failed")
}

fn finished_at(job: &Value) -> Option<u64> {
    job["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| (c["type"] == "Complete" || c["type"] == "Failed") && c["status"] == "True")
        .and_then(|c| epoch(c["lastTransitionTime"].as_str()?))
}

/// What a Job's pods say of it: the status counts, and what the controller is to do.
#[derive(Default)]
struct Progress {
    active: Vec<Key>,
    ready: usize,
    succeeded: usize,
    failed: usize,
    /// The Job failed: its condition's reason and message.
    failure: Option<(&'static str, String)>,
    complete: bool,
    /// Pods to create, each with its completion index in an Indexed Job.
    wanted: Vec<Option<u64>>,
    /// `completedIndexes` and `failedIndexes`, in an Indexed Job.
    indexes: Option<(String, String)>,
}

const INDEX: &str = "batch.kubernetes.io/job-completion-index";

/// A non-indexed Job: `completions` successes, any pod; at most `backoffLimit` failures in all,
/// and a `FailJob` rule fails it at once.
fn non_indexed(job: &Value, pods: &[(Key, Value)]) -> Progress {
    let s = &job["spec"];
    let parallelism = s["parallelism"].as_u64().unwrap_or(1) as usize;
    let completions = s["completions"].as_u64().unwrap_or(parallelism as u64) as usize;
    let mut p = counts(pods);
    let failed: Vec<&Value> = pods
        .iter()
        .map(|(_, p)| p)
        .filter(|p| phase(p) == "Failed")
        .collect();
    p.failure = failed
        .iter()
        .find_map(|pod| failure_rule(job, pod, "FailJob"))
        .map(|m| ("PodFailurePolicy", m))
        .or_else(|| {
            let limit = s["backoffLimit"].as_u64().unwrap_or(6) as usize;
            (p.failed > limit).then(|| {
                let message = "Job has reached the specified backoff limit";
                ("BackoffLimitExceeded", message.to_string())
            })
        });
    p.complete = p.succeeded >= completions;
    let want = parallelism.min(completions.saturating_sub(p.succeeded));
    p.wanted = vec![None; want.saturating_sub(p.active.len())];
    p
}

/// An Indexed Job: each index `0..completions` once; with `backoffLimitPerIndex`, an index
/// fails on its own (past that many failures, or on a `FailIndex` rule) and its siblings go on;
/// the Job ends when every index has, failed if any did (`FailedIndexes`).
fn indexed(job: &Value, pods: &[(Key, Value)]) -> Progress {
    let s = &job["spec"];
    let parallelism = s["parallelism"].as_u64().unwrap_or(1) as usize;
    let completions = s["completions"].as_u64().unwrap_or(1);
    let per_index = s["backoffLimitPerIndex"].as_u64();
    let mut p = counts(pods);
    let of = |i: u64| {
        let all = pods.iter().map(|(_, p)| p);
        all.filter(move |p| {
            let index = p["metadata"]["annotations"][INDEX].as_str();
            index.and_then(|n| n.parse::<u64>().ok()) == Some(i)
        })
    };
    let (mut done, mut failed_indexes, mut open) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..completions {
        let failures: Vec<&Value> = of(i).filter(|p| phase(p) == "Failed").collect();
        let index_failed = failures
            .iter()
            .any(|f| failure_rule(job, f, "FailIndex").is_some())
            || per_index.is_some_and(|limit| failures.len() as u64 > limit);
        if of(i).any(|p| phase(p) == "Succeeded") {
            done.push(i);
        } else if index_failed {
            failed_indexes.push(i);
        } else if !of(i).any(|p| !ended(p)) {
            open.push(i);
        }
    }
    p.failure = pods
        .iter()
        .find_map(|(_, pod)| failure_rule(job, pod, "FailJob"))
        .map(|m| ("PodFailurePolicy", m));
    let all_ended = done.len() + failed_indexes.len() == completions as usize;
    if all_ended && !failed_indexes.is_empty() && p.failure.is_none() {
        p.failure = Some(("FailedIndexes", "Job has failed indexes".into()));
    }
    p.complete = all_ended && failed_indexes.is_empty();
    let room = parallelism.saturating_sub(p.active.len());
    p.wanted = open.into_iter().take(room).map(Some).collect();
    let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    p.indexes = Some((list(&done), list(&failed_indexes)));
    p
}

/// The active, ready, succeeded and failed pods.
fn counts(pods: &[(Key, Value)]) -> Progress {
    let live = |p: &Value| !ended(p) && p["metadata"]["deletionTimestamp"].is_null();
    let active: Vec<&(Key, Value)> = pods.iter().filter(|(_, p)| live(p)).collect();
    let count = |what: &str| pods.iter().filter(|(_, p)| phase(p) == what).count();
    Progress {
        ready: active.iter().filter(|(_, p)| phase(p) == "Running").count(),
        active: active.into_iter().map(|(k, _)| k.clone()).collect(),
        succeeded: count("Succeeded"),
        failed: count("Failed"),
        ..Progress::default()
    }
}

/// One sync of every Job.
fn job_controller(
    store: &mut Store,
    spec: &ClusterSpec,
    now: u64,
    backoff: &mut HashMap<String, Instant>,
) {
    let jobs_kind = kind_of("jobs").unwrap();
    for (key, job) in store.all("jobs") {
        if let Some(at) = finished_at(&job) {
            let ttl = job["spec"]["ttlSecondsAfterFinished"].as_u64();
            if ttl.is_some_and(|ttl| now >= at + ttl) {
                store.delete(jobs_kind, &key, false);
            }
            continue;
        }
        if !job["metadata"]["deletionTimestamp"].is_null() {
            continue;
        }
        let pods: Vec<(Key, Value)> = owned_by(store, &job)
            .into_iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut progress = match job["spec"]["completionMode"] == "Indexed" {
            true => indexed(&job, &pods),
            false => non_indexed(&job, &pods),
        };
        let start_time = job["status"]["startTime"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(now_rfc3339);
        let deadline = job["spec"]["activeDeadlineSeconds"].as_u64();
        if deadline.is_some_and(|d| now >= epoch(&start_time).unwrap_or(now) + d) {
            let message = "Job was active longer than specified deadline";
            progress.failure = Some(("DeadlineExceeded", message.into()));
        }
        let mut status = json!({"startTime": start_time, "active": progress.active.len(),
            "ready": progress.ready, "succeeded": progress.succeeded, "failed": progress.failed,
            "conditions": job["status"]["conditions"].clone()});
        if let Some((done, failed)) = &progress.indexes {
            status["completedIndexes"] = json!(done);
            status["failedIndexes"] = json!(failed);
        }
        let condition = |kind: &str, reason: &str, message: &str| {
            json!([{"type": kind, "status": "True", "reason": reason, "message": message,
                "lastProbeTime": now_rfc3339(), "lastTransitionTime": now_rfc3339()}])
        };
        if let Some((reason, message)) = &progress.failure {
            status["conditions"] = condition("Failed", reason, message);
            for pod in &progress.active {
                store.delete(kind_of("pods").unwrap(), pod, false);
            }
            status["active"] = json!(0);
        } else if progress.complete {
            let message = "Reached expected number of succeeded pods";
            status["conditions"] = condition("Complete", "CompletionsReached", message);
            status["completionTime"] = json!(now_rfc3339());
        } else {
            for index in progress.wanted {
                let used = store
                    .objects
                    .iter()
                    .filter(|((p, ns, _), pod)| *p == "pods" && *ns == key.1 && !ended(pod))
                    .count();
                if let Some(limit) = spec.quota_pods.filter(|l| used >= *l) {
                    let uid = job["metadata"]["uid"].as_str().unwrap_or("").to_string();
                    let due = backoff
                        .get(&uid)
                        .is_none_or(|at| at.elapsed() >= Duration::from_secs(1));
                    if due {
                        backoff.insert(uid, Instant::now());
                        let message = format!(
                            "Error creating: pods \"{}-{}\" is forbidden: exceeded quota: agent-pods, requested: pods=1, used: pods={used}, limited: pods={limit}",
                            key.2,
                            crate::fake_kube::random_suffix(used as u64)
                        );
                        job_event(store, &job, "Warning", "FailedCreate", &message);
                    }
                    break;
                }
                let created = create_pod(store, &job, index);
                let message = format!("Created pod: {created}");
                job_event(store, &job, "Normal", "SuccessfulCreate", &message);
                status["active"] = json!(status["active"].as_u64().unwrap_or(0) + 1);
            }
        }
        if job["status"] != status {
            let mut next = job.clone();
            next["status"] = status;
            store.put(jobs_kind, next);
        }
    }
}

/// The message of a `podFailurePolicy` rule with `action` that `pod`'s exit code matches.
fn failure_rule(job: &Value, pod: &Value, action: &str) -> Option<String> {
    let code = pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"].as_i64()?;
    let rules = job["spec"]["podFailurePolicy"]["rules"].as_array()?;
    rules.iter().enumerate().find_map(|(i, rule)| {
        let on = &rule["onExitCodes"];
        let listed = on["values"]
            .as_array()?
            .iter()
            .any(|v| v.as_i64() == Some(code));
        let hit = match on["operator"].as_str()? {
            "In" => listed,
            _ => !listed,
        };
        (rule["action"] == action && hit).then(|| {
            format!(
                "Container {} for pod {}/{} failed with exit code {code} matching {action} rule at index {i}",
                on["containerName"].as_str().unwrap_or("agent"),
                pod["metadata"]["namespace"].as_str().unwrap_or(""),
                pod["metadata"]["name"].as_str().unwrap_or("")
            )
        })
    })
}

/// A pod from the Job's template; in an Indexed Job, with its index as the annotation, label and
/// `JOB_COMPLETION_INDEX` the controller sets, and in its name.
fn create_pod(store: &mut Store, job: &Value, index: Option<u64>) -> String {
    let meta = &job["metadata"];
    let template = &job["spec"]["template"];
    let mut labels = template["metadata"]["labels"].clone();
    if !labels.is_object() {
        labels = json!({});
    }
    for (k, v) in [
        ("batch.kubernetes.io/controller-uid", &meta["uid"]),
        ("batch.kubernetes.io/job-name", &meta["name"]),
        ("controller-uid", &meta["uid"]),
        ("job-name", &meta["name"]),
    ] {
        labels[k] = v.clone();
    }
    let mut annotations = template["metadata"]["annotations"].clone();
    let mut spec = template["spec"].clone();
    let mut prefix = format!("{}-", meta["name"].as_str().unwrap_or("job"));
    if let Some(i) = index {
        if !annotations.is_object() {
            annotations = json!({});
        }
        annotations[INDEX] = json!(i.to_string());
        labels[INDEX] = json!(i.to_string());
        prefix += &format!("{i}-");
        for container in spec["containers"].as_array_mut().into_iter().flatten() {
            if !container["env"].is_array() {
                container["env"] = json!([]);
            }
            let env = container["env"].as_array_mut().unwrap();
            env.push(
                json!({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
                "fieldPath": format!("metadata.annotations['{INDEX}']")}}}),
            );
        }
    }
    let pod = json!({
        "metadata": {"generateName": prefix, "labels": labels, "annotations": annotations,
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                "uid": meta["uid"], "controller": true, "blockOwnerDeletion": true}]},
        "spec": spec,
    });
    let namespace = meta["namespace"].as_str().unwrap_or("default").to_string();
    let created = store
        .create(kind_of("pods").unwrap(), &namespace, pod)
        .expect("a generated name");
    created["metadata"]["name"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// A Normal or Warning Event on a Job, aggregated with the last of the same reason.
fn job_event(store: &mut Store, job: &Value, kind: &str, reason: &str, message: &str) {
    let meta = &job["metadata"];
    let namespace = meta["namespace"].as_str().unwrap_or("default").to_string();
    let events = kind_of("events").unwrap();
    let same = store
        .objects
        .iter()
        .find(|((p, _, _), e)| {
            *p == "events"
                && e["involvedObject"]["uid"] == meta["uid"]
                && e["reason"] == reason
                && reason == "FailedCreate"
        })
        .map(|(_, e)| e.clone());
    if let Some(mut event) = same {
        event["count"] = json!(event["count"].as_u64().unwrap_or(1) + 1);
        event["message"] = json!(message);
        event["lastTimestamp"] = json!(now_rfc3339());
        store.put(events, event);
        return;
    }
    let event = json!({
        "metadata": {"generateName": format!("{}.", meta["name"].as_str().unwrap_or("job"))},
        "involvedObject": {"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
            "namespace": namespace, "uid": meta["uid"]},
        "reason": reason, "message": message, "type": kind, "count": 1,
        "source": {"component": "job-controller"},
        "firstTimestamp": now_rfc3339(), "lastTimestamp": now_rfc3339(),
    });
    let _ = store.create(events, &namespace, event);
}

/// One pod of each DaemonSet on each node, created bound to it; a pod that ended is replaced
/// (where a real kubelet would restart its container: `restartPolicy: Always`).
fn daemonset_controller(store: &mut Store, spec: &ClusterSpec) {
    for (key, set) in store.all("daemonsets") {
        if !set["metadata"]["deletionTimestamp"].is_null() {
            continue;
        }
        let own = owned_by(store, &set);
        let live = |node: &str| {
            own.iter().any(|(_, p)| {
                p["spec"]["nodeName"] == node
                    && !ended(p)
                    && p["metadata"]["deletionTimestamp"].is_null()
            })
        };
        let missing: Vec<String> = spec.node_names().into_iter().filter(|n| !live(n)).collect();
        let template = &set["spec"]["template"];
        for node in missing {
            let mut pod_spec = template["spec"].clone();
            pod_spec["nodeName"] = json!(node);
            let pod = json!({
                "metadata": {"generateName": format!("{}-", key.2),
                    "labels": template["metadata"]["labels"],
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                        "name": key.2, "uid": set["metadata"]["uid"], "controller": true,
                        "blockOwnerDeletion": true}]},
                "spec": pod_spec,
            });
            let _ = store.create(kind_of("pods").unwrap(), &key.1, pod);
        }
    }
}

/// The claims `pod` names.
fn claims_of(pod: &Value) -> Vec<&str> {
    let volumes = pod["spec"]["volumes"].as_array().into_iter().flatten();
    volumes
        .filter_map(|v| v["persistentVolumeClaim"]["claimName"].as_str())
        .collect()
}

/// Why the scheduler's volume binding refuses `pod`: a claim that is missing, being deleted or
/// not bound yet.
fn claim_problem(store: &Store, namespace: &str, pod: &Value) -> Option<String> {
    claims_of(pod).into_iter().find_map(|name| {
        let key = (
            "persistentvolumeclaims",
            namespace.to_string(),
            name.to_string(),
        );
        match store.objects.get(&key) {
            None => Some(format!("persistentvolumeclaim \"{name}\" not found")),
            Some(c) if !c["metadata"]["deletionTimestamp"].is_null() => {
                Some(format!("persistentvolumeclaim \"{name}\" is being deleted"))
            }
            Some(c) if c["status"]["phase"] != "Bound" => {
                Some("pod has unbound immediate PersistentVolumeClaims".to_string())
            }
            Some(_) => None,
        }
    })
}

/// The volume binder and the pvc-protection controller: a pending claim is bound to its
/// volume; a deleted one keeps its finalizer while any scheduled pod object names it, whatever
/// that pod's phase (`pvc_protection_controller.go` `podUsesPVC`), then goes, with its volume
/// if it was provisioned for it.
fn claims_controller(store: &mut Store, spec: &ClusterSpec, dir: &Path) {
    let kind = kind_of("persistentvolumeclaims").unwrap();
    for (key, claim) in store.all("persistentvolumeclaims") {
        let volume = spec.volume(dir, &key.1, &key.2);
        if claim["metadata"]["deletionTimestamp"].is_null() {
            if claim["status"]["phase"] == "Pending" && provision(store, dir, &key, &claim, &volume)
            {
                let mut bound = claim.clone();
                bound["spec"]["volumeName"] = json!(format!(
                    "pvc-{}",
                    claim["metadata"]["uid"].as_str().unwrap_or("")
                ));
                bound["status"] = json!({"phase": "Bound", "accessModes": claim["spec"]["accessModes"],
                    "capacity": {"storage": claim["spec"]["resources"]["requests"]["storage"]}});
                store.put(kind, bound);
            }
            continue;
        }
        let in_use = store.objects.iter().any(|((p, ns, _), pod)| {
            *p == "pods"
                && *ns == key.1
                && pod["spec"]["nodeName"].is_string()
                && claims_of(pod).contains(&key.2.as_str())
        });
        if in_use {
            continue;
        }
        let mut released = claim.clone();
        let finalizers = claim["metadata"]["finalizers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let rest: Vec<Value> = finalizers
            .into_iter()
            .filter(|f| f != PVC_PROTECTION)
            .collect();
        if rest.is_empty() {
            store.remove(kind, &key);
            if !spec.claims.contains_key(&key.2) {
                let _ = std::fs::remove_dir_all(&volume);
            }
        } else {
            released["metadata"]["finalizers"] = json!(rest);
            store.put(kind, released);
        }
    }
}

/// A pending claim's volume: a new directory, holding a copy of the snapshot its `dataSource`
/// names once that snapshot is ready to use (until then the claim stays Pending, as the
/// provisioner waits). Whether the volume is there.
fn provision(store: &Store, dir: &Path, key: &Key, claim: &Value, volume: &Path) -> bool {
    let source = &claim["spec"]["dataSource"];
    if source["kind"] != "VolumeSnapshot" {
        return std::fs::create_dir_all(volume).is_ok();
    }
    let name = source["name"].as_str().unwrap_or("");
    let snapshot = ("volumesnapshots", key.1.clone(), name.to_string());
    let ready = store.objects.get(&snapshot);
    if !ready.is_some_and(|s| s["status"]["readyToUse"] == true) {
        return false;
    }
    let content = snapshot_dir(dir, &key.1, name);
    std::fs::create_dir_all(volume).is_ok() && copy_tree(&content, volume)
}

/// Where snapshot `name`'s content is kept.
fn snapshot_dir(dir: &Path, namespace: &str, name: &str) -> PathBuf {
    dir.join(".snapshots").join(namespace).join(name)
}

/// `cp -a from/. to/`: files, links and modes as they are.
fn copy_tree(from: &Path, to: &Path) -> bool {
    let status = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(format!("{}/", to.display()))
        .status();
    status.is_ok_and(|s| s.success())
}

/// The snapshot controller: a new VolumeSnapshot of a bound claim copies the claim's volume and
/// is then `readyToUse`; of a claim missing or not bound, it says so in `status.error`. A
/// deleted snapshot's copy goes with it.
fn snapshot_controller(store: &mut Store, spec: &ClusterSpec, dir: &Path) {
    let kind = kind_of("volumesnapshots").unwrap();
    let snapshots = store.all("volumesnapshots");
    for (key, snapshot) in &snapshots {
        if !snapshot["status"]["readyToUse"].is_null() {
            continue;
        }
        let claim_name = snapshot["spec"]["source"]["persistentVolumeClaimName"].as_str();
        let claim_name = claim_name.unwrap_or("");
        let claim_key = (
            "persistentvolumeclaims",
            key.1.clone(),
            claim_name.to_string(),
        );
        let bound = store
            .objects
            .get(&claim_key)
            .is_some_and(|c| c["status"]["phase"] == "Bound");
        let mut next = snapshot.clone();
        if !bound {
            let message = format!("persistentvolumeclaim \"{claim_name}\" is not bound");
            next["status"] =
                json!({"readyToUse": false, "error": {"message": message, "time": now_rfc3339()}});
        } else {
            let content = snapshot_dir(dir, &key.1, &key.2);
            let source = spec.volume(dir, &key.1, claim_name);
            let copied = std::fs::create_dir_all(&content).is_ok() && copy_tree(&source, &content);
            let size = store.objects[&claim_key]["status"]["capacity"]["storage"].clone();
            next["status"] = json!({"readyToUse": copied, "creationTime": now_rfc3339(),
                "restoreSize": size, "boundVolumeSnapshotContentName": format!("snapcontent-{}", snapshot["metadata"]["uid"].as_str().unwrap_or(""))});
        }
        if next != *snapshot {
            store.put(kind, next);
        }
    }
    // Copies whose snapshot is gone.
    for namespace in std::fs::read_dir(dir.join(".snapshots"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for copy in std::fs::read_dir(namespace.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let ns = namespace.file_name().to_string_lossy().into_owned();
            let name = copy.file_name().to_string_lossy().into_owned();
            if !store.objects.contains_key(&("volumesnapshots", ns, name)) {
                let _ = std::fs::remove_dir_all(copy.path());
            }
        }
    }
}

/// Binds pending pods to the node while it has room; marks the rest Unschedulable.
fn scheduler(store: &mut Store, spec: &ClusterSpec) {
    let pods: Vec<(Key, Value)> = store.all("pods");
    let nodes = spec.node_names();
    let mut bound: Vec<usize> = nodes
        .iter()
        .map(|n| {
            let on = pods
                .iter()
                .filter(|(_, p)| p["spec"]["nodeName"] == n.as_str());
            on.filter(|(_, p)| !ended(p)).count()
        })
        .collect();
    let n = nodes.len();
    let mut waiting: Vec<&(Key, Value)> = pods
        .iter()
        .filter(|(_, p)| {
            !p["spec"]["nodeName"].is_string()
                && !ended(p)
                && p["metadata"]["deletionTimestamp"].is_null()
        })
        .collect();
    // Oldest first: uids are handed out in order.
    waiting.sort_by_key(|(_, p)| p["metadata"]["uid"].as_str().unwrap_or("").to_string());
    for (key, pod) in waiting {
        let mut next = pod.clone();
        if let Some(why) = claim_problem(store, &key.1, pod) {
            next["status"] = json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
                "status": "False", "reason": "Unschedulable",
                "message": format!("0/{n} nodes are available: {why}. preemption: 0/{n} nodes are available: {n} Preemption is not helpful for scheduling."),
                "lastTransitionTime": now_rfc3339()}]});
        } else if let Some(i) = (0..n)
            .filter(|i| bound[*i] < spec.capacity)
            .min_by_key(|i| bound[*i])
        {
            // The least loaded node with room, as the default scheduler's spreading prefers.
            bound[i] += 1;
            next["spec"]["nodeName"] = json!(nodes[i]);
            next["status"] = json!({"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now_rfc3339()}]});
        } else {
            next["status"] = json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
                "status": "False", "reason": "Unschedulable",
                "message": format!("0/{n} nodes are available: {n} Insufficient cpu. preemption: 0/{n} nodes are available: {n} No preemption victims found for incoming pod."),
                "lastTransitionTime": now_rfc3339()}]});
        }
        if next != *pod {
            store.put(kind_of("pods").unwrap(), next);
        }
    }
}

/// A pod to start: its env and the data of the ConfigMaps it mounts, read from the store (or
/// why they cannot be).
type Start = (Key, Value, Result<Inputs, String>);

/// What a container is given from the API: its environment, and ConfigMap name → `data`.
struct Inputs {
    env: Vec<(String, String)>,
    config_maps: BTreeMap<String, Value>,
}

/// The kubelet's view: bound pods to start (with their env resolved, or why not), running pods
/// being deleted, and deleted pods with nothing running to remove.
fn kubelet_plan(
    store: &Store,
    spec: &ClusterSpec,
    containers: &HashMap<String, Container>,
) -> (Vec<Start>, Vec<String>, Vec<Key>) {
    let (mut start, mut stop, mut remove) = (Vec::new(), Vec::new(), Vec::new());
    let nodes = spec.node_names();
    for (key, pod) in store.objects.iter().filter(|(k, _)| k.0 == "pods") {
        let node = pod["spec"]["nodeName"].as_str().unwrap_or("");
        if !nodes.iter().any(|n| n == node) {
            continue;
        }
        let uid = pod["metadata"]["uid"].as_str().unwrap_or("").to_string();
        let deleting = !pod["metadata"]["deletionTimestamp"].is_null();
        match (containers.contains_key(&uid), deleting) {
            (true, true) => stop.push(uid),
            (false, true) => remove.push(key.clone()),
            (false, false) if phase(pod) == "Pending" => {
                let inputs = container_env(store, pod).map(|env| Inputs {
                    env,
                    config_maps: config_maps(store, pod),
                });
                start.push((key.clone(), pod.clone(), inputs));
            }
            _ => {}
        }
    }
    (start, stop, remove)
}

/// The image's env, then the container's, then `HOSTNAME`.
fn container_env(store: &Store, pod: &Value) -> Result<Vec<(String, String)>, String> {
    let image = image();
    let mut env: Vec<(String, String)> = image.env.clone();
    let namespace = pod["metadata"]["namespace"].as_str().unwrap_or("");
    for var in pod["spec"]["containers"][0]["env"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = var["name"].as_str().unwrap_or("").to_string();
        let value = if let Some(v) = var["value"].as_str() {
            v.to_string()
        } else if let Some(r) = var["valueFrom"]["secretKeyRef"].as_object() {
            let secret = r["name"].as_str().unwrap_or("");
            let key = r["key"].as_str().unwrap_or("");
            let data = store
                .objects
                .get(&("secrets", namespace.to_string(), secret.to_string()))
                .and_then(|s| {
                    s["stringData"][key]
                        .as_str()
                        .map(String::from)
                        .or_else(|| s["data"][key].as_str().and_then(base64_decode))
                });
            data.ok_or_else(|| format!("secret \"{secret}\" not found"))?
        } else if let Some(path) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            let field = path.strip_prefix("metadata.").unwrap_or(path);
            let annotation = field
                .strip_prefix("annotations['")
                .and_then(|a| a.strip_suffix("']"));
            let value = match annotation {
                Some(name) => &pod["metadata"]["annotations"][name],
                None => &pod["metadata"][field],
            };
            value.as_str().unwrap_or("").to_string()
        } else {
            String::new()
        };
        env.retain(|(n, _)| *n != name);
        env.push((name, value));
    }
    env.push((
        "HOSTNAME".into(),
        pod["metadata"]["name"].as_str().unwrap_or("").into(),
    ));
    Ok(env)
}

fn base64_decode(text: &str) -> Option<String> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// The final stage of the project's Dockerfile, as the kubelet needs it.
struct Image {
    env: Vec<(String, String)>,
    user: (u32, u32),
    workdir: String,
    entrypoint: Vec<String>,
}

fn image() -> Image {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("the Dockerfile");
    // Continuation lines joined; only the last stage counts.
    let joined = dockerfile.replace("\\\n", " ");
    let last_stage = joined.rsplit("\nFROM ").next().unwrap_or("");
    let mut image = Image {
        // The base image's PATH (buildkite/agent's, Docker's default).
        env: vec![(
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        )],
        user: (0, 0),
        workdir: "/".into(),
        entrypoint: Vec::new(),
    };
    for line in last_stage.lines() {
        let (instruction, rest) = line.trim().split_once(' ').unwrap_or(("", ""));
        match instruction {
            "ENV" => {
                for pair in rest.split_whitespace() {
                    if let Some((k, v)) = pair.split_once('=') {
                        image.env.push((k.into(), v.into()));
                    }
                }
            }
            "USER" => {
                let (u, g) = rest
                    .trim()
                    .split_once(':')
                    .unwrap_or((rest.trim(), rest.trim()));
                image.user = (u.parse().unwrap_or(0), g.parse().unwrap_or(0));
            }
            "WORKDIR" => image.workdir = rest.trim().into(),
            "ENTRYPOINT" => image.entrypoint = serde_json::from_str(rest).unwrap_or_default(),
            _ => {}
        }
    }
    image.env.push((
        "BUILDKITE_STANDIN_STATE".into(),
        "/tmp/buildkite-agent-standin".into(),
    ));
    image
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The binaries the image has in `/usr/local/bin` (the Dockerfile's builder stage output and the
/// base image's agent), from this build.
const IMAGE_BINARIES: [&str; 6] = [
    "agent-wrapper",
    "checkout-hook",
    "job-hook",
    "job-dispatcher",
    "populate-mirror",
    "buildkite-agent",
];

/// Builds the pod's root and starts its container.
fn start_container(
    inner: &Inner,
    spec: &ClusterSpec,
    key: &Key,
    pod: &Value,
    inputs: Inputs,
) -> Result<Container, String> {
    let name = pod["metadata"]["name"].as_str().unwrap_or("pod");
    let image = image();
    let pod_spec = &pod["spec"];
    let container = &pod_spec["containers"][0];
    let security = |field: &str| {
        let own = container["securityContext"][field].as_u64();
        own.or_else(|| pod_spec["securityContext"][field].as_u64())
            .map(|v| v as u32)
    };
    let uid = security("runAsUser").unwrap_or(image.user.0);
    let gid = security("runAsGroup").unwrap_or(image.user.1);
    let fs_group = pod_spec["securityContext"]["fsGroup"]
        .as_u64()
        .map(|g| g as u32);
    let mut root = Root::new(inner.dir.join(name))?;
    root.host()?;
    root.image(&image)?;
    let termination = container["terminationMessagePath"].as_str();
    root.system(termination.unwrap_or("/dev/termination-log"))?;
    let sources = Sources {
        spec,
        cluster: &inner.dir,
        config_maps: &inputs.config_maps,
    };
    root.volumes(pod, &sources, fs_group)?;
    let strings = |v: &Value| -> Vec<String> {
        let items = v.as_array().into_iter().flatten();
        items.filter_map(|a| a.as_str().map(String::from)).collect()
    };
    let mut command = match container["command"].is_array() {
        true => strings(&container["command"]),
        false => image.entrypoint.clone(),
    };
    command.extend(strings(&container["args"]));
    let workdir = container["workingDir"].as_str().unwrap_or(&image.workdir);
    let log = std::fs::File::create(root.dir.join("log")).map_err(io)?;
    // PID 1 is the entrypoint: `sh` execs chroot, which execs the command in the working dir.
    let script = format!(
        "set -e\nR='{}'\n{}exec chroot --userspec={uid}:{gid} --groups={} \"$R\" /bin/sh -c 'cd \"$0\" && exec \"$@\"' '{workdir}' \"$@\"\n",
        root.path.display(),
        root.script,
        fs_group.unwrap_or(gid)
    );
    let child = Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child", "--mount"])
        .args(["--propagation", "private", "sh", "-c", &script, "pod"])
        .args(&command)
        .env_clear()
        .envs(inputs.env)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io)?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting the container: {e}"))?;
    Ok(Container {
        key: key.clone(),
        pod: pod.clone(),
        child,
        dir: root.dir,
        started_at: now_rfc3339(),
        fallback_to_logs: container["terminationMessagePolicy"] == "FallbackToLogsOnError",
        stopping: None,
    })
}

fn io(e: std::io::Error) -> String {
    format!("preparing the pod's root: {e}")
}

/// Where a pod's volumes come from.
struct Sources<'a> {
    spec: &'a ClusterSpec,
    /// The kubelet's directory: provisioned volumes, nodes' host paths.
    cluster: &'a Path,
    config_maps: &'a BTreeMap<String, Value>,
}

/// The host path `path` of node `node`: a directory of its own under the cluster's.
fn node_dir(cluster: &Path, node: &str, path: &str) -> PathBuf {
    cluster
        .join(".nodes")
        .join(node)
        .join(path.trim_start_matches('/'))
}

/// The `data` of every ConfigMap `pod` mounts that exists.
fn config_maps(store: &Store, pod: &Value) -> BTreeMap<String, Value> {
    let namespace = pod["metadata"]["namespace"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let volumes = pod["spec"]["volumes"].as_array().into_iter().flatten();
    let names = volumes.filter_map(|v| v["configMap"]["name"].as_str());
    names
        .filter_map(|name| {
            let key = ("configmaps", namespace.clone(), name.to_string());
            let data = store.objects.get(&key)?["data"].clone();
            Some((name.to_string(), data))
        })
        .collect()
}

/// A pod's root directory, and the script of mounts that completes it inside the container's
/// mount namespace (where `$R` is the root).
struct Root {
    /// The pod's directory: the root, its log, its volumes.
    dir: PathBuf,
    path: PathBuf,
    script: String,
}

impl Root {
    fn new(dir: PathBuf) -> Result<Root, String> {
        let path = dir.join("root");
        std::fs::create_dir_all(&path).map_err(io)?;
        Ok(Root {
            dir,
            path,
            script: String::new(),
        })
    }

    /// `from` mounted at `to` inside.
    fn bind(&mut self, from: &Path, to: &str, read_only: bool) -> Result<(), String> {
        let inside = self.path.join(to.trim_start_matches('/'));
        if from.is_dir() {
            std::fs::create_dir_all(&inside).map_err(io)?;
        } else if !inside.exists() {
            std::fs::create_dir_all(inside.parent().unwrap()).map_err(io)?;
            std::fs::write(&inside, "").map_err(io)?;
        }
        // The mount point may lie in a directory bound from the host (`/etc`), where only the
        // namespace's own copy can hold it.
        self.script += &match from.is_dir() {
            true => format!("mkdir -p \"$R{to}\"\n"),
            false => format!("[ -e \"$R{to}\" ] || touch \"$R{to}\"\n"),
        };
        self.script += &format!("mount --rbind '{}' \"$R{to}\"\n", from.display());
        if read_only {
            self.script += &format!("mount -o remount,bind,ro \"$R{to}\"\n");
        }
        Ok(())
    }

    /// The host's programs and libraries, read-only (symlinks, as merged-/usr systems have,
    /// copied as they are), and a copy of its `/etc` on a tmpfs of the container's own, where
    /// volumes can be mounted as in an image's writable layer.
    fn host(&mut self) -> Result<(), String> {
        std::fs::create_dir_all(self.path.join("etc")).map_err(io)?;
        self.script += "mount -t tmpfs tmpfs \"$R/etc\"\ncp -a /etc/. \"$R/etc/\"\n";
        for d in ["usr", "bin", "lib", "lib64", "sbin"] {
            let host = Path::new("/").join(d);
            match std::fs::symlink_metadata(&host) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(&host).map_err(io)?;
                    let _ = std::os::unix::fs::symlink(target, self.path.join(d));
                }
                Ok(_) => self.bind(&host, &format!("/{d}"), true)?,
                Err(_) => {}
            }
        }
        Ok(())
    }

    /// The image's own files: its binaries over `/usr/local/bin`, and what `image/install.sh`
    /// and the Dockerfile put in `/buildkite`.
    fn image(&mut self, image: &Image) -> Result<(), String> {
        let local_bin = self.dir.join("image-bin");
        std::fs::create_dir_all(&local_bin).map_err(io)?;
        self.bind(&local_bin, "/usr/local/bin", false)?;
        for binary in IMAGE_BINARIES {
            std::fs::write(local_bin.join(binary), "").map_err(io)?;
            self.bind(&bin(binary), &format!("/usr/local/bin/{binary}"), true)?;
        }
        let buildkite = self.path.join("buildkite");
        for d in ["hooks", "plugins", "builds"] {
            std::fs::create_dir_all(buildkite.join(d)).map_err(io)?;
        }
        let config = repo().join("image/buildkite-agent.cfg");
        std::fs::copy(config, buildkite.join("buildkite-agent.cfg")).map_err(io)?;
        for (hook, target) in [
            ("checkout", "checkout-hook"),
            ("environment", "job-hook"),
            ("pre-exit", "job-hook"),
        ] {
            let link = buildkite.join("hooks").join(hook);
            let _ = std::os::unix::fs::symlink(format!("/usr/local/bin/{target}"), link);
        }
        for d in ["builds", "plugins"] {
            chown(&buildkite.join(d), image.user.0, image.user.1)?;
        }
        Ok(())
    }

    /// `/proc` of the new PID namespace, a `/tmp` of its own, the usual devices, and the
    /// termination message file, writable by any user as the kubelet makes it.
    fn system(&mut self, termination: &str) -> Result<(), String> {
        for d in ["proc", "tmp", "dev"] {
            std::fs::create_dir_all(self.path.join(d)).map_err(io)?;
        }
        set_mode(&self.path.join("tmp"), 0o1777)?;
        self.script += "mount -t proc proc \"$R/proc\"\n";
        for device in ["null", "zero", "random", "urandom", "full", "tty"] {
            let host = Path::new("/dev").join(device);
            self.bind(&host, &format!("/dev/{device}"), false)?;
        }
        let file = self.path.join(termination.trim_start_matches('/'));
        std::fs::write(&file, "").map_err(io)?;
        set_mode(&file, 0o666)
    }

    /// Each volume mount at its path: an `emptyDir` a new directory the `fsGroup` may write, a
    /// claim the directory the test gave for it, read-only when the mount or the volume says so.
    fn volumes(
        &mut self,
        pod: &Value,
        sources: &Sources,
        fs_group: Option<u32>,
    ) -> Result<(), String> {
        let (spec, cluster) = (sources.spec, sources.cluster);
        let volumes = pod["spec"]["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mounts = pod["spec"]["containers"][0]["volumeMounts"].as_array();
        for mount in mounts.into_iter().flatten() {
            let path = mount["mountPath"].as_str().unwrap_or("/");
            let volume = volumes
                .iter()
                .find(|v| v["name"] == mount["name"])
                .ok_or_else(|| format!("volume {} is not defined", mount["name"]))?;
            let claim = &volume["persistentVolumeClaim"];
            let mut read_only = mount["readOnly"] == true || claim["readOnly"] == true;
            let source = if volume["emptyDir"].is_object() {
                let name = volume["name"].as_str().unwrap_or("volume");
                let dir = self.dir.join("volumes").join(name);
                std::fs::create_dir_all(&dir).map_err(io)?;
                if let Some(group) = fs_group {
                    chown(&dir, 0, group)?;
                    set_mode(&dir, 0o2777)?;
                }
                dir
            } else if let Some(name) = claim["claimName"].as_str() {
                let namespace = pod["metadata"]["namespace"].as_str().unwrap_or("");
                let volume = spec.volume(cluster, namespace, name);
                if let Some(group) = fs_group.filter(|_| !read_only) {
                    own_for_group(&volume, group)?;
                }
                volume
            } else if let Some(host) = volume["hostPath"].as_object() {
                let node = pod["spec"]["nodeName"].as_str().unwrap_or("");
                let path = host["path"].as_str().unwrap_or("/");
                let dir = node_dir(cluster, node, path);
                match host.get("type").and_then(Value::as_str) {
                    Some("DirectoryOrCreate") => std::fs::create_dir_all(&dir).map_err(io)?,
                    _ if dir.is_dir() => {}
                    _ => {
                        return Err(format!(
                            "hostPath type check failed: {path} is not a directory"
                        ))
                    }
                }
                dir
            } else if let Some(name) = volume["configMap"]["name"].as_str() {
                let data = sources.config_maps.get(name);
                let data = data.ok_or_else(|| format!("configmap \"{name}\" not found"))?;
                let dir = self
                    .dir
                    .join("volumes")
                    .join(volume["name"].as_str().unwrap_or("v"));
                std::fs::create_dir_all(&dir).map_err(io)?;
                for (key, value) in data.as_object().into_iter().flatten() {
                    let text = value.as_str().unwrap_or("");
                    std::fs::write(dir.join(key), text).map_err(io)?;
                }
                read_only = true;
                dir
            } else {
                let name = &mount["name"];
                return Err(format!("volume {name} is of a kind not modelled"));
            };
            self.bind(&source, path, read_only)?;
        }
        Ok(())
    }
}

/// The kubelet's volume ownership for `fsGroup` (`SetVolumeOwnership`): every file's group the
/// `fsGroup`, readable and writable by it, directories setgid so that new files keep it.
fn own_for_group(volume: &Path, group: u32) -> Result<(), String> {
    let run = |program: &str, args: &[&str]| {
        let status = Command::new(program).args(args).arg(volume).status();
        match status {
            Ok(s) if s.success() => Ok(()),
            _ => Err(format!("applying fsGroup {group} to {}", volume.display())),
        }
    };
    run("chgrp", &["-R", &group.to_string()])?;
    run("chmod", &["-R", "g+rwX"])?;
    let dirs = Command::new("find")
        .arg(volume)
        .args(["-type", "d", "-exec", "chmod", "g+s", "{}", "+"])
        .status();
    match dirs {
        Ok(s) if s.success() => Ok(()),
        _ => Err(format!("applying fsGroup {group} to {}", volume.display())),
    }
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), String> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| format!("chown {}: {e}", path.display()))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
}

/// The container's PID 1, the `unshare` process's child, as the host sees it: from the kernel's
/// list of its children, or where that is not built in, the process whose parent it is.
fn init_pid(c: &Container) -> Option<nix::unistd::Pid> {
    let pid = c.child.id();
    let listed = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok();
    let child = match listed {
        Some(children) => children.split_whitespace().next()?.parse().ok()?,
        None => std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid …`: the command may hold spaces and parentheses.
            let ppid: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == pid).then(|| e.file_name().to_str()?.parse().ok())?
        })?,
    };
    Some(nix::unistd::Pid::from_raw(child))
}

fn stop_container(c: &mut Container, inner: &Inner) {
    if c.stopping.is_some() {
        return;
    }
    let grace = inner
        .kube
        .with_store(|store| {
            store
                .objects
                .get(&c.key)
                .and_then(|p| p["metadata"]["deletionGracePeriodSeconds"].as_u64())
        })
        .unwrap_or(30);
    if let Some(pid) = init_pid(c) {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }
    c.stopping = Some((Instant::now(), Duration::from_secs(grace)));
}

/// SIGKILL to PID 1 ends the whole PID namespace.
fn kill_container(c: &mut Container) {
    if let Some(pid) = init_pid(c) {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
    let _ = c.child.kill();
}

fn exit_code(status: std::process::ExitStatus) -> i64 {
    use std::os::unix::process::ExitStatusExt;
    i64::from(
        status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
    )
}

fn container_status(pod: &Value, state: Value, ready: bool) -> Value {
    let container = &pod["spec"]["containers"][0];
    json!([{"name": container["name"], "image": container["image"], "imageID": "",
        "containerID": format!("fake://{}", pod["metadata"]["uid"].as_str().unwrap_or("")),
        "ready": ready, "restartCount": 0, "started": ready, "state": state}])
}

fn conditions(ready: bool) -> Value {
    let ready = if ready { "True" } else { "False" };
    json!([
        {"type": "PodScheduled", "status": "True"},
        {"type": "Initialized", "status": "True"},
        {"type": "ContainersReady", "status": ready},
        {"type": "Ready", "status": ready},
    ])
}

fn running_status(pod: &Value, started_at: &str) -> Value {
    json!({"phase": "Running", "startTime": started_at, "hostIP": "127.0.0.1",
        "podIP": "127.0.0.1", "conditions": conditions(true),
        "containerStatuses": container_status(pod, json!({"running": {"startedAt": started_at}}), true)})
}

fn waiting_status(pod: &Value, reason: &str) -> Value {
    let state = json!({"waiting": {"reason": "CreateContainerConfigError", "message": reason}});
    json!({"phase": "Pending", "conditions": conditions(false),
        "containerStatuses": container_status(pod, state, false)})
}

/// The kubelet keeps at most this much of a termination message.
const MESSAGE_LIMIT: usize = 4096;

fn ended_status(c: &Container, code: i64) -> Value {
    let root = c.dir.join("root");
    let mut message = std::fs::read_to_string(root.join("dev/termination-log")).unwrap_or_default();
    if message.is_empty() && code != 0 && c.fallback_to_logs {
        // FallbackToLogsOnError: the last 80 lines, at most 2048 bytes.
        let log = std::fs::read_to_string(c.dir.join("log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(80)..].join("\n");
        message = tail[tail.len().saturating_sub(2048)..].to_string();
    }
    message.truncate(MESSAGE_LIMIT);
    let reason = if code == 0 { "Completed" } else { "Error" };
    let state = json!({"terminated": {"exitCode": code, "reason": reason, "message": message,
        "startedAt": c.started_at, "finishedAt": now_rfc3339()}});
    json!({"phase": if code == 0 { "Succeeded" } else { "Failed" }, "startTime": c.started_at,
        "conditions": conditions(false), "containerStatuses": container_status(&c.pod, state, false)})
}

fn epoch_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Seconds since the epoch of an RFC 3339 UTC time (`2026-11-30T12:00:00Z`).
fn epoch(text: &str) -> Option<u64> {
    let n = |range: std::ops::Range<usize>| text.get(range)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss) = (n(11..13)?, n(14..16)?, n(17..19)?);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_read_back() {
        assert_eq!(epoch("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(epoch("2026-11-30T12:00:01Z"), Some(1_796_040_001));
        let now = epoch_now();
        assert!(epoch(&now_rfc3339()).is_some_and(|t| t.abs_diff(now) <= 1));
    }

    #[test]
    fn the_image_is_read_from_the_dockerfile() {
        let image = image();
        assert_eq!(image.user, (10001, 10001));
        assert_eq!(image.workdir, "/buildkite");
        assert_eq!(image.entrypoint, ["/usr/local/bin/agent-wrapper"]);
        assert!(image
            .env
            .contains(&("BUILDKITE_BUILD_PATH".into(), "/buildkite/builds".into())));
    }
}
