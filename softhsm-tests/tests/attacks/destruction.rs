//! Attacks on a key-destruction ceremony (threat model C21-C25, C29): the
//! ceremony only witnesses the carrying-out of a destruction officers
//! already approved (DESTROY_VERSION, M-of-N) and scheduled; it must never
//! shorten the cancel window, pass a legal hold or a CancelDestroy, run
//! under fewer officers than the key's DESTROY_VERSION policy, or lose a
//! race with the scheduler.
//!
//! Each test retires `old-root` v1 (rotated away, deactivated; C29's
//! retires the whole key, its only version put out of use) and has
//! alice and bob approve its destruction (24 h cancel window) unless it
//! attacks that step, then runs the ceremony through the real gRPC server
//! on SoftHSM2 with the test's manual clock.

use std::time::Duration;

use custody_core::ceremony::transcript::Transcript;
use custody_proto::v1::ceremony_service_client::CeremonyServiceClient;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::{
    Algorithm, CeremonyState, GetKeyRequest, GetTranscriptRequest, KeyVersionState, OperationKind,
    OperationState, RotateKeyRequest, SetKeyVersionStateRequest, SetLegalHoldRequest,
    SetPolicySpec, VersionRef, operation_spec,
};
use softhsm_tests::service::{TestService, reason, request_operation, runtime};
use softhsm_tests::token_test;
use tonic::transport::Channel;

use crate::common::{create_key, drift, officers_of, set_state, state};

const HOUR_MS: i64 = 3_600_000;
const V1: &str = "keys/old-root/versions/1";

fn script(id: &str) -> String {
    include_str!("../../../deploy/ceremonies/key-destruction.toml")
        .replace("\"destroy-old-root-2026\"", &format!("\"{id}\""))
}

