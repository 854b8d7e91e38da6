//! Approving and denying: a vote is checked (signature over this
//! operation's digest, officer bound to the caller's certificate, eligible,
//! not the requester, not yet voted, before expiry), audited with its
//! signature, written and flushed with the operation; only then, if it
//! completes the quorum, does the operation run, and its outcome is stored
//! and audited. Also the sweep that closes expired operations.

use super::execute::execute;
use super::request::{parse_operation_name, store_failure};
use crate::action::Audited;
use crate::audit::Event;
use crate::authz::{Action, acting_officer, authorize};
use crate::dual_control::operation::{OperationRecord, OperationState};
use crate::dual_control::quorum::{CastVote, Refusal, Rules, Standing, VoteKind};
use crate::dual_control::store::OfficerRecord;
use crate::dual_control::{approval_message, denial_message, officer_key};
use crate::identity::Principal;
use crate::{Custody, Error, Reason};

/// Who may vote at all: an officer whose enrollment names the caller's
/// certificate principal. Returns the operation id and the officer.
pub fn voter<'n>(
    custody: &Custody,
    principal: &Principal,
    operation_name: &'n str,
    officer_id: &str,
) -> Result<(&'n str, OfficerRecord), Error> {
    authorize(principal, Action::Vote)?;
    let id = parse_operation_name(operation_name)?;
    let officer = acting_officer(custody, principal, officer_id)?;
    Ok((id, officer))
}

/// A vote refused before its operation was loaded (the lock, the refresh
/// or the load failed), audited as the request it was.
async fn refused(
    custody: &Custody,
    principal: &Principal,
    operation_name: &str,
    kind: VoteKind,
    error: Error,
) -> Result<OperationRecord, Error> {
    let mut audited = Audited::start(match kind {
        VoteKind::Approve => "ApproveOperation",
        VoteKind::Deny => "DenyOperation",
    });
    audited.principal = principal.name.clone();
    audited.resource = operation_name.to_string();
    audited.record(custody, Err(error)).await
}

/// Casts a vote of `officer` on operation `id` (named `operation_name` in
/// refusals); every outcome is audited here, with the signature.
pub async fn vote(
    custody: &Custody,
    principal: &Principal,
    operation_name: &str,
    id: &str,
    officer: OfficerRecord,
    kind: VoteKind,
    signature: &[u8],
) -> Result<OperationRecord, Error> {
    // One turn at the lock (a round of store calls across replicas) for
    // the sweep and the vote.
    let _guard = match custody.dual_control.lock().await {
        Ok(guard) => guard,
        Err(error) => {
            return refused(
                custody,
                principal,
                operation_name,
                kind,
                store_failure(error),
            )
            .await;
        }
    };
    // The lock reloads the officers; the registry too, since the holder
    // before may have changed a key's policy (a SET_POLICY it ran) after
    // this request's own refresh: the quorum this vote may complete is
    // judged against the policy in force (threat model S5).
    // A refresh that fails is this vote's audited refusal, as a load that
    // fails is.
    let fresh = custody.refresh();
    sweep(custody).await;
    let loaded = fresh.and_then(|()| {
        custody
            .dual_control
            .operation(id)
            .map_err(store_failure)
            .and_then(|r| {
                r.ok_or_else(|| Error::new(Reason::NotFound, format!("no {operation_name}")))
            })
    });
    let mut record = match loaded {
        Ok(record) => record,
        Err(error) => return refused(custody, principal, operation_name, kind, error).await,
    };
    let digest = record.digest_bytes();
    let message = match kind {
        VoteKind::Approve => approval_message(&digest),
        VoteKind::Deny => denial_message(&digest),
    };
    let public_key = hex::decode(&officer.public_key).unwrap_or_default();
    let signature_valid = officer_key::verify(&public_key, &message, signature);
    let now = custody.clock.now_ms();
    let (name, operation_digest) = (record.name(), record.digest.clone());
    let vote_event = |outcome: &str| Event::Vote {
        operation: name.clone(),
        principal: principal.name.clone(),
        officer: officer.officer_id.clone(),
        public_key: officer.public_key.clone(),
        vote: match kind {
            VoteKind::Approve => "approve".into(),
            VoteKind::Deny => "deny".into(),
        },
        digest: operation_digest.clone(),
        signature: hex::encode(signature),
        outcome: outcome.into(),
    };
    let cast = if record.state != OperationState::Pending {
        Err(Refusal::NotPending)
    } else if officer.principal == record.requester {
        // Whatever officer id the requester votes under, it is the requester.
        Err(Refusal::Requester)
    } else {
        let rules = Rules {
            quorum: &record.quorum,
            requester_officer: record.requester_officer.as_deref(),
            expires_ms: record.expires_ms,
            denial_vetoes: custody.denial_vetoes,
        };
        let mut ballot = record.ballot.clone();
        let vote = CastVote {
            time_ms: now,
            signature: hex::encode(signature),
            key: officer.public_key.clone(),
        };
        rules
            .cast(
                &mut ballot,
                &officer.officer_id,
                kind,
                vote,
                signature_valid,
                |o, kind, vote| custody.dual_control.vote_stands(o, &digest, kind, vote),
            )
            .map(|standing| (ballot, standing))
    };
    let (ballot, standing) = match cast {
        Ok(cast) => cast,
        Err(refusal) => {
            let event = vote_event(refusal.reason().as_str());
            if let Err(error) = custody.audit.append(event).await {
                tracing::error!(%error, "a refused vote could not be audited");
            }
            return Err(Error::new(
                refusal.reason(),
                format!("vote on {} refused", record.name()),
            ));
        }
    };
    // Audited (with the signature), then stored, before anything acts on it.
    custody
        .audit
        .append(vote_event("ok"))
        .await
        .map_err(|e| Error::audit_unavailable(&e))?;
    record.ballot = ballot;
    custody
        .dual_control
        .put_operation(&record)
        .await
        .map_err(store_failure)?;
    match standing {
        Standing::Pending => {}
        Standing::Denied => {
            finish(
                custody,
                &mut record,
                OperationState::Denied,
                "vetoed by a signed denial".into(),
            )
            .await?
        }
        Standing::Approved => match execute(custody, &record).await {
            Ok(outcome) => {
                record.outcome = Some(outcome.clone());
                finish(
                    custody,
                    &mut record,
                    OperationState::Succeeded,
                    format!("{outcome:?}"),
                )
                .await?;
            }
            Err(error) => {
                record.error = Some(format!("{}: {}", error.reason, error.message));
                finish(
                    custody,
                    &mut record,
                    OperationState::Failed,
                    error.reason.as_str().into(),
                )
                .await?;
            }
        },
    }
    Ok(record)
}

