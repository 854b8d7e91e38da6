//! The one operation only the token's security officer (SO) may do: making
//! the trusted backup KEK, with [`Hsm::create_trusted_kek`].
//!
//! A key made
//! [`Exportability::BackupWrapOnly`](crate::Exportability::BackupWrapOnly)
//! (`CKA_WRAP_WITH_TRUSTED`) can be wrapped under a KEK marked `CKA_TRUSTED`
//! and under nothing else, and only the SO may mark a key trusted. SoftHSM2
//! enforces both halves: a user who sets `CKA_TRUSTED` gets
//! `CKR_ATTRIBUTE_READ_ONLY`, and a wrap-with-trusted key refuses an untrusted
//! KEK (`CKR_KEY_NOT_WRAPPABLE`).
//!
//! custodyd makes the KEK during a ceremony, while it serves requests. PKCS#11
//! logs in per application, as one user type at a time: the SO cannot log in
//! while the user is (`CKR_USER_ANOTHER_ALREADY_LOGGED_IN`), and logging the
//! user out logs out every session of the process, the pool's workers
//! included. So the pool pauses (running jobs finish, queued jobs wait; see
//! `pool.rs`), and on a session of its own the application logs out, the SO
//! logs in, makes the KEK and logs out, and the user logs in again before the
//! pool resumes. The user login is restored whatever happened on the way; if
//! even that fails, the error is returned and the workers log in again on
//! their next job (a logged-out session is one [`HsmSession`] recovers from).
//! The SO logs in with the pool's read-write sessions open, which SoftHSM2
//! allows; it refuses while a read-only session is open
//! (`CKR_SESSION_READ_ONLY_EXISTS`), and this crate opens none.
//!
//! What the logout does besides (PKCS#11 `C_Logout`, and SoftHSM2 does it): the
//! application's handles to private objects become invalid, so the shared
//! handle cache is emptied; and private session objects of every session of
//! the process are destroyed, among them a session KEK imported for a restore
//! ([`HsmSession::import_session_unwrap_kek`]). A restore must therefore not
//! run while a trusted KEK is being made. Sessions from [`Hsm::session`] are
//! not paused: see there.
//!
//! An SO can only make public objects; the KEK is still sensitive and never
//! extractable, and it is meant to live only as long as the backup or restore
//! that needs it.

use cryptoki::context::Function;
use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::UserType;
use secrecy::{ExposeSecret, SecretSlice, SecretString};

use crate::error::{ErrorKind, HsmError, Result};
use crate::keys::CheckValue;
use crate::pool::Hsm;
use crate::session::HsmSession;
use crate::types::{KeyInfo, KeyLabel};

/// Where the trusted KEK's value comes from.
#[derive(Debug)]
pub enum KekSource<'a> {
    /// Generated inside the HSM.
    Generate,
    /// A 32-byte value, for example rebuilt from backup shares for a restore.
    Import(&'a SecretSlice<u8>),
}

impl Hsm {
    /// Makes a trusted AES-256 KEK labelled `label` that can wrap and unwrap,
    /// and nothing else, as the token's security officer, and returns its key
    /// check value.
    ///
    /// Blocking, and it pauses the worker pool until it returns (see the
    /// module docs): async callers use `spawn_blocking`. It cannot be called
    /// from inside [`Hsm::run`] (`Internal`: the pause would wait for its own
    /// job). Other errors: `InvalidInput` for an imported value that is not 32
    /// bytes, `AlreadyExists` if any object has the label, `Authentication`
    /// for a wrong SO PIN.
    pub fn create_trusted_kek(
        &self,
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
        let info = self.with_workers_paused(|access| {
            let mut session = HsmSession::new(access.clone(), access.open_logged_in()?);
            // Checked as the user, who sees every object; the SO sees only
            // public ones and would miss a private key with this label.
            session.refuse_label_in_use(label)?;
            let made = as_security_officer(&mut session, so_pin, |so| {
                make_trusted_kek(so, label, source)
            });
            let restored = restore_user_login(&session);
            match (made, restored) {
                (Ok(info), Ok(())) => Ok(info),
                (Ok(info), Err(error)) => {
                    tracing::error!(
                        %label,
                        kcv = ?info.check_value,
                        %error,
                        "the trusted KEK was made, but the user could not be logged in again; \
                         workers log in again on their next job"
                    );
                    Err(error)
                }
                (Err(error), Ok(())) => Err(error),
                (Err(error), Err(restore_error)) => {
                    tracing::error!(
                        %restore_error,
                        "the user could not be logged in again; workers log in again on their next job"
                    );
                    Err(error)
                }
            }
            // `session` closes here; the pool's sessions keep the login.
        })?;
        tracing::info!(%label, kcv = ?info.check_value, "security officer made a trusted KEK");
        Ok(info)
    }
}

/// Logs the application out, logs the SO in on `session`, and runs `op`. The
/// caller logs the user in again, whatever this returns.
fn as_security_officer<T>(
    session: &mut HsmSession,
    so_pin: &SecretString,
    op: impl FnOnce(&mut HsmSession) -> Result<T>,
) -> Result<T> {
    session.call(
        Function::Logout,
        || "logging the user out for the security officer".into(),
        |s| s.logout(),
    )?;
    session.call(
        Function::Login,
        || "logging in as the security officer".into(),
        |s| s.login(UserType::So, Some(so_pin)),
    )?;
    op(session)
}

/// Logs out whoever is logged in (the SO, the user, or nobody) and logs the
/// user in again. The logout made every cached handle to a private object
/// invalid, so the handle cache is emptied.
fn restore_user_login(session: &HsmSession) -> Result<()> {
    let logout = session.call(
        Function::Logout,
        || "logging the security officer out".into(),
        |s| s.logout(),
    );
    session.access().cache.clear();
    match logout {
        Ok(()) => {}
        Err(error) if error.rv() == Some(RvError::UserNotLoggedIn) => {}
        // Whoever is still logged in, the login below says so.
        Err(error) => tracing::warn!(%error, "logging out after the security officer's step"),
    }
    let pin = &session.access().pin;
    match session.call(
        Function::Login,
        || "logging the user in again after the security officer's step".into(),
        |s| s.login(UserType::User, Some(pin)),
    ) {
        Ok(()) => Ok(()),
        Err(error) if error.rv() == Some(RvError::UserAlreadyLoggedIn) => Ok(()),
        Err(error) => Err(error),
    }
}

fn make_trusted_kek(
    so: &mut HsmSession,
    label: &KeyLabel,
    source: KekSource<'_>,
) -> Result<KeyInfo> {
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
            so.create_with_value(template, value, || format!("importing trusted KEK {label}"))?
        }
    };
    so.finish_secret_key(label, handle, CheckValue::Required)
}
