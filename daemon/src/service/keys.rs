//! `custody.v1.KeyService`: create, read, list, rotate, change state.

use std::sync::Arc;

use custody_proto::v1::key_service_server::KeyService;
use custody_proto::v1::{
    CreateKeyRequest, GetKeyRequest, GetPublicKeyRequest, Key, KeyPolicy, KeyPurpose, KeyVersion,
    KeyVersionState, ListKeysRequest, ListKeysResponse, PublicKey, RotateKeyRequest,
    SetKeyVersionStateRequest,
};
use hsm_shim::{ErrorKind, Exportability, KeyLabel};
use tonic::{Request, Response, Status};

use super::{
    Audited, Shared, State, caller, check_key_id, now_ms, parse_key_name, parse_version_name,
    require, timestamp, version_name,
};
use crate::algorithms::KeyAlgorithm;
use crate::error::ServiceError;
use crate::identity::{Role, valid_principal_name};
use crate::registry::{KeyRecord, VersionRecord, VersionState};

/// The key service.
pub struct Keys(pub Shared);

fn wire_state(state: VersionState) -> KeyVersionState {
    match state {
        VersionState::PreActivation => KeyVersionState::PreActivation,
        VersionState::Active => KeyVersionState::Active,
        VersionState::Suspended => KeyVersionState::Suspended,
        VersionState::Deactivated => KeyVersionState::Deactivated,
    }
}

/// The API form of a key.
pub(crate) fn key_message(record: &KeyRecord) -> Key {
    Key {
        name: format!("keys/{}", record.key_id),
        algorithm: KeyAlgorithm::from_api_name(&record.algorithm).map_or(0, |a| a.wire() as i32),
        purpose: KeyPurpose::AsymmetricSign as i32,
        allowed_signers: record.allowed_signers.clone(),
        primary_version: record.primary_version,
        versions: record
            .versions
            .iter()
            .map(|v| version_message(&record.key_id, v))
            .collect(),
        create_time: Some(timestamp(record.created_ms)),
        policies: record
            .policies
            .iter()
            .map(|(operation, quorum)| KeyPolicy {
                operation: operation.clone(),
                officers: quorum.members.iter().cloned().collect(),
                required: quorum.required,
            })
            .collect(),
    }
}

/// Refuses a direct call when the key's policy puts `kind` under quorum.
pub(crate) fn ungated(
    record: &KeyRecord,
    kind: &str,
    approved: Approval,
) -> Result<(), ServiceError> {
    match (record.policies.get(kind), approved) {
        (Some(quorum), Approval::None) => Err(ServiceError::precondition(
            "QUORUM_REQUIRED",
            format!(
                "{kind} on keys/{} needs {} officer approvals: request it with OperationService.RequestOperation",
                record.key_id, quorum.required
            ),
        )),
        _ => Ok(()),
    }
}

/// Whether a call runs on the strength of an approved operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Approval {
    /// A direct call: refused where a quorum policy applies.
    None,
    /// Executing an operation the quorum approved.
    Quorum,
}

fn version_message(key_id: &str, version: &VersionRecord) -> KeyVersion {
    KeyVersion {
        name: version_name(key_id, version.version),
        version: version.version,
        state: wire_state(version.state) as i32,
        create_time: Some(timestamp(version.created_ms)),
        state_time: Some(timestamp(version.state_ms)),
    }
}

fn found(state: &State, key_id: &str) -> Result<Arc<KeyRecord>, ServiceError> {
    state
        .registry
        .get(key_id)
        .ok_or_else(|| ServiceError::not_found(format!("no key keys/{key_id}")))
}

/// The HSM label of a key version: `key/{key_id}/v{version}`. The `key/`
/// namespace is custody's own for registry keys: no other object custody
/// makes (the audit key is `custody-audit/v1`) can share a label with one.
pub fn hsm_label(key_id: &str, version: u32) -> Result<KeyLabel, ServiceError> {
    KeyLabel::for_version(&format!("key/{key_id}"), version)
        .map_err(|e| ServiceError::invalid("BAD_KEY_ID", e.to_string()))
}

