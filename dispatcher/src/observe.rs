//! What Kubernetes says of this queue's supply, from the watched Pods, Jobs and Events: a pure
//! function of those objects and the time, turned into the [`Supply`] the decision takes.
//!
//! A pod is one of: started (its agent container runs or ran), waiting to start, or stuck. A pod
//! waiting to start counts as supply, Unschedulable ones included, since a pending pod is the
//! very signal that makes an autoscaler add a node. It is stuck once it has waited
//! `start_timeout`, or at once in a state that can never end well (`InvalidImageName`,
//! `ErrImageNeverPull`, a claim being deleted): then it is no longer supply, and the decision
//! has its Job let it go ([`crate::decide::relieve`]). A stuck pod never ran its agent, so it
//! holds no Buildkite job.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::jiff::Timestamp;

use crate::decide::{LastDispatch, Streak, StuckJob, StuckPod, Supply};
use crate::template::{DISPATCH_LABEL, TEMPLATE_LABEL};

/// The reason of the dispatcher's own Event on a Job whose pods were stuck; its annotations
/// carry what the backoff reads back after a restart.
pub const STUCK_EVENT: &str = "PodsStuck";
pub const STUCK_REASON_ANNOTATION: &str = "stateless-agent/stuck-reason";

/// Waiting states the kubelet never leaves by itself (`pkg/kubelet/images/types.go`).
const HOPELESS: [&str; 2] = ["InvalidImageName", "ErrImageNeverPull"];

/// The observed objects and the clock.
pub struct Observed<'a> {
    pub pods: &'a [&'a Pod],
    pub jobs: &'a [&'a Job],
    /// The namespace's `FailedCreate` Events.
    pub refusals: &'a [&'a Event],
    /// The dispatcher's own Events for this queue.
    pub own_events: &'a [&'a Event],
    /// Warning Events on pods (`FailedMount`, `FailedAttachVolume`): what the kubelet says of a
    /// pod that waits with no reason on its container.
    pub pod_warnings: &'a [&'a Event],
    pub now: Timestamp,
    /// The agent template's hash: Jobs and Events of another template say nothing of this one.
    pub template: &'a str,
}

/// The time limits the observation applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// How long a running pod's agent may take to register (`--start-deadline`).
    pub registered_by: Duration,
    /// How long a pod may take to start its agent container (`--start-timeout`).
    pub start_timeout: Duration,
    /// How recent a `FailedCreate` must be to be a refusal still going on: the Job controller
    /// retries a refused create at least this often.
    pub refusal_fresh: Duration,
}

/// Where a pod is in its life.
pub(crate) enum Life {
    /// Being deleted, or ended: neither supply nor stuck.
    Gone,
    Succeeded,
    Started,
    Waiting {
        unschedulable: bool,
    },
    Stuck(StuckPod),
}

/// Reads the supply.
pub fn supply(seen: &Observed, timeouts: &Timeouts) -> Supply {
    let mut supply = Supply::default();
    let mut per_job = pods_by_job(seen, timeouts, &mut supply);
    let unfinished: Vec<&&Job> = seen.jobs.iter().filter(|j| !finished(j)).collect();
    let mut missing: HashMap<String, u32> = HashMap::new();
    for job in &unfinished {
        let uid = job.metadata.uid.clone().unwrap_or_default();
        let mut pods = per_job.remove(&uid).unwrap_or_default();
        let coming = coming(job, &pods);
        // An older template's pods that Kubernetes refuses (a LimitRange the new template was
        // made to fit) will not come, and their refusals say nothing of the new template.
        let outdated = label(&job.metadata, TEMPLATE_LABEL) != seen.template;
        let refused = outdated.then(|| outdated_refusal(job, coming, seen, timeouts));
        match refused.flatten() {
            Some(refused) => pods.stuck.push(refused),
            None => {
                supply.not_yet_created += coming;
                if !outdated {
                    missing.insert(uid.clone(), coming);
                }
            }
        }
        if !pods.stuck.is_empty() {
            supply.stuck_jobs.push(StuckJob {
                job: job.metadata.name.clone().unwrap_or_default(),
                uid,
                parallelism: parallelism(job),
                healthy: pods.healthy,
                pods: pods.stuck,
            });
        }
    }
    supply.failed_create = refusal(seen, timeouts, &missing);
    supply.streak = streak(seen, &supply.stuck_jobs);
    supply.failing = failing(seen, timeouts.registered_by);
    supply.last = last_dispatch(&unfinished, seen, &per_job_online(seen));
    supply
}

