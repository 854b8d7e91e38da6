//! Envelope encryption under keys of purpose ENCRYPT_DECRYPT: AES-256-GCM
//! payloads, data keys and rewrap to the current version.
//!
//! Each action checks, in order: the sizes, the key (its purpose and
//! allow-list), the ciphertext's layout, the version's state
//! ([`check_usable`]), the nonce budget; only then does it reach the HSM.
//! A key's DECRYPT policy puts [`decrypt`] under quorum: the direct call is
//! refused and an approved DECRYPT operation runs [`decrypt_as`] for its
//! requester. Encrypt, data keys and rewrap release no plaintext of an
//! existing ciphertext and stay direct.
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
use crate::authz::{Action, Approval, allowed_user, authorize, quorum_gate};
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

/// Who decrypts, which decides what is checked.
#[derive(Debug, Clone, Copy)]
pub enum Decrypter<'a> {
    /// A direct call: the signer role, the key's allow-list, and no DECRYPT
    /// quorum policy on the key.
    Caller(&'a Principal),
    /// An approved DECRYPT operation, run for its requester: the role was
    /// checked when they asked; the allow-list is checked again now.
    Approved {
        /// The principal who asked for the operation.
        requester: &'a str,
    },
}

/// The key `name` names, if `principal` may use it for encryption.
fn usable_key(
    custody: &Custody,
    principal: &Principal,
    name: &str,
) -> Result<Arc<KeyRecord>, Error> {
    authorize(principal, Action::UseEnvelopeKeys)?;
    key_for(custody, &principal.name, name)
}

/// The ENCRYPT_DECRYPT key `name` names, if `user` is on its allow-list.
fn key_for(custody: &Custody, user: &str, name: &str) -> Result<Arc<KeyRecord>, Error> {
    let key_id = parse_key_name(name)?;
    let record = found(custody, key_id)?;
    if algorithm_of(&record)?.sign_algorithm().is_some() {
        return Err(Error::new(
            Reason::WrongPurpose,
            format!("keys/{key_id} is a signing key, not an ENCRYPT_DECRYPT key"),
        ));
    }
    allowed_user(&record, user)?;
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
        .try_hsm(principal, move |session| {
            session.encrypt_gcm(&label, &aad, &plaintext)
        })
        .await?;
    Ok(Sealed {
        name,
        ciphertext: assemble(header, sealed.iv, &sealed.ciphertext_and_tag),
    })
}

/// Decrypts a ciphertext the key `name` made, bound to `associated_data`,
/// for the caller `principal` (refused `QUORUM_REQUIRED` if the key has a
/// DECRYPT policy).
pub async fn decrypt(
    custody: &Custody,
    audited: &mut Audited,
    principal: &Principal,
    name: &str,
    ciphertext: &[u8],
    associated_data: &[u8],
) -> Result<Opened, Error> {
    let decrypter = Decrypter::Caller(principal);
    decrypt_as(
        custody,
        audited,
        decrypter,
        name,
        ciphertext,
        associated_data,
    )
    .await
}

/// What a DECRYPT operation would decrypt, checked exactly as [`decrypt`]
/// would check it now (role, allow-list, purpose, sizes, the ciphertext's
/// key and the state of its version), but for the quorum the operation is
/// asked of. Returns the key id and the version the ciphertext names.
pub fn check_decrypt_operation(
    custody: &Custody,
    principal: &Principal,
    name: &str,
    ciphertext: &[u8],
    associated_data: &[u8],
) -> Result<(String, u32), Error> {
    check_size("associated_data", associated_data)?;
    let record = usable_key(custody, principal, name)?;
    let (_, version, _) = source_version(custody, &record, ciphertext, Use::Process)?;
    Ok((record.key_id.clone(), version.version))
}

/// [`decrypt`] for `decrypter`: a caller, or an approved DECRYPT operation
/// running for its requester.
pub async fn decrypt_as(
    custody: &Custody,
    audited: &mut Audited,
    decrypter: Decrypter<'_>,
    name: &str,
    ciphertext: &[u8],
    associated_data: &[u8],
) -> Result<Opened, Error> {
    check_size("associated_data", associated_data)?;
    let record = match decrypter {
        Decrypter::Caller(principal) => {
            let record = usable_key(custody, principal, name)?;
            quorum_gate(&record, "DECRYPT", Approval::None)?;
            record
        }
        Decrypter::Approved { requester } => key_for(custody, requester, name)?,
    };
    let (envelope, version, label) = source_version(custody, &record, ciphertext, Use::Process)?;
    let name = version_name(&record.key_id, version.version);
    audited.resource = name.clone();
    let aad = envelope.gcm_aad(associated_data);
    let sealed = GcmCiphertext {
        iv: envelope.nonce,
        ciphertext_and_tag: envelope.sealed.to_vec(),
    };
    let job = move |session: &mut hsm_shim::HsmSession| session.decrypt_gcm(&label, &aad, &sealed);
    // A caller may be told to retry when the HSM queue is full; what the
    // officers approved waits its turn.
    let plaintext = match decrypter {
        Decrypter::Caller(caller) => custody.try_hsm(caller, job).await,
        Decrypter::Approved { .. } => custody.hsm.run(job).await.map_err(Error::from),
    }
    .map_err(|e| in_api_names(e, &name))?;
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
        .try_hsm(principal, move |session| {
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
        .try_hsm(principal, move |session| {
            let plaintext = session.decrypt_gcm(&source_label, &source_aad, &sealed)?;
            session.encrypt_gcm(&target_label, &target_aad, &plaintext)
        })
        .await
        .map_err(|e| in_api_names(e, &source_name))?;
    Ok((
        source_name,
        Sealed {
            name,
            ciphertext: assemble(header, resealed.iv, &resealed.ciphertext_and_tag),
        },
    ))
}
