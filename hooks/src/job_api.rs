//! Talking back to the agent after the checkout: variables through the Job API, and the commit
//! meta-data the agent would otherwise send itself. A binary hook cannot export variables, so
//! `buildkite-agent env set` is the only way later steps see `BUILDKITE_REPO_MIRROR`. None of
//! this may fail the job: the checkout is already correct on disk.

use std::path::Path;
use std::process::Stdio;

use stateless_core::git_command::Git;
use stateless_core::git_runner::{self, RunOptions};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// The meta-data key the agent uses for commit information.
pub const COMMIT_METADATA_KEY: &str = "buildkite:git:commit";

/// The agent's exact format (`internal/job/checkout.go`, `sendCommitToBuildkite`).
const COMMIT_LOG_FORMAT: &str =
    "--format=commit %H%nabbrev-commit %h%nAuthor: %an <%ae>%n%n%w(0,4,4)%B";

/// `buildkite-agent meta-data exists` exits with this when the key is absent.
const METADATA_ABSENT: i32 = 100;

pub struct Agent<'a> {
    pub bin: &'a Path,
}

impl Agent<'_> {
    /// `buildkite-agent env set NAME=VALUE…`; warns when the agent has no Job API.
    pub async fn export(&self, vars: &[(&str, &str)]) {
        let mut cmd = Command::new(self.bin);
        cmd.args(["env", "set"]);
        cmd.args(vars.iter().map(|(k, v)| format!("{k}={v}")));
        let names: Vec<&str> = vars.iter().map(|(k, _)| *k).collect();
        if let Err(why) = run(cmd, None).await {
            tracing::warn!(
                "could not export {} through the Job API ({why}); later steps will not see them. Use agent v3.128 or newer with the Job API enabled",
                names.join(", ")
            );
        }
    }

    /// Sends `buildkite:git:commit` unless it exists, exactly as the agent would.
    pub async fn send_commit_metadata(&self, git: &Git, checkout_dir: &Path, commit: &str) {
        let mut exists = Command::new(self.bin);
        exists.args(["meta-data", "exists", COMMIT_METADATA_KEY]);
        match run(exists, None).await {
            Ok(()) => {
                return tracing::info!("git commit information was already sent to Buildkite")
            }
            Err(RunError::Exit(METADATA_ABSENT, _)) => {}
            Err(why) => {
                return tracing::warn!(
                    "could not check the commit meta-data ({why}); the agent will send it itself"
                )
            }
        }
        let mut log = git.command(checkout_dir);
        log.args([
            "--no-pager",
            "log",
            "-1",
            commit,
            "-s",
            "--no-color",
            COMMIT_LOG_FORMAT,
        ]);
        let message = match git_runner::run(log, &RunOptions::default()).await {
            Ok(done) => done.stdout,
            Err(e) => return tracing::warn!("could not read the commit for meta-data: {e}"),
        };
        let mut set = Command::new(self.bin);
        set.args(["meta-data", "set", COMMIT_METADATA_KEY]);
        if let Err(why) = run(set, Some(message)).await {
            tracing::warn!(
                "could not send the commit meta-data ({why}); the agent will send it itself"
            );
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("{0}")]
    Spawn(std::io::Error),
    #[error("exit {0}: {1}")]
    Exit(i32, String),
}

async fn run(mut cmd: Command, stdin: Option<Vec<u8>>) -> Result<(), RunError> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(RunError::Spawn)?;
    if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(&bytes).await.map_err(RunError::Spawn)?;
    }
    let out = child.wait_with_output().await.map_err(RunError::Spawn)?;
    match out.status.code() {
        Some(0) => Ok(()),
        code => Err(RunError::Exit(
            code.unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr)
                .trim()
                .lines()
                .last()
                .unwrap_or("")
                .to_string(),
        )),
    }
}
