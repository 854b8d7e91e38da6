//! Raw throughput of the HSM boundary on SoftHSM2: the baseline every service
//! figure is divided by.
//!
//! For ECDSA P-256, Ed25519, RSA-2048 (PSS) signing and AES-256-GCM (1 KiB),
//! it measures operations per second
//! - directly on `HsmSession`s owned by 1 and by 2 caller threads (the raw
//!   baseline), and
//! - through `Hsm::run`, the async worker pool the daemon uses, with 1 and 2
//!   workers and 1, 2 and 16 concurrent async callers, and
//! - through tokio's `spawn_blocking` with a session per blocking thread (the
//!   design we did not choose), with 16 callers,
//!
//! - for ECDSA P-256, the floor under all of them: plain cryptoki on 1
//!   thread and on every core (`floor/mod.rs`), at the start and the end of
//!   the run,
//!
//! each the median of `BENCH_ROUNDS` (default 3) runs of `BENCH_SECONDS`
//! (default 1) seconds, and prints a Markdown table with each figure as a ratio
//! of the one-thread direct figure measured in the same run.
//!
//! Run: `cargo bench -p softhsm-tests --bench raw_hsm`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hsm_shim::{
    AesRole, EcdsaEncoding, Exportability, HashAlg, Hsm, HsmSession, KeyLabel, KeySpec,
    SignAlgorithm, SignInput,
};
use softhsm_tests::TestToken;

mod floor;

#[derive(Clone, Copy, Debug)]
enum Op {
    EcdsaP256,
    Ed25519,
    Rsa2048,
    AesGcm1k,
}

impl Op {
    const ALL: [Op; 4] = [Op::EcdsaP256, Op::Ed25519, Op::Rsa2048, Op::AesGcm1k];

    fn name(self) -> &'static str {
        match self {
            Op::EcdsaP256 => "ECDSA P-256 sign",
            Op::Ed25519 => "Ed25519 sign (64 B)",
            Op::Rsa2048 => "RSA-2048 PSS sign",
            Op::AesGcm1k => "AES-256-GCM encrypt 1 KiB",
        }
    }

    fn label(self) -> KeyLabel {
        KeyLabel::new(format!("bench-{self:?}")).expect("label")
    }

    fn create(self, session: &mut HsmSession) {
        let label = self.label();
        let made = match self {
            Op::EcdsaP256 => {
                session.generate_key_pair(&label, KeySpec::EcP256, Exportability::NonExportable)
            }
            Op::Ed25519 => {
                session.generate_key_pair(&label, KeySpec::Ed25519, Exportability::NonExportable)
            }
            Op::Rsa2048 => {
                session.generate_key_pair(&label, KeySpec::Rsa2048, Exportability::NonExportable)
            }
            Op::AesGcm1k => session.generate_aes_key(
                &label,
                AesRole::DataEncryption,
                Exportability::NonExportable,
            ),
        };
        made.expect("create benchmark key");
    }

    fn run_once(self, session: &mut HsmSession, label: &KeyLabel) -> hsm_shim::Result<()> {
        const DIGEST: [u8; 32] = [0x5a; 32];
        const MESSAGE: [u8; 64] = [0xa5; 64];
        const PLAINTEXT: [u8; 1024] = [0x3c; 1024];
        let der = EcdsaEncoding::Der;
        match self {
            Op::EcdsaP256 => session
                .sign(
                    label,
                    SignAlgorithm::EcdsaP256Sha256,
                    SignInput::Digest(&DIGEST),
                    der,
                )
                .map(drop),
            Op::Ed25519 => session
                .sign(
                    label,
                    SignAlgorithm::Ed25519,
                    SignInput::Message(&MESSAGE),
                    der,
                )
                .map(drop),
            Op::Rsa2048 => session
                .sign(
                    label,
                    SignAlgorithm::RsaPss(HashAlg::Sha256),
                    SignInput::Digest(&DIGEST),
                    der,
                )
                .map(drop),
            Op::AesGcm1k => session.encrypt_gcm(label, b"bench", &PLAINTEXT).map(drop),
        }
    }
}

