//! Operating custodyd (issue 19), through the real gRPC server on SoftHSM2:
//! liveness apart from readiness, the signing self-test (threat model O4),
//! server reflection in both versions for a Python client, and the metrics
//! endpoint (`# HELP` for every family, nothing but `/metrics`; O5).

#![allow(
    clippy::unwrap_used,
    reason = "a test fails by panicking on the unexpected"
)]

use std::time::Duration;

use cryptoki::context::Function;
use cryptoki::error::RvError;
use custody_core::identity::Role;
use softhsm_tests::grpcio::GrpcCore;
use softhsm_tests::process::free_port;
use softhsm_tests::service::{TestService, metrics_endpoint, runtime};
use softhsm_tests::token_test;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn health(channel: &Channel, service: &str) -> i32 {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// Waits (bounded) until health reports `want` for `service`.
async fn health_becomes(channel: &Channel, service: &str, want: ServingStatus) {
    for _ in 0..300 {
        if health(channel, service).await == want as i32 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("health of {service:?} never became {want:?}");
}

async fn scrape(port: u16, method: &'static str, path: &'static str) -> String {
    tokio::task::spawn_blocking(move || metrics_endpoint(port, method, path))
        .await
        .unwrap()
}

/// The value of the sample `series` (name and labels as exported).
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

token_test!(
    fn a_failing_self_test_makes_signing_not_serving_while_custodyd_stays_alive(token) {
        runtime().block_on(async {
            let port = free_port();
            let service = TestService::start_with(token, |config| {
                config.health.self_test_interval_secs = 1;
                config.metrics.listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
            })
            .await;
            let channel = service.client_as("monitor", &[Role::Auditor]).await;
            for name in ["", "custody.v1.SigningService", "custody.v1.AuditService"] {
                assert_eq!(health(&channel, name).await, ServingStatus::Serving as i32, "{name:?}");
            }

            // The HSM stops signing: every signature fails, as a token that
            // lost its keys or its login would.
            let faults = service.state().hsm.faults();
            faults.fail_next(Function::Sign, RvError::DeviceError, u32::MAX);
            health_becomes(&channel, "custody.v1.SigningService", ServingStatus::NotServing).await;
            for name in ["custody.v1.KeyService", "custody.v1.EnvelopeService", "custody.v1.CeremonyService", "custody.v1.OperationService"] {
                assert_eq!(health(&channel, name).await, ServingStatus::NotServing as i32, "{name:?}");
            }
            // Alive all the same, and the audit log still serves.
            assert_eq!(health(&channel, "").await, ServingStatus::Serving as i32);
            assert_eq!(health(&channel, "custody.v1.AuditService").await, ServingStatus::Serving as i32);
            let page = scrape(port, "GET", "/metrics").await;
            assert_eq!(sample(&page, "custody_readiness_condition{condition=\"self_test_signed\"}"), Some(0.0), "{page}");
            assert_eq!(sample(&page, "custody_readiness_condition{condition=\"audit_records\"}"), Some(1.0));
            assert_eq!(sample(&page, "custody_service_serving{service=\"custody.v1.SigningService\"}"), Some(0.0));
            assert_eq!(sample(&page, "custody_alive"), Some(1.0));
            assert!(sample(&page, "custody_self_tests_total{outcome=\"failed\"}").unwrap() >= 1.0);

            // The HSM signs again: ready again at the next self-test.
            faults.clear();
            health_becomes(&channel, "custody.v1.SigningService", ServingStatus::Serving).await;
            let page = scrape(port, "GET", "/metrics").await;
            assert_eq!(sample(&page, "custody_readiness_condition{condition=\"self_test_signed\"}"), Some(1.0));
        });
    }
);

token_test!(
    fn the_metrics_endpoint_describes_every_family_and_serves_nothing_else(token) {
        runtime().block_on(async {
            let port = free_port();
            let service = TestService::start_with(token, |config| {
                config.metrics.listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
            })
            .await;
            // A request, so that request families are there too.
            let channel = service.client_as("monitor", &[Role::Auditor]).await;
            health(&channel, "").await;
            let page = scrape(port, "GET", "/metrics").await;
            assert!(page.starts_with("HTTP/1.0 200 OK\r\n") || page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
            let body = page.split("\r\n\r\n").nth(1).unwrap();
            let mut families = 0;
            for line in body.lines().filter(|l| l.starts_with("# TYPE ")) {
                let name = line.split_whitespace().nth(2).unwrap();
                families += 1;
                assert!(
                    body.lines().any(|l| l.starts_with(&format!("# HELP {name} "))),
                    "no # HELP for {name}"
                );
            }
            assert!(families >= 10, "{families} families: {body}");
            for (method, path) in [("GET", "/"), ("GET", "/metricsx"), ("GET", "/debug/pprof"), ("POST", "/anything")] {
                let answer = scrape(port, method, path).await;
                assert!(answer.starts_with("HTTP/1.0 404") || answer.starts_with("HTTP/1.1 404"), "{method} {path}: {answer}");
                assert!(!answer.contains("custody_"), "{method} {path} answered metrics");
            }
            for method in ["POST", "PUT", "DELETE"] {
                let answer = scrape(port, method, "/metrics").await;
                assert!(answer.starts_with("HTTP/1.0 405") || answer.starts_with("HTTP/1.1 405"), "{method}: {answer}");
                assert!(!answer.contains("custody_"), "{method} /metrics answered metrics");
            }
        });
    }
);

/// Lists the services through reflection v1alpha (grpcio-reflection's
/// descriptor database) and v1 (the same messages on v1's method), and
/// resolves one custody service's methods.
const REFLECTION_CLIENT: &str = r#"
import sys
import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_reflection.v1alpha import reflection_pb2
from google.protobuf.descriptor_pool import DescriptorPool

ca, cert, key, target = sys.argv[1:5]
creds = grpc.ssl_channel_credentials(
    root_certificates=open(ca, "rb").read(),
    private_key=open(key, "rb").read(),
    certificate_chain=open(cert, "rb").read(),
)
channel = grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", "localhost")])
database = ProtoReflectionDescriptorDatabase(channel)
for name in database.get_services():
    print("v1alpha", name)
pool = DescriptorPool(database)
signing = pool.FindServiceByName("custody.v1.SigningService")
print("v1alpha-methods", " ".join(m.name for m in signing.methods))
v1 = channel.stream_stream(
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
    response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
)
for response in v1(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
    for service in response.list_services_response.service:
        print("v1", service.name)
"#;

token_test!(
    fn a_python_grpcio_reflection_client_lists_the_services_in_v1_and_v1alpha(token) {
        runtime().block_on(async {
            let service = TestService::start(token).await;
            let dir = service.dir().join("reflection");
            let client = GrpcCore::new(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")), &dir)
                .expect("the Python grpcio venv (python3-venv and PyPI)");
            let files = service.client_files(&dir, "monitor", &[Role::Auditor]);
            let [ca, cert, key] = [files.ca, files.cert, files.key].map(|path| path.display().to_string());
            let target = service.url().trim_start_matches("https://").to_string();
            let output = tokio::task::spawn_blocking(move || {
                client.run(REFLECTION_CLIENT, &[&ca, &cert, &key, &target])
            })
            .await
            .unwrap();
            let said = String::from_utf8_lossy(&output.stdout);
            assert!(output.status.success(), "{said}\n{}", String::from_utf8_lossy(&output.stderr));
            for version in ["v1alpha", "v1"] {
                for name in [
                    "custody.v1.KeyService",
                    "custody.v1.SigningService",
                    "custody.v1.AuditService",
                    "custody.v1.OperationService",
                    "custody.v1.EnvelopeService",
                    "custody.v1.CeremonyService",
                    "grpc.health.v1.Health",
                ] {
                    assert!(said.lines().any(|l| l == format!("{version} {name}")), "{version} lacks {name}: {said}");
                }
            }
            let methods = said.lines().find_map(|l| l.strip_prefix("v1alpha-methods ")).unwrap();
            assert!(methods.split(' ').any(|m| m == "Sign"), "{methods}");
        });
    }
);
