//! Connecting to custodyd with mTLS, for custodyctl and the tests.
//!
//! [`connect`] takes PEM text; [`connect_files`] takes the three files a
//! person names (CA, certificate, key), checks them before it dials, and
//! when the connection still fails says in words which certificate is at
//! fault, what is wrong with it and which file to fix (`diagnose.rs`).

mod diagnose;

pub use diagnose::{ClientFiles, connect_files};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

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
        .connect()
        .await
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
        .map_err(|e| format!("server address {url:?}: {e}"))?;
    Ok((endpoint, tls))
}
