//! What happens to a ceremony whose process stopped: at start after a
//! crash ([`recover`]), and while other replicas run ([`take_over`]). A
//! ceremony whose commit reached the registry is completed, one interrupted
//! mid-step is rolled back, one waiting for people resumes; what only the
//! stopped process's memory held (shares to hand out, components or shares
//! entered) is gone with it ([`settle_lost`]).

use serde_json::Map;

use super::commit::finish_completed;
use super::roll_back::roll_back;
use super::{
    advance, journal_failure, note, one_at_a_time, put, script_of, sign_transcript,
    unreachable_store,
};
use crate::Custody;
use crate::Error;
use crate::ceremony::journal::{CeremonyRecord, Phase, SecretsHolder, TokenRole};

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
    // A replica that started just after this one could take a ceremony
    // over meanwhile ([`take_over`]): one of the two at a time.
    let _one_at_a_time = one_at_a_time(state).await.map_err(|e| e.message)?;
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
            complete_committed(state, &mut record)
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
        let resumable = record.phase == Phase::AwaitingOfficers || record.only_entered();
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

/// While other replicas run (the leader, at each tick of the schedule):
/// settles the ceremonies a replica that stopped left behind. Under the
/// engine's lock no call is in the middle of a step, so a ceremony whose
/// commit reached the registry is completed, and one whose quorum signed in
/// runs its HSM steps, wherever they were begun; one held by a process that
/// is gone (mid-step, or with secrets in its memory) is settled as its
/// restart would ([`settle_lost`]). Ceremonies waiting for people, and
/// those held by running replicas, are left as they are. Skips the tick if
/// a ceremony call holds the lock. Returns how many it settled.
pub async fn take_over(state: &Custody) -> Result<usize, Error> {
    let Some(_one_at_a_time) = state
        .shared
        .try_lock_ceremonies()
        .map_err(|e| unreachable_store("the ceremony engine's lock", e))?
    else {
        return Ok(0);
    };
    let mut settled = 0;
    for mut record in state
        .ceremonies
        .journal
        .unfinished()
        .map_err(journal_failure)?
    {
        // One ceremony that cannot be settled now does not hold up the
        // others: it is tried again at the next tick.
        match settle_if_left(state, &mut record).await {
            Ok(true) => settled += 1,
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(ceremony = %record.id, reason = %error.reason, message = %error.message, "settling a ceremony a stopped replica left failed; the next tick tries again");
            }
        }
    }
    Ok(settled)
}

/// Settles `record` if what it waits for cannot come (see [`take_over`]);
/// whether it did.
async fn settle_if_left(state: &Custody, record: &mut CeremonyRecord) -> Result<bool, Error> {
    if committed(state, record) {
        tracing::warn!(ceremony = %record.id, "a ceremony committed by a replica that stopped: completing it");
        complete_committed(state, record).await?;
        return Ok(true);
    }
    if record.phase == Phase::AwaitingOfficers {
        let script = script_of(record)?;
        if !script.quorum().is_met_by(record.present.len()) {
            return Ok(false);
        }
        tracing::warn!(ceremony = %record.id, "the quorum signed in on a replica that stopped before the HSM steps: running them");
        advance(state, record, &script).await?;
        return Ok(true);
    }
    let Some(holder) = record.secrets_held_by.clone() else {
        return Ok(false);
    };
    let alive = state
        .shared
        .alive(&holder.instance)
        .map_err(|e| unreachable_store("which replicas are running", e))?;
    if alive {
        return Ok(false);
    }
    settle_lost(state, record, &holder).await?;
    Ok(true)
}

/// Settles a ceremony held by a process that is gone (`holder`): as its
/// restart would, with the others still running. Components or shares
/// entered before anything was made must be entered again, here; anything
/// else (a step interrupted, shares never collected) rolls back, destroying
/// what the ceremony made.
pub(super) async fn settle_lost(
    state: &Custody,
    record: &mut CeremonyRecord,
    holder: &SecretsHolder,
) -> Result<(), Error> {
    let gone = format!(
        "replica {} stopped while it held the ceremony in memory",
        holder.replica
    );
    if record.only_entered() {
        tracing::warn!(ceremony = %record.id, replica = %holder.replica, "the replica holding entered secrets stopped: they must be entered again");
        record.components.clear();
        record.shares_submitted.clear();
        return note(
            state,
            record,
            "resumed",
            "custodyd",
            format!("{gone}: components or shares entered there must be entered again"),
            Map::new(),
        )
        .await;
    }
    tracing::warn!(ceremony = %record.id, phase = ?record.phase, replica = %holder.replica, "rolling back a ceremony held by a replica that stopped");
    roll_back(state, record, Phase::RolledBack, &gone).await
}

/// Whether the ceremony's commit reached the registry: its key is
/// registered under the label the ceremony journaled; a restore: every key
/// id it reserved is registered with a version under a label it journaled
/// (one batch registers them all; a restored key may have been rotated
/// since, so not every version is the restore's); a crl ceremony: its CRL
/// was signed, verified and journaled.
pub(super) fn committed(state: &Custody, record: &CeremonyRecord) -> bool {
    let registered = |key_id: &str, label: &str| {
        state
            .registry
            .get(key_id)
            .is_some_and(|key| key.versions.iter().any(|v| v.hsm_label == label))
    };
    if record.kind == "crl" {
        return super::crl::signed(record);
    }
    if record.kind == "key-destruction" {
        return super::destruction::begun(record);
    }
    if let Some(certification) = &record.certification {
        return super::certify::committed(state, certification);
    }
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
                            .any(|v| journaled.contains(&v.hsm_label.as_str()))
                    })
                })
        }
        None => false,
    }
}

/// Completes a committed ceremony; a key-destruction ceremony whose destroy
/// step had begun finishes it first (an absent object counts as destroyed).
async fn complete_committed(state: &Custody, record: &mut CeremonyRecord) -> Result<(), Error> {
    if super::destruction::begun(record) {
        let script = script_of(record)?;
        return super::destruction::destroy_and_complete(state, record, &script).await;
    }
    finish_completed(state, record).await
}
