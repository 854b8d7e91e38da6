//! Start-up time as the audit log grows (threat model Q1): custodyd checks
//! the audit chain at start from its last signed checkpoint, so a restart
//! should cost the same with a short log and with a million records.
//!
//! On a fresh SoftHSM2 token: custodyd with `STARTUP_KEYS` (default 10,000)
//! registry keys written straight into its database, restarted
//! `STARTUP_ROUNDS` (default 3) times; then `STARTUP_RECORDS` (default
//! 1,000,000) audit records appended through the audit writer (group
//! commit, a signed checkpoint every 1,000 records, as in production), and
//! restarted again as many times. A *restart* is everything
//! `Daemon::open` does and the server's start: database, integrity check,
//! HSM login and worker sessions, registry, audit log. Then, on the stopped
//! database, the parts alone: the check at start, the whole-chain check
//! (`custodyd --check`, what start-up did before), and the registry load.
//!
//! Opt-in and slow (the fill takes minutes and ~600 MB of disk):
//! `cargo bench -p softhsm-tests --bench startup`

use std::time::{Duration, Instant};

use custody_core::audit::Event;
use futures_util::StreamExt;
use softhsm_tests::TestToken;
use softhsm_tests::service::TestService;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn spread(times: &[Duration]) -> String {
    let mut sorted = times.to_vec();
    sorted.sort();
    format!(
        "{} (median; {} to {} over {})",
        ms(sorted[sorted.len() / 2]),
        ms(sorted[0]),
        ms(sorted[sorted.len() - 1]),
        sorted.len()
    )
}

/// With `STARTUP_PERF_CTL` naming the control FIFO of a
/// `perf record --control=fifo:... -D -1` around the bench, turns the
/// profile on or off (`enable`, `disable`), so that it holds the restarts
/// with a long log and not the fill.
fn perf_control(command: &str) {
    if let Ok(path) = std::env::var("STARTUP_PERF_CTL") {
        let _ = std::fs::write(path, format!("{command}\n"));
    }
}

