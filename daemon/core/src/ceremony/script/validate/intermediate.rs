//! The rules of an `intermediate` script: `[intermediate]` names the root
//! key that certifies and the key it certifies, `[certificate]` the subject
//! and validity, `[profile]` the subordinate CA profile. Whether the keys
//! exist, and the root has a certificate, is checked when the ceremony
//! opens; whether the certificate fits under the root (its validity, its
//! name) by the lint before the HSM signs.

use super::super::raw::{RawCertificate, RawCrossSign, RawIntermediate, RawProfile};
use super::super::{CertificateSection, EXTENDED_KEY_USAGES, Kind, ProfileSection};
use super::{ScriptError, certificate_section, invalid, required};

/// keyUsage names a profile may list; the first two are required.
const KEY_USAGES: [&str; 3] = ["keyCertSign", "cRLSign", "digitalSignature"];
/// Entries one list of the profile may hold.
const MAX_ENTRIES: usize = 8;
/// The longest URI or DNS name.
const MAX_URI: usize = 200;

pub(super) fn key_id(
    field: &str,
    value: Option<String>,
    what: &str,
) -> Result<String, ScriptError> {
    let id = required(value, field, what)?;
    crate::names::check_key_id(&id).map_err(|_| {
        invalid(
            field,
            format!(
                "{id:?} is not a key id: 1-63 lower-case letters, digits or '-', starting with a letter"
            ),
        )
    })?;
    Ok(id)
}

/// A list of at most [`MAX_ENTRIES`] distinct entries, each passing `check`.
fn list(
    field: &str,
    values: Option<Vec<String>>,
    check: impl Fn(&str) -> Result<(), String>,
) -> Result<Vec<String>, ScriptError> {
    let values = values.unwrap_or_default();
    if values.len() > MAX_ENTRIES {
        return Err(invalid(
            field,
            format!("{} listed; at most {MAX_ENTRIES}", values.len()),
        ));
    }
    for (i, value) in values.iter().enumerate() {
        if values[..i].contains(value) {
            return Err(invalid(field, format!("{value:?} is listed twice")));
        }
        check(value).map_err(|problem| invalid(field, format!("{value:?} {problem}")))?;
    }
    Ok(values)
}

fn one_of(allowed: &'static [&'static str]) -> impl Fn(&str) -> Result<(), String> {
    move |value| {
        if allowed.contains(&value) {
            Ok(())
        } else {
            Err(format!("is not allowed; one of: {}", allowed.join(", ")))
        }
    }
}

/// An `http://` URI (the Baseline Requirements ask for http for CRLs and
/// AIA, so that fetching them needs no certificate), printable ASCII.
fn http_uri(value: &str) -> Result<(), String> {
    let host = value.strip_prefix("http://").unwrap_or_default();
    if host.is_empty()
        || value.len() > MAX_URI
        || !value.bytes().all(|b| b.is_ascii_graphic())
        || host.starts_with('/')
    {
        return Err(format!(
            "is not an http:// URI of printable ASCII, at most {MAX_URI} characters"
        ));
    }
    Ok(())
}

/// A DNS name as a name constraint: lower-case labels of a-z, 0-9 and '-',
/// separated by dots.
fn dns_name(value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err("is not a DNS name: lower-case labels of a-z, 0-9 and '-', separated by dots".into())
    }
}

/// A dotted object identifier, such as the CA/Browser Forum's
/// domain-validated policy 2.23.140.1.2.1.
fn oid(value: &str) -> Result<(), String> {
    der::asn1::ObjectIdentifier::new(value)
        .map(|_| ())
        .map_err(|_| "is not a dotted object identifier such as \"2.23.140.1.2.1\"".into())
}

