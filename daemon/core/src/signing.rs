//! Signing and verification: every check a signature request must pass
//! before the HSM is asked (who, which version, its state, the digest's
//! hash and length, the encoding, the caller's checksum), the HSM call, and
//! what the audit record names (the exact version and digest). Unary
//! signing, streams and approved SIGN operations all come through [`sign`];
//! the caller records the outcome.

use hsm_shim::{EcdsaEncoding, HashAlg, KeyLabel, SignAlgorithm, SignInput};

use crate::action::Audited;
use crate::algorithms::{KeyAlgorithm, hash_bytes};
use crate::authz::{Action, Approval, allowed_user, authorize, may_read_key, quorum_gate};
use crate::identity::Principal;
use crate::keys::{algorithm_of, check_usable, found, version_of};
use crate::lifecycle::Use;
use crate::metrics;
use crate::names::{parse_version_name, version_name};
use crate::{Custody, Error, Reason};

/// Largest message (`data`) a sign or verify request may carry.
pub const MAX_SIGN_DATA: usize = 64 * 1024;

/// What is to be signed or verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A digest made by the caller, with the hash that made it.
    Digest {
        /// The hash the caller says made it.
        hash: HashAlg,
        /// The digest.
        bytes: Vec<u8>,
    },
    /// The message itself (hashed here where the algorithm signs digests).
    Data(Vec<u8>),
}

impl Input {
    fn bytes(&self) -> &[u8] {
        match self {
            Input::Digest { bytes, .. } | Input::Data(bytes) => bytes,
        }
    }
}

/// How an ECDSA signature is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// DER `SEQUENCE { r, s }`, what X.509 tooling takes (the default).
    Der,
    /// Raw `r ‖ s` (ECDSA only).
    Raw,
}

/// A sign or verify request, in the domain's terms.
#[derive(Debug, Clone)]
pub struct SignRequest {
    /// `keys/{id}` (the primary version) or `keys/{id}/versions/{n}`.
    pub name: String,
    /// What to sign; `None` is refused with `MISSING_INPUT`.
    pub input: Option<Input>,
    /// Signature encoding.
    pub encoding: Encoding,
    /// The caller's CRC32C of the input bytes, checked before signing.
    pub input_crc32c: Option<u32>,
}

/// A signature made.
#[derive(Debug, Clone)]
pub struct Signature {
    /// The exact version that signed.
    pub version_name: String,
    /// The signature bytes.
    pub signature: Vec<u8>,
    /// The key's algorithm.
    pub algorithm: KeyAlgorithm,
    /// Whether the caller's CRC32C of the input was checked.
    pub verified_input_crc32c: bool,
}

/// The name of a hash, as the audit log and operations spell it.
pub fn hash_name(hash: HashAlg) -> &'static str {
    match hash {
        HashAlg::Sha256 => "sha256",
        HashAlg::Sha384 => "sha384",
        HashAlg::Sha512 => "sha512",
    }
}

/// Whom a signature is made for, which decides what is checked.
#[derive(Debug, Clone, Copy)]
pub enum Signer<'a> {
    /// The authenticated caller: the signer role, the key's allow-list and,
    /// for a direct call ([`Approval::None`]), no quorum policy on SIGN.
    Caller(&'a Principal, Approval),
    /// An approved SIGN operation, run for its requester: the role was
    /// checked when they asked; the allow-list is checked again now.
    Approved {
        /// The principal who asked for the operation.
        requester: &'a str,
    },
}

/// What the HSM will be asked, after every check passed.
struct Prepared {
    version_name: String,
    label: KeyLabel,
    algorithm: KeyAlgorithm,
    sign_algorithm: SignAlgorithm,
    bytes: Vec<u8>,
    is_digest: bool,
    encoding: EcdsaEncoding,
    crc_checked: bool,
}

