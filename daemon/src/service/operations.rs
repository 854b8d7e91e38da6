//! `custody.v1.OperationService`: request, approve, deny and read operations
//! that need M-of-N officer approval, and execute them once approved.
//!
//! Order of events for a vote: the vote is checked (signature over this
//! operation's digest, officer bound to the caller's certificate, eligible,
//! not the requester, not yet voted, before expiry), written and flushed with
//! the operation, and audited with its signature; only then, if it completes
//! the quorum, does the operation run, and its outcome is stored and audited.

use std::collections::BTreeSet;

use custody_proto::v1::operation_service_server::OperationService;
use custody_proto::v1::{
    Digest, GetOperationRequest, KeyRef, ListOfficersRequest, ListOfficersResponse,
    ListOperationsRequest, ListOperationsResponse, Officer, OfficerSpec, Operation, OperationSpec,
    OperationState as WireState, RequestOperationRequest, SetPolicySpec, SetStateSpec, SignRequest,
    SignResponse, SignSpec, SignatureEncoding, VersionRef, Vote, VoteRequest, digest,
    operation_spec, sign_request,
};
use tonic::{Request, Response, Status};

use super::keys::{
    Approval, Keys, Trigger, check_destroyable, check_transition, cryptoperiod, key_message,
    requested_state, wire_state as wire_version_state,
};
use super::signing::{check_sign_operation, sign_one};
use super::{Audited, Shared, caller, require, timestamp};
use custody_core::Custody;
use custody_core::audit::Event;
use custody_core::dual_control::operation::{
    ALWAYS_GATED_KINDS, KEY_POLICY_KINDS, OperationRecord, OperationState, Outcome, Spec,
};
use custody_core::dual_control::quorum::{
    Ballot, CastVote, Quorum, Refusal, Rules, Standing, VoteKind,
};
use custody_core::dual_control::store::{OfficerRecord, check_officer};
use custody_core::dual_control::{approval_message, denial_message, officer_key};
use custody_core::identity::{Principal, Role};
use custody_core::names::{parse_key_name, parse_version_name};
use custody_core::{Error, Reason};

/// The operation service.
pub struct Operations(pub Shared);

fn random_hex() -> Result<String, Error> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).map_err(|_| Error::new(Reason::Internal, "no randomness"))?;
    Ok(hex::encode(bytes))
}

fn store_failure(error: String) -> Error {
    tracing::error!(%error, "dual-control store");
    Error::new(
        Reason::StoreUnavailable,
        "the operation store cannot be written",
    )
}

fn wire_state(state: OperationState) -> WireState {
    match state {
        OperationState::Pending => WireState::Pending,
        OperationState::Succeeded => WireState::Succeeded,
        OperationState::Failed => WireState::Failed,
        OperationState::Denied => WireState::Denied,
        OperationState::Expired => WireState::Expired,
    }
}

fn votes(votes: &std::collections::BTreeMap<String, CastVote>) -> Vec<Vote> {
    votes
        .iter()
        .map(|(officer, vote)| Vote {
            officer_id: officer.clone(),
            signature: hex::decode(&vote.signature).unwrap_or_default(),
            time: Some(timestamp(vote.time_ms)),
        })
        .collect()
}

/// A stored SIGN operation's digest, in its API form.
fn stored_digest(hash: &str, hex_digest: &str) -> Digest {
    let bytes = hex::decode(hex_digest).unwrap_or_default();
    Digest {
        digest: Some(match hash {
            "sha384" => digest::Digest::Sha384(bytes),
            "sha512" => digest::Digest::Sha512(bytes),
            _ => digest::Digest::Sha256(bytes),
        }),
    }
}

/// A stored SIGN operation's encoding, as its wire value.
fn stored_encoding(encoding: &str) -> i32 {
    match encoding {
        "raw" => SignatureEncoding::Raw as i32,
        _ => SignatureEncoding::Der as i32,
    }
}

