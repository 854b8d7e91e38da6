//! A crl ceremony: a custody root key signs a CRL. Its TBS is built and
//! linted once the quorum signs in (step `tbs`, journaled with the CRL
//! number it takes: the officers confirm its SHA-256); only after every
//! officer who signed in confirmed does the HSM sign those bytes (step
//! `sign-crl`), the signature verified with the root's public key; the
//! signed CRL is kept with the ceremony, and the ceremony completes.
//!
//! The CRL number is the issuer's next: one more than the largest any crl
//! ceremony of that issuer journaled, completed or not, or custody's time
//! in thousandths of a millisecond if that is larger ([`next_number`]). It
//! is journaled with the TBS before the HSM is asked to sign, so no CRL the
//! HSM signed shares a number with another, and none is lower than one
//! before it, whatever crash or re-run comes in between; the clock's share
//! keeps that so when the journal is put back from an older copy.

use serde_json::{Map, json};

use super::certify::{IssuerVersion, Signing, current, sign_confirmed};
use super::commit::finish_completed;
use super::crash_points::{CRL_TBS, SIGN_CRL};
use super::{intend, journal_failure, note};
use crate::Custody;
use crate::algorithms::KeyAlgorithm;
use crate::ceremony::crl::{self, Issue};
use crate::ceremony::intermediate;
use crate::ceremony::journal::{CeremonyRecord, Certification};
use crate::ceremony::script::{CrlSection, Kind, Script};
use crate::failpoint;
use crate::lifecycle::Use;
use crate::{Error, Reason};

fn section(script: &Script) -> Result<&CrlSection, Error> {
    match script.kind() {
        Kind::Crl(section) => Ok(section),
        _ => Err(Error::internal("not a crl ceremony")),
    }
}

/// What a crl ceremony needs when it opens: the issuer's current version
/// active, with its root certificate, of an algorithm certificates can be
/// signed with; and the ceremony's quorum at least the issuer's SIGN
/// policy (the rule an intermediate ceremony follows,
/// [`crate::authz::ceremony_quorum_covers`]).
pub(super) fn check_open(state: &Custody, script: &Script) -> Result<(), Error> {
    let issuer_id = &section(script)?.issuer;
    let (issuer, version) = current(state, issuer_id, Use::Revoke)?;
    if version.certificate_chain_pem.is_empty() {
        return Err(Error::new(
            Reason::NoIssuerCertificate,
            format!(
                "{issuer_id} version {} has no root certificate stored with it: only a root key made by a root-key ceremony with a [certificate] signs a CRL",
                version.version
            ),
        ));
    }
    let algorithm = KeyAlgorithm::from_api_name(&issuer.algorithm)
        .ok_or_else(|| Error::internal(issuer.algorithm.clone()))?;
    crate::ceremony::certificate::rcgen_for(algorithm)?;
    crate::authz::ceremony_quorum_covers(&issuer, "SIGN", script.quorum(), script.officers())
}

/// CRL numbers per millisecond of custody's time: the clock's share of a
/// number is its Unix milliseconds times this, so that numbers stay at or
/// below the clock's unless this many are taken within one millisecond.
const NUMBERS_PER_MS: u64 = 1000;

/// The issuer's next CRL number: one more than the largest any crl
/// ceremony of `issuer_id` journaled, or custody's time (guarded: never
/// backwards, [`crate::clock::GuardedClock`]) in thousandths of a
/// millisecond, whichever is larger (C11, C26). A journal put back from
/// an older copy forgets the numbers taken since; the clock does not, so
/// a number taken at least a millisecond after them is still above them
/// all. About 2^51 today: 7 octets, well inside RFC 5280's 20.
pub(super) fn next_number(state: &Custody, issuer_id: &str) -> Result<u64, Error> {
    let last = state
        .ceremonies
        .journal
        .list()
        .map_err(journal_failure)?
        .iter()
        .filter_map(|record| record.certification.as_ref())
        .filter(|c| c.issuer_key_id == issuer_id)
        .filter_map(|c| c.crl_number)
        .max()
        .unwrap_or(0);
    let after_journal = last
        .checked_add(1)
        .ok_or_else(|| Error::internal("the CRL number space is exhausted"))?;
    let by_clock = u64::try_from(state.clock.now_ms())
        .unwrap_or(0)
        .saturating_mul(NUMBERS_PER_MS);
    Ok(after_journal.max(by_clock))
}

