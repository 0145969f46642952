//! The stacks mode's tick: observe (the watches, the queue's first page of scheduled jobs, the
//! states of the jobs that have Jobs), decide ([`crate::stacks_plan::plan`]), act (Buildkite's
//! calls and the Jobs). Every call's outcome is read back on the next tick, from Buildkite's
//! states and the watched Jobs, so a failed one is logged, counted and tried again then.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams, PostParams};

use crate::act::{remedy, Edges};
use crate::decide::{Relief, StuckJob};
use crate::metrics::{ApiError, Reason, State};
use crate::observe::Timeouts;
use crate::stacks_api::{Listing, StacksClient, StacksError, BATCH};
use crate::stacks_observe::{
    PodState, StackJob, Stage, NOTIFIED_ANNOTATION, RESERVED_UNTIL_ANNOTATION,
};
use crate::stacks_plan::{self, Finish, Plan, Seen, StackHold, StackLimits, Why};
use crate::template::Dispatch;

/// The most Buildkite keeps of a finish's detail, and of a notification.
const DETAIL_LIMIT: usize = 4096;
const NOTICE_LIMIT: usize = 256;

/// The scheduled jobs one listing reads: more than `max_agents` is never needed at once.
const LIST_LIMIT: usize = 100;

/// The stacks mode's edge to Buildkite and its limits.
pub struct Stack {
    api: StacksClient,
    limits: StackLimits,
    namespace: String,
    written: Mutex<Written>,
    /// The waiting jobs told why they wait, while a fault (a stuck streak, a refusal) lasts.
    told: Mutex<HashSet<String>>,
}

/// A Job whose job is to be reserved.
struct Held {
    job: String,
    name: String,
    uid: String,
    suspended: bool,
}

/// What this process wrote on its Jobs that the watch may not have brought back yet, read over
/// the watched annotations: a watch a moment behind repeats no note and no renewal (the
/// "expectations" of Kubernetes' own controllers). After a restart the annotations say it all.
#[derive(Default)]
struct Written {
    notified: HashMap<String, u8>,
    reserved_until: HashMap<String, Timestamp>,
}

impl Stack {
    pub fn new(api: StacksClient, limits: StackLimits, namespace: &str) -> Stack {
        Stack {
            api,
            limits,
            namespace: namespace.to_string(),
            written: Mutex::default(),
            told: Mutex::default(),
        }
    }

    /// `jobs` with what this process wrote on them; forgets the Jobs gone.
    fn recall(&self, jobs: &mut [StackJob]) {
        let mut written = self.written.lock().unwrap();
        let present: HashSet<String> = jobs.iter().map(|j| j.name.clone()).collect();
        written.notified.retain(|name, _| present.contains(name));
        written
            .reserved_until
            .retain(|name, _| present.contains(name));
        for job in jobs {
            if let Some(told) = written.notified.get(&job.name) {
                job.notified = job.notified.max(*told);
            }
            if let Some(until) = written.reserved_until.get(&job.name) {
                job.reserved_until = job.reserved_until.max(Some(*until));
            }
        }
    }

    /// Registers the stack (idempotent; also the token's check): whether Buildkite accepted
    /// the token (`None`: no answer).
    pub async fn register(&self, edges: &Edges<'_>) -> Option<bool> {
        let metadata = HashMap::from([
            ("namespace".to_string(), self.namespace.clone()),
            ("queue".to_string(), edges.settings.queue.clone()),
            (
                "dispatcher".to_string(),
                concat!("stateless-agent ", env!("CARGO_PKG_VERSION")).to_string(),
            ),
        ]);
        match self.api.register(&metadata).await {
            Ok(()) => {
                tracing::info!(
                    stack = self.api.key(),
                    "registered the stack {}",
                    self.api.key()
                );
                Some(true)
            }
            Err(e) => {
                failed(edges, &e);
                matches!(e, StacksError::Unauthorized(_) | StacksError::StackLimit(_))
                    .then_some(false)
            }
        }
    }

    /// Deregisters the stack on shutdown, bounded as agent-stack-k8s bounds it (5 s): Buildkite
    /// cleans up a stack that stops polling anyway.
    pub async fn deregister(&self) {
        let done = tokio::time::timeout(Duration::from_secs(5), self.api.deregister()).await;
        match done {
            Ok(Ok(())) => tracing::info!(stack = self.api.key(), "deregistered the stack"),
            Ok(Err(e)) => tracing::warn!(
                stack = self.api.key(),
                "could not deregister the stack: {e}"
            ),
            Err(_) => tracing::warn!(stack = self.api.key(), "deregistering the stack timed out"),
        }
    }

