//! A fake of Buildkite's agent API on loopback, for the dispatcher's scenarios. Modelled on the
//! agent's client, buildkite/agent main 5c219808 (v4.0.0-beta.15-41), `api/agents.go`,
//! `api/pings.go`, `api/jobs.go` and `internal/agenthttp/auth.go`, and on the metrics endpoint as
//! buildkite-agent-scaler v1.12.0-23-g49c4145 reads it (`buildkite/buildkite.go`
//! `queryMetrics`):
//!
//! - **Metrics**: `GET /v3/metrics/queue?name=<queue>` with `Authorization: Token <agent
//!   token>`: `{"agents":{"idle","busy","total"},"jobs":{"scheduled","running","waiting",
//!   "total"},"organization":{"slug"}}`, with the `Buildkite-Agent-Metrics-Poll-Duration` header.
//!   The counts are the lifecycle's below, plus whatever the test [`FakeBuildkite::set`]s (demand
//!   no agent here takes).
//! - **The agent lifecycle**: `POST /v3/register` with the registration token and the agent's
//!   tags (`meta_data`) answers an `access_token` and a `ping_interval`; with that token,
//!   `POST /v3/connect`, `GET /v3/ping` (`{"job":{"id",...}}` once a scheduled job of the agent's
//!   queue is assigned to it, else `{}`), `PUT /v3/jobs/<id>/accept` (the job with its `env`),
//!   `PUT /v3/jobs/<id>/start`, `PUT /v3/jobs/<id>/finish` (`exit_status`;
//!   `ignore_agent_in_dispatches`, which an agent with `--disconnect-after-job` sends, keeps it
//!   out of later dispatches) and `POST /v3/disconnect`.
//! - **Acquiring one job** (an agent started with `--acquire-job`; buildkite/agent v3.137.0
//!   `api/jobs.go` `AcquireJob`, `core/client.go`): `POST /v3/register` with
//!   `ignore_in_dispatches: true` keeps the agent out of every ping's dispatch; `PUT
//!   /v3/jobs/<id>/acquire` answers 200 with the job (its `env`) for a scheduled job, or one a
//!   stack reserved (agent-stack-k8s reserves, then starts the agent that acquires), and assigns
//!   it to the caller (counted in [`Job::acquired`]), 404 for a job it does not know, 423 while
//!   the test holds the job [`FakeBuildkite::lock`]ed (waiting on dependencies), and 422 for a
//!   job already acquired, running, finished or cancelled. Each attempt's
//!   `X-Buildkite-Lock-Acquire-Job` and `X-Buildkite-Backoff-Sequence` are recorded
//!   ([`FakeBuildkite::acquires`]).
//! - **The Stacks API** under `/v3/stacks/`, on the same listener and jobs: see
//!   [`stacks`], which names its sources and choices.
//! - **Cancelling**: [`FakeBuildkite::cancel`] makes a scheduled or reserved job canceled and an
//!   assigned, accepted or running one canceling, which its agent's finish makes canceled;
//!   [`FakeBuildkite::cancel_scheduled`] cancels a queue's scheduled and reserved jobs.
//! - A wrong token gets 401; faults on request (429 with `Retry-After`, 500, a stall, a 200 whose
//!   body is not the metrics) hit the metrics endpoint ([`FakeBuildkite::inject`]) or the acquire
//!   calls ([`FakeBuildkite::inject_acquire`]), each queue its own.
//!
//! Where Buildkite's side is not in any public source, this fake chooses, and says so: an
//! assigned job counts as running and its agent as busy from the ping that hands it out; a job
//! is assigned to the agent that pings first; `ping_interval` is 1 s (Buildkite's real interval
//! is its own to set) so scenarios run in seconds.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

mod stacks;

use crate::http_server::{serve_connection, Request};
use stacks::Stacks;
pub use stacks::{Reservation, Stack, StackCall};

