//! The lint of a to-be-signed CRL, run inside custodyd before the HSM is
//! asked to sign it: RFC 5280 section 5 and the CA/Browser Forum Baseline
//! Requirements (7.2) on the DER bytes the HSM would sign, parsed by
//! x509-parser. A finding names its rule and stops the ceremony before any
//! signature.

use sha2::Digest;
use x509_parser::extensions::ParsedExtension;
use x509_parser::oid_registry::{
    OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER, OID_X509_EXT_CRL_NUMBER, OID_X509_EXT_REASON_CODE,
};
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::TbsCertList;
use x509_parser::x509::X509Version;

use super::{Issue, reason_code};
use crate::ceremony::intermediate::IssuerCertificate;
use crate::ceremony::script::{CRL_REASONS, CrlSection};
use crate::{Error, Reason};

/// The rules, by the names findings and transcripts give, in the order
/// they are checked.
pub const RULES: [&str; 12] = [
    "encoding",
    "no-duplicate-extensions",
    "no-sha1",
    "issuer-name",
    "next-update",
    "validity",
    "key-identifiers",
    "crl-number",
    "serial",
    "no-duplicate-serials",
    "revocation-date",
    "reason-codes",
];

/// A rule the TBS breaks, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The rule, one of [`RULES`].
    pub rule: &'static str,
    /// What was found, for the officers.
    pub detail: String,
}

fn finding(rule: &'static str, detail: impl Into<String>) -> Finding {
    Finding {
        rule,
        detail: detail.into(),
    }
}

impl Finding {
    /// The refusal: `CERTIFICATE_LINT`, naming the rule.
    pub fn into_error(self) -> Error {
        Error::new(
            Reason::CertificateLint,
            format!(
                "lint rule {} refused the CRL before the HSM signed it: {}",
                self.rule, self.detail
            ),
        )
    }
}

/// What the CRL must be, from the script, the issuer and the number and
/// time custodyd gave it.
#[derive(Debug, Clone)]
pub struct Expected {
    /// The issuer's subject name, DER (the CRL's issuer, byte for byte).
    pub issuer_name: Vec<u8>,
    /// The issuer's subjectKeyIdentifier (the CRL's AKI).
    pub issuer_key_id: Vec<u8>,
    /// The issuer certificate's notBefore and notAfter, Unix seconds.
    pub issuer_validity: (i64, i64),
    /// thisUpdate, Unix seconds.
    pub this_update: i64,
    /// The longest thisUpdate → nextUpdate span, in days.
    pub next_update_days: u32,
    /// The CRL number.
    pub number: u64,
}

impl Expected {
    /// What a CRL issued for `crl` under `issuer` at `issue` must be.
    pub fn of(issuer: &IssuerCertificate, crl: &CrlSection, issue: Issue) -> Result<Self, Error> {
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(&issuer.der)
            .map_err(|e| {
                Error::new(
                    Reason::CertificateUnsupported,
                    format!("the issuer's certificate does not parse: {e}"),
                )
            })?;
        Ok(Expected {
            issuer_name: issuer.subject.clone(),
            issuer_key_id: issuer.key_id.clone(),
            issuer_validity: (parsed.validity().not_before.timestamp(), issuer.not_after),
            this_update: issue.this_update,
            next_update_days: crl.next_update_days,
            number: issue.number,
        })
    }
}

/// Signature algorithms over SHA-1 (as the certificate lint's).
const SHA1_SIGNATURES: [&str; 5] = [
    "1.2.840.113549.1.1.5",
    "1.2.840.10045.4.1",
    "1.2.840.10040.4.3",
    "1.3.14.3.2.29",
    "1.3.14.3.2.27",
];

/// Lints the DER `tbs` against `expected`; its SHA-256 if it passes.
pub fn lint(tbs: &[u8], expected: &Expected) -> Result<[u8; 32], Finding> {
    let (rest, list) = TbsCertList::from_der(tbs)
        .map_err(|e| finding("encoding", format!("does not parse: {e}")))?;
    if !rest.is_empty() {
        return Err(finding(
            "encoding",
            format!("{} bytes after the TBSCertList", rest.len()),
        ));
    }
    if list.version != Some(X509Version::V2) {
        return Err(finding(
            "encoding",
            "not a version 2 CRL (RFC 5280 5.1.2.1: a CRL with extensions is v2)",
        ));
    }
    let extensions = list.extensions();
    for (i, extension) in extensions.iter().enumerate() {
        if extensions[..i].iter().any(|e| e.oid == extension.oid) {
            return Err(finding(
                "no-duplicate-extensions",
                format!("extension {} appears twice", extension.oid),
            ));
        }
        if let ParsedExtension::ParseError { error } = extension.parsed_extension() {
            return Err(finding(
                "encoding",
                format!("extension {} does not parse: {error}", extension.oid),
            ));
        }
    }
    let algorithm = list.signature.algorithm.to_id_string();
    if SHA1_SIGNATURES.contains(&algorithm.as_str()) {
        return Err(finding(
            "no-sha1",
            format!("signature algorithm {algorithm} is SHA-1"),
        ));
    }
    if list.issuer.as_raw() != expected.issuer_name.as_slice() {
        return Err(finding(
            "issuer-name",
            format!(
                "issuer \"{}\" is not byte-equal to the issuer's subject",
                list.issuer
            ),
        ));
    }
    dates(&list, expected)?;
    key_identifier(&list, expected)?;
    crl_number(&list, expected)?;
    entries(&list, expected)?;
    Ok(sha2::Sha256::digest(tbs).into())
}

