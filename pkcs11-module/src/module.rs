//! The module's state in safe Rust: from `C_Initialize` to `C_Finalize`,
//! the slots (one per configured custodyd), the open sessions and their
//! find, sign and verify operations. `ffi.rs` turns C arguments into calls
//! of these functions and their results back into C.
//!
//! Locking: the global state is an `Arc` behind a mutex held only to clone
//! it; each session has its own mutex, never held across a call to
//! custodyd, so threads signing in different sessions run at once
//! (`CKF_OS_LOCKING_OK`: the module uses its own locks, whatever the
//! application passes).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cryptoki_sys::*;

use crate::errors;
use crate::log::{self, Log};
use crate::mechanisms::{self, Mechanism, Operation};
use crate::objects::{Answer, Class, Key};
use crate::remote::{Config, Input, Remote, ServerConfig};

static MODULE: Mutex<Option<Arc<Module>>> = Mutex::new(None);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic is caught at the C boundary; the state it left is still
    // consistent (every update is a single assignment or insert).
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The initialised module.
pub struct Module {
    runtime: tokio::runtime::Runtime,
    slots: Vec<Slot>,
    sessions: Mutex<HashMap<CK_SESSION_HANDLE, Arc<Mutex<Session>>>>,
    next_session: AtomicU64,
    next_object: AtomicU64,
    log: Log,
}

/// One slot: one custodyd and the token it presents.
pub struct Slot {
    /// Its configuration.
    pub config: ServerConfig,
    remote: Remote,
    objects: Mutex<Objects>,
    logged_in: AtomicBool,
}

#[derive(Default)]
struct Objects {
    by_handle: HashMap<CK_OBJECT_HANDLE, (Class, Arc<Key>)>,
    handles: HashMap<(String, u32, Class), CK_OBJECT_HANDLE>,
    /// When custodyd was last asked (None: never, or the list is stale).
    fetched: Option<std::time::Instant>,
}

/// An open session.
pub struct Session {
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    found: Option<Vec<CK_OBJECT_HANDLE>>,
    sign: Option<Active>,
    verify: Option<Active>,
}

struct Active {
    key: Arc<Key>,
    operation: Operation,
}

