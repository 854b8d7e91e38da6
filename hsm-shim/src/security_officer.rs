//! Operations only the token's security officer (SO) may do.
//!
//! The one we need: making a backup KEK trusted (`CKA_TRUSTED`), so that keys
//! made [`Exportability::BackupWrapOnly`] (`CKA_WRAP_WITH_TRUSTED`) can be
//! wrapped under it and under nothing else. SoftHSM2 enforces both halves:
//! a user may not set `CKA_TRUSTED` (`CKR_ATTRIBUTE_READ_ONLY`), and a
//! wrap-with-trusted key refuses an untrusted KEK (`CKR_KEY_NOT_WRAPPABLE`).
//!
//! PKCS#11 logs in per application, as one user type at a time, so this runs
//! in a process (or a moment) with no user login: a ceremony step in
//! `custodyctl`, or a test before it opens [`crate::Hsm`]. An SO can only make
//! public objects; the KEK is still sensitive and never extractable, and it is
//! meant to live only as long as the backup or restore that needs it.

use cryptoki::context::Function;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::UserType;
use secrecy::{ExposeSecret, SecretSlice, SecretString};
use zeroize::Zeroize;

use crate::config::TokenSelector;
use crate::error::{ErrorKind, HsmError, Result};
use crate::fault::Faults;
use crate::keys::CheckValue;
use crate::pool::{find_token, load_module};
use crate::session::{HandleCache, HsmSession, TokenAccess};
use crate::types::{KeyInfo, KeyLabel};

/// Where the trusted KEK's value comes from.
#[derive(Debug)]
pub enum KekSource<'a> {
    /// Generated inside the HSM.
    Generate,
    /// A 32-byte value, for example rebuilt from backup shares for a restore.
    Import(&'a SecretSlice<u8>),
}

/// Logs in as the SO and makes a trusted AES-256 KEK labelled `label` that can
/// wrap and unwrap, and nothing else. Returns its key check value.
pub fn create_trusted_kek(
    module: &std::path::Path,
    token: &TokenSelector,
    so_pin: &SecretString,
    label: &KeyLabel,
    source: KekSource<'_>,
) -> Result<KeyInfo> {
    if let KekSource::Import(value) = &source {
        if value.expose_secret().len() != 32 {
            return Err(HsmError::new(
                ErrorKind::InvalidInput,
                format!("a KEK is 32 bytes, got {}", value.expose_secret().len()),
            ));
        }
    }
    let ctx = load_module(module)?;
    let (slot, _) = find_token(&ctx, token)?;
    let access = std::sync::Arc::new(TokenAccess {
        ctx,
        slot,
        // The SO session logs in below with the SO PIN, not this one.
        pin: SecretString::from(""),
        cache: HandleCache::default(),
        faults: Faults::default(),
    });
    let session = access
        .ctx
        .open_rw_session(slot)
        .map_err(|e| HsmError::from_cryptoki("opening an SO session", e))?;
    session
        .login(UserType::So, Some(so_pin))
        .map_err(|e| HsmError::from_cryptoki("logging in as the security officer", e))?;
    let mut so = HsmSession::new(access, session);
    let made = make_trusted_kek(&mut so, label, source);
    let logout = so.call(
        Function::Logout,
        || "logging the security officer out".into(),
        |session| session.logout(),
    );
    let info = made?;
    logout?;
    tracing::info!(%label, kcv = ?info.check_value, "security officer made a trusted KEK");
    Ok(info)
}

fn make_trusted_kek(
    so: &mut HsmSession,
    label: &KeyLabel,
    source: KekSource<'_>,
) -> Result<KeyInfo> {
    so.ensure_label_free_for_import(label)?;
    let bytes = label.as_str().as_bytes();
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        // An SO may only make public objects; the key value stays sensitive.
        Attribute::Private(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Trusted(true),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Modifiable(false),
        Attribute::Id(bytes.to_vec()),
        Attribute::Label(bytes.to_vec()),
    ];
    let handle = match source {
        KekSource::Generate => {
            template.push(Attribute::ValueLen(32.into()));
            so.call(
                Function::GenerateKey,
                || format!("generating trusted KEK {label}"),
                |session| session.generate_key(&Mechanism::AesKeyGen, &template),
            )?
        }
        KekSource::Import(value) => {
            template.push(Attribute::Value(value.expose_secret().to_vec()));
            let created = so.call(
                Function::CreateObject,
                || format!("importing trusted KEK {label}"),
                |session| session.create_object(&template),
            );
            for attribute in &mut template {
                if let Attribute::Value(bytes) = attribute {
                    bytes.zeroize();
                }
            }
            created?
        }
    };
    so.finish_secret_key(label, handle, CheckValue::Required)
}
