//! The ceremony's new key, made in the HSM: generated (root key, KEK) by the
//! journaled generation protocol of [`crate::keys::generation`], with the
//! ceremony journal as its journal, or imported from custodians'
//! components; and the root's self-signed certificate.

use hsm_shim::KeyLabel;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::crash_points::{CERTIFICATE, GENERATE, IMPORT};
use super::{intend, journal_objects, mark_made, note};
use crate::Custody;
use crate::Error;
use crate::algorithms::KeyAlgorithm;
use crate::ceremony::components::KeyBytes;
use crate::ceremony::fingerprint::Fingerprint;
use crate::ceremony::journal::{CeremonyRecord, MadeKey, TokenRole};
use crate::ceremony::script::Script;
use crate::failpoint;
use crate::keys::generation::{
    CrashPoints, GenerationJournal, KeyFacts, NewVersion, generate_version,
};
use crate::names::hsm_label;
use crate::registry::VersionRecord;

/// Generates the script's key in the HSM by the journaled generation
/// protocol, with the ceremony journal as its journal (key pairs are
/// consistency-tested by hsm-shim as they are made).
pub(super) async fn generate(
    state: &Custody,
    record: &mut CeremonyRecord,
    script: &Script,
) -> Result<(), Error> {
    let key = script
        .key()
        .ok_or_else(|| Error::internal("this ceremony makes no key"))?;
    let algorithm = key.algorithm;
    let generated = generate_version(
        state,
        &mut CeremonyGeneration { record },
        NewVersion {
            key_id: &key.name,
            version: 1,
            algorithm,
            backup_exportable: key.backup,
        },
    )
    .await?;
    let label = generated.version.hsm_label.clone();
    let fingerprint = fingerprint_of(&generated.info)?;
    record.key = Some(made_key(
        &key.name,
        algorithm,
        &label,
        key.backup,
        facts_of(generated.version),
        &fingerprint,
    ));
    record.done.push("generate".into());
    let mut detail = fingerprint_detail(&fingerprint);
    detail.insert("label".into(), json!(label));
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
            if algorithm.key_spec().is_key_pair() {
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

/// The ceremony journal as the journal of the generation protocol: the label
/// is one of the ceremony's journaled objects (step `generate`), and the
/// generation's crash points are the step's.
struct CeremonyGeneration<'a> {
    record: &'a mut CeremonyRecord,
}

impl GenerationJournal for CeremonyGeneration<'_> {
    const POINTS: CrashPoints = CrashPoints {
        before_intent: GENERATE.before_intent,
        after_intent: GENERATE.after_intent,
        after_hsm: GENERATE.after_hsm,
    };

    async fn intend(
        &mut self,
        custody: &Custody,
        _new: &NewVersion<'_>,
        label: &KeyLabel,
        _started_ms: i64,
    ) -> Result<(), Error> {
        journal_objects(
            custody,
            self.record,
            "generate",
            &[(label.as_str().to_string(), TokenRole::Main)],
        )
        .await
    }

    /// Nothing here: the ceremony's roll-back destroys every object it
    /// journaled, made or not.
    async fn failed(&mut self, _custody: &Custody, _label: &KeyLabel) {}

    fn made(&mut self, _label: &KeyLabel) {
        mark_made(self.record, "generate");
    }
}

/// What the ceremony journals of the key it made.
fn made_key(
    key_id: &str,
    algorithm: KeyAlgorithm,
    label: &str,
    backup: bool,
    facts: KeyFacts,
    fingerprint: &Fingerprint,
) -> MadeKey {
    MadeKey {
        key_id: key_id.into(),
        algorithm: algorithm.api_name().into(),
        hsm_label: label.into(),
        public_key_der_hex: facts.public_key_der_hex,
        public_key_pem: facts.public_key_pem,
        check_value: facts.check_value,
        fingerprint: hex::encode(fingerprint.bytes()),
        certificate_pem: String::new(),
        backup,
    }
}

/// The facts a generated version holds.
fn facts_of(version: VersionRecord) -> KeyFacts {
    KeyFacts {
        public_key_der_hex: version.public_key_der_hex,
        public_key_pem: version.public_key_pem,
        check_value: version.check_value,
    }
}

/// What officers compare: a key pair's public key hash, an AES key's KCV.
fn fingerprint_of(info: &hsm_shim::KeyInfo) -> Result<Fingerprint, Error> {
    match (&info.public_key, &info.check_value) {
        (Some(public_key), _) => Ok(Fingerprint::of_public_key(public_key.spki_der())),
        (None, Some(kcv)) => Ok(Fingerprint::of_kcv(kcv.0)),
        (None, None) => Err(Error::internal(
            "the HSM reported neither a public key nor a check value",
        )),
    }
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
    let days = certificate.validity_days;
    let signed = state
        .hsm
        .run(move |session| {
            crate::ceremony::certificate::self_sign(
                session, &label, algorithm, &spki, &params, days,
            )
        })
        .await??;
    let pem = signed.pem;
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
    detail.insert("tbs_sha256".into(), json!(hex::encode(signed.tbs_sha256)));
    detail.insert(
        "lint".into(),
        json!(format!(
            "passed: {}",
            crate::ceremony::lint::Passed::rules()
        )),
    );
    note(
        state,
        record,
        "certificate",
        "custodyd",
        format!(
            "self-signed root certificate \"{}\" (TBS SHA-256 {}) linted, then signed by the new key in the HSM and verified with its public key",
            certificate.common_name,
            hex::encode(signed.tbs_sha256)
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
    let facts = KeyFacts::of(&info)?;
    let fingerprint = fingerprint_of(&info)?;
    record.key = Some(made_key(
        &key.name,
        key.algorithm,
        label.as_str(),
        false,
        facts,
        &fingerprint,
    ));
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
