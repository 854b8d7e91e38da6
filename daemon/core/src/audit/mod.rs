//! The tamper-evident audit log.
//!
//! Each record is canonical JSON bytes (`seq`, `time`, `prev`, `event`) stored
//! with its hash, `SHA-256(previous hash || entry)`, in the sled tree `audit`
//! under its big-endian sequence number. The first record's previous hash is 32
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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hsm_shim::{
    EcdsaEncoding, Exportability, HsmSession, KeyLabel, KeySpec, SignAlgorithm, SignInput,
};
use p256::ecdsa::signature::Verifier;
use p256::pkcs8::DecodePublicKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::metrics;

/// Label of the HSM key that signs checkpoints and heads.
pub const AUDIT_KEY_LABEL: &str = "custody-audit/v1";

const CHECKPOINT_DOMAIN: &str = "custody-audit-checkpoint/v1";
const HEAD_DOMAIN: &str = "custody-audit-head/v1";
const MAX_BATCH: usize = 4096;

/// Something that happened, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// custodyd started.
    DaemonStarted {
        /// Daemon version.
        version: String,
        /// HSM token label.
        token: String,
        /// SHA-256 of the audit key's SubjectPublicKeyInfo, hex.
        audit_key_sha256: String,
        /// Failed HSM logins since the last successful one.
        failed_logins_before: u32,
    },
    /// A request was made; `outcome` is `ok` or the refusal's reason.
    Request {
        /// Who asked (or `-` if unauthenticated).
        principal: String,
        /// gRPC method.
        method: String,
        /// The resource acted on (a key or version name), if any.
        resource: String,
        /// What exactly, for a signature: the hash and the hex digest signed.
        detail: String,
        /// `ok`, or the stable error reason.
        outcome: String,
    },
    /// The first officer set was enrolled.
    OfficersGenesis {
        /// Officer ids, principals and public keys (hex), "id principal key".
        officers: Vec<String>,
        /// The administrative quorum.
        required: u32,
    },
    /// An officer voted (or tried to).
    Vote {
        /// `operations/{id}`.
        operation: String,
        /// The calling principal.
        principal: String,
        /// The officer id.
        officer: String,
        /// The officer's public key, hex, at the time of the vote.
        public_key: String,
        /// "approve" or "deny".
        vote: String,
        /// The digest, hex.
        digest: String,
        /// The Ed25519 signature, hex.
        signature: String,
        /// "ok" or the refusal reason.
        outcome: String,
    },
    /// An operation left the pending state.
    OperationFinished {
        /// `operations/{id}`.
        operation: String,
        /// succeeded, failed, denied or expired.
        state: String,
        /// The result or the error.
        detail: String,
    },
    /// A key version was marked compromised: the notice relying parties
    /// and auditors look for.
    RevocationNotice {
        /// `keys/{key_id}/versions/{n}`.
        version: String,
        /// Who reported it.
        principal: String,
        /// Why.
        reason: String,
        /// SHA-256 of the version's SubjectPublicKeyInfo, hex (signing keys).
        public_key_sha256: String,
        /// Key check value (AES keys).
        check_value: String,
        /// What replaced it: the rotation, or why there was none.
        replacement: String,
    },
    /// One entry of a ceremony's transcript: the transcript's own hash chain
    /// is anchored in the audit chain entry by entry.
    Ceremony {
        /// `ceremonies/{id}`.
        ceremony: String,
        /// The entry's sequence number in the transcript.
        entry: u32,
        /// The step.
        step: String,
        /// Officer id, or `custodyd`.
        actor: String,
        /// The entry in words.
        summary: String,
        /// The entry's hash, hex.
        entry_hash: String,
    },
    /// A signed checkpoint of the chain head.
    Checkpoint {
        /// The record the checkpoint covers.
        head_seq: u64,
        /// That record's hash, hex.
        head_hash: String,
        /// DER ECDSA P-256 signature by the audit key, hex.
        signature: String,
    },
}

