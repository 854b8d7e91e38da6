//! The replicated backend: etcd v3, shared by every custodyd replica.
//!
//! **Layout.** Everything lives under a prefix (default `custody/`):
//! - `{prefix}s/{space}/{key}`: the entries of keyspace `space` (its name
//!   with `%` and `/` percent-escaped, so no keyspace's range holds another's;
//!   `key` as it is);
//! - `{prefix}spaces/{space}`: the registry of keyspaces, written by
//!   [`Backend::open_space`] only, so that listing or checking keyspaces
//!   never makes one;
//! - `{prefix}claims/{name}`: exclusive claims, bound to a lease (`claim.rs`).
//!
//! **Writes.** A batch is one etcd `Txn` without compares, so it lands whole
//! or not at all. A transaction reads at one revision (pinned by its first
//! read), buffers its writes, and commits them in one `Txn` whose compares
//! check that every key it read still has the `mod_revision` it had then
//! (`txn.rs`). An acknowledged write is committed by a quorum and on disk
//! on each of its members, so [`Backend::flush`] has nothing to do.
//!
//! **An answer that never came.** `Unavailable` from a write or a commit
//! means its outcome is unknown: it may have been committed before the
//! member or the connection went away. Only a request that was certainly
//! never sent (the connection could not be made, TLS included, within half
//! the request deadline) is retried on another member; reads are retried
//! on another member whatever the failure.
//!
//! **Limits custody depends on** (etcd's defaults, which the cluster must
//! keep or raise, and [`EtcdConfig`] must match):
//! - `--max-txn-ops` (128): the writes of one batch or transaction, and the
//!   keys one transaction reads, each at most this many; a batch is never
//!   split (it would no longer be atomic), so a bigger one is refused with
//!   [`StoreError::Failed`] naming the flag.
//! - `--max-request-bytes` (1.5 MiB): one batch or commit, encoded.
//! - `--auto-compaction-*`: a transaction whose pinned revision is compacted
//!   away starts over at the newest, so compaction only costs a retry.
//! - A reverse scan (`iter_rev`, `last`, `range_rev`) makes etcd read the
//!   whole remaining range for each page (it applies `limit` only after
//!   sorting, and only ascending key order comes unsorted): keep hot "newest
//!   entry" lookups on a head key rather than on `last()` of a long
//!   keyspace. Forward scans read a page at a time.
//!
//! **Threads.** The API is synchronous and the etcd client async: the
//! backend owns a small tokio runtime (`custody-etcd` threads), runs every
//! call there and waits for the answer on a plain channel (inside
//! `block_in_place` on a multi-thread runtime's worker).

use std::collections::HashSet;
use std::future::Future;
use std::ops::Bound;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use crate::claim::{Claim, ClaimError};
use crate::{Backend, BodyFn, Bytes, Result, StoreError, Write, prefix_end};

mod bridge;
mod claim;
mod members;
mod txn;

use bridge::{Bridge, blocking, stopped};
use members::{Members, RpcError};
use pb::etcdserverpb::kv_client::KvClient;
use pb::etcdserverpb::{
    Compare, PutRequest, RangeRequest, RequestOp, TxnRequest, compare, range_request, request_op,
};

/// The etcd v3 API, generated from `proto/` (see `proto/README.md`).
#[allow(
    missing_docs,
    unreachable_pub,
    dead_code,
    clippy::all,
    clippy::pedantic,
    reason = "generated code"
)]
pub(crate) mod pb {
    pub(crate) mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    pub(crate) mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub(crate) mod authpb {
        tonic::include_proto!("authpb");
    }
}

/// How to reach an etcd cluster: with mTLS, always.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs of the members (`https://host:port`; a bare `host:port`
    /// means https). Calls go to one member and fail over to the others.
    pub endpoints: Vec<String>,
    /// Prefix of every key custody writes (default `custody/`): several
    /// deployments may share a cluster under distinct prefixes.
    pub prefix: String,
    /// The CA certificate (PEM) that signed the members' certificates.
    pub ca: PathBuf,
    /// custodyd's client certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM); read into a zeroizing buffer, never logged.
    pub key: PathBuf,
    /// Deadline of every request to the cluster, failovers included.
    pub request_timeout: Duration,
    /// The cluster's `--max-txn-ops` (etcd's default: 128).
    pub max_txn_ops: usize,
    /// The cluster's `--max-request-bytes` (etcd's default: 1.5 MiB).
    pub max_request_bytes: usize,
}

