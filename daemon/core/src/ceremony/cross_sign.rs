//! An existing CA certificate a cross-sign ceremony re-issues under a
//! custody root: the script names the certificate file by SHA-256;
//! custodyctl sends its bytes with the ceremony start. What the
//! cross-certificate takes from it is the subject name (byte for byte),
//! the public key and the subjectKeyIdentifier (a cross-certificate keeps
//! it, so that paths through either issuer find the same key), nothing
//! else: the profile is the reviewed script's. The checks on the key and
//! the name are the CSR's (`ceremony::csr`). A self-issued certificate
//! (its issuer name its subject's, as a CA's own root certificate is)
//! must verify with the key it carries, as a CSR's self-signature must:
//! the root vouches for a key only when its holder signed for it. Names are
//! compared as text (case and spacing aside), not byte for byte, so a
//! re-encoded issuer name does not pass for another CA's. A certificate
//! of another issuer shows nothing here (its issuer's signature is not
//! checked): the officers judge it when they review the file and are told
//! so when they confirm (threat model C31).

use rcgen::DistinguishedName;
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::FromDer;
use x509_parser::x509::{SubjectPublicKeyInfo, X509Name};

use crate::algorithms::KeyAlgorithm;
use crate::ceremony::csr::{self, Refusals};
use crate::{Error, Reason};

const REFUSALS: Refusals = Refusals {
    subject: Reason::CrossSignSubjectChanged,
    key: Reason::CrossSignKeyNotAllowed,
    malformed: Reason::BadCrossSignCertificate,
    whose: "the certificate's",
};

/// A certificate that passed every check: its bytes are the script's, it
/// is a CA certificate, its key is allowed and is not the issuer's, and
/// rcgen can name its subject.
#[derive(Debug, Clone)]
pub struct Source {
    /// SHA-256 of the bytes sent (the file as reviewed).
    pub sha256: [u8; 32],
    /// The subject name, DER, as the certificate carries it.
    pub subject_der: Vec<u8>,
    /// The subject name, as people read it.
    pub subject: String,
    /// The issuer name of the certificate sent, as people read it.
    pub issuer: String,
    /// Whether its signature verifies with its own key, which shows that
    /// its maker holds the key; otherwise nothing here shows it (its
    /// issuer's signature is not checked), which the officers are told
    /// when they confirm.
    pub self_signed: bool,
    /// The subject name for rcgen, which must encode it back to
    /// `subject_der` (checked on the TBS built).
    pub distinguished_name: DistinguishedName,
    /// The SubjectPublicKeyInfo, DER, as the certificate carries it.
    pub spki: Vec<u8>,
    /// The key's algorithm, as custody names it.
    pub algorithm: KeyAlgorithm,
    /// Its subjectKeyIdentifier, if it has one: the cross-certificate's.
    pub key_id: Option<Vec<u8>>,
}

fn bad(what: impl Into<String>) -> Error {
    Error::new(Reason::BadCrossSignCertificate, what)
}

/// The DER of a certificate sent as PEM (`CERTIFICATE`) or as DER.
fn der_of(bytes: &[u8]) -> Result<Vec<u8>, Error> {
    if !bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
        return Ok(bytes.to_vec());
    }
    let (_, pem) = x509_parser::pem::parse_x509_pem(bytes)
        .map_err(|e| bad(format!("the certificate is not PEM: {e}")))?;
    if pem.label != "CERTIFICATE" {
        return Err(bad(format!(
            "the PEM sent is a {:?}, not a CERTIFICATE",
            pem.label
        )));
    }
    Ok(pem.contents)
}

/// Whether two names are the same name for a person reading them: the
/// attribute values as text, case and runs of white space ignored (RFC
/// 4518's matching, near enough for names a forger re-encodes).
fn same_name(a: &X509Name<'_>, b: &X509Name<'_>) -> bool {
    let fold = |name: &X509Name<'_>| {
        name.to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    };
    fold(a) == fold(b)
}

