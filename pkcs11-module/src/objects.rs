//! The token's objects: for each custody key the module shows, a private
//! key object (which signs, and whose secret parts are never here: custody
//! keeps them in its HSM) and a public key object (which verifies), with
//! their attributes. Safe Rust; attribute values are the bytes PKCS#11
//! callers expect (CK_ULONG in native byte order, CK_BBOOL as one byte).

use cryptoki_sys::*;
use custody_proto::v1::Algorithm;
use der::{Decode, Encode};

use crate::remote::RemoteKey;

/// The two object classes the token holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// `CKO_PRIVATE_KEY`: signs.
    Private,
    /// `CKO_PUBLIC_KEY`: verifies.
    Public,
}

/// What the key's public half looks like in PKCS#11 terms.
#[derive(Debug, Clone)]
enum PublicParts {
    /// ECDSA or EdDSA: `CKA_EC_PARAMS` and `CKA_EC_POINT` (both DER).
    Ec {
        key_type: CK_KEY_TYPE,
        params: Vec<u8>,
        point: Vec<u8>,
    },
    /// RSA: modulus and public exponent, big-endian.
    Rsa { modulus: Vec<u8>, exponent: Vec<u8> },
}

/// One version of a custody key, as the token shows it.
#[derive(Debug, Clone)]
pub struct Key {
    /// The key id (`CKA_LABEL`).
    pub key_id: String,
    /// The version.
    pub version: u32,
    /// custody's algorithm of the key.
    pub algorithm: Algorithm,
    spki: Vec<u8>,
    public: PublicParts,
}

/// An attribute's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The value's bytes.
    Value(Vec<u8>),
    /// A secret part of a private key: `CKR_ATTRIBUTE_SENSITIVE`.
    Sensitive,
    /// Not an attribute of this object: `CKR_ATTRIBUTE_TYPE_INVALID`.
    Invalid,
}

/// `RSAPublicKey` (RFC 8017, A.1.1).
#[derive(der::Sequence)]
struct RsaPublicKey<'a> {
    modulus: der::asn1::UintRef<'a>,
    exponent: der::asn1::UintRef<'a>,
}

/// DER of the Ed25519 OID 1.3.101.112, `CKA_EC_PARAMS` of an Edwards key
/// (PKCS#11 3.0 and SoftHSM2 use it).
const ED25519_PARAMS: [u8; 5] = [0x06, 0x03, 0x2b, 0x65, 0x70];

impl Key {
    /// The token's view of `remote`; an error says why the public key does
    /// not fit its algorithm (the key is then not shown).
    pub fn from_remote(remote: RemoteKey) -> Result<Key, String> {
        let spki = spki::SubjectPublicKeyInfoRef::from_der(&remote.spki_der)
            .map_err(|e| format!("public key of {}: {e}", remote.key_id))?;
        let bits = spki
            .subject_public_key
            .as_bytes()
            .ok_or_else(|| format!("public key of {} is not whole bytes", remote.key_id))?;
        let octets = |bytes: &[u8]| {
            der::asn1::OctetStringRef::new(bytes)
                .and_then(|o| o.to_der())
                .map_err(|e| format!("EC point of {}: {e}", remote.key_id))
        };
        let public = match remote.algorithm {
            Algorithm::EcSignP256Sha256 | Algorithm::EcSignP384Sha384 => PublicParts::Ec {
                key_type: CKK_EC,
                params: spki
                    .algorithm
                    .parameters
                    .ok_or_else(|| format!("public key of {} names no curve", remote.key_id))?
                    .to_der()
                    .map_err(|e| format!("curve of {}: {e}", remote.key_id))?,
                point: octets(bits)?,
            },
            Algorithm::EcSignEd25519 => PublicParts::Ec {
                key_type: CKK_EC_EDWARDS,
                params: ED25519_PARAMS.to_vec(),
                point: octets(bits)?,
            },
            Algorithm::Unspecified | Algorithm::Aes256Gcm => {
                return Err(format!("{} is not a signing key", remote.key_id));
            }
            _ => {
                let rsa = RsaPublicKey::from_der(bits)
                    .map_err(|e| format!("RSA public key of {}: {e}", remote.key_id))?;
                PublicParts::Rsa {
                    modulus: rsa.modulus.as_bytes().to_vec(),
                    exponent: rsa.exponent.as_bytes().to_vec(),
                }
            }
        };
        Ok(Key {
            key_id: remote.key_id,
            version: remote.version,
            algorithm: remote.algorithm,
            spki: remote.spki_der,
            public,
        })
    }

