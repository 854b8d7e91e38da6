//! `custody.v1.KeyService`: converts requests into calls of
//! [`custody_core::keys`] and its records into messages.

use custody_core::authz::{Action, Approval, may_read_key};
use custody_core::drift;
use custody_core::keys::{self, KeyUpdate, NewKey, SCHEDULER_REQUEST_PREFIX, Trigger};
use custody_core::metrics;
use custody_core::names::{
    check_key_id, parse_exact_version, parse_key_name, parse_version_name, version_name,
};
use custody_core::{Error, Reason};
use custody_proto::v1::key_service_server::KeyService;
use custody_proto::v1::{
    CheckDriftRequest, CreateKeyRequest, DriftFinding, DriftKind, DriftReport, GetKeyRequest,
    GetPublicKeyRequest, Key, KeyVersion, ListKeysRequest, ListKeysResponse, PublicKey,
    RotateKeyRequest, SetKeyVersionStateRequest, SetLegalHoldRequest, UpdateKeyRequest, VersionRef,
};
use tonic::{Request, Response, Status};

use super::{Run, Shared, serve};
use crate::wire::{
    algorithm_from_wire, changed_version, cryptoperiod, key_message, purpose, timestamp,
    version_state_from_wire,
};

/// The key service.
pub struct Keys(pub Shared);

/// The domain's new key, from a request: every wire value checked.
fn new_key(request: CreateKeyRequest) -> Result<NewKey, Error> {
    check_key_id(&request.key_id)?;
    let algorithm = algorithm_from_wire(request.algorithm).ok_or_else(|| {
        Error::new(
            Reason::BadAlgorithm,
            format!("unknown or unspecified algorithm {}", request.algorithm),
        )
    })?;
    if request.purpose != purpose(algorithm.purpose()) as i32 {
        return Err(Error::new(
            Reason::BadPurpose,
            format!(
                "{} keys have purpose {}",
                algorithm.api_name(),
                algorithm.purpose().api_name()
            ),
        ));
    }
    Ok(NewKey {
        key_id: request.key_id,
        algorithm,
        allowed_signers: request.allowed_signers,
        cryptoperiod_ms: cryptoperiod(request.cryptoperiod.as_ref())?,
        backup_exportable: request.backup_exportable,
    })
}

/// The domain's key update, from a request.
pub(crate) fn key_update(request: &UpdateKeyRequest) -> Result<KeyUpdate, Error> {
    let update = KeyUpdate {
        cryptoperiod_ms: match &request.cryptoperiod {
            Some(d) => Some(cryptoperiod(Some(d))?),
            None => None,
        },
        min_version: request.min_version,
    };
    Ok(update)
}

#[tonic::async_trait]
impl KeyService for Keys {
    async fn create_key(
        &self,
        request: Request<CreateKeyRequest>,
    ) -> Result<Response<Key>, Status> {
        serve(
            &self.0,
            "CreateKey",
            Action::ManageKeys,
            request,
            Run::ToCompletion,
            |_| String::new(),
            |custody, audited, _, request| {
                Box::pin(async move {
                    audited.resource = format!("keys/{}", request.key_id);
                    let new = new_key(request)?;
                    let record = keys::create(custody, audited, new).await?;
                    Ok(key_message(&record))
                })
            },
        )
        .await
    }

    async fn get_key(&self, request: Request<GetKeyRequest>) -> Result<Response<Key>, Status> {
        serve(
            &self.0,
            "GetKey",
            Action::ReadKeys,
            request,
            Run::Inline,
            |request| request.name.clone(),
            |custody, _, principal, request| {
                Box::pin(async move {
                    let key_id = parse_key_name(&request.name)?;
                    let record = keys::found(custody, key_id)?;
                    may_read_key(&principal, &record)?;
                    Ok(key_message(&record))
                })
            },
        )
        .await
    }

