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
use custody_core::identity::Role;
use custody_proto::v1::CreateKeyRequest;
use custody_proto::v1::key_service_client::KeyServiceClient;
use softhsm_tests::etcd::Cluster;
use softhsm_tests::process::{
    Daemon, Pki, audit_export, connect, free_port, prepare, ready, spawn, verify_export,
};
use softhsm_tests::service::sign_sha256;
use softhsm_tests::{TestToken, token_test};

const CUSTODYD: &str = env!("CARGO_BIN_EXE_custodyd-under-test");

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The `[store]` section of replica `id` on `cluster`.
fn store_section(cluster: &Cluster, id: &str) -> String {
    let tls = cluster.tls();
    let endpoints: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| format!("{e:?}"))
        .collect();
    format!(
        "[store]\nbackend = \"etcd\"\nreplica_id = \"{id}\"\nendpoints = [{}]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        endpoints.join(", "),
        tls.ca,
        tls.cert,
        tls.key
    )
}

/// Replica `id`'s config: the first replica's with its own port, data
/// directory and `[store]` section.
fn replica_config(first: &Path, port: u16, id: &str, store: &str) -> PathBuf {
    let text = std::fs::read_to_string(first).unwrap();
    let listen = text.lines().next().unwrap();
    let data_dir = text.lines().nth(1).unwrap();
    let text = text
        .replace(listen, &format!("listen = \"127.0.0.1:{port}\""))
        .replace(
            data_dir,
            &data_dir.replace("/data\"", &format!("/data-{id}\"")),
        );
    let path = first.with_file_name(format!("custodyd-{id}.toml"));
    std::fs::write(&path, format!("{text}\n{store}")).unwrap();
    path
}

/// Three replicas on `cluster` and the token: their ports and processes.
struct Replicas {
    pki: Pki,
    ports: Vec<u16>,
    daemons: Vec<Daemon>,
    /// The config every replica's is made from (no `[store]` section).
    base: PathBuf,
}

async fn start_replicas(token: &TestToken, cluster: &Cluster, count: usize) -> Replicas {
    let first_port = free_port();
    let (pki, first) = prepare(token, first_port);
    let mut ports = Vec::new();
    let mut configs = Vec::new();
    for i in 0..count {
        let port = if i == 0 { first_port } else { free_port() };
        let id = format!("r{i}");
        configs.push(replica_config(
            &first,
            port,
            &id,
            &store_section(cluster, &id),
        ));
        ports.push(port);
    }
    let mut daemons = Vec::new();
    for (config, port) in configs.iter().zip(&ports) {
        let mut daemon = spawn(CUSTODYD, config);
        ready(&pki, *port, &mut daemon).await;
        daemons.push(daemon);
    }
    Replicas {
        pki,
        ports,
        daemons,
        base: first,
    }
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
            let replicas = start_replicas(token, &cluster, 3).await;
            let pki = &replicas.pki;
            let operator = connect(pki, replicas.ports[0], &pki.client("operator", &[Role::Operator]))
                .await
                .unwrap();
            KeyServiceClient::new(operator)
                .create_key(CreateKeyRequest {
                    key_id: "shared".into(),
                    algorithm: custody_proto::v1::Algorithm::EcSignP256Sha256 as i32,
                    purpose: 1,
                    allowed_signers: vec!["ca".into()],
                    ..Default::default()
                })
                .await
                .unwrap();
            // Every replica signs with it at once, the one that made it too.
            let mut signers = Vec::new();
            for &port in &replicas.ports {
                let channel = connect(pki, port, &pki.client("ca", &[Role::Signer])).await.unwrap();
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
            let replicas = start_replicas(token, &cluster, 1).await;
            // A second process under the same id is refused, naming the holder.
            let twin = replica_config(
                &replicas.base,
                free_port(),
                "twin",
                &store_section(&cluster, "r0"),
            );
            let refused = failed_start(&twin);
            assert!(refused.contains("replica_id \"r0\" is in use by another custodyd"), "{refused}");
            // A store nobody answers on: refused, naming where it looked.
            let nowhere = format!("https://127.0.0.1:{}", free_port());
            let lost = replica_config(
                &replicas.base,
                free_port(),
                "lost",
                &store_section(&cluster, "lost").replace(
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
