//! `custody.v1.KeyService`: create, read, list, rotate, change state.

use std::sync::Arc;

use custody_proto::v1::key_service_server::KeyService;
use custody_proto::v1::{
    CheckDriftRequest, CreateKeyRequest, DriftFinding, DriftKind, DriftReport, GetKeyRequest,
    GetPublicKeyRequest, Key, KeyPolicy, KeyVersion, KeyVersionState, ListKeysRequest,
    ListKeysResponse, PublicKey, RotateKeyRequest, SetKeyVersionStateRequest, SetLegalHoldRequest,
    UpdateKeyRequest, VersionRef,
};
use hsm_shim::{AesRole, ErrorKind, Exportability, KeyLabel};
use tonic::{Request, Response, Status};

use super::{Audited, Shared, caller, require, timestamp, to_completion};
use custody_core::Custody;
use custody_core::algorithms::KeyAlgorithm;
use custody_core::audit::Event;
use custody_core::identity::{Principal, Role, valid_principal_name};
use custody_core::lifecycle::{self, Use};
use custody_core::names::{check_key_id, parse_key_name, parse_version_name, version_name};
use custody_core::registry::{
    CommitError, KeyRecord, PendingVersion, REMEMBERED_ROTATIONS, RotationRequest, VersionRecord,
    VersionState,
};
use custody_core::{Error, Reason};
use custody_core::{drift, failpoint, metrics};

/// The key service.
pub struct Keys(pub Shared);

/// The principal the scheduler acts as in the audit log.
pub const SCHEDULER: &str = "custodyd-scheduler";

/// Rotation request ids with this prefix are the scheduler's own
/// (`schedule:v{n}`); clients may not use them, so that no client can make
/// a scheduled rotation look done.
pub const SCHEDULER_REQUEST_PREFIX: &str = "schedule:";

pub(crate) fn wire_state(state: VersionState) -> KeyVersionState {
    match state {
        VersionState::PreActivation => KeyVersionState::PreActivation,
        VersionState::Active => KeyVersionState::Active,
        VersionState::Suspended => KeyVersionState::Suspended,
        VersionState::Deactivated => KeyVersionState::Deactivated,
        VersionState::Compromised => KeyVersionState::Compromised,
        VersionState::Destroyed => KeyVersionState::Destroyed,
    }
}

fn stored_state(state: KeyVersionState) -> Option<VersionState> {
    Some(match state {
        KeyVersionState::PreActivation => VersionState::PreActivation,
        KeyVersionState::Active => VersionState::Active,
        KeyVersionState::Suspended => VersionState::Suspended,
        KeyVersionState::Deactivated => VersionState::Deactivated,
        KeyVersionState::Compromised => VersionState::Compromised,
        KeyVersionState::Destroyed => VersionState::Destroyed,
        KeyVersionState::Unspecified => return None,
    })
}

fn duration(ms: i64) -> prost_types::Duration {
    let split = timestamp(ms);
    prost_types::Duration {
        seconds: split.seconds,
        nanos: split.nanos,
    }
}

/// The stored algorithm of a key.
pub(crate) fn algorithm_of(record: &KeyRecord) -> Result<KeyAlgorithm, Error> {
    KeyAlgorithm::from_api_name(&record.algorithm)
        .ok_or_else(|| Error::new(Reason::Internal, "unknown stored algorithm"))
}

/// The API form of a key.
pub(crate) fn key_message(record: &KeyRecord) -> Key {
    let algorithm = KeyAlgorithm::from_api_name(&record.algorithm);
    Key {
        name: format!("keys/{}", record.key_id),
        algorithm: algorithm.map_or(0, |a| crate::wire::algorithm(a) as i32),
        purpose: algorithm.map_or(0, |a| crate::wire::purpose(a.purpose()) as i32),
        allowed_signers: record.allowed_signers.clone(),
        backup_exportable: record.backup_exportable,
        primary_version: record.primary_version,
        versions: record
            .versions
            .iter()
            .map(|v| version_message(record, v))
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
        cryptoperiod: record.cryptoperiod_ms.map(duration),
        min_version: record.min_version,
    }
}

/// Refuses a direct call when the key's policy puts `kind` under quorum.
pub(crate) fn ungated(record: &KeyRecord, kind: &str, approved: Approval) -> Result<(), Error> {
    match (record.policies.get(kind), approved) {
        (Some(quorum), Approval::None) => Err(Error::new(
            Reason::QuorumRequired,
            format!(
                "{kind} on keys/{} needs {} officer approvals: request it with OperationService.RequestOperation",
                record.key_id, quorum.required
            ),
        )),
        _ => Ok(()),
    }
}

