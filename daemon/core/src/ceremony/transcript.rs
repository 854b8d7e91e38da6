//! The ceremony transcript: what happened at a key ceremony, step by step, in
//! a form that cannot be edited afterwards without it showing.
//!
//! The engine appends one [`TranscriptEntry`] per step as it goes. Each entry
//! carries the hash of the one before it, so the entries form a chain:
//!
//! ```text
//! hash = SHA-256("custody-transcript-entry/v1\n" ‖ prev_hash (32 bytes)
//!                ‖ canonical JSON of the entry without `hash`)
//! ```
//!
//! and the audit key (inside the HSM) signs the last hash, the head:
//! [`head_message`]. Changing, removing, inserting or reordering an entry
//! breaks a hash or a link; cutting entries from the tail leaves a head that
//! is no longer the last entry's hash; rebuilding the whole chain needs the
//! audit key. [`Transcript::verify`] checks all of it and says which entry is
//! wrong.
//!
//! Canonical JSON is serde_json's compact output of the entry's fields in
//! declared order, with every object in `detail` in key order. The key order
//! is imposed here rather than left to `serde_json::Map` (a `BTreeMap` by
//! default), so that the hash cannot change if some crate in the build turns
//! on serde_json's `preserve_order`.
//!
//! What the signature covers: the chain and the ceremony id. The header's
//! `kind`, `script_sha256` and `outcome` are outside it, so `verify` holds
//! them to what the signed entries say: the outcome must agree with the last
//! step, and if the first entry's `detail` records `ceremony`, `kind` or
//! `script_sha256` (the engine should record all three there) the header must
//! match them.
//!
//! This module is pure: no HSM and no I/O. The engine signs
//! [`Transcript::signing_message`] with the audit key and stores the DER
//! signature with [`Transcript::set_signature`].

use std::fmt::Write as _;

use p256::ecdsa::signature::Verifier;
use p256::pkcs8::DecodePublicKey;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::encoding::lower_hex_array;

/// The transcript format.
pub const FORMAT: &str = "custody-transcript/v1";
const ENTRY_DOMAIN: &[u8] = b"custody-transcript-entry/v1\n";
/// The `prev_hash` of entry 1, and the head of a transcript with no entries.
pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Every outcome a transcript can have.
pub const OUTCOMES: [&str; 5] = [
    "completed",
    "rolled-back",
    "aborted",
    "failed",
    "in-progress",
];
/// Steps that end a ceremony without completing it; the outcome is the step.
const FAILURE_STEPS: [&str; 3] = ["rolled-back", "aborted", "failed"];
/// Steps that end a completed ceremony (a restore drill ends by destroying
/// the scratch token, every other ceremony by committing).
const COMPLETING_STEPS: [&str; 2] = ["commit", "destroy-scratch"];

/// Why a transcript was refused. Errors about one entry name it by its
/// position in the chain (1, 2, ...): [`TranscriptError::entry`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranscriptError {
    /// The text is not a transcript.
    #[error("not a ceremony transcript: {0}")]
    Json(String),
    /// The header is wrong (format, outcome, or a field the entries contradict).
    #[error("transcript {field}: {problem}")]
    Header {
        /// The header field.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// No entries: nothing to verify.
    #[error("the transcript has no entries")]
    Empty,
    /// An entry is out of place: removed, reordered, inserted or renumbered.
    #[error(
        "entry {entry}: its seq is {found}; entries must be numbered 1, 2, 3, ... in order \
         (an entry was removed, inserted, reordered or renumbered)"
    )]
    Sequence {
        /// The entry's position in the chain (what its seq should be).
        entry: u32,
        /// The seq it carries.
        found: u32,
    },
    /// A hash field is not 64 lower-case hex digits.
    #[error("entry {entry}: {field} is not 64 lower-case hex digits")]
    BadHash {
        /// The entry's position.
        entry: u32,
        /// `prev_hash` or `hash`.
        field: &'static str,
    },
    /// The entry's contents do not hash to its `hash`.
    #[error(
        "entry {entry}: its contents do not match its hash (the entry was changed after it was recorded)"
    )]
    Altered {
        /// The entry's position.
        entry: u32,
    },
    /// The entry's `prev_hash` is not the previous entry's hash.
    #[error(
        "entry {entry}: its prev_hash is not the hash of the entry before it \
         (an earlier entry was changed, removed or inserted)"
    )]
    BrokenLink {
        /// The entry's position.
        entry: u32,
    },
    /// The head is not the last entry's hash.
    #[error(
        "the head is not the hash of the last entry, entry {entry} \
         (entries were cut from the tail, or changed after the head was signed)"
    )]
    Head {
        /// The last entry's position.
        entry: u32,
    },
    /// The outcome contradicts the last entry.
    #[error(
        "entry {entry} (step {step:?}) is the last entry, so the outcome cannot be {outcome:?}: {why}"
    )]
    Outcome {
        /// The last entry's position.
        entry: u32,
        /// Its step.
        step: String,
        /// The header's outcome.
        outcome: String,
        /// The rule broken.
        why: &'static str,
    },
    /// The transcript carries no signature.
    #[error(
        "the head (entry {entry}) is not signed: the transcript was not sealed with the audit key"
    )]
    Unsigned {
        /// The last entry's position.
        entry: u32,
    },
    /// The signature is malformed or does not verify.
    #[error("the signature over the head (entry {entry}) {problem}")]
    Signature {
        /// The last entry's position.
        entry: u32,
        /// What is wrong.
        problem: String,
    },
    /// The audit key given to verify with is not an EC P-256 public key.
    #[error("audit key: not an EC P-256 SubjectPublicKeyInfo: {0}")]
    AuditKey(String),
}

