//! The PID-1 loop, in the manner of tini and catatonit: every signal the wrapper cares about is
//! blocked and read from a signalfd, the job hook's notifications arrive on a FIFO, and one
//! `poll` waits on both with the nearest deadline as its timeout. Nothing wakes the wrapper while
//! the agent waits for its job: no timer ticks, no polling.
//!
//! One loop does everything: forwards signals to the agent (each exactly once), reaps every child
//! (`waitpid(-1)` is the only reaper, so the agent's status is never lost), applies the stop
//! policy and the watchdog.
//!
//! **The agent's own state decides** whether a job is over ([`crate::agent_status`]): the agent
//! is busy from accepting a job until FinishJob has returned, and only then idle. The hooks'
//! records say when the job started and when its command ended. So:
//! - A job whose command has ended is never signalled: after its global `pre-exit` hook the
//!   agent still runs the repository's and plugins' pre-exit hooks, uploads the log tail and
//!   calls FinishJob (each retried for minutes), and a QUIT or second TERM then would make it
//!   exit 1 with the job's result lost.
//! - The watchdog counts from the agent being idle after its job: that agent has nothing left to
//!   do and only a hang keeps it.
//! - The status is asked when a hook reports, at the watchdog's and the stop deadline's times,
//!   and every `status_interval` while a job runs or reports (so a job whose `pre-exit` never ran,
//!   after a hard cancel, is still seen to end); never while the agent waits for its job.

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

use crate::agent_status::StatusServer;

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

/// After the agent's own forced exit is due, this long before the wrapper kills it.
const KILL_MARGIN: Duration = Duration::from_secs(2);

/// The longest a pod stop can take the wrapper: the stop deadline, the agent's cancel window,
/// then the kill. The pod's `terminationGracePeriodSeconds` must cover it, plus a moment for the
/// report (tests/tests/kubernetes_manifests.rs checks the example Job).
pub fn longest_stop(stop_deadline: Duration, cancel_window: Duration) -> Duration {
    stop_deadline + cancel_window + KILL_MARGIN
}

pub struct Timings {
    pub stop_deadline: Duration,
    /// From a cancel to the agent's own forced exit ([`crate::agent_version::Version::cancel_window`]).
    pub cancel_window: Duration,
    pub watchdog: Duration,
    /// After the job's command ended, how long the agent may stay busy, or not answer, before
    /// the watchdog acts anyway: above the agent's own retries of the log upload and FinishJob.
    pub report_deadline: Duration,
    pub status_interval: Duration,
    /// No job started by then: stop the agent. `None`: never.
    pub job_deadline: Option<Duration>,
    /// The agent's `--disconnect-after-idle-timeout` (`None`: off), to tell an idle timeout from
    /// a job refused before its hooks.
    pub idle_timeout: Option<Duration>,
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
    /// The job was over (the agent idle after it) but the agent did not exit within the
    /// watchdog's time.
    Watchdog,
    /// No job started before the job deadline.
    NoJob,
}

/// The strongest step the stop policy reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Escalation {
    /// SIGTERM sent by the wrapper (a signal's TERM is the pod's, forwarded).
    Term,
    /// SIGQUIT: the job, if any, was cancelled.
    Quit,
    /// SIGKILL.
    Kill,
}

/// Where the job is, as far as the wrapper knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum JobPhase {
    /// No job yet.
    Waiting,
    /// The agent holds a job (busy, or its `environment` hook reported) and its command has not
    /// ended.
    Running,
    /// The command ended (`pre-exit` reported); the agent is still reporting the result.
    Reporting,
    /// The agent is idle after its job: the result is with Buildkite.
    Over,
}

/// Everything the exit report needs from the loop.
#[derive(Debug)]
pub struct Supervision {
    pub agent: AgentEnd,
    pub stop: Option<StopCause>,
    pub escalation: Option<Escalation>,
    /// Signal numbers forwarded to the agent, in order.
    pub forwarded: Vec<i32>,
    /// Signal numbers not forwarded because the agent had no handlers yet.
    pub held: Vec<i32>,
    /// Leftover processes terminated after the agent exited.
    pub leftovers: usize,
    pub job: Option<JobRecord>,
    pub phase: JobPhase,
    /// The agent exited before its idle timeout could have run out.
    pub exited_before_idle_timeout: bool,
    /// Times `/status.json` was asked.
    pub status_queries: u32,
    /// The job the agent was started to acquire (`--acquire-job`), if any; the caller's to set.
    pub acquire_job: Option<String>,
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
    status: StatusServer,
    end: Option<AgentEnd>,
    stop: Option<StopCause>,
    escalation: Option<Escalation>,
    /// The next step of an escalation (QUIT after TERM, KILL after QUIT).
    next_step_at: Option<Instant>,
    /// The pod's stop deadline.
    stop_deadline_at: Option<Instant>,
    job_deadline_at: Option<Instant>,
    /// When to ask the agent's status next.
    ask_at: Option<Instant>,
    /// Since when the agent is known idle after its job.
    over_since: Option<Instant>,
    /// Since when the job's command is known to have ended.
    reporting_since: Option<Instant>,
    phase: JobPhase,
    /// The agent answered, or a hook ran: its signal handlers are installed.
    agent_up: bool,
    forwarded: Vec<i32>,
    held: Vec<i32>,
    job: Option<JobRecord>,
    status_queries: u32,
}

