//! DER encodings at the HSM boundary: public keys out of PKCS#11 attributes into
//! `SubjectPublicKeyInfo`, and ECDSA signatures between PKCS#11's raw `r || s`
//! and the DER `ECDSA-Sig-Value` that X.509 tooling takes.

use der::asn1::{BitString, ObjectIdentifier, OctetStringRef, UintRef};
use der::pem::LineEnding;
use der::{Any, Decode, Encode, EncodePem, Sequence};
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};

use crate::error::{ErrorKind, HsmError, Result};
use crate::types::KeySpec;

const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const ID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// A public key as `SubjectPublicKeyInfo` DER, the form every X.509 library and
/// `openssl` reads without guessing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    spec: KeySpec,
    spki_der: Vec<u8>,
}

impl PublicKey {
    /// The spec of the key this public key belongs to.
    pub fn spec(&self) -> KeySpec {
        self.spec
    }

    /// `SubjectPublicKeyInfo` DER.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// `-----BEGIN PUBLIC KEY-----` PEM.
    pub fn to_pem(&self) -> Result<String> {
        let spki = SubjectPublicKeyInfoOwned::from_der(&self.spki_der).map_err(der_error)?;
        spki.to_pem(LineEnding::LF).map_err(der_error)
    }
}

/// `CKA_EC_PARAMS` for an EC or Edwards spec: the DER of the curve's OID.
pub(crate) fn ec_params(spec: KeySpec) -> Result<Vec<u8>> {
    let oid = match spec {
        KeySpec::EcP256 => SECP256R1,
        KeySpec::EcP384 => SECP384R1,
        KeySpec::Ed25519 => ID_ED25519,
        other => {
            return Err(HsmError::new(
                ErrorKind::Internal,
                format!("{other} has no EC parameters"),
            ));
        }
    };
    oid.to_der().map_err(der_error)
}

/// The spec of an EC or Edwards key from its `CKA_EC_PARAMS`.
///
/// PKCS#11 3.0 allows Edwards curves to be named by a PrintableString instead
/// of an OID, and SoftHSM2 does exactly that for the private half of a key
/// pair generated with the OID ("edwards25519"), so both forms are read.
pub(crate) fn spec_from_ec_params(params: &[u8]) -> Result<KeySpec> {
    if let Ok(name) = der::asn1::PrintableStringRef::from_der(params) {
        return match name.as_str() {
            "edwards25519" => Ok(KeySpec::Ed25519),
            other => Err(HsmError::new(
                ErrorKind::Unsupported,
                format!("unsupported curve {other:?}"),
            )),
        };
    }
    let oid = ObjectIdentifier::from_der(params).map_err(der_error)?;
    match oid {
        SECP256R1 => Ok(KeySpec::EcP256),
        SECP384R1 => Ok(KeySpec::EcP384),
        ID_ED25519 => Ok(KeySpec::Ed25519),
        other => Err(HsmError::new(
            ErrorKind::Unsupported,
            format!("unsupported curve {other}"),
        )),
    }
}

/// Builds the public key of an EC or Edwards key from `CKA_EC_POINT`.
///
/// PKCS#11 says the point is DER-wrapped in an OCTET STRING (SoftHSM2 does
/// that); some modules return it bare. The two are told apart by length, which
/// is fixed per curve.
pub(crate) fn ec_public_key(spec: KeySpec, ec_point: &[u8]) -> Result<PublicKey> {
    let (point_len, algorithm) = match spec {
        KeySpec::EcP256 => (65, ec_algorithm(SECP256R1)?),
        KeySpec::EcP384 => (97, ec_algorithm(SECP384R1)?),
        KeySpec::Ed25519 => (
            32,
            AlgorithmIdentifierOwned {
                oid: ID_ED25519,
                parameters: None,
            },
        ),
        other => {
            return Err(HsmError::new(
                ErrorKind::Internal,
                format!("{other} is not an EC key"),
            ));
        }
    };
    let point = if ec_point.len() == point_len {
        ec_point
    } else {
        <&OctetStringRef>::from_der(ec_point)
            .map_err(der_error)?
            .as_bytes()
    };
    if point.len() != point_len {
        return Err(HsmError::new(
            ErrorKind::Internal,
            format!(
                "{spec} public point is {} bytes, expected {point_len}",
                point.len()
            ),
        ));
    }
    spki(spec, algorithm, point)
}

