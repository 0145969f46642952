//! The image's ENTRYPOINT. See `agent-wrapper --help` and docs/agent-wrapper.md.

use std::process::ExitCode;
use std::time::Instant;

use agent_wrapper::exit_report::Ending;
use agent_wrapper::settings::Settings;
use agent_wrapper::supervisor::take_signals;
use agent_wrapper::{init_logging, run, Records};
use clap::Parser;
use stateless_core::checkout_record::CheckoutRecord;

fn main() -> ExitCode {
    // Before anything else: a signal that arrives from here on waits for the loop. (As PID 1,
    // one that arrives earlier has no handler and the kernel drops it, as for any init.)
    let signals = take_signals();
    let started = Instant::now();
    init_logging();
    let termination_log = std::env::var_os("AGENT_WRAPPER_TERMINATION_LOG")
        .map_or_else(|| "/dev/termination-log".into(), Into::into);
    let (ending, checkout, termination_log) = match Settings::try_parse() {
        Ok(settings) => {
            let records = Records::in_dir(&settings);
            let ending = run(&settings, &records, signals);
            // Only a run that started the agent has a checkout record of its own.
            let checkout = matches!(ending, Ending::Supervised(_))
                .then(|| CheckoutRecord::load(&records.checkout))
                .flatten();
            (ending, checkout, settings.termination_log)
        }
        // --help and --version are not endings.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => (
            Ending::Config(e.to_string().trim().to_string()),
            None,
            termination_log,
        ),
    };
    let report = ending.report(checkout, started.elapsed().as_millis() as u64);
    if report.exit_code != 0 {
        tracing::error!("{}", report.message);
    }
    let code = report.exit_code;
    report.emit(&termination_log);
    ExitCode::from(code)
}
