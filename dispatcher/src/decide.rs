//! The dispatch decision: a pure function of what one tick observed, so that it can be unit-tested
//! and driven through a simulated day (`benches/dispatch.rs`) exactly as it runs.
//!
//! Demand comes from Buildkite, supply from Kubernetes, and no agent is counted twice: only job
//! counts are taken from Buildkite (`scheduled`, `running`), only pod counts from Kubernetes. Every
//! pod of this queue that has not finished is one agent, busy, idle or on its way; a Job's pods
//! that its controller has not created yet count too (`parallelism` minus its pods alive or
//! succeeded and its indexes failed for good), or the tick right after a dispatch would dispatch
//! again. Pods that cannot be scheduled, and Jobs whose
//! pods a quota refuses (`FailedCreate`), are never counted as coming: they stop the queue's
//! dispatches instead, and say why, rather than deploying endlessly; so does a dispatch that
//! failed with not one agent succeeding, until `--start-deadline` has passed.
//!
//! The peers' failures this answers (`../shared/notes/dispatch-peers.md`): Sourcegraph's
//! dispatcher trusting low agent counts before its last dispatch rolled out (its rollout check,
//! kept here, counting finished pods as rolled out so short jobs do not make it look stalled);
//! unschedulable pods seen as coming; a template registering in another queue (pods running, the
//! queue's agent count not rising: stop and report); agent-stack-k8s's in-flight counter
//! drifting from the cluster (nothing here is remembered between ticks: every figure is
//! recomputed from what was observed).

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
    /// Pods the scheduler said it cannot place (`PodScheduled=False`, `Unschedulable`).
    pub unschedulable: u32,
    /// Pods running (an agent, once it has registered).
    pub running: u32,
    /// Of those, pods running for longer than an agent takes to register.
    pub running_long: u32,
    /// Pods the Job controller has yet to create for Jobs that are not finished.
    pub not_yet_created: u32,
    /// A Job's pods refused at creation (`FailedCreate`, e.g. `exceeded quota`): the message.
    pub failed_create: Option<String>,
    /// The newest dispatch has agents failed for good and not one succeeded (and, if it has
    /// ended, it ended lately): why.
    pub failing: Option<String>,
    /// The newest dispatch, if it is still rolling out.
    pub last: Option<LastDispatch>,
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
}

/// What one tick decided, with the figures it used (each goes into the decision's log line).
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub action: Action,
    /// The agents this tick wanted alive: running + scheduled jobs, plus the buffer, within the
    /// limits.
    pub wanted: u32,
    /// Agent pods alive or on their way (unschedulable ones excluded).
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
    /// Pods of this queue cannot be scheduled: more would not run either.
    Unschedulable { pods: u32 },
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
            Hold::Unschedulable { .. } => "unschedulable",
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
            Hold::Unschedulable { .. }
                | Hold::FailedCreate { .. }
                | Hold::WrongQueue { .. }
                | Hold::Failing { .. }
        )
    }
}

/// Decides one tick.
pub fn decide(demand: Demand, supply: &Supply, limits: &Limits) -> Decision {
    let alive = supply.pending + supply.running + supply.not_yet_created;
    let buffer = match demand.scheduled {
        0 => 0,
        n => limits
            .buffer
            .max((f64::from(n) * limits.buffer_ratio).ceil() as u32),
    };
    let wanted = (demand.running + demand.scheduled + buffer)
        .max(limits.min_agents)
        .min(limits.max_agents);
    let hold = |hold: Hold| Decision {
        action: Action::Hold(hold),
        wanted,
        alive,
    };
    if let Some(message) = &supply.failed_create {
        return hold(Hold::FailedCreate {
            message: message.clone(),
        });
    }
    if supply.unschedulable > 0 {
        return hold(Hold::Unschedulable {
            pods: supply.unschedulable,
        });
    }
    if let Some(why) = &supply.failing {
        return hold(Hold::Failing { why: why.clone() });
    }
    if supply.running_long > demand.agents {
        return hold(Hold::WrongQueue {
            running: supply.running_long,
            agents: demand.agents,
        });
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
    let room = limits
        .max_agents
        .saturating_sub(alive + supply.unschedulable);
    match short.min(room) {
        0 => hold(Hold::AtMax),
        n => Decision {
            action: Action::Dispatch(n),
            wanted,
            alive,
        },
    }
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
        let unschedulable = Supply {
            pending: 3,
            unschedulable: 2,
            ..Supply::default()
        };
        let d = decide(demand(20, 0, 0), &unschedulable, &limits());
        assert_eq!(d.action, Action::Hold(Hold::Unschedulable { pods: 2 }));
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
