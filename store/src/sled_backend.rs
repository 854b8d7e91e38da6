//! The embedded backend: each keyspace is a sled tree of one database.

use std::collections::HashMap;
use std::future::Future;
use std::ops::Bound;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use sled::Transactional;
use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};

use crate::claim::{Claim, ClaimError, LocalClaims};
use crate::{Backend, Body, BodyFn, Bytes, Result, StoreError, TxError, TxFault, TxOps, Write};

/// sled's own tree, which custody never uses for state.
const DEFAULT_TREE: &[u8] = b"__sled__default";

pub(crate) struct SledBackend {
    db: sled::Db,
    trees: RwLock<HashMap<Arc<str>, sled::Tree>>,
    claims: Arc<LocalClaims>,
}

fn failed(e: sled::Error) -> StoreError {
    StoreError::Failed(format!("sled: {e}"))
}

impl SledBackend {
    pub(crate) fn open(path: &Path, cache_bytes: u64) -> Result<SledBackend> {
        sled::Config::new()
            .path(path)
            // sled's own default, written down: what is not flushed by a
            // caller reaches the disk within this time.
            .flush_every_ms(Some(500))
            .cache_capacity(cache_bytes)
            .open()
            .map(SledBackend::new)
            .map_err(failed)
    }

    pub(crate) fn new(db: sled::Db) -> SledBackend {
        SledBackend {
            db,
            trees: RwLock::new(HashMap::new()),
            claims: Arc::default(),
        }
    }

    fn tree(&self, space: &str) -> Result<sled::Tree> {
        if let Some(tree) = self
            .trees
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(space)
        {
            return Ok(tree.clone());
        }
        let tree = self.db.open_tree(space).map_err(failed)?;
        self.trees
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(Arc::from(space), tree.clone());
        Ok(tree)
    }

    fn trees(&self, spaces: &[Arc<str>]) -> Result<Vec<sled::Tree>> {
        spaces.iter().map(|space| self.tree(space)).collect()
    }
}

