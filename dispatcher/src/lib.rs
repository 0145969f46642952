//! job-dispatcher: watches a Buildkite queue's demand and creates Kubernetes Jobs of one-shot
//! agents (agent-wrapper running `buildkite-agent start --disconnect-after-job`) sized to it.
//!
//! This library holds the decision ([`decide`]), a pure function of one tick's observations, and
//! the Job each dispatch creates from the agent template ([`template`]); the Kubernetes and
//! Buildkite edges feed them. `benches/dispatch.rs` drives it through a
//! simulated day of CI beside the peers' policies.

pub mod decide;
pub mod template;
