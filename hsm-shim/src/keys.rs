//! Key generation, public key export and destruction.
//!
//! Every template sets every attribute that matters explicitly: SoftHSM2's
//! defaults are unsafe (a secret key made with only a length comes out
//! non-sensitive and able to wrap). Keys are sensitive and non-extractable
//! unless [`Exportability::BackupWrapOnly`] is asked for, and even then only
//! wrappable under a trusted key.
//!
//! A key pair is consistency-tested (sign, then verify) before it is returned;
//! a pair that fails, or whose public key cannot be read, is destroyed, so a
//! caller never sees a half-made key.

use cryptoki::context::Function;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};

use crate::encoding::{
    PublicKey, PublicParts, ec_params, ec_public_key, public_parts, rsa_public_key,
};
use crate::error::{ErrorKind, HsmError, Result};
use crate::session::{Found, HsmSession, ObjectKind, is_stale_handle, stale_handle};
use crate::types::{
    AesRole, EcdsaEncoding, Exportability, KeyCheckValue, KeyInfo, KeyLabel, KeySpec, SignInput,
};

/// Whether a new secret key must come with a key check value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CheckValue {
    /// Generated and imported keys: the module must give one.
    Required,
    /// Unwrapped keys: some modules (SoftHSM2) compute none.
    IfAvailable,
}

/// Whether a read through a handle confirms that the handle still names the
/// label's object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Identity {
    /// A handle just made or found: nothing to confirm.
    Unchecked,
    /// A cached handle: `CKA_ID` and `CKA_CLASS` must be the label's.
    OfLabel,
}

const RSA_PUBLIC_EXPONENT: [u8; 3] = [0x01, 0x00, 0x01];

pub(crate) fn key_type(spec: KeySpec) -> KeyType {
    match spec {
        KeySpec::EcP256 | KeySpec::EcP384 => KeyType::EC,
        KeySpec::Ed25519 => KeyType::EC_EDWARDS,
        KeySpec::Rsa2048 | KeySpec::Rsa3072 | KeySpec::Rsa4096 => KeyType::RSA,
        KeySpec::Aes256 => KeyType::AES,
    }
}

fn id_and_label(label: &KeyLabel) -> [Attribute; 2] {
    let bytes = label.as_str().as_bytes();
    [
        Attribute::Id(bytes.to_vec()),
        Attribute::Label(bytes.to_vec()),
    ]
}

/// The private half of a signing key pair: signs and does nothing else.
pub(crate) fn private_key_template(
    label: &KeyLabel,
    spec: KeySpec,
    export: Exportability,
) -> Vec<Attribute> {
    let exportable = export == Exportability::BackupWrapOnly;
    let mut template = vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(key_type(spec)),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(exportable),
        Attribute::WrapWithTrusted(true),
        Attribute::Sign(true),
        Attribute::SignRecover(false),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Modifiable(false),
    ];
    template.extend(id_and_label(label));
    template
}

/// A public key that verifies and does nothing else: generated or imported.
fn public_key_base(label: &KeyLabel, spec: KeySpec) -> Vec<Attribute> {
    let mut template = vec![
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(key_type(spec)),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::VerifyRecover(false),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Derive(false),
        Attribute::Modifiable(false),
    ];
    template.extend(id_and_label(label));
    template
}

fn public_key_template(label: &KeyLabel, spec: KeySpec) -> Result<Vec<Attribute>> {
    let mut template = public_key_base(label, spec);
    match spec.rsa_bits() {
        Some(bits) => {
            template.push(Attribute::ModulusBits(bits.into()));
            template.push(Attribute::PublicExponent(RSA_PUBLIC_EXPONENT.to_vec()));
        }
        None => template.push(Attribute::EcParams(ec_params(spec)?)),
    }
    Ok(template)
}

/// An AES-256 key that may do exactly what `role` says.
pub(crate) fn aes_key_template(
    label: &KeyLabel,
    role: AesRole,
    export: Exportability,
) -> Vec<Attribute> {
    let data = role == AesRole::DataEncryption;
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(export == Exportability::BackupWrapOnly),
        Attribute::WrapWithTrusted(true),
        Attribute::Encrypt(data),
        Attribute::Decrypt(data),
        Attribute::Wrap(!data),
        Attribute::Unwrap(!data),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Modifiable(false),
    ];
    template.extend(id_and_label(label));
    template
}

