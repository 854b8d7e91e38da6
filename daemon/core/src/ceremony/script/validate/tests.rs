//! Parsing each kind of script, and every rule broken once.

use std::path::Path;

use hsm_shim::KeySpec;

use crate::ceremony::script::fixtures::{KEK_COMPONENTS, KEK_GENERATE, RESTORE, ROOT_KEY};
use crate::ceremony::script::{CertificateSection, KekMode, Kind, Script, ScriptError, Step};
use crate::dual_control::quorum::Quorum;

fn names(script: &Script) -> Vec<&'static str> {
    script.steps().iter().map(Step::name).collect()
}

#[test]
fn a_root_key_script_parses_into_its_sections_and_steps() {
    let script = Script::parse(ROOT_KEY).unwrap();
    assert_eq!(script.id(), "root-2026");
    assert_eq!(script.description(), "Root CA key for Example Corp");
    assert_eq!(
        script.quorum(),
        &Quorum::new(["alice".into(), "bob".into(), "carol".into()], 2).unwrap()
    );
    assert_eq!(script.officers(), ["alice", "bob", "carol"]);
    let Kind::RootKey { key, certificate } = script.kind() else {
        panic!("{:?}", script.kind());
    };
    assert_eq!(key.name, "root-ca");
    assert_eq!(key.algorithm.api_name(), "EC_SIGN_P384_SHA384");
    assert_eq!(key.spec(), KeySpec::EcP384);
    assert!(key.backup);
    assert_eq!(
        certificate,
        &Some(CertificateSection {
            country: "DE".into(),
            organization: "Example Corp".into(),
            common_name: "Example Root CA".into(),
            validity_days: 3650
        })
    );
    assert_eq!(
        names(&script),
        ["sign-in", "generate", "certificate", "confirm", "commit"]
    );

    let without_certificate = ROOT_KEY.split("[certificate]").next().unwrap().to_owned();
    let script = Script::parse(&without_certificate).unwrap();
    assert_eq!(names(&script), ["sign-in", "generate", "confirm", "commit"]);
}

#[test]
fn a_kek_generate_script_parses_with_backup_defaulting_to_true() {
    let script = Script::parse(KEK_GENERATE).unwrap();
    let Kind::Kek {
        key,
        mode: KekMode::Generate { shares },
    } = script.kind()
    else {
        panic!("{:?}", script.kind());
    };
    assert!(key.backup);
    assert_eq!(key.spec(), KeySpec::Aes256);
    assert_eq!(shares.threshold, 2);
    assert_eq!(shares.custodians, ["alice", "bob", "carol"]);
    assert!(shares.encrypt_to_officer_keys);
    assert_eq!(
        names(&script),
        [
            "sign-in",
            "backup-kek",
            "distribute-shares",
            "generate",
            "backup",
            "confirm",
            "commit"
        ]
    );
}

#[test]
fn a_kek_components_script_parses() {
    let script = Script::parse(KEK_COMPONENTS).unwrap();
    let Kind::Kek {
        key,
        mode: KekMode::Components { custodians },
    } = script.kind()
    else {
        panic!("{:?}", script.kind());
    };
    assert!(!key.backup);
    assert_eq!(custodians, &["dave", "erin", "frank"]);
    assert_eq!(
        names(&script),
        ["sign-in", "components", "import", "confirm", "commit"]
    );
    // backup defaults to false in this mode.
    let script = Script::parse(&KEK_COMPONENTS.replace("backup = false\n", "")).unwrap();
    assert!(matches!(script.kind(), Kind::Kek { key, .. } if !key.backup));
}

