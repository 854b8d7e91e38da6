//! Restores and DR drills: the bundle checked when the ceremony opens, the
//! backup KEK rebuilt from shares, every key unwrapped and proven against
//! the manifest, then registered (restore) or destroyed again (drill).

use std::collections::BTreeMap;
use std::time::Instant;

use hsm_shim::{
    AesRole, EcdsaEncoding, ErrorKind, Exportability, GcmCiphertext, Hsm, HsmSession, KeyLabel,
    SecretSlice, SignInput,
};
use serde_json::{Map, json};
use sha2::{Digest, Sha256};

use super::backup::check_aad;
use super::commit::{close_commit, finish_completed, open_commit};
use super::crash_points::RESTORE;
use super::roll_back::destroy_if_there;
use super::{intend, journal_failure, mark_made, note};
use crate::Custody;
use crate::algorithms::KeyAlgorithm;
use crate::ceremony::bundle::{self, Bundle, BundledKey, KeyProtections};
use crate::ceremony::journal::{CeremonyRecord, RestoreOutcome, TokenRole};
use crate::ceremony::shares;
use crate::dual_control::operation::KeyPolicies;
use crate::dual_control::quorum::Quorum;
use crate::failpoint;
use crate::registry::{KeyRecord, VersionRecord, VersionState};
use crate::{Error, Reason};

/// The challenge each restored key pair signs.
pub fn restore_challenge(ceremony: &str, key_id: &str, version: u32) -> Vec<u8> {
    format!("custody-restore-challenge/v1\n{ceremony}\n{key_id}/{version}").into_bytes()
}

/// The label a restore imports version `version` of `key_id` under:
/// `restore/{ceremony}/{key_id}/v{version}`, in a namespace only that
/// ceremony writes to, and kept at commit, when the registry names it.
/// Nothing else can make, replace or destroy an object there, and nothing
/// the restore does touches the `key/` labels of keys made here. Refused
/// (`BAD_BUNDLE`) when the ceremony opens if the label would be too long.
pub(super) fn restored_label(
    ceremony: &str,
    key_id: &str,
    version: u32,
) -> Result<KeyLabel, Error> {
    KeyLabel::for_version(&format!("restore/{ceremony}/{key_id}"), version).map_err(|_| {
        Error::new(
            Reason::BadBundle,
            format!(
                "keys/{key_id}/versions/{version} restored by ceremony {ceremony} needs a label longer than {} characters: give the restore a shorter id",
                KeyLabel::MAX_LEN
            ),
        )
    })
}

/// Checks the manifest's signature with a trusted audit key and returns
/// that key's SHA-256 (of its SPKI DER), hex.
///
/// Trusted are: this custodyd's own audit key, and the audit key pinned by
/// SHA-256 either in the restore script the officers sign
/// (`restore.audit_key_sha256`, `script_pin`) or in the config (`[ceremony]
/// trusted_audit_keys`). A script that pins a key accepts that key only.
/// Nothing the bundle says about itself (its `source_token`, the key it
/// embeds) chooses the key: the embedded key is used only when its SHA-256
/// is one of those, and otherwise the bundle is refused with the SHA-256 it
/// names, for the officers to compare with what the source published.
pub(super) fn bundle_signature_ok(
    state: &Custody,
    bundle: &Bundle,
    script_pin: Option<&[u8; 32]>,
) -> Result<String, Error> {
    let embedded = bundle
        .audit_key_spki()
        .map_err(|e| Error::new(Reason::BadBundle, e.to_string()))?;
    let embedded_sha256: [u8; 32] = Sha256::digest(&embedded).into();
    let own_sha256: [u8; 32] = Sha256::digest(state.audit.audit_key_spki()).into();
    let trusted = match script_pin {
        Some(pin) => *pin == embedded_sha256,
        None => {
            embedded_sha256 == own_sha256
                || state
                    .ceremonies
                    .trusted_audit_keys
                    .contains(&embedded_sha256)
        }
    };
    if !trusted {
        let expected = match script_pin {
            Some(pin) => format!(
                "the restore script pins the audit key {} (restore.audit_key_sha256)",
                hex::encode(pin)
            ),
            None => format!(
                "it is neither custodyd's own audit key ({}) nor one pinned in its config ([ceremony] trusted_audit_keys) or in the restore script (restore.audit_key_sha256)",
                hex::encode(own_sha256)
            ),
        };
        return Err(Error::new(
            Reason::BadBundle,
            format!(
                "the bundle names as its signer the audit key with SPKI SHA-256 {}, and {expected}: compare that SHA-256 with the one the source custodyd published, and pin it only if they match",
                hex::encode(embedded_sha256)
            ),
        ));
    }
    bundle
        .verify(&embedded)
        .map_err(|e| Error::new(Reason::BadBundle, e.to_string()))?;
    Ok(hex::encode(embedded_sha256))
}

