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
use crate::ceremony::script::CertificateSection;
use crate::{Error, Reason};

fn unsupported(what: String) -> Error {
    Error::new(Reason::CertificateUnsupported, what)
}

/// The certificate's fields: a CA with path length unconstrained, key usage
/// keyCertSign and cRLSign, valid from now for the script's days.
pub fn root_params(
    section: &CertificateSection,
    ceremony: &str,
) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, section.common_name.clone());
    if let Some(organization) = &section.organization {
        name.push(DnType::OrganizationName, organization.clone());
    }
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.key_identifier_method = KeyIdMethod::Sha256;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now;
    params.not_after = now + time::Duration::days(i64::from(section.validity_days));
    // A serial number that is unique per ceremony and not guessable.
    let mut serial = [0u8; 16];
    getrandom::getrandom(&mut serial).map_err(|e| Error::internal(e.to_string()))?;
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    tracing::debug!(ceremony, "root certificate parameters ready");
    Ok(params)
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

/// Whether a root certificate can be made for keys of `algorithm`.
pub fn supported(algorithm: KeyAlgorithm) -> bool {
    algorithm
        .sign_algorithm()
        .and_then(rcgen_algorithm)
        .is_some()
}

/// The HSM key, as rcgen sees it.
struct HsmKey<'s> {
    session: RefCell<&'s mut HsmSession>,
    label: KeyLabel,
    algorithm: SignAlgorithm,
    rcgen: &'static SignatureAlgorithm,
    public_key: Vec<u8>,
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
        // A digest made here for every algorithm that signs one (the HSM
        // then signs it as it is); Ed25519 signs the message itself.
        let digest = self
            .algorithm
            .hash()
            .map(|hash| crate::algorithms::hash_bytes(hash, message));
        let input = digest
            .as_deref()
            .map_or(SignInput::Message(message), SignInput::Digest);
        let mut session = self.session.borrow_mut();
        session
            .sign(&self.label, self.algorithm, input, EcdsaEncoding::Der)
            .map_err(|error| {
                tracing::error!(%error, "the HSM refused to sign the root certificate");
                rcgen::Error::RemoteKeyError
            })
    }
}

/// Makes the certificate for the key labelled `label` (whose public key is
/// `spki`), signed by that key in the HSM. Returns it as PEM.
pub fn self_sign(
    session: &mut HsmSession,
    label: &KeyLabel,
    algorithm: KeyAlgorithm,
    spki: &[u8],
    params: &CertificateParams,
) -> hsm_shim::Result<Result<String, Error>> {
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
    let key = HsmKey {
        session: RefCell::new(session),
        label: label.clone(),
        algorithm: sign_algorithm,
        rcgen,
        public_key,
    };
    Ok(params
        .self_signed(&key)
        .map(|certificate| certificate.pem())
        .map_err(|e| Error::internal(format!("signing the root certificate: {e}"))))
}
