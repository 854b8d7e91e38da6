//! The operations sweep (expiry and pruning, every second under the
//! dual-control lock) as finished operations pile up: its cost follows the
//! pending operations, not the store (threat model R2). For contrast, the
//! time to load every operation, which is what each sweep did before the
//! pending index.
//!
//! custodyd runs on a fresh SoftHSM2 token; 16 operations are pending
//! throughout, and finished ones are added in steps (`SWEEP_SIZES`,
//! default `0,1000,10000,50000`). Each figure is the median of
//! `SWEEP_ROUNDS` (default 50) sweeps.
//!
//! Run: `cargo bench -p softhsm-tests --bench sweep`

use std::time::{Duration, Instant};

use custody_core::clock::Clock;
use custody_core::dual_control::operation::{OperationRecord, OperationState, Spec};
use custody_core::dual_control::quorum::{Ballot, Quorum};
use custody_core::operations::vote::expire_due;
use softhsm_tests::TestToken;
use softhsm_tests::service::TestService;

fn record(n: usize, now: i64, state: OperationState) -> OperationRecord {
    OperationRecord {
        id: format!("{n:032x}"),
        spec: Spec::Rotate {
            key_id: "bench".into(),
        },
        requester: format!("requester-{}", n % 8),
        requester_officer: None,
        nonce: format!("{n:032x}"),
        created_ms: now,
        expires_ms: now + 3_600_000,
        quorum: Quorum::new(["alice".to_string(), "bob".into(), "carol".into()], 2)
            .expect("a quorum"),
        digest: "00".repeat(32),
        ballot: Ballot::default(),
        state,
        outcome: None,
        error: None,
        finished_ms: (state != OperationState::Pending).then_some(now),
    }
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[expect(clippy::print_stdout, reason = "a benchmark prints its report")]
fn bench(token: &TestToken) {
    let sizes: Vec<usize> = std::env::var("SWEEP_SIZES")
        .unwrap_or_else(|_| "0,1000,10000,50000".into())
        .split(',')
        .map(|s| s.trim().parse().expect("SWEEP_SIZES: numbers"))
        .collect();
    let rounds: usize = std::env::var("SWEEP_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let service = TestService::start(token).await;
        let state = service.state().clone();
        let now = service.clock.now_ms();
        for n in 0..16 {
            state
                .dual_control
                .put_operation(&record(n, now, OperationState::Pending))
                .await
                .expect("pending operation");
        }
        let mut next = 16;
        let mut baseline = None;
        println!("| finished operations | sweep (median) | ratio to none | loading every operation (the sweep before) |");
        println!("|---|---|---|---|");
        for size in sizes {
            // One at a time, as custodyd writes them (under the store lock).
            while next < 16 + size {
                state
                    .dual_control
                    .put_operation(&record(next, now, OperationState::Succeeded))
                    .await
                    .expect("finished operation");
                next += 1;
            }
            let mut sweeps = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                let started = Instant::now();
                expire_due(&state).await;
                sweeps.push(started.elapsed());
            }
            let sweep = median(sweeps);
            let mut loads = Vec::new();
            for _ in 0..rounds.min(5) {
                let started = Instant::now();
                let all = state.dual_control.operations().expect("all operations");
                loads.push(started.elapsed());
                assert_eq!(all.len(), 16 + size);
            }
            let base = *baseline.get_or_insert(sweep);
            println!(
                "| {size} | {:.0} µs | {:.2} | {:.1} ms |",
                sweep.as_secs_f64() * 1e6,
                sweep.as_secs_f64() / base.as_secs_f64(),
                median(loads).as_secs_f64() * 1e3
            );
        }
        assert_eq!(
            state.dual_control.pending_operations().expect("pending").len(),
            16
        );
    });
}

fn main() {
    softhsm_tests::run_bench("sweep_bench", bench);
}
