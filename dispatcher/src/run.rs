//! The dispatcher's edges and its loop: Kubernetes through watches feeding reflector stores
//! (reads never list each tick), Buildkite through the metrics API, a Lease for the leader, and
//! one decision a tick ([`crate::decide`]) logged as one JSON line with its dispatch ID and
//! figures. Nothing is remembered between ticks that Kubernetes does not hold: a restarted or
//! newly elected dispatcher sees every earlier dispatch in the watched Jobs and pods.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;

use crate::buildkite::{MetricsClient, MetricsError};
use crate::decide::{decide, Action, Limits};
use crate::metrics::{ApiError, Metrics, Reason, State};
use crate::mirror_run;
use crate::observe;
use crate::settings::{MirrorMode, Settings};
use crate::template::{Dispatch, Template, MANAGED_BY, MANAGED_BY_LABEL, QUEUE_LABEL};

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
}

impl RunError {
    /// Whether the user must fix something (exit 78), as opposed to the environment failing.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            RunError::TemplateFile { .. } | RunError::Template(_) | RunError::MirrorTemplates(_)
        )
    }
}

/// Runs until the process is stopped.
pub async fn run(settings: Settings) -> Result<(), RunError> {
    let yaml =
        std::fs::read_to_string(&settings.template).map_err(|source| RunError::TemplateFile {
            path: settings.template.display().to_string(),
            source,
        })?;
    let template = Template::parse(&yaml, &settings.queue, &settings.mirror())?;
    let cycle = match settings.mirror_mode {
        MirrorMode::Claims => Some(mirror_run::Cycle::load(&settings)?),
        _ => None,
    };
    let client = Client::try_default()
        .await
        .map_err(|e| RunError::Kubernetes(e.to_string()))?;
    let namespace = settings
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let metrics = Metrics::new();
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: settings.listen,
            source,
        })?;
    tokio::spawn(crate::metrics::serve(listener, metrics.clone()));

    let selector = format!(
        "{QUEUE_LABEL}={},{MANAGED_BY_LABEL}={MANAGED_BY}",
        settings.queue
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace);
    let events: Api<Event> = Api::namespaced(client.clone(), &namespace);
    // The stores keep only what `observe` reads: a pod's spec and a Job's pod template are most
    // of their size, and a large queue holds thousands of pods.
    let pod_store = watch(
        pods,
        watcher::Config::default().labels(&selector),
        metrics.clone(),
        "pods",
        |pod: &mut Pod| {
            pod.spec = None;
            pod.metadata.managed_fields = None;
            pod.metadata.annotations = None;
            let statuses = pod
                .status
                .as_mut()
                .and_then(|s| s.container_statuses.as_mut());
            for status in statuses.into_iter().flatten() {
                let terminated = status.state.as_mut().and_then(|s| s.terminated.as_mut());
                if let Some(message) = terminated.and_then(|t| t.message.as_mut()) {
                    *message = observe::brief(message);
                }
            }
        },
        reflector::store::Writer::default(),
    );
    let job_store = watch(
        jobs.clone(),
        watcher::Config::default().labels(&selector),
        metrics.clone(),
        "jobs",
        |job: &mut Job| {
            if let Some(spec) = job.spec.as_mut() {
                spec.template = Default::default();
            }
            job.metadata.managed_fields = None;
            job.metadata.annotations = None;
        },
        reflector::store::Writer::default(),
    );
    let event_store = watch(
        events.clone(),
        watcher::Config::default().fields("reason=FailedCreate"),
        metrics.clone(),
        "events",
        |event: &mut Event| event.metadata.managed_fields = None,
        reflector::store::Writer::default(),
    );

    let lease = settings
        .lease
        .clone()
        .unwrap_or_else(|| format!("job-dispatcher-{}", settings.queue));
    let identity = settings
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| random_id()[..12].to_string());
    let mut leading = crate::leader::elect(
        Api::namespaced(client.clone(), &namespace),
        lease.clone(),
        identity.clone(),
    );
    let mirror = match cycle {
        Some(cycle) => {
            let client = client.clone();
            let metrics = metrics.clone();
            Some(mirror_run::start(
                client,
                &namespace,
                identity.clone(),
                cycle,
                metrics,
            ))
        }
        None => None,
    };

    let buildkite = MetricsClient::new(&settings.endpoint, &settings.token, &settings.queue);
    let limits = Limits {
        min_agents: settings.min_agents,
        max_agents: settings.max_agents,
        buffer: settings.buffer,
        buffer_ratio: settings.buffer_ratio,
        rollout_ratio: settings.rollout_ratio,
        rollout_timeout: settings.start_deadline,
    };
    tracing::info!(
        queue = %settings.queue,
        namespace = %namespace,
        identity = %identity,
        "serving queue {} in namespace {namespace}",
        settings.queue
    );
    let mut interval = settings.poll_interval;
    let mut was_leader = false;
    loop {
        let leader = *leading.borrow_and_update();
        if leader != was_leader {
            tracing::info!(leader, lease = %lease, "{}", if leader { "this replica leads" } else { "another replica leads" });
            was_leader = leader;
        }
        metrics.leader.set(i64::from(leader));
        if !leader {
            // Wake when leadership changes, or at the next tick to keep the metrics fresh.
            let _ = tokio::time::timeout(interval, leading.changed()).await;
            continue;
        }
        let started = Instant::now();
        let wait = tick(
            &settings,
            &template,
            mirror.as_ref(),
            &buildkite,
            &limits,
            &jobs,
            &events,
            &pod_store,
            &job_store,
            &event_store,
            &metrics,
        )
        .await;
        metrics
            .tick_seconds
            .observe(started.elapsed().as_secs_f64());
        if let Some(server) = wait {
            // Never more often than Buildkite asks.
            interval = settings.poll_interval.max(server);
        }
        tokio::time::sleep(interval.saturating_sub(started.elapsed())).await;
    }
}

