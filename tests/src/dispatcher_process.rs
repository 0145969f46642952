//! The real job-dispatcher pointed at the fakes, for the scenarios that run it.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::fake_buildkite::FakeBuildkite;
use crate::sandbox::{bin, Finished};

/// The image the scenarios' dispatchers give their agents (the shipped template names the
/// placeholder; a dispatcher outside a pod has no image of its own to give).
pub const AGENT_IMAGE: &str = "registry.example.com/stateless-agent:latest";

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
        .env("DISPATCHER_IMAGE", AGENT_IMAGE)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// A running job-dispatcher whose output is read as it comes: a pipe left unread fills at
/// 64 KiB, and the dispatcher's one thread then blocks in its next log line, API call done and
/// line unwritten.
pub struct Running {
    child: Child,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
}

/// A scenario that panics drops its dispatchers unstopped: they must not outlive it.
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    pub fn spawn(command: &mut Command) -> Running {
        let mut child = command.spawn().expect("job-dispatcher starts");
        let drain = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut text = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut text);
                }
                String::from_utf8_lossy(&text).into_owned()
            })
        };
        let stdout = drain(
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let stderr = drain(
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        Running {
            child,
            stdout: Some(stdout),
            stderr: Some(stderr),
        }
    }

    /// SIGKILL, as a node's crash: nothing is tidied up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// Stops it as Kubernetes would (SIGTERM, SIGKILL 5 s later) and collects its output.
    pub fn stop(mut self) -> Finished {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        self.finish()
    }

    /// Waits for it to end by itself, and collects its output.
    pub fn finish(mut self) -> Finished {
        let status = self.child.wait().expect("job-dispatcher ends");
        Finished {
            status,
            stdout: self
                .stdout
                .take()
                .and_then(|t| t.join().ok())
                .unwrap_or_default(),
            stderr: self
                .stderr
                .take()
                .and_then(|t| t.join().ok())
                .unwrap_or_default(),
        }
    }
}
