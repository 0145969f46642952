//! Minting an installation access token, as GitHub's "Generating an installation access token
//! for a GitHub App" describes: `POST {api}/app/installations/{id}/access_tokens` with the App's
//! JWT as a bearer token, narrowed by `repositories` and `permissions`. GitHub answers 201 with
//! `token` (valid for an hour); the refusals are told apart by status and message.

use std::time::Duration;

use serde_json::json;
use stateless_core::repo_url::Redactor;

use crate::error::{HelperError, Refusal};
use crate::settings::App;

/// The REST API version the request is written for.
const API_VERSION: &str = "2022-11-28";

/// GitHub's message when the JWT's issuer is no App it knows.
const UNKNOWN_APP: &str = "Integration not found";

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A token of `app`'s installation with `contents: read`, for `repository` alone when named.
pub async fn mint(app: &App, repository: Option<&str>, now: u64) -> Result<String, HelperError> {
    let api = Redactor::default().apply(&app.api_url);
    let unreachable = |e: reqwest::Error| HelperError::Unreachable {
        api: api.clone(),
        reason: describe(&e),
    };
    // reqwest is built without a default provider: ring, the workspace's.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .user_agent(concat!(
            "git-credential-github-app/",
            env!("CARGO_PKG_VERSION")
        ))
        .build()
        .map_err(unreachable)?;
    let url = format!(
        "{}/app/installations/{}/access_tokens",
        app.api_url, app.installation_id
    );
    let response = client
        .post(url)
        .header("Accept", "application/vnd.github+json")
        .header("X-GitHub-Api-Version", API_VERSION)
        .header(
            "Authorization",
            format!("Bearer {}", app.key.jwt(&app.id, now)?),
        )
        .header("Content-Type", "application/json")
        .body(request_body(repository).to_string())
        .send()
        .await
        .map_err(unreachable)?;
    let status = response.status().as_u16();
    let body = response.text().await.map_err(unreachable)?;
    let refusal = Refusal {
        app_id: app.id.clone(),
        installation_id: app.installation_id,
        api,
        status,
        message: message(&body),
    };
    answer(refusal, repository, &body)
}

/// What to ask for: only reading contents, of one repository when git named it.
fn request_body(repository: Option<&str>) -> serde_json::Value {
    let mut body = json!({"permissions": {"contents": "read"}});
    if let Some(name) = repository {
        body["repositories"] = json!([name]);
    }
    body
}

/// The token in a 201, or the refusal by its cause.
fn answer(refusal: Refusal, repository: Option<&str>, body: &str) -> Result<String, HelperError> {
    match refusal.status {
        201 => match serde_json::from_str::<Created>(body) {
            // Printed into git's line protocol: anything but a plain word would break it.
            Ok(created) if is_plain_token(&created.token) => Ok(created.token),
            _ => Err(HelperError::Unexpected(Refusal {
                message: "no token in the answer".into(),
                ..refusal
            })),
        },
        _ if refusal.message.contains(UNKNOWN_APP) => Err(HelperError::UnknownApp(refusal)),
        401 => Err(HelperError::KeyRefused(refusal)),
        404 => Err(HelperError::InstallationNotFound(refusal)),
        422 => Err(HelperError::NotGranted {
            refusal,
            repository: repository.map(String::from),
        }),
        // GitHub answers a rate limit with 403 or 429.
        403 if refusal.message.to_ascii_lowercase().contains("rate limit") => {
            Err(HelperError::Unavailable(refusal))
        }
        429 | 500..=599 => Err(HelperError::Unavailable(refusal)),
        _ => Err(HelperError::Unexpected(refusal)),
    }
}

#[derive(serde::Deserialize)]
struct Created {
    token: String,
}

#[derive(serde::Deserialize)]
struct ApiError {
    message: String,
}

fn is_plain_token(token: &str) -> bool {
    !token.is_empty() && token.chars().all(|c| c.is_ascii_graphic())
}

/// GitHub's `message`, made one short line (it reaches a log).
fn message(body: &str) -> String {
    let text = serde_json::from_str::<ApiError>(body).map_or_else(|_| String::new(), |e| e.message);
    let line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    line.trim().to_string()
}

/// reqwest's error and its causes, without the URL (the message names the API already).
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text
            .replace(&format!(" ({url})"), "")
            .replace(url.as_str(), "")
            .replace("request for url", "request");
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    Redactor::default().apply(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(status: u16, message: &str) -> Refusal {
        Refusal {
            app_id: "123".into(),
            installation_id: 42,
            api: "https://api.github.com".into(),
            status,
            message: message.into(),
        }
    }

    fn refused(status: u16, message: &str, repository: Option<&str>) -> String {
        answer(refusal(status, message), repository, "")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_request_asks_for_reading_contents_of_the_one_repository() {
        assert_eq!(
            request_body(Some("widgets")),
            json!({"permissions": {"contents": "read"}, "repositories": ["widgets"]})
        );
        assert_eq!(
            request_body(None),
            json!({"permissions": {"contents": "read"}})
        );
    }

    #[test]
    fn a_created_token_is_the_answer() {
        let body = r#"{"token":"ghs_16C7e42F292c6912E7710c838347Ae178B4a","expires_at":"2016-07-11T22:14:10Z"}"#;
        assert_eq!(
            answer(refusal(201, ""), None, body).unwrap(),
            "ghs_16C7e42F292c6912E7710c838347Ae178B4a"
        );
        let injected = r#"{"token":"ghs_x\nusername=evil"}"#;
        assert!(answer(refusal(201, ""), None, injected).is_err());
    }

    #[test]
    fn each_refusal_names_its_cause_and_its_fix() {
        let unknown = refused(401, "Integration not found", None);
        assert!(unknown.starts_with("GitHub knows no App 123"), "{unknown}");
        let key = refused(401, "A JSON web token could not be decoded", None);
        assert!(key.contains("refused App 123's JWT"), "{key}");
        assert!(key.contains("one of that App's keys"), "{key}");
        let installation = refused(404, "Not Found", Some("widgets"));
        assert!(
            installation.starts_with("installation 42 of App 123 was not found (404 Not Found)"),
            "{installation}"
        );
        let granted = refused(422, "There is at least one repository that does not exist or is not accessible to the parent installation.", Some("widgets"));
        assert!(granted.contains("for repository widgets"), "{granted}");
        let down = refused(503, "", None);
        assert!(
            down.starts_with("unable to access the GitHub API"),
            "{down}"
        );
        let limited = refused(403, "API rate limit exceeded for installation ID 42.", None);
        assert!(
            limited.starts_with("unable to access the GitHub API"),
            "{limited}"
        );
        for message in [unknown, key, installation, granted, down, limited] {
            assert!(!message.contains('\n'), "{message}");
        }
    }

    #[test]
    fn githubs_message_is_kept_to_one_short_line() {
        assert_eq!(
            message(r#"{"message":"Bad\ncredentials"}"#),
            "Bad credentials"
        );
        assert_eq!(message("<html>"), "");
        assert_eq!(
            message(&format!(r#"{{"message":"{}"}}"#, "x".repeat(500))).len(),
            200
        );
    }
}
