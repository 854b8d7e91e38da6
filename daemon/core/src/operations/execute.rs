//! Running an operation the quorum approved: only if the quorum in force
//! now is the one it was approved under, and through the same domain
//! functions a direct call uses (never a handler), each with its own audit
//! record naming the requester.

use super::request::quorum_text;
use crate::action::Audited;
use crate::authz::{Approval, quorum_for};
use crate::dual_control::operation::{OperationRecord, Outcome, Spec};
use crate::dual_control::quorum::Quorum;
use crate::dual_control::store::OfficerRecord;
use crate::envelope::{Decrypter, decrypt_as};
use crate::keys::{self, KeyUpdate, Trigger};
use crate::names::version_name;
use crate::registry::VersionState;
use crate::signing::{self, SignOperation, Signer};
use crate::{Custody, Error, Reason};

/// Refuses to remove `officer_id` if a key policy naming it could then never
/// be met.
pub fn removal_keeps_policies_possible(custody: &Custody, officer_id: &str) -> Result<(), Error> {
    for key in custody.registry.list(None, usize::MAX) {
        for (kind, quorum) in &key.policies {
            if quorum.contains(officer_id) {
                let left = quorum
                    .members
                    .iter()
                    .filter(|m| *m != officer_id && custody.dual_control.enrolled(m))
                    .count();
                if !quorum.is_met_by(left) {
                    return Err(Error::new(
                        Reason::OfficerRemovalRefused,
                        format!(
                            "without {officer_id}, the {kind} policy of keys/{} ({} of {}) could never be met: change it first",
                            key.key_id,
                            quorum.required,
                            quorum.members.len()
                        ),
                    ));
                }
            }
        }
    }
    // A ceremony still open registers its key at commit under the policy
    // journaled when it opened: removing an officer it names would register
    // a policy naming someone who is no longer an officer (an id that could
    // later be enrolled as someone else).
    let unfinished = custody
        .ceremonies
        .journal
        .unfinished()
        .map_err(crate::ceremonies::journal_failure)?;
    for ceremony in unfinished {
        let named = ceremony
            .key_policies
            .iter()
            .flat_map(|policies| policies.values())
            .any(|quorum| quorum.contains(officer_id));
        if named {
            return Err(Error::new(
                Reason::OfficerRemovalRefused,
                format!(
                    "the open ceremony ceremonies/{} registers its key under a policy naming {officer_id}: finish or abort it first",
                    ceremony.id
                ),
            ));
        }
    }
    Ok(())
}

/// Refuses to enroll a new officer under `officer_id` while a key policy
/// names that id (threat model D7): policies name officers by id, so the
/// newcomer would take the departed officer's place in them, a change of
/// who may use the key made by the administrative quorum rather than by
/// one that covers the policy (R7).
pub fn enrollment_takes_no_policy_place(custody: &Custody, officer_id: &str) -> Result<(), Error> {
    // Nor the place of a custodian of a backup KEK, who still holds a
    // share (I1 counts the share holders by id): of the current one, or of
    // one an ACTIVATE_BACKUP_KEK may make current.
    if let Some(ceremony) = crate::ceremonies::export::share_held_by(custody, officer_id)? {
        return Err(Error::new(
            Reason::BadOfficer,
            format!(
                "{officer_id} holds a share of the backup KEK {ceremony} made: whoever is enrolled under that id would count as its holder; enroll the officer under a new id"
            ),
        ));
    }
    // Nor a place an open ceremony gives that id: a restore registers its
    // bundle's policies, a key ceremony its script's, at the commit.
    if let Some(ceremony) = crate::ceremonies::open_ceremony_naming(custody, officer_id)? {
        return Err(Error::new(
            Reason::BadOfficer,
            format!(
                "the open {ceremony} names {officer_id}: whoever is enrolled under that id would take that place; finish or abort it first, or enroll the officer under a new id"
            ),
        ));
    }
    // Nor a place a waiting SET_POLICY gives that id: its approvers meant
    // the officer enrolled under it when it was asked.
    let pending = custody
        .dual_control
        .pending_operations()
        .map_err(super::request::store_failure)?;
    for waiting in pending {
        if let Spec::SetPolicy { officers, .. } = &waiting.spec {
            if officers.iter().any(|o| o == officer_id) {
                return Err(Error::new(
                    Reason::BadOfficer,
                    format!(
                        "the waiting {} puts {officer_id} in a policy: whoever is enrolled under that id would take that place; let it run or expire first, or enroll the officer under a new id",
                        waiting.name()
                    ),
                ));
            }
        }
    }
    for key in custody.registry.list(None, usize::MAX) {
        if let Some((kind, _)) = key.policies.iter().find(|(_, q)| q.contains(officer_id)) {
            return Err(Error::new(
                Reason::BadOfficer,
                format!(
                    "keys/{}'s {kind} policy names {officer_id}: whoever is enrolled under that id would take that place; enroll the officer under a new id, and change the policy under a quorum that covers it",
                    key.key_id
                ),
            ));
        }
    }
    Ok(())
}

