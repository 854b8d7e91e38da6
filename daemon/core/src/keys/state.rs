//! Version state changes (NIST SP 800-57), compromise with its revocation
//! notice and forced rotation, and a key's cryptoperiod and minimum version.

use super::rotate::{Trigger, rotate_locked};
use super::{update_version, version_of};
use crate::action::Audited;
use crate::audit::Event;
use crate::authz::{Approval, quorum_gate};
use crate::lifecycle;
use crate::names::version_name;
use crate::registry::{KeyRecord, VersionState};
use crate::{Custody, Error, Reason};

const MIN_CRYPTOPERIOD_MS: i64 = 60_000;
const MAX_CRYPTOPERIOD_MS: i64 = 100 * 366 * 24 * 3600 * 1000;

/// A requested cryptoperiod of `seconds` and `nanos`: `None` when zero (no
/// cryptoperiod), else milliseconds between 60 seconds and 100 years.
pub fn cryptoperiod_ms(seconds: i64, nanos: i32) -> Result<Option<i64>, Error> {
    if seconds == 0 && nanos == 0 {
        return Ok(None);
    }
    let ms = seconds
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(i64::from(nanos / 1_000_000)))
        .filter(|ms| (MIN_CRYPTOPERIOD_MS..=MAX_CRYPTOPERIOD_MS).contains(ms))
        .ok_or_else(|| {
            Error::new(
                Reason::BadCryptoperiod,
                "a cryptoperiod is between 60 seconds and 100 years",
            )
        })?;
    Ok(Some(ms))
}

/// A requested state and reason, checked on their own: a state that a
/// request may ask for, and a reason where one is needed, printable and
/// capped ([`crate::text::reason`]). Returns the trimmed reason.
pub fn requested_state(target: VersionState, reason: &str) -> Result<&str, Error> {
    if target == VersionState::Destroyed {
        return Err(Error::new(
            Reason::IllegalTransition,
            "DESTROYED is reached only through a scheduled destruction: request DESTROY_VERSION",
        ));
    }
    let reason = crate::text::reason(reason)?;
    if target == VersionState::Compromised && reason.is_empty() {
        return Err(Error::new(
            Reason::ReasonRequired,
            "say why the version is compromised: it goes into the revocation notice",
        ));
    }
    Ok(reason)
}

/// Refuses a state change the lifecycle forbids for `version` of `record`.
pub fn check_transition(
    record: &KeyRecord,
    version: u32,
    target: VersionState,
) -> Result<(), Error> {
    let existing = version_of(record, version)?;
    if !lifecycle::transition_allowed(existing.state, target) {
        return Err(Error::new(
            Reason::IllegalTransition,
            format!(
                "{} cannot go from {:?} to {target:?}",
                version_name(&record.key_id, version),
                existing.state
            ),
        ));
    }
    if lifecycle::in_use(target) {
        super::destroy::not_being_destroyed(record, version)?;
    }
    if target == VersionState::Deactivated
        && record.primary_version == version
        && record
            .versions
            .iter()
            .any(|v| v.version != version && lifecycle::in_use(v.state))
    {
        // Deactivating the primary retires the key as a whole; while
        // another version is in use, rotating is what was meant.
        return Err(Error::new(
            Reason::PrimaryVersion,
            "the primary version cannot be deactivated while another version is active or suspended; rotate the key first, or deactivate the others to retire the key",
        ));
    }
    Ok(())
}

/// Changes a version's state; see [`Approval`]. Marking the primary
/// version compromised rotates the key (unless its ROTATE policy needs
/// officers, who are then asked to) and records a revocation notice.
/// Returns the record and the version changed.
pub async fn set_state(
    custody: &Custody,
    audited: &mut Audited,
    key_id: &str,
    version: u32,
    target: VersionState,
    reason: &str,
    approval: Approval,
) -> Result<KeyRecord, Error> {
    let reason = requested_state(target, reason)?;
    audited.detail = format!("to {target:?}");
    let (_guard, current) = crate::keys::locked(custody, key_id).await?;
    crate::authz::state_change_gate(&current, version, target, approval)?;
    check_transition(&current, version, target)?;
    let promotion = crate::authz::is_promotion(&current, version, target);
    if promotion {
        audited.detail = format!(
            "to {target:?}, promoted: primary from version {} (a staged version)",
            current.primary_version
        );
    }
    audited.intent(custody).await?;
    let now = custody.clock.now_ms();
    let mut promoted = (*current).clone();
    if promotion {
        promoted.primary_version = version;
    }
    if target == VersionState::Deactivated && current.primary_version == version {
        // check_transition let the primary go only with nothing else in
        // use: the key retires.
        promoted.retired_at_version = Some(version);
    }
    let mut record = update_version(custody, &promoted, version, |v| {
        v.state = target;
        v.state_ms = now;
        if target == VersionState::Active && v.activated_ms.is_none() {
            v.activated_ms = Some(now);
        }
    })
    .await?;
    if target == VersionState::Compromised {
        // The notice goes out before anything else can fail or wait (a
        // rotation may take seconds for RSA).
        let compromised = version_of(&record, version)?.clone();
        // A retired key stays retired: its compromised primary is not
        // replaced (the notice says so).
        let rotate = current.primary_version == version && !current.is_retired();
        let gated = record.policies.contains_key("ROTATE");
        let next = record.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
        let replacement = if rotate && !gated {
            format!("rotating to version {next} now (the scheduler retries if this fails)")
        } else if rotate {
            "the ROTATE policy needs officers: request a ROTATE operation".into()
        } else if current.is_retired() {
            "none: the key is retired".into()
        } else {
            format!(
                "not the primary version (primary is {})",
                record.primary_version
            )
        };
        let public_key_sha256 = hex::decode(&compromised.public_key_der_hex)
            .map(|der| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(der)))
            .unwrap_or_default();
        custody
            .audit
            .append(Event::RevocationNotice {
                version: version_name(key_id, version),
                principal: audited.principal.clone(),
                reason: reason.to_string(),
                public_key_sha256,
                check_value: compromised.check_value.clone(),
                replacement,
            })
            .await
            .map_err(|e| Error::audit_unavailable(&e))?;
        if rotate && !gated {
            let mut rotation = Audited::start("CompromiseRotate");
            rotation.principal = audited.principal.clone();
            rotation.resource = format!("keys/{key_id}");
            let rotated =
                rotate_locked(custody, &mut rotation, &record, None, Trigger::Compromise).await;
            if let Ok(rotated) = rotation.record(custody, rotated).await {
                record = rotated;
            }
        }
    }
    Ok(record)
}