/// Refuses unless `version` of `record` may be used for `usage` at `now_ms`:
/// its state permits it ([`lifecycle::permits`]), it is not scheduled for
/// destruction, a protecting use is within the cryptoperiod, and a processing
/// use is not below the key's minimum version.
pub(crate) fn check_usable(
    record: &KeyRecord,
    version: &VersionRecord,
    usage: Use,
    now_ms: i64,
) -> Result<(), Error> {
    let name = version_name(&record.key_id, version.version);
    if !lifecycle::permits(version.state, usage) {
        let (reason, what) = match usage {
            Use::Protect => (
                Reason::VersionNotActive,
                "only active versions sign or encrypt",
            ),
            Use::Process => (
                Reason::VersionNotUsable,
                "only active, suspended and deactivated versions verify, decrypt or rewrap",
            ),
        };
        return Err(Error::new(
            reason,
            format!("{name} is {:?}; {what}", version.state),
        ));
    }
    if version.destroy_at_ms.is_some() {
        return Err(Error::new(
            Reason::DestroyScheduled,
            format!("{name} is scheduled for destruction; CancelDestroy to use it again"),
        ));
    }
    match usage {
        Use::Protect => {
            if let Some(until) = version.protect_until_ms(record.cryptoperiod_ms)
                && now_ms >= until
            {
                return Err(Error::new(
                    Reason::CryptoperiodEnded,
                    format!("the cryptoperiod of {name} has ended; rotate the key"),
                ));
            }
        }
        Use::Process => {
            if version.version < record.min_version {
                return Err(Error::new(
                    Reason::BelowMinVersion,
                    format!(
                        "{name} is below the minimum version {} of keys/{}",
                        record.min_version, record.key_id
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Whether a call runs on the strength of an approved operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Approval {
    /// A direct call: refused where a quorum policy applies.
    None,
    /// Executing an operation the quorum approved.
    Quorum,
}

fn version_message(record: &KeyRecord, version: &VersionRecord) -> KeyVersion {
    KeyVersion {
        name: version_name(&record.key_id, version.version),
        version: version.version,
        state: wire_state(version.state) as i32,
        create_time: Some(timestamp(version.created_ms)),
        state_time: Some(timestamp(version.state_ms)),
        activate_time: version.activated_ms.map(timestamp),
        protect_until: version
            .protect_until_ms(record.cryptoperiod_ms)
            .map(timestamp),
        destroy_time: version.destroy_at_ms.map(timestamp),
        legal_hold: version.legal_hold.is_some(),
        check_value: version.check_value.clone(),
    }
}

fn found(state: &Custody, key_id: &str) -> Result<Arc<KeyRecord>, Error> {
    state
        .registry
        .get(key_id)
        .ok_or_else(|| Error::new(Reason::NotFound, format!("no key keys/{key_id}")))
}

fn registry_failure(error: custody_core::registry::RegistryError) -> Error {
    tracing::error!(%error, "registry write failed");
    Error::new(
        Reason::RegistryUnavailable,
        "the key registry cannot be written",
    )
}

/// The HSM label of a key version: `key/{key_id}/v{version}`. The `key/`
/// namespace is custody's own for registry keys: no other object custody
/// makes (the audit key is `custody-audit/v1`) can share a label with one.
pub fn hsm_label(key_id: &str, version: u32) -> Result<KeyLabel, Error> {
    KeyLabel::for_version(&format!("key/{key_id}"), version)
        .map_err(|e| Error::new(Reason::BadKeyId, e.to_string()))
}

/// Backup-exportable keys may be wrapped under a trusted KEK only.
fn exportability(backup_exportable: bool) -> Exportability {
    if backup_exportable {
        Exportability::BackupWrapOnly
    } else {
        Exportability::NonExportable
    }
}

/// Generates version `version` of `key_id` in the HSM, journaled: the
/// pending entry is durable before the HSM call, and is dropped again if the
/// call fails. The caller holds the registry lock and commits the version
/// with [`commit_version`].
///
/// A label in custody's `key/` namespace that is neither registered nor
/// pending (the caller checked) is a leftover of a generation that failed to
/// clean up; it is destroyed and the key made again.
async fn generate_version(
    state: &Custody,
    key_id: &str,
    algorithm: KeyAlgorithm,
    export: Exportability,
    version: u32,
    trigger: &'static str,
) -> Result<VersionRecord, Error> {
    let label = hsm_label(key_id, version)?;
    let now = state.clock.now_ms();
    failpoint::hit("version.before_journal");
    state
        .registry
        .begin_version(&PendingVersion {
            key_id: key_id.into(),
            version,
            hsm_label: label.as_str().into(),
            trigger: trigger.into(),
            started_ms: now,
        })
        .await
        .map_err(registry_failure)?;
    failpoint::hit("version.after_journal");
    let spec = algorithm.key_spec();
    let run_label = label.clone();
    let generated = state
        .hsm
        .run(move |session| {
            let generate = |session: &mut hsm_shim::HsmSession| {
                if spec.is_key_pair() {
                    session.generate_key_pair(&run_label, spec, export)
                } else {
                    session.generate_aes_key(&run_label, AesRole::DataEncryption, export)
                }
            };
            match generate(session) {
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    tracing::warn!(label = %run_label, "removing an orphaned HSM key left by an interrupted generation");
                    session.destroy(&run_label)?;
                    generate(session)
                }
                other => other,
            }
        })
        .await;
    let info = match generated {
        Ok(info) => info,
        Err(error) => {
            if let Err(e) = state.registry.abandon_version(label.as_str()).await {
                tracing::error!(%e, %label, "could not drop the journal entry of a failed generation; it is rolled back at the next start");
            }
            return Err(error.into());
        }
    };
    failpoint::hit("version.after_generate");
    let (public_key_der_hex, public_key_pem) = match &info.public_key {
        Some(public_key) => (hex::encode(public_key.spki_der()), public_key.to_pem()?),
        None => (String::new(), String::new()),
    };
    Ok(VersionRecord {
        version,
        state: VersionState::Active,
        created_ms: now,
        state_ms: now,
        hsm_label: label.as_str().to_string(),
        public_key_der_hex,
        public_key_pem,
        activated_ms: Some(now),
        destroy_at_ms: None,
        legal_hold: None,
        check_value: info.check_value.map(|k| k.to_string()).unwrap_or_default(),
    })
}

/// Commits `record`, which holds the version labelled `label` that
/// [`generate_version`] made, and clears its journal entry, atomically. If
/// nothing was written, the version is rolled back (its HSM objects
/// destroyed), or left to the roll-back at the next start; if it was written
/// but not flushed, it stands and the caller is told the registry failed.
async fn commit_version(state: &Custody, record: KeyRecord, label: &str) -> Result<(), Error> {
    match state.registry.commit_version(record, label).await {
        Ok(()) => {
            failpoint::hit("version.after_commit");
            Ok(())
        }
        Err(CommitError::NotApplied(error)) => {
            let error = registry_failure(error);
            roll_back_version(state, label).await;
            Err(error)
        }
        Err(CommitError::NotDurable(error)) => Err(registry_failure(error)),
    }
}

/// Destroys what the HSM holds under an uncommitted version's label and
/// drops its journal entry; logs what it could not do (the next start
/// retries). Returns how many objects it destroyed.
pub(crate) async fn roll_back_version(state: &Custody, label: &str) -> Option<usize> {
    let Ok(hsm_label) = KeyLabel::new(label.to_string()) else {
        return None;
    };
    let destroyed = state
        .hsm
        .run(move |session| match session.destroy(&hsm_label) {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
            other => other,
        })
        .await;
    match destroyed {
        Ok(count) => match state.registry.abandon_version(label).await {
            Ok(()) => Some(count),
            Err(error) => {
                tracing::error!(%error, label, "could not drop a rolled-back journal entry");
                None
            }
        },
        Err(error) => {
            tracing::error!(%error, label, "could not destroy an uncommitted version; retrying at the next start");
            None
        }
    }
}

/// Checks a rotation request id: 1-64 of `[A-Za-z0-9._:-]`.
fn check_request_id(request_id: &str) -> Result<(), Error> {
    let valid = !request_id.is_empty()
        && request_id.len() <= 64
        && request_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(Error::new(
            Reason::BadRequestId,
            "request_id must be 1-64 of A-Z a-z 0-9 . _ : -",
        ))
    }
}

/// What started a rotation (a metric label and the journal's trigger).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// RotateKey.
    Demand,
    /// An approved ROTATE operation.
    Approved,
    /// The scheduler (cryptoperiod or nonce budget).
    Schedule,
    /// The primary version was marked compromised.
    Compromise,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Demand => "demand",
            Trigger::Approved => "approved",
            Trigger::Schedule => "schedule",
            Trigger::Compromise => "compromise",
        }
    }
}

/// Rotates `current` (the caller holds the registry lock and checked
/// policy): a new version, journaled, made primary in one commit.
async fn rotate_locked(
    state: &Custody,
    audited: &mut Audited,
    current: &KeyRecord,
    request_id: Option<&str>,
    trigger: Trigger,
) -> Result<KeyRecord, Error> {
    if let Some(id) = request_id
        && let Some(earlier) = current
            .rotation_requests
            .iter()
            .find(|r| r.request_id == id)
    {
        audited.detail = format!(
            "request id {id} already rotated to version {}; nothing done",
            earlier.version
        );
        metrics::rotation(trigger.as_str(), "replayed");
        return Ok(current.clone());
    }
    let algorithm = algorithm_of(current)?;
    let next = current
        .versions
        .iter()
        .map(|v| v.version)
        .max()
        .unwrap_or(0)
        + 1;
    audited.detail = match request_id {
        Some(id) => format!("new version {next} ({}, request id {id})", trigger.as_str()),
        None => format!("new version {next} ({})", trigger.as_str()),
    };
    audited.intent(state).await?;
    let result = async {
        let version = generate_version(
            state,
            &current.key_id,
            algorithm,
            exportability(current.backup_exportable),
            next,
            trigger.as_str(),
        )
        .await?;
        let label = version.hsm_label.clone();
        let mut record = current.clone();
        record.versions.push(version);
        record.primary_version = next;
        if let Some(id) = request_id {
            record.rotation_requests.push(RotationRequest {
                request_id: id.into(),
                version: next,
            });
            let excess = record
                .rotation_requests
                .len()
                .saturating_sub(REMEMBERED_ROTATIONS);
            record.rotation_requests.drain(..excess);
        }
        commit_version(state, record.clone(), &label).await?;
        Ok(record)
    }
    .await;
    metrics::rotation(
        trigger.as_str(),
        if result.is_ok() { "done" } else { "failed" },
    );
    result
}

/// Finds a version, refusing with NOT_FOUND.
fn version_of(record: &KeyRecord, version: u32) -> Result<&VersionRecord, Error> {
    record.version(version).ok_or_else(|| {
        Error::new(
            Reason::NotFound,
            format!("no version {}", version_name(&record.key_id, version)),
        )
    })
}

/// Finds a version that is not destroyed, refusing with ALREADY_DESTROYED.
fn not_destroyed(record: &KeyRecord, version: u32) -> Result<&VersionRecord, Error> {
    let existing = version_of(record, version)?;
    if existing.state == VersionState::Destroyed {
        return Err(Error::new(
            Reason::AlreadyDestroyed,
            format!(
                "{} is already destroyed",
                version_name(&record.key_id, version)
            ),
        ));
    }
    Ok(existing)
}

/// Applies `change` to version `version` of `current` and writes the record.
async fn update_version(
    state: &Custody,
    current: &KeyRecord,
    version: u32,
    change: impl FnOnce(&mut VersionRecord),
) -> Result<KeyRecord, Error> {
    let mut record = current.clone();
    let target = record
        .versions
        .iter_mut()
        .find(|v| v.version == version)
        .ok_or_else(|| Error::new(Reason::NotFound, "version vanished"))?;
    change(target);
    state
        .registry
        .put(record.clone())
        .await
        .map_err(registry_failure)?;
    Ok(record)
}

/// Parses a version name that must name a version.
fn exact_version(name: &str) -> Result<(&str, u32), Error> {
    let (key_id, version) = parse_version_name(name)?;
    let version = version.ok_or_else(|| {
        Error::new(
            Reason::BadName,
            "name a version: keys/{key_id}/versions/{n}",
        )
    })?;
    Ok((key_id, version))
}

const MIN_CRYPTOPERIOD_MS: i64 = 60_000;
const MAX_CRYPTOPERIOD_MS: i64 = 100 * 366 * 24 * 3600 * 1000;

/// A requested cryptoperiod: `None` when unset or zero (no cryptoperiod).
pub(crate) fn cryptoperiod(duration: Option<&prost_types::Duration>) -> Result<Option<i64>, Error> {
    let Some(duration) = duration else {
        return Ok(None);
    };
    if duration.seconds == 0 && duration.nanos == 0 {
        return Ok(None);
    }
    let ms = duration
        .seconds
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(i64::from(duration.nanos / 1_000_000)))
        .filter(|ms| (MIN_CRYPTOPERIOD_MS..=MAX_CRYPTOPERIOD_MS).contains(ms))
        .ok_or_else(|| {
            Error::new(
                Reason::BadCryptoperiod,
                "a cryptoperiod is between 60 seconds and 100 years",
            )
        })?;
    Ok(Some(ms))
}

impl Keys {
    async fn create(
        &self,
        audited: &mut Audited,
        request: &CreateKeyRequest,
    ) -> Result<Key, Error> {
        check_key_id(&request.key_id)?;
        audited.resource = format!("keys/{}", request.key_id);
        let algorithm = crate::wire::algorithm_from_wire(request.algorithm).ok_or_else(|| {
            Error::new(
                Reason::BadAlgorithm,
                format!("unknown or unspecified algorithm {}", request.algorithm),
            )
        })?;
        audited.detail = algorithm.api_name().into();
        if request.purpose != crate::wire::purpose(algorithm.purpose()) as i32 {
            return Err(Error::new(
                Reason::BadPurpose,
                format!(
                    "{} keys have purpose {}",
                    algorithm.api_name(),
                    algorithm.purpose().api_name()
                ),
            ));
        }
        let cryptoperiod_ms = cryptoperiod(request.cryptoperiod.as_ref())?;
        if !self.0.allowed_algorithms.contains(&algorithm) {
            return Err(Error::new(
                Reason::AlgorithmNotAllowed,
                format!("the crypto policy does not allow {}", algorithm.api_name()),
            ));
        }
        if request.allowed_signers.len() > 256 {
            return Err(Error::new(
                Reason::TooManySigners,
                "at most 256 allowed signers",
            ));
        }
        for signer in &request.allowed_signers {
            if !valid_principal_name(signer) {
                return Err(Error::new(
                    Reason::BadPrincipal,
                    format!("invalid principal name {signer:?}"),
                ));
            }
        }
        if request.backup_exportable && algorithm.key_spec() == hsm_shim::KeySpec::Ed25519 {
            return Err(Error::new(
                Reason::NotBackupExportable,
                "SoftHSM2 cannot wrap Ed25519 private keys, so they cannot be backed up",
            ));
        }
        let state = &self.0;
        let _guard = state.registry.lock().await;
        if state.registry.get(&request.key_id).is_some() {
            return Err(Error::new(
                Reason::KeyExists,
                format!("keys/{} already exists", request.key_id),
            ));
        }
        if state
            .ceremonies
            .reserved_key_ids()
            .contains(&request.key_id)
        {
            return Err(Error::new(
                Reason::KeyReserved,
                format!("an open ceremony makes keys/{}", request.key_id),
            ));
        }
        audited.intent(state).await?;
        let export = exportability(request.backup_exportable);
        let first =
            generate_version(state, &request.key_id, algorithm, export, 1, "create").await?;
        let label = first.hsm_label.clone();
        let record = KeyRecord {
            key_id: request.key_id.clone(),
            algorithm: algorithm.api_name().into(),
            allowed_signers: request.allowed_signers.clone(),
            primary_version: 1,
            created_ms: first.created_ms,
            versions: vec![first],
            policies: Default::default(),
            cryptoperiod_ms,
            min_version: 0,
            rotation_requests: Vec::new(),
            backup_exportable: request.backup_exportable,
        };
        commit_version(state, record.clone(), &label).await?;
        Ok(key_message(&record))
    }

    /// Rotates `key_id`; see [`Approval`]. `request_id` makes it idempotent;
    /// with `if_primary`, it rotates only if that is still the primary
    /// version (the scheduler decided on a snapshot taken without the lock).
    pub async fn rotate(
        &self,
        audited: &mut Audited,
        key_id: &str,
        request_id: Option<&str>,
        if_primary: Option<u32>,
        trigger: Trigger,
        approval: Approval,
    ) -> Result<Key, Error> {
        if let Some(id) = request_id {
            check_request_id(id)?;
        }
        let state = &self.0;
        let _guard = state.registry.lock().await;
        let current = found(state, key_id)?;
        ungated(&current, "ROTATE", approval)?;
        if let Some(expected) = if_primary
            && current.primary_version != expected
        {
            audited.detail = format!(
                "version {expected} is no longer primary ({} is); nothing done",
                current.primary_version
            );
            return Ok(key_message(&current));
        }
        let record = rotate_locked(state, audited, &current, request_id, trigger).await?;
        Ok(key_message(&record))
    }

    /// Changes a version's state; see [`Approval`]. Marking the primary
    /// version compromised rotates the key (unless its ROTATE policy needs
    /// officers, who are then asked to) and records a revocation notice.
    pub async fn set_state(
        &self,
        audited: &mut Audited,
        request: &SetKeyVersionStateRequest,
        approval: Approval,
    ) -> Result<KeyVersion, Error> {
        let (key_id, version) = exact_version(&request.name)?;
        let (target, reason) = requested_state(request.state, &request.reason)?;
        audited.detail = format!("to {target:?}");
        let state = &self.0;
        let _guard = state.registry.lock().await;
        let current = found(state, key_id)?;
        ungated(&current, "SET_STATE", approval)?;
        check_transition(&current, version, target)?;
        audited.intent(state).await?;
        let now = state.clock.now_ms();
        let mut record = update_version(state, &current, version, |v| {
            v.state = target;
            v.state_ms = now;
            if target == VersionState::Active && v.activated_ms.is_none() {
                v.activated_ms = Some(now);
            }
        })
        .await?;
        if target == VersionState::Compromised {
            // The notice goes out before anything else can fail or wait (a
            // rotation may take seconds for RSA).
            let compromised = version_of(&record, version)?.clone();
            let rotate = current.primary_version == version;
            let gated = record.policies.contains_key("ROTATE");
            let next = record.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
            let replacement = if rotate && !gated {
                format!("rotating to version {next} now (the scheduler retries if this fails)")
            } else if rotate {
                "the ROTATE policy needs officers: request a ROTATE operation".into()
            } else {
                format!(
                    "not the primary version (primary is {})",
                    record.primary_version
                )
            };
            let public_key_sha256 = hex::decode(&compromised.public_key_der_hex)
                .map(|der| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(der)))
                .unwrap_or_default();
            state
                .audit
                .append(Event::RevocationNotice {
                    version: request.name.clone(),
                    principal: audited.principal.clone(),
                    reason: reason.to_string(),
                    public_key_sha256,
                    check_value: compromised.check_value.clone(),
                    replacement,
                })
                .await
                .map_err(|e| Error::audit_unavailable(&e))?;
            if rotate && !gated {
                let mut rotation = Audited::start("CompromiseRotate");
                rotation.principal = audited.principal.clone();
                rotation.resource = format!("keys/{key_id}");
                let rotated =
                    rotate_locked(state, &mut rotation, &record, None, Trigger::Compromise).await;
                if let Ok(rotated) = rotation.record(state, rotated).await {
                    record = rotated;
                }
            }
        }
        let updated = version_of(&record, version)?;
        Ok(version_message(&record, updated))
    }

    /// Changes a key's cryptoperiod or minimum version; see [`Approval`].
    pub async fn update(
        &self,
        audited: &mut Audited,
        request: &UpdateKeyRequest,
        approval: Approval,
    ) -> Result<Key, Error> {
        let key_id = parse_key_name(&request.name)?;
        let period = match &request.cryptoperiod {
            Some(d) => Some(cryptoperiod(Some(d))?),
            None => None,
        };
        let state = &self.0;
        let _guard = state.registry.lock().await;
        let current = found(state, key_id)?;
        ungated(&current, "UPDATE_KEY", approval)?;
        let mut record = (*current).clone();
        let mut changes = Vec::new();
        if let Some(period) = period {
            record.cryptoperiod_ms = period;
            changes.push(match period {
                Some(ms) => format!("cryptoperiod {} s", ms / 1000),
                None => "no cryptoperiod".into(),
            });
        }
        if let Some(min) = request.min_version {
            if min > record.primary_version {
                return Err(Error::new(
                    Reason::BadMinVersion,
                    format!(
                        "the minimum version cannot pass the primary version {}",
                        record.primary_version
                    ),
                ));
            }
            record.min_version = min;
            changes.push(format!("min version {min}"));
        }
        if changes.is_empty() {
            return Err(Error::new(
                Reason::NothingToUpdate,
                "set cryptoperiod or min_version",
            ));
        }
        audited.detail = changes.join(", ");
        audited.intent(state).await?;
        state
            .registry
            .put(record.clone())
            .await
            .map_err(registry_failure)?;
        Ok(key_message(&record))
    }

    /// Schedules a version's destruction after the cancel window (only
    /// through an approved DESTROY_VERSION operation).
    pub async fn schedule_destroy(
        &self,
        audited: &mut Audited,
        key_id: &str,
        version: u32,
    ) -> Result<KeyVersion, Error> {
        let state = &self.0;
        let _guard = state.registry.lock().await;
        let current = found(state, key_id)?;
        check_destroyable(&current, version)?;
        let at = state.clock.now_ms() + state.lifecycle.destroy_cancel_window_ms();
        audited.detail = format!("destroy at {}", custody_core::audit::rfc3339_ms(at));
        audited.intent(state).await?;
        let record =
            update_version(state, &current, version, |v| v.destroy_at_ms = Some(at)).await?;
        Ok(version_message(&record, version_of(&record, version)?))
    }

    /// Cancels a scheduled destruction.
    async fn cancel_destroy(&self, audited: &mut Audited, name: &str) -> Result<KeyVersion, Error> {
        let (key_id, version) = exact_version(name)?;
        let state = &self.0;
        let _guard = state.registry.lock().await;
        let current = found(state, key_id)?;
        let existing = not_destroyed(&current, version)?;
        if existing.destroy_at_ms.is_none() {
            return Err(Error::new(
                Reason::NotScheduled,
                format!("{name} is not scheduled for destruction"),
            ));
        }
        audited.intent(state).await?;
        let record = update_version(state, &current, version, |v| v.destroy_at_ms = None).await?;
        Ok(version_message(&record, version_of(&record, version)?))
    }

    /// Places a legal hold (cancelling a scheduled destruction).
    async fn set_legal_hold(
        &self,
        audited: &mut Audited,
        request: &SetLegalHoldRequest,
    ) -> Result<KeyVersion, Error> {
        let (key_id, version) = exact_version(&request.name)?;
        let reason = request.reason.trim();
        if reason.is_empty() || reason.len() > 1024 {
            return Err(Error::new(
                Reason::ReasonRequired,
                "a legal hold needs a reason of 1-1024 bytes (a case reference, say)",
            ));
        }
        let state = &self.0;
        let _guard = state.registry.lock().await;
        let current = found(state, key_id)?;
        let existing = not_destroyed(&current, version)?;
        audited.detail = if existing.destroy_at_ms.is_some() {
            format!("hold: {reason}; cancels the scheduled destruction")
        } else {
            format!("hold: {reason}")
        };
        audited.intent(state).await?;
        let record = update_version(state, &current, version, |v| {
            v.legal_hold = Some(reason.to_string());
            v.destroy_at_ms = None;
        })
        .await?;
        Ok(version_message(&record, version_of(&record, version)?))
    }

    /// Releases a legal hold (only through an approved RELEASE_LEGAL_HOLD).
    pub async fn release_legal_hold(
        &self,
        audited: &mut Audited,
        key_id: &str,
        version: u32,
    ) -> Result<KeyVersion, Error> {
        let state = &self.0;
        let _guard = state.registry.lock().await;
        let current = found(state, key_id)?;
        if version_of(&current, version)?.legal_hold.is_none() {
            return Err(Error::new(
                Reason::NoLegalHold,
                format!("{} has no legal hold", version_name(key_id, version)),
            ));
        }
        audited.intent(state).await?;
        let record = update_version(state, &current, version, |v| v.legal_hold = None).await?;
        Ok(version_message(&record, version_of(&record, version)?))
    }

    /// Destroys a version whose cancel window has passed (the scheduler).
    /// Idempotent: an object already gone counts as destroyed, so a crash
    /// between the HSM call and the registry write is finished next time.
    pub async fn destroy_due(
        &self,
        audited: &mut Audited,
        key_id: &str,
        version: u32,
    ) -> Result<KeyVersion, Error> {
        let state = &self.0;
        let _guard = state.registry.lock().await;
        let current = found(state, key_id)?;
        let existing = version_of(&current, version)?;
        let now = state.clock.now_ms();
        let due = existing.destroy_at_ms.is_some_and(|at| at <= now)
            && existing.legal_hold.is_none()
            && existing.state != VersionState::Destroyed;
        if !due {
            return Err(Error::new(
                Reason::NotDue,
                "not scheduled, not yet due, held or already destroyed",
            ));
        }
        // The rules that allowed the schedule must still hold now.
        if !lifecycle::may_schedule_destroy(existing.state) || current.primary_version == version {
            return Err(Error::new(
                Reason::IllegalTransition,
                "the version is in use again (state or primary); cancel the destruction",
            ));
        }
        audited.intent(state).await?;
        let label = KeyLabel::new(existing.hsm_label.clone())?;
        state
            .hsm
            .run(move |session| match session.destroy(&label) {
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
                other => other,
            })
            .await?;
        let record = update_version(state, &current, version, |v| {
            v.state = VersionState::Destroyed;
            v.state_ms = now;
            v.destroy_at_ms = Some(now);
        })
        .await?;
        Ok(version_message(&record, version_of(&record, version)?))
    }
}

