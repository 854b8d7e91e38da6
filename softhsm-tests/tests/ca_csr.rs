//! Intermediate ceremonies that certify a PKCS#10 CSR (an issuing CA whose
//! key lives outside custody), on SoftHSM2 through the real gRPC server:
//! the key and CSR are made by `openssl req`, the root is in custody;
//! `openssl verify` accepts root → intermediate and pkilint (no one here
//! wrote it) finds no error. Attacks: CSR bytes swapped after the script
//! was reviewed, a CSR whose self-signature does not verify, a CSR carrying
//! the root's own key, each refused when the ceremony opens (no ceremony,
//! so no HSM call); a CSR asking for extensions gets the script's profile.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::path::Path;

use custody_core::ceremony::transcript::Transcript;
use custody_proto::v1::{Ceremony, GetTranscriptRequest, StartCeremonyRequest};
use sha2::Digest as _;
use softhsm_tests::ceremony::Officers;
use softhsm_tests::pkilint::Pkilint;
use softhsm_tests::service::{TestService, runtime};
use softhsm_tests::{openssl, token_test};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::{FromDer, X509Certificate};

const SUBJECT: &str = "/C=DE/O=Outside Demo/CN=Outside Issuing CA";

/// The reviewed example script, certifying the CSR of SHA-256 `sha256`
/// (the subject lines left out: the subject is the CSR's).
fn csr_script(id: &str, sha256: &[u8]) -> String {
    include_str!("../../deploy/ceremonies/intermediate.toml")
        .replace("\"demo-intermediate-2026\"", &format!("\"{id}\""))
        .replace(
            "key = \"issuing-ca\"\n",
            &format!("csr_sha256 = \"{}\"\n", hex::encode(sha256)),
        )
        .replace("country = \"DE\"\n", "")
        .replace("organization = \"Custody Demo\"\n", "")
        .replace("common_name = \"Custody Demo Issuing CA\"\n", "")
}

/// A key and a CSR for it made by `openssl req` in `dir` (outside custody),
/// with `extra` arguments (`-addext ...`); the CSR file's bytes (PEM).
fn openssl_csr(dir: &Path, name: &str, curve: &str, extra: &[&str]) -> Vec<u8> {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let mut args = vec![
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        curve,
        "-nodes",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        csr.to_str().unwrap(),
        "-subj",
        SUBJECT,
    ];
    args.extend_from_slice(extra);
    openssl(&args, b"");
    std::fs::read(&csr).unwrap()
}

fn der(pem: &[u8]) -> Vec<u8> {
    x509_parser::pem::parse_x509_pem(pem).unwrap().1.contents
}

/// The start of the ceremony of `script`, sending `csr`.
fn opening(script: &str, csr: &[u8]) -> StartCeremonyRequest {
    StartCeremonyRequest {
        script: script.into(),
        bundle: String::new(),
        csr: csr.to_vec(),
        certificate: Vec::new(),
    }
}

async fn start(
    officers: &Officers<'_>,
    script: &str,
    csr: &[u8],
) -> Result<Ceremony, tonic::Status> {
    officers.start_with("alice", opening(script, csr)).await
}

fn certificate(pem: &str) -> Vec<u8> {
    der(pem.as_bytes())
}

