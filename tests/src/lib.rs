//! Test support for end-to-end scenarios: real git servers on loopback, fixture repositories,
//! a sandbox per scenario, and the stand-in `buildkite-agent`. Shared by the tests under
//! `tests/`, the demo and the benchmarks.

pub mod bench;
pub mod container;
pub mod dispatch_world;
pub mod dispatcher_process;
pub mod fake_buildkite;
pub mod fake_cluster;
pub mod fake_github;
pub mod fake_kube;
pub mod fake_kube_protobuf;
pub mod fixture;
pub mod git;
pub mod git_daemon;
pub mod http_server;
pub mod loopback;
pub mod parity;
pub mod sandbox;
pub mod scenario;
pub mod sshd;
pub mod standin_agent;
pub mod standin_api;
pub mod standin_config;
pub mod standin_start;
pub mod synthetic;
pub mod tls_front;
