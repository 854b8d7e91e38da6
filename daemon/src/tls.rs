//! mTLS for the gRPC listener, with rustls only.
//!
//! A client certificate is required and checked against the client CA and the
//! CRLs during the handshake (chain, validity period, revocation). TLS 1.3
//! only by default; a floor of 1.2 adds rustls's TLS 1.2 suites, all of which
//! are AEAD. The acceptor is swapped atomically on [`TlsReloader::reload`]
//! (SIGHUP): new connections use the new certificates, open ones carry on.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use custody_core::config::TlsSection;
use custody_core::identity::{Principal, principal_from_certificate};
use custody_core::metrics;

/// How long a client may take to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds the rustls server config from the files named in `[tls]`.
pub fn server_config(tls: &TlsSection) -> Result<rustls::ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs(&tls.cert)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| format!("server key {}: {e}", tls.key.display()))?;
    let mut roots = RootCertStore::empty();
    let ca_certs = read_certs(&tls.client_ca)?;
    for ca in &ca_certs {
        roots
            .add(ca.clone())
            .map_err(|e| format!("client CA {}: {e}", tls.client_ca.display()))?;
    }
    let mut crls = Vec::new();
    for path in &tls.crls {
        crls.extend(read_crls(path)?);
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        // A CRL past its nextUpdate no longer vouches for anything.
        .enforce_revocation_expiration()
        .build()
        .map_err(|e| format!("client certificate verifier: {e}"))?;
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version.as_str() {
        "1.2" => &[&rustls::version::TLS13, &rustls::version::TLS12],
        _ => &[&rustls::version::TLS13],
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs.clone(), key)
        .map_err(|e| format!("server certificate {}: {e}", tls.cert.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    if let Some(leaf) = certs.first() {
        metrics::set_certificate_expiry("server", leaf);
    }
    if let Some(ca) = ca_certs.first() {
        metrics::set_certificate_expiry("client_ca", ca);
    }
    Ok(config)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificates", path.display()));
    }
    Ok(certs)
}

fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("CRL {}: {e}", path.display()))?;
    if bytes.starts_with(b"-----") {
        CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("CRL {}: {e}", path.display()))
    } else {
        Ok(vec![CertificateRevocationListDer::from(bytes)])
    }
}

/// The current acceptor, replaceable at run time.
pub struct TlsReloader {
    files: TlsSection,
    acceptor: ArcSwap<TlsAcceptor>,
}

impl TlsReloader {
    /// Loads the files once; fails if they are unusable.
    pub fn new(files: TlsSection) -> Result<Arc<Self>, String> {
        let config = server_config(&files)?;
        Ok(Arc::new(Self {
            files,
            acceptor: ArcSwap::from_pointee(TlsAcceptor::from(Arc::new(config))),
        }))
    }

    /// Reloads certificate, key, client CA and CRLs. On error the old ones
    /// stay in use.
    pub fn reload(&self) -> Result<(), String> {
        let config = server_config(&self.files)?;
        self.acceptor
            .store(Arc::new(TlsAcceptor::from(Arc::new(config))));
        tracing::info!("TLS certificates, client CA and CRLs reloaded");
        Ok(())
    }

    fn current(&self) -> Arc<TlsAcceptor> {
        self.acceptor.load_full()
    }
}

/// What the server knows about the peer of a connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The peer's address.
    pub remote: SocketAddr,
    /// The principal its certificate maps to, or why it maps to none.
    pub principal: Arc<Result<Principal, String>>,
}

/// An accepted, authenticated TLS connection.
pub struct TlsConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerInfo,
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepts TCP connections and completes TLS handshakes off the accept loop;
/// yields only connections whose client certificate verified.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<TlsReloader>,
) -> ReceiverStream<Result<TlsConnection, io::Error>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = sender.closed() => return,
            };
            let acceptor = tls.current();
            let sender = sender.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                let stream = match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        let reason = handshake_failure_reason(&error);
                        metrics::tls_handshake_failed(reason);
                        tracing::info!(%remote, reason, %error, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        metrics::tls_handshake_failed("timeout");
                        return;
                    }
                };
                let principal = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .ok_or_else(|| "no client certificate".to_string())
                    .and_then(|leaf| principal_from_certificate(leaf));
                let peer = PeerInfo {
                    remote,
                    principal: Arc::new(principal),
                };
                let _ = sender.send(Ok(TlsConnection { stream, peer })).await;
            });
        }
    });
    ReceiverStream::new(receiver)
}

/// A short, bounded label for the metric of refused handshakes.
fn handshake_failure_reason(error: &io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return "io";
    };
    match tls {
        Error::NoCertificatesPresented => "no_certificate",
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "expired",
        Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "not_yet_valid",
        Error::InvalidCertificate(CertificateError::Revoked) => "revoked",
        Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => "unknown_issuer",
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::PeerIncompatible(_) | Error::NoApplicationProtocol => "incompatible",
        _ => "other",
    }
}