    /// One tick; the wait Buildkite asked for, if it throttled the listing.
    pub async fn tick(&self, edges: &Edges<'_>, timeouts: &Timeouts) -> Option<Duration> {
        if !edges.stores.ready().await {
            return None;
        }
        let (listing, wait) = self.list(edges).await;
        let now = Timestamp::now();
        let view = edges.stores.view();
        let observed = view.stacks(now, edges.template.hash(), timeouts);
        let mut jobs = observed.jobs;
        self.recall(&mut jobs);
        let states = self.states(edges, &jobs).await;
        let listed = listing
            .as_ref()
            .map(|l| l.jobs.as_slice())
            .unwrap_or_default();
        let told = self.told.lock().unwrap().clone();
        let seen = Seen {
            jobs: &jobs,
            listed,
            paused: listing.as_ref().is_some_and(|l| l.paused),
            states: &states,
            now,
            streak: observed.streak.as_ref(),
            refusal: observed.refusal.as_deref(),
            told: &told,
        };
        let plan = stacks_plan::plan(&seen, &self.limits);
        self.report(edges, &seen, &plan);
        let by_job: HashMap<&str, &StackJob> = jobs.iter().map(|j| (j.job.as_str(), j)).collect();
        self.act(edges, plan, &by_job, &view).await;
        wait
    }

    /// Tells each job a fault holds, once, why it waits; forgets them once no fault is seen.
    async fn tell(&self, edges: &Edges<'_>, plan: &Plan) {
        if !plan.stuck && !plan.refused {
            self.told.lock().unwrap().clear();
        }
        let Some(said) = waiting_note(plan.hold.as_ref()) else {
            return;
        };
        if plan.tell.is_empty() {
            return;
        }
        let note = cut(&edges.redactor.apply(&said), NOTICE_LIMIT);
        let notes: Vec<(String, String)> = plan
            .tell
            .iter()
            .map(|j| (j.clone(), note.clone()))
            .collect();
        match self.api.notify(&notes).await {
            // A note refused (a job just taken or ended) is not tried again.
            Ok(_) => self.told.lock().unwrap().extend(plan.tell.iter().cloned()),
            Err(e) => failed(edges, &e),
        }
    }

    /// The listing (the heartbeat); none if it failed. A 404 is registered again: the stack
    /// goes when the replica that led before deregisters it on its way out (a rollout), and
    /// Buildkite's 404 messages, which say what was missing, are no contract.
    async fn list(&self, edges: &Edges<'_>) -> (Option<Listing>, Option<Duration>) {
        match self.api.scheduled_jobs(LIST_LIMIT).await {
            Ok(listing) => {
                edges
                    .metrics
                    .ready
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                (Some(listing), None)
            }
            Err(e) => {
                failed(edges, &e);
                if let StacksError::NotFound { .. } = e {
                    self.register(edges).await;
                }
                let wait = match e {
                    StacksError::Throttled { wait, .. } => Some(wait),
                    _ => None,
                };
                (None, wait)
            }
        }
    }

    /// Buildkite's state of each job that has a Job, in batches; what could not be read is
    /// left out (nothing is done for it this tick).
    async fn states(&self, edges: &Edges<'_>, jobs: &[StackJob]) -> HashMap<String, String> {
        let ids: Vec<String> = jobs.iter().map(|j| j.job.clone()).collect();
        let mut states = HashMap::new();
        for chunk in ids.chunks(BATCH) {
            match self.api.states(chunk).await {
                Ok(found) => states.extend(found),
                Err(e) => {
                    failed(edges, &e);
                    break;
                }
            }
        }
        states
    }