/// Rebuilds the backup KEK from the submitted shares, unwraps every key of
/// the bundle, checks each against the manifest, and either registers them
/// (restore) or destroys them again (drill).
pub(super) async fn restore(
    state: &Custody,
    record: &mut CeremonyRecord,
    drill: bool,
) -> Result<(), Error> {
    let started = Instant::now();
    let bundle =
        Bundle::parse(&record.bundle).map_err(|e| Error::new(Reason::BadBundle, e.to_string()))?;
    let submitted = state
        .ceremonies
        .secrets(&record.id, |secrets| std::mem::take(&mut secrets.submitted));
    // Refused here, before any HSM call: mixed sets, duplicates, too few,
    // and (by the digest inside every share) a wrong reconstruction.
    let value = shares::combine(&submitted)
        .map_err(|e| Error::new(Reason::SharesRefused, e.to_string()))?;
    drop(submitted);
    let token = if drill {
        TokenRole::Scratch
    } else {
        TokenRole::Main
    };
    let mut labels = Vec::new();
    for key in &bundle.manifest.keys {
        let label = if drill {
            KeyLabel::for_version(&format!("drill/{}/{}", record.id, key.key_id), key.version)?
        } else {
            restored_label(&record.id, &key.key_id, key.version)?
        };
        labels.push((label, key));
    }
    let journaled: Vec<(String, TokenRole)> = labels
        .iter()
        .map(|(label, _)| (label.as_str().to_string(), token))
        .collect();
    intend(state, record, "restore", &journaled, &RESTORE).await?;
    let work = RestoreWork {
        ceremony: record.id.clone(),
        kek_value: SecretSlice::from(value.to_vec()),
        kek_kcv: bundle.manifest.backup_kek.kcv.clone(),
        keys: labels
            .iter()
            .map(|(label, key)| (label.clone(), (*key).clone()))
            .collect(),
        export: if drill {
            Exportability::NonExportable
        } else {
            Exportability::BackupWrapOnly
        },
        destroy_after: drill,
    };
    drop(value);
    let outcome = if drill {
        let config = state
            .ceremonies
            .scratch
            .clone()
            .ok_or_else(|| Error::new(Reason::NoScratchToken, "no scratch token configured"))?;
        tokio::task::spawn_blocking(move || {
            let scratch = Hsm::open(config)?;
            let mut session = scratch.session()?;
            work.run(&mut session)
        })
        .await
        .map_err(|_| Error::internal("drill panicked"))??
    } else {
        state.hsm.run(move |session| work.run(session)).await?
    };
    failpoint::hit(RESTORE.after_hsm);
    mark_made(record, "restore");
    let rto_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let report = RestoreOutcome {
        keys: u32::try_from(bundle.manifest.keys.len()).unwrap_or(u32::MAX),
        verified: outcome.verified,
        rto_ms,
        scratch_objects_destroyed: outcome.destroyed,
        drill,
        suspended_keys: Vec::new(),
    };
    record.restore = Some(report.clone());
    record.done.push("restore".into());
    let mut detail = Map::new();
    detail.insert("report".into(), json!(report));
    note(
        state,
        record,
        "verify",
        "custodyd",
        format!(
            "{} of {} keys unwrapped and verified against the manifest in {rto_ms} ms{}",
            report.verified,
            report.keys,
            if drill {
                format!(
                    "; {} scratch objects destroyed",
                    report.scratch_objects_destroyed
                )
            } else {
                String::new()
            }
        ),
        detail,
    )
    .await?;
    failpoint::hit(RESTORE.after_result);
    crate::metrics::restore_rto(drill, rto_ms as f64 / 1000.0);
    if drill {
        return finish_completed(state, record).await;
    }
    let _registry = open_commit(state, record).await?;
    ids_held_by_the_same(state, &bundle)?;
    // The ids were reserved when the ceremony opened, so none can be taken
    // now; checked again under the lock all the same, so that a restore
    // never registers over a key it did not make (the roll-back that follows
    // destroys only this ceremony's own objects).
    for key_id in &record.reserved_key_ids {
        if state.registry.get(key_id).is_some() {
            return Err(Error::new(
                Reason::KeyExists,
                format!(
                    "keys/{key_id} was registered while the restore was open; nothing of it is replaced"
                ),
            ));
        }
    }
    let now = state.clock.now_ms();
    let enrolled = |officer: &str| state.dual_control.enrolled(officer);
    let when = Restored {
        at_ms: now,
        cancel_window_ms: state.lifecycle.destroy_cancel_window_ms(),
    };
    let (records, suspended) =
        restored_records(&labels, &bundle.manifest.protections, &enrolled, when);
    // Journaled and audited before the records are written: a key that
    // comes back SUSPENDED says why, and the report names it.
    if let Some(report) = record.restore.as_mut() {
        report.suspended_keys = suspended.iter().map(|k| k.key_id.clone()).collect();
    }
    for key in &suspended {
        let mut detail = Map::new();
        detail.insert("key_id".into(), json!(key.key_id));
        detail.insert("reason".into(), json!(key.reason));
        note(
            state,
            record,
            "protections",
            "custodyd",
            format!(
                "{} restored with every active version SUSPENDED: {}; its protections are kept as the manifest gives them",
                key.key_id, key.reason
            ),
            detail,
        )
        .await?;
    }
    // A destruction scheduled at the source comes back scheduled (I3); the
    // bundle may be older than a cancel there, so each is in the transcript
    // for the officers to check against the source's last word.
    for key in &records {
        for version in &key.versions {
            let Some(at) = version.destroy_at_ms else {
                continue;
            };
            let name = crate::names::version_name(&key.key_id, version.version);
            let approved = version.destroy_approved_under.as_ref().map_or_else(
                || "no recorded quorum: dropped when due".into(),
                Quorum::text,
            );
            let mut detail = Map::new();
            detail.insert("version".into(), json!(name));
            detail.insert("destroy_at".into(), json!(crate::audit::rfc3339_ms(at)));
            detail.insert("approved_under".into(), json!(approved));
            note(
                state,
                record,
                "schedule",
                "custodyd",
                format!(
                    "{name} is scheduled for destruction at {} (approved at the source under {approved}); cancel it here if the source cancelled it after the backup",
                    crate::audit::rfc3339_ms(at)
                ),
                detail,
            )
            .await?;
        }
    }
    state
        .registry
        .put_all(records)
        .await
        .map_err(|e| journal_failure(e.to_string()))?;
    close_commit(state, record).await
}

