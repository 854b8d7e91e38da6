//! The [`AuditLog`] handle and the one writer thread behind it: group commit,
//! failing closed after a failed flush, checkpoints on the policy's cadence,
//! and the signatures of the audit key. Records and the head are written
//! only here, in the layout [`super::stored`] reads and checks.
//!
//! One chain, whoever writes: a batch is linked to the head it reads and
//! lands with the new head in one store transaction, which fails if another
//! writer moved the head meanwhile; the writer then links the batch again
//! onto the new head (the body of [`custody_store::Store::transaction`]
//! runs again). Replicas sharing an etcd store so append to one chain with
//! no fork and no gap, and each record names the replica that wrote it. A
//! checkpoint is signed over the head it reads and lands only if that is
//! still the head; otherwise it is signed again over the new one.
//!
//! The audit key signs on the HSM pool's workers ([`Hsm::run_blocking`]),
//! like every other HSM call, so its calls have the pool's deadline: a hung
//! audit-key call holds the writer (and the appends queued behind it) for
//! one deadline at most, then fails closed: the checkpoint is not written
//! and is tried again on the next cadence, and a signed head or a statement
//! signature (ceremony transcripts, backup manifests) is refused
//! `AUDIT_UNAVAILABLE`. Appends never wait for the HSM otherwise.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hsm_shim::{EcdsaEncoding, Exportability, Hsm, KeyLabel, KeySpec, SignAlgorithm, SignInput};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use super::chain::{AuditError, Record, SignedHead, chain_hash, checkpoint_message, head_message};
use super::event::{Entry, Event, now_rfc3339};
use super::home::{RecordHome, RecordIter};
use super::stored::{CheckedChain, HEAD, decode_head, encode_head};
use super::verify::{VerifyReport, checkpoint_signature_verifies, verify_records};
use crate::metrics;

/// Label of the HSM key that signs checkpoints and heads.
pub const AUDIT_KEY_LABEL: &str = "custody-audit/v1";

/// Most records one group commit writes: with the head, one transaction
/// stays within etcd's default limit of 128 writes (`--max-txn-ops`).
const MAX_BATCH: usize = 100;

/// How many times a checkpoint is signed again when other writers keep
/// moving the head before it lands; after that it waits for its next turn.
const CHECKPOINT_TRIES: usize = 4;

/// An append waiting for the writer: the event, when it was queued, and
/// where its outcome goes.
type PendingAppend = (
    Box<Event>,
    Instant,
    oneshot::Sender<Result<u64, AuditError>>,
);

enum Command {
    Append(
        Box<Event>,
        Instant,
        oneshot::Sender<Result<u64, AuditError>>,
    ),
    Checkpoint(oneshot::Sender<Result<u64, AuditError>>),
    SignHead(oneshot::Sender<Result<SignedHead, AuditError>>),
    SignStatement(Vec<u8>, oneshot::Sender<Result<Vec<u8>, AuditError>>),
    Hold(oneshot::Sender<()>, std::sync::mpsc::Receiver<()>),
    Stop,
}

/// While held, the audit writer makes no HSM call (see [`AuditLog::hold`]);
/// dropping it lets the writer go on.
pub struct AuditHold {
    _release: std::sync::mpsc::Sender<()>,
}

/// Checkpoint cadence.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    /// After this many records.
    pub every: u64,
    /// Or after this long with new records.
    pub interval: Duration,
}

/// Handle to the audit log; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    commands: crossbeam_channel::Sender<Command>,
    records: RecordHome,
    failed: Arc<AtomicBool>,
    audit_key_spki: Arc<Vec<u8>>,
    audit_key_pem: Arc<String>,
    writer: Arc<WriterThread>,
}

/// The writer thread, stopped and joined when the last [`AuditLog`] goes:
/// the thread holds a handle to the HSM pool, whose sessions closed while
/// the process exits (and the PKCS#11 module tears itself down) crash the
/// module.
struct WriterThread {
    commands: crossbeam_channel::Sender<Command>,
    handle: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl WriterThread {
    fn stop(&self) {
        let _ = self.commands.send(Command::Stop);
        let handle = self
            .handle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("the audit writer panicked");
            }
        }
    }
}

