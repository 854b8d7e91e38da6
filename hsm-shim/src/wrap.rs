//! Key wrapping (RFC 5649), secret key import, and AES-256-GCM.
//!
//! Wrapping is how keys leave the HSM, and the only way: under a KEK, with
//! `CKM_AES_KEY_WRAP_PAD`. A non-extractable key refuses (`NotPermitted`); a
//! tampered wrapped blob fails its integrity check (`IntegrityFailure`) before
//! any object is made.
//!
//! A restore unwraps under a KEK rebuilt from backup shares, imported only for
//! the length of one session ([`HsmSession::import_session_unwrap_kek`]), so
//! that it never becomes a token object.

use cryptoki::context::Function;
use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use secrecy::{ExposeSecret, SecretSlice};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{ErrorKind, HsmError, Result};
use crate::keys::{CheckValue, aes_key_template, private_key_template};
use crate::session::{HsmSession, ObjectKind};
use crate::types::{AesRole, Exportability, GcmCiphertext, KeyInfo, KeyLabel, KeySpec};

const GCM_TAG_BITS: u64 = 128;

/// SoftHSM2 answers a GCM tag mismatch and a wrapped blob that fails its RFC
/// 5649 integrity check with `CKR_GENERAL_ERROR`, not with
/// `CKR_ENCRYPTED_DATA_INVALID` / `CKR_WRAPPED_KEY_INVALID`. For `C_Decrypt`
/// with GCM and for `C_UnwrapKey` that is what it means, so it is reported as
/// the integrity failure it is.
fn integrity_failure(error: HsmError) -> HsmError {
    if error.rv() == Some(RvError::GeneralError) {
        HsmError::new(
            ErrorKind::IntegrityFailure,
            format!("integrity check failed: {error}"),
        )
    } else {
        error
    }
}

/// SoftHSM2 refuses `CKA_MODIFIABLE` in a `C_UnwrapKey` template
/// (`CKR_ATTRIBUTE_READ_ONLY`), so unwrapped keys keep the default (modifiable).
/// That cannot weaken them: `CKA_SENSITIVE` and `CKA_EXTRACTABLE` only move one
/// way in PKCS#11, whatever `CKA_MODIFIABLE` says.
fn for_unwrap(mut template: Vec<Attribute>) -> Vec<Attribute> {
    template.retain(|attribute| !matches!(attribute, Attribute::Modifiable(_)));
    template
}

/// A session-object AES key that may unwrap and nothing else; see
/// [`HsmSession::import_session_unwrap_kek`].
fn session_unwrap_kek_template(label: &KeyLabel) -> Vec<Attribute> {
    let bytes = label.as_str().as_bytes();
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Unwrap(true),
        Attribute::Wrap(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Modifiable(false),
        // C_CopyObject could otherwise make a token object of it.
        Attribute::Copyable(false),
        Attribute::Id(bytes.to_vec()),
        Attribute::Label(bytes.to_vec()),
    ]
}

impl HsmSession {
    /// `C_CreateObject` with `template` plus the key value `value`, then
    /// wipes the template's copy of the value, whatever the call returned.
    pub(crate) fn create_with_value(
        &self,
        mut template: Vec<Attribute>,
        value: &SecretSlice<u8>,
        context: impl FnOnce() -> String,
    ) -> Result<ObjectHandle> {
        template.push(Attribute::Value(value.expose_secret().to_vec()));
        let created = self.call(Function::CreateObject, context, |session| {
            session.create_object(&template)
        });
        for attribute in &mut template {
            if let Attribute::Value(bytes) = attribute {
                bytes.zeroize();
            }
        }
        created
    }

    /// Wraps the private or secret key labelled `target` under the KEK labelled
    /// `kek`, with RFC 5649 AES key wrap with padding.
    pub fn wrap_key(&mut self, kek: &KeyLabel, target: &KeyLabel) -> Result<Vec<u8>> {
        self.recovering(|s| {
            let wrapping = s.find(ObjectKind::Secret, kek)?;
            let (_, key) = s.find_usable_key(target)?;
            s.call(
                Function::WrapKey,
                || format!("wrapping {target} under {kek}"),
                |session| session.wrap_key(&Mechanism::AesKeyWrapPad, wrapping.handle, key.handle),
            )
        })
    }

