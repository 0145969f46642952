//! The stand-in agent's configuration, and the environment it gives a job, built the way
//! buildkite-agent **v3.137.0** builds them (the version the image's `3` tag floats to), for the
//! settings that reach a checkout:
//!
//! - Where the configuration file is (`cliconfig/loader.go` `Load`): `--config` or
//!   `BUILDKITE_AGENT_CONFIG`, which must exist, else the first that exists of
//!   `defaultConfigFilePaths` (`clicommand/agent_start.go:355-388`): `buildkite-agent.cfg`
//!   beside the binary, `$HOME/.buildkite-agent/`, `/usr/local/etc/buildkite-agent/`,
//!   `/etc/buildkite-agent/`.
//! - How it is read (`cliconfig/file.go` `parseLine`): `key=value` or `key: value`, an optional
//!   `export`, `#` comments outside quotes, one pair of surrounding quotes removed.
//! - Which value wins (`cliconfig/loader.go` `setFieldValueFromCLI`, `cliValueIsSet`): a flag,
//!   or its environment variable when that is **non-empty**, over the file, over the flag's
//!   default (`clicommand/global.go:177-341`, `clicommand/agent_start.go:391-810`). A file's
//!   boolean it cannot parse is false; a list is split on commas.
//! - The job's environment (`agent/job_runner.go` `createEnvironment`): the backend's job
//!   environment, then the agent's settings written over it with `setEnv`, or with
//!   `setCheckoutEnv`, which keeps a value the job already has unless the checkout-override
//!   mode locks the variable (`env/protected.go` `IsCheckoutLockedForJobEnv`): `from-job` (the
//!   default) locks every checkout variable but the sparse ones, `strict` locks all, `none`
//!   none; `no-command-eval` forces `strict` (`resolveCheckoutOverrideMode`). Every setting is
//!   written, set or not, so an agent without `git-mirrors-path` gives every job
//!   `BUILDKITE_GIT_MIRRORS_PATH=""`. The bootstrap then runs with the agent's own environment
//!   overlaid by that map (`processEnv := append(os.Environ(), env...)`, l.347).
//!
//! Not modelled: settings that do not reach a checkout (tracing, signing, artifacts, plugins
//! beyond their path), `BUILDKITE_ENV_FILE`, server-specified request headers, experiments.
//! The backend's job environment (`BUILDKITE_REPO`, `BUILDKITE_COMMIT`, pipeline `env:`) comes
//! from the JSON object in the file `BUILDKITE_STANDIN_JOB_ENV` names, for tests of precedence;
//! tests may also set those variables in the agent's own environment, which the real agent
//! passes on too, below its own settings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How a setting is typed, which decides how the file's text and the environment are read.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Text,
    Bool,
    Int,
    /// Comma-separated.
    List,
}

/// One `buildkite-agent start` setting: its flag name, environment variables, type, default.
struct Setting {
    name: &'static str,
    env: &'static [&'static str],
    kind: Kind,
    default: &'static str,
}

const fn setting(
    name: &'static str,
    env: &'static [&'static str],
    kind: Kind,
    default: &'static str,
) -> Setting {
    Setting {
        name,
        env,
        kind,
        default,
    }
}

use Kind::{Bool, Int, List, Text};

