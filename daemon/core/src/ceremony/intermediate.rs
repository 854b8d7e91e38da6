//! A subordinate CA certificate, issued by a custody root key for another
//! custody key's public key. Unlike the root's self-signed certificate it is
//! made in two moves with the officers between them: [`prepare`] builds the
//! to-be-signed certificate (rcgen, over a key that only records what it is
//! asked to sign) and lints it, so that officers can confirm its SHA-256;
//! [`sign_prepared`] has the HSM sign exactly those bytes, once they have,
//! assembles the certificate and verifies its signature with the root's
//! public key.

use std::cell::RefCell;

use der::asn1::{AnyRef, BitStringRef, Ia5String, ObjectIdentifier};
use der::{Decode, Encode};
use hsm_shim::{HsmSession, KeyLabel};
use rcgen::{
    BasicConstraints, CertificateParams, CrlDistributionPoint, CustomExtension,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, KeyIdMethod, KeyUsagePurpose, NameConstraints,
    PublicKeyData, SignatureAlgorithm, SigningKey,
};
use sha2::Digest;
use x509_parser::prelude::FromDer;

use crate::algorithms::KeyAlgorithm;
use crate::ceremony::certificate::{self, key_identifier, subject_name};
use crate::ceremony::lint;
use crate::ceremony::script::{CertificateSection, ProfileSection};
use crate::{Error, Reason};

fn unsupported(what: impl Into<String>) -> Error {
    Error::new(Reason::CertificateUnsupported, what)
}

/// What the issuer's certificate gives the certificate it issues: its
/// subject (the issuer name, byte for byte), its subject key identifier
/// (the authority key identifier) and its notAfter (the latest notAfter).
#[derive(Debug, Clone)]
pub struct IssuerCertificate {
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// Its subject name, DER.
    pub subject: Vec<u8>,
    /// Its subjectKeyIdentifier.
    pub key_id: Vec<u8>,
    /// Its notAfter, Unix seconds.
    pub not_after: i64,
}

/// Reads the issuer's certificate (PEM, as stored with its version).
pub fn issuer_certificate(pem: &str) -> Result<IssuerCertificate, Error> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| unsupported(format!("the issuer's certificate is not PEM: {e}")))?;
    let der = pem.contents;
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(&der)
        .map_err(|e| unsupported(format!("the issuer's certificate does not parse: {e}")))?;
    let key_id = parsed
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => {
                Some(id.0.to_vec())
            }
            _ => None,
        })
        .ok_or_else(|| unsupported("the issuer's certificate has no subjectKeyIdentifier"))?;
    Ok(IssuerCertificate {
        subject: parsed.subject().as_raw().to_vec(),
        key_id,
        not_after: parsed.validity().not_after.timestamp(),
        der: der.clone(),
    })
}

const OID_CERTIFICATE_POLICIES: &[u64] = &[2, 5, 29, 32];
const OID_AUTHORITY_INFO_ACCESS: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 1, 1];
const OID_AD_OCSP: &str = "1.3.6.1.5.5.7.48.1";
const OID_AD_CA_ISSUERS: &str = "1.3.6.1.5.5.7.48.2";

/// PolicyInformation, without qualifiers (RFC 5280 4.2.1.4).
#[derive(der::Sequence)]
struct PolicyInformation {
    policy: ObjectIdentifier,
}

/// AccessDescription with a uniformResourceIdentifier (RFC 5280 4.2.2.1).
#[derive(der::Sequence)]
struct AccessDescription {
    method: ObjectIdentifier,
    #[asn1(context_specific = "6", tag_mode = "IMPLICIT")]
    location: Ia5String,
}

/// A certificate, its parts as they are (RFC 5280 4.1).
#[derive(der::Sequence)]
struct CertificateParts<'a> {
    tbs: AnyRef<'a>,
    algorithm: AnyRef<'a>,
    signature: BitStringRef<'a>,
}

fn encoding(what: &str, e: impl std::fmt::Display) -> Error {
    unsupported(format!("{what} cannot be encoded: {e}"))
}

fn oid(text: &str) -> Result<ObjectIdentifier, Error> {
    ObjectIdentifier::new(text).map_err(|e| encoding(text, e))
}

fn certificate_policies(policies: &[String]) -> Result<Vec<u8>, Error> {
    policies
        .iter()
        .map(|p| oid(p).map(|policy| PolicyInformation { policy }))
        .collect::<Result<Vec<_>, _>>()?
        .to_der()
        .map_err(|e| encoding("certificatePolicies", e))
}