#[test]
fn a_restore_script_parses_and_a_drill_ends_by_destroying_the_scratch_keys() {
    let script = Script::parse(RESTORE).unwrap();
    let Kind::Restore {
        bundle,
        bundle_sha256,
        audit_key_sha256,
        drill,
        custodians,
    } = script.kind()
    else {
        panic!("{:?}", script.kind());
    };
    assert_eq!(bundle, Path::new("backups/backup.json"));
    assert_eq!(bundle_sha256[..4], [0x00, 0x11, 0x22, 0x33]);
    // No audit key pinned: custodyd then trusts its own or its config's.
    assert_eq!(*audit_key_sha256, None);
    assert!(*drill);
    assert_eq!(custodians.len(), 3);
    assert_eq!(
        names(&script),
        [
            "sign-in",
            "submit-shares",
            "rebuild-kek",
            "unwrap",
            "verify",
            "destroy-scratch"
        ]
    );
    let real = Script::parse(&RESTORE.replace("drill = true", "drill = false")).unwrap();
    assert_eq!(names(&real).last(), Some(&"commit"));
}

#[test]
fn a_restore_script_may_pin_the_audit_key_and_the_digest_covers_the_pin() {
    let pin = "ab".repeat(32);
    let pinned = RESTORE.replace(
        "drill = true\n",
        &format!("drill = true\naudit_key_sha256 = \"{pin}\"\n"),
    );
    let script = Script::parse(&pinned).unwrap();
    let Kind::Restore {
        audit_key_sha256, ..
    } = script.kind()
    else {
        panic!("{:?}", script.kind());
    };
    assert_eq!(*audit_key_sha256, Some([0xab; 32]));
    // Another pin is another script: the officers sign the one they read.
    let other = Script::parse(&pinned.replace(&pin, &"cd".repeat(32))).unwrap();
    assert_ne!(other.digest(), script.digest());
    for bad in ["ab".repeat(31), "zz".repeat(32), String::new()] {
        let err = Script::parse(&pinned.replace(&pin, &bad)).unwrap_err();
        assert_eq!(err.field(), Some("restore.audit_key_sha256"), "{err}");
        assert!(err.to_string().contains("64 hex digits"), "{err}");
    }
}

