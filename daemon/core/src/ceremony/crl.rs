//! A certificate revocation list (RFC 5280 section 5) signed by a custody
//! root key. As with a subordinate CA certificate it is made in two moves
//! with the officers between them: [`prepare`] builds the to-be-signed
//! CRL (rcgen, over a key that only records what it is asked to sign) and
//! lints it ([`lint`]), so that officers can confirm its SHA-256;
//! [`crate::ceremony::intermediate::sign_prepared`] has the HSM sign exactly those bytes once they have,
//! assembles the CRL and verifies its signature with the root's public key.

pub mod lint;

use std::cell::RefCell;

use rcgen::{
    CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber,
};
use time::OffsetDateTime;
use x509_parser::prelude::FromDer;

use crate::algorithms::KeyAlgorithm;
use crate::ceremony::certificate;
use crate::ceremony::intermediate::{
    IssuerCertificate, Prepared, Product, Recorder, signature_algorithm_of, subject_public_key,
};
use crate::ceremony::script::{CRL_REASONS, CrlSection};
use crate::{Error, Reason};

fn unsupported(what: impl Into<String>) -> Error {
    Error::new(Reason::CertificateUnsupported, what)
}

/// rcgen's reason for an RFC 5280 name the script allows; `None` for
/// `unspecified`, which the Baseline Requirements want left out.
fn reason(name: &str) -> Result<Option<RevocationReason>, Error> {
    Ok(Some(match name {
        "unspecified" => return Ok(None),
        "keyCompromise" => RevocationReason::KeyCompromise,
        "cACompromise" => RevocationReason::CaCompromise,
        "affiliationChanged" => RevocationReason::AffiliationChanged,
        "superseded" => RevocationReason::Superseded,
        "cessationOfOperation" => RevocationReason::CessationOfOperation,
        "privilegeWithdrawn" => RevocationReason::PrivilegeWithdrawn,
        other => return Err(unsupported(format!("revocation reason {other}"))),
    }))
}

/// The CRLReason value of a reason the script allows.
pub fn reason_code(name: &str) -> Option<u8> {
    CRL_REASONS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, code)| *code)
}

fn time_of(seconds: i64) -> Result<OffsetDateTime, Error> {
    OffsetDateTime::from_unix_timestamp(seconds).map_err(|e| Error::internal(e.to_string()))
}

/// What the CRL says beyond its entries: when, and which number.
#[derive(Debug, Clone, Copy)]
pub struct Issue {
    /// thisUpdate, Unix seconds.
    pub this_update: i64,
    /// The CRL number: above any the issuer's CRLs had
    /// (`ceremonies::crl::next_number`).
    pub number: u64,
}

/// Builds the TBSCertList the issuer (its certificate `issuer`, its key of
/// `algorithm` with public key `issuer_spki`) would sign for `crl` at
/// `issue`, and lints it under `issuer`: nothing is signed here.
pub fn prepare(
    issuer: &IssuerCertificate,
    algorithm: KeyAlgorithm,
    issuer_spki: &[u8],
    crl: &CrlSection,
    issue: Issue,
) -> Result<Prepared, Error> {
    let recorder = Recorder {
        public_key: subject_public_key(issuer_spki)?,
        rcgen: certificate::rcgen_for(algorithm)?,
        asked: RefCell::new(None),
    };
    let issuer_rcgen = rcgen::Issuer::from_ca_cert_der(&issuer.der.as_slice().into(), &recorder)
        .map_err(|e| unsupported(format!("the issuer's certificate: {e}")))?;
    let this_update = time_of(issue.this_update)?;
    let params = CertificateRevocationListParams {
        this_update,
        next_update: this_update + time::Duration::days(i64::from(crl.next_update_days)),
        crl_number: SerialNumber::from(issue.number),
        issuing_distribution_point: None,
        revoked_certs: crl
            .revoked
            .iter()
            .map(|entry| {
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&entry.serial),
                    revocation_time: time_of(entry.revoked_at)?,
                    reason_code: reason(&entry.reason)?,
                    invalidity_date: None,
                })
            })
            .collect::<Result<_, Error>>()?,
        key_identifier_method: KeyIdMethod::PreSpecified(issuer.key_id.clone()),
    };
    let built = params
        .signed_by(&issuer_rcgen)
        .map_err(|e| unsupported(format!("building the CRL: {e}")))?;
    let tbs = recorder
        .asked
        .take()
        .ok_or_else(|| Error::internal("rcgen asked for no signature"))?;
    let passed = lint::lint(&tbs, &lint::Expected::of(issuer, crl, issue)?)
        .map_err(lint::Finding::into_error)?;
    Ok(Prepared {
        signature_algorithm: signature_algorithm_of(built.der())?,
        tbs,
        tbs_sha256: passed,
    })
}

/// A CRL: verified as one, written as `X509 CRL`; the HSM signs it with
/// [`crate::ceremony::intermediate::sign_prepared`].
pub const CRL: Product = Product { verify, pem };

/// Verifies the CRL `der`'s signature with `issuer_spki`.
pub fn verify(der: &[u8], issuer_spki: &[u8]) -> Result<(), Error> {
    let unverified = |what: String| Error::new(Reason::CertificateUnverified, what);
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der)
        .map_err(|e| unverified(format!("the signed CRL does not parse: {e}")))?;
    let (_, issuer) = x509_parser::x509::SubjectPublicKeyInfo::from_der(issuer_spki)
        .map_err(|e| unverified(format!("the issuer's public key does not parse: {e}")))?;
    crl.verify_signature(&issuer)
        .map_err(|e| unverified(format!("the HSM's signature does not verify: {e}")))
}

/// A CRL as PEM.
pub fn pem(der: &[u8]) -> Result<String, Error> {
    der::pem::encode_string("X509 CRL", der::pem::LineEnding::LF, der)
        .map_err(|e| Error::internal(format!("the CRL as PEM: {e}")))
}

/// What officers read of a TBS CRL before they confirm its SHA-256: issuer,
/// thisUpdate, nextUpdate, CRL number, authority key identifier, then each
/// revoked serial with its date and reason, one line each.
pub fn summary(tbs: &[u8]) -> Vec<String> {
    let Ok((_, tbs)) = x509_parser::revocation_list::TbsCertList::from_der(tbs) else {
        return vec!["(the TBS does not parse)".into()];
    };
    let mut lines = vec![
        format!("issuer: {}", tbs.issuer),
        format!("thisUpdate: {}", tbs.this_update),
        format!(
            "nextUpdate: {}",
            tbs.next_update
                .map_or_else(|| "absent".to_owned(), |t| t.to_string())
        ),
    ];
    for extension in tbs.extensions() {
        use x509_parser::extensions::ParsedExtension as P;
        match extension.parsed_extension() {
            P::CRLNumber(n) => lines.push(format!("CRL number: {n}")),
            P::AuthorityKeyIdentifier(id) => lines.push(format!(
                "authorityKeyIdentifier {}",
                id.key_identifier
                    .as_ref()
                    .map(|k| hex::encode(k.0))
                    .unwrap_or_default()
            )),
            _ => lines.push(format!("extension {}", extension.oid)),
        }
    }
    lines.push(format!(
        "revoked certificates: {}",
        tbs.revoked_certificates.len()
    ));
    for revoked in &tbs.revoked_certificates {
        lines.push(format!(
            "revoked: serial {} at {} reason {}",
            hex::encode(revoked.raw_serial()),
            revoked.revocation_date,
            revoked
                .reason_code()
                .map_or_else(|| "unspecified".to_owned(), |(_, code)| code.to_string())
        ));
    }
    lines
}

#[cfg(test)]
mod tests;
