//! Prometheus metrics: every name custodyd exports is defined here.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `custody_requests_total` | counter | method, code |
//! | `custody_request_seconds` | histogram | method, code |
//! | `custody_signatures_total` | counter | key, algorithm |
//! | `custody_audit_append_seconds` | histogram | |
//! | `custody_audit_records_total` | counter | |
//! | `custody_audit_checkpoints_total` | counter | outcome |
//! | `custody_serving` | gauge | (readiness of the signing services: 1 serving, 0 not) |
//! | `custody_alive` | gauge | (1 while custodyd answers: the health service's empty name) |
//! | `custody_service_serving` | gauge | service (the gRPC service's full name): what health reports for it |
//! | `custody_readiness_condition` | gauge | condition (audit_records, storage_room, hsm_answering, hsm_unpaused, self_test_signed): 1 holds, 0 not |
//! | `custody_self_tests_total` | counter | outcome (ok, failed) |
//! | `custody_leader` | gauge | (1 while this replica runs the schedule) |
//! | `custody_storage_free_bytes` | gauge | |
//! | `custody_storage_below_reserve` | gauge | (1 while only reads are served) |
//! | `custody_hsm_queue_depth` | gauge | |
//! | `custody_hsm_workers` | gauge | |
//! | `custody_hsm_workers_lost_total` | counter | (workers abandoned after a call passed `[hsm] call_timeout_ms`) |
//! | `custody_hsm_stuck_calls` | gauge | (abandoned calls that have not returned yet) |
//! | `custody_tls_handshake_failures_total` | counter | reason (no_certificate, expired, revoked, unknown_issuer, …, timeout, connection_limit, handshake_limit) |
//! | `custody_connections_open` | gauge | |
//! | `custody_connections_closed_total` | counter | reason (certificate_no_longer_valid) |
//! | `custody_requests_refused_before_handler_total` | counter | reason |
//! | `custody_certificate_expiry_seconds` | gauge | which (server, client_ca) |
//! | `custody_operations` | gauge | state (pending, succeeded, failed, denied, expired) |
//! | `custody_rotations_total` | counter | trigger (demand, schedule, compromise, approved), outcome (done, failed, replayed) |
//! | `custody_rotations_overdue` | gauge | |
//! | `custody_versions_destroyed_total` | counter | outcome (done, failed) |
//! | `custody_rewraps_total` | counter | outcome (ok or the refusal reason) |
//! | `custody_rewrap_seconds` | histogram | |
//! | `custody_envelope_operations_total` | counter | method, outcome |
//! | `custody_drift_findings` | gauge | kind (missing, extra, attribute_mismatch) |
//! | `custody_drift_checks_total` | counter | outcome (ok, failed) |
//! | `custody_drift_last_check_timestamp_seconds` | gauge | |
//! | `custody_ceremonies_finished_total` | counter | kind (root-key, kek, restore), outcome (completed, rolled-back, aborted) |
//! | `custody_restore_rto_seconds` | gauge | drill (true, false): the last restore's RTO |
//! | `custody_clock_steps_total` | counter | direction (forward, backward): wall-clock steps beyond the tolerance |
//! | `custody_clock_behind_seconds` | gauge | how far the wall clock is behind the time custodyd decides by |

