//! Destruction is never immediate: an approved DESTROY_VERSION schedules it
//! after the cancel window, `CancelDestroy` or a legal hold stops it, and
//! the scheduler carries it out once due. Releasing a legal hold needs an
//! approved RELEASE_LEGAL_HOLD.

use hsm_shim::{ErrorKind, KeyLabel};

use super::{found, not_destroyed, update_version, version_of};
use crate::action::Audited;
use crate::dual_control::operation::Spec;
use crate::dual_control::quorum::Quorum;
use crate::lifecycle;
use crate::names::version_name;
use crate::registry::{KeyRecord, VersionRecord, VersionState};
use crate::{Custody, Error, Reason};

/// Refuses to schedule the destruction of a version that is in use, held,
/// or already scheduled. A primary version is destroyed only once it is
/// out of use like any other (a retired key's deactivated primary, or a
/// compromised one): its state decides, not its being primary.
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
    not_held(existing, &name)?;
    if existing.destroy_at_ms.is_some() {
        return Err(Error::new(
            Reason::AlreadyScheduled,
            format!("{name} is already scheduled for destruction"),
        ));
    }
    Ok(())
}

/// Refuses a version under a legal hold: neither a schedule nor any
/// carrier of one destroys it.
fn not_held(version: &VersionRecord, name: &str) -> Result<(), Error> {
    match version.legal_hold {
        Some(_) => Err(Error::new(
            Reason::LegalHold,
            format!("{name} is under a legal hold"),
        )),
        None => Ok(()),
    }
}

/// Schedules a version's destruction after the cancel window (only
/// through a DESTROY_VERSION operation approved under `approved_under`,
/// recorded with the schedule: threat model C28).
pub async fn schedule_destroy(
    custody: &Custody,
    audited: &mut Audited,
    key_id: &str,
    version: u32,
    approved_under: &Quorum,
) -> Result<KeyRecord, Error> {
    let (_guard, current) = crate::keys::locked(custody, key_id).await?;
    check_destroyable(&current, version)?;
    let at = custody.clock.now_ms() + custody.lifecycle.destroy_cancel_window_ms();
    audited.detail = format!("destroy at {}", crate::audit::rfc3339_ms(at));
    audited.intent(custody).await?;
    update_version(custody, &current, version, |v| {
        v.destroy_at_ms = Some(at);
        v.destroy_approved_under = Some(approved_under.clone());
    })
    .await
}

/// Cancels a scheduled destruction.
pub async fn cancel_destroy(
    custody: &Custody,
    audited: &mut Audited,
    key_id: &str,
    version: u32,
) -> Result<KeyRecord, Error> {
    let (_guard, current) = crate::keys::locked(custody, key_id).await?;
    let existing = not_destroyed(&current, version)?;
    not_being_destroyed(&current, version)?;
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
    update_version(custody, &current, version, |v| {
        v.destroy_at_ms = None;
        v.destroy_approved_under = None;
    })
    .await
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
    let (_guard, current) = crate::keys::locked(custody, key_id).await?;
    let existing = not_destroyed(&current, version)?;
    not_being_destroyed(&current, version)?;
    audited.detail = if existing.destroy_at_ms.is_some() {
        format!("hold: {reason}; cancels the scheduled destruction")
    } else {
        format!("hold: {reason}")
    };
    audited.intent(custody).await?;
    update_version(custody, &current, version, |v| {
        v.legal_hold = Some(reason.to_string());
        v.destroy_at_ms = None;
        v.destroy_approved_under = None;
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
    let (_guard, current) = crate::keys::locked(custody, key_id).await?;
    if version_of(&current, version)?.legal_hold.is_none() {
        return Err(Error::new(
            Reason::NoLegalHold,
            format!("{} has no legal hold", version_name(key_id, version)),
        ));
    }
    audited.intent(custody).await?;
    update_version(custody, &current, version, |v| v.legal_hold = None).await
}

/// Who carries out an approved destruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier<'a> {
    /// The scheduler, once the cancel window has passed.
    Scheduler,
    /// The key-destruction ceremony of this id, witnessing it.
    Ceremony(&'a str),
}

/// Whether `carrier` may take on the scheduled destruction of `version`:
/// approved and scheduled (DESTROY_VERSION), under the DESTROY_VERSION
/// quorum still in force ([`crate::authz::quorum_for`]: an approval counts
/// under the policy it was given for, as a pending operation's does), not
/// cancelled, not held, not destroyed, still out of use (the rules that
/// allowed the schedule), and reserved by no other carrier. A
/// key-destruction ceremony reserves a version with this, when it opens;
/// the cancel window need not have passed yet ([`check_due`] is asked
/// before anything is destroyed).
pub fn check_reservable<'r>(
    custody: &Custody,
    record: &'r KeyRecord,
    version: u32,
    carrier: Carrier<'_>,
) -> Result<&'r VersionRecord, Error> {
    let in_force = crate::authz::quorum_for(
        custody,
        &Spec::DestroyVersion {
            key_id: record.key_id.clone(),
            version,
        },
    )?;
    reservable(record, version, carrier, &in_force)
}

