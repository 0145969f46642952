//! job-dispatcher's options; each is also an environment variable, so a Deployment sets them
//! from its settings ConfigMap (`image/k8s/kustomization.yaml`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// The exit codes (docs/job-dispatcher.md, "Exit codes"); the binary's `main` decides them.
pub const EXIT_CODES: &str = "\
Exit codes:
  0   stopped by SIGTERM or SIGINT, the Lease given up
  1   the environment failed (Kubernetes unreachable, the token's Secret unreadable, the election
      ended); the pod is restarted
  2   a setting that does not parse
  78  the configuration: the agent or claims templates, a token Secret that is missing";

/// Creates Kubernetes Jobs of one-shot Buildkite agents (agent-wrapper running
/// `buildkite-agent start --disconnect-after-job`) sized to one queue's demand. One per queue,
/// as a Deployment; replicas elect a leader on a Lease, and everything it knows is read back from
/// Kubernetes, so a restart creates no duplicate dispatch. docs/job-dispatcher.md describes it.
// No `Debug`: the token must not be printable.
#[derive(Parser)]
#[command(name = "job-dispatcher", version, after_help = EXIT_CODES)]
pub struct Settings {
    /// The Buildkite queue served. The template's agents must register in it.
    #[arg(long, env = "DISPATCHER_QUEUE")]
    pub queue: String,

    /// Where the demand comes from: `metrics`, the queue's counts (Buildkite's agent metrics API),
    /// sized pools of `--disconnect-after-job` agents; or `stacks`, the queue's scheduled jobs
    /// (Buildkite's Stacks API, which needs a cluster agent token), one pod per job with
    /// `--acquire-job`, failures and cancellations shown in the build (docs/job-dispatcher.md,
    /// "Two modes").
    #[arg(long, env = "DISPATCHER_SOURCE", value_enum, default_value_t = Source::Metrics)]
    pub source: Source,

    /// `stacks`: the stack's key, unique in the organization [default: job-dispatcher-<namespace>-<queue>].
    /// Replicas of one dispatcher share it; two dispatchers on one queue need their own.
    #[arg(long, env = "DISPATCHER_STACK_KEY")]
    pub stack_key: Option<String>,

    /// `stacks`: how long each reservation of a job lasts; it is renewed while the job's pod
    /// comes, so a dispatcher that dies leaves it for at most this long.
    #[arg(long, env = "DISPATCHER_RESERVATION_EXPIRY", default_value = "5m", value_parser = humantime::parse_duration)]
    pub reservation_expiry: Duration,

