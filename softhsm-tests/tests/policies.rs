//! Policies that mean what they say (threat model R6), attacked through the
//! real server: custodyd in-process on a fresh SoftHSM2 token, real gRPC
//! and mTLS.
//!
//! A policy that could never apply is refused instead of stored; a DECRYPT
//! policy puts a key's decryptions under the officers, through approved
//! operations whose plaintext is released sealed to a key the requester
//! named; names that read as custody's own actors, a signer listed twice
//! and a version named two ways are refused; the data directory is the
//! daemon's alone.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use custody_core::dual_control::sealed::open_plaintext;
use custody_core::identity::Role;
use custody_proto::v1::envelope_service_client::EnvelopeServiceClient;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::operation_service_client::OperationServiceClient;
use custody_proto::v1::{
    Algorithm, CreateKeyRequest, DecryptRequest, DecryptSpec, EncryptRequest,
    GenerateDataKeyRequest, GetOperationRequest, GetPublicKeyRequest, KeyPurpose, KeyVersionState,
    ListKeysRequest, OfficerSpec, Operation, OperationKind, OperationState, RewrapRequest,
    SetKeyVersionStateRequest, SetPolicySpec, VersionRef, operation_spec,
};
use ed25519_dalek::SigningKey;
use softhsm_tests::service::{TestService, create_key, reason, request_operation, runtime};
use softhsm_tests::token_test;
use tonic::Code;
use tonic::transport::Channel;

const AAD: &[u8] = b"tenant=7";

fn set_policy(key: &str, kind: OperationKind) -> operation_spec::Spec {
    operation_spec::Spec::SetPolicy(SetPolicySpec {
        name: format!("keys/{key}"),
        operation: kind as i32,
        officers: vec!["alice".into(), "bob".into(), "carol".into()],
        required: 2,
    })
}

fn decrypt_spec(key: &str, ciphertext: &[u8], recipient: &[u8]) -> operation_spec::Spec {
    operation_spec::Spec::Decrypt(DecryptSpec {
        name: format!("keys/{key}"),
        ciphertext: ciphertext.to_vec(),
        associated_data: AAD.to_vec(),
        recipient_public_key: recipient.to_vec(),
    })
}

async fn refused(result: Result<Operation, tonic::Status>) -> (Code, String) {
    let status = result.unwrap_err();
    (status.code(), reason(&status))
}

token_test!(
    fn a_policy_of_a_kind_that_cannot_apply_to_the_key_is_refused(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            create_key(&operator, "kek", "AES_256_GCM", None).await;
            create_key(&operator, "issuing", "EC_SIGN_P256_SHA256", None).await;
            let stored = service.state().dual_control.operations().unwrap().len();

            // A SIGN policy on an AES key would look like protection and
            // be none: refused, naming what the key's policies govern.
            let sign_on_aes = request_operation(&operator, set_policy("kek", OperationKind::Sign)).await;
            let status = sign_on_aes.unwrap_err();
            assert_eq!((status.code(), reason(&status).as_str()), (Code::InvalidArgument, "BAD_POLICY"));
            assert!(status.message().contains("ENCRYPT_DECRYPT") && status.message().contains("DECRYPT"), "{}", status.message());
            // So is the reverse, and a kind that is no key policy at all.
            for (key, kind) in [
                ("issuing", OperationKind::Decrypt),
                ("issuing", OperationKind::AddOfficer),
                ("kek", OperationKind::CreateBackup),
            ] {
                let asked = request_operation(&operator, set_policy(key, kind)).await;
                assert_eq!(refused(asked).await, (Code::InvalidArgument, "BAD_POLICY".into()), "{kind:?} on {key}");
            }
            assert_eq!(service.state().dual_control.operations().unwrap().len(), stored);
            // The kinds that apply are accepted on each.
            for (key, kind) in [
                ("kek", OperationKind::Decrypt),
                ("kek", OperationKind::Rotate),
                ("issuing", OperationKind::Sign),
                ("issuing", OperationKind::Rotate),
            ] {
                let asked = request_operation(&operator, set_policy(key, kind)).await.unwrap();
                assert_eq!(asked.state, OperationState::Pending as i32, "{kind:?} on {key}");
            }
        });
    }
);

