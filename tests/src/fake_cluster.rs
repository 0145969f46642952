//! The rest of a cluster behind [`FakeKube`]: a Job controller, a scheduler, nodes, a namespace
//! pod quota, an optional Cluster Autoscaler, PodGC, and a kubelet stand-in that runs every pod
//! bound to a node for real. They read and write the fake API server's store as the real ones
//! do the API, so the dispatcher and `kubectl` see their work through lists and watches.
//!
//! Modelled on Kubernetes 1.33, each behaviour on the source file named with it
//! (kubernetes/kubernetes unless another repository is named). Where the source is silent, this
//! says what it chose.
//!
//! - **Job controller** (`pkg/controller/job/job_controller.go`): keeps `min(parallelism,
//!   completions − succeeded)` pods active, each from the template with `generateName: <job>-`, the
//!   `batch.kubernetes.io/controller-uid` and `job-name` labels (and the legacy pair), a controller
//!   owner reference and the `batch.kubernetes.io/job-tracking` finalizer; a `SuccessfulCreate`
//!   Event per pod. Status `active`, `ready`, `terminating`, `succeeded`, `failed`, `startTime`,
//!   `uncountedTerminatedPods` (always empty: counting a pod and removing its finalizer is one step
//!   here). A finished pod (Failed; or deleted before it succeeded, unless a `podFailurePolicy` or
//!   `podReplacementPolicy: Failed` makes the controller wait for Failed, `isPodFailed`) is counted
//!   and loses its finalizer, so a deleted pod object stays, with its `deletionTimestamp`, until
//!   counted. A Job ends on a `FailJob` rule (reason `PodFailurePolicy`), on more counted failures
//!   than `backoffLimit` (`BackoffLimitExceeded`), past `activeDeadlineSeconds`
//!   (`DeadlineExceeded`), with `backoffLimitPerIndex` on failed indexes (`FailedIndexes`,
//!   `MaxFailedIndexesExceeded`), or on reaching its completions with no pod active: first the
//!   interim `FailureTarget` (same reason and message as the final one; its active pods deleted,
//!   `SuccessfulDelete`) or `SuccessCriteriaMet` (`CompletionsReached`, "Reached expected number of
//!   succeeded pods"), and only once none of its pods is still terminating `Failed` (a Warning
//!   Event of its reason) or `Complete` (`Completed`, `completionTime`):
//!   `newFailureCondition`/`newSuccessCondition` with `delayTerminalCondition` (on since 1.31),
//!   `enactJobFinished`. The stored `job_controller.go` gives `SuccessCriteriaMet` no reason;
//!   `CompletionsReached` and its message are 1.31+'s (`JobReasonCompletionsReached`). A finished
//!   Job's pods, and a deleted Job's, lose the finalizer (the orphan worker). `completionMode:
//!   Indexed` (`indexed_job_utils.go`): one pod per open index (`<job>-<i>-`, the
//!   `job-completion-index` annotation and label, `hostname: <job>-<i>`, `JOB_COMPLETION_INDEX`
//!   from the label), `completedIndexes` and `failedIndexes` in the API's interval form (`1,3-5`);
//!   with `backoffLimitPerIndex` an index fails alone (`FailIndex`, or a counted failure whose pod
//!   had `backoffLimitPerIndex` failures before it) while the others go on, each pod carries
//!   `batch.kubernetes.io/job-index-failure-count` and `…/job-index-ignored-failure-count`, and a
//!   failed index's next pod waits 10 s × 2^(n−1), at most 10 minutes, n its failures counted and
//!   ignored, from the last one's end (`backoff_utils.go` `getRemainingTimePerIndex`; the failed
//!   pod keeps its finalizer until then). A `parallelism` lowered below the pods active deletes
//!   the surplus, least started first (`activePodsForRemoval`, `controller.ActivePods`). Not
//!   modelled: the Job-wide pod failure backoff of Jobs
//!   without `backoffLimitPerIndex`, `successPolicy`, duplicate-index cleanup, init containers;
//!   of `suspend`, only that a suspended Job wants no pod (`manageJob`, `jobSuspended`, read at
//!   kubernetes 6ae037f1: its active pods deleted, none made), not its `Suspended` condition
//!   nor the reset of its `startTime`. A finished Job is deleted `ttlSecondsAfterFinished` later, its pods with it.
//! - **podFailurePolicy** (`pod_failure_policy.go` `matchPodFailurePolicy`): the rules in order,
//!   the first that matches decides. `onExitCodes` (`In`/`NotIn`, optional `containerName`)
//!   looks at terminated containers with a non-zero code, the containers then the init
//!   containers; `onPodConditions` at type and status (`DisruptionTarget=True`). `FailJob` ends
//!   the Job ("Container X for pod ns/name failed with exit code N matching FailJob rule at
//!   index I", or "Pod ns/name has condition T matching FailJob rule at index I"), `FailIndex`
//!   its index, `Ignore` leaves the failure out of `failed` and the backoff limits (but not of
//!   the per-index delay), `Count` counts it.
//! - **Quota**: a `pods` limit on the namespace's pods that have not ended, not a served kind:
//!   set on the cluster, and changed with [`FakeCluster::change`]. A refused pod is a
//!   `FailedCreate` Warning on the Job, `Error creating: pods "<name>" is forbidden: exceeded
//!   quota: ...` as the quota admission words it, aggregated (`count`, `lastTimestamp`) as the
//!   event recorder does, and the Job is tried again after `DefaultJobApiBackOff` (1 s)
//!   doubling to `MaxJobApiBackOff` (a minute), reset by a creation: a freed quota is noticed at
//!   that next attempt. The real controller also syncs a Job when its own pods change; here
//!   only the backoff paces the retries.
//! - **LimitRange**: a `max.cpu` per container, set and changed like the quota. A container
//!   above it, or without a CPU limit, is refused as the LimitRanger admission words it
//!   (`plugin/pkg/admission/limitranger/admission.go`, `maxConstraint`, at kubernetes
//!   8f672ecf: `maximum cpu usage per Container is 2, but limit is 4.`, or `... is 2.  No limit
//!   is specified.`; `admission.NewForbidden` puts `pods "<name>" is forbidden: ` before it),
//!   the same `FailedCreate` and backoff as a quota refusal. Not modelled: its other limits
//!   (min, memory, ratios, `Pod`-type) and its check of init containers, which the real one
//!   makes too (the shipped templates have none).
//! - **Claims**: a new claim is bound to a volume, a directory: the one the test provisioned
//!   for it, else a new one, deleted with the claim. The pvc-protection controller lets a
//!   deleted claim go only once no scheduled pod object names it, whatever that pod's phase; the
//!   scheduler leaves a pod naming a missing, Terminating or unbound claim Pending and
//!   `Unschedulable` with the volume binding's message (`../shared/notes/dispatch-peers.md` §6).
//! - **Snapshots** (`snapshot.storage.k8s.io/v1`): a VolumeSnapshot of a bound claim copies its
//!   volume and becomes `readyToUse` (of an unbound one, `status.error` says so); a claim whose
//!   `dataSource` is a snapshot is bound, to a copy of it, once the snapshot is ready. No
//!   VolumeSnapshotContent or class objects.
//! - **Nodes and scheduler**: `nodes` Node objects, `fake-node-1` to `fake-node-N`, Ready, each
//!   running at most `capacity` pods that have not ended; `spec.unschedulable` (a cordon, by
//!   `kubectl cordon`/`drain` or [`FakeCluster::drain`]) keeps new pods off. A pending pod is
//!   bound to the least loaded schedulable node with room; without one, `PodScheduled=False`,
//!   `Unschedulable`, with the scheduler's `FitError` message (`0/N nodes are available: 1
//!   Insufficient cpu, 1 node(s) were unschedulable. preemption: …`).
//! - **Cluster Autoscaler** (`ClusterSpec::autoscaler`; kubernetes/autoscaler
//!   `cluster-autoscaler/core/scaleup/`): while pods wait for room (not for a claim), it scales
//!   the node group up by one node, up to `max_nodes`, posting a Normal `TriggeredScaleUp` Event
//!   from `cluster-autoscaler` on each such pod, "pod triggered scale-up:
//!   [{fake-node-group 1->2 (max: 3)}]" (`processors/status/eventing_scale_up_processor.go`
//!   with `ScaleUpInfo`'s form); the node joins `delay` later.
//! - **Disruptions**, each a `DisruptionTarget=True` pod condition with the real reason and
//!   message: the Eviction API (`pkg/registry/core/pod/storage/eviction.go`,
//!   `EvictionByEvictionAPI`, "Eviction API: evicting", then a graceful delete; served by
//!   [`FakeKube`], and [`FakeCluster::evict`], [`FakeCluster::drain`]); preemption
//!   (`pkg/scheduler/framework/preemption/preemption.go`, `PreemptionByScheduler`,
//!   "default-scheduler: preempting to accommodate a higher priority pod"; the victim's
//!   `Preempted` Event is not posted, there being no preemptor); taint eviction
//!   (`pkg/controller/tainteviction/taint_eviction.go`, `DeletionByTaintManager`, "Taint
//!   manager: deleting due to NoExecute taint"); node-pressure eviction by the kubelet
//!   (`pkg/kubelet/eviction/eviction_manager.go`, `TerminationByKubelet`, with the message of a
//!   default hard memory threshold, "The node was low on resource: memory. Threshold quantity:
//!   100Mi, available: 51200Ki. ", also a Warning `Evicted` Event): the container gets SIGTERM
//!   and SIGKILL after the pod's `terminationGracePeriodSeconds` (chosen: a soft threshold with
//!   a maximum grace period no shorter), and the pod fails in place, phase Failed, reason
//!   `Evicted`, not deleted. A pod deleted through the API gets no condition.
//! - **PodGC** (`pkg/controller/podgc/gc_controller.go`): a pod being deleted that was never
//!   scheduled is failed and deleted with no grace period, with no condition
//!   (`gcUnscheduledTerminating` calls `markFailedAndDeletePod`, not the condition form); a pod
//!   on a node gone from the spec for 40 s (`quarantineTime`) is failed with
//!   `DisruptionTarget` `DeletionByPodGC`, "PodGC: node no longer exists", and deleted
//!   (`gcOrphaned`).
//! - **DaemonSet controller**: a pod of each DaemonSet on each node, created bound to it (the
//!   real controller leaves the binding to the scheduler, through node affinity); one that ended
//!   is replaced, where a real kubelet would restart its container (`restartPolicy: Always`).
//! - **Kubelet**: a bound pod runs as a real container: a new PID and mount namespace
//!   (`unshare`), a root made of the host's `/usr` and `/etc` read-only, the image's files (the
//!   Dockerfile's final stage: its `/usr/local/bin` binaries from this workspace's build, the
//!   stand-in as `buildkite-agent`, `image/buildkite-agent.cfg`, `image/install.sh`'s hook
//!   links, its `ENV`, `USER`, `WORKDIR` and `ENTRYPOINT`), whatever image the pod names, its own
//!   `/tmp`, `/proc` and `/dev`, and each volume mount bound at its path: `emptyDir` a fresh
//!   directory owned by the `fsGroup`, `persistentVolumeClaim` its claim's volume (read-only when
//!   the mount or the volume says so; mounted read-write with an `fsGroup`, its files are given
//!   to that group, group writable, directories setgid, as the kubelet's `SetVolumeOwnership`
//!   does), `hostPath` that node's own directory for the path (created for
//!   `DirectoryOrCreate`), `configMap` and `secret` their data as files, read-only. The
//!   entrypoint is PID 1, as the user the security context names; its env is the image's, then
//!   the container's (`value`, `secretKeyRef`, `configMapKeyRef`, `fieldRef`), and `HOSTNAME`.
//!   Only the first container runs; every container's status reports its state. The pod goes
//!   `Running`, then `Succeeded` or `Failed` with the container's exit code and its termination
//!   message (the file at `terminationMessagePath`, else with `FallbackToLogsOnError` the log's
//!   tail). A deleted pod's container gets SIGTERM, SIGKILL after its grace period (the
//!   delete's `gracePeriodSeconds`, else its `terminationGracePeriodSeconds`; it ends with
//!   whatever code its process returns); a pod deleted before it ran fails with each container
//!   137 `ContainerStatusUnknown`; then the kubelet deletes it for good, and it goes once no
//!   finalizer holds it. Conditions set by others (`DisruptionTarget`) are kept, and
//!   `startTime` once set. A node taken out of the spec takes its containers with it, and its
//!   pods are left as they were for PodGC. The test image's one addition to the real one:
//!   `BUILDKITE_STANDIN_STATE`, the stand-in agent's state directory, in `/tmp`.
//! - **Pods that never start**, Pending, `PodScheduled=True`, `startTime` set (the status
//!   manager sets it on the first status it writes, `pkg/kubelet/status/status_manager.go`),
//!   each container waiting, and Events from `kubelet`, in the kubelet's order (volumes, then
//!   per container image, then config):
//!   - a `configMap` or `secret` volume whose object is missing (not `optional`): every
//!     container `ContainerCreating`, a Warning `FailedMount` "MountVolume.SetUp failed for
//!     volume "v" : configmap "x" not found" (`pkg/kubelet/volumemanager/`, the volume
//!     plugin's error), retried after 500 ms doubling to 2 min 2 s
//!     (`pkg/util/goroutinemap/exponentialbackoff`), so creating the object lets it start;
//!   - an image reference that does not parse (`parsers.ParseImageName`, the
//!     distribution/reference grammar): `InvalidImageName`, "Failed to apply default image tag
//!     "X": couldn't parse image name "X": invalid reference format…" (a Warning
//!     `InspectFailed`), never retried; a `missing_images` image under `imagePullPolicy: Never`:
//!     `ErrImageNeverPull`, "Container image "X" is not present with pull policy of Never",
//!     never retried (taking it out of the set is a push to the registry, which such a pod never
//!     pulls from); any other image in `missing_images`: its pull fails with containerd's error
//!     through the CRI ("rpc error: code = NotFound desc = failed to pull and unpack image
//!     "docker.io/library/x:latest": failed to resolve reference "…": …: not found"), waiting
//!     `ErrImagePull` with it (Normal `Pulling`, Warning `Failed` "Failed to pull image "X":
//!     …"), then, until the image backoff (10 s doubling to 300 s) has passed, `ImagePullBackOff`
//!     "Back-off pulling image "X"" (a Normal `BackOff` Event, as `image_manager.go` records it);
//!     the kubelet syncs the pod every second meanwhile (the fake's choice), and the first pull
//!     after the backoff once the image left the set starts it. Each of these also a Warning
//!     `Failed` "Error: <reason>" (`kuberuntime_container.go` `startContainer`);
//!   - env from a Secret or ConfigMap that is missing (`secret "x" not found`) or lacks the key
//!     (`couldn't find key k in Secret ns/x`, `kubelet_pods.go` `makeEnvironmentVariables`):
//!     `CreateContainerConfigError` with that message and a Warning `Failed` "Error: <it>",
//!     retried every 10 s, so creating the Secret lets the pod start;
//!   - a runtime that fails `CreateContainer` ([`ClusterSpec::runtime_error`]): waiting
//!     `CreateContainerError` with the gRPC status message and a Warning `Failed` "Error:
//!     <it>" (`kuberuntime_container.go` `startContainer`, read at kubernetes fbba6b47: `return
//!     s.Message(), ErrCreateContainer`), retried every 10 s like a config error (the pod
//!     worker's requeue after a sync error, `backOffPeriod` in `pkg/kubelet/kubelet.go`), so a
//!     runtime that recovers lets the pod start.
//!
//! Needs root (mount namespaces) and util-linux's `unshare`; [`FakeCluster::unavailable`] says
//! why it cannot run.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::fake_kube::{
    disruption, kind_of, now_rfc3339, with_condition, FakeKube, Key, Store, PVC_PROTECTION,
};
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
    /// The namespace's LimitRange `max.cpu` for each container, in millicores, if any.
    pub max_container_cpu: Option<u64>,
    /// What the container runtime answers every `CreateContainer` with, if it fails them
    /// (`context deadline exceeded`: a runtime slower than the kubelet's request timeout).
    pub runtime_error: Option<String>,
    /// Volumes provisioned beforehand: claim name → the directory that is its volume. Other
    /// claims get a new directory when bound, deleted with the claim.
    pub claims: BTreeMap<String, PathBuf>,
    /// Image references (as a pod spells them) the registry does not have: pulling one fails.
    /// Taking one out is pushing it: a pod waiting for it starts at its next pull.
    pub missing_images: BTreeSet<String>,
    /// A Cluster Autoscaler adding nodes for pods that do not fit, if any.
    pub autoscaler: Option<Autoscaler>,
}

