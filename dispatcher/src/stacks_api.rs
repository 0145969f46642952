//! Buildkite's Stacks API, the stacks mode's view of a queue: register a stack, list the queue's
//! scheduled jobs (the heartbeat that keeps the queue *Connected*), reserve them, read their
//! states, finish the ones a pod cannot run, add notifications to their timelines, deregister.
//!
//! Follows Buildkite's docs (`pages/apis/agent_api/stacks.md`, buildkite/docs 35cf0294) and its
//! Go client (buildkite/stacksapi v1.0.1, `649b3a07`: `client.go`, `register.go`,
//! `scheduled_jobs.go` (listing and batch-reserve), `get_job_states.go`, `finish.go`,
//! `stack_notification.go`; paths, methods and bodies checked against it). Where the
//! two disagree this client accepts both: the pause flag as `dispatch_paused` (docs) or `paused`
//! (client), any 2xx from finish (docs 200, the client's test server 204), and the default queue
//! as `_default` (client) or `__default__` (docs), trying the other when one is not found. It
//! always sends `exit_status` and `reservation_expiry_seconds` (the docs' default expiry is
//! 900 s, the client's comment says 300 s; the client drops an `exit_status` of 0).
//!
//! Rate limits are per endpoint and stack in a one-second window; a 429's `Retry-After`, or
//! `RateLimit-Remaining: 0` with `RateLimit-Reset`, closes that endpoint until then, and calls
//! meanwhile fail at once as [`StacksError::Throttled`] without reaching Buildkite.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::buildkite::{http_client, without_url};

/// What a Stacks call can meet.
#[derive(Debug, thiserror::Error)]
pub enum StacksError {
    #[error("Buildkite refused the agent token (HTTP {0}); the stacks mode needs a cluster agent token (bkct_…) in BUILDKITE_AGENT_TOKEN")]
    Unauthorized(u16),
    #[error("Buildkite refused to register the stack (HTTP 403: {0}); the organization's stack limit is reached; deregister unused stacks or use --source metrics")]
    StackLimit(String),
    #[error("Buildkite answered HTTP 404 to a {scope} call ({message}); a 404 to the listing registers the stack again (a rollout's last leader deregistered it); if the listing's 404 repeats, DISPATCHER_QUEUE is not a self-hosted queue of the token's cluster")]
    NotFound {
        scope: &'static str,
        message: String,
    },
    #[error("Buildkite asked to slow down {scope} calls; retrying after {}s", .wait.as_secs())]
    Throttled { scope: &'static str, wait: Duration },
    #[error("Buildkite rejected the {scope} call (HTTP {status}: {message})")]
    Rejected {
        scope: &'static str,
        status: u16,
        message: String,
    },
    #[error("Buildkite answered HTTP {status} to a {scope} call; retrying")]
    Status { scope: &'static str, status: u16 },
    #[error("cannot reach Buildkite at {endpoint}: {reason}; retrying")]
    Unreachable { endpoint: String, reason: String },
    #[error("Buildkite's {scope} answer was not understood ({why}); check that BUILDKITE_AGENT_ENDPOINT is Buildkite's agent API")]
    Invalid { scope: &'static str, why: String },
}

impl StacksError {
    /// A short name, for the API-error metric.
    pub fn name(&self) -> &'static str {
        match self {
            StacksError::Unauthorized(_) => "unauthorized",
            StacksError::StackLimit(_) => "stack-limit",
            StacksError::NotFound { .. } => "not-found",
            StacksError::Throttled { .. } => "throttled",
            StacksError::Rejected { .. } => "rejected",
            StacksError::Status { .. } => "status",
            StacksError::Unreachable { .. } => "unreachable",
            StacksError::Invalid { .. } => "invalid",
        }
    }
}

/// A job waiting in the queue, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ScheduledJob {
    pub id: String,
    #[serde(default)]
    pub priority: i64,
}

/// One listing: the first page of scheduled jobs, oldest first, and the queue's pause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub jobs: Vec<ScheduledJob>,
    pub paused: bool,
}

#[derive(Deserialize)]
struct ListAnswer {
    jobs: Vec<ScheduledJob>,
    #[serde(default)]
    cluster_queue: ClusterQueue,
}

#[derive(Default, Deserialize)]
struct ClusterQueue {
    // Both names, read apart: a serde alias would refuse an answer that sends both.
    /// The docs' name.
    #[serde(default)]
    dispatch_paused: Option<bool>,
    /// stacksapi's `ClusterQueue.Paused`.
    #[serde(default)]
    paused: Option<bool>,
}

impl ClusterQueue {
    fn paused(&self) -> bool {
        self.dispatch_paused.unwrap_or(false) || self.paused.unwrap_or(false)
    }
}

/// What a batch-reserve answered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Reservation {
    #[serde(default)]
    pub reserved: Vec<String>,
    #[serde(default)]
    pub not_reserved: Vec<String>,
}

/// The default queue's two spellings.
const DEFAULT_QUEUE_KEYS: [&str; 2] = ["_default", "__default__"];

