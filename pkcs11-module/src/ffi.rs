//! The C ABI: every PKCS#11 v2.40 entry point, and the only `unsafe` code
//! of custody (the rest of this crate is `#![deny(unsafe_code)]`, every
//! other crate `#![forbid(unsafe_code)]`).
//!
//! What the unsafe code does, and why it is sound given a caller that keeps
//! PKCS#11's contract:
//!
//! - It reads the caller's arguments: a pointer and length become a slice
//!   (`slice`), a pointer to a struct is read with `read_unaligned`
//!   (`CK_C_INITIALIZE_ARGS`, `CK_MECHANISM`, PSS and EdDSA parameters,
//!   `CK_ATTRIBUTE` templates). Null pointers with a non-zero length are
//!   refused `CKR_ARGUMENTS_BAD` before any read.
//! - It writes results where the caller points: scalars and info structs
//!   with `write_unaligned`, byte and handle arrays only after checking the
//!   caller's stated capacity (`CKR_BUFFER_TOO_SMALL` otherwise).
//! - `C_GetFunctionList` hands out a pointer to an immutable static.
//!
//! Nothing is kept of a caller's pointer past the call. PINs are never read.
//! Every entry point runs its body under `catch_unwind` ([`guard`]): a
//! panic answers `CKR_GENERAL_ERROR` and never unwinds into C.

use std::panic::AssertUnwindSafe;

use cryptoki_sys::*;

use crate::mechanisms::{self, Mechanism};
use crate::module::{self, Module};
use crate::objects::Answer;

type Result<T> = std::result::Result<T, CK_RV>;

/// Runs an entry point's body; a panic becomes `CKR_GENERAL_ERROR`.
fn guard(body: impl FnOnce() -> Result<()>) -> CK_RV {
    match std::panic::catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => CKR_OK,
        Ok(Err(rv)) => rv,
        Err(_) => CKR_GENERAL_ERROR,
    }
}

/// Declares exported entry points whose bodies run under [`guard`].
macro_rules! entry_points {
    ($(fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block)*) => {
        $(
            #[doc = concat!("`", stringify!($name), "` (PKCS#11 v2.40).")]
            ///
            /// # Safety
            ///
            /// The caller keeps the PKCS#11 contract for its pointers.
            #[unsafe(no_mangle)]
            pub unsafe extern "C" fn $name($($arg: $ty),*) -> CK_RV {
                guard(move || $body)
            }
        )*
    };
}

/// Declares exported entry points that answer `CKR_FUNCTION_NOT_SUPPORTED`
/// (keys are made, imported and changed through custody only).
macro_rules! not_supported {
    ($($name:ident($($ty:ty),* $(,)?);)*) => {
        $(
            #[doc = concat!("`", stringify!($name), "`: not supported.")]
            ///
            /// # Safety
            ///
            /// Reads none of its arguments.
            #[unsafe(no_mangle)]
            pub unsafe extern "C" fn $name($(_: $ty),*) -> CK_RV {
                CKR_FUNCTION_NOT_SUPPORTED
            }
        )*
    };
}

/// The caller's `len` bytes at `ptr`.
///
/// # Safety
///
/// `ptr` points to `len` readable bytes (or `len` is 0).
unsafe fn slice<'a, T>(ptr: *const T, len: CK_ULONG) -> Result<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    let len = usize::try_from(len).map_err(|_| CKR_ARGUMENTS_BAD)?;
    // SAFETY: the caller gives `len` readable elements at a non-null `ptr`.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// Writes `value` to the caller's `out`.
///
/// # Safety
///
/// `out` is null or points to writable memory for a `T`.
unsafe fn put<T>(out: *mut T, value: T) -> Result<()> {
    if out.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-null, and writable for a T by the caller's contract.
    unsafe { out.write_unaligned(value) };
    Ok(())
}

/// Reads the caller's `T` at `ptr`.
///
/// # Safety
///
/// `ptr` is null or points to a readable `T`.
unsafe fn get<T>(ptr: *const T) -> Result<T> {
    if ptr.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-null and readable by the caller's contract.
    Ok(unsafe { ptr.read_unaligned() })
}

/// PKCS#11's fixed-width text: `text` padded with spaces (cut at a char
/// boundary if longer).
fn padded<const N: usize>(text: &str) -> [u8; N] {
    let mut out = [b' '; N];
    let mut end = text.len().min(N);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out[..end].copy_from_slice(&text.as_bytes()[..end]);
    out
}

