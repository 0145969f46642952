//! The claims mode's IO, a task of its own beside the dispatch loop: watches of the mirror's
//! claims, its populate Jobs, its snapshots, and every pod and Job of the namespace (only which
//! claims each names is kept: a claim is in use while a pod names it or an unfinished Job that
//! mounts it can still make a pod, e.g. an evicted agent's index waiting out its backoff); the
//! cycle's own Lease, so that one dispatcher of the namespace runs it, whichever queues the
//! others serve; and each cycle, [`mirror_plan::plan`] on what the watches show, its steps
//! carried out, one log line each. Everything it knows is in labels (`stateless-agent/mirror`, `mirror-generation`,
//! `mirror-state`) and the `stateless-agent/mirror-ready-at` annotation, so a restart in any
//! phase resumes.
//!
//! Why inside job-dispatcher rather than a Deployment of its own: it is the dispatcher that
//! hands a generation out, and the claim it hands out and the ones the cycle expires and deletes
//! are read from the same stores, one process, so a generation cannot be deleted between being
//! chosen and being named by a Job; and it reuses the dispatcher's watches, election and image.

use std::collections::BTreeMap;

use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::Client;

use crate::leader::Election;
use crate::metrics::Metrics;
use crate::mirror_plan::{self, ClaimState, Observed, Policy, Step};
use crate::template::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::watches::watch;

pub const MIRROR_LABEL: &str = "stateless-agent/mirror";
pub const GENERATION_LABEL: &str = "stateless-agent/mirror-generation";
pub const STATE_LABEL: &str = "stateless-agent/mirror-state";
pub const READY_AT: &str = "stateless-agent/mirror-ready-at";

#[derive(Debug, thiserror::Error)]
pub enum TemplatesError {
    #[error("cannot read {what} {path}: {reason}; mount it (a ConfigMap) there or set {variable}")]
    Unreadable {
        what: &'static str,
        path: String,
        reason: String,
        variable: &'static str,
    },
    #[error("the claim template {0} has no name: its name is the generations' prefix")]
    NoName(String),
    #[error("the populate template has no volume {0:?} for a generation's claim; name its mirror volume with DISPATCHER_MIRROR_VOLUME")]
    NoVolume(String),
}

/// The claims mode's settings and templates.
#[derive(Debug, Clone)]
pub struct Cycle {
    /// The claim template's name: claim `<prefix>-<N>`, Job `<prefix>-populate-<N>`.
    pub prefix: String,
    pub claim: PersistentVolumeClaim,
    pub populate: Job,
    /// The populate template's volume that gets the generation's claim.
    pub volume: String,
    pub snapshot_class: Option<String>,
    pub policy: Policy,
    pub interval: Duration,
}

impl Cycle {
    /// Reads and checks the templates.
    pub fn load(settings: &crate::settings::Settings) -> Result<Cycle, TemplatesError> {
        let claim: PersistentVolumeClaim = read_template(
            &settings.claim_template,
            "the claim template",
            "DISPATCHER_CLAIM_TEMPLATE",
        )?;
        let populate: Job = read_template(
            &settings.populate_template,
            "the populate template",
            "DISPATCHER_POPULATE_TEMPLATE",
        )?;
        let prefix =
            claim.metadata.name.clone().ok_or_else(|| {
                TemplatesError::NoName(settings.claim_template.display().to_string())
            })?;
        let volumes = populate
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref());
        let volumes = volumes.and_then(|p| p.volumes.as_ref());
        if !volumes.is_some_and(|v| v.iter().any(|v| v.name == settings.mirror_volume)) {
            return Err(TemplatesError::NoVolume(settings.mirror_volume.clone()));
        }
        Ok(Cycle {
            prefix,
            claim,
            populate,
            volume: settings.mirror_volume.clone(),
            snapshot_class: settings.snapshot_class.clone(),
            policy: Policy {
                refresh: settings.mirror_refresh,
                keep: settings.mirror_keep.into(),
                snapshots: settings.snapshot_class.is_some(),
            },
            interval: settings.poll_interval,
        })
    }

    fn claim_name(&self, generation: u64) -> String {
        format!("{}-{generation}", self.prefix)
    }

    fn job_name(&self, generation: u64) -> String {
        format!("{}-populate-{generation}", self.prefix)
    }

    /// Whether the populate template names the image placeholder.
    pub fn needs_image(&self) -> bool {
        self.populate_pod()
            .is_some_and(crate::template::names_placeholder)
    }

    /// The populate template with `image` in place of the placeholder.
    pub fn fill_image(&mut self, image: &str) {
        let spec = self
            .populate
            .spec
            .as_mut()
            .and_then(|s| s.template.spec.as_mut());
        if let Some(spec) = spec {
            crate::template::fill_image(spec, image);
        }
    }

    fn populate_pod(&self) -> Option<&k8s_openapi::api::core::v1::PodSpec> {
        self.populate.spec.as_ref()?.template.spec.as_ref()
    }

    fn labels(&self, generation: u64) -> BTreeMap<String, String> {
        BTreeMap::from([
            (MIRROR_LABEL.to_string(), self.prefix.clone()),
            (GENERATION_LABEL.to_string(), generation.to_string()),
            (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        ])
    }
}

