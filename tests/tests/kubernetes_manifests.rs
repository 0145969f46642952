//! The Kubernetes manifests parsed as the API server's types (`k8s-openapi`), and checked
//! against what the binaries and the image actually do: the agent Job's `podFailurePolicy`
//! against agent-wrapper's exit-code table for every code, its grace period against the wrapper's
//! stop deadline, the mirror volume read-only for agents and writable for populate-mirror; and the
//! install unit as a real `kubectl kustomize` renders it: the quick start, two queues side by
//! side, the doc's "one setting each" overlay, and every storage recipe, against what the
//! dispatcher and populate-mirror read and the API calls the dispatcher makes.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use agent_wrapper::exit_report::code::retry_pod;
use k8s_openapi::api::batch::v1::{CronJob, Job, JobSpec, PodFailurePolicy};
use k8s_openapi::api::core::v1::{Container, PersistentVolumeClaim, PodSpec};
use k8s_openapi::Resource;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use stateless_e2e::container::IMAGE_UID;

const MIRRORS_PATH: &str = "/buildkite-git-references";
const CLAIM: &str = "buildkite-git-mirrors";

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// The manifests that are not kustomizations: the agent template, the shared mode's claim and
/// CronJob, the claims mode's templates.
const MANIFESTS: [&str; 5] = [
    "image/k8s/agent-job.yaml",
    "image/storage/shared/claim.yaml",
    "image/storage/shared/populate-cronjob.yaml",
    "image/storage/snapshots/mirror-claim.yaml",
    "image/storage/snapshots/populate-job.yaml",
];

