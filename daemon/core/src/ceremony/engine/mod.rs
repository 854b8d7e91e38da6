//! The ceremony engine: the state machine that runs a script step by step.
//!
//! Every step that touches the HSM follows one protocol, with a crash point
//! between each move (see [`CRASH_POINTS`]):
//!
//! 1. the step and the labels of the objects it will make are journaled and
//!    flushed (`before_intent` / `after_intent`);
//! 2. the PKCS#11 calls run (`after_hsm`);
//! 3. the result is journaled and flushed (`after_result`).
//!
//! A key is registered, and so usable, only by the final commit; until then
//! it is an HSM object the journal names and nothing else does. At start,
//! [`recover`] finishes what a crash interrupted: a ceremony whose commit
//! reached the registry is completed (roll forward); one that had made or
//! begun to make objects, or held secrets in memory, is rolled back (every
//! journaled object destroyed, idempotently); one still waiting for sign-ins
//! resumes where it was.
//!
//! One ceremony call runs at a time (the engine's lock); signing and other
//! requests go on meanwhile, except for the instant the token's security
//! officer makes a backup KEK, when the HSM pool and the audit writer pause.

mod backup;
mod crash_points;
mod custodians;
mod new_key;
mod signatures;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use hsm_shim::{
    AesRole, EcdsaEncoding, ErrorKind, Exportability, GcmCiphertext, Hsm, HsmConfig, HsmSession,
    KeyLabel, SecretSlice, SecretString, SignInput,
};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::Custody;
use crate::algorithms::KeyAlgorithm;
use crate::audit::Event;
use crate::ceremony::bundle::{self, Bundle, BundledKey};
use crate::ceremony::components::{ComponentCombiner, KeyBytes, XorInMemory};
use crate::ceremony::journal::{
    CeremonyRecord, Journal, JournaledObject, MadeKey, Phase, RestoreOutcome, TokenRole,
};
use crate::ceremony::script::{KekMode, Kind, Script};
use crate::ceremony::shares::{self, Share};
use crate::ceremony::transcript::Transcript;
use crate::failpoint;
use crate::registry::{KeyRecord, VersionRecord, VersionState};
use crate::{Error, Reason};
use backup::{back_up_new_kek, make_backup_kek};
use crash_points::{COMMIT, Points, RESTORE};
use new_key::{generate, import_components, self_sign};

pub use backup::{KeyToBack, check_aad, make_bundle};
pub use crash_points::CRASH_POINTS;
pub use custodians::{SubmittedSecret, collect_share, submit_secret};
pub use signatures::{confirm, confirmation_message, presence_message, sign_in};

/// The challenge each restored key pair signs.
pub fn restore_challenge(ceremony: &str, key_id: &str, version: u32) -> Vec<u8> {
    format!("custody-restore-challenge/v1\n{ceremony}\n{key_id}/{version}").into_bytes()
}

/// Secrets of one ceremony, in memory only.
#[derive(Default)]
struct Secrets {
    /// Shares not yet collected, by custodian.
    to_collect: BTreeMap<String, Share>,
    /// Components entered, by custodian.
    components: BTreeMap<String, KeyBytes>,
    /// Shares submitted for a restore.
    submitted: Vec<Share>,
}

/// The engine's state, part of the service [`Custody`].
pub struct Ceremonies {
    /// The journal.
    pub journal: Journal,
    lock: tokio::sync::Mutex<()>,
    secrets: Mutex<BTreeMap<String, Secrets>>,
    so_pin: Option<SecretString>,
    scratch: Option<HsmConfig>,
    combiner: Arc<dyn ComponentCombiner>,
}

impl Ceremonies {
    /// The engine over `journal`; `so_pin` makes backup KEKs possible,
    /// `scratch` DR drills.
    pub fn new(journal: Journal, so_pin: Option<SecretString>, scratch: Option<HsmConfig>) -> Self {
        Self {
            journal,
            lock: tokio::sync::Mutex::new(()),
            secrets: Mutex::new(BTreeMap::new()),
            so_pin,
            scratch,
            combiner: Arc::new(XorInMemory),
        }
    }

    fn secrets<T>(&self, id: &str, f: impl FnOnce(&mut Secrets) -> T) -> T {
        let mut all = self.secrets.lock().unwrap_or_else(PoisonError::into_inner);
        f(all.entry(id.to_string()).or_default())
    }

    fn forget(&self, id: &str) {
        self.secrets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// Key ids that unfinished ceremonies will create (CreateKey refuses
    /// them).
    pub fn reserved_key_ids(&self) -> Vec<String> {
        self.journal
            .unfinished()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|record| {
                record.key.map(|key| key.key_id).or_else(|| {
                    Script::parse(&record.script)
                        .ok()
                        .and_then(|script| script.key_id().map(str::to_string))
                })
            })
            .collect()
    }

    /// HSM labels unfinished ceremonies have journaled (drift detection
    /// expects them to be there or not), plus every backup KEK.
    pub fn expected_labels(&self) -> (Vec<String>, Vec<String>) {
        let in_flight = self
            .journal
            .unfinished()
            .unwrap_or_default()
            .into_iter()
            .flat_map(|record| record.objects.into_iter())
            .filter(|object| object.token == TokenRole::Main)
            .map(|object| object.label)
            .collect();
        (
            in_flight,
            self.journal.backup_kek_labels().unwrap_or_default(),
        )
    }
}

