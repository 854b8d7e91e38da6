//! Where the audit records lie, and the one way every reader and the
//! writer reach them: [`RecordHome`].
//!
//! - With the embedded backend (sled), in a segment log of their own,
//!   `audit/` beside `custody.sled` ([`custody_store::segments`]), so that
//!   a start reads one file, not a database that grows with the log
//!   (threat model Q5–Q7). The head stays in the store's keyspace
//!   `audit_head`, written after the records are synced.
//! - With etcd, in the store's keyspace `audit`, where replicas append to
//!   one chain by moving the head in the same transaction as the records.
//!
//! Either way a record is its hash then its entry's JSON, numbered from 1;
//! chains, checkpoints, heads and every verifier are the same. This file
//! also owns the move of a data directory written before segments
//! ([`migrate_to_segments`]) and the cut of a torn tail at start, each
//! noted before it is done and recorded once the log opens
//! ([`super::repairs`]).

use std::path::Path;
use std::sync::Arc;

use custody_store::segments::{SegmentError, SegmentLog, Tail};

use super::chain::{AuditError, Record};
use super::repairs::{FileRepair, note};
use super::stored::{HEAD, decode_head};

/// The segment log's directory in a data directory.
pub const SEGMENTS_DIR: &str = "audit";

/// Where a migration copies the log before it becomes [`SEGMENTS_DIR`].
const MIGRATING_DIR: &str = "audit.migrating";

/// Records copied per append (and sync) while migrating.
const MIGRATION_BATCH: usize = 4096;

/// Crash points of a migration, in order (tests iterate over this list).
pub const MIGRATION_POINTS: [&str; 3] = [
    "audit.migration.after_copy",
    "audit.migration.after_rename",
    "audit.migration.after_clear",
];

/// How far a move of the audit log ([`migrate_to_segments`]) has got,
/// reported to its caller as it goes (custodyd tells systemd that it is
/// still starting, and what it is doing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoveProgress {
    /// Records to move.
    pub records: u64,
    /// Records copied so far.
    pub copied: u64,
    /// Records of the copy checked so far.
    pub checked: u64,
}

/// The crash point after a start cut a torn tail, before the log opens
/// and records the cut.
pub const TAIL_CUT_POINT: &str = "audit.tail_cut.after_cut";

/// Where the records lie: see the module's documentation.
#[derive(Clone, Debug)]
pub enum RecordHome {
    /// Keyspace `audit` of the store (never made by a reader).
    Store(custody_store::Store),
    /// A segment log of its own.
    Segments(Arc<SegmentLog>),
}

/// Boxed, so that both homes give one type.
pub type RecordIter = Box<dyn Iterator<Item = Result<Record, AuditError>> + Send>;

fn segment_error(error: SegmentError) -> AuditError {
    match error {
        SegmentError::Io(_) | SegmentError::OutOfOrder(_) => {
            AuditError::Unavailable(error.to_string())
        }
        SegmentError::Corrupt { .. } => AuditError::Corrupt {
            seq: 0,
            problem: error.to_string(),
        },
    }
}

/// A stored record (its hash, then its entry) as a [`Record`].
pub(super) fn decode_record(seq: u64, value: Vec<u8>) -> Result<Record, AuditError> {
    if value.len() < 32 {
        return Err(AuditError::Corrupt {
            seq,
            problem: "record shorter than its hash".into(),
        });
    }
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&value[..32]);
    let mut entry = value;
    entry.drain(..32);
    Ok(Record { seq, entry, hash })
}

impl RecordHome {
    /// The home of a data directory on the embedded backend, for reading
    /// (the offline check): the segment log if its directory exists (read
    /// in place, a torn tail left as it is), the store's keyspace otherwise
    /// (a directory written before segments, or one whose segment log was
    /// removed: its head then names records no home holds).
    pub fn of_data_dir(db: &custody_store::Store, data_dir: &Path) -> Result<RecordHome, String> {
        let dir = data_dir.join(SEGMENTS_DIR);
        if dir.is_dir() {
            SegmentLog::open_for_check(&dir, Tail::Keep)
                .map(|log| RecordHome::Segments(Arc::new(log)))
                .map_err(|e| format!("{}: {e}", dir.display()))
        } else {
            Ok(RecordHome::Store(db.clone()))
        }
    }