    /// The gauges and a hold's log line.
    fn report(&self, edges: &Edges<'_>, seen: &Seen, plan: &Plan) {
        let metrics = &edges.metrics;
        let scheduled = State { state: "scheduled" };
        metrics
            .demand
            .get_or_create(&scheduled)
            .set(seen.listed.len() as i64);
        let mut counts: HashMap<&'static str, i64> = ["pending", "running", "stuck"]
            .into_iter()
            .map(|s| (s, 0))
            .collect();
        for job in seen.jobs.iter().filter(|j| !j.finished) {
            let state = match job.pod {
                PodState::Coming(Stage::Started) => "running",
                PodState::Coming(_) => "pending",
                PodState::Stuck(_) => "stuck",
                PodState::Ended(_) => continue,
            };
            *counts.entry(state).or_default() += 1;
        }
        for (state, n) in counts {
            metrics.supply.get_or_create(&State { state }).set(n);
        }
        metrics.paused.set(i64::from(seen.paused));
        self.report_hold(edges, plan);
    }

    /// The blocked faults' gauges, and a hold's count and log line.
    fn report_hold(&self, edges: &Edges<'_>, plan: &Plan) {
        let metrics = &edges.metrics;
        for (reason, on) in [("stuck", plan.stuck), ("failed-create", plan.refused)] {
            let blocked = metrics.blocked.get_or_create(&Reason { reason });
            blocked.set(i64::from(on));
        }
        let said = waiting_note(plan.hold.as_ref()).map(|s| edges.redactor.apply(&s));
        let said = said.unwrap_or_default();
        match &plan.hold {
            Some(StackHold::Paused { waiting }) => {
                metrics
                    .holds
                    .get_or_create(&Reason { reason: "paused" })
                    .inc();
                tracing::info!(decision = "hold", reason = "paused", waiting, "not reserving: the queue's dispatch is paused in Buildkite; {waiting} jobs wait");
            }
            Some(StackHold::AtMax { waiting }) => {
                metrics
                    .holds
                    .get_or_create(&Reason { reason: "at-max" })
                    .inc();
                tracing::info!(
                    decision = "hold",
                    reason = "at-max",
                    waiting,
                    "{waiting} jobs wait: DISPATCHER_MAX_AGENTS agent pods are not finished"
                );
            }
            Some(StackHold::Stuck {
                waiting, reason, ..
            }) => {
                let held = Reason { reason: "stuck" };
                metrics.holds.get_or_create(&held).inc();
                tracing::warn!(decision = "hold", reason = "stuck", waiting, stuck_reason = %reason, "{waiting} jobs wait: {said}; {}", remedy(reason));
            }
            Some(StackHold::Refused { waiting, .. }) => {
                let held = Reason {
                    reason: "failed-create",
                };
                metrics.holds.get_or_create(&held).inc();
                tracing::warn!(
                    decision = "hold",
                    reason = "failed-create",
                    waiting,
                    "{waiting} jobs wait: {said}; {}",
                    remedy("FailedCreate")
                );
            }
            None => {}
        }
    }

    /// Carries the plan out; `jobs` are the Jobs by their Buildkite job.
    async fn act(
        &self,
        edges: &Edges<'_>,
        plan: Plan,
        jobs: &HashMap<&str, &StackJob>,
        view: &crate::watches::View,
    ) {
        for delete in &plan.delete {
            if edges.delete_job(&delete.k8s_job, &delete.uid).await {
                count(edges, "canceled");
                tracing::info!(decision = "cancel", job_uuid = %delete.job, job = %delete.k8s_job, state = %delete.state,
                    "Buildkite job {} is {} before its agent started: deleted its Job {}", delete.job, delete.state, delete.k8s_job);
            }
        }
        for finish in &plan.finish {
            self.fail(edges, finish, view).await;
        }
        for taken in &plan.stuck_taken {
            let note = self.detail(edges, &taken.why, view);
            let note = [(taken.job.clone(), cut(&note, NOTICE_LIMIT))];
            if let Err(e) = self.api.notify(&note).await {
                failed(edges, &e);
            }
            self.let_go(edges, taken).await;
        }
        let renew = plan.renew.iter().filter_map(|job| {
            let found = jobs.get(job.as_str())?;
            Some(Held {
                job: job.clone(),
                name: found.name.clone(),
                uid: found.uid.clone(),
                suspended: found.suspended,
            })
        });
        let renewed = self.hold(edges, renew.collect()).await;
        count_by(edges, "renewed", renewed.len() as u64);
        for found in plan.resume.iter().filter_map(|job| jobs.get(job.as_str())) {
            let patch = serde_json::json!({"spec": {"suspend": false}});
            self.patch(edges, &found.name, &patch).await;
        }
        self.take(edges, &plan.reserve).await;
        self.notify(edges, &plan, jobs).await;
        self.tell(edges, &plan).await;
    }