impl TranscriptError {
    /// The entry (its position, 1, 2, ...) the error is about, if any.
    pub fn entry(&self) -> Option<u32> {
        match self {
            TranscriptError::Sequence { entry, .. }
            | TranscriptError::BadHash { entry, .. }
            | TranscriptError::Altered { entry }
            | TranscriptError::BrokenLink { entry }
            | TranscriptError::Head { entry }
            | TranscriptError::Outcome { entry, .. }
            | TranscriptError::Unsigned { entry }
            | TranscriptError::Signature { entry, .. } => Some(*entry),
            TranscriptError::Json(_)
            | TranscriptError::Header { .. }
            | TranscriptError::Empty
            | TranscriptError::AuditKey(_) => None,
        }
    }
}

/// One step of a ceremony, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TranscriptEntry {
    /// Position in the chain: 1, 2, ...
    pub seq: u32,
    /// RFC 3339 UTC with milliseconds.
    pub time: String,
    /// The step ("sign-in", "generate", ...) or "rolled-back", "aborted", "failed".
    pub step: String,
    /// The officer id, or "custodyd".
    pub actor: String,
    /// One line for people: "alice signed in".
    pub summary: String,
    /// Fingerprints, labels, KCVs, signatures (hex), timings ...
    pub detail: Map<String, Value>,
    /// The previous entry's hash, hex ([`ZERO_HASH`] for entry 1).
    pub prev_hash: String,
    /// This entry's hash, hex.
    pub hash: String,
}

/// A ceremony's transcript: header, the chain of entries, and the audit
/// key's signature over the head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transcript {
    /// [`FORMAT`].
    pub format: String,
    /// The ceremony id.
    pub ceremony: String,
    /// The ceremony kind: "root-key", "kek" or "restore".
    pub kind: String,
    /// The script digest, hex.
    pub script_sha256: String,
    /// One of [`OUTCOMES`].
    pub outcome: String,
    /// The chain.
    pub entries: Vec<TranscriptEntry>,
    /// The last entry's hash ([`ZERO_HASH`] with no entries).
    pub head: String,
    /// DER ECDSA P-256 signature by the audit key over [`head_message`],
    /// hex; empty until signed.
    pub signature: String,
}

/// What a verified transcript vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedTranscript {
    /// The ceremony id.
    pub ceremony: String,
    /// The ceremony kind.
    pub kind: String,
    /// The outcome.
    pub outcome: String,
    /// How many entries the chain holds.
    pub entries: u32,
    /// The signed head.
    pub head: String,
}

/// The text the audit key signs to seal a transcript.
pub fn head_message(ceremony: &str, head: &str) -> String {
    format!("{FORMAT}\n{ceremony}\n{head}")
}

/// An entry as hashed: every field but `hash`, in declared order.
#[derive(Serialize)]
struct EntryBody<'a> {
    seq: u32,
    time: &'a str,
    step: &'a str,
    actor: &'a str,
    summary: &'a str,
    detail: SortedMap<'a>,
    prev_hash: &'a str,
}

/// A JSON object serialized in key order, at every depth.
struct SortedMap<'a>(&'a Map<String, Value>);

