//! custodyd end to end: the real gRPC server on loopback with real mTLS, on a
//! SoftHSM2 token of the test's own.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::time::Duration;

use custody_core::algorithms::KeyAlgorithm;
use custody_core::identity::Role;
use custody_daemon::devpki::{Ca, Validity, self_signed_client};
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::signing_service_client::SigningServiceClient;
use custody_proto::v1::{
    CreateKeyRequest, Digest, GetKeyRequest, GetPublicKeyRequest, KeyVersionState, ListKeysRequest,
    RotateKeyRequest, SetKeyVersionStateRequest, SignRequest, SignatureEncoding, VerifyRequest,
    digest, sign_request, verify_request,
};
use hsm_shim::pkcs11::{Function, RvError};
use hsm_shim::{SignAlgorithm, SignInput};
use sha2::Digest as _;
use softhsm_tests::service::{TestService, reason, runtime, sign_in_one_stream};
use softhsm_tests::{TestToken, openssl_verifies_pem, token_test};
use tonic::transport::Channel;

fn sha256_digest(data: &[u8]) -> Digest {
    Digest {
        digest: Some(digest::Digest::Sha256(sha2::Sha256::digest(data).to_vec())),
    }
}

fn sign_digest(name: &str, digest: Digest) -> SignRequest {
    SignRequest {
        name: name.into(),
        input: Some(sign_request::Input::Digest(digest)),
        ..Default::default()
    }
}

