//! The stacks mode's decisions: a pure function of one tick's observations (the queue's first
//! page of scheduled jobs, the states Buildkite gives for the jobs that have Jobs here, and the
//! Jobs themselves), as [`crate::decide`] is for the metrics mode.
//!
//! - A job is taken only when a pod can be made for it (fewer than `max_agents` Jobs
//!   unfinished), higher `priority` first, then oldest; never while the queue's dispatch is
//!   paused; never when a Job for it exists, finished or not (so a restart never re-reserves a
//!   job into a duplicate, agent-stack-k8s PR #965). The reservation is renewed while its pod
//!   comes, and at once if it lapsed (the job is listed again while its Job is unfinished).
//! - A job whose pod is stuck, or whose pod ended before its agent acquired it (agent-stack-k8s
//!   #873), is finished in Buildkite with the reason while it is still `scheduled` or
//!   `reserved`; once an agent has it, only a notification is sent.
//! - The Job of a job cancelled (or otherwise ended) before its agent started is deleted; a
//!   running agent's job is the agent's to end.
//! - Each stage a pod reaches is told on the job's timeline once (at most 256 characters).
//! - While this template's pods keep getting stuck (a streak, as the metrics mode's), nothing
//!   more is taken until the backoff ends, and then a probe of a few jobs; the jobs left
//!   waiting are told why on their timelines, once each. So a broken image fails a few jobs,
//!   not the queue, and the rest run once the fix is out (a new template ends the streak).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::decide::{backoff_left, Streak, StuckPod};
use crate::stacks_api::ScheduledJob;
use crate::stacks_observe::{PodState, StackJob, Stage, STAGES};

/// The exit status of a job the dispatcher finishes: the API's own default for a stack's
/// error, which the docs' `retry: automatic` example matches.
pub const STACK_ERROR_EXIT: i32 = -1;

/// One tick's observations.
pub struct Seen<'a> {
    pub jobs: &'a [StackJob],
    /// The first page of scheduled jobs, oldest first.
    pub listed: &'a [ScheduledJob],
    pub paused: bool,
    /// Buildkite's state of each job that has a Job (missing: not asked, or not answered).
    pub states: &'a HashMap<String, String>,
    pub now: Timestamp,
    /// This template's Jobs whose pods got stuck one after another, none starting since.
    pub streak: Option<&'a Streak>,
    /// Kubernetes refuses this template's pods now (a fresh `FailedCreate`): its message.
    pub refusal: Option<&'a str>,
    /// Waiting jobs already told why they wait, during this streak.
    pub told: &'a HashSet<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackLimits {
    pub max_agents: u32,
    /// How long each reservation lasts; it is renewed when less than half is left.
    pub expiry: Duration,
    /// A streak's backoff: `--stuck-backoff` doubling per stuck dispatch, at most the cap.
    pub stuck_backoff: Duration,
    pub stuck_backoff_cap: Duration,
    /// The jobs taken at a time while a streak is on (`--buffer`, at least one).
    pub probe: u32,
}

/// A job to finish in Buildkite, and its Job to delete (if its pod is stuck).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    pub job: String,
    pub k8s_job: String,
    pub uid: String,
    pub why: Why,
}

/// Why a job cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    Stuck(StuckPod),
    Ended(String),
}

/// A Job to delete and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub job: String,
    pub k8s_job: String,
    pub uid: String,
    /// Buildkite's state of its job.
    pub state: String,
}

/// A timeline note, and the stage it brings the Job's annotation to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub job: String,
    pub k8s_job: String,
    pub stage: Stage,
}

/// Why nothing more was reserved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StackHold {
    Paused {
        waiting: usize,
    },
    AtMax {
        waiting: usize,
    },
    /// Kubernetes refuses this template's pods (a quota, a LimitRange, a webhook): nothing is
    /// taken until it admits them; its message.
    Refused {
        waiting: usize,
        message: String,
    },
    /// This template's pods keep getting stuck: nothing is taken for `retry_in`, or (`None`)
    /// a probe's pods are on their way.
    Stuck {
        waiting: usize,
        reason: String,
        dispatches: u32,
        retry_in: Option<Duration>,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Jobs to take, in this order: a Job made for each, then reserved.
    pub reserve: Vec<String>,
    /// Reservations to extend (or to make, for a suspended Job whose job still waits).
    pub renew: Vec<String>,
    /// Suspended Jobs whose job is reserved: to let make their pods.
    pub resume: Vec<String>,
    /// Jobs to finish as failed.
    pub finish: Vec<Finish>,
    /// Stuck pods of jobs an agent already has (or that ended): their Jobs deleted, a note sent.
    pub stuck_taken: Vec<Finish>,
    /// Jobs of jobs cancelled before their agent started.
    pub delete: Vec<Delete>,
    pub notify: Vec<Notice>,
    /// Waiting jobs to tell why they wait (a fault's hold), not told before.
    pub tell: Vec<String>,
    pub hold: Option<StackHold>,
    /// The faults seen, waiting jobs or not: a stuck streak, a refusal.
    pub stuck: bool,
    pub refused: bool,
}

