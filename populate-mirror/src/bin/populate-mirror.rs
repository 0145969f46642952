//! The mirror volume's Job. See `populate-mirror --help` and docs/populate-mirror.md.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use populate_mirror::settings::Settings;
use populate_mirror::{PopulateError, Summary};
use stateless_core::interrupts::run_until_interrupted;

fn main() -> ExitCode {
    let mut settings = Settings::parse();
    if populate_mirror::logging::init() {
        // A person is watching: show git's progress every couple of seconds, not every 30.
        settings.progress_interval = settings.progress_interval.min(Duration::from_secs(2));
    }
    run_until_interrupted(
        "populate-mirror",
        async {
            match settings.every {
                Some(every) => exit_code(Err(populate_mirror::run_every(settings, every).await)),
                None => exit_code(populate_mirror::run(settings).await),
            }
        },
        // Dropping the run killed every git it started and removed what was staged.
        |signal| {
            tracing::warn!("stopped by signal {signal}; nothing unpublished was left on the volume")
        },
    )
}

/// The exit codes `docs/populate-mirror.md` documents, decided here only.
fn exit_code(result: Result<Summary, PopulateError>) -> ExitCode {
    match result {
        Ok(Summary { failed: 0, .. }) => ExitCode::SUCCESS,
        Ok(Summary { succeeded: 0, .. }) => ExitCode::from(3),
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(match e {
                PopulateError::Volume(populate_mirror::volume::VolumeError::Locked { .. }) => 4,
                PopulateError::Manifest { .. } => 5,
                _ => 2,
            })
        }
    }
}
