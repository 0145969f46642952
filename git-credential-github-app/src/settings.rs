//! Which App, and where its key is: flags or environment variables, or the files of a mounted
//! Kubernetes Secret (what the manifests use: a pod without the Secret has none of them, and the
//! helper then answers nothing).

use std::path::{Path, PathBuf};

use clap::Parser;
use stateless_core::repo_url::Redactor;

use crate::error::HelperError;
use crate::jwt::AppKey;

/// Answers git's credential requests with a GitHub App installation token.
///
/// Register it for the host in git's configuration, e.g.
/// `credential.https://github.com.helper=github-app --secret-dir /etc/stateless-agent/github-app`
/// and `credential.https://github.com.useHttpPath=true` (so each token is narrowed to the
/// repository git fetches). git runs it as `git-credential-github-app [OPTIONS] get`; each token
/// has `contents: read` and lives only in memory and in git's pipe.
#[derive(Parser)]
#[command(name = "git-credential-github-app", version)]
pub struct Settings {
    /// The App's client ID or App ID (its settings page shows both): the JWT's issuer.
    #[arg(long, env = "GITHUB_APP_ID")]
    pub app_id: Option<String>,

    /// The ID of the App's installation on the repositories' owner.
    #[arg(long, env = "GITHUB_APP_INSTALLATION_ID")]
    pub installation_id: Option<String>,

    /// The App's private key (PEM), as GitHub generated it.
    #[arg(long, env = "GITHUB_APP_PRIVATE_KEY_FILE")]
    pub private_key_file: Option<PathBuf>,

    /// A directory holding `app-id`, `installation-id` and `private-key.pem` (the github-app
    /// Secret, mounted): it supplies whichever of the three is not given above.
    #[arg(long, env = "GITHUB_APP_SECRET_DIR")]
    pub secret_dir: Option<PathBuf>,

    /// The REST API: GitHub Enterprise Server's is `https://HOSTNAME/api/v3`.
    #[arg(long, env = "GITHUB_APP_API_URL", default_value = DEFAULT_API_URL)]
    pub api_url: String,

    /// git's operation: `get` is answered; `store` and `erase` have nothing to do, since no
    /// token is kept.
    pub operation: String,
}

pub const DEFAULT_API_URL: &str = "https://api.github.com";

/// The files of the github-app Secret.
const APP_ID_FILE: &str = "app-id";
const INSTALLATION_ID_FILE: &str = "installation-id";
const PRIVATE_KEY_FILE: &str = "private-key.pem";

/// A configured App. No `Debug`: nothing should print the key.
pub struct App {
    pub id: String,
    pub installation_id: u64,
    pub key: AppKey,
    /// The API's base URL, without a trailing slash.
    pub api_url: String,
}

impl Settings {
    /// The App, or `None` when no App ID is given, directly or in the Secret's directory (the
    /// Secret was not created): git then asks its next helper.
    pub fn app(&self) -> Result<Option<App>, HelperError> {
        let Some(id) = self.value(&self.app_id, APP_ID_FILE)? else {
            return Ok(None);
        };
        let installation = self
            .value(&self.installation_id, INSTALLATION_ID_FILE)?
            .ok_or_else(|| HelperError::NoInstallation { app_id: id.clone() })?;
        let installation_id = installation
            .parse()
            .map_err(|_| HelperError::BadInstallation(installation))?;
        let key_path = self
            .private_key_file
            .clone()
            .or_else(|| self.secret_dir.as_ref().map(|d| d.join(PRIVATE_KEY_FILE)))
            .ok_or_else(|| HelperError::NoKey { app_id: id.clone() })?;
        Ok(Some(App {
            key: AppKey::read(&key_path)?,
            api_url: api_url(&self.api_url)?,
            installation_id,
            id,
        }))
    }

    /// A value given directly, else the Secret directory's file; trimmed (`--from-file` keeps
    /// a newline), and none when empty or absent.
    fn value(&self, given: &Option<String>, file: &str) -> Result<Option<String>, HelperError> {
        let text = match (given, &self.secret_dir) {
            (Some(value), _) => value.clone(),
            (None, Some(dir)) => match read_optional(&dir.join(file))? {
                Some(text) => text,
                None => return Ok(None),
            },
            (None, None) => return Ok(None),
        };
        let text = text.trim();
        Ok((!text.is_empty()).then(|| text.to_string()))
    }
}

/// A Secret's file: absent is fine (the Secret is optional), unreadable is not.
fn read_optional(path: &Path) -> Result<Option<String>, HelperError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(HelperError::Unreadable {
            what: "the github-app Secret's",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The API's base URL: https only, since the JWT authorizes minting tokens.
fn api_url(raw: &str) -> Result<String, HelperError> {
    let url = raw.trim().trim_end_matches('/');
    match url.strip_prefix("https://") {
        Some(rest) if !rest.is_empty() => Ok(url.to_string()),
        _ => Err(HelperError::ApiUrl(Redactor::default().apply(raw))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(args: &[&str]) -> Settings {
        let mut argv = vec!["git-credential-github-app"];
        argv.extend_from_slice(args);
        argv.push("get");
        Settings::try_parse_from(argv).unwrap()
    }

    fn error(result: Result<Option<App>, HelperError>) -> String {
        match result {
            Err(e) => e.to_string(),
            Ok(_) => panic!("expected an error"),
        }
    }

    #[test]
    fn without_an_app_id_nothing_is_configured() {
        let empty = tempfile::tempdir().unwrap();
        let dir = empty.path().to_str().unwrap();
        assert!(settings(&[]).app().unwrap().is_none());
        assert!(settings(&["--secret-dir", dir]).app().unwrap().is_none());
        let absent = format!("{dir}/not-mounted");
        assert!(settings(&["--secret-dir", &absent])
            .app()
            .unwrap()
            .is_none());
    }

    #[test]
    fn an_app_id_without_the_rest_names_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app-id"), "123\n").unwrap();
        let secret = dir.path().to_str().unwrap();
        let no_installation = error(settings(&["--secret-dir", secret]).app());
        assert!(
            no_installation.contains("App 123 has no installation ID"),
            "{no_installation}"
        );
        std::fs::write(dir.path().join("installation-id"), "fourty-two").unwrap();
        let bad = error(settings(&["--secret-dir", secret]).app());
        assert!(bad.contains("\"fourty-two\" is not a number"), "{bad}");
        std::fs::write(dir.path().join("installation-id"), "42").unwrap();
        let no_key = error(settings(&["--secret-dir", secret]).app());
        assert!(
            no_key.contains("cannot read the App's private key"),
            "{no_key}"
        );
        assert!(no_key.contains("private-key.pem"), "{no_key}");
        std::fs::write(dir.path().join("private-key.pem"), "not a key").unwrap();
        let invalid = error(settings(&["--secret-dir", secret]).app());
        assert!(invalid.contains("is not usable"), "{invalid}");
        let direct = error(settings(&["--app-id", "Iv1.abc", "--installation-id", "7"]).app());
        assert!(
            direct.contains("App Iv1.abc has no private key"),
            "{direct}"
        );
    }

    #[test]
    fn the_api_must_be_https_and_its_credentials_never_shown() {
        assert_eq!(
            api_url("https://github.example.com/api/v3/").unwrap(),
            "https://github.example.com/api/v3"
        );
        let refused = api_url("http://user:s3cret@github.example.com/api/v3")
            .unwrap_err()
            .to_string();
        assert!(refused.contains("is not https://"), "{refused}");
        assert!(!refused.contains("s3cret"), "{refused}");
        assert!(api_url("https://").is_err());
    }
}