token_test!(
    fn a_csr_made_outside_custody_is_certified_by_the_custody_root_and_verifies(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = Officers::new(&service.officers, service.officer_channels().await);
            let root_pem = officers.ca_root().await;
            let dir = token.scratch();
            let csr = openssl_csr(&dir, "issuing", "ec_paramgen_curve:P-256", &[]);
            let sha256 = sha2::Sha256::digest(&csr);
            let script = csr_script("c-csr", &sha256);
            let (waiting, done) = officers.certify_whole(opening(&script, &csr)).await;
            assert!(
                waiting.tbs_summary.iter().any(|l| l == "subject: C=DE, O=Outside Demo, CN=Outside Issuing CA"),
                "{:?}",
                waiting.tbs_summary
            );
            assert!(
                waiting.tbs_summary.iter().any(|l| l.contains(&hex::encode(sha256))),
                "officers see which CSR: {:?}",
                waiting.tbs_summary
            );

            // The certificate's subject and key are the CSR's, byte for byte.
            let intermediate = done.certificate_pem.clone();
            let cert_der = certificate(&intermediate);
            let (_, cert) = X509Certificate::from_der(&cert_der).unwrap();
            let csr_der = der(&csr);
            let (_, request) = X509CertificationRequest::from_der(&csr_der).unwrap();
            let info = &request.certification_request_info;
            assert_eq!(cert.subject().as_raw(), info.subject.as_raw());
            assert_eq!(cert.public_key().raw, info.subject_pki.raw);
            // No custody key holds it: the registry has only the root.
            assert_eq!(service.state().registry.list(None, 10).len(), 1);

            let (root_path, int_path) = (dir.join("root.pem"), dir.join("intermediate.pem"));
            std::fs::write(&root_path, &root_pem).unwrap();
            std::fs::write(&int_path, &intermediate).unwrap();
            let verified = openssl(
                &["verify", "-CAfile", root_path.to_str().unwrap(), int_path.to_str().unwrap()],
                b"",
            );
            assert!(
                String::from_utf8_lossy(&verified).contains("intermediate.pem: OK"),
                "{}",
                String::from_utf8_lossy(&verified)
            );
            let pkilint = Pkilint::new(Path::new(env!("CARGO_TARGET_TMPDIR")))
                .unwrap_or_else(|why| panic!("pkilint (from PyPI) cannot be installed here: {why}"));
            let findings = pkilint.cabf_serverauth("INTERNAL-UNCONSTRAINED-TLS-CA", &int_path);
            for finding in &findings.all {
                eprintln!("pkilint INTERNAL-UNCONSTRAINED-TLS-CA: {finding}");
            }
            assert!(findings.errors.is_empty(), "pkilint errors: {:#?}", findings.errors);

            // The transcript names the CSR by SHA-256 and subject, then
            // carries the certificate; status returns it as well.
            let transcript = officers
                .client("alice")
                .get_transcript(GetTranscriptRequest { name: done.name.clone() })
                .await
                .unwrap()
                .into_inner();
            let transcript = Transcript::from_json(&transcript.json).unwrap();
            let tbs = transcript.entries.iter().find(|e| e.step == "tbs").unwrap();
            assert_eq!(tbs.detail["csr_sha256"], hex::encode(sha256).as_str());
            assert_eq!(tbs.detail["csr_subject"], "C=DE, O=Outside Demo, CN=Outside Issuing CA");
            let certify = transcript.entries.iter().find(|e| e.step == "certify").unwrap();
            assert_eq!(
                certify.detail["certificate_sha256"],
                hex::encode(sha2::Sha256::digest(intermediate.as_bytes())).as_str()
            );
            let status = officers.get("carol", &done.name).await.unwrap();
            assert_eq!(status.certificate_pem, intermediate);
        });
    }
);

token_test!(
    fn a_csr_asking_for_extensions_gets_the_scripts_profile_not_its_own(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = Officers::new(&service.officers, service.officer_channels().await);
            officers.ca_root().await;
            let csr = openssl_csr(
                &token.scratch(),
                "greedy",
                "ec_paramgen_curve:P-256",
                &[
                    "-addext",
                    "basicConstraints=critical,CA:TRUE,pathlen:7",
                    "-addext",
                    "keyUsage=critical,digitalSignature,keyCertSign,cRLSign",
                    "-addext",
                    "extendedKeyUsage=codeSigning",
                    "-addext",
                    "subjectAltName=DNS:attacker.example",
                ],
            );
            let script = csr_script("c-greedy", &sha2::Sha256::digest(&csr));
            let (_, done) = officers.certify_whole(opening(&script, &csr)).await;
            let cert_der = certificate(&done.certificate_pem);
            let (_, cert) = X509Certificate::from_der(&cert_der).unwrap();
            let mut seen = Vec::new();
            for extension in cert.extensions() {
                match extension.parsed_extension() {
                    ParsedExtension::BasicConstraints(b) => {
                        assert!(b.ca);
                        assert_eq!(b.path_len_constraint, Some(0), "the script's pathLen, not 7");
                        seen.push("bc");
                    }
                    ParsedExtension::KeyUsage(k) => {
                        assert!(k.key_cert_sign() && k.crl_sign());
                        assert!(!k.digital_signature(), "the script's keyUsage");
                        seen.push("ku");
                    }
                    ParsedExtension::ExtendedKeyUsage(e) => {
                        assert!(e.server_auth && e.client_auth && !e.code_signing, "the script's EKU");
                        seen.push("eku");
                    }
                    ParsedExtension::SubjectAlternativeName(_) => {
                        panic!("a subjectAltName the CSR asked for was copied")
                    }
                    _ => {}
                }
            }
            seen.sort_unstable();
            assert_eq!(seen, ["bc", "eku", "ku"], "{seen:?}");
        });
    }
);

