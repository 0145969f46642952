//! agent-wrapper as a container's PID 1 (its own PID namespace, via `unshare`), running the
//! stand-in agent for one job whose checkout is done by the real checkout-hook; then every item
//! of the PID-1 checklist in `../shared/notes/pid1.md`, and the stop policy, watchdog and exit
//! report.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use stateless_e2e::sandbox::{finish, namespace_init, wait_for, Invocation, Sandbox, AGENT_TOKEN};
use stateless_e2e::scenario::Served;

/// A fake agent: a shell script in the sandbox, for behaviours the stand-in has no reason to model.
/// It answers the wrapper's `--version` as a current agent.
fn fake_agent(sandbox: &Sandbox, name: &str, script: &str) -> PathBuf {
    let path = sandbox.dir.path().join(name);
    let version =
        "[ \"$1\" = --version ] && { echo 'buildkite-agent version 3.137.0, build fake'; exit 0; }";
    std::fs::write(&path, format!("#!/bin/sh\n{version}\n{script}\n")).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

/// A fake agent whose `setup` (traps) runs first, then it says it is ready and idles; the wrapper
/// runs it as PID 1 with `settings`. Returns once the agent is ready, with the namespace's init.
fn start_ready_agent(s: &Sandbox, setup: &str, settings: &[(&str, &str)]) -> (Child, Pid) {
    let ready = s.dir.path().join("ready");
    let agent = fake_agent(
        s,
        "scripted-agent",
        &format!(
            "{setup}\ntouch {}\nwhile :; do sleep 0.05; done",
            ready.display()
        ),
    );
    let mut wrapper = wrapper(s).env("AGENT_WRAPPER_AGENT", &agent);
    for (key, value) in settings {
        wrapper = wrapper.env(key, value);
    }
    let child = wrapper.as_pid1().spawn();
    let init = namespace_init(&child);
    wait_for("the agent", || ready.exists());
    (child, init)
}

/// Traps that append each of `signals` to `log` as it arrives, and exit 0 on TERM after logging it.
fn log_signals(signals: &[&str], log: &Path) -> String {
    format!(
        "for sig in {}; do trap \"echo $sig >> {log}\" $sig; done\n\
         trap 'echo TERM >> {log}; exit 0' TERM",
        signals.join(" "),
        log = log.display()
    )
}

fn signal(pid: Pid, signal: Signal) {
    kill(pid, signal).unwrap();
}

/// Processes of the PID namespace whose init is `init` that are zombies.
fn zombies_in_namespace(init: Pid) -> usize {
    let ns = std::fs::read_link(format!("/proc/{init}/ns/pid")).unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| std::fs::read_link(e.path().join("ns/pid")).is_ok_and(|n| n == ns))
        .filter(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        })
        .count()
}

fn wrapper(sandbox: &Sandbox) -> Invocation {
    sandbox
        .agent_wrapper()
        .env("AGENT_WRAPPER_IDLE_TIMEOUT", "20s")
        .env("AGENT_WRAPPER_WATCHDOG", "20s")
        .env("AGENT_WRAPPER_STATUS_INTERVAL", "300ms")
}

#[test]
fn one_job_runs_end_to_end_with_the_checkout_from_the_mirror_and_a_report() {
    let s = Served::new("acme/widgets.git");
    let populate = s.sandbox.populate_mirror().arg(&s.url).run();
    assert_eq!(populate.code(), Some(0), "{}", populate.log());
    let commit = s.upstream.head();

    let out = wrapper(&s.sandbox)
        .env("BUILDKITE_STANDIN_JOB_AFTER", "0.1")
        .env(
            "BUILDKITE_STANDIN_COMMAND",
            "test -f README.md && echo built",
        )
        .job(&s.url, &commit, "main")
        .with_read_only(&s.sandbox.mirrors)
        .as_pid1()
        .run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let r = s.sandbox.exit_report(&out);
    assert_eq!(r["reason"], "job-finished");
    assert_eq!(r["exit_code"], 0);
    assert_eq!(r["job"]["command_exit_status"], 0);
    assert!(r["job"]["job_id"]
        .as_str()
        .unwrap()
        .starts_with("standin-job-"));
    assert_eq!(r["checkout"]["outcome"], "succeeded");
    assert_eq!(r["checkout"]["mirror"], "hit");
    assert_eq!(r["checkout"]["commit"], commit.as_str());
    assert!(
        out.stdout.contains("built"),
        "the agent's output passes through"
    );
    assert!(!out.log().contains(AGENT_TOKEN));
    let message = std::fs::read_to_string(s.sandbox.termination_log()).unwrap();
    assert!(!message.contains(AGENT_TOKEN));
}