/// [`check_reservable`], with the DESTROY_VERSION quorum now in force.
fn reservable<'r>(
    record: &'r KeyRecord,
    version: u32,
    carrier: Carrier<'_>,
    in_force: &Quorum,
) -> Result<&'r VersionRecord, Error> {
    let existing = not_destroyed(record, version)?;
    let name = version_name(&record.key_id, version);
    not_held(existing, &name)?;
    if existing.destroy_at_ms.is_none() {
        return Err(Error::new(
            Reason::NotScheduled,
            format!(
                "{name} is not scheduled for destruction: an approved DESTROY_VERSION schedules it (or it was cancelled)"
            ),
        ));
    }
    if existing.destroy_approved_under.as_ref() != Some(in_force) {
        return Err(Error::new(
            Reason::PolicyChanged,
            format!(
                "{name}'s destruction was approved under {}; DESTROY_VERSION now needs {}: it is not carried out (CancelDestroy, then request it again)",
                existing
                    .destroy_approved_under
                    .as_ref()
                    .map_or_else(|| "no recorded quorum".into(), Quorum::text),
                in_force.text()
            ),
        ));
    }
    if !lifecycle::may_schedule_destroy(existing.state) {
        return Err(Error::new(
            Reason::IllegalTransition,
            format!("{name} is in use again; cancel the destruction"),
        ));
    }
    // A destruction the scheduler began is the scheduler's to finish.
    if carrier != Carrier::Scheduler {
        not_being_destroyed(record, version)?;
    }
    match (&existing.reserved_by, carrier) {
        (None, _) => Ok(existing),
        (Some(by), Carrier::Ceremony(id)) if by == id => Ok(existing),
        (Some(by), _) => Err(reserved(&name, by)),
    }
}

/// Refuses a carrier other than the key-destruction ceremony `by` that
/// reserved version `name`.
fn reserved(name: &str, by: &str) -> Error {
    Error::new(
        Reason::ReservedByCeremony,
        format!(
            "{name} is reserved by the key-destruction ceremony {by}, which witnesses its destruction"
        ),
    )
}

/// Whether `carrier` may destroy `version` now: [`check_reservable`], and
/// the cancel window over (no clock step pending that may have crossed
/// it, threat model F7). The one rule the scheduler and a key-destruction
/// ceremony both ask, with the registry locked, just before the HSM call.
pub fn check_due<'r>(
    custody: &Custody,
    record: &'r KeyRecord,
    version: u32,
    carrier: Carrier<'_>,
) -> Result<&'r VersionRecord, Error> {
    let existing = check_reservable(custody, record, version, carrier)?;
    let now = custody.clock.now_ms();
    let due = existing.destroy_at_ms.is_some_and(|at| at <= now);
    if !due || custody.clock.steps_pending() {
        return Err(Error::new(
            Reason::NotDue,
            format!(
                "{} is not due: its cancel window ends at {}",
                version_name(&record.key_id, version),
                crate::audit::rfc3339_ms(existing.destroy_at_ms.unwrap_or_default())
            ),
        ));
    }
    Ok(existing)
}

