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
//! A generated key is made by the protocol CreateKey and rotation use
//! ([`crate::keys::generation`]), with this journal recording its intent and
//! the step's crash points as its own.
//!
//! A key is registered, and so usable, only by the final commit; until then
//! it is an HSM object the journal names and nothing else does. At start,
//! [`recover`] finishes what a stop (a crash, a kill or SIGTERM) interrupted: a ceremony whose commit
//! reached the registry is completed (roll forward); one that had made or
//! begun to make objects, or held secrets in memory, is rolled back (every
//! journaled object destroyed, idempotently); one still waiting for sign-ins
//! resumes where it was.
//!
//! One ceremony call runs at a time, across replicas too (the engine's
//! lock, a store claim); signing and other requests go on meanwhile, except for the instant the token's security
//! officer makes a backup KEK, when the HSM pool and the audit writer pause.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | opening, advancing and aborting a ceremony; the journal and transcript helpers every step uses |
//! | `crash_points.rs` | the named crash points of every journaled step |
//! | `signatures.rs` | officers signing in and confirming the fingerprint |
//! | `new_key.rs` | the new key made in the HSM: generated (by the keys' generation protocol, journaled here), imported from components, self-certified |
//! | `custodians.rs` | shares handed out, components and restore shares handed in |
//! | `backup.rs` | the backup KEK and backup bundles |
//! | `restore.rs` | restores and DR drills |
//! | `certify.rs` | an intermediate ceremony: the TBS built and linted, signed once confirmed, the chain stored |
//! | `crl.rs` | a crl ceremony: the CRL number taken, the TBS built and linted, signed once confirmed |
//! | `destruction.rs` | a key-destruction ceremony: approved, scheduled versions reserved, their manifest confirmed, destroyed, their absence verified |
//! | `commit.rs` | the key registered and the ceremony completed |
//! | `roll_back.rs` | a failed or aborted ceremony's objects destroyed |
//! | `recovery.rs` | what happens after a stop, at start or on the leader while others run: roll forward, roll back or resume |
//! | `export.rs` | a backup bundle of the live registry's backup-exportable keys |
//!
//! What the engine keeps between steps (the journal, secrets in memory) is
//! [`crate::ceremony::state::Ceremonies`], part of [`Custody`]. Secrets stay
//! in the process they entered: the journal names it, and the steps that
//! touch them run there ([`secrets_here`]); what a stopped process held is
//! settled by [`recovery`] at start, or by the leader ([`take_over`]).

mod backup;
mod certify;
mod commit;
mod crash_points;
mod crl;
mod custodians;
mod destruction;
mod new_key;
mod recovery;
mod restore;
mod roll_back;
mod signatures;
mod status;

pub mod export;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::Custody;
use crate::audit::Event;
use crate::ceremony::bundle::Bundle;
use crate::ceremony::journal::{CeremonyRecord, JournaledObject, Phase, SecretsHolder, TokenRole};
use crate::ceremony::script::{KekMode, Kind, Script};
use crate::ceremony::transcript::Transcript;
use crate::failpoint;
use crate::{Error, Reason};
use backup::{back_up_new_kek, make_backup_kek};
use commit::{policies_at_open, policies_detail, policies_summary};
use crash_points::Points;
use new_key::{generate, import_components, self_sign};
use restore::{bundle_signature_ok, restore, restored_label};
use roll_back::roll_back;

pub use backup::{KeyToBack, check_aad, make_bundle};
pub use crash_points::CRASH_POINTS;
pub use custodians::{SubmittedSecret, collect_share, submit_secret};
pub use recovery::{PreviousStop, recover, take_over};
pub use restore::restore_challenge;
pub use signatures::{confirm, confirmation_message, presence_message, sign_in};
pub use status::waiting_for;

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