/// The journal could not be read or written.
pub fn journal_failure(e: impl std::fmt::Display) -> Error {
    Error::new(
        Reason::JournalUnavailable,
        format!("the ceremony journal could not be written: {e}"),
    )
}

fn script_of(record: &CeremonyRecord) -> Result<Script, Error> {
    Script::parse(&record.script).map_err(|e| {
        Error::new(
            Reason::JournalCorrupt,
            format!(
                "the journaled script of {} no longer parses: {e}",
                record.id
            ),
        )
    })
}

/// Ceremony `id` and its script, for a step allowed only in `phase`.
fn load_in(
    state: &Custody,
    id: &str,
    phase: Phase,
    reason: Reason,
    otherwise: &str,
) -> Result<(CeremonyRecord, Script), Error> {
    let record = found(state, id)?;
    if record.phase != phase {
        return Err(Error::new(reason, format!("ceremony {id} {otherwise}")));
    }
    let script = script_of(&record)?;
    Ok((record, script))
}

/// The ceremony `id`, or NOT_FOUND.
pub fn found(state: &Custody, id: &str) -> Result<CeremonyRecord, Error> {
    state
        .ceremonies
        .journal
        .get(id)
        .map_err(journal_failure)?
        .ok_or_else(|| Error::new(Reason::NotFound, format!("no ceremony ceremonies/{id}")))
}

/// Appends a transcript entry, anchors it in the audit log, and journals
/// the record. The audit record comes first: a step whose record cannot be
/// made durable does not count.
async fn note(
    state: &Custody,
    record: &mut CeremonyRecord,
    step: &str,
    actor: &str,
    summary: String,
    detail: Map<String, Value>,
) -> Result<(), Error> {
    let now = state.clock.now_ms();
    let entry = record
        .transcript
        .append(now, step, actor, &summary, detail)
        .clone();
    state
        .audit
        .append(Event::Ceremony {
            ceremony: format!("ceremonies/{}", record.id),
            entry: entry.seq,
            step: step.into(),
            actor: actor.into(),
            summary,
            entry_hash: entry.hash.clone(),
        })
        .await
        .map_err(|e| Error::audit_unavailable(&e))?;
    record.updated_ms = now;
    state
        .ceremonies
        .journal
        .put(record)
        .await
        .map_err(journal_failure)
}

async fn put(state: &Custody, record: &mut CeremonyRecord) -> Result<(), Error> {
    record.updated_ms = state.clock.now_ms();
    state
        .ceremonies
        .journal
        .put(record)
        .await
        .map_err(journal_failure)
}

