//! A simulated day of CI, driving the dispatcher's real decision code ([`dispatcher::decide`])
//! with a simulated clock, beside the peers' policies (`../shared/notes/dispatch-peers.md`), all
//! on the same workload in the same run:
//!
//! - builds arrive through the day (busier in working hours) and fan out to 20–200 jobs;
//! - job durations are heavy-tailed (log-normal, median 3 min, capped at 1 h);
//! - a pod starts in 10–20 s, or 60–120 s on a cold node (1 in 10), then its agent registers and
//!   takes the oldest waiting job; it exits after its job, or idle after agent-wrapper's idle
//!   timeout: 10 min, or the 2 min the dispatcher sets on its Jobs;
//! - the cluster runs at most `BENCH_CAPACITY` pods (300); the rest wait unschedulable.
//!
//! Policies: this dispatcher; Sourcegraph's 2022 dispatcher without its rollout check (queued
//! jobs + buffer minus the agents Buildkite sees idle, every tick); the buildkite-agent-scaler
//! formula (scheduled + running, with its proportional buffer, scale-in off); one pod per job
//! (agent-stack-k8s); KEDA ScaledJob's default strategy (queue length minus running Jobs); an
//! oracle that knows each job's arrival (not each pod's start-up) and starts one pod per job so
//! that a typical pod registers as the job arrives.
//!
//! This dispatcher's stacks mode (`--source stacks`) drives the real
//! [`dispatcher::stacks_plan::plan`] (`dispatcher/src/stacks_plan.rs`) each tick on what
//! `stacks_run.rs` observes: the first page (100) of scheduled jobs, oldest first, reserved ones
//! not listed; the Buildkite state (`scheduled`, `reserved` until its expiry, `running`,
//! `finished`) of each job that has a Job, finished Jobs included until their 10 min TTL; and each
//! Job as `stacks_observe.rs` reads it: `Coming(Created)` before its pod is scheduled,
//! `Coming(Pulling)` while it starts, `Coming(Started)` once its agent runs, `Stuck` when its pod
//! has not started 300 s after its creation (`ImagePullBackOff`, `Unschedulable`; a Job whose pod
//! the quota refused, from the Job's creation: `FailedCreate`), `Ended` when its pod went. It acts
//! as `stacks_run.rs` does: for each job taken a suspended Job (one pod), one 300 s reservation for
//! the batch, each Job resumed; reservations renewed when half is left; a job whose pod is stuck or
//! ended before its agent acquired it finished with exit -1 (the stuck pod's Job deleted), and
//! retried at once as a new job at the back of the queue (as agent-stack-k8s's jobs are, below),
//! its wait still counted from the first arrival; each stage told in one notification call a tick.
//! Its pod's agent acquires exactly its job (`--acquire-job`: no other pod can take it) and exits
//! after it, or at once if the job was finished meanwhile: no idle time, but a slow pod delays its
//! own job even when another pod is up. Its ceiling is `--max-agents` unfinished Jobs (400), the
//! capacity the others'. Its API requests: the listing each tick, `get-states` (one per 1000 Jobs,
//! none without), each reserve call, create and Job patch, each finish (with a stuck pod's Job
//! deletion and Event), each notification call and the patch recording it, and the watches' relists
//! as ours.
//!
//! Printed per policy: p50 and p95 queue wait (scheduled → accepted), agent-minutes wasted (the
//! whole life of pods that took no job, plus the idle time of those that did), pods created, the
//! most pods alive beyond demand + buffer when a dispatch was made, API requests per hour.
//!
//! Then the same day with faults, the same for every policy:
//!
//! - **Node drains at 09:00, 11:30 and 13:30**, each over the nodes of a fifth of the pods (the
//!   Eviction API sets `DisruptionTarget`, kubernetes `pkg/registry/core/pod/storage/eviction.go`):
//!   an agent there without a job (idle, starting, or stuck) exits; a busy one finishes its job
//!   within its grace period. The Job controller makes the index's pod again after its 10 s
//!   backoff (kubernetes `pkg/controller/job/backoff_utils.go`); for this dispatcher that is no
//!   failure (its Jobs' podFailurePolicy ignores `DisruptionTarget`) and the pod counts as coming
//!   meanwhile. The other Jobs (Sourcegraph's, KEDA's, the oracle's) and the scaler's group
//!   replace the pod the same way; agent-stack-k8s's Jobs have `backoffLimit: 0`
//!   (`internal/controller/scheduler/scheduler.go`), so its Job ends, and a job still waiting
//!   gets a new one from the next poll.
//! - **The namespace's pod quota at half the capacity, 10:00–10:15 and 12:30–12:45.** Creates
//!   beyond it are refused (`FailedCreate`) and the Job controller retries each, waiting 1 s
//!   doubling to 60 s (kubernetes `pkg/controller/job/`). This dispatcher holds new dispatches
//!   while a refusal is fresh (75 s) and counts the refused pods as coming; the scaler and KEDA
//!   count them too (instances asked for; unfinished Jobs); Sourcegraph does not, and asks again
//!   every tick; agent-stack-k8s fails a Job still without a pod 30 s after its start
//!   (`empty-job-grace-period`, `internal/controller/scheduler/job_watcher.go`), its Buildkite job
//!   retried as below.
//! - **The agent image broken from 14:00 to 14:20**, after the other faults: the peers keep its
//!   pods for hours, which would hide what those do to them. Pods created then never start: they
//!   wait in `ImagePullBackOff`, holding a node slot and a place in the quota, and the fix (a new
//!   tag, so a new template) never helps them (kubernetes `pkg/kubelet/images/image_manager.go`);
//!   pods created after it start normally. This dispatcher finds a pod stuck once it has not
//!   started 5 min after its creation (`--start-timeout`, `observe.rs`): out of its supply, its
//!   Job deleted or its parallelism lowered to the pods that started
//!   ([`dispatcher::decide::relieve`]); each further dispatch waits 30 s, doubling up to 10 min,
//!   while dispatches keep getting stuck with no agent starting, and the new template ends that
//!   run. Sourcegraph's dispatcher, the buildkite-agent-scaler and KEDA keep such pods alive until
//!   their Job's `activeDeadlineSeconds`, taken as 4 h, this dispatcher's own: Sourcegraph's
//!   dispatcher sets one (sourcegraph/sourcegraph#32843) but no value is given; KEDA's is the
//!   ScaledJob template's, and it counts the Job as running meanwhile (kedacore/keda
//!   `pkg/scaling/executor/scale_jobs.go`); the scaler counts them among its instances
//!   (buildkite-agent-scaler `scaler/scaling_calculator.go`; its `ELASTIC_CI_MODE` reaper of
//!   instances without an agent is not modelled). Sourcegraph's counts only idle agents, so it
//!   asks for more pods every tick, up to its maximum. agent-stack-k8s deletes the pod 30 s after
//!   its start and fails its Buildkite job (`image-pull-backoff-grace-period`,
//!   `internal/controller/scheduler/pod_watcher.go`): modelled as the job retried at once (a
//!   `retry: automatic` rule for exit status -1, with no limit), so it waits on for a pod from
//!   the controller's next poll. The oracle knows of the broken image: its pods wait for the fix.
//!   The stacks mode's Jobs have `backoffLimitPerIndex: 0` (`template.rs`), but their first
//!   podFailurePolicy rule ignores `DisruptionTarget`: a drained pod is made again after the
//!   backoff, its job still the Job's (`stacks_observe.rs` reads it as coming); a Job the quota
//!   keeps without a pod is `Coming(Created)` until 300 s, then stuck: its job finished and
//!   retried; a broken image's pod is stuck 300 s after its creation, its job finished and
//!   retried, its Job deleted; the stuck Jobs count against `--max-agents` until then, and new
//!   pods after the fix start.
//!
//! Printed per policy under faults: the jobs delayed (waiting longer than that policy's fault-free
//! p95) and the p95 wait; agent-minutes wasted, and of those the minutes stuck pods held a node
//! slot; and for each kind of fault the time from its cause ending (the drain done, the quota
//! restored, the image fixed) to the first job accepted after it, if jobs were waiting then (the
//! longest of a kind's occurrences; "n/a" if none were waiting). With `BENCH_SEEDS` (default 1)
//! the day runs on as many seeds from `BENCH_SEED`, each with its own workload, and the faults
//! table prints medians, with the p95 and the waste also as ratios to the oracle's. Last, for the
//! stacks mode and agent-stack-k8s, the policies that finish Buildkite jobs: how many they
//! finished with exit -1 on each day, and for the pods made while the image was broken, the time
//! from a pod's creation to its job finished in Buildkite (median and max; both finish the job
//! as they delete the pod).
//!
//! Run: `cargo bench -p dispatcher --bench dispatch` (`BENCH_SEED`, default 7; `BENCH_SEEDS`;
//! `BENCH_BUILDS` builds a day, default 120; `BENCH_CAPACITY`, default 300).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Duration;

