//! Key generation, signing and verification on SoftHSM2, every signature also
//! checked by `openssl`.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use hsm_shim::pkcs11::{Function, RvError};
use hsm_shim::{
    EcdsaEncoding, ErrorKind, Exportability, HashAlg, Hsm, HsmSession, KeyLabel, KeySpec,
    SignAlgorithm, SignInput,
};
use sha2::Digest;
use softhsm_tests::{TestToken, assert_success, openssl_verifies, token_test};

const MESSAGE: &[u8] = b"tbsCertificate bytes a CA would sign";

fn label(name: &str) -> KeyLabel {
    KeyLabel::new(name).unwrap()
}

fn digest(hash: HashAlg, message: &[u8]) -> Vec<u8> {
    match hash {
        HashAlg::Sha256 => sha2::Sha256::digest(message).to_vec(),
        HashAlg::Sha384 => sha2::Sha384::digest(message).to_vec(),
        HashAlg::Sha512 => sha2::Sha512::digest(message).to_vec(),
    }
}

/// The inputs an algorithm accepts: digests for ECDSA, messages for Ed25519,
/// both for RSA.
fn inputs(algorithm: SignAlgorithm, digest_bytes: &[u8]) -> Vec<SignInput<'_>> {
    match algorithm {
        SignAlgorithm::EcdsaP256Sha256 | SignAlgorithm::EcdsaP384Sha384 => {
            vec![SignInput::Digest(digest_bytes)]
        }
        SignAlgorithm::Ed25519 => vec![SignInput::Message(MESSAGE)],
        _ => vec![SignInput::Digest(digest_bytes), SignInput::Message(MESSAGE)],
    }
}

/// Generates a `spec` key and, for each algorithm and input form: signs,
/// verifies in the HSM and with openssl, and checks that a flipped bit fails
/// both verifiers.
fn sign_and_verify_everywhere(token: &TestToken, spec: KeySpec, algorithms: &[SignAlgorithm]) {
    let hsm = token.open();
    let mut session = hsm.session().unwrap();
    let key = label(&format!("{spec}/v1"));
    let info = session
        .generate_key_pair(&key, spec, Exportability::NonExportable)
        .unwrap();
    let public_key = info.public_key.expect("a key pair has a public key");
    assert_eq!(public_key.spec(), spec);
    assert_eq!(session.public_key(&key).unwrap(), public_key);

    for &algorithm in algorithms {
        let digest_bytes = algorithm
            .hash()
            .map(|h| digest(h, MESSAGE))
            .unwrap_or_default();
        for input in inputs(algorithm, &digest_bytes) {
            let what = format!("{spec} {algorithm:?} {input:?}");
            let signature = session
                .sign(&key, algorithm, input, EcdsaEncoding::Der)
                .unwrap();
            assert!(
                session
                    .verify(&key, algorithm, input, &signature, EcdsaEncoding::Der)
                    .unwrap(),
                "HSM rejects its own signature: {what}"
            );
            assert!(
                openssl_verifies(&token.scratch(), &public_key, algorithm, input, &signature),
                "openssl rejects the signature: {what}"
            );
            let mut tampered = signature.clone();
            let last = tampered.len() - 1;
            tampered[last] ^= 0x01;
            assert!(
                !session
                    .verify(&key, algorithm, input, &tampered, EcdsaEncoding::Der)
                    .unwrap(),
                "HSM accepts a tampered signature: {what}"
            );
            assert!(
                !openssl_verifies(&token.scratch(), &public_key, algorithm, input, &tampered),
                "openssl accepts a tampered signature: {what}"
            );
        }
    }
}

fn all_rsa_algorithms() -> Vec<SignAlgorithm> {
    [HashAlg::Sha256, HashAlg::Sha384, HashAlg::Sha512]
        .into_iter()
        .flat_map(|h| [SignAlgorithm::RsaPkcs1v15(h), SignAlgorithm::RsaPss(h)])
        .collect()
}

token_test!(
    fn ecdsa_p256_signatures_verify_in_the_hsm_and_in_openssl(token) {
        sign_and_verify_everywhere(token, KeySpec::EcP256, &[SignAlgorithm::EcdsaP256Sha256]);
    }
);

token_test!(
    fn ecdsa_p384_signatures_verify_in_the_hsm_and_in_openssl(token) {
        sign_and_verify_everywhere(token, KeySpec::EcP384, &[SignAlgorithm::EcdsaP384Sha384]);
    }
);

token_test!(
    fn ed25519_signatures_verify_in_the_hsm_and_in_openssl(token) {
        sign_and_verify_everywhere(token, KeySpec::Ed25519, &[SignAlgorithm::Ed25519]);
    }
);