/// Each pod counted in `supply` by where it is, and gathered by its Job's uid.
fn pods_by_job(
    seen: &Observed,
    timeouts: &Timeouts,
    supply: &mut Supply,
) -> HashMap<String, JobPods> {
    let mut per_job: HashMap<String, JobPods> = HashMap::new();
    for pod in seen.pods {
        let job = per_job.entry(controller_uid(pod).unwrap_or_default());
        let job = job.or_default();
        match life(pod, seen, timeouts) {
            Life::Gone => {}
            Life::Succeeded => job.succeeded += 1,
            Life::Started => {
                job.healthy += 1;
                if phase(pod) == "Running" {
                    supply.running += 1;
                    let since = started_at(pod).map(|t| elapsed(t, seen.now));
                    if since.is_some_and(|s| s >= timeouts.registered_by) {
                        supply.running_long += 1;
                    }
                }
            }
            Life::Waiting { unschedulable } => {
                job.healthy += 1;
                match unschedulable {
                    true => supply.unschedulable += 1,
                    false => supply.pending += 1,
                }
            }
            Life::Stuck(stuck) => job.stuck.push(stuck),
        }
    }
    per_job
}

/// The pods a Job has still to get: as many as the Job controller keeps active
/// (`parallelism`, or fewer when fewer indexes are left: `completions` minus those that
/// succeeded, the Job's count too in case their objects are gone, and those failed for good),
/// less the pods alive or stuck; a failed pod whose index is retried, or a deleted one, is
/// coming again. The Job's `active` lags behind pods that have just failed, so it is not used.
fn coming(job: &Job, pods: &JobPods) -> u32 {
    let status = job.status.as_ref();
    let counted = status.and_then(|s| s.succeeded).unwrap_or(0).max(0) as u32;
    let failed_indexes = status
        .and_then(|s| s.failed_indexes.as_deref())
        .map_or(0, count_indexes);
    let left = completions(job).saturating_sub(pods.succeeded.max(counted) + failed_indexes);
    let here = pods.healthy + pods.stuck.len() as u32;
    parallelism(job).min(left).saturating_sub(here)
}

/// A Job's pods, by where they are.
#[derive(Default)]
struct JobPods {
    /// Started or waiting to start, not being deleted.
    healthy: u32,
    succeeded: u32,
    stuck: Vec<StuckPod>,
}

/// Where `pod` is in its life.
pub(crate) fn life(pod: &Pod, seen: &Observed, timeouts: &Timeouts) -> Life {
    if pod.metadata.deletion_timestamp.is_some() {
        return Life::Gone;
    }
    match phase(pod) {
        "Succeeded" => return Life::Succeeded,
        "Failed" => return Life::Gone,
        _ => {}
    }
    if started_at(pod).is_some() || phase(pod) == "Running" {
        return Life::Started;
    }
    let (reason, message, hopeless) = waiting(pod, seen.pod_warnings);
    let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let waited = created.map_or(Duration::ZERO, |t| elapsed(t, seen.now));
    if hopeless || waited >= timeouts.start_timeout {
        return Life::Stuck(StuckPod {
            pod: pod.metadata.name.clone().unwrap_or_default(),
            dispatch: label(&pod.metadata, DISPATCH_LABEL),
            reason,
            message,
            waited,
            template: label(&pod.metadata, TEMPLATE_LABEL),
        });
    }
    Life::Waiting {
        unschedulable: reason == "Unschedulable" || reason == "MissingClaim",
    }
}

/// Why a pod has not started: the reason, the message, and whether it can never start.
pub(crate) fn waiting(pod: &Pod, warnings: &[&Event]) -> (String, String, bool) {
    let status = pod.status.as_ref();
    let conditions = status
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default();
    let unscheduled = conditions.iter().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    });
    if let Some(c) = unscheduled {
        let message = c.message.clone().unwrap_or_default();
        // The volume binder's words (`persistentvolumeclaim "x" not found` / `is being
        // deleted`): no node will ever do, whatever an autoscaler adds.
        let claim = message.contains("persistentvolumeclaim");
        let reason = if claim {
            "MissingClaim"
        } else {
            "Unschedulable"
        };
        let hopeless = claim && message.contains("is being deleted");
        return (reason.into(), message, hopeless);
    }
    let statuses = status
        .and_then(|s| s.container_statuses.as_deref())
        .unwrap_or_default();
    let waiting = statuses
        .iter()
        .find_map(|c| c.state.as_ref()?.waiting.clone());
    let (reason, message) = match waiting {
        Some(w) => (w.reason.unwrap_or_default(), w.message.unwrap_or_default()),
        None => (String::new(), String::new()),
    };
    if !message.is_empty()
        || !matches!(
            reason.as_str(),
            "" | "ContainerCreating" | "PodInitializing"
        )
    {
        let hopeless = HOPELESS.contains(&reason.as_str());
        return (reason, message, hopeless);
    }
    // Waiting on a volume: the kubelet says why only in Events on the pod.
    let name = pod.metadata.name.as_deref();
    let told = warnings
        .iter()
        .filter(|e| e.involved_object.name.as_deref() == name)
        .max_by_key(|e| event_time(e));
    match told {
        Some(e) => (
            e.reason.clone().unwrap_or_default(),
            e.message.clone().unwrap_or_default(),
            false,
        ),
        None if reason.is_empty() => ("Pending".into(), String::new(), false),
        None => (reason, message, false),
    }
}

