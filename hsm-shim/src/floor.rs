//! The floor every benchmark figure is measured against: plain `cryptoki`
//! signing, with none of hsm-shim (no pool, no watchdog, no handle cache, no
//! recovery rules, no object-store lock). Only with the `bench-floor`
//! feature, which only benchmarks enable.
//!
//! It initialises the module itself, so run it in a process of its own: a
//! process that opened the module through [`crate::Hsm`] shares one PKCS#11
//! application with it (one login, one lock), which is not the floor.

use std::path::Path;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use secrecy::{ExposeSecret, SecretString};

/// Signs a 32-byte digest with `CKM_ECDSA` and the EC private key labelled
/// `key_label` on the token labelled `token_label`, in `threads` threads
/// with one session each, for `duration`; returns the signatures made.
pub fn ecdsa_sign_count(
    module: &Path,
    token_label: &str,
    pin: &SecretString,
    key_label: &str,
    threads: usize,
    duration: Duration,
) -> Result<u64, String> {
    let ctx = Pkcs11::new(module).map_err(|e| format!("loading {}: {e}", module.display()))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CryptokiError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(format!("C_Initialize: {e}")),
    }
    let slot = ctx
        .get_slots_with_initialized_token()
        .map_err(|e| format!("C_GetSlotList: {e}"))?
        .into_iter()
        .find(|slot| {
            ctx.get_token_info(*slot)
                .is_ok_and(|info| info.label().trim_end() == token_label)
        })
        .ok_or_else(|| format!("no token labelled {token_label:?}"))?;
    // Login is per application: this session's login serves every thread's.
    let login = ctx
        .open_ro_session(slot)
        .map_err(|e| format!("C_OpenSession: {e}"))?;
    match login.login(
        UserType::User,
        Some(&AuthPin::new(pin.expose_secret().into())),
    ) {
        Ok(()) | Err(CryptokiError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => return Err(format!("C_Login: {e}")),
    }
    let deadline = Instant::now() + duration;
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> Result<u64, String> {
                    let session = ctx
                        .open_ro_session(slot)
                        .map_err(|e| format!("C_OpenSession: {e}"))?;
                    let key = session
                        .find_objects(&[
                            Attribute::Class(ObjectClass::PRIVATE_KEY),
                            Attribute::Label(key_label.as_bytes().to_vec()),
                        ])
                        .map_err(|e| format!("C_FindObjects: {e}"))?
                        .into_iter()
                        .next()
                        .ok_or_else(|| format!("no private key labelled {key_label:?}"))?;
                    let digest = [0x5a; 32];
                    let mut count = 0u64;
                    while Instant::now() < deadline {
                        session
                            .sign(&Mechanism::Ecdsa, key, &digest)
                            .map_err(|e| format!("C_Sign: {e}"))?;
                        count += 1;
                    }
                    Ok(count)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| {
                worker
                    .join()
                    .map_err(|_| "a signing thread panicked".to_string())?
            })
            .sum()
    })
}
