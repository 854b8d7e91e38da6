//! The one journaled protocol that makes a new key version in the HSM, for
//! CreateKey, every rotation and the key ceremonies ([`generate_version`]):
//!
//! 1. The label must be free on the token ([`refuse_labels_in_use`]); the
//!    intent, the label about to be made, is journaled and flushed before
//!    the HSM is asked to make anything ([`GenerationJournal::intend`]).
//! 2. The HSM generates the key under that label: a key pair (which
//!    hsm-shim consistency-tests as it makes it) or an AES key, wrappable
//!    only under the token's backup KEK if the key is backup-exportable.
//! 3. The journal notes that the key was made ([`GenerationJournal::made`]),
//!    and what the HSM reported becomes the [`VersionRecord`].
//!
//! A crash point sits before and after the intent and after the HSM call
//! ([`CrashPoints`]): the SIGKILL tests stop the process at each.
//!
//! Two journals keep the protocol, and each owns what happens after it:
//!
//! - the registry's pending versions ([`PendingVersions`]), for CreateKey
//!   and rotation: the version is committed with [`commit_version`], in the
//!   atomic batch that clears its entry, so it becomes usable
//!   atomically; a crash before that leaves the entry, and the next start
//!   rolls it back ([`roll_back_version`]: whatever the HSM holds under the
//!   label is destroyed), so a half-made version is never usable;
//! - the ceremony journal (the ceremony engine's `new_key`), where the label
//!   is one of the ceremony's journaled objects: the ceremony's commit
//!   registers the key, and its roll-back destroys every object it names.
//!
//! Both roll-backs destroy whatever the label holds, which is sound because
//! the label was free when the intent was journaled, and nothing else makes
//! an object under it afterwards: the caller holds the registry lock
//! (CreateKey, rotation) or has the key id reserved (a ceremony). An object
//! someone else left under the label is never destroyed or replaced: the
//! generation is refused `HSM_KEY_EXISTS` and the drift report shows it.

use std::future::Future;

use hsm_shim::{AesRole, ErrorKind, Exportability, KeyInfo, KeyLabel, KeySpec};

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

/// The version to make.
#[derive(Debug, Clone, Copy)]
pub struct NewVersion<'a> {
    /// The key.
    pub key_id: &'a str,
    /// Its number, from 1; with the key id it names the HSM label.
    pub version: u32,
    /// The key's algorithm.
    pub algorithm: KeyAlgorithm,
    /// Whether it may leave the HSM wrapped under the backup KEK.
    pub backup_exportable: bool,
}

/// The crash points of one generation: where the SIGKILL tests stop the
/// process between the moves of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashPoints {
    /// Before the intent is journaled.
    pub before_intent: &'static str,
    /// After the intent is durable, before the HSM call.
    pub after_intent: &'static str,
    /// After the HSM made the key, before the journal records it.
    pub after_hsm: &'static str,
}

/// The journal that records a generation's intent before the HSM call and
/// that the key was made after it.
pub trait GenerationJournal {
    /// Where the SIGKILL tests stop this journal's generations.
    const POINTS: CrashPoints;

    /// Journals, durably, that `label` is about to be made for `new`
    /// (started at `started_ms`): nothing reaches the HSM before this
    /// returns.
    fn intend(
        &mut self,
        custody: &Custody,
        new: &NewVersion<'_>,
        label: &KeyLabel,
        started_ms: i64,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// The HSM call failed: what becomes of the journaled intent.
    fn failed(&mut self, custody: &Custody, label: &KeyLabel) -> impl Future<Output = ()> + Send;

    /// The HSM made the key under `label`.
    fn made(&mut self, label: &KeyLabel);
}

/// What a generation made.
pub struct Generated {
    /// The version as the registry keeps it, active from its generation.
    pub version: VersionRecord,
    /// What the HSM reported of the key.
    pub info: KeyInfo,
}

/// What custody records of a key the HSM made, as the HSM reported it: a
/// key pair's public key, an AES key's check value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyFacts {
    /// SubjectPublicKeyInfo DER, hex (key pairs).
    pub public_key_der_hex: String,
    /// SubjectPublicKeyInfo PEM (key pairs).
    pub public_key_pem: String,
    /// Key check value, hex (AES keys).
    pub check_value: String,
}

impl KeyFacts {
    /// The facts of what the HSM reported.
    pub fn of(info: &KeyInfo) -> Result<KeyFacts, Error> {
        let (public_key_der_hex, public_key_pem) = match &info.public_key {
            Some(public_key) => (hex::encode(public_key.spki_der()), public_key.to_pem()?),
            None => (String::new(), String::new()),
        };
        Ok(KeyFacts {
            public_key_der_hex,
            public_key_pem,
            check_value: info.check_value.map(|k| k.to_string()).unwrap_or_default(),
        })
    }

