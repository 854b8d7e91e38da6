//! Key components: a KEK assembled from N custodian components, each of
//! which alone says nothing about the key (the key is their XOR).
//!
//! Each component's key check value (KCV: AES-256 of a zero block, first
//! three bytes, the value on a custodian's component sheet) is computed here
//! in software, so the custodian sees it before the component is accepted.
//! Combining is behind [`ComponentCombiner`]: SoftHSM2 has no in-token XOR,
//! so [`XorInMemory`] combines in zeroizing memory in custodyd and imports
//! the result non-extractable (the exposure is described in
//! docs/threat-model.md); a module that derives keys by XOR inside the token
//! (`CKM_XOR_BASE_AND_DATA`) can implement the trait and never expose the
//! key.

use aes::Aes256;
use aes::cipher::{BlockEncrypt, KeyInit};
use hsm_shim::{AesRole, Exportability, HsmSession, KeyInfo, KeyLabel, SecretSlice};
use zeroize::Zeroizing;

/// A 32-byte component or key.
pub type KeyBytes = Zeroizing<[u8; 32]>;

/// The key check value of an AES-256 key: AES of a zero block, first three
/// bytes (what SoftHSM2 reports as `CKA_CHECK_VALUE`).
pub fn kcv(key: &[u8; 32]) -> [u8; 3] {
    let cipher = Aes256::new(key.into());
    let mut block = aes::Block::default();
    cipher.encrypt_block(&mut block);
    [block[0], block[1], block[2]]
}

/// Parses a component typed as 64 hex digits (spaces allowed).
pub fn parse_component(text: &str) -> Result<KeyBytes, String> {
    let compact: Zeroizing<String> = Zeroizing::new(
        text.chars()
            .filter(|c| !c.is_whitespace() && *c != '-')
            .collect(),
    );
    let mut value = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(compact.as_bytes(), value.as_mut_slice())
        .map_err(|_| "a component is 64 hex digits (32 bytes)".to_string())?;
    if value.iter().all(|b| *b == 0) {
        return Err("an all-zero component adds nothing to the key".into());
    }
    Ok(value)
}

/// Makes the KEK from its components in the HSM.
pub trait ComponentCombiner: Send + Sync {
    /// Imports the key the components make as `label`, non-extractable, and
    /// returns what the token says about it (its KCV, for the custodians to
    /// confirm).
    fn import(
        &self,
        session: &mut HsmSession,
        label: &KeyLabel,
        components: &[KeyBytes],
    ) -> hsm_shim::Result<KeyInfo>;
}

/// XOR in zeroizing memory, then one `C_CreateObject`.
#[derive(Debug, Default)]
pub struct XorInMemory;

impl ComponentCombiner for XorInMemory {
    fn import(
        &self,
        session: &mut HsmSession,
        label: &KeyLabel,
        components: &[KeyBytes],
    ) -> hsm_shim::Result<KeyInfo> {
        let mut key = Zeroizing::new([0u8; 32]);
        for component in components {
            for (k, c) in key.iter_mut().zip(component.iter()) {
                *k ^= c;
            }
        }
        let value = SecretSlice::from(key.to_vec());
        session.import_aes_key(
            label,
            &value,
            AesRole::DataEncryption,
            Exportability::NonExportable,
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use super::*;

    #[test]
    fn the_kcv_is_aes_of_a_zero_block() {
        // FIPS 197 appendix C.3 with the key 00..1f encrypts 00112233..ff;
        // a zero block under a zero key is the published
        // dc95c078a2408989ad48a21492842087 (NIST AESAVS, VarTxt / GFSbox).
        assert_eq!(kcv(&[0u8; 32]), [0xdc, 0x95, 0xc0]);
    }

    #[test]
    fn components_parse_as_hex_and_refuse_anything_else() {
        let typed = "00112233 44556677 8899aabb ccddeeff 00112233 44556677 8899aabb ccddeeff";
        assert_eq!(parse_component(typed).unwrap()[1], 0x11);
        assert!(parse_component("0011").is_err());
        assert!(parse_component(&"zz".repeat(32)).is_err());
        assert!(parse_component(&"00".repeat(32)).is_err());
    }
}