use dispatcher::decide::{
    decide, relieve, Action, Demand, LastDispatch, Limits, Relief, Streak, StuckJob, StuckPod,
    Supply, STUCK_BACKOFF, STUCK_BACKOFF_CAP,
};
use dispatcher::stacks_api::{ScheduledJob, BATCH};
use dispatcher::stacks_observe::{PodState as StackPod, StackJob, Stage};
use dispatcher::stacks_plan::{self, Finish, Notice, Plan, Seen, StackHold, StackLimits, Why};
use k8s_openapi::jiff::Timestamp;

/// The dispatchers' tick: the metrics API's poll interval.
const TICK: f64 = 10.0;
const DAY: f64 = 86_400.0;
const HOUR: f64 = 3600.0;
const IDLE_TIMEOUT: f64 = 600.0;
/// The dispatcher's per-dispatch idle timeout (`--dispatch-idle-timeout`).
const DISPATCH_IDLE_TIMEOUT: f64 = 120.0;
const BUFFER: u32 = 2;
const BUFFER_RATIO: f64 = 0.1;
const MAX_AGENTS: u32 = 400;
/// Pods appear this long after their Job is created (the Job controller's work).
const JOB_CONTROLLER_DELAY: f64 = 1.0;
/// What the oracle expects a pod to take to start (the typical, warm node).
const TYPICAL_STARTUP: f64 = 15.0;
/// A running pod older than this has registered its agent, or something is wrong.
const REGISTERED_BY: f64 = 300.0;

// The faulty day, in working hours. The broken image comes last: the peers keep its pods for
// hours, which would hide what the other faults do to them.
/// The faulty day's node drains, each over the nodes of `DRAINED_SHARE` of the pods.
const DRAINS: [f64; 3] = [9.0 * HOUR, 11.5 * HOUR, 13.5 * HOUR];
const DRAINED_SHARE: f64 = 0.2;
/// The faulty day's spans with the pod quota at `QUOTA_SHARE` of the capacity.
const QUOTA_CUTS: [(f64, f64); 2] = [(10.0 * HOUR, 10.25 * HOUR), (12.5 * HOUR, 12.75 * HOUR)];
const QUOTA_SHARE: f64 = 0.5;
/// The faulty day's broken image: pods created from the first time until the second never start.
const BROKEN_IMAGE: (f64, f64) = (14.0 * HOUR, 14.0 * HOUR + 1200.0);
/// `--start-timeout`: a pod of this dispatcher not started this long after its creation is stuck.
const START_TIMEOUT: f64 = 300.0;
/// How long a `FailedCreate` holds this dispatcher's dispatches (`REFUSAL_FRESH` in `run.rs`).
const REFUSAL_FRESH: f64 = 75.0;
/// Every Job's `activeDeadlineSeconds` (this dispatcher's `--job-deadline`): a pod that never
/// starts goes then, if nothing let it go before.
const JOB_DEADLINE: f64 = 4.0 * HOUR;
/// The Job controller's backoff before it makes a failed or evicted index's pod again (the first
/// failure's; it doubles per failure of the same index).
const INDEX_BACKOFF: f64 = 10.0;
/// The Job controller retries a refused create after 1 s, doubling up to this.
const CREATE_BACKOFF_CAP: f64 = 60.0;
/// agent-stack-k8s's `image-pull-backoff-grace-period` and `empty-job-grace-period`.
const ASK_GRACE: f64 = 30.0;
/// The stacks mode's reservations (`--reservation-expiry`), renewed by the plan when half is left.
const RESERVATION: f64 = 300.0;
/// Each Job's `ttlSecondsAfterFinished` (`--job-ttl`): the stacks mode keeps a finished Job's
/// job among those it asks the state of until then.
const JOB_TTL: f64 = 600.0;
/// The scheduled jobs one listing reads (`LIST_LIMIT` in `stacks_run.rs`).
const LIST_LIMIT: usize = 100;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seed = env_or("BENCH_SEED", 7);
    let seeds = env_or("BENCH_SEEDS", 1).max(1);
    let builds = env_or("BENCH_BUILDS", 120) as usize;
    let capacity = env_or("BENCH_CAPACITY", 300) as usize;
    let days: Vec<Day> = (seed..seed + seeds)
        .map(|seed| Day::run(seed, builds, capacity))
        .collect();
    print_today(&days[0], builds, capacity);
    print_faults(&days);
    print_finished(&days);
}

/// One seed's workload, run by every policy without faults and with them.
struct Day {
    seed: u64,
    jobs: usize,
    runs: Vec<Run>,
}

/// One policy's day without faults and with them.
struct Run {
    policy: Policy,
    clean: Results,
    faulty: Results,
}

impl Day {
    fn run(seed: u64, builds: usize, capacity: usize) -> Day {
        let mut rng = Rng(seed);
        let workload = Workload::generate(&mut rng, builds);
        let runs = Policy::ALL
            .into_iter()
            .map(|policy| Run {
                policy,
                clean: Sim::run(policy, &workload, capacity, seed, false),
                faulty: Sim::run(policy, &workload, capacity, seed, true),
            })
            .collect();
        Day {
            seed,
            jobs: workload.jobs.len(),
            runs,
        }
    }

    fn clean(&self, policy: Policy) -> &Results {
        &self.runs.iter().find(|r| r.policy == policy).unwrap().clean
    }
}

/// The fault-free table of the first seed's day, and how this dispatcher meets its targets.
fn print_today(day: &Day, builds: usize, capacity: usize) {
    println!(
        "one simulated day: {} builds, {} jobs, cluster capacity {capacity} pods, tick {TICK}s, seed {}",
        builds, day.jobs, day.seed
    );
    println!();
    println!("| policy | p50 wait | p95 wait | agent-minutes wasted | pods created | most pods beyond demand + buffer | API requests / hour |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for run in &day.runs {
        let r = &run.clean;
        println!(
            "| {} | {:.0} s | {:.0} s | {:.0} | {} | {} | {:.0} |",
            run.policy.name(),
            r.p50,
            r.p95,
            r.waste_minutes,
            r.pods,
            r.overshoot,
            r.requests_per_hour
        );
    }
    for ours in [
        Policy::Dispatcher,
        Policy::DispatcherProportional,
        Policy::Stacks,
    ] {
        print_targets(day, ours);
    }
}

fn print_targets(day: &Day, ours_policy: Policy) {
    let oracle = day.clean(Policy::Oracle);
    let ours = day.clean(ours_policy);
    println!();
    println!("{}:", ours_policy.name());
    let target = oracle.p95 + TICK;
    println!(
        "- target p95 wait ≤ oracle's + one poll interval ({target:.0} s): {:.0} s {}",
        ours.p95,
        verdict(ours.p95 <= target)
    );
    // The peer with the least waste among those whose p95 is as good as ours or better.
    let best_peer = day
        .runs
        .iter()
        .filter(|r| r.policy.is_peer())
        .filter(|r| r.clean.p95 <= ours.p95)
        .map(|r| (r.policy.name(), r.clean.waste_minutes))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    match best_peer {
        Some((name, waste)) => println!(
            "- target waste ≤ 0.5 × the least of the peers with an equal or better p95 ({name}: {waste:.0}): {:.0} ({:.2}×) {}",
            ours.waste_minutes,
            ours.waste_minutes / waste.max(1.0),
            verdict(ours.waste_minutes <= 0.5 * waste)
        ),
        None => println!("- target waste: no peer has an equal or better p95: met"),
    }
    println!(
        "- target never more pods than demand + buffer, up to --max-agents: {} beyond {}",
        ours.overshoot,
        verdict(ours.overshoot == 0)
    );
}