/// States in which no agent holds the job yet: the dispatcher may still finish it.
const UNCLAIMED: [&str; 2] = ["scheduled", "reserved"];
/// States in which the job is over, or being cancelled.
const OVER: [&str; 9] = [
    "canceling",
    "canceled",
    "finished",
    "timing_out",
    "timed_out",
    "skipped",
    "broken",
    "expired",
    "waiting_failed",
];

pub fn plan(seen: &Seen, limits: &StackLimits) -> Plan {
    let mut plan = Plan {
        stuck: seen.streak.is_some(),
        refused: seen.refusal.is_some(),
        ..Plan::default()
    };
    for job in seen.jobs {
        let state = seen.states.get(&job.job).map(String::as_str);
        settle(job, state, seen.now, limits, &mut plan);
    }
    let with_job: HashSet<&str> = seen.jobs.iter().map(|j| j.job.as_str()).collect();
    let unfinished: HashMap<&str, &StackJob> = seen
        .jobs
        .iter()
        .filter(|j| !j.finished)
        .map(|j| (j.job.as_str(), j))
        .collect();
    // Listed again while its Job is unfinished: the reservation lapsed; take it back now.
    for listed in seen.listed {
        let lapsed = unfinished.contains_key(listed.id.as_str());
        if lapsed && !plan.renew.contains(&listed.id) {
            plan.renew.push(listed.id.clone());
        }
    }
    let mut waiting: Vec<&ScheduledJob> = seen
        .listed
        .iter()
        .filter(|j| !with_job.contains(j.id.as_str()))
        .collect();
    // Stable: equal priorities stay oldest first.
    waiting.sort_by_key(|j| std::cmp::Reverse(j.priority));
    if seen.paused {
        plan.hold = (!waiting.is_empty()).then_some(StackHold::Paused {
            waiting: waiting.len(),
        });
        return plan;
    }
    take(seen, limits, &waiting, &unfinished, &mut plan);
    plan
}

/// The waiting jobs (in the order to take them) taken now: within `--max-agents` and whatever a
/// fault holds back; the hold, and the jobs it keeps waiting, to be told why once.
fn take(
    seen: &Seen,
    limits: &StackLimits,
    waiting: &[&ScheduledJob],
    unfinished: &HashMap<&str, &StackJob>,
    plan: &mut Plan,
) {
    let free = (limits.max_agents as usize).saturating_sub(unfinished.len());
    let stuck = seen.streak.map(|streak| stuck(streak, unfinished, limits));
    let allowed = match (seen.refusal, &stuck) {
        (Some(_), _) => 0,
        (None, Some((allowed, _))) => *allowed,
        (None, None) => usize::MAX,
    };
    let now = free.min(allowed);
    plan.reserve = waiting.iter().take(now).map(|j| j.id.clone()).collect();
    if waiting.len() <= now {
        return;
    }
    let left = waiting.len() - now;
    let hold = match (seen.refusal, stuck, seen.streak) {
        // A fault that holds back as much as `--max-agents` does is the one reported.
        _ if free < allowed => StackHold::AtMax { waiting: left },
        (Some(message), _, _) => StackHold::Refused {
            waiting: left,
            message: message.to_string(),
        },
        (None, Some((_, retry_in)), Some(streak)) => StackHold::Stuck {
            waiting: left,
            reason: streak.reason.clone(),
            dispatches: streak.dispatches,
            retry_in,
        },
        _ => StackHold::AtMax { waiting: left },
    };
    if !matches!(hold, StackHold::AtMax { .. }) {
        let told = |j: &&&ScheduledJob| !seen.told.contains(&j.id);
        plan.tell = waiting[now..]
            .iter()
            .filter(told)
            .map(|j| j.id.clone())
            .collect();
    }
    plan.hold = Some(hold);
}

