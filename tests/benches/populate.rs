//! populate-mirror benchmark: against plain git doing the same job, in the same rounds, on
//! repositories served over smart HTTP on loopback.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench -p stateless-e2e --bench populate`
//!
//! Cases (each round runs every pair back to back; ratios are medians of per-round ratios):
//! - first populate of one large repository vs `git clone --mirror` of it;
//! - first populate of N small repositories (concurrency 4) vs `git clone --mirror` of each in turn;
//! - a refresh with nothing new, all repositories, vs `git ls-remote` of each in turn;
//! - a refresh with `BENCH_NEW_COMMITS` (200) new commits on the large repository vs
//!   `git fetch --prune` in a `--mirror` clone;
//! - a round of `populate-mirror --every` with nothing new, all repositories (one process, a
//!   round each 1 ms: the time between its round lines) vs a no-op refresh as a CronJob runs it
//!   today (a process per refresh), on the same volume;
//! - the claims mode's next generation after the new commits: populate into a copy of the last
//!   generation's volume (as a claim restored from its snapshot; the copy itself, the storage's
//!   work, is not timed) vs populate into an empty claim.
//!
//! Environment: `BENCH_RUNS` (5), `BENCH_REPOS` (4 small repositories), `BENCH_FILES` (20000),
//! `BENCH_COMMITS` (3000), `BENCH_BRANCHES` (200), `BENCH_TAGS` (100), `BENCH_PULLS` (0),
//! `BENCH_NEW_COMMITS` (200), `BENCH_TMPDIR` (`/dev/shm`). Pull-request refs are left out by
//! default: populate-mirror skips them, and `clone --mirror` would copy them; the facts note's
//! shape (`BENCH_FILES=3000 BENCH_COMMITS=20000 BENCH_PULLS=9000`) has them, served.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stateless_e2e::bench::{env_or, median, paired_ratio};
use stateless_e2e::git::{command, git};
use stateless_e2e::http_server::GitHttpServer;
use stateless_e2e::sandbox::{bin, Sandbox};
use stateless_e2e::synthetic::{self, Shape};

struct Pair {
    name: &'static str,
    baseline: &'static str,
    target: f64,
    ours: Vec<Duration>,
    theirs: Vec<Duration>,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let tmp = std::env::var("BENCH_TMPDIR").unwrap_or_else(|_| "/dev/shm".into());
    if Path::new(&tmp).is_dir() {
        std::env::set_var("TMPDIR", &tmp);
    }
    let runs = env_or("BENCH_RUNS", 5);
    let small_count = env_or("BENCH_REPOS", 4);
    let new_commits = env_or("BENCH_NEW_COMMITS", 200);
    let sandbox = Sandbox::new();
    let server = GitHttpServer::start(&sandbox.server_root);
    let large_shape = Shape {
        files: env_or("BENCH_FILES", 20_000),
        commits: env_or("BENCH_COMMITS", 3_000),
        branches: env_or("BENCH_BRANCHES", 200),
        tags: env_or("BENCH_TAGS", 100),
        pulls: env_or("BENCH_PULLS", 0),
    };
    let small_shape = Shape {
        files: 2_000,
        commits: 500,
        branches: 20,
        tags: 10,
        pulls: 0,
    };
    let started = Instant::now();
    let large_bare = sandbox.server_root.join("bench/large.git");
    let old_tip = synthetic::generate(&large_bare, large_shape);
    let new_tip = synthetic::extend(&large_bare, large_shape, new_commits);
    git(&large_bare, &["update-ref", "refs/heads/main", &old_tip]);
    let large = server.url("bench/large.git");
    let small: Vec<String> = (0..small_count)
        .map(|i| {
            let name = format!("bench/small-{i}.git");
            synthetic::generate(&sandbox.server_root.join(&name), small_shape);
            server.url(&name)
        })
        .collect();
    eprintln!(
        "large: {} files, {} commits (+{new_commits}), {} branches, {} tags; {small_count} small: {} files, {} commits; generated in {:.1}s; {runs} rounds",
        large_shape.files,
        large_shape.commits,
        large_shape.branches,
        large_shape.tags,
        small_shape.files,
        small_shape.commits,
        started.elapsed().as_secs_f64()
    );