/// A requested state and reason, checked on their own: a known state that
/// a request may ask for, and a reason where one is needed.
pub(crate) fn requested_state(state: i32, reason: &str) -> Result<(VersionState, &str), Error> {
    let target = KeyVersionState::try_from(state)
        .ok()
        .and_then(stored_state)
        .ok_or_else(|| {
            Error::new(
                Reason::BadState,
                format!("unknown or unspecified state {state}"),
            )
        })?;
    if target == VersionState::Destroyed {
        return Err(Error::new(
            Reason::IllegalTransition,
            "DESTROYED is reached only through a scheduled destruction: request DESTROY_VERSION",
        ));
    }
    let reason = reason.trim();
    if reason.len() > 1024 {
        return Err(Error::new(
            Reason::BadReason,
            "a reason is at most 1024 bytes",
        ));
    }
    if target == VersionState::Compromised && reason.is_empty() {
        return Err(Error::new(
            Reason::ReasonRequired,
            "say why the version is compromised: it goes into the revocation notice",
        ));
    }
    Ok((target, reason))
}

/// Refuses a state change the lifecycle forbids for `version` of `record`.
pub(crate) fn check_transition(
    record: &KeyRecord,
    version: u32,
    target: VersionState,
) -> Result<(), Error> {
    let existing = version_of(record, version)?;
    if !lifecycle::transition_allowed(existing.state, target) {
        return Err(Error::new(
            Reason::IllegalTransition,
            format!(
                "{} cannot go from {:?} to {target:?}",
                version_name(&record.key_id, version),
                existing.state
            ),
        ));
    }
    if target == VersionState::Deactivated && record.primary_version == version {
        return Err(Error::new(
            Reason::PrimaryVersion,
            "the primary version cannot be deactivated; rotate the key first",
        ));
    }
    Ok(())
}

