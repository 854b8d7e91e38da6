//! I5, ceremony-made keys carry a quorum, and I6, components are distinct
//! (issue 12, scenarios 5 and 6).

use custody_core::ceremony::components::kcv;
use custody_proto::v1::{CeremonyState, KeyVersionState};
use softhsm_tests::ceremony::{components_script, kek_script, root_script};
use softhsm_tests::service::{TestService, reason, runtime};
use softhsm_tests::token_test;

use crate::common::{
    PAYLOAD, admin_required, get_key, officers_of, rotate, set_state, sign, state,
    unless_quorum_required,
};

// The root and the KEK come from ordinary ceremonies, 2 of 3 with the
// administrative quorum 2 of 3; afterwards one principal at a time tries
// what only the quorum should do. Safe: each key names the administrative
// quorum on SIGN, ROTATE, SET_STATE and SET_POLICY (the default the fix
// gives keys of root-key and KEK scripts, which may declare a stricter
// one), and every one of those direct calls is refused QUORUM_REQUIRED.
token_test!(
    fn i5_keys_made_in_ceremonies_are_under_the_administrative_quorum(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let m = admin_required(&service).await;
            let officers = officers_of(&service).await;
            let keys = ["root-ca", "envelope-kek"];
            for script in [root_script("root-1", keys[0], false), kek_script("kek-1", keys[1], false)] {
                let (done, _) = officers.run(&script).await.unwrap();
                assert_eq!(state(&done), CeremonyState::Completed, "{}", done.error);
            }
            let operator = service.client("operator").await;
            let signer = service.client("ca-issuing").await;

            let mut harm = Vec::new();
            for key_id in keys {
                let key = get_key(&operator, key_id).await.unwrap();
                for kind in ["SIGN", "ROTATE", "SET_STATE", "SET_POLICY"] {
                    match key.policies.iter().find(|p| p.operation == kind) {
                        Some(policy) if policy.required >= m => {}
                        Some(policy) => harm.push(format!(
                            "keys/{key_id}: {kind} needs {} officers, fewer than the administrative {m}",
                            policy.required
                        )),
                        None => harm.push(format!("keys/{key_id}: no {kind} policy")),
                    }
                }
            }
            harm.extend(unless_quorum_required(
                "ca-issuing's Sign with root-ca",
                sign(&signer, "root-ca", PAYLOAD).await,
            ));
            for key_id in keys {
                harm.extend(unless_quorum_required(
                    &format!("the operator's rotation of {key_id}"),
                    rotate(&operator, key_id).await,
                ));
                harm.extend(unless_quorum_required(
                    &format!("the operator marking {key_id} version 1 COMPROMISED"),
                    set_state(
                        &operator,
                        &format!("keys/{key_id}/versions/1"),
                        KeyVersionState::Compromised,
                        "no reason at all",
                    )
                    .await,
                ));
            }
            assert!(harm.is_empty(), "keys made in ceremonies have no quorum:\n{}", harm.join("\n"));
        });
    }
);

