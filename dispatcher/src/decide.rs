//! The dispatch decision: a pure function of what one tick observed, so that it can be unit-tested
//! and driven through a simulated day (`benches/dispatch.rs`) exactly as it runs.
//!
//! Demand comes from Buildkite, supply from Kubernetes, and no agent is counted twice: only job
//! counts are taken from Buildkite (`scheduled`, `running`), only pod counts from Kubernetes. Every
//! pod of this queue that has not finished is one agent, busy, idle or on its way; a Job's pods
//! that its controller has not created yet count too (`parallelism` minus its pods alive, stuck
//! or succeeded and its indexes failed for good), or the tick right after a dispatch would
//! dispatch again. Pods that cannot be scheduled count as coming until `--start-timeout`: an
//! autoscaler adds nodes for pods that exist, so holding them back would starve a cluster that
//! is growing. Pods that never start are let go ([`relieve`]) and further dispatches back off
//! while the cause lasts; a quota that refuses pods, and a dispatch that failed with not one
//! agent succeeding, stop the queue's dispatches and say why.
//!
//! The peers' failures this answers (`../shared/notes/dispatch-peers.md`): Sourcegraph's
//! dispatcher trusting low agent counts before its last dispatch rolled out (its rollout check,
//! kept here, counting finished pods as rolled out so short jobs do not make it look stalled);
//! a template registering in another queue (pods running, the queue's agent count not rising:
//! stop and report); agent-stack-k8s's in-flight counter drifting from the cluster (nothing here
//! is remembered between ticks: every figure is recomputed from what was observed, the
//! backoff's memory included, which is in the dispatcher's own Events).

use std::time::Duration;

/// The queue's demand, from Buildkite's agent metrics API (`/metrics/queue?name=`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    /// Jobs waiting for an agent.
    pub scheduled: u32,
    /// Jobs an agent is running.
    pub running: u32,
    /// Agents registered in the queue (idle or busy), whoever started them.
    pub agents: u32,
}

/// This queue's pods and Jobs, from Kubernetes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Supply {
    /// Pods waiting to be scheduled, or scheduled and starting.
    pub pending: u32,
    /// Pods the scheduler has not placed yet (`PodScheduled=False`, `Unschedulable`): coming,
    /// once a node has room or an autoscaler adds one.
    pub unschedulable: u32,
    /// Pods running (an agent, once it has registered).
    pub running: u32,
    /// Of those, pods running for longer than an agent takes to register.
    pub running_long: u32,
    /// Pods the Job controller has yet to create for Jobs that are not finished.
    pub not_yet_created: u32,
    /// A Job's pods refused at creation (`FailedCreate`, e.g. `exceeded quota`) lately, while
    /// that Job still misses pods: Kubernetes' message.
    pub failed_create: Option<String>,
    /// Unfinished Jobs with pods that never started.
    pub stuck_jobs: Vec<StuckJob>,
    /// Dispatches whose pods got stuck since a pod last started.
    pub streak: Option<Streak>,
    /// The newest dispatch has agents failed for good and not one succeeded (and, if it has
    /// ended, it ended lately): why.
    pub failing: Option<String>,
    /// The newest dispatch, if it is still rolling out.
    pub last: Option<LastDispatch>,
}

/// A pod whose agent container never started, within `--start-timeout` or ever.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StuckPod {
    pub pod: String,
    pub dispatch: String,
    /// The kubelet's waiting reason (`ImagePullBackOff`, `CreateContainerConfigError`, …), the
    /// scheduler's (`Unschedulable`, or `MissingClaim` for a claim not found or being deleted),
    /// or the pod Event's (`FailedMount`).
    pub reason: String,
    /// What Kubernetes said of it.
    pub message: String,
    pub waited: Duration,
    /// The hash of the template its Job was made from.
    pub template: String,
}

