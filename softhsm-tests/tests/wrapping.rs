//! Key wrapping (RFC 5649), secret key import with key check values, and
//! AES-256-GCM on SoftHSM2, checked against `openssl` where it can speak.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use hsm_shim::pkcs11::{Function, RvError};
use hsm_shim::security_officer::KekSource;
use hsm_shim::{
    AesRole, EcdsaEncoding, ErrorKind, Exportability, ExposeSecret, GcmCiphertext, HashAlg, Hsm,
    KeyCheckValue, KeyInfo, KeyLabel, KeySpec, ObjectClassName, PublicKey, SecretSlice,
    SecretString, SignAlgorithm, SignInput,
};
use sha2::Digest;
use softhsm_tests::{TestToken, openssl, openssl_verifies, token_test};

fn label(name: &str) -> KeyLabel {
    KeyLabel::new(name).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SO makes a trusted KEK, through the open pool as custodyd does.
fn trusted_kek(hsm: &Hsm, token: &TestToken, name: &str, source: KekSource<'_>) -> KeyCheckValue {
    let info = hsm
        .create_trusted_kek(&token.so_pin(), &label(name), source)
        .unwrap();
    info.check_value.unwrap()
}

token_test!(
    fn backup_exportable_keys_wrap_only_under_a_trusted_kek_and_unwrap_to_working_keys(token) {
        let hsm = token.open();
        trusted_kek(&hsm, token, "backup-kek", KekSource::Generate);
        let mut session = hsm.session().unwrap();
        let untrusted = label("plain-kek");
        session
            .generate_aes_key(&untrusted, AesRole::KeyEncryption, Exportability::NonExportable)
            .unwrap();
        let key = label("root/v1");
        let info = session
            .generate_key_pair(&key, KeySpec::EcP256, Exportability::BackupWrapOnly)
            .unwrap();

        let err = session.wrap_key(&untrusted, &key).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotPermitted, "{err}");

        let wrapped = session.wrap_key(&label("backup-kek"), &key).unwrap();
        let restored = label("root/v1-restored");
        session
            .unwrap_private_key(
                &label("backup-kek"),
                &wrapped,
                &restored,
                KeySpec::EcP256,
                Exportability::NonExportable,
            )
            .unwrap();
        assert_eq!(session.key_spec(&restored).unwrap(), KeySpec::EcP256);

        let digest = sha2::Sha256::digest(b"restore drill challenge").to_vec();
        let input = SignInput::Digest(&digest);
        let signature = session
            .sign(&restored, SignAlgorithm::EcdsaP256Sha256, input, EcdsaEncoding::Der)
            .unwrap();
        assert!(openssl_verifies(
            &token.scratch(),
            info.public_key.as_ref().unwrap(),
            SignAlgorithm::EcdsaP256Sha256,
            input,
            &signature
        ));
        // Restored as non-exportable, it cannot be wrapped again.
        let err = session.wrap_key(&label("backup-kek"), &restored).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotPermitted);
    }
);

token_test!(
    fn non_exportable_keys_refuse_to_be_wrapped(token) {
        let hsm = token.open();
        trusted_kek(&hsm, token, "backup-kek", KekSource::Generate);
        let mut session = hsm.session().unwrap();
        session
            .generate_key_pair(&label("ec"), KeySpec::EcP256, Exportability::NonExportable)
            .unwrap();
        session
            .generate_key_pair(&label("rsa"), KeySpec::Rsa2048, Exportability::NonExportable)
            .unwrap();
        session
            .generate_aes_key(&label("dek"), AesRole::DataEncryption, Exportability::NonExportable)
            .unwrap();
        for name in ["ec", "rsa", "dek"] {
            let err = session.wrap_key(&label("backup-kek"), &label(name)).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::NotPermitted, "{name}: {err}");
        }
    }
);

