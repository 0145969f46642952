//! The monitoring pack (`image/monitoring/`, docs/monitoring.md): its alerts pass `promtool
//! check rules` and their own `promtool test rules`, which covers every alert both ways; each
//! alert names its fix and a section of docs/monitoring.md; the dashboard's queries are PromQL;
//! every series the alerts and the dashboard read is on a live scrape of the real job-dispatcher
//! (against the fake API server and the fake Buildkite), the mirror's freshness included, in
//! both modes that export it; and the component renders through an overlay with a real
//! `kubectl kustomize`, scraping the dispatcher's metrics port, with the Service and
//! ServiceMonitor or, in their place, the PodMonitor.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dispatcher::mirror_run::{GENERATION_LABEL, MIRROR_LABEL, READY_AT, STATE_LABEL};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde::Deserialize;
use serde_json::{json, Value};
use stateless_e2e::dispatcher_process::{job_dispatcher, Running};
use stateless_e2e::fake_buildkite::{BuildkiteFault, FakeBuildkite, QueueState};
use stateless_e2e::fake_kube::{kustomize_5, pod_of_job, FakeKube};
use stateless_e2e::loopback::{self, free_port};
use stateless_e2e::sandbox::wait_for;

const QUEUE: &str = "kubernetes";
const TOKEN: &str = "bkua_monitoring-s3cret-t0ken";
const NS: &str = "ci";

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn pack(file: &str) -> PathBuf {
    workspace().join("image/monitoring").join(file)
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The PrometheusRule's rules.
fn rules() -> Vec<Value> {
    let rule = yaml(&pack("prometheus-rule.yaml"));
    let groups = rule["spec"]["groups"].as_array().unwrap();
    let rules = groups.iter().flat_map(|g| g["rules"].as_array().unwrap());
    rules.cloned().collect()
}

fn dashboard() -> Value {
    serde_json::from_str(&std::fs::read_to_string(pack("grafana-dashboard.json")).unwrap())
        .expect("the dashboard is JSON")
}

/// Every query of the dashboard: its panels' and its template variables'.
fn dashboard_queries() -> Vec<String> {
    let dashboard = dashboard();
    let panels = dashboard["panels"].as_array().unwrap().iter();
    let targets = panels.flat_map(|p| p["targets"].as_array().unwrap());
    let mut queries: Vec<String> = targets
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let variable_queries = variables
        .iter()
        .filter_map(|v| v["query"]["query"].as_str());
    queries.extend(variable_queries.map(String::from));
    queries
}

/// Whether promtool is here; says why not when it is not.
fn promtool_installed() -> bool {
    let ok = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipping: promtool is not installed (bash tests/provision.sh installs Debian's prometheus, which ships it)");
    }
    ok
}

/// Runs promtool with `args` in `dir`; its output, asserting it succeeded.
fn promtool(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// A temporary directory holding `rules`, written as a plain rules file `rules.yaml` (what
/// promtool reads), with the pack's `rules-test.yaml` beside it.
fn rules_dir(rules: &Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let text = serde_yaml_ng::to_string(rules).unwrap();
    std::fs::write(dir.path().join("rules.yaml"), text).unwrap();
    std::fs::copy(pack("rules-test.yaml"), dir.path().join("rules-test.yaml")).unwrap();
    dir
}

#[test]
fn the_rules_pass_promtool_and_their_unit_test_covers_every_alert_both_ways() {
    let rule = yaml(&pack("prometheus-rule.yaml"));
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule["kind"], "PrometheusRule");
    let alerts: Vec<String> = rules()
        .iter()
        .map(|r| r["alert"].as_str().expect("only alerts").to_string())
        .collect();

    // The unit test has, for each alert, a case where it fires and one where it stays quiet.
    let unit = yaml(&pack("rules-test.yaml"));
    let cases = unit["tests"].as_array().unwrap().iter();
    let cases: Vec<&Value> = cases
        .flat_map(|t| t["alert_rule_test"].as_array().unwrap())
        .collect();
    for alert in &alerts {
        let of_it = || cases.iter().filter(|c| c["alertname"] == alert.as_str());
        let fires = of_it().any(|c| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()));
        let quiet = of_it().any(|c| c["exp_alerts"].as_array().is_some_and(Vec::is_empty));
        assert!(fires, "rules-test.yaml never expects {alert} to fire");
        assert!(quiet, "rules-test.yaml never expects {alert} to stay quiet");
    }

    if !promtool_installed() {
        return;
    }
    let dir = rules_dir(&rule["spec"]);
    let checked = promtool(dir.path(), &["check", "rules", "rules.yaml"]);
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{checked}"
    );
    let tested = promtool(dir.path(), &["test", "rules", "rules-test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens.
fn anchor(heading: &str) -> String {
    let kept = heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .collect::<String>();
    kept.replace(' ', "-")
}

#[test]
fn every_alert_names_its_fix_and_a_runbook_section_of_docs_monitoring_md() {
    let doc = std::fs::read_to_string(workspace().join("docs/monitoring.md")).unwrap();
    let sections: BTreeSet<String> = doc
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect();
    for rule in rules() {
        let alert = rule["alert"].as_str().unwrap();
        let annotations = &rule["annotations"];
        for field in ["summary", "description"] {
            let text = annotations[field].as_str().unwrap_or("");
            assert!(!text.trim().is_empty(), "{alert} has no {field}");
        }
        let runbook = annotations["runbook_url"].as_str().unwrap_or("");
        let section = runbook.strip_prefix("docs/monitoring.md#");
        assert!(
            section.is_some_and(|s| sections.contains(s)),
            "{alert}'s runbook_url {runbook:?} is not a section of docs/monitoring.md"
        );
        assert!(
            doc.contains(&format!("### {alert}")),
            "docs/monitoring.md has no section {alert}"
        );
    }
    // No link leaves the repository.
    for entry in walkdir::WalkDir::new(workspace().join("image/monitoring")) {
        let entry = entry.unwrap();
        if entry.file_type().is_file() {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            assert!(!text.contains("://"), "{}: a link", entry.path().display());
        }
    }
}

#[test]
fn the_dashboards_queries_are_promql() {
    let dashboard = dashboard();
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let queue = variables.iter().find(|v| v["name"] == "queue").unwrap();
    assert_eq!(
        queue["query"]["query"],
        "label_values(dispatcher_demand_jobs, queue)"
    );
    let titles: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for wanted in [
        "Demand vs supply",
        "Dispatches",
        "Holds by reason",
        "Blocked by reason",
        "Stuck pods by reason",
        "API errors",
        "Leader",
        "Tick latency",
        "Mirror age",
    ] {
        assert!(titles.contains(&wanted), "no panel {wanted}: {titles:?}");
    }
    if !promtool_installed() {
        return;
    }
    // Each panel query as a recording rule, Grafana's variables given values, for promtool to
    // parse.
    let queries = dashboard_queries();
    let records: Vec<Value> = queries
        .iter()
        .filter(|q| !q.starts_with("label_values("))
        .enumerate()
        .map(|(i, q)| {
            let promql = q.replace("$__rate_interval", "2m").replace("$queue", ".*");
            json!({"record": format!("dashboard:query_{i}"), "expr": promql})
        })
        .collect();
    let count = records.len();
    let dir = rules_dir(&json!({"groups": [{"name": "dashboard", "rules": records}]}));
    let checked = promtool(dir.path(), &["check", "rules", "rules.yaml"]);
    assert!(
        checked.contains(&format!("SUCCESS: {count} rules found")),
        "{checked}"
    );
}

/// The metric names a PromQL query reads: its identifiers that start with `dispatcher_`, outside
/// quoted strings and label matchers.
fn metric_names(promql: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut chars = promql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                let mut escaped = false;
                for d in chars.by_ref() {
                    if d == c && !escaped {
                        break;
                    }
                    escaped = d == '\\' && !escaped;
                }
            }
            '{' => {
                let mut quote = None;
                for d in chars.by_ref() {
                    match (quote, d) {
                        (None, '}') => break,
                        (None, '"' | '\'') => quote = Some(d),
                        (Some(q), d) if d == q => quote = None,
                        _ => {}
                    }
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let mut word = c.to_string();
                while let Some(&d) = chars.peek() {
                    if !(d.is_ascii_alphanumeric() || d == '_' || d == ':') {
                        break;
                    }
                    word.push(d);
                    chars.next();
                }
                if word.starts_with("dispatcher_") {
                    names.insert(word);
                }
            }
            _ => {}
        }
    }
    names
}

