//! An intermediate ceremony: a custody root key certifies another custody
//! key. Its TBS is built and linted once the quorum signs in (step `tbs`,
//! journaled: the officers confirm its SHA-256); only after every officer
//! who signed in confirmed does the HSM sign those bytes (step `certify`),
//! the signature verified with the root's public key; the commit stores the
//! chain [intermediate, root] with the certified version.
//!
//! Or it certifies a PKCS#10 CSR the script names by SHA-256 (an issuing CA
//! whose key lives outside custody, `ceremony::csr`): the CSR's bytes come
//! with the start and are checked then (before any HSM call) and again when
//! the TBS is built; the subject and key are the CSR's, the profile the
//! script's; the certificate is kept with the ceremony (its transcript and
//! `certificate_pem`), since no custody key version can hold it.

use serde_json::{Map, json};
use sha2::{Digest, Sha256};

use super::commit::{close_commit, open_commit};
use super::crash_points::{CERTIFY, CROSS_CERTIFY, CROSS_TBS, Points, STAGE, TBS};
use super::{intend, journal_failure, note};
use crate::Custody;
use crate::algorithms::KeyAlgorithm;
use crate::ceremony::cross_sign::{self, Source};
use crate::ceremony::csr::{self, Csr};
use crate::ceremony::intermediate::{self, Prepared};
use crate::ceremony::journal::{CeremonyRecord, Certification};
use crate::ceremony::lint::Passed;
use crate::ceremony::script::{Kind, Script};
use crate::failpoint;
use crate::keys::check_usable;
use crate::lifecycle::Use;
use crate::registry::{KeyRecord, VersionRecord, VersionState};
use crate::{Error, Reason};

/// The script's issuer and key, and whether it certifies a staged version.
fn parts(script: &Script) -> Result<(&str, &str, bool), Error> {
    match script.kind() {
        Kind::Intermediate {
            issuer, key, stage, ..
        } => Ok((issuer, key, *stage)),
        _ => Err(Error::internal("not an intermediate ceremony")),
    }
}

/// The version of `key_id` the ceremony certifies: its current version,
/// active; or, staging, its staged version (pre-activation, newer than the
/// primary), which signs nothing until promoted.
fn certified(
    state: &Custody,
    key_id: &str,
    stage: bool,
) -> Result<(KeyRecord, VersionRecord), Error> {
    if !stage {
        return current(state, key_id, Use::Protect);
    }
    let key = crate::keys::found(state, key_id)?;
    let staged = crate::keys::rotate::staged_version(&key).ok_or_else(|| {
        Error::new(
            Reason::VersionNotActive,
            format!(
                "{key_id} has no staged version (pre-activation, newer than version {})",
                key.primary_version
            ),
        )
    })?;
    let version = crate::keys::version_of(&key, staged)?.clone();
    Ok(((*key).clone(), version))
}

/// The current version of `key_id`, active and usable for `usage` by the
/// one lifecycle rule every signature keeps (not scheduled for
/// destruction; for a certificate, in its cryptoperiod).
pub(super) fn current(
    state: &Custody,
    key_id: &str,
    usage: Use,
) -> Result<(KeyRecord, VersionRecord), Error> {
    let key = crate::keys::found(state, key_id)?;
    let version = crate::keys::version_of(&key, key.primary_version)?.clone();
    if version.state != VersionState::Active {
        return Err(Error::new(
            Reason::VersionNotActive,
            format!(
                "{key_id} version {} is {}: only an active version certifies or is certified",
                version.version,
                version.state.api_name()
            ),
        ));
    }
    check_usable(&key, &version, usage, state.clock.now_ms())?;
    Ok(((*key).clone(), version))
}

