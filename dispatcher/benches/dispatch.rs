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
//! Printed per policy: p50 and p95 queue wait (scheduled → accepted), agent-minutes wasted (the
//! whole life of pods that took no job, plus the idle time of those that did), pods created, the
//! most pods alive beyond demand + buffer when a dispatch was made, API requests per hour.
//!
//! Run: `cargo bench -p dispatcher --bench dispatch` (`BENCH_SEED`, `BENCH_BUILDS` builds a day,
//! default 120; `BENCH_CAPACITY`, default 300).

use std::collections::VecDeque;
use std::time::Duration;

use dispatcher::decide::{decide, Action, Demand, LastDispatch, Limits, Supply};

/// The dispatchers' tick: the metrics API's poll interval.
const TICK: f64 = 10.0;
const DAY: f64 = 86_400.0;
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

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seed = env_or("BENCH_SEED", 7);
    let builds = env_or("BENCH_BUILDS", 120) as usize;
    let capacity = env_or("BENCH_CAPACITY", 300) as usize;
    let mut rng = Rng(seed);
    let workload = Workload::generate(&mut rng, builds);
    println!(
        "one simulated day: {} builds, {} jobs, cluster capacity {capacity} pods, tick {TICK}s, seed {seed}",
        builds,
        workload.jobs.len()
    );
    println!();
    println!("| policy | p50 wait | p95 wait | agent-minutes wasted | pods created | most pods beyond demand + buffer | API requests / hour |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut results = Vec::new();
    for policy in Policy::ALL {
        let r = Sim::run(policy, &workload, capacity, seed);
        println!(
            "| {} | {:.0} s | {:.0} s | {:.0} | {} | {} | {:.0} |",
            policy.name(),
            r.p50,
            r.p95,
            r.waste_minutes,
            r.pods,
            r.overshoot,
            r.requests_per_hour
        );
        results.push((policy, r));
    }
    let find = |p: Policy| &results.iter().find(|(q, _)| *q == p).unwrap().1;
    let oracle = find(Policy::Oracle);
    for ours_policy in [Policy::Dispatcher, Policy::DispatcherProportional] {
        let ours = find(ours_policy);
        println!();
        println!("{}:", ours_policy.name());
        let target = oracle.p95 + TICK;
        println!(
            "- target p95 wait ≤ oracle's + one poll interval ({target:.0} s): {:.0} s {}",
            ours.p95,
            verdict(ours.p95 <= target)
        );
        // The peer with the least waste among those whose p95 is as good as ours or better.
        let best_peer = results
            .iter()
            .filter(|(p, _)| p.is_peer())
            .filter(|(_, r)| r.p95 <= ours.p95)
            .map(|(p, r)| (p.name(), r.waste_minutes))
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
    SourcegraphNoRollout,
    AgentScaler,
    PodPerJob,
    KedaDefault,
    Oracle,
}

impl Policy {
    const ALL: [Policy; 7] = [
        Policy::Dispatcher,
        Policy::DispatcherProportional,
        Policy::SourcegraphNoRollout,
        Policy::AgentScaler,
        Policy::PodPerJob,
        Policy::KedaDefault,
        Policy::Oracle,
    ];

    /// The idle timeout of the pods it creates: the dispatcher sets a short one on its Jobs (jobs
    /// were waiting when it dispatched, so an agent that finds none soon is surplus); the peers
    /// keep the agent's usual 10 min.
    fn idle_timeout(self) -> f64 {
        match self {
            Policy::Dispatcher | Policy::DispatcherProportional => DISPATCH_IDLE_TIMEOUT,
            _ => IDLE_TIMEOUT,
        }
    }

    fn is_peer(self) -> bool {
        !matches!(
            self,
            Policy::Dispatcher | Policy::DispatcherProportional | Policy::Oracle
        )
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
            Policy::SourcegraphNoRollout => "Sourcegraph 2022, no rollout check",
            Policy::AgentScaler => "buildkite-agent-scaler",
            Policy::PodPerJob => "one pod per job (agent-stack-k8s)",
            Policy::KedaDefault => "KEDA ScaledJob, default",
            Policy::Oracle => "oracle",
        }
    }

    /// API requests a tick makes besides creating Jobs or pods: the metrics poll, plus what each
    /// design reads from Kubernetes (lists each tick; ours watches, with a relist every 5 min
    /// per watched kind, i.e. 2/30 of a request a tick).
    fn reads_per_tick(self) -> f64 {
        match self {
            Policy::Dispatcher | Policy::DispatcherProportional => 1.0 + 2.0 * TICK / 300.0,
            Policy::SourcegraphNoRollout => 2.0, // metrics, list the last dispatch's pods
            Policy::AgentScaler => 2.0,          // metrics, describe the group
            Policy::PodPerJob => 1.0,            // the scheduled-jobs poll (plus a get per job)
            Policy::KedaDefault => 2.0,          // the scaler's metric, list Jobs
            Policy::Oracle => 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PodState {
    /// Created by a Job not yet acted on by its controller, until `ready_at`.
    NotYetCreated,
    /// Waiting for room in the cluster.
    Unschedulable,
    /// Scheduled, starting until `ready_at`.
    Starting,
    /// The agent is registered and idle.
    Idle,
    Busy,
    Gone,
}

struct Pod {
    state: PodState,
    /// When the current state ends on its own (creation, start-up, idle timeout, job end).
    ready_at: f64,
    created_at: f64,
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
            startup,
            registered_at: None,
            took_job_at: None,
            gone_at: None,
            dispatch,
            idle_timeout,
        }
    }
}

struct Results {
    p50: f64,
    p95: f64,
    waste_minutes: f64,
    pods: usize,
    overshoot: u32,
    requests_per_hour: f64,
}

struct Sim<'w> {
    workload: &'w Workload,
    capacity: usize,
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
    /// Dispatch sizes and creation times.
    dispatches: Vec<(u32, f64)>,
    requests: f64,
    overshoot: u32,
}

