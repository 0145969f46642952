//! The wrapper's settings for the hooks, read from the agent's own environment rather than the
//! job's. The agent passes its environment to every job, but the job's (pipeline `env:`, step
//! `env:`) is laid over it (`agent/job_runner.go`: `append(os.Environ(), env...)`), so a
//! pipeline could point the records agent-wrapper reads somewhere else and blind it. The agent's
//! pid, `BUILDKITE_AGENT_PID`, is one the agent always sets itself after the job's environment,
//! and `/proc/<pid>/environ` is what agent-wrapper gave the agent.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

/// `name` from the agent's environment when it can be read, else from this process's.
pub fn wrapper_setting(name: &str) -> Option<OsString> {
    from_agent(name).or_else(|| std::env::var_os(name).filter(|v| !v.is_empty()))
}

/// `name` in the agent's own environment, if the agent's pid is known and its environment
/// readable (same user, same PID namespace).
fn from_agent(name: &str) -> Option<OsString> {
    let pid: u32 = std::env::var("BUILDKITE_AGENT_PID").ok()?.parse().ok()?;
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    lookup(&environ, name)
}

fn lookup(environ: &[u8], name: &str) -> Option<OsString> {
    environ.split(|b| *b == 0).find_map(|entry| {
        let value = entry.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
        (!value.is_empty()).then(|| OsStr::from_bytes(value).to_os_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_exactly_the_named_variable() {
        let environ = b"PATH=/bin\0STATELESS_AGENT_JOB_RECORD_X=no\0STATELESS_AGENT_JOB_RECORD=/s/job.json\0EMPTY=\0";
        assert_eq!(
            lookup(environ, "STATELESS_AGENT_JOB_RECORD"),
            Some("/s/job.json".into())
        );
        assert_eq!(lookup(environ, "EMPTY"), None);
        assert_eq!(lookup(environ, "MISSING"), None);
    }
}