/// What the queue looks like to Buildkite, beyond the agents and jobs of the lifecycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueState {
    pub scheduled: u32,
    pub running: u32,
    pub idle_agents: u32,
    pub busy_agents: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildkiteFault {
    Status(u16),
    /// Accept and say nothing for this long.
    Stall(Duration),
    /// A 200 with this JSON string instead of the metrics (as a wrong endpoint might answer).
    Answer(&'static str),
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Scheduled,
    /// Held by a stack (`batch-reserve`) until its reservation expires; only a stack's jobs.
    Reserved,
    Assigned,
    Accepted,
    Running,
    Finished,
    /// Cancelled while an agent had it; the agent's finish makes it `Canceled`.
    Canceling,
    Canceled,
}

impl JobState {
    /// The lower-case name Buildkite uses (`get-states`, error messages).
    pub fn name(self) -> String {
        format!("{self:?}").to_lowercase()
    }
}

/// A job, as the test sees it.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub queue: String,
    pub state: JobState,
    pub env: BTreeMap<String, String>,
    /// The agent's name, once assigned.
    pub agent: Option<String>,
    /// The agent's `exit_status`, or a stack's `finish` exit status as a string (`"-1"`).
    pub exit_status: Option<String>,
    /// The job's priority, as the Stacks API lists it (`schedule` gives 0).
    pub priority: i64,
    /// The `detail` a stack finished the job with.
    pub finish_detail: Option<String>,
    /// The `detail` of every stack notification stored on the job, in order.
    pub notifications: Vec<String>,
    /// How many acquires of this job succeeded.
    pub acquired: u32,
    /// The stack's reservation while the job is [`JobState::Reserved`].
    pub reservation: Option<Reservation>,
    /// When it was scheduled (`scheduled_at`).
    pub scheduled_at: SystemTime,
}

struct Agent {
    name: String,
    tags: Vec<String>,
    job: Option<String>,
    /// Registered and not disconnected.
    connected: bool,
    /// Registered with `ignore_in_dispatches`, or finished its job with
    /// `ignore_agent_in_dispatches`: no job for it again.
    ignored: bool,
}

/// One `PUT /v3/jobs/<id>/acquire` as it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquire {
    pub job: String,
    /// `X-Buildkite-Lock-Acquire-Job`.
    pub lock: Option<String>,
    /// `X-Buildkite-Backoff-Sequence`: the attempt, from 0.
    pub backoff_sequence: Option<String>,
}

impl Agent {
    fn queue(&self) -> &str {
        self.tags
            .iter()
            .find_map(|t| t.strip_prefix("queue="))
            .unwrap_or("default")
    }
}

pub(crate) struct State {
    pub(crate) token: String,
    pub(crate) queue: String,
    counts: QueueState,
    poll_duration: Option<u64>,
    faults: VecDeque<BuildkiteFault>,
    acquire_faults: VecDeque<BuildkiteFault>,
    /// Jobs the test holds locked: an acquire gets 423.
    locked: BTreeSet<String>,
    acquires: Vec<Acquire>,
    /// `(path and query, Authorization header)` of every request.
    requests: Vec<(String, String)>,
    /// Access token → agent.
    agents: BTreeMap<String, Agent>,
    pub(crate) jobs: Vec<Job>,
    /// The Stacks API's side: stacks, their calls, rate-limit windows, faults and settings.
    pub(crate) stacks: Stacks,
}

impl State {
    /// Reservations past their time end: the job is scheduled again (lazily, on each request).
    pub(crate) fn expire_reservations(&mut self, now: Instant) {
        for job in &mut self.jobs {
            if job.state == JobState::Reserved
                && job.reservation.as_ref().is_none_or(|r| r.until <= now)
            {
                job.state = JobState::Scheduled;
                job.reservation = None;
            }
        }
    }

    /// The metrics of `queue`: the lifecycle's counts plus the test's.
    fn metrics(&self, queue: &str) -> Value {
        let c = self.counts;
        let jobs = |states: &[JobState]| {
            self.jobs
                .iter()
                .filter(|j| j.queue == queue && states.contains(&j.state))
                .count() as u32
        };
        let scheduled = c.scheduled + jobs(&[JobState::Scheduled]);
        let running =
            c.running + jobs(&[JobState::Assigned, JobState::Accepted, JobState::Running]);
        let live = || {
            self.agents
                .values()
                .filter(|a| a.connected && a.queue() == queue)
        };
        let busy = c.busy_agents + live().filter(|a| a.job.is_some()).count() as u32;
        let idle = c.idle_agents + live().filter(|a| a.job.is_none()).count() as u32;
        json!({
            "agents": {"idle": idle, "busy": busy, "total": idle + busy},
            "jobs": {"scheduled": scheduled, "running": running, "waiting": 0,
                     "total": scheduled + running},
            "organization": {"slug": "acme"},
        })
    }