/// Every document of every manifest, by kind, as JSON, with its file's name.
fn documents() -> BTreeMap<&'static str, Vec<(String, serde_json::Value)>> {
    let mut by_kind: BTreeMap<&'static str, Vec<_>> = BTreeMap::new();
    for file in MANIFESTS {
        let path = workspace().join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = serde_json::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
            let kind = match value["kind"].as_str() {
                Some(Job::KIND) => Job::KIND,
                Some(CronJob::KIND) => CronJob::KIND,
                Some(PersistentVolumeClaim::KIND) => PersistentVolumeClaim::KIND,
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
    let (file, claim) = claims.iter().find(|(f, _)| f == "claim.yaml").unwrap();
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

/// Every document `kubectl kustomize` renders from `dir` (under the workspace), in order, or
/// `None` (having said why) without a kubectl whose kustomize reads the install unit.
fn kustomize(dir: &str) -> Option<Vec<Value>> {
    render(&workspace().join(dir))
}

fn render(dir: &Path) -> Option<Vec<Value>> {
    if !stateless_e2e::fake_kube::kustomize_5() {
        return None;
    }
    let rendered = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&rendered.stderr);
    assert!(
        rendered.status.success(),
        "kubectl kustomize {}: {stderr}",
        dir.display()
    );
    let text = String::from_utf8(rendered.stdout).unwrap();
    let docs = serde_yaml_ng::Deserializer::from_str(&text);
    Some(docs.map(|d| Value::deserialize(d).unwrap()).collect())
}

/// A user's overlay (`kustomization` as YAML, paths under the workspace written `WORKSPACE/…`),
/// rendered.
fn overlay(kustomization: &str) -> Option<Vec<Value>> {
    // Inside the workspace: kustomize takes no absolute path to a base.
    let dir = tempfile::tempdir_in(workspace().join("target")).unwrap();
    let text = kustomization.replace("WORKSPACE", "../..");
    std::fs::write(dir.path().join("kustomization.yaml"), text).unwrap();
    render(dir.path())
}

/// The base with a storage component, as a user's overlay for the node-local or claims mode.
fn base_with(component: &str) -> Option<Vec<Value>> {
    overlay(&format!(
        "resources: [WORKSPACE/image/k8s]\ncomponents: [WORKSPACE/image/storage/{component}]\n\
         images: [{{name: stateless-agent, newName: ghcr.io/stateless-agent/stateless-agent, newTag: '0.1.0'}}]\n"
    ))
}

fn find<'d>(docs: &'d [Value], kind: &str, name: &str) -> &'d Value {
    let found = docs.iter().find(|d| {
        d["kind"] == kind
            && d["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(name))
    });
    found.unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The names of the environment variables a binary's settings read.
fn variables(command: clap::Command) -> Vec<String> {
    let args = command.get_arguments().filter_map(|a| a.get_env());
    args.map(|e| e.to_string_lossy().into_owned()).collect()
}

/// What the dispatcher's container is given: its settings ConfigMap (envFrom), then its env.
fn dispatcher_env(docs: &[Value], deployment: &str) -> BTreeMap<String, String> {
    let container =
        &find(docs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0];
    let mut env = BTreeMap::new();
    for from in container["envFrom"].as_array().into_iter().flatten() {
        let name = from["configMapRef"]["name"].as_str().unwrap();
        let settings = find(docs, "ConfigMap", name);
        assert_eq!(
            settings["metadata"]["name"], name,
            "the Deployment names the generated ConfigMap"
        );
        for (key, value) in settings["data"].as_object().unwrap() {
            env.insert(key.clone(), value.as_str().unwrap().to_string());
        }
    }
    for var in container["env"].as_array().into_iter().flatten() {
        let value = var["value"].as_str().unwrap_or("(from a field)");
        env.insert(var["name"].as_str().unwrap().to_string(), value.to_string());
    }
    env
}

/// The template ConfigMap's file `file`, as mounted for the dispatcher `deployment`.
fn template_file(docs: &[Value], deployment: &str, file: &str) -> String {
    let pod = &find(docs, "Deployment", deployment)["spec"]["template"]["spec"];
    let volumes = pod["volumes"].as_array().unwrap();
    let template = volumes.iter().find(|v| v["name"] == "template").unwrap();
    let name = template["configMap"]["name"].as_str().unwrap();
    let data = &find(docs, "ConfigMap", name)["data"][file];
    data.as_str()
        .unwrap_or_else(|| panic!("no {file} in {name}"))
        .to_string()
}

/// `image/overlays/quick-start`: the dispatcher with its account (only the verbs it uses), its
/// settings and the agent template in generated ConfigMaps it reads, the image named in one
/// place and reaching every workload, the mirror's claim and its CronJob.
#[test]
fn the_quick_start_renders_the_whole_install() {
    use clap::CommandFactory;
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let Some(docs) = kustomize("image/overlays/quick-start") else {
        return;
    };
    let mut kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ConfigMap",
            "ConfigMap",
            "CronJob",
            "Deployment",
            "PersistentVolumeClaim",
            "Role",
            "RoleBinding",
            "ServiceAccount"
        ]
    );
    assert!(docs
        .iter()
        .all(|d| d["metadata"]["namespace"] == "buildkite"));

    // Only the verbs the dispatcher uses: its own pod and the token's Secret read; watches (get,
    // list, watch) of pods, Jobs and events; creating Jobs and Events; deleting or patching a Job
    // whose pods never start; the Lease's get, create and update (a replace).
    let role: Role = typed("rendered Role", find(&docs, "Role", "job-dispatcher"));
    let mut rules: Vec<(String, Vec<String>)> = role
        .rules
        .unwrap()
        .into_iter()
        .map(|r| (r.resources.unwrap().join(","), r.verbs))
        .collect();
    rules.sort();
    let verbs = |v: &[&str]| v.iter().map(|v| v.to_string()).collect::<Vec<_>>();
    assert_eq!(
        rules,
        [
            ("events".into(), verbs(&["create", "get", "list", "watch"])),
            (
                "jobs".into(),
                verbs(&["create", "delete", "get", "list", "patch", "watch"])
            ),
            ("leases".into(), verbs(&["create", "get", "update"])),
            ("pods".into(), verbs(&["get", "list", "watch"])),
            ("secrets".into(), verbs(&["get"])),
        ]
    );
    let binding: RoleBinding = typed(
        "rendered RoleBinding",
        find(&docs, "RoleBinding", "job-dispatcher"),
    );
    assert_eq!(binding.subjects.unwrap()[0].name, "job-dispatcher");

    let deployment: Deployment = typed(
        "rendered Deployment",
        find(&docs, "Deployment", "job-dispatcher"),
    );
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("job-dispatcher"));
    let container = &pod.containers[0];
    assert_eq!(
        container.command.as_ref().unwrap()[0],
        "/usr/local/bin/job-dispatcher"
    );
    // Every variable it is given is one the dispatcher reads.
    let read = variables(dispatcher::settings::Settings::command());
    let env = dispatcher_env(&docs, "job-dispatcher");
    for name in env.keys() {
        assert!(
            read.contains(name),
            "{name} is not a job-dispatcher setting"
        );
    }
    assert_eq!(env["DISPATCHER_QUEUE"], "kubernetes");
    assert_eq!(env["DISPATCHER_TOKEN_SECRET"], "buildkite-agent");
    // The template is mounted where DISPATCHER_TEMPLATE says, read-only; it names the image
    // placeholder, which the dispatcher fills with the image it runs: the one `images:` set.
    let mount = container.volume_mounts.iter().flatten();
    let mount = mount
        .clone()
        .find(|m| env["DISPATCHER_TEMPLATE"].starts_with(&m.mount_path));
    assert_eq!(mount.unwrap().read_only, Some(true));
    let file = env["DISPATCHER_TEMPLATE"]
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let template = template_file(&docs, "job-dispatcher", &file);
    assert_eq!(
        std::fs::read_to_string(workspace().join("image/k8s/agent-job.yaml")).unwrap(),
        template
    );
    let shared = dispatcher::template::Mirror::Shared;
    let parsed =
        dispatcher::template::Template::parse(&template, &env["DISPATCHER_QUEUE"], &shared);
    assert!(parsed
        .expect("the dispatcher accepts the template")
        .needs_image());
    let image = "ghcr.io/stateless-agent/stateless-agent:0.1.0";
    assert_eq!(container.image.as_deref(), Some(image));
    let cron = find(&docs, "CronJob", "populate-mirror");
    let populate = &cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(populate["image"], image);
    // The version the overlay installs is the workspace's (the release pipeline checks the tag).
    assert_eq!(
        format!(
            "ghcr.io/stateless-agent/stateless-agent:{}",
            env!("CARGO_PKG_VERSION")
        ),
        image
    );
}

