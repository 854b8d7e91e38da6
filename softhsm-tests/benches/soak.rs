//! A long run of mixed load against custodyd as a process on a fresh
//! SoftHSM2 token: what grows with time. Each cycle makes 100 unary
//! signatures, a stream of 100, 20 encryptions and 20 decryptions; every
//! 10th cycle also a quorum rotation (requested by the operator, approved by
//! two officers) and a drift check. Every `SOAK_SAMPLE_SECS` it reads the
//! daemon's resident memory and open file descriptors from `/proc`, the size
//! of its data directory, and the p99 of the unary signatures in that window.
//!
//! Run: `SOAK_SECS=1800 cargo bench -p softhsm-tests --bench soak`
//! (`SOAK_SECS` defaults to 60, `SOAK_SAMPLE_SECS` to a tenth of it).

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark fails by panicking on the unexpected"
)]

use std::path::Path;
use std::time::{Duration, Instant};

use custody_core::identity::Role;
use custody_proto::v1::envelope_service_client::EnvelopeServiceClient;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::signing_service_client::SigningServiceClient;
use custody_proto::v1::{
    CheckDriftRequest, DecryptRequest, Digest, EncryptRequest, KeyRef, OperationKind,
    OperationState, SetPolicySpec, SignRequest, digest, operation_spec, sign_request,
};
use softhsm_tests::TestToken;
use softhsm_tests::ceremony::Officers;
use softhsm_tests::process::{
    connect, free_port, officer_channels, prepare_ceremonies, ready, spawn,
};
use softhsm_tests::service::{create_key, request_operation};
use tonic::transport::Channel;

const SIGNER: &str = "ca-issuing";

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn sign_request(i: u64) -> SignRequest {
    SignRequest {
        name: "keys/sign".into(),
        input: Some(sign_request::Input::Digest(Digest {
            digest: Some(digest::Digest::Sha256(
                sha2_digest(&i.to_be_bytes()).to_vec(),
            )),
        })),
        ..Default::default()
    }
}

fn sha2_digest(data: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(data).into()
}

/// What `/proc` and the disk say of the daemon now.
struct Reading {
    rss_kib: u64,
    fds: usize,
    data_bytes: u64,
}

