#![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384};
use x509_parser::prelude::FromDer;

use super::*;
use crate::ceremony::certificate::root_params;
use crate::ceremony::script::{CertificateSection, Kind, Script};

fn section(common_name: &str, validity_days: u32) -> CertificateSection {
    CertificateSection {
        country: "DE".into(),
        organization: "Example Corp".into(),
        common_name: common_name.into(),
        validity_days,
    }
}

/// A software root, as a root-key ceremony makes it (SKI method, profile).
fn root() -> (KeyPair, IssuerCertificate) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let mut params = root_params(&section("Example Root CA", 3650), "t").unwrap();
    params.key_identifier_method = KeyIdMethod::PreSpecified(key_identifier(
        &subject_public_key(&key.subject_public_key_info()).unwrap(),
    ));
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x42; 16]));
    let cert = params.self_signed(&key).unwrap();
    let issuer = issuer_certificate(&cert.pem()).unwrap();
    (key, issuer)
}

fn example_profile() -> ProfileSection {
    let script = Script::parse(crate::ceremony::script::INTERMEDIATE_EXAMPLE).unwrap();
    let Kind::Intermediate { profile, .. } = script.kind() else {
        panic!("not an intermediate script");
    };
    profile.clone()
}

fn prepared(root_key: &KeyPair, root: &IssuerCertificate, days: u32) -> Result<Prepared, Error> {
    let subject = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let profile = example_profile();
    let mut params = intermediate_params(
        &section("Example Issuing CA", days),
        &profile,
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x51; 16]));
    // A P-384 root certifies a P-256 key, as in the demo.
    let keys = Keys {
        issuer_algorithm: KeyAlgorithm::EcSignP384Sha384,
        issuer_spki: &root_key.subject_public_key_info(),
        subject_algorithm: KeyAlgorithm::EcSignP256Sha256,
        subject_spki: &subject.subject_public_key_info(),
        subject_key_id: None,
    };
    let prepared = prepare(root, &keys, &params, &profile, days)?;
    let (_, tbs) = x509_parser::certificate::TbsCertificate::from_der(&prepared.tbs).unwrap();
    assert_eq!(
        tbs.subject_pki.raw,
        subject.subject_public_key_info().as_slice()
    );
    Ok(prepared)
}

#[test]
fn the_prepared_tbs_passes_the_lint_and_the_assembled_certificate_verifies_under_the_root() {
    let (root_key, root) = root();
    let prepared = prepared(&root_key, &root, 1825).unwrap();
    // What the HSM would do: sign the TBS with the root's key.
    let signature = root_key.sign(&prepared.tbs).unwrap();
    let der = assemble(&prepared, &signature).unwrap();
    let root_spki = root_key.subject_public_key_info();
    crate::ceremony::certificate::verify(&der, &root_spki).unwrap();
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der).unwrap();
    assert_eq!(cert.issuer().as_raw(), root.subject.as_slice());
    assert_eq!(cert.tbs_certificate.as_ref(), prepared.tbs.as_slice());
    let summary = summary(&prepared.tbs).join("\n");
    for expected in [
        "subject: C=DE, O=Example Corp, CN=Example Issuing CA",
        "basicConstraints cA=true pathLen=0 (critical)",
        "certificatePolicies 2.23.140.1.2.1",
        &format!("authorityKeyIdentifier {}", hex::encode(&root.key_id)),
    ] {
        assert!(summary.contains(expected), "{expected} not in:\n{summary}");
    }
    assert!(
        pem(&der)
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----\n")
    );
}

#[test]
fn an_intermediate_that_would_outlive_its_root_is_refused_by_the_validity_rule() {
    let (root_key, root) = root();
    let error = prepared(&root_key, &root, 3651).unwrap_err();
    assert_eq!(error.reason, Reason::CertificateLint);
    assert!(
        error.message.contains("lint rule validity"),
        "{}",
        error.message
    );
}

#[test]
fn a_signature_over_other_bytes_does_not_verify_and_a_changed_tbs_is_not_signed() {
    let (root_key, root) = root();
    let prepared = prepared(&root_key, &root, 30).unwrap();
    let other = root_key.sign(b"something else").unwrap();
    let der = assemble(&prepared, &other).unwrap();
    let error = crate::ceremony::certificate::verify(&der, &root_key.subject_public_key_info())
        .unwrap_err();
    assert_eq!(error.reason, Reason::CertificateUnverified);
}