    async fn list_keys(
        &self,
        request: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        serve(
            &self.0,
            "ListKeys",
            Action::ListKeys,
            request,
            Run::Inline,
            |_| String::new(),
            |custody, _, _, request| {
                Box::pin(async move {
                    let size = match request.page_size {
                        0 => 100,
                        n @ 1..=1000 => n as usize,
                        n => {
                            return Err(Error::new(
                                Reason::BadPageSize,
                                format!("page_size {n} is not within 0-1000"),
                            ));
                        }
                    };
                    let after = if request.page_token.is_empty() {
                        None
                    } else {
                        check_key_id(&request.page_token).map_err(|_| {
                            Error::new(
                                Reason::BadPageToken,
                                "page_token is not one this service issued",
                            )
                        })?;
                        Some(request.page_token.as_str())
                    };
                    let keys = custody.registry.list(after, size + 1);
                    let next_page_token = if keys.len() > size {
                        keys[size - 1].key_id.clone()
                    } else {
                        String::new()
                    };
                    Ok(ListKeysResponse {
                        keys: keys.iter().take(size).map(|k| key_message(k)).collect(),
                        next_page_token,
                    })
                })
            },
        )
        .await
    }

    async fn get_public_key(
        &self,
        request: Request<GetPublicKeyRequest>,
    ) -> Result<Response<PublicKey>, Status> {
        serve(
            &self.0,
            "GetPublicKey",
            Action::ReadKeys,
            request,
            Run::Inline,
            |request| request.name.clone(),
            |custody, _, principal, request| {
                Box::pin(async move {
                    let (key_id, version) = parse_version_name(&request.name)?;
                    let record = keys::found(custody, key_id)?;
                    may_read_key(&principal, &record)?;
                    let number = version.unwrap_or(record.primary_version);
                    let version = keys::version_of(&record, number)?;
                    if version.public_key_pem.is_empty() {
                        return Err(Error::new(
                            Reason::NoPublicKey,
                            format!("keys/{key_id} is a secret (AES) key and has no public key"),
                        ));
                    }
                    let algorithm = keys::algorithm_of(&record)?;
                    Ok(PublicKey {
                        name: version_name(key_id, number),
                        algorithm: crate::wire::algorithm(algorithm) as i32,
                        pem_crc32c: crc32c::crc32c(version.public_key_pem.as_bytes()),
                        pem: version.public_key_pem.clone(),
                        der: hex::decode(&version.public_key_der_hex).unwrap_or_default(),
                    })
                })
            },
        )
        .await
    }

    async fn rotate_key(
        &self,
        request: Request<RotateKeyRequest>,
    ) -> Result<Response<Key>, Status> {
        serve(
            &self.0,
            "RotateKey",
            Action::ManageKeys,
            request,
            Run::ToCompletion,
            |request| request.name.clone(),
            |custody, audited, _, request| {
                Box::pin(async move {
                    let key_id = parse_key_name(&request.name)?;
                    let request_id = Some(request.request_id.as_str()).filter(|r| !r.is_empty());
                    if let Some(id) = request_id
                        && id.starts_with(SCHEDULER_REQUEST_PREFIX)
                    {
                        return Err(Error::new(
                            Reason::BadRequestId,
                            format!(
                                "request ids starting with {SCHEDULER_REQUEST_PREFIX} are the scheduler's"
                            ),
                        ));
                    }
                    let record = keys::rotate(
                        custody,
                        audited,
                        key_id,
                        request_id,
                        None,
                        Trigger::Demand,
                        Approval::None,
                    )
                    .await?;
                    Ok(key_message(&record))
                })
            },
        )
        .await
    }

