//! The self-signed root certificate of a root-key ceremony: built by rcgen,
//! signed inside the HSM by the key the ceremony just made (rcgen's
//! `SigningKey` over an HSM session), so the private key never leaves.

use std::cell::RefCell;

use hsm_shim::{EcdsaEncoding, HsmSession, KeyLabel, SignAlgorithm, SignInput};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyIdMethod,
    KeyUsagePurpose, PublicKeyData, SignatureAlgorithm, SigningKey,
};
use spki::der::Decode;

use crate::algorithms::KeyAlgorithm;
use crate::ceremony::lint;
use crate::ceremony::script::CertificateSection;
use crate::{Error, Reason};

fn unsupported(what: String) -> Error {
    Error::new(Reason::CertificateUnsupported, what)
}

/// The certificate's fields, in the CA/Browser Forum profile of a root CA
/// certificate (Baseline Requirements 7.1.2.1): subject C, O, CN in that
/// order; basicConstraints critical, cA with no path length; keyUsage
/// critical, keyCertSign and cRLSign; subject and authority key
/// identifiers (the same, as the certificate is self-signed); valid from
/// now for the script's days. The serial is drawn in the HSM by
/// [`self_sign`].
pub fn root_params(
    section: &CertificateSection,
    ceremony: &str,
) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = subject_name(section)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    // The key identifier (RFC 7093 method 1) is set by [`self_sign`], which
    // has the public key.
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now;
    params.not_after = now + time::Duration::days(i64::from(section.validity_days));
    tracing::debug!(ceremony, "root certificate parameters ready");
    Ok(params)
}

/// The subject name C, O, CN, in that order (the CA/Browser Forum
/// profile's order).
pub fn subject_name(section: &CertificateSection) -> Result<DistinguishedName, Error> {
    let mut name = DistinguishedName::new();
    // X.520 countryName is a PrintableString (two capital letters, checked
    // by the script's validation).
    let country = rcgen::string::PrintableString::try_from(section.country.as_str())
        .map_err(|e| unsupported(format!("certificate.country: {e}")))?;
    name.push(
        DnType::CountryName,
        rcgen::DnValue::PrintableString(country),
    );
    name.push(DnType::OrganizationName, section.organization.clone());
    name.push(DnType::CommonName, section.common_name.clone());
    Ok(name)
}

/// Bytes of a certificate serial: 16 from the HSM's random number
/// generator, the top two bits set to 01 so that the number is positive
/// and its DER encoding is always 16 bytes long (126 random bits; the
/// Baseline Requirements ask for at least 64).
const SERIAL_BYTES: usize = 16;

/// The subject key identifier of a public key (the subjectPublicKey bits):
/// the leftmost 160 bits of their SHA-256 (RFC 7093, section 2, method 1).
/// A self-signed certificate's authority key identifier is the same.
pub fn key_identifier(subject_public_key: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(subject_public_key)[..20].to_vec()
}

/// A certificate serial drawn from the HSM's random number generator.
pub fn serial_from_hsm(session: &mut HsmSession) -> hsm_shim::Result<rcgen::SerialNumber> {
    let mut serial = [0u8; SERIAL_BYTES];
    session.random(&mut serial)?;
    serial[0] = (serial[0] & 0x3f) | 0x40;
    Ok(rcgen::SerialNumber::from_slice(&serial))
}

fn rcgen_algorithm(algorithm: SignAlgorithm) -> Option<&'static SignatureAlgorithm> {
    use hsm_shim::HashAlg;
    match algorithm {
        SignAlgorithm::EcdsaP256Sha256 => Some(&rcgen::PKCS_ECDSA_P256_SHA256),
        SignAlgorithm::EcdsaP384Sha384 => Some(&rcgen::PKCS_ECDSA_P384_SHA384),
        SignAlgorithm::Ed25519 => Some(&rcgen::PKCS_ED25519),
        SignAlgorithm::RsaPkcs1v15(HashAlg::Sha256) => Some(&rcgen::PKCS_RSA_SHA256),
        SignAlgorithm::RsaPkcs1v15(HashAlg::Sha384) => Some(&rcgen::PKCS_RSA_SHA384),
        SignAlgorithm::RsaPkcs1v15(HashAlg::Sha512) => Some(&rcgen::PKCS_RSA_SHA512),
        // rcgen cannot express RSASSA-PSS parameters for a remote key.
        SignAlgorithm::RsaPss(_) => None,
    }
}

/// rcgen's name for the signature algorithm of keys of `algorithm`, or
/// CERTIFICATE_UNSUPPORTED.
pub fn rcgen_for(algorithm: KeyAlgorithm) -> Result<&'static SignatureAlgorithm, Error> {
    algorithm
        .sign_algorithm()
        .and_then(rcgen_algorithm)
        .ok_or_else(|| {
            unsupported(format!(
                "no certificate signed by {} keys: use ECDSA, Ed25519 or RSA PKCS#1",
                algorithm.api_name()
            ))
        })
}

/// The HSM signs `message` (a TBS) with the key labelled `label`: a digest
/// made here for every algorithm that signs one (the HSM then signs it as
/// it is); Ed25519 signs the message itself. ECDSA signatures are DER, as
/// certificates carry them.
pub fn hsm_sign(
    session: &mut HsmSession,
    label: &KeyLabel,
    algorithm: SignAlgorithm,
    message: &[u8],
) -> hsm_shim::Result<Vec<u8>> {
    let digest = algorithm
        .hash()
        .map(|hash| crate::algorithms::hash_bytes(hash, message));
    let input = digest
        .as_deref()
        .map_or(SignInput::Message(message), SignInput::Digest);
    session.sign(label, algorithm, input, EcdsaEncoding::Der)
}

