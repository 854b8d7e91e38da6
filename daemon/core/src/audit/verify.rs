//! Checking a chain: the stored log (at open and on demand) and an exported
//! log offline, with its checkpoints and closing head against the audit key.
//! The export's JSON-lines format, [`ExportLine`], is here because this is
//! what reads it back.

use p256::ecdsa::signature::Verifier;
use p256::pkcs8::DecodePublicKey;
use serde::{Deserialize, Serialize};

use super::chain::{AuditError, Record, SignedHead, chain_hash, checkpoint_message, head_message};
use super::event::{Entry, Event};

/// The outcome of checking a chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records checked.
    pub records: u64,
    /// Checkpoints whose signature verified.
    pub checkpoints: u64,
    /// The last record's sequence number and hash.
    pub last_seq: u64,
    /// The last record's hash.
    pub last_hash: [u8; 32],
    /// The first bad record and what is wrong with it.
    pub first_bad: Option<(u64, String)>,
}

/// Checks a sequence of records from seq 1: numbering, links, hashes, and,
/// given the audit key, every checkpoint's signature.
pub fn verify_records(
    records: impl Iterator<Item = Result<Record, AuditError>>,
    audit_key_spki: Option<&[u8]>,
) -> VerifyReport {
    let key = audit_key_spki.map(p256::ecdsa::VerifyingKey::from_public_key_der);
    let mut report = VerifyReport::default();
    let mut hashes: std::collections::HashMap<u64, [u8; 32]> = Default::default();
    for item in records {
        let expected = report.last_seq + 1;
        let fail = |report: &mut VerifyReport, seq: u64, problem: String| {
            report.first_bad = Some((seq, problem));
        };
        let record = match item {
            Ok(record) => record,
            Err(AuditError::Corrupt { seq, problem }) => {
                fail(&mut report, seq.max(expected), problem);
                return report;
            }
            Err(e) => {
                fail(&mut report, expected, e.to_string());
                return report;
            }
        };
        if record.seq != expected {
            fail(
                &mut report,
                expected,
                format!("expected record {expected}, found {}", record.seq),
            );
            return report;
        }
        let entry: Entry = match serde_json::from_slice(&record.entry) {
            Ok(entry) => entry,
            Err(e) => {
                fail(&mut report, expected, format!("entry does not parse: {e}"));
                return report;
            }
        };
        if entry.seq != record.seq {
            fail(
                &mut report,
                expected,
                format!("entry says it is record {}", entry.seq),
            );
            return report;
        }
        if entry.prev != hex::encode(report.last_hash) {
            fail(
                &mut report,
                expected,
                "does not link to the previous record".into(),
            );
            return report;
        }
        if chain_hash(&report.last_hash, &record.entry) != record.hash {
            fail(
                &mut report,
                expected,
                "hash does not match its content".into(),
            );
            return report;
        }
        if let Event::Checkpoint {
            head_seq,
            head_hash,
            signature,
        } = &entry.event
        {
            let Some(head) = hashes
                .get(head_seq)
                .copied()
                .filter(|h| hex::encode(h) == *head_hash)
            else {
                fail(
                    &mut report,
                    expected,
                    format!(
                        "checkpoint names record {head_seq} with a hash that is not in the chain"
                    ),
                );
                return report;
            };
            if let Some(key) = &key {
                let message = checkpoint_message(*head_seq, &head);
                let valid = match (key, hex::decode(signature)) {
                    (Ok(key), Ok(signature)) => p256::ecdsa::Signature::from_der(&signature)
                        .is_ok_and(|s| key.verify(message.as_bytes(), &s).is_ok()),
                    _ => false,
                };
                if !valid {
                    fail(
                        &mut report,
                        expected,
                        "checkpoint signature does not verify with the audit key".into(),
                    );
                    return report;
                }
                report.checkpoints += 1;
            }
        }
        hashes.insert(record.seq, record.hash);
        report.records += 1;
        report.last_seq = record.seq;
        report.last_hash = record.hash;
    }
    report
}