token_test!(
    fn aes_key_wrap_and_key_check_values_match_openssl(token) {
        let kek_value = [0x07u8; 32];
        let key_value = [0x01u8; 32];
        let hsm = token.open();
        let kek_kcv = trusted_kek(
            &hsm,
            token,
            "known-kek",
            KekSource::Import(&SecretSlice::from(kek_value.to_vec())),
        );
        let zero_block_under = |key: &[u8]| {
            openssl(&["enc", "-aes-256-ecb", "-nopad", "-K", &hex(key)], &[0u8; 16])
        };
        assert_eq!(kek_kcv.0[..], zero_block_under(&kek_value)[..3]);

        let mut session = hsm.session().unwrap();
        let key = label("known-dek");
        let info = session
            .import_aes_key(
                &key,
                &SecretSlice::from(key_value.to_vec()),
                AesRole::DataEncryption,
                Exportability::BackupWrapOnly,
            )
            .unwrap();
        assert_eq!(info.check_value.unwrap().0[..], zero_block_under(&key_value)[..3]);

        let wrapped = session.wrap_key(&label("known-kek"), &key).unwrap();
        let expected = openssl(
            &["enc", "-id-aes256-wrap-pad", "-K", &hex(&kek_value), "-iv", "A65959A6"],
            &key_value,
        );
        assert_eq!(hex(&wrapped), hex(&expected), "RFC 5649 output differs from openssl");

        // A blob openssl wrapped unwraps in the HSM to the same key: what one
        // encrypts, the other decrypts. (SoftHSM2 gives unwrapped keys no KCV.)
        let unwrapped = session
            .unwrap_aes_key(
                &label("known-kek"),
                &expected,
                &label("known-dek-2"),
                AesRole::DataEncryption,
                Exportability::NonExportable,
            )
            .unwrap();
        if let Some(kcv) = unwrapped.check_value {
            assert_eq!(Some(kcv), info.check_value);
        }
        let sealed = session.encrypt_gcm(&label("known-dek-2"), b"aad", b"same key").unwrap();
        assert_eq!(&session.decrypt_gcm(&key, b"aad", &sealed).unwrap()[..], b"same key");
    }
);

token_test!(
    fn a_tampered_wrapped_key_is_refused_and_leaves_no_object(token) {
        let hsm = token.open();
        trusted_kek(&hsm, token, "backup-kek", KekSource::Generate);
        let mut session = hsm.session().unwrap();
        let kek = label("backup-kek");
        session
            .generate_key_pair(&label("k"), KeySpec::EcP384, Exportability::BackupWrapOnly)
            .unwrap();
        let wrapped = session.wrap_key(&kek, &label("k")).unwrap();
        let target = label("k-restored");
        for position in 0..wrapped.len() {
            let mut tampered = wrapped.clone();
            tampered[position] ^= 0x80;
            let err = session
                .unwrap_private_key(&kek, &tampered, &target, KeySpec::EcP384, Exportability::NonExportable)
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::IntegrityFailure, "byte {position}: {err}");
        }
        for cut in [1, 8, wrapped.len() - 1] {
            let err = session
                .unwrap_private_key(&kek, &wrapped[..cut], &target, KeySpec::EcP384, Exportability::NonExportable)
                .unwrap_err();
            assert!(
                matches!(err.kind(), ErrorKind::IntegrityFailure | ErrorKind::InvalidInput),
                "truncated to {cut}: {err}"
            );
        }
        assert_eq!(session.key_spec(&target).unwrap_err().kind(), ErrorKind::NotFound);
        // The genuine blob still unwraps under the same label.
        session
            .unwrap_private_key(&kek, &wrapped, &target, KeySpec::EcP384, Exportability::NonExportable)
            .unwrap();
    }
);

token_test!(
    fn import_refuses_wrong_lengths_and_labels_in_use(token) {
        let hsm = token.open();
        let mut session = hsm.session().unwrap();
        for len in [0, 16, 31, 33] {
            let err = session
                .import_aes_key(
                    &label("short"),
                    &SecretSlice::from(vec![1u8; len]),
                    AesRole::KeyEncryption,
                    Exportability::NonExportable,
                )
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{len} bytes");
        }
        let value = SecretSlice::from(vec![9u8; 32]);
        session
            .import_aes_key(&label("kek"), &value, AesRole::KeyEncryption, Exportability::NonExportable)
            .unwrap();
        let err = session
            .import_aes_key(&label("kek"), &value, AesRole::KeyEncryption, Exportability::NonExportable)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    }
);

fn gcm_fixture(token: &TestToken) -> (Hsm, KeyLabel) {
    let hsm = token.open();
    let key = label("dek/v1");
    hsm.session()
        .unwrap()
        .generate_aes_key(&key, AesRole::DataEncryption, Exportability::NonExportable)
        .unwrap();
    (hsm, key)
}

