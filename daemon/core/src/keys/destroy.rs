//! Destruction is never immediate: an approved DESTROY_VERSION schedules it
//! after the cancel window, `CancelDestroy` or a legal hold stops it, and
//! the scheduler carries it out once due. Releasing a legal hold needs an
//! approved RELEASE_LEGAL_HOLD.

use hsm_shim::{ErrorKind, KeyLabel};

use super::{found, not_destroyed, update_version, version_of};
use crate::action::Audited;
use crate::lifecycle;
use crate::names::version_name;
use crate::registry::{KeyRecord, VersionState};
use crate::{Custody, Error, Reason};

/// Refuses to schedule the destruction of a version that is in use, held,
/// primary, or already scheduled.
pub fn check_destroyable(record: &KeyRecord, version: u32) -> Result<(), Error> {
    let existing = version_of(record, version)?;
    let name = version_name(&record.key_id, version);
    if !lifecycle::may_schedule_destroy(existing.state) {
        return Err(Error::new(
            Reason::IllegalTransition,
            format!(
                "{name} is {:?}: only pre-activation, deactivated or compromised versions are destroyed",
                existing.state
            ),
        ));
    }
    if record.primary_version == version {
        return Err(Error::new(
            Reason::PrimaryVersion,
            "the primary version cannot be destroyed; rotate the key first",
        ));
    }
    if existing.legal_hold.is_some() {
        return Err(Error::new(
            Reason::LegalHold,
            format!("{name} is under a legal hold"),
        ));
    }
    if existing.destroy_at_ms.is_some() {
        return Err(Error::new(
            Reason::AlreadyScheduled,
            format!("{name} is already scheduled for destruction"),
        ));
    }
    Ok(())
}

/// Schedules a version's destruction after the cancel window (only
/// through an approved DESTROY_VERSION operation).
pub async fn schedule_destroy(
    custody: &Custody,
    audited: &mut Audited,
    key_id: &str,
    version: u32,
) -> Result<KeyRecord, Error> {
    let _guard = custody
        .registry
        .lock()
        .await
        .map_err(crate::keys::registry_failure)?;
    let current = found(custody, key_id)?;
    check_destroyable(&current, version)?;
    let at = custody.clock.now_ms() + custody.lifecycle.destroy_cancel_window_ms();
    audited.detail = format!("destroy at {}", crate::audit::rfc3339_ms(at));
    audited.intent(custody).await?;
    update_version(custody, &current, version, |v| v.destroy_at_ms = Some(at)).await
}

/// Cancels a scheduled destruction.
pub async fn cancel_destroy(
    custody: &Custody,
    audited: &mut Audited,
    key_id: &str,
    version: u32,
) -> Result<KeyRecord, Error> {
    let _guard = custody
        .registry
        .lock()
        .await
        .map_err(crate::keys::registry_failure)?;
    let current = found(custody, key_id)?;
    let existing = not_destroyed(&current, version)?;
    if existing.destroy_at_ms.is_none() {
        return Err(Error::new(
            Reason::NotScheduled,
            format!(
                "{} is not scheduled for destruction",
                version_name(key_id, version)
            ),
        ));
    }
    audited.intent(custody).await?;
    update_version(custody, &current, version, |v| v.destroy_at_ms = None).await
}

/// Places a legal hold (cancelling a scheduled destruction).
pub async fn set_legal_hold(
    custody: &Custody,
    audited: &mut Audited,
    key_id: &str,
    version: u32,
    reason: &str,
) -> Result<KeyRecord, Error> {
    let reason = crate::text::reason(reason)?;
    if reason.is_empty() {
        return Err(Error::new(
            Reason::ReasonRequired,
            "a legal hold needs a reason (a case reference, say)",
        ));
    }
    let _guard = custody
        .registry
        .lock()
        .await
        .map_err(crate::keys::registry_failure)?;
    let current = found(custody, key_id)?;
    let existing = not_destroyed(&current, version)?;
    audited.detail = if existing.destroy_at_ms.is_some() {
        format!("hold: {reason}; cancels the scheduled destruction")
    } else {
        format!("hold: {reason}")
    };
    audited.intent(custody).await?;
    update_version(custody, &current, version, |v| {
        v.legal_hold = Some(reason.to_string());
        v.destroy_at_ms = None;
    })
    .await
}