/// The Cluster Autoscaler's node group: at most `max_nodes` nodes, each joining `delay` after
/// the scale-up that asked for it.
#[derive(Debug, Clone, Copy)]
pub struct Autoscaler {
    pub max_nodes: usize,
    pub delay: Duration,
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
    /// When it is killed, once SIGTERM has been sent.
    deadline: Option<Instant>,
    /// The eviction manager's message, when its kubelet evicts the pod.
    evicted: Option<String>,
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

    /// How many nodes the cluster has now (the autoscaler may have added some).
    pub fn nodes(&self) -> usize {
        self.inner.spec.lock().unwrap().nodes.max(1)
    }

    /// Pod `pod` evicted as through the Eviction API (`POST …/pods/<pod>/eviction`).
    pub fn evict(&self, namespace: &str, pod: &str) {
        let key = pod_key(namespace, pod);
        self.inner.kube.with_store(|store| {
            let _ = store.evict(&key, None);
        });
    }

    /// `kubectl drain --ignore-daemonsets`: node `node` cordoned, then each of its pods but a
    /// DaemonSet's evicted.
    pub fn drain(&self, node: &str) {
        self.cordon(node, true);
        self.inner.kube.with_store(|store| {
            let on = |p: &Value| p["spec"]["nodeName"] == node;
            let daemon = |p: &Value| p["metadata"]["ownerReferences"][0]["kind"] == "DaemonSet";
            let pods = store.all("pods").into_iter();
            for (key, _) in pods.filter(|(_, p)| on(p) && !daemon(p)) {
                let _ = store.evict(&key, None);
            }
        });
    }

    /// `kubectl uncordon`: new pods may be scheduled on node `node` again.
    pub fn uncordon(&self, node: &str) {
        self.cordon(node, false);
    }

    /// Pod `pod` preempted by the scheduler for a pod of higher priority
    /// (`pkg/scheduler/framework/preemption/`): `DisruptionTarget` `PreemptionByScheduler`, then
    /// deleted gracefully.
    pub fn preempt(&self, namespace: &str, pod: &str) {
        let message = "default-scheduler: preempting to accommodate a higher priority pod";
        self.disrupt(namespace, pod, "PreemptionByScheduler", message);
    }

    /// Pod `pod` evicted by the taint eviction controller for a `NoExecute` taint it does not
    /// tolerate (`pkg/controller/tainteviction/`): `DisruptionTarget` `DeletionByTaintManager`,
    /// then deleted.
    pub fn taint_evict(&self, namespace: &str, pod: &str) {
        let message = "Taint manager: deleting due to NoExecute taint";
        self.disrupt(namespace, pod, "DeletionByTaintManager", message);
    }

    /// Pod `pod` evicted by its kubelet for node pressure (`pkg/kubelet/eviction/`): a Warning
    /// `Evicted` Event and `DisruptionTarget` `TerminationByKubelet`; the kubelet then stops its
    /// container and fails it in place (phase Failed, reason `Evicted`), not deleted.
    pub fn kubelet_evict(&self, namespace: &str, pod: &str) {
        let key = pod_key(namespace, pod);
        self.inner.kube.with_store(|store| {
            let Some(object) = store.objects.get(&key).cloned() else {
                return;
            };
            let note = ("Warning", "Evicted", EVICTION_MESSAGE);
            record(store, &object, &Source::kubelet(&object, None), note);
            let condition = disruption("TerminationByKubelet", EVICTION_MESSAGE);
            store.set_pod_condition(&key, condition);
        });
    }

    /// `DisruptionTarget` with `reason` and `message` on the pod, then the pod deleted.
    fn disrupt(&self, namespace: &str, pod: &str, reason: &str, message: &str) {
        let key = pod_key(namespace, pod);
        self.inner.kube.with_store(|store| {
            if store.set_pod_condition(&key, disruption(reason, message)) {
                store.delete(kind_of("pods").unwrap(), &key, false, None);
            }
        });
    }

