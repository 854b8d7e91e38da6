//! custodyd as a process: what must hold across SIGKILL, SIGHUP and SIGTERM.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use custody_core::identity::Role;
use custody_daemon::devpki::{Ca, Validity};
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::signing_service_client::SigningServiceClient;
use custody_proto::v1::{
    CreateKeyRequest, Digest, ListKeysRequest, SignRequest, digest, sign_request,
};
use softhsm_tests::process::{
    Daemon, Pki, audit_export, connect, free_port, officer_channels, prepare, prepare_ceremonies,
    ready, softhsm_lists_token, verify_export,
};
use softhsm_tests::{TestToken, token_test};

#[path = "process/audit_segments.rs"]
mod audit_segments;
#[path = "process/destruction.rs"]
mod destruction;

const CUSTODYD: &str = env!("CARGO_BIN_EXE_custodyd-under-test");

fn spawn(config: &Path) -> Daemon {
    softhsm_tests::process::spawn(CUSTODYD, config)
}

fn spawn_crashing_at(config: &Path, crash_at: Option<&str>) -> Daemon {
    softhsm_tests::process::spawn_crashing_at(Command::new(CUSTODYD), config, crash_at)
}

fn sign_request(i: u32) -> SignRequest {
    SignRequest {
        name: "keys/k".into(),
        input: Some(sign_request::Input::Digest(Digest {
            digest: Some(digest::Digest::Sha256(vec![i as u8; 32])),
        })),
        ..Default::default()
    }
}

