use super::*;

fn payload(seq: u64) -> Vec<u8> {
    format!("record {seq} {}", "x".repeat((seq % 50) as usize)).into_bytes()
}

fn fill(log: &SegmentLog, from: u64, to: u64) {
    let payloads: Vec<(u64, Vec<u8>)> = (from..=to).map(|s| (s, payload(s))).collect();
    let refs: Vec<(u64, &[u8])> = payloads.iter().map(|(s, p)| (*s, p.as_slice())).collect();
    log.append(&refs).unwrap();
}

fn read_all(log: &SegmentLog) -> Vec<u64> {
    log.records_from(1).map(|r| r.unwrap().0).collect()
}

#[test]
fn records_come_back_in_order_from_any_number_and_backwards() {
    let dir = tempfile::tempdir().unwrap();
    let log = SegmentLog::open(&dir.path().join("audit"), Tail::Cut).unwrap();
    assert_eq!(log.last_seq(), 0);
    assert!(log.last().is_none());
    fill(&log, 1, 10);
    fill(&log, 11, 25);
    assert_eq!(read_all(&log), (1..=25).collect::<Vec<_>>());
    let from: Vec<_> = log.records_from(7).map(|r| r.unwrap()).collect();
    assert_eq!(from.first().unwrap(), &(7, payload(7)));
    assert_eq!(from.len(), 19);
    let back: Vec<u64> = log.records_rev().map(|r| r.unwrap().0).collect();
    assert_eq!(back, (1..=25).rev().collect::<Vec<_>>());
    assert_eq!(log.get(13).unwrap(), Some(payload(13)));
    assert_eq!(log.get(26).unwrap(), None);
    let reopened = SegmentLog::open(&dir.path().join("audit"), Tail::Keep).unwrap();
    assert_eq!(reopened.last(), Some((25, payload(25))));
    assert!(reopened.torn_tail().is_none());
}

#[test]
fn the_directory_and_its_files_are_the_owners_alone() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("audit");
    let log = SegmentLog::open(&log_dir, Tail::Cut).unwrap();
    fill(&log, 1, 2);
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&log_dir), 0o700);
    assert_eq!(mode(&only_file(&log_dir)), 0o600);
}

#[test]
fn an_append_that_does_not_follow_the_last_record_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = SegmentLog::open(dir.path(), Tail::Cut).unwrap();
    fill(&log, 1, 3);
    let p = payload(5);
    assert!(matches!(
        log.append(&[(5, p.as_slice())]),
        Err(SegmentError::OutOfOrder(_))
    ));
    assert!(matches!(
        log.append(&[(3, p.as_slice())]),
        Err(SegmentError::OutOfOrder(_))
    ));
    assert_eq!(log.last_seq(), 3);
}

/// Many files: appends roll over at the size bound, reads cross files,
/// and opening reads the last file only (its state matches).
#[test]
fn the_log_rolls_into_new_files_and_reads_across_them() {
    let dir = tempfile::tempdir().unwrap();
    let log = SegmentLog::open(dir.path(), Tail::Cut).unwrap();
    let big = vec![7u8; 600 << 10];
    for seq in 1..=20u64 {
        log.append(&[(seq, big.as_slice())]).unwrap();
    }
    let files = list(dir.path()).unwrap();
    assert!(files.len() >= 3, "{files:?}");
    assert_eq!(files[0], 1);
    // Every file but the last ends at its last record: no zeros.
    for pair in files.windows(2) {
        let records = pair[1] - pair[0];
        let len = std::fs::metadata(dir.path().join(file_name(pair[0])))
            .unwrap()
            .len();
        assert_eq!(len, records * (HEADER + big.len()) as u64, "{}", pair[0]);
    }
    assert_eq!(read_all(&log), (1..=20).collect::<Vec<_>>());
    assert_eq!(log.records_from(15).next().unwrap().unwrap().0, 15);
    let reopened = SegmentLog::open(dir.path(), Tail::Keep).unwrap();
    assert_eq!(reopened.last_seq(), 20);
    reopened.append(&[(21, b"after".as_slice())]).unwrap();
    assert_eq!(reopened.get(21).unwrap(), Some(b"after".to_vec()));
    // The first log, closed after another appended to its file, cuts
    // nothing of what the other wrote.
    drop(log);
    assert_eq!(reopened.get(21).unwrap(), Some(b"after".to_vec()));
    drop(reopened);
    let again = SegmentLog::open(dir.path(), Tail::Keep).unwrap();
    assert_eq!(again.last(), Some((21, b"after".to_vec())));
}

