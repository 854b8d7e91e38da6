//! The audit log's files in a stopped custodyd's data directory, read and
//! written as someone holding the files (not custodyd) would: the segment
//! log `audit/`, and the layout of a directory written before segments
//! (the records in the database's tree `audit`).

#![allow(
    clippy::unwrap_used,
    reason = "a test fixture fails by panicking on the unexpected"
)]

use std::path::{Path, PathBuf};

use custody_store::segments::{SegmentLog, Tail, frame, segment_file_name};

/// The segment log's directory.
pub fn segments_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(custody_core::audit::SEGMENTS_DIR)
}

/// The segment files, in order.
pub fn segment_files(data_dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(segments_dir(data_dir))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    files
}

/// Every record (its number, then its hash and entry), as stored.
pub fn read(data_dir: &Path) -> Vec<(u64, Vec<u8>)> {
    SegmentLog::open_existing(&segments_dir(data_dir), Tail::Keep)
        .unwrap()
        .records_from(1)
        .map(Result::unwrap)
        .collect()
}

/// The last segment file and where its last record ends: past it, the
/// file custodyd was appending to holds zeros until custodyd closes it.
pub fn last_file_end(data_dir: &Path) -> (PathBuf, u64) {
    let last_file = segment_files(data_dir).pop().unwrap();
    let first: u64 = last_file
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let end = read(data_dir)
        .iter()
        .filter(|(seq, _)| *seq >= first)
        .map(|(seq, payload)| frame(*seq, payload).len() as u64)
        .sum();
    (last_file, end)
}

/// Writes part of a frame (`bytes` of a record numbered after the last)
/// where the last segment file's last record ends: what a crash before a
/// group commit's sync leaves. Returns the last whole record's number.
pub fn tear_tail(data_dir: &Path, bytes: usize) -> u64 {
    let last_seq = read(data_dir).last().map_or(0, |(seq, _)| *seq);
    let torn = frame(last_seq + 1, &[b'x'; 200]);
    assert!(bytes < torn.len(), "a torn tail is less than a frame");
    let (last_file, end) = last_file_end(data_dir);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(last_file)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &torn[..bytes], end).unwrap();
    last_seq
}

/// Writes `records` as the whole log, in one file named by the first
/// record's number, each framed with a CRC that matches: what an attacker
/// who knows the format writes.
pub fn write(data_dir: &Path, records: &[(u64, Vec<u8>)]) {
    let dir = segments_dir(data_dir);
    for file in segment_files(data_dir) {
        std::fs::remove_file(file).unwrap();
    }
    let Some((first, _)) = records.first() else {
        return;
    };
    let bytes: Vec<u8> = records
        .iter()
        .flat_map(|(seq, payload)| frame(*seq, payload))
        .collect();
    std::fs::write(dir.join(segment_file_name(*first)), bytes).unwrap();
}

/// The stopped daemon's database, opened without sled's background
/// flusher: that thread holds the database's file lock for a while after
/// the handle is dropped, so a daemon started right after could find it
/// still locked.
pub fn open_stopped_db(data_dir: &Path) -> sled::Db {
    sled::Config::new()
        .path(data_dir.join("custody.sled"))
        .flush_every_ms(None)
        .open()
        .unwrap()
}

/// Turns the directory into one written before segments: the records
/// moved into the database's tree `audit` (under their big-endian numbers,
/// as custodyd wrote them then), `audit/` removed. Returns how many.
pub fn to_layout_before_segments(data_dir: &Path) -> usize {
    let records = read(data_dir);
    let db = open_stopped_db(data_dir);
    let tree = db.open_tree("audit").unwrap();
    for (seq, value) in &records {
        tree.insert(seq.to_be_bytes(), value.as_slice()).unwrap();
    }
    db.flush().unwrap();
    drop(db);
    std::fs::remove_dir_all(segments_dir(data_dir)).unwrap();
    records.len()
}

/// How many records the database's tree `audit` holds.
pub fn records_in_database(data_dir: &Path) -> usize {
    open_stopped_db(data_dir).open_tree("audit").unwrap().len()
}