/// Checks a sign (for `signer`) or verify (`signer` is `None`) request
/// against the registry and the signer, and says in `audited` what the
/// record will name. No HSM call happens here.
/// `signer` is who a signature is made for; `None` for a verification by
/// `verifier`, who must be allowed to read the key.
fn prepare(
    custody: &Custody,
    audited: &mut Audited,
    signer: Option<Signer<'_>>,
    verifier: Option<&Principal>,
    request: &SignRequest,
) -> Result<Prepared, Error> {
    // Refusals are recorded with what was asked for.
    audited.resource = request.name.clone();
    // The decision comes before anything is read.
    if let Some(Signer::Caller(principal, _)) = signer {
        authorize(principal, Action::Sign)?;
    }
    let (key_id, version) = parse_version_name(&request.name)?;
    let record = found(custody, key_id)?;
    let number = version.unwrap_or(record.primary_version);
    let version = version_of(&record, number)?;
    audited.resource = version_name(key_id, number);
    match signer {
        Some(Signer::Caller(principal, approval)) => {
            allowed_user(&record, &principal.name)?;
            quorum_gate(&record, "SIGN", approval)?;
        }
        Some(Signer::Approved { requester }) => {
            allowed_user(&record, requester)?;
            quorum_gate(&record, "SIGN", Approval::Quorum)?;
        }
        None => match verifier {
            Some(verifier) => may_read_key(verifier, &record)?,
            None => return Err(Error::internal("a verification without a verifier")),
        },
    }
    let usage = if signer.is_some() {
        Use::Protect
    } else {
        Use::Process
    };
    check_usable(&record, version, usage, custody.clock.now_ms())?;
    let algorithm = algorithm_of(&record)?;
    let sign_algorithm = algorithm.sign_algorithm().ok_or_else(|| {
        Error::new(
            Reason::WrongPurpose,
            format!("keys/{key_id} is an ENCRYPT_DECRYPT key; use EnvelopeService"),
        )
    })?;
    let encoding = match request.encoding {
        Encoding::Der => EcdsaEncoding::Der,
        Encoding::Raw if sign_algorithm.is_ecdsa() => EcdsaEncoding::Raw,
        Encoding::Raw => {
            return Err(Error::new(
                Reason::BadEncoding,
                "RAW encoding exists for ECDSA keys only",
            ));
        }
    };
    let input = request
        .input
        .as_ref()
        .ok_or_else(|| Error::new(Reason::MissingInput, "give a digest or data"))?;
    let crc_checked = match request.input_crc32c {
        Some(expected) if crc32c::crc32c(input.bytes()) != expected => {
            return Err(Error::new(
                Reason::ChecksumMismatch,
                "input_crc32c does not match the input: it was corrupted on the way",
            ));
        }
        Some(_) => true,
        None => false,
    };
    let (bytes, is_digest) = match (input, sign_algorithm.hash()) {
        (Input::Digest { .. }, None) => {
            return Err(Error::new(
                Reason::DigestNotAccepted,
                "Ed25519 keys sign data, not digests",
            ));
        }
        (Input::Digest { hash: given, bytes }, Some(hash)) => {
            if *given != hash {
                return Err(Error::new(
                    Reason::DigestAlgorithmMismatch,
                    format!(
                        "{} signs {} digests, not {}",
                        algorithm.api_name(),
                        hash_name(hash),
                        hash_name(*given)
                    ),
                ));
            }
            if bytes.len() != hash.digest_len() {
                return Err(Error::new(
                    Reason::DigestLength,
                    format!(
                        "a {} digest is {} bytes, got {}",
                        hash_name(hash),
                        hash.digest_len(),
                        bytes.len()
                    ),
                ));
            }
            (bytes.clone(), true)
        }
        (Input::Data(data), hash) => {
            if data.len() > MAX_SIGN_DATA {
                return Err(Error::new(
                    Reason::DataTooLarge,
                    format!(
                        "data is {} bytes; at most {MAX_SIGN_DATA} (send a digest instead)",
                        data.len()
                    ),
                ));
            }
            match hash {
                // ECDSA: the HSM signs digests only, so the service hashes.
                Some(hash) if sign_algorithm.is_ecdsa() => (hash_bytes(hash, data), true),
                _ => (data.clone(), false),
            }
        }
    };
    let shown_hash = sign_algorithm.hash().unwrap_or(HashAlg::Sha256);
    let shown = if is_digest {
        bytes.clone()
    } else {
        hash_bytes(shown_hash, &bytes)
    };
    audited.detail = format!(
        "{}{}:{}",
        if is_digest { "" } else { "data " },
        hash_name(shown_hash),
        hex::encode(shown)
    );
    Ok(Prepared {
        sign_algorithm,
        version_name: audited.resource.clone(),
        label: KeyLabel::new(version.hsm_label.clone())?,
        algorithm,
        bytes,
        is_digest,
        encoding,
        crc_checked,
    })
}

