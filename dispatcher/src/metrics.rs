//! Prometheus metrics (prometheus-client, the official Rust client) and the small HTTP server for
//! `/metrics`, `/healthz` and `/readyz`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct State {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

/// A stuck pod's waiting reason: the kubelet's and the scheduler's are a short, fixed list.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StuckReason {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiError {
    pub api: &'static str,
    pub kind: &'static str,
}

/// Everything the dispatcher reports; every series carries the `queue` label, so that one
/// Prometheus over several queues' dispatchers tells them apart.
pub struct Metrics {
    pub registry: Registry,
    pub demand: Family<State, Gauge>,
    pub agents: Gauge,
    pub supply: Family<State, Gauge>,
    pub dispatches: Counter,
    pub pods_created: Counter,
    pub holds: Family<Reason, Counter>,
    pub blocked: Family<Reason, Gauge>,
    pub stuck_pods: Family<StuckReason, Counter>,
    pub api_errors: Family<ApiError, Counter>,
    /// The stacks mode: Buildkite jobs by what the dispatcher did with them.
    pub stack_jobs: Family<Reason, Counter>,
    /// The stacks mode: whether Buildkite says the queue's dispatch is paused (an operator's
    /// choice, so not one of the `blocked` faults the alerts watch).
    pub paused: Gauge,
    pub tick_seconds: Histogram,
    pub leader: Gauge,
    /// The mirror's freshness, in the modes where the dispatcher sees its refreshes.
    mirror: Option<MirrorFreshness>,
    /// Whether the last Buildkite poll succeeded, which a tick only makes once the watches have
    /// synced (`/readyz`).
    pub ready: AtomicBool,
}

/// Reads the newest mirror generation's publish time from the watches (`None`: none in sight).
pub type PublishedSource = Box<dyn Fn() -> Option<Timestamp> + Send + Sync>;

/// `mirror_published_timestamp_seconds`, read from its source at each scrape: no task of its
/// own, and never older than the watches.
struct MirrorFreshness {
    published: Gauge,
    source: OnceLock<PublishedSource>,
}

impl Metrics {
    /// The metrics of `queue`; with `mirror_refresh`, also the mirror's freshness (its period
    /// and, once [`Metrics::watch_mirror`] gives a source, its last publish).
    pub fn new(queue: &str, mirror_refresh: Option<Duration>) -> Arc<Metrics> {
        let queue = [("queue".into(), queue.to_string().into())];
        let mut registry = Registry::with_prefix_and_labels("dispatcher", queue.into_iter());
        let metrics = Metrics {
            demand: Family::default(),
            agents: Gauge::default(),
            supply: Family::default(),
            dispatches: Counter::default(),
            pods_created: Counter::default(),
            holds: Family::default(),
            blocked: Family::default(),
            stuck_pods: Family::default(),
            api_errors: Family::default(),
            stack_jobs: Family::default(),
            paused: Gauge::default(),
            tick_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            leader: Gauge::default(),
            mirror: None,
            ready: AtomicBool::new(false),
            registry: Registry::default(),
        };
        registry.register(
            "demand_jobs",
            "The queue's jobs, by state (Buildkite)",
            metrics.demand.clone(),
        );
        registry.register(
            "agents_registered",
            "Agents registered in the queue (Buildkite)",
            metrics.agents.clone(),
        );
        registry.register(
            "supply_pods",
            "This queue's agent pods, by state (Kubernetes)",
            metrics.supply.clone(),
        );
        registry.register(
            "dispatches",
            "Jobs of agents created",
            metrics.dispatches.clone(),
        );
        registry.register(
            "pods_created",
            "Agent pods asked for, over all dispatches",
            metrics.pods_created.clone(),
        );
        registry.register(
            "holds",
            "Ticks that dispatched nothing, by reason",
            metrics.holds.clone(),
        );
        registry.register(
            "blocked",
            "Whether dispatching is blocked by this reason (1) or not (0)",
            metrics.blocked.clone(),
        );
        registry.register(
            "stuck_pods",
            "Agent pods that never started within --start-timeout (or could never), let go, by reason",
            metrics.stuck_pods.clone(),
        );
        registry.register(
            "api_errors",
            "Failed calls, by API and kind",
            metrics.api_errors.clone(),
        );
        registry.register(
            "stack_jobs",
            "The stacks mode: Buildkite jobs reserved, renewed, not reserved, failed (finished with the reason) and canceled (their Jobs deleted)",
            metrics.stack_jobs.clone(),
        );
        registry.register(
            "queue_paused",
            "The stacks mode: whether the queue's dispatch is paused in Buildkite (1) or not (0)",
            metrics.paused.clone(),
        );
        registry.register(
            "tick_seconds",
            "How long one tick took",
            metrics.tick_seconds.clone(),
        );
        registry.register(
            "leader",
            "Whether this replica holds the Lease (1) or not (0)",
            metrics.leader.clone(),
        );
        let mirror = mirror_refresh.map(|refresh| register_mirror(&mut registry, refresh));
        Arc::new(Metrics {
            registry,
            mirror,
            ..metrics
        })
    }

    /// Reads the mirror's publish time from `source` at each scrape; nothing in a mode whose
    /// refreshes the dispatcher cannot see.
    pub fn watch_mirror(&self, source: PublishedSource) {
        if let Some(mirror) = &self.mirror {
            let _ = mirror.source.set(source);
        }
    }

