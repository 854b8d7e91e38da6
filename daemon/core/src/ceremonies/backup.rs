//! Backups: the backup KEK a KEK ceremony makes and splits into shares, and
//! bundles of keys wrapped under a backup KEK.

use hsm_shim::security_officer::KekSource;
use hsm_shim::{KeyLabel, SecretSlice};
use serde_json::{Map, json};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::crash_points::{BACKUP, BACKUP_KEK};
use super::{intend, mark_made, note};
use crate::Custody;
use crate::audit::rfc3339_ms;
use crate::ceremony::bundle::{
    self, AesCheck, BackupKekRef, Bundle, BundledKey, BundledPolicy, KeyProtections, Manifest,
};
use crate::ceremony::journal::{BackupKek, CeremonyRecord, TokenRole};
use crate::ceremony::shares;
use crate::dual_control::operation::KeyPolicies;
use crate::dual_control::store::DualControlStore;
use crate::failpoint;
use crate::registry::{KeyRecord, VersionRecord};
use crate::{Error, Reason};

/// The associated data of a bundled AES key's check ciphertext.
pub fn check_aad(key_id: &str, version: u32) -> Vec<u8> {
    format!("custody-restore-check/v1\n{key_id}/{version}").into_bytes()
}

/// 32 random bytes from the HSM, split K-of-N, imported as the token's
/// trusted backup KEK by the security officer. The value exists in custodyd
/// only inside this function, in zeroizing memory; the shares wait in
/// memory for their custodians.
pub(super) async fn make_backup_kek(
    state: &Custody,
    record: &mut CeremonyRecord,
    threshold: u8,
    custodians: &[String],
) -> Result<(), Error> {
    let engine = &state.ceremonies;
    let so_pin = engine
        .so_pin
        .clone()
        .ok_or_else(|| Error::new(Reason::SoPinNotConfigured, "set [ceremony] so_pin_file"))?;
    let value = state
        .hsm
        .run(|session| {
            let mut value = Zeroizing::new([0u8; 32]);
            session.random(value.as_mut_slice())?;
            Ok(value)
        })
        .await?;
    let count = u8::try_from(custodians.len())
        .map_err(|_| Error::new(Reason::BadScript, "too many custodians"))?;
    let split =
        shares::split(&value, threshold, count).map_err(|e| Error::internal(e.to_string()))?;
    let set_id = split[0].set_id();
    let label = KeyLabel::new(format!("custody-backup-kek/{set_id}"))?;
    intend(
        state,
        record,
        "backup-kek",
        &[(label.as_str().to_string(), TokenRole::Main)],
        &BACKUP_KEK,
    )
    .await?;
    let hold = state
        .audit
        .hold()
        .await
        .map_err(|e| Error::audit_unavailable(&e))?;
    let hsm = state.hsm.clone();
    let run_label = label.clone();
    let secret = SecretSlice::from(value.to_vec());
    drop(value);
    let info = tokio::task::spawn_blocking(move || {
        hsm.create_trusted_kek(&so_pin, &run_label, KekSource::Import(&secret))
    })
    .await
    .map_err(|_| Error::internal("SO step panicked"))?;
    drop(hold);
    let info = info?;
    failpoint::hit(BACKUP_KEK.after_hsm);
    mark_made(record, "backup-kek");
    let kcv = info.check_value.map(|k| k.to_string()).unwrap_or_default();
    engine.secrets(&record.id, |secrets| {
        secrets.to_collect = custodians.iter().cloned().zip(split).collect();
    });
    record.backup_kek = Some(BackupKek {
        label: label.as_str().into(),
        set_id: set_id.clone(),
        threshold,
        shares: count,
        kcv: kcv.clone(),
        ceremony: record.id.clone(),
        custodians: custodians.to_vec(),
    });
    record.done.push("backup-kek".into());
    let mut detail = Map::new();
    detail.insert("label".into(), json!(label.as_str()));
    detail.insert("set_id".into(), json!(set_id));
    detail.insert("kcv".into(), json!(kcv));
    detail.insert("threshold".into(), json!(threshold));
    detail.insert("custodians".into(), json!(custodians));
    note(
        state,
        record,
        "backup-kek",
        "custodyd",
        format!(
            "backup KEK made from the HSM's RNG, split {threshold} of {count} (set {set_id}), imported as trusted by the security officer"
        ),
        detail,
    )
    .await?;
    failpoint::hit(BACKUP_KEK.after_result);
    Ok(())
}

