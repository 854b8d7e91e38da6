//! Free text: what callers write that custody stores and later shows to
//! someone (a state change's reason, a legal hold's, a ceremony abort's, a
//! ceremony script's description), and what custody echoes back of a
//! caller's input in an error message.
//!
//! One rule for all of it. Text a person will read may not hold characters
//! that act instead of showing: C0 and C1 controls and DEL (an escape
//! sequence or a carriage return rewrites what a terminal shows next to
//! it), Unicode format characters (bidi overrides, isolates and marks,
//! which reorder what follows; zero-width spaces and joiners and the byte
//! order mark, which hide), and the line and paragraph separators. These
//! are the general categories Cc, Cf, Zl and Zp, so the rule keeps up with
//! Unicode. Reasons are capped in characters ([`MAX_REASON_CHARS`]); input
//! echoed in an error shows at most [`MAX_ECHO_CHARS`] of it; and a whole
//! error message is at most [`crate::error::MAX_MESSAGE_CHARS`]
//! (`Error::new` enforces it), so that no request can make a response's
//! trailers large.

use std::borrow::Cow;
use std::fmt::Write as _;

use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

use crate::{Error, Reason};

/// The longest reason (state change, legal hold, ceremony abort), in
/// characters.
pub const MAX_REASON_CHARS: usize = 256;

/// The most characters of a caller's input an error message echoes.
pub const MAX_ECHO_CHARS: usize = 128;

/// Whether `c` acts rather than shows: a control (C0, DEL, C1), a format
/// character (bidi, zero-width, BOM, tags), or a line or paragraph
/// separator.
pub fn is_hidden(c: char) -> bool {
    matches!(
        c.general_category(),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
    )
}

/// The first character of `text` that may not be shown to a person, if any.
pub fn first_hidden(text: &str) -> Option<char> {
    text.chars().find(|c| is_hidden(*c))
}

/// Why `text` may not be stored for a person to read, if it may not: a
/// hidden character (named by its code point) or more than `max_chars`
/// characters. Said in words that fit after a field's name.
pub fn problem(text: &str, max_chars: usize) -> Option<String> {
    if let Some(c) = first_hidden(text) {
        return Some(format!(
            "holds U+{:04X}, a control, bidi, zero-width or separator character; \
             one line of printable text",
            c as u32
        ));
    }
    let chars = text.chars().count();
    (chars > max_chars).then(|| format!("is {chars} characters long; at most {max_chars}"))
}

/// A reason as given with a request (trimmed): printable text of at most
/// [`MAX_REASON_CHARS`] characters, else `BAD_REASON`. Empty is allowed
/// here; whether a reason is required is the caller's rule.
pub fn reason(text: &str) -> Result<&str, Error> {
    let text = text.trim();
    match problem(text, MAX_REASON_CHARS) {
        None => Ok(text),
        Some(why) => Err(Error::new(Reason::BadReason, format!("the reason {why}"))),
    }
}

/// `text` with every hidden character written out as `\u{…}`, so that it
/// can be shown on a terminal as what it is.
pub fn escape(text: &str) -> Cow<'_, str> {
    if first_hidden(text).is_none() {
        return Cow::Borrowed(text);
    }
    let mut shown = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_hidden(c) {
            let _ = write!(shown, "\\u{{{:x}}}", c as u32);
        } else {
            shown.push(c);
        }
    }
    Cow::Owned(shown)
}

/// A caller's input as an error message quotes it: in double quotes, hidden
/// characters escaped, and cut after [`MAX_ECHO_CHARS`] characters with an
/// ellipsis and the length it had.
pub fn echo(input: &str) -> String {
    let chars = input.chars().count();
    if chars <= MAX_ECHO_CHARS {
        return format!("\"{}\"", escape(input));
    }
    let head: String = input.chars().take(MAX_ECHO_CHARS).collect();
    format!("\"{}…\" ({chars} characters)", escape(&head))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every character the threat model names, and more of their kinds.
    const HIDDEN: &[char] = &[
        '\0',
        '\t',
        '\n',
        '\r',
        '\x1b',
        '\x7f',
        '\u{80}',
        '\u{85}',
        '\u{9b}',
        '\u{9f}',
        '\u{ad}',
        '\u{61c}',
        '\u{200b}',
        '\u{200c}',
        '\u{200d}',
        '\u{200e}',
        '\u{200f}',
        '\u{2028}',
        '\u{2029}',
        '\u{202a}',
        '\u{202b}',
        '\u{202c}',
        '\u{202d}',
        '\u{202e}',
        '\u{2060}',
        '\u{2066}',
        '\u{2067}',
        '\u{2068}',
        '\u{2069}',
        '\u{feff}',
        '\u{e0041}',
    ];

    #[test]
    fn controls_bidi_zero_width_and_separators_are_hidden_and_the_rest_shows() {
        for c in HIDDEN {
            assert!(is_hidden(*c), "U+{:04X}", *c as u32);
            let text = format!("ok{c}ok");
            assert!(problem(&text, 100).is_some(), "U+{:04X}", *c as u32);
            assert!(!escape(&text).contains(*c));
        }
        for text in [
            "case 2026-117",
            "Schlüssel kompromittiert",
            "鍵の漏洩",
            "ключ",
            "a b\u{a0}c",
            "😀",
        ] {
            assert_eq!(problem(text, 100), None, "{text}");
            assert_eq!(escape(text), text);
        }
    }

    #[test]
    fn reasons_are_capped_in_characters_and_trimmed() {
        assert_eq!(reason("  why  ").unwrap(), "why");
        assert_eq!(reason("").unwrap(), "");
        assert!(reason(&"é".repeat(MAX_REASON_CHARS)).is_ok());
        let over = reason(&"é".repeat(MAX_REASON_CHARS + 1)).unwrap_err();
        assert_eq!(over.reason, Reason::BadReason);
        let hidden = reason("fine\x1b[2Kforged").unwrap_err();
        assert_eq!(hidden.reason, Reason::BadReason);
        assert!(hidden.message.contains("U+001B"), "{}", hidden.message);
    }

    #[test]
    fn echoes_are_quoted_escaped_and_cut() {
        assert_eq!(echo("keys/a"), "\"keys/a\"");
        assert_eq!(echo("a\x1b[2Kb"), "\"a\\u{1b}[2Kb\"");
        let long = echo(&"a".repeat(10_000));
        assert!(long.starts_with(&format!("\"{}…\"", "a".repeat(MAX_ECHO_CHARS))));
        assert!(long.ends_with("(10000 characters)"));
        assert!(long.chars().count() < MAX_ECHO_CHARS + 32);
    }
}
