//! Envelope encryption under keys of purpose ENCRYPT_DECRYPT: AES-256-GCM
//! payloads, data keys and rewrap to the current version.
//!
//! Each action checks, in order: the sizes, the key (its purpose and
//! allow-list), the ciphertext's layout, the version's state
//! ([`check_usable`]), the nonce budget; only then does it reach the HSM.
//! The GCM work runs on an HSM worker thread, and for a rewrap the
//! plaintext exists only inside that one closure, in zeroizing memory.
//! [`format`] owns the ciphertext layout; [`crate::budget`] the nonce budget.

pub mod format;

use std::sync::Arc;

use hsm_shim::{GcmCiphertext, KeyLabel};
use zeroize::Zeroizing;

pub use format::{Envelope, assemble, seal_header};

use crate::budget::BudgetError;

use crate::action::Audited;
use crate::authz::{Action, allowed_user, authorize};
use crate::identity::Principal;
use crate::keys::{algorithm_of, check_usable, found, version_of};
use crate::lifecycle::Use;
use crate::names::{parse_key_name, version_name};
use crate::registry::{KeyRecord, VersionRecord};
use crate::{Custody, Error, Reason};

/// Largest plaintext Encrypt takes, and largest associated data.
pub const MAX_PLAINTEXT: usize = 64 * 1024;
/// Length of a generated data key.
pub const DATA_KEY_LEN: usize = 32;

/// A ciphertext made: the version that made it and the bytes.
#[derive(Debug, Clone)]
pub struct Sealed {
    /// `keys/{id}/versions/{n}`.
    pub name: String,
    /// custody's self-describing ciphertext.
    pub ciphertext: Vec<u8>,
}

/// A plaintext released, in zeroizing memory, and the version that opened it.
pub struct Opened {
    /// `keys/{id}/versions/{n}`.
    pub name: String,
    /// The plaintext.
    pub plaintext: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("name", &self.name)
            .field("plaintext", &"REDACTED")
            .finish()
    }
}

/// The key `name` names, if `principal` may use it for encryption.
fn usable_key(
    custody: &Custody,
    principal: &Principal,
    name: &str,
) -> Result<Arc<KeyRecord>, Error> {
    authorize(principal, Action::UseEnvelopeKeys)?;
    let key_id = parse_key_name(name)?;
    let record = found(custody, key_id)?;
    if algorithm_of(&record)?.sign_algorithm().is_some() {
        return Err(Error::new(
            Reason::WrongPurpose,
            format!("keys/{key_id} is a signing key, not an ENCRYPT_DECRYPT key"),
        ));
    }
    allowed_user(&record, &principal.name)?;
    Ok(record)
}

fn check_size(what: &str, bytes: &[u8]) -> Result<(), Error> {
    if bytes.len() > MAX_PLAINTEXT {
        return Err(Error::new(
            Reason::TooLarge,
            format!("{what} is {} bytes; at most {MAX_PLAINTEXT}", bytes.len()),
        ));
    }
    Ok(())
}

/// The primary version, checked for protection, with one encryption taken
/// from its nonce budget.
async fn protecting_version(
    custody: &Custody,
    record: &KeyRecord,
) -> Result<(VersionRecord, KeyLabel), Error> {
    let version = record
        .version(record.primary_version)
        .ok_or_else(|| Error::new(Reason::NotFound, "the primary version is missing"))?
        .clone();
    check_usable(record, &version, Use::Protect, custody.clock.now_ms())?;
    custody
        .budget
        .take(&version.hsm_label)
        .await
        .map_err(|e| match e {
            BudgetError::Exhausted { .. } => {
                Error::new(Reason::NonceBudgetExhausted, e.to_string())
            }
            BudgetError::Store(_) => {
                tracing::error!(error = %e, "nonce budget");
                Error::new(
                    Reason::StoreUnavailable,
                    "the encryption count cannot be made durable",
                )
            }
        })?;
    let label = KeyLabel::new(version.hsm_label.clone())?;
    Ok((version, label))
}

/// An integrity failure said in API names: the version (`keys/{id}/versions/{n}`)
/// under which the ciphertext did not authenticate. The HSM's own words
/// (PKCS#11 function and code, HSM label) stay in the log.
fn in_api_names(error: Error, version_name: &str) -> Error {
    if error.reason == Reason::IntegrityFailure {
        Error::new(
            Reason::IntegrityFailure,
            format!(
                "the ciphertext or its associated data does not authenticate under {version_name}; nothing was released"
            ),
        )
    } else {
        error
    }
}

/// The version a ciphertext names, checked for `usage`.
fn source_version<'c>(
    custody: &Custody,
    record: &KeyRecord,
    ciphertext: &'c [u8],
    usage: Use,
) -> Result<(Envelope<'c>, VersionRecord, KeyLabel), Error> {
    let envelope = Envelope::parse(ciphertext)
        .map_err(|e| Error::new(Reason::BadCiphertext, e.to_string()))?;
    if envelope.key_id != record.key_id {
        return Err(Error::new(
            Reason::CiphertextKeyMismatch,
            format!(
                "the ciphertext was made by keys/{}, not keys/{}",
                envelope.key_id, record.key_id
            ),
        ));
    }
    let version = version_of(record, envelope.version)?.clone();
    check_usable(record, &version, usage, custody.clock.now_ms())?;
    let label = KeyLabel::new(version.hsm_label.clone())?;
    Ok((envelope, version, label))
}

