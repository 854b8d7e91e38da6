//! `custodyctl officer ...`: an officer makes their own sealed key offline,
//! lists who is enrolled, and requests an officer's enrollment or removal
//! (both go through approval like any other operation).

use std::path::{Path, PathBuf};

use clap::Subcommand;
use custody_core::dual_control::officer_key::OfficerKey;
use custody_proto::v1::operation_service_client::OperationServiceClient;
use custody_proto::v1::{ListOfficersRequest, OfficerSpec, operation_spec};

use crate::Connection;
use crate::operations::submit;
use crate::shared::{channel, hex_arg, json, passphrase, print_json, shown, status, write_private};

#[derive(Subcommand)]
pub(crate) enum OfficerCommand {
    /// Make your officer key, sealed with a passphrase (offline). Prints the
    /// public key to enroll.
    Keygen {
        /// Your officer id.
        #[arg(long)]
        officer_id: String,
        /// Where to write the sealed key file.
        #[arg(long)]
        out: PathBuf,
    },
    /// List enrolled officers and the administrative quorum.
    List,
    /// Request the enrollment of an officer (needs the administrative quorum).
    Enroll {
        /// Officer id.
        #[arg(long)]
        officer_id: String,
        /// The principal of the officer's client certificate.
        #[arg(long)]
        principal: String,
        /// The officer's public key, hex (from `officer keygen`).
        #[arg(long)]
        public_key: String,
    },
    /// Request the removal of an officer (needs the administrative quorum).
    Remove {
        /// Officer id.
        officer_id: String,
    },
}

pub(crate) async fn run(connection: &Connection, command: OfficerCommand) -> Result<(), String> {
    match command {
        OfficerCommand::Keygen { officer_id, out } => keygen(&officer_id, &out),
        OfficerCommand::List => list(connection).await,
        OfficerCommand::Enroll {
            officer_id,
            principal,
            public_key,
        } => {
            let spec = operation_spec::Spec::AddOfficer(OfficerSpec {
                officer_id,
                principal,
                public_key: hex_arg("--public-key", &public_key)?,
            });
            submit(connection, spec).await
        }
        OfficerCommand::Remove { officer_id } => {
            let spec = operation_spec::Spec::RemoveOfficer(OfficerSpec {
                officer_id,
                ..Default::default()
            });
            submit(connection, spec).await
        }
    }
}

fn keygen(officer_id: &str, out: &Path) -> Result<(), String> {
    if out.exists() {
        return Err(format!(
            "{} exists; refusing to overwrite an officer key",
            out.display()
        ));
    }
    let passphrase = passphrase(
        &format!("passphrase for officer {officer_id}'s new key: "),
        true,
    )?;
    let (key, sealed) = OfficerKey::generate(officer_id, &passphrase)?;
    let json = serde_json::to_string_pretty(&sealed).map_err(|e| e.to_string())?;
    write_private(out, json.as_bytes())?;
    outln!("officer key for {officer_id} sealed in {}", out.display());
    outln!(
        "public key (give this to the enrollment): {}",
        hex::encode(key.public_key())
    );
    Ok(())
}

async fn list(connection: &Connection) -> Result<(), String> {
    let mut operations = OperationServiceClient::new(channel(connection).await?);
    let list = operations
        .list_officers(ListOfficersRequest {})
        .await
        .map_err(status)?
        .into_inner();
    if json() {
        let officers: Vec<serde_json::Value> = list
            .officers
            .iter()
            .map(|officer| {
                serde_json::json!({
                    "officer_id": officer.officer_id,
                    "principal": officer.principal,
                    "public_key": hex::encode(&officer.public_key),
                })
            })
            .collect();
        print_json(&serde_json::json!({
            "admin_required": list.admin_required,
            "officers": officers,
        }));
        return Ok(());
    }
    outln!(
        "{} officers; officer-set and default policy changes need {} approvals",
        list.officers.len(),
        list.admin_required
    );
    for officer in list.officers {
        outln!(
            "  {}  principal {}  key {}",
            shown(&officer.officer_id),
            shown(&officer.principal),
            hex::encode(officer.public_key)
        );
    }
    Ok(())
}
