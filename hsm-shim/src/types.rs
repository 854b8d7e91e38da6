//! The vocabulary of the HSM boundary: key specs, signing algorithms, labels.
//!
//! These types are deliberately narrower than PKCS#11: only the algorithms and
//! sizes custody supports can be expressed, and a signing algorithm knows which
//! key spec and digest length it needs, so a mismatch is refused before any
//! PKCS#11 call is made.

use std::fmt;

use crate::error::{ErrorKind, HsmError, Result};

/// The kind of key the HSM generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeySpec {
    /// ECDSA on NIST P-256.
    EcP256,
    /// ECDSA on NIST P-384.
    EcP384,
    /// Ed25519 (pure EdDSA).
    Ed25519,
    /// RSA with a 2048-bit modulus.
    Rsa2048,
    /// RSA with a 3072-bit modulus.
    Rsa3072,
    /// RSA with a 4096-bit modulus.
    Rsa4096,
    /// A 256-bit AES key, for wrapping or for AES-GCM.
    Aes256,
}

impl KeySpec {
    /// Every spec, in a stable order (for tests, benchmarks and `--help` texts).
    pub const ALL: [KeySpec; 7] = [
        KeySpec::EcP256,
        KeySpec::EcP384,
        KeySpec::Ed25519,
        KeySpec::Rsa2048,
        KeySpec::Rsa3072,
        KeySpec::Rsa4096,
        KeySpec::Aes256,
    ];

    /// True for key pairs, false for secret (symmetric) keys.
    pub fn is_key_pair(self) -> bool {
        !matches!(self, KeySpec::Aes256)
    }

    /// RSA modulus size in bits, for RSA specs.
    pub(crate) fn rsa_bits(self) -> Option<u64> {
        match self {
            KeySpec::Rsa2048 => Some(2048),
            KeySpec::Rsa3072 => Some(3072),
            KeySpec::Rsa4096 => Some(4096),
            _ => None,
        }
    }

    /// The algorithm used for the pair-wise consistency test right after
    /// generation, and the default for a key of this spec.
    pub fn default_sign_algorithm(self) -> Option<SignAlgorithm> {
        match self {
            KeySpec::EcP256 => Some(SignAlgorithm::EcdsaP256Sha256),
            KeySpec::EcP384 => Some(SignAlgorithm::EcdsaP384Sha384),
            KeySpec::Ed25519 => Some(SignAlgorithm::Ed25519),
            KeySpec::Rsa2048 | KeySpec::Rsa3072 | KeySpec::Rsa4096 => {
                Some(SignAlgorithm::RsaPss(HashAlg::Sha256))
            }
            KeySpec::Aes256 => None,
        }
    }
}

impl fmt::Display for KeySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeySpec::EcP256 => "ec-p256",
            KeySpec::EcP384 => "ec-p384",
            KeySpec::Ed25519 => "ed25519",
            KeySpec::Rsa2048 => "rsa-2048",
            KeySpec::Rsa3072 => "rsa-3072",
            KeySpec::Rsa4096 => "rsa-4096",
            KeySpec::Aes256 => "aes-256",
        })
    }
}

impl std::str::FromStr for KeySpec {
    type Err = HsmError;

    fn from_str(s: &str) -> Result<Self> {
        KeySpec::ALL
            .into_iter()
            .find(|spec| spec.to_string() == s)
            .ok_or_else(|| {
                HsmError::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "unknown key spec {s:?} (expected one of: {})",
                        KeySpec::ALL.map(|k| k.to_string()).join(", ")
                    ),
                )
            })
    }
}

/// A hash function, for RSA signatures and digest lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashAlg {
    /// SHA-256, 32-byte digests.
    Sha256,
    /// SHA-384, 48-byte digests.
    Sha384,
    /// SHA-512, 64-byte digests.
    Sha512,
}

impl HashAlg {
    /// Length of a digest in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// The DER `DigestInfo` prefix of PKCS#1 v1.5 (RFC 8017, section 9.2, note 1):
    /// prepended to a digest, it is what `CKM_RSA_PKCS` signs.
    pub(crate) fn digest_info_prefix(self) -> &'static [u8] {
        match self {
            HashAlg::Sha256 => &[
                0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x01, 0x05, 0x00, 0x04, 0x20,
            ],
            HashAlg::Sha384 => &[
                0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x02, 0x05, 0x00, 0x04, 0x30,
            ],
            HashAlg::Sha512 => &[
                0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x03, 0x05, 0x00, 0x04, 0x40,
            ],
        }
    }
}

