//! The PID-1 loop, in the manner of tini and catatonit: every signal the wrapper cares about is
//! blocked and read from a signalfd, the job hook's notifications arrive on a FIFO, and one
//! `poll` waits on both with the nearest deadline as its timeout. Nothing wakes the wrapper while
//! the agent works and nothing is due: no timer ticks, no polling.
//!
//! One loop does everything: forwards signals to the agent (each exactly once), reaps every child
//! (`waitpid(-1)` is the only reaper, so the agent's status is never lost), applies the stop
//! policy (TERM: graceful; after the deadline QUIT cancels the job; then KILL) and the watchdog
//! (the job ended but the agent did not exit).

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, killpg, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use stateless_core::job_record::JobRecord;

/// Signals passed on to the agent, as tini and dumb-init do.
pub const FORWARDED: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// Job-control signals that would stop the wrapper: read and dropped.
const SWALLOWED: [Signal; 3] = [Signal::SIGTSTP, Signal::SIGTTIN, Signal::SIGTTOU];

/// How long leftover processes get between TERM and KILL once the agent is gone.
const LEFTOVER_GRACE: Duration = Duration::from_secs(2);

pub struct Timings {
    pub stop_deadline: Duration,
    pub cancel_grace: Duration,
    pub watchdog: Duration,
}

/// How the agent ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentEnd {
    Exited(i32),
    Signaled(i32),
}

/// Who asked the agent to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// The pod is being stopped: the first TERM or INT the wrapper received.
    Signal(i32),
    /// The job ended but the agent did not exit within the watchdog's time.
    Watchdog,
}

/// The strongest step the stop policy reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Escalation {
    /// SIGTERM sent by the watchdog (a signal's TERM is the pod's, forwarded).
    Term,
    /// SIGQUIT: the job was cancelled.
    Quit,
    /// SIGKILL.
    Kill,
}

/// Everything the exit report needs from the loop.
#[derive(Debug)]
pub struct Supervision {
    pub agent: AgentEnd,
    pub stop: Option<StopCause>,
    pub escalation: Option<Escalation>,
    /// Signal numbers forwarded to the agent, in order.
    pub forwarded: Vec<i32>,
    /// Leftover processes terminated after the agent exited.
    pub leftovers: usize,
    pub job: Option<JobRecord>,
}

#[derive(Debug, thiserror::Error)]
#[error("the supervisor failed: {0}")]
pub struct SuperviseError(#[from] Errno);

/// Blocks the handled signals and opens the signalfd; call first thing, so a signal that arrives
/// before the loop runs is kept for it instead of lost.
pub fn take_signals() -> Result<SignalFd, SuperviseError> {
    let mut mask = SigSet::empty();
    for signal in FORWARDED.iter().chain(&SWALLOWED).chain([&Signal::SIGCHLD]) {
        mask.add(*signal);
    }
    mask.thread_block()?;
    Ok(SignalFd::with_flags(
        &mask,
        SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
    )?)
}

struct Loop<'a> {
    agent: Pid,
    timings: &'a Timings,
    job_record: &'a Path,
    end: Option<AgentEnd>,
    stop: Option<StopCause>,
    escalation: Option<Escalation>,
    /// When the next step of the stop policy is due.
    next_step_at: Option<Instant>,
    watchdog_at: Option<Instant>,
    forwarded: Vec<i32>,
    job: Option<JobRecord>,
}