/// The name of an unfinished ceremony that names `officer_id`, if one
/// does: among the officers who may sign in or hold a secret, in the
/// policies its key is registered under at the commit, or in the policies
/// of a restore's bundle. Until it finishes, whoever is enrolled under the
/// id then would take that place (threat model D7).
pub fn open_ceremony_naming(state: &Custody, officer_id: &str) -> Result<Option<String>, Error> {
    for record in state
        .ceremonies
        .journal
        .unfinished()
        .map_err(journal_failure)?
    {
        let script = script_of(&record).ok();
        let in_script = script
            .as_ref()
            .is_some_and(|s| s.participants().contains(&officer_id));
        // A drill registers nothing: its bundle's policies take no place.
        let drill = script
            .as_ref()
            .is_some_and(|s| matches!(s.kind(), Kind::Restore { drill: true, .. }));
        let in_key_policies = record
            .key_policies
            .iter()
            .flat_map(|policies| policies.values())
            .any(|quorum| quorum.contains(officer_id));
        let in_bundle = !drill
            && !record.bundle.is_empty()
            && Bundle::parse(&record.bundle).is_ok_and(|bundle| {
                bundle
                    .manifest
                    .protections
                    .iter()
                    .flat_map(|key| key.policies.values())
                    .any(|policy| policy.officers.iter().any(|o| o == officer_id))
            });
        if in_script || in_key_policies || in_bundle {
            return Ok(Some(format!("ceremonies/{}", record.id)));
        }
    }
    Ok(None)
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
    write(state, record).await
}

async fn put(state: &Custody, record: &mut CeremonyRecord) -> Result<(), Error> {
    record.updated_ms = state.clock.now_ms();
    write(state, record).await
}

/// Journals `record`, naming this process as its holder while its progress
/// lives in this process's memory: in the middle of a step, or with secrets
/// entered or to hand out. Only the engine's lock holder writes, and a
/// step that touches another process's secrets is refused first
/// ([`secrets_here`]), so the writer is that process.
async fn write(state: &Custody, record: &mut CeremonyRecord) -> Result<(), Error> {
    record.secrets_held_by = record.held_in_memory().then(|| SecretsHolder {
        replica: state.shared.holder().to_string(),
        instance: state.shared.instance().to_string(),
    });
    state
        .ceremonies
        .journal
        .put(record)
        .await
        .map_err(journal_failure)
}

/// One ceremony call at a time, across replicas: the engine's lock, a store
/// claim held until the guard drops.
async fn one_at_a_time(state: &Custody) -> Result<custody_store::Claim, Error> {
    state
        .shared
        .lock_ceremonies()
        .await
        .map_err(|e| unreachable_store("the ceremony engine's lock", e))
}

/// The store could not be read for `what`: nothing was done.
fn unreachable_store(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(
        Reason::JournalUnavailable,
        format!("{what} cannot be read: {e}"),
    )
}

/// Refuses a step that touches the ceremony's secrets (collecting a share,
/// handing in a component or share, aborting) unless they are in this
/// process's memory or in none. Secrets never reach the store, so while
/// the replica holding them runs, the step belongs there; once it is gone
/// they went with it, and the ceremony is settled as a restart settles it
/// ([`recovery::settle_lost`]) before the step goes on here.
async fn secrets_here(state: &Custody, record: &mut CeremonyRecord) -> Result<(), Error> {
    let Some(holder) = record.secrets_held_by.clone() else {
        return Ok(());
    };
    if holder.instance == state.shared.instance() {
        return Ok(());
    }
    let alive = state
        .shared
        .alive(&holder.instance)
        .map_err(|e| unreachable_store("which replicas are running", e))?;
    if alive {
        return Err(Error::new(
            Reason::SecretsElsewhere,
            format!(
                "ceremony {} keeps its secrets in the memory of replica {}, never in the store: collect, hand in or abort there",
                record.id, holder.replica
            ),
        ));
    }
    recovery::settle_lost(state, record, &holder).await?;
    if record.phase.finished() {
        return Err(Error::new(
            Reason::Finished,
            format!("ceremony {} is over: {}", record.id, record.error),
        ));
    }
    Ok(())
}

/// What an intermediate or cross-sign ceremony certifies from outside
/// custody, sent with its start: a CSR's or a certificate's bytes, as
/// reviewed (empty when the script names none).
#[derive(Debug, Clone, Default)]
pub struct Outside {
    /// `[intermediate] csr_sha256`'s PKCS#10 file.
    pub csr: Vec<u8>,
    /// `[cross_sign] certificate_sha256`'s certificate file.
    pub certificate: Vec<u8>,
}

