//! The `BUILDKITE_GIT_*_FLAGS` settings: split like a shell (quotes honoured, nothing expanded,
//! as the agent does), and `git clone`'s flags mapped onto the fast path where it can express
//! them.
//!
//! Why `shell-words`: it is the small, maintained crate that splits exactly like the agent's
//! shellwords (POSIX quoting, no expansion); hand-splitting on spaces would break `-c
//! "user.name=A B"`.

/// A flag setting that is not valid shell quoting.
#[derive(Debug, thiserror::Error)]
#[error("{name} is not valid shell quoting ({detail}); fix the quotes in its value")]
pub struct FlagsError {
    name: &'static str,
    detail: String,
}

/// Splits a flags setting into words.
pub fn split(name: &'static str, value: &str) -> Result<Vec<String>, FlagsError> {
    shell_words::split(value).map_err(|e| FlagsError {
        name,
        detail: e.to_string(),
    })
}

/// What `BUILDKITE_GIT_CLONE_FLAGS` asks of the checkout.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CloneFlags {
    /// Extra arguments for every fetch (`--filter=blob:none`, `--depth=1` with
    /// `--no-single-branch`, …).
    pub fetch_args: Vec<String>,
    /// `-c key=value` / `--config key=value`: set in the new repository, as clone does.
    pub config: Vec<(String, String)>,
    /// `--filter`: the repository becomes a partial clone of origin.
    pub filter: Option<String>,
    /// `--no-tags`: fetch no tags.
    pub no_tags: bool,
    /// The first flag the fast path cannot express: the hook then runs a real `git clone` with
    /// all the words.
    pub unmapped: Option<String>,
    /// The words as given, for that real clone.
    pub words: Vec<String>,
}

/// Flags that only change how much clone prints: our output is decided elsewhere.
const OUTPUT_FLAGS: &[&str] = &[
    "-v",
    "--verbose",
    "-q",
    "--quiet",
    "--progress",
    "--no-progress",
    "--no-single-branch",
];

// `--single-branch` is not mapped on purpose: clone then takes the *remote's default* branch,
// which the fast path cannot know before fetching.

/// Flags that limit history; each takes a value (`--depth 1` or `--depth=1`), passed on to fetch.
const SHALLOW_FLAGS: &[&str] = &["--depth", "--shallow-since", "--shallow-exclude"];

impl CloneFlags {
    pub fn parse(words: Vec<String>) -> CloneFlags {
        let mut flags = CloneFlags::default();
        let mut rest = words.iter();
        while let Some(word) = rest.next() {
            let (name, inline) = match word.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
                _ => (word.as_str(), None),
            };
            let mut value = || inline.clone().or_else(|| rest.next().cloned());
            match name {
                n if OUTPUT_FLAGS.contains(&n) => {}
                "--no-tags" => flags.no_tags = true,
                n if SHALLOW_FLAGS.contains(&n) => match value() {
                    Some(v) => flags.fetch_args.push(format!("{n}={v}")),
                    None => drop(flags.unmapped.get_or_insert(word.clone())),
                },
                "--filter" => match value() {
                    Some(v) => {
                        flags.fetch_args.push(format!("--filter={v}"));
                        flags.filter = Some(v);
                    }
                    None => drop(flags.unmapped.get_or_insert(word.clone())),
                },
                "-c" | "--config" => match value().and_then(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                }) {
                    Some(kv) => flags.config.push(kv),
                    None => drop(flags.unmapped.get_or_insert(word.clone())),
                },
                _ => {
                    flags.unmapped.get_or_insert(word.clone());
                }
            }
        }
        // Like clone, a history limit implies --single-branch unless told otherwise.
        let shallow = flags
            .fetch_args
            .iter()
            .find(|a| !a.starts_with("--filter="));
        if let (Some(flag), false) = (shallow, words.iter().any(|w| w == "--no-single-branch")) {
            let name = flag.split('=').next().unwrap_or(flag).to_string();
            flags.unmapped.get_or_insert(name);
        }
        flags.words = words;
        flags
    }

    /// A partial clone with `filter` unless the user chose a filter of their own, as the agent's
    /// sparse clone adds `--sparse --filter=blob:none`.
    pub fn ensure_filter(&mut self, filter: &str) {
        if self.filter.is_some() {
            return;
        }
        self.filter = Some(filter.to_string());
        self.fetch_args.push(format!("--filter={filter}"));
        self.words
            .extend(["--sparse".to_string(), format!("--filter={filter}")]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> CloneFlags {
        CloneFlags::parse(split("X", s).unwrap())
    }

    #[test]
    fn the_agent_default_maps_to_nothing() {
        let f = parse("-v");
        assert_eq!(f.unmapped, None);
        assert!(f.fetch_args.is_empty() && f.config.is_empty());
    }

    #[test]
    fn history_limits_filters_and_config_map_onto_fetch() {
        let f = parse("-v --no-single-branch --depth 1 --filter=blob:none -c 'user.name=A B' --config=x.y=z --no-tags");
        assert_eq!(f.fetch_args, ["--depth=1", "--filter=blob:none"]);
        assert_eq!(f.filter.as_deref(), Some("blob:none"));
        assert_eq!(
            f.config,
            [
                ("user.name".into(), "A B".into()),
                ("x.y".into(), "z".into())
            ]
        );
        assert!(f.no_tags);
        assert_eq!(f.unmapped, None);
    }

    #[test]
    fn anything_else_asks_for_a_real_clone() {
        assert_eq!(
            parse("-v --recurse-submodules").unmapped.as_deref(),
            Some("--recurse-submodules")
        );
        assert_eq!(parse("--depth").unmapped.as_deref(), Some("--depth"));
        assert_eq!(
            parse("--single-branch").unmapped.as_deref(),
            Some("--single-branch")
        );
        assert_eq!(parse("--depth=1").unmapped.as_deref(), Some("--depth"));
        assert_eq!(parse("-c novalue").unmapped.as_deref(), Some("-c"));
    }

    #[test]
    fn bad_quoting_names_the_setting() {
        let err = split("BUILDKITE_GIT_FETCH_FLAGS", "-c 'x").unwrap_err();
        assert!(err.to_string().starts_with("BUILDKITE_GIT_FETCH_FLAGS"));
    }
}