    /// The agent lifecycle's endpoints; `None` for a path that is not one of them.
    fn lifecycle(&mut self, request: &Request, auth: &str) -> Option<(u16, Value)> {
        let path = request.path.strip_prefix("/v3/")?;
        let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        if (request.method.as_str(), path) == ("POST", "register") {
            if auth != format!("Token {}", self.token) {
                return Some((401, json!({"message": "Invalid registration token"})));
            }
            let n = self.agents.len() + 1;
            let access = format!("bkaa_fake-access-{n:04}");
            let name = body["name"].as_str().unwrap_or("agent").to_string();
            let tags: Vec<String> = body["meta_data"]
                .as_array()
                .map(|t| {
                    t.iter()
                        .filter_map(|t| t.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            let ignored = body["ignore_in_dispatches"] == json!(true);
            let answer = json!({"id": format!("agent-{n:04}"), "name": name, "access_token": access,
                "endpoint": "", "ping_interval": 1, "job_status_interval": 5,
                "heartbeat_interval": 60, "meta_data": tags});
            self.agents.insert(
                access,
                Agent {
                    name,
                    tags,
                    job: None,
                    connected: true,
                    ignored,
                },
            );
            return Some((201, answer));
        }
        let token = auth.strip_prefix("Token ").unwrap_or("").to_string();
        if !self.agents.contains_key(&token) {
            return Some((401, json!({"message": "Invalid access token"})));
        }
        let segments: Vec<&str> = path.split('/').collect();
        if let ("PUT", ["jobs", id, "acquire"]) = (request.method.as_str(), segments.as_slice()) {
            return Some(self.acquire(&token, id));
        }
        let agent = self.agents.get_mut(&token).unwrap();
        let answer = match (request.method.as_str(), segments.as_slice()) {
            ("POST", ["connect"]) => {
                agent.connected = true;
                json!({})
            }
            ("POST", ["disconnect"]) => {
                agent.connected = false;
                json!({})
            }
            ("GET", ["ping"]) => {
                if agent.job.is_none() && !agent.ignored && agent.connected {
                    let queue = agent.queue().to_string();
                    let name = agent.name.clone();
                    if let Some(job) = self
                        .jobs
                        .iter_mut()
                        .find(|j| j.state == JobState::Scheduled && j.queue == queue)
                    {
                        job.state = JobState::Assigned;
                        job.agent = Some(name);
                        let id = job.id.clone();
                        self.agents.get_mut(&token).unwrap().job = Some(id.clone());
                        return Some((200, json!({"job": {"id": id, "state": "assigned"}})));
                    }
                }
                json!({})
            }
            ("PUT", ["jobs", id, step]) => {
                if agent.job.as_deref() != Some(*id) {
                    return Some((
                        422,
                        json!({"message": "This job is not assigned to this agent"}),
                    ));
                }
                if *step == "finish" {
                    agent.job = None;
                    agent.ignored |= body["ignore_agent_in_dispatches"] == json!(true);
                }
                let job = self.jobs.iter_mut().find(|j| j.id == *id).unwrap();
                let canceling = job.state == JobState::Canceling;
                match *step {
                    "accept" | "start" if canceling => {}
                    "accept" => job.state = JobState::Accepted,
                    "start" => job.state = JobState::Running,
                    "finish" => {
                        job.state = if canceling {
                            JobState::Canceled
                        } else {
                            JobState::Finished
                        };
                        job.exit_status = body["exit_status"].as_str().map(String::from);
                    }
                    _ => return Some((404, json!({"message": "Not found"}))),
                }
                let state = job.state.name();
                json!({"id": job.id, "state": state, "env": job.env})
            }
            _ => return None,
        };
        Some((200, answer))
    }

    /// `PUT /v3/jobs/<id>/acquire` by the agent holding `token`. Which of 404, 423 and 422 wins
    /// for a job that is several at once is Buildkite's and not public; this fake checks in
    /// that order. A job a stack reserved is acquirable too (agent-stack-k8s reserves, then
    /// starts the agent that acquires), by any agent: the reservation is the stack's, not the
    /// agent's.
    fn acquire(&mut self, token: &str, id: &str) -> (u16, Value) {
        let name = self.agents[token].name.clone();
        let Some(job) = self.jobs.iter_mut().find(|j| j.id == id) else {
            return (404, json!({"message": "No job found"}));
        };
        if self.locked.contains(id) {
            return (
                423,
                json!({"message": "The job is waiting on its dependencies"}),
            );
        }
        if !matches!(job.state, JobState::Scheduled | JobState::Reserved) {
            let state = job.state.name();
            return (
                422,
                json!({"message": format!("The job is {state} and cannot be acquired")}),
            );
        }
        job.state = JobState::Accepted;
        job.agent = Some(name);
        job.reservation = None;
        job.acquired += 1;
        let answer = json!({"id": job.id, "state": "accepted", "env": job.env});
        self.agents.get_mut(token).unwrap().job = Some(id.to_string());
        (200, answer)
    }
}

pub struct FakeBuildkite {
    addr: SocketAddr,
    pub(crate) state: Arc<Mutex<State>>,
}

impl FakeBuildkite {
    /// Serves `queue`'s metrics to requests carrying `token`, and registers agents with it.
    pub fn start(token: &str, queue: &str) -> FakeBuildkite {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            token: token.to_string(),
            queue: queue.to_string(),
            counts: QueueState::default(),
            poll_duration: None,
            faults: VecDeque::new(),
            acquire_faults: VecDeque::new(),
            locked: BTreeSet::new(),
            acquires: Vec::new(),
            requests: Vec::new(),
            agents: BTreeMap::new(),
            jobs: Vec::new(),
            stacks: Stacks::default(),
        }));
        let serving = state.clone();
        crate::loopback::serve_each(listener, move |stream| {
            let _ = serve(stream, &serving);
        });
        FakeBuildkite { addr, state }
    }

