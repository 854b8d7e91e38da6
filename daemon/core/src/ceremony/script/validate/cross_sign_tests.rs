#![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

use crate::ceremony::script::fixtures::{CROSS_SIGN, INTERMEDIATE};
use crate::ceremony::script::{Kind, Script, Step};

fn refused(text: &str) -> String {
    Script::parse(text).unwrap_err().to_string()
}

#[test]
fn the_example_cross_signs_the_certificate_named_by_sha256_with_the_scripts_profile() {
    let script = Script::parse(CROSS_SIGN).unwrap();
    assert_eq!(script.kind_name(), "cross-sign");
    let Kind::Intermediate {
        issuer,
        key,
        csr_sha256,
        certificate_sha256,
        stage,
        certificate,
        profile,
    } = script.kind()
    else {
        panic!("not run as an intermediate");
    };
    assert_eq!(issuer, "root-ca");
    assert!(key.is_empty() && csr_sha256.is_none() && !stage);
    assert_eq!(certificate_sha256, &Some(Box::new([0; 32])));
    assert!(certificate.common_name.is_empty());
    assert_eq!(certificate.validity_days, 1825);
    assert_eq!(profile.path_len, Some(1));
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
    assert!(
        plan.contains("cA") && plan.contains("subjectKeyIdentifier"),
        "{plan}"
    );
    assert!(plan.contains("cross-certificate"), "{plan}");
    let summary = script.render_summary();
    assert!(summary.contains("cross-signed"), "{summary}");
}

#[test]
fn a_cross_sign_script_names_no_subject_no_key_and_a_sha256() {
    for (text, expected) in [
        (
            CROSS_SIGN.replace(
                "validity_days = 1825",
                "common_name = \"X\"\nvalidity_days = 1825",
            ),
            "certificate.common_name: leave it out: the subject is the certificate's",
        ),
        (
            CROSS_SIGN.replace(&"0".repeat(64), "abcd"),
            "cross_sign.certificate_sha256: \"abcd\" is not a SHA-256",
        ),
        (
            CROSS_SIGN.replace("certificate_sha256 = ", "# "),
            "cross_sign.certificate_sha256",
        ),
        (
            CROSS_SIGN
                .replace("[cross_sign]", "[intermediate]")
                .replace("certificate_sha256", "csr_sha256"),
            "intermediate: ",
        ),
        (
            CROSS_SIGN.replace("issuer = \"root-ca\"", "issuer = \"root-ca\"\nkey = \"x\""),
            "key",
        ),
    ] {
        let refusal = refused(&text);
        assert!(refusal.contains(expected), "{refusal} lacks {expected}");
    }
}

#[test]
fn only_a_cross_sign_script_has_a_cross_sign_section() {
    let text = format!(
        "{INTERMEDIATE}\n[cross_sign]\nissuer = \"root-ca\"\ncertificate_sha256 = \"{}\"\n",
        "0".repeat(64)
    );
    let refusal = refused(&text);
    assert!(refusal.contains("cross_sign"), "{refusal}");
}