fn dates(list: &TbsCertList<'_>, expected: &Expected) -> Result<(), Finding> {
    let this_update = list.this_update.timestamp();
    let Some(next_update) = list.next_update.map(|t| t.timestamp()) else {
        return Err(finding(
            "next-update",
            "nextUpdate is absent (RFC 5280 5.1.2.5: conforming CRLs have one)",
        ));
    };
    if next_update <= this_update {
        return Err(finding("next-update", "nextUpdate is not after thisUpdate"));
    }
    if next_update - this_update > i64::from(expected.next_update_days) * 86_400 {
        return Err(finding(
            "next-update",
            format!(
                "nextUpdate is {} s after thisUpdate, longer than the script's {} days",
                next_update - this_update,
                expected.next_update_days
            ),
        ));
    }
    if this_update != expected.this_update {
        return Err(finding(
            "validity",
            "thisUpdate is not the moment custodyd built the CRL",
        ));
    }
    let (not_before, not_after) = expected.issuer_validity;
    if this_update < not_before {
        return Err(finding(
            "validity",
            "thisUpdate is before the issuer's notBefore",
        ));
    }
    if next_update > not_after {
        return Err(finding(
            "validity",
            "nextUpdate is past the issuer's notAfter: the issuer could not sign the next CRL in time",
        ));
    }
    Ok(())
}

fn key_identifier(list: &TbsCertList<'_>, expected: &Expected) -> Result<(), Finding> {
    let rule = "key-identifiers";
    let extension = list
        .find_extension(&OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER)
        .ok_or_else(|| finding(rule, "authorityKeyIdentifier is absent"))?;
    let ParsedExtension::AuthorityKeyIdentifier(aki) = extension.parsed_extension() else {
        return Err(finding(rule, "authorityKeyIdentifier does not parse"));
    };
    match aki.key_identifier.as_ref().map(|k| k.0) {
        None => Err(finding(rule, "authorityKeyIdentifier has no keyIdentifier")),
        Some(id) if id != expected.issuer_key_id.as_slice() => Err(finding(
            rule,
            format!(
                "authorityKeyIdentifier {} is not the issuer's subjectKeyIdentifier {}",
                hex::encode(id),
                hex::encode(&expected.issuer_key_id)
            ),
        )),
        Some(_) if extension.critical => Err(finding(
            rule,
            "authorityKeyIdentifier is critical (RFC 5280 4.2.1.1: never)",
        )),
        Some(_) => Ok(()),
    }
}

fn crl_number(list: &TbsCertList<'_>, expected: &Expected) -> Result<(), Finding> {
    let rule = "crl-number";
    let extension = list
        .find_extension(&OID_X509_EXT_CRL_NUMBER)
        .ok_or_else(|| finding(rule, "cRLNumber is absent (RFC 5280 5.2.3)"))?;
    if extension.critical {
        return Err(finding(
            rule,
            "cRLNumber is critical (RFC 5280 5.2.3: never)",
        ));
    }
    let ParsedExtension::CRLNumber(number) = extension.parsed_extension() else {
        return Err(finding(rule, "cRLNumber does not parse"));
    };
    if number.to_bytes_be().len() > 20 {
        return Err(finding(rule, "cRLNumber is longer than 20 octets"));
    }
    if number.to_string() != expected.number.to_string() {
        return Err(finding(
            rule,
            format!(
                "cRLNumber is {number}, not {}, the issuer's next number",
                expected.number
            ),
        ));
    }
    Ok(())
}

fn entries(list: &TbsCertList<'_>, expected: &Expected) -> Result<(), Finding> {
    let allowed: Vec<u8> = CRL_REASONS
        .iter()
        .filter_map(|(name, _)| reason_code(name))
        .filter(|code| *code != 0)
        .collect();
    for (i, revoked) in list.revoked_certificates.iter().enumerate() {
        let serial = revoked.raw_serial();
        let shown = hex::encode(serial);
        let Some(first) = serial.first() else {
            return Err(finding("serial", format!("entry {i} has an empty serial")));
        };
        if first & 0x80 != 0 || serial.len() > 20 || serial.iter().all(|b| *b == 0) {
            return Err(finding(
                "serial",
                format!("serial {shown} is not a positive INTEGER of at most 20 octets"),
            ));
        }
        if list.revoked_certificates[..i]
            .iter()
            .any(|r| r.raw_serial() == serial)
        {
            return Err(finding(
                "no-duplicate-serials",
                format!("serial {shown} is listed twice"),
            ));
        }
        if revoked.revocation_date.timestamp() > expected.this_update {
            return Err(finding(
                "revocation-date",
                format!("serial {shown} is revoked after thisUpdate, in the CRL's future"),
            ));
        }
        for extension in revoked.extensions() {
            if let ParsedExtension::ParseError { error } = extension.parsed_extension() {
                return Err(finding(
                    "encoding",
                    format!(
                        "serial {shown}: extension {} does not parse: {error}",
                        extension.oid
                    ),
                ));
            }
            if extension.oid == OID_X509_EXT_REASON_CODE && extension.critical {
                return Err(finding(
                    "reason-codes",
                    format!("serial {shown}: reasonCode is critical"),
                ));
            }
        }
        if let Some((_, code)) = revoked.reason_code() {
            if !allowed.contains(&code.0) {
                return Err(finding(
                    "reason-codes",
                    format!(
                        "serial {shown}: reason code {} is not allowed (unspecified is left out; certificateHold, removeFromCRL and aACompromise are not for a CA's full CRL)",
                        code.0
                    ),
                ));
            }
        }
    }
    Ok(())
}
