//! F4, a hung HSM call is bounded, its worker replaced, and custody fails
//! closed (threat model, "Faults (issue 14)"), through the real gRPC server
//! with real mTLS on SoftHSM2.
//!
//! SoftHSM2 never hangs on demand, so the hang is injected at the PKCS#11
//! boundary (`fault-injection`): the call stalls inside its deadline window,
//! exactly where a network HSM that stopped answering would leave it. The
//! deadline is short here (`[hsm] call_timeout_ms`); what the tests assert
//! is what happened (the answer, the audit record, the worker replaced, the
//! health and metrics), never how long it took.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::time::Duration;

use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::signing_service_client::SigningServiceClient;
use custody_proto::v1::{Digest, SignRequest, digest, sign_request};
use hsm_shim::Stall;
use hsm_shim::pkcs11::Function;
use sha2::Digest as _;
use softhsm_tests::service::{TestService, create_key, reason, runtime};
use softhsm_tests::token_test;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The deadline of the tests: long beside any SoftHSM2 call, short enough
/// for a test.
const DEADLINE_MS: u64 = 400;

fn sign_request(key: &str, data: &[u8]) -> SignRequest {
    SignRequest {
        name: format!("keys/{key}"),
        input: Some(sign_request::Input::Digest(Digest {
            digest: Some(digest::Digest::Sha256(sha2::Sha256::digest(data).to_vec())),
        })),
        ..Default::default()
    }
}

async fn sign(channel: &Channel, key: &str) -> Result<Vec<u8>, tonic::Status> {
    SigningServiceClient::new(channel.clone())
        .sign(sign_request(key, b"to be signed"))
        .await
        .map(|r| r.into_inner().signature)
}

