//! The journal of new versions ([`PendingVersion`] entries): a generation
//! begins, is rolled back and is dropped here; [`Registry::commit_version`]
//! clears its entry in the transaction that commits the version.

use super::{KeyRecord, PendingVersion, Registry, RegistryError};

impl Registry {
    /// Journals that `pending` is about to be generated, durably, before the
    /// HSM is asked to; refused if another process's entry is under its
    /// label (a generation under way, or being rolled back), so one
    /// generation's entry is never taken for another's. An entry this
    /// process left (a generation of its own that failed, whose entry could
    /// not be dropped) is replaced: its generations of a key follow one
    /// another under the registry lock, and the caller found the label
    /// holding no object (the generation refuses a label in use before it
    /// journals one).
    pub async fn begin_version(&self, pending: &PendingVersion) -> Result<(), RegistryError> {
        let label = pending.hsm_label.as_bytes();
        let bytes = crate::stored::seal(label, pending)
            .map_err(|e| RegistryError::Failed(e.to_string()))?;
        let begun = self
            .db
            .transaction(&[&self.pending], |tx| {
                let another = tx.get(&self.pending, label)?.is_some_and(|existing| {
                    crate::stored::open::<PendingVersion>(label, &existing)
                        .map_or(true, |existing| existing.instance != pending.instance)
                });
                if another {
                    return Ok(false);
                }
                tx.insert(&self.pending, label, bytes.clone())?;
                Ok(true)
            })
            .map_err(|e| RegistryError::Failed(e.to_string()))?;
        if !begun {
            return Err(RegistryError::Failed(format!(
                "another generation of {} is under way or being rolled back; try again once it is settled",
                pending.hsm_label
            )));
        }
        self.flush().await
    }

    /// Marks generation `pending` as being rolled back, before the objects
    /// under its label are destroyed: from then on its commit is refused,
    /// so a replica that was only stalled cannot register a version whose
    /// objects the roll-back destroys. Returns whether the roll-back may
    /// destroy what the label holds:
    /// - the generation's own entry is there: marked, true;
    /// - another generation's entry is there: false (the label is its);
    /// - no entry, and the label is a version the key holds: false
    ///   (committed, by this generation or by one since);
    /// - no entry, and the label no version's: whatever it holds was left
    ///   by a generation nobody finished (this one, which another replica
    ///   rolled back while it stalled, then went on): an entry marked
    ///   abandoned is put back, so no generation begins under the label
    ///   until [`Registry::abandon_version`] drops it, and true.
    pub async fn begin_roll_back(&self, pending: &PendingVersion) -> Result<bool, RegistryError> {
        let hsm_label = pending.hsm_label.as_str();
        let marked = self
            .db
            .transaction(&[&self.pending, &self.tree], |tx| {
                let ours = match tx.get(&self.pending, hsm_label.as_bytes())? {
                    Some(bytes) => {
                        crate::stored::open::<PendingVersion>(hsm_label.as_bytes(), &bytes)
                            .map_err(|e| {
                                custody_store::TxError::abort(format!(
                                    "pending version {hsm_label:?} is corrupt: {e}"
                                ))
                            })?
                            .generation
                            == pending.generation
                    }
                    None => match tx.get(&self.tree, pending.key_id.as_bytes())? {
                        Some(bytes) => {
                            !crate::stored::open::<KeyRecord>(pending.key_id.as_bytes(), &bytes)
                                .map_err(|e| {
                                    custody_store::TxError::abort(format!(
                                        "key {:?} is corrupt: {e}",
                                        pending.key_id
                                    ))
                                })?
                                .versions
                                .iter()
                                .any(|v| v.hsm_label == hsm_label)
                        }
                        None => true,
                    },
                };
                if !ours {
                    return Ok(false);
                }
                // Its own entry, or the claim of a label no one holds: the
                // same entry either way, marked.
                let marked = PendingVersion {
                    abandoned: true,
                    ..pending.clone()
                };
                let sealed = crate::stored::seal(hsm_label.as_bytes(), &marked)
                    .map_err(custody_store::TxError::abort)?;
                tx.insert(&self.pending, hsm_label.as_bytes(), sealed)?;
                Ok(true)
            })
            .map_err(|e| RegistryError::Failed(e.to_string()))?;
        self.flush().await?;
        Ok(marked)
    }

    /// Drops generation `generation`'s pending entry under `hsm_label`
    /// (after its HSM objects are gone); another generation's is left.
    pub async fn abandon_version(
        &self,
        hsm_label: &str,
        generation: &str,
    ) -> Result<(), RegistryError> {
        let label = hsm_label.as_bytes();
        self.db
            .transaction(&[&self.pending], |tx| {
                let ours = tx.get(&self.pending, label)?.is_some_and(|bytes| {
                    crate::stored::open::<PendingVersion>(label, &bytes)
                        .is_ok_and(|entry| entry.generation == generation)
                });
                if ours {
                    tx.remove(&self.pending, label)?;
                }
                Ok(())
            })
            .map_err(|e| RegistryError::Failed(e.to_string()))?;
        self.flush().await
    }

    /// Generations started and not committed.
    pub fn pending_versions(&self) -> Result<Vec<PendingVersion>, RegistryError> {
        self.pending
            .iter()
            .map(|item| {
                let (label, bytes) = item.map_err(|e| RegistryError::Failed(e.to_string()))?;
                crate::stored::open(&label, &bytes).map_err(|e| {
                    RegistryError::Failed(format!(
                        "pending version {:?} is corrupt: {e}",
                        String::from_utf8_lossy(&label)
                    ))
                })
            })
            .collect()
    }
}
