//! Repository URLs as the agent hands them to us in `BUILDKITE_REPO`.
//!
//! Why our own parser rather than `git-url-parse`: we need three things that crate does not give
//! in one place — refusing the forms git would treat as options or remote helpers (`-…`,
//! `ext::…`), one identity for the https, `git@host:` and `ssh://` spellings of a repository, and
//! credential removal that never echoes the secret. The accepted grammar is small (git's own URL
//! forms), and every branch of it is unit-tested below.

use std::fmt;
use std::path::PathBuf;

/// Why a repository URL was refused. Each message names the fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("the repository URL is empty; set BUILDKITE_REPO to the repository to check out")]
    Empty,
    #[error("the repository URL starts with '-', which git would read as an option; set BUILDKITE_REPO to a URL or path")]
    LeadingDash,
    #[error("the repository URL contains whitespace or control characters; set BUILDKITE_REPO to a plain URL")]
    ControlCharacters,
    #[error("remote helper URLs ('{0}::') are not allowed; use an https, ssh, git or file URL")]
    RemoteHelper(String),
    #[error("URL scheme '{0}' is not supported; use https, http, ssh, git or file")]
    Scheme(String),
    #[error("the repository URL has no host; write it as scheme://host/path")]
    NoHost,
    #[error("the repository path contains a '..' segment; give the repository's canonical URL")]
    DotDot,
}

/// Transport families git accepts for a checkout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Http,
    Ssh,
    Git,
    File,
}

/// A parsed, validated repository URL. The original text is kept private: `Display` shows the
/// redacted form, so formatting a `RepoUrl` into a log line cannot leak a token.
#[derive(Clone, PartialEq, Eq)]
pub struct RepoUrl {
    raw: String,
    transport: Transport,
    /// Lower-cased host, no port, no user. Empty for file URLs and local paths.
    host: String,
    /// `user` or `user:password` for http(s); ssh users are not secrets and stay in `path_form`.
    credentials: Option<String>,
    /// The repository path without leading/trailing slashes.
    path: String,
}

impl RepoUrl {
    pub fn parse(raw: &str) -> Result<Self, UrlError> {
        if raw.is_empty() {
            return Err(UrlError::Empty);
        }
        if raw.starts_with('-') {
            return Err(UrlError::LeadingDash);
        }
        if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(UrlError::ControlCharacters);
        }
        let parsed = if let Some((scheme, rest)) = raw.split_once("://") {
            Self::parse_with_scheme(raw, scheme, rest)?
        } else if let Some(helper) = remote_helper(raw) {
            return Err(UrlError::RemoteHelper(helper.to_string()));
        } else if let Some((authority, path)) = scp_like(raw) {
            let host = authority.rsplit('@').next().unwrap_or(authority);
            RepoUrl {
                raw: raw.to_string(),
                transport: Transport::Ssh,
                host: host.to_ascii_lowercase(),
                credentials: None,
                path: trim_path(path),
            }
        } else {
            RepoUrl {
                raw: raw.to_string(),
                transport: Transport::File,
                host: String::new(),
                credentials: None,
                path: trim_path(raw),
            }
        };
        if parsed.path.split('/').any(|s| s == "..") {
            return Err(UrlError::DotDot);
        }
        Ok(parsed)
    }

    fn parse_with_scheme(raw: &str, scheme: &str, rest: &str) -> Result<Self, UrlError> {
        let scheme_lc = scheme.to_ascii_lowercase();
        if let Some(helper) = remote_helper(raw) {
            return Err(UrlError::RemoteHelper(helper.to_string()));
        }
        let transport = match scheme_lc.as_str() {
            "https" | "http" => Transport::Http,
            "ssh" | "git+ssh" | "ssh+git" => Transport::Ssh,
            "git" => Transport::Git,
            "file" => Transport::File,
            _ => return Err(UrlError::Scheme(scheme.to_string())),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        let host = strip_port(hostport).to_ascii_lowercase();
        if host.is_empty() && transport != Transport::File {
            return Err(UrlError::NoHost);
        }
        let credentials = match transport {
            Transport::Http => userinfo.map(str::to_string),
            _ => None,
        };
        Ok(RepoUrl {
            raw: raw.to_string(),
            transport,
            host,
            credentials,
            path: trim_path(path),
        })
    }

    /// The URL exactly as given, credentials included: only for handing to git.
    pub fn as_git_arg(&self) -> &str {
        &self.raw
    }

    /// The secrets this URL carries (the whole userinfo and its password), for [`Redactor`].
    pub fn secrets(&self) -> Vec<String> {
        let Some(userinfo) = &self.credentials else {
            return Vec::new();
        };
        let mut secrets = vec![userinfo.clone()];
        match userinfo.split_once(':') {
            Some((_, password)) if !password.is_empty() => secrets.push(password.to_string()),
            // `https://TOKEN@host/…` carries the token as the user name.
            _ => {}
        }
        secrets
    }

    /// The URL with http(s) credentials removed: what may be stored or compared.
    pub fn without_credentials(&self) -> String {
        match &self.credentials {
            Some(userinfo) => self.raw.replacen(&format!("{userinfo}@"), "", 1),
            None => self.raw.clone(),
        }
    }

    /// The URL with http(s) credentials replaced by `***`: what may be printed.
    pub fn redacted(&self) -> String {
        match &self.credentials {
            Some(userinfo) => self.raw.replacen(&format!("{userinfo}@"), "***@", 1),
            None => self.raw.clone(),
        }
    }

    /// One key for every spelling of the same repository: host without port or user, path
    /// without `.git`. `https://github.com/org/x.git`, `git@github.com:org/x` and
    /// `ssh://git@github.com:22/org/x.git` share a key.
    pub fn identity(&self) -> String {
        format!("{}/{}", self.host, strip_git_suffix(&self.path))
    }

    /// The repository path segments used to name a mirror, `.git` removed. For hosted URLs
    /// that is the whole path (`group/sub/name`); for file URLs and local paths, whose leading
    /// directories are machine-specific, the last two segments.
    pub fn name_segments(&self) -> Vec<&str> {
        let segments: Vec<&str> = strip_git_suffix(&self.path)
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        match self.transport {
            Transport::File => segments[segments.len().saturating_sub(2)..].to_vec(),
            _ => segments,
        }
    }

    /// `<org>/<name>.reference`, relative to the mirror root, or `None` when a segment is not a
    /// plain name (so a hostile URL can never name a path outside the root).
    pub fn reference_dir(&self) -> Option<PathBuf> {
        let segments = self.name_segments();
        let (last, dirs) = segments.split_last()?;
        if !segments.iter().all(|s| is_plain_segment(s)) {
            return None;
        }
        let mut path: PathBuf = dirs.iter().collect();
        path.push(format!("{last}.reference"));
        Some(path)
    }

    /// The stock agent's mirror directory name: every non-alphanumeric character of the URL
    /// replaced by `-`. Computed from the credential-free URL: a name holding a token would put
    /// the token on the volume and into every log line that names the mirror.
    pub fn stock_dir_name(&self) -> String {
        self.without_credentials()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect()
    }
}

