//! CRL ceremonies on SoftHSM2, through the real gRPC server with real
//! mTLS: a custody root signs a CRL once the quorum confirmed the TBS's
//! SHA-256; pkilint (no one here wrote it) finds no error in it and
//! `openssl crl -verify` accepts it under the root certificate; a CRL that
//! breaks a lint rule never reaches the confirmation, hence never the HSM;
//! a confirmation over another digest, or a quorum weaker than the root's
//! SIGN policy, does not get the root to sign; and no CRL number is given
//! twice, even to a ceremony that never finished.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::path::Path;
use std::process::Command;

use custody_core::ceremony::transcript::Transcript;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::{AbortCeremonyRequest, CeremonyState, GetKeyRequest, GetTranscriptRequest};
use sha2::Digest as _;
use softhsm_tests::ceremony::{Officers, root_script};
use softhsm_tests::pkilint::Pkilint;
use softhsm_tests::service::{TestService, reason, runtime};
use softhsm_tests::token_test;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

fn pkilint() -> Pkilint {
    Pkilint::new(Path::new(env!("CARGO_TARGET_TMPDIR")))
        .unwrap_or_else(|why| panic!("pkilint (from PyPI) cannot be installed here: {why}"))
}

/// The reviewed example script, its id, issuer and nextUpdate replaced.
fn crl_script(id: &str, issuer: &str, days: u32) -> String {
    include_str!("../../deploy/ceremonies/crl.toml")
        .replace("\"demo-crl-2026\"", &format!("\"{id}\""))
        .replace("issuer = \"root-ca\"", &format!("issuer = \"{issuer}\""))
        .replace(
            "next_update_days = 30",
            &format!("next_update_days = {days}"),
        )
}

/// The CRL of a completed ceremony, parsed: its DER and its number.
fn crl_of(pem: &str) -> (Vec<u8>, String) {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    assert_eq!(parsed.label, "X509 CRL");
    let (_, crl) = CertificateRevocationList::from_der(&parsed.contents).unwrap();
    let number = crl.crl_number().unwrap().to_string();
    (parsed.contents.clone(), number)
}