    /// Finishes a job whose pod cannot run it, with the reason on its timeline; a stuck pod's
    /// Job is then let go (log line, Event, metric).
    async fn fail(&self, edges: &Edges<'_>, finish: &Finish, view: &crate::watches::View) {
        let detail = self.detail(edges, &finish.why, view);
        let status = stacks_plan::STACK_ERROR_EXIT;
        match self.api.finish(&finish.job, status, &detail).await {
            Ok(()) => {
                count(edges, "failed");
                tracing::warn!(decision = "fail-job", job_uuid = %finish.job, job = %finish.k8s_job,
                    "finished Buildkite job {} as failed (exit status {status}): {detail}", finish.job);
            }
            // Finished already (by this dispatcher before a restart, or by Buildkite).
            Err(StacksError::Rejected { status: 422, .. }) => {}
            Err(e) => return failed(edges, &e),
        }
        self.let_go(edges, finish).await;
    }

    async fn let_go(&self, edges: &Edges<'_>, finish: &Finish) {
        if let Why::Stuck(pod) = &finish.why {
            let job = StuckJob::one(&finish.k8s_job, &finish.uid, pod.clone());
            edges.relieve(&job, &Relief::DeleteJob).await;
        }
    }

    /// What the job's timeline says of a pod that could not run it (at most 4 KB, redacted).
    fn detail(&self, edges: &Edges<'_>, why: &Why, view: &crate::watches::View) -> String {
        let text = match why {
            Why::Stuck(pod) => {
                let events = view.pod_warnings(&pod.pod);
                let events = match events.is_empty() {
                    true => String::new(),
                    false => format!(" Events: {}", events.join("; ")),
                };
                let subject = match pod.pod.is_empty() {
                    true => "No pod was made for it".to_string(),
                    false => format!("Its pod {} (namespace {})", pod.pod, self.namespace),
                };
                format!("stateless-agent could not start an agent for this job. {subject} did not start in {}s: {}: {}. Fix: {}.{events}",
                    pod.waited.as_secs(), pod.reason, pod.message, remedy(&pod.reason))
            }
            Why::Ended(how) => format!("stateless-agent: this job's pod ended before its agent acquired the job ({how}). Retry the job; a `retry: automatic` rule on exit status -1 does it for you."),
        };
        cut(&edges.redactor.apply(&text), DETAIL_LIMIT)
    }

    /// Reserves (again) the jobs of `held`, in one call. Each Job reserved records until when,
    /// and is resumed if it waited suspended; a suspended Job whose job was not reserved
    /// (another stack has it, or it no longer waits) never made a pod, and is deleted. The
    /// Jobs reserved.
    async fn hold(&self, edges: &Edges<'_>, held: Vec<Held>) -> Vec<Held> {
        if held.is_empty() {
            return held;
        }
        let uuids: Vec<String> = held.iter().map(|h| h.job.clone()).collect();
        // Not answered: the Jobs stay as they are, and the next tick tries again.
        let Some(reserved) = self.reserve_call(edges, &uuids).await else {
            return Vec::new();
        };
        let until = self.until();
        let (kept, refused): (Vec<Held>, Vec<Held>) =
            held.into_iter().partition(|h| reserved.contains(&h.job));
        for h in refused.iter().filter(|h| h.suspended) {
            edges.delete_job(&h.name, &h.uid).await;
            tracing::info!(decision = "not-reserved", job_uuid = %h.job, job = %h.name, "Buildkite job {} was not reserved (another stack has it, or it no longer waits): deleted its Job {}, which had made no pod", h.job, h.name);
        }
        for h in &kept {
            let mut patch = serde_json::json!({"metadata": {"annotations": {RESERVED_UNTIL_ANNOTATION: until.to_string()}}});
            if h.suspended {
                patch["spec"] = serde_json::json!({"suspend": false});
            }
            self.patch(edges, &h.name, &patch).await;
            let mut written = self.written.lock().unwrap();
            written.reserved_until.insert(h.name.clone(), until);
        }
        kept
    }

    async fn patch(&self, edges: &Edges<'_>, name: &str, patch: &serde_json::Value) {
        let params = PatchParams::default();
        if let Err(e) = edges.jobs.patch(name, &params, &Patch::Merge(patch)).await {
            edges.metrics.kubernetes_error(&e);
            tracing::warn!(job = %name, "updating Job {name} failed: {e}; the next tick tries again");
        }
    }