impl Drop for WriterThread {
    fn drop(&mut self) {
        self.stop();
    }
}

impl AuditLog {
    /// Opens the log in `db`, its records in `records`, whose stored chain
    /// `chain` is the check of
    /// (one pass over the log serves the start's integrity check and the
    /// writer's head), checks the signature of the checkpoint that check
    /// began at (refusing to open if it does not verify, threat model Q2),
    /// makes the audit key if the token has none and the log no checkpoint
    /// (on a session of its own, closed after), and starts the writer
    /// thread, which signs on `hsm`'s workers.
    pub fn open(
        db: &custody_store::Store,
        records: &RecordHome,
        chain: &CheckedChain,
        hsm: &Hsm,
        policy: CheckpointPolicy,
        replica: Option<String>,
    ) -> Result<AuditLog, String> {
        let mut session = hsm.session().map_err(|e| format!("HSM: {e}"))?;
        if let RecordHome::Store(_) = records {
            // Made now, so that the writer's transactions can name it.
            db.keyspace("audit").map_err(|e| e.to_string())?;
        }
        let head = db.keyspace("audit_head").map_err(|e| e.to_string())?;
        let report = chain.report.clone();
        if let Some((seq, problem)) = report.first_bad {
            return Err(AuditError::Corrupt { seq, problem }.to_string());
        }
        let label = KeyLabel::new(AUDIT_KEY_LABEL).map_err(|e| e.to_string())?;
        let public_key = match session.public_key(&label) {
            Ok(key) => key,
            // A log with signed checkpoints was kept by a key the token
            // has lost: a new key would not verify them (threat model Q2).
            Err(e) if e.kind() == hsm_shim::ErrorKind::NotFound && chain.anchor.is_some() => {
                return Err(format!(
                    "the log holds signed checkpoints but the token has no audit key ({AUDIT_KEY_LABEL}): custodyd does not make a new one over them"
                ));
            }
            Err(e) if e.kind() == hsm_shim::ErrorKind::NotFound => session
                .generate_key_pair(&label, KeySpec::EcP256, Exportability::NonExportable)
                .map_err(|e| format!("creating the audit key: {e}"))?
                .public_key
                .ok_or("audit key without public key")?,
            Err(e) => return Err(format!("reading the audit key: {e}")),
        };
        drop(session);
        let spki = public_key.spki_der().to_vec();
        if let Some(anchor) = &chain.anchor {
            if !checkpoint_signature_verifies(
                &spki,
                anchor.head_seq,
                &anchor.head_hash,
                &anchor.signature,
            ) {
                return Err(AuditError::Corrupt {
                    seq: anchor.seq,
                    problem: "expected the signature of the last checkpoint, where the check at start begins, to verify with the token's audit key; it does not, and custodyd does not start (threat model Q2)".into(),
                }
                .to_string());
            }
        }
        let pem = public_key.to_pem().map_err(|e| e.to_string())?;
        let (commands, queue) = crossbeam_channel::unbounded();
        let failed = Arc::new(AtomicBool::new(false));
        let (since_checkpoint, last_checkpoint) =
            checkpoint_cadence(records, chain, report.last_seq, policy.interval);
        let writer = Writer {
            db: db.clone(),
            records: records.clone(),
            head,
            replica,
            hsm: hsm.clone(),
            label,
            seq: report.last_seq,
            hash: report.last_hash,
            since_checkpoint,
            last_checkpoint,
            policy,
            failed: failed.clone(),
            head_behind: None,
            head_written: Instant::now(),
        };
        let writer = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(|e| e.to_string())?;
        Ok(AuditLog {
            commands: commands.clone(),
            records: records.clone(),
            failed,
            audit_key_spki: Arc::new(spki),
            audit_key_pem: Arc::new(pem),
            writer: Arc::new(WriterThread {
                commands,
                handle: std::sync::Mutex::new(Some(writer)),
            }),
        })
    }

