//! Asking for an operation: what is asked ([`Requested`]) is checked exactly
//! as the direct call would check it, turned into the [`Spec`] that is
//! stored and signed, and paired with the quorum that must approve it. The
//! request is audited before the operation exists.

use crate::action::Audited;
use crate::authz::{Action, admin_quorum, authorize, policy_change_quorum};
use crate::dual_control::operation::{
    KEY_POLICY_KINDS, OperationRecord, OperationState, Spec, policy_kind_applies,
};
use crate::dual_control::quorum::{Ballot, Quorum};
use crate::dual_control::store::{WriteError, check_officer};
use crate::identity::Principal;
use crate::keys::destroy::check_destroyable;
use crate::keys::state::{check_transition, requested_state};
use crate::keys::{KeyUpdate, algorithm_of, found};
use crate::registry::VersionState;
use crate::signing::{SignRequest, check_sign_operation};
use crate::{Custody, Error, Reason};

/// An operation someone asks the officers to approve.
#[derive(Debug, Clone)]
pub enum Requested {
    /// Sign a digest with a key whose SIGN policy needs officers.
    Sign(SignRequest),
    /// Rotate `key_id`.
    Rotate {
        /// The key.
        key_id: String,
    },
    /// Change a version's state.
    SetState {
        /// The key.
        key_id: String,
        /// The version.
        version: u32,
        /// The state asked for.
        state: VersionState,
        /// Why (needed for COMPROMISED).
        reason: String,
    },
    /// Set or clear (`required == 0`) a key's policy for one kind.
    SetPolicy {
        /// The key.
        key_id: String,
        /// The operation kind governed (`SIGN`, `ROTATE`, …).
        operation: String,
        /// Officers who may approve.
        officers: Vec<String>,
        /// How many must.
        required: u32,
    },
    /// Enroll an officer.
    AddOfficer {
        /// Officer id.
        officer_id: String,
        /// The certificate principal the officer acts as.
        principal: String,
        /// The officer's Ed25519 public key.
        public_key: Vec<u8>,
    },
    /// Remove an officer.
    RemoveOfficer {
        /// Officer id.
        officer_id: String,
    },
    /// Schedule a version's destruction.
    DestroyVersion {
        /// The key.
        key_id: String,
        /// The version.
        version: u32,
    },
    /// Release a version's legal hold.
    ReleaseLegalHold {
        /// The key.
        key_id: String,
        /// The version.
        version: u32,
    },
    /// Change a key's cryptoperiod or minimum version.
    UpdateKey {
        /// The key.
        key_id: String,
        /// The change.
        update: KeyUpdate,
    },
    /// Make a backup bundle of every backup-exportable key version under
    /// the current backup KEK (`backup_kek_set_id`, if not empty, must be
    /// it).
    CreateBackup {
        /// The backup KEK's share set id the requester expects, or empty.
        backup_kek_set_id: String,
    },
    /// Make the backup KEK the KEK ceremony `ceremony` made the current
    /// one.
    ActivateBackupKek {
        /// The ceremony id.
        ceremony: String,
    },
    /// Decrypt a ciphertext with a key whose DECRYPT policy needs officers,
    /// releasing the plaintext sealed to `recipient`.
    Decrypt {
        /// `keys/{key_id}`.
        name: String,
        /// The ciphertext.
        ciphertext: Vec<u8>,
        /// Its associated data.
        associated_data: Vec<u8>,
        /// The Ed25519 public key the plaintext is sealed to.
        recipient: Vec<u8>,
    },
}

impl Requested {
    /// What roles decide about asking for it (a SIGN's requester is checked
    /// as a signer on the key's allow-list, as `Sign` would).
    pub fn action(&self) -> Action {
        match self {
            Requested::Sign(_) => Action::Sign,
            Requested::Decrypt { .. } => Action::UseEnvelopeKeys,
            Requested::Rotate { .. } | Requested::SetState { .. } | Requested::UpdateKey { .. } => {
                Action::RequestKeyChange
            }
            Requested::SetPolicy { .. }
            | Requested::AddOfficer { .. }
            | Requested::RemoveOfficer { .. }
            | Requested::DestroyVersion { .. }
            | Requested::ReleaseLegalHold { .. } => Action::RequestControlChange,
            Requested::CreateBackup { .. } | Requested::ActivateBackupKek { .. } => {
                Action::Ceremony
            }
        }
    }
}

