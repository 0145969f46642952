//! Checkout benchmark: the hook against the agent's default checkout (replayed by
//! `../shared/bench/bk-default-checkout.sh`), a plain clone, and the floor
//! (`git archive | tar -x` from the mirror), all in one run, on one repository served over smart
//! HTTP on loopback. Prints medians, ratios and bytes over the wire.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench -p stateless-e2e --bench checkout`
//!
//! Environment: `BENCH_RUNS` (5), `BENCH_REPO` (any repository path or URL to use instead of the
//! generated one), `BENCH_FILES` (20000), `BENCH_COMMITS` (3000), `BENCH_BRANCHES` (500),
//! `BENCH_TAGS` (200), `BENCH_PULLS` (5000 `refs/pull/N/head`), `BENCH_BEHIND` (200 commits), `BENCH_KEEP` (keep the work directory),
//! `BENCH_BASELINE_HOOK` (another build of `checkout-hook`, e.g. the previous release: adds a
//! "baseline hook" row and checks that this build is at most 5 % slower on the common path).
//!
//! Everything lives under `BENCH_TMPDIR` (default `/dev/shm`, a tmpfs).
//! Every checkout goes into a new empty directory; old trees are moved aside, not deleted, until
//! the end (ext4 with discard charges deletions to whatever creates files next).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stateless_e2e::bench::{env_or, median, paired_ratio};
use stateless_e2e::git::{command, git};
use stateless_e2e::http_server::GitHttpServer;
use stateless_e2e::sandbox::Sandbox;
use stateless_e2e::synthetic::{self, Shape};

/// The row of `BENCH_BASELINE_HOOK`, run on the up-to-date mirror.
const BASELINE: &str = "baseline hook (BENCH_BASELINE_HOOK), mirror up to date";

struct Sample {
    took: Duration,
    bytes: u64,
    pack_bytes: u64,
    /// The hook's own phase timings (fetch, checkout), from its checkout record.
    phases: Option<(u64, u64)>,
}

