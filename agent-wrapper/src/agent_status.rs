//! The agent's own word on whether it holds a job: `GET /status.json` from the health server it
//! runs with `--health-check-addr` (buildkite-agent 3.72+, `agent/agent_pool.go`
//! `statusJSONHandler`). Each worker is `busy`, with its `current_job_id`, from the moment it
//! accepts a job until FinishJob has returned, and `idle` otherwise, so `idle` after a job means
//! the job's result and log are with Buildkite.
//!
//! The server starts only after the agent registered and installed its signal handlers
//! (`clicommand/agent_start.go`), so an answer also means the agent is up.
//!
//! A plain HTTP/1.0 request over a loopback socket, bounded by a short timeout: the wrapper asks
//! rarely (see `supervisor`), and an HTTP client crate would cost PID 1 more memory than this
//! whole module.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// How long one question may take: loopback, so anything longer means the agent is stuck.
const TIMEOUT: Duration = Duration::from_secs(2);

/// What `/status.json` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    /// `aggregate_status == "busy"`: a worker holds a job, finishing included.
    pub busy: bool,
    /// The busy worker's job.
    pub job_id: Option<String>,
}

#[derive(serde::Deserialize)]
struct StatusJson {
    aggregate_status: String,
    #[serde(default)]
    workers: Vec<WorkerJson>,
}

#[derive(serde::Deserialize)]
struct WorkerJson {
    #[serde(default)]
    current_job_id: Option<String>,
}

/// Where the agent's health server listens.
#[derive(Debug, Clone, Copy)]
pub struct StatusServer(pub SocketAddr);

impl StatusServer {
    /// A loopback port free now, for `--health-check-addr`.
    pub fn pick() -> std::io::Result<StatusServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        Ok(StatusServer(listener.local_addr()?))
    }

    /// The agent's status; an error while it is not up yet (or no longer).
    pub fn ask(&self) -> std::io::Result<AgentStatus> {
        let mut stream = TcpStream::connect_timeout(&self.0, TIMEOUT)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        stream.write_all(b"GET /status.json HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut response = Vec::new();
        stream.take(64 * 1024).read_to_end(&mut response)?;
        parse(&response)
    }
}

fn parse(response: &[u8]) -> std::io::Result<AgentStatus> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let text = std::str::from_utf8(response).map_err(|_| invalid("not UTF-8"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| invalid("no HTTP header"))?;
    if !head.starts_with("HTTP/1.") || head.split_whitespace().nth(1) != Some("200") {
        return Err(invalid("not 200 OK"));
    }
    let status: StatusJson = serde_json::from_str(body).map_err(|_| invalid("not status JSON"))?;
    Ok(AgentStatus {
        busy: status.aggregate_status == "busy",
        job_id: status
            .workers
            .into_iter()
            .find_map(|w| w.current_job_id.filter(|id| !id.is_empty())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_agents_status_json() {
        let busy = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n{\"health\":\"ok\",\"aggregate_status\":\"busy\",\"workers\":[{\"status\":\"busy\",\"current_job_id\":\"0190-abc\",\"id\":\"u\",\"spawn_index\":1}]}\n";
        assert_eq!(
            parse(busy).unwrap(),
            AgentStatus {
                busy: true,
                job_id: Some("0190-abc".into())
            }
        );
        let idle = b"HTTP/1.1 200 OK\r\n\r\n{\"health\":\"ok\",\"aggregate_status\":\"idle\",\"workers\":[{\"status\":\"idle\",\"id\":\"u\",\"spawn_index\":1}]}";
        assert_eq!(
            parse(idle).unwrap(),
            AgentStatus {
                busy: false,
                job_id: None
            }
        );
        assert!(parse(b"HTTP/1.0 404 Not Found\r\n\r\n404").is_err());
        assert!(parse(b"garbage").is_err());
    }
}
