//! `custodyctl request|pending|show|approve|deny`: operations that need
//! officer approval. Anyone allowed requests one; officers see what it does
//! and its digest, and approve or deny it by signing that digest with their
//! own officer key. `officer enroll|remove` submit through here too.
//!
//! What an officer reads is rendered here from the operation's structure
//! and its digest recomputed from the same structure
//! (`custody_daemon::review`); custodyd's prose is never shown, and a digest
//! that is not the operation's is never signed.

use std::path::PathBuf;

use clap::{Args as ClapArgs, Subcommand, ValueEnum};
use custody_core::dual_control::{approval_message, denial_message};
use custody_daemon::review::verify_operation;
use custody_proto::v1::operation_service_client::OperationServiceClient;
use custody_proto::v1::{
    BackupKekSpec, BackupSpec, GetOperationRequest, KeyRef, ListOperationsRequest, Operation,
    OperationKind, OperationSpec, OperationState, RequestOperationRequest, SetPolicySpec,
    SetStateSpec, SignSpec, UpdateKeyRequest, VersionRef, VoteRequest, operation_spec,
};

use crate::Connection;
use crate::keys::StateArg;
use crate::lifecycle;
use crate::shared::{
    ask, channel, check_crc, full_name, json, key_name, print_json, sealed_officer_key, shown,
    status, unseal, write_file,
};
use crate::signing::{HashArg, digest_of};

#[derive(Subcommand)]
pub(crate) enum OperationCommand {
    /// Request an operation that needs officer approval.
    #[command(subcommand)]
    Request(RequestCommand),
    /// List operations waiting for approval.
    Pending,
    /// Show an operation: what it does, its digest, its votes, its result.
    Show {
        /// operations/{id} or just the id.
        operation: String,
        /// For a signed operation, write the signature (binary) here.
        #[arg(long)]
        signature_out: Option<PathBuf>,
    },
    /// Approve an operation with your officer key.
    Approve(VoteArgs),
    /// Deny (veto) an operation with your officer key.
    Deny(VoteArgs),
}

