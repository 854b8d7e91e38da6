//! Officers, the administrative quorum and operations, in the store. Every change is
//! flushed before it is acknowledged; officers are also held in memory.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{PoisonError, RwLock};

use serde::{Deserialize, Serialize};

use super::operation::{OperationRecord, OperationState};
use super::operation_store::{Cursor, OperationStore, Page, Scope};
use super::quorum::{CastVote, Quorum, VoteKind};
use crate::identity::valid_principal_name;
use crate::shared::{Copy, Domain, Epochs, Stale};

/// Why a change to officers or operations was not written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The write fence refused a change decided from a stale copy.
    #[error(transparent)]
    Stale(#[from] Stale),
    /// Refused or failed otherwise, as described.
    #[error("{0}")]
    Failed(String),
}

impl From<String> for WriteError {
    fn from(message: String) -> Self {
        WriteError::Failed(message)
    }
}

/// An enrolled officer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfficerRecord {
    /// Officer id.
    pub officer_id: String,
    /// The principal of the officer's client certificate.
    pub principal: String,
    /// Ed25519 public key, hex.
    pub public_key: String,
    /// Unix milliseconds of enrollment.
    pub enrolled_ms: i64,
}

/// The genesis file: the first officer set and the administrative quorum.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Genesis {
    /// Approvals needed for officer-set changes and default policy changes.
    pub required: u32,
    /// The officers.
    pub officers: Vec<GenesisOfficer>,
}

/// One officer of the genesis file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenesisOfficer {
    /// Officer id.
    pub id: String,
    /// Certificate principal.
    pub principal: String,
    /// Ed25519 public key, hex (as `custodyctl officer keygen` prints it).
    pub public_key: String,
}

impl Genesis {
    /// Reads and checks a genesis file.
    pub fn load(path: &Path) -> Result<Genesis, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut genesis: Genesis =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut principals = std::collections::BTreeSet::new();
        let mut keys = std::collections::BTreeSet::new();
        for officer in &mut genesis.officers {
            check_officer(&officer.id, &officer.principal, &officer.public_key)?;
            // One spelling of a key, so that no comparison of keys as text
            // takes one key in two cases for two keys.
            officer.public_key = officer.public_key.to_ascii_lowercase();
            if !principals.insert(&officer.principal) || !keys.insert(&officer.public_key) {
                return Err(format!(
                    "{}: officer {} shares a principal or key with another",
                    path.display(),
                    officer.id
                ));
            }
        }
        Quorum::new(
            genesis.officers.iter().map(|o| o.id.clone()),
            genesis.required,
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(genesis)
    }
}

/// Whether two hex public keys are one key: compared as bytes, since a
/// record stored before keys were kept in one spelling may hold one in
/// upper case.
fn same_key(a: &str, b: &str) -> bool {
    hex::decode(a).ok() == hex::decode(b).ok()
}

/// Checks an officer's id, principal and public key.
pub fn check_officer(id: &str, principal: &str, public_key: &str) -> Result<(), String> {
    if !valid_principal_name(id) {
        return Err(format!("invalid officer id {}", crate::text::echo(id)));
    }
    if !valid_principal_name(principal) {
        return Err(format!(
            "invalid principal {} for officer {id}",
            crate::text::echo(principal)
        ));
    }
    let key =
        hex::decode(public_key).map_err(|_| format!("officer {id}: public key is not hex"))?;
    // The key must be one shares can be sealed to (a small-order point
    // could not be), as well as one that verifies.
    super::sealed::recipient_point(&key).map_err(|why| format!("officer {id}: {why}"))?;
    Ok(())
}

/// The dual-control store.
pub struct DualControlStore {
    db: custody_store::Store,
    officers_tree: custody_store::Keyspace,
    operations: OperationStore,
    meta: custody_store::Keyspace,
    officers: RwLock<BTreeMap<String, OfficerRecord>>,
    admin_required: RwLock<u32>,
    /// The epoch the officers stand at.
    copy: Copy,
}

/// Held while officers or operations are read, decided and written.
pub struct DualControlGuard {
    _lock: custody_store::Claim,
}

