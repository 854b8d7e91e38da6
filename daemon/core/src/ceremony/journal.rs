//! The ceremony journal: one record per ceremony in the store, rewritten and
//! flushed at every step, and the token's current backup KEK.
//!
//! The record is what makes a ceremony survive a crash: every HSM object a
//! step is about to make is journaled (and flushed) before the PKCS#11 call,
//! and marked made after it, so that recovery knows exactly what to destroy.
//! Secrets (shares, components) are never journaled: they live in memory
//! only, which is why a crash in the middle of a secret-bearing phase rolls
//! the ceremony back instead of resuming it.

use serde::{Deserialize, Serialize};

use custody_store::TxError;

use crate::ceremony::transcript::Transcript;
use crate::dual_control::operation::KeyPolicies;

/// Where a ceremony is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for the quorum to sign in.
    AwaitingOfficers,
    /// HSM steps running.
    Running,
    /// Custodians collect their shares.
    AwaitingShareCollection,
    /// Custodians submit their components.
    AwaitingComponents,
    /// Custodians submit their shares (restore).
    AwaitingShares,
    /// Officers confirm the fingerprint.
    AwaitingConfirmation,
    /// Done.
    Completed,
    /// Stopped by a crash or a failed step, and undone.
    RolledBack,
    /// Stopped by an officer, and undone.
    Aborted,
}

impl Phase {
    /// Whether the ceremony is over.
    pub fn finished(self) -> bool {
        matches!(self, Phase::Completed | Phase::RolledBack | Phase::Aborted)
    }
}

/// An officer's signature in a ceremony.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    /// The officer id.
    pub officer: String,
    /// Ed25519 signature, hex.
    pub signature: String,
    /// Unix milliseconds.
    pub time_ms: i64,
}

/// Which token an object lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenRole {
    /// custodyd's own token.
    Main,
    /// The scratch token of DR drills.
    Scratch,
}

/// An HSM object a step makes: journaled before the call that makes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournaledObject {
    /// Its label (`CKA_LABEL`).
    pub label: String,
    /// Its token.
    pub token: TokenRole,
    /// The step that makes it.
    pub step: String,
    /// Whether the call returned (false: it may or may not exist).
    pub made: bool,
}

/// The key a root-key or KEK ceremony makes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MadeKey {
    /// Key id.
    pub key_id: String,
    /// API algorithm name.
    pub algorithm: String,
    /// HSM label.
    pub hsm_label: String,
    /// SubjectPublicKeyInfo DER, hex (key pairs).
    pub public_key_der_hex: String,
    /// SubjectPublicKeyInfo PEM (key pairs).
    pub public_key_pem: String,
    /// Key check value, hex (AES keys).
    pub check_value: String,
    /// The fingerprint officers confirm, hex.
    pub fingerprint: String,
    /// The self-signed certificate, PEM.
    pub certificate_pem: String,
    /// Backup-exportable.
    pub backup: bool,
}

/// What an intermediate ceremony certifies, and the certificate it makes
/// (or the CRL a crl ceremony makes):
/// the TBS is journaled when it is built and linted, before the officers
/// confirm its SHA-256, so that the HSM signs those very bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certification {
    /// The issuing root key's id.
    pub issuer_key_id: String,
    /// Its version whose key signs.
    pub issuer_version: u32,
    /// That version's HSM label.
    pub issuer_label: String,
    /// The root key's API algorithm name.
    pub issuer_algorithm: String,
    /// The root's public key, SubjectPublicKeyInfo DER, hex.
    pub issuer_public_key_der_hex: String,
    /// The root's certificate chain (its root certificate), PEM.
    pub issuer_chain_pem: Vec<String>,
    /// The certified key's id.
    pub key_id: String,
    /// Its version whose public key is certified.
    pub key_version: u32,
    /// That public key, SubjectPublicKeyInfo DER, hex.
    pub public_key_der_hex: String,
    /// The TBSCertificate, DER, hex.
    pub tbs_der_hex: String,
    /// The certificate's signatureAlgorithm, DER, hex.
    pub signature_algorithm_der_hex: String,
    /// SHA-256 of the TBS, hex: what officers confirm.
    pub tbs_sha256: String,
    /// The summary officers read.
    pub summary: Vec<String>,
    /// The signed certificate, PEM, once the HSM signed and it verified;
    /// for a CRL ceremony, the signed CRL.
    pub certificate_pem: String,
    /// A CRL ceremony's CRL number (its TBS is a TBSCertList, and the
    /// fields of a certified key are empty): journaled with the TBS before
    /// anything is signed, so that no later CRL of the issuer gets it.
    #[serde(default)]
    pub crl_number: Option<u64>,
}

