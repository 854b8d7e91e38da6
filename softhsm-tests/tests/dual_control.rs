//! Dual control end to end: officers approve exact operations with their own
//! keys, over real mTLS, on a SoftHSM2 token; the clock is injected.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use custody_core::dual_control::approval_message;
use custody_core::identity::Role;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::operation_service_client::OperationServiceClient;
use custody_proto::v1::signing_service_client::SigningServiceClient;
use custody_proto::v1::{
    CreateKeyRequest, Digest, GetKeyRequest, GetOperationRequest, KeyRef, ListOfficersRequest,
    OfficerSpec, OperationKind, OperationState, SetPolicySpec, SignRequest, SignSpec, digest,
    operation_spec, sign_request,
};
use sha2::Digest as _;
use softhsm_tests::service::{TestService, reason, request_operation, runtime};
use softhsm_tests::token_test;
use tonic::transport::Channel;

fn digest_of(data: &[u8]) -> Digest {
    Digest {
        digest: Some(digest::Digest::Sha256(sha2::Sha256::digest(data).to_vec())),
    }
}

async fn officer_channel(service: &TestService, name: &str) -> Channel {
    service.client_as(name, &[Role::Officer]).await
}

async fn create_key(service: &TestService, key_id: &str) {
    KeyServiceClient::new(service.client("operator").await)
        .create_key(CreateKeyRequest {
            key_id: key_id.into(),
            algorithm: custody_proto::v1::Algorithm::EcSignP256Sha256 as i32,
            purpose: 1,
            allowed_signers: vec!["ca-issuing".into()],
            ..Default::default()
        })
        .await
        .unwrap();
}

fn sign_spec(key: &str, data: &[u8]) -> operation_spec::Spec {
    operation_spec::Spec::Sign(SignSpec {
        name: format!("keys/{key}"),
        digest: Some(digest_of(data)),
        encoding: 0,
    })
}

token_test!(
    fn a_quorum_gated_key_signs_only_after_two_distinct_officers_approve(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            create_key(&service, "root").await;
            service.gate("root", OperationKind::Sign).await;
            let key = KeyServiceClient::new(service.client("operator").await)
                .get_key(GetKeyRequest { name: "keys/root".into() })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(key.policies.len(), 1);
            assert_eq!(key.policies[0].operation, "SIGN");

            // The CA can no longer sign alone.
            let ca = service.client("ca-issuing").await;
            let direct = SigningServiceClient::new(ca.clone())
                .sign(SignRequest {
                    name: "keys/root".into(),
                    input: Some(sign_request::Input::Digest(digest_of(b"tbs"))),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(reason(&direct), "QUORUM_REQUIRED");

            let operation = request_operation(&ca, sign_spec("root", b"tbs")).await.unwrap();
            assert!(operation.rendering.contains("SIGN the sha256 digest"), "{}", operation.rendering);
            assert!(operation.rendering.contains(&hex::encode(&operation.digest)));
            assert_eq!(operation.required, 2);
            let one = service.approve("carol", &operation).await.unwrap();
            assert_eq!(one.state, OperationState::Pending as i32);
            assert!(one.signature.is_none());
            // The same officer again, even with a fresh certificate: not a second approval.
            let again = service.approve("carol", &operation).await.unwrap_err();
            assert_eq!(reason(&again), "ALREADY_VOTED");
            let done = service.approve("alice", &operation).await.unwrap();
            assert_eq!(done.state, OperationState::Succeeded as i32, "{}", done.error);

            // The requester reads the signature, and openssl verifies it.
            let read = OperationServiceClient::new(ca.clone())
                .get_operation(GetOperationRequest { name: operation.name.clone() })
                .await
                .unwrap()
                .into_inner();
            let signature = read.signature.unwrap();
            assert_eq!(signature.name, "keys/root/versions/1");
            let pem = KeyServiceClient::new(ca)
                .get_public_key(custody_proto::v1::GetPublicKeyRequest { name: "keys/root".into() })
                .await
                .unwrap()
                .into_inner()
                .pem;
            let d = sha2::Sha256::digest(b"tbs").to_vec();
            assert!(softhsm_tests::openssl_verifies_pem(
                &token.scratch(),
                &pem,
                hsm_shim::SignAlgorithm::EcdsaP256Sha256,
                hsm_shim::SignInput::Digest(&d),
                &signature.signature
            ));
        });
    }
);

