//! The data directory checked before custodyd uses it, and the same check
//! offline (`custodyd --check`): threat model F1 and F2.
//!
//! Each tree's check lives with the code that owns its encoding
//! (`registry`, `audit`, `budget`, `pin_lockout`, `clock`, `ceremony::journal`,
//! `dual_control::store` and `operation_store`); this module runs them all,
//! adds the checks across owners, and builds the one report. custodyd
//! refuses to start on any finding: it never repairs a record, and never
//! starts a new audit log over an old one.
//!
//! It also holds the rule for a data directory lost while the token
//! survived (F3): an empty audit log over a token that holds custody
//! objects is refused unless the operator acknowledges it.
//!
//! What it cannot see: a count changed to another of its length (nonce
//! budget, failed logins, carrying no checksum), a record deleted that
//! nothing else names (an officer, a nonce count, the failed-login count,
//! a finished ceremony whose key is also gone), records cut from the audit
//! log's tail together with its stored head rolled back to match (only a
//! checkpoint or export head kept elsewhere shows that), and a record
//! rewritten on purpose with a matching checksum
//! ([`crate::stored`] is no signature).

use crate::audit::{ChainScope, CheckedChain, RecordHome};
use crate::findings::{Findings, existing_tree};

/// The trees holding state that only exists once custodyd has run, and so
/// once its audit log holds records (`meta` aside: a failed first login is
/// counted before any record).
const STATEFUL_TREES: [&str; 7] = [
    "keys",
    "pending_versions",
    "ceremonies",
    "backup_keks",
    "operations",
    "officers",
    "nonce_budget",
];

/// What the check of a data directory found.
#[derive(Debug)]
pub struct Report {
    /// Every finding.
    pub findings: Findings,
    /// The audit chain as checked: what the audit log opens with.
    pub chain: CheckedChain,
    /// Keys in the registry.
    pub keys: usize,
    /// The registry as read by the check: what custodyd opens it with
    /// ([`crate::registry::Registry::from_checked`]), each record parsed once.
    pub registry: crate::registry::CheckedKeys,
}

/// Checks every tree of `db`, reading only (no tree is made), the whole
/// audit chain from record 1 among them: `custodyd --check`.
pub fn check(db: &custody_store::Store, records: &RecordHome) -> Report {
    check_with(db, records, ChainScope::Whole)
}

/// [`check`] as custodyd runs it at start: the audit chain from its last
/// signed checkpoint on (threat model Q1), whose result the log opens with
/// (and whose checkpoint signature it checks, with the token's audit key).
pub fn check_at_start(db: &custody_store::Store, records: &RecordHome) -> Report {
    check_with(db, records, ChainScope::FromLastCheckpoint)
}

fn check_with(db: &custody_store::Store, records: &RecordHome, scope: ChainScope) -> Report {
    // The audit chain on a thread of its own, beside the other trees (the
    // keys most of all): neither reads what the other does, and the report
    // lists the chain's findings first, as one pass in turn would.
    let (chain, mut findings, keys, completed) = std::thread::scope(|threads| {
        let audit = threads.spawn(|| {
            let mut findings = Findings::default();
            let chain = crate::audit::check_stored(db, records, &mut findings, scope);
            (chain, findings)
        });
        let mut rest = Findings::default();
        let keys = crate::registry::check_stored(db, &mut rest);
        crate::budget::check_stored(db, &mut rest);
        crate::pin_lockout::check_stored(db, &mut rest);
        crate::clock::check_stored(db, &mut rest);
        let completed = crate::ceremony::journal::check_stored(db, &mut rest);
        crate::dual_control::store::check_stored(db, &mut rest);
        crate::shared::Epochs::check_stored(db, &mut rest);
        let (chain, mut findings) = audit
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        findings.extend(rest);
        (chain, findings, keys, completed)
    });
    // Across owners: a completed ceremony's keys were registered before it
    // was journaled completed, and the registry never drops a key.
    for (ceremony, key_ids) in completed {
        for key_id in key_ids.iter().filter(|id| !keys.contains_key(id)) {
            findings.add(
                "ceremonies",
                ceremony.as_bytes(),
                format!(
                    "expected key {key_id:?}, which this completed ceremony registered, in tree `keys`"
                ),
            );
        }
    }
    // An empty audit log under state only a running custodyd makes: the
    // log was deleted, and a new one must not start over it.
    if chain.is_empty() {
        for tree in STATEFUL_TREES {
            let holds = existing_tree(db, tree)
                .ok()
                .flatten()
                .is_some_and(|t| t.is_empty().is_ok_and(|empty| !empty));
            if holds {
                findings.add_shown(
                    "audit",
                    "record 1 (0x0000000000000001)".into(),
                    format!(
                        "expected audit records: tree `{tree}` holds state, but the audit log is empty"
                    ),
                );
            }
        }
    }
    Report {
        findings,
        chain,
        keys: keys.len(),
        registry: keys,
    }
}

impl Report {
    /// True if nothing was found.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }

