//! Ceremony transcripts (JSON: a hash chain of entries, the head signed by
//! the audit key), as `custodyctl ceremony verify-transcript` reads them
//! (`Transcript::from_json`, then `Transcript::verify`).

use custody_core::ceremony::transcript::{Transcript, TranscriptError};
use p256::ecdsa::SigningKey;
use p256::ecdsa::signature::Signer;
use p256::pkcs8::EncodePublicKey;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

use super::json::{apply, json_edits};
use super::{as_text, config, edits, mutate};

const T0: i64 = 1_780_000_000_000;

fn audit_key() -> SigningKey {
    SigningKey::from_slice(&[0x22; 32]).expect("a P-256 scalar")
}

fn spki() -> Vec<u8> {
    audit_key()
        .verifying_key()
        .to_public_key_der()
        .expect("a P-256 key encodes")
        .as_bytes()
        .to_vec()
}

fn detail(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), v.clone()))
        .collect()
}

/// A completed root-key ceremony's transcript, as the engine writes one:
/// the first entry records the header, the last is the commit.
fn signed() -> Transcript {
    static SIGNED: std::sync::OnceLock<Transcript> = std::sync::OnceLock::new();
    SIGNED.get_or_init(build).clone()
}

fn build() -> Transcript {
    let digest = [0xab; 32];
    let mut transcript = Transcript::new("root-2026", "root-key", &digest);
    transcript.append(
        T0,
        "open",
        "alice",
        "alice opened the root-key ceremony root-2026",
        detail(&[
            ("ceremony", json!("root-2026")),
            ("kind", json!("root-key")),
            ("script_sha256", json!(hex::encode(digest))),
            ("plan", json!(["sign in", "generate", "commit"])),
        ]),
    );
    transcript.append(
        T0 + 1_000,
        "sign-in",
        "alice",
        "alice signed in (1 of 2)",
        Map::new(),
    );
    transcript.append(
        T0 + 2_000,
        "sign-in",
        "bob",
        "bob signed in (2 of 2)",
        Map::new(),
    );
    transcript.append(
        T0 + 3_000,
        "generate",
        "custodyd",
        "generated root-ca v1 (P-384)",
        detail(&[
            ("label", json!("key/root-ca/v1")),
            ("fingerprint", json!("3f".repeat(32))),
            ("took_ms", json!(41)),
        ]),
    );
    transcript.append(
        T0 + 4_000,
        "commit",
        "custodyd",
        "root-ca registered",
        Map::new(),
    );
    transcript.outcome = "completed".into();
    let signature: p256::ecdsa::Signature = audit_key().sign(&transcript.signing_message());
    transcript
        .set_signature(signature.to_der().as_bytes())
        .expect("a DER signature");
    transcript
}

fn json(transcript: &Transcript) -> String {
    serde_json::to_string_pretty(transcript).expect("a transcript is JSON")
}

fn read(text: &str) -> Result<Transcript, TranscriptError> {
    let transcript = Transcript::from_json(text)?;
    transcript.verify(&spki())?;
    Ok(transcript)
}

/// An accepted transcript must say exactly what was signed. Hashes and the
/// signature are compared as bytes: hex case is layout.
fn same_as_signed(read: &Transcript, original: &Transcript) -> Result<(), TestCaseError> {
    let mut read = read.clone();
    let lower = |s: &mut String| *s = s.to_ascii_lowercase();
    lower(&mut read.head);
    lower(&mut read.signature);
    lower(&mut read.script_sha256);
    for entry in &mut read.entries {
        lower(&mut entry.hash);
        lower(&mut entry.prev_hash);
    }
    prop_assert_eq!(&read, original);
    Ok(())
}

#[test]
fn f6_the_transcript_fixture_is_accepted() {
    let original = signed();
    assert_eq!(
        read(&json(&original)).expect("the fixture verifies"),
        original
    );
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn f6_a_changed_transcript_is_refused_or_reads_as_what_was_signed(edits in edits()) {
        let original = signed();
        let text = as_text(&mutate(json(&original).as_bytes(), &edits));
        if let Ok(read) = read(&text) {
            same_as_signed(&read, &original)?;
        }
    }

    #[test]
    fn f6_a_transcript_with_changed_values_is_refused_or_reads_as_what_was_signed(
        edits in json_edits(),
    ) {
        let original = signed();
        let value = serde_json::to_value(&original).expect("a transcript is JSON");
        let text = serde_json::to_string(&apply(&value, &edits)).expect("JSON writes");
        if let Ok(read) = read(&text) {
            same_as_signed(&read, &original)?;
        }
    }

    #[test]
    fn f6_arbitrary_text_never_panics_the_transcript_parser(text in ".{0,300}") {
        let _ = read(&text);
    }
}
