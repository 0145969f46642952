//! Prometheus metrics (prometheus-client, the official Rust client) and the small HTTP server for
//! `/metrics`, `/healthz` and `/readyz`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
    pub tick_seconds: Histogram,
    pub leader: Gauge,
    /// Whether the last Buildkite poll succeeded, which a tick only makes once the watches have
    /// synced (`/readyz`).
    pub ready: AtomicBool,
}

impl Metrics {
    pub fn new(queue: &str) -> Arc<Metrics> {
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
            tick_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            leader: Gauge::default(),
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
            "tick_seconds",
            "How long one tick took",
            metrics.tick_seconds.clone(),
        );
        registry.register(
            "leader",
            "Whether this replica holds the Lease (1) or not (0)",
            metrics.leader.clone(),
        );
        Arc::new(Metrics {
            registry,
            ..metrics
        })
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
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
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
            let n = stream.read(&mut buffer).await.unwrap_or(0);
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

    #[test]
    fn every_series_names_its_queue() {
        let metrics = Metrics::new("linux-large");
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
}
