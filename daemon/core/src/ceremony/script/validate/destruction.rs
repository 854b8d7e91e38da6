//! The rules of a `key-destruction` script: `[destruction]` names the key
//! and the versions whose approved, scheduled destruction the ceremony
//! witnesses. Whether each is scheduled, due, not held and not in use is
//! checked when the ceremony opens and again just before anything is
//! destroyed ([`crate::keys::check_due`]); the script only says which.

use super::super::raw::RawDestruction;
use super::super::{DestructionSection, Kind};
use super::intermediate::key_id;
use super::{ScriptError, invalid, required};

/// Versions one ceremony may destroy.
const MAX_VERSIONS: usize = 64;

/// The kind of a `key-destruction` script, from its `[destruction]`
/// section; `others` says which other sections the file has (none may be).
pub(super) fn kind(
    destruction: Option<RawDestruction>,
    others: &[(&str, bool)],
) -> Result<Kind, ScriptError> {
    if let Some((name, _)) = others.iter().find(|(_, present)| *present) {
        return Err(invalid(
            name,
            "this section does not belong here: a key-destruction script has [quorum] and [destruction]",
        ));
    }
    let destruction = required(
        destruction,
        "destruction",
        "a [destruction] section naming the key and the versions",
    )?;
    let key = key_id(
        "destruction.key",
        destruction.key,
        "the id of the key whose versions are destroyed",
    )?;
    let raw = required(
        destruction.versions,
        "destruction.versions",
        "the version numbers to destroy, such as [1, 2]",
    )?;
    if raw.is_empty() || raw.len() > MAX_VERSIONS {
        return Err(invalid(
            "destruction.versions",
            format!("{} versions; 1 to {MAX_VERSIONS}", raw.len()),
        ));
    }
    let mut versions = Vec::with_capacity(raw.len());
    for n in raw {
        let version = u32::try_from(n).ok().filter(|v| *v >= 1).ok_or_else(|| {
            invalid(
                "destruction.versions",
                format!("{n} is not a version number; versions count from 1"),
            )
        })?;
        if versions.contains(&version) {
            return Err(invalid(
                "destruction.versions",
                format!("version {version} is listed twice"),
            ));
        }
        versions.push(version);
    }
    versions.sort_unstable();
    Ok(Kind::KeyDestruction(DestructionSection { key, versions }))
}

#[cfg(test)]
mod tests {
    use crate::ceremony::script::fixtures::KEY_DESTRUCTION;
    use crate::ceremony::script::{Kind, Script};

    #[test]
    fn the_example_parses_and_names_its_key_and_versions() {
        let script = Script::parse(KEY_DESTRUCTION).unwrap();
        assert_eq!(script.kind_name(), "key-destruction");
        let Kind::KeyDestruction(section) = script.kind() else {
            panic!("{:?}", script.kind());
        };
        assert_eq!(section.key, "old-root");
        assert_eq!(section.versions, [1]);
        assert!(script.key().is_none() && script.custodians().is_empty());
    }

    #[test]
    fn bad_versions_and_foreign_sections_are_refused_naming_the_field() {
        for (from, to, field) in [
            ("versions = [1]", "versions = []", "destruction.versions"),
            ("versions = [1]", "versions = [0]", "destruction.versions"),
            (
                "versions = [1]",
                "versions = [2, 2]",
                "destruction.versions",
            ),
            ("versions = [1]", "versions = [-3]", "destruction.versions"),
            (
                "key = \"old-root\"",
                "key = \"Old Root\"",
                "destruction.key",
            ),
            ("[destruction]", "[key]\nname = \"x\"\n[destruction]", "key"),
        ] {
            let text = KEY_DESTRUCTION.replace(from, to);
            let error = Script::parse(&text).unwrap_err();
            assert_eq!(error.field(), Some(field), "{to}: {error}");
        }
        let missing = KEY_DESTRUCTION.replace("[destruction]", "[crl]");
        assert!(Script::parse(&missing).is_err());
    }
}
