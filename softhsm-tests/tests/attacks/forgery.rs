//! I4, bundles are trusted by pinned keys only (issue 12, scenario 4).
//!
//! Two officers forge a backup bundle: a P-256 key pair they generated
//! outside any HSM, wrapped (RFC 5649) under a backup KEK of their own that
//! they split into shares themselves, in a manifest whose `source_token`
//! names another token and which an "audit key" of their own signs, embedded
//! in the bundle. They open an ordinary restore ceremony of it on the live
//! daemon, sign in and hand in their shares.
//!
//! Safe: custodyd refuses the bundle when the ceremony opens, because no key
//! it trusts signed the manifest, and no key of theirs reaches the registry.
//! The audit keys custodyd trusts are its own, those pinned by SHA-256 in its
//! config (`[ceremony] trusted_audit_keys`), and the one named by SHA-256 in
//! the restore script the officers sign (`restore.audit_key_sha256`). This
//! script names none and the config pins none, so nothing but custodyd's own
//! audit key may vouch for a bundle here; nor may a script that pins another
//! key, nor a bundle that names custodyd's own key but was signed by theirs.
//! A control shows that the pin is all that decides: the same forgery,
//! pinned, is restored.

use std::path::Path;

use custody_core::audit::rfc3339_ms;
use custody_core::ceremony::bundle::{
    self, BackupKekRef, Bundle, BundledKey, KeyProtections, Manifest,
};
use custody_core::ceremony::components::kcv;
use custody_core::ceremony::shares;
use custody_proto::v1::CeremonyState;
use hsm_shim::SignAlgorithm;
use sha2::Digest as _;
use softhsm_tests::ceremony::{audit_key_sha256, pinned_restore_script, restore_script};
use softhsm_tests::service::{TestService, reason, runtime};
use softhsm_tests::token_test;

use crate::common::{
    PAYLOAD, combine, get_key, kwp_unwrap, kwp_wrap, officers_of, openssl, public_key_pem, refusal,
    sign, sign_outside, state, verifies,
};

/// The token the forged bundle claims to come from: any but this daemon's.
const SOURCE_TOKEN: &str = "custody-prod-2 (serial 4f1c0b9e2a7d3358)";

/// What the two officers made at home.
struct Forgery {
    bundle: String,
    /// Share lines of their backup KEK, 2 of 3.
    shares: Vec<String>,
    /// The private key of the planted key pair, PKCS#8 DER.
    private_key: Vec<u8>,
    /// SHA-256 (hex) of their audit key's SPKI DER, computed by openssl.
    audit_key_sha256: String,
}

/// A bundle of `key_id`, a key pair made by openssl, under a backup KEK and
/// signed by an audit key that are both the forgers' own.
fn forge(scratch: &Path, key_id: &str) -> Forgery {
    let new_p256 = softhsm_tests::openssl_p256_key;
    let audit_key = new_p256();
    let audit_public = openssl(&["pkey", "-pubout"], &audit_key).unwrap();
    let key = new_p256();
    let private_key = openssl(&["pkcs8", "-topk8", "-nocrypt", "-outform", "DER"], &key).unwrap();
    let spki = openssl(&["pkey", "-pubout", "-outform", "DER"], &key).unwrap();

    let kek: [u8; 32] = openssl(&["rand", "32"], b"").unwrap().try_into().unwrap();
    let split = shares::split(&kek, 2, 3).unwrap();
    let manifest = Manifest {
        format: bundle::FORMAT.into(),
        created: rfc3339_ms(1_780_000_000_000),
        source_token: SOURCE_TOKEN.into(),
        backup_kek: BackupKekRef {
            set_id: split[0].set_id(),
            threshold: 2,
            shares: 3,
            kcv: hex::encode(kcv(&kek)),
        },
        keys: vec![BundledKey {
            key_id: key_id.into(),
            version: 1,
            algorithm: "EC_SIGN_P256_SHA256".into(),
            state: "active".into(),
            fingerprint: hex::encode(sha2::Sha256::digest(&spki)),
            public_key_der: Some(hex::encode(&spki)),
            check: None,
            wrapped: hex::encode(kwp_wrap(&kek, &private_key).unwrap()),
            state_ms: 1_780_000_000_000,
            activated_ms: Some(1_780_000_000_000),
            destroy_at_ms: None,
            legal_hold: None,
            destroy_approved_under: None,
        }],
        protections: vec![KeyProtections {
            key_id: key_id.into(),
            primary_version: 1,
            allowed_signers: vec!["ca-issuing".into()],
            policies: Default::default(),
            min_version: 0,
            cryptoperiod_ms: None,
            backup_exportable: true,
            officer_principals: Default::default(),
        }],
    };
    let audit_public = String::from_utf8(audit_public).unwrap();
    let mut forged = Bundle::new(manifest, &audit_public);
    let audit_file = tempfile::NamedTempFile::new_in(scratch).unwrap();
    std::fs::write(audit_file.path(), &audit_key).unwrap();
    let signature = openssl(
        &[
            "dgst",
            "-sha256",
            "-sign",
            audit_file.path().to_str().unwrap(),
        ],
        &forged.signing_message(),
    )
    .unwrap();
    forged.set_signature(&signature).unwrap();
    Forgery {
        bundle: forged.to_json(),
        shares: split.iter().map(|s| s.to_text().to_string()).collect(),
        private_key,
        audit_key_sha256: hex::encode(sha2::Sha256::digest(
            openssl(
                &["pkey", "-pubin", "-pubout", "-outform", "DER"],
                audit_public.as_bytes(),
            )
            .unwrap(),
        )),
    }
}

