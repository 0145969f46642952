//! One scenario's world: a temp directory with a server root, a mirror root, a checkout
//! directory, a HOME with empty git config, and a PATH whose `buildkite-agent` is the stand-in.
//! The binaries under test are located in the target directory, not linked.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use tempfile::TempDir;

use crate::fixture::Upstream;
use crate::git::git;

/// The directory holding the workspace's built binaries (`target/<profile>`), or
/// `$STATELESS_BIN_DIR`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STATELESS_BIN_DIR") {
        return dir.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir.parent().unwrap().to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// A built binary of the workspace; panics with the command that builds it.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// The agent token the wrapper's scenarios use; it must never appear in any output.
pub const AGENT_TOKEN: &str = "s3cret-agent-t0ken";

pub struct Sandbox {
    pub dir: TempDir,
    pub server_root: PathBuf,
    pub mirrors: PathBuf,
    pub checkout: PathBuf,
    pub agent_state: PathBuf,
    pub record: PathBuf,
    pub home: PathBuf,
    pub bin: PathBuf,
    /// Set in every process the hook starts, to find any left running.
    pub marker: String,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let dir = tempfile::Builder::new()
            .prefix("stateless-e2e-")
            .tempdir()
            .unwrap();
        let p = dir.path();
        let sandbox = Sandbox {
            server_root: p.join("server"),
            mirrors: p.join("mirrors"),
            checkout: p.join("builds/acme/widgets"),
            agent_state: p.join("agent"),
            record: p.join("records/checkout-record.json"),
            home: p.join("home"),
            bin: p.join("bin"),
            marker: format!("e2e-{}", p.file_name().unwrap().to_string_lossy()),
            dir,
        };
        for d in [
            &sandbox.server_root,
            &sandbox.mirrors,
            &sandbox.checkout,
            &sandbox.agent_state,
            &sandbox.home,
            &sandbox.bin,
        ] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(sandbox.home.join(".gitconfig"), "").unwrap();
        std::os::unix::fs::symlink(bin("buildkite-agent"), sandbox.bin.join("buildkite-agent"))
            .unwrap();
        sandbox
    }

    /// `acme/widgets.git` (or `name`) under the server root, with history.
    pub fn upstream(&self, name: &str) -> Upstream {
        Upstream::create(&self.server_root, self.dir.path(), name)
    }

    /// A bare mirror of `url` at `mirrors/<relative>`, made the way populate-mirror will.
    pub fn mirror(&self, url: &str, relative: &str) -> PathBuf {
        let path = self.mirrors.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        git(
            self.dir.path(),
            &["clone", "-q", "--mirror", url, path.to_str().unwrap()],
        );
        path
    }

    /// A bare mirror cloned from the local repository `source` but naming `url` as its origin,
    /// as if populated from `url` (for transports the fixture git cannot reach, like SSH).
    pub fn mirror_of(&self, source: &Path, url: &str, relative: &str) -> PathBuf {
        let path = self.mirror(source.to_str().unwrap(), relative);
        git(&path, &["config", "remote.origin.url", url]);
        path
    }

    /// The checkout hook with this sandbox's environment; add the job's variables.
    pub fn hook(&self) -> Invocation {
        self.hook_binary(&bin("checkout-hook"))
    }

    /// Another build of the checkout hook (a benchmark's baseline) with the same environment.
    pub fn hook_binary(&self, program: &Path) -> Invocation {
        let mut cmd = Command::new(program);
        self.job_environment(&mut cmd)
            .current_dir(&self.checkout)
            .env("BUILDKITE_BUILD_CHECKOUT_PATH", &self.checkout)
            .env("BUILDKITE_GIT_MIRRORS_PATH", &self.mirrors)
            .env("STATELESS_AGENT_CHECKOUT_RECORD", &self.record)
            .env("STATELESS_AGENT_RETRY_DELAY", "50ms")
            .env("BUILDKITE_STANDIN_STATE", &self.agent_state)
            .env(
                "BUILDKITE_AGENT_JOB_API_SOCKET",
                self.dir.path().join("job-api.sock"),
            )
            .env("BUILDKITE_AGENT_JOB_API_TOKEN", "standin-job-api-token")
            .env("STATELESS_E2E_MARKER", &self.marker)
            .stdin(Stdio::null());
        Invocation { cmd }
    }

    /// populate-mirror writing this sandbox's mirror root; add URLs with `args`.
    pub fn populate_mirror(&self) -> Invocation {
        let mut cmd = Command::new(bin("populate-mirror"));
        self.job_environment(&mut cmd)
            .current_dir(self.dir.path())
            .env("BUILDKITE_GIT_MIRRORS_PATH", &self.mirrors)
            .env("POPULATE_MIRROR_RETRY_DELAY", "50ms")
            .env("STATELESS_E2E_MARKER", &self.marker)
            .stdin(Stdio::null());
        Invocation { cmd }
    }

    /// agent-wrapper running the stand-in agent with this sandbox's hooks (checkout-hook as
    /// `checkout`, job-hook as `environment` and `pre-exit`), build path, records and
    /// termination log. Add the job with `BUILDKITE_STANDIN_*` variables.
    pub fn agent_wrapper(&self) -> Invocation {
        let hooks = self.dir.path().join("hooks");
        if !hooks.exists() {
            std::fs::create_dir_all(&hooks).unwrap();
            for (name, binary) in [
                ("checkout", "checkout-hook"),
                ("environment", "job-hook"),
                ("pre-exit", "job-hook"),
            ] {
                std::os::unix::fs::symlink(bin(binary), hooks.join(name)).unwrap();
            }
        }
        let mut cmd = Command::new(bin("agent-wrapper"));
        self.job_environment(&mut cmd)
            .current_dir(self.dir.path())
            .env("BUILDKITE_AGENT_TOKEN", AGENT_TOKEN)
            .env("BUILDKITE_BUILD_PATH", self.dir.path().join("builds"))
            .env("BUILDKITE_HOOKS_PATH", &hooks)
            .env("BUILDKITE_GIT_MIRRORS_PATH", &self.mirrors)
            .env("BUILDKITE_STANDIN_STATE", &self.agent_state)
            // Passed to the agent as its cancel grace: the job's signal grace is 1 s.
            .env("AGENT_WRAPPER_CANCEL_GRACE", "2s")
            .env("AGENT_WRAPPER_STATE_DIR", self.record.parent().unwrap())
            .env("AGENT_WRAPPER_TERMINATION_LOG", self.termination_log())
            .env("STATELESS_AGENT_RETRY_DELAY", "50ms")
            .env("STATELESS_E2E_MARKER", &self.marker)
            .stdin(Stdio::null());
        Invocation { cmd }
    }

    /// agent-wrapper's exit report: the last line of stdout, which must be the termination
    /// message too, within the kubelet's 4096 bytes.
    pub fn exit_report(&self, out: &Finished) -> serde_json::Value {
        let line = out.stdout.lines().last().unwrap_or_default();
        let message = std::fs::read_to_string(self.termination_log()).unwrap_or_default();
        assert_eq!(line, message, "stdout and the termination message agree");
        assert!(message.len() <= 4096);
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {}", out.log()))
    }

    /// Where agent-wrapper writes its Kubernetes termination message.
    pub fn termination_log(&self) -> PathBuf {
        self.dir.path().join("termination-log")
    }

    /// A job's environment and nothing else: the stand-in agent first on PATH, a HOME and git
    /// config of the sandbox's own, the agent's access token.
    pub fn job_environment<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        cmd.env_clear()
            .env(
                "PATH",
                format!("{}:/usr/local/bin:/usr/bin:/bin", self.bin.display()),
            )
            .env("HOME", &self.home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", self.home.join(".gitconfig"))
            .env("BUILDKITE_AGENT_ACCESS_TOKEN", "standin-access-token")
    }

    /// Moves the checkout directory aside and makes a new empty one, as a new pod has. Deleting
    /// a large tree right before creating one costs up to a second of system time on ext4 with
    /// discard, which would be charged to whatever runs next; the trash goes with the sandbox.
    pub fn fresh_checkout_dir(&self) {
        let trash = self.dir.path().join("trash");
        std::fs::create_dir_all(&trash).unwrap();
        let n = std::fs::read_dir(&trash).unwrap().count();
        std::fs::rename(&self.checkout, trash.join(n.to_string())).unwrap();
        std::fs::create_dir_all(&self.checkout).unwrap();
    }

    /// The hook's checkout record.
    pub fn record(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(&self.record).expect("checkout record written");
        serde_json::from_str(&text).unwrap()
    }

    /// A variable the hook exported through the stand-in agent's Job API.
    pub fn exported(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.agent_state.join("env").join(name)).ok()
    }

    /// Meta-data the hook set through the stand-in agent.
    pub fn metadata(&self, key: &str) -> Option<String> {
        let file = key.replace('/', "%2F");
        std::fs::read_to_string(self.agent_state.join("meta-data").join(file)).ok()
    }

    /// git in the checkout.
    pub fn git(&self, args: &[&str]) -> String {
        git(&self.checkout, args)
    }

    /// Processes still running that the hook started (they carry the sandbox's marker).
    pub fn leftover_processes(&self) -> Vec<String> {
        let needle = format!("STATELESS_E2E_MARKER={}", self.marker);
        let me = std::process::id().to_string();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
                continue;
            };
            if environ.split(|&b| b == 0).any(|v| v == needle.as_bytes()) {
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                let state = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
                if state.split_whitespace().nth(2) == Some("Z") {
                    continue; // a zombie holds no resources and is reaped by its parent
                }
                found.push(format!(
                    "{pid}: {}",
                    String::from_utf8_lossy(&cmdline).replace('\0', " ")
                ));
            }
        }
        found
    }

    /// Fails the test unless the checkout borrows objects from `mirror`, named by its real path.
    pub fn assert_borrows_from(&self, mirror: &Path) {
        let alternates =
            std::fs::read_to_string(self.checkout.join(".git/objects/info/alternates"))
                .expect("the checkout has an alternates file");
        assert_eq!(
            Path::new(alternates.trim()),
            mirror.canonicalize().unwrap().join("objects")
        );
    }

    /// Fails the test when the hook left a process running.
    pub fn assert_no_leftover_processes(&self) {
        let left = self.leftover_processes();
        assert!(left.is_empty(), "processes left running: {left:?}");
    }

    /// A snapshot of every file under `dir` (path, size, mtime), to prove nothing was written.
    pub fn snapshot(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let meta = entry.path().symlink_metadata().unwrap();
                if meta.is_dir() {
                    stack.push(entry.path());
                }
                out.push((entry.path(), meta.len(), meta.modified().unwrap()));
            }
        }
        out.sort();
        out
    }
}