/// Refuses to schedule the destruction of a version that is in use, held,
/// primary, or already scheduled.
pub(crate) fn check_destroyable(record: &KeyRecord, version: u32) -> Result<(), Error> {
    let existing = version_of(record, version)?;
    let name = version_name(&record.key_id, version);
    if !lifecycle::may_schedule_destroy(existing.state) {
        return Err(Error::new(
            Reason::IllegalTransition,
            format!(
                "{name} is {:?}: only pre-activation, deactivated or compromised versions are destroyed",
                existing.state
            ),
        ));
    }
    if record.primary_version == version {
        return Err(Error::new(
            Reason::PrimaryVersion,
            "the primary version cannot be destroyed; rotate the key first",
        ));
    }
    if existing.legal_hold.is_some() {
        return Err(Error::new(
            Reason::LegalHold,
            format!("{name} is under a legal hold"),
        ));
    }
    if existing.destroy_at_ms.is_some() {
        return Err(Error::new(
            Reason::AlreadyScheduled,
            format!("{name} is already scheduled for destruction"),
        ));
    }
    Ok(())
}

/// Runs a state-changing request that names its resource in `name`: caller,
/// role check, then `$body` with the service, the audit record and the
/// request, to completion in its own task ([`to_completion`]), audited.
macro_rules! state_change {
    ($self:ident, $request:ident, $method:literal, $allowed:ident, |$keys:ident, $audited:ident, $req:ident| $body:block) => {{
        let $keys = Keys($self.0.clone());
        let principal = caller(&$request);
        let $req = $request.into_inner();
        to_completion(async move {
            let mut $audited = Audited::start($method);
            $audited.resource = $req.name.clone();
            let result = async {
                let principal = principal?;
                $audited.principal = principal.name.clone();
                $allowed(&principal)?;
                $body
            }
            .await;
            $audited.finish(&$keys.0, result).await
        })
        .await
    }};
}

