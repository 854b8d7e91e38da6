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
//! The file appended to is written with zeros [`ZEROED_AHEAD`] past its
//! last record, so that a group commit overwrites blocks the file already
//! has and its `fdatasync` writes those blocks alone, not the file's size
//! in the file system's journal as an append does (about a third of each
//! commit's sync, docs/benchmarks.md). Only the log's last file may end in
//! zeros: a file is cut to its last record before the next one is begun,
//! and when the log is closed.
//!
//! What the frames mean is the caller's (custody-core's audit log); this
//! owns their layout, their numbering and their durability. A defect is
//! reported, never repaired, with one exception the caller asks for: a
//! *torn tail* (the last frame of the last file running past its end, or
//! failing its CRC with nothing but zeros after it) is what a crash before
//! the sync leaves, and [`SegmentLog::open`] cuts it when told to.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Where a file ends and the next begins (a file may run past it by one
/// group commit).
pub const SEGMENT_BYTES: u64 = 4 << 20;

/// The largest payload a frame may hold: anything longer is a defect.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// How far past its last record the file appended to is written with
/// zeros: the file grows (and its size reaches the journal) once per this
/// many bytes of records, not at every group commit.
pub const ZEROED_AHEAD: u64 = 1 << 20;

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
    /// Bytes after it, up to the last that is not zero.
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
    /// Shared with the log's readers, which ask it how far the file being
    /// appended to holds synced records when they reach that file.
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    last_seq: u64,
    /// The last record's payload (what a caller links the next to).
    last_payload: Option<Vec<u8>>,
    /// The file appends go to, its first number and where its last record
    /// ends.
    current: Option<(u64, u64)>,
    /// That file, once appended to, and how far it holds zeros past its
    /// last record (its length).
    file: Option<(File, u64)>,
    torn: Option<TornTail>,
    /// Why the log is only read, never appended to: its last file did not
    /// read at open (its readers meet the defect), it was opened to keep a
    /// torn tail, or an append failed (what it left is unknown here).
    read_only: Option<SegmentError>,
    /// Whether the directory was synced since the log was opened.
    directory_synced: bool,
}

impl State {
    fn empty() -> State {
        State {
            last_seq: 0,
            last_payload: None,
            current: None,
            file: None,
            torn: None,
            read_only: None,
            directory_synced: false,
        }
    }
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
/// defect, and so do zeros to its end (the space written ahead of its
/// records).
struct FrameReader {
    name: String,
    reader: BufReader<File>,
    offset: u64,
    len: u64,
    last: bool,
    /// Set once a torn final frame was met: the bytes it left, to the last
    /// that is not zero.
    torn: Option<u64>,
}

impl FrameReader {
    /// Opens the file whose first record is `first`, read no further than
    /// `bound` (where its last record ended when the reading began: bytes
    /// past it may be a group commit still being written).
    fn open(dir: &Path, first: u64, last: bool, bound: Option<u64>) -> Result<FrameReader> {
        let name = file_name(first);
        let file = File::open(dir.join(&name)).map_err(|e| io(&name, e))?;
        let len = file.metadata().map_err(|e| io(&name, e))?.len();
        Ok(FrameReader {
            name,
            reader: BufReader::with_capacity(256 << 10, file),
            offset: 0,
            len: bound.map_or(len, |bound| bound.min(len)),
            last,
            torn: None,
        })
    }

    fn corrupt(&self, problem: String) -> SegmentError {
        SegmentError::Corrupt {
            file: self.name.clone(),
            problem: format!("at byte {}: {problem}", self.offset),
        }
    }

    /// The next whole frame; `None` at the end: the file's, zeros to it in
    /// the last file, or a torn final frame of the last file (noted in
    /// `torn`).
    fn next_frame(&mut self) -> Result<Option<Frame>> {
        let rest = self.len - self.offset;
        if rest == 0 {
            return Ok(None);
        }
        if rest < HEADER as u64 {
            return self.not_whole(self.len, "a frame header cut short");
        }
        let mut header = [0u8; HEADER];
        self.reader
            .read_exact(&mut header)
            .map_err(|e| io(&self.name, e))?;
        if header == [0u8; HEADER] {
            // No record is numbered 0: this is where the zeros begin.
            return self.not_whole(self.offset, "zeros where a frame should begin");
        }
        let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let seq_bytes: [u8; 8] = header[8..16].try_into().unwrap_or_default();
        if length > MAX_PAYLOAD {
            return Err(self.corrupt(format!(
                "expected a payload of at most {MAX_PAYLOAD} bytes, found a length of {length}"
            )));
        }
        let frame_end = self.offset + (HEADER + length) as u64;
        if frame_end > self.len {
            return self.not_whole(self.len, "a frame runs past the file's end");
        }
        let mut payload = vec![0u8; length];
        self.reader
            .read_exact(&mut payload)
            .map_err(|e| io(&self.name, e))?;
        let computed = crc32c::crc32c_append(crc32c::crc32c(&seq_bytes), &payload);
        if computed != crc {
            return self.not_whole(frame_end, "the frame fails its CRC-32C");
        }
        self.offset = frame_end;
        Ok(Some(Frame {
            seq: u64::from_le_bytes(seq_bytes),
            payload,
        }))
    }