fn random_hex() -> Result<String, Error> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).map_err(|_| Error::internal("no randomness"))?;
    Ok(hex::encode(bytes))
}

/// The operation store could not be written.
pub(crate) fn store_failure(error: impl Into<WriteError>) -> Error {
    let error = error.into();
    tracing::error!(%error, "dual-control store");
    if let WriteError::Stale(stale) = error {
        return Error::new(Reason::StoreUnavailable, stale.to_string());
    }
    Error::new(
        Reason::StoreUnavailable,
        "the operation store cannot be written",
    )
}

/// Refuses a recipient the plaintext could not be sealed to safely: not an
/// Ed25519 public key (sealed to no one, or to a point with no private
/// key), or one of small order (sealed so that anyone can open it).
fn check_recipient(recipient: &[u8]) -> Result<(), Error> {
    crate::dual_control::sealed::recipient_point(recipient)
        .map(drop)
        .map_err(|why| {
            Error::new(
                Reason::BadRecipient,
                format!("recipient_public_key must be an Ed25519 public key that can be sealed to: {why}"),
            )
        })
}

/// A key's own policy for `kind`, or NO_POLICY (call the direct RPC).
fn key_policy(custody: &Custody, key_id: &str, kind: &str) -> Result<Quorum, Error> {
    let record = found(custody, key_id)?;
    record.policies.get(kind).cloned().ok_or_else(|| {
        Error::new(
            Reason::NoPolicy,
            format!("keys/{key_id} has no {kind} policy: call the direct RPC instead"),
        )
    })
}