    /// The records from `start` on, in order.
    pub fn records(&self, start: u64) -> RecordIter {
        match self {
            RecordHome::Store(db) => match db.existing_keyspace("audit") {
                Ok(Some(tree)) => Box::new(super::stored::stored_records(&tree, start)),
                Ok(None) => Box::new(std::iter::empty()),
                Err(e) => Box::new(std::iter::once(Err(AuditError::Unavailable(e.to_string())))),
            },
            RecordHome::Segments(log) => Box::new(log.records_from(start).map(|item| {
                item.map_err(segment_error)
                    .and_then(|(seq, value)| decode_record(seq, value))
            })),
        }
    }

    /// The records from the last back (what the search for the last
    /// checkpoint reads).
    pub fn records_rev(&self) -> RecordIter {
        match self {
            RecordHome::Store(db) => match db.existing_keyspace("audit") {
                Ok(Some(tree)) => Box::new(tree.iter_rev().map(|item| {
                    let (key, value) = item.map_err(|e| AuditError::Unavailable(e.to_string()))?;
                    let seq = <[u8; 8]>::try_from(key.as_slice())
                        .map(u64::from_be_bytes)
                        .unwrap_or(0);
                    decode_record(seq, value)
                })),
                Ok(None) => Box::new(std::iter::empty()),
                Err(e) => Box::new(std::iter::once(Err(AuditError::Unavailable(e.to_string())))),
            },
            RecordHome::Segments(log) => Box::new(log.records_rev().map(|item| {
                item.map_err(segment_error)
                    .and_then(|(seq, value)| decode_record(seq, value))
            })),
        }
    }

    /// The record `seq`, if the log holds it.
    pub fn get(&self, seq: u64) -> Result<Option<Record>, AuditError> {
        let found = match self {
            RecordHome::Store(db) => match db.existing_keyspace("audit") {
                Ok(Some(tree)) => tree
                    .get(seq.to_be_bytes())
                    .map_err(|e| AuditError::Unavailable(e.to_string()))?,
                Ok(None) => None,
                Err(e) => return Err(AuditError::Unavailable(e.to_string())),
            },
            RecordHome::Segments(log) => log.get(seq).map_err(segment_error)?,
        };
        found.map(|value| decode_record(seq, value)).transpose()
    }

    /// The last record.
    pub fn last(&self) -> Option<Record> {
        match self {
            RecordHome::Segments(log) => log
                .last()
                .and_then(|(seq, value)| decode_record(seq, value).ok()),
            RecordHome::Store(_) => self.records_rev().next().and_then(Result::ok),
        }
    }

    /// Whether the log holds a record now (a replica sharing the store may
    /// have written the first since this one checked the chain).
    pub fn holds_records(&self) -> Result<bool, String> {
        match self {
            RecordHome::Store(db) => {
                match db.existing_keyspace("audit").map_err(|e| e.to_string())? {
                    Some(tree) => Ok(tree.first().map_err(|e| e.to_string())?.is_some()),
                    None => Ok(false),
                }
            }
            RecordHome::Segments(log) => Ok(log.last_seq() > 0),
        }
    }
}

/// The stored head's record number: `Some(0)` if none is stored, `None`
/// if what is stored is no head (the check reports it).
fn stored_head_seq(db: &custody_store::Store) -> Result<Option<u64>, String> {
    let Some(space) = db
        .existing_keyspace("audit_head")
        .map_err(|e| e.to_string())?
    else {
        return Ok(Some(0));
    };
    Ok(match space.get(HEAD).map_err(|e| e.to_string())? {
        None => Some(0),
        Some(value) => decode_head(&value).map(|(seq, _)| seq),
    })
}