/// How many jobs a streak lets be taken, and how long until more: none while its backoff runs;
/// then a probe, less the pods still on their way (a probe in flight, or suspended Jobs).
fn stuck(
    streak: &Streak,
    unfinished: &HashMap<&str, &StackJob>,
    limits: &StackLimits,
) -> (usize, Option<Duration>) {
    let left = backoff_left(streak, limits.stuck_backoff, limits.stuck_backoff_cap);
    if left.is_some() {
        return (0, left);
    }
    let coming = |j: &&&StackJob| matches!(j.pod, PodState::Coming(s) if s < Stage::Started);
    let in_flight = unfinished.values().filter(coming).count();
    (
        (limits.probe.max(1) as usize).saturating_sub(in_flight),
        None,
    )
}

/// What one Job needs, by its pod and its job's state.
fn settle(
    job: &StackJob,
    state: Option<&str>,
    now: Timestamp,
    limits: &StackLimits,
    plan: &mut Plan,
) {
    let Some(state) = state else { return };
    let unclaimed = UNCLAIMED.contains(&state);
    let finish = |why: Why| Finish {
        job: job.job.clone(),
        k8s_job: job.name.clone(),
        uid: job.uid.clone(),
        why,
    };
    let delete = || Delete {
        job: job.job.clone(),
        k8s_job: job.name.clone(),
        uid: job.uid.clone(),
        state: state.to_string(),
    };
    match &job.pod {
        PodState::Stuck(stuck) if unclaimed => plan.finish.push(finish(Why::Stuck(stuck.clone()))),
        PodState::Stuck(_) if OVER.contains(&state) => plan.delete.push(delete()),
        PodState::Stuck(stuck) => plan.stuck_taken.push(finish(Why::Stuck(stuck.clone()))),
        PodState::Ended(why) if unclaimed => plan.finish.push(finish(Why::Ended(why.clone()))),
        PodState::Ended(_) => {}
        PodState::Coming(_) if job.suspended => match state {
            "reserved" => plan.resume.push(job.job.clone()),
            "scheduled" => plan.renew.push(job.job.clone()),
            // Cancelled, or another's: no pod of this Job ever ran it.
            _ => plan.delete.push(delete()),
        },
        PodState::Coming(stage) if OVER.contains(&state) && *stage < Stage::Started => {
            plan.delete.push(delete());
        }
        PodState::Coming(stage) => {
            let half = limits.expiry / 2;
            let renew_by = job.reserved_until.map(|until| {
                until - k8s_openapi::jiff::SignedDuration::try_from(half).unwrap_or_default()
            });
            let due = renew_by.is_none_or(|at| at <= now);
            if state == "reserved" && *stage < Stage::Started && due {
                plan.renew.push(job.job.clone());
            }
            if OVER.contains(&state) {
                return;
            }
            for next in STAGES
                .iter()
                .filter(|s| **s as u8 > job.notified && *s <= stage)
            {
                plan.notify.push(Notice {
                    job: job.job.clone(),
                    k8s_job: job.name.clone(),
                    stage: *next,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: StackLimits = StackLimits {
        max_agents: 3,
        expiry: Duration::from_secs(300),
        stuck_backoff: Duration::from_secs(30),
        stuck_backoff_cap: Duration::from_secs(600),
        probe: 1,
    };

    fn listed(id: &str, priority: i64) -> ScheduledJob {
        ScheduledJob {
            id: id.into(),
            priority,
        }
    }

    fn job(id: &str, pod: PodState) -> StackJob {
        StackJob {
            name: format!("buildkite-{id}"),
            uid: format!("uid-{id}"),
            job: id.into(),
            pod,
            pod_name: None,
            node: None,
            finished: false,
            suspended: false,
            reserved_until: None,
            notified: 0,
        }
    }

    fn stuck() -> StuckPod {
        StuckPod {
            pod: "p".into(),
            dispatch: String::new(),
            reason: "InvalidImageName".into(),
            message: "bad".into(),
            waited: Duration::ZERO,
            template: String::new(),
        }
    }

    fn now() -> Timestamp {
        "2026-12-03T12:00:00Z".parse().unwrap()
    }

    fn states(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn planned(
        jobs: &[StackJob],
        list: &[ScheduledJob],
        paused: bool,
        st: &HashMap<String, String>,
    ) -> Plan {
        let seen = Seen {
            jobs,
            listed: list,
            paused,
            states: st,
            now: now(),
            streak: None,
            refusal: None,
            told: &HashSet::new(),
        };
        plan(&seen, &LIMITS)
    }

    #[test]
    fn a_stuck_streak_backs_off_then_probes_and_tells_the_waiting_jobs_once() {
        let list = [listed("a", 0), listed("b", 0), listed("c", 0)];
        let streak = |jobs, since| Streak {
            reason: "ImagePullBackOff".into(),
            dispatches: jobs,
            since_last: Duration::from_secs(since),
        };
        let told = HashSet::from(["b".to_string()]);
        let with = |jobs: &[StackJob], streak: &Streak| {
            let seen = Seen {
                jobs,
                listed: &list,
                paused: false,
                states: &HashMap::new(),
                now: now(),
                streak: Some(streak),
                refusal: None,
                told: &told,
            };
            plan(&seen, &LIMITS)
        };
        // Two stuck Jobs: 60 s of backoff, 20 s gone.
        let held = with(&[], &streak(2, 20));
        assert!(held.reserve.is_empty());
        let retry_in = Some(Duration::from_secs(40));
        let hold = StackHold::Stuck {
            waiting: 3,
            reason: "ImagePullBackOff".into(),
            dispatches: 2,
            retry_in,
        };
        assert_eq!(held.hold, Some(hold));
        assert_eq!(held.tell, ["a", "c"], "b was told already");
        // The backoff over: one job, the probe.
        let probe = with(&[], &streak(2, 60));
        assert_eq!(probe.reserve, ["a"]);
        assert!(matches!(
            probe.hold,
            Some(StackHold::Stuck {
                waiting: 2,
                retry_in: None,
                ..
            })
        ));
        // While the probe's pod comes, nothing more.
        let coming = [job("x", PodState::Coming(Stage::Pulling))];
        assert!(with(&coming, &streak(2, 90)).reserve.is_empty());
    }

    #[test]
    fn a_fault_is_reported_over_a_full_queue() {
        let list = [listed("a", 0)];
        let full = [
            job("x", PodState::Coming(Stage::Started)),
            job("y", PodState::Coming(Stage::Started)),
            job("z", PodState::Coming(Stage::Started)),
        ];
        let seen = Seen {
            jobs: &full,
            listed: &list,
            paused: false,
            states: &HashMap::new(),
            now: now(),
            streak: None,
            refusal: Some("exceeded quota"),
            told: &HashSet::new(),
        };
        let held = plan(&seen, &LIMITS);
        assert!(matches!(held.hold, Some(StackHold::Refused { .. })));
        assert!(held.refused && !held.stuck);
        assert_eq!(held.tell, ["a"]);
        let seen = Seen {
            listed: &[],
            ..seen
        };
        assert!(plan(&seen, &LIMITS).refused, "seen with no job waiting");
    }

    #[test]
    fn a_refusal_takes_nothing_until_kubernetes_admits_the_pods() {
        let list = [listed("a", 0), listed("b", 0)];
        let message = "Error creating: pods \"x\" is forbidden: exceeded quota: agent-pods";
        let seen = Seen {
            jobs: &[],
            listed: &list,
            paused: false,
            states: &HashMap::new(),
            now: now(),
            streak: None,
            refusal: Some(message),
            told: &HashSet::new(),
        };
        let held = plan(&seen, &LIMITS);
        assert!(held.reserve.is_empty());
        let hold = StackHold::Refused {
            waiting: 2,
            message: message.into(),
        };
        assert_eq!(held.hold, Some(hold));
        assert_eq!(held.tell, ["a", "b"]);
    }

    #[test]
    fn higher_priority_is_reserved_first_and_never_past_max_agents() {
        let list = [
            listed("a", 0),
            listed("b", 5),
            listed("c", 0),
            listed("d", 1),
        ];
        let jobs = [job("x", PodState::Coming(Stage::Started))];
        let plan = planned(&jobs, &list, false, &states(&[("x", "running")]));
        assert_eq!(plan.reserve, ["b", "d"]);
        assert_eq!(plan.hold, Some(StackHold::AtMax { waiting: 2 }));
    }

    #[test]
    fn a_paused_queue_reserves_nothing() {
        let plan = planned(&[], &[listed("a", 0)], true, &HashMap::new());
        assert!(plan.reserve.is_empty());
        assert_eq!(plan.hold, Some(StackHold::Paused { waiting: 1 }));
    }

    #[test]
    fn a_job_with_a_job_is_never_reserved_again_but_a_lapsed_reservation_is_renewed() {
        let mut done = job("a", PodState::Ended("pod Succeeded".into()));
        done.finished = true;
        let coming = job("b", PodState::Coming(Stage::Scheduled));
        let list = [listed("a", 0), listed("b", 0)];
        let plan = planned(
            &[done, coming],
            &list,
            false,
            &states(&[("a", "finished"), ("b", "scheduled")]),
        );
        assert!(plan.reserve.is_empty());
        assert_eq!(plan.renew, ["b"]);
    }

    #[test]
    fn a_suspended_job_is_resumed_once_reserved_and_deleted_if_its_job_went_elsewhere() {
        let suspended = |id: &str| StackJob {
            suspended: true,
            ..job(id, PodState::Coming(Stage::Created))
        };
        let jobs = ["a", "b", "c", "d"].map(suspended);
        let st = states(&[
            ("a", "reserved"),
            ("b", "scheduled"),
            ("c", "canceled"),
            ("d", "running"),
        ]);
        let plan = planned(&jobs, &[listed("b", 0)], false, &st);
        assert_eq!(plan.resume, ["a"]);
        assert_eq!(plan.renew, ["b"]);
        let deleted: Vec<&str> = plan.delete.iter().map(|d| d.job.as_str()).collect();
        assert_eq!(deleted, ["c", "d"]);
        assert!(plan.reserve.is_empty() && plan.notify.is_empty());
    }

    #[test]
    fn a_stuck_pod_fails_its_job_only_while_no_agent_has_it() {
        let jobs = [
            job("a", PodState::Stuck(stuck())),
            job("b", PodState::Stuck(stuck())),
        ];
        let plan = planned(
            &jobs,
            &[],
            false,
            &states(&[("a", "reserved"), ("b", "running")]),
        );
        assert_eq!(plan.finish.len(), 1);
        assert_eq!(plan.finish[0].job, "a");
        assert_eq!(plan.stuck_taken.len(), 1);
        assert_eq!(plan.stuck_taken[0].job, "b");
    }

    #[test]
    fn a_pod_that_ended_before_acquiring_fails_its_reserved_job_at_once() {
        let mut gone = job("a", PodState::Ended("pod Failed: Evicted".into()));
        gone.finished = true;
        let plan = planned(&[gone], &[], false, &states(&[("a", "reserved")]));
        assert_eq!(plan.finish.len(), 1);
        let mut ran = job("b", PodState::Ended("pod Succeeded".into()));
        ran.finished = true;
        assert!(planned(&[ran], &[], false, &states(&[("b", "finished")]))
            .finish
            .is_empty());
    }

    #[test]
    fn a_cancelled_jobs_pending_pod_goes_but_a_running_agent_keeps_its_job() {
        let jobs = [
            job("a", PodState::Coming(Stage::Pulling)),
            job("b", PodState::Coming(Stage::Started)),
        ];
        let plan = planned(
            &jobs,
            &[],
            false,
            &states(&[("a", "canceled"), ("b", "canceling")]),
        );
        assert_eq!(plan.delete.len(), 1);
        assert_eq!(plan.delete[0].job, "a");
    }

    #[test]
    fn reservations_are_renewed_when_half_is_left_and_stages_told_once() {
        let mut fresh = job("a", PodState::Coming(Stage::Pulling));
        fresh.reserved_until = Some(now() + k8s_openapi::jiff::SignedDuration::from_secs(200));
        fresh.notified = 1;
        let mut old = job("b", PodState::Coming(Stage::Created));
        old.reserved_until = Some(now() + k8s_openapi::jiff::SignedDuration::from_secs(100));
        old.notified = 1;
        let plan = planned(
            &[fresh, old],
            &[],
            false,
            &states(&[("a", "reserved"), ("b", "reserved")]),
        );
        assert_eq!(plan.renew, ["b"]);
        let told: Vec<(&str, Stage)> = plan
            .notify
            .iter()
            .map(|n| (n.job.as_str(), n.stage))
            .collect();
        assert_eq!(told, [("a", Stage::Scheduled), ("a", Stage::Pulling)]);
    }
}
