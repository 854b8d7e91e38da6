//! How a JSON record lies in the store: a checksum over its key and its JSON,
//! then the JSON. Every JSON record custodyd keeps outside the audit log
//! (keys, pending versions, ceremonies, backup KEKs, officers, operations)
//! is written with [`seal`] and read with [`open`], so a record torn,
//! flipped or copied under another key is found when it is read, and by the
//! check at start (threat model F1), even when what is left still parses.
//!
//! The checksum is CRC-32C: it catches every error of up to 32 bits in a
//! row and all but one in 2^32 others. It is not a signature: someone who
//! can write the database can write a matching one (the audit log's chain
//! and its HSM-signed checkpoints are what show tampering).
//!
//! A record written before checksums (it starts with `{`) is still read,
//! unchecked, and gets its checksum when it is next written.

const MAGIC: u8 = 0xc5;
const FORMAT: u8 = 1;
const HEADER: usize = 6;

fn checksum(key: &[u8], json: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(key), json)
}

/// `record` as stored under `key`.
pub fn seal<T: serde::Serialize>(key: &[u8], record: &T) -> Result<Vec<u8>, serde_json::Error> {
    let json = serde_json::to_vec(record)?;
    let mut value = Vec::with_capacity(HEADER + json.len());
    value.extend_from_slice(&[MAGIC, FORMAT]);
    value.extend_from_slice(&checksum(key, &json).to_be_bytes());
    value.extend_from_slice(&json);
    Ok(value)
}

/// The record stored under `key`, or what is wrong with `value`.
pub fn open<T: serde::de::DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, String> {
    let json = match value {
        [b'{', ..] => value,
        [MAGIC, FORMAT, a, b, c, d, json @ ..] => {
            let stored = u32::from_be_bytes([*a, *b, *c, *d]);
            let computed = checksum(key, json);
            if stored != computed {
                return Err(format!(
                    "its checksum is {stored:08x} but its key and content give {computed:08x}"
                ));
            }
            json
        }
        _ => return Err("it starts with neither a record header nor JSON".into()),
    };
    serde_json::from_slice(json).map_err(|e| format!("its JSON does not parse: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Record {
        id: String,
        n: u32,
    }

    fn record() -> Record {
        Record {
            id: "root-ca".into(),
            n: 1,
        }
    }

    #[test]
    fn a_sealed_record_opens_under_its_key_only() {
        let value = seal(b"root-ca", &record()).unwrap();
        assert_eq!(open::<Record>(b"root-ca", &value).unwrap(), record());
        assert!(open::<Record>(b"root-cb", &value).is_err());
    }

    #[test]
    fn every_bit_flipped_and_every_truncation_is_refused() {
        let value = seal(b"root-ca", &record()).unwrap();
        for at in 0..value.len() {
            for bit in 0..8 {
                let mut flipped = value.clone();
                flipped[at] ^= 1 << bit;
                assert!(
                    open::<Record>(b"root-ca", &flipped).is_err(),
                    "byte {at} bit {bit}"
                );
            }
            assert!(
                open::<Record>(b"root-ca", &value[..at]).is_err(),
                "cut at {at}"
            );
        }
    }

    #[test]
    fn a_record_written_before_checksums_still_opens() {
        let json = serde_json::to_vec(&record()).unwrap();
        assert_eq!(open::<Record>(b"anything", &json).unwrap(), record());
    }
}