token_test!(
    fn a_decrypt_policy_puts_the_keys_decryptions_under_the_quorum(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            create_key(&operator, "kek", "AES_256_GCM", None).await;
            create_key(&operator, "free", "AES_256_GCM", None).await;
            let signer = service.client("ca-issuing").await;
            let mut envelope = EnvelopeServiceClient::new(signer.clone());
            let made = envelope
                .generate_data_key(GenerateDataKeyRequest { name: "keys/kek".into(), associated_data: AAD.to_vec() })
                .await
                .unwrap()
                .into_inner();
            let decrypt = DecryptRequest {
                name: "keys/kek".into(),
                ciphertext: made.wrapped.clone(),
                associated_data: AAD.to_vec(),
            };
            assert_eq!(envelope.decrypt(decrypt.clone()).await.unwrap().into_inner().plaintext, made.plaintext);

            service.gate("kek", OperationKind::Decrypt).await;

            // The direct call is refused, and audited as such.
            let status = envelope.decrypt(decrypt.clone()).await.unwrap_err();
            assert_eq!((status.code(), reason(&status).as_str()), (Code::FailedPrecondition, "QUORUM_REQUIRED"));
            // Nothing that releases no plaintext of an existing ciphertext
            // changes: encrypt, new data keys, rewrap.
            envelope
                .encrypt(EncryptRequest { name: "keys/kek".into(), plaintext: b"x".to_vec(), associated_data: AAD.to_vec() })
                .await
                .unwrap();
            envelope
                .generate_data_key(GenerateDataKeyRequest { name: "keys/kek".into(), associated_data: AAD.to_vec() })
                .await
                .unwrap();
            envelope
                .rewrap(RewrapRequest { name: "keys/kek".into(), ciphertext: made.wrapped.clone(), associated_data: AAD.to_vec() })
                .await
                .unwrap();

            // Asking: checked as the direct call is, but for the quorum.
            let recipient = SigningKey::from_bytes(&[42; 32]);
            let public = recipient.verifying_key().to_bytes();
            let stranger = service.client_as("other-signer", &[Role::Signer]).await;
            let asked = request_operation(&stranger, decrypt_spec("kek", &made.wrapped, &public)).await;
            assert_eq!(refused(asked).await, (Code::PermissionDenied, "NOT_ALLOWED_SIGNER".into()));
            let asked = request_operation(&signer, decrypt_spec("kek", &made.wrapped, &public[..31])).await;
            assert_eq!(refused(asked).await, (Code::InvalidArgument, "BAD_RECIPIENT".into()));
            // The Ed25519 identity, a point of small order: sealed to it, the
            // plaintext would be open to every officer and auditor who reads
            // the operation or the audit log.
            let mut identity = [0u8; 32];
            identity[0] = 1;
            let asked = request_operation(&signer, decrypt_spec("kek", &made.wrapped, &identity)).await;
            assert_eq!(refused(asked).await, (Code::InvalidArgument, "BAD_RECIPIENT".into()));
            let free = envelope
                .encrypt(EncryptRequest { name: "keys/free".into(), plaintext: b"y".to_vec(), associated_data: AAD.to_vec() })
                .await
                .unwrap()
                .into_inner();
            let asked = request_operation(&signer, decrypt_spec("free", &free.ciphertext, &public)).await;
            assert_eq!(refused(asked).await, (Code::FailedPrecondition, "NO_POLICY".into()));

            // Approved by two officers, it decrypts once, for the requester,
            // and releases the plaintext sealed to the named key only.
            let operation = request_operation(&signer, decrypt_spec("kek", &made.wrapped, &public)).await.unwrap();
            assert_eq!(operation.state, OperationState::Pending as i32);
            assert!(operation.rendering.contains("DECRYPT") && operation.rendering.contains("keys/kek/versions/1"), "{}", operation.rendering);
            assert!(operation.rendering.contains(&hex::encode(public)), "{}", operation.rendering);
            let one = service.approve("alice", &operation).await.unwrap();
            assert_eq!(one.state, OperationState::Pending as i32);
            assert!(one.sealed_plaintext.is_empty());
            let done = service.approve("bob", &operation).await.unwrap();
            assert_eq!(done.state, OperationState::Succeeded as i32, "{}", done.error);
            assert_eq!(done.decrypted_by, "keys/kek/versions/1");
            let opened = open_plaintext(&recipient, &done.sealed_plaintext).unwrap();
            assert_eq!(opened.as_slice(), made.plaintext.as_slice());
            assert!(open_plaintext(&SigningKey::from_bytes(&[43; 32]), &done.sealed_plaintext).is_err());
            // The requester reads the same; the plaintext rests nowhere in
            // the store in the clear.
            let read = OperationServiceClient::new(signer.clone())
                .get_operation(GetOperationRequest { name: operation.name.clone() })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(read.sealed_plaintext, done.sealed_plaintext);
            let stored = serde_json::to_string(&service.state().dual_control.operations().unwrap()).unwrap();
            assert!(!stored.contains(&hex::encode(&made.plaintext)));
            // And the direct call is still refused.
            let status = envelope.decrypt(decrypt).await.unwrap_err();
            assert_eq!(reason(&status), "QUORUM_REQUIRED");
        });
    }
);

