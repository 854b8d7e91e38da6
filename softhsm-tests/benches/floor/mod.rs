//! The floor of every benchmark: plain cryptoki signing (ECDSA P-256,
//! `hsm_shim::floor`, no hsm-shim pool or session logic), on 1 thread and
//! on every core, one session per thread, in a process of its own (the
//! bench re-runs its own executable), so it shares neither login nor
//! PKCS#11 application with the hsm-shim pool of the bench.
//!
//! A bench that uses it calls [`serve`] first thing in `main`.

use std::time::Duration;

use softhsm_tests::TestToken;

const FLOOR_ENV: &str = "CUSTODY_BENCH_FLOOR";

/// In the floor's own process (told apart by its environment): signs for
/// the time asked, prints the count, and exits. Otherwise returns.
pub(crate) fn serve() {
    let Ok(request) = std::env::var(FLOOR_ENV) else {
        return;
    };
    let threads: usize = request.parse().expect("threads");
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name}"));
    let seconds: f64 = var("CUSTODY_BENCH_FLOOR_SECONDS").parse().expect("seconds");
    let pin = std::env::var("CUSTODY_TEST_USER_PIN").expect("the test token's PIN");
    let count = hsm_shim::floor::ecdsa_sign_count(
        &softhsm_tests::module_path(),
        &var("CUSTODY_BENCH_FLOOR_TOKEN"),
        &hsm_shim::SecretString::from(pin),
        &var("CUSTODY_BENCH_FLOOR_KEY"),
        threads,
        Duration::from_secs_f64(seconds),
    )
    .expect("raw cryptoki signing");
    #[expect(clippy::print_stdout, reason = "the parent reads the count")]
    {
        println!("{count}");
    }
    std::process::exit(0);
}

/// Raw cryptoki ECDSA P-256 signatures per second with the private key
/// labelled `key_label` on `token`, in `threads` threads.
pub(crate) fn rate(token: &TestToken, key_label: &str, threads: usize, seconds: f64) -> f64 {
    let output = std::process::Command::new(std::env::current_exe().expect("own executable"))
        .env(FLOOR_ENV, threads.to_string())
        .env("CUSTODY_BENCH_FLOOR_SECONDS", seconds.to_string())
        .env("CUSTODY_BENCH_FLOOR_TOKEN", token.label())
        .env("CUSTODY_BENCH_FLOOR_KEY", key_label)
        .env("SOFTHSM2_CONF", token.conf())
        .env("CUSTODY_TEST_USER_PIN", token.user_pin())
        .output()
        .expect("run the floor");
    softhsm_tests::assert_success("the raw cryptoki floor", &output);
    let count: f64 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("the floor prints a count");
    count / seconds
}

/// Every core the machine gives this process.
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}
