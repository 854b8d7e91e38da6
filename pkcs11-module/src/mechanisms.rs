//! Which PKCS#11 mechanisms a custody key signs and verifies with, and how
//! a mechanism's input becomes custody's `Sign` input: a raw mechanism
//! passes the caller's digest on (checked against the key's hash), a
//! hashing one hashes the data here (so multi-part input never needs to
//! reach custodyd whole), EdDSA passes the message. custody fixes each key's
//! hash and padding, so only the mechanism (and PSS parameters) that match
//! the key are accepted.

use cryptoki_sys::*;
use custody_proto::v1::Algorithm;
use sha2::Digest as _;

use crate::remote::{HashedDigest, Input};

/// The largest message custody signs whole (Ed25519), 64 KiB.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Every mechanism the module offers, in `C_GetMechanismList` order.
pub const ALL: [CK_MECHANISM_TYPE; 10] = [
    CKM_ECDSA,
    CKM_ECDSA_SHA256,
    CKM_ECDSA_SHA384,
    CKM_EDDSA,
    CKM_RSA_PKCS,
    CKM_SHA256_RSA_PKCS,
    CKM_SHA512_RSA_PKCS,
    CKM_RSA_PKCS_PSS,
    CKM_SHA256_RSA_PKCS_PSS,
    CKM_SHA512_RSA_PKCS_PSS,
];

/// A hash custody signs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl Hash {
    fn len(self) -> usize {
        match self {
            Hash::Sha256 => 32,
            Hash::Sha384 => 48,
            Hash::Sha512 => 64,
        }
    }

    fn digest(self, bytes: Vec<u8>) -> HashedDigest {
        match self {
            Hash::Sha256 => HashedDigest::Sha256(bytes),
            Hash::Sha384 => HashedDigest::Sha384(bytes),
            Hash::Sha512 => HashedDigest::Sha512(bytes),
        }
    }

    /// The PKCS#11 hash mechanism and MGF of PSS parameters.
    fn pss_params(self) -> (CK_MECHANISM_TYPE, CK_RSA_PKCS_MGF_TYPE) {
        match self {
            Hash::Sha256 => (CKM_SHA256, CKG_MGF1_SHA256),
            Hash::Sha384 => (CKM_SHA384, CKG_MGF1_SHA384),
            Hash::Sha512 => (CKM_SHA512, CKG_MGF1_SHA512),
        }
    }

    /// The DER `DigestInfo` prefix (RFC 8017, 9.2 note 1) of a raw
    /// CKM_RSA_PKCS input.
    fn digest_info_prefix(self) -> &'static [u8] {
        match self {
            Hash::Sha256 => &[
                0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x01, 0x05, 0x00, 0x04, 0x20,
            ],
            Hash::Sha384 => &[
                0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x02, 0x05, 0x00, 0x04, 0x30,
            ],
            Hash::Sha512 => &[
                0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x03, 0x05, 0x00, 0x04, 0x40,
            ],
        }
    }
}