/// An older template's Job still missing `coming` pods, with a fresh refusal: its missing pods
/// as one stuck pod (`FailedCreate`, Kubernetes' message), for the Job to be let go.
fn outdated_refusal(
    job: &Job,
    coming: u32,
    seen: &Observed,
    timeouts: &Timeouts,
) -> Option<StuckPod> {
    let uid = job.metadata.uid.clone().unwrap_or_default();
    let missing = HashMap::from([(uid, coming)]);
    let message = refusal(seen, timeouts, &missing)?;
    let created = job.metadata.creation_timestamp.as_ref().map(|t| t.0);
    Some(StuckPod {
        pod: format!("({coming} not created)"),
        dispatch: label(&job.metadata, DISPATCH_LABEL),
        reason: "FailedCreate".into(),
        message,
        waited: created.map_or(Duration::ZERO, |t| elapsed(t, seen.now)),
        template: label(&job.metadata, TEMPLATE_LABEL),
    })
}

/// The newest `FailedCreate` on an unfinished Job that still misses pods, if it is fresh:
/// Kubernetes' own message. A refusal that has stopped (the quota freed, the pods made) holds
/// nothing back.
pub(crate) fn refusal(
    seen: &Observed,
    timeouts: &Timeouts,
    missing: &HashMap<String, u32>,
) -> Option<String> {
    seen.refusals
        .iter()
        .filter(|e| e.reason.as_deref() == Some("FailedCreate"))
        .filter(|e| {
            let uid = e.involved_object.uid.as_deref().unwrap_or("");
            missing.get(uid).is_some_and(|n| *n > 0)
        })
        .filter(|e| event_time(e).is_some_and(|t| elapsed(t, seen.now) < timeouts.refusal_fresh))
        .max_by_key(|e| event_time(e))
        .and_then(|e| e.message.clone())
}

/// The run of dispatches whose pods were stuck since a pod last started, for this template:
/// the dispatcher's own Events (so a restart keeps the backoff), and the pods stuck now.
pub fn streak(seen: &Observed, stuck_now: &[StuckJob]) -> Option<Streak> {
    let last_start = seen.pods.iter().filter_map(|p| started_at(p)).max();
    let mut dispatches: BTreeSet<String> = BTreeSet::new();
    let mut newest: Option<(Timestamp, String)> = None;
    for event in seen.own_events {
        let annotations = event.metadata.annotations.as_ref();
        let note = |key: &str| annotations.and_then(|a| a.get(key)).cloned();
        let ours = event.reason.as_deref() == Some(STUCK_EVENT)
            && note(TEMPLATE_LABEL).as_deref() == Some(seen.template);
        let Some(at) = event_time(event).filter(|at| ours && last_start.is_none_or(|s| s < *at))
        else {
            continue;
        };
        dispatches.insert(note(DISPATCH_LABEL).unwrap_or_default());
        if newest.as_ref().is_none_or(|(t, _)| at > *t) {
            newest = Some((at, note(STUCK_REASON_ANNOTATION).unwrap_or_default()));
        }
    }
    let mut since = newest.as_ref().map(|(t, _)| elapsed(*t, seen.now));
    let mut reason = newest.map(|(_, r)| r);
    // Another template's pods are let go all the same, but what failed with it says nothing
    // of this one.
    let this_template = |p: &&StuckPod| p.template == seen.template;
    for pod in stuck_now.iter().flat_map(|j| &j.pods).filter(this_template) {
        dispatches.insert(pod.dispatch.clone());
        since = Some(Duration::ZERO);
        reason = Some(pod.reason.clone());
    }
    Some(Streak {
        reason: reason?,
        dispatches: dispatches.len() as u32,
        since_last: since?,
    })
}

/// Per Job uid: its pods that came online (running, or ended).
fn per_job_online(seen: &Observed) -> HashMap<String, u32> {
    let mut online = HashMap::new();
    for pod in seen.pods {
        if matches!(phase(pod), "Running" | "Succeeded" | "Failed") {
            *online
                .entry(controller_uid(pod).unwrap_or_default())
                .or_default() += 1;
        }
    }
    online
}

/// The newest unfinished dispatch's rollout, of this template.
fn last_dispatch(
    unfinished: &[&&Job],
    seen: &Observed,
    online: &HashMap<String, u32>,
) -> Option<LastDispatch> {
    // Of this template: a broken one's last Job, still waiting on pods that will never come
    // online, must not hold the fixed template's first dispatch back.
    let newest = unfinished
        .iter()
        .filter(|j| label(&j.metadata, TEMPLATE_LABEL) == seen.template)
        .filter(|j| labelled(j, DISPATCH_LABEL))
        .max_by_key(|j| j.metadata.creation_timestamp.as_ref().map(|t| t.0))?;
    let uid = newest.metadata.uid.clone().unwrap_or_default();
    Some(LastDispatch {
        id: label(&newest.metadata, DISPATCH_LABEL),
        size: parallelism(newest),
        online: online.get(&uid).copied().unwrap_or(0),
        age: newest
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(Duration::ZERO, |t| elapsed(t.0, seen.now)),
    })
}