/// The audit record of one approved action, acting as the requester.
fn acting_for(record: &OperationRecord, method: &'static str, resource: String) -> Audited {
    let mut audited = Audited::start(method);
    audited.principal = record.requester.clone();
    audited.resource = resource;
    audited
}

/// Runs an approved operation, if the rules it was approved under still hold.
/// Hold the store lock.
pub async fn execute(custody: &Custody, record: &OperationRecord) -> Result<Outcome, Error> {
    crate::failpoint::hit("operation.before_execute");
    // Approvals count under the policy they were given for; if the policy
    // changed since (tightened after a compromise, say), they do not.
    let current = quorum_for(custody, &record.spec)?;
    if current != record.quorum {
        return Err(Error::new(
            Reason::PolicyChanged,
            format!(
                "the quorum changed from {} to {} after this operation was requested: request it again",
                quorum_text(&record.quorum),
                quorum_text(&current)
            ),
        ));
    }
    let key_outcome = |key_id: &String| Outcome::Key {
        key_id: key_id.clone(),
    };
    match &record.spec {
        Spec::Sign {
            key_id,
            version,
            hash,
            digest,
            encoding,
        } => {
            let request = signing::approved_request(&SignOperation {
                key_id: key_id.clone(),
                version: *version,
                hash: hash.clone(),
                digest: digest.clone(),
                encoding: encoding.clone(),
            });
            let mut audited = acting_for(record, "ExecuteSign", request.name.clone());
            let signer = Signer::Approved {
                requester: &record.requester,
            };
            let signed = signing::sign(custody, &mut audited, signer, &request).await;
            let signed = audited.record(custody, signed).await?;
            Ok(Outcome::Signature {
                version_name: signed.version_name,
                signature: hex::encode(signed.signature),
            })
        }
        Spec::Rotate { key_id } => {
            let mut audited = acting_for(record, "ExecuteRotate", format!("keys/{key_id}"));
            let result = keys::rotate(
                custody,
                &mut audited,
                key_id,
                None,
                None,
                Trigger::Approved,
                Approval::Quorum,
            )
            .await;
            audited.record(custody, result).await?;
            Ok(key_outcome(key_id))
        }
        Spec::SetState {
            key_id,
            version,
            state: target,
            reason,
        } => {
            let mut audited = acting_for(record, "ExecuteSetState", version_name(key_id, *version));
            let result = async {
                let target = VersionState::from_api_name(target)
                    .ok_or_else(|| Error::internal(format!("stored state {target:?}")))?;
                keys::set_state(
                    custody,
                    &mut audited,
                    key_id,
                    *version,
                    target,
                    reason,
                    Approval::Quorum,
                )
                .await
            }
            .await;
            audited.record(custody, result).await?;
            Ok(key_outcome(key_id))
        }
        Spec::SetPolicy {
            key_id,
            operation,
            officers,
            required,
        } => {
            // The officers it names are still enrolled (none of their ids
            // was given to someone else meanwhile: threat model D7 refuses
            // that while this operation waits).
            if let Some(gone) = officers.iter().find(|o| !custody.dual_control.enrolled(o)) {
                return Err(Error::new(
                    Reason::PolicyChanged,
                    format!("{gone} is no longer an officer: request the policy again"),
                ));
            }
            let (_guard, current) = crate::keys::locked(custody, key_id).await?;
            let mut key = (*current).clone();
            if *required == 0 {
                key.policies.remove(operation);
            } else {
                let quorum = Quorum::new(officers.iter().cloned(), *required)
                    .map_err(|e| Error::new(Reason::BadPolicy, e))?;
                key.policies.insert(operation.clone(), quorum);
            }
            crate::keys::write(custody, key).await?;
            Ok(key_outcome(key_id))
        }
        Spec::AddOfficer {
            officer_id,
            principal,
            public_key,
        } => {
            enrollment_takes_no_policy_place(custody, officer_id)?;
            custody
                .dual_control
                .add_officer(OfficerRecord {
                    officer_id: officer_id.clone(),
                    principal: principal.clone(),
                    public_key: public_key.clone(),
                    enrolled_ms: custody.clock.now_ms(),
                })
                .await
                .map_err(|e| Error::new(Reason::OfficerExists, e.to_string()))?;
            Ok(Outcome::Officers)
        }
        Spec::DestroyVersion { key_id, version } => {
            let mut audited = acting_for(
                record,
                "ExecuteDestroyVersion",
                version_name(key_id, *version),
            );
            let result =
                keys::schedule_destroy(custody, &mut audited, key_id, *version, &record.quorum)
                    .await;
            audited.record(custody, result).await?;
            Ok(key_outcome(key_id))
        }
        Spec::ReleaseLegalHold { key_id, version } => {
            let mut audited = acting_for(
                record,
                "ExecuteReleaseLegalHold",
                version_name(key_id, *version),
            );
            let result = keys::release_legal_hold(custody, &mut audited, key_id, *version).await;
            audited.record(custody, result).await?;
            Ok(key_outcome(key_id))
        }
        Spec::UpdateKey {
            key_id,
            cryptoperiod_secs,
            min_version,
        } => {
            let mut audited = acting_for(record, "ExecuteUpdateKey", format!("keys/{key_id}"));
            let result = async {
                let update = KeyUpdate {
                    cryptoperiod_ms: match cryptoperiod_secs {
                        Some(seconds) => Some(keys::state::cryptoperiod_ms(*seconds, 0)?),
                        None => None,
                    },
                    min_version: *min_version,
                };
                keys::update(custody, &mut audited, key_id, &update, Approval::Quorum).await
            }
            .await;
            audited.record(custody, result).await?;
            Ok(key_outcome(key_id))
        }
        Spec::CreateBackup {
            backup_kek_set_id,
            versions,
        } => {
            let mut audited = acting_for(
                record,
                "ExecuteCreateBackup",
                format!("backup-keks/{backup_kek_set_id}"),
            );
            let result = crate::ceremonies::export::create_backup(
                custody,
                &mut audited,
                backup_kek_set_id,
                versions,
            )
            .await;
            let backup = audited.record(custody, result).await?;
            Ok(Outcome::Backup {
                bundle: backup.bundle,
                keys: backup.keys,
            })
        }
        Spec::ActivateBackupKek { ceremony, .. } => {
            let audited = acting_for(
                record,
                "ExecuteActivateBackupKek",
                format!("ceremonies/{ceremony}"),
            );
            let result =
                crate::ceremonies::export::activate_backup_kek(custody, &record.spec).await;
            audited.record(custody, result).await?;
            Ok(Outcome::BackupKekActivated)
        }
        Spec::Decrypt {
            key_id,
            version: _,
            ciphertext,
            associated_data,
            recipient,
        } => {
            let mut audited = acting_for(record, "ExecuteDecrypt", format!("keys/{key_id}"));
            let result = async {
                let stored = |hex_text: &str| {
                    hex::decode(hex_text).map_err(|_| Error::internal("stored operation hex"))
                };
                let decrypter = Decrypter::Approved {
                    requester: &record.requester,
                };
                let opened = decrypt_as(
                    custody,
                    &mut audited,
                    decrypter,
                    &format!("keys/{key_id}"),
                    &stored(ciphertext)?,
                    &stored(associated_data)?,
                )
                .await?;
                // The plaintext leaves this function sealed to the key the
                // officers approved, and is never stored in the clear.
                let sealed = crate::dual_control::sealed::seal_plaintext(
                    &stored(recipient)?,
                    &opened.plaintext,
                )
                .map_err(|e| Error::new(Reason::BadRecipient, e))?;
                Ok(Outcome::Sealed {
                    version_name: opened.name,
                    sealed: hex::encode(sealed),
                })
            }
            .await;
            audited.record(custody, result).await
        }
        Spec::RemoveOfficer { officer_id } => {
            removal_keeps_policies_possible(custody, officer_id)?;
            custody
                .dual_control
                .remove_officer(officer_id)
                .await
                .map_err(|e| Error::new(Reason::OfficerRemovalRefused, e.to_string()))?;
            Ok(Outcome::Officers)
        }
    }
}
