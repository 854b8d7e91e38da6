//! Cross-sign ceremonies, on SoftHSM2 through the real gRPC server: an
//! outside CA (its key and self-signed certificate made by `openssl req`)
//! is re-issued under the custody root; `openssl verify` accepts root →
//! cross-certificate, and a leaf the outside CA issued through it; pkilint
//! (no one here wrote it) finds no error. Attacks: certificate bytes
//! swapped after the script was reviewed, a certificate that is not a CA's,
//! the custody root's own certificate, each refused when the ceremony opens
//! (no ceremony, so nothing asked of the HSM).

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
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::{FromDer, X509Certificate};

const SUBJECT: &str = "/C=DE/O=Partner Demo/CN=Partner Root CA";

/// The reviewed example script, cross-signing the certificate of SHA-256
/// `sha256`.
fn cross_script(id: &str, sha256: &[u8]) -> String {
    include_str!("../../deploy/ceremonies/cross-sign.toml")
        .replace("\"demo-cross-sign-2026\"", &format!("\"{id}\""))
        .replace(&"0".repeat(64), &hex::encode(sha256))
}

/// A key and a self-signed certificate for it made by `openssl req -x509`
/// in `dir` (outside custody), with `extra` arguments; the certificate
/// file's bytes (PEM).
fn openssl_ca(dir: &Path, name: &str, extra: &[&str]) -> Vec<u8> {
    let key = dir.join(format!("{name}.key"));
    let pem = dir.join(format!("{name}.pem"));
    let mut args = vec![
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        pem.to_str().unwrap(),
        "-days",
        "3650",
        "-subj",
        SUBJECT,
    ];
    args.extend_from_slice(extra);
    openssl(&args, b"");
    std::fs::read(&pem).unwrap()
}

/// What someone without `victim`'s key can make of its CA certificate: a
/// self-issued CA certificate with its subject and public key, signed with
/// a key of their own (`openssl x509 -new -force_pubkey`).
fn openssl_forged(dir: &Path, victim: &[u8]) -> Vec<u8> {
    let victim_pem = dir.join("forged-victim.pem");
    std::fs::write(&victim_pem, victim).unwrap();
    let victim_pub = openssl(
        &[
            "x509",
            "-in",
            victim_pem.to_str().unwrap(),
            "-pubkey",
            "-noout",
        ],
        b"",
    );
    let victim_pub_path = dir.join("forged-victim.pub");
    std::fs::write(&victim_pub_path, victim_pub).unwrap();
    let own_key = dir.join("forger.key");
    std::fs::write(&own_key, softhsm_tests::openssl_p256_key()).unwrap();
    let extensions = dir.join("forged.ext");
    std::fs::write(
        &extensions,
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n",
    )
    .unwrap();
    let forged = dir.join("forged.pem");
    openssl(
        &[
            "x509",
            "-new",
            "-subj",
            SUBJECT,
            "-key",
            own_key.to_str().unwrap(),
            "-force_pubkey",
            victim_pub_path.to_str().unwrap(),
            "-extfile",
            extensions.to_str().unwrap(),
            "-days",
            "3650",
            "-out",
            forged.to_str().unwrap(),
        ],
        b"",
    );
    std::fs::read(&forged).unwrap()
}

const CA: &[&str] = &[
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign,cRLSign",
];

fn der(pem: &[u8]) -> Vec<u8> {
    x509_parser::pem::parse_x509_pem(pem).unwrap().1.contents
}

fn subject_key_id(cert: &X509Certificate<'_>) -> Vec<u8> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
        .unwrap()
}

/// The start of the ceremony of `script`, sending `certificate`.
fn opening(script: &str, certificate: &[u8]) -> StartCeremonyRequest {
    StartCeremonyRequest {
        script: script.into(),
        bundle: String::new(),
        csr: Vec::new(),
        certificate: certificate.to_vec(),
    }
}

async fn start(
    officers: &Officers<'_>,
    script: &str,
    certificate: &[u8],
) -> Result<Ceremony, tonic::Status> {
    officers
        .start_with("alice", opening(script, certificate))
        .await
}

fn verify(args: &[&str]) -> String {
    let mut all = vec!["verify"];
    all.extend_from_slice(args);
    String::from_utf8_lossy(&openssl(&all, b"")).into_owned()
}

