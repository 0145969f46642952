//! What Kubernetes says of the stacks mode's Jobs: one per Buildkite job (its UUID on the label
//! [`JOB_UUID_LABEL`]), each with at most one pod. A pure function of the watched Jobs, pods and
//! Events and the time, as [`crate::observe`] is for the metrics mode, whose reading of a pod
//! (started, waiting, stuck) it reuses.
//!
//! What a restart must not forget lives on the Job: until when its job is reserved
//! ([`RESERVED_UNTIL_ANNOTATION`]) and how far its timeline's notifications have gone
//! ([`NOTIFIED_ANNOTATION`]).

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;

use crate::decide::{Streak, StuckJob, StuckPod};
use crate::observe::{self, Life, Observed, Timeouts};
use crate::template::{DISPATCH_LABEL, JOB_UUID_LABEL, TEMPLATE_LABEL};

/// Until when the dispatcher last reserved the Job's job (RFC 3339).
pub const RESERVED_UNTIL_ANNOTATION: &str = "stateless-agent/reserved-until";
/// The last [`Stage`] announced on the job's timeline (its number).
pub const NOTIFIED_ANNOTATION: &str = "stateless-agent/notified";

/// How far a Job's pod has come, in the order the job's timeline is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Created = 1,
    Scheduled = 2,
    Pulling = 3,
    Started = 4,
}

pub const STAGES: [Stage; 4] = [
    Stage::Created,
    Stage::Scheduled,
    Stage::Pulling,
    Stage::Started,
];

/// Where a Job's pod is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodState {
    /// Not started yet, or its agent runs: how far it has come.
    Coming(Stage),
    /// Never started within the start timeout, or never can.
    Stuck(StuckPod),
    /// Ended (or its Job did) with no pod running: why, in Kubernetes' words.
    Ended(String),
}

/// One of the stacks mode's Jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackJob {
    pub name: String,
    pub uid: String,
    /// The Buildkite job's UUID.
    pub job: String,
    pub pod: PodState,
    /// The pod's name and node, for the timeline.
    pub pod_name: Option<String>,
    pub node: Option<String>,
    /// The Job is finished, or being deleted: it makes no more pods.
    pub finished: bool,
    /// Made suspended, it waits for its job's reservation before it makes a pod.
    pub suspended: bool,
    pub reserved_until: Option<Timestamp>,
    pub notified: u8,
}

/// What one tick observes of the stacks mode's Jobs.
pub struct StackSeen {
    pub jobs: Vec<StackJob>,
    /// The stuck streak, as the metrics mode reads it: the dispatcher's own `PodsStuck` Events
    /// of this template since a pod last started, and the pods stuck now. Each round of Jobs
    /// taken together is a dispatch.
    pub streak: Option<Streak>,
    /// A fresh `FailedCreate` on a Job of this template still without its pod: Kubernetes'
    /// message (a quota, a LimitRange, an admission webhook).
    pub refusal: Option<String>,
}

/// The stacks mode's Jobs in `seen`, with the stuck streak and the refusal over them.
pub fn observe(seen: &Observed, timeouts: &Timeouts) -> StackSeen {
    let jobs = stack_jobs(seen, timeouts);
    let stuck_now: Vec<StuckJob> = jobs
        .iter()
        .filter_map(|j| match &j.pod {
            PodState::Stuck(pod) => Some(StuckJob::one(&j.name, &j.uid, pod.clone())),
            _ => None,
        })
        .collect();
    let podless: HashMap<String, u32> = seen
        .jobs
        .iter()
        .filter(|j| observe::label(&j.metadata, TEMPLATE_LABEL) == seen.template)
        .filter_map(|j| j.metadata.uid.clone())
        .filter(|uid| {
            // No pod coming yet: none made, or the last one drained and its replacement not made.
            let job = jobs.iter().find(|j| &j.uid == uid);
            let waits = |j: &StackJob| matches!(j.pod, PodState::Coming(Stage::Created));
            job.is_some_and(|j| !j.finished && !j.suspended && waits(j))
        })
        .map(|uid| (uid, 1))
        .collect();
    StackSeen {
        streak: observe::streak(seen, &stuck_now),
        refusal: observe::refusal(seen, timeouts, &podless),
        jobs,
    }
}