    /// A frame at `offset` that does not read whole, its bytes running to
    /// `frame_end`: in the last file, the end of the log if only zeros
    /// follow it (nothing at all, or a frame a crash tore before its sync),
    /// a defect if anything else does; in an earlier file, always a defect.
    fn not_whole(&mut self, frame_end: u64, problem: &str) -> Result<Option<Frame>> {
        if !self.last {
            return Err(self.corrupt(format!("{problem}, in a file that is not the last")));
        }
        let data_end = written_to(self.reader.get_ref(), self.offset, self.len)
            .map_err(|e| io(&self.name, e))?;
        if data_end == self.offset {
            return Ok(None);
        }
        if data_end <= frame_end {
            self.torn = Some(data_end - self.offset);
            return Ok(None);
        }
        Err(self.corrupt(format!(
            "expected the log to end here ({problem}), found data up to byte {data_end}"
        )))
    }
}

/// Where the last byte of `file` between `from` and `to` that is not zero
/// ends (`from` if there is none).
fn written_to(file: &File, from: u64, to: u64) -> std::io::Result<u64> {
    let mut chunk = vec![0u8; 64 << 10];
    let mut at = from;
    let mut end = from;
    while at < to {
        let want = chunk.len().min((to - at) as usize);
        let read = file.read_at(&mut chunk[..want], at)?;
        if read == 0 {
            break;
        }
        if let Some(i) = chunk[..read].iter().rposition(|&b| b != 0) {
            end = at + i as u64 + 1;
        }
        at += read as u64;
    }
    Ok(end)
}

/// Every whole frame of one file (no further than `bound`, see
/// [`FrameReader::open`]), numbered from `first` with no gap, and the
/// reader where it stopped (its `torn` says whether at a torn tail, which
/// only the log's `last` file may have).
fn read_whole(
    dir: &Path,
    first: u64,
    last: bool,
    bound: Option<u64>,
) -> Result<(Vec<Frame>, FrameReader)> {
    let mut reader = FrameReader::open(dir, first, last, bound)?;
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
        let mut state = State::empty();
        if let Some(&first) = files.last() {
            let (frames, reader) = read_whole(dir, first, true, None)?;
            state.last_seq = first - 1 + frames.len() as u64;
            state.last_payload = frames.into_iter().last().map(|frame| frame.payload);
            if let Some(bytes) = reader.torn {
                let torn = TornTail {
                    at: reader.offset,
                    bytes,
                    after_seq: state.last_seq,
                };
                state.torn = Some(torn);
                if tail == Tail::Keep {
                    state.read_only = Some(SegmentError::OutOfOrder(
                        "the log ends in a torn tail it was opened to keep: it is only read".into(),
                    ));
                }
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
                    let (frames, _) = read_whole(dir, before, false, None)?;
                    state.last_payload = frames.into_iter().last().map(|frame| frame.payload);
                }
            }
        }
        Ok(SegmentLog {
            dir: dir.to_path_buf(),
            state: Arc::new(Mutex::new(state)),
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
                state: Arc::new(Mutex::new(State {
                    read_only: Some(error),
                    ..State::empty()
                })),
            }),
            other => other,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
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
    /// syncs them before returning. A failed write or sync leaves the log's
    /// tail unknown to this process, which appends no more (as after a
    /// failed flush): the next open finds a whole log or a torn tail.
    pub fn append(&self, records: &[(u64, &[u8])]) -> Result<()> {
        let mut state = match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => {
                // An append panicked partway: what it left is unknown.
                let mut state = poisoned.into_inner();
                state.read_only.get_or_insert_with(|| {
                    SegmentError::Io("an append was cut short by a panic".into())
                });
                state
            }
        };
        if let Some(error) = &state.read_only {
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
        if let Err(error) = Self::write_group(&self.dir, &mut state, first_seq, &buffer) {
            state.read_only = Some(error.clone());
            return Err(error);
        }
        state.last_seq = expected - 1;
        state.last_payload = records.last().map(|(_, payload)| payload.to_vec());
        Ok(())
    }