struct Case {
    name: &'static str,
    samples: Vec<Sample>,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks harness=false benches to list tests
    }
    let runs = env_or("BENCH_RUNS", 5);
    // tmpfs by default: this machine's ext4 with online discard makes file creation timings
    // swing by a factor of three between runs, which would drown what is measured.
    let tmp = std::env::var("BENCH_TMPDIR").unwrap_or_else(|_| "/dev/shm".into());
    if Path::new(&tmp).is_dir() {
        std::env::set_var("TMPDIR", &tmp);
    }
    let behind = env_or("BENCH_BEHIND", 200);
    let sandbox = Sandbox::new();
    let root = sandbox.dir.path();
    let bare = sandbox.server_root.join("bench/repo.git");
    let server = GitHttpServer::start(&sandbox.server_root);
    let url = server.url("bench/repo.git");
    let behind_root = root.join("mirrors-behind");
    let current_root = root.join("mirrors-current");
    let current = current_root.join("bench/repo.reference");
    let describe = prepare_repository(
        &bare,
        &url,
        behind,
        &behind_root.join("bench/repo.reference"),
        &current,
    );
    let tip = git(&bare, &["rev-parse", "HEAD"]);
    let branch = git(&bare, &["symbolic-ref", "--short", "HEAD"]);

    let replay =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/bench/bk-default-checkout.sh");
    let have_replay = replay.exists();
    if !have_replay {
        eprintln!(
            "note: {} is absent; the replay rows are skipped",
            replay.display()
        );
    }
    eprintln!("{describe}; {runs} runs per case");

    let baseline = std::env::var_os("BENCH_BASELINE_HOOK").map(PathBuf::from);
    let mut cases: Vec<Case> = [
        "hook, mirror up to date",
        "hook, mirror behind",
        "replay (agent default), mirror up to date",
        "replay (agent default), mirror behind",
        "plain git clone",
        "floor: git archive | tar -x",
        BASELINE,
    ]
    .into_iter()
    .map(|name| Case {
        name,
        samples: Vec::new(),
    })
    .collect();

    for run in 0..runs {
        for (i, case) in cases.iter_mut().enumerate() {
            if (!have_replay && (i == 2 || i == 3)) || (i == 6 && baseline.is_none()) {
                continue;
            }
            sandbox.fresh_checkout_dir();
            let dir = &sandbox.checkout;
            server.reset_counters();
            let started = Instant::now();
            let ok = match i {
                0 | 1 | 6 => {
                    let mirrors = if i == 1 { &behind_root } else { &current_root };
                    let hook = match (i, &baseline) {
                        (6, Some(program)) => sandbox.hook_binary(program),
                        _ => sandbox.hook(),
                    };
                    let out = hook
                        .job(&url, &tip, &branch)
                        .env("BUILDKITE_GIT_MIRRORS_PATH", mirrors)
                        .run();
                    if out.code() != Some(0) {
                        eprintln!("{}", out.log());
                    }
                    out.code() == Some(0)
                }
                2 | 3 => {
                    let mirror = if i == 2 {
                        current.clone()
                    } else {
                        behind_root.join("bench/repo.reference")
                    };
                    Command::new("bash")
                        .arg(&replay)
                        .envs(hermetic_env(&sandbox))
                        .env("BUILDKITE_REPO", &url)
                        .env("BUILDKITE_COMMIT", &tip)
                        .env("BUILDKITE_BRANCH", &branch)
                        .env("CHECKOUT_DIR", dir)
                        .env("MIRROR_DIR", &mirror)
                        .env("BK_SEND_METADATA", "false")
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .unwrap()
                        .success()
                }
                4 => command(root)
                    .args(["clone", "-q", &url, dir.to_str().unwrap()])
                    .status()
                    .unwrap()
                    .success(),
                5 => Command::new("sh")
                    .args([
                        "-c",
                        "git --git-dir=\"$1\" archive \"$2\" | tar -x -C \"$3\"",
                        "sh",
                    ])
                    .arg(&current)
                    .arg(&tip)
                    .arg(dir)
                    .envs(hermetic_env(&sandbox))
                    .status()
                    .unwrap()
                    .success(),
                _ => unreachable!("one arm per case"),
            };
            let took = started.elapsed();
            assert!(ok, "{} failed in run {run}", case.name);
            let phases = matches!(i, 0 | 1 | 6).then(|| {
                let d = &sandbox.record()["durations_ms"];
                (
                    d["fetch"].as_u64().unwrap(),
                    d["checkout"].as_u64().unwrap(),
                )
            });
            case.samples.push(Sample {
                took,
                bytes: server.bytes_sent(),
                pack_bytes: server.pack_bytes_sent(),
                phases,
            });
        }
    }
    report(&cases);
    if std::env::var_os("BENCH_KEEP").is_some() {
        eprintln!("kept {} (server stopped)", sandbox.dir.keep().display());
    }
}

/// The repository under test, as a bare repository at `bare`, with a mirror `behind` commits
/// behind its default branch and an up-to-date one; returns its description.
fn prepare_repository(
    bare: &Path,
    url: &str,
    behind: usize,
    behind_mirror: &Path,
    current_mirror: &Path,
) -> String {
    if let Ok(source) = std::env::var("BENCH_REPO") {
        std::fs::create_dir_all(bare.parent().unwrap()).unwrap();
        git(
            bare.parent().unwrap(),
            &["clone", "-q", "--mirror", &source, bare.to_str().unwrap()],
        );
        git(bare, &["config", "uploadpack.allowAnySHA1InWant", "true"]);
        // The stale mirror is cloned while the default branch pointed `behind` commits back
        // (other refs may still hold some of the newer commits).
        let branch = git(bare, &["symbolic-ref", "HEAD"]);
        let tip = git(bare, &["rev-parse", "HEAD"]);
        git(bare, &["update-ref", &branch, &format!("{tip}~{behind}")]);
        clone_mirror(url, behind_mirror);
        git(bare, &["update-ref", &branch, &tip]);
        clone_mirror(url, current_mirror);
        let commits = git(bare, &["rev-list", "--count", "HEAD"]);
        let files = git(bare, &["ls-tree", "-r", "--name-only", "HEAD"])
            .lines()
            .count();
        return format!("repository {source}: {files} files, {commits} commits");
    }
    let shape = Shape {
        files: env_or("BENCH_FILES", 20_000),
        commits: env_or("BENCH_COMMITS", 3_000),
        branches: env_or("BENCH_BRANCHES", 500),
        tags: env_or("BENCH_TAGS", 200),
        pulls: env_or("BENCH_PULLS", 5_000),
    };
    let started = Instant::now();
    // Every ref lies in the older history, so the stale mirror lacks exactly the new commits.
    synthetic::generate(
        bare,
        Shape {
            commits: shape.commits - behind,
            ..shape
        },
    );
    clone_mirror(url, behind_mirror);
    synthetic::extend(bare, shape, behind);
    clone_mirror(url, current_mirror);
    format!(
        "generated repository: {} files, {} commits, {} branches, {} tags, {} pull-request refs ({:.1}s to generate)",
        shape.files,
        shape.commits,
        shape.branches,
        shape.tags,
        shape.pulls,
        started.elapsed().as_secs_f64()
    )
}