token_test!(
    fn approvals_cannot_be_replayed_forged_or_given_by_the_wrong_officer(token) {
        runtime().block_on(async {
            let mut service = TestService::start(token).await;
            create_key(&service, "root").await;
            service.gate("root", OperationKind::Sign).await;
            let ca = service.client("ca-issuing").await;
            let first = request_operation(&ca, sign_spec("root", b"one")).await.unwrap();
            let second = request_operation(&ca, sign_spec("root", b"one")).await.unwrap();
            assert_ne!(first.digest, second.digest, "two requests of the same thing share a digest");

            let mut client = OperationServiceClient::new(officer_channel(&service, "alice").await);
            // Alice's approval of `first`, replayed into `second`.
            let mut replayed = service.vote_for("alice", &first, true);
            replayed.name = second.name.clone();
            assert_eq!(reason(&client.approve_operation(replayed).await.unwrap_err()), "BAD_APPROVAL_SIGNATURE");
            // A denial signature is not an approval.
            let denial = service.vote_for("alice", &first, false);
            let status = client.approve_operation(denial).await.unwrap_err();
            assert_eq!(reason(&status), "BAD_APPROVAL_SIGNATURE");
            // Bob's signature submitted as Alice's, and Alice claiming to be Bob.
            let mut borrowed = service.vote_for("bob", &first, true);
            borrowed.officer_id = "alice".into();
            assert_eq!(reason(&client.approve_operation(borrowed).await.unwrap_err()), "BAD_APPROVAL_SIGNATURE");
            let impostor = service.vote_for("bob", &first, true);
            assert_eq!(reason(&client.approve_operation(impostor).await.unwrap_err()), "OFFICER_MISMATCH");
            // Not an officer at all, and an unknown officer id.
            let stranger = service.client_as("mallory", &[Role::Officer]).await;
            let mut unknown = service.vote_for("alice", &first, true);
            unknown.officer_id = "mallory".into();
            let status = OperationServiceClient::new(stranger).approve_operation(unknown).await.unwrap_err();
            assert_eq!(reason(&status), "OFFICER_NOT_ENROLLED");
            let status = OperationServiceClient::new(ca.clone())
                .approve_operation(service.vote_for("alice", &first, true))
                .await
                .unwrap_err();
            assert_eq!(reason(&status), "ROLE_REQUIRED");

            // Genuine approvals execute `first`; afterwards a vote is refused.
            service.approve("alice", &first).await.unwrap();
            let done = service.approve("bob", &first).await.unwrap();
            assert_eq!(done.state, OperationState::Succeeded as i32);
            assert_eq!(reason(&service.approve("carol", &first).await.unwrap_err()), "OPERATION_NOT_PENDING");

            // Across a restart: `second` keeps its one approval, the executed one stays executed.
            service.approve("alice", &second).await.unwrap();
            drop((client, ca));
            service.restart().await;
            assert_eq!(reason(&service.approve("carol", &first).await.unwrap_err()), "OPERATION_NOT_PENDING");
            assert_eq!(reason(&service.approve("alice", &second).await.unwrap_err()), "ALREADY_VOTED");
            let done = service.approve("carol", &second).await.unwrap();
            assert_eq!(done.state, OperationState::Succeeded as i32, "{}", done.error);
        });
    }
);

token_test!(
    fn approvals_expire_exactly_at_the_deadline_even_while_the_daemon_is_down(token) {
        runtime().block_on(async {
            let mut service = TestService::start(token).await;
            create_key(&service, "root").await;
            service.gate("root", OperationKind::Sign).await;
            let ca = service.client("ca-issuing").await;
            let ttl_ms = service.config.dual_control.approval_ttl_secs as i64 * 1000;

            // At expiry - 1 s an approval counts.
            let early = request_operation(&ca, sign_spec("root", b"early")).await.unwrap();
            service.approve("alice", &early).await.unwrap();
            service.clock.advance(ttl_ms - 1000);
            let done = service.approve("bob", &early).await.unwrap();
            assert_eq!(done.state, OperationState::Succeeded as i32);

            // At expiry, and at expiry + 1 s, it does not.
            for late_by in [0, 1000] {
                let operation = request_operation(&ca, sign_spec("root", b"late")).await.unwrap();
                service.approve("alice", &operation).await.unwrap();
                service.clock.advance(ttl_ms + late_by);
                let status = service.approve("bob", &operation).await.unwrap_err();
                assert!(matches!(reason(&status).as_str(), "OPERATION_EXPIRED" | "OPERATION_NOT_PENDING"), "{status:?}");
                let read = OperationServiceClient::new(ca.clone())
                    .get_operation(GetOperationRequest { name: operation.name.clone() })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(read.state, OperationState::Expired as i32);
                assert!(read.signature.is_none());
            }

            // Expiry while the daemon is down.
            let pending = request_operation(&ca, sign_spec("root", b"down")).await.unwrap();
            service.approve("alice", &pending).await.unwrap();
            drop(ca);
            service.stop().await;
            service.clock.advance(ttl_ms + 1);
            service.restart().await;
            let status = service.approve("bob", &pending).await.unwrap_err();
            assert!(matches!(reason(&status).as_str(), "OPERATION_EXPIRED" | "OPERATION_NOT_PENDING"));
            let audit: Vec<String> = service
                .state()
                .audit
                .records(1)
                .map(|r| String::from_utf8(r.unwrap().entry).unwrap())
                .filter(|e| e.contains(&pending.name) && e.contains("operation_finished"))
                .collect();
            assert_eq!(audit.len(), 1, "the expiry is recorded once");
            assert!(audit[0].contains("expired"));
        });
    }
);

