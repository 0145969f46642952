//! Buildkite's Stacks API, served by [`FakeBuildkite`] on the same listener, under `/v3/stacks/`,
//! over the same jobs as the agent lifecycle (so an agent's `PUT /v3/jobs/<id>/acquire` sees a
//! stack's reservations) and with the same cluster agent token (`Authorization: Token <token>`
//! as [`FakeBuildkite::start`] was given; anything else gets 401 `{"message"}`).
//!
//! It follows two sources:
//! - the Buildkite docs page `pages/apis/agent_api/stacks.md`, buildkite/docs `35cf0294` (2026-08,
//!   the page last changed by `ce7cc8ae1`), cited below as *the docs*;
//! - buildkite/stacksapi, the Go client, tag v1.0.1 (`649b3a070e2c319ccbdfd8fee706971dfe26d15a`,
//!   2026-02-12; its `version.go` still says v1.0.0): `client.go`, `register.go`,
//!   `scheduled_jobs.go` (list and batch-reserve), `get_job.go`, `get_job_states.go`,
//!   `finish.go`, `stack_notification.go`, `type.go` and the `httptest` servers of its
//!   `*_test.go`, cited as *stacksapi*.
//!
//! The endpoints (paths under `/v3`), as both sources have them:
//! - `POST /stacks/register` `{key, type, queue_key, metadata}`, all required: 422 when one is
//!   missing, `key` is not letters, digits, `_`, `-` up to 80 bytes, `type` is not
//!   kubernetes|elastic|custom, or `metadata` is not a flat string map (≤ 100 keys, keys ≤ 64,
//!   values ≤ 256 characters). 201 the first time, 200 when the key exists (also after a
//!   deregister, which it revives), `{id, organization_uuid, key, type, cluster_queue_key,
//!   metadata, last_connected_on, state: "connected"}`. The `queue_key` is not checked against
//!   the cluster's queues (the docs: the binding is not enforced).
//! - `POST /stacks/:key/deregister`: 204, no body; afterwards every call for the key but
//!   register is 404 `{"message": "Stack not found"}`, as is any call for a key never registered.
//! - `GET /stacks/:key/scheduled-jobs?queue_key&limit&after`: 400 without `queue_key`, 404 ("No
//!   self-hosted queue found") for a queue that is not the fake's; the fake's queue's jobs in
//!   state scheduled, oldest first, `{id, priority, agent_query_rules: ["queue=Q"],
//!   scheduled_at, pipeline: {slug, uuid}, build: {uuid, number, branch}, step: {key}}` (the
//!   nested objects always there, values null when the job's env lacks them:
//!   `BUILDKITE_PIPELINE_SLUG`, `BUILDKITE_PIPELINE_ID`, `BUILDKITE_BUILD_ID`,
//!   `BUILDKITE_BUILD_NUMBER`, `BUILDKITE_BRANCH`, `BUILDKITE_STEP_KEY`), with `page_info:
//!   {has_next_page, end_cursor}` and `cluster_queue: {id, <pause field>}`. Each list call is
//!   the stack's heartbeat ([`Stack::last_polled`]).
//! - `PUT /stacks/:key/scheduled-jobs/batch-reserve` `{job_uuids, reservation_expiry_seconds?}`:
//!   a scheduled job becomes reserved for that long, one this stack already holds is extended;
//!   anything else is `not_reserved`; 200 `{reserved, not_reserved}` even when none was.
//!   Reservations expire lazily: on any request to the fake, a reserved job past its time is
//!   scheduled again.
//! - `POST /stacks/:key/jobs/get-states` `{job_uuids}` → `{states: {uuid: state}}`, lower case.
//! - `GET /stacks/:key/jobs/:id` → `{id, env, command}` (`command` is the env's
//!   `BUILDKITE_COMMAND`, else empty); 404 for a job it does not know.
//! - `POST /stacks/:key/jobs/:id/finish` `{exit_status?, detail}`: exit status −1 when absent,
//!   `detail` required and ≤ 4096 bytes (else 422); the job is finished and keeps the detail.
//! - `POST /stacks/:key/notifications` `{notifications: [{job_uuid, detail, timestamp?}]}`:
//!   each stored on its job unless it fails a check, which goes in `errors: [{error,
//!   indexes}]`; 200 `{errors: []}` when all were stored.
//! - Rate limits per scope per stack key in a one-second sliding window, the docs' defaults
//!   (`list-scheduled-jobs` 10, `batch-reserve` 10, `show-job` 1000,
//!   `batch-load-job-states` 20, `finish-job` 100, `stack-notification` 200, `default` 10 for
//!   deregister); every Stacks response carries `RateLimit-Scope`, `RateLimit-Limit`,
//!   `RateLimit-Remaining` and `RateLimit-Reset`; over the limit, 429 `{message, scope, limit,
//!   current, reset}`.
//!
//! Where the two disagree, the fake takes both, and says which is the default:
//! - the default queue's key: the docs' `__default__` and stacksapi's `DefaultQueue`
//!   (`_default`) both name the fake's queue when it is called `default`;
//! - the pause field of `cluster_queue`: the docs' `dispatch_paused` by default, stacksapi's
//!   `paused` after [`FakeBuildkite::pause_field`]`("paused")`;
//! - the reservation's default expiry: the docs' 900 s (stacksapi's comment says 300 s); whether
//!   the request sent one is recorded ([`Reservation::expiry_sent`]);
//! - finish's success: the docs' 200 (body `{}`) by default, the stacksapi test server's 204
//!   after [`FakeBuildkite::finish_status`]`(204)`.
//!
//! Where both are silent, the fake chooses:
//! - `limit` defaults to 100 (the docs give no default; stacksapi says "a sensible value on the
//!   backend"); a `limit` that is not an integer in 1..=1000 is 400. `after` is the base64 of
//!   `job:<n>` (the position of the last job of the page); one that does not decode is 400.
//!   `end_cursor` is null on an empty page.
//! - register has the `default` scope (the docs' scope for what they do not list, 10/s), keyed
//!   by the body's `key`, so it shares its window with deregister.
//! - a 429 does not take a slot of the window; `RateLimit-Reset` is the whole seconds (rounded
//!   up) until the window's oldest request leaves it, 0 when the window is empty; a 429 also
//!   carries `Retry-After: <reset>`, because stacksapi's client (`client.go` `setRetryAfter`)
//!   honours it. The check order is: injected fault, route (404 for an unknown path, scope
//!   `default`), token (401, headers without taking a slot), rate limit, stack (404), body.
//! - batch-reserve and get-states: `job_uuids` not an array of strings, or more than 1000, is
//!   400; `reservation_expiry_seconds` that is not an integer in 1..=3600 (the docs' maximum) is
//!   400. A job reserved by another stack key is `not_reserved`; reserving is not limited to
//!   the stack's registered queue.
//! - get-states leaves out ids it does not know.
//! - finish: only a scheduled or reserved job (whichever stack reserved it) can be finished;
//!   any other state is 422, so a second finish is refused; an unknown job is 404; an
//!   `exit_status` that is not an integer is 422. The exit status is kept as a string (`"-1"`).
//! - notifications: more than 1000, or `notifications` not an array, is 400. The errors, each
//!   grouping the indexes that failed it, in order of first failure: "detail is required"
//!   (missing or empty), "detail is too long (maximum is 256 characters)" (characters, not
//!   bytes), "job not found", "job stack notification count exceeded" (the job has 100). The
//!   `timestamp` is not checked, nor the docs' 300 s after a job finished.
//! - the agent lifecycle: a reserved job is acquirable (by any agent; the acquire ends the
//!   reservation) and is never handed out by a ping; the metrics count it neither as scheduled
//!   nor as running. A canceling job's agent finish makes it canceled.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use serde_json::{json, Map, Value};

