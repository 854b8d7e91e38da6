//! Share lines (`cs1-…`), as custodians type them into custodyctl and as
//! custodyd reads them back (`Share::parse`).

use custody_core::ceremony::shares::{Share, ShareError, split};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

use super::{as_text, config, edits, mutate};

/// Three shares of one 2-of-3 split of a fixed secret, as written down.
fn written() -> Vec<String> {
    split(&[0x5c; 32], 2, 3)
        .expect("a 2-of-3 split")
        .iter()
        .map(|share| share.to_text().to_string())
        .collect()
}

/// A share line from random pieces; with `checksummed`, its checksum is
/// right, so the parser's later rules are reached.
fn line() -> impl Strategy<Value = String> {
    let hex =
        |n: usize| proptest::string::string_regex(&format!("[0-9a-f]{{{n}}}")).expect("a regex");
    let group = proptest::string::string_regex("[0-9a-fA-F]{0,7}").expect("a regex");
    (
        prop_oneof![Just("cs1".to_string()), "[a-z0-9]{0,4}"],
        prop_oneof![hex(8), "[0-9a-g]{0,10}"],
        (0u8..=120, 0u8..=120),
        0u8..=120,
        prop_oneof![hex(16), "[0-9a-g]{0,18}"],
        proptest::collection::vec(group, 9..=13),
        any::<bool>(),
    )
        .prop_map(
            |(version, set, (index, count), threshold, digest, groups, checksummed)| {
                let body = format!(
                    "{version}-{set}-{index:02}of{count:02}-k{threshold:02}-{digest}-{}",
                    groups.join("-")
                );
                let checksum = if checksummed {
                    hex::encode(&Sha256::digest(body.to_lowercase().as_bytes())[..3])
                } else {
                    "000000".into()
                };
                format!("{body}-{checksum}")
            },
        )
}

/// A parsed share must be one the format allows.
fn well_formed(share: &Share) -> Result<(), TestCaseError> {
    prop_assert!(share.threshold() >= 2);
    prop_assert!(share.index() >= 1);
    prop_assert_eq!(share.set_id().len(), 8);
    // What it writes reads back as itself.
    let again = Share::parse(&share.to_text()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(again == *share);
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn f6_random_share_lines_never_panic_and_parse_only_into_well_formed_shares(text in line()) {
        match Share::parse(&text) {
            Ok(share) => well_formed(&share)?,
            Err(ShareError::Malformed(_) | ShareError::Checksum) => {}
            Err(other) => prop_assert!(false, "parsing gave a combining error: {other}"),
        }
    }

    #[test]
    fn f6_a_changed_share_line_is_refused_or_reads_as_the_written_share(
        which in 0usize..3,
        edits in edits(),
    ) {
        let written = written();
        let original = Share::parse(&written[which]).expect("a written share parses");
        let text = as_text(&mutate(written[which].as_bytes(), &edits));
        match Share::parse(&text) {
            // Spaces, line breaks and case do not matter to a share.
            Ok(share) => prop_assert!(
                share == original,
                "a changed share was accepted as another share: {text:?}"
            ),
            Err(ShareError::Malformed(_) | ShareError::Checksum) => {}
            Err(other) => prop_assert!(false, "parsing gave a combining error: {other}"),
        }
    }

    #[test]
    fn f6_arbitrary_text_never_panics_the_share_parser(text in ".{0,200}") {
        let _ = Share::parse(&text);
    }
}
