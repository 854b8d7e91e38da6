//! An officer id taken over by someone else.
//!
//! D6: a departed officer's approval counted for whoever is enrolled under
//! their id next. The administrative quorum is 2 of alice, bob and carol.
//! The operator asks to enroll erin, and carol approves. Then carol is
//! removed, and the id `carol` is enrolled again for another person
//! (`carol2`, with a key of their own). alice approves the enrollment:
//! with carol's old approval, that would be two. Safe: a vote counts only
//! while its officer is enrolled with the key that signed it
//! (`DualControlStore::vote_stands`): the operation stays pending until
//! bob approves.
//!
//! D7: a newcomer takes a departed officer's place in a key policy. The
//! officers are alice, bob, carol, dave and erin, the administrative quorum
//! 2; `root`'s SIGN policy is 3 of alice, bob, carol and dave. alice and
//! bob collude with erin, whom the policy does not name: they remove carol
//! (the policy can still be met), then erin, then enroll erin's
//! certificate with a new key under the id `carol`, and alice, bob and
//! "carol" approve a signature. Safe: an id a key policy names is not
//! given to a new officer (`execute::enrollment_takes_no_policy_place`,
//! `BAD_OFFICER` when asked and when run), so only two of the policy's
//! own officers ever approve, and nothing is signed. The same holds while a
//! restore whose bundle names the id is open: the restored key would
//! otherwise come back usable with the newcomer in the departed officer's
//! place.

use custody_core::dual_control::approval_message;
use custody_core::dual_control::officer_key::OfficerKey;
use custody_core::identity::Role;
use custody_proto::v1::operation_service_client::OperationServiceClient;
use custody_proto::v1::{Algorithm, CeremonyState, KeyVersionState};
use custody_proto::v1::{
    Digest, OfficerSpec, OperationState, SetPolicySpec, SignSpec, VoteRequest, digest,
    operation_spec,
};
use sha2::Digest as _;
use softhsm_tests::ceremony::kek_script;
use softhsm_tests::service::{TestService, create_key, request_operation, runtime};
use softhsm_tests::token_test;

use crate::common::{
    approved_by_alice_and_bob, back_up_a_source_with, get_key, officers_of, open_restore,
    recovery_daemon, requested_and_approved, state, submit_shares,
};

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
    let spec = operation_spec::Spec::AddOfficer(OfficerSpec {
        officer_id: officer_id.into(),
        principal: principal.into(),
        public_key: key.public_key().to_vec(),
    });
    requested_and_approved(service, spec).await;
}

token_test!(
    fn a_removed_officer_s_approval_does_not_count_for_the_next_one_enrolled_under_their_id(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            let erin = new_key("erin");
            let asked = request_operation(
                &operator,
                operation_spec::Spec::AddOfficer(OfficerSpec {
                    officer_id: "erin".into(),
                    principal: "erin".into(),
                    public_key: erin.public_key().to_vec(),
                }),
            )
            .await
            .unwrap();
            let one = service.approve("carol", &asked).await.unwrap();
            assert_eq!(one.state, OperationState::Pending as i32);

            // carol leaves; her id goes to someone else.
            remove(&service, "carol").await;
            enroll(&service, "carol", "carol2", &new_key("carol")).await;

            let two = service.approve("alice", &asked).await.unwrap();
            assert_eq!(
                two.state,
                OperationState::Pending as i32,
                "alice's approval completed a 2-of-3 quorum with the departed carol's: {}",
                two.error
            );
            // Control: a second officer enrolled now completes it.
            let done = service.approve("bob", &asked).await.unwrap();
            assert_eq!(done.state, OperationState::Succeeded as i32, "{}", done.error);
        });
    }
);