/// The table of the faulty days: per policy, the median over the seeds.
fn print_faults(days: &[Day]) {
    let span = |(from, to): (f64, f64)| format!("{}–{}", clock(from), clock(to));
    println!();
    println!(
        "the same day with faults ({} seed{} from {}, medians): node drains at {} over {:.0} % of the pods; the pod quota at {:.0} % of capacity {}; the image broken {}",
        days.len(),
        if days.len() == 1 { "" } else { "s" },
        days[0].seed,
        DRAINS.map(clock).join(", "),
        DRAINED_SHARE * 100.0,
        QUOTA_SHARE * 100.0,
        QUOTA_CUTS.map(span).join(" and "),
        span(BROKEN_IMAGE)
    );
    println!();
    println!("| policy | jobs delayed (wait > its fault-free p95) | p95 wait (× oracle) | agent-minutes wasted (× oracle) | of which stuck pods holding a slot | drain → served | quota restored → served | image fixed → served |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let oracle = FaultRow::of(days, Policy::Oracle);
    for policy in Policy::ALL {
        let row = FaultRow::of(days, policy);
        let recovery = row
            .recovery
            .map(|r| r.map_or("n/a".into(), |s| format!("{s:.0} s")));
        println!(
            "| {} | {:.0} | {:.0} s ({:.1}×) | {:.0} ({:.1}×) | {:.0} | {} | {} | {} |",
            policy.name(),
            row.delayed,
            row.p95,
            row.p95 / oracle.p95.max(1.0),
            row.waste_minutes,
            row.waste_minutes / oracle.waste_minutes.max(1.0),
            row.stuck_slot_minutes,
            recovery[0],
            recovery[1],
            recovery[2]
        );
    }
}

/// The policies that finish Buildkite jobs they cannot run (exit -1, each retried): how many,
/// and how soon a pod of the broken image has its job finished; medians over the seeds.
fn print_finished(days: &[Day]) {
    println!();
    println!("jobs finished with exit -1 by the policy (each retried at once), and the pods made while the image was broken: from the pod's creation to its job finished in Buildkite");
    println!();
    println!("| policy | jobs finished, fault-free day | jobs finished, day with faults | broken-image pods | pod created → job finished, median | max |");
    println!("|---|---:|---:|---:|---:|---:|");
    for policy in [Policy::Stacks, Policy::PodPerJob] {
        let runs = runs_of(days, policy);
        let median_of = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(|r| f(r)).collect());
        let broken = |r: &Run| r.faulty.broken_finished.clone();
        let max = |v: Vec<f64>| v.into_iter().fold(0.0, f64::max);
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} s | {:.0} s |",
            policy.name(),
            median_of(&|r| f64::from(r.clean.failed_jobs)),
            median_of(&|r| f64::from(r.faulty.failed_jobs)),
            median_of(&|r| broken(r).len() as f64),
            median_of(&|r| median_or_zero(broken(r))),
            median_of(&|r| max(broken(r))),
        );
    }
}

/// One policy's faulty days, as medians over the seeds.
struct FaultRow {
    delayed: f64,
    p95: f64,
    waste_minutes: f64,
    stuck_slot_minutes: f64,
    /// By [`Fault`]: over the seeds where jobs were waiting as a cause ended.
    recovery: [Option<f64>; 3],
}

impl FaultRow {
    fn of(days: &[Day], policy: Policy) -> FaultRow {
        let runs = runs_of(days, policy);
        let median_of = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(|r| f(r)).collect());
        FaultRow {
            delayed: median_of(&|r| {
                let slow = r.faulty.waits.iter().filter(|w| **w > r.clean.p95);
                slow.count() as f64
            }),
            p95: median_of(&|r| r.faulty.p95),
            waste_minutes: median_of(&|r| r.faulty.waste_minutes),
            stuck_slot_minutes: median_of(&|r| r.faulty.stuck_slot_minutes),
            recovery: Fault::ALL.map(|f| {
                let seen: Vec<f64> = runs
                    .iter()
                    .filter_map(|r| r.faulty.recovery[f as usize])
                    .collect();
                (!seen.is_empty()).then(|| median(seen))
            }),
        }
    }
}

/// A policy's run of each day.
fn runs_of(days: &[Day], policy: Policy) -> Vec<&Run> {
    days.iter()
        .map(|d| d.runs.iter().find(|r| r.policy == policy).unwrap())
        .collect()
}

/// The median of values; 0 if none.
fn median_or_zero(values: Vec<f64>) -> f64 {
    match values.is_empty() {
        true => 0.0,
        false => median(values),
    }
}

/// The median of values, at least one.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() % 2 {
        1 => values[mid],
        _ => (values[mid - 1] + values[mid]) / 2.0,
    }
}

/// `hh:mm` of a time of the day.
fn clock(at: f64) -> String {
    let minutes = (at / 60.0).round() as u32;
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// splitmix64: a small deterministic generator, so every policy sees the same day.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn between(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.unit()
    }

    /// A standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u = self.unit().max(1e-12);
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

struct Job {
    arrival: f64,
    duration: f64,
}

struct Workload {
    /// Sorted by arrival.
    jobs: Vec<Job>,
}

impl Workload {
    fn generate(rng: &mut Rng, builds: usize) -> Workload {
        let mut jobs = Vec::new();
        for _ in 0..builds {
            // Four builds in five during working hours (08:00–18:00).
            let at = if rng.unit() < 0.8 {
                rng.between(8.0 * 3600.0, 18.0 * 3600.0)
            } else {
                rng.between(0.0, DAY)
            };
            let fan_out = rng.between(20.0, 201.0) as usize;
            for _ in 0..fan_out {
                // Jobs of a build are scheduled within a few seconds of each other.
                let arrival = at + rng.between(0.0, 5.0);
                let duration = (180.0 * (1.0 * rng.normal()).exp()).clamp(10.0, 3600.0);
                jobs.push(Job { arrival, duration });
            }
        }
        jobs.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
        Workload { jobs }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    /// `--buffer 2`.
    Dispatcher,
    /// `--buffer 2 --buffer-ratio 0.1`.
    DispatcherProportional,
    /// `--source stacks`: one Job per reserved job, through [`stacks_plan::plan`].
    Stacks,
    SourcegraphNoRollout,
    AgentScaler,
    PodPerJob,
    KedaDefault,
    Oracle,
}

impl Policy {
    const ALL: [Policy; 8] = [
        Policy::Dispatcher,
        Policy::DispatcherProportional,
        Policy::Stacks,
        Policy::SourcegraphNoRollout,
        Policy::AgentScaler,
        Policy::PodPerJob,
        Policy::KedaDefault,
        Policy::Oracle,
    ];

    /// The idle timeout of the pods it creates: the dispatcher sets a short one on its Jobs (jobs
    /// were waiting when it dispatched, so an agent that finds none soon is surplus); the peers
    /// keep the agent's usual 10 min. The stacks mode's agent acquires its own job at once, or
    /// exits (the job was finished meanwhile: its acquire is refused).
    fn idle_timeout(self) -> f64 {
        match self {
            Policy::Dispatcher | Policy::DispatcherProportional => DISPATCH_IDLE_TIMEOUT,
            Policy::Stacks => 0.0,
            _ => IDLE_TIMEOUT,
        }
    }

    fn is_peer(self) -> bool {
        !matches!(
            self,
            Policy::Dispatcher | Policy::DispatcherProportional | Policy::Stacks | Policy::Oracle
        )
    }

    /// A pod that fails is its Job's last, and a stuck one's job is finished with it:
    /// agent-stack-k8s's `backoffLimit: 0`, the stacks mode's `backoffLimitPerIndex: 0`
    /// (`template.rs`; a drained pod, whose `DisruptionTarget` the Job ignores, is made again).
    fn one_try(self) -> bool {
        matches!(self, Policy::PodPerJob | Policy::Stacks)
    }

    /// The dispatcher's buffer: a count, or a share of the waiting jobs when that is more.
    fn buffer(self, scheduled: u32) -> u32 {
        let ratio = match self {
            Policy::DispatcherProportional => BUFFER_RATIO,
            _ => 0.0,
        };
        match scheduled {
            0 => 0,
            n => BUFFER.max((f64::from(n) * ratio).ceil() as u32),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Policy::Dispatcher => "this dispatcher, buffer 2",
            Policy::DispatcherProportional => "this dispatcher, buffer 2 or 10 % of waiting jobs",
            Policy::Stacks => "this dispatcher, stacks mode",
            Policy::SourcegraphNoRollout => "Sourcegraph 2022, no rollout check",
            Policy::AgentScaler => "buildkite-agent-scaler",
            Policy::PodPerJob => "one pod per job (agent-stack-k8s)",
            Policy::KedaDefault => "KEDA ScaledJob, default",
            Policy::Oracle => "oracle",
        }
    }

    /// API requests a tick makes besides creating Jobs or pods: the metrics poll, plus what each
    /// design reads from Kubernetes (lists each tick; ours watches, with a relist every 5 min
    /// per watched kind, i.e. 2/30 of a request a tick). The stacks mode's poll is the listing
    /// of scheduled jobs; its other calls are counted as it makes them.
    fn reads_per_tick(self) -> f64 {
        match self {
            Policy::Dispatcher | Policy::DispatcherProportional | Policy::Stacks => {
                1.0 + 2.0 * TICK / 300.0
            }
            Policy::SourcegraphNoRollout => 2.0, // metrics, list the last dispatch's pods
            Policy::AgentScaler => 2.0,          // metrics, describe the group
            Policy::PodPerJob => 1.0,            // the scheduled-jobs poll (plus a get per job)
            Policy::KedaDefault => 2.0,          // the scaler's metric, list Jobs
            Policy::Oracle => 0.0,
        }
    }

