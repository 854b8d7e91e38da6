//! Backup bundles (JSON, the manifest signed by the source's audit key), as
//! a restore ceremony reads them (`Bundle::parse`, then `Bundle::verify`
//! with the audit key custodyd trusts).

use std::collections::BTreeMap;

use custody_core::ceremony::bundle::{
    AesCheck, BackupKekRef, Bundle, BundleError, BundledKey, BundledPolicy, FORMAT, KeyProtections,
    Manifest,
};
use p256::ecdsa::SigningKey;
use p256::ecdsa::signature::Signer;
use p256::pkcs8::EncodePublicKey;
use p256::pkcs8::spki::der::pem::LineEnding;
use proptest::prelude::*;
use sha2::{Digest, Sha256};

use super::json::{apply, json_edits};
use super::{as_text, config, edits, mutate};

fn audit_key() -> SigningKey {
    SigningKey::from_slice(&[0x11; 32]).expect("a P-256 scalar")
}

fn spki(key: &SigningKey) -> Vec<u8> {
    key.verifying_key()
        .to_public_key_der()
        .expect("a P-256 key encodes")
        .as_bytes()
        .to_vec()
}

/// A bundle of a P-256 key and an AES key with protections, signed by the
/// audit key: what a backup writes.
fn signed() -> Bundle {
    static SIGNED: std::sync::OnceLock<Bundle> = std::sync::OnceLock::new();
    SIGNED.get_or_init(build).clone()
}

fn build() -> Bundle {
    let public = spki(&SigningKey::from_slice(&[0x03; 32]).expect("a P-256 scalar"));
    let manifest = Manifest {
        format: FORMAT.into(),
        created: "2026-05-28T20:26:40.123Z".into(),
        source_token: "custody (serial 1a2b3c4d5e6f7081)".into(),
        backup_kek: BackupKekRef {
            set_id: "3f9a0c21".into(),
            threshold: 2,
            shares: 3,
            kcv: "0c1d2e".into(),
        },
        keys: vec![
            BundledKey {
                key_id: "root-ca".into(),
                version: 1,
                algorithm: "EC_SIGN_P256_SHA256".into(),
                state: "active".into(),
                fingerprint: hex::encode(Sha256::digest(&public)),
                public_key_der: Some(hex::encode(&public)),
                check: None,
                wrapped: "5a".repeat(144),
                state_ms: 1_780_000_000_000,
                activated_ms: Some(1_780_000_000_000),
                destroy_at_ms: None,
                legal_hold: None,
                destroy_approved_under: None,
            },
            BundledKey {
                key_id: "payments-kek".into(),
                version: 2,
                algorithm: "AES_256_GCM".into(),
                state: "deactivated".into(),
                fingerprint: "a1b2c3".into(),
                public_key_der: None,
                check: Some(AesCheck {
                    iv: "01".repeat(12),
                    ciphertext: "c7".repeat(40),
                }),
                wrapped: "e4".repeat(40),
                state_ms: 1_780_000_500_000,
                activated_ms: Some(1_779_000_000_000),
                destroy_at_ms: Some(1_790_000_000_000),
                legal_hold: Some("case 2026-117".into()),
                destroy_approved_under: None,
            },
        ],
        protections: vec![
            KeyProtections {
                key_id: "root-ca".into(),
                primary_version: 1,
                allowed_signers: vec!["ca-issuer".into()],
                policies: BTreeMap::from([(
                    "SIGN".to_string(),
                    BundledPolicy {
                        officers: vec!["alice".into(), "bob".into(), "carol".into()],
                        required: 2,
                    },
                )]),
                min_version: 0,
                cryptoperiod_ms: Some(7_776_000_000),
                backup_exportable: true,
                officer_principals: BTreeMap::from([
                    ("alice".to_string(), "alice".to_string()),
                    ("bob".to_string(), "bob".to_string()),
                    ("carol".to_string(), String::new()),
                ]),
            },
            KeyProtections {
                key_id: "payments-kek".into(),
                primary_version: 2,
                allowed_signers: Vec::new(),
                policies: BTreeMap::new(),
                min_version: 2,
                cryptoperiod_ms: None,
                backup_exportable: false,
                officer_principals: BTreeMap::new(),
            },
        ],
    };
    let key = audit_key();
    let pem = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("a PEM");
    let mut bundle = Bundle::new(manifest, &pem);
    let signature: p256::ecdsa::Signature = key.sign(&bundle.signing_message());
    bundle
        .set_signature(signature.to_der().as_bytes())
        .expect("a DER signature");
    bundle
}

/// What a restore does with a bundle file: parse, then verify.
fn read(text: &str) -> Result<Bundle, BundleError> {
    let bundle = Bundle::parse(text)?;
    bundle.verify(&spki(&audit_key()))?;
    Ok(bundle)
}

/// An accepted bundle must say exactly what was signed. The PEM of the
/// audit key is not trusted (verify compares it with the trusted key), so
/// only the manifest and the signature's bytes are compared.
fn same_as_signed(bundle: &Bundle, original: &Bundle) -> Result<(), TestCaseError> {
    prop_assert_eq!(&bundle.manifest, &original.manifest);
    prop_assert_eq!(
        hex::decode(&bundle.signature).ok(),
        hex::decode(&original.signature).ok()
    );
    Ok(())
}

#[test]
fn f6_the_bundle_fixture_is_accepted() {
    let original = signed();
    let read = read(&original.to_json()).expect("the fixture verifies");
    assert_eq!(read, original);
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn f6_a_changed_bundle_file_is_refused_or_reads_as_what_was_signed(edits in edits()) {
        let original = signed();
        let text = as_text(&mutate(original.to_json().as_bytes(), &edits));
        if let Ok(bundle) = read(&text) {
            same_as_signed(&bundle, &original)?;
        }
    }

    #[test]
    fn f6_a_bundle_with_changed_values_is_refused_or_reads_as_what_was_signed(
        edits in json_edits(),
    ) {
        let original = signed();
        let value = serde_json::to_value(&original).expect("a bundle is JSON");
        let text = serde_json::to_string(&apply(&value, &edits)).expect("JSON writes");
        if let Ok(bundle) = read(&text) {
            same_as_signed(&bundle, &original)?;
        }
    }

    #[test]
    fn f6_arbitrary_text_never_panics_the_bundle_parser(text in ".{0,300}") {
        let _ = read(&text);
    }
}
