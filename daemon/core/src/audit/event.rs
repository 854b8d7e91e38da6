//! What the log records: an [`Event`], the [`Entry`] it is stored in, and the
//! RFC 3339 times entries are written with ([`rfc3339_ms`] is also how the
//! rest of custody shows a time).

use serde::{Deserialize, Serialize};

/// Something that happened, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// custodyd started.
    DaemonStarted {
        /// Daemon version.
        version: String,
        /// HSM token label.
        token: String,
        /// SHA-256 of the audit key's SubjectPublicKeyInfo, hex.
        audit_key_sha256: String,
        /// Failed HSM logins since the last successful one.
        failed_logins_before: u32,
    },
    /// custodyd stopped on SIGTERM or SIGINT, after its last request
    /// finished. A start whose previous record is not this one followed a
    /// crash or a kill.
    DaemonStopped {
        /// The signal that stopped it.
        signal: String,
    },
    /// The log starts over a token that already holds custody objects: the
    /// data directory was lost (or replaced) while the token survived, and
    /// the operator acknowledged it (`[audit] lost_directory_acknowledged`).
    /// The objects are left as they are, unregistered (threat model F3).
    StartedOverLostDirectory {
        /// HSM token label.
        token: String,
        /// Custody objects the token holds (a key pair counts two).
        objects: u64,
        /// Their labels, each once, sorted (at most 100).
        labels: Vec<String>,
    },
    /// The records of a data directory written before the audit log had
    /// files of its own (the database's tree `audit`) were moved, checked
    /// whole, into the segment log `audit/` (threat model Q7, Q8).
    AuditLogMoved {
        /// Records moved: 1 to this one.
        records: u64,
    },
    /// A start cut the end of the last segment file: a group commit a crash
    /// interrupted before its sync, no record of which was acknowledged
    /// (threat model Q6, Q8).
    AuditTailCut {
        /// The last whole record, which stays.
        after_record: u64,
        /// Bytes cut after it.
        bytes: u64,
    },
    /// A request was made; `outcome` is `ok` or the refusal's reason.
    Request {
        /// Who asked (or `-` if unauthenticated).
        principal: String,
        /// gRPC method.
        method: String,
        /// The resource acted on (a key or version name), if any.
        resource: String,
        /// What exactly, for a signature: the hash and the hex digest signed.
        detail: String,
        /// `ok`, or the stable error reason.
        outcome: String,
        /// The request's id, which custodyd's log line for it carries too
        /// (`request_id`); absent for internal actors and in records
        /// written before it existed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
    },
    /// The first officer set was enrolled.
    OfficersGenesis {
        /// Officer ids, principals and public keys (hex), "id principal key".
        officers: Vec<String>,
        /// The administrative quorum.
        required: u32,
    },
    /// An officer voted (or tried to).
    Vote {
        /// `operations/{id}`.
        operation: String,
        /// The calling principal.
        principal: String,
        /// The officer id.
        officer: String,
        /// The officer's public key, hex, at the time of the vote.
        public_key: String,
        /// "approve" or "deny".
        vote: String,
        /// The digest, hex.
        digest: String,
        /// The Ed25519 signature, hex.
        signature: String,
        /// "ok" or the refusal reason.
        outcome: String,
    },
    /// An operation left the pending state.
    OperationFinished {
        /// `operations/{id}`.
        operation: String,
        /// succeeded, failed, denied or expired.
        state: String,
        /// The result or the error.
        detail: String,
    },
    /// A key version was marked compromised: the notice relying parties
    /// and auditors look for.
    RevocationNotice {
        /// `keys/{key_id}/versions/{n}`.
        version: String,
        /// Who reported it.
        principal: String,
        /// Why.
        reason: String,
        /// SHA-256 of the version's SubjectPublicKeyInfo, hex (signing keys).
        public_key_sha256: String,
        /// Key check value (AES keys).
        check_value: String,
        /// What replaced it: the rotation, or why there was none.
        replacement: String,
    },
    /// One entry of a ceremony's transcript: the transcript's own hash chain
    /// is anchored in the audit chain entry by entry.
    Ceremony {
        /// `ceremonies/{id}`.
        ceremony: String,
        /// The entry's sequence number in the transcript.
        entry: u32,
        /// The step.
        step: String,
        /// Officer id, or `custodyd`.
        actor: String,
        /// The entry in words.
        summary: String,
        /// The entry's hash, hex.
        entry_hash: String,
    },
    /// A signed checkpoint of the chain head.
    Checkpoint {
        /// The record the checkpoint covers.
        head_seq: u64,
        /// That record's hash, hex.
        head_hash: String,
        /// DER ECDSA P-256 signature by the audit key, hex.
        signature: String,
    },
}

