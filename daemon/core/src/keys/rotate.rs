//! New versions of an existing key: on demand, by an approved operation, by
//! the scheduler, and after the primary version was compromised. Every
//! rotation goes through the journaled [`generation`](super::generation)
//! protocol and makes the new version primary in the same commit.

use super::algorithm_of;
use super::generation::{NewVersion, PendingVersions, generate_version};
use crate::action::Audited;
use crate::authz::{Approval, quorum_gate};
use crate::metrics;
use crate::registry::{KeyRecord, REMEMBERED_ROTATIONS, RotationRequest};
use crate::{Custody, Error, Reason};

/// What started a rotation (a metric label and the journal's trigger).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// RotateKey.
    Demand,
    /// An approved ROTATE operation.
    Approved,
    /// The scheduler (cryptoperiod or nonce budget).
    Schedule,
    /// The primary version was marked compromised.
    Compromise,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Demand => "demand",
            Trigger::Approved => "approved",
            Trigger::Schedule => "schedule",
            Trigger::Compromise => "compromise",
        }
    }
}

/// Checks a rotation request id: 1-64 of `[A-Za-z0-9._:-]`.
pub fn check_request_id(request_id: &str) -> Result<(), Error> {
    let valid = !request_id.is_empty()
        && request_id.len() <= 64
        && request_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(Error::new(
            Reason::BadRequestId,
            "request_id must be 1-64 of A-Z a-z 0-9 . _ : -",
        ))
    }
}

/// Rotates `key_id`; see [`Approval`]. `request_id` makes it idempotent;
/// with `if_primary`, it rotates only if that is still the primary
/// version (the scheduler decided on a snapshot taken without the lock).
pub async fn rotate(
    custody: &Custody,
    audited: &mut Audited,
    key_id: &str,
    request_id: Option<&str>,
    if_primary: Option<u32>,
    trigger: Trigger,
    approval: Approval,
) -> Result<KeyRecord, Error> {
    if let Some(id) = request_id {
        check_request_id(id)?;
    }
    let (_guard, current) = crate::keys::locked(custody, key_id).await?;
    quorum_gate(&current, "ROTATE", approval)?;
    if let Some(expected) = if_primary
        && current.primary_version != expected
    {
        audited.detail = format!(
            "version {expected} is no longer primary ({} is); nothing done",
            current.primary_version
        );
        return Ok((*current).clone());
    }
    rotate_locked(custody, audited, &current, request_id, trigger).await
}

/// Rotates `current` (the caller holds the registry lock and checked
/// policy): a new version, journaled, made primary in one commit.
pub(crate) async fn rotate_locked(
    custody: &Custody,
    audited: &mut Audited,
    current: &KeyRecord,
    request_id: Option<&str>,
    trigger: Trigger,
) -> Result<KeyRecord, Error> {
    if let Some(id) = request_id
        && let Some(earlier) = current
            .rotation_requests
            .iter()
            .find(|r| r.request_id == id)
    {
        audited.detail = format!(
            "request id {id} already rotated to version {}; nothing done",
            earlier.version
        );
        metrics::rotation(trigger.as_str(), "replayed");
        return Ok(current.clone());
    }
    let algorithm = algorithm_of(current)?;
    let next = current
        .versions
        .iter()
        .map(|v| v.version)
        .max()
        .unwrap_or(0)
        + 1;
    audited.detail = match request_id {
        Some(id) => format!("new version {next} ({}, request id {id})", trigger.as_str()),
        None => format!("new version {next} ({})", trigger.as_str()),
    };
    audited.intent(custody).await?;
    let result = async {
        let mut journal = PendingVersions::new(trigger.as_str());
        let version = generate_version(
            custody,
            &mut journal,
            NewVersion {
                key_id: &current.key_id,
                version: next,
                algorithm,
                backup_exportable: current.backup_exportable,
            },
        )
        .await?
        .version;
        let mut record = current.clone();
        record.versions.push(version);
        record.primary_version = next;
        if let Some(id) = request_id {
            record.rotation_requests.push(RotationRequest {
                request_id: id.into(),
                version: next,
            });
            let excess = record
                .rotation_requests
                .len()
                .saturating_sub(REMEMBERED_ROTATIONS);
            record.rotation_requests.drain(..excess);
        }
        journal.commit(custody, record.clone()).await?;
        Ok(record)
    }
    .await;
    metrics::rotation(
        trigger.as_str(),
        if result.is_ok() { "done" } else { "failed" },
    );
    result
}

/// The staged version of `key_id`: a pre-activation version newer than the
/// primary, made now if the key has none (an intermediate ceremony with
/// `stage = true` certifies it). It goes through the same journaled
/// generation as a rotation, but stays pre-activation and not primary: it
/// signs nothing until it is promoted ([`crate::authz::is_promotion`]).
/// Taking the one already staged makes the step safe to run again after a
/// crash. Returns its number.
pub(crate) async fn stage(custody: &Custody, key_id: &str) -> Result<u32, Error> {
    let (_guard, current) = crate::keys::locked(custody, key_id).await?;
    if let Some(staged) = staged_version(&current) {
        return Ok(staged);
    }
    let algorithm = algorithm_of(&current)?;
    let next = current
        .versions
        .iter()
        .map(|v| v.version)
        .max()
        .unwrap_or(0)
        + 1;
    let mut journal = PendingVersions::new("staged");
    let mut version = generate_version(
        custody,
        &mut journal,
        NewVersion {
            key_id: &current.key_id,
            version: next,
            algorithm,
            backup_exportable: current.backup_exportable,
        },
    )
    .await?
    .version;
    version.state = crate::registry::VersionState::PreActivation;
    version.activated_ms = None;
    let mut record = (*current).clone();
    record.versions.push(version);
    journal.commit(custody, record).await?;
    Ok(next)
}

/// The key's staged version, if it has one: pre-activation and newer than
/// the primary (the newest such, if several).
pub fn staged_version(record: &KeyRecord) -> Option<u32> {
    record
        .versions
        .iter()
        .filter(|v| {
            v.version > record.primary_version
                && v.state == crate::registry::VersionState::PreActivation
        })
        .map(|v| v.version)
        .max()
}
