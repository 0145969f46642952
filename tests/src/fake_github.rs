//! A fake GitHub REST API on loopback, for the GitHub App credential helper: the one endpoint it
//! calls, `POST /app/installations/{id}/access_tokens`, checked as GitHub's "Generating an
//! installation access token for a GitHub App" and "Generating a JSON Web Token (JWT) for a
//! GitHub App" describe it, with GitHub's refusals:
//!
//! - the JWT's signature, RS256, verified with the App's public key by `openssl` (not by the
//!   code that signed it): a key that is not the App's is 401 "A JSON web token could not be
//!   decoded";
//! - its `iss`, the App's ID (a number or a string): any other is 401 "Integration not found";
//! - its times: `iat` not in the future, `exp` ahead but no more than 10 minutes;
//! - the installation: any other is 404 "Not Found";
//! - the body: `permissions` no more than `contents: read`, `repositories` among the
//!   installation's, else 422;
//! - a `User-Agent`, which GitHub requires (403 without).
//!
//! A granted request is answered 201 with the one token given at start. Plain HTTP: put a
//! [`crate::tls_front::TlsFront`] before it, since the helper speaks only HTTPS.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};

use crate::loopback::serve_each;

/// The App the API knows.
pub struct App<'a> {
    /// Its ID, as the JWT's `iss` must name it.
    pub id: &'a str,
    pub installation_id: u64,
    /// The App's private key (PEM); the API keeps only its public half.
    pub private_key: &'a Path,
    /// The repositories the installation may give tokens for, by name.
    pub repositories: &'a [&'a str],
}

/// One token request, as the API saw it.
#[derive(Debug, Clone)]
pub struct Asked {
    pub status: u16,
    /// The request's JSON body (`permissions`, `repositories`).
    pub body: Value,
}

struct State {
    app_id: String,
    installation_id: u64,
    repositories: Vec<String>,
    public_key: PathBuf,
    /// Where the signatures are written for `openssl`.
    scratch: PathBuf,
    token: String,
    asked: Mutex<Vec<Asked>>,
    serial: AtomicUsize,
}

pub struct FakeGitHub {
    addr: SocketAddr,
    state: Arc<State>,
}

