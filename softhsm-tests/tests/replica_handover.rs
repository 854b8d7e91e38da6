//! Work that spans custodyd replicas, and what a replica that stops leaves
//! to the others: three processes on one real 3-member etcd cluster (mTLS)
//! and one SoftHSM2 token, driven over real gRPC with mTLS, each call to
//! whichever replica.
//!
//! What they must keep (threat model S11-S13): one ceremony call at a time
//! across the replicas, so that sign-ins racing on two replicas both count
//! and set the HSM steps off once; a ceremony's secrets stay in the memory
//! of the replica they entered, refused elsewhere while it runs, and are
//! settled as a restart would settle them once it is gone; a generation
//! a stopped replica left is rolled back by the others.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::time::Duration;

use custody_core::ceremony::components::kcv;
use custody_core::ceremony::transcript::Transcript;
use custody_core::dual_control::officer_key::OfficerKey;
use custody_core::identity::Role;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::{Ceremony, CeremonyState, CheckDriftRequest, GetTranscriptRequest};
use softhsm_tests::ceremony::{Officers, components_script, kek_script, root_script};
use softhsm_tests::etcd::Cluster;
use softhsm_tests::process::{
    audit_export, connect, free_port, officer_channels, prepare_ceremonies, ready, replica_config,
    spawn_crashing_at, verify_export,
};
use softhsm_tests::replicas::{Replicas, start_replicas_from};
use softhsm_tests::service::{reason, runtime, sign_sha256};
use softhsm_tests::{TestToken, token_test};

const CUSTODYD: &str = env!("CARGO_BIN_EXE_custodyd-under-test");

fn state(ceremony: &Ceremony) -> CeremonyState {
    CeremonyState::try_from(ceremony.state).unwrap()
}

/// Three replicas with officers alice, bob and carol (2 of 3), the SO PIN
/// and a schedule ticking every second (how soon the leader settles what
/// a stopped replica left).
async fn ceremony_replicas(
    token: &TestToken,
    cluster: &Cluster,
    count: usize,
) -> (Replicas, Vec<OfficerKey>) {
    let first_port = free_port();
    let (pki, first, keys) = prepare_ceremonies(token, first_port);
    let mut text = std::fs::read_to_string(&first).unwrap();
    text.push_str("[lifecycle]\nscheduler_interval_secs = 1\n");
    std::fs::write(&first, text).unwrap();
    let replicas = start_replicas_from(CUSTODYD, cluster, count, pki, first, first_port).await;
    (replicas, keys)
}

/// The officers' clients on each replica, in replica order.
async fn officers_on<'k>(replicas: &Replicas, keys: &'k [OfficerKey]) -> Vec<Officers<'k>> {
    let mut on = Vec::new();
    for &port in &replicas.ports {
        on.push(Officers::new(
            keys,
            officer_channels(&replicas.pki, port).await,
        ));
    }
    on
}

