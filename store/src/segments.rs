//! An append-only log of numbered records in files of its own: the home of
//! the embedded backend's audit records, so that opening custodyd does not
//! grow with the log (sled reads its whole page table at open; this reads
//! one file).
//!
//! A directory of files `{first_seq:020}.seg`, each at most about
//! [`SEGMENT_BYTES`] (a group commit is never split). Each record is a
//! frame: payload length (u32 LE), CRC-32C over the sequence number and the
//! payload (u32 LE), sequence number (u64 LE), payload. Numbers run from 1
//! with no gap, across files. [`SegmentLog::append`] writes a group of
//! frames and `fdatasync`s the file (and the directory when it starts a
//! file) before it returns: a record returned is durable.
//!
//! What the frames mean is the caller's (custody-core's audit log); this
//! owns their layout, their numbering and their durability. A defect is
//! reported, never repaired, with one exception the caller asks for: a
//! *torn tail* (the last frame of the last file running past its end, or
//! failing its CRC with nothing after it) is what a crash before the sync
//! leaves, and [`SegmentLog::open`] cuts it when told to.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Where a file ends and the next begins (a file may run past it by one
/// group commit).
pub const SEGMENT_BYTES: u64 = 4 << 20;

/// The largest payload a frame may hold: anything longer is a defect.
pub const MAX_PAYLOAD: usize = 1 << 20;

const HEADER: usize = 16;
const SUFFIX: &str = ".seg";

/// Why a segment log could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    /// The file system failed (open, read, write, sync, rename).
    #[error("segment log I/O: {0}")]
    Io(String),
    /// A file holds what this log does not write: a bad frame, a gap or a
    /// repeat in the numbering, a missing file, a name it does not make.
    #[error("segment log {file}: {problem}")]
    Corrupt {
        /// The file's name, or the directory's for a defect between files.
        file: String,
        /// What was expected and what was found.
        problem: String,
    },
    /// The caller appended records that do not follow the log's last.
    #[error("segment log: {0}")]
    OutOfOrder(String),
}

type Result<T> = std::result::Result<T, SegmentError>;

fn io(what: impl std::fmt::Display, e: std::io::Error) -> SegmentError {
    SegmentError::Io(format!("{what}: {e}"))
}

/// A torn tail found at open: where the last whole frame ends and how many
/// bytes follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TornTail {
    /// Offset in the last file where the last whole frame ends.
    pub at: u64,
    /// Bytes after it.
    pub bytes: u64,
    /// The last whole record's number (0 if the log holds none).
    pub after_seq: u64,
}

/// What to do with a torn tail at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// Leave it and read as if it were not there (a reader, an offline
    /// check).
    Keep,
    /// Cut it off the file (the one writer, once the caller knows no
    /// acknowledged record lies in it).
    Cut,
}

/// An open segment log. Appends are serialised inside; readers open the
/// files themselves and see every frame synced before they started.
#[derive(Debug)]
pub struct SegmentLog {
    dir: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    last_seq: u64,
    /// The last record's payload (what a caller links the next to).
    last_payload: Option<Vec<u8>>,
    /// The file appends go to, its first number and its length.
    current: Option<(u64, u64)>,
    torn: Option<TornTail>,
    /// Why the last file did not read at open: the log is only read (and
    /// its readers meet the defect), never appended to.
    unread: Option<SegmentError>,
}

/// One frame as read.
struct Frame {
    seq: u64,
    payload: Vec<u8>,
}

fn file_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SUFFIX}")
}

/// The files of `dir`, by their first number, in order; a name this log
/// does not make is a defect.
fn list(dir: &Path) -> Result<Vec<u64>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir.display(), e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io(dir.display(), e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let first = name
            .strip_suffix(SUFFIX)
            .filter(|stem| stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|stem| stem.parse::<u64>().ok())
            .filter(|&first| first >= 1);
        match first {
            Some(first) => files.push(first),
            None => {
                return Err(SegmentError::Corrupt {
                    file: name.into_owned(),
                    problem: format!(
                        "expected only files named {{first record:020}}{SUFFIX} in the log's directory"
                    ),
                });
            }
        }
    }
    files.sort_unstable();
    Ok(files)
}

/// Reads frames from a file in order. `last` says whether the file is the
/// log's last, where a torn final frame ends the file instead of being a
/// defect.
struct FrameReader {
    name: String,
    reader: BufReader<File>,
    offset: u64,
    len: u64,
    last: bool,
    /// Set once a torn final frame was met.
    torn: bool,
}