/// The two-call convention for output arrays: with `out` null, tells the
/// length; else copies if `*count` is enough, else `CKR_BUFFER_TOO_SMALL`.
///
/// # Safety
///
/// `count` points to a CK_ULONG; `out`, if not null, to `*count` writable
/// elements.
unsafe fn put_array<T: Copy>(items: &[T], out: *mut T, count: *mut CK_ULONG) -> Result<()> {
    // SAFETY: forwarded contract.
    let capacity = unsafe { get(count) }?;
    // SAFETY: forwarded contract.
    unsafe { put(count, items.len() as CK_ULONG) }?;
    if out.is_null() {
        return Ok(());
    }
    if (capacity as usize) < items.len() {
        return Err(CKR_BUFFER_TOO_SMALL);
    }
    // SAFETY: `out` holds `capacity >= items.len()` writable elements.
    unsafe { std::ptr::copy_nonoverlapping(items.as_ptr(), out, items.len()) };
    Ok(())
}

fn version(major: u8, minor: u8) -> CK_VERSION {
    CK_VERSION { major, minor }
}

/// Reads a `CK_MECHANISM` and the parameters the module understands.
///
/// # Safety
///
/// `ptr` is null or points to a `CK_MECHANISM` whose parameter pointer
/// holds `ulParameterLen` bytes.
unsafe fn mechanism(ptr: *const CK_MECHANISM) -> Result<Mechanism> {
    // SAFETY: forwarded contract.
    let raw = unsafe { get(ptr) }?;
    let mut mechanism = Mechanism {
        kind: raw.mechanism,
        pss: None,
        eddsa_variant: false,
        bad_params: false,
    };
    let len = raw.ulParameterLen as usize;
    let present = !raw.pParameter.is_null() && len > 0;
    match raw.mechanism {
        CKM_RSA_PKCS_PSS
        | CKM_SHA256_RSA_PKCS_PSS
        | CKM_SHA384_RSA_PKCS_PSS
        | CKM_SHA512_RSA_PKCS_PSS => {
            if present && len == std::mem::size_of::<CK_RSA_PKCS_PSS_PARAMS>() {
                // SAFETY: the parameter holds a CK_RSA_PKCS_PSS_PARAMS (its length says so).
                let p = unsafe { get(raw.pParameter as *const CK_RSA_PKCS_PSS_PARAMS) }?;
                mechanism.pss = Some((p.hashAlg, p.mgf, p.sLen));
            } else {
                mechanism.bad_params = true;
            }
        }
        CKM_EDDSA if present => {
            if len == std::mem::size_of::<CK_EDDSA_PARAMS>() {
                // SAFETY: the parameter holds a CK_EDDSA_PARAMS (its length says so).
                let p = unsafe { get(raw.pParameter as *const CK_EDDSA_PARAMS) }?;
                mechanism.eddsa_variant = p.phFlag != 0 || p.ulContextDataLen != 0;
            } else {
                mechanism.bad_params = true;
            }
        }
        _ => {}
    }
    Ok(mechanism)
}

