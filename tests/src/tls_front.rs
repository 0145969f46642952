//! HTTPS on loopback: `socat` terminating TLS in front of one of our plain HTTP git servers,
//! with a self-signed certificate for 127.0.0.1 made by `openssl`. For what only accepts HTTPS
//! (the agent's remote mirror). git trusts the certificate through `GIT_SSL_CAINFO`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::loopback::{free_port, wait_until_listening};

pub struct TlsFront {
    port: u16,
    pub certificate: PathBuf,
    child: Child,
}

impl TlsFront {
    /// TLS on a new port forwarding to `backend_url`'s host and port; `None`, with a message,
    /// when `socat` or `openssl` is missing (the test command's set-up installs both).
    pub fn start(dir: &Path, backend_url: &str) -> Option<TlsFront> {
        for tool in ["socat", "openssl"] {
            if Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .map_or(true, |o| !o.status.success())
            {
                eprintln!("skipping: {tool} is not installed (apt-get install {tool})");
                return None;
            }
        }
        let key = dir.join("tls.key");
        let certificate = dir.join("tls.crt");
        let made = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&certificate)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(made.success(), "openssl could not make a certificate");
        let backend = backend_url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .expect("host:port");
        let port = free_port();
        let child = Command::new("socat")
            .arg(format!(
                "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={},key={}",
                certificate.display(),
                key.display()
            ))
            .arg(format!("TCP:{backend}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat starts");
        wait_until_listening(port, "socat");
        Some(TlsFront {
            port,
            certificate,
            child,
        })
    }

    /// `https://127.0.0.1:PORT/<path>`.
    pub fn url(&self, path: &str) -> String {
        format!(
            "https://127.0.0.1:{}/{}",
            self.port,
            path.trim_start_matches('/')
        )
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
