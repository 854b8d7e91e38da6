//! `custody.v1.OperationService`: request, approve, deny and read
//! operations that need M-of-N officer approval, converted to and from
//! [`custody_core::dual_control`] (which checks, votes and executes).

use custody_core::authz::Action;
use custody_core::dual_control::operation::{OperationRecord, OperationState, Outcome, Spec};
use custody_core::dual_control::quorum::{CastVote, VoteKind};
use custody_core::keys::KeyUpdate;
use custody_core::names::{parse_exact_version, parse_key_name};
use custody_core::operations::read;
use custody_core::operations::request::{self, Requested};
use custody_core::operations::vote;
use custody_core::{Custody, Error, Reason};
use custody_proto::v1::operation_service_server::OperationService;
use custody_proto::v1::{
    BackupKekSpec, BackupSpec, DecryptSpec, Digest, GetOperationRequest, KeyRef,
    ListOfficersRequest, ListOfficersResponse, ListOperationsRequest, ListOperationsResponse,
    Officer, OfficerSpec, Operation, OperationSpec, OperationState as WireState,
    RequestOperationRequest, SetPolicySpec, SetStateSpec, SignResponse, SignSpec,
    SignatureEncoding, VersionRef, Vote, VoteRequest, digest, operation_spec,
};
use tonic::{Request, Response, Status};

use super::signing::{digest_input, encoding};
use super::{Audited, Run, Shared, caller, serve};
use crate::wire::{cryptoperiod, key_message, timestamp, version_state_from_wire};

/// The operation service.
pub struct Operations(pub Shared);

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

/// The message form of a stored spec (`review::spec_of` is its inverse).
pub(crate) fn spec_message(spec: &Spec) -> OperationSpec {
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
        Spec::Decrypt {
            key_id,
            version,
            ciphertext,
            associated_data,
            recipient,
        } => operation_spec::Spec::Decrypt(DecryptSpec {
            name: format!("keys/{key_id}/versions/{version}"),
            ciphertext: hex::decode(ciphertext).unwrap_or_default(),
            associated_data: hex::decode(associated_data).unwrap_or_default(),
            recipient_public_key: hex::decode(recipient).unwrap_or_default(),
        }),
        Spec::CreateBackup {
            backup_kek_set_id,
            versions,
        } => operation_spec::Spec::CreateBackup(BackupSpec {
            backup_kek_set_id: backup_kek_set_id.clone(),
            versions: versions
                .iter()
                .map(|v| custody_core::names::version_name(&v.key_id, v.version))
                .collect(),
        }),
        Spec::ActivateBackupKek {
            ceremony,
            set_id,
            check_value,
            threshold,
            shares,
        } => operation_spec::Spec::ActivateBackupKek(BackupKekSpec {
            ceremony: format!("ceremonies/{ceremony}"),
            set_id: set_id.clone(),
            check_value: check_value.clone(),
            threshold: u32::from(*threshold),
            shares: u32::from(*shares),
        }),
    };
    OperationSpec { spec: Some(spec) }
}

