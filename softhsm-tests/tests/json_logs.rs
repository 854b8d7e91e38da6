//! custodyd's log as journald gets it (stderr to a file, not a terminal).
//! The JSON format (`CUSTODY_LOG_FORMAT=json`): one JSON object per line,
//! and a request's line carries the `request_id` of its audit record, so
//! that an operator can go from either to the other. The text format: no
//! terminal escapes, and every line logged before a stop is written. custodyd
//! as a process on SoftHSM2, reached over real mTLS.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::process::{Command, Stdio};

use custody_core::identity::Role;
use custody_proto::v1::GetKeyRequest;
use custody_proto::v1::key_service_client::KeyServiceClient;
use softhsm_tests::process::{Daemon, audit_export, connect, free_port, prepare, ready};
use softhsm_tests::service::runtime;
use softhsm_tests::token_test;

const CUSTODYD: &str = env!("CARGO_BIN_EXE_custodyd-under-test");

/// custodyd on `token` at `RUST_LOG=info`, in `format` (`None`: the
/// default text), its stderr to a file as journald would take it: the
/// rig, its port, the process and the log file, once it serves.
async fn start_logging_to_file(
    token: &softhsm_tests::TestToken,
    format: Option<&str>,
) -> (softhsm_tests::process::Pki, u16, Daemon, std::path::PathBuf) {
    let port = free_port();
    let (pki, config) = prepare(token, port);
    let log_path = pki.dir.join("custodyd.log");
    let mut command = Command::new(CUSTODYD);
    command
        .arg(&config)
        .env("RUST_LOG", "info")
        .env_remove("CUSTODY_LOG_FORMAT")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap());
    if let Some(format) = format {
        command.env("CUSTODY_LOG_FORMAT", format);
    }
    let mut daemon = Daemon(command.spawn().unwrap());
    ready(&pki, port, &mut daemon).await;
    (pki, port, daemon, log_path)
}

token_test!(
    fn a_requests_json_log_line_carries_its_audit_records_request_id(token) {
        runtime().block_on(async {
            let (pki, port, mut daemon, log_path) = start_logging_to_file(token, Some("json")).await;
            // One request, refused NOT_FOUND, on a resource no other
            // request names.
            let auditor = connect(&pki, port, &pki.client("reader", &[Role::Auditor]))
                .await
                .unwrap();
            let refused = KeyServiceClient::new(auditor)
                .get_key(GetKeyRequest { name: "keys/log-probe".into() })
                .await
                .unwrap_err();
            assert_eq!(refused.code(), tonic::Code::NotFound);

            let (entries, _) = audit_export(&pki, port).await;
            // Lines are written by custodyd's log thread: all of them
            // by the end of a clean stop.
            assert!(daemon.terminate().success(), "custodyd did not stop cleanly");
            let records: Vec<serde_json::Value> = entries
                .iter()
                .map(|e| serde_json::from_str::<serde_json::Value>(e).unwrap())
                .filter(|e| e["event"]["resource"] == "keys/log-probe")
                .collect();
            assert_eq!(records.len(), 1, "{records:?}");
            let request_id = records[0]["event"]["request_id"].as_str().unwrap().to_string();
            assert!(request_id.len() >= 16, "{request_id}");

            // Every line is JSON; exactly one is this request's, and it
            // names the same request, caller and outcome.
            let text = std::fs::read_to_string(&log_path).unwrap();
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(|line| {
                    serde_json::from_str(line)
                        .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
                })
                .collect();
            let matching: Vec<&serde_json::Value> = lines
                .iter()
                .filter(|line| line["request_id"] == request_id.as_str())
                .collect();
            assert_eq!(matching.len(), 1, "{text}");
            let line = matching[0];
            assert_eq!(line["resource"], "keys/log-probe");
            assert_eq!(line["principal"], "reader");
            assert_eq!(line["outcome"], "NOT_FOUND");
            assert_eq!(line["method"], records[0]["event"]["method"]);
        });
    }
);

token_test!(
    fn a_text_log_to_a_file_holds_no_terminal_escapes_and_every_line_logged_before_a_stop(token) {
        runtime().block_on(async {
            let (pki, port, mut daemon, log_path) = start_logging_to_file(token, None).await;
            let auditor = connect(&pki, port, &pki.client("reader", &[Role::Auditor]))
                .await
                .unwrap();
            for _ in 0..200 {
                let refused = KeyServiceClient::new(auditor.clone())
                    .get_key(GetKeyRequest { name: "keys/log-probe".into() })
                    .await
                    .unwrap_err();
                assert_eq!(refused.code(), tonic::Code::NotFound);
            }
            assert!(daemon.terminate().success(), "custodyd did not stop cleanly");

            let text = std::fs::read_to_string(&log_path).unwrap();
            // journald stores escape sequences as they come: a log that
            // is not read on a terminal gets none.
            assert!(!text.contains('\u{1b}'), "terminal escapes in the log:\n{text}");
            let probes = text
                .lines()
                .filter(|line| line.contains("keys/log-probe") && line.contains("NOT_FOUND"))
                .count();
            assert_eq!(probes, 200, "{text}");
            // The stop's own line, logged as `main` returns.
            assert!(
                text.lines().any(|line| line.ends_with("stopped")),
                "no line of the stop:\n{text}"
            );
        });
    }
);
