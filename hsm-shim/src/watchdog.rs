//! Deadlines on PKCS#11 calls: what happens when the HSM stops answering.
//!
//! A PKCS#11 call cannot be cancelled, and the thread making it cannot be
//! killed. So each pool worker publishes, in its [`CallWatch`], when its
//! current call started; the pool's watchdog thread looks at every worker a
//! few times per deadline, and a call older than the deadline (`HsmConfig::
//! call_timeout`) makes its worker *lost*:
//!
//! - the job's caller is answered at once with [`ErrorKind::Timeout`] (the
//!   call's result, if it ever comes, is dropped);
//! - the worker leaves the pool's gate, so a pause does not wait for it;
//! - a fresh worker takes its place in the pool; it opens its own session on
//!   its first job, under a deadline too, so a hung `C_OpenSession` costs one
//!   more worker, never the watchdog;
//! - the lost thread is abandoned: when its call finally returns, it makes no
//!   further call (every later call of its job fails at once with `Timeout`),
//!   closes its session and exits.
//!
//! Abandoned threads are counted; while [`MAX_ABANDONED_PER_WORKER`] per
//! worker are still stuck, workers fail jobs at once with `Timeout` instead
//! of feeding more calls to an HSM that does not answer (so threads do not
//! pile up without bound); they call the HSM again as soon as the stuck calls
//! return.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cryptoki::context::Function;

use crate::error::{ErrorKind, HsmError, Result};

/// Answers a job's caller with an error, once (see [`CallWatch::overdue`]).
pub(crate) type Fail = Box<dyn FnOnce(HsmError) + Send>;

/// Abandoned (stuck) worker threads per configured worker at which the pool
/// stops calling the HSM and fails jobs at once.
pub const MAX_ABANDONED_PER_WORKER: usize = 4;

/// Longest deadline `HsmConfig::call_timeout` accepts: no PKCS#11 call of
/// custody (an RSA-4096 key generation included) comes near it, and beyond
/// it a hung HSM would hold requests longer than any client waits.
pub const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(600);

/// One worker's call in flight and its job's answer, shared between the
/// worker and the watchdog.
#[derive(Default)]
pub(crate) struct CallWatch {
    state: Mutex<WatchState>,
}

#[derive(Default)]
struct WatchState {
    call: Option<(Instant, Function)>,
    fail: Option<Fail>,
    lost: bool,
}

impl CallWatch {
    fn lock(&self) -> MutexGuard<'_, WatchState> {
        // Plain fields that no panic leaves half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A job starts: `fail` answers its caller should the worker be lost.
    pub(crate) fn begin_job(&self, fail: Fail) {
        self.lock().fail = Some(fail);
    }

    /// The job ended; true if the worker was lost meanwhile (its caller has
    /// had its answer, and the worker must go).
    pub(crate) fn end_job(&self) -> bool {
        let mut state = self.lock();
        let fail = state.fail.take();
        let lost = state.lost;
        drop(state);
        drop(fail);
        lost
    }

    /// Runs one PKCS#11 call under the deadline. A lost worker makes no
    /// further call.
    pub(crate) fn call<T>(&self, function: Function, op: impl FnOnce() -> Result<T>) -> Result<T> {
        {
            let mut state = self.lock();
            if state.lost {
                return Err(abandoned(function));
            }
            state.call = Some((Instant::now(), function));
        }
        let result = op();
        self.lock().call = None;
        result
    }

    /// For the watchdog: if the call in flight started more than `deadline`
    /// before `now`, marks the worker lost and hands over the job's answer
    /// (once; a lost worker is never overdue again).
    pub(crate) fn overdue(
        &self,
        now: Instant,
        deadline: Duration,
    ) -> Option<(Function, Option<Fail>)> {
        let mut state = self.lock();
        if state.lost {
            return None;
        }
        let (started, function) = state.call?;
        if now.saturating_duration_since(started) <= deadline {
            return None;
        }
        state.lost = true;
        Some((function, state.fail.take()))
    }
}

/// The error a lost worker's later calls get without reaching the HSM.
fn abandoned(function: Function) -> HsmError {
    HsmError::new(
        ErrorKind::Timeout,
        format!(
            "C_{function:?} not called: this worker was abandoned after an HSM call passed its deadline"
        ),
    )
}

/// The answer a caller gets when its job's call passed the deadline.
pub(crate) fn timed_out(function: Function, deadline: Duration) -> HsmError {
    HsmError::new(
        ErrorKind::Timeout,
        format!(
            "C_{function:?} did not return within the {} ms HSM call deadline; \
             its worker was abandoned and replaced",
            deadline.as_millis()
        ),
    )
}

/// Checks a configured deadline.
pub(crate) fn check_call_timeout(timeout: Duration) -> Result<()> {
    if timeout.is_zero() || timeout > MAX_CALL_TIMEOUT {
        return Err(HsmError::new(
            ErrorKind::Configuration,
            format!(
                "the HSM call deadline must be more than 0 and at most {} s, not {} ms",
                MAX_CALL_TIMEOUT.as_secs(),
                timeout.as_millis()
            ),
        ));
    }
    Ok(())
}

/// How often the watchdog looks: a quarter of the deadline, between 5 ms and
/// 1 s, so a hung call is noticed within a quarter deadline (or a second).
pub(crate) fn tick(deadline: Duration) -> Duration {
    (deadline / 4).clamp(Duration::from_millis(5), Duration::from_secs(1))
}