/// Signs one request for `signer`. The caller records `audited` (method
/// `Sign`, or `ExecuteSign` for an approved operation), which this names
/// the exact version and digest in.
pub async fn sign(
    custody: &Custody,
    audited: &mut Audited,
    signer: Signer<'_>,
    request: &SignRequest,
) -> Result<Signature, Error> {
    let Prepared {
        version_name,
        label,
        algorithm,
        sign_algorithm,
        bytes,
        is_digest,
        encoding,
        crc_checked,
    } = prepare(custody, audited, Some(signer), None, request)?;
    let job = move |session: &mut hsm_shim::HsmSession| {
        let input = if is_digest {
            SignInput::Digest(&bytes)
        } else {
            SignInput::Message(&bytes)
        };
        session.sign(&label, sign_algorithm, input, encoding)
    };
    // A caller's request may be refused when the HSM queue is full (they
    // retry); the signature officers approved waits its turn instead.
    let signature = match signer {
        Signer::Caller(..) => custody.hsm.try_run(job).await?,
        Signer::Approved { .. } => custody.hsm.run(job).await?,
    };
    metrics::signature(&version_name, algorithm.api_name());
    Ok(Signature {
        version_name,
        signature,
        algorithm,
        verified_input_crc32c: crc_checked,
    })
}

/// Verifies `signature` over the request's input with the named version
/// (the caller's audit record is `audited`). Returns the version's name and
/// whether the signature is valid.
pub async fn verify(
    custody: &Custody,
    audited: &mut Audited,
    verifier: &Principal,
    request: &SignRequest,
    signature: Vec<u8>,
) -> Result<(String, bool), Error> {
    let Prepared {
        version_name,
        label,
        sign_algorithm,
        bytes,
        is_digest,
        encoding,
        ..
    } = prepare(custody, audited, None, Some(verifier), request)?;
    let valid = custody
        .hsm
        .try_run(move |session| {
            let input = if is_digest {
                SignInput::Digest(&bytes)
            } else {
                SignInput::Message(&bytes)
            };
            session.verify(&label, sign_algorithm, input, &signature, encoding)
        })
        .await?;
    Ok((version_name, valid))
}

/// A digest to be signed under quorum, checked exactly as [`sign`] would
/// check it now: what a SIGN operation records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignOperation {
    /// The key.
    pub key_id: String,
    /// The exact version (the primary one when the request named none).
    pub version: u32,
    /// The hash's name (`sha256`, …).
    pub hash: String,
    /// The digest, hex.
    pub digest: String,
    /// `der` or `raw`.
    pub encoding: String,
}

/// Checks a digest to be signed under quorum, as [`sign`] would (the
/// requester a signer on the allow-list, the version usable, the digest
/// fitting), without an HSM call.
pub fn check_sign_operation(
    custody: &Custody,
    principal: &Principal,
    request: &SignRequest,
) -> Result<SignOperation, Error> {
    let mut audited = Audited::start("RequestOperation");
    let signer = Signer::Caller(principal, Approval::Quorum);
    let prepared = prepare(custody, &mut audited, Some(signer), None, request)?;
    let (key_id, version) = parse_version_name(&prepared.version_name)?;
    let hash = prepared
        .sign_algorithm
        .hash()
        .map(hash_name)
        .ok_or_else(|| {
            Error::new(
                Reason::DigestNotAccepted,
                "Ed25519 keys sign data, not digests",
            )
        })?;
    let encoding = match prepared.encoding {
        EcdsaEncoding::Der => "der",
        EcdsaEncoding::Raw => "raw",
    };
    Ok(SignOperation {
        key_id: key_id.to_string(),
        version: version.unwrap_or(1),
        hash: hash.to_string(),
        digest: hex::encode(&prepared.bytes),
        encoding: encoding.to_string(),
    })
}

/// The request an approved SIGN operation stands for.
pub fn approved_request(operation: &SignOperation) -> SignRequest {
    let hash = match operation.hash.as_str() {
        "sha384" => HashAlg::Sha384,
        "sha512" => HashAlg::Sha512,
        _ => HashAlg::Sha256,
    };
    SignRequest {
        name: version_name(&operation.key_id, operation.version),
        input: Some(Input::Digest {
            hash,
            bytes: hex::decode(&operation.digest).unwrap_or_default(),
        }),
        encoding: match operation.encoding.as_str() {
            "raw" => Encoding::Raw,
            _ => Encoding::Der,
        },
        input_crc32c: None,
    }
}