#[test]
fn the_agents_exit_code_passes_through_every_time() {
    let s = Sandbox::new();
    for run in 0..100 {
        let out = wrapper(&s)
            .env("BUILDKITE_STANDIN_MISBEHAVE", "crash=3")
            .as_pid1()
            .run();
        assert_eq!(out.code(), Some(3), "run {run}: {}", out.log());
    }
    let out = wrapper(&s)
        .env("BUILDKITE_STANDIN_MISBEHAVE", "crash=3")
        .as_pid1()
        .run();
    assert_eq!(s.exit_report(&out)["reason"], "agent-failed");
}

#[test]
fn death_by_signal_is_128_plus_the_signal() {
    let s = Sandbox::new();
    let agent = fake_agent(&s, "segv-agent", "kill -SEGV $$");

    let out = wrapper(&s)
        .env("AGENT_WRAPPER_AGENT", &agent)
        .as_pid1()
        .run();

    assert_eq!(out.code(), Some(139), "{}", out.log());
    let r = s.exit_report(&out);
    assert_eq!(r["reason"], "agent-killed");
    assert_eq!(r["agent_signal"], 11);
}

#[test]
fn an_agent_that_cannot_be_executed_is_127_or_126_naming_the_program() {
    let s = Sandbox::new();
    let missing = s.dir.path().join("no-such-agent");
    let out = wrapper(&s)
        .env("AGENT_WRAPPER_AGENT", &missing)
        .as_pid1()
        .run();
    assert_eq!(out.code(), Some(127), "{}", out.log());
    assert!(out.stderr.contains("no-such-agent"), "{}", out.stderr);
    assert_eq!(s.exit_report(&out)["reason"], "agent-not-found");

    let plain = s.dir.path().join("not-executable");
    std::fs::write(&plain, "#!/bin/sh\n").unwrap();
    let out = wrapper(&s)
        .env("AGENT_WRAPPER_AGENT", &plain)
        .as_pid1()
        .run();
    assert_eq!(out.code(), Some(126), "{}", out.log());
    assert_eq!(s.exit_report(&out)["reason"], "agent-not-executable");
}

#[test]
fn bad_configuration_fails_fast_with_one_line_naming_the_fix() {
    let s = Sandbox::new();
    let file = s.dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let cases: [(&str, &str, &str); 4] = [
        (
            "BUILDKITE_AGENT_TOKEN",
            "",
            "BUILDKITE_AGENT_TOKEN is not set",
        ),
        (
            "BUILDKITE_AGENT_TOKEN",
            "file:///no/such/token",
            "does not exist",
        ),
        (
            "BUILDKITE_BUILD_PATH",
            "",
            "BUILDKITE_BUILD_PATH is not set",
        ),
        ("AGENT_WRAPPER_IDLE_TIMEOUT", "soon", "--idle-timeout"),
    ];
    for (name, value, says) in cases {
        let mut invocation = wrapper(&s);
        invocation = if value.is_empty() {
            invocation.env_remove(name)
        } else {
            invocation.env(name, value)
        };
        let out = invocation.as_pid1().run();
        assert_eq!(out.code(), Some(78), "{name}: {}", out.log());
        let r = s.exit_report(&out);
        assert_eq!(r["reason"], "config-error");
        assert!(r["message"].as_str().unwrap().contains(says), "{r}");
    }
    let out = wrapper(&s)
        .env("BUILDKITE_BUILD_PATH", file.join("builds"))
        .as_pid1()
        .run();
    assert_eq!(out.code(), Some(78), "{}", out.log());
    assert!(s.exit_report(&out)["message"]
        .as_str()
        .unwrap()
        .contains("not writable"));
}

#[test]
fn an_agent_that_never_gets_a_job_exits_through_the_idle_timeout() {
    let s = Sandbox::new();
    let out = wrapper(&s)
        .env("AGENT_WRAPPER_IDLE_TIMEOUT", "1s")
        .as_pid1()
        .run();
    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(s.exit_report(&out)["reason"], "idle-timeout");
}