fn profile(raw: RawProfile) -> Result<ProfileSection, ScriptError> {
    let path_len = raw
        .path_len
        .map(|n| {
            u8::try_from(n).map_err(|_| {
                invalid(
                    "profile.path_len",
                    format!("{n} is not allowed; 0 to 255, or leave it out for no limit"),
                )
            })
        })
        .transpose()?;
    let key_usage = list(
        "profile.key_usage",
        Some(required(
            raw.key_usage,
            "profile.key_usage",
            "[\"keyCertSign\", \"cRLSign\"], optionally with \"digitalSignature\"",
        )?),
        one_of(&KEY_USAGES),
    )?;
    for needed in &KEY_USAGES[..2] {
        if !key_usage.iter().any(|u| u == needed) {
            return Err(invalid(
                "profile.key_usage",
                format!("lacks {needed}: a CA certificate's keyUsage has keyCertSign and cRLSign"),
            ));
        }
    }
    let extended_key_usage = list(
        "profile.extended_key_usage",
        raw.extended_key_usage,
        one_of(&EXTENDED_KEY_USAGES),
    )?;
    Ok(ProfileSection {
        path_len,
        digital_signature: key_usage.iter().any(|u| u == "digitalSignature"),
        extended_key_usage,
        permitted_dns_names: list(
            "profile.permitted_dns_names",
            raw.permitted_dns_names,
            dns_name,
        )?,
        excluded_dns_names: list(
            "profile.excluded_dns_names",
            raw.excluded_dns_names,
            dns_name,
        )?,
        certificate_policies: list(
            "profile.certificate_policies",
            raw.certificate_policies,
            oid,
        )?,
        crl_distribution_points: list(
            "profile.crl_distribution_points",
            raw.crl_distribution_points,
            http_uri,
        )?,
        ocsp: list("profile.ocsp", raw.ocsp, http_uri)?,
        ca_issuers: list("profile.ca_issuers", raw.ca_issuers, http_uri)?,
    })
}

/// The kind of an `intermediate` script, from its three sections (the
/// caller refused the sections it does not have).
pub(super) fn kind(
    intermediate: Option<RawIntermediate>,
    certificate: Option<RawCertificate>,
    raw_profile: Option<RawProfile>,
) -> Result<Kind, ScriptError> {
    let intermediate = required(
        intermediate,
        "intermediate",
        "an [intermediate] section naming the issuer and the key",
    )?;
    let issuer = key_id(
        "intermediate.issuer",
        intermediate.issuer,
        "the id of the root key that certifies, made by a root-key ceremony with a [certificate]",
    )?;
    let csr_sha256 = intermediate
        .csr_sha256
        .map(|text| sha256_hex("intermediate.csr_sha256", &text))
        .transpose()?;
    let stage = intermediate.stage.unwrap_or(false);
    let raw_certificate = required(
        certificate,
        "certificate",
        "a [certificate] section: the subject and validity",
    )?;
    let (key, certificate) = match (intermediate.key, csr_sha256) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "intermediate.csr_sha256",
                "is given with intermediate.key; certify either a custody key or a CSR, not both",
            ));
        }
        (None, Some(_)) => {
            if stage {
                return Err(invalid(
                    "intermediate.stage",
                    "stages a version of a custody key; a CSR's key is not in custody",
                ));
            }
            (
                String::new(),
                csr_certificate(raw_certificate, "the CSR's (intermediate.csr_sha256)")?,
            )
        }
        (key, None) => {
            let key = key_id(
                "intermediate.key",
                key,
                "the id of the custody key whose public key is certified (or csr_sha256: the SHA-256 of a PKCS#10 CSR)",
            )?;
            if issuer == key {
                return Err(invalid(
                    "intermediate.key",
                    "is the issuer itself; a root certifies another key",
                ));
            }
            (key, certificate_section(raw_certificate)?)
        }
    };
    let profile = profile(required(
        raw_profile,
        "profile",
        "a [profile] section: the subordinate CA profile",
    )?)?;
    Ok(Kind::Intermediate {
        issuer,
        key,
        csr_sha256,
        certificate_sha256: None,
        stage,
        certificate,
        profile,
    })
}