/// Turns a requested operation into what will be stored, and the quorum that
/// must approve it. Every check that the direct call would make is made
/// here, so an approved operation fails only if the world changed.
pub fn resolve(
    custody: &Custody,
    principal: &Principal,
    requested: &Requested,
) -> Result<(Spec, Quorum), Error> {
    if !matches!(requested, Requested::Sign(_) | Requested::Decrypt { .. }) {
        authorize(principal, requested.action())?;
    }
    match requested {
        Requested::Sign(request) => {
            let checked = check_sign_operation(custody, principal, request)?;
            let quorum = key_policy(custody, &checked.key_id, "SIGN")?;
            Ok((
                Spec::Sign {
                    key_id: checked.key_id,
                    version: checked.version,
                    hash: checked.hash,
                    digest: checked.digest,
                    encoding: checked.encoding,
                },
                quorum,
            ))
        }
        Requested::Rotate { key_id } => {
            let quorum = key_policy(custody, key_id, "ROTATE")?;
            Ok((
                Spec::Rotate {
                    key_id: key_id.clone(),
                },
                quorum,
            ))
        }
        Requested::SetState {
            key_id,
            version,
            state,
            reason,
        } => {
            let reason = requested_state(*state, reason)?;
            let record = found(custody, key_id)?;
            check_transition(&record, *version, *state)?;
            let quorum =
                crate::authz::state_change_quorum(&record, *version, *state)?.ok_or_else(|| {
                    Error::new(
                        Reason::NoPolicy,
                        format!(
                            "keys/{key_id} has no SET_STATE policy: call the direct RPC instead"
                        ),
                    )
                })?;
            Ok((
                Spec::SetState {
                    key_id: key_id.clone(),
                    version: *version,
                    state: state.api_name().into(),
                    reason: reason.to_string(),
                },
                quorum,
            ))
        }
        Requested::SetPolicy {
            key_id,
            operation,
            officers,
            required,
        } => {
            let record = found(custody, key_id)?;
            let purpose = algorithm_of(&record)?.purpose();
            // Removing a policy the key carries is always possible (a key
            // made before this rule may carry one that never applied).
            let removal = *required == 0 && record.policies.contains_key(operation);
            if !policy_kind_applies(operation, purpose) && !removal {
                let kinds: Vec<&str> = KEY_POLICY_KINDS
                    .into_iter()
                    .filter(|kind| policy_kind_applies(kind, purpose))
                    .collect();
                return Err(Error::new(
                    Reason::BadPolicy,
                    format!(
                        "keys/{key_id} is a {} key: its policies govern {}, not {operation:?}",
                        purpose.api_name(),
                        kinds.join(", ")
                    ),
                ));
            }
            if *required > 0 {
                Quorum::new(officers.iter().cloned(), *required)
                    .map_err(|e| Error::new(Reason::BadPolicy, e))?;
                if let Some(unknown) = officers.iter().find(|o| !custody.dual_control.enrolled(o)) {
                    return Err(Error::new(
                        Reason::BadPolicy,
                        format!("{} is not an enrolled officer", crate::text::echo(unknown)),
                    ));
                }
            }
            let quorum = policy_change_quorum(custody, &record, operation)?;
            let mut officers = officers.clone();
            officers.sort();
            Ok((
                Spec::SetPolicy {
                    key_id: key_id.clone(),
                    operation: operation.clone(),
                    officers,
                    required: *required,
                },
                quorum,
            ))
        }
        Requested::AddOfficer {
            officer_id,
            principal: officer_principal,
            public_key,
        } => {
            let public_key = hex::encode(public_key);
            check_officer(officer_id, officer_principal, &public_key)
                .map_err(|e| Error::new(Reason::BadOfficer, e))?;
            if custody.dual_control.officer(officer_id).is_some()
                || custody
                    .dual_control
                    .officer_for_principal(officer_principal)
                    .is_some()
            {
                return Err(Error::new(
                    Reason::OfficerExists,
                    "that officer id or principal is already enrolled",
                ));
            }
            super::execute::enrollment_takes_no_policy_place(custody, officer_id)?;
            Ok((
                Spec::AddOfficer {
                    officer_id: officer_id.clone(),
                    principal: officer_principal.clone(),
                    public_key,
                },
                admin_quorum(custody)?,
            ))
        }
        Requested::RemoveOfficer { officer_id } => {
            if !custody.dual_control.enrolled(officer_id) {
                return Err(Error::new(
                    Reason::NotFound,
                    format!("no officer {}", crate::text::echo(officer_id)),
                ));
            }
            if custody.dual_control.officers().len() as u32 <= custody.dual_control.admin_required()
            {
                return Err(Error::new(
                    Reason::OfficerRemovalRefused,
                    "removing an officer would leave fewer officers than the administrative quorum needs",
                ));
            }
            super::execute::removal_keeps_policies_possible(custody, officer_id)?;
            Ok((
                Spec::RemoveOfficer {
                    officer_id: officer_id.clone(),
                },
                admin_quorum(custody)?,
            ))
        }
        Requested::DestroyVersion { key_id, version }
        | Requested::ReleaseLegalHold { key_id, version } => {
            let record = found(custody, key_id)?;
            let spec = if matches!(requested, Requested::DestroyVersion { .. }) {
                check_destroyable(&record, *version)?;
                Spec::DestroyVersion {
                    key_id: key_id.clone(),
                    version: *version,
                }
            } else {
                let name = crate::names::version_name(key_id, *version);
                match record.version(*version).map(|v| v.legal_hold.is_some()) {
                    None => {
                        return Err(Error::new(Reason::NotFound, format!("no version {name}")));
                    }
                    Some(false) => {
                        return Err(Error::new(
                            Reason::NoLegalHold,
                            format!("{name} has no legal hold"),
                        ));
                    }
                    Some(true) => Spec::ReleaseLegalHold {
                        key_id: key_id.clone(),
                        version: *version,
                    },
                }
            };
            let quorum = match record.policies.get(spec.kind()) {
                Some(quorum) => quorum.clone(),
                None => admin_quorum(custody)?,
            };
            Ok((spec, quorum))
        }
        Requested::UpdateKey { key_id, update } => {
            update.check()?;
            let quorum = key_policy(custody, key_id, "UPDATE_KEY")?;
            Ok((
                Spec::UpdateKey {
                    key_id: key_id.clone(),
                    cryptoperiod_secs: update
                        .cryptoperiod_ms
                        .map(|period| period.map_or(0, |ms| ms / 1000)),
                    min_version: update.min_version,
                },
                quorum,
            ))
        }
        Requested::Decrypt {
            name,
            ciphertext,
            associated_data,
            recipient,
        } => {
            let (key_id, version) = crate::envelope::check_decrypt_operation(
                custody,
                principal,
                name,
                ciphertext,
                associated_data,
            )?;
            check_recipient(recipient)?;
            let quorum = key_policy(custody, &key_id, "DECRYPT")?;
            Ok((
                Spec::Decrypt {
                    key_id,
                    version,
                    ciphertext: hex::encode(ciphertext),
                    associated_data: hex::encode(associated_data),
                    recipient: hex::encode(recipient),
                },
                quorum,
            ))
        }
        Requested::CreateBackup { backup_kek_set_id } => {
            let (current, versions) = crate::ceremonies::export::backup_scope(custody)?;
            if !backup_kek_set_id.is_empty() && *backup_kek_set_id != current {
                return Err(Error::new(
                    Reason::PolicyChanged,
                    format!(
                        "the current backup KEK is set {current}, not {}",
                        crate::text::echo(backup_kek_set_id)
                    ),
                ));
            }
            Ok((
                Spec::CreateBackup {
                    backup_kek_set_id: current,
                    versions,
                },
                admin_quorum(custody)?,
            ))
        }
        Requested::ActivateBackupKek { ceremony } => Ok((
            crate::ceremonies::export::activation_of(custody, ceremony)?,
            admin_quorum(custody)?,
        )),
    }
}