    /// The report people read: a summary line, then one line per finding.
    pub fn describe(&self, dir: &std::path::Path) -> String {
        if self.is_clean() {
            return format!(
                "data directory {}: clean ({} audit records, {} keys)",
                dir.display(),
                self.chain.records(),
                self.keys
            );
        }
        let count = self.findings.count();
        let mut text = format!(
            "data directory {}: {count} record{} not as custodyd wrote {}; custodyd does not start on it and repairs nothing (see docs/runbook.md, \"Torn state\")",
            dir.display(),
            if count == 1 { "" } else { "s" },
            if count == 1 { "it" } else { "them" },
        );
        for finding in self.findings.listed() {
            text.push_str("\n  ");
            text.push_str(&finding.to_string());
        }
        if count > self.findings.listed().len() {
            text.push_str(&format!(
                "\n  ... and {} more",
                count - self.findings.listed().len()
            ));
        }
        text
    }

    /// The checked chain to open the audit log with and the checked
    /// registry, or the refusal to start.
    pub fn into_checked(
        self,
        dir: &std::path::Path,
    ) -> Result<(CheckedChain, crate::registry::CheckedKeys), String> {
        if self.is_clean() {
            Ok((self.chain, self.registry))
        } else {
            Err(self.describe(dir))
        }
    }
}

/// Custody objects on a token that a new audit log would start over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftOnToken {
    /// Objects (a key pair counts two).
    pub objects: u64,
    /// Their labels, each once, sorted.
    pub labels: Vec<String>,
}

/// The custody objects among `labels` (every object's label on the token)
/// if the audit log is empty: what a lost data directory left behind.
/// `None` if the log has records or the token holds none of custody's.
pub fn left_on_token<'a>(
    chain: &CheckedChain,
    labels: impl IntoIterator<Item = &'a str>,
) -> Option<LeftOnToken> {
    if !chain.is_empty() {
        return None;
    }
    let ours: Vec<&str> = labels
        .into_iter()
        .filter(|l| crate::names::is_custody_label(l))
        .collect();
    if ours.is_empty() {
        return None;
    }
    let mut distinct: Vec<String> = ours.iter().map(|l| (*l).to_string()).collect();
    distinct.sort();
    distinct.dedup();
    Some(LeftOnToken {
        objects: u64::try_from(ours.len()).unwrap_or(u64::MAX),
        labels: distinct,
    })
}

impl LeftOnToken {
    /// Why custodyd does not start, listing what it found (at most 20
    /// labels) and how to go on.
    pub fn refusal(&self, dir: &std::path::Path, token: &str) -> String {
        let shown: Vec<&str> = self.labels.iter().take(20).map(String::as_str).collect();
        let more = self.labels.len().saturating_sub(shown.len());
        format!(
            "data directory {} holds no audit log, but token {token:?} holds {} custody object{} ({}{}): \
             was the data directory lost? custodyd neither adopts nor destroys them. Restore the \
             directory from a copy, or follow docs/runbook.md, \"Data directory lost\": \
             set [audit] lost_directory_acknowledged = true to start a new log that leaves them \
             untouched and unregistered, then restore the keys from the latest backup bundle",
            dir.display(),
            self.objects,
            if self.objects == 1 { "" } else { "s" },
            shown.join(", "),
            if more > 0 {
                format!(", and {more} more labels")
            } else {
                String::new()
            },
        )
    }

    /// The first record of the new log.
    pub fn event(&self, token: &str) -> crate::audit::Event {
        crate::audit::Event::StartedOverLostDirectory {
            token: token.into(),
            objects: self.objects,
            labels: self.labels.iter().take(100).cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use super::*;

    fn db() -> (tempfile::TempDir, custody_store::Store) {
        let dir = tempfile::tempdir().unwrap();
        let db = custody_store::Store::open_sled(dir.path(), 16 << 20).unwrap();
        (dir, db)
    }

    #[test]
    fn an_empty_directory_is_clean_and_is_not_changed_by_the_check() {
        let (_dir, db) = db();
        let before = db.keyspace_names().unwrap();
        let report = check(&db, &RecordHome::Store(db.clone()));
        assert!(report.is_clean(), "{:?}", report.findings);
        assert!(report.chain.is_empty());
        assert_eq!(
            db.keyspace_names().unwrap(),
            before,
            "the check made no tree"
        );
    }

    #[test]
    fn state_without_an_audit_log_is_refused() {
        let (_dir, db) = db();
        db.keyspace("officers")
            .unwrap()
            .insert("alice", b"{}".as_slice())
            .unwrap();
        let report = check(&db, &RecordHome::Store(db.clone()));
        let text = report.describe(std::path::Path::new("/d"));
        assert!(text.contains("tree `audit`"), "{text}");
        assert!(text.contains("tree `officers` holds state"), "{text}");
        // The officer record itself is also not one.
        assert!(text.contains("tree `officers`, key \"alice\""), "{text}");
    }

    #[test]
    fn a_token_with_custody_objects_under_an_empty_log_is_what_a_lost_directory_left() {
        let (_dir, db) = db();
        let chain = check(&db, &RecordHome::Store(db.clone())).chain;
        let labels = [
            "key/a/v1",
            "key/a/v1",
            "custody-audit/v1",
            "custody-audit/v1",
            "someone-else",
        ];
        let left = left_on_token(&chain, labels).unwrap();
        assert_eq!(left.objects, 4);
        assert_eq!(left.labels, vec!["custody-audit/v1", "key/a/v1"]);
        let refusal = left.refusal(std::path::Path::new("/var/lib/custody"), "custody");
        assert!(refusal.contains("holds 4 custody objects"), "{refusal}");
        assert!(refusal.contains("lost_directory_acknowledged"), "{refusal}");
        assert!(left_on_token(&chain, ["someone-else"]).is_none());
    }
}
