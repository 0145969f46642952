//! `git-credential-github-app`: a git credential helper that answers `get` with a GitHub App
//! installation token, minted for each request.
//!
//! Why a credential helper rather than a token minted once per pod and put in the environment or
//! a file: git asks a helper only when a server wants credentials, so the token exists only in
//! this process's memory and in git's pipe, for one git command, and every git that reads the
//! configuration asks it (the checkout hook's, populate-mirror's, the agent's own for plugins,
//! the job's). The cost is one API request for each git command that authenticates.
//!
//! The protocol is git's (`gitcredentials(7)`, `git-credential(1)`); the API is GitHub's
//! ("Generating a JSON Web Token (JWT) for a GitHub App", "Generating an installation access
//! token for a GitHub App"). docs/credentials.md says how it is deployed.

pub mod credential;
pub mod error;
pub mod jwt;
pub mod settings;
pub mod token;

use crate::credential::Request;
use crate::error::HelperError;
use crate::settings::Settings;

/// What the helper has for git's `get`.
pub enum Answer {
    /// An installation token, for `x-access-token`.
    Token(String),
    /// No App is configured (its Secret was not created): git asks its next helper.
    NotConfigured,
    /// Not an https request: a token is never sent in clear.
    NotHttps,
}

/// Answers git's `get`: a token for the request's repository (narrowed to it when git passes
/// the path, `credential.useHttpPath`) with `contents: read`.
pub async fn get(settings: &Settings, request: &Request) -> Result<Answer, HelperError> {
    if request.protocol != "https" {
        return Ok(Answer::NotHttps);
    }
    let Some(app) = settings.app()? else {
        return Ok(Answer::NotConfigured);
    };
    let token = token::mint(&app, request.repository(), token::now()).await?;
    Ok(Answer::Token(token))
}
