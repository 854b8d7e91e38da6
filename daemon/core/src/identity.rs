//! Who is calling: the client certificate, mapped to a principal and roles.
//!
//! The mapping is by SAN URI, one per role: `urn:custody:{role}:{principal}`,
//! for example `urn:custody:signer:ca-issuing-1`. A certificate may carry
//! several such URIs (one person as officer and auditor), all naming the same
//! principal; anything else is refused. The certificate chain, validity and
//! revocation are checked by rustls during the handshake, before this runs.

use std::collections::BTreeSet;
use std::fmt;

use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A role a principal may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Security officer: approves sensitive operations, runs ceremonies.
    Officer,
    /// Requests signatures with keys whose allow-list names it.
    Signer,
    /// Reads and verifies the audit log.
    Auditor,
    /// Manages keys: create, rotate, change states.
    Operator,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [Role::Officer, Role::Signer, Role::Auditor, Role::Operator];

    /// The role's name in URIs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Officer => "officer",
            Role::Signer => "signer",
            Role::Auditor => "auditor",
            Role::Operator => "operator",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The SAN URI prefix that marks a custody identity.
pub const URI_PREFIX: &str = "urn:custody:";

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The principal's name (the part after the role in the URI).
    pub name: String,
    /// The roles the certificate grants.
    pub roles: BTreeSet<Role>,
}

impl Principal {
    /// True if the principal holds `role`.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

/// The SAN URI granting `role` to `name`.
pub fn uri_for(role: Role, name: &str) -> String {
    format!("{URI_PREFIX}{}:{name}", role.as_str())
}

/// Names custody's own actors go by in the audit log and in ceremony
/// transcripts (`custodyd`, `custodyd-scheduler`, and `-` for a caller not
/// yet identified, which no valid name can be), and names that read as
/// theirs. No certificate, officer or allow-list may use one, so that a
/// record by custody itself cannot be mistaken for one by a person, or
/// the reverse.
pub const RESERVED_PRINCIPALS: [&str; 4] = ["custodyd", "custody", "system", "scheduler"];

/// True for a reserved name: one of [`RESERVED_PRINCIPALS`], or any name
/// starting with `custodyd` (the daemon's actors: `custodyd-scheduler`, …).
pub fn is_reserved_principal(name: &str) -> bool {
    RESERVED_PRINCIPALS.contains(&name) || name.starts_with("custodyd")
}

/// True for a principal name we accept: 1-64 of `[a-z0-9._-]`, starting with a
/// letter or digit, and not reserved ([`is_reserved_principal`]).
pub fn valid_principal_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && !is_reserved_principal(name)
}

/// Maps a client certificate (DER) to a principal. `Err` says why it maps to
/// none.
pub fn principal_from_certificate(der: &[u8]) -> Result<Principal, String> {
    let (_, certificate) =
        X509Certificate::from_der(der).map_err(|e| format!("unparseable certificate: {e}"))?;
    let san = certificate
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("certificate has no subjectAltName")?;
    let mut name: Option<String> = None;
    let mut roles = BTreeSet::new();
    for general_name in &san.value.general_names {
        let GeneralName::URI(uri) = general_name else {
            continue;
        };
        let Some(rest) = uri.strip_prefix(URI_PREFIX) else {
            continue;
        };
        let (role, principal) = rest
            .split_once(':')
            .ok_or_else(|| format!("malformed custody URI {uri:?}"))?;
        let role = Role::parse(role).ok_or_else(|| format!("unknown role in {uri:?}"))?;
        if is_reserved_principal(principal) {
            return Err(format!(
                "{uri:?} names a principal reserved for custodyd's own actors"
            ));
        }
        if !valid_principal_name(principal) {
            return Err(format!("invalid principal name in {uri:?}"));
        }
        match &name {
            Some(existing) if existing != principal => {
                return Err(format!(
                    "certificate names two principals ({existing:?} and {principal:?})"
                ));
            }
            _ => name = Some(principal.to_string()),
        }
        roles.insert(role);
    }
    let name = name.ok_or("certificate carries no urn:custody: identity")?;
    Ok(Principal { name, roles })
}

/// Longest subject an audit record quotes, in characters.
const MAX_SUBJECT_CHARS: usize = 256;

/// Which certificate a caller presented, as the audit log names it when
/// the certificate maps to no principal or no longer counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateId {
    /// The subject's distinguished name (at most 256 characters), or `?`
    /// if the certificate does not parse.
    pub subject: String,
    /// The serial number, hex.
    pub serial: String,
    /// SHA-256 of the certificate's DER, hex: names it unambiguously.
    pub sha256: String,
    /// End of its validity, Unix seconds (`i64::MIN` if it does not parse,
    /// so that it counts as expired).
    pub not_after: i64,
}

impl CertificateId {
    /// The identity of the certificate `der`.
    pub fn of(der: &[u8]) -> CertificateId {
        let sha256 = hex::encode(Sha256::digest(der));
        match X509Certificate::from_der(der) {
            Ok((_, certificate)) => CertificateId {
                subject: certificate
                    .subject()
                    .to_string()
                    .chars()
                    .take(MAX_SUBJECT_CHARS)
                    .collect(),
                serial: hex::encode(certificate.raw_serial()),
                sha256,
                not_after: certificate.validity().not_after.timestamp(),
            },
            Err(_) => CertificateId {
                subject: "?".into(),
                serial: String::new(),
                sha256,
                not_after: i64::MIN,
            },
        }
    }
}

impl fmt::Display for CertificateId {
    /// `certificate subject="…" serial=… sha256=…`, the subject quoted with
    /// any control character escaped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "certificate subject={:?} serial={} sha256={}",
            self.subject, self.serial, self.sha256
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unparseable_certificate_is_still_named_by_its_digest_and_counts_as_expired() {
        let id = CertificateId::of(b"not a certificate");
        assert_eq!(id.subject, "?");
        assert_eq!(id.sha256, hex::encode(Sha256::digest(b"not a certificate")));
        assert_eq!(id.not_after, i64::MIN);
        assert!(id.to_string().contains(&id.sha256));
    }

    #[test]
    fn principal_names_are_restricted() {
        for good in ["ca-1", "alice", "svc.payments_2"] {
            assert!(valid_principal_name(good), "{good}");
        }
        for bad in ["", "-x", "Alice", "a b", "a:b", &"x".repeat(65)] {
            assert!(!valid_principal_name(bad), "{bad}");
        }
        // custody's own actors, and names that read as theirs.
        for reserved in [
            "-",
            "custodyd",
            "custodyd-scheduler",
            "custodyd2",
            "custody",
            "system",
            "scheduler",
        ] {
            assert!(!valid_principal_name(reserved), "{reserved}");
        }
        for fine in ["custody-ops", "scheduler-2", "systems"] {
            assert!(valid_principal_name(fine), "{fine}");
        }
    }
}
