//! The key registry: key name → algorithm, signers and versions, in the store.
//!
//! The whole registry is read into memory at start (10,000 keys load in
//! milliseconds; see docs/benchmarks.md), so the signing path never reads the
//! disk or searches the HSM: a request's key version maps straight to an HSM
//! label whose handle `hsm-shim` caches. Every change is written to the store and
//! flushed before it is acknowledged, one change at a time under
//! [`Registry::lock`]. Replicas sharing the store keep their copies current
//! through the registry's epoch ([`crate::shared`]): [`Registry::refresh`]
//! reloads a copy another replica's change made stale, and a change lands
//! only over the epoch its writer loaded.
//!
//! New versions (a created key's first, a rotation's next) are journaled:
//! a [`PendingVersion`] is written and flushed before the HSM generates the
//! key, and removed in the same atomic batch that commits the version to
//! the key. A pending entry found at start is a generation custodyd did not
//! finish; the daemon rolls it back (destroys whatever the HSM made under its
//! label), so a half-made version is never usable.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use crate::shared::{Copy, Domain, Epochs};

mod pending;

use serde::{Deserialize, Serialize};

/// The lifecycle state of one key version, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionState {
    /// Generated, not yet signing.
    PreActivation,
    /// Signs.
    Active,
    /// Barred from signing for now.
    Suspended,
    /// Retired: verifies and decrypts, never signs or encrypts again.
    Deactivated,
    /// Known or suspected compromised.
    Compromised,
    /// Destroyed in the HSM.
    Destroyed,
}

impl VersionState {
    /// Every state.
    pub const ALL: [VersionState; 6] = [
        VersionState::PreActivation,
        VersionState::Active,
        VersionState::Suspended,
        VersionState::Deactivated,
        VersionState::Compromised,
        VersionState::Destroyed,
    ];

    /// The API name (`ACTIVE`, …), as approved operations record it.
    pub fn api_name(self) -> &'static str {
        match self {
            VersionState::PreActivation => "PRE_ACTIVATION",
            VersionState::Active => "ACTIVE",
            VersionState::Suspended => "SUSPENDED",
            VersionState::Deactivated => "DEACTIVATED",
            VersionState::Compromised => "COMPROMISED",
            VersionState::Destroyed => "DESTROYED",
        }
    }

    /// The state of an API name.
    pub fn from_api_name(name: &str) -> Option<VersionState> {
        Self::ALL.into_iter().find(|s| s.api_name() == name)
    }
}

/// One version of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// Version number, from 1.
    pub version: u32,
    /// Current state.
    pub state: VersionState,
    /// Unix milliseconds of generation.
    pub created_ms: i64,
    /// Unix milliseconds of the last state change.
    pub state_ms: i64,
    /// The HSM label (`CKA_LABEL`/`CKA_ID`) of the key pair.
    pub hsm_label: String,
    /// SubjectPublicKeyInfo DER, hex.
    pub public_key_der_hex: String,
    /// SubjectPublicKeyInfo PEM.
    pub public_key_pem: String,
    /// Unix milliseconds when the version first became active.
    #[serde(default)]
    pub activated_ms: Option<i64>,
    /// Unix milliseconds when the version is scheduled to be, or was,
    /// destroyed.
    #[serde(default)]
    pub destroy_at_ms: Option<i64>,
    /// The reason of a legal hold, while one is in place.
    #[serde(default)]
    pub legal_hold: Option<String>,
    /// Key check value of an AES version, hex.
    #[serde(default)]
    pub check_value: String,
    /// The version's certificate chain, PEM: its own certificate first,
    /// then its issuers' up to the root; set by the ceremony that made the
    /// certificate (a root-key ceremony: the self-signed root alone).
    #[serde(default)]
    pub certificate_chain_pem: Vec<String>,
    /// The key-destruction ceremony that reserved this scheduled version
    /// to witness its destruction: the scheduler leaves it to that
    /// ceremony until it completes or rolls back
    /// (`keys::check_due`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_by: Option<String>,
    /// The DESTROY_VERSION quorum the approval that scheduled this
    /// version's destruction was given under: it is carried out only while
    /// that is still the quorum in force (`keys::check_reservable`,
    /// threat model C28).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroy_approved_under: Option<crate::dual_control::quorum::Quorum>,
    /// When the scheduler began destroying this version: written, fenced,
    /// under the key's lock just before the HSM call. From then on the
    /// destruction is decided: it is no longer cancelled, held or brought
    /// back into use, and whichever replica leads next finishes it
    /// (`keys::destroy_due`, threat model S14).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroying_since_ms: Option<i64>,
}

