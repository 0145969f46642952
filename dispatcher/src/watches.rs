//! The dispatcher's view of Kubernetes: watches feeding reflector stores, so that a tick reads
//! memory and never lists. Each store keeps only what is read: a pod's spec and a Job's pod
//! template are most of their size, and a large queue holds thousands of pods.

use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;

use crate::metrics::{ApiError, Metrics, PublishedSource};
use crate::observe::{self, Observed};
use crate::settings::MirrorMode;
use crate::template::{MANAGED_BY, MANAGED_BY_LABEL, QUEUE_LABEL};

/// The dispatch loop's stores.
pub struct Stores {
    pods: Store<Pod>,
    jobs: Store<Job>,
    refusals: Store<Event>,
    own_events: Store<Event>,
    pod_warnings: Store<Event>,
}

/// One tick's copy of the stores.
pub struct View {
    pods: Vec<Arc<Pod>>,
    jobs: Vec<Arc<Job>>,
    refusals: Vec<Arc<Event>>,
    own_events: Vec<Arc<Event>>,
    pod_warnings: Vec<Arc<Event>>,
}

impl Stores {
    /// Starts the watches of `queue`'s pods and Jobs, the namespace's `FailedCreate` Events and
    /// Warning Events on pods (what the kubelet says of a volume that does not mount), and the
    /// dispatcher's own Events for the queue (the stuck pods' backoff, read back after a
    /// restart).
    pub fn start(client: &Client, namespace: &str, queue: &str, metrics: &Arc<Metrics>) -> Stores {
        let ours = format!("{QUEUE_LABEL}={queue},{MANAGED_BY_LABEL}={MANAGED_BY}");
        let events = |config: watcher::Config, what| {
            let api = Api::namespaced(client.clone(), namespace);
            watch(
                api,
                config,
                metrics.clone(),
                what,
                strip_event,
                Default::default(),
            )
        };
        let pods = Api::namespaced(client.clone(), namespace);
        let jobs = Api::namespaced(client.clone(), namespace);
        Stores {
            pods: watch(
                pods,
                labels(&ours),
                metrics.clone(),
                "pods",
                strip_pod,
                Default::default(),
            ),
            jobs: watch(
                jobs,
                labels(&ours),
                metrics.clone(),
                "jobs",
                strip_job,
                Default::default(),
            ),
            refusals: events(fields("reason=FailedCreate"), "events"),
            own_events: events(labels(&ours), "events"),
            pod_warnings: events(fields("involvedObject.kind=Pod,type=Warning"), "events"),
        }
    }

    /// Waits for every store's first listing; false if a watch is gone. Until then the supply
    /// cannot be seen, and none seen is not none there.
    pub async fn ready(&self) -> bool {
        self.pods.wait_until_ready().await.is_ok()
            && self.jobs.wait_until_ready().await.is_ok()
            && self.refusals.wait_until_ready().await.is_ok()
            && self.own_events.wait_until_ready().await.is_ok()
            && self.pod_warnings.wait_until_ready().await.is_ok()
    }

    /// Whether every store has listed once, without waiting.
    pub fn synced(&self) -> bool {
        futures_util::FutureExt::now_or_never(self.ready()).unwrap_or(false)
    }

    pub fn view(&self) -> View {
        View {
            pods: self.pods.state(),
            jobs: self.jobs.state(),
            refusals: self.refusals.state(),
            own_events: self.own_events.state(),
            pod_warnings: self.pod_warnings.state(),
        }
    }

