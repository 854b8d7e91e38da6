//! Key ceremonies end to end on SoftHSM2, through the real gRPC server with
//! real mTLS, each officer on their own channel with their own key: the root
//! key ceremony (quorum, consistency-tested key, fingerprint, root
//! certificate that `openssl verify` accepts, key unusable until committed),
//! the KEK ceremony in both modes, backups, the DR drill (K shares restore
//! and verify, K-1 and tampered sets refused before any unwrap), a restore
//! into a fresh token, and transcripts verified offline.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::collections::BTreeMap;

use custody_core::audit::Event;
use custody_core::ceremony::bundle::Bundle;
use custody_core::ceremony::components::kcv;
use custody_core::ceremony::transcript::Transcript;
use custody_core::encoding::pem_to_der;
use custody_proto::v1::ceremony_service_client::CeremonyServiceClient;
use custody_proto::v1::envelope_service_client::EnvelopeServiceClient;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::operation_service_client::OperationServiceClient;
use custody_proto::v1::signing_service_client::SigningServiceClient;
use custody_proto::v1::{
    AbortCeremonyRequest, CeremonyState, CheckDriftRequest, CreateKeyRequest, DecryptRequest,
    Digest, EncryptRequest, GetKeyRequest, GetOperationRequest, GetTranscriptRequest,
    OperationState, SignRequest, SignSpec, digest, operation_spec, sign_request,
};
use sha2::Digest as _;
use softhsm_tests::ceremony::{
    Officers, audit_key_sha256, components_script, kek_script, pinned_restore_script,
    restore_script, root_script,
};
use softhsm_tests::service::{TestService, reason, request_operation, runtime, with_scratch_token};
use softhsm_tests::{TestToken, openssl, token_test};
use tonic::transport::Channel;

fn state(ceremony: &custody_proto::v1::Ceremony) -> CeremonyState {
    CeremonyState::try_from(ceremony.state).unwrap()
}

async fn sign(signer: &Channel, key: &str, digest_bytes: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    SigningServiceClient::new(signer.clone())
        .sign(SignRequest {
            name: format!("keys/{key}"),
            input: Some(sign_request::Input::Digest(Digest {
                digest: Some(digest::Digest::Sha256(digest_bytes.to_vec())),
            })),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().signature)
}

/// Verifies `signature` over `message` (SHA-256 ECDSA, DER) with `pem`.
fn openssl_verifies(token: &TestToken, pem: &str, message: &[u8], signature: &[u8]) -> bool {
    let dir = token.scratch();
    let key = dir.join("verify-key.pem");
    let sig = dir.join("verify.sig");
    std::fs::write(&key, pem).unwrap();
    std::fs::write(&sig, signature).unwrap();
    std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(&key)
        .arg("-signature")
        .arg(&sig)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(message)?;
            child.wait()
        })
        .unwrap()
        .success()
}

