//! custody's durable state boundary: every byte custodyd keeps goes through
//! a [`Store`] and nothing above it knows which backend holds it.
//!
//! A store is a set of named [`Keyspace`]s, each an ordered map from byte
//! keys to byte values, plus [`Store::transaction`], which reads and writes
//! several keyspaces atomically and serializably (each backend retries the
//! body on conflict, so the body must be free of side effects).
//!
//! Backends:
//! - sled, embedded in the process ([`Store::open_sled`]): the default.
//!   Writes are durable after [`Store::flush`] or [`Store::flush_async`].
//! - etcd v3, shared by several custodyd replicas ([`Store::open_etcd`]):
//!   every acknowledged write is already durable. See the `etcd` module for
//!   the key layout and the cluster limits custody relies on.
//!
//! Both also give out exclusive [`Claim`]s ([`Store::claim`],
//! [`Store::campaign`]): a name held by one holder at a time.
//!
//! Beside the stores, [`segments`]: an append-only log of numbered records
//! in files of its own, where the embedded backend's audit records lie so
//! that opening does not grow with the log.
//!
//! This crate owns the mapping to each backend and nothing of what the bytes
//! mean: the domain (`custody-core`) encodes, checksums and interprets them.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

mod claim;
mod etcd;
pub mod segments;
mod sled_backend;

pub use claim::{Claim, ClaimError};
pub use etcd::EtcdConfig;

/// A key or a value as stored.
pub type Bytes = Vec<u8>;

/// Why the store could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or did not answer in time; the same
    /// request may succeed later (an etcd member lost, a leader election).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with a failure that retrying will not mend (I/O
    /// error, corrupt data, a request over the backend's limits).
    #[error("store failed: {0}")]
    Failed(String),
    /// A transaction lost to concurrent writers more times than the backend
    /// retries.
    #[error("store transaction conflicted {0} times in a row")]
    Contended(u32),
}

/// The result of a store call.
pub type Result<T> = std::result::Result<T, StoreError>;

/// An error inside a transaction body: propagate it with `?`, never build
/// one. The backend decides from it whether to retry the body (a conflict)
/// or to fail the transaction.
#[derive(Debug)]
pub struct TxError(TxFault);

impl TxError {
    /// Ends the transaction with nothing written and fails it with `reason`:
    /// the body's own refusal (a record it cannot encode, a state it must
    /// not write over).
    pub fn abort(reason: impl std::fmt::Display) -> TxError {
        TxError(TxFault::Store(StoreError::Failed(reason.to_string())))
    }
}

#[derive(Debug)]
enum TxFault {
    /// The backend saw a conflict and will run the body again.
    Retry,
    /// The body used a keyspace it did not declare.
    Undeclared(String),
    /// The backend failed a read or write inside the body.
    Store(StoreError),
}

/// One write of a [`Batch`] or a transaction's commit.
#[derive(Debug, Clone)]
struct Write {
    space: Arc<str>,
    key: Bytes,
    /// `None` removes the key.
    value: Option<Bytes>,
}

