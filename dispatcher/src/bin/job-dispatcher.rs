//! job-dispatcher. See `job-dispatcher --help` and docs/job-dispatcher.md.

use std::process::ExitCode;

use clap::Parser;
use dispatcher::settings::Settings;

fn main() -> ExitCode {
    let settings = Settings::parse();
    dispatcher::init_logging();
    // One thread: a few watches, a poll every 10 s and a small HTTP server never need more, and
    // each extra thread brings a malloc arena of its own.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::from(70);
        }
    };
    match runtime.block_on(dispatcher::run::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(if e.is_config() { 78 } else { 1 })
        }
    }
}