/// A watched kind mirrored into a store, `strip`ped of what is never read; watch errors (410 Gone
/// included) are retried with backoff by the watcher and counted.
pub(crate) fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    metrics: Arc<Metrics>,
    what: &'static str,
    strip: fn(&mut K),
    writer: reflector::store::Writer<K>,
) -> Store<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let store = writer.as_reader();
    let stream = watcher(api, config)
        .default_backoff()
        .modify(strip)
        .reflect(writer)
        .applied_objects();
    tokio::spawn(async move {
        futures_util::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            if let Err(e) = item {
                metrics
                    .api_errors
                    .get_or_create(&ApiError {
                        api: "kubernetes",
                        kind: "watch",
                    })
                    .inc();
                if forbidden(&e) {
                    tracing::warn!(
                        kind = what,
                        "watching {what} is forbidden: {e}; grant the dispatcher's ServiceAccount \
                         list and watch on {what} (image/k8s/dispatcher/rbac.yaml); retrying"
                    );
                } else {
                    tracing::warn!(kind = what, "watching {what} failed: {e}; retrying");
                }
            }
        }
    });
    store
}

/// Whether the API server refused a watch's list or watch for lack of RBAC: retrying alone will
/// not mend it, so the log says what will.
fn forbidden(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.is_forbidden(),
        watcher::Error::WatchError(status) => status.is_forbidden(),
        _ => false,
    }
}