/// The steps of ceremony `name`'s transcript, which must verify.
async fn steps(officers: &Officers<'_>, name: &str) -> Vec<String> {
    let response = officers
        .client("carol")
        .get_transcript(GetTranscriptRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner();
    let transcript = Transcript::from_json(&response.json).unwrap();
    let spki = custody_core::encoding::pem_to_der(&response.audit_key_pem).unwrap();
    transcript.verify(&spki).unwrap();
    transcript.entries.into_iter().map(|e| e.step).collect()
}

/// Asked on replica `on`: the token holds nothing that no registry entry,
/// generation or ceremony in flight accounts for (drift), and the merged
/// audit log is one chain.
async fn nothing_unaccounted_and_one_chain(replicas: &Replicas, on: usize) {
    let pki = &replicas.pki;
    let operator = connect(
        pki,
        replicas.ports[on],
        &pki.client("operator", &[Role::Operator]),
    )
    .await
    .unwrap();
    let drift = KeyServiceClient::new(operator)
        .check_drift(CheckDriftRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(drift.findings.is_empty(), "{:?}", drift.findings);
    let (_, text) = audit_export(pki, replicas.ports[on]).await;
    assert_eq!(verify_export(&text).first_bad, None);
}

fn count(steps: &[String], step: &str) -> usize {
    steps.iter().filter(|s| *s == step).count()
}

token_test!(
    fn sign_ins_and_confirmations_racing_on_two_replicas_all_count_and_the_key_is_made_once(token) {
        let cluster = Cluster::start(3);
        runtime().block_on(async {
            let (replicas, keys) = ceremony_replicas(token, &cluster, 3).await;
            let officers = officers_on(&replicas, &keys).await;
            for round in 0..4 {
                let key = format!("root-{round}");
                let script = root_script(&format!("root-{round}"), &key, false);
                let name = officers[0].start("alice", &script, "").await.unwrap().name;
                // The quorum is 2: whichever sign-in lands second sets the
                // HSM steps off, on its own replica, and only it.
                let (alice, bob) = tokio::join!(
                    officers[1].sign_in("alice", &name, &script),
                    officers[2].sign_in("bob", &name, &script),
                );
                alice.unwrap();
                bob.unwrap();
                let ceremony = officers[0].get("carol", &name).await.unwrap();
                assert_eq!(
                    state(&ceremony),
                    CeremonyState::AwaitingConfirmation,
                    "both sign-ins count and the key was made: {ceremony:?}"
                );
                let fingerprint = ceremony.fingerprint.unwrap().value;
                let (alice, bob) = tokio::join!(
                    officers[2].confirm("alice", &name, &script, &fingerprint),
                    officers[0].confirm("bob", &name, &script, &fingerprint),
                );
                alice.unwrap();
                bob.unwrap();
                let done = officers[1].get("carol", &name).await.unwrap();
                assert_eq!(state(&done), CeremonyState::Completed, "{done:?}");
                let steps = steps(&officers[1], &name).await;
                assert_eq!(count(&steps, "sign-in"), 2, "{steps:?}");
                assert_eq!(count(&steps, "generate"), 1, "one key made: {steps:?}");
                assert_eq!(count(&steps, "confirm"), 2, "{steps:?}");
                // Every replica knows the key, whichever made it, and keeps
                // its protection: a direct signature needs the quorum.
                for &port in &replicas.ports {
                    let signer = connect(&replicas.pki, port, &replicas.pki.client("ca-issuing", &[Role::Signer]))
                        .await
                        .unwrap();
                    let refused = sign_sha256(&signer, &format!("{key}/versions/1"), b"made in a ceremony")
                        .await
                        .unwrap_err();
                    assert_eq!(reason(&refused), "QUORUM_REQUIRED", "{refused:?}");
                }
            }
            // A second key made by a racing sign-in would show in drift.
            nothing_unaccounted_and_one_chain(&replicas, 0).await;
        });
    }
);

/// Polls (bounded) until `attempt` is not refused with SECRETS_ELSEWHERE:
/// the stopped replica's claim lapses within its lease.
async fn once_settled<T, F, Fut>(mut attempt: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    for _ in 0..120 {
        match attempt().await {
            Err(status) if reason(&status) == "SECRETS_ELSEWHERE" => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => return other,
        }
    }
    panic!("the stopped replica's secrets were never settled");
}

token_test!(
    fn secrets_stay_on_the_replica_they_entered_and_are_settled_when_it_stops(token) {
        let cluster = Cluster::start(3);
        runtime().block_on(async {
            let (mut replicas, keys) = ceremony_replicas(token, &cluster, 3).await;
            let officers = officers_on(&replicas, &keys).await;

            // Components: alice enters hers on r0, so r0 holds it.
            let parts_script = components_script("kek-parts", "partner-kek");
            let parts = officers[0].start("alice", &parts_script, "").await.unwrap().name;
            officers[0].sign_in("alice", &parts, &parts_script).await.unwrap();
            officers[1].sign_in("bob", &parts, &parts_script).await.unwrap();
            let values: Vec<[u8; 32]> = [0x11u8, 0x22, 0x44].iter().map(|b| [*b; 32]).collect();
            let enter = |on: usize, officer: &'static str, part: [u8; 32]| {
                let officers = &officers;
                let parts = parts.clone();
                async move {
                    officers[on]
                        .submit_component(officer, &parts, &hex::encode(part), &hex::encode(kcv(&part)))
                        .await
                }
            };
            enter(0, "alice", values[0]).await.unwrap();
            // Another replica does not have it: bob's would make a key
            // from the components it holds, without alice's.
            let refused = enter(1, "bob", values[1]).await.unwrap_err();
            assert_eq!(reason(&refused), "SECRETS_ELSEWHERE", "{refused:?}");
            assert!(refused.message().contains("r0"), "names the replica: {}", refused.message());

            // Shares of a new backup KEK: made on r2 (bob's sign-in meets
            // the quorum there), collected only there.
            let kek_script = kek_script("kek-shares", "shared-kek", false);
            let shares = officers[0].start("alice", &kek_script, "").await.unwrap().name;
            officers[0].sign_in("alice", &shares, &kek_script).await.unwrap();
            let made = officers[2].sign_in("bob", &shares, &kek_script).await.unwrap();
            assert_eq!(state(&made), CeremonyState::AwaitingShareCollection);
            let refused = officers[1].collect("carol", &shares).await.unwrap_err();
            assert_eq!(reason(&refused), "SECRETS_ELSEWHERE", "{refused:?}");
            officers[2].collect("carol", &shares).await.unwrap();
            // Nor does an officer abort it elsewhere, which would leave the
            // shares in r2's memory.
            let refused = officers[0]
                .client("alice")
                .abort_ceremony(custody_proto::v1::AbortCeremonyRequest {
                    name: shares.clone(),
                    reason: "test".into(),
                })
                .await
                .unwrap_err();
            assert_eq!(reason(&refused), "SECRETS_ELSEWHERE", "{refused:?}");

            // r0 and r2 die with what they held.
            for i in [0, 2] {
                replicas.daemons[i].kill().unwrap();
                replicas.daemons[i].wait().unwrap();
            }
            // Alice's component went with r0: once r0's claim lapses, r1
            // takes bob's and asks for alice's again.
            let after = once_settled(|| enter(1, "bob", values[1])).await.unwrap();
            assert_eq!(state(&after), CeremonyState::AwaitingComponents);
            enter(1, "alice", values[0]).await.unwrap();
            enter(1, "carol", values[2]).await.unwrap();
            let ceremony = officers[1].get("carol", &parts).await.unwrap();
            assert_eq!(state(&ceremony), CeremonyState::AwaitingConfirmation);
            let mut key = [0u8; 32];
            for part in &values {
                for (k, p) in key.iter_mut().zip(part) {
                    *k ^= p;
                }
            }
            let fingerprint = ceremony.fingerprint.unwrap().value;
            assert_eq!(fingerprint, kcv(&key).to_vec(), "the KEK is the XOR of all three");
            officers[1].confirm("alice", &parts, &parts_script, &fingerprint).await.unwrap();
            let done = officers[1].confirm("bob", &parts, &parts_script, &fingerprint).await.unwrap();
            assert_eq!(state(&done), CeremonyState::Completed, "{done:?}");
            let steps = steps(&officers[1], &parts).await;
            assert_eq!(count(&steps, "resumed"), 1, "{steps:?}");

            // The shares not yet collected went with r2: the leader (r1,
            // the one left) rolls the ceremony back and destroys its KEK.
            let mut rolled_back = None;
            for _ in 0..120 {
                let ceremony = officers[1].get("carol", &shares).await.unwrap();
                if state(&ceremony) == CeremonyState::RolledBack {
                    rolled_back = Some(ceremony);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let rolled_back = rolled_back.expect("the leader rolled the ceremony back");
            assert!(rolled_back.error.contains("replica r2 stopped"), "{}", rolled_back.error);
            // The KEK went with the roll-back.
            nothing_unaccounted_and_one_chain(&replicas, 1).await;
        });
    }
);

token_test!(
    fn a_generation_a_stopped_replica_left_is_rolled_back_by_the_others(token) {
        let cluster = Cluster::start(3);
        runtime().block_on(async {
            let (replicas, _) = ceremony_replicas(token, &cluster, 2).await;
            let pki = &replicas.pki;
            // A third replica that dies (SIGKILL) right after the HSM made
            // a new key, before the registry has it.
            let port = free_port();
            let config = replica_config(&replicas.base, port, "r2", &cluster.store_section("r2", None));
            let mut dying = spawn_crashing_at(
                std::process::Command::new(CUSTODYD),
                &config,
                Some("version.after_generate"),
            );
            ready(pki, port, &mut dying).await;
            let operator = connect(pki, port, &pki.client("operator", &[Role::Operator])).await.unwrap();
            let create = custody_proto::v1::CreateKeyRequest {
                key_id: "orphan".into(),
                algorithm: custody_proto::v1::Algorithm::EcSignP256Sha256 as i32,
                purpose: custody_proto::v1::KeyPurpose::AsymmetricSign as i32,
                allowed_signers: vec!["ca-issuing".into()],
                ..Default::default()
            };
            KeyServiceClient::new(operator).create_key(create.clone()).await.unwrap_err();
            assert!(!dying.wait().unwrap().success(), "r2 died at the crash point");
            // What a kill inside C_GenerateKeyPair tears: an object with
            // neither label nor id (SoftHSM2 makes the object, then writes
            // its template). r2, restarted, would find nothing left to roll
            // back; the replica that rolls r2's work back sweeps it.
            let torn = token.scratch().join("torn");
            std::fs::write(&torn, b"torn").unwrap();
            let written = token
                .pkcs11_tool()
                .args(["--write-object", softhsm_tests::pkcs11_module::path_str(&torn), "--type", "data"])
                .output()
                .unwrap();
            softhsm_tests::assert_success("pkcs11-tool --write-object", &written);

            // The others roll it back once r2's claim lapses: its object
            // destroyed, the entry gone, audited.
            let survivor = connect(pki, replicas.ports[0], &pki.client("operator", &[Role::Operator])).await.unwrap();
            let mut rolled_back = false;
            for _ in 0..120 {
                let (entries, _) = audit_export(pki, replicas.ports[1]).await;
                if entries.iter().any(|e| {
                    e.contains("RollBackVersion") && e.contains("keys/orphan/versions/1")
                        && e.contains("the stop of the process making it")
                }) {
                    rolled_back = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            assert!(rolled_back, "a surviving replica rolled the generation back");
            // The same tick sweeps, after the roll-back (bounded wait).
            let mut swept = false;
            for _ in 0..120 {
                let (entries, _) = audit_export(pki, replicas.ports[1]).await;
                if entries.iter().any(|e| e.contains("SweepTornObjects") && e.contains("destroyed 1 objects")) {
                    swept = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            assert!(swept, "the torn object was swept");
            nothing_unaccounted_and_one_chain(&replicas, 0).await;
            // The id is free again: made anew, it signs.
            KeyServiceClient::new(survivor).create_key(create).await.unwrap();
            let signer = connect(pki, replicas.ports[1], &pki.client("ca-issuing", &[Role::Signer])).await.unwrap();
            sign_sha256(&signer, "orphan", b"after the roll-back").await.unwrap();
        });
    }
);

/// Threat model S13: a replica stalled (SIGSTOP at the stop point) after
/// journaling version 2 of `k`; the others roll its generation back once
/// its claim lapses, and (with `rotate_meanwhile`) a rotation there makes
/// version 2 again, under the same label. The stalled replica, continued,
/// makes its key or finds the label taken, and rolls its own generation
/// back: what it destroys must be its own (the objects it made, which
/// nobody else would clean up), never the version made since.
async fn a_stalled_generation_goes_on(token: &TestToken, rotate_meanwhile: bool) {
    let cluster = Cluster::start(3);
    let (replicas, _) = ceremony_replicas(token, &cluster, 2).await;
    let pki = &replicas.pki;
    let operator = connect(
        pki,
        replicas.ports[0],
        &pki.client("operator", &[Role::Operator]),
    )
    .await
    .unwrap();
    let create = custody_proto::v1::CreateKeyRequest {
        key_id: "k".into(),
        algorithm: custody_proto::v1::Algorithm::EcSignP256Sha256 as i32,
        purpose: custody_proto::v1::KeyPurpose::AsymmetricSign as i32,
        allowed_signers: vec!["ca-issuing".into()],
        ..Default::default()
    };
    KeyServiceClient::new(operator.clone())
        .create_key(create)
        .await
        .unwrap();

    let port = free_port();
    let config = replica_config(
        &replicas.base,
        port,
        "r2",
        &cluster.store_section("r2", None),
    );
    let mut command = std::process::Command::new(CUSTODYD);
    command.env("CUSTODY_STOP_AT", "version.after_journal");
    let mut stalled = spawn_crashing_at(command, &config, None);
    ready(pki, port, &mut stalled).await;
    let stalled_operator = connect(pki, port, &pki.client("operator", &[Role::Operator]))
        .await
        .unwrap();
    let rotation = tokio::spawn(async move {
        KeyServiceClient::new(stalled_operator)
            .rotate_key(custody_proto::v1::RotateKeyRequest {
                name: "keys/k".into(),
                ..Default::default()
            })
            .await
    });
    // Its generation rolled back by the others once its claim lapses.
    let mut rolled_back = false;
    for _ in 0..240 {
        let (entries, _) = audit_export(pki, replicas.ports[1]).await;
        if entries
            .iter()
            .any(|e| e.contains("RollBackVersion") && e.contains("keys/k/versions/2"))
        {
            rolled_back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(rolled_back, "the others rolled the stalled generation back");
    let rotate = || async {
        KeyServiceClient::new(operator.clone())
            .rotate_key(custody_proto::v1::RotateKeyRequest {
                name: "keys/k".into(),
                ..Default::default()
            })
            .await
    };
    let signer = connect(
        pki,
        replicas.ports[0],
        &pki.client("ca-issuing", &[Role::Signer]),
    )
    .await
    .unwrap();
    if rotate_meanwhile {
        // Version 2 made again, here, and it signs.
        assert_eq!(rotate().await.unwrap().into_inner().primary_version, 2);
        sign_sha256(&signer, "k", b"version 2").await.unwrap();
    }

    // The stalled replica goes on, and its rotation fails.
    softhsm_tests::process::go_on(stalled.id());
    let answer = tokio::time::timeout(Duration::from_secs(120), rotation)
        .await
        .expect("the continued replica answers its rotation")
        .unwrap();
    assert!(
        answer.is_err(),
        "the stalled rotation was rolled back, it cannot succeed: {answer:?}"
    );
    if !rotate_meanwhile {
        // What it made under the label is gone with it: version 2 can be
        // made here now.
        let rotated = rotate().await;
        assert!(
            rotated.is_ok(),
            "the stalled generation's objects were left under the label: {rotated:?}"
        );
    }
    let signed = sign_sha256(&signer, "k", b"after the stalled replica went on").await;
    assert!(
        signed.is_ok(),
        "version 2, made after the stalled generation was rolled back, was destroyed by it: {signed:?}"
    );
    nothing_unaccounted_and_one_chain(&replicas, 0).await;
    let _ = stalled.kill();
    let _ = stalled.wait();
}

token_test!(
    fn a_stalled_replica_that_wakes_after_its_generation_was_rolled_back_destroys_nothing_made_since(token) {
        runtime().block_on(a_stalled_generation_goes_on(token, true));
    }
);

token_test!(
    fn a_stalled_replica_that_wakes_after_its_generation_was_rolled_back_cleans_up_what_it_made(token) {
        runtime().block_on(a_stalled_generation_goes_on(token, false));
    }
);

token_test!(
    fn start_up_recovery_waits_for_the_ceremony_engines_lock(token) {
        // Threat model S11: every ceremony write runs under the engine's
        // lock. A replica that starts alone runs start-up recovery; another
        // that starts just after its "am I alone" check serves at once, and
        // may be in the middle of a ceremony call (holding the lock) while
        // the first still recovers. The test stands for that second
        // replica: it holds `lock/ceremonies` while r0 restarts alone.
        let cluster = Cluster::start(3);
        runtime().block_on(async {
            let (mut replicas, keys) = ceremony_replicas(token, &cluster, 1).await;
            let officers = officers_on(&replicas, &keys).await;
            // A root key made and waiting for confirmations: start-up
            // recovery rolls such a ceremony back, destroying the key.
            let script = root_script("root-held", "root-held", false);
            let name = officers[0].start("alice", &script, "").await.unwrap().name;
            officers[0].sign_in("alice", &name, &script).await.unwrap();
            let made = officers[0].sign_in("bob", &name, &script).await.unwrap();
            assert_eq!(state(&made), CeremonyState::AwaitingConfirmation);
            replicas.daemons[0].kill().unwrap();
            replicas.daemons[0].wait().unwrap();

            let store = custody_store::Store::open_etcd(&cluster.config("custody/")).unwrap();
            for _ in 0..120 {
                if store.holders("replica/").unwrap().is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            assert!(store.holders("replica/").unwrap().is_empty(), "r0's claim lapsed");
            let held = store
                .claim("lock/ceremonies", "r1", Duration::from_secs(10))
                .unwrap();

            // r0 starts again, alone.
            let mut restarted = softhsm_tests::process::spawn(CUSTODYD, &replicas.configs[0]);
            let pki = &replicas.pki;
            let operator = pki.client("operator", &[Role::Operator]);
            let mut served = false;
            for _ in 0..20 {
                assert!(restarted.try_wait().unwrap().is_none(), "r0 exited");
                if let Ok(channel) = connect(pki, replicas.ports[0], &operator).await {
                    if KeyServiceClient::new(channel)
                        .list_keys(custody_proto::v1::ListKeysRequest::default())
                        .await
                        .is_ok()
                    {
                        served = true;
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            if served {
                // r0 finished its recovery while another held the lock:
                // what it did must not include a ceremony write.
                let officers = officers_on(&replicas, &keys).await;
                let found = officers[0].get("carol", &name).await.unwrap();
                assert_eq!(
                    state(&found),
                    CeremonyState::AwaitingConfirmation,
                    "start-up recovery wrote the ceremony (and destroyed its key) while another replica held the engine's lock: {found:?}"
                );
            }
            assert!(!served, "r0 served before the lock was free");
            // Once the lock is free, recovery runs and r0 serves.
            drop(held);
            ready(pki, replicas.ports[0], &mut restarted).await;
            let officers = officers_on(&replicas, &keys).await;
            let found = officers[0].get("carol", &name).await.unwrap();
            assert_eq!(state(&found), CeremonyState::RolledBack, "{found:?}");
        });
    }
);

/// Threat model S14. r0 leads the schedule; its scheduler finds
/// keys/k/versions/1 due and stops (SIGSTOP) at `stop_at`, before the HSM
/// call, past its leases. The operator then cancels the destruction on r1.
/// Before the version is marked as being destroyed (`after_mark` false)
/// the cancel lands and r0, continued, destroys nothing; after the mark it
/// is refused, and r2, started then and leading once r0's lease lapses
/// (r0 never acting again), finishes the destruction.
async fn a_stalled_leader_with_a_due_destruction(token: &TestToken, after_mark: bool) {
    use custody_proto::v1::{
        GetKeyRequest, KeyVersionState, OperationState, RotateKeyRequest,
        SetKeyVersionStateRequest, VersionRef, operation_spec,
    };
    let cluster = Cluster::start(3);
    let first_port = free_port();
    let (pki, first, keys) = prepare_ceremonies(token, first_port);
    let mut text = std::fs::read_to_string(&first).unwrap();
    text.push_str("[lifecycle]\nscheduler_interval_secs = 1\ndestroy_cancel_window_secs = 1\n");
    std::fs::write(&first, text).unwrap();
    // r0 starts first and alone, so it leads.
    let config = replica_config(&first, first_port, "r0", &cluster.store_section("r0", None));
    let mut command = std::process::Command::new(CUSTODYD);
    let stop_at = if after_mark {
        "destroy.after_mark"
    } else {
        "destroy.after_due_check"
    };
    command.env("CUSTODY_STOP_AT", stop_at);
    let mut leader = spawn_crashing_at(command, &config, None);
    ready(&pki, first_port, &mut leader).await;
    // r1 never ticks within the test, so it never leads: what happens to
    // the version is r0's doing (and, after the mark, r2's).
    let port = free_port();
    let config = replica_config(&first, port, "r1", &cluster.store_section("r1", None));
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("scheduler_interval_secs = 1\n"), "{text}");
    std::fs::write(
        &config,
        text.replace(
            "scheduler_interval_secs = 1\n",
            "scheduler_interval_secs = 3600\n",
        ),
    )
    .unwrap();
    let mut other = softhsm_tests::process::spawn(CUSTODYD, &config);
    let operator = ready(&pki, port, &mut other).await;

    // keys/k version 1, retired; its destruction approved on r1.
    let mut key_service = KeyServiceClient::new(operator.clone());
    key_service
        .create_key(custody_proto::v1::CreateKeyRequest {
            key_id: "k".into(),
            algorithm: custody_proto::v1::Algorithm::EcSignP256Sha256 as i32,
            purpose: custody_proto::v1::KeyPurpose::AsymmetricSign as i32,
            allowed_signers: vec!["ca-issuing".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    key_service
        .rotate_key(RotateKeyRequest {
            name: "keys/k".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    key_service
        .set_key_version_state(SetKeyVersionStateRequest {
            name: "keys/k/versions/1".into(),
            state: KeyVersionState::Deactivated as i32,
            reason: String::new(),
        })
        .await
        .unwrap();
    let officers = Officers::new(&keys, officer_channels(&pki, port).await);
    let asked = softhsm_tests::service::request_operation(
        &operator,
        operation_spec::Spec::DestroyVersion(VersionRef {
            name: "keys/k/versions/1".into(),
        }),
    )
    .await
    .unwrap();
    let approved = officers
        .approve_in_turn(asked, &["alice", "bob"])
        .await
        .unwrap();
    assert_eq!(
        approved.state,
        OperationState::Succeeded as i32,
        "{}",
        approved.error
    );

    // r0 finds it due and stops; the operator cancels on r1, retried
    // while r0's hold on the key lives.
    softhsm_tests::process::stopped(leader.id()).await;
    let mut cancel = None;
    for _ in 0..120 {
        match key_service
            .cancel_destroy(VersionRef {
                name: "keys/k/versions/1".into(),
            })
            .await
        {
            Err(status) if status.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            answer => {
                cancel = Some(answer);
                break;
            }
        }
    }
    let cancel = cancel.expect("the cancel never got the key's lock");
    let version_state = || {
        let mut key_service = key_service.clone();
        async move {
            key_service
                .get_key(GetKeyRequest {
                    name: "keys/k".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .versions[0]
                .state
        }
    };

    if after_mark {
        // Decided: the cancel is refused, and r2, started now, leads once
        // r0's lease lapses and finishes the destruction.
        let refused = cancel.unwrap_err();
        assert_eq!(reason(&refused), "ALREADY_DESTROYED", "{refused:?}");
        assert!(
            refused.message().contains("began at"),
            "{}",
            refused.message()
        );
        // r0 never acts again. It is killed rather than left stopped: a
        // process stopped inside a SoftHSM2 call keeps the token's file
        // locks, and every other process on the token would wait on them
        // (an HSM shared over the network has no such locks).
        let _ = leader.kill();
        let _ = leader.wait();
        let r2_port = free_port();
        let config = replica_config(&first, r2_port, "r2", &cluster.store_section("r2", None));
        let mut finisher = softhsm_tests::process::spawn(CUSTODYD, &config);
        ready(&pki, r2_port, &mut finisher).await;
        let mut destroyed = false;
        for _ in 0..240 {
            if version_state().await == KeyVersionState::Destroyed as i32 {
                destroyed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(
            destroyed,
            "the next leader never finished the destruction r0 began"
        );
    } else {
        cancel.expect("the cancel lands before the version is marked");
        // r0 goes on; its scheduled destruction ends one way or another.
        softhsm_tests::process::go_on(leader.id());
        let mut ended = false;
        for _ in 0..240 {
            let (entries, _) = audit_export(&pki, port).await;
            if entries.iter().any(|e| {
                e.contains("ScheduledDestroy")
                    && e.contains("keys/k/versions/1")
                    && !e.contains("requested")
            }) || leader.try_wait().unwrap().is_some()
            {
                ended = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(ended, "the continued leader's destruction never ended");
        assert_eq!(version_state().await, KeyVersionState::Deactivated as i32);
    }
    // The registry and the HSM agree: the cancelled version's object is
    // still there, the destroyed one's is gone.
    let report = key_service
        .check_drift(CheckDriftRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        report.findings.is_empty(),
        "the registry and the HSM disagree after the stalled leader: {:?}",
        report.findings
    );
    let _ = leader.kill();
    let _ = leader.wait();
}

token_test!(
    fn a_stalled_leader_destroys_nothing_whose_destruction_was_cancelled_meanwhile(token) {
        runtime().block_on(a_stalled_leader_with_a_due_destruction(token, false));
    }
);

token_test!(
    fn a_destruction_a_stalled_leader_began_is_not_cancelled_and_the_next_leader_finishes_it(token) {
        runtime().block_on(a_stalled_leader_with_a_due_destruction(token, true));
    }
);