/// Builds the public key of an RSA key from its modulus and public exponent.
pub(crate) fn rsa_public_key(spec: KeySpec, modulus: &[u8], exponent: &[u8]) -> Result<PublicKey> {
    #[derive(Sequence)]
    struct RsaPublicKeyDer<'a> {
        modulus: UintRef<'a>,
        public_exponent: UintRef<'a>,
    }
    let key = RsaPublicKeyDer {
        modulus: UintRef::new(modulus).map_err(der_error)?,
        public_exponent: UintRef::new(exponent).map_err(der_error)?,
    }
    .to_der()
    .map_err(der_error)?;
    let algorithm = AlgorithmIdentifierOwned {
        oid: RSA_ENCRYPTION,
        parameters: Some(Any::encode_from(&der::asn1::Null).map_err(der_error)?),
    };
    spki(spec, algorithm, &key)
}

/// What `C_CreateObject` needs to make a public key object.
pub(crate) enum PublicParts {
    /// EC or Edwards: `CKA_EC_PARAMS` and `CKA_EC_POINT` (DER OCTET STRING).
    Ec { params: Vec<u8>, point: Vec<u8> },
    /// RSA: `CKA_MODULUS` and `CKA_PUBLIC_EXPONENT`, unsigned big-endian.
    Rsa { modulus: Vec<u8>, exponent: Vec<u8> },
}

/// The attributes of the public key `spki_der`, which must be a key of
/// `spec`: rebuilding the SubjectPublicKeyInfo from the parts must give back
/// exactly `spki_der`, so a key of another curve or size is refused.
pub(crate) fn public_parts(spec: KeySpec, spki_der: &[u8]) -> Result<PublicParts> {
    let info = spki::SubjectPublicKeyInfoRef::from_der(spki_der).map_err(der_error)?;
    let key = info.subject_public_key.raw_bytes();
    let (parts, rebuilt) = if let Some(bits) = spec.rsa_bits() {
        #[derive(Sequence)]
        struct RsaPublicKeyDer<'a> {
            modulus: UintRef<'a>,
            public_exponent: UintRef<'a>,
        }
        let rsa = RsaPublicKeyDer::from_der(key).map_err(der_error)?;
        let modulus = rsa.modulus.as_bytes().to_vec();
        if modulus.len() * 8 != bits as usize {
            return Err(HsmError::new(
                ErrorKind::InvalidInput,
                format!("the public key is {} bits, not {spec}", modulus.len() * 8),
            ));
        }
        let exponent = rsa.public_exponent.as_bytes().to_vec();
        let rebuilt = rsa_public_key(spec, &modulus, &exponent)?;
        (PublicParts::Rsa { modulus, exponent }, rebuilt)
    } else {
        let rebuilt = ec_public_key(spec, key)?;
        let point = OctetStringRef::new(key)
            .and_then(|octets| octets.to_der())
            .map_err(der_error)?;
        (
            PublicParts::Ec {
                params: ec_params(spec)?,
                point,
            },
            rebuilt,
        )
    };
    if rebuilt.spki_der() != spki_der {
        return Err(HsmError::new(
            ErrorKind::InvalidInput,
            format!("the public key is not a {spec} key"),
        ));
    }
    Ok(parts)
}

fn ec_algorithm(curve: ObjectIdentifier) -> Result<AlgorithmIdentifierOwned> {
    Ok(AlgorithmIdentifierOwned {
        oid: ID_EC_PUBLIC_KEY,
        parameters: Some(Any::encode_from(&curve).map_err(der_error)?),
    })
}

fn spki(spec: KeySpec, algorithm: AlgorithmIdentifierOwned, key: &[u8]) -> Result<PublicKey> {
    let spki = SubjectPublicKeyInfoOwned {
        algorithm,
        subject_public_key: BitString::from_bytes(key).map_err(der_error)?,
    };
    Ok(PublicKey {
        spec,
        spki_der: spki.to_der().map_err(der_error)?,
    })
}

#[derive(Sequence)]
struct EcdsaSigValue<'a> {
    r: UintRef<'a>,
    s: UintRef<'a>,
}