    /// Node `node` cordoned (`spec.unschedulable`), or uncordoned.
    fn cordon(&self, node: &str, on: bool) {
        let spec = self.inner.spec.lock().unwrap().clone();
        self.inner.kube.with_store(|store| {
            node_controller(store, &spec);
            if let Some(mut object) = store.objects.get(&node_key(node)).cloned() {
                object["spec"]["unschedulable"] = if on { json!(true) } else { Value::Null };
                store.put(kind_of("nodes").unwrap(), object);
            }
        });
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

fn pod_key(namespace: &str, name: &str) -> Key {
    ("pods", namespace.to_string(), name.to_string())
}

/// What the controllers keep between syncs, as the real ones keep it in memory.
#[derive(Default)]
struct Memory {
    /// Running containers, by pod uid.
    containers: HashMap<String, Container>,
    refused: Refusals,
    /// The kubelet's attempts at pods it has not started, by pod uid.
    attempts: HashMap<String, Attempts>,
    /// When the node the autoscaler is adding joins.
    scale_up: Option<Instant>,
    /// Nodes gone, since when PodGC has missed them.
    gone_nodes: HashMap<String, Instant>,
}

/// The controllers' loop; on stop, every container is killed.
fn run(inner: &Inner) {
    let mut memory = Memory::default();
    while !inner.stop.load(Ordering::SeqCst) {
        join_nodes(inner, &mut memory.scale_up);
        let spec = inner.spec.lock().unwrap().clone();
        let plan = inner
            .kube
            .with_store(|store| controllers(store, inner, &spec, &mut memory));
        act(inner, &spec, &mut memory, plan);
        reap(inner, &spec.node_names(), &mut memory);
        std::thread::sleep(Duration::from_millis(50));
    }
    for c in memory.containers.values_mut() {
        kill_container(c);
        let _ = c.child.wait();
    }
}

/// One sync of every controller against the store; what the kubelet is to do outside it.
fn controllers(store: &mut Store, inner: &Inner, spec: &ClusterSpec, memory: &mut Memory) -> Plan {
    node_controller(store, spec);
    job_controller(store, spec, epoch_now(), &mut memory.refused);
    snapshot_controller(store, spec, &inner.dir);
    claims_controller(store, spec, &inner.dir);
    let short = scheduler(store, spec);
    autoscaler(store, spec, &short, &mut memory.scale_up);
    daemonset_controller(store, spec);
    pod_gc(store, spec, &mut memory.gone_nodes);
    kubelet(store, spec, memory)
}

/// The kubelet's plan carried out: containers stopped, and started (or why not, retried later).
fn act(inner: &Inner, spec: &ClusterSpec, memory: &mut Memory, plan: Plan) {
    for stop in plan.stop {
        if let Some(c) = memory.containers.get_mut(&stop.uid) {
            stop_container(c, stop.grace, stop.evicted);
        }
    }
    for (key, pod, inputs) in plan.start {
        let uid = uid_of(&pod);
        let status = match start_container(inner, spec, &key, &pod, inputs) {
            Ok(container) => {
                let status = running_status(&pod, &container.started_at);
                memory.attempts.remove(&uid);
                memory.containers.insert(uid, container);
                status
            }
            Err(why) => {
                let attempts = memory.attempts.entry(uid).or_default();
                attempts.next_sync = Some(Instant::now() + CONFIG_RESYNC);
                let waiting = json!({"reason": "CreateContainerConfigError", "message": why});
                pending_status(&pod, &vec![Some(waiting); containers(&pod).len()])
            }
        };
        inner
            .kube
            .with_store(|store| set_status(store, &key, status));
    }
}

/// Containers past their grace period killed; those that ended reported (by the kubelets of
/// `nodes`: a node that is gone reports nothing).
fn reap(inner: &Inner, nodes: &[String], memory: &mut Memory) {
    let ended: Vec<String> = memory
        .containers
        .iter_mut()
        .filter_map(|(uid, c)| {
            if c.deadline.is_some_and(|at| Instant::now() >= at) {
                kill_container(c);
            }
            c.child.try_wait().ok().flatten().map(|_| uid.clone())
        })
        .collect();
    for uid in ended {
        let mut c = memory.containers.remove(&uid).unwrap();
        let code = exit_code(c.child.wait().unwrap());
        inner
            .kube
            .with_store(|store| container_ended(store, nodes, &uid, &c, code));
    }
}

/// The pod of a container that ended: Succeeded or Failed with its exit code (Failed and
/// `Evicted` when its kubelet evicted it), and deleted for good if it was being deleted.
fn container_ended(store: &mut Store, nodes: &[String], uid: &str, c: &Container, code: i64) {
    let pod = store
        .objects
        .get(&c.key)
        .filter(|p| uid_of(p) == uid && on_node(p, nodes))
        .cloned();
    let Some(pod) = pod else {
        return;
    };
    let status = ended_status(c, code);
    let status = match &c.evicted {
        Some(message) => evicted(status, message),
        None => status,
    };
    set_status(store, &c.key, status);
    if deleting(&pod) {
        final_delete(store, &c.key);
    }
}

/// A pod's status as a controller or its kubelet writes it: conditions merged by type (those of
/// others kept, a transition time kept while the status holds), `startTime` kept once set.
fn set_status(store: &mut Store, key: &Key, mut status: Value) {
    let Some(mut pod) = store.objects.get(key).cloned() else {
        return;
    };
    let mut conditions = pod["status"]["conditions"].clone();
    for condition in status["conditions"].as_array().cloned().unwrap_or_default() {
        conditions = with_condition(&conditions, condition);
    }
    status["conditions"] = conditions;
    if pod["status"]["startTime"].is_string() {
        status["startTime"] = pod["status"]["startTime"].clone();
    }
    if pod["status"] != status {
        pod["status"] = status;
        store.put(kind_of("pods").unwrap(), pod);
    }
}

/// The pods `owner` controls.
fn owned_by(store: &Store, owner: &Value) -> Vec<(Key, Value)> {
    let uid = &owner["metadata"]["uid"];
    store
        .objects
        .iter()
        .filter(|((plural, ns, _), pod)| {
            *plural == "pods"
                && *ns == owner["metadata"]["namespace"]
                && pod["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|r| r["uid"] == *uid))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn phase(pod: &Value) -> &str {
    pod["status"]["phase"].as_str().unwrap_or("Pending")
}

fn ended(pod: &Value) -> bool {
    matches!(phase(pod), "Succeeded" | "Failed")
}

fn deleting(object: &Value) -> bool {
    !object["metadata"]["deletionTimestamp"].is_null()
}

fn pod_ready(pod: &Value) -> bool {
    let conditions = pod["status"]["conditions"].as_array();
    conditions.is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

fn uid_of(object: &Value) -> String {
    text(&object["metadata"]["uid"])
}

fn containers(pod: &Value) -> Vec<Value> {
    pod["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A string field, or empty.
fn text(value: &Value) -> String {
    value.as_str().unwrap_or("").to_string()
}

fn object_or_empty(value: &Value) -> Value {
    match value.is_object() {
        true => value.clone(),
        false => json!({}),
    }
}

// ---------------------------------------------------------------------------------------------
// The Job controller (`pkg/controller/job/job_controller.go`).

/// The finalizer that keeps a Job's pod until the controller has counted it.
const TRACKING: &str = "batch.kubernetes.io/job-tracking";
const INDEX: &str = "batch.kubernetes.io/job-completion-index";
/// An Indexed Job's pod: failures of its index before it, counted and ignored.
const FAILURES: &str = "batch.kubernetes.io/job-index-failure-count";
const IGNORED: &str = "batch.kubernetes.io/job-index-ignored-failure-count";

/// `DefaultJobApiBackOff` and `MaxJobApiBackOff`: a Job whose pod creation was refused is synced
/// again after 1 s, doubling to a minute (the work queue's per-item exponential rate limiter).
const API_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));
/// `DefaultJobPodFailureBackOff` and `MaxJobPodFailureBackOff`: a failed index's next pod.
const POD_FAILURE_BACKOFF: (Duration, Duration) =
    (Duration::from_secs(10), Duration::from_secs(600));

/// The Job controller's refused creations: Job uid → (refusals in a row, the last).
type Refusals = HashMap<String, (u32, Instant)>;

/// `base` doubled for each of `n` failures after the first, at most `max`.
fn backoff((base, max): (Duration, Duration), n: u32) -> Duration {
    let doubled = base.saturating_mul(2u32.saturating_pow(n.saturating_sub(1)));
    doubled.min(max)
}

/// One sync of every Job, and the finalizers of pods whose Job is gone or finished.
fn job_controller(store: &mut Store, spec: &ClusterSpec, now: u64, refused: &mut Refusals) {
    release_orphans(store);
    for (key, job) in store.all("jobs") {
        if let Some(at) = finished_at(&job) {
            let ttl = job["spec"]["ttlSecondsAfterFinished"].as_u64();
            if ttl.is_some_and(|ttl| now >= at + ttl) {
                store.delete(kind_of("jobs").unwrap(), &key, false, None);
            }
        } else if job["metadata"]["deletionTimestamp"].is_null() {
            let pods = owned_by(store, &job);
            let view = JobView {
                job: &job,
                pods,
                now,
            };
            sync_job(store, spec, &view, refused);
        }
    }
}

/// A Job and its pods, as one sync sees them (`syncJobCtx`).
struct JobView<'a> {
    job: &'a Value,
    pods: Vec<(Key, Value)>,
    now: u64,
}

/// A Job condition to set: its type, reason and message.
type Condition = (&'static str, String, String);

/// `syncJob`: the Job's end, or the pods it still wants; then the finished pods counted and
/// their finalizers removed; then its status.
fn sync_job(store: &mut Store, spec: &ClusterSpec, view: &JobView, refused: &mut Refusals) {
    let mut tally = Tally::of(view);
    let mut end = ending(view, &tally);
    let mut moves = Moves::default();
    if end.is_some() {
        moves.deleted = delete_active(store, view);
    } else {
        moves.created = manage(store, spec, view, &tally, refused);
        end = completion(view, &tally, moves.created);
    }
    count_finished(store, view, &mut tally, end.as_ref());
    let status = job_status(view, &tally, end.as_ref(), moves);
    announce_end(store, view.job, &status);
    if view.job["status"] != status {
        let mut next = view.job.clone();
        next["status"] = status;
        store.put(kind_of("jobs").unwrap(), next);
    }
}

/// The pods this sync created and deleted, which its view of them does not show yet.
#[derive(Default, Clone, Copy)]
struct Moves {
    created: usize,
    deleted: usize,
}

/// What the Job's status counts: pods counted already (in its status) and those still tracked.
struct Tally {
    succeeded: u64,
    failed: u64,
    /// Indexed: the succeeded and failed indexes.
    done: BTreeSet<u64>,
    failed_indexes: BTreeSet<u64>,
    /// Failed pods whose index waits for its next pod, by index
    /// (`podsWithDelayedDeletionPerIndex`).
    delayed: BTreeMap<u64, Value>,
}

impl Tally {
    fn of(view: &JobView) -> Tally {
        let status = &view.job["status"];
        let mut tally = Tally {
            succeeded: status["succeeded"].as_u64().unwrap_or(0),
            failed: status["failed"].as_u64().unwrap_or(0),
            done: parse_indexes(status["completedIndexes"].as_str().unwrap_or("")),
            failed_indexes: parse_indexes(status["failedIndexes"].as_str().unwrap_or("")),
            delayed: BTreeMap::new(),
        };
        if indexed(view.job) {
            tally.add_indexes(view);
        }
        tally
    }

    /// Indexes that succeeded or failed since the last count, and the failed pods to replace.
    fn add_indexes(&mut self, view: &JobView) {
        let tracked = view.pods.iter().map(|(_, p)| p).filter(|p| tracked(p));
        for pod in tracked {
            let Some(i) = index_of(view.job, pod) else {
                continue;
            };
            if phase(pod) == "Succeeded" {
                self.done.insert(i);
            } else if per_index(view.job).is_some() && index_failed(view.job, pod) {
                self.failed_indexes.insert(i);
            }
        }
        if per_index(view.job).is_some() {
            self.delayed = delayed_pods(view, &self.done, &self.failed_indexes);
        }
    }

    /// Failures counted so far and about to be: those no `Ignore` rule matched.
    fn failures(&self, view: &JobView) -> u64 {
        let new = view
            .pods
            .iter()
            .map(|(_, p)| p)
            .filter(|p| tracked(p) && pod_failed(view.job, p) && counts_failure(view.job, p));
        self.failed + new.count() as u64
    }
}

/// The failed pod of each open index whose replacement is still to come: the one with the
/// most failures before it, the latest.
fn delayed_pods(
    view: &JobView,
    done: &BTreeSet<u64>,
    failed: &BTreeSet<u64>,
) -> BTreeMap<u64, Value> {
    let busy = active_indexes(view);
    let mut delayed: BTreeMap<u64, Value> = BTreeMap::new();
    for (_, pod) in &view.pods {
        let Some(i) = index_of(view.job, pod) else {
            continue;
        };
        let open = !done.contains(&i) && !failed.contains(&i) && !busy.contains(&i);
        if !tracked(pod) || !pod_failed(view.job, pod) || !open {
            continue;
        }
        let later = |last: &Value| {
            (index_failures(last), finished_time(last)) <= (index_failures(pod), finished_time(pod))
        };
        if delayed.get(&i).is_none_or(later) {
            delayed.insert(i, pod.clone());
        }
    }
    delayed
}

/// Why the Job ends, if it does: the condition it already set, else the first of a `FailJob`
/// rule, the backoff limit, the deadline and (with `backoffLimitPerIndex`) its failed indexes.
/// Each is the interim `FailureTarget` first (1.31+: `delayTerminalCondition`).
fn ending(view: &JobView, tally: &Tally) -> Option<Condition> {
    let job = view.job;
    let set = |kind: &'static str| {
        job_condition(job, kind).map(|c| (kind, text(&c["reason"]), text(&c["message"])))
    };
    let target = |reason: &str, message: &str| ("FailureTarget", reason.into(), message.into());
    if let Some(met) = set("SuccessCriteriaMet").or_else(|| set("FailureTarget")) {
        return Some(met);
    }
    if let Some(message) = fail_job_message(view) {
        return Some(target("PodFailurePolicy", &message));
    }
    let limit = job["spec"]["backoffLimit"].as_u64();
    let limit = limit.unwrap_or(if per_index(job).is_some() {
        i32::MAX as u64
    } else {
        6
    });
    if tally.failures(view) > limit {
        return Some(target(
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        ));
    }
    if past_deadline(view) {
        return Some(target(
            "DeadlineExceeded",
            "Job was active longer than specified deadline",
        ));
    }
    indexes_ending(job, tally).map(|(reason, message)| target(reason, message))
}

/// With `backoffLimitPerIndex`: too many failed indexes, or every index ended and some failed.
fn indexes_ending(job: &Value, tally: &Tally) -> Option<(&'static str, &'static str)> {
    per_index(job)?;
    let failed = tally.failed_indexes.len() as u64;
    if job["spec"]["maxFailedIndexes"]
        .as_u64()
        .is_some_and(|max| failed > max)
    {
        let message = "Job has exceeded the specified maximal number of failed indexes";
        return Some(("MaxFailedIndexesExceeded", message));
    }
    let ended = failed + tally.done.len() as u64 >= completions(job).unwrap_or(1);
    (failed > 0 && ended).then_some(("FailedIndexes", "Job has failed indexes"))
}

/// `getFailJobMessage`: the message of the first failed pod that a `FailJob` rule matches first.
fn fail_job_message(view: &JobView) -> Option<String> {
    view.pods.iter().find_map(|(_, pod)| {
        let (action, message) =
            match_policy(view.job, pod).filter(|_| pod_failed(view.job, pod))?;
        (action == "FailJob").then_some(message)
    })
}

fn past_deadline(view: &JobView) -> bool {
    let deadline = view.job["spec"]["activeDeadlineSeconds"].as_u64();
    let start = view.job["status"]["startTime"].as_str().and_then(epoch);
    deadline.is_some_and(|d| view.now >= start.unwrap_or(view.now) + d)
}

/// A Job that reached its completions with no pod left active: `SuccessCriteriaMet` first
/// (`newSuccessCondition` in 1.31+), `Complete` once its pods are counted and none is stopping.
fn completion(view: &JobView, tally: &Tally, created: usize) -> Option<Condition> {
    let active = count(view, active) + created;
    let succeeded = succeeded(view.job, tally, view);
    let complete = match completions(view.job) {
        Some(n) => succeeded >= n,
        None => succeeded > 0,
    };
    let message = "Reached expected number of succeeded pods";
    (complete && active == 0).then(|| {
        (
            "SuccessCriteriaMet",
            "CompletionsReached".into(),
            message.into(),
        )
    })
}

/// Succeeded pods: indexes for an Indexed Job, else pods counted and about to be.
fn succeeded(job: &Value, tally: &Tally, view: &JobView) -> u64 {
    if indexed(job) {
        return tally.done.len() as u64;
    }
    let new = view
        .pods
        .iter()
        .filter(|(_, p)| tracked(p) && phase(p) == "Succeeded");
    tally.succeeded + new.count() as u64
}

/// `deleteActivePods`: a Job that ends stops its pods (their finalizers come off as counted).
fn delete_active(store: &mut Store, view: &JobView) -> usize {
    let active: Vec<&(Key, Value)> = view.pods.iter().filter(|(_, p)| active(p)).collect();
    let deleted = active.len();
    delete_pods(store, view, active);
    deleted
}

/// The Job controller's deletes of its pods, each with its `SuccessfulDelete` Event.
fn delete_pods<'v>(
    store: &mut Store,
    view: &JobView,
    pods: impl IntoIterator<Item = &'v (Key, Value)>,
) {
    for (key, pod) in pods {
        store.delete(kind_of("pods").unwrap(), key, false, None);
        let message = format!("Deleted pod: {}", text(&pod["metadata"]["name"]));
        record(
            store,
            view.job,
            &JOB_CONTROLLER,
            ("Normal", "SuccessfulDelete", &message),
        );
    }
}

/// `manageJob`: the pods the Job still wants, created; how many were.
fn manage(
    store: &mut Store,
    spec: &ClusterSpec,
    view: &JobView,
    tally: &Tally,
    refused: &mut Refusals,
) -> usize {
    let job = view.job;
    let parallelism = job["spec"]["parallelism"].as_u64().unwrap_or(1);
    let succeeded = succeeded(job, tally, view);
    let want = match completions(job) {
        // Suspended: no pod wanted, the active ones deleted (`manageJob`, `jobSuspended`).
        _ if job["spec"]["suspend"] == true => 0,
        Some(n) => parallelism.min(n.saturating_sub(succeeded)),
        None if succeeded > 0 => count(view, active) as u64,
        None => parallelism,
    };
    let stopping = if only_replace_failed(job) {
        count(view, terminating)
    } else {
        0
    };
    let surplus = count(view, active).saturating_sub(want as usize);
    if surplus > 0 {
        remove_surplus(store, view, surplus);
        return 0;
    }
    let missing = (want as usize).saturating_sub(stopping + count(view, active));
    let wanted: Vec<Option<u64>> = match indexed(job) {
        true => due_indexes(view, tally, missing)
            .into_iter()
            .map(Some)
            .collect(),
        false => vec![None; missing],
    };
    create_pods(store, spec, view, &wanted, &tally.delayed, refused)
}

/// `activePodsForRemoval`: more pods active than the Job wants (its `parallelism` lowered), so
/// `surplus` of them are deleted, least started first (`controller.ActivePods` in
/// `pkg/controller/controller_utils.go`: unscheduled before scheduled, then Pending before
/// Unknown before Running, then not ready before ready; the later tie-breakers, restarts and
/// ages, are left out).
fn remove_surplus(store: &mut Store, view: &JobView, surplus: usize) {
    let mut active: Vec<&(Key, Value)> = view.pods.iter().filter(|(_, p)| active(p)).collect();
    let rank = |p: &Value| {
        let scheduled = p["spec"]["nodeName"].is_string();
        let phase = match phase(p) {
            "Pending" => 0,
            "Running" => 2,
            _ => 1,
        };
        let conditions = p["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let ready = conditions
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        (scheduled, phase, ready)
    };
    active.sort_by_key(|(_, p)| rank(p));
    delete_pods(store, view, active.into_iter().take(surplus));
}

/// `firstPendingIndexes`, then with `backoffLimitPerIndex` those whose last failure's backoff
/// delay has passed (`getPodCreationInfoForIndependentIndexes`).
fn due_indexes(view: &JobView, tally: &Tally, room: usize) -> Vec<u64> {
    let job = view.job;
    let mut taken: BTreeSet<u64> = active_indexes(view);
    taken.extend(&tally.done);
    taken.extend(&tally.failed_indexes);
    if only_replace_failed(job) {
        let stopping = view.pods.iter().filter(|(_, p)| terminating(p));
        taken.extend(stopping.filter_map(|(_, p)| index_of(job, p)));
    }
    let pending = (0..completions(job).unwrap_or(1)).filter(|i| !taken.contains(i));
    let pending: Vec<u64> = pending.take(room).collect();
    let due = |i: &u64| {
        tally
            .delayed
            .get(i)
            .is_none_or(|pod| retry_in(pod, view.now) == 0)
    };
    pending.into_iter().filter(due).collect()
}

/// Seconds until the index of failed `pod` may have its next pod: 10 s × 2^(n−1), at most
/// 10 minutes, n its failures counted and ignored (`getRemainingTimePerIndex`).
fn retry_in(pod: &Value, now: u64) -> u64 {
    let failures = u32::try_from(index_failures(pod) + 1).unwrap_or(u32::MAX);
    let delay = backoff(POD_FAILURE_BACKOFF, failures).as_secs();
    delay.saturating_sub(now.saturating_sub(finished_time(pod)))
}

/// Creates the pods while the quota admits them; a refusal is a `FailedCreate` Event and backs
/// the Job off (`DefaultJobApiBackOff`), a success resets that.
fn create_pods(
    store: &mut Store,
    spec: &ClusterSpec,
    view: &JobView,
    wanted: &[Option<u64>],
    delayed: &BTreeMap<u64, Value>,
    refused: &mut Refusals,
) -> usize {
    let uid = text(&view.job["metadata"]["uid"]);
    let waiting = refused
        .get(&uid)
        .is_some_and(|(n, at)| at.elapsed() < backoff(API_BACKOFF, *n));
    if wanted.is_empty() || waiting {
        return 0;
    }
    for (created, index) in wanted.iter().enumerate() {
        let admitted =
            limits_admit(spec, view.job).and_then(|()| quota_admits(store, spec, view.job));
        if let Err(message) = admitted {
            let n = refused.get(&uid).map_or(0, |(n, _)| *n);
            refused.insert(uid, (n + 1, Instant::now()));
            record(
                store,
                view.job,
                &JOB_CONTROLLER,
                ("Warning", "FailedCreate", &message),
            );
            return created;
        }
        let replaced = index.and_then(|i| delayed.get(&i));
        let name = create_pod(store, view.job, *index, replaced);
        let message = format!("Created pod: {name}");
        record(
            store,
            view.job,
            &JOB_CONTROLLER,
            ("Normal", "SuccessfulCreate", &message),
        );
    }
    refused.remove(&uid);
    wanted.len()
}

/// The LimitRange's `max.cpu` per container, against each container's CPU limit (the admission
/// reads the pod; the Job's template is what the pod gets).
fn limits_admit(spec: &ClusterSpec, job: &Value) -> Result<(), String> {
    let Some(max) = spec.max_container_cpu else {
        return Ok(());
    };
    let enforced = match max % 1000 {
        0 => (max / 1000).to_string(),
        _ => format!("{max}m"),
    };
    let containers = job["spec"]["template"]["spec"]["containers"].as_array();
    for container in containers.into_iter().flatten() {
        let refused = match &container["resources"]["limits"]["cpu"] {
            Value::Null => {
                format!("maximum cpu usage per Container is {enforced}.  No limit is specified.")
            }
            limit => {
                let limit = limit
                    .as_str()
                    .map_or_else(|| limit.to_string(), str::to_string);
                if millicores(&limit) <= max {
                    continue;
                }
                format!("maximum cpu usage per Container is {enforced}, but limit is {limit}.")
            }
        };
        return Err(format!(
            "Error creating: pods \"{}-{}\" is forbidden: {refused}",
            text(&job["metadata"]["name"]),
            crate::fake_kube::random_suffix(max)
        ));
    }
    Ok(())
}

/// A CPU quantity (`2`, `1.5`, `500m`) in millicores.
fn millicores(quantity: &str) -> u64 {
    match quantity.strip_suffix('m') {
        Some(milli) => milli.parse().unwrap_or(u64::MAX),
        None => quantity
            .parse::<f64>()
            .map_or(u64::MAX, |cores| (cores * 1000.0).round() as u64),
    }
}

/// The namespace's pod quota: a pod that has not ended counts; past the limit, the refusal
/// as the quota admission words it.
fn quota_admits(store: &Store, spec: &ClusterSpec, job: &Value) -> Result<(), String> {
    let namespace = text(&job["metadata"]["namespace"]);
    let used = store
        .objects
        .iter()
        .filter(|((p, ns, _), pod)| *p == "pods" && *ns == namespace && !ended(pod))
        .count();
    match spec.quota_pods.filter(|limit| used >= *limit) {
        None => Ok(()),
        Some(limit) => Err(format!(
            "Error creating: pods \"{}-{}\" is forbidden: exceeded quota: agent-pods, requested: pods=1, used: pods={used}, limited: pods={limit}",
            text(&job["metadata"]["name"]),
            crate::fake_kube::random_suffix(used as u64)
        )),
    }
}

/// `trackJobStatusAndRemoveFinalizers`: each finished pod still tracked is counted (succeeded,
/// or failed unless an `Ignore` rule matched; once the Job ends, every pod not succeeded is
/// failed) and its finalizer removed, but a failed pod whose index waits for its next pod.
fn count_finished(store: &mut Store, view: &JobView, tally: &mut Tally, end: Option<&Condition>) {
    let failing = end.is_some_and(|(kind, _, _)| *kind == "FailureTarget");
    for (key, pod) in view.pods.iter().filter(|(_, p)| tracked(p)) {
        let failed = pod_failed(view.job, pod);
        let waits = index_of(view.job, pod).is_some_and(|i| tally.delayed.contains_key(&i));
        let release = end.is_some() || phase(pod) == "Succeeded" || (failed && !waits);
        if !release {
            continue;
        }
        let valid = !indexed(view.job) || index_of(view.job, pod).is_some();
        if phase(pod) == "Succeeded" {
            tally.succeeded += u64::from(!indexed(view.job));
        } else if (failed || failing) && valid && counts_failure(view.job, pod) {
            tally.failed += 1;
        }
        release_pod(store, key);
    }
}

/// The pod without the Job's finalizer (gone, if it was only waiting for that).
fn release_pod(store: &mut Store, key: &Key) {
    let Some(mut pod) = store.objects.get(key).cloned() else {
        return;
    };
    let finalizers = pod["metadata"]["finalizers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let rest: Vec<Value> = finalizers.into_iter().filter(|f| f != TRACKING).collect();
    pod["metadata"]["finalizers"] = json!(rest);
    store.put(kind_of("pods").unwrap(), pod);
}

/// The orphan worker and `cleanupPodFinalizers`: a pod whose Job is gone or finished is released.
fn release_orphans(store: &mut Store) {
    let jobs = store.all("jobs");
    let live = |uid: &Value| {
        jobs.iter()
            .any(|(_, j)| j["metadata"]["uid"] == *uid && finished_at(j).is_none())
    };
    let orphans: Vec<Key> = store
        .all("pods")
        .into_iter()
        .filter(|(_, pod)| tracked(pod) && !live(&controller_uid(pod)))
        .map(|(key, _)| key)
        .collect();
    for key in orphans {
        release_pod(store, &key);
    }
}

/// The Job's status after this sync: counts, indexes, and its conditions: the interim one of
/// its end, then the final one once no pod of it is still stopping (`enactJobFinished`).
fn job_status(view: &JobView, tally: &Tally, end: Option<&Condition>, moves: Moves) -> Value {
    let job = view.job;
    let start = job["status"]["startTime"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(now_rfc3339);
    // Deleting stops every active pod, the ready ones with them.
    let ready = view.pods.iter().filter(|(_, p)| active(p) && pod_ready(p));
    let ready = if moves.deleted > 0 { 0 } else { ready.count() };
    let active = count(view, active) + moves.created - moves.deleted;
    let stopping = count(view, terminating) + moves.deleted;
    let mut status = json!({"startTime": start, "active": active, "ready": ready,
        "terminating": stopping, "succeeded": tally.succeeded, "failed": tally.failed,
        "uncountedTerminatedPods": {}});
    if job["status"]["conditions"].is_array() {
        status["conditions"] = job["status"]["conditions"].clone();
    }
    if indexed(job) {
        status["succeeded"] = json!(tally.done.len());
        status["completedIndexes"] = json!(format_indexes(&tally.done));
        if per_index(job).is_some() {
            status["failedIndexes"] = json!(format_indexes(&tally.failed_indexes));
        }
    }
    if let Some((kind, reason, message)) = end {
        add_condition(&mut status, kind, reason, message);
        if stopping == 0 {
            let last = if *kind == "FailureTarget" {
                "Failed"
            } else {
                "Complete"
            };
            add_condition(&mut status, last, reason, message);
        }
    }
    if job_condition_in(&status, "Complete").is_some() {
        status["completionTime"] = json!(now_rfc3339());
    }
    status
}

/// `kind` appended to the status's conditions unless there.
fn add_condition(status: &mut Value, kind: &str, reason: &str, message: &str) {
    if job_condition_in(status, kind).is_some() {
        return;
    }
    let mut list = status["conditions"].as_array().cloned().unwrap_or_default();
    list.push(
        json!({"type": kind, "status": "True", "reason": reason, "message": message,
        "lastProbeTime": now_rfc3339(), "lastTransitionTime": now_rfc3339()}),
    );
    status["conditions"] = json!(list);
}

/// `recordJobFinished`: a Warning of the failure's reason, or `Completed`.
fn announce_end(store: &mut Store, job: &Value, status: &Value) {
    let was = |kind| job_condition(job, kind).is_some();
    if let Some(failed) = job_condition_in(status, "Failed").filter(|_| !was("Failed")) {
        let (reason, message) = (text(&failed["reason"]), text(&failed["message"]));
        record(store, job, &JOB_CONTROLLER, ("Warning", &reason, &message));
    } else if job_condition_in(status, "Complete").is_some() && !was("Complete") {
        record(
            store,
            job,
            &JOB_CONTROLLER,
            ("Normal", "Completed", "Job completed"),
        );
    }
}

/// A pod from the Job's template, with the tracking finalizer; in an Indexed Job its index as
/// the annotation, label, hostname and `JOB_COMPLETION_INDEX`, in its name, and with
/// `backoffLimitPerIndex` the failures of its index so far (`addIndexFailureCountAnnotation`).
fn create_pod(
    store: &mut Store,
    job: &Value,
    index: Option<u64>,
    replaced: Option<&Value>,
) -> String {
    let meta = &job["metadata"];
    let template = &job["spec"]["template"];
    let mut pod = json!({
        "metadata": {"generateName": format!("{}-", text(&meta["name"])),
            "labels": object_or_empty(&template["metadata"]["labels"]),
            "annotations": object_or_empty(&template["metadata"]["annotations"]),
            "finalizers": [TRACKING],
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"],
                "uid": meta["uid"], "controller": true, "blockOwnerDeletion": true}]},
        "spec": template["spec"].clone(),
    });
    for (k, v) in [
        ("batch.kubernetes.io/controller-uid", &meta["uid"]),
        ("batch.kubernetes.io/job-name", &meta["name"]),
        ("controller-uid", &meta["uid"]),
        ("job-name", &meta["name"]),
    ] {
        pod["metadata"]["labels"][k] = v.clone();
    }
    if let Some(i) = index {
        give_index(&mut pod, job, i, replaced);
    }
    let namespace = text(&meta["namespace"]);
    let created = store.create(kind_of("pods").unwrap(), &namespace, pod);
    text(&created.expect("a generated name")["metadata"]["name"])
}

/// An Indexed Job's pod's index (`indexed_job_utils.go`).
fn give_index(pod: &mut Value, job: &Value, i: u64, replaced: Option<&Value>) {
    let meta = &mut pod["metadata"];
    meta["annotations"][INDEX] = json!(i.to_string());
    meta["labels"][INDEX] = json!(i.to_string());
    meta["generateName"] = json!(format!("{}-{i}-", text(&job["metadata"]["name"])));
    if per_index(job).is_some() {
        let (failures, ignored) = replaced.map_or((0, 0), |old| {
            let counted = counts_failure(job, old);
            let (f, g) = (annotation(old, FAILURES), annotation(old, IGNORED));
            (f + u64::from(counted), g + u64::from(!counted))
        });
        meta["annotations"][FAILURES] = json!(failures.to_string());
        if ignored > 0 {
            meta["annotations"][IGNORED] = json!(ignored.to_string());
        }
    }
    pod["spec"]["hostname"] = json!(format!("{}-{i}", text(&job["metadata"]["name"])));
    let path = format!("metadata.labels['{INDEX}']");
    for container in pod["spec"]["containers"]
        .as_array_mut()
        .into_iter()
        .flatten()
    {
        let env = container["env"].as_array().cloned().unwrap_or_default();
        let mut env: Vec<Value> = env
            .into_iter()
            .filter(|e| e["name"] != "JOB_COMPLETION_INDEX")
            .collect();
        env.push(
            json!({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {"fieldPath": path}}}),
        );
        container["env"] = json!(env);
    }
}

// The podFailurePolicy (`pkg/controller/job/pod_failure_policy.go`).

/// `matchPodFailurePolicy`: the first rule, in order, that `pod` matches, as its action and the
/// message a `FailJob` rule gives. `onExitCodes` looks at terminated containers with a non-zero
/// code, the containers first, then the init containers; `onPodConditions` at the conditions.
fn match_policy(job: &Value, pod: &Value) -> Option<(String, String)> {
    let rules = job["spec"]["podFailurePolicy"]["rules"].as_array()?;
    let (namespace, name) = (
        text(&pod["metadata"]["namespace"]),
        text(&pod["metadata"]["name"]),
    );
    rules.iter().enumerate().find_map(|(i, rule)| {
        let action = rule["action"].as_str()?;
        if !matches!(action, "Ignore" | "Count" | "FailJob" | "FailIndex") {
            return None;
        }
        let message = match rule["onExitCodes"].is_object() {
            true => {
                let (container, code) = exit_code_match(pod, &rule["onExitCodes"])?;
                format!("Container {container} for pod {namespace}/{name} failed with exit code {code} matching {action} rule at index {i}")
            }
            false => {
                let kind = condition_match(pod, &rule["onPodConditions"])?;
                format!("Pod {namespace}/{name} has condition {kind} matching {action} rule at index {i}")
            }
        };
        Some((action.to_string(), message))
    })
}

/// `matchOnExitCodes`: the first terminated container (then init container) with a non-zero
/// exit code the requirement matches, as its name and code.
fn exit_code_match(pod: &Value, requirement: &Value) -> Option<(String, i64)> {
    let values: Vec<i64> = requirement["values"]
        .as_array()?
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    let operator = requirement["operator"].as_str()?;
    let named = requirement["containerName"].as_str();
    let statuses = ["containerStatuses", "initContainerStatuses"].into_iter();
    let all = statuses.flat_map(|list| pod["status"][list].as_array().cloned().unwrap_or_default());
    all.into_iter().find_map(|status| {
        let code = status["state"]["terminated"]["exitCode"]
            .as_i64()
            .filter(|c| *c != 0)?;
        let name = text(&status["name"]);
        let listed = values.contains(&code);
        let hit = match operator {
            "In" => listed,
            "NotIn" => !listed,
            _ => false,
        };
        (hit && named.is_none_or(|n| n == name)).then_some((name, code))
    })
}

/// `matchOnPodConditions`: the type of the first pod condition a pattern matches.
fn condition_match(pod: &Value, patterns: &Value) -> Option<String> {
    let patterns = patterns.as_array()?;
    let conditions = pod["status"]["conditions"].as_array()?;
    conditions.iter().find_map(|c| {
        let hit = patterns
            .iter()
            .any(|p| p["type"] == c["type"] && p["status"] == c["status"]);
        hit.then(|| text(&c["type"]))
    })
}

/// Whether a failure counts toward the backoff limits: no `Ignore` rule matched first.
fn counts_failure(job: &Value, pod: &Value) -> bool {
    match_policy(job, pod).is_none_or(|(action, _)| action != "Ignore")
}

/// `isIndexFailed`: a `FailIndex` rule matched first, or a counted failure with as many failures
/// before it in its index as `backoffLimitPerIndex`.
fn index_failed(job: &Value, pod: &Value) -> bool {
    if !pod_failed(job, pod) {
        return false;
    }
    if match_policy(job, pod).is_some_and(|(action, _)| action == "FailIndex") {
        return true;
    }
    let limit = per_index(job).unwrap_or(u64::MAX);
    counts_failure(job, pod) && annotation(pod, FAILURES) >= limit
}

// Small readings of Jobs and their pods.

/// `isPodFailed`: Failed, or (unless only failed pods are replaced) deleted before it succeeded.
fn pod_failed(job: &Value, pod: &Value) -> bool {
    phase(pod) == "Failed"
        || (!only_replace_failed(job) && deleting(pod) && phase(pod) != "Succeeded")
}

/// `onlyReplaceFailedPods`: with a podFailurePolicy or `podReplacementPolicy: Failed`, a pod
/// being deleted is replaced only once it has failed.
fn only_replace_failed(job: &Value) -> bool {
    job["spec"]["podFailurePolicy"].is_object() || job["spec"]["podReplacementPolicy"] == "Failed"
}

fn active(pod: &Value) -> bool {
    !ended(pod) && !deleting(pod)
}

fn terminating(pod: &Value) -> bool {
    !ended(pod) && deleting(pod)
}

fn count(view: &JobView, which: fn(&Value) -> bool) -> usize {
    view.pods.iter().filter(|(_, p)| which(p)).count()
}

fn tracked(pod: &Value) -> bool {
    let finalizers = pod["metadata"]["finalizers"].as_array();
    finalizers.is_some_and(|f| f.iter().any(|f| f == TRACKING))
}

fn indexed(job: &Value) -> bool {
    job["spec"]["completionMode"] == "Indexed"
}

fn per_index(job: &Value) -> Option<u64> {
    job["spec"]["backoffLimitPerIndex"]
        .as_u64()
        .filter(|_| indexed(job))
}

fn completions(job: &Value) -> Option<u64> {
    job["spec"]["completions"].as_u64()
}

/// A pod's completion index, if valid for its Job.
fn index_of(job: &Value, pod: &Value) -> Option<u64> {
    let i = pod["metadata"]["annotations"][INDEX]
        .as_str()?
        .parse()
        .ok()?;
    (i < completions(job).unwrap_or(1)).then_some(i)
}

fn active_indexes(view: &JobView) -> BTreeSet<u64> {
    let pods = view.pods.iter().filter(|(_, p)| active(p));
    pods.filter_map(|(_, p)| index_of(view.job, p)).collect()
}

/// Failures of a pod's index before it, counted and ignored (`getIndexAbsoluteFailureCount`).
fn index_failures(pod: &Value) -> u64 {
    annotation(pod, FAILURES) + annotation(pod, IGNORED)
}

fn annotation(pod: &Value, name: &str) -> u64 {
    let value = pod["metadata"]["annotations"][name].as_str();
    value.and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// When a pod finished (`getFinishedTime`): its containers' last end, else its deletion less its
/// grace period, else its creation.
fn finished_time(pod: &Value) -> u64 {
    let statuses = pod["status"]["containerStatuses"].as_array();
    let ends: Option<Vec<u64>> = statuses.filter(|s| !s.is_empty()).and_then(|s| {
        s.iter()
            .map(|c| {
                c["state"]["terminated"]["finishedAt"]
                    .as_str()
                    .and_then(epoch)
            })
            .collect()
    });
    if let Some(last) = ends.and_then(|e| e.into_iter().max()) {
        return last;
    }
    let meta = &pod["metadata"];
    let grace = meta["deletionGracePeriodSeconds"].as_u64().unwrap_or(0);
    let deleted = meta["deletionTimestamp"]
        .as_str()
        .and_then(epoch)
        .map(|t| t.saturating_sub(grace));
    deleted
        .or_else(|| meta["creationTimestamp"].as_str().and_then(epoch))
        .unwrap_or(0)
}

fn controller_uid(pod: &Value) -> Value {
    let owners = pod["metadata"]["ownerReferences"].as_array();
    let owner = owners.and_then(|o| {
        o.iter()
            .find(|r| r["controller"] == true && r["kind"] == "Job")
    });
    owner.map_or(Value::Null, |r| r["uid"].clone())
}

fn job_condition(job: &Value, kind: &str) -> Option<Value> {
    job_condition_in(&job["status"], kind)
}

fn job_condition_in(status: &Value, kind: &str) -> Option<Value> {
    let conditions = status["conditions"].as_array()?;
    conditions
        .iter()
        .find(|c| c["type"] == kind && c["status"] == "True")
        .cloned()
}

fn finished_at(job: &Value) -> Option<u64> {
    let done = job_condition(job, "Complete").or_else(|| job_condition(job, "Failed"))?;
    epoch(done["lastTransitionTime"].as_str()?)
}

/// Indexes as the API writes them: ascending, runs of three or more as `first-last`
/// (`orderedIntervals.String`).
fn format_indexes(indexes: &BTreeSet<u64>) -> String {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &i in indexes {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == i => *last = i,
            _ => runs.push((i, i)),
        }
    }
    let run = |(first, last): (u64, u64)| match last - first {
        0 => first.to_string(),
        1 => format!("{first},{last}"),
        _ => format!("{first}-{last}"),
    };
    runs.into_iter().map(run).collect::<Vec<_>>().join(",")
}

fn parse_indexes(text: &str) -> BTreeSet<u64> {
    let runs = text.split(',').filter(|r| !r.is_empty());
    runs.flat_map(|run| {
        let (first, last) = run.split_once('-').unwrap_or((run, run));
        let (first, last) = (first.parse().unwrap_or(1), last.parse().unwrap_or(0));
        first..=last
    })
    .collect()
}

// ---------------------------------------------------------------------------------------------
// Events.

/// Who records an Event: its component, the kubelet's node, the container it is about.
#[derive(Clone, Copy)]
struct Source<'a> {
    component: &'a str,
    host: Option<&'a str>,
    container: Option<&'a str>,
}

const JOB_CONTROLLER: Source<'static> = Source::of("job-controller");

impl<'a> Source<'a> {
    const fn of(component: &'a str) -> Source<'a> {
        Source {
            component,
            host: None,
            container: None,
        }
    }

    /// The kubelet of `pod`'s node, about its container `container`.
    fn kubelet(pod: &'a Value, container: Option<&'a str>) -> Source<'a> {
        Source {
            component: "kubelet",
            host: pod["spec"]["nodeName"].as_str(),
            container,
        }
    }
}

/// An Event's type, reason and message.
type Note<'a> = (&'a str, &'a str, &'a str);

/// An Event on `object`, aggregated as the event recorder does: the same again from the same
/// source bumps the last one's `count` and `lastTimestamp`; so does any `FailedCreate`, whose
/// message then is the latest.
fn record(store: &mut Store, object: &Value, from: &Source, (kind, reason, message): Note) {
    let mut involved = json!({"apiVersion": object["apiVersion"], "kind": object["kind"],
        "name": object["metadata"]["name"], "namespace": object["metadata"]["namespace"],
        "uid": object["metadata"]["uid"]});
    if let Some(container) = from.container {
        involved["fieldPath"] = json!(format!("spec.containers{{{container}}}"));
    }
    let events = kind_of("events").unwrap();
    let same = store.objects.iter().find(|((p, _, _), e)| {
        *p == "events"
            && e["involvedObject"] == involved
            && e["reason"] == reason
            && e["source"]["component"] == from.component
            && (e["message"] == message || reason == "FailedCreate")
    });
    if let Some((_, event)) = same {
        let mut event = event.clone();
        event["count"] = json!(event["count"].as_u64().unwrap_or(1) + 1);
        event["message"] = json!(message);
        event["lastTimestamp"] = json!(now_rfc3339());
        store.put(events, event);
        return;
    }
    let mut source = json!({"component": from.component});
    if let Some(host) = from.host {
        source["host"] = json!(host);
    }
    let event = json!({
        "metadata": {"generateName": format!("{}.", text(&object["metadata"]["name"]))},
        "involvedObject": involved, "reason": reason, "message": message, "type": kind,
        "count": 1, "source": source, "reportingComponent": from.component,
        "firstTimestamp": now_rfc3339(), "lastTimestamp": now_rfc3339(),
    });
    let namespace = text(&object["metadata"]["namespace"]);
    let _ = store.create(events, &namespace, event);
}

// ---------------------------------------------------------------------------------------------
// Nodes, the scheduler, the autoscaler, PodGC.

fn node_key(name: &str) -> Key {
    ("nodes", String::new(), name.to_string())
}

/// Node objects for the cluster's nodes, Ready, with their pod capacity; one that left goes.
/// `spec.unschedulable` (a cordon) is the API's to set.
fn node_controller(store: &mut Store, spec: &ClusterSpec) {
    let kind = kind_of("nodes").unwrap();
    let names = spec.node_names();
    for name in &names {
        let status = node_status(name, spec.capacity);
        match store.objects.get(&node_key(name)).cloned() {
            None => {
                let node = json!({"metadata": {"name": name,
                    "labels": {"kubernetes.io/hostname": name}}, "spec": {}, "status": status});
                let _ = store.create(kind, "", node);
            }
            Some(mut node) if node["status"] != status => {
                node["status"] = status;
                store.put(kind, node);
            }
            Some(_) => {}
        }
    }
    for (key, _) in store.all("nodes") {
        if !names.contains(&key.2) {
            store.remove(kind, &key);
        }
    }
}

fn node_status(name: &str, capacity: usize) -> Value {
    let resources = json!({"pods": capacity.to_string()});
    json!({"capacity": resources, "allocatable": resources,
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "kubelet is posting ready status"}],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": name}]})
}

/// Whether node `name` is cordoned.
fn cordoned(store: &Store, name: &str) -> bool {
    store
        .objects
        .get(&node_key(name))
        .is_some_and(|n| n["spec"]["unschedulable"] == true)
}

/// Binds pending pods, oldest first, to the least loaded node with room that is not cordoned;
/// marks the rest `Unschedulable` with the scheduler's message (`FitError`: each node's reason,
/// counted). The pods left waiting for room (not for a claim).
fn scheduler(store: &mut Store, spec: &ClusterSpec) -> Vec<Key> {
    let nodes = spec.node_names();
    let pods = store.all("pods");
    let mut load: Vec<usize> = nodes
        .iter()
        .map(|n| {
            pods.iter()
                .filter(|(_, p)| p["spec"]["nodeName"] == n.as_str() && !ended(p))
                .count()
        })
        .collect();
    let closed: Vec<bool> = nodes.iter().map(|n| cordoned(store, n)).collect();
    let mut waiting: Vec<(Key, Value)> = pods
        .into_iter()
        .filter(|(_, p)| !p["spec"]["nodeName"].is_string() && !ended(p) && !deleting(p))
        .collect();
    // Oldest first: uids are handed out in order.
    waiting.sort_by_key(|(_, p)| text(&p["metadata"]["uid"]));
    let mut short = Vec::new();
    for (key, pod) in waiting {
        let free = |i: &usize| !closed[*i] && load[*i] < spec.capacity;
        let status = if let Some(why) = claim_problem(store, &key.1, &pod) {
            let n = nodes.len();
            unschedulable(
                n,
                &[(n, why)],
                &[(n, "Preemption is not helpful for scheduling")],
            )
        } else if let Some(i) = (0..nodes.len()).filter(free).min_by_key(|i| load[*i]) {
            load[i] += 1;
            bind(store, &key, &nodes[i]);
            continue;
        } else {
            short.push(key.clone());
            no_room(&closed)
        };
        set_status(store, &key, status);
    }
    short
}

/// The pod bound to `node`, `PodScheduled`.
fn bind(store: &mut Store, key: &Key, node: &str) {
    let Some(mut pod) = store.objects.get(key).cloned() else {
        return;
    };
    pod["spec"]["nodeName"] = json!(node);
    let scheduled =
        json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": now_rfc3339()});
    pod["status"]["conditions"] = with_condition(&pod["status"]["conditions"], scheduled);
    store.put(kind_of("pods").unwrap(), pod);
}

/// The message for a pod no node has room for: cordoned nodes are unschedulable, the others full.
fn no_room(closed: &[bool]) -> Value {
    let n = closed.len();
    let cordoned = closed.iter().filter(|c| **c).count();
    let reasons = [
        (cordoned, "node(s) were unschedulable"),
        (n - cordoned, "Insufficient cpu"),
    ];
    let preemption = [
        (cordoned, "Preemption is not helpful for scheduling"),
        (n - cordoned, "No preemption victims found for incoming pod"),
    ];
    unschedulable(n, &reasons, &preemption)
}

/// A pending pod's status as the scheduler leaves it: `PodScheduled=False`, `Unschedulable`,
/// `0/N nodes are available: <count reason, …>. preemption: 0/N nodes are available: …`.
fn unschedulable<S: AsRef<str>>(
    n: usize,
    reasons: &[(usize, S)],
    preemption: &[(usize, &str)],
) -> Value {
    let histogram = |counted: Vec<(usize, &str)>| {
        let mut parts: Vec<String> = counted
            .into_iter()
            .filter(|(c, _)| *c > 0)
            .map(|(c, r)| format!("{c} {r}"))
            .collect();
        parts.sort();
        parts.join(", ")
    };
    let reasons = histogram(reasons.iter().map(|(c, r)| (*c, r.as_ref())).collect());
    let preemption = histogram(preemption.to_vec());
    let message = format!("0/{n} nodes are available: {reasons}. preemption: 0/{n} nodes are available: {preemption}.");
    json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
        "reason": "Unschedulable", "message": message, "lastTransitionTime": now_rfc3339()}]})
}

