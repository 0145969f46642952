//! HTTPS on loopback: `socat` terminating TLS in front of one of our plain HTTP git servers,
//! with a self-signed certificate for 127.0.0.1 made by `openssl`. For what only accepts HTTPS
//! (the agent's remote mirror). git trusts the certificate through `GIT_SSL_CAINFO`. rustls
//! (webpki) refuses a CA certificate as a server's own, so for a rustls client
//! [`TlsFront::start_with_ca`] makes a CA and a server certificate it signed.

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
        if !tools_installed() {
            return None;
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
        Some(Self::listen(backend_url, certificate, &key))
    }

    /// Like [`TlsFront::start`], with a server certificate signed by a CA of its own: the
    /// `certificate` to trust is the CA's (`SSL_CERT_FILE` for rustls's system roots).
    pub fn start_with_ca(dir: &Path, backend_url: &str) -> Option<TlsFront> {
        if !tools_installed() {
            return None;
        }
        let (ca_key, ca) = (dir.join("ca.key"), dir.join("ca.crt"));
        openssl(
            &[
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ],
            &[
                ("-subj", "/CN=stateless-e2e test CA".as_ref()),
                ("-keyout", ca_key.as_os_str()),
                ("-out", ca.as_os_str()),
            ],
        );
        let (key, request, server) = (
            dir.join("tls.key"),
            dir.join("tls.csr"),
            dir.join("tls.crt"),
        );
        openssl(
            &["req", "-newkey", "rsa:2048", "-nodes"],
            &[
                ("-subj", "/CN=127.0.0.1".as_ref()),
                ("-keyout", key.as_os_str()),
                ("-out", request.as_os_str()),
            ],
        );
        let extensions = dir.join("tls.ext");
        std::fs::write(
            &extensions,
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        openssl(
            &["x509", "-req", "-days", "1", "-CAcreateserial"],
            &[
                ("-in", request.as_os_str()),
                ("-CA", ca.as_os_str()),
                ("-CAkey", ca_key.as_os_str()),
                ("-extfile", extensions.as_os_str()),
                ("-out", server.as_os_str()),
            ],
        );
        let mut front = Self::listen(backend_url, server, &key);
        front.certificate = ca;
        Some(front)
    }

    /// socat terminating TLS with `certificate` and `key`, forwarding to `backend_url`.
    fn listen(backend_url: &str, certificate: PathBuf, key: &Path) -> TlsFront {
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
        TlsFront {
            port,
            certificate,
            child,
        }
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

/// `socat` and `openssl`, or a message saying which to install.
fn tools_installed() -> bool {
    for tool in ["socat", "openssl"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            eprintln!("skipping: {tool} is not installed (apt-get install {tool})");
            return false;
        }
    }
    true
}

/// `openssl` with `args`, then each option and its value.
fn openssl(args: &[&str], options: &[(&str, &std::ffi::OsStr)]) {
    let mut cmd = Command::new("openssl");
    cmd.args(args);
    for (option, value) in options {
        cmd.arg(option).arg(value);
    }
    let made = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(made.success(), "openssl {args:?} failed");
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
