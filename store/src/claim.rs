//! Exclusive claims: a name held by at most one holder at a time (the
//! replica id, scheduler leadership, the ceremony-engine lock).
//!
//! A [`Claim`] is the holder's proof: [`Claim::is_held`] says whether it still
//! counts, [`Claim::lost`] resolves when it stops counting, and dropping it
//! releases the name. On etcd the name is a key bound to a lease that a
//! background task keeps alive; on sled, whose directory lock already keeps
//! other processes out, claims are process-local ([`LocalClaims`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::sync::{Notify, watch};

use crate::StoreError;

/// Why a claim was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// Someone else holds the name.
    #[error("claim held by {holder}")]
    Held {
        /// Who holds it, as they named themselves.
        holder: String,
    },
    /// The store could not answer.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Whether a claim still counts, shared between the [`Claim`] and whatever
/// keeps it alive.
pub(crate) struct ClaimState {
    held: watch::Sender<bool>,
    /// When the claim stops counting unless renewed (`None`: never, while
    /// held).
    expires: Mutex<Option<Instant>>,
}

impl ClaimState {
    pub(crate) fn new(expires: Option<Instant>) -> Arc<ClaimState> {
        Arc::new(ClaimState {
            held: watch::Sender::new(true),
            expires: Mutex::new(expires),
        })
    }

    /// The claim counts until `until` (a renewal).
    pub(crate) fn renewed(&self, until: Instant) {
        *self.expires.lock().unwrap_or_else(PoisonError::into_inner) = Some(until);
    }

    pub(crate) fn expires(&self) -> Option<Instant> {
        *self.expires.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The claim no longer counts, for good.
    pub(crate) fn lose(&self) {
        self.held.send_replace(false);
    }

    fn is_held(&self) -> bool {
        *self.held.borrow() && self.expires().is_none_or(|until| Instant::now() < until)
    }
}

/// What releases a claim when it is dropped.
type Release = Box<dyn FnOnce() + Send + Sync>;

/// An exclusive hold on a name, taken with [`crate::Store::claim`] or
/// [`crate::Store::campaign`]. Dropping it releases the name.
pub struct Claim {
    name: String,
    holder: String,
    state: Arc<ClaimState>,
    release: Option<Release>,
    /// This process's turn at the name, for a claim won by campaigning.
    turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("name", &self.name)
            .field("holder", &self.holder)
            .field("held", &self.is_held())
            .finish()
    }
}

impl Claim {
    pub(crate) fn new(name: &str, holder: &str, state: Arc<ClaimState>, release: Release) -> Claim {
        Claim {
            name: name.to_string(),
            holder: holder.to_string(),
            state,
            release: Some(release),
            turn: None,
        }
    }

    /// Keeps this process's turn at `name` until the claim is released.
    pub(crate) fn with_turn(mut self, turn: tokio::sync::OwnedMutexGuard<()>) -> Claim {
        self.turn = Some(turn);
        self
    }

    /// The name held.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Who holds it.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Whether the claim still counts: false once its lease could not be
    /// renewed before it would expire, or the store said it is gone. Checked
    /// against the local clock, conservatively: the store's own expiry comes
    /// no earlier than the time this reports.
    pub fn is_held(&self) -> bool {
        self.state.is_held()
    }

    /// Resolves when the claim no longer counts (at once if it already does
    /// not).
    pub async fn lost(&self) {
        let mut held = self.state.held.subscribe();
        // An error means the sender is gone, which cannot happen while `self`
        // holds the state; either way the wait is over.
        let _ = held.wait_for(|held| !held).await;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.state.lose();
        if let Some(release) = self.release.take() {
            release();
        }
        // Only then the next waiter of this process campaigns.
        drop(self.turn.take());
    }
}

/// One queue per claimed name within a process: its tasks campaign for the
/// name one at a time, so that a release wakes one campaigner per process,
/// not every waiting task (a herd of dozens of etcd watches and leases per
/// release, which etcd's connection answered with ENHANCE_YOUR_CALM).
#[derive(Default)]
pub(crate) struct Turns {
    queues: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Turns {
    /// Waits for this process's turn at `name`.
    pub(crate) async fn take(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let queue = self
            .queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_string())
            .or_default()
            .clone();
        queue.lock_owned().await
    }
}

/// Claims that exclude holders within one process (sled: its directory
/// lock excludes other processes).
#[derive(Default)]
pub(crate) struct LocalClaims {
    /// Held names and their holders.
    held: Mutex<HashMap<String, String>>,
    released: Notify,
}

impl LocalClaims {
    pub(crate) fn claim(self: &Arc<Self>, name: &str, holder: &str) -> Result<Claim, ClaimError> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(current) = held.get(name) {
            return Err(ClaimError::Held {
                holder: current.clone(),
            });
        }
        held.insert(name.to_string(), holder.to_string());
        let claims = self.clone();
        let owned = name.to_string();
        Ok(Claim::new(
            name,
            holder,
            ClaimState::new(None),
            Box::new(move || {
                claims
                    .held
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&owned);
                claims.released.notify_waiters();
            }),
        ))
    }

    pub(crate) fn holders(&self, prefix: &str) -> Vec<(String, String)> {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let mut holders: Vec<(String, String)> = held
            .iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .map(|(name, holder)| (name.clone(), holder.clone()))
            .collect();
        holders.sort();
        holders
    }

    pub(crate) async fn campaign(
        self: &Arc<Self>,
        name: &str,
        holder: &str,
    ) -> Result<Claim, StoreError> {
        loop {
            // Registered before the attempt, so that a release between the
            // attempt and the wait still wakes us.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match self.claim(name, holder) {
                Ok(claim) => return Ok(claim),
                Err(ClaimError::Held { .. }) => released.await,
                Err(ClaimError::Store(e)) => return Err(e),
            }
        }
    }
}
