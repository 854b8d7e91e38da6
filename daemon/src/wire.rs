//! Conversions between domain values and `custody.v1` messages that more
//! than one service (or custodyctl) uses.

use custody_core::algorithms::{KeyAlgorithm, Purpose};
use custody_proto::v1::{Algorithm, KeyPurpose};

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
}