/// A submitted component: who, and its check value (never the value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentRecord {
    /// The custodian.
    pub custodian: String,
    /// Key check value, hex.
    pub kcv: String,
}

/// The outcome of a restore or drill.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreOutcome {
    /// Keys in the bundle.
    pub keys: u32,
    /// Keys verified.
    pub verified: u32,
    /// Milliseconds from the last share to the last verification.
    pub rto_ms: u64,
    /// Scratch objects destroyed (drill).
    pub scratch_objects_destroyed: u32,
    /// Whether it was a drill.
    pub drill: bool,
    /// Keys restored with every active version SUSPENDED, their protections not
    /// reproducible here (the transcript says why).
    #[serde(default)]
    pub suspended_keys: Vec<String>,
}

/// The token's backup KEK: a trusted AES key whose value exists outside the
/// HSM only as K-of-N shares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupKek {
    /// HSM label.
    pub label: String,
    /// The share set id, hex.
    pub set_id: String,
    /// K.
    pub threshold: u8,
    /// N.
    pub shares: u8,
    /// Key check value, hex.
    pub kcv: String,
    /// The ceremony that made it.
    pub ceremony: String,
    /// The officers its shares went to, in share order (empty in records
    /// made before they were kept here: the ceremony's script names them).
    #[serde(default)]
    pub custodians: Vec<String>,
}

/// The process holding a ceremony's secrets in memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretsHolder {
    /// Its `[store] replica_id` (`custodyd` without one).
    pub replica: String,
    /// Its instance id (`Epochs::instance`).
    pub instance: String,
}

/// One ceremony, as journaled.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CeremonyRecord {
    /// Ceremony id.
    pub id: String,
    /// `root-key`, `kek` or `restore`.
    pub kind: String,
    /// The script, exactly as reviewed.
    pub script: String,
    /// The restore bundle, exactly as reviewed.
    pub bundle: String,
    /// The PKCS#10 CSR an intermediate ceremony certifies instead of a
    /// custody key, hex of the bytes sent (the file as reviewed); empty
    /// otherwise.
    #[serde(default)]
    pub csr_hex: String,
    /// For a cross-sign ceremony, hex of the CA certificate file sent with
    /// the start (the bytes as reviewed); empty otherwise.
    #[serde(default)]
    pub certificate_hex: String,
    /// Where it is.
    pub phase: Phase,
    /// Who opened it.
    pub opened_by: String,
    /// Unix milliseconds.
    pub created_ms: i64,
    /// Unix milliseconds of the last change.
    pub updated_ms: i64,
    /// Sign-ins.
    pub present: Vec<Signed>,
    /// Fingerprint confirmations.
    pub confirmed: Vec<Signed>,
    /// Steps done, by name.
    pub done: Vec<String>,
    /// HSM objects made or being made.
    pub objects: Vec<JournaledObject>,
    /// The key ids the ceremony registers at its commit (the script's key;
    /// every key of a restore's bundle), reserved from its opening until it
    /// finishes: no key is created under them and no other ceremony that
    /// registers one opens meanwhile.
    #[serde(default)]
    pub reserved_key_ids: Vec<String>,
    /// How many times the record has been written. A write lands only over
    /// the revision it was read at, so that a replica whose hold of the
    /// engine's lock lapsed mid-step never writes over what the next holder
    /// wrote ([`Journal::put`]).
    #[serde(default)]
    pub revision: u64,
    /// The process whose memory holds the ceremony's secrets (shares not
    /// yet collected, components or shares entered), while there are any:
    /// secrets never reach the store, so custodians hand them in and
    /// collect them on that replica.
    #[serde(default)]
    pub secrets_held_by: Option<SecretsHolder>,
    /// The key made.
    pub key: Option<MadeKey>,
    /// What an intermediate ceremony certifies, once its TBS is built.
    #[serde(default)]
    pub certification: Option<Certification>,
    /// What a key-destruction ceremony destroys, once its manifest is
    /// journaled.
    #[serde(default)]
    pub destruction: Option<crate::ceremony::destruction::Destruction>,
    /// The policies the key is registered with (root-key and kek), fixed
    /// when the ceremony opened: the script's `[key.policy]`, and the
    /// administrative quorum of that moment on each default kind it does
    /// not name. None in a record journaled before keys had them.
    #[serde(default)]
    pub key_policies: Option<KeyPolicies>,
    /// The backup KEK made (KEK ceremony, generate mode).
    pub backup_kek: Option<BackupKek>,
    /// Custodians who collected their share.
    pub shares_collected: Vec<String>,
    /// Components submitted.
    pub components: Vec<ComponentRecord>,
    /// Custodians who submitted a share (restore).
    pub shares_submitted: Vec<String>,
    /// Shares needed (restore).
    pub shares_needed: u32,
    /// The backup bundle made (KEK ceremony, generate mode), JSON.
    pub backup_bundle: String,
    /// The restore outcome.
    pub restore: Option<RestoreOutcome>,
    /// Why it rolled back or was aborted.
    pub error: String,
    /// The transcript so far.
    pub transcript: Transcript,
}