/// Whether `key_id` signs a digest the CA asks for once alice and bob have
/// approved and erin, enrolled under `officer_id` with `key`, has voted as
/// that officer (false if the signature cannot even be asked for).
async fn signed_by_alice_bob_and(
    service: &TestService,
    key_id: &str,
    officer_id: &str,
    key: &OfficerKey,
) -> bool {
    let sign = request_operation(
        &service.client("ca-issuing").await,
        operation_spec::Spec::Sign(SignSpec {
            name: format!("keys/{key_id}"),
            digest: Some(Digest {
                digest: Some(digest::Digest::Sha256(
                    sha2::Sha256::digest(b"a certificate").to_vec(),
                )),
            }),
            encoding: 0,
        }),
    )
    .await;
    let Ok(sign) = sign else {
        return false;
    };
    service.approve("alice", &sign).await.unwrap();
    service.approve("bob", &sign).await.unwrap();
    let vote = VoteRequest {
        name: sign.name.clone(),
        officer_id: officer_id.into(),
        signature: key
            .sign(&approval_message(&sign.digest.clone().try_into().unwrap()))
            .to_vec(),
    };
    let third = OperationServiceClient::new(service.client_as("erin", &[Role::Officer]).await)
        .approve_operation(vote)
        .await;
    third.is_ok_and(|o| o.get_ref().signature.is_some())
}