#[test]
fn the_tokenizer_finds_metric_names_and_not_label_values() {
    let names = metric_names(
        r#"sum by (queue) (rate(dispatcher_api_errors_total{api="dispatcher_x", kind!~'y'}[5m]))
           / on (queue) dispatcher_leader == 1 and "dispatcher_quoted""#,
    );
    let expected = ["dispatcher_api_errors_total", "dispatcher_leader"];
    assert_eq!(names, expected.iter().map(|n| n.to_string()).collect());
}

/// Whether the scrape exports `name`: a sample of it, or its family's `# TYPE` line (a family
/// with no sample yet), a counter's samples being `_total` and a histogram's `_bucket`, `_sum`
/// and `_count`.
fn exported(scrape: &str, name: &str) -> bool {
    let sampled = scrape.lines().any(|l| {
        let series = l.split(['{', ' ']).next().unwrap_or("");
        !l.starts_with('#') && series == name
    });
    let mut families = scrape.lines().filter_map(|l| {
        let mut words = l.strip_prefix("# TYPE ")?.split_whitespace();
        Some((words.next()?, words.next()?))
    });
    let typed = families.any(|(family, kind)| {
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        suffixes.iter().any(|s| format!("{family}{s}") == name)
    });
    sampled || typed
}

/// The fakes and a kubeconfig for them.
struct World {
    dir: tempfile::TempDir,
    kube: FakeKube,
    buildkite: FakeBuildkite,
    kubeconfig: PathBuf,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let kube = FakeKube::start();
        let kubeconfig = kube.kubeconfig(dir.path(), NS);
        let buildkite = FakeBuildkite::start(TOKEN, QUEUE);
        World {
            dir,
            kube,
            buildkite,
            kubeconfig,
        }
    }

    /// The dispatcher with the shipped agent template and `settings`; and its metrics port.
    fn dispatcher(&self, settings: &[(&str, &str)]) -> (Running, u16) {
        let port = free_port();
        let template = workspace().join("image/k8s/agent-job.yaml");
        let mut command = job_dispatcher(&self.kubeconfig, &self.buildkite, TOKEN, "replica-a");
        command
            .env("DISPATCHER_QUEUE", QUEUE)
            .env("DISPATCHER_TEMPLATE", template)
            .env("DISPATCHER_POLL_INTERVAL", "200ms")
            .env("DISPATCHER_LISTEN", format!("127.0.0.1:{port}"))
            .envs(settings.iter().copied());
        (Running::spawn(&mut command), port)
    }

    /// The Jobs the dispatcher made.
    fn agent_jobs(&self) -> Vec<Value> {
        let jobs = self.kube.objects("jobs", NS).into_iter();
        jobs.filter(|j| j["metadata"]["labels"]["stateless-agent/queue"] == QUEUE)
            .collect()
    }

    /// A pod of `job` whose agent container waits for `reason`, as the kubelet reports it.
    fn pod_of(&self, job: &Value, name: &str, reason: &str) {
        self.kube.create("pods", NS, pod_of_job(job, name));
        let status = json!({"phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "agent", "image": "x", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": reason}}}]});
        self.kube.set_status("pods", NS, name, status);
    }
}