token_test!(
    fn rsa_2048_pkcs1_and_pss_with_every_hash_in_digest_and_message_form(token) {
        sign_and_verify_everywhere(token, KeySpec::Rsa2048, &all_rsa_algorithms());
    }
);

token_test!(
    fn rsa_3072_signatures_verify_in_openssl(token) {
        sign_and_verify_everywhere(
            token,
            KeySpec::Rsa3072,
            &[SignAlgorithm::RsaPss(HashAlg::Sha384)],
        );
    }
);

token_test!(
    fn rsa_4096_signatures_verify_in_openssl(token) {
        sign_and_verify_everywhere(
            token,
            KeySpec::Rsa4096,
            &[SignAlgorithm::RsaPkcs1v15(HashAlg::Sha512)],
        );
    }
);

token_test!(
    fn ecdsa_raw_encoding_is_fixed_width_r_and_s_of_the_der_signature(token) {
        let hsm = token.open();
        let mut session = hsm.session().unwrap();
        let key = label("raw/v1");
        session
            .generate_key_pair(&key, KeySpec::EcP384, Exportability::NonExportable)
            .unwrap();
        let digest_bytes = digest(HashAlg::Sha384, MESSAGE);
        let input = SignInput::Digest(&digest_bytes);
        let alg = SignAlgorithm::EcdsaP384Sha384;
        for _ in 0..20 {
            let raw = session.sign(&key, alg, input, EcdsaEncoding::Raw).unwrap();
            assert_eq!(raw.len(), 96);
            assert!(session.verify(&key, alg, input, &raw, EcdsaEncoding::Raw).unwrap());
            // The same signature read as DER is malformed, not "valid".
            assert!(!session.verify(&key, alg, input, &raw, EcdsaEncoding::Der).unwrap());
        }
    }
);

token_test!(
    fn generated_keys_are_sensitive_and_never_extractable_unless_backup_exportable(token) {
        let hsm = token.open();
        let mut session = hsm.session().unwrap();
        for spec in [KeySpec::EcP256, KeySpec::Ed25519, KeySpec::Rsa2048] {
            session
                .generate_key_pair(&label(&format!("{spec}")), spec, Exportability::NonExportable)
                .unwrap();
        }
        session
            .generate_key_pair(&label("backup-me"), KeySpec::EcP256, Exportability::BackupWrapOnly)
            .unwrap();
        let output = token.pkcs11_tool().arg("--list-objects").output().unwrap();
        assert_success("pkcs11-tool --list-objects", &output);
        let listing = String::from_utf8_lossy(&output.stdout);
        let private_objects: Vec<&str> = listing
            .split("Private Key Object")
            .skip(1)
            .map(|block| block.split("Public Key Object").next().unwrap_or(block))
            .collect();
        assert_eq!(private_objects.len(), 4, "{listing}");
        for block in private_objects {
            assert!(block.contains("sensitive, always sensitive"), "{block}");
            assert!(block.contains("Usage:      sign\n"), "signing keys only sign: {block}");
            if block.contains("backup-me") {
                assert!(block.contains("extractable") && !block.contains("never extractable"));
            } else {
                assert!(block.contains("never extractable"), "{block}");
            }
        }
    }
);

/// Arms a fault on `C_Sign` so that any request reaching the HSM is visible.
fn watch_sign_calls(hsm: &Hsm) {
    hsm.faults()
        .fail_next(Function::Sign, RvError::DeviceError, 1);
}

fn sign_calls_seen(hsm: &Hsm) -> usize {
    hsm.faults()
        .fired()
        .iter()
        .filter(|(f, _)| matches!(f, Function::Sign))
        .count()
}