fn only_file(dir: &Path) -> PathBuf {
    let files = list(dir).unwrap();
    dir.join(file_name(*files.last().unwrap()))
}

/// The frames of records 1 to `last` as `fill` writes them: where the
/// last record ends in a one-file log.
fn frames_len(last: u64) -> u64 {
    (1..=last).map(|s| (HEADER + payload(s).len()) as u64).sum()
}

/// Half a group commit, `cut_at` bytes of a frame for record 6, written
/// where record 5 ends: what a crash before the sync leaves. Returns
/// how many of them run to the last that is not zero.
fn tear(path: &Path, at: u64, cut_at: usize) -> u64 {
    let mut frame = Vec::new();
    frame.extend_from_slice(&100u32.to_le_bytes());
    frame.extend_from_slice(&0u32.to_le_bytes());
    frame.extend_from_slice(&6u64.to_le_bytes());
    frame.extend_from_slice(&[1u8; 100]);
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&frame[..cut_at], at).unwrap();
    frame[..cut_at]
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |i| i as u64 + 1)
}

/// A log left as a crash leaves it: the file appended to still holds
/// the zeros written ahead of its records.
fn crashed_with_five_records(dir: &Path) -> PathBuf {
    let log = SegmentLog::open(dir, Tail::Cut).unwrap();
    fill(&log, 1, 5);
    std::mem::forget(log);
    let path = only_file(dir);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        frames_len(5) + ZEROED_AHEAD
    );
    path
}

/// While a log is appended to, its file holds zeros past the last
/// record; closed, the file ends at it; left by a crash with the zeros,
/// it opens as it was and takes appends after its last record.
#[test]
fn the_zeros_past_the_last_record_are_read_as_the_end_and_cut_at_close() {
    let dir = tempfile::tempdir().unwrap();
    let log = SegmentLog::open(dir.path(), Tail::Cut).unwrap();
    fill(&log, 1, 5);
    let path = only_file(dir.path());
    let len = || std::fs::metadata(&path).unwrap().len();
    assert_eq!(len(), frames_len(5) + ZEROED_AHEAD, "written ahead");
    fill(&log, 6, 8);
    assert_eq!(len(), frames_len(5) + ZEROED_AHEAD, "not grown");
    drop(log);
    assert_eq!(len(), frames_len(8), "cut at close");

    let dir = tempfile::tempdir().unwrap();
    let path = crashed_with_five_records(dir.path());
    let log = SegmentLog::open(dir.path(), Tail::Cut).unwrap();
    assert_eq!(log.torn_tail(), None, "zeros are no torn tail");
    assert_eq!(log.last(), Some((5, payload(5))));
    fill(&log, 6, 6);
    assert_eq!(read_all(&log), vec![1, 2, 3, 4, 5, 6]);
    drop(log);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), frames_len(6));
}

#[test]
fn a_torn_tail_is_read_past_kept_or_cut_as_asked() {
    // A crash with the zeros still there, and one after a closed log
    // ended its file at its last record.
    for zeros_after in [true, false] {
        for cut_at in [3usize, 10, 20, 116] {
            let dir = tempfile::tempdir().unwrap();
            let path = if zeros_after {
                crashed_with_five_records(dir.path())
            } else {
                let log = SegmentLog::open(dir.path(), Tail::Cut).unwrap();
                fill(&log, 1, 5);
                drop(log);
                only_file(dir.path())
            };
            let whole = frames_len(5);
            let len = std::fs::metadata(&path)
                .unwrap()
                .len()
                .max(whole + cut_at as u64);
            let left = tear(&path, whole, cut_at);
            let kept = SegmentLog::open(dir.path(), Tail::Keep).unwrap();
            assert_eq!(kept.last_seq(), 5);
            assert_eq!(
                kept.torn_tail(),
                Some(TornTail {
                    at: whole,
                    bytes: left,
                    after_seq: 5
                }),
                "zeros after: {zeros_after}, cut at {cut_at}"
            );
            assert_eq!(read_all(&kept), vec![1, 2, 3, 4, 5]);
            assert!(
                matches!(
                    kept.append(&[(6, b"six".as_slice())]),
                    Err(SegmentError::OutOfOrder(_))
                ),
                "no append over a kept torn tail"
            );
            drop(kept);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), len, "kept");
            let cut = SegmentLog::open(dir.path(), Tail::Cut).unwrap();
            assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
            fill(&cut, 6, 6);
            assert_eq!(read_all(&cut), vec![1, 2, 3, 4, 5, 6]);
        }
    }
}