token_test!(
    fn gcm_round_trips_and_every_tampering_is_detected(token) {
        let (hsm, key) = gcm_fixture(token);
        let mut session = hsm.session().unwrap();
        let plaintext: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
        let aad = b"keys/payments/versions/1";
        let sealed = session.encrypt_gcm(&key, aad, &plaintext).unwrap();
        assert_eq!(sealed.ciphertext_and_tag.len(), plaintext.len() + 16);
        assert_eq!(&session.decrypt_gcm(&key, aad, &sealed).unwrap()[..], &plaintext[..]);

        let again = session.encrypt_gcm(&key, aad, &plaintext).unwrap();
        assert_ne!(again.iv, sealed.iv, "IV reused");
        assert_ne!(again.ciphertext_and_tag, sealed.ciphertext_and_tag);

        let mut tampered: Vec<(String, GcmCiphertext, Vec<u8>)> = Vec::new();
        for position in [0, 511, 1023, 1024, 1039] {
            let mut bad = sealed.clone();
            bad.ciphertext_and_tag[position] ^= 0x01;
            tampered.push((format!("byte {position}"), bad, aad.to_vec()));
        }
        let mut bad_iv = sealed.clone();
        bad_iv.iv[0] ^= 0x01;
        tampered.push(("iv".into(), bad_iv, aad.to_vec()));
        tampered.push(("aad".into(), sealed.clone(), b"keys/payments/versions/2".to_vec()));
        let mut truncated = sealed.clone();
        truncated.ciphertext_and_tag.truncate(1030);
        tampered.push(("truncated".into(), truncated, aad.to_vec()));
        let mut tag_only = sealed.clone();
        tag_only.ciphertext_and_tag.truncate(3);
        tampered.push(("shorter than a tag".into(), tag_only, aad.to_vec()));
        for (what, ciphertext, aad) in tampered {
            let err = session.decrypt_gcm(&key, &aad, &ciphertext).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::IntegrityFailure, "{what}: {err}");
        }
    }
);

token_test!(
    fn each_aes_role_does_its_own_job_only(token) {
        let (hsm, dek) = gcm_fixture(token);
        let mut session = hsm.session().unwrap();
        let kek = label("kek/v1");
        session
            .generate_aes_key(&kek, AesRole::KeyEncryption, Exportability::NonExportable)
            .unwrap();
        session
            .generate_aes_key(&label("other"), AesRole::DataEncryption, Exportability::BackupWrapOnly)
            .unwrap();
        // A KEK does not encrypt data; a data key does not wrap keys.
        let err = session.encrypt_gcm(&kek, b"", b"data").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotPermitted, "{err}");
        let err = session.wrap_key(&dek, &label("other")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotPermitted, "{err}");
        // AES keys cannot sign.
        let err = session
            .sign(&dek, SignAlgorithm::RsaPss(HashAlg::Sha256), SignInput::Digest(&[0; 32]), EcdsaEncoding::Der)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    }
);

// ---- The trusted KEK made while the pool serves, and session KEKs for restores.

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `op` on a pool worker, from outside any runtime.
fn in_pool<T: Send + 'static>(
    hsm: &Hsm,
    op: impl FnOnce(&mut hsm_shim::HsmSession) -> hsm_shim::Result<T> + Send + 'static,
) -> hsm_shim::Result<T> {
    runtime().block_on(hsm.run(op))
}

const CHALLENGE: [u8; 32] = [0x42; 32];

/// Signs [`CHALLENGE`] with `key` (EC P-256) through the pool, as the service does.
async fn pool_sign(hsm: &Hsm, key: &KeyLabel) -> hsm_shim::Result<Vec<u8>> {
    let key = key.clone();
    hsm.run(move |s| {
        s.sign(
            &key,
            SignAlgorithm::EcdsaP256Sha256,
            SignInput::Digest(&CHALLENGE),
            EcdsaEncoding::Der,
        )
    })
    .await
}

fn verifies(token: &TestToken, public_key: &PublicKey, signature: &[u8]) -> bool {
    openssl_verifies(
        &token.scratch(),
        public_key,
        SignAlgorithm::EcdsaP256Sha256,
        SignInput::Digest(&CHALLENGE),
        signature,
    )
}

fn signing_key(hsm: &Hsm, name: &str) -> (KeyLabel, PublicKey) {
    let key = label(name);
    let made = key.clone();
    let info = in_pool(hsm, move |s| {
        s.generate_key_pair(&made, KeySpec::EcP256, Exportability::NonExportable)
    })
    .unwrap();
    (key, info.public_key.unwrap())
}

