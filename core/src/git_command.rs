//! The one way we build a git command line.
//!
//! Everything that makes a git invocation safe and predictable lives here, so no call site can
//! forget it: inherited `GIT_*` variables that would redirect git to another repository are
//! cleared, prompts are off, remote helpers that run commands are refused, messages are in the C
//! locale (we classify failures by git's wording), and user-supplied values come after `--`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Variables that would make git operate on some other repository than the one we name.
const CLEARED_ENV: &[&str] = &[
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
    "GIT_CEILING_DIRECTORIES",
];

#[derive(Debug, thiserror::Error)]
#[error(
    "git was not found on PATH; install git (2.38 or newer) in the image or set GIT to its path"
)]
pub struct GitNotFound;

/// The git executable, located once.
#[derive(Debug, Clone)]
pub struct Git {
    program: PathBuf,
}

impl Git {
    /// `$GIT` when set, else the first `git` on `PATH`.
    pub fn locate() -> Result<Git, GitNotFound> {
        if let Some(explicit) = std::env::var_os("GIT").filter(|v| !v.is_empty()) {
            let program = PathBuf::from(explicit);
            return is_executable(&program)
                .then_some(Git { program })
                .ok_or(GitNotFound);
        }
        let path = std::env::var_os("PATH").ok_or(GitNotFound)?;
        std::env::split_paths(&path)
            .map(|dir| dir.join("git"))
            .find(|candidate| is_executable(candidate))
            .map(|program| Git { program })
            .ok_or(GitNotFound)
    }

    /// A command in `dir` (a work tree, or the parent of what is being created).
    pub fn command(&self, dir: &Path) -> GitCommand {
        let mut cmd = Command::new(&self.program);
        cmd.current_dir(dir);
        for var in CLEARED_ENV {
            cmd.env_remove(var);
        }
        cmd.env("GIT_TERMINAL_PROMPT", "0")
            .env("LC_ALL", "C")
            .env("LANGUAGE", "C")
            // A job's git must never run an `ext::` command, whatever the user's config says.
            .args(["-c", "protocol.ext.allow=never"]);
        GitCommand {
            cmd,
            shown: vec!["git".into()],
        }
    }
}

/// A git command line under construction. `shown` is what logs print: it never includes values
/// passed through [`GitCommand::secret_arg`].
#[derive(Debug)]
pub struct GitCommand {
    cmd: Command,
    shown: Vec<String>,
}

impl GitCommand {
    pub fn arg(&mut self, arg: &str) -> &mut Self {
        self.cmd.arg(arg);
        self.shown.push(arg.to_string());
        self
    }

    pub fn args<'a>(&mut self, args: impl IntoIterator<Item = &'a str>) -> &mut Self {
        for a in args {
            self.arg(a);
        }
        self
    }

    /// `-c key=value` for this invocation.
    pub fn config(&mut self, key: &str, value: &str) -> &mut Self {
        self.args(["-c", &format!("{key}={value}")])
    }

    /// User-supplied positional values (remote, refspecs, commits): always after `--`, so a
    /// value starting with `-` can never become an option.
    pub fn operands<'a>(&mut self, values: impl IntoIterator<Item = &'a str>) -> &mut Self {
        self.arg("--").args(values)
    }

    pub fn env(&mut self, key: &str, value: impl AsRef<OsStr>) -> &mut Self {
        self.cmd.env(key, value);
        self
    }

    /// What to print for this command: `git fetch …`, redaction still applied by the caller.
    pub fn display(&self) -> String {
        self.shown.join(" ")
    }

    pub fn into_std(self) -> Command {
        self.cmd
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operands_follow_a_double_dash_and_inherited_git_dir_is_cleared() {
        let git = Git {
            program: "git".into(),
        };
        let mut cmd = git.command(Path::new("/tmp"));
        cmd.arg("fetch").operands(["origin", "--upload-pack=evil"]);
        assert_eq!(cmd.display(), "git fetch -- origin --upload-pack=evil");
        let std = cmd.into_std();
        let envs: Vec<_> = std.get_envs().collect();
        assert!(envs.contains(&(OsStr::new("GIT_DIR"), None)));
        assert!(envs.contains(&(OsStr::new("GIT_TERMINAL_PROMPT"), Some(OsStr::new("0")))));
    }
}