struct Settings {
    seconds: f64,
    rounds: usize,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// `threads` threads, each with its own session, call the HSM directly.
fn direct(hsm: &Hsm, op: Op, threads: usize, settings: &Settings) -> f64 {
    let rates = (0..settings.rounds)
        .map(|_| {
            let deadline = Instant::now() + Duration::from_secs_f64(settings.seconds);
            let total: u64 = std::thread::scope(|scope| {
                let workers: Vec<_> = (0..threads)
                    .map(|_| {
                        scope.spawn(|| {
                            let mut session = hsm.session().expect("session");
                            let label = op.label();
                            let mut count = 0u64;
                            while Instant::now() < deadline {
                                op.run_once(&mut session, &label).expect("operation");
                                count += 1;
                            }
                            count
                        })
                    })
                    .collect();
                workers.into_iter().map(|w| w.join().expect("thread")).sum()
            });
            total as f64 / settings.seconds
        })
        .collect();
    median(rates)
}

/// `callers` async tasks call through the worker pool.
fn pooled(hsm: &Hsm, op: Op, callers: usize, settings: &Settings) -> f64 {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let rates = (0..settings.rounds)
        .map(|_| {
            let count = Arc::new(AtomicU64::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            runtime.block_on(async {
                let tasks: Vec<_> = (0..callers)
                    .map(|_| {
                        let hsm = hsm.clone();
                        let count = count.clone();
                        let stop = stop.clone();
                        tokio::spawn(async move {
                            let label = op.label();
                            while !stop.load(Ordering::Relaxed) {
                                let label = label.clone();
                                hsm.run(move |s| op.run_once(s, &label))
                                    .await
                                    .expect("operation");
                                count.fetch_add(1, Ordering::Relaxed);
                            }
                        })
                    })
                    .collect();
                tokio::time::sleep(Duration::from_secs_f64(settings.seconds)).await;
                stop.store(true, Ordering::Relaxed);
                for task in tasks {
                    task.await.expect("task");
                }
            });
            count.load(Ordering::Relaxed) as f64 / settings.seconds
        })
        .collect();
    median(rates)
}

thread_local! {
    static BLOCKING_SESSION: std::cell::RefCell<Option<HsmSession>> =
        const { std::cell::RefCell::new(None) };
}

/// The alternative design: `callers` async tasks each hand the operation to
/// tokio's blocking pool, whose threads keep a session in a thread-local.
fn spawn_blocking(hsm: &Hsm, op: Op, callers: usize, settings: &Settings) -> f64 {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let rates = (0..settings.rounds)
        .map(|_| {
            let count = Arc::new(AtomicU64::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            runtime.block_on(async {
                let tasks: Vec<_> = (0..callers)
                    .map(|_| {
                        let hsm = hsm.clone();
                        let count = count.clone();
                        let stop = stop.clone();
                        tokio::spawn(async move {
                            while !stop.load(Ordering::Relaxed) {
                                let hsm = hsm.clone();
                                tokio::task::spawn_blocking(move || {
                                    BLOCKING_SESSION.with(|cell| {
                                        let mut slot = cell.borrow_mut();
                                        let session = slot
                                            .get_or_insert_with(|| hsm.session().expect("session"));
                                        op.run_once(session, &op.label()).expect("operation");
                                    });
                                })
                                .await
                                .expect("blocking task");
                                count.fetch_add(1, Ordering::Relaxed);
                            }
                        })
                    })
                    .collect();
                tokio::time::sleep(Duration::from_secs_f64(settings.seconds)).await;
                stop.store(true, Ordering::Relaxed);
                for task in tasks {
                    task.await.expect("task");
                }
            });
            count.load(Ordering::Relaxed) as f64 / settings.seconds
        })
        .collect();
    median(rates)
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[expect(clippy::print_stdout, reason = "a benchmark prints its report")]
fn bench(token: &TestToken) {
    let settings = Settings {
        seconds: env_number("BENCH_SECONDS", 1.0),
        rounds: env_number("BENCH_ROUNDS", 3),
    };
    let setup = token.open();
    let mut session = setup.session().expect("session");
    for op in Op::ALL {
        op.create(&mut session);
    }
    drop(session);
    let ecdsa = Op::EcdsaP256.label();
    let floor_rounds = |threads| {
        median(
            (0..settings.rounds)
                .map(|_| floor::rate(token, ecdsa.as_str(), threads, settings.seconds))
                .collect(),
        )
    };
    let start = (floor_rounds(1), floor_rounds(floor::cores()));

    println!(
        "SoftHSM2 raw throughput, ops/s (median of {} x {} s); ratio to 1 direct thread in brackets\n",
        settings.rounds, settings.seconds
    );
    println!(
        "| operation | direct, 1 thread | direct, 2 threads | pool 1 worker, 1 caller | pool 1 worker, 16 callers | pool 2 workers, 1 caller | pool 2 workers, 2 callers | pool 2 workers, 16 callers | spawn_blocking (2 threads), 16 callers |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for op in Op::ALL {
        let base = direct(&setup, op, 1, &settings);
        let mut cells = vec![format!("{base:.0}")];
        let mut add = |rate: f64| cells.push(format!("{rate:.0} ({:.2})", rate / base));
        add(direct(&setup, op, 2, &settings));
        for workers in [1, 2] {
            let pool = Hsm::open(token.config(workers)).expect("open pool");
            let callers: &[usize] = if workers == 1 { &[1, 16] } else { &[1, 2, 16] };
            for &c in callers {
                add(pooled(&pool, op, c, &settings));
            }
        }
        add(spawn_blocking(&setup, op, 16, &settings));
        println!("| {} | {} |", op.name(), cells.join(" | "));
    }
    let end = (floor_rounds(1), floor_rounds(floor::cores()));
    let shim = direct(&setup, Op::EcdsaP256, 1, &settings);
    let one = f64::midpoint(start.0, end.0);
    let all = f64::midpoint(start.1, end.1);
    let cores = floor::cores();
    println!(
        "\nECDSA P-256, plain cryptoki (one session per thread), start / end of the run; ratio to {cores} threads (mean) in brackets\n"
    );
    println!(
        "| path | signatures/s | to raw cryptoki, 1 thread | to raw cryptoki, {cores} threads |"
    );
    println!("|---|---|---|---|");
    println!(
        "| raw cryptoki, 1 thread | {:.0} / {:.0} | 1.00 | {:.2} |",
        start.0,
        end.0,
        one / all
    );
    println!(
        "| raw cryptoki, {cores} threads | {:.0} / {:.0} | {:.2} | 1.00 |",
        start.1,
        end.1,
        all / one
    );
    println!(
        "| hsm-shim direct, 1 thread (after the floor) | {shim:.0} | {:.2} | {:.2} |",
        shim / one,
        shim / all
    );
}

fn main() {
    floor::serve();
    softhsm_tests::run_bench("raw_hsm", bench);
}