/// Step `tbs`: the CRL number taken, the TBS built and linted, and
/// journaled with its number, summary and SHA-256 for the officers to
/// confirm.
pub(super) async fn prepare_tbs(
    state: &Custody,
    record: &mut CeremonyRecord,
    script: &Script,
) -> Result<(), Error> {
    let section = section(script)?;
    let issuer_id = &section.issuer;
    intend(state, record, "tbs", &[], &CRL_TBS).await?;
    check_open(state, script)?;
    let (issuer, issuer_version) = current(state, issuer_id, Use::Revoke)?;
    let algorithm = KeyAlgorithm::from_api_name(&issuer.algorithm)
        .ok_or_else(|| Error::internal(issuer.algorithm.clone()))?;
    let root_pem = issuer_version
        .certificate_chain_pem
        .last()
        .cloned()
        .unwrap_or_default();
    let issuer_certificate = intermediate::issuer_certificate(&root_pem)?;
    // thisUpdate is read from the wall clock, as the root certificate's
    // notBefore was (`certificate::root_params`): the lint holds one
    // against the other.
    let issue = Issue {
        this_update: time::OffsetDateTime::now_utc().unix_timestamp(),
        number: next_number(state, issuer_id)?,
    };
    let issuer_spki = hex::decode(&issuer_version.public_key_der_hex).unwrap_or_default();
    let prepared = crl::prepare(&issuer_certificate, algorithm, &issuer_spki, section, issue)?;
    failpoint::hit(CRL_TBS.after_hsm);
    let summary = crl::summary(&prepared.tbs);
    let tbs_sha256 = hex::encode(prepared.tbs_sha256);
    record.certification = Some(Certification {
        issuer_key_id: issuer_id.clone(),
        issuer_version: issuer_version.version,
        issuer_label: issuer_version.hsm_label.clone(),
        issuer_algorithm: issuer.algorithm.clone(),
        issuer_public_key_der_hex: issuer_version.public_key_der_hex.clone(),
        issuer_chain_pem: issuer_version.certificate_chain_pem.clone(),
        key_id: issuer_id.clone(),
        key_version: issuer_version.version,
        tbs_der_hex: hex::encode(&prepared.tbs),
        signature_algorithm_der_hex: hex::encode(&prepared.signature_algorithm),
        tbs_sha256: tbs_sha256.clone(),
        summary: summary.clone(),
        crl_number: Some(issue.number),
        ..Certification::default()
    });
    record.done.push("tbs".into());
    let mut detail = Map::new();
    detail.insert("tbs_sha256".into(), json!(tbs_sha256));
    detail.insert("crl_number".into(), json!(issue.number));
    detail.insert(
        "lint".into(),
        json!(format!("passed: {}", crl::lint::RULES.join(", "))),
    );
    detail.insert("summary".into(), json!(summary));
    detail.insert(
        "issuer".into(),
        json!(format!("{issuer_id} v{}", issuer_version.version)),
    );
    note(
        state,
        record,
        "tbs",
        "custodyd",
        format!(
            "the CRL number {} {issuer_id} would sign (TBS SHA-256 {tbs_sha256}) built and linted: nothing signed yet",
            issue.number
        ),
        detail,
    )
    .await?;
    failpoint::hit(CRL_TBS.after_result);
    Ok(())
}

/// Steps `sign-crl` and `commit`, once every officer who signed in
/// confirmed the TBS's SHA-256.
pub(super) async fn sign_and_complete(
    state: &Custody,
    record: &mut CeremonyRecord,
    script: &Script,
) -> Result<(), Error> {
    // The root's SIGN policy in force now: officers may have tightened it
    // while the ceremony waited for confirmations (C10).
    sign_confirmed(
        state,
        record,
        script,
        &Signing {
            step: "sign-crl",
            points: &SIGN_CRL,
            check_open,
            issuer: IssuerVersion::Current,
            product: crl::CRL,
            usage: Use::Revoke,
            noun: "CRL",
            output: "crl",
        },
    )
    .await?;
    finish_completed(state, record).await
}

/// Whether the CRL was signed, verified and journaled: then a stop before
/// the ceremony was marked completed completes it (there is nothing in the
/// HSM or the registry to undo, and the CRL exists).
pub(super) fn signed(record: &CeremonyRecord) -> bool {
    record.did("sign-crl")
        && record
            .certification
            .as_ref()
            .is_some_and(|c| !c.certificate_pem.is_empty())
}