#[test]
fn sigterm_before_any_job_is_its_own_code() {
    let s = Sandbox::new();
    let child = wrapper(&s).as_pid1().spawn();
    let init = namespace_init(&child);
    wait_for("the agent to start", || {
        std::fs::read_to_string(format!("/proc/{init}/task/{init}/children"))
            .is_ok_and(|c| !c.trim().is_empty())
    });

    signal(init, Signal::SIGTERM);
    let out = finish(child);

    assert_eq!(out.code(), Some(81), "{}", out.log());
    let r = s.exit_report(&out);
    assert_eq!(r["reason"], "interrupted-before-job");
    assert_eq!(r["signals_forwarded"], serde_json::json!([15]));
}

#[test]
fn sigterm_during_a_job_lets_it_finish_then_cancels_it_at_the_deadline() {
    let s = Sandbox::new();
    let started = s.dir.path().join("command-started");
    let child = wrapper(&s)
        .env("AGENT_WRAPPER_STOP_DEADLINE", "1s")
        .env("AGENT_WRAPPER_CANCEL_GRACE", "5s")
        .env("BUILDKITE_STANDIN_JOB_AFTER", "0")
        .env(
            "BUILDKITE_STANDIN_COMMAND",
            format!("touch {}; sleep 30", started.display()),
        )
        .as_pid1()
        .spawn();
    let init = namespace_init(&child);
    wait_for("the job's command", || started.exists());

    signal(init, Signal::SIGTERM);
    let out = finish(child);

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let r = s.exit_report(&out);
    assert_eq!(r["reason"], "stopped", "{r}");
    assert!(r["stop"].as_str().unwrap().contains("Quit"), "{r}");
    assert!(r["message"].as_str().unwrap().contains("cancelled"), "{r}");
    assert!(
        r["job"]["finished_at"].is_u64(),
        "pre-exit ran after the cancel: {r}"
    );
    s.assert_no_leftover_processes();
}

#[test]
fn an_agent_that_lingers_after_its_job_is_stopped_by_the_watchdog() {
    // An agent deaf to TERM is sent QUIT, after which it exits by itself (its forced exit).
    for (misbehave, escalation) in [
        ("hang-after-job", "Term"),
        ("hang-after-job,ignore-term", "Quit"),
    ] {
        let s = Sandbox::new();
        let out = wrapper(&s)
            .env("AGENT_WRAPPER_WATCHDOG", "1s")
            .env("AGENT_WRAPPER_CANCEL_GRACE", "500ms")
            .env("BUILDKITE_STANDIN_JOB_AFTER", "0")
            .env("BUILDKITE_STANDIN_MISBEHAVE", misbehave)
            .as_pid1()
            .run();

        assert_eq!(out.code(), Some(80), "{misbehave}: {}", out.log());
        let r = s.exit_report(&out);
        assert_eq!(r["reason"], "watchdog");
        assert!(
            r["stop"].as_str().unwrap().contains(escalation),
            "{misbehave}: {r}"
        );
    }
}

#[test]
fn every_forwarded_signal_reaches_the_agent_once_in_order_and_job_control_does_not_stop_pid1() {
    let s = Sandbox::new();
    let log = s.dir.path().join("signals.log");
    let traps = log_signals(
        &[
            "HUP", "USR1", "USR2", "WINCH", "QUIT", "INT", "TSTP", "TTIN", "TTOU", "CHLD",
        ],
        &log,
    );
    let (child, init) = start_ready_agent(&s, &traps, &[]);

    let order = [
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGTSTP,
        Signal::SIGUSR2,
        Signal::SIGTTIN,
        Signal::SIGWINCH,
        Signal::SIGTTOU,
        Signal::SIGQUIT,
        Signal::SIGINT,
    ];
    for sig in order {
        signal(init, sig);
        std::thread::sleep(Duration::from_millis(150));
        let state = std::fs::read_to_string(format!("/proc/{init}/stat")).unwrap();
        let state = state.rsplit_once(") ").unwrap().1.chars().next().unwrap();
        assert_ne!(state, 'T', "PID 1 was stopped by {sig}");
    }
    signal(init, Signal::SIGTERM);
    let out = finish(child);

    // INT was the first stop request, and this agent never ran a job.
    assert_eq!(out.code(), Some(81), "{}", out.log());
    let seen = std::fs::read_to_string(&log).unwrap();
    // CHLD: the agent's own `sleep`s, never forwarded ones. Job control: never forwarded. HUP:
    // held, since this agent never answers its status (it would not have its handlers yet).
    let seen: Vec<&str> = seen.lines().filter(|l| *l != "CHLD").collect();
    assert_eq!(seen, ["USR1", "USR2", "WINCH", "QUIT", "INT", "TERM"]);
    let r = s.exit_report(&out);
    assert_eq!(
        r["signals_forwarded"],
        serde_json::json!([10, 12, 28, 3, 2, 15])
    );
    assert_eq!(r["signals_held"], serde_json::json!([1]));
}

