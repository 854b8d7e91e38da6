//! What custodians take away and hand in: their share of a new backup KEK,
//! their component of a KEK, their share of the backup KEK for a restore.

use serde_json::{Map, json};
use zeroize::Zeroizing;

use super::{advance, found, load_in, note, one_at_a_time, script_of, secrets_here};
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
    let _one_at_a_time = one_at_a_time(state).await?;
    let (mut record, script) = load_in(
        state,
        id,
        Phase::AwaitingShareCollection,
        Reason::NotDistributing,
        "is not handing out shares now",
    )?;
    secrets_here(state, &mut record).await?;
    // The share stays in memory until the collection is journaled: a
    // failed write must not lose it.
    let share = state
        .ceremonies
        .secrets(id, |secrets| secrets.to_collect.get(officer).cloned());
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
    state.ceremonies.secrets(id, |secrets| {
        secrets.to_collect.remove(officer);
    });
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
    let _one_at_a_time = one_at_a_time(state).await?;
    let mut record = found(state, id)?;
    let script = script_of(&record)?;
    if !script.custodians().iter().any(|c| c == officer) {
        return Err(Error::new(
            Reason::NotACustodian,
            format!("{officer} is not a custodian of ceremony {id}"),
        ));
    }
    secrets_here(state, &mut record).await?;
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
                        "the component's check value is {kcv}, not {} as on the sheet: re-enter it",
                        crate::text::echo(&expected_kcv)
                    ),
                ));
            }
            // The KCV of what has been entered so far, combined in
            // zeroizing memory; only the three public bytes leave it.
            let combined_kcv = state.ceremonies.secrets(id, |secrets| {
                (secrets.components.len() >= 2).then(|| {
                    let mut sum = Zeroizing::new([0u8; 32]);
                    for component in secrets.components.values() {
                        for (s, c) in sum.iter_mut().zip(component.iter()) {
                            *s ^= c;
                        }
                    }
                    hex::encode(components::kcv(&sum))
                })
            });
            if let Some(why) = repeats(&record.components, combined_kcv.as_deref(), &kcv) {
                return Err(Error::new(
                    Reason::DuplicateComponent,
                    format!("{why}: the two would cancel out of the key; enter another component"),
                ));
            }
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
            // Kept only once journaled: after a failed write the custodian
            // enters it again, and nothing stale counts in the meantime.
            state.ceremonies.secrets(id, |secrets| {
                secrets.components.insert(officer.into(), value);
            });
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
            // Kept only once journaled: a share kept after a failed write
            // would refuse its own resubmission as a duplicate.
            state
                .ceremonies
                .secrets(id, |secrets| secrets.submitted.push(share));
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

/// Why a component with check value `kcv` would cancel what the
/// custodians entered before it (`entered`, whose combination so far has
/// the check value `combined_kcv` once there are two or more), or `None`.
///
/// XOR cancels equal values: a component equal to an earlier one removes
/// both from the key, and one equal to the combination of all earlier ones
/// removes them all. Both are told by their KCVs, which are public (on the
/// custodians' sheets and in the journal), so the comparison needs neither
/// the components nor constant time. A component equal to the combination
/// of some but not all earlier ones is not detected, nor is one a custodian
/// derived from another's component they have seen: split knowledge still
/// rests on each custodian keeping their component to themselves. The KCV
/// has 24 bits, so two distinct components share one with a chance of
/// 2^-24 per pair; the refused custodian enters another.
fn repeats(entered: &[ComponentRecord], combined_kcv: Option<&str>, kcv: &str) -> Option<String> {
    if let Some(earlier) = entered.iter().find(|c| c.kcv.eq_ignore_ascii_case(kcv)) {
        return Some(format!(
            "the component's check value {kcv} is that of the component {} entered",
            earlier.custodian
        ));
    }
    combined_kcv
        .filter(|combined| combined.eq_ignore_ascii_case(kcv))
        .map(|_| {
            format!(
                "the component's check value {kcv} is that of the {} components entered so far combined",
                entered.len()
            )
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entered(kcvs: &[(&str, &str)]) -> Vec<ComponentRecord> {
        kcvs.iter()
            .map(|(custodian, kcv)| ComponentRecord {
                custodian: (*custodian).into(),
                kcv: (*kcv).into(),
            })
            .collect()
    }

    #[test]
    fn a_component_with_an_earlier_ones_kcv_is_refused_and_named() {
        let before = entered(&[("alice", "854299"), ("bob", "0a1b2c")]);
        let why = repeats(&before, Some("77e0f1"), "0A1B2C");
        assert!(why.is_some_and(|w| w.contains("bob")));
        assert!(repeats(&before[..1], None, "854299").is_some());
    }

    #[test]
    fn a_component_equal_to_the_combination_so_far_is_refused() {
        let before = entered(&[("alice", "854299"), ("bob", "0a1b2c")]);
        let why = repeats(&before, Some("77e0f1"), "77e0f1");
        assert!(why.is_some_and(|w| w.contains("2 components entered so far combined")));
    }

    #[test]
    fn distinct_components_pass() {
        assert_eq!(repeats(&[], None, "854299"), None);
        let before = entered(&[("alice", "854299"), ("bob", "0a1b2c")]);
        assert_eq!(repeats(&before, Some("77e0f1"), "123456"), None);
    }

    #[test]
    fn equal_components_have_equal_kcvs_and_cancel_to_the_others() {
        // What the rule rests on: XOR of a value with itself is zero, so a
        // repeated component leaves the key equal to the rest, and the
        // repeat shows in the KCV.
        let alice = [0x42u8; 32];
        let carol = [0x17u8; 32];
        let mut key = [0u8; 32];
        for part in [alice, alice, carol] {
            for (k, p) in key.iter_mut().zip(part) {
                *k ^= p;
            }
        }
        assert_eq!(key, carol);
        assert_eq!(components::kcv(&alice), components::kcv(&[0x42u8; 32]));
        assert_ne!(components::kcv(&alice), components::kcv(&carol));
    }
}
