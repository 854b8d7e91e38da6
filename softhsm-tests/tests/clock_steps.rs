//! The wall clock stepping backwards and forwards under custodyd
//! (threat model F7), through the running service on SoftHSM2 with real
//! gRPC and mTLS. The injected clock has a wall reading and the monotonic
//! clock custodyd checks it against: `advance` lets time pass, `step`
//! moves only the wall clock, as an operator, a broken NTP source or a VM
//! restore does.
//!
//! - no approval counts after its operation expired, however far the clock
//!   steps back (also with the time that passed unread before the step);
//! - no cryptoperiod is extended by a backward step, also across a restart
//!   (the highest time used is kept in the data directory);
//! - no scheduled destruction runs before its cancel window has passed in
//!   real time: a forward step holds every one back by the step;
//! - each step beyond the tolerance leaves one `ClockStep` audit record.
//!
//! Waits are bounded loops on what custodyd records, never timed asserts.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::time::Duration;

use custody_core::clock::Clock as _;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::operation_service_client::OperationServiceClient;
use custody_proto::v1::signing_service_client::SigningServiceClient;
use custody_proto::v1::{
    Digest, GetKeyRequest, GetOperationRequest, Key, KeyVersionState, OperationKind,
    OperationState, RotateKeyRequest, SetKeyVersionStateRequest, SignRequest, SignSpec, VersionRef,
    digest, operation_spec, sign_request,
};
use softhsm_tests::service::{TestService, create_key, reason, request_operation, runtime};
use softhsm_tests::token_test;
use tonic::transport::Channel;

const HOUR_MS: i64 = 3_600_000;

fn sha256_digest() -> Digest {
    Digest {
        digest: Some(digest::Digest::Sha256(vec![7; 32])),
    }
}

async fn sign(ca: &Channel, key_id: &str) -> Result<(), tonic::Status> {
    SigningServiceClient::new(ca.clone())
        .sign(SignRequest {
            name: format!("keys/{key_id}"),
            input: Some(sign_request::Input::Digest(sha256_digest())),
            ..Default::default()
        })
        .await
        .map(drop)
}

