//! Serializable transactions on etcd, optimistically.
//!
//! The body runs against a [`View`] that reads from etcd at one revision
//! (the one the first read saw) and keeps its writes to itself (its reads
//! see them). The commit is one `Txn`: for every key the body read from
//! etcd, "its `mod_revision` is still the one read" (0 for a key that was
//! absent), and if so, the writes. So the commit lands only if everything
//! the body read is as it was at that revision, which makes the transaction
//! equivalent to running the whole body at the commit's revision. Keys
//! written without being read need no compare: the body's outcome does not
//! depend on them. If a compare fails, the body runs again (at most
//! [`TRIES`] times, with a jittered backoff), then the store reports
//! [`StoreError::Contended`]. A read-only body needs no commit: its reads
//! are one consistent snapshot.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use super::members::RpcError;
use super::pb::etcdserverpb::{RangeRequest, TxnRequest, compare};
use super::{EtcdBackend, blocking};
use crate::{Body, BodyFn, Bytes, Result, StoreError, TxError, TxFault, TxOps};

/// How many times a transaction body runs before the store gives up.
pub(crate) const TRIES: u32 = 64;

/// The longest backoff between two runs of a body.
const MAX_BACKOFF: Duration = Duration::from_millis(100);

/// What went wrong inside a body, whatever the body made of its error.
enum Fault {
    /// The pinned revision cannot be read any more: start over.
    Restart,
    Store(StoreError),
}

struct View<'a> {
    backend: &'a EtcdBackend,
    spaces: &'a [Arc<str>],
    /// The revision every read is made at, once the first read fixed it.
    revision: Option<i64>,
    /// Keys read from etcd: their `mod_revision` (0: absent) and value.
    reads: HashMap<Bytes, (i64, Option<Bytes>)>,
    /// The body's writes, by full key (`None` removes).
    writes: BTreeMap<Bytes, Option<Bytes>>,
    fault: Option<Fault>,
}

impl View<'_> {
    fn key(&self, space: usize, key: &[u8]) -> std::result::Result<Bytes, TxError> {
        let name = self
            .spaces
            .get(space)
            .ok_or_else(|| TxError(TxFault::Undeclared(format!("#{space}"))))?;
        Ok(self.backend.shared.data_key(name, key))
    }

    fn fail(&mut self, fault: Fault) -> TxError {
        let error = match &fault {
            Fault::Restart => TxError(TxFault::Retry),
            Fault::Store(e) => TxError(TxFault::Store(e.clone())),
        };
        self.fault = Some(fault);
        error
    }
}

impl TxOps for View<'_> {
    fn get(&mut self, space: usize, key: &[u8]) -> std::result::Result<Option<Bytes>, TxError> {
        let key = self.key(space, key)?;
        if let Some(written) = self.writes.get(&key) {
            return Ok(written.clone());
        }
        if let Some((_, value)) = self.reads.get(&key) {
            return Ok(value.clone());
        }
        let revision = self.revision.unwrap_or(0);
        let request = RangeRequest {
            key: key.clone(),
            revision,
            ..RangeRequest::default()
        };
        let answer = self.backend.bridge.wait({
            let shared = self.backend.shared.clone();
            async move {
                match shared.range(request).await {
                    Ok(answer) => Ok(Ok(answer)),
                    Err(RpcError::Compacted(_)) => Ok(Err(())),
                    Err(e) => Err(StoreError::from(e)),
                }
            }
        });
        match answer {
            Ok(Ok(answer)) => {
                if self.revision.is_none() {
                    self.revision = Some(answer.revision);
                }
                let (modified, value) = answer
                    .kvs
                    .into_iter()
                    .next()
                    .map_or((0, None), |kv| (kv.mod_revision, Some(kv.value)));
                self.reads.insert(key, (modified, value.clone()));
                Ok(value)
            }
            Ok(Err(())) => Err(self.fail(Fault::Restart)),
            Err(e) => Err(self.fail(Fault::Store(e))),
        }
    }

    fn put(
        &mut self,
        space: usize,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> std::result::Result<(), TxError> {
        let key = self.key(space, key)?;
        self.writes.insert(key, value.map(<[u8]>::to_vec));
        Ok(())
    }
}

pub(crate) fn transact(
    backend: &EtcdBackend,
    spaces: &[Arc<str>],
    body: &mut BodyFn<'_>,
) -> Result<()> {
    let body = Body::new(body);
    let mut conflicts = 0;
    while conflicts < TRIES {
        let mut view = View {
            backend,
            spaces,
            revision: None,
            reads: HashMap::new(),
            writes: BTreeMap::new(),
            fault: None,
        };
        let outcome = body.run(&mut view);
        // The view's own record counts, even if the body swallowed the error.
        match view.fault.take() {
            Some(Fault::Restart) => {
                conflicts += 1;
                continue;
            }
            Some(Fault::Store(e)) => return Err(e),
            None => {}
        }
        match outcome {
            Ok(()) => {}
            Err(TxError(TxFault::Undeclared(space))) => {
                return Err(StoreError::Failed(format!(
                    "transaction used undeclared keyspace {space}"
                )));
            }
            Err(TxError(TxFault::Store(e))) => return Err(e),
            Err(TxError(TxFault::Retry)) => {
                conflicts += 1;
                continue;
            }
        }
        if view.writes.is_empty() || commit(backend, view)? {
            return Ok(());
        }
        conflicts += 1;
        backoff(conflicts);
    }
    Err(StoreError::Contended(conflicts))
}

/// Commits the view's writes if nothing it read changed; false if
/// something did.
fn commit(backend: &EtcdBackend, view: View<'_>) -> Result<bool> {
    let compare = view
        .reads
        .into_iter()
        .map(|(key, (modified, _))| {
            super::compare(
                key,
                compare::CompareTarget::Mod,
                compare::TargetUnion::ModRevision(modified),
            )
        })
        .collect();
    let success = view
        .writes
        .into_iter()
        .map(|(key, value)| match value {
            Some(value) => super::put(key, value),
            None => super::delete(key),
        })
        .collect();
    let request = TxnRequest {
        compare,
        success,
        failure: Vec::new(),
    };
    let shared = backend.shared.clone();
    backend.bridge.wait(async move {
        shared
            .txn("transaction commit", request)
            .await
            .map(|response| response.succeeded)
    })
}

/// Sleeps a random time up to a bound that doubles with each conflict, so
/// that writers who collided spread out.
fn backoff(conflicts: u32) {
    let ceiling = Duration::from_millis(1 << conflicts.min(7)).min(MAX_BACKOFF);
    let random = RandomState::new().hash_one(std::time::Instant::now());
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    let pause = Duration::from_nanos(random % nanos.max(1));
    blocking(|| std::thread::sleep(pause));
}