    let mut pairs = [
        Pair {
            name: "first populate, 1 large repository",
            baseline: "git clone --mirror",
            target: 1.1,
            ours: vec![],
            theirs: vec![],
        },
        Pair {
            name: "first populate, small repositories",
            baseline: "git clone --mirror, one after another",
            target: 1.0,
            ours: vec![],
            theirs: vec![],
        },
        Pair {
            name: "refresh, nothing new, all repositories",
            baseline: "git ls-remote, one after another",
            target: 1.5,
            ours: vec![],
            theirs: vec![],
        },
        Pair {
            name: "refresh, new commits on the large repository",
            baseline: "git fetch --prune in a --mirror clone",
            target: f64::INFINITY,
            ours: vec![],
            theirs: vec![],
        },
        Pair {
            name: "claims: next generation, seeded from the last one's snapshot",
            baseline: "populate into an empty claim",
            target: f64::INFINITY,
            ours: vec![],
            theirs: vec![],
        },
        Pair {
            name: "`--every` round, nothing new, all repositories",
            baseline: "a no-op refresh, one process (today's CronJob)",
            target: f64::INFINITY,
            ours: vec![],
            theirs: vec![],
        },
    ];
    let work = sandbox.dir.path().join("work");
    let mut all = vec![large.clone()];
    all.extend(small.iter().cloned());
    for round in 0..runs {
        let dir = work.join(round.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let root = dir.join("root");
        let clones = dir.join("clones");
        std::fs::create_dir_all(&clones).unwrap();
        git(&large_bare, &["update-ref", "refs/heads/main", &old_tip]);

        pairs[0]
            .ours
            .push(time(|| populate(&sandbox, &root, &[&large])));
        pairs[0]
            .theirs
            .push(time(|| clone_mirror(&large, &clones.join("large.git"))));

        let small_refs: Vec<&str> = small.iter().map(String::as_str).collect();
        pairs[1]
            .ours
            .push(time(|| populate(&sandbox, &root, &small_refs)));
        pairs[1].theirs.push(time(|| {
            for (i, url) in small.iter().enumerate() {
                clone_mirror(url, &clones.join(format!("small-{i}.git")));
            }
        }));

        let all_refs: Vec<&str> = all.iter().map(String::as_str).collect();
        pairs[2]
            .ours
            .push(time(|| populate(&sandbox, &root, &all_refs)));
        pairs[2].theirs.push(time(|| {
            for url in &all {
                git(&dir, &["ls-remote", url]);
            }
        }));

        // The last generation's volume, as its snapshot will be restored into the next claim.
        let seeded = dir.join("seeded");
        std::fs::create_dir_all(&seeded).unwrap();
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", root.display()))
            .arg(&seeded)
            .status()
            .unwrap()
            .success();
        assert!(copied, "copying the volume");
        git(&large_bare, &["update-ref", "refs/heads/main", &new_tip]);
        pairs[4]
            .ours
            .push(time(|| populate(&sandbox, &seeded, &[&large])));
        let empty = dir.join("empty");
        pairs[4]
            .theirs
            .push(time(|| populate(&sandbox, &empty, &[&large])));
        pairs[3]
            .ours
            .push(time(|| populate(&sandbox, &root, &[&large])));
        pairs[3].theirs.push(time(|| {
            git(
                &clones.join("large.git"),
                &["fetch", "-q", "--prune", "origin"],
            );
        }));
    }

    // The last round's volume holds every repository, up to date.
    let root = work.join((runs - 1).to_string()).join("root");
    let all_refs: Vec<&str> = all.iter().map(String::as_str).collect();
    for _ in 0..runs {
        pairs[5]
            .theirs
            .push(time(|| populate(&sandbox, &root, &all_refs)));
    }
    pairs[5].ours = every_rounds(&sandbox, &root, &all_refs, runs);

    println!();
    println!("| case | populate-mirror (median) | baseline | baseline (median) | ratio (median of rounds) | target |");
    println!("|---|---:|---|---:|---:|---|");
    for pair in &pairs {
        let ratio = paired_ratio(&pair.ours, &pair.theirs);
        let target = if pair.target.is_finite() {
            format!(
                "≤ {}: {}",
                pair.target,
                if ratio <= pair.target {
                    "met"
                } else {
                    "MISSED"
                }
            )
        } else {
            "-".into()
        };
        println!(
            "| {} | {:.0} ms | {} | {:.0} ms | {ratio:.2} | {target} |",
            pair.name,
            ms(&pair.ours),
            pair.baseline,
            ms(&pair.theirs),
        );
    }
}

/// populate-mirror on `root` for `urls`, with the sandbox's git configuration.
fn populate_command(sandbox: &Sandbox, root: &Path, urls: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(bin("populate-mirror"));
    command
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", &sandbox.home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", sandbox.home.join(".gitconfig"))
        .env(
            "POPULATE_MIRROR_LOG",
            std::env::var("BENCH_POPULATE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .arg("--root")
        .arg(root)
        .args(urls);
    command
}

fn populate(sandbox: &Sandbox, root: &Path, urls: &[&str]) {
    let out = populate_command(sandbox, root, urls).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        if line.contains("published generation") {
            eprintln!("{line}");
        }
    }
}

/// `runs` rounds of one `populate-mirror --every 1ms`: the time from each round's log line to the
/// next (the first round, which starts the process, is left out).
fn every_rounds(sandbox: &Sandbox, root: &Path, urls: &[&str], runs: usize) -> Vec<Duration> {
    use std::io::BufRead;
    let mut child = populate_command(sandbox, root, urls)
        .env("POPULATE_MIRROR_LOG", "info")
        .args(["--every", "1ms"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut at = Vec::new();
    for line in stderr.lines().map_while(Result::ok) {
        if line.contains("\"round\":") {
            at.push(Instant::now());
            if at.len() > runs {
                break;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(at.len(), runs + 1, "populate-mirror --every stopped early");
    at.windows(2).map(|w| w[1] - w[0]).collect()
}

fn clone_mirror(url: &str, path: &PathBuf) {
    let ok = command(path.parent().unwrap())
        .args(["clone", "-q", "--mirror", url])
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "clone --mirror {url}");
}

fn time(f: impl FnOnce()) -> Duration {
    let started = Instant::now();
    f();
    started.elapsed()
}

fn ms(samples: &[Duration]) -> f64 {
    median(samples.to_vec()).as_secs_f64() * 1000.0
}