    /// The agent API's base, as `BUILDKITE_AGENT_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}/v3", self.addr)
    }

    pub fn set(&self, counts: QueueState) {
        self.state.lock().unwrap().counts = counts;
    }

    /// Schedules `count` jobs on `queue`, each with `env` and its own `BUILDKITE_JOB_ID`, at
    /// priority 0.
    pub fn schedule(&self, queue: &str, count: usize, env: &BTreeMap<String, String>) {
        self.schedule_with_priority(queue, count, env, 0);
    }

    /// [`FakeBuildkite::schedule`] at `priority` (as the Stacks API lists it); the new jobs' ids.
    pub fn schedule_with_priority(
        &self,
        queue: &str,
        count: usize,
        env: &BTreeMap<String, String>,
        priority: i64,
    ) -> Vec<String> {
        let mut state = self.state.lock().unwrap();
        let mut ids = Vec::new();
        for _ in 0..count {
            let id = format!("01900000-0000-7000-8000-{:012}", state.jobs.len() + 1);
            let mut env = env.clone();
            env.insert("BUILDKITE_JOB_ID".into(), id.clone());
            env.insert("BUILDKITE_AGENT_META_DATA_QUEUE".into(), queue.into());
            ids.push(id.clone());
            state.jobs.push(Job {
                id,
                queue: queue.to_string(),
                state: JobState::Scheduled,
                env,
                agent: None,
                exit_status: None,
                priority,
                finish_detail: None,
                notifications: Vec::new(),
                acquired: 0,
                reservation: None,
                scheduled_at: SystemTime::now(),
            });
        }
        ids
    }

    /// Cancels every job of `queue` no agent has taken, scheduled or reserved by a stack (a
    /// build cancelled before its agents came); how many.
    pub fn cancel_scheduled(&self, queue: &str) -> usize {
        let mut state = self.state.lock().unwrap();
        state.expire_reservations(Instant::now());
        let mut n = 0;
        for job in state.jobs.iter_mut().filter(|j| {
            j.queue == queue && matches!(j.state, JobState::Scheduled | JobState::Reserved)
        }) {
            job.state = JobState::Canceled;
            job.reservation = None;
            n += 1;
        }
        n
    }

    /// Cancels one job: scheduled or reserved becomes canceled; assigned, accepted or running
    /// becomes canceling (its agent finishes it, and then it is canceled); others are left.
    pub fn cancel(&self, job: &str) {
        let mut state = self.state.lock().unwrap();
        state.expire_reservations(Instant::now());
        if let Some(job) = state.jobs.iter_mut().find(|j| j.id == job) {
            match job.state {
                JobState::Scheduled | JobState::Reserved => {
                    job.state = JobState::Canceled;
                    job.reservation = None;
                }
                JobState::Assigned | JobState::Accepted | JobState::Running => {
                    job.state = JobState::Canceling;
                }
                _ => {}
            }
        }
    }

    pub fn jobs(&self) -> Vec<Job> {
        self.state.lock().unwrap().jobs.clone()
    }

    /// How many agents have registered.
    pub fn registrations(&self) -> usize {
        self.state.lock().unwrap().agents.len()
    }

    /// Sends `Buildkite-Agent-Metrics-Poll-Duration: <seconds>` from now on.
    pub fn ask_poll_duration(&self, seconds: u64) {
        self.state.lock().unwrap().poll_duration = Some(seconds);
    }

    pub fn inject(&self, fault: BuildkiteFault, times: usize) {
        let mut state = self.state.lock().unwrap();
        state.faults.extend(std::iter::repeat_n(fault, times));
    }

    /// Faults for the next acquire calls, before any job is looked at.
    pub fn inject_acquire(&self, fault: BuildkiteFault, times: usize) {
        let mut state = self.state.lock().unwrap();
        state
            .acquire_faults
            .extend(std::iter::repeat_n(fault, times));
    }

    /// Holds `job` locked, as a job waiting on its dependencies is: acquiring it gets 423.
    pub fn lock(&self, job: &str) {
        self.state.lock().unwrap().locked.insert(job.to_string());
    }

    pub fn unlock(&self, job: &str) {
        self.state.lock().unwrap().locked.remove(job);
    }

    /// Every acquire call, faulted ones included, in order.
    pub fn acquires(&self) -> Vec<Acquire> {
        self.state.lock().unwrap().acquires.clone()
    }

    /// How many agents registered with `ignore_in_dispatches`.
    pub fn registrations_ignoring_dispatches(&self) -> usize {
        let state = self.state.lock().unwrap();
        state.agents.values().filter(|a| a.ignored).count()
    }

    /// How many metrics requests came.
    pub fn polls(&self) -> usize {
        let state = self.state.lock().unwrap();
        state
            .requests
            .iter()
            .filter(|(path, _)| path.starts_with("/v3/metrics/"))
            .count()
    }

    /// Every metrics request's `Authorization` header, to check where the token goes.
    pub fn authorizations(&self) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state
            .requests
            .iter()
            .filter(|(path, _)| path.starts_with("/v3/metrics/"))
            .map(|(_, auth)| auth.clone())
            .collect()
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    serve_connection(stream, |request, out| answer(request, state, out))
}