    /// Takes waiting jobs: a suspended Job for each first (the record a restart reads back),
    /// then one reservation for them all, then the Jobs reserved resumed ([`Stack::hold`]). A
    /// dispatcher that dies on the way leaves suspended Jobs, which the next tick reserves or
    /// resumes; never a reservation without a Job, nor a pod for a job not reserved.
    async fn take(&self, edges: &Edges<'_>, jobs: &[String]) {
        if jobs.is_empty() {
            return;
        }
        let until = self.until();
        // The jobs taken together are one dispatch: a stuck streak counts dispatches, so its
        // backoff doubles per round, not per job, as in the metrics mode.
        let dispatch = crate::act::random_id();
        let mut made = Vec::new();
        for job in jobs {
            if let Some((name, uid)) = self.create(edges, job, &dispatch, until).await {
                made.push(Held {
                    job: job.clone(),
                    name,
                    uid,
                    suspended: true,
                });
            }
        }
        let made = self.hold(edges, made).await;
        count_by(edges, "reserved", made.len() as u64);
        let notes: Vec<(String, String)> = made
            .iter()
            .map(|h| (h.job.clone(), self.note(Stage::Created, None, &h.name)))
            .collect();
        // The first note goes with the create (the Job says so already): a short job can be
        // over before the next tick.
        if !notes.is_empty() {
            if let Err(e) = self.api.notify(&notes).await {
                failed(edges, &e);
            }
        }
        // The next tick counts them against --max-agents.
        let names: Vec<&str> = made.iter().map(|h| h.name.as_str()).collect();
        edges.stores.wait_for_jobs(&names).await;
    }

    async fn reserve_call(&self, edges: &Edges<'_>, jobs: &[String]) -> Option<Vec<String>> {
        match self.api.reserve(jobs, self.limits.expiry).await {
            Ok(answer) => {
                if !answer.not_reserved.is_empty() {
                    count_by(edges, "not-reserved", answer.not_reserved.len() as u64);
                    tracing::info!(not_reserved = answer.not_reserved.len(), "{} jobs were not reserved: another stack has them, or they are no longer waiting", answer.not_reserved.len());
                }
                Some(answer.reserved)
            }
            Err(e) => {
                failed(edges, &e);
                None
            }
        }
    }

    /// Until when a reservation made now lasts.
    fn until(&self) -> Timestamp {
        let expiry = SignedDuration::try_from(self.limits.expiry).unwrap_or_default();
        Timestamp::now() + expiry
    }

    /// The job's Job; one that exists already (a duplicate create) is the same Job. Its name and
    /// uid, if this call created it.
    async fn create(
        &self,
        edges: &Edges<'_>,
        uuid: &str,
        dispatch_id: &str,
        until: Timestamp,
    ) -> Option<(String, String)> {
        let settings = edges.settings;
        let dispatch = Dispatch {
            id: dispatch_id.to_string(),
            agents: 1,
            active_deadline: settings.job_deadline,
            ttl: settings.job_ttl,
            idle_timeout: settings.idle_timeout,
            mirror_claim: edges.claims.and_then(|m| m.handed_out()),
            acquire: Some(uuid.to_string()),
        };
        let mut job: Job = edges.template.job(&dispatch);
        // No pod until its job is reserved.
        job.spec.get_or_insert_default().suspend = Some(true);
        let annotations = job.metadata.annotations.get_or_insert_default();
        annotations.insert(RESERVED_UNTIL_ANNOTATION.into(), until.to_string());
        let created = Stage::Created as u8;
        annotations.insert(NOTIFIED_ANNOTATION.into(), created.to_string());
        match edges.jobs.create(&PostParams::default(), &job).await {
            Ok(created) => {
                edges.metrics.dispatches.inc();
                edges.metrics.pods_created.inc();
                let name = created.metadata.name.unwrap_or_default();
                tracing::info!(decision = "dispatch", job_uuid = %uuid, job = %name, dispatch_id = %dispatch.id, "created Job {name} for Buildkite job {uuid}");
                Some((name, created.metadata.uid.unwrap_or_default()))
            }
            Err(kube::Error::Api(s)) if s.code == 409 => None,
            Err(e) => {
                edges.metrics.kubernetes_error(&e);
                tracing::warn!(decision = "dispatch-failed", job_uuid = %uuid, "creating the Job for Buildkite job {uuid} failed: {e}; the next tick takes the job again");
                None
            }
        }
    }