/// The stored form of one record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// Sequence number from 1.
    pub seq: u64,
    /// RFC 3339 UTC time.
    pub time: String,
    /// Hash of the previous record, hex.
    pub prev: String,
    /// What happened.
    pub event: Event,
}

/// One record as exported: the exact bytes hashed, and the hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Sequence number.
    pub seq: u64,
    /// Canonical JSON of the [`Entry`].
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

/// Unix milliseconds as RFC 3339 UTC (the number itself if out of range).
pub fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

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
    tree: sled::Tree,
    failed: Arc<AtomicBool>,
    audit_key_spki: Arc<Vec<u8>>,
    audit_key_pem: Arc<String>,
    writer: Arc<WriterThread>,
}

/// The writer thread, stopped and joined when the last [`AuditLog`] goes:
/// the thread holds an HSM session, and a session closed while the process
/// exits (and the PKCS#11 module tears itself down) crashes the module.
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
    /// Opens the log in `db`, checks the stored chain, makes the audit key if
    /// the token has none, and starts the writer thread on `session`.
    pub fn open(
        db: &sled::Db,
        mut session: HsmSession,
        policy: CheckpointPolicy,
    ) -> Result<AuditLog, String> {
        let tree = db.open_tree("audit").map_err(|e| e.to_string())?;
        let report = verify_records(stored_records(&tree, 1), None);
        if let Some((seq, problem)) = report.first_bad {
            return Err(AuditError::Corrupt { seq, problem }.to_string());
        }
        let label = KeyLabel::new(AUDIT_KEY_LABEL).map_err(|e| e.to_string())?;
        let public_key = match session.public_key(&label) {
            Ok(key) => key,
            Err(e) if e.kind() == hsm_shim::ErrorKind::NotFound => session
                .generate_key_pair(&label, KeySpec::EcP256, Exportability::NonExportable)
                .map_err(|e| format!("creating the audit key: {e}"))?
                .public_key
                .ok_or("audit key without public key")?,
            Err(e) => return Err(format!("reading the audit key: {e}")),
        };
        let spki = public_key.spki_der().to_vec();
        let pem = public_key.to_pem().map_err(|e| e.to_string())?;
        let (commands, queue) = crossbeam_channel::unbounded();
        let failed = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            db: db.clone(),
            tree: tree.clone(),
            session,
            label,
            seq: report.last_seq,
            hash: report.last_hash,
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            policy,
            failed: failed.clone(),
        };
        let writer = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(|e| e.to_string())?;
        Ok(AuditLog {
            commands: commands.clone(),
            tree,
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

    /// Stored records from `start` on.
    pub fn records(&self, start: u64) -> impl Iterator<Item = Result<Record, AuditError>> + use<> {
        stored_records(&self.tree, start)
    }

    /// Checks the whole stored chain and its checkpoints.
    pub fn verify(&self) -> VerifyReport {
        verify_records(stored_records(&self.tree, 1), Some(&self.audit_key_spki))
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

fn stored_records(
    tree: &sled::Tree,
    start: u64,
) -> impl Iterator<Item = Result<Record, AuditError>> + use<> {
    tree.range(start.max(1).to_be_bytes()..).map(|item| {
        let (key, value) = item.map_err(|e| AuditError::Unavailable(e.to_string()))?;
        let seq = <[u8; 8]>::try_from(key.as_ref())
            .map(u64::from_be_bytes)
            .map_err(|_| AuditError::Corrupt {
                seq: 0,
                problem: "malformed record key".into(),
            })?;
        if value.len() < 32 {
            return Err(AuditError::Corrupt {
                seq,
                problem: "record shorter than its hash".into(),
            });
        }
        let (hash, entry) = value.split_at(32);
        Ok(Record {
            seq,
            entry: entry.to_vec(),
            hash: hash.try_into().unwrap_or([0; 32]),
        })
    })
}

struct Writer {
    db: sled::Db,
    tree: sled::Tree,
    session: HsmSession,
    label: KeyLabel,
    seq: u64,
    hash: [u8; 32],
    since_checkpoint: u64,
    last_checkpoint: Instant,
    policy: CheckpointPolicy,
    failed: Arc<AtomicBool>,
}

impl Writer {
    fn run(mut self, queue: crossbeam_channel::Receiver<Command>) {
        loop {
            let first = match queue.recv_timeout(self.policy.interval) {
                Ok(command) => command,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    self.checkpoint_if_due();
                    continue;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            };
            let mut appends = Vec::new();
            let mut others = Vec::new();
            let mut stop = false;
            for command in std::iter::once(first).chain(queue.try_iter().take(MAX_BATCH)) {
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
        let (start_seq, start_hash) = (self.seq, self.hash);
        let mut written = Vec::with_capacity(appends.len());
        let mut outcome = Ok(());
        for (event, queued, reply) in appends {
            if outcome.is_ok() {
                outcome = self.write_one(*event);
            }
            written.push((self.seq, queued, reply));
        }
        let outcome = outcome.and_then(|()| {
            self.db
                .flush()
                .map(drop)
                .map_err(|e| AuditError::Unavailable(format!("flush: {e}")))
        });
        match outcome {
            Ok(()) => {
                for (seq, queued, reply) in written {
                    metrics::audit_append(queued.elapsed().as_secs_f64());
                    let _ = reply.send(Ok(seq));
                }
            }
            Err(error) => {
                tracing::error!(%error, "audit write failed; refusing all further operations");
                self.failed.store(true, Ordering::SeqCst);
                (self.seq, self.hash) = (start_seq, start_hash);
                for (_, _, reply) in written {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }

    fn write_one(&mut self, event: Event) -> Result<(), AuditError> {
        let seq = self.seq + 1;
        let entry = Entry {
            seq,
            time: now_rfc3339(),
            prev: hex::encode(self.hash),
            event,
        };
        let bytes = serde_json::to_vec(&entry)
            .map_err(|e| AuditError::Unavailable(format!("encoding: {e}")))?;
        let hash = chain_hash(&self.hash, &bytes);
        let mut value = Vec::with_capacity(32 + bytes.len());
        value.extend_from_slice(&hash);
        value.extend_from_slice(&bytes);
        self.tree
            .insert(seq.to_be_bytes(), value)
            .map_err(|e| AuditError::Unavailable(format!("write: {e}")))?;
        self.seq = seq;
        self.hash = hash;
        self.since_checkpoint += 1;
        Ok(())
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

    /// Signs the head and appends the checkpoint record, durably.
    fn checkpoint(&mut self) -> Result<u64, AuditError> {
        if self.seq == 0 {
            return Err(AuditError::Unavailable("nothing to checkpoint yet".into()));
        }
        let (head_seq, head_hash) = (self.seq, self.hash);
        let signature = self.sign(checkpoint_message(head_seq, &head_hash).as_bytes());
        let signature = match signature {
            Ok(signature) => signature,
            Err(error) => {
                metrics::audit_checkpoint("failed");
                return Err(error);
            }
        };
        let (reply, _answer) = oneshot::channel();
        self.write_batch(vec![(
            Box::new(Event::Checkpoint {
                head_seq,
                head_hash: hex::encode(head_hash),
                signature: hex::encode(signature),
            }),
            Instant::now(),
            reply,
        )]);
        if self.failed.load(Ordering::SeqCst) {
            metrics::audit_checkpoint("failed");
            return Err(AuditError::Unavailable("checkpoint not durable".into()));
        }
        metrics::audit_checkpoint("ok");
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        Ok(self.seq)
    }

    fn sign_head(&mut self) -> Result<SignedHead, AuditError> {
        let time = now_rfc3339();
        let signature = self.sign(head_message(self.seq, &self.hash, &time).as_bytes())?;
        Ok(SignedHead {
            seq: self.seq,
            hash: self.hash,
            time,
            signature,
        })
    }

    fn sign(&mut self, message: &[u8]) -> Result<Vec<u8>, AuditError> {
        let digest = Sha256::digest(message);
        self.session
            .sign(
                &self.label,
                SignAlgorithm::EcdsaP256Sha256,
                SignInput::Digest(&digest),
                EcdsaEncoding::Der,
            )
            .map_err(|e| AuditError::Unavailable(format!("signing with the audit key: {e}")))
    }
}

/// The outcome of checking a chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records checked.
    pub records: u64,
    /// Checkpoints whose signature verified.
    pub checkpoints: u64,
    /// The last record's sequence number and hash.
    pub last_seq: u64,
    /// The last record's hash.
    pub last_hash: [u8; 32],
    /// The first bad record and what is wrong with it.
    pub first_bad: Option<(u64, String)>,
}

/// Checks a sequence of records from seq 1: numbering, links, hashes, and,
/// given the audit key, every checkpoint's signature.
pub fn verify_records(
    records: impl Iterator<Item = Result<Record, AuditError>>,
    audit_key_spki: Option<&[u8]>,
) -> VerifyReport {
    let key = audit_key_spki.map(p256::ecdsa::VerifyingKey::from_public_key_der);
    let mut report = VerifyReport::default();
    let mut hashes: std::collections::HashMap<u64, [u8; 32]> = Default::default();
    for item in records {
        let expected = report.last_seq + 1;
        let fail = |report: &mut VerifyReport, seq: u64, problem: String| {
            report.first_bad = Some((seq, problem));
        };
        let record = match item {
            Ok(record) => record,
            Err(AuditError::Corrupt { seq, problem }) => {
                fail(&mut report, seq.max(expected), problem);
                return report;
            }
            Err(e) => {
                fail(&mut report, expected, e.to_string());
                return report;
            }
        };
        if record.seq != expected {
            fail(
                &mut report,
                expected,
                format!("expected record {expected}, found {}", record.seq),
            );
            return report;
        }
        let entry: Entry = match serde_json::from_slice(&record.entry) {
            Ok(entry) => entry,
            Err(e) => {
                fail(&mut report, expected, format!("entry does not parse: {e}"));
                return report;
            }
        };
        if entry.seq != record.seq {
            fail(
                &mut report,
                expected,
                format!("entry says it is record {}", entry.seq),
            );
            return report;
        }
        if entry.prev != hex::encode(report.last_hash) {
            fail(
                &mut report,
                expected,
                "does not link to the previous record".into(),
            );
            return report;
        }
        if chain_hash(&report.last_hash, &record.entry) != record.hash {
            fail(
                &mut report,
                expected,
                "hash does not match its content".into(),
            );
            return report;
        }
        if let Event::Checkpoint {
            head_seq,
            head_hash,
            signature,
        } = &entry.event
        {
            let Some(head) = hashes
                .get(head_seq)
                .copied()
                .filter(|h| hex::encode(h) == *head_hash)
            else {
                fail(
                    &mut report,
                    expected,
                    format!(
                        "checkpoint names record {head_seq} with a hash that is not in the chain"
                    ),
                );
                return report;
            };
            if let Some(key) = &key {
                let message = checkpoint_message(*head_seq, &head);
                let valid = match (key, hex::decode(signature)) {
                    (Ok(key), Ok(signature)) => p256::ecdsa::Signature::from_der(&signature)
                        .is_ok_and(|s| key.verify(message.as_bytes(), &s).is_ok()),
                    _ => false,
                };
                if !valid {
                    fail(
                        &mut report,
                        expected,
                        "checkpoint signature does not verify with the audit key".into(),
                    );
                    return report;
                }
                report.checkpoints += 1;
            }
        }
        hashes.insert(record.seq, record.hash);
        report.records += 1;
        report.last_seq = record.seq;
        report.last_hash = record.hash;
    }
    report
}

/// Checks an export's closing head against the audit key and the chain: a
/// head that covers records the export lacks means the tail was cut.
pub fn verify_head(
    report: &VerifyReport,
    head: &SignedHead,
    audit_key_spki: &[u8],
) -> Result<(), String> {
    let key = p256::ecdsa::VerifyingKey::from_public_key_der(audit_key_spki)
        .map_err(|e| format!("audit key: {e}"))?;
    let signature = p256::ecdsa::Signature::from_der(&head.signature)
        .map_err(|e| format!("head signature: {e}"))?;
    key.verify(
        head_message(head.seq, &head.hash, &head.time).as_bytes(),
        &signature,
    )
    .map_err(|_| "head signature does not verify with the audit key".to_string())?;
    if head.seq != report.last_seq || head.hash != report.last_hash {
        return Err(format!(
            "the signed head covers record {} but the log ends at record {}: records were cut from the tail",
            head.seq, report.last_seq
        ));
    }
    Ok(())
}

/// One line of an exported log (JSON lines): a record, or the closing head.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportLine {
    /// A record.
    Record {
        /// Sequence number.
        seq: u64,
        /// The entry, exactly as hashed (it is UTF-8 JSON).
        entry: String,
        /// The record's hash, hex.
        hash: String,
    },
    /// The signed head, last.
    Head {
        /// Last sequence number.
        seq: u64,
        /// Last hash, hex.
        hash: String,
        /// Signing time.
        time: String,
        /// DER signature, hex.
        signature: String,
    },
}

impl ExportLine {
    /// The line for a record.
    pub fn record(record: &Record) -> Result<ExportLine, String> {
        Ok(ExportLine::Record {
            seq: record.seq,
            entry: String::from_utf8(record.entry.clone())
                .map_err(|_| format!("record {} is not UTF-8", record.seq))?,
            hash: hex::encode(record.hash),
        })
    }

    /// The line for a head.
    pub fn head(head: &SignedHead) -> ExportLine {
        ExportLine::Head {
            seq: head.seq,
            hash: hex::encode(head.hash),
            time: head.time.clone(),
            signature: hex::encode(&head.signature),
        }
    }
}

fn hash32(hex_hash: &str) -> Option<[u8; 32]> {
    hex::decode(hex_hash).ok()?.try_into().ok()
}

/// Verifies an exported log offline: the chain, every checkpoint, and the
/// closing head, all against `audit_key_spki`. Returns the report, or says
/// which line is bad.
pub fn verify_export(text: &str, audit_key_spki: &[u8]) -> Result<VerifyReport, String> {
    let mut records = Vec::new();
    let mut head = None;
    for (number, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        if head.is_some() {
            return Err(format!(
                "line {}: content after the closing head",
                number + 1
            ));
        }
        let parsed: ExportLine =
            serde_json::from_str(line).map_err(|e| format!("line {}: {e}", number + 1))?;
        match parsed {
            ExportLine::Record { seq, entry, hash } => {
                let hash = hash32(&hash).ok_or_else(|| format!("line {}: bad hash", number + 1))?;
                records.push(Ok(Record {
                    seq,
                    entry: entry.into_bytes(),
                    hash,
                }));
            }
            ExportLine::Head {
                seq,
                hash,
                time,
                signature,
            } => {
                head = Some(SignedHead {
                    seq,
                    hash: hash32(&hash)
                        .ok_or_else(|| format!("line {}: bad head hash", number + 1))?,
                    time,
                    signature: hex::decode(signature)
                        .map_err(|_| format!("line {}: bad head signature", number + 1))?,
                });
            }
        }
    }
    let report = verify_records(records.into_iter(), Some(audit_key_spki));
    if let Some((seq, problem)) = &report.first_bad {
        return Err(format!("record {seq}: {problem}"));
    }
    let head = head.ok_or("the export has no signed head: its tail may have been cut")?;
    verify_head(&report, &head, audit_key_spki)?;
    Ok(report)
}
