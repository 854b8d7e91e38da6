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
//! Today the only audit key custodyd can trust is its own; the fix adds one
//! pinned in config or named by SHA-256 in the restore script the officers
//! sign. This script names none and the config pins none, so nothing but
//! custodyd's own audit key may vouch for a bundle here.

use std::path::Path;

use custody_core::audit::rfc3339_ms;
use custody_core::ceremony::bundle::{self, BackupKekRef, Bundle, BundledKey, Manifest};
use custody_core::ceremony::components::kcv;
use custody_core::ceremony::shares;
use custody_proto::v1::CeremonyState;
use hsm_shim::SignAlgorithm;
use sha2::Digest as _;
use softhsm_tests::ceremony::restore_script;
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
}

/// A bundle of `forged-root`, a key pair made by openssl, under a backup KEK
/// and signed by an audit key that are both the forgers' own.
fn forge(scratch: &Path) -> Forgery {
    let new_p256 = || {
        openssl(
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ],
            b"",
        )
        .unwrap()
    };
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
            key_id: "forged-root".into(),
            version: 1,
            algorithm: "EC_SIGN_P256_SHA256".into(),
            state: "active".into(),
            fingerprint: hex::encode(sha2::Sha256::digest(&spki)),
            public_key_der: Some(hex::encode(&spki)),
            check: None,
            wrapped: hex::encode(kwp_wrap(&kek, &private_key).unwrap()),
            allowed_signers: vec!["ca-issuing".into()],
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
    }
}

/// The forgery is a good one: well formed, signed by the audit key it
/// embeds, its shares rebuild its backup KEK, and that KEK unwraps the key
/// the manifest names. So when custodyd refuses it, only the choice of the
/// key it trusts can have done it. (This one runs today.)
#[test]
fn the_forged_bundle_is_sound_but_for_who_signed_it() {
    let scratch = tempfile::tempdir().unwrap();
    let forgery = forge(scratch.path());
    let bundle = Bundle::parse(&forgery.bundle).unwrap();
    bundle.verify(&bundle.audit_key_spki().unwrap()).unwrap();
    let kek = combine(&[&forgery.shares[0], &forgery.shares[2]]).unwrap();
    assert_eq!(hex::encode(kcv(&kek)), bundle.manifest.backup_kek.kcv);
    let wrapped = hex::decode(&bundle.manifest.keys[0].wrapped).unwrap();
    assert_eq!(kwp_unwrap(&kek, &wrapped).unwrap(), forgery.private_key);
}

token_test!(
    #[ignore = "issue 12 (I4): a bundle whose source_token names another token is verified with the audit key it embeds, so a forged bundle restores a key made outside the HSM"]
    fn i4_a_bundle_signed_by_a_key_nobody_pinned_is_refused(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = officers_of(&service).await;
            let signer = service.client("ca-issuing").await;
            let forgery = forge(&token.scratch());
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
            let refused = opened.err().map(|e| reason(&e)).unwrap_or_default();
            assert!(!refused.is_empty(), "the forged bundle was accepted when the restore opened ({stopped})");
        });
    }
);
