//! R5, errors that help without leaking (threat model, request surface),
//! attacked through the real gRPC server with real mTLS on SoftHSM2:
//! client input echoed back only in part, so that a huge name cannot blow
//! up the trailers (seen by a grpc-core client, Python's `grpcio`, as well as
//! by tonic); undecodable protobuf answered `INVALID_ARGUMENT` with a reason;
//! an integrity failure named in API terms, never by a PKCS#11 code or an
//! HSM label.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use custody_core::identity::Role;
use custody_proto::v1::ceremony_service_client::CeremonyServiceClient;
use custody_proto::v1::envelope_service_client::EnvelopeServiceClient;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::operation_service_client::OperationServiceClient;
use custody_proto::v1::signing_service_client::SigningServiceClient;
use custody_proto::v1::{
    CreateKeyRequest, DecryptRequest, GenerateDataKeyRequest, GetCeremonyRequest, GetKeyRequest,
    GetOperationRequest, KeyRef, OperationSpec, RequestOperationRequest, RewrapRequest,
    RotateKeyRequest, SetPolicySpec, SignRequest, operation_spec,
};
use softhsm_tests::grpcio::GrpcCore;
use softhsm_tests::service::{TestService, create_key, reason, runtime};
use softhsm_tests::token_test;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

/// The longest `grpc-message` any refusal below may carry: the ~128
/// characters of echoed input and the sentence around it.
const MAX_MESSAGE: usize = 512;

/// The longest status details (`grpc-status-details-bin`, which repeats the
/// message) any refusal below may carry.
const MAX_DETAILS: usize = 1024;

fn huge(prefix: &str) -> String {
    format!("{prefix}{}", "a".repeat(10_000))
}

/// The status is small: its message and its details.
fn assert_small(what: &str, status: &tonic::Status) {
    assert!(
        status.message().len() <= MAX_MESSAGE,
        "{what}: a {}-byte message",
        status.message().len()
    );
    assert!(
        status.details().len() <= MAX_DETAILS,
        "{what}: {} bytes of status details",
        status.details().len()
    );
}