impl CeremonyRecord {
    /// Whether the ceremony's progress lives in the memory of the process
    /// driving it: in the middle of a step, or with secrets to hand out or
    /// entered. The journal names that process (`secrets_held_by`).
    pub fn held_in_memory(&self) -> bool {
        match self.phase {
            Phase::Running | Phase::AwaitingShareCollection => true,
            Phase::AwaitingComponents | Phase::AwaitingShares => {
                !self.components.is_empty() || !self.shares_submitted.is_empty()
            }
            _ => false,
        }
    }

    /// Whether all the ceremony has from custodians is what they entered,
    /// with nothing made yet: lost with the process holding it, it is
    /// simply asked for again.
    pub fn only_entered(&self) -> bool {
        self.objects.is_empty()
            && matches!(
                self.phase,
                Phase::AwaitingComponents | Phase::AwaitingShares
            )
    }

    /// Whether step `name` is done.
    pub fn did(&self, name: &str) -> bool {
        self.done.iter().any(|d| d == name)
    }
}

/// A journal failure.
#[derive(Debug, thiserror::Error)]
#[error("ceremony journal: {0}")]
pub struct JournalError(pub String);

fn err(e: impl std::fmt::Display) -> JournalError {
    JournalError(e.to_string())
}

const CURRENT_BACKUP_KEK: &[u8] = b"current";

/// The journal in the store.
#[derive(Clone)]
pub struct Journal {
    db: custody_store::Store,
    ceremonies: custody_store::Keyspace,
    backup_keks: custody_store::Keyspace,
    /// The ids of unfinished ceremonies, kept with each record in one
    /// transaction, so that what runs often (drift checks, key creation)
    /// reads only those.
    unfinished: custody_store::Keyspace,
}

impl Journal {
    /// Opens the journal's trees in `db`.
    pub fn open(db: &custody_store::Store) -> Result<Journal, JournalError> {
        Ok(Journal {
            db: db.clone(),
            ceremonies: db.keyspace("ceremonies").map_err(err)?,
            backup_keks: db.keyspace("backup_keks").map_err(err)?,
            unfinished: db.keyspace("ceremonies_unfinished").map_err(err)?,
        })
    }

    /// A ceremony by id.
    pub fn get(&self, id: &str) -> Result<Option<CeremonyRecord>, JournalError> {
        self.ceremonies
            .get(id.as_bytes())
            .map_err(err)?
            .map(|bytes| {
                crate::stored::open(id.as_bytes(), &bytes)
                    .map_err(|e| JournalError(format!("ceremony {id} is corrupt: {e}")))
            })
            .transpose()
    }

