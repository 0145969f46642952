//! What a tick does with its decision: the metrics and the log line that report it, the Job a
//! dispatch creates, stuck pods let go, and the Events on the Jobs. Every action is one API call
//! whose outcome is read back from the watches on the next tick, so a failed call is only
//! logged and counted.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions, PropagationPolicy,
};
use stateless_core::repo_url::Redactor;
use std::sync::Arc;

use crate::decide::{Action, Decision, Demand, Hold, Relief, StuckJob, Supply};
use crate::metrics::Metrics;
use crate::metrics::{Reason, State, StuckReason};
use crate::mirror_run::Claims;
use crate::observe::{STUCK_EVENT, STUCK_REASON_ANNOTATION};
use crate::settings::Settings;
use crate::template::Template;
use crate::template::{
    Dispatch, DISPATCH_LABEL, MANAGED_BY, MANAGED_BY_LABEL, QUEUE_LABEL, TEMPLATE_LABEL,
};
use crate::watches::Stores;

/// The dispatcher's Events' messages are cut to this (the API server refuses past 1 KiB for
/// `events.k8s.io`; the core kind has no limit, but a `kubectl describe` line should stay short).
const EVENT_MESSAGE_LIMIT: usize = 1024;

/// The faults a `dispatcher_blocked` gauge tracks.
const FAULTS: [&str; 4] = ["stuck", "failed-create", "wrong-queue", "failing"];

/// What the actions need: the settings, the template, the APIs they call, the stores they read
/// back from, and where they report.
pub struct Edges<'a> {
    pub settings: &'a Settings,
    pub template: Template,
    pub claims: Option<&'a Claims>,
    pub jobs: Api<Job>,
    pub events: Api<Event>,
    pub stores: Stores,
    pub metrics: Arc<Metrics>,
    /// The agent token, and any credentials in a URL, out of what Kubernetes says.
    pub redactor: Redactor,
}

