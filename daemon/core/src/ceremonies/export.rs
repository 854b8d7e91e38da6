//! Making a backup bundle of the live registry: every backup-exportable key
//! version that is not destroyed or compromised, wrapped under the token's
//! current backup KEK (the wrapping and the signed manifest are the
//! engine's [`make_bundle`](super::make_bundle)). Only as a CREATE_BACKUP
//! operation the administrative quorum approved, naming the backup KEK's
//! set and the exact key versions (threat model I1). And which backup KEK
//! is the current one: a KEK ceremony's becomes it only through an
//! ACTIVATE_BACKUP_KEK operation the administrative quorum approved.

use sha2::Digest;

use super::{self as engine, KeyToBack};
use crate::action::Audited;
use crate::ceremony::journal::BackupKek;
use crate::dual_control::operation::{BackedUpVersion, Spec};
use crate::dual_control::quorum::Quorum;
use crate::registry::VersionState;
use crate::{Custody, Error, Reason};

/// A bundle made.
#[derive(Debug, Clone)]
pub struct Backup {
    /// The bundle, JSON.
    pub bundle: String,
    /// How many key versions it holds.
    pub keys: u32,
}

/// What a backup made now would be: the token's current backup KEK and
/// every backup-exportable key version that is not destroyed or
/// compromised; refused `BACKUP_KEK_TOO_WEAK` if fewer share holders than
/// one of those keys' quorums rebuild the KEK ([`crate::authz::backup_kek_covers`]).
fn plan(custody: &Custody) -> Result<(BackupKek, Vec<KeyToBack>), Error> {
    let kek = custody
        .ceremonies
        .journal
        .backup_kek()
        .map_err(engine::journal_failure)?
        .ok_or_else(|| {
            Error::new(
                Reason::NoBackupKek,
                "this token has no current backup KEK: run a KEK ceremony, then have the administrative quorum approve an ACTIVATE_BACKUP_KEK operation naming it",
            )
        })?;
    let exportable: Vec<_> = custody
        .registry
        .list(None, usize::MAX)
        .into_iter()
        .filter(|key| key.backup_exportable && key.versions.iter().any(bundled))
        .collect();
    crate::authz::backup_kek_covers(
        &crate::authz::admin_quorum(custody)?,
        &holders(custody, &kek)?,
        exportable.iter().map(AsRef::as_ref),
        |officer| custody.dual_control.enrolled(officer),
    )?;
    let keys: Vec<KeyToBack> = exportable
        .iter()
        .flat_map(|key| {
            key.versions
                .iter()
                .filter(|v| bundled(v))
                .map(|v| KeyToBack::of(key, v, &custody.dual_control))
                .collect::<Vec<_>>()
        })
        .collect();
    Ok((kek, keys))
}

/// Who rebuilds `kek`: any `threshold` of its custodians, as its record
/// keeps them or, for a record made before it did, as its ceremony's
/// script named them.
fn holders(custody: &Custody, kek: &BackupKek) -> Result<Quorum, Error> {
    let unknown = |why: String| {
        Error::new(
            Reason::BackupKekTooWeak,
            format!(
                "who holds the current backup KEK's shares is not known ({why}): run a KEK ceremony and have the administrative quorum activate its backup KEK"
            ),
        )
    };
    let custodians = if kek.custodians.is_empty() {
        let record = custody
            .ceremonies
            .journal
            .get(&kek.ceremony)
            .map_err(engine::journal_failure)?
            .ok_or_else(|| unknown(format!("no record of ceremonies/{}", kek.ceremony)))?;
        let script = crate::ceremony::script::Script::parse(&record.script)
            .map_err(|e| unknown(format!("its ceremony's script: {e}")))?;
        match script.kind() {
            crate::ceremony::script::Kind::Kek {
                mode: crate::ceremony::script::KekMode::Generate { shares },
                ..
            } => shares.custodians.clone(),
            _ => return Err(unknown("its ceremony split no shares".into())),
        }
    } else {
        kek.custodians.clone()
    };
    Quorum::new(custodians, u32::from(kek.threshold)).map_err(unknown)
}

/// Whether a backup-exportable key's version goes into a bundle: neither
/// destroyed nor compromised. A key none of whose versions do is left out,
/// and its policies do not bind the backup KEK.
fn bundled(version: &crate::registry::VersionRecord) -> bool {
    !matches!(
        version.state,
        VersionState::Destroyed | VersionState::Compromised
    )
}

fn versions_of(keys: &[KeyToBack]) -> Vec<BackedUpVersion> {
    keys.iter()
        .map(|k| BackedUpVersion {
            key_id: k.key_id.clone(),
            version: k.version,
        })
        .collect()
}

