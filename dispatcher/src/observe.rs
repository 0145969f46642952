//! What Kubernetes says of this queue's supply, from the watched Pods, Jobs and Events: a pure
//! function of those objects and the time, turned into the [`Supply`] the decision takes.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::jiff::Timestamp;

use crate::decide::{LastDispatch, Supply};
use crate::template::DISPATCH_LABEL;

/// Reads the supply. `registered_by`: how long a running pod's agent may take to register.
pub fn supply(
    pods: &[&Pod],
    jobs: &[&Job],
    events: &[&Event],
    now: Timestamp,
    registered_by: Duration,
) -> Supply {
    let mut supply = Supply::default();
    // Per Job: its pods alive, and succeeded (the agents it has or had), and those online.
    let mut alive_per_job: HashMap<String, u32> = HashMap::new();
    let mut succeeded_per_job: HashMap<String, u32> = HashMap::new();
    let mut online_per_job: HashMap<String, u32> = HashMap::new();
    for pod in pods {
        let owner = controller_uid(pod);
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
        let per_job = match phase {
            "Failed" => None,
            "Succeeded" => Some(&mut succeeded_per_job),
            _ => Some(&mut alive_per_job),
        };
        if let (Some(uid), Some(per_job)) = (owner.as_ref(), per_job) {
            *per_job.entry(uid.clone()).or_default() += 1;
        }
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        match phase {
            "Pending" if unschedulable(pod) => supply.unschedulable += 1,
            "Pending" => supply.pending += 1,
            "Running" => {
                supply.running += 1;
                let started = status.and_then(|s| s.start_time.as_ref()).map(|t| t.0);
                if started.is_some_and(|t| elapsed(t, now) >= registered_by) {
                    supply.running_long += 1;
                }
            }
            _ => {}
        }
        if matches!(phase, "Running" | "Succeeded" | "Failed") {
            if let Some(uid) = owner {
                *online_per_job.entry(uid).or_default() += 1;
            }
        }
    }
    let unfinished: Vec<&&Job> = jobs.iter().filter(|j| !finished(j)).collect();
    for job in &unfinished {
        let uid = job.metadata.uid.clone().unwrap_or_default();
        let wanted = job
            .spec
            .as_ref()
            .and_then(|s| s.parallelism)
            .unwrap_or(1)
            .max(0) as u32;
        // Still to come: all but the pods alive, those that succeeded (the Job's count too, in
        // case their objects are gone) and the indexes that failed for good; a failed pod whose
        // index is retried is coming again. The Job's `active` is not used: it lags behind pods
        // that have just failed.
        let status = job.status.as_ref();
        let alive = alive_per_job.get(&uid).copied().unwrap_or(0);
        let succeeded = succeeded_per_job.get(&uid).copied().unwrap_or(0);
        let counted = status.and_then(|s| s.succeeded).unwrap_or(0).max(0) as u32;
        let failed_indexes = status
            .and_then(|s| s.failed_indexes.as_deref())
            .map_or(0, count_indexes);
        let gone = alive + succeeded.max(counted) + failed_indexes;
        supply.not_yet_created += wanted.saturating_sub(gone);
    }
    supply.failed_create = events
        .iter()
        .filter(|e| e.reason.as_deref() == Some("FailedCreate"))
        .filter(|e| {
            let uid = e.involved_object.uid.as_deref();
            unfinished.iter().any(|j| j.metadata.uid.as_deref() == uid)
        })
        .filter_map(|e| e.message.clone())
        .next_back();
    // Pods the quota refused are not coming.
    if supply.failed_create.is_some() {
        supply.not_yet_created = 0;
    }
    supply.failing = failing(pods, jobs, now, registered_by);
    let newest = unfinished
        .iter()
        .filter(|j| {
            j.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(DISPATCH_LABEL))
        })
        .max_by_key(|j| j.metadata.creation_timestamp.as_ref().map(|t| t.0));
    supply.last = newest.map(|job| {
        let uid = job.metadata.uid.clone().unwrap_or_default();
        LastDispatch {
            id: job
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(DISPATCH_LABEL).cloned())
                .unwrap_or_default(),
            size: job
                .spec
                .as_ref()
                .and_then(|s| s.parallelism)
                .unwrap_or(0)
                .max(0) as u32,
            online: online_per_job.get(&uid).copied().unwrap_or(0),
            age: job
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(Duration::ZERO, |t| elapsed(t.0, now)),
        }
    });
    supply
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