fn read(pid: u32, data_dir: &Path) -> Reading {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    Reading {
        rss_kib,
        fds,
        data_bytes: dir_size(data_dir),
    }
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn p99(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples
        .get(samples.len() * 99 / 100)
        .copied()
        .unwrap_or_default()
}

struct Load {
    signer: SigningServiceClient<Channel>,
    envelope: EnvelopeServiceClient<Channel>,
    operator: Channel,
    drift: KeyServiceClient<Channel>,
}

impl Load {
    /// One cycle; returns how many requests it made (the unary signature
    /// latencies go to `latencies`), or the first transport error.
    async fn cycle(
        &mut self,
        n: u64,
        officers: &Officers<'_>,
        latencies: &mut Vec<Duration>,
    ) -> Result<u64, tonic::Status> {
        let mut requests = 0;
        for i in 0..100 {
            let started = Instant::now();
            self.signer.sign(sign_request(n * 1000 + i)).await?;
            latencies.push(started.elapsed());
            requests += 1;
        }
        let stream = futures_util::stream::iter((0..100).map(move |i| sign_request(n * 1000 + i)));
        let mut responses = self.signer.sign_stream(stream).await?.into_inner();
        while let Some(response) = responses.message().await? {
            assert!(response.error.is_none(), "{:?}", response.error);
            requests += 1;
        }
        for i in 0..20_u64 {
            let sealed = self
                .envelope
                .encrypt(EncryptRequest {
                    name: "keys/env".into(),
                    plaintext: i.to_be_bytes().repeat(64),
                    associated_data: b"soak".to_vec(),
                })
                .await?
                .into_inner();
            let opened = self
                .envelope
                .decrypt(DecryptRequest {
                    name: "keys/env".into(),
                    ciphertext: sealed.ciphertext,
                    associated_data: b"soak".to_vec(),
                })
                .await?
                .into_inner();
            assert_eq!(opened.plaintext, i.to_be_bytes().repeat(64));
            requests += 2;
        }
        if n % 10 == 0 {
            let operation = request_operation(
                &self.operator,
                operation_spec::Spec::Rotate(KeyRef {
                    name: "keys/rot".into(),
                }),
            )
            .await?;
            officers.approve("alice", &operation).await?;
            let done = officers.approve("bob", &operation).await?;
            assert_eq!(
                done.state,
                OperationState::Succeeded as i32,
                "{}",
                done.error
            );
            let report = self
                .drift
                .check_drift(CheckDriftRequest {})
                .await?
                .into_inner();
            assert!(report.findings.is_empty(), "{:?}", report.findings);
            requests += 4;
        }
        Ok(requests)
    }
}

#[expect(clippy::print_stdout, reason = "a benchmark prints its report")]
fn bench(token: &TestToken) {
    let total = Duration::from_secs(env_secs("SOAK_SECS", 60));
    let every = Duration::from_secs(env_secs("SOAK_SAMPLE_SECS", (total.as_secs() / 10).max(1)));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let port = free_port();
        let (pki, config, keys) = prepare_ceremonies(token, port);
        let data_dir = pki.dir.join("data");
        let mut daemon = spawn(env!("CARGO_BIN_EXE_custodyd-under-test"), &config);
        let operator = ready(&pki, port, &mut daemon).await;
        let pid = daemon.id();
        let officers = Officers::new(&keys, officer_channels(&pki, port).await);
        create_key(&operator, "sign", "EC_SIGN_P256_SHA256", None).await;
        create_key(&operator, "env", "AES_256_GCM", None).await;
        create_key(&operator, "rot", "EC_SIGN_P256_SHA256", None).await;
        let policy = request_operation(
            &operator,
            operation_spec::Spec::SetPolicy(SetPolicySpec {
                name: "keys/rot".into(),
                operation: OperationKind::Rotate as i32,
                officers: vec!["alice".into(), "bob".into(), "carol".into()],
                required: 2,
            }),
        )
        .await
        .unwrap();
        officers.approve("alice", &policy).await.unwrap();
        officers.approve("bob", &policy).await.unwrap();
        let signer = connect(&pki, port, &pki.client(SIGNER, &[Role::Signer]))
            .await
            .unwrap();
        let auditor = connect(&pki, port, &pki.client("auditor", &[Role::Auditor]))
            .await
            .unwrap();
        let mut load = Load {
            signer: SigningServiceClient::new(signer.clone()),
            envelope: EnvelopeServiceClient::new(signer),
            operator,
            drift: KeyServiceClient::new(auditor),
        };

        println!(
            "soak: {} s of mixed load, a sample every {} s (custodyd pid {pid})",
            total.as_secs(),
            every.as_secs()
        );
        println!("| minute | requests | RSS (MiB) | open fds | data dir (MiB) | data dir growth per 1,000 requests (KiB) | unary sign p99 (ms) |");
        println!("|---|---|---|---|---|---|---|");
        let started = Instant::now();
        let mut requests = 0_u64;
        let mut window = Vec::new();
        let mut last = read(pid, &data_dir);
        let mut last_requests = 0_u64;
        let mut next_sample = every;
        let mut cycle = 0;
        // A connection custodyd closes at its maximum age
        // (`[connections] max_connection_age_secs`) can cut a request the
        // client had just sent on it: the client connects again and the
        // cycle starts over, as a real client would retry. Counted.
        let mut cut = Vec::new();
        while started.elapsed() < total {
            match load.cycle(cycle, &officers, &mut window).await {
                Ok(made) => requests += made,
                Err(status) if status.message().contains("transport error") => {
                    cut.push(format!("{:.1}", started.elapsed().as_secs_f64() / 60.0));
                }
                Err(status) => panic!("cycle {cycle}: {status:?}"),
            }
            cycle += 1;
            if started.elapsed() >= next_sample || started.elapsed() >= total {
                next_sample += every;
                let now = read(pid, &data_dir);
                let growth = now.data_bytes.saturating_sub(last.data_bytes) as f64
                    / 1024.0
                    / ((requests - last_requests) as f64 / 1000.0);
                println!(
                    "| {:.1} | {requests} | {:.1} | {} | {:.1} | {growth:.1} | {:.2} |",
                    started.elapsed().as_secs_f64() / 60.0,
                    now.rss_kib as f64 / 1024.0,
                    now.fds,
                    now.data_bytes as f64 / (1024.0 * 1024.0),
                    p99(&mut window).as_secs_f64() * 1e3,
                );
                window.clear();
                last = now;
                last_requests = requests;
            }
        }
        println!(
            "cycles cut by a closed connection: {} (at minutes {})",
            cut.len(),
            cut.join(", ")
        );
        assert!(daemon.try_wait().unwrap().is_none(), "custodyd exited under load");
        daemon.kill().unwrap();
        daemon.wait().unwrap();
    });
}

fn main() {
    softhsm_tests::run_bench("soak_bench", bench);
}