token_test!(
    fn a_ten_thousand_character_name_is_refused_with_its_reason_and_small_trailers(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            let officer = service.client_as("alice", &[Role::Officer]).await;
            let signer = service.client("ca-issuing").await;
            let mut keys = KeyServiceClient::new(operator.clone());
            let mut refusals: Vec<(&str, tonic::Status, &str)> = Vec::new();

            let status = keys
                .get_key(GetKeyRequest { name: huge("keys/") })
                .await
                .unwrap_err();
            refusals.push(("GetKey", status, "BAD_KEY_ID"));
            let status = keys
                .create_key(CreateKeyRequest {
                    key_id: huge("k"),
                    algorithm: 1,
                    purpose: 1,
                    ..Default::default()
                })
                .await
                .unwrap_err();
            refusals.push(("CreateKey key_id", status, "BAD_KEY_ID"));
            let status = keys
                .create_key(CreateKeyRequest {
                    key_id: "fine".into(),
                    algorithm: 1,
                    purpose: 1,
                    allowed_signers: vec![huge("s")],
                    ..Default::default()
                })
                .await
                .unwrap_err();
            refusals.push(("CreateKey signer", status, "BAD_PRINCIPAL"));
            let status = keys
                .get_key(GetKeyRequest { name: huge("") })
                .await
                .unwrap_err();
            refusals.push(("GetKey without keys/", status, "BAD_NAME"));
            create_key(&operator, "kept", "EC_SIGN_P256_SHA256", None).await;
            let status = keys
                .rotate_key(RotateKeyRequest {
                    name: "keys/kept".into(),
                    request_id: huge("r"),
                })
                .await
                .unwrap_err();
            refusals.push(("RotateKey request_id", status, "BAD_REQUEST_ID"));
            let status = SigningServiceClient::new(signer.clone())
                .sign(SignRequest { name: huge("keys/kept/versions/"), ..Default::default() })
                .await
                .unwrap_err();
            refusals.push(("Sign", status, "BAD_NAME"));
            let status = OperationServiceClient::new(officer.clone())
                .get_operation(GetOperationRequest { name: huge("operations/") })
                .await
                .unwrap_err();
            refusals.push(("GetOperation", status, ""));
            let status = OperationServiceClient::new(operator.clone())
                .request_operation(RequestOperationRequest {
                    spec: Some(OperationSpec {
                        spec: Some(operation_spec::Spec::SetPolicy(SetPolicySpec {
                            name: "keys/kept".into(),
                            operation: 1,
                            officers: vec!["alice".into(), huge("o")],
                            required: 2,
                        })),
                    }),
                })
                .await
                .unwrap_err();
            refusals.push(("RequestOperation officer", status, "BAD_POLICY"));
            let status = OperationServiceClient::new(operator.clone())
                .request_operation(RequestOperationRequest {
                    spec: Some(OperationSpec {
                        spec: Some(operation_spec::Spec::Rotate(KeyRef { name: huge("keys/") })),
                    }),
                })
                .await
                .unwrap_err();
            refusals.push(("RequestOperation rotate", status, "BAD_KEY_ID"));
            let status = CeremonyServiceClient::new(officer.clone())
                .get_ceremony(GetCeremonyRequest { name: huge("ceremonies/") })
                .await
                .unwrap_err();
            refusals.push(("GetCeremony", status, ""));

            for (what, status, expected) in &refusals {
                eprintln!("{what}: {:?} [{}] {} bytes: {:.160}", status.code(), reason(status), status.message().len(), status.message());
                assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
                if !expected.is_empty() {
                    assert_eq!(reason(status), *expected, "{what}");
                }
                assert_small(what, status);
                // An echo of the input is cut short.
                assert!(
                    !status.message().contains(&"a".repeat(129)),
                    "{what}: {}",
                    status.message()
                );
            }

            // The same through grpc-core, which refuses trailers over its
            // 8 KiB metadata limit with RESOURCE_EXHAUSTED.
            let dir = service.dir().join("grpcio");
            let client = match GrpcCore::new(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")), &dir) {
                Ok(client) => client,
                Err(why) => {
                    eprintln!("SKIPPED the grpc-core half of this test: {why}");
                    return;
                }
            };
            let files = service.client_files(&dir, "operator", &[Role::Operator]);
            let [ca, cert, key] = [files.ca, files.cert, files.key].map(|path| path.display().to_string());
            let target = service.url().trim_start_matches("https://").to_string();
            let output = client.run(GRPCIO_CLIENT, &[&ca, &cert, &key, &target]);
            softhsm_tests::assert_success("the grpcio client", &output);
            let results: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            for call in ["get_key", "create_key"] {
                let result = &results[call];
                eprintln!("grpcio {call}: {result}");
                assert_eq!(result["code"], "INVALID_ARGUMENT", "{call}: {result}");
                let details = hex::decode(result["details_hex"].as_str().unwrap()).unwrap();
                let status = tonic::Status::with_details(
                    Code::InvalidArgument,
                    result["message"].as_str().unwrap(),
                    details.into(),
                );
                assert_eq!(reason(&status), "BAD_KEY_ID", "{call}");
                assert!(result["message_len"].as_u64().unwrap() <= MAX_MESSAGE as u64, "{call}: {result}");
                assert!(
                    result["trailers_bytes"].as_u64().unwrap() <= (MAX_MESSAGE + 2 * MAX_DETAILS) as u64,
                    "{call}: {result}"
                );
            }
        });
    }
);

/// Calls `GetKey` and `CreateKey` with 10,000-character names through
/// grpc-core; prints, per call, the code, the message and its length, the
/// bytes of all trailers and the status details (hex), as JSON.
const GRPCIO_CLIENT: &str = r#"
import json, sys
import grpc
from custody.v1 import keys_pb2, keys_pb2_grpc

ca, cert, key, target = sys.argv[1:5]
read = lambda path: open(path, "rb").read()
credentials = grpc.ssl_channel_credentials(
    root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert))
channel = grpc.secure_channel(target, credentials)
keys = keys_pb2_grpc.KeyServiceStub(channel)
results = {}

def call(label, method, request):
    try:
        method(request, timeout=60)
        results[label] = {"code": "OK"}
    except grpc.RpcError as error:
        trailers = error.trailing_metadata() or ()
        raw = lambda v: v if isinstance(v, bytes) else v.encode()
        results[label] = {
            "code": error.code().name,
            "message": (error.details() or "")[:600],
            "message_len": len((error.details() or "").encode()),
            "trailers_bytes": sum(len(k) + len(raw(v)) for k, v in trailers),
            "details_hex": next((raw(v).hex() for k, v in trailers if k == "grpc-status-details-bin"), ""),
        }

call("get_key", keys.GetKey, keys_pb2.GetKeyRequest(name="keys/" + "a" * 10000))
call("create_key", keys.CreateKey, keys_pb2.CreateKeyRequest(
    key_id="k" + "a" * 10000, algorithm=keys_pb2.EC_SIGN_P256_SHA256, purpose=keys_pb2.ASYMMETRIC_SIGN))
