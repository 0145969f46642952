//! git's credential-helper protocol (`git-credential(1)`, "INPUT/OUTPUT FORMAT"): git writes
//! `key=value` lines, ended by a blank line or the end of input; a helper answering `get` prints
//! the fields it fills, and `quit=1` to stop git from asking anyone else.

/// The parts of git's request the helper reads.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Request {
    pub protocol: String,
    pub host: String,
    /// The repository's path on the host (`acme/widgets.git`), sent only with
    /// `credential.useHttpPath`.
    pub path: Option<String>,
}

impl Request {
    pub fn parse(input: &str) -> Request {
        let mut request = Request::default();
        for line in input.lines() {
            if line.is_empty() {
                break;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            match key {
                "protocol" => request.protocol = value.to_string(),
                "host" => request.host = value.to_string(),
                "path" => request.path = Some(value.to_string()),
                _ => {}
            }
        }
        request
    }

    /// The repository's name under its owner (`widgets` for `acme/widgets.git`, and for
    /// git-lfs's `acme/widgets.git/info/lfs`): what an installation token is narrowed to.
    pub fn repository(&self) -> Option<&str> {
        let mut segments = self.path.as_deref()?.trim_start_matches('/').split('/');
        segments.next().filter(|owner| !owner.is_empty())?;
        let name = segments.next()?;
        let name = name.strip_suffix(".git").unwrap_or(name);
        (!name.is_empty()).then_some(name)
    }
}

/// The answer to `get`: GitHub takes an installation token as the password of `x-access-token`.
pub fn token_answer(token: &str) -> String {
    format!("username=x-access-token\npassword={token}\n")
}

/// Tells git to stop: no other helper, no prompt. git then fails with the helper's message
/// just above its own.
pub const QUIT: &str = "quit=1\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_read_up_to_its_blank_line() {
        let request = Request::parse(
            "protocol=https\nhost=github.com\npath=acme/widgets.git\nwwwauth[]=Basic\n\nhost=other\n",
        );
        assert_eq!(
            request,
            Request {
                protocol: "https".into(),
                host: "github.com".into(),
                path: Some("acme/widgets.git".into()),
            }
        );
        assert_eq!(request.repository(), Some("widgets"));
    }

    #[test]
    fn the_repository_is_the_second_segment_of_the_path_when_there_is_one() {
        let named = |path: &str| {
            Request {
                path: Some(path.into()),
                ..Default::default()
            }
            .repository()
            .map(String::from)
        };
        assert_eq!(named("acme/widgets").as_deref(), Some("widgets"));
        assert_eq!(
            named("acme/widgets.git/info/lfs").as_deref(),
            Some("widgets")
        );
        assert_eq!(named("/acme/widgets.git").as_deref(), Some("widgets"));
        assert_eq!(named("acme"), None);
        assert_eq!(named("acme/.git"), None);
        assert_eq!(Request::default().repository(), None);
    }

    #[test]
    fn the_answer_names_githubs_user_for_installation_tokens() {
        assert_eq!(
            token_answer("ghs_abc"),
            "username=x-access-token\npassword=ghs_abc\n"
        );
    }
}
