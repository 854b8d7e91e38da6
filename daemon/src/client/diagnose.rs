//! A failed connection in words: which certificate, what is wrong with it,
//! which file to fix.
//!
//! The files are checked before dialling (readable, PEM, in their validity
//! window, the key the certificate's), since what the local files can tell
//! needs no server. What only the handshake shows is read from the error's
//! source chain (tonic → hyper → io → rustls): custodyd's certificate from
//! another CA, expired or for another name, and custodyd refusing ours. In
//! TLS 1.3 the server judges the client's certificate after the client's
//! side of the handshake is done, so the connection is proved with one
//! health check before it is handed out: a refusal is reported here, not as
//! "transport error" on the first real call.
//!
//! Anything in a message that came from the peer (the names in its
//! certificate) is escaped with `custody_core::text::escape`.

use std::error::Error as StdError;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{AlertDescription, CertificateError};
use tonic::transport::Channel;
use zeroize::Zeroizing;

/// The files of a client's mTLS identity and of its trust in custodyd.
#[derive(Debug, Clone)]
pub struct ClientFiles {
    /// The CA certificate that issued custodyd's certificate (`--ca`).
    pub ca: PathBuf,
    /// The client certificate (`--cert`).
    pub cert: PathBuf,
    /// The client certificate's private key (`--key`).
    pub key: PathBuf,
}

impl ClientFiles {
    fn ca(&self) -> String {
        format!("the CA file {} (--ca)", self.ca.display())
    }
    fn cert(&self) -> String {
        format!("your client certificate {} (--cert)", self.cert.display())
    }
    fn key(&self) -> String {
        format!("your client key {} (--key)", self.key.display())
    }
}

/// Opens an mTLS channel to `url` with `files`, proved by one health check;
/// a failure says which certificate or file is at fault and what is wrong.
pub async fn connect_files(url: &str, files: &ClientFiles) -> Result<Channel, String> {
    let host = check_url(url)?;
    let ca_pem = read(&files.ca, &files.ca())?;
    let cert_pem = read(&files.cert, &files.cert())?;
    let key_pem = Zeroizing::new(read(&files.key, &files.key())?);
    check_ca(&ca_pem, files)?;
    check_identity(&cert_pem, &key_pem, files)?;
    let why = |error: &(dyn StdError + 'static)| explain(error, url, &host, files);
    let (endpoint, tls) = super::endpoint(url, &ca_pem, &cert_pem, &key_pem)?;
    let channel = endpoint
        .tls_config(tls)
        .map_err(|e| format!("TLS setup: {}", why(&e)))?
        .connect_with_connector(super::tcp())
        .await
        .map_err(|e| super::timed_out(&e, url).unwrap_or_else(|| why(&e)))?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let probe = super::within(
        url,
        "did not answer a health check",
        health.check(tonic_health::pb::HealthCheckRequest::default()),
    )
    .await?;
    match probe {
        // An answer, whatever it says, came over a working connection.
        Ok(_) => Ok(channel),
        Err(status) if is_transport(&status) => Err(after_handshake(&status, url, &host, files)),
        Err(_) => Ok(channel),
    }
}

/// The host of an `https://` URL; `http://` and other schemes are refused
/// in words, since custodyd speaks only TLS.
fn check_url(url: &str) -> Result<String, String> {
    if let Some(rest) = url.strip_prefix("http://") {
        return Err(format!(
            "the server address {url} is plain http, but custodyd speaks only TLS: \
             use https://{rest} (--server or CUSTODY_SERVER)"
        ));
    }
    if !url.starts_with("https://") {
        return Err(format!(
            "the server address {url:?} must start with https:// (--server or CUSTODY_SERVER)"
        ));
    }
    let uri: tonic::transport::Uri = url
        .parse()
        .map_err(|e| format!("the server address {url:?} is not a URL: {e}"))?;
    uri.host()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
        .ok_or_else(|| format!("the server address {url:?} has no host"))
}

fn read(path: &Path, what: &str) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound => "there is no such file".to_string(),
            std::io::ErrorKind::PermissionDenied => {
                "permission denied (custodyctl runs as a user who may not read it)".to_string()
            }
            _ => e.to_string(),
        };
        format!("cannot read {what}: {why}")
    })?;
    String::from_utf8(bytes).map_err(|_| format!("{what} is not PEM text"))
}

/// The certificates in `pem`; none, or a broken one, is an error naming `what`.
fn certificates(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} is not a readable PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} holds no certificate (no -----BEGIN CERTIFICATE----- block)"
        ));
    }
    Ok(certs)
}

/// Refuses a certificate outside its validity window, in words.
fn check_window(der: &[u8], what: &str, fix: &str) -> Result<(), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("{what} is not an X.509 certificate: {e}"))?;
    let now = x509_parser::time::ASN1Time::now();
    let validity = cert.validity();
    if now > validity.not_after {
        return Err(format!("{what} expired on {}: {fix}", validity.not_after));
    }
    if now < validity.not_before {
        return Err(format!(
            "{what} is not valid until {} (is this machine's clock right?)",
            validity.not_before
        ));
    }
    Ok(())
}

