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
//!
//! A third: the root's cryptoperiod has ended, so a Sign with it is
//! refused `CRYPTOPERIOD_ENDED`; the officers open an intermediate
//! ceremony over it. Safe: a ceremony certifies only with a version the one
//! lifecycle rule (`keys::check_usable`) lets sign, as every other
//! signature; a CRL is the exception the rule itself makes (`Use::Revoke`:
//! a CA revokes what it issued until the last of it expires).

use custody_proto::v1::{Algorithm, CeremonyState, OperationKind};
use softhsm_tests::service::{TestService, reason, runtime};
use softhsm_tests::token_test;

use crate::common::{create_key, officers_of, state};
use softhsm_tests::ceremony::Officers;

fn crl_script(id: &str) -> String {
    include_str!("../../../deploy/ceremonies/crl.toml")
        .replace("\"demo-crl-2026\"", &format!("\"{id}\""))
}

/// The example intermediate script (root-ca certifies issuing-ca), as
/// ceremony `id`.
fn intermediate_script(id: &str) -> String {
    include_str!("../../../deploy/ceremonies/intermediate.toml")
        .replace("\"demo-intermediate-2026\"", &format!("\"{id}\""))
}

token_test!(
    fn a_crl_ceremony_waiting_for_confirmation_does_not_sign_after_the_root_s_sign_policy_was_tightened(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = officers_of(&service).await;
            officers.ca_root().await;

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
            officers.ca_root().await;
            let operator = service.client("operator").await;
            create_key(&operator, "issuing-ca", Algorithm::EcSignP256Sha256, false).await.unwrap();

            let script = intermediate_script("c-int");
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

/// A ceremony of `script` run whole by alice and bob as far as custodyd
/// lets it go: what it signed (PEM), or where it stopped.
async fn signed_by_ceremony(officers: &Officers<'_>, script: &str) -> Result<String, String> {
    let opened = officers
        .start("alice", script, "")
        .await
        .map_err(|e| format!("opening was refused: {}", reason(&e)))?;
    officers
        .sign_in("alice", &opened.name, script)
        .await
        .map_err(|e| reason(&e))?;
    let waiting = officers
        .sign_in("bob", &opened.name, script)
        .await
        .map_err(|e| format!("the sign-in was refused: {}", reason(&e)))?;
    let fingerprint = waiting.fingerprint.map(|f| f.value).unwrap_or_default();
    officers
        .confirm("alice", &opened.name, script, &fingerprint)
        .await
        .map_err(|e| reason(&e))?;
    let last = officers
        .confirm("bob", &opened.name, script, &fingerprint)
        .await
        .map_err(|e| format!("the last confirmation was refused: {}", reason(&e)))?;
    if last.certificate_pem.is_empty() {
        Err(format!("nothing signed: {:?} {}", state(&last), last.error))
    } else {
        Ok(last.certificate_pem)
    }
}

token_test!(
    fn a_root_past_its_cryptoperiod_certifies_nothing_but_still_signs_crls(token) {
        use custody_proto::v1::UpdateKeyRequest;
        use custody_proto::v1::key_service_client::KeyServiceClient;
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = officers_of(&service).await;
            officers.ca_root().await;
            let operator = service.client("operator").await;
            create_key(&operator, "issuing-ca", Algorithm::EcSignP256Sha256, false).await.unwrap();
            KeyServiceClient::new(operator)
                .update_key(UpdateKeyRequest {
                    name: "keys/root-ca".into(),
                    cryptoperiod: Some(prost_types::Duration { seconds: 7_200, nanos: 0 }),
                    ..Default::default()
                })
                .await
                .unwrap();
            service.clock.advance(3 * 3_600_000);

            let intermediate = intermediate_script("c-late");
            let certified = signed_by_ceremony(&officers, &intermediate).await;
            assert!(
                certified.is_err(),
                "root-ca certified issuing-ca after its cryptoperiod ended:\n{}",
                certified.unwrap_or_default()
            );
            let stopped = certified.unwrap_err();
            assert!(stopped.contains("CRYPTOPERIOD_ENDED"), "{stopped}");
            // Control: revocation goes on until what the root issued expires.
            let crl = signed_by_ceremony(&officers, &crl_script("c-crl")).await;
            assert!(crl.is_ok(), "{crl:?}");
        });
    }
);