impl EtcdConfig {
    /// The default key prefix.
    pub const DEFAULT_PREFIX: &str = "custody/";
    /// The default request deadline.
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
    /// etcd's default `--max-txn-ops`.
    pub const DEFAULT_MAX_TXN_OPS: usize = 128;
    /// etcd's default `--max-request-bytes`.
    pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1_572_864;

    /// A configuration with the defaults for everything but the members and
    /// the TLS files.
    pub fn new(endpoints: Vec<String>, ca: PathBuf, cert: PathBuf, key: PathBuf) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: EtcdConfig::DEFAULT_PREFIX.to_string(),
            ca,
            cert,
            key,
            request_timeout: EtcdConfig::DEFAULT_REQUEST_TIMEOUT,
            max_txn_ops: EtcdConfig::DEFAULT_MAX_TXN_OPS,
            max_request_bytes: EtcdConfig::DEFAULT_MAX_REQUEST_BYTES,
        }
    }
}

/// What the backend's tasks share: the members and the key layout.
pub(crate) struct Shared {
    members: Members,
    prefix: Vec<u8>,
    max_txn_ops: usize,
    max_request_bytes: usize,
}

impl Shared {
    fn kv(&self, channel: tonic::transport::Channel) -> KvClient<tonic::transport::Channel> {
        KvClient::new(channel).max_decoding_message_size(members::MAX_RESPONSE_BYTES)
    }

    fn under(&self, parts: &[&[u8]]) -> Bytes {
        let mut key = self.prefix.clone();
        for part in parts {
            key.extend_from_slice(part);
        }
        key
    }

    /// The prefix of every entry of `space`.
    fn space_prefix(&self, space: &str) -> Bytes {
        let mut escaped = Vec::with_capacity(space.len());
        for byte in space.bytes() {
            match byte {
                b'%' => escaped.extend_from_slice(b"%25"),
                b'/' => escaped.extend_from_slice(b"%2F"),
                other => escaped.push(other),
            }
        }
        self.under(&[b"s/", &escaped, b"/"])
    }

    fn data_key(&self, space: &str, key: &[u8]) -> Bytes {
        let mut full = self.space_prefix(space);
        full.extend_from_slice(key);
        full
    }

    fn registry_prefix(&self) -> Bytes {
        self.under(&[b"spaces/"])
    }

    fn claim_key(&self, name: &str) -> Bytes {
        self.under(&[b"claims/", name.as_bytes()])
    }

    /// Refuses a transaction over the cluster's limits, naming the limit.
    fn check_limits(&self, request: &TxnRequest) -> Result<()> {
        let ops = request.success.len().max(request.compare.len());
        if ops > self.max_txn_ops {
            return Err(StoreError::Failed(format!(
                "an etcd transaction of {} writes and {} compared keys is over the cluster's \
                 --max-txn-ops ({}); a batch is applied in one transaction and never split",
                request.success.len(),
                request.compare.len(),
                self.max_txn_ops
            )));
        }
        let bytes = prost::Message::encoded_len(request);
        if bytes > self.max_request_bytes {
            return Err(StoreError::Failed(format!(
                "an etcd transaction of {bytes} bytes is over the cluster's --max-request-bytes ({})",
                self.max_request_bytes
            )));
        }
        Ok(())
    }

    /// Sends `request` (to another member only if it was certainly never
    /// sent to the first).
    async fn txn(&self, what: &str, request: TxnRequest) -> Result<pb::etcdserverpb::TxnResponse> {
        self.check_limits(&request)?;
        self.members
            .call(what, false, |channel| {
                let request = request.clone();
                let mut kv = self.kv(channel);
                async move { kv.txn(request).await.map(tonic::Response::into_inner) }
            })
            .await
            .map_err(StoreError::from)
    }

