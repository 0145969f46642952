//! A smart-HTTP git server on loopback: `git http-backend` (the real one) behind a small
//! HTTP/1.1 front that counts what it sends and can misbehave on request — stall without
//! closing, drop the connection mid-response, or answer with an error status.
//!
//! Each connection serves one request (`Connection: close`), which is all git's client needs and
//! keeps the fault injection exact: a fault applies to the next N matching requests.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// How the server misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Send this many response bytes, then keep the connection open and silent.
    StallAfter(usize),
    /// Send this many response bytes, then close the connection.
    DropAfter(usize),
    /// Answer with this HTTP status and no git content.
    Status(u16),
}

/// Which requests a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum On {
    /// Any request, the first being the ref advertisement (`GET …/info/refs`).
    AnyRequest,
    /// Requests that transfer objects: protocol v2 `command=fetch` (or any v0 upload-pack POST).
    PackTransfer,
}

#[derive(Default)]
struct State {
    bytes_sent: AtomicU64,
    pack_bytes_sent: AtomicU64,
    /// One entry per request: `GET info/refs`, `ls-refs`, `fetch`, …
    log: Mutex<Vec<String>>,
    faults: Mutex<VecDeque<(On, Fault)>>,
    /// `Authorization` every request must carry, when set.
    required_auth: Mutex<Option<String>>,
    shutdown: AtomicBool,
}

pub struct GitHttpServer {
    addr: SocketAddr,
    state: Arc<State>,
    accept: Option<thread::JoinHandle<()>>,
}

impl GitHttpServer {
    /// Serves every repository under `root` at `http://127.0.0.1:PORT/<path under root>`.
    pub fn start(root: &Path) -> GitHttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let root = root.to_path_buf();
        let st = state.clone();
        let accept = thread::spawn(move || {
            for stream in listener.incoming() {
                if st.shutdown.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (st, root) = (st.clone(), root.clone());
                thread::spawn(move || {
                    let _ = serve(stream, &root, &st);
                });
            }
        });
        GitHttpServer {
            addr,
            state,
            accept: Some(accept),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    /// The same URL with `user:password@` in it.
    pub fn url_with_credentials(&self, path: &str, userinfo: &str) -> String {
        format!(
            "http://{userinfo}@{}/{}",
            self.addr,
            path.trim_start_matches('/')
        )
    }

    /// Answers 401 to any request without HTTP basic credentials `userinfo` (`user:password`),
    /// as a private repository's server does.
    pub fn require_credentials(&self, userinfo: &str) {
        use base64::Engine;
        let encoded = base64::engine::general_purpose::STANDARD.encode(userinfo);
        *self.state.required_auth.lock().unwrap() = Some(format!("Basic {encoded}"));
    }

    /// Applies `fault` to the next `times` requests matching `on`.
    pub fn inject(&self, on: On, fault: Fault, times: usize) {
        let mut faults = self.state.faults.lock().unwrap();
        faults.extend(std::iter::repeat_n((on, fault), times));
    }

    pub fn bytes_sent(&self) -> u64 {
        self.state.bytes_sent.load(Ordering::SeqCst)
    }

    /// Bytes sent in answer to object transfers (`fetch` commands): 0 means no object crossed
    /// the wire.
    pub fn pack_bytes_sent(&self) -> u64 {
        self.state.pack_bytes_sent.load(Ordering::SeqCst)
    }

    /// What was asked, in order: `GET info/refs`, `ls-refs`, `fetch`.
    pub fn requests(&self) -> Vec<String> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn reset_counters(&self) {
        self.state.bytes_sent.store(0, Ordering::SeqCst);
        self.state.pack_bytes_sent.store(0, Ordering::SeqCst);
        self.state.log.lock().unwrap().clear();
    }
}

impl Drop for GitHttpServer {
    fn drop(&mut self) {
        self.state.shutdown.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// One HTTP/1.1 request, as the loopback servers of the test crate read it.
pub(crate) struct Request {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) query: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Request {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// A short name for the log: the v2 command, or the method and last path segment.
    fn kind(&self) -> String {
        if self.method == "POST" {
            let body = String::from_utf8_lossy(&self.body);
            for command in ["ls-refs", "fetch"] {
                if body.contains(&format!("command={command}")) {
                    return command.to_string();
                }
            }
            return "upload-pack".to_string();
        }
        format!("GET {}", self.path.rsplit_once('/').map_or("", |(_, l)| l))
    }

    fn is_pack_transfer(&self) -> bool {
        matches!(self.kind().as_str(), "fetch" | "upload-pack")
    }
}

fn serve(stream: TcpStream, root: &Path, state: &State) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let request = read_request(&mut reader)?;
    let kind = request.kind();
    state.log.lock().unwrap().push(kind.clone());
    let fault = {
        let mut faults = state.faults.lock().unwrap();
        let hit = faults.front().is_some_and(|(on, _)| match on {
            On::AnyRequest => true,
            On::PackTransfer => request.is_pack_transfer(),
        });
        if hit {
            faults.pop_front().map(|(_, f)| f)
        } else {
            None
        }
    };
    let mut out = Counted {
        stream,
        state,
        pack: request.is_pack_transfer(),
        fault,
        sent: 0,
    };
    let required = state.required_auth.lock().unwrap().clone();
    if required.is_some_and(|auth| request.header("Authorization") != Some(auth.as_str())) {
        return out.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    }
    if let Some(Fault::Status(code)) = fault {
        let body = format!("injected failure {code}\n");
        return out.write_all(
            format!(
                "HTTP/1.1 {code} Injected\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }
    cgi(&request, root, &mut out)
}

/// Reads one request; an empty method means the peer closed the connection.
/// One keep-alive connection, as the fakes' clients (kube-rs, kubectl, the stand-in agent) use
/// them: each request to `answer`, which writes the response and says whether the connection
/// may serve another, until the client closes it or asks to (`Connection: close`).
pub(crate) fn serve_connection(
    stream: TcpStream,
    mut answer: impl FnMut(&Request, &mut TcpStream) -> std::io::Result<bool>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let request = read_request(&mut reader)?;
        if request.method.is_empty() {
            return Ok(());
        }
        let keep_going = answer(&request, &mut out)?;
        let close = request
            .header("Connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"));
        if !keep_going || close {
            return Ok(());
        }
    }
}

pub(crate) fn read_request(reader: &mut impl BufRead) -> std::io::Result<Request> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("/").to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut request = Request {
        method,
        path: path.to_string(),
        query: query.to_string(),
        headers,
        body: Vec::new(),
    };
    if let Some(len) = request
        .header("Content-Length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        request.body.resize(len, 0);
        reader.read_exact(&mut request.body)?;
    } else if request
        .header("Transfer-Encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        request.body = read_chunked(reader)?;
    }
    Ok(request)
}

fn read_chunked(reader: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)
            .map_err(std::io::Error::other)?;
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        line.clear();
        reader.read_line(&mut line)?; // the CRLF after the chunk (or the trailer end)
        if size == 0 {
            return Ok(body);
        }
    }
}

