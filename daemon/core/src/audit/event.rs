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
