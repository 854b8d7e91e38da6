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
//! | one caller's HSM requests waiting or running | [`HsmShares`], through [`crate::Custody::try_hsm`] and [`crate::Custody::hsm_share_for_batch`] | `HSM_BUSY` (a stream's batch waits instead) |
//! | one stream's items in flight (128) | the gRPC face's `SignStream` | none: custodyd reads no further |
//! | one drift check, one audit verification at a time | [`OneAtATime`] | none: the next waits its turn |
//!
//! Finished operations are kept for `operation_retention_ms` and then
//! pruned (`operations::vote::expire_due`); each refusal that can tell
//! when to try again carries a retry hint.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Config;
use crate::error::{Error, HSM_BUSY_RETRY, Reason};

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
    /// Each caller's places among the HSM's requests.
    pub hsm_shares: HsmShares,
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
            hsm_shares: HsmShares::new(config.hsm.max_queued_per_caller),
        }
    }
}

/// Each caller's share of the HSM: the requests one principal has waiting
/// for a worker or running, over all its connections and streams, at most
/// `[hsm] max_queued_per_caller`. The queue as a whole is bounded too
/// (`[hsm] max_queued_jobs`), but first come, first served: without a
/// share, one caller with a few streams could fill it and leave every
/// other caller `HSM_BUSY`. A share's places go with the HSM job
/// ([`HsmShare::holding`]), not with the caller's request: a caller that
/// cancels its call leaves its job queued, and the job keeps its places
/// until it has run or been dropped.
#[derive(Debug)]
pub struct HsmShares {
    max: usize,
    /// Only callers with requests in flight have an entry.
    callers: Callers,
}

type Callers = Arc<Mutex<HashMap<String, Arc<Semaphore>>>>;

/// Places held in a caller's share until dropped.
#[derive(Debug)]
pub struct HsmShare {
    callers: Callers,
    max: usize,
    caller: String,
    semaphore: Option<Arc<Semaphore>>,
    permit: Option<OwnedSemaphorePermit>,
}

impl HsmShare {
    /// `job`, holding these places until it has run on a worker (or been
    /// dropped unrun).
    pub fn holding<T, F>(
        self,
        job: F,
    ) -> impl FnOnce(&mut hsm_shim::HsmSession) -> hsm_shim::Result<T> + Send + 'static
    where
        F: FnOnce(&mut hsm_shim::HsmSession) -> hsm_shim::Result<T> + Send + 'static,
    {
        move |session| {
            let _share = self;
            job(session)
        }
    }
}

impl HsmShares {
    /// Shares of `max` requests each (at least 1).
    pub fn new(max: usize) -> HsmShares {
        HsmShares {
            max: max.clamp(1, Semaphore::MAX_PERMITS),
            callers: Arc::default(),
        }
    }

    fn share(&self, caller: &str) -> HsmShare {
        HsmShare {
            callers: self.callers.clone(),
            max: self.max,
            caller: caller.to_owned(),
            semaphore: None,
            permit: None,
        }
    }

