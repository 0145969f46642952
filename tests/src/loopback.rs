//! Servers on loopback: a free port to hand to a daemon, and waiting until it listens.

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// A port nothing listens on right now (the kernel's pick), for a daemon that takes `--port`.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 request to `address` (`host:port`) on a connection of its own: the status and
/// the body (0 and nothing when nothing listens).
pub fn http(address: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    http_with(address, method, path, "", body)
}

/// [`http`] with more header lines (`Name: value\r\n` each).
pub fn http_with(
    address: &str,
    method: &str,
    path: &str,
    headers: &str,
    body: Option<&str>,
) -> (u16, String) {
    let (code, _, body) = http_exchange(address, method, path, headers, body);
    (code, body)
}

/// [`http_with`], with the response's header lines too (for `Retry-After`).
pub fn http_exchange(
    address: &str,
    method: &str,
    path: &str,
    headers: &str,
    body: Option<&str>,
) -> (u16, String, String) {
    use std::io::{Read, Write};
    let Ok(mut stream) = TcpStream::connect(address) else {
        return (0, String::new(), String::new());
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let body = body.unwrap_or("");
    let _ = write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or_default();
    (code, head.to_string(), body.to_string())
}

/// Accepts connections on `listener` for ever, each served by `serve` on a thread of its own.
pub fn serve_each<F>(listener: std::net::TcpListener, serve: F)
where
    F: Fn(TcpStream) + Clone + Send + 'static,
{
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let serve = serve.clone();
            std::thread::spawn(move || serve(stream));
        }
    });
}

/// Waits up to 10 s for `what` to accept connections on `port`.
pub fn wait_until_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
