//! Ceremony scripts (TOML), as custodyd reads them at `StartCeremony` and
//! custodyctl at `ceremony check` (`Script::parse`: parse and validate).
//! A script has no signature: what officers review is its digest. So the
//! property is that whatever parses passed every rule; here the rules are
//! checked again from outside, on what the parsed script says.

use std::collections::BTreeSet;

use custody_core::algorithms::{KeyAlgorithm, Purpose};
use custody_core::ceremony::script::{KekMode, Kind, Script, ScriptError, script_digest};
use custody_core::identity::valid_principal_name;
use proptest::prelude::*;

use super::{as_text, config, edits, mutate};

const ROOT_KEY: &str = r#"
format = 1
id = "root-2026"
kind = "root-key"
description = "Root CA key for Example Corp"

[quorum]
officers = ["alice", "bob", "carol"]
required = 2

[key]
name = "root-ca"
algorithm = "EC_SIGN_P384_SHA384"
backup = true
signers = ["ca-issuing"]

[key.policy]
SIGN = { officers = ["alice", "bob", "carol"], required = 3 }

[certificate]
country = "DE"
common_name = "Example Root CA"
organization = "Example Corp"
validity_days = 3650
"#;

const KEK_GENERATE: &str = r#"
format = 1
id = "kek-2026"
kind = "kek"
description = "Data KEK"

[quorum]
officers = ["alice", "bob", "carol"]
required = 2

[key]
name = "data-kek"
algorithm = "AES_256_GCM"

[kek]
mode = "generate"

[shares]
threshold = 2
custodians = ["alice", "bob", "carol"]
encrypt_to_officer_keys = true
"#;

const KEK_COMPONENTS: &str = r#"
format = 1
id = "kek-components"
kind = "kek"
description = "Legacy KEK from components"

[quorum]
officers = ["alice", "bob"]
required = 2

[key]
name = "legacy-kek"
algorithm = "AES_256_GCM"
backup = false

[kek]
mode = "components"

[components]
custodians = ["dave", "erin", "frank"]
"#;

const RESTORE: &str = r#"
format = 1
id = "restore-drill"
kind = "restore"
description = "Quarterly restore drill"

[quorum]
officers = ["alice", "bob", "carol"]
required = 3

[restore]
bundle = "backups/backup.json"
bundle_sha256 = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
audit_key_sha256 = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100"
drill = true
custodians = ["alice", "bob", "carol"]
"#;

const INTERMEDIATE: &str = include_str!("../../../../deploy/ceremonies/intermediate.toml");

const CRL: &str = include_str!("../../../../deploy/ceremonies/crl.toml");

const KEY_DESTRUCTION: &str = include_str!("../../../../deploy/ceremonies/key-destruction.toml");

const SCRIPTS: [&str; 7] = [
    ROOT_KEY,
    KEK_GENERATE,
    KEK_COMPONENTS,
    RESTORE,
    INTERMEDIATE,
    CRL,
    KEY_DESTRUCTION,
];

fn distinct(names: &[String], min: usize, max: usize) -> Result<(), TestCaseError> {
    let set: BTreeSet<&String> = names.iter().collect();
    prop_assert_eq!(set.len(), names.len(), "a name listed twice: {:?}", names);
    prop_assert!((min..=max).contains(&names.len()), "{} names", names.len());
    for name in names {
        // Officer ids are principal names, as officers are enrolled.
        prop_assert!(valid_principal_name(name), "name {name:?}");
    }
    Ok(())
}

fn text_ok(text: &str, max: usize) -> Result<(), TestCaseError> {
    prop_assert!(!text.trim().is_empty());
    prop_assert!(
        custody_core::text::problem(text, max).is_none(),
        "text {text:?}"
    );
    Ok(())
}