impl Serialize for SortedMap<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut entries: Vec<(&String, &Value)> = self.0.iter().collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        let mut map = serializer.serialize_map(Some(entries.len()))?;
        for (key, value) in entries {
            map.serialize_entry(key, &Sorted(value))?;
        }
        map.end()
    }
}

/// A JSON value whose objects are serialized in key order.
struct Sorted<'a>(&'a Value);

impl Serialize for Sorted<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Object(map) => SortedMap(map).serialize(serializer),
            Value::Array(items) => serializer.collect_seq(items.iter().map(Sorted)),
            other => other.serialize(serializer),
        }
    }
}

/// The 32 bytes of a hex hash, if it is 64 lower-case hex digits (one
/// spelling only, so a hash compares equal exactly when its bytes do).
fn hash_bytes(hex_hash: &str) -> Option<[u8; 32]> {
    lower_hex_array(hex_hash)
}

/// The hash of `entry` given the previous hash's bytes.
fn entry_hash(entry: &TranscriptEntry, prev: &[u8; 32]) -> String {
    let body = EntryBody {
        seq: entry.seq,
        time: &entry.time,
        step: &entry.step,
        actor: &entry.actor,
        summary: &entry.summary,
        detail: SortedMap(&entry.detail),
        prev_hash: &entry.prev_hash,
    };
    // Serializing strings, an integer and a JSON map to memory cannot fail:
    // every map key is a string and serde_json numbers are always finite.
    let json = serde_json::to_vec(&body).unwrap_or_default();
    hex::encode(
        Sha256::new()
            .chain_update(ENTRY_DOMAIN)
            .chain_update(prev)
            .chain_update(&json)
            .finalize(),
    )
}

impl Transcript {
    /// An empty, in-progress transcript for a ceremony.
    pub fn new(ceremony: &str, kind: &str, script_sha256: &[u8; 32]) -> Transcript {
        Transcript {
            format: FORMAT.into(),
            ceremony: ceremony.into(),
            kind: kind.into(),
            script_sha256: hex::encode(script_sha256),
            outcome: "in-progress".into(),
            entries: Vec::new(),
            head: ZERO_HASH.into(),
            signature: String::new(),
        }
    }

    /// Records a step at `time_ms` (Unix milliseconds) and returns the entry.
    /// The head moves to the new entry, so any signature is cleared: it
    /// covered the old head and would no longer verify.
    pub fn append(
        &mut self,
        time_ms: i64,
        step: &str,
        actor: &str,
        summary: &str,
        detail: Map<String, Value>,
    ) -> &TranscriptEntry {
        let prev_hash = self
            .entries
            .last()
            .map_or_else(|| ZERO_HASH.to_string(), |e| e.hash.clone());
        // The previous hash was computed here, so it is always valid hex.
        let prev = hash_bytes(&prev_hash).unwrap_or([0; 32]);
        let mut entry = TranscriptEntry {
            seq: u32::try_from(self.entries.len() + 1).unwrap_or(u32::MAX),
            time: crate::audit::rfc3339_ms(time_ms),
            step: step.into(),
            actor: actor.into(),
            summary: summary.into(),
            detail,
            prev_hash,
            hash: String::new(),
        };
        entry.hash = entry_hash(&entry, &prev);
        self.head = entry.hash.clone();
        self.signature.clear();
        self.entries.push(entry);
        &self.entries[self.entries.len() - 1]
    }

    /// The exact bytes the audit key signs: [`head_message`] of this
    /// transcript's ceremony and head.
    pub fn signing_message(&self) -> Vec<u8> {
        head_message(&self.ceremony, &self.head).into_bytes()
    }

    /// Stores the audit key's DER signature over [`Transcript::signing_message`].
    /// Refuses anything that is not a DER ECDSA P-256 signature (a raw r ‖ s
    /// from the HSM must be converted first).
    pub fn set_signature(&mut self, der: &[u8]) -> Result<(), TranscriptError> {
        p256::ecdsa::Signature::from_der(der).map_err(|e| TranscriptError::Signature {
            entry: self.last_entry(),
            problem: format!("is not a DER ECDSA P-256 signature: {e}"),
        })?;
        self.signature = hex::encode(der);
        Ok(())
    }

    fn last_entry(&self) -> u32 {
        u32::try_from(self.entries.len()).unwrap_or(u32::MAX)
    }

