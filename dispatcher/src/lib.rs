//! job-dispatcher: watches a Buildkite queue's demand and creates Kubernetes Jobs of one-shot
//! agents (agent-wrapper running `buildkite-agent start --disconnect-after-job`) sized to it.
//!
//! This library holds the decision ([`decide`]), a pure function of one tick's observations, and
//! the Job each dispatch creates from the agent template ([`template`]); the Kubernetes and
//! Buildkite edges feed them. `benches/dispatch.rs` drives it through a
//! simulated day of CI beside the peers' policies.

pub mod act;
pub mod buildkite;
pub mod decide;
pub mod leader;
pub mod metrics;
pub mod mirror_plan;
pub mod mirror_run;
pub mod observe;
pub mod run;
pub mod settings;
pub mod stacks_api;
pub mod stacks_observe;
pub mod stacks_plan;
pub mod stacks_run;
pub mod template;
pub mod watches;

/// JSON log lines on stderr, one a decision; `DISPATCHER_LOG` filters (`info` by default). Also
/// installs rustls's ring provider, which the Buildkite client needs.
pub fn init_logging() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let filter = tracing_subscriber::EnvFilter::try_from_env("DISPATCHER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .json()
        .flatten_event(true)
        .init();
}
