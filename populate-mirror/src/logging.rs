//! Logs for a Kubernetes Job, or a person: one JSON object per line when stderr is not a
//! terminal (with the repository and phase as fields, so `kubectl logs` can be filtered), readable
//! text when it is.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Logs to stderr; `POPULATE_MIRROR_LOG` takes a tracing filter (default `info`). Returns
/// whether stderr is a terminal.
pub fn init() -> bool {
    let filter =
        EnvFilter::try_from_env("POPULATE_MIRROR_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let terminal = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    if terminal {
        builder.without_time().with_target(false).init();
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init();
    }
    terminal
}
