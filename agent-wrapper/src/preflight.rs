//! Checks before the agent starts, each failing fast with one line that names the fix: the token
//! is there, the agent can be executed, the build path is writable. The mirror volume's state is
//! only logged: a job can check out without it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use stateless_core::manifest::Manifest;

use crate::agent_version::{self, Version};

/// The variable the agent reads its registration token from.
pub const TOKEN_ENV: &str = "BUILDKITE_AGENT_TOKEN";

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("{TOKEN_ENV} is not set; give the pod the agent token (a Secret as an env var, or file:///path/to/token)")]
    NoToken,
    #[error("{TOKEN_ENV} names {path}, which {problem}; mount the token Secret there", path = .0.display(), problem = .1)]
    TokenFile(PathBuf, &'static str),
    #[error("the agent {} was not found; install buildkite-agent in the image or set AGENT_WRAPPER_AGENT", .0.display())]
    AgentNotFound(PathBuf),
    #[error("the agent {} is not executable; fix its permissions in the image", .0.display())]
    AgentNotExecutable(PathBuf),
    #[error("{TOKEN_ENV} is fd://{0}, but descriptor {0} is not open; pass the token on that descriptor, or use a plain token or file://")]
    TokenFd(i32),
    #[error("cannot tell the agent's version ({0}); use buildkite-agent {MINIMUM} or newer", MINIMUM = agent_version::MINIMUM)]
    UnknownVersion(String),
    #[error("buildkite-agent {0} is older than {MINIMUM}, the oldest agent-wrapper runs: older agents wait about 60 s after a job before exiting (before 3.128) and hang a job whose hook leaves a background process holding its output (before 3.136); use a newer agent image", MINIMUM = agent_version::MINIMUM)]
    OldAgent(Version),
    #[error("a script in {dir} failed ({detail}); fix or remove it", dir = .0.display(), detail = .1)]
    EntrypointScript(PathBuf, String),
    #[error("BUILDKITE_BUILD_PATH is not set; set it to a writable directory (an emptyDir)")]
    NoBuildPath,
    #[error("the build path {path} is not writable ({source}); mount a writable volume there (an emptyDir)", path = .0.display(), source = .1)]
    BuildPathNotWritable(PathBuf, std::io::Error),
}

/// The descriptor an `fd://N` token names.
pub fn token_fd() -> Option<i32> {
    std::env::var(TOKEN_ENV)
        .ok()?
        .strip_prefix("fd://")?
        .parse()
        .ok()
}

/// The token is present; its value is never read into a log, only checked for presence.
pub fn check_token() -> Result<(), PreflightError> {
    let token = std::env::var_os(TOKEN_ENV).filter(|t| !t.is_empty());
    let Some(token) = token else {
        return Err(PreflightError::NoToken);
    };
    if let Some(fd) = token_fd() {
        let open = std::path::Path::new(&format!("/proc/self/fd/{fd}")).exists();
        return if open {
            Ok(())
        } else {
            Err(PreflightError::TokenFd(fd))
        };
    }
    let Some(path) = token.to_str().and_then(|t| t.strip_prefix("file://")) else {
        return Ok(());
    };
    let path = PathBuf::from(path);
    match std::fs::metadata(&path) {
        Err(_) => Err(PreflightError::TokenFile(path, "does not exist")),
        Ok(m) if m.len() == 0 => Err(PreflightError::TokenFile(path, "is empty")),
        Ok(_) if std::fs::File::open(&path).is_err() => {
            Err(PreflightError::TokenFile(path, "cannot be read"))
        }
        Ok(_) => Ok(()),
    }
}

/// The agent's path, resolved on PATH when it has no `/`.
pub fn resolve_agent(agent: &Path) -> Result<PathBuf, PreflightError> {
    let candidates: Vec<PathBuf> = if agent.components().count() > 1 {
        vec![agent.to_path_buf()]
    } else {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|d| d.join(agent))
            .collect()
    };
    let found = candidates.into_iter().find(|p| p.is_file());
    match found {
        None => Err(PreflightError::AgentNotFound(agent.to_path_buf())),
        Some(p)
            if p.metadata()
                .is_ok_and(|m| m.permissions().mode() & 0o111 == 0) =>
        {
            Err(PreflightError::AgentNotExecutable(p))
        }
        Some(p) => Ok(p),
    }
}

/// The agent is at least [`agent_version::MINIMUM`]; its version decides its cancel flags. The
/// version recorded at image build in `recorded` is trusted when present.
pub fn check_version(agent: &Path, recorded: &Path) -> Result<Version, PreflightError> {
    let version = match std::fs::read_to_string(recorded) {
        Ok(text) => Version::parse(&text).ok_or_else(|| {
            PreflightError::UnknownVersion(format!(
                "{} holds no agent version ({:?})",
                recorded.display(),
                text.trim()
            ))
        }),
        Err(_) => Version::of(agent).map_err(PreflightError::UnknownVersion),
    }?;
    if version < agent_version::MINIMUM {
        return Err(PreflightError::OldAgent(version));
    }
    Ok(version)
}

/// The official image's entrypoint runs `/docker-entrypoint.d` with `run-parts --exit-on-error`
/// before the agent; so does the wrapper, in the same way.
pub fn run_entrypoint_d(dir: &Path) -> Result<(), PreflightError> {
    if !dir.is_dir() {
        return Ok(());
    }
    tracing::info!("executing scripts in {}", dir.display());
    let fail = |detail: String| PreflightError::EntrypointScript(dir.to_path_buf(), detail);
    let status = std::process::Command::new("run-parts")
        .arg("--exit-on-error")
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .status()
        .map_err(|e| fail(format!("cannot run run-parts: {e}")))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(code) => Err(fail(format!("exit {code}"))),
        None => Err(fail("killed by a signal".into())),
    }
}

/// The build path exists (created if missing) and is writable: `access(W_OK)` also says so for
/// a read-only mount, without writing a probe file on every pod start.
pub fn check_build_path(build_path: Option<&Path>) -> Result<(), PreflightError> {
    let dir = build_path.ok_or(PreflightError::NoBuildPath)?;
    let fail = |e| PreflightError::BuildPathNotWritable(dir.to_path_buf(), e);
    if !dir.is_dir() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    nix::unistd::access(
        dir,
        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
    )
    .map_err(|errno| fail(errno.into()))
}

/// Logs whether the mirror volume is mounted, read-only, and how old its manifest is.
pub fn log_mirror_volume(root: &Path) {
    if !root.is_dir() {
        tracing::warn!(
            mirrors = %root.display(),
            "no mirror volume at {}; checkouts will fetch everything from the server",
            root.display()
        );
        return;
    }
    let read_only = nix::sys::statvfs::statvfs(root)
        .map(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
        .unwrap_or(false);
    let age = Manifest::load(root).ok().flatten().map(|m| {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        now.saturating_sub(m.generated_at)
    });
    if !read_only {
        tracing::warn!(mirrors = %root.display(), "the mirror volume is writable; mount it read-only in agent pods");
    }
    match age {
        Some(age) => tracing::info!(
            mirrors = %root.display(),
            read_only,
            manifest_age_secs = age,
            "mirror volume at {}: manifest {age}s old",
            root.display()
        ),
        None => tracing::info!(
            mirrors = %root.display(),
            read_only,
            "mirror volume at {}: no manifest",
            root.display()
        ),
    }
}