async fn get(operator: &Channel, key_id: &str) -> Key {
    KeyServiceClient::new(operator.clone())
        .get_key(GetKeyRequest {
            name: format!("keys/{key_id}"),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn hsm_has(service: &TestService, label: &str) -> bool {
    let label = hsm_shim::KeyLabel::new(label).unwrap();
    match service.state().hsm.run(move |s| s.public_key(&label)).await {
        Ok(_) => true,
        Err(e) if e.kind() == hsm_shim::ErrorKind::NotFound => false,
        Err(e) => panic!("{e}"),
    }
}

/// The `ClockStep` records among the audit events after `before`.
fn clock_steps(service: &TestService, before: usize) -> Vec<serde_json::Value> {
    service
        .audit_events_since(before)
        .into_iter()
        .filter(|e| e["method"] == "ClockStep" && e["outcome"] != "requested")
        .collect()
}

/// Waits (bounded: 10 s; the scheduler ticks every second in tests) until
/// custodyd has recorded `count` clock steps after `before`.
async fn wait_for_clock_steps(
    service: &TestService,
    before: usize,
    count: usize,
) -> Vec<serde_json::Value> {
    for _ in 0..100 {
        let steps = clock_steps(service, before);
        if steps.len() >= count {
            return steps;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("custodyd did not record {count} clock steps within 10 s");
}

token_test!(
    fn f7_no_approval_counts_after_its_expiry_when_the_clock_steps_back(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            create_key(&operator, "root", "EC_SIGN_P256_SHA256", None).await;
            service.gate("root", OperationKind::Sign).await;
            let ca = service.client("ca-issuing").await;
            let ttl_ms = service.config.dual_control.approval_ttl_secs as i64 * 1000;
            let spec = || {
                operation_spec::Spec::Sign(SignSpec {
                    name: "keys/root".into(),
                    digest: Some(sha256_digest()),
                    encoding: 0,
                })
            };
            let before = service.audit_len();

            // Expired while nobody read the clock, then the clock is stepped
            // back two hours: the time that passed before the step counts.
            let operation = request_operation(&ca, spec()).await.unwrap();
            service.approve("alice", &operation).await.unwrap();
            service.clock.advance(ttl_ms + 1000);
            service.clock.step(-2 * HOUR_MS);
            let status = service.approve("bob", &operation).await.unwrap_err();
            assert!(
                matches!(reason(&status).as_str(), "OPERATION_EXPIRED" | "OPERATION_NOT_PENDING"),
                "an approval counted after its operation expired: {status:?}"
            );
            let read = OperationServiceClient::new(ca.clone())
                .get_operation(GetOperationRequest { name: operation.name.clone() })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(read.state, OperationState::Expired as i32);
            assert!(read.signature.is_none());

            // Expired and seen expired, then stepped back a day: still expired.
            let operation = request_operation(&ca, spec()).await.unwrap();
            service.approve("alice", &operation).await.unwrap();
            service.clock.advance(ttl_ms + 1000);
            let status = service.approve("carol", &operation).await.unwrap_err();
            assert!(matches!(reason(&status).as_str(), "OPERATION_EXPIRED" | "OPERATION_NOT_PENDING"));
            service.clock.step(-24 * HOUR_MS);
            let status = service.approve("bob", &operation).await.unwrap_err();
            assert!(matches!(reason(&status).as_str(), "OPERATION_EXPIRED" | "OPERATION_NOT_PENDING"));

            // An operation requested while the clock is behind expires by
            // the time custodyd decides by, not by the stepped wall clock.
            let operation = request_operation(&ca, spec()).await.unwrap();
            service.approve("alice", &operation).await.unwrap();
            service.clock.advance(ttl_ms + 1000);
            let status = service.approve("bob", &operation).await.unwrap_err();
            assert!(matches!(reason(&status).as_str(), "OPERATION_EXPIRED" | "OPERATION_NOT_PENDING"));

            // Both steps are on record.
            let steps = wait_for_clock_steps(&service, before, 2).await;
            assert_eq!(steps.len(), 2, "{steps:?}");
            for step in &steps {
                let detail = step["detail"].as_str().unwrap();
                assert!(detail.contains("stepped backward"), "{detail}");
            }
        });
    }
);

token_test!(
    fn f7_a_backward_step_never_extends_a_cryptoperiod_even_across_a_restart(token) {
        runtime().block_on(async {
            let mut service = TestService::start(token).await;
            let operator = service.client("operator").await;
            create_key(&operator, "issuer", "EC_SIGN_P256_SHA256", Some(2 * 3600)).await;
            // Rotation is left to officers, so the ended version stays primary.
            service.gate("issuer", OperationKind::Rotate).await;
            let ca = service.client("ca-issuing").await;
            sign(&ca, "issuer").await.unwrap();
            service.clock.advance(3 * HOUR_MS);
            assert_eq!(reason(&sign(&ca, "issuer").await.unwrap_err()), "CRYPTOPERIOD_ENDED");
            let before = service.audit_len();

            // Back four hours: the version would be inside its cryptoperiod
            // again by the wall clock.
            service.clock.step(-4 * HOUR_MS);
            assert_eq!(
                reason(&sign(&ca, "issuer").await.unwrap_err()),
                "CRYPTOPERIOD_ENDED",
                "a backward step reopened a cryptoperiod"
            );
            let steps = wait_for_clock_steps(&service, before, 1).await;
            assert!(steps[0]["detail"].as_str().unwrap().contains("stepped backward"));

            // A restart does not forget the time custodyd had reached, and
            // says the clock is behind it.
            drop((ca, operator));
            let before = service.audit_len();
            service.restart().await;
            let ca = service.client("ca-issuing").await;
            assert_eq!(
                reason(&sign(&ca, "issuer").await.unwrap_err()),
                "CRYPTOPERIOD_ENDED",
                "a restart with the clock behind reopened a cryptoperiod"
            );
            let steps = wait_for_clock_steps(&service, before, 1).await;
            let detail = steps[0]["detail"].as_str().unwrap();
            assert!(detail.contains("backward") && detail.contains("at start"), "{detail}");

            // Time runs on from where custodyd had reached, at the rate it
            // passes: the four hours the wall clock lost are never relived.
            service.clock.advance(5 * HOUR_MS);
            let ahead = service.state().clock.now_ms() - service.clock.now_ms();
            assert_eq!(ahead, 4 * HOUR_MS, "custodyd's time went back or stood still");
        });
    }
);

token_test!(
    fn f7_a_forward_step_never_lets_a_scheduled_destruction_run_before_its_window(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            create_key(&operator, "old", "EC_SIGN_P256_SHA256", None).await;
            let mut keys = KeyServiceClient::new(operator.clone());
            keys.rotate_key(RotateKeyRequest { name: "keys/old".into(), ..Default::default() })
                .await
                .unwrap();
            keys.set_key_version_state(SetKeyVersionStateRequest {
                name: "keys/old/versions/1".into(),
                state: KeyVersionState::Deactivated as i32,
                ..Default::default()
            })
            .await
            .unwrap();
            let destroy = operation_spec::Spec::DestroyVersion(VersionRef {
                name: "keys/old/versions/1".into(),
            });
            let operation = request_operation(&operator, destroy).await.unwrap();
            service.approve("alice", &operation).await.unwrap();
            let done = service.approve("bob", &operation).await.unwrap();
            assert_eq!(done.state, OperationState::Succeeded as i32, "{}", done.error);
            let scheduled = get(&operator, "old").await.versions[0].destroy_time.unwrap().seconds;
            let before = service.audit_len();

            // The wall clock jumps 25 hours ahead while 2 hours pass: by the
            // wall clock the 24-hour window is over, in real time it is not.
            service.clock.advance(2 * HOUR_MS);
            service.clock.step(25 * HOUR_MS);
            // Until custodyd has dealt with the step, or destroyed the version.
            for _ in 0..100 {
                if !clock_steps(&service, before).is_empty() || !hsm_has(&service, "key/old/v1").await {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(hsm_has(&service, "key/old/v1").await, "destroyed by a clock step");
            let steps = wait_for_clock_steps(&service, before, 1).await;
            let detail = steps[0]["detail"].as_str().unwrap();
            assert!(detail.contains("stepped forward"), "{detail}");
            assert!(detail.contains("keys/old/versions/1"), "{detail}");
            let version = get(&operator, "old").await.versions[0].clone();
            assert_ne!(version.state, KeyVersionState::Destroyed as i32, "destroyed by a clock step");
            assert!(hsm_has(&service, "key/old/v1").await, "destroyed by a clock step");
            // Held back by exactly the step.
            assert_eq!(version.destroy_time.unwrap().seconds, scheduled + 25 * 3600);

            // Real time passes to an hour before the end of the window.
            service.clock.advance(21 * HOUR_MS);
            // Two scheduler turns (it ticks every second in tests).
            tokio::time::sleep(Duration::from_millis(2500)).await;
            assert!(hsm_has(&service, "key/old/v1").await, "destroyed before its window in real time");
            service.clock.advance(2 * HOUR_MS);
            // The HSM object goes first, then the registry records it: wait
            // for both (bounded).
            for _ in 0..100 {
                if !hsm_has(&service, "key/old/v1").await
                    && get(&operator, "old").await.versions[0].state == KeyVersionState::Destroyed as i32
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(!hsm_has(&service, "key/old/v1").await, "not destroyed once its window passed");
            assert_eq!(
                get(&operator, "old").await.versions[0].state,
                KeyVersionState::Destroyed as i32
            );
        });
    }
);