async fn create(
    channel: &Channel,
    key_id: &str,
    algorithm: KeyAlgorithm,
    signers: &[&str],
) -> custody_proto::v1::Key {
    KeyServiceClient::new(channel.clone())
        .create_key(CreateKeyRequest {
            key_id: key_id.into(),
            algorithm: custody_daemon::wire::algorithm(algorithm) as i32,
            purpose: custody_daemon::wire::purpose(algorithm.purpose()) as i32,
            allowed_signers: signers.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn public_key(channel: &Channel, name: &str) -> String {
    let key = KeyServiceClient::new(channel.clone())
        .get_public_key(GetPublicKeyRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(crc32c(key.pem.as_bytes()), key.pem_crc32c);
    key.pem
}

fn crc32c(bytes: &[u8]) -> u32 {
    // The same CRC32C the service uses, recomputed independently here.
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn openssl_ok(
    token: &TestToken,
    pem: &str,
    algorithm: SignAlgorithm,
    input: SignInput<'_>,
    signature: &[u8],
) -> bool {
    openssl_verifies_pem(&token.scratch(), pem, algorithm, input, signature)
}

token_test!(
    fn a_ca_creates_a_key_signs_digests_and_messages_and_openssl_verifies(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            let ca = service.client("ca-issuing").await;
            let key = create(&operator, "issuing", KeyAlgorithm::from_api_name("EC_SIGN_P256_SHA256").unwrap(), &["ca-issuing"]).await;
            assert_eq!(key.name, "keys/issuing");
            assert_eq!(key.primary_version, 1);
            assert_eq!(key.versions[0].state, KeyVersionState::Active as i32);

            let pem = public_key(&ca, "keys/issuing").await;
            let tbs = b"tbsCertificate";
            let digest = sha2::Sha256::digest(tbs).to_vec();
            let mut signing = SigningServiceClient::new(ca.clone());
            let mut request = sign_digest("keys/issuing", sha256_digest(tbs));
            request.input_crc32c = Some(crc32c(&digest));
            request.request_id = 7;
            let signed = signing.sign(request).await.unwrap().into_inner();
            assert_eq!(signed.name, "keys/issuing/versions/1");
            assert_eq!(signed.request_id, 7);
            assert!(signed.verified_input_crc32c);
            assert_eq!(crc32c(&signed.signature), signed.signature_crc32c);
            let alg = SignAlgorithm::EcdsaP256Sha256;
            assert!(openssl_ok(token, &pem, alg, SignInput::Digest(&digest), &signed.signature));

            // The message form: the service hashes.
            let signed = signing
                .sign(SignRequest {
                    name: "keys/issuing/versions/1".into(),
                    input: Some(sign_request::Input::Data(tbs.to_vec())),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert!(openssl_ok(token, &pem, alg, SignInput::Digest(&digest), &signed.signature));

            // RAW encoding is r || s, and Verify accepts it as RAW.
            let raw = signing
                .sign(SignRequest {
                    encoding: SignatureEncoding::Raw as i32,
                    ..sign_digest("keys/issuing", sha256_digest(tbs))
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(raw.signature.len(), 64);
            let verdict = signing
                .verify(VerifyRequest {
                    name: "keys/issuing".into(),
                    input: Some(verify_request::Input::Digest(sha256_digest(tbs))),
                    signature: raw.signature.clone(),
                    encoding: SignatureEncoding::Raw as i32,
                })
                .await
                .unwrap()
                .into_inner();
            assert!(verdict.valid);
            let mut bad = raw.signature.clone();
            bad[10] ^= 1;
            let verdict = signing
                .verify(VerifyRequest {
                    name: "keys/issuing".into(),
                    input: Some(verify_request::Input::Digest(sha256_digest(tbs))),
                    signature: bad,
                    encoding: SignatureEncoding::Raw as i32,
                })
                .await
                .unwrap()
                .into_inner();
            assert!(!verdict.valid);
        });
    }
);

token_test!(
    fn every_algorithm_signs_what_openssl_verifies(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            let ca = service.client("ca-issuing").await;
            let algorithms = [
                "EC_SIGN_P256_SHA256",
                "EC_SIGN_P384_SHA384",
                "EC_SIGN_ED25519",
                "RSA_SIGN_PSS_2048_SHA256",
                "RSA_SIGN_PKCS1_2048_SHA256",
                "RSA_SIGN_PSS_3072_SHA256",
                "RSA_SIGN_PKCS1_4096_SHA512",
            ];
            let message = b"to be signed";
            for name in algorithms {
                let algorithm = KeyAlgorithm::from_api_name(name).unwrap();
                let key_id = name.to_lowercase().replace('_', "-");
                create(&operator, &key_id, algorithm, &["ca-issuing"]).await;
                let pem = public_key(&ca, &format!("keys/{key_id}")).await;
                let signed = SigningServiceClient::new(ca.clone())
                    .sign(SignRequest {
                        name: format!("keys/{key_id}"),
                        input: Some(sign_request::Input::Data(message.to_vec())),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(signed.algorithm, custody_daemon::wire::algorithm(algorithm) as i32);
                let input = SignInput::Message(message);
                assert!(openssl_ok(token, &pem, algorithm.sign_algorithm().unwrap(), input, &signed.signature), "{name}");
            }
        });
    }
);

fn p256() -> KeyAlgorithm {
    KeyAlgorithm::from_api_name("EC_SIGN_P256_SHA256").unwrap()
}

token_test!(
    fn rotation_states_listing_and_restart_keep_the_registry_true(token) {
        runtime().block_on(async {
            let mut service = TestService::start(token).await;
            let operator = service.client("operator").await;
            for i in 0..5 {
                create(&operator, &format!("key-{i}"), p256(), &["ca-issuing"]).await;
            }
            let mut keys = KeyServiceClient::new(operator.clone());
            let rotated = keys.rotate_key(RotateKeyRequest { name: "keys/key-0".into(), ..Default::default() }).await.unwrap().into_inner();
            assert_eq!(rotated.primary_version, 2);
            assert_eq!(rotated.versions.len(), 2);

            // Pages of two, in name order, covering everything once.
            let mut names = Vec::new();
            let mut token_ = String::new();
            loop {
                let page = keys
                    .list_keys(ListKeysRequest { page_size: 2, page_token: token_.clone() })
                    .await
                    .unwrap()
                    .into_inner();
                assert!(page.keys.len() <= 2);
                names.extend(page.keys.iter().map(|k| k.name.clone()));
                if page.next_page_token.is_empty() {
                    break;
                }
                token_ = page.next_page_token;
            }
            assert_eq!(names, (0..5).map(|i| format!("keys/key-{i}")).collect::<Vec<_>>());
            let bad = keys.list_keys(ListKeysRequest { page_size: 5000, page_token: String::new() }).await.unwrap_err();
            assert_eq!(bad.code(), tonic::Code::InvalidArgument);

            // The primary signs by default; version 1 still signs when named.
            let ca = service.client("ca-issuing").await;
            let mut signing = SigningServiceClient::new(ca.clone());
            let by_default = signing.sign(sign_digest("keys/key-0", sha256_digest(b"x"))).await.unwrap().into_inner();
            assert_eq!(by_default.name, "keys/key-0/versions/2");
            let v1 = signing.sign(sign_digest("keys/key-0/versions/1", sha256_digest(b"x"))).await.unwrap().into_inner();
            assert_eq!(v1.name, "keys/key-0/versions/1");

            // Suspended versions do not sign; reactivated ones do; the primary
            // cannot be deactivated; deactivation is final.
            let set = |name: &str, state: KeyVersionState| SetKeyVersionStateRequest { name: name.into(), state: state as i32, ..Default::default() };
            keys.set_key_version_state(set("keys/key-0/versions/1", KeyVersionState::Suspended)).await.unwrap();
            let refused = signing.sign(sign_digest("keys/key-0/versions/1", sha256_digest(b"x"))).await.unwrap_err();
            assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
            assert_eq!(reason(&refused), "VERSION_NOT_ACTIVE");
            keys.set_key_version_state(set("keys/key-0/versions/1", KeyVersionState::Active)).await.unwrap();
            signing.sign(sign_digest("keys/key-0/versions/1", sha256_digest(b"x"))).await.unwrap();
            let primary = keys.set_key_version_state(set("keys/key-0/versions/2", KeyVersionState::Deactivated)).await.unwrap_err();
            assert_eq!(reason(&primary), "PRIMARY_VERSION");
            keys.set_key_version_state(set("keys/key-0/versions/1", KeyVersionState::Deactivated)).await.unwrap();
            let back = keys.set_key_version_state(set("keys/key-0/versions/1", KeyVersionState::Active)).await.unwrap_err();
            assert_eq!(reason(&back), "ILLEGAL_TRANSITION");
            let before = keys.get_key(GetKeyRequest { name: "keys/key-0".into() }).await.unwrap().into_inner();

            // A restart reads the same registry back and the keys still sign.
            drop((keys, signing, operator, ca));
            service.restart().await;
            let operator = service.client("operator").await;
            let after = KeyServiceClient::new(operator)
                .get_key(GetKeyRequest { name: "keys/key-0".into() })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(after, before);
            let ca = service.client("ca-issuing").await;
            SigningServiceClient::new(ca).sign(sign_digest("keys/key-4", sha256_digest(b"y"))).await.unwrap();
        });
    }
);

/// Number of records in the audit log.
fn audit_records(service: &TestService) -> usize {
    service.state().audit.records(1).count()
}

token_test!(
    fn bad_requests_are_refused_with_a_stable_reason_one_audit_record_and_no_hsm_call(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            create(&operator, "ec", p256(), &["ca-issuing"]).await;
            create(&operator, "ed", KeyAlgorithm::from_api_name("EC_SIGN_ED25519").unwrap(), &["ca-issuing"]).await;
            create(&operator, "other", p256(), &["someone-else"]).await;
            let ca = service.client("ca-issuing").await;
            let mut signing = SigningServiceClient::new(ca.clone());
            // A tripwire: any C_Sign from here on would fire it.
            service.state().hsm.faults().fail_next(Function::Sign, RvError::DeviceError, 1);

            let digest_of = |d: digest::Digest| Digest { digest: Some(d) };
            let cases: Vec<(&str, SignRequest, tonic::Code, &str)> = vec![
                ("unknown key", sign_digest("keys/nope", sha256_digest(b"x")), tonic::Code::NotFound, "NOT_FOUND"),
                ("unknown version", sign_digest("keys/ec/versions/9", sha256_digest(b"x")), tonic::Code::NotFound, "NOT_FOUND"),
                ("malformed name", sign_digest("ec", sha256_digest(b"x")), tonic::Code::InvalidArgument, "BAD_NAME"),
                ("short digest", sign_digest("keys/ec", digest_of(digest::Digest::Sha256(vec![1; 31]))), tonic::Code::InvalidArgument, "DIGEST_LENGTH"),
                ("wrong hash", sign_digest("keys/ec", digest_of(digest::Digest::Sha384(vec![1; 48]))), tonic::Code::InvalidArgument, "DIGEST_ALGORITHM_MISMATCH"),
                ("empty digest", sign_digest("keys/ec", Digest { digest: None }), tonic::Code::InvalidArgument, "MISSING_INPUT"),
                ("no input", SignRequest { name: "keys/ec".into(), ..Default::default() }, tonic::Code::InvalidArgument, "MISSING_INPUT"),
                ("digest for Ed25519", sign_digest("keys/ed", sha256_digest(b"x")), tonic::Code::InvalidArgument, "DIGEST_NOT_ACCEPTED"),
                ("unknown encoding", SignRequest { encoding: 77, ..sign_digest("keys/ec", sha256_digest(b"x")) }, tonic::Code::InvalidArgument, "BAD_ENCODING"),
                ("RAW for Ed25519", SignRequest { encoding: SignatureEncoding::Raw as i32, name: "keys/ed".into(), input: Some(sign_request::Input::Data(b"m".to_vec())), ..Default::default() }, tonic::Code::InvalidArgument, "BAD_ENCODING"),
                ("checksum mismatch", SignRequest { input_crc32c: Some(1), ..sign_digest("keys/ec", sha256_digest(b"x")) }, tonic::Code::InvalidArgument, "CHECKSUM_MISMATCH"),
                ("data too large", SignRequest { name: "keys/ec".into(), input: Some(sign_request::Input::Data(vec![0; 64 * 1024 + 1])), ..Default::default() }, tonic::Code::InvalidArgument, "DATA_TOO_LARGE"),
                ("not on the allow-list", sign_digest("keys/other", sha256_digest(b"x")), tonic::Code::PermissionDenied, "NOT_ALLOWED_SIGNER"),
            ];
            for (what, request, code, expected_reason) in cases {
                let before = audit_records(&service);
                let status = signing.sign(request).await.expect_err(what);
                assert_eq!(status.code(), code, "{what}: {status:?}");
                assert_eq!(reason(&status), expected_reason, "{what}");
                assert_eq!(audit_records(&service), before + 1, "{what}: exactly one audit record");
            }
            // Wrong role: an operator cannot sign, an auditor cannot create keys.
            let status = SigningServiceClient::new(operator.clone()).sign(sign_digest("keys/ec", sha256_digest(b"x"))).await.unwrap_err();
            assert_eq!((status.code(), reason(&status).as_str()), (tonic::Code::PermissionDenied, "ROLE_REQUIRED"));
            let auditor = service.client("auditor").await;
            let status = KeyServiceClient::new(auditor)
                .create_key(CreateKeyRequest { key_id: "x".into(), algorithm: custody_daemon::wire::algorithm(p256()) as i32, purpose: 1, allowed_signers: vec![], ..Default::default() })
                .await
                .unwrap_err();
            assert_eq!((status.code(), reason(&status).as_str()), (tonic::Code::PermissionDenied, "ROLE_REQUIRED"));
            let fired = service.state().hsm.faults().fired();
            assert!(fired.is_empty(), "invalid requests reached the HSM: {fired:?}");

            // Bad create requests.
            let mut keys = KeyServiceClient::new(operator);
            let bad_creates = [
                (CreateKeyRequest { key_id: "Bad_Id".into(), algorithm: custody_daemon::wire::algorithm(p256()) as i32, purpose: 1, allowed_signers: vec![], ..Default::default() }, "BAD_KEY_ID"),
                (CreateKeyRequest { key_id: "k".into(), algorithm: 0, purpose: 1, allowed_signers: vec![], ..Default::default() }, "BAD_ALGORITHM"),
                (CreateKeyRequest { key_id: "k".into(), algorithm: 999, purpose: 1, allowed_signers: vec![], ..Default::default() }, "BAD_ALGORITHM"),
                (CreateKeyRequest { key_id: "k".into(), algorithm: custody_daemon::wire::algorithm(p256()) as i32, purpose: 0, allowed_signers: vec![], ..Default::default() }, "BAD_PURPOSE"),
                (CreateKeyRequest { key_id: "k".into(), algorithm: custody_daemon::wire::algorithm(p256()) as i32, purpose: 1, allowed_signers: vec!["Not Valid".into()], ..Default::default() }, "BAD_PRINCIPAL"),
                (CreateKeyRequest { key_id: "ec".into(), algorithm: custody_daemon::wire::algorithm(p256()) as i32, purpose: 1, allowed_signers: vec![], ..Default::default() }, "KEY_EXISTS"),
            ];
            for (request, expected) in bad_creates {
                let status = keys.create_key(request).await.unwrap_err();
                assert_eq!(reason(&status), expected);
            }

            // A message over the configured limit never reaches the handler.
            let huge = SignRequest { name: "keys/ec".into(), input: Some(sign_request::Input::Data(vec![0; 300 * 1024])), ..Default::default() };
            let status = signing.sign(huge).await.unwrap_err();
            assert!(matches!(status.code(), tonic::Code::ResourceExhausted | tonic::Code::OutOfRange), "{status:?}");

            // The tripwire was live all along: a valid request reaches C_Sign
            // (and survives the armed device error).
            signing.sign(sign_digest("keys/ec", sha256_digest(b"x"))).await.unwrap();
            assert_eq!(service.state().hsm.faults().fired().len(), 1);
        });
    }
);

/// True if `channel` can make no successful call.
async fn refused(service: &TestService, issued: &custody_daemon::devpki::Issued) -> bool {
    let Ok(channel) = service.client_with(issued).await else {
        return true;
    };
    !gets_in(channel).await
}

/// Whether a call on `channel` gets past the certificate and identity
/// checks: answered, or refused only for its role (a signer may not list
/// keys, R6).
async fn gets_in(channel: tonic::transport::Channel) -> bool {
    match KeyServiceClient::new(channel)
        .list_keys(ListKeysRequest::default())
        .await
    {
        Ok(_) => true,
        Err(status) => reason(&status) == "ROLE_REQUIRED",
    }
}

token_test!(
    fn bad_client_certificates_are_refused(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let signer = [Role::Signer];
            let now = time::OffsetDateTime::now_utc();
            let expired = Validity { not_before: now - time::Duration::days(30), not_after: now - time::Duration::days(1) };
            let not_yet = Validity { not_before: now + time::Duration::days(1), not_after: now + time::Duration::days(30) };
            let rogue = Ca::new("rogue CA").unwrap();
            let negatives = [
                ("self-signed", self_signed_client("ca-issuing", &signer).unwrap()),
                ("wrong CA", rogue.issue_client("ca-issuing", &signer, Validity::days(30)).unwrap()),
                ("expired", service.ca.issue_client("ca-issuing", &signer, expired).unwrap()),
                ("not yet valid", service.ca.issue_client("ca-issuing", &signer, not_yet).unwrap()),
                ("revoked", service.revoked.clone()),
                ("no custody identity", service.ca.issue_client("ca-issuing", &[], Validity::days(30)).unwrap()),
            ];
            for (what, issued) in &negatives {
                assert!(refused(&service, issued).await, "{what} certificate was accepted");
            }
            // No client certificate at all.
            let anonymous = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(service.ca.cert_pem()))
                .domain_name("localhost");
            let channel = tonic::transport::Channel::from_shared(service.url()).unwrap().tls_config(anonymous).unwrap();
            let outcome = match channel.connect().await {
                Ok(channel) => KeyServiceClient::new(channel).list_keys(ListKeysRequest::default()).await.is_ok(),
                Err(_) => false,
            };
            assert!(!outcome, "a client without a certificate got an answer");
            // The positive control: a good certificate gets in.
            let good = service.ca.issue_client("ca-issuing", &signer, Validity::days(30)).unwrap();
            assert!(!refused(&service, &good).await);
        });
    }
);

token_test!(
    fn sign_stream_answers_every_request_in_order_and_reports_failed_items_inline(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            create(&operator, "batch", p256(), &["ca-issuing"]).await;
            let ca = service.client("ca-issuing").await;
            let pem = public_key(&ca, "keys/batch").await;
            let requests: Vec<SignRequest> = (0..200u64)
                .map(|i| {
                    let name = if i == 57 { "keys/missing" } else { "keys/batch" };
                    SignRequest { request_id: i, ..sign_digest(name, sha256_digest(&i.to_be_bytes())) }
                })
                .collect();
            let responses = sign_in_one_stream(ca, requests).await;
            assert_eq!(responses.len(), 200);
            for (i, response) in responses.iter().enumerate() {
                assert_eq!(response.request_id, i as u64, "answers out of order");
                if i == 57 {
                    let error = response.error.as_ref().expect("the bad item reports its error");
                    assert_eq!(error.reason, "NOT_FOUND");
                    assert!(response.signature.is_empty());
                    continue;
                }
                assert!(response.error.is_none());
                let digest = sha2::Sha256::digest((i as u64).to_be_bytes()).to_vec();
                if i % 40 == 0 {
                    assert!(openssl_ok(token, &pem, SignAlgorithm::EcdsaP256Sha256, SignInput::Digest(&digest), &response.signature));
                }
            }
        });
    }
);

