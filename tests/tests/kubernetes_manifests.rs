//! The example Kubernetes manifests in `image/k8s/` parsed as the API server's types
//! (`k8s-openapi`), and checked against what the binaries and the image actually do: the agent
//! Job's `podFailurePolicy` against agent-wrapper's exit-code table for every code, its grace
//! period against the wrapper's stop deadline, the mirror volume read-only for agents and
//! writable for populate-mirror; and the job-dispatcher base and the node-local overlay
//! (`image/overlays/node-local`) as a real `kubectl kustomize` renders them, against what the
//! dispatcher and populate-mirror read and the API calls the dispatcher makes.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use agent_wrapper::exit_report::code::retry_pod;
use k8s_openapi::api::batch::v1::{CronJob, Job, JobSpec, PodFailurePolicy};
use k8s_openapi::api::core::v1::{ConfigMap, Container, PersistentVolumeClaim, PodSpec};
use k8s_openapi::Resource;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use stateless_e2e::container::IMAGE_UID;

const MIRRORS_PATH: &str = "/buildkite-git-references";
const CLAIM: &str = "buildkite-git-mirrors";

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// Every document of every manifest, by kind, as JSON.
fn documents() -> BTreeMap<&'static str, Vec<(String, serde_json::Value)>> {
    let mut by_kind: BTreeMap<&'static str, Vec<_>> = BTreeMap::new();
    let dir = workspace().join("image/k8s");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        // The dispatcher's kustomize base is checked as kustomize renders it (below).
        if path.is_dir() || path.file_name().is_some_and(|n| n == "kustomization.yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = serde_json::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
            let kind = match value["kind"].as_str() {
                Some(Job::KIND) => Job::KIND,
                Some(CronJob::KIND) => CronJob::KIND,
                Some(PersistentVolumeClaim::KIND) => PersistentVolumeClaim::KIND,
                Some(ConfigMap::KIND) => ConfigMap::KIND,
                other => panic!("{}: unexpected kind {other:?}", path.display()),
            };
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            by_kind.entry(kind).or_default().push((name, value));
        }
    }
    by_kind
}

/// `value` as `T`, refusing any field `T` does not have: a misspelt field would otherwise be
/// dropped in silence, here as by `kubectl apply`.
fn typed<T: DeserializeOwned + serde::Serialize>(file: &str, value: &serde_json::Value) -> T {
    let typed: T = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{file}: not a valid {}: {e}", std::any::type_name::<T>()));
    assert_eq!(
        &serde_json::to_value(&typed).unwrap(),
        value,
        "{file}: fields the Kubernetes type does not have (or a value of the wrong type)"
    );
    typed
}

fn jobs() -> Vec<(String, Job)> {
    documents()[Job::KIND]
        .iter()
        .map(|(file, v)| (file.clone(), typed(file, v)))
        .collect()
}

fn job(file: &str) -> JobSpec {
    let (_, job) = jobs().into_iter().find(|(f, _)| f == file).unwrap();
    job.spec.unwrap()
}

fn pod(spec: &JobSpec) -> &PodSpec {
    spec.template.spec.as_ref().unwrap()
}

fn container<'s>(spec: &'s JobSpec, name: &str) -> &'s Container {
    pod(spec)
        .containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn env<'c>(container: &'c Container, name: &str) -> Option<&'c str> {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

/// What the Job controller does with a pod whose container `name` exited with `code`, reading
/// the exit-code rules the way it does: the first rule that matches decides; none means Count.
fn decision(policy: &PodFailurePolicy, container: &str, code: i32) -> String {
    decision_with(policy, container, code, &[])
}

/// The action Kubernetes takes for a pod whose `container` exited `code` with the pod conditions
/// `conditions` True: the first rule that matches, in order (`pkg/controller/job/
/// pod_failure_policy.go`, `matchPodFailurePolicy`), else `Count`.
fn decision_with(
    policy: &PodFailurePolicy,
    container: &str,
    code: i32,
    conditions: &[&str],
) -> String {
    for rule in &policy.rules {
        let on_conditions = rule.on_pod_conditions.iter().flatten();
        if on_conditions
            .clone()
            .any(|c| c.status == "True" && conditions.contains(&c.type_.as_str()))
        {
            return rule.action.clone();
        }
        let Some(on) = &rule.on_exit_codes else {
            continue;
        };
        if on.container_name.as_deref().is_some_and(|c| c != container) {
            continue;
        }
        let listed = on.values.contains(&code);
        let matches = match on.operator.as_str() {
            "In" => listed,
            "NotIn" => !listed,
            other => panic!("unknown operator {other}"),
        };
        if matches {
            return rule.action.clone();
        }
    }
    "Count".into()
}