/// Whether a root certificate can be made for keys of `algorithm`.
pub fn supported(algorithm: KeyAlgorithm) -> bool {
    algorithm
        .sign_algorithm()
        .and_then(rcgen_algorithm)
        .is_some()
}

/// The HSM key, as rcgen sees it: what rcgen asks it to sign is the TBS,
/// which is linted against `profile` before the HSM sees it.
struct HsmKey<'s> {
    session: RefCell<&'s mut HsmSession>,
    label: KeyLabel,
    algorithm: SignAlgorithm,
    rcgen: &'static SignatureAlgorithm,
    public_key: Vec<u8>,
    profile: lint::Profile,
    /// The lint's outcome, once rcgen asked for a signature.
    linted: RefCell<Option<Result<lint::Passed, lint::Finding>>>,
    /// An HSM failure, kept for the caller (rcgen's error cannot carry it).
    failed: RefCell<Option<hsm_shim::HsmError>>,
}

impl PublicKeyData for HsmKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.public_key
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.rcgen
    }
}

impl SigningKey for HsmKey<'_> {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        // The lint comes first: a TBS that breaks a rule never reaches the
        // HSM.
        let linted = lint::lint(message, &self.profile);
        let refused = linted.is_err();
        *self.linted.borrow_mut() = Some(linted);
        if refused {
            return Err(rcgen::Error::RemoteKeyError);
        }
        let mut session = self.session.borrow_mut();
        hsm_sign(&mut session, &self.label, self.algorithm, message).map_err(|error| {
            tracing::error!(%error, "the HSM refused to sign the root certificate");
            *self.failed.borrow_mut() = Some(error);
            rcgen::Error::RemoteKeyError
        })
    }
}

/// A certificate a ceremony made: PEM, and what the transcript says of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The certificate, PEM.
    pub pem: String,
    /// SHA-256 of the TBS the lint passed and the HSM signed.
    pub tbs_sha256: [u8; 32],
}

/// Makes the certificate for the key labelled `label` (whose public key is
/// `spki`), with a serial drawn from the HSM's random number generator:
/// the TBS is linted ([`lint`]) before the HSM signs it, and the signature
/// is verified with `spki` (outside the HSM, by x509-parser) before the
/// certificate is returned as PEM.
pub fn self_sign(
    session: &mut HsmSession,
    label: &KeyLabel,
    algorithm: KeyAlgorithm,
    spki: &[u8],
    params: &CertificateParams,
    validity_days: u32,
) -> hsm_shim::Result<Result<Signed, Error>> {
    let Some(sign_algorithm) = algorithm.sign_algorithm() else {
        return Ok(Err(unsupported(format!(
            "{} keys do not sign",
            algorithm.api_name()
        ))));
    };
    let Some(rcgen) = rcgen_algorithm(sign_algorithm) else {
        return Ok(Err(unsupported(format!(
            "no root certificate for {} keys: use ECDSA, Ed25519 or RSA PKCS#1",
            algorithm.api_name()
        ))));
    };
    let public_key = match spki::SubjectPublicKeyInfoRef::from_der(spki) {
        Ok(info) => info.subject_public_key.raw_bytes().to_vec(),
        Err(e) => {
            return Ok(Err(unsupported(format!(
                "the public key does not parse: {e}"
            ))));
        }
    };
    let key_id = key_identifier(&public_key);
    let mut params = params.clone();
    params.serial_number = Some(serial_from_hsm(session)?);
    params.key_identifier_method = KeyIdMethod::PreSpecified(key_id.clone());
    let key = HsmKey {
        session: RefCell::new(session),
        label: label.clone(),
        algorithm: sign_algorithm,
        rcgen,
        public_key,
        profile: lint::Profile {
            ca: true,
            path_len: None,
            validity_days,
            issuer_name: None,
            issuer_key_id: key_id,
            issuer_not_after: None,
        },
        linted: RefCell::new(None),
        failed: RefCell::new(None),
    };
    let made = params.self_signed(&key);
    if let Some(error) = key.failed.take() {
        return Err(error);
    }
    let passed = match key.linted.take() {
        Some(Ok(passed)) => passed,
        Some(Err(finding)) => return Ok(Err(finding.into_error())),
        None => return Ok(Err(Error::internal("rcgen asked for no signature"))),
    };
    let certificate = match made {
        Ok(certificate) => certificate,
        Err(e) => {
            return Ok(Err(Error::internal(format!(
                "signing the root certificate: {e}"
            ))));
        }
    };
    if let Err(error) = verify(certificate.der(), spki) {
        return Ok(Err(error));
    }
    Ok(Ok(Signed {
        pem: certificate.pem(),
        tbs_sha256: passed.tbs_sha256,
    }))
}

/// Verifies the certificate `der`'s signature with the issuer's public key
/// `issuer_spki` (DER), outside the HSM.
pub fn verify(der: &[u8], issuer_spki: &[u8]) -> Result<(), Error> {
    use x509_parser::prelude::FromDer;
    let unverified = |what: String| Error::new(Reason::CertificateUnverified, what);
    let (_, certificate) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| unverified(format!("the signed certificate does not parse: {e}")))?;
    let (_, issuer) = x509_parser::x509::SubjectPublicKeyInfo::from_der(issuer_spki)
        .map_err(|e| unverified(format!("the issuer's public key does not parse: {e}")))?;
    certificate
        .verify_signature(Some(&issuer))
        .map_err(|e| unverified(format!("the HSM's signature does not verify: {e}")))
}