token_test!(
    fn malformed_sign_requests_are_refused_before_any_hsm_call(token) {
        let hsm = token.open();
        let mut session = hsm.session().unwrap();
        let ec = label("ec/v1");
        let ed = label("ed/v1");
        let rsa = label("rsa/v1");
        session.generate_key_pair(&ec, KeySpec::EcP256, Exportability::NonExportable).unwrap();
        session.generate_key_pair(&ed, KeySpec::Ed25519, Exportability::NonExportable).unwrap();
        session.generate_key_pair(&rsa, KeySpec::Rsa2048, Exportability::NonExportable).unwrap();
        watch_sign_calls(&hsm);

        let d32 = [7u8; 32];
        let d31 = [7u8; 31];
        let d48 = [7u8; 48];
        let refused: Vec<(&KeyLabel, SignAlgorithm, SignInput<'_>)> = vec![
            (&ec, SignAlgorithm::EcdsaP256Sha256, SignInput::Digest(&d31)),
            (&ec, SignAlgorithm::EcdsaP256Sha256, SignInput::Digest(&d48)),
            (&ec, SignAlgorithm::EcdsaP256Sha256, SignInput::Message(MESSAGE)),
            (&ec, SignAlgorithm::EcdsaP384Sha384, SignInput::Digest(&d48)),
            (&ec, SignAlgorithm::Ed25519, SignInput::Message(MESSAGE)),
            (&ed, SignAlgorithm::Ed25519, SignInput::Digest(&d32)),
            (&ed, SignAlgorithm::EcdsaP256Sha256, SignInput::Digest(&d32)),
            (&rsa, SignAlgorithm::RsaPss(HashAlg::Sha384), SignInput::Digest(&d32)),
            (&rsa, SignAlgorithm::EcdsaP256Sha256, SignInput::Digest(&d32)),
        ];
        for (key, algorithm, input) in refused {
            let err = session
                .sign(key, algorithm, input, EcdsaEncoding::Der)
                .expect_err("malformed request must fail");
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{key} {algorithm:?}: {err}");
        }
        assert_eq!(sign_calls_seen(&hsm), 0, "an invalid request reached C_Sign");

        // The watch is live: a valid request does reach C_Sign (and survives the
        // armed device error by reopening its session).
        session
            .sign(&ec, SignAlgorithm::EcdsaP256Sha256, SignInput::Digest(&d32), EcdsaEncoding::Der)
            .unwrap();
        assert_eq!(sign_calls_seen(&hsm), 1);
    }
);

token_test!(
    fn unknown_keys_are_not_found(token) {
        let hsm = token.open();
        let mut session = hsm.session().unwrap();
        let err = session
            .sign(
                &label("nope/v1"),
                SignAlgorithm::EcdsaP256Sha256,
                SignInput::Digest(&[0; 32]),
                EcdsaEncoding::Der,
            )
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        assert_eq!(session.public_key(&label("nope/v1")).unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(session.destroy(&label("nope/v1")).unwrap_err().kind(), ErrorKind::NotFound);
    }
);

token_test!(
    fn wrong_pin_is_an_authentication_error_that_never_shows_the_pin(token) {
        let mut config = token.config(1);
        config.pin = hsm_shim::SecretString::from("not-the-pin-9876");
        let shown = format!("{config:?}");
        assert!(!shown.contains("not-the-pin-9876"), "{shown}");
        let err = Hsm::open(config).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Authentication, "{err}");
        assert!(!err.to_string().contains("not-the-pin-9876"));
        // The right PIN still works afterwards (SoftHSM2 has no lockout; the
        // service counts failures itself).
        token.open();
    }
);

token_test!(
    fn unknown_token_is_a_configuration_error_naming_what_exists(token) {
        let mut config = token.config(1);
        config.token = hsm_shim::TokenSelector::Label("no-such-token".into());
        let err = Hsm::open(config).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Configuration);
        assert!(err.to_string().contains(token.label()), "{err}");
    }
);

token_test!(
    fn a_label_in_use_is_refused_and_the_existing_key_keeps_working(token) {
        let hsm = token.open();
        let mut session = hsm.session().unwrap();
        let key = label("ca/v1");
        let first = session.generate_key_pair(&key, KeySpec::EcP256, Exportability::NonExportable).unwrap();
        let err = session
            .generate_key_pair(&key, KeySpec::Ed25519, Exportability::NonExportable)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        let err = session
            .generate_aes_key(&key, hsm_shim::AesRole::DataEncryption, Exportability::NonExportable)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        assert_eq!(session.public_key(&key).unwrap(), first.public_key.unwrap());
        assert_eq!(session.key_spec(&key).unwrap(), KeySpec::EcP256);
    }
);

token_test!(
    fn a_pair_failing_its_consistency_test_is_destroyed_not_returned(token) {
        let hsm = token.open();
        let mut session = hsm.session().unwrap();
        let key = label("flaky/v1");
        hsm.faults().fail_next(Function::Verify, RvError::SignatureInvalid, 1);
        let err = session
            .generate_key_pair(&key, KeySpec::EcP256, Exportability::NonExportable)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::SelfTestFailed, "{err}");
        let listing = token.pkcs11_tool().arg("--list-objects").output().unwrap();
        assert!(
            !String::from_utf8_lossy(&listing.stdout).contains("flaky/v1"),
            "half-made key left on the token"
        );
        assert_eq!(session.key_spec(&key).unwrap_err().kind(), ErrorKind::NotFound);
        // The label is free again.
        session.generate_key_pair(&key, KeySpec::EcP256, Exportability::NonExportable).unwrap();
    }
);