static FUNCTION_LIST: CK_FUNCTION_LIST = CK_FUNCTION_LIST {
    version: CK_VERSION {
        major: 2,
        minor: 40,
    },
    C_Initialize: Some(C_Initialize),
    C_Finalize: Some(C_Finalize),
    C_GetInfo: Some(C_GetInfo),
    C_GetFunctionList: Some(C_GetFunctionList),
    C_GetSlotList: Some(C_GetSlotList),
    C_GetSlotInfo: Some(C_GetSlotInfo),
    C_GetTokenInfo: Some(C_GetTokenInfo),
    C_GetMechanismList: Some(C_GetMechanismList),
    C_GetMechanismInfo: Some(C_GetMechanismInfo),
    C_InitToken: Some(C_InitToken),
    C_InitPIN: Some(C_InitPIN),
    C_SetPIN: Some(C_SetPIN),
    C_OpenSession: Some(C_OpenSession),
    C_CloseSession: Some(C_CloseSession),
    C_CloseAllSessions: Some(C_CloseAllSessions),
    C_GetSessionInfo: Some(C_GetSessionInfo),
    C_GetOperationState: Some(C_GetOperationState),
    C_SetOperationState: Some(C_SetOperationState),
    C_Login: Some(C_Login),
    C_Logout: Some(C_Logout),
    C_CreateObject: Some(C_CreateObject),
    C_CopyObject: Some(C_CopyObject),
    C_DestroyObject: Some(C_DestroyObject),
    C_GetObjectSize: Some(C_GetObjectSize),
    C_GetAttributeValue: Some(C_GetAttributeValue),
    C_SetAttributeValue: Some(C_SetAttributeValue),
    C_FindObjectsInit: Some(C_FindObjectsInit),
    C_FindObjects: Some(C_FindObjects),
    C_FindObjectsFinal: Some(C_FindObjectsFinal),
    C_EncryptInit: Some(C_EncryptInit),
    C_Encrypt: Some(C_Encrypt),
    C_EncryptUpdate: Some(C_EncryptUpdate),
    C_EncryptFinal: Some(C_EncryptFinal),
    C_DecryptInit: Some(C_DecryptInit),
    C_Decrypt: Some(C_Decrypt),
    C_DecryptUpdate: Some(C_DecryptUpdate),
    C_DecryptFinal: Some(C_DecryptFinal),
    C_DigestInit: Some(C_DigestInit),
    C_Digest: Some(C_Digest),
    C_DigestUpdate: Some(C_DigestUpdate),
    C_DigestKey: Some(C_DigestKey),
    C_DigestFinal: Some(C_DigestFinal),
    C_SignInit: Some(C_SignInit),
    C_Sign: Some(C_Sign),
    C_SignUpdate: Some(C_SignUpdate),
    C_SignFinal: Some(C_SignFinal),
    C_SignRecoverInit: Some(C_SignRecoverInit),
    C_SignRecover: Some(C_SignRecover),
    C_VerifyInit: Some(C_VerifyInit),
    C_Verify: Some(C_Verify),
    C_VerifyUpdate: Some(C_VerifyUpdate),
    C_VerifyFinal: Some(C_VerifyFinal),
    C_VerifyRecoverInit: Some(C_VerifyRecoverInit),
    C_VerifyRecover: Some(C_VerifyRecover),
    C_DigestEncryptUpdate: Some(C_DigestEncryptUpdate),
    C_DecryptDigestUpdate: Some(C_DecryptDigestUpdate),
    C_SignEncryptUpdate: Some(C_SignEncryptUpdate),
    C_DecryptVerifyUpdate: Some(C_DecryptVerifyUpdate),
    C_GenerateKey: Some(C_GenerateKey),
    C_GenerateKeyPair: Some(C_GenerateKeyPair),
    C_WrapKey: Some(C_WrapKey),
    C_UnwrapKey: Some(C_UnwrapKey),
    C_DeriveKey: Some(C_DeriveKey),
    C_SeedRandom: Some(C_SeedRandom),
    C_GenerateRandom: Some(C_GenerateRandom),
    C_GetFunctionStatus: Some(C_GetFunctionStatus),
    C_CancelFunction: Some(C_CancelFunction),
    C_WaitForSlotEvent: Some(C_WaitForSlotEvent),
};

fn with_module<T>(body: impl FnOnce(&Module) -> Result<T>) -> Result<T> {
    let module = module::module()?;
    body(&module)
}