use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The `# HELP` text of every metric custodyd exports (a test checks that
/// each name recorded below has one).
pub const DESCRIPTIONS: &[(&str, &str)] = &[
    (
        "custody_requests_total",
        "Requests finished, by method and gRPC code.",
    ),
    (
        "custody_request_seconds",
        "Time to serve a request, by method and gRPC code.",
    ),
    (
        "custody_signatures_total",
        "Signatures made, by key and algorithm.",
    ),
    (
        "custody_audit_append_seconds",
        "Time to make one audit record durable.",
    ),
    ("custody_audit_records_total", "Audit records appended."),
    (
        "custody_audit_checkpoints_total",
        "Signed audit checkpoints attempted, by outcome.",
    ),
    (
        "custody_serving",
        "1 while the signing services are ready (what health reports for custody.v1.SigningService).",
    ),
    (
        "custody_alive",
        "1 while custodyd answers (health's empty service name).",
    ),
    (
        "custody_service_serving",
        "1 while health reports the service SERVING, 0 NOT_SERVING.",
    ),
    (
        "custody_readiness_condition",
        "1 while the readiness condition holds, 0 while it does not.",
    ),
    (
        "custody_self_tests_total",
        "Signing self-tests with the self-test key, by outcome.",
    ),
    ("custody_leader", "1 while this replica runs the schedule."),
    (
        "custody_storage_free_bytes",
        "Free bytes under the data directory.",
    ),
    (
        "custody_storage_below_reserve",
        "1 while free space is below [storage] reserve_mib (reads only).",
    ),
    ("custody_hsm_queue_depth", "HSM jobs waiting for a worker."),
    (
        "custody_hsm_workers",
        "HSM worker threads, each with its own session.",
    ),
    (
        "custody_hsm_workers_lost_total",
        "HSM workers abandoned after a call passed [hsm] call_timeout_ms.",
    ),
    (
        "custody_hsm_stuck_calls",
        "Abandoned HSM calls that have not returned yet.",
    ),
    (
        "custody_tls_handshake_failures_total",
        "Refused TLS handshakes and connections, by reason.",
    ),
    (
        "custody_connections_open",
        "Client connections open (handshaking or served).",
    ),
    (
        "custody_connections_closed_total",
        "Open connections custodyd closed, by reason.",
    ),
    (
        "custody_requests_refused_before_handler_total",
        "Requests refused before any handler, by reason.",
    ),
    (
        "custody_certificate_expiry_seconds",
        "Seconds until the certificate expires (negative once expired).",
    ),
    ("custody_operations", "Operations by state."),
    (
        "custody_rotations_total",
        "Rotation attempts, by trigger and outcome.",
    ),
    (
        "custody_rotations_overdue",
        "Keys whose primary version's cryptoperiod ended without a rotation.",
    ),
    (
        "custody_versions_destroyed_total",
        "Scheduled destructions attempted, by outcome.",
    ),
    ("custody_rewraps_total", "Data key rewraps, by outcome."),
    ("custody_rewrap_seconds", "Time to rewrap a data key."),
    (
        "custody_envelope_operations_total",
        "Envelope requests, by method and outcome.",
    ),
    (
        "custody_drift_findings",
        "Drift findings of the last check, by kind.",
    ),
    ("custody_drift_checks_total", "Drift checks, by outcome."),
    (
        "custody_drift_last_check_timestamp_seconds",
        "Unix time of the last drift check that ran.",
    ),
    (
        "custody_ceremonies_finished_total",
        "Ceremonies ended, by kind and outcome.",
    ),
    (
        "custody_restore_rto_seconds",
        "RTO of the last restore or drill, in seconds.",
    ),
    (
        "custody_clock_steps_total",
        "Wall-clock steps beyond the tolerance, by direction.",
    ),
    (
        "custody_clock_behind_seconds",
        "How far the wall clock is behind the time custodyd decides by.",
    ),
];

static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
    std::sync::OnceLock::new();

/// Installs the Prometheus recorder, with a `# HELP` line for every
/// metric, and returns the handle that renders the exposition. A second
/// call in one process (tests) returns the first recorder's handle.
pub fn install() -> Result<metrics_exporter_prometheus::PrometheusHandle, String> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        ])
        .map_err(|e| e.to_string())?
        .build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        // Another recorder was set first in this process: keep it.
        return Err("metrics: another recorder is installed".into());
    }
    for (name, help) in DESCRIPTIONS {
        metrics::describe_gauge!(*name, *help);
    }
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// One request finished with status `code` (the API's name for it, e.g.
/// `Ok`, `PermissionDenied`).
pub fn request(method: &'static str, code: String, seconds: f64) {
    metrics::counter!("custody_requests_total", "method" => method, "code" => code.clone())
        .increment(1);
    metrics::histogram!("custody_request_seconds", "method" => method, "code" => code)
        .record(seconds);
}

/// One signature made.
pub fn signature(key: &str, algorithm: &'static str) {
    metrics::counter!("custody_signatures_total", "key" => key.to_string(), "algorithm" => algorithm)
        .increment(1);
}

/// One audit append made durable (or not).
pub fn audit_append(seconds: f64) {
    metrics::histogram!("custody_audit_append_seconds").record(seconds);
    metrics::counter!("custody_audit_records_total").increment(1);
}

/// A checkpoint attempt.
pub fn audit_checkpoint(outcome: &'static str) {
    metrics::counter!("custody_audit_checkpoints_total", "outcome" => outcome).increment(1);
}

/// What health reports: serving or not.
pub fn serving(serving: bool) {
    metrics::gauge!("custody_serving").set(if serving { 1.0 } else { 0.0 });
}