// A KEK from three components: bob enters the very component alice
// entered. XOR cancels the two, and the KEK is carol's component alone.
// Safe: bob's is refused DUPLICATE_COMPONENT (its KCV equals an earlier
// one's) and nothing of it is kept; bob enters another component and the
// KEK is the combination of all three. A component equal to all before it
// combined is refused too.
token_test!(
    fn i6_a_component_equal_to_an_earlier_one_is_refused(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = officers_of(&service).await;
            let script = components_script("kek-parts", "partner-kek");
            let name = officers.start("alice", &script, "").await.unwrap().name;
            officers.sign_in("alice", &name, &script).await.unwrap();
            let waiting = officers.sign_in("bob", &name, &script).await.unwrap();
            assert_eq!(state(&waiting), CeremonyState::AwaitingComponents);

            let theirs = [0x42u8; 32];
            let carols = [0x17u8; 32];
            let enter = |officer: &'static str, part: [u8; 32]| {
                let officers = &officers;
                let name = &name;
                async move {
                    officers
                        .submit_component(officer, name, &hex::encode(part), &hex::encode(kcv(&part)))
                        .await
                }
            };
            enter("alice", theirs).await.unwrap();
            let again = enter("bob", theirs).await;
            let consequence = match &again {
                Ok(_) => {
                    let made = enter("carol", carols).await.unwrap();
                    let fingerprint = made.fingerprint.map(|f| f.value).unwrap_or_default();
                    format!(
                        "bob's component, equal to alice's, was accepted; with carol's, the KEK's check value is {} ({} carol's component alone, {})",
                        hex::encode(&fingerprint),
                        if fingerprint == kcv(&carols) { "that of" } else { "not that of" },
                        hex::encode(kcv(&carols))
                    )
                }
                Err(e) => reason(e),
            };
            assert!(again.is_err(), "{consequence}");
            assert_eq!(consequence, "DUPLICATE_COMPONENT");

            // The refusal kept nothing: bob is not "already submitted", and
            // the KEK is made of alice's, bob's second and carol's.
            let bobs = [0x5au8; 32];
            enter("bob", bobs).await.unwrap();
            // Carol's component equal to the two before it combined would
            // cancel all three, leaving a zero KEK: refused the same way.
            let mut both = theirs;
            for (b, p) in both.iter_mut().zip(bobs) {
                *b ^= p;
            }
            let cancelling = enter("carol", both).await;
            assert_eq!(cancelling.as_ref().map_err(reason).err().as_deref(), Some("DUPLICATE_COMPONENT"));
            let made = enter("carol", carols).await.unwrap();
            let fingerprint = made.fingerprint.map(|f| f.value).unwrap_or_default();
            let mut key = [0u8; 32];
            for part in [theirs, bobs, carols] {
                for (k, p) in key.iter_mut().zip(part) {
                    *k ^= p;
                }
            }
            assert_eq!(hex::encode(&fingerprint), hex::encode(kcv(&key)), "{}", made.error);
        });
    }
);

// A root ceremony is open: its key will be registered under the
// administrative quorum as it stood at the opening (alice, bob, carol, 2 of
// 3). The operator has carol removed, asked before the ceremony opened and
// approved by the other two after, or asked while it is open. Safe: the
// removal is refused while the ceremony is open, so the key never comes out
// under a policy naming a non-officer (an id someone else could later be
// enrolled under).
token_test!(
    fn i5_an_officer_an_open_ceremonys_key_policy_names_cannot_be_removed(token) {
        use custody_proto::v1::{OfficerSpec, OperationState, operation_spec};
        use softhsm_tests::service::request_operation;
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = officers_of(&service).await;
            let operator = service.client("operator").await;
            let remove_carol = || {
                operation_spec::Spec::RemoveOfficer(OfficerSpec { officer_id: "carol".into(), ..Default::default() })
            };
            let asked_before = request_operation(&operator, remove_carol()).await.unwrap();
            let script = root_script("root-1", "root-ca", false);
            let opened = officers.start("alice", &script, "").await.unwrap();

            officers.approve("alice", &asked_before).await.unwrap();
            let done = officers.approve("bob", &asked_before).await.unwrap();
            assert_eq!(done.state, OperationState::Failed as i32, "carol was removed while {} was open: {:?}", opened.name, done);
            assert!(done.error.contains(&opened.name), "{}", done.error);
            let asked_during = request_operation(&operator, remove_carol()).await.unwrap_err();
            assert_eq!(reason(&asked_during), "OFFICER_REMOVAL_REFUSED", "{asked_during:?}");

            // Aborted, the ceremony names no one any more: the removal goes through.
            officers
                .client("alice")
                .abort_ceremony(custody_proto::v1::AbortCeremonyRequest {
                    name: opened.name.clone(),
                    reason: "not today".into(),
                })
                .await
                .unwrap();
            let again = request_operation(&operator, remove_carol()).await.unwrap();
            officers.approve("alice", &again).await.unwrap();
            let removed = officers.approve("bob", &again).await.unwrap();
            assert_eq!(removed.state, OperationState::Succeeded as i32, "{}", removed.error);
        });
    }
);
