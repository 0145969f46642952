//! How the pod ended, said once on every exit path: one JSON line on stdout (for the log) and
//! the same record in the Kubernetes termination message file (at most 4096 bytes, the kubelet's
//! limit), plus the exit code. `Ending::exit_code` is the one place exit codes are decided;
//! docs/agent-wrapper.md's table is its documentation, and the Kubernetes manifests'
//! `podFailurePolicy` is checked against it.

use std::path::Path;

use serde::Serialize;
use stateless_core::checkout_record::CheckoutRecord;
use stateless_core::job_record::JobRecord;

use crate::supervisor::{AgentEnd, Escalation, JobPhase, StopCause, Supervision};

/// The kubelet keeps at most this much of a termination message.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// Exit codes of the wrapper's own outcomes. The agent's own codes pass through otherwise.
pub mod code {
    /// An internal error of the wrapper.
    pub const INTERNAL: u8 = 70;
    /// Bad configuration: arguments, the token, the build path.
    pub const CONFIG: u8 = 78;
    /// The watchdog stopped an agent that did not exit after its job.
    pub const WATCHDOG: u8 = 80;
    /// The pod was stopped before any job started.
    pub const INTERRUPTED_BEFORE_JOB: u8 = 81;
    /// `--acquire-job`: Buildkite refused the job (422: taken, cancelled or already run).
    pub const ACQUIRE_REJECTED: u8 = 82;
    /// `--acquire-job`: the job was not acquired (still locked after the agent's retries, not
    /// found, Buildkite unreachable).
    pub const ACQUIRE_FAILED: u8 = 83;
    /// The agent could not be executed: not executable.
    pub const AGENT_NOT_EXECUTABLE: u8 = 126;
    /// The agent could not be executed: not found.
    pub const AGENT_NOT_FOUND: u8 = 127;

    /// The codes above. An agent exiting with one of them is reported as 1, so that a pod's
    /// code alone says what happened and a `podFailurePolicy` can act on it.
    pub const RESERVED: [u8; 8] = [
        INTERNAL,
        CONFIG,
        WATCHDOG,
        INTERRUPTED_BEFORE_JOB,
        ACQUIRE_REJECTED,
        ACQUIRE_FAILED,
        AGENT_NOT_EXECUTABLE,
        AGENT_NOT_FOUND,
    ];

    /// Whether a Job should replace a pod that exited with `code`: the "retry the pod?" column
    /// of docs/agent-wrapper.md's table, which image/k8s/agent-job.yaml's `podFailurePolicy`
    /// encodes (tests/tests/kubernetes_manifests.rs checks every code). No for success, for
    /// configuration and image faults that a new pod would repeat, for pods that ran their
    /// job or were stopped before one, and for a job that could not be acquired: a new pod for
    /// the same job would get the same 422, or repeat the agent's five minutes of retries
    /// against a lock or a 404; whoever chose the job (a dispatcher that knows its state)
    /// decides whether another pod is worth it.
    pub fn retry_pod(code: u8) -> bool {
        !matches!(
            code,
            0 | CONFIG
                | WATCHDOG
                | INTERRUPTED_BEFORE_JOB
                | ACQUIRE_REJECTED
                | ACQUIRE_FAILED
                | AGENT_NOT_EXECUTABLE
                | AGENT_NOT_FOUND
        )
    }

    /// The agent's own exit codes for `--acquire-job` (buildkite/agent v3.137.0
    /// `clicommand/agent_start.go`): 27 for a rejected acquire; 28 is declared for a job still
    /// locked, but v3.137.0 never returns it (`agent/agent_worker.go` only logs that failure and
    /// exits 0), so it is read as the same outcome should a later agent return it.
    pub const AGENT_ACQUISITION_REJECTED: i32 = 27;
    pub const AGENT_JOB_LOCKED: i32 = 28;
}