impl HsmSession {
    /// Generates a signing key pair labelled `label`, consistency-tests it and
    /// returns its public key. Refuses a label that is already in use.
    pub fn generate_key_pair(
        &mut self,
        label: &KeyLabel,
        spec: KeySpec,
        export: Exportability,
    ) -> Result<KeyInfo> {
        let Some(test_algorithm) = spec.default_sign_algorithm() else {
            return Err(HsmError::new(
                ErrorKind::InvalidInput,
                format!("{spec} is not a key pair spec"),
            ));
        };
        let mechanism = match spec {
            KeySpec::EcP256 | KeySpec::EcP384 => Mechanism::EccKeyPairGen,
            KeySpec::Ed25519 => Mechanism::EccEdwardsKeyPairGen,
            _ => Mechanism::RsaPkcsKeyPairGen,
        };
        let public_template = public_key_template(label, spec)?;
        let private_template = private_key_template(label, spec, export);
        let (public, private) = self.recovering(|s| {
            s.ensure_label_free(label)?;
            s.call(
                Function::GenerateKeyPair,
                || format!("generating {spec} key pair {label}"),
                |session| {
                    session.generate_key_pair(&mechanism, &public_template, &private_template)
                },
            )
        })?;

        let checked = self
            .pairwise_consistency_test(label, spec, public, private, test_algorithm)
            .and_then(|()| self.read_public_key(public, spec, label));
        match checked {
            Ok(public_key) => {
                self.remember(label, ObjectKind::Private, private, spec);
                self.remember(label, ObjectKind::Public, public, spec);
                tracing::info!(%label, %spec, "generated key pair");
                Ok(KeyInfo {
                    label: label.clone(),
                    spec,
                    public_key: Some(public_key),
                    check_value: None,
                })
            }
            Err(error) => {
                tracing::error!(%label, %spec, %error, "new key pair failed its checks; destroying it");
                self.destroy_handles(label, &[private, public]);
                Err(error)
            }
        }
    }

    /// Generates an AES-256 key for `role`, and returns its key check value.
    pub fn generate_aes_key(
        &mut self,
        label: &KeyLabel,
        role: AesRole,
        export: Exportability,
    ) -> Result<KeyInfo> {
        let mut template = aes_key_template(label, role, export);
        template.push(Attribute::ValueLen(32.into()));
        let handle = self.recovering(|s| {
            s.ensure_label_free(label)?;
            s.call(
                Function::GenerateKey,
                || format!("generating AES-256 key {label}"),
                |session| session.generate_key(&Mechanism::AesKeyGen, &template),
            )
        })?;
        self.finish_secret_key(label, handle, CheckValue::Required)
    }

    /// Reads the key check value of a just-made AES key and caches the key. A
    /// key whose required check value cannot be read is destroyed: ceremonies
    /// confirm keys by it.
    pub(crate) fn finish_secret_key(
        &mut self,
        label: &KeyLabel,
        handle: ObjectHandle,
        required: CheckValue,
    ) -> Result<KeyInfo> {
        let check_value = match (self.check_value(handle, label), required) {
            (Ok(kcv), _) => Ok(Some(kcv)),
            (Err(e), CheckValue::IfAvailable) if e.kind() == ErrorKind::Unsupported => Ok(None),
            (Err(e), _) => Err(e),
        };
        match check_value {
            Ok(check_value) => {
                self.remember(label, ObjectKind::Secret, handle, KeySpec::Aes256);
                tracing::info!(%label, kcv = ?check_value, "made AES-256 key");
                Ok(KeyInfo {
                    label: label.clone(),
                    spec: KeySpec::Aes256,
                    public_key: None,
                    check_value,
                })
            }
            Err(error) => {
                self.destroy_handles(label, &[handle]);
                Err(error)
            }
        }
    }

    pub(crate) fn check_value(
        &self,
        handle: ObjectHandle,
        label: &KeyLabel,
    ) -> Result<KeyCheckValue> {
        let attributes = self.attributes(handle, &[AttributeType::CheckValue], label)?;
        attributes
            .into_iter()
            .find_map(|a| match a {
                Attribute::CheckValue(v) => <[u8; 3]>::try_from(v.as_slice()).ok(),
                _ => None,
            })
            .map(KeyCheckValue)
            .ok_or_else(|| {
                HsmError::new(
                    ErrorKind::Unsupported,
                    format!("the module gives no 3-byte CKA_CHECK_VALUE for {label}"),
                )
            })
    }