/// Only zeros may follow the last record or a torn frame: anything
/// written past them is a defect, not an end, and nothing is cut.
#[test]
fn data_past_the_zeros_or_past_a_torn_frame_is_a_defect() {
    let dir = tempfile::tempdir().unwrap();
    let path = crashed_with_five_records(dir.path());
    let whole = frames_len(5);
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&frame(6, b"six"), whole + 4096).unwrap();
    drop(file);
    let bytes = std::fs::read(&path).unwrap();
    for tail in [Tail::Keep, Tail::Cut] {
        assert!(matches!(
            SegmentLog::open(dir.path(), tail),
            Err(SegmentError::Corrupt { .. })
        ));
    }
    tear(&path, whole, 20);
    let bytes_torn = std::fs::read(&path).unwrap();
    assert_ne!(bytes, bytes_torn);
    assert!(matches!(
        SegmentLog::open(dir.path(), Tail::Cut),
        Err(SegmentError::Corrupt { .. })
    ));
    assert_eq!(std::fs::read(&path).unwrap(), bytes_torn, "nothing was cut");
}

/// A reader reads the file being appended to up to its synced records,
/// as they are when it reaches the file: not a group commit still being
/// written past them (here a whole frame in the zeros, which a reader
/// without that bound would take for record 6).
#[test]
fn a_reader_reads_the_file_being_appended_to_up_to_its_synced_records() {
    let dir = tempfile::tempdir().unwrap();
    let log = SegmentLog::open(dir.path(), Tail::Cut).unwrap();
    fill(&log, 1, 5);
    let forwards = log.records_from(1);
    let back = log.records_rev();
    fill(&log, 6, 7);
    assert_eq!(
        forwards.map(|r| r.unwrap().0).collect::<Vec<_>>(),
        (1..=7).collect::<Vec<_>>()
    );
    assert_eq!(
        back.map(|r| r.unwrap().0).collect::<Vec<_>>(),
        (1..=7).rev().collect::<Vec<_>>()
    );
    let file = OpenOptions::new()
        .write(true)
        .open(only_file(dir.path()))
        .unwrap();
    file.write_all_at(&frame(8, &payload(8)), frames_len(7))
        .unwrap();
    assert_eq!(read_all(&log), (1..=7).collect::<Vec<_>>());
    assert_eq!(log.records_rev().count(), 7);
    assert_eq!(log.get(8).unwrap(), None);
}

/// Bytes someone wrote past the last record while the log is open are
/// not cut with the zeros: closing leaves them, the next open refuses, and
/// a roll-over meets them and stops appending.
#[test]
fn bytes_past_the_last_record_are_never_cut_with_the_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let log = SegmentLog::open(dir.path(), Tail::Cut).unwrap();
    fill(&log, 1, 5);
    let path = only_file(dir.path());
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(b"someone", frames_len(5) + 4096).unwrap();
    drop(log);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        frames_len(5) + ZEROED_AHEAD
    );
    assert!(matches!(
        SegmentLog::open(dir.path(), Tail::Cut),
        Err(SegmentError::Corrupt { .. })
    ));

    let dir = tempfile::tempdir().unwrap();
    let log = SegmentLog::open(dir.path(), Tail::Cut).unwrap();
    let big = vec![7u8; 1 << 20];
    for seq in 1..=4u64 {
        log.append(&[(seq, big.as_slice())]).unwrap();
    }
    // The next append rolls over: the file is past its bound.
    let (_, len) = log.state().current.unwrap();
    assert!(len >= SEGMENT_BYTES);
    let file = OpenOptions::new()
        .write(true)
        .open(only_file(dir.path()))
        .unwrap();
    file.write_all_at(b"someone", len + 10).unwrap();
    assert!(matches!(
        log.append(&[(5, big.as_slice())]),
        Err(SegmentError::Corrupt { .. })
    ));
    assert!(
        log.append(&[(5, big.as_slice())]).is_err(),
        "read-only after"
    );
    assert_eq!(list(dir.path()).unwrap(), vec![1], "no file begun");
}