token_test!(
    fn every_item_of_a_stream_is_checked_alone_though_its_batch_is_signed_in_one_hsm_job(token) {
        // Threat model D5: a stream's items that arrive together are signed
        // in one HSM job; a SIGN quorum, an allow-list and a missing key
        // still decide each item alone, and each item has its own record.
        use custody_proto::v1::OperationKind;
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            create(&operator, "free", p256(), &["ca-issuing"]).await;
            create(&operator, "gated", p256(), &["ca-issuing"]).await;
            create(&operator, "theirs", p256(), &["ca-other"]).await;
            service.gate("gated", OperationKind::Sign).await;
            let ca = service.client("ca-issuing").await;
            let pem = public_key(&ca, "keys/free").await;
            let before = service.audit_events_since(0).len();
            let keys = ["keys/free", "keys/gated", "keys/theirs", "keys/missing"];
            let requests: Vec<SignRequest> = (0..64u64)
                .map(|i| SignRequest {
                    request_id: i,
                    ..sign_digest(keys[i as usize % 4], sha256_digest(&i.to_be_bytes()))
                })
                .collect();
            let responses = sign_in_one_stream(ca, requests).await;
            assert_eq!(responses.len(), 64);
            let expected = ["ok", "QUORUM_REQUIRED", "NOT_ALLOWED_SIGNER", "NOT_FOUND"];
            for (i, response) in responses.iter().enumerate() {
                assert_eq!(response.request_id, i as u64, "answers out of order");
                let want = expected[i % 4];
                match &response.error {
                    None => {
                        assert_eq!(want, "ok", "item {i} ({}) was signed", keys[i % 4]);
                        let digest = sha2::Sha256::digest((i as u64).to_be_bytes()).to_vec();
                        assert!(openssl_ok(token, &pem, SignAlgorithm::EcdsaP256Sha256, SignInput::Digest(&digest), &response.signature));
                    }
                    Some(error) => {
                        assert_eq!(error.reason, want, "item {i}: {}", error.message);
                        assert!(response.signature.is_empty(), "item {i} carries a signature");
                    }
                }
            }
            let records: Vec<_> = service
                .audit_events_since(before)
                .into_iter()
                .filter(|e| e["type"] == "request" && e["method"] == "Sign")
                .collect();
            assert_eq!(records.len(), 64, "one record per item");
            // Each record pairs an item's key with that item's outcome, and
            // the signed ones name their own digests.
            let resources = ["keys/free/versions/1", "keys/gated/versions/1", "keys/theirs/versions/1", "keys/missing"];
            for (resource, want) in resources.iter().zip(expected) {
                let outcomes: Vec<_> = records.iter().filter(|e| e["resource"] == *resource).map(|e| e["outcome"].clone()).collect();
                assert_eq!(outcomes, vec![serde_json::json!(want); 16], "{resource}");
            }
            let mut signed: Vec<String> = records
                .iter()
                .filter(|e| e["outcome"] == "ok")
                .map(|e| e["detail"].as_str().unwrap().to_string())
                .collect();
            let mut digests: Vec<String> = (0..64u64)
                .filter(|i| i % 4 == 0)
                .map(|i| format!("sha256:{}", hex::encode(sha2::Sha256::digest(i.to_be_bytes()))))
                .collect();
            signed.sort();
            digests.sort();
            assert_eq!(signed, digests);
        });
    }
);

