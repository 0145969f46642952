//! Leader election on a `coordination.k8s.io` Lease, by client-go's algorithm
//! (`tools/leaderelection`): read the Lease; take it when it is free or its holder has not renewed
//! within the lease duration, and renew it while leading, each time as an update carrying the
//! resourceVersion just read. The API server refuses an update made on a stale read (409), so two
//! replicas can never both take or keep it: one write wins, the other learns it lost. A leader
//! that cannot renew within the renew deadline stops leading before its Lease can expire.
//!
//! Why not the `kube-lease-manager` crate (0.13.1, the maintained one on kube 5; kube-runtime has
//! no leases): read at that version, a contender that last saw the Lease expired releases it by
//! force before taking it (`manager.rs` `watcher_step`, `state.rs` `release` with
//! `LeaseLockOpts::Force`: a strategic-merge patch with no precondition), so when two contenders
//! race for an expired Lease the second can wipe the first's fresh lock, and both may lead until
//! the first's next renewal. The dispatcher's promise of no duplicate dispatch needs every write
//! to carry a precondition, which is this module's whole algorithm. (That window is narrow: the
//! two-replica scenario does not hit it on demand, so this rests on reading the crate.)

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

/// client-go's defaults, scaled to the dispatcher's 10 s ticks.
const LEASE_DURATION: Duration = Duration::from_secs(15);
const RENEW_DEADLINE: Duration = Duration::from_secs(10);
const RETRY_PERIOD: Duration = Duration::from_secs(2);

/// A running election: whether this replica leads, and the way out.
pub struct Election {
    pub leading: watch::Receiver<bool>,
    api: Api<Lease>,
    name: String,
    identity: String,
    task: tokio::task::JoinHandle<()>,
}

impl Election {
    /// Stops campaigning and, if this replica holds the Lease, gives it up as client-go's
    /// `ReleaseOnCancel` does (holder cleared, a 1 s duration), so that a standby takes over at
    /// its next retry instead of waiting out the Lease: what a rollout needs. Bounded, so a
    /// silent API server cannot hold the exit past the pod's grace period.
    pub async fn release(self) {
        self.task.abort();
        let _ = self.task.await;
        let released = tokio::time::timeout(
            RENEW_DEADLINE / 2,
            give_up(&self.api, &self.name, &self.identity),
        );
        match released.await {
            Ok(Ok(true)) => tracing::info!(lease = %self.name, "released the Lease"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                tracing::warn!(lease = %self.name, "could not release the Lease: {e}; another replica takes over once it expires")
            }
            Err(_) => {
                tracing::warn!(lease = %self.name, "releasing the Lease timed out; another replica takes over once it expires")
            }
        }
    }
}

/// Clears the holder if it is `identity`; whether it did.
async fn give_up(api: &Api<Lease>, name: &str, identity: &str) -> Result<bool, kube::Error> {
    let Some(mut lease) = api.get_opt(name).await? else {
        return Ok(false);
    };
    let spec = lease.spec.get_or_insert_default();
    if spec.holder_identity.as_deref() != Some(identity) {
        return Ok(false);
    }
    let now = MicroTime(Timestamp::now());
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(now.clone());
    spec.acquire_time = Some(now);
    // The read's resourceVersion goes with it: a replica that took it since is left alone.
    api.replace(name, &PostParams::default(), &lease).await?;
    Ok(true)
}

/// Runs the election for `identity` on Lease `name` until released.
pub fn elect(api: Api<Lease>, name: String, identity: String) -> Election {
    let (tx, rx) = watch::channel(false);
    let (campaign, lease, who) = (api.clone(), name.clone(), identity.clone());
    let task = tokio::spawn(async move {
        let (api, name, identity) = (campaign, lease, who);
        let mut last_renewal: Option<tokio::time::Instant> = None;
        loop {
            let now = tokio::time::Instant::now();
            let leader = match try_acquire_or_renew(&api, &name, &identity).await {
                Ok(true) => {
                    last_renewal = Some(now);
                    true
                }
                // Another replica holds it.
                Ok(false) => {
                    last_renewal = None;
                    false
                }
                // The API server did not answer: still leading until the renew deadline, which
                // comes before the Lease could expire for the others.
                Err(e) => {
                    tracing::warn!(lease = %name, "leader election: {e}");
                    last_renewal.is_some_and(|at| now - at < RENEW_DEADLINE)
                }
            };
            tx.send_if_modified(|current| {
                let changed = *current != leader;
                *current = leader;
                changed
            });
            tokio::time::sleep(RETRY_PERIOD).await;
        }
    });
    Election {
        leading: rx,
        api,
        name,
        identity,
        task,
    }
}

/// One round: whether this replica holds the Lease after it.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    name: &str,
    identity: &str,
) -> Result<bool, kube::Error> {
    let now = MicroTime(Timestamp::now());
    let spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
        acquire_time: acquired.or(Some(now.clone())),
        renew_time: Some(now.clone()),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    };
    let current = match api.get_opt(name).await? {
        Some(lease) => lease,
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec(0, None)),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        }
    };
    let held = current.spec.clone().unwrap_or_default();
    let holder = held.holder_identity.clone().unwrap_or_default();
    let ours = holder == identity;
    let expired = held.renew_time.as_ref().is_none_or(|renewed| {
        let duration = held.lease_duration_seconds.unwrap_or(0).max(0) as i64;
        renewed.0.as_second() + duration < now.0.as_second()
    });
    if !ours && !holder.is_empty() && !expired {
        return Ok(false);
    }
    let transitions = held.lease_transitions.unwrap_or(0) + i32::from(!ours);
    let acquired = if ours {
        held.acquire_time.clone()
    } else {
        None
    };
    let mut next = current.clone();
    // The read's resourceVersion goes with the update: a write since makes it a 409.
    next.spec = Some(spec(transitions, acquired));
    match api.replace(name, &PostParams::default(), &next).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
