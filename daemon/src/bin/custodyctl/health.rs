//! `custodyctl health`: asks custodyd's gRPC health service
//! (`grpc.health.v1.Health`) whether a service is serving, as a load
//! balancer's or an orchestrator's probe does (docs/runbook.md, "Health:
//! alive and ready").

use clap::Args as ClapArgs;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::Connection;
use crate::shared::{channel, json, print_json, shown, status};

#[derive(ClapArgs)]
pub(crate) struct HealthArgs {
    /// The service to ask about: "" is liveness (custodyd answers at all),
    /// custody.v1.SigningService readiness (it can sign).
    #[arg(long, default_value = "custody.v1.SigningService")]
    service: String,
}

/// Prints the service's status; an error (exit 1) unless it is SERVING.
pub(crate) async fn run(connection: &Connection, args: HealthArgs) -> Result<(), String> {
    let mut health = HealthClient::new(channel(connection).await?);
    let answer = health
        .check(HealthCheckRequest {
            service: args.service.clone(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let serving = ServingStatus::try_from(answer.status).unwrap_or(ServingStatus::Unknown);
    let name = serving.as_str_name();
    let service = if args.service.is_empty() {
        "\"\" (liveness)".to_owned()
    } else {
        shown(&args.service).into_owned()
    };
    if json() {
        print_json(&serde_json::json!({"service": args.service, "status": name}));
    } else {
        outln!("{service}: {name}");
    }
    if serving == ServingStatus::Serving {
        Ok(())
    } else {
        Err(format!("{service} is {name}"))
    }
}
