//! A PKCS#10 certification request (RFC 2986) an intermediate ceremony
//! certifies instead of a custody key: an issuing CA whose key lives
//! outside custody. The script names the CSR file by SHA-256; custodyctl
//! sends its bytes with the ceremony start. What the certificate takes from
//! it is the subject name and the public key, nothing else: the extensions
//! it requests (basicConstraints, keyUsage, ...) are ignored, the profile is
//! the reviewed script's. Parsing and the self-signature check are
//! x509-parser's (its `verify` feature, over ring).

use rcgen::{DistinguishedName, DnType, DnValue};
use sha2::{Digest, Sha256};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::der_parser::asn1_rs::Tag;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::{SubjectPublicKeyInfo, X509Name};

use crate::algorithms::KeyAlgorithm;
use crate::{Error, Reason};

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_RSA: &str = "1.2.840.113549.1.1.1";

/// A CSR that passed every check: its bytes are the script's, it is signed
/// by the key it carries, the key is allowed and is not the issuer's.
#[derive(Debug, Clone)]
pub struct Csr {
    /// SHA-256 of the bytes sent (the file as reviewed).
    pub sha256: [u8; 32],
    /// The subject name, DER, as the CSR carries it.
    pub subject_der: Vec<u8>,
    /// The subject name, as people read it.
    pub subject: String,
    /// The subject name for rcgen, which must encode it back to
    /// `subject_der` (checked on the TBS built).
    pub distinguished_name: DistinguishedName,
    /// The SubjectPublicKeyInfo, DER, as the CSR carries it.
    pub spki: Vec<u8>,
    /// The key's algorithm, as custody names it (its signature scheme is
    /// what the key's owner uses, not custody's concern).
    pub algorithm: KeyAlgorithm,
    /// How many extensions the CSR requested (all ignored).
    pub requested_extensions: usize,
}

fn bad(what: impl Into<String>) -> Error {
    Error::new(Reason::BadCsr, what)
}

/// The DER of a CSR sent as PEM (`CERTIFICATE REQUEST`, or the older `NEW
/// CERTIFICATE REQUEST`) or as DER.
fn der_of(bytes: &[u8]) -> Result<Vec<u8>, Error> {
    if !bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
        return Ok(bytes.to_vec());
    }
    let (_, pem) = x509_parser::pem::parse_x509_pem(bytes)
        .map_err(|e| bad(format!("the CSR is not PEM: {e}")))?;
    if pem.label != "CERTIFICATE REQUEST" && pem.label != "NEW CERTIFICATE REQUEST" {
        return Err(bad(format!(
            "the PEM sent is a {:?}, not a CERTIFICATE REQUEST",
            pem.label
        )));
    }
    Ok(pem.contents)
}

/// Who refuses what, for the checks a CSR and a certificate to cross-sign
/// share: the reason for a subject rcgen cannot rebuild, the reason for a
/// key not allowed, and what the object is called in messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Refusals {
    pub(crate) subject: Reason,
    pub(crate) key: Reason,
    pub(crate) malformed: Reason,
    pub(crate) whose: &'static str,
}

const CSR: Refusals = Refusals {
    subject: Reason::BadCsr,
    key: Reason::CsrKeyNotAllowed,
    malformed: Reason::BadCsr,
    whose: "the CSR's",
};