/// Waits up to 30 s for `ready`; panics naming `what` after that.
pub fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A spawned invocation's end, with all it printed.
pub fn finish(child: Child) -> Finished {
    let out = child.wait_with_output().expect("the child ends");
    Finished {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// One of our binaries about to run, in a sandbox's environment.
pub struct Invocation {
    cmd: Command,
}

pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for Finished {
    fn from(out: std::process::Output) -> Finished {
        Finished {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Finished {
    /// All the hook printed, for asserting what a log shows.
    pub fn log(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl Invocation {
    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.cmd.env(key, value);
        self
    }

    pub fn env_remove(mut self, key: &str) -> Self {
        self.cmd.env_remove(key);
        self
    }

    pub fn arg(mut self, arg: impl AsRef<std::ffi::OsStr>) -> Self {
        self.cmd.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.cmd.args(args);
        self
    }

    /// Runs as PID 1 of a new PID namespace (with its own /proc), as a container's entrypoint.
    /// Signals for the PID 1 must go to [`namespace_init`]'s pid, not to `unshare`.
    pub fn as_pid1(self) -> Invocation {
        self.wrapped(&["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"])
    }

    /// Runs `script` (`sh -c`, its `$0` `arg0`, the hook's command as `"$@"`) in a private mount
    /// namespace, where it mounts what the scenario needs and then execs the hook.
    pub fn in_mount_namespace(self, script: &str, arg0: &str) -> Invocation {
        let unshare = ["unshare", "--mount", "--propagation", "private"];
        self.wrapped(&[&unshare[..], &["sh", "-c", script, arg0]].concat())
    }

    /// Runs inside a mount namespace where `dir` is bind-mounted read-only onto itself, as a
    /// pod mounts the mirror volume. Exits 99 if the mount turned out writable.
    pub fn with_read_only(self, dir: &Path) -> Invocation {
        let dir = dir.display();
        let script = format!(
            "mount --bind {dir} {dir} && mount -o remount,bind,ro {dir} && touch {dir}/probe 2>/dev/null && exit 99; exec \"$@\""
        );
        self.in_mount_namespace(&script, "sh")
    }

    /// The job: repository, commit and branch.
    pub fn job(self, repo: &str, commit: &str, branch: &str) -> Self {
        self.env("BUILDKITE_REPO", repo)
            .env("BUILDKITE_COMMIT", commit)
            .env("BUILDKITE_BRANCH", branch)
    }

    pub fn run(mut self) -> Finished {
        let out = self.cmd.output().expect("checkout-hook runs");
        Finished {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn spawn(mut self) -> Child {
        self.cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("checkout-hook starts")
    }

    /// The same hook run through `wrapper` (e.g. `unshare --mount sh -c …`), with the same
    /// environment and directory; the hook's path is appended to `wrapper`'s arguments.
    pub fn wrapped(self, wrapper: &[&str]) -> Invocation {
        let mut cmd = Command::new(wrapper[0]);
        cmd.args(&wrapper[1..])
            .arg(self.cmd.get_program())
            .args(self.cmd.get_args())
            .env_clear()
            .stdin(Stdio::null());
        if let Some(dir) = self.cmd.get_current_dir() {
            cmd.current_dir(dir);
        }
        for (key, value) in self.cmd.get_envs() {
            if let Some(value) = value {
                cmd.env(key, value);
            }
        }
        Invocation { cmd }
    }
}

/// The PID 1 of the namespace `unshare --fork` (the `child`) created, as the parent namespace
/// numbers it.
pub fn namespace_init(child: &Child) -> nix::unistd::Pid {
    let path = format!("/proc/{0}/task/{0}/children", child.id());
    for _ in 0..500 {
        let listed = std::fs::read_to_string(&path).unwrap_or_default();
        if let Some(pid) = listed
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
        {
            return nix::unistd::Pid::from_raw(pid);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("unshare started no child");
}
