//! Intermediate ceremonies on SoftHSM2, through the real gRPC server with
//! real mTLS: a custody root certifies another custody key's public key
//! once the quorum confirmed the TBS's SHA-256; pkilint (no one here wrote
//! it) finds no error in the subordinate CA certificate, `openssl verify`
//! accepts root → intermediate → a leaf the issuing key signed through the
//! Sign RPC; a certificate that breaks a lint rule never reaches the
//! confirmation, hence never the HSM; fewer officers than the quorum, or a
//! script naming another key, do not get the root to certify.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::cell::RefCell;

use custody_core::ceremony::intermediate::{Prepared, assemble, pem, signature_algorithm_of};
use custody_core::ceremony::transcript::Transcript;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::{CeremonyState, GetKeyRequest, GetTranscriptRequest};
use rcgen::{PublicKeyData, SignatureAlgorithm, SigningKey};
use sha2::Digest as _;
use softhsm_tests::ceremony::{Officers, root_script};
use softhsm_tests::pkilint::Pkilint;
use softhsm_tests::service::{TestService, create_key, reason, runtime, sign_sha256};
use softhsm_tests::{openssl, token_test};
use x509_parser::prelude::{FromDer, X509Certificate};

fn pkilint() -> Pkilint {
    Pkilint::new(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")))
        .unwrap_or_else(|why| panic!("pkilint (from PyPI) cannot be installed here: {why}"))
}

/// The reviewed example script, its id, issuer, key and validity replaced.
fn intermediate_script(id: &str, issuer: &str, key: &str, days: u32) -> String {
    include_str!("../../deploy/ceremonies/intermediate.toml")
        .replace("\"demo-intermediate-2026\"", &format!("\"{id}\""))
        .replace("issuer = \"root-ca\"", &format!("issuer = \"{issuer}\""))
        .replace("key = \"issuing-ca\"", &format!("key = \"{key}\""))
        .replace("validity_days = 1825", &format!("validity_days = {days}"))
}

/// A root (EC P-384, with a 3650-day root certificate) and an issuing key
/// made with CreateKey (EC P-256), as in the demo.
async fn root_and_issuing(service: &TestService, officers: &Officers<'_>) {
    officers.ca_root().await;
    let operator = service.client("operator").await;
    create_key(&operator, "issuing-ca", "EC_SIGN_P256_SHA256", None).await;
}

/// What rcgen asks a signer to sign, kept, and nothing signed.
struct Recorder {
    spki_bits: Vec<u8>,
    asked: RefCell<Option<Vec<u8>>>,
}

impl PublicKeyData for Recorder {
    fn der_bytes(&self) -> &[u8] {
        &self.spki_bits
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl SigningKey for Recorder {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        *self.asked.borrow_mut() = Some(message.to_vec());
        Ok(Vec::new())
    }
}

/// A TLS leaf for `leaf.example` issued by the intermediate `issuer_pem`,
/// its TBS signed by `issuing-ca` through the Sign RPC as `ca-issuing`.
async fn leaf(service: &TestService, issuer_pem: &str, issuer_spki: &[u8]) -> String {
    let (_, issuer_pem) = x509_parser::pem::parse_x509_pem(issuer_pem.as_bytes()).unwrap();
    let issuer_der = issuer_pem.contents;
    let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(issuer_spki).unwrap();
    let bits = info.subject_public_key.data.to_vec();
    let recorder = Recorder {
        spki_bits: bits,
        asked: RefCell::new(None),
    };
    let (tbs, algorithm) = {
        let issuer =
            rcgen::Issuer::from_ca_cert_der(&issuer_der.as_slice().into(), &recorder).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["leaf.example".to_string()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.use_authority_key_identifier_extension = true;
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x41; 16]));
        let subject = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let built = params.signed_by(&subject, &issuer).unwrap();
        let algorithm = signature_algorithm_of(built.der()).unwrap();
        (recorder.asked.take().unwrap(), algorithm)
    };
    let ca = service.client("ca-issuing").await;
    let signature = sign_sha256(&ca, "issuing-ca", &tbs).await.unwrap();
    let prepared = Prepared {
        tbs_sha256: sha2::Sha256::digest(&tbs).into(),
        tbs,
        signature_algorithm: algorithm,
    };
    pem(&assemble(&prepared, &signature).unwrap()).unwrap()
}

