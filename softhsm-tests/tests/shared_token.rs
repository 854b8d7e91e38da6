//! One token, several processes: custodyd replicas share one HSM partition,
//! so one process must cope with objects another makes or destroys (threat
//! model H1, H2). The other process is real: `pkcs11-tool`, or this test
//! binary run again as a second hsm-shim process on the same token (the
//! same `SOFTHSM2_CONF`, see [`second_process`]).

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::{CheckDriftRequest, DriftKind};
use hsm_shim::pkcs11::Function;
use hsm_shim::security_officer::KekSource;
use hsm_shim::{
    AesRole, EcdsaEncoding, ErrorKind, Exportability, Hsm, HsmConfig, KeyLabel, KeySpec,
    ObjectClassName, PublicKey, SecretString, SignAlgorithm, SignInput, Stall, TokenSelector,
};
use sha2::Digest;
use softhsm_tests::service::{TestService, create_key, reason, runtime, sign_sha256};
use softhsm_tests::{
    TestToken, assert_success, openssl_verifies, openssl_verifies_pem, token_test,
};

const MESSAGE: &[u8] = b"to be signed by whichever key the label names now";

fn label(name: &str) -> KeyLabel {
    KeyLabel::new(name).unwrap()
}

fn digest() -> Vec<u8> {
    sha2::Sha256::digest(MESSAGE).to_vec()
}