/// How the pod ended.
#[derive(Debug)]
pub enum Ending {
    /// The agent ran and exited (or was stopped).
    Supervised(Supervision),
    Config(String),
    AgentNotFound(String),
    AgentNotExecutable(String),
    Internal(String),
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub version: u32,
    pub wrapper_version: &'static str,
    /// Machine-readable: `job-finished`, `job-not-run`, `idle-timeout`, `no-job`, `stopped`,
    /// `interrupted-before-job`, `acquire-rejected`, `acquire-failed`, `watchdog`,
    /// `agent-failed`, `agent-killed`, `agent-not-found`, `agent-not-executable`,
    /// `config-error`, `internal-error`.
    pub reason: &'static str,
    /// One sentence for a person.
    pub message: String,
    pub exit_code: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_signal: Option<i32>,
    /// The job the agent was started to acquire (`BUILDKITE_AGENT_ACQUIRE_JOB`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acquire_job: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub signals_forwarded: Vec<i32>,
    /// Signals not forwarded because the agent could not handle them yet (HUP while it
    /// registers).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub signals_held: Vec<i32>,
    #[serde(skip_serializing_if = "is_zero")]
    pub leftover_processes: usize,
    /// Times the agent's `/status.json` was asked (each a wake-up of the wrapper).
    #[serde(skip_serializing_if = "is_zero")]
    pub status_queries: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<JobRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkout: Option<CheckoutSummary>,
    pub duration_ms: u64,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The part of the checkout record a person reading a pod's status wants.
#[derive(Debug, Serialize)]
pub struct CheckoutSummary {
    pub outcome: String,
    pub commit: Option<String>,
    pub mirror: String,
    pub attempts: u32,
    pub total_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl CheckoutSummary {
    pub fn from_record(record: CheckoutRecord) -> CheckoutSummary {
        let to_text = |v: serde_json::Value| v.as_str().unwrap_or_default().to_string();
        CheckoutSummary {
            outcome: to_text(serde_json::to_value(record.outcome).unwrap_or_default()),
            commit: record.commit,
            mirror: to_text(serde_json::to_value(record.mirror.status).unwrap_or_default()),
            attempts: record.attempts,
            total_ms: record.durations_ms.total,
            error: record.error,
        }
    }
}

impl Ending {
    /// The exit code and the report's reason and message.
    pub fn classify(&self) -> (u8, &'static str, String) {
        let supervision = match self {
            Ending::Config(m) => return (code::CONFIG, "config-error", m.clone()),
            Ending::AgentNotFound(m) => {
                return (code::AGENT_NOT_FOUND, "agent-not-found", m.clone())
            }
            Ending::AgentNotExecutable(m) => {
                return (
                    code::AGENT_NOT_EXECUTABLE,
                    "agent-not-executable",
                    m.clone(),
                )
            }
            Ending::Internal(m) => return (code::INTERNAL, "internal-error", m.clone()),
            Ending::Supervised(s) => s,
        };
        let hooks_ran = supervision
            .job
            .as_ref()
            .is_some_and(|j| j.started_at.is_some());
        // The agent held a job: its hooks said so, or its status did.
        let job_started = hooks_ran || supervision.phase >= JobPhase::Running;
        let job_finished = supervision.phase >= JobPhase::Reporting
            || supervision
                .job
                .as_ref()
                .is_some_and(|j| j.finished_at.is_some());
        let agent_code = match supervision.agent {
            AgentEnd::Exited(c) if code::RESERVED.contains(&(c.clamp(0, 255) as u8)) => 1,
            AgentEnd::Exited(c) => c.clamp(0, 255) as u8,
            AgentEnd::Signaled(s) => 128u8.saturating_add(s as u8),
        };
        if let Some(ending) = acquire_outcome(supervision, job_started) {
            return ending;
        }
        match (supervision.stop, supervision.agent) {
            (Some(StopCause::Watchdog), _) => (
                code::WATCHDOG,
                "watchdog",
                "the agent did not exit after its job (idle past AGENT_WRAPPER_WATCHDOG, or still reporting or silent past AGENT_WRAPPER_REPORT_DEADLINE) and was stopped by the watchdog".into(),
            ),
            (Some(StopCause::NoJob), end) => (
                agent_code,
                "no-job",
                format!(
                    "no job started before the job deadline (a paused agent, or none scheduled); the agent was stopped and {}",
                    describe(end)
                ),
            ),
            (Some(StopCause::Signal(s)), _) if !job_started => (
                code::INTERRUPTED_BEFORE_JOB,
                "interrupted-before-job",
                format!("the pod was stopped (signal {s}) before any job started"),
            ),
            (Some(StopCause::Signal(s)), end) => {
                let how = match supervision.escalation {
                    Some(Escalation::Quit) => "the job was cancelled at the stop deadline",
                    Some(Escalation::Kill) => "the agent was killed after its cancel window",
                    Some(Escalation::Term) => {
                        "the job finished and the agent, idle but not exiting, was stopped by the watchdog"
                    }
                    None if job_finished => "the job finished first",
                    None => "the agent stopped",
                };
                (
                    agent_code,
                    "stopped",
                    format!(
                        "the pod was stopped (signal {s}); {how}; agent {}",
                        describe(end)
                    ),
                )
            }
            (None, AgentEnd::Exited(0)) if hooks_ran => {
                (0, "job-finished", "the agent ran its job and exited".into())
            }
            // An idle timeout counts from the agent's first idle ping, after it registered, so
            // an agent that leaves sooner, or was seen with a job, took a job and ran no hook.
            (None, AgentEnd::Exited(0)) if job_started || supervision.exited_before_idle_timeout => (
                0,
                "job-not-run",
                "the agent took a job but ran none of its hooks: a job refused before it started (signature, allowlist, a failing pre-bootstrap hook), or the agent was stopped from Buildkite".into(),
            ),
            (None, AgentEnd::Exited(0)) => (
                0,
                "idle-timeout",
                "no job arrived before the idle timeout; the agent exited".into(),
            ),
            (None, end @ AgentEnd::Exited(_)) => (
                agent_code,
                "agent-failed",
                format!("the agent failed: {}", describe(end)),
            ),
            (None, end @ AgentEnd::Signaled(_)) => (
                agent_code,
                "agent-killed",
                format!("the agent died: {}", describe(end)),
            ),
        }
    }

