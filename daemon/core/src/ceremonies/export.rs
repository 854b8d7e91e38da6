//! Making a backup bundle of the live registry: every backup-exportable key
//! version that is not destroyed or compromised, wrapped under the token's
//! current backup KEK (the wrapping and the signed manifest are the
//! engine's [`make_bundle`](super::make_bundle)).

use sha2::Digest;

use super::{self as engine, KeyToBack};
use crate::action::Audited;
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

/// Wraps every backup-exportable key version under the current backup KEK;
/// `audited` names the bundle's SHA-256, which a restore script pins.
pub async fn create_backup(custody: &Custody, audited: &mut Audited) -> Result<Backup, Error> {
    let kek = custody
        .ceremonies
        .journal
        .backup_kek()
        .map_err(engine::journal_failure)?
        .ok_or_else(|| {
            Error::new(
                Reason::NoBackupKek,
                "this token has no backup KEK yet: run a KEK ceremony first",
            )
        })?;
    let keys: Vec<KeyToBack> = custody
        .registry
        .list(None, usize::MAX)
        .iter()
        .filter(|key| key.backup_exportable)
        .flat_map(|key| {
            key.versions
                .iter()
                .filter(|v| !matches!(v.state, VersionState::Destroyed | VersionState::Compromised))
                .map(|v| KeyToBack::of(key, v))
                .collect::<Vec<_>>()
        })
        .collect();
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
