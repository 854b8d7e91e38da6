//! The lint of a to-be-signed certificate, run inside custodyd before the
//! HSM is asked to sign it: the baseline a CA auditor expects of a CA
//! certificate (CA/Browser Forum Baseline Requirements 7.1.2 and RFC 5280),
//! checked on the DER bytes the HSM would sign, parsed by x509-parser. A
//! finding names its rule and stops the ceremony before any signature.

use sha2::Digest;
use x509_parser::certificate::TbsCertificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::oid_registry::{
    OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER, OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_KEY_USAGE,
    OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::X509Version;

use crate::{Error, Reason};

/// A rule of the lint, by the name officers and transcripts see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The TBS is one DER `TBSCertificate`, version 3, nothing after it.
    Encoding,
    /// No extension appears twice.
    DuplicateExtension,
    /// No SHA-1 signature algorithm.
    NoSha1,
    /// The serial is positive, at most 20 octets, and at least 64 bits.
    Serial,
    /// basicConstraints is present, critical, with the profile's cA and
    /// path length.
    BasicConstraints,
    /// keyUsage is present, critical, with keyCertSign and cRLSign.
    KeyUsage,
    /// notBefore ≤ notAfter, the span no longer than the profile's days,
    /// and not past the issuer's notAfter.
    Validity,
    /// The issuer name is byte-equal to the issuer's subject.
    IssuerName,
    /// A subject key identifier is present, and the authority key
    /// identifier is the issuer's subject key identifier.
    KeyIdentifiers,
}

impl Rule {
    /// Every rule, in the order they are checked.
    pub const ALL: [Rule; 9] = [
        Rule::Encoding,
        Rule::DuplicateExtension,
        Rule::NoSha1,
        Rule::Serial,
        Rule::BasicConstraints,
        Rule::KeyUsage,
        Rule::Validity,
        Rule::IssuerName,
        Rule::KeyIdentifiers,
    ];

    /// The rule's name, as findings and transcripts give it.
    pub fn name(self) -> &'static str {
        match self {
            Rule::Encoding => "encoding",
            Rule::DuplicateExtension => "no-duplicate-extensions",
            Rule::NoSha1 => "no-sha1",
            Rule::Serial => "serial",
            Rule::BasicConstraints => "basic-constraints",
            Rule::KeyUsage => "key-usage",
            Rule::Validity => "validity",
            Rule::IssuerName => "issuer-name",
            Rule::KeyIdentifiers => "key-identifiers",
        }
    }
}

/// A rule the TBS breaks, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The rule.
    pub rule: Rule,
    /// What was found, for the officers.
    pub detail: String,
}

impl Finding {
    fn new(rule: Rule, detail: impl Into<String>) -> Finding {
        Finding {
            rule,
            detail: detail.into(),
        }
    }

    /// The refusal: `CERTIFICATE_LINT`, naming the rule.
    pub fn into_error(self) -> Error {
        Error::new(
            Reason::CertificateLint,
            format!(
                "lint rule {} refused the certificate before the HSM signed it: {}",
                self.rule.name(),
                self.detail
            ),
        )
    }
}

/// What the certificate must be, from the ceremony's profile and its
/// issuer.
#[derive(Debug, Clone)]
pub struct Profile {
    /// basicConstraints cA.
    pub ca: bool,
    /// basicConstraints pathLenConstraint (`None`: absent).
    pub path_len: Option<u32>,
    /// The longest validity allowed, in days.
    pub validity_days: u32,
    /// The issuer's subject name, DER; `None` for a self-signed
    /// certificate (the issuer must then be byte-equal to its own subject).
    pub issuer_name: Option<Vec<u8>>,
    /// The issuer's subject key identifier (the authority key identifier
    /// the certificate must carry).
    pub issuer_key_id: Vec<u8>,
    /// The issuer's notAfter (Unix seconds), if it has a certificate.
    pub issuer_not_after: Option<i64>,
}

/// What a passed lint says: the TBS's SHA-256 and the rules it passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passed {
    /// SHA-256 of the TBS DER: what the officers confirm and the HSM signs.
    pub tbs_sha256: [u8; 32],
}