async fn create(operator: &Channel, key_id: &str, signers: &[&str]) -> Result<(), (Code, String)> {
    KeyServiceClient::new(operator.clone())
        .create_key(CreateKeyRequest {
            key_id: key_id.into(),
            algorithm: Algorithm::EcSignP256Sha256 as i32,
            purpose: KeyPurpose::AsymmetricSign as i32,
            allowed_signers: signers.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
        .map(drop)
        .map_err(|status| (status.code(), reason(&status)))
}

token_test!(
    fn reserved_names_a_signer_twice_and_a_second_spelling_of_a_version_are_refused(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            create_key(&operator, "k", "EC_SIGN_P256_SHA256", None).await;

            // Certificates naming custody's own actors map to no principal.
            for name in ["custodyd-scheduler", "custodyd", "system"] {
                let impostor = service.client_as(name, &[Role::Operator]).await;
                let status = KeyServiceClient::new(impostor).list_keys(ListKeysRequest::default()).await.unwrap_err();
                assert_eq!((status.code(), reason(&status).as_str()), (Code::PermissionDenied, "NO_CUSTODY_IDENTITY"), "{name}");
            }
            // Nor may an officer or an allow-list use them.
            let ed25519 = SigningKey::from_bytes(&[7; 32]).verifying_key().to_bytes().to_vec();
            for (id, principal) in [("dave", "custodyd"), ("scheduler", "dave")] {
                let asked = request_operation(&operator, operation_spec::Spec::AddOfficer(OfficerSpec {
                    officer_id: id.into(), principal: principal.into(), public_key: ed25519.clone(),
                }))
                .await;
                assert_eq!(refused(asked).await, (Code::InvalidArgument, "BAD_OFFICER".into()), "{id} {principal}");
            }
            let bad = (Code::InvalidArgument, "BAD_PRINCIPAL".to_string());
            assert_eq!(create(&operator, "twice", &["ca-issuing", "ca-issuing"]).await, Err(bad.clone()));
            assert_eq!(create(&operator, "actor", &["custodyd-scheduler"]).await, Err(bad));
            assert_eq!(service.state().registry.list(None, 100).len(), 1, "nothing made");
            assert_eq!(create(&operator, "once", &["ca-issuing", "ca-2"]).await, Ok(()));

            // keys/k/versions/1 has one spelling.
            let mut keys = KeyServiceClient::new(operator.clone());
            let public = |name: &str| GetPublicKeyRequest { name: name.into() };
            assert_eq!(keys.get_public_key(public("keys/k/versions/1")).await.unwrap().into_inner().name, "keys/k/versions/1");
            for name in ["keys/k/versions/01", "keys/k/versions/+1", "keys/k/versions/1 "] {
                let status = keys.get_public_key(public(name)).await.unwrap_err();
                assert_eq!((status.code(), reason(&status).as_str()), (Code::InvalidArgument, "BAD_NAME"), "{name}");
                let status = keys
                    .set_key_version_state(SetKeyVersionStateRequest {
                        name: name.into(), state: KeyVersionState::Suspended as i32, reason: String::new(),
                    })
                    .await
                    .unwrap_err();
                assert_eq!(reason(&status), "BAD_NAME", "{name}");
                let destroy = operation_spec::Spec::DestroyVersion(VersionRef { name: name.into() });
                let asked = request_operation(&operator, destroy).await;
                assert_eq!(refused(asked).await.1, "BAD_NAME", "{name}");
            }
        });
    }
);

token_test!(
    fn the_data_directory_is_custodyds_alone(token) {
        runtime().block_on(async {
            use std::os::unix::fs::PermissionsExt;
            let mut service = TestService::start(token).await;
            let data_dir = service.config.data_dir.clone();
            let mode = || std::fs::metadata(&data_dir).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(), 0o700);
            // Widened behind custodyd's back, narrowed again at the next start.
            service.stop().await;
            std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            service.restart().await;
            assert_eq!(mode(), 0o700);
        });
    }
);