/// Opens a ceremony. Checks everything that can be checked before anyone
/// signs in: the script, the officers and custodians, the key name, the
/// bundle of a restore, and what the daemon needs (SO PIN, scratch token).
pub async fn open(
    state: &Custody,
    opened_by: &str,
    script_text: String,
    bundle_text: String,
) -> Result<CeremonyRecord, Error> {
    let engine = &state.ceremonies;
    let _one_at_a_time = engine.lock.lock().await;
    let script = Script::parse(&script_text)
        .map_err(|e| Error::new(Reason::BadScript, format!("ceremony script: {e}")))?;
    if engine
        .journal
        .get(script.id())
        .map_err(journal_failure)?
        .is_some()
    {
        return Err(Error::new(
            Reason::CeremonyExists,
            format!(
                "ceremony {} exists already: give the script a new id",
                script.id()
            ),
        ));
    }
    for officer in script.participants() {
        if !state.dual_control.enrolled(officer) {
            return Err(Error::new(
                Reason::OfficerNotEnrolled,
                format!("the script names {officer}, who is not an enrolled officer"),
            ));
        }
    }
    if let Some(key_id) = script.key_id() {
        if state.registry.get(key_id).is_some()
            || engine.reserved_key_ids().iter().any(|k| k == key_id)
        {
            return Err(Error::new(
                Reason::KeyExists,
                format!("key {key_id} exists already or another open ceremony makes it"),
            ));
        }
    }
    let mut shares_needed = 0;
    let mut bundle_signer = None;
    match script.kind() {
        Kind::Kek {
            mode: KekMode::Generate { .. },
            ..
        } if engine.so_pin.is_none() => {
            return Err(Error::new(
                Reason::SoPinNotConfigured,
                "a KEK ceremony makes a trusted backup KEK, which needs the token security officer: set [ceremony] so_pin_file",
            ));
        }
        Kind::Restore {
            bundle_sha256,
            drill,
            ..
        } => {
            if Sha256::digest(bundle_text.as_bytes()).as_slice() != bundle_sha256.as_slice() {
                return Err(Error::new(
                    Reason::BundleMismatch,
                    "the bundle sent is not the one the script names (SHA-256 differs)",
                ));
            }
            let bundle = Bundle::parse(&bundle_text)
                .map_err(|e| Error::new(Reason::BadBundle, e.to_string()))?;
            bundle_signer = Some(bundle_signature_ok(state, &bundle)?);
            if *drill && engine.scratch.is_none() {
                return Err(Error::new(
                    Reason::NoScratchToken,
                    "a drill restores into the scratch token: set [ceremony] scratch_token_label and scratch_pin_file",
                ));
            }
            if !*drill {
                if let Some(key) = bundle
                    .manifest
                    .keys
                    .iter()
                    .find(|key| state.registry.get(&key.key_id).is_some())
                {
                    return Err(Error::new(
                        Reason::KeyExists,
                        format!(
                            "key {} is registered here already; restore into a token that lacks it, or drill",
                            key.key_id
                        ),
                    ));
                }
            }
            shares_needed = u32::from(bundle.manifest.backup_kek.threshold);
        }
        _ => {}
    }
    let now = state.clock.now_ms();
    let digest = script.digest();
    let mut record = CeremonyRecord {
        id: script.id().to_string(),
        kind: script.kind_name().to_string(),
        script: script_text,
        bundle: bundle_text,
        phase: Phase::AwaitingOfficers,
        opened_by: opened_by.to_string(),
        created_ms: now,
        updated_ms: now,
        present: Vec::new(),
        confirmed: Vec::new(),
        done: Vec::new(),
        objects: Vec::new(),
        key: None,
        backup_kek: None,
        shares_collected: Vec::new(),
        components: Vec::new(),
        shares_submitted: Vec::new(),
        shares_needed,
        backup_bundle: String::new(),
        restore: None,
        error: String::new(),
        transcript: Transcript::new(script.id(), script.kind_name(), &digest),
    };
    let mut detail = Map::new();
    detail.insert("ceremony".into(), json!(script.id()));
    detail.insert("kind".into(), json!(script.kind_name()));
    detail.insert("script_sha256".into(), json!(hex::encode(digest)));
    detail.insert("plan".into(), json!(script.plan()));
    if let Some(signed_by) = &bundle_signer {
        detail.insert("bundle_audit_key_sha256".into(), json!(signed_by));
    }
    let summary = format!(
        "{opened_by} opened the {} ceremony {}",
        record.kind, record.id
    );
    note(state, &mut record, "open", opened_by, summary, detail).await?;
    failpoint::hit("ceremony.open.after_journal");
    Ok(record)
}

/// Checks the manifest's signature and returns the SHA-256 of the audit key
/// that made it. A bundle this daemon made must verify with this daemon's
/// own audit key. A restore into a fresh daemon cannot know the source's
/// key: the signature then proves integrity only, and what ties the bundle
/// to its source is the `bundle_sha256` in the script the officers sign
/// (compared with the digest recorded when the backup was made) and the
/// signer's fingerprint, which the transcript records for them to compare.
fn bundle_signature_ok(state: &Custody, bundle: &Bundle) -> Result<String, Error> {
    let embedded = pem_to_der(&bundle.audit_key_pem)
        .map_err(|e| Error::new(Reason::BadBundle, format!("audit key: {e}")))?;
    let own = state.audit.audit_key_spki();
    let same_token = bundle.manifest.source_token
        == format!(
            "{} (serial {})",
            state.hsm.token().label,
            state.hsm.token().serial
        );
    let key = if same_token { own } else { embedded.as_slice() };
    bundle
        .verify(key)
        .map_err(|e| Error::new(Reason::BadBundle, e.to_string()))?;
    Ok(hex::encode(Sha256::digest(key)))
}

/// A PEM public key's DER.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, String> {
    use spki::der::{Decode, pem::PemLabel};
    let (label, der) = spki::der::pem::decode_vec(pem.as_bytes()).map_err(|e| e.to_string())?;
    if label != spki::SubjectPublicKeyInfoRef::PEM_LABEL {
        return Err(format!("expected a PUBLIC KEY PEM, found {label}"));
    }
    spki::SubjectPublicKeyInfoRef::from_der(&der).map_err(|e| e.to_string())?;
    Ok(der)
}

/// Runs the steps that need nothing more from people, then waits.
async fn advance(
    state: &Custody,
    record: &mut CeremonyRecord,
    script: &Script,
) -> Result<(), Error> {
    let outcome = run_steps(state, record, script).await;
    match outcome {
        Ok(()) => Ok(()),
        Err(error) if error.reason.is_unavailable() => {
            // The journal or the audit log failed: recording the roll-back
            // may fail the same way; the next start rolls it back.
            let _ = roll_back(state, record, Phase::RolledBack, &error.message).await;
            Err(error)
        }
        Err(error) => roll_back(state, record, Phase::RolledBack, &error.message).await,
    }
}