/// What the dispatcher reads of the cycle: the claims, to hand out the newest ready one.
#[derive(Clone)]
pub struct Claims {
    store: Store<PersistentVolumeClaim>,
}

impl Claims {
    /// Waits for the claims' first listing; false if the watch is gone.
    pub async fn wait_until_ready(&self) -> bool {
        self.store.wait_until_ready().await.is_ok()
    }

    /// The claim new agents mount: the newest ready generation not being deleted.
    pub fn handed_out(&self) -> Option<String> {
        let claims = self.store.state();
        newest_ready(&claims).and_then(|c| c.metadata.name.clone())
    }

    /// When the generation handed out was marked ready: the mirror's last publish.
    pub fn published(&self) -> Option<Timestamp> {
        newest_ready(&self.store.state()).and_then(|c| ready_at(&c.metadata))
    }
}

/// The newest ready generation's claim not being deleted.
fn newest_ready(claims: &[Arc<PersistentVolumeClaim>]) -> Option<&PersistentVolumeClaim> {
    let ready = claims
        .iter()
        .filter(|c| state(c) == Some(ClaimState::Ready) && c.metadata.deletion_timestamp.is_none());
    ready
        .max_by_key(|c| generation(&c.metadata))
        .map(AsRef::as_ref)
}

/// Its `stateless-agent/mirror-ready-at` annotation.
fn ready_at(meta: &ObjectMeta) -> Option<Timestamp> {
    meta.annotations.as_ref()?.get(READY_AT)?.parse().ok()
}

/// The first document of kind `T` in a manifest (`populate-job.yaml` also holds a ConfigMap).
fn read_template<T: serde::de::DeserializeOwned + kube::Resource<DynamicType = ()>>(
    path: &std::path::Path,
    what: &'static str,
    variable: &'static str,
) -> Result<T, TemplatesError> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string());
    let parsed = text.and_then(|text| {
        let kind = T::kind(&());
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = serde_json::Value::deserialize(doc).map_err(|e| e.to_string())?;
            if value["kind"] == kind.as_ref() {
                return serde_json::from_value(value).map_err(|e| e.to_string());
            }
        }
        Err(format!("no {kind} in it"))
    });
    parsed.map_err(|reason| TemplatesError::Unreadable {
        what,
        path: path.display().to_string(),
        reason,
        variable,
    })
}

fn generation(meta: &ObjectMeta) -> Option<u64> {
    meta.labels.as_ref()?.get(GENERATION_LABEL)?.parse().ok()
}

fn state(claim: &PersistentVolumeClaim) -> Option<ClaimState> {
    let labels = claim.metadata.labels.as_ref()?;
    ClaimState::from_label(labels.get(STATE_LABEL)?)
}

fn snapshot_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot");
    ApiResource::from_gvk_with_plural(&gvk, "volumesnapshots")
}

/// The running cycle: the claims the dispatcher hands out, and its election, released on
/// shutdown.
pub struct MirrorCycle {
    pub claims: Claims,
    pub election: Election,
}