/// What an intermediate ceremony needs when it opens: the issuer's current
/// version active, with its root certificate; the key certified a key pair;
/// and the ceremony's quorum at least the issuer's SIGN policy (as many
/// officers, all of them in it): fewer officers than may sign with the root
/// do not get it to certify a key. Staging, the key's staged version need
/// not exist yet (the ceremony makes it), but the quorum must also cover
/// the key's ROTATE policy: fewer officers than may rotate the key do not
/// get a new version of it made.
pub(super) fn check_open(state: &Custody, script: &Script) -> Result<(), Error> {
    let (issuer_id, key_id, stage) = parts(script)?;
    let (issuer, version) = current(state, issuer_id, Use::Protect)?;
    if version.certificate_chain_pem.is_empty() {
        return Err(Error::new(
            Reason::NoIssuerCertificate,
            format!(
                "{issuer_id} version {} has no root certificate stored with it: only a root key made by a root-key ceremony with a [certificate] certifies",
                version.version
            ),
        ));
    }
    let algorithm = KeyAlgorithm::from_api_name(&issuer.algorithm)
        .ok_or_else(|| Error::internal(issuer.algorithm.clone()))?;
    crate::ceremony::certificate::rcgen_for(algorithm)?;
    if csr_sha256(script).is_some() || certificate_sha256(script).is_some() {
        // The CSR or certificate is checked with its bytes (`check_csr`,
        // `check_source`).
    } else if stage {
        crate::ceremony::certificate::rcgen_for(subject_algorithm(state, key_id)?)?;
        let key = crate::keys::found(state, key_id)?;
        crate::authz::ceremony_quorum_covers(&key, "ROTATE", script.quorum(), script.officers())?;
    } else {
        crate::ceremony::certificate::rcgen_for(subject_algorithm(state, key_id)?)?;
        let (_, subject) = current(state, key_id, Use::Protect)?;
        if subject.public_key_der_hex.is_empty() {
            return Err(Error::new(
                Reason::NoPublicKey,
                format!("{key_id} has no public key to certify"),
            ));
        }
    }
    crate::authz::ceremony_quorum_covers(&issuer, "SIGN", script.quorum(), script.officers())
}

/// The SHA-256 of the CSR the script certifies, if it certifies one.
fn csr_sha256(script: &Script) -> Option<&[u8; 32]> {
    match script.kind() {
        Kind::Intermediate { csr_sha256, .. } => csr_sha256.as_ref(),
        _ => None,
    }
}

/// The SHA-256 of the certificate a cross-sign script re-issues.
fn certificate_sha256(script: &Script) -> Option<&[u8; 32]> {
    match script.kind() {
        Kind::Intermediate {
            certificate_sha256, ..
        } => certificate_sha256.as_deref(),
        _ => None,
    }
}

/// The certificate `bytes` sent with the start of the cross-sign ceremony
/// `script`, checked against the script's SHA-256, that it is a CA's, the
/// keys allowed and the issuer's current key (see [`cross_sign::check`]);
/// none may be sent with another script. No HSM call.
pub(super) fn check_source(
    state: &Custody,
    script: &Script,
    bytes: &[u8],
) -> Result<Option<Source>, Error> {
    let Some(expected) = certificate_sha256(script) else {
        if bytes.is_empty() {
            return Ok(None);
        }
        return Err(Error::new(
            Reason::BadCrossSignCertificate,
            "a certificate to cross-sign was sent but the script is not a cross-sign script",
        ));
    };
    let (issuer_id, _, _) = parts(script)?;
    let (_, version) = current(state, issuer_id, Use::Protect)?;
    let issuer_spki = hex::decode(&version.public_key_der_hex).unwrap_or_default();
    cross_sign::check(bytes, expected, &issuer_spki).map(Some)
}

/// The CSR `bytes` sent with the start of the intermediate ceremony
/// `script`, checked against the script's SHA-256, its self-signature, the
/// keys allowed and the issuer's current key (see [`csr::check`]); none
/// may be sent when the script certifies a custody key. No HSM call.
pub(super) fn check_csr(
    state: &Custody,
    script: &Script,
    bytes: &[u8],
) -> Result<Option<Csr>, Error> {
    let Some(expected) = csr_sha256(script) else {
        if bytes.is_empty() {
            return Ok(None);
        }
        return Err(Error::new(
            Reason::BadCsr,
            "a CSR was sent but the script certifies a custody key (intermediate.key), not a CSR",
        ));
    };
    let (issuer_id, _, _) = parts(script)?;
    let (_, version) = current(state, issuer_id, Use::Protect)?;
    let issuer_spki = hex::decode(&version.public_key_der_hex).unwrap_or_default();
    csr::check(bytes, expected, &issuer_spki).map(Some)
}