/// The transcript verifies offline with the audit key, and each of its
/// entries is anchored in the audit chain by its hash.
async fn transcript_is_sound(service: &TestService, officer: &Channel, name: &str) -> Transcript {
    let response = CeremonyServiceClient::new(officer.clone())
        .get_transcript(GetTranscriptRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner();
    let transcript = Transcript::from_json(&response.json).unwrap();
    let spki = pem_to_der(&response.audit_key_pem).unwrap();
    transcript.verify(&spki).unwrap();
    let anchored: Vec<String> = service
        .state()
        .audit
        .records(1)
        .filter_map(|record| {
            let record = record.unwrap();
            match serde_json::from_slice::<custody_core::audit::Entry>(&record.entry) {
                Ok(entry) => match entry.event {
                    Event::Ceremony {
                        ceremony,
                        entry_hash,
                        ..
                    } if ceremony == name => Some(entry_hash),
                    _ => None,
                },
                Err(_) => None,
            }
        })
        .collect();
    let hashes: Vec<String> = transcript.entries.iter().map(|e| e.hash.clone()).collect();
    assert_eq!(
        anchored, hashes,
        "every transcript entry is in the audit log, in order"
    );
    for entry in &transcript.entries {
        assert!(response.markdown.contains(&entry.summary));
    }
    transcript
}

token_test!(
    fn a_root_key_ceremony_needs_the_quorum_and_its_key_is_usable_only_once_confirmed(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let channels = service.officer_channels().await;
            let officers = Officers::new(&service.officers, channels.clone());
            let signer = service.client("ca-issuing").await;
            let script = root_script("root-1", "root-ca", true);

            let opened = officers.start("alice", &script, "").await.unwrap();
            assert_eq!(state(&opened), CeremonyState::AwaitingOfficers);
            let name = opened.name.clone();

            // A signature over another script is not a sign-in.
            let other = root_script("root-2", "root-ca", true);
            let err = officers.sign_in("alice", &name, &other).await.unwrap_err();
            assert_eq!(reason(&err), "BAD_SIGNATURE");
            // Bob's certificate cannot sign in as alice.
            let mut as_bob = CeremonyServiceClient::new(channels["bob"].clone());
            let forged = as_bob
                .sign_in(custody_proto::v1::CeremonySignature {
                    name: name.clone(),
                    officer_id: "alice".into(),
                    signature: vec![0; 64],
                })
                .await
                .unwrap_err();
            assert_eq!(reason(&forged), "OFFICER_MISMATCH");

            let one = officers.sign_in("alice", &name, &script).await.unwrap();
            assert_eq!(state(&one), CeremonyState::AwaitingOfficers);
            assert!(service.state().registry.get("root-ca").is_none());
            let inventory = service.state().hsm.run(|s| s.inventory()).await.unwrap();
            assert!(
                !inventory.iter().any(|o| o.label.starts_with("key/root-ca")),
                "nothing is made before the quorum is present"
            );

            let two = officers.sign_in("bob", &name, &script).await.unwrap();
            assert_eq!(state(&two), CeremonyState::AwaitingConfirmation);
            let fingerprint = two.fingerprint.clone().unwrap();
            assert_eq!(
                fingerprint.value,
                sha2::Sha256::digest(&two.public_key_der).to_vec()
            );
            assert_eq!(fingerprint.words.split(' ').count(), 12);
            // Generated, certified, but not usable.
            let err = sign(&signer, "root-ca", &[7; 32]).await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::NotFound, "{err}");

            // The certificate is a self-signed CA that openssl accepts.
            let cert = token.scratch().join("root.pem");
            std::fs::write(&cert, &two.certificate_pem).unwrap();
            let verified = openssl(
                &["verify", "-CAfile", cert.to_str().unwrap(), cert.to_str().unwrap()],
                b"",
            );
            assert!(String::from_utf8_lossy(&verified).contains("OK"));

            // carol did not sign in, so she cannot confirm; a confirmation of
            // another fingerprint does not verify.
            let err = officers
                .confirm("carol", &name, &script, &fingerprint.value)
                .await
                .unwrap_err();
            assert_eq!(reason(&err), "NOT_PRESENT");
            let err = officers
                .confirm("alice", &name, &script, &[0; 32])
                .await
                .unwrap_err();
            assert_eq!(reason(&err), "BAD_SIGNATURE");

            officers
                .confirm("alice", &name, &script, &fingerprint.value)
                .await
                .unwrap();
            let done = officers
                .confirm("bob", &name, &script, &fingerprint.value)
                .await
                .unwrap();
            assert_eq!(state(&done), CeremonyState::Completed);

            // Now it is registered under the policy the script left to the
            // administrative quorum (2 of alice, bob, carol): the allowed
            // signer alone is refused, and signs once two officers approve;
            // the signature verifies with the key the officers confirmed.
            let key = KeyServiceClient::new(signer.clone())
                .get_key(GetKeyRequest { name: "keys/root-ca".into() })
                .await
                .unwrap()
                .into_inner();
            let kinds: Vec<&str> = key.policies.iter().map(|p| p.operation.as_str()).collect();
            assert_eq!(kinds, ["ROTATE", "SET_POLICY", "SET_STATE", "SIGN"], "{key:?}");
            for policy in &key.policies {
                assert_eq!(policy.required, 2, "{policy:?}");
                assert_eq!(policy.officers, ["alice", "bob", "carol"], "{policy:?}");
            }
            let message = b"issued by the ceremony's root key";
            let digest_bytes = sha2::Sha256::digest(message);
            let alone = sign(&signer, "root-ca", &digest_bytes).await.unwrap_err();
            assert_eq!(reason(&alone), "QUORUM_REQUIRED", "{alone}");
            let operation = request_operation(
                &signer,
                operation_spec::Spec::Sign(SignSpec {
                    name: "keys/root-ca".into(),
                    digest: Some(Digest {
                        digest: Some(digest::Digest::Sha256(digest_bytes.to_vec())),
                    }),
                    encoding: 0,
                }),
            )
            .await
            .unwrap();
            assert_eq!(operation.required, 2);
            service.approve("alice", &operation).await.unwrap();
            let approved = service.approve("bob", &operation).await.unwrap();
            assert_eq!(approved.state, OperationState::Succeeded as i32, "{}", approved.error);
            let signature = OperationServiceClient::new(signer.clone())
                .get_operation(GetOperationRequest { name: operation.name.clone() })
                .await
                .unwrap()
                .into_inner()
                .signature
                .unwrap()
                .signature;
            let pem = service.state().registry.get("root-ca").unwrap().versions[0]
                .public_key_pem
                .clone();
            assert!(openssl_verifies(token, &pem, message, &signature));
            assert!(service.state().registry.get("root-ca").unwrap().backup_exportable);

            let transcript = transcript_is_sound(&service, &channels["alice"], &name).await;
            assert_eq!(transcript.outcome, "completed");
            let steps: Vec<&str> = transcript.entries.iter().map(|e| e.step.as_str()).collect();
            assert_eq!(
                steps,
                ["open", "sign-in", "sign-in", "generate", "certificate", "confirm", "confirm", "commit"]
            );
            // What the key would be registered under was fixed, and said,
            // when the ceremony opened.
            for entry in [&transcript.entries[0], transcript.entries.last().unwrap()] {
                assert!(
                    entry.summary.contains(
                        "SIGN, ROTATE, SET_STATE, SET_POLICY: administrative quorum (2 of 3: alice, bob, carol)"
                    ),
                    "{}",
                    entry.summary
                );
            }

            // A finished ceremony takes nothing more.
            let err = officers.sign_in("carol", &name, &script).await.unwrap_err();
            assert_eq!(reason(&err), "NOT_SIGNING_IN");
        });
    }
);

