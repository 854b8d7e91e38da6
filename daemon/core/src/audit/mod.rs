//! The tamper-evident audit log.
//!
//! Each record is canonical JSON bytes (`seq`, `time`, `prev`, `event`) stored
//! with its hash, `SHA-256(previous hash || entry)`, under its sequence
//! number: in a segment log of its own beside the embedded database, or in
//! the shared store's keyspace `audit` (see [`RecordHome`]). The first record's previous hash is 32
//! zero bytes. Deleting, reordering, inserting or changing a record breaks the
//! chain; cutting the tail is caught by checkpoints (records that carry an
//! HSM signature over the head) and by the signed head every export ends with.
//!
//! Appends go through one writer thread. It takes whatever is queued (group
//! commit), writes the batch, flushes once, and only then answers each caller:
//! an operation waits for its record to be durable, and if the flush fails the
//! caller gets an error and the operation must not happen (fail closed). After
//! a failed flush the log refuses every later append until restart, when the
//! chain is checked again. The writer thread also owns an HSM session for the
//! audit key, which signs checkpoints and export heads.
//!
//! | file | owns |
//! |---|---|
//! | `event.rs` | [`Event`], what happened; [`Entry`], the record it is stored in; RFC 3339 times |
//! | `chain.rs` | [`chain_hash`], the messages the audit key signs, [`Record`], [`SignedHead`], [`AuditError`] |
//! | `writer.rs` | [`AuditLog`] and its writer thread: group commit linked to the stored head, fail closed, checkpoints, the audit key |
//! | `home.rs` | [`RecordHome`], where the records lie (a segment log of their own with sled, the store's keyspace with etcd), and the move of a directory written before segments |
//! | `repairs.rs` | what a start did to the log's files before the log opened (a move, a torn tail cut): noted first, recorded as events once it opens |
//! | `stored.rs` | how records and the head lie in the store, and their check (at start from the last checkpoint, offline from record 1) |
//! | `verify.rs` | checking a chain ([`verify_records`]), a signed head, and an export offline ([`ExportLine`], [`verify_export`]) |
//!
//! The files are private modules and everything is re-exported here, so every
//! path is still `crate::audit::X` as it was when this was one file.

mod chain;
mod event;
mod home;
mod repairs;
mod stored;
mod verify;
mod writer;

pub use chain::{AuditError, Record, SignedHead, chain_hash, checkpoint_message, head_message};
pub use event::{Entry, Event, rfc3339_ms};
pub use home::{
    MIGRATION_POINTS, MoveProgress, RecordHome, RecordIter, SEGMENTS_DIR, TAIL_CUT_POINT,
    migrate_to_segments, open_segments_for_writing,
};
pub use repairs::{FileRepair, record_file_repairs};
pub use stored::{ChainScope, CheckedChain, check_stored};
pub use verify::{
    ExportLine, VerifyReport, checkpoint_signature_verifies, verify_export, verify_head,
    verify_records, verify_records_from,
};
pub use writer::{AUDIT_KEY_LABEL, AuditHold, AuditLog, CheckpointPolicy};
