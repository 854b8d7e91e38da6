//! The gRPC health service: liveness and readiness (threat model O4).
//!
//! The empty service name is liveness: SERVING while custodyd answers at
//! all. Each API service's own name is its readiness: SERVING only while it
//! can do its work ([`custody_core::readiness`]): the audit service while
//! the audit log records; every other service while, in addition, the data
//! directory has room, no HSM call is stuck, the HSM is not paused for a
//! security officer step, and the last signing self-test passed. A probe
//! (Kubernetes' gRPC probe, a load balancer) asks for
//! `custody.v1.SigningService` to know whether custodyd can sign.
//!
//! Once a second the watch below samples these, reports changes to the
//! health service, to the metrics and to systemd's status line, and expires
//! operations past their approval window. The self-test runs in a task of
//! its own, so that a hung HSM call holds only it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use custody_core::Custody;
use custody_core::metrics;
use custody_core::operations::vote::expire_due;
use custody_core::readiness::{Conditions, Need};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The API services and what each needs to be ready.
pub const SERVICES: [(&str, Need); 6] = [
    ("custody.v1.KeyService", Need::Everything),
    ("custody.v1.SigningService", Need::Everything),
    ("custody.v1.AuditService", Need::AuditOnly),
    ("custody.v1.OperationService", Need::Everything),
    ("custody.v1.EnvelopeService", Need::Everything),
    ("custody.v1.CeremonyService", Need::Everything),
];

fn status(serving: bool) -> ServingStatus {
    if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Sets the first statuses: alive, and every service ready (custodyd's
/// start has just passed its self-test).
pub async fn start(reporter: &HealthReporter) {
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    metrics::alive();
    for (service, _) in SERVICES {
        reporter
            .set_service_status(service, ServingStatus::Serving)
            .await;
        metrics::service_serving(service, true);
    }
}

/// Runs the signing self-test every `interval` (never if zero) and keeps
/// its last result in `signed`. Ends when the server's state is gone.
pub async fn self_tests(
    state: Weak<Custody>,
    public_key: Vec<u8>,
    interval: Duration,
    signed: Arc<AtomicBool>,
) {
    if interval.is_zero() {
        return;
    }
    let mut ticks = tokio::time::interval(interval);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(state) = state.upgrade() else {
            return;
        };
        let result = custody_core::readiness::self_test(&state.hsm, &public_key).await;
        drop(state);
        match &result {
            Ok(()) => metrics::self_test("ok"),
            Err(error) => {
                metrics::self_test("failed");
                tracing::error!(%error, "signing self-test failed: not ready");
            }
        }
        signed.store(result.is_ok(), Ordering::SeqCst);
    }
}

/// The once-a-second watch (see the module docs). Ends when the server's
/// state is gone.
pub async fn watch(state: Weak<Custody>, reporter: HealthReporter, signed: Arc<AtomicBool>) {
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    let mut reported: Option<Conditions> = None;
    loop {
        interval.tick().await;
        let Some(state) = state.upgrade() else {
            return;
        };
        state.headroom.sample();
        expire_due(&state).await;
        let stuck = state.hsm.stuck_calls();
        metrics::hsm(state.hsm.queued(), state.hsm.workers());
        metrics::hsm_lost(state.hsm.lost_workers(), stuck);
        let conditions = Conditions {
            audit_records: state.audit.healthy(),
            storage_room: !state.headroom.is_short(),
            // A hung HSM call: the pool serves on with fresh workers, but
            // the HSM is not answering; say so until the call returns.
            hsm_answering: stuck == 0,
            hsm_unpaused: !state.hsm.paused(),
            self_test_signed: signed.load(Ordering::SeqCst),
        };
        drop(state);
        metrics::alive();
        metrics::readiness(&conditions.states());
        metrics::serving(conditions.ready_for(Need::Everything));
        if reported == Some(conditions) {
            continue;
        }
        for (service, need) in SERVICES {
            let serving = conditions.ready_for(need);
            metrics::service_serving(service, serving);
            if reported.is_none_or(|before| before.ready_for(need) != serving) {
                reporter.set_service_status(service, status(serving)).await;
            }
        }
        let reasons = conditions.reasons();
        if reasons.is_empty() {
            crate::notify::status("ready");
        } else {
            tracing::warn!(reasons = %reasons.join("; "), "not ready");
            crate::notify::status(&format!("not ready: {}", reasons.join("; ")));
        }
        reported = Some(conditions);
    }
}