async fn transcript(officers: &Officers<'_>, name: &str) -> Transcript {
    let json = officers
        .client("alice")
        .get_transcript(GetTranscriptRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
        .json;
    Transcript::from_json(&json).unwrap()
}

token_test!(
    fn a_crl_ceremony_signs_the_confirmed_crl_which_openssl_and_pkilint_accept_under_the_root(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = Officers::new(&service.officers, service.officer_channels().await);
            officers.ca_root().await;
            let script = crl_script("c-crl", "root-ca", 30);
            let opened = officers.start("alice", &script, "").await.unwrap();
            officers.sign_in("alice", &opened.name, &script).await.unwrap();
            let waiting = officers.sign_in("bob", &opened.name, &script).await.unwrap();
            assert_eq!(waiting.state, CeremonyState::AwaitingConfirmation as i32, "{}", waiting.error);
            // Officers confirm the TBS's SHA-256, recomputable from the TBS
            // they are shown; nothing is signed yet.
            let fingerprint = waiting.fingerprint.clone().unwrap().value;
            assert_eq!(fingerprint, sha2::Sha256::digest(&waiting.tbs_der).to_vec());
            assert!(waiting.certificate_pem.is_empty());
            // The root's first CRL: its number is custody's time, which
            // this test does not move, in thousandths of a millisecond.
            let first = clock_number(&service);
            for line in [&format!("CRL number: {first}"), "issuer: C=DE, O=Custody Tests, CN=Test Root CA", "revoked certificates: 1"] {
                assert!(waiting.tbs_summary.iter().any(|l| l == line), "{line}: {:?}", waiting.tbs_summary);
            }
            officers.confirm("alice", &opened.name, &script, &fingerprint).await.unwrap();
            let done = officers.confirm("bob", &opened.name, &script, &fingerprint).await.unwrap();
            assert_eq!(done.state, CeremonyState::Completed as i32, "{}", done.error);

            let (der, number) = crl_of(&done.certificate_pem);
            assert_eq!(number, first.to_string());
            let (_, crl) = CertificateRevocationList::from_der(&der).unwrap();
            assert_eq!(crl.tbs_cert_list.as_ref(), waiting.tbs_der.as_slice(), "the HSM signed the confirmed TBS");
            let revoked: Vec<_> = crl.iter_revoked_certificates().collect();
            assert_eq!(revoked.len(), 1);
            assert_eq!(hex::encode(revoked[0].raw_serial()), "3f1e0a9b7c6d5e4f");
            assert_eq!(revoked[0].reason_code().unwrap().1 .0, 1, "keyCompromise");

            // The root certificate, as a relying party fetches it.
            let root_key = KeyServiceClient::new(service.client("ca-issuing").await)
                .get_key(GetKeyRequest { name: "keys/root-ca".into() })
                .await
                .unwrap()
                .into_inner();
            let root_pem = root_key.versions[0].certificate_chain_pem[0].clone();
            let dir = token.scratch();
            let (root_path, crl_path) = (dir.join("root.pem"), dir.join("root.crl"));
            std::fs::write(&root_path, &root_pem).unwrap();
            std::fs::write(&crl_path, &done.certificate_pem).unwrap();
            let verified = Command::new("openssl")
                .args(["crl", "-noout", "-verify", "-in"])
                .arg(&crl_path)
                .arg("-CAfile")
                .arg(&root_path)
                .output()
                .unwrap();
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&verified.stdout),
                String::from_utf8_lossy(&verified.stderr)
            );
            assert!(verified.status.success() && said.contains("verify OK"), "{said}");

            let pkilint = pkilint();
            for (kind, profile) in [("ARL", "BR"), ("CRL", "PKIX")] {
                let findings = pkilint.crl(kind, profile, &crl_path);
                for finding in &findings.all {
                    eprintln!("pkilint lint_crl -t {kind} -p {profile}: {finding}");
                }
                assert!(findings.errors.is_empty(), "pkilint {kind} {profile} errors: {:#?}", findings.errors);
            }

            // The transcript carries the number, the TBS digest and the
            // lint's result, then the signature over that very TBS.
            let transcript = transcript(&officers, &done.name).await;
            let tbs_sha256 = hex::encode(sha2::Sha256::digest(&waiting.tbs_der));
            let tbs = transcript.entries.iter().find(|e| e.step == "tbs").unwrap();
            assert_eq!(tbs.detail["tbs_sha256"], tbs_sha256.as_str());
            assert_eq!(tbs.detail["crl_number"], first);
            assert!(tbs.detail["lint"].as_str().unwrap().starts_with("passed: encoding,"));
            let signed = transcript.entries.iter().find(|e| e.step == "sign-crl").unwrap();
            assert_eq!(signed.detail["tbs_sha256"], tbs_sha256.as_str());
            let steps: Vec<&str> = transcript.entries.iter().map(|e| e.step.as_str()).collect();
            let at = |step: &str| steps.iter().rposition(|s| *s == step).unwrap();
            assert!(at("confirm") < at("sign-crl"), "signed only after the confirmations: {steps:?}");

            // The next CRL of this root gets the next number.
            let (next, _) = officers.run(&crl_script("c-crl-2", "root-ca", 7)).await.unwrap();
            assert_eq!(next.state, CeremonyState::Completed as i32, "{}", next.error);
            assert_eq!(crl_of(&next.certificate_pem).1, (first + 1).to_string());
        });
    }
);

token_test!(
    fn a_crl_that_breaks_a_lint_rule_stops_before_the_confirmation_and_the_hsm_naming_the_rule(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = Officers::new(&service.officers, service.officer_channels().await);
            // A root certificate valid 30 days.
            officers.run(&root_script("c-root", "short-root", true)).await.unwrap();
            let cases = [
                // Valid as a script; but its nextUpdate falls after the
                // root's notAfter.
                (crl_script("c-long", "short-root", 31), "lint rule validity ", "past the issuer's notAfter"),
                // A revocation in the CRL's future.
                (
                    crl_script("c-future", "short-root", 7).replace("2026-01-15T00:00:00Z", "2099-01-01T00:00:00Z"),
                    "lint rule revocation-date ",
                    "in the CRL's future",
                ),
            ];
            for (script, rule, detail) in cases {
                let opened = officers.start("alice", &script, "").await.unwrap();
                officers.sign_in("alice", &opened.name, &script).await.unwrap();
                let after = officers.sign_in("bob", &opened.name, &script).await.unwrap();
                assert_eq!(after.state, CeremonyState::RolledBack as i32, "{after:?}");
                assert!(after.error.contains(rule), "{}", after.error);
                assert!(after.error.contains(detail), "{}", after.error);
                assert!(after.error.contains("refused the CRL before the HSM signed it"), "{}", after.error);
                assert!(after.tbs_der.is_empty() && after.fingerprint.is_none() && after.certificate_pem.is_empty());
                // Nothing to confirm, so nothing the HSM could be asked to sign.
                let refused = officers.confirm("alice", &opened.name, &script, &[0; 32]).await.unwrap_err();
                assert_eq!(reason(&refused), "NOT_CONFIRMING");
                let transcript = transcript(&officers, &opened.name).await;
                assert!(!transcript.entries.iter().any(|e| e.step == "sign-crl"));
            }
        });
    }
);