/// The node group the autoscaler grows (any name: the message shows it).
const NODE_GROUP: &str = "fake-node-group";

/// The Cluster Autoscaler: pods waiting for room make it grow the node group by one node, up to
/// `max_nodes`, each pod told by a `TriggeredScaleUp` Event; the node joins `delay` later
/// ([`join_nodes`]). One scale-up at a time.
fn autoscaler(
    store: &mut Store,
    spec: &ClusterSpec,
    short: &[Key],
    scale_up: &mut Option<Instant>,
) {
    let Some(auto) = spec.autoscaler else {
        return;
    };
    let nodes = spec.nodes.max(1);
    if short.is_empty() || scale_up.is_some() || nodes >= auto.max_nodes {
        return;
    }
    *scale_up = Some(Instant::now() + auto.delay);
    // processors/status/eventing_scale_up_processor.go, ScaleUpInfo's `{group from->to (max: n)}`.
    let message = format!(
        "pod triggered scale-up: [{{{NODE_GROUP} {nodes}->{} (max: {})}}]",
        nodes + 1,
        auto.max_nodes
    );
    for key in short {
        if let Some(pod) = store.objects.get(key).cloned() {
            let note = ("Normal", "TriggeredScaleUp", message.as_str());
            record(store, &pod, &Source::of("cluster-autoscaler"), note);
        }
    }
}