/// The cycle's stores.
struct Stores {
    claims: Store<PersistentVolumeClaim>,
    populates: Store<Job>,
    pods: Store<Pod>,
    jobs: Store<Job>,
    snapshots: Option<Store<DynamicObject>>,
}

impl Stores {
    /// The mirror's claims, populate Jobs and snapshots; every pod and Job of the namespace, any
    /// queue's, of which only the claims each names is kept.
    fn start(client: &Client, namespace: &str, cycle: &Cycle, metrics: &Arc<Metrics>) -> Stores {
        let selector = format!("{MIRROR_LABEL}={}", cycle.prefix);
        let ours = || watcher::Config::default().labels(&selector);
        let all = watcher::Config::default;
        let strip_claim = |c: &mut PersistentVolumeClaim| c.metadata.managed_fields = None;
        let strip_populate = |j: &mut Job| {
            if let Some(spec) = j.spec.as_mut() {
                spec.template = Default::default();
            }
            j.metadata.managed_fields = None;
        };
        let resource = snapshot_resource();
        let snapshots = cycle.snapshot_class.as_ref().map(|_| {
            let api = Api::namespaced_with(client.clone(), namespace, &resource);
            let strip = |s: &mut DynamicObject| s.metadata.managed_fields = None;
            let writer = Writer::new(resource.clone());
            watch(
                api,
                ours(),
                metrics.clone(),
                "volumesnapshots",
                strip,
                writer,
            )
        });
        let m = || metrics.clone();
        Stores {
            claims: watch(
                Api::namespaced(client.clone(), namespace),
                ours(),
                m(),
                "persistentvolumeclaims",
                strip_claim,
                Writer::default(),
            ),
            populates: watch(
                Api::namespaced(client.clone(), namespace),
                ours(),
                m(),
                "populate jobs",
                strip_populate,
                Writer::default(),
            ),
            pods: watch(
                Api::namespaced(client.clone(), namespace),
                all(),
                m(),
                "pods (for the claims they name)",
                keep_claim_names,
                Writer::default(),
            ),
            jobs: watch(
                Api::namespaced(client.clone(), namespace),
                all(),
                m(),
                "jobs (for the claims they name)",
                keep_job_claim_names,
                Writer::default(),
            ),
            snapshots,
        }
    }
}

/// Starts the cycle's watches and task, on a Lease of its own.
pub fn start(
    client: &Client,
    namespace: &str,
    identity: String,
    cycle: Cycle,
    metrics: Arc<Metrics>,
) -> MirrorCycle {
    let stores = Stores::start(client, namespace, &cycle, &metrics);
    let lease = format!("{}-mirror-cycle", cycle.prefix);
    let election =
        crate::leader::elect(Api::namespaced(client.clone(), namespace), lease, identity);
    let handle = Claims {
        store: stores.claims.clone(),
    };
    let io = Io {
        claims: Api::namespaced(client.clone(), namespace),
        jobs: Api::namespaced(client.clone(), namespace),
        snapshots: Api::namespaced_with(client.clone(), namespace, &snapshot_resource()),
        metrics,
    };
    tokio::spawn(cycle_loop(cycle, stores, io, election.leading.clone()));
    MirrorCycle {
        claims: handle,
        election,
    }
}

/// Each interval, while leading: observe, plan, carry the steps out.
async fn cycle_loop(
    cycle: Cycle,
    stores: Stores,
    io: Io,
    leading: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::time::sleep(cycle.interval).await;
        let ready = stores.claims.wait_until_ready();
        if !*leading.borrow() || tokio::time::timeout(Duration::ZERO, ready).await.is_err() {
            continue;
        }
        let snapshots = stores
            .snapshots
            .as_ref()
            .map(Store::state)
            .unwrap_or_default();
        let users = Users {
            pods: &stores.pods.state(),
            jobs: &stores.jobs.state(),
        };
        let populates = stores.populates.state();
        let observed = observe(&stores.claims.state(), &populates, &users, &snapshots);
        let steps = mirror_plan::plan(&observed, &cycle.policy);
        if !steps.is_empty() {
            tracing::debug!(?observed, ?steps, "mirror cycle");
        }
        for step in steps {
            io.carry_out(&cycle, step, &populates).await;
        }
    }
}