const ADMIN_REQUIRED: &[u8] = b"admin_required";

fn store_error(e: impl std::fmt::Display) -> String {
    format!("dual-control store: {e}")
}

impl DualControlStore {
    /// Opens the store in `db`.
    pub fn open(db: &custody_store::Store, epochs: &Epochs) -> Result<Self, String> {
        let officers_tree = db.keyspace("officers").map_err(store_error)?;
        let meta = db.keyspace("dual_control").map_err(store_error)?;
        let operations = OperationStore::open(db, &meta)?;
        let epoch = epochs.read(Domain::DualControl).map_err(store_error)?;
        let (officers, admin_required) = load(&officers_tree, &meta)?;
        Ok(Self {
            db: db.clone(),
            officers_tree,
            operations,
            meta,
            officers: RwLock::new(officers),
            admin_required: RwLock::new(admin_required),
            copy: Copy::new(Domain::DualControl, epochs, epoch),
        })
    }

    /// Reloads the officers and the administrative quorum if another
    /// replica changed them (or any operation) since they were loaded: one
    /// store read when nothing changed.
    pub fn refresh(&self) -> Result<(), String> {
        self.refresh_to(self.copy.stored().map_err(store_error)?)
    }

    /// [`DualControlStore::refresh`] to the epoch `stored`, read by the
    /// caller.
    pub fn refresh_to(&self, stored: u64) -> Result<(), String> {
        self.copy.refresh_to(stored, || {
            let (officers, admin_required) = load(&self.officers_tree, &self.meta)?;
            *self
                .officers
                .write()
                .unwrap_or_else(PoisonError::into_inner) = officers;
            *self
                .admin_required
                .write()
                .unwrap_or_else(PoisonError::into_inner) = admin_required;
            Ok(())
        })
    }

    /// Applies `batch` in one transaction over the epoch this replica
    /// loaded, moving it on; refused with [`Stale`]
    /// (nothing written) if another replica wrote since: the write fence
    /// of every change to officers and operations.
    fn commit(&self, batch: &custody_store::Batch) -> Result<(), WriteError> {
        let loaded = self.copy.loaded();
        let epochs = self.copy.epochs();
        let mut spaces = vec![&self.officers_tree, &self.meta, epochs.space()];
        spaces.extend(self.operations.keyspaces());
        let advanced = self
            .db
            .transaction(&spaces, |tx| {
                let Some(next) = epochs.advance(tx, Domain::DualControl, loaded)? else {
                    return Ok(None);
                };
                tx.apply(batch)?;
                Ok(Some(next))
            })
            .map_err(store_error)?;
        let next = advanced.ok_or(Stale)?;
        self.copy.wrote(next);
        Ok(())
    }

    /// Applies `genesis` if no officer is enrolled yet; returns whether it did.
    pub async fn apply_genesis(&self, genesis: &Genesis, now_ms: i64) -> Result<bool, WriteError> {
        let _guard = self.lock().await?;
        if !self.officers().is_empty() {
            return Ok(false);
        }
        let records: Vec<OfficerRecord> = genesis
            .officers
            .iter()
            .map(|officer| OfficerRecord {
                officer_id: officer.id.clone(),
                principal: officer.principal.clone(),
                public_key: officer.public_key.clone(),
                enrolled_ms: now_ms,
            })
            .collect();
        let mut batch = custody_store::Batch::default();
        for record in &records {
            self.write_officer(&mut batch, record)?;
        }
        batch.insert(&self.meta, ADMIN_REQUIRED, genesis.required.to_be_bytes());
        self.commit(&batch)?;
        self.flush().await?;
        // Visible only once durable.
        for record in records {
            self.remember_officer(record);
        }
        *self
            .admin_required
            .write()
            .unwrap_or_else(PoisonError::into_inner) = genesis.required;
        Ok(true)
    }

    /// Serialises changes to officers and operations, across replicas too.
    /// Taking it brings the officers in memory up to the store.
    pub async fn lock(&self) -> Result<DualControlGuard, String> {
        let lock = self
            .copy
            .epochs()
            .lock(Domain::DualControl)
            .await
            .map_err(|e| store_error(format!("the dual-control lock: {e}")))?;
        self.refresh()?;
        Ok(DualControlGuard { _lock: lock })
    }

