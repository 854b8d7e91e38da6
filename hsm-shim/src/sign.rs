//! Signing and verification.
//!
//! Inputs are checked against the algorithm and the key before any PKCS#11
//! call: the algorithm must fit the key's spec, a digest must have its hash's
//! length, ECDSA takes digests and Ed25519 messages only. Bad input therefore
//! never reaches the HSM.

use cryptoki::context::Function;
use cryptoki::error::RvError;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};

use crate::encoding::{ecdsa_der_to_raw, ecdsa_raw_to_der};
use crate::error::{ErrorKind, HsmError, Result};
use crate::session::{Found, HsmSession, ObjectKind};
use crate::types::{EcdsaEncoding, HashAlg, KeyLabel, SignAlgorithm, SignInput};

impl HsmSession {
    /// Signs `input` with the private key labelled `label`.
    pub fn sign(
        &mut self,
        label: &KeyLabel,
        algorithm: SignAlgorithm,
        input: SignInput<'_>,
        encoding: EcdsaEncoding,
    ) -> Result<Vec<u8>> {
        self.recovering(|s| {
            let key = s.find(ObjectKind::Private, label)?;
            s.sign_with(label, key, algorithm, input, encoding)
        })
    }

    /// Verifies `signature` over `input` with the public key labelled `label`.
    /// `Ok(false)` means the signature is wrong (or malformed); errors are
    /// reserved for bad requests and HSM failures.
    pub fn verify(
        &mut self,
        label: &KeyLabel,
        algorithm: SignAlgorithm,
        input: SignInput<'_>,
        signature: &[u8],
        encoding: EcdsaEncoding,
    ) -> Result<bool> {
        self.recovering(|s| {
            let key = s.find(ObjectKind::Public, label)?;
            s.verify_with(label, key, algorithm, input, signature, encoding)
        })
    }

    pub(crate) fn sign_with(
        &self,
        label: &KeyLabel,
        key: Found,
        algorithm: SignAlgorithm,
        input: SignInput<'_>,
        encoding: EcdsaEncoding,
    ) -> Result<Vec<u8>> {
        let prepared = prepare(label, key, algorithm, input)?;
        let signature = self.call(
            Function::Sign,
            || format!("signing with {label}"),
            |session| session.sign(&prepared.mechanism(), key.handle, &prepared.data),
        )?;
        match (algorithm.ecdsa_scalar_len(), encoding) {
            (Some(scalar_len), EcdsaEncoding::Der) => ecdsa_raw_to_der(&signature, scalar_len),
            _ => Ok(signature),
        }
    }