/// Each restart's time, and its phases as custodyd timed them.
type Restarts = (Vec<Duration>, Vec<Vec<(&'static str, Duration)>>);

async fn restarts(service: &mut TestService, rounds: usize, profiled: bool) -> Restarts {
    let (mut times, mut phases) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // The profile covers the long log's restarts alone.
        if round == 0 && profiled {
            perf_control("enable");
        }
        service.stop().await;
        let start = Instant::now();
        service.restart().await;
        times.push(start.elapsed());
        phases.push(service.start_phases().phases().to_vec());
    }
    if profiled {
        perf_control("disable");
    }
    (times, phases)
}

/// One line per phase of the start: median and range over the restarts.
fn phase_lines(phases: &[Vec<(&'static str, Duration)>]) -> Vec<String> {
    let Some(first) = phases.first() else {
        return Vec::new();
    };
    first
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            let times: Vec<Duration> = phases
                .iter()
                .filter_map(|p| p.get(i).map(|x| x.1))
                .collect();
            format!("{name}: {}", spread(&times))
        })
        .collect()
}

/// Appends `records` request records through the audit writer, many at a
/// time (its group commit writes up to 100 per flush).
async fn fill_audit(service: &TestService, records: usize) {
    let audit = service.state().audit.clone();
    futures_util::stream::iter(0..records)
        .map(|i| {
            let audit = audit.clone();
            async move {
                audit
                    .append(Event::Request {
                        principal: "ca-issuing".into(),
                        method: "/custody.v1.SigningService/Sign".into(),
                        resource: format!("keys/key-{:05}/versions/1", i % 10_000),
                        detail: format!("sha256:{}", "5a".repeat(32)),
                        outcome: "ok".into(),
                        request_id: Some(format!("{i:016x}")),
                    })
                    .await
                    .expect("append");
            }
        })
        .buffer_unordered(1024)
        .collect::<Vec<()>>()
        .await;
}

/// The parts of a start, on the stopped database: `(opening the database,
/// check at start, whole check, registry load)`.
type Parts = (Duration, Duration, Duration, Duration, String);

fn parts(service: &TestService) -> Parts {
    let start = Instant::now();
    let db = custody_daemon::server::open_db(
        &service.config.data_dir,
        service.config.storage.cache_bytes(),
    )
    .expect("db");
    let records = custody_core::audit::RecordHome::of_data_dir(&db, &service.config.data_dir)
        .expect("audit records");
    let open_time = start.elapsed();
    let start = Instant::now();
    let at_start = custody_core::integrity::check_at_start(&db, &records);
    let at_start_time = start.elapsed();
    assert!(
        at_start.is_clean(),
        "{}",
        at_start.describe(&service.config.data_dir)
    );
    // `STARTUP_WHOLE=0` leaves the whole-chain check out (minutes at a
    // million records; the start does not run it).
    let (whole_time, whole_records) = if env_number("STARTUP_WHOLE", 1) == 0 {
        (Duration::ZERO, 0)
    } else {
        let start = Instant::now();
        let whole = custody_core::integrity::check(&db, &records);
        let whole_time = start.elapsed();
        assert!(
            whole.is_clean(),
            "{}",
            whole.describe(&service.config.data_dir)
        );
        (whole_time, whole.chain.records())
    };
    let epochs = custody_core::shared::Epochs::open(&db, "bench").expect("epochs");
    let start = Instant::now();
    let registry = custody_core::registry::Registry::open(&db, &epochs).expect("registry");
    let registry_time = start.elapsed();
    let what = format!(
        "{} keys; check at start read {} records from record {}, whole check {} records",
        registry.len(),
        at_start.chain.records(),
        at_start.chain.first_checked(),
        whole_records
    );
    (open_time, at_start_time, whole_time, registry_time, what)
}

#[expect(clippy::print_stdout, reason = "a benchmark prints its report")]
fn bench(token: &TestToken) {
    let keys = env_number("STARTUP_KEYS", 10_000);
    let records = env_number("STARTUP_RECORDS", 1_000_000);
    let rounds = env_number("STARTUP_ROUNDS", 3);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut service = TestService::start(token).await;
        service.stop().await;
        let db = custody_daemon::server::open_db(
            &service.config.data_dir,
            service.config.storage.cache_bytes(),
        )
        .expect("db");
        softhsm_tests::service::fill_registry(&db, keys);
        drop(db);
        service.restart().await;
        let short_log = service.audit_len();
        let (short, short_phases) = restarts(&mut service, rounds, false).await;
        let short_parts: Vec<_> = {
            service.stop().await;
            let parts = (0..rounds).map(|_| parts(&service)).collect();
            service.restart().await;
            parts
        };

        let start = Instant::now();
        fill_audit(&service, records).await;
        let fill = start.elapsed();
        let long_log = service.audit_len();
        let (long, long_phases) = restarts(&mut service, rounds, true).await;
        service.stop().await;
        let long_parts: Vec<_> = (0..rounds).map(|_| parts(&service)).collect();

        println!("custodyd restart with {keys} registry keys, {rounds} rounds each\n");
        println!("| audit records | restart | opening the database | check at start | whole-chain check (`--check`) | registry load |");
        println!("|---|---|---|---|---|---|");
        for (log, times, parts) in [(short_log, short, short_parts), (long_log, long, long_parts)] {
            let column =
                |pick: fn(&Parts) -> Duration| spread(&parts.iter().map(pick).collect::<Vec<_>>());
            println!(
                "| {log} | {} | {} | {} | {} | {} |",
                spread(&times),
                column(|p| p.0),
                column(|p| p.1),
                column(|p| p.2),
                column(|p| p.3)
            );
            println!("\n({})\n", parts[0].4);
        }
        for (log, phases) in [(short_log, &short_phases), (long_log, &long_phases)] {
            println!("restart phases with {log} audit records:");
            for line in phase_lines(phases) {
                println!("  {line}");
            }
        }
        println!(
            "filled {records} records through the audit writer in {:.1} s ({:.0}/s)",
            fill.as_secs_f64(),
            records as f64 / fill.as_secs_f64()
        );
    });
}

fn main() {
    softhsm_tests::run_bench("startup_bench", bench);
}
