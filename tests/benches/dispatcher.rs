//! job-dispatcher's own footprint against a fake cluster holding 5,000 of its queue's pods (and
//! 100 Jobs): resident memory once its watches hold them all, and CPU per tick, ticking every
//! 200 ms for 50 ticks. The fake API server (tests/src/fake_kube.rs) and the fake Buildkite
//! metrics API (tests/src/fake_buildkite.rs) run in this process.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench -p stateless-e2e --bench dispatcher`
//! (`BENCH_PODS`, default 5000).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use stateless_e2e::bench::{env_or, proc_field};
use stateless_e2e::fake_buildkite::{FakeBuildkite, QueueState};
use stateless_e2e::fake_kube::FakeKube;
use stateless_e2e::loopback::free_port;
use stateless_e2e::sandbox::{bin, Sandbox};

const QUEUE: &str = "kubernetes";
const TICKS: usize = 50;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let pods = env_or("BENCH_PODS", 5000);
    let sandbox = Sandbox::new();
    let kube = FakeKube::start();
    let buildkite = FakeBuildkite::start("t0ken", QUEUE);
    let labels = json!({"stateless-agent/queue": QUEUE, "app.kubernetes.io/managed-by": "job-dispatcher",
        "stateless-agent/dispatch-id": "0123456789abcdef0123456789abcdef"});
    let jobs = 100;
    for j in 0..jobs {
        let job = kube.create(
            "jobs",
            "ci",
            json!({"metadata": {"name": format!("job-{j}"), "labels": labels},
            "spec": {"parallelism": pods / jobs, "completions": pods / jobs, "template": {}}}),
        );
        for p in 0..pods / jobs {
            let name = format!("job-{j}-{p}");
            kube.create("pods", "ci", json!({"metadata": {"name": name, "labels": labels, "ownerReferences": [{
                "apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"],
                "uid": job["metadata"]["uid"], "controller": true}]},
                "spec": {"containers": [{"name": "agent", "image": "registry.example.com/stateless-agent:latest",
                    "env": [{"name": "BUILDKITE_AGENT_TAGS", "value": "queue=kubernetes"}]}]}}));
            kube.set_status(
                "pods",
                "ci",
                &name,
                json!({"phase": "Running", "startTime": "2026-11-30T00:00:00Z"}),
            );
        }
    }
    // Every pod registered and busy: the dispatcher holds ("enough") each tick, after reading
    // the whole supply.
    buildkite.set(QueueState {
        scheduled: 0,
        running: pods as u32,
        idle_agents: 0,
        busy_agents: pods as u32,
    });
    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/k8s/agent-job.yaml");
    let mut child = Command::new(bin("job-dispatcher"))
        .env_clear()
        .env("KUBECONFIG", kube.kubeconfig(sandbox.dir.path(), "ci"))
        .env("DISPATCHER_QUEUE", QUEUE)
        .env("DISPATCHER_TEMPLATE", template)
        .env("DISPATCHER_POLL_INTERVAL", "200ms")
        .env("DISPATCHER_MAX_AGENTS", (pods * 2).to_string())
        .env("DISPATCHER_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("DISPATCHER_LOG", "warn")
        .env("BUILDKITE_AGENT_TOKEN", "t0ken")
        .env("BUILDKITE_AGENT_ENDPOINT", buildkite.endpoint())
        .env("POD_NAME", "bench")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id();
    let field = |file: &str, name: &str| proc_field(pid, file, name);
    // CPU time (utime + stime, in clock ticks) from /proc/<pid>/stat.
    let cpu = || -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
            + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        Duration::from_millis(ticks * 10)
    };
    let started = Instant::now();
    // The first tick waits for the watches to hold every pod.
    while buildkite.polls() < 2 && started.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let synced = started.elapsed();
    let (cpu_before, polls_before) = (cpu(), buildkite.polls());
    while buildkite.polls() < polls_before + TICKS {
        std::thread::sleep(Duration::from_millis(20));
    }
    let per_tick = (cpu() - cpu_before) / TICKS as u32;
    let rss = field("status", "VmRSS:");
    let hwm = field("status", "VmHWM:");
    let _ = child.kill();
    let _ = child.wait();
    println!();
    println!("job-dispatcher against {pods} pods and {jobs} Jobs of its queue:");
    println!("| measure | value |");
    println!("|---|---:|");
    println!(
        "| watches synced, first tick done | {:.1} s |",
        synced.as_secs_f64()
    );
    println!(
        "| resident memory (VmRSS) after {TICKS} more ticks | {:.1} MB |",
        rss as f64 / 1024.0
    );
    println!(
        "| peak resident memory (VmHWM) | {:.1} MB |",
        hwm as f64 / 1024.0
    );
    println!(
        "| CPU per tick (mean over {TICKS}) | {:.1} ms |",
        per_tick.as_secs_f64() * 1000.0
    );
    println!();
    println!(
        "target resident memory ≤ 40 MB: {:.1} MB {}",
        rss as f64 / 1024.0,
        if rss <= 40 * 1024 { "met" } else { "MISSED" }
    );
}