/// The forgery is a good one: well formed, signed by the audit key it
/// embeds, its shares rebuild its backup KEK, and that KEK unwraps the key
/// the manifest names. So when custodyd refuses it, only the choice of the
/// key it trusts can have done it. (This one runs today.)
#[test]
fn the_forged_bundle_is_sound_but_for_who_signed_it() {
    let scratch = tempfile::tempdir().unwrap();
    let forgery = forge(scratch.path(), "forged-root");
    let bundle = Bundle::parse(&forgery.bundle).unwrap();
    bundle.verify(&bundle.audit_key_spki().unwrap()).unwrap();
    assert_eq!(
        hex::encode(sha2::Sha256::digest(bundle.audit_key_spki().unwrap())),
        forgery.audit_key_sha256
    );
    let kek = combine(&[&forgery.shares[0], &forgery.shares[2]]).unwrap();
    assert_eq!(hex::encode(kcv(&kek)), bundle.manifest.backup_kek.kcv);
    let wrapped = hex::decode(&bundle.manifest.keys[0].wrapped).unwrap();
    assert_eq!(kwp_unwrap(&kek, &wrapped).unwrap(), forgery.private_key);
}

token_test!(
    fn i4_a_bundle_signed_by_a_key_nobody_pinned_is_refused(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = officers_of(&service).await;
            let signer = service.client("ca-issuing").await;
            let forgery = forge(&token.scratch(), "forged-root");
            let script = restore_script("restore-2026", &forgery.bundle, false);

            let opened = officers.start("alice", &script, &forgery.bundle).await;
            let planted: Result<String, String> = async {
                let name = opened
                    .as_ref()
                    .map_err(|e| refusal("opening the restore of the forged bundle", e))?
                    .name
                    .clone();
                let step = |what: &'static str| move |e: tonic::Status| refusal(what, &e);
                officers.sign_in("alice", &name, &script).await.map_err(step("alice's sign-in"))?;
                officers.sign_in("bob", &name, &script).await.map_err(step("bob's sign-in"))?;
                officers
                    .submit_share("alice", &name, &forgery.shares[0])
                    .await
                    .map_err(step("alice's share"))?;
                let done = officers
                    .submit_share("bob", &name, &forgery.shares[1])
                    .await
                    .map_err(step("bob's share"))?;
                if state(&done) != CeremonyState::Completed {
                    return Err(format!("the restore ended {:?}: {}", state(&done), done.error));
                }
                let live = public_key_pem(&signer, "forged-root")
                    .await
                    .map_err(step("reading forged-root"))?;
                let theirs = sign_outside(token, &forgery.private_key, "sha256", PAYLOAD)?;
                if !verifies(token, &live, SignAlgorithm::EcdsaP256Sha256, PAYLOAD, &theirs) {
                    return Err("forged-root is not the key they made".into());
                }
                let by_custody = sign(&signer, "forged-root", PAYLOAD)
                    .await
                    .map_err(step("ca-issuing's Sign"))?;
                Ok(format!(
                    "the bundle's source_token names {:?}, so custodyd verified it with the audit \
                     key it embeds; the restore completed, keys/forged-root is live (ca-issuing \
                     signs with it, {} bytes), and the private key they generated outside the HSM \
                     makes signatures that verify with its registered public key",
                    SOURCE_TOKEN,
                    by_custody.len()
                ))
            }
            .await;
            let operator = service.client("operator").await;
            let registered = get_key(&operator, "forged-root").await;
            let stopped = match planted {
                Ok(planted) => panic!("two officers planted a key of their own through a bundle their own key signed: {planted}"),
                Err(stopped) => stopped,
            };
            assert!(registered.is_err(), "forged-root is registered ({stopped})");
            let refused = opened.err().unwrap_or_else(|| {
                panic!("the forged bundle was accepted when the restore opened ({stopped})")
            });
            assert_eq!(reason(&refused), "BAD_BUNDLE", "{stopped}");
            // The refusal names the key the bundle claims, for the officers
            // to compare with what the source published.
            assert!(refused.message().contains(&forgery.audit_key_sha256), "{stopped}");
        });
    }
);