/// The settings modelled, with v3.137.0's flag names, variables and defaults (4.x's cancel
/// timing from main 5c219808).
#[rustfmt::skip]
const SETTINGS: &[Setting] = &[
    setting("endpoint", &["BUILDKITE_AGENT_ENDPOINT"], Text, "https://agent.buildkite.com/v3"),
    setting("tags", &["BUILDKITE_AGENT_TAGS"], List, ""),
    setting("build-path", &["BUILDKITE_BUILD_PATH"], Text, ""),
    setting("hooks-path", &["BUILDKITE_HOOKS_PATH"], Text, ""),
    setting("additional-hooks-paths", &["BUILDKITE_ADDITIONAL_HOOKS_PATHS"], List, ""),
    setting("plugins-path", &["BUILDKITE_PLUGINS_PATH"], Text, ""),
    setting("git-mirrors-path", &["BUILDKITE_GIT_MIRRORS_PATH"], Text, ""),
    setting("git-mirrors-skip-update", &["BUILDKITE_GIT_MIRRORS_SKIP_UPDATE"], Bool, "false"),
    setting("git-mirrors-lock-timeout", &["BUILDKITE_GIT_MIRRORS_LOCK_TIMEOUT"], Int, "300"),
    setting("git-mirror-checkout-mode", &["BUILDKITE_GIT_MIRROR_CHECKOUT_MODE"], Text, "reference"),
    setting("git-clone-flags", &["BUILDKITE_GIT_CLONE_FLAGS"], Text, "-v"),
    setting("git-clone-mirror-flags", &["BUILDKITE_GIT_CLONE_MIRROR_FLAGS"], Text, "-v"),
    setting("git-fetch-flags", &["BUILDKITE_GIT_FETCH_FLAGS"], Text, "-v --prune"),
    setting("git-checkout-flags", &["BUILDKITE_GIT_CHECKOUT_FLAGS"], Text, "-f"),
    setting("git-clean-flags", &["BUILDKITE_GIT_CLEAN_FLAGS"], Text, "-ffxdq"),
    setting("git-submodule-clone-config", &["BUILDKITE_GIT_SUBMODULE_CLONE_CONFIG"], List, ""),
    setting("git-sparse-checkout-paths", &["BUILDKITE_GIT_SPARSE_CHECKOUT_PATHS"], List, ""),
    setting("git-sparse-checkout-mode", &["BUILDKITE_GIT_SPARSE_CHECKOUT_MODE"], Text, "cone"),
    setting("git-commit-verification", &["BUILDKITE_GIT_COMMIT_VERIFICATION"], Text, ""),
    setting("git-checkout-timeout", &["BUILDKITE_GIT_CHECKOUT_TIMEOUT"], Int, "0"),
    setting("git-skip-fetch-existing-commits", &["BUILDKITE_GIT_SKIP_FETCH_EXISTING_COMMITS"], Bool, "false"),
    setting("skip-checkout", &["BUILDKITE_SKIP_CHECKOUT"], Bool, "false"),
    setting("checkout-attempts", &["BUILDKITE_CHECKOUT_ATTEMPTS"], Int, "6"),
    setting("checkout-override-mode", &["BUILDKITE_CHECKOUT_OVERRIDE_MODE"], Text, "from-job"),
    setting("no-git-submodules", &["BUILDKITE_NO_GIT_SUBMODULES", "BUILDKITE_DISABLE_GIT_SUBMODULES"], Bool, "false"),
    setting("no-ssh-keyscan", &["BUILDKITE_NO_SSH_KEYSCAN"], Bool, "false"),
    setting("no-command-eval", &["BUILDKITE_NO_COMMAND_EVAL"], Bool, "false"),
    setting("health-check-addr", &["BUILDKITE_HEALTH_CHECK_ADDR"], Text, ""),
    setting("acquire-job", &["BUILDKITE_AGENT_ACQUIRE_JOB"], Text, ""),
    setting("spawn", &["BUILDKITE_AGENT_SPAWN"], Int, "1"),
    setting("disconnect-after-idle-timeout", &["BUILDKITE_AGENT_DISCONNECT_AFTER_IDLE_TIMEOUT"], Int, "0"),
    // 3.x (`clicommand/cancel_signal.go` at v3.137.0): -1 means cancel-grace-period minus 1.
    setting("cancel-grace-period", &["BUILDKITE_CANCEL_GRACE_PERIOD"], Int, "10"),
    setting("signal-grace-period-seconds", &["BUILDKITE_SIGNAL_GRACE_PERIOD_SECONDS"], Int, "-1"),
    // 4.x (`clicommand/cancel_signal.go` at main 5c219808).
    setting("cancel-signal-timeout", &["BUILDKITE_CANCEL_SIGNAL_TIMEOUT"], Text, "10s"),
    setting("cancel-cleanup-timeout", &["BUILDKITE_CANCEL_CLEANUP_TIMEOUT"], Text, "5s"),
];

/// The cancel-timing flags only one major version has; the other's urfave/cli refuses them.
pub const ONLY_IN_3: &[&str] = &["cancel-grace-period", "signal-grace-period-seconds"];
pub const ONLY_IN_4: &[&str] = &["cancel-signal-timeout", "cancel-cleanup-timeout"];

