//! The key algorithms of the API, and what each means at the HSM boundary.
//!
//! An algorithm fixes key type, size, signature scheme and hash at creation
//! (as Cloud KMS does), so a request cannot choose a weaker combination.

use hsm_shim::{HashAlg, KeySpec, SignAlgorithm};

/// A supported key algorithm. The names are the API's (`EC_SIGN_P256_SHA256`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyAlgorithm {
    /// ECDSA on NIST P-256 over a SHA-256 digest.
    EcSignP256Sha256,
    /// ECDSA on NIST P-384 over a SHA-384 digest.
    EcSignP384Sha384,
    /// Pure Ed25519 over the whole message.
    EcSignEd25519,
    /// RSASSA-PSS, 2048-bit modulus, SHA-256.
    RsaSignPss2048Sha256,
    /// RSASSA-PSS, 3072-bit modulus, SHA-256.
    RsaSignPss3072Sha256,
    /// RSASSA-PSS, 4096-bit modulus, SHA-256.
    RsaSignPss4096Sha256,
    /// RSASSA-PSS, 4096-bit modulus, SHA-512.
    RsaSignPss4096Sha512,
    /// RSASSA-PKCS1-v1_5, 2048-bit modulus, SHA-256.
    RsaSignPkcs12048Sha256,
    /// RSASSA-PKCS1-v1_5, 3072-bit modulus, SHA-256.
    RsaSignPkcs13072Sha256,
    /// RSASSA-PKCS1-v1_5, 4096-bit modulus, SHA-256.
    RsaSignPkcs14096Sha256,
    /// RSASSA-PKCS1-v1_5, 4096-bit modulus, SHA-512.
    RsaSignPkcs14096Sha512,
    /// AES-256-GCM envelope encryption.
    Aes256Gcm,
}

/// What keys of an algorithm are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// Sign and verify (`ASYMMETRIC_SIGN`).
    AsymmetricSign,
    /// Encrypt and decrypt (`ENCRYPT_DECRYPT`).
    EncryptDecrypt,
}

impl Purpose {
    /// The API name, e.g. `ASYMMETRIC_SIGN`.
    pub fn api_name(self) -> &'static str {
        match self {
            Purpose::AsymmetricSign => "ASYMMETRIC_SIGN",
            Purpose::EncryptDecrypt => "ENCRYPT_DECRYPT",
        }
    }
}

impl KeyAlgorithm {
    /// Every algorithm custody supports.
    pub const ALL: [KeyAlgorithm; 12] = [
        KeyAlgorithm::EcSignP256Sha256,
        KeyAlgorithm::EcSignP384Sha384,
        KeyAlgorithm::EcSignEd25519,
        KeyAlgorithm::RsaSignPss2048Sha256,
        KeyAlgorithm::RsaSignPss3072Sha256,
        KeyAlgorithm::RsaSignPss4096Sha256,
        KeyAlgorithm::RsaSignPss4096Sha512,
        KeyAlgorithm::RsaSignPkcs12048Sha256,
        KeyAlgorithm::RsaSignPkcs13072Sha256,
        KeyAlgorithm::RsaSignPkcs14096Sha256,
        KeyAlgorithm::RsaSignPkcs14096Sha512,
        KeyAlgorithm::Aes256Gcm,
    ];

    /// From its API name, as in the config file.
    pub fn from_api_name(name: &str) -> Option<KeyAlgorithm> {
        Self::ALL.into_iter().find(|a| a.api_name() == name)
    }