/// Wraps the new KEK under the backup KEK into the ceremony's bundle.
pub(super) async fn back_up_new_kek(
    state: &Custody,
    record: &mut CeremonyRecord,
) -> Result<(), Error> {
    let (made, kek) = match (record.key.clone(), record.backup_kek.clone()) {
        (Some(made), Some(kek)) => (made, kek),
        _ => {
            return Err(Error::internal(
                "backup before the key and the backup KEK exist",
            ));
        }
    };
    intend(state, record, "backup", &[], &BACKUP).await?;
    // The key as the commit will register it: active, with the policies
    // fixed when the ceremony opened.
    let now = state.clock.now_ms();
    let policies = governing(
        &record.key_policies.clone().unwrap_or_default(),
        &state.dual_control,
    );
    let key = KeyToBack {
        key_id: made.key_id.clone(),
        version: 1,
        algorithm: made.algorithm.clone(),
        state: "active".into(),
        hsm_label: made.hsm_label.clone(),
        public_key_der_hex: made.public_key_der_hex.clone(),
        check_value: made.check_value.clone(),
        state_ms: now,
        activated_ms: Some(now),
        destroy_at_ms: None,
        legal_hold: None,
        destroy_approved_under: None,
        protections: KeyProtections {
            key_id: made.key_id.clone(),
            primary_version: 1,
            allowed_signers: Vec::new(),
            policies: bundled_policies(&policies),
            min_version: 0,
            cryptoperiod_ms: None,
            backup_exportable: made.backup,
            officer_principals: officer_principals(&policies, &state.dual_control),
        },
    };
    let bundle = make_bundle(state, &kek, vec![key]).await?;
    failpoint::hit(BACKUP.after_hsm);
    record.backup_bundle = bundle.to_json();
    record.done.push("backup".into());
    let mut detail = Map::new();
    detail.insert(
        "bundle_sha256".into(),
        json!(hex::encode(Sha256::digest(record.backup_bundle.as_bytes()))),
    );
    note(
        state,
        record,
        "backup",
        "custodyd",
        format!(
            "{} wrapped (RFC 5649) under backup KEK set {} into a bundle signed by the audit key",
            made.key_id, kek.set_id
        ),
        detail,
    )
    .await?;
    failpoint::hit(BACKUP.after_result);
    Ok(())
}

/// A key version to put in a bundle.
pub struct KeyToBack {
    /// Key id.
    pub key_id: String,
    /// Version.
    pub version: u32,
    /// API algorithm name.
    pub algorithm: String,
    /// Lifecycle state name.
    pub state: String,
    /// HSM label.
    pub hsm_label: String,
    /// SPKI DER, hex (key pairs).
    pub public_key_der_hex: String,
    /// KCV, hex (AES).
    pub check_value: String,
    /// Unix milliseconds of the version's last state change.
    pub state_ms: i64,
    /// Unix milliseconds of the version's first activation.
    pub activated_ms: Option<i64>,
    /// Unix milliseconds of a scheduled destruction.
    pub destroy_at_ms: Option<i64>,
    /// The reason of a legal hold on the version.
    pub legal_hold: Option<String>,
    /// The quorum a scheduled destruction was approved under.
    pub destroy_approved_under: Option<crate::dual_control::quorum::Quorum>,
    /// The key's protections (the same for every version of a key).
    pub protections: KeyProtections,
}

impl KeyToBack {
    /// Version `version` of the registry's `key`, with the key's
    /// protections, its policy officers' principals as `officers` enroll
    /// them.
    pub fn of(key: &KeyRecord, version: &VersionRecord, officers: &DualControlStore) -> KeyToBack {
        KeyToBack {
            key_id: key.key_id.clone(),
            version: version.version,
            algorithm: key.algorithm.clone(),
            state: state_name(version.state),
            hsm_label: version.hsm_label.clone(),
            public_key_der_hex: version.public_key_der_hex.clone(),
            check_value: version.check_value.clone(),
            state_ms: version.state_ms,
            activated_ms: version.activated_ms,
            destroy_at_ms: version.destroy_at_ms,
            legal_hold: version.legal_hold.clone(),
            destroy_approved_under: version.destroy_approved_under.clone(),
            protections: protections_of(key, officers),
        }
    }
}