#[test]
fn fault_signals_sent_to_pid1_are_not_forwarded_and_do_not_end_it() {
    let s = Sandbox::new();
    let log = s.dir.path().join("signals.log");
    let traps = log_signals(&["SEGV", "BUS", "FPE", "ILL", "ABRT", "TRAP", "SYS"], &log);
    let (child, init) = start_ready_agent(&s, &traps, &[]);

    for sig in [
        Signal::SIGSEGV,
        Signal::SIGBUS,
        Signal::SIGFPE,
        Signal::SIGILL,
        Signal::SIGABRT,
        Signal::SIGTRAP,
        Signal::SIGSYS,
    ] {
        signal(init, sig);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        std::fs::metadata(format!("/proc/{init}")).is_ok(),
        "PID 1 survived"
    );
    signal(init, Signal::SIGTERM);
    let out = finish(child);

    assert_eq!(out.code(), Some(81), "{}", out.log());
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "TERM\n");
    assert_eq!(
        s.exit_report(&out)["signals_forwarded"],
        serde_json::json!([15])
    );
}

#[test]
fn forwarding_to_an_agent_that_has_just_died_is_not_fatal() {
    let s = Sandbox::new();
    // The first USR1 ends the agent; the burst behind it finds it exiting, a zombie or gone.
    let (child, init) = start_ready_agent(&s, "trap 'exit 7' USR1", &[]);

    for _ in 0..50 {
        if kill(init, Signal::SIGUSR1).is_err() {
            break; // The wrapper has already exited.
        }
    }
    let out = finish(child);

    assert_eq!(out.code(), Some(7), "{}", out.log());
    let r = s.exit_report(&out);
    assert_eq!(r["reason"], "agent-failed");
    assert_eq!(r["agent_exit_code"], 7);
}

#[test]
fn the_agent_starts_with_a_clean_signal_state_only_three_fds_and_its_own_process_group() {
    let s = Sandbox::new();
    let out_file = s.dir.path().join("child-state");
    let agent = fake_agent(
        &s,
        "inspecting-agent",
        &format!(
            // Each inspection is a child of the agent's shell, reading its own /proc entry: what
            // the agent's children inherit (the shell blocks signals while it forks, and keeps
            // its script open close-on-exec, so its own entry would mislead).
            "grep -E '^(SigBlk|SigIgn)' /proc/self/status > {f}; ls /proc/self/fd | sort -n | tr '\\n' ' ' >> {f}; echo >> {f}; \
             cut -d' ' -f1,5 /proc/$$/stat >> {f}; pwd >> {f}",
            f = out_file.display()
        ),
    );
    // An extra descriptor the wrapper inherits and must not pass on.
    let out = wrapper(&s)
        .env("AGENT_WRAPPER_AGENT", &agent)
        .wrapped(&["sh", "-c", "exec 7</dev/null; exec \"$@\"", "sh"])
        .as_pid1()
        .run();

    assert_eq!(out.code(), Some(0), "{}", out.log());
    let state = std::fs::read_to_string(&out_file).unwrap();
    let lines: Vec<&str> = state.lines().collect();
    assert_eq!(lines[0], "SigBlk:\t0000000000000000", "{state}");
    // Signals 1–31 (bits 0–30). Above them, glibc's reserved 32 and 33 may be ignored by
    // whatever started the wrapper (a std posix_spawn does that); they cannot be reset portably
    // and no program handles them.
    let ignored = u64::from_str_radix(lines[1].trim_start_matches("SigIgn:\t"), 16).unwrap();
    assert_eq!(ignored & 0x7fff_ffff, 0, "{state}");
    // `ls` holds one more: the directory it is listing.
    assert_eq!(
        lines[2].trim(),
        "0 1 2 3",
        "only stdin, stdout, stderr: {state}"
    );
    let ids: Vec<&str> = lines[3].split_whitespace().collect();
    assert_eq!(ids[0], ids[1], "own process group: {state}");
    assert_eq!(Path::new(lines[4]), s.dir.path(), "cwd kept: {state}");
}