    /// The API name, e.g. `EC_SIGN_P256_SHA256`.
    pub fn api_name(self) -> &'static str {
        match self {
            KeyAlgorithm::EcSignP256Sha256 => "EC_SIGN_P256_SHA256",
            KeyAlgorithm::EcSignP384Sha384 => "EC_SIGN_P384_SHA384",
            KeyAlgorithm::EcSignEd25519 => "EC_SIGN_ED25519",
            KeyAlgorithm::RsaSignPss2048Sha256 => "RSA_SIGN_PSS_2048_SHA256",
            KeyAlgorithm::RsaSignPss3072Sha256 => "RSA_SIGN_PSS_3072_SHA256",
            KeyAlgorithm::RsaSignPss4096Sha256 => "RSA_SIGN_PSS_4096_SHA256",
            KeyAlgorithm::RsaSignPss4096Sha512 => "RSA_SIGN_PSS_4096_SHA512",
            KeyAlgorithm::RsaSignPkcs12048Sha256 => "RSA_SIGN_PKCS1_2048_SHA256",
            KeyAlgorithm::RsaSignPkcs13072Sha256 => "RSA_SIGN_PKCS1_3072_SHA256",
            KeyAlgorithm::RsaSignPkcs14096Sha256 => "RSA_SIGN_PKCS1_4096_SHA256",
            KeyAlgorithm::RsaSignPkcs14096Sha512 => "RSA_SIGN_PKCS1_4096_SHA512",
            KeyAlgorithm::Aes256Gcm => "AES_256_GCM",
        }
    }

    /// Whether the default crypto policy allows it. RSA-2048 is below the
    /// 128-bit security level NIST SP 800-57 asks of keys used past 2030.
    pub fn default_allowed(self) -> bool {
        !matches!(
            self,
            KeyAlgorithm::RsaSignPss2048Sha256 | KeyAlgorithm::RsaSignPkcs12048Sha256
        )
    }

    /// The HSM key spec.
    pub fn key_spec(self) -> KeySpec {
        match self {
            KeyAlgorithm::EcSignP256Sha256 => KeySpec::EcP256,
            KeyAlgorithm::EcSignP384Sha384 => KeySpec::EcP384,
            KeyAlgorithm::EcSignEd25519 => KeySpec::Ed25519,
            KeyAlgorithm::RsaSignPss2048Sha256 | KeyAlgorithm::RsaSignPkcs12048Sha256 => {
                KeySpec::Rsa2048
            }
            KeyAlgorithm::RsaSignPss3072Sha256 | KeyAlgorithm::RsaSignPkcs13072Sha256 => {
                KeySpec::Rsa3072
            }
            KeyAlgorithm::RsaSignPss4096Sha256
            | KeyAlgorithm::RsaSignPss4096Sha512
            | KeyAlgorithm::RsaSignPkcs14096Sha256
            | KeyAlgorithm::RsaSignPkcs14096Sha512 => KeySpec::Rsa4096,
            KeyAlgorithm::Aes256Gcm => KeySpec::Aes256,
        }
    }

    /// What keys of this algorithm are for.
    pub fn purpose(self) -> Purpose {
        match self {
            KeyAlgorithm::Aes256Gcm => Purpose::EncryptDecrypt,
            _ => Purpose::AsymmetricSign,
        }
    }

    /// The HSM signature algorithm; `None` for encryption keys.
    pub fn sign_algorithm(self) -> Option<SignAlgorithm> {
        Some(match self {
            KeyAlgorithm::EcSignP256Sha256 => SignAlgorithm::EcdsaP256Sha256,
            KeyAlgorithm::EcSignP384Sha384 => SignAlgorithm::EcdsaP384Sha384,
            KeyAlgorithm::EcSignEd25519 => SignAlgorithm::Ed25519,
            KeyAlgorithm::RsaSignPss4096Sha512 => SignAlgorithm::RsaPss(HashAlg::Sha512),
            KeyAlgorithm::RsaSignPkcs14096Sha512 => SignAlgorithm::RsaPkcs1v15(HashAlg::Sha512),
            KeyAlgorithm::RsaSignPss2048Sha256
            | KeyAlgorithm::RsaSignPss3072Sha256
            | KeyAlgorithm::RsaSignPss4096Sha256 => SignAlgorithm::RsaPss(HashAlg::Sha256),
            KeyAlgorithm::RsaSignPkcs12048Sha256
            | KeyAlgorithm::RsaSignPkcs13072Sha256
            | KeyAlgorithm::RsaSignPkcs14096Sha256 => SignAlgorithm::RsaPkcs1v15(HashAlg::Sha256),
            KeyAlgorithm::Aes256Gcm => return None,
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
                    assert_eq!(algorithm.purpose(), Purpose::AsymmetricSign);
                }
                None => {
                    assert_eq!(algorithm.key_spec(), KeySpec::Aes256);
                    assert_eq!(algorithm.purpose(), Purpose::EncryptDecrypt);
                }
            }
            assert_eq!(
                KeyAlgorithm::from_api_name(algorithm.api_name()),
                Some(algorithm)
            );
        }
        assert_eq!(KeyAlgorithm::from_api_name("ALGORITHM_UNSPECIFIED"), None);
    }
}
