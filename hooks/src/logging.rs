//! Log lines for a Buildkite job log: plain text, no timestamps (the agent adds them), warnings
//! and errors marked the way the agent marks its own.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Logs to stderr; `CHECKOUT_HOOK_LOG` takes a tracing filter (default `info`).
pub fn init() {
    let filter =
        EnvFilter::try_from_env("CHECKOUT_HOOK_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .event_format(JobLogFormat)
        .init();
}

struct JobLogFormat;

impl<S, N> FormatEvent<S, N> for JobLogFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        match *event.metadata().level() {
            Level::ERROR => write!(writer, "🚨 checkout-hook: ")?,
            Level::WARN => write!(writer, "⚠️  ")?,
            _ => {}
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}
