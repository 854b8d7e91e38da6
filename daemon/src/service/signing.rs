//! `custody.v1.SigningService`: sign (unary and streaming) and verify.

use std::pin::Pin;

use custody_core::algorithms::hash_bytes;
use custody_proto::v1::signing_service_server::SigningService;
use custody_proto::v1::{
    Digest, SignRequest, SignResponse, SignatureEncoding, StreamError, VerifyRequest,
    VerifyResponse, digest, sign_request, verify_request,
};
use futures_util::{Stream, StreamExt};
use hsm_shim::{EcdsaEncoding, HashAlg, KeyLabel, SignAlgorithm, SignInput};
use tonic::{Request, Response, Status, Streaming};

use super::keys::check_usable;
use super::keys::{Approval, ungated};
use super::{Audited, MAX_SIGN_DATA, Shared, caller, require};
use custody_core::Custody;
use custody_core::algorithms::KeyAlgorithm;
use custody_core::identity::{Principal, Role};
use custody_core::lifecycle::Use;
use custody_core::metrics;
use custody_core::names::{parse_version_name, version_name};
use custody_core::{Error, Reason};

/// How many requests of one stream are in flight at once (answers stay in
/// request order).
const STREAM_WINDOW: usize = 64;

/// The signing service.
pub struct Signing(pub Shared);

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

enum Input<'a> {
    Digest(&'a Digest),
    Data(&'a [u8]),
}

fn hash_name(hash: HashAlg) -> &'static str {
    match hash {
        HashAlg::Sha256 => "sha256",
        HashAlg::Sha384 => "sha384",
        HashAlg::Sha512 => "sha512",
    }
}

/// Checks a sign or verify request against the registry and the caller, and
/// says what the audit record will name. No HSM call happens here.
/// The parts of a sign or verify request that `prepare` checks.
struct Asked<'a> {
    name: &'a str,
    input: Option<Input<'a>>,
    encoding: i32,
    input_crc32c: Option<u32>,
}

