//! The cluster's members: one lazily connected mTLS channel to each, and
//! the failover between them.
//!
//! Calls go to the member that last answered. A member that fails is passed
//! over for the next one: reads are tried on every member in turn within
//! the request deadline; a write moves on only if it was certainly never
//! sent (the connection could not be made), because one that was sent may
//! have been committed, and sending it again could apply it twice. tonic's
//! own balancer is not used: it spreads calls over members without regard
//! to which are down, so losing one of three would fail a third of them.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};
use tonic::{Code, Status};
use zeroize::Zeroizing;

use super::EtcdConfig;
use super::pb::etcdserverpb::StatusRequest;
use super::pb::etcdserverpb::maintenance_client::MaintenanceClient;
use crate::{Result, StoreError};

/// The largest response accepted: a page of scan results whose values are
/// each up to `--max-request-bytes`.
pub(crate) const MAX_RESPONSE_BYTES: usize = 512 << 20;

/// How a call failed.
#[derive(Debug)]
pub(crate) enum RpcError {
    /// No member answered in time, or the answer was lost.
    Unavailable(String),
    /// A member answered with a failure retrying will not mend.
    Failed(String),
    /// The revision asked for is no longer (or not yet) readable.
    Compacted(String),
}

impl From<RpcError> for StoreError {
    fn from(e: RpcError) -> StoreError {
        match e {
            RpcError::Unavailable(why) => StoreError::Unavailable(why),
            RpcError::Failed(why) | RpcError::Compacted(why) => StoreError::Failed(why),
        }
    }
}

pub(crate) struct Members {
    endpoints: Vec<String>,
    channels: Vec<Channel>,
    /// The member calls go to first: the last one that answered.
    preferred: AtomicUsize,
    timeout: Duration,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| StoreError::Failed(format!("etcd {what} {}: {e}", path.display())))
}

impl Members {
    /// One channel per endpoint, connected on first use; must run inside
    /// the backend's runtime (the channels spawn their tasks there).
    pub(crate) fn connect_lazy(config: &EtcdConfig) -> Result<Members> {
        let ca = Certificate::from_pem(read(&config.ca, "CA certificate")?);
        let cert = read(&config.cert, "client certificate")?;
        let key = Zeroizing::new(read(&config.key, "client key")?);
        // tonic keeps its own copy of the key for the channels' lifetime.
        let identity = Identity::from_pem(&cert, key.as_slice());
        let mut channels = Vec::with_capacity(config.endpoints.len());
        let mut endpoints = Vec::with_capacity(config.endpoints.len());
        for endpoint in &config.endpoints {
            let url = if endpoint.contains("://") {
                endpoint.clone()
            } else {
                format!("https://{endpoint}")
            };
            let bad =
                |why: String| StoreError::Failed(format!("etcd endpoint {endpoint:?}: {why}"));
            let uri: Uri = url.parse().map_err(|e| bad(format!("{e}")))?;
            if uri.scheme_str() != Some("https") {
                return Err(bad("custody talks to etcd over mTLS only (https)".into()));
            }
            let host = uri
                .host()
                .ok_or_else(|| bad("no host".into()))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let tls = ClientTlsConfig::new()
                .ca_certificate(ca.clone())
                .identity(identity.clone())
                .domain_name(host);
            // Our own TCP connector, so that tonic's connect timeout bounds
            // the TLS handshake as well (with its own connector it bounds
            // TCP only): a member that takes the connection and never
            // answers it is passed over within half the request deadline,
            // and a write sent nowhere moves on to the next member
            // ([`never_sent`]) instead of reporting an unknown outcome.
            let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
            tcp.enforce_http(false);
            tcp.set_nodelay(true);
            let channel = Endpoint::from_shared(url.clone())
                .map_err(|e| bad(format!("{e}")))?
                .tls_config(tls)
                .map_err(|e| bad(format!("TLS setup: {e}")))?
                .connect_timeout(config.request_timeout / 2)
                // No HTTP/2 keepalive pings: etcd (grpc-go) counts a ping
                // that arrives when no stream is open, or within 5 s of the
                // last (`--grpc-keepalive-min-time`), as abuse and after two
                // closes the connection with GOAWAY ENHANCE_YOUR_CALM; every
                // call on it then fails RESOURCE_EXHAUSTED. Under many short
                // calls a ping sent while one was open races its end. A
                // member gone without a word is found by the calls'
                // deadlines instead, and the next call fails over.
                .connect_with_connector_lazy(tcp);
            channels.push(channel);
            endpoints.push(url);
        }
        Ok(Members {
            endpoints,
            channels,
            preferred: AtomicUsize::new(0),
            timeout: config.request_timeout,
        })
    }