impl VersionRecord {
    /// End of the cryptoperiod under `cryptoperiod_ms`, if the key has one and
    /// the version was ever activated.
    pub fn protect_until_ms(&self, cryptoperiod_ms: Option<i64>) -> Option<i64> {
        Some(self.activated_ms?.saturating_add(cryptoperiod_ms?))
    }
}

/// A rotation request id already honoured, with the version it made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationRequest {
    /// The caller's request id.
    pub request_id: String,
    /// The version that rotation made.
    pub version: u32,
}

/// How many rotation request ids each key remembers.
pub const REMEMBERED_ROTATIONS: usize = 64;

/// A key and its versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The key id (the `{key_id}` of `keys/{key_id}`).
    pub key_id: String,
    /// API name of the algorithm.
    pub algorithm: String,
    /// Principals allowed to sign.
    pub allowed_signers: Vec<String>,
    /// The version used when none is named.
    pub primary_version: u32,
    /// Versions, oldest first.
    pub versions: Vec<VersionRecord>,
    /// Unix milliseconds of creation.
    pub created_ms: i64,
    /// Quorum policies by operation kind (SIGN, ROTATE, SET_STATE, SET_POLICY).
    #[serde(default)]
    pub policies: std::collections::BTreeMap<String, crate::dual_control::quorum::Quorum>,
    /// How long a version may protect after activation, in milliseconds.
    #[serde(default)]
    pub cryptoperiod_ms: Option<i64>,
    /// Versions below this one are refused for verification and decryption.
    #[serde(default)]
    pub min_version: u32,
    /// The latest rotation request ids, oldest first (at most
    /// [`REMEMBERED_ROTATIONS`]).
    #[serde(default)]
    pub rotation_requests: Vec<RotationRequest>,
    /// Whether its versions may leave the HSM wrapped under the token's
    /// trusted backup KEK (and under nothing else).
    #[serde(default)]
    pub backup_exportable: bool,
    /// The primary version the key was retired at: deactivated while no
    /// other version was in use. The key stays retired while that version
    /// stays primary ([`KeyRecord::is_retired`]); a new primary (a
    /// rotation, a promotion) brings it back into use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at_version: Option<u32>,
}

/// A version whose generation has started but is not committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingVersion {
    /// The key.
    pub key_id: String,
    /// The version being made.
    pub version: u32,
    /// Its HSM label.
    pub hsm_label: String,
    /// What started it: create, rotate, schedule or compromise.
    pub trigger: String,
    /// Unix milliseconds when it started.
    pub started_ms: i64,
    /// The process making it (`Epochs::instance`); empty in an entry
    /// journaled before replicas.
    #[serde(default)]
    pub instance: String,
    /// Being rolled back: its commit is refused.
    #[serde(default)]
    pub abandoned: bool,
    /// A random id of the generation that wrote the entry (empty in one
    /// journaled before it): a version number is used again once an
    /// abandoned generation's entry is gone, so the label alone does not
    /// say whose objects it holds. Only this generation commits the entry,
    /// and a roll-back destroys under the label only while the entry is
    /// the one it read.
    #[serde(default)]
    pub generation: String,
}