/// The home custodyd writes to on the embedded backend, in `data_dir`:
/// migrated first if the directory was written before segments
/// ([`migrate_to_segments`]), made if custodyd never ran here, and opened
/// with a torn tail cut, once the stored head shows that no record in it
/// was acknowledged (the head is written only after the records are
/// synced, threat model Q6). A torn tail under a head that names a record
/// in it, or past it, is left for the check to report.
pub fn open_segments_for_writing(
    db: &custody_store::Store,
    data_dir: &Path,
    progress: &mut dyn FnMut(MoveProgress),
) -> Result<RecordHome, String> {
    migrate_to_segments(db, data_dir, progress)?;
    let dir = data_dir.join(SEGMENTS_DIR);
    let head_seq = stored_head_seq(db)?;
    if !dir.is_dir() && head_seq != Some(0) {
        // Records were acknowledged in this directory, yet neither home
        // holds any: no new log over them. The check reports the head past
        // the (empty) log's end and custodyd does not start (F1).
        return Ok(RecordHome::Store(db.clone()));
    }
    let shown = |e: SegmentError| format!("{}: {e}", dir.display());
    if !dir.is_dir() {
        SegmentLog::open(&dir, Tail::Keep).map_err(shown)?;
    }
    // A defect in the last file is left for the check to report (F1).
    let log = SegmentLog::open_for_check(&dir, Tail::Keep).map_err(shown)?;
    let Some(torn) = log.torn_tail() else {
        return Ok(RecordHome::Segments(Arc::new(log)));
    };
    if head_seq.is_none_or(|seq| seq > torn.after_seq) {
        // Not a crash before a sync: the check finds the head past the
        // end, or a head that is none, and nothing is cut.
        return Ok(RecordHome::Segments(Arc::new(log)));
    }
    drop(log);
    note(
        db,
        FileRepair::TailCut {
            after_record: torn.after_seq,
            bytes: torn.bytes,
        },
    )?;
    let log = SegmentLog::open(&dir, Tail::Cut).map_err(shown)?;
    crate::failpoint::hit(TAIL_CUT_POINT);
    tracing::warn!(
        after_record = torn.after_seq,
        bytes = torn.bytes,
        "the audit log ended in a group commit a crash cut before its sync; no record of it was acknowledged, and it was cut off"
    );
    Ok(RecordHome::Segments(Arc::new(log)))
}

