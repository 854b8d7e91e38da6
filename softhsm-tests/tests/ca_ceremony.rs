//! CA ceremonies on SoftHSM2, through the real gRPC server with real mTLS,
//! judged by tools no one here wrote: the root certificate of a root-key
//! ceremony is in the CA/Browser Forum root CA profile (pkilint's
//! `lint_cabf_serverauth_cert -t ROOT-CA` finds no error) and `openssl
//! verify` accepts it.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::collections::BTreeMap;

use sha2::Digest as _;
use softhsm_tests::ceremony::{Officers, root_script};
use softhsm_tests::pkilint::Pkilint;
use softhsm_tests::service::{TestService, runtime};
use softhsm_tests::{openssl, token_test};
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The pkilint venv, made once per target directory; the test fails if it
/// cannot be had (pkilint is the judge here: no skipping it).
fn pkilint() -> Pkilint {
    Pkilint::new(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")))
        .unwrap_or_else(|why| panic!("pkilint (from PyPI) cannot be installed here: {why}"))
}

token_test!(
    fn the_root_certificate_of_a_root_key_ceremony_is_in_the_cabf_root_profile(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let mut channels = BTreeMap::new();
            for officer in ["alice", "bob", "carol"] {
                channels.insert(officer.to_string(), service.client(officer).await);
            }
            let officers = Officers::new(&service.officers, channels);
            // A root CA certificate is valid 2922 to 9132 days under the
            // Baseline Requirements (7.1.2.1.1).
            let script = root_script("root-cabf", "root-ca", true)
                .replace("validity_days = 30", "validity_days = 3650");
            let (done, _) = officers.run(&script).await.unwrap();
            let pem = done.certificate_pem.clone();
            let path = token.scratch().join("root.pem");
            std::fs::write(&path, &pem).unwrap();

            let findings = pkilint().cabf_serverauth("ROOT-CA", &path);
            for finding in &findings.all {
                eprintln!("pkilint ROOT-CA: {finding}");
            }
            assert!(findings.errors.is_empty(), "pkilint errors: {:#?}", findings.errors);

            let verified = openssl(
                &["verify", "-CAfile", path.to_str().unwrap(), path.to_str().unwrap()],
                b"",
            );
            assert!(String::from_utf8_lossy(&verified).contains("OK"));

            // What the profile asks, read back with x509-parser.
            let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
            let (_, cert) = X509Certificate::from_der(&parsed.contents).unwrap();
            let subject: Vec<String> = cert
                .subject()
                .iter_attributes()
                .map(|a| format!("{}={}", a.attr_type(), a.as_str().unwrap()))
                .collect();
            assert_eq!(
                subject,
                ["2.5.4.6=DE", "2.5.4.10=Custody Tests", "2.5.4.3=Test Root CA"],
                "subject C, O, CN in that order"
            );
            assert_eq!(cert.issuer().as_raw(), cert.subject().as_raw());
            let serial = cert.raw_serial();
            assert!(serial[0] & 0x80 == 0, "the serial is positive");
            assert!(serial.len() * 8 >= 72, "at least 64 random bits: {serial:02x?}");
            let mut ski = None;
            let mut aki = None;
            for extension in cert.extensions() {
                match extension.parsed_extension() {
                    ParsedExtension::SubjectKeyIdentifier(id) => ski = Some(id.0.to_vec()),
                    ParsedExtension::AuthorityKeyIdentifier(id) => {
                        aki = id.key_identifier.as_ref().map(|k| k.0.to_vec());
                    }
                    ParsedExtension::BasicConstraints(bc) => {
                        assert!(extension.critical && bc.ca && bc.path_len_constraint.is_none());
                    }
                    ParsedExtension::KeyUsage(usage) => {
                        assert!(extension.critical);
                        assert!(usage.key_cert_sign() && usage.crl_sign());
                    }
                    _ => {}
                }
            }
            // RFC 7093 method 1: SHA-256 of the subjectPublicKey bits, cut
            // to 160.
            let expected = sha2::Sha256::digest(&cert.public_key().subject_public_key.data);
            assert_eq!(ski.as_deref(), Some(&expected[..20]), "SKI present, RFC 7093 method 1");
            assert_eq!(aki, ski, "a root's AKI is its own SKI");
        });
    }
);