fn spec_message(spec: &Spec) -> OperationSpec {
    let spec = match spec {
        Spec::Sign {
            key_id,
            version,
            hash,
            digest: hex_digest,
            encoding,
        } => {
            let digest = stored_digest(hash, hex_digest);
            operation_spec::Spec::Sign(SignSpec {
                name: format!("keys/{key_id}/versions/{version}"),
                digest: Some(digest),
                encoding: stored_encoding(encoding),
            })
        }
        Spec::Rotate { key_id } => operation_spec::Spec::Rotate(KeyRef {
            name: format!("keys/{key_id}"),
        }),
        Spec::SetState {
            key_id,
            version,
            state,
            reason,
        } => operation_spec::Spec::SetState(SetStateSpec {
            name: format!("keys/{key_id}/versions/{version}"),
            state: custody_proto::v1::KeyVersionState::from_str_name(state).map_or(0, |s| s as i32),
            reason: reason.clone(),
        }),
        Spec::SetPolicy {
            key_id,
            operation,
            officers,
            required,
        } => operation_spec::Spec::SetPolicy(SetPolicySpec {
            name: format!("keys/{key_id}"),
            operation: custody_proto::v1::OperationKind::from_str_name(operation)
                .map_or(0, |k| k as i32),
            officers: officers.clone(),
            required: *required,
        }),
        Spec::AddOfficer {
            officer_id,
            principal,
            public_key,
        } => operation_spec::Spec::AddOfficer(OfficerSpec {
            officer_id: officer_id.clone(),
            principal: principal.clone(),
            public_key: hex::decode(public_key).unwrap_or_default(),
        }),
        Spec::RemoveOfficer { officer_id } => operation_spec::Spec::RemoveOfficer(OfficerSpec {
            officer_id: officer_id.clone(),
            ..Default::default()
        }),
        Spec::DestroyVersion { key_id, version } => {
            operation_spec::Spec::DestroyVersion(VersionRef {
                name: format!("keys/{key_id}/versions/{version}"),
            })
        }
        Spec::ReleaseLegalHold { key_id, version } => {
            operation_spec::Spec::ReleaseLegalHold(VersionRef {
                name: format!("keys/{key_id}/versions/{version}"),
            })
        }
        Spec::UpdateKey {
            key_id,
            cryptoperiod_secs,
            min_version,
        } => operation_spec::Spec::UpdateKey(update_key_request(
            key_id,
            *cryptoperiod_secs,
            *min_version,
        )),
    };
    OperationSpec { spec: Some(spec) }
}

fn operation_message(state: &Custody, record: &OperationRecord) -> Operation {
    let mut message = Operation {
        name: record.name(),
        spec: Some(spec_message(&record.spec)),
        requester: record.requester.clone(),
        digest: record.digest_bytes().to_vec(),
        rendering: record.rendering(),
        create_time: Some(timestamp(record.created_ms)),
        expire_time: Some(timestamp(record.expires_ms)),
        state: wire_state(record.state) as i32,
        required: record.quorum.required,
        eligible_officers: record.quorum.members.iter().cloned().collect(),
        approvals: votes(&record.ballot.approvals),
        denials: votes(&record.ballot.denials),
        error: record.error.clone().unwrap_or_default(),
        ..Default::default()
    };
    match &record.outcome {
        Some(Outcome::Signature {
            version_name,
            signature,
        }) => {
            let signature = hex::decode(signature).unwrap_or_default();
            message.signature = Some(SignResponse {
                name: version_name.clone(),
                signature_crc32c: crc32c::crc32c(&signature),
                signature,
                ..Default::default()
            });
        }
        Some(Outcome::Key { key_id }) => {
            message.key = state.registry.get(key_id).map(|k| key_message(&k));
        }
        Some(Outcome::Officers) | None => {}
    }
    message
}

/// The API request an UPDATE_KEY operation stands for.
fn update_key_request(
    key_id: &str,
    cryptoperiod_secs: Option<i64>,
    min_version: Option<u32>,
) -> custody_proto::v1::UpdateKeyRequest {
    custody_proto::v1::UpdateKeyRequest {
        name: format!("keys/{key_id}"),
        cryptoperiod: cryptoperiod_secs.map(|seconds| prost_types::Duration { seconds, nanos: 0 }),
        min_version,
    }
}

fn parse_operation_name(name: &str) -> Result<&str, Error> {
    name.strip_prefix("operations/")
        .filter(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| {
            Error::new(
                Reason::BadName,
                format!("{name:?} is not of the form operations/{{id}}"),
            )
        })
}

