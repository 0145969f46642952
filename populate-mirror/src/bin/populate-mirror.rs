//! The mirror volume's Job. See `populate-mirror --help` and docs/populate-mirror.md.

use std::process::ExitCode;

use clap::Parser;
use populate_mirror::settings::Settings;
use populate_mirror::{PopulateError, Summary};
use stateless_core::interrupts::{signal_exit_code, Interrupts};

fn main() -> ExitCode {
    let settings = Settings::parse();
    populate_mirror::logging::init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let outcome = runtime.and_then(|rt| {
        rt.block_on(async {
            let mut interrupts = Interrupts::install()?;
            Ok(tokio::select! {
                result = populate_mirror::run(settings) => exit_code(result),
                signal = interrupts.recv() => {
                    // Dropping the run killed every git it started and removed what was staged.
                    tracing::warn!("stopped by signal {signal}; nothing unpublished was left on the volume");
                    signal_exit_code(signal)
                }
            })
        })
    });
    outcome.unwrap_or_else(|e| {
        eprintln!("populate-mirror: cannot start the async runtime: {e}");
        ExitCode::from(5)
    })
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
