//! The ceremony's new key, made in the HSM: generated (root key, KEK) or
//! imported from custodians' components, and the root's self-signed
//! certificate.

use hsm_shim::{AesRole, Exportability, KeyLabel};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::crash_points::{CERTIFICATE, GENERATE, IMPORT};
use super::{intend, mark_made, note};
use crate::Custody;
use crate::Error;
use crate::algorithms::KeyAlgorithm;
use crate::ceremony::components::KeyBytes;
use crate::ceremony::fingerprint::Fingerprint;
use crate::ceremony::journal::{CeremonyRecord, MadeKey, TokenRole};
use crate::ceremony::script::Script;
use crate::failpoint;
use crate::names::hsm_label;

/// Generates the script's key in the HSM (key pairs are consistency-tested
/// by hsm-shim as they are made).
pub(super) async fn generate(
    state: &Custody,
    record: &mut CeremonyRecord,
    script: &Script,
) -> Result<(), Error> {
    let key = script
        .key()
        .ok_or_else(|| Error::internal("this ceremony makes no key"))?;
    let algorithm = key.algorithm;
    let label = hsm_label(&key.name, 1)?;
    intend(
        state,
        record,
        "generate",
        &[(label.as_str().to_string(), TokenRole::Main)],
        &GENERATE,
    )
    .await?;
    let export = if key.backup {
        Exportability::BackupWrapOnly
    } else {
        Exportability::NonExportable
    };
    let spec = algorithm.key_spec();
    let run_label = label.clone();
    let info = state
        .hsm
        .run(move |session| {
            if spec.is_key_pair() {
                session.generate_key_pair(&run_label, spec, export)
            } else {
                session.generate_aes_key(&run_label, AesRole::DataEncryption, export)
            }
        })
        .await?;
    failpoint::hit(GENERATE.after_hsm);
    mark_made(record, "generate");
    let mut made = MadeKey {
        key_id: key.name.clone(),
        algorithm: algorithm.api_name().into(),
        hsm_label: label.as_str().into(),
        backup: key.backup,
        ..MadeKey::default()
    };
    let fingerprint = fingerprint_of(&mut made, &info)?;
    record.key = Some(made);
    record.done.push("generate".into());
    let mut detail = fingerprint_detail(&fingerprint);
    detail.insert("label".into(), json!(label.as_str()));
    detail.insert("algorithm".into(), json!(algorithm.api_name()));
    detail.insert("backup_exportable".into(), json!(key.backup));
    note(
        state,
        record,
        "generate",
        "custodyd",
        format!(
            "{} generated in the HSM{}",
            algorithm.api_name(),
            if spec.is_key_pair() {
                ", pair-wise consistency test passed"
            } else {
                ""
            }
        ),
        detail,
    )
    .await?;
    failpoint::hit(GENERATE.after_result);
    Ok(())
}

fn fingerprint_of(made: &mut MadeKey, info: &hsm_shim::KeyInfo) -> Result<Fingerprint, Error> {
    let fingerprint = match (&info.public_key, &info.check_value) {
        (Some(public_key), _) => {
            made.public_key_der_hex = hex::encode(public_key.spki_der());
            made.public_key_pem = public_key.to_pem()?;
            Fingerprint::of_public_key(public_key.spki_der())
        }
        (None, Some(kcv)) => {
            made.check_value = kcv.to_string();
            Fingerprint::of_kcv(kcv.0)
        }
        (None, None) => {
            return Err(Error::internal(
                "the HSM reported neither a public key nor a check value",
            ));
        }
    };
    made.fingerprint = hex::encode(fingerprint.bytes());
    Ok(fingerprint)
}

fn fingerprint_detail(fingerprint: &Fingerprint) -> Map<String, Value> {
    let mut detail = Map::new();
    detail.insert("fingerprint".into(), json!(fingerprint.hex_groups()));
    if let Some(words) = fingerprint.words() {
        detail.insert("fingerprint_words".into(), json!(words));
    }
    detail
}

/// The root certificate, signed inside the HSM by the new key.
pub(super) async fn self_sign(
    state: &Custody,
    record: &mut CeremonyRecord,
    script: &Script,
    certificate: &crate::ceremony::script::CertificateSection,
) -> Result<(), Error> {
    let made = record
        .key
        .clone()
        .ok_or_else(|| Error::internal("no key to certify"))?;
    intend(state, record, "certificate", &[], &CERTIFICATE).await?;
    let algorithm = KeyAlgorithm::from_api_name(&made.algorithm)
        .ok_or_else(|| Error::internal(made.algorithm.clone()))?;
    let spki = hex::decode(&made.public_key_der_hex).unwrap_or_default();
    let label = KeyLabel::new(made.hsm_label.clone())?;
    let params = crate::ceremony::certificate::root_params(certificate, script.id())?;
    let pem = state
        .hsm
        .run(move |session| {
            crate::ceremony::certificate::self_sign(session, &label, algorithm, &spki, &params)
        })
        .await??;
    failpoint::hit(CERTIFICATE.after_hsm);
    if let Some(key) = record.key.as_mut() {
        key.certificate_pem = pem.clone();
    }
    record.done.push("certificate".into());
    let mut detail = Map::new();
    detail.insert(
        "certificate_sha256".into(),
        json!(hex::encode(Sha256::digest(pem.as_bytes()))),
    );
    detail.insert("common_name".into(), json!(certificate.common_name));
    note(
        state,
        record,
        "certificate",
        "custodyd",
        format!(
            "self-signed root certificate \"{}\" signed by the new key in the HSM",
            certificate.common_name
        ),
        detail,
    )
    .await?;
    failpoint::hit(CERTIFICATE.after_result);
    Ok(())
}

pub(super) async fn import_components(
    state: &Custody,
    record: &mut CeremonyRecord,
    script: &Script,
) -> Result<(), Error> {
    let key = script
        .key()
        .ok_or_else(|| Error::internal("no key section"))?;
    let label = hsm_label(&key.name, 1)?;
    let values: Vec<KeyBytes> = state.ceremonies.secrets(&record.id, |secrets| {
        std::mem::take(&mut secrets.components)
            .into_values()
            .collect()
    });
    intend(
        state,
        record,
        "import",
        &[(label.as_str().to_string(), TokenRole::Main)],
        &IMPORT,
    )
    .await?;
    let combiner = state.ceremonies.combiner.clone();
    let run_label = label.clone();
    let info = state
        .hsm
        .run(move |session| combiner.import(session, &run_label, &values))
        .await?;
    failpoint::hit(IMPORT.after_hsm);
    mark_made(record, "import");
    let mut made = MadeKey {
        key_id: key.name.clone(),
        algorithm: key.algorithm.api_name().into(),
        hsm_label: label.as_str().into(),
        backup: false,
        ..MadeKey::default()
    };
    let fingerprint = fingerprint_of(&mut made, &info)?;
    record.key = Some(made);
    record.done.push("import".into());
    let mut detail = fingerprint_detail(&fingerprint);
    detail.insert("label".into(), json!(label.as_str()));
    note(
        state,
        record,
        "import",
        "custodyd",
        format!(
            "{} components combined in zeroizing memory and imported non-extractable; KEK check value {}",
            script.custodians().len(),
            fingerprint.hex_groups()
        ),
        detail,
    )
    .await?;
    failpoint::hit(IMPORT.after_result);
    Ok(())
}