/// Removes `officer_id`, approved by alice and bob.
async fn remove(service: &TestService, officer_id: &str) {
    let removal = request_operation(
        &service.client("operator").await,
        operation_spec::Spec::RemoveOfficer(OfficerSpec {
            officer_id: officer_id.into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    approved_by_alice_and_bob(service, &removal).await;
}

/// `root`, made by the operator, and dave and erin enrolled beside alice,
/// bob and carol; the operator's channel.
async fn root_and_five_officers(service: &TestService) -> tonic::transport::Channel {
    let operator = service.client("operator").await;
    create_key(&operator, "root", "EC_SIGN_P256_SHA256", None).await;
    enroll(service, "dave", "dave", &new_key("dave")).await;
    enroll(service, "erin", "erin", &new_key("erin")).await;
    operator
}

/// The SET_POLICY operation putting `kind` of `root` under `required` of
/// `officers`.
fn root_policy(
    kind: custody_proto::v1::OperationKind,
    officers: &[&str],
    required: u32,
) -> operation_spec::Spec {
    operation_spec::Spec::SetPolicy(SetPolicySpec {
        name: "keys/root".into(),
        operation: kind as i32,
        officers: officers.iter().map(|o| o.to_string()).collect(),
        required,
    })
}

token_test!(
    fn a_newcomer_does_not_take_a_departed_officer_s_place_in_a_key_policy(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = root_and_five_officers(&service).await;
            let policy = request_operation(
                &operator,
                root_policy(custody_proto::v1::OperationKind::Sign, &["alice", "bob", "carol", "dave"], 3),
            )
            .await
            .unwrap();
            approved_by_alice_and_bob(&service, &policy).await;

            // The attack: carol and erin removed, erin's certificate
            // enrolled again as `carol` with a new key.
            remove(&service, "carol").await;
            remove(&service, "erin").await;
            let erin_as_carol = new_key("carol");
            let takeover = request_operation(
                &operator,
                operation_spec::Spec::AddOfficer(OfficerSpec {
                    officer_id: "carol".into(),
                    principal: "erin".into(),
                    public_key: erin_as_carol.public_key().to_vec(),
                }),
            )
            .await;
            let took_over = match &takeover {
                Ok(asked) => {
                    service.approve("alice", asked).await.unwrap();
                    service.approve("bob", asked).await.unwrap().state
                        == OperationState::Succeeded as i32
                }
                Err(_) => false,
            };
            let signed = signed_by_alice_bob_and(&service, "root", "carol", &erin_as_carol).await;
            assert!(
                !signed,
                "alice, bob and erin (enrolled as carol: {took_over}) signed with root, whose SIGN policy is 3 of alice, bob, carol and dave"
            );
            // Where it stopped: the enrollment, refused when asked.
            let refused = takeover.unwrap_err();
            assert_eq!(softhsm_tests::service::reason(&refused), "BAD_OFFICER", "{refused:?}");
            assert!(
                refused.message().contains("keys/root's SIGN policy names carol"),
                "{}",
                refused.message()
            );
        });
    }
);

token_test!(
    fn an_id_given_to_someone_else_while_a_policy_naming_it_waits_does_not_enter_the_policy(token) {
        runtime().block_on(async {
            // D7, the same takeover while the policy naming carol waits for
            // its second approval: no policy names carol yet when erin's
            // certificate is enrolled under her id.
            let service = TestService::start(token).await;
            let operator = root_and_five_officers(&service).await;
            // root's policies are changed by alice and bob, so changes to
            // the officer set do not touch the waiting operation's quorum.
            let changes = request_operation(
                &operator,
                root_policy(custody_proto::v1::OperationKind::SetPolicy, &["alice", "bob"], 2),
            )
            .await
            .unwrap();
            approved_by_alice_and_bob(&service, &changes).await;
            let policy = request_operation(
                &operator,
                root_policy(custody_proto::v1::OperationKind::Sign, &["alice", "bob", "carol", "dave"], 3),
            )
            .await
            .unwrap();
            service.approve("alice", &policy).await.unwrap();
            remove(&service, "carol").await;
            remove(&service, "erin").await;
            let takeover = request_operation(
                &operator,
                operation_spec::Spec::AddOfficer(OfficerSpec {
                    officer_id: "carol".into(),
                    principal: "erin".into(),
                    public_key: new_key("carol").public_key().to_vec(),
                }),
            )
            .await;
            if let Ok(asked) = &takeover {
                approved_by_alice_and_bob(&service, asked).await;
            }
            let done = service.approve("bob", &policy).await.unwrap();
            assert!(
                done.state != OperationState::Succeeded as i32 || takeover.is_err(),
                "the policy was set naming erin as carol"
            );
            let refused = takeover.unwrap_err();
            assert_eq!(softhsm_tests::service::reason(&refused), "BAD_OFFICER", "{refused:?}");
            assert!(refused.message().contains("puts carol in a policy"), "{}", refused.message());
            // Named officer gone since it was asked: the policy does not run.
            assert_eq!(done.state, OperationState::Failed as i32, "{}", done.error);
            assert!(done.error.contains("POLICY_CHANGED"), "{}", done.error);
        });
    }
);

token_test!(
    fn an_id_a_restore_in_progress_names_is_not_given_to_someone_else(token) {
        runtime().block_on(async {
            // D7 across a restore. At the source, `root` signs under 3 of
            // alice, bob, carol and dave, and is backed up under a KEK
            // split 3 of alice, bob and carol (I1: they cover that). The
            // fresh daemon enrolls alice, bob and carol only, so `root`
            // would come back SUSPENDED for naming dave. While the restore
            // waits for carol's share, alice and bob enroll erin's
            // certificate as `dave`; carol hands in her share.
            let backup = root_naming_dave_backed_up(token, false).await;
            let dr = recovery_daemon(token).await;
            let officers = officers_of(&dr).await;
            let name = open_restore(&officers, "restore-1", &backup.bundle).await.unwrap();
            submit_shares(&officers, &name, &backup.shares).await.unwrap();
            let erin_as_dave = new_key("dave");
            let takeover = request_operation(
                &dr.client("operator").await,
                operation_spec::Spec::AddOfficer(OfficerSpec {
                    officer_id: "dave".into(),
                    principal: "erin".into(),
                    public_key: erin_as_dave.public_key().to_vec(),
                }),
            )
            .await;
            let took_over = match &takeover {
                Ok(asked) => {
                    dr.approve("alice", asked).await.unwrap();
                    dr.approve("bob", asked).await.unwrap().state == OperationState::Succeeded as i32
                }
                Err(_) => false,
            };
            let done = officers.submit_share("carol", &name, &backup.shares["carol"]).await.unwrap();
            assert_eq!(state(&done), CeremonyState::Completed, "{}", done.error);

            let signed = signed_by_alice_bob_and(&dr, "root", "dave", &erin_as_dave).await;
            assert!(
                !signed,
                "alice, bob and erin (enrolled as dave during the restore: {took_over}) signed with the restored root, whose SIGN policy is 3 of alice, bob, carol and dave"
            );
            // Where it stopped: the enrollment, refused when asked; and
            // root came back SUSPENDED, naming an officer not enrolled.
            let refused = takeover.unwrap_err();
            assert_eq!(softhsm_tests::service::reason(&refused), "BAD_OFFICER", "{refused:?}");
            assert!(refused.message().contains(&name), "{}", refused.message());
            let root = get_key(&dr.client("operator").await, "root").await.unwrap();
            assert!(
                root.versions.iter().all(|v| v.state() == KeyVersionState::Suspended),
                "{root:?}"
            );
        });
    }
);

/// A source daemon's backup of `root`, which signs under 3 of alice, bob,
/// carol and dave, under a backup KEK split 3 of alice, bob and carol (I1:
/// they cover that); dave removed before the backup if `dave_leaves`.
async fn root_naming_dave_backed_up(
    token: &softhsm_tests::TestToken,
    dave_leaves: bool,
) -> crate::common::Backup {
    let kek = kek_script("kek-1", "envelope-kek", false).replace("threshold = 2", "threshold = 3");
    back_up_a_source_with(token, &kek, async |source: &TestService| {
        let operator = source.client("operator").await;
        crate::common::create_key(&operator, "root", Algorithm::EcSignP256Sha256, true)
            .await
            .unwrap();
        enroll(source, "dave", "dave", &new_key("dave")).await;
        let policy = request_operation(
            &operator,
            root_policy(
                custody_proto::v1::OperationKind::Sign,
                &["alice", "bob", "carol", "dave"],
                3,
            ),
        )
        .await
        .unwrap();
        approved_by_alice_and_bob(source, &policy).await;
        if dave_leaves {
            remove(source, "dave").await;
        }
    })
    .await
}

token_test!(
    fn an_id_given_to_someone_else_before_a_restore_does_not_enter_the_restored_policy(token) {
        // D7 before a restore. As above, but alice and bob enroll erin's
        // certificate as `dave` on the fresh daemon before the restore
        // opens, when nothing there names dave yet.
        before_a_restore(token, false, "\"erin\"");
    }
);

token_test!(
    fn the_id_of_an_officer_gone_at_the_source_does_not_enter_the_restored_policy(token) {
        // The same, with dave removed at the source before the backup
        // (the policy can still be met), so the bundle records no
        // principal held that id there.
        before_a_restore(token, true, "not enrolled at the source");
    }
);

/// The attack before a restore; `refusal` is in the restore's refusal.
fn before_a_restore(token: &softhsm_tests::TestToken, dave_leaves: bool, refusal: &str) {
    runtime().block_on(async {
            let backup = root_naming_dave_backed_up(token, dave_leaves).await;
            let dr = recovery_daemon(token).await;
            let erin_as_dave = new_key("dave");
            enroll(&dr, "dave", "erin", &erin_as_dave).await;
            let officers = officers_of(&dr).await;
            let opened = open_restore(&officers, "restore-1", &backup.bundle).await;
            let restored = match &opened {
                Ok(name) => {
                    submit_shares(&officers, name, &backup.shares).await.unwrap();
                    let done = officers.submit_share("carol", name, &backup.shares["carol"]).await.unwrap();
                    format!("{:?} {}", state(&done), done.error)
                }
                Err(refused) => format!("not opened: {refused:?}"),
            };
            let signed = signed_by_alice_bob_and(&dr, "root", "dave", &erin_as_dave).await;
            assert!(
                !signed,
                "alice, bob and erin (enrolled as dave before the restore) signed with the restored root, whose SIGN policy is 3 of alice, bob, carol and dave; the restore: {restored}"
            );
            // Where it stopped: the restore, refused when it opened, naming
            // a key whose policies name dave (root's SIGN, or a kind the
            // bundle carries under the source's administrative quorum,
            // which dave was part of).
            let refused = opened.unwrap_err();
            assert_eq!(softhsm_tests::service::reason(&refused), "BAD_OFFICER", "{refused:?}");
            assert!(
                refused.message().contains("policies name dave") && refused.message().contains(refusal),
                "{}",
                refused.message()
            );
        });
}