/// Moves the records of a data directory written before segments (keyspace
/// `audit` holds them, no `audit/`) into a segment log: copied in order
/// into `audit.migrating/` and synced; the copy's chain checked from record
/// 1 and its last record compared with the store's; renamed to `audit/`,
/// the parent synced; and only then the keyspace cleared (from its first
/// record, so that its last stays until the end). A crash before the
/// rename leaves `audit.migrating/`, which the next start removes and
/// makes again; after it, the next start finds both homes and clears the
/// keyspace once the segment log holds the keyspace's last record
/// unchanged. Anything else holding records in both homes is refused.
/// `progress` hears of the move before it starts and after every batch
/// copied or checked. Returns how many records were copied (`None`:
/// nothing to move).
pub fn migrate_to_segments(
    db: &custody_store::Store,
    data_dir: &Path,
    progress: &mut dyn FnMut(MoveProgress),
) -> Result<Option<u64>, String> {
    let dir = data_dir.join(SEGMENTS_DIR);
    let staging = data_dir.join(MIGRATING_DIR);
    let old = RecordHome::Store(db.clone());
    let Some(last) = old.last() else {
        return Ok(None);
    };
    if dir.is_dir() {
        let segments = RecordHome::of_data_dir(db, data_dir)?;
        let copied = segments.get(last.seq).map_err(|e| e.to_string())?;
        if copied.as_ref() != Some(&last) {
            return Err(format!(
                "both {} and the database's audit tree hold records, and the segment log does not hold the tree's last record (record {}) unchanged: custodyd does not choose between them",
                dir.display(),
                last.seq
            ));
        }
        note(db, FileRepair::Moved { records: last.seq })?;
        clear_keyspace(db)?;
        return Ok(None);
    }
    let started = std::time::Instant::now();
    let mut moved = MoveProgress {
        records: last.seq,
        copied: 0,
        checked: 0,
    };
    progress(moved);
    tracing::info!(
        records = last.seq,
        "moving the audit log out of the database into a segment log of its own; this reads every record once"
    );
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .map_err(|e| format!("removing {}: {e}", staging.display()))?;
    }
    let shown = |e: SegmentError| format!("{}: {e}", staging.display());
    let log = SegmentLog::open(&staging, Tail::Keep).map_err(shown)?;
    let mut batch: Vec<(u64, Vec<u8>)> = Vec::with_capacity(MIGRATION_BATCH);
    let mut copy = |batch: &mut Vec<(u64, Vec<u8>)>| -> Result<(), String> {
        let refs: Vec<(u64, &[u8])> = batch.iter().map(|(s, v)| (*s, v.as_slice())).collect();
        log.append(&refs).map_err(shown)?;
        moved.copied += refs.len() as u64;
        progress(moved);
        batch.clear();
        Ok(())
    };
    for record in old.records(1) {
        let record = record.map_err(|e| {
            format!("reading the audit tree to move it: {e}; run `custodyd --check`")
        })?;
        batch.push((record.seq, [record.hash.as_slice(), &record.entry].concat()));
        if batch.len() == MIGRATION_BATCH {
            copy(&mut batch)?;
        }
    }
    copy(&mut batch)?;
    drop(log);
    let copied = RecordHome::Segments(Arc::new(
        SegmentLog::open_existing(&staging, Tail::Keep).map_err(shown)?,
    ));
    moved.copied = last.seq;
    let checking = copied.records(1).inspect(|record| {
        if let Ok(record) = record
            && record.seq % MIGRATION_BATCH as u64 == 0
        {
            moved.checked = record.seq;
            progress(moved);
        }
    });
    let report = super::verify::verify_records(checking, None);
    if let Some((seq, problem)) = report.first_bad {
        return Err(format!(
            "the copy of the audit log does not verify at record {seq}: {problem}; the database's audit tree is left as it was (run `custodyd --check`)"
        ));
    }
    if report.last_seq != last.seq || report.last_hash != last.hash {
        return Err(format!(
            "the copy of the audit log ends at record {}, the database's at record {}: the tree is left as it was",
            report.last_seq, last.seq
        ));
    }
    crate::failpoint::hit(MIGRATION_POINTS[0]);
    std::fs::rename(&staging, &dir).map_err(|e| format!("renaming {}: {e}", staging.display()))?;
    custody_store::segments::sync_dir(data_dir).map_err(|e| e.to_string())?;
    note(db, FileRepair::Moved { records: last.seq })?;
    crate::failpoint::hit(MIGRATION_POINTS[1]);
    clear_keyspace(db)?;
    crate::failpoint::hit(MIGRATION_POINTS[2]);
    tracing::info!(
        records = last.seq,
        ms = started.elapsed().as_millis() as u64,
        "the audit log now lies in {}",
        dir.display()
    );
    Ok(Some(last.seq))
}

/// Removes every record of keyspace `audit`, the first first, and flushes.
fn clear_keyspace(db: &custody_store::Store) -> Result<(), String> {
    let Some(tree) = db.existing_keyspace("audit").map_err(|e| e.to_string())? else {
        return Ok(());
    };
    loop {
        let keys: Vec<Vec<u8>> = tree
            .iter()
            .keys()
            .take(MIGRATION_BATCH)
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        if keys.is_empty() {
            break;
        }
        let mut batch = custody_store::Batch::default();
        for key in &keys {
            batch.remove(&tree, key);
        }
        tree.apply_batch(batch).map_err(|e| e.to_string())?;
    }
    db.flush().map_err(|e| e.to_string())
}
