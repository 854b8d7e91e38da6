//! custodyd replicas: three processes on one real 3-member etcd cluster
//! (mTLS) and one SoftHSM2 token, reached over real gRPC with mTLS.
//!
//! What they must keep (threat model S1-S7): a key made on one replica
//! signs on the others; the audit log stays one chain whichever replica
//! writes, each record naming its writer; a replica id is held by one
//! process at a time; a store that cannot be reached stops the start with
//! a message naming it.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use custody_core::audit::Entry;
use custody_core::dual_control::approval_message;
use custody_core::dual_control::officer_key::OfficerKey;
use custody_core::identity::Role;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::operation_service_client::OperationServiceClient;
use custody_proto::v1::{
    CheckDriftRequest, GetKeyRequest, GetOperationRequest, KeyRef, Operation, OperationKind,
    OperationState, SetPolicySpec, VoteRequest, operation_spec,
};
use softhsm_tests::etcd::Cluster;
use softhsm_tests::process::{
    Daemon, audit_export, connect, free_port, prepare, prepare_ceremonies, ready, spawn,
    verify_export,
};
use softhsm_tests::replicas::{Replicas, start_replicas, start_replicas_from};
use softhsm_tests::service::{create_key, reason, request_operation, sign_sha256};
use softhsm_tests::token_test;