impl Operations {
    /// Turns a requested spec into what will be stored, and the quorum that
    /// must approve it. Every check that the direct RPC would make is made
    /// here, so an approved operation fails only if the world changed.
    fn resolve(
        &self,
        principal: &Principal,
        spec: &OperationSpec,
    ) -> Result<(Spec, Quorum), Error> {
        let state = &self.0;
        let key_policy = |key_id: &str, kind: &str| -> Result<Quorum, Error> {
            let record = state
                .registry
                .get(key_id)
                .ok_or_else(|| Error::new(Reason::NotFound, format!("no key keys/{key_id}")))?;
            record.policies.get(kind).cloned().ok_or_else(|| {
                Error::new(
                    Reason::NoPolicy,
                    format!("keys/{key_id} has no {kind} policy: call the direct RPC instead"),
                )
            })
        };
        let admin = || {
            state
                .dual_control
                .admin_quorum()
                .map_err(|e| Error::new(Reason::NoOfficers, e))
        };
        match spec.spec.as_ref() {
            Some(operation_spec::Spec::Sign(sign)) => {
                let digest = sign.digest.as_ref().ok_or_else(|| {
                    Error::new(Reason::MissingInput, "a SIGN operation takes a digest")
                })?;
                let (key_id, version, hash, digest, encoding) =
                    check_sign_operation(state, principal, &sign.name, digest, sign.encoding)?;
                let quorum = key_policy(&key_id, "SIGN")?;
                Ok((
                    Spec::Sign {
                        key_id,
                        version,
                        hash,
                        digest,
                        encoding,
                    },
                    quorum,
                ))
            }
            Some(operation_spec::Spec::Rotate(key)) => {
                require(principal, Role::Operator)?;
                let key_id = parse_key_name(&key.name)?.to_string();
                let quorum = key_policy(&key_id, "ROTATE")?;
                Ok((Spec::Rotate { key_id }, quorum))
            }
            Some(operation_spec::Spec::SetState(set)) => {
                require(principal, Role::Operator)?;
                let (key_id, version) = parse_version_name(&set.name)?;
                let version =
                    version.ok_or_else(|| Error::new(Reason::BadName, "name a version"))?;
                let (target, reason) = requested_state(set.state, &set.reason)?;
                let record = state
                    .registry
                    .get(key_id)
                    .ok_or_else(|| Error::new(Reason::NotFound, format!("no key keys/{key_id}")))?;
                check_transition(&record, version, target)?;
                let target = wire_version_state(target);
                let quorum = key_policy(key_id, "SET_STATE")?;
                Ok((
                    Spec::SetState {
                        key_id: key_id.into(),
                        version,
                        state: target.as_str_name().into(),
                        reason: reason.to_string(),
                    },
                    quorum,
                ))
            }
            Some(operation_spec::Spec::SetPolicy(set)) => {
                if !(principal.has(Role::Operator) || principal.has(Role::Officer)) {
                    require(principal, Role::Operator)?;
                }
                let key_id = parse_key_name(&set.name)?.to_string();
                let record = state
                    .registry
                    .get(&key_id)
                    .ok_or_else(|| Error::new(Reason::NotFound, format!("no key keys/{key_id}")))?;
                let operation = custody_proto::v1::OperationKind::try_from(set.operation)
                    .map(|k| k.as_str_name())
                    .ok()
                    .filter(|k| KEY_POLICY_KINDS.contains(k))
                    .ok_or_else(|| {
                        Error::new(Reason::BadPolicy, "a key policy governs SIGN, ROTATE, SET_STATE, SET_POLICY, DESTROY_VERSION or RELEASE_LEGAL_HOLD",
                        )
                    })?;
                if set.required > 0 {
                    Quorum::new(set.officers.iter().cloned(), set.required)
                        .map_err(|e| Error::new(Reason::BadPolicy, e))?;
                    if let Some(unknown) = set
                        .officers
                        .iter()
                        .find(|o| !state.dual_control.enrolled(o))
                    {
                        return Err(Error::new(
                            Reason::BadPolicy,
                            format!("{unknown} is not an enrolled officer"),
                        ));
                    }
                }
                let quorum = match record.policies.get("SET_POLICY") {
                    Some(quorum) => quorum.clone(),
                    None => admin()?,
                };
                let mut officers = set.officers.clone();
                officers.sort();
                Ok((
                    Spec::SetPolicy {
                        key_id,
                        operation: operation.into(),
                        officers,
                        required: set.required,
                    },
                    quorum,
                ))
            }
            Some(operation_spec::Spec::AddOfficer(officer)) => {
                if !(principal.has(Role::Operator) || principal.has(Role::Officer)) {
                    require(principal, Role::Operator)?;
                }
                let public_key = hex::encode(&officer.public_key);
                check_officer(&officer.officer_id, &officer.principal, &public_key)
                    .map_err(|e| Error::new(Reason::BadOfficer, e))?;
                if state.dual_control.officer(&officer.officer_id).is_some()
                    || state
                        .dual_control
                        .officer_for_principal(&officer.principal)
                        .is_some()
                {
                    return Err(Error::new(
                        Reason::OfficerExists,
                        "that officer id or principal is already enrolled",
                    ));
                }
                Ok((
                    Spec::AddOfficer {
                        officer_id: officer.officer_id.clone(),
                        principal: officer.principal.clone(),
                        public_key,
                    },
                    admin()?,
                ))
            }
            Some(operation_spec::Spec::RemoveOfficer(officer)) => {
                if !(principal.has(Role::Operator) || principal.has(Role::Officer)) {
                    require(principal, Role::Operator)?;
                }
                if !state.dual_control.enrolled(&officer.officer_id) {
                    return Err(Error::new(
                        Reason::NotFound,
                        format!("no officer {}", officer.officer_id),
                    ));
                }
                if state.dual_control.officers().len() as u32 <= state.dual_control.admin_required()
                {
                    return Err(Error::new(
                        Reason::OfficerRemovalRefused,
                        "removing an officer would leave fewer officers than the administrative quorum needs",
                    ));
                }
                removal_keeps_policies_possible(state, &officer.officer_id)?;
                Ok((
                    Spec::RemoveOfficer {
                        officer_id: officer.officer_id.clone(),
                    },
                    admin()?,
                ))
            }
            Some(
                operation_spec::Spec::DestroyVersion(target)
                | operation_spec::Spec::ReleaseLegalHold(target),
            ) => {
                if !(principal.has(Role::Operator) || principal.has(Role::Officer)) {
                    require(principal, Role::Operator)?;
                }
                let (key_id, version) = parse_version_name(&target.name)?;
                let version =
                    version.ok_or_else(|| Error::new(Reason::BadName, "name a version"))?;
                let record = state
                    .registry
                    .get(key_id)
                    .ok_or_else(|| Error::new(Reason::NotFound, format!("no key keys/{key_id}")))?;
                let spec = if matches!(spec.spec, Some(operation_spec::Spec::DestroyVersion(_))) {
                    check_destroyable(&record, version)?;
                    Spec::DestroyVersion {
                        key_id: key_id.into(),
                        version,
                    }
                } else {
                    let held = record.version(version).map(|v| v.legal_hold.is_some());
                    match held {
                        None => {
                            return Err(Error::new(
                                Reason::NotFound,
                                format!("no version {}", target.name),
                            ));
                        }
                        Some(false) => {
                            return Err(Error::new(
                                Reason::NoLegalHold,
                                format!("{} has no legal hold", target.name),
                            ));
                        }
                        Some(true) => Spec::ReleaseLegalHold {
                            key_id: key_id.into(),
                            version,
                        },
                    }
                };
                let quorum = match record.policies.get(spec.kind()) {
                    Some(quorum) => quorum.clone(),
                    None => admin()?,
                };
                Ok((spec, quorum))
            }
            Some(operation_spec::Spec::UpdateKey(update)) => {
                require(principal, Role::Operator)?;
                let key_id = parse_key_name(&update.name)?;
                let cryptoperiod_secs = match &update.cryptoperiod {
                    Some(d) => Some(cryptoperiod(Some(d))?.map_or(0, |ms| ms / 1000)),
                    None => None,
                };
                if cryptoperiod_secs.is_none() && update.min_version.is_none() {
                    return Err(Error::new(
                        Reason::NothingToUpdate,
                        "set cryptoperiod or min_version",
                    ));
                }
                let quorum = key_policy(key_id, "UPDATE_KEY")?;
                Ok((
                    Spec::UpdateKey {
                        key_id: key_id.into(),
                        cryptoperiod_secs,
                        min_version: update.min_version,
                    },
                    quorum,
                ))
            }
            None => Err(Error::new(Reason::MissingSpec, "say which operation")),
        }
    }