    /// Makes a public key object labelled `label` from a published
    /// SubjectPublicKeyInfo (a restore's manifest), so that the restored
    /// private key's signatures verify in the HSM against exactly the key
    /// that was published. Refuses a key that is not of `spec`.
    pub fn import_public_key(
        &mut self,
        label: &KeyLabel,
        spki_der: &[u8],
        spec: KeySpec,
    ) -> Result<PublicKey> {
        if !spec.is_key_pair() {
            return Err(HsmError::new(
                ErrorKind::InvalidInput,
                format!("{spec} has no public key"),
            ));
        }
        let mut template = public_key_base(label, spec);
        match public_parts(spec, spki_der)? {
            PublicParts::Ec { params, point } => {
                template.push(Attribute::EcParams(params));
                template.push(Attribute::EcPoint(point));
            }
            PublicParts::Rsa { modulus, exponent } => {
                template.push(Attribute::Modulus(modulus));
                template.push(Attribute::PublicExponent(exponent));
            }
        }
        let handle = self.recovering(|s| {
            s.call(
                Function::CreateObject,
                || format!("importing the public key {label}"),
                |session| session.create_object(&template),
            )
        })?;
        self.remember(label, ObjectKind::Public, handle, spec);
        // Read back: what the token holds is what was published.
        let stored = self.public_key(label)?;
        if stored.spki_der() != spki_der {
            return Err(HsmError::new(
                ErrorKind::IntegrityFailure,
                format!("the token stored a different public key for {label}"),
            ));
        }
        Ok(stored)
    }

    /// The public key of the key pair labelled `label`.
    pub fn public_key(&mut self, label: &KeyLabel) -> Result<PublicKey> {
        self.recovering(|s| {
            let found = s.find(ObjectKind::Public, label)?;
            s.read_public_key_checked(found.handle, found.spec, label, Identity::OfLabel)
        })
    }

    /// The spec of the key labelled `label` (private or secret).
    pub fn key_spec(&mut self, label: &KeyLabel) -> Result<KeySpec> {
        self.recovering(|s| s.find_usable_key(label).map(|(_, found)| found.spec))
    }

    /// Destroys every object labelled `label`; returns how many there were.
    pub fn destroy(&mut self, label: &KeyLabel) -> Result<usize> {
        let destroyed = self.recovering(|s| {
            let handles = s.find_all(None, label)?;
            if handles.is_empty() {
                return Err(HsmError::new(
                    ErrorKind::NotFound,
                    format!("no object labelled {label} to destroy"),
                ));
            }
            for handle in &handles {
                match s.call(
                    Function::DestroyObject,
                    || format!("destroying {label}"),
                    |session| session.destroy_object(*handle),
                ) {
                    // Another process destroyed it since the search: gone
                    // either way.
                    Err(error) if error.rv().is_some_and(is_stale_handle) => {
                        tracing::info!(%label, %error, "an object was destroyed by another process first");
                    }
                    other => other?,
                }
            }
            Ok(handles.len())
        });
        self.access().cache.forget_label(label);
        if let Ok(count) = destroyed {
            tracing::info!(%label, count, "destroyed key objects");
        }
        destroyed
    }

    /// The private or secret key labelled `label`, whichever exists.
    pub(crate) fn find_usable_key(&self, label: &KeyLabel) -> Result<(ObjectKind, Found)> {
        match self.find(ObjectKind::Private, label) {
            Ok(found) => Ok((ObjectKind::Private, found)),
            Err(e) if e.kind() == ErrorKind::NotFound => self
                .find(ObjectKind::Secret, label)
                .map(|found| (ObjectKind::Secret, found)),
            Err(e) => Err(e),
        }
    }