    /// How many agents a peer creates this tick, by its formula.
    fn peer_wants(self, c: &Census) -> u32 {
        match self {
            Policy::SourcegraphNoRollout => {
                // parallelism = queued + buffer, less the agents seen idle: pods on their way
                // are invisible to it.
                (c.scheduled + BUFFER).saturating_sub(c.idle) * u32::from(c.scheduled > 0)
            }
            Policy::AgentScaler => {
                // desired = scheduled + running (+ proportional buffer), against instances.
                let total = c.scheduled + c.running;
                let desired = total + BUFFER.min(total);
                desired.min(MAX_AGENTS).saturating_sub(c.alive)
            }
            Policy::PodPerJob => {
                // A pod for each scheduled job that has none coming.
                let coming = c.not_yet_created + c.unschedulable + c.starting;
                c.scheduled.saturating_sub(coming + c.idle)
            }
            Policy::KedaDefault => {
                // maxScale = queue length; effectiveMax = maxScale − running Jobs (unfinished).
                let max_scale = c.scheduled.min(MAX_AGENTS);
                max_scale.saturating_sub(c.alive - c.idle)
            }
            // This dispatcher decides through `decide` or `stacks_plan::plan`; the oracle
            // planned its pods at the start.
            Policy::Dispatcher
            | Policy::DispatcherProportional
            | Policy::Stacks
            | Policy::Oracle => 0,
        }
    }
}

/// The kinds of fault, each with the time its cause ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Drain,
    Quota,
    Image,
}

impl Fault {
    const ALL: [Fault; 3] = [Fault::Drain, Fault::Quota, Fault::Image];

    /// When each occurrence's cause ends: the drain done, the quota restored, the image fixed.
    fn ends(self) -> Vec<f64> {
        match self {
            Fault::Drain => DRAINS.to_vec(),
            Fault::Quota => QUOTA_CUTS.iter().map(|(_, end)| *end).collect(),
            Fault::Image => vec![BROKEN_IMAGE.1],
        }
    }
}

/// Whether the queue was served again after a cause ended.
struct Recovery {
    fault: Fault,
    at: f64,
    /// Whether jobs were waiting at `at`, once it has come.
    waiting: Option<bool>,
    /// When the first job was accepted after `at`.
    served: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PodState {
    /// Created by a Job not yet acted on by its controller, until `ready_at`.
    NotYetCreated,
    /// Waiting for room in the cluster.
    Unschedulable,
    /// Scheduled, starting until `ready_at`.
    Starting,
    /// Scheduled, its container never starting (the broken image): until let go, or until
    /// `ready_at`, when its Job's deadline or agent-stack-k8s removes it.
    Stuck,
    /// The agent is registered and idle.
    Idle,
    Busy,
    Gone,
}

struct Pod {
    state: PodState,
    /// When the current state ends on its own (creation, start-up, idle timeout, job end).
    ready_at: f64,
    /// When its Job asked for it.
    created_at: f64,
    /// When the pod object was created, the start timeout's origin; none while refused.
    made_at: Option<f64>,
    scheduled_at: Option<f64>,
    /// Created while the image was broken: it never starts.
    broken: bool,
    /// Creates refused so far (the quota).
    refusals: u32,
    /// Its Job's deadline.
    deadline: f64,
    /// Start-up once scheduled.
    startup: f64,
    registered_at: Option<f64>,
    took_job_at: Option<f64>,
    gone_at: Option<f64>,
    dispatch: usize,
    /// agent-wrapper's idle timeout for this pod.
    idle_timeout: f64,
}

impl Pod {
    /// A pod its Job controller will create `JOB_CONTROLLER_DELAY` after `created_at`.
    fn asked_for(created_at: f64, startup: f64, dispatch: usize, idle_timeout: f64) -> Pod {
        Pod {
            state: PodState::NotYetCreated,
            ready_at: created_at + JOB_CONTROLLER_DELAY,
            created_at,
            made_at: None,
            scheduled_at: None,
            broken: false,
            refusals: 0,
            deadline: created_at + JOB_DEADLINE,
            startup,
            registered_at: None,
            took_job_at: None,
            gone_at: None,
            dispatch,
            idle_timeout,
        }
    }

    /// The pod its Job makes for this one's index once it was evicted, after the backoff.
    fn again(&self, now: f64, startup: f64) -> Pod {
        Pod {
            ready_at: now + INDEX_BACKOFF,
            deadline: self.deadline,
            ..Pod::asked_for(now, startup, self.dispatch, self.idle_timeout)
        }
    }

    /// A pod object that exists: what a pod quota counts.
    fn exists(&self) -> bool {
        !matches!(self.state, PodState::NotYetCreated | PodState::Gone)
    }

    /// Holding a node slot.
    fn scheduled(&self) -> bool {
        matches!(
            self.state,
            PodState::Starting | PodState::Stuck | PodState::Idle | PodState::Busy
        )
    }

    /// Stuck as this dispatcher sees it: its container has not started `START_TIMEOUT` after
    /// its creation.
    fn stuck(&self, now: f64) -> bool {
        let waiting = matches!(
            self.state,
            PodState::Unschedulable | PodState::Starting | PodState::Stuck
        );
        waiting && self.made_at.is_some_and(|m| now - m >= START_TIMEOUT)
    }

    /// What Kubernetes says of a pod that has not started.
    fn waiting_reason(&self) -> &'static str {
        match self.state {
            PodState::Unschedulable => "Unschedulable",
            PodState::Stuck => "ImagePullBackOff",
            _ => "ContainerCreating",
        }
    }

    fn end(&mut self, now: f64) {
        self.state = PodState::Gone;
        self.gone_at = Some(now);
    }

    /// One second of the pod's life in the cluster.
    fn step(&mut self, s: &mut Step) {
        let due = s.now >= self.ready_at;
        match self.state {
            // agent-stack-k8s fails a Job that has no pod after its grace.
            PodState::NotYetCreated
                if s.policy == Policy::PodPerJob && s.now >= self.created_at + ASK_GRACE =>
            {
                s.failed += 1;
                self.end(s.now)
            }
            PodState::NotYetCreated if due => self.make(s),
            PodState::Starting if due => {
                self.state = PodState::Idle;
                self.registered_at = Some(s.now);
                self.ready_at = s.now + self.idle_timeout;
                s.started = true;
            }
            PodState::Stuck | PodState::Idle if due => {
                // agent-stack-k8s fails the job of a pod stuck past its grace.
                let failed = self.state == PodState::Stuck && s.policy == Policy::PodPerJob;
                s.failed += u32::from(failed);
                self.leave(s)
            }
            PodState::Busy if due => {
                s.jobs_ended += 1;
                self.leave(s);
            }
            _ => {}
        }
        // Pods are scheduled oldest first, as room frees.
        if self.state == PodState::Unschedulable && s.room > 0 {
            s.room -= 1;
            self.schedule(s);
        }
    }

    /// The Job controller creates the pod object, unless the quota refuses it: then it tries
    /// again after its backoff.
    fn make(&mut self, s: &mut Step) {
        if s.existing >= s.quota {
            self.refusals += 1;
            let backoff = 2f64.powi(self.refusals as i32 - 1).min(CREATE_BACKOFF_CAP);
            self.ready_at = s.now + backoff;
            s.refused.push(self.dispatch);
            return;
        }
        s.existing += 1;
        self.state = PodState::Unschedulable;
        self.made_at = Some(s.now);
        self.broken = s.broken;
    }

    fn schedule(&mut self, s: &Step) {
        self.scheduled_at = Some(s.now);
        if !self.broken {
            self.state = PodState::Starting;
            self.ready_at = s.now + self.startup;
            return;
        }
        self.state = PodState::Stuck;
        self.ready_at = match s.policy {
            Policy::PodPerJob => s.now + ASK_GRACE,
            _ => self.deadline,
        };
    }

    /// Ends a pod that held a slot.
    fn leave(&mut self, s: &mut Step) {
        self.end(s.now);
        s.room += 1;
        s.existing -= 1;
    }
}

/// What the pods share in one second of the cluster, and what they tell the simulation.
struct Step {
    now: f64,
    policy: Policy,
    /// Node slots free.
    room: usize,
    /// Pod objects that exist.
    existing: usize,
    /// The pod quota: pods that may exist.
    quota: usize,
    /// Pods created now never start.
    broken: bool,
    jobs_ended: u32,
    /// Buildkite jobs agent-stack-k8s failed (exit -1, retried) as their pods went.
    failed: u32,
    /// A pod started its agent.
    started: bool,
    /// Dispatches whose pods were refused.
    refused: Vec<usize>,
}

/// A Job of this dispatcher's, or of a peer's.
struct Dispatch {
    /// Its `parallelism`: the dispatch's size, until stuck pods lower it.
    parallelism: u32,
    at: f64,
    /// When a pod of it was last refused (`FailedCreate`).
    refused_at: Option<f64>,
    /// Deleted with its stuck pods.
    deleted: bool,
}

/// What a tick counts: Buildkite's job and agent counts, and the pods by state.
struct Census {
    scheduled: u32,
    running: u32,
    idle: u32,
    agents: u32,
    not_yet_created: u32,
    unschedulable: u32,
    /// Scheduled and not started: stuck pods too, which the peers cannot tell apart.
    starting: u32,
    alive: u32,
}

