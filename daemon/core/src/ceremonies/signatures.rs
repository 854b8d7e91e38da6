//! Officers' signatures in a ceremony: signing in over the script's digest,
//! and confirming the fingerprint of what the ceremony made.

use serde_json::{Map, json};
use sha2::{Digest, Sha256};

use super::commit::commit;
use super::crash_points::QUORUM_MET;
use super::roll_back::roll_back;
use super::{advance, load_in, note, one_at_a_time};
use crate::Custody;
use crate::ceremony::journal::{CeremonyRecord, Phase, Signed};
use crate::ceremony::script::Script;
use crate::dual_control::officer_key;
use crate::failpoint;
use crate::{Error, Reason};

/// What an officer signs to say they are present.
pub fn presence_message(script_digest: &[u8; 32]) -> Vec<u8> {
    [b"custody-ceremony-present/v1\n".as_slice(), script_digest].concat()
}

/// What an officer signs to confirm the fingerprint they read aloud.
pub fn confirmation_message(script_digest: &[u8; 32], fingerprint: &[u8]) -> Vec<u8> {
    let mut hash = Sha256::new();
    hash.update(script_digest);
    hash.update(fingerprint);
    [
        b"custody-ceremony-confirm/v1\n".as_slice(),
        hash.finalize().as_slice(),
    ]
    .concat()
}

/// An officer of the quorum signs in. The sign-in that completes the
/// quorum starts the HSM steps.
pub async fn sign_in(
    state: &Custody,
    id: &str,
    officer: &str,
    signature: &[u8],
) -> Result<CeremonyRecord, Error> {
    let _one_at_a_time = one_at_a_time(state).await?;
    let (mut record, script) =
        collect_signature(state, Moment::SignIn, id, officer, signature).await?;
    failpoint::hit("ceremony.sign_in.after_journal");
    if script.quorum().is_met_by(record.present.len()) {
        failpoint::hit(QUORUM_MET);
        advance(state, &mut record, &script).await?;
    }
    Ok(record)
}

/// An officer who signed in confirms the fingerprint; the last one commits.
pub async fn confirm(
    state: &Custody,
    id: &str,
    officer: &str,
    signature: &[u8],
) -> Result<CeremonyRecord, Error> {
    let _one_at_a_time = one_at_a_time(state).await?;
    let (mut record, script) =
        collect_signature(state, Moment::Confirm, id, officer, signature).await?;
    if record.confirmed.len() == record.present.len() {
        if let Err(error) = commit(state, &mut record, &script).await {
            if error.reason.is_unavailable() {
                return Err(error);
            }
            return roll_back(state, &mut record, Phase::RolledBack, &error.message)
                .await
                .map(|()| record);
        }
    }
    Ok(record)
}

/// The two moments an officer signs in a ceremony.
#[derive(Clone, Copy)]
enum Moment {
    /// Signing in over the script's digest, before the HSM acts.
    SignIn,
    /// Confirming the fingerprint of what the ceremony made, before the
    /// commit.
    Confirm,
}

/// Collects `officer`'s signature for `moment`: the ceremony must be in the
/// moment's phase, the officer one who may sign then and has not yet, and
/// the signature must verify with their officer key. It counts only once it
/// is in the transcript, the audit log and the journal. What it sets off is
/// the caller's, under the same hold of the engine's lock, so that no other
/// call sees the signature without its consequence.
async fn collect_signature(
    state: &Custody,
    moment: Moment,
    id: &str,
    officer: &str,
    signature: &[u8],
) -> Result<(CeremonyRecord, Script), Error> {
    let (phase, not_now, otherwise) = moment.phase();
    let (mut record, script) = load_in(state, id, phase, not_now, otherwise)?;
    moment.may_sign(&record, &script, officer)?;
    check_signature(state, officer, &moment.message(&record, &script), signature)?;
    let signed = Signed {
        officer: officer.into(),
        signature: hex::encode(signature),
        time_ms: state.clock.now_ms(),
    };
    let (step, summary) = moment.keep(&mut record, &script, signed);
    let mut detail = Map::new();
    detail.insert("signature".into(), json!(hex::encode(signature)));
    note(state, &mut record, step, officer, summary, detail).await?;
    Ok((record, script))
}

