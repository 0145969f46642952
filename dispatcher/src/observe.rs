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
    let mut seen_per_job: HashMap<String, u32> = HashMap::new();
    let mut online_per_job: HashMap<String, u32> = HashMap::new();
    for pod in pods {
        let owner = controller_uid(pod);
        if let Some(uid) = &owner {
            *seen_per_job.entry(uid.clone()).or_default() += 1;
        }
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
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
        let status = job.status.as_ref();
        let counted = status.map_or(0, |s| {
            s.active.unwrap_or(0) + s.succeeded.unwrap_or(0) + s.failed.unwrap_or(0)
        }) as u32;
        let seen = seen_per_job.get(&uid).copied().unwrap_or(0).max(counted);
        supply.not_yet_created += wanted.saturating_sub(seen);
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
}
