//! One logged-in PKCS#11 session, and the recovery rules around it.
//!
//! [`HsmSession`] is the only type that issues PKCS#11 calls. It is `Send` but
//! not `Sync`: it lives on one thread (a pool worker, or a caller that owns a
//! thread) and never crosses an `.await`. Every call goes through
//! [`HsmSession::call`], which consults the fault plan and attaches context, and
//! every public operation runs inside [`HsmSession::recovering`], which turns a
//! lost session or a stale object handle into a reopen or a re-find, at most
//! [`MAX_RECOVERIES`] times, before giving up with a clear error.
//!
//! The operations themselves live in `keys.rs`, `sign.rs` and `wrap.rs`, one
//! file per operation family.
//!
//! ## Other processes on the token
//!
//! Replicas of custodyd share one token (one HSM partition), so objects
//! appear and vanish under the handles a process has cached. What SoftHSM2
//! 2.6.1 does, measured with two processes on one token directory
//! (`softhsm-tests/tests/shared_token.rs`):
//!
//! - **An object another process destroyed** is gone for every call on a
//!   handle this process still holds: `C_SignInit`, `C_VerifyInit`,
//!   `C_EncryptInit`, `C_DecryptInit`, `C_GetAttributeValue` and
//!   `C_DestroyObject` fail `CKR_OBJECT_HANDLE_INVALID`, `C_WrapKey`
//!   `CKR_WRAPPING_KEY_HANDLE_INVALID` (the KEK) or `CKR_KEY_HANDLE_INVALID`
//!   (the key), `C_UnwrapKey` `CKR_UNWRAPPING_KEY_HANDLE_INVALID`. SoftHSM2
//!   never signs with a copy it still holds in memory, and the next search
//!   does not find the object.
//! - **An object another process made** is found by the next search.
//! - **A label destroyed and made again** by another process: the old
//!   handle keeps failing as above, and a search finds the new object under
//!   a new handle. SoftHSM2 never reuses a handle within a process (its
//!   handle manager counts up), so a stale handle never names another
//!   object there. PKCS#11 does not promise that: another module may give
//!   a destroyed object's handle to a new one.
//! - **A listing** (`C_FindObjects`) can name an object that another process
//!   destroys before its attributes are read.
//!
//! So a call that fails with one of those codes drops the cached handles
//! that attempt used and looks the labels up again ([`Recovery::Refind`],
//! once per stale handle, within [`MAX_RECOVERIES`]); an object gone for
//! good is [`ErrorKind::NotFound`], never an integrity failure, and the
//! other keys' cached handles stay. A listing leaves out what vanished
//! while it was read (`inventory.rs`). Against a module that reuses
//! handles: the cache never holds one handle under two labels (a handle
//! found for one label evicts another label's entry with it), and a public
//! key read through a cached handle reads `CKA_ID` and `CKA_CLASS` in the
//! same call and is refused as stale unless they are the label's. Signing,
//! verifying, encryption and wrapping use a cached handle without another
//! call to confirm it, to keep the fast path one call long; custody never
//! destroys the objects of a version that may still sign (only
//! pre-activation, deactivated and compromised versions, and generations
//! never committed), AES-GCM and RFC 5649 refuse a wrong key rather than
//! release data, and a verification under a wrong key answers "invalid".

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::raw::c_ulong;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use cryptoki::context::{Function, Pkcs11};
use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use secrecy::SecretString;

use crate::encoding::spec_from_ec_params;
use crate::error::{ErrorKind, HsmError, Result};
use crate::fault::Faults;
use crate::store_lock::ObjectStoreLock;
use crate::types::{KeyLabel, KeySpec};
use crate::watchdog::CallWatch;

/// How many times one operation may reopen its session or re-find its objects
/// before the error is returned.
pub const MAX_RECOVERIES: u32 = 3;

/// What we know about one token: enough to open and log in sessions, plus what
/// all sessions share (the handle cache and the fault plan).
pub(crate) struct TokenAccess {
    pub(crate) ctx: Pkcs11,
    pub(crate) slot: Slot,
    pub(crate) pin: SecretString,
    pub(crate) cache: HandleCache,
    pub(crate) faults: Faults,
    pub(crate) object_store: ObjectStoreLock,
    /// The deadline of one call (`HsmConfig::call_timeout`).
    pub(crate) call_timeout: Duration,
}