token_test!(
    fn the_pool_pauses_for_the_security_officer_and_signs_throughout(token) {
        let hsm = Hsm::open(token.config(2)).unwrap();
        let (signer, public_key) = signing_key(&hsm, "signer/v1");
        let (backup, untrusted) = (label("root/v1"), label("plain-kek"));
        let (b, u) = (backup.clone(), untrusted.clone());
        in_pool(&hsm, move |s| {
            s.generate_key_pair(&b, KeySpec::EcP256, Exportability::BackupWrapOnly)?;
            s.generate_aes_key(&u, AesRole::KeyEncryption, Exportability::NonExportable)
        })
        .unwrap();

        let runtime = runtime();
        let stop = Arc::new(AtomicBool::new(false));
        let kek_made = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(AtomicUsize::new(0));
        let (kek, results, probes) = runtime.block_on(async {
            let mut signers = Vec::new();
            for _ in 0..4 {
                let (hsm, signer) = (hsm.clone(), signer.clone());
                let (stop, kek_made, attempts) = (stop.clone(), kek_made.clone(), attempts.clone());
                signers.push(tokio::spawn(async move {
                    // (started after the KEK was made, signature)
                    let mut results = Vec::new();
                    // Whether a job saw the user logged in. The inventory
                    // lists what the session can see and recovers from
                    // nothing: a job run while the user is logged out (or
                    // the SO logged in) sees no private key, where a signing
                    // job would log in again and hide it.
                    let mut probes = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let after = kek_made.load(Ordering::SeqCst);
                        results.push((after, pool_sign(&hsm, &signer).await));
                        let wanted = signer.as_str().to_string();
                        let probe = hsm.run(move |s| {
                            let objects = s.inventory()?;
                            Ok(objects
                                .iter()
                                .any(|o| o.class == ObjectClassName::Private && o.label == wanted))
                        });
                        probes.push(probe.await);
                        attempts.fetch_add(1, Ordering::SeqCst);
                    }
                    (results, probes)
                }));
            }
            // Signing is under way before the security officer steps in ...
            while attempts.load(Ordering::SeqCst) < 20 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            let (pool, so_pin) = (hsm.clone(), token.so_pin());
            let kek = tokio::task::spawn_blocking(move || {
                pool.create_trusted_kek(&so_pin, &label("backup-kek"), KekSource::Generate)
            })
            .await
            .unwrap()
            .unwrap();
            kek_made.store(true, Ordering::SeqCst);
            // ... and goes on after it.
            let at_kek = attempts.load(Ordering::SeqCst);
            while attempts.load(Ordering::SeqCst) < at_kek + 20 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            stop.store(true, Ordering::SeqCst);
            let (mut results, mut probes) = (Vec::new(), Vec::new());
            for signer in signers {
                let (signed, probed) = signer.await.unwrap();
                results.extend(signed);
                probes.extend(probed);
            }
            (kek, results, probes)
        });
        assert!(kek.check_value.is_some());
        // No job ran while the user was logged out: the pool was paused.
        for probe in probes {
            assert!(probe.unwrap(), "a job ran without the user logged in");
        }
        // Every signature before, during and after the pause was made ...
        for (_, result) in &results {
            if let Err(e) = result {
                panic!("a signature failed: {e}");
            }
        }
        // ... and those started after it verify against the public key.
        let after: Vec<&Vec<u8>> = results
            .iter()
            .filter(|(after, _)| *after)
            .map(|(_, result)| result.as_ref().unwrap())
            .collect();
        assert!(!after.is_empty());
        for signature in after {
            assert!(verifies(token, &public_key, signature));
        }

        // After the pause, the backup-exportable key wraps under the new
        // trusted KEK and still not under an ordinary one.
        let (b, u) = (backup.clone(), untrusted.clone());
        let (wrapped, refused) = in_pool(&hsm, move |s| {
            Ok((s.wrap_key(&label("backup-kek"), &b), s.wrap_key(&u, &b)))
        })
        .unwrap();
        assert!(!wrapped.unwrap().is_empty());
        let err = refused.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotPermitted, "{err}");
    }
);