/// Two queues from the overlays, in one namespace: no two objects share a kind and a name, each
/// Deployment's selector matches only its own pods, each dispatcher serves its own queue on its
/// own Lease, and both mount the one mirror claim.
#[test]
fn two_queues_render_from_the_overlays_without_collisions() {
    let (Some(first), Some(second)) = (
        kustomize("image/overlays/quick-start"),
        kustomize("image/overlays/second-queue"),
    ) else {
        return;
    };
    let mut names = std::collections::BTreeSet::new();
    for doc in first.iter().chain(&second) {
        let key = (
            doc["kind"].to_string(),
            doc["metadata"]["namespace"].to_string(),
            doc["metadata"]["name"].to_string(),
        );
        assert!(names.insert(key.clone()), "{key:?} is rendered twice");
    }
    let selector = |docs: &[Value], name: &str| {
        let deployment = find(docs, "Deployment", name);
        let labels = deployment["spec"]["template"]["metadata"]["labels"].clone();
        (
            deployment["spec"]["selector"]["matchLabels"].clone(),
            labels,
        )
    };
    let (first_selector, first_labels) = selector(&first, "job-dispatcher");
    let (second_selector, second_labels) = selector(&second, "gpu-job-dispatcher");
    let matches = |selector: &Value, labels: &Value| {
        selector
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| &labels[k] == v)
    };
    assert!(matches(&first_selector, &first_labels) && matches(&second_selector, &second_labels));
    assert!(
        !matches(&second_selector, &first_labels),
        "the second queue's Deployment would adopt the first's pods"
    );
    let queues = [
        dispatcher_env(&first, "job-dispatcher"),
        dispatcher_env(&second, "gpu-job-dispatcher"),
    ];
    assert_eq!(
        queues.clone().map(|e| e["DISPATCHER_QUEUE"].clone()),
        ["kubernetes", "gpu"]
    );
    // The Lease is per queue unless set (job-dispatcher-<queue>).
    assert!(queues.iter().all(|e| !e.contains_key("DISPATCHER_LEASE")));
    for (docs, name) in [(&first, "job-dispatcher"), (&second, "gpu-job-dispatcher")] {
        let template = template_file(docs, name, "agent-job.yaml");
        assert!(template.contains("claimName: buildkite-git-mirrors"));
    }
}