    async fn request(
        &self,
        audited: &mut Audited,
        principal: &Principal,
        spec: &OperationSpec,
    ) -> Result<Operation, Error> {
        let state = &self.0;
        let (spec, quorum) = self.resolve(principal, spec)?;
        let now = state.clock.now_ms();
        let mut record = OperationRecord {
            id: random_hex()?,
            spec,
            requester: principal.name.clone(),
            requester_officer: state
                .dual_control
                .officer_for_principal(&principal.name)
                .map(|o| o.officer_id),
            nonce: random_hex()?,
            created_ms: now,
            expires_ms: now + state.approval_ttl_ms,
            quorum,
            digest: String::new(),
            ballot: Ballot::default(),
            state: OperationState::Pending,
            outcome: None,
            error: None,
        };
        record.digest = hex::encode(record.compute_digest());
        audited.resource = record.name();
        audited.detail = format!(
            "{} | digest {} | quorum {}",
            record.spec.describe(),
            record.digest,
            quorum_text(&record.quorum)
        );
        // The request is recorded before the operation exists.
        audited.intent(state).await?;
        let _guard = state.dual_control.lock().await;
        state
            .dual_control
            .put_operation(&record)
            .await
            .map_err(store_failure)?;
        Ok(operation_message(state, &record))
    }