/// Refuses a restore of `bundle` when an officer id one of its keys'
/// policies name is held here by another principal than at the source:
/// the key would come back with someone else in that officer's place
/// (threat model D7). Checked when the ceremony opens and again at the
/// commit; ids not enrolled here are [`unreproducible`]'s, and a bundle
/// made before principals were carried is checked for enrollment only.
pub(super) fn ids_held_by_the_same(state: &Custody, bundle: &Bundle) -> Result<(), Error> {
    for key in &bundle.manifest.protections {
        for (officer, source) in &key.officer_principals {
            let Some(here) = state.dual_control.officer(officer) else {
                continue;
            };
            if &here.principal == source {
                continue;
            }
            let held = if source == bundle::NOT_ENROLLED {
                "not enrolled at the source".to_string()
            } else {
                format!(
                    "held at the source by principal {}",
                    crate::text::echo(source)
                )
            };
            return Err(Error::new(
                Reason::BadOfficer,
                format!(
                    "keys/{}'s policies name {officer}, {held} and here by {}: the key would come back with someone else in that place; remove that enrollment (or enroll the source's principal under {officer}), then restore",
                    key.key_id,
                    crate::text::echo(&here.principal),
                ),
            ));
        }
    }
    Ok(())
}

/// A key whose protections could not be reproduced here, and why: it is
/// registered with every active version SUSPENDED.
struct Unreproducible {
    key_id: String,
    reason: String,
}

/// Why `protections` cannot be reproduced on this daemon, if they cannot:
/// a policy that names an officer not enrolled here (an officer id that
/// could later be enrolled as someone else) or a policy this build refuses.
fn unreproducible(protections: &KeyProtections, enrolled: &dyn Fn(&str) -> bool) -> Option<String> {
    for (kind, policy) in &protections.policies {
        if let Some(unknown) = policy.officers.iter().find(|o| !enrolled(o)) {
            return Some(format!(
                "its {kind} policy names {unknown}, who is not an enrolled officer here"
            ));
        }
        if let Err(e) = policy.quorum() {
            return Some(format!("its {kind} policy cannot be kept: {e}"));
        }
    }
    None
}