    /// `CKA_ID`: the version's API name, `keys/{id}/versions/{n}`, so that
    /// a private key and its public key pair up and no two keys share one.
    pub fn id(&self) -> String {
        format!("keys/{}/versions/{}", self.key_id, self.version)
    }

    /// Whether the key signs with ECDSA.
    pub fn is_ecdsa(&self) -> bool {
        matches!(
            self.algorithm,
            Algorithm::EcSignP256Sha256 | Algorithm::EcSignP384Sha384
        )
    }

    /// The length of this key's PKCS#11 signature (ECDSA raw `r‖s`).
    pub fn signature_len(&self) -> usize {
        match (&self.public, self.algorithm) {
            (_, Algorithm::EcSignP256Sha256) => 64,
            (_, Algorithm::EcSignP384Sha384) => 96,
            (PublicParts::Rsa { modulus, .. }, _) => modulus.len(),
            _ => 64,
        }
    }

    /// The value of `attribute` on this key's `class` object.
    pub fn attribute(&self, class: Class, attribute: CK_ATTRIBUTE_TYPE) -> Answer {
        let ulong = |v: CK_ULONG| Answer::Value(v.to_ne_bytes().to_vec());
        let flag = |v: bool| Answer::Value(vec![if v { CK_TRUE } else { CK_FALSE }]);
        let private = class == Class::Private;
        match attribute {
            CKA_CLASS => ulong(if private {
                CKO_PRIVATE_KEY
            } else {
                CKO_PUBLIC_KEY
            }),
            CKA_KEY_TYPE => ulong(match &self.public {
                PublicParts::Ec { key_type, .. } => *key_type,
                PublicParts::Rsa { .. } => CKK_RSA,
            }),
            CKA_LABEL => Answer::Value(self.key_id.as_bytes().to_vec()),
            CKA_ID => Answer::Value(self.id().into_bytes()),
            CKA_TOKEN | CKA_LOCAL => flag(true),
            // Whether an object is seen does not depend on C_Login: the
            // client certificate decides what the caller may use.
            CKA_PRIVATE | CKA_MODIFIABLE | CKA_COPYABLE | CKA_DESTROYABLE | CKA_DERIVE => {
                flag(false)
            }
            CKA_SUBJECT => Answer::Value(Vec::new()),
            CKA_PUBLIC_KEY_INFO => Answer::Value(self.spki.clone()),
            CKA_ALLOWED_MECHANISMS => Answer::Value(
                crate::mechanisms::for_algorithm(self.algorithm)
                    .iter()
                    .flat_map(|m| m.to_ne_bytes())
                    .collect(),
            ),
            CKA_SIGN => flag(private),
            CKA_VERIFY => flag(!private),
            CKA_ENCRYPT
            | CKA_DECRYPT
            | CKA_WRAP
            | CKA_UNWRAP
            | CKA_SIGN_RECOVER
            | CKA_VERIFY_RECOVER
            | CKA_TRUSTED
            | CKA_WRAP_WITH_TRUSTED
            | CKA_ALWAYS_AUTHENTICATE => flag(false),
            // A private key never leaves custody's HSM.
            CKA_SENSITIVE | CKA_ALWAYS_SENSITIVE | CKA_NEVER_EXTRACTABLE if private => flag(true),
            CKA_EXTRACTABLE if private => flag(false),
            CKA_VALUE | CKA_PRIVATE_EXPONENT | CKA_PRIME_1 | CKA_PRIME_2 | CKA_EXPONENT_1
            | CKA_EXPONENT_2 | CKA_COEFFICIENT
                if private =>
            {
                Answer::Sensitive
            }
            _ => self.public_attribute(attribute),
        }
    }

    fn public_attribute(&self, attribute: CK_ATTRIBUTE_TYPE) -> Answer {
        match (&self.public, attribute) {
            (PublicParts::Ec { params, .. }, CKA_EC_PARAMS) => Answer::Value(params.clone()),
            (PublicParts::Ec { point, .. }, CKA_EC_POINT) => Answer::Value(point.clone()),
            (PublicParts::Rsa { modulus, .. }, CKA_MODULUS) => Answer::Value(modulus.clone()),
            (PublicParts::Rsa { exponent, .. }, CKA_PUBLIC_EXPONENT) => {
                Answer::Value(exponent.clone())
            }
            (PublicParts::Rsa { modulus, .. }, CKA_MODULUS_BITS) => {
                Answer::Value((modulus.len() as CK_ULONG * 8).to_ne_bytes().to_vec())
            }
            _ => Answer::Invalid,
        }
    }
}