fn authority_info_access(profile: &ProfileSection) -> Result<Vec<u8>, Error> {
    let described = |method: &str, uri: &String| {
        Ok::<_, Error>(AccessDescription {
            method: oid(method)?,
            location: Ia5String::new(uri).map_err(|e| encoding(uri, e))?,
        })
    };
    profile
        .ocsp
        .iter()
        .map(|uri| described(OID_AD_OCSP, uri))
        .chain(
            profile
                .ca_issuers
                .iter()
                .map(|uri| described(OID_AD_CA_ISSUERS, uri)),
        )
        .collect::<Result<Vec<_>, _>>()?
        .to_der()
        .map_err(|e| encoding("authorityInformationAccess", e))
}

fn extended_key_usage(name: &str) -> Result<ExtendedKeyUsagePurpose, Error> {
    Ok(match name {
        "serverAuth" => ExtendedKeyUsagePurpose::ServerAuth,
        "clientAuth" => ExtendedKeyUsagePurpose::ClientAuth,
        "codeSigning" => ExtendedKeyUsagePurpose::CodeSigning,
        "emailProtection" => ExtendedKeyUsagePurpose::EmailProtection,
        "timeStamping" => ExtendedKeyUsagePurpose::TimeStamping,
        other => return Err(unsupported(format!("extended key usage {other}"))),
    })
}

/// The certificate's fields, in the CA/Browser Forum profile of a
/// subordinate CA certificate (Baseline Requirements 7.1.2.2): subject C,
/// O, CN; basicConstraints critical with cA and the profile's path length;
/// keyUsage critical; the profile's extensions; valid from `now` for the
/// script's days. The serial and key identifiers are set by [`prepare`].
pub fn intermediate_params(
    section: &CertificateSection,
    profile: &ProfileSection,
    now: time::OffsetDateTime,
) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = subject_name(section)?;
    params.is_ca = IsCa::Ca(match profile.path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    if profile.digital_signature {
        params.key_usages.push(KeyUsagePurpose::DigitalSignature);
    }
    params.extended_key_usages = profile
        .extended_key_usage
        .iter()
        .map(|name| extended_key_usage(name))
        .collect::<Result<_, _>>()?;
    if !profile.permitted_dns_names.is_empty() || !profile.excluded_dns_names.is_empty() {
        let subtrees = |names: &[String]| {
            names
                .iter()
                .map(|n| GeneralSubtree::DnsName(n.clone()))
                .collect()
        };
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: subtrees(&profile.permitted_dns_names),
            excluded_subtrees: subtrees(&profile.excluded_dns_names),
        });
    }
    if !profile.crl_distribution_points.is_empty() {
        params.crl_distribution_points = vec![CrlDistributionPoint {
            uris: profile.crl_distribution_points.clone(),
        }];
    }
    if !profile.certificate_policies.is_empty() {
        params
            .custom_extensions
            .push(CustomExtension::from_oid_content(
                OID_CERTIFICATE_POLICIES,
                certificate_policies(&profile.certificate_policies)?,
            ));
    }
    if !profile.ocsp.is_empty() || !profile.ca_issuers.is_empty() {
        params
            .custom_extensions
            .push(CustomExtension::from_oid_content(
                OID_AUTHORITY_INFO_ACCESS,
                authority_info_access(profile)?,
            ));
    }
    params.use_authority_key_identifier_extension = true;
    params.not_before = now;
    params.not_after = now + time::Duration::days(i64::from(section.validity_days));
    Ok(params)
}

/// The issuer's key as rcgen sees it while the TBS is built: it keeps what
/// it is asked to sign and signs nothing.
pub(crate) struct Recorder {
    pub(crate) public_key: Vec<u8>,
    pub(crate) rcgen: &'static SignatureAlgorithm,
    pub(crate) asked: RefCell<Option<Vec<u8>>>,
}

impl PublicKeyData for Recorder {
    fn der_bytes(&self) -> &[u8] {
        &self.public_key
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.rcgen
    }
}

impl SigningKey for Recorder {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        *self.asked.borrow_mut() = Some(message.to_vec());
        Ok(Vec::new())
    }
}

/// The certified key: its SubjectPublicKeyInfo as custody holds it.
struct Subject {
    spki: Vec<u8>,
    public_key: Vec<u8>,
    rcgen: &'static SignatureAlgorithm,
}

impl PublicKeyData for Subject {
    fn subject_public_key_info(&self) -> Vec<u8> {
        self.spki.clone()
    }

    fn der_bytes(&self) -> &[u8] {
        &self.public_key
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.rcgen
    }
}

/// A linted TBS, waiting for the officers' confirmation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The TBSCertificate, DER: what the HSM will sign.
    pub tbs: Vec<u8>,
    /// The certificate's signatureAlgorithm, DER.
    pub signature_algorithm: Vec<u8>,
    /// SHA-256 of `tbs`: what officers confirm.
    pub tbs_sha256: [u8; 32],
}