/// The doc's "one setting each" overlay, on the quick start: each setting lands where it acts.
#[test]
fn one_setting_each_sets_the_namespace_image_queue_token_and_storage() {
    let doc = std::fs::read_to_string(workspace().join("docs/operating.md")).unwrap();
    let section = &doc[doc.find("### One setting each").unwrap()..];
    let yaml = section
        .split("```yaml\n")
        .nth(1)
        .unwrap()
        .split("```")
        .next()
        .unwrap();
    let local = yaml
        .replace(
            "https://github.com/stateless-agent/stateless-agent/",
            "WORKSPACE",
        )
        .replace("?ref=v0.1.0", "");
    let Some(docs) = overlay(&local) else {
        return;
    };
    assert!(docs.iter().all(|d| d["metadata"]["namespace"] == "ci"));
    let env = dispatcher_env(&docs, "job-dispatcher");
    assert_eq!(
        (
            env["DISPATCHER_QUEUE"].as_str(),
            env["DISPATCHER_TOKEN_SECRET"].as_str()
        ),
        ("linux", "buildkite-agent-token")
    );
    let deployment = find(&docs, "Deployment", "job-dispatcher");
    let image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap();
    assert!(
        image.starts_with("ghcr.io/stateless-agent/stateless-agent@sha256:"),
        "{image}"
    );
    let cron = find(&docs, "CronJob", "populate-mirror");
    assert_eq!(
        cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"],
        image
    );
    let claim = find(&docs, "PersistentVolumeClaim", CLAIM);
    assert_eq!(claim["spec"]["storageClassName"], "standard-rwx");
}

/// The read-write-many recipes name their class on the quick start's claim (EFS and Azure Files
/// bring theirs).
#[test]
fn the_storage_recipes_name_a_read_write_many_class() {
    for (recipe, class) in [
        ("filestore", "standard-rwx"),
        ("efs", "git-mirrors-efs"),
        ("azure-files", "git-mirrors-azurefile-nfs"),
    ] {
        let Some(docs) = overlay(&format!(
            "resources: [WORKSPACE/image/overlays/quick-start]\ncomponents: [WORKSPACE/image/storage/{recipe}]\n"
        )) else {
            return;
        };
        let claim = find(&docs, "PersistentVolumeClaim", CLAIM);
        assert_eq!(claim["spec"]["storageClassName"], class, "{recipe}");
        assert_eq!(claim["spec"]["accessModes"][0], "ReadWriteMany");
        if recipe != "filestore" {
            let storage_class = find(&docs, "StorageClass", class);
            assert!(
                storage_class["metadata"]["namespace"].is_null(),
                "a StorageClass is cluster-wide"
            );
        }
    }
}