/// Every Job of the stacks mode in `seen`.
fn stack_jobs(seen: &Observed, timeouts: &Timeouts) -> Vec<StackJob> {
    let mut out = Vec::new();
    for job in seen.jobs {
        let labels = job.metadata.labels.as_ref();
        let Some(uuid) = labels.and_then(|l| l.get(JOB_UUID_LABEL)) else {
            continue;
        };
        let uid = job.metadata.uid.clone().unwrap_or_default();
        let pod = seen
            .pods
            .iter()
            .filter(|p| observe::controller_uid(p).as_deref() == Some(uid.as_str()))
            .max_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
        let finished = observe::finished(job);
        let annotation = |key: &str| {
            let annotations = job.metadata.annotations.as_ref();
            annotations.and_then(|a| a.get(key)).cloned()
        };
        out.push(StackJob {
            name: job.metadata.name.clone().unwrap_or_default(),
            uid,
            job: uuid.clone(),
            pod: pod_state(job, pod.copied(), finished, seen, timeouts),
            pod_name: pod.and_then(|p| p.metadata.name.clone()),
            node: pod.and_then(|p| p.spec.as_ref()?.node_name.clone()),
            finished,
            suspended: suspended(job),
            reserved_until: annotation(RESERVED_UNTIL_ANNOTATION).and_then(|t| t.parse().ok()),
            notified: annotation(NOTIFIED_ANNOTATION)
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
        });
    }
    out
}

fn pod_state(
    job: &Job,
    pod: Option<&Pod>,
    finished: bool,
    seen: &Observed,
    timeouts: &Timeouts,
) -> PodState {
    let Some(pod) = pod else {
        return podless(job, finished, seen, timeouts);
    };
    match observe::life(pod, seen, timeouts) {
        Life::Stuck(stuck) => PodState::Stuck(stuck),
        Life::Started if !finished => PodState::Coming(Stage::Started),
        Life::Waiting { .. } if !finished => match outdated_image(pod, seen) {
            Some(stuck) => PodState::Stuck(stuck),
            None => PodState::Coming(waiting_stage(pod)),
        },
        // Drained, preempted or evicted: the Job ignores `DisruptionTarget` and makes the pod
        // again, so the job waits for that one rather than being failed.
        _ if !finished && disrupted(pod) => PodState::Coming(Stage::Created),
        _ => PodState::Ended(ending(pod)),
    }
}

/// A Job with no pod: coming until the start timeout, then stuck with the newest refusal
/// (`FailedCreate`: a quota, a LimitRange, an admission webhook); ended if the Job is.
fn podless(job: &Job, finished: bool, seen: &Observed, timeouts: &Timeouts) -> PodState {
    let uid = job.metadata.uid.as_deref();
    let refusal = seen
        .refusals
        .iter()
        .filter(|e| e.involved_object.uid.as_deref() == uid)
        .max_by_key(|e| observe::event_time(e))
        .and_then(|e| e.message.clone());
    if finished {
        let condition = job.status.as_ref().and_then(|s| s.conditions.as_ref());
        let said = condition
            .and_then(|c| c.iter().find(|c| c.status == "True"))
            .map(|c| {
                format!(
                    "{}: {}",
                    c.reason.clone().unwrap_or_default(),
                    c.message.clone().unwrap_or_default()
                )
            });
        let why = said.or(refusal).unwrap_or_else(|| "it was deleted".into());
        return PodState::Ended(format!("the Job ended without a pod ({why})"));
    }
    let created = job.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let waited = created.map_or(Duration::ZERO, |t| observe::elapsed(t, seen.now));
    // An older template's pod that a LimitRange or a webhook refuses never comes: the fix (a
    // new template) never reaches it. A quota's refusal ends as the quota frees, whatever the
    // template: that Job waits like any other.
    let template = observe::label(&job.metadata, TEMPLATE_LABEL);
    let uid = job.metadata.uid.clone().unwrap_or_default();
    let fresh = observe::refusal(seen, timeouts, &HashMap::from([(uid, 1)]));
    let lasting = fresh.is_some_and(|m| !m.contains("exceeded quota"));
    let outdated = lasting && template != seen.template;
    if (waited < timeouts.start_timeout && !outdated) || suspended(job) {
        return PodState::Coming(Stage::Created);
    }
    PodState::Stuck(StuckPod {
        pod: String::new(),
        dispatch: observe::label(&job.metadata, DISPATCH_LABEL),
        reason: "FailedCreate".into(),
        message: refusal.unwrap_or_else(|| "the Job controller made no pod".into()),
        waited,
        // Another template's: no streak of this one's.
        template: if outdated { template } else { String::new() },
    })
}

