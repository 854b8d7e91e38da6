//! How a `crl` script's steps and summary read to the officers.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::Step;
use crate::ceremony::script::CrlSection;

/// A Unix time as the script writes it (RFC 3339, UTC).
pub(crate) fn rfc3339(seconds: i64) -> String {
    OffsetDateTime::from_unix_timestamp(seconds)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{seconds} s"))
}

pub(super) fn describe(step: Step, crl: &CrlSection, present: &str) -> String {
    let issuer = &crl.issuer;
    match step {
        Step::Tbs => format!(
            "custodyd gives the CRL {issuer:?}'s next CRL number (one more than any CRL ceremony of {issuer:?} journaled) and builds the CRL {issuer:?} would sign: thisUpdate now, nextUpdate {} days later, {} revoked certificate(s); it lints it (RFC 5280 and CA/Browser Forum CRL rules, under {issuer:?}'s root certificate) before any signature, and {present} see a summary and its SHA-256",
            crl.next_update_days,
            crl.revoked.len()
        ),
        Step::Confirm => format!(
            "{present} read the TBS SHA-256 aloud as hex (16 groups of 4) and as 12 words, each compares it with the screen, and each signs it with their officer key: the HSM signs nothing else"
        ),
        Step::SignCrl => format!(
            "{issuer:?} signs the confirmed TBS inside the HSM; custodyd verifies the signature with {issuer:?}'s public key before anything leaves it"
        ),
        Step::Commit => "the signed CRL is kept with the ceremony (`custodyctl ceremony status --certificate-out` writes it) and its number stays journaled: no CRL of this issuer gets it again".to_owned(),
        other => format!("(crl has no {} step)", other.name()),
    }
}

pub(super) fn summary(crl: &CrlSection) -> Vec<(&'static str, String)> {
    let mut lines = vec![
        ("issuer", format!("{} (its root certificate)", crl.issuer)),
        (
            "crl",
            format!(
                "nextUpdate {} days after thisUpdate, {} revoked",
                crl.next_update_days,
                crl.revoked.len()
            ),
        ),
    ];
    for entry in &crl.revoked {
        lines.push((
            "revoked",
            format!(
                "{} {} {}",
                hex::encode(&entry.serial),
                entry.reason,
                rfc3339(entry.revoked_at)
            ),
        ));
    }
    lines
}