/// Waits (bounded) until `calls` calls have stalled, or `task` is done;
/// true if they stalled.
async fn stalled_or_done<T>(hsm: &Hsm, calls: usize, task: &tokio::task::JoinHandle<T>) -> bool {
    for _ in 0..3000 {
        if hsm.faults().stalled().len() >= calls {
            return true;
        }
        if task.is_finished() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("no stall and no answer within 15 s");
}

/// `pkcs11-tool` on the test's token, as another process: must succeed.
fn tool(token: &TestToken, args: &[&str]) -> String {
    let output = token.pkcs11_tool().args(args).output().unwrap();
    assert_success(&format!("pkcs11-tool {args:?}"), &output);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `CKA_ID` as `pkcs11-tool --id` takes it: custody sets it to the label.
fn id_of(name: &str) -> String {
    hex::encode(name)
}

/// Another process makes an EC P-256 key pair labelled `name` (`CKA_ID` the
/// label, as custody makes them) and returns its public key as
/// SubjectPublicKeyInfo DER, read by that process.
fn other_makes_key_pair(token: &TestToken, name: &str) -> Vec<u8> {
    tool(
        token,
        &[
            "--keypairgen",
            "--key-type",
            "EC:prime256v1",
            "--label",
            name,
            "--id",
            &id_of(name),
        ],
    );
    let out = token
        .scratch()
        .join(format!("{}.spki", name.replace('/', "_")));
    tool(
        token,
        &[
            "--read-object",
            "--type",
            "pubkey",
            "--label",
            name,
            "--output-file",
            out.to_str().unwrap(),
        ],
    );
    std::fs::read(out).unwrap()
}

fn other_destroys(token: &TestToken, class: &str, name: &str) {
    tool(
        token,
        &["--delete-object", "--type", class, "--label", name],
    );
}

fn sign(session: &mut hsm_shim::HsmSession, key: &KeyLabel) -> hsm_shim::Result<Vec<u8>> {
    session.sign(
        key,
        SignAlgorithm::EcdsaP256Sha256,
        SignInput::Digest(&digest()),
        EcdsaEncoding::Der,
    )
}

fn verifies(token: &TestToken, public_key: &PublicKey, signature: &[u8]) -> bool {
    openssl_verifies(
        &token.scratch(),
        public_key,
        SignAlgorithm::EcdsaP256Sha256,
        SignInput::Digest(&digest()),
        signature,
    )
}

/// Whether `signature` verifies under a public key given as SPKI DER.
fn verifies_der(token: &TestToken, spki_der: &[u8], signature: &[u8]) -> bool {
    let pem = String::from_utf8(softhsm_tests::openssl(
        &["pkey", "-pubin", "-inform", "DER"],
        spki_der,
    ))
    .unwrap();
    openssl_verifies_pem(
        &token.scratch(),
        &pem,
        SignAlgorithm::EcdsaP256Sha256,
        SignInput::Digest(&digest()),
        signature,
    )
}

/// Runs `op` on a pool worker, from outside any runtime.
fn in_pool<T: Send + 'static>(
    hsm: &Hsm,
    op: impl FnOnce(&mut hsm_shim::HsmSession) -> hsm_shim::Result<T> + Send + 'static,
) -> hsm_shim::Result<T> {
    runtime().block_on(hsm.run(op))
}

token_test!(
    fn a_key_destroyed_by_another_process_is_not_found_never_an_integrity_failure(token) {
        let hsm = token.open();
        let mut session = hsm.session().unwrap();
        let signer = label("key/signer/v1");
        let signer_info = session.generate_key_pair(&signer, KeySpec::EcP256, Exportability::NonExportable).unwrap();
        let root = label("key/root/v1");
        session.generate_key_pair(&root, KeySpec::EcP256, Exportability::BackupWrapOnly).unwrap();
        // Two backup KEKs (trusted, made by the SO), each used once so that
        // its handle is cached.
        for kek in ["custody-backup-kek/a", "custody-backup-kek/b"] {
            hsm.create_trusted_kek(&token.so_pin(), &label(kek), KekSource::Generate).unwrap();
        }
        let kek_a = label("custody-backup-kek/a");
        let kek_b = label("custody-backup-kek/b");
        let wrapped = session.wrap_key(&kek_a, &root).unwrap();
        session.wrap_key(&kek_b, &root).unwrap();
        sign(&mut session, &signer).unwrap();

        // Another process destroys both KEKs and the signer's private key.
        other_destroys(token, "secrkey", kek_a.as_str());
        other_destroys(token, "secrkey", kek_b.as_str());
        other_destroys(token, "privkey", signer.as_str());

        // C_UnwrapKey answers CKR_UNWRAPPING_KEY_HANDLE_INVALID on the cached
        // handle: the KEK is gone, the wrapped key is fine.
        let restored = label("restore/r1/root/v1");
        let err = session
            .unwrap_private_key(&kek_a, &wrapped, &restored, KeySpec::EcP256, Exportability::NonExportable)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        // C_WrapKey answers CKR_WRAPPING_KEY_HANDLE_INVALID.
        let err = session.wrap_key(&kek_b, &root).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        let err = sign(&mut session, &signer).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        // Through the pool too, and again (nothing cached points at them).
        let (kek, again) = (kek_a.clone(), restored.clone());
        let err = in_pool(&hsm, move |s| s.unwrap_private_key(&kek, &wrapped, &again, KeySpec::EcP256, Exportability::NonExportable))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        let listing = tool(token, &["--list-objects"]);
        assert!(!listing.contains("restore/r1"), "nothing half-made:\n{listing}");

        // Everything else keeps working: the other key signs, the signer's
        // public half (still there) verifies, new keys are made.
        let root_public = session.public_key(&root).unwrap();
        let signature = sign(&mut session, &root).unwrap();
        assert!(verifies(token, &root_public, &signature));
        let signature = in_pool(&hsm, {
            let root = root.clone();
            move |s| sign(s, &root)
        })
        .unwrap();
        assert!(verifies(token, &root_public, &signature));
        assert_eq!(session.public_key(&signer).unwrap(), signer_info.public_key.unwrap());
        let fresh = label("key/fresh/v1");
        session.generate_key_pair(&fresh, KeySpec::EcP256, Exportability::NonExportable).unwrap();
        sign(&mut session, &fresh).unwrap();
    }
);

token_test!(
    fn a_key_made_by_another_process_is_found(token) {
        let hsm = token.open();
        let mut session = hsm.session().unwrap();
        let key = label("key/theirs/v1");
        // Looked for before it exists: not found, and nothing remembers that.
        assert_eq!(sign(&mut session, &key).unwrap_err().kind(), ErrorKind::NotFound);
        let err = in_pool(&hsm, { let key = key.clone(); move |s| s.public_key(&key) }).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);

        let theirs = other_makes_key_pair(token, key.as_str());
        assert_eq!(session.public_key(&key).unwrap().spki_der(), &theirs[..]);
        assert_eq!(session.key_spec(&key).unwrap(), KeySpec::EcP256);
        let signature = sign(&mut session, &key).unwrap();
        assert!(verifies_der(token, &theirs, &signature));
        let signature = in_pool(&hsm, { let key = key.clone(); move |s| sign(s, &key) }).unwrap();
        assert!(verifies_der(token, &theirs, &signature));
        // An AES key another process made is found too.
        let aes = "key/their-aes/v1";
        tool(token, &["--keygen", "--key-type", "AES:32", "--label", aes, "--id", &id_of(aes)]);
        assert_eq!(session.key_spec(&label(aes)).unwrap(), KeySpec::Aes256);
    }
);

