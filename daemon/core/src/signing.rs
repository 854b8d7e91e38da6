//! Signing and verification: every check a signature request must pass
//! before the HSM is asked (who, which version, its state, the digest's
//! hash and length, the encoding, the caller's checksum), the HSM call, and
//! what the audit record names (the exact version and digest). Unary
//! signing and approved SIGN operations come through [`sign`], a stream's
//! items that arrived together through [`sign_batch`] (the same checks, one
//! HSM job); the caller records each outcome.

use hsm_shim::{EcdsaEncoding, HashAlg, HsmError, HsmSession, KeyLabel, SignAlgorithm, SignInput};

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

impl Prepared {
    /// The input as the HSM takes it.
    fn input(&self) -> SignInput<'_> {
        if self.is_digest {
            SignInput::Digest(&self.bytes)
        } else {
            SignInput::Message(&self.bytes)
        }
    }

    /// Asks the HSM for the signature, on a worker's `session`.
    fn sign_on(&self, session: &mut HsmSession) -> Result<Vec<u8>, HsmError> {
        session.sign(
            &self.label,
            self.sign_algorithm,
            self.input(),
            self.encoding,
        )
    }

    /// What the caller gets for the HSM's `signature`.
    fn signed(self, signature: Vec<u8>) -> Signature {
        metrics::signature(&self.version_name, self.algorithm.api_name());
        Signature {
            version_name: self.version_name,
            signature,
            algorithm: self.algorithm,
            verified_input_crc32c: self.crc_checked,
        }
    }
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
    let prepared = prepare(custody, audited, Some(signer), None, request)?;
    let job = move |session: &mut HsmSession| {
        let signature = prepared.sign_on(session)?;
        Ok((prepared, signature))
    };
    // A caller's request may be refused when the HSM queue is full (they
    // retry); the signature officers approved waits its turn instead.
    let (prepared, signature) = match signer {
        Signer::Caller(caller, _) => custody.try_hsm(caller, job).await?,
        Signer::Approved { .. } => custody.hsm.run(job).await?,
    };
    Ok(prepared.signed(signature))
}

/// Signs a caller's requests that arrived together (a stream's items) in
/// one HSM job: each is checked as [`sign`] checks a caller's request, and
/// those that pass are signed one after another on one worker's session,
/// so a stream pays one hand-off to a worker per batch instead of one per
/// signature. `requests[i]` is already refused if it is an `Err`;
/// `audited[i]` is its record, which this names the version and digest
/// in. The results come in the requests' order, one per request.
pub async fn sign_batch<A: std::ops::DerefMut<Target = Audited>>(
    custody: &Custody,
    principal: &Principal,
    audited: &mut [A],
    requests: Vec<Result<SignRequest, Error>>,
) -> Vec<Result<Signature, Error>> {
    debug_assert_eq!(audited.len(), requests.len(), "one record per request");
    let signer = Signer::Caller(principal, Approval::None);
    // The caller's share first (a stream waits for it), then the copies in
    // memory brought up to the store again, then the checks: the wait does
    // not come between a check and its signature (threat model S5).
    let asking = requests.iter().filter(|request| request.is_ok()).count();
    let share = match asking {
        0 => None,
        _ => Some(custody.hsm_share_for_batch(principal, asking).await),
    };
    let fresh = match share {
        Some(_) => custody.refresh(),
        None => Ok(()),
    };
    let mut results = Vec::with_capacity(requests.len());
    let mut prepared = Vec::new();
    for (at, (audited, request)) in audited.iter_mut().zip(requests).enumerate() {
        let checked = request.and_then(|request| {
            fresh.clone()?;
            prepare(custody, audited, Some(signer), None, &request)
        });
        match checked {
            Ok(ready) => {
                prepared.push((at, ready));
                // Filled in below, once the HSM answers.
                results.push(Err(Error::internal("not signed")));
            }
            Err(refused) => results.push(Err(refused)),
        }
    }
    let Some(share) = share.filter(|_| !prepared.is_empty()) else {
        return results;
    };
    let asked: Vec<usize> = prepared.iter().map(|(at, _)| *at).collect();
    let job = move |session: &mut HsmSession| {
        Ok(prepared
            .into_iter()
            .map(|(at, ready)| {
                let signature = ready.sign_on(session);
                (at, ready, signature)
            })
            .collect::<Vec<_>>())
    };
    match custody.hsm_batch(share, asked.len(), job).await {
        Ok(signed) => {
            for (at, ready, signature) in signed {
                results[at] = signature.map_err(Error::from).map(|s| ready.signed(s));
            }
        }
        Err(mut error) => {
            // The job as a whole failed (refused, or lost at a call past its
            // deadline): the items before that call may have been signed,
            // and none of their signatures is returned.
            error.message = format!(
                "{} (the HSM job signing this item and {} others of its stream failed; no signature of it was returned)",
                error.message,
                asked.len() - 1
            );
            for at in asked {
                results[at] = Err(error.clone());
            }
        }
    }
    results
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
    let prepared = prepare(custody, audited, None, Some(verifier), request)?;
    let version_name = prepared.version_name.clone();
    let valid = custody
        .try_hsm(verifier, move |session| {
            session.verify(
                &prepared.label,
                prepared.sign_algorithm,
                prepared.input(),
                &signature,
                prepared.encoding,
            )
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