#[test]
fn every_manifest_parses_as_the_kubernetes_types() {
    let docs = documents();
    for (file, v) in &docs[Job::KIND] {
        typed::<Job>(file, v);
    }
    for (file, v) in &docs[CronJob::KIND] {
        typed::<CronJob>(file, v);
    }
    for (file, v) in &docs[PersistentVolumeClaim::KIND] {
        typed::<PersistentVolumeClaim>(file, v);
    }
    for (file, v) in &docs[ConfigMap::KIND] {
        typed::<ConfigMap>(file, v);
    }
}

#[test]
fn the_agent_jobs_failure_policy_is_the_wrappers_exit_code_table() {
    let spec = job("agent-job.yaml");
    let policy = spec
        .pod_failure_policy
        .as_ref()
        .expect("a podFailurePolicy");
    // A podFailurePolicy needs pods that are never restarted in place.
    assert_eq!(pod(&spec).restart_policy.as_deref(), Some("Never"));
    for code in 1..=255u8 {
        let expected = if retry_pod(code) { "Count" } else { "FailJob" };
        assert_eq!(
            decision(policy, "agent", code.into()),
            expected,
            "exit code {code}: docs/agent-wrapper.md says {}",
            if retry_pod(code) {
                "replace the pod"
            } else {
                "fail the Job"
            }
        );
        // A drain, a preemption or a consolidation is never the pod's fault, whatever it exits.
        let disrupted = decision_with(policy, "agent", code.into(), &["DisruptionTarget"]);
        assert_eq!(
            disrupted, "Ignore",
            "exit code {code} with DisruptionTarget"
        );
    }
}

#[test]
fn the_agents_grace_period_covers_the_wrappers_stop_deadline_and_cancel() {
    let spec = job("agent-job.yaml");
    let agent = container(&spec, "agent");
    let setting = |name| {
        let value = env(agent, name).unwrap_or_else(|| panic!("the template sets {name}"));
        humantime::parse_duration(value).unwrap()
    };
    // TERM → the job may finish until the deadline → cancel → the agent exits by itself within
    // its cancel window (which follows from the cancel grace the wrapper passes it, and the
    // agent's major version: the image's tag may float to 4.x) → the wrapper kills; the report
    // needs a moment after that. SIGKILL before it loses the report.
    use agent_wrapper::agent_version::Version;
    let needed = [Version(3, 137, 0), Version(4, 0, 0)]
        .into_iter()
        .map(|v| {
            agent_wrapper::supervisor::longest_stop(
                setting("AGENT_WRAPPER_STOP_DEADLINE"),
                v.cancel_window(setting("AGENT_WRAPPER_CANCEL_GRACE")),
            )
        })
        .max()
        .unwrap()
        + Duration::from_secs(5);
    let grace = Duration::from_secs(
        pod(&spec)
            .termination_grace_period_seconds
            .expect("terminationGracePeriodSeconds") as u64,
    );
    assert!(
        grace >= needed && grace <= needed + Duration::from_secs(30),
        "terminationGracePeriodSeconds {grace:?}; the wrapper needs {needed:?}"
    );
    assert!(spec.active_deadline_seconds.is_some());
    assert!(spec.ttl_seconds_after_finished.is_some());
    assert_eq!(
        agent.termination_message_policy.as_deref(),
        Some("FallbackToLogsOnError")
    );
    assert_eq!(
        agent.command, None,
        "agent-wrapper is the image's ENTRYPOINT"
    );
}

#[test]
fn agents_mount_the_mirror_read_only_and_build_on_an_empty_dir() {
    let spec = job("agent-job.yaml");
    let agent = container(&spec, "agent");
    let mounts = agent.volume_mounts.as_ref().unwrap();
    let mirrors = mounts
        .iter()
        .find(|m| m.mount_path == MIRRORS_PATH)
        .unwrap();
    assert_eq!(mirrors.read_only, Some(true));
    let volume = |name: &str| {
        pod(&spec)
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .unwrap()
            .clone()
    };
    let claim = volume(&mirrors.name).persistent_volume_claim.unwrap();
    assert_eq!(claim.claim_name, CLAIM);
    assert_eq!(
        claim.read_only,
        Some(true),
        "the claim itself is read-only too"
    );

    // The build path is the image's (Dockerfile), on an emptyDir: nothing outlives the pod.
    let dockerfile = std::fs::read_to_string(workspace().join("Dockerfile")).unwrap();
    let builds = mounts
        .iter()
        .find(|m| dockerfile.contains(&format!("BUILDKITE_BUILD_PATH={}", m.mount_path)))
        .expect("the build path is mounted");
    assert!(volume(&builds.name).empty_dir.is_some());

    let security = pod(&spec).security_context.as_ref().unwrap();
    assert_eq!(security.run_as_user, Some(IMAGE_UID.into()));
    assert_eq!(security.run_as_non_root, Some(true));
}