token_test!(
    fn i4_a_pin_of_another_key_or_a_borrowed_key_name_lets_no_forgery_in(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = officers_of(&service).await;
            let forgery = forge(&token.scratch(), "forged-root");
            let own = audit_key_sha256(&service);
            // The officers pin a key, but not the one that signed the
            // bundle: custodyd's own, or one nobody has.
            for (id, pin) in [("restore-own", own.clone()), ("restore-other", "ab".repeat(32))] {
                let script = pinned_restore_script(id, &forgery.bundle, false, &pin);
                let err = officers.start("alice", &script, &forgery.bundle).await.unwrap_err();
                assert_eq!(reason(&err), "BAD_BUNDLE", "{err}");
                assert!(err.message().contains(&forgery.audit_key_sha256), "{err}");
            }
            // The bundle names custodyd's own audit key, but their key
            // signed it: the name chooses nothing.
            let mut borrowed = Bundle::parse(&forgery.bundle).unwrap();
            borrowed.audit_key_pem = service.state().audit.audit_key_pem().to_string();
            let borrowed = borrowed.to_json();
            for script in [
                restore_script("restore-borrowed", &borrowed, false),
                pinned_restore_script("restore-borrowed", &borrowed, false, &own),
            ] {
                let err = officers.start("alice", &script, &borrowed).await.unwrap_err();
                assert_eq!(reason(&err), "BAD_BUNDLE", "{err}");
            }
            let operator = service.client("operator").await;
            assert!(get_key(&operator, "forged-root").await.is_err());
        });
    }
);

/// Opens the restore of `bundle` from `script`, signs alice and bob in and
/// hands in two shares.
async fn restore_with(
    officers: &softhsm_tests::ceremony::Officers<'_>,
    script: &str,
    forgery: &Forgery,
) -> Result<custody_proto::v1::Ceremony, tonic::Status> {
    let name = officers.start("alice", script, &forgery.bundle).await?.name;
    officers.sign_in("alice", &name, script).await?;
    officers.sign_in("bob", &name, script).await?;
    officers
        .submit_share("alice", &name, &forgery.shares[0])
        .await?;
    officers
        .submit_share("bob", &name, &forgery.shares[1])
        .await
}

token_test!(
    fn a_bundle_whose_audit_key_is_pinned_in_config_or_in_the_script_is_restored(token) {
        runtime().block_on(async {
            // The control of the pin: bundles of keys made outside any HSM,
            // signed by audit keys that are not custodyd's, restore once
            // the officers have pinned those keys, and only then.
            let by_config = forge(&token.scratch(), "pinned-in-config");
            let by_script = forge(&token.scratch(), "pinned-in-script");
            let pin = by_config.audit_key_sha256.clone();
            let service = TestService::start_with(token, move |config| {
                config.ceremony.trusted_audit_keys = vec![pin];
            })
            .await;
            let officers = officers_of(&service).await;
            let signer = service.client("ca-issuing").await;

            let script = restore_script("restore-config", &by_config.bundle, false);
            let done = restore_with(&officers, &script, &by_config).await.unwrap();
            assert_eq!(state(&done), CeremonyState::Completed, "{}", done.error);

            let unpinned = restore_script("restore-unpinned", &by_script.bundle, false);
            let err = officers.start("alice", &unpinned, &by_script.bundle).await.unwrap_err();
            assert_eq!(reason(&err), "BAD_BUNDLE", "{err}");
            let script = pinned_restore_script(
                "restore-script",
                &by_script.bundle,
                false,
                &by_script.audit_key_sha256,
            );
            let done = restore_with(&officers, &script, &by_script).await.unwrap();
            assert_eq!(state(&done), CeremonyState::Completed, "{}", done.error);

            for (key_id, forgery) in [("pinned-in-config", &by_config), ("pinned-in-script", &by_script)] {
                let live = public_key_pem(&signer, key_id).await.unwrap();
                let theirs = sign_outside(token, &forgery.private_key, "sha256", PAYLOAD).unwrap();
                assert!(verifies(token, &live, SignAlgorithm::EcdsaP256Sha256, PAYLOAD, &theirs));
            }
        });
    }
);