impl KeyRecord {
    /// Version `n`, if it exists.
    pub fn version(&self, n: u32) -> Option<&VersionRecord> {
        self.versions.iter().find(|v| v.version == n)
    }

    /// Whether the key is retired: its primary version was deactivated
    /// with nothing else in use and is still primary. custodyd never
    /// replaces a retired key's primary on its own (a schedule, a
    /// compromise), so its end of life stays the end.
    pub fn is_retired(&self) -> bool {
        self.retired_at_version == Some(self.primary_version)
    }
}

/// A failure to read or write the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The write fence refused a write decided from a stale copy.
    #[error("key registry: {0}")]
    Stale(#[from] crate::shared::Stale),
    /// Any other failure, as described.
    #[error("key registry: {0}")]
    Failed(String),
}

/// Why a version commit failed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Nothing was written: the version may be rolled back.
    #[error("{0}")]
    NotApplied(RegistryError),
    /// Written but not flushed: the version stands (it is the registry's
    /// now), and must not be rolled back.
    #[error("{0}")]
    NotDurable(RegistryError),
}

/// The registry; see the module docs.
pub struct Registry {
    db: custody_store::Store,
    tree: custody_store::Keyspace,
    pending: custody_store::Keyspace,
    keys: RwLock<BTreeMap<String, Arc<KeyRecord>>>,
    /// The epoch `keys` stands at.
    copy: Copy,
}

/// Held while a change to the registry is read, decided and written.
pub struct RegistryGuard {
    _lock: custody_store::Claim,
}

fn store_error(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Failed(e.to_string())
}

impl Registry {
    /// Opens the registry in `db` and loads it into memory. A record that does
    /// not parse stops the start: a registry we cannot read is not guessed at.
    pub fn open(db: &custody_store::Store, epochs: &Epochs) -> Result<Registry, RegistryError> {
        let epoch = epochs.read(Domain::Registry).map_err(store_error)?;
        let keys = load(&db.keyspace("keys").map_err(store_error)?)?;
        Registry::with_keys(db, epochs, epoch, keys)
    }

    /// Opens the registry with the keys the start's integrity check read
    /// (a check that found nothing: the caller refuses to start otherwise),
    /// so each record is parsed once. `epoch` is the registry's epoch read
    /// before that check: a replica's change since then leaves the copy
    /// older than the store, and the next [`Registry::refresh`] reloads it.
    pub fn from_checked(
        db: &custody_store::Store,
        epochs: &Epochs,
        epoch: u64,
        checked: CheckedKeys,
    ) -> Result<Registry, RegistryError> {
        Registry::with_keys(db, epochs, epoch, checked.0)
    }

    fn with_keys(
        db: &custody_store::Store,
        epochs: &Epochs,
        epoch: u64,
        keys: BTreeMap<String, Arc<KeyRecord>>,
    ) -> Result<Registry, RegistryError> {
        Ok(Registry {
            db: db.clone(),
            tree: db.keyspace("keys").map_err(store_error)?,
            pending: db.keyspace("pending_versions").map_err(store_error)?,
            keys: RwLock::new(keys),
            copy: Copy::new(Domain::Registry, epochs, epoch),
        })
    }

    /// Reloads the copy in memory if another replica changed the registry
    /// since it was loaded: one store read when nothing changed.
    pub fn refresh(&self) -> Result<(), RegistryError> {
        self.refresh_to(self.copy.stored().map_err(store_error)?)
    }

    /// [`Registry::refresh`] to the epoch `stored`, read by the caller.
    pub fn refresh_to(&self, stored: u64) -> Result<(), RegistryError> {
        self.copy.refresh_to(stored, || {
            let keys = load(&self.tree)?;
            *self.keys.write().unwrap_or_else(PoisonError::into_inner) = keys;
            Ok(())
        })
    }

