//! populate-mirror against real repositories served over smart HTTP: first populate, refreshes,
//! checkouts by checkout-hook from the volume while a refresh runs, crashes at every phase,
//! failures of some repositories, credentials, and hostile input.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::Value;
use stateless_e2e::git::git;
use stateless_e2e::sandbox::Sandbox;
use stateless_e2e::scenario::Served;

const REPO: &str = "acme/widgets.git";
const PUBLISHED: &str = "acme/widgets.reference";

fn manifest(sandbox: &Sandbox) -> Value {
    let text = std::fs::read_to_string(sandbox.mirrors.join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Branches and tags as `name sha` lines.
fn refs(git_dir: &Path) -> String {
    git(
        git_dir,
        &[
            "for-each-ref",
            "--format=%(refname) %(objectname)",
            "refs/heads",
            "refs/tags",
        ],
    )
}

/// The generation directories present for the repository.
fn generations(sandbox: &Sandbox) -> Vec<String> {
    let dir = sandbox.mirrors.join(".generations").join(PUBLISHED);
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn populate(s: &Served, extra: &[&str]) -> stateless_e2e::sandbox::Finished {
    s.sandbox.populate_mirror().args(extra).arg(&s.url).run()
}

/// Fails unless the published mirror is complete and readable: every ref resolves, every object
/// is connected.
fn assert_published_mirror_is_whole(sandbox: &Sandbox) {
    let published = sandbox.mirrors.join(PUBLISHED);
    git(
        &published,
        &["fsck", "--connectivity-only", "--no-dangling"],
    );
    assert!(!refs(&published).is_empty());
}

#[test]
fn a_first_populate_publishes_a_mirror_fast_to_read_that_the_hook_uses() {
    let s = Served::new(REPO);
    git(
        &s.upstream.bare,
        &["update-ref", "refs/pull/1/head", "main"],
    );

    let out = populate(&s, &[]);

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let published = s.sandbox.mirrors.join(PUBLISHED);
    assert_eq!(
        std::fs::read_link(&published).unwrap(),
        Path::new("../.generations/acme/widgets.reference/1")
    );
    assert_eq!(refs(&published), refs(&s.upstream.bare));
    assert!(!git(&published, &["for-each-ref"]).contains("refs/pull/"));
    assert_eq!(
        git(&published, &["symbolic-ref", "HEAD"]),
        "refs/heads/main"
    );
    assert_eq!(git(&published, &["config", "gc.auto"]), "0");
    assert!(published.join("objects/info/commit-graph").exists());
    assert!(published.join("packed-refs").exists());
    let packs: Vec<_> = std::fs::read_dir(published.join("objects/pack"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
        .collect();
    assert_eq!(packs.len(), 1);
    let entry = &manifest(&s.sandbox)["repositories"][0];
    assert_eq!(entry["url"], s.url.as_str());
    assert_eq!(entry["path"], PUBLISHED);
    assert_eq!(entry["generation"], 1);
    assert_eq!(entry["default_branch"], "main");
    assert_eq!(entry["head_commit"], s.upstream.rev("main").as_str());
    assert_eq!(entry["status"], "ok");
    let mode = std::fs::metadata(s.sandbox.mirrors.join("manifest.json"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o444,
        0o444
    );

    s.server.reset_counters();
    let checkout = s.checkout(&s.upstream.head(), "main");
    assert_eq!(checkout.code(), Some(0), "{}", checkout.log());
    let record = s.sandbox.record();
    assert_eq!(record["mirror"]["status"], "hit");
    assert_eq!(record["mirror"]["source"], "manifest");
    assert_eq!(s.server.pack_bytes_sent(), 0);
}

#[test]
fn a_refresh_follows_new_commits_branches_tags_deletions_and_force_pushes() {
    let mut s = Served::new(REPO);
    assert_eq!(populate(&s, &[]).code(), Some(0));
    let first = s.sandbox.mirrors.join(PUBLISHED).canonicalize().unwrap();
    let before = refs(&first);

    s.upstream.advance(3);
    let work = s.upstream.work.clone();
    git(&work, &["branch", "-D", "feature"]);
    git(&work, &["branch", "release", "main~1"]);
    git(&work, &["tag", "v2.0.0"]);
    git(&work, &["reset", "-q", "--hard", "main~2"]);
    s.upstream
        .commit("rewritten.txt", "force-pushed\n", "Rewrite history");
    s.upstream.publish();

    let out = populate(&s, &[]);

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let published = s.sandbox.mirrors.join(PUBLISHED);
    assert_eq!(refs(&published), refs(&s.upstream.bare));
    assert_eq!(manifest(&s.sandbox)["repositories"][0]["generation"], 2);
    // The first generation is untouched: a job that started on it still reads it.
    assert_eq!(refs(&first), before);
    assert_eq!(generations(&s.sandbox), ["1", "2"]);
    let checkout = s.checkout(&s.upstream.head(), "main");
    assert_eq!(checkout.code(), Some(0), "{}", checkout.log());
    assert_eq!(s.sandbox.record()["mirror"]["had_commit"], true);
}

#[test]
fn a_refresh_with_nothing_new_writes_no_generation() {
    let s = Served::new(REPO);
    assert_eq!(populate(&s, &[]).code(), Some(0));
    let volume_before = Sandbox::snapshot(&s.sandbox.mirrors.join(".generations"));
    s.server.reset_counters();

    let out = populate(&s, &[]);

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(
        Sandbox::snapshot(&s.sandbox.mirrors.join(".generations")),
        volume_before
    );
    assert_eq!(
        manifest(&s.sandbox)["repositories"][0]["status"],
        "unchanged"
    );
    let requests = s.server.requests();
    assert!(!requests.iter().any(|r| r == "fetch"), "{requests:?}");
}

#[test]
fn old_generations_are_removed_by_the_retention_rule_only() {
    let mut s = Served::new(REPO);
    for _ in 0..4 {
        s.upstream.advance(1);
        assert_eq!(populate(&s, &["--keep-generations", "1"]).code(), Some(0));
    }
    // Replaced less than 24 hours ago: all kept.
    assert_eq!(generations(&s.sandbox), ["1", "2", "3", "4"]);
    s.upstream.advance(1);
    let out = populate(&s, &["--keep-generations", "1", "--retain-for", "0s"]);
    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(generations(&s.sandbox), ["4", "5"]);
}

#[test]
fn checkouts_from_a_read_only_mount_succeed_while_a_refresh_runs() {
    let mut s = Served::new(REPO);
    assert_eq!(populate(&s, &[]).code(), Some(0));
    s.upstream.advance(30);
    let mut refresh = s.sandbox.populate_mirror().arg(&s.url).spawn();

    let mut checkouts = 0;
    loop {
        let done = refresh.try_wait().unwrap().is_some();
        s.sandbox.fresh_checkout_dir();
        let out = s
            .hook(&s.upstream.head(), "main")
            .with_read_only(&s.sandbox.mirrors)
            .run();
        assert_eq!(out.code(), Some(0), "checkout {checkouts}: {}", out.log());
        assert_ne!(s.sandbox.record()["mirror"]["status"], "fallback");
        checkouts += 1;
        if done && checkouts >= 3 {
            break;
        }
    }
    assert!(refresh.wait().unwrap().success());
}

/// Reads `child`'s log until a line shows `phase` starting, then keeps draining it in the
/// background (a closed pipe would fail the child's next log line). False if the log ended first.
fn wait_for_phase(child: &mut std::process::Child, phase: &str) -> bool {
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let needle = format!("\"phase\":\"{phase}\"");
    let seen = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|line| line.contains(&needle));
    std::thread::spawn(move || lines.for_each(drop));
    seen
}

fn signal(child: &std::process::Child, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
}

/// Processes die asynchronously after their namespace's init: give them a moment.
fn assert_no_leftovers_soon(sandbox: &Sandbox) {
    for _ in 0..100 {
        if sandbox.leftover_processes().is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    sandbox.assert_no_leftover_processes();
}

/// Runs a refresh in its own PID namespace and SIGKILLs the whole namespace (as a pod's death
/// does) when the log shows `phase` starting; then checks the volume and that the next run
/// recovers.
fn killed_during(phase: &str) {
    let mut s = Served::new(REPO);
    assert_eq!(populate(&s, &[]).code(), Some(0));
    s.upstream.advance(5);
    let mut child = s
        .sandbox
        .populate_mirror()
        .arg(&s.url)
        .env("POPULATE_MIRROR_LOG", "info")
        .wrapped(&["unshare", "--pid", "--fork", "--kill-child=SIGKILL"])
        .spawn();
    let seen = wait_for_phase(&mut child, phase);
    signal(&child, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
    assert!(seen, "the log never showed phase {phase}");
    assert_no_leftovers_soon(&s.sandbox);
    assert_published_mirror_is_whole(&s.sandbox);

    let out = populate(&s, &[]);

    assert_eq!(out.code(), Some(0), "{phase}: {}", out.log());
    assert_eq!(
        refs(&s.sandbox.mirrors.join(PUBLISHED)),
        refs(&s.upstream.bare)
    );
    let staging = s.sandbox.mirrors.join(".staging");
    let staged = std::fs::read_dir(&staging).map_or(0, |d| d.count());
    assert_eq!(staged, 0, "{phase}: nothing left staged");
    let current = manifest(&s.sandbox)["repositories"][0]["generation"]
        .as_u64()
        .unwrap();
    let present = generations(&s.sandbox);
    assert!(
        present.iter().all(|g| g.parse::<u64>().unwrap() <= current),
        "{phase}: unpublished generations left: {present:?} (current {current})"
    );
}

#[test]
fn a_crash_at_any_phase_leaves_the_published_mirror_whole_and_the_next_run_recovers() {
    for phase in ["prepare", "fetch", "optimize", "verify", "publish"] {
        killed_during(phase);
    }
}

#[test]
fn sigterm_stops_the_run_and_removes_what_was_not_published() {
    let mut s = Served::new(REPO);
    assert_eq!(populate(&s, &[]).code(), Some(0));
    s.upstream.advance(2);
    s.server.inject(
        stateless_e2e::http_server::On::PackTransfer,
        stateless_e2e::http_server::Fault::StallAfter(100),
        1,
    );
    let mut child = s.sandbox.populate_mirror().arg(&s.url).spawn();
    assert!(wait_for_phase(&mut child, "fetch"));
    std::thread::sleep(std::time::Duration::from_millis(300));
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let status = child.wait().unwrap();

    assert_eq!(status.code(), Some(143));
    s.sandbox.assert_no_leftover_processes();
    assert!(!s.sandbox.mirrors.join(".staging").exists());
    assert_eq!(generations(&s.sandbox), ["1"]);
    assert_published_mirror_is_whole(&s.sandbox);
}

#[test]
fn an_unreachable_repository_does_not_stop_the_others_and_the_exit_code_says_some_failed() {
    let s = Served::new(REPO);
    let dead = "http://127.0.0.1:1/acme/gone.git";

    let out = s
        .sandbox
        .populate_mirror()
        .args(["--attempts", "2", dead])
        .arg(&s.url)
        .run();

    assert_eq!(out.code(), Some(1), "{}", out.log());
    let repos = manifest(&s.sandbox)["repositories"].clone();
    let by_url = |url: &str| {
        repos
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["url"] == url)
            .cloned()
            .unwrap()
    };
    assert_eq!(by_url(&s.url)["status"], "ok");
    assert_eq!(by_url(dead)["status"], "failed");
    assert!(by_url(dead)["error"]
        .as_str()
        .unwrap()
        .contains("reachable"));

    let none = s
        .sandbox
        .populate_mirror()
        .args(["--attempts", "1", dead])
        .run();
    assert_eq!(none.code(), Some(3), "{}", none.log());
    // The good repository's generation is still published.
    assert_published_mirror_is_whole(&s.sandbox);
}

#[test]
fn credentials_fetch_but_never_reach_the_volume_or_the_output() {
    let s = Served::new(REPO);
    s.server.require_credentials("bob:s3cret-t0ken");
    let url = s.server.url_with_credentials(REPO, "bob:s3cret-t0ken");

    let out = s.sandbox.populate_mirror().arg(&url).run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert!(!out.log().contains("s3cret"), "{}", out.log());
    assert_eq!(
        git(
            &s.sandbox.mirrors.join(PUBLISHED),
            &["config", "remote.origin.url"]
        ),
        s.url
    );
    for file in walk(&s.sandbox.mirrors) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        let found = bytes.windows(6).any(|w| w == b"s3cret");
        assert!(!found, "{} holds the secret", file.display());
    }
}

#[test]
fn hostile_urls_are_refused_before_anything_is_written() {
    let s = Served::new(REPO);
    let pwned = s.sandbox.dir.path().join("pwned");
    for bad in [
        format!("--upload-pack=touch {}", pwned.display()),
        "https://example.com/acme/../../etc/passwd.git".to_string(),
        "ext::sh -c touch% /tmp/pwned".to_string(),
    ] {
        let out = s.sandbox.populate_mirror().arg("--").arg(&bad).run();
        assert_eq!(out.code(), Some(2), "{bad}: {}", out.log());
        assert_eq!(out.log().lines().count(), 1, "{}", out.log());
    }
    let file = s.sandbox.dir.path().join("repos.txt");
    std::fs::write(&file, format!("{}\n--upload-pack=x\n", s.url)).unwrap();
    let out = s
        .sandbox
        .populate_mirror()
        .arg("--repos-file")
        .arg(&file)
        .run();
    assert_eq!(out.code(), Some(2), "{}", out.log());
    assert!(out.log().contains("repos.txt:2"), "{}", out.log());
    assert!(!pwned.exists());
    assert!(!s.sandbox.mirrors.join(".generations").exists());
}

#[test]
fn submodules_named_by_the_default_branch_are_mirrored_too() {
    let s = Served::new(REPO);
    let _gadgets = s.sandbox.upstream("acme/gadgets.git");
    let work = &s.upstream.work;
    // The fixture's own origin is a local path: allow git's file transport for this one add.
    git(
        work,
        &[
            "-c",
            "protocol.file.allow=always",
            "submodule",
            "add",
            "-q",
            "../gadgets.git",
            "vendor/gadgets",
        ],
    );
    git(work, &["commit", "-q", "-m", "Vendor the gadgets"]);
    s.upstream.publish();

    let out = populate(&s, &[]);

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let gadgets = s.sandbox.mirrors.join("acme/gadgets.reference");
    assert_eq!(
        refs(&gadgets),
        refs(&s.sandbox.server_root.join("acme/gadgets.git"))
    );
    let off = s
        .sandbox
        .populate_mirror()
        .args(["--submodules", "false", "--root"])
        .arg(s.sandbox.dir.path().join("other-root"))
        .arg(&s.url)
        .run();
    assert_eq!(off.code(), Some(0), "{}", off.log());
    assert!(!s
        .sandbox
        .dir
        .path()
        .join("other-root/acme/gadgets.reference")
        .exists());
}

#[test]
fn a_second_run_while_one_holds_the_volume_is_refused() {
    let s = Served::new(REPO);
    s.server.inject(
        stateless_e2e::http_server::On::AnyRequest,
        stateless_e2e::http_server::Fault::StallAfter(0),
        1,
    );
    let mut first = s
        .sandbox
        .populate_mirror()
        .args(["--stall-timeout", "5s", "--attempts", "1"])
        .arg(&s.url)
        .spawn();
    let lock = s.sandbox.mirrors.join(".staging");
    while !lock.exists() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    let second = populate(&s, &[]);

    assert_eq!(second.code(), Some(4), "{}", second.log());
    assert!(second.log().contains("another populate-mirror"));
    let _ = first.kill();
    let _ = first.wait();
}

/// Every regular file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    Sandbox::snapshot(dir)
        .into_iter()
        .map(|(path, _, _)| path)
        .filter(|p| p.symlink_metadata().is_ok_and(|m| m.is_file()))
        .collect()
}

#[test]
fn a_generation_with_broken_history_is_never_published() {
    let mut s = Served::new(REPO);
    assert_eq!(populate(&s, &[]).code(), Some(0));
    let before = refs(&s.sandbox.mirrors.join(PUBLISHED));
    // The server loses an object of its newest commit (a small push leaves objects loose).
    let tip = s.upstream.advance(1);
    let blob = git(
        &s.upstream.bare,
        &["rev-parse", &format!("{tip}:changes/3.txt")],
    );
    let loose = s
        .upstream
        .bare
        .join("objects")
        .join(&blob[..2])
        .join(&blob[2..]);
    std::fs::remove_file(&loose).unwrap();

    let out = populate(&s, &["--fsck", "true", "--attempts", "1"]);

    assert_eq!(out.code(), Some(3), "{}", out.log());
    assert_eq!(refs(&s.sandbox.mirrors.join(PUBLISHED)), before);
    assert_eq!(generations(&s.sandbox), ["1"]);
    let entry = &manifest(&s.sandbox)["repositories"][0];
    assert_eq!(entry["status"], "failed");
    assert_eq!(
        entry["generation"], 1,
        "the entry still names the published generation"
    );
}

#[test]
fn credentials_given_by_environment_fetch_and_stay_off_the_volume() {
    use base64::Engine;
    let s = Served::new(REPO);
    s.server.require_credentials("ci:env-t0ken");
    let header = format!(
        "Authorization: Basic {}",
        base64::engine::general_purpose::STANDARD.encode("ci:env-t0ken")
    );

    let out = s
        .sandbox
        .populate_mirror()
        .env("GIT_CONFIG_COUNT", "1")
        .env("GIT_CONFIG_KEY_0", "http.extraHeader")
        .env("GIT_CONFIG_VALUE_0", &header)
        .arg(&s.url)
        .run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    for file in walk(&s.sandbox.mirrors) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !bytes
                .windows(9)
                .any(|w| w == b"env-t0ken" || w == &header.as_bytes()[..9]),
            "{} holds the credential",
            file.display()
        );
    }
}

#[test]
fn a_manifest_that_cannot_be_written_is_its_own_exit_code() {
    let s = Served::new(REPO);
    // A directory where the manifest goes: the rename over it fails.
    std::fs::create_dir_all(s.sandbox.mirrors.join("manifest.json/blocked")).unwrap();

    let out = populate(&s, &[]);

    assert_eq!(out.code(), Some(5), "{}", out.log());
    assert!(
        out.log().contains("cannot write the manifest"),
        "{}",
        out.log()
    );
    // The mirror itself was published: readers find it by its layout name.
    assert_published_mirror_is_whole(&s.sandbox);
}

#[test]
fn a_stalled_transfer_is_killed_and_retried_and_a_refresh_past_its_timeout_is_stopped() {
    use stateless_e2e::http_server::{Fault, On};
    let s = Served::new(REPO);
    s.server.inject(On::PackTransfer, Fault::StallAfter(100), 1);

    let out = populate(&s, &["--stall-timeout", "1s", "--attempts", "2"]);

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert!(out.log().contains("made no progress"), "{}", out.log());
    assert!(out.log().contains("retrying"), "{}", out.log());
    assert_published_mirror_is_whole(&s.sandbox);

    let mut s = Served::new(REPO);
    s.upstream.advance(1);
    s.server.inject(On::AnyRequest, Fault::StallAfter(0), 1);
    let started = std::time::Instant::now();
    let out = populate(&s, &["--stall-timeout", "60s", "--timeout", "1s"]);
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    assert_eq!(out.code(), Some(3), "{}", out.log());
    let entry = &manifest(&s.sandbox)["repositories"][0];
    assert!(
        entry["error"].as_str().unwrap().contains("--timeout"),
        "{entry}"
    );
    s.sandbox.assert_no_leftover_processes();
}

/// The same volume serves stock agents: each mirror is also published under the name the agent
/// derives from the URL (`internal/job/checkout_mirror.go`), a symlink to the published path, so
/// one rename switches both names. The replay of the agent's default checkout with
/// `git-mirrors-skip-update` then borrows from the published generation.
#[test]
fn each_mirror_is_also_published_under_the_stock_agents_name() {
    let mut s = Served::new(REPO);
    let stock = stateless_e2e::parity::stock_name(&s.url);

    let out = populate(&s, &[]);
    assert_eq!(out.code(), Some(0), "{}", out.log());
    let alias = s.sandbox.mirrors.join(&stock);
    assert_eq!(std::fs::read_link(&alias).unwrap(), Path::new(PUBLISHED));
    let resolved = |p: &Path| p.canonicalize().unwrap();
    assert_eq!(
        resolved(&alias),
        resolved(&s.sandbox.mirrors.join(PUBLISHED))
    );

    let newer = s.upstream.advance(2);
    let out = populate(&s, &[]);
    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert!(resolved(&alias).ends_with(".generations/acme/widgets.reference/2"));
    assert_eq!(git(&alias, &["rev-parse", "main"]), newer);

    let Some(script) = stateless_e2e::parity::reference_script() else {
        return;
    };
    let checkout = s.sandbox.dir.path().join("stock-checkout");
    std::fs::create_dir_all(&checkout).unwrap();
    let mut cmd = std::process::Command::new("bash");
    let out = s
        .sandbox
        .job_environment(cmd.arg(script))
        .current_dir(&checkout)
        .env("CHECKOUT_DIR", &checkout)
        .env("BUILDKITE_GIT_MIRRORS_PATH", &s.sandbox.mirrors)
        .env("BUILDKITE_GIT_MIRRORS_SKIP_UPDATE", "true")
        .env(
            "BUILDKITE_STANDIN_STATE",
            s.sandbox.dir.path().join("stock-agent"),
        )
        .env("BUILDKITE_REPO", &s.url)
        .env("BUILDKITE_COMMIT", &newer)
        .env("BUILDKITE_BRANCH", "main")
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{log}");
    let alternates =
        std::fs::read_to_string(checkout.join(".git/objects/info/alternates")).unwrap();
    assert!(
        alternates.contains(".generations/acme/widgets.reference/2/objects"),
        "{alternates}\n{log}"
    );
}

/// A directory of the stock agent's own at that name is left alone, with a warning.
#[test]
fn a_stock_agents_own_mirror_at_that_name_is_left_alone() {
    let s = Served::new(REPO);
    let stock = stateless_e2e::parity::stock_name(&s.url);
    let theirs = s.sandbox.mirrors.join(&stock);
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(theirs.join("HEAD"), "ref: refs/heads/main\n").unwrap();

    let out = populate(&s, &[]);

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert!(
        out.log()
            .contains("not published under the stock agent's name"),
        "{}",
        out.log()
    );
    assert!(theirs.is_dir() && !theirs.is_symlink());
    assert_eq!(
        std::fs::read_to_string(theirs.join("HEAD")).unwrap(),
        "ref: refs/heads/main\n"
    );
}

/// `--every`: a round now, then one each interval: a commit pushed meanwhile is published by the
/// next round, each round is one log line, and SIGTERM between rounds leaves nothing staged.
#[test]
fn every_refreshes_each_interval_until_a_signal_stops_it() {
    let mut s = Served::new(REPO);
    let mut child = s
        .sandbox
        .populate_mirror()
        .args(["--every", "1s"])
        .arg(&s.url)
        .env("POPULATE_MIRROR_LOG", "info")
        .spawn();
    let rounds = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let seen = rounds.clone();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v["round"].is_u64() {
                    seen.lock().unwrap().push(v);
                }
            }
        }
    });
    stateless_e2e::sandbox::wait_for("the first round", || !rounds.lock().unwrap().is_empty());
    let head = s.upstream.advance(1);
    let published = s.sandbox.mirrors.join(PUBLISHED);
    stateless_e2e::sandbox::wait_for("the new commit published", || {
        refs(&published).contains(&head)
    });
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let status = child.wait().unwrap();

    assert_eq!(status.code(), Some(143));
    let rounds = rounds.lock().unwrap();
    assert!(rounds.len() >= 2, "{rounds:?}");
    assert_eq!(rounds[0]["succeeded"], 1);
    let next = rounds[0]["next_in_s"].as_u64().unwrap();
    assert!(next <= 1, "a tenth of 1 s of jitter at most: {next}");
    s.sandbox.assert_no_leftover_processes();
    assert!(!s.sandbox.mirrors.join(".staging").exists());
    assert_published_mirror_is_whole(&s.sandbox);
}

/// What no later round could fix ends `--every` at once, with the bad-input exit code.
#[test]
fn every_stops_at_once_on_a_repository_list_it_cannot_read() {
    let s = Served::new(REPO);
    let out = s
        .sandbox
        .populate_mirror()
        .args(["--every", "1s", "--repos-file", "/nonexistent/repositories"])
        .run();
    assert_eq!(out.code(), Some(2), "{}", out.log());
    assert!(
        out.stderr.contains("/nonexistent/repositories"),
        "{}",
        out.log()
    );
}