async fn run_steps(
    state: &Custody,
    record: &mut CeremonyRecord,
    script: &Script,
) -> Result<(), Error> {
    match script.kind() {
        Kind::RootKey { certificate, .. } => {
            if !record.did("generate") {
                generate(state, record, script).await?;
            }
            if let Some(certificate) = certificate {
                if !record.did("certificate") {
                    self_sign(state, record, script, certificate).await?;
                }
            }
            wait_for_confirmation(state, record).await
        }
        Kind::Kek {
            mode: KekMode::Generate { shares },
            ..
        } => {
            if !record.did("backup-kek") {
                make_backup_kek(state, record, shares.threshold, &shares.custodians).await?;
                record.phase = Phase::AwaitingShareCollection;
                return put(state, record).await;
            }
            if record.shares_collected.len() < shares.custodians.len() {
                return Ok(());
            }
            if !record.did("generate") {
                generate(state, record, script).await?;
            }
            if !record.did("backup") {
                back_up_new_kek(state, record).await?;
            }
            wait_for_confirmation(state, record).await
        }
        Kind::Kek {
            mode: KekMode::Components { custodians },
            ..
        } => {
            if record.components.len() < custodians.len() {
                if record.phase != Phase::AwaitingComponents {
                    record.phase = Phase::AwaitingComponents;
                    put(state, record).await?;
                }
                return Ok(());
            }
            if !record.did("import") {
                import_components(state, record, script).await?;
            }
            wait_for_confirmation(state, record).await
        }
        Kind::Restore { drill, .. } => {
            if (record.shares_submitted.len() as u32) < record.shares_needed {
                if record.phase != Phase::AwaitingShares {
                    record.phase = Phase::AwaitingShares;
                    put(state, record).await?;
                }
                return Ok(());
            }
            restore(state, record, *drill).await
        }
    }
}

async fn wait_for_confirmation(state: &Custody, record: &mut CeremonyRecord) -> Result<(), Error> {
    record.phase = Phase::AwaitingConfirmation;
    put(state, record).await
}

/// Journals that `labels` are about to be made, durably.
async fn intend(
    state: &Custody,
    record: &mut CeremonyRecord,
    step: &str,
    labels: &[(String, TokenRole)],
    points: &Points,
) -> Result<(), Error> {
    failpoint::hit(points.before_intent);
    record.phase = Phase::Running;
    for (label, token) in labels {
        record.objects.push(JournaledObject {
            label: label.clone(),
            token: *token,
            step: step.into(),
            made: false,
        });
    }
    put(state, record).await?;
    failpoint::hit(points.after_intent);
    Ok(())
}

fn mark_made(record: &mut CeremonyRecord, step: &str) {
    for object in record.objects.iter_mut().filter(|o| o.step == step) {
        object.made = true;
    }
}

/// Registers the key: from here it is usable.
async fn commit(
    state: &Custody,
    record: &mut CeremonyRecord,
    script: &Script,
) -> Result<(), Error> {
    let made = record
        .key
        .clone()
        .ok_or_else(|| Error::internal("nothing to commit"))?;
    intend(state, record, "commit", &[], &COMMIT).await?;
    let _registry = state.registry.lock().await;
    if state.registry.get(&made.key_id).is_some() {
        return Err(Error::new(
            Reason::KeyExists,
            format!("key {} appeared while the ceremony ran", made.key_id),
        ));
    }
    let now = state.clock.now_ms();
    let signers: Vec<String> = script.key().map(|k| k.signers.clone()).unwrap_or_default();
    state
        .registry
        .put(key_record(&made, signers, now))
        .await
        .map_err(|e| journal_failure(e.to_string()))?;
    failpoint::hit(COMMIT.after_hsm);
    finish_completed(state, record).await?;
    failpoint::hit(COMMIT.after_result);
    Ok(())
}

fn key_record(made: &MadeKey, allowed_signers: Vec<String>, now: i64) -> KeyRecord {
    KeyRecord {
        key_id: made.key_id.clone(),
        algorithm: made.algorithm.clone(),
        allowed_signers,
        primary_version: 1,
        versions: vec![VersionRecord {
            version: 1,
            state: VersionState::Active,
            created_ms: now,
            state_ms: now,
            hsm_label: made.hsm_label.clone(),
            public_key_der_hex: made.public_key_der_hex.clone(),
            public_key_pem: made.public_key_pem.clone(),
            activated_ms: Some(now),
            destroy_at_ms: None,
            legal_hold: None,
            check_value: made.check_value.clone(),
        }],
        created_ms: now,
        policies: BTreeMap::new(),
        cryptoperiod_ms: None,
        min_version: 0,
        rotation_requests: Vec::new(),
        backup_exportable: made.backup,
    }
}

/// Marks the ceremony completed, signs its transcript, and for a KEK
/// ceremony makes its backup KEK the token's.
async fn finish_completed(state: &Custody, record: &mut CeremonyRecord) -> Result<(), Error> {
    // Before anything journals the ceremony as completed: a completed KEK
    // ceremony whose backup KEK is not the token's would leave the KEK an
    // object nobody accounts for.
    if let Some(kek) = &record.backup_kek {
        state
            .ceremonies
            .journal
            .register_backup_kek(kek)
            .await
            .map_err(journal_failure)?;
    }
    record.phase = Phase::Completed;
    if !record.did("commit") {
        record.done.push("commit".into());
    }
    let summary = match &record.key {
        Some(key) => format!("{} registered and usable: ceremony completed", key.key_id),
        None => "ceremony completed".to_string(),
    };
    let mut detail = Map::new();
    if let Some(restore) = &record.restore {
        detail.insert("restore".into(), json!(restore));
    }
    seal_transcript(state, record, "commit", "completed", summary, detail).await?;
    put(state, record).await?;
    crate::metrics::ceremony_finished(&record.kind, "completed");
    Ok(())
}

