//! OpenSSH's `sshd` on loopback, serving a server root over `ssh://` to one test key.
//!
//! Started by the tests themselves, unprivileged where possible: its own host key, config,
//! authorized key and pid file in a temp directory, no PAM, `GIT_PROTOCOL` accepted so git
//! speaks protocol v2 as it does against real hosts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::loopback::{free_port, wait_until_listening};

pub struct Sshd {
    port: u16,
    child: Child,
    user: String,
    /// The client's private key, authorized to log in.
    pub client_key: PathBuf,
    /// The server's public host key line (`ssh-ed25519 AAAA…`).
    pub host_key: String,
}

/// Where Debian's openssh-server installs the daemon.
const SSHD: &str = "/usr/sbin/sshd";

impl Sshd {
    /// `None`, with a message, when `sshd` is not installed (`.ci/run` installs it).
    pub fn start(dir: &Path) -> Option<Sshd> {
        if !Path::new(SSHD).exists() {
            eprintln!("skipping: {SSHD} is not installed (apt-get install openssh-server)");
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let keygen = |name: &str| {
            let path = dir.join(name);
            let ok = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
                .arg(&path)
                .status()
                .unwrap()
                .success();
            assert!(ok, "ssh-keygen {name}");
            path
        };
        let host_key = keygen("host_key");
        let client_key = keygen("client_key");
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
        // Privilege separation needs this directory when sshd runs as root.
        let _ = std::fs::create_dir_all("/run/sshd");
        let port = free_port();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nPidFile {dir}/sshd.pid\n\
                 AuthorizedKeysFile {dir}/authorized_keys\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
                 PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n\
                 AcceptEnv GIT_PROTOCOL\nLogLevel ERROR\n",
                host = host_key.display(),
                dir = dir.display(),
            ),
        )
        .unwrap();
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sshd starts");
        wait_until_listening(port, "sshd");
        let host_key = std::fs::read_to_string(dir.join("host_key.pub")).unwrap();
        let host_key = host_key
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        Some(Sshd {
            port,
            child,
            user: whoami(),
            client_key,
            host_key,
        })
    }

    /// `ssh://user@127.0.0.1:PORT/abs/path` for a path under the server root.
    pub fn url(&self, absolute: &Path) -> String {
        format!(
            "ssh://{}@127.0.0.1:{}{}",
            self.user,
            self.port,
            absolute.display()
        )
    }

    /// How known_hosts names this server.
    pub fn known_hosts_name(&self) -> String {
        format!("[127.0.0.1]:{}", self.port)
    }
}

fn whoami() -> String {
    let out = Command::new("id").arg("-un").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