/// Stores a final state and records it. Hold the store lock.
async fn finish(
    custody: &Custody,
    record: &mut OperationRecord,
    final_state: OperationState,
    detail: String,
) -> Result<(), Error> {
    record.state = final_state;
    record.finished_ms = Some(custody.clock.now_ms());
    custody
        .dual_control
        .put_operation(record)
        .await
        .map_err(store_failure)?;
    let state_name = format!("{final_state:?}").to_lowercase();
    custody
        .audit
        .append(Event::OperationFinished {
            operation: record.name(),
            state: state_name,
            detail,
        })
        .await
        .map(drop)
        .map_err(|e| Error::audit_unavailable(&e))
}

/// Most finished operations one sweep prunes (the rest wait for the next).
pub const PRUNE_BATCH: usize = 256;

/// The sweep: marks pending operations past their expiry as expired (each
/// recorded), then prunes operations finished longer than the retention
/// period ago. Its cost follows the pending operations and what is due,
/// never the operations kept (threat model R2): it reads the pending index
/// and the oldest entries of the finished index only.
pub async fn expire_due(custody: &Custody) {
    let _guard = match custody.dual_control.lock().await {
        Ok(guard) => guard,
        Err(error) => {
            tracing::warn!(%error, "the expiry sweep waits for the dual-control lock");
            return;
        }
    };
    sweep(custody).await;
}

/// [`expire_due`], for a caller that holds the dual-control lock.
async fn sweep(custody: &Custody) {
    let now = custody.clock.now_ms();
    let Ok(operations) = custody.dual_control.pending_operations() else {
        return;
    };
    for mut record in operations {
        let rules = Rules {
            quorum: &record.quorum,
            requester_officer: record.requester_officer.as_deref(),
            expires_ms: record.expires_ms,
            denial_vetoes: custody.denial_vetoes,
        };
        let digest = record.digest_bytes();
        let approved = rules.standing(&record.ballot, |o, kind, vote| {
            custody.dual_control.vote_stands(o, &digest, kind, vote)
        }) == Standing::Approved;
        if record.state == OperationState::Pending && approved {
            // The quorum was complete but custodyd stopped before the
            // operation ran (or before its outcome was stored). Running it
            // now could run it twice; the officers re-approve instead.
            // It may have taken effect (a store that failed only for the
            // outcome): say so, so that no one asks for it twice blindly.
            record.error = Some("interrupted: custodyd stopped, or its store failed, between the last approval and the outcome being stored; whether it took effect is unknown: check its resource (the audit log records what was done) before requesting it again".into());
            if let Err(error) = finish(
                custody,
                &mut record,
                OperationState::Failed,
                "interrupted".into(),
            )
            .await
            {
                tracing::error!(
                    reason = %error.reason,
                    "could not close interrupted {}",
                    record.name()
                );
            }
            continue;
        }
        if record.state == OperationState::Pending && now >= record.expires_ms {
            if let Err(error) = finish(
                custody,
                &mut record,
                OperationState::Expired,
                "not approved in time".into(),
            )
            .await
            {
                tracing::error!(reason = %error.reason, "could not expire {}", record.name());
            }
        }
    }
    prune_finished(custody, now).await;
    crate::metrics::operations(&custody.dual_control.operation_counts());
}

/// Prunes up to [`PRUNE_BATCH`] operations that finished more than the
/// retention period before `now`: recorded first (which ones, in one audit
/// record), then removed. Each had its request, votes and outcome audited
/// when they happened, so the audit log keeps their whole story. Hold the
/// store lock.
async fn prune_finished(custody: &Custody, now: i64) {
    let cutoff = now.saturating_sub(custody.limits.operation_retention_ms);
    let due = match custody.dual_control.finished_before(cutoff, PRUNE_BATCH) {
        Ok(due) if due.is_empty() => return,
        Ok(due) => due,
        Err(error) => {
            tracing::error!(%error, "cannot read finished operations to prune");
            return;
        }
    };
    let mut audited = Audited::start("PruneOperations");
    audited.principal = crate::keys::SCHEDULER.into();
    audited.detail = format!(
        "{} operations finished before {}: {}",
        due.len(),
        crate::audit::rfc3339_ms(cutoff),
        due.join(", ")
    );
    // Nothing is removed unless its removal is on the record.
    if let Err(error) = audited.intent(custody).await {
        tracing::error!(reason = %error.reason, "operations not pruned");
        return;
    }
    let pruned = custody
        .dual_control
        .prune_operations(&due)
        .await
        .map_err(store_failure);
    if let Err(error) = audited.record(custody, pruned.map(drop)).await {
        tracing::error!(reason = %error.reason, "pruning operations failed");
    }
}