/// The key's hash (None for Ed25519) and whether it is RSA-PSS,
/// RSA PKCS#1 v1.5 or EC.
fn profile(algorithm: Algorithm) -> Option<(Option<Hash>, Family)> {
    use Algorithm::*;
    Some(match algorithm {
        EcSignP256Sha256 => (Some(Hash::Sha256), Family::Ecdsa),
        EcSignP384Sha384 => (Some(Hash::Sha384), Family::Ecdsa),
        EcSignEd25519 => (None, Family::EdDsa),
        RsaSignPss2048Sha256 | RsaSignPss3072Sha256 | RsaSignPss4096Sha256 => {
            (Some(Hash::Sha256), Family::Pss)
        }
        RsaSignPss4096Sha512 => (Some(Hash::Sha512), Family::Pss),
        RsaSignPkcs12048Sha256 | RsaSignPkcs13072Sha256 | RsaSignPkcs14096Sha256 => {
            (Some(Hash::Sha256), Family::Pkcs1)
        }
        RsaSignPkcs14096Sha512 => (Some(Hash::Sha512), Family::Pkcs1),
        Unspecified | Aes256Gcm => return None,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Ecdsa,
    EdDsa,
    Pss,
    Pkcs1,
}

/// The mechanisms a key of `algorithm` signs and verifies with: the raw
/// one and the one hashing with the key's hash.
pub fn for_algorithm(algorithm: Algorithm) -> Vec<CK_MECHANISM_TYPE> {
    let Some((hash, family)) = profile(algorithm) else {
        return Vec::new();
    };
    match (family, hash) {
        (Family::Ecdsa, Some(Hash::Sha384)) => vec![CKM_ECDSA, CKM_ECDSA_SHA384],
        (Family::Ecdsa, _) => vec![CKM_ECDSA, CKM_ECDSA_SHA256],
        (Family::EdDsa, _) => vec![CKM_EDDSA],
        (Family::Pss, Some(Hash::Sha512)) => vec![CKM_RSA_PKCS_PSS, CKM_SHA512_RSA_PKCS_PSS],
        (Family::Pss, _) => vec![CKM_RSA_PKCS_PSS, CKM_SHA256_RSA_PKCS_PSS],
        (Family::Pkcs1, Some(Hash::Sha512)) => vec![CKM_RSA_PKCS, CKM_SHA512_RSA_PKCS],
        (Family::Pkcs1, _) => vec![CKM_RSA_PKCS, CKM_SHA256_RSA_PKCS],
    }
}

/// A mechanism as the caller gave it, its parameters read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mechanism {
    /// `CKM_*`.
    pub kind: CK_MECHANISM_TYPE,
    /// `CK_RSA_PKCS_PSS_PARAMS` (hashAlg, mgf, sLen), if given.
    pub pss: Option<(CK_MECHANISM_TYPE, CK_RSA_PKCS_MGF_TYPE, CK_ULONG)>,
    /// `CK_EDDSA_PARAMS` asks for something but pure Ed25519 (Ed25519ph or
    /// a context).
    pub eddsa_variant: bool,
    /// Parameters of a length that fits no parameter structure.
    pub bad_params: bool,
}

/// What accumulates between `C_SignInit` and the signature.
pub enum Accumulator {
    /// The caller's input, kept whole (raw mechanisms, EdDSA).
    Buffer(Vec<u8>),
    /// A running hash.
    Sha256(sha2::Sha256),
    /// A running hash.
    Sha384(sha2::Sha384),
    /// A running hash.
    Sha512(sha2::Sha512),
}

/// An initialised sign or verify operation.
pub struct Operation {
    mode: Mode,
    hash: Option<Hash>,
    accumulator: Accumulator,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The input is the digest.
    RawDigest,
    /// The input is a DER DigestInfo of the digest.
    RawDigestInfo,
    /// The input is hashed here.
    Hashing,
    /// The input is the message (Ed25519).
    Message,
}

/// Checks `mechanism` against a key of `algorithm` and starts an operation.
pub fn start(algorithm: Algorithm, mechanism: Mechanism) -> Result<Operation, CK_RV> {
    let (hash, family) = profile(algorithm).ok_or(CKR_KEY_TYPE_INCONSISTENT)?;
    if !ALL.contains(&mechanism.kind) {
        return Err(CKR_MECHANISM_INVALID);
    }
    if !for_algorithm(algorithm).contains(&mechanism.kind) {
        let fits_family = match mechanism.kind {
            CKM_ECDSA | CKM_ECDSA_SHA256 | CKM_ECDSA_SHA384 => family == Family::Ecdsa,
            CKM_EDDSA => family == Family::EdDsa,
            CKM_RSA_PKCS | CKM_SHA256_RSA_PKCS | CKM_SHA512_RSA_PKCS => family == Family::Pkcs1,
            _ => family == Family::Pss,
        };
        // Right key type, other hash than the key's: custody fixes it.
        return Err(if fits_family {
            CKR_MECHANISM_INVALID
        } else {
            CKR_KEY_TYPE_INCONSISTENT
        });
    }
    if mechanism.bad_params {
        return Err(CKR_MECHANISM_PARAM_INVALID);
    }
    if family == Family::Pss {
        let hash = hash.ok_or(CKR_MECHANISM_INVALID)?;
        let (hash_mechanism, mgf) = hash.pss_params();
        // custody signs with MGF1 of the key's hash and salt = hash length.
        if mechanism.pss != Some((hash_mechanism, mgf, hash.len() as CK_ULONG)) {
            return Err(CKR_MECHANISM_PARAM_INVALID);
        }
    }
    if mechanism.eddsa_variant {
        return Err(CKR_MECHANISM_PARAM_INVALID);
    }
    let mode = match mechanism.kind {
        CKM_ECDSA | CKM_RSA_PKCS_PSS => Mode::RawDigest,
        CKM_RSA_PKCS => Mode::RawDigestInfo,
        CKM_EDDSA => Mode::Message,
        _ => Mode::Hashing,
    };
    let accumulator = match (mode, hash) {
        (Mode::Hashing, Some(Hash::Sha256)) => Accumulator::Sha256(sha2::Sha256::new()),
        (Mode::Hashing, Some(Hash::Sha384)) => Accumulator::Sha384(sha2::Sha384::new()),
        (Mode::Hashing, Some(Hash::Sha512)) => Accumulator::Sha512(sha2::Sha512::new()),
        _ => Accumulator::Buffer(Vec::new()),
    };
    Ok(Operation {
        mode,
        hash,
        accumulator,
    })
}

impl Operation {
    /// Adds a part of the input.
    pub fn update(&mut self, part: &[u8]) -> Result<(), CK_RV> {
        match &mut self.accumulator {
            Accumulator::Buffer(buffer) => {
                if buffer.len() + part.len() > MAX_MESSAGE {
                    return Err(CKR_DATA_LEN_RANGE);
                }
                buffer.extend_from_slice(part);
            }
            Accumulator::Sha256(h) => h.update(part),
            Accumulator::Sha384(h) => h.update(part),
            Accumulator::Sha512(h) => h.update(part),
        }
        Ok(())
    }

    /// The input custody signs or verifies over, from everything added.
    pub fn finish(self) -> Result<Input, CK_RV> {
        let hash = self.hash;
        let bytes = match self.accumulator {
            Accumulator::Sha256(h) => {
                return Ok(Input::Digest(HashedDigest::Sha256(h.finalize().to_vec())));
            }
            Accumulator::Sha384(h) => {
                return Ok(Input::Digest(HashedDigest::Sha384(h.finalize().to_vec())));
            }
            Accumulator::Sha512(h) => {
                return Ok(Input::Digest(HashedDigest::Sha512(h.finalize().to_vec())));
            }
            Accumulator::Buffer(bytes) => bytes,
        };
        match (self.mode, hash) {
            (Mode::Message, _) => Ok(Input::Data(bytes)),
            (Mode::RawDigest, Some(hash)) => {
                if bytes.len() != hash.len() {
                    return Err(CKR_DATA_LEN_RANGE);
                }
                Ok(Input::Digest(hash.digest(bytes)))
            }
            (Mode::RawDigestInfo, Some(hash)) => {
                let prefix = hash.digest_info_prefix();
                if bytes.len() != prefix.len() + hash.len() {
                    return Err(CKR_DATA_LEN_RANGE);
                }
                let Some(digest) = bytes.strip_prefix(prefix) else {
                    // A DigestInfo of another hash than the key's, or none.
                    return Err(CKR_DATA_INVALID);
                };
                Ok(Input::Digest(hash.digest(digest.to_vec())))
            }
            _ => Err(CKR_GENERAL_ERROR),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(kind: CK_MECHANISM_TYPE) -> Mechanism {
        Mechanism {
            kind,
            pss: None,
            eddsa_variant: false,
            bad_params: false,
        }
    }

    #[test]
    fn mechanisms_must_fit_the_key() {
        assert_eq!(
            start(Algorithm::EcSignP256Sha256, plain(CKM_ECDSA_SHA384)).err(),
            Some(CKR_MECHANISM_INVALID)
        );
        assert_eq!(
            start(Algorithm::EcSignP256Sha256, plain(CKM_RSA_PKCS)).err(),
            Some(CKR_KEY_TYPE_INCONSISTENT)
        );
        // PSS needs the key's own parameters.
        assert_eq!(
            start(Algorithm::RsaSignPss2048Sha256, plain(CKM_RSA_PKCS_PSS)).err(),
            Some(CKR_MECHANISM_PARAM_INVALID)
        );
        let mut pss = plain(CKM_SHA256_RSA_PKCS_PSS);
        pss.pss = Some((CKM_SHA256, CKG_MGF1_SHA256, 20));
        assert_eq!(
            start(Algorithm::RsaSignPss2048Sha256, pss).err(),
            Some(CKR_MECHANISM_PARAM_INVALID)
        );
        pss.pss = Some((CKM_SHA256, CKG_MGF1_SHA256, 32));
        assert!(start(Algorithm::RsaSignPss2048Sha256, pss).is_ok());
    }

    #[test]
    fn raw_inputs_are_checked() {
        let mut op = start(Algorithm::EcSignP384Sha384, plain(CKM_ECDSA)).expect("start");
        op.update(&[0; 32]).expect("update");
        assert_eq!(op.finish().err(), Some(CKR_DATA_LEN_RANGE));

        let mut op = start(Algorithm::RsaSignPkcs12048Sha256, plain(CKM_RSA_PKCS)).expect("start");
        let mut info = Hash::Sha256.digest_info_prefix().to_vec();
        info.extend_from_slice(&[7; 32]);
        op.update(&info).expect("update");
        assert_eq!(
            op.finish(),
            Ok(Input::Digest(HashedDigest::Sha256(vec![7; 32])))
        );

        let mut op = start(Algorithm::EcSignP256Sha256, plain(CKM_ECDSA_SHA256)).expect("start");
        op.update(b"ab").expect("update");
        op.update(b"c").expect("update");
        assert_eq!(
            op.finish(),
            Ok(Input::Digest(HashedDigest::Sha256(
                sha2::Sha256::digest(b"abc").to_vec()
            )))
        );
    }
}
