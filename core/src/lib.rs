//! What the checkout hook and populate-mirror share: repository URLs and their redaction, the
//! mirror volume's layout and manifest, cheap mirror inspection, the checkout record, atomic
//! files, and the one way we build and run git.

pub mod agent_environ;
pub mod atomic_file;
pub mod checkout_record;
pub mod failure_kind;
pub mod git_command;
pub mod git_runner;
pub mod interrupts;
pub mod job_record;
pub mod manifest;
pub mod mirror_inspect;
pub mod mirror_layout;
pub mod repo_url;