    /// Counts a failed Kubernetes call by its kind.
    pub fn kubernetes_error(&self, e: &kube::Error) {
        let kind = match e {
            kube::Error::Api(status) if status.code == 409 => "conflict",
            kube::Error::Api(status) if status.code == 429 => "throttled",
            kube::Error::Api(status) if status.code >= 500 => "server",
            _ => "other",
        };
        let error = ApiError {
            api: "kubernetes",
            kind,
        };
        self.api_errors.get_or_create(&error).inc();
    }

    fn text(&self) -> String {
        // A publish gone out of sight (a populate Job deleted by its TTL) keeps its time: it
        // still happened.
        if let Some(mirror) = &self.mirror {
            if let Some(at) = mirror.source.get().and_then(|read| read()) {
                mirror.published.set(at.as_second());
            }
        }
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn register_mirror(registry: &mut Registry, refresh: Duration) -> MirrorFreshness {
    let period: Gauge = Gauge::default();
    period.set(i64::try_from(refresh.as_secs()).unwrap_or(i64::MAX));
    registry.register(
        "mirror_refresh_seconds",
        "How often the mirror is meant to be refreshed (--mirror-refresh)",
        period,
    );
    let published = Gauge::default();
    registry.register(
        "mirror_published_timestamp_seconds",
        "When the newest mirror generation was published (Unix time; 0: none seen yet)",
        published.clone(),
    );
    MirrorFreshness {
        published,
        source: OnceLock::new(),
    }
}

/// Reads a request's head into `buffer`, however many reads it comes in (a client may write
/// the request line in pieces), up to the blank line, a full buffer, or 5 s; how much was read.
async fn read_head(stream: &mut tokio::net::TcpStream, buffer: &mut [u8]) -> usize {
    let mut n = 0;
    let read = async {
        let ended = |head: &[u8]| {
            head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n")
        };
        while n < buffer.len() && !ended(&buffer[..n]) {
            match stream.read(&mut buffer[n..]).await {
                Ok(0) | Err(_) => break,
                Ok(more) => n += more,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    n
}

/// Serves `/metrics`, `/healthz` (the process answers) and `/readyz` (the watches have synced and
/// Buildkite accepted the token: on the last poll, or a standby's check at start) until the
/// process ends.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buffer = [0u8; 2048];
            let n = read_head(&mut stream, &mut buffer).await;
            let request = String::from_utf8_lossy(&buffer[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (code, body, content_type) = match path {
                "/metrics" => (
                    "200 OK",
                    metrics.text(),
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
                "/healthz" => ("200 OK", "ok\n".to_string(), "text/plain"),
                "/readyz" if metrics.ready.load(Ordering::Relaxed) => {
                    ("200 OK", "ready\n".to_string(), "text/plain")
                }
                "/readyz" => (
                    "503 Service Unavailable",
                    "not ready: the watches have not synced yet, or Buildkite refused BUILDKITE_AGENT_TOKEN or did not answer (see the log)\n".to_string(),
                    "text/plain",
                ),
                _ => ("404 Not Found", "not found\n".to_string(), "text/plain"),
            };
            let response = format!(
                "HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that writes its request line in pieces (as `write!` on a bare socket does) is
    /// answered all the same: the first read alone held only "GET", a 404.
    #[tokio::test]
    async fn a_request_written_in_pieces_is_served() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, Metrics::new("q", None)));
        let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
        for piece in ["GET", " /metrics", " HTTP/1.1\r\n", "Host: x\r\n\r\n"] {
            client.write_all(piece.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.contains("dispatcher_dispatches_total"), "{answer}");
    }

    #[test]
    fn every_series_names_its_queue() {
        let metrics = Metrics::new("linux-large", Some(Duration::from_secs(900)));
        metrics.dispatches.inc();
        let reason = StuckReason {
            reason: "ImagePullBackOff".into(),
        };
        metrics.stuck_pods.get_or_create(&reason).inc();
        metrics
            .blocked
            .get_or_create(&Reason { reason: "stuck" })
            .set(1);
        let text = metrics.text();
        let series: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(series.len() >= 4, "{text}");
        for line in series {
            assert!(line.contains("queue=\"linux-large\""), "{line}");
        }
    }

    fn sample<'t>(text: &'t str, name: &str) -> Option<&'t str> {
        let line = text.lines().find(|l| l.starts_with(&format!("{name}{{")))?;
        line.rsplit(' ').next()
    }

    #[test]
    fn the_mirrors_publish_time_is_read_at_each_scrape_and_kept_once_out_of_sight() {
        let metrics = Metrics::new("linux-large", Some(Duration::from_secs(900)));
        let published = "dispatcher_mirror_published_timestamp_seconds";
        assert_eq!(
            sample(&metrics.text(), published),
            Some("0"),
            "none seen yet"
        );
        assert_eq!(
            sample(&metrics.text(), "dispatcher_mirror_refresh_seconds"),
            Some("900")
        );
        let seen = Arc::new(std::sync::Mutex::new(None));
        let source = seen.clone();
        metrics.watch_mirror(Box::new(move || *source.lock().unwrap()));
        let at: Timestamp = "2026-11-30T10:00:00Z".parse().unwrap();
        *seen.lock().unwrap() = Some(at);
        let expected = at.as_second().to_string();
        assert_eq!(sample(&metrics.text(), published), Some(expected.as_str()));
        // Its Job deleted by the TTL: the publish still happened.
        *seen.lock().unwrap() = None;
        assert_eq!(sample(&metrics.text(), published), Some(expected.as_str()));
    }

    #[test]
    fn without_a_refresh_it_can_see_no_mirror_series_is_exported() {
        let metrics = Metrics::new("linux-large", None);
        metrics.watch_mirror(Box::new(|| Some(Timestamp::now())));
        assert!(!metrics.text().contains("mirror"), "{}", metrics.text());
    }
}
