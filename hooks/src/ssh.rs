//! How git reaches SSH remotes: host-key policy and the optional deploy key.
//!
//! Host keys follow the agent's 4.x behaviour, `StrictHostKeyChecking=accept-new`, rather than
//! 3.x's `ssh-keyscan` before the clone: both trust a host on first contact, but accept-new
//! costs no extra connection and never records a key for a host git did not reach. With
//! `BUILDKITE_SSH_KEYSCAN=false` only hosts already in known_hosts are accepted. A user's own
//! ssh command is extended, not replaced: `GIT_SSH_COMMAND`, else git's `core.sshCommand` (the
//! manifests set it through `GIT_CONFIG_*`, with the git-ssh Secret's key and known_hosts and
//! strict host keys: ssh takes the first value of an option, so theirs wins over the policy
//! added here); a `GIT_SSH` program is left alone, as the agent does.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use stateless_core::git_command::Git;

use crate::checkout_plan::{ConfigError, SshOptions};

/// What git needs in its environment for SSH. Holds the key file, which is removed on drop.
pub struct SshSetup {
    command: Option<String>,
    _key_dir: Option<tempfile::TempDir>,
}

impl SshSetup {
    pub fn prepare(git: &Git, options: &SshOptions) -> Result<SshSetup, ConfigError> {
        // git's own order: GIT_SSH_COMMAND, then core.sshCommand, then GIT_SSH.
        let configured = std::env::var("GIT_SSH_COMMAND")
            .ok()
            .filter(|v| !v.is_empty())
            .or_else(|| configured_ssh_command(git));
        if configured.is_none() && std::env::var_os("GIT_SSH").is_some_and(|v| !v.is_empty()) {
            return Ok(SshSetup {
                command: None,
                _key_dir: None,
            });
        }
        let base = configured.unwrap_or_else(|| "ssh".into());
        let policy = if options.accept_new_hosts {
            "accept-new"
        } else {
            "yes"
        };
        let mut command = format!("{base} -o StrictHostKeyChecking={policy}");
        let mut key_dir = None;
        if let Some(key) = &options.key {
            let (path, dir) = key_file(key)?;
            let quoted = shell_words::quote(&path.to_string_lossy()).into_owned();
            command.push_str(&format!(" -i {quoted} -o IdentitiesOnly=yes"));
            key_dir = dir;
        }
        Ok(SshSetup {
            command: Some(command),
            _key_dir: key_dir,
        })
    }

    /// The variables to set on every git command.
    pub fn env(&self) -> Option<(&'static str, &str)> {
        self.command.as_deref().map(|c| ("GIT_SSH_COMMAND", c))
    }
}

/// `core.sshCommand` from git's configuration, system, global or `GIT_CONFIG_*` (no repository's:
/// `GIT_DIR` names none), since the `GIT_SSH_COMMAND` set here would override it.
fn configured_ssh_command(git: &Git) -> Option<String> {
    let mut cmd = git.command(&std::env::temp_dir());
    cmd.env("GIT_DIR", "/dev/null")
        .args(["config", "--get", "core.sshCommand"]);
    let out = cmd
        .into_std()
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let value = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !value.is_empty()).then_some(value)
}

/// The key's file: the given path, or a private temporary file holding the given key.
fn key_file(key: &str) -> Result<(PathBuf, Option<tempfile::TempDir>), ConfigError> {
    if key.contains("PRIVATE KEY-----") {
        let write = || -> std::io::Result<(PathBuf, tempfile::TempDir)> {
            let dir = tempfile::Builder::new().prefix("checkout-ssh-").tempdir()?;
            let path = dir.path().join("key");
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            // ssh rejects a key file whose last line has no newline.
            file.write_all(key.trim_end().as_bytes())?;
            file.write_all(b"\n")?;
            Ok((path, dir))
        };
        return write()
            .map(|(path, dir)| (path, Some(dir)))
            .map_err(ConfigError::SshKeyFile);
    }
    let path = Path::new(key);
    if path.is_file() {
        Ok((path.to_path_buf(), None))
    } else {
        Err(ConfigError::SshKey)
    }
}
