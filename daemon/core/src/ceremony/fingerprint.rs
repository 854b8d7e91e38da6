//! Fingerprints of new keys, in the forms officers read aloud and compare
//! during a ceremony's confirm step.
//!
//! A key pair's fingerprint is SHA-256 of its SubjectPublicKeyInfo DER, shown
//! as hex in groups of four characters and as 12 BIP39 English words made
//! from its first 16 bytes. Words are for the ear: a misheard word is a
//! different word, where "3f2a" and "3f2e" sound alike, so two people reading
//! the same words are comparing the same 128 bits. An AES key has no public
//! part to hash; its fingerprint is its 3-byte KCV (the HSM's
//! CKA_CHECK_VALUE), shown as hex only: 24 bits make no whole number of BIP39
//! words (which need 128 bits or more), and padding them would pretend to a
//! strength they do not have.

use std::fmt;

use sha2::{Digest, Sha256};

/// Bytes of a BIP39 entropy block for 12 words.
const WORDS_ENTROPY: usize = 16;

/// A key's fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(Kind);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    /// SHA-256 of a SubjectPublicKeyInfo DER.
    PublicKey([u8; 32]),
    /// An AES key's check value.
    Kcv([u8; 3]),
}

impl Fingerprint {
    /// The fingerprint of a key pair: SHA-256 of its public key as
    /// SubjectPublicKeyInfo DER.
    pub fn of_public_key(spki_der: &[u8]) -> Fingerprint {
        Fingerprint(Kind::PublicKey(Sha256::digest(spki_der).into()))
    }

    /// The fingerprint of DER bytes officers confirm other than a public
    /// key (an intermediate ceremony's TBS certificate): their SHA-256, read
    /// as a public key's is.
    pub fn of_der(der: &[u8]) -> Fingerprint {
        Fingerprint(Kind::PublicKey(Sha256::digest(der).into()))
    }

    /// The fingerprint of an AES key: its KCV (AES-ECB of a zero block, first
    /// 3 bytes), as the HSM reports it.
    pub fn of_kcv(kcv: [u8; 3]) -> Fingerprint {
        Fingerprint(Kind::Kcv(kcv))
    }

    /// The fingerprint bytes: 32 for a key pair, 3 for an AES key. These are
    /// what the confirm signatures cover.
    pub fn bytes(&self) -> &[u8] {
        match &self.0 {
            Kind::PublicKey(digest) => digest,
            Kind::Kcv(kcv) => kcv,
        }
    }

    /// Lower-case hex without separators, as stored in transcripts and
    /// bundle manifests.
    pub fn hex(&self) -> String {
        hex::encode(self.bytes())
    }

    /// Lower-case hex in groups of four characters: `3f2a 9c01 …`.
    pub fn hex_groups(&self) -> String {
        hex_groups(self.bytes())
    }

    /// 12 BIP39 English words from the first 16 bytes, space-separated; `None`
    /// for an AES key's KCV, which is read as hex only.
    pub fn words(&self) -> Option<String> {
        let Kind::PublicKey(digest) = &self.0 else {
            return None;
        };
        // 16 bytes is always a valid BIP39 entropy length, so this cannot
        // fail; `ok()` only avoids an unwrap.
        bip39::Mnemonic::from_entropy(&digest[..WORDS_ENTROPY])
            .ok()
            .map(|mnemonic| mnemonic.to_string())
    }
}

impl fmt::Display for Fingerprint {
    /// The hex groups.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex_groups())
    }
}