    /// Writes and syncs the frames of a group commit whose first record is
    /// `first_seq`. A failure partway leaves the file unknown to this
    /// process.
    fn write_group(dir: &Path, state: &mut State, first_seq: u64, buffer: &[u8]) -> Result<()> {
        let (file_first, len) = match state.current {
            Some((first, len)) if len < SEGMENT_BYTES => (first, len),
            Some((first, len)) => {
                // Only the last file may end in zeros: this one is cut to
                // its last record, durably, before the next is begun.
                let name = file_name(first);
                let file = match state.file.take() {
                    Some((file, _)) => file,
                    None => OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(dir.join(&name))
                        .map_err(|e| io(&name, e))?,
                };
                cut_to_last_record(&file, &name, len)?;
                (first_seq, 0)
            }
            None => (first_seq, 0),
        };
        let name = file_name(file_first);
        let starts_file = len == 0;
        let (file, zeroed_to) = match state.file.take() {
            Some(open) => open,
            None => {
                let file = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .read(true)
                    .write(true)
                    .open(dir.join(&name))
                    .map_err(|e| io(&name, e))?;
                // Past the last record the file holds zeros (read so at
                // open, or the torn tail cut), or nothing.
                let zeroed_to = file.metadata().map_err(|e| io(&name, e))?.len();
                (file, zeroed_to.max(len))
            }
        };
        let end = len + buffer.len() as u64;
        // The zeros first, under the records too: a disk too full for them
        // fails the append before any of its records is written.
        let zeroed_to = if end > zeroed_to {
            let mut at = zeroed_to;
            while at < end + ZEROED_AHEAD {
                let chunk = (end + ZEROED_AHEAD - at).min(ZEROED_AHEAD) as usize;
                file.write_all_at(&ZEROS[..chunk], at)
                    .map_err(|e| io(&name, e))?;
                at += chunk as u64;
            }
            at
        } else {
            zeroed_to
        };
        file.write_all_at(buffer, len).map_err(|e| io(&name, e))?;
        file.sync_data().map_err(|e| io(&name, e))?;
        // A new file's name, and at the first append after an open the
        // last file's (a crash may have come before its directory's sync).
        if starts_file || !state.directory_synced {
            sync_dir(dir)?;
            state.directory_synced = true;
        }
        state.file = Some((file, zeroed_to));
        state.current = Some((file_first, end));
        Ok(())
    }

    /// The records from `start` on, in order, read from the files as they
    /// are when each is reached: a reader never sees a frame half written
    /// (a torn final frame of the last file ends the log), and a defect, a
    /// gap or a repeat is an error, after which the iterator ends.
    pub fn records_from(&self, start: u64) -> Records {
        Records::new(self.dir.clone(), start.max(1), self.state.clone())
    }

    /// The records from the last back to the first, a file at a time (each
    /// read whole, so at most about [`SEGMENT_BYTES`] held at once).
    pub fn records_rev(&self) -> RecordsRev {
        RecordsRev {
            dir: self.dir.clone(),
            files: list(&self.dir),
            log: self.state.clone(),
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

impl Drop for SegmentLog {
    /// Cuts the zeros past the last record of the file appended to, so
    /// that a closed log's files end at their last record. Only zeros: if
    /// anything else lies past the last record this log wrote (another
    /// writer's records, someone's bytes), the file is left for the next
    /// open to read and report. Best effort: a file left with its zeros
    /// (as a crash leaves it) reads the same.
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        let (Some((file, _)), Some((_, len))) = (state.file.take(), state.current) else {
            return;
        };
        let _ = cut_to_last_record(&file, "", len);
    }
}

/// Cuts `file` (named `name`) to its last record, which ends at `len`, if
/// only zeros follow it; anything else there is a defect, left in place.
fn cut_to_last_record(file: &File, name: &str, len: u64) -> Result<()> {
    let physical = file.metadata().map_err(|e| io(name, e))?.len();
    let written = written_to(file, len, physical).map_err(|e| io(name, e))?;
    if written > len {
        return Err(SegmentError::Corrupt {
            file: name.into(),
            problem: format!(
                "expected only zeros after the last record (byte {len}), found data up to byte {written}"
            ),
        });
    }
    if physical > len {
        file.set_len(len).map_err(|e| io(name, e))?;
        file.sync_all().map_err(|e| io(name, e))?;
    }
    Ok(())
}

/// Zeros written past the last record, [`ZEROED_AHEAD`] at a time.
static ZEROS: [u8; ZEROED_AHEAD as usize] = [0; ZEROED_AHEAD as usize];

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
    log: Arc<Mutex<State>>,
    reader: Option<FrameReader>,
    start: u64,
    /// The number the next frame must carry (`None` before the first file).
    expected: Option<u64>,
    done: bool,
    pending_error: Option<SegmentError>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How far a reader reaching the file that begins at `first` may read it:
/// the file appended to, to the end of its synced records (past them a
/// group commit may be half written); a file being begun, not at all;
/// any other, to its end.
fn bound_of(first: u64, log: &Mutex<State>) -> Option<u64> {
    let state = lock(log);
    match state.current {
        Some((current, len)) if current == first => Some(len),
        Some((current, _)) if first > current && first == state.last_seq + 1 => Some(0),
        _ => None,
    }
}

impl Records {
    fn new(dir: PathBuf, start: u64, log: Arc<Mutex<State>>) -> Records {
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
            log,
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
                    bound_of(first, &self.log),
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
    log: Arc<Mutex<State>>,
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
            match read_whole(&self.dir, first, last, bound_of(first, &self.log)) {
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
mod tests;