/// A signature algorithm: the key spec it needs and how the input is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignAlgorithm {
    /// ECDSA on P-256 over a SHA-256 digest.
    EcdsaP256Sha256,
    /// ECDSA on P-384 over a SHA-384 digest.
    EcdsaP384Sha384,
    /// Pure Ed25519 over the whole message.
    Ed25519,
    /// RSASSA-PKCS1-v1_5 with the given hash.
    RsaPkcs1v15(HashAlg),
    /// RSASSA-PSS with the given hash, MGF1 with the same hash, salt length equal
    /// to the digest length (what X.509 profiles and `openssl` expect).
    RsaPss(HashAlg),
}

impl SignAlgorithm {
    /// True if a key of `spec` can make signatures of this algorithm.
    pub fn fits(self, spec: KeySpec) -> bool {
        match self {
            SignAlgorithm::EcdsaP256Sha256 => spec == KeySpec::EcP256,
            SignAlgorithm::EcdsaP384Sha384 => spec == KeySpec::EcP384,
            SignAlgorithm::Ed25519 => spec == KeySpec::Ed25519,
            SignAlgorithm::RsaPkcs1v15(_) | SignAlgorithm::RsaPss(_) => spec.rsa_bits().is_some(),
        }
    }

    /// The hash whose digest this algorithm signs; `None` for Ed25519, which
    /// signs the message itself.
    pub fn hash(self) -> Option<HashAlg> {
        match self {
            SignAlgorithm::EcdsaP256Sha256 => Some(HashAlg::Sha256),
            SignAlgorithm::EcdsaP384Sha384 => Some(HashAlg::Sha384),
            SignAlgorithm::Ed25519 => None,
            SignAlgorithm::RsaPkcs1v15(hash) | SignAlgorithm::RsaPss(hash) => Some(hash),
        }
    }

    /// True for the ECDSA algorithms, whose signatures have a DER and a raw form.
    pub fn is_ecdsa(self) -> bool {
        matches!(
            self,
            SignAlgorithm::EcdsaP256Sha256 | SignAlgorithm::EcdsaP384Sha384
        )
    }

    /// Byte length of each of r and s, for ECDSA.
    pub(crate) fn ecdsa_scalar_len(self) -> Option<usize> {
        match self {
            SignAlgorithm::EcdsaP256Sha256 => Some(32),
            SignAlgorithm::EcdsaP384Sha384 => Some(48),
            _ => None,
        }
    }
}

/// What is signed: a digest computed by the caller, or the message itself.
///
/// ECDSA takes only digests (SoftHSM2 and many HSMs lack `CKM_ECDSA_SHA256`, so
/// the service hashes); Ed25519 takes only messages (pure EdDSA has no prehash
/// form we accept); RSA takes either.
#[derive(Debug, Clone, Copy)]
pub enum SignInput<'a> {
    /// A digest whose length must equal the algorithm's hash length.
    Digest(&'a [u8]),
    /// A message the HSM hashes (RSA) or signs whole (Ed25519).
    Message(&'a [u8]),
}

/// How an ECDSA signature is encoded. Other algorithms have one encoding only
/// and ignore this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EcdsaEncoding {
    /// `ECDSA-Sig-Value` DER (RFC 3279), what X.509 and `openssl` take.
    #[default]
    Der,
    /// The fixed-width `r || s` that PKCS#11 returns (JOSE, WebAuthn).
    Raw,
}

/// How a new AES key may be used. Each role grants exactly one pair of
/// operations, so a data key can never wrap keys and a KEK never encrypts data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AesRole {
    /// AES-GCM encrypt and decrypt of data.
    DataEncryption,
    /// RFC 5649 wrap and unwrap of other keys (a KEK).
    KeyEncryption,
}

/// Whether a new key may ever leave the HSM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Exportability {
    /// Sensitive and never extractable: the key lives and dies in this HSM.
    #[default]
    NonExportable,
    /// Extractable only wrapped under a key marked trusted
    /// (`CKA_WRAP_WITH_TRUSTED`), which only the token's security officer can
    /// make: see [`crate::security_officer`]. SoftHSM2 enforces this.
    BackupWrapOnly,
}

/// The name of a key object on the token, used as both `CKA_LABEL` and `CKA_ID`.
///
/// Limited to 1-128 printable ASCII characters without spaces, so that it is
/// safe to show, log and pass to `pkcs11-tool`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyLabel(String);