token_test!(
    fn an_aborted_ceremony_destroys_what_it_made_and_its_key_never_becomes_usable(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let channels = service.officer_channels().await;
            let officers = Officers::new(&service.officers, channels.clone());
            let script = root_script("root-abort", "doomed", false);
            let name = officers.start("alice", &script, "").await.unwrap().name;
            officers.sign_in("alice", &name, &script).await.unwrap();
            officers.sign_in("bob", &name, &script).await.unwrap();
            let before = service.state().hsm.run(|s| s.inventory()).await.unwrap();
            assert!(before.iter().any(|o| o.label == "key/doomed/v1"));
            // Only an officer of the quorum may abort, and with a reason.
            let aborted = CeremonyServiceClient::new(channels["carol"].clone())
                .abort_ceremony(AbortCeremonyRequest {
                    name: name.clone(),
                    reason: "fingerprint read aloud did not match".into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(state(&aborted), CeremonyState::Aborted);
            let after = service.state().hsm.run(|s| s.inventory()).await.unwrap();
            assert!(!after.iter().any(|o| o.label.starts_with("key/doomed")));
            assert!(service.state().registry.get("doomed").is_none());
            let fingerprint = vec![0u8; 32];
            let err = officers
                .confirm("alice", &name, &script, &fingerprint)
                .await
                .unwrap_err();
            assert_eq!(reason(&err), "NOT_CONFIRMING");
            let transcript = transcript_is_sound(&service, &channels["alice"], &name).await;
            assert_eq!(transcript.outcome, "aborted");
            // The key id is free again.
            let script = root_script("root-again", "doomed", false);
            officers.run(&script).await.unwrap();
            assert!(service.state().registry.get("doomed").is_some());
        });
    }
);

