//! The job hook: installed as the agent's global `environment` and `pre-exit` hooks, it records
//! when the job started and when its command ended (and how), for agent-wrapper's exit report,
//! and wakes the wrapper to ask the agent where the job is. It never fails the job: a record it
//! cannot write only warns.

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use stateless_core::agent_environ::wrapper_setting;
use stateless_core::job_record::{
    default_job_record_path, notify, JobRecord, JOB_EVENTS_PATH_ENV, JOB_RECORD_PATH_ENV,
};

fn main() -> ExitCode {
    // From the agent's own environment: a pipeline's env cannot move the record.
    let path =
        wrapper_setting(JOB_RECORD_PATH_ENV).map_or_else(default_job_record_path, Into::into);
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
    if let Some(events) = wrapper_setting(JOB_EVENTS_PATH_ENV) {
        notify(std::path::Path::new(&events));
    }
    ExitCode::SUCCESS
}
