//! The five parsers that read files people hand to custodyd or custodyctl,
//! under random and mutated input (threat model F6): ceremony scripts
//! (TOML), share lines, backup bundles, transcripts (JSON) and audit
//! exports (JSON lines).
//!
//! Each parser gets two kinds of input: text built at random from the
//! format's own pieces (so most of it gets past the first syntax check),
//! and a real, valid file with bytes flipped, inserted, deleted, repeated or
//! cut. The properties:
//!
//! - no input panics a parser;
//! - every refusal is the parser's own error type;
//! - a signed or checksummed file (share, bundle, transcript, audit export)
//!   that was changed is refused, or what it reads back is exactly what was
//!   signed (a change that only touches layout: whitespace, hex case, a JSON
//!   escape) — never a changed file half accepted;
//! - a changed script is refused, or it reads back as a script that passes
//!   every rule checked again here from outside (never a partly checked one).
//!
//! Cases per property: 256 by default (the whole file well under 30 s on two
//! cores); `PROPTEST_CASES=100000` for the long run in docs/assurance.md.

mod audit_exports;
mod bundles;
mod json;
mod scripts;
mod shares;
mod transcripts;

use proptest::prelude::*;

/// The config every property runs with: proptest's default, which reads
/// `PROPTEST_CASES` (256 when unset).
pub(crate) fn config() -> ProptestConfig {
    ProptestConfig {
        // Shrinking a failure of a 100,000-case run must stay bounded.
        max_shrink_iters: 4096,
        ..ProptestConfig::default()
    }
}

/// One change to a file's bytes. Positions are taken modulo the length.
#[derive(Debug, Clone)]
pub(crate) enum Edit {
    /// Flip one bit.
    Flip(usize, u8),
    /// Replace a byte with one that means something to the format.
    Replace(usize, u8),
    /// Insert a byte.
    Insert(usize, u8),
    /// Delete up to `n` bytes.
    Delete(usize, usize),
    /// Repeat a run of up to `n` bytes right after itself.
    Repeat(usize, usize),
    /// Cut everything from here on.
    Truncate(usize),
    /// Swap two bytes.
    Swap(usize, usize),
}

/// Bytes that mean something to TOML, JSON, hex or share lines.
const INTERESTING: &[u8] = b"\"\\{}[],:=-.#\n 0123456789abcdefABCDEFxk\x00\xff";

fn byte() -> impl Strategy<Value = u8> {
    prop_oneof![any::<u8>(), proptest::sample::select(INTERESTING.to_vec()),]
}

fn edit() -> impl Strategy<Value = Edit> {
    let at = any::<usize>();
    prop_oneof![
        3 => (at, 0u8..8).prop_map(|(at, bit)| Edit::Flip(at, bit)),
        3 => (at, byte()).prop_map(|(at, b)| Edit::Replace(at, b)),
        2 => (at, byte()).prop_map(|(at, b)| Edit::Insert(at, b)),
        2 => (at, 1usize..64).prop_map(|(at, n)| Edit::Delete(at, n)),
        1 => (at, 1usize..64).prop_map(|(at, n)| Edit::Repeat(at, n)),
        1 => at.prop_map(Edit::Truncate),
        1 => (at, at).prop_map(|(a, b)| Edit::Swap(a, b)),
    ]
}

/// One to four edits.
pub(crate) fn edits() -> impl Strategy<Value = Vec<Edit>> {
    proptest::collection::vec(edit(), 1..=4)
}

/// `original` with `edits` applied, in order.
pub(crate) fn mutate(original: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut bytes = original.to_vec();
    for edit in edits {
        let len = bytes.len();
        if len == 0 {
            break;
        }
        match *edit {
            Edit::Flip(at, bit) => bytes[at % len] ^= 1 << bit,
            Edit::Replace(at, b) => bytes[at % len] = b,
            Edit::Insert(at, b) => bytes.insert(at % (len + 1), b),
            Edit::Delete(at, n) => {
                let at = at % len;
                bytes.drain(at..(at + n).min(len));
            }
            Edit::Repeat(at, n) => {
                let at = at % len;
                let run: Vec<u8> = bytes[at..(at + n).min(len)].to_vec();
                let end = at + run.len();
                bytes.splice(end..end, run);
            }
            Edit::Truncate(at) => bytes.truncate(at % len),
            Edit::Swap(a, b) => bytes.swap(a % len, b % len),
        }
    }
    bytes
}

/// What the command-line tools and custodyd hand a parser: the file as
/// text. Bytes that are not UTF-8 are refused before any parser runs
/// (`read_text`); the lossy reading still gives the parser the rest.
pub(crate) fn as_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn edits_change_the_bytes_they_name() {
    let original = b"abcdef";
    assert_eq!(mutate(original, &[Edit::Delete(1, 2)]), b"adef");
    assert_eq!(mutate(original, &[Edit::Repeat(0, 2)]), b"ababcdef");
    assert_eq!(mutate(original, &[Edit::Truncate(3)]), b"abc");
    assert_eq!(mutate(original, &[Edit::Insert(6, b'!')]), b"abcdef!");
    assert_eq!(mutate(original, &[Edit::Flip(0, 0)]), b"`bcdef");
}
