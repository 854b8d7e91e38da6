//! What a check of stored records finds: one [`Finding`] per record that is
//! not what its owner wrote, naming the keyspace, the key, and what was
//! expected there. Each module that owns a tree's encoding checks its own
//! tree into [`Findings`]; `integrity` runs them all (threat model F1).

/// Findings listed at most: a directory torn everywhere still gives a report
/// of bounded size (the count says how many there were).
pub const MAX_LISTED: usize = 100;

/// One record that is not what custodyd wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The keyspace.
    pub tree: &'static str,
    /// The record's key, as text (escaped if it is not printable UTF-8).
    pub key: String,
    /// What was expected there, and what was found.
    pub expected: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tree `{}`, key {}: {}",
            self.tree, self.key, self.expected
        )
    }
}

/// The findings of one check, kept to [`MAX_LISTED`], counted in full.
#[derive(Debug, Clone, Default)]
pub struct Findings {
    listed: Vec<Finding>,
    count: usize,
}

impl Findings {
    /// Notes that the record `key` of `tree` is not what was `expected`.
    pub fn add(&mut self, tree: &'static str, key: &[u8], expected: impl Into<String>) {
        self.add_shown(tree, show_key(key), expected);
    }

    /// [`Self::add`] with the key already shown as people read it (a
    /// sequence number, say).
    pub fn add_shown(&mut self, tree: &'static str, key: String, expected: impl Into<String>) {
        self.count += 1;
        if self.listed.len() < MAX_LISTED {
            self.listed.push(Finding {
                tree,
                key,
                expected: expected.into(),
            });
        }
    }

    /// Adds `other`'s findings after these (listed within [`MAX_LISTED`],
    /// all counted).
    pub fn extend(&mut self, other: Findings) {
        self.count += other.count;
        let room = MAX_LISTED.saturating_sub(self.listed.len());
        self.listed.extend(other.listed.into_iter().take(room));
    }

    /// Notes that the tree could not be read at all.
    pub fn unreadable(&mut self, tree: &'static str, error: impl std::fmt::Display) {
        self.add(tree, b"", format!("the tree could not be read: {error}"));
    }

    /// The findings listed (at most [`MAX_LISTED`]).
    pub fn listed(&self) -> &[Finding] {
        &self.listed
    }

    /// How many there were in all.
    pub fn count(&self) -> usize {
        self.count
    }

    /// True if nothing was found.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// A record key as people read it: quoted text if it is printable UTF-8
/// (what custodyd's keys are), else hex; cut to 160 characters.
pub fn show_key(key: &[u8]) -> String {
    let shown = match std::str::from_utf8(key) {
        Ok(text) if !text.chars().any(char::is_control) => format!("{text:?}"),
        _ => format!("0x{}", hex::encode(key)),
    };
    if shown.chars().count() > 160 {
        let cut: String = shown.chars().take(157).collect();
        format!("{cut}...")
    } else {
        shown
    }
}

/// The tree `name` if the database has it, without making it: a check reads
/// and never writes (a missing tree reads as empty).
pub fn existing_tree(
    db: &custody_store::Store,
    name: &str,
) -> Result<Option<custody_store::Keyspace>, custody_store::StoreError> {
    db.existing_keyspace(name)
}

/// Every record of `tree` (none if the database lacks it), with read errors
/// noted as findings: `visit` is called with each key and value.
pub fn each_record(
    db: &custody_store::Store,
    tree: &'static str,
    findings: &mut Findings,
    mut visit: impl FnMut(&[u8], &[u8], &mut Findings),
) {
    let opened = match existing_tree(db, tree) {
        Ok(Some(opened)) => opened,
        Ok(None) => return,
        Err(e) => return findings.unreadable(tree, e),
    };
    for item in opened.iter() {
        match item {
            Ok((key, value)) => visit(&key, &value, findings),
            Err(e) => return findings.unreadable(tree, e),
        }
    }
}

/// Opens a JSON record of `tree` ([`crate::stored::open`]: its checksum,
/// then its JSON), noting a finding if it is not `what` (the type's name
/// in the report).
pub fn json_record<T: serde::de::DeserializeOwned>(
    tree: &'static str,
    key: &[u8],
    value: &[u8],
    what: &str,
    findings: &mut Findings,
) -> Option<T> {
    match crate::stored::open(key, value) {
        Ok(record) => Some(record),
        Err(e) => {
            findings.add(
                tree,
                key,
                format!("expected {what}, found {} bytes: {e}", value.len()),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use super::*;

    #[test]
    fn keys_show_as_text_or_hex_and_are_cut_short() {
        assert_eq!(show_key(b"root-ca"), "\"root-ca\"");
        assert_eq!(show_key(&[0, 0, 0, 1]), "0x00000001");
        assert_eq!(show_key(&[0xff]), "0xff");
        assert!(show_key(&[b'a'; 400]).ends_with("..."));
    }

    #[test]
    fn findings_are_counted_in_full_and_listed_to_the_cap() {
        let mut findings = Findings::default();
        for n in 0..(MAX_LISTED + 5) {
            findings.add("keys", n.to_string().as_bytes(), "a key record");
        }
        assert_eq!(findings.count(), MAX_LISTED + 5);
        assert_eq!(findings.listed().len(), MAX_LISTED);
        assert_eq!(
            findings.listed()[0].to_string(),
            "tree `keys`, key \"0\": a key record"
        );
    }

    #[test]
    fn findings_joined_keep_their_order_all_counted_listed_within_the_cap() {
        let mut first = Findings::default();
        first.add("audit", b"1", "record 1");
        let mut second = Findings::default();
        for n in 0..MAX_LISTED {
            second.add("keys", n.to_string().as_bytes(), "a key record");
        }
        first.extend(second);
        assert_eq!(first.count(), MAX_LISTED + 1);
        assert_eq!(first.listed().len(), MAX_LISTED);
        assert_eq!(first.listed()[0].tree, "audit");
        assert_eq!(first.listed()[1].key, "\"0\"");
        assert_eq!(
            first.listed()[MAX_LISTED - 1].key,
            format!("{:?}", (MAX_LISTED - 2).to_string())
        );
    }

    #[test]
    fn a_check_makes_no_tree() {
        let dir = tempfile::tempdir().unwrap();
        let db = custody_store::Store::open_sled(dir.path(), 16 << 20).unwrap();
        let mut findings = Findings::default();
        each_record(&db, "keys", &mut findings, |_, _, _| unreachable!());
        assert!(findings.is_empty());
        assert!(existing_tree(&db, "keys").unwrap().is_none());
    }
}