#[test]
fn populate_mirror_writes_the_claim_agents_read_and_the_cronjob_runs_the_same_pod() {
    let docs = documents();
    let (file, cron) = &docs[CronJob::KIND][0];
    let cron: CronJob = typed(file, cron);
    let cron = cron.spec.unwrap();
    assert_eq!(cron.concurrency_policy.as_deref(), Some("Forbid"));
    let refresh = cron.job_template.spec.unwrap();
    let initial = job("populate-job.yaml");
    assert_eq!(
        refresh, initial,
        "populate-job.yaml is the CronJob's job template: keep them the same"
    );

    let populate = container(&initial, "populate-mirror");
    assert_eq!(
        populate.command.as_deref(),
        Some(&["/usr/local/bin/populate-mirror".to_string()][..])
    );
    let mirrors = populate
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == MIRRORS_PATH)
        .unwrap();
    assert_ne!(mirrors.read_only, Some(true));
    let security = pod(&initial).security_context.as_ref().unwrap();
    assert_eq!(
        security.fs_group,
        Some(IMAGE_UID.into()),
        "the claim is writable by the image's user"
    );
    // populate-mirror's codes that a retry cannot fix: 2 bad input, 4 locked by another run.
    let policy = initial.pod_failure_policy.as_ref().unwrap();
    for code in 1..=255 {
        let expected = if [2, 4].contains(&code) {
            "FailJob"
        } else {
            "Count"
        };
        assert_eq!(
            decision(policy, "populate-mirror", code),
            expected,
            "{code}"
        );
    }

    let claims = &docs[PersistentVolumeClaim::KIND];
    let (file, claim) = &claims[0];
    let claim: PersistentVolumeClaim = typed(file, claim);
    assert_eq!(claim.metadata.name.as_deref(), Some(CLAIM));
    assert!(
        claim
            .spec
            .unwrap()
            .access_modes
            .unwrap()
            .contains(&"ReadWriteMany".to_string()),
        "agents on every node read it while populate-mirror writes"
    );
}

/// Runs `kubectl kustomize` on `dir` (under the workspace): each document by kind, or `None`
/// (having said why) without kubectl.
fn kustomize(dir: &str) -> Option<BTreeMap<String, serde_json::Value>> {
    let docs = kustomize_all(dir)?;
    let by_kind = docs
        .into_iter()
        .map(|d| (d["kind"].as_str().unwrap().to_string(), d));
    Some(by_kind.collect())
}

/// Every document `kubectl kustomize` renders from `dir`, in order (kinds may repeat).
fn kustomize_all(dir: &str) -> Option<Vec<serde_json::Value>> {
    if !stateless_e2e::fake_kube::kubectl_installed() {
        return None;
    }
    let rendered = std::process::Command::new("kubectl")
        .args(["kustomize"])
        .arg(workspace().join(dir))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&rendered.stderr);
    assert!(
        rendered.status.success(),
        "kubectl kustomize {dir}: {stderr}"
    );
    let text = String::from_utf8(rendered.stdout).unwrap();
    let docs = serde_yaml_ng::Deserializer::from_str(&text);
    Some(
        docs.map(|d| serde_json::Value::deserialize(d).unwrap())
            .collect(),
    )
}

/// The names of the environment variables a binary's settings read.
fn variables(command: clap::Command) -> Vec<String> {
    let args = command.get_arguments().filter_map(|a| a.get_env());
    args.map(|e| e.to_string_lossy().into_owned()).collect()
}