/// The last entry, then the audit key's signature over the head.
async fn seal_transcript(
    state: &Custody,
    record: &mut CeremonyRecord,
    step: &str,
    outcome: &str,
    summary: String,
    detail: Map<String, Value>,
) -> Result<(), Error> {
    record.transcript.outcome = outcome.into();
    note(state, record, step, "custodyd", summary, detail).await?;
    sign_transcript(state, record).await
}

/// The audit key's signature over the transcript's head.
async fn sign_transcript(state: &Custody, record: &mut CeremonyRecord) -> Result<(), Error> {
    let signature = state
        .audit
        .sign_statement(record.transcript.signing_message())
        .await
        .map_err(|e| Error::audit_unavailable(&e))?;
    record
        .transcript
        .set_signature(&signature)
        .map_err(|e| Error::internal(e.to_string()))
}

/// Rebuilds the backup KEK from the submitted shares, unwraps every key of
/// the bundle, checks each against the manifest, and either registers them
/// (restore) or destroys them again (drill).
async fn restore(state: &Custody, record: &mut CeremonyRecord, drill: bool) -> Result<(), Error> {
    let started = Instant::now();
    let bundle =
        Bundle::parse(&record.bundle).map_err(|e| Error::new(Reason::BadBundle, e.to_string()))?;
    let submitted = state
        .ceremonies
        .secrets(&record.id, |secrets| std::mem::take(&mut secrets.submitted));
    // Refused here, before any HSM call: mixed sets, duplicates, too few,
    // and (by the digest inside every share) a wrong reconstruction.
    let value = shares::combine(&submitted)
        .map_err(|e| Error::new(Reason::SharesRefused, e.to_string()))?;
    drop(submitted);
    let prefix = if drill {
        format!("drill/{}", record.id)
    } else {
        "key".to_string()
    };
    let token = if drill {
        TokenRole::Scratch
    } else {
        TokenRole::Main
    };
    let mut labels = Vec::new();
    for key in &bundle.manifest.keys {
        labels.push((
            KeyLabel::for_version(&format!("{prefix}/{}", key.key_id), key.version)?,
            key,
        ));
    }
    let journaled: Vec<(String, TokenRole)> = labels
        .iter()
        .map(|(label, _)| (label.as_str().to_string(), token))
        .collect();
    intend(state, record, "restore", &journaled, &RESTORE).await?;
    let work = RestoreWork {
        ceremony: record.id.clone(),
        kek_value: SecretSlice::from(value.to_vec()),
        kek_kcv: bundle.manifest.backup_kek.kcv.clone(),
        keys: labels
            .iter()
            .map(|(label, key)| (label.clone(), (*key).clone()))
            .collect(),
        export: if drill {
            Exportability::NonExportable
        } else {
            Exportability::BackupWrapOnly
        },
        destroy_after: drill,
    };
    drop(value);
    let outcome = if drill {
        let config = state
            .ceremonies
            .scratch
            .clone()
            .ok_or_else(|| Error::new(Reason::NoScratchToken, "no scratch token configured"))?;
        tokio::task::spawn_blocking(move || {
            let scratch = Hsm::open(config)?;
            let mut session = scratch.session()?;
            work.run(&mut session)
        })
        .await
        .map_err(|_| Error::internal("drill panicked"))??
    } else {
        state.hsm.run(move |session| work.run(session)).await?
    };
    failpoint::hit(RESTORE.after_hsm);
    mark_made(record, "restore");
    let rto_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let report = RestoreOutcome {
        keys: u32::try_from(bundle.manifest.keys.len()).unwrap_or(u32::MAX),
        verified: outcome.verified,
        rto_ms,
        scratch_objects_destroyed: outcome.destroyed,
        drill,
    };
    record.restore = Some(report.clone());
    record.done.push("restore".into());
    let mut detail = Map::new();
    detail.insert("report".into(), json!(report));
    note(
        state,
        record,
        "verify",
        "custodyd",
        format!(
            "{} of {} keys unwrapped and verified against the manifest in {rto_ms} ms{}",
            report.verified,
            report.keys,
            if drill {
                format!(
                    "; {} scratch objects destroyed",
                    report.scratch_objects_destroyed
                )
            } else {
                String::new()
            }
        ),
        detail,
    )
    .await?;
    failpoint::hit(RESTORE.after_result);
    crate::metrics::restore_rto(drill, rto_ms as f64 / 1000.0);
    if drill {
        return finish_completed(state, record).await;
    }
    intend(state, record, "commit", &[], &COMMIT).await?;
    let _registry = state.registry.lock().await;
    let now = state.clock.now_ms();
    let records = restored_records(&labels, now);
    state
        .registry
        .put_all(records)
        .await
        .map_err(|e| journal_failure(e.to_string()))?;
    failpoint::hit(COMMIT.after_hsm);
    finish_completed(state, record).await?;
    failpoint::hit(COMMIT.after_result);
    Ok(())
}

