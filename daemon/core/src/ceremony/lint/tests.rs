//! One TBS per rule, built by rcgen as the ceremony builds it and then
//! changed in one way; each is refused by that rule, and the unchanged one
//! passes.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::cell::RefCell;

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, IsCa, KeyIdMethod, KeyUsagePurpose,
    PublicKeyData, SignatureAlgorithm, SigningKey,
};

use super::{Profile, Rule, lint};
use crate::ceremony::certificate::{key_identifier, root_params};
use crate::ceremony::script::CertificateSection;

/// A key that keeps what rcgen asks it to sign (the TBS) and signs
/// nothing.
struct Capture {
    public_key: Vec<u8>,
    algorithm: &'static SignatureAlgorithm,
    tbs: RefCell<Vec<u8>>,
}

impl PublicKeyData for Capture {
    fn der_bytes(&self) -> &[u8] {
        &self.public_key
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.algorithm
    }
}

impl SigningKey for Capture {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        *self.tbs.borrow_mut() = message.to_vec();
        Ok(vec![0; 64])
    }
}

fn capture(algorithm: &'static SignatureAlgorithm) -> Capture {
    let mut public_key = vec![4u8];
    public_key.extend((1..=64u8).collect::<Vec<_>>());
    Capture {
        public_key,
        algorithm,
        tbs: RefCell::new(Vec::new()),
    }
}

const DAYS: u32 = 3650;

/// The root profile's parameters, as `certificate::self_sign` completes
/// them (serial and key identifier).
fn params(key: &Capture) -> CertificateParams {
    let section = CertificateSection {
        country: "DE".into(),
        organization: "Example Corp".into(),
        common_name: "Example Root CA".into(),
        validity_days: DAYS,
    };
    let mut params = root_params(&section, "test").unwrap();
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x41; 16]));
    params.key_identifier_method = KeyIdMethod::PreSpecified(key_identifier(&key.public_key));
    params
}

fn profile(key: &Capture) -> Profile {
    Profile {
        ca: true,
        path_len: None,
        validity_days: DAYS,
        issuer_name: None,
        issuer_key_id: key_identifier(&key.public_key),
        issuer_not_after: None,
    }
}

fn tbs_of(key: &Capture, params: &CertificateParams) -> Vec<u8> {
    params.self_signed(key).unwrap();
    key.tbs.borrow().clone()
}

fn refused_by(tbs: &[u8], profile: &Profile) -> Rule {
    let finding = lint(tbs, profile).unwrap_err();
    let error = finding.clone().into_error();
    assert_eq!(error.reason, crate::Reason::CertificateLint);
    assert!(
        error.message.contains(finding.rule.name()),
        "{}",
        error.message
    );
    finding.rule
}

#[test]
fn the_root_profile_passes() {
    let key = capture(&rcgen::PKCS_ECDSA_P256_SHA256);
    let tbs = tbs_of(&key, &params(&key));
    let passed = lint(&tbs, &profile(&key)).unwrap();
    use sha2::Digest;
    assert_eq!(
        passed.tbs_sha256,
        <[u8; 32]>::from(sha2::Sha256::digest(&tbs))
    );
}

#[test]
fn encoding_a_tbs_that_does_not_parse_or_has_trailing_bytes() {
    let key = capture(&rcgen::PKCS_ECDSA_P256_SHA256);
    let mut tbs = tbs_of(&key, &params(&key));
    tbs.push(0);
    assert_eq!(refused_by(&tbs, &profile(&key)), Rule::Encoding);
    assert_eq!(
        refused_by(&tbs[..tbs.len() - 10], &profile(&key)),
        Rule::Encoding
    );
}

#[test]
fn duplicate_extensions() {
    let key = capture(&rcgen::PKCS_ECDSA_P256_SHA256);
    let mut params = params(&key);
    // A second keyUsage (keyCertSign, cRLSign) after rcgen's own.
    let mut extension =
        CustomExtension::from_oid_content(&[2, 5, 29, 15], vec![0x03, 0x02, 0x01, 0x06]);
    extension.set_criticality(true);
    params.custom_extensions.push(extension);
    assert_eq!(
        refused_by(&tbs_of(&key, &params), &profile(&key)),
        Rule::DuplicateExtension
    );
}

#[test]
fn no_sha1() {
    // sha256WithRSAEncryption (1.2.840.113549.1.1.11) and
    // sha1WithRSAEncryption (…1.1.5) have encodings of one length: the
    // TBS's signature algorithm is changed in place.
    let key = capture(&rcgen::PKCS_RSA_SHA256);
    let mut tbs = tbs_of(&key, &params(&key));
    let sha256 = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b];
    let at = tbs.windows(sha256.len()).position(|w| w == sha256).unwrap();
    tbs[at + sha256.len() - 1] = 0x05;
    assert_eq!(refused_by(&tbs, &profile(&key)), Rule::NoSha1);
}

