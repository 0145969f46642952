//! The agent Job template, and the Job of one dispatch made from it (Sourcegraph's design: a new
//! Job per dispatch, `parallelism = completions = N`, never a long-lived Job scaled up and down;
//! Indexed, so that one agent pod's failure never ends the others).
//!
//! The template is a `batch/v1` Job as a user writes it (`image/k8s/agent-job.yaml` works as it
//! is). Its agents must register in the queue the dispatcher serves: a template whose
//! `BUILDKITE_AGENT_TAGS` (or `BUILDKITE_AGENT_QUEUE`, which the agent lets override the tag)
//! names another queue is refused, naming both, since the dispatcher would count agents that
//! never appear and deploy endlessly (Sourcegraph's incident).

use std::time::Duration;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, HostPathVolumeSource, PersistentVolumeClaimVolumeSource,
    PodSpec, SecretKeySelector, Volume,
};

/// Labels on every Job the dispatcher creates and on its pods.
pub const QUEUE_LABEL: &str = "stateless-agent/queue";
pub const DISPATCH_LABEL: &str = "stateless-agent/dispatch-id";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The stacks mode's Buildkite job a Job runs.
pub const JOB_UUID_LABEL: &str = "stateless-agent/job-uuid";
pub const MANAGED_BY: &str = "job-dispatcher";
/// The hash of the template a Job was made from: what a Job, or an Event, says of one template
/// says nothing of the next (a fixed image is served at once).
pub const TEMPLATE_LABEL: &str = "stateless-agent/template";

/// Annotations that keep autoscalers from evicting an agent mid-job when they consolidate
/// nodes (the Cluster Autoscaler's and Karpenter's), on every pod unless the template sets them.
/// An idle agent leaves by itself within the idle timeout, so a node empties soon anyway.
pub const DO_NOT_DISRUPT: [(&str, &str); 2] = [
    ("cluster-autoscaler.kubernetes.io/safe-to-evict", "false"),
    ("karpenter.sh/do-not-disrupt", "true"),
];

/// The container that runs the agent: the one named `agent`, else the first.
const AGENT_CONTAINER: &str = "agent";

/// The image name the shipped templates give their containers: the dispatcher puts the image it
/// runs itself in its place (`--image`), since kustomize's `images:` cannot reach a template
/// inside a ConfigMap.
pub const IMAGE_PLACEHOLDER: &str = "stateless-agent";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("the agent template is not a batch/v1 Job ({0}); give DISPATCHER_TEMPLATE a Job manifest like image/k8s/agent-job.yaml")]
    Parse(String),
    #[error("the agent template has no containers; give its pod template the agent container")]
    NoContainer,
    #[error("the agent template has no volume {0:?} for the node-local mirror to replace; name its mirror volume with DISPATCHER_MIRROR_VOLUME")]
    NoMirrorVolume(String),
    #[error("the agent template registers its agents in queue {template:?} ({variable}), but this dispatcher serves queue {served:?}; make them the same, or the dispatcher would count agents that never come")]
    WrongQueue {
        template: String,
        served: String,
        variable: &'static str,
    },
}

/// A parsed, checked template for one queue.
#[derive(Debug, Clone)]
pub struct Template {
    job: Job,
    queue: String,
    mirror: Mirror,
    hash: String,
}

/// One dispatch's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    pub id: String,
    pub agents: u32,
    /// The Job's `activeDeadlineSeconds`.
    pub active_deadline: Duration,
    /// The Job's `ttlSecondsAfterFinished`.
    pub ttl: Duration,
    /// agent-wrapper's idle timeout for this dispatch's pods (`AGENT_WRAPPER_IDLE_TIMEOUT`): jobs
    /// were waiting when it was made, so an agent that finds none soon is surplus.
    pub idle_timeout: Duration,
    /// The claims mode: the ready generation's claim its agents mount (none ready yet: an
    /// empty directory, and checkouts clone from the server).
    pub mirror_claim: Option<String>,
    /// The stacks mode: the one Buildkite job this Job's agent acquires (`--acquire-job`). The
    /// Job is named after it, so that a second create of it is refused as a duplicate.
    pub acquire: Option<String>,
}

