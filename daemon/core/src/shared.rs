//! What keeps custodyd replicas that share one store coherent: the parts of
//! the state each holds in memory ([`Domain`]s: the registry, the officers
//! and operations) carry an epoch in the store, and each domain has one lock.
//!
//! - **Epochs** (keyspace `epochs`): a counter per domain, moved on in the
//!   same transaction as every change to the domain. A replica compares the
//!   stored epoch with the one it loaded before it decides anything from
//!   memory, and reloads if they differ.
//! - **Fences**: a change lands only if the epoch is still the one its
//!   writer loaded ([`Epochs::advance`]); otherwise nothing is written and
//!   the writer reloads. A writer whose lock lapsed (a replica that stalled
//!   past its lease) so never writes over what the next holder wrote.
//! - **Locks** ([`Epochs::lock`]): a domain's read-modify-write runs under
//!   its lock, a store claim: process-local on sled (one custodyd), an etcd
//!   lease on etcd (every replica). Taking it reloads the domain if needed.
//!
//! - **Leadership** ([`Epochs::try_lead`]): what runs without a request
//!   (scheduled rotations and destructions, drift checks) runs on the one
//!   replica holding the claim `leader`; another takes it over within the
//!   claim's lease once the leader is gone.
//! - **Who is alive** ([`Epochs::others`], [`Epochs::alive`]): the
//!   replicas holding their `replica/` claims, so that a starting replica
//!   leaves the recovery of work in flight to one that starts alone; and
//!   each process's instance id, drawn at start, so that the leader can
//!   tell the work of a process that is gone (a pending version, a
//!   ceremony held in its memory) from that of one still running.
//! - **The ceremony engine's lock** ([`Epochs::lock_ceremonies`]): one
//!   ceremony call at a time across replicas.
//!
//! On sled, with one custodyd, the epochs never move under it and the locks
//! are mutexes: one mechanism for both backends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use custody_store::{Claim, Keyspace, Store, StoreError, Tx, TxError};

/// How long a lock outlives a replica that died holding it.
pub const LOCK_TTL: Duration = Duration::from_secs(10);

/// Ends the words of a `replica/` claim's holder, before the instance id.
const INSTANCE: &str = ", instance ";

/// The ceremony engine's lock: one ceremony call at a time, across
/// replicas.
const CEREMONY_LOCK: &str = "lock/ceremonies";

/// A part of the state replicas hold in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    /// Keys, versions and their policies.
    Registry,
    /// Officers, the administrative quorum and operations.
    DualControl,
}

impl Domain {
    fn key(self) -> &'static [u8] {
        match self {
            Domain::Registry => b"registry",
            Domain::DualControl => b"dual_control",
        }
    }

    fn lock_name(self) -> &'static str {
        match self {
            Domain::Registry => "lock/registry",
            Domain::DualControl => "lock/dual_control",
        }
    }
}

/// The epochs of every domain, and their locks.
#[derive(Clone)]
pub struct Epochs {
    store: Store,
    space: Keyspace,
    /// Who takes the locks: this replica, as the store's claims name it.
    holder: String,
    /// This process, told apart from a restart of the same replica: drawn
    /// at random when it opens the store. What lives only in a process's
    /// memory (a ceremony's secrets) names it.
    instance: String,
}

fn decode(value: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(value).ok().map(u64::from_be_bytes)
}

/// `domain`'s epoch as stored (`None`: 0, before its first change).
fn stored(domain: Domain, value: Option<&[u8]>) -> Result<u64, StoreError> {
    match value {
        None => Ok(0),
        Some(value) => decode(value)
            .ok_or_else(|| StoreError::Failed(format!("epoch of {domain:?} is malformed"))),
    }
}

impl Epochs {
    /// The epochs in `store`; locks are taken in the name of `holder`.
    pub fn open(store: &Store, holder: &str) -> Result<Epochs, StoreError> {
        let mut nonce = [0u8; 8];
        getrandom::getrandom(&mut nonce)
            .map_err(|e| StoreError::Failed(format!("drawing the instance id: {e}")))?;
        Ok(Epochs {
            store: store.clone(),
            space: store.keyspace("epochs")?,
            holder: holder.to_string(),
            instance: hex::encode(nonce),
        })
    }