    pub(crate) fn verify_with(
        &self,
        label: &KeyLabel,
        key: Found,
        algorithm: SignAlgorithm,
        input: SignInput<'_>,
        signature: &[u8],
        encoding: EcdsaEncoding,
    ) -> Result<bool> {
        let prepared = prepare(label, key, algorithm, input)?;
        let raw;
        let signature = match (algorithm.ecdsa_scalar_len(), encoding) {
            (Some(scalar_len), EcdsaEncoding::Der) => match ecdsa_der_to_raw(signature, scalar_len)
            {
                Ok(bytes) => {
                    raw = bytes;
                    &raw[..]
                }
                Err(_) => return Ok(false),
            },
            _ => signature,
        };
        let outcome = self.call(
            Function::Verify,
            || format!("verifying with {label}"),
            |session| session.verify(&prepared.mechanism(), key.handle, &prepared.data, signature),
        );
        match outcome {
            Ok(()) => Ok(true),
            Err(e)
                if matches!(
                    e.rv(),
                    Some(RvError::SignatureInvalid | RvError::SignatureLenRange)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// The mechanism and the exact bytes handed to `C_Sign`/`C_Verify`.
struct Prepared {
    mechanism: MechanismChoice,
    data: Vec<u8>,
}

#[derive(Clone, Copy)]
enum MechanismChoice {
    Ecdsa,
    Ed25519,
    RsaPkcs1v15Raw,
    RsaPkcs1v15Hashing(HashAlg),
    RsaPssRaw(HashAlg),
    RsaPssHashing(HashAlg),
}

impl Prepared {
    fn mechanism(&self) -> Mechanism<'static> {
        match self.mechanism {
            MechanismChoice::Ecdsa => Mechanism::Ecdsa,
            MechanismChoice::Ed25519 => {
                Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure))
            }
            MechanismChoice::RsaPkcs1v15Raw => Mechanism::RsaPkcs,
            MechanismChoice::RsaPkcs1v15Hashing(HashAlg::Sha256) => Mechanism::Sha256RsaPkcs,
            MechanismChoice::RsaPkcs1v15Hashing(HashAlg::Sha384) => Mechanism::Sha384RsaPkcs,
            MechanismChoice::RsaPkcs1v15Hashing(HashAlg::Sha512) => Mechanism::Sha512RsaPkcs,
            MechanismChoice::RsaPssRaw(hash) => Mechanism::RsaPkcsPss(pss_params(hash)),
            MechanismChoice::RsaPssHashing(hash) => match hash {
                HashAlg::Sha256 => Mechanism::Sha256RsaPkcsPss(pss_params(hash)),
                HashAlg::Sha384 => Mechanism::Sha384RsaPkcsPss(pss_params(hash)),
                HashAlg::Sha512 => Mechanism::Sha512RsaPkcsPss(pss_params(hash)),
            },
        }
    }
}

/// PSS with MGF1 over the same hash and a salt as long as the digest: the
/// parameters RFC 8017 recommends and `openssl` verifies by default.
fn pss_params(hash: HashAlg) -> PkcsPssParams {
    let (hash_alg, mgf) = match hash {
        HashAlg::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
        HashAlg::Sha384 => (MechanismType::SHA384, PkcsMgfType::MGF1_SHA384),
        HashAlg::Sha512 => (MechanismType::SHA512, PkcsMgfType::MGF1_SHA512),
    };
    PkcsPssParams {
        hash_alg,
        mgf,
        s_len: (hash.digest_len() as u64).into(),
    }
}

fn prepare(
    label: &KeyLabel,
    key: Found,
    algorithm: SignAlgorithm,
    input: SignInput<'_>,
) -> Result<Prepared> {
    let invalid = |message: String| HsmError::new(ErrorKind::InvalidInput, message);
    if !algorithm.fits(key.spec) {
        return Err(invalid(format!(
            "{algorithm:?} does not fit key {label}, which is {}",
            key.spec
        )));
    }
    if let (SignInput::Digest(digest), Some(hash)) = (input, algorithm.hash()) {
        if digest.len() != hash.digest_len() {
            return Err(invalid(format!(
                "{algorithm:?} needs a {}-byte {hash:?} digest, got {} bytes",
                hash.digest_len(),
                digest.len()
            )));
        }
    }
    let (mechanism, data) = match (algorithm, input) {
        (SignAlgorithm::EcdsaP256Sha256 | SignAlgorithm::EcdsaP384Sha384, SignInput::Digest(d)) => {
            (MechanismChoice::Ecdsa, d.to_vec())
        }
        (SignAlgorithm::Ed25519, SignInput::Message(m)) => (MechanismChoice::Ed25519, m.to_vec()),
        (SignAlgorithm::RsaPkcs1v15(hash), SignInput::Digest(d)) => {
            let mut digest_info = hash.digest_info_prefix().to_vec();
            digest_info.extend_from_slice(d);
            (MechanismChoice::RsaPkcs1v15Raw, digest_info)
        }
        (SignAlgorithm::RsaPkcs1v15(hash), SignInput::Message(m)) => {
            (MechanismChoice::RsaPkcs1v15Hashing(hash), m.to_vec())
        }
        (SignAlgorithm::RsaPss(hash), SignInput::Digest(d)) => {
            (MechanismChoice::RsaPssRaw(hash), d.to_vec())
        }
        (SignAlgorithm::RsaPss(hash), SignInput::Message(m)) => {
            (MechanismChoice::RsaPssHashing(hash), m.to_vec())
        }
        (
            SignAlgorithm::EcdsaP256Sha256 | SignAlgorithm::EcdsaP384Sha384,
            SignInput::Message(_),
        ) => {
            return Err(invalid(format!(
                "{algorithm:?} signs digests only: hash the message first"
            )));
        }
        (SignAlgorithm::Ed25519, SignInput::Digest(_)) => {
            return Err(invalid(
                "Ed25519 signs whole messages only (pure EdDSA)".to_string(),
            ));
        }
    };
    Ok(Prepared { mechanism, data })
}