/// Checks an export's closing head against the audit key and the chain: a
/// head that covers records the export lacks means the tail was cut.
pub fn verify_head(
    report: &VerifyReport,
    head: &SignedHead,
    audit_key_spki: &[u8],
) -> Result<(), String> {
    let key = p256::ecdsa::VerifyingKey::from_public_key_der(audit_key_spki)
        .map_err(|e| format!("audit key: {e}"))?;
    let signature = p256::ecdsa::Signature::from_der(&head.signature)
        .map_err(|e| format!("head signature: {e}"))?;
    key.verify(
        head_message(head.seq, &head.hash, &head.time).as_bytes(),
        &signature,
    )
    .map_err(|_| "head signature does not verify with the audit key".to_string())?;
    if head.seq != report.last_seq || head.hash != report.last_hash {
        return Err(format!(
            "the signed head covers record {} but the log ends at record {}: records were cut from the tail",
            head.seq, report.last_seq
        ));
    }
    Ok(())
}

/// One line of an exported log (JSON lines): a record, or the closing head.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportLine {
    /// A record.
    Record {
        /// Sequence number.
        seq: u64,
        /// The entry, exactly as hashed (it is UTF-8 JSON).
        entry: String,
        /// The record's hash, hex.
        hash: String,
    },
    /// The signed head, last.
    Head {
        /// Last sequence number.
        seq: u64,
        /// Last hash, hex.
        hash: String,
        /// Signing time.
        time: String,
        /// DER signature, hex.
        signature: String,
    },
}

impl ExportLine {
    /// The line for a record.
    pub fn record(record: &Record) -> Result<ExportLine, String> {
        Ok(ExportLine::Record {
            seq: record.seq,
            entry: String::from_utf8(record.entry.clone())
                .map_err(|_| format!("record {} is not UTF-8", record.seq))?,
            hash: hex::encode(record.hash),
        })
    }

    /// The line for a head.
    pub fn head(head: &SignedHead) -> ExportLine {
        ExportLine::Head {
            seq: head.seq,
            hash: hex::encode(head.hash),
            time: head.time.clone(),
            signature: hex::encode(&head.signature),
        }
    }
}

fn hash32(hex_hash: &str) -> Option<[u8; 32]> {
    hex::decode(hex_hash).ok()?.try_into().ok()
}

/// Verifies an exported log offline: the chain, every checkpoint, and the
/// closing head, all against `audit_key_spki`. Returns the report, or says
/// which line is bad.
pub fn verify_export(text: &str, audit_key_spki: &[u8]) -> Result<VerifyReport, String> {
    let mut records = Vec::new();
    let mut head = None;
    for (number, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        if head.is_some() {
            return Err(format!(
                "line {}: content after the closing head",
                number + 1
            ));
        }
        let parsed: ExportLine =
            serde_json::from_str(line).map_err(|e| format!("line {}: {e}", number + 1))?;
        match parsed {
            ExportLine::Record { seq, entry, hash } => {
                let hash = hash32(&hash).ok_or_else(|| format!("line {}: bad hash", number + 1))?;
                records.push(Ok(Record {
                    seq,
                    entry: entry.into_bytes(),
                    hash,
                }));
            }
            ExportLine::Head {
                seq,
                hash,
                time,
                signature,
            } => {
                head = Some(SignedHead {
                    seq,
                    hash: hash32(&hash)
                        .ok_or_else(|| format!("line {}: bad head hash", number + 1))?,
                    time,
                    signature: hex::decode(signature)
                        .map_err(|_| format!("line {}: bad head signature", number + 1))?,
                });
            }
        }
    }
    let report = verify_records(records.into_iter(), Some(audit_key_spki));
    if let Some((seq, problem)) = &report.first_bad {
        return Err(format!("record {seq}: {problem}"));
    }
    let head = head.ok_or("the export has no signed head: its tail may have been cut")?;
    verify_head(&report, &head, audit_key_spki)?;
    Ok(report)
}