/// What a CREATE_BACKUP operation asked now would cover: the current backup
/// KEK's set id and the exact key versions, fixed in its spec (and so in
/// the digest the officers sign).
pub fn backup_scope(custody: &Custody) -> Result<(String, Vec<BackedUpVersion>), Error> {
    let (kek, keys) = plan(custody)?;
    Ok((kek.set_id, versions_of(&keys)))
}

/// Wraps the key versions a quorum approved under the backup KEK it
/// approved (I1); refuses `POLICY_CHANGED` if the current backup KEK or the
/// set of exportable versions is no longer what was approved. `audited`
/// names the bundle's SHA-256, which a restore script pins.
pub async fn create_backup(
    custody: &Custody,
    audited: &mut Audited,
    set_id: &str,
    versions: &[BackedUpVersion],
) -> Result<Backup, Error> {
    let (kek, keys) = plan(custody)?;
    if kek.set_id != set_id || versions_of(&keys) != versions {
        return Err(Error::new(
            Reason::PolicyChanged,
            format!(
                "the backup KEK or the exportable key versions changed since the backup was approved (now set {}, {} versions): request it again",
                kek.set_id,
                keys.len()
            ),
        ));
    }
    let count = u32::try_from(keys.len()).unwrap_or(u32::MAX);
    let bundle = engine::make_bundle(custody, &kek, keys).await?.to_json();
    // The digest the restore script's bundle_sha256 is compared with.
    audited.detail = format!(
        "{count} key versions under backup KEK set {}; bundle sha256 {}",
        kek.set_id,
        hex::encode(sha2::Sha256::digest(bundle.as_bytes()))
    );
    Ok(Backup {
        bundle,
        keys: count,
    })
}

/// The ACTIVATE_BACKUP_KEK spec for the backup KEK ceremony `ceremony`
/// made: its set, KCV and K of N, which the officers approve. Refused if
/// the ceremony made none (`NO_BACKUP_KEK`) or it is current already
/// (`BACKUP_KEK_CURRENT`).
pub fn activation_of(custody: &Custody, ceremony: &str) -> Result<Spec, Error> {
    activation(custody, ceremony).map(|(spec, _)| spec)
}

/// The name of the KEK ceremony whose backup KEK, current or one that may
/// be made current, `officer_id` holds a share of, if any (threat model
/// D7: whoever is enrolled under that id would count as its holder).
pub fn share_held_by(custody: &Custody, officer_id: &str) -> Result<Option<String>, Error> {
    let keks = custody
        .ceremonies
        .journal
        .recorded_backup_keks()
        .map_err(engine::journal_failure)?;
    for kek in keks {
        match holders(custody, &kek) {
            Ok(holders) if holders.contains(officer_id) => {
                return Ok(Some(format!("ceremonies/{}", kek.ceremony)));
            }
            // A KEK whose holders are not known backs nothing up (I1).
            Ok(_) => {}
            Err(unknown) if unknown.reason == Reason::BackupKekTooWeak => {}
            Err(unreadable) => return Err(unreadable),
        }
    }
    Ok(None)
}

/// The ACTIVATE_BACKUP_KEK spec for `ceremony`'s backup KEK, and the KEK.
fn activation(custody: &Custody, ceremony: &str) -> Result<(Spec, BackupKek), Error> {
    let journal = &custody.ceremonies.journal;
    let kek = journal
        .backup_kek_of(ceremony)
        .map_err(engine::journal_failure)?
        .ok_or_else(|| {
            Error::new(
                Reason::NoBackupKek,
                format!("ceremonies/{ceremony} made no backup KEK (only a completed generate-mode KEK ceremony does)"),
            )
        })?;
    let current = journal.backup_kek().map_err(engine::journal_failure)?;
    if current.is_some_and(|c| c.label == kek.label) {
        return Err(Error::new(
            Reason::BackupKekCurrent,
            format!("the backup KEK of ceremonies/{ceremony} is the current one already"),
        ));
    }
    let spec = Spec::ActivateBackupKek {
        ceremony: kek.ceremony.clone(),
        set_id: kek.set_id.clone(),
        check_value: kek.kcv.clone(),
        threshold: kek.threshold,
        shares: kek.shares,
    };
    Ok((spec, kek))
}

/// Makes the backup KEK an approved ACTIVATE_BACKUP_KEK `spec` names the
/// token's current one, if it is still the KEK that was approved.
pub async fn activate_backup_kek(custody: &Custody, spec: &Spec) -> Result<(), Error> {
    let Spec::ActivateBackupKek { ceremony, .. } = spec else {
        return Err(Error::internal("not an ACTIVATE_BACKUP_KEK spec"));
    };
    let (now, kek) = activation(custody, ceremony)?;
    if now != *spec {
        return Err(Error::new(
            Reason::PolicyChanged,
            format!("the backup KEK of ceremonies/{ceremony} is not the one approved"),
        ));
    }
    custody
        .ceremonies
        .journal
        .make_current(&kek)
        .await
        .map_err(engine::journal_failure)
}