/// The agent's resolved settings (values as the agent prints them into a job's environment).
pub struct AgentConfig {
    values: BTreeMap<&'static str, String>,
    /// The configuration file read, if any.
    pub path: Option<PathBuf>,
}

impl AgentConfig {
    /// Resolves every setting from `args` (after `start`), the environment and the file.
    pub fn load(args: &[&str]) -> Result<AgentConfig, String> {
        let flag = |name: &str| flag_value(args, name);
        let path = match flag("config").or_else(|| non_empty_env(&["BUILDKITE_AGENT_CONFIG"])) {
            Some(given) => {
                let path = PathBuf::from(&given);
                if !path.is_file() {
                    return Err(format!(
                        "a configuration file could not be found at: {given:?}"
                    ));
                }
                Some(path)
            }
            None => default_config_paths().into_iter().find(|p| p.is_file()),
        };
        let file = match &path {
            Some(p) => parse_file(p)?,
            None => BTreeMap::new(),
        };
        let mut values = BTreeMap::new();
        for s in SETTINGS {
            let raw = flag(s.name)
                .or_else(|| non_empty_env(s.env))
                .or_else(|| file.get(s.name).map(|v| from_file(s.kind, v)))
                .unwrap_or_else(|| s.default.to_string());
            let value = match s.kind {
                Bool => parse_bool(&raw)
                    .ok_or_else(|| {
                        format!("could not parse {raw:?} as bool value for flag {}", s.name)
                    })?
                    .to_string(),
                Int => raw
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| format!("invalid value {raw:?} for flag -{}", s.name))?
                    .to_string(),
                Text | List => raw,
            };
            values.insert(s.name, value);
        }
        Ok(AgentConfig { values, path })
    }

    pub fn get(&self, name: &str) -> &str {
        self.values
            .get(name)
            .map(String::as_str)
            .unwrap_or_default()
    }

    fn flag(&self, name: &str) -> bool {
        self.get(name) == "true"
    }

    /// The signal grace (cancel signal to SIGKILL) and the forced-exit window of an ungraceful
    /// stop, for an agent of major version `major`: 3.x `cancel-grace-period` and
    /// `signal-grace-period-seconds` (negative: relative to the former), forced exit at the
    /// grace period + 1 s; 4.x `cancel-signal-timeout`, forced exit at it +
    /// `cancel-cleanup-timeout` + 1 s.
    pub fn cancel_timing(&self, major: u32) -> (std::time::Duration, std::time::Duration) {
        use std::time::Duration;
        let one = Duration::from_secs(1);
        if major >= 4 {
            let signal = self.duration("cancel-signal-timeout");
            return (
                signal,
                signal + self.duration("cancel-cleanup-timeout") + one,
            );
        }
        let cancel: i64 = self.get("cancel-grace-period").parse().unwrap_or(10);
        let signal: i64 = self
            .get("signal-grace-period-seconds")
            .parse()
            .unwrap_or(-1);
        let signal = if signal < 0 { cancel + signal } else { signal };
        (
            Duration::from_secs(signal.max(0) as u64),
            Duration::from_secs(cancel.max(0) as u64) + one,
        )
    }

    /// A duration setting (`10s`, `1m`, or plain seconds).
    pub fn duration(&self, name: &str) -> std::time::Duration {
        let text = self.get(name);
        let secs = |t: &str| t.parse::<f64>().ok();
        let value = match text.strip_suffix("ms") {
            Some(ms) => secs(ms).map(|v| v / 1000.0),
            None => match text.strip_suffix('s') {
                Some(s) => secs(s),
                None => match text.strip_suffix('m') {
                    Some(m) => secs(m).map(|v| v * 60.0),
                    None => secs(text),
                },
            },
        };
        std::time::Duration::from_secs_f64(value.unwrap_or(0.0).max(0.0))
    }

    /// `resolveCheckoutOverrideMode`: `no-command-eval` forces strict.
    fn checkout_override_mode(&self) -> &str {
        match self.flag("no-command-eval") {
            true => "strict",
            false => self.get("checkout-override-mode"),
        }
    }

    /// `createEnvironment`'s map for a job whose backend environment is `job`.
    pub fn job_environment(&self, job: BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mode = self.checkout_override_mode().to_string();
        let mut env = job;
        env.remove("BUILDKITE_AGENT_TOKEN");
        // Always present, so an ambient value can never switch the remote mirror on.
        env.entry("BUILDKITE_GIT_REMOTE_MIRROR_URL".into())
            .or_default();
        let mut set = |name: &str, value: &str| {
            env.insert(name.to_string(), value.to_string());
        };
        set("BUILDKITE_AGENT_ENDPOINT", self.get("endpoint"));
        set("BUILDKITE_AGENT_ACCESS_TOKEN", "standin-job-token");
        set("BUILDKITE_AGENT_DEBUG", "false");
        set("BUILDKITE_AGENT_PID", &std::process::id().to_string());
        let bin = std::env::current_exe().ok();
        let bin_dir = bin
            .as_deref()
            .and_then(Path::parent)
            .map(|d| d.display().to_string());
        set("BUILDKITE_BIN_PATH", &bin_dir.unwrap_or_default());
        let config_path = self.path.as_ref().map(|p| p.display().to_string());
        set("BUILDKITE_CONFIG_PATH", &config_path.unwrap_or_default());
        set("BUILDKITE_BUILD_PATH", self.get("build-path"));
        set("BUILDKITE_GIT_MIRRORS_PATH", self.get("git-mirrors-path"));
        set(
            "BUILDKITE_GIT_MIRRORS_SKIP_UPDATE",
            self.get("git-mirrors-skip-update"),
        );
        set("BUILDKITE_HOOKS_PATH", self.get("hooks-path"));
        set(
            "BUILDKITE_ADDITIONAL_HOOKS_PATHS",
            self.get("additional-hooks-paths"),
        );
        set("BUILDKITE_PLUGINS_PATH", self.get("plugins-path"));
        set(
            "BUILDKITE_SSH_KEYSCAN",
            &(!self.flag("no-ssh-keyscan")).to_string(),
        );
        let submodules = (!self.flag("no-git-submodules")).to_string();
        let timeout = self.get("git-checkout-timeout").to_string();
        // The four toggles: emitted always under strict, else only on their non-default side.
        let toggles = [
            (
                "BUILDKITE_GIT_SUBMODULES",
                submodules.as_str(),
                submodules == "false",
            ),
            (
                "BUILDKITE_SKIP_CHECKOUT",
                self.get("skip-checkout"),
                self.flag("skip-checkout"),
            ),
            (
                "BUILDKITE_GIT_SKIP_FETCH_EXISTING_COMMITS",
                self.get("git-skip-fetch-existing-commits"),
                self.flag("git-skip-fetch-existing-commits"),
            ),
            (
                "BUILDKITE_GIT_CHECKOUT_TIMEOUT",
                timeout.as_str(),
                timeout != "0",
            ),
        ];
        let mut checkout_env = Vec::new();
        for (name, value, non_default) in toggles {
            match (mode.as_str(), non_default) {
                ("strict", _) => checkout_env.push((name, value, true)),
                (_, true) => checkout_env.push((name, value, false)),
                _ => {}
            }
        }
        for (name, value, forced) in checkout_env {
            set_checkout_env(&mut env, &mode, name, value, forced);
        }
        let mut set = |name: &str, value: &str| {
            env.insert(name.to_string(), value.to_string());
        };
        set("BUILDKITE_CHECKOUT_OVERRIDE_MODE", &mode);
        set("BUILDKITE_CHECKOUT_ATTEMPTS", self.get("checkout-attempts"));
        set(
            "BUILDKITE_COMMAND_EVAL",
            &(!self.flag("no-command-eval")).to_string(),
        );
        set("BUILDKITE_PLUGINS_ENABLED", "true");
        set("BUILDKITE_LOCAL_HOOKS_ENABLED", "true");
        for (name, setting) in [
            ("BUILDKITE_GIT_CHECKOUT_FLAGS", "git-checkout-flags"),
            ("BUILDKITE_GIT_CLONE_FLAGS", "git-clone-flags"),
            ("BUILDKITE_GIT_FETCH_FLAGS", "git-fetch-flags"),
            (
                "BUILDKITE_GIT_SPARSE_CHECKOUT_PATHS",
                "git-sparse-checkout-paths",
            ),
            (
                "BUILDKITE_GIT_SPARSE_CHECKOUT_MODE",
                "git-sparse-checkout-mode",
            ),
        ] {
            set_checkout_env(&mut env, &mode, name, self.get(setting), false);
        }
        env.insert(
            "BUILDKITE_GIT_CLONE_MIRROR_FLAGS".into(),
            self.get("git-clone-mirror-flags").into(),
        );
        env.insert(
            "BUILDKITE_GIT_MIRROR_CHECKOUT_MODE".into(),
            self.get("git-mirror-checkout-mode").into(),
        );
        set_checkout_env(
            &mut env,
            &mode,
            "BUILDKITE_GIT_CLEAN_FLAGS",
            self.get("git-clean-flags"),
            false,
        );
        env.insert(
            "BUILDKITE_GIT_MIRRORS_LOCK_TIMEOUT".into(),
            self.get("git-mirrors-lock-timeout").into(),
        );
        env.insert(
            "BUILDKITE_GIT_SUBMODULE_CLONE_CONFIG".into(),
            self.get("git-submodule-clone-config").into(),
        );
        set_checkout_env(
            &mut env,
            &mode,
            "BUILDKITE_GIT_COMMIT_VERIFICATION",
            self.get("git-commit-verification"),
            false,
        );
        env.insert(
            "BUILDKITE_CANCEL_GRACE_PERIOD".into(),
            self.get("cancel-grace-period").into(),
        );
        // The effective value, as `int(SignalGracePeriod / time.Second)`.
        let (signal_grace, _) = self.cancel_timing(3);
        env.insert(
            "BUILDKITE_SIGNAL_GRACE_PERIOD_SECONDS".into(),
            signal_grace.as_secs().to_string(),
        );
        env
    }
}