impl TokenAccess {
    /// Opens a read-write session and makes sure the application is logged in.
    pub(crate) fn open_logged_in(&self) -> Result<Session> {
        let session = self
            .faults
            .check(Function::OpenSession)
            .and_then(|()| self.ctx.open_rw_session(self.slot))
            .map_err(|e| HsmError::from_cryptoki("opening a session on the token", e))?;
        let login = || {
            // Ordered against other processes where it can be; a store
            // busy for half the deadline does not stop the login. Half, not
            // all: opening a session runs under the watchdog with the same
            // deadline, and a wait as long as the deadline raced it, so a
            // store held by a hung call could cost a replacement worker too.
            let _writing = self
                .object_store
                .hold(Function::Login, self.call_timeout / 2)
                .ok();
            self.faults
                .check(Function::Login)
                .and_then(|()| session.login(UserType::User, Some(&self.pin)))
        };
        // Login is per application: a second session finds it already done.
        match login() {
            Ok(()) | Err(CryptokiError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            // The security officer is still logged in: the SO step's own
            // logout met a failing device (see `security_officer.rs`), and
            // its pause has ended, so no SO work is running. Log the SO out,
            // or every session of the pool would act as the SO or fail.
            Err(CryptokiError::Pkcs11(RvError::UserAnotherAlreadyLoggedIn, _)) => {
                tracing::warn!("the security officer was left logged in; logging out and in again");
                self.faults
                    .check(Function::Logout)
                    .and_then(|()| session.logout())
                    .and_then(|()| login())
                    .map_err(|e| {
                        HsmError::from_cryptoki("logging the SO out and the user in", e)
                    })?;
                Ok(session)
            }
            Err(e) => Err(HsmError::from_cryptoki("logging in to the token", e)),
        }
    }
}

/// Which of a label's objects is meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ObjectKind {
    Private,
    Public,
    Secret,
}

impl ObjectKind {
    pub(crate) fn class(self) -> ObjectClass {
        match self {
            ObjectKind::Private => ObjectClass::PRIVATE_KEY,
            ObjectKind::Public => ObjectClass::PUBLIC_KEY,
            ObjectKind::Secret => ObjectClass::SECRET_KEY,
        }
    }
}

/// A found object: its handle and the spec read from its attributes once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Found {
    pub(crate) handle: ObjectHandle,
    pub(crate) spec: KeySpec,
}

/// Handles by label, shared by every session of the application (PKCS#11 token
/// object handles are valid in all of an application's sessions). It saves a
/// `C_FindObjects` round per request; a stale entry shows up as
/// `CKR_OBJECT_HANDLE_INVALID` (or its wrap and unwrap forms) and is dropped
/// by [`HsmSession::recovering`]. See the module docs for other processes.
///
/// Only token objects are cached. A session object dies with the session that
/// made it (or with a logout, if private), and a cached handle would outlive
/// it: on a module that reuses handles it could even name another object. So a
/// session object (a restore's KEK) is looked up on each use, and once its
/// session is closed it is simply not found.
#[derive(Default)]
pub(crate) struct HandleCache {
    entries: RwLock<Entries>,
}

#[derive(Default)]
struct Entries {
    by_label: HashMap<(ObjectKind, KeyLabel), Found>,
    /// Which label each cached handle is under: never two.
    by_handle: HashMap<c_ulong, (ObjectKind, KeyLabel)>,
}

impl Entries {
    fn remove(&mut self, key: &(ObjectKind, KeyLabel)) {
        if let Some(found) = self.by_label.remove(key) {
            self.by_handle.remove(&found.handle.handle());
        }
    }
}

impl HandleCache {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Entries> {
        self.entries.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Entries> {
        self.entries.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, kind: ObjectKind, label: &KeyLabel) -> Option<Found> {
        self.read().by_label.get(&(kind, label.clone())).copied()
    }

    /// Caches `found` for `label`. Another label's entry with the same
    /// handle is dropped: the module gave that handle to this object, so
    /// the other entry's object is gone.
    pub(crate) fn insert(&self, kind: ObjectKind, label: &KeyLabel, found: Found) {
        let key = (kind, label.clone());
        let mut entries = self.write();
        entries.remove(&key);
        if let Some(other) = entries.by_handle.insert(found.handle.handle(), key.clone()) {
            if other != key {
                tracing::warn!(handle = %found.handle, stale = %other.1, now = %label,
                    "the module reused a cached handle; dropping the stale entry");
                entries.by_label.remove(&other);
            }
        }
        entries.by_label.insert(key, found);
    }