    /// No members: for tests of what needs none.
    #[cfg(test)]
    pub(crate) fn empty() -> Members {
        Members {
            endpoints: Vec::new(),
            channels: Vec::new(),
            preferred: AtomicUsize::new(0),
            timeout: Duration::from_secs(1),
        }
    }

    /// The channel calls go to first.
    pub(crate) fn preferred(&self) -> Channel {
        let index = self.preferred.load(Ordering::Relaxed) % self.channels.len();
        self.channels[index].clone()
    }

    /// Succeeds if any member answers a status request in time.
    pub(crate) async fn probe(&self) -> Result<()> {
        self.call("status", true, |channel| async move {
            MaintenanceClient::new(channel)
                .status(StatusRequest {})
                .await
                .map(drop)
        })
        .await
        .map_err(StoreError::from)
    }

    /// Runs `op` on a member, failing over as the module doc says, within
    /// the request deadline. `idempotent`: sending it twice does no harm.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        what: &str,
        idempotent: bool,
        mut op: F,
    ) -> std::result::Result<T, RpcError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = std::result::Result<T, Status>>,
    {
        let deadline = Instant::now() + self.timeout;
        let count = self.channels.len();
        let first = self.preferred.load(Ordering::Relaxed) % count;
        let mut failures = Vec::new();
        for step in 0..count {
            let index = (first + step) % count;
            let endpoint = &self.endpoints[index];
            let Some(left) = deadline
                .checked_duration_since(Instant::now())
                .filter(|left| !left.is_zero())
            else {
                break;
            };
            // An idempotent call leaves time for the members after this one.
            let budget = if idempotent {
                left / u32::try_from(count - step).unwrap_or(1)
            } else {
                left
            };
            let outcome = tokio::time::timeout(budget, op(self.channels[index].clone())).await;
            let unknown_outcome = match outcome {
                Ok(Ok(answer)) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok(answer);
                }
                Ok(Err(status)) => match classify(&status) {
                    Class::Failed(why) => {
                        return Err(RpcError::Failed(format!("etcd {what}: {why}")));
                    }
                    Class::Compacted => {
                        return Err(RpcError::Compacted(format!(
                            "etcd {what}: {}",
                            status.message()
                        )));
                    }
                    Class::Unavailable { sent } => {
                        failures.push(format!("{endpoint}: {}", status.message()));
                        sent
                    }
                },
                Err(_) => {
                    failures.push(format!("{endpoint}: no answer within {budget:?}"));
                    true
                }
            };
            self.pass_over(index);
            tracing::debug!(what, endpoint, "etcd member failed a call");
            if unknown_outcome && !idempotent {
                return Err(RpcError::Unavailable(format!(
                    "etcd {what}: {} (it may or may not have been applied)",
                    failures.join("; ")
                )));
            }
        }
        Err(RpcError::Unavailable(format!(
            "etcd {what}: no member answered within {:?}: {}",
            self.timeout,
            failures.join("; ")
        )))
    }

    /// Calls go to the next member after `index` failed (unless another
    /// call already moved them).
    fn pass_over(&self, index: usize) {
        let next = (index + 1) % self.channels.len();
        let _ = self
            .preferred
            .compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed);
    }
}

