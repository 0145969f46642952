//! The dispatcher's process: its edges set up (the template, Kubernetes through watches,
//! Buildkite's metrics API, a Lease for the leader, the claims mode's cycle as a task of its
//! own), then the loop: while leading, one tick each poll interval; observe ([`crate::watches`],
//! [`crate::observe`]), decide ([`crate::decide`]), act ([`crate::act`]). Nothing is remembered
//! between ticks that Kubernetes does not hold: a restarted or newly elected dispatcher sees
//! every earlier dispatch in the watched Jobs, pods and its own Events.
//!
//! On SIGTERM or SIGINT (a rollout, a drain) it stops dispatching and gives its Leases up, so a
//! standby takes over at its next retry, and exits 0.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::Client;
use stateless_core::repo_url::Redactor;

use crate::act::Edges;
use crate::buildkite::{MetricsClient, MetricsError};
use crate::decide::{self, decide, Limits};
use crate::leader;
use crate::metrics::{ApiError, Metrics};
use crate::mirror_run;
use crate::observe::Timeouts;
use crate::settings::{MirrorMode, Settings, Source};
use crate::stacks_api::StacksClient;
use crate::stacks_plan::StackLimits;
use crate::stacks_run::Stack;
use crate::template::Template;
use crate::watches::Stores;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot read the agent template {path}: {source}; mount it (a ConfigMap) there or set DISPATCHER_TEMPLATE")]
    TemplateFile {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Template(#[from] crate::template::TemplateError),
    #[error(transparent)]
    MirrorTemplates(#[from] mirror_run::TemplatesError),
    #[error("no Kubernetes client configuration ({0}); run in a pod with a service account, or set KUBECONFIG")]
    Kubernetes(String),
    #[error("cannot listen on {addr} for metrics ({source}); set DISPATCHER_LISTEN")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot handle signals: {0}")]
    Signals(std::io::Error),
    #[error("the leader election stopped unexpectedly; exiting so that the pod is restarted")]
    ElectionEnded,
    #[error("cannot read the agent token from the Secret {secret:?} (key `token`): {why}; create it (kubectl create secret generic {secret} --from-literal=token=<agent token>), or name yours with DISPATCHER_TOKEN_SECRET")]
    TokenSecret {
        secret: String,
        why: String,
        missing: bool,
    },
    #[error("the templates name the image placeholder `stateless-agent` and this dispatcher cannot read its own pod's image ({0}); set DISPATCHER_IMAGE, or run it as the shipped Deployment does (POD_NAME set to its pod's name, pods get allowed)")]
    OwnImage(String),
}

impl RunError {
    /// Whether the user must fix something (exit 78), as opposed to the environment failing.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            RunError::TemplateFile { .. }
                | RunError::Template(_)
                | RunError::MirrorTemplates(_)
                | RunError::TokenSecret { missing: true, .. }
        )
    }
}

/// How recent a `FailedCreate` must be to count as a refusal still going on: the Job controller
/// retries a refused create with a backoff capped at a minute (`pkg/controller/job/
/// job_controller.go`, `MaxJobApiBackOff`), and each retry refreshes the Event.
const REFUSAL_FRESH: Duration = Duration::from_secs(75);

/// Runs until SIGTERM or SIGINT.
pub async fn run(settings: Settings) -> Result<(), RunError> {
    let (template, cycle) = load(&settings)?;
    let mut stop = Shutdown::listen()?;
    let client = Client::try_default()
        .await
        .map_err(|e| RunError::Kubernetes(e.to_string()))?;
    let namespace = settings
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    // The mirror's freshness where the dispatcher can see its refreshes (not node-local's).
    let refresh = settings.mirror_mode != MirrorMode::NodeLocal;
    let metrics = Metrics::new(&settings.queue, refresh.then_some(settings.mirror_refresh));
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: settings.listen,
            source,
        })?;
    tokio::spawn(crate::metrics::serve(listener, metrics.clone()));
    let (identity, lease) = names(&settings);
    let (template, cycle, token) = resolve(template, cycle, &settings, &client, &namespace).await?;
    let mirror = start_mirror(cycle, &settings, (&client, &namespace, &metrics), &identity);
    tracing::info!(queue = %settings.queue, namespace = %namespace, identity = %identity, template = template.hash(),
        "serving queue {} in namespace {namespace}", settings.queue);
    let edges = (&client, namespace.as_str(), metrics);
    if settings.source == Source::Stacks {
        tracing::info!(stack = %settings.stack_key(&namespace), "stacks mode: one pod per Buildkite job, through the Stacks API");
    }
    let dispatcher = Dispatcher::new(&settings, (template, &token), edges, mirror.as_ref());
    let campaign = || {
        let leases = Api::namespaced(client.clone(), &namespace);
        leader::elect(leases, lease.clone(), identity.clone())
    };
    let mut election = None;
    let outcome = tokio::select! {
        () = dispatcher.serve(&mut election, &campaign, &lease) => Err(RunError::ElectionEnded),
        signal = stop.next() => {
            tracing::info!(signal, "stopping on {signal}: no more dispatches; giving the Lease up");
            Ok(())
        }
    };
    if let Some(election) = election {
        // The leader's stack goes with it; a standby that takes over registers it again.
        let leading = *election.leading.borrow();
        if let (Feed::Stacks(stack), true) = (&dispatcher.feed, leading) {
            stack.deregister().await;
        }
        election.release().await;
    }
    if let Some(mirror) = mirror {
        mirror.election.release().await;
    }
    outcome
}

