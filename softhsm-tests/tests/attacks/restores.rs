//! I2, nothing destroys what it did not make (issue 12, scenario 2).
//!
//! A source daemon is backed up and lost; its bundle is restored into a
//! fresh daemon on an empty token. While the restore is open, an operator
//! alone (2a, 2c) or a second restore of the same bundle (2b) reaches for
//! the key ids the bundle holds.
//!
//! Safe: every key ends up whole, its HSM material the one its registry
//! record names (it decrypts what it encrypted, its signatures verify with
//! its public key), and drift detection finds nothing; whichever side loses
//! the race is refused without destroying anything it did not make itself.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use custody_proto::v1::{Algorithm, CeremonyState};
use hsm_shim::SignAlgorithm;
use softhsm_tests::ceremony::{Officers, root_script};
use softhsm_tests::service::{TestService, reason, runtime};
use softhsm_tests::{TestToken, token_test};
use tonic::transport::Channel;

use crate::common::{
    PAYLOAD, approved_sign, back_up_a_source, create_key, decrypt, drift, encrypt, officers_of,
    open_restore, outcome, public_key_pem, recovery_daemon, refusal, sign, state, submit_shares,
    verifies,
};

/// Besides `envelope-kek`: a root key from an honest root ceremony and an
/// AES key for payments, both backup-exportable.
async fn three_keys(source: &TestService) {
    let officers = officers_of(source).await;
    let (root, _) = officers
        .run(&root_script("root-1", "root-ca", false))
        .await
        .unwrap();
    assert_eq!(state(&root), CeremonyState::Completed, "{}", root.error);
    let operator = source.client("operator").await;
    create_key(&operator, "payments-dek", Algorithm::Aes256Gcm, true)
        .await
        .unwrap();
}

/// What is wrong with the three keys now: each must still do its job with
/// the material the registry names (root-ca signs under its SIGN quorum,
/// which the restore kept).
async fn harm_to_three_keys(
    token: &TestToken,
    app: &Channel,
    officers: &Officers<'_>,
    root_pem: &str,
    sealed: &[u8],
) -> Vec<String> {
    let mut harm = Vec::new();
    match approved_sign(
        app,
        officers,
        &["alice", "bob", "carol"],
        "root-ca",
        PAYLOAD,
    )
    .await
    {
        Ok(signature) => {
            if !verifies(
                token,
                root_pem,
                SignAlgorithm::EcdsaP256Sha256,
                PAYLOAD,
                &signature,
            ) {
                harm.push("root-ca signs with a key that is not the restored one".to_string());
            }
        }
        Err(e) => harm.push(refusal("signing with root-ca", &e)),
    }
    match decrypt(app, "payments-dek", sealed).await {
        Ok(plaintext) if plaintext == PAYLOAD => {}
        Ok(_) => harm.push("payments-dek decrypts to something else".into()),
        Err(e) => harm.push(refusal("decrypting with payments-dek", &e)),
    }
    if let Err(e) = encrypt(app, "envelope-kek", PAYLOAD).await {
        harm.push(refusal("encrypting with envelope-kek", &e));
    }
    harm
}

token_test!(
    fn i2a_a_failed_restore_destroys_no_live_key_it_did_not_make(token) {
        runtime().block_on(async {
            let backup = back_up_a_source(token, three_keys).await;
            let dr = recovery_daemon(token).await;
            let officers = officers_of(&dr).await;
            let operator = dr.client("operator").await;
            let app = dr.client("ca-issuing").await;
            let name = open_restore(&officers, "restore-1", &backup.bundle).await.unwrap();

            // While the restore waits for the custodians, the operator alone
            // makes a key whose id the bundle holds, and it goes into use.
            let created = create_key(&operator, "payments-dek", Algorithm::Aes256Gcm, false).await;
            let sealed = match &created {
                Ok(_) => Some(encrypt(&app, "payments-dek", PAYLOAD).await.unwrap()),
                Err(_) => None,
            };
            let restored = submit_shares(&officers, &name, &backup.shares).await;

            let mut harm = drift(&dr).await;
            if let Some(sealed) = &sealed {
                match decrypt(&app, "payments-dek", sealed).await {
                    Ok(plaintext) if plaintext == PAYLOAD => {}
                    Ok(_) => harm.push("the operator's payments-dek decrypts to something else".into()),
                    Err(e) => harm.insert(0, refusal("decrypting with the operator's live payments-dek", &e)),
                }
            }
            assert!(
                harm.is_empty(),
                "the restore ({}) destroyed a live key it did not make (the operator's CreateKey: {}): {}",
                outcome(&restored),
                created.as_ref().map_or_else(reason, |_| "created".into()),
                harm.join("; ")
            );
        });
    }
);