    fn semaphore(&self, caller: &str) -> Arc<Semaphore> {
        let mut callers = self.callers.lock().unwrap_or_else(PoisonError::into_inner);
        callers
            .entry(caller.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.max)))
            .clone()
    }

    /// A share larger than the whole share is held as the whole share.
    fn places(&self, requests: usize) -> u32 {
        u32::try_from(requests.clamp(1, self.max)).unwrap_or(u32::MAX)
    }

    /// `requests` places of `caller`'s share now, or `HSM_BUSY` (with a
    /// retry hint) if the share has not that many free: a unary request.
    pub fn try_take(&self, caller: &str, requests: usize) -> Result<HsmShare, Error> {
        let mut share = self.share(caller);
        share.permit = self
            .semaphore(caller)
            .try_acquire_many_owned(self.places(requests))
            .ok();
        if share.permit.is_none() {
            return Err(Error::new(
                Reason::HsmBusy,
                format!(
                    "this caller already has {} requests waiting for the HSM or running on it, its share; nothing was done: try again shortly",
                    self.max
                ),
            )
            .retry_after(HSM_BUSY_RETRY));
        }
        Ok(share)
    }

    /// `requests` places of `caller`'s share, once free: a stream's batch,
    /// which waits (and so reads no further items) rather than fail.
    pub async fn take(&self, caller: &str, requests: usize) -> HsmShare {
        let mut share = self.share(caller);
        let semaphore = self.semaphore(caller);
        // Held by the share, so that a wait cancelled once its places were
        // given still lets the share's drop see the entry unused.
        share.semaphore = Some(semaphore.clone());
        // Never closed: the semaphores live as long as their entries.
        share.permit = semaphore
            .acquire_many_owned(self.places(requests))
            .await
            .ok();
        share
    }

    /// Places `caller` holds now.
    pub fn held(&self, caller: &str) -> usize {
        let callers = self.callers.lock().unwrap_or_else(PoisonError::into_inner);
        callers
            .get(caller)
            .map_or(0, |semaphore| self.max - semaphore.available_permits())
    }
}

impl Drop for HsmShare {
    fn drop(&mut self) {
        drop(self.permit.take());
        drop(self.semaphore.take());
        // The entry goes with the caller's last place: the map holds only
        // callers with requests in flight. Entries are cloned only under
        // the lock, so a count of one is the map's own.
        let mut callers = self.callers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(semaphore) = callers.get(&self.caller) {
            if Arc::strong_count(semaphore) == 1 && semaphore.available_permits() == self.max {
                callers.remove(&self.caller);
            }
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

    #[tokio::test]
    async fn a_callers_share_holds_its_places_alone_and_its_entry_goes_with_the_last() {
        let shares = HsmShares::new(3);
        let a = shares.try_take("a", 2).unwrap();
        let b = shares.try_take("b", 3).unwrap();
        // Another caller's places do not count against this one's.
        let refused = shares.try_take("a", 2).unwrap_err();
        assert_eq!(refused.reason, Reason::HsmBusy);
        assert!(refused.retry_after.is_some());
        let a_last = shares.try_take("a", 1).unwrap();
        assert_eq!((shares.held("a"), shares.held("b")), (3, 3));
        // A batch waits for its places, and one larger than the share
        // takes the whole share.
        let waiting = shares.take("a", 16);
        tokio::pin!(waiting);
        assert!(futures_poll_once(waiting.as_mut()).await.is_none());
        drop(a);
        assert!(futures_poll_once(waiting.as_mut()).await.is_none());
        drop(a_last);
        let whole = waiting.await;
        assert_eq!(shares.held("a"), 3);
        drop((whole, b));
        assert_eq!((shares.held("a"), shares.held("b")), (0, 0));
        assert!(
            shares.callers.lock().unwrap().is_empty(),
            "no entry outlives its caller's last place"
        );
    }

    #[tokio::test]
    async fn a_share_goes_with_its_job_and_a_cancelled_wait_holds_nothing() {
        let shares = HsmShares::new(2);
        // A job that never runs (its caller gone, the queue dropped) gives
        // its places back when it is dropped, and not before.
        let job = shares.try_take("a", 2).unwrap().holding(|_| Ok(()));
        assert_eq!(shares.held("a"), 2);
        assert!(shares.try_take("a", 1).is_err());
        drop(job);
        assert_eq!(shares.held("a"), 0);
        // A batch that stops waiting holds nothing and leaves no entry,
        // also when its places were given to it before it stopped.
        for given_first in [false, true] {
            let mut first = Some(shares.try_take("a", 2).unwrap());
            {
                let waiting = shares.take("a", 1);
                tokio::pin!(waiting);
                assert!(futures_poll_once(waiting.as_mut()).await.is_none());
                if given_first {
                    first = None;
                }
            }
            drop(first);
            assert_eq!(shares.held("a"), 0, "given first: {given_first}");
            assert!(
                shares.callers.lock().unwrap().is_empty(),
                "given first: {given_first}"
            );
        }
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
