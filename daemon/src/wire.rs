//! Conversions between domain values and `custody.v1` messages that more
//! than one service (or custodyctl) uses.

use custody_core::algorithms::{KeyAlgorithm, Purpose};
use custody_core::names::version_name;
use custody_core::registry::{KeyRecord, VersionRecord, VersionState};
use custody_core::{Error, Reason};
use custody_proto::v1::{Algorithm, Key, KeyPolicy, KeyPurpose, KeyVersion, KeyVersionState};

/// The wire enum of an algorithm (the same names on both sides).
pub fn algorithm(algorithm: KeyAlgorithm) -> Algorithm {
    Algorithm::from_str_name(algorithm.api_name()).unwrap_or(Algorithm::Unspecified)
}

/// The algorithm of a wire value; `None` for unspecified and unknown values.
pub fn algorithm_from_wire(value: i32) -> Option<KeyAlgorithm> {
    let wire = Algorithm::try_from(value).ok()?;
    KeyAlgorithm::from_api_name(wire.as_str_name())
}

/// The wire enum of a purpose.
pub fn purpose(purpose: Purpose) -> KeyPurpose {
    match purpose {
        Purpose::AsymmetricSign => KeyPurpose::AsymmetricSign,
        Purpose::EncryptDecrypt => KeyPurpose::EncryptDecrypt,
    }
}

/// A protobuf timestamp from Unix milliseconds.
pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// A protobuf duration from milliseconds.
pub fn duration(ms: i64) -> prost_types::Duration {
    let split = timestamp(ms);
    prost_types::Duration {
        seconds: split.seconds,
        nanos: split.nanos,
    }
}

/// A requested cryptoperiod: `None` when unset or zero (no cryptoperiod).
pub fn cryptoperiod(duration: Option<&prost_types::Duration>) -> Result<Option<i64>, Error> {
    match duration {
        None => Ok(None),
        Some(d) => custody_core::keys::state::cryptoperiod_ms(d.seconds, d.nanos),
    }
}

/// The wire form of a version state.
pub fn version_state(state: VersionState) -> KeyVersionState {
    match state {
        VersionState::PreActivation => KeyVersionState::PreActivation,
        VersionState::Active => KeyVersionState::Active,
        VersionState::Suspended => KeyVersionState::Suspended,
        VersionState::Deactivated => KeyVersionState::Deactivated,
        VersionState::Compromised => KeyVersionState::Compromised,
        VersionState::Destroyed => KeyVersionState::Destroyed,
    }
}

/// A version state from the wire; `BAD_STATE` for unspecified and unknown
/// values.
pub fn version_state_from_wire(value: i32) -> Result<VersionState, Error> {
    let state = match KeyVersionState::try_from(value) {
        Ok(KeyVersionState::PreActivation) => VersionState::PreActivation,
        Ok(KeyVersionState::Active) => VersionState::Active,
        Ok(KeyVersionState::Suspended) => VersionState::Suspended,
        Ok(KeyVersionState::Deactivated) => VersionState::Deactivated,
        Ok(KeyVersionState::Compromised) => VersionState::Compromised,
        Ok(KeyVersionState::Destroyed) => VersionState::Destroyed,
        Ok(KeyVersionState::Unspecified) | Err(_) => {
            return Err(Error::new(
                Reason::BadState,
                format!("unknown or unspecified state {value}"),
            ));
        }
    };
    Ok(state)
}

/// The API form of a key.
pub fn key_message(record: &KeyRecord) -> Key {
    let known = KeyAlgorithm::from_api_name(&record.algorithm);
    Key {
        name: format!("keys/{}", record.key_id),
        algorithm: known.map_or(0, |a| algorithm(a) as i32),
        purpose: known.map_or(0, |a| purpose(a.purpose()) as i32),
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

/// The API form of one version of `record`.
pub fn version_message(record: &KeyRecord, version: &VersionRecord) -> KeyVersion {
    KeyVersion {
        name: version_name(&record.key_id, version.version),
        version: version.version,
        state: version_state(version.state) as i32,
        create_time: Some(timestamp(version.created_ms)),
        state_time: Some(timestamp(version.state_ms)),
        activate_time: version.activated_ms.map(timestamp),
        protect_until: version
            .protect_until_ms(record.cryptoperiod_ms)
            .map(timestamp),
        destroy_time: version.destroy_at_ms.map(timestamp),
        legal_hold: version.legal_hold.is_some(),
        check_value: version.check_value.clone(),
        certificate_chain_pem: version.certificate_chain_pem.clone(),
    }
}

/// The API form of version `version` of `record`, which the domain just
/// changed (and so holds it).
pub fn changed_version(record: &KeyRecord, version: u32) -> Result<KeyVersion, Error> {
    custody_core::keys::version_of(record, version).map(|v| version_message(record, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_algorithm_crosses_the_wire_and_back() {
        for a in KeyAlgorithm::ALL {
            assert_ne!(algorithm(a), Algorithm::Unspecified, "{a:?}");
            assert_eq!(algorithm_from_wire(algorithm(a) as i32), Some(a));
            assert_eq!(purpose(a.purpose()).as_str_name(), a.purpose().api_name());
        }
        assert_eq!(algorithm_from_wire(0), None);
        assert_eq!(algorithm_from_wire(999), None);
    }

    #[test]
    fn timestamps_split_milliseconds() {
        let t = timestamp(1_700_000_000_123);
        assert_eq!((t.seconds, t.nanos), (1_700_000_000, 123_000_000));
        let t = timestamp(-1);
        assert_eq!((t.seconds, t.nanos), (-1, 999_000_000));
    }

    #[test]
    fn every_state_crosses_the_wire_and_back() {
        for state in VersionState::ALL {
            assert_eq!(
                version_state_from_wire(version_state(state) as i32).unwrap(),
                state
            );
        }
        assert_eq!(
            version_state_from_wire(0).unwrap_err().reason,
            Reason::BadState
        );
        assert_eq!(
            version_state_from_wire(99).unwrap_err().reason,
            Reason::BadState
        );
    }
}
