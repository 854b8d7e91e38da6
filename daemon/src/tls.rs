//! mTLS for the gRPC listener, with rustls only, and the connections it
//! authenticated.
//!
//! A client certificate is required and checked against the client CA and the
//! CRLs during the handshake (chain, validity period, revocation). TLS 1.3
//! only by default; a floor of 1.2 adds rustls's TLS 1.2 suites, all of which
//! are AEAD.
//!
//! [`TlsReloader::reload`] (SIGHUP) swaps the acceptor atomically and checks
//! the certificate of every open connection again, with the new client CA
//! and CRLs: a connection whose certificate no longer verifies (revoked,
//! expired, or of a CA no longer trusted) is closed at once, and from the
//! reload on every request on it is refused ([`Connection::check`], which
//! also refuses, per request, a certificate that expired since the
//! handshake). The accept loop that makes connections is `listener.rs`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use custody_core::config::TlsSection;
use custody_core::identity::{CertificateId, Principal};
use custody_core::{Error, Reason, metrics};

/// Builds the rustls server config from the files named in `[tls]`.
pub fn server_config(tls: &TlsSection) -> Result<rustls::ServerConfig, String> {
    trust(tls).map(|(config, _)| config)
}

/// The rustls server config from the files named in `[tls]`, and the client
/// certificate verifier inside it (to check open connections again).
fn trust(tls: &TlsSection) -> Result<(rustls::ServerConfig, Arc<dyn ClientCertVerifier>), String> {
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
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(certs.clone(), key)
        .map_err(|e| format!("server certificate {}: {e}", tls.cert.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    if let Some(leaf) = certs.first() {
        metrics::set_certificate_expiry("server", leaf);
    }
    if let Some(ca) = ca_certs.first() {
        metrics::set_certificate_expiry("client_ca", ca);
    }
    Ok((config, verifier))
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

/// What new connections are checked with: the acceptor (server certificate,
/// client CA, CRLs), the verifier inside it, and which reload made them.
struct Trust {
    acceptor: TlsAcceptor,
    verifier: Arc<dyn ClientCertVerifier>,
    generation: u64,
}

impl Trust {
    fn load(files: &TlsSection, generation: u64) -> Result<Trust, String> {
        let (config, verifier) = trust(files)?;
        Ok(Trust {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            verifier,
            generation,
        })
    }
}

/// The current acceptor, replaceable at run time, and the connections it
/// let in.
pub struct TlsReloader {
    files: TlsSection,
    trust: ArcSwap<Trust>,
    open: Mutex<OpenConnections>,
}

#[derive(Default)]
struct OpenConnections {
    next_id: u64,
    by_id: HashMap<u64, Arc<Connection>>,
}

/// The acceptor a handshake runs with, and the generation of the trust it
/// belongs to (see [`TlsReloader::admit`]).
pub struct Acceptor {
    /// The acceptor.
    pub acceptor: TlsAcceptor,
    generation: u64,
}

impl TlsReloader {
    /// Loads the files once; fails if they are unusable.
    pub fn new(files: TlsSection) -> Result<Arc<Self>, String> {
        let trust = Trust::load(&files, 0)?;
        Ok(Arc::new(Self {
            files,
            trust: ArcSwap::from_pointee(trust),
            open: Mutex::new(OpenConnections::default()),
        }))
    }

    /// Reloads certificate, key, client CA and CRLs, then checks every open
    /// connection's certificate with them and closes those it no longer
    /// verifies. On error the old files stay in use and nothing is closed.
    pub fn reload(&self) -> Result<(), String> {
        let mut trust = Trust::load(&self.files, 0)?;
        let open = self.lock_open();
        trust.generation = self.trust.load().generation + 1;
        let verifier = trust.verifier.clone();
        // Swapped while the open connections are locked: a handshake begun
        // under the old trust and admitted after this is checked again by
        // `admit`.
        self.trust.store(Arc::new(trust));
        let now = UnixTime::now();
        let mut closed = 0;
        for connection in open.by_id.values() {
            if let Err(why) = connection.verify(verifier.as_ref(), now) {
                connection.close(&why);
                closed += 1;
            }
        }
        let kept = open.by_id.len() - closed;
        drop(open);
        tracing::info!(
            closed,
            kept,
            "TLS certificates, client CA and CRLs reloaded; open connections checked again"
        );
        Ok(())
    }

    /// The acceptor for a new connection's handshake.
    pub fn acceptor(&self) -> Acceptor {
        let trust = self.trust.load();
        Acceptor {
            acceptor: trust.acceptor.clone(),
            generation: trust.generation,
        }
    }

    /// Counts `connection`, authenticated with `acceptor`, among the open
    /// ones until the returned guard is dropped. If a reload came between
    /// its handshake and now, its certificate is checked again first (and
    /// the connection closed if it no longer verifies).
    pub fn admit(self: &Arc<Self>, connection: Arc<Connection>, acceptor: &Acceptor) -> Admitted {
        let mut open = self.lock_open();
        let trust = self.trust.load();
        if trust.generation != acceptor.generation {
            if let Err(why) = connection.verify(trust.verifier.as_ref(), UnixTime::now()) {
                connection.close(&why);
            }
        }
        let id = open.next_id;
        open.next_id += 1;
        open.by_id.insert(id, connection);
        metrics::connections_open(open.by_id.len());
        Admitted {
            reloader: self.clone(),
            id,
        }
    }

    /// How many authenticated connections are open.
    pub fn open_connections(&self) -> usize {
        self.lock_open().by_id.len()
    }

    fn lock_open(&self) -> std::sync::MutexGuard<'_, OpenConnections> {
        // Nothing panics while holding the lock; a poisoned map is still
        // the right map.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An open connection's place among the open ones; dropped with it.
pub struct Admitted {
    reloader: Arc<TlsReloader>,
    id: u64,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.reloader.lock_open();
        open.by_id.remove(&self.id);
        metrics::connections_open(open.by_id.len());
    }
}

/// An authenticated connection: the certificate chain its client presented,
/// and whether custodyd has closed it.
pub struct Connection {
    /// The client certificate (the chain's first).
    pub certificate: CertificateId,
    chain: Vec<CertificateDer<'static>>,
    closed: CancellationToken,
}

impl Connection {
    /// A connection whose client presented `chain` (leaf first, as rustls
    /// gives it; not empty).
    pub fn new(chain: Vec<CertificateDer<'static>>) -> Connection {
        let certificate = chain
            .first()
            .map_or_else(|| CertificateId::of(&[]), |leaf| CertificateId::of(leaf));
        Connection {
            certificate,
            chain,
            closed: CancellationToken::new(),
        }
    }

    /// Whether a request may run on this connection at `now` (Unix
    /// seconds): not once a reload found its certificate no longer
    /// verifies, nor once the certificate has expired. (An expired one's
    /// connection stays open, refusing every request, until the next reload
    /// or its maximum age closes it; the refusal reaches the client.)
    pub fn check(&self, now: i64) -> Result<(), Error> {
        if self.closed.is_cancelled() || now > self.certificate.not_after {
            return Err(Error::new(
                Reason::CertificateNoLongerValid,
                "the client certificate of this connection no longer verifies; connect again with a valid one",
            ));
        }
        Ok(())
    }

    /// Closes the connection: it is refused from now on and its stream ends.
    pub fn close(&self, why: &str) {
        if self.closed.is_cancelled() {
            return;
        }
        self.closed.cancel();
        metrics::connection_closed("certificate_no_longer_valid");
        tracing::info!(certificate = %self.certificate, why, "connection closed: its client certificate no longer counts");
    }

    /// Whether the connection has been closed.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Completes when the connection is closed.
    pub fn closing(&self) -> WaitForCancellationFutureOwned {
        self.closed.clone().cancelled_owned()
    }

    /// Checks the chain with `verifier` (chain, validity at `now`, CRLs).
    fn verify(&self, verifier: &dyn ClientCertVerifier, now: UnixTime) -> Result<(), String> {
        let (leaf, intermediates) = self.chain.split_first().ok_or("no client certificate")?;
        verifier
            .verify_client_cert(leaf, intermediates, now)
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// What the server knows about the peer of a connection.
#[derive(Clone)]
pub struct PeerInfo {
    /// The peer's address.
    pub remote: SocketAddr,
    /// The principal its certificate maps to, or why it maps to none.
    pub principal: Arc<Result<Principal, String>>,
    /// The connection: its certificate, and whether it still counts.
    pub connection: Arc<Connection>,
}

impl std::fmt::Debug for PeerInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerInfo")
            .field("remote", &self.remote)
            .field("principal", &self.principal)
            .field("certificate", &self.connection.certificate)
            .finish()
    }
}

/// A short, bounded label for the metric of refused handshakes.
pub fn handshake_failure_reason(error: &std::io::Error) -> &'static str {
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