use super::{BuildkiteFault, FakeBuildkite, Job, JobState, State};
use crate::http_server::{percent_decode, Request};

/// A stack's hold on a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The stack key that reserved it.
    pub stack: String,
    pub until: Instant,
    /// The expiry the reservation (or its last extension) got, in seconds.
    pub expiry_seconds: u64,
    /// Whether the request sent `reservation_expiry_seconds` (else the default 900 applied).
    pub expiry_sent: bool,
}

/// One Stacks request, as it came and was answered.
#[derive(Debug, Clone)]
pub struct StackCall {
    pub method: String,
    /// The rate-limit scope of its endpoint (`default` for an unknown path).
    pub scope: &'static str,
    /// The status answered; 0 for an injected stall.
    pub status: u16,
    pub at: Instant,
    /// The request's body as JSON (`Null` when empty or not JSON).
    pub body: Value,
    /// The path and query, e.g. `/v3/stacks/k/scheduled-jobs?queue_key=q`.
    pub path: String,
}

/// A stack key, as registered.
#[derive(Debug, Clone)]
pub struct Stack {
    pub key: String,
    pub queue_key: String,
    pub type_: String,
    /// False after a deregister (until registered again).
    pub registered: bool,
    /// How many times it was registered.
    pub registrations: u32,
    pub metadata: BTreeMap<String, String>,
    /// When it last listed scheduled jobs (its heartbeat).
    pub last_polled: Option<Instant>,
}

