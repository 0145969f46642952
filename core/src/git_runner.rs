//! Running one git command: in its own process group, watched for stalls, killed as a group when
//! the caller gives up on it.
//!
//! Why a process group: `git fetch` forks `git-remote-https`, `index-pack`, `ssh`; killing only
//! the first pid leaves the rest running. Why not the `process-wrap` crate: all we need is
//! `process_group(0)` (std) and one `killpg` in a drop guard, which covers every way a caller
//! gives up — a stall, an attempt timeout, a signal that drops the whole checkout future.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::git_command::GitCommand;
use crate::repo_url::Redactor;

/// How many of git's last stderr lines an error keeps.
const STDERR_TAIL_LINES: usize = 20;

#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Kill the command when it writes nothing to stderr for this long. Only for commands that
    /// report progress (`fetch --progress`): a silent local command is not stalled.
    pub stall_timeout: Option<Duration>,
    pub redactor: Redactor,
    /// Log git's latest progress line this often, so a long clone shows in a non-interactive
    /// log (a Kubernetes Job's) that it is alive. Progress redraws are otherwise dropped.
    pub progress_every: Option<Duration>,
}

/// A command that exited 0.
#[derive(Debug)]
pub struct Finished {
    pub stdout: Vec<u8>,
}

/// How a git command failed. Every message is already redacted.
#[derive(Debug, thiserror::Error)]
pub enum GitFailure {
    #[error("could not start `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` made no progress for {}s and was killed", after.as_secs())]
    Stalled {
        command: String,
        after: Duration,
        stderr: Vec<String>,
    },
    #[error("`{command}` {}{}", describe(*status), last_line(stderr))]
    Exited {
        command: String,
        status: ExitStatus,
        stderr: Vec<String>,
    },
}

impl GitFailure {
    /// git's stderr lines before it failed (redacted).
    pub fn stderr(&self) -> &[String] {
        match self {
            GitFailure::Spawn { .. } => &[],
            GitFailure::Stalled { stderr, .. } | GitFailure::Exited { stderr, .. } => stderr,
        }
    }

    pub fn stderr_contains(&self, needle: &str) -> bool {
        self.stderr().iter().any(|l| l.contains(needle))
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "failed".into(),
    }
}

/// git's own last words when a program it ran failed (a credential helper, ssh): that program
/// said why on the line before, which is the cause to show.
const GENERIC_FATALS: &[&str] = &["told us to quit", "Could not read from remote repository"];

fn last_line(stderr: &[String]) -> String {
    let fatal = stderr
        .iter()
        .rposition(|l| l.starts_with("fatal:") || l.starts_with("error:"));
    let Some(at) = fatal.or(stderr.len().checked_sub(1)) else {
        return String::new();
    };
    let line = &stderr[at];
    let generic = GENERIC_FATALS.iter().any(|g| line.contains(g));
    match at.checked_sub(1).filter(|_| generic) {
        Some(reason) => format!(": {} ({line})", stderr[reason]),
        None => format!(": {line}"),
    }
}

/// Kills the command's whole process group when dropped, whether it finished or not: a finished
/// git may still have left a helper behind.
struct GroupKill(Pid);