/// A change to a key's cryptoperiod or minimum version.
#[derive(Debug, Clone, Default)]
pub struct KeyUpdate {
    /// `Some(None)` removes the cryptoperiod; `Some(Some(ms))` sets it.
    pub cryptoperiod_ms: Option<Option<i64>>,
    /// The lowest version that may still verify or decrypt.
    pub min_version: Option<u32>,
}

impl KeyUpdate {
    /// Refuses an update that changes nothing.
    pub fn check(&self) -> Result<(), Error> {
        if self.cryptoperiod_ms.is_none() && self.min_version.is_none() {
            return Err(Error::new(
                Reason::NothingToUpdate,
                "set cryptoperiod or min_version",
            ));
        }
        Ok(())
    }
}

/// Changes a key's cryptoperiod or minimum version; see [`Approval`].
pub async fn update(
    custody: &Custody,
    audited: &mut Audited,
    key_id: &str,
    update: &KeyUpdate,
    approval: Approval,
) -> Result<KeyRecord, Error> {
    let (_guard, current) = crate::keys::locked(custody, key_id).await?;
    quorum_gate(&current, "UPDATE_KEY", approval)?;
    let mut record = (*current).clone();
    let mut changes = Vec::new();
    if let Some(period) = update.cryptoperiod_ms {
        record.cryptoperiod_ms = period;
        changes.push(match period {
            Some(ms) => format!("cryptoperiod {} s", ms / 1000),
            None => "no cryptoperiod".into(),
        });
    }
    if let Some(min) = update.min_version {
        if min > record.primary_version {
            return Err(Error::new(
                Reason::BadMinVersion,
                format!(
                    "the minimum version cannot pass the primary version {}",
                    record.primary_version
                ),
            ));
        }
        record.min_version = min;
        changes.push(format!("min version {min}"));
    }
    update.check()?;
    audited.detail = changes.join(", ");
    audited.intent(custody).await?;
    crate::keys::write(custody, record.clone()).await?;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cryptoperiods_are_bounded() {
        assert_eq!(cryptoperiod_ms(0, 0).unwrap(), None);
        assert_eq!(cryptoperiod_ms(60, 0).unwrap(), Some(60_000));
        assert_eq!(
            cryptoperiod_ms(59, 999_999_999).unwrap_err().reason,
            Reason::BadCryptoperiod
        );
        assert_eq!(
            cryptoperiod_ms(i64::MAX, 0).unwrap_err().reason,
            Reason::BadCryptoperiod
        );
        assert_eq!(
            cryptoperiod_ms(-60, 0).unwrap_err().reason,
            Reason::BadCryptoperiod
        );
        assert!(cryptoperiod_ms(100 * 366 * 24 * 3600, 0).is_ok());
        assert!(cryptoperiod_ms(100 * 366 * 24 * 3600 + 1, 0).is_err());
    }

    #[test]
    fn requested_states_need_reasons_where_they_matter() {
        assert_eq!(
            requested_state(VersionState::Destroyed, "x")
                .unwrap_err()
                .reason,
            Reason::IllegalTransition
        );
        assert_eq!(
            requested_state(VersionState::Compromised, "  ")
                .unwrap_err()
                .reason,
            Reason::ReasonRequired
        );
        assert_eq!(
            requested_state(VersionState::Suspended, &"x".repeat(257))
                .unwrap_err()
                .reason,
            Reason::BadReason
        );
        assert_eq!(
            requested_state(VersionState::Suspended, "why\u{202e}")
                .unwrap_err()
                .reason,
            Reason::BadReason
        );
        assert_eq!(
            requested_state(VersionState::Suspended, " why ").unwrap(),
            "why"
        );
        assert_eq!(
            requested_state(VersionState::Compromised, "leaked").unwrap(),
            "leaked"
        );
    }
}