/// An unfinished Job with stuck pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StuckJob {
    pub job: String,
    pub uid: String,
    pub parallelism: u32,
    /// Its pods started or still waiting within the timeout.
    pub healthy: u32,
    pub pods: Vec<StuckPod>,
}

impl StuckJob {
    /// The Job `job` (uid `uid`) of one pod, stuck: the stacks mode's Jobs.
    pub fn one(job: &str, uid: &str, pod: StuckPod) -> StuckJob {
        StuckJob {
            job: job.to_string(),
            uid: uid.to_string(),
            parallelism: 1,
            healthy: 0,
            pods: vec![pod],
        }
    }
}

/// Dispatches whose pods got stuck, one after another, with no pod starting in between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Streak {
    /// The latest stuck pod's reason.
    pub reason: String,
    pub dispatches: u32,
    /// Since the latest pod was found stuck (zero: one is stuck now).
    pub since_last: Duration,
}

/// The newest dispatch's rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastDispatch {
    pub id: String,
    pub size: u32,
    /// Its pods that are running or have finished: they came online.
    pub online: u32,
    pub age: Duration,
}

/// The dispatcher's settings that the decision uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Agent pods kept alive even without demand.
    pub min_agents: u32,
    /// Agent pods not yet finished, at most.
    pub max_agents: u32,
    /// Extra agents while there is demand.
    pub buffer: u32,
    /// Extra agents in proportion to the jobs waiting, when that is more than `buffer`: the
    /// first agents to come up take the jobs, so a few slow pods (a cold node, an image pull) do
    /// not hold jobs back; the extra ones leave through agent-wrapper's idle timeout.
    pub buffer_ratio: f64,
    /// The share of the last dispatch that must be online before another is trusted.
    pub rollout_ratio: f64,
    /// A dispatch older than this no longer holds the next one back.
    pub rollout_timeout: Duration,
    /// After the n-th dispatch in a row whose pods got stuck, the next waits
    /// `stuck_backoff × 2^(n−1)`, at most `stuck_backoff_cap`.
    pub stuck_backoff: Duration,
    pub stuck_backoff_cap: Duration,
}

/// Pods stuck this long before a new dispatch at first, doubling per dispatch in the streak.
pub const STUCK_BACKOFF: Duration = Duration::from_secs(30);
/// At most this long between dispatches while pods keep getting stuck.
pub const STUCK_BACKOFF_CAP: Duration = Duration::from_secs(600);

/// What one tick decided, with the figures it used (each goes into the decision's log line).
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub action: Action,
    /// The agents this tick wanted alive: running + scheduled jobs, plus the buffer, within the
    /// limits.
    pub wanted: u32,
    /// Agent pods alive or on their way (stuck ones excluded).
    pub alive: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Create a Job of this many agents.
    Dispatch(u32),
    /// Create nothing, and why.
    Hold(Hold),
}

/// Why a tick dispatched nothing.
#[derive(Debug, Clone, PartialEq)]
pub enum Hold {
    /// Enough agents are alive or coming.
    Enough,
    /// `max_agents` pods are not finished.
    AtMax,
    /// The last dispatch has not rolled out far enough to trust the counts yet.
    RollingOut { id: String, online: u32, size: u32 },
    /// Pods of the last dispatches never started (an image that cannot be pulled, a missing
    /// Secret, a volume that does not mount, no node for `--start-timeout`): the next dispatch
    /// waits out a backoff, unless a pod starts or the template changes.
    Stuck {
        reason: String,
        dispatches: u32,
        retry_in: Duration,
    },
    /// A quota (or another admission failure) refuses this queue's pods.
    FailedCreate { message: String },
    /// Pods have run long enough to register, but the queue has fewer agents than that: the
    /// template's agents register somewhere else.
    WrongQueue { running: u32, agents: u32 },
    /// The last dispatch failed without one agent succeeding (a wrong token, a broken image):
    /// another would fail the same way.
    Failing { why: String },
}