token_test!(
    fn an_intermediate_ceremony_certifies_a_custody_key_under_the_root_and_a_leaf_verifies(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = Officers::new(&service.officers, service.officer_channels().await);
            root_and_issuing(&service, &officers).await;
            let script = intermediate_script("c-int", "root-ca", "issuing-ca", 1825);
            let opened = officers.start("alice", &script, "").await.unwrap();
            officers.sign_in("alice", &opened.name, &script).await.unwrap();
            let waiting = officers.sign_in("bob", &opened.name, &script).await.unwrap();
            assert_eq!(waiting.state, CeremonyState::AwaitingConfirmation as i32, "{}", waiting.error);
            // What officers confirm is the TBS's SHA-256, recomputable from
            // the TBS they are shown; nothing is signed yet.
            let fingerprint = waiting.fingerprint.clone().unwrap().value;
            assert_eq!(fingerprint, sha2::Sha256::digest(&waiting.tbs_der).to_vec());
            assert!(waiting.certificate_pem.is_empty());
            assert!(
                waiting.tbs_summary.iter().any(|l| l == "subject: C=DE, O=Custody Demo, CN=Custody Demo Issuing CA"),
                "{:?}",
                waiting.tbs_summary
            );
            officers.confirm("alice", &opened.name, &script, &fingerprint).await.unwrap();
            let done = officers.confirm("bob", &opened.name, &script, &fingerprint).await.unwrap();
            assert_eq!(done.state, CeremonyState::Completed as i32, "{}", done.error);

            let intermediate = done.certificate_pem.clone();
            let (_, parsed) = x509_parser::pem::parse_x509_pem(intermediate.as_bytes()).unwrap();
            let (_, cert) = X509Certificate::from_der(&parsed.contents).unwrap();
            assert_eq!(cert.tbs_certificate.as_ref(), waiting.tbs_der.as_slice(), "the HSM signed the confirmed TBS");
            // It certifies issuing-ca's public key, exactly as custody holds it.
            let issuing_spki = hex::decode(
                &service.state().registry.get("issuing-ca").unwrap().versions[0].public_key_der_hex,
            )
            .unwrap();
            assert_eq!(cert.public_key().raw, issuing_spki.as_slice());

            // The chain is stored with issuing-ca's version: the CA reads it.
            let ca = service.client("ca-issuing").await;
            let root_key = KeyServiceClient::new(ca.clone())
                .get_key(GetKeyRequest { name: "keys/root-ca".into() })
                .await
                .unwrap()
                .into_inner();
            let root = root_key.versions[0].certificate_chain_pem[0].clone();
            let issuing = KeyServiceClient::new(ca)
                .get_key(GetKeyRequest { name: "keys/issuing-ca".into() })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(issuing.versions[0].certificate_chain_pem, vec![intermediate.clone(), root.clone()]);

            let dir = token.scratch();
            let (root_path, int_path, leaf_path) =
                (dir.join("root.pem"), dir.join("intermediate.pem"), dir.join("leaf.pem"));
            std::fs::write(&root_path, &root).unwrap();
            std::fs::write(&int_path, &intermediate).unwrap();
            let findings = pkilint().cabf_serverauth("INTERNAL-UNCONSTRAINED-TLS-CA", &int_path);
            for finding in &findings.all {
                eprintln!("pkilint INTERNAL-UNCONSTRAINED-TLS-CA: {finding}");
            }
            assert!(findings.errors.is_empty(), "pkilint errors: {:#?}", findings.errors);

            let leaf = leaf(&service, &intermediate, &issuing_spki).await;
            std::fs::write(&leaf_path, &leaf).unwrap();
            let verified = openssl(
                &[
                    "verify",
                    "-CAfile",
                    root_path.to_str().unwrap(),
                    "-untrusted",
                    int_path.to_str().unwrap(),
                    leaf_path.to_str().unwrap(),
                ],
                b"",
            );
            assert!(String::from_utf8_lossy(&verified).contains("leaf.pem: OK"), "{}", String::from_utf8_lossy(&verified));

            // The transcript carries the TBS digest and the lint's result,
            // then the signature over that very TBS.
            let transcript = officers
                .client("alice")
                .get_transcript(GetTranscriptRequest { name: done.name.clone() })
                .await
                .unwrap()
                .into_inner();
            let transcript = Transcript::from_json(&transcript.json).unwrap();
            let tbs_sha256 = hex::encode(sha2::Sha256::digest(cert.tbs_certificate.as_ref()));
            let tbs = transcript.entries.iter().find(|e| e.step == "tbs").unwrap();
            assert_eq!(tbs.detail["tbs_sha256"], tbs_sha256.as_str());
            assert!(tbs.detail["lint"].as_str().unwrap().starts_with("passed: encoding,"));
            let certify = transcript.entries.iter().find(|e| e.step == "certify").unwrap();
            assert_eq!(certify.detail["tbs_sha256"], tbs_sha256.as_str());
            let steps: Vec<&str> = transcript.entries.iter().map(|e| e.step.as_str()).collect();
            let at = |step: &str| steps.iter().rposition(|s| *s == step).unwrap();
            assert!(at("confirm") < at("certify"), "signed only after the confirmations: {steps:?}");
        });
    }
);