/// How many jobs one listing, reserve or state call carries (the API's maximum).
pub const BATCH: usize = 1000;

pub struct StacksClient {
    http: reqwest::Client,
    endpoint: String,
    key: String,
    queue_key: Mutex<String>,
    /// `Token <token>`; never logged.
    authorization: String,
    /// Scopes closed by a rate limit, until when.
    closed: Mutex<HashMap<&'static str, Instant>>,
}

impl StacksClient {
    pub fn new(endpoint: &str, token: &str, key: &str, queue: &str) -> StacksClient {
        let http = http_client();
        StacksClient {
            http,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            key: key.to_string(),
            queue_key: Mutex::new(queue.to_string()),
            authorization: format!("Token {token}"),
            closed: Mutex::new(HashMap::new()),
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    fn queue_key(&self) -> String {
        self.queue_key.lock().unwrap().clone()
    }

    /// Registers (or updates) the stack; also the token's check. Idempotent.
    pub async fn register(&self, metadata: &HashMap<String, String>) -> Result<(), StacksError> {
        let body = json!({"key": self.key, "type": "custom", "queue_key": self.queue_key(),
            "metadata": metadata});
        self.call(
            "register",
            reqwest::Method::POST,
            "stacks/register".into(),
            Some(body),
        )
        .await
        .map(drop)
    }

    pub async fn deregister(&self) -> Result<(), StacksError> {
        let path = format!("{}/deregister", self.stack());
        self.call("default", reqwest::Method::POST, path, None)
            .await
            .map(drop)
    }

    /// The first page of the queue's scheduled jobs (the docs advise against walking pages, which
    /// are no snapshot) and its pause.
    pub async fn scheduled_jobs(&self, limit: usize) -> Result<Listing, StacksError> {
        let queue = self.queue_key();
        let path = format!(
            "{}/scheduled-jobs?queue_key={}&limit={}",
            self.stack(),
            escape(&queue),
            limit.clamp(1, BATCH)
        );
        let answer = self
            .call("list-scheduled-jobs", reqwest::Method::GET, path, None)
            .await;
        // The stack, or the queue under this spelling of the default one, is not known: the
        // next listing tries the other spelling (the 404's message is not a contract).
        let other = DEFAULT_QUEUE_KEYS.iter().find(|k| **k != queue);
        if let (Err(StacksError::NotFound { .. }), true, Some(other)) =
            (&answer, DEFAULT_QUEUE_KEYS.contains(&queue.as_str()), other)
        {
            *self.queue_key.lock().unwrap() = other.to_string();
        }
        let answer: ListAnswer = parse("list-scheduled-jobs", answer?)?;
        Ok(Listing {
            paused: answer.cluster_queue.paused(),
            jobs: answer.jobs,
        })
    }

    /// Reserves `jobs` (or extends this stack's reservation of them) for `expiry`.
    pub async fn reserve(
        &self,
        jobs: &[String],
        expiry: Duration,
    ) -> Result<Reservation, StacksError> {
        let path = format!("{}/scheduled-jobs/batch-reserve", self.stack());
        let body = json!({"job_uuids": jobs, "reservation_expiry_seconds": expiry.as_secs()});
        let answer = self
            .call("batch-reserve", reqwest::Method::PUT, path, Some(body))
            .await?;
        parse("batch-reserve", answer)
    }

    /// Each known job's state (`scheduled`, `reserved`, `running`, `canceled`, …).
    pub async fn states(&self, jobs: &[String]) -> Result<HashMap<String, String>, StacksError> {
        #[derive(Deserialize)]
        struct States {
            states: HashMap<String, String>,
        }
        let path = format!("{}/jobs/get-states", self.stack());
        let body = json!({"job_uuids": jobs});
        let answer = self
            .call(
                "batch-load-job-states",
                reqwest::Method::POST,
                path,
                Some(body),
            )
            .await?;
        parse::<States>("batch-load-job-states", answer).map(|s| s.states)
    }

    /// Finishes a job no agent will run, with `detail` on its timeline.
    pub async fn finish(
        &self,
        job: &str,
        exit_status: i32,
        detail: &str,
    ) -> Result<(), StacksError> {
        let path = format!("{}/jobs/{}/finish", self.stack(), escape(job));
        let body = json!({"exit_status": exit_status, "detail": detail});
        self.call("finish-job", reqwest::Method::POST, path, Some(body))
            .await
            .map(drop)
    }

    /// Notifications on jobs' timelines; how many Buildkite refused.
    pub async fn notify(&self, notes: &[(String, String)]) -> Result<usize, StacksError> {
        let notifications: Vec<Value> = notes
            .iter()
            .map(|(job, detail)| json!({"job_uuid": job, "detail": detail}))
            .collect();
        let path = format!("{}/notifications", self.stack());
        let body = json!({ "notifications": notifications });
        let answer = self
            .call(
                "stack-notification",
                reqwest::Method::POST,
                path,
                Some(body),
            )
            .await?;
        let refused = answer["errors"].as_array().map_or(0, |errors| {
            errors
                .iter()
                .map(|e| e["indexes"].as_array().map_or(1, Vec::len))
                .sum()
        });
        Ok(refused)
    }

    fn stack(&self) -> String {
        format!("stacks/{}", escape(&self.key))
    }

    /// One call: refused at once while its scope is closed; a 429 or an exhausted window closes
    /// it.
    async fn call(
        &self,
        scope: &'static str,
        method: reqwest::Method,
        path: String,
        body: Option<Value>,
    ) -> Result<Value, StacksError> {
        if let Some(until) = self.closed.lock().unwrap().get(scope) {
            let wait = until.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                return Err(StacksError::Throttled { scope, wait });
            }
        }
        let mut request = self
            .http
            .request(method, format!("{}/{path}", self.endpoint))
            .header("Authorization", &self.authorization)
            .header("Accept", "application/json");
        if let Some(body) = body {
            request = request
                .header("Content-Type", "application/json")
                .body(body.to_string());
        }
        let unreachable = |e: reqwest::Error| StacksError::Unreachable {
            endpoint: self.endpoint.clone(),
            reason: without_url(&e),
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status().as_u16();
        let wait = limit_wait(response.headers(), status);
        if let Some(wait) = wait {
            self.closed
                .lock()
                .unwrap()
                .insert(scope, Instant::now() + wait);
        }
        let text = response.bytes().await.map_err(unreachable)?;
        let answer: Value = serde_json::from_slice(&text).unwrap_or(Value::Null);
        let message = || {
            answer["message"]
                .as_str()
                .unwrap_or("no message")
                .chars()
                .take(300)
                .collect::<String>()
        };
        match status {
            200..=299 => Ok(answer),
            401 => Err(StacksError::Unauthorized(status)),
            403 if scope == "register" => Err(StacksError::StackLimit(message())),
            403 => Err(StacksError::Unauthorized(status)),
            404 => Err(StacksError::NotFound {
                scope,
                message: message(),
            }),
            429 => Err(StacksError::Throttled {
                scope,
                wait: wait.unwrap_or(Duration::from_secs(1)),
            }),
            400..=499 => Err(StacksError::Rejected {
                scope,
                status,
                message: message(),
            }),
            _ => Err(StacksError::Status { scope, status }),
        }
    }
}

/// How long a scope stays closed after this answer: a 429's `Retry-After` (else its
/// `RateLimit-Reset`, else a second), or `RateLimit-Reset` when `RateLimit-Remaining` is 0.
fn limit_wait(headers: &reqwest::header::HeaderMap, status: u16) -> Option<Duration> {
    let seconds = |name: &str| {
        let value = headers.get(name)?.to_str().ok()?.trim();
        value.parse::<f64>().ok().filter(|s| *s >= 0.0)
    };
    let reset = seconds("RateLimit-Reset");
    let wait = match status {
        429 => seconds("Retry-After").or(reset).unwrap_or(1.0),
        _ if seconds("RateLimit-Remaining") == Some(0.0) => reset?,
        _ => return None,
    };
    Some(Duration::from_secs_f64(wait.min(300.0)))
}

fn parse<T: serde::de::DeserializeOwned>(
    scope: &'static str,
    answer: Value,
) -> Result<T, StacksError> {
    serde_json::from_value(answer).map_err(|e| StacksError::Invalid {
        scope,
        why: e.to_string(),
    })
}

/// A path segment or query value escaped, dots included: Rails would read a dot as a format
/// (stacksapi `client.go`, `railsPathEscape`).
fn escape(segment: &str) -> String {
    let mut out = String::new();
    for byte in segment.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'~' => out.push(byte as char),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dots_and_slashes_are_escaped_for_rails() {
        assert_eq!(escape("ci.queue/x"), "ci%2Equeue%2Fx");
        assert_eq!(escape("_default"), "_default");
    }

    #[test]
    fn the_pause_is_read_under_either_name() {
        for (body, paused) in [
            (
                r#"{"jobs":[],"cluster_queue":{"id":"q","dispatch_paused":true}}"#,
                true,
            ),
            (
                r#"{"jobs":[],"cluster_queue":{"id":"q","paused":true}}"#,
                true,
            ),
            (
                r#"{"jobs":[],"cluster_queue":{"id":"q","dispatch_paused":false}}"#,
                false,
            ),
            (r#"{"jobs":[]}"#, false),
        ] {
            let answer: ListAnswer = serde_json::from_str(body).unwrap();
            assert_eq!(answer.cluster_queue.paused(), paused);
        }
    }

    #[test]
    fn a_spent_window_or_a_429_closes_the_scope() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("RateLimit-Remaining", "3".parse().unwrap());
        headers.insert("RateLimit-Reset", "1".parse().unwrap());
        assert_eq!(limit_wait(&headers, 200), None);
        headers.insert("RateLimit-Remaining", "0".parse().unwrap());
        assert_eq!(limit_wait(&headers, 200), Some(Duration::from_secs(1)));
        headers.insert("Retry-After", "7".parse().unwrap());
        assert_eq!(limit_wait(&headers, 429), Some(Duration::from_secs(7)));
    }
}