/// The stored form of one record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// Sequence number from 1.
    pub seq: u64,
    /// RFC 3339 UTC time.
    pub time: String,
    /// The replica that wrote the record (`[store] replica_id`); absent
    /// when custodyd runs alone without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// Hash of the previous record, hex.
    pub prev: String,
    /// What happened.
    pub event: Event,
}

/// Unix milliseconds as RFC 3339 UTC (the number itself if out of range).
pub fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

pub(super) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One of each event, so every variant's encoding is exercised.
    fn every_event() -> Vec<Event> {
        vec![
            Event::DaemonStarted {
                version: "0.9.0".into(),
                token: "custody".into(),
                audit_key_sha256: "ab".repeat(32),
                failed_logins_before: 2,
            },
            Event::StartedOverLostDirectory {
                token: "custody".into(),
                objects: 3,
                labels: vec!["custody-audit/v1".into(), "key/root-ca/v1".into()],
            },
            Event::AuditLogMoved { records: 1_000_000 },
            Event::AuditTailCut {
                after_record: 41,
                bytes: 213,
            },
            Event::Request {
                principal: "ca-issuing".into(),
                method: "/custody.v1.SigningService/Sign".into(),
                resource: "keys/root-ca/versions/1".into(),
                detail: "SHA256 \"quoted\" \u{e9}\n".into(),
                outcome: "ok".into(),
                request_id: Some("5f0c1d2e3a4b6c7d".into()),
            },
            Event::OfficersGenesis {
                officers: vec!["o1 alice aa".into(), "o2 bob bb".into()],
                required: 2,
            },
            Event::Vote {
                operation: "operations/7".into(),
                principal: "alice".into(),
                officer: "o1".into(),
                public_key: "aa".into(),
                vote: "approve".into(),
                digest: "cd".repeat(32),
                signature: "ef".repeat(64),
                outcome: "ok".into(),
            },
            Event::OperationFinished {
                operation: "operations/7".into(),
                state: "succeeded".into(),
                detail: "keys/root-ca/versions/2".into(),
            },
            Event::RevocationNotice {
                version: "keys/root-ca/versions/1".into(),
                principal: "alice".into(),
                reason: "laptop lost".into(),
                public_key_sha256: "12".repeat(32),
                check_value: String::new(),
                replacement: "keys/root-ca/versions/2".into(),
            },
            Event::Ceremony {
                ceremony: "ceremonies/3".into(),
                entry: 4,
                step: "share_released".into(),
                actor: "o2".into(),
                summary: "share 2 of 3".into(),
                entry_hash: "34".repeat(32),
            },
            Event::Checkpoint {
                head_seq: 41,
                head_hash: "56".repeat(32),
                signature: "3045".into(),
            },
        ]
    }

    fn entry(seq: u64, event: Event) -> Entry {
        Entry {
            seq,
            time: rfc3339_ms(1_700_000_000_000),
            replica: None,
            prev: "00".repeat(32),
            event,
        }
    }

    #[test]
    fn the_same_entry_always_encodes_to_the_same_bytes() {
        for (i, event) in every_event().into_iter().enumerate() {
            let entry = entry(i as u64 + 1, event);
            let first = serde_json::to_vec(&entry).expect("an entry encodes");
            let again = serde_json::to_vec(&entry.clone()).expect("an entry encodes");
            assert_eq!(first, again, "{entry:?}");
            // Read back and written again (what a verifier or a later version
            // of custodyd would do), the bytes are the ones that were hashed.
            let decoded: Entry = serde_json::from_slice(&first).expect("an entry decodes");
            assert_eq!(decoded.event, entry.event);
            let reencoded = serde_json::to_vec(&decoded).expect("an entry encodes");
            assert_eq!(first, reencoded, "{entry:?}");
        }
    }

    #[test]
    fn an_entry_encodes_as_seq_time_prev_event_with_the_event_type_tagged() {
        let entry = entry(
            3,
            Event::OperationFinished {
                operation: "operations/7".into(),
                state: "denied".into(),
                detail: "o2 denied".into(),
            },
        );
        let bytes = serde_json::to_vec(&entry).expect("an entry encodes");
        let expected = format!(
            concat!(
                r#"{{"seq":3,"time":"2023-11-14T22:13:20Z","prev":"{}","#,
                r#""event":{{"type":"operation_finished","operation":"operations/7","#,
                r#""state":"denied","detail":"o2 denied"}}}}"#
            ),
            "00".repeat(32)
        );
        assert_eq!(String::from_utf8(bytes).expect("JSON is UTF-8"), expected);
    }

    #[test]
    fn times_are_rfc3339_utc_and_out_of_range_ones_stay_numbers() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_ms(1_700_000_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339_ms(i64::MAX), i64::MAX.to_string());
    }
}