/// An RSA key of 2048 bits at `path`: PKCS#1 (`BEGIN RSA PRIVATE KEY`, the format GitHub
/// generates) when `github_format`, else PKCS#8 (`openssl`'s own).
pub fn generate_key(path: &Path, github_format: bool) {
    let mut cmd = Command::new("openssl");
    cmd.arg("genrsa");
    if github_format {
        cmd.arg("-traditional");
    }
    let made = cmd
        .arg("-out")
        .arg(path)
        .arg("2048")
        .stderr(Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(made.success(), "openssl genrsa {}", path.display());
}

impl FakeGitHub {
    /// Serves `app`, in `dir` (its public key and scratch files), granting `token`.
    pub fn start(dir: &Path, app: App, token: &str) -> FakeGitHub {
        std::fs::create_dir_all(dir).unwrap();
        let public_key = dir.join("app-public.pem");
        let made = Command::new("openssl")
            .args(["rsa", "-pubout", "-in"])
            .arg(app.private_key)
            .arg("-out")
            .arg(&public_key)
            .stderr(Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(made.success(), "openssl rsa -pubout");
        let state = Arc::new(State {
            app_id: app.id.to_string(),
            installation_id: app.installation_id,
            repositories: app.repositories.iter().map(|r| r.to_string()).collect(),
            public_key,
            scratch: dir.to_path_buf(),
            token: token.to_string(),
            asked: Mutex::default(),
            serial: AtomicUsize::default(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let serving = state.clone();
        serve_each(listener, move |stream| serve(stream, &serving));
        FakeGitHub { addr, state }
    }

    /// `http://127.0.0.1:PORT`, for a TLS front.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every token request so far, in order.
    pub fn asked(&self) -> Vec<Asked> {
        self.state.asked.lock().unwrap().clone()
    }
}

/// A request: method, path, headers (names lower-cased), body.
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn read(stream: &TcpStream) -> Option<Request> {
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let mut words = line.split_whitespace();
        let (method, path) = (words.next()?.to_string(), words.next()?.to_string());
        let mut headers = Vec::new();
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).ok()?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':')?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
        let mut request = Request {
            method,
            path,
            headers,
            body: Vec::new(),
        };
        let length = request
            .header("content-length")
            .and_then(|l| l.parse().ok());
        request.body = vec![0; length.unwrap_or(0)];
        reader.read_exact(&mut request.body).ok()?;
        Some(request)
    }

    fn header(&self, name: &str) -> Option<&str> {
        let found = self.headers.iter().find(|(n, _)| n == name);
        found.map(|(_, v)| v.as_str())
    }
}

fn serve(mut stream: TcpStream, state: &State) {
    let Some(request) = Request::read(&stream) else {
        return;
    };
    let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
    let (status, answer) = match decide(&request, &body, state) {
        Ok(()) => (
            201,
            json!({"token": state.token, "expires_at": "2099-01-01T00:00:00Z",
                   "permissions": {"contents": "read"}, "repository_selection": "selected"}),
        ),
        Err((status, message)) => (
            status,
            json!({"message": message, "documentation_url": "https://docs.github.com/rest"}),
        ),
    };
    if request.path.ends_with("/access_tokens") {
        let asked = Asked { status, body };
        state.asked.lock().unwrap().push(asked);
    }
    let text = answer.to_string();
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
}

/// GitHub's checks, in its order: who is asking (the JWT), then what for.
fn decide(request: &Request, body: &Value, state: &State) -> Result<(), (u16, &'static str)> {
    if request.header("user-agent").is_none() {
        return Err((403, "Request forbidden by administrative rules. Please make sure your request has a User-Agent header"));
    }
    let installation = request
        .path
        .strip_prefix("/app/installations/")
        .and_then(|rest| rest.strip_suffix("/access_tokens"));
    let Some(installation) = installation.filter(|_| request.method == "POST") else {
        return Err((404, "Not Found"));
    };
    let jwt = request
        .header("authorization")
        .and_then(|a| a.strip_prefix("Bearer "));
    let jwt = jwt.ok_or((401, "A JSON web token could not be decoded"))?;
    check_jwt(jwt, state)?;
    if installation != state.installation_id.to_string() {
        return Err((404, "Not Found"));
    }
    if body["permissions"] != json!({"contents": "read"}) {
        return Err((
            422,
            "The permissions requested are not granted to this installation.",
        ));
    }
    let repositories = body["repositories"].as_array().into_iter().flatten();
    if !repositories
        .into_iter()
        .all(|r| state.repositories.iter().any(|own| r == own.as_str()))
    {
        return Err((422, "There is at least one repository that does not exist or is not accessible to the parent installation."));
    }
    Ok(())
}

fn check_jwt(jwt: &str, state: &State) -> Result<(), (u16, &'static str)> {
    const UNDECODABLE: (u16, &str) = (401, "A JSON web token could not be decoded");
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header, claims, signature] = parts[..] else {
        return Err(UNDECODABLE);
    };
    let decode = |part: &str| -> Option<Value> {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
    };
    let (Some(header), Some(claims)) = (decode(header), decode(claims)) else {
        return Err(UNDECODABLE);
    };
    let issuer = match &claims["iss"] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if issuer != state.app_id {
        return Err((401, "Integration not found"));
    }
    let signed = format!("{}.{}", parts[0], parts[1]);
    if header["alg"] != "RS256" || !verified(state, &signed, signature) {
        return Err(UNDECODABLE);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (Some(iat), Some(exp)) = (claims["iat"].as_u64(), claims["exp"].as_u64()) else {
        return Err(UNDECODABLE);
    };
    if iat > now {
        return Err((401, "'Issued at' claim ('iat') must be an Integer representing the time that the assertion was issued"));
    }
    if exp <= now || exp > now + 600 {
        return Err((
            401,
            "'Expiration time' claim ('exp') is too far in the future",
        ));
    }
    Ok(())
}

/// `openssl dgst -sha256 -verify` with the App's public key.
fn verified(state: &State, signed: &str, signature: &str) -> bool {
    let Ok(signature) = URL_SAFE_NO_PAD.decode(signature) else {
        return false;
    };
    let n = state.serial.fetch_add(1, Ordering::SeqCst);
    let (input, sig) = (
        state.scratch.join(format!("jwt-{n}.signed")),
        state.scratch.join(format!("jwt-{n}.sig")),
    );
    std::fs::write(&input, signed).unwrap();
    std::fs::write(&sig, signature).unwrap();
    Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(&state.public_key)
        .arg("-signature")
        .arg(&sig)
        .arg(&input)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