/// Exports the log through the API, as `custodyctl audit export` does.
async fn export(service: &TestService) -> String {
    use custody_core::audit::{ExportLine, SignedHead};
    use custody_proto::v1::audit_service_client::AuditServiceClient;
    use custody_proto::v1::{ReadAuditRequest, read_audit_response};
    let auditor = service.client("auditor").await;
    let mut stream = AuditServiceClient::new(auditor)
        .read_audit(ReadAuditRequest { start_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    while let Some(item) = stream.message().await.unwrap() {
        let line = match item.item.unwrap() {
            read_audit_response::Item::Record(r) => ExportLine::Record {
                seq: r.seq,
                entry: String::from_utf8(r.entry).unwrap(),
                hash: hex::encode(r.hash),
            },
            read_audit_response::Item::Head(h) => {
                assert_eq!(
                    h.audit_public_key_pem,
                    service.state().audit.audit_key_pem()
                );
                ExportLine::head(&SignedHead {
                    seq: h.seq,
                    hash: h.hash.try_into().unwrap(),
                    time: h.time,
                    signature: h.signature,
                })
            }
        };
        text.push_str(&serde_json::to_string(&line).unwrap());
        text.push('\n');
    }
    text
}

/// What an attacker with write access to the database but not to the HSM can
/// do: change one record, then recompute every later link and hash (and the
/// hashes that checkpoints name) so that the chain is consistent again.
fn rewrite_and_rechain(text: &str, victim_seq: u64) -> String {
    use custody_core::audit::{ExportLine, chain_hash};
    let mut out = String::new();
    let mut prev = [0u8; 32];
    let mut renamed: std::collections::HashMap<String, String> = Default::default();
    for line in text.lines() {
        let parsed: ExportLine = serde_json::from_str(line).unwrap();
        let ExportLine::Record { seq, entry, hash } = parsed else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        let mut value: serde_json::Value = serde_json::from_str(&entry).unwrap();
        value["prev"] = serde_json::Value::String(hex::encode(prev));
        if seq == victim_seq {
            value["event"]["principal"] = serde_json::Value::String("someone-else".into());
        }
        if let Some(head) = value["event"]
            .get("head_hash")
            .and_then(|h| h.as_str())
            .map(str::to_string)
        {
            if let Some(new) = renamed.get(&head) {
                value["event"]["head_hash"] = serde_json::Value::String(new.clone());
            }
        }
        let entry = serde_json::to_string(&value).unwrap();
        let new_hash = chain_hash(&prev, entry.as_bytes());
        renamed.insert(hash, hex::encode(new_hash));
        prev = new_hash;
        let line = ExportLine::Record {
            seq,
            entry,
            hash: hex::encode(new_hash),
        };
        out.push_str(&serde_json::to_string(&line).unwrap());
        out.push('\n');
    }
    out
}

token_test!(
    fn the_exported_audit_log_verifies_offline_and_every_tampering_is_detected(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            create(&operator, "audited", p256(), &["ca-issuing"]).await;
            let ca = service.client("ca-issuing").await;
            let mut signing = SigningServiceClient::new(ca);
            for i in 0..5u8 {
                signing.sign(sign_digest("keys/audited", sha256_digest(&[i]))).await.unwrap();
            }
            service.state().audit.checkpoint().await.unwrap();
            signing.sign(sign_digest("keys/nope", sha256_digest(b"refused"))).await.unwrap_err();

            // The audit key is trusted out of band (its fingerprint is logged
            // and recorded at start); here, straight from the daemon.
            let key = service.state().audit.audit_key_spki().to_vec();
            let text = export(&service).await;
            let report = custody_core::audit::verify_export(&text, &key).unwrap();
            assert!(report.checkpoints >= 1, "{report:?}");
            // Each record names who did what: the refused signature is there too.
            assert!(text.contains("keys/nope") && text.contains("NOT_FOUND"));

            let lines: Vec<&str> = text.lines().collect();
            let n = lines.len();
            let join = |lines: Vec<&str>| lines.join("\n") + "\n";
            let mut tampered: Vec<(&str, String)> = Vec::new();
            let mut deleted = lines.clone();
            deleted.remove(3);
            tampered.push(("deleted record", join(deleted)));
            let mut reordered = lines.clone();
            reordered.swap(3, 4);
            tampered.push(("reordered records", join(reordered)));
            let mut inserted = lines.clone();
            inserted.insert(5, lines[2]);
            tampered.push(("inserted record", join(inserted)));
            tampered.push(("modified record", text.replacen("ca-issuing", "ca-issuinh", 1)));
            let mut cut = lines.clone();
            cut.remove(n - 2);
            tampered.push(("tail cut, head kept", join(cut)));
            tampered.push(("tail and head cut", join(lines[..n - 3].to_vec())));
            // Rewritten before the checkpoint: the checkpoint's signature fails.
            tampered.push(("rewritten and re-chained before a checkpoint", rewrite_and_rechain(&text, 3)));
            // Rewritten after the last checkpoint: the signed head fails.
            tampered.push(("rewritten and re-chained after the checkpoint", rewrite_and_rechain(&text, (n - 2) as u64)));
            for (what, text) in &tampered {
                let verdict = custody_core::audit::verify_export(text, &key);
                assert!(verdict.is_err(), "{what} went undetected");
            }
            // The server's own check of its stored chain passes, through the API.
            let auditor = service.client("auditor").await;
            let verdict = custody_proto::v1::audit_service_client::AuditServiceClient::new(auditor)
                .verify_audit(custody_proto::v1::VerifyAuditRequest {})
                .await
                .unwrap()
                .into_inner();
            assert!(verdict.valid, "{verdict:?}");
            assert!(verdict.checkpoints >= 1 && verdict.records as usize >= n - 1);
            let operator = service.client("operator").await;
            let refused = custody_proto::v1::audit_service_client::AuditServiceClient::new(operator)
                .verify_audit(custody_proto::v1::VerifyAuditRequest {})
                .await
                .unwrap_err();
            assert_eq!(reason(&refused), "ROLE_REQUIRED");
        });
    }
);

