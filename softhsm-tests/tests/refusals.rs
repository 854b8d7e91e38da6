//! Every refusal leaves one audit record (threat model R4), including the
//! ones no handler sees: a message over `max_message_bytes`, bytes that are
//! not the method's protobuf, a method that does not exist, and a
//! certificate that maps to no principal (recorded with the certificate's
//! subject, serial and SHA-256). Through the real server: custodyd
//! in-process on a fresh SoftHSM2 token, real gRPC and mTLS.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use custody_core::identity::Role;
use custody_daemon::devpki::Validity;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::signing_service_client::SigningServiceClient;
use custody_proto::v1::{ListKeysRequest, SignRequest, sign_request};
use prost::bytes::{Buf, BufMut};
use sha2::Digest as _;
use softhsm_tests::service::{TestService, create_key, reason, runtime};
use softhsm_tests::token_test;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

/// Sends and receives message bytes as they are, so a test can put anything
/// on the wire.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        Ok(Some(bytes.to_vec()))
    }
}

/// Calls `path` with `message` as its bytes.
async fn raw_call(channel: &Channel, path: &'static str, message: Vec<u8>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(message),
        PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .expect_err("the server answered bytes it cannot have understood")
}

/// Asserts that exactly one event was recorded since `from`: a request
/// record of `method` by `principal`, refused for `outcome`; returns it.
fn one_refusal(
    service: &TestService,
    from: usize,
    method: &str,
    principal: &str,
    outcome: &str,
) -> serde_json::Value {
    let events = service.audit_events_since(from);
    assert_eq!(
        events.len(),
        1,
        "{method}: not exactly one record: {events:?}"
    );
    let event = events.into_iter().next().unwrap();
    assert_eq!(event["type"], "request", "{event}");
    assert_eq!(event["method"], method, "{event}");
    assert_eq!(event["principal"], principal, "{event}");
    assert_eq!(event["outcome"], outcome, "{event}");
    event
}

token_test!(
    fn r4_refusals_that_never_reach_a_handler_are_audited(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            create_key(&operator, "issuing", "EC_SIGN_P256_SHA256", None).await;
            let signer = service.client("ca-issuing").await;

            // A message over max_message_bytes (256 KiB in tests).
            let before = service.audit_len();
            let huge = SignRequest {
                name: "keys/issuing".into(),
                input: Some(sign_request::Input::Data(vec![0; 300 * 1024])),
                ..Default::default()
            };
            let status = SigningServiceClient::new(signer.clone()).sign(huge).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
            assert_eq!(reason(&status), "MESSAGE_TOO_LARGE", "{status:?}");
            one_refusal(&service, before, "Sign", "ca-issuing", "MESSAGE_TOO_LARGE");

            // Bytes that are no SignRequest: field 1 with wire type 7, which
            // protobuf does not have.
            let before = service.audit_len();
            let status = raw_call(&signer, "/custody.v1.SigningService/Sign", vec![0x0f, 0x01]).await;
            assert!(
                matches!(status.code(), tonic::Code::InvalidArgument | tonic::Code::Internal),
                "{status:?}"
            );
            one_refusal(&service, before, "Sign", "ca-issuing", "UNDECODABLE");

            // A method the service does not have, and a service that does
            // not exist: recorded under the path asked for.
            for path in ["/custody.v1.SigningService/SignAnything", "/custody.v1.Backdoor/Open"] {
                let before = service.audit_len();
                let status = raw_call(&signer, path, Vec::new()).await;
                assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
                assert_eq!(reason(&status), "UNKNOWN_METHOD", "{status:?}");
                one_refusal(&service, before, path, "ca-issuing", "UNKNOWN_METHOD");
            }

            // The same well-formed request is served: the records above are
            // refusals, not noise on every call.
            let before = service.audit_len();
            let ok = SignRequest {
                name: "keys/issuing".into(),
                input: Some(sign_request::Input::Data(b"fine".to_vec())),
                ..Default::default()
            };
            SigningServiceClient::new(signer.clone()).sign(ok).await.unwrap();
            one_refusal(&service, before, "Sign", "ca-issuing", "ok");
        });
    }
);