/// The Stacks API's state inside the fake.
pub(crate) struct Stacks {
    stacks: Vec<Stack>,
    calls: Vec<StackCall>,
    faults: VecDeque<BuildkiteFault>,
    /// Requests let through in the last second, per `(scope, stack key)`.
    windows: HashMap<(&'static str, String), VecDeque<Instant>>,
    limits: HashMap<&'static str, u32>,
    paused: bool,
    pause_field: &'static str,
    finish_status: u16,
}

impl Default for Stacks {
    fn default() -> Self {
        Stacks {
            stacks: Vec::new(),
            calls: Vec::new(),
            faults: VecDeque::new(),
            windows: HashMap::new(),
            limits: HashMap::new(),
            paused: false,
            pause_field: "dispatch_paused",
            finish_status: 200,
        }
    }
}

/// The docs' default limits, per second.
fn default_limit(scope: &str) -> u32 {
    match scope {
        "list-scheduled-jobs" | "batch-reserve" => 10,
        "show-job" => 1000,
        "batch-load-job-states" => 20,
        "finish-job" => 100,
        "stack-notification" => 200,
        _ => 10,
    }
}

impl FakeBuildkite {
    /// Pauses (or resumes) dispatch on the fake's queue, as the list's `cluster_queue` says.
    pub fn pause(&self, paused: bool) {
        self.state.lock().unwrap().stacks.paused = paused;
    }

    /// The name of the list's pause field: `"dispatch_paused"` (the docs, default) or
    /// `"paused"` (stacksapi).
    pub fn pause_field(&self, name: &'static str) {
        self.state.lock().unwrap().stacks.pause_field = name;
    }

    /// A stack's successful finish answers this: 200 (the docs, default) or 204 (stacksapi).
    pub fn finish_status(&self, code: u16) {
        self.state.lock().unwrap().stacks.finish_status = code;
    }

    /// Lowers (or raises) one scope's limit per second, for every stack key.
    pub fn rate_limit(&self, scope: &'static str, per_second: u32) {
        self.state
            .lock()
            .unwrap()
            .stacks
            .limits
            .insert(scope, per_second);
    }

    /// Faults for the next Stacks calls (any endpoint), before they are processed: 429 (with
    /// `Retry-After: 1` and the rate-limit headers), any other status, or a stall.
    pub fn inject_stacks(&self, fault: BuildkiteFault, times: usize) {
        let mut state = self.state.lock().unwrap();
        state
            .stacks
            .faults
            .extend(std::iter::repeat_n(fault, times));
    }