token_test!(
    fn a_label_recreated_by_another_process_is_used_with_its_new_key_never_the_old(token) {
        let hsm = token.open();
        let mut session = hsm.session().unwrap();
        let key = label("key/reborn/v1");
        let old = session.generate_key_pair(&key, KeySpec::EcP256, Exportability::NonExportable).unwrap();
        let old_public = old.public_key.unwrap();
        // Every path caches its handles: this session's, and the pool's.
        sign(&mut session, &key).unwrap();
        assert_eq!(session.public_key(&key).unwrap(), old_public);
        in_pool(&hsm, { let key = key.clone(); move |s| sign(s, &key) }).unwrap();

        for round in 0..3 {
            // Another process destroys both halves and makes a new pair under
            // the same label and CKA_ID.
            other_destroys(token, "privkey", key.as_str());
            other_destroys(token, "pubkey", key.as_str());
            let new_public = other_makes_key_pair(token, key.as_str());
            assert_ne!(&new_public[..], old_public.spki_der());

            let signature = if round % 2 == 0 {
                sign(&mut session, &key).unwrap()
            } else {
                in_pool(&hsm, { let key = key.clone(); move |s| sign(s, &key) }).unwrap()
            };
            assert!(verifies_der(token, &new_public, &signature), "round {round}: signed with the new key");
            assert!(!verifies(token, &old_public, &signature), "round {round}: never with the old one");
            assert_eq!(session.public_key(&key).unwrap().spki_der(), &new_public[..], "round {round}");
            let pooled = in_pool(&hsm, { let key = key.clone(); move |s| s.public_key(&key) }).unwrap();
            assert_eq!(pooled.spki_der(), &new_public[..], "round {round}");
            let valid = session
                .verify(&key, SignAlgorithm::EcdsaP256Sha256, SignInput::Digest(&digest()), &signature, EcdsaEncoding::Der)
                .unwrap();
            assert!(valid, "round {round}: the HSM verifies with the new public key");
        }
    }
);

