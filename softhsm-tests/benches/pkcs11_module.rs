//! Signatures per second through custody's PKCS#11 module
//! (`libcustody_pkcs11.so`, loaded with the cryptoki crate, one session per
//! thread) against custody's gRPC client (one connection per task), in the
//! same run, on the same custodyd and key: what the module's C ABI, its
//! runtime hop and its per-call channel cost.
//!
//! Run: `cargo bench -p softhsm-tests --bench pkcs11_module`
//! (`BENCH_SECONDS`, default 3, sets the length of each measurement.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use custody_core::identity::Role;
use custody_proto::v1::signing_service_client::SigningServiceClient;
use custody_proto::v1::{Digest, SignRequest, SignatureEncoding, digest, sign_request};
use softhsm_tests::TestToken;
use softhsm_tests::pkcs11_module::{library, write_config};
use softhsm_tests::service::{TestService, create_key};

/// `threads` threads signing a SHA-256 digest with CKM_ECDSA through the
/// module for `seconds`.
fn through_module(pkcs11: &Pkcs11, threads: usize, seconds: f64) -> f64 {
    let slot = pkcs11.get_slots_with_token().expect("slots")[0];
    let count = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let session = pkcs11.open_ro_session(slot).expect("session");
                let key = session
                    .find_objects(&[
                        Attribute::Class(ObjectClass::PRIVATE_KEY),
                        Attribute::Label(b"bench".to_vec()),
                    ])
                    .expect("find")[0];
                while !stop.load(Ordering::Relaxed) {
                    session
                        .sign(&Mechanism::Ecdsa, key, &[0x5a; 32])
                        .expect("sign");
                    count.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        std::thread::sleep(Duration::from_secs_f64(seconds));
        stop.store(true, Ordering::Relaxed);
    });
    count.load(Ordering::Relaxed) as f64 / seconds
}

/// `clients` tasks, each on its own connection, calling `Sign` with the
/// same request the module makes.
async fn through_grpc(service: &TestService, clients: usize, seconds: f64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut client = SigningServiceClient::new(service.client("ca-issuing").await);
        let (stop, count) = (stop.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                client
                    .sign(SignRequest {
                        name: "keys/bench/versions/1".into(),
                        input: Some(sign_request::Input::Digest(Digest {
                            digest: Some(digest::Digest::Sha256(vec![0x5a; 32])),
                        })),
                        encoding: SignatureEncoding::Raw as i32,
                        ..Default::default()
                    })
                    .await
                    .expect("sign");
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("task");
    }
    count.load(Ordering::Relaxed) as f64 / seconds
}

#[expect(clippy::print_stdout, reason = "a benchmark prints its report")]
fn bench(token: &TestToken) {
    let seconds = softhsm_tests::bench_seconds(3.0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let service = runtime.block_on(async {
        let service = TestService::start(token).await;
        let operator = service.client("operator").await;
        create_key(&operator, "bench", "EC_SIGN_P256_SHA256", None).await;
        service
    });
    write_config(&service, "ca-issuing", &[Role::Signer], &["bench"]);
    let pkcs11 = Pkcs11::new(library()).expect("load the module");
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    println!("ECDSA P-256 over a SHA-256 digest, {seconds} s per figure, same custodyd and key\n");
    println!("| path | concurrency | signatures/s | module / gRPC |");
    println!("|---|---|---|---|");
    for concurrency in [1, 8] {
        let grpc = runtime.block_on(through_grpc(&service, concurrency, seconds));
        let module = through_module(&pkcs11, concurrency, seconds);
        println!("| gRPC client (tonic), unary Sign | {concurrency} | {grpc:.0} | |");
        println!(
            "| PKCS#11 module (cryptoki, C_Sign CKM_ECDSA) | {concurrency} | {module:.0} | {:.2} |",
            module / grpc
        );
    }
    pkcs11.finalize().expect("C_Finalize");
}

fn main() {
    softhsm_tests::run_bench("pkcs11_module", bench);
}