/// Step `stage` of a staging ceremony: the key's staged version made (or
/// the one already staged taken), before the TBS is built for it.
pub(super) async fn stage(
    state: &Custody,
    record: &mut CeremonyRecord,
    script: &Script,
) -> Result<(), Error> {
    let (_, key_id, _) = parts(script)?;
    intend(state, record, "stage", &[], &STAGE).await?;
    check_open(state, script)?;
    let version = crate::keys::rotate::stage(state, key_id).await?;
    failpoint::hit(STAGE.after_hsm);
    let key = crate::keys::found(state, key_id)?;
    let primary = key.primary_version;
    let staged = crate::keys::version_of(&key, version)?;
    record.done.push("stage".into());
    let mut detail = Map::new();
    detail.insert("key".into(), json!(format!("{key_id} v{version}")));
    detail.insert("state".into(), json!(staged.state.api_name()));
    detail.insert(
        "public_key_sha256".into(),
        json!(hex::encode(Sha256::digest(
            hex::decode(&staged.public_key_der_hex).unwrap_or_default()
        ))),
    );
    note(
        state,
        record,
        "stage",
        "custodyd",
        format!(
            "{key_id} v{version} is staged: pre-activation, signing nothing until promoted; v{primary} keeps signing"
        ),
        detail,
    )
    .await?;
    failpoint::hit(STAGE.after_result);
    Ok(())
}

/// The algorithm of the key `key_id`.
fn subject_algorithm(state: &Custody, key_id: &str) -> Result<KeyAlgorithm, Error> {
    let key = crate::keys::found(state, key_id)?;
    KeyAlgorithm::from_api_name(&key.algorithm)
        .ok_or_else(|| Error::internal(key.algorithm.clone()))
}

pub(super) fn prepared_of(certification: &Certification) -> Result<(Prepared, [u8; 32]), Error> {
    let corrupt = |what: &str| Error::new(Reason::JournalCorrupt, format!("journaled {what}"));
    let confirmed: [u8; 32] = hex::decode(&certification.tbs_sha256)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupt("TBS SHA-256"))?;
    Ok((
        Prepared {
            tbs: hex::decode(&certification.tbs_der_hex).map_err(|_| corrupt("TBS"))?,
            signature_algorithm: hex::decode(&certification.signature_algorithm_der_hex)
                .map_err(|_| corrupt("signature algorithm"))?,
            tbs_sha256: confirmed,
        },
        confirmed,
    ))
}

