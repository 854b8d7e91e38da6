//! A departed officer's approval counted for whoever is enrolled under
//! their id next (threat model D6).
//!
//! The administrative quorum is 2; the officers are alice, bob, carol and
//! dave (enrolled first), and `root`'s SIGN policy is 3 of the four.
//! ca-issuing asks for a signature and carol approves. Then carol is
//! removed, and the id `carol` is enrolled again for another person
//! (`carol2`, with a key of their own). alice and bob approve the
//! signature: with carol's old approval, that would be three.
//!
//! Safe: no signature from two approvals. A vote counts only while its
//! officer is enrolled with the key that signed it
//! (`DualControlStore::vote_stands`), so the old carol's approval does not
//! pass to the new one: the operation stays pending, and is signed once
//! dave approves.

use custody_core::dual_control::approval_message;
use custody_core::dual_control::officer_key::OfficerKey;
use custody_core::identity::Role;
use custody_proto::v1::operation_service_client::OperationServiceClient;
use custody_proto::v1::{
    Digest, OfficerSpec, Operation, OperationState, SetPolicySpec, SignSpec, VoteRequest, digest,
    operation_spec,
};
use sha2::Digest as _;
use softhsm_tests::service::{TestService, create_key, request_operation, runtime};
use softhsm_tests::token_test;

/// A new officer key for `officer_id`.
fn new_key(officer_id: &str) -> OfficerKey {
    OfficerKey::generate(
        officer_id,
        &hsm_shim::SecretString::from(format!("a passphrase for {officer_id}")),
    )
    .unwrap()
    .0
}

/// Enrolls `officer_id` for `principal` with `key`, approved by alice and bob.
async fn enroll(service: &TestService, officer_id: &str, principal: &str, key: &OfficerKey) {
    let asked = request_operation(
        &service.client("operator").await,
        operation_spec::Spec::AddOfficer(OfficerSpec {
            officer_id: officer_id.into(),
            principal: principal.into(),
            public_key: key.public_key().to_vec(),
        }),
    )
    .await
    .unwrap();
    approved_by_alice_and_bob(service, &asked).await;
}

async fn approved_by_alice_and_bob(service: &TestService, operation: &Operation) {
    service.approve("alice", operation).await.unwrap();
    let done = service.approve("bob", operation).await.unwrap();
    assert_eq!(
        done.state,
        OperationState::Succeeded as i32,
        "{}",
        done.error
    );
}

token_test!(
    fn a_removed_officer_s_approval_does_not_count_for_the_next_one_enrolled_under_their_id(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            create_key(&operator, "root", "EC_SIGN_P256_SHA256", None).await;
            let dave = new_key("dave");
            enroll(&service, "dave", "dave", &dave).await;
            let policy = request_operation(
                &operator,
                operation_spec::Spec::SetPolicy(SetPolicySpec {
                    name: "keys/root".into(),
                    operation: custody_proto::v1::OperationKind::Sign as i32,
                    officers: ["alice", "bob", "carol", "dave"].map(String::from).to_vec(),
                    required: 3,
                }),
            )
            .await
            .unwrap();
            approved_by_alice_and_bob(&service, &policy).await;

            let sign = request_operation(
                &service.client("ca-issuing").await,
                operation_spec::Spec::Sign(SignSpec {
                    name: "keys/root".into(),
                    digest: Some(Digest {
                        digest: Some(digest::Digest::Sha256(
                            sha2::Sha256::digest(b"a certificate").to_vec(),
                        )),
                    }),
                    encoding: 0,
                }),
            )
            .await
            .unwrap();
            let one = service.approve("carol", &sign).await.unwrap();
            assert_eq!(one.state, OperationState::Pending as i32);

            // carol leaves; her id goes to someone else.
            let removal = request_operation(
                &operator,
                operation_spec::Spec::RemoveOfficer(OfficerSpec {
                    officer_id: "carol".into(),
                    ..Default::default()
                }),
            )
            .await
            .unwrap();
            approved_by_alice_and_bob(&service, &removal).await;
            enroll(&service, "carol", "carol2", &new_key("carol")).await;

            service.approve("alice", &sign).await.unwrap();
            let two = service.approve("bob", &sign).await.unwrap();
            assert!(
                two.signature.is_none() && two.state == OperationState::Pending as i32,
                "alice's and bob's approvals signed with root (SIGN 3 of 4), the departed carol's counted for the new one: {:?}, {}",
                OperationState::try_from(two.state),
                two.error
            );

            // Control: a third officer enrolled now completes it.
            let vote = VoteRequest {
                name: sign.name.clone(),
                officer_id: "dave".into(),
                signature: dave
                    .sign(&approval_message(&sign.digest.clone().try_into().unwrap()))
                    .to_vec(),
            };
            let three = OperationServiceClient::new(service.client_as("dave", &[Role::Officer]).await)
                .approve_operation(vote)
                .await
                .unwrap()
                .into_inner();
            assert_eq!(three.state, OperationState::Succeeded as i32, "{}", three.error);
            assert!(three.signature.is_some());
        });
    }
);