/// Where agents' mirror volume comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mirror {
    /// The template's own volume, as it is.
    Shared,
    /// Each node's directory `path`, in place of the template's volume `volume`, read-only.
    NodeLocal { volume: String, path: String },
    /// The generation's claim each dispatch names ([`Dispatch::mirror_claim`]), in place of the
    /// template's volume `volume`, read-only.
    Claims { volume: String },
}

impl Template {
    pub fn parse(yaml: &str, queue: &str, mirror: &Mirror) -> Result<Template, TemplateError> {
        let mut job: Job =
            serde_yaml_ng::from_str(yaml).map_err(|e| TemplateError::Parse(e.to_string()))?;
        match mirror {
            Mirror::NodeLocal { volume, path } => {
                let source = Volume {
                    host_path: Some(HostPathVolumeSource {
                        path: path.to_string(),
                        type_: Some("DirectoryOrCreate".into()),
                    }),
                    ..Volume::default()
                };
                replace_volume(&mut job, volume, source)?;
            }
            // Checked now; each dispatch names its generation.
            Mirror::Claims { volume } => replace_volume(&mut job, volume, Volume::default())?,
            Mirror::Shared => {}
        }
        let template = Template {
            job,
            queue: queue.to_string(),
            mirror: mirror.clone(),
            hash: fnv1a(&format!("{yaml}\0{queue}\0{mirror:?}")),
        };
        let agent = template.agent().ok_or(TemplateError::NoContainer)?;
        let env = |name: &str| env_value(agent.env.as_deref().unwrap_or_default(), name);
        let from_queue_var = env("BUILDKITE_AGENT_QUEUE").map(|q| (q, "BUILDKITE_AGENT_QUEUE"));
        let from_tags = env("BUILDKITE_AGENT_TAGS")
            .and_then(|tags| tag(&tags, "queue"))
            .map(|q| (q, "BUILDKITE_AGENT_TAGS"));
        if let Some((named, variable)) = from_queue_var.or(from_tags) {
            if named != queue {
                return Err(TemplateError::WrongQueue {
                    template: named,
                    served: queue.to_string(),
                    variable,
                });
            }
        }
        Ok(template)
    }

    /// The template's hash (its text, the queue, the mirror mode and what was filled in).
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Whether a container still names [`IMAGE_PLACEHOLDER`], for want of an image to fill in.
    pub fn needs_image(&self) -> bool {
        self.pod().is_some_and(names_placeholder)
    }

    /// The template with `image` for each container that names [`IMAGE_PLACEHOLDER`], and the
    /// agent's `BUILDKITE_AGENT_TOKEN` from the Secret `token_secret` (key `token`) unless the
    /// template sets the variable itself.
    pub fn filled(mut self, image: Option<&str>, token_secret: &str) -> Template {
        let agent_name = self.agent().map(|c| c.name.clone());
        let spec = self
            .job
            .spec
            .as_mut()
            .and_then(|s| s.template.spec.as_mut());
        if let Some(spec) = spec {
            if let Some(image) = image {
                fill_image(spec, image);
            }
            let agent = spec
                .containers
                .iter_mut()
                .find(|c| Some(&c.name) == agent_name.as_ref());
            let env = agent.map(|a| a.env.get_or_insert_default());
            if let Some(env) = env.filter(|env| !env.iter().any(|e| e.name == TOKEN_VARIABLE)) {
                env.insert(0, from_secret(TOKEN_VARIABLE, token_secret, "token"));
            }
        }
        self.hash = fnv1a(&format!("{}\0{image:?}\0{token_secret}", self.hash));
        self
    }

    fn pod(&self) -> Option<&PodSpec> {
        self.job.spec.as_ref()?.template.spec.as_ref()
    }

    fn agent(&self) -> Option<&Container> {
        let containers = &self.pod()?.containers;
        containers
            .iter()
            .find(|c| c.name == AGENT_CONTAINER)
            .or(containers.first())
    }