    /// Every ceremony, newest first.
    pub fn list(&self) -> Result<Vec<CeremonyRecord>, JournalError> {
        let mut all = self
            .ceremonies
            .iter()
            .map(|item| {
                let (id, bytes) = item.map_err(err)?;
                crate::stored::open::<CeremonyRecord>(&id, &bytes).map_err(|e| {
                    JournalError(format!(
                        "ceremony {} is corrupt: {e}",
                        String::from_utf8_lossy(&id)
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        all.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(b.id.cmp(&a.id)));
        Ok(all)
    }

    /// Writes `record` and flushes: nothing a step does next happens before
    /// this returns. Refused, with nothing written, if the stored record is
    /// no longer at the revision `record` was read at.
    pub async fn put(&self, record: &mut CeremonyRecord) -> Result<(), JournalError> {
        let read_at = record.revision;
        record.revision += 1;
        let written = self.write_over(record, read_at);
        if !matches!(written, Ok(true)) {
            record.revision = read_at;
        }
        if !written? {
            return Err(JournalError(format!(
                "ceremony {} was changed by another replica meanwhile; nothing was written, try again",
                record.id
            )));
        }
        self.flush().await
    }

    /// Writes `record` if the stored one is at revision `read_at` (absent:
    /// 0); `false` if it is not, and then nothing is written.
    fn write_over(&self, record: &CeremonyRecord, read_at: u64) -> Result<bool, JournalError> {
        let id = record.id.as_bytes();
        let bytes = crate::stored::seal(id, record).map_err(err)?;
        let finished = record.phase.finished();
        self.db
            .transaction(&[&self.ceremonies, &self.unfinished], |tx| {
                let stored = match tx.get(&self.ceremonies, id)? {
                    None => 0,
                    Some(stored) => {
                        crate::stored::open::<CeremonyRecord>(id, &stored)
                            .map_err(|e| {
                                TxError::abort(format!("ceremony {} is corrupt: {e}", record.id))
                            })?
                            .revision
                    }
                };
                if stored != read_at {
                    return Ok(false);
                }
                tx.insert(&self.ceremonies, id, bytes.clone())?;
                if finished {
                    tx.remove(&self.unfinished, id)?;
                } else {
                    tx.insert(&self.unfinished, id, [])?;
                }
                Ok(true)
            })
            .map_err(err)
    }

    /// The unfinished ceremonies.
    pub fn unfinished(&self) -> Result<Vec<CeremonyRecord>, JournalError> {
        let mut records = Vec::new();
        for item in self.unfinished.iter() {
            let (id, _) = item.map_err(err)?;
            if let Some(record) = self.get(&String::from_utf8_lossy(&id))? {
                records.push(record);
            }
        }
        Ok(records)
    }

    /// The token's current backup KEK.
    pub fn backup_kek(&self) -> Result<Option<BackupKek>, JournalError> {
        self.backup_keks
            .get(CURRENT_BACKUP_KEK)
            .map_err(err)?
            .map(|bytes| crate::stored::open(CURRENT_BACKUP_KEK, &bytes).map_err(err))
            .transpose()
    }

    /// Every backup KEK the token holds (drift detection expects them).
    pub fn backup_kek_labels(&self) -> Result<Vec<String>, JournalError> {
        self.backup_keks
            .iter()
            .filter_map(|item| match item {
                Ok((key, _)) if key.as_slice() == CURRENT_BACKUP_KEK => None,
                Ok((key, _)) => Some(Ok(String::from_utf8_lossy(&key).into_owned())),
                Err(e) => Some(Err(err(e))),
            })
            .collect()
    }

    /// Records `kek`, made by a KEK ceremony, among the token's backup KEKs,
    /// durably (idempotent: a roll-forward after a crash may do it again).
    /// It does not become the current one: only an ACTIVATE_BACKUP_KEK
    /// operation the administrative quorum approved does that
    /// ([`Journal::make_current`], threat model I1).
    pub async fn record_backup_kek(&self, kek: &BackupKek) -> Result<(), JournalError> {
        let bytes = crate::stored::seal(kek.label.as_bytes(), kek).map_err(err)?;
        self.backup_keks
            .insert(kek.label.as_bytes(), bytes)
            .map_err(err)?;
        self.flush().await
    }

    /// The backup KEK ceremony `ceremony` made, if it made one.
    pub fn backup_kek_of(&self, ceremony: &str) -> Result<Option<BackupKek>, JournalError> {
        Ok(self
            .recorded_backup_keks()?
            .into_iter()
            .find(|kek| kek.ceremony == ceremony))
    }

    /// Every backup KEK recorded, current or not: any of them may be made
    /// current by an ACTIVATE_BACKUP_KEK.
    pub fn recorded_backup_keks(&self) -> Result<Vec<BackupKek>, JournalError> {
        let mut keks = Vec::new();
        for item in self.backup_keks.iter() {
            let (key, bytes) = item.map_err(err)?;
            if key.as_slice() != CURRENT_BACKUP_KEK {
                keks.push(crate::stored::open(&key, &bytes).map_err(err)?);
            }
        }
        Ok(keks)
    }

    /// Makes `kek`, one recorded by [`Journal::record_backup_kek`], the
    /// token's current backup KEK, durably.
    pub async fn make_current(&self, kek: &BackupKek) -> Result<(), JournalError> {
        if self
            .backup_keks
            .get(kek.label.as_bytes())
            .map_err(err)?
            .is_none()
        {
            return Err(JournalError(format!(
                "backup KEK {} is not one of the token's",
                kek.label
            )));
        }
        let bytes = crate::stored::seal(CURRENT_BACKUP_KEK, kek).map_err(err)?;
        self.backup_keks
            .insert(CURRENT_BACKUP_KEK, bytes)
            .map_err(err)?;
        self.flush().await
    }

    async fn flush(&self) -> Result<(), JournalError> {
        self.db
            .flush_async()
            .await
            .map(drop)
            .map_err(|e| JournalError(format!("flush: {e}")))
    }
}

/// Checks the stored journal (trees `ceremonies`, `ceremonies_unfinished`
/// and `backup_keks`, threat model F1): every record decodes and is stored
/// under its own id or label; the unfinished index lists exactly the
/// ceremonies not finished (recovery at start reads only it, so a ceremony
/// missing from it would never be rolled back); the current backup KEK is
/// one of the recorded ones, and each names the ceremony that made it.
/// Returns, per completed ceremony, the key ids it registered (for the
/// check against the registry).
pub fn check_stored(
    db: &custody_store::Store,
    findings: &mut crate::findings::Findings,
) -> Vec<(String, Vec<String>)> {
    use crate::findings::{each_record, json_record};
    use std::collections::BTreeMap;
    let mut phases = BTreeMap::new();
    let mut registered = Vec::new();
    each_record(db, "ceremonies", findings, |id, bytes, findings| {
        let Some(record) =
            json_record::<CeremonyRecord>("ceremonies", id, bytes, "a ceremony record", findings)
        else {
            return;
        };
        if record.id.as_bytes() != id {
            findings.add(
                "ceremonies",
                id,
                format!(
                    "expected the record of the ceremony stored under this id, found ceremony {:?}",
                    record.id
                ),
            );
        }
        if record.phase == Phase::Completed {
            registered.push((record.id.clone(), record.reserved_key_ids.clone()));
        }
        phases.insert(id.to_vec(), record.phase);
    });
    let mut indexed = std::collections::BTreeSet::new();
    each_record(
        db,
        "ceremonies_unfinished",
        findings,
        |id, value, findings| {
            indexed.insert(id.to_vec());
            match phases.get(id) {
                None => findings.add(
                    "ceremonies_unfinished",
                    id,
                    "expected a ceremony of this id in tree `ceremonies`, found none",
                ),
                Some(phase) if phase.finished() => findings.add(
                    "ceremonies_unfinished",
                    id,
                    format!("expected an unfinished ceremony, found it {phase:?}"),
                ),
                Some(_) if !value.is_empty() => findings.add(
                    "ceremonies_unfinished",
                    id,
                    "expected an empty value (the index holds ids only)",
                ),
                Some(_) => {}
            }
        },
    );
    for (id, phase) in &phases {
        if !phase.finished() && !indexed.contains(id) {
            findings.add(
                "ceremonies_unfinished",
                id,
                format!("expected an entry for this ceremony, {phase:?} in tree `ceremonies`"),
            );
        }
    }
    let mut labels = std::collections::BTreeSet::new();
    let mut current = None;
    each_record(db, "backup_keks", findings, |key, bytes, findings| {
        let Some(kek) =
            json_record::<BackupKek>("backup_keks", key, bytes, "a backup KEK", findings)
        else {
            return;
        };
        if key == CURRENT_BACKUP_KEK {
            current = Some(kek);
            return;
        }
        if kek.label.as_bytes() != key {
            findings.add(
                "backup_keks",
                key,
                format!(
                    "expected the KEK stored under its label, found label {:?}",
                    kek.label
                ),
            );
        }
        // Recorded just before its ceremony is journaled completed: a
        // crash between leaves it recorded with the ceremony unfinished.
        if !phases.contains_key(kek.ceremony.as_bytes()) {
            findings.add(
                "backup_keks",
                key,
                format!(
                    "expected ceremony {:?}, which made it, in tree `ceremonies`",
                    kek.ceremony
                ),
            );
        }
        labels.insert(kek.label);
    });
    if let Some(kek) = current {
        if !labels.contains(&kek.label) {
            findings.add(
                "backup_keks",
                CURRENT_BACKUP_KEK,
                format!(
                    "expected the current backup KEK {:?} among the recorded ones",
                    kek.label
                ),
            );
        }
    }
    registered
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use super::*;

    fn record(id: &str) -> CeremonyRecord {
        CeremonyRecord {
            id: id.into(),
            kind: "root-key".into(),
            script: String::new(),
            bundle: String::new(),
            csr_hex: String::new(),
            certificate_hex: String::new(),
            phase: Phase::AwaitingOfficers,
            opened_by: "alice".into(),
            created_ms: 1,
            updated_ms: 1,
            revision: 0,
            secrets_held_by: None,
            present: Vec::new(),
            confirmed: Vec::new(),
            done: Vec::new(),
            objects: Vec::new(),
            reserved_key_ids: Vec::new(),
            key: None,
            certification: None,
            destruction: None,
            key_policies: None,
            backup_kek: None,
            shares_collected: Vec::new(),
            components: Vec::new(),
            shares_submitted: Vec::new(),
            shares_needed: 0,
            backup_bundle: String::new(),
            restore: None,
            error: String::new(),
            transcript: Transcript::new(id, "root-key", &[0; 32]),
        }
    }

    fn signed(officer: &str) -> Signed {
        Signed {
            officer: officer.into(),
            signature: String::new(),
            time_ms: 2,
        }
    }

    #[tokio::test]
    async fn a_write_over_a_revision_another_writer_moved_on_from_is_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = custody_store::Store::open_sled(dir.path(), 16 << 20).unwrap();
        let journal = Journal::open(&store).unwrap();
        let mut opened = record("c1");
        journal.put(&mut opened).await.unwrap();
        assert_eq!(opened.revision, 1);
        // Two writers read the record at the same revision (a replica
        // whose hold of the engine's lock lapsed, and the next holder).
        let mut stalled = journal.get("c1").unwrap().unwrap();
        let mut next = journal.get("c1").unwrap().unwrap();
        next.present.push(signed("bob"));
        journal.put(&mut next).await.unwrap();
        stalled.present.push(signed("mallory"));
        stalled.phase = Phase::Aborted;
        let refused = journal.put(&mut stalled).await.unwrap_err();
        assert!(
            refused.0.contains("changed by another replica"),
            "{refused}"
        );
        assert_eq!(
            stalled.revision, 1,
            "the refused copy keeps the revision it was read at"
        );
        let stored = journal.get("c1").unwrap().unwrap();
        assert_eq!(stored.revision, 2);
        assert_eq!(stored.present, vec![signed("bob")]);
        assert_eq!(stored.phase, Phase::AwaitingOfficers);
        assert_eq!(
            journal.unfinished().unwrap().len(),
            1,
            "still indexed as unfinished"
        );
    }
}
