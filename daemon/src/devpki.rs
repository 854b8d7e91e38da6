//! A development PKI: a CA, a server certificate and client certificates for
//! each role, made with rcgen. For the demo and the tests only; production
//! certificates come from the organisation's own CA.
//!
//! Client certificates carry the custody identity as SAN URIs
//! (`urn:custody:{role}:{principal}`, see [`custody_core::identity`]).

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

use custody_core::identity::{Role, uri_for};

/// A PKI error.
#[derive(Debug, thiserror::Error)]
#[error("dev PKI: {0}")]
pub struct PkiError(String);

impl From<rcgen::Error> for PkiError {
    fn from(e: rcgen::Error) -> Self {
        PkiError(e.to_string())
    }
}

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The private key (PKCS#8).
    pub key_pem: String,
    /// The serial number.
    pub serial: Vec<u8>,
}

/// A certificate's validity window.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Not valid before.
    pub not_before: OffsetDateTime,
    /// Not valid after.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago for `days` days.
    pub fn days(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days),
        }
    }
}

/// A certificate authority that can issue and revoke.
pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
    cert_pem: String,
}

fn serial_for(key: &KeyPair, name: &str) -> Vec<u8> {
    let mut hasher = Sha256::new();
    hasher.update(rcgen::PublicKeyData::der_bytes(key));
    hasher.update(name.as_bytes());
    let mut serial = hasher.finalize()[..16].to_vec();
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    serial
}

/// The SAN URIs that grant `roles` to `principal`.
fn custody_uris(principal: &str, roles: &[Role]) -> Result<Vec<SanType>, PkiError> {
    roles
        .iter()
        .map(|role| {
            rcgen::string::Ia5String::try_from(uri_for(*role, principal))
                .map(SanType::URI)
                .map_err(|e| PkiError(e.to_string()))
        })
        .collect()
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "custody dev");
    dn.push(DnType::CommonName, common_name);
    dn
}

impl Ca {
    /// A new self-signed CA (EC P-256), valid for ten years.
    pub fn new(common_name: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.key_identifier_method = KeyIdMethod::Sha256;
        let validity = Validity::days(3650);
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.serial_number = Some(SerialNumber::from(serial_for(&key, common_name)));
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(Ca {
            params,
            key,
            cert_pem,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn issue(&self, mut params: CertificateParams, common_name: &str) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let serial = serial_for(&key, common_name);
        params.distinguished_name = name(common_name);
        params.serial_number = Some(SerialNumber::from(serial.clone()));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_pem: key.serialize_pem(),
            serial,
        })
    }

    /// A server certificate for `hosts` (DNS names or IP addresses).
    pub fn issue_server(&self, hosts: &[&str]) -> Result<Issued, PkiError> {
        self.issue_server_for(hosts, Validity::days(825))
    }

    /// [`Self::issue_server`] valid over `validity` (tests make expired ones).
    pub fn issue_server_for(&self, hosts: &[&str], validity: Validity) -> Result<Issued, PkiError> {
        let mut params =
            CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())?;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, hosts.first().copied().unwrap_or("custodyd"))
    }

    /// A client certificate granting `roles` to `principal`.
    pub fn issue_client(
        &self,
        principal: &str,
        roles: &[Role],
        validity: Validity,
    ) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = custody_uris(principal, roles)?;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, principal)
    }

    /// A CRL revoking `revoked`, valid for a week.
    pub fn crl(&self, revoked: &[&Issued]) -> Result<String, PkiError> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(7),
            crl_number: SerialNumber::from(now.unix_timestamp().to_be_bytes().to_vec()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|cert| RevokedCertParams {
                    serial_number: SerialNumber::from(cert.serial.clone()),
                    revocation_time: now - Duration::minutes(1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let issuer = Issuer::from_params(&self.params, &self.key);
        Ok(params.signed_by(&issuer)?.pem()?)
    }
}

/// A self-signed client certificate (issued by nobody the server trusts).
pub fn self_signed_client(principal: &str, roles: &[Role]) -> Result<Issued, PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(principal);
    params.subject_alt_names = custody_uris(principal, roles)?;
    let serial = serial_for(&key, principal);
    params.serial_number = Some(SerialNumber::from(serial.clone()));
    let cert = params.self_signed(&key)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        cert_der: cert.der().to_vec(),
        key_pem: key.serialize_pem(),
        serial,
    })
}

/// The identities the demo and the quick start use.
pub const DEV_IDENTITIES: [(&str, &[Role]); 6] = [
    ("operator", &[Role::Operator]),
    ("ca-issuing", &[Role::Signer]),
    ("auditor", &[Role::Auditor]),
    ("alice", &[Role::Officer]),
    ("bob", &[Role::Officer]),
    ("carol", &[Role::Officer]),
];

/// Writes a CA, a server certificate for `hosts`, an empty CRL and one client
/// certificate per [`DEV_IDENTITIES`] entry into `dir` (`ca.pem`, `server.pem`,
/// `server.key`, `crl.pem`, `{principal}.pem`, `{principal}.key`). Private
/// keys are written readable by the owner only.
pub fn write_dev_pki(dir: &Path, hosts: &[&str]) -> Result<(), PkiError> {
    let write = |file: &str, contents: &str, secret: bool| -> Result<(), PkiError> {
        let path = dir.join(file);
        std::fs::write(&path, contents)
            .map_err(|e| PkiError(format!("{}: {e}", path.display())))?;
        if secret {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| PkiError(format!("{}: {e}", path.display())))?;
        }
        Ok(())
    };
    std::fs::create_dir_all(dir).map_err(|e| PkiError(format!("{}: {e}", dir.display())))?;
    let ca = Ca::new("custody dev CA")?;
    write("ca.pem", ca.cert_pem(), false)?;
    let server = ca.issue_server(hosts)?;
    write("server.pem", &server.cert_pem, false)?;
    write("server.key", &server.key_pem, true)?;
    write("crl.pem", &ca.crl(&[])?, false)?;
    for (principal, roles) in DEV_IDENTITIES {
        let client = ca.issue_client(principal, roles, Validity::days(365))?;
        write(&format!("{principal}.pem"), &client.cert_pem, false)?;
        write(&format!("{principal}.key"), &client.key_pem, true)?;
    }
    Ok(())
}