/// `/metrics`, or `None` if the dispatcher does not answer (it exited).
fn scrape(port: u16) -> Option<String> {
    let (code, body) = loopback::http(&format!("127.0.0.1:{port}"), "GET", "/metrics", None);
    (code == 200).then_some(body)
}

/// The line of the mirror's publish time `at` (RFC 3339) on a scrape.
fn published_line(at: &str) -> String {
    let seconds = at.parse::<Timestamp>().unwrap().as_second();
    format!("dispatcher_mirror_published_timestamp_seconds{{queue=\"{QUEUE}\"}} {seconds}")
}

/// Waits (up to 30 s) for the scrape to hold each of `wanted`; the scrape then. Fails with
/// the dispatcher's log.
fn scrape_until(dispatcher: Running, port: u16, wanted: &[String]) -> (Running, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let scrape = scrape(port).unwrap_or_default();
        if wanted.iter().all(|w| scrape.contains(w.as_str())) {
            return (dispatcher, scrape);
        }
        if Instant::now() > deadline {
            let log = dispatcher.stop().log();
            panic!("not on the scrape: {wanted:?}\n{scrape}\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A populate Job as the populate-mirror CronJob makes it: the API server has copied its pods'
/// labels onto it (it has none of its own), and the Job controller set `status`.
fn populate_job(name: &str, status: Value) -> (Value, Value) {
    let labels = json!({"app.kubernetes.io/name": "stateless-agent",
                        "app.kubernetes.io/component": "populate-mirror"});
    let job = json!({"metadata": {"name": name, "labels": labels},
        "spec": {"template": {"metadata": {"labels": labels},
            "spec": {"restartPolicy": "Never", "containers": [
                {"name": "populate-mirror", "image": "registry.example.com/stateless-agent:1"}]}}}});
    (job, status)
}

/// Every series the alerts and the dashboard read is on the scrape of a dispatcher that has met
/// what makes each appear (a family shows only once it has a sample): a populate Job that
/// succeeded (the mirror's freshness), a Buildkite error, and a dispatch whose pods can never
/// start (stuck pods).
#[test]
fn every_series_the_rules_and_the_dashboard_read_is_on_a_live_scrape() {
    let w = World::new();
    let refreshed = "2026-11-30T10:15:42Z";
    for (name, status) in [
        (
            "populate-mirror-29000000",
            json!({"succeeded": 1, "completionTime": refreshed}),
        ),
        // Newer, but failed: the mirror was not refreshed by it.
        ("populate-mirror-29000015", json!({"failed": 3})),
    ] {
        let (job, status) = populate_job(name, status);
        w.kube.create("jobs", NS, job);
        w.kube.set_status("jobs", NS, name, status);
    }
    w.buildkite.inject(BuildkiteFault::Status(502), 1);
    w.buildkite.set(QueueState {
        scheduled: 1,
        ..QueueState::default()
    });
    let (dispatcher, port) = w.dispatcher(&[]);
    wait_for("a dispatch", || !w.agent_jobs().is_empty());
    let job = w.agent_jobs().remove(0);
    for i in 0..job["spec"]["parallelism"].as_u64().unwrap() {
        w.pod_of(&job, &format!("agent-{i}"), "InvalidImageName");
    }

    let wanted = [
        published_line(refreshed),
        format!("dispatcher_mirror_refresh_seconds{{queue=\"{QUEUE}\"}} 900"),
        format!("dispatcher_stuck_pods_total{{queue=\"{QUEUE}\",reason=\"InvalidImageName\"}}"),
        format!(
            "dispatcher_api_errors_total{{queue=\"{QUEUE}\",api=\"buildkite\",kind=\"status\"}} 1"
        ),
        // The stuck pods' backoff.
        format!("dispatcher_holds_total{{queue=\"{QUEUE}\",reason=\"stuck\"}}"),
    ];
    let (dispatcher, scrape) = scrape_until(dispatcher, port, &wanted);
    let queries = rules()
        .into_iter()
        .map(|r| r["expr"].as_str().unwrap().to_string());
    let queries: Vec<String> = queries.chain(dashboard_queries()).collect();
    let names: BTreeSet<String> = queries.iter().flat_map(|q| metric_names(q)).collect();
    for new in [
        "dispatcher_mirror_published_timestamp_seconds",
        "dispatcher_mirror_refresh_seconds",
        "dispatcher_tick_seconds_bucket",
        "dispatcher_stuck_pods_total",
    ] {
        assert!(names.contains(new), "{new} not read: {names:?}");
    }
    let missing: Vec<&String> = names.iter().filter(|n| !exported(&scrape, n)).collect();
    assert!(missing.is_empty(), "not exported: {missing:?}\n{scrape}");
    let out = dispatcher.stop();
    assert!(!out.log().contains(TOKEN), "the token leaked");
}

#[test]
fn in_claims_mode_the_mirror_was_published_when_the_generation_handed_out_became_ready() {
    let w = World::new();
    let claim_template = w.dir.path().join("mirror-claim.yaml");
    let claim = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "git-mirrors"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}});
    std::fs::write(&claim_template, serde_yaml_ng::to_string(&claim).unwrap()).unwrap();
    let populate_template = w.dir.path().join("populate-job.yaml");
    let (mut populate, _) = populate_job("populate", json!({}));
    populate["apiVersion"] = json!("batch/v1");
    populate["kind"] = json!("Job");
    populate["spec"]["template"]["spec"]["volumes"] =
        json!([{"name": "git-mirrors", "persistentVolumeClaim": {"claimName": "git-mirrors"}}]);
    std::fs::write(
        &populate_template,
        serde_yaml_ng::to_string(&populate).unwrap(),
    )
    .unwrap();
    // Generation 2 is handed out; 1 is older; 3 is still being populated.
    let generation = |n: u32, state: &str, ready_at: &str| {
        json!({"metadata": {"name": format!("git-mirrors-{n}"),
            "labels": {MIRROR_LABEL: "git-mirrors", GENERATION_LABEL: n.to_string(), STATE_LABEL: state},
            "annotations": {READY_AT: ready_at}},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    };
    let now = Timestamp::now();
    let handed_out = (now - SignedDuration::from_secs(60)).to_string();
    let older = (now - SignedDuration::from_secs(960)).to_string();
    for claim in [
        generation(1, "ready", &older),
        generation(2, "ready", &handed_out),
        generation(3, "populating", ""),
    ] {
        w.kube.create("persistentvolumeclaims", NS, claim);
    }
    let (dispatcher, port) = w.dispatcher(&[
        ("DISPATCHER_MIRROR_MODE", "claims"),
        (
            "DISPATCHER_CLAIM_TEMPLATE",
            claim_template.to_str().unwrap(),
        ),
        (
            "DISPATCHER_POPULATE_TEMPLATE",
            populate_template.to_str().unwrap(),
        ),
        ("DISPATCHER_MIRROR_REFRESH", "30m"),
    ]);
    let wanted = [
        published_line(&handed_out),
        format!("dispatcher_mirror_refresh_seconds{{queue=\"{QUEUE}\"}} 1800"),
    ];
    let (dispatcher, _) = scrape_until(dispatcher, port, &wanted);
    drop(dispatcher);
}

#[test]
fn in_node_local_mode_no_mirror_series_is_exported() {
    let w = World::new();
    let (dispatcher, port) = w.dispatcher(&[("DISPATCHER_MIRROR_MODE", "node-local")]);
    let polls = w.buildkite.polls();
    wait_for("a tick", || w.buildkite.polls() > polls);
    let scrape = scrape(port).expect("the dispatcher answers");
    assert!(scrape.contains("dispatcher_leader"), "{scrape}");
    assert!(!scrape.contains("dispatcher_mirror_"), "{scrape}");
    drop(dispatcher);
}

/// `to` (absolute) relative to `from` (absolute): kustomize refuses absolute paths.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let up = from
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .map(|_| "..");
    let down = to
        .components()
        .filter(|c| matches!(c, Component::Normal(_)));
    up.map(PathBuf::from)
        .chain(down.map(|c| PathBuf::from(c.as_os_str())))
        .collect()
}

/// `kubectl kustomize` of a tiny overlay: the dispatcher's base in namespace `buildkite`, with
/// `components` (under image/); the rendered documents by kind and name.
fn render(components: &[&str]) -> BTreeMap<(String, String), Value> {
    let dir = tempfile::tempdir().unwrap();
    let root = |path: &str| relative(dir.path(), &workspace().join(path));
    let components: Vec<PathBuf> = components.iter().map(|c| root(c)).collect();
    let overlay = json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": "buildkite", "resources": [root("image/k8s")], "components": components});
    let text = serde_yaml_ng::to_string(&overlay).unwrap();
    std::fs::write(dir.path().join("kustomization.yaml"), text).unwrap();
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubectl kustomize: {stderr}");
    let text = String::from_utf8(out.stdout).unwrap();
    let docs = serde_yaml_ng::Deserializer::from_str(&text);
    let docs = docs.map(|d| Value::deserialize(d).unwrap());
    docs.map(|d| {
        let kind = d["kind"].as_str().unwrap().to_string();
        let name = d["metadata"]["name"].as_str().unwrap().to_string();
        ((kind, name), d)
    })
    .collect()
}

fn get<'a>(docs: &'a BTreeMap<(String, String), Value>, kind: &str, name: &str) -> &'a Value {
    let key = (kind.to_string(), name.to_string());
    docs.get(&key)
        .unwrap_or_else(|| panic!("no {kind} {name}: {:?}", docs.keys()))
}