/// Step `tbs`: the serial drawn from the HSM, the TBS built and linted, and
/// journaled with its summary and SHA-256 for the officers to confirm.
pub(super) async fn prepare_tbs(
    state: &Custody,
    record: &mut CeremonyRecord,
    script: &Script,
) -> Result<(), Error> {
    let Kind::Intermediate {
        issuer: issuer_id,
        key: key_id,
        certificate,
        profile,
        stage,
        ..
    } = script.kind()
    else {
        return Err(Error::internal("not an intermediate ceremony"));
    };
    let points = if certificate_sha256(script).is_some() {
        &CROSS_TBS
    } else {
        &TBS
    };
    intend(state, record, "tbs", &[], points).await?;
    check_open(state, script)?;
    // The CSR checked again, under the issuer's key of now.
    let csr_bytes = hex::decode(&record.csr_hex)
        .map_err(|_| Error::new(Reason::JournalCorrupt, "journaled CSR"))?;
    let csr = check_csr(state, script, &csr_bytes)?;
    let source_bytes = hex::decode(&record.certificate_hex)
        .map_err(|_| Error::new(Reason::JournalCorrupt, "journaled certificate"))?;
    let source = check_source(state, script, &source_bytes)?;
    let (issuer, issuer_version) = current(state, issuer_id, Use::Protect)?;
    let (subject_version, subject_spki_hex, subject_algorithm) = match (&csr, &source) {
        (Some(csr), _) => (0, hex::encode(&csr.spki), csr.algorithm),
        (None, Some(source)) => (0, hex::encode(&source.spki), source.algorithm),
        (None, None) => {
            let (_, subject) = certified(state, key_id, *stage)?;
            (
                subject.version,
                subject.public_key_der_hex,
                subject_algorithm(state, key_id)?,
            )
        }
    };
    let algorithm = KeyAlgorithm::from_api_name(&issuer.algorithm)
        .ok_or_else(|| Error::internal(issuer.algorithm.clone()))?;
    let root_pem = issuer_version
        .certificate_chain_pem
        .last()
        .cloned()
        .unwrap_or_default();
    let issuer_certificate = intermediate::issuer_certificate(&root_pem)?;
    let serial = state
        .hsm
        .run(crate::ceremony::certificate::serial_from_hsm)
        .await?;
    failpoint::hit(points.after_hsm);
    let mut params = intermediate::intermediate_params(
        certificate,
        profile,
        time::OffsetDateTime::from_unix_timestamp(state.clock.now_ms() / 1000)
            .map_err(|e| Error::internal(e.to_string()))?,
    )?;
    params.serial_number = Some(serial);
    if let Some(csr) = &csr {
        // The subject is the CSR's; nothing else of it (its requested
        // extensions are ignored: the profile is the script's).
        params.distinguished_name = csr.distinguished_name.clone();
    }
    if let Some(source) = &source {
        // The subject is the certificate's, byte for byte (checked below).
        params.distinguished_name = source.distinguished_name.clone();
    }
    let issuer_spki = hex::decode(&issuer_version.public_key_der_hex).unwrap_or_default();
    let subject_spki = hex::decode(&subject_spki_hex).unwrap_or_default();
    let keys = intermediate::Keys {
        issuer_algorithm: algorithm,
        issuer_spki: &issuer_spki,
        subject_algorithm,
        subject_spki: &subject_spki,
        subject_key_id: source.as_ref().and_then(|s| s.key_id.as_deref()),
    };
    let prepared = intermediate::prepare(
        &issuer_certificate,
        &keys,
        &params,
        profile,
        certificate.validity_days,
    )?;
    if let Some(csr) = &csr {
        same_subject(&prepared.tbs, &csr.subject_der, Reason::BadCsr, "the CSR's")?;
    }
    if let Some(source) = &source {
        same_subject(
            &prepared.tbs,
            &source.subject_der,
            Reason::CrossSignSubjectChanged,
            "the certificate's",
        )?;
    }
    let mut summary = intermediate::summary(&prepared.tbs);
    if let Some(csr) = &csr {
        summary.push(format!(
            "from the CSR of SHA-256 {} (its subject and public key; {} requested extension(s) ignored: the profile is the script's)",
            hex::encode(csr.sha256),
            csr.requested_extensions
        ));
    }
    if let Some(source) = &source {
        let possession = if source.self_signed {
            "self-signed, its signature verified with its own key".to_string()
        } else {
            format!(
                "issued by {}, whose signature is not checked here: nothing shows that the key's holder asked for this",
                source.issuer
            )
        };
        summary.push(format!(
            "cross-signing the CA certificate of SHA-256 {} ({possession}): its subject, public key and subjectKeyIdentifier; the profile is the script's",
            hex::encode(source.sha256),
        ));
    }
    let tbs_sha256 = hex::encode(prepared.tbs_sha256);
    record.certification = Some(Certification {
        issuer_key_id: issuer_id.clone(),
        issuer_version: issuer_version.version,
        issuer_label: issuer_version.hsm_label.clone(),
        issuer_algorithm: issuer.algorithm.clone(),
        issuer_public_key_der_hex: issuer_version.public_key_der_hex.clone(),
        issuer_chain_pem: issuer_version.certificate_chain_pem.clone(),
        key_id: key_id.clone(),
        key_version: subject_version,
        public_key_der_hex: subject_spki_hex,
        tbs_der_hex: hex::encode(&prepared.tbs),
        signature_algorithm_der_hex: hex::encode(&prepared.signature_algorithm),
        tbs_sha256: tbs_sha256.clone(),
        summary: summary.clone(),
        certificate_pem: String::new(),
        crl_number: None,
    });
    record.done.push("tbs".into());
    let mut detail = Map::new();
    detail.insert("tbs_sha256".into(), json!(tbs_sha256));
    detail.insert("lint".into(), json!(format!("passed: {}", Passed::rules())));
    detail.insert("summary".into(), json!(summary));
    detail.insert(
        "issuer".into(),
        json!(format!("{issuer_id} v{}", issuer_version.version)),
    );
    let certified = match (&csr, &source) {
        (None, Some(source)) => {
            detail.insert(
                "certificate_sha256".into(),
                json!(hex::encode(source.sha256)),
            );
            detail.insert("certificate_subject".into(), json!(source.subject));
            detail.insert("certificate_issuer".into(), json!(source.issuer));
            detail.insert("certificate_self_signed".into(), json!(source.self_signed));
            format!(
                "the CA certificate of SHA-256 {} ({})",
                hex::encode(source.sha256),
                source.subject
            )
        }
        (Some(csr), _) => {
            detail.insert("csr_sha256".into(), json!(hex::encode(csr.sha256)));
            detail.insert("csr_subject".into(), json!(csr.subject));
            detail.insert(
                "csr_requested_extensions_ignored".into(),
                json!(csr.requested_extensions),
            );
            format!(
                "the CSR of SHA-256 {} ({})",
                hex::encode(csr.sha256),
                csr.subject
            )
        }
        (None, None) => format!("{key_id} v{subject_version}"),
    };
    detail.insert("key".into(), json!(certified));
    note(
        state,
        record,
        "tbs",
        "custodyd",
        format!(
            "the certificate {issuer_id} would sign for {certified} (TBS SHA-256 {tbs_sha256}) built and linted: nothing signed yet"
        ),
        detail,
    )
    .await?;
    failpoint::hit(points.after_result);
    Ok(())
}

