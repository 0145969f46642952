//! The agent cancels a job by signalling the hook: it must stop git, leave nothing running, and
//! exit 128+signal promptly.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use stateless_e2e::http_server::{Fault, GitHttpServer, On};
use stateless_e2e::sandbox::Sandbox;

fn interrupt_mid_fetch(signal: Signal) -> (i32, Duration, Vec<String>) {
    let sandbox = Sandbox::new();
    let upstream = sandbox.upstream("acme/widgets.git");
    let server = GitHttpServer::start(&sandbox.server_root);
    server.inject(On::PackTransfer, Fault::StallAfter(100), 10);
    let child = sandbox
        .hook()
        .job(&server.url("acme/widgets.git"), &upstream.head(), "main")
        .spawn();
    // Wait until git is inside the transfer.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server.requests().contains(&"fetch".to_string()) {
        assert!(Instant::now() < deadline, "the fetch never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let sent = Instant::now();
    kill(Pid::from_raw(child.id() as i32), signal).unwrap();
    let out = child.wait_with_output().unwrap();
    let took = sent.elapsed();
    let leftovers = sandbox.leftover_processes();
    (
        out.status.code().expect("exited, not killed"),
        took,
        leftovers,
    )
}

#[test]
fn sigterm_during_a_fetch_stops_git_and_exits_143() {
    let (code, took, leftovers) = interrupt_mid_fetch(Signal::SIGTERM);
    assert_eq!(code, 143);
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn sigint_during_a_fetch_stops_git_and_exits_130() {
    let (code, took, leftovers) = interrupt_mid_fetch(Signal::SIGINT);
    assert_eq!(code, 130);
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