/// Every rule of a script, checked again on the parsed result.
fn fully_valid(script: &Script, text: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(script.digest(), script_digest(text.as_bytes()));
    prop_assert!(custody_core::names::is_identifier(script.id(), 48));
    text_ok(script.description(), 500)?;
    let quorum = script.quorum();
    let members = quorum.members.len();
    prop_assert!(quorum.required >= 2 && quorum.required as usize <= members);
    distinct(script.officers(), 2, 16)?;
    prop_assert_eq!(members, script.officers().len());
    if let Some(key) = script.key() {
        prop_assert!(custody_core::names::check_key_id(&key.name).is_ok());
        let signers: BTreeSet<&String> = key.signers.iter().collect();
        prop_assert_eq!(signers.len(), key.signers.len());
        prop_assert!(key.signers.iter().all(|s| valid_principal_name(s)));
        for (kind, policy) in &key.policy {
            prop_assert!(!kind.is_empty());
            // No policy weaker than the administrative quorum the script
            // can be started under, and only of officers.
            prop_assert!(policy.required >= 2 && policy.required as usize <= policy.members.len());
        }
    }
    match script.kind() {
        Kind::RootKey { key, certificate } => {
            prop_assert_eq!(key.algorithm.purpose(), Purpose::AsymmetricSign);
            if let Some(certificate) = certificate {
                text_ok(&certificate.common_name, 64)?;
                text_ok(&certificate.organization, 64)?;
                prop_assert!(
                    certificate.country.len() == 2
                        && certificate.country.bytes().all(|b| b.is_ascii_uppercase())
                );
                prop_assert!((1..=9125).contains(&certificate.validity_days));
            }
        }
        Kind::Kek { key, mode } => {
            prop_assert_eq!(key.algorithm, KeyAlgorithm::Aes256Gcm);
            match mode {
                KekMode::Generate { shares } => {
                    distinct(&shares.custodians, 2, 99)?;
                    prop_assert!(shares.threshold >= 2);
                    prop_assert!(usize::from(shares.threshold) <= shares.custodians.len());
                }
                KekMode::Components { custodians } => distinct(custodians, 2, 16)?,
            }
        }
        Kind::Restore {
            bundle, custodians, ..
        } => {
            prop_assert!(!bundle.as_os_str().is_empty());
            distinct(custodians, 2, 99)?;
        }
        Kind::Intermediate {
            issuer,
            key,
            certificate,
            profile,
            ..
        } => {
            prop_assert!(custody_core::names::check_key_id(issuer).is_ok());
            prop_assert!(custody_core::names::check_key_id(key).is_ok());
            prop_assert_ne!(issuer, key);
            text_ok(&certificate.common_name, 64)?;
            prop_assert!((1..=9125).contains(&certificate.validity_days));
            for uri in profile
                .crl_distribution_points
                .iter()
                .chain(&profile.ocsp)
                .chain(&profile.ca_issuers)
            {
                prop_assert!(
                    uri.starts_with("http://") && uri.bytes().all(|b| b.is_ascii_graphic())
                );
            }
            for name in profile.extended_key_usage.iter() {
                prop_assert!(
                    custody_core::ceremony::script::EXTENDED_KEY_USAGES.contains(&name.as_str())
                );
            }
        }
        Kind::KeyDestruction(section) => {
            prop_assert!(custody_core::names::check_key_id(&section.key).is_ok());
            prop_assert!(!section.versions.is_empty() && section.versions.len() <= 64);
            prop_assert!(section.versions.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(section.versions[0] >= 1);
        }
        Kind::Crl(crl) => {
            prop_assert!(custody_core::names::check_key_id(&crl.issuer).is_ok());
            prop_assert!((1..=365).contains(&crl.next_update_days));
            prop_assert!(crl.revoked.len() <= 500);
            for (i, entry) in crl.revoked.iter().enumerate() {
                prop_assert!(!entry.serial.is_empty() && entry.serial.len() <= 20);
                prop_assert!(entry.serial[0] != 0);
                prop_assert!(crl.revoked[..i].iter().all(|e| e.serial != entry.serial));
                prop_assert!(
                    custody_core::ceremony::script::CRL_REASONS
                        .iter()
                        .any(|(name, _)| *name == entry.reason)
                );
            }
        }
    }
    // What officers read renders, and reading the text again gives the same.
    prop_assert!(!script.plan().is_empty());
    prop_assert!(!script.render_summary().is_empty());
    prop_assert_eq!(&Script::parse(text).expect("parses again"), script);
    Ok(())
}

/// A TOML value of a kind scripts use, or one they do not.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        (-3i64..20).prop_map(|n| n.to_string()),
        Just("4294967297".to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        "[a-z][a-z0-9-]{0,12}".prop_map(|s| format!("{s:?}")),
        ".{0,20}".prop_map(|s| format!("{s:?}")),
        Just("\"\"".to_string()),
        proptest::sample::select(vec![
            "root-key",
            "kek",
            "restore",
            "intermediate",
            "generate",
            "components",
            "AES_256_GCM",
            "EC_SIGN_P256_SHA256",
            "RSA_SIGN_PSS_2048_SHA256",
            "SIGN"
        ])
        .prop_map(|s| format!("{s:?}")),
        proptest::collection::vec(
            proptest::sample::select(vec!["alice", "bob", "carol", "dave", "erin", "alice", ""]),
            0..5,
        )
        .prop_map(|names| format!("{names:?}")),
        "[0-9a-f]{64}".prop_map(|s| format!("{s:?}")),
    ]
}

