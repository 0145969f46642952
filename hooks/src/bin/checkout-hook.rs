//! The agent's `checkout` hook. See `checkout-hook --help` and docs/checkout-hook.md.

use std::process::ExitCode;

use hooks::settings::Settings;
use stateless_core::interrupts::{signal_exit_code, Interrupts};

fn main() -> ExitCode {
    let settings = match Settings::from_args_and_env() {
        Ok(settings) => settings,
        // --help, --version, or input to fix: clap prints it and exits 0 or 2.
        Err(e) => e.exit(),
    };
    hooks::logging::init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let outcome = runtime.and_then(|rt| {
        rt.block_on(async {
            let mut interrupts = Interrupts::install()?;
            Ok(tokio::select! {
                result = hooks::run(settings) => result.map_or_else(|e| {
                    tracing::error!("{e}");
                    e.exit_code()
                }, |()| ExitCode::SUCCESS),
                signal = interrupts.recv() => {
                    tracing::warn!("checkout interrupted by signal {signal}; stopped git");
                    signal_exit_code(signal)
                }
            })
        })
    });
    outcome.unwrap_or_else(|e| {
        eprintln!("checkout-hook: cannot start the async runtime: {e}");
        ExitCode::from(1)
    })
}