/// The node the autoscaler added, once it has joined.
fn join_nodes(inner: &Inner, scale_up: &mut Option<Instant>) {
    if scale_up.is_some_and(|at| Instant::now() >= at) {
        *scale_up = None;
        let mut spec = inner.spec.lock().unwrap();
        spec.nodes = spec.nodes.max(1) + 1;
    }
}

/// How long PodGC waits before it takes a node for gone (`quarantineTime`).
const NODE_QUARANTINE: Duration = Duration::from_secs(40);

/// PodGC (`pkg/controller/podgc/gc_controller.go`): a pod being deleted that was never scheduled
/// is failed (no condition) and deleted at once (`gcUnscheduledTerminating`); a pod on a node
/// gone for [`NODE_QUARANTINE`] is failed with `DisruptionTarget` `DeletionByPodGC` and deleted
/// at once (`gcOrphaned`).
fn pod_gc(store: &mut Store, spec: &ClusterSpec, gone: &mut HashMap<String, Instant>) {
    let nodes = spec.node_names();
    gone.retain(|node, _| !nodes.contains(node));
    for (key, pod) in store.all("pods") {
        match pod["spec"]["nodeName"].as_str() {
            None if deleting(&pod) => force_fail(store, &key, None),
            Some(node) if !nodes.iter().any(|n| n == node) => {
                let since = *gone.entry(node.to_string()).or_insert_with(Instant::now);
                if since.elapsed() >= NODE_QUARANTINE {
                    let condition = disruption("DeletionByPodGC", "PodGC: node no longer exists");
                    force_fail(store, &key, Some(condition));
                }
            }
            _ => {}
        }
    }
}