token_test!(
    fn a_wrong_so_pin_is_refused_and_the_pool_still_signs(token) {
        let hsm = Hsm::open(token.config(2)).unwrap();
        let (signer, public_key) = signing_key(&hsm, "signer/v1");
        let kek = label("backup-kek");
        let err = hsm
            .create_trusted_kek(&SecretString::from("not-the-so-pin"), &kek, KekSource::Generate)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Authentication, "{err}");

        let signature = runtime().block_on(pool_sign(&hsm, &signer)).unwrap();
        assert!(verifies(token, &public_key, &signature));
        let k = kek.clone();
        let err = in_pool(&hsm, move |s| s.key_spec(&k)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "no KEK was made: {err}");
        // Nothing is left half-done: the right PIN works next.
        hsm.create_trusted_kek(&token.so_pin(), &kek, KekSource::Generate).unwrap();
        let signature = runtime().block_on(pool_sign(&hsm, &signer)).unwrap();
        assert!(verifies(token, &public_key, &signature));
    }
);

token_test!(
    fn when_the_user_cannot_log_in_again_the_error_is_returned_and_workers_log_in_later(token) {
        let hsm = Hsm::open(token.config(2)).unwrap();
        let (signer, public_key) = signing_key(&hsm, "signer/v1");
        // The pause logs in three times: its new session (finding the user
        // logged in, as the real call would), the SO, the user again. The
        // last two fail.
        let faults = hsm.faults();
        faults.fail_next(Function::Login, RvError::UserAlreadyLoggedIn, 1);
        faults.fail_next(Function::Login, RvError::DeviceError, 2);
        let err = hsm
            .create_trusted_kek(&token.so_pin(), &label("backup-kek"), KekSource::Generate)
            .unwrap_err();
        // The SO step's error is the one returned.
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert!(err.to_string().contains("logging in as the security officer"), "{err}");
        assert_eq!(faults.fired().len(), 3);

        // The application is logged out now; a worker logs in on its next job.
        let signature = runtime().block_on(pool_sign(&hsm, &signer)).unwrap();
        assert!(verifies(token, &public_key, &signature));
    }
);

token_test!(
    fn a_trusted_kek_cannot_be_made_from_inside_a_pool_job_or_over_a_used_label(token) {
        let hsm = Hsm::open(token.config(2)).unwrap();
        let (signer, _) = signing_key(&hsm, "signer/v1");
        let (pool, so_pin) = (hsm.clone(), token.so_pin());
        let err = in_pool(&hsm, move |_| {
            pool.create_trusted_kek(&so_pin, &label("backup-kek"), KekSource::Generate)
        })
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Internal, "{err}");

        // The signing key is private, which the SO cannot see; the label is
        // still found taken.
        let err = hsm
            .create_trusted_kek(&token.so_pin(), &signer, KekSource::Generate)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
        let err = hsm
            .create_trusted_kek(
                &token.so_pin(),
                &label("backup-kek"),
                KekSource::Import(&SecretSlice::from(vec![1u8; 31])),
            )
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    }
);

fn backup_kek_value() -> SecretSlice<u8> {
    SecretSlice::from(
        (0u8..32)
            .map(|i| i.wrapping_mul(37).wrapping_add(11))
            .collect::<Vec<_>>(),
    )
}

token_test!(
    fn a_session_kek_from_the_backup_kek_value_restores_a_key_and_dies_with_its_session(token) {
        let hsm = token.open();
        let value = backup_kek_value();
        let token_kek: KeyInfo = hsm
            .create_trusted_kek(&token.so_pin(), &label("backup-kek"), KekSource::Import(&value))
            .unwrap();
        let original = label("root/v1");
        let mut session = hsm.session().unwrap();
        let info = session
            .generate_key_pair(&original, KeySpec::EcP256, Exportability::BackupWrapOnly)
            .unwrap();
        let wrapped = session.wrap_key(&label("backup-kek"), &original).unwrap();
        drop(session);

        let mut restore = hsm.session().unwrap();
        let kek = label("restore-kek");
        let session_kek = restore.import_session_unwrap_kek(&kek, &value).unwrap();
        assert_eq!(session_kek.check_value, token_kek.check_value);
        assert!(session_kek.check_value.is_some());
        // It unwraps and nothing else.
        let err = restore.encrypt_gcm(&kek, b"", b"data").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotPermitted, "{err}");

        let restored = label("root/v1-restored");
        restore
            .unwrap_private_key(&kek, &wrapped, &restored, KeySpec::EcP256, Exportability::NonExportable)
            .unwrap();
        let signature = restore
            .sign(&restored, SignAlgorithm::EcdsaP256Sha256, SignInput::Digest(&CHALLENGE), EcdsaEncoding::Der)
            .unwrap();
        assert!(verifies(token, info.public_key.as_ref().unwrap(), &signature));
        drop(restore);

        // The session KEK went with its session; the restored key did not.
        let mut later = hsm.session().unwrap();
        let err = later
            .unwrap_private_key(&kek, &wrapped, &label("root/v1-again"), KeySpec::EcP256, Exportability::NonExportable)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        assert!(!later.inventory().unwrap().iter().any(|o| o.label == kek.as_str()));
        assert_eq!(later.destroy(&kek).unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(later.key_spec(&restored).unwrap(), KeySpec::EcP256);
    }
);