token_test!(
    fn an_intermediate_that_breaks_a_lint_rule_stops_before_the_confirmation_and_the_hsm(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = Officers::new(&service.officers, service.officer_channels().await);
            root_and_issuing(&service, &officers).await;
            // Valid as a script; but it would outlive the root (3650 days):
            // the validity rule, checked against the root's notAfter.
            let script = intermediate_script("c-long", "root-ca", "issuing-ca", 3651);
            let opened = officers.start("alice", &script, "").await.unwrap();
            officers.sign_in("alice", &opened.name, &script).await.unwrap();
            let after = officers.sign_in("bob", &opened.name, &script).await.unwrap();
            assert_eq!(after.state, CeremonyState::RolledBack as i32, "{after:?}");
            assert!(after.error.contains("lint rule validity "), "{}", after.error);
            assert!(after.error.contains("past the issuer's notAfter"), "{}", after.error);
            assert!(after.tbs_der.is_empty() && after.fingerprint.is_none());
            // Nothing to confirm, so nothing the HSM could be asked to sign.
            let refused = officers.confirm("alice", &opened.name, &script, &[0; 32]).await.unwrap_err();
            assert_eq!(reason(&refused), "NOT_CONFIRMING");
            let key = service.state().registry.get("issuing-ca").unwrap();
            assert!(key.versions[0].certificate_chain_pem.is_empty());
            let transcript = officers
                .client("alice")
                .get_transcript(GetTranscriptRequest { name: opened.name.clone() })
                .await
                .unwrap()
                .into_inner();
            let transcript = Transcript::from_json(&transcript.json).unwrap();
            assert!(!transcript.entries.iter().any(|e| e.step == "certify"));
        });
    }
);