/// Waits (bounded) until `ready` holds or `done` does; true if `ready` did.
fn until(ready: impl Fn() -> bool, done: impl Fn() -> bool) -> bool {
    for _ in 0..3000 {
        if ready() {
            return true;
        }
        if done() {
            return ready();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("neither happened within 15 s");
}

token_test!(
    fn a_listing_skips_objects_another_process_destroys_while_it_reads_them(token) {
        let hsm = token.open();
        let mut session = hsm.session().unwrap();
        let mine = label("key/mine/v1");
        session.generate_key_pair(&mine, KeySpec::EcP256, Exportability::NonExportable).unwrap();
        let churn = |n: usize| format!("churn/{n}");
        tool(token, &["--keygen", "--key-type", "AES:32", "--label", &churn(0), "--id", &id_of(&churn(0))]);

        // Every attribute read of the listing waits until the test lets it
        // go; meanwhile another process destroys the object it listed last
        // and makes another: a token that keeps changing under a listing.
        hsm.faults().stall_next(Function::GetAttributeValue, Stall::UntilReleased, u32::MAX);
        let lister = hsm.clone();
        let listing = std::thread::spawn(move || lister.session().unwrap().inventory());
        let mut rounds = 0;
        while rounds < 200 && until(|| hsm.faults().stalled().len() > rounds, || listing.is_finished()) {
            rounds += 1;
            other_destroys(token, "secrkey", &churn(rounds - 1));
            tool(token, &["--keygen", "--key-type", "AES:32", "--label", &churn(rounds), "--id", &id_of(&churn(rounds))]);
            hsm.faults().release();
        }
        hsm.faults().clear();
        let objects = listing.join().unwrap().expect("the listing completes");
        let listed: BTreeSet<(String, ObjectClassName)> = objects.iter().map(|o| (o.label.clone(), o.class)).collect();
        assert_eq!(
            listed,
            BTreeSet::from([
                (mine.as_str().to_string(), ObjectClassName::Private),
                (mine.as_str().to_string(), ObjectClassName::Public),
            ]),
            "the objects that were there throughout, and nothing destroyed while read ({rounds} rounds)"
        );
        let public = objects.iter().find(|o| o.class == ObjectClassName::Public).unwrap();
        assert_eq!(public.public_key_der.as_deref(), Some(session.public_key(&mine).unwrap().spki_der()));
    }
);

token_test!(
    fn drift_reports_nothing_for_objects_another_process_changed_between_readings(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            create_key(&operator, "steady", "EC_SIGN_P256_SHA256", None).await;
            create_key(&operator, "victim", "EC_SIGN_P256_SHA256", None).await;
            let mut keys = KeyServiceClient::new(operator.clone());
            let clean = keys.check_drift(CheckDriftRequest {}).await.unwrap().into_inner();
            assert!(clean.findings.is_empty(), "{:?}", clean.findings);

            // Another process (a replica) has made objects that are gone
            // again before the listing is read a second time: a generation it
            // rolled back. They are no drift.
            let passing = "key/passing/v1";
            tool(token, &["--keypairgen", "--key-type", "EC:prime256v1", "--label", passing, "--id", &id_of(passing)]);
            let hsm = service.state().hsm.clone();
            hsm.faults().stall_next(Function::FindObjectsInit, Stall::UntilReleased, 2);
            let check = tokio::spawn(async move { keys.check_drift(CheckDriftRequest {}).await });
            assert!(stalled_or_done(&hsm, 1, &check).await, "the listing starts");
            hsm.faults().release();
            // A check that does not read the token a second time ends here,
            // having reported what it saw once.
            let re_listed = stalled_or_done(&hsm, 2, &check).await;
            if re_listed {
                other_destroys(token, "privkey", passing);
                other_destroys(token, "pubkey", passing);
            }
            hsm.faults().clear();
            let report = check.await.unwrap().unwrap().into_inner();
            assert!(report.findings.is_empty(), "objects gone by the second reading are no drift: {:#?}", report.findings);
            assert!(re_listed);

            // Real drift beside another process's changes is still reported:
            // an object another process made and left, and a key it removed.
            tool(token, &["--keygen", "--key-type", "AES:32", "--label", "rogue", "--id", &id_of("rogue")]);
            other_destroys(token, "privkey", "key/victim/v1");
            let mut keys = KeyServiceClient::new(operator.clone());
            let report = keys.check_drift(CheckDriftRequest {}).await.unwrap().into_inner();
            let found: BTreeSet<(i32, String, String)> =
                report.findings.iter().map(|f| (f.kind, f.label.clone(), f.object_class.clone())).collect();
            assert_eq!(
                found,
                BTreeSet::from([
                    (DriftKind::Missing as i32, "key/victim/v1".to_string(), "private".to_string()),
                    (DriftKind::Extra as i32, "rogue".into(), "secret".into()),
                ]),
                "{:#?}",
                report.findings
            );
            // The untouched key signs on.
            let signer = service.client("ca-issuing").await;
            sign_sha256(&signer, "steady", MESSAGE).await.unwrap();
            let missing = sign_sha256(&signer, "victim", MESSAGE).await.unwrap_err();
            assert_eq!(reason(&missing), "HSM_KEY_MISSING");
        });
    }
);

token_test!(
    fn keys_destroyed_by_another_process_answer_hsm_key_missing_through_grpc(token) {
        use custody_proto::v1::envelope_service_client::EnvelopeServiceClient;
        use custody_proto::v1::{DecryptRequest, EncryptRequest};
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let operator = service.client("operator").await;
            create_key(&operator, "data", "AES_256_GCM", None).await;
            create_key(&operator, "signing", "EC_SIGN_P256_SHA256", None).await;
            create_key(&operator, "other", "EC_SIGN_P256_SHA256", None).await;
            let app = service.client("ca-issuing").await;
            let mut envelope = EnvelopeServiceClient::new(app.clone());
            let sealed = envelope
                .encrypt(EncryptRequest { name: "keys/data".into(), plaintext: b"payload".to_vec(), associated_data: b"aad".to_vec() })
                .await
                .unwrap()
                .into_inner()
                .ciphertext;
            let decrypt = DecryptRequest { name: "keys/data".into(), ciphertext: sealed, associated_data: b"aad".to_vec() };
            assert_eq!(envelope.decrypt(decrypt.clone()).await.unwrap().into_inner().plaintext, b"payload");
            sign_sha256(&app, "signing", MESSAGE).await.unwrap();
            sign_sha256(&app, "other", MESSAGE).await.unwrap();

            other_destroys(token, "secrkey", "key/data/v1");
            other_destroys(token, "privkey", "key/signing/v1");
            for _ in 0..2 {
                let err = envelope.decrypt(decrypt.clone()).await.unwrap_err();
                assert_eq!(reason(&err), "HSM_KEY_MISSING", "{err:?}");
                let err = sign_sha256(&app, "signing", MESSAGE).await.unwrap_err();
                assert_eq!(reason(&err), "HSM_KEY_MISSING", "{err:?}");
            }
            sign_sha256(&app, "other", MESSAGE).await.unwrap();
        });
    }
);