/// An rcgen signing key whose private half is in custodyd: every signature
/// rcgen needs is a `Sign` RPC.
struct KeyInCustody {
    point: Vec<u8>,
    channel: Channel,
    runtime: tokio::runtime::Handle,
}

impl rcgen::PublicKeyData for KeyInCustody {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for KeyInCustody {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let mut client = SigningServiceClient::new(self.channel.clone());
        let request = SignRequest {
            name: "keys/root".into(),
            input: Some(sign_request::Input::Data(message.to_vec())),
            ..Default::default()
        };
        tokio::task::block_in_place(|| self.runtime.block_on(client.sign(request)))
            .map(|r| r.into_inner().signature)
            .map_err(|_| rcgen::Error::RemoteKeyError)
    }
}

token_test!(
    fn a_certificate_signed_through_custodyd_passes_openssl_verify(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            create(&operator, "root", p256(), &["ca-issuing"]).await;
            let der = KeyServiceClient::new(operator)
                .get_public_key(GetPublicKeyRequest { name: "keys/root".into() })
                .await
                .unwrap()
                .into_inner()
                .der;
            // The uncompressed point is the last 65 bytes of a P-256 SPKI.
            let key = KeyInCustody {
                point: der[der.len() - 65..].to_vec(),
                channel: service.client("ca-issuing").await,
                runtime: tokio::runtime::Handle::current(),
            };
            let mut params = rcgen::CertificateParams::default();
            params.distinguished_name.push(rcgen::DnType::CommonName, "custody test root");
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
            let certificate = params.self_signed(&key).unwrap();
            let path = token.scratch().join("root.pem");
            std::fs::write(&path, certificate.pem()).unwrap();
            let output = std::process::Command::new("openssl")
                .arg("verify")
                .arg("-CAfile")
                .arg(&path)
                .arg(&path)
                .output()
                .unwrap();
            softhsm_tests::assert_success("openssl verify", &output);
            assert!(String::from_utf8_lossy(&output.stdout).contains(": OK"));
        });
    }
);