    /// Every Stacks request, in order.
    pub fn stack_calls(&self) -> Vec<StackCall> {
        self.state.lock().unwrap().stacks.calls.clone()
    }

    /// Every stack key ever registered, in order of first registration.
    pub fn stacks(&self) -> Vec<Stack> {
        self.state.lock().unwrap().stacks.stacks.clone()
    }
}

/// What to send back.
pub(crate) enum StacksReply {
    Respond {
        code: u16,
        /// `None`: no body (204).
        body: Option<Value>,
        headers: String,
    },
    Stall(Duration),
}

pub(crate) fn write_reply(reply: StacksReply, out: &mut TcpStream) -> std::io::Result<bool> {
    match reply {
        StacksReply::Stall(wait) => {
            std::thread::sleep(wait);
            Ok(false)
        }
        StacksReply::Respond {
            code,
            body: None,
            headers,
        } => {
            write!(out, "HTTP/1.1 {code} X\r\n{headers}\r\n")?;
            Ok(true)
        }
        StacksReply::Respond {
            code,
            body: Some(body),
            headers,
        } => {
            let text = body.to_string();
            write!(
                out,
                "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{headers}\r\n{text}",
                text.len()
            )?;
            Ok(true)
        }
    }
}

/// The endpoint a request is for.
enum Route {
    Register,
    Deregister(String),
    List(String),
    Reserve(String),
    States(String),
    ShowJob(String, String),
    Finish(String, String),
    Notify(String),
    Unknown,
}

impl Route {
    fn of(request: &Request) -> Route {
        let Some(rest) = request.path.strip_prefix("/v3/stacks/") else {
            return Route::Unknown;
        };
        let segments: Vec<String> = rest.split('/').map(percent_decode).collect();
        let s: Vec<&str> = segments.iter().map(String::as_str).collect();
        let key = |k: &str| k.to_string();
        match (request.method.as_str(), s.as_slice()) {
            ("POST", ["register"]) => Route::Register,
            ("POST", [k, "deregister"]) => Route::Deregister(key(k)),
            ("GET", [k, "scheduled-jobs"]) => Route::List(key(k)),
            ("PUT", [k, "scheduled-jobs", "batch-reserve"]) => Route::Reserve(key(k)),
            ("POST", [k, "jobs", "get-states"]) => Route::States(key(k)),
            ("GET", [k, "jobs", id]) => Route::ShowJob(key(k), id.to_string()),
            ("POST", [k, "jobs", id, "finish"]) => Route::Finish(key(k), id.to_string()),
            ("POST", [k, "notifications"]) => Route::Notify(key(k)),
            _ => Route::Unknown,
        }
    }

    fn scope(&self) -> &'static str {
        match self {
            Route::List(_) => "list-scheduled-jobs",
            Route::Reserve(_) => "batch-reserve",
            Route::ShowJob(..) => "show-job",
            Route::States(_) => "batch-load-job-states",
            Route::Finish(..) => "finish-job",
            Route::Notify(_) => "stack-notification",
            Route::Register | Route::Deregister(_) | Route::Unknown => "default",
        }
    }

    /// The stack key the call is for (register's is in its body).
    fn key(&self, body: &Value) -> String {
        match self {
            Route::Register => body["key"].as_str().unwrap_or("").to_string(),
            Route::Deregister(k)
            | Route::List(k)
            | Route::Reserve(k)
            | Route::States(k)
            | Route::ShowJob(k, _)
            | Route::Finish(k, _)
            | Route::Notify(k) => k.clone(),
            Route::Unknown => String::new(),
        }
    }
}

/// Answers one request under `/v3/stacks/`, and records it.
pub(crate) fn answer(s: &mut State, request: &Request, auth: &str, now: Instant) -> StacksReply {
    let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
    let route = Route::of(request);
    let scope = route.scope();
    let key = route.key(&body);
    let reply = respond(s, request, &route, &body, &key, auth, now);
    let status = match &reply {
        StacksReply::Respond { code, .. } => *code,
        StacksReply::Stall(_) => 0,
    };
    let path = if request.query.is_empty() {
        request.path.clone()
    } else {
        format!("{}?{}", request.path, request.query)
    };
    s.stacks.calls.push(StackCall {
        method: request.method.clone(),
        scope,
        status,
        at: now,
        body,
        path,
    });
    reply
}