    /// Unwraps a private key of `spec` wrapped under `kek` into a new token
    /// object labelled `label`, with the same attributes a generated key gets.
    ///
    /// Only the private key is made: its public half comes from wherever the
    /// wrapped key came with (a backup manifest) and is checked by the caller.
    pub fn unwrap_private_key(
        &mut self,
        kek: &KeyLabel,
        wrapped: &[u8],
        label: &KeyLabel,
        spec: KeySpec,
        export: Exportability,
    ) -> Result<KeyLabel> {
        if !spec.is_key_pair() {
            return Err(HsmError::new(
                ErrorKind::InvalidInput,
                format!("{spec} is not a private key spec"),
            ));
        }
        let template = for_unwrap(private_key_template(label, spec, export));
        self.refuse_label_in_use(label)?;
        self.unwrap_into(kek, wrapped, label, &template)?;
        tracing::info!(%label, %spec, %kek, "unwrapped private key");
        Ok(label.clone())
    }

    /// Unwraps an AES-256 key wrapped under `kek` into a new token object
    /// labelled `label`, and returns its key check value if the module computes
    /// one for unwrapped keys (SoftHSM2 does not).
    pub fn unwrap_aes_key(
        &mut self,
        kek: &KeyLabel,
        wrapped: &[u8],
        label: &KeyLabel,
        role: AesRole,
        export: Exportability,
    ) -> Result<KeyInfo> {
        let template = for_unwrap(aes_key_template(label, role, export));
        self.refuse_label_in_use(label)?;
        let handle = self.unwrap_into(kek, wrapped, label, &template)?;
        // SoftHSM2 computes no CKA_CHECK_VALUE for unwrapped keys.
        self.finish_secret_key(label, handle, CheckValue::IfAvailable)
    }

    /// `C_UnwrapKey` with RFC 5649 under `kek`, into a new object made from
    /// `template`.
    fn unwrap_into(
        &mut self,
        kek: &KeyLabel,
        wrapped: &[u8],
        label: &KeyLabel,
        template: &[Attribute],
    ) -> Result<ObjectHandle> {
        self.recovering(|s| {
            let unwrapping = s.find(ObjectKind::Secret, kek)?;
            s.call(
                Function::UnwrapKey,
                || format!("unwrapping {label} under {kek}"),
                |session| {
                    session.unwrap_key(
                        &Mechanism::AesKeyWrapPad,
                        unwrapping.handle,
                        wrapped,
                        template,
                    )
                },
            )
        })
        .map_err(integrity_failure)
    }

    /// Imports a 32-byte AES key value (for example one assembled from
    /// custodian components) as a sensitive token object, and returns its key
    /// check value so the custodians can confirm it.
    pub fn import_aes_key(
        &mut self,
        label: &KeyLabel,
        value: &SecretSlice<u8>,
        role: AesRole,
        export: Exportability,
    ) -> Result<KeyInfo> {
        if value.expose_secret().len() != 32 {
            return Err(HsmError::new(
                ErrorKind::InvalidInput,
                format!(
                    "an AES-256 key is 32 bytes, got {}",
                    value.expose_secret().len()
                ),
            ));
        }
        self.refuse_label_in_use(label)?;
        let handle = self.recovering(|s| {
            s.create_with_value(aes_key_template(label, role, export), value, || {
                format!("importing AES-256 key {label}")
            })
        })?;
        self.finish_secret_key(label, handle, CheckValue::Required)
    }