/// The TBS names the CSR's (or certificate's) subject byte for byte:
/// rcgen re-encodes names, and a name it cannot reproduce is refused
/// (`reason`) rather than changed.
fn same_subject(tbs: &[u8], subject_der: &[u8], reason: Reason, whose: &str) -> Result<(), Error> {
    use x509_parser::prelude::FromDer;
    let same = x509_parser::certificate::TbsCertificate::from_der(tbs)
        .is_ok_and(|(_, parsed)| parsed.subject.as_raw() == subject_der);
    if same {
        Ok(())
    } else {
        Err(Error::new(
            reason,
            format!(
                "{whose} subject cannot be certified byte for byte (an attribute type twice, or an encoding the certificate would change)"
            ),
        ))
    }
}

/// Steps `certify` and `commit`, once every officer who signed in
/// confirmed the TBS's SHA-256.
pub(super) async fn certify(
    state: &Custody,
    record: &mut CeremonyRecord,
    script: &Script,
) -> Result<(), Error> {
    // The policies in force now, not those of the start or of the TBS:
    // officers may have tightened the root's SIGN (or the key's ROTATE)
    // policy while the ceremony waited for confirmations (C6).
    sign_confirmed(
        state,
        record,
        script,
        &Signing {
            step: "certify",
            points: if certificate_sha256(script).is_some() {
                &CROSS_CERTIFY
            } else {
                &CERTIFY
            },
            check_open,
            issuer: IssuerVersion::ActiveWithLabel,
            product: intermediate::CERTIFICATE,
            usage: Use::Protect,
            noun: "certificate",
            output: "certificate",
        },
    )
    .await?;
    if record
        .certification
        .as_ref()
        .is_some_and(|c| c.key_id.is_empty())
    {
        // A CSR or a cross-signed certificate: no custody version holds
        // the certificate; the ceremony keeps it (journaled at `certify`, in the transcript).
        return keep_with_ceremony(state, record).await;
    }
    store_chain(state, record).await
}

/// The commit of a CSR's certificate: nothing to store with a key, the
/// certificate journaled at `certify` is the ceremony's result.
async fn keep_with_ceremony(state: &Custody, record: &mut CeremonyRecord) -> Result<(), Error> {
    let _registry = open_commit(state, record).await?;
    close_commit(state, record).await
}

/// Which version of the issuer may sign the confirmed TBS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IssuerVersion {
    /// Still the issuer's current version: a CRL is signed by the key the
    /// issuer publishes now.
    Current,
    /// Any active version with the label the TBS was built under: a
    /// certificate names the key, not the issuer's current version.
    ActiveWithLabel,
}

/// A signing step: its name and crash points, the kind's check of the
/// ceremony's quorum against the policies in force, which issuer version
/// may sign, and what the signature makes.
pub(super) struct Signing {
    pub(super) step: &'static str,
    pub(super) points: &'static Points,
    pub(super) check_open: fn(&Custody, &Script) -> Result<(), Error>,
    pub(super) issuer: IssuerVersion,
    pub(super) product: intermediate::Product,
    /// What the issuer's version is used for (a certificate protects, a
    /// CRL revokes).
    pub(super) usage: Use,
    /// What the transcript calls it ("certificate", "CRL").
    pub(super) noun: &'static str,
    /// The transcript detail's `<output>_sha256` field.
    pub(super) output: &'static str,
}