/// How many indexes a Job's `failedIndexes` names (`1,3-5` is four).
fn count_indexes(list: &str) -> u32 {
    let ranges = list.split(',').filter(|r| !r.trim().is_empty());
    ranges
        .map(|r| match r.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (a.trim().parse::<u32>(), b.trim().parse::<u32>());
                b.unwrap_or(0).saturating_sub(a.unwrap_or(0)) + 1
            }
            None => 1,
        })
        .sum()
}

/// Whether the newest dispatch of this template is failing: it has failed indexes (agents that
/// failed for good) and not one of its pods has succeeded, and it is unfinished or ended Failed
/// less than `window` ago. Its agents die before taking a job (a wrong token, a broken image),
/// so another dispatch would too; after `window`, or with another template, one more is tried.
/// Why: its condition or failed indexes, and what a failed pod said (the wrapper's report's
/// message, kept by [`brief`]). A disruption never gets here: the template's rules ignore
/// `DisruptionTarget` before anything else.
fn failing(seen: &Observed, window: Duration) -> Option<String> {
    let newest = seen
        .jobs
        .iter()
        .filter(|j| {
            labelled(j, DISPATCH_LABEL) && label(&j.metadata, TEMPLATE_LABEL) == seen.template
        })
        .max_by_key(|j| j.metadata.creation_timestamp.as_ref().map(|t| t.0))?;
    let status = newest.status.as_ref()?;
    let name = newest.metadata.name.as_deref().unwrap_or("");
    let failed = status
        .conditions
        .iter()
        .flatten()
        .find(|c| matches!(c.type_.as_str(), "Failed" | "FailureTarget") && c.status == "True");
    let why = match failed {
        Some(c) => {
            let at = c.last_transition_time.as_ref()?.0;
            if elapsed(at, seen.now) >= window {
                return None;
            }
            let reason = c.reason.as_deref().unwrap_or("Failed");
            format!(
                "Job {name} failed ({reason}: {})",
                c.message.as_deref().unwrap_or("")
            )
        }
        None if finished(newest) => return None,
        None => {
            let indexes = status.failed_indexes.as_deref().map_or(0, count_indexes);
            if indexes == 0 {
                return None;
            }
            format!("Job {name} has {indexes} agent pods failed for good")
        }
    };
    let uid = newest.metadata.uid.as_deref();
    let own: Vec<&&Pod> = seen
        .pods
        .iter()
        .filter(|p| controller_uid(p).as_deref() == uid)
        .collect();
    if own.iter().any(|p| phase(p) == "Succeeded") {
        return None;
    }
    let said = own
        .iter()
        .filter_map(|p| {
            p.status
                .as_ref()?
                .container_statuses
                .as_ref()?
                .first()
                .cloned()
        })
        .filter_map(|c| c.state?.terminated?.message)
        .find(|m| !m.is_empty());
    Some(match said {
        Some(said) => format!("{why}, none succeeded; a pod said: {said}"),
        None => format!("{why}, none succeeded"),
    })
}

/// A termination message cut to what the dispatcher reads: agent-wrapper's report is a JSON
/// object whose `message` says how the pod ended; anything else, its first 200 characters.
/// The reports' other fields are the pods' business, and 5,000 of them would cost megabytes.
pub fn brief(message: &str) -> String {
    let report: Option<serde_json::Value> = serde_json::from_str(message).ok();
    let said = report.as_ref().and_then(|r| r["message"].as_str());
    said.unwrap_or(message).chars().take(200).collect()
}

pub(crate) fn elapsed(since: Timestamp, now: Timestamp) -> Duration {
    let secs = now.as_second() - since.as_second();
    Duration::from_secs(secs.max(0) as u64)
}

pub(crate) fn phase(pod: &Pod) -> &str {
    let status = pod.status.as_ref();
    status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending")
}

/// When the pod's first container to start did (running, or ended after running); for a
/// running pod whose containers say nothing, its `startTime`.
fn started_at(pod: &Pod) -> Option<Timestamp> {
    let status = pod.status.as_ref()?;
    let fallback = || match phase(pod) {
        "Running" => status.start_time.as_ref().map(|t| t.0),
        _ => None,
    };
    let statuses = status.container_statuses.as_deref().unwrap_or_default();
    let started = statuses
        .iter()
        .filter_map(|c| {
            let state = c.state.as_ref()?;
            let running = state.running.as_ref().and_then(|r| r.started_at.as_ref());
            let ran = state
                .terminated
                .as_ref()
                .and_then(|t| t.started_at.as_ref());
            running.or(ran).map(|t| t.0)
        })
        .min();
    started.or_else(fallback)
}

/// When an Event last happened: `lastTimestamp`, else `eventTime`, else `firstTimestamp`.
pub(crate) fn event_time(event: &Event) -> Option<Timestamp> {
    let last = event.last_timestamp.as_ref().map(|t| t.0);
    let at = event.event_time.as_ref().map(|t| t.0);
    last.or(at).or(event.first_timestamp.as_ref().map(|t| t.0))
}

fn parallelism(job: &Job) -> u32 {
    job.spec
        .as_ref()
        .and_then(|s| s.parallelism)
        .unwrap_or(1)
        .max(0) as u32
}