/// Supervises the running `agent` until it has exited and no child is left.
pub fn supervise(
    signals: SignalFd,
    agent: Pid,
    status: StatusServer,
    job_record: &Path,
    job_events: &Path,
    timings: &Timings,
) -> Result<Supervision, SuperviseError> {
    let events = JobEvents::open(job_events)?;
    let started = Instant::now();
    let mut state = Loop {
        agent,
        timings,
        job_record,
        status,
        end: None,
        stop: None,
        escalation: None,
        next_step_at: None,
        stop_deadline_at: None,
        job_deadline_at: timings.job_deadline.map(|d| started + d),
        ask_at: None,
        over_since: None,
        reporting_since: None,
        phase: JobPhase::Waiting,
        agent_up: false,
        forwarded: Vec::new(),
        held: Vec::new(),
        job: None,
        status_queries: 0,
    };
    // The job may have started before the FIFO existed.
    state.job_record_changed(Instant::now());
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
            state.job_record_changed(Instant::now());
        }
        state.on_time(Instant::now());
    }
    let ran_for = started.elapsed();
    let leftovers = terminate_leftovers(&signals);
    state.job = JobRecord::load(job_record).or(state.job);
    Ok(Supervision {
        agent: state.end.unwrap_or(AgentEnd::Exited(0)),
        stop: state.stop,
        escalation: state.escalation,
        forwarded: state.forwarded,
        held: state.held,
        leftovers,
        job: state.job,
        phase: state.phase,
        exited_before_idle_timeout: timings.idle_timeout.is_some_and(|t| ran_for < t),
        status_queries: state.status_queries,
        acquire_job: None,
    })
}

