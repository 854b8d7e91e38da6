//! Signatures per second through custodyd (gRPC over loopback mTLS, every
//! signature audited and durable before it is returned), as ratios of raw
//! hsm-shim signatures per second on one thread and of plain cryptoki
//! signatures per second on every core (the floor, `floor/mod.rs`, measured
//! at the start and the end of the run; the ratio is to their mean), all
//! measured in the same run; p50 and p99
//! latency of unary calls, beside the disk's own latency for one synced
//! record-sized write (no audited answer can come sooner); and how long the key registry takes to load
//! 10,000 keys at start. The transport's own floor is a row too: the gRPC
//! health `Check` through the same listener, mTLS and gate, answered at once.
//! custodyd logs a line per request as the daemon does (to an anonymous
//! file), so the figures pay for it.
//!
//! Run: `cargo bench -p softhsm-tests --bench service`
//! (`BENCH_SECONDS`, default 3, sets the length of each measurement;
//! `BENCH_PROFILE=unary1`, `unary16`, `stream1`, `transport1` or
//! `transport16` runs that figure alone and prints it, for a profiler; `BENCH_TOKIO_WORKERS` and `BENCH_HSM_WORKERS` set how many
//! runtime and HSM threads share the cores.)

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

mod floor;

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

/// What each client of a closed loop calls.
#[derive(Debug, Clone, Copy)]
enum Call {
    /// `Sign`, audited.
    Sign,
    /// The gRPC health `Check`: the transport's own floor. It goes through
    /// custodyd's listener, mTLS, request gate and router like `Sign`, and
    /// answers at once (no HSM call, no audit record): what no signing
    /// figure can exceed.
    HealthCheck,
}

/// `clients` tasks, each on its own connection, making `call` in a loop:
/// calls per second, p50 and p99 latency. Every client is connected
/// before any starts, they start together, and only calls that end within
/// the `seconds` count.
async fn closed_loop(
    service: &TestService,
    call: Call,
    clients: usize,
    seconds: f64,
) -> (f64, Duration, Duration) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let start = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let channel = service.client("ca-issuing").await;
        let mut signing = SigningServiceClient::new(channel.clone());
        let mut health = HealthClient::new(channel);
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let end = Instant::now() + Duration::from_secs_f64(seconds);
            let mut latencies = Vec::new();
            while Instant::now() < end {
                let began = Instant::now();
                match call {
                    Call::Sign => drop(signing.sign(request()).await.expect("sign")),
                    Call::HealthCheck => drop(
                        health
                            .check(HealthCheckRequest::default())
                            .await
                            .expect("health check"),
                    ),
                }
                if Instant::now() <= end {
                    latencies.push(began.elapsed());
                }
            }
            latencies
        }));
    }
    start.wait().await;
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

/// The disk's floor for one audited answer: p50 and p99 of one
/// record-sized write (600 bytes) after the last in a file in `dir` and its
/// `fdatasync`, `rounds` times: appended, or `into_zeros` written ahead as
/// the audit log writes its records. Every audited request waits for at
/// least one such sync (threat model Q6), so a single client's latency
/// cannot go below it.
fn sync_latency(dir: &std::path::Path, rounds: usize, into_zeros: bool) -> (Duration, Duration) {
    use std::os::unix::fs::FileExt;
    let path = dir.join("bench-sync-floor");
    let file = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&path)
        .expect("the sync floor's file");
    let record = [0x5a_u8; 600];
    if into_zeros {
        file.write_all_at(&vec![0; rounds * record.len()], 0)
            .expect("write zeros");
        file.sync_all().expect("fsync");
    }
    let mut latencies: Vec<Duration> = (0..rounds)
        .map(|round| {
            let start = std::time::Instant::now();
            file.write_all_at(&record, (round * record.len()) as u64)
                .expect("write");
            file.sync_data().expect("fdatasync");
            start.elapsed()
        })
        .collect();
    drop(file);
    std::fs::remove_file(&path).expect("remove the sync floor's file");
    latencies.sort();
    (latencies[rounds / 2], latencies[rounds * 99 / 100])
}

/// The floor on 1 thread and on every core: `(one, all)`.
fn floors(token: &TestToken, key_label: &str, seconds: f64) -> (f64, f64) {
    (
        floor::rate(token, key_label, 1, seconds),
        floor::rate(token, key_label, floor::cores(), seconds),
    )
}