    async fn range(&self, request: RangeRequest) -> std::result::Result<RangeAnswer, RpcError> {
        let response = self
            .members
            .call("range", true, |channel| {
                let request = request.clone();
                let mut kv = self.kv(channel);
                async move { kv.range(request).await.map(tonic::Response::into_inner) }
            })
            .await?;
        Ok(RangeAnswer {
            revision: response.header.map_or(0, |header| header.revision),
            count: response.count,
            kvs: response.kvs,
        })
    }
}

struct RangeAnswer {
    revision: i64,
    count: i64,
    kvs: Vec<pb::mvccpb::KeyValue>,
}

fn put(key: Bytes, value: Bytes) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key,
            value,
            ..PutRequest::default()
        })),
    }
}

fn delete(key: Bytes) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            pb::etcdserverpb::DeleteRangeRequest {
                key,
                ..Default::default()
            },
        )),
    }
}

fn compare(key: Bytes, target: compare::CompareTarget, value: compare::TargetUnion) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: target as i32,
        key,
        target_union: Some(value),
        range_end: Vec::new(),
    }
}

/// The first key after `key` in etcd's byte order.
fn successor(mut key: Bytes) -> Bytes {
    key.push(0);
    key
}

pub(crate) struct EtcdBackend {
    bridge: Arc<Bridge>,
    shared: Arc<Shared>,
    /// Keyspaces known to be in the registry.
    known: RwLock<HashSet<String>>,
}

impl EtcdBackend {
    pub(crate) fn open(config: &EtcdConfig) -> Result<EtcdBackend> {
        if config.endpoints.is_empty() {
            return Err(StoreError::Failed("no etcd endpoints configured".into()));
        }
        if config.request_timeout.is_zero() {
            return Err(StoreError::Failed("etcd request_timeout is zero".into()));
        }
        let bridge = Bridge::new()?;
        let members = {
            // The channels' background tasks belong on the backend's runtime.
            let _entered = bridge.handle().ok_or_else(stopped)?.enter();
            Members::connect_lazy(config)?
        };
        let shared = Arc::new(Shared {
            members,
            prefix: config.prefix.as_bytes().to_vec(),
            max_txn_ops: config.max_txn_ops,
            max_request_bytes: config.max_request_bytes,
        });
        let probe = shared.clone();
        bridge
            .wait(async move { probe.members.probe().await })
            .map_err(|e| match e {
                StoreError::Unavailable(why) => StoreError::Unavailable(format!(
                    "no etcd member answered within {:?} ({}): {why}",
                    config.request_timeout,
                    config.endpoints.join(", ")
                )),
                other => other,
            })?;
        Ok(EtcdBackend {
            bridge: Arc::new(bridge),
            shared,
            known: RwLock::new(HashSet::new()),
        })
    }

    /// Runs `work` with the shared state on the backend's runtime.
    fn with_shared<T: Send + 'static, F>(&self, work: impl FnOnce(Arc<Shared>) -> F) -> Result<T>
    where
        F: Future<Output = Result<T>> + Send + 'static,
    {
        self.bridge.wait(work(self.shared.clone()))
    }
}