    /// Checks the whole transcript against the audit key (its
    /// SubjectPublicKeyInfo DER): every entry's seq, hash and link, the
    /// head, the outcome against the last step, the header against the
    /// first entry, and the signature.
    pub fn verify(&self, audit_key_spki: &[u8]) -> Result<VerifiedTranscript, TranscriptError> {
        if self.format != FORMAT {
            return Err(TranscriptError::Header {
                field: "format",
                problem: format!("{:?} is not {FORMAT:?}", self.format),
            });
        }
        if !OUTCOMES.contains(&self.outcome.as_str()) {
            return Err(TranscriptError::Header {
                field: "outcome",
                problem: format!("{:?} is not one of {}", self.outcome, OUTCOMES.join(", ")),
            });
        }
        let mut expected_prev = ZERO_HASH;
        for (position, entry) in (1u32..).zip(&self.entries) {
            if entry.seq != position {
                return Err(TranscriptError::Sequence {
                    entry: position,
                    found: entry.seq,
                });
            }
            let prev = hash_bytes(&entry.prev_hash).ok_or(TranscriptError::BadHash {
                entry: position,
                field: "prev_hash",
            })?;
            if hash_bytes(&entry.hash).is_none() {
                return Err(TranscriptError::BadHash {
                    entry: position,
                    field: "hash",
                });
            }
            // The entry's own hash first: a changed entry is reported as
            // changed, not as a broken link of the one after it.
            if entry_hash(entry, &prev) != entry.hash {
                return Err(TranscriptError::Altered { entry: position });
            }
            if entry.prev_hash != expected_prev {
                return Err(TranscriptError::BrokenLink { entry: position });
            }
            expected_prev = &entry.hash;
        }
        let last = self.entries.last().ok_or(TranscriptError::Empty)?;
        let last_seq = last.seq;
        if self.head != last.hash {
            return Err(TranscriptError::Head { entry: last_seq });
        }
        self.check_outcome(last)?;
        self.check_header_against_first_entry()?;
        self.check_signature(audit_key_spki, last_seq)?;
        Ok(VerifiedTranscript {
            ceremony: self.ceremony.clone(),
            kind: self.kind.clone(),
            outcome: self.outcome.clone(),
            entries: last_seq,
            head: self.head.clone(),
        })
    }

    /// The outcome is outside the signature; it must agree with the last
    /// (signed) step.
    fn check_outcome(&self, last: &TranscriptEntry) -> Result<(), TranscriptError> {
        let step = last.step.as_str();
        let outcome = self.outcome.as_str();
        let why = if FAILURE_STEPS.contains(&step) && outcome != step {
            Some("a transcript that ends in rolled-back, aborted or failed has that outcome")
        } else if FAILURE_STEPS.contains(&outcome) && outcome != step {
            Some("a rolled-back, aborted or failed transcript ends with an entry of that step")
        } else if outcome == "completed" && !COMPLETING_STEPS.contains(&step) {
            Some("a completed transcript ends with commit or destroy-scratch")
        } else {
            None
        };
        match why {
            Some(why) => Err(TranscriptError::Outcome {
                entry: last.seq,
                step: last.step.clone(),
                outcome: self.outcome.clone(),
                why,
            }),
            None => Ok(()),
        }
    }

    /// The header's ceremony, kind and script digest must match what the
    /// first (signed) entry records of them, where it records them.
    fn check_header_against_first_entry(&self) -> Result<(), TranscriptError> {
        let Some(first) = self.entries.first() else {
            return Ok(());
        };
        let header = [
            ("ceremony", &self.ceremony),
            ("kind", &self.kind),
            ("script_sha256", &self.script_sha256),
        ];
        for (field, value) in header {
            let Some(recorded) = first.detail.get(field) else {
                continue;
            };
            if recorded.as_str() != Some(value.as_str()) {
                return Err(TranscriptError::Header {
                    field,
                    problem: format!(
                        "{value:?} is not what entry 1 records ({recorded}): the header was changed"
                    ),
                });
            }
        }
        Ok(())
    }

    fn check_signature(&self, audit_key_spki: &[u8], entry: u32) -> Result<(), TranscriptError> {
        let key = p256::ecdsa::VerifyingKey::from_public_key_der(audit_key_spki)
            .map_err(|e| TranscriptError::AuditKey(e.to_string()))?;
        if self.signature.is_empty() {
            return Err(TranscriptError::Unsigned { entry });
        }
        let der = hex::decode(&self.signature).map_err(|_| TranscriptError::Signature {
            entry,
            problem: "is not hex".into(),
        })?;
        let signature =
            p256::ecdsa::Signature::from_der(&der).map_err(|e| TranscriptError::Signature {
                entry,
                problem: format!("is not a DER ECDSA P-256 signature: {e}"),
            })?;
        key.verify(&self.signing_message(), &signature)
            .map_err(|_| TranscriptError::Signature {
                entry,
                problem:
                    "does not verify with the audit key (the head or ceremony id was changed, \
                          or another key signed it)"
                        .into(),
            })
    }

