//! A key-destruction ceremony: officers witness the carrying-out of an
//! approved, scheduled destruction (WebTrust for CAs 4.6). The rules of
//! destruction stay where they are ([`crate::keys::check_reservable`],
//! [`crate::keys::check_due`], [`crate::authz::ceremony_quorum_covers`]);
//! the ceremony asks them at each step:
//!
//! - open: each version reservable (scheduled by an approved
//!   DESTROY_VERSION, not cancelled, not held, out of use: a retired
//!   key's last primary included, threat model C29), the
//!   quorum covering the key's DESTROY_VERSION policy; once journaled the
//!   versions are reserved in the registry, so the scheduler leaves them;
//! - `manifest` (quorum signed in): each version due (cancel window over),
//!   the manifest journaled for the officers to confirm its SHA-256;
//! - `destroy` (all confirmed): everything again with the state then in
//!   force, under the registry lock held to the end of the step, so a
//!   CancelDestroy or a legal hold issued meanwhile wins (the ceremony
//!   rolls back); then per object: intent journaled, C_DestroyObject,
//!   done journaled; the token inventoried for any object left with those
//!   labels or ids; the versions recorded destroyed.
//!
//! A roll-back or abort clears the reservation: the approved destruction
//! is the scheduler's again. Once an object's destruction is journaled as
//! about to happen, a stop finishes the ceremony instead (an absent object
//! counts as destroyed).

use hsm_shim::KeyLabel;
use serde_json::{Map, json};

use super::commit::finish_completed;
use super::crash_points::{DESTROY, MANIFEST};
use super::roll_back::destroy_if_there;
use super::{intend, journal_failure, note, put};
use crate::Custody;
use crate::ceremony::bundle::Bundle;
use crate::ceremony::destruction::{self, Destruction};
use crate::ceremony::journal::{CeremonyRecord, Phase};
use crate::ceremony::script::{DestructionSection, Kind, Script};
use crate::failpoint;
use crate::keys::{self, Carrier};
use crate::{Error, Reason};

fn section(script: &Script) -> Result<&DestructionSection, Error> {
    match script.kind() {
        Kind::KeyDestruction(section) => Ok(section),
        _ => Err(Error::internal("not a key-destruction ceremony")),
    }
}

/// What a key-destruction ceremony needs when it opens.
pub(super) fn check_open(state: &Custody, script: &Script) -> Result<(), Error> {
    let section = section(script)?;
    let key = keys::found(state, &section.key)?;
    for version in &section.versions {
        keys::check_reservable(state, &key, *version, Carrier::Ceremony(script.id()))?;
    }
    crate::authz::ceremony_quorum_covers(
        &key,
        "DESTROY_VERSION",
        script.quorum(),
        script.officers(),
    )
}

/// Reserves the script's versions for the ceremony (at open, and again,
/// idempotently, at the manifest: a stop between the open's journal and
/// its reservation leaves none).
pub(super) async fn reserve(state: &Custody, script: &Script) -> Result<(), Error> {
    let section = section(script)?;
    keys::reserve_for_ceremony(state, &section.key, &section.versions, script.id()).await?;
    Ok(())
}

/// Clears the ceremony's reservation (roll-back, abort); nothing for
/// other kinds.
pub(super) async fn release(state: &Custody, record: &CeremonyRecord) -> Result<(), Error> {
    let Ok(script) = Script::parse(&record.script) else {
        return Ok(());
    };
    if let Kind::KeyDestruction(section) = script.kind() {
        keys::release_ceremony_reservation(state, &section.key, &record.id).await?;
    }
    Ok(())
}

/// Step `manifest`: each version due and reserved by this ceremony; the
/// manifest journaled with its SHA-256 for the officers to confirm.
pub(super) async fn manifest(
    state: &Custody,
    record: &mut CeremonyRecord,
    script: &Script,
) -> Result<(), Error> {
    let section = section(script)?;
    intend(state, record, "manifest", &[], &MANIFEST).await?;
    reserve(state, script).await?;
    let key = keys::found(state, &section.key)?;
    let mut versions = Vec::new();
    for version in &section.versions {
        versions.push(keys::check_due(
            state,
            &key,
            *version,
            Carrier::Ceremony(&record.id),
        )?);
    }
    crate::authz::ceremony_quorum_covers(
        &key,
        "DESTROY_VERSION",
        script.quorum(),
        script.officers(),
    )?;
    let operations = state
        .dual_control
        .operations()
        .map_err(|e| Error::new(Reason::JournalUnavailable, e))?;
    let made = destruction::manifest(&record.id, &key, &versions, &operations);
    failpoint::hit(MANIFEST.after_hsm);
    let digest = made.manifest_sha256.clone();
    let mut detail = Map::new();
    detail.insert("manifest_sha256".into(), json!(digest));
    detail.insert(
        "manifest".into(),
        serde_json::from_str(&made.manifest).unwrap_or_default(),
    );
    record.destruction = Some(made);
    record.done.push("manifest".into());
    note(
        state,
        record,
        "manifest",
        "custodyd",
        format!(
            "the manifest of {} {} journaled (SHA-256 {digest}): each version scheduled by an approved DESTROY_VERSION, its cancel window over, not held; nothing destroyed yet",
            section.key,
            list(&section.versions)
        ),
        detail,
    )
    .await?;
    failpoint::hit(MANIFEST.after_result);
    Ok(())
}