impl Backend for EtcdBackend {
    fn name(&self) -> &'static str {
        "etcd"
    }

    fn open_space(&self, space: &str) -> Result<()> {
        if self
            .known
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(space)
        {
            return Ok(());
        }
        let owned = space.to_string();
        self.with_shared(|shared| async move {
            let mut key = shared.registry_prefix();
            key.extend_from_slice(owned.as_bytes());
            // Put if absent: replicas opening the same keyspace leave the
            // registry (and the revision) as it was.
            let request = TxnRequest {
                compare: vec![compare(
                    key.clone(),
                    compare::CompareTarget::Create,
                    compare::TargetUnion::CreateRevision(0),
                )],
                success: vec![put(key, owned.into_bytes())],
                failure: Vec::new(),
            };
            shared.txn("register keyspace", request).await.map(drop)
        })?;
        self.known
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(space.to_string());
        Ok(())
    }

    fn space_names(&self) -> Result<Vec<String>> {
        self.with_shared(|shared| async move {
            let key = shared.registry_prefix();
            let range_end = prefix_end(&key).unwrap_or_default();
            let answer = shared
                .range(RangeRequest {
                    key: key.clone(),
                    range_end,
                    keys_only: true,
                    ..RangeRequest::default()
                })
                .await?;
            Ok(answer
                .kvs
                .into_iter()
                .map(|kv| String::from_utf8_lossy(&kv.key[key.len()..]).into_owned())
                .collect())
        })
    }

    fn get(&self, space: &str, key: &[u8]) -> Result<Option<Bytes>> {
        let key = self.shared.data_key(space, key);
        self.with_shared(|shared| async move {
            let answer = shared
                .range(RangeRequest {
                    key,
                    ..RangeRequest::default()
                })
                .await?;
            Ok(answer.kvs.into_iter().next().map(|kv| kv.value))
        })
    }

    fn scan(
        &self,
        space: &str,
        from: Bound<&[u8]>,
        to: Bound<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        let base = self.shared.space_prefix(space);
        let start = match from {
            Bound::Included(key) => self.shared.data_key(space, key),
            Bound::Excluded(key) => successor(self.shared.data_key(space, key)),
            Bound::Unbounded => base.clone(),
        };
        let end = match to {
            Bound::Included(key) => successor(self.shared.data_key(space, key)),
            Bound::Excluded(key) => self.shared.data_key(space, key),
            // The space prefix ends in '/', so it has an end.
            Bound::Unbounded => prefix_end(&base).unwrap_or_default(),
        };
        if start >= end || limit == 0 {
            return Ok(Vec::new());
        }
        // etcd answers in ascending key order unsorted; asking it to sort
        // (even ascending) makes it read the whole range first.
        let order = if reverse {
            range_request::SortOrder::Descend
        } else {
            range_request::SortOrder::None
        };
        let skip = base.len();
        self.with_shared(move |shared| async move {
            let answer = shared
                .range(RangeRequest {
                    key: start,
                    range_end: end,
                    limit: i64::try_from(limit).unwrap_or(i64::MAX),
                    sort_order: order as i32,
                    sort_target: range_request::SortTarget::Key as i32,
                    ..RangeRequest::default()
                })
                .await?;
            Ok(answer
                .kvs
                .into_iter()
                .map(|kv| (kv.key[skip..].to_vec(), kv.value))
                .collect())
        })
    }

    fn count(&self, space: &str) -> Result<usize> {
        let key = self.shared.space_prefix(space);
        let range_end = prefix_end(&key).unwrap_or_default();
        self.with_shared(|shared| async move {
            let answer = shared
                .range(RangeRequest {
                    key,
                    range_end,
                    count_only: true,
                    ..RangeRequest::default()
                })
                .await?;
            usize::try_from(answer.count)
                .map_err(|_| StoreError::Failed(format!("etcd counted {} keys", answer.count)))
        })
    }

    fn write(&self, writes: Vec<Write>) -> Result<()> {
        // etcd refuses a transaction that names a key twice: the last write
        // to each key is the one that counts.
        let mut last = std::collections::BTreeMap::new();
        for write in writes {
            last.insert(self.shared.data_key(&write.space, &write.key), write.value);
        }
        let success = last
            .into_iter()
            .map(|(key, value)| match value {
                Some(value) => put(key, value),
                None => delete(key),
            })
            .collect();
        let request = TxnRequest {
            compare: Vec::new(),
            success,
            failure: Vec::new(),
        };
        self.with_shared(|shared| async move { shared.txn("batch", request).await.map(drop) })
    }

    fn transact(&self, spaces: &[Arc<str>], body: &mut BodyFn<'_>) -> Result<()> {
        txn::transact(self, spaces, body)
    }

    fn flush(&self) -> Result<()> {
        // A write etcd acknowledged is committed by a quorum and on disk on
        // each of its members: nothing is left to flush.
        Ok(())
    }

    fn flush_async(&self) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
        Box::pin(async { Ok(()) })
    }

    fn claim(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> std::result::Result<Claim, ClaimError> {
        claim::claim(self, name, holder, ttl)
    }

    fn campaign<'a>(
        &'a self,
        name: &'a str,
        holder: &'a str,
        ttl: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<Claim>> + Send + 'a>> {
        Box::pin(claim::campaign(self, name, holder, ttl))
    }

    fn holders(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let base = self.shared.claim_key("");
        let start = self.shared.claim_key(prefix);
        let end = prefix_end(&start).unwrap_or_else(|| prefix_end(&base).unwrap_or_default());
        let skip = base.len();
        self.with_shared(move |shared| async move {
            let answer = shared
                .range(RangeRequest {
                    key: start,
                    range_end: end,
                    ..RangeRequest::default()
                })
                .await?;
            Ok(answer
                .kvs
                .into_iter()
                .map(|kv| {
                    (
                        String::from_utf8_lossy(&kv.key[skip..]).into_owned(),
                        String::from_utf8_lossy(&kv.value).into_owned(),
                    )
                })
                .collect())
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails by panicking")]
mod tests {
    use super::*;
    use crate::Store;

    fn layout(prefix: &str) -> Shared {
        Shared {
            members: Members::empty(),
            prefix: prefix.as_bytes().to_vec(),
            max_txn_ops: EtcdConfig::DEFAULT_MAX_TXN_OPS,
            max_request_bytes: EtcdConfig::DEFAULT_MAX_REQUEST_BYTES,
        }
    }

    #[test]
    fn keyspaces_never_share_a_range() {
        let shared = layout("custody/");
        assert_eq!(shared.data_key("audit", b"k"), b"custody/s/audit/k");
        // Space "a/b" key "c" and space "a" key "b/c" are different keys,
        // and neither space's range holds the other's.
        let nested = shared.data_key("a/b", b"c");
        let plain = shared.data_key("a", b"b/c");
        assert_ne!(nested, plain);
        let range = |space: &str| {
            let start = shared.space_prefix(space);
            let end = prefix_end(&start).unwrap();
            (start, end)
        };
        let (start, end) = range("a");
        assert!(!(start <= nested && nested < end));
        let (start, end) = range("a/b");
        assert!(!(start <= plain && plain < end));
        assert_eq!(shared.data_key("100%", b"k"), b"custody/s/100%25/k");
        assert_eq!(shared.claim_key("engine"), b"custody/claims/engine");
        assert_eq!(shared.registry_prefix(), b"custody/spaces/");
    }

    fn refused(config: &EtcdConfig) -> String {
        match Store::open_etcd(config) {
            Err(StoreError::Failed(why)) => why,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_configurations_are_refused_before_any_connection() {
        let dir = std::env::temp_dir().join(format!("custody-etcd-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["ca.pem", "client.pem", "client.key"] {
            std::fs::write(dir.join(file), "not PEM").unwrap();
        }
        let config = |endpoints: &[&str]| {
            EtcdConfig::new(
                endpoints.iter().map(|e| e.to_string()).collect(),
                dir.join("ca.pem"),
                dir.join("client.pem"),
                dir.join("client.key"),
            )
        };
        assert!(refused(&config(&[])).contains("no etcd endpoints"));
        assert!(refused(&config(&["http://127.0.0.1:2379"])).contains("mTLS only"));
        let mut missing = config(&["127.0.0.1:2379"]);
        missing.key = dir.join("absent.key");
        let why = refused(&missing);
        assert!(why.contains("absent.key"), "{why}");
        let mut zero = config(&["127.0.0.1:2379"]);
        zero.request_timeout = Duration::ZERO;
        assert!(refused(&zero).contains("request_timeout"));
        // The key's bytes never show in the configuration's Debug.
        let key = "-----BEGIN PRIVATE KEY-----secret";
        std::fs::write(dir.join("client.key"), key).unwrap();
        assert!(!format!("{:?}", config(&["127.0.0.1:2379"])).contains("secret"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