token_test!(
    fn r4_an_unreadable_item_of_a_sign_stream_is_audited(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            create_key(&operator, "issuing", "EC_SIGN_P256_SHA256", None).await;
            let signer = service.client("ca-issuing").await;
            let good = SignRequest {
                name: "keys/issuing".into(),
                input: Some(sign_request::Input::Data(b"fine".to_vec())),
                ..Default::default()
            };
            for (bad, outcome) in [
                (vec![0x0f, 0x01], "UNDECODABLE"),
                (vec![0x0a; 300 * 1024], "MESSAGE_TOO_LARGE"),
            ] {
                let before = service.audit_len();
                let items = vec![prost::Message::encode_to_vec(&good), bad];
                let mut grpc = tonic::client::Grpc::new(signer.clone());
                grpc.ready().await.unwrap();
                let mut responses = grpc
                    .streaming(
                        tonic::Request::new(futures_util::stream::iter(items)),
                        PathAndQuery::from_static("/custody.v1.SigningService/SignStream"),
                        RawCodec,
                    )
                    .await
                    .unwrap()
                    .into_inner();
                // The good item is signed; the bad one ends the stream.
                let mut answers = Vec::new();
                let ended = loop {
                    match responses.message().await {
                        Ok(Some(answer)) => answers.push(answer),
                        Ok(None) => panic!("the stream ended without refusing the bad item"),
                        Err(status) => break status,
                    }
                };
                assert_eq!(answers.len(), 1, "{ended:?}");
                assert_ne!(ended.code(), tonic::Code::Ok);
                let events = service.audit_events_since(before);
                assert_eq!(events.len(), 2, "{events:?}");
                // In either order: the items run concurrently.
                let signed = events.iter().find(|e| e["method"] == "Sign").expect("the good item's record");
                assert_eq!(signed["outcome"], "ok", "{signed}");
                let refusal = events.iter().find(|e| e["method"] == "SignStream").expect("the refusal's record");
                assert_eq!(refusal["method"], "SignStream", "{refusal}");
                assert_eq!(refusal["principal"], "ca-issuing", "{refusal}");
                assert_eq!(refusal["outcome"], outcome, "{refusal}");
            }
        });
    }
);

token_test!(
    fn r4_an_identity_refusal_records_which_certificate_it_was(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            // Issued by the trusted CA, so the handshake succeeds, but with
            // no custody identity in it.
            let nobody = service
                .ca
                .issue_client("stray-laptop", &[], Validity::days(30))
                .unwrap();
            let channel = service.client_with(&nobody).await.unwrap();
            let before = service.audit_len();
            let status = KeyServiceClient::new(channel.clone())
                .list_keys(ListKeysRequest::default())
                .await
                .unwrap_err();
            assert_eq!(status.code(), tonic::Code::PermissionDenied);
            assert_eq!(reason(&status), "NO_CUSTODY_IDENTITY");
            let event = one_refusal(&service, before, "ListKeys", "-", "NO_CUSTODY_IDENTITY");
            let detail = event["detail"].as_str().unwrap();
            let fingerprint = hex::encode(sha2::Sha256::digest(&nobody.cert_der));
            assert!(detail.contains(&format!("sha256={fingerprint}")), "{detail}");
            assert!(detail.contains(&format!("serial={}", hex::encode(&nobody.serial))), "{detail}");
            assert!(detail.contains("CN=stray-laptop"), "{detail}");

            // Its unknown method is recorded with the certificate as well.
            let before = service.audit_len();
            raw_call(&channel, "/custody.v1.KeyService/Steal", Vec::new()).await;
            let event = one_refusal(&service, before, "/custody.v1.KeyService/Steal", "-", "UNKNOWN_METHOD");
            assert!(event["detail"].as_str().unwrap().contains(&fingerprint), "{event}");
        });
    }
);

token_test!(
    fn r4_a_refusal_that_cannot_be_audited_says_so(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let signer = service
                .ca
                .issue_client("ca-issuing", &[Role::Signer], Validity::days(1))
                .unwrap();
            let channel = service.client_with(&signer).await.unwrap();
            // The audit writer stops: nothing can be recorded any more.
            service.state().audit.close();
            let before = service.audit_len();
            for path in ["/custody.v1.SigningService/Sign", "/custody.v1.Backdoor/Open"] {
                let message = if path.ends_with("Sign") { vec![0x0f, 0x01] } else { Vec::new() };
                let status = raw_call(&channel, path, message).await;
                assert_eq!(status.code(), tonic::Code::Unavailable, "{path}: {status:?}");
                assert_eq!(reason(&status), "AUDIT_UNAVAILABLE", "{path}: {status:?}");
            }
            assert_eq!(service.audit_len(), before);
        });
    }
);