token_test!(
    fn fewer_officers_than_the_quorum_or_a_script_naming_another_key_do_not_get_the_root_to_certify(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = Officers::new(&service.officers, service.officer_channels().await);
            root_and_issuing(&service, &officers).await;
            let operator = service.client("operator").await;
            create_key(&operator, "other-ca", "EC_SIGN_P256_SHA256", None).await;
            let script = intermediate_script("c-attack", "root-ca", "issuing-ca", 365);
            let opened = officers.start("alice", &script, "").await.unwrap();
            let once = officers.sign_in("alice", &opened.name, &script).await.unwrap();
            assert_eq!(once.state, CeremonyState::AwaitingOfficers as i32);
            // alice signs in twice: still one officer, no TBS.
            let twice = officers.sign_in("alice", &opened.name, &script).await.unwrap_err();
            assert_eq!(reason(&twice), "ALREADY_PRESENT");
            let still = officers.get("alice", &opened.name).await.unwrap();
            assert!(still.tbs_der.is_empty() && still.fingerprint.is_none());

            // Quorum met; then alice confirms twice, and carol (not signed
            // in) confirms: no certificate, the ceremony waits for bob.
            let waiting = officers.sign_in("bob", &opened.name, &script).await.unwrap();
            let fingerprint = waiting.fingerprint.unwrap().value;
            officers.confirm("alice", &opened.name, &script, &fingerprint).await.unwrap();
            let again = officers.confirm("alice", &opened.name, &script, &fingerprint).await.unwrap_err();
            assert_eq!(reason(&again), "ALREADY_CONFIRMED");
            let outsider = officers.confirm("carol", &opened.name, &script, &fingerprint).await.unwrap_err();
            assert_eq!(reason(&outsider), "NOT_PRESENT");
            // bob confirming another digest (another TBS) does not count.
            let mut other = fingerprint.clone();
            other[0] ^= 1;
            let wrong = officers.confirm("bob", &opened.name, &script, &other).await.unwrap_err();
            assert_eq!(reason(&wrong), "BAD_SIGNATURE");
            let pending = officers.get("alice", &opened.name).await.unwrap();
            assert_eq!(pending.state, CeremonyState::AwaitingConfirmation as i32);
            assert!(pending.certificate_pem.is_empty());
            let key = service.state().registry.get("issuing-ca").unwrap();
            assert!(key.versions[0].certificate_chain_pem.is_empty());

            // The certificate is for the key the script names and no other:
            // other-ca was never named, and holds no chain.
            let done = officers.confirm("bob", &opened.name, &script, &fingerprint).await.unwrap();
            assert_eq!(done.state, CeremonyState::Completed as i32, "{}", done.error);
            let other_key = service.state().registry.get("other-ca").unwrap();
            assert!(other_key.versions[0].certificate_chain_pem.is_empty());
            let issuing = service.state().registry.get("issuing-ca").unwrap();
            let (_, parsed) = x509_parser::pem::parse_x509_pem(done.certificate_pem.as_bytes()).unwrap();
            let (_, cert) = X509Certificate::from_der(&parsed.contents).unwrap();
            assert_eq!(hex::encode(cert.public_key().raw), issuing.versions[0].public_key_der_hex);

            // A root without a root certificate does not certify; nor does a
            // quorum weaker than the root's SIGN policy (3 of 3 here).
            officers.run(&root_script("c-bare", "bare-root", false)).await.unwrap();
            let bare = officers
                .start("alice", &intermediate_script("c-bare-int", "bare-root", "other-ca", 30), "")
                .await
                .unwrap_err();
            assert_eq!(reason(&bare), "NO_ISSUER_CERTIFICATE");
            let strict = root_script("c-strict", "strict-root", true).replace(
                "signers = [\"ca-issuing\"]\n",
                "signers = [\"ca-issuing\"]\n[key.policy.SIGN]\nofficers = [\"alice\", \"bob\", \"carol\"]\nrequired = 3\n",
            );
            officers.run(&strict).await.unwrap();
            let weak = officers
                .start("alice", &intermediate_script("c-weak", "strict-root", "other-ca", 10), "")
                .await
                .unwrap_err();
            assert_eq!(reason(&weak), "BAD_SCRIPT", "{weak:?}");
            assert!(weak.message().contains("SIGN policy needs 3"), "{}", weak.message());
        });
    }
);