impl Hold {
    /// A short name, for the blocked-reason metric.
    pub fn name(&self) -> &'static str {
        match self {
            Hold::Enough => "enough",
            Hold::AtMax => "at-max",
            Hold::RollingOut { .. } => "rolling-out",
            Hold::Stuck { .. } => "stuck",
            Hold::FailedCreate { .. } => "failed-create",
            Hold::WrongQueue { .. } => "wrong-queue",
            Hold::Failing { .. } => "failing",
        }
    }

    /// Whether this is a fault to report (a log line at warning level, a metric), not a
    /// normal pause.
    pub fn is_fault(&self) -> bool {
        matches!(
            self,
            Hold::Stuck { .. }
                | Hold::FailedCreate { .. }
                | Hold::WrongQueue { .. }
                | Hold::Failing { .. }
        )
    }
}

/// Decides one tick.
pub fn decide(demand: Demand, supply: &Supply, limits: &Limits) -> Decision {
    let alive = supply.pending + supply.unschedulable + supply.running + supply.not_yet_created;
    let wanted = wanted(&demand, limits);
    let hold = |hold: Hold| Decision {
        action: Action::Hold(hold),
        wanted,
        alive,
    };
    if let Some(fault) = fault(&demand, supply, limits) {
        return hold(fault);
    }
    let short = wanted.saturating_sub(alive);
    if short == 0 {
        return hold(Hold::Enough);
    }
    if let Some(last) = &supply.last {
        let needed = (f64::from(last.size) * limits.rollout_ratio).ceil() as u32;
        if last.online < needed && last.age < limits.rollout_timeout {
            return hold(Hold::RollingOut {
                id: last.id.clone(),
                online: last.online,
                size: last.size,
            });
        }
    }
    let room = limits.max_agents.saturating_sub(alive);
    // After pods got stuck, the backoff's end brings a probe, not the whole shortfall: the
    // buffer's worth of pods (at least one). Once one starts, the streak ends and the rest
    // follows on the next tick; if they get stuck too, they are few and the backoff doubles.
    let probe = match supply.streak {
        Some(_) => limits.buffer.max(1),
        None => u32::MAX,
    };
    match short.min(room).min(probe) {
        0 => hold(Hold::AtMax),
        n => Decision {
            action: Action::Dispatch(n),
            wanted,
            alive,
        },
    }
}

/// The agents the queue wants: its running and scheduled jobs and a buffer while jobs wait,
/// within `--min-agents` and `--max-agents`.
fn wanted(demand: &Demand, limits: &Limits) -> u32 {
    let buffer = match demand.scheduled {
        0 => 0,
        n => limits
            .buffer
            .max((f64::from(n) * limits.buffer_ratio).ceil() as u32),
    };
    (demand.running + demand.scheduled + buffer)
        .max(limits.min_agents)
        .min(limits.max_agents)
}

/// A fault that holds dispatch whatever the shortfall, the most telling first: refused
/// creates, a stuck streak's backoff, failing agents, agents registering elsewhere.
fn fault(demand: &Demand, supply: &Supply, limits: &Limits) -> Option<Hold> {
    if let Some(message) = &supply.failed_create {
        return Some(Hold::FailedCreate {
            message: message.clone(),
        });
    }
    if let Some(streak) = &supply.streak {
        let (base, cap) = (limits.stuck_backoff, limits.stuck_backoff_cap);
        if let Some(retry_in) = backoff_left(streak, base, cap) {
            return Some(Hold::Stuck {
                reason: streak.reason.clone(),
                dispatches: streak.dispatches,
                retry_in,
            });
        }
    }
    if let Some(why) = &supply.failing {
        return Some(Hold::Failing { why: why.clone() });
    }
    (supply.running_long > demand.agents).then_some(Hold::WrongQueue {
        running: supply.running_long,
        agents: demand.agents,
    })
}