/// A file someone made past the file being appended to is read, and
/// reported, while the log is open.
#[test]
fn a_stray_file_past_the_one_appended_to_is_reported_while_the_log_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let log = SegmentLog::open(dir.path(), Tail::Cut).unwrap();
    fill(&log, 1, 5);
    std::fs::write(dir.path().join(file_name(100)), frame(100, b"x")).unwrap();
    assert!(log.records_from(1).any(|r| r.is_err()));
}

/// A flipped byte anywhere but in the last frame is a defect, never a
/// torn tail: opening refuses when it is in the last file, and reading
/// refuses when it is in an earlier one.
#[test]
fn a_damaged_frame_before_the_tail_is_a_defect() {
    let dir = tempfile::tempdir().unwrap();
    let log = SegmentLog::open(dir.path(), Tail::Cut).unwrap();
    fill(&log, 1, 5);
    let path = only_file(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[HEADER + 3] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    for tail in [Tail::Keep, Tail::Cut] {
        assert!(matches!(
            SegmentLog::open(dir.path(), tail),
            Err(SegmentError::Corrupt { .. })
        ));
    }
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing was cut");
    assert!(log.records_from(1).any(|r| r.is_err()));
}

/// A log of 15 records of 1 MiB: at least three files.
fn many_files() -> (tempfile::TempDir, SegmentLog, Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let log = SegmentLog::open(dir.path(), Tail::Cut).unwrap();
    let big = vec![7u8; 1 << 20];
    for seq in 1..=15u64 {
        log.append(&[(seq, big.as_slice())]).unwrap();
    }
    let files = list(dir.path()).unwrap();
    assert!(files.len() >= 3);
    (dir, log, files)
}

/// Reading back from the tail, an earlier file that ends mid-frame or
/// in zeros is a defect, not a torn tail: only the log's last file may
/// end so.
#[test]
fn only_the_last_file_may_end_torn_or_in_zeros_read_forwards_or_back() {
    for zeros in [false, true] {
        let (dir, log, files) = many_files();
        let middle = dir.path().join(file_name(files[1]));
        let len = std::fs::metadata(&middle).unwrap().len();
        let file = OpenOptions::new().write(true).open(&middle).unwrap();
        if zeros {
            file.set_len(len + 4096).unwrap();
        } else {
            file.set_len(len - 100).unwrap();
        }
        drop(file);
        assert!(
            log.records_from(1).any(|r| r.is_err()),
            "forwards, zeros: {zeros}"
        );
        assert!(
            log.records_rev().any(|r| r.is_err()),
            "back, zeros: {zeros}"
        );
    }
}

#[test]
fn a_missing_or_stray_file_is_a_defect() {
    let (dir, log, files) = many_files();
    std::fs::remove_file(dir.path().join(file_name(files[1]))).unwrap();
    assert!(
        log.records_from(1).any(|r| r.is_err()),
        "a gap between files"
    );
    std::fs::remove_file(dir.path().join(file_name(files[0]))).unwrap();
    assert!(log.records_from(1).any(|r| r.is_err()), "record 1 missing");
    std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
    assert!(matches!(
        SegmentLog::open(dir.path(), Tail::Keep),
        Err(SegmentError::Corrupt { .. })
    ));
}

#[test]
fn a_missing_directory_reads_as_an_empty_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = SegmentLog::open_existing(&dir.path().join("none"), Tail::Keep).unwrap();
    assert_eq!(log.last_seq(), 0);
    assert_eq!(log.records_from(1).count(), 0);
    assert!(!dir.path().join("none").exists());
}

/// A file that begins at the record after the last, past the file being
/// appended to, is one a roll-over is beginning (its first commit may be
/// half written): a reader reads none of it while the log is open.
#[test]
fn a_file_being_begun_is_not_read_while_the_log_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let log = SegmentLog::open(dir.path(), Tail::Cut).unwrap();
    fill(&log, 1, 5);
    // Record 7's frame in zeros, where record 6's has not landed yet.
    let mut begun = vec![0u8; 4096];
    begun.extend_from_slice(&frame(7, &payload(7)));
    std::fs::write(dir.path().join(file_name(6)), &begun).unwrap();
    assert_eq!(read_all(&log), vec![1, 2, 3, 4, 5]);
    assert_eq!(log.records_rev().count(), 5);
}