struct Results {
    p50: f64,
    p95: f64,
    /// Every job's wait, sorted; a job still waiting at the end, until then.
    waits: Vec<f64>,
    waste_minutes: f64,
    /// Pod-minutes that pods which never started held a node slot.
    stuck_slot_minutes: f64,
    /// By [`Fault`], the longest time to serve again among the occurrences with jobs waiting.
    recovery: [Option<f64>; 3],
    pods: usize,
    overshoot: u32,
    requests_per_hour: f64,
    /// Buildkite jobs the policy finished with exit -1 (each retried at once).
    failed_jobs: u32,
    /// Of each pod made while the image was broken, the time from its creation to its job
    /// finished in Buildkite (agent-stack-k8s and the stacks mode; the others never finish it).
    broken_finished: Vec<f64>,
}

struct Sim<'w> {
    policy: Policy,
    workload: &'w Workload,
    capacity: usize,
    /// This day has the faults.
    faulty: bool,
    rng: Rng,
    now: f64,
    /// Pods not gone; gone ones move to `done`.
    pods: Vec<Pod>,
    done: Vec<Pod>,
    /// The oracle's pods, by creation time, not yet created.
    planned: VecDeque<Pod>,
    /// Waiting jobs, oldest first.
    queue: VecDeque<usize>,
    running_jobs: u32,
    next_job: usize,
    waits: Vec<f64>,
    dispatches: Vec<Dispatch>,
    requests: f64,
    overshoot: u32,
    /// When an agent last started: the stuck streak begins after it.
    last_start: f64,
    /// This dispatcher's Events on the Jobs whose stuck pods it let go: when, and which.
    stuck_events: Vec<(f64, usize)>,
    drains_done: usize,
    recoveries: Vec<Recovery>,
    /// Buildkite jobs finished with exit -1 by agent-stack-k8s or the stacks mode.
    failed_jobs: u32,
    /// The stacks mode's Buildkite: each job's state, by workload index.
    buildkite: Vec<BkJob>,
    /// The stacks mode's Jobs, by `Dispatch` index; and those not yet gone (TTL, deletion).
    stack: Vec<StackRecord>,
    stack_live: Vec<usize>,
    /// The stacks mode's waiting jobs told why they wait, during a stuck streak.
    stack_told: HashSet<String>,
}

impl<'w> Sim<'w> {
    fn run(
        policy: Policy,
        workload: &'w Workload,
        capacity: usize,
        seed: u64,
        faulty: bool,
    ) -> Results {
        let mut sim = Sim::new(policy, workload, capacity, seed, faulty);
        if policy == Policy::Oracle {
            sim.plan_oracle();
        }
        // One-second steps: fine enough for waits measured in seconds, cheap enough for a day.
        let end = DAY + 2.0 * 3600.0;
        let mut next_tick = 0.0;
        while sim.now < end {
            while sim.planned.front().is_some_and(|p| p.created_at <= sim.now) {
                let pod = sim.planned.pop_front().unwrap();
                sim.pods.push(pod);
            }
            sim.arrivals();
            if faulty {
                sim.faults();
            }
            sim.advance_pods();
            sim.assign();
            if sim.now >= next_tick {
                next_tick += TICK;
                if policy != Policy::Oracle {
                    sim.tick();
                }
            }
            sim.now += 1.0;
        }
        sim.results()
    }