token_test!(
    fn health_reports_serving_and_reflection_lists_the_services(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let channel = service.client("auditor").await;
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            for name in ["", "custody.v1.SigningService", "custody.v1.KeyService", "custody.v1.AuditService"] {
                let status = health
                    .check(tonic_health::pb::HealthCheckRequest { service: name.into() })
                    .await
                    .unwrap()
                    .into_inner()
                    .status;
                assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32, "{name:?}");
            }
        });
    }
);

token_test!(
    fn reloaded_certificates_apply_to_new_connections_and_close_open_ones_no_longer_trusted(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let old_client = service.client("ca-issuing").await;
            assert!(gets_in(old_client.clone()).await);
            // A new client CA replaces the old one on disk, then a reload.
            let new_ca = Ca::new("custody test CA 2").unwrap();
            std::fs::write(&service.config.tls.client_ca, new_ca.cert_pem()).unwrap();
            std::fs::write(&service.config.tls.crls[0], new_ca.crl(&[]).unwrap()).unwrap();
            service.reload_tls().unwrap();
            // New connections need a certificate of the new CA ...
            let old_ca_cert = service.ca.issue_client("ca-issuing", &[Role::Signer], Validity::days(1)).unwrap();
            assert!(refused(&service, &old_ca_cert).await);
            let new_ca_cert = new_ca.issue_client("ca-issuing", &[Role::Signer], Validity::days(1)).unwrap();
            assert!(!refused(&service, &new_ca_cert).await);
            // ... and the connection opened before the reload, whose CA is no
            // longer trusted, is refused from the reload on.
            assert!(!gets_in(old_client).await);
            // A reload with broken files keeps the working configuration, and
            // closes nothing.
            let open = service.client_with(&new_ca_cert).await.unwrap();
            assert!(gets_in(open.clone()).await);
            std::fs::write(&service.config.tls.client_ca, "not a certificate").unwrap();
            assert!(service.reload_tls().is_err());
            assert!(!refused(&service, &new_ca_cert).await);
            assert!(gets_in(open).await);
        });
    }
);