entry_points! {
    fn C_GetFunctionList(list: *mut *mut CK_FUNCTION_LIST) {
        // SAFETY: `list` points to a writable pointer; the list is a static
        // that callers only read.
        unsafe { put(list, &FUNCTION_LIST as *const CK_FUNCTION_LIST as *mut CK_FUNCTION_LIST) }
    }

    fn C_Initialize(args: *mut std::os::raw::c_void) {
        if !args.is_null() {
            // SAFETY: a non-null argument is a CK_C_INITIALIZE_ARGS.
            let args = unsafe { get(args as *const CK_C_INITIALIZE_ARGS) }?;
            if !args.pReserved.is_null() {
                return Err(CKR_ARGUMENTS_BAD);
            }
            let callbacks = [
                args.CreateMutex.is_some(),
                args.DestroyMutex.is_some(),
                args.LockMutex.is_some(),
                args.UnlockMutex.is_some(),
            ];
            if callbacks.iter().any(|c| *c) && !callbacks.iter().all(|c| *c) {
                return Err(CKR_ARGUMENTS_BAD);
            }
            // The module locks with the OS's primitives (Rust's); it cannot
            // use only the application's.
            if callbacks[0] && args.flags & CKF_OS_LOCKING_OK == 0 {
                return Err(CKR_CANT_LOCK);
            }
        }
        module::initialize()
    }

    fn C_Finalize(reserved: *mut std::os::raw::c_void) {
        if !reserved.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        module::finalize()
    }

    fn C_GetInfo(info: *mut CK_INFO) {
        module::module()?;
        let value = CK_INFO {
            cryptokiVersion: version(2, 40),
            manufacturerID: padded("custody"),
            flags: 0,
            libraryDescription: padded("custody PKCS#11 module"),
            libraryVersion: version(0, 1),
        };
        // SAFETY: `info` points to a writable CK_INFO.
        unsafe { put(info, value) }
    }

    fn C_GetSlotList(_token_present: CK_BBOOL, list: *mut CK_SLOT_ID, count: *mut CK_ULONG) {
        with_module(|m| {
            // SAFETY: `count` and `list` follow the two-call convention.
            unsafe { put_array(&m.slot_ids(), list, count) }
        })
    }

    fn C_GetSlotInfo(slot: CK_SLOT_ID, info: *mut CK_SLOT_INFO) {
        with_module(|m| {
            let slot = m.slot(slot)?;
            let value = CK_SLOT_INFO {
                slotDescription: padded(&format!("custody at {}", slot.config.address)),
                manufacturerID: padded("custody"),
                flags: CKF_TOKEN_PRESENT,
                hardwareVersion: version(0, 1),
                firmwareVersion: version(0, 1),
            };
            // SAFETY: `info` points to a writable CK_SLOT_INFO.
            unsafe { put(info, value) }
        })
    }

    fn C_GetTokenInfo(slot_id: CK_SLOT_ID, info: *mut CK_TOKEN_INFO) {
        with_module(|m| {
            let slot = m.slot(slot_id)?;
            let value = CK_TOKEN_INFO {
                label: padded(&slot.config.label),
                manufacturerID: padded("custody"),
                model: padded("custodyd"),
                serialNumber: padded(&format!("custody-{slot_id}")),
                // No CKF_LOGIN_REQUIRED: the client certificate is the login.
                flags: CKF_TOKEN_INITIALIZED | CKF_USER_PIN_INITIALIZED,
                ulMaxSessionCount: CK_EFFECTIVELY_INFINITE,
                ulSessionCount: m.session_count(slot_id) as CK_ULONG,
                ulMaxRwSessionCount: CK_EFFECTIVELY_INFINITE,
                ulRwSessionCount: CK_UNAVAILABLE_INFORMATION,
                ulMaxPinLen: 255,
                ulMinPinLen: 0,
                ulTotalPublicMemory: CK_UNAVAILABLE_INFORMATION,
                ulFreePublicMemory: CK_UNAVAILABLE_INFORMATION,
                ulTotalPrivateMemory: CK_UNAVAILABLE_INFORMATION,
                ulFreePrivateMemory: CK_UNAVAILABLE_INFORMATION,
                hardwareVersion: version(0, 1),
                firmwareVersion: version(0, 1),
                utcTime: [b' '; 16],
            };
            // SAFETY: `info` points to a writable CK_TOKEN_INFO.
            unsafe { put(info, value) }
        })
    }

    fn C_GetMechanismList(slot: CK_SLOT_ID, list: *mut CK_MECHANISM_TYPE, count: *mut CK_ULONG) {
        with_module(|m| {
            m.slot(slot)?;
            // SAFETY: `count` and `list` follow the two-call convention.
            unsafe { put_array(&mechanisms::ALL, list, count) }
        })
    }

    fn C_GetMechanismInfo(slot: CK_SLOT_ID, kind: CK_MECHANISM_TYPE, info: *mut CK_MECHANISM_INFO) {
        with_module(|m| {
            m.slot(slot)?;
            let (min, max, extra) = match kind {
                CKM_ECDSA | CKM_ECDSA_SHA256 | CKM_ECDSA_SHA384 => {
                    (256, 384, CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS)
                }
                CKM_EDDSA => (255, 255, CKF_EC_NAMEDCURVE),
                k if mechanisms::ALL.contains(&k) => (2048, 4096, 0),
                _ => return Err(CKR_MECHANISM_INVALID),
            };
            let value = CK_MECHANISM_INFO {
                ulMinKeySize: min,
                ulMaxKeySize: max,
                flags: CKF_HW | CKF_SIGN | CKF_VERIFY | extra,
            };
            // SAFETY: `info` points to a writable CK_MECHANISM_INFO.
            unsafe { put(info, value) }
        })
    }

    fn C_OpenSession(
        slot: CK_SLOT_ID,
        flags: CK_FLAGS,
        _application: *mut std::os::raw::c_void,
        _notify: CK_NOTIFY,
        session: *mut CK_SESSION_HANDLE,
    ) {
        with_module(|m| {
            if session.is_null() {
                return Err(CKR_ARGUMENTS_BAD);
            }
            let handle = m.open_session(slot, flags)?;
            // SAFETY: `session` points to a writable handle.
            unsafe { put(session, handle) }
        })
    }

    fn C_CloseSession(session: CK_SESSION_HANDLE) {
        with_module(|m| m.close_session(session))
    }

    fn C_CloseAllSessions(slot: CK_SLOT_ID) {
        with_module(|m| m.close_all_sessions(slot))
    }

    fn C_GetSessionInfo(session: CK_SESSION_HANDLE, info: *mut CK_SESSION_INFO) {
        with_module(|m| {
            let (slot, state, flags) = m.session_info(session)?;
            let value = CK_SESSION_INFO { slotID: slot, state, flags, ulDeviceError: 0 };
            // SAFETY: `info` points to a writable CK_SESSION_INFO.
            unsafe { put(info, value) }
        })
    }

    fn C_Login(session: CK_SESSION_HANDLE, user: CK_USER_TYPE, _pin: *mut CK_UTF8CHAR, _pin_len: CK_ULONG) {
        // The PIN is never read: the client certificate is the identity.
        with_module(|m| m.login(session, user))
    }

    fn C_Logout(session: CK_SESSION_HANDLE) {
        with_module(|m| m.logout(session))
    }

    fn C_GetAttributeValue(
        session: CK_SESSION_HANDLE,
        object: CK_OBJECT_HANDLE,
        template: *mut CK_ATTRIBUTE,
        count: CK_ULONG,
    ) {
        with_module(|m| {
            // SAFETY: `template` holds `count` attributes.
            let attributes = unsafe { slice(template as *const CK_ATTRIBUTE, count) }?;
            let types: Vec<CK_ATTRIBUTE_TYPE> = attributes.iter().map(|a| a.type_).collect();
            let answers = m.attributes(session, object, &types)?;
            let mut rv = CKR_OK;
            for (i, (attribute, answer)) in attributes.iter().zip(answers).enumerate() {
                // SAFETY: element i of the caller's template, writable.
                let len_out = unsafe { &raw mut (*template.add(i)).ulValueLen };
                let value = match answer {
                    Answer::Value(value) => value,
                    Answer::Sensitive => {
                        // SAFETY: as above.
                        unsafe { len_out.write_unaligned(CK_UNAVAILABLE_INFORMATION) };
                        rv = CKR_ATTRIBUTE_SENSITIVE;
                        continue;
                    }
                    Answer::Invalid => {
                        // SAFETY: as above.
                        unsafe { len_out.write_unaligned(CK_UNAVAILABLE_INFORMATION) };
                        rv = CKR_ATTRIBUTE_TYPE_INVALID;
                        continue;
                    }
                };
                if attribute.pValue.is_null() {
                    // SAFETY: as above.
                    unsafe { len_out.write_unaligned(value.len() as CK_ULONG) };
                } else if (attribute.ulValueLen as usize) < value.len() {
                    // SAFETY: as above.
                    unsafe { len_out.write_unaligned(CK_UNAVAILABLE_INFORMATION) };
                    rv = CKR_BUFFER_TOO_SMALL;
                } else {
                    // SAFETY: pValue holds ulValueLen >= value.len() writable bytes.
                    unsafe {
                        std::ptr::copy_nonoverlapping(value.as_ptr(), attribute.pValue as *mut u8, value.len());
                        len_out.write_unaligned(value.len() as CK_ULONG);
                    }
                }
            }
            if rv == CKR_OK { Ok(()) } else { Err(rv) }
        })
    }

    fn C_FindObjectsInit(session: CK_SESSION_HANDLE, template: *mut CK_ATTRIBUTE, count: CK_ULONG) {
        with_module(|m| {
            // SAFETY: `template` holds `count` attributes.
            let attributes = unsafe { slice(template as *const CK_ATTRIBUTE, count) }?;
            let mut wanted = Vec::new();
            for a in attributes {
                // SAFETY: each attribute's value holds ulValueLen bytes.
                let value = unsafe { slice(a.pValue as *const u8, a.ulValueLen) }?;
                wanted.push((a.type_, value.to_vec()));
            }
            m.find_init(session, &wanted)
        })
    }

    fn C_FindObjects(
        session: CK_SESSION_HANDLE,
        objects: *mut CK_OBJECT_HANDLE,
        max: CK_ULONG,
        count: *mut CK_ULONG,
    ) {
        with_module(|m| {
            if count.is_null() || (objects.is_null() && max > 0) {
                return Err(CKR_ARGUMENTS_BAD);
            }
            let found = m.find(session, max as usize)?;
            if !found.is_empty() {
                // SAFETY: `objects` holds `max >= found.len()` writable handles.
                unsafe { std::ptr::copy_nonoverlapping(found.as_ptr(), objects, found.len()) };
            }
            // SAFETY: `count` points to a writable CK_ULONG.
            unsafe { put(count, found.len() as CK_ULONG) }
        })
    }

    fn C_FindObjectsFinal(session: CK_SESSION_HANDLE) {
        with_module(|m| m.find_final(session))
    }

    fn C_SignInit(session: CK_SESSION_HANDLE, mechanism_ptr: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE) {
        with_module(|m| {
            // SAFETY: `mechanism_ptr` points to a CK_MECHANISM.
            let mechanism = unsafe { mechanism(mechanism_ptr) }?;
            m.operation_init(session, mechanism, key, true)
        })
    }

    fn C_Sign(
        session: CK_SESSION_HANDLE,
        data: *mut CK_BYTE,
        data_len: CK_ULONG,
        signature: *mut CK_BYTE,
        signature_len: *mut CK_ULONG,
    ) {
        with_module(|m| {
            // SAFETY: `data` holds `data_len` bytes.
            let data = unsafe { slice(data as *const u8, data_len) }?;
            // SAFETY: `signature` and `signature_len` follow the two-call convention.
            unsafe { sign_out(m, session, Some(data), signature, signature_len) }
        })
    }

    fn C_SignUpdate(session: CK_SESSION_HANDLE, part: *mut CK_BYTE, part_len: CK_ULONG) {
        with_module(|m| {
            // SAFETY: `part` holds `part_len` bytes.
            let part = unsafe { slice(part as *const u8, part_len) }?;
            m.update(session, part, true)
        })
    }

    fn C_SignFinal(session: CK_SESSION_HANDLE, signature: *mut CK_BYTE, signature_len: *mut CK_ULONG) {
        with_module(|m| {
            // SAFETY: `signature` and `signature_len` follow the two-call convention.
            unsafe { sign_out(m, session, None, signature, signature_len) }
        })
    }

    fn C_VerifyInit(session: CK_SESSION_HANDLE, mechanism_ptr: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE) {
        with_module(|m| {
            // SAFETY: `mechanism_ptr` points to a CK_MECHANISM.
            let mechanism = unsafe { mechanism(mechanism_ptr) }?;
            m.operation_init(session, mechanism, key, false)
        })
    }

    fn C_Verify(
        session: CK_SESSION_HANDLE,
        data: *mut CK_BYTE,
        data_len: CK_ULONG,
        signature: *mut CK_BYTE,
        signature_len: CK_ULONG,
    ) {
        with_module(|m| {
            // SAFETY: both pointers hold their lengths' bytes.
            let (data, signature) = unsafe {
                (slice(data as *const u8, data_len)?, slice(signature as *const u8, signature_len)?)
            };
            m.verify(session, Some(data), signature)
        })
    }

    fn C_VerifyUpdate(session: CK_SESSION_HANDLE, part: *mut CK_BYTE, part_len: CK_ULONG) {
        with_module(|m| {
            // SAFETY: `part` holds `part_len` bytes.
            let part = unsafe { slice(part as *const u8, part_len) }?;
            m.update(session, part, false)
        })
    }

    fn C_VerifyFinal(session: CK_SESSION_HANDLE, signature: *mut CK_BYTE, signature_len: CK_ULONG) {
        with_module(|m| {
            // SAFETY: `signature` holds `signature_len` bytes.
            let signature = unsafe { slice(signature as *const u8, signature_len) }?;
            m.verify(session, None, signature)
        })
    }

    fn C_GetObjectSize(session: CK_SESSION_HANDLE, object: CK_OBJECT_HANDLE, _size: *mut CK_ULONG) {
        with_module(|m| {
            m.check_object(session, object)?;
            Err(CKR_FUNCTION_NOT_SUPPORTED)
        })
    }
}