token_test!(
    fn i2b_a_second_restore_of_a_bundle_destroys_nothing_the_first_restored(token) {
        runtime().block_on(async {
            let backup = back_up_a_source(token, three_keys).await;
            let dr = recovery_daemon(token).await;
            let officers = officers_of(&dr).await;
            let app = dr.client("ca-issuing").await;
            let first = open_restore(&officers, "restore-1", &backup.bundle).await.unwrap();
            let second = open_restore(&officers, "restore-2", &backup.bundle).await;
            let done = submit_shares(&officers, &first, &backup.shares).await.unwrap();
            assert_eq!(state(&done), CeremonyState::Completed, "{}", done.error);
            let root_pem = &backup.public_keys["root-ca"];
            let sealed = encrypt(&app, "payments-dek", PAYLOAD).await.unwrap();
            let before = harm_to_three_keys(token, &app, &officers, root_pem, &sealed).await;
            assert!(before.is_empty(), "the first restore does not work: {before:?}");

            // The second restore gets its shares too.
            let second = match &second {
                Ok(name) => outcome(&submit_shares(&officers, name, &backup.shares).await),
                Err(e) => refusal("opening the second restore", e),
            };

            let mut harm = harm_to_three_keys(token, &app, &officers, root_pem, &sealed).await;
            harm.extend(drift(&dr).await);
            assert!(
                harm.is_empty(),
                "the second restore ({second}) destroyed keys the first one restored: {}",
                harm.join("; ")
            );
        });
    }
);

/// Keys the bundle of scenario 2c holds after `a-racer` (and
/// `envelope-kek`): they keep the restore busy while the operator strikes.
const FILLER: usize = 40;

/// `a-racer`, first in the bundle, then [`FILLER`] more key pairs.
async fn a_racer_and_filler(source: &TestService) {
    let operator = source.client("operator").await;
    create_key(&operator, "a-racer", Algorithm::EcSignP256Sha256, true)
        .await
        .unwrap();
    for i in 0..FILLER {
        create_key(
            &operator,
            &format!("z-{i:03}"),
            Algorithm::EcSignP256Sha256,
            true,
        )
        .await
        .unwrap();
    }
}

/// Objects on the token, by label.
async fn labels(service: &TestService) -> Vec<String> {
    let objects = service.state().hsm.run(|s| s.inventory()).await.unwrap();
    objects.into_iter().map(|o| o.label).collect()
}