/// The registry records of the restored versions, one per key, with the
/// protections the manifest carries: policies, minimum version,
/// cryptoperiod, signers, backup-exportability, primary version, retirement
/// (a deactivated primary), and per
/// version the state, its time, the activation time, a destruction
/// schedule and a legal hold, all as at the source. A key whose
/// protections cannot be reproduced ([`unreproducible`]) keeps them as
/// given but has every active version SUSPENDED; those keys are returned
/// with the reason.
fn restored_records(
    restored: &[(KeyLabel, &BundledKey)],
    protections: &[KeyProtections],
    enrolled: &dyn Fn(&str) -> bool,
    when: Restored,
) -> (Vec<KeyRecord>, Vec<Unreproducible>) {
    let now = when.at_ms;
    let mut by_key: BTreeMap<&str, Vec<(&KeyLabel, &BundledKey)>> = BTreeMap::new();
    for (label, key) in restored {
        by_key
            .entry(key.key_id.as_str())
            .or_default()
            .push((label, *key));
    }
    let mut suspended = Vec::new();
    let records = by_key
        .into_values()
        .map(|mut versions| {
            versions.sort_by_key(|(_, key)| key.version);
            let first = versions[0].1;
            // The bundle's structure guarantees one entry per key id; a
            // missing one (impossible once parsed) restores unreproducible.
            let given = protections.iter().find(|p| p.key_id == first.key_id);
            let problem = match given {
                Some(p) => unreproducible(p, enrolled),
                None => Some("the manifest carries no protections for it".into()),
            };
            let mut records: Vec<VersionRecord> = versions
                .iter()
                .map(|(label, key)| restored_version(label, key, when))
                .collect();
            if let Some(reason) = problem {
                // Only what could be used is suspended: a staged version
                // stays pre-activation (promoting it still takes ROTATE's
                // quorum, C13), a deactivated or compromised one stays out
                // of use, since SET_STATE alone brings a suspended one back.
                for version in &mut records {
                    if version.state == VersionState::Active {
                        version.state = VersionState::Suspended;
                        version.state_ms = now;
                    }
                }
                suspended.push(Unreproducible {
                    key_id: first.key_id.clone(),
                    reason,
                });
            }
            let fallback = records
                .iter()
                .rev()
                .find(|v| v.state == VersionState::Active)
                .or(records.last())
                .map_or(1, |v| v.version);
            let primary = given
                .map(|p| p.primary_version)
                .filter(|n| records.iter().any(|v| v.version == *n))
                .unwrap_or(fallback);
            // A deactivated primary is a retired key (C29: only retiring
            // deactivates a primary), and stays one: custodyd gives it no
            // new version on its own.
            let retired_at_version = records
                .iter()
                .any(|v| v.version == primary && v.state == VersionState::Deactivated)
                .then_some(primary);
            KeyRecord {
                key_id: first.key_id.clone(),
                algorithm: first.algorithm.clone(),
                allowed_signers: given.map(|p| p.allowed_signers.clone()).unwrap_or_default(),
                primary_version: primary,
                versions: records,
                created_ms: now,
                policies: given.map(restored_policies).unwrap_or_default(),
                cryptoperiod_ms: given.and_then(|p| p.cryptoperiod_ms),
                min_version: given.map_or(0, |p| p.min_version),
                rotation_requests: Vec::new(),
                backup_exportable: given.is_some_and(|p| p.backup_exportable),
                retired_at_version,
            }
        })
        .collect();
    (records, suspended)
}

/// The policies as given. One this build refuses (impossible once the
/// bundle parsed) keeps its officers and a required count no lower than
/// theirs, so that it can only be harder to meet.
fn restored_policies(protections: &KeyProtections) -> KeyPolicies {
    protections
        .policies
        .iter()
        .map(|(kind, policy)| {
            let quorum = policy.quorum().unwrap_or(Quorum {
                members: policy.officers.iter().cloned().collect(),
                required: policy.required.max(2),
            });
            (kind.clone(), quorum)
        })
        .collect()
}

