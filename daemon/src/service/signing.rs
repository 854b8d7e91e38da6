//! `custody.v1.SigningService`: sign (unary and streaming) and verify,
//! converted to and from [`custody_core::signing`].

use std::pin::Pin;

use custody_core::authz::{Action, Approval};
use custody_core::identity::Principal;
use custody_core::signing::{self, Encoding, Input, Signer};
use custody_core::{Custody, Error, Reason};
use custody_proto::v1::signing_service_server::SigningService;
use custody_proto::v1::{
    Digest, SignRequest, SignResponse, SignatureEncoding, StreamError, VerifyRequest,
    VerifyResponse, digest, sign_request, verify_request,
};
use futures_util::{Stream, StreamExt};
use hsm_shim::HashAlg;
use tonic::{Request, Response, Status, Streaming};

use super::{Audited, Run, Shared, caller, serve};

/// How many requests of one stream are in flight at once, in batches of up
/// to [`STREAM_BATCH`] (answers stay in request order): the most places of
/// the HSM queue one stream holds (threat model R2; its caller's share may
/// hold it to fewer). Eight batches, so that the HSM workers still have a
/// stream's next batches queued while its earlier ones wait for their
/// audit records and answers: with four, one stream kept 1.18 CPUs of the
/// HSM workers busy, with eight 1.30 (docs/benchmarks.md).
const STREAM_WINDOW: usize = 128;

/// The most items of one stream signed in one HSM job: those that arrived
/// together, up to this many (docs/benchmarks.md: a stream's signatures
/// went up by about a quarter).
const STREAM_BATCH: usize = 16;

const _: () = assert!(
    STREAM_WINDOW % STREAM_BATCH == 0,
    "the window is a whole number of batches"
);

/// The signing service.
pub struct Signing(pub Shared);

/// A wire digest in the domain's terms.
pub(crate) fn digest_input(digest: &Digest) -> Result<Input, Error> {
    let (hash, bytes) = match &digest.digest {
        Some(digest::Digest::Sha256(b)) => (HashAlg::Sha256, b),
        Some(digest::Digest::Sha384(b)) => (HashAlg::Sha384, b),
        Some(digest::Digest::Sha512(b)) => (HashAlg::Sha512, b),
        None => return Err(Error::new(Reason::MissingInput, "the digest names no hash")),
    };
    Ok(Input::Digest {
        hash,
        bytes: bytes.clone(),
    })
}

/// A wire signature encoding in the domain's terms.
pub(crate) fn encoding(value: i32) -> Result<Encoding, Error> {
    match SignatureEncoding::try_from(value) {
        Ok(SignatureEncoding::Unspecified | SignatureEncoding::Der) => Ok(Encoding::Der),
        Ok(SignatureEncoding::Raw) => Ok(Encoding::Raw),
        Err(_) => Err(Error::new(
            Reason::BadEncoding,
            format!("unknown encoding {value}"),
        )),
    }
}

/// The domain's form of a sign request.
fn sign_request(request: &SignRequest) -> Result<signing::SignRequest, Error> {
    let input = match &request.input {
        Some(sign_request::Input::Digest(d)) => Some(digest_input(d)?),
        Some(sign_request::Input::Data(d)) => Some(Input::Data(d.clone())),
        None => None,
    };
    Ok(signing::SignRequest {
        name: request.name.clone(),
        input,
        encoding: encoding(request.encoding)?,
        input_crc32c: request.input_crc32c,
    })
}

/// Signs one request for `principal`, audited as `Sign`.
async fn sign_one(
    custody: &Custody,
    principal: &Principal,
    request: SignRequest,
) -> Result<SignResponse, Error> {
    let mut audited = Audited::start("Sign");
    audited.principal = principal.name.clone();
    audited.resource = request.name.clone();
    let request_id = request.request_id;
    let result = async {
        custody.admit(true)?;
        let request = sign_request(&request)?;
        let signer = Signer::Caller(principal, Approval::None);
        signing::sign(custody, &mut audited, signer, &request).await
    }
    .await;
    audited
        .record(custody, result)
        .await
        .map(|signed| signed_response(signed, request_id))
}

/// The answer carrying a signature.
fn signed_response(signed: signing::Signature, request_id: u64) -> SignResponse {
    SignResponse {
        name: signed.version_name,
        signature_crc32c: crc32c::crc32c(&signed.signature),
        signature: signed.signature,
        verified_input_crc32c: signed.verified_input_crc32c,
        request_id,
        algorithm: crate::wire::algorithm(signed.algorithm) as i32,
        error: None,
    }
}

/// A stream item's refusal, carried in its answer.
fn failed_item(error: Error, request_id: u64) -> SignResponse {
    SignResponse {
        request_id,
        error: Some(StreamError {
            code: crate::status::code(error.reason) as i32,
            reason: error.reason.as_str().into(),
            message: error.message,
        }),
        ..Default::default()
    }
}