/// Initialises the module from the file named by `CUSTODY_PKCS11_CONF`.
pub fn initialize() -> Result<(), CK_RV> {
    let mut global = lock(&MODULE);
    if global.is_some() {
        return Err(CKR_CRYPTOKI_ALREADY_INITIALIZED);
    }
    let config = Config::from_env().map_err(|e| {
        log::early(&e);
        CKR_GENERAL_ERROR
    })?;
    let log = Log::open(config.log_file.as_deref()).map_err(|e| {
        log::early(&e);
        CKR_GENERAL_ERROR
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("custody-pkcs11")
        .enable_all()
        .build()
        .map_err(|e| {
            log.line("ERROR", &format!("cannot start the module's runtime: {e}"));
            CKR_GENERAL_ERROR
        })?;
    let mut slots = Vec::new();
    {
        // tonic's channel spawns its worker on the current runtime.
        let _context = runtime.enter();
        for server in config.servers {
            let remote = Remote::new(&server).map_err(|e| {
                log.line("ERROR", &format!("server {:?}: {e}", server.label));
                CKR_GENERAL_ERROR
            })?;
            slots.push(Slot {
                config: server,
                remote,
                objects: Mutex::new(Objects::default()),
                logged_in: AtomicBool::new(false),
            });
        }
    }
    log.line("INFO", &format!("initialised with {} slot(s)", slots.len()));
    *global = Some(Arc::new(Module {
        runtime,
        slots,
        sessions: Mutex::new(HashMap::new()),
        next_session: AtomicU64::new(1),
        next_object: AtomicU64::new(1),
        log,
    }));
    Ok(())
}

/// Ends the module: sessions close, the runtime stops once no call holds it.
pub fn finalize() -> Result<(), CK_RV> {
    let module = lock(&MODULE).take().ok_or(CKR_CRYPTOKI_NOT_INITIALIZED)?;
    module.log.line("INFO", "finalised");
    lock(&module.sessions).clear();
    if let Ok(module) = Arc::try_unwrap(module) {
        module.runtime.shutdown_background();
    }
    Ok(())
}

/// The initialised module.
pub fn module() -> Result<Arc<Module>, CK_RV> {
    lock(&MODULE)
        .as_ref()
        .cloned()
        .ok_or(CKR_CRYPTOKI_NOT_INITIALIZED)
}

impl Module {
    /// Runs `future` on the module's runtime and waits for it. It works
    /// from any thread, the application's own async runtime threads too.
    fn call<T: Send + 'static>(
        &self,
        future: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, CK_RV> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.runtime.spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv().map_err(|_| CKR_DEVICE_ERROR)
    }

    /// The slot ids, 0..n.
    pub fn slot_ids(&self) -> Vec<CK_SLOT_ID> {
        (0..self.slots.len() as CK_SLOT_ID).collect()
    }

    /// Slot `id`.
    pub fn slot(&self, id: CK_SLOT_ID) -> Result<&Slot, CK_RV> {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.slots.get(i))
            .ok_or(CKR_SLOT_ID_INVALID)
    }

    /// How many sessions are open on `slot`.
    pub fn session_count(&self, slot: CK_SLOT_ID) -> usize {
        lock(&self.sessions)
            .values()
            .filter(|s| lock(s).slot == slot)
            .count()
    }

    /// Opens a session on `slot`.
    pub fn open_session(
        &self,
        slot: CK_SLOT_ID,
        flags: CK_FLAGS,
    ) -> Result<CK_SESSION_HANDLE, CK_RV> {
        self.slot(slot)?;
        if flags & CKF_SERIAL_SESSION == 0 {
            return Err(CKR_SESSION_PARALLEL_NOT_SUPPORTED);
        }
        let handle = self.next_session.fetch_add(1, Ordering::Relaxed) as CK_SESSION_HANDLE;
        let session = Session {
            slot,
            flags,
            found: None,
            sign: None,
            verify: None,
        };
        lock(&self.sessions).insert(handle, Arc::new(Mutex::new(session)));
        Ok(handle)
    }

    /// Closes a session; the last one of a slot logs it out.
    pub fn close_session(&self, handle: CK_SESSION_HANDLE) -> Result<(), CK_RV> {
        let session = lock(&self.sessions)
            .remove(&handle)
            .ok_or(CKR_SESSION_HANDLE_INVALID)?;
        let slot = lock(&session).slot;
        if self.session_count(slot) == 0 {
            if let Ok(slot) = self.slot(slot) {
                slot.logged_in.store(false, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// Closes every session of `slot`.
    pub fn close_all_sessions(&self, slot: CK_SLOT_ID) -> Result<(), CK_RV> {
        let slot_ref = self.slot(slot)?;
        lock(&self.sessions).retain(|_, s| lock(s).slot != slot);
        slot_ref.logged_in.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn session(&self, handle: CK_SESSION_HANDLE) -> Result<Arc<Mutex<Session>>, CK_RV> {
        lock(&self.sessions)
            .get(&handle)
            .cloned()
            .ok_or(CKR_SESSION_HANDLE_INVALID)
    }

    fn session_slot(&self, handle: CK_SESSION_HANDLE) -> Result<CK_SLOT_ID, CK_RV> {
        let session = self.session(handle)?;
        let slot = lock(&session).slot;
        Ok(slot)
    }

    /// The session's slot, state and flags.
    pub fn session_info(
        &self,
        handle: CK_SESSION_HANDLE,
    ) -> Result<(CK_SLOT_ID, CK_STATE, CK_FLAGS), CK_RV> {
        let session = self.session(handle)?;
        let session = lock(&session);
        let logged_in = self.slot(session.slot)?.logged_in.load(Ordering::SeqCst);
        let rw = session.flags & CKF_RW_SESSION != 0;
        let state = match (logged_in, rw) {
            (false, false) => CKS_RO_PUBLIC_SESSION,
            (false, true) => CKS_RW_PUBLIC_SESSION,
            (true, false) => CKS_RO_USER_FUNCTIONS,
            (true, true) => CKS_RW_USER_FUNCTIONS,
        };
        Ok((session.slot, state, session.flags))
    }

    /// `C_Login`: accepted for the user, whatever the PIN. The identity
    /// custodyd sees is the client certificate, so a PIN adds nothing.
    pub fn login(&self, handle: CK_SESSION_HANDLE, user: CK_USER_TYPE) -> Result<(), CK_RV> {
        let slot = self.session_slot(handle)?;
        let slot = self.slot(slot)?;
        match user {
            CKU_USER => {
                if slot.logged_in.swap(true, Ordering::SeqCst) {
                    Err(CKR_USER_ALREADY_LOGGED_IN)
                } else {
                    Ok(())
                }
            }
            CKU_CONTEXT_SPECIFIC => Err(CKR_OPERATION_NOT_INITIALIZED),
            _ => Err(CKR_USER_TYPE_INVALID),
        }
    }

    /// `C_Logout`.
    pub fn logout(&self, handle: CK_SESSION_HANDLE) -> Result<(), CK_RV> {
        let slot = self.session_slot(handle)?;
        if self.slot(slot)?.logged_in.swap(false, Ordering::SeqCst) {
            Ok(())
        } else {
            Err(CKR_USER_NOT_LOGGED_IN)
        }
    }

    /// Asks custodyd which keys the caller's certificate shows and what
    /// their public keys are; keeps each object's handle stable.
    /// Every read is a `GetKey` and a `GetPublicKey` per key, each audited
    /// by custodyd, so a list younger than `object_cache_secs` is reused
    /// (software such as OpenSSL's engine searches several times per key).
    fn refresh(&self, slot_id: CK_SLOT_ID) -> Result<(), CK_RV> {
        let slot = self.slot(slot_id)?;
        let fresh = std::time::Duration::from_secs(slot.config.object_cache_secs);
        if lock(&slot.objects)
            .fetched
            .is_some_and(|at| at.elapsed() < fresh)
        {
            return Ok(());
        }
        let remote = slot.remote.clone();
        let configured = slot.config.keys.clone();
        let fetched = self.call(async move {
            let ids = remote.key_ids(&configured).await?;
            let mut keys = Vec::new();
            for id in ids {
                keys.push((id.clone(), remote.key(&id).await));
            }
            Ok::<_, tonic::Status>(keys)
        })?;
        let fetched = fetched.map_err(|status| {
            self.log.line(
                "WARN",
                &format!(
                    "slot {slot_id}: cannot list keys: {} {}: {}",
                    status.code(),
                    errors::reason(&status),
                    status.message()
                ),
            );
            errors::ckr(&status)
        })?;
        let mut keys = Vec::new();
        for (id, result) in fetched {
            match result
                .map_err(|s| format!("{} {}: {}", s.code(), errors::reason(&s), s.message()))
            {
                Ok(remote) => match Key::from_remote(remote) {
                    Ok(key) => keys.push(Arc::new(key)),
                    Err(e) => self.log.line("WARN", &format!("key {id} not shown: {e}")),
                },
                Err(e) => self.log.line("WARN", &format!("key {id} not shown: {e}")),
            }
        }
        let mut objects = lock(&slot.objects);
        let mut by_handle = HashMap::new();
        for key in keys {
            for class in [Class::Private, Class::Public] {
                let identity = (key.key_id.clone(), key.version, class);
                let handle = *objects.handles.entry(identity).or_insert_with(|| {
                    self.next_object.fetch_add(1, Ordering::Relaxed) as CK_OBJECT_HANDLE
                });
                by_handle.insert(handle, (class, key.clone()));
            }
        }
        objects.by_handle = by_handle;
        objects.fetched = Some(std::time::Instant::now());
        Ok(())
    }

    fn object(
        &self,
        slot: CK_SLOT_ID,
        handle: CK_OBJECT_HANDLE,
    ) -> Result<(Class, Arc<Key>), CK_RV> {
        lock(&self.slot(slot)?.objects)
            .by_handle
            .get(&handle)
            .cloned()
            .ok_or(CKR_OBJECT_HANDLE_INVALID)
    }

    /// `C_FindObjectsInit`: the objects whose attributes equal the
    /// template's.
    pub fn find_init(
        &self,
        handle: CK_SESSION_HANDLE,
        template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    ) -> Result<(), CK_RV> {
        let session = self.session(handle)?;
        let slot = {
            let session = lock(&session);
            if session.found.is_some() {
                return Err(CKR_OPERATION_ACTIVE);
            }
            session.slot
        };
        self.refresh(slot)?;
        let mut found: Vec<CK_OBJECT_HANDLE> = lock(&self.slot(slot)?.objects)
            .by_handle
            .iter()
            .filter(|(_, (class, key))| {
                template
                    .iter()
                    .all(|(t, v)| key.attribute(*class, *t) == Answer::Value(v.clone()))
            })
            .map(|(h, _)| *h)
            .collect();
        found.sort_unstable();
        found.reverse();
        lock(&session).found = Some(found);
        Ok(())
    }

    /// `C_FindObjects`: up to `max` more handles.
    pub fn find(
        &self,
        handle: CK_SESSION_HANDLE,
        max: usize,
    ) -> Result<Vec<CK_OBJECT_HANDLE>, CK_RV> {
        let session = self.session(handle)?;
        let mut session = lock(&session);
        let found = session
            .found
            .as_mut()
            .ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        let mut out = Vec::new();
        while out.len() < max {
            match found.pop() {
                Some(h) => out.push(h),
                None => break,
            }
        }
        Ok(out)
    }

    /// `C_FindObjectsFinal`.
    pub fn find_final(&self, handle: CK_SESSION_HANDLE) -> Result<(), CK_RV> {
        let session = self.session(handle)?;
        lock(&session)
            .found
            .take()
            .map(|_| ())
            .ok_or(CKR_OPERATION_NOT_INITIALIZED)
    }

    /// `C_GetAttributeValue`: one answer per asked type.
    pub fn attributes(
        &self,
        handle: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        types: &[CK_ATTRIBUTE_TYPE],
    ) -> Result<Vec<Answer>, CK_RV> {
        let slot = self.session_slot(handle)?;
        let (class, key) = self.object(slot, object)?;
        Ok(types.iter().map(|t| key.attribute(class, *t)).collect())
    }

    /// The object exists (for `C_GetObjectSize` and the refusals of
    /// object changes).
    pub fn check_object(
        &self,
        handle: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
    ) -> Result<(), CK_RV> {
        let slot = self.session_slot(handle)?;
        self.object(slot, object).map(|_| ())
    }

    /// `C_SignInit` (`sign`) or `C_VerifyInit`.
    pub fn operation_init(
        &self,
        handle: CK_SESSION_HANDLE,
        mechanism: Mechanism,
        object: CK_OBJECT_HANDLE,
        sign: bool,
    ) -> Result<(), CK_RV> {
        let session = self.session(handle)?;
        let mut session = lock(&session);
        let slot_id = session.slot;
        let slot_active = if sign { &session.sign } else { &session.verify };
        if slot_active.is_some() {
            return Err(CKR_OPERATION_ACTIVE);
        }
        let (class, key) = self.object(slot_id, object)?;
        let wanted = if sign { Class::Private } else { Class::Public };
        if class != wanted {
            return Err(CKR_KEY_FUNCTION_NOT_PERMITTED);
        }
        let operation = mechanisms::start(key.algorithm, mechanism).inspect_err(|&rv| {
            self.log.line(
                "WARN",
                &format!(
                    "{} with {} ({:?}): mechanism 0x{:x} refused (CKR 0x{rv:x})",
                    if sign { "sign" } else { "verify" },
                    key.id(),
                    key.algorithm,
                    mechanism.kind
                ),
            );
        })?;
        let active = Some(Active { key, operation });
        if sign {
            session.sign = active;
        } else {
            session.verify = active;
        }
        Ok(())
    }

    /// The signature length of the session's sign operation.
    pub fn signature_len(&self, handle: CK_SESSION_HANDLE) -> Result<usize, CK_RV> {
        let session = self.session(handle)?;
        let session = lock(&session);
        let active = session.sign.as_ref().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        Ok(active.key.signature_len())
    }

    /// `C_SignUpdate` (`sign`) or `C_VerifyUpdate`; an error ends the
    /// operation.
    pub fn update(&self, handle: CK_SESSION_HANDLE, part: &[u8], sign: bool) -> Result<(), CK_RV> {
        let session = self.session(handle)?;
        let mut session = lock(&session);
        let slot = if sign {
            &mut session.sign
        } else {
            &mut session.verify
        };
        let active = slot.as_mut().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        let result = active.operation.update(part);
        if result.is_err() {
            *slot = None;
        }
        result
    }

    fn take(&self, handle: CK_SESSION_HANDLE, sign: bool) -> Result<(CK_SLOT_ID, Active), CK_RV> {
        let session = self.session(handle)?;
        let mut session = lock(&session);
        let active = if sign {
            session.sign.take()
        } else {
            session.verify.take()
        };
        Ok((session.slot, active.ok_or(CKR_OPERATION_NOT_INITIALIZED)?))
    }

    /// `C_Sign` (with `last`) or `C_SignFinal`: ends the operation and
    /// returns custodyd's signature.
    pub fn sign(&self, handle: CK_SESSION_HANDLE, last: Option<&[u8]>) -> Result<Vec<u8>, CK_RV> {
        let (slot_id, mut active) = self.take(handle, true)?;
        if let Some(data) = last {
            active.operation.update(data)?;
        }
        let input = active.operation.finish()?;
        let slot = self.slot(slot_id)?;
        let remote = slot.remote.clone();
        let key = active.key.clone();
        let sent = input.clone();
        let result = self.call(async move {
            remote
                .sign(&key.key_id, key.version, key.is_ecdsa(), sent)
                .await
        })?;
        let signature = result.map_err(|status| {
            let rv = self.refusal("sign", &active.key, &input, &status);
            if rv == CKR_KEY_HANDLE_INVALID || rv == CKR_KEY_FUNCTION_NOT_PERMITTED {
                // The version may be gone or retired: the next search asks
                // custodyd again.
                lock(&slot.objects).fetched = None;
            }
            rv
        })?;
        if signature.len() != active.key.signature_len() {
            self.log.line(
                "ERROR",
                &format!(
                    "{}: custodyd returned a {}-byte signature, expected {}",
                    active.key.id(),
                    signature.len(),
                    active.key.signature_len()
                ),
            );
            return Err(CKR_FUNCTION_FAILED);
        }
        Ok(signature)
    }

    /// `C_Verify` (with `last`) or `C_VerifyFinal`: ends the operation.
    pub fn verify(
        &self,
        handle: CK_SESSION_HANDLE,
        last: Option<&[u8]>,
        signature: &[u8],
    ) -> Result<(), CK_RV> {
        let (slot_id, mut active) = self.take(handle, false)?;
        if let Some(data) = last {
            active.operation.update(data)?;
        }
        let input = active.operation.finish()?;
        if signature.len() != active.key.signature_len() {
            return Err(CKR_SIGNATURE_LEN_RANGE);
        }
        let slot = self.slot(slot_id)?;
        let remote = slot.remote.clone();
        let key = active.key.clone();
        let sent = input.clone();
        let signature = signature.to_vec();
        let result = self.call(async move {
            remote
                .verify(&key.key_id, key.version, key.is_ecdsa(), sent, signature)
                .await
        })?;
        match result {
            Ok(true) => Ok(()),
            Ok(false) => Err(CKR_SIGNATURE_INVALID),
            Err(status) => Err(self.refusal("verify", &active.key, &input, &status)),
        }
    }

    /// Logs custodyd's refusal (for a quorum-gated key, what to request
    /// instead) and maps it to a CKR.
    fn refusal(&self, what: &str, key: &Key, input: &Input, status: &tonic::Status) -> CK_RV {
        let reason = errors::reason(status);
        let rv = errors::ckr(status);
        let mut line = format!(
            "{what} with {} refused: {} {reason}: {} (returned CKR 0x{rv:08x})",
            key.id(),
            status.code(),
            status.message()
        );
        if reason == "QUORUM_REQUIRED" {
            line.push_str(&format!(
                "; this key signs only with officer approval: request a SIGN operation \
                 (OperationService.RequestOperation{}) and collect the signature once \
                 officers approve it",
                match input {
                    Input::Digest(d) => format!(
                        ", e.g. `custodyctl request sign {} {}`",
                        key.id(),
                        d.custodyctl_args()
                    ),
                    Input::Data(_) => String::new(),
                }
            ));
        }
        self.log.line("WARN", &line);
        rv
    }

    /// Logs an event.
    pub fn log(&self, level: &str, message: &str) {
        self.log.line(level, message);
    }
}