/// The CA file holds certificates, one at least in its validity window (a
/// file of several CAs may keep an expired one beside the current).
fn check_ca(ca_pem: &str, files: &ClientFiles) -> Result<(), String> {
    let mut first_problem = None;
    for der in certificates(ca_pem, &files.ca())? {
        match check_window(
            &der,
            &format!("the CA certificate in {}", files.ca()),
            "give --ca the CA certificate that issued custodyd's certificate now",
        ) {
            Ok(()) => return Ok(()),
            Err(problem) => {
                first_problem.get_or_insert(problem);
            }
        }
    }
    first_problem.map_or(Ok(()), Err)
}

/// The client certificate is in its window and `key_pem` is its key.
fn check_identity(cert_pem: &str, key_pem: &str, files: &ClientFiles) -> Result<(), String> {
    let certs = certificates(cert_pem, &files.cert())?;
    let Some(leaf) = certs.first() else {
        return Err(format!("{} holds no certificate", files.cert()));
    };
    check_window(
        leaf,
        &files.cert(),
        "ask your CA for a new client certificate",
    )?;
    if PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).is_err() {
        return Err(format!(
            "{} holds no private key (no -----BEGIN PRIVATE KEY----- block)",
            files.key()
        ));
    }
    // Keys rcgen reads (PKCS#8 EC, Ed25519, RSA) are matched against the
    // certificate here; others are left to the handshake.
    if let Ok(pair) = rcgen::KeyPair::from_pem(key_pem) {
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| format!("{} is not an X.509 certificate: {e}", files.cert()))?;
        if *cert.public_key().subject_public_key.data != *rcgen::PublicKeyData::der_bytes(&pair) {
            return Err(format!(
                "{} is not the key of {}: give --key the key that was made with that \
                 certificate",
                files.key(),
                files.cert()
            ));
        }
    }
    Ok(())
}

/// Whether a call's failure is the connection's (a transport error under
/// it) rather than an answer from the server.
fn is_transport(status: &tonic::Status) -> bool {
    status.source().is_some()
        || matches!(status.code(), tonic::Code::Unavailable)
            && status.message().contains("transport")
}

/// A call's transport failure on a connection whose handshake went through.
/// custodyd's verdict on our certificate comes after our side of a TLS 1.3
/// handshake: as an alert, or as the connection closed before the alert is
/// read. Either way it is our certificate custodyd turned down.
fn after_handshake(
    error: &(dyn StdError + 'static),
    url: &str,
    host: &str,
    files: &ClientFiles,
) -> String {
    let (tls, io) = find_causes(error);
    if tls.is_some() || io.and_then(alert_in).is_some() {
        return explain(error, url, host, files);
    }
    format!(
        "custodyd refused the connection after the handshake, as it does when it \
         refuses {} (issued by a CA it does not trust, revoked, or expired by its \
         clock); custodyd's log says which ({})",
        files.cert(),
        chain(error)
    )
}

/// The rustls error and the io error in `error`'s source chain.
fn find_causes<'a>(
    error: &'a (dyn StdError + 'static),
) -> (Option<&'a rustls::Error>, Option<&'a std::io::Error>) {
    let mut tls = None;
    let mut io = None;
    let mut next = Some(error);
    while let Some(current) = next {
        if let Some(found) = current.downcast_ref::<rustls::Error>() {
            tls.get_or_insert(found);
        }
        if let Some(found) = current.downcast_ref::<std::io::Error>() {
            io.get_or_insert(found);
            // io::Error's source() skips the error it wraps: look inside.
            if let Some(inner) = found.get_ref()
                && let Some(found) = inner.downcast_ref::<rustls::Error>()
            {
                tls.get_or_insert(found);
            }
        }
        next = current.source();
    }
    (tls, io)
}

