//! The `[key.policy]` of root-key and kek scripts: parsed per kind, and
//! every rule broken once.

use crate::ceremony::script::fixtures::{KEK_GENERATE, RESTORE, ROOT_KEY};
use crate::ceremony::script::{Script, ScriptError};
use crate::dual_control::quorum::Quorum;

/// ROOT_KEY with `policy` (TOML tables under `[key]`) before its
/// certificate.
fn with_policy(policy: &str) -> String {
    ROOT_KEY.replacen("\n[certificate]", &format!("\n{policy}\n[certificate]"), 1)
}

#[test]
fn a_key_policy_is_parsed_per_kind_and_the_rest_is_left_to_the_administrative_quorum() {
    let script = Script::parse(ROOT_KEY).unwrap();
    let key = script.key().unwrap();
    assert!(key.policy.is_empty());
    assert_eq!(
        key.defaulted_kinds(),
        ["SIGN", "ROTATE", "SET_STATE", "SET_POLICY"]
    );
    let admin = Quorum::new(["alice".into(), "bob".into(), "carol".into()], 2).unwrap();
    let policies = key.policies(&admin);
    assert_eq!(policies.len(), 4);
    assert!(policies.values().all(|quorum| quorum == &admin));

    let text = with_policy(
        "[key.policy.SIGN]\nofficers = [\"carol\", \"alice\", \"bob\"]\nrequired = 3\n\
         [key.policy.DESTROY_VERSION]\nofficers = [\"alice\", \"bob\"]\nrequired = 2\n",
    );
    let script = Script::parse(&text).unwrap();
    let key = script.key().unwrap();
    let strict = Quorum::new(["alice".into(), "bob".into(), "carol".into()], 3).unwrap();
    assert_eq!(key.policy["SIGN"], strict);
    assert_eq!(key.defaulted_kinds(), ["ROTATE", "SET_STATE", "SET_POLICY"]);
    let policies = key.policies(&admin);
    assert_eq!(
        policies.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "DESTROY_VERSION",
            "ROTATE",
            "SET_POLICY",
            "SET_STATE",
            "SIGN"
        ]
    );
    assert_eq!(policies["SIGN"], strict);
    assert_eq!(policies["ROTATE"], admin);
    // The inline form is the same TOML.
    let inline = with_policy(
        "[key.policy]\nSIGN = { officers = [\"alice\", \"bob\", \"carol\"], required = 3 }\n",
    );
    assert_eq!(
        Script::parse(&inline).unwrap().key().unwrap().policy["SIGN"],
        strict
    );
    // A KEK takes one too.
    let kek = KEK_GENERATE.replacen(
        "\n[kek]",
        "\n[key.policy.ROTATE]\nofficers = [\"alice\", \"bob\", \"carol\"]\nrequired = 3\n\n[kek]",
        1,
    );
    let kek = Script::parse(&kek).unwrap();
    assert_eq!(kek.key().unwrap().policy["ROTATE"], strict);
    // And it is part of the text officers sign.
    assert_ne!(script.digest(), Script::parse(ROOT_KEY).unwrap().digest());
}

#[test]
fn a_key_policy_breaking_a_rule_is_refused_naming_its_field() {
    for (policy, field, says) in [
        ("[key.policy]\n", "key.policy", "names no operation kind"),
        (
            "[key.policy.ENCRYPT]\nofficers = [\"alice\", \"bob\"]\nrequired = 2\n",
            "key.policy.ENCRYPT",
            "not an operation kind",
        ),
        (
            "[key.policy.SIGN]\nofficers = [\"alice\", \"bob\"]\nrequired = 1\n",
            "key.policy.SIGN.required",
            "1 is too few",
        ),
        (
            "[key.policy.SIGN]\nofficers = [\"alice\", \"bob\"]\nrequired = 3\n",
            "key.policy.SIGN.required",
            "3 is more than the 2 officers listed",
        ),
        (
            "[key.policy.SIGN]\nofficers = [\"alice\", \"alice\"]\nrequired = 2\n",
            "key.policy.SIGN.officers",
            "listed twice",
        ),
        (
            "[key.policy.SIGN]\nofficers = [\"Alice\", \"bob\"]\nrequired = 2\n",
            "key.policy.SIGN.officers",
            "not an officer id",
        ),
        (
            "[key.policy.SIGN]\nrequired = 2\n",
            "key.policy.SIGN.officers",
            "missing",
        ),
        (
            "[key.policy.SIGN]\nofficers = [\"alice\", \"bob\"]\n",
            "key.policy.SIGN.required",
            "missing",
        ),
    ] {
        let error = Script::parse(&with_policy(policy)).unwrap_err();
        assert_eq!(error.field(), Some(field), "{error}");
        assert!(error.to_string().contains(says), "{error}");
    }
    let error = Script::parse(&with_policy(
        "[key.policy.SIGN]\nofficers = [\"alice\", \"bob\"]\nrequired = 2\nminimum = 2\n",
    ))
    .unwrap_err();
    assert!(
        matches!(&error, ScriptError::Syntax { message, .. } if message.contains("unknown field `minimum`")),
        "{error}"
    );
    // A policy of a kind that cannot act on the key is refused: DECRYPT
    // on a root key, SIGN on a KEK; DECRYPT on a KEK is what gates it.
    let error = Script::parse(&with_policy(
        "[key.policy.DECRYPT]\nofficers = [\"alice\", \"bob\"]\nrequired = 2\n",
    ))
    .unwrap_err();
    assert_eq!(error.field(), Some("key.policy.DECRYPT"), "{error}");
    assert!(
        error
            .to_string()
            .contains("does not apply to an ASYMMETRIC_SIGN key"),
        "{error}"
    );
    let kek_with = |kind: &str| {
        KEK_GENERATE.replacen(
            "\n[kek]",
            &format!(
                "\n[key.policy.{kind}]\nofficers = [\"alice\", \"bob\", \"carol\"]\nrequired = 2\n\n[kek]"
            ),
            1,
        )
    };
    let error = Script::parse(&kek_with("SIGN")).unwrap_err();
    assert_eq!(error.field(), Some("key.policy.SIGN"), "{error}");
    assert!(error.to_string().contains("ENCRYPT_DECRYPT"), "{error}");
    let kek = Script::parse(&kek_with("DECRYPT")).unwrap();
    assert_eq!(kek.key().unwrap().policy["DECRYPT"].required, 2);
    // Any 2 of the 3 custodians rebuild the backup KEK the new KEK is
    // wrapped under: carol and alice are not 2 of alice and bob.
    let narrower = kek_with("DECRYPT").replacen(
        "officers = [\"alice\", \"bob\", \"carol\"]\nrequired = 2\n\n[kek]",
        "officers = [\"alice\", \"bob\"]\nrequired = 2\n\n[kek]",
        1,
    );
    let error = Script::parse(&narrower)
        .unwrap()
        .check_holders()
        .unwrap_err();
    assert_eq!(error.field(), Some("shares.threshold"), "{error}");
    assert!(
        error.to_string().contains("needs 2 of alice, bob"),
        "{error}"
    );
    // A restore makes no key, so it has no key policy.
    let error = Script::parse(&RESTORE.replacen(
        "\n[restore]",
        "\n[key.policy.SIGN]\nofficers = [\"alice\", \"bob\"]\nrequired = 2\n\n[restore]",
        1,
    ))
    .unwrap_err();
    assert_eq!(error.field(), Some("key"), "{error}");
}
