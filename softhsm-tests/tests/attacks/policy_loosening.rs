//! A key's use policy loosened by fewer officers than it names (threat
//! model R7).
//!
//! The administrative quorum is 2 of alice, bob and carol; `root`'s SIGN
//! policy is 3 of the three, and `root` has no SET_POLICY policy of its
//! own, so the administrative quorum changes its policies. The operator
//! asks to remove the SIGN policy, or to lower it to 2, and alice and bob
//! approve; then `ca-issuing` signs directly. In the second attack the
//! removal is asked while SIGN is still 2 of 3 (which the administrative
//! quorum covers), SIGN is then raised to 3 of 3, and alice and bob approve
//! the waiting removal.
//!
//! Safe: no signature. A policy change is approved by a quorum that covers
//! the policy it replaces, checked when it is asked and again when it would
//! run (`authz::policy_change_quorum`): both changes are refused
//! `BAD_POLICY`, the waiting removal fails instead of running, and SIGN
//! stays 3 of 3. Control: once `root` has a SET_POLICY policy of 3 of the
//! three, the same removal is asked, approved by all three, and runs.
//!
//! A third attack sets a policy the key does not have. The administrative
//! quorum is 3 of 3; it gave `root` a SET_POLICY policy of 2 of 3 (a team
//! manages its policies), and `root` has no DESTROY_VERSION policy, so the
//! administrative 3 governs its destruction. alice and bob give it a
//! DESTROY_VERSION policy of 2 of themselves, then approve destroying a
//! version. Safe: a kind always gated and with no policy of the key's own
//! is the administrative quorum's, and a change must cover that too
//! (`BAD_POLICY`); the destruction then needs the 3.

use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::{
    GetKeyRequest, OperationKind, OperationState, SetPolicySpec, operation_spec,
};
use softhsm_tests::service::{
    TestService, create_key, reason, request_operation, runtime, sign_sha256,
};
use softhsm_tests::token_test;

/// The SET_POLICY operation putting `kind` of `root` under `required` of
/// the three officers (0 removes it).
fn policy(kind: OperationKind, required: u32) -> operation_spec::Spec {
    operation_spec::Spec::SetPolicy(SetPolicySpec {
        name: "keys/root".into(),
        operation: kind as i32,
        officers: vec!["alice".into(), "bob".into(), "carol".into()],
        required,
    })
}

/// `root`'s SIGN policy as (required, officers), if it has one.
async fn sign_policy(service: &TestService) -> Option<(u32, Vec<String>)> {
    let key = KeyServiceClient::new(service.client("operator").await)
        .get_key(GetKeyRequest {
            name: "keys/root".into(),
        })
        .await
        .unwrap()
        .into_inner();
    key.policies
        .into_iter()
        .find(|p| p.operation == "SIGN")
        .map(|p| (p.required, p.officers))
}

token_test!(
    fn two_officers_cannot_loosen_a_sign_policy_of_three(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            let signer = service.client("ca-issuing").await;
            create_key(&operator, "root", "EC_SIGN_P256_SHA256", None).await;
            service.set_policy("root", OperationKind::Sign, 3, ["alice", "bob"]).await;
            let gated = sign_sha256(&signer, "root", b"before").await.unwrap_err();
            assert_eq!(reason(&gated), "QUORUM_REQUIRED", "{gated:?}");

            // The attack: removal, then lowering, each approved by two.
            for required in [0, 2] {
                match request_operation(&operator, policy(OperationKind::Sign, required)).await {
                    Err(refused) => {
                        assert_eq!(reason(&refused), "BAD_POLICY", "{refused:?}");
                        assert!(
                            refused.message().contains("SET_POLICY policy that covers"),
                            "{}",
                            refused.message()
                        );
                    }
                    Ok(asked) => {
                        let _ = service.approve("alice", &asked).await;
                        let _ = service.approve("bob", &asked).await;
                    }
                }
                let signed = sign_sha256(&signer, "root", b"after two approvals").await;
                assert!(
                    signed.is_err(),
                    "alice and bob set root's SIGN policy of 3 to {required} and ca-issuing signed"
                );
                assert_eq!(
                    sign_policy(&service).await,
                    Some((3, vec!["alice".into(), "bob".into(), "carol".into()])),
                    "SIGN policy after the attempt to set it to {required}"
                );
            }

            // Control: a SET_POLICY policy covering SIGN lets all three
            // remove it.
            service.set_policy("root", OperationKind::SetPolicy, 3, ["alice", "bob"]).await;
            let removal = request_operation(&operator, policy(OperationKind::Sign, 0))
                .await
                .expect("the removal is asked under a quorum that covers SIGN");
            service.approve("alice", &removal).await.unwrap();
            service.approve("bob", &removal).await.unwrap();
            let done = service.approve("carol", &removal).await.unwrap();
            assert_eq!(done.state, OperationState::Succeeded as i32, "{}", done.error);
            assert_eq!(sign_policy(&service).await, None);
            sign_sha256(&signer, "root", b"ungated").await.unwrap();
        });
    }
);