token_test!(
    fn another_digest_a_weaker_quorum_or_a_root_without_certificate_do_not_get_a_crl_signed(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = Officers::new(&service.officers, service.officer_channels().await);
            officers.ca_root().await;
            let script = crl_script("c-attack", "root-ca", 30);
            let opened = officers.start("alice", &script, "").await.unwrap();
            officers.sign_in("alice", &opened.name, &script).await.unwrap();
            let waiting = officers.sign_in("bob", &opened.name, &script).await.unwrap();
            let fingerprint = waiting.fingerprint.unwrap().value;
            officers.confirm("alice", &opened.name, &script, &fingerprint).await.unwrap();
            // bob confirming another digest (another TBS) does not count,
            // nor does carol, who did not sign in.
            let mut other = fingerprint.clone();
            other[0] ^= 1;
            let wrong = officers.confirm("bob", &opened.name, &script, &other).await.unwrap_err();
            assert_eq!(reason(&wrong), "BAD_SIGNATURE");
            let outsider = officers.confirm("carol", &opened.name, &script, &fingerprint).await.unwrap_err();
            assert_eq!(reason(&outsider), "NOT_PRESENT");
            let pending = officers.get("alice", &opened.name).await.unwrap();
            assert_eq!(pending.state, CeremonyState::AwaitingConfirmation as i32);
            assert!(pending.certificate_pem.is_empty());
            let transcript = transcript(&officers, &opened.name).await;
            assert!(!transcript.entries.iter().any(|e| e.step == "sign-crl"));

            // A root without a root certificate signs no CRL; nor does a
            // quorum weaker than the root's SIGN policy (3 of 3 here).
            officers.run(&root_script("c-bare", "bare-root", false)).await.unwrap();
            let bare = officers
                .start("alice", &crl_script("c-bare-crl", "bare-root", 7), "")
                .await
                .unwrap_err();
            assert_eq!(reason(&bare), "NO_ISSUER_CERTIFICATE");
            let strict = root_script("c-strict", "strict-root", true).replace(
                "signers = [\"ca-issuing\"]\n",
                "signers = [\"ca-issuing\"]\n[key.policy.SIGN]\nofficers = [\"alice\", \"bob\", \"carol\"]\nrequired = 3\n",
            );
            officers.run(&strict).await.unwrap();
            let weak = officers
                .start("alice", &crl_script("c-weak", "strict-root", 7), "")
                .await
                .unwrap_err();
            assert_eq!(reason(&weak), "BAD_SCRIPT", "{weak:?}");
            assert!(weak.message().contains("SIGN policy needs 3"), "{}", weak.message());
        });
    }
);

