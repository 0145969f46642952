//! `git daemon` on loopback, serving a server root over the `git://` protocol.

use std::path::Path;
use std::process::{Child, Stdio};

use crate::loopback::{free_port, wait_until_listening};

pub struct GitDaemon {
    port: u16,
    child: Child,
}

impl GitDaemon {
    pub fn start(root: &Path) -> GitDaemon {
        let port = free_port();
        let child = crate::git::command(root)
            .args([
                "daemon",
                "--reuseaddr",
                "--export-all",
                "--informative-errors",
                "--listen=127.0.0.1",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", root.display()))
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon starts");
        wait_until_listening(port, "git daemon");
        GitDaemon { port, child }
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "git://127.0.0.1:{}/{}",
            self.port,
            path.trim_start_matches('/')
        )
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