/// Who may still mount a claim: the namespace's pods, and its Jobs (reduced to claim names).
pub struct Users<'a> {
    pub pods: &'a [Arc<Pod>],
    pub jobs: &'a [Arc<Job>],
}

impl Users<'_> {
    /// Whether a pod object (any phase: pvc-protection counts finished pods too) names claim
    /// `name`, or an unfinished Job that can still make a pod mounting it does.
    fn name(&self, name: &str) -> bool {
        let pods = self.pods.iter().map(|p| p.spec.as_ref());
        let jobs = self.jobs.iter().filter(|j| !crate::observe::finished(j));
        let templates = jobs.map(|j| j.spec.as_ref().and_then(|s| s.template.spec.as_ref()));
        pods.chain(templates).flatten().any(|spec| {
            let volumes = spec.volumes.iter().flatten();
            let mut claims = volumes.filter_map(|v| v.persistent_volume_claim.as_ref());
            claims.any(|c| c.claim_name == name)
        })
    }
}

/// A pod reduced to the names of the claims it mounts.
fn keep_claim_names(pod: &mut Pod) {
    pod.spec = Some(claims_only(pod.spec.as_ref()));
    pod.status = None;
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
}

/// A Job reduced to the names of the claims its pods mount, and its conditions (whether it can
/// still make pods).
fn keep_job_claim_names(job: &mut Job) {
    if let Some(spec) = job.spec.as_mut() {
        let pod = claims_only(spec.template.spec.as_ref());
        spec.template = k8s_openapi::api::core::v1::PodTemplateSpec {
            metadata: None,
            spec: Some(pod),
        };
    }
    if let Some(status) = job.status.as_mut() {
        *status = k8s_openapi::api::batch::v1::JobStatus {
            conditions: status.conditions.take(),
            ..Default::default()
        };
    }
    job.metadata.managed_fields = None;
    job.metadata.annotations = None;
}

/// A pod spec with only its claim volumes.
fn claims_only(
    spec: Option<&k8s_openapi::api::core::v1::PodSpec>,
) -> k8s_openapi::api::core::v1::PodSpec {
    let claims: Vec<_> = spec
        .into_iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter(|v| v.persistent_volume_claim.is_some())
        .map(|v| k8s_openapi::api::core::v1::Volume {
            name: v.name.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: v
                    .persistent_volume_claim
                    .as_ref()
                    .unwrap()
                    .claim_name
                    .clone(),
                read_only: None,
            }),
            ..Default::default()
        })
        .collect();
    k8s_openapi::api::core::v1::PodSpec {
        volumes: Some(claims),
        ..Default::default()
    }
}

/// The cycle's view of the watched objects.
pub fn observe(
    claims: &[Arc<PersistentVolumeClaim>],
    jobs: &[Arc<Job>],
    users: &Users,
    snapshots: &[Arc<DynamicObject>],
) -> Observed {
    let now = Timestamp::now();
    let since = |t: Timestamp| Duration::from_secs((now.as_second() - t.as_second()).max(0) as u64);
    let named = |name: &str| users.name(name);
    Observed {
        claims: claims
            .iter()
            .filter_map(|c| {
                Some(mirror_plan::Claim {
                    generation: generation(&c.metadata)?,
                    state: state(c)?,
                    terminating: c.metadata.deletion_timestamp.is_some(),
                    ready_for: ready_at(&c.metadata).map(since),
                    in_use: named(c.metadata.name.as_deref().unwrap_or("")),
                })
            })
            .collect(),
        jobs: jobs
            .iter()
            .filter_map(|j| {
                let conditions = j.status.as_ref().and_then(|s| s.conditions.as_ref());
                let ended = |kind: &str| {
                    let mut all = conditions.into_iter().flatten();
                    all.find(|c| c.type_ == kind && c.status == "True")
                };
                let (outcome, at) = match (ended("Complete"), ended("Failed")) {
                    (Some(c), _) => (Some(true), c.last_transition_time.as_ref()),
                    (_, Some(c)) => (Some(false), c.last_transition_time.as_ref()),
                    _ => (None, None),
                };
                Some(mirror_plan::PopulateJob {
                    generation: generation(&j.metadata)?,
                    outcome,
                    ended_for: at.map(|t| since(t.0)),
                })
            })
            .collect(),
        snapshots: snapshots
            .iter()
            .filter_map(|s| {
                Some(mirror_plan::Snapshot {
                    generation: generation(&s.metadata)?,
                    ready: s.data["status"]["readyToUse"] == serde_json::json!(true),
                    failed: s.data["status"]["error"].is_object(),
                })
            })
            .collect(),
    }
}

