//! The claims mode's mirror cycle (Sourcegraph's 2022 design on block disks): one claim per
//! generation, populated read-write by one Job, labelled ready, handed out read-only to new
//! agents; older generations expired, and deleted only once no pod object names them. Decided
//! here as a pure function of the observed claims, populate Jobs, snapshots and pods, so that a
//! restart in any phase resumes from what Kubernetes holds (`../shared/notes/dispatch-peers.md`
//! §6 for the failure modes this avoids: a claim deleted while agents still roll out leaves pods
//! that never schedule; a pod naming a Terminating claim stays Pending for ever).

use std::time::Duration;

/// A generation's claim's state, from its `stateless-agent/mirror-state` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimState {
    Populating,
    Ready,
    Expired,
}

impl ClaimState {
    pub fn label(self) -> &'static str {
        match self {
            ClaimState::Populating => "populating",
            ClaimState::Ready => "ready",
            ClaimState::Expired => "expired",
        }
    }

    pub fn from_label(label: &str) -> Option<ClaimState> {
        match label {
            "populating" => Some(ClaimState::Populating),
            "ready" => Some(ClaimState::Ready),
            "expired" => Some(ClaimState::Expired),
            _ => None,
        }
    }
}

/// One generation's claim, as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub generation: u64,
    pub state: ClaimState,
    /// Deleted, held by the pvc-protection finalizer: never to be handed out again.
    pub terminating: bool,
    /// How long ago it was marked ready.
    pub ready_for: Option<Duration>,
    /// A pod object (any phase) names it.
    pub in_use: bool,
}

/// A generation's populate Job, as observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PopulateJob {
    pub generation: u64,
    /// `Some(true)` complete, `Some(false)` failed, `None` running.
    pub outcome: Option<bool>,
    /// How long ago it ended.
    pub ended_for: Option<Duration>,
}

/// A generation's snapshot, as observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub generation: u64,
    pub ready: bool,
    /// The snapshotter reported an error.
    pub failed: bool,
}

/// What the cycle sees.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub claims: Vec<Claim>,
    pub jobs: Vec<PopulateJob>,
    pub snapshots: Vec<Snapshot>,
}

/// The cycle's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// A new generation when the newest ready one is this old; also how long a failed
    /// populate holds the next attempt back.
    pub refresh: Duration,
    /// Ready generations kept, the newest (handed out) included.
    pub keep: usize,
    /// Seed each generation from a snapshot of the last (a VolumeSnapshotClass is set).
    pub snapshots: bool,
}

/// One action on the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Snapshot generation N's claim, to seed the next.
    Snapshot(u64),
    /// Create generation N's claim, populating, from generation M's snapshot if any.
    CreateClaim {
        generation: u64,
        from: Option<u64>,
    },
    /// Start generation N's populate Job.
    Populate(u64),
    MarkReady(u64),
    MarkExpired(u64),
    DeleteClaim(u64),
    DeletePopulate(u64),
    DeleteSnapshot(u64),
}

/// The claim new agents get: the newest ready generation that is not being deleted.
pub fn handed_out(observed: &Observed) -> Option<u64> {
    observed
        .claims
        .iter()
        .filter(|c| c.state == ClaimState::Ready && !c.terminating)
        .map(|c| c.generation)
        .max()
}

/// The steps this cycle takes, in order.
pub fn plan(observed: &Observed, policy: &Policy) -> Vec<Step> {
    let newest_ready = handed_out(observed);
    let (mut steps, populating) = populate(observed, policy, newest_ready);
    steps.extend(spent_populates(observed, policy));
    steps.extend(expiry(observed, policy));
    // Snapshots older than the newest ready generation's seed nothing once no claim is being
    // made from them.
    if !populating {
        for s in &observed.snapshots {
            if newest_ready.is_some_and(|g| s.generation < g) {
                steps.push(Step::DeleteSnapshot(s.generation));
            }
        }
    }
    steps
}

fn live(c: &&Claim) -> bool {
    !c.terminating
}

