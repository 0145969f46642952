//! The demo, the whole flow on one machine: populate-mirror fills a mirror volume from a
//! generated repository served over loopback; the checkout hook checks out without a mirror, with
//! the up-to-date mirror, with the mirror behind the server, and after populate-mirror's refresh;
//! then agent-wrapper runs one job of the stand-in agent as a pod would, the mirror mounted
//! read-only, and prints its exit report. No Buildkite account needed: the stand-in agent models
//! the real one's contract. Needs root, for the PID and mount namespaces.

use std::time::Instant;

use stateless_e2e::http_server::GitHttpServer;
use stateless_e2e::sandbox::Sandbox;
use stateless_e2e::synthetic::{self, Shape};

const SHAPE: Shape = Shape {
    files: 3_000,
    commits: 400,
    branches: 40,
    tags: 20,
    pulls: 100,
};

fn main() {
    let sandbox = Sandbox::new();
    let bare = sandbox.server_root.join("demo/sample.git");
    println!(
        "Generating a sample repository ({} files, {} commits, {} branches, {} tags)…",
        SHAPE.files, SHAPE.commits, SHAPE.branches, SHAPE.tags
    );
    let first_tip = synthetic::generate(&bare, SHAPE);
    let server = GitHttpServer::start(&sandbox.server_root);
    let url = server.url("demo/sample.git");
    println!("Serving it over smart HTTP (git http-backend) at {url}");
    let populate = || {
        let out = sandbox
            .populate_mirror()
            .env("POPULATE_MIRROR_LOG", "warn")
            .arg(&url)
            .run();
        assert_eq!(
            out.code(),
            Some(0),
            "populate-mirror failed:\n{}",
            out.log()
        );
        let manifest = std::fs::read_to_string(sandbox.mirrors.join("manifest.json")).unwrap();
        let entry: serde_json::Value = serde_json::from_str(&manifest).unwrap();
        let entry = &entry["repositories"][0];
        println!(
            "populate-mirror: {} → generation {} ({}, {} refs, {} bytes)",
            entry["path"],
            entry["generation"],
            entry["status"],
            entry["ref_count"],
            entry["size_bytes"]
        );
    };
    populate();
    println!(
        "Mirror volume: {}/demo/sample.reference -> {}\n",
        sandbox.mirrors.display(),
        std::fs::read_link(sandbox.mirrors.join("demo/sample.reference"))
            .unwrap()
            .display()
    );

    let mut rows = Vec::new();
    let mut run = |label: &str, commit: &str, mirrors: &std::path::Path| {
        server.reset_counters();
        sandbox.fresh_checkout_dir();
        println!("── {label}");
        let started = Instant::now();
        let out = sandbox
            .hook()
            .job(&url, commit, "main")
            .env("BUILDKITE_GIT_MIRRORS_PATH", mirrors)
            .run();
        let took = started.elapsed();
        let summary = out
            .log()
            .lines()
            .filter(|l| l.starts_with("checked out") || l.contains("⚠️") || l.contains("🚨"))
            .collect::<Vec<_>>()
            .join("\n   ");
        println!("   {summary}");
        assert_eq!(
            out.code(),
            Some(0),
            "the demo checkout failed:\n{}",
            out.log()
        );
        let head = sandbox.git(&["rev-parse", "HEAD"]);
        assert_eq!(head, commit);
        rows.push((
            label.to_string(),
            took,
            server.bytes_sent(),
            server.pack_bytes_sent(),
        ));
    };
    let no_mirrors = sandbox.dir.path().join("no-mirrors");
    std::fs::create_dir_all(&no_mirrors).unwrap();
    run(
        "1. no mirror: everything comes from the server",
        &first_tip,
        &no_mirrors,
    );
    run(
        "2. up-to-date mirror: objects borrowed, only refs cross the wire",
        &first_tip,
        &sandbox.mirrors,
    );
    let new_tip = synthetic::extend(&bare, SHAPE, 50);
    run(
        "3. mirror 50 commits behind: only the missing commits are fetched",
        &new_tip,
        &sandbox.mirrors,
    );
    println!();
    populate();
    run(
        "4. after populate-mirror's refresh: borrowed from the new generation",
        &new_tip,
        &sandbox.mirrors,
    );

    println!(
        "\n{:<70} {:>9} {:>14} {:>14}",
        "checkout", "time", "bytes sent", "object bytes"
    );
    for (label, took, bytes, pack) in &rows {
        println!(
            "{label:<70} {:>7.0}ms {bytes:>14} {pack:>14}",
            took.as_secs_f64() * 1000.0
        );
    }
    println!(
        "\nThe last checkout: HEAD detached at {}, {} branches under origin/*, {} tags, as a clone leaves them.",
        &new_tip[..12],
        sandbox.git(&["branch", "-r"]).lines().count(),
        sandbox.git(&["tag"]).lines().count(),
    );

    println!(
        "\n── 5. one whole job, as a pod runs it: agent-wrapper as PID 1 of its own PID namespace\n   \
         runs the stand-in buildkite-agent; its checkout hook borrows from the mirror, mounted read-only"
    );
    let out = sandbox
        .agent_wrapper()
        .env("BUILDKITE_STANDIN_JOB_AFTER", "0")
        .env(
            "BUILDKITE_STANDIN_COMMAND",
            "git log -1 --format='   the job builds %h: %s'",
        )
        .job(&url, &new_tip, "main")
        .with_read_only(&sandbox.mirrors)
        .as_pid1()
        .run();
    let report = out.stdout.lines().last().unwrap_or_default();
    for line in out.stdout.lines().filter(|l| l.starts_with("   the job")) {
        println!("{line}");
    }
    assert_eq!(out.code(), Some(0), "the demo job failed:\n{}", out.log());
    let report: serde_json::Value = serde_json::from_str(report).expect("the exit report");
    println!(
        "   the pod exits {} ({}); the exit report, also in the termination message file:\n{}",
        report["exit_code"],
        report["reason"].as_str().unwrap_or_default(),
        serde_json::to_string_pretty(&report).unwrap()
    );
}