/// `error` in words: which certificate, what is wrong, which file to fix.
fn explain(error: &(dyn StdError + 'static), url: &str, host: &str, files: &ClientFiles) -> String {
    let (tls, io) = find_causes(error);
    let server = format!("custodyd's certificate (at {url})");
    let ca = files.ca();
    match tls {
        Some(rustls::Error::InvalidCertificate(problem)) => match problem {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                "{server} was not issued by the CA in {ca}: give --ca the CA that issued \
                 custodyd's certificate (or this is not the custodyd you meant)"
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => format!(
                "{server} has expired{}: custodyd's operator must renew it (custodyd's \
                 [tls] cert); your files are not at fault",
                expiry(problem)
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("{server} is not valid yet: check this machine's clock and custodyd's")
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "{server} is not valid for the host name {host}{}: connect by a name \
                 the certificate holds (--server), or have custodyd's certificate \
                 reissued with {host}",
                    presented_names(problem)
                )
            }
            CertificateError::Revoked => {
                format!("{server} has been revoked: custodyd's operator must replace it")
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                format!("{server} is not a TLS server certificate (its extended key usage)")
            }
            other => format!("{server} was refused: {other:?}"),
        },
        Some(rustls::Error::AlertReceived(alert)) => refused(*alert, files),
        None if let Some(alert) = io.and_then(alert_in) => refused(alert, files),
        Some(rustls::Error::InvalidMessage(_))
        | Some(rustls::Error::InappropriateMessage { .. }) => {
            format!("the server at {url} did not answer in TLS: is that custodyd's TLS port?")
        }
        Some(other) => format!("the TLS handshake with {url} failed: {other}"),
        None => match io.map(std::io::Error::kind) {
            Some(std::io::ErrorKind::ConnectionRefused) => format!(
                "nothing accepts connections at {url}: is custodyd running, and is the \
                 address right (--server or CUSTODY_SERVER)?"
            ),
            Some(std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset) => {
                format!(
                    "{url} closed the connection during the handshake: is it custodyd, \
                     and does it accept {}?",
                    files.cert()
                )
            }
            _ => format!("cannot connect to {url}: {}", chain(error)),
        },
    }
}

/// The alert in an io error that carries only its text: after the
/// handshake, a fatal alert reaches hyper as `received fatal alert: UnknownCA`
/// in a plain io error, the rustls error gone.
fn alert_in(error: &std::io::Error) -> Option<AlertDescription> {
    let text = error.to_string();
    let name = text.strip_prefix("received fatal alert: ")?;
    [
        AlertDescription::UnknownCA,
        AlertDescription::BadCertificate,
        AlertDescription::CertificateUnknown,
        AlertDescription::AccessDenied,
        AlertDescription::CertificateExpired,
        AlertDescription::CertificateRevoked,
        AlertDescription::CertificateRequired,
        AlertDescription::DecryptError,
        AlertDescription::HandshakeFailure,
        AlertDescription::ProtocolVersion,
        AlertDescription::UnsupportedCertificate,
    ]
    .into_iter()
    .find(|alert| format!("{alert:?}") == name.trim())
}

/// What custodyd's alert says about the certificate we presented.
fn refused(alert: AlertDescription, files: &ClientFiles) -> String {
    let cert = files.cert();
    match alert {
        AlertDescription::UnknownCA
        | AlertDescription::BadCertificate
        | AlertDescription::CertificateUnknown
        | AlertDescription::AccessDenied => format!(
            "custodyd refused {cert} ({alert:?}): it was not issued by a CA custodyd \
             trusts (custodyd's [tls] client_ca); ask that CA for a certificate"
        ),
        AlertDescription::CertificateExpired => format!(
            "custodyd refused {cert} as expired: ask your CA for a new client certificate \
             (or check the clocks)"
        ),
        AlertDescription::CertificateRevoked => {
            format!("custodyd refused {cert}: it has been revoked; ask your CA for a new one")
        }
        AlertDescription::CertificateRequired => {
            "custodyd requires a client certificate and got none; give --cert and --key".to_string()
        }
        AlertDescription::DecryptError => format!(
            "custodyd could not verify the handshake signature of {}: it is not the key of \
             {cert}",
            files.key()
        ),
        AlertDescription::HandshakeFailure | AlertDescription::ProtocolVersion => format!(
            "custodyd and custodyctl share no TLS version or algorithm ({alert:?}); \
             custodyd may require TLS 1.3"
        ),
        other => format!("custodyd refused the TLS handshake ({other:?}) with {cert}"),
    }
}

fn expiry(problem: &CertificateError) -> String {
    match problem {
        CertificateError::ExpiredContext { not_after, .. } => {
            time::OffsetDateTime::from_unix_timestamp(
                i64::try_from(not_after.as_secs()).unwrap_or(i64::MAX),
            )
            .map(|t| format!(" (on {})", t.date()))
            .unwrap_or_default()
        }
        _ => String::new(),
    }
}

/// The names custodyd's certificate holds, escaped: they are the peer's text.
fn presented_names(problem: &CertificateError) -> String {
    match problem {
        CertificateError::NotValidForNameContext { presented, .. } if !presented.is_empty() => {
            let names: Vec<String> = presented
                .iter()
                .map(|name| custody_core::text::escape(name).into_owned())
                .collect();
            format!(" (it names {})", names.join(", "))
        }
        _ => String::new(),
    }
}

/// Every error of the chain, outermost first, joined by ": ".
fn chain(error: &(dyn StdError + 'static)) -> String {
    let mut parts = Vec::new();
    let mut next = Some(error);
    while let Some(current) = next {
        let text = current.to_string();
        if !parts.iter().any(|p: &String| p.contains(&text)) {
            parts.push(text);
        }
        next = current.source();
    }
    custody_core::text::escape(&parts.join(": ")).into_owned()
}