/// The claims cycle, as its own task on its own Lease, and the metrics' view of the mirror's
/// last publish (in any mode the dispatcher can see it).
fn start_mirror(
    cycle: Option<mirror_run::Cycle>,
    settings: &Settings,
    (client, namespace, metrics): (&Client, &str, &Arc<Metrics>),
    identity: &str,
) -> Option<mirror_run::MirrorCycle> {
    let mirror = cycle.map(|cycle| {
        mirror_run::start(
            client,
            namespace,
            identity.to_string(),
            cycle,
            metrics.clone(),
        )
    });
    let claims = mirror.as_ref().map(|cycle| {
        let claims = cycle.claims.clone();
        Box::new(move || claims.published()) as crate::metrics::PublishedSource
    });
    crate::watches::watch_mirror(settings.mirror_mode, claims, client, namespace, metrics);
    mirror
}

/// The agent template and, in claims mode, the cycle's templates: read and checked before
/// anything else, by every replica.
fn load(settings: &Settings) -> Result<(Template, Option<mirror_run::Cycle>), RunError> {
    let yaml =
        std::fs::read_to_string(&settings.template).map_err(|source| RunError::TemplateFile {
            path: settings.template.display().to_string(),
            source,
        })?;
    let template = Template::parse(&yaml, &settings.queue, &settings.mirror())?;
    let cycle = match settings.mirror_mode {
        MirrorMode::Claims => Some(mirror_run::Cycle::load(settings)?),
        _ => None,
    };
    Ok((template, cycle))
}

/// What the templates leave to the dispatcher's pod: the image of their placeholder containers
/// (`--image`, else the one this pod runs), the agents' token Secret, and the dispatcher's own
/// token (`--token`, else read from that Secret).
async fn resolve(
    template: Template,
    mut cycle: Option<mirror_run::Cycle>,
    settings: &Settings,
    client: &Client,
    namespace: &str,
) -> Result<(Template, Option<mirror_run::Cycle>, String), RunError> {
    let token = match &settings.token {
        Some(token) => token.clone(),
        None => read_token(client, namespace, &settings.token_secret).await?,
    };
    let wanted = template.needs_image() || cycle.as_ref().is_some_and(|c| c.needs_image());
    let image = match (&settings.image, wanted) {
        (Some(image), _) => Some(image.clone()),
        (None, true) => Some(own_image(client, namespace, settings.identity.as_deref()).await?),
        (None, false) => None,
    };
    if let (Some(cycle), Some(image)) = (cycle.as_mut(), &image) {
        cycle.fill_image(image);
    }
    let template = template.filled(image.as_deref(), &settings.token_secret);
    Ok((template, cycle, token))
}

async fn read_token(client: &Client, namespace: &str, name: &str) -> Result<String, RunError> {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), namespace);
    let failed = |why: String, missing: bool| RunError::TokenSecret {
        secret: name.to_string(),
        why,
        missing,
    };
    let secret = secrets
        .get_opt(name)
        .await
        .map_err(|e| failed(e.to_string(), false))?;
    let secret = secret.ok_or_else(|| failed("no such Secret".into(), true))?;
    let value = secret.data.and_then(|mut data| data.remove("token"));
    let value = value.ok_or_else(|| failed("it has no key `token`".into(), true))?;
    let token = String::from_utf8(value.0).map_err(|_| failed("not UTF-8".into(), true))?;
    Ok(token.trim().to_string())
}