/// The stored name of a state (`active`, `suspended`, ...).
fn state_name(state: crate::registry::VersionState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// A key's policies as the manifest carries them.
fn bundled_policies(policies: &KeyPolicies) -> std::collections::BTreeMap<String, BundledPolicy> {
    policies
        .iter()
        .map(|(kind, quorum)| (kind.clone(), BundledPolicy::of(quorum)))
        .collect()
}

/// What protects `key`, as the manifest carries it: every quorum that
/// governs it here, the administrative quorum's included where the key
/// leaves a kind to it ([`crate::authz::governing_policies`]).
fn protections_of(key: &KeyRecord, officers: &DualControlStore) -> KeyProtections {
    let policies = governing(&key.policies, officers);
    KeyProtections {
        key_id: key.key_id.clone(),
        primary_version: key.primary_version,
        allowed_signers: key.allowed_signers.clone(),
        policies: bundled_policies(&policies),
        min_version: key.min_version,
        cryptoperiod_ms: key.cryptoperiod_ms,
        backup_exportable: key.backup_exportable,
        officer_principals: officer_principals(&policies, officers),
    }
}

/// A key's own `policies` with the administrative quorum `officers` hold
/// written in where they leave a kind to it
/// ([`crate::authz::governing_policies`]): what a bundle carries.
fn governing(policies: &KeyPolicies, officers: &DualControlStore) -> KeyPolicies {
    match officers.admin_quorum() {
        Ok(admin) => crate::authz::governing_policies(policies, &admin),
        // No officers: nothing is approved here, and no bundle is made.
        Err(_) => policies.clone(),
    }
}

/// The principal each officer `policies` name is enrolled for in
/// `officers`, by id ([`bundle::NOT_ENROLLED`] for one no longer enrolled).
fn officer_principals(
    policies: &KeyPolicies,
    officers: &DualControlStore,
) -> std::collections::BTreeMap<String, String> {
    policies
        .values()
        .flat_map(|quorum| quorum.members.iter())
        .map(|officer| {
            let principal = officers.officer(officer).map_or_else(
                || bundle::NOT_ENROLLED.into(),
                |enrolled| enrolled.principal,
            );
            (officer.clone(), principal)
        })
        .collect()
}

/// Wraps `keys` under the backup KEK `kek` and signs the manifest with the
/// audit key.
pub async fn make_bundle(
    state: &Custody,
    kek: &BackupKek,
    keys: Vec<KeyToBack>,
) -> Result<Bundle, Error> {
    let kek_label = KeyLabel::new(kek.label.clone())?;
    let wrapped = state
        .hsm
        .run(move |session| {
            let mut out = Vec::with_capacity(keys.len());
            for key in keys {
                let label = KeyLabel::new(key.hsm_label.clone())?;
                let wrapped = session.wrap_key(&kek_label, &label)?;
                let check = if key.public_key_der_hex.is_empty() {
                    let ciphertext = session.encrypt_gcm(
                        &label,
                        &check_aad(&key.key_id, key.version),
                        bundle::CHECK_PLAINTEXT,
                    )?;
                    Some(AesCheck {
                        iv: hex::encode(ciphertext.iv),
                        ciphertext: hex::encode(&ciphertext.ciphertext_and_tag),
                    })
                } else {
                    None
                };
                out.push((key, wrapped, check));
            }
            Ok(out)
        })
        .await?;
    let mut protections: Vec<KeyProtections> = Vec::new();
    for (key, _, _) in &wrapped {
        if !protections.iter().any(|p| p.key_id == key.key_id) {
            protections.push(key.protections.clone());
        }
    }
    let keys = wrapped
        .into_iter()
        .map(|(key, wrapped, check)| {
            let fingerprint = if key.public_key_der_hex.is_empty() {
                key.check_value.to_lowercase()
            } else {
                hex::encode(Sha256::digest(
                    hex::decode(&key.public_key_der_hex).unwrap_or_default(),
                ))
            };
            BundledKey {
                key_id: key.key_id,
                version: key.version,
                algorithm: key.algorithm,
                state: key.state,
                fingerprint,
                public_key_der: (!key.public_key_der_hex.is_empty())
                    .then_some(key.public_key_der_hex),
                check,
                wrapped: hex::encode(wrapped),
                state_ms: key.state_ms,
                activated_ms: key.activated_ms,
                destroy_at_ms: key.destroy_at_ms,
                legal_hold: key.legal_hold,
                destroy_approved_under: key.destroy_approved_under.as_ref().map(BundledPolicy::of),
            }
        })
        .collect();
    let token = state.hsm.token();
    let manifest = Manifest {
        format: bundle::FORMAT.into(),
        created: rfc3339_ms(state.clock.now_ms()),
        source_token: format!("{} (serial {})", token.label, token.serial),
        backup_kek: BackupKekRef {
            set_id: kek.set_id.clone(),
            threshold: kek.threshold,
            shares: kek.shares,
            kcv: kek.kcv.to_lowercase(),
        },
        keys,
        protections,
    };
    let mut bundle = Bundle::new(manifest, state.audit.audit_key_pem());
    let signature = state
        .audit
        .sign_statement(bundle.signing_message())
        .await
        .map_err(|e| Error::audit_unavailable(&e))?;
    bundle
        .set_signature(&signature)
        .map_err(|e| Error::internal(e.to_string()))?;
    Ok(bundle)
}