/// A pod of an older template that cannot pull its image is stuck at once: the fix (a new tag,
/// so a new template) never reaches a pod made before it, and each such pod holds a place under
/// `--max-agents` that the fixed template's pods need.
fn outdated_image(pod: &Pod, seen: &Observed) -> Option<StuckPod> {
    let (reason, message, _) = observe::waiting(pod, seen.pod_warnings);
    let template = observe::label(&pod.metadata, TEMPLATE_LABEL);
    if !IMAGE_ERRORS.contains(&reason.as_str()) || template == seen.template {
        return None;
    }
    let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
    Some(StuckPod {
        pod: pod.metadata.name.clone().unwrap_or_default(),
        dispatch: observe::label(&pod.metadata, DISPATCH_LABEL),
        reason,
        message: format!(
            "{message} (made from an older template: the new one's image never reaches this pod)"
        ),
        waited: created.map_or(Duration::ZERO, |t| observe::elapsed(t, seen.now)),
        template,
    })
}

/// The kubelet's waiting reasons for an image it could not pull (`pkg/kubelet/images/types.go`).
const IMAGE_ERRORS: [&str; 2] = ["ErrImagePull", "ImagePullBackOff"];

/// The pod has `DisruptionTarget=True`: the template's first podFailurePolicy rule ignores it.
fn disrupted(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    let conditions = status
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default();
    conditions
        .iter()
        .any(|c| c.type_ == "DisruptionTarget" && c.status == "True")
}

fn suspended(job: &Job) -> bool {
    job.spec.as_ref().and_then(|s| s.suspend) == Some(true)
}

fn waiting_stage(pod: &Pod) -> Stage {
    let status = pod.status.as_ref();
    let conditions = status
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default();
    let scheduled = conditions
        .iter()
        .any(|c| c.type_ == "PodScheduled" && c.status == "True");
    let containers = status.and_then(|s| s.container_statuses.as_deref());
    match (scheduled, containers.is_some_and(|c| !c.is_empty())) {
        (false, _) => Stage::Created,
        (true, false) => Stage::Scheduled,
        (true, true) => Stage::Pulling,
    }
}