/// `markFailedAndDeletePodWithCondition`: Failed (with `condition`) unless it ended, then
/// deleted with no grace period.
fn force_fail(store: &mut Store, key: &Key, condition: Option<Value>) {
    let Some(mut pod) = store.objects.get(key).cloned() else {
        return;
    };
    if !ended(&pod) {
        pod["status"]["phase"] = json!("Failed");
        if let Some(condition) = condition {
            pod["status"]["conditions"] = with_condition(&pod["status"]["conditions"], condition);
        }
        store.put(kind_of("pods").unwrap(), pod);
    }
    store.delete(kind_of("pods").unwrap(), key, false, Some(0));
}

// ---------------------------------------------------------------------------------------------
// DaemonSets, claims, snapshots.

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

// ---------------------------------------------------------------------------------------------
// The kubelet.

/// What the kubelet does outside the store's lock: containers to start and to stop.
#[derive(Default)]
struct Plan {
    start: Vec<(Key, Value, Inputs)>,
    stop: Vec<Stop>,
}

/// A container to stop: SIGTERM, then SIGKILL after `grace`; `evicted` with the eviction
/// manager's message when its kubelet evicts the pod (which then fails in place).
struct Stop {
    uid: String,
    grace: Duration,
    evicted: Option<String>,
}

/// The kubelet's record of a pod it has not started yet.
#[derive(Default)]
struct Attempts {
    /// When it syncs the pod again.
    next_sync: Option<Instant>,
    /// Image → pull failures in a row, and when the last was (the image backoff).
    pulls: HashMap<String, (u32, Instant)>,
    /// Mount failures in a row.
    mounts: u32,
    /// A start error the kubelet never retries (`InvalidImageName`, `ErrImageNeverPull`).
    stuck: bool,
}

/// The image pull backoff (`pkg/kubelet/kubelet.go`: `backOffPeriod` 10 s, `MaxContainerBackOff`
/// 300 s): a failed pull is not tried again before it has passed.
const IMAGE_BACKOFF: (Duration, Duration) = (Duration::from_secs(10), Duration::from_secs(300));
/// A failed mount's retries (`pkg/util/goroutinemap/exponentialbackoff`: 500 ms doubling to
/// 2 min 2 s).
const MOUNT_BACKOFF: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(122));
/// How soon the kubelet syncs a pod again after a start error (the fake's choice: often enough
/// to show `ImagePullBackOff` between pulls) and after a config error (the pod worker's ~10 s).
const IMAGE_RESYNC: Duration = Duration::from_secs(1);
const CONFIG_RESYNC: Duration = Duration::from_secs(10);

/// The node-pressure eviction's message (`pkg/kubelet/eviction/helpers.go`: `nodeLowMessageFmt`
/// then `thresholdMetMessageFmt`, for the default hard threshold `memory.available<100Mi`).
const EVICTION_MESSAGE: &str =
    "The node was low on resource: memory. Threshold quantity: 100Mi, available: 51200Ki. ";

/// The kubelets of every node: containers to stop (their pod deleted, gone, or evicted by its
/// kubelet) and pods to start; a pod that cannot start yet gets its waiting state, and Events.
fn kubelet(store: &mut Store, spec: &ClusterSpec, memory: &mut Memory) -> Plan {
    let nodes = spec.node_names();
    let mut plan = Plan {
        stop: orphans(store, &nodes, &memory.containers),
        ..Plan::default()
    };
    let pods = store.all("pods").into_iter();
    let pods: Vec<(Key, Value)> = pods
        .filter(|(_, p)| on_node(p, &nodes) && !ended(p))
        .collect();
    let live: HashSet<String> = pods.iter().map(|(_, p)| uid_of(p)).collect();
    memory.attempts.retain(|uid, _| live.contains(uid));
    for (key, pod) in &pods {
        let uid = uid_of(pod);
        match memory.containers.get(&uid) {
            Some(c) => plan.stop.extend(to_stop(pod, c)),
            None => {
                let attempts = memory.attempts.entry(uid).or_default();
                plan.start
                    .extend(sync_idle(store, spec, key, pod, attempts));
            }
        }
    }
    plan
}

fn on_node(pod: &Value, nodes: &[String]) -> bool {
    pod["spec"]["nodeName"]
        .as_str()
        .is_some_and(|n| nodes.iter().any(|m| m == n))
}

/// Containers whose pod is gone (or is another now), or whose node is: killed.
fn orphans(store: &Store, nodes: &[String], containers: &HashMap<String, Container>) -> Vec<Stop> {
    let kept = |uid: &str, c: &Container| {
        let pod = store.objects.get(&c.key);
        pod.is_some_and(|p| uid_of(p) == uid && on_node(p, nodes))
    };
    containers
        .iter()
        .filter(|(uid, c)| !kept(uid, c))
        .map(|(uid, _)| Stop {
            uid: uid.clone(),
            grace: Duration::ZERO,
            evicted: None,
        })
        .collect()
}

/// A running pod's container to stop: its pod deleted (its deletion grace period), or evicted
/// by its kubelet (its own grace period: a soft eviction threshold whose maximum grace period is
/// no shorter, `pod_workers.go` `calculateEffectiveGracePeriod` keeping the shorter).
fn to_stop(pod: &Value, c: &Container) -> Option<Stop> {
    let uid = uid_of(pod);
    let seconds = |s: Option<u64>| Duration::from_secs(s.unwrap_or(30));
    if deleting(pod) {
        let grace = seconds(pod["metadata"]["deletionGracePeriodSeconds"].as_u64());
        return Some(Stop {
            uid,
            grace,
            evicted: None,
        });
    }
    let message = kubelet_eviction(pod).filter(|_| c.evicted.is_none())?;
    let grace = seconds(pod["spec"]["terminationGracePeriodSeconds"].as_u64());
    Some(Stop {
        uid,
        grace,
        evicted: Some(message),
    })
}