/// `old-root` with v1 retired (v2 primary).
async fn retired(operator: &Channel) {
    create_key(operator, "old-root", Algorithm::EcSignP256Sha256, false)
        .await
        .unwrap();
    let mut keys = KeyServiceClient::new(operator.clone());
    keys.rotate_key(RotateKeyRequest {
        name: "keys/old-root".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    keys.set_key_version_state(SetKeyVersionStateRequest {
        name: V1.into(),
        state: KeyVersionState::Deactivated as i32,
        ..Default::default()
    })
    .await
    .unwrap();
}

/// alice and `second` approve v1's destruction: scheduled 24 h from now.
async fn approve_destruction(service: &TestService, operator: &Channel, second: &str) {
    let destroy = operation_spec::Spec::DestroyVersion(VersionRef { name: V1.into() });
    let operation = request_operation(operator, destroy).await.unwrap();
    service.approve("alice", &operation).await.unwrap();
    let done = service.approve(second, &operation).await.unwrap();
    assert_eq!(
        done.state,
        OperationState::Succeeded as i32,
        "{}",
        done.error
    );
}

async fn on_token(service: &TestService, label: &str) -> bool {
    let label = hsm_shim::KeyLabel::new(label).unwrap();
    let objects = service.state().hsm.run(|s| s.inventory()).await.unwrap();
    objects
        .iter()
        .any(|o| o.label == label.as_str() || o.id == label.as_str())
}

async fn v1_state(operator: &Channel) -> i32 {
    KeyServiceClient::new(operator.clone())
        .get_key(GetKeyRequest {
            name: "keys/old-root".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions[0]
        .state
}

/// Two scheduler turns (it ticks every second in tests).
async fn scheduler_turns() {
    tokio::time::sleep(Duration::from_millis(2500)).await;
}

token_test!(
    fn c21_a_destruction_ceremony_never_shortens_the_cancel_window(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = officers_of(&service).await;
            let operator = service.client("operator").await;
            retired(&operator).await;

            // Not approved, not scheduled: refused at start.
            let refused = officers.start("alice", &script("c-unscheduled"), "").await.unwrap_err();
            assert_eq!(reason(&refused), "NOT_SCHEDULED", "{refused:?}");

            // Approved, 24 h to go: the ceremony may open (and reserve), but
            // the quorum signing in does not make it due.
            approve_destruction(&service, &operator, "bob").await;
            let text = script("c-early");
            let opened = officers.start("alice", &text, "").await.unwrap();
            officers.sign_in("alice", &opened.name, &text).await.unwrap();
            let early = officers.sign_in("bob", &opened.name, &text).await;
            // The attack carried as far as custodyd lets it: if it shows a
            // manifest, the two confirm it.
            if let Ok(waiting) = &early {
                if state(waiting) == CeremonyState::AwaitingConfirmation {
                    let manifest = waiting.fingerprint.clone().unwrap().value;
                    let _ = officers.confirm("alice", &opened.name, &text, &manifest).await;
                    let _ = officers.confirm("bob", &opened.name, &text, &manifest).await;
                }
            }
            let ceremony = officers.get("alice", &opened.name).await.unwrap();
            assert!(
                on_token(&service, "key/old-root/v1").await
                    && v1_state(&operator).await != KeyVersionState::Destroyed as i32,
                "destroyed inside its cancel window: sign-in {:?}, ceremony {:?}",
                early.as_ref().map(state).map_err(reason),
                state(&ceremony)
            );
            assert_eq!(state(&ceremony), CeremonyState::RolledBack, "{}", ceremony.error);
            assert!(ceremony.error.contains("not due"), "{}", ceremony.error);

            // Rolled back, the reservation is gone: the approved destruction
            // is the scheduler's again, once its window is over.
            service.clock.advance(25 * HOUR_MS);
            for _ in 0..100 {
                if v1_state(&operator).await == KeyVersionState::Destroyed as i32 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(v1_state(&operator).await, KeyVersionState::Destroyed as i32);
            assert!(!on_token(&service, "key/old-root/v1").await);
        });
    }
);

token_test!(
    fn c22_a_held_version_is_never_destroyed_by_a_ceremony(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = officers_of(&service).await;
            let operator = service.client("operator").await;
            retired(&operator).await;
            approve_destruction(&service, &operator, "bob").await;
            let mut keys = KeyServiceClient::new(operator.clone());
            keys.set_legal_hold(SetLegalHoldRequest { name: V1.into(), reason: "case 2026-117".into() })
                .await
                .unwrap();
            let refused = officers.start("alice", &script("c-held"), "").await.unwrap_err();
            assert_eq!(reason(&refused), "LEGAL_HOLD", "{refused:?}");
            service.clock.advance(25 * HOUR_MS);
            scheduler_turns().await;
            assert!(on_token(&service, "key/old-root/v1").await, "a held version was destroyed");
        });
    }
);

/// Opens a ceremony over v1 (approved), lets its window pass, has alice and
/// bob sign in; returns the ceremony's name, script and manifest digest.
async fn waiting_for_confirmation(
    service: &TestService,
    officers: &softhsm_tests::ceremony::Officers<'_>,
    id: &str,
) -> (String, String, Vec<u8>) {
    let text = script(id);
    let opened = officers.start("alice", &text, "").await.unwrap();
    service.clock.advance(25 * HOUR_MS);
    scheduler_turns().await;
    officers
        .sign_in("alice", &opened.name, &text)
        .await
        .unwrap();
    let waiting = officers.sign_in("bob", &opened.name, &text).await.unwrap();
    assert_eq!(
        state(&waiting),
        CeremonyState::AwaitingConfirmation,
        "{}",
        waiting.error
    );
    (opened.name, text, waiting.fingerprint.unwrap().value)
}

token_test!(
    fn c23_a_legal_hold_or_cancel_issued_while_the_ceremony_waits_wins(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = officers_of(&service).await;
            let operator = service.client("operator").await;
            retired(&operator).await;
            let mut keys = KeyServiceClient::new(operator.clone());
            for (id, interrupt) in [("c-hold", "hold"), ("c-cancel", "cancel")] {
                approve_destruction(&service, &operator, "bob").await;
                let (name, text, manifest) = waiting_for_confirmation(&service, &officers, id).await;
                // CancelDestroy and SetLegalHold still work on a reserved
                // version: they win.
                match interrupt {
                    "hold" => {
                        keys.set_legal_hold(SetLegalHoldRequest { name: V1.into(), reason: "case 2026-118".into() })
                            .await
                            .unwrap();
                    }
                    _ => {
                        keys.cancel_destroy(VersionRef { name: V1.into() }).await.unwrap();
                    }
                }
                officers.confirm("alice", &name, &text, &manifest).await.unwrap();
                let last = officers.confirm("bob", &name, &text, &manifest).await;
                let ceremony = officers.get("alice", &name).await.unwrap();
                assert!(
                    on_token(&service, "key/old-root/v1").await
                        && v1_state(&operator).await != KeyVersionState::Destroyed as i32
                        && state(&ceremony) == CeremonyState::RolledBack,
                    "{interrupt}: destroyed anyway: last confirm {:?}, ceremony {:?} ({})",
                    last.as_ref().map(state).map_err(reason),
                    state(&ceremony),
                    ceremony.error
                );
                if interrupt == "hold" {
                    let release = request_operation(
                        &operator,
                        operation_spec::Spec::ReleaseLegalHold(VersionRef { name: V1.into() }),
                    )
                    .await
                    .unwrap();
                    service.approve("alice", &release).await.unwrap();
                    service.approve("bob", &release).await.unwrap();
                }
            }
        });
    }
);