print(json.dumps(results))
"#;

/// Bytes in, bytes out: a codec that sends whatever the test says, so that
/// a request can be what no protobuf encoder would make.
#[derive(Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        let mut out = vec![0; buf.remaining()];
        buf.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// Sends `body` as the request of `method` (`/custody.v1.Service/Method`).
async fn raw_call(
    channel: &Channel,
    method: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    grpc.unary(tonic::Request::new(body), path, RawCodec)
        .await
        .map(tonic::Response::into_inner)
}

token_test!(
    fn undecodable_protobuf_is_invalid_argument_with_a_reason(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            // Field 1 (a string) announcing 5 bytes and carrying 1; a string
            // that is not UTF-8; a field number 0; a varint that never ends.
            let bodies: [(&str, Vec<u8>); 4] = [
                ("truncated", vec![0x0a, 0x05, b'a']),
                ("not UTF-8", vec![0x0a, 0x02, 0xff, 0xfe]),
                ("field 0", vec![0x00, 0x01]),
                ("endless varint", vec![0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            ];
            let methods = [
                "/custody.v1.KeyService/GetKey",
                "/custody.v1.KeyService/CreateKey",
                "/custody.v1.SigningService/Sign",
                "/custody.v1.OperationService/RequestOperation",
                "/custody.v1.CeremonyService/StartCeremony",
            ];
            for method in methods {
                for (what, body) in &bodies {
                    let status = raw_call(&operator, method, body.clone()).await.unwrap_err();
                    eprintln!("{method} {what}: {:?} [{}] {}", status.code(), reason(&status), status.message());
                    assert_eq!(status.code(), Code::InvalidArgument, "{method} {what}: {status:?}");
                    assert_eq!(reason(&status), "UNDECODABLE", "{method} {what}");
                    assert_small(method, &status);
                }
            }
            // A well-formed request through the same raw path is answered
            // as usual: the refusals above are about the bytes.
            let fine = prost::Message::encode_to_vec(&GetKeyRequest { name: "keys/none".into() });
            let status = raw_call(&operator, "/custody.v1.KeyService/GetKey", fine).await.unwrap_err();
            assert_eq!(reason(&status), "NOT_FOUND");
        });
    }
);

token_test!(
    fn an_integrity_failure_names_the_version_never_a_pkcs11_code_or_an_hsm_label(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            let app = service.client("ca-issuing").await;
            create_key(&operator, "payments-kek", "AES_256_GCM", None).await;
            let mut envelope = EnvelopeServiceClient::new(app.clone());
            let generated = envelope
                .generate_data_key(GenerateDataKeyRequest {
                    name: "keys/payments-kek".into(),
                    associated_data: b"tenant 42".to_vec(),
                })
                .await
                .unwrap()
                .into_inner();
            let mut flipped = generated.wrapped.clone();
            let last = flipped.len() - 1;
            flipped[last] ^= 1;
            let mut refusals = Vec::new();
            for (what, ciphertext, aad) in [
                ("another tenant's associated data", &generated.wrapped, &b"tenant 43"[..]),
                ("a flipped tag bit", &flipped, &b"tenant 42"[..]),
            ] {
                let status = envelope
                    .decrypt(DecryptRequest {
                        name: "keys/payments-kek".into(),
                        ciphertext: ciphertext.clone(),
                        associated_data: aad.to_vec(),
                    })
                    .await
                    .unwrap_err();
                refusals.push((format!("Decrypt, {what}"), status));
                let status = envelope
                    .rewrap(RewrapRequest {
                        name: "keys/payments-kek".into(),
                        ciphertext: ciphertext.clone(),
                        associated_data: aad.to_vec(),
                    })
                    .await
                    .unwrap_err();
                refusals.push((format!("Rewrap, {what}"), status));
            }
            for (what, status) in &refusals {
                eprintln!("{what}: {:?} [{}] {}", status.code(), reason(status), status.message());
                assert_eq!(status.code(), Code::InvalidArgument, "{what}");
                assert_eq!(reason(status), "INTEGRITY_FAILURE", "{what}");
                let message = status.message();
                assert!(message.contains("keys/payments-kek/versions/1"), "{what}: {message}");
                for leak in ["CKR_", "C_Decrypt", "key/payments-kek/v1", "GENERAL_ERROR"] {
                    assert!(!message.contains(leak), "{what}: {message:?} shows {leak}");
                }
            }
        });
    }
);
