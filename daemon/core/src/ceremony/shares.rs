//! K-of-N Shamir shares of a 32-byte secret (a backup KEK), in a form a
//! custodian can write down, read aloud and type back.
//!
//! The splitting is `vsss-rs`'s GF(256) Shamir scheme (constant-time; it
//! refuses index 0, duplicate indices and thresholds below 2). This module
//! adds what a share needs to be handled by people:
//!
//! ```text
//! cs1-3f9a0c21-02of05-k03-8d1e4b7700c2a915-026f1a-9c03e7-…(11 groups)-4be2a0
//!  │      │      │     │         │                      │                 └ checksum
//!  │      │      │     │         │                      └ the share: x ‖ 32 bytes, hex
//!  │      │      │     │         └ digest of the secret (first 8 bytes)
//!  │      │      │     └ threshold K
//!  │      │      └ index i of N
//!  │      └ set id (random per split)
//!  └ format version
//! ```
//!
//! The checksum (first 3 bytes of SHA-256 over everything before it) catches
//! typing mistakes in one share. Before anything is combined, a set is
//! rejected if it mixes set ids or parameters, repeats an index, or has
//! fewer than K shares: Shamir itself cannot tell, and would return a wrong
//! secret. After combining, the secret's digest must match the one every
//! share carries, so a forged or altered share with a valid checksum still
//! cannot yield a wrong key that reaches an unwrap.

use std::fmt;

use chacha20::cipher::{KeyIvInit, StreamCipher};
use sha2::{Digest, Sha256};
use vsss_rs::Gf256;
use zeroize::Zeroizing;

const VERSION: &str = "cs1";
const DIGEST_DOMAIN: &[u8] = b"custody-share-secret/v1";
/// Bytes of a secret that shares split.
pub const SECRET_LEN: usize = 32;
const SHARE_LEN: usize = SECRET_LEN + 1;
const GROUP: usize = 6;

/// Why shares were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShareError {
    /// The text is not a share of this format.
    #[error("not a custody share: {0}")]
    Malformed(&'static str),
    /// The checksum does not match: a typing mistake.
    #[error("the share's checksum does not match: check it for a typing mistake")]
    Checksum,
    /// Shares of different sets (or parameters) were given together.
    #[error("the shares come from different sets")]
    MixedSets,
    /// One index was given twice.
    #[error("share {0} was given twice")]
    Duplicate(u8),
    /// Fewer shares than the threshold.
    #[error("{have} shares given; this set needs {need}")]
    TooFew {
        /// Shares given.
        have: usize,
        /// The threshold.
        need: usize,
    },
    /// The shares combine to something that is not the secret.
    #[error("the shares do not reconstruct the secret (a share is wrong)")]
    WrongSecret,
    /// Bad split parameters.
    #[error("invalid split: {0}")]
    Parameters(&'static str),
}

/// One custodian's share. `Debug` shows only the public header.
#[derive(Clone, PartialEq, Eq)]
pub struct Share {
    set_id: [u8; 4],
    index: u8,
    count: u8,
    threshold: u8,
    secret_digest: [u8; 8],
    value: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Share({}-{:02}of{:02}-k{:02}, value redacted)",
            hex::encode(self.set_id),
            self.index,
            self.count,
            self.threshold
        )
    }
}