    /// Who may vote at all: an officer whose enrollment names the caller's
    /// certificate principal. Returns the operation id and the officer.
    fn voter<'r>(
        &self,
        principal: &Principal,
        request: &'r VoteRequest,
    ) -> Result<(&'r str, OfficerRecord), Error> {
        require(principal, Role::Officer)?;
        let id = parse_operation_name(&request.name)?;
        let officer = self
            .0
            .dual_control
            .officer(&request.officer_id)
            .ok_or_else(|| {
                Error::new(
                    Reason::OfficerNotEnrolled,
                    format!("{} is not an enrolled officer", request.officer_id),
                )
            })?;
        if officer.principal != principal.name {
            return Err(Error::new(
                Reason::OfficerMismatch,
                format!(
                    "officer {} is bound to another certificate principal",
                    officer.officer_id
                ),
            ));
        }
        Ok((id, officer))
    }

    /// Casts a vote; every outcome is audited here, with the signature.
    async fn vote(
        &self,
        principal: &Principal,
        request: &VoteRequest,
        id: &str,
        officer: OfficerRecord,
        kind: VoteKind,
    ) -> Result<Operation, Error> {
        let state = &self.0;
        expire_due(state).await;
        let _guard = state.dual_control.lock().await;
        let loaded = state
            .dual_control
            .operation(id)
            .map_err(store_failure)
            .and_then(|r| {
                r.ok_or_else(|| Error::new(Reason::NotFound, format!("no {}", request.name)))
            });
        let mut record = match loaded {
            Ok(record) => record,
            Err(error) => {
                let mut audited = Audited::start(if kind == VoteKind::Approve {
                    "ApproveOperation"
                } else {
                    "DenyOperation"
                });
                audited.principal = principal.name.clone();
                audited.resource = request.name.clone();
                return audited.record(state, Err(error)).await;
            }
        };
        let digest = record.digest_bytes();
        let message = match kind {
            VoteKind::Approve => approval_message(&digest),
            VoteKind::Deny => denial_message(&digest),
        };
        let public_key = hex::decode(&officer.public_key).unwrap_or_default();
        let signature_valid = officer_key::verify(&public_key, &message, &request.signature);
        let now = state.clock.now_ms();
        let (operation_name, operation_digest) = (record.name(), record.digest.clone());
        let vote_event = |outcome: &str| Event::Vote {
            operation: operation_name.clone(),
            principal: principal.name.clone(),
            officer: officer.officer_id.clone(),
            public_key: officer.public_key.clone(),
            vote: match kind {
                VoteKind::Approve => "approve".into(),
                VoteKind::Deny => "deny".into(),
            },
            digest: operation_digest.clone(),
            signature: hex::encode(&request.signature),
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
                denial_vetoes: state.denial_vetoes,
            };
            let mut ballot = record.ballot.clone();
            let vote = CastVote {
                time_ms: now,
                signature: hex::encode(&request.signature),
            };
            rules
                .cast(
                    &mut ballot,
                    &officer.officer_id,
                    kind,
                    vote,
                    signature_valid,
                    |o| state.dual_control.enrolled(o),
                )
                .map(|standing| (ballot, standing))
        };
        let (ballot, standing) = match cast {
            Ok(cast) => cast,
            Err(refusal) => {
                let event = vote_event(refusal.reason().as_str());
                if let Err(error) = state.audit.append(event).await {
                    tracing::error!(%error, "a refused vote could not be audited");
                }
                return Err(Error::new(
                    refusal.reason(),
                    format!("vote on {} refused", record.name()),
                ));
            }
        };
        // Audited (with the signature), then stored, before anything acts on it.
        state
            .audit
            .append(vote_event("ok"))
            .await
            .map_err(|e| Error::audit_unavailable(&e))?;
        record.ballot = ballot;
        state
            .dual_control
            .put_operation(&record)
            .await
            .map_err(store_failure)?;
        match standing {
            Standing::Pending => {}
            Standing::Denied => {
                finish(
                    state,
                    &mut record,
                    OperationState::Denied,
                    "vetoed by a signed denial".into(),
                )
                .await?
            }
            Standing::Approved => {
                let outcome = execute(&self.0, &record).await;
                match outcome {
                    Ok(outcome) => {
                        record.outcome = Some(outcome.clone());
                        finish(
                            state,
                            &mut record,
                            OperationState::Succeeded,
                            format!("{outcome:?}"),
                        )
                        .await?;
                    }
                    Err(error) => {
                        record.error = Some(format!("{}: {}", error.reason, error.message));
                        finish(
                            state,
                            &mut record,
                            OperationState::Failed,
                            error.reason.as_str().into(),
                        )
                        .await?;
                    }
                }
            }
        }
        Ok(operation_message(state, &record))
    }

    fn readable(&self, principal: &Principal, record: &OperationRecord) -> Result<(), Error> {
        if principal.has(Role::Officer)
            || principal.has(Role::Auditor)
            || record.requester == principal.name
        {
            Ok(())
        } else {
            Err(Error::new(
                Reason::NotYours,
                "only the requester, officers and auditors read an operation",
            ))
        }
    }
}

