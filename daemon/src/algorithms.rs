//! The key algorithms of the API, and what each means at the HSM boundary.
//!
//! An algorithm fixes key type, size, signature scheme and hash at creation
//! (as Cloud KMS does), so a request cannot choose a weaker combination.

use custody_proto::v1::{Algorithm, KeyPurpose};
use hsm_shim::{HashAlg, KeySpec, SignAlgorithm};

/// A supported key algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyAlgorithm(Algorithm);

impl KeyAlgorithm {
    /// Every algorithm custody supports.
    pub const ALL: [KeyAlgorithm; 12] = [
        KeyAlgorithm(Algorithm::EcSignP256Sha256),
        KeyAlgorithm(Algorithm::EcSignP384Sha384),
        KeyAlgorithm(Algorithm::EcSignEd25519),
        KeyAlgorithm(Algorithm::RsaSignPss2048Sha256),
        KeyAlgorithm(Algorithm::RsaSignPss3072Sha256),
        KeyAlgorithm(Algorithm::RsaSignPss4096Sha256),
        KeyAlgorithm(Algorithm::RsaSignPss4096Sha512),
        KeyAlgorithm(Algorithm::RsaSignPkcs12048Sha256),
        KeyAlgorithm(Algorithm::RsaSignPkcs13072Sha256),
        KeyAlgorithm(Algorithm::RsaSignPkcs14096Sha256),
        KeyAlgorithm(Algorithm::RsaSignPkcs14096Sha512),
        KeyAlgorithm(Algorithm::Aes256Gcm),
    ];

    /// From the wire value; `None` for unspecified and unknown values.
    pub fn from_wire(value: i32) -> Option<KeyAlgorithm> {
        let algorithm = Algorithm::try_from(value).ok()?;
        Self::ALL.into_iter().find(|a| a.0 == algorithm)
    }

    /// From its API name, as in the config file.
    pub fn from_api_name(name: &str) -> Option<KeyAlgorithm> {
        Self::ALL.into_iter().find(|a| a.api_name() == name)
    }

    /// The API name, e.g. `EC_SIGN_P256_SHA256`.
    pub fn api_name(self) -> &'static str {
        self.0.as_str_name()
    }

    /// The wire enum.
    pub fn wire(self) -> Algorithm {
        self.0
    }

    /// Whether the default crypto policy allows it. RSA-2048 is below the
    /// 128-bit security level NIST SP 800-57 asks of keys used past 2030.
    pub fn default_allowed(self) -> bool {
        !matches!(
            self.0,
            Algorithm::RsaSignPss2048Sha256 | Algorithm::RsaSignPkcs12048Sha256
        )
    }

    /// The HSM key spec.
    pub fn key_spec(self) -> KeySpec {
        match self.0 {
            Algorithm::EcSignP256Sha256 => KeySpec::EcP256,
            Algorithm::EcSignP384Sha384 => KeySpec::EcP384,
            Algorithm::EcSignEd25519 => KeySpec::Ed25519,
            Algorithm::RsaSignPss2048Sha256 | Algorithm::RsaSignPkcs12048Sha256 => KeySpec::Rsa2048,
            Algorithm::RsaSignPss3072Sha256 | Algorithm::RsaSignPkcs13072Sha256 => KeySpec::Rsa3072,
            Algorithm::Aes256Gcm => KeySpec::Aes256,
            _ => KeySpec::Rsa4096,
        }
    }

    /// What keys of this algorithm are for.
    pub fn purpose(self) -> KeyPurpose {
        match self.0 {
            Algorithm::Aes256Gcm => KeyPurpose::EncryptDecrypt,
            _ => KeyPurpose::AsymmetricSign,
        }
    }

    /// The HSM signature algorithm; `None` for encryption keys.
    pub fn sign_algorithm(self) -> Option<SignAlgorithm> {
        Some(match self.0 {
            Algorithm::EcSignP256Sha256 => SignAlgorithm::EcdsaP256Sha256,
            Algorithm::EcSignP384Sha384 => SignAlgorithm::EcdsaP384Sha384,
            Algorithm::EcSignEd25519 => SignAlgorithm::Ed25519,
            Algorithm::RsaSignPss4096Sha512 => SignAlgorithm::RsaPss(HashAlg::Sha512),
            Algorithm::RsaSignPkcs14096Sha512 => SignAlgorithm::RsaPkcs1v15(HashAlg::Sha512),
            Algorithm::RsaSignPss2048Sha256
            | Algorithm::RsaSignPss3072Sha256
            | Algorithm::RsaSignPss4096Sha256 => SignAlgorithm::RsaPss(HashAlg::Sha256),
            Algorithm::RsaSignPkcs12048Sha256
            | Algorithm::RsaSignPkcs13072Sha256
            | Algorithm::RsaSignPkcs14096Sha256 => SignAlgorithm::RsaPkcs1v15(HashAlg::Sha256),
            Algorithm::Aes256Gcm | Algorithm::Unspecified => return None,
        })
    }
}

/// The digest of `data` by `hash`, computed here: what the HSM signs for a
/// message under an algorithm that signs digests.
pub fn hash_bytes(hash: HashAlg, data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    match hash {
        HashAlg::Sha256 => sha2::Sha256::digest(data).to_vec(),
        HashAlg::Sha384 => sha2::Sha384::digest(data).to_vec(),
        HashAlg::Sha512 => sha2::Sha512::digest(data).to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_algorithm_maps_to_a_fitting_spec_and_back_by_name() {
        for algorithm in KeyAlgorithm::ALL {
            match algorithm.sign_algorithm() {
                Some(sign) => {
                    assert!(sign.fits(algorithm.key_spec()), "{algorithm:?}");
                    assert_eq!(algorithm.purpose(), KeyPurpose::AsymmetricSign);
                }
                None => {
                    assert_eq!(algorithm.key_spec(), KeySpec::Aes256);
                    assert_eq!(algorithm.purpose(), KeyPurpose::EncryptDecrypt);
                }
            }
            assert_eq!(
                KeyAlgorithm::from_api_name(algorithm.api_name()),
                Some(algorithm)
            );
            assert_eq!(
                KeyAlgorithm::from_wire(algorithm.wire() as i32),
                Some(algorithm)
            );
        }
        assert_eq!(KeyAlgorithm::from_wire(0), None);
        assert_eq!(KeyAlgorithm::from_wire(999), None);
    }
}