/// `setCheckoutEnv`: a value the job already has stays unless the mode locks the variable
/// against the backend's job environment (`forced`: strict's unconditional `setEnv`).
fn set_checkout_env(
    env: &mut BTreeMap<String, String>,
    mode: &str,
    name: &str,
    value: &str,
    forced: bool,
) {
    if !forced && !locked_for_job_env(name, mode) && env.contains_key(name) {
        return;
    }
    env.insert(name.to_string(), value.to_string());
}

/// `IsCheckoutLockedForJobEnv`: sparse settings are locked only by strict, the rest by every
/// mode but none.
fn locked_for_job_env(name: &str, mode: &str) -> bool {
    match name {
        "BUILDKITE_GIT_SPARSE_CHECKOUT_PATHS" | "BUILDKITE_GIT_SPARSE_CHECKOUT_MODE" => {
            mode == "strict"
        }
        _ => mode != "none",
    }
}

/// `--name value` or `--name=value` (a boolean flag alone means true), or `-name`.
fn flag_value(args: &[&str], name: &str) -> Option<String> {
    let long = format!("--{name}");
    let short = format!("-{name}");
    let kind = SETTINGS.iter().find(|s| s.name == name).map(|s| s.kind);
    let mut words = args.iter();
    while let Some(word) = words.next() {
        for prefix in [&long, &short] {
            if let Some(value) = word.strip_prefix(&format!("{prefix}=")) {
                return Some(value.to_string());
            }
            if *word == prefix.as_str() {
                return match kind {
                    Some(Kind::Bool) => Some("true".into()),
                    _ => words.next().map(|v| v.to_string()),
                };
            }
        }
    }
    None
}