token_test!(
    fn c24_a_ceremony_quorum_below_the_destroy_version_policy_is_refused(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = officers_of(&service).await;
            let operator = service.client("operator").await;
            retired(&operator).await;
            tighten_to_three(&service, &operator).await;
            let destroy = operation_spec::Spec::DestroyVersion(VersionRef { name: V1.into() });
            let operation = request_operation(&operator, destroy).await.unwrap();
            for officer in ["alice", "bob", "carol"] {
                service.approve(officer, &operation).await.unwrap();
            }
            // A 2-of-3 ceremony: two officers would witness what needs three.
            let refused = officers.start("alice", &script("c-two"), "").await.unwrap_err();
            assert_eq!(reason(&refused), "BAD_SCRIPT", "{refused:?}");
            assert!(refused.message().contains("DESTROY_VERSION"), "{}", refused.message());
            assert!(on_token(&service, "key/old-root/v1").await);
        });
    }
);

token_test!(
    fn c25_the_scheduler_leaves_a_reserved_version_and_the_ceremony_destroys_and_verifies_it(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = officers_of(&service).await;
            let operator = service.client("operator").await;
            retired(&operator).await;
            approve_destruction(&service, &operator, "carol").await;
            // The window passes while the ceremony holds the reservation:
            // the scheduler must not destroy v1 first.
            let (name, text, manifest) = waiting_for_confirmation(&service, &officers, "c-witnessed").await;
            assert!(
                on_token(&service, "key/old-root/v1").await,
                "the scheduler destroyed a version a ceremony reserved, unwitnessed"
            );
            officers.confirm("alice", &name, &text, &manifest).await.unwrap();
            let done = officers.confirm("bob", &name, &text, &manifest).await.unwrap();
            assert_eq!(state(&done), CeremonyState::Completed, "{}", done.error);
            assert!(!on_token(&service, "key/old-root/v1").await, "an object of v1 remains on the token");
            assert!(on_token(&service, "key/old-root/v2").await);
            assert_eq!(v1_state(&operator).await, KeyVersionState::Destroyed as i32);

            let json = CeremonyServiceClient::new(service.client("alice").await)
                .get_transcript(GetTranscriptRequest { name: name.clone() })
                .await
                .unwrap()
                .into_inner()
                .json;
            let transcript: Transcript = serde_json::from_str(&json).unwrap();
            transcript.verify(service.state().audit.audit_key_spki()).unwrap();
            let digest = hex::encode(&manifest);
            assert!(json.contains(&digest), "the transcript lacks the manifest digest");
            assert!(json.contains("no object labelled"), "the transcript lacks the verification");
            assert!(json.contains("backup_bundles_holding_copies"), "{json}");
            // Nothing left for the scheduler to do twice.
            scheduler_turns().await;
            assert_eq!(v1_state(&operator).await, KeyVersionState::Destroyed as i32);
        });
    }
);

/// DESTROY_VERSION of old-root tightened to all three officers (alice and
/// bob approve the change under the administrative quorum).
async fn tighten_to_three(service: &TestService, operator: &Channel) {
    let tighten = request_operation(
        operator,
        operation_spec::Spec::SetPolicy(SetPolicySpec {
            name: "keys/old-root".into(),
            operation: OperationKind::DestroyVersion as i32,
            officers: vec!["alice".into(), "bob".into(), "carol".into()],
            required: 3,
        }),
    )
    .await
    .unwrap();
    service.approve("alice", &tighten).await.unwrap();
    let set = service.approve("bob", &tighten).await.unwrap();
    assert_eq!(set.state, OperationState::Succeeded as i32, "{}", set.error);
}

