//! Key wrapping (RFC 5649), secret key import with key check values, and
//! AES-256-GCM on SoftHSM2, checked against `openssl` where it can speak.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use hsm_shim::security_officer::{KekSource, create_trusted_kek};
use hsm_shim::{
    AesRole, EcdsaEncoding, ErrorKind, Exportability, GcmCiphertext, HashAlg, Hsm, KeyCheckValue,
    KeyLabel, KeySpec, SecretSlice, SignAlgorithm, SignInput, TokenSelector,
};
use sha2::Digest;
use softhsm_tests::{TestToken, openssl, openssl_verifies, token_test};

fn label(name: &str) -> KeyLabel {
    KeyLabel::new(name).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SO makes a trusted KEK, before the user session opens (PKCS#11 logs
/// in one user type per application).
fn trusted_kek(token: &TestToken, name: &str, source: KekSource<'_>) -> KeyCheckValue {
    let info = create_trusted_kek(
        &softhsm_tests::module_path(),
        &TokenSelector::Label(token.label().into()),
        &token.so_pin(),
        &label(name),
        source,
    )
    .unwrap();
    info.check_value.unwrap()
}

token_test!(
    fn backup_exportable_keys_wrap_only_under_a_trusted_kek_and_unwrap_to_working_keys(token) {
        trusted_kek(token, "backup-kek", KekSource::Generate);
        let hsm = token.open();
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
        trusted_kek(token, "backup-kek", KekSource::Generate);
        let hsm = token.open();
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
        let kek_kcv = trusted_kek(
            token,
            "known-kek",
            KekSource::Import(&SecretSlice::from(kek_value.to_vec())),
        );
        let zero_block_under = |key: &[u8]| {
            openssl(&["enc", "-aes-256-ecb", "-nopad", "-K", &hex(key)], &[0u8; 16])
        };
        assert_eq!(kek_kcv.0[..], zero_block_under(&kek_value)[..3]);

        let hsm = token.open();
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
        trusted_kek(token, "backup-kek", KekSource::Generate);
        let hsm = token.open();
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