    /// Appends `event` and waits until it is durable; returns its sequence
    /// number. An error means the caller must not act (fail closed).
    pub async fn append(&self, event: Event) -> Result<u64, AuditError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Append(Box::new(event), Instant::now(), reply))?;
        answer
            .await
            .map_err(|_| AuditError::Unavailable("audit writer stopped".into()))?
    }

    /// Signs a checkpoint now (normally it happens on the policy's cadence).
    pub async fn checkpoint(&self) -> Result<u64, AuditError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Checkpoint(reply))?;
        answer
            .await
            .map_err(|_| AuditError::Unavailable("audit writer stopped".into()))?
    }

    /// The current head, signed by the audit key.
    pub async fn signed_head(&self) -> Result<SignedHead, AuditError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::SignHead(reply))?;
        answer
            .await
            .map_err(|_| AuditError::Unavailable("audit writer stopped".into()))?
    }

    /// Signs `message` (SHA-256, ECDSA P-256, DER) with the audit key: the
    /// signature on ceremony transcripts and backup manifests.
    pub async fn sign_statement(&self, message: Vec<u8>) -> Result<Vec<u8>, AuditError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::SignStatement(message, reply))?;
        answer
            .await
            .map_err(|_| AuditError::Unavailable("audit writer stopped".into()))?
    }

    /// Parks the writer until the returned guard is dropped, once what is
    /// queued before it is written. The token security officer's step of a
    /// ceremony logs the whole application out for a moment; the writer's
    /// session must not sign a checkpoint meanwhile. Appends wait, they do
    /// not fail.
    pub async fn hold(&self) -> Result<AuditHold, AuditError> {
        let (parked, answer) = oneshot::channel();
        let (release, wait) = std::sync::mpsc::channel();
        self.send(Command::Hold(parked, wait))?;
        answer
            .await
            .map_err(|_| AuditError::Unavailable("audit writer stopped".into()))?;
        Ok(AuditHold { _release: release })
    }

    /// Stops the writer after what is queued, and waits for it: on return the
    /// log holds no database handle of its own.
    pub fn close(&self) {
        self.writer.stop();
    }

    /// True while appends are possible.
    pub fn healthy(&self) -> bool {
        !self.failed.load(Ordering::SeqCst)
    }

    /// The audit key's SubjectPublicKeyInfo DER.
    pub fn audit_key_spki(&self) -> &[u8] {
        &self.audit_key_spki
    }

    /// The audit key's SubjectPublicKeyInfo PEM.
    pub fn audit_key_pem(&self) -> &str {
        &self.audit_key_pem
    }

    /// The last stored event (before this process appends any, at start:
    /// how the previous one ended).
    pub fn last_event(&self) -> Option<Event> {
        let record = self.records.last()?;
        serde_json::from_slice::<Entry>(&record.entry)
            .ok()
            .map(|entry| entry.event)
    }

    /// Stored records from `start` on.
    pub fn records(&self, start: u64) -> RecordIter {
        self.records.records(start)
    }

    /// Checks the whole stored chain and its checkpoints.
    pub fn verify(&self) -> VerifyReport {
        verify_records(self.records.records(1), Some(&self.audit_key_spki))
    }

    fn send(&self, command: Command) -> Result<(), AuditError> {
        if !self.healthy() {
            return Err(AuditError::Unavailable(
                "an earlier write failed; restart custodyd once the disk is healthy".into(),
            ));
        }
        self.commands
            .send(command)
            .map_err(|_| AuditError::Unavailable("audit writer stopped".into()))
    }
}
/// Where the checkpoint cadence stands in the stored log, so that it follows
/// the log and not the process: how many records follow the last checkpoint,
/// and the moment of that checkpoint (of the first record if there is
/// none) on this process's clock, brought no further back than `interval`
/// (so a checkpoint overdue at start is due at once). A daemon that restarts
/// more often than `interval` still checkpoints. The start's check found
/// the last checkpoint already (`chain`'s anchor, threat model Q1): the
/// tail is read again only when it names none.
fn checkpoint_cadence(
    records: &RecordHome,
    chain: &CheckedChain,
    last_seq: u64,
    interval: Duration,
) -> (u64, Instant) {
    let decode = |record: Result<Record, AuditError>| {
        record
            .ok()
            .and_then(|record| serde_json::from_slice::<Entry>(&record.entry).ok())
    };
    let last = match &chain.anchor {
        Some(anchor) => Some((anchor.seq, anchor.time.clone())),
        None => records
            .records_rev()
            .filter_map(decode)
            .find(|entry| matches!(entry.event, Event::Checkpoint { .. }))
            .map(|entry| (entry.seq, entry.time)),
    };
    let (seq, time) = match last {
        Some(last) => last,
        None => (
            0,
            records
                .records(1)
                .next()
                .and_then(decode)
                .map(|entry| entry.time)
                .unwrap_or_default(),
        ),
    };
    let elapsed =
        time::OffsetDateTime::parse(&time, &time::format_description::well_known::Rfc3339)
            .ok()
            .map(|at| time::OffsetDateTime::now_utc() - at)
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or_default();
    let now = Instant::now();
    let since = now.checked_sub(elapsed.min(interval)).unwrap_or(now);
    (last_seq.saturating_sub(seq), since)
}