/// The subject as rcgen builds names: one attribute per RDN, each a
/// PrintableString or UTF8String (what the Baseline Requirements allow).
pub(crate) fn distinguished_name(
    name: &X509Name<'_>,
    refusals: Refusals,
) -> Result<DistinguishedName, Error> {
    let whose = refusals.whose;
    let bad = |what: String| Error::new(refusals.subject, format!("{whose} subject {what}"));
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let [attribute] = rdn.iter().collect::<Vec<_>>()[..] else {
            return Err(bad("has an RDN of more than one attribute".into()));
        };
        let oid = attribute
            .attr_type()
            .iter()
            .ok_or_else(|| bad("has an attribute type out of range".into()))?
            .collect::<Vec<_>>();
        let value = attribute.attr_value();
        let text = std::str::from_utf8(value.data)
            .map_err(|_| bad("has an attribute that is not text".into()))?;
        let value = match value.header.tag() {
            Tag::PrintableString => DnValue::PrintableString(
                text.try_into()
                    .map_err(|_| bad("has a bad PrintableString".into()))?,
            ),
            Tag::Utf8String => DnValue::Utf8String(text.to_owned()),
            other => {
                return Err(bad(format!(
                    "has a {other:?} attribute: only PrintableString and UTF8String are certified"
                )));
            }
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    Ok(dn)
}

/// The key algorithm of `spki` if a subordinate CA may have it: ECDSA on
/// P-256 or P-384, RSA of 2048, 3072 or 4096 bits (Baseline Requirements
/// 6.1.5, as custody's own keys).
pub(crate) fn allowed_key(
    spki: &SubjectPublicKeyInfo<'_>,
    refusals: Refusals,
) -> Result<KeyAlgorithm, Error> {
    let whose = refusals.whose;
    let not_allowed = |what: String| {
        Error::new(
            refusals.key,
            format!(
                "{whose} key is {what}: a subordinate CA's key is ECDSA P-256 or P-384, or RSA of 2048, 3072 or 4096 bits"
            ),
        )
    };
    let algorithm = spki.algorithm.algorithm.to_id_string();
    match algorithm.as_str() {
        OID_EC_PUBLIC_KEY => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| oid.to_id_string())
                .unwrap_or_default();
            match curve.as_str() {
                OID_P256 => Ok(KeyAlgorithm::EcSignP256Sha256),
                OID_P384 => Ok(KeyAlgorithm::EcSignP384Sha384),
                other => Err(not_allowed(format!("ECDSA on curve {other:?}"))),
            }
        }
        OID_RSA => {
            let bits = match spki.parsed() {
                Ok(PublicKey::RSA(rsa)) => rsa.key_size(),
                _ => {
                    return Err(Error::new(
                        refusals.malformed,
                        format!("{whose} RSA key does not parse"),
                    ));
                }
            };
            match bits {
                2048 => Ok(KeyAlgorithm::RsaSignPkcs12048Sha256),
                3072 => Ok(KeyAlgorithm::RsaSignPkcs13072Sha256),
                4096 => Ok(KeyAlgorithm::RsaSignPkcs14096Sha256),
                other => Err(not_allowed(format!("RSA of {other} bits"))),
            }
        }
        other => Err(not_allowed(format!("of algorithm {other}"))),
    }
}

/// The CSR `bytes` checked, in this order, each refusal its own reason:
/// its SHA-256 is `expected` (CSR_MISMATCH, before anything parses it); it
/// is a CSR (BAD_CSR); its key is not the issuer's, whose
/// SubjectPublicKeyInfo is `issuer_spki` (CSR_IS_ISSUER_KEY: checked before
/// the signature, since whoever presents the root's key cannot have signed
/// with it outside custody); its key is allowed (CSR_KEY_NOT_ALLOWED); its
/// self-signature verifies (CSR_SIGNATURE_INVALID). Nothing here touches
/// the HSM.
pub fn check(bytes: &[u8], expected: &[u8; 32], issuer_spki: &[u8]) -> Result<Csr, Error> {
    let sha256: [u8; 32] = Sha256::digest(bytes).into();
    if &sha256 != expected {
        return Err(Error::new(
            Reason::CsrMismatch,
            format!(
                "the CSR sent (SHA-256 {}) is not the one the script names (SHA-256 {})",
                hex::encode(sha256),
                hex::encode(expected)
            ),
        ));
    }
    let der = der_of(bytes)?;
    let (rest, request) = X509CertificationRequest::from_der(&der)
        .map_err(|e| bad(format!("the CSR does not parse: {e}")))?;
    if !rest.is_empty() {
        return Err(bad("the CSR has bytes after it"));
    }
    let info = &request.certification_request_info;
    let issuer_key = SubjectPublicKeyInfo::from_der(issuer_spki)
        .map(|(_, issuer)| issuer.subject_public_key.data.to_vec())
        .unwrap_or_default();
    if info.subject_pki.raw == issuer_spki
        || info.subject_pki.subject_public_key.data.as_ref() == issuer_key.as_slice()
    {
        return Err(Error::new(
            Reason::CsrIsIssuerKey,
            "the CSR carries the issuing root's own public key: a root does not certify itself as a subordinate",
        ));
    }
    let algorithm = allowed_key(&info.subject_pki, CSR)?;
    request.verify_signature().map_err(|e| {
        Error::new(
            Reason::CsrSignatureInvalid,
            format!("the CSR's self-signature does not verify with the key it carries: {e}"),
        )
    })?;
    Ok(Csr {
        sha256,
        subject_der: info.subject.as_raw().to_vec(),
        subject: info.subject.to_string(),
        distinguished_name: distinguished_name(&info.subject, CSR)?,
        spki: info.subject_pki.raw.to_vec(),
        algorithm,
        requested_extensions: request
            .requested_extensions()
            .map_or(0, |extensions| extensions.count()),
    })
}

#[cfg(test)]
mod tests;
