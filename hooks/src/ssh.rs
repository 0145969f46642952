//! How git reaches SSH remotes: host-key policy and the optional deploy key.
//!
//! Host keys follow the agent's 4.x behaviour, `StrictHostKeyChecking=accept-new`, rather than
//! 3.x's `ssh-keyscan` before the clone: both trust a host on first contact, but accept-new
//! costs no extra connection and never records a key for a host git did not reach. With
//! `BUILDKITE_SSH_KEYSCAN=false` only hosts already in known_hosts are accepted. A user's own
//! `GIT_SSH_COMMAND` is extended, not replaced; a `GIT_SSH` program is left alone, as the agent
//! does.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::checkout_plan::{ConfigError, SshOptions};

/// What git needs in its environment for SSH. Holds the key file, which is removed on drop.
pub struct SshSetup {
    command: Option<String>,
    _key_dir: Option<tempfile::TempDir>,
}

impl SshSetup {
    pub fn prepare(options: &SshOptions) -> Result<SshSetup, ConfigError> {
        if std::env::var_os("GIT_SSH").is_some_and(|v| !v.is_empty()) {
            return Ok(SshSetup {
                command: None,
                _key_dir: None,
            });
        }
        let base = std::env::var("GIT_SSH_COMMAND")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "ssh".into());
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
