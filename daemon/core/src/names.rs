//! Resource names and key ids: `keys/{key_id}` and
//! `keys/{key_id}/versions/{n}`, and the HSM label of a key version.
//! Every name a caller or a file hands custody is checked here, and only
//! here.

use hsm_shim::KeyLabel;

use crate::text::echo;
use crate::{Error, Reason};

/// `keys/{key_id}`: the key id, checked.
pub fn parse_key_name(name: &str) -> Result<&str, Error> {
    let id = name.strip_prefix("keys/").ok_or_else(|| {
        Error::new(
            Reason::BadName,
            format!("{} is not of the form keys/{{key_id}}", echo(name)),
        )
    })?;
    check_key_id(id)?;
    Ok(id)
}

/// `keys/{key_id}` or `keys/{key_id}/versions/{n}`.
pub fn parse_version_name(name: &str) -> Result<(&str, Option<u32>), Error> {
    let bad = || {
        Error::new(
            Reason::BadName,
            format!(
                "{} is not of the form keys/{{key_id}} or keys/{{key_id}}/versions/{{n}}",
                echo(name)
            ),
        )
    };
    let rest = name.strip_prefix("keys/").ok_or_else(bad)?;
    match rest.split_once("/versions/") {
        None => {
            check_key_id(rest)?;
            Ok((rest, None))
        }
        Some((id, version)) => {
            check_key_id(id)?;
            // Canonical decimal only: `01`, `+1` or ` 1` would name version
            // 1 under a second spelling (u32::from_str takes a sign).
            let canonical = !version.is_empty()
                && version.bytes().all(|b| b.is_ascii_digit())
                && !version.starts_with('0');
            let version: u32 = version.parse().ok().filter(|_| canonical).ok_or_else(bad)?;
            Ok((id, Some(version)))
        }
    }
}

/// `keys/{key_id}/versions/{n}`: a name that must name a version.
pub fn parse_exact_version(name: &str) -> Result<(&str, u32), Error> {
    let (key_id, version) = parse_version_name(name)?;
    let version = version.ok_or_else(|| {
        Error::new(
            Reason::BadName,
            "name a version: keys/{key_id}/versions/{n}",
        )
    })?;
    Ok((key_id, version))
}

/// Whether `id` is 1 to `max_len` of `[a-z0-9-]`, starting with a letter:
/// the shape of every identifier custody hands out (key ids, ceremony ids).
pub fn is_identifier(id: &str, max_len: usize) -> bool {
    !id.is_empty()
        && id.len() <= max_len
        && id.as_bytes()[0].is_ascii_lowercase()
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// 1-63 of `[a-z0-9-]`, starting with a letter.
pub fn check_key_id(id: &str) -> Result<(), Error> {
    if is_identifier(id, 63) {
        Ok(())
    } else {
        Err(Error::new(
            Reason::BadKeyId,
            format!(
                "key id {} must be 1-63 lower-case letters, digits or '-', starting with a letter",
                echo(id)
            ),
        ))
    }
}

/// The name of a version.
pub fn version_name(key_id: &str, version: u32) -> String {
    format!("keys/{key_id}/versions/{version}")
}

/// The HSM label of a key version: `key/{key_id}/v{version}`. The `key/`
/// namespace is custody's own for registry keys: no other object custody
/// makes (the audit key is `custody-audit/v1`) can share a label with one.
pub fn hsm_label(key_id: &str, version: u32) -> Result<KeyLabel, Error> {
    KeyLabel::for_version(&format!("key/{key_id}"), version)
        .map_err(|e| Error::new(Reason::BadKeyId, e.to_string()))
}

/// The label prefixes of the HSM objects custodyd makes on its own token:
/// registry key versions (`key/`), restored versions (`restore/`), the audit
/// key (`custody-audit/`), the readiness self-test key (`custody-selftest/`)
/// and trusted backup KEKs (`custody-backup-kek/`).
/// Restore KEKs (`restore-kek/`) are session objects and drill objects
/// (`drill/`) live on the scratch token; neither outlives custodyd.
pub const CUSTODY_LABEL_PREFIXES: [&str; 5] = [
    "key/",
    "restore/",
    "custody-audit/",
    "custody-selftest/",
    "custody-backup-kek/",
];

/// Whether `label` is in a namespace custodyd makes objects under: what a
/// token left by a lost data directory holds (threat model F3).
pub fn is_custody_label(label: &str) -> bool {
    CUSTODY_LABEL_PREFIXES
        .iter()
        .any(|prefix| label.starts_with(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custody_labels_are_those_of_its_namespaces() {
        for label in [
            "key/root-ca/v1",
            "restore/r-1/root-ca/v2",
            "custody-audit/v1",
            "custody-backup-kek/0a1b",
        ] {
            assert!(is_custody_label(label), "{label}");
        }
        for label in [
            "drill/d/k/v1",
            "restore-kek/r-1",
            "keyring",
            "other/key/v1",
            "",
        ] {
            assert!(!is_custody_label(label), "{label}");
        }
    }

    #[test]
    fn names_parse_strictly() {
        assert_eq!(
            parse_version_name("keys/root-ca").unwrap(),
            ("root-ca", None)
        );
        assert_eq!(
            parse_version_name("keys/root-ca/versions/3").unwrap(),
            ("root-ca", Some(3))
        );
        for bad in [
            "",
            "keys/",
            "root-ca",
            "keys/Root",
            "keys/1abc",
            "keys/a/versions/0",
            "keys/a/versions/x",
            "keys/a/versions/",
            "keys/a/b",
            "keys/a/versions/1/extra",
            "keys/a/versions/01",
            "keys/a/versions/+1",
            "keys/a/versions/ 1",
            "keys/a/versions/1 ",
            "keys/a/versions/00",
            "keys/a/versions/4294967296",
        ] {
            let error = parse_version_name(bad).unwrap_err();
            assert!(
                matches!(error.reason, Reason::BadName | Reason::BadKeyId),
                "{bad}: {error}"
            );
        }
        assert!(parse_key_name("keys/a/versions/1").is_err());
        assert_eq!(parse_exact_version("keys/a/versions/7").unwrap(), ("a", 7));
        assert_eq!(
            parse_exact_version("keys/a").unwrap_err().reason,
            Reason::BadName
        );
    }

    #[test]
    fn key_ids_are_bounded_and_lower_case() {
        assert!(check_key_id("a").is_ok());
        assert!(check_key_id(&"a".repeat(63)).is_ok());
        for bad in ["", "A", "-a", "9a", "a_b", "a b", "é"] {
            assert_eq!(
                check_key_id(bad).unwrap_err().reason,
                Reason::BadKeyId,
                "{bad:?}"
            );
        }
        assert_eq!(
            check_key_id(&"a".repeat(64)).unwrap_err().reason,
            Reason::BadKeyId
        );
    }

    #[test]
    fn version_labels_live_under_key() {
        assert_eq!(hsm_label("root-ca", 2).unwrap().as_str(), "key/root-ca/v2");
        assert_eq!(version_name("root-ca", 2), "keys/root-ca/versions/2");
    }
}
