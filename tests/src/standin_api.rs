//! The stand-in agent's side of Buildkite's agent API, used when `endpoint` is configured
//! (`--endpoint`, `BUILDKITE_AGENT_ENDPOINT` or the file) to an `http://` address, as the
//! scenarios' fake ([`crate::fake_buildkite`]) is. Modelled on buildkite/agent main 5c219808
//! (v4.0.0-beta.15-41): the requests of `api/agents.go`, `api/pings.go` and `api/jobs.go`, the
//! `Authorization: Token` header of `internal/agenthttp/auth.go`, and the retries of
//! `core/client.go`: register 10 attempts 5 s apart (a 4xx ends them), connect likewise,
//! disconnect 4 attempts 1 s apart, FinishJob up to 12; FinishJob's `ignore_agent_in_dispatches`
//! as `agent/agent_worker_action.go` sets it with `--disconnect-after-job`. The access token from
//! registration is used from then on.
//!
//! Not modelled: TLS (the agent's HTTPS endpoint), request headers and endpoints a ping can
//! change, ping actions (pause, disconnect), job log chunks, heartbeats.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::loopback::http_with;

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

    /// Registers with `tags` and switches to the access token.
    pub fn register(&mut self, name: &str, tags: &[String]) -> Result<(), ApiError> {
        let request = json!({"name": name, "hostname": name, "os": "linux", "arch": "amd64",
            "script_eval_enabled": true, "ignore_in_dispatches": false,
            "version": crate::standin_start::version(), "build": "standin",
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

    /// FinishJob, with `ignore_agent_in_dispatches` as `--disconnect-after-job` sends it.
    pub fn finish(&self, job: &str, exit_status: i32) -> Result<(), ApiError> {
        let request = json!({"exit_status": exit_status.to_string(), "chunks_failed_count": 0,
            "ignore_agent_in_dispatches": true});
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