/// Each rule, broken once: (script, edit, field the error must name).
#[test]
fn every_rule_is_refused_with_an_error_naming_its_field() {
    let cases: &[(&str, &str, &str, &str)] = &[
        // (base, replace this, with this, field)
        (ROOT_KEY, "format = 1", "format = 2", "format"),
        (ROOT_KEY, "format = 1\n", "", "format"),
        (ROOT_KEY, "id = \"root-2026\"", "id = \"Root-2026\"", "id"),
        (ROOT_KEY, "id = \"root-2026\"", "id = \"2026-root\"", "id"),
        (ROOT_KEY, "id = \"root-2026\"", "id = \"root_2026\"", "id"),
        (ROOT_KEY, "id = \"root-2026\"", "id = \"\"", "id"),
        (
            ROOT_KEY,
            "id = \"root-2026\"",
            "id = \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"",
            "id",
        ),
        (ROOT_KEY, "id = \"root-2026\"\n", "", "id"),
        (
            ROOT_KEY,
            "kind = \"root-key\"",
            "kind = \"rootkey\"",
            "kind",
        ),
        (ROOT_KEY, "kind = \"root-key\"\n", "", "kind"),
        (
            ROOT_KEY,
            "description = \"Root CA key for Example Corp\"",
            "description = \"\"",
            "description",
        ),
        (
            ROOT_KEY,
            "description = \"Root CA key for Example Corp\"",
            "description = \"   \"",
            "description",
        ),
        (
            ROOT_KEY,
            "description = \"Root CA key for Example Corp\"",
            &format!("description = \"{}\"", "x".repeat(501)),
            "description",
        ),
        (
            ROOT_KEY,
            "description = \"Root CA key for Example Corp\"",
            "description = \"Root CA\\u001b[2J\"",
            "description",
        ),
        (
            ROOT_KEY,
            "description = \"Root CA key for Example Corp\"",
            "description = \"Root CA \\u202eprC elpmaxE\"",
            "description",
        ),
        (
            ROOT_KEY,
            "description = \"Root CA key for Example Corp\"",
            "description = \"Root\\u200bCA\"",
            "description",
        ),
        (
            ROOT_KEY,
            "description = \"Root CA key for Example Corp\"",
            "description = \"Root CA\\u2066 key\\u2069\"",
            "description",
        ),
        (
            ROOT_KEY,
            "[quorum]\nofficers = [\"alice\", \"bob\", \"carol\"]\nrequired = 2\n",
            "",
            "quorum",
        ),
        (
            ROOT_KEY,
            "officers = [\"alice\", \"bob\", \"carol\"]",
            "officers = [\"alice\"]",
            "quorum.officers",
        ),
        (
            ROOT_KEY,
            "officers = [\"alice\", \"bob\", \"carol\"]",
            "officers = [\"alice\", \"bob\", \"alice\"]",
            "quorum.officers",
        ),
        (
            ROOT_KEY,
            "officers = [\"alice\", \"bob\", \"carol\"]",
            "officers = [\"alice\", \"Bob\", \"carol\"]",
            "quorum.officers",
        ),
        (
            ROOT_KEY,
            "officers = [\"alice\", \"bob\", \"carol\"]",
            &format!(
                "officers = [{}]",
                (0..17)
                    .map(|i| format!("\"o{i}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "quorum.officers",
        ),
        (
            ROOT_KEY,
            "officers = [\"alice\", \"bob\", \"carol\"]",
            &format!("officers = [\"alice\", \"{}\"]", "b".repeat(65)),
            "quorum.officers",
        ),
        (ROOT_KEY, "required = 2", "required = 4", "quorum.required"),
        (ROOT_KEY, "required = 2", "required = 1", "quorum.required"),
        (ROOT_KEY, "required = 2", "required = -1", "quorum.required"),
        (ROOT_KEY, "required = 2\n", "", "quorum.required"),
        (
            ROOT_KEY,
            "[key]\nname = \"root-ca\"\nalgorithm = \"EC_SIGN_P384_SHA384\"\nbackup = true\n",
            "",
            "key",
        ),
        (
            ROOT_KEY,
            "name = \"root-ca\"",
            "name = \"Root-CA\"",
            "key.name",
        ),
        (
            ROOT_KEY,
            "name = \"root-ca\"",
            "name = \"1root\"",
            "key.name",
        ),
        (ROOT_KEY, "name = \"root-ca\"\n", "", "key.name"),
        (
            ROOT_KEY,
            "EC_SIGN_P384_SHA384",
            "EC_SIGN_P384",
            "key.algorithm",
        ),
        (
            ROOT_KEY,
            "EC_SIGN_P384_SHA384",
            "AES_256_GCM",
            "key.algorithm",
        ),
        (
            ROOT_KEY,
            "algorithm = \"EC_SIGN_P384_SHA384\"\n",
            "",
            "key.algorithm",
        ),
        (ROOT_KEY, "backup = true\n", "", "key.backup"),
        (
            ROOT_KEY,
            "EC_SIGN_P384_SHA384",
            "EC_SIGN_ED25519",
            "key.backup",
        ),
        (
            ROOT_KEY,
            "common_name = \"Example Root CA\"",
            "common_name = \"\"",
            "certificate.common_name",
        ),
        (
            ROOT_KEY,
            "common_name = \"Example Root CA\"",
            &format!("common_name = \"{}\"", "c".repeat(65)),
            "certificate.common_name",
        ),
        (
            ROOT_KEY,
            "common_name = \"Example Root CA\"\n",
            "",
            "certificate.common_name",
        ),
        (
            ROOT_KEY,
            "organization = \"Example Corp\"",
            &format!("organization = \"{}\"", "o".repeat(65)),
            "certificate.organization",
        ),
        (
            ROOT_KEY,
            "organization = \"Example Corp\"\n",
            "",
            "certificate.organization",
        ),
        (ROOT_KEY, "country = \"DE\"\n", "", "certificate.country"),
        (
            ROOT_KEY,
            "country = \"DE\"",
            "country = \"de\"",
            "certificate.country",
        ),
        (
            ROOT_KEY,
            "country = \"DE\"",
            "country = \"DEU\"",
            "certificate.country",
        ),
        (
            ROOT_KEY,
            "validity_days = 3650",
            "validity_days = 0",
            "certificate.validity_days",
        ),
        (
            ROOT_KEY,
            "validity_days = 3650",
            "validity_days = 9126",
            "certificate.validity_days",
        ),
        (
            ROOT_KEY,
            "validity_days = 3650\n",
            "",
            "certificate.validity_days",
        ),
        (
            ROOT_KEY,
            "[certificate]",
            "[kek]\nmode = \"generate\"\n[certificate]",
            "kek",
        ),
        (
            ROOT_KEY,
            "[certificate]",
            "[shares]\nthreshold = 2\ncustodians = [\"a\", \"b\"]\n[certificate]",
            "shares",
        ),
        (
            ROOT_KEY,
            "[certificate]",
            "[components]\ncustodians = [\"a\", \"b\"]\n[certificate]",
            "components",
        ),
        (
            ROOT_KEY,
            "[certificate]",
            "[restore]\ndrill = true\n[certificate]",
            "restore",
        ),
        (
            KEK_GENERATE,
            "algorithm = \"AES_256_GCM\"",
            "algorithm = \"EC_SIGN_P256_SHA256\"",
            "key.algorithm",
        ),
        (
            KEK_GENERATE,
            "algorithm = \"AES_256_GCM\"",
            "algorithm = \"AES_256_GCM\"\nbackup = false",
            "key.backup",
        ),
        (
            KEK_GENERATE,
            "[kek]",
            "[certificate]\ncommon_name = \"x\"\nvalidity_days = 1\n[kek]",
            "certificate",
        ),
        (KEK_GENERATE, "[kek]\nmode = \"generate\"\n", "", "kek"),
        (
            KEK_GENERATE,
            "mode = \"generate\"",
            "mode = \"random\"",
            "kek.mode",
        ),
        (KEK_GENERATE, "mode = \"generate\"\n", "", "kek.mode"),
        (
            KEK_GENERATE,
            "[shares]\nthreshold = 2\ncustodians = [\"alice\", \"bob\", \"carol\"]\nencrypt_to_officer_keys = true\n",
            "",
            "shares",
        ),
        (
            KEK_GENERATE,
            "[shares]",
            "[components]\ncustodians = [\"a\", \"b\"]\n[shares]",
            "components",
        ),
        (
            KEK_GENERATE,
            "threshold = 2",
            "threshold = 1",
            "shares.threshold",
        ),
        (
            KEK_GENERATE,
            "threshold = 2",
            "threshold = 4",
            "shares.threshold",
        ),
        (KEK_GENERATE, "threshold = 2\n", "", "shares.threshold"),
        (
            KEK_GENERATE,
            "custodians = [\"alice\", \"bob\", \"carol\"]",
            "custodians = [\"alice\"]",
            "shares.custodians",
        ),
        (
            KEK_GENERATE,
            "custodians = [\"alice\", \"bob\", \"carol\"]",
            "custodians = [\"alice\", \"bob\", \"bob\"]",
            "shares.custodians",
        ),
        (
            KEK_GENERATE,
            "custodians = [\"alice\", \"bob\", \"carol\"]",
            &format!(
                "custodians = [{}]",
                (0..100)
                    .map(|i| format!("\"c{i}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "shares.custodians",
        ),
        (
            KEK_GENERATE,
            "custodians = [\"alice\", \"bob\", \"carol\"]\n",
            "",
            "shares.custodians",
        ),
        (
            KEK_COMPONENTS,
            "backup = false",
            "backup = true",
            "key.backup",
        ),
        (
            KEK_COMPONENTS,
            "[components]",
            "[shares]\nthreshold = 2\ncustodians = [\"a\", \"b\"]\n[components]",
            "shares",
        ),
        (
            KEK_COMPONENTS,
            "[components]\ncustodians = [\"dave\", \"erin\", \"frank\"]\n",
            "",
            "components",
        ),
        (
            KEK_COMPONENTS,
            "custodians = [\"dave\", \"erin\", \"frank\"]",
            "custodians = [\"dave\"]",
            "components.custodians",
        ),
        (
            KEK_COMPONENTS,
            "custodians = [\"dave\", \"erin\", \"frank\"]",
            "custodians = [\"dave\", \"dave\"]",
            "components.custodians",
        ),
        (
            KEK_COMPONENTS,
            "custodians = [\"dave\", \"erin\", \"frank\"]",
            &format!(
                "custodians = [{}]",
                (0..17)
                    .map(|i| format!("\"c{i}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "components.custodians",
        ),
        (
            RESTORE,
            "[restore]",
            "[key]\nname = \"k\"\n[restore]",
            "key",
        ),
        (
            RESTORE,
            "[restore]",
            "[certificate]\ncommon_name = \"x\"\n[restore]",
            "certificate",
        ),
        (
            RESTORE,
            "[restore]",
            "[kek]\nmode = \"generate\"\n[restore]",
            "kek",
        ),
        (
            RESTORE,
            "[restore]",
            "[shares]\nthreshold = 2\n[restore]",
            "shares",
        ),
        (
            RESTORE,
            "[restore]",
            "[components]\ncustodians = []\n[restore]",
            "components",
        ),
        (
            RESTORE,
            "[restore]\nbundle = \"backups/backup.json\"\nbundle_sha256 = \"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\"\ndrill = true\ncustodians = [\"alice\", \"bob\", \"carol\"]\n",
            "",
            "restore",
        ),
        (
            RESTORE,
            "bundle = \"backups/backup.json\"",
            "bundle = \"\"",
            "restore.bundle",
        ),
        (
            RESTORE,
            "bundle = \"backups/backup.json\"",
            "bundle = \"/etc/backup.json\"",
            "restore.bundle",
        ),
        (
            RESTORE,
            "bundle = \"backups/backup.json\"\n",
            "",
            "restore.bundle",
        ),
        (
            RESTORE,
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddee",
            "restore.bundle_sha256",
        ),
        (
            RESTORE,
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
            "g0112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
            "restore.bundle_sha256",
        ),
        (RESTORE, "drill = true\n", "", "restore.drill"),
        (
            RESTORE,
            "custodians = [\"alice\", \"bob\", \"carol\"]",
            "custodians = [\"alice\"]",
            "restore.custodians",
        ),
        (
            RESTORE,
            "custodians = [\"alice\", \"bob\", \"carol\"]",
            "custodians = [\"alice\", \"bob\", \"alice\"]",
            "restore.custodians",
        ),
        (
            RESTORE,
            "custodians = [\"alice\", \"bob\", \"carol\"]\n",
            "",
            "restore.custodians",
        ),
    ];
    for (base, from, to, field) in cases {
        assert!(
            base.contains(from),
            "case for {field}: {from:?} not in the script"
        );
        let text = base.replacen(from, to, 1);
        match Script::parse(&text) {
            Ok(_) => panic!("accepted, expected an error on {field}:\n{text}"),
            Err(error) => {
                assert_eq!(error.field(), Some(*field), "{error}\n{text}");
                let message = error.to_string();
                assert!(message.starts_with(&format!("{field}: ")), "{message}");
                println!("{message}");
            }
        }
    }
}

#[test]
fn errors_say_what_is_wrong_and_what_is_allowed() {
    let error = Script::parse(&ROOT_KEY.replace("required = 2", "required = 4")).unwrap_err();
    assert_eq!(
        error.to_string(),
        "quorum.required: 4 is more than the 3 officers listed"
    );
    let error =
        Script::parse(&ROOT_KEY.replace("kind = \"root-key\"", "kind = \"rootkey\"")).unwrap_err();
    assert_eq!(
        error.to_string(),
        "kind: \"rootkey\" is not a kind; \"root-key\", \"kek\", \"restore\", \"intermediate\", \"cross-sign\", \"crl\" or \"key-destruction\""
    );
}

#[test]
fn unknown_fields_and_sections_and_wrong_types_are_refused_with_their_line() {
    // (replace this, with this, the line it is on, what the message says)
    for (from, to, on, says) in [
        (
            "backup = true",
            "backup = true\ncolour = \"red\"",
            "colour",
            "unknown field `colour`",
        ),
        (
            "[quorum]",
            "[quorum]\nminimum = 2",
            "minimum",
            "unknown field `minimum`",
        ),
        (
            "[key]",
            "[extra]\nx = 1\n[key]",
            "[extra]",
            "unknown field `extra`",
        ),
        (
            "format = 1",
            "format = 1\nversion = 1",
            "version",
            "unknown field `version`",
        ),
        ("required = 2", "required = \"2\"", "required", "string"),
        ("backup = true", "backup = \"yes\"", "backup", "string"),
    ] {
        let text = ROOT_KEY.replacen(from, to, 1);
        let error = Script::parse(&text).unwrap_err();
        let ScriptError::Syntax { line, message } = &error else {
            panic!("{error}");
        };
        assert!(message.contains(says), "{message}");
        let expected = text.lines().position(|l| l.starts_with(on)).unwrap() + 1;
        assert_eq!(*line, expected, "{error}");
    }
    let error = Script::parse("format = 1\nid = ").unwrap_err();
    assert!(
        matches!(error, ScriptError::Syntax { line: 2, .. }),
        "{error}"
    );
}

#[test]
fn the_example_scripts_in_deploy_are_valid() {
    let root = Script::parse(include_str!(
        "../../../../../../deploy/ceremonies/root-key.toml"
    ))
    .unwrap();
    let Kind::RootKey {
        key,
        certificate: Some(certificate),
    } = root.kind()
    else {
        panic!("{:?}", root.kind());
    };
    assert_eq!(key.name, "root-ca");
    assert_eq!(key.algorithm.api_name(), "EC_SIGN_P384_SHA384");
    assert!(key.backup);
    assert_eq!(certificate.common_name, "Custody Demo Root CA");
    assert_eq!(root.quorum().required, 2);
    assert_eq!(
        key.policy["SIGN"],
        Quorum::new(["alice".into(), "bob".into(), "carol".into()], 2).unwrap()
    );
    assert_eq!(key.defaulted_kinds(), ["ROTATE", "SET_STATE", "SET_POLICY"]);

    let kek = Script::parse(include_str!("../../../../../../deploy/ceremonies/kek.toml")).unwrap();
    let Kind::Kek {
        key,
        mode: KekMode::Generate { shares },
    } = kek.kind()
    else {
        panic!("{:?}", kek.kind());
    };
    assert_eq!(key.name, "demo-kek");
    assert!(key.policy.is_empty());
    assert_eq!(key.algorithm.api_name(), "AES_256_GCM");
    assert_eq!(shares.threshold, 2);
    assert_eq!(shares.custodians, ["alice", "bob", "carol"]);
}

#[test]
fn a_kek_whose_holders_do_not_cover_its_decrypt_policy_is_refused_naming_the_field() {
    let cases = [
        // Any 2 of 3 shares rebuild the backup KEK: fewer than DECRYPT's 3.
        (
            KEK_GENERATE,
            "[key.policy.DECRYPT]\nofficers = [\"alice\", \"bob\", \"carol\"]\nrequired = 3\n[kek]",
            "shares.threshold",
        ),
        // dave, erin and frank hold the components; DECRYPT needs 4 of
        // alice, bob, dave and erin.
        (
            KEK_COMPONENTS,
            "[key.policy.DECRYPT]\nofficers = [\"alice\", \"bob\", \"dave\", \"erin\"]\nrequired = 4\n[kek]",
            "components.custodians",
        ),
    ];
    for (script, policy, field) in cases {
        let parsed = Script::parse(&script.replace("[kek]", policy)).unwrap();
        let error = parsed.check_holders().unwrap_err();
        assert_eq!(error.field(), Some(field), "{error}");
        assert!(
            error.to_string().contains("key.policy.DECRYPT needs"),
            "{error}"
        );
        assert_eq!(Script::parse(script).unwrap().check_holders(), Ok(()));
    }
}