token_test!(
    fn a_crl_number_is_never_given_twice_even_to_a_ceremony_that_did_not_finish(token) {
        runtime().block_on(async {
            let mut service = TestService::start(token).await;
            let number = clock_number(&service);
            {
            let officers = Officers::new(&service.officers, service.officer_channels().await);
            officers.ca_root().await;
            // The first number is taken by a CRL built and confirmed by one
            // officer, then aborted: it was never signed, but it is not
            // given again.
            let first = crl_script("c-first", "root-ca", 30);
            let opened = officers.start("alice", &first, "").await.unwrap();
            officers.sign_in("alice", &opened.name, &first).await.unwrap();
            let waiting = officers.sign_in("bob", &opened.name, &first).await.unwrap();
            assert!(waiting.tbs_summary.iter().any(|l| *l == format!("CRL number: {number}")), "{:?}", waiting.tbs_summary);
            let fingerprint = waiting.fingerprint.unwrap().value;
            officers.confirm("alice", &opened.name, &first, &fingerprint).await.unwrap();
            let aborted = officers
                .client("alice")
                .abort_ceremony(AbortCeremonyRequest { name: opened.name.clone(), reason: "wrong serial".into() })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(aborted.state, CeremonyState::Aborted as i32);
            // The same reviewed CRL again, under a new id: the next number.
            let again = first.replace("\"c-first\"", "\"c-first-again\"");
            let (done, _) = officers.run(&again).await.unwrap();
            assert_eq!(done.state, CeremonyState::Completed as i32, "{}", done.error);
            assert_eq!(crl_of(&done.certificate_pem).1, (number + 1).to_string());
            }
            // A restart reads the numbers from the journal: the one after.
            service.restart().await;
            let officers = Officers::new(&service.officers, service.officer_channels().await);
            let (third, _) = officers.run(&crl_script("c-third", "root-ca", 30)).await.unwrap();
            assert_eq!(third.state, CeremonyState::Completed as i32, "{}", third.error);
            assert_eq!(crl_of(&third.certificate_pem).1, (number + 2).to_string());
        });
    }
);

/// The CRL number custody's time alone gives: its Unix milliseconds times
/// 1000 (the clock is the test's, which moves only when told).
fn clock_number(service: &TestService) -> u64 {
    u64::try_from(service.state().clock.now_ms()).unwrap() * 1000
}

/// The number of the CRL a completed ceremony of `script` signed.
async fn crl_number_of(officers: &Officers<'_>, script: &str) -> u64 {
    let (done, _) = officers.run(script).await.unwrap();
    assert_eq!(
        done.state,
        CeremonyState::Completed as i32,
        "{}",
        done.error
    );
    crl_of(&done.certificate_pem).1.parse().unwrap()
}

// Disaster recovery puts the data directory back from its latest copy
// (docs/runbook.md, "Torn state"): the journal then forgets the CRLs
// signed after the copy was made. Safe: the next CRL of the same root
// still gets a number above every CRL it signed before (RFC 5280 5.2.3),
// as long as time moved on; and with the directory kept, a wall clock
// stepped back does not lower the next number either.
token_test!(
    fn a_crl_number_is_not_given_again_after_the_data_directory_is_restored_from_an_older_copy(token) {
        runtime().block_on(async {
            let mut service = TestService::start(token).await;
            {
                let officers = Officers::new(&service.officers, service.officer_channels().await);
                officers.ca_root().await;
            }
            // The copy: the root is in it, no CRL yet.
            service.stop().await;
            let data_dir = service.config.data_dir.clone();
            let copy = token.scratch().join("data-copy");
            softhsm_tests::copy_dir(&data_dir, &copy);
            service.try_restart().await.unwrap();
            let mut issued = Vec::new();
            {
                let officers = Officers::new(&service.officers, service.officer_channels().await);
                issued.push(crl_number_of(&officers, &crl_script("c-one", "root-ca", 30)).await);
                issued.push(crl_number_of(&officers, &crl_script("c-two", "root-ca", 30)).await);
            }
            assert!(issued[0] < issued[1], "{issued:?}");

            // The directory is lost and put back from the copy, a minute on.
            service.stop().await;
            std::fs::remove_dir_all(&data_dir).unwrap();
            softhsm_tests::copy_dir(&copy, &data_dir);
            service.clock.advance(60_000);
            service.try_restart().await.unwrap();
            let officers = Officers::new(&service.officers, service.officer_channels().await);
            let after_restore = crl_number_of(&officers, &crl_script("c-one", "root-ca", 30)).await;
            assert!(
                after_restore > issued[1],
                "the CRL after the restore has number {after_restore}, not above the {issued:?} signed before it"
            );

            // The wall clock stepped back a day: the directory kept, the
            // next number is still above the last.
            service.clock.step(-86_400_000);
            let stepped_back = crl_number_of(&officers, &crl_script("c-back", "root-ca", 30)).await;
            assert!(stepped_back > after_restore, "{stepped_back} after {after_restore}");
        });
    }
);