token_test!(
    fn prometheus_metrics_cover_requests_signatures_audit_hsm_and_tls(token) {
        runtime().block_on(async {
            let port = softhsm_tests::process::free_port();
            let service = TestService::start_with(token, |config| {
                config.metrics.listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
            })
            .await;
            let operator = service.client("operator").await;
            create(&operator, "m", p256(), &["ca-issuing"]).await;
            let ca = service.client("ca-issuing").await;
            SigningServiceClient::new(ca).sign(sign_digest("keys/m", sha256_digest(b"x"))).await.unwrap();
            let stranger = Ca::new("stranger").unwrap().issue_client("x", &[Role::Signer], Validity::days(1)).unwrap();
            assert!(refused(&service, &stranger).await);
            tokio::time::sleep(Duration::from_millis(1500)).await;

            let text = tokio::task::spawn_blocking(move || {
                use std::io::{Read, Write};
                let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
                let mut text = String::new();
                stream.read_to_string(&mut text).unwrap();
                text
            })
            .await
            .unwrap();
            for expected in [
                "custody_requests_total{method=\"Sign\",code=\"Ok\"}",
                "custody_request_seconds_bucket{method=\"CreateKey\"",
                "custody_signatures_total{key=\"keys/m/versions/1\",algorithm=\"EC_SIGN_P256_SHA256\"} 1",
                "custody_audit_append_seconds_bucket",
                "custody_hsm_workers 2",
                "custody_hsm_queue_depth",
                "custody_tls_handshake_failures_total{reason=\"unknown_issuer\"}",
                "custody_certificate_expiry_seconds{which=\"server\"}",
                "custody_certificate_expiry_seconds{which=\"client_ca\"}",
                "custody_operations{state=\"pending\"} 0",
            ] {
                assert!(text.contains(expected), "metrics lack {expected}:\n{text}");
            }
        });
    }
);