    pub fn report(self, checkout: Option<CheckoutRecord>, duration_ms: u64) -> Report {
        let (exit_code, reason, message) = self.classify();
        let mut report = Report {
            version: 1,
            wrapper_version: env!("CARGO_PKG_VERSION"),
            reason,
            message,
            exit_code,
            agent_exit_code: None,
            agent_signal: None,
            acquire_job: None,
            stop: None,
            signals_forwarded: Vec::new(),
            signals_held: Vec::new(),
            leftover_processes: 0,
            status_queries: 0,
            job: None,
            checkout: checkout.map(CheckoutSummary::from_record),
            duration_ms,
        };
        if let Ending::Supervised(s) = self {
            match s.agent {
                AgentEnd::Exited(c) => report.agent_exit_code = Some(c),
                AgentEnd::Signaled(sig) => report.agent_signal = Some(sig),
            }
            report.stop = s.stop.map(|cause| {
                let escalation = s
                    .escalation
                    .map_or(String::new(), |e| format!(", escalated to {e:?}"));
                match cause {
                    StopCause::Signal(n) => format!("signal {n}{escalation}"),
                    StopCause::Watchdog => format!("watchdog{escalation}"),
                    StopCause::NoJob => format!("job deadline{escalation}"),
                }
            });
            report.acquire_job = s.acquire_job;
            report.signals_forwarded = s.forwarded;
            report.signals_held = s.held;
            report.leftover_processes = s.leftovers;
            report.status_queries = s.status_queries as usize;
            report.job = s.job;
        }
        report
    }
}

/// An agent started with `--acquire-job` that ran no job: what became of the acquire. `None`
/// when another outcome applies (a job ran or was refused, the pod was stopped, the agent
/// failed otherwise).
fn acquire_outcome(s: &Supervision, job_started: bool) -> Option<(u8, &'static str, String)> {
    let job = s.acquire_job.as_deref().filter(|_| !job_started)?;
    let failed = |how: &str| {
        Some((
            code::ACQUIRE_FAILED,
            "acquire-failed",
            format!("job {job} was not acquired ({how}); no job ran"),
        ))
    };
    match (s.stop, s.agent) {
        (None, AgentEnd::Exited(code::AGENT_ACQUISITION_REJECTED)) => Some((
            code::ACQUIRE_REJECTED,
            "acquire-rejected",
            format!("Buildkite refused job {job} to this agent (422: the job was taken by another agent, cancelled or already run); the agent exited 27"),
        )),
        (None, AgentEnd::Exited(0 | code::AGENT_JOB_LOCKED)) => failed(
            "still locked after the agent's retries, not found, or Buildkite not answering; the agent exited without a job",
        ),
        (Some(StopCause::NoJob), _) => failed("the agent held no job at the job deadline and was stopped"),
        _ => None,
    }
}

fn describe(end: AgentEnd) -> String {
    match end {
        AgentEnd::Exited(c) => format!("exited with {c}"),
        AgentEnd::Signaled(s) => format!("was killed by signal {s}"),
    }
}

impl Report {
    /// The report as one line of JSON of at most `TERMINATION_MESSAGE_LIMIT` bytes: the checkout
    /// summary, then the message, are shortened if needed.
    pub fn to_line(&mut self) -> String {
        let line = |r: &Report| serde_json::to_string(r).unwrap_or_else(|_| "{}".into());
        let mut text = line(self);
        if text.len() > TERMINATION_MESSAGE_LIMIT {
            if let Some(c) = &mut self.checkout {
                c.error = c.error.take().map(|e| truncate(&e, 200));
            }
            text = line(self);
        }
        if text.len() > TERMINATION_MESSAGE_LIMIT {
            self.checkout = None;
            self.message = truncate(&self.message, 500);
            text = line(self);
        }
        text
    }