/// Encrypts `plaintext` under the primary version of the key `name`,
/// bound to `associated_data`.
pub async fn encrypt(
    custody: &Custody,
    audited: &mut Audited,
    principal: &Principal,
    name: &str,
    plaintext: Zeroizing<Vec<u8>>,
    associated_data: &[u8],
) -> Result<Sealed, Error> {
    check_size("plaintext", &plaintext)?;
    check_size("associated_data", associated_data)?;
    let record = usable_key(custody, principal, name)?;
    let (version, label) = protecting_version(custody, &record).await?;
    let name = version_name(&record.key_id, version.version);
    audited.resource = name.clone();
    audited.detail = format!("{} bytes", plaintext.len());
    let (header, aad) = seal_header(&record.key_id, version.version, associated_data);
    let sealed = custody
        .hsm
        .run(move |session| session.encrypt_gcm(&label, &aad, &plaintext))
        .await?;
    Ok(Sealed {
        name,
        ciphertext: assemble(header, sealed.iv, &sealed.ciphertext_and_tag),
    })
}

/// Decrypts a ciphertext the key `name` made, bound to `associated_data`.
pub async fn decrypt(
    custody: &Custody,
    audited: &mut Audited,
    principal: &Principal,
    name: &str,
    ciphertext: &[u8],
    associated_data: &[u8],
) -> Result<Opened, Error> {
    check_size("associated_data", associated_data)?;
    let record = usable_key(custody, principal, name)?;
    let (envelope, version, label) = source_version(custody, &record, ciphertext, Use::Process)?;
    let name = version_name(&record.key_id, version.version);
    audited.resource = name.clone();
    let aad = envelope.gcm_aad(associated_data);
    let sealed = GcmCiphertext {
        iv: envelope.nonce,
        ciphertext_and_tag: envelope.sealed.to_vec(),
    };
    let plaintext = custody
        .hsm
        .run(move |session| session.decrypt_gcm(&label, &aad, &sealed))
        .await
        .map_err(|e| in_api_names(Error::from(e), &name))?;
    audited.detail = format!("{} bytes", plaintext.len());
    Ok(Opened {
        name,
        plaintext: Zeroizing::new(plaintext.to_vec()),
    })
}

/// A new data key from the HSM's RNG: in the clear for the caller, and
/// wrapped under the primary version of the key `name`.
pub async fn generate_data_key(
    custody: &Custody,
    audited: &mut Audited,
    principal: &Principal,
    name: &str,
    associated_data: &[u8],
) -> Result<(Opened, Sealed), Error> {
    check_size("associated_data", associated_data)?;
    let record = usable_key(custody, principal, name)?;
    let (version, label) = protecting_version(custody, &record).await?;
    let name = version_name(&record.key_id, version.version);
    audited.resource = name.clone();
    let (header, aad) = seal_header(&record.key_id, version.version, associated_data);
    let (data_key, sealed) = custody
        .hsm
        .run(move |session| {
            let mut data_key = Zeroizing::new([0u8; DATA_KEY_LEN]);
            session.random(data_key.as_mut())?;
            let sealed = session.encrypt_gcm(&label, &aad, data_key.as_ref())?;
            Ok((data_key, sealed))
        })
        .await?;
    Ok((
        Opened {
            name: name.clone(),
            plaintext: Zeroizing::new(data_key.to_vec()),
        },
        Sealed {
            name,
            ciphertext: assemble(header, sealed.iv, &sealed.ciphertext_and_tag),
        },
    ))
}

/// Re-encrypts a ciphertext of the key `name` under its primary version,
/// without the plaintext leaving the HSM worker. Returns the source
/// version's name and the new ciphertext.
pub async fn rewrap(
    custody: &Custody,
    audited: &mut Audited,
    principal: &Principal,
    name: &str,
    ciphertext: &[u8],
    associated_data: &[u8],
) -> Result<(String, Sealed), Error> {
    check_size("associated_data", associated_data)?;
    let record = usable_key(custody, principal, name)?;
    let (envelope, source, source_label) =
        source_version(custody, &record, ciphertext, Use::Process)?;
    let source_name = version_name(&record.key_id, source.version);
    audited.resource = source_name.clone();
    let (target, target_label) = protecting_version(custody, &record).await?;
    let name = version_name(&record.key_id, target.version);
    audited.detail = format!("to {name}");
    let source_aad = envelope.gcm_aad(associated_data);
    let sealed = GcmCiphertext {
        iv: envelope.nonce,
        ciphertext_and_tag: envelope.sealed.to_vec(),
    };
    let (header, target_aad) = seal_header(&record.key_id, target.version, associated_data);
    let resealed = custody
        .hsm
        .run(move |session| {
            let plaintext = session.decrypt_gcm(&source_label, &source_aad, &sealed)?;
            session.encrypt_gcm(&target_label, &target_aad, &plaintext)
        })
        .await
        .map_err(|e| in_api_names(Error::from(e), &source_name))?;
    Ok((
        source_name,
        Sealed {
            name,
            ciphertext: assemble(header, resealed.iv, &resealed.ciphertext_and_tag),
        },
    ))
}