pub(crate) fn subject_public_key(spki: &[u8]) -> Result<Vec<u8>, Error> {
    spki::SubjectPublicKeyInfoRef::from_der(spki)
        .map(|info| info.subject_public_key.raw_bytes().to_vec())
        .map_err(|e| unsupported(format!("a public key does not parse: {e}")))
}

/// The two keys of a certificate: the issuer's, which signs, and the
/// subject's, which is certified (SubjectPublicKeyInfo DER each).
#[derive(Debug, Clone, Copy)]
pub struct Keys<'a> {
    /// The issuer's algorithm.
    pub issuer_algorithm: KeyAlgorithm,
    /// The issuer's public key.
    pub issuer_spki: &'a [u8],
    /// The certified key's algorithm.
    pub subject_algorithm: KeyAlgorithm,
    /// The certified key's public key.
    pub subject_spki: &'a [u8],
    /// The certified key's subjectKeyIdentifier when it has one already
    /// (a cross-certificate keeps its source's); else it is computed.
    pub subject_key_id: Option<&'a [u8]>,
}

/// Builds the TBS the issuer (its certificate `issuer`, its key in `keys`)
/// would sign for the subject key of `keys`, with `params` (serial set) and
/// the key identifiers, and lints it against the subordinate CA profile
/// under `issuer`: nothing is signed here. The TBS's SubjectPublicKeyInfo
/// must be the subject's, byte for byte.
pub fn prepare(
    issuer: &IssuerCertificate,
    keys: &Keys<'_>,
    params: &CertificateParams,
    profile: &ProfileSection,
    validity_days: u32,
) -> Result<Prepared, Error> {
    let recorder = Recorder {
        public_key: subject_public_key(keys.issuer_spki)?,
        rcgen: certificate::rcgen_for(keys.issuer_algorithm)?,
        asked: RefCell::new(None),
    };
    let issuer_rcgen = rcgen::Issuer::from_ca_cert_der(&issuer.der.as_slice().into(), &recorder)
        .map_err(|e| unsupported(format!("the issuer's certificate: {e}")))?;
    let subject = Subject {
        spki: keys.subject_spki.to_vec(),
        public_key: subject_public_key(keys.subject_spki)?,
        rcgen: certificate::rcgen_for(keys.subject_algorithm)?,
    };
    let mut params = params.clone();
    params.key_identifier_method = KeyIdMethod::PreSpecified(
        keys.subject_key_id
            .map_or_else(|| key_identifier(&subject.public_key), <[u8]>::to_vec),
    );
    let built = params
        .signed_by(&subject, &issuer_rcgen)
        .map_err(|e| Error::internal(format!("building the certificate: {e}")))?;
    let tbs = recorder
        .asked
        .take()
        .ok_or_else(|| Error::internal("rcgen asked for no signature"))?;
    let certified = x509_parser::certificate::TbsCertificate::from_der(&tbs)
        .map(|(_, parsed)| parsed.subject_pki.raw == keys.subject_spki)
        .unwrap_or(false);
    if !certified {
        return Err(unsupported(
            "the certificate built does not carry the certified key's public key as custody holds it",
        ));
    }
    let passed = lint::lint(
        &tbs,
        &lint::Profile {
            ca: true,
            path_len: profile.path_len.map(u32::from),
            validity_days,
            issuer_name: Some(issuer.subject.clone()),
            issuer_key_id: issuer.key_id.clone(),
            issuer_not_after: Some(issuer.not_after),
        },
    )
    .map_err(lint::Finding::into_error)?;
    let signature_algorithm = signature_algorithm_of(built.der())?;
    Ok(Prepared {
        tbs,
        signature_algorithm,
        tbs_sha256: passed.tbs_sha256,
    })
}

/// What a signed TBS becomes: how its signature is checked with the
/// issuer's public key, and how it is written out.
#[derive(Debug, Clone, Copy)]
pub struct Product {
    /// Verifies the signed object (DER) with the issuer's SubjectPublicKeyInfo.
    pub verify: fn(&[u8], &[u8]) -> Result<(), Error>,
    /// The signed object as PEM.
    pub pem: fn(&[u8]) -> Result<String, Error>,
}

/// A certificate: verified as one, written as `CERTIFICATE`.
pub const CERTIFICATE: Product = Product {
    verify: certificate::verify,
    pem,
};

