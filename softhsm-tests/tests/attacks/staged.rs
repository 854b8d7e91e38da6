//! A staged version travels through a backup (threat model C12, C13).
//!
//! At the source, `issuing-ca` needs all 3 officers to rotate (its ROTATE
//! policy); it has no SET_STATE policy, so an operator alone changes a
//! version's state. The 3 officers stage its next version (v2, certified
//! under the root, pre-activation). Then the operator alone marks v1
//! compromised: the ROTATE policy stops the automatic rotation, so v1 stays
//! primary and v2 stays staged; promoting v2 still needs the 3 (refused
//! directly, `QUORUM_REQUIRED`). A backup leaves compromised versions out,
//! so the bundle carries v2 only, with the manifest naming v1 primary.
//!
//! Safe: on the daemon it is restored into, v2 is not made usable, and
//! certainly not primary, by the operator alone. The restore takes the
//! newest version as primary when the manifest's primary is not in the
//! bundle, so v2 comes back pre-activation *and primary*: activating it is
//! no longer a promotion (`authz::is_promotion` wants a version newer than
//! the primary), needs only the (absent) SET_STATE policy, and the operator
//! alone makes it the signing version, where the source needed 3 officers.
//!
//! A key whose policies name an officer the fresh daemon does not enroll
//! comes back with its usable versions SUSPENDED (threat model I3); a
//! suspended version is brought back by SET_STATE alone. Safe: a staged
//! version stays pre-activation, so promoting it still needs ROTATE's
//! quorum as well (C13).

use custody_proto::v1::signing_service_client::SigningServiceClient;
use custody_proto::v1::{
    Algorithm, CeremonyState, KeyVersionState, Operation, OperationKind, OperationState,
    SignRequest, digest, operation_spec, sign_request,
};
use sha2::Digest as _;
use softhsm_tests::ceremony::root_script;
use softhsm_tests::service::{TestService, reason, request_operation, runtime};
use softhsm_tests::token_test;

use crate::common::{
    approved_by_alice_and_bob, back_up_a_source, create_key, get_key, officers_of, restored_whole,
    set_state, state,
};

