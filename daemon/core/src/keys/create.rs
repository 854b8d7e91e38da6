//! A new key: checked against the crypto policy and the ceremonies that
//! reserve key ids, then its first version made by the journaled
//! [`generation`](super::generation) protocol.

use super::generation::{NewVersion, PendingVersions, generate_version};
use crate::action::Audited;
use crate::algorithms::KeyAlgorithm;
use crate::identity::valid_principal_name;
use crate::names::check_key_id;
use crate::registry::KeyRecord;
use crate::{Custody, Error, Reason};

/// Most principals one key's allow-list may name.
pub const MAX_ALLOWED_SIGNERS: usize = 256;

/// What a new key is to be.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// `[a-z][a-z0-9-]{0,62}`.
    pub key_id: String,
    /// Fixed for the key's life.
    pub algorithm: KeyAlgorithm,
    /// Principals that may sign (or encrypt) with it.
    pub allowed_signers: Vec<String>,
    /// How long each version may protect, from its activation.
    pub cryptoperiod_ms: Option<i64>,
    /// Whether versions may be wrapped under the backup KEK.
    pub backup_exportable: bool,
}

/// Creates a key and its first version.
pub async fn create(
    custody: &Custody,
    audited: &mut Audited,
    new: NewKey,
) -> Result<KeyRecord, Error> {
    check_key_id(&new.key_id)?;
    audited.resource = format!("keys/{}", new.key_id);
    audited.detail = new.algorithm.api_name().into();
    if !custody.allowed_algorithms.contains(&new.algorithm) {
        return Err(Error::new(
            Reason::AlgorithmNotAllowed,
            format!(
                "the crypto policy does not allow {}",
                new.algorithm.api_name()
            ),
        ));
    }
    if new.allowed_signers.len() > MAX_ALLOWED_SIGNERS {
        return Err(Error::new(
            Reason::TooManySigners,
            format!("at most {MAX_ALLOWED_SIGNERS} allowed signers"),
        ));
    }
    for (i, signer) in new.allowed_signers.iter().enumerate() {
        if !valid_principal_name(signer) {
            return Err(Error::new(
                Reason::BadPrincipal,
                format!(
                    "invalid or reserved principal name {}",
                    crate::text::echo(signer)
                ),
            ));
        }
        if new.allowed_signers[..i].contains(signer) {
            return Err(Error::new(
                Reason::BadPrincipal,
                format!("{signer} is listed twice in allowed_signers"),
            ));
        }
    }
    if new.backup_exportable && new.algorithm.key_spec() == hsm_shim::KeySpec::Ed25519 {
        return Err(Error::new(
            Reason::NotBackupExportable,
            "SoftHSM2 cannot wrap Ed25519 private keys, so they cannot be backed up",
        ));
    }
    let _guard = crate::keys::lock(custody).await?;
    ensure_key_id_free(custody, &new.key_id)?;
    audited.intent(custody).await?;
    let mut journal = PendingVersions::new("create");
    let first = generate_version(
        custody,
        &mut journal,
        NewVersion {
            key_id: &new.key_id,
            version: 1,
            algorithm: new.algorithm,
            backup_exportable: new.backup_exportable,
        },
    )
    .await?
    .version;
    let record = KeyRecord {
        key_id: new.key_id,
        algorithm: new.algorithm.api_name().into(),
        allowed_signers: new.allowed_signers,
        primary_version: 1,
        created_ms: first.created_ms,
        versions: vec![first],
        policies: Default::default(),
        cryptoperiod_ms: new.cryptoperiod_ms,
        min_version: 0,
        rotation_requests: Vec::new(),
        backup_exportable: new.backup_exportable,
        retired_at_version: None,
    };
    journal.commit(custody, record.clone()).await?;
    Ok(record)
}

/// Refuses a key id that is registered (`KEY_EXISTS`) or that an unfinished
/// ceremony reserved, to register at its commit (`KEY_RESERVED`). The caller
/// holds the registry lock until what it makes under the id is registered
/// or journaled as reserved: this check and that write are one step.
pub fn ensure_key_id_free(custody: &Custody, key_id: &str) -> Result<(), Error> {
    if custody.registry.get(key_id).is_some() {
        return Err(Error::new(
            Reason::KeyExists,
            format!("keys/{key_id} already exists"),
        ));
    }
    let reserved = custody.ceremonies.reserved_key_ids().map_err(|e| {
        Error::new(
            Reason::JournalUnavailable,
            format!(
                "the key ids unfinished ceremonies reserve cannot be read, so none is taken: {e}"
            ),
        )
    })?;
    if reserved.iter().any(|k| k == key_id) {
        return Err(Error::new(
            Reason::KeyReserved,
            format!("an unfinished ceremony registers keys/{key_id} at its commit"),
        ));
    }
    Ok(())
}