/// The HSM signs the prepared TBS with the issuer's key (labelled `label`,
/// of `issuer_algorithm`), if its SHA-256 is still `confirmed`; the signed
/// object (a certificate or a CRL: `product`) is assembled and its
/// signature verified with `issuer_spki` before it is returned, as PEM.
pub fn sign_prepared(
    session: &mut HsmSession,
    label: &KeyLabel,
    issuer_algorithm: KeyAlgorithm,
    issuer_spki: &[u8],
    prepared: &Prepared,
    confirmed: &[u8; 32],
    product: Product,
) -> hsm_shim::Result<Result<String, Error>> {
    if sha2::Sha256::digest(&prepared.tbs).as_slice() != confirmed {
        return Ok(Err(Error::internal(
            "the TBS is not the one the officers confirmed",
        )));
    }
    let Some(algorithm) = issuer_algorithm.sign_algorithm() else {
        return Ok(Err(unsupported("the issuer's key does not sign")));
    };
    let signature = certificate::hsm_sign(session, label, algorithm, &prepared.tbs)?;
    Ok(assemble(prepared, &signature).and_then(|der| {
        (product.verify)(&der, issuer_spki)?;
        (product.pem)(&der)
    }))
}

/// The signatureAlgorithm of the certificate `der`, DER.
pub fn signature_algorithm_of(der: &[u8]) -> Result<Vec<u8>, Error> {
    CertificateParts::from_der(der)
        .and_then(|parts| parts.algorithm.to_der())
        .map_err(|e| Error::internal(format!("the certificate's signatureAlgorithm: {e}")))
}

/// The certificate: the TBS, its algorithm, the signature.
pub fn assemble(prepared: &Prepared, signature: &[u8]) -> Result<Vec<u8>, Error> {
    let broken = |e: der::Error| Error::internal(format!("assembling the certificate: {e}"));
    CertificateParts {
        tbs: AnyRef::from_der(&prepared.tbs).map_err(broken)?,
        algorithm: AnyRef::from_der(&prepared.signature_algorithm).map_err(broken)?,
        signature: BitStringRef::from_bytes(signature).map_err(broken)?,
    }
    .to_der()
    .map_err(broken)
}

/// A certificate as PEM.
pub fn pem(der: &[u8]) -> Result<String, Error> {
    der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, der)
        .map_err(|e| Error::internal(format!("the certificate as PEM: {e}")))
}

/// What officers read of a TBS before they confirm its SHA-256: subject,
/// issuer, serial, validity, the certified key's fingerprint and the
/// extensions, one line each.
pub fn summary(tbs: &[u8]) -> Vec<String> {
    let Ok((_, tbs)) = x509_parser::certificate::TbsCertificate::from_der(tbs) else {
        return vec!["(the TBS does not parse)".into()];
    };
    let mut lines = vec![
        format!("subject: {}", tbs.subject),
        format!("issuer: {}", tbs.issuer),
        format!("serial: {}", hex::encode(tbs.raw_serial())),
        format!(
            "validity: {} to {}",
            tbs.validity.not_before, tbs.validity.not_after
        ),
        format!(
            "public key SHA-256: {}",
            hex::encode(sha2::Sha256::digest(tbs.subject_pki.raw))
        ),
    ];
    for extension in tbs.extensions() {
        use x509_parser::extensions::ParsedExtension as P;
        let what = match extension.parsed_extension() {
            P::BasicConstraints(b) => format!(
                "basicConstraints cA={} pathLen={}",
                b.ca,
                b.path_len_constraint
                    .map_or_else(|| "none".to_owned(), |n| n.to_string())
            ),
            P::KeyUsage(k) => format!("keyUsage {k}"),
            P::ExtendedKeyUsage(e) => format!(
                "extendedKeyUsage serverAuth={} clientAuth={} codeSigning={} emailProtection={} timeStamping={}",
                e.server_auth, e.client_auth, e.code_signing, e.email_protection, e.time_stamping
            ),
            P::SubjectKeyIdentifier(id) => format!("subjectKeyIdentifier {}", hex::encode(id.0)),
            P::AuthorityKeyIdentifier(id) => format!(
                "authorityKeyIdentifier {}",
                id.key_identifier
                    .as_ref()
                    .map(|k| hex::encode(k.0))
                    .unwrap_or_default()
            ),
            P::NameConstraints(_) => "nameConstraints".to_owned(),
            P::CertificatePolicies(p) => format!(
                "certificatePolicies {}",
                p.iter()
                    .map(|p| p.policy_id.to_id_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            P::CRLDistributionPoints(_) => "cRLDistributionPoints".to_owned(),
            P::AuthorityInfoAccess(_) => "authorityInformationAccess".to_owned(),
            _ => format!("extension {}", extension.oid),
        };
        let critical = if extension.critical {
            " (critical)"
        } else {
            ""
        };
        lines.push(format!("{what}{critical}"));
    }
    lines
}

#[cfg(test)]
mod tests;