#[test]
fn orphans_are_reaped_and_leftovers_are_stopped_when_the_agent_exits() {
    let s = Sandbox::new();
    let spawned = s.dir.path().join("orphans-spawned");
    let agent = fake_agent(
        &s,
        "orphaning-agent",
        &format!(
            "i=0; while [ $i -lt 2000 ]; do (sleep 0.2 &); i=$((i+1)); done\n\
             touch {}\n\
             sleep 4\n\
             (sleep 300 &); (sleep 300 &); (trap '' TERM; sleep 300 &)\n\
             exit 0",
            spawned.display()
        ),
    );
    let child = wrapper(&s)
        .env("AGENT_WRAPPER_AGENT", &agent)
        .as_pid1()
        .spawn();
    let init = namespace_init(&child);
    // Every orphan has exited 0.2 s after the last was spawned; a second later none may be left
    // unreaped.
    wait_for("the orphans to be spawned", || spawned.exists());
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        zombies_in_namespace(init),
        0,
        "orphans were reaped while the agent ran"
    );

    let started = Instant::now();
    let out = finish(child);

    assert_eq!(out.code(), Some(0), "{}", out.log());
    // The agent sleeps ≤ 4 s more, then leftovers get TERM (and KILL after 2 s for the one
    // ignoring it).
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the wrapper did not linger"
    );
    assert_eq!(s.exit_report(&out)["leftover_processes"], 3);
    s.assert_no_leftover_processes();
}

#[test]
fn not_pid1_it_is_a_subreaper_for_the_agents_orphans() {
    let s = Sandbox::new();
    let pids = s.dir.path().join("orphan-pids");
    let agent = fake_agent(
        &s,
        "orphaning-agent",
        &format!(
            "(sleep 300 & echo $! > {}); sleep 1; exit 0",
            pids.display()
        ),
    );
    let child = wrapper(&s).env("AGENT_WRAPPER_AGENT", &agent).spawn();
    let wrapper_pid = child.id().to_string();
    wait_for("the orphan", || {
        std::fs::read_to_string(&pids).is_ok_and(|p| !p.trim().is_empty())
    });
    let orphan = std::fs::read_to_string(&pids).unwrap().trim().to_string();
    wait_for("the orphan to be re-parented", || {
        let stat = std::fs::read_to_string(format!("/proc/{orphan}/stat")).unwrap_or_default();
        stat.rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').nth(1).map(str::to_string))
            == Some(wrapper_pid.clone())
    });

    let out = finish(child);

    assert_eq!(out.code(), Some(0), "{}", out.log());
    assert_eq!(s.exit_report(&out)["leftover_processes"], 1);
    s.assert_no_leftover_processes();
}

#[test]
fn an_unwritable_termination_log_only_warns() {
    let s = Sandbox::new();
    let out = wrapper(&s)
        .env("AGENT_WRAPPER_TERMINATION_LOG", "/proc/no/such/file")
        .env("BUILDKITE_STANDIN_MISBEHAVE", "crash=4")
        .as_pid1()
        .run();
    assert_eq!(out.code(), Some(4), "{}", out.log());
    assert!(
        out.stderr
            .contains("could not write the termination message"),
        "{}",
        out.stderr
    );
    let line = out.stdout.lines().last().unwrap();
    assert_eq!(serde_json::from_str::<Value>(line).unwrap()["exit_code"], 4);
}

#[test]
fn the_agents_status_survives_an_orphan_exiting_in_the_same_sigchld_batch() {
    let s = Sandbox::new();
    let agent = fake_agent(&s, "racing-agent", "(exit 1) & (sleep 0 &); exit 7");
    for run in 0..200 {
        let out = wrapper(&s)
            .env("AGENT_WRAPPER_AGENT", &agent)
            .as_pid1()
            .run();
        assert_eq!(out.code(), Some(7), "run {run}: {}", out.log());
    }
}

