//! The self-describing ciphertext format and the associated data each
//! encryption is bound to.
//!
//! Ciphertext layout (all integers big-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `63 64 79 01` ("cdy", format 1) |
//! | 1 | n, length of the key id (1-63) |
//! | n | key id, ASCII |
//! | 4 | key version |
//! | 12 | GCM nonce |
//! | rest | AES-256-GCM ciphertext and 128-bit tag (at least 16 bytes) |
//!
//! The GCM associated data is `"custody-envelope/v1\0" || header || caller's
//! associated data`, where the header is everything before the nonce. So a
//! ciphertext cannot be moved to another key or version, or have its header
//! edited, without failing authentication; and the caller's associated data
//! is bound too.
//!
//! Nonces are 96 random bits from the HSM's RNG for each encryption. Random
//! nonces stay unique with the probability NIST SP 800-38D (section 8.3)
//! requires only up to 2^32 encryptions per key, so [`NonceBudget`](crate::budget::NonceBudget) counts
//! encryptions per version durably and refuses the one past the configured
//! limit; the scheduler rotates a key at half of it.

use crate::names::check_key_id;

const MAGIC: [u8; 4] = [0x63, 0x64, 0x79, 0x01];
const DOMAIN: &[u8] = b"custody-envelope/v1\0";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// A parsed ciphertext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// The key that made it.
    pub key_id: &'a str,
    /// The version that made it.
    pub version: u32,
    /// The GCM nonce.
    pub nonce: [u8; NONCE_LEN],
    /// Ciphertext and tag.
    pub sealed: &'a [u8],
    header: &'a [u8],
}

/// Why bytes are not a ciphertext of this format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a custody ciphertext: {0}")]
pub struct FormatError(&'static str);

impl<'a> Envelope<'a> {
    /// Parses `bytes`; checks the layout, not the authenticity.
    pub fn parse(bytes: &'a [u8]) -> Result<Envelope<'a>, FormatError> {
        let rest = bytes
            .strip_prefix(&MAGIC)
            .ok_or(FormatError("wrong magic or format version"))?;
        let (&id_len, rest) = rest.split_first().ok_or(FormatError("truncated"))?;
        let id_len = usize::from(id_len);
        if rest.len() < id_len + 4 + NONCE_LEN + TAG_LEN {
            return Err(FormatError("truncated"));
        }
        let (id, rest) = rest.split_at(id_len);
        let key_id = std::str::from_utf8(id).map_err(|_| FormatError("key id is not ASCII"))?;
        check_key_id(key_id).map_err(|_| FormatError("invalid key id"))?;
        let (version, rest) = rest.split_at(4);
        let version = u32::from_be_bytes([version[0], version[1], version[2], version[3]]);
        if version == 0 {
            return Err(FormatError("version 0"));
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let header_len = MAGIC.len() + 1 + id_len + 4;
        Ok(Envelope {
            key_id,
            version,
            nonce: nonce.try_into().map_err(|_| FormatError("truncated"))?,
            sealed,
            header: &bytes[..header_len],
        })
    }

    /// The GCM associated data for this ciphertext and the caller's data.
    pub fn gcm_aad(&self, associated_data: &[u8]) -> Vec<u8> {
        aad(self.header, associated_data)
    }
}

/// The header and GCM associated data for a new ciphertext under
/// `key_id` version `version`.
pub fn seal_header(key_id: &str, version: u32, associated_data: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut header = Vec::with_capacity(MAGIC.len() + 1 + key_id.len() + 4);
    header.extend_from_slice(&MAGIC);
    // Key ids are at most 63 bytes (check_key_id), so this never truncates.
    header.push(key_id.len() as u8);
    header.extend_from_slice(key_id.as_bytes());
    header.extend_from_slice(&version.to_be_bytes());
    let aad = aad(&header, associated_data);
    (header, aad)
}

/// Joins a header, the nonce and the sealed bytes into a ciphertext.
pub fn assemble(header: Vec<u8>, nonce: [u8; NONCE_LEN], sealed: &[u8]) -> Vec<u8> {
    let mut out = header;
    out.extend_from_slice(&nonce);
    out.extend_from_slice(sealed);
    out
}

fn aad(header: &[u8], associated_data: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(DOMAIN.len() + header.len() + associated_data.len());
    aad.extend_from_slice(DOMAIN);
    aad.extend_from_slice(header);
    aad.extend_from_slice(associated_data);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_header_parses_back_and_binds_its_fields() {
        let (header, aad) = seal_header("payments-kek", 7, b"ctx");
        let bytes = assemble(header, [9; 12], &[1; 20]);
        let parsed = Envelope::parse(&bytes).unwrap();
        assert_eq!((parsed.key_id, parsed.version), ("payments-kek", 7));
        assert_eq!(parsed.nonce, [9; 12]);
        assert_eq!(parsed.sealed, &[1; 20]);
        assert_eq!(parsed.gcm_aad(b"ctx"), aad);
        assert_ne!(parsed.gcm_aad(b"other"), aad);
        let (_, other_version) = seal_header("payments-kek", 8, b"ctx");
        assert_ne!(other_version, aad);
    }

    #[test]
    fn every_truncation_and_bad_header_is_refused() {
        let (header, _) = seal_header("k", 1, b"");
        let bytes = assemble(header, [0; 12], &[0; 16]);
        assert!(Envelope::parse(&bytes).is_ok());
        for cut in 0..bytes.len() {
            assert!(Envelope::parse(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut wrong_magic = bytes.clone();
        wrong_magic[3] = 2;
        assert!(Envelope::parse(&wrong_magic).is_err());
        let mut bad_id = bytes.clone();
        bad_id[5] = b'K';
        assert!(Envelope::parse(&bad_id).is_err());
        let mut zero_version = bytes;
        zero_version[6..10].copy_from_slice(&[0; 4]);
        assert!(Envelope::parse(&zero_version).is_err());
    }
}