token_test!(
    fn a_policy_removal_asked_before_the_policy_was_tightened_does_not_run_after(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            let signer = service.client("ca-issuing").await;
            create_key(&operator, "root", "EC_SIGN_P256_SHA256", None).await;
            service.set_policy("root", OperationKind::Sign, 2, ["alice", "bob"]).await;
            // Asked while SIGN is 2 of 3, which the administrative quorum covers.
            let removal = request_operation(&operator, policy(OperationKind::Sign, 0))
                .await
                .expect("asked under a quorum that covers SIGN as it is");
            service.set_policy("root", OperationKind::Sign, 3, ["alice", "bob"]).await;
            service.approve("alice", &removal).await.unwrap();
            let last = service.approve("bob", &removal).await;
            let signed = sign_sha256(&signer, "root", b"after the removal").await;
            assert!(
                signed.is_err(),
                "a removal asked under SIGN 2 of 3 ran after SIGN became 3 of 3, approved by two: {last:?}"
            );
            let last = last.unwrap();
            assert_eq!(last.state, OperationState::Failed as i32, "{last:?}");
            assert!(last.error.contains("BAD_POLICY"), "{}", last.error);
            assert_eq!(
                sign_policy(&service).await,
                Some((3, vec!["alice".into(), "bob".into(), "carol".into()]))
            );
        });
    }
);

token_test!(
    fn a_weaker_set_policy_quorum_cannot_give_itself_a_key_s_destruction(token) {
        use custody_proto::v1::{KeyVersionState, VersionRef};
        runtime().block_on(async {
            let service = crate::common::service_with_quorum(token, 3).await;
            let operator = service.client("operator").await;
            create_key(&operator, "root", "EC_SIGN_P256_SHA256", None).await;
            KeyServiceClient::new(operator.clone())
                .rotate_key(custody_proto::v1::RotateKeyRequest { name: "keys/root".into(), ..Default::default() })
                .await
                .unwrap();
            crate::common::set_state(&operator, "keys/root/versions/1", KeyVersionState::Deactivated, "")
                .await
                .unwrap();
            let team = request_operation(&operator, policy(OperationKind::SetPolicy, 2)).await.unwrap();
            for officer in ["alice", "bob", "carol"] {
                service.approve(officer, &team).await.unwrap();
            }

            let asked = request_operation(
                &operator,
                operation_spec::Spec::SetPolicy(SetPolicySpec {
                    name: "keys/root".into(),
                    operation: OperationKind::DestroyVersion as i32,
                    officers: vec!["alice".into(), "bob".into()],
                    required: 2,
                }),
            )
            .await;
            let took = match &asked {
                Ok(change) => {
                    service.approve("alice", change).await.unwrap();
                    service.approve("bob", change).await.unwrap().state == OperationState::Succeeded as i32
                }
                Err(_) => false,
            };
            let destroy = request_operation(
                &operator,
                operation_spec::Spec::DestroyVersion(VersionRef { name: "keys/root/versions/1".into() }),
            )
            .await
            .unwrap();
            service.approve("alice", &destroy).await.unwrap();
            let two = service.approve("bob", &destroy).await.unwrap();
            assert!(
                two.state != OperationState::Succeeded as i32,
                "alice and bob approved destroying a version of root, whose destruction the administrative 3 of 3 governs (their DESTROY_VERSION policy set: {took}; the destruction needed {})",
                destroy.required
            );
            let refused = asked.unwrap_err();
            assert_eq!(reason(&refused), "BAD_POLICY", "{refused:?}");
            assert!(refused.message().contains("administrative quorum's"), "{}", refused.message());
            assert_eq!(destroy.required, 3);
        });
    }
);