#[test]
fn a_signal_that_arrives_while_the_wrapper_starts_is_not_lost() {
    let s = Sandbox::new();
    for run in 0..20 {
        let child = wrapper(&s).as_pid1().spawn();
        let init = namespace_init(&child);
        // As soon as the wrapper holds its signals (an init's signals that arrive before it has
        // a handler are dropped by the kernel, for any init), typically before the agent runs.
        // (unshare's child blocks TERM itself until it execs: check it is the wrapper already.)
        wait_for("the wrapper to take its signals", || {
            let exe = std::fs::read_link(format!("/proc/{init}/exe")).unwrap_or_default();
            if !exe.ends_with("agent-wrapper") {
                return false;
            }
            let status =
                std::fs::read_to_string(format!("/proc/{init}/status")).unwrap_or_default();
            status
                .lines()
                .find_map(|l| l.strip_prefix("SigBlk:\t"))
                .and_then(|m| u64::from_str_radix(m, 16).ok())
                .is_some_and(|m| m & (1 << 14) != 0)
        });
        signal(init, Signal::SIGTERM);
        let out = finish(child);
        assert_eq!(out.code(), Some(81), "run {run}: {}", out.log());
        assert_eq!(
            s.exit_report(&out)["signals_forwarded"],
            serde_json::json!([15])
        );
    }
}

#[test]
fn an_idle_wrapper_never_wakes_up() {
    let s = Sandbox::new();
    let agent = fake_agent(&s, "sleeping-agent", "sleep 3");
    let child = wrapper(&s)
        .env("AGENT_WRAPPER_AGENT", &agent)
        .as_pid1()
        .spawn();
    let init = namespace_init(&child);
    let switches = || {
        let status = std::fs::read_to_string(format!("/proc/{init}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    std::thread::sleep(Duration::from_millis(500));
    let before = switches();
    std::thread::sleep(Duration::from_secs(2));
    let after = switches();

    assert_eq!(after - before, 0, "wake-ups while the agent slept");
    assert_eq!(finish(child).code(), Some(0));
}

#[test]
fn an_agent_that_ignores_term_and_quit_is_killed_after_the_deadline() {
    let s = Sandbox::new();
    let (child, init) = start_ready_agent(
        &s,
        "trap '' TERM QUIT INT",
        &[
            ("AGENT_WRAPPER_STOP_DEADLINE", "300ms"),
            ("AGENT_WRAPPER_CANCEL_GRACE", "300ms"),
        ],
    );

    let started = Instant::now();
    signal(init, Signal::SIGTERM);
    let out = finish(child);

    // The agent's own forced exit is due 3 s after QUIT (3.x: cancel grace, at least 2 s, + 1 s);
    // the wrapper kills 2 s after that.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(9),
        "killed after the agent's cancel window, not before: {took:?}"
    );
    assert_eq!(out.code(), Some(81), "{}", out.log());
    let r = s.exit_report(&out);
    assert!(r["stop"].as_str().unwrap().contains("Kill"), "{r}");
    assert_eq!(r["agent_signal"], 9, "{r}");
    s.assert_no_leftover_processes();
}

#[test]
fn the_wrapper_exits_right_after_the_agent() {
    let s = Sandbox::new();
    let stamp = s.dir.path().join("agent-exit");
    // The agent's last act: the time (ns since the epoch) just before it exits.
    let agent = fake_agent(
        &s,
        "quick-agent",
        &format!("sleep 0.3; date +%s%N > {}", stamp.display()),
    );
    let mut lags = Vec::new();
    for _ in 0..10 {
        let out = wrapper(&s)
            .env("AGENT_WRAPPER_AGENT", &agent)
            .as_pid1()
            .run();
        let ended = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        assert_eq!(out.code(), Some(0), "{}", out.log());
        let agent_ended: u128 = std::fs::read_to_string(&stamp)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        lags.push(Duration::from_nanos((ended - agent_ended) as u64));
    }
    lags.sort();
    // The median, through unshare and the test's pipes, on a shared 2-core machine.
    assert!(lags[5] < Duration::from_millis(50), "{lags:?}");
}