    /// Prints the line on stdout and writes it to `termination_log`; an unwritable path warns.
    pub fn emit(mut self, termination_log: &Path) {
        let text = self.to_line();
        println!("{text}");
        if let Err(e) = std::fs::write(termination_log, &text) {
            tracing::warn!(
                "could not write the termination message to {}: {e}",
                termination_log.display()
            );
        }
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supervised(agent: AgentEnd, stop: Option<StopCause>, job: Option<(bool, bool)>) -> Ending {
        with_phase(agent, stop, job, JobPhase::Waiting, false)
    }

    fn with_phase(
        agent: AgentEnd,
        stop: Option<StopCause>,
        job: Option<(bool, bool)>,
        phase: JobPhase,
        exited_before_idle_timeout: bool,
    ) -> Ending {
        Ending::Supervised(Supervision {
            agent,
            stop,
            escalation: None,
            forwarded: vec![],
            held: vec![],
            leftovers: 0,
            phase,
            exited_before_idle_timeout,
            status_queries: 0,
            acquire_job: None,
            job: job.map(|(started, finished)| JobRecord {
                version: 1,
                job_id: Some("j".into()),
                started_at: started.then_some(1),
                finished_at: finished.then_some(2),
                command_exit_status: finished.then_some(1),
            }),
        })
    }

    #[test]
    fn retry_pod_is_the_tables_last_column() {
        let rows = [
            (0, false),
            (1, true),
            (3, true),
            (137, true),
            (143, true),
            (code::INTERNAL, true),
            (code::CONFIG, false),
            (code::WATCHDOG, false),
            (code::INTERRUPTED_BEFORE_JOB, false),
            (code::ACQUIRE_REJECTED, false),
            (code::ACQUIRE_FAILED, false),
            (27, true),
            (code::AGENT_NOT_EXECUTABLE, false),
            (code::AGENT_NOT_FOUND, false),
        ];
        for (exit_code, retry) in rows {
            assert_eq!(code::retry_pod(exit_code), retry, "{exit_code}");
        }
    }

    #[test]
    fn each_ending_has_its_code() {
        let cases = [
            (
                supervised(AgentEnd::Exited(0), None, Some((true, true))),
                0,
                "job-finished",
            ),
            (
                supervised(AgentEnd::Exited(0), None, None),
                0,
                "idle-timeout",
            ),
            (
                with_phase(AgentEnd::Exited(0), None, None, JobPhase::Waiting, true),
                0,
                "job-not-run",
            ),
            (
                with_phase(AgentEnd::Exited(0), None, None, JobPhase::Over, false),
                0,
                "job-not-run",
            ),
            (
                supervised(AgentEnd::Exited(0), Some(StopCause::NoJob), None),
                0,
                "no-job",
            ),
            (
                supervised(AgentEnd::Exited(3), None, None),
                3,
                "agent-failed",
            ),
            (
                supervised(AgentEnd::Exited(78), None, None),
                1,
                "agent-failed",
            ),
            (
                supervised(AgentEnd::Signaled(9), None, None),
                137,
                "agent-killed",
            ),
            (
                supervised(
                    AgentEnd::Exited(0),
                    Some(StopCause::Watchdog),
                    Some((true, true)),
                ),
                80,
                "watchdog",
            ),
            (
                supervised(AgentEnd::Exited(0), Some(StopCause::Signal(15)), None),
                81,
                "interrupted-before-job",
            ),
            (
                supervised(
                    AgentEnd::Exited(0),
                    Some(StopCause::Signal(15)),
                    Some((true, false)),
                ),
                0,
                "stopped",
            ),
            (Ending::Config("x".into()), 78, "config-error"),
            (Ending::AgentNotFound("x".into()), 127, "agent-not-found"),
            (
                Ending::AgentNotExecutable("x".into()),
                126,
                "agent-not-executable",
            ),
            (Ending::Internal("x".into()), 70, "internal-error"),
        ];
        for (ending, code, reason) in cases {
            let (c, r, _) = ending.classify();
            assert_eq!((c, r), (code, reason), "{ending:?}");
        }
    }

    fn acquiring(ending: Ending) -> Ending {
        match ending {
            Ending::Supervised(s) => Ending::Supervised(Supervision {
                acquire_job: Some("0190-job".into()),
                ..s
            }),
            other => other,
        }
    }

    #[test]
    fn each_acquire_outcome_has_its_code() {
        let cases = [
            // 422: the agent's 27.
            (
                supervised(AgentEnd::Exited(27), None, None),
                82,
                "acquire-rejected",
            ),
            // Still locked, 404, unreachable: v3.137.0 exits 0 without a job.
            (
                supervised(AgentEnd::Exited(0), None, None),
                83,
                "acquire-failed",
            ),
            (
                supervised(AgentEnd::Exited(28), None, None),
                83,
                "acquire-failed",
            ),
            (
                supervised(AgentEnd::Exited(0), Some(StopCause::NoJob), None),
                83,
                "acquire-failed",
            ),
            // Acquired and run: as any job.
            (
                supervised(AgentEnd::Exited(0), None, Some((true, true))),
                0,
                "job-finished",
            ),
            // Acquired, seen busy, refused before its hooks.
            (
                with_phase(AgentEnd::Exited(0), None, None, JobPhase::Over, true),
                0,
                "job-not-run",
            ),
            // A 27 after the job's hooks ran is the job's status (`--reflect-exit-status`).
            (
                supervised(AgentEnd::Exited(27), None, Some((true, true))),
                27,
                "agent-failed",
            ),
            (
                supervised(AgentEnd::Exited(0), Some(StopCause::Signal(15)), None),
                81,
                "interrupted-before-job",
            ),
            (
                supervised(AgentEnd::Exited(1), None, None),
                1,
                "agent-failed",
            ),
        ];
        for (ending, code, reason) in cases {
            let ending = acquiring(ending);
            let (c, r, _) = ending.classify();
            assert_eq!((c, r), (code, reason), "{ending:?}");
        }
        // Without --acquire-job, an agent's 27 is its own failure.
        let (c, r, _) = supervised(AgentEnd::Exited(27), None, None).classify();
        assert_eq!((c, r), (27, "agent-failed"));
    }

    #[test]
    fn a_report_never_exceeds_the_termination_message_limit() {
        let mut report = Ending::Internal("x".repeat(10_000)).report(None, 1);
        assert!(report.to_line().len() <= TERMINATION_MESSAGE_LIMIT);
    }
}
