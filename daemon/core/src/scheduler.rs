//! The scheduler inside custodyd: what happens without a request.
//!
//! At start, [`roll_back_abandoned`] finishes what a crash interrupted: a
//! version generation that was journaled but never committed is rolled
//! back (its HSM objects destroyed), so nothing half-made is ever usable;
//! after any roll-back (of a version or a ceremony), [`sweep_torn_objects`]
//! removes what a kill inside an HSM call left without label or id.
//! Then [`run`] wakes every `scheduler_interval_secs` and, on the leader,
//! - rotates keys whose primary version is compromised, near the end of its
//!   cryptoperiod, or past half its nonce budget (request id
//!   `schedule:v{n}`, so two ticks never rotate one version twice); keys
//!   whose ROTATE policy needs officers are only reported as overdue;
//! - destroys versions whose cancel window has passed, unless held;
//! - rolls back the version generations ([`roll_back_abandoned`]) and
//!   settles the ceremonies ([`crate::ceremonies::take_over`]) of replicas
//!   that stopped, then sweeps torn objects as a start does;
//! - every `drift_check_interval_secs`, compares the registry with the HSM
//!   and audits the findings whenever they change.
//!
//! Every action is audited with the principal [`SCHEDULER`], like requests.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::action::Audited;
use crate::audit::Event;
use crate::authz::Approval;
use crate::keys::generation::roll_back_version;
use crate::keys::{self, SCHEDULER, SCHEDULER_REQUEST_PREFIX, Trigger};
use crate::names::version_name;
use crate::registry::{KeyRecord, PendingVersion, VersionState};
use crate::{Custody, Error, Reason, drift, metrics};

/// Rolls back the version generations of processes that are gone: at
/// start (a process restarts under a new instance, so every entry left is
/// one), and on the leader at each tick while other replicas run. A
/// generation whose process still runs is its own to commit or roll back.
/// Returns how many it rolled back.
pub async fn roll_back_abandoned(state: &Custody) -> Result<usize, String> {
    let pending = state
        .registry
        .pending_versions()
        .map_err(|e| e.to_string())?;
    let mut count = 0;
    for entry in pending {
        // An entry journaled before replicas names no process: one that
        // is gone, since replicas are upgraded stopped (runbook).
        let gone = entry.instance.is_empty()
            || !state
                .shared
                .alive(&entry.instance)
                .map_err(|e| e.to_string())?;
        if gone {
            roll_back_pending(state, &entry).await;
            count += 1;
        }
    }
    Ok(count)
}

/// Rolls back one uncommitted generation whose process is gone, audited.
async fn roll_back_pending(state: &Custody, entry: &PendingVersion) {
    // First, in the store, so that the process that was making it cannot
    // commit it any more (were it only stalled): a version whose objects
    // are being destroyed is never registered.
    match state.registry.begin_roll_back(entry).await {
        Ok(true) => {}
        // Committed, or rolled back by another, meanwhile.
        Ok(false) => return,
        Err(error) => {
            tracing::warn!(%error, version = %entry.hsm_label, "a version roll-back waits for the registry");
            return;
        }
    }
    let mut audited = Audited::start("RollBackVersion");
    audited.principal = SCHEDULER.into();
    audited.resource = version_name(&entry.key_id, entry.version);
    let committed = state
        .registry
        .get(&entry.key_id)
        .is_some_and(|k| k.version(entry.version).is_some());
    let result = if committed {
        // Cannot happen (commit and clear are one transaction), but a
        // committed version must never be destroyed by a stale entry.
        audited.detail = "already committed; journal entry dropped".into();
        state
            .registry
            .abandon_version(&entry.hsm_label, &entry.generation)
            .await
            .map_err(|e| e.to_string())
    } else {
        match roll_back_version(state, entry).await {
            Some(count) => {
                audited.detail = format!(
                    "{} interrupted by the stop of the process making it; destroyed {count} HSM objects",
                    entry.trigger
                );
                Ok(())
            }
            None => {
                audited.detail = format!("{} interrupted; roll-back failed", entry.trigger);
                Err("roll-back failed; retried at the next start".to_string())
            }
        }
    };
    let result = result.map_err(|message| Error::new(Reason::RollbackFailed, message));
    if let Err(error) = audited.record(state, result).await {
        tracing::error!(reason = %error.reason, version = %entry.hsm_label, "version roll-back");
    } else {
        tracing::warn!(version = %entry.hsm_label, "rolled back a version generation whose process stopped");
    }
}

