//! What an officer is asked to sign, rebuilt from the operation's
//! structure and checked against custodyd's digest (threat model R1).
//!
//! custodyctl never shows an officer custodyd's prose (`Operation.rendering`)
//! and never signs custodyd's digest on trust. [`verify_operation`] turns the
//! structured fields of an `Operation` message (name, spec, requester,
//! times, nonce, quorum) back into the domain's [`Terms`], renders them with
//! the domain's own words, recomputes the canonical digest from them, and
//! refuses unless it is exactly the digest custodyd handed out. So the text
//! an officer reads and the digest they sign are made from the same terms:
//! a custodyd that shows one operation and hands out another's digest is
//! caught before anything is signed.

use custody_core::dual_control::operation::{BackedUpVersion, Spec, Terms};
use custody_core::dual_control::quorum::Quorum;
use custody_core::names::{parse_exact_version, parse_key_name};
use custody_proto::v1::{
    KeyVersionState, Operation, OperationKind, OperationSpec, SignatureEncoding, digest,
    operation_spec,
};

/// An operation that passed review: what to show and what to sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    /// `operations/{id}`.
    pub name: String,
    /// The digest to sign, recomputed here (and equal to custodyd's).
    pub digest: [u8; 32],
    /// What the officer reads, rendered here from the structure.
    pub rendering: String,
}

/// Rebuilds `operation`'s terms from its structure, renders them, and
/// recomputes its digest; `Err` says why an officer must not sign it (a
/// field that does not read back, free text with hidden characters, or a
/// digest that is not the operation's).
pub fn verify_operation(operation: &Operation) -> Result<Reviewed, String> {
    let id = operation
        .name
        .strip_prefix("operations/")
        .filter(|id| !id.is_empty())
        .ok_or("the operation has no name of the form operations/{id}")?;
    let spec = spec_of(
        operation
            .spec
            .as_ref()
            .ok_or("the operation carries no spec")?,
    )?;
    for (what, text) in [
        ("the operation's id", id),
        ("the requester", operation.requester.as_str()),
        ("the nonce", operation.nonce.as_str()),
    ]
    .into_iter()
    .chain(spec.free_text().map(|text| ("the reason", text)))
    .chain(
        operation
            .eligible_officers
            .iter()
            .map(|o| ("an eligible officer", o.as_str())),
    ) {
        if let Some(c) = custody_core::text::first_hidden(text) {
            return Err(format!(
                "{what} holds U+{:04X}, a character that would change what you see; do not approve it",
                c as u32
            ));
        }
    }
    let quorum = Quorum {
        members: operation.eligible_officers.iter().cloned().collect(),
        required: operation.required,
    };
    let terms = Terms {
        id,
        spec: &spec,
        requester: &operation.requester,
        created_ms: millis(operation.create_time.as_ref(), "create_time")?,
        expires_ms: millis(operation.expire_time.as_ref(), "expire_time")?,
        nonce: &operation.nonce,
        quorum: &quorum,
    };
    let digest = terms.digest();
    if digest.as_slice() != operation.digest.as_slice() {
        return Err(format!(
            "custodyd's digest for {} ({}) is not the digest of the operation it shows ({}): \
             do not approve it, and report custodyd",
            operation.name,
            hex::encode(&operation.digest),
            hex::encode(digest)
        ));
    }
    Ok(Reviewed {
        name: operation.name.clone(),
        digest,
        rendering: terms.rendering(),
    })
}

/// Unix milliseconds of a timestamp that must be set.
fn millis(time: Option<&prost_types::Timestamp>, field: &str) -> Result<i64, String> {
    let time = time.ok_or_else(|| format!("the operation has no {field}"))?;
    if !(0..1_000_000_000).contains(&time.nanos) {
        return Err(format!("the operation's {field} is malformed"));
    }
    time.seconds
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(i64::from(time.nanos / 1_000_000)))
        .ok_or_else(|| format!("the operation's {field} is out of range"))
}

