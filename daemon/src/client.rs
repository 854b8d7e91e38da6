//! Connecting to custodyd with mTLS, for custodyctl and the tests.
//!
//! [`connect`] takes PEM text; [`connect_files`] takes the three files a
//! person names (CA, certificate, key), checks them before it dials, and
//! when the connection still fails says in words which certificate is at
//! fault, what is wrong with it and which file to fix (`diagnose.rs`).

mod diagnose;

pub use diagnose::{ClientFiles, connect_files};

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use tonic::codegen::Service;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, Uri};

/// How long connecting may take, TCP and TLS together (on every connection
/// a channel makes, its reconnections too), and how long
/// [`connect_files`]'s first health check may: a server that accepts and
/// then says nothing (a stopped custodyd, a port that is something else) is
/// reported instead of waited for.
pub const CONNECT_WITHIN: Duration = Duration::from_secs(10);

/// How long the name's lookup and the TCP connect may take: shorter than
/// [`CONNECT_WITHIN`], so that a host that does not answer at all is told
/// apart from one that answers and then says nothing.
const REACH_WITHIN: Duration = Duration::from_secs(5);

/// A connection with a call under way pings custodyd this often and fails
/// if a ping is unanswered this long: a call on a connection whose server
/// stopped answering ends in an error, while a slow call on a live server
/// goes on (its HTTP/2 layer answers pings whatever the call is doing).
const PING_EVERY: Duration = Duration::from_secs(20);

/// The connector under the channel's TLS: the name's lookup and the TCP
/// connect, within [`REACH_WITHIN`] or [`Unreached`]. Given to tonic as a
/// connector of our own, so that its connect timeout wraps TLS as well
/// (with the connector tonic makes itself, it bounds only TCP).
#[derive(Clone)]
struct Reach(HttpConnector);

fn tcp() -> Reach {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    Reach(http)
}

/// No answer to the connection within [`REACH_WITHIN`].
#[derive(Debug)]
struct Unreached;

impl std::fmt::Display for Unreached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no answer to the connection within {} s",
            REACH_WITHIN.as_secs()
        )
    }
}

impl StdError for Unreached {}

type BoxError = Box<dyn StdError + Send + Sync>;

impl Service<Uri> for Reach {
    type Response = <HttpConnector as Service<Uri>>::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let reaching = self.0.call(uri);
        Box::pin(async move {
            match tokio::time::timeout(REACH_WITHIN, reaching).await {
                Ok(reached) => reached.map_err(Into::into),
                Err(_) => Err(Unreached.into()),
            }
        })
    }
}

/// The words for a connection to `url` that timed out, if `error` is one:
/// [`Unreached`], or tonic's connect timeout, which once the host answered
/// can only have run out in the TLS handshake.
fn timed_out(error: &(dyn StdError + 'static), url: &str) -> Option<String> {
    let mut timed_out = false;
    let mut next = Some(error);
    while let Some(current) = next {
        if current.is::<Unreached>() {
            return Some(format!(
                "{url} did not answer the connection within {} s: is the host up, its \
                 name right, and its port open to this machine?",
                REACH_WITHIN.as_secs()
            ));
        }
        timed_out |= current
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut);
        next = current.source();
    }
    timed_out.then(|| silent(url, "did not complete the TLS handshake"))
}

/// `url` took the connection but then `what` within [`CONNECT_WITHIN`].
fn silent(url: &str, what: &str) -> String {
    format!(
        "{url} {what} within {} s: is custodyd running there (not stopped or \
         hung), and is that its port?",
        CONNECT_WITHIN.as_secs()
    )
}

/// `step` (against `url`), unless it takes longer than [`CONNECT_WITHIN`].
async fn within<T>(url: &str, what: &str, step: impl Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(CONNECT_WITHIN, step)
        .await
        .map_err(|_| silent(url, what))
}

/// Opens an mTLS channel to `url` (`https://host:port`), trusting `ca_pem`
/// for the server and presenting `cert_pem`/`key_pem`.
pub async fn connect(
    url: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Channel, String> {
    let (endpoint, tls) = endpoint(url, ca_pem, cert_pem, key_pem)?;
    endpoint
        .tls_config(tls)
        .map_err(|e| format!("TLS setup: {e}"))?
        .connect_with_connector(tcp())
        .await
        .map_err(|e| timed_out(&e, url).unwrap_or_else(|| format!("cannot connect to {url}: {e}")))
}

/// The endpoint of `url` and the TLS settings to reach it with.
fn endpoint(
    url: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(tonic::transport::Endpoint, ClientTlsConfig), String> {
    let uri: tonic::transport::Uri = url
        .parse()
        .map_err(|e| format!("server address {url:?}: {e}"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("server address {url:?} has no host"))?
        .to_string();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(cert_pem, key_pem))
        .domain_name(host);
    let endpoint = Channel::from_shared(url.to_string())
        .map_err(|e| format!("server address {url:?}: {e}"))?
        .connect_timeout(CONNECT_WITHIN)
        .http2_keep_alive_interval(PING_EVERY)
        .keep_alive_timeout(PING_EVERY);
    Ok((endpoint, tls))
}
