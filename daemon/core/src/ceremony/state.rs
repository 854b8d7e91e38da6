//! What the ceremony engine (the `ceremonies` module) keeps between steps:
//! the journal, the secrets (shares, components) that live in memory only,
//! the SO PIN, the scratch token, the component combiner and the audit keys
//! pinned for restores. The engine's lock is a store claim
//! (`Epochs::lock_ceremonies`), shared by every replica.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use hsm_shim::{HsmConfig, SecretString};

use super::components::{ComponentCombiner, KeyBytes, XorInMemory};
use super::journal::{Journal, JournalError, TokenRole};
use super::shares::Share;

/// Secrets of one ceremony, in memory only.
#[derive(Default)]
pub(crate) struct Secrets {
    /// Shares not yet collected, by custodian.
    pub(crate) to_collect: BTreeMap<String, Share>,
    /// Components entered, by custodian.
    pub(crate) components: BTreeMap<String, KeyBytes>,
    /// Shares submitted for a restore.
    pub(crate) submitted: Vec<Share>,
}

/// What the ceremony engine keeps between steps, part of
/// [`Custody`](crate::Custody).
pub struct Ceremonies {
    /// The journal.
    pub journal: Journal,
    secrets: Mutex<BTreeMap<String, Secrets>>,
    /// The token SO PIN, which makes backup KEKs possible.
    pub(crate) so_pin: Option<SecretString>,
    /// The scratch token DR drills restore into.
    pub(crate) scratch: Option<HsmConfig>,
    /// How key components become one key.
    pub(crate) combiner: Arc<dyn ComponentCombiner>,
    /// SHA-256 of each other custodyd's audit key (SPKI DER) whose bundles
    /// may be restored here (`[ceremony] trusted_audit_keys`).
    pub(crate) trusted_audit_keys: Vec<[u8; 32]>,
}

impl Ceremonies {
    /// The engine over `journal`; `so_pin` makes backup KEKs possible,
    /// `scratch` DR drills.
    pub fn new(journal: Journal, so_pin: Option<SecretString>, scratch: Option<HsmConfig>) -> Self {
        Self {
            journal,
            secrets: Mutex::new(BTreeMap::new()),
            so_pin,
            scratch,
            combiner: Arc::new(XorInMemory),
            trusted_audit_keys: Vec::new(),
        }
    }

    /// Also trusts bundles signed by the audit keys with these SHA-256s (of
    /// their SPKI DER), besides custodyd's own.
    pub fn with_trusted_audit_keys(mut self, pins: Vec<[u8; 32]>) -> Self {
        self.trusted_audit_keys = pins;
        self
    }

    /// Runs `f` on the in-memory secrets of ceremony `id`.
    pub(crate) fn secrets<T>(&self, id: &str, f: impl FnOnce(&mut Secrets) -> T) -> T {
        let mut all = self.secrets.lock().unwrap_or_else(PoisonError::into_inner);
        f(all.entry(id.to_string()).or_default())
    }

    /// Drops every secret of ceremony `id` (zeroized on drop).
    pub(crate) fn forget(&self, id: &str) {
        self.secrets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// Key ids that unfinished ceremonies register at their commit, each
    /// reserved from the ceremony's opening: CreateKey refuses them, and so
    /// does the opening of another ceremony that would register one. A
    /// journal that cannot be read reserves everything (the error).
    pub fn reserved_key_ids(&self) -> Result<Vec<String>, JournalError> {
        Ok(self
            .journal
            .unfinished()?
            .into_iter()
            .flat_map(|record| record.reserved_key_ids)
            .collect())
    }

    /// Refuses another ceremony opened by `officer` once `max` of those
    /// they opened are unfinished (threat model R2). Reads the unfinished
    /// ceremonies only. Hold the engine's lock, so that two opens cannot
    /// both pass.
    pub fn check_open_cap(&self, officer: &str, max: usize) -> Result<(), crate::Error> {
        let open = self
            .journal
            .unfinished()
            .map_err(|e| {
                tracing::error!(error = %e, "ceremony journal");
                crate::Error::new(
                    crate::Reason::JournalUnavailable,
                    "the ceremony journal cannot be read",
                )
            })?
            .iter()
            .filter(|record| record.opened_by == officer)
            .count();
        if open < max {
            return Ok(());
        }
        Err(crate::Error::new(
            crate::Reason::TooManyCeremonies,
            format!(
                "{officer} has {open} ceremonies open, the most one officer may have ([ceremony] max_open_per_officer {max}): finish or abort one first"
            ),
        ))
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