impl Passed {
    /// The rules, by name, comma-separated (for transcripts).
    pub fn rules() -> String {
        Rule::ALL.map(Rule::name).join(", ")
    }
}

/// Signature algorithms over SHA-1: sha1WithRSAEncryption, ecdsa-with-SHA1,
/// dsa-with-sha1, and the OIW sha1WithRSASignature and dsaWithSHA1.
const SHA1_SIGNATURES: [&str; 5] = [
    "1.2.840.113549.1.1.5",
    "1.2.840.10045.4.1",
    "1.2.840.10040.4.3",
    "1.3.14.3.2.29",
    "1.3.14.3.2.27",
];

/// Lints the DER `tbs` against `profile`.
pub fn lint(tbs: &[u8], profile: &Profile) -> Result<Passed, Finding> {
    let (rest, tbs_cert) = TbsCertificate::from_der(tbs)
        .map_err(|e| Finding::new(Rule::Encoding, format!("does not parse: {e}")))?;
    if !rest.is_empty() {
        return Err(Finding::new(
            Rule::Encoding,
            format!("{} bytes after the TBSCertificate", rest.len()),
        ));
    }
    if tbs_cert.version != X509Version::V3 {
        return Err(Finding::new(Rule::Encoding, "not an X.509 version 3 TBS"));
    }
    let extensions = tbs_cert.extensions();
    for (i, extension) in extensions.iter().enumerate() {
        if extensions[..i].iter().any(|e| e.oid == extension.oid) {
            return Err(Finding::new(
                Rule::DuplicateExtension,
                format!("extension {} appears twice", extension.oid),
            ));
        }
        if let ParsedExtension::ParseError { error } = extension.parsed_extension() {
            return Err(Finding::new(
                Rule::Encoding,
                format!("extension {} does not parse: {error}", extension.oid),
            ));
        }
    }
    let algorithm = tbs_cert.signature.algorithm.to_id_string();
    if SHA1_SIGNATURES.contains(&algorithm.as_str()) {
        return Err(Finding::new(
            Rule::NoSha1,
            format!("signature algorithm {algorithm} is SHA-1"),
        ));
    }
    serial(tbs_cert.raw_serial())?;
    basic_constraints(&tbs_cert, profile)?;
    key_usage(&tbs_cert)?;
    validity(&tbs_cert, profile)?;
    let expected_issuer = profile
        .issuer_name
        .as_deref()
        .unwrap_or(tbs_cert.subject.as_raw());
    if tbs_cert.issuer.as_raw() != expected_issuer {
        return Err(Finding::new(
            Rule::IssuerName,
            format!(
                "issuer \"{}\" is not byte-equal to the issuer's subject",
                tbs_cert.issuer
            ),
        ));
    }
    key_identifiers(&tbs_cert, profile)?;
    Ok(Passed {
        tbs_sha256: sha2::Sha256::digest(tbs).into(),
    })
}

fn serial(raw: &[u8]) -> Result<(), Finding> {
    let Some(first) = raw.first() else {
        return Err(Finding::new(Rule::Serial, "empty"));
    };
    if first & 0x80 != 0 {
        return Err(Finding::new(Rule::Serial, "negative"));
    }
    if raw.len() > 20 {
        return Err(Finding::new(Rule::Serial, "longer than 20 octets"));
    }
    let significant = raw.iter().skip_while(|b| **b == 0).count();
    if significant < 8 {
        return Err(Finding::new(
            Rule::Serial,
            format!("{significant} significant octets; at least 8 (64 bits) are required"),
        ));
    }
    Ok(())
}

fn critical_extension<'a, 'b>(
    tbs: &'b TbsCertificate<'a>,
    rule: Rule,
    oid: &x509_parser::der_parser::oid::Oid<'static>,
    what: &str,
) -> Result<&'b x509_parser::extensions::X509Extension<'a>, Finding> {
    let extension = tbs
        .extensions()
        .iter()
        .find(|e| e.oid == *oid)
        .ok_or_else(|| Finding::new(rule, format!("{what} is absent")))?;
    if !extension.critical {
        return Err(Finding::new(rule, format!("{what} is not critical")));
    }
    Ok(extension)
}

