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
    /// The shared store did not answer: the write landed whole or not at
    /// all (unknown which), the caller must not act, and a later write
    /// links to whatever the stored head is.
    #[error("audit log unavailable (store unreachable): {0}")]
    StoreUnreachable(String),
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

#[cfg(test)]
mod tests {
    use super::*;

    const GENESIS: [u8; 32] = [0; 32];

    #[test]
    fn chain_hash_is_sha256_of_the_previous_hash_then_the_entry() {
        let prev = [7u8; 32];
        let entry = br#"{"seq":2}"#;
        let mut joined = prev.to_vec();
        joined.extend_from_slice(entry);
        let expected: [u8; 32] = Sha256::digest(&joined).into();
        assert_eq!(chain_hash(&prev, entry), expected);
        // The first record links to 32 zero bytes, not to nothing.
        let first: [u8; 32] = Sha256::digest(entry).into();
        assert_ne!(chain_hash(&GENESIS, entry), first);
    }

    #[test]
    fn each_record_hash_covers_its_predecessor() {
        let entries: Vec<Vec<u8>> = (1..=5)
            .map(|seq| format!(r#"{{"seq":{seq}}}"#).into_bytes())
            .collect();
        let chain = |entries: &[Vec<u8>]| {
            let mut hashes = Vec::new();
            let mut prev = GENESIS;
            for entry in entries {
                prev = chain_hash(&prev, entry);
                hashes.push(prev);
            }
            hashes
        };
        let original = chain(&entries);
        // Change any one record: its hash and every later one change, the
        // earlier ones do not.
        for changed in 0..entries.len() {
            let mut tampered = entries.clone();
            tampered[changed].push(b' ');
            let hashes = chain(&tampered);
            for (i, (a, b)) in original.iter().zip(&hashes).enumerate() {
                if i < changed {
                    assert_eq!(a, b, "record {i} changed with record {changed}");
                } else {
                    assert_ne!(a, b, "record {i} does not cover record {changed}");
                }
            }
        }
        // The same entry after a different predecessor hashes differently.
        assert_ne!(
            chain_hash(&original[0], &entries[2]),
            chain_hash(&original[1], &entries[2])
        );
    }

    #[test]
    fn checkpoint_and_head_messages_are_pinned_and_cannot_stand_for_each_other() {
        let hash = [0xab; 32];
        let hex_hash = "ab".repeat(32);
        assert_eq!(
            checkpoint_message(17, &hash),
            format!("custody-audit-checkpoint/v1\n17\n{hex_hash}")
        );
        assert_eq!(
            head_message(17, &hash, "2023-11-14T22:13:20Z"),
            format!("custody-audit-head/v1\n17\n{hex_hash}\n2023-11-14T22:13:20Z")
        );
        // Whatever the head's time, a head message never equals a checkpoint
        // message, so a checkpoint's signature cannot close an export.
        for time in ["", "x", "2023-11-14T22:13:20Z"] {
            assert_ne!(head_message(17, &hash, time), checkpoint_message(17, &hash));
        }
    }

    #[test]
    fn a_corrupt_error_names_the_record_and_the_problem() {
        let error = AuditError::Corrupt {
            seq: 12,
            problem: "hash does not match its content".into(),
        };
        assert_eq!(
            error.to_string(),
            "audit log corrupt at record 12: hash does not match its content"
        );
    }
}