/// Opens a ceremony. Checks everything that can be checked before anyone
/// signs in: the script, the officers and custodians, the key name, the
/// bundle of a restore, and what the daemon needs (SO PIN, scratch token).
pub async fn open(
    state: &Custody,
    opened_by: &str,
    script_text: String,
    bundle_text: String,
    outside: Outside,
) -> Result<CeremonyRecord, Error> {
    let Outside { csr, certificate } = outside;
    let engine = &state.ceremonies;
    let _one_at_a_time = one_at_a_time(state).await?;
    engine.check_open_cap(opened_by, state.limits.max_open_ceremonies_per_officer)?;
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
    let admin = crate::authz::admin_quorum(state)?;
    script
        .check_admin_quorum(admin.required)
        .map_err(|e| Error::new(Reason::BadScript, format!("ceremony script: {e}")))?;
    script
        .check_holders()
        .map_err(|e| Error::new(Reason::BadScript, format!("ceremony script: {e}")))?;
    let mut reserved_key_ids: Vec<String> = script.key_id().into_iter().map(Into::into).collect();
    let key_policies = policies_at_open(state, &script)?;
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
            audit_key_sha256,
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
            bundle_signer = Some(bundle_signature_ok(
                state,
                &bundle,
                audit_key_sha256.as_ref(),
            )?);
            if *drill && engine.scratch.is_none() {
                return Err(Error::new(
                    Reason::NoScratchToken,
                    "a drill restores into the scratch token: set [ceremony] scratch_token_label and scratch_pin_file",
                ));
            }
            if !*drill {
                restore::ids_held_by_the_same(state, &bundle)?;
                for key in &bundle.manifest.keys {
                    restored_label(script.id(), &key.key_id, key.version)?;
                    if !reserved_key_ids.contains(&key.key_id) {
                        reserved_key_ids.push(key.key_id.clone());
                    }
                }
            }
            shares_needed = u32::from(bundle.manifest.backup_kek.threshold);
        }
        Kind::Intermediate { .. } => {
            certify::check_open(state, &script)?;
            certify::check_csr(state, &script, &csr)?;
            certify::check_source(state, &script, &certificate)?;
        }
        Kind::Crl(_) => crl::check_open(state, &script)?,
        Kind::KeyDestruction(_) => destruction::check_open(state, &script)?,
        _ => {}
    }
    // Held until the record, and with it the reservation, is journaled: no
    // CreateKey and no other ceremony takes one of these ids in between.
    let registry = crate::keys::lock(state).await?;
    for key_id in &reserved_key_ids {
        crate::keys::ensure_key_id_free(state, key_id).map_err(|e| match script.kind() {
            Kind::Restore { .. } => Error::new(
                e.reason,
                format!(
                    "{}; restore into a token that lacks it, or drill",
                    e.message
                ),
            ),
            _ => e,
        })?;
    }
    let now = state.clock.now_ms();
    let digest = script.digest();
    let mut record = CeremonyRecord {
        id: script.id().to_string(),
        kind: script.kind_name().to_string(),
        script: script_text,
        bundle: bundle_text,
        csr_hex: hex::encode(&csr),
        certificate_hex: hex::encode(&certificate),
        phase: Phase::AwaitingOfficers,
        opened_by: opened_by.to_string(),
        created_ms: now,
        updated_ms: now,
        revision: 0,
        secrets_held_by: None,
        present: Vec::new(),
        confirmed: Vec::new(),
        done: Vec::new(),
        objects: Vec::new(),
        reserved_key_ids,
        key: None,
        certification: None,
        destruction: None,
        key_policies,
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
    let mut summary = format!(
        "{opened_by} opened the {} ceremony {}",
        record.kind, record.id
    );
    if let (Some(key), Some(policies)) = (script.key(), &record.key_policies) {
        detail.insert("key_policies".into(), policies_detail(key, policies));
        summary.push_str(&format!(
            "; {} will be registered under {}",
            key.name,
            policies_summary(key, policies)
        ));
    }
    note(state, &mut record, "open", opened_by, summary, detail).await?;
    failpoint::hit("ceremony.open.after_journal");
    drop(registry);
    if let Kind::KeyDestruction(_) = script.kind() {
        // Journaled first: a reservation never outlives its ceremony.
        if let Err(error) = destruction::reserve(state, &script).await {
            roll_back(state, &mut record, Phase::RolledBack, &error.message).await?;
            return Err(error);
        }
    }
    Ok(record)
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
        // The commit reached the registry: what it registered is served
        // now, and a roll-back would destroy it with no approval (threat
        // model I2). It stands; the ceremony is completed by the schedule's
        // next tick or the next start, as after a kill at this point, and
        // a transcript left unsigned is signed at the next start.
        Err(error) if record.phase.finished() || recovery::committed(state, record) => {
            tracing::error!(ceremony = %record.id, reason = %error.reason, "a committed ceremony's last steps failed: what it registered stands, and it is completed later");
            Err(error)
        }
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
        Kind::Intermediate { stage, .. } => {
            if *stage && !record.did("stage") {
                certify::stage(state, record, script).await?;
            }
            if !record.did("tbs") {
                certify::prepare_tbs(state, record, script).await?;
            }
            wait_for_confirmation(state, record).await
        }
        Kind::Crl(_) => {
            if !record.did("tbs") {
                crl::prepare_tbs(state, record, script).await?;
            }
            wait_for_confirmation(state, record).await
        }
        Kind::KeyDestruction(_) => {
            if !record.did("manifest") {
                destruction::manifest(state, record, script).await?;
            }
            wait_for_confirmation(state, record).await
        }
    }
}