    /// Waits (5 s at most) for the watch to bring the Jobs just created, so that the next tick
    /// counts them.
    pub async fn wait_for_jobs(&self, names: &[&str]) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let seen = |name: &&str| {
            let jobs = self.jobs.state();
            jobs.iter()
                .any(|j| j.metadata.name.as_deref() == Some(*name))
        };
        while std::time::Instant::now() < deadline && !names.iter().all(seen) {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

impl View {
    /// The copy as the observation's input, at `now`, for the template `template`.
    pub fn supply(
        &self,
        now: Timestamp,
        template: &str,
        timeouts: &observe::Timeouts,
    ) -> crate::decide::Supply {
        self.observed(now, template, |seen| observe::supply(seen, timeouts))
    }

    /// The stacks mode's Jobs, streak and refusal.
    pub fn stacks(
        &self,
        now: Timestamp,
        template: &str,
        timeouts: &observe::Timeouts,
    ) -> crate::stacks_observe::StackSeen {
        self.observed(now, template, |seen| {
            crate::stacks_observe::observe(seen, timeouts)
        })
    }

    /// What Warning Events say of the pod `name`, newest last.
    pub fn pod_warnings(&self, name: &str) -> Vec<String> {
        let mut told: Vec<&Event> = self
            .pod_warnings
            .iter()
            .map(AsRef::as_ref)
            .filter(|e| !name.is_empty() && e.involved_object.name.as_deref() == Some(name))
            .collect();
        told.sort_by_key(|e| observe::event_time(e));
        told.iter()
            .rev()
            .take(5)
            .rev()
            .map(|e| {
                let reason = e.reason.as_deref().unwrap_or("");
                format!("{reason}: {}", e.message.as_deref().unwrap_or(""))
            })
            .collect()
    }

    fn observed<R>(&self, now: Timestamp, template: &str, read: impl FnOnce(&Observed) -> R) -> R {
        fn refs(v: &[Arc<Event>]) -> Vec<&Event> {
            v.iter().map(AsRef::as_ref).collect()
        }
        let pods: Vec<&Pod> = self.pods.iter().map(AsRef::as_ref).collect();
        let jobs: Vec<&Job> = self.jobs.iter().map(AsRef::as_ref).collect();
        let (refusals, own_events, pod_warnings) = (
            refs(&self.refusals),
            refs(&self.own_events),
            refs(&self.pod_warnings),
        );
        let seen = Observed {
            pods: &pods,
            jobs: &jobs,
            refusals: &refusals,
            own_events: &own_events,
            pod_warnings: &pod_warnings,
            now,
            template,
        };
        read(&seen)
    }
}

/// The shared mirror's populate Jobs (the CronJob's and the first one): the label of their pods,
/// which the API server copies onto a Job that has no labels of its own (`SetDefaults_Job`,
/// `pkg/apis/batch/v1/defaults.go`), as a CronJob's Jobs have none.
const POPULATE_SELECTOR: &str = "app.kubernetes.io/component=populate-mirror";

/// Gives the metrics where the mirror's last publish is seen: in `shared` mode the populate Jobs
/// that succeeded ([`observe::refreshed_at`]; a watch of their own), in `claims` mode the
/// generation handed out. In `node-local` mode each node's DaemonSet pod refreshes its own
/// directory, out of the dispatcher's sight: nothing.
/// The claims cycle's own `claims` source comes from run.rs, which starts it.
pub fn watch_mirror(
    mode: MirrorMode,
    claims: Option<PublishedSource>,
    client: &Client,
    namespace: &str,
    metrics: &Arc<Metrics>,
) {
    let source: PublishedSource = match (mode, claims) {
        (MirrorMode::Claims, Some(claims)) => claims,
        (MirrorMode::Shared, _) => {
            let api = Api::namespaced(client.clone(), namespace);
            let config = labels(POPULATE_SELECTOR);
            let what = "populate jobs";
            let jobs = watch(
                api,
                config,
                metrics.clone(),
                what,
                strip_job,
                Default::default(),
            );
            Box::new(move || observe::refreshed_at(jobs.state().iter().map(AsRef::as_ref)))
        }
        _ => return,
    };
    metrics.watch_mirror(source);
}

fn labels(selector: &str) -> watcher::Config {
    watcher::Config::default().labels(selector)
}

fn fields(selector: &str) -> watcher::Config {
    watcher::Config::default().fields(selector)
}

/// A pod as `observe` reads it: metadata, phase, conditions, container states (the wrapper's
/// report cut to its message).
fn strip_pod(pod: &mut Pod) {
    // The node, for the stacks mode's timeline.
    let node = pod.spec.take().and_then(|s| s.node_name);
    pod.spec = node.map(|node| k8s_openapi::api::core::v1::PodSpec {
        node_name: Some(node),
        ..Default::default()
    });
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
}

fn strip_job(job: &mut Job) {
    if let Some(spec) = job.spec.as_mut() {
        spec.template = Default::default();
    }
    job.metadata.managed_fields = None;
    // The stacks mode's memory (its reservation, its timeline) stays.
    if let Some(annotations) = job.metadata.annotations.as_mut() {
        annotations.retain(|key, _| key.starts_with("stateless-agent/"));
    }
}

fn strip_event(event: &mut Event) {
    event.metadata.managed_fields = None;
}

/// A watched kind mirrored into a store, `strip`ped of what is never read; watch errors (410 Gone
/// included) are retried with backoff by the watcher and counted.
pub fn watch<K>(
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
                let error = ApiError {
                    api: "kubernetes",
                    kind: "watch",
                };
                metrics.api_errors.get_or_create(&error).inc();
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