impl Moment {
    /// The phase the moment belongs to, and the refusal at any other time.
    fn phase(self) -> (Phase, Reason, &'static str) {
        match self {
            Moment::SignIn => (
                Phase::AwaitingOfficers,
                Reason::NotSigningIn,
                "is past its sign-in",
            ),
            Moment::Confirm => (
                Phase::AwaitingConfirmation,
                Reason::NotConfirming,
                "is not waiting for confirmations",
            ),
        }
    }

    /// Refuses an officer outside the script's quorum (signing in) or who
    /// did not sign in (confirming), then one who has signed already.
    fn may_sign(
        self,
        record: &CeremonyRecord,
        script: &Script,
        officer: &str,
    ) -> Result<(), Error> {
        match self {
            Moment::SignIn => {
                if !script.quorum().contains(officer) {
                    return Err(Error::new(
                        Reason::NotInQuorum,
                        format!("{officer} is not one of the officers the script names"),
                    ));
                }
                if record.present.iter().any(|s| s.officer == officer) {
                    return Err(Error::new(
                        Reason::AlreadyPresent,
                        format!("{officer} has signed in already"),
                    ));
                }
            }
            Moment::Confirm => {
                if !record.present.iter().any(|s| s.officer == officer) {
                    return Err(Error::new(
                        Reason::NotPresent,
                        format!("{officer} did not sign in to this ceremony"),
                    ));
                }
                if record.confirmed.iter().any(|s| s.officer == officer) {
                    return Err(Error::new(
                        Reason::AlreadyConfirmed,
                        format!("{officer} has confirmed already"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// What the officer signs over.
    fn message(self, record: &CeremonyRecord, script: &Script) -> Vec<u8> {
        match self {
            Moment::SignIn => presence_message(&script.digest()),
            Moment::Confirm => {
                // A new key's fingerprint; an intermediate's TBS SHA-256.
                let fingerprint = match (&record.key, &record.certification) {
                    (Some(k), _) => hex::decode(&k.fingerprint).unwrap_or_default(),
                    (None, Some(c)) => hex::decode(&c.tbs_sha256).unwrap_or_default(),
                    // A key-destruction ceremony's manifest.
                    (None, None) => record
                        .destruction
                        .as_ref()
                        .and_then(|d| hex::decode(&d.manifest_sha256).ok())
                        .unwrap_or_default(),
                };
                confirmation_message(&script.digest(), &fingerprint)
            }
        }
    }

    /// Keeps the signature in the record, and names the transcript step and
    /// its summary.
    fn keep(
        self,
        record: &mut CeremonyRecord,
        script: &Script,
        signed: Signed,
    ) -> (&'static str, String) {
        let officer = signed.officer.clone();
        match self {
            Moment::SignIn => {
                record.present.push(signed);
                let required = script.quorum().required;
                let summary = format!(
                    "{officer} signed in ({} of {required} present)",
                    record.present.len()
                );
                ("sign-in", summary)
            }
            Moment::Confirm => {
                record.confirmed.push(signed);
                let summary = format!(
                    "{officer} confirmed the fingerprint ({} of {})",
                    record.confirmed.len(),
                    record.present.len()
                );
                ("confirm", summary)
            }
        }
    }
}

fn check_signature(
    state: &Custody,
    officer: &str,
    message: &[u8],
    signature: &[u8],
) -> Result<(), Error> {
    let enrolled = state.dual_control.officer(officer).ok_or_else(|| {
        Error::new(
            Reason::OfficerNotEnrolled,
            format!("{officer} is not enrolled"),
        )
    })?;
    let public_key = hex::decode(&enrolled.public_key).unwrap_or_default();
    if officer_key::verify(&public_key, message, signature) {
        Ok(())
    } else {
        Err(Error::new(
            Reason::BadSignature,
            format!("the signature does not verify with {officer}'s officer key"),
        ))
    }
}
