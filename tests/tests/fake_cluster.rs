//! The fake cluster behind the fake API server, driven by a real `kubectl` as a user would: a
//! pod really runs and writes to its claim's volume, and a claim deleted while a pod object
//! names it stays Terminating (the pvc-protection finalizer) until that object is gone, finished
//! or not, while a new pod naming it is never scheduled; a snapshot of a claim restores into a
//! new one; Jobs fail past their deadline and go after their TTL. Needs root and `kubectl`;
//! without them it says so and skips.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use stateless_e2e::fake_cluster::{ClusterSpec, FakeCluster};
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

fn scheduling_message(config: &Path, pod: &str) -> String {
    let pod = get(config, &["pod", pod]).unwrap_or_default();
    let conditions = pod["status"]["conditions"].as_array().cloned();
    let scheduled = conditions
        .unwrap_or_default()
        .into_iter()
        .find(|c| c["type"] == "PodScheduled");
    scheduled.map_or(String::new(), |c| {
        c["message"].as_str().unwrap_or("").into()
    })
}

/// A fake API server with a cluster of 4 pods behind it, and `kubectl`'s configuration for it.
struct Setup {
    /// Stops the containers before the files they use go away.
    cluster: FakeCluster,
    config: std::path::PathBuf,
    /// The kubelet's directory: each pod's, and the volumes it provisions.
    pods: std::path::PathBuf,
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

    /// `None` (having said why) where the cluster or `kubectl` cannot run.
    fn new() -> Option<Setup> {
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
        let spec = ClusterSpec {
            capacity: 4,
            ..ClusterSpec::default()
        };
        Some(Setup {
            cluster: FakeCluster::start(&kube, &pods, spec),
            config,
            pods,
            _kube: kube,
            _sandbox: sandbox,
        })
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
    std::thread::sleep(std::time::Duration::from_millis(500));
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
/// kubelet); a finished Job goes `ttlSecondsAfterFinished` later, its pods with it.
#[test]
fn a_job_past_its_deadline_fails_and_a_finished_one_goes_after_its_ttl() {
    let Some(setup) = Setup::new() else {
        return;
    };
    let config = &setup.config;
    let job = |name: &str, script: &str, extra: &str| {
        format!("apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: {name}\nspec:\n{extra}  template:\n    spec:\n      restartPolicy: Never\n      terminationGracePeriodSeconds: 5\n      securityContext: {{runAsUser: 0, runAsGroup: 0}}\n      containers:\n      - name: main\n        image: stateless-agent\n        command: [/bin/sh, -c, '{script}']\n")
    };
    for yaml in [
        job("slow", "sleep 60", "  activeDeadlineSeconds: 2\n"),
        job("quick", "true", "  ttlSecondsAfterFinished: 2\n"),
    ] {
        setup.create(&yaml);
    }
    let condition =
        |name: &str| get(config, &["job", name]).map(|j| j["status"]["conditions"][0].clone());
    wait_for("the quick Job complete", || {
        condition("quick").is_some_and(|c| c["type"] == "Complete")
    });
    let started = std::time::Instant::now();
    wait_for("the quick Job gone after its TTL", || {
        get(config, &["job", "quick"]).is_none()
    });
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    let left = get(config, &["pods", "-l", "job-name=quick"]).unwrap();
    assert_eq!(left["items"].as_array().unwrap().len(), 0, "{left:#}");
    wait_for("the slow Job failed", || {
        condition("slow").is_some_and(|c| c["reason"] == "DeadlineExceeded")
    });
    // Its pod is stopped and removed: its PID 1, a shell, has no SIGTERM handler, so it is the
    // SIGKILL after the 5 s grace period that ends it, as on a node.
    wait_for("the slow Job's pod gone", || {
        get(config, &["pods", "-l", "job-name=slow"])
            .is_some_and(|l| l["items"].as_array().unwrap().is_empty())
    });
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