#[derive(Subcommand)]
pub(crate) enum RequestCommand {
    /// Sign a digest with a quorum-gated key.
    Sign {
        /// keys/{key_id}[/versions/{version}] or just the key id.
        name: String,
        /// The digest, hex.
        #[arg(long)]
        digest: String,
        /// The digest's hash function.
        #[arg(long, value_enum, default_value = "sha256")]
        hash: HashArg,
    },
    /// Rotate a quorum-gated key.
    Rotate {
        /// keys/{key_id} or just the key id.
        name: String,
    },
    /// Change the state of a version of a quorum-gated key.
    SetState {
        /// keys/{key_id}/versions/{version}.
        name: String,
        /// The new state.
        state: StateArg,
        /// Why (required for compromised).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Schedule the destruction of a version (after the cancel window; the
    /// administrative quorum approves unless the key has its own policy).
    Destroy {
        /// keys/{key_id}/versions/{version}.
        name: String,
    },
    /// Release a version's legal hold (needs approval like Destroy).
    ReleaseHold {
        /// keys/{key_id}/versions/{version}.
        name: String,
    },
    /// Change the cryptoperiod or minimum version of a key whose updates
    /// need approval.
    Update {
        /// keys/{key_id} or just the key id.
        name: String,
        /// e.g. 90d, 12h, 3600s; 0s for none.
        #[arg(long, value_parser = lifecycle::parse_duration)]
        cryptoperiod: Option<std::time::Duration>,
        /// Versions below this are refused for verify, decrypt and rewrap.
        #[arg(long)]
        min_version: Option<u32>,
    },
    /// Put one kind of operation on a key under M-of-N approval (or lift it
    /// with --required 0).
    SetPolicy {
        /// keys/{key_id} or just the key id.
        name: String,
        /// sign, rotate, set-state, set-policy, destroy-version,
        /// release-legal-hold or update-key.
        #[arg(long, value_enum)]
        operation: PolicyKindArg,
        /// An eligible officer (repeat for each).
        #[arg(long = "officer")]
        officers: Vec<String>,
        /// Approvals needed.
        #[arg(long)]
        required: u32,
    },
    /// Make a backup bundle (needs the administrative quorum): every
    /// backup-exportable key version, as listed now, under the current
    /// backup KEK. Once approved, `ceremony backup --operation` writes it.
    Backup {
        /// The backup KEK share set id expected (default: the current one).
        #[arg(long, default_value = "")]
        backup_kek_set: String,
    },
    /// Make the backup KEK a generate-mode KEK ceremony made the current
    /// one (needs the administrative quorum): every later backup is
    /// wrapped under it.
    ActivateBackupKek {
        /// ceremonies/{id} or just the id of the KEK ceremony.
        ceremony: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum PolicyKindArg {
    Sign,
    Rotate,
    SetState,
    SetPolicy,
    DestroyVersion,
    ReleaseLegalHold,
    UpdateKey,
    /// ENCRYPT_DECRYPT keys only.
    Decrypt,
}

#[derive(ClapArgs)]
pub(crate) struct VoteArgs {
    /// operations/{id} or just the id.
    operation: String,
    /// Your sealed officer key file.
    #[arg(long, env = "CUSTODY_OFFICER_KEY")]
    key_file: PathBuf,
    /// Skip typing back the start of the digest (scripts only).
    #[arg(long)]
    yes: bool,
}

pub(crate) async fn run(connection: &Connection, command: OperationCommand) -> Result<(), String> {
    match command {
        OperationCommand::Request(command) => submit(connection, request_spec(command)?).await,
        OperationCommand::Pending => pending(connection).await,
        OperationCommand::Show {
            operation,
            signature_out,
        } => show(connection, &operation, signature_out).await,
        OperationCommand::Approve(args) => vote(connection, args, true).await,
        OperationCommand::Deny(args) => vote(connection, args, false).await,
    }
}

fn operation_name(operation: &str) -> String {
    full_name("operations/", operation)
}

async fn pending(connection: &Connection) -> Result<(), String> {
    let mut operations = OperationServiceClient::new(channel(connection).await?);
    let (mut page_token, mut shown) = (String::new(), 0);
    let mut listed = Vec::new();
    // Page by page: what is pending is bounded by the per-requester cap.
    loop {
        let list = operations
            .list_operations(ListOperationsRequest {
                state: OperationState::Pending as i32,
                page_size: 0,
                page_token,
            })
            .await
            .map_err(status)?
            .into_inner();
        for operation in &list.operations {
            if json() {
                listed.push(operation_json(operation));
            } else {
                print_operation(operation);
            }
        }
        shown += list.operations.len();
        if list.next_page_token.is_empty() {
            break;
        }
        page_token = list.next_page_token;
    }
    if json() {
        print_json(&serde_json::json!({ "operations": listed }));
    } else if shown == 0 {
        outln!("nothing is waiting for approval");
    }
    Ok(())
}

async fn show(
    connection: &Connection,
    operation: &str,
    signature_out: Option<PathBuf>,
) -> Result<(), String> {
    let mut operations = OperationServiceClient::new(channel(connection).await?);
    let operation = operations
        .get_operation(GetOperationRequest {
            name: operation_name(operation),
        })
        .await
        .map_err(status)?
        .into_inner();
    print_operation(&operation);
    if let (Some(path), Some(signature)) = (signature_out, &operation.signature) {
        check_crc(
            &signature.signature,
            signature.signature_crc32c,
            "signature",
        )?;
        write_file(&path, &signature.signature)?;
        if json() {
            return Ok(());
        }
        outln!(
            "signature by {} written to {}",
            shown(&signature.name),
            path.display()
        );
    }
    Ok(())
}

/// An operation as JSON: its rendering as custodyctl verified it (or why it
/// is not shown), its state and votes.
fn operation_json(operation: &Operation) -> serde_json::Value {
    let (rendering, refusal) = match verify_operation(operation) {
        Ok(reviewed) => (Some(reviewed.rendering), None),
        Err(refusal) => (None, Some(refusal)),
    };
    let officers = |votes: &[custody_proto::v1::Vote]| -> Vec<String> {
        votes.iter().map(|v| v.officer_id.clone()).collect()
    };
    serde_json::json!({
        "name": operation.name,
        "verified": rendering.is_some(),
        "rendering": rendering,
        "not_shown_because": refusal,
        "state": OperationState::try_from(operation.state).map_or("?", |s| s.as_str_name()),
        "approved_by": officers(&operation.approvals),
        "denied_by": officers(&operation.denials),
        "signature": operation.signature.as_ref().map(|s| serde_json::json!({
            "name": s.name,
            "signature": hex::encode(&s.signature),
        })),
        "backup_keys": operation.backup_keys,
        "error": operation.error,
    })
}

/// Prints an operation as rendered from its structure; one whose digest is
/// not its own is shown only by name, with the refusal.
fn print_operation(operation: &Operation) {
    if json() {
        print_json(&operation_json(operation));
        return;
    }
    match verify_operation(operation) {
        Ok(reviewed) => out!("{}", reviewed.rendering),
        Err(refusal) => {
            outln!("operation {}", shown(&operation.name));
            outln!("  NOT SHOWN: {}", shown(&refusal));
        }
    }
    let state = OperationState::try_from(operation.state).map_or("?", |s| s.as_str_name());
    outln!("  state: {state}");
    for vote in &operation.approvals {
        outln!("  approved by {}", shown(&vote.officer_id));
    }
    for vote in &operation.denials {
        outln!("  DENIED by {}", shown(&vote.officer_id));
    }
    if let Some(signature) = &operation.signature {
        outln!(
            "  signature by {}: {}",
            shown(&signature.name),
            hex::encode(&signature.signature)
        );
    }
    if operation.backup_keys > 0 || !operation.backup_bundle.is_empty() {
        outln!(
            "  backup of {} key versions made: write it with custodyctl ceremony backup --operation {} --out FILE",
            operation.backup_keys,
            shown(&operation.name)
        );
    }
    if !operation.error.is_empty() {
        outln!("  error: {}", shown(&operation.error));
    }
}

fn request_spec(command: RequestCommand) -> Result<operation_spec::Spec, String> {
    Ok(match command {
        RequestCommand::Sign { name, digest, hash } => operation_spec::Spec::Sign(SignSpec {
            name: key_name(&name),
            digest: Some(digest_of(&digest, hash)?),
            encoding: 0,
        }),
        RequestCommand::Rotate { name } => operation_spec::Spec::Rotate(KeyRef {
            name: key_name(&name),
        }),
        RequestCommand::SetState {
            name,
            state,
            reason,
        } => operation_spec::Spec::SetState(SetStateSpec {
            name: key_name(&name),
            state: state.wire() as i32,
            reason,
        }),
        RequestCommand::Destroy { name } => operation_spec::Spec::DestroyVersion(VersionRef {
            name: key_name(&name),
        }),
        RequestCommand::Update {
            name,
            cryptoperiod,
            min_version,
        } => operation_spec::Spec::UpdateKey(UpdateKeyRequest {
            name: key_name(&name),
            cryptoperiod: cryptoperiod.map(lifecycle::duration_message),
            min_version,
        }),
        RequestCommand::ReleaseHold { name } => {
            operation_spec::Spec::ReleaseLegalHold(VersionRef {
                name: key_name(&name),
            })
        }
        RequestCommand::SetPolicy {
            name,
            operation,
            officers,
            required,
        } => operation_spec::Spec::SetPolicy(SetPolicySpec {
            name: key_name(&name),
            operation: match operation {
                PolicyKindArg::Sign => OperationKind::Sign,
                PolicyKindArg::Rotate => OperationKind::Rotate,
                PolicyKindArg::SetState => OperationKind::SetState,
                PolicyKindArg::SetPolicy => OperationKind::SetPolicy,
                PolicyKindArg::DestroyVersion => OperationKind::DestroyVersion,
                PolicyKindArg::ReleaseLegalHold => OperationKind::ReleaseLegalHold,
                PolicyKindArg::UpdateKey => OperationKind::UpdateKey,
                PolicyKindArg::Decrypt => OperationKind::Decrypt,
            } as i32,
            officers,
            required,
        }),
        RequestCommand::Backup { backup_kek_set } => {
            operation_spec::Spec::CreateBackup(BackupSpec {
                backup_kek_set_id: backup_kek_set,
                versions: Vec::new(),
            })
        }
        RequestCommand::ActivateBackupKek { ceremony } => {
            operation_spec::Spec::ActivateBackupKek(BackupKekSpec {
                ceremony: full_name("ceremonies/", &ceremony),
                ..Default::default()
            })
        }
    })
}

/// Requests an operation and says how officers approve it.
pub(crate) async fn submit(
    connection: &Connection,
    spec: operation_spec::Spec,
) -> Result<(), String> {
    let mut operations = OperationServiceClient::new(channel(connection).await?);
    let operation = operations
        .request_operation(RequestOperationRequest {
            spec: Some(OperationSpec { spec: Some(spec) }),
        })
        .await
        .map_err(status)?
        .into_inner();
    print_operation(&operation);
    outln!(
        "officers approve it with: custodyctl approve {}",
        shown(&operation.name)
    );
    Ok(())
}

async fn vote(connection: &Connection, args: VoteArgs, approve: bool) -> Result<(), String> {
    // Unsealed only once the officer has typed back the digest it signs.
    let sealed = sealed_officer_key(&args.key_file)?;
    let mut operations = OperationServiceClient::new(channel(connection).await?);
    let operation = operations
        .get_operation(GetOperationRequest {
            name: operation_name(&args.operation),
        })
        .await
        .map_err(status)?
        .into_inner();
    // Rendered and recomputed here; nothing is signed unless custodyd's
    // digest is that of the operation shown.
    let reviewed =
        verify_operation(&operation).map_err(|refusal| format!("nothing was signed: {refusal}"))?;
    print_operation(&operation);
    let digest = reviewed.digest;
    let verb = if approve { "APPROVE" } else { "DENY" };
    if !args.yes {
        let expected = &hex::encode(digest)[..8];
        let typed = ask(format_args!(
            "to {verb} as officer {}, type the first 8 characters of the digest to sign: ",
            sealed.officer_id
        ))?;
        if typed.trim() != expected {
            return Err(format!(
                "you typed {:?}, the digest starts {expected}: nothing was signed",
                typed.trim()
            ));
        }
    }
    let key = unseal(&sealed)?;
    let message = if approve {
        approval_message(&digest)
    } else {
        denial_message(&digest)
    };
    let request = VoteRequest {
        name: reviewed.name.clone(),
        officer_id: key.officer_id().to_string(),
        signature: key.sign(&message).to_vec(),
    };
    let result = if approve {
        operations.approve_operation(request).await
    } else {
        operations.deny_operation(request).await
    }
    .map_err(status)?
    .into_inner();
    outln!(
        "{verb}D by {} ; the operation now:",
        shown(key.officer_id())
    );
    print_operation(&result);
    Ok(())
}
