//! The fake Kubernetes API server (`tests/src/fake_kube.rs`) speaks the real protocol: a real
//! `kubectl` creates, gets, lists by label, watches and deletes against it, and the API's
//! conventions a client relies on hold over plain HTTP (410 Gone for an expired watch,
//! 409 Conflict for a stale update, bookmarks, selectors).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use stateless_e2e::fake_kube::{kubectl_installed, FakeKube};
use stateless_e2e::loopback;
use stateless_e2e::sandbox::{wait_for, Sandbox};

fn kubectl(config: &Path, args: &[&str]) -> Output {
    Command::new("kubectl")
        .env("KUBECONFIG", config)
        .args(["--request-timeout=10s"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn kubectl_creates_gets_watches_and_deletes() {
    if !kubectl_installed() {
        return;
    }
    let s = Sandbox::new();
    let kube = FakeKube::start();
    let config = kube.kubeconfig(s.dir.path(), "ci");
    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/k8s/agent-job.yaml");

    // Create from the shipped template (generateName), then get it back.
    let out = kubectl(
        &config,
        &[
            "create",
            "--validate=false",
            "-f",
            template.to_str().unwrap(),
            "-o",
            "name",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let created = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        created.starts_with("job.batch/buildkite-agent-"),
        "{created}"
    );
    let name = created.trim_start_matches("job.batch/").to_string();
    let out = kubectl(
        &config,
        &[
            "get",
            "job",
            &name,
            "-o",
            "jsonpath={.spec.template.spec.containers[0].name}",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "agent",
        "{}",
        text(&out)
    );
    let out = kubectl(&config, &["get", "jobs", "-o", "json"]);
    let list: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert_eq!(list["items"][0]["metadata"]["namespace"], "ci");

    // A watch sees what is created, changed and deleted afterwards.
    let mut watcher = Command::new("kubectl")
        .env("KUBECONFIG", &config)
        .args([
            "get",
            "pods",
            "--watch",
            "--output-watch-events",
            "-o",
            "json",
            "-l",
            "app=agent",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watcher.stdout.take().unwrap());
    wait_for("the watch to start", || {
        kube.requests().iter().any(|r| r == "GET pods")
    });
    std::thread::sleep(Duration::from_millis(300));
    kube.create(
        "pods",
        "ci",
        json!({"metadata": {"name": "other", "labels": {"app": "other"}}}),
    );
    kube.create(
        "pods",
        "ci",
        json!({"metadata": {"name": "agent-1", "labels": {"app": "agent"}}}),
    );
    kube.set_status("pods", "ci", "agent-1", json!({"phase": "Running"}));
    let out = kubectl(&config, &["delete", "pod", "agent-1"]);
    assert!(out.status.success(), "{}", text(&out));
    let mut events = Vec::new();
    let mut buffer = String::new();
    while events.len() < 3 {
        let mut line = String::new();
        if lines.read_line(&mut line).unwrap() == 0 {
            break;
        }
        buffer.push_str(&line);
        // kubectl prints each event as indented JSON: parse once an object is complete.
        if let Ok(event) = serde_json::from_str::<Value>(&buffer) {
            events.push((
                event["type"].as_str().unwrap_or("").to_string(),
                event["object"]["metadata"]["name"].clone(),
            ));
            buffer.clear();
        }
    }
    let _ = watcher.kill();
    let _ = watcher.wait();
    assert_eq!(
        events,
        [
            ("ADDED".to_string(), json!("agent-1")),
            ("MODIFIED".to_string(), json!("agent-1")),
            ("DELETED".to_string(), json!("agent-1")),
        ]
    );

    // Deleting the Job takes it away; getting it is then NotFound.
    let out = kubectl(&config, &["delete", "job", &name]);
    assert!(out.status.success(), "{}", text(&out));
    let out = kubectl(&config, &["get", "job", &name, "-o", "name"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("NotFound") && text(&out).contains("not found"),
        "{}",
        text(&out)
    );
}

/// One request to the fake, its status and body (a watch's body: its event lines).
fn http(kube: &FakeKube, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    let address = kube.url().trim_start_matches("http://").to_string();
    let body = body.map(|b| b.to_string());
    loopback::http(&address, method, path, body.as_deref())
}

/// The names of a list's items, in order.
fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn stale_updates_conflict_and_expired_watches_are_gone() {
    let kube = FakeKube::start();
    let lease = kube.create(
        "leases",
        "ci",
        json!({"metadata": {"name": "dispatcher"}, "spec": {"holderIdentity": "a"}}),
    );
    let path = "/apis/coordination.k8s.io/v1/namespaces/ci/leases/dispatcher";
    let mut update = lease.clone();
    update["spec"]["holderIdentity"] = json!("b");
    let (code, _) = http(&kube, "PUT", path, Some(&update));
    assert_eq!(code, 200);
    // The same update again carries a resourceVersion that is no longer current.
    let (code, body) = http(&kube, "PUT", path, Some(&update));
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("\"reason\":\"Conflict\""), "{body}");
    let (code, body) = http(
        &kube,
        "POST",
        "/apis/coordination.k8s.io/v1/namespaces/ci/leases",
        Some(&json!({"metadata": {"name": "dispatcher"}})),
    );
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("AlreadyExists"), "{body}");

    // A watch from before a compaction is told 410 Expired, as the real server does.
    kube.compact();
    let (code, body) = http(
        &kube,
        "GET",
        "/apis/coordination.k8s.io/v1/namespaces/ci/leases?watch=true&resourceVersion=1",
        None,
    );
    assert_eq!(code, 200);
    assert!(
        body.contains("\"type\":\"ERROR\"") && body.contains("\"code\":410"),
        "{body}"
    );

    // A watch with bookmarks that nothing happens to still hears of the resourceVersion.
    let (_, body) = http(
        &kube,
        "GET",
        "/api/v1/namespaces/ci/pods?watch=true&allowWatchBookmarks=true&timeoutSeconds=2&resourceVersion=3",
        None,
    );
    assert!(body.contains("\"type\":\"BOOKMARK\""), "{body}");

    // Faults on request: a 429 with Retry-After for the next list of jobs only.
    kube.inject(Some("GET"), Some("jobs"), 429, 1);
    let (code, _) = http(&kube, "GET", "/apis/batch/v1/namespaces/ci/jobs", None);
    assert_eq!(code, 429);
    let (code, _) = http(&kube, "GET", "/apis/batch/v1/namespaces/ci/jobs", None);
    assert_eq!(code, 200);
}

#[test]
fn selectors_pick_what_the_api_server_would() {
    let kube = FakeKube::start();
    for (name, labels, phase) in [
        (
            "a",
            json!({"stateless-agent/queue": "q", "tier": "1"}),
            "Running",
        ),
        ("b", json!({"stateless-agent/queue": "q"}), "Pending"),
        ("c", json!({"stateless-agent/queue": "other"}), "Running"),
    ] {
        kube.create(
            "pods",
            "ci",
            json!({"metadata": {"name": name, "labels": labels}}),
        );
        kube.set_status("pods", "ci", name, json!({"phase": phase}));
    }
    let listed = |query: &str| {
        let (_, body) = http(
            &kube,
            "GET",
            &format!("/api/v1/namespaces/ci/pods?{query}"),
            None,
        );
        names(&serde_json::from_str(&body).unwrap())
    };
    assert_eq!(
        listed("labelSelector=stateless-agent%2Fqueue%3Dq"),
        ["a", "b"]
    );
    assert_eq!(
        listed("labelSelector=stateless-agent%2Fqueue%20in%20(q,other),tier"),
        ["a"]
    );
    assert_eq!(listed("labelSelector=!tier"), ["b", "c"]);
    assert_eq!(listed("fieldSelector=status.phase%3DRunning"), ["a", "c"]);
    assert_eq!(
        listed("labelSelector=stateless-agent%2Fqueue%3Dq&fieldSelector=status.phase!%3DRunning"),
        ["b"]
    );
}

/// Lists come in pages of `limit`, with a `continue` token, as kube-rs's watcher asks for them
/// (500 a page): every page is part of the one list taken at the first page's resourceVersion,
/// and a token older than the kept history is 410 `Expired`.
#[test]
fn lists_come_in_pages() {
    let kube = FakeKube::start();
    for name in ["a", "b", "c", "d", "e"] {
        kube.create("pods", "ci", json!({"metadata": {"name": name}}));
    }
    let page = |query: &str| {
        let (code, body) = http(
            &kube,
            "GET",
            &format!("/api/v1/namespaces/ci/pods?{query}"),
            None,
        );
        (code, serde_json::from_str::<Value>(&body).unwrap())
    };
    let continued = |list: &Value| {
        let token = list["metadata"]["continue"].as_str().unwrap();
        page(&format!("limit=2&continue={token}"))
    };

    let (_, first) = page("limit=2");
    assert_eq!(names(&first), ["a", "b"]);
    // Written after the first page: not in this list, left to the watch that follows it.
    kube.create("pods", "ci", json!({"metadata": {"name": "f"}}));
    http(&kube, "DELETE", "/api/v1/namespaces/ci/pods/c", None);
    let (_, second) = continued(&first);
    assert_eq!(names(&second), ["c", "d"]);
    assert_eq!(
        second["metadata"]["resourceVersion"],
        first["metadata"]["resourceVersion"]
    );
    let (_, rest) = continued(&second);
    assert_eq!(names(&rest), ["e"]);
    assert!(rest["metadata"]["continue"].is_null());

    // Compacted past the list's resourceVersion: its next page can no longer be consistent.
    let (_, again) = page("limit=2");
    kube.create("pods", "ci", json!({"metadata": {"name": "g"}}));
    kube.compact();
    let (code, expired) = continued(&again);
    assert_eq!(code, 410, "{expired}");
    assert_eq!(expired["reason"], "Expired");
}