/// The message of a node-pressure eviction the pod's kubelet has begun.
fn kubelet_eviction(pod: &Value) -> Option<String> {
    let conditions = pod["status"]["conditions"].as_array()?;
    let evicted = conditions.iter().find(|c| {
        c["type"] == "DisruptionTarget"
            && c["status"] == "True"
            && c["reason"] == "TerminationByKubelet"
    });
    evicted.map(|c| text(&c["message"]))
}

/// A pod with no container running: deleted (so it ends, never started), evicted (so it fails in
/// place), or still Pending: started if nothing stops it.
fn sync_idle(
    store: &mut Store,
    spec: &ClusterSpec,
    key: &Key,
    pod: &Value,
    attempts: &mut Attempts,
) -> Option<(Key, Value, Inputs)> {
    if deleting(pod) {
        set_status(store, key, never_ran(pod));
        final_delete(store, key);
        return None;
    }
    if let Some(message) = kubelet_eviction(pod) {
        set_status(store, key, evicted(never_ran(pod), &message));
        return None;
    }
    if phase(pod) != "Pending" {
        return None;
    }
    match pending(store, spec, pod, attempts)? {
        Ok(inputs) => Some((key.clone(), pod.clone(), inputs)),
        Err(waiting) => {
            set_status(store, key, pending_status(pod, &waiting));
            None
        }
    }
}

/// The kubelet's final delete of a pod it has finished with: no grace period left, so the pod
/// goes once no finalizer holds it.
fn final_delete(store: &mut Store, key: &Key) {
    if let Some(mut pod) = store.objects.get(key).cloned() {
        pod["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        store.put(kind_of("pods").unwrap(), pod);
    }
}

/// A pod that ended before its container ran: Failed, each container's state unknown, as the
/// kubelet reports containers it cannot find (137, `ContainerStatusUnknown`).
fn never_ran(pod: &Value) -> Value {
    let state = json!({"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown",
        "message": "The container could not be located when the pod was terminated",
        "finishedAt": now_rfc3339()}});
    let states = vec![state; containers(pod).len()];
    json!({"phase": "Failed", "conditions": conditions(false),
        "containerStatuses": container_statuses(pod, &states, false)})
}

/// An ended pod's status as the eviction manager leaves it: Failed, reason `Evicted`.
fn evicted(mut status: Value, message: &str) -> Value {
    status["phase"] = json!("Failed");
    status["reason"] = json!("Evicted");
    status["message"] = json!(message);
    status
}

/// A Pending pod's sync, if due: its volumes mounted, then each container's image and config
/// (`SyncPod`: volumes first, then per container `EnsureImageExists`, then the config). The
/// inputs to start it with, or each container's waiting state (`None`: `ContainerCreating`).
fn pending(
    store: &mut Store,
    spec: &ClusterSpec,
    pod: &Value,
    attempts: &mut Attempts,
) -> Option<Result<Inputs, Vec<Option<Value>>>> {
    let now = Instant::now();
    if attempts.stuck || attempts.next_sync.is_some_and(|at| now < at) {
        return None;
    }
    if let Some((volume, why)) = missing_volume(store, pod) {
        mount_failed(store, pod, attempts, &volume, &why);
        return Some(Err(vec![None; containers(pod).len()]));
    }
    attempts.mounts = 0;
    let waiting = containers_waiting(store, spec, pod, attempts);
    if waiting.iter().all(Option::is_none) {
        return Some(Ok(inputs(store, pod)));
    }
    resync(attempts, &waiting);
    Some(Err(waiting))
}

/// A ConfigMap or Secret volume whose object is missing (and not optional): the volume's name,
/// and the volume plugin's error.
fn missing_volume(store: &Store, pod: &Value) -> Option<(String, String)> {
    let namespace = text(&pod["metadata"]["namespace"]);
    let volumes = pod["spec"]["volumes"].as_array()?;
    volumes.iter().find_map(|v| {
        let (plural, singular, source) = match (v["configMap"].is_object(), v["secret"].is_object())
        {
            (true, _) => ("configmaps", "configmap", &v["configMap"]),
            (_, true) => ("secrets", "secret", &v["secret"]),
            _ => return None,
        };
        let name = source["name"].as_str().or(source["secretName"].as_str())?;
        let missing = !store
            .objects
            .contains_key(&(plural, namespace.clone(), name.to_string()));
        (missing && source["optional"] != true)
            .then(|| (text(&v["name"]), format!("{singular} \"{name}\" not found")))
    })
}

/// A failed mount: a Warning `FailedMount` Event from the kubelet, retried with backoff, the
/// containers `ContainerCreating` meanwhile.
fn mount_failed(store: &mut Store, pod: &Value, attempts: &mut Attempts, volume: &str, why: &str) {
    attempts.mounts += 1;
    attempts.next_sync = Some(Instant::now() + backoff(MOUNT_BACKOFF, attempts.mounts));
    let message = format!("MountVolume.SetUp failed for volume \"{volume}\" : {why}");
    record(
        store,
        pod,
        &Source::kubelet(pod, None),
        ("Warning", "FailedMount", &message),
    );
}

/// Each container's waiting state, if its image or its config stops it.
fn containers_waiting(
    store: &mut Store,
    spec: &ClusterSpec,
    pod: &Value,
    attempts: &mut Attempts,
) -> Vec<Option<Value>> {
    let containers = containers(pod);
    let check = |c: &Value, store: &mut Store, attempts: &mut Attempts| {
        image_waiting(store, spec, pod, c, attempts)
            .or_else(|| config_waiting(store, pod, c))
            .or_else(|| runtime_waiting(store, spec, pod, c))
    };
    containers
        .iter()
        .map(|c| check(c, store, attempts))
        .collect()
}

/// When to sync again after start errors; never after one the kubelet does not retry.
fn resync(attempts: &mut Attempts, waiting: &[Option<Value>]) {
    let reasons: Vec<String> = waiting
        .iter()
        .flatten()
        .map(|w| text(&w["reason"]))
        .collect();
    let stuck = ["InvalidImageName", "ErrImageNeverPull"];
    attempts.stuck = reasons.iter().any(|r| stuck.contains(&r.as_str()));
    let create = ["CreateContainerConfigError", "CreateContainerError"];
    let config_only = reasons.iter().all(|r| create.contains(&r.as_str()));
    let wait = if config_only {
        CONFIG_RESYNC
    } else {
        IMAGE_RESYNC
    };
    attempts.next_sync = Some(Instant::now() + wait);
}

/// The image step (`pkg/kubelet/images/image_manager.go` `EnsureImageExists`): a reference that
/// does not parse is `InvalidImageName`; a missing image under `imagePullPolicy: Never`
/// `ErrImageNeverPull`; within the backoff after a failed pull `ImagePullBackOff`; else it is
/// pulled, which fails for an image in `missing_images` (`ErrImagePull`, the runtime's error).
fn image_waiting(
    store: &mut Store,
    spec: &ClusterSpec,
    pod: &Value,
    container: &Value,
    attempts: &mut Attempts,
) -> Option<Value> {
    let image = text(&container["image"]);
    let from = Source::kubelet(pod, container["name"].as_str());
    let reference = match image_reference(&image) {
        Ok(reference) => reference,
        Err(why) => {
            let message = format!("Failed to apply default image tag \"{image}\": {why}");
            let note = ("Warning", "InspectFailed", message.as_str());
            return Some(image_error(store, pod, &from, note, "InvalidImageName"));
        }
    };
    let missing = spec.missing_images.contains(&image);
    if container["imagePullPolicy"] == "Never" {
        let message =
            format!("Container image \"{image}\" is not present with pull policy of Never");
        let note = ("Warning", "ErrImageNeverPull", message.as_str());
        return missing.then(|| image_error(store, pod, &from, note, "ErrImageNeverPull"));
    }
    let pulls = attempts.pulls.get(&image).copied();
    if pulls.is_some_and(|(n, last)| last.elapsed() < backoff(IMAGE_BACKOFF, n)) {
        let message = format!("Back-off pulling image \"{image}\"");
        let note = ("Normal", "BackOff", message.as_str());
        return Some(image_error(store, pod, &from, note, "ImagePullBackOff"));
    }
    if !missing {
        attempts.pulls.remove(&image);
        return None;
    }
    let failures = pulls.map_or(0, |(n, _)| n);
    attempts
        .pulls
        .insert(image.clone(), (failures + 1, Instant::now()));
    Some(pull_failed(store, pod, &from, &image, &reference))
}

/// An image the kubelet will not run: its Event, then the start error of `reason` with the same
/// message.
fn image_error(store: &mut Store, pod: &Value, from: &Source, note: Note, reason: &str) -> Value {
    record(store, pod, from, note);
    start_error(store, pod, from, reason, note.2)
}

/// A pull of an image the registry does not have: the Events, and `ErrImagePull` with the
/// runtime's error (containerd's form, through the CRI's gRPC status).
fn pull_failed(
    store: &mut Store,
    pod: &Value,
    from: &Source,
    image: &str,
    reference: &str,
) -> Value {
    record(
        store,
        pod,
        from,
        ("Normal", "Pulling", &format!("Pulling image \"{image}\"")),
    );
    let error = format!(
        "rpc error: code = NotFound desc = failed to pull and unpack image \"{reference}\": failed to resolve reference \"{reference}\": {reference}: not found"
    );
    let message = format!("Failed to pull image \"{image}\": {error}");
    record(store, pod, from, ("Warning", "Failed", &message));
    start_error(store, pod, from, "ErrImagePull", &error)
}

/// A container that does not start for `reason`: the kubelet's Warning `Failed` Event
/// (`Error: <reason>`, `kuberuntime_container.go` `startContainer`) and its waiting state.
fn start_error(
    store: &mut Store,
    pod: &Value,
    from: &Source,
    reason: &str,
    message: &str,
) -> Value {
    record(
        store,
        pod,
        from,
        ("Warning", "Failed", &format!("Error: {reason}")),
    );
    json!({"reason": reason, "message": message})
}

/// The config step: env from a Secret or ConfigMap missing, or without the key, is
/// `CreateContainerConfigError` with that error, and a Warning `Failed` `Error: <error>`.
fn config_waiting(store: &mut Store, pod: &Value, container: &Value) -> Option<Value> {
    let why = container_env(store, pod, container).err()?;
    Some(create_failed(
        store,
        pod,
        container,
        "CreateContainerConfigError",
        &why,
    ))
}

/// A container the kubelet could not create for `reason`: the Warning `Failed` `Error: <why>`
/// (`startContainer`), and its waiting state.
fn create_failed(
    store: &mut Store,
    pod: &Value,
    container: &Value,
    reason: &str,
    why: &str,
) -> Value {
    let from = Source::kubelet(pod, container["name"].as_str());
    record(
        store,
        pod,
        &from,
        ("Warning", "Failed", &format!("Error: {why}")),
    );
    json!({"reason": reason, "message": why})
}

/// The runtime step: a `CreateContainer` the runtime fails is `CreateContainerError` with the
/// runtime's message, and a Warning `Failed` `Error: <message>`.
fn runtime_waiting(
    store: &mut Store,
    spec: &ClusterSpec,
    pod: &Value,
    container: &Value,
) -> Option<Value> {
    let why = spec.runtime_error.as_ref()?;
    Some(create_failed(
        store,
        pod,
        container,
        "CreateContainerError",
        why,
    ))
}

/// What a container is given from the API: its environment, and the files of its ConfigMap
/// and Secret volumes (volume name → file → content).
struct Inputs {
    env: Vec<(String, String)>,
    files: BTreeMap<String, BTreeMap<String, String>>,
}

/// The inputs of `pod`'s container (its first: the one that runs).
fn inputs(store: &Store, pod: &Value) -> Inputs {
    let container = &pod["spec"]["containers"][0];
    let namespace = text(&pod["metadata"]["namespace"]);
    let volumes = pod["spec"]["volumes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let files = volumes.iter().filter_map(|v| {
        let (plural, name) = match v["configMap"]["name"].as_str() {
            Some(name) => ("configmaps", name),
            None => ("secrets", v["secret"]["secretName"].as_str()?),
        };
        let object = store
            .objects
            .get(&(plural, namespace.clone(), name.to_string()));
        Some((text(&v["name"]), object.map(data_of).unwrap_or_default()))
    });
    Inputs {
        env: container_env(store, pod, container).unwrap_or_default(),
        files: files.collect(),
    }
}

/// A ConfigMap's or Secret's data as text (a Secret's `data` decoded: the API server merged its
/// `stringData` in).
fn data_of(object: &Value) -> BTreeMap<String, String> {
    let secret = object["kind"] == "Secret";
    let decode = |v: &str| {
        if secret {
            base64_decode(v)
        } else {
            Some(v.to_string())
        }
    };
    let data = object["data"].as_object().into_iter().flatten();
    let data = data.map(|(k, v)| {
        (
            k.clone(),
            decode(v.as_str().unwrap_or("")).unwrap_or_default(),
        )
    });
    data.collect()
}

/// The image's env, then the container's, then `HOSTNAME`; the first reference that cannot be
/// resolved is the kubelet's error (`kubelet_pods.go` `makeEnvironmentVariables`).
fn container_env(
    store: &Store,
    pod: &Value,
    container: &Value,
) -> Result<Vec<(String, String)>, String> {
    let mut env: Vec<(String, String)> = image().env;
    for var in container["env"].as_array().into_iter().flatten() {
        let name = text(&var["name"]);
        if let Some(value) = env_value(store, pod, var)? {
            env.retain(|(n, _)| *n != name);
            env.push((name, value));
        }
    }
    env.push(("HOSTNAME".into(), text(&pod["metadata"]["name"])));
    Ok(env)
}