/// Answers one request; whether the connection may serve another.
fn answer(request: &Request, state: &Mutex<State>, out: &mut TcpStream) -> std::io::Result<bool> {
    let auth = request.header("Authorization").unwrap_or("").to_string();
    let now = Instant::now();
    state.lock().unwrap().expire_reservations(now);
    if request.path.starts_with("/v3/stacks/") {
        let reply = stacks::answer(&mut state.lock().unwrap(), request, &auth, now);
        return stacks::write_reply(reply, out);
    }
    let metrics = request.path == "/v3/metrics/queue";
    let acquire = request.method == "PUT" && request.path.ends_with("/acquire");
    let (lifecycle, fault, expected, queue, body, poll) = {
        let mut s = state.lock().unwrap();
        s.requests
            .push((format!("{}?{}", request.path, request.query), auth.clone()));
        if acquire {
            let job = request
                .path
                .split('/')
                .nth(3)
                .unwrap_or_default()
                .to_string();
            s.acquires.push(Acquire {
                job,
                lock: request
                    .header("X-Buildkite-Lock-Acquire-Job")
                    .map(String::from),
                backoff_sequence: request
                    .header("X-Buildkite-Backoff-Sequence")
                    .map(String::from),
            });
        }
        let fault = match (metrics, acquire) {
            (true, _) => s.faults.pop_front(),
            (_, true) => s.acquire_faults.pop_front(),
            _ => None,
        };
        let lifecycle = match (metrics, &fault) {
            (false, None) => s.lifecycle(request, &auth),
            _ => None,
        };
        let queue = s.queue.clone();
        (
            lifecycle,
            fault,
            format!("Token {}", s.token),
            queue.clone(),
            s.metrics(&queue),
            s.poll_duration,
        )
    };
    let (code, body, extra) = match (lifecycle, fault) {
        (Some((code, body)), _) => (code, body, String::new()),
        (None, Some(BuildkiteFault::Stall(wait))) => {
            std::thread::sleep(wait);
            return Ok(false);
        }
        (None, Some(BuildkiteFault::Status(429))) => (
            429,
            json!({"message": "rate limited"}),
            "Retry-After: 1\r\n".to_string(),
        ),
        (None, Some(BuildkiteFault::Answer(text))) => (200, json!(text), String::new()),
        (None, Some(BuildkiteFault::Status(code))) => {
            (code, json!({"message": "injected"}), String::new())
        }
        (None, None) if auth != expected => {
            (401, json!({"message": "Invalid token"}), String::new())
        }
        (None, None) if !metrics || request.query != format!("name={queue}") => (
            404,
            json!({"message": "No queue by that name"}),
            String::new(),
        ),
        (None, None) => {
            let extra = poll
                .map(|s| format!("Buildkite-Agent-Metrics-Poll-Duration: {s}\r\n"))
                .unwrap_or_default();
            (200, body, extra)
        }
    };
    let text = body.to_string();
    write!(
        out,
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{text}",
        text.len()
    )?;
    Ok(true)
}
