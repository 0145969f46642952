//! The fake Buildkite's Stacks API (`tests/src/fake_buildkite/stacks.rs`) against its contract, over
//! plain HTTP: the Buildkite docs' `pages/apis/agent_api/stacks.md` (buildkite/docs 35cf0294)
//! and buildkite/stacksapi v1.0.1, with the fake's own choices where they are silent.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use stateless_e2e::fake_buildkite::{BuildkiteFault, FakeBuildkite, JobState};
use stateless_e2e::loopback::http_exchange;

const TOKEN: &str = "bkct_fake-cluster-token";
const QUEUE: &str = "builders";
const KEY: &str = "stateless-dispatcher";

struct Api {
    buildkite: FakeBuildkite,
    address: String,
}

/// A response: status, JSON body (`Null` when empty) and header lines.
struct Answer {
    code: u16,
    body: Value,
    head: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

impl Api {
    /// A fake Buildkite serving `queue`.
    fn on(queue: &str) -> Api {
        let buildkite = FakeBuildkite::start(TOKEN, queue);
        let address = buildkite
            .endpoint()
            .trim_start_matches("http://")
            .trim_end_matches("/v3")
            .to_string();
        Api { buildkite, address }
    }

    fn new() -> Api {
        Api::on(QUEUE)
    }

    /// A fake with `KEY` registered for `QUEUE`.
    fn registered() -> Api {
        let api = Api::new();
        assert_eq!(api.register(KEY).code, 201);
        api
    }

    fn call_with(&self, token: &str, method: &str, path: &str, body: Option<Value>) -> Answer {
        let text = body.map(|b| b.to_string());
        let (code, head, body) = http_exchange(
            &self.address,
            method,
            &format!("/v3{path}"),
            &format!("Authorization: Token {token}\r\n"),
            text.as_deref(),
        );
        let body = serde_json::from_str(&body).unwrap_or(Value::Null);
        Answer { code, body, head }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        self.call_with(TOKEN, method, path, body)
    }

    fn register(&self, key: &str) -> Answer {
        self.call(
            "POST",
            "/stacks/register",
            Some(json!({"key": key, "type": "custom", "queue_key": QUEUE,
                        "metadata": {"version": "1.0.0"}})),
        )
    }

    fn list(&self, query: &str) -> Answer {
        self.call(
            "GET",
            &format!("/stacks/{KEY}/scheduled-jobs?{query}"),
            None,
        )
    }

    fn listed_ids(&self) -> Vec<String> {
        let a = self.list(&format!("queue_key={QUEUE}"));
        assert_eq!(a.code, 200, "{}", a.body);
        ids(&a.body["jobs"])
    }

    fn reserve(&self, key: &str, body: Value) -> Answer {
        self.call(
            "PUT",
            &format!("/stacks/{key}/scheduled-jobs/batch-reserve"),
            Some(body),
        )
    }

    fn states(&self, ids: &[&str]) -> Answer {
        self.call(
            "POST",
            &format!("/stacks/{KEY}/jobs/get-states"),
            Some(json!({ "job_uuids": ids })),
        )
    }

    fn finish(&self, job: &str, body: Value) -> Answer {
        self.call(
            "POST",
            &format!("/stacks/{KEY}/jobs/{job}/finish"),
            Some(body),
        )
    }

    fn schedule(&self, count: usize) -> Vec<String> {
        self.buildkite
            .schedule_with_priority(QUEUE, count, &env(), 0)
    }

