//! The small text encodings custody reads in more than one place: a PEM
//! public key's DER, and lower-case hex fields.
//!
//! Each is one rule, here, so that custodyd and custodyctl (and the
//! formats inside custodyd: bundles, transcripts) accept exactly the same
//! text.

use spki::der::Decode;
use spki::der::pem::PemLabel;

/// The SubjectPublicKeyInfo DER inside a `PUBLIC KEY` PEM, as the PEM holds
/// it; refuses another label or DER that is not a SubjectPublicKeyInfo.
/// Which key type it must be is the caller's rule.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, String> {
    let (label, der) = spki::der::pem::decode_vec(pem.as_bytes()).map_err(|e| e.to_string())?;
    if label != spki::SubjectPublicKeyInfoRef::PEM_LABEL {
        return Err(format!("expected a PUBLIC KEY PEM, found {label}"));
    }
    spki::SubjectPublicKeyInfoRef::from_der(&der).map_err(|e| e.to_string())?;
    Ok(der)
}

/// The bytes of `text` if it is lower-case hex: a non-zero, even number of
/// `0-9` and `a-f`. One spelling only, so that equal text means equal bytes
/// wherever a field is compared or hashed as text.
pub fn lower_hex(text: &str) -> Option<Vec<u8>> {
    let lower_hex = text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if text.is_empty() || !lower_hex || text.len() % 2 != 0 {
        return None;
    }
    hex::decode(text).ok()
}

/// The `N` bytes of `text` if it is lower-case hex ([`lower_hex`]) of
/// exactly that many bytes.
pub fn lower_hex_array<const N: usize>(text: &str) -> Option<[u8; N]> {
    lower_hex(text)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn public_key_pem() -> String {
        use p256::pkcs8::EncodePublicKey;
        let key = p256::SecretKey::from_slice(&[7; 32]).expect("a valid scalar");
        key.public_key()
            .to_public_key_pem(spki::der::pem::LineEnding::LF)
            .expect("PEM")
    }

    #[test]
    fn a_public_key_pem_gives_its_der_unchanged() {
        let der = pem_to_der(&public_key_pem()).unwrap();
        assert_eq!(der.len(), 91);
        assert_eq!(der[0], 0x30);
        let again =
            spki::der::pem::encode_string("PUBLIC KEY", spki::der::pem::LineEnding::LF, &der)
                .unwrap();
        assert_eq!(pem_to_der(&again).unwrap(), der);
    }

    #[test]
    fn other_labels_broken_pem_and_non_spki_der_are_refused() {
        let pem = public_key_pem();
        let certificate = pem.replace("PUBLIC KEY", "CERTIFICATE");
        assert!(
            pem_to_der(&certificate)
                .unwrap_err()
                .contains("expected a PUBLIC KEY PEM")
        );
        assert!(pem_to_der("not a PEM").is_err());
        assert!(pem_to_der(&pem.replace("MFkw", "MFkx")).is_err());
        let not_spki = spki::der::pem::encode_string(
            "PUBLIC KEY",
            spki::der::pem::LineEnding::LF,
            &[0x04, 0x01, 0x00],
        )
        .unwrap();
        assert!(pem_to_der(&not_spki).is_err());
    }

    #[test]
    fn hex_fields_have_one_spelling() {
        assert_eq!(lower_hex("00ff7a"), Some(vec![0x00, 0xff, 0x7a]));
        assert_eq!(lower_hex("00FF7A"), None);
        assert_eq!(lower_hex("0ff"), None);
        assert_eq!(lower_hex(""), None);
        assert_eq!(lower_hex(" 00"), None);
        assert_eq!(lower_hex("0g"), None);
        assert_eq!(lower_hex_array::<3>("a1b2c3"), Some([0xa1, 0xb2, 0xc3]));
        assert_eq!(lower_hex_array::<3>("a1b2"), None);
        assert_eq!(lower_hex_array::<3>("a1b2c3d4"), None);
        assert_eq!(lower_hex_array::<3>("A1B2C3"), None);
    }
}