/// The node-local component: the DaemonSet running `populate-mirror --every` into each node's
/// directory, which is where the dispatcher, told `node-local`, mounts it read-only into its
/// agents.
#[test]
fn the_node_local_component_renders_with_kubectl_kustomize() {
    use clap::CommandFactory;
    use k8s_openapi::api::apps::v1::DaemonSet;
    let Some(docs) = base_with("node-local") else {
        return;
    };
    let daemonset: DaemonSet = typed(
        "rendered DaemonSet",
        find(&docs, "DaemonSet", "populate-mirror"),
    );
    let pod = daemonset.spec.unwrap().template.spec.unwrap();
    let populate = &pod.containers[0];
    assert_eq!(
        populate.image.as_deref(),
        Some("ghcr.io/stateless-agent/stateless-agent:0.1.0")
    );
    let command = populate.command.clone().unwrap();
    assert_eq!(command[..2], ["/usr/local/bin/populate-mirror", "--every"]);
    humantime::parse_duration(&command[2]).unwrap();
    let read = variables(populate_mirror::settings::Settings::command());
    for var in populate.env.iter().flatten() {
        let git = var.name.starts_with("GIT_") || var.name.starts_with("GITHUB_");
        assert!(git || read.contains(&var.name), "{} is not read", var.name);
    }
    // It writes the node's directory at the path the hook reads, where the dispatcher looks.
    let volumes = pod.volumes.clone().unwrap();
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

    let env = dispatcher_env(&docs, "job-dispatcher");
    assert_eq!(env["DISPATCHER_MIRROR_MODE"], "node-local");
    let template = template_file(&docs, "job-dispatcher", "agent-job.yaml");
    let node_local = dispatcher::template::Mirror::NodeLocal {
        volume: "git-mirrors".into(),
        path: default_path,
    };
    dispatcher::template::Template::parse(&template, "kubernetes", &node_local)
        .expect("the template's mirror volume is the one the dispatcher replaces");
}

/// The snapshots component (the claims mode): the base told to run the claims cycle, with a Role
/// granting only what the cycle does; the claim and populate templates it reads are merged into
/// the base's ConfigMap as the shipped files, which the cycle accepts.
#[test]
fn the_snapshots_component_renders_with_kubectl_kustomize() {
    use clap::Parser;
    use k8s_openapi::api::rbac::v1::Role;
    let Some(docs) = base_with("snapshots") else {
        return;
    };
    let role: Role = typed(
        "rendered Role",
        find(&docs, "Role", "job-dispatcher-mirrors"),
    );
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
    let env = dispatcher_env(&docs, "job-dispatcher");
    assert_eq!(env["DISPATCHER_MIRROR_MODE"], "claims");
    // The templates the cycle reads by default are the shipped files, from the ConfigMap.
    let snapshots = workspace().join("image/storage/snapshots");
    for file in ["mirror-claim.yaml", "populate-job.yaml"] {
        let shipped = std::fs::read_to_string(snapshots.join(file)).unwrap();
        assert_eq!(
            template_file(&docs, "job-dispatcher", file),
            shipped,
            "{file}"
        );
    }
    let settings = dispatcher::settings::Settings::try_parse_from([
        "job-dispatcher".into(),
        "--queue=kubernetes".into(),
        "--token=t".into(),
        "--mirror-mode=claims".into(),
        format!(
            "--claim-template={}",
            snapshots.join("mirror-claim.yaml").display()
        ),
        format!(
            "--populate-template={}",
            snapshots.join("populate-job.yaml").display()
        ),
        format!("--snapshot-class={}", env["DISPATCHER_SNAPSHOT_CLASS"]),
    ])
    .unwrap();
    let cycle = dispatcher::mirror_run::Cycle::load(&settings).expect("the cycle reads them");
    assert_eq!(cycle.prefix, CLAIM);
    assert!(
        cycle.needs_image(),
        "the populate template names the placeholder the dispatcher fills"
    );
}