/// The image of this dispatcher's own container (the one named `dispatcher`, else the first).
async fn own_image(
    client: &Client,
    namespace: &str,
    pod: Option<&str>,
) -> Result<String, RunError> {
    let pod = pod.ok_or_else(|| RunError::OwnImage("POD_NAME is not set".into()))?;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), namespace);
    let found = pods
        .get(pod)
        .await
        .map_err(|e| RunError::OwnImage(format!("pod {pod}: {e}")))?;
    let containers = found.spec.map(|s| s.containers).unwrap_or_default();
    let own = containers
        .iter()
        .find(|c| c.name == "dispatcher")
        .or(containers.first());
    own.and_then(|c| c.image.clone())
        .ok_or_else(|| RunError::OwnImage(format!("pod {pod} names no image")))
}

/// This replica's identity in the Lease, and the Lease's name.
fn names(settings: &Settings) -> (String, String) {
    let identity = settings
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| crate::act::random_id()[..12].to_string());
    let lease = settings
        .lease
        .clone()
        .unwrap_or_else(|| format!("job-dispatcher-{}", settings.queue));
    (identity, lease)
}

/// SIGTERM and SIGINT.
struct Shutdown {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn listen() -> Result<Shutdown, RunError> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Shutdown {
            term: signal(SignalKind::terminate()).map_err(RunError::Signals)?,
            int: signal(SignalKind::interrupt()).map_err(RunError::Signals)?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Where the demand comes from.
pub enum Feed {
    /// The queue's counts.
    Metrics(MetricsClient),
    /// The queue's jobs, one pod each.
    Stacks(Box<Stack>),
}

/// The dispatch loop's settings and edges.
pub struct Dispatcher<'a> {
    pub edges: Edges<'a>,
    pub feed: Feed,
    pub limits: Limits,
    pub timeouts: Timeouts,
}

impl<'a> Dispatcher<'a> {
    fn new(
        settings: &'a Settings,
        (template, token): (Template, &str),
        (client, namespace, metrics): (&Client, &str, Arc<Metrics>),
        mirror: Option<&'a mirror_run::MirrorCycle>,
    ) -> Dispatcher<'a> {
        let feed = match settings.source {
            Source::Metrics => Feed::Metrics(MetricsClient::new(
                &settings.endpoint,
                token,
                &settings.queue,
            )),
            Source::Stacks => Feed::Stacks(Box::new(Stack::new(
                StacksClient::new(
                    &settings.endpoint,
                    token,
                    &settings.stack_key(namespace),
                    &settings.queue,
                ),
                StackLimits {
                    max_agents: settings.max_agents,
                    expiry: settings.reservation_expiry,
                    stuck_backoff: settings.stuck_backoff,
                    stuck_backoff_cap: decide::STUCK_BACKOFF_CAP,
                    probe: settings.buffer,
                },
                namespace,
            ))),
        };
        Dispatcher {
            feed,
            limits: Limits {
                min_agents: settings.min_agents,
                max_agents: settings.max_agents,
                buffer: settings.buffer,
                buffer_ratio: settings.buffer_ratio,
                rollout_ratio: settings.rollout_ratio,
                rollout_timeout: settings.start_deadline,
                stuck_backoff: settings.stuck_backoff,
                stuck_backoff_cap: decide::STUCK_BACKOFF_CAP,
            },
            timeouts: Timeouts {
                registered_by: settings.start_deadline,
                start_timeout: settings.start_timeout,
                refusal_fresh: REFUSAL_FRESH.max(settings.poll_interval * 2),
            },
            edges: Edges {
                template,
                claims: mirror.map(|m| &m.claims),
                jobs: Api::namespaced(client.clone(), namespace),
                events: Api::namespaced(client.clone(), namespace),
                stores: Stores::start(client, namespace, &settings.queue, &metrics),
                metrics,
                redactor: Redactor::new(vec![token.to_string()]),
                settings,
            },
        }
    }

