//! The project's image in a real container runtime: podman with runc, set up as
//! `../shared/notes/containers.md` describes. Nothing can be pulled here, so both of the
//! Dockerfile's bases are made locally with debootstrap: a Debian standing in for the official
//! agent image (with the stand-in `buildkite-agent` on its PATH) and a Rust builder (with this
//! machine's toolchain and CA bundle, so cargo reaches crates.io as the host does).
//!
//! Everything lives under one state directory (its own podman storage, the debootstrap trees), so
//! a second run reuses the layers and the user's own podman storage is untouched. Where the
//! runtime is missing the scenarios say so and skip (`tests/provision.sh` installs it; CI runs
//! that with `--require`, so CI never skips them).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::sandbox::{bin, Finished};

/// The tag the scenarios build the Dockerfile under.
pub const IMAGE: &str = "localhost/stateless-agent:e2e";
/// The version the image is built as (the Dockerfile's `VERSION` build argument, which the release
/// pipeline sets from the tag): the workspace's, as the binaries report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
const AGENT_BASE: &str = "localhost/stateless-agent-e2e/agent-base";
const BUILDER_BASE: &str = "localhost/stateless-agent-e2e/builder";
/// The unprivileged user the image runs as (image/install.sh).
pub const IMAGE_UID: u32 = 10001;

/// The podman command line for this state directory.
pub struct Podman {
    state: PathBuf,
}

impl Podman {
    pub fn new(state: &Path) -> Podman {
        std::fs::create_dir_all(state).unwrap();
        // Without this the runtime fails on setrlimit here (shared notes).
        std::fs::write(
            state.join("containers.conf"),
            "[containers]\ndefault_ulimits = []\n",
        )
        .unwrap();
        Podman {
            state: state.to_path_buf(),
        }
    }

    /// `podman` with this state's storage, runc and cgroupfs (crun fails on cgroups here).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", self.state.join("containers.conf"))
            .arg("--root")
            .arg(self.state.join("storage"))
            .arg("--runroot")
            .arg(self.state.join("run"))
            .args([
                "--storage-driver",
                "overlay",
                "--runtime",
                "runc",
                "--cgroup-manager",
                "cgroupfs",
            ]);
        cmd
    }

    /// Runs podman with `args`; panics with its output unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.command().args(args).output().expect("podman runs");
        let text = Finished::from(out);
        assert!(
            text.status.success(),
            "podman {} failed:\n{}",
            args.join(" "),
            text.log()
        );
        text.stdout
    }

    /// A container of `image` to configure and run.
    pub fn container(&self, image: &str) -> Container<'_> {
        Container {
            podman: self,
            args: vec!["--network".into(), "host".into()],
            image: image.into(),
        }
    }
}

/// The image built from the project's Dockerfile against the local bases, once per test binary.
/// Panics (every scenario that asks fails) when it cannot be built; check
/// [`missing_runtime`] first.
pub fn agent_image(state: &Path) -> &'static Podman {
    static BUILT: OnceLock<Result<Podman, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        std::panic::catch_unwind(|| build_agent_image(state)).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        })
    });
    match built {
        Ok(podman) => podman,
        Err(e) => panic!("the image could not be built: {e}"),
    }
}