    /// Writes `records` and clears the pending entry `settled` in one
    /// transaction over the epoch this copy was loaded at; refused with
    /// [`crate::shared::Stale`] (nothing written) if another replica wrote
    /// since.
    fn write(
        &self,
        records: &[KeyRecord],
        settled: Option<(&str, &str)>,
    ) -> Result<(), RegistryError> {
        self.try_write(records, settled)
            .map_err(WriteFailure::into_error)
    }

    /// `settled`: the label and generation of the pending entry the write
    /// commits.
    fn try_write(
        &self,
        records: &[KeyRecord],
        settled: Option<(&str, &str)>,
    ) -> Result<(), WriteFailure> {
        let sealed = records
            .iter()
            .map(|record| {
                crate::stored::seal(record.key_id.as_bytes(), record)
                    .map(|bytes| (record.key_id.as_bytes(), bytes))
                    .map_err(|e| WriteFailure::NotWritten(store_error(e)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let loaded = self.copy.loaded();
        let epochs = self.copy.epochs();
        let spaces = [&self.tree, &self.pending, epochs.space()];
        let outcome = self
            .db
            .transaction(&spaces, |tx| {
                // A generation is committed only while its entry says it
                // is still being made: one rolled back meanwhile (its
                // replica taken for stopped) had its objects destroyed.
                if let Some((label, generation)) = settled {
                    let entry = tx.get(&self.pending, label.as_bytes())?;
                    let in_flight = entry
                        .and_then(|bytes| {
                            crate::stored::open::<PendingVersion>(label.as_bytes(), &bytes).ok()
                        })
                        .is_some_and(|entry| !entry.abandoned && entry.generation == generation);
                    if !in_flight {
                        return Ok(Written::NotInFlight);
                    }
                }
                let Some(next) = epochs.advance(tx, Domain::Registry, loaded)? else {
                    return Ok(Written::Stale);
                };
                for (id, bytes) in &sealed {
                    tx.insert(&self.tree, id, bytes)?;
                }
                if let Some((label, _)) = settled {
                    tx.remove(&self.pending, label.as_bytes())?;
                }
                Ok(Written::At(next))
            })
            .map_err(|e| match e {
                // No answer: the transaction landed whole or not at all.
                custody_store::StoreError::Unavailable(_) => WriteFailure::Unknown(store_error(e)),
                _ => WriteFailure::NotWritten(store_error(e)),
            })?;
        match outcome {
            Written::At(next) => {
                self.copy.wrote(next);
                Ok(())
            }
            // Ours is stale: the next refresh reloads it.
            Written::Stale => Err(WriteFailure::NotWritten(crate::shared::Stale.into())),
            Written::NotInFlight => Err(WriteFailure::NotWritten(RegistryError::Failed(format!(
                "the generation under {} was rolled back meanwhile; nothing was written",
                settled.map(|(label, _)| label).unwrap_or_default()
            )))),
        }
    }
}

/// What a registry write's transaction did.
enum Written {
    /// Landed, moving the epoch to this.
    At(u64),
    /// Nothing: the copy it was decided from is stale.
    Stale,
    /// Nothing: the generation it commits is no longer in flight.
    NotInFlight,
}

/// A registry write that failed: whether it may have landed.
enum WriteFailure {
    NotWritten(RegistryError),
    /// The store did not answer: written or not, nobody knows yet.
    Unknown(RegistryError),
}

impl WriteFailure {
    fn into_error(self) -> RegistryError {
        match self {
            WriteFailure::NotWritten(e) | WriteFailure::Unknown(e) => e,
        }
    }
}

/// Every record of `tree`, as the registry holds them.
fn load(tree: &custody_store::Keyspace) -> Result<BTreeMap<String, Arc<KeyRecord>>, RegistryError> {
    let mut keys = BTreeMap::new();
    for item in tree.iter() {
        let (id, bytes) = item.map_err(|e| RegistryError::Failed(e.to_string()))?;
        let record = parse(&id, &bytes).map_err(|e| {
            RegistryError::Failed(format!(
                "record {:?} is corrupt: {e}",
                String::from_utf8_lossy(&id)
            ))
        })?;
        keys.insert(record.key_id.clone(), Arc::new(record));
    }
    Ok(keys)
}

/// One stored key record as the registry holds it: the one rule both
/// [`load`] and [`check_stored`] read a record by, so the start parses each
/// record once ([`Registry::from_checked`]).
fn parse(id: &[u8], bytes: &[u8]) -> Result<KeyRecord, String> {
    let mut record: KeyRecord = crate::stored::open(id, bytes)?;
    // Records written before activation times were kept: a version that
    // was ever active counts from its creation, so that its cryptoperiod
    // applies.
    for version in &mut record.versions {
        if version.activated_ms.is_none() && version.state != VersionState::PreActivation {
            version.activated_ms = Some(version.created_ms);
        }
    }
    Ok(record)
}

/// The registry as [`check_stored`] read it, each record parsed once: what
/// [`Registry::from_checked`] opens with when the check found nothing.
#[derive(Debug, Default)]
pub struct CheckedKeys(BTreeMap<String, Arc<KeyRecord>>);

impl CheckedKeys {
    /// Whether key `key_id` was found.
    pub fn contains_key(&self, key_id: &str) -> bool {
        self.0.contains_key(key_id)
    }

    /// How many keys were found.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if no key was found.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Registry {
    /// Number of keys.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// True if there are no keys.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// The key `key_id`.
    pub fn get(&self, key_id: &str) -> Option<Arc<KeyRecord>> {
        self.read().get(key_id).cloned()
    }

    /// Up to `limit` keys whose id comes after `after`, in id order.
    pub fn list(&self, after: Option<&str>, limit: usize) -> Vec<Arc<KeyRecord>> {
        let keys = self.read();
        let range = match after {
            Some(after) => {
                keys.range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            }
            None => keys.range::<str, _>(..),
        };
        range.take(limit).map(|(_, k)| k.clone()).collect()
    }

    /// Serialises changes, across replicas too: hold the guard from reading
    /// a record to writing it. Taking it brings the copy in memory up to
    /// the store.
    pub async fn lock(&self) -> Result<RegistryGuard, RegistryError> {
        let lock = self
            .copy
            .epochs()
            .lock(Domain::Registry)
            .await
            .map_err(|e| RegistryError::Failed(format!("the registry's lock: {e}")))?;
        self.refresh()?;
        Ok(RegistryGuard { _lock: lock })
    }

    /// Writes `record` durably (written and flushed), then makes it visible.
    pub async fn put(&self, record: KeyRecord) -> Result<(), RegistryError> {
        self.write(std::slice::from_ref(&record), None)?;
        self.flush().await?;
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        keys.insert(record.key_id.clone(), Arc::new(record));
        Ok(())
    }

    /// Writes `records` in one atomic batch, durably, then makes them
    /// visible: a restore registers all its keys or none.
    pub async fn put_all(&self, records: Vec<KeyRecord>) -> Result<(), RegistryError> {
        self.write(&records, None)?;
        self.flush().await?;
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        for record in records {
            keys.insert(record.key_id.clone(), Arc::new(record));
        }
        Ok(())
    }

    /// Commits `record` (which holds the new version) and clears the pending
    /// entry `hsm_label` in one transaction, durably, then makes it visible.
    pub async fn commit_version(
        &self,
        record: KeyRecord,
        hsm_label: &str,
        generation: &str,
    ) -> Result<(), CommitError> {
        match self.try_write(std::slice::from_ref(&record), Some((hsm_label, generation))) {
            Ok(()) => {}
            Err(WriteFailure::NotWritten(e)) => {
                return Err(CommitError::NotApplied(RegistryError::Failed(format!(
                    "commit: {e}"
                ))));
            }
            // It may stand: never rolled back on a guess. The pending entry
            // says which at the next start, and the next refresh of the copy
            // in memory drops the version if it did not land.
            Err(WriteFailure::Unknown(e)) => {
                let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
                keys.insert(record.key_id.clone(), Arc::new(record));
                return Err(CommitError::NotDurable(RegistryError::Failed(format!(
                    "commit: {e}"
                ))));
            }
        }
        // Applied: the store serves it from now on whether or not the flush
        // succeeds, so memory must agree, or a retry would reuse the label.
        let flushed = self.flush().await;
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        keys.insert(record.key_id.clone(), Arc::new(record));
        flushed.map_err(CommitError::NotDurable)
    }

    async fn flush(&self) -> Result<(), RegistryError> {
        self.db
            .flush_async()
            .await
            .map(drop)
            .map_err(|e| RegistryError::Failed(format!("flush: {e}")))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<KeyRecord>>> {
        self.keys.read().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Checks the stored registry without loading it (threat model F1): every
/// record of `keys` decodes, is stored under its own id, and numbers its
/// versions upwards, each under a label of its number, with the primary
/// among them; every entry of `pending_versions` decodes, is stored under
/// its label, and is not a version its key already holds (the commit
/// clears the entry in the same transaction). Returns the keys found, each
/// read by the rule the registry loads by, for the checks across trees and
/// for [`Registry::from_checked`].
pub fn check_stored(
    db: &custody_store::Store,
    findings: &mut crate::findings::Findings,
) -> CheckedKeys {
    use crate::findings::{each_record, json_record};
    let mut keys = BTreeMap::new();
    each_record(db, "keys", findings, |id, bytes, findings| {
        let record = match parse(id, bytes) {
            Ok(record) => record,
            Err(e) => {
                let found = format!("expected a key record, found {} bytes: {e}", bytes.len());
                findings.add("keys", id, found);
                return;
            }
        };
        let mut add = |expected: String| findings.add("keys", id, expected);
        if record.key_id.as_bytes() != id {
            add(format!(
                "expected the record of the key stored under this id, found key {:?}",
                record.key_id
            ));
        }
        if crate::names::check_key_id(&record.key_id).is_err() {
            add("expected a valid key id".into());
        }
        let mut previous = 0;
        for version in &record.versions {
            if version.version <= previous {
                add(format!(
                    "expected versions numbered upwards, found version {} after {previous}",
                    version.version
                ));
            }
            previous = version.version;
            if !version
                .hsm_label
                .ends_with(&format!("/v{}", version.version))
            {
                add(format!(
                    "expected version {}'s HSM label to end in /v{}, found {:?}",
                    version.version, version.version, version.hsm_label
                ));
            }
        }
        if record.version(record.primary_version).is_none() {
            add(format!(
                "expected the primary version {} among the key's versions",
                record.primary_version
            ));
        }
        keys.insert(record.key_id.clone(), Arc::new(record));
    });
    each_record(
        db,
        "pending_versions",
        findings,
        |label, bytes, findings| {
            let Some(pending) = json_record::<PendingVersion>(
                "pending_versions",
                label,
                bytes,
                "a pending version",
                findings,
            ) else {
                return;
            };
            if pending.hsm_label.as_bytes() != label {
                findings.add(
                    "pending_versions",
                    label,
                    format!(
                        "expected the entry stored under its label, found label {:?}",
                        pending.hsm_label
                    ),
                );
            }
            let committed = keys
                .get(&pending.key_id)
                .is_some_and(|record: &Arc<KeyRecord>| record.version(pending.version).is_some());
            if committed {
                findings.add(
                "pending_versions",
                label,
                format!(
                    "expected no pending entry for version {} of {}, which the registry holds (tree `keys`)",
                    pending.version, pending.key_id
                ),
            );
            }
        },
    );
    CheckedKeys(keys)
}

#[cfg(test)]
mod tests;
