//! SIGTERM and SIGINT for our binaries, which run git in process groups of its own: caught from
//! the start, so that dropping the work in progress kills those groups, instead of the default
//! action ending us and leaving git running.

use std::future::Future;
use std::process::ExitCode;

use tokio::signal::unix::{signal, Signal, SignalKind};

/// SIGTERM and SIGINT, to be installed before any git starts.
pub struct Interrupts {
    term: Signal,
    int: Signal,
}

impl Interrupts {
    pub fn install() -> std::io::Result<Interrupts> {
        Ok(Interrupts {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The number of the first signal received.
    pub async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.term.recv() => SignalKind::terminate().as_raw_value(),
            _ = self.int.recv() => SignalKind::interrupt().as_raw_value(),
        }
    }
}

/// Death by signal N is reported as 128+N, like a shell.
pub fn signal_exit_code(signal: i32) -> ExitCode {
    ExitCode::from(128u8.saturating_add(signal as u8))
}

/// A binary's whole run: `work` on a current-thread runtime, until it finishes or SIGTERM/SIGINT
/// arrives. On a signal `work` is dropped — which kills the git process groups it started — then
/// `interrupted` is told the signal, and the exit code is 128+N. `program` names the binary in the
/// one message that cannot go through its log.
pub fn run_until_interrupted(
    program: &str,
    work: impl Future<Output = ExitCode>,
    interrupted: impl FnOnce(i32),
) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let outcome = runtime.and_then(|rt| {
        rt.block_on(async {
            let mut interrupts = Interrupts::install()?;
            Ok(tokio::select! {
                code = work => code,
                signal = interrupts.recv() => {
                    interrupted(signal);
                    signal_exit_code(signal)
                }
            })
        })
    });
    outcome.unwrap_or_else(|e: std::io::Error| {
        eprintln!("{program}: cannot start: {e}");
        ExitCode::from(1)
    })
}