    /// The Job of `dispatch`: the template with the server-set fields cleared, the dispatch's
    /// labels on the Job and its pods, its size, deadline, TTL and idle timeout, and the queue
    /// tag set.
    pub fn job(&self, dispatch: &Dispatch) -> Job {
        let mut job = self.job.clone();
        job.status = None;
        let labels = [
            (QUEUE_LABEL, self.queue.as_str()),
            (DISPATCH_LABEL, dispatch.id.as_str()),
            (MANAGED_BY_LABEL, MANAGED_BY),
            (TEMPLATE_LABEL, self.hash.as_str()),
        ];
        let meta = &mut job.metadata;
        meta.name = dispatch
            .acquire
            .as_ref()
            .map(|job| format!("buildkite-{job}"));
        meta.generate_name = match dispatch.acquire {
            Some(_) => None,
            None => Some(format!("buildkite-{}-", name_part(&self.queue))),
        };
        meta.uid = None;
        meta.resource_version = None;
        meta.creation_timestamp = None;
        meta.deletion_timestamp = None;
        meta.generation = None;
        meta.managed_fields = None;
        meta.owner_references = None;
        meta.self_link = None;
        let job_labels = meta.labels.get_or_insert_default();
        for (key, value) in labels {
            job_labels.insert(key.to_string(), value.to_string());
        }
        if let Some(uuid) = &dispatch.acquire {
            job_labels.insert(JOB_UUID_LABEL.into(), uuid.clone());
        }
        let spec = job.spec.get_or_insert_default();
        spec.parallelism = Some(dispatch.agents as i32);
        spec.completions = Some(dispatch.agents as i32);
        spec.active_deadline_seconds = Some(dispatch.active_deadline.as_secs() as i64);
        spec.ttl_seconds_after_finished = Some(dispatch.ttl.as_secs() as i32);
        isolate_failures(spec);
        if dispatch.acquire.is_some() {
            // One try: a pod that ends before its agent acquires the job has the job failed in
            // Buildkite with the reason at once, and an agent that ran it is done with it.
            spec.backoff_limit_per_index = Some(0);
        }
        // The Job controller sets these for the new Job.
        spec.selector = None;
        spec.manual_selector = None;
        let pod_meta = spec.template.metadata.get_or_insert_default();
        let pod_labels = pod_meta.labels.get_or_insert_default();
        pod_labels.retain(|key, _| {
            !key.starts_with("batch.kubernetes.io/") && key != "controller-uid" && key != "job-name"
        });
        for (key, value) in labels {
            pod_labels.insert(key.to_string(), value.to_string());
        }
        if let Some(uuid) = &dispatch.acquire {
            pod_labels.insert(JOB_UUID_LABEL.into(), uuid.clone());
        }
        let annotations = pod_meta.annotations.get_or_insert_default();
        for (key, value) in DO_NOT_DISRUPT {
            annotations
                .entry(key.to_string())
                .or_insert_with(|| value.to_string());
        }
        let agent_name = self.agent().map(|c| c.name.clone()).unwrap_or_default();
        if let Some(agent) = spec
            .template
            .spec
            .as_mut()
            .and_then(|p| p.containers.iter_mut().find(|c| c.name == agent_name))
        {
            let env = agent.env.get_or_insert_default();
            let tags = env_value(env, "BUILDKITE_AGENT_TAGS").unwrap_or_default();
            set_env(env, "BUILDKITE_AGENT_TAGS", &with_queue(&tags, &self.queue));
            set_env(
                env,
                "AGENT_WRAPPER_IDLE_TIMEOUT",
                &format!("{}s", dispatch.idle_timeout.as_secs()),
            );
            if let Some(uuid) = &dispatch.acquire {
                set_env(env, "BUILDKITE_AGENT_ACQUIRE_JOB", uuid);
            }
        }
        if let Mirror::Claims { volume } = &self.mirror {
            let source = match &dispatch.mirror_claim {
                Some(claim) => Volume {
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: claim.clone(),
                        read_only: Some(true),
                    }),
                    ..Volume::default()
                },
                None => Volume {
                    empty_dir: Some(Default::default()),
                    ..Volume::default()
                },
            };
            // The volume was found when the template was parsed.
            let _ = replace_volume(&mut job, volume, source);
        }
        job
    }
}