/// The references an env var's value may come from, with the kind each names.
const KEY_REFS: [(&str, ObjectKind); 2] = [
    ("secretKeyRef", ("secrets", "secret", "Secret")),
    ("configMapKeyRef", ("configmaps", "configmap", "ConfigMap")),
];

/// A kind's plural, the singular its errors say, and its name.
type ObjectKind = (&'static str, &'static str, &'static str);

/// One env var's value; `None` for an optional reference to what is missing.
fn env_value(store: &Store, pod: &Value, var: &Value) -> Result<Option<String>, String> {
    let from = &var["valueFrom"];
    if let Some(value) = var["value"].as_str() {
        return Ok(Some(value.to_string()));
    }
    if let Some((field, kind)) = KEY_REFS.iter().find(|(f, _)| from[*f].is_object()) {
        return key_ref(store, pod, &from[*field], *kind);
    }
    let path = from["fieldRef"]["fieldPath"].as_str().unwrap_or("");
    Ok(Some(field_ref(pod, path)))
}

/// A `secretKeyRef` or `configMapKeyRef`: the object missing is its `not found` error, the key
/// missing `couldn't find key <k> in <Kind> <ns>/<name>`.
fn key_ref(
    store: &Store,
    pod: &Value,
    reference: &Value,
    (plural, singular, kind): ObjectKind,
) -> Result<Option<String>, String> {
    let (name, key) = (text(&reference["name"]), text(&reference["key"]));
    let optional = reference["optional"] == true;
    let namespace = text(&pod["metadata"]["namespace"]);
    let Some(object) = store
        .objects
        .get(&(plural, namespace.clone(), name.clone()))
    else {
        return match optional {
            true => Ok(None),
            false => Err(format!("{singular} \"{name}\" not found")),
        };
    };
    match data_of(object).remove(&key) {
        Some(value) => Ok(Some(value)),
        None if optional => Ok(None),
        None => Err(format!(
            "couldn't find key {key} in {kind} {namespace}/{name}"
        )),
    }
}

/// A `fieldRef`: the pod's name, namespace, uid, node, or one of its labels or annotations.
fn field_ref(pod: &Value, path: &str) -> String {
    let keyed = |prefix: &str| path.strip_prefix(prefix).and_then(|k| k.strip_suffix("']"));
    if let Some(label) = keyed("metadata.labels['") {
        return text(&pod["metadata"]["labels"][label]);
    }
    if let Some(annotation) = keyed("metadata.annotations['") {
        return text(&pod["metadata"]["annotations"][annotation]);
    }
    let mut value = pod;
    for part in path.split('.') {
        value = &value[part];
    }
    text(value)
}

/// A reference as the kubelet parses it (`parsers.ParseImageName`, the distribution/reference
/// grammar), normalised as the runtime names it (`docker.io/library/…:latest`); else its error
/// (`couldn't parse image name "<image>": …`).
fn image_reference(image: &str) -> Result<String, String> {
    let error = |why: &str| format!("couldn't parse image name \"{image}\": {why}");
    let hex = image.len() == 64
        && image
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    if hex {
        let why = format!(
            "invalid repository name ({image}), cannot specify 64-byte hexadecimal strings"
        );
        return Err(error(&why));
    }
    let (domain, remainder) = split_domain(image);
    let remote = remainder.split(':').next().unwrap_or("");
    if remote.to_lowercase() != remote {
        let why = format!("invalid reference format: repository name ({remote}) must be lowercase");
        return Err(error(&why));
    }
    let full = format!("{domain}/{remainder}");
    if !valid_reference(&full) {
        return Err(error("invalid reference format"));
    }
    let tagged = remainder.contains(':') || remainder.contains('@');
    Ok(if tagged {
        full
    } else {
        format!("{full}:latest")
    })
}

/// `splitDockerDomain`: the registry (docker.io unless the first component looks like a host)
/// and the rest, `library/` added for an official image.
fn split_domain(image: &str) -> (String, String) {
    let (first, rest) = image.split_once('/').unwrap_or(("", image));
    let host = first.contains(['.', ':']) || first == "localhost" || first.to_lowercase() != first;
    let (domain, remainder) = match image.contains('/') && host {
        true => (first, rest.to_string()),
        false => ("docker.io", image.to_string()),
    };
    let domain = if domain == "index.docker.io" {
        "docker.io"
    } else {
        domain
    };
    match domain == "docker.io" && !remainder.contains('/') {
        true => (domain.to_string(), format!("library/{remainder}")),
        false => (domain.to_string(), remainder),
    }
}

/// Whether `domain/path[:tag][@digest]` follows the reference grammar.
fn valid_reference(full: &str) -> bool {
    let (name, digest) = full
        .split_once('@')
        .map_or((full, None), |(n, d)| (n, Some(d)));
    let (domain, path) = name.split_once('/').unwrap_or(("", name));
    let (path, tag) = match path.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') => (p, Some(t)),
        _ => (path, None),
    };
    let tag_ok = tag.is_none_or(|t| {
        let mut chars = t.chars();
        let first = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        first && t.len() <= 128 && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    });
    let digest_ok = digest.is_none_or(|d| {
        d.split_once(':').is_some_and(|(a, h)| {
            !a.is_empty() && h.len() >= 32 && h.bytes().all(|b| b.is_ascii_hexdigit())
        })
    });
    valid_domain(domain)
        && !path.is_empty()
        && path.split('/').all(valid_component)
        && tag_ok
        && digest_ok
}

fn valid_domain(domain: &str) -> bool {
    let (host, port) = domain
        .split_once(':')
        .map_or((domain, None), |(h, p)| (h, Some(p)));
    let label = |l: &str| {
        !l.is_empty()
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    host.split('.').all(label)
        && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// A path component: lower-case alphanumerics joined by `.`, `_`, `__` or dashes.
fn valid_component(component: &str) -> bool {
    let mut separator = String::new();
    let mut started = false;
    for c in component.chars() {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            let ok = separator.is_empty()
                || matches!(separator.as_str(), "." | "_" | "__")
                || separator.chars().all(|s| s == '-');
            if !ok || (!started && !separator.is_empty()) {
                return false;
            }
            separator.clear();
            started = true;
        } else if "._-".contains(c) {
            separator.push(c);
        } else {
            return false;
        }
    }
    started && separator.is_empty()
}

// ---------------------------------------------------------------------------------------------
// The container runtime.

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
const IMAGE_BINARIES: [&str; 7] = [
    "agent-wrapper",
    "checkout-hook",
    "git-credential-github-app",
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
        files: &inputs.files,
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
        deadline: None,
        evicted: None,
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
    /// ConfigMap and Secret volumes' files, by volume name.
    files: &'a BTreeMap<String, BTreeMap<String, String>>,
}

/// The host path `path` of node `node`: a directory of its own under the cluster's.
fn node_dir(cluster: &Path, node: &str, path: &str) -> PathBuf {
    cluster
        .join(".nodes")
        .join(node)
        .join(path.trim_start_matches('/'))
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
            } else if let Some(files) = sources.files.get(volume["name"].as_str().unwrap_or("")) {
                let dir = self.dir.join("volumes").join(text(&volume["name"]));
                std::fs::create_dir_all(&dir).map_err(io)?;
                for (key, content) in files {
                    std::fs::write(dir.join(key), content).map_err(io)?;
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

/// SIGTERM to PID 1 (once), and SIGKILL `grace` later; a shorter grace period brings that
/// forward, as a second delete may.
fn stop_container(c: &mut Container, grace: Duration, evicted: Option<String>) {
    if c.evicted.is_none() {
        c.evicted = evicted;
    }
    if c.deadline.is_none() {
        if let Some(pid) = init_pid(c) {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    if c.deadline.is_none_or(|at| deadline < at) {
        c.deadline = Some(deadline);
    }
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

/// Each container's status, in the spec's order, with its state; a container that was created
/// has an ID. Only the first container runs: the others are reported in the same state.
fn container_statuses(pod: &Value, states: &[Value], ready: bool) -> Value {
    let uid = uid_of(pod);
    let containers = containers(pod);
    let statuses = containers.iter().zip(states).map(|(c, state)| {
        let mut status = json!({"name": c["name"], "image": c["image"], "imageID": "",
            "ready": ready, "restartCount": 0, "started": ready, "state": state});
        if state["waiting"].is_null() {
            status["containerID"] = json!(format!("fake://{uid}"));
        }
        status
    });
    json!(statuses.collect::<Vec<_>>())
}

fn conditions(ready: bool) -> Value {
    let ready = if ready { "True" } else { "False" };
    let condition = |kind: &str, status: &str| json!({"type": kind, "status": status, "lastTransitionTime": now_rfc3339()});
    json!([
        condition("PodScheduled", "True"),
        condition("Initialized", "True"),
        condition("ContainersReady", ready),
        condition("Ready", ready),
    ])
}

fn running_status(pod: &Value, started_at: &str) -> Value {
    let states = vec![json!({"running": {"startedAt": started_at}}); containers(pod).len()];
    json!({"phase": "Running", "startTime": started_at, "hostIP": "127.0.0.1",
        "podIP": "127.0.0.1", "conditions": conditions(true),
        "containerStatuses": container_statuses(pod, &states, true)})
}

/// A Pending pod's status as its kubelet reports it: `startTime` set, each container waiting,
/// for its own reason or `ContainerCreating`.
fn pending_status(pod: &Value, waiting: &[Option<Value>]) -> Value {
    let creating = json!({"reason": "ContainerCreating"});
    let states: Vec<Value> = waiting
        .iter()
        .map(|w| json!({"waiting": w.clone().unwrap_or_else(|| creating.clone())}))
        .collect();
    json!({"phase": "Pending", "startTime": now_rfc3339(), "hostIP": "127.0.0.1",
        "conditions": conditions(false), "containerStatuses": container_statuses(pod, &states, false)})
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
    let states = vec![state; containers(&c.pod).len()];
    json!({"phase": if code == 0 { "Succeeded" } else { "Failed" }, "startTime": c.started_at,
        "conditions": conditions(false), "containerStatuses": container_statuses(&c.pod, &states, false)})
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

    #[test]
    fn image_references_parse_as_the_kubelet_parses_them() {
        let ok = |image: &str| image_reference(image).unwrap();
        assert_eq!(ok("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(
            ok("registry.example.com:5000/a/b_c:v1.2"),
            "registry.example.com:5000/a/b_c:v1.2"
        );
        assert_eq!(ok("localhost/x"), "localhost/x:latest");
        let why = |image: &str| image_reference(image).unwrap_err();
        let lower = "invalid reference format: repository name (Agent) must be lowercase";
        assert_eq!(
            why("registry.example.com/Agent:1"),
            format!("couldn't parse image name \"registry.example.com/Agent:1\": {lower}")
        );
        for bad in ["", "::", "a..b", "x:", "-x", "x@sha256:12"] {
            let said = why(bad);
            assert!(
                said.ends_with(": invalid reference format"),
                "{bad}: {said}"
            );
        }
        let hex = "a".repeat(64);
        assert!(why(&hex).contains("cannot specify 64-byte hexadecimal strings"));
    }

    #[test]
    fn indexes_read_and_write_in_the_api_form() {
        let set = |v: &[u64]| v.iter().copied().collect::<BTreeSet<u64>>();
        assert_eq!(format_indexes(&set(&[0, 1, 3, 4, 5, 7])), "0,1,3-5,7");
        assert_eq!(parse_indexes("0,1,3-5,7"), set(&[0, 1, 3, 4, 5, 7]));
        assert_eq!(format_indexes(&set(&[])), "");
    }

    #[test]
    fn the_first_matching_rule_decides() {
        let rules = |rules: Value| json!({"spec": {"podFailurePolicy": {"rules": rules}}});
        let ignore = json!({"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]});
        let fail = json!({"action": "FailJob", "onExitCodes": {"containerName": "agent", "operator": "In", "values": [81]}});
        let pod = json!({"metadata": {"namespace": "ci", "name": "p"}, "status": {"phase": "Failed",
            "conditions": [{"type": "DisruptionTarget", "status": "True"}],
            "containerStatuses": [{"name": "agent", "state": {"terminated": {"exitCode": 81}}}]}});
        let first = rules(json!([ignore, fail]));
        assert_eq!(match_policy(&first, &pod).unwrap().0, "Ignore");
        assert!(!counts_failure(&first, &pod));
        let reversed = rules(json!([fail, ignore]));
        let (action, message) = match_policy(&reversed, &pod).unwrap();
        assert_eq!(action, "FailJob");
        assert_eq!(message, "Container agent for pod ci/p failed with exit code 81 matching FailJob rule at index 0");
        let on_condition = rules(
            json!([{"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]),
        );
        let said = match_policy(&on_condition, &pod).unwrap().1;
        assert_eq!(
            said,
            "Pod ci/p has condition DisruptionTarget matching FailJob rule at index 0"
        );
    }

    #[test]
    fn backoffs_double_to_their_cap() {
        let secs = |n| backoff(POD_FAILURE_BACKOFF, n).as_secs();
        assert_eq!(
            (secs(1), secs(2), secs(4), secs(7), secs(40)),
            (10, 20, 80, 600, 600)
        );
        assert_eq!(backoff(API_BACKOFF, 7), Duration::from_secs(60));
    }
}