/// A Job's `completions` (the dispatcher's equal `parallelism` until stuck pods lower that).
fn completions(job: &Job) -> u32 {
    let spec = job.spec.as_ref();
    let set = spec.and_then(|s| s.completions).map(|c| c.max(0) as u32);
    set.unwrap_or_else(|| parallelism(job))
}

pub(crate) fn label(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    key: &str,
) -> String {
    let labels: Option<&BTreeMap<String, String>> = meta.labels.as_ref();
    labels.and_then(|l| l.get(key).cloned()).unwrap_or_default()
}

fn labelled(job: &Job, key: &str) -> bool {
    job.metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(key))
}

/// The uid of the Job that owns `pod`.
pub(crate) fn controller_uid(pod: &Pod) -> Option<String> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "Job" && o.controller == Some(true))
        .map(|o| o.uid.clone())
}

/// A Job that will make no more pods: `Complete` or `Failed`, or on its way there
/// (`SuccessCriteriaMet`, `FailureTarget`: 1.31+ set these first, while its pods stop), or being
/// deleted.
pub fn finished(job: &Job) -> bool {
    const ENDS: [&str; 4] = ["Complete", "Failed", "SuccessCriteriaMet", "FailureTarget"];
    let conditions = job.status.as_ref().and_then(|s| s.conditions.as_ref());
    job.metadata.deletion_timestamp.is_some()
        || conditions.is_some_and(|c| {
            c.iter()
                .any(|c| ENDS.contains(&c.type_.as_str()) && c.status == "True")
        })
}