    /// Version `version`, labelled `hsm_label`, active from `now`.
    pub fn active_version(self, version: u32, hsm_label: String, now: i64) -> VersionRecord {
        VersionRecord {
            version,
            state: VersionState::Active,
            created_ms: now,
            state_ms: now,
            hsm_label,
            public_key_der_hex: self.public_key_der_hex,
            public_key_pem: self.public_key_pem,
            activated_ms: Some(now),
            destroy_at_ms: None,
            legal_hold: None,
            check_value: self.check_value,
            certificate_chain_pem: Vec::new(),
            reserved_by: None,
            destroying_since_ms: None,
            destroy_approved_under: None,
        }
    }
}

/// Makes `new` in the HSM under the protocol of the module doc, journaled in
/// `journal`. The caller acts on what was made: commits it to the registry
/// ([`commit_version`]) or keeps it in its ceremony.
pub async fn generate_version<J: GenerationJournal>(
    custody: &Custody,
    journal: &mut J,
    new: NewVersion<'_>,
) -> Result<Generated, Error> {
    let label = hsm_label(new.key_id, new.version)?;
    let now = custody.clock.now_ms();
    refuse_labels_in_use(custody, vec![label.clone()]).await?;
    failpoint::hit(J::POINTS.before_intent);
    journal.intend(custody, &new, &label, now).await?;
    failpoint::hit(J::POINTS.after_intent);
    let generated = generate_in_hsm(
        custody,
        label.clone(),
        new.algorithm.key_spec(),
        exportability(new.backup_exportable),
    )
    .await;
    let info = match generated {
        Ok(info) => info,
        Err(error) => {
            journal.failed(custody, &label).await;
            return Err(error.into());
        }
    };
    failpoint::hit(J::POINTS.after_hsm);
    journal.made(&label);
    let version = KeyFacts::of(&info)?.active_version(new.version, label.as_str().into(), now);
    Ok(Generated { version, info })
}

/// Refuses, before anything is journaled, labels an object on the token
/// already has (`HSM_KEY_EXISTS`, naming the label): custody journals only
/// labels that were free, so what a roll-back destroys under a journaled
/// label is what custody made there. The caller holds what keeps the labels
/// free from then on (the registry lock, or the ceremony's reserved key ids
/// and private label namespace).
pub async fn refuse_labels_in_use(custody: &Custody, labels: Vec<KeyLabel>) -> Result<(), Error> {
    custody
        .hsm
        .run(move |session| {
            labels
                .iter()
                .try_for_each(|label| session.refuse_label_in_use(label))
        })
        .await
        .map_err(|e| {
            let mut error = Error::from(e);
            if error.reason == crate::Reason::HsmKeyExists {
                error.message = format!(
                    "{}: custodyd did not make it and leaves it alone (see the drift report)",
                    error.message
                );
            }
            error
        })
}

/// The HSM call: a key pair or an AES data key under `label`.
async fn generate_in_hsm(
    custody: &Custody,
    label: KeyLabel,
    spec: KeySpec,
    export: Exportability,
) -> hsm_shim::Result<KeyInfo> {
    custody
        .hsm
        .run(move |session| {
            if spec.is_key_pair() {
                session.generate_key_pair(&label, spec, export)
            } else {
                session.generate_aes_key(&label, AesRole::DataEncryption, export)
            }
        })
        .await
}

/// The registry's pending versions, the journal of CreateKey and rotation:
/// a [`PendingVersion`] entry naming the label, which [`commit_version`]
/// clears in the transaction that commits the version, and the roll-back at
/// start finds if it never came.
#[derive(Debug, Clone)]
pub struct PendingVersions {
    /// What started the generation: create, or the rotation's trigger.
    trigger: &'static str,
    /// The entry it journaled, once it has (with the generation's random
    /// id, [`PendingVersion::generation`]).
    entry: Option<PendingVersion>,
}

impl PendingVersions {
    /// The journal of one generation started by `trigger`.
    pub fn new(trigger: &'static str) -> PendingVersions {
        PendingVersions {
            trigger,
            entry: None,
        }
    }

    /// Commits `record`, which holds the version this generation made
    /// ([`commit_version`]).
    pub async fn commit(&self, custody: &Custody, record: KeyRecord) -> Result<(), Error> {
        let entry = self
            .entry
            .as_ref()
            .ok_or_else(|| Error::internal("a version committed before it was journaled"))?;
        commit_version(custody, record, entry).await
    }
}

impl GenerationJournal for PendingVersions {
    const POINTS: CrashPoints = CrashPoints {
        before_intent: "version.before_journal",
        after_intent: "version.after_journal",
        after_hsm: "version.after_generate",
    };