/// A script from random sections and fields of the real format.
fn random_script() -> impl Strategy<Value = String> {
    let fields = |names: Vec<&'static str>| {
        proptest::collection::vec((proptest::sample::select(names), value()), 0..6)
    };
    (
        fields(vec![
            "format",
            "id",
            "kind",
            "description",
            "format",
            "extra",
        ]),
        proptest::collection::vec(
            (
                proptest::sample::select(vec![
                    "quorum",
                    "key",
                    "key.policy",
                    "certificate",
                    "kek",
                    "shares",
                    "components",
                    "restore",
                    "intermediate",
                    "profile",
                    "other",
                ]),
                fields(vec![
                    "officers",
                    "required",
                    "name",
                    "algorithm",
                    "backup",
                    "signers",
                    "SIGN",
                    "ROTATE",
                    "common_name",
                    "organization",
                    "country",
                    "validity_days",
                    "mode",
                    "threshold",
                    "custodians",
                    "encrypt_to_officer_keys",
                    "bundle",
                    "bundle_sha256",
                    "audit_key_sha256",
                    "drill",
                    "issuer",
                    "key",
                    "path_len",
                    "key_usage",
                    "ocsp",
                ]),
            ),
            0..6,
        ),
    )
        .prop_map(|(top, sections)| {
            let mut text = String::new();
            for (name, value) in top {
                text.push_str(&format!("{name} = {value}\n"));
            }
            for (section, fields) in sections {
                text.push_str(&format!("\n[{section}]\n"));
                for (name, value) in fields {
                    text.push_str(&format!("{name} = {value}\n"));
                }
            }
            text
        })
}

#[test]
fn f6_the_script_fixtures_are_fully_valid() {
    for text in SCRIPTS {
        let script = Script::parse(text).expect("a fixture parses");
        proptest::test_runner::TestRunner::default()
            .run(&Just(()), |()| fully_valid(&script, text))
            .expect("a fixture passes every rule");
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn f6_a_changed_script_is_refused_or_passes_every_rule(
        which in 0usize..5,
        edits in edits(),
    ) {
        let text = as_text(&mutate(SCRIPTS[which].as_bytes(), &edits));
        let parsed: Result<Script, ScriptError> = Script::parse(&text);
        if let Ok(script) = parsed {
            fully_valid(&script, &text)?;
        }
    }

    #[test]
    fn f6_a_random_script_is_refused_or_passes_every_rule(text in random_script()) {
        if let Ok(script) = Script::parse(&text) {
            fully_valid(&script, &text)?;
        }
    }

    #[test]
    fn f6_arbitrary_text_never_panics_the_script_parser(text in ".{0,300}") {
        let _ = Script::parse(&text);
    }
}