/// The registry records of the restored versions, one per key: versions
/// in order, the highest active one primary (else the highest).
fn restored_records(restored: &[(KeyLabel, &BundledKey)], now: i64) -> Vec<KeyRecord> {
    let mut by_key: BTreeMap<&str, Vec<(&KeyLabel, &BundledKey)>> = BTreeMap::new();
    for (label, key) in restored {
        by_key
            .entry(key.key_id.as_str())
            .or_default()
            .push((label, *key));
    }
    by_key
        .into_values()
        .map(|mut versions| {
            versions.sort_by_key(|(_, key)| key.version);
            let first = versions[0].1;
            let records: Vec<VersionRecord> = versions
                .iter()
                .map(|(label, key)| restored_version(label, key, now))
                .collect();
            let primary = records
                .iter()
                .rev()
                .find(|v| v.state == VersionState::Active)
                .or(records.last())
                .map_or(1, |v| v.version);
            KeyRecord {
                key_id: first.key_id.clone(),
                algorithm: first.algorithm.clone(),
                allowed_signers: first.allowed_signers.clone(),
                primary_version: primary,
                versions: records,
                created_ms: now,
                policies: BTreeMap::new(),
                cryptoperiod_ms: None,
                min_version: 0,
                rotation_requests: Vec::new(),
                backup_exportable: true,
            }
        })
        .collect()
}

fn restored_version(label: &KeyLabel, key: &BundledKey, now: i64) -> VersionRecord {
    let public_key_der_hex = key.public_key_der.clone().unwrap_or_default();
    let public_key_pem = hex::decode(&public_key_der_hex)
        .ok()
        .and_then(|der| {
            spki::der::pem::encode_string("PUBLIC KEY", spki::der::pem::LineEnding::LF, &der).ok()
        })
        .unwrap_or_default();
    // A state the manifest names that this build does not know restores
    // suspended: usable again only by an officer's decision.
    let state: VersionState =
        serde_json::from_value(json!(key.state)).unwrap_or(VersionState::Suspended);
    VersionRecord {
        version: key.version,
        state,
        created_ms: now,
        state_ms: now,
        hsm_label: label.as_str().into(),
        public_key_der_hex,
        public_key_pem,
        activated_ms: (state == VersionState::Active).then_some(now),
        destroy_at_ms: None,
        legal_hold: None,
        // SoftHSM2 computes no check value for unwrapped keys; the bundle's
        // KCV stays in the manifest and the transcript.
        check_value: String::new(),
    }
}

/// What a restore does inside one HSM session (the backup KEK is a session
/// object and exists only there).
struct RestoreWork {
    ceremony: String,
    kek_value: SecretSlice<u8>,
    kek_kcv: String,
    keys: Vec<(KeyLabel, BundledKey)>,
    export: Exportability,
    destroy_after: bool,
}

struct RestoreDone {
    verified: u32,
    destroyed: u32,
}

impl RestoreWork {
    fn run(self, session: &mut HsmSession) -> hsm_shim::Result<RestoreDone> {
        let kek = KeyLabel::new(format!("restore-kek/{}", self.ceremony))?;
        let info = session.import_session_unwrap_kek(&kek, &self.kek_value)?;
        let outcome = self.unwrap_and_verify(session, &kek, info.check_value);
        // The session KEK goes with the session anyway; destroy it now.
        let _ = destroy_if_there(session, &kek);
        let verified = outcome?;
        let mut destroyed = 0;
        if self.destroy_after {
            for (label, _) in &self.keys {
                destroyed += u32::try_from(session.destroy(label)?).unwrap_or(u32::MAX);
            }
            // The scratch token must be left as it was found.
            let left = session
                .inventory()?
                .into_iter()
                .filter(|object| {
                    object
                        .label
                        .starts_with(&format!("drill/{}/", self.ceremony))
                })
                .count();
            if left > 0 {
                return Err(hsm_shim::HsmError::new(
                    ErrorKind::Internal,
                    format!("{left} drill objects are still on the scratch token"),
                ));
            }
        }
        Ok(RestoreDone {
            verified,
            destroyed,
        })
    }

