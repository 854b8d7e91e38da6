#![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

use sha2::{Digest, Sha256};

use super::check;
use crate::Reason;

/// A CSR made by rcgen (PEM) for a fresh key of `algorithm`, and its key's
/// SubjectPublicKeyInfo.
fn csr(algorithm: &'static rcgen::SignatureAlgorithm) -> (String, Vec<u8>) {
    let key = rcgen::KeyPair::generate_for(algorithm).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        rcgen::DnType::CountryName,
        rcgen::DnValue::PrintableString("DE".try_into().unwrap()),
    );
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Outside Issuing CA");
    let request = params.serialize_request(&key).unwrap();
    (
        request.pem().unwrap(),
        rcgen::PublicKeyData::subject_public_key_info(&key),
    )
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[test]
fn a_csr_whose_bytes_are_the_scripts_gives_its_subject_and_key() {
    let (pem, spki) = csr(&rcgen::PKCS_ECDSA_P256_SHA256);
    let (_, root) = csr(&rcgen::PKCS_ECDSA_P384_SHA384);
    let checked = check(pem.as_bytes(), &digest(pem.as_bytes()), &root).unwrap();
    assert_eq!(checked.spki, spki);
    assert_eq!(checked.subject, "C=DE, CN=Outside Issuing CA");
    assert_eq!(
        checked.algorithm,
        crate::algorithms::KeyAlgorithm::EcSignP256Sha256
    );
    // DER works as well, named by the DER's own digest.
    let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    check(&der.contents, &digest(&der.contents), &root).unwrap();
}

#[test]
fn each_check_refuses_with_its_own_reason() {
    let (pem, spki) = csr(&rcgen::PKCS_ECDSA_P256_SHA256);
    let (_, root) = csr(&rcgen::PKCS_ECDSA_P384_SHA384);
    let mismatch = check(pem.as_bytes(), &[0; 32], &root).unwrap_err();
    assert_eq!(mismatch.reason, Reason::CsrMismatch);
    let issuer = check(pem.as_bytes(), &digest(pem.as_bytes()), &spki).unwrap_err();
    assert_eq!(issuer.reason, Reason::CsrIsIssuerKey);
    let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let mut forged = der.contents.clone();
    let last = forged.len() - 3;
    forged[last] ^= 0x01;
    let unsigned = check(&forged, &digest(&forged), &root).unwrap_err();
    assert_eq!(unsigned.reason, Reason::CsrSignatureInvalid, "{unsigned}");
    let garbage = b"not a CSR";
    let bad = check(garbage, &digest(garbage), &root).unwrap_err();
    assert_eq!(bad.reason, Reason::BadCsr);
    let (ed, _) = csr(&rcgen::PKCS_ED25519);
    let not_allowed = check(ed.as_bytes(), &digest(ed.as_bytes()), &root).unwrap_err();
    assert_eq!(
        not_allowed.reason,
        Reason::CsrKeyNotAllowed,
        "{not_allowed}"
    );
}
