//! The queue's demand, from Buildkite's agent metrics API with the agent token (no API token):
//! `GET <endpoint>/metrics/queue?name=<queue>` with `Authorization: Token <token>`, as
//! buildkite-agent-scaler asks it (`buildkite/buildkite.go`). The answer's
//! `Buildkite-Agent-Metrics-Poll-Duration` header is the interval the server wants between
//! polls, which the dispatcher never undercuts.

use std::time::Duration;

use crate::decide::Demand;

/// The server's minimum poll interval.
const POLL_DURATION_HEADER: &str = "Buildkite-Agent-Metrics-Poll-Duration";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("Buildkite refused the agent token (HTTP {0}); check BUILDKITE_AGENT_TOKEN (the queue's cluster or organization agent token)")]
    Unauthorized(u16),
    #[error("Buildkite asked to slow down (HTTP 429); retrying after {}s", .0.as_secs())]
    Throttled(Duration),
    #[error("Buildkite answered HTTP {0}; retrying")]
    Status(u16),
    #[error("cannot reach Buildkite at {endpoint}: {reason}; retrying")]
    Unreachable { endpoint: String, reason: String },
    #[error("Buildkite's metrics answer was not understood ({0}); check that BUILDKITE_AGENT_ENDPOINT is Buildkite's agent API (https://agent.buildkite.com/v3); retrying")]
    Invalid(String),
}

impl MetricsError {
    /// A short name, for the API-error metric.
    pub fn name(&self) -> &'static str {
        match self {
            MetricsError::Unauthorized(_) => "unauthorized",
            MetricsError::Throttled(_) => "throttled",
            MetricsError::Status(_) => "status",
            MetricsError::Unreachable { .. } => "unreachable",
            MetricsError::Invalid(_) => "invalid",
        }
    }
}

/// One poll's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metrics {
    pub demand: Demand,
    /// The server's `Buildkite-Agent-Metrics-Poll-Duration`, when it sent one.
    pub poll_duration: Option<Duration>,
}

#[derive(serde::Deserialize)]
struct QueueMetrics {
    agents: AgentCounts,
    jobs: JobCounts,
}

#[derive(serde::Deserialize)]
struct AgentCounts {
    #[serde(default)]
    idle: u32,
    #[serde(default)]
    busy: u32,
    #[serde(default)]
    total: u32,
}

#[derive(serde::Deserialize)]
struct JobCounts {
    #[serde(default)]
    scheduled: u32,
    #[serde(default)]
    running: u32,
}

pub struct MetricsClient {
    http: reqwest::Client,
    /// `<endpoint>/metrics/queue`, asked with `?name=<queue>`.
    url: String,
    queue: String,
    endpoint: String,
    /// `Token <token>`; never logged.
    authorization: String,
}

impl MetricsClient {
    pub fn new(endpoint: &str, token: &str, queue: &str) -> MetricsClient {
        let http = http_client();
        let endpoint = endpoint.trim_end_matches('/').to_string();
        MetricsClient {
            http,
            url: format!("{endpoint}/metrics/queue"),
            queue: queue.to_string(),
            endpoint,
            authorization: format!("Token {token}"),
        }
    }

    pub async fn poll(&self) -> Result<Metrics, MetricsError> {
        let response = self
            .http
            .get(&self.url)
            .query(&[("name", &self.queue)])
            .header("Authorization", &self.authorization)
            .send()
            .await
            .map_err(|e| MetricsError::Unreachable {
                endpoint: self.endpoint.clone(),
                reason: without_url(&e),
            })?;
        let seconds = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs)
        };
        let poll_duration = seconds(POLL_DURATION_HEADER);
        match response.status().as_u16() {
            200 => {}
            code @ (401 | 403) => return Err(MetricsError::Unauthorized(code)),
            429 => {
                let wait = seconds("Retry-After").unwrap_or(Duration::from_secs(30));
                return Err(MetricsError::Throttled(wait));
            }
            code => return Err(MetricsError::Status(code)),
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| MetricsError::Unreachable {
                endpoint: self.endpoint.clone(),
                reason: without_url(&e),
            })?;
        let metrics: QueueMetrics =
            serde_json::from_slice(&body).map_err(|e| MetricsError::Invalid(e.to_string()))?;
        Ok(Metrics {
            demand: Demand {
                scheduled: metrics.jobs.scheduled,
                running: metrics.jobs.running,
                agents: metrics
                    .agents
                    .total
                    .max(metrics.agents.idle + metrics.agents.busy),
            },
            poll_duration,
        })
    }
}

/// The client for Buildkite's agent API: a 15 s timeout per call, and a User-Agent naming the
/// dispatcher.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .user_agent(concat!(
            "stateless-agent-job-dispatcher/",
            env!("CARGO_PKG_VERSION")
        ))
        .build()
        .expect("an HTTP client")
}

/// reqwest's error text without its URL (the URL holds no secret, but one line is enough).
pub fn without_url(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text
            .replace(&format!(" ({url})"), "")
            .replace(url.as_str(), "");
    }
    match std::error::Error::source(error) {
        Some(source) => format!("{text}: {source}"),
        None => text,
    }
}