impl<'w> Sim<'w> {
    fn run(policy: Policy, workload: &'w Workload, capacity: usize, seed: u64) -> Results {
        let mut sim = Sim {
            workload,
            capacity,
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
        };
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
            sim.advance_pods();
            sim.assign();
            if sim.now >= next_tick {
                next_tick += TICK;
                if policy != Policy::Oracle {
                    sim.tick(policy);
                }
            }
            sim.now += 1.0;
        }
        sim.results(policy)
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

    fn startup(&mut self) -> f64 {
        if self.rng.unit() < 0.1 {
            self.rng.between(60.0, 120.0)
        } else {
            self.rng.between(10.0, 20.0)
        }
    }

    fn create(&mut self, n: u32, at: f64, idle_timeout: f64) {
        let dispatch = self.dispatches.len();
        self.dispatches.push((n, at));
        for _ in 0..n {
            let startup = self.startup();
            self.pods
                .push(Pod::asked_for(at, startup, dispatch, idle_timeout));
        }
    }

    /// The oracle knows each job's arrival (not how long its pod will take to start): one pod per
    /// job, created so that a pod of typical start-up registers as the job arrives.
    fn plan_oracle(&mut self) {
        let mut planned = Vec::new();
        for job in &self.workload.jobs {
            let startup = self.startup();
            let at = job.arrival - TYPICAL_STARTUP - JOB_CONTROLLER_DELAY;
            planned.push(Pod::asked_for(at, startup, 0, IDLE_TIMEOUT));
        }
        planned.sort_by(|a, b| a.created_at.total_cmp(&b.created_at));
        self.planned = planned.into();
    }

    fn scheduled_pods(&self) -> usize {
        self.pods
            .iter()
            .filter(|p| {
                matches!(
                    p.state,
                    PodState::Starting | PodState::Idle | PodState::Busy
                )
            })
            .count()
    }

    fn advance_pods(&mut self) {
        let now = self.now;
        let mut room = self.capacity.saturating_sub(self.scheduled_pods());
        for pod in self.pods.iter_mut() {
            match pod.state {
                PodState::NotYetCreated if now >= pod.ready_at => {
                    pod.state = PodState::Unschedulable;
                }
                PodState::Starting if now >= pod.ready_at => {
                    pod.state = PodState::Idle;
                    pod.registered_at = Some(now);
                    pod.ready_at = now + pod.idle_timeout;
                }
                PodState::Idle if now >= pod.ready_at => {
                    pod.state = PodState::Gone;
                    pod.gone_at = Some(now);
                    room += 1;
                }
                PodState::Busy if now >= pod.ready_at => {
                    pod.state = PodState::Gone;
                    pod.gone_at = Some(now);
                    self.running_jobs -= 1;
                    room += 1;
                }
                _ => {}
            }
            // Pods are scheduled oldest first, as room frees.
            if pod.state == PodState::Unschedulable && room > 0 {
                room -= 1;
                pod.state = PodState::Starting;
                pod.ready_at = now + pod.startup;
            }
        }
        let (gone, alive): (Vec<Pod>, Vec<Pod>) = std::mem::take(&mut self.pods)
            .into_iter()
            .partition(|p| p.state == PodState::Gone);
        self.pods = alive;
        self.done.extend(gone);
    }

    /// Idle agents take the oldest waiting jobs.
    fn assign(&mut self) {
        let now = self.now;
        for pod in self.pods.iter_mut().filter(|p| p.state == PodState::Idle) {
            let Some(job) = self.queue.pop_front() else {
                break;
            };
            let arrival = self.workload.jobs[job].arrival;
            self.waits.push(now - arrival);
            pod.state = PodState::Busy;
            pod.took_job_at = Some(now);
            pod.ready_at = now + self.workload.jobs[job].duration;
            self.running_jobs += 1;
        }
    }