async fn wait_for_confirmation(state: &Custody, record: &mut CeremonyRecord) -> Result<(), Error> {
    record.phase = Phase::AwaitingConfirmation;
    put(state, record).await
}

/// Journals that `labels` are about to be made, durably, between the
/// step's first two crash points; a main-token label an object already has
/// is refused first, so that the roll-back, which destroys what the
/// journaled labels hold, destroys only what this ceremony made.
async fn intend(
    state: &Custody,
    record: &mut CeremonyRecord,
    step: &str,
    labels: &[(String, TokenRole)],
    points: &Points,
) -> Result<(), Error> {
    let main = labels
        .iter()
        .filter(|(_, token)| *token == TokenRole::Main)
        .map(|(label, _)| hsm_shim::KeyLabel::new(label.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    if !main.is_empty() {
        crate::keys::generation::refuse_labels_in_use(state, main).await?;
    }
    failpoint::hit(points.before_intent);
    journal_objects(state, record, step, labels).await?;
    failpoint::hit(points.after_intent);
    Ok(())
}

/// Journals that `labels` are about to be made, durably; the crash points
/// around it are the caller's (a key generation's are the generation
/// protocol's).
async fn journal_objects(
    state: &Custody,
    record: &mut CeremonyRecord,
    step: &str,
    labels: &[(String, TokenRole)],
) -> Result<(), Error> {
    record.phase = Phase::Running;
    for (label, token) in labels {
        record.objects.push(JournaledObject {
            label: label.clone(),
            token: *token,
            step: step.into(),
            made: false,
        });
    }
    put(state, record).await
}

fn mark_made(record: &mut CeremonyRecord, step: &str) {
    for object in record.objects.iter_mut().filter(|o| o.step == step) {
        object.made = true;
    }
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

/// An officer of the quorum stops an unfinished ceremony, saying why
/// (printable text, capped: [`crate::text::reason`]).
pub async fn abort(
    state: &Custody,
    id: &str,
    officer: &str,
    reason: &str,
) -> Result<CeremonyRecord, Error> {
    let reason = crate::text::reason(reason)?;
    if reason.is_empty() {
        return Err(Error::new(
            Reason::ReasonRequired,
            "say why the ceremony is aborted",
        ));
    }
    let _one_at_a_time = one_at_a_time(state).await?;
    let mut record = found(state, id)?;
    let script = script_of(&record)?;
    if !script.quorum().contains(officer) {
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
    secrets_here(state, &mut record).await?;
    roll_back(
        state,
        &mut record,
        Phase::Aborted,
        &format!("aborted by {officer}: {reason}"),
    )
    .await?;
    Ok(record)
}
