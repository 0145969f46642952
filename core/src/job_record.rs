//! The record of the job a pod ran, written by the job hook (`job-hook`, installed as the agent's
//! `environment` and `pre-exit` hooks) and read by agent-wrapper: when the job started, when it
//! ended and how. After each update the hook writes a byte to the wrapper's FIFO
//! (`AGENT_WRAPPER_JOB_EVENTS`), which wakes the wrapper to read the record: a finished job arms
//! its watchdog. The exit report carries the job's id and status.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the record goes; the wrapper sets it for the agent, which passes it to hooks.
pub const JOB_RECORD_PATH_ENV: &str = "STATELESS_AGENT_JOB_RECORD";

/// The wrapper's FIFO for "the job record changed"; the hook skips it when unset or when no
/// wrapper is reading.
pub const JOB_EVENTS_PATH_ENV: &str = "AGENT_WRAPPER_JOB_EVENTS";

/// Tells a reading wrapper that the record changed. Never blocks, never fails the hook.
pub fn notify(events: &Path) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let fifo = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(events);
    if let Ok(mut fifo) = fifo {
        let _ = fifo.write_all(b"\n");
    }
}

/// The default location, beside the checkout record.
pub fn default_job_record_path() -> PathBuf {
    std::env::temp_dir()
        .join("stateless-agent")
        .join("job-record.json")
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobRecord {
    pub version: u32,
    /// `BUILDKITE_JOB_ID`.
    pub job_id: Option<String>,
    /// Unix seconds when the job's `environment` hook ran.
    pub started_at: Option<u64>,
    /// Unix seconds when the job's `pre-exit` hook ran: the job is over.
    pub finished_at: Option<u64>,
    /// `BUILDKITE_COMMAND_EXIT_STATUS` as `pre-exit` saw it.
    pub command_exit_status: Option<i32>,
}

impl JobRecord {
    pub fn load(path: &Path) -> Option<JobRecord> {
        let text = std::fs::read_to_string(path).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes the record atomically.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        crate::atomic_file::write_json(path, self)
    }
}
