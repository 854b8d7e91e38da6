//! Claims on etcd: `{prefix}claims/{name}` = holder, created only if absent
//! (`create_revision == 0`), bound to a lease that a task on the backend's
//! runtime keeps alive. The key lives exactly as long as the lease, so at
//! most one holder has it while the lease lives.
//!
//! The holder's view is conservative: each grant or renewal counts from the
//! moment it was *sent*, so the claim stops counting locally no later than
//! etcd expires the lease (etcd counts from when it received the request,
//! and only ever extends leases on a leader change). etcd rounds short TTLs
//! up to its minimum (about 1.5 × the election timeout); the TTL it grants
//! is the one used.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;

use super::pb::etcdserverpb::lease_client::LeaseClient;
use super::pb::etcdserverpb::watch_client::WatchClient;
use super::pb::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest, WatchCreateRequest, WatchRequest, compare, request_op, response_op,
    watch_create_request, watch_request,
};
use super::pb::mvccpb::event::EventType;
use super::{EtcdBackend, Shared};
use crate::claim::{Claim, ClaimError, ClaimState};
use crate::{Result, StoreError};

/// An attempt's outcome.
enum Attempt {
    Taken {
        lease: i64,
        expires: Instant,
    },
    /// Held by `holder`, as of store revision `revision`.
    Held {
        holder: String,
        revision: i64,
    },
}

/// etcd leases count in whole seconds.
fn ttl_seconds(ttl: Duration) -> i64 {
    i64::try_from(
        ttl.as_secs()
            .saturating_add(u64::from(ttl.subsec_nanos() > 0)),
    )
    .unwrap_or(i64::MAX)
    .max(1)
}

/// When a lease granted `ttl` seconds at `sent` runs out (at once if that
/// is beyond what the clock can say).
fn lasts(sent: Instant, ttl: i64) -> Instant {
    sent.checked_add(Duration::from_secs(ttl.unsigned_abs()))
        .unwrap_or(sent)
}

async fn try_claim(shared: Arc<Shared>, key: Vec<u8>, holder: String, ttl: i64) -> Result<Attempt> {
    let sent = Instant::now();
    let granted = shared
        .members
        .call("lease grant", true, |channel| async move {
            LeaseClient::new(channel)
                .lease_grant(LeaseGrantRequest { ttl, id: 0 })
                .await
                .map(tonic::Response::into_inner)
        })
        .await?;
    if !granted.error.is_empty() || granted.ttl <= 0 {
        return Err(StoreError::Failed(format!(
            "etcd lease grant: {}",
            granted.error
        )));
    }
    let lease = granted.id;
    let expires = lasts(sent, granted.ttl);
    let request = TxnRequest {
        compare: vec![super::compare(
            key.clone(),
            compare::CompareTarget::Create,
            compare::TargetUnion::CreateRevision(0),
        )],
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: key.clone(),
                value: holder.into_bytes(),
                lease,
                ..PutRequest::default()
            })),
        }],
        failure: vec![RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key,
                ..RangeRequest::default()
            })),
        }],
    };
    // Safe to send again: a second try finds the key made by the first, and
    // its lease says whose it is.
    let response = shared
        .members
        .call("claim", true, |channel| {
            let request = request.clone();
            let mut kv = shared.kv(channel);
            async move { kv.txn(request).await.map(tonic::Response::into_inner) }
        })
        .await?;
    if response.succeeded {
        return Ok(Attempt::Taken { lease, expires });
    }
    let current = response
        .responses
        .into_iter()
        .find_map(|op| match op.response {
            Some(response_op::Response::ResponseRange(range)) => range.kvs.into_iter().next(),
            _ => None,
        });
    match current {
        Some(kv) if kv.lease == lease => Ok(Attempt::Taken { lease, expires }),
        found => {
            revoke(&shared, lease).await;
            Ok(Attempt::Held {
                holder: found.map_or_else(String::new, |kv| {
                    String::from_utf8_lossy(&kv.value).into_owned()
                }),
                revision: response.header.map_or(0, |header| header.revision),
            })
        }
    }
}

/// Revokes `lease` (and so deletes the keys bound to it), best effort.
async fn revoke(shared: &Shared, lease: i64) {
    let revoked = shared
        .members
        .call("lease revoke", true, |channel| async move {
            LeaseClient::new(channel)
                .lease_revoke(LeaseRevokeRequest { id: lease })
                .await
                .map(drop)
        })
        .await;
    if let Err(e) = revoked {
        tracing::debug!(lease, error = ?e, "etcd lease not revoked; it will expire");
    }
}

/// One renewal: the remaining TTL etcd granted (0 or less: the lease is
/// gone).
async fn renew(shared: &Shared, lease: i64) -> std::result::Result<i64, super::RpcError> {
    shared
        .members
        .call("lease keep-alive", true, |channel| async move {
            let mut answers = LeaseClient::new(channel)
                .lease_keep_alive(tokio_stream::iter([LeaseKeepAliveRequest { id: lease }]))
                .await?
                .into_inner();
            match answers.message().await? {
                Some(answer) => Ok(answer.ttl),
                None => Err(tonic::Status::unavailable("keep-alive stream ended")),
            }
        })
        .await
}