/// A JSON answer with the rate-limit headers.
fn reply(code: u16, body: Value, headers: &str) -> StacksReply {
    StacksReply::Respond {
        code,
        body: Some(body),
        headers: headers.to_string(),
    }
}

fn message(code: u16, text: &str, headers: &str) -> StacksReply {
    reply(code, json!({ "message": text }), headers)
}

fn respond(
    s: &mut State,
    request: &Request,
    route: &Route,
    body: &Value,
    key: &str,
    auth: &str,
    now: Instant,
) -> StacksReply {
    let scope = route.scope();
    let limit = s
        .stacks
        .limits
        .get(scope)
        .copied()
        .unwrap_or_else(|| default_limit(scope));
    let window = s
        .stacks
        .windows
        .entry((scope, key.to_string()))
        .or_default();
    while window
        .front()
        .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
    {
        window.pop_front();
    }
    let reset = window.front().map_or(0, |t| {
        let left = Duration::from_secs(1).saturating_sub(now.duration_since(*t));
        left.as_millis().div_ceil(1000) as u64
    });
    let used = window.len() as u32;
    let headers = |remaining: u32, reset: u64| {
        format!(
            "RateLimit-Scope: {scope}\r\nRateLimit-Limit: {limit}\r\nRateLimit-Remaining: {remaining}\r\nRateLimit-Reset: {reset}\r\n"
        )
    };

    if let Some(fault) = s.stacks.faults.pop_front() {
        return match fault {
            BuildkiteFault::Stall(wait) => StacksReply::Stall(wait),
            BuildkiteFault::Status(429) => reply(
                429,
                json!({"message": "You have exceeded your API rate limit. Please wait 1 seconds before making more requests.",
                       "scope": scope, "limit": limit, "current": limit + 1, "reset": 1}),
                &format!("{}Retry-After: 1\r\n", headers(0, 1)),
            ),
            BuildkiteFault::Status(code) => message(
                code,
                "injected",
                &headers(limit.saturating_sub(used), reset),
            ),
            BuildkiteFault::Answer(text) => reply(
                200,
                json!(text),
                &headers(limit.saturating_sub(used), reset),
            ),
        };
    }
    if matches!(route, Route::Unknown) {
        return message(
            404,
            "Not Found",
            &headers(limit.saturating_sub(used), reset),
        );
    }
    if auth != format!("Token {}", s.token) {
        return message(
            401,
            "Invalid or missing agent token",
            &headers(limit.saturating_sub(used), reset),
        );
    }
    if used >= limit {
        let reset = reset.max(1);
        return reply(
            429,
            json!({"message": format!("You have exceeded your API rate limit. Please wait {reset} seconds before making more requests."),
                   "scope": scope, "limit": limit, "current": used + 1, "reset": reset}),
            &format!("{}Retry-After: {reset}\r\n", headers(0, reset)),
        );
    }
    window.push_back(now);
    let reset = window.front().map_or(1, |t| {
        let left = Duration::from_secs(1).saturating_sub(now.duration_since(*t));
        left.as_millis().div_ceil(1000).max(1) as u64
    });
    let headers = headers(limit - used - 1, reset);
    let h = headers.as_str();

    if let Route::Register = route {
        return register(s, body, h);
    }
    let known = s
        .stacks
        .stacks
        .iter()
        .any(|st| st.key == key && st.registered);
    if !known {
        return message(404, "Stack not found", h);
    }
    match route {
        Route::Deregister(_) => {
            if let Some(st) = s.stacks.stacks.iter_mut().find(|st| st.key == key) {
                st.registered = false;
            }
            StacksReply::Respond {
                code: 204,
                body: None,
                headers: headers.clone(),
            }
        }
        Route::List(_) => list(s, key, &request.query, now, h),
        Route::Reserve(_) => reserve(s, key, body, now, h),
        Route::States(_) => {
            let ids = match job_uuids(body) {
                Ok(ids) => ids,
                Err(text) => return message(400, &text, h),
            };
            let states: Map<String, Value> = ids
                .iter()
                .filter_map(|id| {
                    let job = s.jobs.iter().find(|j| &j.id == id)?;
                    Some((id.clone(), json!(job.state.name())))
                })
                .collect();
            reply(200, json!({ "states": states }), h)
        }
        Route::ShowJob(_, id) => match s.jobs.iter().find(|j| &j.id == id) {
            Some(job) => {
                let command = job
                    .env
                    .get("BUILDKITE_COMMAND")
                    .cloned()
                    .unwrap_or_default();
                reply(
                    200,
                    json!({"id": job.id, "env": job.env, "command": command}),
                    h,
                )
            }
            None => message(404, "Job not found", h),
        },
        Route::Finish(_, id) => finish(s, id, body, h),
        Route::Notify(_) => notify(s, body, h),
        Route::Register | Route::Unknown => unreachable!("answered above"),
    }
}