token_test!(
    fn an_outside_ca_is_cross_signed_by_the_custody_root_and_its_leaves_verify_through_it(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = Officers::new(&service.officers, service.officer_channels().await);
            let root_pem = officers.ca_root().await;
            let dir = token.scratch();
            let partner = openssl_ca(&dir, "partner", CA);
            let sha256 = sha2::Sha256::digest(&partner);
            let script = cross_script("c-cross", &sha256);
            let (waiting, done) = officers.certify_whole(opening(&script, &partner)).await;
            assert!(
                waiting.tbs_summary.iter().any(|l| l == "subject: C=DE, O=Partner Demo, CN=Partner Root CA"),
                "{:?}",
                waiting.tbs_summary
            );
            assert!(
                waiting.tbs_summary.iter().any(|l| l.contains(&hex::encode(sha256))),
                "officers see which certificate: {:?}",
                waiting.tbs_summary
            );

            // Subject, key and SKI are the partner's, byte for byte; the
            // issuer and AKI the root's.
            let cross = done.certificate_pem.clone();
            let cross_der = der(cross.as_bytes());
            let (_, cert) = X509Certificate::from_der(&cross_der).unwrap();
            let partner_der = der(&partner);
            let (_, source) = X509Certificate::from_der(&partner_der).unwrap();
            let root_der = der(root_pem.as_bytes());
            let (_, root_cert) = X509Certificate::from_der(&root_der).unwrap();
            assert_eq!(cert.subject().as_raw(), source.subject().as_raw());
            assert_eq!(cert.public_key().raw, source.public_key().raw);
            assert_eq!(subject_key_id(&cert), subject_key_id(&source));
            assert_eq!(cert.issuer().as_raw(), root_cert.subject().as_raw());
            assert_ne!(cert.serial, source.serial);
            // No custody key holds it: the registry has only the root.
            assert_eq!(service.state().registry.list(None, 10).len(), 1);

            let root_path = dir.join("custody-root.pem");
            let cross_path = dir.join("cross.pem");
            std::fs::write(&root_path, &root_pem).unwrap();
            std::fs::write(&cross_path, &cross).unwrap();
            let (root_file, cross_file) = (root_path.to_str().unwrap(), cross_path.to_str().unwrap());
            let verified = verify(&["-CAfile", root_file, cross_file]);
            assert!(verified.contains("cross.pem: OK"), "{verified}");

            // A leaf the partner CA issues verifies from the custody root
            // through the cross-certificate.
            let leaf_path = dir.join("leaf.pem");
            let leaf_key = dir.join("leaf.key");
            openssl(
                &[
                    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", leaf_key.to_str().unwrap(), "-out", leaf_path.to_str().unwrap(),
                    "-days", "30", "-subj", "/CN=leaf.example",
                    "-CA", dir.join("partner.pem").to_str().unwrap(),
                    "-CAkey", dir.join("partner.key").to_str().unwrap(),
                    "-addext", "basicConstraints=critical,CA:FALSE",
                    "-addext", "subjectAltName=DNS:leaf.example",
                ],
                b"",
            );
            let leaf_file = leaf_path.to_str().unwrap();
            let verified = verify(&["-CAfile", root_file, "-untrusted", cross_file, leaf_file]);
            assert!(verified.contains("leaf.pem: OK"), "{verified}");

            let pkilint = Pkilint::new(Path::new(env!("CARGO_TARGET_TMPDIR")))
                .unwrap_or_else(|why| panic!("pkilint (from PyPI) cannot be installed here: {why}"));
            let findings = pkilint.cabf_serverauth("INTERNAL-CROSS-CA", &cross_path);
            for finding in &findings.all {
                eprintln!("pkilint INTERNAL-CROSS-CA: {finding}");
            }
            assert!(findings.errors.is_empty(), "pkilint errors: {:#?}", findings.errors);

            // The transcript names the certificate by SHA-256 and subject,
            // with the TBS digest and the lint, then carries the
            // cross-certificate; status returns it as well.
            let transcript = officers
                .client("alice")
                .get_transcript(GetTranscriptRequest { name: done.name.clone() })
                .await
                .unwrap()
                .into_inner();
            let transcript = Transcript::from_json(&transcript.json).unwrap();
            assert_eq!(transcript.kind, "cross-sign");
            let tbs = transcript.entries.iter().find(|e| e.step == "tbs").unwrap();
            assert_eq!(tbs.detail["certificate_sha256"], hex::encode(sha256).as_str());
            assert_eq!(tbs.detail["certificate_subject"], "C=DE, O=Partner Demo, CN=Partner Root CA");
            assert_eq!(tbs.detail["certificate_self_signed"], true);
            assert!(tbs.detail["lint"].as_str().unwrap().starts_with("passed"));
            assert!(tbs.detail["tbs_sha256"].is_string());
            let certify = transcript.entries.iter().find(|e| e.step == "certify").unwrap();
            assert_eq!(
                certify.detail["certificate_sha256"],
                hex::encode(sha2::Sha256::digest(cross.as_bytes())).as_str()
            );
            let status = officers.get("carol", &done.name).await.unwrap();
            assert_eq!(status.certificate_pem, cross);
        });
    }
);