/// `r || s` (each `scalar_len` bytes) to DER `ECDSA-Sig-Value`.
pub(crate) fn ecdsa_raw_to_der(raw: &[u8], scalar_len: usize) -> Result<Vec<u8>> {
    if raw.len() != 2 * scalar_len {
        return Err(HsmError::new(
            ErrorKind::Internal,
            format!(
                "ECDSA signature from the HSM is {} bytes, expected {}",
                raw.len(),
                2 * scalar_len
            ),
        ));
    }
    let (r, s) = raw.split_at(scalar_len);
    EcdsaSigValue {
        r: UintRef::new(r).map_err(der_error)?,
        s: UintRef::new(s).map_err(der_error)?,
    }
    .to_der()
    .map_err(der_error)
}

/// DER `ECDSA-Sig-Value` to `r || s`, each left-padded to `scalar_len` bytes.
/// Anything that is not a well-formed signature for this curve is invalid input.
pub(crate) fn ecdsa_der_to_raw(der_sig: &[u8], scalar_len: usize) -> Result<Vec<u8>> {
    let invalid = || {
        HsmError::new(
            ErrorKind::InvalidInput,
            "signature is not a DER ECDSA-Sig-Value for this curve",
        )
    };
    let sig = EcdsaSigValue::from_der(der_sig).map_err(|_| invalid())?;
    let mut raw = vec![0u8; 2 * scalar_len];
    for (i, part) in [sig.r, sig.s].into_iter().enumerate() {
        let bytes = part.as_bytes();
        if bytes.len() > scalar_len {
            return Err(invalid());
        }
        let end = (i + 1) * scalar_len;
        raw[end - bytes.len()..end].copy_from_slice(bytes);
    }
    Ok(raw)
}

fn der_error(error: der::Error) -> HsmError {
    HsmError::new(ErrorKind::Internal, format!("DER encoding: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecdsa_signatures_round_trip_between_raw_and_der() {
        // High bits set (needs a 0x00 sign byte in DER) and leading zeros
        // (dropped in DER, restored in raw).
        let mut raw = vec![0u8; 64];
        raw[0] = 0x80;
        raw[31] = 1;
        raw[32] = 0;
        raw[33] = 0;
        raw[34] = 0x7f;
        raw[63] = 9;
        let der_sig = ecdsa_raw_to_der(&raw, 32).unwrap();
        assert_eq!(der_sig[0], 0x30);
        assert_eq!(ecdsa_der_to_raw(&der_sig, 32).unwrap(), raw);
    }

    #[test]
    fn malformed_der_signatures_are_invalid_input() {
        let too_long = ecdsa_raw_to_der(&[0x42; 96], 48).unwrap();
        for bad in [&b""[..], &b"\x30\x00"[..], &b"garbage"[..], &too_long[..]] {
            let err = ecdsa_der_to_raw(bad, 32).expect_err("must fail");
            assert_eq!(err.kind(), ErrorKind::InvalidInput);
        }
    }

    #[test]
    fn edwards_curves_named_by_printable_string_are_read() {
        let printable = der::asn1::PrintableStringRef::new("edwards25519")
            .unwrap()
            .to_der()
            .unwrap();
        assert_eq!(spec_from_ec_params(&printable).unwrap(), KeySpec::Ed25519);
        let other = der::asn1::PrintableStringRef::new("edwards448")
            .unwrap()
            .to_der()
            .unwrap();
        assert_eq!(
            spec_from_ec_params(&other).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
    }

    #[test]
    fn ec_params_round_trip() {
        for spec in [KeySpec::EcP256, KeySpec::EcP384, KeySpec::Ed25519] {
            assert_eq!(
                spec_from_ec_params(&ec_params(spec).unwrap()).unwrap(),
                spec
            );
        }
    }

    #[test]
    fn ec_points_are_accepted_bare_or_octet_string_wrapped() {
        let bare = [0x04; 65];
        let mut wrapped = vec![0x04, 65];
        wrapped.extend_from_slice(&bare);
        let a = ec_public_key(KeySpec::EcP256, &bare).unwrap();
        let b = ec_public_key(KeySpec::EcP256, &wrapped).unwrap();
        assert_eq!(a, b);
        assert!(
            a.to_pem()
                .unwrap()
                .starts_with("-----BEGIN PUBLIC KEY-----")
        );
        assert!(ec_public_key(KeySpec::EcP256, &[0x04; 10]).is_err());
    }
}