    fn new(
        policy: Policy,
        workload: &'w Workload,
        capacity: usize,
        seed: u64,
        faulty: bool,
    ) -> Sim<'w> {
        let recoveries = match faulty {
            true => Fault::ALL
                .into_iter()
                .flat_map(|fault| fault.ends().into_iter().map(move |at| (fault, at)))
                .map(|(fault, at)| Recovery {
                    fault,
                    at,
                    waiting: None,
                    served: None,
                })
                .collect(),
            false => Vec::new(),
        };
        Sim {
            policy,
            workload,
            capacity,
            faulty,
            rng: Rng(seed ^ 0xD15_BA7C),
            now: -3600.0,
            pods: Vec::new(),
            done: Vec::new(),
            planned: VecDeque::new(),
            queue: VecDeque::new(),
            running_jobs: 0,
            next_job: 0,
            waits: Vec::new(),
            dispatches: Vec::new(),
            requests: 0.0,
            overshoot: 0,
            last_start: f64::NEG_INFINITY,
            stuck_events: Vec::new(),
            drains_done: 0,
            recoveries,
            failed_jobs: 0,
            buildkite: match policy {
                Policy::Stacks => vec![BkJob::default(); workload.jobs.len()],
                _ => Vec::new(),
            },
            stack: Vec::new(),
            stack_live: Vec::new(),
            stack_told: HashSet::new(),
        }
    }

    /// Jobs whose time has come join the queue.
    fn arrivals(&mut self) {
        while let Some(job) = self.workload.jobs.get(self.next_job) {
            if job.arrival > self.now {
                break;
            }
            self.queue.push_back(self.next_job);
            self.next_job += 1;
        }
    }

    /// The drains due now, and whether jobs wait as a fault's cause ends.
    fn faults(&mut self) {
        while DRAINS
            .get(self.drains_done)
            .is_some_and(|at| *at <= self.now)
        {
            self.drain();
            self.drains_done += 1;
        }
        let waiting = !self.queue.is_empty();
        for r in &mut self.recoveries {
            if r.waiting.is_none() && r.at <= self.now {
                r.waiting = Some(waiting);
            }
        }
    }

    /// Drains the nodes of `DRAINED_SHARE` of the pods: an agent there without a job is evicted
    /// and its index made again after the Job controller's backoff, except agent-stack-k8s's
    /// (one try: the Job fails, its job is failed and retried, and the next poll makes a new Job
    /// for it); a busy one finishes its job within its grace period, as if not drained.
    fn drain(&mut self) {
        let now = self.now;
        for i in 0..self.pods.len() {
            let jobless = matches!(
                self.pods[i].state,
                PodState::Starting | PodState::Stuck | PodState::Idle
            );
            if !jobless || self.rng.unit() >= DRAINED_SHARE {
                continue;
            }
            self.pods[i].end(now);
            match self.policy {
                // Its Job failed before the agent acquired: the job fails (PR #883), retried.
                Policy::PodPerJob => self.failed_jobs += 1,
                // The others' Jobs, the stacks mode's included (its Jobs ignore
                // `DisruptionTarget` like ours; `backoffLimitPerIndex: 0` counts no such
                // failure), make the pod again; the job stays the Job's.
                _ => {
                    let startup = self.startup();
                    let again = self.pods[i].again(now, startup);
                    self.pods.push(again);
                }
            }
        }
    }

    fn image_broken(&self, at: f64) -> bool {
        self.faulty && (BROKEN_IMAGE.0..BROKEN_IMAGE.1).contains(&at)
    }

    /// Which agent template this dispatcher has at `at`: the fix is a new one.
    fn image_fixed(&self, at: f64) -> bool {
        self.faulty && at >= BROKEN_IMAGE.1
    }

    fn quota(&self) -> usize {
        let cut = QUOTA_CUTS
            .iter()
            .any(|(from, to)| (*from..*to).contains(&self.now));
        match self.faulty && cut {
            true => (self.capacity as f64 * QUOTA_SHARE) as usize,
            false => usize::MAX,
        }
    }

    fn startup(&mut self) -> f64 {
        if self.rng.unit() < 0.1 {
            self.rng.between(60.0, 120.0)
        } else {
            self.rng.between(10.0, 20.0)
        }
    }

    /// A Job of `n` pods; its index.
    fn create(&mut self, n: u32, at: f64, idle_timeout: f64) -> usize {
        let dispatch = self.dispatches.len();
        self.dispatches.push(Dispatch {
            parallelism: n,
            at,
            refused_at: None,
            deleted: false,
        });
        for _ in 0..n {
            let startup = self.startup();
            self.pods
                .push(Pod::asked_for(at, startup, dispatch, idle_timeout));
        }
        dispatch
    }

    /// The oracle knows each job's arrival (not how long its pod will take to start): one pod per
    /// job, created so that a pod of typical start-up registers as the job arrives. It knows of
    /// the broken image too: those pods wait for the fix.
    fn plan_oracle(&mut self) {
        let mut planned = Vec::new();
        for job in &self.workload.jobs {
            let startup = self.startup();
            let mut at = job.arrival - TYPICAL_STARTUP - JOB_CONTROLLER_DELAY;
            if self.image_broken(at + JOB_CONTROLLER_DELAY) {
                at = BROKEN_IMAGE.1 - JOB_CONTROLLER_DELAY;
            }
            planned.push(Pod::asked_for(at, startup, 0, IDLE_TIMEOUT));
        }
        planned.sort_by(|a, b| a.created_at.total_cmp(&b.created_at));
        self.planned = planned.into();
    }

    fn advance_pods(&mut self) {
        let mut step = Step {
            now: self.now,
            policy: self.policy,
            room: self
                .capacity
                .saturating_sub(self.pods.iter().filter(|p| p.scheduled()).count()),
            existing: self.pods.iter().filter(|p| p.exists()).count(),
            quota: self.quota(),
            broken: self.image_broken(self.now),
            jobs_ended: 0,
            failed: 0,
            started: false,
            refused: Vec::new(),
        };
        for pod in self.pods.iter_mut() {
            pod.step(&mut step);
        }
        self.running_jobs -= step.jobs_ended;
        self.failed_jobs += step.failed;
        if step.started {
            self.last_start = self.now;
        }
        for d in step.refused {
            // The oracle's pods have no dispatch to hold.
            if let Some(d) = self.dispatches.get_mut(d) {
                d.refused_at = Some(self.now);
            }
        }
        let (gone, alive): (Vec<Pod>, Vec<Pod>) = std::mem::take(&mut self.pods)
            .into_iter()
            .partition(|p| p.state == PodState::Gone);
        self.pods = alive;
        self.done.extend(gone);
    }

    /// Idle agents take the oldest waiting jobs; in the stacks mode, each its own.
    fn assign(&mut self) {
        let now = self.now;
        let mut accepted = false;
        for i in 0..self.pods.len() {
            if self.pods[i].state != PodState::Idle {
                continue;
            }
            let Some(job) = self.take(self.pods[i].dispatch) else {
                continue;
            };
            let arrival = self.workload.jobs[job].arrival;
            self.waits.push(now - arrival);
            let pod = &mut self.pods[i];
            pod.state = PodState::Busy;
            pod.took_job_at = Some(now);
            pod.ready_at = now + self.workload.jobs[job].duration;
            self.running_jobs += 1;
            accepted = true;
        }
        let waited = self
            .recoveries
            .iter_mut()
            .filter(|r| r.waiting == Some(true));
        for r in waited.filter(|r| r.served.is_none() && accepted) {
            r.served = Some(now);
        }
    }

    /// One tick of the policy: observe, decide, create.
    fn tick(&mut self) {
        let policy = self.policy;
        self.requests += policy.reads_per_tick();
        let seen = self.census();
        if policy == Policy::Stacks {
            // It makes a Job for each job it reserves, as it acts.
            let made = self.stacks_tick();
            return self.note_overshoot(&seen, made);
        }
        let n = match policy {
            Policy::Dispatcher | Policy::DispatcherProportional => self.dispatcher_tick(&seen),
            peer => peer.peer_wants(&seen),
        };
        // Every design has a ceiling (max agents, maxReplicaCount, the group's MaxSize).
        let n = n.min(MAX_AGENTS.saturating_sub(seen.alive));
        if n > 0 {
            self.note_overshoot(&seen, n);
            // One create per Job; KEDA and one-pod-per-job create a Job per pod.
            self.requests += match policy {
                Policy::KedaDefault | Policy::PodPerJob => f64::from(n),
                _ => 1.0,
            };
            self.create(n, self.now, policy.idle_timeout());
        }
    }

    /// The most pods alive beyond demand + buffer as `n` more are made.
    fn note_overshoot(&mut self, seen: &Census, n: u32) {
        let (scheduled, running) = (seen.scheduled, seen.running);
        let limit = (running + scheduled + self.policy.buffer(scheduled)).min(MAX_AGENTS);
        let beyond = (seen.alive + n).saturating_sub(limit) * u32::from(n > 0);
        self.overshoot = self.overshoot.max(beyond);
    }

    fn census(&self) -> Census {
        let count = |f: &dyn Fn(&Pod) -> bool| self.pods.iter().filter(|p| f(p)).count() as u32;
        let idle = count(&|p| p.state == PodState::Idle);
        let agents = idle + count(&|p| p.state == PodState::Busy);
        let not_yet_created = count(&|p| p.state == PodState::NotYetCreated);
        let unschedulable = count(&|p| p.state == PodState::Unschedulable);
        let starting = count(&|p| matches!(p.state, PodState::Starting | PodState::Stuck));
        Census {
            scheduled: self.queue.len() as u32,
            running: self.running_jobs,
            idle,
            agents,
            not_yet_created,
            unschedulable,
            starting,
            alive: not_yet_created + unschedulable + starting + agents,
        }
    }

    /// This dispatcher's tick: the real decision on the supply `observe.rs` would read, and its
    /// stuck pods let go as `relieve` says.
    fn dispatcher_tick(&mut self, seen: &Census) -> u32 {
        let supply = self.observe(seen);
        let limits = Limits {
            min_agents: 0,
            max_agents: MAX_AGENTS,
            buffer: BUFFER,
            buffer_ratio: match self.policy {
                Policy::DispatcherProportional => BUFFER_RATIO,
                _ => 0.0,
            },
            rollout_ratio: 0.5,
            rollout_timeout: Duration::from_secs(180),
            stuck_backoff: STUCK_BACKOFF,
            stuck_backoff_cap: STUCK_BACKOFF_CAP,
        };
        let demand = Demand {
            scheduled: seen.scheduled,
            running: seen.running,
            agents: seen.agents,
        };
        let decision = decide(demand, &supply, &limits);
        for (job, relief) in relieve(&supply.stuck_jobs) {
            self.let_go(job, &relief);
        }
        match decision.action {
            Action::Dispatch(n) => n,
            Action::Hold(_) => 0,
        }
    }

    /// The supply as `observe.rs` reads it from the pods, Jobs and Events.
    fn observe(&self, seen: &Census) -> Supply {
        let now = self.now;
        let count = |f: &dyn Fn(&Pod) -> bool| self.pods.iter().filter(|p| f(p)).count() as u32;
        let stuck_jobs = self.stuck_jobs();
        Supply {
            pending: count(&|p| {
                matches!(p.state, PodState::Starting | PodState::Stuck) && !p.stuck(now)
            }),
            unschedulable: count(&|p| p.state == PodState::Unschedulable && !p.stuck(now)),
            running: seen.agents,
            running_long: count(&|p| {
                matches!(p.state, PodState::Idle | PodState::Busy)
                    && p.registered_at
                        .is_some_and(|r| now - r + p.startup > REGISTERED_BY)
            })
            .min(seen.agents),
            not_yet_created: seen.not_yet_created,
            failed_create: self.refusal(),
            streak: self.streak(&stuck_jobs),
            stuck_jobs,
            // Simulated agents never fail after starting.
            failing: None,
            last: self.last_dispatch(),
        }
    }

    /// The unfinished Jobs with stuck pods.
    fn stuck_jobs(&self) -> Vec<StuckJob> {
        let now = self.now;
        let mut jobs: BTreeMap<usize, StuckJob> = BTreeMap::new();
        for pod in self.pods.iter().filter(|p| p.stuck(now)) {
            let d = pod.dispatch;
            let job = jobs.entry(d).or_insert_with(|| StuckJob {
                job: format!("dispatch-{d}"),
                uid: d.to_string(),
                parallelism: self.dispatches[d].parallelism,
                healthy: self
                    .pods
                    .iter()
                    .filter(|p| p.dispatch == d && p.exists() && !p.stuck(now))
                    .count() as u32,
                pods: Vec::new(),
            });
            job.pods.push(StuckPod {
                pod: format!("dispatch-{d}-pod"),
                dispatch: d.to_string(),
                reason: pod.waiting_reason().into(),
                message: String::new(),
                waited: Duration::from_secs_f64(now - pod.made_at.unwrap_or(now)),
                template: String::new(),
            });
        }
        jobs.into_values().collect()
    }

    /// Dispatches whose pods got stuck since an agent last started, by this template: the
    /// Events of its own that the dispatcher reads back, and the pods stuck now.
    fn streak(&self, stuck_now: &[StuckJob]) -> Option<Streak> {
        // A dispatch's template is the one of its time; its Events, and its pods stuck now,
        // count only for that template (as `observe.rs` and `act.rs` tag and read them).
        let template = self.image_fixed(self.now);
        let ours = |d: usize| self.image_fixed(self.dispatches[d].at) == template;
        let events: Vec<&(f64, usize)> = self
            .stuck_events
            .iter()
            .filter(|(at, d)| *at > self.last_start && ours(*d))
            .collect();
        let stuck_now: Vec<&StuckJob> = stuck_now
            .iter()
            .filter(|j| ours(j.uid.parse().unwrap()))
            .collect();
        let mut dispatches: BTreeSet<String> = events.iter().map(|(_, d)| d.to_string()).collect();
        dispatches.extend(stuck_now.iter().map(|j| j.uid.clone()));
        let since = match stuck_now.is_empty() {
            true => events
                .iter()
                .map(|(at, _)| self.now - at)
                .reduce(f64::min)?,
            false => 0.0,
        };
        Some(Streak {
            reason: "ImagePullBackOff".into(),
            dispatches: dispatches.len() as u32,
            since_last: Duration::from_secs_f64(since),
        })
    }

    /// A fresh refusal of a Job that still misses pods.
    fn refusal(&self) -> Option<String> {
        let fresh = |d: &Dispatch| d.refused_at.is_some_and(|at| self.now - at < REFUSAL_FRESH);
        let refused = self
            .pods
            .iter()
            .filter(|p| p.state == PodState::NotYetCreated)
            .any(|p| fresh(&self.dispatches[p.dispatch]));
        refused.then(|| "Error creating: pods is forbidden: exceeded quota: agents".into())
    }

    /// The newest dispatch not deleted, of the template in use (as `observe.rs` reads it).
    fn last_dispatch(&self) -> Option<LastDispatch> {
        let template = self.image_fixed(self.now);
        let (d, last) = self
            .dispatches
            .iter()
            .enumerate()
            .rfind(|(_, d)| !d.deleted && self.image_fixed(d.at) == template)?;
        let online = self
            .pods
            .iter()
            .filter(|p| p.dispatch == d && matches!(p.state, PodState::Idle | PodState::Busy));
        Some(LastDispatch {
            id: d.to_string(),
            size: last.parallelism,
            online: online.count() as u32,
            age: Duration::from_secs_f64(self.now - last.at),
        })
    }

    /// Lets a Job's stuck pods go as Kubernetes would: deleting the Job takes all its pods
    /// (none started); lowering its parallelism to the pods that did, the Job controller
    /// removes the stuck ones and makes none of those it had still to make. One call and one
    /// Event, which the streak reads back.
    fn let_go(&mut self, job: &StuckJob, relief: &Relief) {
        let (now, d) = (self.now, job.uid.parse::<usize>().unwrap());
        let delete = *relief == Relief::DeleteJob;
        match relief {
            Relief::DeleteJob => self.dispatches[d].deleted = true,
            Relief::Parallelism { to, .. } => self.dispatches[d].parallelism = *to,
        }
        for pod in self.pods.iter_mut().filter(|p| p.dispatch == d) {
            if delete || pod.state == PodState::NotYetCreated || pod.stuck(now) {
                pod.end(now);
            }
        }
        self.stuck_events.push((now, d));
        self.requests += 2.0;
    }

    fn results(&self) -> Results {
        let mut waits = self.waits.clone();
        let left = self
            .queue
            .iter()
            .map(|j| self.now - self.workload.jobs[*j].arrival);
        waits.extend(left);
        waits.sort_by(f64::total_cmp);
        let pct = |q: f64| {
            waits
                .get(((waits.len() as f64 - 1.0) * q) as usize)
                .copied()
                .unwrap_or(0.0)
        };
        let pods = || self.pods.iter().chain(&self.done);
        let until_gone = |p: &Pod, from: f64| p.gone_at.unwrap_or(self.now) - from;
        let waste: f64 = pods()
            .map(|p| match (p.registered_at, p.took_job_at) {
                (Some(r), Some(t)) => t - r,
                // Refused, then dropped: it never existed.
                (_, None) if p.made_at.is_none() && p.gone_at.is_some() => 0.0,
                (_, None) => until_gone(p, p.created_at),
                (None, Some(_)) => 0.0,
            })
            .sum();
        let stuck_slot = pods()
            .filter(|p| p.broken)
            .filter_map(|p| p.scheduled_at.map(|s| until_gone(p, s)))
            .fold(0.0, |a, b| a + b);
        let jobs_created = match self.policy {
            Policy::PodPerJob => self.workload.jobs.len() as f64, // a get per job
            _ => 0.0,
        };
        // Both finish a stuck pod's job as they delete the pod.
        let broken_finished = pods()
            .filter(|p| p.broken && self.policy.one_try())
            .filter_map(|p| Some(p.gone_at? - p.made_at?))
            .collect();
        Results {
            p50: pct(0.5),
            p95: pct(0.95),
            waste_minutes: waste / 60.0,
            stuck_slot_minutes: stuck_slot / 60.0,
            recovery: Fault::ALL.map(|f| self.recovery(f)),
            pods: self.pods.len() + self.done.len(),
            overshoot: self.overshoot,
            requests_per_hour: (self.requests + jobs_created) / ((self.now + 3600.0) / 3600.0),
            waits,
            failed_jobs: self.failed_jobs,
            broken_finished,
        }
    }

    /// The longest time from a cause of `fault` ending to the queue served again, among the
    /// occurrences with jobs waiting; one never served counts until the day's end.
    fn recovery(&self, fault: Fault) -> Option<f64> {
        self.recoveries
            .iter()
            .filter(|r| r.fault == fault && r.waiting == Some(true))
            .map(|r| r.served.unwrap_or(self.now) - r.at)
            .reduce(f64::max)
    }
}

