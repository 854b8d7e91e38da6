//! custodyd's JSON log format (`CUSTODY_LOG_FORMAT=json`): one JSON object
//! per line, and a request's line carries the `request_id` of its audit
//! record, so that an operator can go from either to the other. custodyd
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
use softhsm_tests::token_test;

const CUSTODYD: &str = env!("CARGO_BIN_EXE_custodyd-under-test");

token_test!(
    fn a_requests_json_log_line_carries_its_audit_records_request_id(token) {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let port = free_port();
                let (pki, config) = prepare(token, port);
                let log_path = pki.dir.join("custodyd.log");
                let log = std::fs::File::create(&log_path).unwrap();
                let mut daemon = Daemon(
                    Command::new(CUSTODYD)
                        .arg(&config)
                        .env("RUST_LOG", "info")
                        .env("CUSTODY_LOG_FORMAT", "json")
                        .stdout(Stdio::null())
                        .stderr(log)
                        .spawn()
                        .unwrap(),
                );
                ready(&pki, port, &mut daemon).await;
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