impl KeyLabel {
    /// The most bytes a label may have.
    pub const MAX_LEN: usize = 128;

    /// A label from a string, checked.
    pub fn new(label: impl Into<String>) -> Result<Self> {
        let label = label.into();
        let valid = !label.is_empty()
            && label.len() <= Self::MAX_LEN
            && label.bytes().all(|b| b.is_ascii_graphic());
        if valid {
            Ok(Self(label))
        } else {
            Err(HsmError::new(
                ErrorKind::InvalidInput,
                format!(
                    "invalid key label {label:?}: use 1-{} printable ASCII characters without spaces",
                    Self::MAX_LEN
                ),
            ))
        }
    }

    /// The label of version `version` of key `name`: `name/v{version}`.
    pub fn for_version(name: &str, version: u32) -> Result<Self> {
        Self::new(format!("{name}/v{version}"))
    }

    /// The label as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyLabel({:?})", self.0)
    }
}

/// A 3-byte key check value (`CKA_CHECK_VALUE`): the first bytes of the key's
/// encryption of a zero block, read aloud in ceremonies to confirm a key
/// without revealing it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyCheckValue(pub [u8; 3]);

impl fmt::Display for KeyCheckValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyCheckValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyCheckValue({self})")
    }
}

/// What the HSM made or holds under one label, as returned by generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The label of the object(s).
    pub label: KeyLabel,
    /// The key's spec.
    pub spec: KeySpec,
    /// `SubjectPublicKeyInfo` DER, for key pairs.
    pub public_key: Option<crate::PublicKey>,
    /// Key check value, for AES keys.
    pub check_value: Option<KeyCheckValue>,
}

/// An AES-GCM ciphertext with the IV it was made with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcmCiphertext {
    /// The 96-bit IV, drawn from the HSM's RNG for each encryption.
    pub iv: [u8; 12],
    /// Ciphertext followed by the 128-bit tag.
    pub ciphertext_and_tag: Vec<u8>,
}

/// What the token says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSummary {
    /// Token label.
    pub label: String,
    /// Token serial number.
    pub serial: String,
    /// Manufacturer.
    pub manufacturer: String,
    /// Model.
    pub model: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_reject_what_cannot_be_shown_safely() {
        assert!(KeyLabel::new("root-ca/v1").is_ok());
        for bad in ["", "has space", "tab\t", "ünicode", &"x".repeat(129)] {
            let err = KeyLabel::new(bad).expect_err(bad);
            assert_eq!(err.kind(), ErrorKind::InvalidInput);
        }
        assert_eq!(KeyLabel::for_version("ca", 3).unwrap().as_str(), "ca/v3");
    }

    #[test]
    fn algorithms_fit_only_their_key_specs() {
        assert!(SignAlgorithm::EcdsaP256Sha256.fits(KeySpec::EcP256));
        assert!(!SignAlgorithm::EcdsaP256Sha256.fits(KeySpec::EcP384));
        assert!(!SignAlgorithm::Ed25519.fits(KeySpec::EcP256));
        assert!(SignAlgorithm::RsaPss(HashAlg::Sha512).fits(KeySpec::Rsa3072));
        assert!(!SignAlgorithm::RsaPkcs1v15(HashAlg::Sha256).fits(KeySpec::Aes256));
        for spec in KeySpec::ALL {
            if let Some(alg) = spec.default_sign_algorithm() {
                assert!(alg.fits(spec), "{spec}");
            }
        }
    }

    #[test]
    fn key_specs_round_trip_through_their_names() {
        for spec in KeySpec::ALL {
            assert_eq!(spec.to_string().parse::<KeySpec>().unwrap(), spec);
        }
        assert_eq!(
            "rsa-1024".parse::<KeySpec>().unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }

    #[test]
    fn digest_info_prefixes_announce_the_digest_length() {
        for hash in [HashAlg::Sha256, HashAlg::Sha384, HashAlg::Sha512] {
            let prefix = hash.digest_info_prefix();
            // The last byte of the prefix is the OCTET STRING length of the digest,
            // and the outer SEQUENCE length covers the rest.
            assert_eq!(usize::from(prefix[prefix.len() - 1]), hash.digest_len());
            assert_eq!(usize::from(prefix[1]), prefix.len() - 2 + hash.digest_len());
        }
    }
}
