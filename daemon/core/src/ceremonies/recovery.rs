//! What happens at start after a crash: a ceremony whose commit reached the
//! registry is completed, one interrupted mid-step is rolled back, one
//! waiting for people resumes.

use serde_json::Map;

use super::commit::finish_completed;
use super::roll_back::roll_back;
use super::{advance, note, put, script_of, sign_transcript};
use crate::Custody;
use crate::ceremony::journal::{CeremonyRecord, Phase, TokenRole};

/// How the previous process ended, from the last audit record before this
/// start: what the transcripts and the log say interrupted a ceremony.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreviousStop {
    /// On SIGTERM or SIGINT, after its last request finished.
    Clean,
    /// Without a word: a crash, a kill, a power cut.
    CrashOrKill,
}

impl std::fmt::Display for PreviousStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PreviousStop::Clean => "custodyd was stopped",
            PreviousStop::CrashOrKill => "custodyd crashed or was killed",
        })
    }
}

/// At start: rolls forward ceremonies whose commit reached the registry,
/// rolls back those that made (or began to make) objects or held secrets,
/// and lets those still signing in resume. Returns how many it rolled back.
pub async fn recover(state: &Custody, previous_stop: PreviousStop) -> Result<usize, String> {
    let mut rolled_back = 0;
    for mut record in state.ceremonies.journal.list().map_err(|e| e.to_string())? {
        if record.phase.finished() {
            if record.transcript.signature.is_empty() {
                // Killed between the last entry and its signature.
                sign_transcript(state, &mut record)
                    .await
                    .map_err(|e| e.message)?;
                put(state, &mut record).await.map_err(|e| e.message)?;
            }
            continue;
        }
        if committed(state, &record) {
            tracing::warn!(ceremony = %record.id, stop = %previous_stop, "ceremony committed before custodyd stopped: completing it");
            finish_completed(state, &mut record)
                .await
                .map_err(|e| e.message)?;
            continue;
        }
        if record.phase == Phase::AwaitingOfficers {
            let script = script_of(&record).map_err(|e| e.message)?;
            if script.quorum().is_met_by(record.present.len()) {
                // Killed between the quorum-completing sign-in and the HSM
                // steps it sets off: those officers signed in, so the steps
                // run now, as they would have then (a failure rolls back).
                tracing::warn!(ceremony = %record.id, stop = %previous_stop, "the quorum signed in before custodyd stopped: running the ceremony's HSM steps");
                advance(state, &mut record, &script)
                    .await
                    .map_err(|e| e.message)?;
                continue;
            }
        }
        let resumable = record.phase == Phase::AwaitingOfficers
            || (record.objects.is_empty()
                && matches!(
                    record.phase,
                    Phase::AwaitingComponents | Phase::AwaitingShares
                ));
        if resumable {
            if !record.components.is_empty() || !record.shares_submitted.is_empty() {
                // What custodians entered was in memory only.
                record.components.clear();
                record.shares_submitted.clear();
                note(
                    state,
                    &mut record,
                    "resumed",
                    "custodyd",
                    "custodyd restarted: components or shares entered before must be entered again"
                        .into(),
                    Map::new(),
                )
                .await
                .map_err(|e| e.message)?;
            }
            continue;
        }
        tracing::warn!(ceremony = %record.id, phase = ?record.phase, stop = %previous_stop, "rolling back a ceremony interrupted when custodyd stopped");
        roll_back(
            state,
            &mut record,
            Phase::RolledBack,
            &format!("{previous_stop} in the middle of the ceremony"),
        )
        .await
        .map_err(|e| e.message)?;
        rolled_back += 1;
    }
    Ok(rolled_back)
}

/// Whether the ceremony's commit reached the registry: its key is
/// registered under the label the ceremony journaled; a restore: every key
/// id it reserved is registered under labels it journaled (one batch
/// registers them all).
fn committed(state: &Custody, record: &CeremonyRecord) -> bool {
    let registered = |key_id: &str, label: &str| {
        state
            .registry
            .get(key_id)
            .is_some_and(|key| key.versions.iter().any(|v| v.hsm_label == label))
    };
    match &record.key {
        Some(made) => registered(&made.key_id, &made.hsm_label),
        None if record.kind == "restore" && record.did("restore") => {
            let journaled: Vec<&str> = record
                .objects
                .iter()
                .filter(|o| o.token == TokenRole::Main)
                .map(|o| o.label.as_str())
                .collect();
            !record.reserved_key_ids.is_empty()
                && record.reserved_key_ids.iter().all(|key_id| {
                    state.registry.get(key_id).is_some_and(|key| {
                        key.versions
                            .iter()
                            .all(|v| journaled.contains(&v.hsm_label.as_str()))
                    })
                })
        }
        None => false,
    }
}
