//! The real job-dispatcher pointed at the fakes, for the scenarios that run it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::fake_buildkite::FakeBuildkite;
use crate::sandbox::{bin, finish, Finished};

/// job-dispatcher as replica `name`, with only the fakes' addresses and `token`, its output
/// captured; the caller adds the queue, template and the rest.
pub fn job_dispatcher(
    kubeconfig: &Path,
    buildkite: &FakeBuildkite,
    token: &str,
    name: &str,
) -> Command {
    let mut command = Command::new(bin("job-dispatcher"));
    command
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("KUBECONFIG", kubeconfig)
        .env("BUILDKITE_AGENT_TOKEN", token)
        .env("BUILDKITE_AGENT_ENDPOINT", buildkite.endpoint())
        .env("POD_NAME", name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Stops it as Kubernetes would (SIGTERM, SIGKILL 5 s later) and collects its output.
pub fn stop(mut child: Child) -> Finished {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    finish(child)
}