/// When a restore registers its keys, and the cancel window a scheduled
/// destruction gets here.
#[derive(Debug, Clone, Copy)]
struct Restored {
    at_ms: i64,
    cancel_window_ms: i64,
}

fn restored_version(label: &KeyLabel, key: &BundledKey, when: Restored) -> VersionRecord {
    let now = when.at_ms;
    let public_key_der_hex = key.public_key_der.clone().unwrap_or_default();
    let public_key_pem = hex::decode(&public_key_der_hex)
        .ok()
        .and_then(|der| {
            spki::der::pem::encode_string("PUBLIC KEY", spki::der::pem::LineEnding::LF, &der).ok()
        })
        .unwrap_or_default();
    // A state the manifest names that this build does not know restores
    // suspended: usable again only by an officer's decision.
    let known: Option<VersionState> = serde_json::from_value(json!(key.state)).ok();
    let state = known.unwrap_or(VersionState::Suspended);
    VersionRecord {
        version: key.version,
        state,
        created_ms: now,
        state_ms: if known.is_some() { key.state_ms } else { now },
        hsm_label: label.as_str().into(),
        public_key_der_hex,
        public_key_pem,
        // A bundle made before activation times were kept: a version that
        // was ever active counts from its last state change at the source
        // (the earliest time the bundle holds), never from the restore, so
        // that a backup does not renew its cryptoperiod.
        activated_ms: key
            .activated_ms
            .or_else(|| (state != VersionState::PreActivation).then_some(key.state_ms.min(now))),
        // A schedule comes back with a full cancel window still to run:
        // the bundle may be older than a cancel or a hold at the source,
        // and a destruction cannot be undone, so the officers here get the
        // window to cancel it again before the scheduler carries it out.
        destroy_at_ms: key
            .destroy_at_ms
            .map(|at| at.max(now.saturating_add(when.cancel_window_ms))),
        legal_hold: key.legal_hold.clone(),
        // SoftHSM2 computes no check value for unwrapped keys; the bundle's
        // KCV stays in the manifest and the transcript.
        check_value: String::new(),
        // Backup bundles do not carry certificates (yet): a restored
        // version has none; the root certificate is kept by the officers.
        certificate_chain_pem: Vec::new(),
        reserved_by: None,
        destroying_since_ms: None,
        // The schedule stands under the quorum the source approved it
        // under (one this build refuses, impossible once the bundle
        // parsed, leaves none: the schedule is dropped when due).
        destroy_approved_under: key
            .destroy_approved_under
            .as_ref()
            .and_then(|policy| policy.quorum().ok()),
    }
}

/// What a restore does inside one HSM session (the backup KEK is a session
/// object and exists only there).
struct RestoreWork {
    ceremony: String,
    kek_value: SecretSlice<u8>,
    kek_kcv: String,
    keys: Vec<(KeyLabel, BundledKey)>,
    export: Exportability,
    destroy_after: bool,
}

struct RestoreDone {
    verified: u32,
    destroyed: u32,
}

impl RestoreWork {
    fn run(self, session: &mut HsmSession) -> hsm_shim::Result<RestoreDone> {
        let kek = KeyLabel::new(format!("restore-kek/{}", self.ceremony))?;
        let outcome = session
            .import_session_unwrap_kek(&kek, &self.kek_value)
            .and_then(|info| self.unwrap_and_verify(session, &kek, info.check_value));
        // The session KEK goes with the session anyway; destroy it now. If
        // the device will not (or an import failed half-way), end the
        // session: a pool worker's session outlives this restore.
        if destroy_if_there(session, &kek).is_err() {
            if let Err(error) = session.renew() {
                tracing::error!(%error, "the restore's session KEK stays in a worker's session until the session is reopened");
            }
        }
        let verified = outcome?;
        let mut destroyed = 0;
        if self.destroy_after {
            for (label, _) in &self.keys {
                destroyed += u32::try_from(session.destroy(label)?).unwrap_or(u32::MAX);
            }
            // The scratch token must be left as it was found.
            let left = session
                .inventory()?
                .into_iter()
                .filter(|object| {
                    object
                        .label
                        .starts_with(&format!("drill/{}/", self.ceremony))
                })
                .count();
            if left > 0 {
                return Err(hsm_shim::HsmError::new(
                    ErrorKind::Internal,
                    format!("{left} drill objects are still on the scratch token"),
                ));
            }
        }
        Ok(RestoreDone {
            verified,
            destroyed,
        })
    }