/// Records a new operation waiting for approvals: checked and resolved
/// ([`resolve`]), audited before it exists, stored and flushed.
pub async fn request(
    custody: &Custody,
    audited: &mut Audited,
    principal: &Principal,
    requested: &Requested,
) -> Result<OperationRecord, Error> {
    let (spec, quorum) = resolve(custody, principal, requested)?;
    let now = custody.clock.now_ms();
    let mut record = OperationRecord {
        id: random_hex()?,
        spec,
        requester: principal.name.clone(),
        requester_officer: custody
            .dual_control
            .officer_for_principal(&principal.name)
            .map(|o| o.officer_id),
        nonce: random_hex()?,
        created_ms: now,
        expires_ms: now + custody.approval_ttl_ms,
        quorum,
        digest: String::new(),
        ballot: Ballot::default(),
        state: OperationState::Pending,
        outcome: None,
        error: None,
        finished_ms: None,
    };
    record.digest = hex::encode(record.compute_digest());
    audited.resource = record.name();
    audited.detail = format!(
        "{} | digest {} | quorum {}",
        record.spec.describe(),
        record.digest,
        quorum_text(&record.quorum)
    );
    // The cap is checked and the operation stored under one hold of the
    // store lock, so concurrent requests cannot all slip under it.
    let _guard = custody.dual_control.lock().await.map_err(store_failure)?;
    check_pending_cap(custody, &record.requester, now)?;
    // The request is recorded before the operation exists.
    audited.intent(custody).await?;
    custody
        .dual_control
        .put_operation(&record)
        .await
        .map_err(store_failure)?;
    Ok(record)
}

/// Refuses a request from `requester` once `max_pending_per_requester` of
/// their operations are pending (R2), saying when the first of them
/// expires. Others' requests are unaffected. Hold the store lock.
fn check_pending_cap(custody: &Custody, requester: &str, now: i64) -> Result<(), Error> {
    let cap = custody.limits.max_pending_per_requester;
    let (pending, first_expiry) = custody
        .dual_control
        .pending_of(requester)
        .map_err(store_failure)?;
    if pending < cap {
        return Ok(());
    }
    let wait_ms = first_expiry.map_or(1000, |at| at.saturating_sub(now).max(1000));
    Err(Error::new(
        Reason::TooManyPending,
        format!(
            "{requester} has {pending} operations waiting for approval, the most one requester may have (max_pending_per_requester {cap}): try again once one is decided or expires"
        ),
    )
    .retry_after(std::time::Duration::from_millis(
        u64::try_from(wait_ms).unwrap_or(1000),
    )))
}

/// `M of a, b, c`.
pub fn quorum_text(quorum: &Quorum) -> String {
    quorum.text()
}

/// `operations/{id}`: the id (32 hex digits).
pub fn parse_operation_name(name: &str) -> Result<&str, Error> {
    name.strip_prefix("operations/")
        .filter(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| {
            Error::new(
                Reason::BadName,
                format!(
                    "{} is not of the form operations/{{id}}",
                    crate::text::echo(name)
                ),
            )
        })
}
