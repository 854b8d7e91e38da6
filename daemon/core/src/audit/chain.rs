//! The hash chain: how a record's hash binds it to the one before, the
//! messages the audit key signs over a head (checkpoints and export heads),
//! the forms a record and a signed head travel in, and [`AuditError`], what
//! reading or extending the chain can fail with.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const CHECKPOINT_DOMAIN: &str = "custody-audit-checkpoint/v1";
const HEAD_DOMAIN: &str = "custody-audit-head/v1";

/// One record as exported: the exact bytes hashed, and the hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Sequence number.
    pub seq: u64,
    /// Canonical JSON of the [`Entry`](super::Entry).
    pub entry: Vec<u8>,
    /// `SHA-256(previous hash || entry)`.
    pub hash: [u8; 32],
}

/// The chain head signed by the audit key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHead {
    /// Last record's sequence number.
    pub seq: u64,
    /// Last record's hash.
    pub hash: [u8; 32],
    /// When it was signed.
    pub time: String,
    /// DER ECDSA signature over SHA-256 of [`head_message`].
    pub signature: Vec<u8>,
}

/// What an append or a read of the log can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The record could not be made durable; the operation must not happen.
    #[error("audit log unavailable: {0}")]
    Unavailable(String),
    /// The stored chain does not verify.
    #[error("audit log corrupt at record {seq}: {problem}")]
    Corrupt {
        /// The first bad record.
        seq: u64,
        /// What is wrong with it.
        problem: String,
    },
}

/// `SHA-256(prev || entry)`.
pub fn chain_hash(prev: &[u8; 32], entry: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(entry);
    hasher.finalize().into()
}

/// The message a checkpoint signs (its SHA-256 is what the HSM signs).
pub fn checkpoint_message(seq: u64, hash: &[u8; 32]) -> String {
    format!("{CHECKPOINT_DOMAIN}\n{seq}\n{}", hex::encode(hash))
}

/// The message an export head signs.
pub fn head_message(seq: u64, hash: &[u8; 32], time: &str) -> String {
    format!("{HEAD_DOMAIN}\n{seq}\n{}\n{time}", hex::encode(hash))
}
