//! The job hook: installed as the agent's global `environment` and `pre-exit` hooks, it records
//! when the job started and when (and how) it ended, for agent-wrapper's watchdog and exit
//! report. It never fails the job: a record it cannot write only warns.

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use stateless_core::job_record::{
    default_job_record_path, notify, JobRecord, JOB_EVENTS_PATH_ENV, JOB_RECORD_PATH_ENV,
};

fn main() -> ExitCode {
    let path = std::env::var_os(JOB_RECORD_PATH_ENV)
        .filter(|p| !p.is_empty())
        .map_or_else(default_job_record_path, Into::into);
    // The agent names the phase; a copy or link named after it works too.
    let phase = std::env::var("BUILDKITE_HOOK_PHASE").ok().or_else(|| {
        let argv0 = std::env::args().next()?;
        Some(
            std::path::Path::new(&argv0)
                .file_name()?
                .to_str()?
                .to_string(),
        )
    });
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut record = JobRecord::load(&path).unwrap_or_default();
    record.version = 1;
    record.job_id = std::env::var("BUILDKITE_JOB_ID").ok().or(record.job_id);
    match phase.as_deref() {
        Some("environment") => record.started_at = Some(now),
        Some("pre-exit") => {
            record.finished_at = Some(now);
            record.command_exit_status = std::env::var("BUILDKITE_COMMAND_EXIT_STATUS")
                .ok()
                .and_then(|s| s.parse().ok());
        }
        other => {
            eprintln!("⚠️  job-hook: run as the environment or pre-exit hook, not {other:?}; recording nothing");
            return ExitCode::SUCCESS;
        }
    }
    if let Err(e) = record.write(&path) {
        eprintln!("⚠️  job-hook: could not write {}: {e}", path.display());
    }
    if let Some(events) = std::env::var_os(JOB_EVENTS_PATH_ENV).filter(|p| !p.is_empty()) {
        notify(std::path::Path::new(&events));
    }
    ExitCode::SUCCESS
}