/// Supervises the running `agent` until it has exited and no child is left.
pub fn supervise(
    signals: SignalFd,
    agent: Pid,
    job_record: &Path,
    job_events: &Path,
    timings: &Timings,
) -> Result<Supervision, SuperviseError> {
    let events = JobEvents::open(job_events)?;
    let mut state = Loop {
        agent,
        timings,
        job_record,
        end: None,
        stop: None,
        escalation: None,
        next_step_at: None,
        watchdog_at: None,
        forwarded: Vec::new(),
        job: None,
    };
    // The job may have ended before the FIFO existed.
    state.job_record_changed();
    while state.end.is_none() {
        let timeout = state.timeout();
        let mut fds = [
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(events.reader.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Err(Errno::EINTR) => continue,
            other => other?,
        };
        while let Some(info) = signals.read_signal()? {
            state.on_signal(info.ssi_signo as i32);
        }
        if events.drain() {
            state.job_record_changed();
        }
        state.on_time(Instant::now());
    }
    let leftovers = terminate_leftovers(&signals);
    state.job = JobRecord::load(job_record).or(state.job);
    Ok(Supervision {
        agent: state.end.unwrap_or(AgentEnd::Exited(0)),
        stop: state.stop,
        escalation: state.escalation,
        forwarded: state.forwarded,
        leftovers,
        job: state.job,
    })
}

impl Loop<'_> {
    fn timeout(&self) -> PollTimeout {
        let due = [self.next_step_at, self.watchdog_at]
            .into_iter()
            .flatten()
            .min();
        match due {
            None => PollTimeout::NONE,
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                // Round up: waking a millisecond early would just loop once more.
                PollTimeout::try_from(left + Duration::from_millis(1)).unwrap_or(PollTimeout::MAX)
            }
        }
    }

    fn on_signal(&mut self, number: i32) {
        let Ok(signal) = Signal::try_from(number) else {
            return;
        };
        if signal == Signal::SIGCHLD {
            self.reap();
            return;
        }
        if SWALLOWED.contains(&signal) {
            tracing::debug!("ignoring {signal}: PID 1 must not stop");
            return;
        }
        if self.end.is_none() {
            // The agent may have just exited unreaped; a failed kill is not an error.
            let _ = kill(self.agent, signal);
            self.forwarded.push(number);
            tracing::info!(signal = number, "forwarded {signal} to the agent");
        }
        if matches!(signal, Signal::SIGTERM | Signal::SIGINT) && self.stop.is_none() {
            self.stop = Some(StopCause::Signal(number));
            self.next_step_at = Some(Instant::now() + self.timings.stop_deadline);
            tracing::info!(
                "stop requested: the agent may finish its job for {}s, then it is cancelled",
                self.timings.stop_deadline.as_secs()
            );
        }
    }

    /// Collects every exited child; the agent's status is kept.
    fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == self.agent => {
                    self.end = Some(AgentEnd::Exited(code));
                }
                Ok(WaitStatus::Signaled(pid, signal, _)) if pid == self.agent => {
                    self.end = Some(AgentEnd::Signaled(signal as i32));
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    fn job_record_changed(&mut self) {
        let Some(record) = JobRecord::load(self.job_record) else {
            return;
        };
        if record.finished_at.is_some() && self.watchdog_at.is_none() {
            tracing::info!(
                "the job ended; the agent has {}s to exit",
                self.timings.watchdog.as_secs()
            );
            self.watchdog_at = Some(Instant::now() + self.timings.watchdog);
        }
        self.job = Some(record);
    }

    fn on_time(&mut self, now: Instant) {
        if self.end.is_some() {
            return;
        }
        if self.watchdog_at.is_some_and(|at| now >= at) {
            self.watchdog_at = None;
            tracing::warn!("the agent did not exit after its job; stopping it");
            self.stop = Some(StopCause::Watchdog);
            self.escalate(Escalation::Term, now);
        } else if self.next_step_at.is_some_and(|at| now >= at) {
            let next = match self.escalation {
                None | Some(Escalation::Term) => Escalation::Quit,
                Some(_) => Escalation::Kill,
            };
            self.escalate(next, now);
        }
    }

    fn escalate(&mut self, step: Escalation, now: Instant) {
        let (signal, message) = match step {
            Escalation::Term => (Signal::SIGTERM, "asking the agent to stop (SIGTERM)"),
            Escalation::Quit => (
                Signal::SIGQUIT,
                "cancelling the job (SIGQUIT) so Buildkite records it as cancelled",
            ),
            Escalation::Kill => (Signal::SIGKILL, "killing the agent and its processes"),
        };
        tracing::warn!("{message}");
        if step == Escalation::Kill {
            let _ = killpg(self.agent, Signal::SIGKILL);
        }
        let _ = kill(self.agent, signal);
        self.escalation = Some(step);
        self.next_step_at = (step != Escalation::Kill).then(|| now + self.timings.cancel_grace);
    }
}