fn operator(principal: &Principal) -> Result<(), Error> {
    require(principal, Role::Operator)
}

/// Safety-increasing calls (cancel a destruction, place a legal hold) are
/// open to officers as well as operators.
fn operator_or_officer(principal: &Principal) -> Result<(), Error> {
    if principal.has(Role::Officer) {
        Ok(())
    } else {
        require(principal, Role::Operator)
    }
}

#[tonic::async_trait]
impl KeyService for Keys {
    async fn create_key(
        &self,
        request: Request<CreateKeyRequest>,
    ) -> Result<Response<Key>, Status> {
        let keys = Keys(self.0.clone());
        let principal = caller(&request);
        let request = request.into_inner();
        to_completion(async move {
            let mut audited = Audited::start("CreateKey");
            let result = async {
                let principal = principal?;
                audited.principal = principal.name.clone();
                require(&principal, Role::Operator)?;
                keys.create(&mut audited, &request).await
            }
            .await;
            audited.finish(&keys.0, result).await
        })
        .await
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
                    return Err(Error::new(
                        Reason::BadPageSize,
                        format!("page_size {n} is not within 0-1000"),
                    ));
                }
            };
            let after = if req.page_token.is_empty() {
                None
            } else {
                check_key_id(&req.page_token).map_err(|_| {
                    Error::new(
                        Reason::BadPageToken,
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
                Error::new(
                    Reason::NotFound,
                    format!("no version {}", version_name(key_id, number)),
                )
            })?;
            if version.public_key_pem.is_empty() {
                return Err(Error::new(
                    Reason::NoPublicKey,
                    format!("keys/{key_id} is a secret (AES) key and has no public key"),
                ));
            }
            let algorithm = KeyAlgorithm::from_api_name(&record.algorithm)
                .map_or(0, |a| crate::wire::algorithm(a) as i32);
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
        state_change!(
            self,
            request,
            "RotateKey",
            operator,
            |keys, audited, request| {
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
                keys.rotate(
                    &mut audited,
                    key_id,
                    request_id,
                    None,
                    Trigger::Demand,
                    Approval::None,
                )
                .await
            }
        )
    }

    async fn set_key_version_state(
        &self,
        request: Request<SetKeyVersionStateRequest>,
    ) -> Result<Response<KeyVersion>, Status> {
        state_change!(
            self,
            request,
            "SetKeyVersionState",
            operator,
            |keys, audited, request| {
                keys.set_state(&mut audited, &request, Approval::None).await
            }
        )
    }

    async fn update_key(
        &self,
        request: Request<UpdateKeyRequest>,
    ) -> Result<Response<Key>, Status> {
        state_change!(
            self,
            request,
            "UpdateKey",
            operator,
            |keys, audited, request| { keys.update(&mut audited, &request, Approval::None).await }
        )
    }

    async fn cancel_destroy(
        &self,
        request: Request<VersionRef>,
    ) -> Result<Response<KeyVersion>, Status> {
        state_change!(
            self,
            request,
            "CancelDestroy",
            operator_or_officer,
            |keys, audited, request| {
                Keys::cancel_destroy(&keys, &mut audited, &request.name).await
            }
        )
    }

    async fn set_legal_hold(
        &self,
        request: Request<SetLegalHoldRequest>,
    ) -> Result<Response<KeyVersion>, Status> {
        state_change!(
            self,
            request,
            "SetLegalHold",
            operator_or_officer,
            |keys, audited, request| { Keys::set_legal_hold(&keys, &mut audited, &request).await }
        )
    }

    async fn check_drift(
        &self,
        request: Request<CheckDriftRequest>,
    ) -> Result<Response<DriftReport>, Status> {
        let mut audited = Audited::start("CheckDrift");
        let result = async {
            let principal = caller(&request)?;
            audited.principal = principal.name.clone();
            if !principal.has(Role::Auditor) {
                require(&principal, Role::Operator)?;
            }
            let report = {
                let _guard = self.0.registry.lock().await;
                drift::check(&self.0).await.map_err(|e| {
                    metrics::drift_failed();
                    Error::new(Reason::HsmUnavailable, e)
                })?
            };
            audited.detail = format!(
                "{} findings over {} objects and {} versions",
                report.findings.len(),
                report.objects_checked,
                report.versions_checked
            );
            Ok(drift_report_message(&report, self.0.clock.now_ms()))
        }
        .await;
        audited.finish(&self.0, result).await.map(Response::new)
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