impl FrameReader {
    fn open(dir: &Path, first: u64, last: bool) -> Result<FrameReader> {
        let name = file_name(first);
        let file = File::open(dir.join(&name)).map_err(|e| io(&name, e))?;
        let len = file.metadata().map_err(|e| io(&name, e))?.len();
        Ok(FrameReader {
            name,
            reader: BufReader::with_capacity(256 << 10, file),
            offset: 0,
            len,
            last,
            torn: false,
        })
    }

    fn corrupt(&self, problem: String) -> SegmentError {
        SegmentError::Corrupt {
            file: self.name.clone(),
            problem: format!("at byte {}: {problem}", self.offset),
        }
    }

    /// The next whole frame; `None` at the end (or at a torn final frame of
    /// the last file, noted in `torn`).
    fn next_frame(&mut self) -> Result<Option<Frame>> {
        let rest = self.len - self.offset;
        if rest == 0 {
            return Ok(None);
        }
        if rest < HEADER as u64 {
            return self.torn_or("a frame header cut short".into());
        }
        let mut header = [0u8; HEADER];
        self.reader
            .read_exact(&mut header)
            .map_err(|e| io(&self.name, e))?;
        let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let seq_bytes: [u8; 8] = header[8..16].try_into().unwrap_or_default();
        if length > MAX_PAYLOAD {
            return Err(self.corrupt(format!(
                "expected a payload of at most {MAX_PAYLOAD} bytes, found a length of {length}"
            )));
        }
        if rest < (HEADER + length) as u64 {
            return self.torn_or(format!(
                "a frame of {length} bytes runs past the file's end"
            ));
        }
        let mut payload = vec![0u8; length];
        self.reader
            .read_exact(&mut payload)
            .map_err(|e| io(&self.name, e))?;
        let computed = crc32c::crc32c_append(crc32c::crc32c(&seq_bytes), &payload);
        if computed != crc {
            let after = rest - (HEADER + length) as u64;
            if after == 0 {
                return self.torn_or("the last frame fails its CRC-32C".into());
            }
            return Err(self.corrupt("expected the frame's CRC-32C to match its content".into()));
        }
        self.offset += (HEADER + length) as u64;
        Ok(Some(Frame {
            seq: u64::from_le_bytes(seq_bytes),
            payload,
        }))
    }

    fn torn_or(&mut self, problem: String) -> Result<Option<Frame>> {
        if self.last {
            self.torn = true;
            Ok(None)
        } else {
            Err(self.corrupt(format!("{problem}, in a file that is not the last")))
        }
    }
}

/// Every whole frame of one file, numbered from `first` with no gap, and
/// the reader where it stopped (its `torn` says whether at a torn tail,
/// which only the log's `last` file may have).
fn read_whole(dir: &Path, first: u64, last: bool) -> Result<(Vec<Frame>, FrameReader)> {
    let mut reader = FrameReader::open(dir, first, last)?;
    let mut frames: Vec<Frame> = Vec::new();
    while let Some(frame) = reader.next_frame()? {
        let expected = first + frames.len() as u64;
        if frame.seq != expected {
            return Err(reader.corrupt(format!(
                "expected record {expected}, found record {}",
                frame.seq
            )));
        }
        frames.push(frame);
    }
    Ok((frames, reader))
}

impl SegmentLog {
    /// Opens the log in `dir` (made if missing, with its parent synced) by
    /// reading its last file only. A torn tail is kept or cut as `tail`
    /// says ([`SegmentLog::torn_tail`] tells which was found); any other
    /// defect in the last file is an error.
    pub fn open(dir: &Path, tail: Tail) -> Result<SegmentLog> {
        if !dir.is_dir() {
            // The log is custodyd's alone, whatever the umask (as its
            // data directory is).
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| io(dir.display(), e))?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        Self::open_existing(dir, tail)
    }

