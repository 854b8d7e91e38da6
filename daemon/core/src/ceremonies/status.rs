//! What a ceremony waits for, and from whom, in words: the status line
//! officers read (`GetCeremony.waiting_for`).

use crate::ceremony::journal::{CeremonyRecord, Phase};
use crate::ceremony::script::Script;

/// Who or what ceremony `record` (of `script`) waits for now; empty once
/// it is finished.
pub fn waiting_for(record: &CeremonyRecord, script: &Script) -> String {
    let missing = |done: &[String], all: &[String]| {
        all.iter()
            .filter(|o| !done.contains(o))
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    };
    match record.phase {
        Phase::AwaitingOfficers => {
            let present: Vec<String> = record.present.iter().map(|s| s.officer.clone()).collect();
            format!(
                "{} more of: {}",
                (script.quorum().required as usize).saturating_sub(present.len()),
                missing(&present, script.officers())
            )
        }
        Phase::AwaitingShareCollection => format!(
            "shares to be collected by: {}",
            missing(&record.shares_collected, script.custodians())
        ),
        Phase::AwaitingComponents => {
            let entered: Vec<String> = record
                .components
                .iter()
                .map(|c| c.custodian.clone())
                .collect();
            format!(
                "components from: {}",
                missing(&entered, script.custodians())
            )
        }
        Phase::AwaitingShares => format!(
            "{} more shares from: {}",
            (record.shares_needed as usize).saturating_sub(record.shares_submitted.len()),
            missing(&record.shares_submitted, script.custodians())
        ),
        Phase::AwaitingConfirmation => {
            let present: Vec<String> = record.present.iter().map(|s| s.officer.clone()).collect();
            let confirmed: Vec<String> =
                record.confirmed.iter().map(|s| s.officer.clone()).collect();
            format!(
                "fingerprint confirmations from: {}",
                missing(&confirmed, &present)
            )
        }
        Phase::Running => "HSM steps in progress".into(),
        Phase::Completed | Phase::RolledBack | Phase::Aborted => String::new(),
    }
}