fn operation_message(state: &Custody, record: &OperationRecord) -> Operation {
    let mut message = Operation {
        name: record.name(),
        spec: Some(spec_message(&record.spec)),
        requester: record.requester.clone(),
        digest: record.digest_bytes().to_vec(),
        nonce: record.nonce.clone(),
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
        Some(Outcome::Backup { bundle, keys }) => {
            message.backup_bundle = bundle.clone();
            message.backup_keys = *keys;
        }
        Some(Outcome::Sealed {
            version_name,
            sealed,
        }) => {
            message.sealed_plaintext = hex::decode(sealed).unwrap_or_default();
            message.decrypted_by = version_name.clone();
        }
        Some(Outcome::Officers | Outcome::BackupKekActivated) | None => {}
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

/// The domain's form of a requested operation; every wire value checked.
fn requested(spec: &OperationSpec) -> Result<Requested, Error> {
    let spec = spec
        .spec
        .as_ref()
        .ok_or_else(|| Error::new(Reason::MissingSpec, "say which operation"))?;
    Ok(match spec {
        operation_spec::Spec::Sign(sign) => {
            let digest = sign.digest.as_ref().ok_or_else(|| {
                Error::new(Reason::MissingInput, "a SIGN operation takes a digest")
            })?;
            Requested::Sign(custody_core::signing::SignRequest {
                name: sign.name.clone(),
                input: Some(digest_input(digest)?),
                encoding: encoding(sign.encoding)?,
                input_crc32c: None,
            })
        }
        operation_spec::Spec::Rotate(key) => Requested::Rotate {
            key_id: parse_key_name(&key.name)?.to_string(),
        },
        operation_spec::Spec::SetState(set) => {
            let (key_id, version) = parse_exact_version(&set.name)?;
            Requested::SetState {
                key_id: key_id.to_string(),
                version,
                state: version_state_from_wire(set.state)?,
                reason: set.reason.clone(),
            }
        }
        operation_spec::Spec::SetPolicy(set) => Requested::SetPolicy {
            key_id: parse_key_name(&set.name)?.to_string(),
            operation: custody_proto::v1::OperationKind::try_from(set.operation)
                .map(|k| k.as_str_name().to_string())
                .unwrap_or_default(),
            officers: set.officers.clone(),
            required: set.required,
        },
        operation_spec::Spec::AddOfficer(officer) => Requested::AddOfficer {
            officer_id: officer.officer_id.clone(),
            principal: officer.principal.clone(),
            public_key: officer.public_key.clone(),
        },
        operation_spec::Spec::RemoveOfficer(officer) => Requested::RemoveOfficer {
            officer_id: officer.officer_id.clone(),
        },
        operation_spec::Spec::DestroyVersion(target) => {
            let (key_id, version) = parse_exact_version(&target.name)?;
            Requested::DestroyVersion {
                key_id: key_id.to_string(),
                version,
            }
        }
        operation_spec::Spec::ReleaseLegalHold(target) => {
            let (key_id, version) = parse_exact_version(&target.name)?;
            Requested::ReleaseLegalHold {
                key_id: key_id.to_string(),
                version,
            }
        }
        operation_spec::Spec::UpdateKey(update) => Requested::UpdateKey {
            key_id: parse_key_name(&update.name)?.to_string(),
            update: KeyUpdate {
                cryptoperiod_ms: match &update.cryptoperiod {
                    Some(d) => Some(cryptoperiod(Some(d))?),
                    None => None,
                },
                min_version: update.min_version,
            },
        },
        operation_spec::Spec::CreateBackup(backup) => Requested::CreateBackup {
            backup_kek_set_id: backup.backup_kek_set_id.clone(),
        },
        operation_spec::Spec::ActivateBackupKek(kek) => Requested::ActivateBackupKek {
            ceremony: super::ceremony::parse_name(&kek.ceremony)?,
        },
        operation_spec::Spec::Decrypt(decrypt) => Requested::Decrypt {
            name: decrypt.name.clone(),
            ciphertext: decrypt.ciphertext.clone(),
            associated_data: decrypt.associated_data.clone(),
            recipient: decrypt.recipient_public_key.clone(),
        },
    })
}

#[tonic::async_trait]
impl OperationService for Operations {
    async fn request_operation(
        &self,
        request: Request<RequestOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        serve(
            &self.0,
            "RequestOperation",
            Action::RequestOperation,
            request,
            Run::Inline,
            |_| String::new(),
            |custody, audited, principal, request| {
                Box::pin(async move {
                    let requested = requested(&request.spec.unwrap_or_default())?;
                    let record = request::request(custody, audited, &principal, &requested).await?;
                    Ok(operation_message(custody, &record))
                })
            },
        )
        .await
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        serve(
            &self.0,
            "GetOperation",
            Action::ReadOperations,
            request,
            Run::Inline,
            |request| request.name.clone(),
            |custody, _, principal, request| {
                Box::pin(async move {
                    let record = read::operation(custody, &principal, &request.name).await?;
                    Ok(operation_message(custody, &record))
                })
            },
        )
        .await
    }

    async fn list_operations(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        serve(
            &self.0,
            "ListOperations",
            Action::ReadOperations,
            request,
            Run::Inline,
            |_| String::new(),
            |custody, _, principal, request| {
                Box::pin(async move {
                    let wanted = match WireState::try_from(request.state) {
                        Ok(WireState::Unspecified) => None,
                        Ok(WireState::Pending) => Some(OperationState::Pending),
                        Ok(WireState::Succeeded) => Some(OperationState::Succeeded),
                        Ok(WireState::Failed) => Some(OperationState::Failed),
                        Ok(WireState::Denied) => Some(OperationState::Denied),
                        Ok(WireState::Expired) => Some(OperationState::Expired),
                        Err(_) => {
                            return Err(Error::new(Reason::BadState, "unknown operation state"));
                        }
                    };
                    let page = read::operations(
                        custody,
                        &principal,
                        wanted,
                        request.page_size,
                        &request.page_token,
                    )
                    .await?;
                    Ok(ListOperationsResponse {
                        // Bundles only through GetOperation: a list stays
                        // small.
                        operations: page
                            .operations
                            .iter()
                            .map(|o| Operation {
                                backup_bundle: String::new(),
                                ..operation_message(custody, o)
                            })
                            .collect(),
                        next_page_token: page.next_page_token,
                    })
                })
            },
        )
        .await
    }

    async fn approve_operation(
        &self,
        request: Request<VoteRequest>,
    ) -> Result<Response<Operation>, Status> {
        vote_rpc(&self.0, request, VoteKind::Approve).await
    }

    async fn deny_operation(
        &self,
        request: Request<VoteRequest>,
    ) -> Result<Response<Operation>, Status> {
        vote_rpc(&self.0, request, VoteKind::Deny).await
    }

    async fn list_officers(
        &self,
        request: Request<ListOfficersRequest>,
    ) -> Result<Response<ListOfficersResponse>, Status> {
        serve(
            &self.0,
            "ListOfficers",
            Action::ListOfficers,
            request,
            Run::Inline,
            |_| String::new(),
            |custody, _, _, _| {
                Box::pin(async move {
                    Ok(ListOfficersResponse {
                        officers: custody
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
                        admin_required: custody.dual_control.admin_required(),
                    })
                })
            },
        )
        .await
    }
}

/// A vote is audited by the domain itself (with its signature); refusals
/// before the vote is looked at get the usual request record.
async fn vote_rpc(
    custody: &Shared,
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
        let asked = request.get_ref();
        let (id, officer) = vote::voter(custody, &principal, &asked.name, &asked.officer_id)?;
        // A vote changes state, and the last one runs the operation (a
        // backup bundle can be large): none below the disk's reserve.
        custody.admit(true)?;
        Ok((principal, id.to_string(), officer))
    });
    let (principal, id, officer) = match voter {
        Ok(voter) => voter,
        Err(error) => return audited.finish(custody, Err(error)).await,
    };
    // Run to the end even if the caller goes away: a vote half-applied
    // (stored, not executed) must not depend on the client's patience.
    let custody = custody.clone();
    let request = request.into_inner();
    tokio::spawn(async move {
        let record = vote::vote(
            &custody,
            &principal,
            &request.name,
            &id,
            officer,
            kind,
            &request.signature,
        )
        .await?;
        Ok(operation_message(&custody, &record))
    })
    .await
    .map_err(|_| Status::internal("the vote task failed"))?
    .map(Response::new)
    .map_err(crate::status::to_status)
}