/// One tick: demand, supply, decision, action. Returns the poll interval Buildkite asked for.
#[allow(clippy::too_many_arguments)]
async fn tick(
    settings: &Settings,
    template: &Template,
    mirror: Option<&mirror_run::Claims>,
    buildkite: &MetricsClient,
    limits: &Limits,
    jobs: &Api<Job>,
    events: &Api<Event>,
    pod_store: &Store<Pod>,
    job_store: &Store<Job>,
    event_store: &Store<Event>,
    metrics: &Metrics,
) -> Option<Duration> {
    for store in [
        pod_store.wait_until_ready().await.is_ok(),
        job_store.wait_until_ready().await.is_ok(),
        event_store.wait_until_ready().await.is_ok(),
    ] {
        if !store {
            return None;
        }
    }
    // Handing out a generation needs the claims listed once: none seen is not none ready.
    if let Some(claims) = mirror {
        if !claims.wait_until_ready().await {
            return None;
        }
    }
    let polled = match buildkite.poll().await {
        Ok(polled) => polled,
        Err(e) => {
            metrics
                .api_errors
                .get_or_create(&ApiError {
                    api: "buildkite",
                    kind: e.name(),
                })
                .inc();
            if let MetricsError::Unauthorized(_) = e {
                metrics.ready.store(false, Ordering::Relaxed);
            }
            tracing::warn!(error = e.name(), "{e}");
            return match e {
                MetricsError::Throttled(wait) => Some(wait),
                _ => None,
            };
        }
    };
    metrics.ready.store(true, Ordering::Relaxed);
    let demand = polled.demand;
    let pods = pod_store.state();
    let job_list = job_store.state();
    let event_list = event_store.state();
    let supply = observe::supply(
        &pods.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
        &job_list.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
        &event_list.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
        Timestamp::now(),
        settings.start_deadline,
    );
    metrics
        .demand
        .get_or_create(&State { state: "scheduled" })
        .set(i64::from(demand.scheduled));
    metrics
        .demand
        .get_or_create(&State { state: "running" })
        .set(i64::from(demand.running));
    metrics.agents.set(i64::from(demand.agents));
    for (state, n) in [
        ("pending", supply.pending),
        ("unschedulable", supply.unschedulable),
        ("running", supply.running),
        ("not-yet-created", supply.not_yet_created),
    ] {
        metrics
            .supply
            .get_or_create(&State { state })
            .set(i64::from(n));
    }
    let decision = decide(demand, &supply, limits);
    for reason in ["unschedulable", "failed-create", "wrong-queue", "failing"] {
        let on = matches!(&decision.action, crate::decide::Action::Hold(h) if h.name() == reason);
        metrics
            .blocked
            .get_or_create(&Reason { reason })
            .set(i64::from(on));
    }
    let figures = format!(
        "scheduled={} running={} agents={} pending={} unschedulable={} running_pods={} not_yet_created={} wanted={} alive={}",
        demand.scheduled, demand.running, demand.agents, supply.pending, supply.unschedulable,
        supply.running, supply.not_yet_created, decision.wanted, decision.alive
    );
    match decision.action {
        Action::Hold(hold) => {
            metrics
                .holds
                .get_or_create(&Reason {
                    reason: hold.name(),
                })
                .inc();
            if hold.is_fault() {
                tracing::warn!(decision = "hold", reason = hold.name(), figures = %figures, "not dispatching: {}", describe(&hold));
            } else {
                tracing::info!(decision = "hold", reason = hold.name(), figures = %figures, "not dispatching: {}", describe(&hold));
            }
        }
        Action::Dispatch(agents) => {
            let dispatch = Dispatch {
                id: random_id(),
                agents,
                active_deadline: settings.job_deadline,
                ttl: settings.job_ttl,
                idle_timeout: settings.idle_timeout,
                mirror_claim: mirror.and_then(|m| m.handed_out()),
            };
            let job = template.job(&dispatch);
            match jobs.create(&PostParams::default(), &job).await {
                Ok(created) => {
                    metrics.dispatches.inc();
                    metrics.pods_created.inc_by(u64::from(agents));
                    let name = created.metadata.name.clone().unwrap_or_default();
                    let mirror_claim = dispatch.mirror_claim.as_deref().unwrap_or("");
                    tracing::info!(decision = "dispatch", dispatch_id = %dispatch.id, agents, job = %name, mirror_claim, figures = %figures, "dispatched {agents} agents as Job {name}");
                    record_event(events, &created, &dispatch, &settings.queue).await;
                    // The next tick must see this Job: wait (briefly) for the watch to bring it.
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while Instant::now() < deadline
                        && !job_store
                            .state()
                            .iter()
                            .any(|j| j.metadata.name.as_deref() == Some(name.as_str()))
                    {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                Err(e) => {
                    let kind = match &e {
                        kube::Error::Api(status) if status.code == 409 => "conflict",
                        kube::Error::Api(status) if status.code == 429 => "throttled",
                        kube::Error::Api(status) if status.code >= 500 => "server",
                        _ => "other",
                    };
                    metrics
                        .api_errors
                        .get_or_create(&ApiError {
                            api: "kubernetes",
                            kind,
                        })
                        .inc();
                    tracing::warn!(decision = "dispatch-failed", dispatch_id = %dispatch.id, agents, figures = %figures, "creating the Job for {agents} agents failed: {e}; the next tick decides again");
                }
            }
        }
    }
    polled.poll_duration
}

fn describe(hold: &crate::decide::Hold) -> String {
    use crate::decide::Hold;
    match hold {
        Hold::Enough => "enough agents are alive or coming".into(),
        Hold::AtMax => "DISPATCHER_MAX_AGENTS agent pods are not finished".into(),
        Hold::RollingOut { id, online, size } => format!("dispatch {id} has {online} of {size} pods online; waiting for it to roll out"),
        Hold::Unschedulable { pods } => format!("{pods} agent pods cannot be scheduled; add capacity or lower DISPATCHER_MAX_AGENTS"),
        Hold::FailedCreate { message } => format!("Kubernetes refuses this queue's pods ({message}); raise the quota or lower DISPATCHER_MAX_AGENTS"),
        Hold::Failing { why } => format!("the last dispatch's agents fail before taking a job: {why}; fix what they report, and the next dispatch is tried DISPATCHER_START_DEADLINE after that failure"),
        Hold::WrongQueue { running, agents } => format!("{running} agent pods have run past DISPATCHER_START_DEADLINE but the queue has {agents} agents: the template's agents register in another queue or cannot connect; check BUILDKITE_AGENT_TAGS and the token"),
    }
}

/// A Kubernetes Event on the Job: who made it, for which queue and dispatch.
async fn record_event(events: &Api<Event>, job: &Job, dispatch: &Dispatch, queue: &str) {
    let now = Timestamp::now();
    let event = Event {
        metadata: ObjectMeta {
            generate_name: Some(format!(
                "{}.",
                job.metadata.name.clone().unwrap_or_default()
            )),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some("batch/v1".into()),
            kind: Some("Job".into()),
            name: job.metadata.name.clone(),
            namespace: job.metadata.namespace.clone(),
            uid: job.metadata.uid.clone(),
            ..ObjectReference::default()
        },
        reason: Some("Dispatched".into()),
        message: Some(format!(
            "{} agents for queue {queue} (dispatch {})",
            dispatch.agents, dispatch.id
        )),
        type_: Some("Normal".into()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        reporting_component: Some("job-dispatcher".into()),
        reporting_instance: Some(dispatch.id.clone()),
        action: Some("Dispatch".into()),
        count: Some(1),
        ..Event::default()
    };
    if let Err(e) = events.create(&PostParams::default(), &event).await {
        tracing::debug!("could not record an Event on the Job: {e}");
    }
}

/// 32 hex digits, as Sourcegraph's dispatch IDs (a UUID without dashes).
fn random_id() -> String {
    let mut bytes = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = nanos.to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