    /// The agent Job template: a batch/v1 Job YAML (image/k8s/agent-job.yaml works as it is).
    #[arg(
        long,
        env = "DISPATCHER_TEMPLATE",
        default_value = "/etc/job-dispatcher/agent-job.yaml"
    )]
    pub template: PathBuf,

    /// The namespace of the agent Jobs [default: the kubeconfig's, or the pod's own].
    #[arg(long, env = "DISPATCHER_NAMESPACE")]
    pub namespace: Option<String>,

    /// Agent pods not yet finished, at most.
    #[arg(long, env = "DISPATCHER_MAX_AGENTS", default_value_t = 50)]
    pub max_agents: u32,

    /// Agent pods kept alive even without demand.
    #[arg(long, env = "DISPATCHER_MIN_AGENTS", default_value_t = 0)]
    pub min_agents: u32,

    /// Extra agents while jobs are waiting.
    #[arg(long, env = "DISPATCHER_BUFFER", default_value_t = 2)]
    pub buffer: u32,

    /// Extra agents as a share of the jobs waiting, when that is more than --buffer: the first
    /// agents up take the jobs, so a slow pod (a cold node) holds none back
    /// (docs/benchmarks.md, the dispatch simulation).
    #[arg(long, env = "DISPATCHER_BUFFER_RATIO", default_value_t = 0.1)]
    pub buffer_ratio: f64,

    /// How often to read the queue's demand; never more often than Buildkite asks
    /// (`Buildkite-Agent-Metrics-Poll-Duration`).
    #[arg(long, env = "DISPATCHER_POLL_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,

    /// The share of the last dispatch's pods that must be online (running or finished) before
    /// low agent counts are trusted and another dispatch is made.
    #[arg(long, env = "DISPATCHER_ROLLOUT_RATIO", default_value_t = 0.5)]
    pub rollout_ratio: f64,

    /// The short deadline: a dispatch not rolled out by then no longer holds the next one back,
    /// and a pod running this long must have registered its agent in the queue (else the
    /// template registers elsewhere, and dispatching stops).
    #[arg(long, env = "DISPATCHER_START_DEADLINE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub start_deadline: Duration,

    /// How long an agent pod may take to start its container (scheduled, image pulled, volumes
    /// mounted, Secrets found): a pod not running by then is stuck, reported (log line, Event,
    /// metric) and let go, and dispatches back off while pods keep getting stuck. An
    /// Unschedulable pod counts as coming until then, so that an autoscaler can add a node.
    #[arg(long, env = "DISPATCHER_START_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub start_timeout: Duration,

    /// After a dispatch whose pods got stuck, the next waits this long, doubling for each
    /// further one in a row (at most 10 minutes), so a broken image never makes a storm of Jobs;
    /// a pod that starts, or a new template, ends the wait at once.
    #[arg(long, env = "DISPATCHER_STUCK_BACKOFF", default_value = "30s", value_parser = humantime::parse_duration)]
    pub stuck_backoff: Duration,

    /// The long deadline: each Job's `activeDeadlineSeconds`, above the longest CI job.
    #[arg(long, env = "DISPATCHER_JOB_DEADLINE", default_value = "4h", value_parser = humantime::parse_duration)]
    pub job_deadline: Duration,

    /// Each Job's `ttlSecondsAfterFinished`: finished Jobs and their pods go after this.
    #[arg(long, env = "DISPATCHER_JOB_TTL", default_value = "10m", value_parser = humantime::parse_duration)]
    pub job_ttl: Duration,

    /// agent-wrapper's idle timeout on each dispatch's pods: jobs were waiting when it was
    /// made, so an agent that finds none this soon is surplus and leaves.
    #[arg(long, env = "DISPATCHER_IDLE_TIMEOUT", default_value = "2m", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Where agents' mirror volume comes from: `shared`, the template's own (one ReadWriteMany
    /// claim that populate-mirror refreshes); `node-local`, each node's directory
    /// `--node-mirror-path`, refreshed by the populate-mirror DaemonSet; or `claims`, one claim
    /// per generation that this dispatcher makes, populates and expires (`--claim-template`,
    /// `--populate-template`). The last two replace the template's volume `--mirror-volume`,
    /// read-only (docs/operating.md, "Mirror volumes").
    #[arg(long, env = "DISPATCHER_MIRROR_MODE", value_enum, default_value_t = MirrorMode::Shared)]
    pub mirror_mode: MirrorMode,

    /// The template's volume that holds the mirrors.
    #[arg(long, env = "DISPATCHER_MIRROR_VOLUME", default_value = "git-mirrors")]
    pub mirror_volume: String,

    /// Each node's mirror directory, in `node-local` mode: the DaemonSet's hostPath.
    #[arg(
        long,
        env = "DISPATCHER_NODE_MIRROR_PATH",
        default_value = "/var/lib/stateless-agent/git-mirrors"
    )]
    pub node_mirror_path: String,

    /// `claims`: the claim each generation is made from (a PersistentVolumeClaim manifest: its
    /// storage class, size and access modes; its name the generations' prefix).
    #[arg(
        long,
        env = "DISPATCHER_CLAIM_TEMPLATE",
        default_value = "/etc/job-dispatcher/mirror-claim.yaml"
    )]
    pub claim_template: PathBuf,

    /// `claims`: the Job that populates a generation (a batch/v1 Job running populate-mirror
    /// with the volume `--mirror-volume`, which is pointed at the generation's claim).
    #[arg(
        long,
        env = "DISPATCHER_POPULATE_TEMPLATE",
        default_value = "/etc/job-dispatcher/populate-job.yaml"
    )]
    pub populate_template: PathBuf,

    /// `claims`: a VolumeSnapshotClass to seed each generation from a snapshot of the last, so
    /// that a refresh fetches only what is new. Unset: each generation starts empty.
    #[arg(long, env = "DISPATCHER_SNAPSHOT_CLASS")]
    pub snapshot_class: Option<String>,

    /// How often the mirror is refreshed: in `claims`, a new generation when the newest ready
    /// one is this old; in `shared`, the populate CronJob's period (keep them the same), which
    /// `dispatcher_mirror_refresh_seconds` exports for the staleness alert.
    #[arg(long, env = "DISPATCHER_MIRROR_REFRESH", default_value = "15m", value_parser = humantime::parse_duration)]
    pub mirror_refresh: Duration,

    /// `claims`: ready generations kept, the one handed out included; older ones expire, and
    /// their claims are deleted once no pod object names them.
    #[arg(long, env = "DISPATCHER_MIRROR_KEEP", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    pub mirror_keep: u16,

    /// The agent token (the agent's own, for the metrics API; no API token is needed)
    /// [default: read from the Secret `--token-secret`].
    #[arg(long, env = "BUILDKITE_AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// The Secret (key `token`) that holds the agent token: the agent pods' `BUILDKITE_AGENT_TOKEN`
    /// comes from it (unless the template sets that variable itself), and so does the
    /// dispatcher's own when `--token` is not given.
    #[arg(
        long,
        env = "DISPATCHER_TOKEN_SECRET",
        default_value = "buildkite-agent"
    )]
    pub token_secret: String,

    /// The image of the templates' containers that name the placeholder `stateless-agent`
    /// [default: the image this dispatcher's own pod runs, so that kustomize's `images:` on the
    /// Deployment reaches the agents too].
    #[arg(long, env = "DISPATCHER_IMAGE")]
    pub image: Option<String>,

    /// Buildkite's agent API.
    #[arg(
        long,
        env = "BUILDKITE_AGENT_ENDPOINT",
        default_value = "https://agent.buildkite.com/v3"
    )]
    pub endpoint: String,

    /// Prometheus `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "DISPATCHER_LISTEN", default_value = "0.0.0.0:9090")]
    pub listen: SocketAddr,

    /// The Lease the replicas elect a leader on [default: job-dispatcher-<queue>].
    #[arg(long, env = "DISPATCHER_LEASE")]
    pub lease: Option<String>,

    /// This replica's name in the Lease [default: $POD_NAME, else $HOSTNAME, else random].
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
}

