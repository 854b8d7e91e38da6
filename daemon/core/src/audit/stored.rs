//! How the log lies in the store, and its check at start: each record
//! under its big-endian sequence number in keyspace `audit` (its hash, then
//! its entry), the head in keyspace `audit_head` (the last record's number
//! and hash). The writer ([`super::writer`]) writes them; this reads and
//! checks them.

use super::chain::{AuditError, Record};
use super::verify::{VerifyReport, verify_records};

/// The key of the head in keyspace `audit_head`.
pub(super) const HEAD: &[u8] = b"head";

/// The head as stored: the last record's sequence number (8 bytes,
/// big-endian), then its hash.
pub(super) fn encode_head(seq: u64, hash: &[u8; 32]) -> Vec<u8> {
    [seq.to_be_bytes().as_slice(), hash].concat()
}

pub(super) fn decode_head(value: &[u8]) -> Option<(u64, [u8; 32])> {
    let (seq, hash) = value.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*seq), <[u8; 32]>::try_from(hash).ok()?))
}

/// The stored chain, checked once at start (or by `custodyd --check`):
/// numbering, links and hashes from record 1 ([`verify_records`], without
/// the audit key, which is on the token). What [`super::AuditLog::open`] takes its
/// head from.
#[derive(Debug, Clone)]
pub struct CheckedChain {
    pub(super) report: VerifyReport,
}

impl CheckedChain {
    /// Records that verified.
    pub fn records(&self) -> u64 {
        self.report.records
    }

    /// True if the log holds no record: custodyd never started on this
    /// directory (its first start appends one at once), or it was lost.
    pub fn is_empty(&self) -> bool {
        self.report.records == 0 && self.report.first_bad.is_none()
    }
}

/// Whether the stored log holds a record now (a replica sharing the store
/// may have written the first since this one checked the chain).
pub fn stored_log_holds_records(db: &custody_store::Store) -> Result<bool, String> {
    match db.existing_keyspace("audit").map_err(|e| e.to_string())? {
        Some(tree) => Ok(tree.first().map_err(|e| e.to_string())?.is_some()),
        None => Ok(false),
    }
}

/// Checks the stored audit chain (tree `audit`) in one streaming pass and
/// notes its first bad record: a changed, truncated, reordered or inserted
/// record, or one deleted anywhere but at the tail. Records deleted from
/// the tail leave a shorter chain that is whole: the stored head (tree
/// `audit_head`) names a record past its end, unless it was rolled back
/// too; then only a checkpoint or an export's signed head kept elsewhere
/// shows it (threat model F1). The head is read before the chain, so
/// records appended meanwhile by another replica only lengthen the chain.
pub fn check_stored(
    db: &custody_store::Store,
    findings: &mut crate::findings::Findings,
) -> CheckedChain {
    let head = check_stored_head(db, findings);
    let chain = check_stored_chain(db, findings);
    if let (Some((seq, hash)), None) = (head, &chain.report.first_bad) {
        let last = chain.report.last_seq;
        let stored = (seq <= last)
            .then(|| {
                db.keyspace("audit")
                    .and_then(|tree| tree.get(seq.to_be_bytes()))
            })
            .and_then(Result::ok)
            .flatten();
        let problem = match stored {
            None if seq > last => Some(format!(
                "expected the log to reach record {seq}, which the head names, but it ends at record {last}: records were cut from its end"
            )),
            Some(value) if value.get(..32) == Some(hash.as_slice()) => None,
            _ => Some(format!(
                "expected the head to name record {seq} with that record's hash"
            )),
        };
        if let Some(problem) = problem {
            findings.add("audit_head", HEAD, problem);
        }
    }
    chain
}

/// The stored head, or a finding if it is malformed.
fn check_stored_head(
    db: &custody_store::Store,
    findings: &mut crate::findings::Findings,
) -> Option<(u64, [u8; 32])> {
    let mut head = None;
    crate::findings::each_record(db, "audit_head", findings, |key, value, findings| {
        if key != HEAD {
            findings.add("audit_head", key, "expected only the key \"head\"");
        } else if let Some(decoded) = decode_head(value) {
            head = Some(decoded);
        } else {
            findings.add(
                "audit_head",
                key,
                format!(
                    "expected a sequence number and a hash (40 bytes), found {} bytes",
                    value.len()
                ),
            );
        }
    });
    head
}

fn check_stored_chain(
    db: &custody_store::Store,
    findings: &mut crate::findings::Findings,
) -> CheckedChain {
    let tree = match crate::findings::existing_tree(db, "audit") {
        Ok(Some(tree)) => tree,
        Ok(None) => {
            return CheckedChain {
                report: VerifyReport::default(),
            };
        }
        Err(e) => {
            findings.unreadable("audit", &e);
            return CheckedChain {
                report: VerifyReport {
                    first_bad: Some((0, e.to_string())),
                    ..VerifyReport::default()
                },
            };
        }
    };
    let report = verify_records(stored_records(&tree, 1), None);
    if let Some((seq, problem)) = &report.first_bad {
        findings.add_shown(
            "audit",
            format!("record {seq} (0x{})", hex::encode(seq.to_be_bytes())),
            format!(
                "expected record {seq} to follow record {} in the hash chain: {problem}",
                report.last_seq
            ),
        );
    }
    CheckedChain { report }
}

pub(super) fn stored_records(
    tree: &custody_store::Keyspace,
    start: u64,
) -> impl Iterator<Item = Result<Record, AuditError>> + use<> {
    tree.range(start.max(1).to_be_bytes()..).map(|item| {
        let (key, value) = item.map_err(|e| AuditError::Unavailable(e.to_string()))?;
        let seq = <[u8; 8]>::try_from(key.as_slice())
            .map(u64::from_be_bytes)
            .map_err(|_| AuditError::Corrupt {
                seq: 0,
                problem: "malformed record key".into(),
            })?;
        if value.len() < 32 {
            return Err(AuditError::Corrupt {
                seq,
                problem: "record shorter than its hash".into(),
            });
        }
        let (hash, entry) = value.split_at(32);
        Ok(Record {
            seq,
            entry: entry.to_vec(),
            hash: hash.try_into().unwrap_or([0; 32]),
        })
    })
}