    /// Opens the log in `dir` without making anything: a missing directory
    /// reads as an empty log (the offline check).
    pub fn open_existing(dir: &Path, tail: Tail) -> Result<SegmentLog> {
        let files = list(dir)?;
        let mut state = State {
            last_seq: 0,
            last_payload: None,
            current: None,
            torn: None,
            unread: None,
        };
        if let Some(&first) = files.last() {
            let (frames, reader) = read_whole(dir, first, true)?;
            state.last_seq = first - 1 + frames.len() as u64;
            state.last_payload = frames.into_iter().last().map(|frame| frame.payload);
            if reader.torn {
                let torn = TornTail {
                    at: reader.offset,
                    bytes: reader.len - reader.offset,
                    after_seq: state.last_seq,
                };
                state.torn = Some(torn);
                if tail == Tail::Cut {
                    let path = dir.join(&reader.name);
                    let file = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(|e| io(&reader.name, e))?;
                    file.set_len(torn.at).map_err(|e| io(&reader.name, e))?;
                    file.sync_all().map_err(|e| io(&reader.name, e))?;
                }
            }
            state.current = Some((first, reader.offset));
            if state.last_seq == first - 1 {
                // An empty last file: the record before it is in the one
                // before, which holds no more than this bound.
                if let Some(&before) = files.iter().rev().nth(1) {
                    let (frames, _) = read_whole(dir, before, false)?;
                    state.last_payload = frames.into_iter().last().map(|frame| frame.payload);
                }
            }
        }
        Ok(SegmentLog {
            dir: dir.to_path_buf(),
            state: Mutex::new(state),
        })
    }

    /// [`SegmentLog::open_existing`], or, if the last file holds a defect,
    /// a log that only reads (the defect is then met, and reported, by
    /// whoever reads through it: the integrity check) and refuses appends.
    /// I/O errors are still errors.
    pub fn open_for_check(dir: &Path, tail: Tail) -> Result<SegmentLog> {
        match Self::open_existing(dir, tail) {
            Err(error @ SegmentError::Corrupt { .. }) => Ok(SegmentLog {
                dir: dir.to_path_buf(),
                state: Mutex::new(State {
                    last_seq: 0,
                    last_payload: None,
                    current: None,
                    torn: None,
                    unread: Some(error),
                }),
            }),
            other => other,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The torn tail found at open (cut or kept), if any.
    pub fn torn_tail(&self) -> Option<TornTail> {
        self.state().torn
    }

    /// The last record's number (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.state().last_seq
    }

    /// The last record: its number and payload.
    pub fn last(&self) -> Option<(u64, Vec<u8>)> {
        let state = self.state();
        state
            .last_payload
            .clone()
            .map(|payload| (state.last_seq, payload))
    }

    /// Appends `records` (numbers following the log's last, in order) and
    /// syncs them before returning. A failure leaves the log's tail unknown
    /// to this process: the caller stops appending (as after a failed
    /// flush) and the next open finds a whole log or a torn tail.
    pub fn append(&self, records: &[(u64, &[u8])]) -> Result<()> {
        let mut state = self.state();
        if let Some(error) = &state.unread {
            return Err(error.clone());
        }
        let mut expected = state.last_seq + 1;
        let mut buffer = Vec::new();
        for &(seq, payload) in records {
            if seq != expected {
                return Err(SegmentError::OutOfOrder(format!(
                    "expected record {expected} next, was given record {seq}"
                )));
            }
            if payload.len() > MAX_PAYLOAD {
                return Err(SegmentError::OutOfOrder(format!(
                    "record {seq} is {} bytes, over the {MAX_PAYLOAD} a frame holds",
                    payload.len()
                )));
            }
            buffer.extend_from_slice(&frame(seq, payload));
            expected += 1;
        }
        let Some(&(first_seq, _)) = records.first() else {
            return Ok(());
        };
        let (file_first, len) = match state.current {
            Some((first, len)) if len < SEGMENT_BYTES => (first, len),
            _ => (first_seq, 0),
        };
        let name = file_name(file_first);
        let starts_file = len == 0 && state.current.map(|(first, _)| first) != Some(file_first);
        let mut file = OpenOptions::new()
            .create(true)
            .mode(0o600)
            .append(true)
            .open(self.dir.join(&name))
            .map_err(|e| io(&name, e))?;
        file.write_all(&buffer).map_err(|e| io(&name, e))?;
        file.sync_data().map_err(|e| io(&name, e))?;
        if starts_file {
            sync_dir(&self.dir)?;
        }
        state.current = Some((file_first, len + buffer.len() as u64));
        state.last_seq = expected - 1;
        state.last_payload = records.last().map(|(_, payload)| payload.to_vec());
        Ok(())
    }

    /// The records from `start` on, in order, read from the files as they
    /// are when each is reached: a reader never sees a frame half written
    /// (a torn final frame of the last file ends the log), and a defect, a
    /// gap or a repeat is an error, after which the iterator ends.
    pub fn records_from(&self, start: u64) -> Records {
        Records::new(self.dir.clone(), start.max(1))
    }

    /// The records from the last back to the first, a file at a time (each
    /// read whole, so at most about [`SEGMENT_BYTES`] held at once).
    pub fn records_rev(&self) -> RecordsRev {
        RecordsRev {
            dir: self.dir.clone(),
            files: list(&self.dir),
            held: Vec::new(),
            started: false,
            done: false,
        }
    }

    /// The record `seq`, if the log holds it.
    pub fn get(&self, seq: u64) -> Result<Option<Vec<u8>>> {
        match self.records_from(seq).next() {
            Some(Ok((found, payload))) if found == seq => Ok(Some(payload)),
            Some(Err(e)) => Err(e),
            _ => Ok(None),
        }
    }
}

/// Record `seq` framed as this log stores it. Public for tests that write
/// a file as someone else would; the log itself writes only through
/// [`SegmentLog::append`].
pub fn frame(seq: u64, payload: &[u8]) -> Vec<u8> {
    let seq_bytes = seq.to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&seq_bytes), payload);
    let length = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut frame = Vec::with_capacity(HEADER + payload.len());
    frame.extend_from_slice(&length.to_le_bytes());
    frame.extend_from_slice(&crc.to_le_bytes());
    frame.extend_from_slice(&seq_bytes);
    frame.extend_from_slice(payload);
    frame
}