/// Runs `git http-backend` for one request and streams its answer back.
fn cgi(request: &Request, root: &Path, out: &mut Counted) -> std::io::Result<()> {
    let mut cmd = Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", &request.method)
        .env("PATH_INFO", &request.path)
        .env("QUERY_STRING", &request.query)
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("CONTENT_LENGTH", request.body.len().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (header, var) in [
        ("Content-Type", "CONTENT_TYPE"),
        ("Git-Protocol", "GIT_PROTOCOL"),
        ("Content-Encoding", "HTTP_CONTENT_ENCODING"),
    ] {
        if let Some(v) = request.header(header) {
            cmd.env(var, v);
        }
    }
    let mut child = cmd.spawn()?;
    let mut stdin = child.stdin.take().unwrap();
    let body = request.body.clone();
    let feeder = thread::spawn(move || {
        let _ = stdin.write_all(&body);
    });
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut status = "200 OK".to_string();
    let mut headers = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        if stdout.read_line(&mut line)? == 0 {
            break;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        match l.split_once(':') {
            Some((k, v)) if k.eq_ignore_ascii_case("Status") => status = v.trim().to_string(),
            _ => headers.push_str(&format!("{l}\r\n")),
        }
    }
    let head = format!("HTTP/1.1 {status}\r\n{headers}Connection: close\r\n\r\n");
    let result = out.write_all(head.as_bytes()).and_then(|()| {
        let mut buf = [0u8; 16384];
        loop {
            let n = stdout.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            out.write_all(&buf[..n])?;
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    let _ = feeder.join();
    result
}

/// The socket, counting bytes and applying the request's fault.
struct Counted<'a> {
    stream: TcpStream,
    state: &'a State,
    pack: bool,
    fault: Option<Fault>,
    sent: usize,
}

impl Counted<'_> {
    fn write_all(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        let limit = match self.fault {
            Some(Fault::StallAfter(n) | Fault::DropAfter(n)) => Some(n),
            _ => None,
        };
        if let Some(limit) = limit {
            let room = limit.saturating_sub(self.sent);
            if bytes.len() >= room {
                bytes = &bytes[..room];
                self.send(bytes)?;
                if let Some(Fault::StallAfter(_)) = self.fault {
                    // Keep the connection open and silent until the client gives up or the
                    // server is dropped.
                    while !self.state.shutdown.load(Ordering::SeqCst) {
                        thread::sleep(Duration::from_millis(50));
                    }
                }
                return Err(std::io::Error::other("fault injected"));
            }
        }
        self.send(bytes)
    }

    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)?;
        self.sent += bytes.len();
        let n = bytes.len() as u64;
        self.state.bytes_sent.fetch_add(n, Ordering::SeqCst);
        if self.pack {
            self.state.pack_bytes_sent.fetch_add(n, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// A query value or path segment with its `%XX` escapes (and `+`) decoded; a `%` not followed by
/// two hex digits is kept as it is.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i..i + 3) {
            Some([b'%', h, l]) => hex(*h).zip(hex(*l)).map(|(h, l)| h * 16 + l),
            _ => None,
        };
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_escapes_are_decoded() {
        assert_eq!(percent_decode("a%2Eb"), "a.b");
        assert_eq!(percent_decode("__default__"), "__default__");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