    /// Each stage's note on its job's timeline, in one call; then each Job records how far its
    /// notes went, so that a restart repeats none.
    async fn notify(&self, edges: &Edges<'_>, plan: &Plan, jobs: &HashMap<&str, &StackJob>) {
        if plan.notify.is_empty() {
            return;
        }
        let notes: Vec<(String, String)> = plan
            .notify
            .iter()
            .map(|n| {
                (
                    n.job.clone(),
                    cut(
                        &self.note(n.stage, jobs.get(n.job.as_str()).copied(), &n.k8s_job),
                        NOTICE_LIMIT,
                    ),
                )
            })
            .collect();
        if let Err(e) = self.api.notify(&notes).await {
            return failed(edges, &e);
        }
        let mut reached: HashMap<&str, Stage> = HashMap::new();
        for n in &plan.notify {
            let stage = reached.entry(n.k8s_job.as_str()).or_insert(n.stage);
            *stage = (*stage).max(n.stage);
        }
        for (name, stage) in reached {
            self.written
                .lock()
                .unwrap()
                .notified
                .insert(name.to_string(), stage as u8);
            let patch = serde_json::json!({"metadata": {"annotations": {NOTIFIED_ANNOTATION: (stage as u8).to_string()}}});
            self.patch(edges, name, &patch).await;
        }
    }

    fn note(&self, stage: Stage, job: Option<&StackJob>, name: &str) -> String {
        let pod = job.and_then(|j| j.pod_name.clone()).unwrap_or_default();
        let node = job
            .and_then(|j| j.node.clone())
            .unwrap_or_else(|| "a node".into());
        match stage {
            Stage::Created => format!(
                "Kubernetes Job {name} created in namespace {}; waiting for its pod",
                self.namespace
            ),
            Stage::Scheduled => format!("Pod {pod} scheduled on {node}"),
            Stage::Pulling => {
                format!("Pod {pod} is pulling its images and starting its containers")
            }
            Stage::Started => format!("Agent started in pod {pod}; it acquires this job next"),
        }
    }
}

/// Why jobs wait under a fault's hold: the line logged, and the note on their timelines.
fn waiting_note(hold: Option<&StackHold>) -> Option<String> {
    match hold? {
        StackHold::Stuck {
            reason,
            dispatches,
            retry_in,
            ..
        } => {
            let next = match retry_in {
                Some(wait) => format!("more jobs are taken in {}s", wait.as_secs()),
                None => "a few jobs are being tried first".into(),
            };
            Some(format!("this queue's agent pods never started ({reason}; {dispatches} dispatches in a row); {next}, all at once when a pod starts or the agent template changes"))
        }
        StackHold::Refused { message, .. } => Some(format!(
            "Kubernetes refuses this queue's agent pods; jobs are taken again once it admits them: {message}"
        )),
        StackHold::Paused { .. } | StackHold::AtMax { .. } => None,
    }
}

/// Counts and logs a failed Stacks call; a refused token makes the replica unready.
fn failed(edges: &Edges<'_>, e: &StacksError) {
    let error = ApiError {
        api: "stacks",
        kind: e.name(),
    };
    edges.metrics.api_errors.get_or_create(&error).inc();
    match e {
        StacksError::Unauthorized(_) | StacksError::StackLimit(_) => {
            edges
                .metrics
                .ready
                .store(false, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(error = e.name(), "{e}");
        }
        _ => tracing::warn!(error = e.name(), "{e}"),
    }
}

fn count(edges: &Edges<'_>, outcome: &'static str) {
    count_by(edges, outcome, 1);
}

fn count_by(edges: &Edges<'_>, outcome: &'static str, n: u64) {
    edges
        .metrics
        .stack_jobs
        .get_or_create(&Reason { reason: outcome })
        .inc_by(n);
}

/// `text` cut to at most `limit` bytes, on a character boundary, marked when cut.
fn cut(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_string();
    }
    let mut end = limit - 3;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::cut;

    #[test]
    fn details_are_cut_on_a_character_boundary() {
        assert_eq!(cut("short", 256), "short");
        let long = "é".repeat(200);
        let out = cut(&long, 256);
        assert!(out.len() <= 256 && out.ends_with("..."));
    }
}