token_test!(
    fn certificate_bytes_swapped_after_review_forged_a_non_ca_or_the_roots_own_certificate_are_refused_at_open(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = Officers::new(&service.officers, service.officer_channels().await);
            let root_pem = officers.ca_root().await;
            let before = service.audit_len();
            let dir = token.scratch();
            let reviewed = openssl_ca(&dir, "reviewed", CA);
            let swapped = openssl_ca(&dir, "swapped", CA);
            // The officers reviewed the script naming `reviewed`; another
            // CA certificate (another key, same subject) is sent.
            let script = cross_script("c-swap", &sha2::Sha256::digest(&reviewed));
            officers.refused_at_open(opening(&script, &swapped), "CROSS_SIGN_MISMATCH").await;
            officers.refused_at_open(opening(&script, b""), "CROSS_SIGN_MISMATCH").await;

            // A certificate that is not a CA's: the script names its bytes,
            // but the root would make a CA of an end entity.
            let leaf = openssl_ca(&dir, "leaf", &["-addext", "basicConstraints=critical,CA:FALSE"]);
            let script = cross_script("c-leaf", &sha2::Sha256::digest(&leaf));
            officers.refused_at_open(opening(&script, &leaf), "CROSS_SIGN_NOT_CA").await;

            // The custody root's own certificate: it would cross-sign itself.
            let script = cross_script("c-self", &sha2::Sha256::digest(root_pem.as_bytes()));
            officers.refused_at_open(opening(&script, root_pem.as_bytes()), "CROSS_SIGN_IS_ISSUER_KEY").await;

            // The reviewed partner's subject and key in a certificate the
            // partner never signed (a forger's own signature): the root
            // would vouch for a key its holder never asked it to.
            let forged = openssl_forged(&dir, &reviewed);
            let script = cross_script("c-forged", &sha2::Sha256::digest(&forged));
            officers.refused_at_open(opening(&script, &forged), "CROSS_SIGN_SIGNATURE_INVALID").await;

            // A root signed with a hash custodyd cannot check (ECDSA P-256
            // with SHA-512, outside the Baseline Requirements): possession
            // is not shown either.
            let sha512 = openssl_ca(&dir, "sha512", &[CA, &["-sha512"]].concat());
            let script = cross_script("c-sha512", &sha2::Sha256::digest(&sha512));
            officers.refused_at_open(opening(&script, &sha512), "CROSS_SIGN_SIGNATURE_INVALID").await;

            // Not a certificate at all, named by its digest.
            let junk = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
            let script = cross_script("c-junk", &sha2::Sha256::digest(junk));
            officers.refused_at_open(opening(&script, junk), "BAD_CROSS_SIGN_CERTIFICATE").await;
            // Each refusal is in the audit log, once (threat model D4, R4).
            assert_eq!(
                service.outcomes_since(before, "StartCeremony"),
                [
                    "CROSS_SIGN_MISMATCH",
                    "CROSS_SIGN_MISMATCH",
                    "CROSS_SIGN_NOT_CA",
                    "CROSS_SIGN_IS_ISSUER_KEY",
                    "CROSS_SIGN_SIGNATURE_INVALID",
                    "CROSS_SIGN_SIGNATURE_INVALID",
                    "BAD_CROSS_SIGN_CERTIFICATE",
                ]
            );

            // The reviewed certificate itself opens.
            let script = cross_script("c-good", &sha2::Sha256::digest(&reviewed));
            start(&officers, &script, &reviewed).await.unwrap();
        });
    }
);