/// When the newest of the shared mirror's populate Jobs succeeded: its last refresh. A Job's
/// `completionTime` is set when it succeeds, and only then (a populate that failed for any
/// repository exits non-zero, so its Job does not succeed).
pub fn refreshed_at<'a>(populates: impl IntoIterator<Item = &'a Job>) -> Option<Timestamp> {
    let completed = populates.into_iter().filter_map(|j| j.status.as_ref());
    completed
        .filter_map(|s| Some(s.completion_time.as_ref()?.0))
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: &str = "2026-11-30T10:10:00Z";
    const TEMPLATE: &str = "t1";

    fn timeouts() -> Timeouts {
        Timeouts {
            registered_by: Duration::from_secs(300),
            start_timeout: Duration::from_secs(300),
            refusal_fresh: Duration::from_secs(75),
        }
    }

    fn job(uid: &str, parallelism: i32, created: &str, extra: serde_json::Value) -> Job {
        let mut value = json!({
            "metadata": {"name": uid, "uid": uid, "creationTimestamp": created,
                         "labels": {DISPATCH_LABEL: format!("id-{uid}"), TEMPLATE_LABEL: TEMPLATE}},
            "spec": {"parallelism": parallelism, "template": {}},
        });
        if let serde_json::Value::Object(extra) = extra {
            for (k, v) in extra {
                value[k] = v;
            }
        }
        serde_json::from_value(value).unwrap()
    }

    /// A pod of Job `owner`, created at `created`, with `status`.
    fn pod_at(owner: &str, name: &str, created: &str, status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "creationTimestamp": created,
                "labels": {DISPATCH_LABEL: format!("id-{owner}"), TEMPLATE_LABEL: TEMPLATE},
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": owner,
                    "uid": owner, "controller": true}]},
            "status": status,
        }))
        .unwrap()
    }

    fn pod(owner: &str, status: serde_json::Value) -> Pod {
        pod_at(owner, &format!("{owner}-x"), "2026-11-30T10:09:00Z", status)
    }

    fn running(since: &str) -> serde_json::Value {
        json!({"phase": "Running", "startTime": since, "containerStatuses": [{"name": "agent",
            "image": "i", "imageID": "", "ready": true, "restartCount": 0,
            "state": {"running": {"startedAt": since}}}]})
    }

    fn waiting(reason: &str, message: &str) -> serde_json::Value {
        json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "agent", "image": "i", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"waiting": {"reason": reason, "message": message}}}]})
    }

    fn unschedulable(message: &str) -> serde_json::Value {
        json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
            "reason": "Unschedulable", "message": message}]})
    }

    fn event(value: serde_json::Value) -> Event {
        serde_json::from_value(value).unwrap()
    }

    /// The supply of these objects at [`NOW`].
    fn read(pods: &[Pod], jobs: &[Job], events: &[Event]) -> Supply {
        let pods: Vec<&Pod> = pods.iter().collect();
        let jobs: Vec<&Job> = jobs.iter().collect();
        let refusals: Vec<&Event> = events
            .iter()
            .filter(|e| e.reason.as_deref() == Some("FailedCreate"))
            .collect();
        let own: Vec<&Event> = events
            .iter()
            .filter(|e| e.reason.as_deref() == Some(STUCK_EVENT))
            .collect();
        let warnings: Vec<&Event> = events
            .iter()
            .filter(|e| {
                e.type_.as_deref() == Some("Warning") && e.reason.as_deref() != Some("FailedCreate")
            })
            .collect();
        let seen = Observed {
            pods: &pods,
            jobs: &jobs,
            refusals: &refusals,
            own_events: &own,
            pod_warnings: &warnings,
            now: NOW.parse().unwrap(),
            template: TEMPLATE,
        };
        supply(&seen, &timeouts())
    }

    #[test]
    fn pods_and_jobs_become_the_supply_unschedulable_ones_coming() {
        let jobs = [
            job("a", 4, "2026-11-30T10:00:00Z", json!({})),
            job("b", 3, "2026-11-30T10:09:30Z", json!({})),
            job(
                "done",
                9,
                "2026-11-30T09:00:00Z",
                json!({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}),
            ),
        ];
        let pods = [
            pod_at(
                "a",
                "a-1",
                "2026-11-30T10:00:00Z",
                running("2026-11-30T10:01:00Z"),
            ),
            pod("a", json!({"phase": "Succeeded"})),
            pod(
                "a",
                unschedulable("0/3 nodes are available: 3 Insufficient cpu."),
            ),
            pod("b", running("2026-11-30T10:09:50Z")),
            pod("b", json!({"phase": "Pending"})),
        ];
        let s = read(&pods, &jobs, &[]);
        assert_eq!(
            (s.pending, s.unschedulable, s.running, s.running_long),
            (1, 1, 2, 1)
        );
        // a: 4 wanted, 3 pods seen; b: 3 wanted, 2 seen.
        assert_eq!(s.not_yet_created, 2);
        assert!(s.stuck_jobs.is_empty() && s.streak.is_none());
        let last = s.last.unwrap();
        assert_eq!((last.id.as_str(), last.size, last.online), ("id-b", 3, 1));
        assert_eq!(last.age, Duration::from_secs(30));
        // A newer Job of another template (a broken image since fixed) holds no rollout back.
        let mut broken = job("c", 5, "2026-11-30T10:09:50Z", json!({}));
        let labels = broken.metadata.labels.as_mut().unwrap();
        labels.insert(TEMPLATE_LABEL.into(), "t0".into());
        let mut all = jobs.to_vec();
        all.push(broken);
        assert_eq!(read(&pods, &all, &[]).last.unwrap().id, "id-b");
    }

    #[test]
    fn pods_that_never_start_are_stuck_after_the_timeout_or_at_once_when_hopeless() {
        let jobs = [job("j", 5, "2026-11-30T10:00:00Z", json!({}))];
        let old = "2026-11-30T10:04:00Z";
        let pods = [
            pod_at("j", "j-run", old, running("2026-11-30T10:05:00Z")),
            pod_at(
                "j",
                "j-pull",
                old,
                waiting("ImagePullBackOff", "Back-off pulling image \"x\""),
            ),
            pod_at(
                "j",
                "j-young",
                "2026-11-30T10:08:00Z",
                waiting("ErrImagePull", "not found"),
            ),
            pod_at(
                "j",
                "j-bad",
                "2026-11-30T10:09:59Z",
                waiting("InvalidImageName", "couldn't parse image name \"X::\""),
            ),
            pod_at("j", "j-mount", old, waiting("ContainerCreating", "")),
        ];
        let mount = event(
            json!({"metadata": {"name": "e"}, "type": "Warning", "reason": "FailedMount",
            "message": "MountVolume.SetUp failed for volume \"cfg\" : configmap \"cfg\" not found",
            "involvedObject": {"kind": "Pod", "name": "j-mount"}, "lastTimestamp": "2026-11-30T10:09:00Z"}),
        );
        let s = read(&pods, &jobs, &[mount]);
        assert_eq!(s.stuck_jobs.len(), 1);
        let stuck = &s.stuck_jobs[0];
        let reasons: Vec<(&str, &str)> = stuck
            .pods
            .iter()
            .map(|p| (p.pod.as_str(), p.reason.as_str()))
            .collect();
        assert_eq!(
            reasons,
            [
                ("j-pull", "ImagePullBackOff"),
                ("j-bad", "InvalidImageName"),
                ("j-mount", "FailedMount")
            ]
        );
        assert!(stuck.pods[2]
            .message
            .contains("configmap \"cfg\" not found"));
        // The running pod and the young one are what the Job keeps; none is supply twice.
        assert_eq!((stuck.healthy, stuck.parallelism), (2, 5));
        assert_eq!((s.running, s.pending, s.not_yet_created), (1, 1, 0));
        let streak = s.streak.unwrap();
        assert_eq!((streak.dispatches, streak.since_last), (1, Duration::ZERO));
        // Pods of another template (the one just fixed) are let go, and hold nothing back.
        let mut old_template = pods[1].clone();
        let labels = old_template.metadata.labels.as_mut().unwrap();
        labels.insert(TEMPLATE_LABEL.into(), "t0".into());
        let s = read(&[old_template], &jobs, &[]);
        assert_eq!(s.stuck_jobs[0].pods.len(), 1);
        assert_eq!(s.streak, None);
    }

    #[test]
    fn a_pod_waiting_on_a_claim_is_reported_as_such_not_as_capacity() {
        let jobs = [job("j", 2, "2026-11-30T10:00:00Z", json!({}))];
        let pods = [
            pod_at(
                "j",
                "j-gone",
                "2026-11-30T10:00:00Z",
                unschedulable("0/1 nodes are available: persistentvolumeclaim \"m-1\" not found."),
            ),
            pod_at(
                "j",
                "j-deleting",
                "2026-11-30T10:09:59Z",
                unschedulable(
                    "0/1 nodes are available: persistentvolumeclaim \"m-1\" is being deleted.",
                ),
            ),
        ];
        let s = read(&pods, &jobs, &[]);
        let stuck = &s.stuck_jobs[0].pods;
        assert_eq!(stuck.len(), 2, "a claim being deleted never comes back");
        assert!(stuck.iter().all(|p| p.reason == "MissingClaim"));
    }

    #[test]
    fn an_older_templates_refused_pods_are_let_go_and_hold_nothing() {
        let mut old = job("o", 3, "2026-11-30T10:00:00Z", json!({}));
        let labels = old.metadata.labels.as_mut().unwrap();
        labels.insert(TEMPLATE_LABEL.into(), "older".into());
        let refused = event(
            json!({"metadata": {"name": "e"}, "reason": "FailedCreate", "type": "Warning",
            "message": "Error creating: pods \"o-x\" is forbidden: maximum cpu usage per Container is 2, but limit is 4.",
            "involvedObject": {"kind": "Job", "name": "o", "uid": "o"}, "lastTimestamp": "2026-11-30T10:09:30Z"}),
        );
        let one = [pod("o", running("2026-11-30T10:01:00Z"))];
        let s = read(&one, &[old], &[refused]);
        assert_eq!((s.failed_create, s.not_yet_created), (None, 0));
        let stuck = &s.stuck_jobs[0];
        assert_eq!((stuck.parallelism, stuck.healthy), (3, 1));
        assert_eq!(stuck.pods[0].reason, "FailedCreate");
        assert!(stuck.pods[0].message.contains("maximum cpu usage"));
        assert_eq!(stuck.pods[0].template, "older");
        assert_eq!(s.streak, None, "another template's");
        let relief = crate::decide::relieve(&s.stuck_jobs);
        assert_eq!(
            relief[0].1,
            crate::decide::Relief::Parallelism { from: 3, to: 1 }
        );
    }

    #[test]
    fn a_refusal_holds_only_while_it_goes_on_and_its_job_misses_pods() {
        let jobs = [job("b", 3, "2026-11-30T10:00:00Z", json!({}))];
        let refused = |at: &str| {
            event(
                json!({"metadata": {"name": "e"}, "reason": "FailedCreate", "type": "Warning",
                "message": "Error creating: pods \"b-x\" is forbidden: exceeded quota: agents",
                "involvedObject": {"kind": "Job", "name": "b", "uid": "b"}, "lastTimestamp": at}),
            )
        };
        let one = [pod("b", json!({"phase": "Pending"}))];
        let s = read(&one, &jobs, &[refused("2026-11-30T10:09:30Z")]);
        assert!(s.failed_create.unwrap().contains("exceeded quota"));
        // The refused pods still come: the Job controller retries them.
        assert_eq!(s.not_yet_created, 2);
        // The refusals stopped (the quota freed) a while ago: nothing holds.
        assert_eq!(
            read(&one, &jobs, &[refused("2026-11-30T10:05:00Z")]).failed_create,
            None
        );
        // Every pod made since: the cause is gone even if the Event is fresh.
        let all: Vec<Pod> = (0..3)
            .map(|i| {
                pod_at(
                    "b",
                    &format!("b-{i}"),
                    "2026-11-30T10:09:59Z",
                    json!({"phase": "Pending"}),
                )
            })
            .collect();
        assert_eq!(
            read(&all, &jobs, &[refused("2026-11-30T10:09:30Z")]).failed_create,
            None
        );
    }

    #[test]
    fn the_stuck_streak_is_read_back_from_events_until_a_pod_starts_or_the_template_changes() {
        let stuck = |dispatch: &str, at: &str, template: &str| {
            event(
                json!({"metadata": {"name": format!("e-{dispatch}"), "annotations": {
                    TEMPLATE_LABEL: template, DISPATCH_LABEL: dispatch, STUCK_REASON_ANNOTATION: "ImagePullBackOff"}},
                "reason": STUCK_EVENT, "type": "Warning", "involvedObject": {"kind": "Job"},
                "lastTimestamp": at}),
            )
        };
        let events = [
            stuck("d1", "2026-11-30T10:02:00Z", TEMPLATE),
            stuck("d2", "2026-11-30T10:09:00Z", TEMPLATE),
            stuck("d0", "2026-11-30T10:09:30Z", "another"),
        ];
        let s = read(&[], &[], &events);
        let streak = s.streak.unwrap();
        assert_eq!(streak.reason, "ImagePullBackOff");
        assert_eq!(
            (streak.dispatches, streak.since_last),
            (2, Duration::from_secs(60))
        );
        // A pod started after the first: only the second counts.
        let started = [pod("old", running("2026-11-30T10:05:00Z"))];
        assert_eq!(read(&started, &[], &events).streak.unwrap().dispatches, 1);
        let later = [pod("old", running("2026-11-30T10:09:10Z"))];
        assert_eq!(read(&later, &[], &events).streak, None);
    }

    #[test]
    fn a_job_whose_parallelism_was_lowered_still_makes_pods_for_its_open_indexes() {
        let lowered = job(
            "l",
            2,
            "2026-11-30T10:00:00Z",
            json!({"status": {"succeeded": 2}}),
        );
        let mut lowered = lowered;
        lowered.spec.as_mut().unwrap().completions = Some(8);
        // Its two runners succeeded: the Job controller makes two more for the 6 open indexes.
        assert_eq!(
            read(&[], std::slice::from_ref(&lowered), &[]).not_yet_created,
            2
        );
        lowered.status.as_mut().unwrap().succeeded = Some(7);
        assert_eq!(read(&[], &[lowered], &[]).not_yet_created, 1);
    }

    #[test]
    fn failed_indexes_are_counted_from_their_ranges() {
        assert_eq!(count_indexes(""), 0);
        assert_eq!(count_indexes("0"), 1);
        assert_eq!(count_indexes("1,3-5"), 4);
    }

    #[test]
    fn a_job_on_its_way_to_an_end_makes_no_more_pods() {
        let target = job(
            "f",
            3,
            "2026-11-30T10:00:00Z",
            json!({"status": {"conditions": [{"type": "FailureTarget", "status": "True"}]}}),
        );
        assert!(finished(&target));
        assert_eq!(read(&[], &[target], &[]).not_yet_created, 0);
    }

    #[test]
    fn a_dispatch_whose_agents_all_failed_is_failing_for_a_while() {
        let failed_at = |at: &str| {
            json!({"status": {"conditions": [{"type": "Failed", "status": "True",
                "reason": "FailedIndexes", "message": "Job has failed indexes",
                "lastTransitionTime": at}]}})
        };
        let report = r#"{"reason":"agent-failed","message":"the agent exited 1 before any job: Failed to register agent: 401","exit_code":1}"#;
        let failed_pod = pod(
            "f",
            json!({"phase": "Failed", "containerStatuses": [{"name": "agent", "image": "i",
                "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 1, "message": brief(report)}}}]}),
        );
        let recent = job(
            "f",
            2,
            "2026-11-30T10:00:00Z",
            failed_at("2026-11-30T10:09:00Z"),
        );
        // Still running, with an index failed for good and nothing succeeded: failing already.
        let running = job(
            "f",
            2,
            "2026-11-30T10:00:00Z",
            json!({"status": {"failedIndexes": "1"}}),
        );
        let s = read(std::slice::from_ref(&failed_pod), &[running], &[]);
        assert!(s.failing.unwrap().contains("1 agent pods failed for good"));
        let s = read(
            std::slice::from_ref(&failed_pod),
            std::slice::from_ref(&recent),
            &[],
        );
        let why = s.failing.unwrap();
        assert!(
            why.contains("FailedIndexes") && why.contains("Failed to register agent"),
            "{why}"
        );
        assert!(
            !why.contains("exit_code"),
            "only the report's message is kept: {why}"
        );
        // One agent that succeeded: the agents work, whatever failed the others.
        let ok = pod("f", json!({"phase": "Succeeded"}));
        assert_eq!(
            read(
                &[failed_pod.clone(), ok],
                std::slice::from_ref(&recent),
                &[]
            )
            .failing,
            None
        );
        // Long enough ago: one more dispatch is tried.
        let old = job(
            "f",
            2,
            "2026-11-30T09:00:00Z",
            failed_at("2026-11-30T09:01:00Z"),
        );
        assert_eq!(
            read(std::slice::from_ref(&failed_pod), &[old], &[]).failing,
            None
        );
        // Another template (the image fixed): tried at once.
        let mut other = recent.clone();
        other
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(TEMPLATE_LABEL.into(), "t2".into());
        assert_eq!(read(&[failed_pod], &[other], &[]).failing, None);
    }

    #[test]
    fn the_shared_mirrors_last_refresh_is_the_newest_populate_that_succeeded() {
        let populate = |name: &str, status: serde_json::Value| {
            job(name, 1, "2026-11-30T09:00:00Z", json!({"status": status}))
        };
        let complete = |at: &str| json!({"completionTime": at, "succeeded": 1});
        let older = populate("populate-mirror-1", complete("2026-11-30T09:15:40Z"));
        let newer = populate("populate-mirror-2", complete("2026-11-30T09:30:35Z"));
        let running = populate("populate-mirror-3", json!({"active": 1}));
        let failed = populate("populate-mirror-4", json!({"failed": 3}));
        assert_eq!(
            refreshed_at([&older, &newer, &running, &failed]),
            Some("2026-11-30T09:30:35Z".parse().unwrap())
        );
        assert_eq!(refreshed_at([&running, &failed]), None);
        assert_eq!(refreshed_at([]), None);
    }
}
