//! What custodians take away and hand in: their share of a new backup KEK,
//! their component of a KEK, their share of the backup KEK for a restore.

use serde_json::{Map, json};
use zeroize::Zeroizing;

use super::{advance, found, load_in, note, script_of};
use crate::Custody;
use crate::ceremony::bundle::Bundle;
use crate::ceremony::components::{self, KeyBytes};
use crate::ceremony::journal::{CeremonyRecord, ComponentRecord, Phase};
use crate::ceremony::shares::Share;
use crate::{Error, Reason};

/// A custodian collects their own share, once.
pub async fn collect_share(
    state: &Custody,
    id: &str,
    officer: &str,
) -> Result<(Share, String, CeremonyRecord), Error> {
    let _one_at_a_time = state.ceremonies.lock.lock().await;
    let (mut record, script) = load_in(
        state,
        id,
        Phase::AwaitingShareCollection,
        Reason::NotDistributing,
        "is not handing out shares now",
    )?;
    let share = state
        .ceremonies
        .secrets(id, |secrets| secrets.to_collect.remove(officer));
    let Some(share) = share else {
        return Err(Error::new(
            Reason::NoShare,
            if record.shares_collected.iter().any(|c| c == officer) {
                format!("{officer} has collected their share already")
            } else {
                format!("{officer} is not a custodian of this ceremony")
            },
        ));
    };
    record.shares_collected.push(officer.into());
    let kcv = record
        .backup_kek
        .as_ref()
        .map(|k| k.kcv.clone())
        .unwrap_or_default();
    let mut detail = Map::new();
    detail.insert("share_index".into(), json!(share.index()));
    let custodians = script.custodians().len();
    let summary = format!(
        "{officer} collected share {} ({} of {custodians} collected)",
        share.index(),
        record.shares_collected.len()
    );
    note(
        state,
        &mut record,
        "distribute-shares",
        officer,
        summary,
        detail,
    )
    .await?;
    if record.shares_collected.len() == custodians {
        state.ceremonies.forget(id);
        record.done.push("distribute-shares".into());
        advance(state, &mut record, &script).await?;
    }
    Ok((share, kcv, record))
}

/// A custodian submits a component (components mode) or a share (restore).
pub async fn submit_secret(
    state: &Custody,
    id: &str,
    officer: &str,
    secret: SubmittedSecret,
) -> Result<CeremonyRecord, Error> {
    let _one_at_a_time = state.ceremonies.lock.lock().await;
    let mut record = found(state, id)?;
    let script = script_of(&record)?;
    if !script.custodians().iter().any(|c| c == officer) {
        return Err(Error::new(
            Reason::NotACustodian,
            format!("{officer} is not a custodian of ceremony {id}"),
        ));
    }
    match (record.phase, secret) {
        (
            Phase::AwaitingComponents,
            SubmittedSecret::Component {
                value,
                expected_kcv,
            },
        ) => {
            if record.components.iter().any(|c| c.custodian == officer) {
                return Err(Error::new(
                    Reason::AlreadySubmitted,
                    format!("{officer} has entered their component already"),
                ));
            }
            let kcv = hex::encode(components::kcv(&value));
            if !expected_kcv.eq_ignore_ascii_case(&kcv) {
                return Err(Error::new(
                    Reason::KcvMismatch,
                    format!(
                        "the component's check value is {kcv}, not {expected_kcv} as on the sheet: re-enter it"
                    ),
                ));
            }
            state.ceremonies.secrets(id, |secrets| {
                secrets.components.insert(officer.into(), value);
            });
            record.components.push(ComponentRecord {
                custodian: officer.into(),
                kcv: kcv.clone(),
            });
            let mut detail = Map::new();
            detail.insert("kcv".into(), json!(kcv));
            let summary = format!(
                "{officer} entered a component with check value {kcv} ({} of {})",
                record.components.len(),
                script.custodians().len()
            );
            note(state, &mut record, "components", officer, summary, detail).await?;
        }
        (Phase::AwaitingShares, SubmittedSecret::Share(text)) => {
            if record.shares_submitted.iter().any(|c| c == officer) {
                return Err(Error::new(
                    Reason::AlreadySubmitted,
                    format!("{officer} has submitted a share already"),
                ));
            }
            let share =
                Share::parse(&text).map_err(|e| Error::new(Reason::BadShare, e.to_string()))?;
            let bundle = Bundle::parse(&record.bundle)
                .map_err(|e| Error::new(Reason::BadBundle, e.to_string()))?;
            let want = &bundle.manifest.backup_kek;
            if share.set_id() != want.set_id || share.threshold() != want.threshold {
                return Err(Error::new(
                    Reason::WrongShareSet,
                    format!(
                        "this share belongs to set {} ({} of n), the bundle to set {} ({} of {})",
                        share.set_id(),
                        share.threshold(),
                        want.set_id,
                        want.threshold,
                        want.shares
                    ),
                ));
            }
            let duplicate = state.ceremonies.secrets(id, |secrets| {
                secrets.submitted.iter().any(|s| s.index() == share.index())
            });
            if duplicate {
                return Err(Error::new(
                    Reason::DuplicateShare,
                    format!("share {} has been submitted already", share.index()),
                ));
            }
            let index = share.index();
            state
                .ceremonies
                .secrets(id, |secrets| secrets.submitted.push(share));
            record.shares_submitted.push(officer.into());
            let mut detail = Map::new();
            detail.insert("share_index".into(), json!(index));
            let summary = format!(
                "{officer} submitted share {index} ({} of {} needed)",
                record.shares_submitted.len(),
                record.shares_needed
            );
            note(
                state,
                &mut record,
                "submit-shares",
                officer,
                summary,
                detail,
            )
            .await?;
        }
        (phase, _) => {
            return Err(Error::new(
                Reason::NotAccepting,
                format!("ceremony {id} does not take that now (it is {phase:?})"),
            ));
        }
    }
    advance(state, &mut record, &script).await?;
    Ok(record)
}

/// What a custodian submits.
pub enum SubmittedSecret {
    /// A key component and the KCV on the custodian's sheet.
    Component {
        /// The component.
        value: KeyBytes,
        /// The KCV the sheet shows.
        expected_kcv: String,
    },
    /// A backup share line.
    Share(Zeroizing<String>),
}