/// The other process's job, in [`second_process`]: make and destroy key
/// pairs this many times.
const SECOND_PROCESS_GENERATIONS: &str = "CUSTODY_SECOND_PROCESS_GENERATIONS";

/// Not a test of its own: the second hsm-shim process of
/// [`a_search_in_one_process_never_fails_a_key_made_in_another`], run by it
/// on its token (it returns at once when run alone). It opens the token as
/// custodyd would, makes and destroys key pairs, and prints how many failed.
#[test]
fn second_process() {
    let Ok(generations) = std::env::var(SECOND_PROCESS_GENERATIONS) else {
        return;
    };
    let generations: usize = generations.parse().unwrap();
    let config = HsmConfig::new(
        softhsm_tests::module_path(),
        TokenSelector::Label(std::env::var("CUSTODY_SECOND_PROCESS_TOKEN").unwrap()),
        SecretString::from(std::env::var("CUSTODY_TEST_USER_PIN").unwrap()),
    );
    let hsm = Hsm::open(config).unwrap();
    let mut session = hsm.session().unwrap();
    let mut failures = Vec::new();
    for n in 0..generations {
        let key = label(&format!("key/second/v{n}"));
        let made = session
            .generate_key_pair(&key, KeySpec::EcP256, Exportability::NonExportable)
            .and_then(|_| session.destroy(&key));
        if let Err(error) = made {
            failures.push(error.to_string());
        }
    }
    println!(
        "second process: {} of {generations} generations failed: {failures:?}",
        failures.len()
    );
}

token_test!(
    fn a_search_in_one_process_never_fails_a_key_made_in_another(token) {
        let hsm = token.open();
        let mut session = hsm.session().unwrap();
        for n in 0..4 {
            session.generate_aes_key(&label(&format!("key/aes{n}/v1")), AesRole::DataEncryption, Exportability::NonExportable).unwrap();
        }
        // Both processes order their searches and changes through this file.
        let lock_file = hsm.object_store_lock_file().expect("SoftHSM2's file store has a lock file");
        assert!(lock_file.starts_with(token.conf().parent().unwrap()), "{}", lock_file.display());
        let generations = 600;
        // Its output goes to files: a pipe nobody reads while it runs could fill.
        let (out, err) = (token.scratch().join("second.out"), token.scratch().join("second.err"));
        let mut second = Command::new(std::env::current_exe().unwrap())
            .args(["second_process", "--exact", "--nocapture", "--test-threads=1"])
            .env(SECOND_PROCESS_GENERATIONS, generations.to_string())
            .env("CUSTODY_SECOND_PROCESS_TOKEN", token.label())
            .env("CUSTODY_TEST_USER_PIN", token.user_pin())
            .env("SOFTHSM2_CONF", token.conf())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        // This process lists the token (as a drift check does) until the
        // other is done making keys.
        let mut listings = 0;
        let mut listing_errors = Vec::new();
        while second.try_wait().unwrap().is_none() {
            if let Err(error) = session.inventory() {
                listing_errors.push(error.to_string());
            }
            listings += 1;
        }
        let status = second.wait().unwrap();
        let (report, errors) = (std::fs::read_to_string(out).unwrap(), std::fs::read_to_string(err).unwrap());
        assert!(status.success(), "the second process failed ({status}):\n{report}\n{errors}");
        assert!(report.contains(&format!("second process: 0 of {generations} generations failed")), "{report}\n{errors}");
        assert!(listings > 10, "the listings ran beside the generations ({listings})");
        assert_eq!(listing_errors, Vec::<String>::new());
    }
);