/// The digest every share carries of the secret it belongs to.
fn secret_digest(set_id: &[u8; 4], secret: &[u8]) -> [u8; 8] {
    let digest = Sha256::new()
        .chain_update(DIGEST_DOMAIN)
        .chain_update(set_id)
        .chain_update(secret)
        .finalize();
    let mut out = [0; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

/// A CSPRNG for one split: the ChaCha20 keystream under a fresh OS seed.
struct Keystream(chacha20::ChaCha20);

impl rand_core::TryRng for Keystream {
    type Error = core::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut bytes = [0; 4];
        self.0.apply_keystream(&mut bytes);
        Ok(u32::from_le_bytes(bytes))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut bytes = [0; 8];
        self.0.apply_keystream(&mut bytes);
        Ok(u64::from_le_bytes(bytes))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        dst.fill(0);
        self.0.apply_keystream(dst);
        Ok(())
    }
}

impl rand_core::TryCryptoRng for Keystream {}

/// Splits `secret` into `count` shares, any `threshold` of which rebuild it.
pub fn split(
    secret: &[u8; SECRET_LEN],
    threshold: u8,
    count: u8,
) -> Result<Vec<Share>, ShareError> {
    if threshold < 2 || threshold > count || count > 99 {
        return Err(ShareError::Parameters("need 2 <= threshold <= count <= 99"));
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    let mut set_id = [0u8; 4];
    getrandom::getrandom(seed.as_mut())
        .and_then(|()| getrandom::getrandom(&mut set_id))
        .map_err(|_| ShareError::Parameters("the OS random source failed"))?;
    let rng = Keystream(chacha20::ChaCha20::new(
        seed.as_ref().into(),
        &[0u8; 12].into(),
    ));
    let raw = Gf256::split_bytes(usize::from(threshold), usize::from(count), secret, rng)
        .map_err(|_| ShareError::Parameters("the Shamir split failed"))?;
    let raw = Zeroizing::new(raw);
    let digest = secret_digest(&set_id, secret);
    raw.iter()
        .map(|value| {
            let index = *value.first().ok_or(ShareError::Malformed("empty share"))?;
            Ok(Share {
                set_id,
                index,
                count,
                threshold,
                secret_digest: digest,
                value: Zeroizing::new(value.clone()),
            })
        })
        .collect()
}

impl Share {
    /// The share's index (its x coordinate), 1..=count.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// K: how many shares of the set rebuild the secret.
    pub fn threshold(&self) -> u8 {
        self.threshold
    }

    /// The set id, hex.
    pub fn set_id(&self) -> String {
        hex::encode(self.set_id)
    }

    fn body(&self) -> Zeroizing<String> {
        let value = Zeroizing::new(hex::encode(self.value.as_slice()));
        let groups: Vec<&str> = value
            .as_bytes()
            .chunks(GROUP)
            .map(|c| std::str::from_utf8(c).unwrap_or_default())
            .collect();
        Zeroizing::new(format!(
            "{VERSION}-{}-{:02}of{:02}-k{:02}-{}-{}",
            hex::encode(self.set_id),
            self.index,
            self.count,
            self.threshold,
            hex::encode(self.secret_digest),
            groups.join("-")
        ))
    }

    /// The text a custodian writes down.
    pub fn to_text(&self) -> Zeroizing<String> {
        let body = self.body();
        let checksum = &Sha256::digest(body.as_bytes())[..3];
        Zeroizing::new(format!("{}-{}", body.as_str(), hex::encode(checksum)))
    }

    /// Reads a share typed back: case, spaces and line breaks do not matter.
    pub fn parse(text: &str) -> Result<Share, ShareError> {
        let text: Zeroizing<String> = Zeroizing::new(
            text.chars()
                .filter(|c| !c.is_whitespace())
                .map(|c| c.to_ascii_lowercase())
                .collect(),
        );
        let (body, checksum) = text
            .rsplit_once('-')
            .ok_or(ShareError::Malformed("no checksum"))?;
        let parts: Vec<&str> = body.split('-').collect();
        let groups = SHARE_LEN * 2 / GROUP;
        if parts.len() != 5 + groups || parts[0] != VERSION {
            return Err(ShareError::Malformed("wrong version or number of groups"));
        }
        let expected = hex::encode(&Sha256::digest(body.as_bytes())[..3]);
        if checksum != expected {
            return Err(ShareError::Checksum);
        }
        let hex_array =
            |s: &str, what: &'static str| hex::decode(s).map_err(|_| ShareError::Malformed(what));
        let set_id: [u8; 4] = hex_array(parts[1], "set id")?
            .try_into()
            .map_err(|_| ShareError::Malformed("set id"))?;
        let (index, count) = parts[2]
            .split_once("of")
            .ok_or(ShareError::Malformed("index"))?;
        let number =
            |s: &str, what: &'static str| s.parse::<u8>().map_err(|_| ShareError::Malformed(what));
        let (index, count) = (number(index, "index")?, number(count, "count")?);
        let threshold = number(
            parts[3]
                .strip_prefix('k')
                .ok_or(ShareError::Malformed("threshold"))?,
            "threshold",
        )?;
        let secret_digest: [u8; 8] = hex_array(parts[4], "digest")?
            .try_into()
            .map_err(|_| ShareError::Malformed("digest"))?;
        let value = Zeroizing::new(hex_array(&parts[5..].concat(), "share value")?);
        let valid = value.len() == SHARE_LEN
            && value[0] == index
            && (1..=count).contains(&index)
            && (2..=count).contains(&threshold);
        if !valid {
            return Err(ShareError::Malformed(
                "inconsistent index, count or threshold",
            ));
        }
        Ok(Share {
            set_id,
            index,
            count,
            threshold,
            secret_digest,
            value,
        })
    }
}

/// Rebuilds the secret from `shares`, refusing any set that is not K or more
/// distinct shares of one split, and any result whose digest is not the
/// one the shares carry.
pub fn combine(shares: &[Share]) -> Result<Zeroizing<[u8; SECRET_LEN]>, ShareError> {
    let first = shares
        .first()
        .ok_or(ShareError::TooFew { have: 0, need: 2 })?;
    let same_set = |s: &Share| {
        (s.set_id, s.count, s.threshold, s.secret_digest)
            == (
                first.set_id,
                first.count,
                first.threshold,
                first.secret_digest,
            )
    };
    if !shares.iter().all(same_set) {
        return Err(ShareError::MixedSets);
    }
    let mut seen = std::collections::BTreeSet::new();
    for share in shares {
        if !seen.insert(share.index) {
            return Err(ShareError::Duplicate(share.index));
        }
    }
    if shares.len() < usize::from(first.threshold) {
        return Err(ShareError::TooFew {
            have: shares.len(),
            need: usize::from(first.threshold),
        });
    }
    let values: Zeroizing<Vec<Vec<u8>>> =
        Zeroizing::new(shares.iter().map(|s| s.value.to_vec()).collect());
    let combined = Zeroizing::new(
        Gf256::combine_bytes(values.as_slice()).map_err(|_| ShareError::WrongSecret)?,
    );
    let secret: [u8; SECRET_LEN] = combined
        .as_slice()
        .try_into()
        .map_err(|_| ShareError::WrongSecret)?;
    let secret = Zeroizing::new(secret);
    let digest = secret_digest(&first.set_id, secret.as_ref());
    if !digests_equal(&digest, &first.secret_digest) {
        return Err(ShareError::WrongSecret);
    }
    Ok(secret)
}

/// Constant-time equality of two digests.
fn digests_equal(a: &[u8; 8], b: &[u8; 8]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> [u8; SECRET_LEN] {
        let mut secret = [0u8; SECRET_LEN];
        getrandom::getrandom(&mut secret).unwrap();
        secret
    }

    #[test]
    fn every_k_subset_rebuilds_the_secret_and_every_smaller_one_is_refused() {
        let secret = secret();
        let shares = split(&secret, 3, 5).unwrap();
        let indices: Vec<u8> = shares.iter().map(Share::index).collect();
        assert_eq!(indices, [1, 2, 3, 4, 5]);
        let mut rebuilt = 0;
        for a in 0..5 {
            for b in a + 1..5 {
                assert_eq!(
                    combine(&[shares[a].clone(), shares[b].clone()]),
                    Err(ShareError::TooFew { have: 2, need: 3 })
                );
                for c in b + 1..5 {
                    let subset = [shares[a].clone(), shares[b].clone(), shares[c].clone()];
                    assert_eq!(*combine(&subset).unwrap(), secret);
                    rebuilt += 1;
                }
            }
        }
        assert_eq!(rebuilt, 10);
        assert_eq!(*combine(&shares).unwrap(), secret);
    }

    #[test]
    fn a_share_survives_being_written_down_and_typed_back() {
        let shares = split(&secret(), 2, 3).unwrap();
        let text = shares[1].to_text();
        assert!(text.starts_with("cs1-"), "{}", text.as_str());
        let typed = text
            .to_uppercase()
            .replace('-', "- ")
            .replacen("- ", "-\n", 3);
        assert_eq!(Share::parse(&typed).unwrap(), shares[1]);
        assert!(!format!("{:?}", shares[1]).contains(&text[30..50]));
    }

    #[test]
    fn every_mistyped_character_is_caught_by_the_checksum_or_the_format() {
        let shares = split(&secret(), 2, 3).unwrap();
        let text = shares[0].to_text();
        let mut caught = 0;
        for (i, original) in text.char_indices() {
            for replacement in ['0', '7', 'f', 'x', '-'] {
                if replacement == original {
                    continue;
                }
                let mut mangled = text.to_string();
                mangled.replace_range(i..i + 1, &replacement.to_string());
                assert!(
                    Share::parse(&mangled).is_err(),
                    "position {i} to {replacement}"
                );
                caught += 1;
            }
        }
        assert!(caught > 400, "{caught}");
        println!("mistyped share characters refused: {caught} of {caught}");
    }

    #[test]
    fn mixed_duplicated_and_forged_sets_are_refused_before_or_after_combining() {
        let secret = secret();
        let ours = split(&secret, 2, 3).unwrap();
        let theirs = split(&secret, 2, 3).unwrap();
        assert_eq!(
            combine(&[ours[0].clone(), theirs[1].clone()]),
            Err(ShareError::MixedSets)
        );
        assert_eq!(
            combine(&[ours[0].clone(), ours[0].clone()]),
            Err(ShareError::Duplicate(ours[0].index()))
        );
        // A share altered by someone who recomputed its checksum: it parses,
        // and the digest catches the wrong secret.
        let mut forged = ours[1].clone();
        forged.value[5] ^= 0x40;
        let forged = Share::parse(&forged.to_text()).unwrap();
        assert_eq!(
            combine(&[ours[0].clone(), forged]),
            Err(ShareError::WrongSecret)
        );
    }

    #[test]
    fn weak_or_impossible_splits_are_refused() {
        for (k, n) in [(1, 3), (0, 3), (4, 3), (2, 100)] {
            assert!(split(&secret(), k, n).is_err(), "{k} of {n}");
        }
    }
}