/// Buildkite's side of a job in the stacks mode: its current attempt (a retry is a new job to
/// Buildkite, with its own UUID) and that attempt's state; earlier attempts are `finished`.
#[derive(Debug, Clone, Copy, Default)]
struct BkJob {
    attempt: u32,
    state: BkState,
    /// The stacks mode's Job for the current attempt, by `Dispatch` index.
    record: Option<usize>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
enum BkState {
    #[default]
    Scheduled,
    /// Until then; listed again once it lapses.
    Reserved(f64),
    Running,
    Finished,
}

/// One of the stacks mode's Jobs, with what `stacks_observe.rs` reads of it.
struct StackRecord {
    job: usize,
    attempt: u32,
    /// `stateless-agent/reserved-until`.
    reserved_until: f64,
    /// `stateless-agent/notified`.
    notified: u8,
    /// Its agent acquired the job.
    took: bool,
    /// When its pod went and the Job finished: its TTL runs from then.
    ended_at: Option<f64>,
    /// The first Job made in the same tick: the jobs taken together are one dispatch, which
    /// is what the stuck streak counts (`stacks_run.rs`).
    round: usize,
}

/// The UUID of a job's attempt, and back.
fn uuid(job: usize, attempt: u32) -> String {
    format!("{job}.{attempt}")
}

fn parse_uuid(uuid: &str) -> (usize, u32) {
    let (job, attempt) = uuid.split_once('.').unwrap();
    (job.parse().unwrap(), attempt.parse().unwrap())
}

/// The simulated clock as a timestamp (the day starts at an arbitrary midnight).
fn timestamp(at: f64) -> Timestamp {
    Timestamp::from_second(1_796_256_000 + at as i64).unwrap()
}

/// The stacks mode: what `stacks_run.rs` observes each tick, the real [`stacks_plan::plan`], and
/// its calls acted out on the simulated Buildkite and cluster.
impl Sim<'_> {
    /// One tick; how many Jobs it made.
    fn stacks_tick(&mut self) -> u32 {
        self.end_stack_jobs();
        let pods: HashMap<usize, &Pod> = self
            .pods
            .iter()
            .filter(|p| p.state != PodState::Gone)
            .map(|p| (p.dispatch, p))
            .collect();
        let jobs: Vec<StackJob> = self
            .stack_live
            .iter()
            .map(|d| self.stack_job(*d, pods.get(d).copied()))
            .collect();
        let states: HashMap<String, String> = jobs
            .iter()
            .map(|j| (j.job.clone(), self.bk_state(&j.job).to_string()))
            .collect();
        self.requests += jobs.len().div_ceil(BATCH) as f64;
        let listed = self.listed();
        let stuck_now: Vec<StuckJob> = jobs
            .iter()
            .filter_map(|j| match &j.pod {
                StackPod::Stuck(pod) => {
                    // A round's Jobs are one dispatch: the streak counts the round.
                    let round = self.stack[j.uid.parse::<usize>().unwrap()].round;
                    Some(StuckJob::one(&j.name, &round.to_string(), pod.clone()))
                }
                _ => None,
            })
            .collect();
        let streak = self.streak(&stuck_now);
        // A fresh refusal of a Job still without its pod (every Job is of the template in use
        // when the quota is cut).
        let refusal = self.refusal();
        let seen = Seen {
            jobs: &jobs,
            listed: &listed,
            paused: false,
            states: &states,
            now: timestamp(self.now),
            streak: streak.as_ref(),
            refusal: refusal.as_deref(),
            told: &self.stack_told,
        };
        let limits = StackLimits {
            max_agents: MAX_AGENTS,
            expiry: Duration::from_secs_f64(RESERVATION),
            stuck_backoff: STUCK_BACKOFF,
            stuck_backoff_cap: STUCK_BACKOFF_CAP,
            probe: BUFFER,
        };
        let plan = stacks_plan::plan(&seen, &limits);
        self.stack_act(plan)
    }