/// What a backend does; [`Store`] and [`Keyspace`] are the API above it.
trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    fn open_space(&self, space: &str) -> Result<()>;
    fn space_names(&self) -> Result<Vec<String>>;
    fn get(&self, space: &str, key: &[u8]) -> Result<Option<Bytes>>;
    /// Up to `limit` entries of `space` between the bounds, in key order
    /// (descending when `reverse`).
    fn scan(
        &self,
        space: &str,
        from: Bound<&[u8]>,
        to: Bound<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>>;
    fn count(&self, space: &str) -> Result<usize>;
    /// Applies every write or none.
    fn write(&self, writes: Vec<Write>) -> Result<()>;
    /// Runs `body` until it commits without conflict, serializably.
    fn transact(&self, spaces: &[Arc<str>], body: &mut BodyFn<'_>) -> Result<()>;
    fn flush(&self) -> Result<()>;
    fn flush_async(&self) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>>;
    /// Takes `name` for `holder` if nobody holds it.
    fn claim(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> std::result::Result<Claim, ClaimError>;
    /// Waits until `name` is taken for `holder`.
    fn campaign<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<Claim>> + Send + 'a>>;
    /// The claims held now whose names start with `prefix`: name, holder.
    fn holders(&self, prefix: &str) -> Result<Vec<(String, String)>>;
}

/// A transaction's reads and writes, by the index of the keyspace in the
/// transaction's declared list.
trait TxOps {
    fn get(&mut self, space: usize, key: &[u8]) -> std::result::Result<Option<Bytes>, TxError>;
    fn put(
        &mut self,
        space: usize,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> std::result::Result<(), TxError>;
}

/// The durable state of one custodyd, or of all replicas sharing a backend.
/// Cheap to clone: clones share the backend.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    turns: Arc<claim::Turns>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend.name())
            .finish()
    }
}

impl Store {
    /// Opens (or makes) the sled database at `path`, its page cache bounded
    /// by `cache_bytes`.
    pub fn open_sled(path: &Path, cache_bytes: u64) -> Result<Store> {
        sled_backend::SledBackend::open(path, cache_bytes).map(Store::with)
    }

    /// A store over an already open sled database (tests, offline tools).
    pub fn from_sled(db: sled::Db) -> Store {
        Store::with(sled_backend::SledBackend::new(db))
    }

    /// Connects to the etcd cluster `config` names (mTLS). Fails with
    /// [`StoreError::Unavailable`], naming the endpoints, if no member
    /// answers within `config.request_timeout`.
    pub fn open_etcd(config: &EtcdConfig) -> Result<Store> {
        etcd::EtcdBackend::open(config).map(Store::with)
    }

    fn with(backend: impl Backend + 'static) -> Store {
        Store {
            backend: Arc::new(backend),
            turns: Arc::default(),
        }
    }

    /// Which backend holds the state ("sled", "etcd"), for logs and metrics.
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// The keyspace `name`, made if it does not exist.
    pub fn keyspace(&self, name: &str) -> Result<Keyspace> {
        self.backend.open_space(name)?;
        Ok(self.handle(name))
    }

    /// The keyspace `name` if it exists; never makes one (for read-only
    /// checks, which must leave the store as they found it).
    pub fn existing_keyspace(&self, name: &str) -> Result<Option<Keyspace>> {
        Ok(self
            .backend
            .space_names()?
            .iter()
            .any(|existing| existing == name)
            .then(|| self.handle(name)))
    }

    /// The names of every keyspace in the store.
    pub fn keyspace_names(&self) -> Result<Vec<String>> {
        self.backend.space_names()
    }

    fn handle(&self, name: &str) -> Keyspace {
        Keyspace {
            backend: self.backend.clone(),
            name: Arc::from(name),
        }
    }

    /// Runs `body` over `spaces` as one serializable transaction: its writes
    /// all land or none does, and none lands if another writer changed what
    /// it read. The backend runs `body` again after a conflict, so `body`
    /// must do nothing but read and write through `tx`. Writes are durable
    /// as the backend's plain writes are (sled: after a flush).
    pub fn transaction<T>(
        &self,
        spaces: &[&Keyspace],
        body: impl Fn(&mut Tx<'_>) -> std::result::Result<T, TxError>,
    ) -> Result<T> {
        let names: Vec<Arc<str>> = spaces.iter().map(|space| space.name.clone()).collect();
        let mut output = None;
        self.backend.transact(&names, &mut |ops| {
            let mut tx = Tx {
                ops,
                spaces: &names,
            };
            output = Some(body(&mut tx)?);
            Ok(())
        })?;
        output.ok_or_else(|| StoreError::Failed("transaction committed without a result".into()))
    }

    /// Makes every write so far durable (sled: its log on disk; etcd: every
    /// acknowledged write already is).
    pub fn flush(&self) -> Result<()> {
        self.backend.flush()
    }

    /// [`Store::flush`] without blocking the caller's thread.
    pub async fn flush_async(&self) -> Result<()> {
        self.backend.flush_async().await
    }

    /// Takes `name` for `holder` if nobody holds it; else
    /// [`ClaimError::Held`] names the current holder. The claim lasts until
    /// it is dropped, or (etcd) until its lease of `ttl` can no longer be
    /// renewed: a holder that dies without releasing it loses it after
    /// `ttl` (rounded up to whole seconds and to etcd's minimum). On sled,
    /// claims are process-local and `ttl` does not apply.
    pub fn claim(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> std::result::Result<Claim, ClaimError> {
        self.backend.claim(name, holder, ttl)
    }

    /// Waits until `name` is free and takes it for `holder` (as
    /// [`Store::claim`]); fails only if the store does. The tasks of one
    /// `Store` (and its clones) campaign for a name one at a time, in
    /// arrival order.
    pub async fn campaign(&self, name: &str, holder: &str, ttl: Duration) -> Result<Claim> {
        let turn = self.turns.take(name).await;
        Ok(self
            .backend
            .campaign(name, holder, ttl)
            .await?
            .with_turn(turn))
    }

    /// The claims held now whose names start with `prefix`, as (name,
    /// holder) in name order: who else is alive (e.g. `replica/`).
    pub fn holders(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        self.backend.holders(prefix)
    }
}

/// A transaction's view: reads see the transaction's own writes.
pub struct Tx<'a> {
    ops: &'a mut dyn TxOps,
    spaces: &'a [Arc<str>],
}

impl Tx<'_> {
    fn index(&self, space: &Keyspace) -> std::result::Result<usize, TxError> {
        self.spaces
            .iter()
            .position(|name| *name == space.name)
            .ok_or_else(|| TxError(TxFault::Undeclared(space.name.to_string())))
    }

    /// The value of `key` in `space`.
    pub fn get(
        &mut self,
        space: &Keyspace,
        key: impl AsRef<[u8]>,
    ) -> std::result::Result<Option<Bytes>, TxError> {
        let index = self.index(space)?;
        self.ops.get(index, key.as_ref())
    }

    /// Sets `key` in `space` to `value`.
    pub fn insert(
        &mut self,
        space: &Keyspace,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> std::result::Result<(), TxError> {
        let index = self.index(space)?;
        self.ops.put(index, key.as_ref(), Some(value.as_ref()))
    }

    /// Removes `key` from `space` (nothing if it is absent).
    pub fn remove(
        &mut self,
        space: &Keyspace,
        key: impl AsRef<[u8]>,
    ) -> std::result::Result<(), TxError> {
        let index = self.index(space)?;
        self.ops.put(index, key.as_ref(), None)
    }

    /// Writes every entry of `batch` (its keyspaces must be declared).
    pub fn apply(&mut self, batch: &Batch) -> std::result::Result<(), TxError> {
        for write in &batch.writes {
            let index = self
                .spaces
                .iter()
                .position(|name| *name == write.space)
                .ok_or_else(|| TxError(TxFault::Undeclared(write.space.to_string())))?;
            self.ops.put(index, &write.key, write.value.as_deref())?;
        }
        Ok(())
    }
}

/// Writes to apply at once, all or none; may span keyspaces.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    writes: Vec<Write>,
}

impl Batch {
    /// Sets `key` in `space` to `value` when the batch is applied.
    pub fn insert(&mut self, space: &Keyspace, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.writes.push(Write {
            space: space.name.clone(),
            key: key.as_ref().to_vec(),
            value: Some(value.as_ref().to_vec()),
        });
    }

    /// Removes `key` from `space` when the batch is applied.
    pub fn remove(&mut self, space: &Keyspace, key: impl AsRef<[u8]>) {
        self.writes.push(Write {
            space: space.name.clone(),
            key: key.as_ref().to_vec(),
            value: None,
        });
    }
}

/// One named, ordered map of the store. Cheap to clone.
#[derive(Clone)]
pub struct Keyspace {
    backend: Arc<dyn Backend>,
    name: Arc<str>,
}

impl std::fmt::Debug for Keyspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Keyspace").field(&self.name).finish()
    }
}