/// The API calls a step makes.
struct Io {
    claims: Api<PersistentVolumeClaim>,
    jobs: Api<Job>,
    snapshots: Api<DynamicObject>,
    metrics: Arc<Metrics>,
}

impl Io {
    async fn carry_out(&self, cycle: &Cycle, step: Step, populates: &[Arc<Job>]) {
        let result = match step {
            Step::Snapshot(g) => self.snapshot(cycle, g).await,
            Step::CreateClaim { generation, from } => self.claim(cycle, generation, from).await,
            Step::Populate(g) => self.populate(cycle, g).await,
            Step::MarkReady(g) => {
                let now = Timestamp::now().to_string();
                self.label(cycle, g, ClaimState::Ready, Some(now)).await
            }
            Step::MarkExpired(g) => self.label(cycle, g, ClaimState::Expired, None).await,
            Step::DeleteClaim(g) => {
                let params = DeleteParams::default();
                gone_is_fine(self.claims.delete(&cycle.claim_name(g), &params).await)
            }
            Step::DeletePopulate(g) => {
                let params = DeleteParams::background();
                gone_is_fine(self.jobs.delete(&cycle.job_name(g), &params).await)
            }
            Step::DeleteSnapshot(g) => {
                let params = DeleteParams::default();
                gone_is_fine(self.snapshots.delete(&cycle.claim_name(g), &params).await)
            }
        };
        let ended = populate_end(populates, step);
        match result {
            Ok(()) if matches!((step, &ended), (Step::DeleteClaim(_), Some(End::Failed(_)))) => {
                tracing::warn!(mirror_step = ?step, "mirror cycle: {}", describe(cycle, step, ended.as_ref()))
            }
            Ok(()) => {
                tracing::info!(mirror_step = ?step, "mirror cycle: {}", describe(cycle, step, ended.as_ref()))
            }
            Err(e) => {
                self.metrics.kubernetes_error(&e);
                tracing::warn!(mirror_step = ?step, "mirror cycle: {} failed: {e}; the next cycle decides again", describe(cycle, step, ended.as_ref()));
            }
        }
    }

    async fn snapshot(&self, cycle: &Cycle, generation: u64) -> Result<(), kube::Error> {
        let mut snapshot = DynamicObject::new(&cycle.claim_name(generation), &snapshot_resource());
        snapshot.metadata.labels = Some(cycle.labels(generation));
        snapshot.data = serde_json::json!({"spec": {
            "volumeSnapshotClassName": cycle.snapshot_class,
            "source": {"persistentVolumeClaimName": cycle.claim_name(generation)}}});
        self.snapshots
            .create(&PostParams::default(), &snapshot)
            .await
            .map(drop)
    }

    async fn claim(
        &self,
        cycle: &Cycle,
        generation: u64,
        from: Option<u64>,
    ) -> Result<(), kube::Error> {
        let mut claim = cycle.claim.clone();
        let mut labels = cycle.labels(generation);
        labels.insert(STATE_LABEL.into(), ClaimState::Populating.label().into());
        claim.metadata = ObjectMeta {
            name: Some(cycle.claim_name(generation)),
            labels: Some(labels),
            annotations: claim.metadata.annotations.clone(),
            ..ObjectMeta::default()
        };
        claim.status = None;
        let spec = claim.spec.get_or_insert_default();
        spec.volume_name = None;
        spec.data_source = from.map(
            |base| k8s_openapi::api::core::v1::TypedLocalObjectReference {
                api_group: Some("snapshot.storage.k8s.io".into()),
                kind: "VolumeSnapshot".into(),
                name: cycle.claim_name(base),
            },
        );
        spec.data_source_ref = None;
        self.claims
            .create(&PostParams::default(), &claim)
            .await
            .map(drop)
    }

