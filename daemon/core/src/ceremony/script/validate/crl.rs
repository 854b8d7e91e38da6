//! The rules of a `crl` script: `[crl]` names the root key that signs, how
//! long the CRL stays current, and the certificates it revokes, each with
//! its serial, RFC 5280 reason and revocation time. Whether the root
//! exists with a certificate is checked when the ceremony opens; whether
//! the CRL fits under it (its dates, its name) by the lint before the HSM
//! signs.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::super::raw::{RawCrl, RawRevoked};
use super::super::{CRL_REASONS, CrlSection, Kind, RevokedEntry};
use super::intermediate::key_id;
use super::{ScriptError, invalid, required};

/// The Baseline Requirements (4.9.7) allow a CA's CRL 12 months at most.
const MAX_NEXT_UPDATE_DAYS: i64 = 365;
/// Entries one CRL script may list.
const MAX_REVOKED: usize = 500;
/// RFC 5280 4.1.2.2: a serial is at most 20 octets.
const MAX_SERIAL_OCTETS: usize = 20;

/// A serial as the script writes it: hex (an optional `0x`, `:` between
/// octets allowed, as `openssl x509 -serial` and browsers print it), 1 to
/// 20 octets, not zero; leading zero octets dropped, as DER drops them.
fn serial(field: &str, text: &str) -> Result<Vec<u8>, ScriptError> {
    let digits: String = text
        .strip_prefix("0x")
        .unwrap_or(text)
        .chars()
        .filter(|c| *c != ':')
        .collect();
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    let bytes = hex::decode(&padded)
        .ok()
        .filter(|b| !b.is_empty())
        .ok_or_else(|| {
            invalid(
                field,
                format!(
                    "{text:?} is not a serial number: hex digits, such as \"3f1e0a9b7c6d5e4f\""
                ),
            )
        })?;
    let significant: Vec<u8> = bytes.into_iter().skip_while(|b| *b == 0).collect();
    if significant.is_empty() {
        return Err(invalid(field, "0 is not a certificate serial number"));
    }
    // A positive INTEGER of 20 octets at most, with the sign octet DER
    // adds when the top bit is set.
    let encoded = significant.len() + usize::from(significant[0] & 0x80 != 0);
    if encoded > MAX_SERIAL_OCTETS {
        return Err(invalid(
            field,
            format!("{text:?} is longer than {MAX_SERIAL_OCTETS} octets as a DER INTEGER"),
        ));
    }
    Ok(significant)
}

fn reason(field: &str, text: &str) -> Result<String, ScriptError> {
    if CRL_REASONS.iter().any(|(name, _)| *name == text) {
        return Ok(text.to_owned());
    }
    let names: Vec<&str> = CRL_REASONS.iter().map(|(name, _)| *name).collect();
    Err(invalid(
        field,
        format!(
            "{text:?} is not allowed; one of: {} (certificateHold, removeFromCRL and aACompromise are not for a CA's full CRL)",
            names.join(", ")
        ),
    ))
}

fn revoked_at(field: &str, text: &str) -> Result<i64, ScriptError> {
    OffsetDateTime::parse(text, &Rfc3339)
        .ok()
        .filter(|t| text.ends_with('Z') && t.offset().is_utc())
        .map(OffsetDateTime::unix_timestamp)
        .ok_or_else(|| {
            invalid(
                field,
                format!(
                    "{text:?} is not an RFC 3339 time in UTC, such as \"2026-01-15T00:00:00Z\""
                ),
            )
        })
}

fn entry(i: usize, raw: RawRevoked) -> Result<RevokedEntry, ScriptError> {
    let field = |name: &str| format!("crl.revoked[{i}].{name}");
    let serial_text = required(
        raw.serial,
        &field("serial"),
        "the revoked certificate's serial number, as hex",
    )?;
    let reason_text = required(
        raw.reason,
        &field("reason"),
        "an RFC 5280 reason, such as \"keyCompromise\"",
    )?;
    let at = required(
        raw.revoked_at,
        &field("revoked_at"),
        "when the revocation took effect, RFC 3339 in UTC",
    )?;
    Ok(RevokedEntry {
        serial: serial(&field("serial"), &serial_text)?,
        reason: reason(&field("reason"), &reason_text)?,
        revoked_at: revoked_at(&field("revoked_at"), &at)?,
    })
}