const CUSTODYD: &str = env!("CARGO_BIN_EXE_custodyd-under-test");

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// What a custodyd that fails to start prints, once it has exited.
fn failed_start(config: &Path) -> String {
    let output = Command::new(CUSTODYD).arg(config).output().unwrap();
    assert!(!output.status.success(), "custodyd started");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

token_test!(
    fn a_key_made_on_one_replica_signs_on_every_replica_and_the_log_stays_one_chain(token) {
        let cluster = Cluster::start(3);
        runtime().block_on(async {
            let replicas = start_replicas(CUSTODYD, token, &cluster, 3).await;
            let pki = &replicas.pki;
            let operator = connect(pki, replicas.ports[0], &pki.client("operator", &[Role::Operator]))
                .await
                .unwrap();
            create_key(&operator, "shared", "EC_SIGN_P256_SHA256", None).await;
            // Every replica signs with it at once, the one that made it too.
            let mut signers = Vec::new();
            for &port in &replicas.ports {
                let channel = connect(pki, port, &pki.client("ca-issuing", &[Role::Signer])).await.unwrap();
                signers.push(tokio::spawn(async move {
                    for n in 0..40u32 {
                        sign_sha256(&channel, "shared", &n.to_be_bytes()).await.unwrap();
                    }
                }));
            }
            for signer in signers {
                signer.await.unwrap();
            }
            // One chain, read through any replica, naming every writer.
            let (entries, text) = audit_export(pki, replicas.ports[2]).await;
            let report = verify_export(&text);
            assert_eq!(report.first_bad, None, "the merged chain verifies");
            let mut signed_by = std::collections::BTreeMap::<String, u32>::new();
            for entry in &entries {
                let entry: Entry = serde_json::from_str(entry).unwrap();
                let replica = entry.replica.clone().expect("every record names its replica");
                if matches!(&entry.event, custody_core::audit::Event::Request { method, outcome, .. }
                    if method == "Sign" && outcome == "ok")
                {
                    *signed_by.entry(replica).or_default() += 1;
                }
            }
            assert_eq!(
                signed_by,
                [("r0".to_string(), 40), ("r1".to_string(), 40), ("r2".to_string(), 40)].into(),
                "each replica's acknowledged signatures are in the log under its name"
            );
            drop(replicas);
        });
    }
);

token_test!(
    fn a_replica_id_is_held_by_one_custodyd_and_an_unreachable_store_stops_the_start(token) {
        let cluster = Cluster::start(3);
        runtime().block_on(async {
            let replicas = start_replicas(CUSTODYD, token, &cluster, 1).await;
            // A second process under the same id is refused, naming the holder.
            let twin = softhsm_tests::process::replica_config(
                &replicas.base,
                free_port(),
                "twin",
                &cluster.store_section("r0", None),
            );
            let refused = failed_start(&twin);
            assert!(refused.contains("replica_id \"r0\" is in use by another custodyd"), "{refused}");
            // A store nobody answers on: refused, naming where it looked.
            let nowhere = format!("https://127.0.0.1:{}", free_port());
            let lost = softhsm_tests::process::replica_config(
                &replicas.base,
                free_port(),
                "lost",
                &cluster.store_section("lost", None).replace(
                    &format!("{:?}", cluster.endpoints()[0]),
                    &format!("{nowhere:?}"),
                ).lines().map(|line| if line.starts_with("endpoints") {
                    format!("endpoints = [{nowhere:?}]")
                } else {
                    line.to_string()
                }).collect::<Vec<_>>().join("\n"),
            );
            let unreachable = failed_start(&lost);
            assert!(unreachable.contains(&nowhere) && unreachable.contains("unavailable"), "{unreachable}");
            drop(replicas);
        });
    }
);

/// Officer `key`'s approval of `operation`.
fn approval(key: &OfficerKey, officer: &str, operation: &Operation) -> VoteRequest {
    let digest: [u8; 32] = operation.digest.clone().try_into().unwrap();
    VoteRequest {
        name: operation.name.clone(),
        officer_id: officer.into(),
        signature: key.sign(&approval_message(&digest)).to_vec(),
    }
}

/// Makes key `rotated` and puts its rotation under 2 of alice, bob and
/// carol, set by the administrative quorum: `approvers` (officer, key and
/// channel, on any replica) approve in turn, the last completing it.
async fn rotated_under_quorum(
    operator: &tonic::transport::Channel,
    approvers: &[(&str, &OfficerKey, tonic::transport::Channel)],
) {
    create_key(operator, "rotated", "EC_SIGN_P256_SHA256", None).await;
    let policy = request_operation(
        operator,
        operation_spec::Spec::SetPolicy(SetPolicySpec {
            name: "keys/rotated".into(),
            operation: OperationKind::Rotate as i32,
            officers: vec!["alice".into(), "bob".into(), "carol".into()],
            required: 2,
        }),
    )
    .await
    .unwrap();
    let mut last = None;
    for (officer, key, channel) in approvers {
        let vote = OperationServiceClient::new(channel.clone())
            .approve_operation(approval(key, officer, &policy))
            .await
            .unwrap()
            .into_inner();
        last = Some(vote);
    }
    let last = last.unwrap();
    assert_eq!(
        last.state,
        OperationState::Succeeded as i32,
        "{}",
        last.error
    );
}

token_test!(
    fn approvals_racing_on_two_replicas_run_each_operation_exactly_once(token) {
        let cluster = Cluster::start(3);
        runtime().block_on(async {
            let first_port = free_port();
            let (pki, first, keys) = prepare_ceremonies(token, first_port);
            let replicas = start_replicas_from(CUSTODYD, &cluster, 2, pki, first, first_port).await;
            let pki = &replicas.pki;
            let officers: Vec<(&str, &OfficerKey)> = ["alice", "bob"].into_iter().zip(&keys).collect();
            let channel = |port: u16, name: &str, role: Role| {
                let issued = pki.client(name, &[role]);
                async move { connect(pki, port, &issued).await.unwrap() }
            };
            let operator = channel(replicas.ports[0], "operator", Role::Operator).await;
            let mut approvers = Vec::new();
            for (i, (officer, key)) in officers.iter().enumerate() {
                approvers.push((*officer, *key, channel(replicas.ports[i], officer, Role::Officer).await));
            }
            rotated_under_quorum(&operator, &approvers).await;

            // 250 rotations in waves within the per-requester cap, each
            // approved by alice and by bob on both replicas at once: 1,000
            // approvals, and each quorum completes on two replicas at once.
            let mut voters = Vec::new();
            for port in &replicas.ports {
                for (officer, _) in &officers {
                    voters.push((*officer, OperationServiceClient::new(channel(*port, officer, Role::Officer).await)));
                }
            }
            let (operations, waves, per_wave) = (250, 25, 10);
            let mut names = Vec::new();
            let mut refusals = std::collections::BTreeMap::<String, u32>::new();
            for wave in 0..waves {
                let requester = channel(replicas.ports[wave % 2], "operator", Role::Operator).await;
                let mut tasks = Vec::new();
                for _ in 0..per_wave {
                    let operation = request_operation(
                        &requester,
                        operation_spec::Spec::Rotate(KeyRef { name: "keys/rotated".into() }),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.log(0)));
                    names.push(operation.name.clone());
                    for (officer, client) in &voters {
                        let key = officers.iter().find(|(name, _)| name == officer).unwrap().1;
                        let vote = approval(key, officer, &operation);
                        let mut client = client.clone();
                        tasks.push(tokio::spawn(async move { client.approve_operation(vote).await }));
                    }
                }
                for task in tasks {
                    if let Err(status) = task.await.unwrap() {
                        *refusals.entry(reason(&status)).or_default() += 1;
                    }
                }
            }
            assert_eq!(names.len(), operations);
            // Refused votes are the ones that came too late or twice, or
            // met a write fence (retryable): never anything else.
            for refused in refusals.keys() {
                assert!(
                    ["OPERATION_NOT_PENDING", "ALREADY_VOTED", "STORE_UNAVAILABLE"].contains(&refused.as_str()),
                    "unexpected refusal {refused}: {refusals:?}"
                );
            }
            // Each operation ran: once, and only once.
            let mut reader = OperationServiceClient::new(channel(replicas.ports[1], "auditor", Role::Auditor).await);
            for name in &names {
                let operation = reader
                    .get_operation(GetOperationRequest { name: name.clone() })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(operation.state, OperationState::Succeeded as i32, "{name}: {}", operation.error);
            }
            let key = KeyServiceClient::new(operator.clone())
                .get_key(GetKeyRequest { name: "keys/rotated".into() })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(key.versions.len(), 1 + operations, "one new version per operation, not more");
            let (entries, text) = audit_export(pki, replicas.ports[0]).await;
            assert_eq!(verify_export(&text).first_bad, None);
            for name in &names {
                let finished = entries
                    .iter()
                    .filter(|e| e.contains("\"type\":\"operation_finished\"") && e.contains(&format!("\"{name}\"")))
                    .count();
                assert_eq!(finished, 1, "{name} finished {finished} times");
            }
            eprintln!("refused votes: {refusals:?}");
            drop(replicas);
        });
    }
);