/// The step `signing.step`, unless done: the ceremony's quorum checked
/// again under the policies in force now, the issuer's version checked,
/// then the HSM signs the confirmed TBS and the signature is verified with
/// the issuer's public key; the result is journaled with the ceremony.
pub(super) async fn sign_confirmed(
    state: &Custody,
    record: &mut CeremonyRecord,
    script: &Script,
    signing: &Signing,
) -> Result<(), Error> {
    let certification = record
        .certification
        .clone()
        .ok_or_else(|| Error::internal("no TBS to sign"))?;
    if record.did(signing.step) {
        return Ok(());
    }
    (signing.check_open)(state, script)?;
    let points = signing.points;
    intend(state, record, signing.step, &[], points).await?;
    let (prepared, confirmed) = prepared_of(&certification)?;
    let algorithm = KeyAlgorithm::from_api_name(&certification.issuer_algorithm)
        .ok_or_else(|| Error::internal(certification.issuer_algorithm.clone()))?;
    // The issuer's version must still be the one the TBS was built under.
    let issuer = crate::keys::found(state, &certification.issuer_key_id)?;
    let version = crate::keys::version_of(&issuer, certification.issuer_version)?;
    let still = version.state == VersionState::Active
        && version.hsm_label == certification.issuer_label
        && (signing.issuer == IssuerVersion::ActiveWithLabel
            || issuer.primary_version == certification.issuer_version);
    if !still {
        return Err(Error::new(
            Reason::VersionNotActive,
            format!(
                "{} version {} is no longer the active key that built the TBS",
                certification.issuer_key_id, certification.issuer_version
            ),
        ));
    }
    check_usable(&issuer, version, signing.usage, state.clock.now_ms())?;
    let label = hsm_shim::KeyLabel::new(certification.issuer_label.clone())?;
    let spki = hex::decode(&certification.issuer_public_key_der_hex).unwrap_or_default();
    let product = signing.product;
    let pem = state
        .hsm
        .run(move |session| {
            intermediate::sign_prepared(
                session, &label, algorithm, &spki, &prepared, &confirmed, product,
            )
        })
        .await??;
    failpoint::hit(points.after_hsm);
    if let Some(c) = record.certification.as_mut() {
        c.certificate_pem = pem.clone();
    }
    record.done.push(signing.step.into());
    let mut detail = Map::new();
    detail.insert("tbs_sha256".into(), json!(certification.tbs_sha256));
    if let Some(number) = certification.crl_number {
        detail.insert("crl_number".into(), json!(number));
    }
    detail.insert(
        format!("{}_sha256", signing.output),
        json!(hex::encode(Sha256::digest(pem.as_bytes()))),
    );
    note(
        state,
        record,
        signing.step,
        "custodyd",
        format!(
            "{} signed the confirmed {} (TBS SHA-256 {}) inside the HSM; the signature verifies with its public key",
            certification.issuer_key_id, signing.noun, certification.tbs_sha256
        ),
        detail,
    )
    .await?;
    failpoint::hit(points.after_result);
    Ok(())
}

/// The chain [intermediate, root] stored with the certified version, if it
/// still holds the public key the certificate names.
async fn store_chain(state: &Custody, record: &mut CeremonyRecord) -> Result<(), Error> {
    let certification = record
        .certification
        .clone()
        .ok_or_else(|| Error::internal("no certificate to store"))?;
    let _registry = open_commit(state, record).await?;
    let mut key = (*crate::keys::found(state, &certification.key_id)?).clone();
    let version = key
        .versions
        .iter_mut()
        .find(|v| v.version == certification.key_version)
        .filter(|v| v.public_key_der_hex == certification.public_key_der_hex)
        .ok_or_else(|| {
            Error::new(
                Reason::VersionNotActive,
                format!(
                    "{} version {} is gone or changed while the ceremony ran",
                    certification.key_id, certification.key_version
                ),
            )
        })?;
    let mut chain = vec![certification.certificate_pem.clone()];
    chain.extend(certification.issuer_chain_pem.iter().cloned());
    version.certificate_chain_pem = chain;
    state
        .registry
        .put(key)
        .await
        .map_err(|e| journal_failure(e.to_string()))?;
    close_commit(state, record).await
}

/// Whether the commit reached the registry: the certified version holds
/// the certificate this ceremony made.
pub(super) fn committed(state: &Custody, certification: &Certification) -> bool {
    if certification.key_id.is_empty() {
        // A CSR's certificate: made, verified and journaled is all.
        return !certification.certificate_pem.is_empty();
    }
    !certification.certificate_pem.is_empty()
        && state
            .registry
            .get(&certification.key_id)
            .and_then(|key| key.version(certification.key_version).cloned())
            .is_some_and(|v| {
                v.certificate_chain_pem.first() == Some(&certification.certificate_pem)
            })
}