/// The source: a root, `issuing-ca` (backup-exportable) with ROTATE 3 of 3
/// and a staged, certified v2, and v1 marked compromised by the operator.
async fn staged_issuer_with_compromised_primary(source: &TestService) {
    let officers = officers_of(source).await;
    staged_issuer(source, &officers).await;
    let operator = source.client("operator").await;

    // v1 compromised by the operator alone: no rotation (ROTATE is gated).
    set_state(
        &operator,
        "keys/issuing-ca/versions/1",
        KeyVersionState::Compromised,
        "suspected leak",
    )
    .await
    .unwrap();
    let key = get_key(&operator, "issuing-ca").await.unwrap();
    assert_eq!(key.primary_version, 1);
    assert_eq!(key.versions[1].state, KeyVersionState::PreActivation as i32);
    // At the source, promoting v2 needs the 3 of ROTATE.
    let direct = set_state(
        &operator,
        "keys/issuing-ca/versions/2",
        KeyVersionState::Active,
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(reason(&direct), "QUORUM_REQUIRED", "{direct:?}");
}

token_test!(
    fn a_staged_version_restored_without_its_primary_is_not_promoted_by_the_operator_alone(token) {
        runtime().block_on(async {
            let backup = back_up_a_source(token, staged_issuer_with_compromised_primary).await;
            let dr = restored_whole(token, &backup).await;

            let operator = dr.client("operator").await;
            let restored = get_key(&operator, "issuing-ca").await.unwrap();
            let versions: Vec<_> = restored.versions.iter().map(|v| (v.version, v.state)).collect();
            assert_eq!(versions, vec![(2, KeyVersionState::PreActivation as i32)]);
            let activated = set_state(
                &operator,
                "keys/issuing-ca/versions/2",
                KeyVersionState::Active,
                "",
            )
            .await;
            let signed = SigningServiceClient::new(dr.client("ca-issuing").await)
                .sign(SignRequest {
                    name: "keys/issuing-ca".into(),
                    input: Some(sign_request::Input::Digest(custody_proto::v1::Digest {
                        digest: Some(digest::Digest::Sha256(sha2::Sha256::digest(b"x").to_vec())),
                    })),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().name);
            assert!(
                matches!(&activated, Err(status) if reason(status) == "QUORUM_REQUIRED"),
                "the operator alone activated the staged v2 on the restored key (primary {}): {activated:?}; Sign by the key's name then answers {signed:?}",
                restored.primary_version
            );
        });
    }
);

token_test!(
    fn a_staged_version_passed_by_a_rotation_is_not_activated_by_fewer_officers_than_promotion_needs(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = officers_of(&service).await;
            staged_issuer(&service, &officers).await;
            service.gate("issuing-ca", OperationKind::SetState).await;
            let operator = service.client("operator").await;
            // The full quorum rotates past the staged v2: v3 is primary.
            let rotation = request_operation(
                &operator,
                operation_spec::Spec::Rotate(custody_proto::v1::KeyRef {
                    name: "keys/issuing-ca".into(),
                }),
            )
            .await
            .unwrap();
            let mut rotated = None;
            for officer in ["alice", "bob", "carol"] {
                rotated = Some(service.approve(officer, &rotation).await.unwrap());
            }
            let rotated = rotated.unwrap();
            assert_eq!(rotated.state, OperationState::Succeeded as i32, "{}", rotated.error);
            let key = get_key(&operator, "issuing-ca").await.unwrap();
            assert_eq!(key.primary_version, 3);
            assert_eq!(key.versions[1].state, KeyVersionState::PreActivation as i32);
            assert!(!key.versions[1].certificate_chain_pem.is_empty());

            let (activate, two) = alice_and_bob_activate_v2(&service).await;
            let signed = SigningServiceClient::new(service.client("ca-issuing").await)
                .sign(SignRequest {
                    name: "keys/issuing-ca/versions/2".into(),
                    input: Some(sign_request::Input::Digest(custody_proto::v1::Digest {
                        digest: Some(digest::Digest::Sha256(sha2::Sha256::digest(b"x").to_vec())),
                    })),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().name);
            assert!(
                activate.required >= 3 && two.state != OperationState::Succeeded as i32,
                "2 officers activated the certified staged v2 (operation needed {}, state {}); Sign naming it answers {signed:?}",
                activate.required,
                two.state
            );
        });
    }
);

token_test!(
    fn a_staged_version_of_a_key_restored_suspended_is_not_activated_by_fewer_officers_than_promotion_needs(
        token
    ) {
        runtime().block_on(async {
            // At the source, `issuing-ca` has v1 active and a staged v2,
            // ROTATE 3 and SET_STATE 2 of alice, bob and carol, and an
            // UPDATE_KEY policy naming dave, whom the fresh daemon does not
            // enroll: the key comes back with its usable versions
            // SUSPENDED. Bringing a suspended version back takes SET_STATE
            // alone; the staged v2 must still need ROTATE's 3 as well.
            let backup = back_up_a_source(token, async |source: &TestService| {
                let officers = officers_of(source).await;
                staged_issuer(source, &officers).await;
                source.gate("issuing-ca", OperationKind::SetState).await;
                let operator = source.client("operator").await;
                let dave = custody_core::dual_control::officer_key::OfficerKey::generate(
                    "dave",
                    &hsm_shim::SecretString::from("dave's passphrase".to_string()),
                )
                .unwrap()
                .0;
                for spec in [
                    operation_spec::Spec::AddOfficer(custody_proto::v1::OfficerSpec {
                        officer_id: "dave".into(),
                        principal: "dave".into(),
                        public_key: dave.public_key().to_vec(),
                    }),
                    operation_spec::Spec::SetPolicy(custody_proto::v1::SetPolicySpec {
                        name: "keys/issuing-ca".into(),
                        operation: OperationKind::UpdateKey as i32,
                        officers: vec!["alice".into(), "bob".into(), "dave".into()],
                        required: 2,
                    }),
                ] {
                    let asked = request_operation(&operator, spec).await.unwrap();
                    approved_by_alice_and_bob(source, &asked).await;
                }
            })
            .await;
            let dr = restored_whole(token, &backup).await;
            let operator = dr.client("operator").await;
            let restored = get_key(&operator, "issuing-ca").await.unwrap();

            let (activate, two) = alice_and_bob_activate_v2(&dr).await;
            assert!(
                activate.required >= 3 && two.state != OperationState::Succeeded as i32,
                "2 officers activated the staged v2 of the restored key (versions {:?}; operation needed {}, state {})",
                restored.versions.iter().map(|v| (v.version, v.state())).collect::<Vec<_>>(),
                activate.required,
                two.state
            );
            // v1, active at the source, came back SUSPENDED; v2 staged.
            let states: Vec<_> = restored.versions.iter().map(|v| (v.version, v.state())).collect();
            assert_eq!(
                states,
                [(1, KeyVersionState::Suspended), (2, KeyVersionState::PreActivation)]
            );
        });
    }
);

/// Two officers (SET_STATE's 2 of 3) ask to activate `issuing-ca`'s v2:
/// the operator's request, and the operation after alice's and bob's
/// approvals.
async fn alice_and_bob_activate_v2(service: &TestService) -> (Operation, Operation) {
    let activate = request_operation(
        &service.client("operator").await,
        operation_spec::Spec::SetState(custody_proto::v1::SetStateSpec {
            name: "keys/issuing-ca/versions/2".into(),
            state: KeyVersionState::Active as i32,
            reason: String::new(),
        }),
    )
    .await
    .unwrap();
    service.approve("alice", &activate).await.unwrap();
    let two = service.approve("bob", &activate).await.unwrap();
    (activate, two)
}

/// A root, `issuing-ca` with ROTATE 3 of 3 and a staged, certified v2.
async fn staged_issuer(service: &TestService, officers: &softhsm_tests::ceremony::Officers<'_>) {
    let root = root_script("c-root", "root-ca", true)
        .replace("validity_days = 30", "validity_days = 3650")
        .replace("EC_SIGN_P256_SHA256", "EC_SIGN_P384_SHA384");
    let (done, _) = officers.run(&root).await.unwrap();
    assert_eq!(state(&done), CeremonyState::Completed, "{}", done.error);
    let operator = service.client("operator").await;
    create_key(&operator, "issuing-ca", Algorithm::EcSignP256Sha256, true)
        .await
        .unwrap();
    service
        .set_policy("issuing-ca", OperationKind::Rotate, 3, ["alice", "bob"])
        .await;
    let staging = include_str!("../../../deploy/ceremonies/intermediate.toml")
        .replace("\"demo-intermediate-2026\"", "\"c-stage\"")
        .replace(
            "key = \"issuing-ca\"\n",
            "key = \"issuing-ca\"\nstage = true\n",
        )
        .replace("required = 2", "required = 3");
    let opened = officers.start("alice", &staging, "").await.unwrap();
    let mut waiting = None;
    for officer in ["alice", "bob", "carol"] {
        waiting = Some(
            officers
                .sign_in(officer, &opened.name, &staging)
                .await
                .unwrap(),
        );
    }
    let fingerprint = waiting.unwrap().fingerprint.unwrap().value;
    let mut done = None;
    for officer in ["alice", "bob", "carol"] {
        done = Some(
            officers
                .confirm(officer, &opened.name, &staging, &fingerprint)
                .await
                .unwrap(),
        );
    }
    let done = done.unwrap();
    assert_eq!(state(&done), CeremonyState::Completed, "{}", done.error);
}