/// Generates version `version` of `record`'s algorithm in the HSM. A label
/// in custody's `key/` namespace left by a crash between generation and the
/// registry write belongs to no registered version (the caller holds the
/// registry lock and checked), so it is destroyed and made again.
async fn generate_version(
    state: &State,
    key_id: &str,
    algorithm: KeyAlgorithm,
    version: u32,
) -> Result<VersionRecord, ServiceError> {
    let label = hsm_label(key_id, version)?;
    let spec = algorithm.key_spec();
    let run_label = label.clone();
    let info = state
        .hsm
        .run(move |session| {
            match session.generate_key_pair(&run_label, spec, Exportability::NonExportable) {
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    tracing::warn!(label = %run_label, "removing an orphaned HSM key left by an interrupted create");
                    session.destroy(&run_label)?;
                    session.generate_key_pair(&run_label, spec, Exportability::NonExportable)
                }
                other => other,
            }
        })
        .await?;
    let public_key = info
        .public_key
        .ok_or_else(|| ServiceError::new(tonic::Code::Internal, "INTERNAL", "no public key"))?;
    let now = now_ms();
    Ok(VersionRecord {
        version,
        state: VersionState::Active,
        created_ms: now,
        state_ms: now,
        hsm_label: label.as_str().to_string(),
        public_key_der_hex: hex::encode(public_key.spki_der()),
        public_key_pem: public_key.to_pem()?,
    })
}

impl Keys {
    async fn create(
        &self,
        audited: &mut Audited,
        request: &CreateKeyRequest,
    ) -> Result<Key, ServiceError> {
        check_key_id(&request.key_id)?;
        audited.resource = format!("keys/{}", request.key_id);
        let algorithm = KeyAlgorithm::from_wire(request.algorithm).ok_or_else(|| {
            ServiceError::invalid(
                "BAD_ALGORITHM",
                format!("unknown or unspecified algorithm {}", request.algorithm),
            )
        })?;
        audited.detail = algorithm.api_name().into();
        if request.purpose != KeyPurpose::AsymmetricSign as i32 {
            return Err(ServiceError::invalid(
                "BAD_PURPOSE",
                format!(
                    "purpose {} is not supported for signing keys; use ASYMMETRIC_SIGN",
                    request.purpose
                ),
            ));
        }
        if !self.0.allowed_algorithms.contains(&algorithm) {
            return Err(ServiceError::precondition(
                "ALGORITHM_NOT_ALLOWED",
                format!("the crypto policy does not allow {}", algorithm.api_name()),
            ));
        }
        if request.allowed_signers.len() > 256 {
            return Err(ServiceError::invalid(
                "TOO_MANY_SIGNERS",
                "at most 256 allowed signers",
            ));
        }
        for signer in &request.allowed_signers {
            if !valid_principal_name(signer) {
                return Err(ServiceError::invalid(
                    "BAD_PRINCIPAL",
                    format!("invalid principal name {signer:?}"),
                ));
            }
        }
        let state = &self.0;
        let _guard = state.registry.lock().await;
        if state.registry.get(&request.key_id).is_some() {
            return Err(ServiceError::new(
                tonic::Code::AlreadyExists,
                "KEY_EXISTS",
                format!("keys/{} already exists", request.key_id),
            ));
        }
        audited.intent(state).await?;
        let first = generate_version(state, &request.key_id, algorithm, 1).await?;
        let record = KeyRecord {
            key_id: request.key_id.clone(),
            algorithm: algorithm.api_name().into(),
            allowed_signers: request.allowed_signers.clone(),
            primary_version: 1,
            created_ms: first.created_ms,
            versions: vec![first],
            policies: Default::default(),
        };
        state.registry.put(record.clone()).await.map_err(|e| {
            tracing::error!(%e, "registry write failed");
            ServiceError::new(
                tonic::Code::Unavailable,
                "REGISTRY_UNAVAILABLE",
                "the key registry cannot be written",
            )
        })?;
        Ok(key_message(&record))
    }

