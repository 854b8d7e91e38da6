#![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

use rcgen::{BasicConstraints, CertificateParams, DnType, DnValue, IsCa, KeyPair};
use sha2::{Digest, Sha256};

use super::check;
use crate::Reason;

/// A self-signed certificate (PEM) of a fresh key of `algorithm`, a CA's
/// if `ca`, and its key's SubjectPublicKeyInfo.
fn certificate(algorithm: &'static rcgen::SignatureAlgorithm, ca: bool) -> (String, Vec<u8>) {
    let key = KeyPair::generate_for(algorithm).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CountryName,
        DnValue::PrintableString("DE".try_into().unwrap()),
    );
    params
        .distinguished_name
        .push(DnType::CommonName, "Partner Root CA");
    if ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    let made = params.self_signed(&key).unwrap();
    (
        made.pem(),
        rcgen::PublicKeyData::subject_public_key_info(&key),
    )
}

/// Parameters of a CA certificate whose subject is one common name.
fn ca_named(common_name: impl Into<DnValue>) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[test]
fn a_ca_certificate_whose_bytes_are_the_scripts_gives_its_subject_key_and_key_id() {
    let (pem, spki) = certificate(&rcgen::PKCS_ECDSA_P256_SHA256, true);
    let (_, root) = certificate(&rcgen::PKCS_ECDSA_P384_SHA384, true);
    let checked = check(pem.as_bytes(), &digest(pem.as_bytes()), &root).unwrap();
    assert_eq!(checked.spki, spki);
    assert_eq!(checked.subject, "C=DE, CN=Partner Root CA");
    assert!(checked.key_id.is_some());
    // DER works as well, named by the DER's own digest.
    let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    check(&der.contents, &digest(&der.contents), &root).unwrap();
}

#[test]
fn each_check_refuses_with_its_own_reason() {
    let (pem, spki) = certificate(&rcgen::PKCS_ECDSA_P256_SHA256, true);
    let (_, root) = certificate(&rcgen::PKCS_ECDSA_P384_SHA384, true);
    let refused = |bytes: &[u8], issuer: &[u8]| check(bytes, &digest(bytes), issuer).unwrap_err();
    let mismatch = check(pem.as_bytes(), &[0; 32], &root).unwrap_err();
    assert_eq!(mismatch.reason, Reason::CrossSignMismatch);
    let issuer = refused(pem.as_bytes(), &spki);
    assert_eq!(issuer.reason, Reason::CrossSignIsIssuerKey);
    assert_eq!(
        refused(b"not a certificate", &root).reason,
        Reason::BadCrossSignCertificate
    );
    let (leaf, _) = certificate(&rcgen::PKCS_ECDSA_P256_SHA256, false);
    assert_eq!(
        refused(leaf.as_bytes(), &root).reason,
        Reason::CrossSignNotCa
    );
    let (ed, _) = certificate(&rcgen::PKCS_ED25519, true);
    let not_allowed = refused(ed.as_bytes(), &root);
    assert_eq!(
        not_allowed.reason,
        Reason::CrossSignKeyNotAllowed,
        "{not_allowed}"
    );
}

#[test]
fn a_subject_rcgen_would_re_encode_is_refused_rather_than_changed() {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = ca_named(DnValue::TeletexString(
        "Partner Root CA".try_into().unwrap(),
    ));
    let pem = params.self_signed(&key).unwrap().pem();
    let (_, root) = certificate(&rcgen::PKCS_ECDSA_P384_SHA384, true);
    let refused = check(pem.as_bytes(), &digest(pem.as_bytes()), &root).unwrap_err();
    assert_eq!(refused.reason, Reason::CrossSignSubjectChanged, "{refused}");
}

#[test]
fn a_self_issued_certificate_whose_signature_does_not_verify_with_its_own_key_is_refused() {
    let (pem, _) = certificate(&rcgen::PKCS_ECDSA_P256_SHA256, true);
    let (_, root) = certificate(&rcgen::PKCS_ECDSA_P384_SHA384, true);
    let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let mut forged = der.contents.clone();
    // The last byte is the signature's: the certificate still parses.
    *forged.last_mut().unwrap() ^= 0x01;
    let refused = check(&forged, &digest(&forged), &root).unwrap_err();
    assert_eq!(
        refused.reason,
        Reason::CrossSignSignatureInvalid,
        "{refused}"
    );
    // The same bytes unforged pass.
    check(&der.contents, &digest(&der.contents), &root).unwrap();
}

#[test]
fn a_certificate_another_ca_issued_passes_but_is_marked_as_not_self_signed() {
    let other_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let other = rcgen::Issuer::new(ca_named("Other Root CA"), other_key);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = ca_named("Partner Issuing CA");
    let pem = params.signed_by(&key, &other).unwrap().pem();
    let (_, root) = certificate(&rcgen::PKCS_ECDSA_P384_SHA384, true);
    let checked = check(pem.as_bytes(), &digest(pem.as_bytes()), &root).unwrap();
    assert!(!checked.self_signed);
    assert_eq!(checked.issuer, "CN=Other Root CA");
    let (own, _) = certificate(&rcgen::PKCS_ECDSA_P256_SHA256, true);
    assert!(
        check(own.as_bytes(), &digest(own.as_bytes()), &root)
            .unwrap()
            .self_signed
    );
}

#[test]
fn a_forgery_whose_issuer_is_the_subject_encoded_another_way_is_refused() {
    // The victim's key and name; the forger signs with a key of their own
    // and writes the issuer's CN as a PrintableString where the subject's
    // is a UTF8String: the bytes differ, the name is the same.
    let victim = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let forger = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let issuer = rcgen::Issuer::new(
        ca_named(DnValue::PrintableString(
            "Partner Root CA".try_into().unwrap(),
        )),
        forger,
    );
    let params = ca_named(DnValue::Utf8String("Partner Root CA".into()));
    let pem = params.signed_by(&victim, &issuer).unwrap().pem();
    let (_, root) = certificate(&rcgen::PKCS_ECDSA_P384_SHA384, true);
    let refused = check(pem.as_bytes(), &digest(pem.as_bytes()), &root).unwrap_err();
    assert_eq!(
        refused.reason,
        Reason::CrossSignSignatureInvalid,
        "{refused}"
    );
    // The same with the issuer's name in other letters' case and spacing.
    let issuer = rcgen::Issuer::new(
        ca_named("partner  ROOT ca"),
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
    );
    let pem = params.signed_by(&victim, &issuer).unwrap().pem();
    let refused = check(pem.as_bytes(), &digest(pem.as_bytes()), &root).unwrap_err();
    assert_eq!(
        refused.reason,
        Reason::CrossSignSignatureInvalid,
        "{refused}"
    );
}