struct Writer {
    db: custody_store::Store,
    records: RecordHome,
    head: custody_store::Keyspace,
    /// Written into each record.
    replica: Option<String>,
    hsm: Hsm,
    label: KeyLabel,
    /// The head this writer last wrote or read: what a store without a
    /// stored head (written before heads were) links to.
    seq: u64,
    hash: [u8; 32],
    since_checkpoint: u64,
    last_checkpoint: Instant,
    policy: CheckpointPolicy,
    failed: Arc<AtomicBool>,
    /// With a segment log: the head not yet written to the store, and when
    /// it last was ([`Self::write_head`]).
    head_behind: Option<(u64, [u8; 32])>,
    head_written: Instant,
}

/// With a segment log, how often the writer writes the head to the store
/// under load (and once the queue goes quiet): one store write per group
/// commit cost a tenth of a unary signature's CPU (benchmarks.md), and the
/// head is durable only with the store's next flush anyway (threat model
/// Q6), which this delays by at most as much.
const HEAD_EVERY: Duration = Duration::from_millis(50);

impl Writer {
    fn run(mut self, queue: crossbeam_channel::Receiver<Command>) {
        self.checkpoint_if_due();
        loop {
            let wait = match self.head_behind {
                Some(_) => HEAD_EVERY.saturating_sub(self.head_written.elapsed()),
                None => self.policy.interval,
            };
            let first = match queue.recv_timeout(wait) {
                Ok(command) => command,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    self.write_head_or_fail();
                    self.checkpoint_if_due();
                    continue;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            };
            let mut appends = Vec::new();
            let mut others = Vec::new();
            let mut stop = false;
            for command in std::iter::once(first).chain(queue.try_iter().take(MAX_BATCH - 1)) {
                match command {
                    Command::Append(event, queued, reply) => appends.push((event, queued, reply)),
                    Command::Stop => stop = true,
                    other => others.push(other),
                }
            }
            if !appends.is_empty() {
                self.write_batch(appends);
            }
            for command in others {
                match command {
                    Command::Checkpoint(reply) => {
                        let _ = reply.send(self.checkpoint());
                    }
                    Command::SignHead(reply) => {
                        let _ = reply.send(self.sign_head());
                    }
                    Command::SignStatement(message, reply) => {
                        let _ = reply.send(self.sign(&message));
                    }
                    Command::Hold(parked, wait) => {
                        let _ = parked.send(());
                        // Returns when the guard is dropped (its sender gone).
                        let _ = wait.recv();
                    }
                    Command::Append(..) | Command::Stop => {}
                }
            }
            if stop {
                // The head too, so that a clean stop leaves it on the last
                // record.
                self.write_head_or_fail();
                if let Err(error) = self.flush_store() {
                    tracing::error!(%error, "the audit head could not be flushed at stop");
                }
                return;
            }
            self.checkpoint_if_due();
        }
    }