/// `kubectl kustomize image/overlays/node-local`: the base, plus a DaemonSet running
/// `populate-mirror --every` into each node's directory, which is where the dispatcher, told
/// `node-local`, mounts it read-only into its agents.
#[test]
fn the_node_local_overlay_renders_with_kubectl_kustomize() {
    use clap::CommandFactory;
    use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
    let Some(docs) = kustomize("image/overlays/node-local") else {
        return;
    };
    let daemonset: DaemonSet = typed("rendered DaemonSet", &docs["DaemonSet"]);
    let pod = daemonset.spec.unwrap().template.spec.unwrap();
    let populate = &pod.containers[0];
    let command = populate.command.clone().unwrap();
    assert_eq!(command[..2], ["/usr/local/bin/populate-mirror", "--every"]);
    humantime::parse_duration(&command[2]).unwrap();
    let read = variables(populate_mirror::settings::Settings::command());
    for var in populate.env.iter().flatten() {
        let git_config = var.name.starts_with("GIT_CONFIG_");
        assert!(
            git_config || read.contains(&var.name),
            "{} is not read",
            var.name
        );
    }
    // The repository list from the generated ConfigMap, mounted where the env says.
    let volumes = pod.volumes.clone().unwrap();
    let repositories = volumes.iter().find(|v| v.config_map.is_some()).unwrap();
    let config_map = &repositories.config_map.as_ref().unwrap().name;
    assert_eq!(docs["ConfigMap"]["metadata"]["name"], config_map.as_str());
    // It writes the node's directory at the path the hook reads, where the dispatcher looks.
    let mirrors = volumes.iter().find(|v| v.host_path.is_some()).unwrap();
    let mount = populate
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == mirrors.name);
    let mount = mount.unwrap();
    assert_eq!(mount.mount_path, MIRRORS_PATH);
    assert_ne!(mount.read_only, Some(true));
    let dispatcher_settings = dispatcher::settings::Settings::command();
    let default_path = dispatcher_settings
        .get_arguments()
        .find(|a| a.get_id() == "node_mirror_path")
        .map(|a| a.get_default_values()[0].to_string_lossy().into_owned())
        .unwrap();
    assert_eq!(mirrors.host_path.as_ref().unwrap().path, default_path);

    let deployment: Deployment = typed("rendered Deployment", &docs["Deployment"]);
    let env = deployment.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    let mode = env
        .iter()
        .find(|e| e.name == "DISPATCHER_MIRROR_MODE")
        .unwrap();
    assert_eq!(mode.value.as_deref(), Some("node-local"));
    let template = std::fs::read_to_string(workspace().join("image/k8s/agent-job.yaml")).unwrap();
    let node_local = dispatcher::template::Mirror::NodeLocal {
        volume: "git-mirrors".into(),
        path: default_path,
    };
    dispatcher::template::Template::parse(&template, "kubernetes", &node_local)
        .expect("the template's mirror volume is the one the dispatcher replaces");
}

/// `kubectl kustomize image/overlays/claims`: the base, told to run the claims cycle, with a Role
/// granting only what the cycle does; the claim and populate templates it reads come from the
/// base's ConfigMap and are the shipped files, which the cycle accepts.
#[test]
fn the_claims_overlay_renders_with_kubectl_kustomize() {
    use clap::Parser;
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::rbac::v1::Role;
    let Some(docs) = kustomize_all("image/overlays/claims") else {
        return;
    };
    let role = docs
        .iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["name"] == "job-dispatcher-mirrors")
        .unwrap();
    let role: Role = typed("rendered Role", role);
    let rules: Vec<(String, Vec<String>)> = role
        .rules
        .unwrap()
        .into_iter()
        .map(|r| (r.resources.unwrap().join(","), r.verbs))
        .collect();
    let verbs = |v: &[&str]| v.iter().map(|v| v.to_string()).collect::<Vec<_>>();
    assert_eq!(
        rules,
        [
            (
                "persistentvolumeclaims".into(),
                verbs(&["create", "delete", "get", "list", "patch", "watch"])
            ),
            ("jobs".into(), verbs(&["delete"])),
            (
                "volumesnapshots".into(),
                verbs(&["create", "delete", "get", "list", "watch"])
            ),
        ]
    );
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let deployment: Deployment = typed("rendered Deployment", deployment);
    let env = deployment.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    let value = |name: &str| {
        let found = env.iter().find(|e| e.name == name);
        found.and_then(|e| e.value.clone()).unwrap()
    };
    assert_eq!(value("DISPATCHER_MIRROR_MODE"), "claims");
    // The templates the cycle reads by default are the shipped files, from the ConfigMap.
    let config_map = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    for file in ["mirror-claim.yaml", "populate-job.yaml"] {
        let shipped = std::fs::read_to_string(workspace().join("image/k8s").join(file)).unwrap();
        assert_eq!(config_map["data"][file], shipped.as_str(), "{file}");
    }
    let k8s = workspace().join("image/k8s");
    let settings = dispatcher::settings::Settings::try_parse_from([
        "job-dispatcher".into(),
        "--queue=kubernetes".into(),
        "--token=t".into(),
        "--mirror-mode=claims".into(),
        format!(
            "--claim-template={}",
            k8s.join("mirror-claim.yaml").display()
        ),
        format!(
            "--populate-template={}",
            k8s.join("populate-job.yaml").display()
        ),
        format!("--snapshot-class={}", value("DISPATCHER_SNAPSHOT_CLASS")),
    ])
    .unwrap();
    let cycle = dispatcher::mirror_run::Cycle::load(&settings).expect("the cycle reads them");
    assert_eq!(cycle.prefix, CLAIM);
}