token_test!(
    fn wrong_pins_lock_the_daemon_out_across_restarts_until_reset(token) {
        runtime().block_on(async {
            let wrong_pin = token.scratch().join("wrong.pin");
            std::fs::write(&wrong_pin, "not-the-pin").unwrap();
            let with_pin = |pin: std::path::PathBuf| {
                move |config: &mut custody_core::config::Config| {
                    config.hsm.pin_file = Some(pin);
                    config.hsm.max_pin_failures = 3;
                }
            };
            for attempt in 1..=3 {
                let error = TestService::try_start_with(token, with_pin(wrong_pin.clone())).await.err().unwrap();
                assert!(error.contains(&format!("failed login {attempt} of 3")), "{error}");
            }
            // Locked: even the right PIN is not tried, start after start.
            for _ in 0..2 {
                let error = TestService::try_start_with(token, with_pin(token.pin_file())).await.err().unwrap();
                assert!(error.contains("locked after 3"), "{error}");
            }
            // An operator clears the count, as `custodyd --reset-pin-lockout` does.
            let data_dir = token.scratch().join("custodyd").join("data");
            // The refused start's database may hold sled's file lock a moment
            // longer (its flusher thread): wait for it, boundedly.
            let mut opened = Err(String::new());
            for _ in 0..100 {
                opened = custody_daemon::server::open_db(&data_dir, custody_core::config::StorageSection::default().cache_bytes());
                if opened.is_ok() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            let db = opened.unwrap();
            assert_eq!(custody_core::pin_lockout::failures(&db).unwrap(), 3);
            custody_core::pin_lockout::reset(&db).unwrap();
            drop(db);
            TestService::try_start_with(token, with_pin(wrong_pin.clone())).await.err().unwrap();
            let service = TestService::try_start_with(token, with_pin(token.pin_file())).await.unwrap();
            // The start records how many logins failed before it, and clears the count.
            let started = service
                .state()
                .audit
                .records(1)
                .map(|r| String::from_utf8(r.unwrap().entry).unwrap())
                .filter(|e| e.contains("daemon_started"))
                .last()
                .unwrap();
            assert!(started.contains("\"failed_logins_before\":1"), "{started}");
        });
    }
);

token_test!(
    fn checkpoints_follow_the_log_across_restarts(token) {
        // A checkpoint is due every 6 records; each of four short lifetimes
        // writes fewer than that (its start, one key). Counted per process,
        // no checkpoint would ever be signed.
        runtime().block_on(async {
            let mut service = TestService::start_with(token, |c| {
                c.audit.checkpoint_every = 6;
                c.audit.checkpoint_interval_secs = 3600;
            })
            .await;
            for lifetime in 0..4 {
                let operator = service.client("operator").await;
                create(&operator, &format!("k{lifetime}"), p256(), &["ca-issuing"]).await;
                service.restart().await;
            }
            let records: Vec<custody_core::audit::Entry> = service
                .state()
                .audit
                .records(1)
                .map(|r| serde_json::from_slice(&r.unwrap().entry).unwrap())
                .collect();
            let checkpoints = records
                .iter()
                .filter(|e| matches!(e.event, custody_core::audit::Event::Checkpoint { .. }))
                .count();
            assert!(
                checkpoints >= 1 && records.len() - checkpoints >= 6,
                "{checkpoints} checkpoints in {} records over four lifetimes",
                records.len()
            );
        });
    }
);