fn prepare(
    state: &Custody,
    audited: &mut Audited,
    approval: Approval,
    principal: Option<&Principal>,
    asked: Asked<'_>,
) -> Result<Prepared, Error> {
    let Asked {
        name,
        input,
        encoding,
        input_crc32c,
    } = asked;
    // Refusals are recorded with what was asked for.
    audited.resource = name.to_string();
    let (key_id, version) = parse_version_name(name)?;
    let record = state
        .registry
        .get(key_id)
        .ok_or_else(|| Error::new(Reason::NotFound, format!("no key keys/{key_id}")))?;
    let number = version.unwrap_or(record.primary_version);
    let version = record.version(number).ok_or_else(|| {
        Error::new(
            Reason::NotFound,
            format!("no version {}", version_name(key_id, number)),
        )
    })?;
    audited.resource = version_name(key_id, number);
    if let Some(principal) = principal {
        require(principal, Role::Signer)?;
        if !record.allowed_signers.contains(&principal.name) {
            return Err(Error::new(
                Reason::NotAllowedSigner,
                format!(
                    "{} is not on the allow-list of keys/{key_id}",
                    principal.name
                ),
            ));
        }
        ungated(&record, "SIGN", approval)?;
    }
    let usage = if principal.is_some() {
        Use::Protect
    } else {
        Use::Process
    };
    check_usable(&record, version, usage, state.clock.now_ms())?;
    let algorithm = KeyAlgorithm::from_api_name(&record.algorithm)
        .ok_or_else(|| Error::new(Reason::Internal, "unknown stored algorithm"))?;
    let sign_algorithm = algorithm.sign_algorithm().ok_or_else(|| {
        Error::new(
            Reason::WrongPurpose,
            format!("keys/{key_id} is an ENCRYPT_DECRYPT key; use EnvelopeService"),
        )
    })?;
    let encoding = match SignatureEncoding::try_from(encoding) {
        Ok(SignatureEncoding::Unspecified | SignatureEncoding::Der) => EcdsaEncoding::Der,
        Ok(SignatureEncoding::Raw) if sign_algorithm.is_ecdsa() => EcdsaEncoding::Raw,
        Ok(SignatureEncoding::Raw) => {
            return Err(Error::new(
                Reason::BadEncoding,
                "RAW encoding exists for ECDSA keys only",
            ));
        }
        Err(_) => {
            return Err(Error::new(
                Reason::BadEncoding,
                format!("unknown encoding {encoding}"),
            ));
        }
    };
    let input = input.ok_or_else(|| Error::new(Reason::MissingInput, "give a digest or data"))?;
    let raw_input: &[u8] = match input {
        Input::Digest(d) => match &d.digest {
            Some(
                digest::Digest::Sha256(b) | digest::Digest::Sha384(b) | digest::Digest::Sha512(b),
            ) => b,
            None => {
                return Err(Error::new(Reason::MissingInput, "the digest names no hash"));
            }
        },
        Input::Data(data) => data,
    };
    let crc_checked = match input_crc32c {
        Some(expected) if crc32c::crc32c(raw_input) != expected => {
            return Err(Error::new(
                Reason::ChecksumMismatch,
                "input_crc32c does not match the input: it was corrupted on the way",
            ));
        }
        Some(_) => true,
        None => false,
    };
    let (bytes, is_digest) = match (input, sign_algorithm.hash()) {
        (Input::Digest(_), None) => {
            return Err(Error::new(
                Reason::DigestNotAccepted,
                "Ed25519 keys sign data, not digests",
            ));
        }
        (Input::Digest(d), Some(hash)) => {
            let (given, bytes) = match &d.digest {
                Some(digest::Digest::Sha256(b)) => (HashAlg::Sha256, b),
                Some(digest::Digest::Sha384(b)) => (HashAlg::Sha384, b),
                Some(digest::Digest::Sha512(b)) => (HashAlg::Sha512, b),
                None => unreachable_digest()?,
            };
            if given != hash {
                return Err(Error::new(
                    Reason::DigestAlgorithmMismatch,
                    format!(
                        "{} signs {} digests, not {}",
                        algorithm.api_name(),
                        hash_name(hash),
                        hash_name(given)
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
                _ => (data.to_vec(), false),
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

// `prepare` matched the digest's presence just above.
fn unreachable_digest<T>() -> Result<T, Error> {
    Err(Error::new(Reason::MissingInput, "the digest names no hash"))
}

/// Signs one request for `principal`; see [`Approval`].
pub(crate) async fn sign_one(
    state: &Custody,
    principal: &Principal,
    request: SignRequest,
    approval: Approval,
) -> Result<SignResponse, Error> {
    let method = match approval {
        Approval::None => "Sign",
        Approval::Quorum => "ExecuteSign",
    };
    let mut audited = Audited::start(method);
    audited.principal = principal.name.clone();
    let request_id = request.request_id;
    let result = async {
        let input = match &request.input {
            Some(sign_request::Input::Digest(d)) => Some(Input::Digest(d)),
            Some(sign_request::Input::Data(d)) => Some(Input::Data(d)),
            None => None,
        };
        let prepared = prepare(
            state,
            &mut audited,
            approval,
            Some(principal),
            Asked {
                name: &request.name,
                input,
                encoding: request.encoding,
                input_crc32c: request.input_crc32c,
            },
        )?;
        let Prepared {
            version_name,
            label,
            algorithm,
            sign_algorithm,
            bytes,
            is_digest,
            encoding,
            crc_checked,
        } = prepared;
        let signature = state
            .hsm
            .run(move |session| {
                let input = if is_digest {
                    SignInput::Digest(&bytes)
                } else {
                    SignInput::Message(&bytes)
                };
                session.sign(&label, sign_algorithm, input, encoding)
            })
            .await?;
        metrics::signature(&version_name, algorithm.api_name());
        Ok(SignResponse {
            name: version_name,
            signature_crc32c: crc32c::crc32c(&signature),
            signature,
            verified_input_crc32c: crc_checked,
            request_id,
            algorithm: crate::wire::algorithm(algorithm) as i32,
            error: None,
        })
    }
    .await;
    audited.record(state, result).await
}

/// Signs in a task of its own, so that a caller that goes away (or times out)
/// cannot cut a signature off from its audit record.
async fn spawn_sign(
    state: Shared,
    principal: Principal,
    request: SignRequest,
) -> Result<SignResponse, Error> {
    tokio::spawn(async move { sign_one(&state, &principal, request, Approval::None).await })
        .await
        .map_err(|_| Error::new(Reason::Internal, "the signing task failed"))?
}

type SignStreamResponses = Pin<Box<dyn Stream<Item = Result<SignResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SigningService for Signing {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let principal = match caller(&request) {
            Ok(principal) => principal,
            Err(error) => return Audited::start("Sign").finish(&self.0, Err(error)).await,
        };
        spawn_sign(self.0.clone(), principal, request.into_inner())
            .await
            .map(Response::new)
            .map_err(crate::status::to_status)
    }

    type SignStreamStream = SignStreamResponses;

    async fn sign_stream(
        &self,
        request: Request<Streaming<SignRequest>>,
    ) -> Result<Response<Self::SignStreamStream>, Status> {
        let principal = match caller(&request) {
            Ok(principal) => principal,
            Err(error) => {
                return Audited::start("SignStream")
                    .finish(&self.0, Err(error))
                    .await;
            }
        };
        let state = self.0.clone();
        let responses = request
            .into_inner()
            .map(move |item| {
                let state = state.clone();
                let principal = principal.clone();
                async move {
                    let request = item?;
                    let request_id = request.request_id;
                    Ok(match spawn_sign(state, principal, request).await {
                        Ok(response) => response,
                        Err(error) => SignResponse {
                            request_id,
                            error: Some(StreamError {
                                code: crate::status::code(error.reason) as i32,
                                reason: error.reason.as_str().into(),
                                message: error.message,
                            }),
                            ..Default::default()
                        },
                    })
                }
            })
            .buffered(STREAM_WINDOW);
        Ok(Response::new(Box::pin(responses)))
    }

    async fn verify(
        &self,
        request: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        let mut audited = Audited::start("Verify");
        let result = async {
            audited.principal = caller(&request)?.name;
            let request = request.get_ref();
            let input = match &request.input {
                Some(verify_request::Input::Digest(d)) => Some(Input::Digest(d)),
                Some(verify_request::Input::Data(d)) => Some(Input::Data(d)),
                None => None,
            };
            let prepared = prepare(
                &self.0,
                &mut audited,
                Approval::None,
                None,
                Asked {
                    name: &request.name,
                    input,
                    encoding: request.encoding,
                    input_crc32c: None,
                },
            )?;
            let Prepared {
                version_name,
                label,
                sign_algorithm,
                bytes,
                is_digest,
                encoding,
                ..
            } = prepared;
            let signature = request.signature.clone();
            let valid = self
                .0
                .hsm
                .run(move |session| {
                    let input = if is_digest {
                        SignInput::Digest(&bytes)
                    } else {
                        SignInput::Message(&bytes)
                    };
                    session.verify(&label, sign_algorithm, input, &signature, encoding)
                })
                .await?;
            Ok(VerifyResponse {
                valid,
                name: version_name,
            })
        }
        .await;
        audited.finish(&self.0, result).await.map(Response::new)
    }
}

/// Checks a digest to be signed under quorum, exactly as `Sign` would, and
/// returns what the operation records: key id, version, hash name, digest
/// (hex) and encoding name. No HSM call.
pub(crate) fn check_sign_operation(
    state: &Custody,
    principal: &Principal,
    name: &str,
    digest: &Digest,
    encoding: i32,
) -> Result<(String, u32, String, String, String), Error> {
    let mut audited = Audited::start("RequestOperation");
    let prepared = prepare(
        state,
        &mut audited,
        Approval::Quorum,
        Some(principal),
        Asked {
            name,
            input: Some(Input::Digest(digest)),
            encoding,
            input_crc32c: None,
        },
    )?;
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
    Ok((
        key_id.to_string(),
        version.unwrap_or(1),
        hash.to_string(),
        hex::encode(&prepared.bytes),
        encoding.to_string(),
    ))
}