    fn unwrap_and_verify(
        &self,
        session: &mut HsmSession,
        kek: &KeyLabel,
        kcv: Option<hsm_shim::KeyCheckValue>,
    ) -> hsm_shim::Result<u32> {
        let refuse = |what: String| hsm_shim::HsmError::new(ErrorKind::IntegrityFailure, what);
        if let Some(kcv) = kcv {
            if !kcv.to_string().eq_ignore_ascii_case(&self.kek_kcv) {
                return Err(refuse(format!(
                    "the rebuilt backup KEK has check value {kcv}, the bundle's has {}",
                    self.kek_kcv
                )));
            }
        }
        let mut verified = 0;
        for (label, key) in &self.keys {
            let algorithm = KeyAlgorithm::from_api_name(&key.algorithm)
                .ok_or_else(|| refuse(format!("unknown algorithm {}", key.algorithm)))?;
            let wrapped = hex::decode(&key.wrapped)
                .map_err(|_| refuse(format!("{}: wrapped key is not hex", key.key_id)))?;
            let spec = algorithm.key_spec();
            match (&key.public_key_der, algorithm.sign_algorithm()) {
                (Some(spki_hex), Some(sign_algorithm)) => {
                    let spki = hex::decode(spki_hex)
                        .map_err(|_| refuse(format!("{}: public key is not hex", key.key_id)))?;
                    session.unwrap_private_key(kek, &wrapped, label, spec, self.export)?;
                    session.import_public_key(label, &spki, spec)?;
                    let message = restore_challenge(&self.ceremony, &key.key_id, key.version);
                    let digest = sign_algorithm
                        .hash()
                        .map(|hash| crate::algorithms::hash_bytes(hash, &message));
                    let input = digest
                        .as_deref()
                        .map_or(SignInput::Message(&message), SignInput::Digest);
                    let signature =
                        session.sign(label, sign_algorithm, input, EcdsaEncoding::Der)?;
                    if !session.verify(
                        label,
                        sign_algorithm,
                        input,
                        &signature,
                        EcdsaEncoding::Der,
                    )? {
                        return Err(refuse(format!(
                            "{} v{}: the restored key's signature does not verify with the published public key",
                            key.key_id, key.version
                        )));
                    }
                }
                _ => {
                    let check = key
                        .check
                        .as_ref()
                        .ok_or_else(|| refuse(format!("{}: no check ciphertext", key.key_id)))?;
                    session.unwrap_aes_key(
                        kek,
                        &wrapped,
                        label,
                        AesRole::DataEncryption,
                        self.export,
                    )?;
                    let iv: [u8; 12] = hex::decode(&check.iv)
                        .ok()
                        .and_then(|iv| iv.try_into().ok())
                        .ok_or_else(|| refuse(format!("{}: bad check IV", key.key_id)))?;
                    let ciphertext = GcmCiphertext {
                        iv,
                        ciphertext_and_tag: hex::decode(&check.ciphertext)
                            .map_err(|_| refuse(format!("{}: bad check ciphertext", key.key_id)))?,
                    };
                    let plaintext = session.decrypt_gcm(
                        label,
                        &check_aad(&key.key_id, key.version),
                        &ciphertext,
                    )?;
                    if plaintext.as_slice() != bundle::CHECK_PLAINTEXT {
                        return Err(refuse(format!(
                            "{}: the check ciphertext decrypts to something else",
                            key.key_id
                        )));
                    }
                }
            }
            verified += 1;
        }
        Ok(verified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ceremony::bundle::BundledPolicy;

    /// A restore at 77,000 ms with a cancel window of 1,000 ms.
    const AT_77_000: Restored = Restored {
        at_ms: 77_000,
        cancel_window_ms: 1_000,
    };

    fn version(n: u32, state: &str, hold: Option<&str>) -> BundledKey {
        BundledKey {
            key_id: "issuer".into(),
            version: n,
            algorithm: "EC_SIGN_P256_SHA256".into(),
            state: state.into(),
            fingerprint: String::new(),
            public_key_der: None,
            check: None,
            wrapped: String::new(),
            state_ms: 1_000 + i64::from(n),
            activated_ms: Some(500 + i64::from(n)),
            destroy_at_ms: (n == 1).then_some(9_000),
            legal_hold: hold.map(str::to_string),
            destroy_approved_under: None,
        }
    }

    fn protections(officers: &[&str]) -> KeyProtections {
        KeyProtections {
            key_id: "issuer".into(),
            primary_version: 2,
            allowed_signers: vec!["ca-issuing".into()],
            policies: BTreeMap::from([(
                "SIGN".to_string(),
                BundledPolicy {
                    officers: officers.iter().map(|o| o.to_string()).collect(),
                    required: 2,
                },
            )]),
            min_version: 2,
            cryptoperiod_ms: Some(7_776_000_000),
            backup_exportable: false,
            officer_principals: BTreeMap::new(),
        }
    }

    fn restore_with(
        officers: &[&str],
        enrolled: &dyn Fn(&str) -> bool,
    ) -> (Vec<KeyRecord>, Vec<Unreproducible>) {
        let versions = [
            version(1, "deactivated", None),
            version(2, "suspended", Some("case 2026-117")),
            version(3, "active", None),
        ];
        let labels: Vec<(KeyLabel, &BundledKey)> = versions
            .iter()
            .map(|v| (KeyLabel::for_version("key/issuer", v.version).unwrap(), v))
            .collect();
        restored_records(&labels, &[protections(officers)], enrolled, AT_77_000)
    }

    #[test]
    fn a_restore_reproduces_every_protection_as_given() {
        let (records, suspended) = restore_with(&["alice", "bob", "carol"], &|o: &str| o != "dave");
        assert!(suspended.is_empty());
        let key = &records[0];
        assert_eq!(key.allowed_signers, ["ca-issuing"]);
        assert_eq!(key.primary_version, 2);
        assert_eq!(key.min_version, 2);
        assert_eq!(key.cryptoperiod_ms, Some(7_776_000_000));
        assert!(!key.backup_exportable);
        assert_eq!(
            key.policies["SIGN"],
            Quorum::new(["alice".into(), "bob".into(), "carol".into()], 2).unwrap()
        );
        let states: Vec<_> = key.versions.iter().map(|v| v.state).collect();
        assert_eq!(
            states,
            [
                VersionState::Deactivated,
                VersionState::Suspended,
                VersionState::Active
            ]
        );
        // v1's destruction, due at 9,000 at the source, is past due when
        // the restore runs: it gets a full cancel window from then.
        let v1 = &key.versions[0];
        assert_eq!(
            (v1.state_ms, v1.activated_ms, v1.destroy_at_ms),
            (1_001, Some(501), Some(78_000))
        );
        assert_eq!(key.versions[1].legal_hold.as_deref(), Some("case 2026-117"));
    }

    #[test]
    fn a_policy_naming_an_officer_unknown_here_restores_its_active_versions_suspended() {
        let (records, suspended) = restore_with(&["alice", "bob", "dave"], &|o: &str| o != "dave");
        assert_eq!(suspended.len(), 1);
        assert_eq!(suspended[0].key_id, "issuer");
        assert!(
            suspended[0].reason.contains("dave"),
            "{}",
            suspended[0].reason
        );
        let key = &records[0];
        // The active v3 is suspended; the deactivated v1 is not brought
        // nearer to use (SET_STATE alone brings a suspended one back).
        let states: Vec<_> = key.versions.iter().map(|v| v.state).collect();
        assert_eq!(
            states,
            [
                VersionState::Deactivated,
                VersionState::Suspended,
                VersionState::Suspended
            ]
        );
        // The protections stay as given, the hold included.
        assert_eq!(key.policies["SIGN"].required, 2);
        assert!(key.policies["SIGN"].contains("dave"));
        assert_eq!(key.min_version, 2);
        assert_eq!(key.versions[1].legal_hold.as_deref(), Some("case 2026-117"));
        assert_eq!(key.versions[2].state_ms, 77_000);
    }

    #[test]
    fn a_version_from_a_bundle_without_activation_times_keeps_its_cryptoperiod_from_the_source() {
        let label = KeyLabel::for_version("key/issuer", 3).unwrap();
        let mut active = version(3, "active", None);
        active.activated_ms = None;
        let restored = restored_version(&label, &active, AT_77_000);
        // Counted from the source's last state change, not from the
        // restore: a backup does not renew a cryptoperiod.
        assert_eq!(restored.activated_ms, Some(1_003));
        let mut staged = version(4, "pre_activation", None);
        staged.activated_ms = None;
        let label = KeyLabel::for_version("key/issuer", 4).unwrap();
        assert_eq!(
            restored_version(&label, &staged, AT_77_000).activated_ms,
            None
        );
    }
}