/// Signs with `shared` over `channel` until `stop`: the signatures
/// acknowledged, and the statuses of the failures.
async fn sign_until(
    channel: tonic::transport::Channel,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (u32, Vec<(tonic::Code, String)>) {
    let (mut acknowledged, mut failures) = (0u32, Vec::new());
    let mut n = 0u32;
    while !*stop.borrow() {
        n += 1;
        match sign_sha256(&channel, "shared", &n.to_be_bytes()).await {
            Ok(_) => acknowledged += 1,
            Err(status) => {
                failures.push((status.code(), status.message().to_string()));
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    (acknowledged, failures)
}

/// What a strand of the mixed load saw: what was acknowledged, and the
/// statuses of the failures.
type Outcomes = (Vec<String>, Vec<(tonic::Code, String)>);

/// Makes keys `made-0`, `made-1`, ... over `channels` in turn until `stop`:
/// the ids acknowledged, and the failures (each retried under the next id).
async fn create_until(
    channels: Vec<tonic::transport::Channel>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Outcomes {
    let (mut made, mut failures) = (Vec::new(), Vec::new());
    let mut n = 0usize;
    while !*stop.borrow() {
        let key_id = format!("made-{n}");
        let created = KeyServiceClient::new(channels[n % channels.len()].clone())
            .create_key(custody_proto::v1::CreateKeyRequest {
                key_id: key_id.clone(),
                algorithm: custody_proto::v1::Algorithm::EcSignP256Sha256 as i32,
                purpose: custody_proto::v1::KeyPurpose::AsymmetricSign as i32,
                allowed_signers: vec!["ca-issuing".into()],
                ..Default::default()
            })
            .await;
        match created {
            Ok(_) => made.push(key_id),
            Err(status) => failures.push((status.code(), status.message().to_string())),
        }
        n += 1;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    (made, failures)
}

/// Requests rotations of `rotated` until `stop`, each on replica n, approved
/// by alice and bob at once on the two others: the operations requested,
/// and the failures of requests and votes.
async fn rotate_until(
    requesters: Vec<tonic::transport::Channel>,
    voters: Vec<
        Vec<(
            &'static str,
            OperationServiceClient<tonic::transport::Channel>,
        )>,
    >,
    keys: std::sync::Arc<Vec<OfficerKey>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Outcomes {
    let (mut requested, mut failures) = (Vec::new(), Vec::new());
    let mut n = 0usize;
    while !*stop.borrow() {
        let on = n % requesters.len();
        n += 1;
        let operation = match request_operation(
            &requesters[on],
            operation_spec::Spec::Rotate(KeyRef {
                name: "keys/rotated".into(),
            }),
        )
        .await
        {
            Ok(operation) => operation,
            Err(status) => {
                failures.push((status.code(), status.message().to_string()));
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        requested.push(operation.name.clone());
        let votes = (1..=2).map(|k| {
            let (officer, client) = &voters[(on + k) % voters.len()][k - 1];
            let mut client = client.clone();
            let vote = approval(&keys[k - 1], officer, &operation);
            async move { client.approve_operation(vote).await }
        });
        for vote in futures_util::future::join_all(votes).await {
            if let Err(status) = vote {
                failures.push((status.code(), status.message().to_string()));
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    (requested, failures)
}

/// Whether a failure is one a client retries: the replica or the store
/// unavailable, the request in flight on a connection the kill cut (tonic
/// says UNKNOWN for that), or a cap that says when to try again (threat
/// model R2: rotations whose votes went to the killed replica stay pending,
/// and one requester may have 32).
fn retryable(code: tonic::Code, message: &str) -> bool {
    let cut = code == tonic::Code::Unknown
        && (message.contains("transport error") || message.contains("h2 protocol error"));
    code == tonic::Code::Unavailable || code == tonic::Code::ResourceExhausted || cut
}

token_test!(
    fn a_replica_and_an_etcd_member_killed_under_load_lose_no_acknowledged_signature(token) {
        let mut cluster = Cluster::start(3);
        runtime().block_on(async {
            let first_port = free_port();
            let (pki, first, officer_keys) = prepare_ceremonies(token, first_port);
            let mut replicas = start_replicas_from(CUSTODYD, &cluster, 3, pki, first, first_port).await;
            let pki = &replicas.pki;
            let channel = |port: u16, name: &str, role: Role| {
                let issued = pki.client(name, &[role]);
                async move { connect(pki, port, &issued).await.unwrap() }
            };
            let operator = channel(replicas.ports[0], "operator", Role::Operator).await;
            create_key(&operator, "shared", "EC_SIGN_P256_SHA256", None).await;
            let mut approvers = Vec::new();
            for (officer, key) in ["alice", "bob"].into_iter().zip(&officer_keys) {
                approvers.push((officer, key, channel(replicas.ports[0], officer, Role::Officer).await));
            }
            rotated_under_quorum(&operator, &approvers).await;

            // The mixed load: signatures on every replica, keys made on each
            // in turn, rotations requested and approved across them.
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let mut signing = Vec::new();
            let (mut operators, mut voters) = (Vec::new(), Vec::new());
            for &port in &replicas.ports {
                signing.push(tokio::spawn(sign_until(
                    channel(port, "ca-issuing", Role::Signer).await,
                    stopped.clone(),
                )));
                operators.push(channel(port, "operator", Role::Operator).await);
                let mut on_replica = Vec::new();
                for officer in ["alice", "bob"] {
                    let client = OperationServiceClient::new(channel(port, officer, Role::Officer).await);
                    on_replica.push((officer, client));
                }
                voters.push(on_replica);
            }
            let creating = tokio::spawn(create_until(operators.clone(), stopped.clone()));
            let rotating = tokio::spawn(rotate_until(
                operators,
                voters,
                std::sync::Arc::new(officer_keys),
                stopped.clone(),
            ));
            let pause = || tokio::time::sleep(std::time::Duration::from_millis(1500));
            // Under way on every strand before the kill: a rotation ran.
            let mut keys = KeyServiceClient::new(operator.clone());
            for _ in 0..300 {
                let rotated = keys
                    .get_key(GetKeyRequest { name: "keys/rotated".into() })
                    .await
                    .unwrap()
                    .into_inner();
                if rotated.versions.len() > 1 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            pause().await;
            // kill -9 a replica, then an etcd member, under the load.
            replicas.daemons[1].kill().unwrap();
            replicas.daemons[1].wait().unwrap();
            pause().await;
            cluster.kill(2);
            pause().await;
            // Restart both: the replica's id frees itself once its lease
            // lapses; until then the start is refused, and retried.
            cluster.restart(2);
            replicas.daemons[1] = restart(&replicas, 1).await;
            pause().await;
            stop.send(true).unwrap();
            let mut acknowledged = Vec::new();
            for task in signing {
                let (count, failures) = task.await.unwrap();
                for (code, message) in &failures {
                    assert!(retryable(*code, message), "a non-retryable failure: {code:?} {message}");
                }
                acknowledged.push(count);
            }
            let (made, creation_failures) = creating.await.unwrap();
            let (requested, rotation_failures) = rotating.await.unwrap();
            for (code, message) in creation_failures.iter().chain(&rotation_failures) {
                assert!(retryable(*code, message), "a non-retryable failure: {code:?} {message}");
            }
            // No acknowledged signature without its record, whatever died.
            let (entries, text) = audit_export(pki, replicas.ports[0]).await;
            assert_eq!(verify_export(&text).first_bad, None, "the merged chain verifies");
            for (i, count) in acknowledged.iter().enumerate() {
                let recorded = entries
                    .iter()
                    .map(|e| serde_json::from_str::<Entry>(e).unwrap())
                    .filter(|e| e.replica.as_deref() == Some(&format!("r{i}")))
                    .filter(|e| matches!(&e.event, custody_core::audit::Event::Request { method, outcome, .. }
                        if method == "Sign" && outcome == "ok"))
                    .count() as u32;
                assert!(*count > 0, "r{i} signed under the load");
                assert!(recorded >= *count, "r{i}: {count} acknowledged, {recorded} recorded");
            }
            // No operation ran twice: each finished at most once, and the
            // key has one version more per rotation that succeeded, and at
            // most one more per rotation closed "interrupted" (approved,
            // then a replica or the store failed before its outcome was
            // stored: it may have taken effect).
            assert!(!requested.is_empty(), "rotations were requested under the load");
            let mut operations = OperationServiceClient::new(operator.clone());
            let (mut succeeded, mut interrupted) = (0, 0);
            for name in &requested {
                let finished = entries
                    .iter()
                    .filter(|e| e.contains("\"type\":\"operation_finished\"") && e.contains(&format!("\"{name}\"")))
                    .count();
                assert!(finished <= 1, "{name} finished {finished} times");
                let operation = operations
                    .get_operation(GetOperationRequest { name: name.clone() })
                    .await
                    .unwrap()
                    .into_inner();
                if operation.state == OperationState::Succeeded as i32 {
                    succeeded += 1;
                } else if operation.error.starts_with("interrupted") {
                    interrupted += 1;
                }
            }
            assert!(succeeded > 0, "rotations succeeded under the load");
            let rotated = keys
                .get_key(GetKeyRequest { name: "keys/rotated".into() })
                .await
                .unwrap()
                .into_inner();
            let versions = rotated.versions.len();
            assert!(
                (1 + succeeded..=1 + succeeded + interrupted).contains(&versions),
                "one version per rotation that ran: {versions} versions, {succeeded} rotations succeeded, {interrupted} interrupted"
            );
            // Every key acknowledged is there with its one version, and the
            // token holds nothing the registry and the generations in
            // flight do not account for.
            assert!(!made.is_empty(), "keys were made under the load");
            for key_id in &made {
                let key = keys
                    .get_key(GetKeyRequest { name: format!("keys/{key_id}") })
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(key.versions.len(), 1, "{key_id}");
            }
            let drift = keys.check_drift(CheckDriftRequest {}).await.unwrap().into_inner();
            assert!(drift.findings.is_empty(), "{:?}", drift.findings);
            eprintln!(
                "acknowledged signatures {acknowledged:?}; keys made {}; rotations {} requested, {succeeded} succeeded; failures: creations {}, rotations {}",
                made.len(),
                requested.len(),
                creation_failures.len(),
                rotation_failures.len()
            );
            let mut kinds = std::collections::BTreeMap::<String, u32>::new();
            for (code, message) in creation_failures.iter().chain(&rotation_failures) {
                let head: String = message.chars().take(60).collect();
                *kinds.entry(format!("{code:?} {head}")).or_default() += 1;
            }
            eprintln!("failures by kind: {kinds:#?}");
            drop(replicas);
        });
    }
);

/// Whether the replica whose metrics are on `port` says it leads.
async fn leads(port: u16) -> bool {
    let page = tokio::task::spawn_blocking(move || softhsm_tests::service::scrape_metrics(port))
        .await
        .unwrap();
    page.lines().any(|line| line.trim() == "custody_leader 1")
}

token_test!(
    fn the_schedule_runs_on_one_replica_and_passes_to_another_when_it_dies(token) {
        let cluster = Cluster::start(3);
        runtime().block_on(async {
            let first_port = free_port();
            let (pki, first) = prepare(token, first_port);
            // The schedule's tick: how soon a replica sees the lease lapse.
            let mut text = std::fs::read_to_string(&first).unwrap();
            text.push_str("[lifecycle]\nscheduler_interval_secs = 1\n");
            std::fs::write(&first, text).unwrap();
            let metrics = [free_port(), free_port()];
            let mut replicas = start_replicas_from(CUSTODYD, &cluster, 2, pki, first, first_port).await;
            // Each replica's own metrics endpoint: its config with one more section.
            for (i, port) in metrics.iter().enumerate() {
                let mut text = std::fs::read_to_string(&replicas.configs[i]).unwrap();
                text.push_str(&format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"));
                std::fs::write(&replicas.configs[i], text).unwrap();
                replicas.daemons[i].kill().unwrap();
                replicas.daemons[i].wait().unwrap();
            }
            // Started again with metrics (the killed ones' ids free
            // themselves when their leases lapse: retried until then).
            for i in 0..2 {
                replicas.daemons[i] = restart(&replicas, i).await;
            }
            let wait = |secs| tokio::time::sleep(std::time::Duration::from_secs(secs));
            let mut leading = Vec::new();
            for _ in 0..30 {
                wait(1).await;
                leading = vec![leads(metrics[0]).await, leads(metrics[1]).await];
                if leading.contains(&true) {
                    break;
                }
            }
            assert_eq!(leading.iter().filter(|l| **l).count(), 1, "one leader: {leading:?}");
            // Never two, over a few ticks.
            for _ in 0..3 {
                wait(1).await;
                let now = [leads(metrics[0]).await, leads(metrics[1]).await];
                assert_eq!(now.to_vec(), leading, "the leadership stays put while the leader lives");
            }
            // The leader dies: the other takes over once its lease lapses.
            let (dead, alive) = if leading[0] { (0, 1) } else { (1, 0) };
            replicas.daemons[dead].kill().unwrap();
            replicas.daemons[dead].wait().unwrap();
            let mut took_over = false;
            for _ in 0..40 {
                wait(1).await;
                if leads(metrics[alive]).await {
                    took_over = true;
                    break;
                }
            }
            assert!(took_over, "the surviving replica took the schedule over");
            drop(replicas);
        });
    }
);

/// Starts replica `i` again, retrying while its previous process's claim
/// on its id has not lapsed yet.
async fn restart(replicas: &Replicas, i: usize) -> Daemon {
    let operator = replicas.pki.client("operator", &[Role::Operator]);
    for _ in 0..60 {
        let mut daemon = spawn(CUSTODYD, &replicas.configs[i]);
        // Refused while the dead process's claim lives: it exits, at a
        // moment that depends on the store's latency.
        for _ in 0..100 {
            if daemon.try_wait().unwrap().is_some() {
                break;
            }
            if let Ok(channel) = connect(&replicas.pki, replicas.ports[i], &operator).await {
                if KeyServiceClient::new(channel)
                    .list_keys(custody_proto::v1::ListKeysRequest::default())
                    .await
                    .is_ok()
                {
                    return daemon;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    panic!("replica r{i} did not start again");
}

token_test!(
    fn replicas_started_together_on_an_empty_token_make_one_audit_key(token) {
        let cluster = Cluster::start(3);
        runtime().block_on(async {
            let first_port = free_port();
            let (pki, first) = prepare(token, first_port);
            let ports: Vec<u16> = (0..3).map(|i| if i == 0 { first_port } else { free_port() }).collect();
            let configs: Vec<PathBuf> = ports
                .iter()
                .enumerate()
                .map(|(i, port)| {
                    let id = format!("r{i}");
                    softhsm_tests::process::replica_config(&first, *port, &id, &cluster.store_section(&id, None))
                })
                .collect();
            // All three at once, before any is up.
            let mut daemons: Vec<Daemon> = configs.iter().map(|config| spawn(CUSTODYD, config)).collect();
            for (daemon, port) in daemons.iter_mut().zip(&ports) {
                ready(&pki, *port, daemon).await;
            }
            let listed = token.pkcs11_tool().arg("--list-objects").output().unwrap();
            let listed = String::from_utf8_lossy(&listed.stdout);
            let audit_keys = listed
                .lines()
                .filter(|line| line.trim() == "label:      custody-audit/v1")
                .count();
            assert_eq!(audit_keys, 2, "one audit key pair (public and private):\n{listed}");
            drop(daemons);
        });
    }
);

token_test!(
    fn a_vote_that_waited_for_a_policy_change_on_another_replica_is_judged_under_the_new_policy(token) {
        // Threat model S5: bob's approval of a signature reaches r0 while
        // r1 holds the dual-control lock to run a SET_POLICY raising the
        // key's SIGN policy from 2 of 3 to 3 of 3 (r1 stops at its stop
        // point, then goes on). r0 had brought its copies up to the store
        // before waiting for the lock; the vote must still be judged under
        // the policy r1 wrote while it waited.
        let cluster = Cluster::start(3);
        runtime().block_on(async {
            let first_port = free_port();
            let (pki, first, keys) = prepare_ceremonies(token, first_port);
            let replicas = start_replicas_from(CUSTODYD, &cluster, 1, pki, first, first_port).await;
            let pki = &replicas.pki;
            let (alice, bob) = (&keys[0], &keys[1]);
            let port = free_port();
            let config = softhsm_tests::process::replica_config(&replicas.base, port, "r1", &cluster.store_section("r1", None));
            let mut command = Command::new(CUSTODYD);
            command.env("CUSTODY_STOP_AT", "operation.before_execute");
            let mut stopping = softhsm_tests::process::spawn_crashing_at(command, &config, None);
            ready(pki, port, &mut stopping).await;
            let r0 = replicas.ports[0];
            let officer = |port: u16, name: &str| {
                let issued = pki.client(name, &[Role::Officer]);
                async move { OperationServiceClient::new(connect(pki, port, &issued).await.unwrap()) }
            };
            let operator = connect(pki, r0, &pki.client("operator", &[Role::Operator])).await.unwrap();
            create_key(&operator, "k", "EC_SIGN_P256_SHA256", None).await;
            let policy = |required| {
                operation_spec::Spec::SetPolicy(SetPolicySpec {
                    name: "keys/k".into(),
                    operation: OperationKind::Sign as i32,
                    officers: vec!["alice".into(), "bob".into(), "carol".into()],
                    required,
                })
            };
            let (mut alice_r0, mut bob_r0) = (officer(r0, "alice").await, officer(r0, "bob").await);
            let set = request_operation(&operator, policy(2)).await.unwrap();
            alice_r0.approve_operation(approval(alice, "alice", &set)).await.unwrap();
            let set = bob_r0.approve_operation(approval(bob, "bob", &set)).await.unwrap().into_inner();
            assert_eq!(set.state, OperationState::Succeeded as i32, "{}", set.error);

            let signer = connect(pki, r0, &pki.client("ca-issuing", &[Role::Signer])).await.unwrap();
            let sign = request_operation(
                &signer,
                operation_spec::Spec::Sign(custody_proto::v1::SignSpec {
                    name: "keys/k".into(),
                    digest: Some(custody_proto::v1::Digest {
                        digest: Some(custody_proto::v1::digest::Digest::Sha256(vec![0x42; 32])),
                    }),
                    encoding: 0,
                }),
            )
            .await
            .unwrap();
            alice_r0.approve_operation(approval(alice, "alice", &sign)).await.unwrap();

            // The tightening, completed by bob on r1, which stops holding
            // the lock just before it runs it.
            let tighten = request_operation(&operator, policy(3)).await.unwrap();
            alice_r0.approve_operation(approval(alice, "alice", &tighten)).await.unwrap();
            let mut bob_r1 = officer(port, "bob").await;
            let vote = approval(bob, "bob", &tighten);
            let tightening = tokio::spawn(async move { bob_r1.approve_operation(vote).await });
            softhsm_tests::process::stopped(stopping.id()).await;
            // bob's approval of the signature on r0: admitted under 2 of 3,
            // it waits for the lock.
            let vote = approval(bob, "bob", &sign);
            let mut bob_again = bob_r0.clone();
            let signing = tokio::spawn(async move { bob_again.approve_operation(vote).await });
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            softhsm_tests::process::go_on(stopping.id());
            let tightened = tightening.await.unwrap().unwrap().into_inner();
            assert_eq!(tightened.state, OperationState::Succeeded as i32, "{}", tightened.error);
            let signed = signing.await.unwrap().unwrap().into_inner();
            assert!(
                signed.signature.is_none(),
                "two approvals signed under a SIGN policy raised to 3 of 3 while the last waited: {:?} {}",
                OperationState::try_from(signed.state),
                signed.error
            );
            assert_eq!(signed.state, OperationState::Failed as i32, "{}", signed.error);
            assert!(signed.error.contains("POLICY_CHANGED"), "{}", signed.error);
            let _ = stopping.kill();
            let _ = stopping.wait();
        });
    }
);
