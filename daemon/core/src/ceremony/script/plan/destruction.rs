//! How a `key-destruction` script's steps and summary read to the officers.

use super::Step;
use crate::ceremony::script::DestructionSection;

fn versions(section: &DestructionSection) -> String {
    section
        .versions
        .iter()
        .map(|v| format!("v{v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn describe(step: Step, section: &DestructionSection, present: &str) -> String {
    let key = &section.key;
    let list = versions(section);
    match step {
        Step::Manifest => format!(
            "custodyd checks that each of {key:?} {list} is scheduled for destruction by an approved DESTROY_VERSION, its cancel window over, not cancelled and not under a legal hold, and journals the manifest: each version's HSM object label and id, its public-key fingerprint (or KCV) and the destruction it carries out; {present} see it and its SHA-256"
        ),
        Step::Confirm => format!(
            "{present} read the manifest SHA-256 aloud as hex (16 groups of 4) and as 12 words, each compares it with the screen, and each signs it with their officer key: nothing is destroyed before every one has"
        ),
        Step::Destroy => format!(
            "custodyd checks everything again with the state then in force (a legal hold, a CancelDestroy or a tightened DESTROY_VERSION policy rolls the ceremony back, nothing destroyed), destroys each object of {key:?} {list} in the HSM, journaling each, then checks that no object with those labels or ids remains on the token"
        ),
        Step::Commit => format!(
            "{key:?} {list} are recorded destroyed; the transcript names the witnesses, the times, the fingerprints, the manifest digest, the objects destroyed, the check, and the backup bundles that still hold copies"
        ),
        other => format!("(key-destruction has no {} step)", other.name()),
    }
}

pub(super) fn summary(section: &DestructionSection) -> Vec<(&'static str, String)> {
    vec![
        ("key", section.key.clone()),
        (
            "destroys",
            format!(
                "{} (each already approved and scheduled for destruction)",
                versions(section)
            ),
        ),
    ]
}
