//! `custody.v1.EnvelopeService`: AES-256-GCM encryption, data keys and
//! rewrap, converted to and from [`custody_core::envelope`].

use std::time::Instant;

use custody_core::authz::Action;
use custody_core::envelope;
use custody_core::metrics;
use custody_core::{Custody, Error};
use custody_proto::v1::envelope_service_server::EnvelopeService;
use custody_proto::v1::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, GenerateDataKeyRequest,
    GenerateDataKeyResponse, RewrapRequest, RewrapResponse,
};
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::{Audited, Body, Run, Shared, serve};
use custody_core::identity::Principal;

/// The envelope service.
pub struct EnvelopeKeys(pub Shared);

/// The name every envelope request carries.
trait Named {
    fn name(&self) -> &str;
}

macro_rules! named {
    ($($request:ty),*) => {
        $(impl Named for $request {
            fn name(&self) -> &str {
                &self.name
            }
        })*
    };
}
named!(
    EncryptRequest,
    DecryptRequest,
    GenerateDataKeyRequest,
    RewrapRequest
);

/// Serves one envelope request, counting it in the envelope metrics.
async fn envelope_call<R, T>(
    custody: &Shared,
    method: &'static str,
    request: Request<R>,
    body: impl for<'a> FnOnce(&'a Custody, &'a mut Audited, Principal, R) -> Body<'a, T>
    + Send
    + 'static,
) -> Result<Response<T>, Status>
where
    R: Named + Send + 'static,
    T: Send + 'static,
{
    serve(
        custody,
        method,
        Action::UseEnvelopeKeys,
        request,
        Run::Inline,
        |request| request.name().to_string(),
        move |custody, audited, principal, request| {
            Box::pin(async move {
                let started = Instant::now();
                let result: Result<T, Error> = body(custody, audited, principal, request).await;
                let outcome = result.as_ref().map_or_else(|e| e.reason.as_str(), |_| "ok");
                metrics::envelope(method, outcome, started.elapsed().as_secs_f64());
                result
            })
        },
    )
    .await
}

#[tonic::async_trait]
impl EnvelopeService for EnvelopeKeys {
    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        envelope_call(
            &self.0,
            "Encrypt",
            request,
            |custody, audited, principal, request| {
                Box::pin(async move {
                    let sealed = envelope::encrypt(
                        custody,
                        audited,
                        &principal,
                        &request.name,
                        Zeroizing::new(request.plaintext),
                        &request.associated_data,
                    )
                    .await?;
                    Ok(EncryptResponse {
                        name: sealed.name,
                        ciphertext: sealed.ciphertext,
                    })
                })
            },
        )
        .await
    }

    async fn decrypt(
        &self,
        request: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        envelope_call(
            &self.0,
            "Decrypt",
            request,
            |custody, audited, principal, request| {
                Box::pin(async move {
                    let opened = envelope::decrypt(
                        custody,
                        audited,
                        &principal,
                        &request.name,
                        &request.ciphertext,
                        &request.associated_data,
                    )
                    .await?;
                    Ok(DecryptResponse {
                        name: opened.name.clone(),
                        plaintext: opened.plaintext.to_vec(),
                    })
                })
            },
        )
        .await
    }

    async fn generate_data_key(
        &self,
        request: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyResponse>, Status> {
        envelope_call(
            &self.0,
            "GenerateDataKey",
            request,
            |custody, audited, principal, request| {
                Box::pin(async move {
                    let (data_key, wrapped) = envelope::generate_data_key(
                        custody,
                        audited,
                        &principal,
                        &request.name,
                        &request.associated_data,
                    )
                    .await?;
                    Ok(GenerateDataKeyResponse {
                        name: wrapped.name,
                        plaintext: data_key.plaintext.to_vec(),
                        wrapped: wrapped.ciphertext,
                    })
                })
            },
        )
        .await
    }

    async fn rewrap(
        &self,
        request: Request<RewrapRequest>,
    ) -> Result<Response<RewrapResponse>, Status> {
        envelope_call(
            &self.0,
            "Rewrap",
            request,
            |custody, audited, principal, request| {
                Box::pin(async move {
                    let (source_name, sealed) = envelope::rewrap(
                        custody,
                        audited,
                        &principal,
                        &request.name,
                        &request.ciphertext,
                        &request.associated_data,
                    )
                    .await?;
                    Ok(RewrapResponse {
                        name: sealed.name,
                        ciphertext: sealed.ciphertext,
                        source_name,
                    })
                })
            },
        )
        .await
    }
}