    /// Drops `label`'s entry of `kind` if it still holds `handle` (another
    /// session may have cached a fresh one meanwhile).
    fn forget_handle(&self, kind: ObjectKind, label: &KeyLabel, handle: ObjectHandle) {
        let key = (kind, label.clone());
        let mut entries = self.write();
        if entries
            .by_label
            .get(&key)
            .is_some_and(|f| f.handle == handle)
        {
            entries.remove(&key);
        }
    }

    pub(crate) fn forget_label(&self, label: &KeyLabel) {
        let mut entries = self.write();
        for kind in [ObjectKind::Private, ObjectKind::Public, ObjectKind::Secret] {
            entries.remove(&(kind, label.clone()));
        }
    }

    pub(crate) fn clear(&self) {
        let mut entries = self.write();
        entries.by_label.clear();
        entries.by_handle.clear();
    }
}

/// One logged-in session on the token. See the module docs.
pub struct HsmSession {
    session: Session,
    access: Arc<TokenAccess>,
    /// The pool worker's deadline watch; `None` outside the pool (a
    /// session of [`crate::Hsm::session`] has no deadline: its caller owns
    /// the thread).
    watch: Option<Arc<CallWatch>>,
    /// The cache entries the current attempt of [`Self::recovering`] looked
    /// up: what a stale handle drops.
    used: RefCell<Vec<(ObjectKind, KeyLabel, ObjectHandle)>>,
}

impl std::fmt::Debug for HsmSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsmSession")
            .field("slot", &self.access.slot)
            .field("session", &self.session.handle())
            .finish()
    }
}

/// What to do about an error before trying again.
enum Recovery {
    /// The session is gone or logged out: open a new one and log in.
    Reopen,
    /// A handle went stale (another process destroyed or replaced the
    /// object): drop the cached handles the attempt used and look their
    /// labels up again.
    Refind,
}

fn recovery_for(error: &HsmError) -> Option<Recovery> {
    match error.rv()? {
        RvError::SessionHandleInvalid
        | RvError::SessionClosed
        | RvError::UserNotLoggedIn
        | RvError::DeviceError
        | RvError::DeviceRemoved
        | RvError::TokenNotPresent => Some(Recovery::Reopen),
        rv if is_stale_handle(rv) => Some(Recovery::Refind),
        _ => None,
    }
}

/// The answers of a call on a handle whose object is gone (see the module
/// docs for which call answers which).
pub(crate) fn is_stale_handle(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::ObjectHandleInvalid
            | RvError::KeyHandleInvalid
            | RvError::WrappingKeyHandleInvalid
            | RvError::UnwrappingKeyHandleInvalid
    )
}

/// A handle that names something other than the label's object: treated as
/// the stale handle it is, so that [`HsmSession::recovering`] looks again.
pub(crate) fn stale_handle(label: &KeyLabel, what: &str) -> HsmError {
    HsmError::from_cryptoki(
        format!("the cached handle of {label} now names {what}"),
        CryptokiError::Pkcs11(RvError::ObjectHandleInvalid, Function::GetAttributeValue),
    )
}

impl HsmSession {
    pub(crate) fn new(access: Arc<TokenAccess>, session: Session) -> Self {
        Self {
            session,
            access,
            watch: None,
            used: RefCell::default(),
        }
    }

    /// A pool worker's session, whose calls run under `watch`'s deadline.
    pub(crate) fn watched(
        access: Arc<TokenAccess>,
        session: Session,
        watch: Arc<CallWatch>,
    ) -> Self {
        Self {
            session,
            access,
            watch: Some(watch),
            used: RefCell::default(),
        }
    }

    /// Runs `op`, one PKCS#11 call, under the deadline if this is a pool
    /// worker's session.
    fn under_deadline<T>(&self, function: Function, op: impl FnOnce() -> Result<T>) -> Result<T> {
        match &self.watch {
            Some(watch) => watch.call(function, op),
            None => op(),
        }
    }

    pub(crate) fn access(&self) -> &TokenAccess {
        &self.access
    }

    /// Issues one PKCS#11 call: the fault plan first, then the call, with
    /// `context` attached to any error.
    pub(crate) fn call<T>(
        &self,
        function: Function,
        context: impl FnOnce() -> String,
        op: impl FnOnce(&Session) -> cryptoki::error::Result<T>,
    ) -> Result<T> {
        let _store = self
            .access
            .object_store
            .hold(function, self.access.call_timeout)?;
        // The fault plan inside the deadline: an injected stall is a hung call.
        self.under_deadline(function, || {
            self.access
                .faults
                .check(function)
                .and_then(|()| op(&self.session))
                .map_err(|e| HsmError::from_cryptoki(context(), e))
        })
    }

