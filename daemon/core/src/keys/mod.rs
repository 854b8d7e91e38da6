//! Keys and their versions: everything that creates, rotates or changes a
//! key, below any API. Each action takes typed arguments and the action's
//! audit record ([`Audited`]), holds the registry lock while it decides and
//! acts, and returns the registry record it left.
//!
//! | file | owns |
//! |---|---|
//! | [`generation`] | the one journaled protocol that makes a new version in the HSM (create, rotation, ceremonies) |
//! | [`create`] | a new key and its first version |
//! | [`rotate`] | new versions: on demand, approved, scheduled, after a compromise |
//! | [`state`] | version state changes, compromise and its revocation notice, cryptoperiod and minimum version |
//! | [`destroy`] | scheduled destruction, its cancellation, legal holds |
//! | [`usage`] | whether a version may be used for a purpose now |

pub mod create;
pub mod destroy;
pub mod generation;
pub mod rotate;
pub mod state;
pub mod usage;

use std::sync::Arc;

use crate::names::version_name;
use crate::registry::{KeyRecord, RegistryError, RegistryGuard, VersionRecord, VersionState};
use crate::{Custody, Error, Reason};

pub use create::{NewKey, create, ensure_key_id_free};
pub use destroy::{
    Carrier, cancel_destroy, check_due, check_reservable, destroy_due, hold_destructions,
    mark_destroyed, release_ceremony_reservation, release_legal_hold, reserve_for_ceremony,
    schedule_destroy, set_legal_hold,
};
pub use rotate::{Trigger, rotate};
pub use state::{KeyUpdate, set_state, update};
pub use usage::check_usable;

/// The principal the scheduler acts as in the audit log.
pub const SCHEDULER: &str = "custodyd-scheduler";

/// Rotation request ids with this prefix are the scheduler's own
/// (`schedule:v{n}`); clients may not use them, so that no client can make
/// a scheduled rotation look done.
pub const SCHEDULER_REQUEST_PREFIX: &str = "schedule:";

/// The key `key_id`, or NOT_FOUND.
pub fn found(custody: &Custody, key_id: &str) -> Result<Arc<KeyRecord>, Error> {
    custody
        .registry
        .get(key_id)
        .ok_or_else(|| Error::new(Reason::NotFound, format!("no key keys/{key_id}")))
}

/// The registry lock and the key `key_id` as it stands under it, or
/// NOT_FOUND: how every change to a key begins, so that what it decides on
/// is what it writes over.
pub async fn locked(
    custody: &Custody,
    key_id: &str,
) -> Result<(RegistryGuard, Arc<KeyRecord>), Error> {
    let guard = lock(custody).await?;
    let current = found(custody, key_id)?;
    Ok((guard, current))
}

/// The registry lock, held while a change decides and writes.
pub async fn lock(custody: &Custody) -> Result<RegistryGuard, Error> {
    custody.registry.lock().await.map_err(registry_failure)
}

/// Writes `record` to the registry (the caller holds its lock).
pub async fn write(custody: &Custody, record: KeyRecord) -> Result<(), Error> {
    custody.registry.put(record).await.map_err(registry_failure)
}

/// A version of `record`, or NOT_FOUND.
pub fn version_of(record: &KeyRecord, version: u32) -> Result<&VersionRecord, Error> {
    record.version(version).ok_or_else(|| {
        Error::new(
            Reason::NotFound,
            format!("no version {}", version_name(&record.key_id, version)),
        )
    })
}

/// A version that is not destroyed, or ALREADY_DESTROYED.
pub(crate) fn not_destroyed(record: &KeyRecord, version: u32) -> Result<&VersionRecord, Error> {
    let existing = version_of(record, version)?;
    if existing.state == VersionState::Destroyed {
        return Err(Error::new(
            Reason::AlreadyDestroyed,
            format!(
                "{} is already destroyed",
                version_name(&record.key_id, version)
            ),
        ));
    }
    Ok(existing)
}

/// The registry could not be written.
pub(crate) fn registry_failure(error: RegistryError) -> Error {
    tracing::error!(%error, "registry write failed");
    if let RegistryError::Stale(stale) = error {
        return Error::new(Reason::RegistryUnavailable, stale.to_string());
    }
    Error::new(
        Reason::RegistryUnavailable,
        "the key registry cannot be written",
    )
}

/// Applies `change` to version `version` of `current` and writes the record.
pub(crate) async fn update_version(
    custody: &Custody,
    current: &KeyRecord,
    version: u32,
    change: impl FnOnce(&mut VersionRecord),
) -> Result<KeyRecord, Error> {
    let mut record = current.clone();
    let target = record
        .versions
        .iter_mut()
        .find(|v| v.version == version)
        .ok_or_else(|| Error::new(Reason::NotFound, "version vanished"))?;
    change(target);
    write(custody, record.clone()).await?;
    Ok(record)
}

/// The stored algorithm of a key.
pub fn algorithm_of(record: &KeyRecord) -> Result<crate::algorithms::KeyAlgorithm, Error> {
    crate::algorithms::KeyAlgorithm::from_api_name(&record.algorithm)
        .ok_or_else(|| Error::internal("unknown stored algorithm"))
}