fn bound(bound: Bound<&[u8]>) -> Bound<Vec<u8>> {
    match bound {
        Bound::Included(key) => Bound::Included(key.to_vec()),
        Bound::Excluded(key) => Bound::Excluded(key.to_vec()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl Backend for SledBackend {
    fn name(&self) -> &'static str {
        "sled"
    }

    fn open_space(&self, space: &str) -> Result<()> {
        self.tree(space).map(drop)
    }

    fn space_names(&self) -> Result<Vec<String>> {
        Ok(self
            .db
            .tree_names()
            .into_iter()
            .filter(|name| name.as_ref() != DEFAULT_TREE)
            .map(|name| String::from_utf8_lossy(&name).into_owned())
            .collect())
    }

    fn get(&self, space: &str, key: &[u8]) -> Result<Option<Bytes>> {
        Ok(self
            .tree(space)?
            .get(key)
            .map_err(failed)?
            .map(|value| value.to_vec()))
    }

    fn scan(
        &self,
        space: &str,
        from: Bound<&[u8]>,
        to: Bound<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        if let (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) =
            (from, to)
        {
            // sled panics on an inverted range; an empty one is the answer.
            if a > b || (a == b && !matches!((from, to), (Bound::Included(_), Bound::Included(_))))
            {
                return Ok(Vec::new());
            }
        }
        let range = self
            .tree(space)?
            .range::<Vec<u8>, _>((bound(from), bound(to)));
        let entries: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = if reverse {
            Box::new(range.rev())
        } else {
            Box::new(range)
        };
        entries
            .take(limit)
            .map(|entry| {
                entry
                    .map(|(key, value)| (key.to_vec(), value.to_vec()))
                    .map_err(failed)
            })
            .collect()
    }

    fn count(&self, space: &str) -> Result<usize> {
        Ok(self.tree(space)?.len())
    }

    fn write(&self, writes: Vec<Write>) -> Result<()> {
        let mut spaces: Vec<Arc<str>> = Vec::new();
        for write in &writes {
            if !spaces.contains(&write.space) {
                spaces.push(write.space.clone());
            }
        }
        if let [space] = spaces.as_slice() {
            let mut batch = sled::Batch::default();
            for write in writes {
                match write.value {
                    Some(value) => batch.insert(write.key, value),
                    None => batch.remove(write.key),
                }
            }
            return self.tree(space)?.apply_batch(batch).map_err(failed);
        }
        self.transact(&spaces, &mut |ops| {
            for write in &writes {
                let index = spaces
                    .iter()
                    .position(|space| *space == write.space)
                    .unwrap_or_default();
                ops.put(index, &write.key, write.value.as_deref())?;
            }
            Ok(())
        })
    }

    fn transact(&self, spaces: &[Arc<str>], body: &mut BodyFn<'_>) -> Result<()> {
        let trees = self.trees(spaces)?;
        let refs: Vec<&sled::Tree> = trees.iter().collect();
        let body = Body::new(body);
        let outcome = <[&sled::Tree] as Transactional<StoreError>>::transaction(
            refs.as_slice(),
            |views: &Vec<TransactionalTree>| {
                let mut ops = SledTx {
                    views,
                    unabortable: None,
                };
                match body.run(&mut ops) {
                    Ok(()) => Ok(()),
                    // A conflict or storage error sled raised: hand it back
                    // so that sled retries or fails as it decides.
                    Err(_) if ops.unabortable.is_some() => Err(ops
                        .unabortable
                        .take()
                        .map(ConflictableTransactionError::from)
                        .unwrap_or(ConflictableTransactionError::Conflict)),
                    Err(TxError(TxFault::Store(e))) => Err(ConflictableTransactionError::Abort(e)),
                    Err(TxError(TxFault::Undeclared(space))) => {
                        Err(ConflictableTransactionError::Abort(StoreError::Failed(
                            format!("transaction used undeclared keyspace {space}"),
                        )))
                    }
                    Err(TxError(TxFault::Retry)) => Err(ConflictableTransactionError::Conflict),
                }
            },
        );
        match outcome {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(failed(e)),
        }
    }

    fn flush(&self) -> Result<()> {
        self.db.flush().map(drop).map_err(failed)
    }

    fn flush_async(&self) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
        Box::pin(async move { self.db.flush_async().await.map(drop).map_err(failed) })
    }

    // sled's directory lock keeps every other process out of the database,
    // so excluding holders within this process is all a claim needs.
    fn claim(
        &self,
        name: &str,
        holder: &str,
        _ttl: Duration,
    ) -> std::result::Result<Claim, ClaimError> {
        self.claims.claim(name, holder)
    }

    fn campaign<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        _ttl: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<Claim>> + Send + 'a>> {
        Box::pin(self.claims.campaign(name, holder))
    }

    fn holders(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        Ok(self.claims.holders(prefix))
    }
}

struct SledTx<'a> {
    views: &'a [TransactionalTree],
    /// What sled raised inside the body, to give back to it.
    unabortable: Option<UnabortableTransactionError>,
}

impl SledTx<'_> {
    fn view(&self, space: usize) -> std::result::Result<&TransactionalTree, TxError> {
        self.views
            .get(space)
            .ok_or_else(|| TxError(TxFault::Undeclared(format!("#{space}"))))
    }

    fn raised(&mut self, e: UnabortableTransactionError) -> TxError {
        self.unabortable = Some(e);
        TxError(TxFault::Retry)
    }
}

impl TxOps for SledTx<'_> {
    fn get(&mut self, space: usize, key: &[u8]) -> std::result::Result<Option<Bytes>, TxError> {
        match self.view(space)?.get(key) {
            Ok(value) => Ok(value.map(|v| v.to_vec())),
            Err(e) => Err(self.raised(e)),
        }
    }

    fn put(
        &mut self,
        space: usize,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> std::result::Result<(), TxError> {
        let view = self.view(space)?;
        let outcome = match value {
            Some(value) => view.insert(key, value).map(drop),
            None => view.remove(key).map(drop),
        };
        outcome.map_err(|e| self.raised(e))
    }
}
