//! Fault injection at the PKCS#11 boundary, for the failures SoftHSM2 cannot
//! produce on demand (`CKR_DEVICE_ERROR`, `CKR_TOKEN_NOT_PRESENT`, a session
//! handle that went stale, a call that hangs).
//!
//! Every PKCS#11 call of this crate passes through [`Faults::check`] first.
//! Without the `fault-injection` feature that is an empty inline function; with
//! it, a test arms "fail the next `n` calls of function F with CKR code X",
//! "fail the Nth call from now, whatever its function", or "the next `n`
//! calls of F stall for a while (or until released)", and the call fails or
//! stalls before reaching the module, exactly as if the module had answered
//! so (or not answered yet). A stall happens inside the call's deadline
//! window (see `pool.rs`), as a hung module would.

use cryptoki::context::Function;
use cryptoki::error::Error as CryptokiError;

#[cfg(feature = "fault-injection")]
pub use enabled::{FaultInjector, Stall};

/// The per-process fault plan consulted before each PKCS#11 call.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    #[cfg(feature = "fault-injection")]
    pub(crate) injector: enabled::FaultInjector,
}

impl Faults {
    /// Stalls or fails with the armed fault for `function`, if any.
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
    use std::sync::{Condvar, Mutex};
    use std::time::{Duration, Instant};

    use cryptoki::error::RvError;

    use super::Function;

    /// How long an armed stall holds its call.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Stall {
        /// For this long, then the call goes on to the module.
        For(Duration),
        /// Until [`FaultInjector::release`] (or [`FaultInjector::clear`]).
        UntilReleased,
    }

    /// Arms failures and stalls of chosen PKCS#11 calls. Shared by every
    /// session of one [`crate::Hsm`].
    #[derive(Debug, Default)]
    pub struct FaultInjector {
        armed: Mutex<Plan>,
        fired: Mutex<Vec<(Function, RvError)>>,
        /// Wakes stalls waiting for a release.
        released: Condvar,
    }

    #[derive(Debug, Default)]
    struct Plan {
        failures: Vec<Armed>,
        stalls: Vec<ArmedStall>,
        /// Bumped by each release: a stall waiting "until released" ends
        /// when it changes.
        releases: u64,
        stalled: Vec<Function>,
    }

    #[derive(Debug)]
    struct Armed {
        /// `None`: any function.
        function: Option<Function>,
        rv: RvError,
        /// Calls to let through before failing.
        skip: u32,
        remaining: u32,
    }

    #[derive(Debug)]
    struct ArmedStall {
        function: Function,
        stall: Stall,
        remaining: u32,
    }

    impl FaultInjector {
        /// The next `times` calls of `function` fail with `rv`.
        pub fn fail_next(&self, function: Function, rv: RvError, times: u32) {
            self.plan().failures.push(Armed {
                function: Some(function),
                rv,
                skip: 0,
                remaining: times,
            });
        }

        /// The `nth` PKCS#11 call from now (1 = the next), whatever its
        /// function, and the `times - 1` calls after it fail with `rv`
        /// (`u32::MAX`: until [`Self::clear`], a device that stays broken).
        pub fn fail_nth_call(&self, nth: u32, rv: RvError, times: u32) {
            self.plan().failures.push(Armed {
                function: None,
                rv,
                skip: nth.saturating_sub(1),
                remaining: times,
            });
        }

        /// The next `times` calls of `function` stall as `stall` says, inside
        /// their deadline window, and then go on to the module.
        pub fn stall_next(&self, function: Function, stall: Stall, times: u32) {
            self.plan().stalls.push(ArmedStall {
                function,
                stall,
                remaining: times,
            });
        }

        /// Ends every stall waiting "until released" now.
        pub fn release(&self) {
            self.plan().releases += 1;
            self.released.notify_all();
        }

        /// Disarms everything and releases every stall.
        pub fn clear(&self) {
            let mut plan = self.plan();
            plan.failures.clear();
            plan.stalls.clear();
            drop(plan);
            self.release();
        }

        /// The faults that fired so far, in order.
        pub fn fired(&self) -> Vec<(Function, RvError)> {
            lock(&self.fired).clone()
        }

        /// The calls that stalled so far, in order.
        pub fn stalled(&self) -> Vec<Function> {
            self.plan().stalled.clone()
        }

        fn plan(&self) -> std::sync::MutexGuard<'_, Plan> {
            lock(&self.armed)
        }

        pub(crate) fn take(&self, function: Function) -> Option<RvError> {
            self.stall_if_armed(function);
            let mut plan = self.plan();
            // Every "any function" arm counts this call down.
            let mut chosen = None;
            for (index, armed) in plan.failures.iter_mut().enumerate() {
                let matches = armed.function.is_none_or(|f| same_function(f, function));
                if !matches || armed.remaining == 0 {
                    continue;
                }
                if armed.skip > 0 {
                    armed.skip -= 1;
                } else if chosen.is_none() {
                    chosen = Some(index);
                }
            }
            let index = chosen?;
            let entry = &mut plan.failures[index];
            entry.remaining -= 1;
            let rv = entry.rv;
            if entry.remaining == 0 {
                plan.failures.remove(index);
            }
            drop(plan);
            lock(&self.fired).push((function, rv));
            Some(rv)
        }

        fn stall_if_armed(&self, function: Function) {
            let mut plan = self.plan();
            let Some(position) = plan
                .stalls
                .iter()
                .position(|s| same_function(s.function, function) && s.remaining > 0)
            else {
                return;
            };
            let entry = &mut plan.stalls[position];
            entry.remaining -= 1;
            let stall = entry.stall;
            if entry.remaining == 0 {
                plan.stalls.remove(position);
            }
            plan.stalled.push(function);
            let releases = plan.releases;
            let until = match stall {
                Stall::For(duration) => Some(Instant::now() + duration),
                Stall::UntilReleased => None,
            };
            // Sleeps on the condvar, so that `release` or `clear` ends a
            // timed stall early too.
            while plan.releases == releases {
                plan = match until {
                    None => self
                        .released
                        .wait(plan)
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                    Some(until) => {
                        let left = until.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return;
                        }
                        self.released
                            .wait_timeout(plan, left)
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .0
                    }
                };
            }
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
