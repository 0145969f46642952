//! The quick start of docs/operating.md, as a newcomer runs it: its commands taken from the doc
//! as they are and run with a real `kubectl` against the fake API server and the fake cluster
//! behind it, then a job queued in the fake Buildkite and served end to end.
//!
//! What the test changes, and why:
//! - the install URL's `https://github.com/stateless-agent/stateless-agent` becomes a git copy of
//!   this tree's `image/`, tagged as the URL's `?ref=` says, through kustomize's own remote
//!   loader (`file://…//path?ref=tag`): the same clone and checkout, without the network;
//! - the repository to mirror becomes a loopback server's;
//! - `kubectl apply` and `kubectl create job` get `--validate=false`: the fake serves no OpenAPI;
//!   a wait gets 3 minutes, not 30, so that a failure shows soon;
//! - the Deployment's part is played by the test, since the fake runs no Deployment controller
//!   and a dispatcher cannot run in-cluster here: it makes the replicas' Pod objects from the
//!   Deployment's pod template (bound to a node the fake has not, so no kubelet runs them), runs
//!   each replica's command with the env the Deployment gives it (the settings ConfigMap, the
//!   template ConfigMap's files, `POD_NAME`), a kubeconfig in place of the service account and
//!   the fake Buildkite's endpoint, and reports the Deployment available once one is ready.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use stateless_e2e::dispatch_world::{
    ended, job_env, reports, token_secret, wait, with_endpoint, TOKEN,
};
use stateless_e2e::dispatcher_process::{job_dispatcher, Running};
use stateless_e2e::fake_buildkite::{FakeBuildkite, JobState};
use stateless_e2e::fake_cluster::{ClusterSpec, FakeCluster};
use stateless_e2e::fake_kube::{kustomize_5, FakeKube};
use stateless_e2e::git::git;
use stateless_e2e::loopback::{free_port, http};
use stateless_e2e::scenario::Served;

const NS: &str = "buildkite";
const QUEUE: &str = "kubernetes";
const INSTALL_REPO: &str = "https://github.com/stateless-agent/stateless-agent";
const DOC_REPOSITORY: &str = "https://github.com/acme/widgets.git";

