//! The CRL built and linted: the reviewed example passes and verifies
//! under its root once signed; a TBS that breaks a rule is refused naming
//! it, one test per rule the script cannot already rule out.

#![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

use rcgen::{
    CertificateRevocationListParams, KeyIdMethod, KeyPair, PKCS_ECDSA_P384_SHA384, PublicKeyData,
    RevocationReason, RevokedCertParams, SerialNumber, SigningKey,
};

use super::lint::{Expected, lint};
use super::*;
use crate::ceremony::certificate::{key_identifier, root_params};
use crate::ceremony::intermediate::{assemble, issuer_certificate};
use crate::ceremony::script::{CertificateSection, Kind, Script};

/// A software root, as a root-key ceremony makes it.
fn root() -> (KeyPair, IssuerCertificate, rcgen::CertificateParams) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let section = CertificateSection {
        country: "DE".into(),
        organization: "Example Corp".into(),
        common_name: "Example Root CA".into(),
        validity_days: 3650,
    };
    let mut params = root_params(&section, "t").unwrap();
    params.key_identifier_method = KeyIdMethod::PreSpecified(key_identifier(
        &subject_public_key(&key.subject_public_key_info()).unwrap(),
    ));
    params.serial_number = Some(SerialNumber::from_slice(&[0x42; 16]));
    let cert = params.self_signed(&key).unwrap();
    (key, issuer_certificate(&cert.pem()).unwrap(), params)
}

fn example() -> CrlSection {
    let script = Script::parse(crate::ceremony::script::CRL_EXAMPLE).unwrap();
    let Kind::Crl(section) = script.kind() else {
        panic!("not a crl script");
    };
    section.clone()
}

/// An hour from now: past the example's revocation, within the root.
fn issue() -> Issue {
    Issue {
        this_update: time::OffsetDateTime::now_utc().unix_timestamp() + 3600,
        number: 7,
    }
}

#[test]
fn the_example_passes_the_lint_and_the_signed_crl_verifies_under_the_root() {
    let (key, root, _) = root();
    let section = example();
    let prepared = prepare(
        &root,
        KeyAlgorithm::EcSignP384Sha384,
        &key.subject_public_key_info(),
        &section,
        issue(),
    )
    .unwrap();
    let summary = summary(&prepared.tbs);
    assert!(summary.iter().any(|l| l == "CRL number: 7"), "{summary:?}");
    assert!(
        summary
            .iter()
            .any(|l| l.starts_with("revoked: serial 3f1e0a9b7c6d5e4f at ")
                && l.contains("KeyCompromise")),
        "{summary:?}"
    );
    let signature = key.sign(&prepared.tbs).unwrap();
    let der = assemble(&prepared, &signature).unwrap();
    verify(&der, &key.subject_public_key_info()).unwrap();
    assert!(pem(&der).unwrap().starts_with("-----BEGIN X509 CRL-----"));
    // Signed by another key, it does not verify.
    let other = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
    let forged = assemble(&prepared, &other.sign(&prepared.tbs).unwrap()).unwrap();
    let refused = verify(&forged, &key.subject_public_key_info()).unwrap_err();
    assert_eq!(refused.reason, Reason::CertificateUnverified);
}

