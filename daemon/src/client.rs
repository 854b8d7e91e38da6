//! Connecting to custodyd with mTLS, for custodyctl and the tests.
//!
//! [`connect`] takes PEM text; [`connect_files`] takes the three files a
//! person names (CA, certificate, key), checks them before it dials, and
//! when the connection still fails says in words which certificate is at
//! fault, what is wrong with it and which file to fix (`diagnose.rs`).

mod diagnose;

pub use diagnose::{ClientFiles, connect_files};

use std::future::Future;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// How long connecting may take (TCP, TLS and HTTP/2 together), and how
/// long [`connect_files`]'s first health check may: a server that accepts
/// and then says nothing (a stopped custodyd, a port that is something
/// else) is reported instead of waited for. tonic's own connect timeout
/// covers only the TCP connect.
pub const CONNECT_WITHIN: Duration = Duration::from_secs(10);

/// A connection with a call under way pings custodyd this often and fails
/// if a ping is unanswered this long: a call on a connection whose server
/// stopped answering ends in an error, while a slow call on a live server
/// goes on (its HTTP/2 layer answers pings whatever the call is doing).
const PING_EVERY: Duration = Duration::from_secs(20);

/// `step` (against `url`), unless it takes longer than [`CONNECT_WITHIN`].
async fn within<T>(url: &str, what: &str, step: impl Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(CONNECT_WITHIN, step)
        .await
        .map_err(|_| {
            format!(
                "{url} accepted the connection but {what} within {} s: is custodyd running \
             there (not stopped or hung), and is that its port?",
                CONNECT_WITHIN.as_secs()
            )
        })
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
    let endpoint = endpoint
        .tls_config(tls)
        .map_err(|e| format!("TLS setup: {e}"))?;
    within(
        url,
        "did not complete the TLS handshake",
        endpoint.connect(),
    )
    .await?
    .map_err(|e| format!("cannot connect to {url}: {e}"))
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