/// How many entries an iterator fetches from the backend at a time.
const PAGE: usize = 256;

impl Keyspace {
    /// The keyspace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The value of `key`.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>> {
        self.backend.get(&self.name, key.as_ref())
    }

    /// Whether `key` has a value.
    pub fn contains_key(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        Ok(self.get(key)?.is_some())
    }

    /// Sets `key` to `value`.
    pub fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<()> {
        let mut batch = Batch::default();
        batch.insert(self, key, value);
        self.apply_batch(batch)
    }

    /// Removes `key` (nothing if it is absent).
    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<()> {
        let mut batch = Batch::default();
        batch.remove(self, key);
        self.apply_batch(batch)
    }

    /// Applies `batch` atomically (it may name other keyspaces too).
    pub fn apply_batch(&self, batch: Batch) -> Result<()> {
        if batch.writes.is_empty() {
            return Ok(());
        }
        self.backend.write(batch.writes)
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> Iter {
        self.range::<&[u8], _>(..)
    }

    /// Every entry, last key first.
    pub fn iter_rev(&self) -> Iter {
        self.range_rev::<&[u8], _>(..)
    }

    /// The entries whose keys start with `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Iter {
        let prefix = prefix.as_ref().to_vec();
        let end = prefix_end(&prefix);
        Iter::new(
            self.clone(),
            Bound::Included(prefix),
            end.map_or(Bound::Unbounded, Bound::Excluded),
            false,
        )
    }

    /// The entries with keys in `range`, in key order.
    pub fn range<K: AsRef<[u8]>, R: RangeBounds<K>>(&self, range: R) -> Iter {
        Iter::new(
            self.clone(),
            owned(range.start_bound()),
            owned(range.end_bound()),
            false,
        )
    }

    /// The entries with keys in `range`, last key first.
    pub fn range_rev<K: AsRef<[u8]>, R: RangeBounds<K>>(&self, range: R) -> Iter {
        Iter::new(
            self.clone(),
            owned(range.start_bound()),
            owned(range.end_bound()),
            true,
        )
    }

    /// The entry with the smallest key.
    pub fn first(&self) -> Result<Option<(Bytes, Bytes)>> {
        self.iter().next().transpose()
    }

    /// The entry with the largest key.
    pub fn last(&self) -> Result<Option<(Bytes, Bytes)>> {
        self.iter_rev().next().transpose()
    }

    /// How many entries the keyspace holds (a scan on sled: not per request).
    pub fn len(&self) -> Result<usize> {
        self.backend.count(&self.name)
    }

    /// Whether the keyspace holds nothing.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.first()?.is_none())
    }
}

