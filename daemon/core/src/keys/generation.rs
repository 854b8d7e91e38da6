//! The one journaled protocol that makes a new key version in the HSM.
//!
//! 1. A `PendingVersion` journal entry naming the label is written and
//!    flushed before the HSM is asked for anything.
//! 2. The HSM generates the key under that label.
//! 3. The version is committed to the key record in the same sled
//!    transaction that clears the journal entry, so it becomes usable
//!    atomically.
//!
//! A crash between 1 and 3 leaves the entry, and the next start rolls it back
//! ([`roll_back_version`]: whatever the HSM holds under the label is
//! destroyed), so a half-made version is never usable. The crash points
//! `version.*` are where the SIGKILL tests stop the process.

use hsm_shim::{AesRole, ErrorKind, Exportability, KeyLabel};

use super::registry_failure;
use crate::algorithms::KeyAlgorithm;
use crate::failpoint;
use crate::names::hsm_label;
use crate::registry::{CommitError, KeyRecord, PendingVersion, VersionRecord, VersionState};
use crate::{Custody, Error};

/// Backup-exportable keys may be wrapped under a trusted KEK only.
pub fn exportability(backup_exportable: bool) -> Exportability {
    if backup_exportable {
        Exportability::BackupWrapOnly
    } else {
        Exportability::NonExportable
    }
}

/// Generates version `version` of `key_id` in the HSM, journaled: the
/// pending entry is durable before the HSM call, and is dropped again if the
/// call fails. The caller holds the registry lock and commits the version
/// with [`commit_version`].
///
/// A label in custody's `key/` namespace that is neither registered nor
/// pending (the caller checked) is a leftover of a generation that failed to
/// clean up; it is destroyed and the key made again.
pub async fn generate_version(
    custody: &Custody,
    key_id: &str,
    algorithm: KeyAlgorithm,
    export: Exportability,
    version: u32,
    trigger: &'static str,
) -> Result<VersionRecord, Error> {
    let label = hsm_label(key_id, version)?;
    let now = custody.clock.now_ms();
    failpoint::hit("version.before_journal");
    custody
        .registry
        .begin_version(&PendingVersion {
            key_id: key_id.into(),
            version,
            hsm_label: label.as_str().into(),
            trigger: trigger.into(),
            started_ms: now,
        })
        .await
        .map_err(registry_failure)?;
    failpoint::hit("version.after_journal");
    let spec = algorithm.key_spec();
    let run_label = label.clone();
    let generated = custody
        .hsm
        .run(move |session| {
            let generate = |session: &mut hsm_shim::HsmSession| {
                if spec.is_key_pair() {
                    session.generate_key_pair(&run_label, spec, export)
                } else {
                    session.generate_aes_key(&run_label, AesRole::DataEncryption, export)
                }
            };
            match generate(session) {
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    tracing::warn!(label = %run_label, "removing an orphaned HSM key left by an interrupted generation");
                    session.destroy(&run_label)?;
                    generate(session)
                }
                other => other,
            }
        })
        .await;
    let info = match generated {
        Ok(info) => info,
        Err(error) => {
            if let Err(e) = custody.registry.abandon_version(label.as_str()).await {
                tracing::error!(%e, %label, "could not drop the journal entry of a failed generation; it is rolled back at the next start");
            }
            return Err(error.into());
        }
    };
    failpoint::hit("version.after_generate");
    let (public_key_der_hex, public_key_pem) = match &info.public_key {
        Some(public_key) => (hex::encode(public_key.spki_der()), public_key.to_pem()?),
        None => (String::new(), String::new()),
    };
    Ok(VersionRecord {
        version,
        state: VersionState::Active,
        created_ms: now,
        state_ms: now,
        hsm_label: label.as_str().to_string(),
        public_key_der_hex,
        public_key_pem,
        activated_ms: Some(now),
        destroy_at_ms: None,
        legal_hold: None,
        check_value: info.check_value.map(|k| k.to_string()).unwrap_or_default(),
    })
}

/// Commits `record`, which holds the version labelled `label` that
/// [`generate_version`] made, and clears its journal entry, atomically. If
/// nothing was written, the version is rolled back (its HSM objects
/// destroyed), or left to the roll-back at the next start; if it was written
/// but not flushed, it stands and the caller is told the registry failed.
pub async fn commit_version(
    custody: &Custody,
    record: KeyRecord,
    label: &str,
) -> Result<(), Error> {
    match custody.registry.commit_version(record, label).await {
        Ok(()) => {
            failpoint::hit("version.after_commit");
            Ok(())
        }
        Err(CommitError::NotApplied(error)) => {
            let error = registry_failure(error);
            roll_back_version(custody, label).await;
            Err(error)
        }
        Err(CommitError::NotDurable(error)) => Err(registry_failure(error)),
    }
}

/// Destroys what the HSM holds under an uncommitted version's label and
/// drops its journal entry; logs what it could not do (the next start
/// retries). Returns how many objects it destroyed.
pub async fn roll_back_version(custody: &Custody, label: &str) -> Option<usize> {
    let Ok(hsm_label) = KeyLabel::new(label.to_string()) else {
        return None;
    };
    let destroyed = custody
        .hsm
        .run(move |session| match session.destroy(&hsm_label) {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
            other => other,
        })
        .await;
    match destroyed {
        Ok(count) => match custody.registry.abandon_version(label).await {
            Ok(()) => Some(count),
            Err(error) => {
                tracing::error!(%error, label, "could not drop a rolled-back journal entry");
                None
            }
        },
        Err(error) => {
            tracing::error!(%error, label, "could not destroy an uncommitted version; retrying at the next start");
            None
        }
    }
}
