//! custody's PKCS#11 module (`libcustody_pkcs11.so`) in front of a real
//! custodyd on SoftHSM2, over real mTLS, used by the software it is for:
//! OpenSC's `pkcs11-tool`, OpenSSL through libp11's engine, and the
//! `cryptoki` crate. Every signature is checked outside custody (openssl,
//! or the p256 crate); refusals are checked in custody's audit log.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::path::Path;
use std::process::Command;

use custody_core::identity::Role;
use custody_proto::v1::OperationKind;
use custody_proto::v1::key_service_client::KeyServiceClient;
use hsm_shim::{HashAlg, SignAlgorithm, SignInput};
use softhsm_tests::pkcs11_module::{self, ModuleConfig, path_str, pkcs11_tool, write_config};
use softhsm_tests::service::{HeldWorker, TestService, create_key, runtime};
use softhsm_tests::{assert_success, openssl_verifies_pem, token_test};

const MESSAGE: &[u8] = b"tbsCertificate bytes a CA would sign through PKCS#11";

/// The SubjectPublicKeyInfo PEM of `key_id`'s primary version, from
/// custodyd over gRPC.
async fn public_pem(service: &TestService, key_id: &str) -> String {
    let channel = service.client("operator").await;
    KeyServiceClient::new(channel)
        .get_public_key(custody_proto::v1::GetPublicKeyRequest {
            name: format!("keys/{key_id}"),
        })
        .await
        .unwrap()
        .into_inner()
        .pem
}

fn run(config: &ModuleConfig, what: &str, command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("run {what}: {e}"));
    if !output.status.success() {
        eprintln!("the module's log:\n{}", config.log_text());
    }
    assert_success(what, &output);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `pkcs11-tool --sign` with `label`'s key and `mechanism` (extra args
/// appended) over MESSAGE; the signature's bytes.
fn tool_sign(
    config: &ModuleConfig,
    dir: &Path,
    label: &str,
    mechanism: &str,
    extra: &[&str],
) -> Vec<u8> {
    let input = dir.join("message");
    let output = dir.join(format!("{label}.sig"));
    std::fs::write(&input, MESSAGE).unwrap();
    run(
        config,
        &format!("pkcs11-tool --sign --mechanism {mechanism}"),
        pkcs11_tool()
            .args([
                "--token-label",
                "custody",
                "--sign",
                "--mechanism",
                mechanism,
            ])
            // OpenSC 0.23 picks the signing key by CKA_ID only.
            .args(["--id", &hex::encode(format!("keys/{label}/versions/1"))])
            .args(["--input-file", path_str(&input)])
            .args(["--output-file", path_str(&output)])
            .args(extra),
    );
    std::fs::read(&output).unwrap()
}

