//! What a start did to the audit log's files before the log could record
//! it: the move of a directory written before segments
//! ([`super::migrate_to_segments`]) and the cut of a torn tail
//! ([`super::open_segments_for_writing`]). Both happen before the audit key
//! is on hand, so each is noted in keyspace `audit_head` (key `repairs`,
//! sealed, flushed) *before* the act, and recorded as an audit event once
//! the log is open ([`record_file_repairs`]); the note is removed only after
//! the events are durable (threat model Q8). A crash anywhere in between
//! leaves the note, and the next start records it: at least once, never
//! lost. A crash after the events and before the note's removal records
//! them again at the next start.

use serde::{Deserialize, Serialize};

use super::event::Event;
use super::writer::AuditLog;

/// The key of the notes in keyspace `audit_head`.
pub(super) const REPAIRS: &[u8] = b"repairs";

/// One act on the log's files, noted before it was done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FileRepair {
    /// Records 1 to `records` moved out of the database's tree `audit`
    /// into the segment log, checked whole.
    Moved {
        /// The last record moved.
        records: u64,
    },
    /// The bytes after record `after_record` in the last segment file cut.
    TailCut {
        /// The last whole record, which stays.
        after_record: u64,
        /// Bytes cut: those after the last whole record, up to the last
        /// that is not zero (zeros written ahead of the records follow).
        bytes: u64,
    },
}

impl FileRepair {
    /// The audit event that records it.
    pub fn event(&self) -> Event {
        match *self {
            FileRepair::Moved { records } => Event::AuditLogMoved { records },
            FileRepair::TailCut {
                after_record,
                bytes,
            } => Event::AuditTailCut {
                after_record,
                bytes,
            },
        }
    }
}

/// Notes `repair` (once: a start redoing an act a crash interrupted notes
/// the same one) and flushes, before the act.
pub(super) fn note(db: &custody_store::Store, repair: FileRepair) -> Result<(), String> {
    let mut notes = pending(db)?;
    if notes.contains(&repair) {
        return Ok(());
    }
    notes.push(repair);
    let space = db.keyspace("audit_head").map_err(|e| e.to_string())?;
    let sealed = crate::stored::seal(REPAIRS, &notes).map_err(|e| e.to_string())?;
    space.insert(REPAIRS, sealed).map_err(|e| e.to_string())?;
    db.flush().map_err(|e| e.to_string())
}

/// The acts noted and not yet recorded, in the order they were done.
fn pending(db: &custody_store::Store) -> Result<Vec<FileRepair>, String> {
    let Some(space) = db
        .existing_keyspace("audit_head")
        .map_err(|e| e.to_string())?
    else {
        return Ok(Vec::new());
    };
    match space.get(REPAIRS).map_err(|e| e.to_string())? {
        None => Ok(Vec::new()),
        Some(value) => {
            decode(&value).map_err(|e| format!("keyspace `audit_head`, key `repairs`: {e}"))
        }
    }
}

/// The notes as stored under [`REPAIRS`] (sealed, [`crate::stored`]):
/// what [`pending`] reads and the check at start checks.
pub(super) fn decode(value: &[u8]) -> Result<Vec<FileRepair>, String> {
    crate::stored::open(REPAIRS, value)
}

/// Appends one event for each act noted (each durable before the next),
/// then removes the notes. Returns how many were recorded.
pub async fn record_file_repairs(
    audit: &AuditLog,
    db: &custody_store::Store,
) -> Result<usize, String> {
    let notes = pending(db)?;
    if notes.is_empty() {
        return Ok(0);
    }
    for repair in &notes {
        audit
            .append(repair.event())
            .await
            .map_err(|e| e.to_string())?;
    }
    let space = db.keyspace("audit_head").map_err(|e| e.to_string())?;
    space.remove(REPAIRS).map_err(|e| e.to_string())?;
    db.flush().map_err(|e| e.to_string())?;
    Ok(notes.len())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use super::*;

    #[test]
    fn a_repair_noted_twice_is_kept_once_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = custody_store::Store::open_sled(dir.path(), 16 << 20).unwrap();
        assert_eq!(pending(&db).unwrap(), vec![]);
        let moved = FileRepair::Moved { records: 7 };
        let cut = FileRepair::TailCut {
            after_record: 9,
            bytes: 31,
        };
        note(&db, moved.clone()).unwrap();
        note(&db, cut.clone()).unwrap();
        note(&db, moved.clone()).unwrap();
        assert_eq!(pending(&db).unwrap(), vec![moved, cut]);
    }
}