    async fn populate(&self, cycle: &Cycle, generation: u64) -> Result<(), kube::Error> {
        let mut job = cycle.populate.clone();
        let labels = cycle.labels(generation);
        job.metadata = ObjectMeta {
            name: Some(cycle.job_name(generation)),
            labels: Some(labels.clone()),
            annotations: job.metadata.annotations.clone(),
            ..ObjectMeta::default()
        };
        job.status = None;
        let spec = job.spec.get_or_insert_default();
        spec.selector = None;
        spec.manual_selector = None;
        let pod_meta = spec.template.metadata.get_or_insert_default();
        pod_meta.labels.get_or_insert_default().extend(labels);
        let volumes = spec.template.spec.as_mut().and_then(|p| p.volumes.as_mut());
        for volume in volumes
            .into_iter()
            .flatten()
            .filter(|v| v.name == cycle.volume)
        {
            *volume = k8s_openapi::api::core::v1::Volume {
                name: cycle.volume.clone(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: cycle.claim_name(generation),
                    read_only: Some(false),
                }),
                ..Default::default()
            };
        }
        self.jobs
            .create(&PostParams::default(), &job)
            .await
            .map(drop)
    }

    async fn label(
        &self,
        cycle: &Cycle,
        generation: u64,
        to: ClaimState,
        ready_at: Option<String>,
    ) -> Result<(), kube::Error> {
        let mut patch = serde_json::json!({"metadata": {"labels": {STATE_LABEL: to.label()}}});
        if let Some(at) = ready_at {
            patch["metadata"]["annotations"] = serde_json::json!({READY_AT: at});
        }
        let name = cycle.claim_name(generation);
        let params = PatchParams::default();
        self.claims
            .patch(&name, &params, &Patch::Merge(&patch))
            .await
            .map(drop)
    }
}

/// A delete of what is already gone did its job.
fn gone_is_fine<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => other.map(drop),
    }
}

/// How a generation's populate Job ended.
enum End {
    Complete,
    /// Its `Failed` condition's reason and message.
    Failed(String),
}

/// How the populate Job of the generation `step` is about ended, if it has.
fn populate_end(populates: &[Arc<Job>], step: Step) -> Option<End> {
    let g = match step {
        Step::DeleteClaim(g) | Step::DeletePopulate(g) => g,
        _ => return None,
    };
    let job = populates
        .iter()
        .find(|j| generation(&j.metadata) == Some(g))?;
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    let ended = |kind: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == kind && c.status == "True")
    };
    if ended("Complete").is_some() {
        return Some(End::Complete);
    }
    let failed = ended("Failed")?;
    let reason = failed.reason.as_deref().unwrap_or("Failed");
    Some(End::Failed(format!(
        "{reason}: {}",
        failed.message.as_deref().unwrap_or("")
    )))
}