fn quorum_text(quorum: &Quorum) -> String {
    let members: Vec<&str> = quorum.members.iter().map(String::as_str).collect();
    format!("{} of {}", quorum.required, members.join(", "))
}

/// Stores a final state and records it. Hold the store lock.
async fn finish(
    state: &Custody,
    record: &mut OperationRecord,
    final_state: OperationState,
    detail: String,
) -> Result<(), Error> {
    record.state = final_state;
    state
        .dual_control
        .put_operation(record)
        .await
        .map_err(store_failure)?;
    let state_name = format!("{final_state:?}").to_lowercase();
    state
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

/// Marks pending operations past their expiry as expired (each recorded).
pub async fn expire_due(state: &Custody) {
    let now = state.clock.now_ms();
    let _guard = state.dual_control.lock().await;
    let Ok(operations) = state.dual_control.operations() else {
        return;
    };
    let mut counts = [
        ("pending", 0),
        ("succeeded", 0),
        ("failed", 0),
        ("denied", 0),
        ("expired", 0),
    ];
    for record in &operations {
        let index = match record.state {
            OperationState::Pending if now >= record.expires_ms => 4,
            OperationState::Pending => 0,
            OperationState::Succeeded => 1,
            OperationState::Failed => 2,
            OperationState::Denied => 3,
            OperationState::Expired => 4,
        };
        counts[index].1 += 1;
    }
    custody_core::metrics::operations(&counts);
    for mut record in operations {
        let rules = Rules {
            quorum: &record.quorum,
            requester_officer: record.requester_officer.as_deref(),
            expires_ms: record.expires_ms,
            denial_vetoes: state.denial_vetoes,
        };
        let approved = rules.standing(&record.ballot, |o| state.dual_control.enrolled(o))
            == Standing::Approved;
        if record.state == OperationState::Pending && approved {
            // The quorum was complete but custodyd stopped before the
            // operation ran (or before its outcome was stored). Running it
            // now could run it twice; the officers re-approve instead.
            record.error = Some("interrupted: custodyd stopped between the last approval and the outcome; request it again".into());
            if let Err(error) = finish(
                state,
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
                state,
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
}

/// The quorum that governs `spec` now.
fn current_quorum(state: &Custody, spec: &Spec) -> Result<Quorum, Error> {
    let admin = || {
        state
            .dual_control
            .admin_quorum()
            .map_err(|e| Error::new(Reason::NoOfficers, e))
    };
    let Some(key_id) = spec.key_id() else {
        return admin();
    };
    let key = state
        .registry
        .get(key_id)
        .ok_or_else(|| Error::new(Reason::NotFound, format!("no key keys/{key_id}")))?;
    match key.policies.get(spec.kind()) {
        Some(quorum) => Ok(quorum.clone()),
        None if ALWAYS_GATED_KINDS.contains(&spec.kind()) => admin(),
        None => Err(Error::new(
            Reason::NoPolicy,
            format!("keys/{key_id} has no {} policy", spec.kind()),
        )),
    }
}

/// Refuses to remove `officer_id` if a key policy naming it could then never
/// be met.
fn removal_keeps_policies_possible(state: &Custody, officer_id: &str) -> Result<(), Error> {
    for key in state.registry.list(None, usize::MAX) {
        for (kind, quorum) in &key.policies {
            if quorum.members.contains(officer_id) {
                let left = quorum
                    .members
                    .iter()
                    .filter(|m| *m != officer_id && state.dual_control.enrolled(m))
                    .count();
                if left < quorum.required as usize {
                    return Err(Error::new(
                        Reason::OfficerRemovalRefused,
                        format!(
                            "without {officer_id}, the {kind} policy of keys/{} ({} of {}) could never be met: change it first",
                            key.key_id,
                            quorum.required,
                            quorum.members.len()
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Runs an approved operation, if the rules it was approved under still hold.
/// Hold the store lock.
async fn execute(shared: &Shared, record: &OperationRecord) -> Result<Outcome, Error> {
    let state = shared.as_ref();
    // Approvals count under the policy they were given for; if the policy
    // changed since (tightened after a compromise, say), they do not.
    let current = current_quorum(state, &record.spec)?;
    if current != record.quorum {
        return Err(Error::new(
            Reason::PolicyChanged,
            format!(
                "the quorum changed from {} to {} after this operation was requested: request it again",
                quorum_text(&record.quorum),
                quorum_text(&current)
            ),
        ));
    }
    match &record.spec {
        Spec::Sign {
            key_id,
            version,
            hash,
            digest: hex_digest,
            encoding,
        } => {
            let digest = stored_digest(hash, hex_digest);
            let request = SignRequest {
                name: format!("keys/{key_id}/versions/{version}"),
                input: Some(sign_request::Input::Digest(digest)),
                encoding: stored_encoding(encoding),
                ..Default::default()
            };
            // The requester was checked as a signer on the allow-list when it
            // asked; the allow-list is checked again now.
            let requester = Principal {
                name: record.requester.clone(),
                roles: BTreeSet::from([Role::Signer]),
            };
            let response = sign_one(state, &requester, request, Approval::Quorum).await?;
            Ok(Outcome::Signature {
                version_name: response.name,
                signature: hex::encode(response.signature),
            })
        }
        Spec::Rotate { key_id } => {
            let mut audited = Audited::start("ExecuteRotate");
            audited.principal = record.requester.clone();
            audited.resource = format!("keys/{key_id}");
            let keys = Keys(shared.clone());
            let result = keys
                .rotate(
                    &mut audited,
                    key_id,
                    None,
                    None,
                    Trigger::Approved,
                    Approval::Quorum,
                )
                .await;
            audited.record(state, result).await?;
            Ok(Outcome::Key {
                key_id: key_id.clone(),
            })
        }
        Spec::SetState {
            key_id,
            version,
            state: target,
            reason,
        } => {
            let mut audited = Audited::start("ExecuteSetState");
            audited.principal = record.requester.clone();
            let request = custody_proto::v1::SetKeyVersionStateRequest {
                name: format!("keys/{key_id}/versions/{version}"),
                state: custody_proto::v1::KeyVersionState::from_str_name(target)
                    .map_or(0, |s| s as i32),
                reason: reason.clone(),
            };
            audited.resource = request.name.clone();
            let keys = Keys(shared.clone());
            let result = keys
                .set_state(&mut audited, &request, Approval::Quorum)
                .await;
            audited.record(state, result).await?;
            Ok(Outcome::Key {
                key_id: key_id.clone(),
            })
        }
        Spec::SetPolicy {
            key_id,
            operation,
            officers,
            required,
        } => {
            let _guard = state.registry.lock().await;
            let mut key = (*state
                .registry
                .get(key_id)
                .ok_or_else(|| Error::new(Reason::NotFound, format!("no key keys/{key_id}")))?)
            .clone();
            if *required == 0 {
                key.policies.remove(operation);
            } else {
                let quorum = Quorum::new(officers.iter().cloned(), *required)
                    .map_err(|e| Error::new(Reason::BadPolicy, e))?;
                key.policies.insert(operation.clone(), quorum);
            }
            state
                .registry
                .put(key)
                .await
                .map_err(|e| store_failure(e.to_string()))?;
            Ok(Outcome::Key {
                key_id: key_id.clone(),
            })
        }
        Spec::AddOfficer {
            officer_id,
            principal,
            public_key,
        } => {
            state
                .dual_control
                .add_officer(OfficerRecord {
                    officer_id: officer_id.clone(),
                    principal: principal.clone(),
                    public_key: public_key.clone(),
                    enrolled_ms: state.clock.now_ms(),
                })
                .await
                .map_err(|e| Error::new(Reason::OfficerExists, e))?;
            Ok(Outcome::Officers)
        }
        Spec::DestroyVersion { key_id, version } | Spec::ReleaseLegalHold { key_id, version } => {
            let destroy = matches!(record.spec, Spec::DestroyVersion { .. });
            let mut audited = Audited::start(if destroy {
                "ExecuteDestroyVersion"
            } else {
                "ExecuteReleaseLegalHold"
            });
            audited.principal = record.requester.clone();
            audited.resource = format!("keys/{key_id}/versions/{version}");
            let keys = Keys(shared.clone());
            let result = if destroy {
                keys.schedule_destroy(&mut audited, key_id, *version).await
            } else {
                keys.release_legal_hold(&mut audited, key_id, *version)
                    .await
            };
            audited.record(state, result).await?;
            Ok(Outcome::Key {
                key_id: key_id.clone(),
            })
        }
        Spec::UpdateKey {
            key_id,
            cryptoperiod_secs,
            min_version,
        } => {
            let mut audited = Audited::start("ExecuteUpdateKey");
            audited.principal = record.requester.clone();
            audited.resource = format!("keys/{key_id}");
            let request = update_key_request(key_id, *cryptoperiod_secs, *min_version);
            let result = Keys(shared.clone())
                .update(&mut audited, &request, Approval::Quorum)
                .await;
            audited.record(state, result).await?;
            Ok(Outcome::Key {
                key_id: key_id.clone(),
            })
        }
        Spec::RemoveOfficer { officer_id } => {
            removal_keeps_policies_possible(state, officer_id)?;
            state
                .dual_control
                .remove_officer(officer_id)
                .await
                .map_err(|e| Error::new(Reason::OfficerRemovalRefused, e))?;
            Ok(Outcome::Officers)
        }
    }
}

#[tonic::async_trait]
impl OperationService for Operations {
    async fn request_operation(
        &self,
        request: Request<RequestOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let mut audited = Audited::start("RequestOperation");
        let result = async {
            let principal = caller(&request)?;
            audited.principal = principal.name.clone();
            let spec = request.get_ref().spec.clone().unwrap_or_default();
            self.request(&mut audited, &principal, &spec).await
        }
        .await;
        audited.finish(&self.0, result).await.map(Response::new)
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let mut audited = Audited::start("GetOperation");
        audited.resource = request.get_ref().name.clone();
        let result = async {
            let principal = caller(&request)?;
            audited.principal = principal.name.clone();
            let id = parse_operation_name(&request.get_ref().name)?;
            expire_due(&self.0).await;
            let record = self
                .0
                .dual_control
                .operation(id)
                .map_err(store_failure)?
                .ok_or_else(|| {
                    Error::new(Reason::NotFound, format!("no {}", request.get_ref().name))
                })?;
            self.readable(&principal, &record)?;
            Ok(operation_message(&self.0, &record))
        }
        .await;
        audited.finish(&self.0, result).await.map(Response::new)
    }

    async fn list_operations(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        let mut audited = Audited::start("ListOperations");
        let result = async {
            let principal = caller(&request)?;
            audited.principal = principal.name.clone();
            let wanted = WireState::try_from(request.get_ref().state)
                .map_err(|_| Error::new(Reason::BadState, "unknown operation state"))?;
            expire_due(&self.0).await;
            let mut operations = self.0.dual_control.operations().map_err(store_failure)?;
            operations.retain(|o| self.readable(&principal, o).is_ok());
            operations
                .retain(|o| wanted == WireState::Unspecified || wire_state(o.state) == wanted);
            operations.sort_by_key(|o| std::cmp::Reverse(o.created_ms));
            operations.truncate(1000);
            Ok(ListOperationsResponse {
                operations: operations
                    .iter()
                    .map(|o| operation_message(&self.0, o))
                    .collect(),
            })
        }
        .await;
        audited.finish(&self.0, result).await.map(Response::new)
    }

    async fn approve_operation(
        &self,
        request: Request<VoteRequest>,
    ) -> Result<Response<Operation>, Status> {
        self.vote_rpc(request, VoteKind::Approve).await
    }

    async fn deny_operation(
        &self,
        request: Request<VoteRequest>,
    ) -> Result<Response<Operation>, Status> {
        self.vote_rpc(request, VoteKind::Deny).await
    }

    async fn list_officers(
        &self,
        request: Request<ListOfficersRequest>,
    ) -> Result<Response<ListOfficersResponse>, Status> {
        let mut audited = Audited::start("ListOfficers");
        let result = async {
            audited.principal = caller(&request)?.name;
            Ok(ListOfficersResponse {
                officers: self
                    .0
                    .dual_control
                    .officers()
                    .into_iter()
                    .map(|o| Officer {
                        officer_id: o.officer_id,
                        principal: o.principal,
                        public_key: hex::decode(o.public_key).unwrap_or_default(),
                        enroll_time: Some(timestamp(o.enrolled_ms)),
                    })
                    .collect(),
                admin_required: self.0.dual_control.admin_required(),
            })
        }
        .await;
        audited.finish(&self.0, result).await.map(Response::new)
    }
}

impl Operations {
    /// A vote is audited by `vote` itself (with its signature); refusals
    /// before the vote is looked at get the usual request record.
    async fn vote_rpc(
        &self,
        request: Request<VoteRequest>,
        kind: VoteKind,
    ) -> Result<Response<Operation>, Status> {
        let method = if kind == VoteKind::Approve {
            "ApproveOperation"
        } else {
            "DenyOperation"
        };
        let mut audited = Audited::start(method);
        audited.resource = request.get_ref().name.clone();
        let voter = caller(&request).and_then(|principal| {
            audited.principal = principal.name.clone();
            let (id, officer) = self.voter(&principal, request.get_ref())?;
            Ok((principal, id.to_string(), officer))
        });
        let (principal, id, officer) = match voter {
            Ok(voter) => voter,
            Err(error) => return audited.finish(&self.0, Err(error)).await,
        };
        // Run to the end even if the caller goes away: a vote half-applied
        // (stored, not executed) must not depend on the client's patience.
        let this = Operations(self.0.clone());
        let request = request.into_inner();
        tokio::spawn(async move { this.vote(&principal, &request, &id, officer, kind).await })
            .await
            .map_err(|_| Status::internal("the vote task failed"))?
            .map(Response::new)
            .map_err(crate::status::to_status)
    }
}
