//! The agent's `checkout` hook. See `checkout-hook --help` and docs/checkout-hook.md.

use std::process::ExitCode;

use hooks::settings::Settings;
use stateless_core::interrupts::run_until_interrupted;

fn main() -> ExitCode {
    let settings = match Settings::from_args_and_env() {
        Ok(settings) => settings,
        // Input to fix: exit 1, as the agent does for a setting it refuses.
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::FAILURE;
        }
        // --help or --version.
        Err(e) => e.exit(),
    };
    hooks::logging::init();
    for warning in &settings.warnings {
        tracing::warn!("{warning}");
    }
    run_until_interrupted(
        "checkout-hook",
        async {
            hooks::run(settings).await.map_or_else(
                |e| {
                    tracing::error!("{e}");
                    e.exit_code()
                },
                |()| ExitCode::SUCCESS,
            )
        },
        |signal| tracing::warn!("checkout interrupted by signal {signal}; stopped git"),
    )
}