/// The FIFO the job hook writes a byte to after it updates the job record. A FIFO rather than
/// inotify: closing an inotify instance costs milliseconds (an RCU grace period) on every exit,
/// several times a minimal init's whole start-up.
struct JobEvents {
    reader: std::fs::File,
    /// Held so the FIFO never reports end-of-file when a hook closes its end.
    _writer: std::fs::File,
}

impl JobEvents {
    fn open(path: &Path) -> Result<JobEvents, SuperviseError> {
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::remove_file(path);
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
        let open = |read: bool| {
            std::fs::OpenOptions::new()
                .read(read)
                .write(!read)
                .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                .open(path)
                .map_err(|e| SuperviseError(Errno::from_raw(e.raw_os_error().unwrap_or(0))))
        };
        let reader = open(true)?;
        let writer = open(false)?;
        Ok(JobEvents {
            reader,
            _writer: writer,
        })
    }

    /// Whether a notification came; reads them all.
    fn drain(&self) -> bool {
        use std::io::Read;
        let mut buf = [0u8; 64];
        let mut any = false;
        while let Ok(n) = (&self.reader).read(&mut buf) {
            if n == 0 {
                break;
            }
            any = true;
        }
        any
    }
}

/// After the agent: TERM to every remaining child (orphans re-parented to us), a short grace
/// with reaping, then KILL. Returns how many there were.
fn terminate_leftovers(signals: &SignalFd) -> usize {
    let first = children();
    if first.is_empty() {
        return 0;
    }
    tracing::info!("terminating {} leftover processes", first.len());
    for pid in &first {
        let _ = kill(*pid, Signal::SIGTERM);
    }
    if !reap_until_gone(signals, LEFTOVER_GRACE) {
        for pid in children() {
            let _ = kill(pid, Signal::SIGKILL);
        }
        // Bounded too: a process stuck in uninterruptible sleep must not keep the pod alive.
        if !reap_until_gone(signals, LEFTOVER_GRACE) {
            tracing::warn!("leftover processes survived SIGKILL; exiting without them");
        }
    }
    first.len()
}

/// Reaps children as they exit, for at most `limit`; whether none is left.
fn reap_until_gone(signals: &SignalFd, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            if status == WaitStatus::StillAlive {
                break;
            }
        }
        if children().is_empty() {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        // Woken by SIGCHLD, or at the deadline.
        let mut fds = [PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        let _ = poll(
            &mut fds,
            PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
        );
        while let Ok(Some(_)) = signals.read_signal() {}
    }
}

/// Our live children (as PID 1 or a subreaper, every orphan is one), from the kernel's own list:
/// no scan of every process on the machine.
fn children() -> Vec<Pid> {
    let me = std::process::id();
    let listed =
        std::fs::read_to_string(format!("/proc/{me}/task/{me}/children")).unwrap_or_default();
    listed
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .map(Pid::from_raw)
        .filter(|pid| !is_zombie(*pid))
        .collect()
}

fn is_zombie(pid: Pid) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // `pid (comm) state …`; comm may hold spaces or parentheses.
    stat.rsplit_once(") ")
        .is_none_or(|(_, rest)| rest.starts_with('Z'))
}

/// The state directory's job record path.
pub fn job_record_path(state_dir: &Path) -> PathBuf {
    state_dir.join("job-record.json")
}

/// The state directory's FIFO for job notifications.
pub fn job_events_path(state_dir: &Path) -> PathBuf {
    state_dir.join("job-events")
}