/// Whether every label of `selector` is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().unwrap();
    !selector.is_empty() && selector.iter().all(|(k, v)| &labels[k] == v)
}

/// The dispatcher's pods' labels, and the number of its container's port named `metrics`.
fn dispatcher_pods(docs: &BTreeMap<(String, String), Value>) -> (Value, u64) {
    let deployment = get(docs, "Deployment", "job-dispatcher");
    let pod = &deployment["spec"]["template"];
    let container = &pod["spec"]["containers"][0];
    let ports = container["ports"].as_array().unwrap();
    let metrics = ports.iter().find(|p| p["name"] == "metrics").unwrap();
    (
        pod["metadata"]["labels"].clone(),
        metrics["containerPort"].as_u64().unwrap(),
    )
}

#[test]
fn the_component_renders_through_an_overlay_and_scrapes_the_dispatchers_metrics_port() {
    if !kustomize_5() {
        return;
    }
    let docs = render(&["image/monitoring"]);
    let (pod_labels, port) = dispatcher_pods(&docs);
    assert_eq!(port, 9090);

    let service = get(&docs, "Service", "job-dispatcher-metrics");
    assert_eq!(service["metadata"]["namespace"], "buildkite");
    assert!(
        selects(&service["spec"]["selector"], &pod_labels),
        "{service:#}"
    );
    // An unready replica (a refused token) is scraped too.
    assert_eq!(service["spec"]["publishNotReadyAddresses"], true);
    let service_port = &service["spec"]["ports"][0];
    assert_eq!(service_port["targetPort"], "metrics");

    let monitor = get(&docs, "ServiceMonitor", "job-dispatcher");
    let selector = &monitor["spec"]["selector"]["matchLabels"];
    assert!(
        selects(selector, &service["metadata"]["labels"]),
        "{monitor:#}"
    );
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"],
        service_port["name"]
    );
    assert!(!docs.keys().any(|(kind, _)| kind == "PodMonitor"));

    let rule = get(&docs, "PrometheusRule", "job-dispatcher");
    assert_eq!(
        rule["spec"]["groups"][0]["rules"].as_array().unwrap().len(),
        rules().len()
    );

    // The dashboard, as Grafana's sidecar finds it: labelled, under a name without a hash.
    let config = get(&docs, "ConfigMap", "job-dispatcher-dashboard");
    assert_eq!(config["metadata"]["labels"]["grafana_dashboard"], "1");
    let json = config["data"]["grafana-dashboard.json"].as_str().unwrap();
    assert_eq!(serde_json::from_str::<Value>(json).unwrap(), dashboard());
}

#[test]
fn the_pod_monitor_variant_replaces_the_service_and_service_monitor() {
    if !kustomize_5() {
        return;
    }
    let docs = render(&["image/monitoring", "image/monitoring/pod-monitor"]);
    let (pod_labels, _) = dispatcher_pods(&docs);
    let monitor = get(&docs, "PodMonitor", "job-dispatcher");
    let selector = &monitor["spec"]["selector"]["matchLabels"];
    assert!(selects(selector, &pod_labels), "{monitor:#}");
    assert_eq!(monitor["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    let kinds: Vec<&str> = docs.keys().map(|(kind, _)| kind.as_str()).collect();
    assert!(!kinds.contains(&"ServiceMonitor"), "{kinds:?}");
    assert!(!kinds.contains(&"Service"), "{kinds:?}");
    get(&docs, "PrometheusRule", "job-dispatcher");
    get(&docs, "ConfigMap", "job-dispatcher-dashboard");
}