/// custodyd answers (liveness).
pub fn alive() {
    metrics::gauge!("custody_alive").set(1.0);
}

/// What health reports for `service`.
pub fn service_serving(service: &'static str, serving: bool) {
    metrics::gauge!("custody_service_serving", "service" => service).set(if serving {
        1.0
    } else {
        0.0
    });
}

/// Each readiness condition, and whether it holds.
pub fn readiness(conditions: &[(&'static str, bool)]) {
    for (condition, holds) in conditions {
        metrics::gauge!("custody_readiness_condition", "condition" => *condition).set(if *holds {
            1.0
        } else {
            0.0
        });
    }
}

/// One signing self-test (`ok` or `failed`).
pub fn self_test(outcome: &'static str) {
    metrics::counter!("custody_self_tests_total", "outcome" => outcome).increment(1);
}

/// Whether this replica runs the schedule ([`crate::shared`]).
pub fn leader(leads: bool) {
    metrics::gauge!("custody_leader").set(if leads { 1.0 } else { 0.0 });
}

/// Free space under the data directory, and whether it is below the reserve.
pub fn storage(free_bytes: u64, below_reserve: bool) {
    metrics::gauge!("custody_storage_free_bytes").set(free_bytes as f64);
    metrics::gauge!("custody_storage_below_reserve").set(if below_reserve { 1.0 } else { 0.0 });
}

/// HSM worker use.
pub fn hsm(queue_depth: usize, workers: usize) {
    metrics::gauge!("custody_hsm_queue_depth").set(queue_depth as f64);
    metrics::gauge!("custody_hsm_workers").set(workers as f64);
}

/// Workers lost to HSM calls past their deadline (since the start), and
/// those calls still not returned.
pub fn hsm_lost(lost_total: u64, stuck: usize) {
    metrics::counter!("custody_hsm_workers_lost_total").absolute(lost_total);
    metrics::gauge!("custody_hsm_stuck_calls").set(stuck as f64);
}

/// A refused TLS handshake.
pub fn tls_handshake_failed(reason: &'static str) {
    metrics::counter!("custody_tls_handshake_failures_total", "reason" => reason).increment(1);
}

/// Client connections open now (handshaking or served).
pub fn connections_open(count: usize) {
    metrics::gauge!("custody_connections_open").set(count as f64);
}

/// An open connection custodyd closed itself, and why.
pub fn connection_closed(reason: &'static str) {
    metrics::counter!("custody_connections_closed_total", "reason" => reason).increment(1);
}

/// A request refused before any handler saw it (the refusal's reason).
pub fn refused_before_handler(reason: &'static str) {
    metrics::counter!("custody_requests_refused_before_handler_total", "reason" => reason)
        .increment(1);
}

/// Seconds until `certificate` expires (negative once expired).
pub fn set_certificate_expiry(which: &'static str, certificate: &CertificateDer<'_>) {
    let Ok((_, parsed)) = X509Certificate::from_der(certificate) else {
        return;
    };
    let not_after = parsed.validity().not_after.timestamp();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    metrics::gauge!("custody_certificate_expiry_seconds", "which" => which)
        .set((not_after - now) as f64);
}

/// Operations by state.
pub fn operations(counts: &[(&'static str, usize)]) {
    for (state, count) in counts {
        metrics::gauge!("custody_operations", "state" => *state).set(*count as f64);
    }
}

/// One rotation attempt.
pub fn rotation(trigger: &'static str, outcome: &'static str) {
    metrics::counter!("custody_rotations_total", "trigger" => trigger, "outcome" => outcome)
        .increment(1);
}

/// Keys whose primary version's cryptoperiod has ended without a rotation.
pub fn rotations_overdue(count: usize) {
    metrics::gauge!("custody_rotations_overdue").set(count as f64);
}

/// One scheduled destruction attempt.
pub fn version_destroyed(outcome: &'static str) {
    metrics::counter!("custody_versions_destroyed_total", "outcome" => outcome).increment(1);
}

/// One envelope request finished (`outcome` is `ok` or the error reason).
pub fn envelope(method: &'static str, outcome: &'static str, seconds: f64) {
    metrics::counter!("custody_envelope_operations_total", "method" => method, "outcome" => outcome)
        .increment(1);
    if method == "Rewrap" {
        metrics::counter!("custody_rewraps_total", "outcome" => outcome).increment(1);
        metrics::histogram!("custody_rewrap_seconds").record(seconds);
    }
}

/// The result of a drift check.
pub fn drift(findings_by_kind: &[(&'static str, usize)]) {
    for (kind, count) in findings_by_kind {
        metrics::gauge!("custody_drift_findings", "kind" => *kind).set(*count as f64);
    }
    metrics::counter!("custody_drift_checks_total", "outcome" => "ok").increment(1);
    metrics::gauge!("custody_drift_last_check_timestamp_seconds")
        .set(time::OffsetDateTime::now_utc().unix_timestamp() as f64);
}

/// A ceremony ended.
pub fn ceremony_finished(kind: &str, outcome: &'static str) {
    metrics::counter!("custody_ceremonies_finished_total", "kind" => kind.to_string(), "outcome" => outcome)
        .increment(1);
}

/// The RTO of the last restore or drill.
pub fn restore_rto(drill: bool, seconds: f64) {
    metrics::gauge!("custody_restore_rto_seconds", "drill" => drill.to_string()).set(seconds);
}

/// A drift check that could not run.
pub fn drift_failed() {
    metrics::counter!("custody_drift_checks_total", "outcome" => "failed").increment(1);
}

/// The wall clock stepped by more than the tolerance (`forward` or
/// `backward`).
pub fn clock_step(direction: &'static str) {
    metrics::counter!("custody_clock_steps_total", "direction" => direction).increment(1);
}

/// How far the wall clock is behind the time custodyd decides by.
pub fn clock_behind(ms: i64) {
    metrics::gauge!("custody_clock_behind_seconds").set(ms.max(0) as f64 / 1000.0);
}

#[cfg(test)]
mod tests {
    /// Every metric the example alert rules use is one custodyd exports (the
    /// table in this module's docs lists each name exported above).
    #[test]
    fn every_recorded_metric_has_a_help_text_and_every_help_text_a_metric() {
        let source = include_str!("metrics.rs");
        let body = source.split("#[cfg(test)]").next().unwrap();
        let described: Vec<&str> = super::DESCRIPTIONS.iter().map(|(name, _)| *name).collect();
        let mut recorded = 0;
        for call in ["counter!(\"", "gauge!(\"", "histogram!(\""] {
            for piece in body.split(call).skip(1) {
                let name = piece.split('"').next().unwrap();
                recorded += 1;
                assert!(described.contains(&name), "{name} has no # HELP text");
            }
        }
        assert!(recorded >= 30, "{recorded} metrics recorded");
        for name in described {
            assert!(
                body.matches(&format!("!(\"{name}\"")).count() >= 1,
                "{name} is described but never recorded"
            );
        }
    }

    /// Every query of the Grafana dashboard reads metrics custodyd exports
    /// (a histogram's `_bucket`, `_sum` and `_count` series included), and
    /// every panel has a query.
    #[test]
    fn the_dashboard_queries_only_exported_metrics() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../../deploy/grafana/custody.json")).unwrap();
        let exported = include_str!("metrics.rs");
        let panels = dashboard["panels"].as_array().unwrap();
        assert!(panels.len() >= 10, "{} panels", panels.len());
        let mut queries = 0;
        for panel in panels {
            let title = panel["title"].as_str().unwrap();
            let targets = panel["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "panel {title:?} has no query");
            for target in targets {
                let expr = target["expr"].as_str().unwrap();
                queries += 1;
                let names: Vec<&str> = expr
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|word| word.starts_with("custody_"))
                    .collect();
                assert!(
                    !names.is_empty(),
                    "{title:?}: {expr} reads no custody metric"
                );
                for name in names {
                    let family = ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|suffix| {
                            let base = name.strip_suffix(suffix)?;
                            exported
                                .contains(&format!("histogram!(\"{base}\""))
                                .then_some(base)
                        })
                        .unwrap_or(name);
                    assert!(
                        super::DESCRIPTIONS.iter().any(|(n, _)| *n == family)
                            && exported.contains(&format!("!(\"{family}\"")),
                        "panel {title:?} queries {name}, which custodyd does not export"
                    );
                }
            }
        }
        assert!(queries >= 15, "{queries} queries");
    }

    #[test]
    fn the_alert_rules_use_only_exported_metrics() {
        let rules = include_str!("../../../deploy/prometheus/custody-alerts.yml");
        let exported = include_str!("metrics.rs");
        let mut used = 0;
        for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("custody_") {
                used += 1;
                assert!(
                    exported.contains(&format!("\"{word}\"")),
                    "the alert rules use {word}, which custodyd does not export"
                );
            }
        }
        assert!(used >= 6, "the rules use {used} custody metrics");
    }
}