token_test!(
    /// pkcs11-tool lists the caller's keys as private and public key
    /// objects, and signs with ECDSA P-256 and P-384, Ed25519 and RSA-PSS;
    /// openssl verifies every signature with custodyd's public key.
    fn pkcs11_tool_lists_keys_and_its_signatures_verify_with_openssl(token) {
        let rt = runtime();
        let service = rt.block_on(TestService::start(token));
        let keys = [
            ("p256", "EC_SIGN_P256_SHA256"),
            ("p384", "EC_SIGN_P384_SHA384"),
            ("ed", "EC_SIGN_ED25519"),
            ("pss", "RSA_SIGN_PSS_2048_SHA256"),
            ("pkcs1", "RSA_SIGN_PKCS1_2048_SHA256"),
        ];
        let pems: Vec<String> = rt.block_on(async {
            let operator = service.client("operator").await;
            let mut pems = Vec::new();
            for (id, algorithm) in keys {
                create_key(&operator, id, algorithm, None).await;
                pems.push(public_pem(&service, id).await);
            }
            pems
        });
        // The signer sees the keys ListKeys cannot show it: the config
        // names them.
        let config = write_config(&service, "ca-issuing", &[Role::Signer], &["p256", "p384", "ed", "pss", "pkcs1"]);

        let listing = run(&config, "pkcs11-tool --list-objects", pkcs11_tool().args(["--token-label", "custody", "--list-objects"]));
        for (id, _) in keys {
            assert!(listing.contains(&format!("label:      {id}")), "no {id} in:\n{listing}");
            assert!(
                listing.contains(&hex::encode(format!("keys/{id}/versions/1"))),
                "no CKA_ID of {id} in:\n{listing}"
            );
        }
        assert_eq!(listing.matches("Private Key Object").count(), 5, "{listing}");
        assert_eq!(listing.matches("Public Key Object").count(), 5, "{listing}");

        let dir = tempfile::tempdir_in(token.scratch()).unwrap();
        let scratch = token.scratch();
        let der = ["--signature-format", "openssl"];
        let p256 = tool_sign(&config, dir.path(), "p256", "ECDSA-SHA256", &der);
        assert!(openssl_verifies_pem(&scratch, &pems[0], SignAlgorithm::EcdsaP256Sha256, SignInput::Message(MESSAGE), &p256));
        let p384 = tool_sign(&config, dir.path(), "p384", "ECDSA-SHA384", &der);
        assert!(openssl_verifies_pem(&scratch, &pems[1], SignAlgorithm::EcdsaP384Sha384, SignInput::Message(MESSAGE), &p384));
        let ed = tool_sign(&config, dir.path(), "ed", "EDDSA", &[]);
        assert_eq!(ed.len(), 64);
        assert!(openssl_verifies_pem(&scratch, &pems[2], SignAlgorithm::Ed25519, SignInput::Message(MESSAGE), &ed));
        let pss = tool_sign(
            &config,
            dir.path(),
            "pss",
            "SHA256-RSA-PKCS-PSS",
            &["--mgf", "MGF1-SHA256", "--salt-len", "32"],
        );
        assert!(openssl_verifies_pem(&scratch, &pems[3], SignAlgorithm::RsaPss(HashAlg::Sha256), SignInput::Message(MESSAGE), &pss));
        let pkcs1 = tool_sign(&config, dir.path(), "pkcs1", "SHA256-RSA-PKCS", &[]);
        assert!(openssl_verifies_pem(
            &scratch,
            &pems[4],
            SignAlgorithm::RsaPkcs1v15(HashAlg::Sha256),
            SignInput::Message(MESSAGE),
            &pkcs1
        ));
        // The signatures are custody's: a flipped bit fails.
        let mut flipped = pss.clone();
        flipped[10] ^= 1;
        assert!(!openssl_verifies_pem(&scratch, &pems[3], SignAlgorithm::RsaPss(HashAlg::Sha256), SignInput::Message(MESSAGE), &flipped));
    }
);

/// `openssl` with libp11's engine loading the module (Debian's
/// `libengine-pkcs11-openssl`).
fn openssl_engine() -> Command {
    let mut command = Command::new("openssl");
    command.env("PKCS11_MODULE_PATH", pkcs11_module::library());
    command
}