/// Any bytes as lower-case hex in groups of four characters (`3f2a 9c01 …`):
/// the form people compare digests in. An odd number of bytes leaves a last
/// group of two.
pub fn hex_groups(bytes: &[u8]) -> String {
    bytes
        .chunks(2)
        .map(hex::encode)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A P-256 SubjectPublicKeyInfo DER (the generator point's public key:
    /// any fixed, well-formed SPKI serves).
    const SPKI: &str = "3059301306072a8648ce3d020106082a8648ce3d030107034200046b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c2964fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5";

    fn spki() -> Vec<u8> {
        hex::decode(SPKI).unwrap()
    }

    #[test]
    fn the_published_bip39_vectors_give_their_words() {
        // Entropy and mnemonics from the BIP39 reference test vectors
        // (trezor/python-mnemonic vectors.json), not from this crate.
        let vectors = [
            (
                "00000000000000000000000000000000",
                "abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon about",
            ),
            (
                "7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f7f",
                "legal winner thank year wave sausage worth useful legal winner thank yellow",
            ),
            (
                "80808080808080808080808080808080",
                "letter advice cage absurd amount doctor acoustic avoid letter advice cage above",
            ),
            (
                "ffffffffffffffffffffffffffffffff",
                "zoo zoo zoo zoo zoo zoo zoo zoo zoo zoo zoo wrong",
            ),
        ];
        for (entropy, words) in vectors {
            // Words come from the first 16 bytes only: pad the entropy to a
            // full digest with bytes that must not matter.
            let mut digest = [0xa5u8; 32];
            digest[..16].copy_from_slice(&hex::decode(entropy).unwrap());
            let fingerprint = Fingerprint(Kind::PublicKey(digest));
            assert_eq!(fingerprint.words().as_deref(), Some(words), "{entropy}");
        }
    }

    const EXPECTED_HEX: &str = "5cd252fb0ce8932436faf8ccd1040981b89ee4ad6b9fe9e2a2b7e71aacb27cd3";
    const EXPECTED_WORDS: &str =
        "fresh myth salute border matrix must swim gallery smoke market act adjust";

    #[test]
    fn a_public_key_fingerprint_is_the_sha256_of_its_spki() {
        // Expected values computed outside this crate: the digest with
        // `sha256sum`, the words by a separate BIP39 implementation (Python)
        // over the standard English list (SHA-256 2f5eed53…dbda).
        let fingerprint = Fingerprint::of_public_key(&spki());
        assert_eq!(fingerprint.hex(), EXPECTED_HEX);
        assert_eq!(fingerprint.words().as_deref(), Some(EXPECTED_WORDS));
        assert_eq!(fingerprint.bytes().len(), 32);
    }

    #[test]
    fn words_are_twelve_deterministic_and_change_with_any_spki_byte() {
        let spki = spki();
        let words = Fingerprint::of_public_key(&spki).words().unwrap();
        assert_eq!(words.split(' ').count(), 12, "{words}");
        assert_eq!(
            Fingerprint::of_public_key(&spki).words().as_deref(),
            Some(words.as_str())
        );
        for at in 0..spki.len() {
            let mut changed = spki.clone();
            changed[at] ^= 0x01;
            let other = Fingerprint::of_public_key(&changed);
            assert_ne!(other.words().as_deref(), Some(words.as_str()), "byte {at}");
            assert_ne!(other, Fingerprint::of_public_key(&spki), "byte {at}");
        }
    }

    #[test]
    fn hex_groups_are_four_characters() {
        let fingerprint = Fingerprint::of_public_key(&spki());
        let groups = fingerprint.hex_groups();
        let parts: Vec<&str> = groups.split(' ').collect();
        assert_eq!(parts.len(), 16);
        assert!(parts.iter().all(|p| p.len() == 4), "{groups}");
        assert_eq!(parts.concat(), fingerprint.hex());
        assert_eq!(fingerprint.to_string(), groups);
        assert_eq!(hex_groups(&[0x3f, 0x2a, 0x9c, 0x01, 0xff]), "3f2a 9c01 ff");
        assert_eq!(hex_groups(&[]), "");
    }

    #[test]
    fn a_kcv_is_hex_only() {
        let fingerprint = Fingerprint::of_kcv([0x3f, 0x2a, 0x9c]);
        assert_eq!(fingerprint.bytes(), [0x3f, 0x2a, 0x9c]);
        assert_eq!(fingerprint.hex(), "3f2a9c");
        assert_eq!(fingerprint.hex_groups(), "3f2a 9c");
        assert_eq!(fingerprint.words(), None);
        assert_ne!(fingerprint, Fingerprint::of_kcv([0x3f, 0x2a, 0x9d]));
    }
}