    /// One tick of `policy`: observe, decide, create.
    fn tick(&mut self, policy: Policy) {
        self.requests += policy.reads_per_tick();
        let now = self.now;
        let count = |f: &dyn Fn(&Pod) -> bool| self.pods.iter().filter(|p| f(p)).count() as u32;
        let scheduled = self.queue.len() as u32;
        let running = self.running_jobs;
        let idle = count(&|p| p.state == PodState::Idle);
        let busy = count(&|p| p.state == PodState::Busy);
        let agents = idle + busy;
        let not_yet_created = count(&|p| p.state == PodState::NotYetCreated);
        let unschedulable = count(&|p| p.state == PodState::Unschedulable);
        let starting = count(&|p| p.state == PodState::Starting);
        let alive = not_yet_created + unschedulable + starting + agents;
        let n = match policy {
            Policy::Dispatcher | Policy::DispatcherProportional => {
                let last = self.dispatches.last().map(|(size, at)| {
                    let d = self.dispatches.len() - 1;
                    LastDispatch {
                        id: d.to_string(),
                        size: *size,
                        online: count(&|p| {
                            p.dispatch == d
                                && matches!(
                                    p.state,
                                    PodState::Idle | PodState::Busy | PodState::Gone
                                )
                        }),
                        age: Duration::from_secs_f64(now - at),
                    }
                });
                let supply = Supply {
                    pending: starting,
                    unschedulable,
                    running: agents,
                    running_long: count(&|p| {
                        matches!(p.state, PodState::Idle | PodState::Busy)
                            && p.registered_at
                                .is_some_and(|r| now - r + p.startup > REGISTERED_BY)
                    })
                    .min(agents),
                    not_yet_created,
                    failed_create: None,
                    // Simulated agents never fail to start.
                    failing: None,
                    last,
                };
                let limits = Limits {
                    min_agents: 0,
                    max_agents: MAX_AGENTS,
                    buffer: BUFFER,
                    buffer_ratio: match policy {
                        Policy::DispatcherProportional => BUFFER_RATIO,
                        _ => 0.0,
                    },
                    rollout_ratio: 0.5,
                    rollout_timeout: Duration::from_secs(180),
                };
                let demand = Demand {
                    scheduled,
                    running,
                    agents,
                };
                match decide(demand, &supply, &limits).action {
                    Action::Dispatch(n) => n,
                    Action::Hold(_) => 0,
                }
            }
            Policy::SourcegraphNoRollout => {
                // parallelism = queued + buffer, less the agents seen idle: pods on their way
                // are invisible to it.
                (scheduled + BUFFER).saturating_sub(idle) * u32::from(scheduled > 0)
            }
            Policy::AgentScaler => {
                // desired = scheduled + running (+ proportional buffer), against instances.
                let total = scheduled + running;
                let desired = total + BUFFER.min(total);
                desired.min(MAX_AGENTS).saturating_sub(alive)
            }
            Policy::PodPerJob => {
                // A pod for each scheduled job that has none coming.
                let coming = not_yet_created + unschedulable + starting;
                scheduled.saturating_sub(coming + idle)
            }
            Policy::KedaDefault => {
                // maxScale = queue length; effectiveMax = maxScale − running Jobs (unfinished).
                let max_scale = scheduled.min(MAX_AGENTS);
                max_scale.saturating_sub(alive - idle)
            }
            Policy::Oracle => 0,
        };
        // Every design has a ceiling (max agents, maxReplicaCount, the group's MaxSize).
        let n = n.min(MAX_AGENTS.saturating_sub(alive));
        if n > 0 {
            let limit = (running + scheduled + policy.buffer(scheduled)).min(MAX_AGENTS);
            self.overshoot = self.overshoot.max((alive + n).saturating_sub(limit));
            // One create per Job; KEDA and one-pod-per-job create a Job per pod.
            self.requests += match policy {
                Policy::KedaDefault | Policy::PodPerJob => f64::from(n),
                _ => 1.0,
            };
            self.create(n, now, policy.idle_timeout());
        }
    }

    fn results(&self, policy: Policy) -> Results {
        let mut waits = self.waits.clone();
        waits.sort_by(f64::total_cmp);
        let pct = |q: f64| {
            waits
                .get(((waits.len() as f64 - 1.0) * q) as usize)
                .copied()
                .unwrap_or(0.0)
        };
        let waste: f64 = self
            .pods
            .iter()
            .chain(&self.done)
            .map(|p| match (p.registered_at, p.took_job_at) {
                (Some(r), Some(t)) => t - r,
                (_, None) => p.gone_at.unwrap_or(self.now) - p.created_at,
                (None, Some(_)) => 0.0,
            })
            .sum();
        let jobs_created = match policy {
            Policy::PodPerJob => self.workload.jobs.len() as f64, // a get per job
            _ => 0.0,
        };
        Results {
            p50: pct(0.5),
            p95: pct(0.95),
            waste_minutes: waste / 60.0,
            pods: self.pods.len() + self.done.len(),
            overshoot: self.overshoot,
            requests_per_hour: (self.requests + jobs_created) / ((self.now + 3600.0) / 3600.0),
        }
    }
}