/// Signs in a task of its own, so that a caller that goes away (or times out)
/// cannot cut a signature off from its audit record.
async fn spawn_sign(
    custody: Shared,
    principal: Principal,
    request: SignRequest,
) -> Result<SignResponse, Error> {
    tokio::spawn(async move { sign_one(&custody, &principal, request).await })
        .await
        .map_err(|_| Error::internal("the signing task failed"))?
}

/// A stream's items that arrived together, signed for `principal` in one
/// HSM job ([`signing::sign_batch`]), each audited as `Sign`, in a task of
/// its own (as [`spawn_sign`]). The answers in the requests' order.
async fn spawn_sign_batch(
    custody: Shared,
    principal: Principal,
    requests: Vec<SignRequest>,
) -> Vec<SignResponse> {
    let request_ids: Vec<u64> = requests.iter().map(|request| request.request_id).collect();
    let signed = tokio::spawn(async move {
        let mut audited = Vec::with_capacity(requests.len());
        let asked = requests
            .iter()
            .map(|request| {
                let mut record = Audited::start("Sign");
                record.principal = principal.name.clone();
                record.resource = request.name.clone();
                audited.push(record);
                custody.admit(true).and_then(|()| sign_request(request))
            })
            .collect();
        let results = signing::sign_batch(&custody, &principal, &mut audited, asked).await;
        let custody = &custody;
        futures_util::future::join_all(
            audited
                .into_iter()
                .zip(results)
                .map(|(record, result)| record.record(custody, result)),
        )
        .await
    })
    .await;
    match signed {
        Ok(recorded) => recorded
            .into_iter()
            .zip(request_ids)
            .map(|(result, request_id)| match result {
                Ok(signed) => signed_response(signed, request_id),
                Err(error) => failed_item(error, request_id),
            })
            .collect(),
        Err(_) => request_ids
            .into_iter()
            .map(|request_id| failed_item(Error::internal("the signing task failed"), request_id))
            .collect(),
    }
}

/// A stream item the transport could not read (over `max_message_bytes`,
/// not a `SignRequest`) ends the stream; it is recorded as the stream's
/// refusal (no handler of one item ever saw it).
async fn unreadable_item(custody: &Custody, principal: &Principal, status: Status) -> Status {
    let Some(reason) = crate::gate::unreadable_message(status.code()) else {
        return status;
    };
    let mut audited = Audited::start("SignStream");
    audited.principal = principal.name.clone();
    let refused = Error::new(reason, status.message());
    audited
        .finish::<()>(custody, Err(refused))
        .await
        .err()
        .unwrap_or(status)
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
        let custody = self.0.clone();
        // Nothing after an unreadable item is read: it ends the stream.
        let items = request.into_inner().scan(false, |failed, item| {
            let next = (!*failed).then_some(item);
            *failed = next.as_ref().is_some_and(Result::is_err);
            std::future::ready(next)
        });
        // The items that arrived together, signed in one HSM job; an
        // unreadable item ends the stream, so it is its batch's last.
        let responses = items
            .ready_chunks(STREAM_BATCH)
            .map(move |batch| {
                let custody = custody.clone();
                let principal = principal.clone();
                async move {
                    let mut requests = Vec::with_capacity(batch.len());
                    let mut unreadable = None;
                    for item in batch {
                        match item {
                            Ok(request) => requests.push(request),
                            Err(status) => unreadable = Some(status),
                        }
                    }
                    let mut answers: Vec<Result<SignResponse, Status>> = Vec::new();
                    if !requests.is_empty() {
                        let signed =
                            spawn_sign_batch(custody.clone(), principal.clone(), requests).await;
                        answers.extend(signed.into_iter().map(Ok));
                    }
                    if let Some(status) = unreadable {
                        answers.push(Err(unreadable_item(&custody, &principal, status).await));
                    }
                    futures_util::stream::iter(answers)
                }
            })
            .buffered(STREAM_WINDOW / STREAM_BATCH)
            .flatten();
        Ok(Response::new(Box::pin(responses)))
    }

    async fn verify(
        &self,
        request: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        serve(
            &self.0,
            "Verify",
            Action::ReadKeys,
            request,
            Run::Inline,
            |request| request.name.clone(),
            |custody, audited, principal, request| {
                Box::pin(async move {
                    let input = match &request.input {
                        Some(verify_request::Input::Digest(d)) => Some(digest_input(d)?),
                        Some(verify_request::Input::Data(d)) => Some(Input::Data(d.clone())),
                        None => None,
                    };
                    let asked = signing::SignRequest {
                        name: request.name.clone(),
                        input,
                        encoding: encoding(request.encoding)?,
                        input_crc32c: None,
                    };
                    let (name, valid) =
                        signing::verify(custody, audited, &principal, &asked, request.signature)
                            .await?;
                    Ok(VerifyResponse { valid, name })
                })
            },
        )
        .await
    }
}