async fn health(channel: &Channel) -> i32 {
    HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            // Readiness of signing; the empty name (liveness) stays
            // SERVING while custodyd answers.
            service: "custody.v1.SigningService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// Waits for the health watch (once a second) to report `status`; false if
/// it never does within a generous bound.
async fn health_becomes(channel: &Channel, status: ServingStatus) -> bool {
    for _ in 0..200 {
        if health(channel).await == status as i32 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Waits until no abandoned call is stuck any more (after a release).
async fn stuck_calls_return(service: &TestService) -> bool {
    for _ in 0..200 {
        if service.state().hsm.stuck_calls() == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

async fn metrics_show(port: u16, expected: &str) -> Option<String> {
    let mut text = String::new();
    for _ in 0..100 {
        text = tokio::task::spawn_blocking(move || softhsm_tests::service::scrape_metrics(port))
            .await
            .unwrap();
        if text.contains(expected) {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Some(text)
}

token_test!(
    fn a_sign_whose_c_sign_hangs_fails_hsm_timeout_with_its_record_and_a_fresh_worker_signs_next(token) {
        runtime().block_on(async {
            let port = softhsm_tests::process::free_port();
            let service = TestService::start_with(token, |config| {
                config.hsm.call_timeout_ms = DEADLINE_MS;
                config.metrics.listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
            })
            .await;
            let operator = service.client("operator").await;
            create_key(&operator, "ca", "EC_SIGN_P256_SHA256", None).await;
            let signer = service.client("ca-issuing").await;
            let auditor = service.client("auditor").await;
            sign(&signer, "ca").await.unwrap();
            let hsm = &service.state().hsm;
            assert_eq!((hsm.workers(), hsm.lost_workers()), (2, 0));

            // The HSM stops answering C_Sign.
            hsm.faults().stall_next(Function::Sign, Stall::UntilReleased, 1);
            let before = service.audit_len();
            let refused = sign(&signer, "ca").await.unwrap_err();
            assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
            assert_eq!(reason(&refused), "HSM_TIMEOUT");
            assert!(!refused.message().contains("C_Sign"), "no PKCS#11 name leaks: {}", refused.message());
            assert_eq!(hsm.faults().stalled().len(), 1);
            // Its audit record, with the reason.
            let events = service.audit_events_since(before);
            assert_eq!(events.len(), 1, "{events:?}");
            assert_eq!(
                (&events[0]["method"], &events[0]["outcome"]),
                (&"Sign".into(), &"HSM_TIMEOUT".into())
            );

            // The worker was abandoned and replaced: the pool is whole, and
            // the next signature is made (by a fresh worker or the other one)
            // while the hung call still has not returned.
            assert_eq!((hsm.workers(), hsm.lost_workers(), hsm.stuck_calls()), (2, 1, 1));
            for _ in 0..4 {
                sign(&signer, "ca").await.unwrap();
            }
            // Health and metrics say the HSM is not answering.
            assert!(health_becomes(&auditor, ServingStatus::NotServing).await, "health stays SERVING with a hung call");
            for expected in ["custody_hsm_workers_lost_total 1", "custody_hsm_stuck_calls 1", "custody_hsm_workers 2"] {
                if let Some(text) = metrics_show(port, expected).await {
                    panic!("metrics lack {expected}:\n{text}");
                }
            }

            // The hung call returns: its thread closes its session and
            // exits, and health recovers.
            hsm.faults().release();
            assert!(stuck_calls_return(&service).await, "the abandoned call never came back");
            assert!(health_becomes(&auditor, ServingStatus::Serving).await, "health stays NOT_SERVING");
            if let Some(text) = metrics_show(port, "custody_hsm_stuck_calls 0").await {
                panic!("metrics still show a stuck call:\n{text}");
            }
            assert_eq!(hsm.workers(), 2);
            sign(&signer, "ca").await.unwrap();
        });
    }
);

token_test!(
    fn a_hung_key_generation_holds_only_calls_that_need_the_object_store_and_those_fail_closed(token) {
        runtime().block_on(async {
            let service = TestService::start_with(token, |config| {
                config.hsm.call_timeout_ms = DEADLINE_MS;
            })
            .await;
            let operator = service.client("operator").await;
            create_key(&operator, "ca", "EC_SIGN_P256_SHA256", None).await;
            let signer = service.client("ca-issuing").await;
            sign(&signer, "ca").await.unwrap();
            let hsm = &service.state().hsm;

            // C_GenerateKeyPair hangs, holding the object-store lock.
            hsm.faults().stall_next(Function::GenerateKeyPair, Stall::UntilReleased, 1);
            let mut keys = KeyServiceClient::new(operator.clone());
            let p256 = custody_core::algorithms::KeyAlgorithm::from_api_name("EC_SIGN_P256_SHA256").unwrap();
            let create = |id: &str| custody_proto::v1::CreateKeyRequest {
                key_id: id.into(),
                algorithm: custody_daemon::wire::algorithm(p256) as i32,
                purpose: custody_daemon::wire::purpose(p256.purpose()) as i32,
                allowed_signers: vec!["ca-issuing".into()],
                ..Default::default()
            };
            let hung = keys.create_key(create("hung")).await.unwrap_err();
            assert_eq!((hung.code(), reason(&hung)), (Code::Unavailable, "HSM_TIMEOUT".into()), "{hung:?}");
            assert_eq!(hsm.stuck_calls(), 1);
            // Signing with a known key does not need the lock: it goes on.
            for _ in 0..4 {
                sign(&signer, "ca").await.unwrap();
            }
            // Another generation waits for the lock for one deadline, then
            // fails closed instead of joining the hang; no worker is lost
            // for it (it never reached the HSM).
            let waited = keys.create_key(create("second")).await.unwrap_err();
            assert_eq!((waited.code(), reason(&waited)), (Code::Unavailable, "HSM_TIMEOUT".into()), "{waited:?}");
            assert_eq!(hsm.lost_workers(), 1);

            // Once the hung call returns, keys are made again, and neither
            // refused key is usable.
            hsm.faults().release();
            assert!(stuck_calls_return(&service).await, "the abandoned call never came back");
            keys.create_key(create("third")).await.unwrap();
            sign(&signer, "third").await.unwrap();
            for refused in ["hung", "second"] {
                assert!(sign(&signer, refused).await.is_err(), "{refused} signs");
            }
        });
    }
);

token_test!(
    fn a_hung_audit_key_call_fails_its_checkpoint_closed_and_requests_are_recorded_meanwhile(token) {
        runtime().block_on(async {
            let service = TestService::start_with(token, |config| {
                config.hsm.call_timeout_ms = DEADLINE_MS;
            })
            .await;
            let operator = service.client("operator").await;
            create_key(&operator, "ca", "EC_SIGN_P256_SHA256", None).await;
            let hsm = &service.state().hsm;
            hsm.faults().stall_next(Function::Sign, Stall::UntilReleased, 1);
            // The checkpoint's signature hangs: the checkpoint fails, it
            // does not wait for the HSM with every request behind it.
            let checkpoint = service.state().audit.checkpoint().await;
            assert!(checkpoint.is_err(), "a checkpoint without a signature: {checkpoint:?}");
            assert_eq!(hsm.faults().stalled().len(), 1);
            assert_eq!(hsm.stuck_calls(), 1);
            // Requests go on, each with its audit record.
            let before = service.audit_len();
            create_key(&operator, "other", "EC_SIGN_P256_SHA256", None).await;
            let signer = service.client("ca-issuing").await;
            sign(&signer, "other").await.unwrap();
            let events = service.audit_events_since(before);
            // CreateKey's "requested" and "ok", and the signature's.
            assert_eq!(events.len(), 3, "{events:?}");
            hsm.faults().release();
            assert!(stuck_calls_return(&service).await, "the abandoned call never came back");
            // The next checkpoint is signed, and the chain verifies.
            service.state().audit.checkpoint().await.unwrap();
            let report = service.state().audit.verify();
            assert!(report.first_bad.is_none(), "{report:?}");
        });
    }
);

token_test!(
    fn a_call_deadline_of_zero_or_past_ten_minutes_is_refused(token) {
        // At config load custodyd refuses `[hsm] call_timeout_ms` outside
        // 1-600000 (daemon/core/src/config.rs tests the reference file);
        // the HSM boundary refuses it too, whoever opens it.
        for bad in [Duration::ZERO, hsm_shim::MAX_CALL_TIMEOUT + Duration::from_millis(1)] {
            let mut config = token.config(2);
            config.call_timeout = bad;
            let refused = hsm_shim::Hsm::open(config).unwrap_err();
            assert_eq!(refused.kind(), hsm_shim::ErrorKind::Configuration, "{refused}");
            assert!(refused.to_string().contains("HSM call deadline"), "{refused}");
        }
        let mut config = token.config(2);
        config.call_timeout = hsm_shim::MAX_CALL_TIMEOUT;
        hsm_shim::Hsm::open(config).unwrap();
    }
);