impl fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RepoUrl({})", self.redacted())
    }
}

/// `transport::address` is git's remote-helper syntax (`ext::sh -c …` runs a command).
fn remote_helper(raw: &str) -> Option<&str> {
    let (helper, _) = raw.split_once("::")?;
    let is_word = !helper.is_empty()
        && helper
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    is_word.then_some(helper)
}

/// `[user@]host:path` with no slash before the colon, as git defines scp-like syntax.
fn scp_like(raw: &str) -> Option<(&str, &str)> {
    let colon = raw.find(':')?;
    if raw[..colon].contains('/') || colon == 0 {
        return None;
    }
    Some((&raw[..colon], &raw[colon + 1..]))
}

fn strip_port(hostport: &str) -> &str {
    if let Some(rest) = hostport.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    hostport.split(':').next().unwrap_or(hostport)
}

fn trim_path(path: &str) -> String {
    path.trim_matches('/').to_string()
}

fn strip_git_suffix(path: &str) -> &str {
    path.strip_suffix(".git").unwrap_or(path)
}

fn is_plain_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// Removes secrets from text before it is printed or stored: the known secrets of the job's
/// URLs, and the userinfo of any `scheme://user:pass@host` that git or a server echoes back.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    pub fn new(secrets: Vec<String>) -> Self {
        let mut secrets: Vec<String> = secrets.into_iter().filter(|s| !s.is_empty()).collect();
        // Longest first, so `user:pass` is replaced before `pass` alone.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Redactor { secrets }
    }

    pub fn apply(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in &self.secrets {
            out = out.replace(secret.as_str(), "***");
        }
        redact_userinfo(&out)
    }
}

fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || c == '\'' || c == '"')
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) if !tail[..at].starts_with("***") => {
                out.push_str("***");
                rest = &tail[at..];
            }
            _ => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> RepoUrl {
        RepoUrl::parse(s).unwrap()
    }

    #[test]
    fn the_common_spellings_of_one_repository_share_identity_and_reference_dir() {
        let forms = [
            "https://github.com/acme/widgets.git",
            "https://github.com/acme/widgets",
            "https://x-access-token:t0k3n@GitHub.com/acme/widgets.git",
            "git@github.com:acme/widgets.git",
            "ssh://git@github.com/acme/widgets.git",
            "ssh://git@github.com:22/acme/widgets",
            "git://github.com/acme/widgets.git",
        ];
        for form in forms {
            let u = url(form);
            assert_eq!(u.identity(), "github.com/acme/widgets", "{form}");
            assert_eq!(
                u.reference_dir().unwrap(),
                PathBuf::from("acme/widgets.reference"),
                "{form}"
            );
        }
    }

    #[test]
    fn file_urls_and_local_paths_name_mirrors_by_their_last_two_segments() {
        for form in [
            "file:///srv/git/acme/widgets.git",
            "/srv/git/acme/widgets.git",
        ] {
            let u = url(form);
            assert_eq!(u.transport, Transport::File);
            assert_eq!(
                u.reference_dir().unwrap(),
                PathBuf::from("acme/widgets.reference")
            );
        }
    }

    #[test]
    fn subgroups_keep_their_whole_path() {
        let u = url("https://gitlab.com/group/sub/name.git");
        assert_eq!(
            u.reference_dir().unwrap(),
            PathBuf::from("group/sub/name.reference")
        );
    }

    #[test]
    fn stock_dir_name_replaces_every_non_alphanumeric_and_drops_credentials() {
        assert_eq!(
            url("https://github.com/acme/widgets.git").stock_dir_name(),
            "https---github-com-acme-widgets-git"
        );
        assert_eq!(
            url("https://user:pw@github.com/acme/widgets.git").stock_dir_name(),
            "https---github-com-acme-widgets-git"
        );
        assert_eq!(
            url("git@github.com:acme/widgets.git").stock_dir_name(),
            "git-github-com-acme-widgets-git"
        );
    }

    #[test]
    fn hostile_urls_are_refused_with_the_fix() {
        let cases = [
            ("", UrlError::Empty),
            ("--upload-pack=touch /tmp/pwned", UrlError::LeadingDash),
            ("-oProxyCommand=x", UrlError::LeadingDash),
            ("ext::sh -c touch% /tmp/pwned", UrlError::ControlCharacters),
            ("ext::sh", UrlError::RemoteHelper("ext".into())),
            ("fd::17", UrlError::RemoteHelper("fd".into())),
            ("https://host/acme/../../etc/x.git", UrlError::DotDot),
            ("../../etc/passwd", UrlError::DotDot),
            ("https://h/a\nb", UrlError::ControlCharacters),
            ("gopher://h/a", UrlError::Scheme("gopher".into())),
            ("https:///acme/x", UrlError::NoHost),
        ];
        for (input, want) in cases {
            assert_eq!(RepoUrl::parse(input).unwrap_err(), want, "{input:?}");
        }
        assert!(UrlError::LeadingDash.to_string().contains("BUILDKITE_REPO"));
    }

    #[test]
    fn segments_that_are_not_plain_names_get_no_reference_dir() {
        assert_eq!(url("https://h/acme/we%2Fird.git").reference_dir(), None);
        assert_eq!(url("https://h/acme/-x.git").reference_dir(), None);
        assert_eq!(url("https://h/").reference_dir(), None);
    }

    #[test]
    fn credentials_never_show_in_display_debug_or_stored_forms() {
        let u = url("https://bob:s3cret@example.com/acme/widgets.git");
        for shown in [
            u.to_string(),
            format!("{u:?}"),
            u.redacted(),
            u.without_credentials(),
            u.identity(),
            u.stock_dir_name(),
        ] {
            assert!(!shown.contains("s3cret"), "{shown}");
        }
        assert_eq!(u.redacted(), "https://***@example.com/acme/widgets.git");
        assert_eq!(
            u.as_git_arg(),
            "https://bob:s3cret@example.com/acme/widgets.git"
        );
        let token_as_user = url("https://ghp_abc123@example.com/a/b.git");
        assert_eq!(token_as_user.secrets(), vec!["ghp_abc123".to_string()]);
    }

    #[test]
    fn redactor_removes_known_secrets_and_any_url_userinfo() {
        let u = url("https://bob:s3cret@example.com/a/b.git");
        let r = Redactor::new(u.secrets());
        assert_eq!(
            r.apply("fatal: unable to access 'https://bob:s3cret@example.com/a/b.git/': 500"),
            "fatal: unable to access 'https://***@example.com/a/b.git/': 500"
        );
        assert_eq!(r.apply("password s3cret echoed"), "password *** echoed");
        assert_eq!(
            Redactor::default().apply("see http://u:p@h/x and http://h/y"),
            "see http://***@h/x and http://h/y"
        );
    }
}