/// After a roll-back: destroys the objects a kill inside an HSM call can
/// leave with neither label nor id (see `HsmSession::destroy_unnamed`),
/// audited. custody owns its token and never makes such an object.
pub async fn sweep_torn_objects(state: &Custody) -> Result<(), String> {
    let mut audited = Audited::start("SweepTornObjects");
    audited.principal = SCHEDULER.into();
    let swept = state.hsm.run(|session| session.destroy_unnamed()).await;
    let result = match swept {
        Ok(count) => {
            audited.detail = format!("destroyed {count} objects with neither label nor id");
            if count > 0 {
                tracing::warn!(count, "destroyed objects a crash left half-made");
            }
            Ok(())
        }
        // Not fatal: drift detection reports what is left.
        Err(error) => Err(Error::from(error)),
    };
    match audited.record(state, result).await {
        Ok(()) => Ok(()),
        Err(error) if error.reason == Reason::AuditUnavailable => {
            Err(format!("sweeping torn objects: {}", error.message))
        }
        Err(error) => {
            tracing::error!(%error.message, "sweeping torn objects failed; drift checks will report them");
            Ok(())
        }
    }
}

/// Runs the scheduler until the daemon's state is gone.
pub async fn run(state: Weak<Custody>) {
    let period = match state.upgrade() {
        Some(state) => Duration::from_secs(state.lifecycle.scheduler_interval_secs.max(1)),
        None => return,
    };
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_drift: Option<(Instant, String)> = None;
    let mut leader: Option<custody_store::Claim> = None;
    loop {
        interval.tick().await;
        let Some(state) = state.upgrade() else {
            return;
        };
        // This replica's own clock, whoever leads.
        clock_steps(&state).await;
        if !lead(&state, &mut leader) {
            continue;
        }
        // Decide from the store's state, which another replica may have
        // changed since this one last served a request.
        if let Err(error) = state.refresh() {
            tracing::warn!(reason = %error.reason, "the schedule waits for the store");
            continue;
        }
        // Generations and ceremonies a replica that stopped left in the
        // middle (threat model S13), then, as at a start after a roll-back,
        // what a kill inside an HSM call tore: the replica that restarts
        // finds nothing left to roll back, so would never sweep it.
        let mut settled_any = false;
        match roll_back_abandoned(&state).await {
            Ok(0) => {}
            Ok(count) => {
                settled_any = true;
                tracing::warn!(count, "rolled back generations a stopped replica left");
            }
            Err(error) => {
                tracing::warn!(%error, "rolling back generations a stopped replica left failed; the next tick tries again")
            }
        }
        match crate::ceremonies::take_over(&state).await {
            Ok(0) => {}
            Ok(settled) => {
                settled_any = true;
                tracing::warn!(settled, "settled ceremonies a stopped replica held");
            }
            Err(error) => {
                tracing::warn!(reason = %error.reason, message = %error.message, "settling ceremonies a stopped replica held failed; the next tick tries again");
            }
        }
        if settled_any {
            if let Err(error) = sweep_torn_objects(&state).await {
                tracing::warn!(%error, "sweeping what a stopped replica tore failed; drift checks report it");
            }
        }
        // Rotations and destructions due while the disk is short of its
        // reserve wait for room, like the requests ([`crate::storage`]).
        if !state.headroom.is_short() {
            rotate_due(&state).await;
            destroy_due(&state).await;
        }
        let drift_every = state.lifecycle.drift_check_interval_secs;
        let drift_due = drift_every > 0
            && last_drift
                .as_ref()
                .is_none_or(|(at, _)| at.elapsed() >= Duration::from_secs(drift_every));
        if drift_due {
            let previous = last_drift.take().map(|(_, findings)| findings);
            last_drift = Some((Instant::now(), check_drift(&state, previous).await));
        }
    }
}

