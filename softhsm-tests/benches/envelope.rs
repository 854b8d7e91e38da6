//! Data-key operations per second through custodyd (gRPC over loopback mTLS,
//! every request audited and durable before it returns) as ratios of the
//! same HSM work done directly with hsm-shim, measured in the same run:
//! GenerateDataKey (32 random bytes and an AES-256-GCM encryption),
//! Decrypt of a wrapped data key, and Rewrap (decrypt, then encrypt under the
//! primary version). custodyd logs a line per request as the daemon does
//! (to an anonymous file).
//!
//! Run: `cargo bench -p softhsm-tests --bench envelope`
//! (`BENCH_SECONDS`, default 3, sets the length of each measurement.)

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use custody_core::algorithms::KeyAlgorithm;
use custody_core::envelope::{Envelope, seal_header};
use custody_proto::v1::envelope_service_client::EnvelopeServiceClient;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::{
    CreateKeyRequest, DecryptRequest, GenerateDataKeyRequest, RewrapRequest, RotateKeyRequest,
};
use hsm_shim::{GcmCiphertext, HsmSession, KeyLabel};
use softhsm_tests::TestToken;
use softhsm_tests::service::TestService;
use tonic::transport::Channel;

const CLIENTS: usize = 16;

/// Calls `step` in a loop on one thread for `seconds`; returns calls/s.
fn raw_rate(session: &mut HsmSession, seconds: f64, mut step: impl FnMut(&mut HsmSession)) -> f64 {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut count = 0u64;
    while Instant::now() < deadline {
        step(session);
        count += 1;
    }
    count as f64 / seconds
}

/// `CLIENTS` tasks, each on its own connection, calling `call` in a loop.
async fn service_rate<F, Fut>(service: &TestService, seconds: f64, call: F) -> f64
where
    F: Fn(EnvelopeServiceClient<Channel>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let call = Arc::new(call);
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let client = EnvelopeServiceClient::new(service.client("ca-issuing").await);
        let (call, count, stop) = (call.clone(), count.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                call(client.clone()).await;
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let done = count.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("task");
    }
    done as f64 / seconds
}

#[expect(clippy::print_stdout, reason = "a benchmark prints its report")]
fn bench(token: &TestToken) {
    let seconds = softhsm_tests::bench_seconds(3.0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let service = TestService::start(token).await;
        let operator = service.client("operator").await;
        let algorithm = KeyAlgorithm::from_api_name("AES_256_GCM").expect("alg");
        KeyServiceClient::new(operator.clone())
            .create_key(CreateKeyRequest {
                key_id: "kek".into(),
                algorithm: custody_daemon::wire::algorithm(algorithm) as i32,
                purpose: custody_daemon::wire::purpose(algorithm.purpose()) as i32,
                allowed_signers: vec!["ca-issuing".into()],
                ..Default::default()
            })
            .await
            .expect("create key");
        let mut app = EnvelopeServiceClient::new(service.client("ca-issuing").await);
        let wrapped = app
            .generate_data_key(GenerateDataKeyRequest { name: "keys/kek".into(), associated_data: b"bench".to_vec() })
            .await
            .expect("data key")
            .into_inner()
            .wrapped;
        KeyServiceClient::new(operator)
            .rotate_key(RotateKeyRequest { name: "keys/kek".into(), ..Default::default() })
            .await
            .expect("rotate");

        // The same HSM work, direct: v1 holds the wrapped key, v2 is primary.
        let (v1, v2) = (KeyLabel::new("key/kek/v1").expect("label"), KeyLabel::new("key/kek/v2").expect("label"));
        let parsed = Envelope::parse(&wrapped).expect("envelope");
        let sealed = GcmCiphertext { iv: parsed.nonce, ciphertext_and_tag: parsed.sealed.to_vec() };
        let source_aad = parsed.gcm_aad(b"bench");
        let (_, target_aad) = seal_header("kek", 2, b"bench");
        let (raw_generate, raw_unwrap, raw_rewrap) = tokio::task::block_in_place(|| {
            let mut session = service.state().hsm.session().expect("session");
            let generate = raw_rate(&mut session, seconds, |s| {
                let mut key = [0u8; 32];
                s.random(&mut key).expect("random");
                s.encrypt_gcm(&v2, &target_aad, &key).expect("encrypt");
            });
            let unwrap = raw_rate(&mut session, seconds, |s| {
                s.decrypt_gcm(&v1, &source_aad, &sealed).expect("decrypt");
            });
            let rewrap = raw_rate(&mut session, seconds, |s| {
                let key = s.decrypt_gcm(&v1, &source_aad, &sealed).expect("decrypt");
                s.encrypt_gcm(&v2, &target_aad, &key).expect("encrypt");
            });
            (generate, unwrap, rewrap)
        });

        let generate = service_rate(&service, seconds, |mut client| async move {
            client
                .generate_data_key(GenerateDataKeyRequest { name: "keys/kek".into(), associated_data: b"bench".to_vec() })
                .await
                .expect("GenerateDataKey");
        })
        .await;
        let unwrap_input = wrapped.clone();
        let unwrap = service_rate(&service, seconds, move |mut client| {
            let ciphertext = unwrap_input.clone();
            async move {
                client
                    .decrypt(DecryptRequest { name: "keys/kek".into(), ciphertext, associated_data: b"bench".to_vec() })
                    .await
                    .expect("Decrypt");
            }
        })
        .await;
        let rewrap_input = wrapped.clone();
        let rewrap = service_rate(&service, seconds, move |mut client| {
            let ciphertext = rewrap_input.clone();
            async move {
                client
                    .rewrap(RewrapRequest { name: "keys/kek".into(), ciphertext, associated_data: b"bench".to_vec() })
                    .await
                    .expect("Rewrap");
            }
        })
        .await;
        println!("AES-256-GCM data keys, {seconds} s per figure; {CLIENTS} gRPC clients; ratio to raw hsm-shim (1 thread, same run) in brackets\n");
        println!("| operation | raw hsm-shim/s | custodyd/s (ratio) |");
        println!("|---|---|---|");
        for (name, raw, served) in [
            ("GenerateDataKey", raw_generate, generate),
            ("Decrypt (unwrap a data key)", raw_unwrap, unwrap),
            ("Rewrap", raw_rewrap, rewrap),
        ] {
            println!("| {name} | {raw:.0} | {served:.0} ({:.2}) |", served / raw);
        }
    });
}

fn main() {
    let _log = softhsm_tests::log_like_custodyd();
    softhsm_tests::run_bench("envelope_bench", bench);
}
