//! Dual control: officers, quorum policies, and operations that run only with
//! M-of-N signed approvals.
//!
//! - [`quorum`]: the rule itself, pure and property-tested.
//! - [`operation`]: what an operation is, its canonical digest (what officers
//!   sign) and its rendering (what they read).
//! - [`store`]: officers, the administrative quorum and operations in the store,
//!   flushed before anything is acknowledged.
//! - [`operation_store`]: operations and the indexes (pending, by time, by
//!   requester, finished) that keep sweeps and lists bounded.
//! - [`officer_key`]: the officer's own Ed25519 key, in a passphrase-protected
//!   file held by `custodyctl`.
//! - [`sealed`]: secrets (backup shares) sealed to an officer's key.

pub mod officer_key;
pub mod operation;
pub mod operation_store;
pub mod quorum;
pub mod sealed;
pub mod store;

/// The message an approval signs: a domain tag and the operation digest.
pub fn approval_message(digest: &[u8; 32]) -> Vec<u8> {
    [b"custody-approve/v1\n".as_slice(), digest].concat()
}

/// The message a denial signs.
pub fn denial_message(digest: &[u8; 32]) -> Vec<u8> {
    [b"custody-deny/v1\n".as_slice(), digest].concat()
}