    fn unwrap_and_verify(
        &self,
        session: &mut HsmSession,
        kek: &KeyLabel,
        kcv: Option<hsm_shim::KeyCheckValue>,
    ) -> hsm_shim::Result<u32> {
        let refuse = |what: String| hsm_shim::HsmError::new(ErrorKind::IntegrityFailure, what);
        if let Some(kcv) = kcv {
            if !kcv.to_string().eq_ignore_ascii_case(&self.kek_kcv) {
                return Err(refuse(format!(
                    "the rebuilt backup KEK has check value {kcv}, the bundle's has {}",
                    self.kek_kcv
                )));
            }
        }
        let mut verified = 0;
        for (label, key) in &self.keys {
            let algorithm = KeyAlgorithm::from_api_name(&key.algorithm)
                .ok_or_else(|| refuse(format!("unknown algorithm {}", key.algorithm)))?;
            let wrapped = hex::decode(&key.wrapped)
                .map_err(|_| refuse(format!("{}: wrapped key is not hex", key.key_id)))?;
            let spec = algorithm.key_spec();
            match (&key.public_key_der, algorithm.sign_algorithm()) {
                (Some(spki_hex), Some(sign_algorithm)) => {
                    let spki = hex::decode(spki_hex)
                        .map_err(|_| refuse(format!("{}: public key is not hex", key.key_id)))?;
                    session.unwrap_private_key(kek, &wrapped, label, spec, self.export)?;
                    session.import_public_key(label, &spki, spec)?;
                    let message = restore_challenge(&self.ceremony, &key.key_id, key.version);
                    let digest = sign_algorithm
                        .hash()
                        .map(|hash| crate::algorithms::hash_bytes(hash, &message));
                    let input = digest
                        .as_deref()
                        .map_or(SignInput::Message(&message), SignInput::Digest);
                    let signature =
                        session.sign(label, sign_algorithm, input, EcdsaEncoding::Der)?;
                    if !session.verify(
                        label,
                        sign_algorithm,
                        input,
                        &signature,
                        EcdsaEncoding::Der,
                    )? {
                        return Err(refuse(format!(
                            "{} v{}: the restored key's signature does not verify with the published public key",
                            key.key_id, key.version
                        )));
                    }
                }
                _ => {
                    let check = key
                        .check
                        .as_ref()
                        .ok_or_else(|| refuse(format!("{}: no check ciphertext", key.key_id)))?;
                    session.unwrap_aes_key(
                        kek,
                        &wrapped,
                        label,
                        AesRole::DataEncryption,
                        self.export,
                    )?;
                    let iv: [u8; 12] = hex::decode(&check.iv)
                        .ok()
                        .and_then(|iv| iv.try_into().ok())
                        .ok_or_else(|| refuse(format!("{}: bad check IV", key.key_id)))?;
                    let ciphertext = GcmCiphertext {
                        iv,
                        ciphertext_and_tag: hex::decode(&check.ciphertext)
                            .map_err(|_| refuse(format!("{}: bad check ciphertext", key.key_id)))?,
                    };
                    let plaintext = session.decrypt_gcm(
                        label,
                        &check_aad(&key.key_id, key.version),
                        &ciphertext,
                    )?;
                    if plaintext.as_slice() != bundle::CHECK_PLAINTEXT {
                        return Err(refuse(format!(
                            "{}: the check ciphertext decrypts to something else",
                            key.key_id
                        )));
                    }
                }
            }
            verified += 1;
        }
        Ok(verified)
    }
}

/// Undoes a ceremony: destroys every object it journaled (an object already
/// gone counts as destroyed), wipes its secrets, and records why.
async fn roll_back(
    state: &Custody,
    record: &mut CeremonyRecord,
    phase: Phase,
    why: &str,
) -> Result<(), Error> {
    state.ceremonies.forget(&record.id);
    let destroyed = destroy_objects(state, record).await?;
    record.phase = phase;
    record.error = why.to_string();
    let mut detail = Map::new();
    detail.insert("destroyed".into(), json!(destroyed));
    detail.insert("reason".into(), json!(why));
    let (step, outcome) = match phase {
        Phase::Aborted => ("aborted", "aborted"),
        _ => ("rolled-back", "rolled-back"),
    };
    seal_transcript(
        state,
        record,
        step,
        outcome,
        format!(
            "ceremony {outcome}: {why}; {} HSM objects destroyed",
            destroyed.len()
        ),
        detail,
    )
    .await?;
    put(state, record).await?;
    crate::metrics::ceremony_finished(&record.kind, outcome);
    Ok(())
}

async fn destroy_objects(state: &Custody, record: &CeremonyRecord) -> Result<Vec<String>, Error> {
    let main: Vec<KeyLabel> = labels_in(record, TokenRole::Main)?;
    let scratch: Vec<KeyLabel> = labels_in(record, TokenRole::Scratch)?;
    let mut destroyed = Vec::new();
    if !main.is_empty() {
        let gone = state
            .hsm
            .run(move |session| {
                let mut gone = Vec::new();
                for label in main {
                    if destroy_if_there(session, &label)? {
                        gone.push(label.as_str().to_string());
                    }
                }
                Ok(gone)
            })
            .await?;
        destroyed.extend(gone);
    }
    if !scratch.is_empty() {
        if let Some(config) = state.ceremonies.scratch.clone() {
            let count = scratch.len();
            let cleaned = tokio::task::spawn_blocking(move || {
                let scratch_hsm = Hsm::open(config)?;
                let mut session = scratch_hsm.session()?;
                let mut gone = Vec::new();
                for label in scratch {
                    if destroy_if_there(&mut session, &label)? {
                        gone.push(format!("scratch:{}", label.as_str()));
                    }
                }
                // A kill inside an unwrap can leave a nameless object; the
                // scratch token holds nothing else of value.
                for _ in 0..session.destroy_unnamed()? {
                    gone.push("scratch:(torn object without label)".into());
                }
                Ok::<_, hsm_shim::HsmError>(gone)
            })
            .await
            .map_err(|_| Error::internal("scratch clean-up panicked"))?;
            match cleaned {
                Ok(gone) => destroyed.extend(gone),
                // The scratch token holds drill copies only: custodyd goes on
                // without it, and says so in the transcript.
                Err(error) => {
                    tracing::error!(%error, count, "could not clean the scratch token");
                    destroyed.push(format!(
                        "scratch token unavailable ({error}): {count} journaled objects not destroyed there"
                    ));
                }
            }
        }
    }
    Ok(destroyed)
}