/// The name of the file whose first record is `first_seq`.
pub fn segment_file_name(first_seq: u64) -> String {
    file_name(first_seq)
}

/// Syncs a directory, so that a file made or renamed in it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir.display(), e))
}

/// The records of a log from a number on: see [`SegmentLog::records_from`].
pub struct Records {
    dir: PathBuf,
    /// The files still to read, first numbers in order, or the listing's
    /// error.
    files: std::vec::IntoIter<u64>,
    last_file: Option<u64>,
    reader: Option<FrameReader>,
    start: u64,
    /// The number the next frame must carry (`None` before the first file).
    expected: Option<u64>,
    done: bool,
    pending_error: Option<SegmentError>,
}

impl Records {
    fn new(dir: PathBuf, start: u64) -> Records {
        let (mut files, pending_error) = match list(&dir) {
            Ok(files) => (files, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        let last_file = files.last().copied();
        // The file holding `start`: the last whose first number is at most it.
        let skip = files.iter().rposition(|&first| first <= start).unwrap_or(0);
        Records {
            dir,
            files: files.split_off(skip).into_iter(),
            last_file,
            reader: None,
            start,
            expected: None,
            done: false,
            pending_error,
        }
    }

    fn step(&mut self) -> Result<Option<(u64, Vec<u8>)>> {
        loop {
            if self.reader.is_none() {
                let Some(first) = self.files.next() else {
                    return Ok(None);
                };
                if let Some(expected) = self.expected {
                    if first != expected {
                        return Err(SegmentError::Corrupt {
                            file: file_name(first),
                            problem: format!(
                                "expected the next file to begin at record {expected}: a file is missing or out of place"
                            ),
                        });
                    }
                } else if self.start == 1 && first != 1 {
                    return Err(SegmentError::Corrupt {
                        file: file_name(first),
                        problem: "expected the first file to begin at record 1".into(),
                    });
                }
                self.expected = Some(first);
                self.reader = Some(FrameReader::open(
                    &self.dir,
                    first,
                    Some(first) == self.last_file,
                )?);
            }
            let Some(reader) = self.reader.as_mut() else {
                continue;
            };
            match reader.next_frame()? {
                Some(frame) => {
                    let expected = self.expected.unwrap_or(frame.seq);
                    if frame.seq != expected {
                        return Err(reader.corrupt(format!(
                            "expected record {expected}, found record {}",
                            frame.seq
                        )));
                    }
                    self.expected = Some(expected + 1);
                    if frame.seq >= self.start {
                        return Ok(Some((frame.seq, frame.payload)));
                    }
                }
                None => self.reader = None,
            }
        }
    }
}

impl Iterator for Records {
    type Item = Result<(u64, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if let Some(error) = self.pending_error.take() {
            self.done = true;
            return Some(Err(error));
        }
        match self.step() {
            Ok(Some(record)) => Some(Ok(record)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(error) => {
                self.done = true;
                Some(Err(error))
            }
        }
    }
}

/// The records of a log from the last back: see [`SegmentLog::records_rev`].
pub struct RecordsRev {
    dir: PathBuf,
    files: Result<Vec<u64>>,
    held: Vec<(u64, Vec<u8>)>,
    /// Whether a file was read yet (the first is the log's last).
    started: bool,
    done: bool,
}

impl Iterator for RecordsRev {
    type Item = Result<(u64, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(record) = self.held.pop() {
                return Some(Ok(record));
            }
            if self.done {
                return None;
            }
            let files = match &mut self.files {
                Ok(files) => files,
                Err(error) => {
                    self.done = true;
                    return Some(Err(error.clone()));
                }
            };
            let Some(first) = files.pop() else {
                self.done = true;
                return None;
            };
            // Only the log's last file may end torn; it is the first read.
            let last = !self.started;
            self.started = true;
            match read_whole(&self.dir, first, last) {
                Ok((frames, _)) => {
                    self.held = frames
                        .into_iter()
                        .map(|frame| (frame.seq, frame.payload))
                        .collect();
                }
                Err(error) => {
                    self.done = true;
                    return Some(Err(error));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
        assert_eq!(read_all(&log), (1..=20).collect::<Vec<_>>());
        assert_eq!(log.records_from(15).next().unwrap().unwrap().0, 15);
        let reopened = SegmentLog::open(dir.path(), Tail::Keep).unwrap();
        assert_eq!(reopened.last_seq(), 20);
        reopened.append(&[(21, b"after".as_slice())]).unwrap();
        assert_eq!(reopened.get(21).unwrap(), Some(b"after".to_vec()));
    }

    fn only_file(dir: &Path) -> PathBuf {
        let files = list(dir).unwrap();
        dir.join(file_name(*files.last().unwrap()))
    }

    #[test]
    fn a_torn_tail_is_read_past_kept_or_cut_as_asked() {
        for cut_at in [3usize, 10, 20] {
            let dir = tempfile::tempdir().unwrap();
            let log = SegmentLog::open(dir.path(), Tail::Cut).unwrap();
            fill(&log, 1, 5);
            let path = only_file(dir.path());
            let whole = std::fs::metadata(&path).unwrap().len();
            // Half a group commit: a frame cut `cut_at` bytes in.
            let mut file = OpenOptions::new().append(true).open(&path).unwrap();
            let mut frame = Vec::new();
            frame.extend_from_slice(&100u32.to_le_bytes());
            frame.extend_from_slice(&0u32.to_le_bytes());
            frame.extend_from_slice(&6u64.to_le_bytes());
            frame.extend_from_slice(&[1u8; 100]);
            file.write_all(&frame[..cut_at]).unwrap();
            drop(file);
            let kept = SegmentLog::open(dir.path(), Tail::Keep).unwrap();
            assert_eq!(kept.last_seq(), 5);
            assert_eq!(
                kept.torn_tail(),
                Some(TornTail {
                    at: whole,
                    bytes: cut_at as u64,
                    after_seq: 5
                })
            );
            assert_eq!(read_all(&kept), vec![1, 2, 3, 4, 5]);
            assert_eq!(
                std::fs::metadata(&path).unwrap().len(),
                whole + cut_at as u64
            );
            let cut = SegmentLog::open(dir.path(), Tail::Cut).unwrap();
            assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
            fill(&cut, 6, 6);
            assert_eq!(read_all(&cut), vec![1, 2, 3, 4, 5, 6]);
        }
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

    /// Reading back from the tail, an earlier file that ends mid-frame is a
    /// defect, not a torn tail: only the log's last file may end so.
    #[test]
    fn only_the_last_file_may_end_torn_read_forwards_or_back() {
        let (dir, log, files) = many_files();
        let middle = dir.path().join(file_name(files[1]));
        let len = std::fs::metadata(&middle).unwrap().len();
        let file = OpenOptions::new().write(true).open(&middle).unwrap();
        file.set_len(len - 100).unwrap();
        drop(file);
        assert!(log.records_from(1).any(|r| r.is_err()), "forwards");
        assert!(log.records_rev().any(|r| r.is_err()), "back");
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
}