    /// A report for people: header, a table of the steps, each entry's
    /// detail, then the head and signature. The JSON transcript, verified
    /// with the audit key, is the record; this is its reading copy.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_markdown(&mut out);
        out
    }

    fn write_markdown(&self, out: &mut String) -> std::fmt::Result {
        writeln!(out, "# Ceremony transcript: {}", cell(&self.ceremony))?;
        writeln!(out)?;
        writeln!(out, "- Kind: {}", cell(&self.kind))?;
        writeln!(out, "- Script SHA-256: {}", code(&self.script_sha256))?;
        writeln!(out, "- Outcome: {}", cell(&self.outcome))?;
        writeln!(out, "- Entries: {}", self.entries.len())?;
        writeln!(out)?;
        writeln!(out, "## Steps")?;
        writeln!(out)?;
        writeln!(out, "| # | Time | Step | Actor | Summary |")?;
        writeln!(out, "|---|---|---|---|---|")?;
        for e in &self.entries {
            writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                e.seq,
                cell(&e.time),
                cell(&e.step),
                cell(&e.actor),
                cell(&e.summary)
            )?;
        }
        writeln!(out)?;
        writeln!(out, "## Details")?;
        for e in &self.entries {
            writeln!(out)?;
            writeln!(out, "### {}. {} ({})", e.seq, cell(&e.step), cell(&e.actor))?;
            writeln!(out)?;
            writeln!(out, "{}", cell(&e.summary))?;
            writeln!(out)?;
            if e.detail.is_empty() {
                writeln!(out, "- (no detail)")?;
            }
            let mut detail: Vec<(&String, &Value)> = e.detail.iter().collect();
            detail.sort_by(|a, b| a.0.cmp(b.0));
            for (key, value) in detail {
                let value = match value {
                    Value::String(s) => code(s),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    Value::Null => "(none)".into(),
                    other => code(&other.to_string()),
                };
                writeln!(out, "- {}: {value}", cell(key))?;
            }
            writeln!(out, "- entry hash: {}", code(&e.hash))?;
        }
        writeln!(out)?;
        writeln!(out, "## Seal")?;
        writeln!(out)?;
        writeln!(
            out,
            "- Head (hash of entry {}): {}",
            self.entries.len(),
            code(&self.head)
        )?;
        if self.signature.is_empty() {
            writeln!(out, "- Audit key signature: not signed")?;
        } else {
            writeln!(
                out,
                "- Audit key signature (DER, hex): {}",
                code(&self.signature)
            )?;
        }
        writeln!(out)?;
        writeln!(
            out,
            "This report is a reading copy. The JSON transcript is the record: \
             verify it with the audit key before relying on it."
        )
    }

    /// The transcript as pretty JSON (the file that is kept).
    pub fn to_json(&self) -> String {
        // Strings, integers and JSON maps always serialize.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Reads a transcript file. Unknown fields are refused: they would be
    /// shown to a reader of the file but covered by no hash. This does not
    /// verify: call [`Transcript::verify`].
    pub fn from_json(text: &str) -> Result<Transcript, TranscriptError> {
        serde_json::from_str(text).map_err(|e| TranscriptError::Json(e.to_string()))
    }
}

/// Text for a table cell or a heading: one line, pipes escaped.
fn cell(text: &str) -> String {
    text.replace(['\r', '\n'], " ").replace('|', "\\|")
}