fn clone_mirror(url: &str, path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    git(
        path.parent().unwrap(),
        &["clone", "-q", "--mirror", url, path.to_str().unwrap()],
    );
}

fn hermetic_env(sandbox: &Sandbox) -> Vec<(&'static str, PathBuf)> {
    vec![
        ("HOME", sandbox.home.clone()),
        ("GIT_CONFIG_GLOBAL", sandbox.home.join(".gitconfig")),
        ("GIT_CONFIG_NOSYSTEM", "1".into()),
    ]
}

/// Ratios are medians of per-round ratios: each round runs every case once, back to back, so a
/// round's ratio cancels the machine's drift between rounds (seen here: the floor itself moving
/// from 370 ms to 590 ms between runs of this benchmark).
fn report(cases: &[Case]) {
    let find = |name: &str| {
        cases
            .iter()
            .find(|c| c.name == name && !c.samples.is_empty())
    };
    let floor = find("floor: git archive | tar -x");
    let replay_for = |case: &Case| {
        find(if case.name.contains("behind") {
            "replay (agent default), mirror behind"
        } else {
            "replay (agent default), mirror up to date"
        })
    };
    let paired = |a: &Case, b: Option<&Case>| -> Option<f64> {
        let took = |c: &Case| c.samples.iter().map(|s| s.took).collect::<Vec<_>>();
        Some(paired_ratio(&took(a), &took(b?)))
    };
    let show = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}"));

    println!();
    println!(
        "| case | median | × floor | × replay (same mirror) | bytes over the wire | object bytes |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for case in cases.iter().filter(|c| !c.samples.is_empty()) {
        let vs_replay = (case.name.starts_with("hook") || case.name.starts_with("replay"))
            .then(|| paired(case, replay_for(case)))
            .flatten();
        println!(
            "| {} | {:.0} ms | {} | {} | {} | {} |",
            case.name,
            median(case.samples.iter().map(|s| s.took).collect()).as_secs_f64() * 1000.0,
            show(paired(case, floor)),
            show(vs_replay),
            median(case.samples.iter().map(|s| s.bytes).collect()),
            median(case.samples.iter().map(|s| s.pack_bytes).collect()),
        );
    }
    println!();
    for case in cases
        .iter()
        .filter(|c| c.samples.iter().any(|s| s.phases.is_some()))
    {
        let phase = |f: fn((u64, u64)) -> u64| {
            median(
                case.samples
                    .iter()
                    .filter_map(|s| s.phases.map(f))
                    .collect(),
            )
        };
        println!(
            "{}: median fetch {} ms, checkout {} ms (the hook's own record)",
            case.name,
            phase(|p| p.0),
            phase(|p| p.1)
        );
    }
    println!();
    let (hook_current, hook_behind) = (&cases[0], &cases[1]);
    let check = |label: &str, ratio: Option<f64>, target: f64| {
        if let Some(r) = ratio {
            println!(
                "target {label} ≤ {target}: {r:.2} {}",
                if r <= target { "met" } else { "MISSED" }
            );
        }
    };
    check("hook up to date / floor", paired(hook_current, floor), 1.15);
    check(
        "hook up to date / replay",
        paired(hook_current, replay_for(hook_current)),
        0.4,
    );
    check(
        "hook behind / replay behind",
        paired(hook_behind, replay_for(hook_behind)),
        0.75,
    );
    check(
        "hook up to date / baseline hook",
        paired(hook_current, find(BASELINE)),
        1.05,
    );
    let pack = hook_current
        .samples
        .iter()
        .map(|s| s.pack_bytes)
        .max()
        .unwrap_or(0);
    println!(
        "target hook up to date: 0 object bytes over the wire: {pack} {}",
        if pack == 0 { "met" } else { "MISSED" }
    );
}