    /// This replica's name in the store's claims.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// This process's instance id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// What this process writes as the holder of its `replica/` claim: the
    /// words name it to an operator, the instance id to [`Epochs::alive`].
    pub fn replica_claim_holder(&self, listen: &str) -> String {
        format!(
            "custodyd pid {} listening on {listen}{INSTANCE}{}",
            std::process::id(),
            self.instance
        )
    }

    /// Whether the process with `instance` is still running: this one, or
    /// one whose `replica/` claim still counts. A process gone (killed,
    /// stopped, restarted under a new instance) takes what only its memory
    /// held with it.
    pub fn alive(&self, instance: &str) -> Result<bool, StoreError> {
        if instance == self.instance {
            return Ok(true);
        }
        Ok(self.store.holders("replica/")?.iter().any(|(_, holder)| {
            holder
                .rsplit_once(INSTANCE)
                .is_some_and(|(_, i)| i == instance)
        }))
    }

    /// The keyspace, for the transactions that move an epoch.
    pub fn space(&self) -> &Keyspace {
        &self.space
    }

    /// The stored epoch of `domain` (0 before its first change).
    pub fn read(&self, domain: Domain) -> Result<u64, StoreError> {
        stored(domain, self.space.get(domain.key())?.as_deref())
    }

    /// The stored epochs of the registry and of dual control, in one store
    /// read (what every request checks).
    pub fn read_both(&self) -> Result<(u64, u64), StoreError> {
        let (mut registry, mut dual_control) = (None, None);
        for entry in self.space.iter() {
            let (key, value) = entry?;
            if key == Domain::Registry.key() {
                registry = Some(value);
            } else if key == Domain::DualControl.key() {
                dual_control = Some(value);
            }
        }
        Ok((
            stored(Domain::Registry, registry.as_deref())?,
            stored(Domain::DualControl, dual_control.as_deref())?,
        ))
    }

    /// In a transaction that changes `domain`, before its writes: moves the
    /// epoch on from `loaded` and returns the new one, or `None` if another
    /// writer moved it since `loaded` was read (then write nothing).
    pub fn advance(
        &self,
        tx: &mut Tx<'_>,
        domain: Domain,
        loaded: u64,
    ) -> Result<Option<u64>, TxError> {
        let stored = match tx.get(&self.space, domain.key())? {
            None => 0,
            Some(value) => {
                decode(&value).ok_or_else(|| TxError::abort("a stored epoch is malformed"))?
            }
        };
        if stored != loaded {
            return Ok(None);
        }
        let next = loaded + 1;
        tx.insert(&self.space, domain.key(), next.to_be_bytes())?;
        Ok(Some(next))
    }

    /// The leadership if nobody else holds it (`None`: another replica
    /// leads); held until the claim is dropped or lapses.
    pub fn try_lead(&self) -> Result<Option<Claim>, StoreError> {
        match self.store.claim("leader", &self.holder, LOCK_TTL) {
            Ok(claim) => Ok(Some(claim)),
            Err(custody_store::ClaimError::Held { .. }) => Ok(None),
            Err(custody_store::ClaimError::Store(e)) => Err(e),
        }
    }

    /// The other replicas alive now (holding their `replica/` claims), by
    /// how they name themselves.
    pub fn others(&self, replica_id: Option<&str>) -> Result<Vec<String>, StoreError> {
        let own = replica_id.map(|id| format!("replica/{id}"));
        Ok(self
            .store
            .holders("replica/")?
            .into_iter()
            .filter(|(name, _)| Some(name) != own.as_ref())
            .map(|(name, holder)| format!("{} ({holder})", name.trim_start_matches("replica/")))
            .collect())
    }