/// The kind of a `cross-sign` script: `[cross_sign]` names the root key that
/// re-issues and the existing CA certificate (by SHA-256) whose subject and
/// key it re-issues; `[certificate]` gives the validity only (the subject is
/// the certificate's), `[profile]` the subordinate CA profile. It runs as an
/// intermediate ceremony whose subject comes from that certificate.
pub(super) fn cross_sign_kind(
    cross_sign: Option<RawCrossSign>,
    certificate: Option<RawCertificate>,
    raw_profile: Option<RawProfile>,
) -> Result<Kind, ScriptError> {
    let cross_sign = required(
        cross_sign,
        "cross_sign",
        "a [cross_sign] section naming the issuer and the certificate",
    )?;
    let issuer = key_id(
        "cross_sign.issuer",
        cross_sign.issuer,
        "the id of the root key that re-issues, made by a root-key ceremony with a [certificate]",
    )?;
    let certificate_sha256 = sha256_hex(
        "cross_sign.certificate_sha256",
        &required(
            cross_sign.certificate_sha256,
            "cross_sign.certificate_sha256",
            "the SHA-256 of the CA certificate file re-issued (64 hex digits)",
        )?,
    )?;
    let certificate = csr_certificate(
        required(
            certificate,
            "certificate",
            "a [certificate] section: the validity",
        )?,
        "the certificate's (cross_sign.certificate_sha256)",
    )?;
    let profile = profile(required(
        raw_profile,
        "profile",
        "a [profile] section: the subordinate CA profile",
    )?)?;
    Ok(Kind::Intermediate {
        issuer,
        key: String::new(),
        csr_sha256: None,
        certificate_sha256: Some(Box::new(certificate_sha256)),
        stage: false,
        certificate,
        profile,
    })
}

/// 64 hex digits: a SHA-256.
fn sha256_hex(field: &str, text: &str) -> Result<[u8; 32], ScriptError> {
    hex::decode(text)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| invalid(field, format!("{text:?} is not a SHA-256: 64 hex digits")))
}