fn register(s: &mut State, body: &Value, h: &str) -> StacksReply {
    let key = body["key"].as_str().unwrap_or("");
    let type_ = body["type"].as_str().unwrap_or("");
    let queue_key = body["queue_key"].as_str().unwrap_or("");
    let invalid = |text: &str| message(422, text, h);
    if key.is_empty() || type_.is_empty() || queue_key.is_empty() || !body["metadata"].is_object() {
        return invalid("key, type, queue_key and metadata are required");
    }
    if key.len() > 80
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return invalid("key must be letters, digits, underscores and dashes, at most 80 bytes");
    }
    if !matches!(type_, "kubernetes" | "elastic" | "custom") {
        return invalid("type must be one of kubernetes, elastic, custom");
    }
    let map = body["metadata"].as_object().unwrap();
    let mut metadata = BTreeMap::new();
    for (k, v) in map {
        match v.as_str() {
            Some(v) if k.chars().count() <= 64 && v.chars().count() <= 256 => {
                metadata.insert(k.clone(), v.to_string());
            }
            _ => {
                return invalid(
                    "metadata must be a flat object of strings (keys at most 64, values at most 256 characters)",
                )
            }
        }
    }
    if metadata.len() > 100 {
        return invalid("metadata may have at most 100 keys");
    }
    let index = s.stacks.stacks.iter().position(|st| st.key == key);
    let code = if index.is_some() { 200 } else { 201 };
    let index = index.unwrap_or_else(|| {
        s.stacks.stacks.push(Stack {
            key: key.to_string(),
            queue_key: String::new(),
            type_: String::new(),
            registered: false,
            registrations: 0,
            metadata: BTreeMap::new(),
            last_polled: None,
        });
        s.stacks.stacks.len() - 1
    });
    let stack = &mut s.stacks.stacks[index];
    stack.queue_key = queue_key.to_string();
    stack.type_ = type_.to_string();
    stack.registered = true;
    stack.registrations += 1;
    stack.metadata = metadata;
    let answer = json!({
        "id": format!("0199aaaa-0000-7000-8000-{:012}", index + 1),
        "organization_uuid": "0199aaaa-0000-7000-8000-acme00000000",
        "key": stack.key,
        "type": stack.type_,
        "cluster_queue_key": stack.queue_key,
        "metadata": stack.metadata,
        "last_connected_on": rfc3339(SystemTime::now()),
        "state": "connected",
    });
    reply(code, answer, h)
}