fn list(versions: &[u32]) -> String {
    versions
        .iter()
        .map(|v| format!("v{v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Steps `destroy` and `commit`, once every officer who signed in
/// confirmed the manifest's SHA-256 (or after a stop once the destroy
/// step had begun).
pub(super) async fn destroy_and_complete(
    state: &Custody,
    record: &mut CeremonyRecord,
    script: &Script,
) -> Result<(), Error> {
    if !record.did("destroy") {
        destroy(state, record, script).await?;
    }
    finish_completed(state, record).await
}

async fn destroy(
    state: &Custody,
    record: &mut CeremonyRecord,
    script: &Script,
) -> Result<(), Error> {
    let mut made = record
        .destruction
        .clone()
        .ok_or_else(|| Error::internal("no manifest to destroy"))?;
    // Held to the end of the step: a CancelDestroy or a legal hold comes
    // before the re-check (and wins) or after the versions are destroyed.
    let (_registry, key) = keys::locked(state, &made.key_id).await?;
    if !made.begun() {
        // The state in force now: a hold, a cancellation or a tightened
        // DESTROY_VERSION policy since the manifest rolls the ceremony back.
        for object in &made.objects {
            let version =
                keys::check_due(state, &key, object.version, Carrier::Ceremony(&record.id))?;
            if version.hsm_label != object.hsm_label {
                return Err(Error::new(
                    Reason::IllegalTransition,
                    format!(
                        "{} v{} is not the object the manifest names",
                        made.key_id, object.version
                    ),
                ));
            }
        }
        crate::authz::ceremony_quorum_covers(
            &key,
            "DESTROY_VERSION",
            script.quorum(),
            script.officers(),
        )?;
    }
    failpoint::hit(DESTROY.before_intent);
    record.phase = Phase::Running;
    let mut present = Vec::new();
    for i in 0..made.objects.len() {
        if made.objects[i].destroyed {
            continue;
        }
        made.objects[i].intended = true;
        record.destruction = Some(made.clone());
        put(state, record).await?;
        failpoint::hit(DESTROY.after_intent);
        let label = KeyLabel::new(made.objects[i].hsm_label.clone())?;
        let was_there = state
            .hsm
            .run(move |session| destroy_if_there(session, &label))
            .await?;
        failpoint::hit(DESTROY.after_hsm);
        if was_there {
            present.push(made.objects[i].hsm_label.clone());
        }
        made.objects[i].destroyed = true;
        record.destruction = Some(made.clone());
        put(state, record).await?;
    }
    let labels: Vec<String> = made.objects.iter().map(|o| o.hsm_label.clone()).collect();
    let wanted = labels.clone();
    let (inventoried, left) = state
        .hsm
        .run(move |session| {
            let objects = session.inventory()?;
            let left: Vec<String> = objects
                .iter()
                .filter(|o| wanted.contains(&o.label) || wanted.contains(&o.id))
                .map(|o| format!("{:?} {}", o.class, o.label))
                .collect();
            Ok((objects.len(), left))
        })
        .await?;
    if !left.is_empty() {
        return Err(Error::new(
            Reason::Internal,
            format!(
                "objects remain on the token after their destruction: {}",
                left.join(", ")
            ),
        ));
    }
    keys::mark_destroyed(state, &key, &made.versions()).await?;
    let bundles = bundles_holding(state, &made)?;
    record.done.push("destroy".into());
    let mut detail = Map::new();
    detail.insert("manifest_sha256".into(), json!(made.manifest_sha256));
    detail.insert("objects".into(), json!(labels));
    detail.insert("destroyed_now".into(), json!(present));
    detail.insert(
        "verification".into(),
        json!(format!("no object labelled or with an id among {labels:?} remains on the token ({inventoried} objects inventoried)")),
    );
    detail.insert(
        "witnesses".into(),
        json!(record
            .confirmed
            .iter()
            .map(|s| json!({"officer": s.officer, "confirmed_at": crate::audit::rfc3339_ms(s.time_ms)}))
            .collect::<Vec<_>>()),
    );
    detail.insert("backup_bundles_holding_copies".into(), json!(bundles));
    let summary = format!(
        "{} {} destroyed inside the HSM before {}; no object with their labels or ids remains on the token; {} backup bundle(s) known to the journal still hold copies",
        made.key_id,
        list(&made.versions()),
        record
            .confirmed
            .iter()
            .map(|s| s.officer.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        bundles.len()
    );
    note(state, record, "destroy", "custodyd", summary, detail).await?;
    failpoint::hit(DESTROY.after_result);
    Ok(())
}

/// The backup bundles the journal knows (made by KEK ceremonies, restored
/// by restores) that hold a copy of a destroyed version: a destruction
/// transcript accounts for copies. Bundles exported with BackupKeys are not
/// journaled; their holders account for them.
fn bundles_holding(state: &Custody, made: &Destruction) -> Result<Vec<String>, Error> {
    let versions = made.versions();
    let mut found = Vec::new();
    for record in state.ceremonies.journal.list().map_err(journal_failure)? {
        for (what, text) in [
            ("made", &record.backup_bundle),
            ("restored", &record.bundle),
        ] {
            let Ok(bundle) = Bundle::parse(text) else {
                continue;
            };
            let held: Vec<u32> = bundle
                .manifest
                .keys
                .iter()
                .filter(|k| k.key_id == made.key_id && versions.contains(&k.version))
                .map(|k| k.version)
                .collect();
            if !held.is_empty() {
                found.push(format!(
                    "bundle {what} by ceremony {} holds {} {}",
                    record.id,
                    made.key_id,
                    list(&held)
                ));
            }
        }
    }
    Ok(found)
}

/// Whether the destroy step had begun: then a stop finishes the ceremony.
pub(super) fn begun(record: &CeremonyRecord) -> bool {
    record.kind == "key-destruction" && record.destruction.as_ref().is_some_and(Destruction::begun)
}