/// Whether this replica leads now: keeps the leadership it holds, takes it
/// if nobody holds it, and says so when it changes hands.
fn lead(state: &Custody, leader: &mut Option<custody_store::Claim>) -> bool {
    if leader.as_ref().is_some_and(|claim| !claim.is_held()) {
        tracing::warn!("this replica lost the leadership; the schedule passes to another");
        *leader = None;
    }
    if leader.is_none() {
        match state.shared.try_lead() {
            Ok(Some(claim)) => {
                tracing::info!(
                    "this replica leads: it runs rotations, destructions and drift checks"
                );
                *leader = Some(claim);
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, "leadership cannot be read; the schedule waits"),
        }
    }
    metrics::leader(leader.is_some());
    leader.is_some()
}

/// Why a key is due for rotation now, if it is.
async fn rotation_due(state: &Custody, key: &KeyRecord, now: i64) -> Option<&'static str> {
    if key.is_retired() {
        return None;
    }
    let primary = key.version(key.primary_version)?;
    if primary.state == VersionState::Compromised {
        return Some("the primary version is compromised");
    }
    if primary.state != VersionState::Active {
        return None;
    }
    if let (Some(until), Some(period)) = (
        primary.protect_until_ms(key.cryptoperiod_ms),
        key.cryptoperiod_ms,
    ) {
        let ahead = i64::try_from(state.lifecycle.rotate_ahead_secs)
            .unwrap_or(i64::MAX / 1000)
            .saturating_mul(1000)
            .min(period / 2);
        if now >= until - ahead {
            return Some("the cryptoperiod of the primary version is ending");
        }
    }
    if !primary.check_value.is_empty() {
        match state.budget.used(&primary.hsm_label).await {
            Ok(used) if used >= state.budget.limit() / 2 => {
                return Some("the primary version has used half its nonce budget");
            }
            Ok(_) => {}
            // Unknown is not "due": rotating on every tick would pile up
            // versions; encryptions themselves fail closed on this error.
            Err(error) => tracing::error!(%error, key = %key.key_id, "nonce budget unreadable"),
        }
    }
    None
}

async fn rotate_due(state: &Arc<Custody>) {
    let now = state.clock.now_ms();
    let mut overdue = 0;
    for key in state.registry.list(None, usize::MAX) {
        let Some(why) = rotation_due(state, &key, now).await else {
            continue;
        };
        let primary = key.primary_version;
        let ended = key
            .version(primary)
            .and_then(|v| v.protect_until_ms(key.cryptoperiod_ms))
            .is_some_and(|until| now >= until);
        if key.policies.contains_key("ROTATE") {
            // People decide when a quorum-gated key rotates; say it is due.
            tracing::warn!(key = %key.key_id, why, "rotation due, and needs an approved ROTATE operation");
            overdue += usize::from(ended);
            continue;
        }
        let mut audited = Audited::start("ScheduledRotate");
        audited.principal = SCHEDULER.into();
        audited.resource = format!("keys/{}", key.key_id);
        let request_id = format!("{SCHEDULER_REQUEST_PREFIX}v{primary}");
        let result = keys::rotate(
            state,
            &mut audited,
            &key.key_id,
            Some(&request_id),
            Some(primary),
            Trigger::Schedule,
            Approval::None,
        )
        .await;
        let failed = result.is_err();
        match audited.record(state, result).await {
            Ok(_) => tracing::info!(key = %key.key_id, why, "rotated on schedule"),
            Err(error) => {
                tracing::error!(key = %key.key_id, reason = %error.reason, "scheduled rotation failed")
            }
        }
        overdue += usize::from(failed && ended);
    }
    metrics::rotations_overdue(overdue);
}