/// Releases a legal hold (only through an approved RELEASE_LEGAL_HOLD).
pub async fn release_legal_hold(
    custody: &Custody,
    audited: &mut Audited,
    key_id: &str,
    version: u32,
) -> Result<KeyRecord, Error> {
    let _guard = custody
        .registry
        .lock()
        .await
        .map_err(crate::keys::registry_failure)?;
    let current = found(custody, key_id)?;
    if version_of(&current, version)?.legal_hold.is_none() {
        return Err(Error::new(
            Reason::NoLegalHold,
            format!("{} has no legal hold", version_name(key_id, version)),
        ));
    }
    audited.intent(custody).await?;
    update_version(custody, &current, version, |v| v.legal_hold = None).await
}

/// Destroys a version whose cancel window has passed (the scheduler).
/// Idempotent: an object already gone counts as destroyed, so a crash
/// between the HSM call and the registry write is finished next time.
pub async fn destroy_due(
    custody: &Custody,
    audited: &mut Audited,
    key_id: &str,
    version: u32,
) -> Result<KeyRecord, Error> {
    let _guard = custody
        .registry
        .lock()
        .await
        .map_err(crate::keys::registry_failure)?;
    let current = found(custody, key_id)?;
    let existing = version_of(&current, version)?;
    let now = custody.clock.now_ms();
    // A clock step seen and not yet dealt with may have crossed the window
    // (threat model F7): the scheduler holds destructions back first.
    let due = existing.destroy_at_ms.is_some_and(|at| at <= now)
        && !custody.clock.steps_pending()
        && existing.legal_hold.is_none()
        && existing.state != VersionState::Destroyed;
    if !due {
        return Err(Error::new(
            Reason::NotDue,
            "not scheduled, not yet due, held or already destroyed",
        ));
    }
    // The rules that allowed the schedule must still hold now.
    if !lifecycle::may_schedule_destroy(existing.state) || current.primary_version == version {
        return Err(Error::new(
            Reason::IllegalTransition,
            "the version is in use again (state or primary); cancel the destruction",
        ));
    }
    audited.intent(custody).await?;
    let label = KeyLabel::new(existing.hsm_label.clone())?;
    custody
        .hsm
        .run(move |session| match session.destroy(&label) {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
            other => other,
        })
        .await?;
    update_version(custody, &current, version, |v| {
        v.state = VersionState::Destroyed;
        v.state_ms = now;
        v.destroy_at_ms = Some(now);
    })
    .await
}

/// A forward clock step of `by_ms` was seen (threat model F7): every
/// scheduled destruction not yet carried out moves `by_ms` later, so that
/// its cancel window still lasts its full length in real time. Returns the
/// versions held, by name.
pub async fn hold_destructions(
    custody: &Custody,
    audited: &mut Audited,
    by_ms: i64,
) -> Result<Vec<String>, Error> {
    let _guard = custody
        .registry
        .lock()
        .await
        .map_err(crate::keys::registry_failure)?;
    audited.intent(custody).await?;
    let mut held = Vec::new();
    for key in custody.registry.list(None, usize::MAX) {
        let pending: Vec<u32> = key
            .versions
            .iter()
            .filter(|v| v.destroy_at_ms.is_some() && v.state != VersionState::Destroyed)
            .map(|v| v.version)
            .collect();
        if pending.is_empty() {
            continue;
        }
        let found = found(custody, &key.key_id)?;
        let mut current = KeyRecord::clone(&found);
        for version in pending {
            current = update_version(custody, &current, version, |v| {
                v.destroy_at_ms = v.destroy_at_ms.map(|at| at.saturating_add(by_ms));
            })
            .await?;
            held.push(version_name(&key.key_id, version));
        }
    }
    Ok(held)
}
