//! [`Custody`]: what every action reaches. The gRPC handlers, the scheduler,
//! the quorum executor and the ceremony engine all act on one `Custody`.

use std::sync::Arc;

use hsm_shim::Hsm;

use crate::algorithms::KeyAlgorithm;
use crate::audit::AuditLog;
use crate::budget::NonceBudget;
use crate::ceremony::state::Ceremonies;
use crate::clock::Clock;
use crate::config::LifecycleSection;
use crate::dual_control::store::DualControlStore;
use crate::identity::Principal;
use crate::limits::Limits;
use crate::registry::Registry;
use crate::storage::Headroom;

/// The HSM, the stores and the settings every action shares.
pub struct Custody {
    /// The HSM.
    pub hsm: Hsm,
    /// Keys and versions.
    pub registry: Registry,
    /// The audit log.
    pub audit: AuditLog,
    /// Algorithms keys may be created with.
    pub allowed_algorithms: Vec<KeyAlgorithm>,
    /// Officers and operations.
    pub dual_control: DualControlStore,
    /// How long operations wait for approvals, in milliseconds.
    pub approval_ttl_ms: i64,
    /// Whether a signed denial vetoes.
    pub denial_vetoes: bool,
    /// The time, for approval expiry, cryptoperiods and scheduled
    /// destruction (injected in tests).
    pub clock: Arc<dyn Clock>,
    /// Cancel window, scheduler and drift intervals.
    pub lifecycle: LifecycleSection,
    /// Encryptions per AES version.
    pub budget: NonceBudget,
    /// Key ceremonies: the journal and the engine's state.
    pub ceremonies: Ceremonies,
    /// The caps on work one caller takes on (threat model R2).
    pub limits: Limits,
    /// Free space under the data directory: below its reserve, reads only.
    pub headroom: Headroom,
    /// The epochs, locks and leadership replicas share ([`crate::shared`]).
    pub shared: crate::shared::Epochs,
}

impl Custody {
    /// Runs a caller's HSM job within the caller's share of the HSM
    /// ([`crate::limits::HsmShares`], held until the job has run, even if
    /// the caller goes away) and the pool's bounded queue
    /// ([`Hsm::try_run`]); either, when full, refuses it `HSM_BUSY` with a
    /// retry hint and nothing done (threat model R2).
    pub async fn try_hsm<T, F>(&self, caller: &Principal, job: F) -> Result<T, crate::Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut hsm_shim::HsmSession) -> hsm_shim::Result<T> + Send + 'static,
    {
        let share = self.limits.hsm_shares.try_take(&caller.name, 1)?;
        Ok(self.hsm.try_run(share.holding(job)).await?)
    }

    /// A stream's batch of `requests` requests, once its places in the
    /// caller's share are free: it waits instead of being refused, so a
    /// stream slows down to its share (and reads no further items
    /// meanwhile). Taken before the batch's items are checked, so that
    /// the wait does not come between a check and its signature; the job
    /// then goes to [`Custody::hsm_batch`].
    pub async fn hsm_share_for_batch(
        &self,
        caller: &Principal,
        requests: usize,
    ) -> crate::limits::HsmShare {
        self.limits.hsm_shares.take(&caller.name, requests).await
    }

    /// Runs a stream's batch, the work of `requests` requests, in the
    /// places `share` holds ([`Custody::hsm_share_for_batch`]) and the
    /// pool's bounded queue ([`Hsm::try_run_batch`], refused `HSM_BUSY`
    /// when full).
    pub async fn hsm_batch<T, F>(
        &self,
        share: crate::limits::HsmShare,
        requests: usize,
        job: F,
    ) -> Result<T, crate::Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut hsm_shim::HsmSession) -> hsm_shim::Result<T> + Send + 'static,
    {
        Ok(self.hsm.try_run_batch(requests, share.holding(job)).await?)
    }

    /// What every request passes before it acts: the copies in memory
    /// brought up to the store ([`Custody::refresh`]) and, if it
    /// `changes_state`, room on the disk ([`Headroom::ensure_room`]).
    pub fn admit(&self, changes_state: bool) -> Result<(), crate::Error> {
        self.refresh()?;
        if changes_state {
            self.headroom.ensure_room()?;
        }
        Ok(())
    }

    /// Brings what this custodyd holds in memory (the registry, the
    /// officers) up to the store before a request decides anything from it:
    /// a replica sharing the store may have changed it. One store read when
    /// nothing changed.
    pub fn refresh(&self) -> Result<(), crate::Error> {
        let unavailable = |what: &str, error: String| {
            tracing::error!(%error, "refreshing {what}");
            crate::Error::new(
                crate::Reason::StoreUnavailable,
                format!("the {what} cannot be read from the store"),
            )
        };
        let (registry, dual_control) = self
            .shared
            .read_both()
            .map_err(|e| unavailable("epochs", e.to_string()))?;
        self.registry
            .refresh_to(registry)
            .map_err(|e| unavailable("registry", e.to_string()))?;
        self.dual_control
            .refresh_to(dual_control)
            .map_err(|e| unavailable("officers", e))
    }
}