/// The domain spec a message shows: the exact inverse of what custodyd
/// sends for a stored spec (`service::operations`), so that anything else
/// either fails here or changes the digest.
pub fn spec_of(message: &OperationSpec) -> Result<Spec, String> {
    let spec = message
        .spec
        .as_ref()
        .ok_or("the operation carries no spec")?;
    let version = |name: &str| {
        parse_exact_version(name)
            .map(|(key, version)| (key.to_string(), version))
            .map_err(|e| e.message)
    };
    let key = |name: &str| {
        parse_key_name(name)
            .map(str::to_string)
            .map_err(|e| e.message)
    };
    Ok(match spec {
        operation_spec::Spec::Sign(sign) => {
            let (key_id, version) = version(&sign.name)?;
            let (hash, bytes) = match sign.digest.as_ref().and_then(|d| d.digest.as_ref()) {
                Some(digest::Digest::Sha256(bytes)) => ("sha256", bytes),
                Some(digest::Digest::Sha384(bytes)) => ("sha384", bytes),
                Some(digest::Digest::Sha512(bytes)) => ("sha512", bytes),
                None => return Err("the SIGN operation shows no digest".into()),
            };
            let encoding = match SignatureEncoding::try_from(sign.encoding) {
                Ok(SignatureEncoding::Der) => "der",
                Ok(SignatureEncoding::Raw) => "raw",
                _ => return Err("the SIGN operation shows no signature encoding".into()),
            };
            Spec::Sign {
                key_id,
                version,
                hash: hash.into(),
                digest: hex::encode(bytes),
                encoding: encoding.into(),
            }
        }
        operation_spec::Spec::Rotate(target) => Spec::Rotate {
            key_id: key(&target.name)?,
        },
        operation_spec::Spec::SetState(set) => {
            let (key_id, version) = version(&set.name)?;
            let state = KeyVersionState::try_from(set.state)
                .ok()
                .filter(|s| *s != KeyVersionState::Unspecified)
                .ok_or("the SET_STATE operation shows no state")?;
            Spec::SetState {
                key_id,
                version,
                state: state.as_str_name().into(),
                reason: set.reason.clone(),
            }
        }
        operation_spec::Spec::SetPolicy(set) => {
            let operation = OperationKind::try_from(set.operation)
                .ok()
                .filter(|k| *k != OperationKind::Unspecified)
                .ok_or("the SET_POLICY operation shows no operation kind")?;
            Spec::SetPolicy {
                key_id: key(&set.name)?,
                operation: operation.as_str_name().into(),
                officers: set.officers.clone(),
                required: set.required,
            }
        }
        operation_spec::Spec::AddOfficer(officer) => Spec::AddOfficer {
            officer_id: officer.officer_id.clone(),
            principal: officer.principal.clone(),
            public_key: hex::encode(&officer.public_key),
        },
        operation_spec::Spec::RemoveOfficer(officer) => {
            if !officer.principal.is_empty() || !officer.public_key.is_empty() {
                return Err("the REMOVE_OFFICER operation shows more than an officer id".into());
            }
            Spec::RemoveOfficer {
                officer_id: officer.officer_id.clone(),
            }
        }
        operation_spec::Spec::DestroyVersion(target) => {
            let (key_id, version) = version(&target.name)?;
            Spec::DestroyVersion { key_id, version }
        }
        operation_spec::Spec::ReleaseLegalHold(target) => {
            let (key_id, version) = version(&target.name)?;
            Spec::ReleaseLegalHold { key_id, version }
        }
        operation_spec::Spec::UpdateKey(update) => Spec::UpdateKey {
            key_id: key(&update.name)?,
            cryptoperiod_secs: match &update.cryptoperiod {
                None => None,
                Some(d) if d.nanos == 0 => Some(d.seconds),
                Some(_) => return Err("the UPDATE_KEY cryptoperiod is not whole seconds".into()),
            },
            min_version: update.min_version,
        },
        operation_spec::Spec::CreateBackup(backup) => Spec::CreateBackup {
            backup_kek_set_id: backup.backup_kek_set_id.clone(),
            versions: backup
                .versions
                .iter()
                .map(|name| {
                    version(name).map(|(key_id, version)| BackedUpVersion { key_id, version })
                })
                .collect::<Result<_, _>>()?,
        },
        operation_spec::Spec::Decrypt(decrypt) => {
            let (key_id, version) = version(&decrypt.name)?;
            Spec::Decrypt {
                key_id,
                version,
                ciphertext: hex::encode(&decrypt.ciphertext),
                associated_data: hex::encode(&decrypt.associated_data),
                recipient: hex::encode(&decrypt.recipient_public_key),
            }
        }
        operation_spec::Spec::ActivateBackupKek(kek) => {
            let count = |n: u32, what: &str| {
                u8::try_from(n)
                    .map_err(|_| format!("the ACTIVATE_BACKUP_KEK {what} is out of range"))
            };
            Spec::ActivateBackupKek {
                ceremony: kek
                    .ceremony
                    .strip_prefix("ceremonies/")
                    .filter(|id| !id.is_empty())
                    .ok_or("the ACTIVATE_BACKUP_KEK operation names no ceremony")?
                    .to_string(),
                set_id: kek.set_id.clone(),
                check_value: kek.check_value.clone(),
                threshold: count(kek.threshold, "threshold")?,
                shares: count(kek.shares, "share count")?,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::operations::spec_message;

    /// One spec of every kind, with every optional part both ways.
    fn every_spec() -> Vec<Spec> {
        vec![
            Spec::Sign {
                key_id: "root".into(),
                version: 2,
                hash: "sha384".into(),
                digest: "ab".repeat(48),
                encoding: "raw".into(),
            },
            Spec::Sign {
                key_id: "root".into(),
                version: 1,
                hash: "sha256".into(),
                digest: "cd".repeat(32),
                encoding: "der".into(),
            },
            Spec::Rotate {
                key_id: "root".into(),
            },
            Spec::Decrypt {
                key_id: "payments-kek".into(),
                version: 2,
                ciphertext: "00ff".repeat(20),
                associated_data: String::new(),
                recipient: "ab".repeat(32),
            },
            Spec::ActivateBackupKek {
                ceremony: "kek-2026".into(),
                set_id: "c3cb7caf".into(),
                check_value: "2135CB".into(),
                threshold: 2,
                shares: 3,
            },
            Spec::SetState {
                key_id: "root".into(),
                version: 3,
                state: "COMPROMISED".into(),
                reason: "leaked in ticket 7".into(),
            },
            Spec::SetState {
                key_id: "root".into(),
                version: 3,
                state: "SUSPENDED".into(),
                reason: String::new(),
            },
            Spec::SetPolicy {
                key_id: "root".into(),
                operation: "SIGN".into(),
                officers: vec!["alice".into(), "bob".into()],
                required: 2,
            },
            Spec::SetPolicy {
                key_id: "root".into(),
                operation: "DESTROY_VERSION".into(),
                officers: vec![],
                required: 0,
            },
            Spec::AddOfficer {
                officer_id: "dave".into(),
                principal: "dave".into(),
                public_key: "0f".repeat(32),
            },
            Spec::RemoveOfficer {
                officer_id: "carol".into(),
            },
            Spec::DestroyVersion {
                key_id: "root".into(),
                version: 1,
            },
            Spec::ReleaseLegalHold {
                key_id: "root".into(),
                version: 1,
            },
            Spec::UpdateKey {
                key_id: "root".into(),
                cryptoperiod_secs: Some(7_776_000),
                min_version: Some(2),
            },
            Spec::UpdateKey {
                key_id: "root".into(),
                cryptoperiod_secs: Some(0),
                min_version: None,
            },
            Spec::UpdateKey {
                key_id: "root".into(),
                cryptoperiod_secs: None,
                min_version: Some(1),
            },
            Spec::CreateBackup {
                backup_kek_set_id: "0a1b2c3d".into(),
                versions: vec![
                    BackedUpVersion {
                        key_id: "root".into(),
                        version: 1,
                    },
                    BackedUpVersion {
                        key_id: "kek".into(),
                        version: 3,
                    },
                ],
            },
        ]
    }

    /// What custodyd sends for a stored spec reads back as that spec: the
    /// digest custodyctl recomputes is the one custodyd computed.
    #[test]
    fn every_kind_of_spec_reads_back_exactly() {
        let specs = every_spec();
        let kinds: std::collections::BTreeSet<&str> = specs.iter().map(Spec::kind).collect();
        let defined = (1..64)
            .filter(|n| custody_proto::v1::OperationKind::try_from(*n).is_ok())
            .count();
        assert_eq!(
            kinds.len(),
            defined,
            "every kind the API defines: {kinds:?}"
        );
        for spec in specs {
            assert_eq!(spec_of(&spec_message(&spec)), Ok(spec.clone()), "{spec:?}");
        }
    }
}