    /// All enrolled officers.
    pub fn officers(&self) -> Vec<OfficerRecord> {
        self.officers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// One officer.
    pub fn officer(&self, id: &str) -> Option<OfficerRecord> {
        self.officers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// The officer bound to a certificate principal.
    pub fn officer_for_principal(&self, principal: &str) -> Option<OfficerRecord> {
        self.officers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .find(|o| o.principal == principal)
            .cloned()
    }

    /// Whether `vote`, cast as `kind` by `officer_id` on the operation whose
    /// digest is `digest`, still stands: the officer is enrolled now, with
    /// the key that signed it (the one it verified with when cast). So a vote does not outlive its officer's
    /// enrollment: an id removed and enrolled again (for someone else, or
    /// with another key) does not inherit the votes cast under it before.
    pub fn vote_stands(
        &self,
        officer_id: &str,
        digest: &[u8; 32],
        kind: VoteKind,
        vote: &CastVote,
    ) -> bool {
        let Some(officer) = self.officer(officer_id) else {
            return false;
        };
        // The key it verified with when cast, compared as bytes (no
        // signature checked again at every count); a vote stored before
        // the key was kept is verified with the key enrolled now.
        if !vote.key.is_empty() {
            return same_key(&vote.key, &officer.public_key);
        }
        let message = match kind {
            VoteKind::Approve => super::approval_message(digest),
            VoteKind::Deny => super::denial_message(digest),
        };
        match (
            hex::decode(&officer.public_key),
            hex::decode(&vote.signature),
        ) {
            (Ok(key), Ok(signature)) => super::officer_key::verify(&key, &message, &signature),
            _ => false,
        }
    }

    /// True if `id` is enrolled now.
    pub fn enrolled(&self, id: &str) -> bool {
        self.officers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(id)
    }

    /// Approvals needed for administrative operations (0 before genesis).
    pub fn admin_required(&self) -> u32 {
        *self
            .admin_required
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The administrative quorum: every enrolled officer, `admin_required` of them.
    pub fn admin_quorum(&self) -> Result<Quorum, String> {
        let required = self.admin_required();
        if required == 0 {
            return Err("no officers are enrolled (no genesis file was applied)".into());
        }
        let members = self.officers().into_iter().map(|o| o.officer_id);
        Quorum::new(members, required)
    }

    /// Enrolls a new officer, durably, then makes it visible. Refuses an id,
    /// principal or key already enrolled. Hold [`Self::lock`].
    pub async fn add_officer(&self, officer: OfficerRecord) -> Result<(), WriteError> {
        let clash = self.officers().into_iter().find(|o| {
            o.officer_id == officer.officer_id
                || o.principal == officer.principal
                || same_key(&o.public_key, &officer.public_key)
        });
        if let Some(existing) = clash {
            return Err(WriteError::Failed(format!(
                "officer {} already holds that id, principal or key",
                existing.officer_id
            )));
        }
        let mut batch = custody_store::Batch::default();
        self.write_officer(&mut batch, &officer)?;
        self.commit(&batch)?;
        self.flush().await?;
        self.remember_officer(officer);
        Ok(())
    }

    /// Removes an officer, durably. Refuses to leave fewer officers than the
    /// administrative quorum needs. Hold [`Self::lock`].
    pub async fn remove_officer(&self, id: &str) -> Result<(), WriteError> {
        if self.officers().len() as u32 <= self.admin_required() {
            return Err(WriteError::Failed(format!(
                "removing {id} would leave fewer officers than the {} approvals the administrative quorum needs",
                self.admin_required()
            )));
        }
        let mut batch = custody_store::Batch::default();
        batch.remove(&self.officers_tree, id.as_bytes());
        self.commit(&batch)?;
        self.flush().await?;
        self.officers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        Ok(())
    }

    fn write_officer(
        &self,
        batch: &mut custody_store::Batch,
        officer: &OfficerRecord,
    ) -> Result<(), String> {
        let bytes =
            crate::stored::seal(officer.officer_id.as_bytes(), officer).map_err(store_error)?;
        batch.insert(&self.officers_tree, officer.officer_id.as_bytes(), bytes);
        Ok(())
    }

    fn remember_officer(&self, officer: OfficerRecord) {
        self.officers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(officer.officer_id.clone(), officer);
    }

    /// One operation.
    pub fn operation(&self, id: &str) -> Result<Option<OperationRecord>, String> {
        self.operations.get(id)
    }

    /// Every operation in the store (unordered): reads them all, so only
    /// for tests and tools; requests and the sweep use the indexes.
    pub fn operations(&self) -> Result<Vec<OperationRecord>, String> {
        self.operations.all()
    }

    /// The pending operations (O(pending), from the pending index).
    pub fn pending_operations(&self) -> Result<Vec<OperationRecord>, String> {
        self.operations.pending()
    }

    /// How many operations `requester` has pending, and when the first of
    /// them expires.
    pub fn pending_of(&self, requester: &str) -> Result<(usize, Option<i64>), String> {
        self.operations.pending_of(requester)
    }

    /// One page of the operations in `scope` (see [`OperationStore::page`]).
    pub fn operations_page(
        &self,
        scope: Scope<'_>,
        state: Option<OperationState>,
        after: Option<&Cursor>,
        size: usize,
    ) -> Result<Page, String> {
        self.operations.page(scope, state, after, size)
    }

    /// Operations in the store by state.
    pub fn operation_counts(&self) -> [(&'static str, usize); 5] {
        self.operations.counts()
    }

    /// Ids of up to `max` operations finished before `before_ms`.
    pub fn finished_before(&self, before_ms: i64, max: usize) -> Result<Vec<String>, String> {
        self.operations.finished_before(before_ms, max)
    }

    /// Removes finished operations, durably. Hold [`Self::lock`].
    pub async fn prune_operations(&self, ids: &[String]) -> Result<usize, WriteError> {
        self.operations
            .prune(ids, |batch| self.commit(&batch))
            .await
    }

    /// Writes an operation and its index entries durably. Hold [`Self::lock`].
    pub async fn put_operation(&self, operation: &OperationRecord) -> Result<(), WriteError> {
        self.operations
            .put(operation, |batch| self.commit(&batch))
            .await
    }

    async fn flush(&self) -> Result<(), String> {
        self.db
            .flush_async()
            .await
            .map(drop)
            .map_err(|e| store_error(format!("flush: {e}")))
    }
}

/// The officers and the administrative quorum as stored.
fn load(
    officers_tree: &custody_store::Keyspace,
    meta: &custody_store::Keyspace,
) -> Result<(BTreeMap<String, OfficerRecord>, u32), String> {
    let mut officers = BTreeMap::new();
    for item in officers_tree.iter() {
        let (id, bytes) = item.map_err(store_error)?;
        let officer: OfficerRecord = crate::stored::open(&id, &bytes)
            .map_err(|e| store_error(format!("corrupt officer record: {e}")))?;
        officers.insert(officer.officer_id.clone(), officer);
    }
    let admin_required = match meta.get(ADMIN_REQUIRED).map_err(store_error)? {
        Some(bytes) => u32::from_be_bytes(
            bytes
                .as_slice()
                .try_into()
                .map_err(|_| store_error("corrupt admin quorum"))?,
        ),
        None => 0,
    };
    Ok((officers, admin_required))
}

/// Checks the stored dual-control state (threat model F1): every officer
/// record decodes, is stored under its id and names a valid principal and
/// Ed25519 key; `dual_control` holds the administrative quorum (4 bytes,
/// 1 to the number of officers) and the index mark and nothing else; then the operations and their
/// indexes ([`super::operation_store::check_stored`]). A deleted officer
/// record leaves a smaller, whole officer set: nothing else names it, so
/// this check cannot see it (the audit log records every enrolment).
pub fn check_stored(db: &custody_store::Store, findings: &mut crate::findings::Findings) {
    use crate::findings::{each_record, json_record};
    let mut enrolled = 0u32;
    each_record(db, "officers", findings, |id, bytes, findings| {
        enrolled += 1;
        let Some(officer) =
            json_record::<OfficerRecord>("officers", id, bytes, "an officer record", findings)
        else {
            return;
        };
        if officer.officer_id.as_bytes() != id {
            findings.add(
                "officers",
                id,
                format!(
                    "expected the officer stored under their id, found {:?}",
                    officer.officer_id
                ),
            );
        }
        if let Err(e) = check_officer(&officer.officer_id, &officer.principal, &officer.public_key)
        {
            findings.add("officers", id, format!("expected a valid officer: {e}"));
        }
    });
    let mut indexed = false;
    each_record(db, "dual_control", findings, |key, value, findings| {
        if key == ADMIN_REQUIRED {
            match <[u8; 4]>::try_from(value).map(u32::from_be_bytes) {
                Ok(required) if (1..=enrolled).contains(&required) => {}
                Ok(required) => findings.add(
                    "dual_control",
                    key,
                    format!("expected a quorum of 1 to {enrolled} (the officers enrolled), found {required}"),
                ),
                Err(_) => findings.add(
                    "dual_control",
                    key,
                    format!("expected 4 bytes (big-endian), found {}", value.len()),
                ),
            }
        } else if key == super::operation_store::INDEXED {
            indexed = true;
        } else {
            findings.add(
                "dual_control",
                key,
                "expected only \"admin_required\" and \"operations_indexed_v1\"",
            );
        }
    });
    super::operation_store::check_stored(db, indexed, findings);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails by panicking")]
mod tests {
    use super::*;

    /// An officer key of small order (the Ed25519 identity) is refused: a
    /// share sealed to it would be open to anyone, and its collection would
    /// fail after the share was marked collected.
    #[test]
    fn an_officer_key_of_small_order_is_refused() {
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let refused = check_officer("dave", "dave", &hex::encode(identity)).unwrap_err();
        assert!(refused.contains("small order"), "{refused}");
        let sound = ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key();
        check_officer("dave", "dave", &hex::encode(sound.to_bytes())).unwrap();
    }

    /// One key twice in a genesis file, once in upper case: refused as the
    /// same key; a key given in upper case alone is kept in lower case, and
    /// enrolling it again under another id, in lower case, is refused.
    #[tokio::test]
    async fn a_key_spelled_in_another_case_is_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = hex::encode(
            ed25519_dalek::SigningKey::from_bytes(&[7; 32])
                .verifying_key()
                .to_bytes(),
        );
        let other = hex::encode(
            ed25519_dalek::SigningKey::from_bytes(&[8; 32])
                .verifying_key()
                .to_bytes(),
        );
        let file = |officers: &[(&str, &str)]| {
            let mut text = String::from("required = 2\n");
            for (id, key) in officers {
                text.push_str(&format!(
                    "[[officers]]\nid = \"{id}\"\nprincipal = \"{id}\"\npublic_key = \"{key}\"\n"
                ));
            }
            let path = dir.path().join("genesis.toml");
            std::fs::write(&path, text).unwrap();
            path
        };
        let upper = key.to_ascii_uppercase();
        let twice = Genesis::load(&file(&[
            ("alice", &upper),
            ("bob", &key),
            ("carol", &other),
        ]));
        assert!(
            twice
                .as_ref()
                .is_err_and(|e| e.contains("shares a principal or key")),
            "{:?}",
            twice.map(|g| g.officers.len())
        );
        let genesis = Genesis::load(&file(&[("alice", &upper), ("carol", &other)])).unwrap();
        assert_eq!(genesis.officers[0].public_key, key);

        let store = custody_store::Store::open_sled(&dir.path().join("db"), 16 << 20).unwrap();
        let officers = DualControlStore::open(&store, &Epochs::open(&store, "a").unwrap()).unwrap();
        assert!(officers.apply_genesis(&genesis, 0).await.unwrap());
        let _lock = officers.lock().await.unwrap();
        let again = officers
            .add_officer(OfficerRecord {
                officer_id: "bob".into(),
                principal: "bob".into(),
                public_key: key.clone(),
                enrolled_ms: 0,
            })
            .await;
        assert!(again.is_err(), "alice's key enrolled again as bob's");
    }
}