    /// Waits for `domain`'s lock; it is held until the claim is dropped.
    pub async fn lock(&self, domain: Domain) -> Result<Claim, StoreError> {
        self.store
            .campaign(domain.lock_name(), &self.holder, LOCK_TTL)
            .await
    }

    /// The ceremony engine's lock if nobody holds it now (`None`: a
    /// ceremony call holds it).
    pub fn try_lock_ceremonies(&self) -> Result<Option<Claim>, StoreError> {
        match self.store.claim(CEREMONY_LOCK, &self.holder, LOCK_TTL) {
            Ok(claim) => Ok(Some(claim)),
            Err(custody_store::ClaimError::Held { .. }) => Ok(None),
            Err(custody_store::ClaimError::Store(e)) => Err(e),
        }
    }

    /// Waits for the ceremony engine's lock; held until the claim is
    /// dropped. Ceremonies keep no copy in memory (every step reads the
    /// journal), so the lock has no epoch: the journal's own revision
    /// fences a writer whose lock lapsed.
    pub async fn lock_ceremonies(&self) -> Result<Claim, StoreError> {
        self.store
            .campaign(CEREMONY_LOCK, &self.holder, LOCK_TTL)
            .await
    }

    /// The start check of tree `epochs` (threat model F1): one 8-byte
    /// counter under each domain's key.
    pub fn check_stored(db: &Store, findings: &mut crate::findings::Findings) {
        crate::findings::each_record(db, "epochs", findings, |key, value, findings| {
            let known = [Domain::Registry, Domain::DualControl]
                .iter()
                .any(|domain| domain.key() == key);
            if !known {
                findings.add(
                    "epochs",
                    key,
                    "expected only \"registry\" or \"dual_control\"",
                );
            } else if decode(value).is_none() {
                findings.add(
                    "epochs",
                    key,
                    format!("expected a counter of 8 bytes, found {} bytes", value.len()),
                );
            }
        });
    }
}

/// A domain's copy in memory: the epoch it was loaded at, and how it is
/// brought up to the store.
pub struct Copy {
    domain: Domain,
    epochs: Epochs,
    /// The epoch the copy was loaded at (or this replica last wrote).
    loaded: AtomicU64,
    /// One reload at a time.
    reloading: Mutex<()>,
}

impl Copy {
    /// A copy of `domain` loaded at `epoch`; read the epoch before loading,
    /// so that a change landing in between makes the copy look stale,
    /// never current.
    pub fn new(domain: Domain, epochs: &Epochs, epoch: u64) -> Copy {
        Copy {
            domain,
            epochs: epochs.clone(),
            loaded: AtomicU64::new(epoch),
            reloading: Mutex::new(()),
        }
    }

    /// The epochs, for the domain's lock and its fenced transactions.
    pub fn epochs(&self) -> &Epochs {
        &self.epochs
    }

    /// The epoch the copy stands at: the fence of the next write.
    pub fn loaded(&self) -> u64 {
        self.loaded.load(Ordering::SeqCst)
    }

    /// After a write moved the epoch to `next`.
    pub fn wrote(&self, next: u64) {
        self.loaded.store(next, Ordering::SeqCst);
    }

    /// The domain's epoch as stored now.
    pub fn stored(&self) -> Result<u64, StoreError> {
        self.epochs.read(self.domain)
    }

    /// Runs `reload` (which replaces the copy from the store) if the copy
    /// was loaded at another epoch than `stored`, read from the store.
    pub fn refresh_to<E>(
        &self,
        stored: u64,
        reload: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), E> {
        if stored == self.loaded() {
            return Ok(());
        }
        let _one = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // A caller that waited here may find the copy reloaded already.
        if stored != self.loaded() {
            reload()?;
            self.loaded.store(stored, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// A write refused by its fence: another replica changed this state since
/// this replica loaded it. Nothing was written; the next refresh reloads
/// the copy, and the caller may try again. The one definition of the
/// refusal: callers match the type, never its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("another replica changed this state meanwhile; nothing was written, try again")]
pub struct Stale;
