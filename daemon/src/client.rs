//! Connecting to custodyd with mTLS, for custodyctl and the tests.

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Opens an mTLS channel to `url` (`https://host:port`), trusting `ca_pem`
/// for the server and presenting `cert_pem`/`key_pem`.
pub async fn connect(
    url: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Channel, String> {
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
    Channel::from_shared(url.to_string())
        .map_err(|e| format!("server address {url:?}: {e}"))?
        .tls_config(tls)
        .map_err(|e| format!("TLS setup: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}"))
}
