//! The end of a ceremony that fails or is aborted: every object it
//! journaled destroyed, on the main token and the scratch token.

use hsm_shim::{ErrorKind, Hsm, HsmSession, KeyLabel};
use serde_json::{Map, json};

use super::{put, seal_transcript};
use crate::Custody;
use crate::Error;
use crate::ceremony::journal::{CeremonyRecord, Phase, TokenRole};

/// Undoes a ceremony: destroys every object it journaled (an object already
/// gone counts as destroyed), wipes its secrets, and records why.
///
/// Nothing is destroyed unless `record` is still the journal's: the reason
/// is journaled first, over the revision `record` was read at. A replica
/// whose copy is out of date (it stalled past its lease while another took
/// the ceremony over, perhaps to its commit) so destroys nothing, and the
/// ceremony is left to whoever holds it now; if the write cannot be made,
/// the record stays unfinished for recovery.
pub(super) async fn roll_back(
    state: &Custody,
    record: &mut CeremonyRecord,
    phase: Phase,
    why: &str,
) -> Result<(), Error> {
    // What a ceremony's commit registered is served: no roll-back (an
    // abort by one officer, a failed confirmation, a failed last step)
    // destroys it; the ceremony is completed instead (threat model I2).
    if super::recovery::committed(state, record) {
        return Err(Error::new(
            crate::Reason::Finished,
            format!(
                "ceremony {} reached its commit: what it registered stands, and it is completed, not rolled back",
                record.id
            ),
        ));
    }
    record.error = why.to_string();
    put(state, record).await?;
    state.ceremonies.forget(&record.id);
    let destroyed = destroy_objects(state, record).await?;
    // A key-destruction ceremony's reserved versions go back to the
    // scheduler (their approved destruction stands unless cancelled).
    super::destruction::release(state, record).await?;
    record.phase = phase;
    record.error = why.to_string();
    let mut detail = Map::new();
    detail.insert("destroyed".into(), json!(destroyed));
    detail.insert("reason".into(), json!(why));
    let (step, outcome) = match phase {
        Phase::Aborted => ("aborted", "aborted"),
        _ => ("rolled-back", "rolled-back"),
    };
    seal_transcript(
        state,
        record,
        step,
        outcome,
        format!(
            "ceremony {outcome}: {why}; {} HSM objects destroyed",
            destroyed.len()
        ),
        detail,
    )
    .await?;
    put(state, record).await?;
    crate::metrics::ceremony_finished(&record.kind, outcome);
    Ok(())
}

async fn destroy_objects(state: &Custody, record: &CeremonyRecord) -> Result<Vec<String>, Error> {
    let main: Vec<KeyLabel> = labels_in(record, TokenRole::Main)?;
    let scratch: Vec<KeyLabel> = labels_in(record, TokenRole::Scratch)?;
    let mut destroyed = Vec::new();
    if !main.is_empty() {
        let gone = state
            .hsm
            .run(move |session| {
                let mut gone = Vec::new();
                for label in main {
                    if destroy_if_there(session, &label)? {
                        gone.push(label.as_str().to_string());
                    }
                }
                Ok(gone)
            })
            .await?;
        destroyed.extend(gone);
    }
    if !scratch.is_empty() {
        if let Some(config) = state.ceremonies.scratch.clone() {
            let count = scratch.len();
            let cleaned = tokio::task::spawn_blocking(move || {
                let scratch_hsm = Hsm::open(config)?;
                let mut session = scratch_hsm.session()?;
                let mut gone = Vec::new();
                for label in scratch {
                    if destroy_if_there(&mut session, &label)? {
                        gone.push(format!("scratch:{}", label.as_str()));
                    }
                }
                // A kill inside an unwrap can leave a nameless object; the
                // scratch token holds nothing else of value.
                for _ in 0..session.destroy_unnamed()? {
                    gone.push("scratch:(torn object without label)".into());
                }
                Ok::<_, hsm_shim::HsmError>(gone)
            })
            .await
            .map_err(|_| Error::internal("scratch clean-up panicked"))?;
            match cleaned {
                Ok(gone) => destroyed.extend(gone),
                // The scratch token holds drill copies only: custodyd goes on
                // without it, and says so in the transcript.
                Err(error) => {
                    tracing::error!(%error, count, "could not clean the scratch token");
                    destroyed.push(format!(
                        "scratch token unavailable ({error}): {count} journaled objects not destroyed there"
                    ));
                }
            }
        }
    }
    Ok(destroyed)
}

/// Destroys what is labelled `label`; an object already gone is fine (a
/// roll-back may run twice, or after a call that never made it).
pub(super) fn destroy_if_there(
    session: &mut HsmSession,
    label: &KeyLabel,
) -> hsm_shim::Result<bool> {
    match session.destroy(label) {
        Ok(count) => Ok(count > 0),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn labels_in(record: &CeremonyRecord, token: TokenRole) -> Result<Vec<KeyLabel>, Error> {
    record
        .objects
        .iter()
        .filter(|o| o.token == token)
        .map(|o| KeyLabel::new(o.label.clone()).map_err(Error::from))
        .collect()
}