    /// Rotates `key_id`; see [`Approval`].
    pub async fn rotate(
        &self,
        audited: &mut Audited,
        key_id: &str,
        approval: Approval,
    ) -> Result<Key, ServiceError> {
        let state = &self.0;
        let _guard = state.registry.lock().await;
        let current = found(state, key_id)?;
        ungated(&current, "ROTATE", approval)?;
        let algorithm = KeyAlgorithm::from_api_name(&current.algorithm).ok_or_else(|| {
            ServiceError::new(
                tonic::Code::Internal,
                "INTERNAL",
                "unknown stored algorithm",
            )
        })?;
        let next = current
            .versions
            .iter()
            .map(|v| v.version)
            .max()
            .unwrap_or(0)
            + 1;
        audited.detail = format!("new version {next}");
        audited.intent(state).await?;
        let version = generate_version(state, key_id, algorithm, next).await?;
        let mut record = (*current).clone();
        record.versions.push(version);
        record.primary_version = next;
        state.registry.put(record.clone()).await.map_err(|e| {
            tracing::error!(%e, "registry write failed");
            ServiceError::new(
                tonic::Code::Unavailable,
                "REGISTRY_UNAVAILABLE",
                "the key registry cannot be written",
            )
        })?;
        Ok(key_message(&record))
    }

    /// Changes a version's state; see [`Approval`].
    pub async fn set_state(
        &self,
        audited: &mut Audited,
        request: &SetKeyVersionStateRequest,
        approval: Approval,
    ) -> Result<KeyVersion, ServiceError> {
        let (key_id, version) = parse_version_name(&request.name)?;
        let version = version.ok_or_else(|| {
            ServiceError::invalid("BAD_NAME", "name a version: keys/{key_id}/versions/{n}")
        })?;
        let target = match KeyVersionState::try_from(request.state) {
            Ok(KeyVersionState::Active) => VersionState::Active,
            Ok(KeyVersionState::Suspended) => VersionState::Suspended,
            Ok(KeyVersionState::Deactivated) => VersionState::Deactivated,
            Ok(KeyVersionState::PreActivation) => {
                return Err(ServiceError::precondition(
                    "ILLEGAL_TRANSITION",
                    "no version can return to PRE_ACTIVATION",
                ));
            }
            _ => {
                return Err(ServiceError::invalid(
                    "BAD_STATE",
                    format!("unknown or unspecified state {}", request.state),
                ));
            }
        };
        audited.detail = format!("to {target:?}");
        let state = &self.0;
        let _guard = state.registry.lock().await;
        let current = found(state, key_id)?;
        ungated(&current, "SET_STATE", approval)?;
        let existing = current
            .version(version)
            .ok_or_else(|| ServiceError::not_found(format!("no version {}", request.name)))?;
        let allowed = matches!(
            (existing.state, target),
            (VersionState::PreActivation, VersionState::Active)
                | (VersionState::Active, VersionState::Suspended)
                | (VersionState::Suspended, VersionState::Active)
                | (
                    VersionState::Active | VersionState::Suspended,
                    VersionState::Deactivated
                )
        );
        if !allowed {
            return Err(ServiceError::precondition(
                "ILLEGAL_TRANSITION",
                format!(
                    "{} cannot go from {:?} to {target:?}",
                    request.name, existing.state
                ),
            ));
        }
        if target == VersionState::Deactivated && current.primary_version == version {
            return Err(ServiceError::precondition(
                "PRIMARY_VERSION",
                "the primary version cannot be deactivated; rotate the key first",
            ));
        }
        audited.intent(state).await?;
        let mut record = (*current).clone();
        let now = now_ms();
        let mut updated = None;
        for v in &mut record.versions {
            if v.version == version {
                v.state = target;
                v.state_ms = now;
                updated = Some(v.clone());
            }
        }
        state.registry.put(record).await.map_err(|e| {
            tracing::error!(%e, "registry write failed");
            ServiceError::new(
                tonic::Code::Unavailable,
                "REGISTRY_UNAVAILABLE",
                "the key registry cannot be written",
            )
        })?;
        let updated = updated.ok_or_else(|| {
            ServiceError::new(tonic::Code::Internal, "INTERNAL", "version vanished")
        })?;
        Ok(version_message(key_id, &updated))
    }
}

#[tonic::async_trait]
impl KeyService for Keys {
    async fn create_key(
        &self,
        request: Request<CreateKeyRequest>,
    ) -> Result<Response<Key>, Status> {
        let mut audited = Audited::start("CreateKey");
        let result = async {
            let principal = caller(&request)?;
            audited.principal = principal.name.clone();
            require(&principal, Role::Operator)?;
            self.create(&mut audited, request.get_ref()).await
        }
        .await;
        audited.finish(&self.0, result).await.map(Response::new)
    }