token_test!(
    fn a_kek_from_components_is_their_xor_imported_non_extractable_with_each_kcv_confirmed(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let channels = service.officer_channels().await;
            let officers = Officers::new(&service.officers, channels.clone());
            let script = components_script("kek-parts", "partner-kek");
            let name = officers.start("alice", &script, "").await.unwrap().name;
            officers.sign_in("alice", &name, &script).await.unwrap();
            let waiting = officers.sign_in("carol", &name, &script).await.unwrap();
            assert_eq!(state(&waiting), CeremonyState::AwaitingComponents);

            // Three components none of which is the XOR of the others
            // (0x11, 0x22, 0x33 would cancel to a zero key and are refused).
            let parts: Vec<[u8; 32]> = [0x11u8, 0x22, 0x44].iter().map(|b| [*b; 32]).collect();
            let mut key = [0u8; 32];
            for part in &parts {
                for (k, p) in key.iter_mut().zip(part) {
                    *k ^= p;
                }
            }
            // A component whose KCV is not the sheet's is refused.
            let err = officers
                .submit_component("alice", &name, &hex::encode(parts[0]), "000000")
                .await
                .unwrap_err();
            assert_eq!(reason(&err), "KCV_MISMATCH");
            for (officer, part) in ["alice", "bob", "carol"].iter().zip(&parts) {
                officers
                    .submit_component(officer, &name, &hex::encode(part), &hex::encode(kcv(part)))
                    .await
                    .unwrap();
            }
            let ceremony = officers.get("alice", &name).await.unwrap();
            assert_eq!(state(&ceremony), CeremonyState::AwaitingConfirmation);
            let fingerprint = ceremony.fingerprint.unwrap();
            assert_eq!(fingerprint.value, kcv(&key).to_vec(), "the KEK is the XOR");
            officers
                .confirm("alice", &name, &script, &fingerprint.value)
                .await
                .unwrap();
            let done = officers
                .confirm("carol", &name, &script, &fingerprint.value)
                .await
                .unwrap();
            assert_eq!(state(&done), CeremonyState::Completed);

            let objects = service.state().hsm.run(|s| s.inventory()).await.unwrap();
            let kek = objects
                .iter()
                .find(|o| o.label == "key/partner-kek/v1")
                .unwrap();
            assert_eq!(kek.extractable, Some(false));
            assert_eq!(kek.sensitive, Some(true));
            let drift = KeyServiceClient::new(service.client("operator").await)
                .check_drift(CheckDriftRequest {})
                .await
                .unwrap()
                .into_inner();
            assert_eq!(drift.findings.len(), 0, "{:?}", drift.findings);
            let transcript = transcript_is_sound(&service, &channels["bob"], &name).await;
            let text = serde_json::to_string(&transcript).unwrap();
            for part in &parts {
                assert!(!text.contains(&hex::encode(part)), "no component in the transcript");
            }
        });
    }
);