    fn state(&self, job: &str) -> JobState {
        self.buildkite
            .jobs()
            .iter()
            .find(|j| j.id == job)
            .unwrap()
            .state
    }
}

fn env() -> BTreeMap<String, String> {
    [
        ("BUILDKITE_PIPELINE_SLUG", "widgets"),
        (
            "BUILDKITE_PIPELINE_ID",
            "0190aaaa-0000-7000-8000-000000000001",
        ),
        ("BUILDKITE_BUILD_ID", "0190bbbb-0000-7000-8000-000000000001"),
        ("BUILDKITE_BUILD_NUMBER", "42"),
        ("BUILDKITE_BRANCH", "main"),
        ("BUILDKITE_STEP_KEY", "test"),
        ("BUILDKITE_COMMAND", "make test"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn ids(jobs: &Value) -> Vec<String> {
    jobs.as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_stack_registers_with_201_then_200_and_deregistering_hides_it_until_it_registers_again() {
    let api = Api::new();

    let first = api.register(KEY);
    assert_eq!(first.code, 201, "{}", first.body);
    assert_eq!(first.body["key"], KEY);
    assert_eq!(first.body["type"], "custom");
    assert_eq!(first.body["cluster_queue_key"], QUEUE);
    assert_eq!(first.body["metadata"], json!({"version": "1.0.0"}));
    assert_eq!(first.body["state"], "connected");
    for field in ["id", "organization_uuid", "last_connected_on"] {
        assert!(first.body[field].is_string(), "{field}: {}", first.body);
    }
    let again = api.register(KEY);
    assert_eq!(again.code, 200);
    assert_eq!(again.body["id"], first.body["id"]);

    let gone = api.call("POST", &format!("/stacks/{KEY}/deregister"), None);
    assert_eq!(gone.code, 204);
    assert!(gone.body.is_null());
    assert!(!api.buildkite.stacks()[0].registered);
    let listed = api.list(&format!("queue_key={QUEUE}"));
    assert_eq!(listed.code, 404);
    assert_eq!(listed.body["message"], "Stack not found");
    let twice = api.call("POST", &format!("/stacks/{KEY}/deregister"), None);
    assert_eq!(twice.code, 404);

    assert_eq!(api.register(KEY).code, 200);
    assert_eq!(api.list(&format!("queue_key={QUEUE}")).code, 200);
    let stacks = api.buildkite.stacks();
    assert_eq!(stacks.len(), 1);
    assert!(stacks[0].registered);
    assert_eq!(stacks[0].registrations, 3);
    assert_eq!(stacks[0].type_, "custom");
    assert_eq!(stacks[0].queue_key, QUEUE);
}

#[test]
fn a_key_never_registered_is_not_found() {
    let api = Api::new();
    let a = api.call("POST", "/stacks/nobody/deregister", None);
    assert_eq!(a.code, 404);
    assert_eq!(a.body["message"], "Stack not found");
}

#[test]
fn register_refuses_a_missing_field_a_bad_key_or_an_unknown_type_with_422() {
    let api = Api::new();
    let good = json!({"key": KEY, "type": "custom", "queue_key": QUEUE, "metadata": {}});
    for field in ["key", "type", "queue_key", "metadata"] {
        let mut body = good.clone();
        body.as_object_mut().unwrap().remove(field);
        let a = api.call("POST", "/stacks/register", Some(body));
        assert_eq!(a.code, 422, "without {field}");
        assert!(a.body["message"].is_string());
    }
    for (field, value) in [
        ("key", json!("has.a.dot")),
        ("key", json!("x".repeat(81))),
        ("type", json!("serverless")),
        ("metadata", json!({"nested": {"no": "strings"}})),
    ] {
        let mut body = good.clone();
        body[field] = value;
        assert_eq!(
            api.call("POST", "/stacks/register", Some(body)).code,
            422,
            "{field}"
        );
    }
    let mut longest = good.clone();
    longest["key"] = json!("k".repeat(80));
    assert_eq!(
        api.call("POST", "/stacks/register", Some(longest)).code,
        201
    );
    assert_eq!(api.call("POST", "/stacks/register", Some(good)).code, 201);
}

#[test]
fn the_list_shows_the_queues_scheduled_jobs_oldest_first_with_their_metadata() {
    let api = Api::registered();
    let low = api.schedule(1);
    let high = api.buildkite.schedule_with_priority(QUEUE, 1, &env(), 5);
    api.buildkite.schedule("elsewhere", 1, &env());
    let canceled = api.schedule(1);
    api.buildkite.cancel(&canceled[0]);

    let a = api.list(&format!("queue_key={QUEUE}"));

    assert_eq!(a.code, 200, "{}", a.body);
    assert_eq!(ids(&a.body["jobs"]), vec![low[0].clone(), high[0].clone()]);
    let job = &a.body["jobs"][1];
    assert_eq!(job["priority"], 5);
    assert_eq!(job["agent_query_rules"], json!([format!("queue={QUEUE}")]));
    let at = job["scheduled_at"].as_str().unwrap();
    assert!(
        at.len() == 24 && at.ends_with('Z') && at.as_bytes()[10] == b'T',
        "{at}"
    );
    assert_eq!(
        job["pipeline"],
        json!({"slug": "widgets", "uuid": "0190aaaa-0000-7000-8000-000000000001"})
    );
    assert_eq!(
        job["build"],
        json!({"uuid": "0190bbbb-0000-7000-8000-000000000001", "number": 42, "branch": "main"})
    );
    assert_eq!(job["step"], json!({"key": "test"}));
    assert_eq!(
        a.body["page_info"],
        json!({"has_next_page": false, "end_cursor": a.body["page_info"]["end_cursor"]})
    );
    assert!(a.body["cluster_queue"]["id"].is_string());
    // The list is the heartbeat.
    assert!(api.buildkite.stacks()[0].last_polled.is_some());
    let calls = api.buildkite.stack_calls();
    let last = calls.last().unwrap();
    assert_eq!(
        (last.method.as_str(), last.scope, last.status),
        ("GET", "list-scheduled-jobs", 200)
    );
}

#[test]
fn the_list_says_dispatch_paused_by_default_and_paused_when_told_to_use_stacksapis_name() {
    let api = Api::registered();
    let query = format!("queue_key={QUEUE}");

    let queue = api.list(&query).body["cluster_queue"].clone();
    assert_eq!(queue["dispatch_paused"], false);
    assert!(queue.get("paused").is_none());

    api.buildkite.pause(true);
    assert_eq!(
        api.list(&query).body["cluster_queue"]["dispatch_paused"],
        true
    );

    api.buildkite.pause_field("paused");
    let queue = api.list(&query).body["cluster_queue"].clone();
    assert_eq!(queue["paused"], true);
    assert!(queue.get("dispatch_paused").is_none());
}

#[test]
fn both_default_queue_keys_name_the_default_queue_and_other_queues_are_not_found() {
    let api = Api::on("default");
    assert_eq!(api.register(KEY).code, 201);
    let job = api
        .buildkite
        .schedule_with_priority("default", 1, &env(), 0);

    for key in ["default", "_default", "__default__"] {
        let a = api.list(&format!("queue_key={key}"));
        assert_eq!(a.code, 200, "{key}: {}", a.body);
        assert_eq!(ids(&a.body["jobs"]), job, "{key}");
    }
    let other = api.list("queue_key=gpu");
    assert_eq!(other.code, 404);
    assert_eq!(other.body["message"], "No self-hosted queue found");
    assert_eq!(api.list("").code, 400);
    assert_eq!(api.list("limit=5").code, 400);
}

#[test]
fn the_list_pages_with_an_opaque_cursor_and_refuses_a_limit_over_1000() {
    let api = Api::registered();
    let jobs = api.schedule(5);

    let first = api.list(&format!("queue_key={QUEUE}&limit=2"));
    assert_eq!(ids(&first.body["jobs"]), jobs[..2]);
    assert_eq!(first.body["page_info"]["has_next_page"], true);
    let cursor = first.body["page_info"]["end_cursor"].as_str().unwrap();
    let second = api.list(&format!("queue_key={QUEUE}&limit=2&after={cursor}"));
    assert_eq!(ids(&second.body["jobs"]), jobs[2..4]);
    let cursor = second.body["page_info"]["end_cursor"].as_str().unwrap();
    let last = api.list(&format!("queue_key={QUEUE}&limit=2&after={cursor}"));
    assert_eq!(ids(&last.body["jobs"]), jobs[4..]);
    assert_eq!(last.body["page_info"]["has_next_page"], false);

    assert_eq!(api.list(&format!("queue_key={QUEUE}&limit=1000")).code, 200);
    assert_eq!(api.list(&format!("queue_key={QUEUE}&limit=1001")).code, 400);
    assert_eq!(api.list(&format!("queue_key={QUEUE}&limit=0")).code, 400);
    assert_eq!(
        api.list(&format!("queue_key={QUEUE}&after=not-a-cursor"))
            .code,
        400
    );
}

#[test]
fn reserved_jobs_leave_the_list_and_come_back_when_their_reservation_expires() {
    let api = Api::registered();
    let jobs = api.schedule(3);

    let a = api.reserve(
        KEY,
        json!({"job_uuids": [jobs[0], jobs[1]], "reservation_expiry_seconds": 1}),
    );

    assert_eq!(a.code, 200, "{}", a.body);
    assert_eq!(a.body["reserved"], json!([jobs[0], jobs[1]]));
    assert_eq!(a.body["not_reserved"], json!([]));
    assert_eq!(api.listed_ids(), jobs[2..]);
    assert_eq!(api.state(&jobs[0]), JobState::Reserved);
    let reservation = api.buildkite.jobs()[0].reservation.clone().unwrap();
    assert_eq!(
        (
            reservation.stack.as_str(),
            reservation.expiry_seconds,
            reservation.expiry_sent
        ),
        (KEY, 1, true)
    );

    std::thread::sleep(Duration::from_millis(1200));

    assert_eq!(api.listed_ids(), jobs);
    assert_eq!(api.state(&jobs[0]), JobState::Scheduled);
}

#[test]
fn a_reservation_without_an_expiry_lasts_the_docs_900_seconds_and_reserving_again_extends_it() {
    let api = Api::registered();
    let jobs = api.schedule(1);

    assert_eq!(api.reserve(KEY, json!({ "job_uuids": jobs })).code, 200);
    let reservation = api.buildkite.jobs()[0].reservation.clone().unwrap();
    assert_eq!(
        (reservation.expiry_seconds, reservation.expiry_sent),
        (900, false)
    );

    let again = api.reserve(
        KEY,
        json!({"job_uuids": jobs, "reservation_expiry_seconds": 1800}),
    );
    assert_eq!(again.body["reserved"], json!(jobs));
    let extended = api.buildkite.jobs()[0].reservation.clone().unwrap();
    assert!(extended.until > reservation.until);
    assert_eq!(extended.expiry_seconds, 1800);
}

#[test]
fn a_finished_unknown_or_other_stacks_job_is_not_reserved() {
    let api = Api::registered();
    assert_eq!(api.register("peer").code, 201);
    let jobs = api.schedule(3);
    assert_eq!(api.finish(&jobs[0], json!({"detail": "no room"})).code, 200);
    assert_eq!(
        api.reserve("peer", json!({"job_uuids": [jobs[1]]})).body["reserved"],
        json!([jobs[1]])
    );

    let a = api.reserve(
        KEY,
        json!({"job_uuids": [jobs[0], jobs[1], jobs[2], "01900000-0000-7000-8000-999999999999"]}),
    );

    assert_eq!(a.code, 200);
    assert_eq!(a.body["reserved"], json!([jobs[2]]));
    assert_eq!(
        a.body["not_reserved"],
        json!([jobs[0], jobs[1], "01900000-0000-7000-8000-999999999999"])
    );
    assert_eq!(api.reserve(KEY, json!({"job_uuids": "x"})).code, 400);
    let too_many: Vec<String> = (0..1001).map(|n| n.to_string()).collect();
    assert_eq!(api.reserve(KEY, json!({ "job_uuids": too_many })).code, 400);
}

#[test]
fn get_states_names_each_known_job_in_lower_case_and_leaves_out_unknown_ones() {
    let api = Api::registered();
    let jobs = api.schedule(4);
    api.reserve(KEY, json!({"job_uuids": [jobs[1]]}));
    api.finish(&jobs[2], json!({"detail": "gave up"}));
    api.buildkite.cancel(&jobs[3]);

    let a = api.states(&[&jobs[0], &jobs[1], &jobs[2], &jobs[3], "unknown"]);

    assert_eq!(a.code, 200);
    assert_eq!(
        a.body["states"],
        json!({jobs[0].clone(): "scheduled", jobs[1].clone(): "reserved",
               jobs[2].clone(): "finished", jobs[3].clone(): "canceled"})
    );
    assert_eq!(
        api.call(
            "POST",
            &format!("/stacks/{KEY}/jobs/get-states"),
            Some(json!({}))
        )
        .code,
        400
    );
}

#[test]
fn a_job_is_shown_with_its_env_and_command() {
    let api = Api::registered();
    let jobs = api.schedule(1);

    let a = api.call("GET", &format!("/stacks/{KEY}/jobs/{}", jobs[0]), None);

    assert_eq!(a.code, 200);
    assert_eq!(a.body["id"], jobs[0].as_str());
    assert_eq!(a.body["command"], "make test");
    assert_eq!(a.body["env"]["BUILDKITE_JOB_ID"], jobs[0].as_str());
    assert_eq!(
        api.call("GET", &format!("/stacks/{KEY}/jobs/unknown"), None)
            .code,
        404
    );
}

#[test]
fn finish_without_exit_status_records_minus_one_and_keeps_the_detail() {
    let api = Api::registered();
    let jobs = api.schedule(1);
    api.reserve(KEY, json!({ "job_uuids": jobs }));

    let a = api.finish(&jobs[0], json!({"detail": "image pull failed"}));

    assert_eq!(a.code, 200);
    let job = api.buildkite.jobs()[0].clone();
    assert_eq!(job.state, JobState::Finished);
    assert_eq!(job.exit_status.as_deref(), Some("-1"));
    assert_eq!(job.finish_detail.as_deref(), Some("image pull failed"));
    assert!(job.reservation.is_none());
}

#[test]
fn finish_with_exit_status_zero_records_it() {
    let api = Api::registered();
    let jobs = api.schedule(1);

    let a = api.finish(
        &jobs[0],
        json!({"exit_status": 0, "detail": "done without an agent"}),
    );

    assert_eq!(a.code, 200);
    assert_eq!(api.buildkite.jobs()[0].exit_status.as_deref(), Some("0"));
}

#[test]
fn finish_refuses_a_missing_or_too_long_detail_and_a_second_finish() {
    let api = Api::registered();
    let jobs = api.schedule(1);

    assert_eq!(api.finish(&jobs[0], json!({"exit_status": 1})).code, 422);
    let long = api.finish(&jobs[0], json!({"detail": "x".repeat(4097)}));
    assert_eq!(long.code, 422);
    assert!(long.body["message"].is_string());
    assert_eq!(api.state(&jobs[0]), JobState::Scheduled);

    assert_eq!(
        api.finish(&jobs[0], json!({"detail": "x".repeat(4096)}))
            .code,
        200
    );
    let second = api.finish(&jobs[0], json!({"detail": "again"}));
    assert_eq!(second.code, 422);
    assert_eq!(
        api.buildkite.jobs()[0]
            .finish_detail
            .as_deref()
            .map(str::len),
        Some(4096)
    );
    assert_eq!(api.finish("unknown", json!({"detail": "x"})).code, 404);
}

#[test]
fn finish_answers_204_when_told_to_act_like_stacksapis_test_server() {
    let api = Api::registered();
    let jobs = api.schedule(1);
    api.buildkite.finish_status(204);

    let a = api.finish(&jobs[0], json!({"detail": "no room"}));

    assert_eq!(a.code, 204);
    assert!(a.body.is_null());
    assert_eq!(api.state(&jobs[0]), JobState::Finished);
}

#[test]
fn a_job_an_agent_acquired_cannot_be_finished_by_a_stack() {
    let api = Api::registered();
    let jobs = api.schedule(1);
    let (agent, _) = agent(&api);
    assert_eq!(acquire(&api, &agent, &jobs[0]), 200);

    let a = api.finish(&jobs[0], json!({"detail": "too late"}));

    assert_eq!(a.code, 422);
    assert_eq!(api.state(&jobs[0]), JobState::Accepted);
}

#[test]
fn notifications_are_stored_and_a_257_character_detail_is_reported_in_errors() {
    let api = Api::registered();
    let jobs = api.schedule(1);
    let long = "x".repeat(257);

    let a = api.call(
        "POST",
        &format!("/stacks/{KEY}/notifications"),
        Some(json!({"notifications": [
            {"job_uuid": jobs[0], "detail": "Pod is starting up"},
            {"job_uuid": jobs[0], "detail": long},
            {"job_uuid": jobs[0], "detail": "y".repeat(256), "timestamp": "2026-08-21T12:00:00Z"},
            {"job_uuid": "unknown", "detail": "lost"},
            {"job_uuid": jobs[0], "detail": ""},
        ]})),
    );

    assert_eq!(a.code, 200, "{}", a.body);
    assert_eq!(
        a.body["errors"],
        json!([
            {"error": "detail is too long (maximum is 256 characters)", "indexes": [1]},
            {"error": "job not found", "indexes": [3]},
            {"error": "detail is required", "indexes": [4]},
        ])
    );
    assert_eq!(
        api.buildkite.jobs()[0].notifications,
        vec!["Pod is starting up".to_string(), "y".repeat(256)]
    );
}

#[test]
fn a_job_takes_at_most_100_notifications_and_all_stored_means_no_errors() {
    let api = Api::registered();
    let jobs = api.schedule(1);
    let batch = |n: usize| {
        let list: Vec<Value> = (0..n)
            .map(|i| json!({"job_uuid": jobs[0], "detail": format!("note {i}")}))
            .collect();
        api.call(
            "POST",
            &format!("/stacks/{KEY}/notifications"),
            Some(json!({ "notifications": list })),
        )
    };

    assert_eq!(batch(99).body, json!({"errors": []}));
    let a = batch(2);

    assert_eq!(
        a.body["errors"],
        json!([{"error": "job stack notification count exceeded", "indexes": [1]}])
    );
    assert_eq!(api.buildkite.jobs()[0].notifications.len(), 100);
}

#[test]
fn the_eleventh_list_call_in_a_second_gets_429_with_the_rate_limit_headers() {
    let api = Api::registered();
    let query = format!("queue_key={QUEUE}");

    let answers: Vec<Answer> = (0..11).map(|_| api.list(&query)).collect();

    let calls = api.buildkite.stack_calls();
    let spread = calls.last().unwrap().at - calls[calls.len() - 11].at;
    assert!(spread < Duration::from_secs(1), "the calls took {spread:?}");
    for (n, a) in answers[..10].iter().enumerate() {
        assert_eq!(a.code, 200, "call {n}");
        assert_eq!(
            a.header("RateLimit-Scope").as_deref(),
            Some("list-scheduled-jobs")
        );
        assert_eq!(a.header("RateLimit-Limit").as_deref(), Some("10"));
        assert_eq!(a.header("RateLimit-Remaining"), Some((9 - n).to_string()));
        assert_eq!(a.header("RateLimit-Reset").as_deref(), Some("1"));
    }
    let over = &answers[10];
    assert_eq!(over.code, 429);
    assert_eq!(over.header("RateLimit-Remaining").as_deref(), Some("0"));
    assert_eq!(over.header("RateLimit-Reset").as_deref(), Some("1"));
    assert_eq!(over.header("Retry-After").as_deref(), Some("1"));
    assert_eq!(over.body["scope"], "list-scheduled-jobs");
    assert_eq!(over.body["limit"], 10);
    assert_eq!(over.body["current"], 11);
    assert_eq!(over.body["reset"], 1);
    assert!(over.body["message"].is_string());
    // Other scopes and other stacks have windows of their own; this one frees up.
    assert_eq!(api.states(&[]).code, 200);
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(api.list(&query).code, 200);
}

#[test]
fn a_lowered_limit_applies_to_its_scope() {
    let api = Api::registered();
    api.buildkite.rate_limit("batch-reserve", 1);

    assert_eq!(api.reserve(KEY, json!({"job_uuids": []})).code, 200);
    let over = api.reserve(KEY, json!({"job_uuids": []}));

    assert_eq!(over.code, 429);
    assert_eq!(over.header("RateLimit-Limit").as_deref(), Some("1"));
    assert_eq!(api.list(&format!("queue_key={QUEUE}")).code, 200);
}

#[test]
fn injected_faults_answer_the_next_stacks_calls_before_they_are_processed() {
    let api = Api::registered();
    let jobs = api.schedule(1);
    api.buildkite.inject_stacks(BuildkiteFault::Status(429), 1);
    api.buildkite.inject_stacks(BuildkiteFault::Status(500), 1);

    let limited = api.reserve(KEY, json!({ "job_uuids": jobs }));
    let failed = api.reserve(KEY, json!({ "job_uuids": jobs }));

    assert_eq!(limited.code, 429);
    assert_eq!(limited.header("Retry-After").as_deref(), Some("1"));
    assert_eq!(
        limited.header("RateLimit-Scope").as_deref(),
        Some("batch-reserve")
    );
    assert!(limited.header("RateLimit-Reset").is_some());
    assert_eq!(failed.code, 500);
    assert_eq!(api.state(&jobs[0]), JobState::Scheduled);
    assert_eq!(api.reserve(KEY, json!({ "job_uuids": jobs })).code, 200);
    let statuses: Vec<u16> = api
        .buildkite
        .stack_calls()
        .iter()
        .map(|c| c.status)
        .collect();
    assert_eq!(statuses, vec![201, 429, 500, 200]);
}

/// An agent registered the way `--acquire-job` registers: its access token.
fn agent(api: &Api) -> (String, Answer) {
    let a = api.call(
        "POST",
        "/register",
        Some(
            json!({"name": "pod-1", "meta_data": [format!("queue={QUEUE}")],
                    "ignore_in_dispatches": true}),
        ),
    );
    assert_eq!(a.code, 201);
    (a.body["access_token"].as_str().unwrap().to_string(), a)
}

fn acquire(api: &Api, access: &str, job: &str) -> u16 {
    api.call_with(access, "PUT", &format!("/jobs/{job}/acquire"), None)
        .code
}

#[test]
fn a_reserved_job_is_acquirable_by_an_agent_and_a_canceled_one_gets_422() {
    let api = Api::registered();
    let jobs = api.schedule(2);
    api.reserve(KEY, json!({ "job_uuids": jobs }));
    api.buildkite.cancel(&jobs[1]);
    let (access, _) = agent(&api);

    assert_eq!(acquire(&api, &access, &jobs[0]), 200);
    assert_eq!(acquire(&api, &access, &jobs[1]), 422);

    let done = api.buildkite.jobs();
    assert_eq!(done[0].state, JobState::Accepted);
    assert_eq!(done[0].acquired, 1);
    assert!(done[0].reservation.is_none());
    assert_eq!(done[1].state, JobState::Canceled);
    assert_eq!(done[1].acquired, 0);
    assert_eq!(api.states(&[&jobs[0]]).body["states"][&jobs[0]], "accepted");
}

#[test]
fn cancelling_a_job_an_agent_has_makes_it_canceling_until_the_agent_finishes() {
    let api = Api::registered();
    let jobs = api.schedule(3);
    api.reserve(KEY, json!({"job_uuids": [jobs[1]]}));
    let (access, _) = agent(&api);
    assert_eq!(acquire(&api, &access, &jobs[0]), 200);

    api.buildkite.cancel(&jobs[0]);
    assert_eq!(api.buildkite.cancel_scheduled(QUEUE), 2);

    let states = api.states(&[&jobs[0], &jobs[1], &jobs[2]]).body["states"].clone();
    assert_eq!(states[&jobs[0]], "canceling");
    assert_eq!(states[&jobs[1]], "canceled");
    assert_eq!(states[&jobs[2]], "canceled");
    let finish = api.call_with(
        &access,
        "PUT",
        &format!("/jobs/{}/finish", jobs[0]),
        Some(json!({"exit_status": "-1"})),
    );
    assert_eq!(finish.code, 200);
    assert_eq!(api.state(&jobs[0]), JobState::Canceled);
}

#[test]
fn a_wrong_token_gets_401_with_a_message() {
    let api = Api::registered();

    let a = api.call_with(
        "bkct_wrong",
        "GET",
        &format!("/stacks/{KEY}/scheduled-jobs?queue_key={QUEUE}"),
        None,
    );
    let register = api.call_with(
        "bkct_wrong",
        "POST",
        "/stacks/register",
        Some(json!({"key": "x", "type": "custom", "queue_key": QUEUE, "metadata": {}})),
    );

    assert_eq!(a.code, 401);
    assert!(a.body["message"].is_string());
    assert!(a.header("RateLimit-Scope").is_some());
    assert_eq!(register.code, 401);
    assert_eq!(api.buildkite.stacks().len(), 1);
}

#[test]
fn an_injected_stall_answers_nothing_and_the_next_call_is_served() {
    let api = Api::registered();
    api.buildkite
        .inject_stacks(BuildkiteFault::Stall(Duration::from_millis(300)), 1);

    let stalled = api.list(&format!("queue_key={QUEUE}"));

    assert_eq!(stalled.code, 0);
    assert_eq!(api.list(&format!("queue_key={QUEUE}")).code, 200);
    let calls = api.buildkite.stack_calls();
    assert_eq!(calls[1].status, 0);
    assert_eq!(calls[1].scope, "list-scheduled-jobs");
}