/// `kubectl kustomize image/k8s`: the dispatcher's Deployment, its account with only the verbs it
/// uses, and the agent template from a generated ConfigMap, which the dispatcher accepts for the
/// queue the Deployment names.
#[test]
fn the_dispatcher_base_renders_with_kubectl_kustomize() {
    use clap::CommandFactory;
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let Some(docs) = kustomize("image/k8s") else {
        return;
    };
    let kinds: Vec<&str> = docs.keys().map(String::as_str).collect();
    assert_eq!(
        kinds,
        [
            "ConfigMap",
            "Deployment",
            "Role",
            "RoleBinding",
            "ServiceAccount"
        ]
    );

    // Only the verbs the dispatcher uses: watches (get, list, watch) of pods, Jobs and events,
    // creating Jobs and Events, deleting or patching a Job whose pods never start, and the
    // Lease's get, create and update (a replace).
    let role: Role = typed("rendered Role", &docs["Role"]);
    let mut rules: Vec<(String, Vec<String>)> = role
        .rules
        .unwrap()
        .into_iter()
        .map(|r| (r.resources.unwrap().join(","), r.verbs))
        .collect();
    rules.sort();
    assert_eq!(
        rules,
        [
            (
                "events".into(),
                vec!["create".into(), "get".into(), "list".into(), "watch".into()]
            ),
            (
                "jobs".into(),
                ["create", "delete", "get", "list", "patch", "watch"]
                    .map(String::from)
                    .to_vec()
            ),
            (
                "leases".into(),
                vec!["create".into(), "get".into(), "update".into()]
            ),
            (
                "pods".into(),
                vec!["get".into(), "list".into(), "watch".into()]
            ),
        ]
    );
    let binding: RoleBinding = typed("rendered RoleBinding", &docs["RoleBinding"]);
    assert_eq!(binding.subjects.unwrap()[0].name, "job-dispatcher");

    let deployment: Deployment = typed("rendered Deployment", &docs["Deployment"]);
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("job-dispatcher"));
    let container = &pod.containers[0];
    assert_eq!(
        container.command.as_ref().unwrap()[0],
        "/usr/local/bin/job-dispatcher"
    );
    // Every variable it sets is one the dispatcher reads.
    let read = variables(dispatcher::settings::Settings::command());
    let env = container.env.clone().unwrap_or_default();
    for var in &env {
        assert!(
            read.contains(&var.name),
            "{} is not a job-dispatcher setting",
            var.name
        );
    }
    let value = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
            .unwrap()
    };
    // The template is mounted where DISPATCHER_TEMPLATE says, from the generated ConfigMap.
    let template_path = value("DISPATCHER_TEMPLATE");
    let mount = container
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| template_path.starts_with(&m.mount_path))
        .unwrap();
    assert_eq!(mount.read_only, Some(true));
    let volume = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == mount.name)
        .unwrap();
    let config_map = docs["ConfigMap"]["metadata"]["name"].as_str().unwrap();
    assert_eq!(volume.config_map.as_ref().unwrap().name, config_map);
    let key = template_path.rsplit('/').next().unwrap();
    let template = docs["ConfigMap"]["data"][key].as_str().unwrap();
    let shared = dispatcher::template::Mirror::Shared;
    dispatcher::template::Template::parse(template, &value("DISPATCHER_QUEUE"), &shared)
        .expect("the template's agents register in the Deployment's queue");
    assert_eq!(
        std::fs::read_to_string(workspace().join("image/k8s/agent-job.yaml")).unwrap(),
        template
    );
}