/// A TBS built with rcgen from `params` under the software root, linted
/// against `expected` (changed by `adjust`): the rule it breaks.
fn broken(
    change: impl FnOnce(&mut CertificateRevocationListParams),
    adjust: impl FnOnce(&mut Expected),
) -> String {
    let (key, root, root_params) = root();
    let section = example();
    let issue = issue();
    let this_update = time::OffsetDateTime::from_unix_timestamp(issue.this_update).unwrap();
    let mut params = CertificateRevocationListParams {
        this_update,
        next_update: this_update + time::Duration::days(30),
        crl_number: SerialNumber::from(issue.number),
        issuing_distribution_point: None,
        revoked_certs: vec![RevokedCertParams {
            serial_number: SerialNumber::from_slice(&[0x3f, 0x1e]),
            revocation_time: this_update - time::Duration::days(1),
            reason_code: Some(RevocationReason::KeyCompromise),
            invalidity_date: None,
        }],
        key_identifier_method: KeyIdMethod::PreSpecified(root.key_id.clone()),
    };
    change(&mut params);
    let issuer = rcgen::Issuer::new(root_params, key);
    let crl = params.signed_by(&issuer).unwrap();
    let (_, parsed) =
        x509_parser::revocation_list::CertificateRevocationList::from_der(crl.der()).unwrap();
    let tbs = parsed.tbs_cert_list.as_ref().to_vec();
    let mut expected = Expected::of(&root, &section, issue).unwrap();
    adjust(&mut expected);
    let finding = lint(&tbs, &expected).unwrap_err();
    let error = finding.clone().into_error();
    assert_eq!(error.reason, Reason::CertificateLint);
    assert!(
        error
            .message
            .contains("refused the CRL before the HSM signed it")
    );
    finding.rule.to_owned()
}

#[test]
fn a_crl_that_breaks_a_rule_is_refused_naming_it() {
    let unchanged = |_: &mut CertificateRevocationListParams| {};
    let as_built = |_: &mut Expected| {};
    assert_eq!(broken(unchanged, |e| e.issuer_name[4] ^= 1), "issuer-name");
    assert_eq!(
        broken(unchanged, |e| e.next_update_days = 29),
        "next-update"
    );
    assert_eq!(
        broken(unchanged, |e| e.issuer_validity.1 = e.this_update + 86_400),
        "validity"
    );
    assert_eq!(
        broken(unchanged, |e| e.issuer_validity.0 = e.this_update + 1),
        "validity"
    );
    assert_eq!(
        broken(
            |p| p.key_identifier_method = KeyIdMethod::PreSpecified(vec![1; 20]),
            as_built
        ),
        "key-identifiers"
    );
    assert_eq!(
        broken(|p| p.crl_number = SerialNumber::from(6), as_built),
        "crl-number"
    );
    assert_eq!(
        broken(
            |p| {
                let twice = p.revoked_certs[0].clone();
                p.revoked_certs.push(twice);
            },
            as_built
        ),
        "no-duplicate-serials"
    );
    assert_eq!(
        broken(
            |p| p.revoked_certs[0].revocation_time = p.this_update + time::Duration::seconds(1),
            as_built
        ),
        "revocation-date"
    );
    assert_eq!(
        broken(
            |p| p.revoked_certs[0].reason_code = Some(RevocationReason::CertificateHold),
            as_built
        ),
        "reason-codes"
    );
    assert_eq!(
        broken(
            |p| p.revoked_certs[0].serial_number = SerialNumber::from_slice(&[0]),
            as_built
        ),
        "serial"
    );
}

#[test]
fn bytes_after_the_tbs_or_not_a_tbs_are_the_encoding_rule() {
    let (key, root, _) = root();
    let section = example();
    let prepared = prepare(
        &root,
        KeyAlgorithm::EcSignP384Sha384,
        &key.subject_public_key_info(),
        &section,
        issue(),
    )
    .unwrap();
    let expected = Expected::of(&root, &section, issue()).unwrap();
    let mut trailing = prepared.tbs.clone();
    trailing.push(0);
    assert_eq!(lint(&trailing, &expected).unwrap_err().rule, "encoding");
    assert_eq!(lint(&root.der, &expected).unwrap_err().rule, "encoding");
}

#[test]
fn the_reason_names_map_to_their_rfc_5280_codes() {
    assert_eq!(reason_code("keyCompromise"), Some(1));
    assert_eq!(reason_code("privilegeWithdrawn"), Some(9));
    assert_eq!(reason_code("certificateHold"), None);
    assert!(reason("unspecified").unwrap().is_none());
}
