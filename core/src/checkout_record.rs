//! The machine-readable record of one checkout, written by the checkout hook and read by
//! agent-wrapper for its exit report. It holds no secret: URLs are stored without credentials.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::mirror_layout::LayoutSource;

/// Where the record goes; the wrapper sets it for the agent so both agree.
pub const RECORD_PATH_ENV: &str = "STATELESS_AGENT_CHECKOUT_RECORD";

/// `$TMPDIR/stateless-agent/checkout-record.json` when [`RECORD_PATH_ENV`] is unset.
pub fn default_record_path() -> PathBuf {
    std::env::temp_dir()
        .join("stateless-agent")
        .join("checkout-record.json")
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckoutRecord {
    pub version: u32,
    /// The repository URL without credentials.
    pub repository: String,
    /// The commit checked out (resolved when the job asked for `HEAD`).
    pub commit: Option<String>,
    pub outcome: Outcome,
    /// The one-line error when the checkout failed.
    pub error: Option<String>,
    /// Why it failed (`not-found`, `network`, `local`, `config`, `timeout`,
    /// `commit-verification`, `stale-merge-ref`): the exit status follows the agent's, which
    /// is 128 for most of these, so the cause is kept here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    pub mirror: MirrorUse,
    pub attempts: u32,
    /// Bytes of objects written into the checkout's own object store (0 when the mirror had all).
    pub bytes_fetched: u64,
    pub durations_ms: PhaseDurations,
    /// Unix seconds.
    pub finished_at: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MirrorStatus {
    /// The checkout borrowed from the mirror.
    Hit,
    /// No usable mirror was found; the checkout went to the server alone.
    Miss,
    /// A mirror was used but the checkout failed with it, and was redone without it.
    Fallback,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MirrorUse {
    pub status: MirrorStatus,
    /// Why the mirror was missed or abandoned.
    pub reason: Option<String>,
    pub path: Option<PathBuf>,
    pub real_path: Option<PathBuf>,
    pub source: Option<LayoutSource>,
    /// Seconds since the mirror was last fetched.
    pub age_secs: Option<u64>,
    /// Whether the mirror already held the commit (no objects needed from the server).
    pub had_commit: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PhaseDurations {
    pub inspect: u64,
    /// Network: the fetch of refs and missing objects (overlaps `checkout` when the mirror had
    /// the commit).
    pub fetch: u64,
    pub checkout: u64,
    pub total: u64,
}

impl CheckoutRecord {
    /// The record at `path`, if there is a readable one.
    pub fn load(path: &Path) -> Option<CheckoutRecord> {
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
    }

    /// Writes the record atomically (temporary file, then rename), creating the directory.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        crate::atomic_file::write_json(path, self)
    }
}
