//! The stand-in agent's side of Buildkite's agent API, used when `endpoint` is configured
//! (`--endpoint`, `BUILDKITE_AGENT_ENDPOINT` or the file) to an `http://` address, as the
//! scenarios' fake ([`crate::fake_buildkite`]) is. Modelled on buildkite/agent main 5c219808
//! (v4.0.0-beta.15-41): the requests of `api/agents.go`, `api/pings.go` and `api/jobs.go`, the
//! `Authorization: Token` header of `internal/agenthttp/auth.go`, and the retries of
//! `core/client.go`: register 10 attempts 5 s apart (a 4xx ends them), connect likewise,
//! disconnect 4 attempts 1 s apart, FinishJob up to 12; FinishJob's `ignore_agent_in_dispatches`
//! as `agent/agent_worker_action.go` sets it with `--disconnect-after-job` (an acquired job's
//! omits it: `AcquireAndRunJob` passes nil). The access token from registration is used from then
//! on. One acquire call (`api/jobs.go` `AcquireJob` with the headers `core/client.go` sends, and
//! that file's reading of the answer) is [`AgentApi::acquire`]; its retries are the agent's
//! ([`crate::standin_start`]).
//!
//! Not modelled: TLS (the agent's HTTPS endpoint), request headers and endpoints a ping can
//! change, ping actions (pause, disconnect), job log chunks, heartbeats.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::loopback::{http_exchange, http_with};

/// The version the stand-in claims, `BUILDKITE_STANDIN_VERSION` or v3.137.0.
pub fn version() -> String {
    std::env::var("BUILDKITE_STANDIN_VERSION").unwrap_or_else(|_| "3.137.0".into())
}

pub struct AgentApi {
    /// `host:port`.
    address: String,
    /// The endpoint's path, `/v3`.
    base: String,
    /// The registration token, then the access token.
    token: String,
    /// The ping interval Buildkite asked for.
    pub ping_interval: Duration,
}

/// A failed call: what the agent logs.
pub type ApiError = String;

/// One acquire call's outcome, as `core/client.go` `AcquireJob` sorts the answer (v3.137.0).
pub enum AcquireAnswer {
    /// 2xx: the job, with its environment.
    Acquired(BTreeMap<String, String>),
    /// 423 (`ErrJobLocked`, `locked`), 429, 5xx, no answer, or another non-4xx status: tried
    /// again, after the server's `Retry-After` if it sent one (423, 429 and 5xx only).
    Retry {
        locked: bool,
        retry_after: Option<Duration>,
        error: ApiError,
    },
    /// 422 (`ErrJobAcquisitionRejected`): taken, running, finished or cancelled; not retried.
    Rejected(ApiError),
    /// Any other 4xx (e.g. 404): not retried.
    Refused(ApiError),
}