    /// Checks the token, campaigns (`campaign`, kept in `election` for the release), then ticks
    /// while leading, until the election ends; a standby keeps `/readyz` true to its token and
    /// to the watches.
    async fn serve(
        &self,
        election: &mut Option<leader::Election>,
        campaign: &dyn Fn() -> leader::Election,
        lease: &str,
    ) {
        let mut token = self.token_accepted(lease).await;
        let mut leading = election.insert(campaign()).leading.clone();
        let mut interval = self.edges.settings.poll_interval;
        let mut was_leader = false;
        loop {
            let leader = *leading.borrow_and_update();
            if leader != was_leader {
                tracing::info!(leader, lease = %lease, "{}", if leader { "this replica leads" } else { "another replica leads" });
                was_leader = leader;
            }
            self.edges.metrics.leader.set(i64::from(leader));
            if !leader {
                if token.is_none() {
                    token = self.check_token().await;
                }
                let ready = token == Some(true) && self.edges.stores.synced();
                self.edges.metrics.ready.store(ready, Ordering::Relaxed);
                // Wake when leadership changes, or at the next tick to keep the metrics fresh.
                // A closed channel is an election that ended (a panicked task): returning
                // ends the process, where waiting on it again would spin.
                let changed = tokio::time::timeout(interval, leading.changed()).await;
                if changed.is_ok_and(|r| r.is_err()) {
                    return;
                }
                continue;
            }
            let started = Instant::now();
            if let Some(server) = self.tick().await {
                // Never more often than Buildkite asks.
                interval = self.edges.settings.poll_interval.max(server);
            }
            let took = started.elapsed();
            self.edges.metrics.tick_seconds.observe(took.as_secs_f64());
            tokio::time::sleep(interval.saturating_sub(took)).await;
        }
    }

    /// Every replica checks the token before it campaigns: one that Buildkite refuses does not,
    /// so that the Lease goes to a replica able to serve the queue, and checks again each poll
    /// interval (unready meanwhile). What the last check found (`None`: no answer).
    async fn token_accepted(&self, lease: &str) -> Option<bool> {
        let mut token = self.check_token().await;
        if token == Some(false) {
            tracing::error!(lease = %lease, "not campaigning for the Lease while Buildkite refuses this replica (the error before this line says why: BUILDKITE_AGENT_TOKEN, or in the stacks mode the stack limit); checking again every poll interval");
        }
        while token == Some(false) {
            tokio::time::sleep(self.edges.settings.poll_interval).await;
            token = self.check_token().await;
        }
        token
    }

    /// One metrics call, or the stack's registration: whether Buildkite accepted the token
    /// (`None`: it did not answer).
    async fn check_token(&self) -> Option<bool> {
        let buildkite = match &self.feed {
            Feed::Metrics(buildkite) => buildkite,
            Feed::Stacks(stack) => return stack.register(&self.edges).await,
        };
        match buildkite.poll().await {
            Ok(_) => Some(true),
            Err(e) => {
                self.poll_failed(&e);
                matches!(e, MetricsError::Unauthorized(_)).then_some(false)
            }
        }
    }

    /// Counts and logs a failed poll; a refused token makes the replica unready.
    fn poll_failed(&self, e: &MetricsError) {
        let error = ApiError {
            api: "buildkite",
            kind: e.name(),
        };
        self.edges.metrics.api_errors.get_or_create(&error).inc();
        if let MetricsError::Unauthorized(_) = e {
            self.edges.metrics.ready.store(false, Ordering::Relaxed);
            tracing::error!(error = e.name(), "{e}");
        } else {
            tracing::warn!(error = e.name(), "{e}");
        }
    }

    /// One tick: observe, decide, act. Returns the poll interval Buildkite asked for.
    async fn tick(&self) -> Option<Duration> {
        match &self.feed {
            Feed::Metrics(buildkite) => self.metrics_tick(buildkite).await,
            Feed::Stacks(stack) => stack.tick(&self.edges, &self.timeouts).await,
        }
    }

    async fn metrics_tick(&self, buildkite: &MetricsClient) -> Option<Duration> {
        if !self.edges.stores.ready().await {
            return None;
        }
        // Handing out a generation needs the claims listed once: none seen is not none ready.
        if let Some(claims) = self.edges.claims {
            if !claims.wait_until_ready().await {
                return None;
            }
        }
        let polled = match buildkite.poll().await {
            Ok(polled) => polled,
            Err(e) => {
                self.poll_failed(&e);
                return match e {
                    MetricsError::Throttled(wait) => Some(wait),
                    _ => None,
                };
            }
        };
        self.edges.metrics.ready.store(true, Ordering::Relaxed);
        let view = self.edges.stores.view();
        let supply = view.supply(Timestamp::now(), self.edges.template.hash(), &self.timeouts);
        let decision = decide(polled.demand, &supply, &self.limits);
        let relief = decide::relieve(&supply.stuck_jobs);
        let act = &self.edges;
        for (job, relief) in relief {
            act.relieve(job, &relief).await;
        }
        let figures = crate::act::figures(&polled.demand, &supply, &decision);
        act.report(&polled.demand, &supply, &decision, &figures);
        act.carry_out(decision, &figures).await;
        polled.poll_duration
    }
}