/// A direct Sign of SHA-256(`message`) with `key_id` as `ca-issuing`: the
/// version that signed, and the signature.
async fn sign_naming(
    ca: &tonic::transport::Channel,
    name: &str,
    message: &[u8],
) -> Result<(String, Vec<u8>), tonic::Status> {
    use custody_proto::v1::signing_service_client::SigningServiceClient;
    use custody_proto::v1::{Digest, SignRequest, digest, sign_request};
    SigningServiceClient::new(ca.clone())
        .sign(SignRequest {
            name: name.into(),
            input: Some(sign_request::Input::Digest(Digest {
                digest: Some(digest::Digest::Sha256(
                    sha2::Sha256::digest(message).to_vec(),
                )),
            })),
            ..Default::default()
        })
        .await
        .map(|r| {
            let r = r.into_inner();
            (r.name, r.signature)
        })
}

token_test!(
    fn a_staged_version_is_certified_while_the_current_one_signs_and_is_promoted_only_under_the_rotate_and_set_state_quorum(token) {
        use custody_proto::v1::{KeyVersionState, OperationKind, OperationState, SetKeyVersionStateRequest, SetStateSpec, operation_spec};
        use softhsm_tests::service::request_operation;
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = Officers::new(&service.officers, service.officer_channels().await);
            root_and_issuing(&service, &officers).await;
            let operator = service.client("operator").await;
            // issuing-ca: SET_STATE needs 2 of 3, ROTATE all 3.
            service.gate("issuing-ca", OperationKind::SetState).await;
            service.set_policy("issuing-ca", OperationKind::Rotate, 3, ["alice", "bob"]).await;

            // Staging makes a version rotation would: 2 officers, fewer
            // than issuing-ca's ROTATE policy, do not get one made.
            let staging = intermediate_script("c-stage", "root-ca", "issuing-ca", 1825)
                .replace("key = \"issuing-ca\"\n", "key = \"issuing-ca\"\nstage = true\n");
            let weak = officers.start("alice", &staging, "").await.unwrap_err();
            assert_eq!(reason(&weak), "BAD_SCRIPT", "{weak:?}");
            assert!(weak.message().contains("ROTATE policy needs 3"), "{}", weak.message());
            assert_eq!(service.state().registry.get("issuing-ca").unwrap().versions.len(), 1);

            let staging = staging.replace("required = 2", "required = 3");
            let opened = officers.start("alice", &staging, "").await.unwrap();
            for officer in ["alice", "bob"] {
                officers.sign_in(officer, &opened.name, &staging).await.unwrap();
            }
            let waiting = officers.sign_in("carol", &opened.name, &staging).await.unwrap();
            assert_eq!(waiting.state, CeremonyState::AwaitingConfirmation as i32, "{}", waiting.error);
            // v2 is staged: pre-activation, not primary; v1 keeps signing,
            // and v2 signs nothing, even named.
            let ca = service.client("ca-issuing").await;
            let keys = |c: &tonic::transport::Channel| KeyServiceClient::new(c.clone());
            let staged = keys(&ca).get_key(GetKeyRequest { name: "keys/issuing-ca".into() }).await.unwrap().into_inner();
            assert_eq!(staged.primary_version, 1);
            assert_eq!(staged.versions.len(), 2);
            assert_eq!(staged.versions[1].state, KeyVersionState::PreActivation as i32);
            let (signer, _) = sign_naming(&ca, "keys/issuing-ca", b"during staging").await.unwrap();
            assert_eq!(signer, "keys/issuing-ca/versions/1");
            let refused = sign_naming(&ca, "keys/issuing-ca/versions/2", b"too early").await.unwrap_err();
            assert_eq!(reason(&refused), "VERSION_NOT_ACTIVE", "{refused:?}");

            let fingerprint = waiting.fingerprint.clone().unwrap().value;
            for officer in ["alice", "bob"] {
                officers.confirm(officer, &opened.name, &staging, &fingerprint).await.unwrap();
            }
            let done = officers.confirm("carol", &opened.name, &staging, &fingerprint).await.unwrap();
            assert_eq!(done.state, CeremonyState::Completed as i32, "{}", done.error);
            let intermediate = done.certificate_pem.clone();
            let (_, parsed) = x509_parser::pem::parse_x509_pem(intermediate.as_bytes()).unwrap();
            let (_, cert) = X509Certificate::from_der(&parsed.contents).unwrap();
            let key = keys(&ca).get_key(GetKeyRequest { name: "keys/issuing-ca".into() }).await.unwrap().into_inner();
            let root = keys(&ca).get_key(GetKeyRequest { name: "keys/root-ca".into() }).await.unwrap().into_inner().versions[0].certificate_chain_pem[0].clone();
            // The chain is on the staged version, which the certificate names.
            assert_eq!(key.versions[1].certificate_chain_pem, vec![intermediate.clone(), root.clone()]);
            assert!(key.versions[0].certificate_chain_pem.is_empty());
            let v2_spki = hex::decode(&service.state().registry.get("issuing-ca").unwrap().versions[1].public_key_der_hex).unwrap();
            assert_eq!(cert.public_key().raw, v2_spki.as_slice());
            assert_eq!(key.primary_version, 1);
            let (signer, _) = sign_naming(&ca, "keys/issuing-ca", b"after the ceremony").await.unwrap();
            assert_eq!(signer, "keys/issuing-ca/versions/1");

            // Promotion is not cheaper than a rotation: no direct call, and
            // an approved SET_STATE needs the 3 of ROTATE, not SET_STATE's 2.
            let direct = keys(&operator)
                .set_key_version_state(SetKeyVersionStateRequest {
                    name: "keys/issuing-ca/versions/2".into(),
                    state: KeyVersionState::Active as i32,
                    reason: String::new(),
                })
                .await
                .unwrap_err();
            assert_eq!(reason(&direct), "QUORUM_REQUIRED", "{direct:?}");
            let promote = request_operation(
                &operator,
                operation_spec::Spec::SetState(SetStateSpec {
                    name: "keys/issuing-ca/versions/2".into(),
                    state: KeyVersionState::Active as i32,
                    reason: String::new(),
                }),
            )
            .await
            .unwrap();
            assert_eq!(promote.required, 3);
            service.approve("alice", &promote).await.unwrap();
            let two = service.approve("bob", &promote).await.unwrap();
            assert_eq!(two.state, OperationState::Pending as i32, "{}", two.error);
            let (signer, _) = sign_naming(&ca, "keys/issuing-ca", b"two approvals").await.unwrap();
            assert_eq!(signer, "keys/issuing-ca/versions/1");
            let record = service.state().registry.get("issuing-ca").unwrap();
            assert_eq!((record.primary_version, record.versions[1].state), (1, custody_core::registry::VersionState::PreActivation));

            let three = service.approve("carol", &promote).await.unwrap();
            assert_eq!(three.state, OperationState::Succeeded as i32, "{}", three.error);
            let (signer, _) = sign_naming(&ca, "keys/issuing-ca", b"promoted").await.unwrap();
            assert_eq!(signer, "keys/issuing-ca/versions/2");

            // The new version's leaf verifies under the staged chain.
            let dir = token.scratch();
            let (root_path, int_path, leaf_path) =
                (dir.join("root.pem"), dir.join("staged.pem"), dir.join("leaf.pem"));
            std::fs::write(&root_path, &root).unwrap();
            std::fs::write(&int_path, &intermediate).unwrap();
            let leaf = leaf(&service, &intermediate, &v2_spki).await;
            std::fs::write(&leaf_path, &leaf).unwrap();
            let verified = openssl(
                &["verify", "-CAfile", root_path.to_str().unwrap(), "-untrusted", int_path.to_str().unwrap(), leaf_path.to_str().unwrap()],
                b"",
            );
            assert!(String::from_utf8_lossy(&verified).contains("leaf.pem: OK"), "{}", String::from_utf8_lossy(&verified));
        });
    }
);
