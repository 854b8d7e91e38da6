//! Officers' signatures in a ceremony: signing in over the script's digest,
//! and confirming the fingerprint of what the ceremony made.

use serde_json::{Map, json};
use sha2::{Digest, Sha256};

use super::commit::commit;
use super::roll_back::roll_back;
use super::{advance, load_in, note};
use crate::Custody;
use crate::ceremony::journal::{CeremonyRecord, Phase, Signed};
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
    let _one_at_a_time = state.ceremonies.lock.lock().await;
    let (mut record, script) = load_in(
        state,
        id,
        Phase::AwaitingOfficers,
        Reason::NotSigningIn,
        "is past its sign-in",
    )?;
    if !script.quorum().officers.iter().any(|o| o == officer) {
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
    check_signature(
        state,
        officer,
        &presence_message(&script.digest()),
        signature,
    )?;
    record.present.push(Signed {
        officer: officer.into(),
        signature: hex::encode(signature),
        time_ms: state.clock.now_ms(),
    });
    let mut detail = Map::new();
    detail.insert("signature".into(), json!(hex::encode(signature)));
    let required = usize::from(script.quorum().required);
    let summary = format!(
        "{officer} signed in ({} of {required} present)",
        record.present.len()
    );
    note(state, &mut record, "sign-in", officer, summary, detail).await?;
    failpoint::hit("ceremony.sign_in.after_journal");
    if record.present.len() >= required {
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
    let _one_at_a_time = state.ceremonies.lock.lock().await;
    let (mut record, script) = load_in(
        state,
        id,
        Phase::AwaitingConfirmation,
        Reason::NotConfirming,
        "is not waiting for confirmations",
    )?;
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
    let fingerprint = record
        .key
        .as_ref()
        .map(|k| hex::decode(&k.fingerprint).unwrap_or_default())
        .unwrap_or_default();
    check_signature(
        state,
        officer,
        &confirmation_message(&script.digest(), &fingerprint),
        signature,
    )?;
    record.confirmed.push(Signed {
        officer: officer.into(),
        signature: hex::encode(signature),
        time_ms: state.clock.now_ms(),
    });
    let mut detail = Map::new();
    detail.insert("signature".into(), json!(hex::encode(signature)));
    let summary = format!(
        "{officer} confirmed the fingerprint ({} of {})",
        record.confirmed.len(),
        record.present.len()
    );
    note(state, &mut record, "confirm", officer, summary, detail).await?;
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