impl Drop for GroupKill {
    fn drop(&mut self) {
        if killpg(self.0, Signal::SIGKILL).is_err() {
            return; // nothing was left in the group
        }
        // SIGKILL is delivered at once but done a moment later: wait (a second at most) until
        // no member is alive, so that a binary that exits next (a cancelled checkout) leaves
        // nothing running behind it. Zombies hold nothing and are their parents' to reap.
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while group_alive(self.0) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Whether a process of group `group` is alive and not a zombie (`/proc/<pid>/stat`: state and
/// pgrp are the first and third fields after the command's closing parenthesis).
fn group_alive(group: Pid) -> bool {
    let group = group.to_string();
    let entries = std::fs::read_dir("/proc").into_iter().flatten().flatten();
    entries.into_iter().any(|entry| {
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let fields = stat.rsplit_once(')').map(|(_, rest)| rest);
        let fields: Vec<&str> = fields.unwrap_or("").split_whitespace().collect();
        matches!(fields.as_slice(), [state, _, pgrp, ..] if *state != "Z" && *pgrp == group)
    })
}

/// Runs `command`, echoing its stderr lines (progress meters dropped) through `tracing` at info
/// level under target `git`.
pub async fn run(command: GitCommand, options: &RunOptions) -> Result<Finished, GitFailure> {
    let shown = options.redactor.apply(&command.display());
    tracing::info!(target: "git", "$ {shown}");
    let mut std_cmd = command.into_std();
    std_cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = tokio::process::Command::from(std_cmd)
        .spawn()
        .map_err(|source| GitFailure::Spawn {
            command: shown.clone(),
            source,
        })?;
    let _group = child.id().map(|id| GroupKill(Pid::from_raw(id as i32)));

    let mut stdout = child.stdout.take().expect("stdout is piped");
    let stdout_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        stdout.read_to_end(&mut buf).await.map(|_| buf)
    });
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let mut lines = StderrLines::default();
    let stall = options.stall_timeout;
    let mut deadline = stall.map(|d| Instant::now() + d);
    let mut chunk = [0u8; 8192];
    let mut next_report = options.progress_every.map(|d| Instant::now() + d);
    let stalled = |lines: StderrLines| GitFailure::Stalled {
        command: shown.clone(),
        after: stall.unwrap_or_default(),
        stderr: lines.tail,
    };

    loop {
        tokio::select! {
            read = stderr.read(&mut chunk) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    lines.push(&chunk[..n], &options.redactor);
                    deadline = stall.map(|d| Instant::now() + d);
                }
            },
            _ = sleep_until(deadline) => return Err(stalled(lines)),
            _ = sleep_until(next_report) => {
                if let Some(progress) = lines.take_progress() {
                    tracing::info!(target: "git", "{}", options.redactor.apply(&progress));
                }
                next_report = options.progress_every.map(|d| Instant::now() + d);
            }
        }
    }
    lines.finish(&options.redactor);
    let status = tokio::select! {
        status = child.wait() => status.map_err(|source| GitFailure::Spawn { command: shown.clone(), source })?,
        _ = sleep_until(deadline) => return Err(stalled(lines)),
    };
    let stdout = stdout_task
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    if status.success() {
        Ok(Finished { stdout })
    } else {
        Err(GitFailure::Exited {
            command: shown,
            status,
            stderr: lines.tail,
        })
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Splits git's stderr into lines. A segment ended by a lone `\r` is a progress meter redraw: it
/// proves liveness but is neither echoed nor kept. `\r\n` ends a line (ssh writes its errors,
/// "Host key verification failed.", that way).
#[derive(Default)]
struct StderrLines {
    partial: Vec<u8>,
    tail: Vec<String>,
    /// The last byte was `\r`: a redraw, unless `\n` follows.
    after_cr: bool,
    /// The latest progress redraw not yet reported.
    progress: Vec<u8>,
}

impl StderrLines {
    fn push(&mut self, bytes: &[u8], redactor: &Redactor) {
        for &b in bytes {
            if std::mem::take(&mut self.after_cr) && b != b'\n' {
                self.progress = std::mem::take(&mut self.partial);
            }
            match b {
                b'\r' => self.after_cr = true,
                b'\n' => self.emit(redactor),
                _ => self.partial.push(b),
            }
        }
    }

    fn take_progress(&mut self) -> Option<String> {
        let progress = std::mem::take(&mut self.progress);
        let text = String::from_utf8_lossy(&progress).trim().to_string();
        (!text.is_empty()).then_some(text)
    }

    fn finish(&mut self, redactor: &Redactor) {
        if !self.partial.is_empty() {
            self.emit(redactor);
        }
    }

    fn emit(&mut self, redactor: &Redactor) {
        let line = redactor.apply(String::from_utf8_lossy(&self.partial).trim_end());
        self.partial.clear();
        if line.is_empty() {
            return;
        }
        tracing::info!(target: "git", "{line}");
        if self.tail.len() == STDERR_TAIL_LINES {
            self.tail.remove(0);
        }
        self.tail.push(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::git_command::Git;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_failing_command_reports_its_fatal_line_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let git = Git::locate().unwrap();
        let mut cmd = git.command(dir.path());
        cmd.args(["ls-remote", "http://bob:s3cret@127.0.0.1:1/x.git"]);
        let options = RunOptions {
            redactor: Redactor::new(vec!["s3cret".into()]),
            ..Default::default()
        };
        let err = rt().block_on(run(cmd, &options)).unwrap_err().to_string();
        assert!(err.contains("exited with 128"), "{err}");
        assert!(err.contains("fatal:"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn a_credential_helper_or_ssh_that_made_git_fail_gives_its_reason() {
        let stderr = [
            "git-credential-github-app: installation 4 of App 1 was not found".to_string(),
            "fatal: credential helper 'github-app' told us to quit".to_string(),
        ];
        assert_eq!(
            last_line(&stderr),
            ": git-credential-github-app: installation 4 of App 1 was not found (fatal: credential helper 'github-app' told us to quit)"
        );
        assert_eq!(last_line(&stderr[1..]), format!(": {}", stderr[1]));
        assert_eq!(last_line(&[]), "");
        let ssh = [
            "Host key verification failed.".to_string(),
            "fatal: Could not read from remote repository.".to_string(),
            String::new(),
            "Please make sure you have the correct access rights".to_string(),
        ];
        assert_eq!(
            last_line(&ssh),
            ": Host key verification failed. (fatal: Could not read from remote repository.)"
        );
    }

    #[test]
    fn progress_redraws_are_dropped_and_lines_kept() {
        let mut lines = StderrLines::default();
        let r = Redactor::default();
        lines.push(
            b"Receiving objects:  1%\rReceiving objects: 50%\rdone.\nHost key failed.\r",
            &r,
        );
        lines.push(b"\nfatal: x", &r);
        lines.finish(&r);
        assert_eq!(lines.tail, ["done.", "Host key failed.", "fatal: x"]);
    }
}
