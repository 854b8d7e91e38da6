//! The stored head and the check of the stored log: each record (its
//! hash, then its entry) in its [`RecordHome`] (under its big-endian
//! sequence number when that is the store's keyspace `audit`), the head in
//! keyspace `audit_head` (the last record's number and hash). The writer
//! ([`super::writer`]) writes them; this reads and checks them.

use super::chain::{AuditError, Record};
use super::event::{Entry, Event};
use super::home::{RecordHome, decode_record};
use super::repairs::{self, REPAIRS};
use super::verify::{VerifyReport, verify_records_from};

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

/// The stored chain, checked once at start (from its last signed
/// checkpoint) or by `custodyd --check` (from record 1): numbering, links
/// and hashes ([`super::verify_records`], without the audit key, which is
/// on the token). What [`super::AuditLog::open`] takes its head from, and
/// where it checks the checkpoint's signature once it has the key.
#[derive(Debug, Clone)]
pub struct CheckedChain {
    pub(super) report: VerifyReport,
    pub(super) anchor: Option<Anchor>,
}

/// The signed checkpoint a check began at: the records after `head_seq`
/// were checked to chain to `head_hash`, which `signature` signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Anchor {
    /// The checkpoint's own record.
    pub(super) seq: u64,
    pub(super) head_seq: u64,
    pub(super) head_hash: [u8; 32],
    /// DER, hex, as stored.
    pub(super) signature: String,
    /// When the checkpoint was written (RFC 3339, as stored): where the
    /// writer's checkpoint interval resumes, without reading the tail
    /// again.
    pub(super) time: String,
}

impl CheckedChain {
    /// Records that verified (from [`Self::first_checked`] on).
    pub fn records(&self) -> u64 {
        self.report.records
    }

    /// The first record the check read: 1, or the last signed checkpoint
    /// if the check began there.
    pub fn first_checked(&self) -> u64 {
        self.anchor.as_ref().map_or(1, |anchor| anchor.seq)
    }

    /// True if the log holds no record: custodyd never started on this
    /// directory (its first start appends one at once), or it was lost.
    pub fn is_empty(&self) -> bool {
        self.report.records == 0 && self.report.first_bad.is_none() && self.anchor.is_none()
    }
}

/// How much of the stored chain [`check_stored`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainScope {
    /// Every record from record 1 (`custodyd --check`, offline).
    Whole,
    /// The records from the last checkpoint on, the checkpoint included
    /// (the check at start, threat model Q1): its cost follows the
    /// checkpoint cadence, not the log's length. From record 1 if the log
    /// holds no checkpoint.
    FromLastCheckpoint,
}

/// Checks the stored audit chain (tree `audit`) in one streaming pass and
/// notes its first bad record: a changed, truncated, reordered or inserted
/// record, or one deleted anywhere but at the tail. Records deleted from
/// the tail leave a shorter chain that is whole: the stored head (tree
/// `audit_head`) names a record past its end, unless it was rolled back
/// too; then only a checkpoint or an export's signed head kept elsewhere
/// shows it (threat model F1). The head is read before the chain, so
/// records appended meanwhile by another replica only lengthen the chain.
/// With [`ChainScope::FromLastCheckpoint`], what lies before the last
/// checkpoint is not read (threat model Q1).
pub fn check_stored(
    db: &custody_store::Store,
    records: &RecordHome,
    findings: &mut crate::findings::Findings,
    scope: ChainScope,
) -> CheckedChain {
    let head = check_stored_head(db, findings);
    let chain = check_stored_chain(records, findings, scope);
    if let (Some((seq, hash)), None) = (head, &chain.report.first_bad) {
        let last = chain.report.last_seq;
        let stored = (seq <= last)
            .then(|| records.get(seq))
            .and_then(Result::ok)
            .flatten();
        let problem = match stored {
            None if seq > last => Some(format!(
                "expected the log to reach record {seq}, which the head names, but it ends at record {last}: records were cut from its end"
            )),
            Some(record) if record.hash == hash => None,
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
        if key == REPAIRS {
            if let Err(problem) = repairs::decode(value) {
                findings.add("audit_head", key, problem);
            }
        } else if key != HEAD {
            findings.add(
                "audit_head",
                key,
                "expected only the keys \"head\" and \"repairs\"",
            );
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
    records: &RecordHome,
    findings: &mut crate::findings::Findings,
    scope: ChainScope,
) -> CheckedChain {
    let anchor = match scope {
        ChainScope::Whole => None,
        ChainScope::FromLastCheckpoint => last_checkpoint(records),
    };
    let (seq, hash) = anchor
        .as_ref()
        .map_or((0, [0; 32]), |a| (a.head_seq, a.head_hash));
    let report = verify_records_from(seq, hash, records.records(seq + 1), None);
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
    CheckedChain { report, anchor }
}

/// The last record that reads as a checkpoint of the record just before
/// it (as the writer makes them), from the tail back. A damaged checkpoint
/// does not read as one: the search goes on to an earlier one, and the
/// check from there meets the damage.
fn last_checkpoint(records: &RecordHome) -> Option<Anchor> {
    records.records_rev().find_map(|record| {
        let record = record.ok()?;
        let entry = record.entry.as_slice();
        // Most records are no checkpoint: skip the parse for them.
        if !entry.windows(12).any(|w| w == b"\"checkpoint\"") {
            return None;
        }
        let entry: Entry = serde_json::from_slice(entry).ok()?;
        let Event::Checkpoint {
            head_seq,
            head_hash,
            signature,
        } = entry.event
        else {
            return None;
        };
        if entry.seq != head_seq.checked_add(1)? {
            return None;
        }
        Some(Anchor {
            seq: entry.seq,
            head_seq,
            head_hash: hex::decode(head_hash).ok()?.try_into().ok()?,
            signature,
            time: entry.time,
        })
    })
}

pub(super) fn stored_records(
    tree: &custody_store::Keyspace,
    start: u64,
) -> impl Iterator<Item = Result<Record, AuditError>> + Send + use<> {
    tree.range(start.max(1).to_be_bytes()..).map(|item| {
        let (key, value) = item.map_err(|e| AuditError::Unavailable(e.to_string()))?;
        let seq = <[u8; 8]>::try_from(key.as_slice())
            .map(u64::from_be_bytes)
            .map_err(|_| AuditError::Corrupt {
                seq: 0,
                problem: "malformed record key".into(),
            })?;
        decode_record(seq, value)
    })
}
