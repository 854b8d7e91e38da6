//! An officer's own Ed25519 key, in a file sealed with a passphrase.
//!
//! The 32-byte seed is encrypted with ChaCha20-Poly1305 under a key derived
//! from the passphrase with scrypt (N = 2^15, r = 8, p = 1); the officer id and
//! public key are the associated data, so a file cannot be relabelled. The
//! file is JSON, so an officer can see whose key it is without the passphrase.
//! The seed is held in zeroizing memory and never leaves `custodyctl`.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use ed25519_dalek::{Signer, SigningKey};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

const FORMAT: &str = "custody-officer-key/v1";
const SCRYPT_LOG_N: u8 = 15;

/// The sealed file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SealedOfficerKey {
    /// Always `custody-officer-key/v1`.
    pub format: String,
    /// The officer id.
    pub officer_id: String,
    /// The Ed25519 public key, hex.
    pub public_key: String,
    /// scrypt log2(N).
    pub scrypt_log_n: u8,
    /// scrypt salt, hex.
    pub salt: String,
    /// ChaCha20-Poly1305 nonce, hex.
    pub nonce: String,
    /// The sealed seed, hex.
    pub sealed_seed: String,
}

/// An unsealed officer key: signs approvals, denials and ceremony steps, and
/// opens backup shares sealed to it.
pub struct OfficerKey {
    officer_id: String,
    signing: SigningKey,
}

impl std::fmt::Debug for OfficerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OfficerKey({}, REDACTED)", self.officer_id)
    }
}

fn random<const N: usize>() -> Result<[u8; N], String> {
    let mut bytes = [0u8; N];
    getrandom::getrandom(&mut bytes).map_err(|e| format!("no randomness: {e}"))?;
    Ok(bytes)
}

fn wrapping_key(
    passphrase: &SecretString,
    salt: &[u8],
    log_n: u8,
) -> Result<Zeroizing<[u8; 32]>, String> {
    if passphrase.expose_secret().chars().count() < 12 {
        return Err("the passphrase must be at least 12 characters".into());
    }
    let params = scrypt::Params::new(log_n, 8, 1, 32).map_err(|e| format!("scrypt: {e}"))?;
    let mut key = Zeroizing::new([0u8; 32]);
    scrypt::scrypt(
        passphrase.expose_secret().as_bytes(),
        salt,
        &params,
        key.as_mut(),
    )
    .map_err(|e| format!("scrypt: {e}"))?;
    Ok(key)
}

fn aad(officer_id: &str, public_key: &str) -> Vec<u8> {
    format!("{FORMAT}\n{officer_id}\n{public_key}").into_bytes()
}

impl OfficerKey {
    /// A new key for `officer_id`, sealed under `passphrase`.
    pub fn generate(
        officer_id: &str,
        passphrase: &SecretString,
    ) -> Result<(OfficerKey, SealedOfficerKey), String> {
        let seed = Zeroizing::new(random::<32>()?);
        let signing = SigningKey::from_bytes(&seed);
        let public_key = hex::encode(signing.verifying_key().to_bytes());
        let salt = random::<16>()?;
        let nonce = random::<12>()?;
        let key = wrapping_key(passphrase, &salt, SCRYPT_LOG_N)?;
        let sealed = ChaCha20Poly1305::new(Key::from_slice(key.as_ref()))
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: seed.as_ref(),
                    aad: &aad(officer_id, &public_key),
                },
            )
            .map_err(|_| "sealing failed".to_string())?;
        let file = SealedOfficerKey {
            format: FORMAT.into(),
            officer_id: officer_id.into(),
            public_key,
            scrypt_log_n: SCRYPT_LOG_N,
            salt: hex::encode(salt),
            nonce: hex::encode(nonce),
            sealed_seed: hex::encode(sealed),
        };
        Ok((
            OfficerKey {
                officer_id: officer_id.into(),
                signing,
            },
            file,
        ))
    }

    /// Opens a sealed file. A wrong passphrase or an edited file fails.
    pub fn unseal(
        file: &SealedOfficerKey,
        passphrase: &SecretString,
    ) -> Result<OfficerKey, String> {
        if file.format != FORMAT {
            return Err(format!("not a {FORMAT} file"));
        }
        let decode = |what: &str, hex_text: &str| {
            hex::decode(hex_text).map_err(|_| format!("the file's {what} is not hex"))
        };
        let salt = decode("salt", &file.salt)?;
        let nonce = decode("nonce", &file.nonce)?;
        if nonce.len() != 12 {
            return Err("the file's nonce is not 12 bytes".into());
        }
        let key = wrapping_key(passphrase, &salt, file.scrypt_log_n)?;
        let seed = Zeroizing::new(
            ChaCha20Poly1305::new(Key::from_slice(key.as_ref()))
                .decrypt(
                    Nonce::from_slice(&nonce),
                    Payload {
                        msg: &decode("sealed seed", &file.sealed_seed)?,
                        aad: &aad(&file.officer_id, &file.public_key),
                    },
                )
                .map_err(|_| "wrong passphrase, or the key file was altered".to_string())?,
        );
        let seed: [u8; 32] = seed
            .as_slice()
            .try_into()
            .map_err(|_| "the sealed seed is not 32 bytes")?;
        let signing = SigningKey::from_bytes(&seed);
        if hex::encode(signing.verifying_key().to_bytes()) != file.public_key {
            return Err("the key file's public key does not match its seed".into());
        }
        Ok(OfficerKey {
            officer_id: file.officer_id.clone(),
            signing,
        })
    }

    /// The officer id.
    pub fn officer_id(&self) -> &str {
        &self.officer_id
    }

    /// The public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// Signs `message` (an approval or denial message).
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }

    /// Opens a backup share sealed to this officer
    /// ([`super::sealed`]).
    pub fn open_sealed(&self, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
        super::sealed::open(&self.signing, sealed)
    }
}

/// Verifies an officer's signature (strict Ed25519: no malleable encodings).
pub fn verify(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    let (Ok(public_key), Ok(signature)) = (
        <[u8; 32]>::try_from(public_key),
        <[u8; 64]>::try_from(signature),
    ) else {
        return false;
    };
    let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&public_key) else {
        return false;
    };
    key.verify_strict(message, &ed25519_dalek::Signature::from_bytes(&signature))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_key_opens_only_with_its_passphrase_and_unaltered() {
        let passphrase = SecretString::from("correct horse battery staple");
        let (key, file) = OfficerKey::generate("alice", &passphrase).unwrap();
        let opened = OfficerKey::unseal(&file, &passphrase).unwrap();
        assert_eq!(opened.public_key(), key.public_key());
        let signature = opened.sign(b"approve this");
        assert!(verify(&key.public_key(), b"approve this", &signature));
        assert!(!verify(&key.public_key(), b"approve that", &signature));

        assert!(OfficerKey::unseal(&file, &SecretString::from("wrong passphrase!!")).is_err());
        let mut relabelled = file.clone();
        relabelled.officer_id = "mallory".into();
        assert!(OfficerKey::unseal(&relabelled, &passphrase).is_err());
        assert!(OfficerKey::generate("bob", &SecretString::from("short")).is_err());
        assert!(!format!("{opened:?}").contains(&hex::encode(opened.signing.to_bytes())));
    }
}