/// Creates `key_id`, an EC P-256 signing key the principal `ca` may use.
async fn create_signing_key(operator: tonic::transport::Channel, key_id: &str) {
    KeyServiceClient::new(operator)
        .create_key(CreateKeyRequest {
            key_id: key_id.into(),
            algorithm: custody_proto::v1::Algorithm::EcSignP256Sha256 as i32,
            purpose: 1,
            allowed_signers: vec!["ca".into()],
            ..Default::default()
        })
        .await
        .unwrap();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

token_test!(
    fn acknowledged_signatures_and_keys_survive_kill_9(token) {
        runtime().block_on(async {
            let port = free_port();
            let (pki, config) = prepare(token, port);
            let mut daemon = spawn(&config);
            let operator = ready(&pki, port, &mut daemon).await;
            create_signing_key(operator, "k").await;
            let signer = connect(&pki, port, &pki.client("ca", &[Role::Signer])).await.unwrap();
            let mut client = SigningServiceClient::new(signer);
            let acknowledged = 40;
            for i in 0..acknowledged {
                client.sign(sign_request(i)).await.unwrap();
            }
            // SIGKILL right after the last acknowledgement: nothing gets to flush.
            daemon.kill().unwrap();
            daemon.wait().unwrap();

            let mut daemon = spawn(&config);
            ready(&pki, port, &mut daemon).await;
            let (entries, text) = audit_export(&pki, port).await;
            let signed = entries
                .iter()
                .filter(|e| e.contains("\"method\":\"Sign\"") && e.contains("\"outcome\":\"ok\""))
                .count() as u32;
            assert_eq!(signed, acknowledged, "acknowledged signatures missing from the audit log after SIGKILL");
            let report = verify_export(&text);
            assert!(report.first_bad.is_none(), "chain broken after SIGKILL: {report:?}");
            // The key is still there and still signs.
            let signer = connect(&pki, port, &pki.client("ca", &[Role::Signer])).await.unwrap();
            SigningServiceClient::new(signer).sign(sign_request(99)).await.unwrap();
            daemon.kill().unwrap();
            daemon.wait().unwrap();
        });
    }
);

token_test!(
    fn sighup_reloads_certificates_and_sigterm_stops_cleanly(token) {
        runtime().block_on(async {
            let port = free_port();
            let (pki, config) = prepare(token, port);
            let mut daemon = spawn(&config);
            ready(&pki, port, &mut daemon).await;

            let new_ca = Ca::new("process test CA 2").unwrap();
            std::fs::write(pki.dir.join("ca.pem"), new_ca.cert_pem()).unwrap();
            std::fs::write(pki.dir.join("crl.pem"), new_ca.crl(&[]).unwrap()).unwrap();
            let status = Command::new("kill").args(["-HUP", &daemon.id().to_string()]).status().unwrap();
            assert!(status.success());
            let newcomer = new_ca.issue_client("operator", &[Role::Operator], Validity::days(1)).unwrap();
            let mut reloaded = false;
            for _ in 0..100 {
                if let Ok(channel) = connect(&pki, port, &newcomer).await {
                    if KeyServiceClient::new(channel).list_keys(ListKeysRequest::default()).await.is_ok() {
                        reloaded = true;
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(reloaded, "a certificate of the new client CA is not accepted after SIGHUP");
            let old = pki.client("operator", &[Role::Operator]);
            let old_works = match connect(&pki, port, &old).await {
                Ok(channel) => KeyServiceClient::new(channel).list_keys(ListKeysRequest::default()).await.is_ok(),
                Err(_) => false,
            };
            assert!(!old_works, "the replaced client CA is still trusted");

            let exit = daemon.terminate();
            assert!(exit.success(), "custodyd did not stop cleanly on SIGTERM: {exit}");
        });
    }
);

/// Waits for `child` to die and checks that SIGKILL killed it.
async fn killed_at_crash_point(mut child: Daemon, point: &str) {
    use std::os::unix::process::ExitStatusExt;
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "custodyd did not die at {point}: {status}"
    );
}

token_test!(
    fn a_version_generation_killed_at_every_crash_point_is_rolled_back_or_kept_whole(token) {
        use custody_core::failpoint::ROTATION_POINTS;
        use custody_proto::v1::{CheckDriftRequest, GetKeyRequest, RotateKeyRequest};
        runtime().block_on(async {
            let port = free_port();
            let (pki, config) = prepare(token, port);
            let create = |key_id: String| CreateKeyRequest {
                key_id,
                algorithm: custody_proto::v1::Algorithm::EcSignP256Sha256 as i32,
                purpose: 1,
                allowed_signers: vec!["ca".into()],
                ..Default::default()
            };
            let mut daemon = spawn(&config);
            let mut operator = ready(&pki, port, &mut daemon).await;
            let mut runs = 0;
            for (i, point) in ROTATION_POINTS.iter().enumerate() {
                let committed = *point == "version.after_commit";
                KeyServiceClient::new(operator.clone()).create_key(create(format!("r{i}"))).await.unwrap();
                daemon.kill().unwrap();
                daemon.wait().unwrap();

                // A rotation, then a creation, each killed at the point.
                let mut crashing = spawn_crashing_at(&config, Some(point));
                let channel = ready(&pki, port, &mut crashing).await;
                let rotate = RotateKeyRequest { name: format!("keys/r{i}"), ..Default::default() };
                assert!(KeyServiceClient::new(channel).rotate_key(rotate).await.is_err());
                killed_at_crash_point(crashing, point).await;
                let mut crashing = spawn_crashing_at(&config, Some(point));
                let channel = ready(&pki, port, &mut crashing).await;
                assert!(KeyServiceClient::new(channel).create_key(create(format!("c{i}"))).await.is_err());
                killed_at_crash_point(crashing, point).await;
                runs += 2;

                // Restarted, the HSM matches the registry, and what was not
                // committed does not exist.
                daemon = spawn(&config);
                operator = ready(&pki, port, &mut daemon).await;
                let mut keys = KeyServiceClient::new(operator.clone());
                let drift = keys.check_drift(CheckDriftRequest {}).await.unwrap().into_inner();
                assert!(drift.findings.is_empty(), "after a crash at {point}: {:?}", drift.findings);
                let rotated = keys.get_key(GetKeyRequest { name: format!("keys/r{i}") }).await.unwrap().into_inner();
                assert_eq!(rotated.versions.len(), if committed { 2 } else { 1 }, "{point}");
                assert_eq!(rotated.primary_version, if committed { 2 } else { 1 }, "{point}");
                let created = keys.get_key(GetKeyRequest { name: format!("keys/c{i}") }).await;
                assert_eq!(created.is_ok(), committed, "{point}");
                let signer = connect(&pki, port, &pki.client("ca", &[Role::Signer])).await.unwrap();
                let mut signing = SigningServiceClient::new(signer);
                let mut v2 = sign_request(1);
                v2.name = format!("keys/r{i}/versions/2");
                assert_eq!(signing.sign(v2).await.is_ok(), committed, "{point}");
                let mut primary = sign_request(2);
                primary.name = format!("keys/r{i}");
                signing.sign(primary).await.unwrap();
                // And the key rotates normally afterwards.
                let next = keys
                    .rotate_key(RotateKeyRequest { name: format!("keys/r{i}"), ..Default::default() })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(next.primary_version, if committed { 3 } else { 2 }, "{point}");
                // Each interrupted generation was rolled back at the start,
                // its HSM objects (a key pair, once generated) destroyed.
                let (entries, _) = audit_export(&pki, port).await;
                let rolled_back: Vec<&String> = entries
                    .iter()
                    .filter(|e| e.contains("\"method\":\"RollBackVersion\"") && (e.contains(&format!("keys/r{i}/")) || e.contains(&format!("keys/c{i}/"))))
                    .collect();
                let expected = match *point {
                    "version.after_journal" => "destroyed 0 HSM objects",
                    "version.after_generate" => "destroyed 2 HSM objects",
                    _ => "",
                };
                if expected.is_empty() {
                    assert!(rolled_back.is_empty(), "{point}: {rolled_back:?}");
                } else {
                    assert_eq!(rolled_back.len(), 2, "{point}: {rolled_back:?}");
                    assert!(rolled_back.iter().all(|e| e.contains(expected) && e.contains("\"outcome\":\"ok\"")), "{point}: {rolled_back:?}");
                }
            }
            println!("crash points covered {}/{}; {runs} killed runs", ROTATION_POINTS.len(), ROTATION_POINTS.len());
            daemon.kill().unwrap();
            daemon.wait().unwrap();
        });
    }
);

/// Whether SoftHSM2 itself, in a process of its own (`pkcs11-tool`) with
/// custodyd stopped, can list every object of the main token with its
/// attributes: a kill in the middle of SoftHSM2 writing an object's file
/// leaves one it cannot read back (`CKR_ATTRIBUTE_VALUE_INVALID`), whatever
/// custodyd does. (Not in this process: SoftHSM2 keeps its view of the
/// token directory from the process's first `C_Initialize`.)
fn softhsm_reads_every_object(token: &TestToken) -> bool {
    let listed = token.pkcs11_tool().arg("--list-objects").output().unwrap();
    let errors = String::from_utf8_lossy(&listed.stderr);
    // A sensitive key's value is refused by design, never a sign of damage.
    let damage = errors
        .lines()
        .any(|l| l.contains("CKR_") && !l.contains("CKR_ATTRIBUTE_SENSITIVE"));
    let readable = listed.status.success() && !damage;
    if !readable {
        eprintln!("SoftHSM2 cannot read its own main token: {errors}");
    }
    readable
}

/// What a ceremony test drives, up to where custodyd dies.
#[derive(Clone, Copy, Debug)]
enum Scenario {
    /// Root key with a certificate.
    Root,
    /// KEK, generate mode (backup KEK and shares).
    Kek,
    /// KEK from three components.
    Components,
    /// A DR drill of the first KEK ceremony's bundle.
    Drill,
    /// The rig's root certifies the rig's issuing key.
    Intermediate,
    /// The rig's root certifies a staged version of the rig's issuing key.
    Staged,
    /// The rig's root signs a CRL.
    Crl,
    /// The rig's root cross-signs an outside CA's certificate.
    CrossSign,
    /// A key-destruction ceremony over an approved, scheduled version.
    Destruction,
}

impl Scenario {
    /// The scenario that passes `point`.
    fn passing(point: &str) -> Scenario {
        match point.split('.').nth(1) {
            Some("backup_kek" | "backup") => Scenario::Kek,
            Some("import") => Scenario::Components,
            Some("restore") => Scenario::Drill,
            Some("tbs" | "certify") => Scenario::Intermediate,
            Some("stage") => Scenario::Staged,
            Some("crl_tbs" | "sign_crl") => Scenario::Crl,
            Some("cross_tbs" | "cross_certify") => Scenario::CrossSign,
            Some("destruction_manifest" | "destroy_versions") => Scenario::Destruction,
            _ => Scenario::Root,
        }
    }

    /// The key the scenario makes.
    fn key(self, run: usize) -> Option<String> {
        match self {
            Scenario::Root => Some(format!("root-{run}")),
            Scenario::Kek => Some(format!("kek-{run}")),
            Scenario::Components => Some(format!("parts-{run}")),
            Scenario::Drill
            | Scenario::Intermediate
            | Scenario::Staged
            | Scenario::Crl
            | Scenario::CrossSign
            | Scenario::Destruction => None,
        }
    }

    fn script(self, run: usize, bundle: &str) -> String {
        use softhsm_tests::ceremony::{components_script, kek_script, restore_script, root_script};
        match self {
            Scenario::Root => root_script(&format!("c-root-{run}"), &format!("root-{run}"), true),
            Scenario::Kek => kek_script(&format!("c-kek-{run}"), &format!("kek-{run}"), false),
            Scenario::Components => {
                components_script(&format!("c-parts-{run}"), &format!("parts-{run}"))
            }
            Scenario::Drill => restore_script(&format!("c-drill-{run}"), bundle, true),
            Scenario::Intermediate => intermediate_script(&format!("c-int-{run}")),
            Scenario::Staged => intermediate_script(&format!("c-stage-{run}")).replace(
                "key = \"base-issuing\"\n",
                "key = \"base-issuing\"\nstage = true\n",
            ),
            Scenario::Crl => crl_script(&format!("c-crl-{run}")),
            Scenario::CrossSign => cross_sign_script(&format!("c-cross-{run}")),
            Scenario::Destruction => destruction::script(&run.to_string(), ""),
        }
    }

    /// Drives the whole ceremony; an error is where custodyd died.
    async fn drive(
        self,
        officers: &softhsm_tests::ceremony::Officers<'_>,
        script: &str,
        bundle: &str,
        shares: &std::collections::BTreeMap<String, String>,
    ) -> Result<custody_proto::v1::Ceremony, tonic::Status> {
        use custody_core::ceremony::components::kcv;
        match self {
            Scenario::Root
            | Scenario::Kek
            | Scenario::Intermediate
            | Scenario::Staged
            | Scenario::Crl => officers.run(script).await.map(|(done, _)| done),
            Scenario::CrossSign => officers
                .run_sending(script, outside_ca().to_vec())
                .await
                .map(|(done, _)| done),
            Scenario::Destruction => destruction::drive(officers, script).await,
            Scenario::Components => {
                let name = officers.start("alice", script, "").await?.name;
                officers.sign_in("alice", &name, script).await?;
                officers.sign_in("bob", &name, script).await?;
                for (i, officer) in ["alice", "bob", "carol"].iter().enumerate() {
                    let part = [u8::try_from(i + 1).unwrap() * 29; 32];
                    officers
                        .submit_component(
                            officer,
                            &name,
                            &hex::encode(part),
                            &hex::encode(kcv(&part)),
                        )
                        .await?;
                }
                let ceremony = officers.get("alice", &name).await?;
                let fingerprint = ceremony.fingerprint.map(|f| f.value).unwrap_or_default();
                officers
                    .confirm("alice", &name, script, &fingerprint)
                    .await?;
                officers.confirm("bob", &name, script, &fingerprint).await
            }
            Scenario::Drill => {
                let name = officers.start("alice", script, bundle).await?.name;
                officers.sign_in("alice", &name, script).await?;
                officers.sign_in("bob", &name, script).await?;
                officers
                    .submit_share("alice", &name, &shares["alice"])
                    .await?;
                officers.submit_share("bob", &name, &shares["bob"]).await
            }
        }
    }
}

/// An intermediate script: the rig's root `base-root` certifies
/// `base-issuing` for 10 days.
fn intermediate_script(id: &str) -> String {
    include_str!("../../deploy/ceremonies/intermediate.toml")
        .replace("\"demo-intermediate-2026\"", &format!("\"{id}\""))
        .replace("issuer = \"root-ca\"", "issuer = \"base-root\"")
        .replace("key = \"issuing-ca\"", "key = \"base-issuing\"")
        .replace("validity_days = 1825", "validity_days = 10")
}

/// The certificate of an outside CA (rcgen, a fresh P-256 key; one per
/// test process): what the cross-sign scenario re-issues under the rig's
/// root.
fn outside_ca() -> &'static [u8] {
    static MADE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    MADE.get_or_init(|| {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(
            rcgen::DnType::CountryName,
            rcgen::DnValue::PrintableString("DE".try_into().unwrap()),
        );
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Partner Demo");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Partner Root CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem().into_bytes()
    })
}

/// A cross-sign script: the rig's root `base-root` re-issues
/// [`outside_ca`] for 10 days.
fn cross_sign_script(id: &str) -> String {
    use sha2::Digest as _;
    include_str!("../../deploy/ceremonies/cross-sign.toml")
        .replace("\"demo-cross-sign-2026\"", &format!("\"{id}\""))
        .replace("issuer = \"root-ca\"", "issuer = \"base-root\"")
        .replace(
            &"0".repeat(64),
            &hex::encode(sha2::Sha256::digest(outside_ca())),
        )
        .replace("validity_days = 1825", "validity_days = 10")
}

/// A CRL script: the rig's root `base-root` (its certificate valid 30
/// days) signs a CRL current for 7 days.
fn crl_script(id: &str) -> String {
    include_str!("../../deploy/ceremonies/crl.toml")
        .replace("\"demo-crl-2026\"", &format!("\"{id}\""))
        .replace("issuer = \"root-ca\"", "issuer = \"base-root\"")
        .replace("next_update_days = 30", "next_update_days = 7")
}

/// The CRL number each completed crl ceremony's CRL carries, by ceremony.
static CRL_NUMBERS: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());

/// A crl ceremony's invariant: completed, its CRL verifies and carries a
/// number no CRL signed before it had, and higher than theirs (the runs
/// are in order), whatever crash and roll-back came in between.
async fn crl_number_invariant(
    officers: &softhsm_tests::ceremony::Officers<'_>,
    ceremony: &str,
    state: custody_proto::v1::CeremonyState,
) {
    use x509_parser::prelude::FromDer as _;
    if state != custody_proto::v1::CeremonyState::Completed {
        return;
    }
    let found = officers.get("alice", ceremony).await.unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(found.certificate_pem.as_bytes()).unwrap();
    let (_, crl) =
        x509_parser::revocation_list::CertificateRevocationList::from_der(&pem.contents).unwrap();
    let number = crl.crl_number().unwrap().clone();
    let mut seen = CRL_NUMBERS.lock().unwrap();
    if let Some((_, before)) = seen.iter().find(|(c, _)| c == ceremony) {
        assert_eq!(*before, number.to_string(), "{ceremony}'s CRL changed");
        return;
    }
    for (other, theirs) in seen.iter() {
        let theirs: x509_parser::num_bigint::BigUint = theirs.parse().unwrap();
        assert!(
            number > theirs,
            "{ceremony}'s CRL number {number} is not above {other}'s {theirs}"
        );
    }
    seen.push((ceremony.to_owned(), number.to_string()));
}

/// An intermediate ceremony's invariant: completed, the certified version
/// holds [its certificate, the root's]; otherwise not its certificate.
async fn chain_invariant(
    keys: &mut KeyServiceClient<tonic::transport::Channel>,
    officers: &softhsm_tests::ceremony::Officers<'_>,
    ceremony: &str,
    state: custody_proto::v1::CeremonyState,
) {
    use custody_proto::v1::GetKeyRequest;
    let Ok(found) = officers.get("alice", ceremony).await else {
        return;
    };
    let key = keys
        .get_key(GetKeyRequest {
            name: "keys/base-issuing".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let chain = &key.versions[0].certificate_chain_pem;
    if state == custody_proto::v1::CeremonyState::Completed {
        assert!(
            chain.len() == 2 && chain[0] == found.certificate_pem,
            "{ceremony} completed without its chain stored: {chain:?}"
        );
    } else {
        assert!(
            found.certificate_pem.is_empty() || chain.first() != Some(&found.certificate_pem),
            "{ceremony} is {state:?} but its certificate is stored"
        );
    }
}

/// After a staging run: `base-issuing` still signs with version 1, every
/// other version of it is pre-activation (a staged version is never made
/// usable by a crash) and there is at most one; the staged version holds
/// this ceremony's certificate exactly when it completed.
async fn staged_invariant(
    keys: &mut KeyServiceClient<tonic::transport::Channel>,
    officers: &softhsm_tests::ceremony::Officers<'_>,
    ceremony: &str,
    state: custody_proto::v1::CeremonyState,
) {
    use custody_proto::v1::{GetKeyRequest, KeyVersionState};
    let key = keys
        .get_key(GetKeyRequest {
            name: "keys/base-issuing".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(key.primary_version, 1, "{ceremony}");
    assert!(
        key.versions.len() <= 2,
        "{ceremony}: {} versions",
        key.versions.len()
    );
    for version in &key.versions[1..] {
        assert_eq!(
            version.state,
            KeyVersionState::PreActivation as i32,
            "{ceremony}: a staged version is not pre-activation"
        );
    }
    let Ok(found) = officers.get("alice", ceremony).await else {
        return;
    };
    let stored = key
        .versions
        .get(1)
        .and_then(|v| v.certificate_chain_pem.first())
        .is_some_and(|c| !found.certificate_pem.is_empty() && *c == found.certificate_pem);
    assert_eq!(
        stored,
        state == custody_proto::v1::CeremonyState::Completed,
        "{ceremony} is {state:?}; its certificate stored with the staged version: {stored}"
    );
}

/// Invariant checks that found the scratch token unreadable.
static SCRATCH_TOKEN_LOST: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The invariant after any crash and restart: the HSM holds exactly what
/// the registry and the ceremony journal account for (drift finds nothing,
/// and the scratch token is empty); a key whose ceremony did not complete is
/// neither registered nor on the token nor usable; one whose ceremony
/// completed signs. Returns the ceremony's state.
async fn ceremony_invariant(
    pki: &Pki,
    port: u16,
    officers: &softhsm_tests::ceremony::Officers<'_>,
    ceremony: &str,
    key: Option<&str>,
    token: &TestToken,
) -> custody_proto::v1::CeremonyState {
    use custody_proto::v1::{CeremonyState, CheckDriftRequest, GetKeyRequest};
    let operator = connect(pki, port, &pki.client("operator", &[Role::Operator]))
        .await
        .unwrap();
    let mut keys = KeyServiceClient::new(operator);
    let drift = keys
        .check_drift(CheckDriftRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        drift.findings.is_empty(),
        "{ceremony}: {:?}",
        drift.findings
    );
    let mut scratch = token.config(1);
    scratch.token = hsm_shim::TokenSelector::Label(softhsm_tests::service::SCRATCH_TOKEN.into());
    match hsm_shim::Hsm::open(scratch) {
        Ok(hsm) => {
            let left = hsm.run(|s| s.inventory()).await.unwrap();
            assert!(
                left.is_empty(),
                "{ceremony}: drill objects left on the scratch token: {left:?}"
            );
        }
        // SoftHSM2 rewrites a token's files in place: a kill at the wrong
        // moment can tear the scratch token itself. Counted, not hidden.
        Err(error) => {
            SCRATCH_TOKEN_LOST.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            eprintln!("{ceremony}: the scratch token cannot be opened: {error}");
        }
    }
    let state = match officers.get("alice", ceremony).await {
        Ok(found) => CeremonyState::try_from(found.state).unwrap(),
        // Killed before the ceremony was journaled.
        Err(status) if status.code() == tonic::Code::NotFound => CeremonyState::Unspecified,
        Err(status) => panic!("{ceremony}: {status}"),
    };
    if matches!(
        state,
        CeremonyState::Completed | CeremonyState::RolledBack | CeremonyState::Aborted
    ) {
        // Its transcript is whole and signed.
        let transcript = officers
            .client("alice")
            .get_transcript(custody_proto::v1::GetTranscriptRequest {
                name: ceremony.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let spki = custody_core::encoding::pem_to_der(&transcript.audit_key_pem).unwrap();
        custody_core::ceremony::transcript::Transcript::from_json(&transcript.json)
            .unwrap()
            .verify(&spki)
            .unwrap_or_else(|e| panic!("{ceremony}: transcript: {e}"));
    }
    if ceremony.starts_with("ceremonies/c-int-") {
        chain_invariant(&mut keys, officers, ceremony, state).await;
    }
    if ceremony.starts_with("ceremonies/c-stage-") {
        staged_invariant(&mut keys, officers, ceremony, state).await;
    }
    if ceremony.starts_with("ceremonies/c-crl-") {
        crl_number_invariant(officers, ceremony, state).await;
    }
    destruction::invariant(pki, port, token, ceremony, state).await;
    if let Some(key) = key {
        let registered = keys
            .get_key(GetKeyRequest {
                name: format!("keys/{key}"),
            })
            .await
            .is_ok();
        let completed = state == CeremonyState::Completed;
        assert_eq!(
            registered, completed,
            "{ceremony} is {state:?}, key registered: {registered}"
        );
        let signer = connect(pki, port, &pki.client("ca-issuing", &[Role::Signer]))
            .await
            .unwrap();
        let mut request = sign_request(1);
        request.name = format!("keys/{key}");
        let signed = SigningServiceClient::new(signer).sign(request).await;
        // Nobody signs with it directly: a key whose ceremony did not
        // complete is not there (NOT_FOUND), and a completed root key is
        // registered under the administrative quorum (QUORUM_REQUIRED).
        let answer = match &signed {
            Ok(_) => "a signature".to_owned(),
            Err(status) => format!(
                "{:?} {}",
                status.code(),
                softhsm_tests::service::reason(status)
            ),
        };
        let signing_key = key.starts_with("root-");
        let expected = if !completed {
            signed
                .as_ref()
                .is_err_and(|status| status.code() == tonic::Code::NotFound)
        } else if signing_key {
            signed
                .as_ref()
                .is_err_and(|status| softhsm_tests::service::reason(status) == "QUORUM_REQUIRED")
        } else {
            signed.is_err()
        };
        assert!(
            expected,
            "{ceremony} is {state:?}; signing with {key}: {answer}"
        );
    }
    state
}

/// The id of the ceremony a script opens.
fn ceremony_name(script: &str) -> String {
    let script = custody_core::ceremony::script::Script::parse(script).unwrap();
    format!("ceremonies/{}", script.id())
}

/// After the invariant held, an unfinished ceremony is aborted (and the
/// invariant checked again): a resumed ceremony must still undo cleanly.
/// After a restart: checks the invariant, then has the officers carry the
/// ceremony on from wherever it stands (signing in, collecting, entering
/// components or shares, confirming, as each state asks) until it completes
/// or is rolled back, and checks the invariant again. Panics on a ceremony
/// that stays stuck. Returns the state found after the restart and the
/// state the officers left it in.
async fn finish_off(
    rig: &CeremonyRig,
    officers: &softhsm_tests::ceremony::Officers<'_>,
    script: &str,
    key: Option<&str>,
    token: &TestToken,
) -> (
    custody_proto::v1::CeremonyState,
    custody_proto::v1::CeremonyState,
) {
    use custody_core::ceremony::components::kcv;
    use custody_proto::v1::CeremonyState as S;
    let name = ceremony_name(script);
    let found = ceremony_invariant(&rig.pki, rig.port, officers, &name, key, token).await;
    if found == S::Unspecified {
        return (found, found);
    }
    for _ in 0..12 {
        let ceremony = officers.get("alice", &name).await.unwrap();
        let state = S::try_from(ceremony.state).unwrap();
        // A step refused (a sign-in already present, a share collected
        // before the kill) is fine: what counts is where the ceremony ends.
        match state {
            S::Completed | S::RolledBack | S::Aborted => {
                ceremony_invariant(&rig.pki, rig.port, officers, &name, key, token).await;
                if state != S::Completed {
                    destruction::released(&rig.pki, rig.port, token, officers, &name).await;
                }
                return (found, state);
            }
            S::AwaitingOfficers => {
                for officer in ["alice", "bob"] {
                    let _ = officers.sign_in(officer, &name, script).await;
                }
            }
            S::AwaitingShareCollection => {
                for officer in ["alice", "bob", "carol"] {
                    let _ = officers.collect(officer, &name).await;
                }
            }
            S::AwaitingComponents => {
                for (i, officer) in ["alice", "bob", "carol"].iter().enumerate() {
                    let part = [u8::try_from(i + 1).unwrap() * 29; 32];
                    let _ = officers
                        .submit_component(
                            officer,
                            &name,
                            &hex::encode(part),
                            &hex::encode(kcv(&part)),
                        )
                        .await;
                }
            }
            S::AwaitingShares => {
                for officer in ["alice", "bob"] {
                    let _ = officers
                        .submit_share(officer, &name, &rig.shares[officer])
                        .await;
                }
            }
            S::AwaitingConfirmation => {
                let fingerprint = ceremony.fingerprint.map(|f| f.value).unwrap_or_default();
                for officer in ["alice", "bob"] {
                    let _ = officers.confirm(officer, &name, script, &fingerprint).await;
                }
            }
            S::Running | S::Unspecified => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let stuck = officers.get("alice", &name).await.unwrap();
    panic!(
        "{name} is stuck after a restart: found {found:?}, now {:?} waiting for {} ({})",
        S::try_from(stuck.state),
        stuck.waiting_for,
        stuck.error
    );
}

/// A daemon set up for the ceremony crash tests: officers, and a KEK
/// ceremony's shares and backup for the drills to restore.
struct CeremonyRig {
    port: u16,
    pki: Pki,
    config: PathBuf,
    keys: Vec<custody_core::dual_control::officer_key::OfficerKey>,
    bundle: String,
    shares: std::collections::BTreeMap<String, String>,
}

impl CeremonyRig {
    async fn new(token: &TestToken) -> CeremonyRig {
        use softhsm_tests::ceremony::{Officers, kek_script};
        let port = free_port();
        let (pki, config, keys) = prepare_ceremonies(token, port);
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(&destruction::lifecycle_section());
        std::fs::write(&config, text).unwrap();
        let mut daemon = spawn(&config);
        ready(&pki, port, &mut daemon).await;
        let officers = Officers::new(&keys, officer_channels(&pki, port).await);
        let (_, shares) = officers
            .run_backup_kek(&kek_script("c-base", "base-kek", false))
            .await
            .unwrap();
        let bundle = officers
            .approved_backup("alice", &["bob", "carol"])
            .await
            .unwrap();
        // What the intermediate scenario certifies: a root with its root
        // certificate, and an issuing key made with CreateKey.
        officers
            .run(&softhsm_tests::ceremony::root_script(
                "c-base-root",
                "base-root",
                true,
            ))
            .await
            .unwrap();
        let operator = connect(&pki, port, &pki.client("operator", &[Role::Operator]))
            .await
            .unwrap();
        softhsm_tests::service::create_key(&operator, "base-issuing", "EC_SIGN_P256_SHA256", None)
            .await;
        daemon.kill().unwrap();
        daemon.wait().unwrap();
        CeremonyRig {
            port,
            pki,
            config,
            keys,
            bundle,
            shares,
        }
    }

    /// The officers, connected to the daemon now running.
    async fn officers(&self) -> softhsm_tests::ceremony::Officers<'_> {
        softhsm_tests::ceremony::Officers::new(
            &self.keys,
            officer_channels(&self.pki, self.port).await,
        )
    }

    /// Starts custodyd again after a kill, checks the invariant for the
    /// ceremony `script` opened (the officers carrying it on if unfinished),
    /// stops it, and returns the state the ceremony was found in and the one
    /// it ended in.
    async fn restart_and_check(
        &self,
        token: &TestToken,
        script: &str,
        key: Option<&str>,
    ) -> (
        custody_proto::v1::CeremonyState,
        custody_proto::v1::CeremonyState,
    ) {
        let mut daemon = spawn(&self.config);
        ready(&self.pki, self.port, &mut daemon).await;
        let officers = self.officers().await;
        let states = finish_off(self, &officers, script, key, token).await;
        daemon.kill().unwrap();
        daemon.wait().unwrap();
        states
    }
}

token_test!(
    fn a_ceremony_killed_at_every_crash_point_rolls_back_or_completes_and_no_half_made_key_is_usable(token) {
        use custody_core::ceremonies::CRASH_POINTS;
        runtime().block_on(async {
            let rig = CeremonyRig::new(token).await;

            let mut outcomes: std::collections::BTreeMap<String, usize> = Default::default();
            // CUSTODY_CRASH_ONLY=destroy: only the points naming it (while
            // working on one ceremony; the count below says how many ran).
            let only = std::env::var("CUSTODY_CRASH_ONLY").unwrap_or_default();
            let mut covered = 0;
            for (run, point) in CRASH_POINTS.iter().enumerate() {
                if !point.contains(&only) {
                    continue;
                }
                covered += 1;
                let scenario = Scenario::passing(point);
                let script = scenario.script(run, &rig.bundle);
                let mut crashing = spawn_crashing_at(&rig.config, Some(point));
                ready(&rig.pki, rig.port, &mut crashing).await;
                let officers = rig.officers().await;
                if let Scenario::Destruction = scenario {
                    destruction::schedule(&rig.pki, rig.port, &officers, run).await;
                }
                let driven = scenario.drive(&officers, &script, &rig.bundle, &rig.shares).await;
                assert!(driven.is_err(), "{point}: the {scenario:?} ceremony never reached it");
                killed_at_crash_point(crashing, point).await;

                let key = scenario.key(run);
                let state = rig.restart_and_check(token, &script, key.as_deref()).await;
                destruction::check_end(point, state.1);
                *outcomes.entry(format!("{:?} → {:?}", state.0, state.1)).or_default() += 1;
            }
            println!(
                "ceremony crash points covered {covered}/{}; {covered} killed runs; states after restart → after the officers carried on: {outcomes:?}",
                CRASH_POINTS.len(),
            );
        });
    }
);

token_test!(
    fn a_ceremony_killed_at_its_quorum_completing_sign_in_carries_on_after_restart(token) {
        // The kill lands after bob's sign-in, which completes the quorum, is
        // journaled and audited, and before the HSM steps it sets off.
        // Safe: after the restart the ceremony is not stuck waiting for
        // officers who have all signed in; it carries on to the fingerprint,
        // the two confirm, and the key is registered and signs.
        use custody_proto::v1::CeremonyState;
        runtime().block_on(async {
            let rig = CeremonyRig::new(token).await;
            let script = Scenario::Root.script(0, &rig.bundle);
            let name = ceremony_name(&script);
            let point = "ceremony.sign_in.quorum_met";
            let mut crashing = spawn_crashing_at(&rig.config, Some(point));
            ready(&rig.pki, rig.port, &mut crashing).await;
            let officers = rig.officers().await;
            let driven = Scenario::Root.drive(&officers, &script, &rig.bundle, &rig.shares).await;
            assert!(driven.is_err(), "the ceremony never reached {point}");
            killed_at_crash_point(crashing, point).await;

            let mut daemon = spawn(&rig.config);
            ready(&rig.pki, rig.port, &mut daemon).await;
            let officers = rig.officers().await;
            let resumed = officers.get("alice", &name).await.unwrap();
            assert_eq!(
                resumed.state,
                CeremonyState::AwaitingConfirmation as i32,
                "after the restart the ceremony waits for: {} ({})",
                resumed.waiting_for,
                resumed.error
            );
            let fingerprint = resumed.fingerprint.map(|f| f.value).unwrap_or_default();
            officers.confirm("alice", &name, &script, &fingerprint).await.unwrap();
            let done = officers.confirm("bob", &name, &script, &fingerprint).await.unwrap();
            assert_eq!(done.state, CeremonyState::Completed as i32, "{}", done.error);
            let state = ceremony_invariant(&rig.pki, rig.port, &officers, &name, Scenario::Root.key(0).as_deref(), token).await;
            assert_eq!(state, CeremonyState::Completed);
            daemon.kill().unwrap();
            daemon.wait().unwrap();
        });
    }
);

token_test!(
    fn a_ceremony_rolled_back_after_sigterm_says_custodyd_was_stopped_not_that_it_crashed(token) {
        use custody_proto::v1::CeremonyState;
        runtime().block_on(async {
            let rig = CeremonyRig::new(token).await;
            let script = Scenario::Root.script(0, &rig.bundle);
            let name = ceremony_name(&script);
            let stop_at_confirmation = |mut daemon: Daemon, signal: &'static str| async move {
                let status = Command::new("kill").args([signal, &daemon.id().to_string()]).status().unwrap();
                assert!(status.success());
                tokio::task::spawn_blocking(move || daemon.wait().unwrap()).await.unwrap();
            };
            // Stopped by SIGTERM while waiting for the officers' confirmation
            // (the key exists on the token, so the restart rolls it back).
            let mut daemon = spawn(&rig.config);
            ready(&rig.pki, rig.port, &mut daemon).await;
            let officers = rig.officers().await;
            officers.start("alice", &script, "").await.unwrap();
            officers.sign_in("alice", &name, &script).await.unwrap();
            let waiting = officers.sign_in("bob", &name, &script).await.unwrap();
            assert_eq!(waiting.state, CeremonyState::AwaitingConfirmation as i32);
            stop_at_confirmation(daemon, "-TERM").await;

            let mut daemon = spawn(&rig.config);
            ready(&rig.pki, rig.port, &mut daemon).await;
            let officers = rig.officers().await;
            let after = officers.get("alice", &name).await.unwrap();
            assert_eq!(after.state, CeremonyState::RolledBack as i32);
            assert!(after.error.contains("custodyd was stopped"), "{}", after.error);
            let (entries, _) = audit_export(&rig.pki, rig.port).await;
            assert!(
                entries.iter().any(|e| e.contains("\"type\":\"daemon_stopped\"") && e.contains("SIGTERM")),
                "no record of the stop"
            );

            // The same, killed: the transcript says so.
            let script = Scenario::Root.script(1, &rig.bundle);
            let name = ceremony_name(&script);
            officers.start("alice", &script, "").await.unwrap();
            officers.sign_in("alice", &name, &script).await.unwrap();
            officers.sign_in("bob", &name, &script).await.unwrap();
            stop_at_confirmation(daemon, "-KILL").await;
            let mut daemon = spawn(&rig.config);
            ready(&rig.pki, rig.port, &mut daemon).await;
            let after = rig.officers().await.get("alice", &name).await.unwrap();
            assert_eq!(after.state, CeremonyState::RolledBack as i32);
            assert!(after.error.contains("crashed or was killed"), "{}", after.error);
            daemon.kill().unwrap();
            daemon.wait().unwrap();
        });
    }
);

token_test!(
    fn ceremonies_killed_at_random_moments_keep_the_hsm_and_the_journal_in_step(token) {
        // CUSTODY_KILL_RUNS=1000 for the figure in docs/assurance.md.
        let runs: usize = std::env::var("CUSTODY_KILL_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(24);
        let mut seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        println!("random kill seed {seed}");
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        runtime().block_on(async {
            let mut rig = CeremonyRig::new(token).await;

            let scenarios = [Scenario::Root, Scenario::Kek, Scenario::Components, Scenario::Drill];
            let mut outcomes: std::collections::BTreeMap<String, usize> = Default::default();
            let mut main_token_lost = Vec::new();
            for run in 0..runs {
                let scenario = scenarios[run % scenarios.len()];
                let script = scenario.script(1000 + run, &rig.bundle);
                let mut daemon = spawn(&rig.config);
                ready(&rig.pki, rig.port, &mut daemon).await;
                let officers = rig.officers().await;
                // kill -9 at a random moment while the ceremony runs.
                let delay = Duration::from_millis(next() % 450);
                let driving = scenario.drive(&officers, &script, &rig.bundle, &rig.shares);
                let _ = tokio::time::timeout(delay, driving).await;
                daemon.kill().unwrap();
                daemon.wait().unwrap();
                // SoftHSM2 rewrites its own token and object files in
                // place; a kill in the middle tears one, and the token (or
                // that object) is gone for every application (SoftHSM2's
                // durability, not custodyd's: there is nothing left to
                // check custodyd against). The run is counted apart, and
                // the loop goes on with a fresh token and data directory.
                if !softhsm_lists_token(token, token.label()) || !softhsm_reads_every_object(token) {
                    main_token_lost.push(run);
                    std::fs::remove_dir_all(rig.pki.dir.join("data")).unwrap();
                    token.reinitialise();
                    rig = CeremonyRig::new(token).await;
                    continue;
                }

                let key = scenario.key(1000 + run);
                let state = rig.restart_and_check(token, &script, key.as_deref()).await;
                *outcomes.entry(format!("{:?} → {:?}", state.0, state.1)).or_default() += 1;
            }
            let done: usize = outcomes.values().sum();
            assert_eq!(done + main_token_lost.len(), runs);
            // Torn SoftHSM2 files are rare (about 2 in 1,000 runs seen); many
            // would mean the check, not SoftHSM2, is wrong.
            assert!(
                main_token_lost.len() <= (runs / 10).max(2),
                "{} of {runs} runs counted as SoftHSM2 damage: {main_token_lost:?}",
                main_token_lost.len()
            );
            println!(
                "random SIGKILL runs: {done} of {runs}; 0 inconsistent, 0 stuck; states after restart → after the officers carried on: {outcomes:?}; scratch token unreadable in {} checks; {}",
                SCRATCH_TOKEN_LOST.load(std::sync::atomic::Ordering::Relaxed),
                if main_token_lost.is_empty() {
                    "main token kept".to_string()
                } else {
                    format!("SoftHSM2 tore its own main token or object files in {} runs (runs {main_token_lost:?}; each followed by a fresh token and data directory)", main_token_lost.len())
                }
            );
        });
    }
);