fn list(s: &mut State, key: &str, query: &str, now: Instant, h: &str) -> StacksReply {
    let params: BTreeMap<String, String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let Some(queue_key) = params.get("queue_key").filter(|q| !q.is_empty()) else {
        return message(400, "queue_key is required", h);
    };
    let default_alias =
        s.queue == "default" && matches!(queue_key.as_str(), "_default" | "__default__");
    if *queue_key != s.queue && !default_alias {
        return message(404, "No self-hosted queue found", h);
    }
    let limit = match params.get("limit") {
        None => 100,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => n,
            _ => return message(400, "limit must be a positive integer, at most 1000", h),
        },
    };
    let after = match params.get("after").filter(|a| !a.is_empty()) {
        None => None,
        Some(cursor) => match decode_cursor(cursor) {
            Some(n) => Some(n),
            None => return message(400, "after is not a valid cursor", h),
        },
    };
    if let Some(stack) = s.stacks.stacks.iter_mut().find(|st| st.key == key) {
        stack.last_polled = Some(now);
    }
    let queue = s.queue.clone();
    let eligible: Vec<(usize, &Job)> = s
        .jobs
        .iter()
        .enumerate()
        .filter(|(n, j)| {
            j.queue == queue && j.state == JobState::Scheduled && after.is_none_or(|a| *n > a)
        })
        .collect();
    let page = &eligible[..eligible.len().min(limit)];
    let jobs: Vec<Value> = page.iter().map(|(_, j)| listed(j)).collect();
    let end_cursor = page.last().map(|(n, _)| {
        Value::String(base64::engine::general_purpose::STANDARD.encode(format!("job:{n}")))
    });
    let mut cluster_queue = Map::new();
    cluster_queue.insert(
        "id".into(),
        json!(format!("0199bbbb-0000-7000-8000-{:0>12.12}", queue)),
    );
    cluster_queue.insert(s.stacks.pause_field.into(), json!(s.stacks.paused));
    reply(
        200,
        json!({
            "jobs": jobs,
            "page_info": {"has_next_page": eligible.len() > page.len(),
                          "end_cursor": end_cursor.unwrap_or(Value::Null)},
            "cluster_queue": cluster_queue,
        }),
        h,
    )
}

fn decode_cursor(cursor: &str) -> Option<usize> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(cursor)
        .ok()?;
    String::from_utf8(bytes)
        .ok()?
        .strip_prefix("job:")?
        .parse()
        .ok()
}

/// A job as the list shows it.
fn listed(job: &Job) -> Value {
    let env = |name: &str| job.env.get(name).map_or(Value::Null, |v| json!(v));
    let number = job
        .env
        .get("BUILDKITE_BUILD_NUMBER")
        .and_then(|n| n.parse::<i64>().ok())
        .map_or(Value::Null, |n| json!(n));
    json!({
        "id": job.id,
        "priority": job.priority,
        "agent_query_rules": [format!("queue={}", job.queue)],
        "scheduled_at": rfc3339(job.scheduled_at),
        "pipeline": {"slug": env("BUILDKITE_PIPELINE_SLUG"), "uuid": env("BUILDKITE_PIPELINE_ID")},
        "build": {"uuid": env("BUILDKITE_BUILD_ID"), "number": number,
                  "branch": env("BUILDKITE_BRANCH")},
        "step": {"key": env("BUILDKITE_STEP_KEY")},
    })
}

/// `job_uuids`: an array of at most 1000 strings.
fn job_uuids(body: &Value) -> Result<Vec<String>, String> {
    let Some(ids) = body["job_uuids"].as_array() else {
        return Err("job_uuids must be an array".into());
    };
    if ids.len() > 1000 {
        return Err("job_uuids may have at most 1000 entries".into());
    }
    ids.iter()
        .map(|id| id.as_str().map(String::from))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| "job_uuids must be an array of strings".into())
}

