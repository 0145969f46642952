//! Why no token could be had. Each message is one line naming the cause and the fix; none holds
//! the key, the JWT or a token.

use std::path::PathBuf;

/// What GitHub answered when it gave no token, and to whom.
#[derive(Debug)]
pub struct Refusal {
    pub app_id: String,
    pub installation_id: u64,
    /// The API's base URL, redacted.
    pub api: String,
    pub status: u16,
    /// GitHub's `message`, on one line.
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("cannot read {what} {}: {source}; mount the github-app Secret there (docs/credentials.md)", path.display())]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the App's private key {} is not usable ({why}); use the .pem file GitHub generated for the App", path.display())]
    KeyInvalid { path: PathBuf, why: String },
    #[error("App {app_id} has no private key; put private-key.pem in the github-app Secret, or set GITHUB_APP_PRIVATE_KEY_FILE")]
    NoKey { app_id: String },
    #[error("App {app_id} has no installation ID; put the App's installation on the repository's owner in the github-app Secret (installation-id), or set GITHUB_APP_INSTALLATION_ID")]
    NoInstallation { app_id: String },
    #[error("the installation ID {0:?} is not a number; it is the number that ends the installation's settings URL")]
    BadInstallation(String),
    #[error("the GitHub API URL {0} is not https://…; the App's JWT must not cross a network in clear (GITHUB_APP_API_URL, e.g. https://github.example.com/api/v3)")]
    ApiUrl(String),
    #[error("could not sign the App's JWT ({0}); the system's random source failed")]
    Sign(String),
    #[error("GitHub knows no App {} ({} {}); set the App ID to the client ID or App ID on the App's settings page (app-id in the github-app Secret, or GITHUB_APP_ID)", .0.app_id, .0.status, .0.message)]
    UnknownApp(Refusal),
    #[error("GitHub refused App {}'s JWT ({} {}); the private key must be one of that App's keys (its settings page lists them) and the clock must be right", .0.app_id, .0.status, .0.message)]
    KeyRefused(Refusal),
    #[error("installation {} of App {} was not found ({} {}); set the installation ID to the App's installation on the repository's owner (installation-id in the github-app Secret, or GITHUB_APP_INSTALLATION_ID)", .0.installation_id, .0.app_id, .0.status, .0.message)]
    InstallationNotFound(Refusal),
    #[error("installation {} of App {} cannot have a token for {} with contents: read ({} {}); install the App on that repository with the Contents: read permission", .refusal.installation_id, .refusal.app_id, repository.as_deref().map_or("its repositories".to_string(), |r| format!("repository {r}")), .refusal.status, .refusal.message)]
    NotGranted {
        refusal: Refusal,
        repository: Option<String>,
    },
    // "unable to access" is git's own wording for a transport failure: the checkout hook and
    // populate-mirror read it as the network's and retry (stateless_core::failure_kind).
    #[error("unable to access the GitHub API at {api}: {reason}; check the API URL (GITHUB_APP_API_URL) and the network")]
    Unreachable { api: String, reason: String },
    #[error("unable to access the GitHub API at {} for now ({} {}); it is worth another try later", .0.api, .0.status, .0.message)]
    Unavailable(Refusal),
    #[error("the GitHub API at {} answered {} ({}) for installation {} of App {}", .0.api, .0.status, .0.message, .0.installation_id, .0.app_id)]
    Unexpected(Refusal),
}
