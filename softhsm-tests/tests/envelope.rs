//! Envelope encryption on a real token through the real gRPC server: data
//! keys, small payloads, rewrap of 10,000 data keys across a rotation, every
//! tampering refused, states and minimum versions enforced, and the nonce
//! budget.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::time::Instant;

use custody_proto::v1::envelope_service_client::EnvelopeServiceClient;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::signing_service_client::SigningServiceClient;
use custody_proto::v1::{
    DecryptRequest, Digest, EncryptRequest, GenerateDataKeyRequest, GenerateDataKeyResponse,
    GetKeyRequest, GetPublicKeyRequest, KeyVersionState, OperationKind, RewrapRequest,
    RotateKeyRequest, SetKeyVersionStateRequest, SignRequest, UpdateKeyRequest, digest,
    sign_request,
};
use futures_util::{StreamExt, TryStreamExt, stream};
use softhsm_tests::service::{TestService, create_key, reason, runtime};
use softhsm_tests::token_test;
use tonic::transport::Channel;

async fn create(operator: &Channel, key_id: &str, algorithm: &str) {
    create_key(operator, key_id, algorithm, None).await;
}

fn envelope(channel: &Channel) -> EnvelopeServiceClient<Channel> {
    EnvelopeServiceClient::new(channel.clone())
}