/// A KEK ceremony (backup KEK split 2 of 3, shares sealed to the officers'
/// keys), `count` backup-exportable keys (P-384, P-256, RSA in turn), and a
/// backup of them all.
async fn kek_and_backup(
    service: &TestService,
    officers: &Officers<'_>,
    count: usize,
) -> (BTreeMap<String, String>, String) {
    let script = kek_script("kek-1", "envelope-kek", true);
    let (_, shares) = officers.run_backup_kek(&script).await.unwrap();
    let operator = service.client("operator").await;
    let mut keys = KeyServiceClient::new(operator);
    // Each kind of key pair a backup carries: the restore signs a challenge
    // with each, by its own hash.
    let algorithms = [
        custody_proto::v1::Algorithm::EcSignP384Sha384,
        custody_proto::v1::Algorithm::EcSignP256Sha256,
        custody_proto::v1::Algorithm::RsaSignPkcs12048Sha256,
    ];
    for i in 0..count {
        keys.create_key(CreateKeyRequest {
            key_id: format!("issuer-{i}"),
            algorithm: algorithms[i % algorithms.len()] as i32,
            purpose: custody_proto::v1::KeyPurpose::AsymmetricSign as i32,
            allowed_signers: vec!["ca-issuing".into()],
            backup_exportable: true,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let bundle = officers
        .approved_backup("alice", &["bob", "carol"])
        .await
        .unwrap();
    (shares, bundle)
}

token_test!(
    fn a_drill_restores_from_k_shares_into_the_scratch_token_verifies_and_leaves_it_empty(token) {
        runtime().block_on(async {
            let service = TestService::start_with(token, |c| with_scratch_token(token, c)).await;
            let channels = service.officer_channels().await;
            let officers = Officers::new(&service.officers, channels.clone());
            let (shares, bundle_text) = kek_and_backup(&service, &officers, 3).await;
            // Each custodian got their own share, and only once.
            assert_eq!(shares.len(), 3);
            let err = officers.collect("alice", "ceremonies/kek-1").await.unwrap_err();
            assert_eq!(err.code(), tonic::Code::FailedPrecondition);

            let bundle = Bundle::parse(&bundle_text).unwrap();
            bundle.verify(&pem_to_der(&bundle.audit_key_pem).unwrap()).unwrap();
            // The KEK and the three keys; the KEK made by the ceremony is in.
            assert_eq!(bundle.manifest.keys.len(), 4);
            assert!(bundle.manifest.keys.iter().any(|k| k.key_id == "envelope-kek"));

            let script = restore_script("drill-1", &bundle_text, true);
            let name = officers.start("bob", &script, &bundle_text).await.unwrap().name;
            officers.sign_in("bob", &name, &script).await.unwrap();
            let waiting = officers.sign_in("carol", &name, &script).await.unwrap();
            assert_eq!(state(&waiting), CeremonyState::AwaitingShares);
            assert_eq!(waiting.shares_needed, 2);

            // K-1 shares: still waiting, nothing unwrapped.
            let one = officers.submit_share("alice", &name, &shares["alice"]).await.unwrap();
            assert_eq!(state(&one), CeremonyState::AwaitingShares);
            assert!(one.restore.is_none());
            // The same share again (from another custodian) is refused.
            let err = officers
                .submit_share("bob", &name, &shares["alice"])
                .await
                .unwrap_err();
            assert_eq!(reason(&err), "DUPLICATE_SHARE");
            // A mangled share never gets past its checksum.
            let mut mangled = shares["bob"].clone().into_bytes();
            let at = mangled.len() / 2;
            mangled[at] = if mangled[at] == b'a' { b'b' } else { b'a' };
            let err = officers
                .submit_share("bob", &name, &String::from_utf8(mangled).unwrap())
                .await
                .unwrap_err();
            assert_eq!(reason(&err), "BAD_SHARE");

            let done = officers.submit_share("carol", &name, &shares["carol"]).await.unwrap();
            assert_eq!(state(&done), CeremonyState::Completed, "{}", done.error);
            let report = done.restore.unwrap();
            assert!(report.drill);
            assert_eq!((report.keys, report.verified), (4, 4));
            // Each key pair makes a private and a public object, the KEK one.
            assert_eq!(report.scratch_objects_destroyed, 3 * 2 + 1);
            assert!(service.state().registry.get("issuer-0").is_some());

            let scratch = hsm_shim::Hsm::open({
                let mut config = token.config(1);
                config.token = hsm_shim::TokenSelector::Label(
                    softhsm_tests::service::SCRATCH_TOKEN.into(),
                );
                config
            })
            .unwrap();
            let left = scratch.run(|s| s.inventory()).await.unwrap();
            assert!(left.is_empty(), "the scratch token is left empty: {left:?}");
            let transcript = transcript_is_sound(&service, &channels["bob"], &name).await;
            assert_eq!(transcript.outcome, "completed");
        });
    }
);

token_test!(
    fn a_restore_into_a_fresh_token_brings_back_keys_that_sign_as_before(token) {
        runtime().block_on(async {
            // The DR token exists from the start (SoftHSM2 sees only the
            // tokens present when the process loads it), empty.
            token.add_token("custody-dr");
            // The production daemon: a KEK ceremony, keys, a backup.
            let mut service = TestService::start(token).await;
            let channels = service.officer_channels().await;
            let officers = Officers::new(&service.officers, channels.clone());
            let (shares, bundle_text) = kek_and_backup(&service, &officers, 2).await;
            let signer = service.client("ca-issuing").await;
            let original = service.state().registry.get("issuer-1").unwrap();
            let pem = original.versions[0].public_key_pem.clone();
            let envelope_ciphertext = EnvelopeServiceClient::new(signer.clone())
                .encrypt(EncryptRequest {
                    name: "keys/envelope-kek".into(),
                    plaintext: b"data under the KEK".to_vec(),
                    associated_data: b"dr".to_vec(),
                })
                .await
                .unwrap()
                .into_inner()
                .ciphertext;
            // What the source publishes, for a restore elsewhere to pin.
            let source_audit_key = audit_key_sha256(&service);
            service.stop().await;

            // Disaster: a fresh daemon on a fresh token, officers enrolled
            // anew, the custodians bring their shares.
            let fresh_dir = token.scratch().join("dr-data");
            let dr = TestService::start_with(token, |config| {
                config.hsm.token_label = "custody-dr".into();
                config.data_dir = fresh_dir.clone();
            })
            .await;
            let dr_channels = dr.officer_channels().await;
            let dr_officers = Officers::new(&dr.officers, dr_channels.clone());
            // The fresh daemon trusts only its own audit key: a script that
            // pins none, or pins another, is refused at open, naming the key
            // the bundle says signed it.
            for unpinned in [
                restore_script("restore-0", &bundle_text, false),
                pinned_restore_script("restore-0", &bundle_text, false, &audit_key_sha256(&dr)),
            ] {
                let err = dr_officers.start("alice", &unpinned, &bundle_text).await.unwrap_err();
                assert_eq!(reason(&err), "BAD_BUNDLE", "{err}");
                assert!(err.message().contains(&source_audit_key), "{err}");
            }
            let script = pinned_restore_script("restore-1", &bundle_text, false, &source_audit_key);
            let name = dr_officers.start("alice", &script, &bundle_text).await.unwrap().name;
            dr_officers.sign_in("alice", &name, &script).await.unwrap();
            dr_officers.sign_in("bob", &name, &script).await.unwrap();
            dr_officers.submit_share("alice", &name, &shares["alice"]).await.unwrap();
            let done = dr_officers.submit_share("bob", &name, &shares["bob"]).await.unwrap();
            assert_eq!(state(&done), CeremonyState::Completed, "{}", done.error);
            assert_eq!(done.restore.unwrap().verified, 3);

            let dr_signer = dr.client("ca-issuing").await;
            let message = b"signed after the restore";
            let signature = sign(&dr_signer, "issuer-1", &sha2::Sha256::digest(message))
                .await
                .unwrap();
            assert!(openssl_verifies(token, &pem, message, &signature));
            let plaintext = EnvelopeServiceClient::new(dr_signer.clone())
                .decrypt(DecryptRequest {
                    name: "keys/envelope-kek".into(),
                    ciphertext: envelope_ciphertext,
                    associated_data: b"dr".to_vec(),
                })
                .await
                .unwrap()
                .into_inner()
                .plaintext;
            assert_eq!(plaintext, b"data under the KEK");
            let restored = KeyServiceClient::new(dr.client("operator").await)
                .get_key(GetKeyRequest {
                    name: "keys/issuer-1".into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert!(restored.backup_exportable);
            let drift = KeyServiceClient::new(dr.client("operator").await)
                .check_drift(CheckDriftRequest {})
                .await
                .unwrap()
                .into_inner();
            assert_eq!(drift.findings.len(), 0, "{:?}", drift.findings);
        });
    }
);

token_test!(
    fn shares_of_another_set_and_too_few_shares_never_reach_an_unwrap(token) {
        runtime().block_on(async {
            let service = TestService::start_with(token, |c| with_scratch_token(token, c)).await;
            let channels = service.officer_channels().await;
            let officers = Officers::new(&service.officers, channels.clone());
            let (shares, bundle_text) = kek_and_backup(&service, &officers, 1).await;
            // A second backup KEK: its shares are of another set.
            let (second, other_shares) = officers
                .run(&kek_script("kek-2", "second-kek", false))
                .await
                .unwrap();
            assert_eq!(state(&second), CeremonyState::Completed);

            let script = restore_script("drill-mixed", &bundle_text, true);
            let name = officers.start("alice", &script, &bundle_text).await.unwrap().name;
            officers.sign_in("alice", &name, &script).await.unwrap();
            officers.sign_in("bob", &name, &script).await.unwrap();
            // K-1 good shares: the drill waits; nothing is unwrapped.
            let waiting = officers.submit_share("alice", &name, &shares["alice"]).await.unwrap();
            assert_eq!(state(&waiting), CeremonyState::AwaitingShares);
            // A share of the other set is refused before it is kept.
            let err = officers
                .submit_share("bob", &name, &other_shares["bob"])
                .await
                .unwrap_err();
            assert_eq!(reason(&err), "WRONG_SHARE_SET");
            // Every character of bob's share changed (hex digits to another
            // digit, separators to a digit): each copy is refused.
            let good = shares["bob"].trim();
            let mut refused = 0;
            for (i, c) in good.char_indices() {
                let replacement = match c.to_digit(16) {
                    Some(d) => std::char::from_digit((d + 1) % 16, 16).unwrap(),
                    None => '0',
                };
                let mut mangled = good.to_string();
                mangled.replace_range(i..i + 1, &replacement.to_string());
                let err = officers.submit_share("bob", &name, &mangled).await.unwrap_err();
                assert_eq!(err.code(), tonic::Code::InvalidArgument, "{mangled}: {err}");
                refused += 1;
            }
            assert_eq!(refused, good.len());
            println!("{refused} of {} altered shares refused at submission", good.len());
            let still = officers.get("alice", &name).await.unwrap();
            assert_eq!(still.shares_submitted, ["alice"]);
            // The officers give up: the drill ends with nothing verified.
            let aborted = CeremonyServiceClient::new(channels["bob"].clone())
                .abort_ceremony(AbortCeremonyRequest {
                    name: name.clone(),
                    reason: "a custodian is missing".into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(state(&aborted), CeremonyState::Aborted);
            assert!(aborted.restore.is_none());
        });
    }
);

/// `root_script` with `policy` (`[key.policy.*]` tables) after its `[key]`.
fn root_script_with_policy(id: &str, key: &str, policy: &str) -> String {
    format!("{}{policy}", root_script(id, key, false))
}

token_test!(
    fn a_declared_key_policy_is_what_the_key_gets_and_strangers_are_refused_at_start(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let channels = service.officer_channels().await;
            let officers = Officers::new(&service.officers, channels.clone());

            // Mallory is no officer: the policy could name anyone.
            let stranger = root_script_with_policy(
                "root-stranger",
                "root-ca",
                "[key.policy.SIGN]\nofficers = [\"alice\", \"bob\", \"mallory\"]\nrequired = 2\n",
            );
            let refused = officers.start("alice", &stranger, "").await.unwrap_err();
            assert_eq!(reason(&refused), "BAD_POLICY", "{refused}");
            assert!(
                refused.message().contains("key.policy.SIGN: mallory is not an enrolled officer"),
                "{refused}"
            );

            // Stricter than the administrative 2 of 3 on SIGN; the rest left
            // to the administrative quorum.
            let script = root_script_with_policy(
                "root-strict",
                "root-ca",
                "[key.policy.SIGN]\nofficers = [\"alice\", \"bob\", \"carol\"]\nrequired = 3\n",
            );
            let (done, _) = officers.run(&script).await.unwrap();
            assert_eq!(state(&done), CeremonyState::Completed, "{}", done.error);
            let key = KeyServiceClient::new(service.client("operator").await)
                .get_key(GetKeyRequest { name: "keys/root-ca".into() })
                .await
                .unwrap()
                .into_inner();
            let policies: Vec<(&str, u32)> = key
                .policies
                .iter()
                .map(|p| (p.operation.as_str(), p.required))
                .collect();
            assert_eq!(
                policies,
                [("ROTATE", 2), ("SET_POLICY", 2), ("SET_STATE", 2), ("SIGN", 3)]
            );
            let transcript = transcript_is_sound(&service, &channels["alice"], &done.name).await;
            assert!(
                transcript.entries[0].summary.contains(
                    "root-ca will be registered under ROTATE, SET_STATE, SET_POLICY: administrative quorum (2 of 3: alice, bob, carol); SIGN: 3 of 3: alice, bob, carol"
                ),
                "{}",
                transcript.entries[0].summary
            );
        });
    }
);

token_test!(
    fn a_key_policy_weaker_than_the_administrative_quorum_is_refused_at_start(token) {
        runtime().block_on(async {
            // The administrative quorum is 3 of alice, bob, carol here.
            let service = TestService::start_with(token, |config| {
                let genesis = config.dual_control.genesis_file.clone().unwrap();
                let text = std::fs::read_to_string(&genesis).unwrap();
                assert!(text.starts_with("required = 2\n"), "{text}");
                std::fs::write(&genesis, text.replacen("required = 2", "required = 3", 1))
                    .unwrap();
            })
            .await;
            let officers = Officers::new(&service.officers, service.officer_channels().await);
            let weak = root_script_with_policy(
                "root-weak",
                "root-ca",
                "[key.policy.SIGN]\nofficers = [\"alice\", \"bob\", \"carol\"]\nrequired = 2\n",
            )
            .replacen("required = 2", "required = 3", 1);
            let refused = officers.start("alice", &weak, "").await.unwrap_err();
            assert_eq!(reason(&refused), "BAD_POLICY", "{refused}");
            assert!(
                refused
                    .message()
                    .contains("key.policy.SIGN: 2 approvals is weaker than the administrative quorum, which needs 3"),
                "{refused}"
            );
            assert!(service.state().ceremonies.journal.get("root-weak").unwrap().is_none());
        });
    }
);