fn sign_p256(session: &mut HsmSession, key: &KeyLabel) -> hsm_shim::Result<Vec<u8>> {
    session.sign(
        key,
        SignAlgorithm::EcdsaP256Sha256,
        SignInput::Digest(&digest(HashAlg::Sha256, MESSAGE)),
        EcdsaEncoding::Der,
    )
}

token_test!(
    fn a_key_destroyed_by_another_process_is_reported_missing(token) {
        let hsm = token.open();
        let mut session = hsm.session().unwrap();
        let key = label("victim/v1");
        session.generate_key_pair(&key, KeySpec::EcP256, Exportability::NonExportable).unwrap();
        sign_p256(&mut session, &key).unwrap(); // the handle is now cached
        let output = token
            .pkcs11_tool()
            .args(["--delete-object", "--type", "privkey", "--label", "victim/v1"])
            .output()
            .unwrap();
        assert_success("pkcs11-tool --delete-object", &output);
        let err = sign_p256(&mut session, &key).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    }
);

token_test!(
    fn a_key_replaced_by_another_process_is_found_again(token) {
        let hsm = token.open();
        let mut session = hsm.session().unwrap();
        let key = label("replaced/v1");
        let old = session.generate_key_pair(&key, KeySpec::EcP256, Exportability::NonExportable).unwrap();
        sign_p256(&mut session, &key).unwrap();
        session.public_key(&key).unwrap();
        // Another process destroys both halves and makes a new pair under the same
        // CKA_ID: our cached handles are now stale.
        for kind in ["privkey", "pubkey"] {
            let output = token
                .pkcs11_tool()
                .args(["--delete-object", "--type", kind, "--label", "replaced/v1"])
                .output()
                .unwrap();
            assert_success("pkcs11-tool --delete-object", &output);
        }
        let id: String = key.as_str().bytes().map(|b| format!("{b:02x}")).collect();
        let output = token
            .pkcs11_tool()
            .args(["--keypairgen", "--key-type", "EC:prime256v1", "--label", "replaced/v1", "--id", &id])
            .output()
            .unwrap();
        assert_success("pkcs11-tool --keypairgen", &output);

        let signature = sign_p256(&mut session, &key).unwrap();
        let new_public = session.public_key(&key).unwrap();
        assert_ne!(new_public, old.public_key.unwrap());
        let digest_bytes = digest(HashAlg::Sha256, MESSAGE);
        assert!(openssl_verifies(
            &token.scratch(),
            &new_public,
            SignAlgorithm::EcdsaP256Sha256,
            SignInput::Digest(&digest_bytes),
            &signature
        ));
    }
);

token_test!(
    fn destroy_removes_both_halves(token) {
        let hsm = token.open();
        let mut session = hsm.session().unwrap();
        let key = label("gone/v1");
        session.generate_key_pair(&key, KeySpec::Ed25519, Exportability::NonExportable).unwrap();
        assert_eq!(session.destroy(&key).unwrap(), 2);
        assert_eq!(session.public_key(&key).unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(session.destroy(&key).unwrap_err().kind(), ErrorKind::NotFound);
    }
);

token_test!(
    fn the_worker_pool_serves_many_concurrent_async_callers(token) {
        let hsm = token.open();
        let key = label("busy/v1");
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let k = key.clone();
            hsm.run(move |s| s.generate_key_pair(&k, KeySpec::EcP256, Exportability::NonExportable))
                .await
                .unwrap();
            let mut tasks = Vec::new();
            for i in 0u8..64 {
                let hsm = hsm.clone();
                let key = key.clone();
                tasks.push(tokio::spawn(async move {
                    let digest_bytes = digest(HashAlg::Sha256, &[i]);
                    hsm.run(move |s| {
                        let input = SignInput::Digest(&digest_bytes);
                        let alg = SignAlgorithm::EcdsaP256Sha256;
                        let signature = s.sign(&key, alg, input, EcdsaEncoding::Der)?;
                        s.verify(&key, alg, input, &signature, EcdsaEncoding::Der)
                    })
                    .await
                }));
            }
            for task in tasks {
                assert!(task.await.unwrap().unwrap());
            }
        });
    }
);