/// The kind of a `crl` script, from its `[crl]` section (the caller refused
/// the sections it does not have).
pub(super) fn kind(crl: Option<RawCrl>) -> Result<Kind, ScriptError> {
    let crl = required(
        crl,
        "crl",
        "a [crl] section naming the issuer, next_update_days and the revoked certificates",
    )?;
    let issuer = key_id(
        "crl.issuer",
        crl.issuer,
        "the id of the root key that signs, made by a root-key ceremony with a [certificate]",
    )?;
    let days = required(
        crl.next_update_days,
        "crl.next_update_days",
        "days from thisUpdate to nextUpdate, 1 to 365",
    )?;
    if !(1..=MAX_NEXT_UPDATE_DAYS).contains(&days) {
        return Err(invalid(
            "crl.next_update_days",
            format!("{days} is not allowed; 1 to {MAX_NEXT_UPDATE_DAYS} (12 months at most)"),
        ));
    }
    let raw_revoked = crl.revoked.unwrap_or_default();
    if raw_revoked.len() > MAX_REVOKED {
        return Err(invalid(
            "crl.revoked",
            format!("{} listed; at most {MAX_REVOKED}", raw_revoked.len()),
        ));
    }
    let mut revoked: Vec<RevokedEntry> = Vec::with_capacity(raw_revoked.len());
    for (i, raw) in raw_revoked.into_iter().enumerate() {
        let entry = entry(i, raw)?;
        if revoked.iter().any(|e| e.serial == entry.serial) {
            return Err(invalid(
                &format!("crl.revoked[{i}].serial"),
                format!(
                    "{} is listed twice: each serial once",
                    hex::encode(&entry.serial)
                ),
            ));
        }
        revoked.push(entry);
    }
    Ok(Kind::Crl(CrlSection {
        issuer,
        next_update_days: u32::try_from(days).unwrap_or(1),
        revoked,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use crate::ceremony::script::fixtures::CRL;
    use crate::ceremony::script::{Kind, Script, Step};

    fn refused(from: &str, to: &str) -> String {
        assert!(CRL.contains(from), "{from}");
        Script::parse(&CRL.replace(from, to))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_reviewed_example_parses_with_its_entries_and_plan() {
        let script = Script::parse(CRL).unwrap();
        assert_eq!(script.kind_name(), "crl");
        assert_eq!(script.key(), None);
        let Kind::Crl(crl) = script.kind() else {
            panic!("not crl");
        };
        assert_eq!(crl.issuer, "root-ca");
        assert_eq!(crl.next_update_days, 30);
        assert_eq!(crl.revoked.len(), 1);
        assert_eq!(hex::encode(&crl.revoked[0].serial), "3f1e0a9b7c6d5e4f");
        assert_eq!(crl.revoked[0].reason, "keyCompromise");
        assert_eq!(crl.revoked[0].revoked_at, 1_768_435_200);
        assert_eq!(
            script.steps(),
            [
                Step::SignIn,
                Step::Tbs,
                Step::Confirm,
                Step::SignCrl,
                Step::Commit
            ]
        );
        let plan = script.plan().join("\n");
        assert!(plan.contains("next CRL number"), "{plan}");
        assert!(plan.contains("TBS SHA-256 aloud"), "{plan}");
        let summary = script.render_summary();
        assert!(
            summary.contains("3f1e0a9b7c6d5e4f keyCompromise 2026-01-15T00:00:00Z"),
            "{summary}"
        );
    }

    #[test]
    fn every_crl_field_is_checked_and_named() {
        let second = "\n[[crl.revoked]]\nserial = \"3F:1E:0A:9B:7C:6D:5E:4F\"\nreason = \"superseded\"\nrevoked_at = \"2026-11-02T00:00:00Z\"\n";
        let cases = [
            (
                "issuer = \"root-ca\"",
                "issuer = \"Root\"",
                "crl.issuer: \"Root\" is not a key id",
            ),
            ("issuer = \"root-ca\"\n", "", "crl.issuer: missing"),
            (
                "next_update_days = 30",
                "next_update_days = 0",
                "crl.next_update_days: 0 is not allowed",
            ),
            (
                "next_update_days = 30",
                "next_update_days = 366",
                "crl.next_update_days: 366 is not allowed",
            ),
            (
                "serial = \"3f1e0a9b7c6d5e4f\"",
                "serial = \"xyz\"",
                "crl.revoked[0].serial: \"xyz\" is not a serial number",
            ),
            (
                "serial = \"3f1e0a9b7c6d5e4f\"",
                "serial = \"00\"",
                "crl.revoked[0].serial: 0 is not",
            ),
            (
                "serial = \"3f1e0a9b7c6d5e4f\"",
                "serial = \"ff0102030405060708090a0b0c0d0e0f10111213\"",
                "longer than 20 octets",
            ),
            (
                "reason = \"keyCompromise\"",
                "reason = \"certificateHold\"",
                "crl.revoked[0].reason: \"certificateHold\" is not allowed",
            ),
            (
                "reason = \"keyCompromise\"",
                "reason = \"KeyCompromise\"",
                "crl.revoked[0].reason",
            ),
            (
                "revoked_at = \"2026-01-15T00:00:00Z\"",
                "revoked_at = \"2026-11-01T00:00:00+01:00\"",
                "crl.revoked[0].revoked_at: \"2026-11-01T00:00:00+01:00\" is not an RFC 3339 time in UTC",
            ),
            (
                "revoked_at = \"2026-01-15T00:00:00Z\"",
                "revoked_at = \"yesterday\"",
                "crl.revoked[0].revoked_at",
            ),
            (
                "revoked_at = \"2026-01-15T00:00:00Z\"\n",
                &format!("revoked_at = \"2026-01-15T00:00:00Z\"\n{second}"),
                "crl.revoked[1].serial: 3f1e0a9b7c6d5e4f is listed twice",
            ),
            (
                "[crl]",
                "[profile]\npath_len = 0\n[crl]",
                "profile: this section does not belong here",
            ),
            ("[crl]\n", "[crl]\nextra = 1\n", "unknown field"),
        ];
        for (from, to, expected) in cases {
            let error = refused(from, to);
            assert!(error.contains(expected), "{from} -> {to}: {error}");
        }
        let no_crl = CRL.split("[crl]").next().unwrap();
        let error = Script::parse(no_crl).unwrap_err().to_string();
        assert!(error.starts_with("crl: missing"), "{error}");
        // No entries: an empty CRL is a CRL.
        let empty = CRL.split("[[crl.revoked]]").next().unwrap();
        let Kind::Crl(crl) = Script::parse(empty).unwrap().kind().clone() else {
            panic!("not crl");
        };
        assert!(crl.revoked.is_empty());
        let with_crl = format!(
            "{}\n[crl]\nissuer = \"root-ca\"\n",
            crate::ceremony::script::fixtures::ROOT_KEY
        );
        let error = Script::parse(&with_crl).unwrap_err().to_string();
        assert!(
            error.starts_with("crl: this section does not belong here"),
            "{error}"
        );
    }
}
