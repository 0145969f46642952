//! A fake of Buildkite's agent API on loopback, for the dispatcher's scenarios: the queue
//! metrics endpoint as the agent token reads it (`GET /v3/metrics/queue?name=<queue>` with
//! `Authorization: Token <token>`; buildkite.com/docs/apis/agent-api/metrics, and
//! buildkite-agent-scaler v1.12.0-23-g49c4145, `buildkite/buildkite.go` `queryMetrics`, which
//! asks the same way, its queue form-encoded): `{"agents":{"idle","busy","total"},
//! "jobs":{"scheduled","running","waiting","total"},"organization":{"slug"}}`, with the
//! `Buildkite-Agent-Metrics-Poll-Duration` header. A wrong token gets 401; faults on request
//! (429 with `Retry-After`, 500, a stall, a 200 whose body is not the metrics).
//!
//! Not modelled yet: the agent lifecycle endpoints (register, ping, accept, start, finish,
//! disconnect), so demand here is set by the test rather than consumed by agents.

use std::collections::VecDeque;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::http_server::read_request;

/// What the queue looks like to Buildkite.
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

struct State {
    token: String,
    queue: String,
    counts: QueueState,
    poll_duration: Option<u64>,
    faults: VecDeque<BuildkiteFault>,
    /// `(path and query, Authorization header)` of every request.
    requests: Vec<(String, String)>,
}

pub struct FakeBuildkite {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl FakeBuildkite {
    /// Serves `queue`'s metrics to requests carrying `token`.
    pub fn start(token: &str, queue: &str) -> FakeBuildkite {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            token: token.to_string(),
            queue: queue.to_string(),
            counts: QueueState::default(),
            poll_duration: None,
            faults: VecDeque::new(),
            requests: Vec::new(),
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

    /// Sends `Buildkite-Agent-Metrics-Poll-Duration: <seconds>` from now on.
    pub fn ask_poll_duration(&self, seconds: u64) {
        self.state.lock().unwrap().poll_duration = Some(seconds);
    }

    pub fn inject(&self, fault: BuildkiteFault, times: usize) {
        let mut state = self.state.lock().unwrap();
        state.faults.extend(std::iter::repeat_n(fault, times));
    }

    /// How many metrics requests came.
    pub fn polls(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }

    /// Every request's `Authorization` header, to check where the token goes.
    pub fn authorizations(&self) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state
            .requests
            .iter()
            .map(|(_, auth)| auth.clone())
            .collect()
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let request = read_request(&mut reader)?;
        if request.method.is_empty() {
            return Ok(());
        }
        let auth = request.header("Authorization").unwrap_or("").to_string();
        let (fault, expected, queue, counts, poll) = {
            let mut s = state.lock().unwrap();
            s.requests
                .push((format!("{}?{}", request.path, request.query), auth.clone()));
            (
                s.faults.pop_front(),
                format!("Token {}", s.token),
                s.queue.clone(),
                s.counts,
                s.poll_duration,
            )
        };
        let (code, body, extra) = match fault {
            Some(BuildkiteFault::Stall(wait)) => {
                std::thread::sleep(wait);
                return Ok(());
            }
            Some(BuildkiteFault::Status(429)) => (
                429,
                json!({"message": "rate limited"}),
                "Retry-After: 1\r\n".to_string(),
            ),
            Some(BuildkiteFault::Answer(text)) => (200, json!(text), String::new()),
            Some(BuildkiteFault::Status(code)) => {
                (code, json!({"message": "injected"}), String::new())
            }
            None if auth != expected => (401, json!({"message": "Invalid token"}), String::new()),
            None if request.path != "/v3/metrics/queue"
                || request.query != format!("name={queue}") =>
            {
                (
                    404,
                    json!({"message": "No queue by that name"}),
                    String::new(),
                )
            }
            None => {
                let total_agents = counts.idle_agents + counts.busy_agents;
                let body = json!({
                    "agents": {"idle": counts.idle_agents, "busy": counts.busy_agents, "total": total_agents},
                    "jobs": {"scheduled": counts.scheduled, "running": counts.running, "waiting": 0,
                             "total": counts.scheduled + counts.running},
                    "organization": {"slug": "acme"},
                });
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
    }
}