    /// Imports a 32-byte AES key as a KEK that unwraps and does nothing else,
    /// as a session object of this session, and returns its key check value
    /// so the custodians can confirm it. For restores: the backup KEK rebuilt
    /// from shares is needed for one unwrap session and must never be stored.
    ///
    /// The key is private, sensitive, non-extractable, not copyable (so it
    /// cannot be copied into a token object) and may only unwrap: no wrap,
    /// encrypt, decrypt, sign, verify or derive. [`Self::unwrap_private_key`]
    /// and [`Self::unwrap_aes_key`] on this session find it by `label`, and
    /// [`Self::destroy`] removes it. It is gone, and then not found, once
    /// this session closes, once this session is reopened by its recovery
    /// (the old session is closed), or once the application logs out (PKCS#11
    /// destroys private session objects then, as
    /// [`crate::Hsm::create_trusted_kek`] does): import it again after a
    /// `NotFound`. While it lives, other sessions of this process can see it
    /// too (PKCS#11 session objects belong to the application).
    pub fn import_session_unwrap_kek(
        &mut self,
        label: &KeyLabel,
        value: &SecretSlice<u8>,
    ) -> Result<KeyInfo> {
        if value.expose_secret().len() != 32 {
            return Err(HsmError::new(
                ErrorKind::InvalidInput,
                format!("a KEK is 32 bytes, got {}", value.expose_secret().len()),
            ));
        }
        self.refuse_label_in_use(label)?;
        // A stale cached token object of the same label must not shadow it.
        self.access().cache.forget_label(label);
        let handle = self.recovering(|s| {
            s.create_with_value(session_unwrap_kek_template(label), value, || {
                format!("importing session KEK {label}")
            })
        })?;
        // Not `finish_secret_key`: that caches the handle, and a session
        // object's handle must not be cached (see `HandleCache`).
        match self.check_value(handle, label) {
            Ok(kcv) => {
                tracing::info!(%label, kcv = ?kcv, "imported a session KEK");
                Ok(KeyInfo {
                    label: label.clone(),
                    spec: KeySpec::Aes256,
                    public_key: None,
                    check_value: Some(kcv),
                })
            }
            Err(error) => {
                self.destroy_handles(label, &[handle]);
                Err(error)
            }
        }
    }

    /// Encrypts with AES-256-GCM under the key labelled `label`, with a fresh
    /// 96-bit IV from the HSM's RNG and a 128-bit tag.
    ///
    /// Random IVs bound the safe number of encryptions per key to 2^32 (NIST SP
    /// 800-38D, section 8.3); rotation policy must keep keys well under it.
    pub fn encrypt_gcm(
        &mut self,
        label: &KeyLabel,
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<GcmCiphertext> {
        self.recovering(|s| {
            let key = s.find(ObjectKind::Secret, label)?;
            let mut iv = [0u8; 12];
            s.call(
                Function::GenerateRandom,
                || "drawing a GCM IV".into(),
                |session| session.generate_random_slice(&mut iv),
            )?;
            let mut iv_param = iv;
            let ciphertext_and_tag = s.call(
                Function::Encrypt,
                || format!("encrypting with {label}"),
                |session| {
                    let params = GcmParams::new(&mut iv_param, aad, GCM_TAG_BITS.into())?;
                    session.encrypt(&Mechanism::AesGcm(params), key.handle, plaintext)
                },
            )?;
            Ok(GcmCiphertext {
                iv,
                ciphertext_and_tag,
            })
        })
    }

    /// Decrypts and authenticates an AES-256-GCM ciphertext. A wrong key, AAD,
    /// IV or any flipped bit is an `IntegrityFailure`, and no plaintext is
    /// released.
    pub fn decrypt_gcm(
        &mut self,
        label: &KeyLabel,
        aad: &[u8],
        ciphertext: &GcmCiphertext,
    ) -> Result<Zeroizing<Vec<u8>>> {
        if ciphertext.ciphertext_and_tag.len() < (GCM_TAG_BITS / 8) as usize {
            return Err(HsmError::new(
                ErrorKind::IntegrityFailure,
                "GCM ciphertext is shorter than its tag",
            ));
        }
        self.recovering(|s| {
            let key = s.find(ObjectKind::Secret, label)?;
            let mut iv = ciphertext.iv;
            s.call(
                Function::Decrypt,
                || format!("decrypting with {label}"),
                |session| {
                    let params = GcmParams::new(&mut iv, aad, GCM_TAG_BITS.into())?;
                    session.decrypt(
                        &Mechanism::AesGcm(params),
                        key.handle,
                        &ciphertext.ciphertext_and_tag,
                    )
                },
            )
            .map(Zeroizing::new)
        })
        .map_err(integrity_failure)
    }
}
