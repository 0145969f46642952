//! The checkout record for agent-wrapper and the one human-readable line for the job log.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use stateless_core::checkout_record::{
    CheckoutRecord, MirrorStatus, MirrorUse, Outcome, PhaseDurations,
};

use crate::checkout::CheckoutRun;
use crate::checkout_plan::CheckoutPlan;
use crate::mirror_select::MirrorChoice;

pub fn record(
    plan: &CheckoutPlan,
    choice: &MirrorChoice,
    run: &CheckoutRun,
    inspect: Duration,
    total: Duration,
) -> CheckoutRecord {
    let attempt = run.result.as_ref().ok();
    let mirror = choice.mirror.as_ref();
    CheckoutRecord {
        version: 1,
        repository: plan.repo.without_credentials(),
        commit: attempt.map(|a| a.commit.to_string()),
        outcome: if attempt.is_some() {
            Outcome::Succeeded
        } else {
            Outcome::Failed
        },
        error: run.result.as_ref().err().map(ToString::to_string),
        cause: run.result.as_ref().err().map(|e| e.cause().to_string()),
        mirror: MirrorUse {
            status: run.mirror_status,
            reason: run
                .fallback_reason
                .clone()
                .or_else(|| choice.miss_reason.clone()),
            path: mirror.map(|m| m.path.clone()),
            real_path: mirror.map(|m| m.real_path.clone()),
            source: choice.source,
            age_secs: choice.age_secs,
            had_commit: attempt.is_some_and(|a| a.had_commit),
        },
        attempts: run.attempts,
        bytes_fetched: attempt.map_or(0, |a| a.bytes_fetched),
        durations_ms: PhaseDurations {
            inspect: millis(inspect),
            fetch: attempt.map_or(0, |a| millis(a.fetch)),
            checkout: attempt.map_or(0, |a| millis(a.checkout)),
            total: millis(total),
        },
        finished_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    }
}

/// `checked out 1a2b3c4 in 0.41s: mirror hit (/buildkite-git-references/acme/widgets.reference, 2m old), 0 B fetched, fetch 0.12s ‖ checkout 0.38s, 1 attempt`
pub fn line(r: &CheckoutRecord) -> String {
    let commit = r
        .commit
        .as_deref()
        .map_or("nothing", |c| &c[..c.len().min(12)]);
    let m = &r.mirror;
    let mirror = match m.status {
        MirrorStatus::Hit => format!(
            "mirror hit ({}{})",
            m.path
                .as_ref()
                .map_or(String::new(), |p| p.display().to_string()),
            m.age_secs.map_or(String::new(), |a| format!(
                ", {} old",
                humantime::format_duration(Duration::from_secs(a))
            )),
        ),
        MirrorStatus::Miss => "no mirror".to_string(),
        MirrorStatus::Fallback => "mirror abandoned, checked out without it".to_string(),
    };
    let joiner = if m.had_commit { " ‖ " } else { " then " };
    format!(
        "checked out {commit} in {:.2}s: {mirror}, {} fetched, fetch {:.2}s{joiner}checkout {:.2}s, {} attempt{}",
        r.durations_ms.total as f64 / 1000.0,
        human_bytes(r.bytes_fetched),
        r.durations_ms.fetch as f64 / 1000.0,
        r.durations_ms.checkout as f64 / 1000.0,
        r.attempts,
        if r.attempts == 1 { "" } else { "s" },
    )
}

fn millis(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

fn human_bytes(n: u64) -> String {
    match n {
        0..1024 => format!("{n} B"),
        1024..1_048_576 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / 1_048_576.0),
    }
}
