//! Audit exports (JSON lines: hash-chained records, signed checkpoints, a
//! signed closing head), as `custodyctl audit verify` reads them
//! (`verify_export`; its refusals are the reason as text).

use custody_core::audit::{
    Entry, Event, ExportLine, Record, SignedHead, VerifyReport, chain_hash, checkpoint_message,
    head_message, rfc3339_ms, verify_export,
};
use p256::ecdsa::SigningKey;
use p256::ecdsa::signature::Signer;
use p256::pkcs8::EncodePublicKey;
use proptest::prelude::*;

use super::json::{apply, json_edits};
use super::{as_text, config, edits, mutate};

const T0: i64 = 1_780_000_000_000;

fn audit_key() -> SigningKey {
    SigningKey::from_slice(&[0x33; 32]).expect("a P-256 scalar")
}

fn spki() -> Vec<u8> {
    static SPKI: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    SPKI.get_or_init(|| {
        audit_key()
            .verifying_key()
            .to_public_key_der()
            .expect("a P-256 key encodes")
            .as_bytes()
            .to_vec()
    })
    .clone()
}

fn sign(message: &str) -> Vec<u8> {
    let signature: p256::ecdsa::Signature = audit_key().sign(message.as_bytes());
    signature.to_der().as_bytes().to_vec()
}

fn tip(records: &[Record]) -> (u64, [u8; 32]) {
    records.last().map_or((0, [0; 32]), |r| (r.seq, r.hash))
}

/// Appends `event` the way the writer does.
fn append(records: &mut Vec<Record>, event: Event) {
    let (last, prev) = tip(records);
    let seq = last + 1;
    let entry = Entry {
        seq,
        time: rfc3339_ms(T0 + 1000 * seq as i64),
        replica: None,
        prev: hex::encode(prev),
        event,
    };
    let entry = serde_json::to_vec(&entry).expect("an entry encodes");
    records.push(Record {
        seq,
        hash: chain_hash(&prev, &entry),
        entry,
    });
}

/// Twelve records, a signed checkpoint at 5 and at 10, a signed head: an
/// export as `custodyctl audit export` writes it.
fn export() -> String {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(build_export).clone()
}

fn build_export() -> String {
    let mut records = Vec::new();
    for seq in 1..=12u64 {
        if seq % 5 == 0 {
            let (head_seq, head_hash) = tip(&records);
            let signature = sign(&checkpoint_message(head_seq, &head_hash));
            append(
                &mut records,
                Event::Checkpoint {
                    head_seq,
                    head_hash: hex::encode(head_hash),
                    signature: hex::encode(signature),
                },
            );
        } else {
            append(
                &mut records,
                Event::Request {
                    principal: "ca-issuing".into(),
                    method: "/custody.v1.SigningService/Sign".into(),
                    resource: "keys/root-ca/versions/1".into(),
                    detail: format!("SHA256 {seq:064x} \"quoted\" \\ é"),
                    outcome: if seq % 3 == 0 {
                        "PERMISSION_DENIED"
                    } else {
                        "ok"
                    }
                    .into(),
                    request_id: None,
                },
            );
        }
    }
    let (seq, hash) = tip(&records);
    let time = "2026-05-28T20:26:40Z";
    let head = SignedHead {
        seq,
        hash,
        time: time.into(),
        signature: sign(&head_message(seq, &hash, time)),
    };
    let mut text = String::new();
    for record in &records {
        let line = ExportLine::record(record).expect("entries are UTF-8");
        text.push_str(&serde_json::to_string(&line).expect("a line encodes"));
        text.push('\n');
    }
    text.push_str(&serde_json::to_string(&ExportLine::head(&head)).expect("a line encodes"));
    text.push('\n');
    text
}

/// The records and head an export holds, hashes as bytes.
type Content = Vec<(u64, Vec<u8>, Vec<u8>, String)>;

fn content(text: &str) -> Content {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|line| serde_json::from_str::<ExportLine>(line).ok())
        .map(|line| match line {
            ExportLine::Record { seq, entry, hash } => (
                seq,
                entry.into_bytes(),
                hex::decode(hash).unwrap_or_default(),
                String::new(),
            ),
            ExportLine::Head {
                seq,
                hash,
                time,
                signature,
            } => (
                seq,
                hex::decode(signature).unwrap_or_default(),
                hex::decode(hash).unwrap_or_default(),
                time,
            ),
        })
        .collect()
}

fn original_report() -> VerifyReport {
    static REPORT: std::sync::OnceLock<VerifyReport> = std::sync::OnceLock::new();
    REPORT
        .get_or_init(|| verify_export(&export(), &spki()).expect("the fixture verifies"))
        .clone()
}

/// An accepted export must hold exactly the records and head that were
/// signed: the same report, and line by line the same content.
fn same_as_exported(text: &str, report: &VerifyReport) -> Result<(), TestCaseError> {
    prop_assert_eq!(report, &original_report());
    prop_assert_eq!(content(text), content(&export()));
    Ok(())
}

#[test]
fn f6_the_export_fixture_is_accepted() {
    let report = original_report();
    assert_eq!(
        (report.records, report.checkpoints, report.last_seq),
        (12, 2, 12)
    );
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn f6_a_changed_audit_export_is_refused_or_reads_as_what_was_signed(edits in edits()) {
        let text = as_text(&mutate(export().as_bytes(), &edits));
        if let Ok(report) = verify_export(&text, &spki()) {
            same_as_exported(&text, &report)?;
        }
    }

    #[test]
    fn f6_an_audit_export_with_changed_values_is_refused_or_reads_as_what_was_signed(
        line in 0usize..13,
        edits in json_edits(),
    ) {
        let original = export();
        let mut lines: Vec<String> = original.lines().map(String::from).collect();
        let value: serde_json::Value = serde_json::from_str(&lines[line]).expect("a JSON line");
        lines[line] = serde_json::to_string(&apply(&value, &edits)).expect("JSON writes");
        let text = lines.join("\n");
        if let Ok(report) = verify_export(&text, &spki()) {
            same_as_exported(&text, &report)?;
        }
    }

    #[test]
    fn f6_arbitrary_text_never_panics_the_audit_export_reader(text in ".{0,300}") {
        let _ = verify_export(&text, &spki());
    }
}