token_test!(
    fn requesters_cannot_approve_denials_veto_and_removed_officers_stop_counting(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            create_key(&service, "root").await;
            // Alice, as officer, requests a policy change: she cannot approve it.
            let alice = officer_channel(&service, "alice").await;
            let operation = request_operation(
                &alice,
                operation_spec::Spec::SetPolicy(SetPolicySpec {
                    name: "keys/root".into(),
                    operation: OperationKind::Rotate as i32,
                    officers: vec!["alice".into(), "bob".into(), "carol".into()],
                    required: 2,
                }),
            )
            .await
            .unwrap();
            assert_eq!(reason(&service.approve("alice", &operation).await.unwrap_err()), "REQUESTER_CANNOT_APPROVE");
            // Carol denies: a veto.
            let carol = officer_channel(&service, "carol").await;
            let denied = OperationServiceClient::new(carol)
                .deny_operation(service.vote_for("carol", &operation, false))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(denied.state, OperationState::Denied as i32);
            assert_eq!(reason(&service.approve("bob", &operation).await.unwrap_err()), "OPERATION_NOT_PENDING");

            // Impossible and weak policies are refused outright.
            let operator = service.client("operator").await;
            for (officers, required, why) in [
                (vec!["alice", "bob"], 3, "M > N"),
                (vec!["alice", "bob"], 1, "M < 2"),
                (vec!["alice", "nobody"], 2, "unknown officer"),
                (vec!["alice", "alice", "bob"], 2, "duplicate"),
            ] {
                let status = request_operation(
                    &operator,
                    operation_spec::Spec::SetPolicy(SetPolicySpec {
                        name: "keys/root".into(),
                        operation: OperationKind::Sign as i32,
                        officers: officers.into_iter().map(String::from).collect(),
                        required,
                    }),
                )
                .await
                .unwrap_err();
                assert_eq!(reason(&status), "BAD_POLICY", "{why}");
            }

            // Remove carol (administrative quorum) while a request is pending
            // that carol already approved: her approval stops counting.
            service.gate("root", OperationKind::Rotate).await;
            let pending = request_operation(&operator, operation_spec::Spec::Rotate(KeyRef { name: "keys/root".into() })).await.unwrap();
            service.approve("carol", &pending).await.unwrap();
            let removal = request_operation(
                &operator,
                operation_spec::Spec::RemoveOfficer(OfficerSpec { officer_id: "carol".into(), ..Default::default() }),
            )
            .await
            .unwrap();
            service.approve("alice", &removal).await.unwrap();
            let removed = service.approve("bob", &removal).await.unwrap();
            assert_eq!(removed.state, OperationState::Succeeded as i32, "{}", removed.error);
            // The officers' list is for officers and auditors.
            let officers = OperationServiceClient::new(service.client("auditor").await)
                .list_officers(ListOfficersRequest {})
                .await
                .unwrap()
                .into_inner();
            assert_eq!(officers.officers.len(), 2);
            let after = service.approve("alice", &pending).await.unwrap();
            assert_eq!(after.state, OperationState::Pending as i32, "a removed officer's approval still counted");
            let done = service.approve("bob", &pending).await.unwrap();
            assert_eq!(done.state, OperationState::Succeeded as i32);
            // The officer set cannot shrink below the administrative quorum.
            let too_far = request_operation(
                &operator,
                operation_spec::Spec::RemoveOfficer(OfficerSpec { officer_id: "bob".into(), ..Default::default() }),
            )
            .await
            .unwrap_err();
            assert_eq!(reason(&too_far), "OFFICER_REMOVAL_REFUSED");
        });
    }
);