impl AgentApi {
    /// An `http://host:port/path` endpoint; `None` for anything else (the stand-in cannot speak
    /// TLS, so an `https://` endpoint keeps the timer model).
    pub fn for_endpoint(endpoint: &str, token: &str) -> Option<AgentApi> {
        let rest = endpoint.strip_prefix("http://")?;
        let (address, base) = rest.split_once('/').unwrap_or((rest, ""));
        Some(AgentApi {
            address: address.to_string(),
            base: format!("/{}", base.trim_end_matches('/')),
            token: token.to_string(),
            ping_interval: Duration::from_secs(10),
        })
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, (u16, String)> {
        let body = body.map(|b| b.to_string());
        let (code, answer) = http_with(
            &self.address,
            method,
            &format!("{}/{path}", self.base),
            &format!("Authorization: Token {}\r\n", self.token),
            body.as_deref(),
        );
        match code {
            200..=299 => Ok(serde_json::from_str(&answer).unwrap_or(Value::Null)),
            0 => Err((0, format!("{method} {path}: no answer from the endpoint"))),
            _ => Err((code, format!("{method} {path}: {code} {}", answer.trim()))),
        }
    }

    /// `call`, retried `attempts` times `every` apart while the failure may pass (no answer,
    /// 429, 5xx), as roko's retriers in `core/client.go` do.
    fn retried(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        attempts: u32,
        every: Duration,
    ) -> Result<Value, ApiError> {
        let mut last = String::new();
        for attempt in 1..=attempts {
            match self.call(method, path, body.clone()) {
                Ok(v) => return Ok(v),
                Err((code, e)) if code == 0 || code == 429 || code >= 500 => {
                    println!("buildkite-agent (stand-in): {e} (attempt {attempt}/{attempts})");
                    last = e;
                    std::thread::sleep(every);
                }
                Err((_, e)) => return Err(e),
            }
        }
        Err(last)
    }

    /// Registers with `tags` and switches to the access token. An agent started to acquire one
    /// job registers with `ignore_in_dispatches` (`clicommand/agent_start.go`).
    pub fn register(
        &mut self,
        name: &str,
        tags: &[String],
        ignore_in_dispatches: bool,
    ) -> Result<(), ApiError> {
        let request = json!({"name": name, "hostname": name, "os": "linux", "arch": "amd64",
            "script_eval_enabled": true, "ignore_in_dispatches": ignore_in_dispatches,
            "version": version(), "build": "standin",
            "meta_data": tags, "pid": std::process::id(), "features": []});
        let answer = self
            .retried(
                "POST",
                "register",
                Some(request),
                10,
                Duration::from_secs(5),
            )
            .map_err(|e| format!("Failed to register agent: {e}"))?;
        self.token = answer["access_token"].as_str().unwrap_or_default().into();
        if let Some(seconds) = answer["ping_interval"].as_u64().filter(|s| *s > 0) {
            self.ping_interval = Duration::from_secs(seconds);
        }
        self.retried("POST", "connect", None, 10, Duration::from_secs(5))
            .map(drop)
    }

    /// A ping: the ID of the job assigned to this agent, if any. A failed ping is logged and
    /// counts as no job (the ping loop carries on).
    pub fn ping(&self) -> Option<String> {
        match self.call("GET", "ping", None) {
            Ok(answer) => answer["job"]["id"].as_str().map(String::from),
            Err((_, e)) => {
                println!("buildkite-agent (stand-in): failed to ping: {e}");
                None
            }
        }
    }

    /// Accepts `job`: its environment, as Buildkite sends it.
    pub fn accept(&self, job: &str) -> Result<BTreeMap<String, String>, ApiError> {
        let answer = self.retried(
            "PUT",
            &format!("jobs/{job}/accept"),
            None,
            30,
            Duration::from_secs(5),
        )?;
        serde_json::from_value(answer["env"].clone())
            .map_err(|e| format!("the accepted job's env is not an object of strings: {e}"))
    }

    /// One `PUT jobs/<id>/acquire`, attempt `attempt` (from 0) of the agent's retrier.
    pub fn acquire(&self, job: &str, attempt: u32) -> AcquireAnswer {
        let path = format!("jobs/{job}/acquire");
        let headers = format!(
            "Authorization: Token {}\r\nX-Buildkite-Lock-Acquire-Job: 1\r\nX-Buildkite-Backoff-Sequence: {attempt}\r\n",
            self.token
        );
        let (code, head, answer) = http_exchange(
            &self.address,
            "PUT",
            &format!("{}/{path}", self.base),
            &headers,
            None,
        );
        let error = match code {
            0 => format!("PUT {path}: no answer from the endpoint"),
            _ => format!("PUT {path}: {code} {}", answer.trim()),
        };
        let retry_after = head
            .lines()
            .find_map(|l| l.strip_prefix("Retry-After:"))
            .and_then(|s| s.trim().parse::<f64>().ok())
            .map(Duration::from_secs_f64);
        match code {
            200..=299 => match serde_json::from_str::<Value>(&answer)
                .ok()
                .and_then(|a| serde_json::from_value(a["env"].clone()).ok())
            {
                Some(env) => AcquireAnswer::Acquired(env),
                None => AcquireAnswer::Refused(format!("the acquired job has no env: {answer}")),
            },
            423 | 429 | 500.. => AcquireAnswer::Retry {
                locked: code == 423,
                retry_after,
                error,
            },
            422 => AcquireAnswer::Rejected(error),
            400..=499 => AcquireAnswer::Refused(error),
            // No answer (a network error), or a status no case names: tried again.
            _ => AcquireAnswer::Retry {
                locked: false,
                retry_after: None,
                error,
            },
        }
    }

    pub fn start(&self, job: &str) -> Result<(), ApiError> {
        let now = json!({"started_at": ""});
        self.retried(
            "PUT",
            &format!("jobs/{job}/start"),
            Some(now),
            10,
            Duration::from_secs(5),
        )
        .map(drop)
    }

    /// FinishJob; `ignore_agent_in_dispatches` as `--disconnect-after-job` sends it, omitted for
    /// an acquired job.
    pub fn finish(&self, job: &str, exit_status: i32, acquired: bool) -> Result<(), ApiError> {
        let mut request = json!({"exit_status": exit_status.to_string(), "chunks_failed_count": 0});
        if !acquired {
            request["ignore_agent_in_dispatches"] = json!(true);
        }
        self.retried(
            "PUT",
            &format!("jobs/{job}/finish"),
            Some(request),
            12,
            Duration::from_secs(1),
        )
        .map(drop)
    }

    pub fn disconnect(&self) {
        if let Err(e) = self.retried("POST", "disconnect", None, 4, Duration::from_secs(1)) {
            println!("buildkite-agent (stand-in): There was an error sending the disconnect API call to Buildkite: {e}");
        }
    }
}