/// The commands between the doc's quick-start markers, one per line.
fn quick_start_commands() -> Vec<String> {
    let doc = workspace().join("docs/operating.md");
    let doc = std::fs::read_to_string(doc).unwrap();
    let begin = doc
        .find("<!-- quick-start:begin")
        .expect("the quick start's marker");
    let end = doc
        .find("<!-- quick-start:end -->")
        .expect("the quick start's end");
    let block = &doc[begin..end];
    let commands: Vec<String> = block
        .lines()
        .skip_while(|l| !l.starts_with("```sh"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    assert!(
        commands.len() <= 10,
        "the quick start is ten commands or fewer: {commands:?}"
    );
    commands
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A git repository holding this tree's `image/`, tagged `tag`: what kustomize clones.
fn install_repository(dir: &Path, tag: &str) -> PathBuf {
    let repo = dir.join("stateless-agent");
    std::fs::create_dir(&repo).unwrap();
    let copy = Command::new("cp")
        .arg("-r")
        .arg(workspace().join("image"))
        .arg(&repo)
        .status()
        .unwrap();
    assert!(copy.success());
    git(&repo, &["init", "-q"]);
    git(&repo, &["add", "-A"]);
    git(
        &repo,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "commit",
            "-qm",
            "release",
        ],
    );
    git(&repo, &["tag", tag]);
    repo
}

/// Runs one of the doc's commands as a user's shell would, against the fake.
fn run(command: &str, kubeconfig: &Path) -> String {
    let command = command
        .replace("--timeout=30m", "--timeout=3m")
        .replace("kubectl apply ", "kubectl apply --validate=false ")
        .replace(
            "kubectl -n buildkite create job ",
            "kubectl -n buildkite create job --validate=false ",
        );
    let mut shell = Command::new("bash");
    shell.args(["-c", &command]).env("KUBECONFIG", kubeconfig);
    let out = shell.env("BUILDKITE_AGENT_TOKEN", TOKEN).output().unwrap();
    let out = stateless_e2e::sandbox::Finished::from(out);
    assert!(out.status.success(), "`{command}` failed:\n{}", out.log());
    out.log()
}

/// One replica of the applied Deployment, as its pod would run it (see the header).
fn replica(
    kube: &FakeKube,
    deployment: &Value,
    index: usize,
    (kubeconfig, dir, buildkite): (&Path, &Path, &FakeBuildkite),
) -> (Running, u16) {
    let name = format!("job-dispatcher-5d8f7c9b4-{index}");
    let mut pod = json!({"metadata": {"name": name, "labels": deployment["spec"]["template"]["metadata"]["labels"]},
                         "spec": deployment["spec"]["template"]["spec"]});
    pod["spec"]["nodeName"] = json!("control-plane");
    kube.create("pods", NS, pod);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let configmap = |name: &str| {
        let maps = kube.objects("configmaps", NS);
        maps.into_iter()
            .find(|m| m["metadata"]["name"] == name)
            .expect("the ConfigMap")
    };
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for from in container["envFrom"].as_array().into_iter().flatten() {
        let data = configmap(from["configMapRef"]["name"].as_str().unwrap())["data"].clone();
        for (key, value) in data.as_object().unwrap() {
            env.insert(key.clone(), value.as_str().unwrap().to_string());
        }
    }
    // The template ConfigMap's files, where the pod mounts them.
    let files = dir.join(format!("{name}-files"));
    let mut mounts = Vec::new();
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let volumes = deployment["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap();
        let volume = volumes.iter().find(|v| v["name"] == mount["name"]).unwrap();
        let at = files.join(mount["name"].as_str().unwrap());
        std::fs::create_dir_all(&at).unwrap();
        let data = configmap(volume["configMap"]["name"].as_str().unwrap())["data"].clone();
        for (file, text) in data.as_object().unwrap() {
            let text = with_endpoint(text.as_str().unwrap(), &buildkite.endpoint());
            std::fs::write(at.join(file), text).unwrap();
        }
        mounts.push((mount["mountPath"].as_str().unwrap().to_string(), at));
    }
    for variable in container["env"].as_array().into_iter().flatten() {
        let value = match variable["value"].as_str() {
            Some(value) => value.to_string(),
            None if variable["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" => {
                name.clone()
            }
            None => panic!("a variable the test does not give: {variable}"),
        };
        let value = mounts.iter().fold(value, |v, (path, at)| {
            v.replace(path.as_str(), at.to_str().unwrap())
        });
        env.insert(variable["name"].as_str().unwrap().to_string(), value);
    }
    let port = free_port();
    let mut command = job_dispatcher(kubeconfig, buildkite, TOKEN, &name);
    // Only what the pod would have: the token comes from its Secret, the image from the pod.
    command
        .env_remove("BUILDKITE_AGENT_TOKEN")
        .env_remove("DISPATCHER_IMAGE");
    command
        .envs(&env)
        .env("DISPATCHER_LISTEN", format!("127.0.0.1:{port}"))
        .env("DISPATCHER_POLL_INTERVAL", "300ms")
        .env("DISPATCHER_IDLE_TIMEOUT", "4s");
    (Running::spawn(&mut command), port)
}

/// The Deployment controller's part: the replicas started, the Deployment available once one is
/// ready.
fn play_the_deployment(
    kube: &FakeKube,
    edges: (&Path, &Path, &FakeBuildkite),
) -> Vec<(Running, u16)> {
    let deployments = kube.objects("deployments", NS);
    let deployment = deployments
        .iter()
        .find(|d| d["metadata"]["name"] == "job-dispatcher")
        .expect("the quick start applied the Deployment");
    let replicas = deployment["spec"]["replicas"].as_u64().unwrap() as usize;
    let running: Vec<_> = (0..replicas)
        .map(|i| replica(kube, deployment, i, edges))
        .collect();
    let ready = || {
        running
            .iter()
            .any(|(_, port)| http(&format!("127.0.0.1:{port}"), "GET", "/readyz", None).0 == 200)
    };
    wait(
        "a dispatcher replica to be ready",
        Duration::from_secs(60),
        ready,
    );
    let generation = deployment["metadata"]["generation"].as_u64().unwrap_or(1);
    kube.set_status(
        "deployments",
        NS,
        "job-dispatcher",
        json!({"observedGeneration": generation, "replicas": replicas, "updatedReplicas": replicas,
               "readyReplicas": replicas, "availableReplicas": replicas}),
    );
    running
}

/// A newcomer's path, end to end: the quick start's commands, then one job on the queue.
#[test]
fn the_quick_start_takes_an_empty_cluster_to_a_green_job() {
    if FakeCluster::unavailable()
        .map(|why| eprintln!("skipping: {why}"))
        .is_some()
        || !kustomize_5()
    {
        return;
    }
    let served = Served::new("acme/widgets.git");
    let dir = served.sandbox.dir.path();
    let kube = FakeKube::start();
    let kubeconfig = kube.kubeconfig(dir, NS);
    let buildkite = FakeBuildkite::start(TOKEN, QUEUE);
    let volume = dir.join("mirror-volume");
    std::fs::create_dir(&volume).unwrap();
    let pods = dir.join("pods");
    std::fs::create_dir(&pods).unwrap();
    let spec = ClusterSpec {
        nodes: 1,
        capacity: 4,
        claims: BTreeMap::from([("buildkite-git-mirrors".to_string(), volume.clone())]),
        ..ClusterSpec::default()
    };
    let cluster = FakeCluster::start(&kube, &pods, spec);

    let commands = quick_start_commands();
    let install = commands
        .iter()
        .find(|c| c.contains(INSTALL_REPO))
        .expect("an install command");
    let tag = install
        .split("?ref=")
        .nth(1)
        .unwrap()
        .trim_end_matches('\'');
    let repo = install_repository(dir, tag);
    let mut dispatchers = Vec::new();
    for command in &commands {
        let command = command
            .replace(INSTALL_REPO, &format!("file://{}", repo.display()))
            .replace(DOC_REPOSITORY, &served.url);
        if command.contains("rollout status") {
            dispatchers = play_the_deployment(&kube, (&kubeconfig, dir, &buildkite));
        }
        eprintln!("$ {command}\n{}", run(&command, &kubeconfig));
    }

    // The first populate published the mirror on the claim.
    let populate = kube.objects("jobs", NS);
    let populate = populate
        .iter()
        .find(|j| j["metadata"]["name"] == "populate-mirror-initial");
    assert!(ended(populate.unwrap(), "Complete"));
    assert!(
        volume.join("manifest.json").is_file(),
        "populate-mirror published a manifest"
    );

    // A job on the queue is served by an agent pod the dispatcher made.
    let job_env = job_env(&served);
    buildkite.schedule(QUEUE, 1, &job_env);
    let finished = || {
        buildkite
            .jobs()
            .iter()
            .all(|j| j.state == JobState::Finished)
    };
    wait(
        "the queued job to finish",
        Duration::from_secs(120),
        finished,
    );
    let jobs = buildkite.jobs();
    assert_eq!(jobs[0].exit_status.as_deref(), Some("0"), "the job passed");

    let agents = || -> Vec<Value> {
        let pods = kube.objects("pods", NS).into_iter();
        pods.filter(|p| p["metadata"]["labels"]["stateless-agent/queue"] == QUEUE)
            .collect()
    };
    // The pod ends after the job: the agent disconnects, then the wrapper writes its report.
    let ran = || {
        reports(&agents())
            .into_iter()
            .find(|r| r["reason"] == "job-finished")
    };
    wait(
        "the pod that ran the job to end",
        Duration::from_secs(60),
        || ran().is_some(),
    );
    let ran = ran().unwrap();
    let agents = agents();
    assert_eq!(
        ran["checkout"]["mirror"], "hit",
        "the checkout borrowed from the mirror: {ran}"
    );
    // The agents run the image the install named, with the token from the quick start's Secret.
    let deployment = &kube.objects("deployments", NS)[0];
    let image = &deployment["spec"]["template"]["spec"]["containers"][0]["image"];
    assert_eq!(image, "ghcr.io/stateless-agent/stateless-agent:0.1.0");
    let agent = &agents[0]["spec"]["containers"][0];
    assert_eq!(&agent["image"], image);
    assert_eq!(token_secret(agent), "buildkite-agent");

    for (dispatcher, _) in dispatchers {
        let log = dispatcher.stop().log();
        assert!(!log.contains(TOKEN), "the token reached a dispatcher's log");
    }
    assert!(
        !cluster.all_logs().contains(TOKEN),
        "the token reached a pod's log"
    );
}
