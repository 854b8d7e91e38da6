//! Bounded work: the caps that keep one caller, or one kind of request, from
//! growing custodyd's state or its queues without bound (threat model R2).
//! The numbers come from the config; each is enforced where the work is
//! taken on:
//!
//! | cap | enforced in | refusal |
//! |---|---|---|
//! | pending operations per requester | `operations::request` | `TOO_MANY_PENDING` |
//! | open ceremonies per officer | `ceremonies::open` | `TOO_MANY_CEREMONIES` |
//! | HSM jobs waiting for a worker | `hsm_shim::Hsm::try_run` | `HSM_BUSY` |
//! | one drift check, one audit verification at a time | [`OneAtATime`] | none: the next waits its turn |
//!
//! Finished operations are kept for `operation_retention_ms` and then
//! pruned (`operations::vote::expire_due`); each refusal that can tell
//! when to try again carries a retry hint.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::Config;

/// The caps custodyd runs with.
#[derive(Debug)]
pub struct Limits {
    /// Most operations one principal may have pending at once.
    pub max_pending_per_requester: usize,
    /// How long a finished operation stays in the store, in milliseconds.
    pub operation_retention_ms: i64,
    /// Most ceremonies one officer may have open at once.
    pub max_open_ceremonies_per_officer: usize,
    /// At most one drift check runs (a request or the scheduler's).
    pub drift: OneAtATime,
    /// At most one verification of the whole audit chain runs.
    pub audit_verify: OneAtATime,
}

impl Limits {
    /// The caps of `config`.
    pub fn from_config(config: &Config) -> Limits {
        Limits {
            max_pending_per_requester: config.dual_control.max_pending_per_requester,
            operation_retention_ms: i64::try_from(config.dual_control.operation_retention_secs)
                .unwrap_or(i64::MAX / 1000)
                .saturating_mul(1000),
            max_open_ceremonies_per_officer: config.ceremony.max_open_per_officer,
            drift: OneAtATime::new(),
            audit_verify: OneAtATime::new(),
        }
    }
}

/// Work of which one runs at a time (each run reads the whole token or the
/// whole log): a request waits for the run before it to end, and the
/// scheduler skips its turn while one runs. So a caller calling in a loop
/// occupies at most one HSM worker, never all of them.
#[derive(Debug)]
pub struct OneAtATime {
    running: tokio::sync::Mutex<()>,
    waiting: AtomicUsize,
}

impl OneAtATime {
    /// No run yet.
    pub fn new() -> OneAtATime {
        OneAtATime {
            running: tokio::sync::Mutex::new(()),
            waiting: AtomicUsize::new(0),
        }
    }

    /// The right to run, once the run before has ended (in the order
    /// asked: tokio's mutex is fair); held until the guard is dropped.
    pub async fn start(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        // Counted as waiting until the lock is ours, even if the caller
        // gives up meanwhile.
        let _waiting = Waiting(&self.waiting);
        self.running.lock().await
    }

    /// The right to run, if nothing runs now (for the scheduler).
    pub fn try_start(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        self.running.try_lock().ok()
    }

    /// Callers waiting for their turn.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

impl Default for OneAtATime {
    fn default() -> Self {
        Self::new()
    }
}

struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_runs_the_next_waits_and_the_scheduler_skips() {
        let gate = OneAtATime::new();
        let first = gate.start().await;
        assert!(gate.try_start().is_none(), "one runs");
        let second = gate.start();
        tokio::pin!(second);
        // Polled once, the second waits (and is counted) behind the first.
        assert!(futures_poll_once(second.as_mut()).await.is_none());
        assert_eq!(gate.waiting(), 1);
        drop(first);
        let second = second.await;
        assert_eq!(gate.waiting(), 0);
        drop(second);
        assert!(gate.try_start().is_some());
    }

    /// Polls `future` once: `Some` if it completed.
    async fn futures_poll_once<F: std::future::Future + Unpin>(mut future: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut future).poll(cx) {
                std::task::Poll::Ready(value) => Some(value),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