/// The template's volume `volume` given `source` (its name kept), and every mount of it
/// read-only. The node-local mode's `DirectoryOrCreate`: on a node whose DaemonSet pod has not
/// populated it yet, the agent starts on an empty directory, and the checkout hook clones from
/// the server (a `miss`) rather than the pod hanging on a mount; the claims mode's is the same
/// with an `emptyDir` while no generation is ready.
fn replace_volume(job: &mut Job, volume: &str, source: Volume) -> Result<(), TemplateError> {
    let missing = || TemplateError::NoMirrorVolume(volume.to_string());
    let pod = job.spec.as_mut().and_then(|s| s.template.spec.as_mut());
    let pod = pod.ok_or_else(missing)?;
    let found = pod.volumes.iter_mut().flatten().find(|v| v.name == volume);
    let found = found.ok_or_else(missing)?;
    *found = Volume {
        name: volume.to_string(),
        ..source
    };
    let containers = pod
        .containers
        .iter_mut()
        .chain(pod.init_containers.iter_mut().flatten());
    let mounts = containers.flat_map(|c| c.volume_mounts.iter_mut().flatten());
    for mount in mounts.filter(|m| m.name == volume) {
        mount.read_only = Some(true);
    }
    Ok(())
}

/// Makes each agent pod's failure its own. In a non-indexed Job of N pods, a `FailJob` rule or
/// the `backoffLimit` fails the whole Job, and the Job controller then deletes every active pod,
/// agents in the middle of jobs included. As an Indexed Job with `backoffLimitPerIndex` (GA in
/// Kubernetes 1.33, beta and on by default since 1.29), a pod that fails ends only its index
/// (retried up to the template's `backoffLimit` times, `FailIndex` where the template said
/// `FailJob`), and the others run on.
///
/// Rules on pod conditions (`DisruptionTarget`: a drain, a preemption, a consolidation) go
/// first: Kubernetes takes the first rule that matches (`pkg/controller/job/
/// pod_failure_policy.go`), and an idle agent stopped by a drain exits 81, which a `FailIndex`
/// rule on exit codes would take first and fail its index for a disruption.
fn isolate_failures(spec: &mut JobSpec) {
    spec.completion_mode = Some("Indexed".into());
    spec.backoff_limit_per_index = Some(spec.backoff_limit.take().unwrap_or(DEFAULT_RETRIES));
    spec.max_failed_indexes = None;
    let rules = spec
        .pod_failure_policy
        .iter_mut()
        .flat_map(|p| &mut p.rules);
    for rule in rules.filter(|r| r.action == "FailJob") {
        rule.action = "FailIndex".into();
    }
    if let Some(policy) = spec.pod_failure_policy.as_mut() {
        policy.rules.sort_by_key(|r| r.on_pod_conditions.is_none());
    }
}

/// The agent's token variable, which the dispatcher fills from `--token-secret`.
const TOKEN_VARIABLE: &str = "BUILDKITE_AGENT_TOKEN";

/// Gives `image` to every container and init container of `spec` that names
/// [`IMAGE_PLACEHOLDER`] (with any tag or digest); others keep theirs.
pub fn fill_image(spec: &mut PodSpec, image: &str) {
    let containers = spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten());
    for container in containers.filter(|c| is_placeholder(c.image.as_deref())) {
        container.image = Some(image.to_string());
    }
}

/// Whether a container of `spec` names [`IMAGE_PLACEHOLDER`].
pub fn names_placeholder(spec: &PodSpec) -> bool {
    let mut containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    containers.any(|c| is_placeholder(c.image.as_deref()))
}

fn is_placeholder(image: Option<&str>) -> bool {
    let name = image.unwrap_or_default().split(['@', ':']).next();
    name == Some(IMAGE_PLACEHOLDER)
}

