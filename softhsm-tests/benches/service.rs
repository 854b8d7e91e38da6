//! Signatures per second through custodyd (gRPC over loopback mTLS, every
//! signature audited and durable before it is returned), as ratios of raw
//! hsm-shim signatures per second measured in the same run; p50 and p99
//! latency of unary calls; and how long the key registry takes to load
//! 10,000 keys at start.
//!
//! Run: `cargo bench -p softhsm-tests --bench service`
//! (`BENCH_SECONDS`, default 3, sets the length of each measurement.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use custody_core::algorithms::KeyAlgorithm;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::signing_service_client::SigningServiceClient;
use custody_proto::v1::{CreateKeyRequest, Digest, KeyPurpose, SignRequest, digest, sign_request};
use futures_util::StreamExt;
use hsm_shim::{EcdsaEncoding, SignAlgorithm, SignInput};
use softhsm_tests::TestToken;
use softhsm_tests::service::TestService;

fn request() -> SignRequest {
    SignRequest {
        name: "keys/bench".into(),
        input: Some(sign_request::Input::Digest(Digest {
            digest: Some(digest::Digest::Sha256(vec![0x5a; 32])),
        })),
        ..Default::default()
    }
}

fn raw(service: &TestService, seconds: f64) -> f64 {
    let mut session = service.state().hsm.session().expect("session");
    let label = custody_core::names::hsm_label("bench", 1).expect("label");
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut count = 0u64;
    while Instant::now() < deadline {
        session
            .sign(
                &label,
                SignAlgorithm::EcdsaP256Sha256,
                SignInput::Digest(&[0x5a; 32]),
                EcdsaEncoding::Der,
            )
            .expect("raw sign");
        count += 1;
    }
    count as f64 / seconds
}

/// `clients` tasks, each on its own connection, calling `Sign` in a loop.
async fn unary(service: &TestService, clients: usize, seconds: f64) -> (f64, Duration, Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut client = SigningServiceClient::new(service.client("ca-issuing").await);
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                client.sign(request()).await.expect("sign");
                latencies.push(start.elapsed());
            }
            latencies
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("task"));
    }
    latencies.sort();
    let p = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    (latencies.len() as f64 / seconds, p(0.5), p(0.99))
}