/// Text as an inline code span, on one line, fenced by more backticks than
/// it contains in a row.
fn code(text: &str) -> String {
    let text = text.replace(['\r', '\n'], " ");
    let longest_run = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest_run + 1);
    if longest_run > 0 {
        format!("{fence} {text} {fence}")
    } else {
        format!("{fence}{text}{fence}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer;
    use p256::pkcs8::EncodePublicKey;

    fn key(byte: u8) -> SigningKey {
        SigningKey::from_slice(&[byte; 32]).unwrap()
    }

    fn spki(key: &SigningKey) -> Vec<u8> {
        key.verifying_key()
            .to_public_key_der()
            .unwrap()
            .as_bytes()
            .to_vec()
    }

    fn sign(transcript: &mut Transcript, key: &SigningKey) {
        let signature: p256::ecdsa::Signature = key.sign(&transcript.signing_message());
        transcript
            .set_signature(signature.to_der().as_bytes())
            .unwrap();
    }

    fn detail(pairs: &[(&str, Value)]) -> Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.clone()))
            .collect()
    }

    /// A completed root-key ceremony of five entries, signed by `key(1)`.
    fn ceremony() -> Transcript {
        let digest = [7u8; 32];
        let mut t = Transcript::new("root-2026", "root-key", &digest);
        let t0 = 1_780_000_000_000;
        t.append(
            t0,
            "sign-in",
            "alice",
            "alice signed in",
            detail(&[
                ("ceremony", "root-2026".into()),
                ("kind", "root-key".into()),
                ("script_sha256", hex::encode(digest).into()),
                ("signature", "3045aa".into()),
            ]),
        );
        t.append(t0 + 1_500, "sign-in", "bob", "bob signed in", Map::new());
        t.append(
            t0 + 9_042,
            "generate",
            "custodyd",
            "key pair generated (EC P-384)",
            detail(&[
                ("fingerprint", "3f2a9c01".into()),
                ("label", "root-ca/1".into()),
                ("rto_ms", 812.into()),
            ]),
        );
        t.append(
            t0 + 60_000,
            "confirm",
            "alice",
            "alice confirmed the fingerprint",
            detail(&[("words", serde_json::json!(["abandon", "ability"]))]),
        );
        t.append(
            t0 + 61_000,
            "commit",
            "custodyd",
            "root-ca v1 registered",
            Map::new(),
        );
        t.outcome = "completed".into();
        sign(&mut t, &key(1));
        t
    }

    fn verify(t: &Transcript) -> Result<VerifiedTranscript, TranscriptError> {
        t.verify(&spki(&key(1)))
    }

    #[test]
    fn a_signed_chain_verifies_and_says_what_it_covers() {
        let t = ceremony();
        assert_eq!(t.entries[0].prev_hash, ZERO_HASH);
        assert_eq!(t.entries[0].time, "2026-05-28T20:26:40Z");
        assert_eq!(t.entries[1].time, "2026-05-28T20:26:41.5Z");
        for pair in t.entries.windows(2) {
            assert_eq!(pair[1].prev_hash, pair[0].hash);
        }
        assert_eq!(
            verify(&t).unwrap(),
            VerifiedTranscript {
                ceremony: "root-2026".into(),
                kind: "root-key".into(),
                outcome: "completed".into(),
                entries: 5,
                head: t.entries[4].hash.clone(),
            }
        );
    }

    #[test]
    fn the_entry_hash_is_the_canonical_json_in_the_design() {
        let mut t = Transcript::new("c", "kek", &[0; 32]);
        // Inserted out of order, nested: hashed in key order at every depth.
        let mut inner = Map::new();
        inner.insert("z".into(), 1.into());
        inner.insert("a".into(), true.into());
        let mut d = Map::new();
        d.insert("kcv".into(), "a1b2c3".into());
        d.insert("b".into(), Value::Object(inner));
        let entry = t
            .append(0, "backup-kek", "custodyd", "backup KEK \"made\"", d)
            .clone();
        let json = format!(
            r#"{{"seq":1,"time":"1970-01-01T00:00:00Z","step":"backup-kek","actor":"custodyd","summary":"backup KEK \"made\"","detail":{{"b":{{"a":true,"z":1}},"kcv":"a1b2c3"}},"prev_hash":"{ZERO_HASH}"}}"#
        );
        let mut preimage = b"custody-transcript-entry/v1\n".to_vec();
        preimage.extend_from_slice(&[0; 32]);
        preimage.extend_from_slice(json.as_bytes());
        assert_eq!(entry.hash, hex::encode(Sha256::digest(&preimage)));
        assert_eq!(t.head, entry.hash);
        assert_eq!(
            head_message("c", &t.head),
            format!("custody-transcript/v1\nc\n{}", entry.hash)
        );
    }

    #[test]
    fn changing_any_field_of_any_entry_is_caught_at_that_entry() {
        type Edit = fn(&mut TranscriptEntry);
        let original = ceremony();
        let mut caught = 0;
        for i in 0..original.entries.len() {
            let seq = u32::try_from(i + 1).unwrap();
            let edits: [(&str, Edit); 8] = [
                ("seq", |e| e.seq += 10),
                ("time", |e| e.time.push('1')),
                ("step", |e| e.step.push_str("-again")),
                ("actor", |e| e.actor = "mallory".into()),
                ("summary", |e| e.summary.push('!')),
                ("detail", |e| {
                    e.detail.insert("note".into(), "added later".into());
                }),
                ("prev_hash", |e| e.prev_hash = "1".repeat(64)),
                ("hash", |e| e.hash = "2".repeat(64)),
            ];
            for (field, edit) in edits {
                let mut t = original.clone();
                edit(&mut t.entries[i]);
                let Err(err) = verify(&t) else {
                    panic!("changing {field} of entry {seq} went unnoticed");
                };
                assert_eq!(err.entry(), Some(seq), "{field} of entry {seq}: {err}");
                assert!(err.to_string().contains(&format!("entry {seq}")), "{err}");
                caught += 1;
            }
        }
        assert_eq!(caught, 40);
    }

    #[test]
    fn an_entry_rehashed_after_a_change_breaks_the_next_link() {
        let mut t = ceremony();
        t.entries[1].summary = "bob did not sign in".into();
        let prev = hash_bytes(&t.entries[1].prev_hash).unwrap();
        t.entries[1].hash = entry_hash(&t.entries[1], &prev);
        assert_eq!(verify(&t), Err(TranscriptError::BrokenLink { entry: 3 }));
    }

    #[test]
    fn reordered_and_removed_entries_are_caught() {
        let mut swapped = ceremony();
        swapped.entries.swap(1, 2);
        assert_eq!(
            verify(&swapped),
            Err(TranscriptError::Sequence { entry: 2, found: 3 })
        );

        let mut removed = ceremony();
        removed.entries.remove(2);
        let err = verify(&removed).unwrap_err();
        assert_eq!(err, TranscriptError::Sequence { entry: 3, found: 4 });
        assert!(err.to_string().contains("removed"), "{err}");

        // Renumbered and rehashed without the audit key: the chain is
        // consistent again, but no longer ends at the signed head.
        let mut rebuilt = ceremony();
        rebuilt.entries.remove(2);
        let mut prev = ZERO_HASH.to_string();
        for (seq, entry) in (1u32..).zip(rebuilt.entries.iter_mut()) {
            entry.seq = seq;
            entry.prev_hash = prev.clone();
            entry.hash = entry_hash(entry, &hash_bytes(&prev).unwrap());
            prev = entry.hash.clone();
        }
        assert_eq!(verify(&rebuilt), Err(TranscriptError::Head { entry: 4 }));
        // ... and moving the head there leaves the signature behind.
        rebuilt.head = prev;
        let err = verify(&rebuilt).unwrap_err();
        assert!(
            matches!(err, TranscriptError::Signature { entry: 4, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_cut_tail_no_longer_reaches_the_signed_head() {
        let mut t = ceremony();
        t.entries.truncate(3);
        let err = verify(&t).unwrap_err();
        assert_eq!(err, TranscriptError::Head { entry: 3 });
        assert!(err.to_string().contains("cut from the tail"), "{err}");
        t.entries.clear();
        assert_eq!(verify(&t), Err(TranscriptError::Empty));
    }

    #[test]
    fn a_changed_signature_or_another_key_is_refused() {
        let t = ceremony();
        let mut flipped = t.clone();
        let mut der = hex::decode(&flipped.signature).unwrap();
        let last = der.len() - 1;
        der[last] ^= 1;
        flipped.signature = hex::encode(&der);
        let err = verify(&flipped).unwrap_err();
        assert!(
            matches!(err, TranscriptError::Signature { entry: 5, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("does not verify"), "{err}");

        let mut garbled = t.clone();
        garbled.signature = "30".into();
        let err = verify(&garbled).unwrap_err();
        assert!(
            matches!(err, TranscriptError::Signature { entry: 5, .. }),
            "{err}"
        );

        let err = t.verify(&spki(&key(2))).unwrap_err();
        assert!(
            matches!(err, TranscriptError::Signature { entry: 5, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("entry 5"), "{err}");

        // The ceremony id is signed, and recorded in entry 1.
        let mut renamed = t.clone();
        renamed.ceremony = "root-2027".into();
        assert!(matches!(
            verify(&renamed),
            Err(TranscriptError::Header {
                field: "ceremony",
                ..
            })
        ));
        let mut bare = Transcript::new("root-2026", "root-key", &[7; 32]);
        bare.append(0, "sign-in", "alice", "alice signed in", Map::new());
        sign(&mut bare, &key(1));
        assert!(verify(&bare).is_ok());
        bare.ceremony = "root-2027".into();
        let err = verify(&bare).unwrap_err();
        assert!(
            matches!(err, TranscriptError::Signature { entry: 1, .. }),
            "{err}"
        );

        assert!(matches!(
            t.verify(b"not a key"),
            Err(TranscriptError::AuditKey(_))
        ));
    }

    #[test]
    fn appending_clears_the_signature_and_unsigned_is_refused() {
        let mut t = ceremony();
        t.outcome = "in-progress".into();
        t.append(
            1_780_000_100_000,
            "failed",
            "custodyd",
            "HSM went away",
            Map::new(),
        );
        assert!(t.signature.is_empty());
        t.outcome = "failed".into();
        assert_eq!(verify(&t), Err(TranscriptError::Unsigned { entry: 6 }));
        assert!(t.set_signature(&[0x30, 0x01, 0x00]).is_err());
        sign(&mut t, &key(1));
        assert_eq!(verify(&t).unwrap().entries, 6);
    }

    #[test]
    fn the_unsigned_header_is_held_to_the_signed_entries() {
        let mut t = ceremony();
        t.outcome = "failed".into();
        assert!(matches!(
            verify(&t),
            Err(TranscriptError::Outcome { entry: 5, .. })
        ));
        t.outcome = "bogus".into();
        assert!(matches!(
            verify(&t),
            Err(TranscriptError::Header {
                field: "outcome",
                ..
            })
        ));

        let mut early = ceremony();
        early.entries.truncate(4);
        early.head = early.entries[3].hash.clone();
        sign(&mut early, &key(1));
        assert!(matches!(
            verify(&early),
            Err(TranscriptError::Outcome { entry: 4, .. })
        ));
        early.outcome = "in-progress".into();
        assert!(verify(&early).is_ok());

        for field in ["kind", "script_sha256"] {
            let mut t = ceremony();
            match field {
                "kind" => t.kind = "kek".into(),
                _ => t.script_sha256 = "8".repeat(64),
            }
            let err = verify(&t).unwrap_err();
            assert!(
                matches!(err, TranscriptError::Header { field: f, .. } if f == field),
                "{err}"
            );
        }

        let mut t = ceremony();
        t.format = "custody-transcript/v2".into();
        assert!(matches!(
            verify(&t),
            Err(TranscriptError::Header {
                field: "format",
                ..
            })
        ));
    }

    #[test]
    fn the_markdown_report_shows_every_entry() {
        let t = ceremony();
        let md = t.to_markdown();
        assert!(md.starts_with("# Ceremony transcript: root-2026\n"), "{md}");
        for entry in &t.entries {
            assert!(md.contains(&entry.summary), "{}", entry.summary);
            assert!(md.contains(&entry.hash));
        }
        assert!(md.contains("| 3 | 2026-05-28T20:26:49.042Z | generate | custodyd | key pair generated (EC P-384) |"), "{md}");
        assert!(md.contains("- rto_ms: 812"), "{md}");
        assert!(md.contains("- fingerprint: `3f2a9c01`"), "{md}");
        assert!(md.contains(&t.head));
        assert!(md.contains(&t.signature));
        assert!(md.contains("- Outcome: completed"));

        let mut odd = Transcript::new("x", "kek", &[0; 32]);
        odd.append(
            0,
            "sign-in",
            "a|b",
            "line\nbreak | pipe",
            detail(&[("t", "a`b".into())]),
        );
        let md = odd.to_markdown();
        assert!(
            md.contains("| 1 | 1970-01-01T00:00:00Z | sign-in | a\\|b | line break \\| pipe |"),
            "{md}"
        );
        assert!(md.contains("- t: `` a`b ``"), "{md}");
        assert!(md.contains("not signed"), "{md}");
    }

    #[test]
    fn the_json_file_round_trips_and_still_verifies() {
        let t = ceremony();
        let json = t.to_json();
        let back = Transcript::from_json(&json).unwrap();
        assert_eq!(back, t);
        assert!(verify(&back).is_ok());

        let mut value: Value = serde_json::from_str(&json).unwrap();
        value["entries"][1]["note"] = "unhashed".into();
        let err = Transcript::from_json(&value.to_string()).unwrap_err();
        assert!(matches!(err, TranscriptError::Json(_)), "{err}");
        assert!(Transcript::from_json("{").is_err());
    }
}