    fn ensure_label_free(&self, label: &KeyLabel) -> Result<()> {
        let existing = self.find_all(None, label)?;
        if existing.is_empty() {
            Ok(())
        } else {
            Err(HsmError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "{} object(s) labelled {label} already exist on the token",
                    existing.len()
                ),
            ))
        }
    }

    /// Refuses (`AlreadyExists`) a label any object on the token has: what
    /// custody is about to make must not share a label with what it did not.
    pub fn refuse_label_in_use(&mut self, label: &KeyLabel) -> Result<()> {
        self.recovering(|s| s.ensure_label_free(label))
    }

    fn remember(&self, label: &KeyLabel, kind: ObjectKind, handle: ObjectHandle, spec: KeySpec) {
        self.access()
            .cache
            .insert(kind, label, Found { handle, spec });
    }

    /// FIPS 140-style pair-wise consistency test: sign a fresh random input with
    /// the new private key and verify it with the new public key.
    fn pairwise_consistency_test(
        &mut self,
        label: &KeyLabel,
        spec: KeySpec,
        public: ObjectHandle,
        private: ObjectHandle,
        algorithm: crate::SignAlgorithm,
    ) -> Result<()> {
        let mut challenge = [0u8; 48];
        let len = algorithm.hash().map_or(challenge.len(), |h| h.digest_len());
        self.random(&mut challenge[..len])?;
        let input = match algorithm.hash() {
            Some(_) => SignInput::Digest(&challenge[..len]),
            None => SignInput::Message(&challenge[..len]),
        };
        let private = Found {
            handle: private,
            spec,
        };
        let public = Found {
            handle: public,
            spec,
        };
        let signature = self.sign_with(label, private, algorithm, input, EcdsaEncoding::Raw)?;
        if self.verify_with(
            label,
            public,
            algorithm,
            input,
            &signature,
            EcdsaEncoding::Raw,
        )? {
            Ok(())
        } else {
            Err(HsmError::new(
                ErrorKind::SelfTestFailed,
                format!("pair-wise consistency test of new {spec} key {label} failed"),
            ))
        }
    }

    pub(crate) fn read_public_key(
        &self,
        handle: ObjectHandle,
        spec: KeySpec,
        label: &KeyLabel,
    ) -> Result<PublicKey> {
        self.read_public_key_checked(handle, spec, label, Identity::Unchecked)
    }

    /// [`Self::read_public_key`]; with [`Identity::OfLabel`], `CKA_ID` and
    /// `CKA_CLASS` are read in the same call and must be the label's public
    /// key, or the handle is stale (see the module docs of `session.rs`).
    fn read_public_key_checked(
        &self,
        handle: ObjectHandle,
        spec: KeySpec,
        label: &KeyLabel,
        identity: Identity,
    ) -> Result<PublicKey> {
        let mut wanted = if spec.rsa_bits().is_some() {
            vec![AttributeType::Modulus, AttributeType::PublicExponent]
        } else {
            vec![AttributeType::EcPoint]
        };
        if identity == Identity::OfLabel {
            wanted.extend([AttributeType::Id, AttributeType::Class]);
        }
        let attributes = self.attributes(handle, &wanted, label)?;
        let mut modulus = None;
        let mut exponent = None;
        let mut point = None;
        let mut id = None;
        let mut class = None;
        for attribute in attributes {
            match attribute {
                Attribute::Modulus(m) => modulus = Some(m),
                Attribute::PublicExponent(e) => exponent = Some(e),
                Attribute::EcPoint(p) => point = Some(p),
                Attribute::Id(i) => id = Some(i),
                Attribute::Class(c) => class = Some(c),
                _ => {}
            }
        }
        if identity == Identity::OfLabel
            && (id.as_deref() != Some(label.as_str().as_bytes())
                || class != Some(ObjectClass::PUBLIC_KEY))
        {
            return Err(stale_handle(label, "another object"));
        }
        let missing = || {
            HsmError::new(
                ErrorKind::Internal,
                format!("public key attributes of {label} are missing"),
            )
        };
        match (point, modulus, exponent) {
            (Some(point), _, _) => ec_public_key(spec, &point),
            (None, Some(modulus), Some(exponent)) => rsa_public_key(spec, &modulus, &exponent),
            _ => Err(missing()),
        }
    }

    /// Best-effort destruction of objects that must not survive (a failed
    /// generation). Failures are logged: drift detection reports leftovers.
    pub(crate) fn destroy_handles(&mut self, label: &KeyLabel, handles: &[ObjectHandle]) {
        for handle in handles {
            if let Err(error) = self.call(
                Function::DestroyObject,
                || format!("destroying half-made {label}"),
                |session| session.destroy_object(*handle),
            ) {
                tracing::error!(%label, %error, "could not destroy a half-made key object");
            }
        }
        self.access().cache.forget_label(label);
    }
}