impl Loop<'_> {
    fn timeout(&self) -> PollTimeout {
        let job_deadline = self
            .job_deadline_at
            .filter(|_| self.phase == JobPhase::Waiting);
        let due = [
            self.next_step_at,
            self.stop_deadline_at,
            self.ask_at,
            job_deadline,
        ]
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
        if self.end.is_some() {
            return;
        }
        // Until the agent has installed its handlers (after registering, which can take
        // minutes), HUP would kill it, and once it has, it ignores HUP.
        if signal == Signal::SIGHUP && !self.agent_up && !self.ask(Instant::now()) {
            self.held.push(number);
            tracing::info!(
                signal = number,
                "not forwarding SIGHUP: the agent has not installed its signal handlers yet"
            );
            return;
        }
        // The agent may have just exited unreaped; a failed kill is not an error.
        let _ = kill(self.agent, signal);
        self.forwarded.push(number);
        tracing::info!(signal = number, "forwarded {signal} to the agent");
        if matches!(signal, Signal::SIGTERM | Signal::SIGINT)
            && !matches!(self.stop, Some(StopCause::Signal(_)))
        {
            // A pod stop is the cause from now on, even after a watchdog or job-deadline step.
            self.stop = Some(StopCause::Signal(number));
            self.stop_deadline_at = Some(Instant::now() + self.timings.stop_deadline);
            tracing::info!(
                "stop requested: the agent may finish its job for {}s; then a job still running is cancelled",
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

    /// A hook reported: read its record, then ask the agent where the job is.
    fn job_record_changed(&mut self, now: Instant) {
        let Some(record) = JobRecord::load(self.job_record) else {
            return;
        };
        if record.started_at.is_some() {
            self.agent_up = true;
            self.advance(JobPhase::Running);
        }
        if record.finished_at.is_some() {
            self.advance(JobPhase::Reporting);
            self.reporting_since.get_or_insert(now);
        }
        self.job = Some(record);
        if self.end.is_none() && self.phase != JobPhase::Waiting {
            self.ask(now);
        }
    }

    fn advance(&mut self, phase: JobPhase) {
        if phase > self.phase {
            tracing::info!(phase = ?phase, "{}", match phase {
                JobPhase::Running => "the job started",
                JobPhase::Reporting => "the job's command ended; the agent is reporting its result",
                JobPhase::Over => "the agent has finished its job",
                JobPhase::Waiting => "",
            });
            self.phase = phase;
        }
    }

    /// Asks the agent's status and updates the phase and the next question. Whether it answered.
    fn ask(&mut self, now: Instant) -> bool {
        self.status_queries += 1;
        let answered = match self.status.ask() {
            Ok(status) => {
                self.agent_up = true;
                if status.busy {
                    self.advance(JobPhase::Running);
                    self.over_since = None;
                    self.ask_at = Some(self.next_question(now));
                } else if self.phase >= JobPhase::Running {
                    self.advance(JobPhase::Over);
                    let since = *self.over_since.get_or_insert(now);
                    self.ask_at = Some(since + self.timings.watchdog);
                    if now >= since + self.timings.watchdog {
                        self.on_watchdog(now);
                    }
                } else {
                    self.ask_at = None;
                }
                true
            }
            Err(_) => {
                // Not up yet, or stuck: no reason to signal before the report deadline. Ask
                // again later while a job is on.
                self.ask_at = (self.phase != JobPhase::Waiting && self.phase != JobPhase::Over)
                    .then(|| self.next_question(now));
                false
            }
        };
        if self.report_overdue(now) {
            tracing::warn!(
                "the agent is still busy or silent {}s after the job's command ended (AGENT_WRAPPER_REPORT_DEADLINE)",
                self.timings.report_deadline.as_secs()
            );
            self.on_watchdog(now);
        }
        answered
    }

    /// The job's command ended longer than the report deadline ago and the agent is not idle.
    fn report_overdue(&self, now: Instant) -> bool {
        self.phase == JobPhase::Reporting
            && self
                .reporting_since
                .is_some_and(|since| now >= since + self.timings.report_deadline)
    }

    /// The status interval from now, or the report deadline if that comes first.
    fn next_question(&self, now: Instant) -> Instant {
        let interval = now + self.timings.status_interval;
        match self
            .reporting_since
            .filter(|_| self.phase == JobPhase::Reporting)
        {
            Some(since) => interval.min(since + self.timings.report_deadline).max(now),
            None => interval,
        }
    }

    fn on_time(&mut self, now: Instant) {
        if self.end.is_some() {
            return;
        }
        if self.next_step_at.is_some_and(|at| now >= at) {
            self.next_step_at = None;
            let next = match self.escalation {
                None | Some(Escalation::Term) => Escalation::Quit,
                Some(_) => Escalation::Kill,
            };
            self.escalate(next, now);
        }
        if self.stop_deadline_at.is_some_and(|at| now >= at) {
            self.stop_deadline_at = None;
            self.on_stop_deadline(now);
        }
        let job_deadline = self
            .job_deadline_at
            .filter(|_| self.phase == JobPhase::Waiting);
        if job_deadline.is_some_and(|at| now >= at) {
            self.job_deadline_at = None;
            self.ask(now);
            if self.phase == JobPhase::Waiting && self.escalation.is_none() {
                tracing::warn!(
                    "no job started within {}s (a paused agent, or none scheduled); stopping the agent",
                    self.timings.job_deadline.unwrap_or_default().as_secs()
                );
                self.stop.get_or_insert(StopCause::NoJob);
                self.escalate(Escalation::Term, now);
            }
        }
        if self.ask_at.is_some_and(|at| now >= at) {
            self.ask_at = None;
            self.ask(now);
        }
    }

    /// The pod's stop deadline: cancel a job whose command still runs; leave alone a job that
    /// is reporting its result, and an agent that has none.
    fn on_stop_deadline(&mut self, now: Instant) {
        self.ask(now);
        if self.end.is_some() || self.escalation.is_some() {
            return;
        }
        match self.phase {
            JobPhase::Reporting | JobPhase::Over => tracing::info!(
                "stop deadline: the job's command has ended; not signalling the agent while it reports the result"
            ),
            JobPhase::Running | JobPhase::Waiting => self.escalate(Escalation::Quit, now),
        }
    }

    /// The agent has been idle after its job for the watchdog's time and has not exited.
    fn on_watchdog(&mut self, now: Instant) {
        if self.escalation.is_some() {
            return;
        }
        tracing::warn!(
            "the agent finished its job {}s ago but did not exit; stopping it",
            self.timings.watchdog.as_secs()
        );
        // A pod stop stays the cause.
        self.stop.get_or_insert(StopCause::Watchdog);
        self.escalate(Escalation::Term, now);
    }

    fn escalate(&mut self, step: Escalation, now: Instant) {
        // Never QUIT a job that is reporting: the agent would exit 1 with its result unsent.
        // Past the report deadline the agent is taken to be stuck.
        if step == Escalation::Quit
            && self.phase == JobPhase::Reporting
            && !self.report_overdue(now)
        {
            tracing::info!(
                "not cancelling: the job's command has ended and the agent is reporting it"
            );
            self.next_step_at = Some(now + self.timings.status_interval);
            return;
        }
        let (signal, message) = match step {
            Escalation::Term => (Signal::SIGTERM, "asking the agent to stop (SIGTERM)"),
            Escalation::Quit => (
                Signal::SIGQUIT,
                "cancelling the job (SIGQUIT); the agent exits by itself after its cancel window",
            ),
            Escalation::Kill => (Signal::SIGKILL, "killing the agent"),
        };
        tracing::warn!("{message}");
        let _ = kill(self.agent, signal);
        if step == Escalation::Kill {
            // The agent's group: the job runs in process groups of its own, which the leftovers
            // sweep ends once the agent is gone.
            let _ = killpg(self.agent, Signal::SIGKILL);
        }
        self.escalation = Some(step);
        self.next_step_at =
            (step != Escalation::Kill).then(|| now + self.timings.cancel_window + KILL_MARGIN);
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