    async fn get_key(&self, request: Request<GetKeyRequest>) -> Result<Response<Key>, Status> {
        let mut audited = Audited::start("GetKey");
        audited.resource = request.get_ref().name.clone();
        let result = async {
            audited.principal = caller(&request)?.name;
            let key_id = parse_key_name(&request.get_ref().name)?;
            let record = found(&self.0, key_id)?;
            Ok(key_message(&record))
        }
        .await;
        audited.finish(&self.0, result).await.map(Response::new)
    }

    async fn list_keys(
        &self,
        request: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        let mut audited = Audited::start("ListKeys");
        let result = async {
            audited.principal = caller(&request)?.name;
            let req = request.get_ref();
            let size = match req.page_size {
                0 => 100,
                n @ 1..=1000 => n as usize,
                n => {
                    return Err(ServiceError::invalid(
                        "BAD_PAGE_SIZE",
                        format!("page_size {n} is not within 0-1000"),
                    ));
                }
            };
            let after = if req.page_token.is_empty() {
                None
            } else {
                check_key_id(&req.page_token).map_err(|_| {
                    ServiceError::invalid(
                        "BAD_PAGE_TOKEN",
                        "page_token is not one this service issued",
                    )
                })?;
                Some(req.page_token.as_str())
            };
            let keys = self.0.registry.list(after, size + 1);
            let next_page_token = if keys.len() > size {
                keys[size - 1].key_id.clone()
            } else {
                String::new()
            };
            Ok(ListKeysResponse {
                keys: keys.iter().take(size).map(|k| key_message(k)).collect(),
                next_page_token,
            })
        }
        .await;
        audited.finish(&self.0, result).await.map(Response::new)
    }

    async fn get_public_key(
        &self,
        request: Request<GetPublicKeyRequest>,
    ) -> Result<Response<PublicKey>, Status> {
        let mut audited = Audited::start("GetPublicKey");
        audited.resource = request.get_ref().name.clone();
        let result = async {
            audited.principal = caller(&request)?.name;
            let (key_id, version) = parse_version_name(&request.get_ref().name)?;
            let record = found(&self.0, key_id)?;
            let number = version.unwrap_or(record.primary_version);
            let version = record.version(number).ok_or_else(|| {
                ServiceError::not_found(format!("no version {}", version_name(key_id, number)))
            })?;
            let algorithm =
                KeyAlgorithm::from_api_name(&record.algorithm).map_or(0, |a| a.wire() as i32);
            Ok(PublicKey {
                name: version_name(key_id, number),
                algorithm,
                pem_crc32c: crc32c::crc32c(version.public_key_pem.as_bytes()),
                pem: version.public_key_pem.clone(),
                der: hex::decode(&version.public_key_der_hex).unwrap_or_default(),
            })
        }
        .await;
        audited.finish(&self.0, result).await.map(Response::new)
    }

    async fn rotate_key(
        &self,
        request: Request<RotateKeyRequest>,
    ) -> Result<Response<Key>, Status> {
        let mut audited = Audited::start("RotateKey");
        audited.resource = request.get_ref().name.clone();
        let result = async {
            let principal = caller(&request)?;
            audited.principal = principal.name.clone();
            require(&principal, Role::Operator)?;
            let key_id = parse_key_name(&request.get_ref().name)?.to_string();
            self.rotate(&mut audited, &key_id, Approval::None).await
        }
        .await;
        audited.finish(&self.0, result).await.map(Response::new)
    }

    async fn set_key_version_state(
        &self,
        request: Request<SetKeyVersionStateRequest>,
    ) -> Result<Response<KeyVersion>, Status> {
        let mut audited = Audited::start("SetKeyVersionState");
        audited.resource = request.get_ref().name.clone();
        let result = async {
            let principal = caller(&request)?;
            audited.principal = principal.name.clone();
            require(&principal, Role::Operator)?;
            self.set_state(&mut audited, request.get_ref(), Approval::None)
                .await
        }
        .await;
        audited.finish(&self.0, result).await.map(Response::new)
    }
}