fn reserve(s: &mut State, key: &str, body: &Value, now: Instant, h: &str) -> StacksReply {
    let ids = match job_uuids(body) {
        Ok(ids) => ids,
        Err(text) => return message(400, &text, h),
    };
    let sent = &body["reservation_expiry_seconds"];
    let (expiry, expiry_sent) = if sent.is_null() {
        (900, false)
    } else {
        match sent.as_u64() {
            Some(n) if (1..=3600).contains(&n) => (n, true),
            _ => {
                return message(
                    400,
                    "reservation_expiry_seconds must be a positive integer, at most 3600",
                    h,
                )
            }
        }
    };
    let (mut reserved, mut not_reserved) = (Vec::new(), Vec::new());
    for id in ids {
        let job = s.jobs.iter_mut().find(|j| j.id == id);
        let ours = |j: &Job| j.reservation.as_ref().is_some_and(|r| r.stack == key);
        match job {
            Some(job)
                if job.state == JobState::Scheduled
                    || (job.state == JobState::Reserved && ours(job)) =>
            {
                job.state = JobState::Reserved;
                job.reservation = Some(Reservation {
                    stack: key.to_string(),
                    until: now + Duration::from_secs(expiry),
                    expiry_seconds: expiry,
                    expiry_sent,
                });
                reserved.push(id);
            }
            _ => not_reserved.push(id),
        }
    }
    reply(
        200,
        json!({"reserved": reserved, "not_reserved": not_reserved}),
        h,
    )
}

fn finish(s: &mut State, id: &str, body: &Value, h: &str) -> StacksReply {
    let exit_status = match &body["exit_status"] {
        Value::Null => -1,
        v => match v.as_i64() {
            Some(n) => n,
            None => return message(422, "exit_status must be an integer", h),
        },
    };
    let Some(detail) = body["detail"].as_str() else {
        return message(422, "detail is required", h);
    };
    if detail.len() > 4096 {
        return message(422, "detail is too long (maximum is 4096 bytes)", h);
    }
    let Some(job) = s.jobs.iter_mut().find(|j| j.id == id) else {
        return message(404, "Job not found", h);
    };
    if !matches!(job.state, JobState::Scheduled | JobState::Reserved) {
        let text = format!("The job is {} and cannot be finished", job.state.name());
        return message(422, &text, h);
    }
    job.state = JobState::Finished;
    job.reservation = None;
    job.exit_status = Some(exit_status.to_string());
    job.finish_detail = Some(detail.to_string());
    match s.stacks.finish_status {
        204 => StacksReply::Respond {
            code: 204,
            body: None,
            headers: h.to_string(),
        },
        code => reply(code, json!({}), h),
    }
}

fn notify(s: &mut State, body: &Value, h: &str) -> StacksReply {
    let Some(notifications) = body["notifications"].as_array() else {
        return message(400, "notifications must be an array", h);
    };
    if notifications.len() > 1000 {
        return message(400, "notifications may have at most 1000 entries", h);
    }
    let mut errors: Vec<(&'static str, Vec<usize>)> = Vec::new();
    for (i, n) in notifications.iter().enumerate() {
        let detail = n["detail"].as_str().unwrap_or("");
        let id = n["job_uuid"].as_str().unwrap_or("");
        let job = s.jobs.iter_mut().find(|j| j.id == id);
        let error = if detail.is_empty() {
            Some("detail is required")
        } else if detail.chars().count() > 256 {
            Some("detail is too long (maximum is 256 characters)")
        } else {
            match job {
                None => Some("job not found"),
                Some(job) if job.notifications.len() >= 100 => {
                    Some("job stack notification count exceeded")
                }
                Some(job) => {
                    job.notifications.push(detail.to_string());
                    None
                }
            }
        };
        if let Some(error) = error {
            match errors.iter_mut().find(|(e, _)| *e == error) {
                Some((_, indexes)) => indexes.push(i),
                None => errors.push((error, vec![i])),
            }
        }
    }
    let errors: Vec<Value> = errors
        .into_iter()
        .map(|(error, indexes)| json!({"error": error, "indexes": indexes}))
        .collect();
    reply(200, json!({ "errors": errors }), h)
}

/// `2026-08-21T12:00:00.000Z`.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