    /// Jobs whose pod went are finished; those finished `JOB_TTL` ago go.
    fn end_stack_jobs(&mut self) {
        let alive: BTreeSet<usize> = self
            .pods
            .iter()
            .filter(|p| p.state != PodState::Gone)
            .map(|p| p.dispatch)
            .collect();
        let now = self.now;
        for d in &self.stack_live {
            let record = &mut self.stack[*d];
            if record.ended_at.is_some() || alive.contains(d) {
                continue;
            }
            record.ended_at = Some(now);
            let bk = &mut self.buildkite[record.job];
            if record.took && bk.attempt == record.attempt {
                bk.state = BkState::Finished;
            }
        }
        let stack = &self.stack;
        self.stack_live
            .retain(|d| stack[*d].ended_at.is_none_or(|at| now - at < JOB_TTL));
    }

    /// What `stacks_observe.rs` makes of a Job and its pod.
    fn stack_job(&self, d: usize, pod: Option<&Pod>) -> StackJob {
        let record = &self.stack[d];
        let job = uuid(record.job, record.attempt);
        let (now, made) = (self.now, self.dispatches[d].at);
        let stuck = |reason: &str, since: f64| {
            StackPod::Stuck(StuckPod {
                pod: format!("buildkite-{job}-pod"),
                dispatch: String::new(),
                reason: reason.into(),
                message: String::new(),
                waited: Duration::from_secs_f64(now - since),
                template: String::new(),
            })
        };
        let state = match pod {
            None if record.took => StackPod::Ended("pod Succeeded".into()),
            None => StackPod::Ended("pod Failed: Evicted".into()),
            Some(p) if p.stuck(now) => stuck(p.waiting_reason(), p.made_at.unwrap_or(made)),
            // An older template's pod that cannot pull its image is stuck at once once the fix
            // (a new template) is out (`stacks_observe.rs`, `outdated_image`).
            Some(p) if p.state == PodState::Stuck && self.image_fixed(now) => {
                stuck(p.waiting_reason(), p.made_at.unwrap_or(made))
            }
            Some(p) => match p.state {
                PodState::NotYetCreated if now - made >= START_TIMEOUT => {
                    stuck("FailedCreate", made)
                }
                PodState::NotYetCreated | PodState::Unschedulable => {
                    StackPod::Coming(Stage::Created)
                }
                PodState::Starting | PodState::Stuck => StackPod::Coming(Stage::Pulling),
                _ => StackPod::Coming(Stage::Started),
            },
        };
        StackJob {
            name: format!("buildkite-{job}"),
            uid: d.to_string(),
            job,
            pod: state,
            pod_name: None,
            node: None,
            finished: pod.is_none(),
            suspended: false,
            reserved_until: Some(timestamp(record.reserved_until)),
            notified: record.notified,
        }
    }

    /// What `get-states` answers for a job's attempt.
    fn bk_state(&self, uuid: &str) -> &'static str {
        let (job, attempt) = parse_uuid(uuid);
        let bk = &self.buildkite[job];
        if attempt < bk.attempt {
            return "finished";
        }
        match bk.state {
            BkState::Reserved(until) if until > self.now => "reserved",
            BkState::Scheduled | BkState::Reserved(_) => "scheduled",
            BkState::Running => "running",
            BkState::Finished => "finished",
        }
    }

    /// The first page of scheduled jobs, oldest first: reserved ones are not listed.
    fn listed(&self) -> Vec<ScheduledJob> {
        self.queue
            .iter()
            .filter(|j| self.bk_state(&uuid(**j, self.buildkite[**j].attempt)) == "scheduled")
            .take(LIST_LIMIT)
            .map(|j| ScheduledJob {
                id: uuid(*j, self.buildkite[*j].attempt),
                priority: 0,
            })
            .collect()
    }

    /// The plan's calls, as `stacks_run.rs` makes them; how many Jobs were made.
    fn stack_act(&mut self, plan: Plan) -> u32 {
        for finish in &plan.finish {
            self.stack_finish(finish);
        }
        // A note, and the Job deleted; or a cancelled job's Job deleted (neither happens here).
        for taken in &plan.stuck_taken {
            self.requests += 3.0;
            let round = self.stack[taken.uid.parse::<usize>().unwrap()].round;
            self.stuck_events.push((self.now, round));
            self.delete_stack_job(&taken.uid);
        }
        for delete in &plan.delete {
            self.requests += 1.0;
            self.delete_stack_job(&delete.uid);
        }
        // Suspended Jobs to resume: none here, as every Job made is reserved and resumed at once.
        self.requests += plan.resume.len() as f64;
        self.reserve(&plan.renew, false);
        let made = self.reserve(&plan.reserve, true);
        self.stack_notify(&plan.notify);
        // A fault's hold tells the waiting jobs why, once each, in one call.
        match plan.hold {
            Some(StackHold::Stuck { .. } | StackHold::Refused { .. }) => {
                self.requests += f64::from(u8::from(!plan.tell.is_empty()));
                self.stack_told.extend(plan.tell);
            }
            _ => self.stack_told.clear(),
        }
        made
    }

    /// Finishes a job with exit -1, retried at once as a new job at the back of the queue; a
    /// stuck pod's Job is deleted (a call and an Event, as [`Sim::let_go`]).
    fn stack_finish(&mut self, finish: &Finish) {
        self.requests += 1.0;
        self.failed_jobs += 1;
        let (job, attempt) = parse_uuid(&finish.job);
        let bk = &mut self.buildkite[job];
        if bk.attempt == attempt {
            *bk = BkJob {
                attempt: attempt + 1,
                ..BkJob::default()
            };
            self.queue.retain(|j| *j != job);
            self.queue.push_back(job);
        }
        if let Why::Stuck(_) = finish.why {
            // Let go as `Sim::let_go`: the Job deleted, and an Event the streak reads back.
            self.requests += 2.0;
            let round = self.stack[finish.uid.parse::<usize>().unwrap()].round;
            self.stuck_events.push((self.now, round));
            self.delete_stack_job(&finish.uid);
        }
    }

    fn delete_stack_job(&mut self, uid: &str) {
        let (d, now) = (uid.parse::<usize>().unwrap(), self.now);
        self.stack_live.retain(|live| *live != d);
        for pod in self.pods.iter_mut().filter(|p| p.dispatch == d) {
            pod.end(now);
        }
    }

    /// Jobs taken (`new`): a suspended Job made for each (a create each), one reserve call for
    /// them all, each Job then patched (`reserved-until`, resumed) and one note for them all.
    /// Renewals: one reserve call, and each Job's `reserved-until` patched. Buildkite reserves
    /// them all: no other stack serves the queue.
    fn reserve(&mut self, jobs: &[String], new: bool) -> u32 {
        if jobs.is_empty() {
            return 0;
        }
        let per_job = if new { 2.0 } else { 1.0 };
        self.requests += 1.0 + f64::from(u8::from(new)) + per_job * jobs.len() as f64;
        let until = self.now + RESERVATION;
        let round = self.dispatches.len();
        for id in jobs {
            let (job, attempt) = parse_uuid(id);
            self.buildkite[job].state = BkState::Reserved(until);
            let d = match new {
                true => self.make_stack_job(job, attempt, round),
                false => self.buildkite[job].record.unwrap(),
            };
            self.stack[d].reserved_until = until;
        }
        (jobs.len() as u32) * u32::from(new)
    }

    fn make_stack_job(&mut self, job: usize, attempt: u32, round: usize) -> usize {
        let d = self.create(1, self.now, Policy::Stacks.idle_timeout());
        debug_assert_eq!(d, self.stack.len());
        self.stack.push(StackRecord {
            job,
            attempt,
            reserved_until: 0.0,
            // The first note goes with the create.
            notified: Stage::Created as u8,
            took: false,
            ended_at: None,
            round,
        });
        self.stack_live.push(d);
        self.buildkite[job].record = Some(d);
        d
    }

    /// One call for all notes; then each Job's `notified` patched.
    fn stack_notify(&mut self, notices: &[Notice]) {
        if notices.is_empty() {
            return;
        }
        let mut reached: BTreeMap<usize, u8> = BTreeMap::new();
        for n in notices {
            let d = self.buildkite[parse_uuid(&n.job).0].record.unwrap();
            let stage = reached.entry(d).or_default();
            *stage = (*stage).max(n.stage as u8);
        }
        self.requests += 1.0 + reached.len() as f64;
        for (d, stage) in reached {
            self.stack[d].notified = stage;
        }
    }

    /// The job an idle agent takes: the oldest waiting; in the stacks mode its own, unless it
    /// was finished meanwhile (the acquire is refused and the agent exits).
    fn take(&mut self, dispatch: usize) -> Option<usize> {
        if self.policy != Policy::Stacks {
            return self.queue.pop_front();
        }
        let record = &mut self.stack[dispatch];
        let bk = &mut self.buildkite[record.job];
        let acquirable = matches!(bk.state, BkState::Scheduled | BkState::Reserved(_));
        if bk.attempt != record.attempt || !acquirable {
            return None;
        }
        bk.state = BkState::Running;
        record.took = true;
        let job = record.job;
        let at = self.queue.iter().position(|j| *j == job)?;
        self.queue.remove(at)
    }
}