/// Deals with the wall-clock steps the clock has seen (threat model F7):
/// each is audited, and a forward one holds every scheduled destruction
/// back by the step. A backward one needs nothing more: the clock keeps
/// the time where it was until the wall clock catches up.
pub async fn clock_steps(state: &Custody) {
    let mut steps = state.clock.take_steps().into_iter();
    while let Some(step) = steps.next() {
        let offset = step.offset_ms();
        let mut audited = Audited::start("ClockStep");
        audited.principal = SCHEDULER.into();
        audited.detail = format!(
            "the wall clock stepped {} by {:.3} s (expected {}, read {}{}); custodyd decides by {}",
            step.direction(),
            offset.unsigned_abs() as f64 / 1000.0,
            crate::audit::rfc3339_ms(step.expected_ms),
            crate::audit::rfc3339_ms(step.read_ms),
            if step.at_start { ", at start" } else { "" },
            crate::audit::rfc3339_ms(state.clock.now_ms()),
        );
        tracing::warn!(
            offset_ms = offset,
            at_start = step.at_start,
            "wall clock step"
        );
        let result = if offset > 0 && !step.at_start {
            match keys::hold_destructions(state, &mut audited, offset).await {
                Ok(held) => {
                    audited.detail.push_str(&format!(
                        "; {} scheduled destructions held back by the step: {}",
                        held.len(),
                        held.join(", ")
                    ));
                    Ok(())
                }
                Err(error) => Err(error),
            }
        } else {
            Ok(())
        };
        let held = result.is_ok();
        if let Err(error) = audited.record(state, result).await {
            tracing::error!(reason = %error.reason, "recording a clock step failed");
        }
        if !held {
            // Not dealt with: destructions keep waiting for it (a second
            // hold of keys already moved only moves them later still).
            let mut left = vec![step];
            left.extend(steps);
            state.clock.return_steps(left);
            return;
        }
    }
}

async fn destroy_due(state: &Arc<Custody>) {
    let now = state.clock.now_ms();
    // A step seen after this turn's check: deal with it first (next turn).
    if state.clock.steps_pending() {
        return;
    }
    for key in state.registry.list(None, usize::MAX) {
        for version in &key.versions {
            // A destruction begun is finished whatever its time says.
            let due = (version.destroy_at_ms.is_some_and(|at| at <= now)
                || version.destroying_since_ms.is_some())
                && version.state != VersionState::Destroyed
                && version.legal_hold.is_none()
                // A key-destruction ceremony witnesses it (`keys::check_due`).
                && version.reserved_by.is_none();
            if !due {
                continue;
            }
            let mut audited = Audited::start("ScheduledDestroy");
            audited.principal = SCHEDULER.into();
            audited.resource = version_name(&key.key_id, version.version);
            let result = keys::destroy_due(state, &mut audited, &key.key_id, version.version).await;
            match audited.record(state, result).await {
                Ok(_) => {
                    metrics::version_destroyed("done");
                    tracing::info!(version = %version.hsm_label, "destroyed on schedule");
                }
                Err(error) => {
                    metrics::version_destroyed("failed");
                    tracing::error!(version = %version.hsm_label, reason = %error.reason, "scheduled destruction failed");
                }
            }
        }
    }
}

/// Runs a drift check; audits it when the findings differ from `previous`
/// (so a standing difference is not recorded every interval). Returns the
/// findings as recorded.
async fn check_drift(state: &Custody, previous: Option<String>) -> String {
    // A check someone asked for is running: this turn is skipped.
    let Some(report) = drift::check_unless_running(state).await else {
        return previous.unwrap_or_default();
    };
    match report {
        Ok(report) => {
            let findings = report
                .findings
                .iter()
                .map(|f| format!("{} {} {}", f.kind.as_str(), f.label, f.class.as_str()))
                .collect::<Vec<_>>()
                .join("; ");
            let changed = match &previous {
                Some(previous) => *previous != findings,
                None => !findings.is_empty(),
            };
            if changed {
                for finding in &report.findings {
                    tracing::warn!(kind = finding.kind.as_str(), label = %finding.label, detail = %finding.detail, "drift");
                }
                let event = Event::Request {
                    principal: SCHEDULER.into(),
                    method: "DriftCheck".into(),
                    resource: String::new(),
                    detail: findings.clone(),
                    outcome: if report.findings.is_empty() {
                        "ok"
                    } else {
                        "DRIFT"
                    }
                    .into(),
                    request_id: None,
                };
                if let Err(error) = state.audit.append(event).await {
                    tracing::error!(%error, "a drift check could not be audited");
                }
            }
            findings
        }
        Err(error) => {
            metrics::drift_failed();
            tracing::error!(%error, "drift check failed");
            previous.unwrap_or_default()
        }
    }
}