/// The first tool the image scenarios need that is not installed.
pub fn missing_runtime() -> Option<&'static str> {
    ["podman", "runc", "debootstrap"].into_iter().find(|tool| {
        !Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn build_agent_image(state: &Path) -> Podman {
    if let Some(tool) = missing_runtime() {
        panic!("{tool} is not installed: run tests/provision.sh");
    }
    let podman = Podman::new(state);
    let rootfs = state.join("rootfs");
    let started = Instant::now();
    // Both trees at once: debootstrap mostly waits on the network.
    let (agent_tree, builder_tree) = std::thread::scope(|s| {
        let agent = s.spawn(|| debootstrap(&rootfs.join("agent"), "git,ca-certificates"));
        let builder =
            s.spawn(|| debootstrap(&rootfs.join("builder"), "git,ca-certificates,gcc,libc6-dev"));
        (agent.join().unwrap(), builder.join().unwrap())
    });

    // The agent base: the stand-in where the official image has the real agent, the official
    // image's entrypoint and command, and where the stand-in keeps its meta-data and Job API
    // state.
    std::fs::copy(
        bin("buildkite-agent"),
        agent_tree.join("usr/local/bin/buildkite-agent"),
    )
    .unwrap();
    import(
        &podman,
        &agent_tree,
        AGENT_BASE,
        &[
            r#"ENTRYPOINT ["/usr/local/bin/buildkite-agent"]"#,
            r#"CMD ["start"]"#,
            "ENV BUILDKITE_STANDIN_STATE=/tmp/buildkite-standin",
        ],
    );

    // The builder base: this machine's toolchain, tagged by its version so it is made once.
    let version = String::from_utf8(
        Command::new("rustc")
            .arg("--version")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let tag = format!(
        "{BUILDER_BASE}:{}",
        version.split_whitespace().nth(1).unwrap_or("unknown")
    );
    let exists = podman
        .command()
        .args(["image", "exists", &tag])
        .status()
        .is_ok_and(|s| s.success());
    if !exists {
        install_toolchain(&builder_tree);
        import(
            &podman,
            &builder_tree,
            &tag,
            &[
                "ENV PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "ENV CARGO_HOME=/usr/local/cargo",
            ],
        );
    }

    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = podman
        .command()
        .args(["build", "--build-arg"])
        .arg(format!("BUILDER_IMAGE={tag}"))
        .arg("--build-arg")
        .arg(format!("AGENT_IMAGE={AGENT_BASE}"))
        .arg("--build-arg")
        .arg(format!("VERSION={VERSION}"))
        .args(["--tag", IMAGE])
        .arg(workspace)
        .output()
        .expect("podman build runs");
    let out = Finished::from(out);
    assert!(
        out.status.success(),
        "podman build of the Dockerfile failed:\n{}",
        out.log()
    );
    eprintln!("container image {IMAGE} ready in {:.0?}", started.elapsed());
    podman
}

/// A minimal Debian bookworm with `include`, made once per state directory.
fn debootstrap(tree: &Path, include: &str) -> PathBuf {
    let done = tree.with_extension("complete");
    if done.exists() {
        return tree.to_path_buf();
    }
    let _ = std::fs::remove_dir_all(tree);
    let out = Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={include}"),
            "bookworm",
        ])
        .arg(tree)
        .output()
        .expect("debootstrap runs");
    let out = Finished::from(out);
    assert!(
        out.status.success(),
        "debootstrap of {} failed:\n{}",
        tree.display(),
        out.log()
    );
    std::fs::write(&done, "").unwrap();
    tree.to_path_buf()
}

/// Copies the running toolchain (compiler, cargo, libraries; not the docs) and the host's CA
/// bundle, which holds any proxy's certificate the registries are reached through.
fn install_toolchain(tree: &Path) {
    let sysroot = String::from_utf8(
        Command::new("rustc")
            .args(["--print", "sysroot"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let sysroot = Path::new(sysroot.trim());
    let rust = tree.join("usr/local/rust");
    std::fs::create_dir_all(rust.join("bin")).unwrap();
    let cp = |from: PathBuf, to: PathBuf| {
        let status = Command::new("cp")
            .arg("-a")
            .arg(&from)
            .arg(&to)
            .status()
            .unwrap();
        assert!(status.success(), "cp {} failed", from.display());
    };
    cp(sysroot.join("bin/rustc"), rust.join("bin"));
    cp(sysroot.join("bin/cargo"), rust.join("bin"));
    cp(sysroot.join("lib"), rust.clone());
    cp(
        PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
        tree.join("etc/ssl/certs/ca-certificates.crt"),
    );
}

fn import(podman: &Podman, tree: &Path, tag: &str, changes: &[&str]) {
    let mut import = podman.command();
    import.args(["import", "--quiet"]);
    for change in changes {
        import.args(["--change", change]);
    }
    let mut import = import
        .args(["-", tag])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("podman import runs");
    let status = Command::new("tar")
        .arg("-C")
        .arg(tree)
        .args(["-c", "."])
        .stdout(import.stdin.take().unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "tar of {} failed", tree.display());
    assert!(
        import.wait().unwrap().success(),
        "podman import {tag} failed"
    );
}

/// `podman run` being put together. Containers share the host's network, so a server on the
/// host's loopback is reachable as it is from a pod.
pub struct Container<'p> {
    podman: &'p Podman,
    args: Vec<String>,
    image: String,
}

impl<'p> Container<'p> {
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.args.extend(["--env".into(), format!("{key}={value}")]);
        self
    }

    /// Mounts `host` at `path`; `read_only` as a pod mounts the mirror claim.
    pub fn mount(mut self, host: &Path, path: &str, read_only: bool) -> Self {
        let mode = if read_only { ":ro" } else { "" };
        self.args.extend([
            "--volume".into(),
            format!("{}:{path}{mode}", host.display()),
        ]);
        self
    }

    pub fn entrypoint(mut self, program: &str) -> Self {
        self.args.extend(["--entrypoint".into(), program.into()]);
        self
    }

    fn run_args(&self, detach: bool) -> Vec<String> {
        let mut args = vec!["run".to_string()];
        args.push(if detach { "--detach" } else { "--rm" }.into());
        args.extend(self.args.iter().cloned());
        args.push(self.image.clone());
        args
    }

    /// Runs it to the end.
    pub fn run(self) -> Finished {
        let out = self
            .podman
            .command()
            .args(self.run_args(false))
            .output()
            .expect("podman run runs");
        Finished::from(out)
    }

    /// Starts it in the background; the container is removed when the handle drops.
    pub fn start(self) -> Running<'p> {
        let id = self.podman.ok(&self
            .run_args(true)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>());
        Running {
            podman: self.podman,
            id: id.trim().to_string(),
        }
    }
}

/// A detached container.
pub struct Running<'p> {
    podman: &'p Podman,
    id: String,
}

impl Running<'_> {
    /// What it printed so far, stdout and stderr together.
    pub fn logs(&self) -> String {
        let out = self
            .podman
            .command()
            .args(["logs", &self.id])
            .output()
            .unwrap();
        Finished::from(out).log()
    }

    /// Waits until its output contains `text`, or panics with the output after `timeout`.
    pub fn wait_for_output(&self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let logs = self.logs();
            if logs.contains(text) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {text:?} within {timeout:?}:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `podman stop -t <grace>`: SIGTERM, then SIGKILL after `grace`, as a pod's termination.
    pub fn stop(&self, grace: Duration) {
        self.podman
            .ok(&["stop", "-t", &grace.as_secs().to_string(), &self.id]);
    }

    /// Waits for it to exit and returns its exit code.
    pub fn wait(&self) -> i32 {
        let code = self.podman.ok(&["wait", &self.id]);
        code.trim().parse().expect("podman wait prints the code")
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let _ = self
            .podman
            .command()
            .args(["rm", "--force", "--time", "0", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