/// Whether `spki` is the issuer's key (`issuer_spki`), compared as the
/// whole SubjectPublicKeyInfo and as the key bits alone.
fn is_issuer_key(spki: &SubjectPublicKeyInfo<'_>, issuer_spki: &[u8]) -> bool {
    let issuer_key = SubjectPublicKeyInfo::from_der(issuer_spki)
        .map(|(_, issuer)| issuer.subject_public_key.data.to_vec())
        .unwrap_or_default();
    spki.raw == issuer_spki || spki.subject_public_key.data.as_ref() == issuer_key.as_slice()
}

/// The certificate `bytes` checked, in this order, each refusal its own
/// reason: its SHA-256 is `expected` (CROSS_SIGN_MISMATCH, before anything
/// parses it); it is a certificate (BAD_CROSS_SIGN_CERTIFICATE); its key is
/// not the issuer's, whose SubjectPublicKeyInfo is `issuer_spki`
/// (CROSS_SIGN_IS_ISSUER_KEY); it is a CA certificate, basicConstraints cA
/// true (CROSS_SIGN_NOT_CA); its key is allowed (CROSS_SIGN_KEY_NOT_ALLOWED);
/// a self-issued certificate's signature verifies with its own key
/// (CROSS_SIGN_SIGNATURE_INVALID); its subject is one rcgen can rebuild
/// (CROSS_SIGN_SUBJECT_CHANGED; the bytes are compared on the TBS built).
/// Nothing here touches the HSM.
pub fn check(bytes: &[u8], expected: &[u8; 32], issuer_spki: &[u8]) -> Result<Source, Error> {
    let sha256: [u8; 32] = Sha256::digest(bytes).into();
    if &sha256 != expected {
        return Err(Error::new(
            Reason::CrossSignMismatch,
            format!(
                "the certificate sent (SHA-256 {}) is not the one the script names (SHA-256 {})",
                hex::encode(sha256),
                hex::encode(expected)
            ),
        ));
    }
    let der = der_of(bytes)?;
    let (rest, certificate) = X509Certificate::from_der(&der)
        .map_err(|e| bad(format!("the certificate does not parse: {e}")))?;
    if !rest.is_empty() {
        return Err(bad("the certificate has bytes after it"));
    }
    let spki = certificate.public_key();
    if is_issuer_key(spki, issuer_spki) {
        return Err(Error::new(
            Reason::CrossSignIsIssuerKey,
            "the certificate carries the issuing root's own public key: a root does not cross-sign itself",
        ));
    }
    let ca = certificate
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|constraints| constraints.value.ca);
    if !ca {
        return Err(Error::new(
            Reason::CrossSignNotCa,
            format!(
                "{} is not a CA certificate (no basicConstraints with cA true): only a CA is cross-signed",
                certificate.subject()
            ),
        ));
    }
    let algorithm = csr::allowed_key(spki, REFUSALS)?;
    // Possession is shown by a signature that verifies with the key the
    // certificate carries, whatever its issuer field says. One that does not
    // verify is refused when the issuer names the subject, compared as
    // RFC 5280 compares names (not byte for byte: a forger may encode the
    // same name another way to pass for another CA's certificate).
    let verified = certificate.verify_signature(None);
    if let Err(e) = &verified
        && same_name(certificate.issuer(), certificate.subject())
    {
        let why = match e {
            x509_parser::error::X509Error::SignatureUnsupportedAlgorithm => format!(
                "is signed with {}, which custodyd cannot check, so it does not show that its maker holds the key: ask for the certificate signed with ECDSA (SHA-256 or SHA-384) or RSA (PKCS#1 v1.5 or PSS)",
                certificate.signature_algorithm.algorithm
            ),
            _ => "does not verify with the key it carries: whoever made it did not show they hold that key".into(),
        };
        return Err(Error::new(
            Reason::CrossSignSignatureInvalid,
            format!(
                "{} names itself as its issuer, but its signature {why}",
                certificate.subject()
            ),
        ));
    }
    let key_id = certificate
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        });
    Ok(Source {
        sha256,
        subject_der: certificate.subject().as_raw().to_vec(),
        subject: certificate.subject().to_string(),
        issuer: certificate.issuer().to_string(),
        self_signed: verified.is_ok(),
        distinguished_name: csr::distinguished_name(certificate.subject(), REFUSALS)?,
        spki: spki.raw.to_vec(),
        algorithm,
        key_id,
    })
}

#[cfg(test)]
mod tests;
