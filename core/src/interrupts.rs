//! SIGTERM and SIGINT for our binaries, which run git in process groups of its own: caught from
//! the start, so that dropping the work in progress kills those groups, instead of the default
//! action ending us and leaving git running.

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