/// The populate in hand, or the next generation when one is due; and whether a claim is being
/// populated.
fn populate(observed: &Observed, policy: &Policy, newest_ready: Option<u64>) -> (Vec<Step>, bool) {
    let mut steps = Vec::new();
    let job = |g: u64| observed.jobs.iter().find(|j| j.generation == g);
    let mut populating: Vec<&Claim> = observed
        .claims
        .iter()
        .filter(live)
        .filter(|c| c.state == ClaimState::Populating)
        .collect();
    populating.sort_by_key(|c| c.generation);
    // Only the newest populating claim goes on; an older one is a crash's leftover.
    let current = populating.pop();
    for stale in populating {
        steps.extend(discard(stale.generation, job(stale.generation).is_some()));
    }
    let Some(p) = current else {
        let due = match newest_ready {
            None => true,
            Some(g) => {
                let claim = observed.claims.iter().find(|c| c.generation == g);
                claim
                    .and_then(|c| c.ready_for)
                    .is_none_or(|age| age >= policy.refresh)
            }
        };
        let failed_lately = observed
            .jobs
            .iter()
            .any(|j| j.outcome == Some(false) && j.ended_for.is_none_or(|t| t < policy.refresh));
        if due && !failed_lately {
            steps.extend(next_generation(observed, policy, newest_ready));
        }
        return (steps, false);
    };
    match job(p.generation).map(|j| j.outcome) {
        None => steps.push(Step::Populate(p.generation)),
        Some(Some(true)) => steps.push(Step::MarkReady(p.generation)),
        // Its claim goes; its Job stays a while, to hold the next attempt back.
        Some(Some(false)) => steps.push(Step::DeleteClaim(p.generation)),
        Some(None) => {}
    }
    (steps, true)
}

/// A populate Job whose generation is published, or gone: its pod object would keep the claim
/// in use (pvc-protection counts finished pods) until the Job's TTL. A failed one goes once it
/// no longer holds the next attempt back.
fn spent_populates(observed: &Observed, policy: &Policy) -> Vec<Step> {
    let mut steps = Vec::new();
    for j in &observed.jobs {
        let claim = observed
            .claims
            .iter()
            .find(|c| c.generation == j.generation);
        let published = claim.is_some_and(|c| c.state != ClaimState::Populating);
        let spent = match j.outcome {
            Some(true) => published || claim.is_none(),
            Some(false) => j.ended_for.is_some_and(|t| t >= policy.refresh),
            None => claim.is_none(),
        };
        if spent {
            steps.push(Step::DeletePopulate(j.generation));
        }
    }
    steps
}

/// Ready generations beyond the newest `keep` expire; expired claims no pod object names any
/// more are deleted.
fn expiry(observed: &Observed, policy: &Policy) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut ready: Vec<u64> = observed
        .claims
        .iter()
        .filter(live)
        .filter(|c| c.state == ClaimState::Ready)
        .map(|c| c.generation)
        .collect();
    ready.sort_unstable_by(|a, b| b.cmp(a));
    for &g in ready.iter().skip(policy.keep.max(1)) {
        steps.push(Step::MarkExpired(g));
    }
    for c in observed.claims.iter().filter(live) {
        if c.state == ClaimState::Expired && !c.in_use {
            steps.push(Step::DeleteClaim(c.generation));
        }
    }
    steps
}

/// A generation that will not be published: its Job (if any) and its claim go.
fn discard(generation: u64, has_job: bool) -> Vec<Step> {
    let mut steps = Vec::new();
    if has_job {
        steps.push(Step::DeletePopulate(generation));
    }
    steps.push(Step::DeleteClaim(generation));
    steps
}