/// Destroys a version whose cancel window has passed (the scheduler).
/// Idempotent: an object already gone counts as destroyed, so a crash
/// between the HSM call and the registry write is finished next time. A
/// version a key-destruction ceremony reserved is left to it.
///
/// Before the HSM call the version is marked as being destroyed, in a
/// write fenced by the key's lock (threat model S14): a leader that
/// stalled past its lease between the due check and the destroy, while
/// another replica cancelled, held or re-approved, writes nothing and so
/// destroys nothing; once the mark is written, cancels and holds are
/// refused and the next leader finishes what this one began.
pub async fn destroy_due(
    custody: &Custody,
    audited: &mut Audited,
    key_id: &str,
    version: u32,
) -> Result<KeyRecord, Error> {
    let (_guard, mut current) = crate::keys::locked(custody, key_id).await?;
    let existing = not_destroyed(&current, version)?;
    let begun = existing.destroying_since_ms.is_some();
    let label = KeyLabel::new(existing.hsm_label.clone())?;
    if begun {
        if let Some(by) = &existing.reserved_by {
            return Err(reserved(&version_name(key_id, version), by));
        }
    } else {
        match check_due(custody, &current, version, Carrier::Scheduler) {
            // An approval no longer in force is void: the schedule is
            // dropped (audited once, not every turn).
            Err(error) if error.reason == Reason::PolicyChanged => {
                audited.detail = "schedule dropped: approved under another quorum".into();
                audited.intent(custody).await?;
                update_version(custody, &current, version, |v| {
                    v.destroy_at_ms = None;
                    v.destroy_approved_under = None;
                })
                .await?;
                return Err(error);
            }
            other => other?,
        };
    }
    audited.intent(custody).await?;
    crate::failpoint::hit("destroy.after_due_check");
    if !begun {
        let now = custody.clock.now_ms();
        current = std::sync::Arc::new(
            update_version(custody, &current, version, |v| {
                v.destroying_since_ms = Some(now);
            })
            .await?,
        );
        crate::failpoint::hit("destroy.after_mark");
    }
    custody
        .hsm
        .run(move |session| match session.destroy(&label) {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
            other => other,
        })
        .await?;
    let now = custody.clock.now_ms();
    update_version(custody, &current, version, |v| {
        v.state = VersionState::Destroyed;
        v.state_ms = now;
        v.destroy_at_ms = Some(now);
    })
    .await
}