    fn write_batch(&mut self, appends: Vec<PendingAppend>) {
        // After a failed flush the on-disk tail is unknown: write nothing more
        // (what was queued before the failure was noticed included).
        if self.failed.load(Ordering::SeqCst) {
            for (_, _, reply) in appends {
                let _ = reply.send(Err(AuditError::Unavailable(
                    "an earlier write failed; restart custodyd once the disk is healthy".into(),
                )));
            }
            return;
        }
        let events: Vec<&Event> = appends.iter().map(|(event, _, _)| &**event).collect();
        let outcome = self
            .link(&events, None)
            .and_then(|linked| linked.ok_or_else(|| unavailable("the batch was not linked")))
            .and_then(|seqs| self.flush().map(|()| seqs));
        match outcome {
            Ok(seqs) => {
                for ((_, queued, reply), seq) in appends.into_iter().zip(seqs) {
                    metrics::audit_append(queued.elapsed().as_secs_f64());
                    let _ = reply.send(Ok(seq));
                }
            }
            Err(error) => {
                self.fail(&error);
                for (_, _, reply) in appends {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }

    /// After a failed write: a write whose outcome is unknown on the local
    /// disk (sled latches its first I/O error) stops every later one. A
    /// store that was unreachable left nothing half-done (the transaction
    /// landed whole or not at all, and the next batch links to whatever the
    /// stored head is), so only this batch fails: its callers do not act.
    fn fail(&self, error: &AuditError) {
        if matches!(error, AuditError::StoreUnreachable(_)) {
            tracing::warn!(%error, "audit write failed; the next one is tried");
        } else {
            tracing::error!(%error, "audit write failed; refusing all further operations");
            self.failed.store(true, Ordering::SeqCst);
        }
    }

    /// Makes what was just linked durable before anyone is answered. With
    /// a segment log the records were synced by their append, and the head
    /// is written to the store at most [`HEAD_EVERY`] later and reaches the
    /// disk with the store's next flush (within about 550 ms, and at a clean
    /// stop): the head may lag the log after a crash, never lead
    /// it, and a group commit costs one sync, not two (threat model Q6).
    fn flush(&self) -> Result<(), AuditError> {
        if let RecordHome::Segments(_) = self.records {
            return Ok(());
        }
        self.flush_store()
    }

    fn flush_store(&self) -> Result<(), AuditError> {
        self.db
            .flush()
            .map_err(|e| AuditError::Unavailable(format!("flush: {e}")))
    }

    /// The stored head; this writer's own while none is stored, and always
    /// with a segment log, which only this writer appends to (there the
    /// stored head may lag the log, see [`Self::flush`]).
    fn stored_head(&self) -> Result<(u64, [u8; 32]), AuditError> {
        if let RecordHome::Segments(_) = self.records {
            return Ok((self.seq, self.hash));
        }
        match self.head.get(HEAD).map_err(store_error)? {
            Some(value) => decode_head(&value).ok_or_else(|| AuditError::Corrupt {
                seq: 0,
                problem: "the stored head is not a sequence number and a hash".into(),
            }),
            None => Ok((self.seq, self.hash)),
        }
    }

    /// Links `events` to the stored head and writes them with the new head
    /// in one transaction (linked again if another writer moves the head
    /// first). With `only_on`, lands only if the head is still that one
    /// (`None` otherwise: nothing written). Returns the records' sequence
    /// numbers.
    fn link(
        &mut self,
        events: &[&Event],
        only_on: Option<(u64, [u8; 32])>,
    ) -> Result<Option<Vec<u64>>, AuditError> {
        let tree = match &self.records {
            RecordHome::Segments(log) => {
                let log = log.clone();
                return self.link_segments(&log, events, only_on);
            }
            RecordHome::Store(db) => db.keyspace("audit").map_err(store_error)?,
        };
        let fallback = (self.seq, self.hash);
        let replica = self.replica.clone();
        let (tree, head) = (&tree, &self.head);
        let linked = self
            .db
            .transaction(&[tree, head], |tx| {
                let (seq, hash) = match tx.get(head, HEAD)? {
                    Some(value) => decode_head(&value).ok_or_else(|| {
                        custody_store::TxError::abort("the stored audit head is malformed")
                    })?,
                    None => fallback,
                };
                if only_on.is_some_and(|wanted| wanted != (seq, hash)) {
                    return Ok(None);
                }
                // Never over a record: a head behind the log means the head
                // was lost or rolled back, and linking would fork the chain.
                if tx.get(tree, (seq + 1).to_be_bytes())?.is_some() {
                    return Err(custody_store::TxError::abort(format!(
                        "the audit head names record {seq}, but record {} exists",
                        seq + 1
                    )));
                }
                let (records, end) = encode_records(events, (seq, hash), replica.as_deref())
                    .map_err(custody_store::TxError::abort)?;
                for (seq, value) in &records {
                    tx.insert(tree, seq.to_be_bytes(), value)?;
                }
                tx.insert(head, HEAD, encode_head(end.0, &end.1))?;
                Ok(Some((records, end)))
            })
            .map_err(store_error)?;
        Ok(linked.map(|(records, end)| self.linked(&records, end)))
    }

    /// [`Self::link`] for a segment log, which only this writer appends
    /// to: the records synced to their file first, then the head written
    /// (every [`HEAD_EVERY`], durable with the store's next flush, see
    /// [`Self::flush`]), so that
    /// a crash leaves the head behind the log, never past it (threat model
    /// Q6).
    fn link_segments(
        &mut self,
        log: &custody_store::segments::SegmentLog,
        events: &[&Event],
        only_on: Option<(u64, [u8; 32])>,
    ) -> Result<Option<Vec<u64>>, AuditError> {
        let start = (self.seq, self.hash);
        if only_on.is_some_and(|wanted| wanted != start) {
            return Ok(None);
        }
        let (records, end) =
            encode_records(events, start, self.replica.as_deref()).map_err(|e| unavailable(&e))?;
        let frames: Vec<(u64, &[u8])> = records.iter().map(|(s, v)| (*s, v.as_slice())).collect();
        log.append(&frames)
            .map_err(|e| AuditError::Unavailable(format!("write: {e}")))?;
        self.head_behind = Some(end);
        if self.head_written.elapsed() >= HEAD_EVERY {
            self.write_head()?;
        }
        Ok(Some(self.linked(&records, end)))
    }

    /// Writes the head a segment log's appends left behind to the store
    /// (durable with its next flush).
    fn write_head(&mut self) -> Result<(), AuditError> {
        self.head_written = Instant::now();
        // Taken even if the write fails: that fails the log (no later
        // append), and the writer must not retry it in a loop.
        match self.head_behind.take() {
            Some((seq, hash)) => self
                .head
                .insert(HEAD, encode_head(seq, &hash))
                .map_err(store_error),
            None => Ok(()),
        }
    }

    /// [`Self::write_head`] where no caller waits: a store that cannot be
    /// written fails the log closed, as a failed append does.
    fn write_head_or_fail(&mut self) {
        if let Err(error) = self.write_head() {
            self.fail(&error);
        }
    }

    /// After records landed: the writer's head and cadence move on.
    fn linked(&mut self, records: &[(u64, Vec<u8>)], end: (u64, [u8; 32])) -> Vec<u64> {
        self.since_checkpoint += records.len() as u64;
        (self.seq, self.hash) = end;
        records.iter().map(|(seq, _)| *seq).collect()
    }

    fn checkpoint_if_due(&mut self) {
        let due = self.since_checkpoint >= self.policy.every
            || (self.since_checkpoint > 0
                && self.last_checkpoint.elapsed() >= self.policy.interval);
        if due && !self.failed.load(Ordering::SeqCst) {
            if let Err(error) = self.checkpoint() {
                tracing::warn!(%error, "audit checkpoint failed; will retry");
            }
        }
    }

    /// Signs the head and appends the checkpoint record right after it,
    /// durably.
    fn checkpoint(&mut self) -> Result<u64, AuditError> {
        let outcome = self.try_checkpoint();
        metrics::audit_checkpoint(if outcome.is_ok() { "ok" } else { "failed" });
        if outcome.is_ok() {
            self.since_checkpoint = 0;
            self.last_checkpoint = Instant::now();
        }
        outcome
    }

    fn try_checkpoint(&mut self) -> Result<u64, AuditError> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(unavailable("an earlier write failed"));
        }
        for _ in 0..CHECKPOINT_TRIES {
            let (head_seq, head_hash) = self.stored_head()?;
            if head_seq == 0 {
                return Err(unavailable("nothing to checkpoint yet"));
            }
            let signature = self.sign(checkpoint_message(head_seq, &head_hash).as_bytes())?;
            let checkpoint = Event::Checkpoint {
                head_seq,
                head_hash: hex::encode(head_hash),
                signature: hex::encode(signature),
            };
            let linked = self.link(&[&checkpoint], Some((head_seq, head_hash)));
            match linked.and_then(|linked| Ok((linked, self.flush()?))) {
                Ok((Some(seqs), ())) => return Ok(seqs.first().copied().unwrap_or(head_seq + 1)),
                // Another writer appended after the head was signed.
                Ok((None, ())) => continue,
                Err(error) => {
                    self.fail(&error);
                    return Err(error);
                }
            }
        }
        Err(unavailable(
            "other writers kept moving the head; the checkpoint waits for its next turn",
        ))
    }

    fn sign_head(&mut self) -> Result<SignedHead, AuditError> {
        let (seq, hash) = self.stored_head()?;
        let time = now_rfc3339();
        let signature = self.sign(head_message(seq, &hash, &time).as_bytes())?;
        Ok(SignedHead {
            seq,
            hash,
            time,
            signature,
        })
    }

    fn sign(&mut self, message: &[u8]) -> Result<Vec<u8>, AuditError> {
        let digest = Sha256::digest(message);
        let label = self.label.clone();
        self.hsm
            .run_blocking(move |session| {
                session.sign(
                    &label,
                    SignAlgorithm::EcdsaP256Sha256,
                    SignInput::Digest(&digest),
                    EcdsaEncoding::Der,
                )
            })
            .map_err(|e| AuditError::Unavailable(format!("signing with the audit key: {e}")))
    }
}

/// A record's number and its stored bytes (hash, then entry).
type Encoded = (u64, Vec<u8>);

/// A head: the last record's number and hash.
type Head = (u64, [u8; 32]);

/// `events` as records linked after `start` (a sequence number and its
/// hash), each its hash then its entry's JSON, and the new head.
fn encode_records(
    events: &[&Event],
    start: (u64, [u8; 32]),
    replica: Option<&str>,
) -> Result<(Vec<Encoded>, Head), String> {
    let (mut seq, mut hash) = start;
    let mut records = Vec::with_capacity(events.len());
    for &event in events {
        seq += 1;
        let entry = Entry {
            seq,
            time: now_rfc3339(),
            replica: replica.map(str::to_owned),
            prev: hex::encode(hash),
            event: event.clone(),
        };
        let bytes =
            serde_json::to_vec(&entry).map_err(|e| format!("encoding record {seq}: {e}"))?;
        hash = chain_hash(&hash, &bytes);
        records.push((seq, [hash.as_slice(), &bytes].concat()));
    }
    Ok((records, (seq, hash)))
}

fn unavailable(problem: &str) -> AuditError {
    AuditError::Unavailable(problem.into())
}

/// A store error as the audit log reports it: an unreachable store is
/// worth another try, anything else stops the writer.
fn store_error(error: custody_store::StoreError) -> AuditError {
    match error {
        custody_store::StoreError::Unavailable(_) | custody_store::StoreError::Contended(_) => {
            AuditError::StoreUnreachable(error.to_string())
        }
        custody_store::StoreError::Failed(_) => AuditError::Unavailable(format!("write: {error}")),
    }
}