fn basic_constraints(tbs: &TbsCertificate<'_>, profile: &Profile) -> Result<(), Finding> {
    let rule = Rule::BasicConstraints;
    let extension = critical_extension(
        tbs,
        rule,
        &OID_X509_EXT_BASIC_CONSTRAINTS,
        "basicConstraints",
    )?;
    let ParsedExtension::BasicConstraints(constraints) = extension.parsed_extension() else {
        return Err(Finding::new(rule, "basicConstraints does not parse"));
    };
    if constraints.ca != profile.ca {
        return Err(Finding::new(
            rule,
            format!("cA is {}, the profile asks {}", constraints.ca, profile.ca),
        ));
    }
    if constraints.path_len_constraint != profile.path_len {
        return Err(Finding::new(
            rule,
            format!(
                "pathLenConstraint is {:?}, the profile asks {:?}",
                constraints.path_len_constraint, profile.path_len
            ),
        ));
    }
    Ok(())
}

fn key_usage(tbs: &TbsCertificate<'_>) -> Result<(), Finding> {
    let rule = Rule::KeyUsage;
    let extension = critical_extension(tbs, rule, &OID_X509_EXT_KEY_USAGE, "keyUsage")?;
    let ParsedExtension::KeyUsage(usage) = extension.parsed_extension() else {
        return Err(Finding::new(rule, "keyUsage does not parse"));
    };
    if !usage.key_cert_sign() || !usage.crl_sign() {
        return Err(Finding::new(
            rule,
            format!("keyUsage is {usage}; a CA's has keyCertSign and cRLSign"),
        ));
    }
    Ok(())
}

fn validity(tbs: &TbsCertificate<'_>, profile: &Profile) -> Result<(), Finding> {
    let rule = Rule::Validity;
    let not_before = tbs.validity.not_before.timestamp();
    let not_after = tbs.validity.not_after.timestamp();
    if not_after < not_before {
        return Err(Finding::new(rule, "notAfter is before notBefore"));
    }
    let longest = i64::from(profile.validity_days) * 86_400;
    if not_after - not_before > longest {
        return Err(Finding::new(
            rule,
            format!(
                "valid {} s, longer than the profile's {} days",
                not_after - not_before,
                profile.validity_days
            ),
        ));
    }
    if let Some(issuer_not_after) = profile.issuer_not_after {
        if not_after > issuer_not_after {
            return Err(Finding::new(rule, "notAfter is past the issuer's notAfter"));
        }
    }
    Ok(())
}

fn key_identifiers(tbs: &TbsCertificate<'_>, profile: &Profile) -> Result<(), Finding> {
    let rule = Rule::KeyIdentifiers;
    let mut subject = None;
    let mut authority = None;
    for extension in tbs.extensions() {
        match extension.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => subject = Some(id.0),
            ParsedExtension::AuthorityKeyIdentifier(id) => {
                authority = Some(id.key_identifier.as_ref().map(|k| k.0));
            }
            _ => {}
        }
    }
    if subject.is_none() {
        return Err(Finding::new(
            rule,
            format!("{OID_X509_EXT_SUBJECT_KEY_IDENTIFIER} (subjectKeyIdentifier) is absent"),
        ));
    }
    match authority {
        None => Err(Finding::new(
            rule,
            format!("{OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER} (authorityKeyIdentifier) is absent"),
        )),
        Some(None) => Err(Finding::new(
            rule,
            "authorityKeyIdentifier has no keyIdentifier",
        )),
        Some(Some(id)) if id != profile.issuer_key_id.as_slice() => Err(Finding::new(
            rule,
            format!(
                "authorityKeyIdentifier {} is not the issuer's subjectKeyIdentifier {}",
                hex::encode(id),
                hex::encode(&profile.issuer_key_id)
            ),
        )),
        Some(Some(_)) => Ok(()),
    }
}

#[cfg(test)]
mod tests;