token_test!(
    fn csr_bytes_swapped_after_review_a_forged_self_signature_or_the_roots_own_key_are_refused_at_open(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = Officers::new(&service.officers, service.officer_channels().await);
            officers.ca_root().await;
            let before = service.audit_len();
            let dir = token.scratch();
            let reviewed = openssl_csr(&dir, "reviewed", "ec_paramgen_curve:P-256", &[]);
            let swapped = openssl_csr(&dir, "swapped", "ec_paramgen_curve:P-256", &[]);
            // The officers reviewed the script naming `reviewed`; another
            // CSR (another key, same subject) is sent.
            let script = csr_script("c-swap", &sha2::Sha256::digest(&reviewed));
            officers.refused_at_open(opening(&script, &swapped), "CSR_MISMATCH").await;
            officers.refused_at_open(opening(&script, b""), "CSR_MISMATCH").await;

            // The subject changed after the key signed the request: the
            // script names these very bytes, but the signature does not
            // cover them.
            let mut forged = der(&reviewed);
            let at = forged
                .windows(b"Outside Issuing CA".len())
                .position(|w| w == b"Outside Issuing CA")
                .unwrap();
            forged[at..at + 18].copy_from_slice(b"Mallory Issuing CA");
            let script = csr_script("c-forged", &sha2::Sha256::digest(&forged));
            officers.refused_at_open(opening(&script, &forged), "CSR_SIGNATURE_INVALID").await;

            // A CSR carrying the root's own public key (P-384, its SPKI put
            // in place of the CSR key's): the root would certify itself.
            let p384 = der(&openssl_csr(&dir, "p384", "ec_paramgen_curve:P-384", &[]));
            let (_, request) = X509CertificationRequest::from_der(&p384).unwrap();
            let own = request.certification_request_info.subject_pki.raw.to_vec();
            let root_spki = hex::decode(
                &service.state().registry.get("root-ca").unwrap().versions[0].public_key_der_hex,
            )
            .unwrap();
            assert_eq!(own.len(), root_spki.len());
            let at = p384.windows(own.len()).position(|w| w == own.as_slice()).unwrap();
            let mut roots = p384.clone();
            roots[at..at + own.len()].copy_from_slice(&root_spki);
            let script = csr_script("c-root-key", &sha2::Sha256::digest(&roots));
            officers.refused_at_open(opening(&script, &roots), "CSR_IS_ISSUER_KEY").await;

            // A CSR sent with a script that certifies a custody key.
            let keyed = include_str!("../../deploy/ceremonies/intermediate.toml")
                .replace("\"demo-intermediate-2026\"", "\"c-keyed\"");
            let operator = service.client("operator").await;
            softhsm_tests::service::create_key(&operator, "issuing-ca", "EC_SIGN_P256_SHA256", None).await;
            officers.refused_at_open(opening(&keyed, &reviewed), "BAD_CSR").await;
            // Each refusal is in the audit log, once (threat model D4, R4).
            assert_eq!(
                service.outcomes_since(before, "StartCeremony"),
                ["CSR_MISMATCH", "CSR_MISMATCH", "CSR_SIGNATURE_INVALID", "CSR_IS_ISSUER_KEY", "BAD_CSR"]
            );
            // The reviewed CSR itself opens.
            let script = csr_script("c-good", &sha2::Sha256::digest(&reviewed));
            start(&officers, &script, &reviewed).await.unwrap();
        });
    }
);