token_test!(
    fn c28_a_destruction_approved_under_a_weaker_policy_than_now_in_force_is_not_carried_out(token) {
        // Two colluding officers approve v1's destruction under the 2-of-3
        // administrative quorum; the officers then put DESTROY_VERSION of
        // the key under all three (an approval not yet carried out counts
        // under the policy it was given for, as a pending operation's
        // does). Neither a ceremony of the three nor the scheduler may
        // carry out what two approved.
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = officers_of(&service).await;
            let operator = service.client("operator").await;
            retired(&operator).await;
            approve_destruction(&service, &operator, "bob").await;
            tighten_to_three(&service, &operator).await;

            let three = script("c-three").replace("required = 2", "required = 3");
            let opened = officers.start("alice", &three, "").await;
            assert_eq!(
                opened.as_ref().map(state).map_err(reason),
                Err("POLICY_CHANGED".to_string()),
                "a ceremony opened over a destruction two officers approved under the weaker policy"
            );
            service.clock.advance(25 * HOUR_MS);
            scheduler_turns().await;
            assert!(
                on_token(&service, "key/old-root/v1").await
                    && v1_state(&operator).await != KeyVersionState::Destroyed as i32,
                "the scheduler carried out a destruction approved under a weaker policy than now in force"
            );
            // The control: approved again under the policy in force (the
            // scheduler dropped the void schedule), the three open it.
            let destroy = operation_spec::Spec::DestroyVersion(VersionRef { name: V1.into() });
            let operation = request_operation(&operator, destroy).await.unwrap();
            for officer in ["alice", "bob", "carol"] {
                service.approve(officer, &operation).await.unwrap();
            }
            let opened = officers.start("alice", &script("c-three-again").replace("required = 2", "required = 3"), "").await;
            assert_eq!(opened.as_ref().map(state).map_err(reason), Ok(CeremonyState::AwaitingOfficers));
        });
    }
);

token_test!(
    fn c29_a_retired_roots_last_version_is_destroyed_by_a_witnessed_ceremony_and_never_comes_back(token) {
        // The end of a root's life as WebTrust wants it witnessed: its only
        // version, the primary, goes out of use (which retires the key),
        // two officers approve its destruction, and a ceremony carries it
        // out. The attacks: custodyd making the retired key a new version
        // when its last version is found compromised (on the request or on
        // the scheduler's turn), the ceremony refusing the primary (leaving
        // the last key unwitnessed, to the scheduler), and an object left
        // on the token.
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = officers_of(&service).await;
            let operator = service.client("operator").await;
            create_key(&operator, "old-root", Algorithm::EcSignP256Sha256, false)
                .await
                .unwrap();
            set_state(&operator, V1, KeyVersionState::Deactivated, "end of life")
                .await
                .unwrap();
            set_state(&operator, V1, KeyVersionState::Compromised, "the retired root's backup tape found opened")
                .await
                .unwrap();
            scheduler_turns().await;
            let key = crate::common::get_key(&operator, "old-root").await.unwrap();
            assert_eq!(key.versions.len(), 1, "a compromise brought the retired root back: {key:?}");
            approve_destruction(&service, &operator, "bob").await;

            let (name, text, manifest) =
                waiting_for_confirmation(&service, &officers, "c-last-version").await;
            assert!(
                on_token(&service, "key/old-root/v1").await,
                "the scheduler destroyed the reserved primary, unwitnessed"
            );
            officers.confirm("alice", &name, &text, &manifest).await.unwrap();
            let done = officers.confirm("bob", &name, &text, &manifest).await.unwrap();
            assert_eq!(state(&done), CeremonyState::Completed, "{}", done.error);
            assert!(!on_token(&service, "key/old-root/v1").await, "the primary's object remains on the token");
            assert_eq!(v1_state(&operator).await, KeyVersionState::Destroyed as i32);
            assert!(drift(&service).await.is_empty(), "{:?}", drift(&service).await);

            // Retired for good: nothing signs, and the key has its one version.
            let ca = service.client("ca-issuing").await;
            let refused = custody_proto::v1::signing_service_client::SigningServiceClient::new(ca)
                .sign(custody_proto::v1::SignRequest {
                    name: "keys/old-root".into(),
                    input: Some(custody_proto::v1::sign_request::Input::Data(b"after".to_vec())),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(reason(&refused), "VERSION_NOT_ACTIVE", "{refused:?}");
            scheduler_turns().await;
            let key = crate::common::get_key(&operator, "old-root").await.unwrap();
            assert_eq!(key.versions.len(), 1, "the retired root came back: {key:?}");
        });
    }
);