    /// Runs `op`, recovering from a lost session or stale handles at most
    /// [`MAX_RECOVERIES`] times. `op` must be safe to repeat after a failure:
    /// every operation here either changes nothing on failure or checks for its
    /// own leftovers first (see `keys.rs`).
    pub(crate) fn recovering<T>(
        &mut self,
        mut op: impl FnMut(&mut Self) -> Result<T>,
    ) -> Result<T> {
        let mut recoveries = 0;
        loop {
            self.used.borrow_mut().clear();
            let error = match op(self) {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            let Some(recovery) = recovery_for(&error) else {
                return Err(error);
            };
            if recoveries == MAX_RECOVERIES {
                tracing::error!(%error, recoveries, "HSM operation failed after recovery attempts");
                return Err(error);
            }
            recoveries += 1;
            match recovery {
                Recovery::Reopen => {
                    tracing::warn!(%error, attempt = recoveries, "HSM session lost; reopening");
                    // A short, growing pause: a device error is often a busy or
                    // restarting HSM, and retrying at once just fails again.
                    std::thread::sleep(Duration::from_millis(20 << recoveries));
                    if let Err(reopen_error) = self.reopen() {
                        tracing::warn!(%reopen_error, "reopening the HSM session failed");
                    }
                }
                Recovery::Refind => {
                    tracing::info!(%error, "stale object handle; looking objects up again");
                    for (kind, label, handle) in self.used.take() {
                        self.access.cache.forget_handle(kind, &label, handle);
                    }
                }
            }
        }
    }

    /// Ends this session and goes on with a fresh one, so that every session
    /// object it made is gone (PKCS#11 destroys them with their session):
    /// for a caller whose own destroy failed. Tries again a few times while
    /// the device fails, as [`Self::recovering`] would.
    pub fn renew(&mut self) -> Result<()> {
        let mut attempt = 0;
        loop {
            match self.reopen() {
                Ok(()) => return Ok(()),
                Err(error) if attempt == MAX_RECOVERIES => return Err(error),
                Err(error) => {
                    attempt += 1;
                    tracing::warn!(%error, attempt, "renewing the HSM session");
                    std::thread::sleep(Duration::from_millis(20 << attempt));
                }
            }
        }
    }

    /// Replaces the session with a freshly opened, logged-in one. The new one is
    /// opened before the old one is closed, so the application never drops to
    /// zero sessions (which would log it out).
    fn reopen(&mut self) -> Result<()> {
        let fresh = self.under_deadline(Function::OpenSession, || self.access.open_logged_in())?;
        let stale = std::mem::replace(&mut self.session, fresh);
        // The stale session may already be gone; closing it is best effort.
        if let Err(e) = stale.close() {
            tracing::debug!(error = %e, "closing the stale session");
        }
        self.access.cache.clear();
        Ok(())
    }

    /// Finds the object of `kind` labelled `label`, through the handle cache.
    pub(crate) fn find(&self, kind: ObjectKind, label: &KeyLabel) -> Result<Found> {
        if let Some(found) = self.access.cache.get(kind, label) {
            self.used
                .borrow_mut()
                .push((kind, label.clone(), found.handle));
            return Ok(found);
        }
        let handles = self.find_all(Some(kind), label)?;
        let handle = match handles.as_slice() {
            [handle] => *handle,
            [] => {
                self.ensure_logged_in()?;
                return Err(HsmError::new(
                    ErrorKind::NotFound,
                    format!("no {kind:?} key labelled {label} on the token"),
                ));
            }
            many => {
                return Err(HsmError::new(
                    ErrorKind::Internal,
                    format!(
                        "{} {kind:?} objects share the label {label}; refusing to guess",
                        many.len()
                    ),
                ));
            }
        };
        let (spec, on_token) = self.read_spec_and_scope(handle, label)?;
        let found = Found { handle, spec };
        // Session objects stay out of the shared cache; see `HandleCache`.
        if on_token {
            self.access.cache.insert(kind, label, found);
            self.used.borrow_mut().push((kind, label.clone(), handle));
        }
        Ok(found)
    }

    /// All objects with `label` as `CKA_ID`, of one kind or of any.
    pub(crate) fn find_all(
        &self,
        kind: Option<ObjectKind>,
        label: &KeyLabel,
    ) -> Result<Vec<ObjectHandle>> {
        let mut template = vec![Attribute::Id(label.as_str().as_bytes().to_vec())];
        if let Some(kind) = kind {
            template.push(Attribute::Class(kind.class()));
        }
        self.call(
            Function::FindObjectsInit,
            || format!("looking up objects labelled {label}"),
            |s| s.find_objects(&template),
        )
    }

    /// A logged-out application sees no private objects, so "not found" may
    /// really mean "logged out". Report that as what it is, so that
    /// [`Self::recovering`] logs in again instead of calling the key missing.
    pub(crate) fn ensure_logged_in(&self) -> Result<()> {
        let info = self.call(
            Function::GetSessionInfo,
            || "reading the session state".into(),
            |s| s.get_session_info(),
        )?;
        if matches!(info.session_state(), SessionState::RwUser) {
            Ok(())
        } else {
            Err(HsmError::from_cryptoki(
                "the session is no longer logged in",
                CryptokiError::Pkcs11(RvError::UserNotLoggedIn, Function::GetSessionInfo),
            ))
        }
    }

    /// Reads the key spec from an object's type and public parameters (all
    /// non-sensitive, readable on private keys too).
    pub(crate) fn read_spec(&self, handle: ObjectHandle, label: &KeyLabel) -> Result<KeySpec> {
        self.read_spec_and_scope(handle, label)
            .map(|(spec, _)| spec)
    }

    /// [`Self::read_spec`], and whether the object is a token object
    /// (`CKA_TOKEN`), in the same `C_GetAttributeValue`.
    fn read_spec_and_scope(
        &self,
        handle: ObjectHandle,
        label: &KeyLabel,
    ) -> Result<(KeySpec, bool)> {
        let attributes = self.attributes(
            handle,
            &[
                AttributeType::KeyType,
                AttributeType::EcParams,
                AttributeType::Modulus,
                AttributeType::ValueLen,
                AttributeType::Token,
            ],
            label,
        )?;
        let mut key_type = None;
        let mut ec_params = None;
        let mut modulus_len = None;
        let mut value_len = None;
        // Every object has CKA_TOKEN; if a module kept it back, treat the
        // object as a session object: never cached, so never stale.
        let mut on_token = false;
        for attribute in attributes {
            match attribute {
                Attribute::KeyType(t) => key_type = Some(t),
                Attribute::EcParams(p) => ec_params = Some(p),
                Attribute::Modulus(m) => modulus_len = Some(m.len()),
                Attribute::ValueLen(l) => value_len = Some(*l),
                Attribute::Token(t) => on_token = t,
                _ => {}
            }
        }
        let unsupported = |what: String| {
            HsmError::new(
                ErrorKind::Unsupported,
                format!("object labelled {label} is {what}, which custody does not use"),
            )
        };
        let spec = match key_type {
            Some(KeyType::EC) | Some(KeyType::EC_EDWARDS) => {
                let params =
                    ec_params.ok_or_else(|| unsupported("an EC key without EC_PARAMS".into()))?;
                spec_from_ec_params(&params)
            }
            Some(KeyType::RSA) => match modulus_len {
                Some(256) => Ok(KeySpec::Rsa2048),
                Some(384) => Ok(KeySpec::Rsa3072),
                Some(512) => Ok(KeySpec::Rsa4096),
                other => Err(unsupported(format!(
                    "an RSA key with a {other:?}-byte modulus"
                ))),
            },
            Some(KeyType::AES) if value_len == Some(32) => Ok(KeySpec::Aes256),
            other => Err(unsupported(format!("a key of type {other:?}"))),
        }?;
        Ok((spec, on_token))
    }

    /// `C_GetAttributeValue`. cryptoki leaves out attributes the object does not
    /// have or will not reveal; callers check for what they need.
    pub(crate) fn attributes(
        &self,
        handle: ObjectHandle,
        types: &[AttributeType],
        label: &KeyLabel,
    ) -> Result<Vec<Attribute>> {
        self.call(
            Function::GetAttributeValue,
            || format!("reading attributes of {label}"),
            |s| s.get_attributes(handle, types),
        )
    }

    /// Random bytes from the HSM's RNG.
    pub fn random(&mut self, buffer: &mut [u8]) -> Result<()> {
        self.recovering(|s| {
            s.call(
                Function::GenerateRandom,
                || "drawing random bytes".into(),
                |session| session.generate_random_slice(buffer),
            )
        })
    }
}
