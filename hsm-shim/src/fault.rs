//! Fault injection at the PKCS#11 boundary, for the failures SoftHSM2 cannot
//! produce on demand (`CKR_DEVICE_ERROR`, `CKR_TOKEN_NOT_PRESENT`, a session
//! handle that went stale).
//!
//! Every PKCS#11 call of this crate passes through [`Faults::check`] first.
//! Without the `fault-injection` feature that is an empty inline function; with
//! it, a test arms "fail the next `n` calls of function F with CKR code X" and
//! the call fails before reaching the module, exactly as if the module had
//! answered so.

use cryptoki::context::Function;
use cryptoki::error::Error as CryptokiError;

#[cfg(feature = "fault-injection")]
pub use enabled::FaultInjector;

/// The per-process fault plan consulted before each PKCS#11 call.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    #[cfg(feature = "fault-injection")]
    pub(crate) injector: enabled::FaultInjector,
}

impl Faults {
    /// Fails with the armed fault for `function`, if any.
    #[inline(always)]
    pub(crate) fn check(&self, function: Function) -> Result<(), CryptokiError> {
        #[cfg(feature = "fault-injection")]
        if let Some(rv) = self.injector.take(function) {
            return Err(CryptokiError::Pkcs11(rv, function));
        }
        let _ = function;
        Ok(())
    }
}

/// Whether this build can inject faults. A daemon refuses to start when true.
pub const FAULT_INJECTION_COMPILED_IN: bool = cfg!(feature = "fault-injection");

#[cfg(feature = "fault-injection")]
mod enabled {
    use std::sync::Mutex;

    use cryptoki::error::RvError;

    use super::Function;

    /// Arms failures of chosen PKCS#11 functions. Shared by every session of one
    /// [`crate::Hsm`].
    #[derive(Debug, Default)]
    pub struct FaultInjector {
        armed: Mutex<Vec<Armed>>,
        fired: Mutex<Vec<(Function, RvError)>>,
    }

    #[derive(Debug)]
    struct Armed {
        function: Function,
        rv: RvError,
        remaining: u32,
    }

    impl FaultInjector {
        /// The next `times` calls of `function` fail with `rv`.
        pub fn fail_next(&self, function: Function, rv: RvError, times: u32) {
            lock(&self.armed).push(Armed {
                function,
                rv,
                remaining: times,
            });
        }

        /// Disarms everything.
        pub fn clear(&self) {
            lock(&self.armed).clear();
        }

        /// The faults that fired so far, in order.
        pub fn fired(&self) -> Vec<(Function, RvError)> {
            lock(&self.fired).clone()
        }

        pub(crate) fn take(&self, function: Function) -> Option<RvError> {
            let mut armed = lock(&self.armed);
            let position = armed
                .iter()
                .position(|a| same_function(a.function, function) && a.remaining > 0)?;
            let entry = &mut armed[position];
            entry.remaining -= 1;
            let rv = entry.rv;
            if entry.remaining == 0 {
                armed.remove(position);
            }
            drop(armed);
            lock(&self.fired).push((function, rv));
            Some(rv)
        }
    }

    // `Function` has no `PartialEq`; its variants carry no data.
    fn same_function(a: Function, b: Function) -> bool {
        std::mem::discriminant(&a) == std::mem::discriminant(&b)
    }

    fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        // A panicking test thread must not hide the plan from the others.
        mutex
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