fn tokio_stream_from(
    mut receiver: tokio::sync::mpsc::Receiver<SignRequest>,
) -> impl futures_util::Stream<Item = SignRequest> {
    futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

#[expect(clippy::print_stdout, reason = "a benchmark prints its report")]
fn bench(token: &TestToken) {
    let seconds = softhsm_tests::bench_seconds(3.0);
    // How many threads share the cores (the candidates): tokio's
    // workers (default: one per core) and custodyd's HSM workers (default:
    // the reference configuration's 2).
    let threads = |name: &str| {
        std::env::var(name).ok().map(|n| {
            n.parse::<usize>()
                .unwrap_or_else(|_| panic!("{name}: a number"))
        })
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = threads("BENCH_TOKIO_WORKERS") {
        runtime.worker_threads(workers);
    }
    let runtime = runtime.enable_all().build().expect("runtime");
    let hsm_workers = threads("BENCH_HSM_WORKERS");
    runtime.block_on(async {
        let mut service = TestService::start_with(token, |config| {
            if let Some(workers) = hsm_workers {
                config.hsm.workers = workers;
            }
        })
        .await;
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
        if let Ok(only) = std::env::var("BENCH_PROFILE") {
            // One figure alone, for a profiler or a quick comparison:
            // `unary1`, `unary16`, `stream1`, `transport1` or `transport16`.
            let (call, clients) = match only.as_str() {
                "unary1" => (Call::Sign, 1),
                "unary16" => (Call::Sign, 16),
                "transport1" => (Call::HealthCheck, 1),
                "transport16" => (Call::HealthCheck, 16),
                "stream1" => {
                    let rate = streaming(&service, 1, seconds).await;
                    println!("{only}: {rate:.0}/s");
                    return;
                }
                other => panic!(
                    "BENCH_PROFILE: {other}? (unary1, unary16, stream1, transport1 or transport16)"
                ),
            };
            let (rate, p50, p99) = closed_loop(&service, call, clients, seconds).await;
            println!(
                "{only}: {rate:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3
            );
            return;
        }
        let label = custody_core::names::hsm_label("bench", 1).expect("label");
        let (floor_one, floor_all) =
            tokio::task::block_in_place(|| floors(token, label.as_str(), seconds));
        let base = tokio::task::block_in_place(|| raw(&service, seconds));
        let (sync_appended, sync_into_zeros) = tokio::task::block_in_place(|| {
            let dir = &service.config.data_dir;
            (sync_latency(dir, 2000, false), sync_latency(dir, 2000, true))
        });
        let mut rows = Vec::new();
        let closed_loops = [
            (Call::Sign, 1, "unary Sign, 1 client, audited"),
            (Call::Sign, 16, "unary Sign, 16 clients, audited"),
            (Call::Sign, 64, "unary Sign, 64 clients, audited"),
            (Call::HealthCheck, 1, "transport alone: health Check, 1 client, no HSM, no audit"),
            (Call::HealthCheck, 16, "transport alone: health Check, 16 clients, no HSM, no audit"),
        ];
        for (call, clients, path) in closed_loops {
            let (rate, p50, p99) = closed_loop(&service, call, clients, seconds).await;
            rows.push((
                path.to_string(),
                rate,
                format!("{:.2} ms | {:.2} ms", p50.as_secs_f64() * 1e3, p99.as_secs_f64() * 1e3),
            ));
        }
        for streams in [1, 4] {
            let rate = streaming(&service, streams, seconds).await;
            rows.push((format!("SignStream, {streams} stream(s), audited"), rate, " | ".into()));
        }
        let (end_one, end_all) =
            tokio::task::block_in_place(|| floors(token, label.as_str(), seconds));
        let floor = f64::midpoint(floor_all, end_all);
        let cores = floor::cores();
        println!(
            "ECDSA P-256, {seconds} s per figure; ratios to raw hsm-shim on 1 thread and to raw cryptoki on {cores} cores (mean of start and end), same run\n"
        );
        println!("| path | signatures/s | to hsm-shim, 1 thread | to raw cryptoki, {cores} cores | p50 | p99 |");
        println!("|---|---|---|---|---|---|");
        println!(
            "| raw cryptoki, 1 thread (start / end) | {floor_one:.0} / {end_one:.0} | | {:.2} / {:.2} | | |",
            floor_one / floor,
            end_one / floor
        );
        println!(
            "| raw cryptoki, {cores} threads (start / end) | {floor_all:.0} / {end_all:.0} | | {:.2} / {:.2} | | |",
            floor_all / floor,
            end_all / floor
        );
        println!(
            "| raw hsm-shim, 1 thread | {base:.0} | 1.00 | {:.2} | | |",
            base / floor
        );
        for (how, (p50, p99)) in [
            ("appended", sync_appended),
            ("into zeros written ahead, as the audit log", sync_into_zeros),
        ] {
            println!(
                "| the disk: one 600-byte write and fdatasync in the data directory, {how} | | | | {:.2} ms | {:.2} ms |",
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3
            );
        }
        for (path, rate, latency) in rows {
            println!(
                "| {path} | {rate:.0} | {:.2} | {:.2} | {latency} |",
                rate / base,
                rate / floor
            );
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
        softhsm_tests::service::fill_registry(&db, 10_000);
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
    floor::serve();
    let _log = softhsm_tests::log_like_custodyd();
    softhsm_tests::run_bench("service_bench", bench);
}