enum Class {
    /// Retrying elsewhere may work; `sent`: the request may have reached
    /// the member.
    Unavailable {
        sent: bool,
    },
    Failed(String),
    Compacted,
}

fn classify(status: &Status) -> Class {
    let message = status.message();
    let transport = || Class::Unavailable {
        sent: !never_sent(status),
    };
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => transport(),
        // tonic reports a broken connection as Unknown with the transport
        // error as its source; a member's own Unknown has no source.
        Code::Unknown if std::error::Error::source(status).is_some() => transport(),
        Code::Unknown if message.starts_with("Service was not ready") => transport(),
        // The connection itself was torn down (etcd or h2 ended it with
        // GOAWAY ENHANCE_YOUR_CALM): a transport failure like any other,
        // not the member refusing this request.
        Code::ResourceExhausted if message.contains("h2 protocol error") => transport(),
        Code::OutOfRange if message.contains("compacted") || message.contains("future rev") => {
            Class::Compacted
        }
        Code::InvalidArgument if message.contains("too many operations in txn request") => {
            Class::Failed(format!(
                "the cluster refused a transaction over its --max-txn-ops ({message})"
            ))
        }
        Code::InvalidArgument if message.contains("request is too large") => Class::Failed(
            format!("the cluster refused a request over its --max-request-bytes ({message})"),
        ),
        Code::ResourceExhausted if message.contains("larger than max") => Class::Failed(format!(
            "the cluster refused a request over its --max-request-bytes ({message})"
        )),
        code => Class::Failed(format!("{code:?}: {message}")),
    }
}

/// Whether the request certainly never left: the connection to the member
/// could not be made.
fn never_sent(status: &Status) -> bool {
    if status.message().starts_with("Service was not ready") {
        return true;
    }
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<tonic::ConnectError>() || connect_timed_out(error) {
            return true;
        }
        source = error.source();
    }
    false
}

/// tonic's connect timeout, which wraps the TCP connection and the TLS
/// handshake (`hyper_timeout`'s `TimedOut` around tokio's `Elapsed`; no
/// other timer in a call's path makes that pair): the connection was never
/// made, so nothing was sent on it.
fn connect_timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    error
        .downcast_ref::<std::io::Error>()
        .filter(|io| io.kind() == std::io::ErrorKind::TimedOut)
        .and_then(std::io::Error::get_ref)
        .is_some_and(|inner| inner.is::<tokio::time::error::Elapsed>())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test fails by panicking")]
mod tests {
    use super::*;

    fn class(status: Status) -> String {
        match classify(&status) {
            Class::Unavailable { sent } => format!("unavailable sent={sent}"),
            Class::Failed(why) => format!("failed: {why}"),
            Class::Compacted => "compacted".into(),
        }
    }

    #[test]
    fn etcd_answers_map_to_store_errors() {
        assert_eq!(
            class(Status::unavailable("etcdserver: leader changed")),
            "unavailable sent=true"
        );
        assert_eq!(
            class(Status::deadline_exceeded("x")),
            "unavailable sent=true"
        );
        assert_eq!(
            class(Status::unknown("Service was not ready: x")),
            "unavailable sent=false"
        );
        // A member's own Unknown (no transport error behind it) is a failure.
        assert!(class(Status::unknown("etcdserver: weird")).starts_with("failed"));
        assert_eq!(
            class(Status::out_of_range(
                "etcdserver: mvcc: required revision has been compacted"
            )),
            "compacted"
        );
        assert!(
            class(Status::invalid_argument(
                "etcdserver: too many operations in txn request"
            ))
            .contains("--max-txn-ops")
        );
        assert!(
            class(Status::invalid_argument("etcdserver: request is too large"))
                .contains("--max-request-bytes")
        );
        assert!(
            class(Status::resource_exhausted(
                "grpc: received message larger than max (3 vs. 2)"
            ))
            .contains("--max-request-bytes")
        );
        assert!(
            class(Status::permission_denied("etcdserver: permission denied")).starts_with("failed")
        );
    }
}
