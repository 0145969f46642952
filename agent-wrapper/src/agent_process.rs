//! Starting the agent with a clean slate: default dispositions and an empty mask for every
//! signal, only fds 0–2 (and an `fd://` token's), its own process group.
//!
//! Two traps from `../shared/notes/pid1.md` decide how: tokio's child handling races a
//! `waitpid(-1)` reaper for the agent's status, so the agent is spawned with std and reaped only
//! by the supervisor's loop; and std's posix_spawn path leaves glibc's signals 32 and 33 ignored
//! in the child, so a `pre_exec` forces the fork/exec path, where the dispositions are reset.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};
use nix::unistd::Pid;

/// Why the agent could not be started; exit codes 127 and 126, like a shell.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot run the agent {program}: not found; install buildkite-agent in the image or set AGENT_WRAPPER_AGENT")]
    NotFound { program: String },
    #[error(
        "cannot run the agent {program}: {source}; check the binary's permissions and architecture"
    )]
    NotExecutable {
        program: String,
        source: std::io::Error,
    },
}

/// Marks every inherited fd above 2 close-on-exec, so the agent gets only stdin, stdout and
/// stderr whatever the container runtime passed us, and `keep` (an `fd://` token's descriptor).
pub fn close_inherited_fds(keep: Option<i32>) {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2 && Some(*fd) != keep)
        .collect();
    for fd in fds {
        // Not ours to own: only its flags change. A fd closed meanwhile (the directory listing's
        // own) fails harmlessly.
        let _ = nix::fcntl::fcntl(
            borrow_fd(fd),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }
}

/// A borrowed fd for `fcntl`, which needs one; the fd may be invalid, which `fcntl` reports.
fn borrow_fd(fd: i32) -> std::os::fd::BorrowedFd<'static> {
    #[allow(unsafe_code)]
    // SAFETY: only used for one fcntl(F_SETFD) call, which tolerates an invalid descriptor.
    unsafe {
        std::os::fd::BorrowedFd::borrow_raw(fd)
    }
}

/// Starts `command` in its own process group with default signal handling.
pub fn spawn(mut command: Command, program: &Path) -> Result<Pid, SpawnError> {
    command.process_group(0);
    #[allow(unsafe_code)]
    // SAFETY: runs between fork and exec in a single-threaded child; it only calls sigaction
    // and sigprocmask, which are async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
            for signal in Signal::iterator() {
                if !matches!(signal, Signal::SIGKILL | Signal::SIGSTOP) {
                    let _ = sigaction(signal, &default);
                }
            }
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
            Ok(())
        });
    }
    let program_name = program.display().to_string();
    match command.spawn() {
        // The Child handle is dropped without waiting: the supervisor's loop reaps the agent.
        Ok(child) => Ok(Pid::from_raw(child.id() as i32)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(SpawnError::NotFound {
            program: program_name,
        }),
        Err(source) => Err(SpawnError::NotExecutable {
            program: program_name,
            source,
        }),
    }
}