fn owned<K: AsRef<[u8]>>(bound: Bound<&K>) -> Bound<Bytes> {
    match bound {
        Bound::Included(key) => Bound::Included(key.as_ref().to_vec()),
        Bound::Excluded(key) => Bound::Excluded(key.as_ref().to_vec()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// The smallest key greater than every key starting with `prefix` (`None`:
/// no such key, the prefix is all 0xff).
fn prefix_end(prefix: &[u8]) -> Option<Bytes> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Entries of a keyspace in order, fetched a page at a time. Each page is
/// read at once; a write between pages may or may not be seen, as with a
/// sled iterator.
pub struct Iter {
    space: Keyspace,
    from: Bound<Bytes>,
    to: Bound<Bytes>,
    reverse: bool,
    page: VecDeque<(Bytes, Bytes)>,
    done: bool,
}

impl Iter {
    fn new(space: Keyspace, from: Bound<Bytes>, to: Bound<Bytes>, reverse: bool) -> Iter {
        Iter {
            space,
            from,
            to,
            reverse,
            page: VecDeque::new(),
            done: false,
        }
    }

    /// The keys alone.
    pub fn keys(self) -> impl Iterator<Item = Result<Bytes>> {
        self.map(|item| item.map(|(key, _)| key))
    }

    /// The values alone.
    pub fn values(self) -> impl Iterator<Item = Result<Bytes>> {
        self.map(|item| item.map(|(_, value)| value))
    }

    fn fill(&mut self) -> Result<()> {
        let page = self.space.backend.scan(
            &self.space.name,
            as_ref(&self.from),
            as_ref(&self.to),
            self.reverse,
            PAGE,
        )?;
        if page.len() < PAGE {
            self.done = true;
        }
        if let Some((key, _)) = page.last() {
            // The next page starts after this one's last key.
            if self.reverse {
                self.to = Bound::Excluded(key.clone());
            } else {
                self.from = Bound::Excluded(key.clone());
            }
        }
        self.page.extend(page);
        Ok(())
    }
}

fn as_ref(bound: &Bound<Bytes>) -> Bound<&[u8]> {
    match bound {
        Bound::Included(key) => Bound::Included(key),
        Bound::Excluded(key) => Bound::Excluded(key),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl Iterator for Iter {
    type Item = Result<(Bytes, Bytes)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.page.is_empty() && !self.done {
            if let Err(e) = self.fill() {
                self.done = true;
                return Some(Err(e));
            }
        }
        self.page.pop_front().map(Ok)
    }
}

/// A transaction body as a backend runs it.
type BodyFn<'a> = dyn FnMut(&mut dyn TxOps) -> std::result::Result<(), TxError> + 'a;

/// Lets a backend run a transaction body that takes `&mut dyn TxOps` from
/// inside a closure its own API requires to be `Fn`.
struct Body<'a, 'b> {
    inner: RefCell<&'a mut BodyFn<'b>>,
}

impl<'a, 'b> Body<'a, 'b> {
    fn new(body: &'a mut BodyFn<'b>) -> Self {
        Body {
            inner: RefCell::new(body),
        }
    }

    fn run(&self, ops: &mut dyn TxOps) -> std::result::Result<(), TxError> {
        (self.inner.borrow_mut())(ops)
    }
}