/// Whether the newest dispatch is failing: it has failed indexes (agents that failed for good)
/// and not one of its pods has succeeded, and it is unfinished or ended Failed less than `window`
/// ago. Its agents die before taking a job (a wrong token, a broken image), so another dispatch
/// would too; after `window`, one more is tried. Why: its condition or failed indexes, and what
/// a failed pod said (the wrapper's report's message, kept by [`brief`]).
fn failing(pods: &[&Pod], jobs: &[&Job], now: Timestamp, window: Duration) -> Option<String> {
    let dispatched = |j: &&&Job| {
        let labels = j.metadata.labels.as_ref();
        labels.is_some_and(|l| l.contains_key(DISPATCH_LABEL))
    };
    let newest = jobs
        .iter()
        .filter(dispatched)
        .max_by_key(|j| j.metadata.creation_timestamp.as_ref().map(|t| t.0))?;
    let status = newest.status.as_ref()?;
    let name = newest.metadata.name.as_deref().unwrap_or("");
    let failed = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Failed" && c.status == "True");
    let why = match failed {
        Some(c) => {
            let at = c.last_transition_time.as_ref()?.0;
            if elapsed(at, now) >= window {
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
    let own: Vec<&&Pod> = pods
        .iter()
        .filter(|p| controller_uid(p).as_deref() == uid)
        .collect();
    let phase = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.clone());
    if own.iter().any(|p| phase(p).as_deref() == Some("Succeeded")) {
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

fn elapsed(since: Timestamp, now: Timestamp) -> Duration {
    let secs = now.as_second() - since.as_second();
    Duration::from_secs(secs.max(0) as u64)
}

/// The uid of the Job that owns `pod`.
fn controller_uid(pod: &Pod) -> Option<String> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "Job" && o.controller == Some(true))
        .map(|o| o.uid.clone())
}

/// `PodScheduled=False` with reason `Unschedulable`: the scheduler found no node.
fn unschedulable(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions.iter().any(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            })
        })
}

/// A Job with a `Complete` or `Failed` condition set.
pub fn finished(job: &Job) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(uid: &str, parallelism: i32, created: &str, extra: serde_json::Value) -> Job {
        let mut value = json!({
            "metadata": {"name": uid, "uid": uid, "creationTimestamp": created,
                         "labels": {DISPATCH_LABEL: format!("id-{uid}")}},
            "spec": {"parallelism": parallelism, "template": {}},
        });
        if let serde_json::Value::Object(extra) = extra {
            for (k, v) in extra {
                value[k] = v;
            }
        }
        serde_json::from_value(value).unwrap()
    }

    fn pod(owner: &str, status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": format!("{owner}-x"), "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "Job", "name": owner, "uid": owner, "controller": true}]},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn pods_jobs_and_events_become_the_supply() {
        let now: Timestamp = "2026-11-30T10:10:00Z".parse().unwrap();
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
            pod(
                "a",
                json!({"phase": "Running", "startTime": "2026-11-30T10:01:00Z"}),
            ),
            pod("a", json!({"phase": "Succeeded"})),
            pod(
                "a",
                json!({"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]}),
            ),
            pod(
                "b",
                json!({"phase": "Running", "startTime": "2026-11-30T10:09:50Z"}),
            ),
            pod("b", json!({"phase": "Pending"})),
        ];
        let pods: Vec<&Pod> = pods.iter().collect();
        let jobs: Vec<&Job> = jobs.iter().collect();
        let s = supply(&pods, &jobs, &[], now, Duration::from_secs(300));
        assert_eq!(
            (s.pending, s.unschedulable, s.running, s.running_long),
            (1, 1, 2, 1)
        );
        // a: 4 wanted, 3 pods seen; b: 3 wanted, 2 seen.
        assert_eq!(s.not_yet_created, 2);
        let last = s.last.unwrap();
        assert_eq!((last.id.as_str(), last.size, last.online), ("id-b", 3, 1));
        assert_eq!(last.age, Duration::from_secs(30));

        let event: Event = serde_json::from_value(json!({
            "metadata": {"name": "e"}, "reason": "FailedCreate",
            "message": "pods \"b-x\" is forbidden: exceeded quota: agents",
            "involvedObject": {"kind": "Job", "name": "b", "uid": "b"}}))
        .unwrap();
        let s = supply(&pods, &jobs, &[&event], now, Duration::from_secs(300));
        assert!(s.failed_create.unwrap().contains("exceeded quota"));
        assert_eq!(s.not_yet_created, 0);
    }

    #[test]
    fn failed_indexes_are_counted_from_their_ranges() {
        assert_eq!(count_indexes(""), 0);
        assert_eq!(count_indexes("0"), 1);
        assert_eq!(count_indexes("1,3-5"), 4);
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
        let window = Duration::from_secs(300);
        let now: Timestamp = "2026-11-30T10:10:00Z".parse().unwrap();
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
        let s = supply(&[&failed_pod], &[&running], &[], now, window);
        assert!(s.failing.unwrap().contains("1 agent pods failed for good"));
        let s = supply(&[&failed_pod], &[&recent], &[], now, window);
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
        let s = supply(&[&failed_pod, &ok], &[&recent], &[], now, window);
        assert_eq!(s.failing, None);
        // Long enough ago: one more dispatch is tried.
        let old = job(
            "f",
            2,
            "2026-11-30T09:00:00Z",
            failed_at("2026-11-30T09:01:00Z"),
        );
        assert_eq!(
            supply(&[&failed_pod], &[&old], &[], now, window).failing,
            None
        );
    }
}