token_test!(
    fn a_session_kek_unwraps_what_openssl_wrapped_and_can_be_destroyed(token) {
        let hsm = token.open();
        let mut session = hsm.session().unwrap();
        let value = backup_kek_value();
        let key_value = [0x33u8; 32];
        let wrapped = openssl(
            &["enc", "-id-aes256-wrap-pad", "-K", &hex(value.expose_secret()), "-iv", "A65959A6"],
            &key_value,
        );
        let kek = label("restore-kek");
        for len in [0, 16, 31, 33] {
            let err = session
                .import_session_unwrap_kek(&kek, &SecretSlice::from(vec![1u8; len]))
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{len} bytes");
        }
        session.import_session_unwrap_kek(&kek, &value).unwrap();
        let err = session.import_session_unwrap_kek(&kek, &value).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");

        let dek = label("dek/v1");
        session
            .unwrap_aes_key(&kek, &wrapped, &dek, AesRole::DataEncryption, Exportability::NonExportable)
            .unwrap();
        // The unwrapped key is the one openssl wrapped: it decrypts what the
        // same value, imported directly, encrypts.
        let twin = label("dek/twin");
        session
            .import_aes_key(&twin, &SecretSlice::from(key_value.to_vec()), AesRole::DataEncryption, Exportability::NonExportable)
            .unwrap();
        let sealed = session.encrypt_gcm(&twin, b"aad", b"same key").unwrap();
        assert_eq!(&session.decrypt_gcm(&dek, b"aad", &sealed).unwrap()[..], b"same key");

        assert_eq!(session.destroy(&kek).unwrap(), 1);
        let err = session
            .unwrap_aes_key(&kek, &wrapped, &label("dek/v2"), AesRole::DataEncryption, Exportability::NonExportable)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    }
);

token_test!(
    fn making_a_trusted_kek_logs_out_and_so_destroys_session_keks(token) {
        let hsm = token.open();
        let value = backup_kek_value();
        let mut restore = hsm.session().unwrap();
        let kek = label("restore-kek");
        restore.import_session_unwrap_kek(&kek, &value).unwrap();
        hsm.create_trusted_kek(&token.so_pin(), &label("backup-kek"), KekSource::Generate)
            .unwrap();
        // PKCS#11 C_Logout destroys the application's private session objects.
        let wrapped = openssl(
            &["enc", "-id-aes256-wrap-pad", "-K", &hex(value.expose_secret()), "-iv", "A65959A6"],
            &[0x33u8; 32],
        );
        let err = restore
            .unwrap_aes_key(&kek, &wrapped, &label("dek/v1"), AesRole::DataEncryption, Exportability::NonExportable)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        // Imported again, it works.
        restore.import_session_unwrap_kek(&kek, &value).unwrap();
        restore
            .unwrap_aes_key(&kek, &wrapped, &label("dek/v1"), AesRole::DataEncryption, Exportability::NonExportable)
            .unwrap();
    }
);

token_test!(
    fn objects_with_neither_label_nor_id_are_swept_and_named_ones_kept(token) {
        // What a kill inside C_GenerateKey leaves on SoftHSM2: an object
        // with default attributes. pkcs11-tool makes one the same shape.
        let output = token
            .pkcs11_tool()
            .args(["--keygen", "--key-type", "AES:32"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let hsm = token.open();
        let mut session = hsm.session().unwrap();
        session
            .generate_aes_key(&label("named/v1"), AesRole::DataEncryption, Exportability::NonExportable)
            .unwrap();
        let before = session.inventory().unwrap();
        assert_eq!(before.iter().filter(|o| o.label.is_empty()).count(), 1);
        assert_eq!(session.destroy_unnamed().unwrap(), 1);
        let after = session.inventory().unwrap();
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].label, "named/v1");
        assert_eq!(session.destroy_unnamed().unwrap(), 0);
    }
);