impl Edges<'_> {
    /// The gauges of demand and supply, the blocked faults, and a hold's log line.
    pub fn report(&self, demand: &Demand, supply: &Supply, decision: &Decision, figures: &str) {
        let metrics = &self.metrics;
        for (state, n) in [("scheduled", demand.scheduled), ("running", demand.running)] {
            metrics
                .demand
                .get_or_create(&State { state })
                .set(i64::from(n));
        }
        metrics.agents.set(i64::from(demand.agents));
        let stuck = supply.stuck_jobs.iter().map(|j| j.pods.len() as u32).sum();
        for (state, n) in [
            ("pending", supply.pending),
            ("unschedulable", supply.unschedulable),
            ("running", supply.running),
            ("not-yet-created", supply.not_yet_created),
            ("stuck", stuck),
        ] {
            metrics
                .supply
                .get_or_create(&State { state })
                .set(i64::from(n));
        }
        let held = match &decision.action {
            Action::Hold(hold) => Some(hold),
            Action::Dispatch(_) => None,
        };
        for reason in FAULTS {
            let on = held.is_some_and(|h| h.name() == reason);
            metrics
                .blocked
                .get_or_create(&Reason { reason })
                .set(i64::from(on));
        }
        let Some(hold) = held else { return };
        metrics
            .holds
            .get_or_create(&Reason {
                reason: hold.name(),
            })
            .inc();
        let said = self.redactor.apply(&describe(hold));
        if hold.is_fault() {
            tracing::warn!(decision = "hold", reason = hold.name(), figures = %figures, "not dispatching: {said}");
        } else {
            tracing::info!(decision = "hold", reason = hold.name(), figures = %figures, "not dispatching: {said}");
        }
    }

    /// A dispatch's Job, created; the tick waits (briefly) for the watch to bring it, so that
    /// the next tick counts it.
    pub async fn carry_out(&self, decision: Decision, figures: &str) {
        let Action::Dispatch(agents) = decision.action else {
            return;
        };
        let d = self;
        let dispatch = Dispatch {
            id: random_id(),
            agents,
            active_deadline: d.settings.job_deadline,
            ttl: d.settings.job_ttl,
            idle_timeout: d.settings.idle_timeout,
            mirror_claim: d.claims.and_then(|m| m.handed_out()),
            acquire: None,
        };
        let job = d.template.job(&dispatch);
        let created = match d.jobs.create(&PostParams::default(), &job).await {
            Ok(created) => created,
            Err(e) => {
                self.metrics.kubernetes_error(&e);
                tracing::warn!(decision = "dispatch-failed", dispatch_id = %dispatch.id, agents, figures = %figures, "creating the Job for {agents} agents failed: {e}; the next tick decides again");
                return;
            }
        };
        d.metrics.dispatches.inc();
        d.metrics.pods_created.inc_by(u64::from(agents));
        let name = created.metadata.name.clone().unwrap_or_default();
        let mirror_claim = dispatch.mirror_claim.as_deref().unwrap_or("");
        tracing::info!(decision = "dispatch", dispatch_id = %dispatch.id, agents, job = %name, mirror_claim, figures = %figures, "dispatched {agents} agents as Job {name}");
        let message = format!(
            "{agents} agents for queue {} (dispatch {})",
            d.settings.queue, dispatch.id
        );
        let note = Note::normal("Dispatched", "Dispatch", message, &dispatch.id);
        self.record(&created, note).await;
        d.stores.wait_for_jobs(&[&name]).await;
    }

    /// Lets a Job's stuck pods go (the Job deleted, or its `parallelism` lowered to the pods
    /// that run), then reports each pod: a log line, the counter, and one Warning Event on the
    /// Job. Reported only once the call succeeded: a failed one is tried again next tick.
    pub async fn relieve(&self, job: &StuckJob, relief: &Relief) {
        match self.let_go(job, relief).await {
            Ok(true) => self.report_stuck(job, relief).await,
            Ok(false) => {}
            Err(e) => {
                self.metrics.kubernetes_error(&e);
                tracing::warn!(job = %job.job, "letting Job {}'s stuck pods go failed: {e}; the next tick tries again", job.job);
            }
        }
    }

    /// Deletes the Job `name` (only the one of `uid`) with its pods; whether it did. A failed
    /// call is logged and counted, and tried again by the next tick.
    pub async fn delete_job(&self, name: &str, uid: &str) -> bool {
        match self.delete(name, uid).await {
            Ok(deleted) => deleted,
            Err(e) => {
                self.metrics.kubernetes_error(&e);
                tracing::warn!(job = %name, "deleting Job {name} failed: {e}; the next tick tries again");
                false
            }
        }
    }

    /// False if the Job is gone already.
    async fn delete(&self, name: &str, uid: &str) -> Result<bool, kube::Error> {
        let params = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.jobs.delete(name, &params).await {
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            other => other.map(|_| true),
        }
    }

    /// The one API call that lets the pods go; false if the Job is gone already.
    async fn let_go(&self, job: &StuckJob, relief: &Relief) -> Result<bool, kube::Error> {
        let jobs = &self.jobs;
        match relief {
            Relief::DeleteJob => self.delete(&job.job, &job.uid).await,
            Relief::Parallelism { to, .. } => {
                let patch = serde_json::json!({"spec": {"parallelism": to}});
                let params = PatchParams::default();
                jobs.patch(&job.job, &params, &Patch::Merge(&patch)).await?;
                Ok(true)
            }
        }
    }

    /// A log line and the counter for each pod let go, and one Warning Event on its Job.
    async fn report_stuck(&self, job: &StuckJob, relief: &Relief) {
        let d = self;
        let action = match relief {
            Relief::DeleteJob => {
                "the Job was deleted with them: none of its pods started".to_string()
            }
            Relief::Parallelism { from, to } => {
                format!("its parallelism went from {from} to {to}, the pods that started")
            }
        };
        for pod in &job.pods {
            let message = d.redactor.apply(&pod.message);
            let reason = StuckReason {
                reason: pod.reason.clone(),
            };
            d.metrics.stuck_pods.get_or_create(&reason).inc();
            tracing::warn!(decision = "stuck", pod = %pod.pod, job = %job.job, dispatch_id = %pod.dispatch, reason = %pod.reason, waited_s = pod.waited.as_secs(), kubelet_message = %message,
                "agent pod {} of Job {} never started ({}: {message}) after {}s; let go: {action}; {}", pod.pod, job.job, pod.reason, pod.waited.as_secs(), remedy(&pod.reason));
        }
        let Some(first) = job.pods.first() else {
            return;
        };
        let message = d.redactor.apply(&format!(
            "{} agent pods never started: {}: {}; {action}; {}",
            job.pods.len(),
            first.reason,
            first.message,
            remedy(&first.reason)
        ));
        let mut note = Note::normal(STUCK_EVENT, "LetGo", message, &first.dispatch);
        note.warning = true;
        note.template = Some(first.template.clone());
        note.annotations
            .insert(STUCK_REASON_ANNOTATION.into(), first.reason.clone());
        let reference = Job {
            metadata: ObjectMeta {
                name: Some(job.job.clone()),
                // The API server refuses an Event whose object's namespace is not its own.
                namespace: d.jobs.namespace().map(String::from),
                uid: Some(job.uid.clone()),
                ..ObjectMeta::default()
            },
            ..Job::default()
        };
        self.record(&reference, note).await;
    }

    /// An Event on `job`, labelled with the queue and annotated with the template and dispatch,
    /// so that the dispatcher reads its own Events back (the stuck pods' backoff).
    async fn record(&self, job: &Job, note: Note) {
        let d = self;
        let now = Timestamp::now();
        let labels = BTreeMap::from([
            (QUEUE_LABEL.to_string(), d.settings.queue.clone()),
            (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        ]);
        let mut annotations = note.annotations;
        // The template the Job was made from: a Job let go after a rollout is the old one's.
        let template = note
            .template
            .unwrap_or_else(|| d.template.hash().to_string());
        annotations.insert(TEMPLATE_LABEL.into(), template);
        annotations.insert(DISPATCH_LABEL.into(), note.dispatch.clone());
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!(
                    "{}.",
                    job.metadata.name.clone().unwrap_or_default()
                )),
                labels: Some(labels),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("batch/v1".into()),
                kind: Some("Job".into()),
                name: job.metadata.name.clone(),
                namespace: job.metadata.namespace.clone(),
                uid: job.metadata.uid.clone(),
                ..ObjectReference::default()
            },
            reason: Some(note.reason.into()),
            message: Some(note.message.chars().take(EVENT_MESSAGE_LIMIT).collect()),
            type_: Some(if note.warning { "Warning" } else { "Normal" }.into()),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: Some(MicroTime(now)),
            reporting_component: Some("job-dispatcher".into()),
            reporting_instance: Some(note.dispatch),
            action: Some(note.action.into()),
            count: Some(1),
            ..Event::default()
        };
        if let Err(e) = d.events.create(&PostParams::default(), &event).await {
            tracing::debug!("could not record an Event on the Job: {e}");
        }
    }
}