fn describe(cycle: &Cycle, step: Step, ended: Option<&End>) -> String {
    match step {
        Step::Snapshot(g) => format!(
            "snapshot {} of claim {}, to seed the next generation",
            cycle.claim_name(g),
            cycle.claim_name(g)
        ),
        Step::CreateClaim {
            generation,
            from: Some(base),
        } => format!(
            "claim {} created from the snapshot of generation {base}",
            cycle.claim_name(generation)
        ),
        Step::CreateClaim {
            generation,
            from: None,
        } => format!("claim {} created empty", cycle.claim_name(generation)),
        Step::Populate(g) => format!(
            "Job {} populates claim {}",
            cycle.job_name(g),
            cycle.claim_name(g)
        ),
        Step::MarkReady(g) => format!(
            "generation {g} is ready: new agents mount claim {}",
            cycle.claim_name(g)
        ),
        Step::MarkExpired(g) => format!(
            "generation {g} expired: deleted once no pod names claim {}",
            cycle.claim_name(g)
        ),
        Step::DeleteClaim(g) => match ended {
            Some(End::Failed(why)) => format!(
                "generation {g}'s populate Job {} failed ({why}); claim {} deleted, and the next attempt waits DISPATCHER_MIRROR_REFRESH; see the Job's pod log",
                cycle.job_name(g),
                cycle.claim_name(g)
            ),
            _ => format!("claim {} deleted", cycle.claim_name(g)),
        },
        Step::DeletePopulate(g) => match ended {
            Some(End::Complete) => format!(
                "generation {g}'s populate Job {} deleted: it succeeded and the generation is published",
                cycle.job_name(g)
            ),
            Some(End::Failed(why)) => format!(
                "generation {g}'s populate Job {} deleted: it failed ({why}) and no longer holds the next attempt back",
                cycle.job_name(g)
            ),
            None => format!(
                "generation {g}'s populate Job {} deleted: its claim is gone (a restart left it)",
                cycle.job_name(g)
            ),
        },
        Step::DeleteSnapshot(g) => format!("snapshot {} deleted", cycle.claim_name(g)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::json;

    fn job(claim: &str, conditions: serde_json::Value) -> Arc<Job> {
        let mut job: Job = serde_json::from_value(json!({
            "metadata": {"name": "j"},
            "spec": {"template": {"spec": {"containers": [], "volumes": [
                {"name": "git-mirrors", "persistentVolumeClaim": {"claimName": claim}}]}}},
            "status": {"conditions": conditions, "active": 3},
        }))
        .unwrap();
        keep_job_claim_names(&mut job);
        Arc::new(job)
    }

    /// An evicted agent's index waits out its backoff with no pod object: its unfinished Job
    /// still names the claim, so the claim is in use; a finished Job makes no more pods.
    #[test]
    fn a_claim_is_in_use_while_a_pod_or_an_unfinished_job_names_it() {
        let unfinished = [job("m-1", json!([]))];
        let users = Users {
            pods: &[],
            jobs: &unfinished,
        };
        assert!(users.name("m-1"));
        assert!(!users.name("m-2"));
        let done = json!([{"type": "Complete", "status": "True"}]);
        let finished = [job("m-1", done)];
        let users = Users {
            pods: &[],
            jobs: &finished,
        };
        assert!(!users.name("m-1"));
        let mut pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"},
            "spec": {"containers": [], "volumes": [
                {"name": "git-mirrors", "persistentVolumeClaim": {"claimName": "m-1"}}]}}))
        .unwrap();
        keep_claim_names(&mut pod);
        let pods = [Arc::new(pod)];
        let users = Users {
            pods: &pods,
            jobs: &finished,
        };
        assert!(users.name("m-1"));
    }

    fn claim(generation: u64, state: &str, ready_at: &str) -> PersistentVolumeClaim {
        let claim = serde_json::from_value(json!({"metadata": {
            "name": format!("m-{generation}"),
            "labels": {GENERATION_LABEL: generation.to_string(), STATE_LABEL: state},
            "annotations": {READY_AT: ready_at}}}));
        claim.unwrap()
    }

    /// The mirror was last published when the generation handed out became ready: neither an
    /// older one, nor one still populating, nor one being deleted.
    #[test]
    fn the_mirror_was_published_when_the_generation_handed_out_became_ready() {
        let mut writer = Writer::default();
        let claims = Claims {
            store: writer.as_reader(),
        };
        let mut seen = |claim| writer.apply_watcher_event(&watcher::Event::Apply(claim));
        seen(claim(3, "populating", ""));
        assert_eq!(claims.published(), None);
        seen(claim(1, "ready", "2026-11-30T09:00:00Z"));
        let handed_out = claim(2, "ready", "2026-11-30T09:15:00Z");
        seen(handed_out.clone());
        assert_eq!(claims.handed_out().as_deref(), Some("m-2"));
        assert_eq!(claims.published(), "2026-11-30T09:15:00Z".parse().ok());
        let mut deleted = handed_out;
        deleted.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        seen(deleted);
        assert_eq!(claims.published(), "2026-11-30T09:00:00Z".parse().ok());
    }
}