fn non_empty_env(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
}

/// A file's value as the loader converts it: a boolean it cannot parse is false.
fn from_file(kind: Kind, value: &str) -> String {
    match kind {
        Kind::Bool => parse_bool(value).unwrap_or(false).to_string(),
        _ => value.to_string(),
    }
}

/// Go's `strconv.ParseBool`.
fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

fn default_config_paths() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .as_deref()
        .and_then(Path::parent)
    {
        paths.push(dir.join("buildkite-agent.cfg"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        paths.push(Path::new(&home).join(".buildkite-agent/buildkite-agent.cfg"));
    }
    paths.push("/usr/local/etc/buildkite-agent/buildkite-agent.cfg".into());
    paths.push("/etc/buildkite-agent/buildkite-agent.cfg".into());
    paths
}

/// `cliconfig/file.go`: every line but blank and `#` ones is `key=value` or `key: value`.
fn parse_file(path: &Path) -> Result<BTreeMap<String, String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("opening file {}: {e}", path.display()))?;
    let mut config = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (key, value) = parse_line(line)
            .ok_or_else(|| format!("parsing config line {}: no = or : in {line:?}", n + 1))?;
        config.insert(key, value);
    }
    Ok(config)
}

fn parse_line(line: &str) -> Option<(String, String)> {
    // A `#` starts a comment unless it is inside quotes.
    let mut kept = String::new();
    let mut quote = None;
    for c in line.chars() {
        match (c, quote) {
            ('#', None) => break,
            ('"' | '\'', None) => quote = Some(c),
            (q, Some(open)) if q == open => quote = None,
            _ => {}
        }
        kept.push(c);
    }
    let (key, value) = kept.split_once('=').or_else(|| kept.split_once(':'))?;
    let key = key.trim().trim_start_matches("export").trim().to_string();
    let mut value = value.trim().to_string();
    let quoted = |q: char| value.len() >= 2 && value.starts_with(q) && value.ends_with(q);
    if quoted('"') || quoted('\'') {
        value = value[1..value.len() - 1]
            .replace("\\\"", "\"")
            .replace("\\n", "\n");
    }
    Some((key, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_lines_are_read_as_the_agents_file_loader_reads_them() {
        for (line, key, value) in [
            (
                r#"git-mirrors-path="/buildkite-git-references""#,
                "git-mirrors-path",
                "/buildkite-git-references",
            ),
            (
                "export build-path: /tmp/b  # a comment",
                "build-path",
                "/tmp/b",
            ),
            // `=` is looked for first, as in the agent.
            ("tags: queue=default", "tags: queue", "default"),
            (r#"name="agent # 1""#, "name", "agent # 1"),
            (
                "git-mirrors-skip-update=true",
                "git-mirrors-skip-update",
                "true",
            ),
        ] {
            assert_eq!(parse_line(line), Some((key.into(), value.into())), "{line}");
        }
        assert_eq!(parse_line("no separator"), None);
    }

    #[test]
    fn checkout_variables_follow_the_override_mode() {
        let config = |mode: &str| AgentConfig {
            values: SETTINGS
                .iter()
                .map(|s| (s.name, s.default.to_string()))
                .chain([("checkout-override-mode", mode.to_string())])
                .collect(),
            path: None,
        };
        let job: BTreeMap<String, String> = [
            ("BUILDKITE_GIT_CLONE_FLAGS", "--depth=1"),
            ("BUILDKITE_GIT_SPARSE_CHECKOUT_PATHS", "src"),
            ("BUILDKITE_GIT_SUBMODULES", "false"),
            ("BUILDKITE_GIT_MIRRORS_PATH", "/elsewhere"),
            ("BUILDKITE_AGENT_TOKEN", "secret"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let env = |mode: &str| config(mode).job_environment(job.clone());
        let from_job = env("from-job");
        assert_eq!(
            from_job["BUILDKITE_GIT_CLONE_FLAGS"], "-v",
            "agent config wins"
        );
        assert_eq!(
            from_job["BUILDKITE_GIT_SPARSE_CHECKOUT_PATHS"], "src",
            "from-job floor"
        );
        assert_eq!(
            from_job["BUILDKITE_GIT_SUBMODULES"], "false",
            "silent side: the job's"
        );
        assert_eq!(
            from_job["BUILDKITE_GIT_MIRRORS_PATH"], "",
            "always the agent's"
        );
        assert!(!from_job.contains_key("BUILDKITE_AGENT_TOKEN"));
        let none = env("none");
        assert_eq!(none["BUILDKITE_GIT_CLONE_FLAGS"], "--depth=1");
        let strict = env("strict");
        assert_eq!(strict["BUILDKITE_GIT_SPARSE_CHECKOUT_PATHS"], "");
        assert_eq!(strict["BUILDKITE_GIT_SUBMODULES"], "true");
    }
}
