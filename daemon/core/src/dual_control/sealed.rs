//! Shares sealed to a custodian's officer key, so that a share travelling
//! from custodyd to the custodian's terminal is readable by that officer's
//! key file alone (the option `encrypt_to_officer_keys` of KEK scripts).
//!
//! The officer key is Ed25519; its X25519 form (the birational map of RFC
//! 7748) takes an ephemeral Diffie-Hellman: `E = e·B`, `shared = e·A`, key =
//! SHA-256(domain ‖ E ‖ A ‖ shared), ChaCha20-Poly1305 with a zero nonce
//! (each key seals exactly one message). Sealed form: `E ‖ ciphertext ‖ tag`.
//! Using one key for signatures and for this KEM is analysed in "On using
//! the same key pair for Ed25519 and an X25519 based KEM" (ePrint 2021/509);
//! the threat model records the choice.

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use curve25519_dalek::MontgomeryPoint;
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

const DOMAIN: &[u8] = b"custody-sealed-share/v1";

/// The domain of plaintexts an approved DECRYPT operation releases: a
/// sealed share and a sealed plaintext never open as one another.
const PLAINTEXT_DOMAIN: &[u8] = b"custody-sealed-plaintext/v1";

fn key(
    domain: &[u8],
    ephemeral: &MontgomeryPoint,
    recipient: &MontgomeryPoint,
    shared: &MontgomeryPoint,
) -> Zeroizing<[u8; 32]> {
    let mut hash = Sha256::new();
    hash.update(domain);
    hash.update(ephemeral.as_bytes());
    hash.update(recipient.as_bytes());
    hash.update(shared.as_bytes());
    Zeroizing::new(hash.finalize().into())
}

/// Seals `plaintext` to the officer whose Ed25519 public key is `public_key`.
pub fn seal(public_key: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, String> {
    seal_in(DOMAIN, public_key, plaintext)
}

/// Seals the plaintext of an approved DECRYPT operation to the holder of
/// the Ed25519 key `public_key` (the same construction, its own domain).
pub fn seal_plaintext(public_key: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, String> {
    seal_in(PLAINTEXT_DOMAIN, public_key, plaintext)
}

/// Opens what [`seal_plaintext`] made for `recipient`.
pub fn open_plaintext(recipient: &SigningKey, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
    open_in(PLAINTEXT_DOMAIN, recipient, sealed)
}

/// The X25519 point of `public_key`, if it is an Ed25519 public key that
/// can be sealed to: 32 bytes, a curve point, and not of small order (a
/// small-order point makes the shared secret one anyone can compute, so
/// what is sealed to it would be readable by everyone who sees it).
pub fn recipient_point(public_key: &[u8]) -> Result<MontgomeryPoint, String> {
    let bytes: [u8; 32] = public_key
        .try_into()
        .map_err(|_| "an Ed25519 public key is 32 bytes".to_string())?;
    let key = VerifyingKey::from_bytes(&bytes).map_err(|e| format!("Ed25519 public key: {e}"))?;
    if key.is_weak() {
        return Err(
            "the Ed25519 public key is of small order: anyone could open what is sealed to it"
                .into(),
        );
    }
    Ok(key.to_montgomery())
}

fn seal_in(domain: &[u8], public_key: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, String> {
    let recipient = recipient_point(public_key)?;
    let mut secret = Zeroizing::new([0u8; 32]);
    getrandom::getrandom(secret.as_mut_slice()).map_err(|e| format!("no randomness: {e}"))?;
    let ephemeral = MontgomeryPoint::mul_base_clamped(*secret);
    let shared = recipient.mul_clamped(*secret);
    let key = key(domain, &ephemeral, &recipient, &shared);
    let sealed = ChaCha20Poly1305::new(Key::from_slice(key.as_slice()))
        .encrypt(Nonce::from_slice(&[0u8; 12]), plaintext)
        .map_err(|_| "sealing failed".to_string())?;
    Ok([ephemeral.as_bytes().as_slice(), &sealed].concat())
}

/// Opens what [`seal`] made for `officer`.
pub fn open(officer: &SigningKey, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
    open_in(DOMAIN, officer, sealed)
}

fn open_in(
    domain: &[u8],
    officer: &SigningKey,
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, String> {
    if sealed.len() < 32 + 16 {
        return Err("the sealed share is too short".into());
    }
    let (ephemeral, ciphertext) = sealed.split_at(32);
    let mut point = [0u8; 32];
    point.copy_from_slice(ephemeral);
    let ephemeral = MontgomeryPoint(point);
    let scalar = Zeroizing::new(officer.to_scalar_bytes());
    let shared = ephemeral.mul_clamped(*scalar);
    let recipient = officer.verifying_key().to_montgomery();
    let key = key(domain, &ephemeral, &recipient, &shared);
    ChaCha20Poly1305::new(Key::from_slice(key.as_slice()))
        .decrypt(Nonce::from_slice(&[0u8; 12]), ciphertext)
        .map(Zeroizing::new)
        .map_err(|_| "this share was not sealed to this officer key, or it was altered".into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use super::*;

    #[test]
    fn only_the_officer_it_was_sealed_to_opens_it_and_any_change_is_refused() {
        let alice = SigningKey::from_bytes(&[7u8; 32]);
        let bob = SigningKey::from_bytes(&[9u8; 32]);
        let sealed = seal(alice.verifying_key().as_bytes(), b"cs1-share").unwrap();
        assert_eq!(open(&alice, &sealed).unwrap().as_slice(), b"cs1-share");
        assert!(open(&bob, &sealed).is_err());
        for i in 0..sealed.len() {
            let mut altered = sealed.clone();
            altered[i] ^= 1;
            assert!(open(&alice, &altered).is_err(), "byte {i}");
        }
        // A sealed share is no sealed plaintext, and the reverse.
        assert!(open_plaintext(&alice, &sealed).is_err());
        let released = seal_plaintext(alice.verifying_key().as_bytes(), b"dek").unwrap();
        assert_eq!(
            open_plaintext(&alice, &released).unwrap().as_slice(),
            b"dek"
        );
        assert!(open(&alice, &released).is_err());
        // Fresh ephemeral each time.
        assert_ne!(
            sealed,
            seal(alice.verifying_key().as_bytes(), b"cs1-share").unwrap()
        );
    }
}