async fn data_key(app: &Channel, key: &str, aad: &[u8]) -> GenerateDataKeyResponse {
    envelope(app)
        .generate_data_key(GenerateDataKeyRequest {
            name: format!("keys/{key}"),
            associated_data: aad.to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn decrypt(
    app: &Channel,
    key: &str,
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, tonic::Status> {
    envelope(app)
        .decrypt(DecryptRequest {
            name: format!("keys/{key}"),
            ciphertext: ciphertext.to_vec(),
            associated_data: aad.to_vec(),
        })
        .await
        .map(|r| r.into_inner().plaintext)
}

async fn rewrap(
    app: &Channel,
    key: &str,
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, tonic::Status> {
    envelope(app)
        .rewrap(RewrapRequest {
            name: format!("keys/{key}"),
            ciphertext: ciphertext.to_vec(),
            associated_data: aad.to_vec(),
        })
        .await
        .map(|r| r.into_inner().ciphertext)
}

async fn set_state(operator: &Channel, name: &str, state: KeyVersionState, why: &str) {
    KeyServiceClient::new(operator.clone())
        .set_key_version_state(SetKeyVersionStateRequest {
            name: name.into(),
            state: state as i32,
            reason: why.into(),
        })
        .await
        .unwrap();
}

token_test!(
    fn data_keys_and_payloads_round_trip_bound_to_key_version_and_associated_data(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            let app = service.client("ca-issuing").await;
            create(&operator, "kek", "AES_256_GCM").await;
            create(&operator, "other", "AES_256_GCM").await;
            create(&operator, "signer", "EC_SIGN_P256_SHA256").await;

            let generated = data_key(&app, "kek", b"tenant=42").await;
            assert_eq!(generated.name, "keys/kek/versions/1");
            assert_eq!(generated.plaintext.len(), 32);
            assert_eq!(decrypt(&app, "kek", &generated.wrapped, b"tenant=42").await.unwrap(), generated.plaintext);
            assert_ne!(data_key(&app, "kek", b"tenant=42").await.plaintext, generated.plaintext);

            let payload = b"card 4111 1111 1111 1111".to_vec();
            let sealed = envelope(&app)
                .encrypt(EncryptRequest { name: "keys/kek".into(), plaintext: payload.clone(), associated_data: b"row 7".to_vec() })
                .await
                .unwrap()
                .into_inner();
            assert!(!sealed.ciphertext.windows(4).any(|w| w == b"4111"), "plaintext visible in the ciphertext");
            assert_eq!(decrypt(&app, "kek", &sealed.ciphertext, b"row 7").await.unwrap(), payload);

            // Every byte flipped, the wrong associated data, the wrong key:
            // refused, and never a plaintext.
            let mut refusals = std::collections::BTreeMap::<String, usize>::new();
            for i in 0..generated.wrapped.len() {
                let mut tampered = generated.wrapped.clone();
                tampered[i] ^= 0x01;
                let status = decrypt(&app, "kek", &tampered, b"tenant=42").await.unwrap_err();
                *refusals.entry(reason(&status)).or_default() += 1;
            }
            assert_eq!(refusals.values().sum::<usize>(), generated.wrapped.len());
            assert!(refusals.keys().all(|r| ["BAD_CIPHERTEXT", "CIPHERTEXT_KEY_MISMATCH", "INTEGRITY_FAILURE", "NOT_FOUND"].contains(&r.as_str())), "{refusals:?}");
            assert!(refusals["INTEGRITY_FAILURE"] >= 48, "nonce and sealed bytes are authenticated: {refusals:?}");
            println!("tampered data key refusals: {refusals:?}");
            assert_eq!(reason(&decrypt(&app, "kek", &generated.wrapped, b"tenant=43").await.unwrap_err()), "INTEGRITY_FAILURE");
            assert_eq!(reason(&decrypt(&app, "kek", &generated.wrapped[..20], b"tenant=42").await.unwrap_err()), "BAD_CIPHERTEXT");
            assert_eq!(reason(&decrypt(&app, "other", &generated.wrapped, b"tenant=42").await.unwrap_err()), "CIPHERTEXT_KEY_MISMATCH");

            // Purposes do not mix, and only allow-listed signers use a key.
            let wrong = envelope(&app)
                .encrypt(EncryptRequest { name: "keys/signer".into(), plaintext: vec![1], associated_data: vec![] })
                .await
                .unwrap_err();
            assert_eq!(reason(&wrong), "WRONG_PURPOSE");
            let sign = SigningServiceClient::new(app.clone())
                .sign(SignRequest {
                    name: "keys/kek".into(),
                    input: Some(sign_request::Input::Digest(Digest { digest: Some(digest::Digest::Sha256(vec![0; 32])) })),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(reason(&sign), "WRONG_PURPOSE");
            let public = KeyServiceClient::new(operator.clone())
                .get_public_key(GetPublicKeyRequest { name: "keys/kek".into() })
                .await
                .unwrap_err();
            assert_eq!(reason(&public), "NO_PUBLIC_KEY");
            let stranger = service.client_as("stranger", &[custody_core::identity::Role::Signer]).await;
            assert_eq!(reason(&decrypt(&stranger, "kek", &generated.wrapped, b"tenant=42").await.unwrap_err()), "NOT_ALLOWED_SIGNER");
            assert_eq!(reason(&decrypt(&operator, "kek", &generated.wrapped, b"tenant=42").await.unwrap_err()), "ROLE_REQUIRED");
            let too_big = envelope(&app)
                .encrypt(EncryptRequest { name: "keys/kek".into(), plaintext: vec![0; 64 * 1024 + 1], associated_data: vec![] })
                .await
                .unwrap_err();
            assert_eq!(reason(&too_big), "TOO_LARGE");
            let key = KeyServiceClient::new(operator.clone())
                .get_key(GetKeyRequest { name: "keys/kek".into() })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(key.versions[0].check_value.len(), 6, "AES versions show their KCV");
        });
    }
);

token_test!(
    fn ten_thousand_data_keys_rewrap_to_the_new_version_and_old_versions_follow_their_state(token) {
        runtime().block_on(async {
            const DEKS: usize = 10_000;
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            let app = service.client("ca-issuing").await;
            create(&operator, "bulk", "AES_256_GCM").await;
            let aad = |i: usize| format!("object {i}").into_bytes();

            let started = Instant::now();
            let originals: Vec<GenerateDataKeyResponse> = stream::iter(0..DEKS)
                .map(|i| {
                    let app = app.clone();
                    async move { data_key(&app, "bulk", &aad(i)).await }
                })
                .buffered(32)
                .collect()
                .await;
            let generated = started.elapsed();
            KeyServiceClient::new(operator.clone())
                .rotate_key(RotateKeyRequest { name: "keys/bulk".into(), ..Default::default() })
                .await
                .unwrap();

            let started = Instant::now();
            let rewrapped: Vec<Vec<u8>> = stream::iter(originals.iter().enumerate())
                .map(|(i, original)| {
                    let app = app.clone();
                    async move { rewrap(&app, "bulk", &original.wrapped, &aad(i)).await }
                })
                .buffered(32)
                .try_collect()
                .await
                .unwrap();
            let rewrap_time = started.elapsed();
            let plaintexts: Vec<Vec<u8>> = stream::iter(rewrapped.iter().enumerate())
                .map(|(i, wrapped)| {
                    let app = app.clone();
                    async move { decrypt(&app, "bulk", wrapped, &aad(i)).await }
                })
                .buffered(32)
                .try_collect()
                .await
                .unwrap();
            let lost = originals.iter().zip(&plaintexts).filter(|(o, p)| &o.plaintext != *p).count();
            assert_eq!(lost, 0, "data keys changed by rewrap");
            // The new ciphertexts name version 2 (the header's version field).
            let version_of = |c: &[u8]| u32::from_be_bytes(c[5 + 4..5 + 8].try_into().unwrap());
            assert!(rewrapped.iter().all(|c| version_of(c) == 2));
            println!(
                "{DEKS} data keys: generated in {generated:?}, rewrapped in {rewrap_time:?} ({:.0}/s)",
                DEKS as f64 / rewrap_time.as_secs_f64()
            );

            // Old ciphertexts: a deactivated version still decrypts; below the
            // minimum version, nothing of v1 is read; compromised, nothing at all.
            let old = &originals[0].wrapped;
            set_state(&operator, "keys/bulk/versions/1", KeyVersionState::Deactivated, "").await;
            assert_eq!(decrypt(&app, "bulk", old, &aad(0)).await.unwrap(), originals[0].plaintext);
            let mut keys = KeyServiceClient::new(operator.clone());
            keys.update_key(UpdateKeyRequest { name: "keys/bulk".into(), min_version: Some(2), ..Default::default() }).await.unwrap();
            assert_eq!(reason(&decrypt(&app, "bulk", old, &aad(0)).await.unwrap_err()), "BELOW_MIN_VERSION");
            assert_eq!(reason(&rewrap(&app, "bulk", old, &aad(0)).await.unwrap_err()), "BELOW_MIN_VERSION");
            let too_high = keys.update_key(UpdateKeyRequest { name: "keys/bulk".into(), min_version: Some(3), ..Default::default() }).await.unwrap_err();
            assert_eq!(reason(&too_high), "BAD_MIN_VERSION");
            keys.update_key(UpdateKeyRequest { name: "keys/bulk".into(), min_version: Some(0), ..Default::default() }).await.unwrap();
            set_state(&operator, "keys/bulk/versions/1", KeyVersionState::Compromised, "test").await;
            assert_eq!(reason(&decrypt(&app, "bulk", old, &aad(0)).await.unwrap_err()), "VERSION_NOT_USABLE");
            // Nor is it a rewrap source: a rewrap would launder ciphertexts
            // forged with the leaked key.
            assert_eq!(reason(&rewrap(&app, "bulk", old, &aad(0)).await.unwrap_err()), "VERSION_NOT_USABLE");
            // What was rewrapped before the compromise is safe and readable.
            assert_eq!(decrypt(&app, "bulk", &rewrapped[1], &aad(1)).await.unwrap(), originals[1].plaintext);
        });
    }
);

token_test!(
    fn the_nonce_budget_rotates_at_half_refuses_past_the_limit_and_survives_a_restart(token) {
        runtime().block_on(async {
            let mut service = TestService::start_with(token, |config| {
                config.envelope.max_encryptions_per_version = 8;
            })
            .await;
            let operator = service.client("operator").await;
            let app = service.client("ca-issuing").await;
            create(&operator, "small", "AES_256_GCM").await;
            for _ in 0..4 {
                data_key(&app, "small", b"").await;
            }
            let mut rotated = false;
            for _ in 0..100 {
                let key = KeyServiceClient::new(operator.clone())
                    .get_key(GetKeyRequest { name: "keys/small".into() })
                    .await
                    .unwrap()
                    .into_inner();
                if key.primary_version == 2 {
                    rotated = true;
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            assert!(rotated, "the scheduler did not rotate at half the budget");

            // With rotation under quorum, the scheduler leaves the key alone
            // and the budget is the last line.
            service.gate("small", OperationKind::Rotate).await;
            let encrypt = |app: Channel| async move {
                envelope(&app)
                    .encrypt(EncryptRequest { name: "keys/small".into(), plaintext: vec![1; 16], associated_data: vec![] })
                    .await
            };
            for _ in 0..8 {
                encrypt(app.clone()).await.unwrap();
            }
            let refused = encrypt(app.clone()).await.unwrap_err();
            assert_eq!(reason(&refused), "NONCE_BUDGET_EXHAUSTED");
            service.restart().await;
            let app = service.client("ca-issuing").await;
            assert_eq!(reason(&encrypt(app.clone()).await.unwrap_err()), "NONCE_BUDGET_EXHAUSTED");
        });
    }
);