    async fn set_key_version_state(
        &self,
        request: Request<SetKeyVersionStateRequest>,
    ) -> Result<Response<KeyVersion>, Status> {
        serve(
            &self.0,
            "SetKeyVersionState",
            Action::ManageKeys,
            request,
            Run::ToCompletion,
            |request| request.name.clone(),
            |custody, audited, _, request| {
                Box::pin(async move {
                    let (key_id, version) = parse_exact_version(&request.name)?;
                    let target = version_state_from_wire(request.state)?;
                    let record = keys::set_state(
                        custody,
                        audited,
                        key_id,
                        version,
                        target,
                        &request.reason,
                        Approval::None,
                    )
                    .await?;
                    changed_version(&record, version)
                })
            },
        )
        .await
    }

    async fn update_key(
        &self,
        request: Request<UpdateKeyRequest>,
    ) -> Result<Response<Key>, Status> {
        serve(
            &self.0,
            "UpdateKey",
            Action::ManageKeys,
            request,
            Run::ToCompletion,
            |request| request.name.clone(),
            |custody, audited, _, request| {
                Box::pin(async move {
                    let key_id = parse_key_name(&request.name)?;
                    let update = key_update(&request)?;
                    let record =
                        keys::update(custody, audited, key_id, &update, Approval::None).await?;
                    Ok(key_message(&record))
                })
            },
        )
        .await
    }

    async fn cancel_destroy(
        &self,
        request: Request<VersionRef>,
    ) -> Result<Response<KeyVersion>, Status> {
        serve(
            &self.0,
            "CancelDestroy",
            Action::ProtectKeys,
            request,
            Run::ToCompletion,
            |request| request.name.clone(),
            |custody, audited, _, request| {
                Box::pin(async move {
                    let (key_id, version) = parse_exact_version(&request.name)?;
                    let record = keys::cancel_destroy(custody, audited, key_id, version).await?;
                    changed_version(&record, version)
                })
            },
        )
        .await
    }

    async fn set_legal_hold(
        &self,
        request: Request<SetLegalHoldRequest>,
    ) -> Result<Response<KeyVersion>, Status> {
        serve(
            &self.0,
            "SetLegalHold",
            Action::ProtectKeys,
            request,
            Run::ToCompletion,
            |request| request.name.clone(),
            |custody, audited, _, request| {
                Box::pin(async move {
                    let (key_id, version) = parse_exact_version(&request.name)?;
                    let record =
                        keys::set_legal_hold(custody, audited, key_id, version, &request.reason)
                            .await?;
                    changed_version(&record, version)
                })
            },
        )
        .await
    }

    async fn check_drift(
        &self,
        request: Request<CheckDriftRequest>,
    ) -> Result<Response<DriftReport>, Status> {
        serve(
            &self.0,
            "CheckDrift",
            Action::CheckDrift,
            request,
            Run::Inline,
            |_| String::new(),
            |custody, audited, _, _| {
                Box::pin(async move {
                    let report = drift::check(custody)
                        .await
                        .inspect_err(|_| metrics::drift_failed())?;
                    audited.detail = format!(
                        "{} findings over {} objects and {} versions",
                        report.findings.len(),
                        report.objects_checked,
                        report.versions_checked
                    );
                    Ok(drift_report_message(&report, custody.clock.now_ms()))
                })
            },
        )
        .await
    }
}

/// The API form of a drift report.
pub(crate) fn drift_report_message(report: &drift::Report, now_ms: i64) -> DriftReport {
    DriftReport {
        findings: report
            .findings
            .iter()
            .map(|f| DriftFinding {
                kind: match f.kind {
                    drift::Kind::Missing => DriftKind::Missing,
                    drift::Kind::Extra => DriftKind::Extra,
                    drift::Kind::AttributeMismatch => DriftKind::AttributeMismatch,
                } as i32,
                label: f.label.clone(),
                version: f.version.clone().unwrap_or_default(),
                object_class: f.class.as_str().into(),
                detail: f.detail.clone(),
            })
            .collect(),
        check_time: Some(timestamp(now_ms)),
        objects_checked: u32::try_from(report.objects_checked).unwrap_or(u32::MAX),
        versions_checked: u32::try_from(report.versions_checked).unwrap_or(u32::MAX),
    }
}