/// Destroys what is labelled `label`; an object already gone is fine (a
/// roll-back may run twice, or after a call that never made it).
fn destroy_if_there(session: &mut HsmSession, label: &KeyLabel) -> hsm_shim::Result<bool> {
    match session.destroy(label) {
        Ok(count) => Ok(count > 0),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn labels_in(record: &CeremonyRecord, token: TokenRole) -> Result<Vec<KeyLabel>, Error> {
    record
        .objects
        .iter()
        .filter(|o| o.token == token)
        .map(|o| KeyLabel::new(o.label.clone()).map_err(Error::from))
        .collect()
}

/// An officer of the quorum stops an unfinished ceremony.
pub async fn abort(
    state: &Custody,
    id: &str,
    officer: &str,
    reason: &str,
) -> Result<CeremonyRecord, Error> {
    let _one_at_a_time = state.ceremonies.lock.lock().await;
    let mut record = found(state, id)?;
    let script = script_of(&record)?;
    if !script.quorum().officers.iter().any(|o| o == officer) {
        return Err(Error::new(
            Reason::NotInQuorum,
            format!("only an officer of the ceremony's quorum may abort it; {officer} is not"),
        ));
    }
    if record.phase.finished() {
        return Err(Error::new(
            Reason::Finished,
            format!("ceremony {id} is over"),
        ));
    }
    roll_back(
        state,
        &mut record,
        Phase::Aborted,
        &format!("aborted by {officer}: {reason}"),
    )
    .await?;
    Ok(record)
}

/// At start: rolls forward ceremonies whose commit reached the registry,
/// rolls back those that made (or began to make) objects or held secrets,
/// and lets those still signing in resume. Returns how many it rolled back.
pub async fn recover(state: &Custody) -> Result<usize, String> {
    let mut rolled_back = 0;
    for mut record in state.ceremonies.journal.list().map_err(|e| e.to_string())? {
        if record.phase.finished() {
            if record.transcript.signature.is_empty() {
                // Killed between the last entry and its signature.
                sign_transcript(state, &mut record)
                    .await
                    .map_err(|e| e.message)?;
                put(state, &mut record).await.map_err(|e| e.message)?;
            }
            continue;
        }
        if committed(state, &record) {
            tracing::warn!(ceremony = %record.id, "ceremony committed before a crash: completing it");
            finish_completed(state, &mut record)
                .await
                .map_err(|e| e.message)?;
            continue;
        }
        let resumable = record.phase == Phase::AwaitingOfficers
            || (record.objects.is_empty()
                && matches!(
                    record.phase,
                    Phase::AwaitingComponents | Phase::AwaitingShares
                ));
        if resumable {
            if !record.components.is_empty() || !record.shares_submitted.is_empty() {
                // What custodians entered was in memory only.
                record.components.clear();
                record.shares_submitted.clear();
                note(
                    state,
                    &mut record,
                    "resumed",
                    "custodyd",
                    "custodyd restarted: components or shares entered before must be entered again"
                        .into(),
                    Map::new(),
                )
                .await
                .map_err(|e| e.message)?;
            }
            continue;
        }
        tracing::warn!(ceremony = %record.id, phase = ?record.phase, "rolling back a ceremony a crash interrupted");
        roll_back(
            state,
            &mut record,
            Phase::RolledBack,
            "custodyd stopped in the middle of the ceremony",
        )
        .await
        .map_err(|e| e.message)?;
        rolled_back += 1;
    }
    Ok(rolled_back)
}

/// Whether the ceremony's commit reached the registry: its key is
/// registered under the label the ceremony journaled (a restore: all of its
/// keys, which one batch registers).
fn committed(state: &Custody, record: &CeremonyRecord) -> bool {
    let registered = |key_id: &str, label: &str| {
        state
            .registry
            .get(key_id)
            .is_some_and(|key| key.versions.iter().any(|v| v.hsm_label == label))
    };
    match &record.key {
        Some(made) => registered(&made.key_id, &made.hsm_label),
        None if record.kind == "restore" && record.did("restore") => {
            let main: Vec<&JournaledObject> = record
                .objects
                .iter()
                .filter(|o| o.token == TokenRole::Main)
                .collect();
            !main.is_empty()
                && main.iter().all(|o| {
                    // Restored labels are key/{key_id}/v{n}.
                    o.label
                        .strip_prefix("key/")
                        .and_then(|rest| rest.rsplit_once('/'))
                        .is_some_and(|(key_id, _)| registered(key_id, &o.label))
                })
        }
        None => false,
    }
}
