//! Signing through custodyd replicas on a real 3-member etcd cluster, all on
//! one SoftHSM2 token, against one custodyd on sled in the same run: 16
//! clients spread over the replicas sign (unary, SHA-256 digests, every
//! signature audited and durable before it returns) for `REPLICA_SECS`
//! seconds (default 10) per setup. On one machine this shows what the
//! shared store costs more than what replicas add: every process shares the
//! same cores, and etcd's three members too.
//!
//! Run: `cargo bench -p softhsm-tests --bench replicas`

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark fails by panicking on the unexpected"
)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use custody_core::identity::Role;
use softhsm_tests::TestToken;
use softhsm_tests::etcd::Cluster;
use softhsm_tests::process::{
    Daemon, Pki, connect, free_port, prepare_with, ready, replica_config, spawn,
};
use softhsm_tests::service::{create_key, sign_sha256};

const CLIENTS: usize = 16;

/// One setup's figures.
struct Figures {
    signatures: usize,
    seconds: f64,
    p50: Duration,
    p99: Duration,
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(index).copied().unwrap_or_default()
}

/// Starts custodyd on each config, makes `key_id` through the first, and
/// has the clients sign with it, spread over the replicas.
async fn measure(pki: &Pki, configs: &[(PathBuf, u16)], key_id: &str, secs: u64) -> Figures {
    let custodyd = env!("CARGO_BIN_EXE_custodyd-under-test");
    let mut daemons: Vec<Daemon> = Vec::new();
    for (config, port) in configs {
        let mut daemon = spawn(custodyd, config);
        ready(pki, *port, &mut daemon).await;
        daemons.push(daemon);
    }
    let operator = connect(
        pki,
        configs[0].1,
        &pki.client("operator", &[Role::Operator]),
    )
    .await
    .unwrap();
    create_key(&operator, key_id, "EC_SIGN_P256_SHA256", None).await;
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let port = configs[i % configs.len()].1;
        let channel = connect(pki, port, &pki.client("ca-issuing", &[Role::Signer]))
            .await
            .unwrap();
        let key_id = key_id.to_string();
        clients.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while Instant::now() < until {
                n += 1;
                let sent = Instant::now();
                sign_sha256(&channel, &key_id, &n.to_be_bytes())
                    .await
                    .unwrap();
                latencies.push(sent.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for client in clients {
        latencies.extend(client.await.unwrap());
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort();
    drop(daemons);
    Figures {
        signatures: latencies.len(),
        seconds,
        p50: quantile(&latencies, 0.5),
        p99: quantile(&latencies, 0.99),
    }
}

/// The configs of `count` replicas on `cluster`, keys under `prefix`.
fn replicas(base: &Path, cluster: &Cluster, count: usize, prefix: &str) -> Vec<(PathBuf, u16)> {
    (0..count)
        .map(|i| {
            let port = free_port();
            let id = format!("{prefix}r{i}");
            let store = cluster.store_section(&id, Some(&format!("{prefix}/")));
            (replica_config(base, port, &id, &store), port)
        })
        .collect()
}

#[expect(clippy::print_stdout, reason = "a benchmark prints its report")]
fn bench(token: &TestToken) {
    let secs = std::env::var("REPLICA_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    // Every setup starts on a token the one before used: the audit key is
    // shared, and the start over a token holding other setups' keys is
    // acknowledged.
    let (pki, base) = prepare_with(
        token,
        free_port(),
        "[audit]\nlost_directory_acknowledged = true\n",
    );
    let cluster = Cluster::start(3);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let sled_port = free_port();
    let sled = [(replica_config(&base, sled_port, "sled", ""), sled_port)];
    let mut rows = Vec::new();
    rows.push((
        "sled, 1 custodyd",
        runtime.block_on(measure(&pki, &sled, "sled", secs)),
    ));
    for count in 1..=3 {
        let prefix = format!("bench{count}");
        let configs = replicas(&base, &cluster, count, &prefix);
        let label = match count {
            1 => "etcd, 1 replica",
            2 => "etcd, 2 replicas",
            _ => "etcd, 3 replicas",
        };
        rows.push((
            label,
            runtime.block_on(measure(&pki, &configs, &prefix, secs)),
        ));
    }
    let sled_rate = rows[0].1.signatures as f64 / rows[0].1.seconds;
    println!(
        "{CLIENTS} clients, unary Sign (EC P-256), {secs} s per setup, one token, a 3-member etcd cluster on this machine"
    );
    println!("| setup | signatures/s | ratio to sled | p50 | p99 |");
    println!("|---|---|---|---|---|");
    for (label, figures) in &rows {
        let rate = figures.signatures as f64 / figures.seconds;
        println!(
            "| {label} | {rate:.0} | {:.2} | {:.2} ms | {:.2} ms |",
            rate / sled_rate,
            figures.p50.as_secs_f64() * 1000.0,
            figures.p99.as_secs_f64() * 1000.0
        );
    }
}

fn main() {
    softhsm_tests::run_bench("replicas_bench", bench);
}