token_test!(
    /// OpenSSL, through libp11's PKCS#11 engine and an RFC 7512 URI, makes
    /// a self-signed CA certificate and signs a leaf certificate with a
    /// custody key; `openssl verify` accepts both, and the CA certificate's
    /// public key is custody's.
    fn openssl_engine_makes_and_signs_certificates_with_a_custody_key(token) {
        let rt = runtime();
        let service = rt.block_on(TestService::start(token));
        let pem = rt.block_on(async {
            let operator = service.client("operator").await;
            create_key(&operator, "root", "EC_SIGN_P256_SHA256", None).await;
            public_pem(&service, "root").await
        });
        let config = write_config(&service, "ca-issuing", &[Role::Signer], &["root"]);
        let dir = tempfile::tempdir_in(token.scratch()).unwrap();
        let file = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
        let uri = "pkcs11:token=custody;object=root;type=private";

        run(
            &config,
            "openssl req -x509 with the engine",
            openssl_engine()
                .args(["req", "-new", "-x509", "-engine", "pkcs11", "-keyform", "engine"])
                .args(["-key", uri, "-sha256", "-days", "2"])
                .args(["-subj", "/CN=custody PKCS#11 test root", "-out", &file("root.pem")]),
        );
        let root_key = run(
            &config,
            "openssl x509 -pubkey",
            Command::new("openssl").args(["x509", "-in", &file("root.pem"), "-noout", "-pubkey"]),
        );
        assert_eq!(root_key.trim(), pem.trim(), "the certificate holds custody's key");
        let verified = run(
            &config,
            "openssl verify root",
            Command::new("openssl").args(["verify", "-CAfile", &file("root.pem"), &file("root.pem")]),
        );
        assert!(verified.contains("OK"), "{verified}");

        // A leaf key of openssl's own, certified by the custody key.
        run(
            &config,
            "openssl req leaf",
            Command::new("openssl")
                .args(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"])
                .args(["-keyout", &file("leaf.key"), "-subj", "/CN=leaf.example", "-out", &file("leaf.csr")]),
        );
        run(
            &config,
            "openssl x509 -req with the engine",
            openssl_engine()
                .args(["x509", "-req", "-in", &file("leaf.csr"), "-engine", "pkcs11"])
                .args(["-CA", &file("root.pem"), "-CAkeyform", "engine", "-CAkey", uri])
                .args(["-set_serial", "2", "-sha256", "-days", "1", "-out", &file("leaf.pem")]),
        );
        let verified = run(
            &config,
            "openssl verify leaf",
            Command::new("openssl").args(["verify", "-CAfile", &file("root.pem"), &file("leaf.pem")]),
        );
        assert!(verified.contains("leaf.pem: OK"), "{verified}");
        // Every signature was custody's, audited under the certificate's
        // principal.
        let signed = service
            .audit_events_since(0)
            .into_iter()
            .filter(|e| e["method"] == "Sign" && e["outcome"] == "ok")
            .map(|e| e["principal"].as_str().unwrap().to_string())
            .collect::<Vec<_>>();
        assert_eq!(signed, ["ca-issuing", "ca-issuing"], "{signed:?}");
    }
);

mod cryptoki_client {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
    use cryptoki::error::{Error, RvError};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectClass, ObjectHandle};
    use cryptoki::session::Session;
    use p256::ecdsa::signature::Verifier;
    use p256::pkcs8::DecodePublicKey;

    use super::*;

    const THREADS: usize = 8;
    const PER_THREAD: usize = 10;

    /// custody's module, loaded and initialised in this process.
    fn load_module() -> Pkcs11 {
        let pkcs11 = Pkcs11::new(pkcs11_module::library()).unwrap();
        pkcs11
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .unwrap();
        pkcs11
    }

    /// The key that verifies `key_id`'s signatures, as custodyd publishes it.
    async fn verifying_key(service: &TestService, key_id: &str) -> p256::ecdsa::VerifyingKey {
        let spki = KeyServiceClient::new(service.client("operator").await)
            .get_public_key(custody_proto::v1::GetPublicKeyRequest {
                name: format!("keys/{key_id}"),
            })
            .await
            .unwrap()
            .into_inner()
            .der;
        p256::ecdsa::VerifyingKey::from_public_key_der(&spki).unwrap()
    }

    fn private_key(session: &Session, label: &str) -> ObjectHandle {
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .unwrap();
        assert_eq!(found.len(), 1, "one private key labelled {label}");
        found[0]
    }

    token_test!(
        /// The cryptoki crate as a PKCS#11 client: 8 threads sign at once,
        /// each in its own session, and every signature verifies with the
        /// key custodyd publishes; the private key's secret attributes are
        /// refused; key generation is not supported; and a quorum-gated key
        /// is refused CKR_FUNCTION_REJECTED, the refusal audited under the
        /// certificate's principal and the module's log saying what to
        /// request.
        fn threads_sign_at_once_and_a_quorum_gated_key_is_rejected(token) {
            let rt = runtime();
            let service = rt.block_on(TestService::start(token));
            let verifying_key = rt.block_on(async {
                let operator = service.client("operator").await;
                create_key(&operator, "issuing", "EC_SIGN_P256_SHA256", None).await;
                create_key(&operator, "gated", "EC_SIGN_P256_SHA256", None).await;
                service.gate("gated", OperationKind::Sign).await;
                verifying_key(&service, "issuing").await
            });
            let config = write_config(&service, "ca-issuing", &[Role::Signer], &["issuing", "gated"]);

            let pkcs11 = load_module();
            let slot = pkcs11.get_slots_with_token().unwrap()[0];
            let info = pkcs11.get_token_info(slot).unwrap();
            assert_eq!(info.label(), "custody");

            let signatures = std::thread::scope(|scope| {
                let threads: Vec<_> = (0..THREADS)
                    .map(|t| {
                        let pkcs11 = &pkcs11;
                        scope.spawn(move || {
                            let session = pkcs11.open_ro_session(slot).unwrap();
                            let key = private_key(&session, "issuing");
                            (0..PER_THREAD)
                                .map(|i| {
                                    let message = format!("thread {t} message {i}").into_bytes();
                                    let signature = session
                                        .sign(&Mechanism::EcdsaSha256, key, &message)
                                        .unwrap();
                                    (message, signature)
                                })
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                threads
                    .into_iter()
                    .flat_map(|t| t.join().unwrap())
                    .collect::<Vec<_>>()
            });
            assert_eq!(signatures.len(), THREADS * PER_THREAD);
            for (message, signature) in &signatures {
                let signature = p256::ecdsa::Signature::from_slice(signature).unwrap();
                verifying_key.verify(message, &signature).unwrap();
            }

            let session = pkcs11.open_rw_session(slot).unwrap();
            let key = private_key(&session, "issuing");
            // Public facts are readable; the private value is not.
            let attributes = session
                .get_attributes(key, &[AttributeType::Sensitive, AttributeType::Extractable])
                .unwrap();
            assert_eq!(attributes, [Attribute::Sensitive(true), Attribute::Extractable(false)]);
            let value = session.get_attribute_info(key, &[AttributeType::Value]).unwrap();
            assert!(matches!(value[..], [AttributeInfo::Sensitive]), "{value:?}");
            // Keys are made through custody only.
            let generated = session.generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &[Attribute::Token(true)],
                &[Attribute::Token(true)],
            );
            assert!(
                matches!(
                    generated,
                    Err(Error::Pkcs11(RvError::FunctionNotSupported, Function::GenerateKeyPair))
                ),
                "{generated:?}"
            );
            // The module verifies too (through custodyd).
            let (message, signature) = &signatures[0];
            let public = session
                .find_objects(&[
                    Attribute::Class(ObjectClass::PUBLIC_KEY),
                    Attribute::Label(b"issuing".to_vec()),
                ])
                .unwrap()[0];
            session.verify(&Mechanism::EcdsaSha256, public, message, signature).unwrap();
            let mut wrong = signature.clone();
            wrong[3] ^= 1;
            assert!(matches!(
                session.verify(&Mechanism::EcdsaSha256, public, message, &wrong),
                Err(Error::Pkcs11(RvError::SignatureInvalid, Function::Verify))
            ));

            // A quorum-gated key: refused, audited, and the log says what to do.
            let before = service.audit_len();
            let gated = private_key(&session, "gated");
            let refused = session.sign(&Mechanism::EcdsaSha256, gated, b"needs officers");
            assert!(
                matches!(refused, Err(Error::Pkcs11(RvError::FunctionRejected, Function::Sign))),
                "{refused:?}"
            );
            let events = service.audit_events_since(before);
            assert!(
                events.iter().any(|e| e["method"] == "Sign"
                    && e["principal"] == "ca-issuing"
                    && e["resource"] == "keys/gated/versions/1"
                    && e["outcome"] == "QUORUM_REQUIRED"),
                "{events:?}"
            );
            let log = config.log_text();
            assert!(
                log.contains("keys/gated/versions/1")
                    && log.contains("RequestOperation")
                    && log.contains("custodyctl request sign keys/gated/versions/1 --digest"),
                "{log}"
            );
            drop(session);
            pkcs11.finalize().unwrap();
        }
    );

    token_test!(
        /// custodyd's HSM_BUSY (the caller's share of the HSM queue is
        /// full; nothing was done) is a wait for an application signing
        /// through the module, not an error: the module asks again after
        /// about custodyd's hint, and the signature comes once the queue
        /// moves; a queue that does not move within `timeout_ms` ends the
        /// call CKR_DEVICE_MEMORY after a bounded number of tries.
        fn a_busy_hsm_is_waited_for_within_the_deadline_not_returned_as_an_error(token) {
            let rt = runtime();
            let service = rt.block_on(TestService::start_with(token, |config| {
                config.hsm.workers = 1;
                config.hsm.max_queued_per_caller = 16;
                // No checkpoint falls due while the one worker is held (its
                // signature would hold the audit log behind it).
                config.audit.checkpoint_interval_secs = 3600;
                config.audit.checkpoint_every = 1_000_000;
            }));
            let (verifying_key, signer) = rt.block_on(async {
                let operator = service.client("operator").await;
                create_key(&operator, "issuing", "EC_SIGN_P256_SHA256", None).await;
                (verifying_key(&service, "issuing").await, service.client("ca-issuing").await)
            });
            let config = write_config(&service, "ca-issuing", &[Role::Signer], &["issuing"]);
            let mut text = std::fs::read_to_string(&config.path).unwrap();
            text.push_str("timeout_ms = 5000\n");
            std::fs::write(&config.path, text).unwrap();
            let pkcs11 = load_module();
            let slot = pkcs11.get_slots_with_token().unwrap()[0];
            let session = pkcs11.open_ro_session(slot).unwrap();
            let key = private_key(&session, "issuing");

            // The one HSM worker held, and the signer's share (16) taken by
            // its own gRPC calls waiting behind it.
            let hsm = service.state().hsm.clone();
            // Held before the calls are made, so that none of them runs.
            let held = rt.block_on(HeldWorker::hold(&hsm));
            let waiting: Vec<_> = (0..16u32)
                .map(|n| {
                    let signer = signer.clone();
                    rt.spawn(async move {
                        custody_proto::v1::signing_service_client::SigningServiceClient::new(signer)
                            .sign(custody_proto::v1::SignRequest {
                                name: "keys/issuing".into(),
                                input: Some(custody_proto::v1::sign_request::Input::Data(
                                    n.to_be_bytes().to_vec(),
                                )),
                                ..Default::default()
                            })
                            .await
                    })
                })
                .collect();
            rt.block_on(async {
                for _ in 0..200 {
                    if service.state().limits.hsm_shares.held("ca-issuing") >= 16 {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            });
            assert_eq!(
                service.state().limits.hsm_shares.held("ca-issuing"),
                16,
                "the signer's 16 calls hold its share"
            );

            // A queue that does not move: the module tries again, a bounded
            // number of times (at least 250 ms apart within 5 s), then gives
            // the application custodyd's answer.
            let before = service.audit_len();
            let gave_up = session.sign(&Mechanism::EcdsaSha256, key, b"busy throughout");
            assert!(
                matches!(gave_up, Err(Error::Pkcs11(RvError::DeviceMemory, Function::Sign))),
                "{gave_up:?}"
            );
            let busy = service.outcomes_since(before, "Sign").iter().filter(|o| *o == "HSM_BUSY").count();
            assert!((2..=21).contains(&busy), "{busy} tries refused HSM_BUSY");

            let before = service.audit_len();
            let signed = std::thread::scope(|scope| {
                let signing = scope.spawn(move || session.sign(&Mechanism::EcdsaSha256, key, b"while busy"));
                // Once custodyd has refused the module HSM_BUSY, the queue
                // moves (bounded wait for the refusal).
                rt.block_on(async {
                    for _ in 0..200 {
                        if service.outcomes_since(before, "Sign").iter().any(|o| o == "HSM_BUSY") {
                            break;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                });
                assert!(
                    service.outcomes_since(before, "Sign").iter().any(|o| o == "HSM_BUSY"),
                    "custodyd never refused the module HSM_BUSY"
                );
                rt.block_on(held.release());
                signing.join().unwrap()
            });
            let signature = signed.expect("the module waited for the busy HSM and signed");
            let signature = p256::ecdsa::Signature::from_slice(&signature).unwrap();
            verifying_key.verify(b"while busy", &signature).unwrap();
            rt.block_on(async {
                for call in waiting {
                    call.await.unwrap().unwrap();
                }
            });
            pkcs11.finalize().unwrap();
        }
    );
}

mod identity {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::object::{Attribute, ObjectClass};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;

    use super::*;

    fn private_keys(pkcs11: &Pkcs11, pin: &str) -> usize {
        let slot = pkcs11.get_slots_with_token().unwrap()[0];
        let session = pkcs11.open_ro_session(slot).unwrap();
        session
            .login(UserType::User, Some(&AuthPin::new(pin.into())))
            .unwrap();
        session
            .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
            .unwrap()
            .len()
    }

    token_test!(
        /// P2: the client certificate, not the PIN, decides what the module
        /// may use. A signer not on the key's allow-list, logged in with
        /// any PIN, is shown no key, and custodyd audits its attempt under
        /// its own principal; the allowed signer's certificate shows it.
        fn p2_the_certificate_not_the_pin_decides_what_the_module_may_use(token) {
            let rt = runtime();
            let service = rt.block_on(TestService::start(token));
            rt.block_on(async {
                let operator = service.client("operator").await;
                create_key(&operator, "issuing", "EC_SIGN_P256_SHA256", None).await;
            });

            write_config(&service, "intruder", &[Role::Signer], &["issuing"]);
            let before = service.audit_len();
            let pkcs11 = Pkcs11::new(pkcs11_module::library()).unwrap();
            pkcs11
                .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
                .unwrap();
            assert_eq!(private_keys(&pkcs11, "the-user-pin-of-the-allowed-signer"), 0);
            pkcs11.finalize().unwrap();
            let events = service.audit_events_since(before);
            assert!(
                events.iter().any(|e| e["principal"] == "intruder"
                    && e["method"] == "GetKey"
                    && e["outcome"] == "NOT_ALLOWED_SIGNER"),
                "{events:?}"
            );
            assert!(
                events.iter().all(|e| e["principal"] == "intruder" && e["outcome"] != "ok"),
                "{events:?}"
            );

            write_config(&service, "ca-issuing", &[Role::Signer], &["issuing"]);
            let pkcs11 = Pkcs11::new(pkcs11_module::library()).unwrap();
            pkcs11
                .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
                .unwrap();
            assert_eq!(private_keys(&pkcs11, "any PIN at all"), 1);
            pkcs11.finalize().unwrap();
        }
    );
}

token_test!(
    /// A custodyd that takes the connection and then says nothing (stopped
    /// with SIGSTOP, a balancer with no backend) fails the module's calls
    /// at their deadline (`timeout_ms`), on the TLS handshake too: the
    /// application's thread is given an error, not held for ever.
    fn a_server_that_takes_the_connection_and_says_nothing_fails_the_call_at_its_deadline(token) {
        let dir = token.scratch().join("silent");
        std::fs::create_dir_all(&dir).unwrap();
        let ca = custody_daemon::devpki::Ca::new("custody test CA").unwrap();
        let issued = ca
            .issue_client("ca-issuing", &[Role::Signer], custody_daemon::devpki::Validity::days(1))
            .unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let (ca_file, cert, key) = (
            write("ca.pem", ca.cert_pem()),
            write("client.pem", &issued.cert_pem),
            write("client.key", &issued.key_pem),
        );
        // The kernel completes the TCP handshake for a listening socket no
        // one accepts on: then nothing is ever said.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let log = dir.join("module.log");
        std::fs::write(
            pkcs11_module::config_path(),
            format!(
                "log_file = {log:?}\n\n[[server]]\nlabel = \"custody\"\naddress = \"https://127.0.0.1:{}\"\n\
                 ca_file = {ca_file:?}\ncert_file = {cert:?}\nkey_file = {key:?}\nkeys = [\"k\"]\ntimeout_ms = 2000\n",
                silent.local_addr().unwrap().port()
            ),
        )
        .unwrap();
        // Listing the objects asks custodyd for key k. Bounded here by
        // `timeout`: a module that waits for ever is killed (status 124).
        let output = Command::new("timeout")
            .args(["120", "pkcs11-tool", "--module"])
            .arg(pkcs11_module::library())
            .args(["--token-label", "custody", "--list-objects"])
            .output()
            .unwrap();
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        assert_ne!(output.status.code(), Some(124), "the module waited for ever; its log:\n{logged}");
        assert!(logged.contains("key k not shown"), "the failed call is not logged:\n{logged}");
        drop(silent);
    }
);