token_test!(
    fn i2c_a_create_key_racing_a_restore_replaces_no_restored_material(token) {
        runtime().block_on(async {
            let backup = back_up_a_source(token, a_racer_and_filler).await;
            let dr = recovery_daemon(token).await;
            let officers = officers_of(&dr).await;
            let operator = dr.client("operator").await;
            let app = dr.client("ca-issuing").await;
            let name = open_restore(&officers, "restore-1", &backup.bundle).await.unwrap();
            officers.submit_share("alice", &name, &backup.shares["alice"]).await.unwrap();
            let before: BTreeSet<String> = labels(&dr).await.into_iter().collect();

            // bob's share sets the restore going; once a-racer is back in the
            // HSM (the objects of the key after it appear), the operator
            // alone creates a-racer.
            let finished = AtomicBool::new(false);
            let restore = async {
                let done = officers.submit_share("bob", &name, &backup.shares["bob"]).await;
                finished.store(true, Ordering::SeqCst);
                done
            };
            let race = async {
                loop {
                    let new = labels(&dr)
                        .await
                        .into_iter()
                        .filter(|l| !before.contains(l) && !l.starts_with("restore-kek"))
                        .count();
                    if new >= 3 || finished.load(Ordering::SeqCst) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                let created = create_key(&operator, "a-racer", Algorithm::EcSignP256Sha256, false).await;
                (created, !finished.load(Ordering::SeqCst))
            };
            let (restored, (created, raced)) = tokio::join!(restore, race);
            assert!(
                raced,
                "setup: the restore ({}) was over before the operator's CreateKey returned; give it more filler keys",
                outcome(&restored)
            );

            // Whoever won, a-racer's HSM key must be the one its public key
            // names, and the restored one if the restore completed. (Before
            // I2 the operator's CreateKey destroyed the restored object as an
            // orphan and generated its own, and now and then the restore's
            // roll-back then destroyed the operator's new key. Now the
            // restore reserved a-racer when it opened, and the CreateKey is
            // refused KEY_RESERVED.)
            let mut harm = drift(&dr).await;
            let live = public_key_pem(&app, "a-racer").await.unwrap();
            match sign(&app, "a-racer", PAYLOAD).await {
                Ok(signature) => {
                    if !verifies(token, &live, SignAlgorithm::EcdsaP256Sha256, PAYLOAD, &signature) {
                        harm.insert(0, "a-racer's signatures do not verify with its registered public key: the HSM object under its label was replaced".into());
                    }
                }
                Err(e) => harm.insert(0, refusal("signing with a-racer", &e)),
            }
            let completed = matches!(&restored, Ok(c) if state(c) == CeremonyState::Completed);
            if completed && live != backup.public_keys["a-racer"] {
                harm.push("the restore completed, but a-racer is not the backed-up key".into());
            }
            assert!(
                harm.is_empty(),
                "a CreateKey racing the restore (CreateKey: {}; restore: {}) replaced restored material: {}",
                created.as_ref().map_or_else(reason, |_| "created".into()),
                outcome(&restored),
                harm.join("; ")
            );
        });
    }
);

/// An object someone else put on the token under the label custody would
/// give `key_id`'s first version: an AES key made straight through PKCS#11.
async fn foreign_object_under(service: &TestService, key_id: &str) -> String {
    let label = hsm_shim::KeyLabel::new(format!("key/{key_id}/v1")).unwrap();
    let made = label.clone();
    service
        .state()
        .hsm
        .run(move |s| {
            s.generate_aes_key(
                &made,
                hsm_shim::AesRole::DataEncryption,
                hsm_shim::Exportability::NonExportable,
            )
        })
        .await
        .unwrap();
    label.as_str().to_string()
}

/// How many objects the token holds under `label`.
async fn objects_under(service: &TestService, label: &str) -> usize {
    labels(service).await.iter().filter(|l| *l == label).count()
}

token_test!(
    fn i2d_key_generation_never_destroys_or_replaces_an_object_it_did_not_make(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let officers = officers_of(&service).await;
            let operator = service.client("operator").await;

            // CreateKey over an object someone else left under key/stray/v1.
            let label = foreign_object_under(&service, "stray").await;
            let created = create_key(&operator, "stray", Algorithm::Aes256Gcm, false).await;
            let mut harm = Vec::new();
            match &created {
                Err(e) if reason(e) == "HSM_KEY_EXISTS" => {}
                Err(e) => harm.push(refusal("CreateKey over the stray object", e)),
                Ok(_) => harm.push("CreateKey over the stray object succeeded".into()),
            }
            if objects_under(&service, &label).await != 1 {
                harm.push(format!("the stray object under {label} was destroyed or joined by another"));
            }

            // A root ceremony whose key label is taken the same way fails and
            // rolls back, leaving the stray object where it was.
            let label = foreign_object_under(&service, "stray-root").await;
            let root = officers.run(&root_script("root-9", "stray-root", false)).await;
            match &root {
                Ok((c, _)) if state(c) == CeremonyState::Completed => {
                    harm.push("the root ceremony completed over the stray object".into())
                }
                _ => {}
            }
            if objects_under(&service, &label).await != 1 {
                harm.push(format!(
                    "the root ceremony ({}) destroyed or replaced the stray object under {label}",
                    outcome(&root.map(|(c, _)| c))
                ));
            }
            assert!(harm.is_empty(), "{}", harm.join("; "));
        });
    }
);