/// `streams` SignStream calls, each fed as fast as the server takes them.
async fn streaming(service: &TestService, streams: usize, seconds: f64) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let mut client = SigningServiceClient::new(service.client("ca-issuing").await);
        let (count, stop) = (count.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let (sender, receiver) = tokio::sync::mpsc::channel(256);
            let feeder_stop = stop.clone();
            tokio::spawn(async move {
                while !feeder_stop.load(Ordering::Relaxed) {
                    if sender.send(request()).await.is_err() {
                        return;
                    }
                }
            });
            let mut responses = client
                .sign_stream(tokio_stream_from(receiver))
                .await
                .expect("stream")
                .into_inner();
            while let Some(response) = responses.next().await {
                let response = response.expect("response");
                assert!(response.error.is_none(), "{:?}", response.error);
                count.fetch_add(1, Ordering::Relaxed);
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let done = count.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    done as f64 / seconds
}

fn tokio_stream_from(
    mut receiver: tokio::sync::mpsc::Receiver<SignRequest>,
) -> impl futures_util::Stream<Item = SignRequest> {
    futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

/// Writes `keys` registry records straight into custodyd's database.
fn fill_registry(db: &custody_store::Store, keys: usize) {
    use custody_core::registry::{KeyRecord, VersionRecord, VersionState};
    let tree = db.keyspace("keys").expect("keyspace");
    for i in 0..keys {
        let record = KeyRecord {
            key_id: format!("key-{i:05}"),
            algorithm: "EC_SIGN_P256_SHA256".into(),
            allowed_signers: vec!["ca-issuing".into()],
            primary_version: 1,
            created_ms: 0,
            versions: vec![VersionRecord {
                version: 1,
                state: VersionState::Active,
                created_ms: 0,
                state_ms: 0,
                hsm_label: format!("key/key-{i:05}/v1"),
                public_key_der_hex: "00".repeat(91),
                public_key_pem: "-----BEGIN PUBLIC KEY-----\n".to_string()
                    + &"A".repeat(124)
                    + "\n-----END PUBLIC KEY-----\n",
                activated_ms: Some(0),
                destroy_at_ms: None,
                legal_hold: None,
                check_value: String::new(),
                certificate_chain_pem: Vec::new(),
            }],
            policies: Default::default(),
            cryptoperiod_ms: None,
            min_version: 0,
            rotation_requests: Vec::new(),
            backup_exportable: false,
        };
        tree.insert(
            record.key_id.as_bytes(),
            serde_json::to_vec(&record).expect("json"),
        )
        .expect("insert");
    }
    db.flush().expect("flush");
}

#[expect(clippy::print_stdout, reason = "a benchmark prints its report")]
fn bench(token: &TestToken) {
    let seconds = softhsm_tests::bench_seconds(3.0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut service = TestService::start(token).await;
        KeyServiceClient::new(service.client("operator").await)
            .create_key(CreateKeyRequest {
                key_id: "bench".into(),
                algorithm: custody_daemon::wire::algorithm(KeyAlgorithm::EcSignP256Sha256) as i32,
                purpose: KeyPurpose::AsymmetricSign as i32,
                allowed_signers: vec!["ca-issuing".into()],
                ..Default::default()
            })
            .await
            .expect("create key");
        let base = tokio::task::block_in_place(|| raw(&service, seconds));
        println!("ECDSA P-256, {seconds} s per figure; ratio to raw hsm-shim (1 thread, same run) in brackets\n");
        println!("| path | signatures/s | p50 | p99 |");
        println!("|---|---|---|---|");
        println!("| raw hsm-shim, 1 thread | {base:.0} (1.00) | | |");
        for clients in [1, 16, 64] {
            let (rate, p50, p99) = unary(&service, clients, seconds).await;
            println!(
                "| unary Sign, {clients} client(s), audited | {rate:.0} ({:.2}) | {:.2} ms | {:.2} ms |",
                rate / base,
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3
            );
        }
        for streams in [1, 4] {
            let rate = streaming(&service, streams, seconds).await;
            let ratio = rate / base;
            println!("| SignStream, {streams} stream(s), audited | {rate:.0} ({ratio:.2}) | | |");
        }
        // A drift check lists every object on the token and compares it with
        // the registry, under the registry lock: how long that lock is held.
        let operator = service.client("operator").await;
        let algorithm = KeyAlgorithm::from_api_name("EC_SIGN_P256_SHA256").expect("alg");
        futures_util::stream::iter(0..1000)
            .map(|i| {
                let mut keys = KeyServiceClient::new(operator.clone());
                async move {
                    keys.create_key(CreateKeyRequest {
                        key_id: format!("drift-{i:04}"),
                        algorithm: custody_daemon::wire::algorithm(algorithm) as i32,
                        purpose: KeyPurpose::AsymmetricSign as i32,
                        ..Default::default()
                    })
                    .await
                    .expect("create key");
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<()>>()
            .await;
        let mut keys = KeyServiceClient::new(operator);
        let start = Instant::now();
        let report = keys
            .check_drift(custody_proto::v1::CheckDriftRequest {})
            .await
            .expect("drift")
            .into_inner();
        let drift = start.elapsed();
        assert!(report.findings.is_empty(), "{:?}", report.findings);
        println!(
            "\ndrift check over {} registry versions and {} HSM objects: {:.0} ms",
            report.versions_checked,
            report.objects_checked,
            drift.as_secs_f64() * 1e3
        );
        // A full restart (database, HSM login and sessions, registry, the
        // whole audit chain checked) with 10,000 keys and every record the
        // runs above wrote.
        let records = service.state().audit.records(1).count();
        service.stop().await;
        let db = custody_daemon::server::open_db(&service.config.data_dir, service.config.storage.cache_bytes()).expect("db");
        fill_registry(&db, 10_000);
        drop(db);
        let start = Instant::now();
        service.restart().await;
        let restart = start.elapsed().as_secs_f64();
        assert_eq!(service.state().registry.len(), 11_001);
        println!(
            "\nfull restart with 11,001 keys and {records} audit records: {:.0} ms",
            restart * 1e3
        );
    });
}

fn main() {
    softhsm_tests::run_bench("service_bench", bench);
}