/// The end of `C_Sign`/`C_SignFinal`: a length query, a buffer too small
/// (both keep the operation), or the signature.
///
/// # Safety
///
/// `signature_len` points to a CK_ULONG; `signature`, if not null, to
/// `*signature_len` writable bytes.
unsafe fn sign_out(
    m: &Module,
    session: CK_SESSION_HANDLE,
    last: Option<&[u8]>,
    signature: *mut CK_BYTE,
    signature_len: *mut CK_ULONG,
) -> Result<()> {
    // SAFETY: forwarded contract.
    let capacity = unsafe { get(signature_len) }?;
    let needed = m.signature_len(session)?;
    if signature.is_null() {
        // SAFETY: forwarded contract.
        return unsafe { put(signature_len, needed as CK_ULONG) };
    }
    if (capacity as usize) < needed {
        // SAFETY: forwarded contract.
        unsafe { put(signature_len, needed as CK_ULONG) }?;
        return Err(CKR_BUFFER_TOO_SMALL);
    }
    let made = m.sign(session, last)?;
    // SAFETY: `signature` holds capacity >= needed == made.len() bytes
    // (Module::sign checks the length).
    unsafe {
        std::ptr::copy_nonoverlapping(made.as_ptr(), signature, made.len());
        put(signature_len, made.len() as CK_ULONG)
    }
}