token_test!(
    fn the_audit_log_alone_proves_who_approved_what(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            create_key(&service, "root").await;
            service.gate("root", OperationKind::Sign).await;
            let ca = service.client("ca-issuing").await;
            let operation = request_operation(&ca, sign_spec("root", b"proof")).await.unwrap();
            service.approve("bob", &operation).await.unwrap();
            service.approve("carol", &operation).await.unwrap();
            let mut proved = 0;
            for record in service.state().audit.records(1) {
                let entry: serde_json::Value = serde_json::from_slice(&record.unwrap().entry).unwrap();
                let event = &entry["event"];
                if event["type"] == "vote" && event["operation"] == operation.name.as_str() && event["outcome"] == "ok" {
                    let public_key = hex::decode(event["public_key"].as_str().unwrap()).unwrap();
                    let digest: [u8; 32] = hex::decode(event["digest"].as_str().unwrap()).unwrap().try_into().unwrap();
                    let signature = hex::decode(event["signature"].as_str().unwrap()).unwrap();
                    assert_eq!(digest.to_vec(), operation.digest);
                    assert!(custody_core::dual_control::officer_key::verify(&public_key, &approval_message(&digest), &signature));
                    proved += 1;
                }
            }
            assert_eq!(proved, 2);
        });
    }
);

token_test!(
    fn approvals_given_under_an_older_policy_do_not_count_and_officer_changes_keep_policies_possible(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            create_key(&service, "root").await;
            service.gate("root", OperationKind::Sign).await;
            let ca = service.client("ca-issuing").await;
            let pending = request_operation(&ca, sign_spec("root", b"before the change")).await.unwrap();
            service.approve("alice", &pending).await.unwrap();

            // The SIGN policy is tightened to 3 of 3 (the key has no SET_POLICY
            // policy, so the administrative quorum approves the change).
            let operator = service.client("operator").await;
            let tighten = request_operation(
                &operator,
                operation_spec::Spec::SetPolicy(SetPolicySpec {
                    name: "keys/root".into(),
                    operation: OperationKind::Sign as i32,
                    officers: vec!["alice".into(), "bob".into(), "carol".into()],
                    required: 3,
                }),
            )
            .await
            .unwrap();
            service.approve("alice", &tighten).await.unwrap();
            service.approve("bob", &tighten).await.unwrap();
            // The second approval completes the old 2-of-3, but the policy changed.
            let done = service.approve("bob", &pending).await.unwrap();
            assert_eq!(done.state, OperationState::Failed as i32);
            assert!(done.error.contains("POLICY_CHANGED"), "{}", done.error);
            assert!(done.signature.is_none());

            // Removing an officer who is needed by a 3-of-3 policy is refused.
            let status = request_operation(
                &operator,
                operation_spec::Spec::RemoveOfficer(OfficerSpec { officer_id: "carol".into(), ..Default::default() }),
            )
            .await
            .unwrap_err();
            assert_eq!(reason(&status), "OFFICER_REMOVAL_REFUSED");

            // Two pending enrollments of the same person: only the first lands.
            let key = custody_core::dual_control::officer_key::OfficerKey::generate(
                "dave",
                &hsm_shim::SecretString::from("a passphrase for dave"),
            )
            .unwrap()
            .0;
            let enroll = |id: &str| {
                operation_spec::Spec::AddOfficer(OfficerSpec {
                    officer_id: id.into(),
                    principal: "dave".into(),
                    public_key: key.public_key().to_vec(),
                })
            };
            let first = request_operation(&operator, enroll("dave")).await.unwrap();
            let second = request_operation(&operator, enroll("dave-2")).await.unwrap();
            for operation in [&first, &second] {
                service.approve("alice", operation).await.unwrap();
            }
            let first = service.approve("bob", &first).await.unwrap();
            assert_eq!(first.state, OperationState::Succeeded as i32, "{}", first.error);
            // The first enrollment changed the officer set, and so the
            // administrative quorum the second was approved under; either way
            // the same person is not enrolled twice.
            let second = service.approve("bob", &second).await.unwrap();
            assert_eq!(second.state, OperationState::Failed as i32);
            assert!(
                second.error.contains("POLICY_CHANGED") || second.error.contains("OFFICER_EXISTS"),
                "{}",
                second.error
            );
            // The officers' list is for officers and auditors.
            let officers = OperationServiceClient::new(service.client("auditor").await)
                .list_officers(ListOfficersRequest {})
                .await
                .unwrap()
                .into_inner()
                .officers;
            assert_eq!(officers.iter().filter(|o| o.principal == "dave").count(), 1);
        });
    }
);

token_test!(
    fn a_key_named_like_the_audit_key_cannot_touch_it(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let before = service.state().audit.audit_key_spki().to_vec();
            service.state().audit.checkpoint().await.unwrap();
            create_key(&service, "custody-audit").await;
            // The audit key is untouched: it still verifies the checkpoint it made.
            let report = service.state().audit.verify();
            assert!(report.first_bad.is_none(), "{report:?}");
            assert!(report.checkpoints >= 1);
            let label = hsm_shim::KeyLabel::new(custody_core::audit::AUDIT_KEY_LABEL).unwrap();
            let after = service.state().hsm.session().unwrap().public_key(&label).unwrap();
            assert_eq!(after.spki_der(), before.as_slice());
        });
    }
);
