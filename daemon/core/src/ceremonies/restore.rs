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
use super::commit::finish_completed;
use super::crash_points::{COMMIT, RESTORE};
use super::roll_back::destroy_if_there;
use super::{intend, journal_failure, mark_made, note};
use crate::Custody;
use crate::algorithms::KeyAlgorithm;
use crate::ceremony::bundle::{self, Bundle, BundledKey};
use crate::ceremony::journal::{CeremonyRecord, RestoreOutcome, TokenRole};
use crate::ceremony::shares;
use crate::failpoint;
use crate::registry::{KeyRecord, VersionRecord, VersionState};
use crate::{Error, Reason};

/// The challenge each restored key pair signs.
pub fn restore_challenge(ceremony: &str, key_id: &str, version: u32) -> Vec<u8> {
    format!("custody-restore-challenge/v1\n{ceremony}\n{key_id}/{version}").into_bytes()
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
    let prefix = if drill {
        format!("drill/{}", record.id)
    } else {
        "key".to_string()
    };
    let token = if drill {
        TokenRole::Scratch
    } else {
        TokenRole::Main
    };
    let mut labels = Vec::new();
    for key in &bundle.manifest.keys {
        labels.push((
            KeyLabel::for_version(&format!("{prefix}/{}", key.key_id), key.version)?,
            key,
        ));
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
    intend(state, record, "commit", &[], &COMMIT).await?;
    let _registry = state.registry.lock().await;
    let now = state.clock.now_ms();
    let records = restored_records(&labels, now);
    state
        .registry
        .put_all(records)
        .await
        .map_err(|e| journal_failure(e.to_string()))?;
    failpoint::hit(COMMIT.after_hsm);
    finish_completed(state, record).await?;
    failpoint::hit(COMMIT.after_result);
    Ok(())
}

/// The registry records of the restored versions, one per key: versions
/// in order, the highest active one primary (else the highest).
fn restored_records(restored: &[(KeyLabel, &BundledKey)], now: i64) -> Vec<KeyRecord> {
    let mut by_key: BTreeMap<&str, Vec<(&KeyLabel, &BundledKey)>> = BTreeMap::new();
    for (label, key) in restored {
        by_key
            .entry(key.key_id.as_str())
            .or_default()
            .push((label, *key));
    }
    by_key
        .into_values()
        .map(|mut versions| {
            versions.sort_by_key(|(_, key)| key.version);
            let first = versions[0].1;
            let records: Vec<VersionRecord> = versions
                .iter()
                .map(|(label, key)| restored_version(label, key, now))
                .collect();
            let primary = records
                .iter()
                .rev()
                .find(|v| v.state == VersionState::Active)
                .or(records.last())
                .map_or(1, |v| v.version);
            KeyRecord {
                key_id: first.key_id.clone(),
                algorithm: first.algorithm.clone(),
                allowed_signers: first.allowed_signers.clone(),
                primary_version: primary,
                versions: records,
                created_ms: now,
                policies: BTreeMap::new(),
                cryptoperiod_ms: None,
                min_version: 0,
                rotation_requests: Vec::new(),
                backup_exportable: true,
            }
        })
        .collect()
}

fn restored_version(label: &KeyLabel, key: &BundledKey, now: i64) -> VersionRecord {
    let public_key_der_hex = key.public_key_der.clone().unwrap_or_default();
    let public_key_pem = hex::decode(&public_key_der_hex)
        .ok()
        .and_then(|der| {
            spki::der::pem::encode_string("PUBLIC KEY", spki::der::pem::LineEnding::LF, &der).ok()
        })
        .unwrap_or_default();
    // A state the manifest names that this build does not know restores
    // suspended: usable again only by an officer's decision.
    let state: VersionState =
        serde_json::from_value(json!(key.state)).unwrap_or(VersionState::Suspended);
    VersionRecord {
        version: key.version,
        state,
        created_ms: now,
        state_ms: now,
        hsm_label: label.as_str().into(),
        public_key_der_hex,
        public_key_pem,
        activated_ms: (state == VersionState::Active).then_some(now),
        destroy_at_ms: None,
        legal_hold: None,
        // SoftHSM2 computes no check value for unwrapped keys; the bundle's
        // KCV stays in the manifest and the transcript.
        check_value: String::new(),
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
        let info = session.import_session_unwrap_kek(&kek, &self.kek_value)?;
        let outcome = self.unwrap_and_verify(session, &kek, info.check_value);
        // The session KEK goes with the session anyway; destroy it now.
        let _ = destroy_if_there(session, &kek);
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
