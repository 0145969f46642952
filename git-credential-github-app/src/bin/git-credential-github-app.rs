//! git's credential helper for a GitHub App. See `git-credential-github-app --help` and
//! docs/credentials.md.

use std::io::{Read, Write};
use std::process::ExitCode;

use clap::Parser;
use git_credential_github_app::credential::{token_answer, Request, QUIT};
use git_credential_github_app::error::HelperError;
use git_credential_github_app::settings::Settings;
use git_credential_github_app::Answer;

const NAME: &str = "git-credential-github-app";

fn main() -> ExitCode {
    let settings = match Settings::try_parse() {
        Ok(settings) => settings,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return quit(CONFIGURATION);
        }
        // --help or --version.
        Err(e) => e.exit(),
    };
    // git writes its request whatever the operation; read it all so git never writes into a
    // closed pipe.
    let mut input = String::new();
    let _ = std::io::stdin().read_to_string(&mut input);
    if settings.operation != "get" {
        return ExitCode::SUCCESS;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a single-threaded runtime starts");
    let answer = runtime.block_on(git_credential_github_app::get(
        &settings,
        &Request::parse(&input),
    ));
    match answer {
        Ok(Answer::Token(token)) => {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(token_answer(&token).as_bytes());
            ExitCode::SUCCESS
        }
        Ok(Answer::NotConfigured) => {
            eprintln!("{NAME}: no GitHub App is configured (no App ID), so no token; create the github-app Secret (docs/credentials.md)");
            ExitCode::SUCCESS
        }
        Ok(Answer::NotHttps) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{NAME}: {e}");
            quit(exit_code(&e))
        }
    }
}

/// Settings to fix where the helper runs; anything else is GitHub's answer or the network.
const CONFIGURATION: u8 = 2;
const REFUSED: u8 = 1;

/// The one place errors become exit codes.
fn exit_code(error: &HelperError) -> u8 {
    match error {
        HelperError::Unreadable { .. }
        | HelperError::KeyInvalid { .. }
        | HelperError::NoKey { .. }
        | HelperError::NoInstallation { .. }
        | HelperError::BadInstallation(_)
        | HelperError::ApiUrl(_)
        | HelperError::Sign(_) => CONFIGURATION,
        HelperError::UnknownApp(_)
        | HelperError::KeyRefused(_)
        | HelperError::InstallationNotFound(_)
        | HelperError::NotGranted { .. }
        | HelperError::Unreachable { .. }
        | HelperError::Unavailable(_)
        | HelperError::Unexpected(_) => REFUSED,
    }
}

/// Stops git asking anyone else (another helper, a prompt), so it fails right after the
/// message above, and exits `code`.
fn quit(code: u8) -> ExitCode {
    let _ = std::io::stdout().write_all(QUIT.as_bytes());
    ExitCode::from(code)
}