fn from_secret(variable: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: variable.to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_string(),
                key: key.to_string(),
                optional: None,
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// FNV-1a, 64 bits, in hex: a hash that stays the same across builds and Rust versions (std's
/// `DefaultHasher` promises neither), for a label compared across restarts.
pub fn fnv1a(text: &str) -> String {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// Retries of a failed agent pod when the template sets no `backoffLimit`.
const DEFAULT_RETRIES: i32 = 2;

/// A variable's literal value (`None` for one taken `valueFrom` a Secret or field).
fn env_value(env: &[EnvVar], name: &str) -> Option<String> {
    env.iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

fn set_env(env: &mut Vec<EnvVar>, name: &str, value: &str) {
    env.retain(|e| e.name != name);
    env.push(EnvVar {
        name: name.to_string(),
        value: Some(value.to_string()),
        value_from: None,
    });
}

/// The value of `key` in comma-separated `key=value` agent tags.
fn tag(tags: &str, key: &str) -> Option<String> {
    tags.split(',')
        .filter_map(|t| t.trim().split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

/// `tags` with `queue=<queue>` in place of any queue tag.
fn with_queue(tags: &str, queue: &str) -> String {
    let mut kept: Vec<String> = tags
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.starts_with("queue="))
        .map(String::from)
        .collect();
    kept.insert(0, format!("queue={queue}"));
    kept.join(",")
}

/// A queue name made fit for an object name: lower-case alphanumerics and dashes.
fn name_part(queue: &str) -> String {
    let name: String = queue
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    name.trim_matches('-').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../../image/k8s/agent-job.yaml");

    fn dispatch() -> Dispatch {
        Dispatch {
            id: "0f1e2d3c4b5a69788796a5b4c3d2e1f0".into(),
            agents: 7,
            active_deadline: Duration::from_secs(14400),
            ttl: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(120),
            mirror_claim: None,
            acquire: None,
        }
    }

    #[test]
    fn a_stacks_job_is_named_after_its_buildkite_job_acquires_it_and_is_tried_once() {
        let template = Template::parse(SHIPPED, "kubernetes", &Mirror::Shared).unwrap();
        let uuid = "01900000-0000-7000-8000-000000000001";
        let job = template.job(&Dispatch {
            agents: 1,
            acquire: Some(uuid.into()),
            ..dispatch()
        });
        assert_eq!(job.metadata.name, Some(format!("buildkite-{uuid}")));
        assert_eq!(job.metadata.generate_name, None);
        assert_eq!(job.metadata.labels.as_ref().unwrap()[JOB_UUID_LABEL], uuid);
        let spec = job.spec.as_ref().unwrap();
        assert_eq!(spec.backoff_limit_per_index, Some(0));
        let pod_meta = spec.template.metadata.as_ref().unwrap();
        assert_eq!(pod_meta.labels.as_ref().unwrap()[JOB_UUID_LABEL], uuid);
        let pod = spec.template.spec.as_ref().unwrap();
        let env = pod.containers[0].env.as_deref().unwrap();
        assert_eq!(
            env_value(env, "BUILDKITE_AGENT_ACQUIRE_JOB").as_deref(),
            Some(uuid)
        );
    }

    #[test]
    fn the_shipped_template_makes_a_dispatch_job() {
        let template = Template::parse(SHIPPED, "kubernetes", &Mirror::Shared).unwrap();
        assert!(template.needs_image());
        let template = template.filled(Some(PINNED), "buildkite-agent");
        assert!(!template.needs_image());
        let job = template.job(&dispatch());
        let meta = &job.metadata;
        assert_eq!(meta.name, None);
        assert_eq!(meta.generate_name.as_deref(), Some("buildkite-kubernetes-"));
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels[QUEUE_LABEL], "kubernetes");
        assert_eq!(labels[DISPATCH_LABEL], dispatch().id);
        assert_eq!(labels[MANAGED_BY_LABEL], "job-dispatcher");
        let spec = job.spec.as_ref().unwrap();
        assert_eq!((spec.parallelism, spec.completions), (Some(7), Some(7)));
        assert_eq!(spec.active_deadline_seconds, Some(14400));
        assert_eq!(spec.ttl_seconds_after_finished, Some(600));
        // A failing pod ends only its own index, never its siblings' jobs.
        assert_eq!(spec.completion_mode.as_deref(), Some("Indexed"));
        assert_eq!(spec.backoff_limit_per_index, Some(2));
        assert_eq!(spec.backoff_limit, None);
        let rules = &spec.pod_failure_policy.as_ref().unwrap().rules;
        let actions: Vec<&str> = rules.iter().map(|r| r.action.as_str()).collect();
        // Disruptions first: the first rule that matches wins.
        assert_eq!(actions, ["Ignore", "FailIndex"]);
        let annotations = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref();
        let annotations = annotations.unwrap();
        assert_eq!(annotations["karpenter.sh/do-not-disrupt"], "true");
        assert_eq!(
            annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"],
            "false"
        );
        assert_eq!(labels[TEMPLATE_LABEL], template.hash());
        let pod_labels = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        assert_eq!(pod_labels[DISPATCH_LABEL], dispatch().id);
        let agent = &spec.template.spec.as_ref().unwrap().containers[0];
        let env = |name: &str| env_value(agent.env.as_deref().unwrap_or_default(), name);
        assert_eq!(
            env("BUILDKITE_AGENT_TAGS").as_deref(),
            Some("queue=kubernetes")
        );
        assert_eq!(env("AGENT_WRAPPER_IDLE_TIMEOUT").as_deref(), Some("120s"));
        // The token comes from its Secret, the image is the dispatcher's own.
        assert_eq!(token_secret(agent).as_deref(), Some("buildkite-agent"));
        assert_eq!(agent.image.as_deref(), Some(PINNED));
    }

    const PINNED: &str = "ghcr.io/stateless-agent/stateless-agent@sha256:0123abcd";

    fn token_secret(agent: &Container) -> Option<String> {
        let token = agent.env.iter().flatten();
        let token = token.clone().find(|e| e.name == "BUILDKITE_AGENT_TOKEN")?;
        let from = token.value_from.as_ref()?.secret_key_ref.as_ref()?;
        assert_eq!(from.key, "token");
        Some(from.name.clone())
    }

    fn agent_of(template: &Template) -> Container {
        let job = template.job(&dispatch());
        job.spec.unwrap().template.spec.unwrap().containers[0].clone()
    }

    #[test]
    fn only_the_placeholder_image_and_an_unset_token_are_filled_in() {
        let parse = |yaml: &str| Template::parse(yaml, "gpu", &Mirror::Shared).unwrap();
        // The placeholder with a tag or a digest is still the placeholder.
        let tagged = SHIPPED.replace("image: stateless-agent", "image: stateless-agent:0.1.0");
        let agent = agent_of(&parse(&tagged).filled(Some(PINNED), "bk-token"));
        assert_eq!(agent.image.as_deref(), Some(PINNED));
        assert_eq!(token_secret(&agent).as_deref(), Some("bk-token"));
        // A template that names its own image and its own token keeps both.
        let own = SHIPPED.replace(
            "image: stateless-agent",
            "image: registry.example.com/ci-agent:7\n          env:\n            - name: BUILDKITE_AGENT_TOKEN\n              valueFrom:\n                secretKeyRef: {name: mine, key: agent-token}",
        ).replacen("          env:\n            - name: AGENT_WRAPPER_STOP_DEADLINE", "            - name: AGENT_WRAPPER_STOP_DEADLINE", 1);
        let template = parse(&own);
        assert!(!template.needs_image());
        let agent = agent_of(&template.filled(Some(PINNED), "bk-token"));
        assert_eq!(
            agent.image.as_deref(),
            Some("registry.example.com/ci-agent:7")
        );
        let env = agent.env.unwrap();
        let tokens: Vec<_> = env
            .iter()
            .filter(|e| e.name == "BUILDKITE_AGENT_TOKEN")
            .collect();
        assert_eq!(tokens.len(), 1);
        let from = tokens[0]
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref();
        assert_eq!(from.unwrap().name, "mine");
        // A new image is a new template: what was said of the old one says nothing of it.
        let a = parse(SHIPPED).filled(Some(PINNED), "bk-token");
        let b = parse(SHIPPED).filled(
            Some("ghcr.io/stateless-agent/stateless-agent:0.2.0"),
            "bk-token",
        );
        assert_ne!(a.hash(), b.hash());
    }

    #[test]
    fn node_local_mode_mounts_the_nodes_directory_read_only_in_place_of_the_claim() {
        let mirror = Mirror::NodeLocal {
            volume: "git-mirrors".into(),
            path: "/var/lib/stateless-agent/git-mirrors".into(),
        };
        let template = Template::parse(SHIPPED, "kubernetes", &mirror).unwrap();
        let job = template.job(&dispatch());
        let pod = job.spec.unwrap().template.spec.unwrap();
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "git-mirrors");
        let volume = volume.unwrap();
        assert!(volume.persistent_volume_claim.is_none());
        let host = volume.host_path.as_ref().unwrap();
        assert_eq!(host.path, "/var/lib/stateless-agent/git-mirrors");
        assert_eq!(host.type_.as_deref(), Some("DirectoryOrCreate"));
        let mount = pod.containers[0].volume_mounts.iter().flatten();
        let mount = mount.clone().find(|m| m.name == "git-mirrors").unwrap();
        assert_eq!(mount.read_only, Some(true));

        let other = Mirror::NodeLocal {
            volume: "mirrors".into(),
            path: "/x".into(),
        };
        let err = Template::parse(SHIPPED, "kubernetes", &other).unwrap_err();
        assert_eq!(err, TemplateError::NoMirrorVolume("mirrors".into()));
    }

    #[test]
    fn a_template_for_another_queue_is_refused_naming_both() {
        // The shipped template names no queue: the dispatcher's is the one.
        assert!(Template::parse(SHIPPED, "linux-large", &Mirror::Shared).is_ok());
        let tagged = SHIPPED.replace(
            "            - name: AGENT_WRAPPER_STOP_DEADLINE",
            "            - name: BUILDKITE_AGENT_TAGS\n              value: queue=kubernetes\n            - name: AGENT_WRAPPER_STOP_DEADLINE",
        );
        let err = Template::parse(&tagged, "linux-large", &Mirror::Shared).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("\"kubernetes\"") && text.contains("\"linux-large\""),
            "{text}"
        );
        let queue_var = tagged.replace(
            "- name: BUILDKITE_AGENT_TAGS",
            "- name: BUILDKITE_AGENT_QUEUE\n              value: other\n            - name: BUILDKITE_AGENT_TAGS",
        );
        assert!(matches!(
            Template::parse(&queue_var, "kubernetes", &Mirror::Shared),
            Err(TemplateError::WrongQueue {
                variable: "BUILDKITE_AGENT_QUEUE",
                ..
            })
        ));
    }

    #[test]
    fn disruption_rules_go_first_and_the_templates_annotations_win() {
        // A template written with the exit-code rule first, as ours once was.
        let wrong_order = SHIPPED
            .replace("      - action: Ignore\n        onPodConditions:\n          - type: DisruptionTarget\n            status: \"True\"\n", "")
            .replace("          values: [78, 80, 81, 82, 83, 126, 127]\n", "          values: [78, 80, 81, 82, 83, 126, 127]\n      - action: Ignore\n        onPodConditions:\n          - type: DisruptionTarget\n            status: \"True\"\n")
            .replace("karpenter.sh/do-not-disrupt: \"true\"", "karpenter.sh/do-not-disrupt: \"false\"");
        assert_ne!(wrong_order, SHIPPED);
        let template = Template::parse(&wrong_order, "kubernetes", &Mirror::Shared).unwrap();
        let spec = template.job(&dispatch()).spec.unwrap();
        let rules = &spec.pod_failure_policy.as_ref().unwrap().rules;
        assert_eq!(rules[0].action, "Ignore");
        assert!(rules[0].on_pod_conditions.is_some());
        let annotations = spec.template.metadata.unwrap().annotations.unwrap();
        assert_eq!(annotations["karpenter.sh/do-not-disrupt"], "false");
        // Another template, another hash: what failed with the last says nothing of it.
        assert_ne!(
            template.hash(),
            Template::parse(SHIPPED, "kubernetes", &Mirror::Shared)
                .unwrap()
                .hash()
        );
    }

    #[test]
    fn other_tags_are_kept_and_the_queue_is_set() {
        assert_eq!(
            with_queue("os=linux, queue=x,arch=amd64", "q"),
            "queue=q,os=linux,arch=amd64"
        );
        assert_eq!(with_queue("", "q"), "queue=q");
        assert_eq!(name_part("Linux_Large.1"), "linux-large-1");
        let unreadable = Template::parse("kind: [", "q", &Mirror::Shared)
            .err()
            .unwrap();
        assert!(matches!(unreadable, TemplateError::Parse(_)));
        assert!(unreadable
            .to_string()
            .contains("give DISPATCHER_TEMPLATE a Job manifest"));
    }
}