token_test!(
    fn a_panicking_job_does_not_take_its_worker_down(token) {
        let hsm = hsm_shim::Hsm::open(token.config(1)).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let err = hsm
                .run(|_| -> hsm_shim::Result<()> { panic!("job bug") })
                .await
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Internal);
            // The single worker is still there.
            let mut random = hsm
                .run(|s| {
                    let mut bytes = [0u8; 16];
                    s.random(&mut bytes).map(|()| bytes)
                })
                .await
                .unwrap();
            random.sort_unstable();
            assert_ne!(random[0], random[15], "16 random bytes all equal");
        });
    }
);

token_test!(
    fn keys_made_by_an_earlier_process_are_found_with_their_spec(token) {
        let specs = [
            KeySpec::EcP256,
            KeySpec::EcP384,
            KeySpec::Ed25519,
            KeySpec::Rsa2048,
            KeySpec::Aes256,
        ];
        {
            let hsm = token.open();
            let mut session = hsm.session().unwrap();
            for spec in specs {
                let key = label(&format!("{spec}/v1"));
                if spec.is_key_pair() {
                    session.generate_key_pair(&key, spec, Exportability::NonExportable).unwrap();
                } else {
                    session
                        .generate_aes_key(&key, hsm_shim::AesRole::DataEncryption, Exportability::NonExportable)
                        .unwrap();
                }
            }
        }
        // Another process (pkcs11-tool) sees them, and a new Hsm, whose handle
        // cache is cold, reads each spec back from the token's attributes.
        let listing = token.pkcs11_tool().arg("--list-objects").output().unwrap();
        assert_success("pkcs11-tool --list-objects", &listing);
        let hsm = token.open();
        let mut session = hsm.session().unwrap();
        for spec in specs {
            let key = label(&format!("{spec}/v1"));
            assert_eq!(session.key_spec(&key).unwrap(), spec);
            if let Some(algorithm) = spec.default_sign_algorithm() {
                let digest_bytes = algorithm.hash().map(|h| digest(h, MESSAGE)).unwrap_or_default();
                let input = inputs(algorithm, &digest_bytes)[0];
                let signature = session.sign(&key, algorithm, input, EcdsaEncoding::Der).unwrap();
                let public_key = session.public_key(&key).unwrap();
                assert_eq!(public_key.spec(), spec);
                assert!(openssl_verifies(&token.scratch(), &public_key, algorithm, input, &signature));
            }
        }
    }
);

token_test!(
    fn the_token_is_found_by_serial_and_the_pin_read_from_the_environment(token) {
        let serial = token.open().token().serial.clone();
        assert!(!serial.is_empty());
        let mut config = token.config(1);
        config.token = hsm_shim::TokenSelector::Serial(serial.clone());
        // The child process of this test has the PIN in its environment only if
        // we put it there: use a variable the fixture sets for every test.
        config.pin = hsm_shim::PinSource::Env("CUSTODY_TEST_USER_PIN".into())
            .load()
            .unwrap();
        let hsm = Hsm::open(config).unwrap();
        assert_eq!(hsm.token().serial, serial);
        assert_eq!(hsm.token().label, token.label());
        let err = hsm_shim::PinSource::Env("CUSTODY_NO_SUCH_PIN_VARIABLE".into())
            .load()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Configuration);
    }
);

token_test!(
    fn keys_made_while_other_sessions_search_the_token_are_all_made(token) {
        // SoftHSM2 2.6.1's file store fails an object being made while
        // another session searches (CKR_GENERAL_ERROR, SoftHSMv2 #573);
        // hsm-shim keeps the two apart. One session lists the token without
        // pause while another generates key after key.
        let hsm = token.open();
        let mut maker = hsm.session().unwrap();
        let mut searcher = hsm.session().unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        let failures = std::thread::scope(|scope| {
            let search = scope.spawn(|| {
                let mut listings = 0u32;
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    searcher.inventory().unwrap();
                    listings += 1;
                }
                listings
            });
            let mut failures = Vec::new();
            for i in 0..60 {
                let made = if i % 2 == 0 {
                    maker
                        .generate_aes_key(&label(&format!("busy/{i}/v1")), hsm_shim::AesRole::DataEncryption, Exportability::NonExportable)
                        .map(drop)
                } else {
                    maker
                        .generate_key_pair(&label(&format!("busy/{i}/v1")), KeySpec::EcP256, Exportability::NonExportable)
                        .map(drop)
                };
                if let Err(e) = made {
                    failures.push(format!("key {i}: {e}"));
                }
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            let listings = search.join().unwrap();
            assert!(listings > 0, "setup: the search never ran");
            failures
        });
        assert!(failures.is_empty(), "{} of 60 keys failed while the token was searched: {}", failures.len(), failures.join("; "));
    }
);