/// Refuses to stop or undo a destruction the scheduler has begun
/// ([`destroy_due`]): it is decided, and its object may be gone already.
pub fn not_being_destroyed(record: &KeyRecord, version: u32) -> Result<(), Error> {
    match version_of(record, version)?.destroying_since_ms {
        Some(since) => Err(Error::new(
            Reason::AlreadyDestroyed,
            format!(
                "{}'s destruction began at {} and is being finished: it can no longer be cancelled, held or used",
                version_name(&record.key_id, version),
                crate::audit::rfc3339_ms(since)
            ),
        )),
        None => Ok(()),
    }
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
    let _guard = crate::keys::lock(custody).await?;
    audited.intent(custody).await?;
    let mut held = Vec::new();
    for key in custody.registry.list(None, usize::MAX) {
        let pending: Vec<u32> = key
            .versions
            .iter()
            // A destruction begun is decided: no clock step moves it.
            .filter(|v| {
                v.destroy_at_ms.is_some()
                    && v.destroying_since_ms.is_none()
                    && v.state != VersionState::Destroyed
            })
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

/// Reserves `versions` of `key_id` for the key-destruction ceremony
/// `ceremony`, durably in the registry: the scheduler leaves them to it
/// ([`check_due`]). Each must be reservable ([`check_reservable`]);
/// reserving again for the same ceremony changes nothing.
pub async fn reserve_for_ceremony(
    custody: &Custody,
    key_id: &str,
    versions: &[u32],
    ceremony: &str,
) -> Result<KeyRecord, Error> {
    let (_guard, current) = crate::keys::locked(custody, key_id).await?;
    for version in versions {
        check_reservable(custody, &current, *version, Carrier::Ceremony(ceremony))?;
    }
    let mut record = KeyRecord::clone(&current);
    for v in record
        .versions
        .iter_mut()
        .filter(|v| versions.contains(&v.version))
    {
        v.reserved_by = Some(ceremony.to_string());
    }
    if record != *current {
        crate::keys::write(custody, record.clone()).await?;
    }
    Ok(record)
}

/// Clears every reservation the ceremony `ceremony` holds on `key_id`
/// (its roll-back or abort): an approved destruction not cancelled is the
/// scheduler's again. Idempotent; a key that is gone has none.
pub async fn release_ceremony_reservation(
    custody: &Custody,
    key_id: &str,
    ceremony: &str,
) -> Result<(), Error> {
    let _guard = crate::keys::lock(custody).await?;
    let Some(current) = custody.registry.get(key_id) else {
        return Ok(());
    };
    let mut record = KeyRecord::clone(&current);
    for v in record.versions.iter_mut() {
        if v.reserved_by.as_deref() == Some(ceremony) {
            v.reserved_by = None;
        }
    }
    if record != *current {
        crate::keys::write(custody, record).await?;
    }
    Ok(())
}

/// Records `versions` of `current` destroyed by the ceremony that held
/// them (the caller holds the registry lock and destroyed their objects).
pub async fn mark_destroyed(
    custody: &Custody,
    current: &KeyRecord,
    versions: &[u32],
) -> Result<KeyRecord, Error> {
    let now = custody.clock.now_ms();
    let mut record = current.clone();
    for v in record
        .versions
        .iter_mut()
        .filter(|v| versions.contains(&v.version))
    {
        if v.state != VersionState::Destroyed {
            v.state = VersionState::Destroyed;
            v.state_ms = now;
            v.destroy_at_ms = Some(now);
        }
        v.reserved_by = None;
    }
    crate::keys::write(custody, record.clone()).await?;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(state: VersionState, destroy_at_ms: Option<i64>) -> KeyRecord {
        let version = |n: u32, state: VersionState, destroy_at_ms: Option<i64>| VersionRecord {
            version: n,
            state,
            created_ms: 0,
            state_ms: 0,
            hsm_label: format!("key/k/v{n}"),
            public_key_der_hex: String::new(),
            public_key_pem: String::new(),
            activated_ms: Some(0),
            destroy_at_ms,
            legal_hold: None,
            check_value: String::new(),
            certificate_chain_pem: Vec::new(),
            reserved_by: None,
            destroying_since_ms: None,
            destroy_approved_under: destroy_at_ms.map(|_| quorum(2)),
        };
        KeyRecord {
            key_id: "k".into(),
            algorithm: "EC_SIGN_P256_SHA256".into(),
            allowed_signers: vec![],
            primary_version: 2,
            versions: vec![
                version(1, state, destroy_at_ms),
                version(2, VersionState::Active, None),
            ],
            created_ms: 0,
            policies: Default::default(),
            cryptoperiod_ms: None,
            min_version: 0,
            rotation_requests: Vec::new(),
            backup_exportable: false,
            retired_at_version: None,
        }
    }

    fn quorum(required: u32) -> Quorum {
        Quorum::new(["a", "b", "c"].map(String::from), required).expect("quorum")
    }

    fn refused(record: &KeyRecord, version: u32, carrier: Carrier<'_>) -> Option<Reason> {
        reservable(record, version, carrier, &quorum(2))
            .err()
            .map(|e| e.reason)
    }

    #[test]
    fn a_destruction_begun_is_not_stopped_nor_its_version_brought_back_into_use() {
        // A staged (pre-activation) version is the one that may be
        // activated while scheduled.
        let mut begun = key(VersionState::PreActivation, Some(10));
        begun.versions[0].destroying_since_ms = Some(11);
        let decided = not_being_destroyed(&begun, 1).unwrap_err();
        assert_eq!(decided.reason, Reason::AlreadyDestroyed);
        assert!(
            decided.message.contains("can no longer be cancelled"),
            "{}",
            decided.message
        );
        assert!(not_being_destroyed(&begun, 2).is_ok());
        let back = crate::keys::state::check_transition(&begun, 1, VersionState::Active);
        assert_eq!(back.unwrap_err().reason, Reason::AlreadyDestroyed);
        // No ceremony takes it over; the scheduler finishes it.
        assert_eq!(
            refused(&begun, 1, Carrier::Ceremony("c-1")),
            Some(Reason::AlreadyDestroyed)
        );
        assert_eq!(refused(&begun, 1, Carrier::Scheduler), None);
        // Marking it compromised as it goes stays possible.
        assert!(crate::keys::state::check_transition(&begun, 1, VersionState::Compromised).is_ok());
        let scheduled = key(VersionState::PreActivation, Some(10));
        assert!(crate::keys::state::check_transition(&scheduled, 1, VersionState::Active).is_ok());
    }

    #[test]
    fn only_an_approved_scheduled_retired_unheld_version_is_reservable_by_one_carrier() {
        let ceremony = Carrier::Ceremony("c-1");
        let scheduled = key(VersionState::Deactivated, Some(10));
        assert_eq!(refused(&scheduled, 1, ceremony), None);
        assert_eq!(refused(&scheduled, 1, Carrier::Scheduler), None);
        let unscheduled = key(VersionState::Deactivated, None);
        assert_eq!(
            refused(&unscheduled, 1, ceremony),
            Some(Reason::NotScheduled)
        );
        let mut held = key(VersionState::Deactivated, None);
        held.versions[0].legal_hold = Some("case".into());
        assert_eq!(refused(&held, 1, ceremony), Some(Reason::LegalHold));
        let in_use = key(VersionState::Active, Some(10));
        assert_eq!(
            refused(&in_use, 1, ceremony),
            Some(Reason::IllegalTransition)
        );
        assert_eq!(refused(&scheduled, 2, ceremony), Some(Reason::NotScheduled));
        let gone = key(VersionState::Destroyed, Some(10));
        assert_eq!(refused(&gone, 1, ceremony), Some(Reason::AlreadyDestroyed));

        // Approved under another quorum than the one now in force (C28):
        // tightened, loosened, or none recorded.
        for other in [Some(quorum(3)), Some(quorum(2)), None] {
            let mut changed = scheduled.clone();
            changed.versions[0].destroy_approved_under = other.clone();
            let in_force = quorum(3);
            let refused = reservable(&changed, 1, ceremony, &in_force)
                .err()
                .map(|e| e.reason);
            let expected = (other != Some(in_force.clone())).then_some(Reason::PolicyChanged);
            assert_eq!(refused, expected, "approved under {other:?}");
        }

        // Reserved: its ceremony only; neither the scheduler nor another.
        let mut reserved = scheduled.clone();
        reserved.versions[0].reserved_by = Some("c-1".into());
        assert_eq!(refused(&reserved, 1, ceremony), None);
        assert_eq!(
            refused(&reserved, 1, Carrier::Scheduler),
            Some(Reason::ReservedByCeremony)
        );
        assert_eq!(
            refused(&reserved, 1, Carrier::Ceremony("c-2")),
            Some(Reason::ReservedByCeremony)
        );
    }
}