    async fn intend(
        &mut self,
        custody: &Custody,
        new: &NewVersion<'_>,
        label: &KeyLabel,
        started_ms: i64,
    ) -> Result<(), Error> {
        let mut generation = [0u8; 16];
        getrandom::getrandom(&mut generation).map_err(|_| Error::internal("no randomness"))?;
        let entry = PendingVersion {
            key_id: new.key_id.into(),
            version: new.version,
            hsm_label: label.as_str().into(),
            trigger: self.trigger.into(),
            started_ms,
            instance: custody.shared.instance().into(),
            abandoned: false,
            generation: hex::encode(generation),
        };
        custody
            .registry
            .begin_version(&entry)
            .await
            .map_err(registry_failure)?;
        self.entry = Some(entry);
        Ok(())
    }

    /// Rolls the version back: a generation that failed may still have
    /// made objects (the key pair made, then its consistency test or the
    /// reading of its attributes failed, and so did hsm-shim's own clean-up
    /// on a failing device). Whatever the label holds is destroyed, then
    /// the entry dropped; if the device still fails, the entry stays and
    /// the next start rolls it back.
    async fn failed(&mut self, custody: &Custody, label: &KeyLabel) {
        let Some(entry) = &self.entry else {
            return;
        };
        if roll_back_version(custody, entry).await.is_none() {
            tracing::error!(%label, "a failed generation is rolled back at the next start");
        }
    }

    /// Nothing to record: the entry stays until the commit clears it.
    fn made(&mut self, _label: &KeyLabel) {}
}

/// The crash point after a version's commit: it stands, and the journal
/// entry is gone.
const AFTER_COMMIT: &str = "version.after_commit";

/// Commits `record`, which holds the version labelled `label` that
/// [`generate_version`] made, and clears its journal entry, atomically. If
/// nothing was written, the version is rolled back (its HSM objects
/// destroyed), or left to the roll-back at the next start; if it was written
/// but not flushed, it stands and the caller is told the registry failed.
async fn commit_version(
    custody: &Custody,
    record: KeyRecord,
    entry: &PendingVersion,
) -> Result<(), Error> {
    match custody
        .registry
        .commit_version(record, &entry.hsm_label, &entry.generation)
        .await
    {
        Ok(()) => {
            failpoint::hit(AFTER_COMMIT);
            Ok(())
        }
        Err(CommitError::NotApplied(error)) => {
            let error = registry_failure(error);
            roll_back_version(custody, entry).await;
            Err(error)
        }
        Err(CommitError::NotDurable(error)) => Err(registry_failure(error)),
    }
}

/// Destroys what the HSM holds under generation `entry`'s label and drops
/// its journal entry; logs what it could not do (the next start retries).
/// Returns how many objects it destroyed. Nothing is destroyed when the
/// label is another generation's or a version the key holds
/// ([`crate::registry::Registry::begin_roll_back`]): another replica
/// rolled this one back while it stalled, and the version number, free
/// again, may label a version made since.
pub async fn roll_back_version(custody: &Custody, entry: &PendingVersion) -> Option<usize> {
    let label = entry.hsm_label.as_str();
    let Ok(hsm_label) = KeyLabel::new(label.to_string()) else {
        return None;
    };
    match custody.registry.begin_roll_back(entry).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(
                label,
                "the label is another generation's or a version of the key now; nothing is destroyed"
            );
            return Some(0);
        }
        Err(error) => {
            tracing::error!(%error, label, "could not mark a generation rolled back; retrying at the next start");
            return None;
        }
    }
    let destroyed = custody
        .hsm
        .run(move |session| match session.destroy(&hsm_label) {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
            other => other,
        })
        .await;
    match destroyed {
        Ok(count) => match custody
            .registry
            .abandon_version(label, &entry.generation)
            .await
        {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rotation_crash_points_are_those_of_the_registry_generation() {
        let points = PendingVersions::POINTS;
        assert_eq!(
            crate::failpoint::ROTATION_POINTS,
            [
                points.before_intent,
                points.after_intent,
                points.after_hsm,
                AFTER_COMMIT
            ]
        );
    }

    #[test]
    fn only_backup_exportable_keys_may_leave_and_then_only_under_the_backup_kek() {
        assert_eq!(exportability(true), Exportability::BackupWrapOnly);
        assert_eq!(exportability(false), Exportability::NonExportable);
    }

    #[test]
    fn a_new_version_is_active_from_its_making() {
        let facts = KeyFacts {
            check_value: "a1b2c3".into(),
            ..KeyFacts::default()
        };
        let version = facts.active_version(3, "key/k/v3".into(), 1_000);
        assert_eq!(version.version, 3);
        assert_eq!(version.state, VersionState::Active);
        assert_eq!(
            (version.created_ms, version.state_ms, version.activated_ms),
            (1_000, 1_000, Some(1_000))
        );
        assert_eq!(version.hsm_label, "key/k/v3");
        assert_eq!(version.check_value, "a1b2c3");
        assert_eq!(version.destroy_at_ms, None);
        assert_eq!(version.legal_hold, None);
    }
}
