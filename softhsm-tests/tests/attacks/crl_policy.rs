//! Ceremonies whose root's SIGN policy is tightened while they wait for
//! confirmation (threat model C6, C10): a crl ceremony, and the same for an
//! intermediate ceremony (second test).
//!
//! alice and bob open a 2-of-3 crl ceremony over `root-ca`, which has no
//! SIGN policy, and sign in: the TBS is built. Then the officers put the
//! root's SIGN under 3 of 3 (a fresh 2-of-3 crl ceremony is now refused
//! `BAD_SCRIPT`). alice and bob confirm the waiting ceremony.
//!
//! Safe: the root signs no CRL for the two: the SIGN policy in force when
//! the HSM is asked is what the ceremony's quorum must cover, as an approved
//! operation's quorum is re-checked at execution (`POLICY_CHANGED`).

use custody_proto::v1::{Algorithm, CeremonyState, OperationKind};
use softhsm_tests::ceremony::root_script;
use softhsm_tests::service::{TestService, reason, runtime};
use softhsm_tests::token_test;

use crate::common::{create_key, officers_of, state};

fn crl_script(id: &str) -> String {
    include_str!("../../../deploy/ceremonies/crl.toml")
        .replace("\"demo-crl-2026\"", &format!("\"{id}\""))
}

token_test!(
    fn a_crl_ceremony_waiting_for_confirmation_does_not_sign_after_the_root_s_sign_policy_was_tightened(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = officers_of(&service).await;
            let root = root_script("c-root", "root-ca", true)
                .replace("validity_days = 30", "validity_days = 3650")
                .replace("EC_SIGN_P256_SHA256", "EC_SIGN_P384_SHA384");
            let (done, _) = officers.run(&root).await.unwrap();
            assert_eq!(state(&done), CeremonyState::Completed, "{}", done.error);

            let script = crl_script("c-race");
            let opened = officers.start("alice", &script, "").await.unwrap();
            officers.sign_in("alice", &opened.name, &script).await.unwrap();
            let waiting = officers.sign_in("bob", &opened.name, &script).await.unwrap();
            assert_eq!(state(&waiting), CeremonyState::AwaitingConfirmation, "{}", waiting.error);
            let fingerprint = waiting.fingerprint.unwrap().value;

            service.set_policy("root-ca", OperationKind::Sign, 3, ["bob", "carol"]).await;
            // Control: the same 2-of-3 script opened now is refused.
            let fresh = officers.start("alice", &crl_script("c-fresh"), "").await.unwrap_err();
            assert_eq!(reason(&fresh), "BAD_SCRIPT", "{fresh:?}");

            officers.confirm("alice", &opened.name, &script, &fingerprint).await.unwrap();
            let last = officers.confirm("bob", &opened.name, &script, &fingerprint).await;
            let ceremony = officers.get("alice", &opened.name).await.unwrap();
            assert!(
                ceremony.certificate_pem.is_empty() && state(&ceremony) != CeremonyState::Completed,
                "2 officers got root-ca (SIGN now 3 of 3) to sign a CRL: last confirm {:?}, ceremony {:?}, CRL {} bytes",
                last.as_ref().map(state).map_err(reason),
                state(&ceremony),
                ceremony.certificate_pem.len()
            );
        });
    }
);

token_test!(
    fn an_intermediate_ceremony_waiting_for_confirmation_does_not_certify_after_the_root_s_sign_policy_was_tightened(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = officers_of(&service).await;
            let root = root_script("c-root", "root-ca", true)
                .replace("validity_days = 30", "validity_days = 3650")
                .replace("EC_SIGN_P256_SHA256", "EC_SIGN_P384_SHA384");
            let (done, _) = officers.run(&root).await.unwrap();
            assert_eq!(state(&done), CeremonyState::Completed, "{}", done.error);
            let operator = service.client("operator").await;
            create_key(&operator, "issuing-ca", Algorithm::EcSignP256Sha256, false).await.unwrap();

            let script = include_str!("../../../deploy/ceremonies/intermediate.toml")
                .replace("\"demo-intermediate-2026\"", "\"c-int\"");
            let opened = officers.start("alice", &script, "").await.unwrap();
            officers.sign_in("alice", &opened.name, &script).await.unwrap();
            let waiting = officers.sign_in("bob", &opened.name, &script).await.unwrap();
            assert_eq!(state(&waiting), CeremonyState::AwaitingConfirmation, "{}", waiting.error);
            let fingerprint = waiting.fingerprint.unwrap().value;

            service.set_policy("root-ca", OperationKind::Sign, 3, ["bob", "carol"]).await;

            officers.confirm("alice", &opened.name, &script, &fingerprint).await.unwrap();
            let last = officers.confirm("bob", &opened.name, &script, &fingerprint).await;
            let ceremony = officers.get("alice", &opened.name).await.unwrap();
            assert!(
                ceremony.certificate_pem.is_empty() && state(&ceremony) != CeremonyState::Completed,
                "2 officers got root-ca (SIGN now 3 of 3) to certify issuing-ca: last confirm {:?}, ceremony {:?}",
                last.as_ref().map(state).map_err(reason),
                state(&ceremony),
            );
        });
    }
);