/// An Event to record.
struct Note {
    reason: &'static str,
    action: &'static str,
    message: String,
    dispatch: String,
    warning: bool,
    annotations: BTreeMap<String, String>,
    /// The template's hash, when not this dispatcher's.
    template: Option<String>,
}

impl Note {
    fn normal(reason: &'static str, action: &'static str, message: String, dispatch: &str) -> Note {
        Note {
            reason,
            action,
            message,
            dispatch: dispatch.to_string(),
            warning: false,
            annotations: BTreeMap::new(),
            template: None,
        }
    }
}

/// Every number a decision used, for its log line.
pub fn figures(demand: &Demand, supply: &Supply, decision: &Decision) -> String {
    format!(
        "scheduled={} running={} agents={} pending={} unschedulable={} running_pods={} not_yet_created={} wanted={} alive={}",
        demand.scheduled, demand.running, demand.agents, supply.pending, supply.unschedulable,
        supply.running, supply.not_yet_created, decision.wanted, decision.alive
    )
}

/// What fixes a stuck pod, by its reason.
pub fn remedy(reason: &str) -> &'static str {
    match reason {
        "ErrImagePull" | "ImagePullBackOff" | "InvalidImageName" | "ErrImageNeverPull" => {
            "fix the template's image (its name, tag or digest, or the registry's pull secret)"
        }
        "CreateContainerConfigError" => {
            "create the Secret or ConfigMap (or key) the template names"
        }
        "CreateContainerError" => {
            "the node's container runtime could not create the container (its message says why): check the node's runtime, and the template's volumes and securityContext"
        }
        "FailedMount" | "FailedAttachVolume" | "ContainerCreating" => {
            "check the template's volumes: the claim, Secret or ConfigMap, and the storage driver"
        }
        "MissingClaim" => "create the claim the template mounts, or fix its name",
        "FailedCreate" => {
            "Kubernetes refuses the pods (a quota, a LimitRange or an admission webhook): raise the quota or lower DISPATCHER_MAX_AGENTS, or fit the template's resources to the LimitRange"
        }
        "Unschedulable" => {
            "no node had room within DISPATCHER_START_TIMEOUT: add capacity or an autoscaler, or lower DISPATCHER_MAX_AGENTS or the template's requests"
        }
        _ => "see kubectl describe pod",
    }
}

fn describe(hold: &Hold) -> String {
    match hold {
        Hold::Enough => "enough agents are alive or coming".into(),
        Hold::AtMax => "DISPATCHER_MAX_AGENTS agent pods are not finished".into(),
        Hold::RollingOut { id, online, size } => format!("dispatch {id} has {online} of {size} pods online; waiting for it to roll out"),
        Hold::Stuck { reason, dispatches, retry_in } => format!("the agent pods of the last {dispatches} dispatches never started ({reason}); the next dispatch in {}s, at once if a pod starts or the template changes; {}", retry_in.as_secs(), remedy(reason)),
        Hold::FailedCreate { message } => format!("Kubernetes refuses this queue's pods ({message}); the Job controller retries them; raise the quota or lower DISPATCHER_MAX_AGENTS"),
        Hold::Failing { why } => format!("the last dispatch's agents fail before taking a job: {why}; fix what they report, and the next dispatch is tried DISPATCHER_START_DEADLINE after that failure, or at once with a new template"),
        Hold::WrongQueue { running, agents } => format!("{running} agent pods have run past DISPATCHER_START_DEADLINE but the queue has {agents} agents: the template's agents register in another queue or cannot connect; check BUILDKITE_AGENT_TAGS and the token"),
    }
}

/// 32 hex digits, as Sourcegraph's dispatch IDs (a UUID without dashes).
pub fn random_id() -> String {
    let mut bytes = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = nanos.to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
