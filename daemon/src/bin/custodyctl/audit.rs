//! `custodyctl audit ...`: export the audit log with a freshly signed head,
//! verify an export offline, and ask custodyd to verify its stored chain.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use custody_core::audit::{ExportLine, SignedHead, verify_export};
use custody_core::encoding::pem_to_der;
use custody_proto::v1::audit_service_client::AuditServiceClient;
use custody_proto::v1::{ReadAuditRequest, VerifyAuditRequest, read_audit_response};

use crate::Connection;
use crate::shared::{channel, json, print_json, read_text, shown, status, write_file};

#[derive(Subcommand)]
pub(crate) enum AuditCommand {
    /// Export the whole log, ending with a head signed now (JSON lines).
    Export {
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Also write the audit public key (PEM) here.
        #[arg(long)]
        key_out: Option<PathBuf>,
    },
    /// Verify an exported log offline: chain, checkpoints and signed head.
    Verify {
        /// The exported log.
        file: PathBuf,
        /// The audit public key (PEM), from a trusted source.
        #[arg(long)]
        audit_key: PathBuf,
    },
    /// Ask custodyd to verify its stored chain.
    VerifyServer,
}

pub(crate) async fn run(connection: &Connection, command: AuditCommand) -> Result<(), String> {
    match command {
        AuditCommand::Export { out, key_out } => export(connection, out, key_out).await,
        AuditCommand::Verify { file, audit_key } => verify(&file, &audit_key),
        AuditCommand::VerifyServer => verify_server(connection).await,
    }
}

async fn export(
    connection: &Connection,
    out: PathBuf,
    key_out: Option<PathBuf>,
) -> Result<(), String> {
    let mut audit = AuditServiceClient::new(channel(connection).await?);
    let mut stream = audit
        .read_audit(ReadAuditRequest { start_seq: 1 })
        .await
        .map_err(status)?
        .into_inner();
    let mut text = String::new();
    let mut records = 0u64;
    let mut key_pem = None;
    while let Some(item) = stream.message().await.map_err(status)? {
        let line = match item.item {
            Some(read_audit_response::Item::Record(r)) => {
                records += 1;
                ExportLine::Record {
                    seq: r.seq,
                    entry: String::from_utf8(r.entry)
                        .map_err(|_| format!("record {} is not UTF-8", r.seq))?,
                    hash: hex::encode(r.hash),
                }
            }
            Some(read_audit_response::Item::Head(h)) => {
                key_pem = Some(h.audit_public_key_pem.clone());
                ExportLine::head(&SignedHead {
                    seq: h.seq,
                    hash: h.hash.clone().try_into().map_err(|_| "bad head hash")?,
                    time: h.time,
                    signature: h.signature,
                })
            }
            None => continue,
        };
        text.push_str(&serde_json::to_string(&line).map_err(|e| e.to_string())?);
        text.push('\n');
    }
    write_file(&out, text)?;
    outln!(
        "exported {records} records and the signed head to {}",
        out.display()
    );
    if let (Some(path), Some(pem)) = (key_out, key_pem) {
        write_file(&path, pem)?;
        outln!(
            "wrote the audit public key to {} (compare its fingerprint with the one published at setup)",
            path.display()
        );
    }
    Ok(())
}

fn verify(file: &Path, audit_key: &Path) -> Result<(), String> {
    let text = read_text(file)?;
    let pem = read_text(audit_key)?;
    let spki = pem_to_der(&pem).map_err(|e| format!("audit key: {e}"))?;
    let report =
        verify_export(&text, &spki).map_err(|e| format!("the audit log does NOT verify: {e}"))?;
    let key_sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&spki));
    if json() {
        print_json(&serde_json::json!({
            "valid": true,
            "records": report.records,
            "checkpoints": report.checkpoints,
            "last_seq": report.last_seq,
            "audit_key_sha256": key_sha256,
        }));
        return Ok(());
    }
    outln!(
        "audit log verifies: {} records, {} signed checkpoints, signed head at record {}",
        report.records,
        report.checkpoints,
        report.last_seq
    );
    outln!(
        "audit key SHA-256 {} (it must match the audit_key_sha256 custodyd published at setup)",
        key_sha256
    );
    Ok(())
}

async fn verify_server(connection: &Connection) -> Result<(), String> {
    let mut audit = AuditServiceClient::new(channel(connection).await?);
    let report = audit
        .verify_audit(VerifyAuditRequest {})
        .await
        .map_err(status)?
        .into_inner();
    if json() {
        print_json(&serde_json::json!({
            "valid": report.valid,
            "records": report.records,
            "checkpoints": report.checkpoints,
            "first_bad_seq": report.first_bad_seq,
            "problem": report.problem,
        }));
    }
    if report.valid {
        if json() {
            return Ok(());
        }
        outln!(
            "custodyd's audit chain verifies: {} records, {} checkpoints",
            report.records,
            report.checkpoints
        );
        Ok(())
    } else {
        Err(format!(
            "custodyd's audit chain is broken at record {}: {}",
            report.first_bad_seq,
            shown(&report.problem)
        ))
    }
}