not_supported! {
    C_InitToken(CK_SLOT_ID, *mut CK_UTF8CHAR, CK_ULONG, *mut CK_UTF8CHAR);
    C_InitPIN(CK_SESSION_HANDLE, *mut CK_UTF8CHAR, CK_ULONG);
    C_SetPIN(CK_SESSION_HANDLE, *mut CK_UTF8CHAR, CK_ULONG, *mut CK_UTF8CHAR, CK_ULONG);
    C_GetOperationState(CK_SESSION_HANDLE, *mut CK_BYTE, *mut CK_ULONG);
    C_SetOperationState(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, CK_OBJECT_HANDLE, CK_OBJECT_HANDLE);
    C_CreateObject(CK_SESSION_HANDLE, *mut CK_ATTRIBUTE, CK_ULONG, *mut CK_OBJECT_HANDLE);
    C_CopyObject(CK_SESSION_HANDLE, CK_OBJECT_HANDLE, *mut CK_ATTRIBUTE, CK_ULONG, *mut CK_OBJECT_HANDLE);
    C_DestroyObject(CK_SESSION_HANDLE, CK_OBJECT_HANDLE);
    C_SetAttributeValue(CK_SESSION_HANDLE, CK_OBJECT_HANDLE, *mut CK_ATTRIBUTE, CK_ULONG);
    C_EncryptInit(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE);
    C_Encrypt(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_EncryptUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_EncryptFinal(CK_SESSION_HANDLE, *mut CK_BYTE, *mut CK_ULONG);
    C_DecryptInit(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE);
    C_Decrypt(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_DecryptUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_DecryptFinal(CK_SESSION_HANDLE, *mut CK_BYTE, *mut CK_ULONG);
    C_DigestInit(CK_SESSION_HANDLE, *mut CK_MECHANISM);
    C_Digest(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_DigestUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG);
    C_DigestKey(CK_SESSION_HANDLE, CK_OBJECT_HANDLE);
    C_DigestFinal(CK_SESSION_HANDLE, *mut CK_BYTE, *mut CK_ULONG);
    C_SignRecoverInit(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE);
    C_SignRecover(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_VerifyRecoverInit(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE);
    C_VerifyRecover(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_DigestEncryptUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_DecryptDigestUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_SignEncryptUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_DecryptVerifyUpdate(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG, *mut CK_BYTE, *mut CK_ULONG);
    C_GenerateKey(CK_SESSION_HANDLE, *mut CK_MECHANISM, *mut CK_ATTRIBUTE, CK_ULONG, *mut CK_OBJECT_HANDLE);
    C_GenerateKeyPair(
        CK_SESSION_HANDLE, *mut CK_MECHANISM, *mut CK_ATTRIBUTE, CK_ULONG, *mut CK_ATTRIBUTE,
        CK_ULONG, *mut CK_OBJECT_HANDLE, *mut CK_OBJECT_HANDLE,
    );
    C_WrapKey(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE, CK_OBJECT_HANDLE, *mut CK_BYTE, *mut CK_ULONG);
    C_UnwrapKey(
        CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE, *mut CK_BYTE, CK_ULONG,
        *mut CK_ATTRIBUTE, CK_ULONG, *mut CK_OBJECT_HANDLE,
    );
    C_DeriveKey(CK_SESSION_HANDLE, *mut CK_MECHANISM, CK_OBJECT_HANDLE, *mut CK_ATTRIBUTE, CK_ULONG, *mut CK_OBJECT_HANDLE);
    C_SeedRandom(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG);
    C_GenerateRandom(CK_SESSION_HANDLE, *mut CK_BYTE, CK_ULONG);
    C_GetFunctionStatus(CK_SESSION_HANDLE);
    C_CancelFunction(CK_SESSION_HANDLE);
    C_WaitForSlotEvent(CK_FLAGS, *mut CK_SLOT_ID, *mut std::os::raw::c_void);
}

#[cfg(test)]
mod tests {
    use std::os::raw::c_void;

    use super::*;

    unsafe extern "C" fn create(_: *mut *mut c_void) -> CK_RV {
        CKR_OK
    }
    unsafe extern "C" fn other(_: *mut c_void) -> CK_RV {
        CKR_OK
    }

    #[test]
    fn a_panic_never_crosses_into_c() {
        assert_eq!(guard(|| panic!("a bug")), CKR_GENERAL_ERROR);
        assert_eq!(guard(|| Err(CKR_DATA_INVALID)), CKR_DATA_INVALID);
    }

    #[test]
    fn bad_pointers_are_refused_before_any_read() {
        // SAFETY: every pointer given is null or valid.
        unsafe {
            assert_eq!(C_GetFunctionList(std::ptr::null_mut()), CKR_ARGUMENTS_BAD);
            let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
            assert_eq!(C_GetFunctionList(&mut list), CKR_OK);
            assert!((*list).C_Sign.is_some() && (*list).C_WaitForSlotEvent.is_some());
            assert_eq!(
                slice(std::ptr::null::<u8>(), 5).err(),
                Some(CKR_ARGUMENTS_BAD)
            );
            assert_eq!(slice(std::ptr::null::<u8>(), 0).map(<[u8]>::len), Ok(0));
            assert_eq!(
                put(std::ptr::null_mut::<CK_ULONG>(), 1).err(),
                Some(CKR_ARGUMENTS_BAD)
            );
            assert_eq!(
                get(std::ptr::null::<CK_MECHANISM>()).err(),
                Some(CKR_ARGUMENTS_BAD)
            );
        }
    }

    #[test]
    fn initialisation_needs_os_locking_when_callbacks_are_given() {
        let mut args = CK_C_INITIALIZE_ARGS {
            CreateMutex: Some(create),
            DestroyMutex: Some(other),
            LockMutex: Some(other),
            UnlockMutex: Some(other),
            flags: 0,
            pReserved: std::ptr::null_mut(),
        };
        // SAFETY: `args` is a valid CK_C_INITIALIZE_ARGS.
        unsafe {
            assert_eq!(C_Initialize(&raw mut args as *mut c_void), CKR_CANT_LOCK);
            args.LockMutex = None;
            assert_eq!(
                C_Initialize(&raw mut args as *mut c_void),
                CKR_ARGUMENTS_BAD
            );
            args.LockMutex = Some(other);
            args.flags = CKF_OS_LOCKING_OK;
            let mut reserved = 0u8;
            args.pReserved = &raw mut reserved as *mut c_void;
            assert_eq!(
                C_Initialize(&raw mut args as *mut c_void),
                CKR_ARGUMENTS_BAD
            );
        }
    }

    #[test]
    fn text_is_padded_and_cut_at_a_character() {
        assert_eq!(&padded::<8>("ab"), b"ab      ");
        assert_eq!(&padded::<4>("abcé"), b"abc ");
    }
}
