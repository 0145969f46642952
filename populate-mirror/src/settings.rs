//! populate-mirror's inputs. Every option is also an environment variable, so a Kubernetes Job
//! or CronJob can set them from a ConfigMap; `populate-mirror --help` documents them all.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser, ValueEnum};
use stateless_core::mirror_layout::DEFAULT_MIRRORS_PATH;

/// The exit codes, as docs/populate-mirror.md's table gives them (a test keeps the two the same);
/// the binary's `exit_code` decides them.
pub const EXIT_CODES: &str = "\
Exit codes:
  0         every repository refreshed (or unchanged)
  1         some repositories failed; the others were refreshed
  2         bad input (URL, repos file, settings, git missing) or an unusable root
  3         no repository was refreshed
  4         another populate-mirror holds the volume
  5         the manifest could not be written
  130, 143  stopped by SIGINT, SIGTERM; nothing unpublished left";

/// Builds and refreshes the mirror volume that checkout-hook borrows from.
///
/// Each repository becomes a bare mirror, fast to read (one pack, commit graph, packed refs),
/// published atomically as a new generation: the path readers use is a symlink switched in one
/// rename, so a job never sees a half-written mirror. A manifest at the root lists what the volume
/// holds.
#[derive(Parser, Clone)]
#[command(name = "populate-mirror", version, after_help = EXIT_CODES)]
pub struct Settings {
    /// Repository URLs to mirror, besides those in --repos-file (the environment variable takes
    /// them space-separated).
    #[arg(env = "POPULATE_MIRROR_REPOS", value_delimiter = ' ')]
    pub urls: Vec<String>,

    /// The mirror volume's root.
    #[arg(long, env = "BUILDKITE_GIT_MIRRORS_PATH", default_value = DEFAULT_MIRRORS_PATH)]
    pub root: PathBuf,

    /// A file of repository URLs, one per line; `#` starts a comment, blank lines are ignored.
    #[arg(long, env = "POPULATE_MIRROR_REPOS_FILE")]
    pub repos_file: Option<PathBuf>,

    /// How many repositories are fetched at once.
    #[arg(long, env = "POPULATE_MIRROR_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,

    /// Where a repository's mirror is published: `reference` (`<org>/<name>.reference`, one
    /// directory for every spelling of a URL) or `stock` (the stock agent's name for the URL).
    #[arg(long, env = "POPULATE_MIRROR_LAYOUT", value_enum, default_value_t = Layout::Reference)]
    pub layout: Layout,

    /// Mirror pull-request refs (`refs/pull/*`) too. Off by default: on GitHub they add thousands
    /// of refs and about a third to the pack, and checkouts fetch the one they need.
    #[arg(long, env = "POPULATE_MIRROR_PULL_REQUESTS", default_value = "false", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub pull_requests: bool,

    /// Check every new generation's whole history with `git fsck --connectivity-only` before
    /// publishing it. Off by default: git's clone and fetch already check the history they
    /// bring, and this walk costs about a quarter of a first clone.
    #[arg(long, env = "POPULATE_MIRROR_FSCK", default_value = "false", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub fsck: bool,

    /// Also mirror the repositories named in each default branch's `.gitmodules`.
    #[arg(long, env = "POPULATE_MIRROR_SUBMODULES", default_value = "true", value_parser = BoolishValueParser::new(), action = ArgAction::Set)]
    pub submodules: bool,

    /// Older generations kept besides the published one.
    #[arg(long, env = "POPULATE_MIRROR_KEEP_GENERATIONS", default_value_t = 2)]
    pub keep_generations: usize,

    /// An older generation is removed only when it was replaced at least this long ago (e.g.
    /// `24h`): a checkout that started on it borrows from it for its whole job. Set it above the
    /// longest job's duration.
    #[arg(long, env = "POPULATE_MIRROR_RETAIN_FOR", default_value = "24h", value_parser = humantime::parse_duration)]
    pub retain_for: Duration,

    /// A git command that reports no progress for this long is killed and retried.
    #[arg(long, env = "POPULATE_MIRROR_STALL_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,

    /// The longest one repository's refresh may take, retries included.
    #[arg(long, env = "POPULATE_MIRROR_TIMEOUT", default_value = "2h", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// Attempts per repository for failures of the network or the server.
    #[arg(long, env = "POPULATE_MIRROR_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub attempts: u32,

    /// First wait between attempts; it doubles each time, plus jitter.
    #[arg(long, env = "POPULATE_MIRROR_RETRY_DELAY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub retry_delay: Duration,

    /// How often a long git command's progress is logged when stderr is not a terminal.
    #[arg(long, env = "POPULATE_MIRROR_PROGRESS_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub progress_interval: Duration,

    /// Refresh again every this long (e.g. `15m`), give or take a tenth so that nodes started
    /// together drift apart, until a signal stops it: the node-local mirror's DaemonSet. A round
    /// that fails is logged and the next one tried; only a repository list that cannot be read
    /// or a missing git ends it (exit 2). Unset: one run.
    #[arg(long, env = "POPULATE_MIRROR_EVERY", value_parser = humantime::parse_duration)]
    pub every: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Layout {
    Reference,
    Stock,
}