#[test]
fn serial_short_or_negative() {
    let key = capture(&rcgen::PKCS_ECDSA_P256_SHA256);
    let mut short = params(&key);
    short.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x01; 7]));
    assert_eq!(
        refused_by(&tbs_of(&key, &short), &profile(&key)),
        Rule::Serial
    );
    // rcgen keeps serials positive: the TBS's is made negative in place
    // (INTEGER, 16 octets, 0x41…).
    let mut negative = tbs_of(&key, &params(&key));
    let at = negative
        .windows(4)
        .position(|w| w == [0x02, 0x10, 0x41, 0x41])
        .unwrap();
    negative[at + 2] = 0xc1;
    assert_eq!(refused_by(&negative, &profile(&key)), Rule::Serial);
}

#[test]
fn basic_constraints_absent_not_ca_or_wrong_path_length() {
    let key = capture(&rcgen::PKCS_ECDSA_P256_SHA256);
    for is_ca in [
        IsCa::NoCa,
        IsCa::ExplicitNoCa,
        IsCa::Ca(BasicConstraints::Constrained(0)),
    ] {
        let mut params = params(&key);
        params.is_ca = is_ca;
        assert_eq!(
            refused_by(&tbs_of(&key, &params), &profile(&key)),
            Rule::BasicConstraints
        );
    }
    // The profile asks path length 0; the TBS has none.
    let mut constrained = profile(&key);
    constrained.path_len = Some(0);
    assert_eq!(
        refused_by(&tbs_of(&key, &params(&key)), &constrained),
        Rule::BasicConstraints
    );
}

#[test]
fn key_usage_absent_or_without_cert_sign() {
    let key = capture(&rcgen::PKCS_ECDSA_P256_SHA256);
    let mut absent = params(&key);
    absent.key_usages.clear();
    assert_eq!(
        refused_by(&tbs_of(&key, &absent), &profile(&key)),
        Rule::KeyUsage
    );
    let mut no_cert_sign = params(&key);
    no_cert_sign.key_usages = vec![KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    assert_eq!(
        refused_by(&tbs_of(&key, &no_cert_sign), &profile(&key)),
        Rule::KeyUsage
    );
}

#[test]
fn validity_longer_than_the_profile_or_past_the_issuer() {
    let key = capture(&rcgen::PKCS_ECDSA_P256_SHA256);
    let mut long = params(&key);
    long.not_after = long.not_before + time::Duration::days(i64::from(DAYS) + 1);
    assert_eq!(
        refused_by(&tbs_of(&key, &long), &profile(&key)),
        Rule::Validity
    );
    let params = params(&key);
    let mut issuer_ends = profile(&key);
    issuer_ends.issuer_not_after = Some(params.not_after.unix_timestamp() - 1);
    assert_eq!(
        refused_by(&tbs_of(&key, &params), &issuer_ends),
        Rule::Validity
    );
    let mut backwards = params.clone();
    backwards.not_after = backwards.not_before - time::Duration::days(1);
    assert_eq!(
        refused_by(&tbs_of(&key, &backwards), &profile(&key)),
        Rule::Validity
    );
}

#[test]
fn issuer_name_not_byte_equal_to_the_issuers_subject() {
    let key = capture(&rcgen::PKCS_ECDSA_P256_SHA256);
    let tbs = tbs_of(&key, &params(&key));
    // The issuer's subject is the same name, but its C encoded as a
    // UTF8String (0x0c) rather than a PrintableString (0x13): equal to a
    // reader, not byte-equal.
    let (_, parsed) = <x509_parser::certificate::TbsCertificate as x509_parser::prelude::FromDer<
        _,
    >>::from_der(&tbs)
    .unwrap();
    let mut name = parsed.subject.as_raw().to_vec();
    let country = name
        .windows(3)
        .position(|w| w == [0x13, 0x02, b'D'])
        .unwrap();
    name[country] = 0x0c;
    let mut issuer = profile(&key);
    issuer.issuer_name = Some(name);
    assert_eq!(refused_by(&tbs, &issuer), Rule::IssuerName);
}

#[test]
fn key_identifiers_absent_or_not_the_issuers() {
    let key = capture(&rcgen::PKCS_ECDSA_P256_SHA256);
    let mut no_aki = params(&key);
    no_aki.use_authority_key_identifier_extension = false;
    assert_eq!(
        refused_by(&tbs_of(&key, &no_aki), &profile(&key)),
        Rule::KeyIdentifiers
    );
    let mut other_issuer = profile(&key);
    other_issuer.issuer_key_id = vec![0; 20];
    assert_eq!(
        refused_by(&tbs_of(&key, &params(&key)), &other_issuer),
        Rule::KeyIdentifiers
    );
}