/// The next generation's first step: its claim, seeded from a snapshot of the newest ready
/// generation when snapshots are on (taking the snapshot first, then waiting for it).
fn next_generation(observed: &Observed, policy: &Policy, newest_ready: Option<u64>) -> Vec<Step> {
    let highest = [
        observed.claims.iter().map(|c| c.generation).max(),
        observed.jobs.iter().map(|j| j.generation).max(),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(0);
    let generation = highest + 1;
    let empty = Step::CreateClaim {
        generation,
        from: None,
    };
    let Some(base) = newest_ready.filter(|_| policy.snapshots) else {
        return vec![empty];
    };
    match observed.snapshots.iter().find(|s| s.generation == base) {
        None => vec![Step::Snapshot(base)],
        // A snapshot that failed: an empty claim, a full populate.
        Some(s) if s.failed => vec![empty],
        Some(s) if s.ready => vec![Step::CreateClaim {
            generation,
            from: Some(base),
        }],
        Some(_) => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        refresh: Duration::from_secs(900),
        keep: 2,
        snapshots: false,
    };

    fn claim(generation: u64, state: ClaimState) -> Claim {
        Claim {
            generation,
            state,
            terminating: false,
            ready_for: (state == ClaimState::Ready).then_some(Duration::from_secs(60)),
            in_use: false,
        }
    }

    #[test]
    fn the_first_generation_is_created_populated_and_marked_ready() {
        let mut seen = Observed::default();
        assert_eq!(
            plan(&seen, &POLICY),
            [Step::CreateClaim {
                generation: 1,
                from: None
            }]
        );
        seen.claims.push(claim(1, ClaimState::Populating));
        assert_eq!(plan(&seen, &POLICY), [Step::Populate(1)]);
        seen.jobs.push(PopulateJob {
            generation: 1,
            outcome: None,
            ended_for: None,
        });
        assert_eq!(plan(&seen, &POLICY), []);
        assert_eq!(handed_out(&seen), None);
        seen.jobs[0].outcome = Some(true);
        assert_eq!(plan(&seen, &POLICY), [Step::MarkReady(1)]);
        seen.claims[0] = claim(1, ClaimState::Ready);
        // Its Job's pod would pin the claim: the Job goes once the generation is out.
        assert_eq!(plan(&seen, &POLICY), [Step::DeletePopulate(1)]);
        seen.jobs.clear();
        assert_eq!(plan(&seen, &POLICY), []);
        assert_eq!(handed_out(&seen), Some(1));
    }

    #[test]
    fn a_refresh_is_due_after_the_interval_and_older_generations_expire_then_go_when_unused() {
        let mut seen = Observed {
            claims: vec![claim(1, ClaimState::Ready), claim(2, ClaimState::Ready)],
            ..Observed::default()
        };
        seen.claims[1].ready_for = Some(Duration::from_secs(901));
        assert_eq!(
            plan(&seen, &POLICY),
            [Step::CreateClaim {
                generation: 3,
                from: None
            }]
        );
        // Three ready, keep two: the oldest expires; it goes once no pod object names it.
        seen.claims[1].ready_for = Some(Duration::from_secs(5));
        seen.claims.push(claim(3, ClaimState::Ready));
        assert_eq!(plan(&seen, &POLICY), [Step::MarkExpired(1)]);
        seen.claims[0] = Claim {
            in_use: true,
            ..claim(1, ClaimState::Expired)
        };
        assert_eq!(plan(&seen, &POLICY), []);
        seen.claims[0].in_use = false;
        assert_eq!(plan(&seen, &POLICY), [Step::DeleteClaim(1)]);
        assert_eq!(handed_out(&seen), Some(3));
    }

    #[test]
    fn a_failed_populate_discards_its_generation_keeps_the_last_and_waits_to_try_again() {
        let mut old = claim(4, ClaimState::Ready);
        old.ready_for = Some(Duration::from_secs(5000));
        let mut seen = Observed {
            claims: vec![old, claim(5, ClaimState::Populating)],
            jobs: vec![PopulateJob {
                generation: 5,
                outcome: Some(false),
                ended_for: Some(Duration::from_secs(1)),
            }],
            ..Observed::default()
        };
        assert_eq!(plan(&seen, &POLICY), [Step::DeleteClaim(5)]);
        assert_eq!(handed_out(&seen), Some(4));
        // 4 is due for a refresh, but the failure is recent: no new attempt yet.
        seen.claims.pop();
        assert_eq!(plan(&seen, &POLICY), []);
        // Once the failure is as old as the refresh interval: its Job goes, 6 is tried.
        seen.jobs[0].ended_for = Some(Duration::from_secs(900));
        assert_eq!(
            plan(&seen, &POLICY),
            [
                Step::CreateClaim {
                    generation: 6,
                    from: None
                },
                Step::DeletePopulate(5)
            ]
        );
    }

    #[test]
    fn a_terminating_claim_is_never_handed_out_and_a_crash_leftover_is_cleaned() {
        let mut seen = Observed {
            claims: vec![
                claim(6, ClaimState::Ready),
                claim(7, ClaimState::Populating),
                claim(8, ClaimState::Populating),
            ],
            ..Observed::default()
        };
        seen.claims[0].terminating = true;
        assert_eq!(handed_out(&seen), None);
        // Two populating (a restart between creating 8 and cleaning 7): 7 goes, 8 goes on.
        assert_eq!(
            plan(&seen, &POLICY),
            [Step::DeleteClaim(7), Step::Populate(8)]
        );
    }

    #[test]
    fn with_snapshots_the_next_generation_is_seeded_from_the_last() {
        let policy = Policy {
            snapshots: true,
            ..POLICY
        };
        let mut seen = Observed {
            claims: vec![Claim {
                ready_for: Some(Duration::from_secs(1000)),
                ..claim(2, ClaimState::Ready)
            }],
            ..Observed::default()
        };
        assert_eq!(plan(&seen, &policy), [Step::Snapshot(2)]);
        seen.snapshots.push(Snapshot {
            generation: 2,
            ready: false,
            failed: false,
        });
        assert_eq!(plan(&seen, &policy), []);
        seen.snapshots[0].ready = true;
        assert_eq!(
            plan(&seen, &policy),
            [Step::CreateClaim {
                generation: 3,
                from: Some(2)
            }]
        );
        // Once 3 is ready, 2's snapshot seeds nothing.
        seen.claims.push(claim(3, ClaimState::Ready));
        assert_eq!(plan(&seen, &policy), [Step::DeleteSnapshot(2)]);
        // A snapshot that failed: an empty claim instead.
        seen.claims.pop();
        seen.snapshots[0] = Snapshot {
            generation: 2,
            ready: false,
            failed: true,
        };
        assert_eq!(
            plan(&seen, &policy),
            [Step::CreateClaim {
                generation: 3,
                from: None
            }]
        );
    }
}