/// What is left of a stuck streak's backoff: `--stuck-backoff` × 2^(n−1) after the n-th
/// dispatch in a row whose pods got stuck, at most `cap`. Both modes back off by it.
pub fn backoff_left(streak: &Streak, base: Duration, cap: Duration) -> Option<Duration> {
    let doublings = streak.dispatches.saturating_sub(1).min(16);
    let backoff = (base * 2u32.pow(doublings)).min(cap);
    backoff
        .checked_sub(streak.since_last)
        .filter(|left| !left.is_zero())
}

/// How a Job lets its stuck pods go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relief {
    /// None of its pods started or can still start in time: the Job goes, with its pods.
    DeleteJob,
    /// Some run: `parallelism` down to those, and the Job controller removes the surplus,
    /// least started first (`controller.ActivePods`: unscheduled, then pending, then not ready),
    /// so never a running pod while stuck ones are left. Deleting a stuck pod alone would not
    /// do: the Job controller makes its index again.
    Parallelism { from: u32, to: u32 },
}

/// What each Job with stuck pods is to do, so that they stop holding quota and leave supply.
pub fn relieve(stuck: &[StuckJob]) -> Vec<(&StuckJob, Relief)> {
    stuck
        .iter()
        .filter_map(|job| match job.healthy {
            0 => Some((job, Relief::DeleteJob)),
            n if n < job.parallelism => Some((
                job,
                Relief::Parallelism {
                    from: job.parallelism,
                    to: n,
                },
            )),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            min_agents: 0,
            max_agents: 50,
            buffer: 2,
            buffer_ratio: 0.0,
            rollout_ratio: 0.5,
            rollout_timeout: Duration::from_secs(300),
            stuck_backoff: STUCK_BACKOFF,
            stuck_backoff_cap: STUCK_BACKOFF_CAP,
        }
    }

    fn demand(scheduled: u32, running: u32, agents: u32) -> Demand {
        Demand {
            scheduled,
            running,
            agents,
        }
    }

    #[test]
    fn a_burst_is_met_with_demand_plus_buffer_once() {
        let d = decide(demand(10, 0, 0), &Supply::default(), &limits());
        assert_eq!(d.action, Action::Dispatch(12));
        // The next tick: the Job exists, its pods not yet created. Nothing more.
        let supply = Supply {
            not_yet_created: 12,
            ..Supply::default()
        };
        let d = decide(demand(10, 0, 0), &supply, &limits());
        assert_eq!(d.action, Action::Hold(Hold::Enough));
    }

    #[test]
    fn no_agent_is_counted_twice() {
        // 5 pods running and registered (3 busy, 2 idle), 4 jobs waiting: 3 + 4 + 2 wanted.
        let supply = Supply {
            running: 5,
            ..Supply::default()
        };
        let d = decide(demand(4, 3, 5), &supply, &limits());
        assert_eq!((d.wanted, d.alive), (9, 5));
        assert_eq!(d.action, Action::Dispatch(4));
    }

    #[test]
    fn faults_stop_the_queue_and_say_why() {
        let quota = Supply {
            failed_create: Some("exceeded quota: agents".into()),
            ..Supply::default()
        };
        let d = decide(demand(20, 0, 0), &quota, &limits());
        assert!(matches!(d.action, Action::Hold(Hold::FailedCreate { .. })));
        let wrong_queue = Supply {
            running: 6,
            running_long: 6,
            ..Supply::default()
        };
        let d = decide(demand(6, 0, 0), &wrong_queue, &limits());
        assert_eq!(
            d.action,
            Action::Hold(Hold::WrongQueue {
                running: 6,
                agents: 0
            })
        );
        let failing = Supply {
            failing: Some("Job j failed".into()),
            ..Supply::default()
        };
        let d = decide(demand(6, 0, 0), &failing, &limits());
        assert!(matches!(d.action, Action::Hold(Hold::Failing { .. })));
    }

    #[test]
    fn unschedulable_pods_are_coming_so_an_autoscaler_sees_the_demand() {
        let unschedulable = Supply {
            pending: 3,
            unschedulable: 2,
            ..Supply::default()
        };
        // 20 jobs + 2 buffer wanted, 5 coming: 17 more, up to the maximum.
        let d = decide(demand(20, 0, 0), &unschedulable, &limits());
        assert_eq!((d.action, d.alive), (Action::Dispatch(17), 5));
        let d = decide(demand(100, 0, 0), &unschedulable, &limits());
        assert_eq!(d.action, Action::Dispatch(45));
    }

    #[test]
    fn stuck_dispatches_back_off_doubling_up_to_the_cap() {
        let streak = |dispatches, since| Supply {
            streak: Some(Streak {
                reason: "ImagePullBackOff".into(),
                dispatches,
                since_last: Duration::from_secs(since),
            }),
            ..Supply::default()
        };
        let retry_in = |supply: &Supply| match decide(demand(5, 0, 0), supply, &limits()).action {
            Action::Hold(Hold::Stuck { retry_in, .. }) => Some(retry_in.as_secs()),
            _ => None,
        };
        assert_eq!(retry_in(&streak(1, 0)), Some(30));
        assert_eq!(retry_in(&streak(1, 29)), Some(1));
        assert_eq!(retry_in(&streak(1, 30)), None, "served again");
        assert_eq!(retry_in(&streak(3, 20)), Some(100));
        assert_eq!(retry_in(&streak(30, 0)), Some(600), "capped");
        // The backoff over: a probe of the buffer's size, not the 7 pods short.
        let d = decide(demand(5, 0, 0), &streak(2, 600), &limits());
        assert_eq!(d.action, Action::Dispatch(2));
    }

    #[test]
    fn a_job_lets_its_stuck_pods_go_without_stopping_a_started_one() {
        let stuck = |healthy, parallelism| StuckJob {
            job: "j".into(),
            uid: "u".into(),
            parallelism,
            healthy,
            pods: vec![],
        };
        let all = [stuck(0, 4)];
        assert_eq!(relieve(&all)[0].1, Relief::DeleteJob);
        let some = [stuck(3, 5)];
        assert_eq!(relieve(&some)[0].1, Relief::Parallelism { from: 5, to: 3 });
        // Already down to what runs: nothing more.
        assert!(relieve(&[stuck(3, 3)]).is_empty());
    }

    #[test]
    fn a_dispatch_still_rolling_out_holds_the_next_until_it_times_out() {
        let mut supply = Supply {
            pending: 8,
            running: 2,
            last: Some(LastDispatch {
                id: "d1".into(),
                size: 10,
                online: 2,
                age: Duration::from_secs(30),
            }),
            ..Supply::default()
        };
        let d = decide(demand(30, 0, 2), &supply, &limits());
        assert!(matches!(d.action, Action::Hold(Hold::RollingOut { .. })));
        supply.last.as_mut().unwrap().online = 5; // finished pods count as online
        assert_eq!(
            decide(demand(30, 0, 2), &supply, &limits()).action,
            Action::Dispatch(22)
        );
    }

    #[test]
    fn never_more_than_max_and_min_kept_warm() {
        let supply = Supply {
            running: 48,
            ..Supply::default()
        };
        assert_eq!(
            decide(demand(100, 48, 48), &supply, &limits()).action,
            Action::Dispatch(2)
        );
        let full = Supply {
            running: 50,
            ..Supply::default()
        };
        assert_eq!(
            decide(demand(100, 50, 50), &full, &limits()).action,
            Action::Hold(Hold::Enough)
        );
        let warm = Limits {
            min_agents: 3,
            ..limits()
        };
        assert_eq!(
            decide(demand(0, 0, 0), &Supply::default(), &warm).action,
            Action::Dispatch(3)
        );
    }
}