/// Where the demand comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Source {
    Metrics,
    Stacks,
}

/// Where agents' mirror volume comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MirrorMode {
    Shared,
    NodeLocal,
    Claims,
}

impl Settings {
    /// The stack's key in `namespace`: `--stack-key`, else one made of the namespace and queue
    /// (letters, digits, `_` and `-`, at most 80 bytes, as the API requires).
    pub fn stack_key(&self, namespace: &str) -> String {
        if let Some(key) = &self.stack_key {
            return key.clone();
        }
        let raw = format!("job-dispatcher-{namespace}-{}", self.queue);
        let key: String = raw
            .chars()
            .map(|c| match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | '-' => c,
                _ => '-',
            })
            .collect();
        if key.len() <= 80 {
            return key;
        }
        // Long names keep a hash of the whole, so two never meet at the cut.
        let hash = crate::template::fnv1a(&raw);
        format!("{}-{}", &key[..63], &hash[..16])
    }

    /// The mirror volume the template's agents get.
    pub fn mirror(&self) -> crate::template::Mirror {
        match self.mirror_mode {
            MirrorMode::Shared => crate::template::Mirror::Shared,
            MirrorMode::NodeLocal => crate::template::Mirror::NodeLocal {
                volume: self.mirror_volume.clone(),
                path: self.node_mirror_path.clone(),
            },
            MirrorMode::Claims => crate::template::Mirror::Claims {
                volume: self.mirror_volume.clone(),
            },
        }
    }
}