/// Keeps `lease` alive until the claim is dropped (which aborts this task)
/// or the lease can no longer be renewed in time.
async fn keep_alive(shared: Arc<Shared>, lease: i64, ttl: i64, state: Arc<ClaimState>) {
    let every = Duration::from_secs(ttl.unsigned_abs()) / 3;
    loop {
        let Some(expires) = state.expires() else {
            return;
        };
        let now = Instant::now();
        if now >= expires {
            break;
        }
        tokio::time::sleep(every.min(expires - now)).await;
        let sent = Instant::now();
        if sent >= expires {
            break;
        }
        match tokio::time::timeout(expires - sent, renew(&shared, lease)).await {
            Ok(Ok(remaining)) if remaining > 0 => {
                state.renewed(lasts(sent, remaining));
            }
            Ok(Ok(_)) => {
                tracing::warn!(lease, "etcd lease expired: claim lost");
                state.lose();
                return;
            }
            // Try again at the next tick, while the lease still lives.
            Ok(Err(e)) => tracing::debug!(lease, error = ?e, "etcd lease renewal failed"),
            Err(_) => {}
        }
    }
    tracing::warn!(lease, "etcd lease not renewed in time: claim lost");
    state.lose();
}

/// The claim for a lease just taken: its keep-alive started, its release
/// revoking the lease.
fn hold(
    backend: &EtcdBackend,
    name: &str,
    holder: &str,
    lease: i64,
    ttl: i64,
    expires: Instant,
) -> Result<Claim> {
    let state = ClaimState::new(Some(expires));
    let handle = backend.bridge.handle().ok_or_else(super::stopped)?;
    let task = handle.spawn(keep_alive(
        backend.shared.clone(),
        lease,
        ttl,
        state.clone(),
    ));
    let bridge = backend.bridge.clone();
    let shared = backend.shared.clone();
    Ok(Claim::new(
        name,
        holder,
        state,
        Box::new(move || {
            task.abort();
            // Bounded by the request deadline; if it fails the lease expires.
            let _ = bridge.wait(async move {
                revoke(&shared, lease).await;
                Ok(())
            });
        }),
    ))
}

pub(super) fn claim(
    backend: &EtcdBackend,
    name: &str,
    holder: &str,
    ttl: Duration,
) -> std::result::Result<Claim, ClaimError> {
    let ttl = ttl_seconds(ttl);
    let attempt = backend.bridge.wait(try_claim(
        backend.shared.clone(),
        backend.shared.claim_key(name),
        holder.to_string(),
        ttl,
    ))?;
    match attempt {
        Attempt::Taken { lease, expires } => Ok(hold(backend, name, holder, lease, ttl, expires)?),
        Attempt::Held { holder, .. } => Err(ClaimError::Held { holder }),
    }
}

pub(super) async fn campaign(
    backend: &EtcdBackend,
    name: &str,
    holder: &str,
    ttl: Duration,
) -> Result<Claim> {
    let ttl = ttl_seconds(ttl);
    let key = backend.shared.claim_key(name);
    // Watch for the holder's release, but look again at least this often in
    // case a watch misses it.
    let recheck = Duration::from_secs(ttl.unsigned_abs())
        .clamp(Duration::from_secs(1), Duration::from_secs(10));
    loop {
        let attempt = backend
            .bridge
            .run(try_claim(
                backend.shared.clone(),
                key.clone(),
                holder.to_string(),
                ttl,
            ))
            .await?;
        match attempt {
            Attempt::Taken { lease, expires } => {
                return hold(backend, name, holder, lease, ttl, expires);
            }
            Attempt::Held { revision, .. } => {
                let shared = backend.shared.clone();
                let key = key.clone();
                let _ = backend
                    .bridge
                    .run(async move {
                        let _ =
                            tokio::time::timeout(recheck, deleted(&shared, key, revision)).await;
                        Ok(())
                    })
                    .await;
            }
        }
    }
}

/// Resolves when `key` is deleted after `revision` (or the watch fails).
async fn deleted(shared: &Shared, key: Vec<u8>, revision: i64) {
    let create = WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key,
                start_revision: revision + 1,
                filters: vec![watch_create_request::FilterType::Noput as i32],
                ..WatchCreateRequest::default()
            },
        )),
    };
    // The request stream stays open: closing it may end the watch.
    let requests = tokio_stream::iter([create]).chain(tokio_stream::pending());
    if let Ok(response) = WatchClient::new(shared.members.preferred())
        .watch(requests)
        .await
    {
        let mut events = response.into_inner();
        while let Ok(Some(message)) = events.message().await {
            if message
                .events
                .iter()
                .any(|event| event.r#type == EventType::Delete as i32)
            {
                return;
            }
            if message.canceled {
                break;
            }
        }
    }
    // The watch failed (a member down, a compacted revision): pause before
    // the caller looks again, rather than spin.
    tokio::time::sleep(WATCH_RETRY).await;
}

/// The pause after a failed watch.
const WATCH_RETRY: Duration = Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ttls_round_up_to_whole_seconds() {
        assert_eq!(ttl_seconds(Duration::ZERO), 1);
        assert_eq!(ttl_seconds(Duration::from_millis(1)), 1);
        assert_eq!(ttl_seconds(Duration::from_secs(2)), 2);
        assert_eq!(ttl_seconds(Duration::from_millis(2001)), 3);
        assert_eq!(ttl_seconds(Duration::MAX), i64::MAX);
    }
}
