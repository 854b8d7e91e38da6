//! `custodyctl drift`: compare the registry with the objects the HSM holds.

use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::{CheckDriftRequest, DriftKind};

use crate::Connection;
use crate::shared::{channel, json, print_json, shown, status};

/// `custodyctl drift`: prints the findings; an error (exit 1) if any.
pub(crate) async fn run(connection: &Connection) -> Result<(), String> {
    let mut keys = KeyServiceClient::new(channel(connection).await?);
    let report = keys
        .check_drift(CheckDriftRequest {})
        .await
        .map_err(status)?
        .into_inner();
    if json() {
        let findings: Vec<serde_json::Value> = report
            .findings
            .iter()
            .map(|finding| {
                serde_json::json!({
                    "kind": DriftKind::try_from(finding.kind).map_or("?", |k| k.as_str_name()),
                    "label": finding.label,
                    "object_class": finding.object_class,
                    "version": finding.version,
                    "detail": finding.detail,
                })
            })
            .collect();
        print_json(&serde_json::json!({
            "findings": findings,
            "objects_checked": report.objects_checked,
            "versions_checked": report.versions_checked,
        }));
    }
    for finding in report.findings.iter().filter(|_| !json()) {
        let kind = DriftKind::try_from(finding.kind).map_or("?", |k| k.as_str_name());
        let version = if finding.version.is_empty() {
            String::new()
        } else {
            format!(" ({})", shown(&finding.version))
        };
        outln!(
            "{kind:<18} {} [{}]{version}: {}",
            shown(&finding.label),
            shown(&finding.object_class),
            shown(&finding.detail)
        );
    }
    if !json() {
        outln!(
            "{} findings; {} HSM objects and {} registry versions checked",
            report.findings.len(),
            report.objects_checked,
            report.versions_checked
        );
    }
    if report.findings.is_empty() {
        Ok(())
    } else {
        Err("the HSM does not match the registry".into())
    }
}