/// `[certificate]` of a CSR's certificate: the validity only, since the
/// subject is the CSR's; a name given here would not be the one certified.
fn csr_certificate(raw: RawCertificate, whose: &str) -> Result<CertificateSection, ScriptError> {
    for (field, given) in [
        ("certificate.country", raw.country.is_some()),
        ("certificate.organization", raw.organization.is_some()),
        ("certificate.common_name", raw.common_name.is_some()),
    ] {
        if given {
            return Err(invalid(
                field,
                format!("leave it out: the subject is {whose}"),
            ));
        }
    }
    let days = required(
        raw.validity_days,
        "certificate.validity_days",
        "1 to 9125 days",
    )?;
    let validity_days = u32::try_from(days)
        .ok()
        .filter(|d| (1..=9125).contains(d))
        .ok_or_else(|| {
            invalid(
                "certificate.validity_days",
                format!("{days} is not allowed; 1 to 9125 days (25 years)"),
            )
        })?;
    Ok(CertificateSection {
        country: String::new(),
        organization: String::new(),
        common_name: String::new(),
        validity_days,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use crate::ceremony::script::fixtures::INTERMEDIATE;
    use crate::ceremony::script::{Kind, Script, Step};

    fn refused(from: &str, to: &str) -> String {
        assert!(INTERMEDIATE.contains(from), "{from}");
        Script::parse(&INTERMEDIATE.replace(from, to))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_reviewed_example_parses_with_its_profile_and_plan() {
        let script = Script::parse(INTERMEDIATE).unwrap();
        assert_eq!(script.kind_name(), "intermediate");
        assert_eq!(script.key(), None);
        let Kind::Intermediate {
            issuer,
            key,
            certificate,
            profile,
            stage,
            csr_sha256: None,
            certificate_sha256: None,
        } = script.kind()
        else {
            panic!("not intermediate");
        };
        assert_eq!((issuer.as_str(), key.as_str()), ("root-ca", "issuing-ca"));
        assert!(!stage);
        assert_eq!(certificate.validity_days, 1825);
        assert_eq!(profile.path_len, Some(0));
        assert!(!profile.digital_signature);
        assert_eq!(profile.extended_key_usage, ["serverAuth", "clientAuth"]);
        assert_eq!(profile.certificate_policies, ["2.23.140.1.2.1"]);
        assert_eq!(
            script.steps(),
            [
                Step::SignIn,
                Step::Tbs,
                Step::Confirm,
                Step::Certify,
                Step::Commit
            ]
        );
        let plan = script.plan().join("\n");
        assert!(plan.contains("TBS SHA-256 aloud"), "{plan}");
        let summary = script.render_summary();
        assert!(summary.contains("pathLen 0"), "{summary}");
        assert!(summary.contains("policies 2.23.140.1.2.1"), "{summary}");
    }

    #[test]
    fn a_staging_script_stages_before_the_tbs_and_says_so() {
        let staging = INTERMEDIATE.replace(
            "key = \"issuing-ca\"\n",
            "key = \"issuing-ca\"\nstage = true\n",
        );
        let script = Script::parse(&staging).unwrap();
        assert!(matches!(
            script.kind(),
            Kind::Intermediate { stage: true, .. }
        ));
        assert_eq!(
            script.steps(),
            [
                Step::SignIn,
                Step::Stage,
                Step::Tbs,
                Step::Confirm,
                Step::Certify,
                Step::Commit
            ]
        );
        let plan = script.plan().join("\n");
        assert!(plan.contains("2. stage: "), "{plan}");
        assert!(plan.contains("ROTATE and SET_STATE"), "{plan}");
        assert!(plan.contains("staged version"), "{plan}");
        assert!(script.render_summary().contains("a staged version"));
        let error = refused(
            "key = \"issuing-ca\"\n",
            "key = \"issuing-ca\"\nstage = \"yes\"\n",
        );
        assert!(error.contains("expected a boolean"), "{error}");
    }

    /// The reviewed example certifying a CSR instead of `issuing-ca`.
    fn csr_script() -> String {
        INTERMEDIATE
            .replace(
                "key = \"issuing-ca\"\n",
                &format!("csr_sha256 = \"{}\"\n", "ab".repeat(32)),
            )
            .replace("country = \"DE\"\n", "")
            .replace("organization = \"Custody Demo\"\n", "")
            .replace("common_name = \"Custody Demo Issuing CA\"\n", "")
    }

    #[test]
    fn a_csr_script_certifies_the_csr_named_by_sha256_with_the_scripts_profile() {
        let script = Script::parse(&csr_script()).unwrap();
        let Kind::Intermediate {
            key,
            csr_sha256: Some(csr),
            certificate,
            stage: false,
            ..
        } = script.kind()
        else {
            panic!("not a CSR intermediate");
        };
        assert!(key.is_empty());
        assert_eq!(csr, &[0xab; 32]);
        assert_eq!(certificate.validity_days, 1825);
        let plan = script.plan().join("\n");
        assert!(plan.contains(&"ab".repeat(32)), "{plan}");
        assert!(
            plan.contains("ignoring any extension the CSR requests"),
            "{plan}"
        );
        assert!(plan.contains("--certificate-out"), "{plan}");
        assert!(script.render_summary().contains("PKCS#10 CSR"));
    }

    #[test]
    fn a_csr_script_names_the_field_at_fault() {
        let both = csr_script().replace(
            "csr_sha256 = \"ab",
            "key = \"issuing-ca\"\ncsr_sha256 = \"ab",
        );
        let cases = [
            (
                both,
                "intermediate.csr_sha256: is given with intermediate.key",
            ),
            (
                csr_script().replace(&"ab".repeat(32), "abcd"),
                "intermediate.csr_sha256: \"abcd\" is not a SHA-256",
            ),
            (
                csr_script().replace(
                    "validity_days = 1825",
                    "country = \"DE\"\nvalidity_days = 1825",
                ),
                "certificate.country: leave it out: the subject is the CSR's",
            ),
            (
                csr_script().replace(
                    "validity_days = 1825",
                    "common_name = \"X\"\nvalidity_days = 1825",
                ),
                "certificate.common_name: leave it out",
            ),
            (
                csr_script().replace("validity_days = 1825", "validity_days = 0"),
                "certificate.validity_days: 0 is not allowed",
            ),
            (
                csr_script().replace("csr_sha256 = \"ab", "stage = true\ncsr_sha256 = \"ab"),
                "intermediate.stage: stages a version of a custody key",
            ),
        ];
        for (text, expected) in cases {
            let error = Script::parse(&text).unwrap_err().to_string();
            assert!(error.contains(expected), "{expected}: {error}");
        }
    }

    #[test]
    fn every_profile_field_is_checked_and_named() {
        let cases = [
            (
                "issuer = \"root-ca\"",
                "issuer = \"issuing-ca\"",
                "intermediate.key: is the issuer itself",
            ),
            (
                "issuer = \"root-ca\"",
                "issuer = \"Root\"",
                "intermediate.issuer: \"Root\" is not a key id",
            ),
            ("key = \"issuing-ca\"\n", "", "intermediate.key: missing"),
            (
                "path_len = 0",
                "path_len = 256",
                "profile.path_len: 256 is not allowed",
            ),
            (
                "path_len = 0",
                "path_len = -1",
                "profile.path_len: -1 is not allowed",
            ),
            (
                "key_usage = [\"keyCertSign\", \"cRLSign\"]",
                "key_usage = [\"keyCertSign\"]",
                "profile.key_usage: lacks cRLSign",
            ),
            (
                "key_usage = [\"keyCertSign\", \"cRLSign\"]",
                "key_usage = [\"keyCertSign\", \"cRLSign\", \"keyAgreement\"]",
                "profile.key_usage: \"keyAgreement\" is not allowed",
            ),
            (
                "key_usage = [\"keyCertSign\", \"cRLSign\"]",
                "key_usage = [\"keyCertSign\", \"cRLSign\", \"cRLSign\"]",
                "is listed twice",
            ),
            (
                "[\"serverAuth\", \"clientAuth\"]",
                "[\"anyExtendedKeyUsage\"]",
                "profile.extended_key_usage: \"anyExtendedKeyUsage\" is not allowed",
            ),
            (
                "# permitted_dns_names = [\"example.com\"]",
                "permitted_dns_names = [\"Example.com\"]",
                "profile.permitted_dns_names: \"Example.com\" is not a DNS name",
            ),
            (
                "# excluded_dns_names = [\"internal.example.com\"]",
                "excluded_dns_names = [\"a..b\"]",
                "profile.excluded_dns_names",
            ),
            (
                "[\"2.23.140.1.2.1\"]",
                "[\"dv\"]",
                "profile.certificate_policies: \"dv\" is not a dotted object identifier",
            ),
            (
                "http://crl.example.com/root.crl",
                "https://crl.example/root.crl",
                "profile.crl_distribution_points: \"https://crl.example/root.crl\" is not an http:// URI",
            ),
            (
                "# ocsp = [\"http://ocsp.example.com\"]",
                "ocsp = [\"http://a b\"]",
                "profile.ocsp",
            ),
            (
                "ca_issuers = [\"http://pki.example.com/root.crt\"]",
                "ca_issuers = [\"http://\"]",
                "profile.ca_issuers",
            ),
            (
                "validity_days = 1825",
                "validity_days = 0",
                "certificate.validity_days: 0 is not allowed",
            ),
            (
                "[profile]",
                "[key]\nname = \"x\"\n[profile]",
                "key: this section does not belong here",
            ),
            ("[profile]\n", "[profile]\nextra = 1\n", "unknown field"),
        ];
        for (from, to, expected) in cases {
            let error = refused(from, to);
            assert!(error.contains(expected), "{from} -> {to}: {error}");
        }
        let no_profile = INTERMEDIATE.split("[profile]").next().unwrap();
        let error = Script::parse(no_profile).unwrap_err().to_string();
        assert!(error.starts_with("profile: missing"), "{error}");
        let root = Script::parse(crate::ceremony::script::fixtures::ROOT_KEY).unwrap();
        assert_eq!(root.kind_name(), "root-key");
        let with_profile = format!(
            "{}\n[profile]\npath_len = 0\n",
            crate::ceremony::script::fixtures::ROOT_KEY
        );
        let error = Script::parse(&with_profile).unwrap_err().to_string();
        assert!(
            error.starts_with("profile: this section does not belong here"),
            "{error}"
        );
    }
}