/// How a pod ended, in Kubernetes' words: its reason (`Evicted`, `DeadlineExceeded`), or its
/// agent container's exit and the wrapper's report.
fn ending(pod: &Pod) -> String {
    let status = pod.status.as_ref();
    let phase = observe::phase(pod);
    let reason = status.and_then(|s| s.reason.clone());
    let message = status.and_then(|s| s.message.clone());
    let terminated = status
        .and_then(|s| s.container_statuses.as_deref())
        .unwrap_or_default()
        .iter()
        .find_map(|c| c.state.as_ref()?.terminated.clone());
    let mut said = format!("pod {} {phase}", pod.metadata.name.as_deref().unwrap_or(""));
    if pod.metadata.deletion_timestamp.is_some() {
        said.push_str(", being deleted");
    }
    if let Some(reason) = reason {
        said.push_str(&format!(": {reason}"));
    }
    if let Some(message) = message {
        said.push_str(&format!(": {message}"));
    }
    if let Some(t) = terminated {
        said.push_str(&format!("; its container exited {}", t.exit_code));
        if let Some(reason) = t.reason {
            said.push_str(&format!(" ({reason})"));
        }
        if let Some(message) = t.message.filter(|m| !m.is_empty()) {
            said.push_str(&format!(": {message}"));
        }
    }
    said
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: &str = "2026-12-03T12:10:00Z";

    fn timeouts() -> Timeouts {
        Timeouts {
            registered_by: Duration::from_secs(300),
            start_timeout: Duration::from_secs(300),
            refusal_fresh: Duration::from_secs(75),
        }
    }

    fn job(extra: serde_json::Value) -> Job {
        let mut value = json!({
            "metadata": {"name": "buildkite-j1", "uid": "u1",
                         "creationTimestamp": "2026-12-03T12:00:00Z",
                         "labels": {JOB_UUID_LABEL: "j1"}},
            "spec": {"template": {}},
        });
        if let serde_json::Value::Object(extra) = extra {
            for (k, v) in extra {
                value[k] = v;
            }
        }
        serde_json::from_value(value).unwrap()
    }

    fn pod(template: &str, status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "buildkite-j1-0-abcde", "creationTimestamp": "2026-12-03T12:09:00Z",
                "labels": {TEMPLATE_LABEL: template},
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "buildkite-j1",
                    "uid": "u1", "controller": true}]},
            "status": status,
        }))
        .unwrap()
    }

    /// The one stack Job of `jobs` and `pods`, as read at [`NOW`] for the template `t2`.
    fn read(job: &Job, pods: &[Pod]) -> PodState {
        let pods: Vec<&Pod> = pods.iter().collect();
        let jobs = [job];
        let seen = Observed {
            pods: &pods,
            jobs: &jobs,
            refusals: &[],
            own_events: &[],
            pod_warnings: &[],
            now: NOW.parse().unwrap(),
            template: "t2",
        };
        stack_jobs(&seen, &timeouts()).remove(0).pod
    }

    /// What the tick observes of `job` (no pod) under the FailedCreate `message`, at [`NOW`].
    fn refused(job: &Job, message: &str) -> StackSeen {
        let refusal: k8s_openapi::api::core::v1::Event = serde_json::from_value(json!({
            "metadata": {"name": "e"}, "reason": "FailedCreate", "type": "Warning",
            "message": message, "lastTimestamp": "2026-12-03T12:09:50Z",
            "involvedObject": {"kind": "Job", "name": "buildkite-j1", "uid": "u1"}}))
        .unwrap();
        let (jobs, refusals) = ([job], [&refusal]);
        let seen = Observed {
            pods: &[],
            jobs: &jobs,
            refusals: &refusals,
            own_events: &[],
            pod_warnings: &[],
            now: NOW.parse().unwrap(),
            template: "t2",
        };
        observe(&seen, &timeouts())
    }

    #[test]
    fn a_refusal_of_this_template_holds_and_an_older_ones_limit_range_is_stuck_at_once() {
        // Made a minute ago, within the start timeout.
        let labelled = |template: &str| {
            let mut j = job(json!({}));
            let labels = j.metadata.labels.as_mut().unwrap();
            labels.insert(TEMPLATE_LABEL.into(), template.into());
            let made = "2026-12-03T12:09:00Z".parse().unwrap();
            j.metadata.creation_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(made));
            j
        };
        let limit = "Error creating: pods \"x\" is forbidden: maximum cpu usage per Container is 2, but limit is 4.";
        let quota = "Error creating: pods \"x\" is forbidden: exceeded quota: agent-pods";
        // This template's: a refusal the plan holds on; the Job waits out the start timeout.
        let now = refused(&labelled("t2"), limit);
        assert_eq!(now.refusal.as_deref(), Some(limit));
        assert_eq!(now.jobs[0].pod, PodState::Coming(Stage::Created));
        // An older template's LimitRange refusal: stuck at once, and no refusal of this one.
        let young = labelled("t1");
        let old = refused(&young, limit);
        assert_eq!(old.refusal, None);
        assert!(matches!(&old.jobs[0].pod, PodState::Stuck(p) if p.template == "t1"));
        // An older template's quota refusal ends as the quota frees: it waits.
        let waits = refused(&young, quota);
        assert_eq!(waits.jobs[0].pod, PodState::Coming(Stage::Created));
    }

    fn pulling(reason: &str) -> serde_json::Value {
        json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "agent", "image": "i", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"waiting": {"reason": reason, "message": "no such tag"}}}]})
    }

    #[test]
    fn a_drained_pod_whose_job_makes_another_is_not_an_end() {
        let drained = pod(
            "t2",
            json!({"phase": "Failed", "reason": "Evicted",
            "conditions": [{"type": "DisruptionTarget", "status": "True"}]}),
        );
        assert_eq!(
            read(&job(json!({})), std::slice::from_ref(&drained)),
            PodState::Coming(Stage::Created)
        );
        let failed = job(
            json!({"status": {"conditions": [{"type": "Failed", "status": "True",
            "reason": "BackoffLimitExceeded", "message": "limit"}]}}),
        );
        assert!(
            matches!(read(&failed, &[drained]), PodState::Ended(how) if how.contains("Evicted"))
        );
    }

    #[test]
    fn a_pod_that_ran_its_job_is_an_end_before_its_job_completes() {
        let done = pod("t2", json!({"phase": "Succeeded"}));
        assert!(matches!(read(&job(json!({})), &[done]), PodState::Ended(_)));
    }

    #[test]
    fn an_older_templates_pod_that_cannot_pull_is_stuck_at_once() {
        let old = pod("t1", pulling("ImagePullBackOff"));
        assert!(
            matches!(read(&job(json!({})), &[old]), PodState::Stuck(s) if s.message.contains("older template"))
        );
        let current = pod("t2", pulling("ImagePullBackOff"));
        assert_eq!(
            read(&job(json!({})), &[current]),
            PodState::Coming(Stage::Pulling)
        );
    }

    #[test]
    fn a_suspended_job_waits_for_its_reservation_past_the_start_timeout() {
        let suspended = job(json!({"spec": {"template": {}, "suspend": true}}));
        assert_eq!(read(&suspended, &[]), PodState::Coming(Stage::Created));
        assert!(
            matches!(read(&job(json!({})), &[]), PodState::Stuck(s) if s.reason == "FailedCreate")
        );
    }
}
