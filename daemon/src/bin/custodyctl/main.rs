//! custodyctl: the command-line client of custodyd.
//!
//! Connection options come from flags or the environment: `--server`
//! (`CUSTODY_SERVER`), `--ca` (`CUSTODY_CA`), `--cert` (`CUSTODY_CERT`),
//! `--key` (`CUSTODY_KEY`). `dev-pki`, `audit verify` and `ceremony check`
//! work offline.
//!
//! This file holds the command tree and the key, signing, audit and officer
//! commands; `envelope.rs` the envelope encryption commands, `lifecycle.rs`
//! cryptoperiods, destruction, legal holds and drift, `ceremony.rs` key
//! ceremony scripts; `shared.rs` what they all use: the connection,
//! printing, files, the officer key and the exit status.

// First, so that its `out!` and `outln!` macros reach every command.
#[macro_use]
mod shared;

mod ceremony;
mod envelope;
mod lifecycle;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use custody_core::algorithms::KeyAlgorithm;
use custody_core::audit::{ExportLine, SignedHead, verify_export};
use custody_core::dual_control::officer_key::OfficerKey;
use custody_core::dual_control::{approval_message, denial_message};
use custody_proto::v1::audit_service_client::AuditServiceClient;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::operation_service_client::OperationServiceClient;
use custody_proto::v1::signing_service_client::SigningServiceClient;
use custody_proto::v1::{
    CreateKeyRequest, Digest, GetKeyRequest, GetPublicKeyRequest, Key, KeyVersionState,
    ListKeysRequest, ReadAuditRequest, RotateKeyRequest, SetKeyVersionStateRequest, SignRequest,
    SignatureEncoding, VerifyAuditRequest, VerifyRequest, digest, read_audit_response,
    sign_request, verify_request,
};
use custody_proto::v1::{
    GetOperationRequest, KeyRef, ListOfficersRequest, ListOperationsRequest, OfficerSpec,
    Operation, OperationKind, OperationSpec, OperationState, RequestOperationRequest,
    SetPolicySpec, SetStateSpec, SignSpec, UpdateKeyRequest, VersionRef, VoteRequest,
    operation_spec,
};

use shared::{
    channel, key_name, passphrase, read_text, sealed_officer_key, status, unseal, write_private,
};

#[derive(Parser)]
#[command(
    version,
    about = "Client of custodyd, the HSM-backed signing and key-custody service"
)]
struct Cli {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(ClapArgs)]
struct Connection {
    /// custodyd's address.
    #[arg(
        long,
        env = "CUSTODY_SERVER",
        default_value = "https://localhost:7443",
        global = true
    )]
    server: String,
    /// CA certificate that issued custodyd's certificate (PEM).
    #[arg(long, env = "CUSTODY_CA", global = true)]
    ca: Option<PathBuf>,
    /// Your client certificate (PEM).
    #[arg(long, env = "CUSTODY_CERT", global = true)]
    cert: Option<PathBuf>,
    /// Your client key (PEM).
    #[arg(long, env = "CUSTODY_KEY", global = true)]
    key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Manage keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Sign a digest or a file.
    Sign(SignArgs),
    /// Verify a signature with the HSM's copy of the public key.
    Verify(VerifyArgs),
    /// Export and verify the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Officers: make a key, list who is enrolled.
    #[command(subcommand)]
    Officer(OfficerCommand),
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
    /// Envelope encryption with an AES_256_GCM key.
    #[command(flatten)]
    Envelope(envelope::EnvelopeCommand),
    /// Compare the registry with the objects the HSM holds; exits 1 on drift.
    Drift,
    /// Key ceremonies, backups, restores and DR drills.
    #[command(subcommand)]
    Ceremony(ceremony::CeremonyCommand),
    /// Make a development CA, server and client certificates (offline).
    DevPki {
        /// Directory to write them to.
        #[arg(long)]
        out: PathBuf,
        /// Host names or addresses for the server certificate.
        #[arg(long = "host", default_values = ["localhost", "127.0.0.1"])]
        hosts: Vec<String>,
    },
}

#[derive(Subcommand)]
enum OfficerCommand {
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

#[derive(Subcommand)]
enum RequestCommand {
    /// Sign a digest with a quorum-gated key.
    Sign {
        /// keys/{key_id}[/versions/{n}] or just the key id.
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
        /// keys/{key_id}/versions/{n}.
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
        /// keys/{key_id}/versions/{n}.
        name: String,
    },
    /// Release a version's legal hold (needs approval like Destroy).
    ReleaseHold {
        /// keys/{key_id}/versions/{n}.
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
}

#[derive(Clone, Copy, ValueEnum)]
enum PolicyKindArg {
    Sign,
    Rotate,
    SetState,
    SetPolicy,
    DestroyVersion,
    ReleaseLegalHold,
    UpdateKey,
}

#[derive(ClapArgs)]
struct VoteArgs {
    /// operations/{id} or just the id.
    operation: String,
    /// Your sealed officer key file.
    #[arg(long, env = "CUSTODY_OFFICER_KEY")]
    key_file: PathBuf,
    /// Skip typing back the start of the digest (scripts only).
    #[arg(long)]
    yes: bool,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key (generated in the HSM).
    Create {
        /// Key id: lower-case letters, digits, '-'.
        key_id: String,
        /// Algorithm, e.g. EC_SIGN_P256_SHA256 (see docs/api.md).
        #[arg(long)]
        algorithm: String,
        /// A principal allowed to sign or, for AES keys, encrypt (repeat
        /// for more).
        #[arg(long = "signer")]
        signers: Vec<String>,
        /// How long each version may sign or encrypt, e.g. 90d, 12h, 3600s;
        /// the scheduler rotates before it ends.
        #[arg(long, value_parser = lifecycle::parse_duration)]
        cryptoperiod: Option<std::time::Duration>,
        /// Let its versions leave the HSM wrapped under the token's backup
        /// KEK (for backup bundles); off by default.
        #[arg(long)]
        backup_exportable: bool,
    },
    /// List keys.
    List,
    /// Show a key and its versions.
    Show {
        /// keys/{key_id} or just the key id.
        name: String,
    },
    /// Make a new version the primary one.
    Rotate {
        /// keys/{key_id} or just the key id.
        name: String,
        /// Makes a retry safe: the same id never rotates twice.
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Print a public key (PEM).
    PublicKey {
        /// keys/{key_id}[/versions/{n}] or just the key id.
        name: String,
        /// Write the PEM to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Change a version's state. Marking the primary version compromised
    /// rotates the key and records a revocation notice.
    SetState {
        /// keys/{key_id}/versions/{n}.
        name: String,
        /// The new state.
        state: StateArg,
        /// Why (required for compromised).
        #[arg(long, default_value = "")]
        reason: String,
    },
    #[command(flatten)]
    Lifecycle(lifecycle::LifecycleCommand),
}

#[derive(Clone, Copy, ValueEnum)]
enum StateArg {
    Active,
    Suspended,
    Deactivated,
    Compromised,
}

impl StateArg {
    fn wire(self) -> KeyVersionState {
        match self {
            StateArg::Active => KeyVersionState::Active,
            StateArg::Suspended => KeyVersionState::Suspended,
            StateArg::Deactivated => KeyVersionState::Deactivated,
            StateArg::Compromised => KeyVersionState::Compromised,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum HashArg {
    Sha256,
    Sha384,
    Sha512,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Der,
    Raw,
}

#[derive(ClapArgs)]
struct InputArgs {
    /// keys/{key_id}[/versions/{n}] or just the key id.
    name: String,
    /// A digest, hex.
    #[arg(long, conflicts_with = "file")]
    digest: Option<String>,
    /// The digest's hash function.
    #[arg(long, value_enum, default_value = "sha256")]
    hash: HashArg,
    /// A file to sign as a message (the service hashes it, or signs it whole
    /// for Ed25519).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Signature encoding (ECDSA only).
    #[arg(long, value_enum, default_value = "der")]
    format: FormatArg,
}

#[derive(ClapArgs)]
struct SignArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Write the signature (binary) here; otherwise print it as hex.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(ClapArgs)]
struct VerifyArgs {
    #[command(flatten)]
    input: InputArgs,
    /// The signature file (binary).
    #[arg(long)]
    signature: PathBuf,
}

#[derive(Subcommand)]
enum AuditCommand {
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

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    shared::exit_code(run(cli).await)
}

fn print_key(key: &Key) {
    let algorithm =
        custody_proto::v1::Algorithm::try_from(key.algorithm).map_or("?", |a| a.as_str_name());
    outln!(
        "{}  {}  primary v{}  signers: {}",
        key.name,
        algorithm,
        key.primary_version,
        key.allowed_signers.join(", ")
    );
    if let Some(period) = &key.cryptoperiod {
        outln!("  cryptoperiod {} s", period.seconds);
    }
    if key.min_version > 1 {
        outln!("  min version {}", key.min_version);
    }
    for version in &key.versions {
        let state = KeyVersionState::try_from(version.state).map_or("?", |s| s.as_str_name());
        let mut notes = Vec::new();
        if !version.check_value.is_empty() {
            notes.push(format!("KCV {}", version.check_value));
        }
        if let Some(until) = &version.protect_until {
            notes.push(format!("protects until {}", lifecycle::time_text(until)));
        }
        if let Some(at) = &version.destroy_time {
            notes.push(format!("destroy at {}", lifecycle::time_text(at)));
        }
        if version.legal_hold {
            notes.push("LEGAL HOLD".into());
        }
        if notes.is_empty() {
            outln!("  {}  {}", version.name, state);
        } else {
            outln!("  {}  {}  {}", version.name, state, notes.join("  "));
        }
    }
}

fn input_of(
    args: &InputArgs,
) -> Result<(Option<sign_request::Input>, Option<verify_request::Input>), String> {
    match (&args.digest, &args.file) {
        (Some(hex_digest), None) => {
            let bytes =
                hex::decode(hex_digest.trim()).map_err(|e| format!("--digest is not hex: {e}"))?;
            let digest = Digest {
                digest: Some(match args.hash {
                    HashArg::Sha256 => digest::Digest::Sha256(bytes),
                    HashArg::Sha384 => digest::Digest::Sha384(bytes),
                    HashArg::Sha512 => digest::Digest::Sha512(bytes),
                }),
            };
            Ok((
                Some(sign_request::Input::Digest(digest.clone())),
                Some(verify_request::Input::Digest(digest)),
            ))
        }
        (None, Some(file)) => {
            let data = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
            Ok((
                Some(sign_request::Input::Data(data.clone())),
                Some(verify_request::Input::Data(data)),
            ))
        }
        _ => Err("give --digest HEX or --file PATH".into()),
    }
}

fn encoding(format: FormatArg) -> i32 {
    match format {
        FormatArg::Der => SignatureEncoding::Der as i32,
        FormatArg::Raw => SignatureEncoding::Raw as i32,
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::DevPki { out, hosts } => {
            let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
            custody_daemon::devpki::write_dev_pki(&out, &hosts).map_err(|e| e.to_string())?;
            outln!(
                "wrote a dev CA, server certificate, CRL and client certificates to {}",
                out.display()
            );
            for (principal, roles) in custody_daemon::devpki::DEV_IDENTITIES {
                let roles: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
                outln!("  {principal}.pem  {}", roles.join(", "));
            }
        }
        Command::Keys(command) => {
            let mut keys = KeyServiceClient::new(channel(&cli.connection).await?);
            match command {
                KeysCommand::Create {
                    key_id,
                    algorithm,
                    signers,
                    cryptoperiod,
                    backup_exportable,
                } => {
                    let algorithm = KeyAlgorithm::from_api_name(&algorithm).ok_or_else(|| {
                        let known: Vec<&str> =
                            KeyAlgorithm::ALL.iter().map(|a| a.api_name()).collect();
                        format!(
                            "unknown algorithm {algorithm:?}; one of: {}",
                            known.join(", ")
                        )
                    })?;
                    let key = keys
                        .create_key(CreateKeyRequest {
                            key_id,
                            algorithm: custody_daemon::wire::algorithm(algorithm) as i32,
                            purpose: custody_daemon::wire::purpose(algorithm.purpose()) as i32,
                            allowed_signers: signers,
                            cryptoperiod: cryptoperiod.map(lifecycle::duration_message),
                            backup_exportable,
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    print_key(&key);
                }
                KeysCommand::List => {
                    let mut page_token = String::new();
                    loop {
                        let page = keys
                            .list_keys(ListKeysRequest {
                                page_size: 100,
                                page_token,
                            })
                            .await
                            .map_err(status)?
                            .into_inner();
                        for key in &page.keys {
                            print_key(key);
                        }
                        if page.next_page_token.is_empty() {
                            break;
                        }
                        page_token = page.next_page_token;
                    }
                }
                KeysCommand::Show { name } => {
                    let key = keys
                        .get_key(GetKeyRequest {
                            name: key_name(&name),
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    print_key(&key);
                }
                KeysCommand::Rotate { name, request_id } => {
                    let key = keys
                        .rotate_key(RotateKeyRequest {
                            name: key_name(&name),
                            request_id: request_id.unwrap_or_default(),
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    print_key(&key);
                }
                KeysCommand::PublicKey { name, out } => {
                    let public = keys
                        .get_public_key(GetPublicKeyRequest {
                            name: key_name(&name),
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    if crc32c::crc32c(public.pem.as_bytes()) != public.pem_crc32c {
                        return Err(
                            "the public key was corrupted in transit (CRC32C mismatch)".into()
                        );
                    }
                    match out {
                        Some(path) => {
                            std::fs::write(&path, &public.pem)
                                .map_err(|e| format!("{}: {e}", path.display()))?;
                            outln!(
                                "wrote the public key of {} to {}",
                                public.name,
                                path.display()
                            );
                        }
                        None => out!("{}", public.pem),
                    }
                }
                KeysCommand::Lifecycle(command) => lifecycle::run(&mut keys, command).await?,
                KeysCommand::SetState {
                    name,
                    state,
                    reason,
                } => {
                    let state = state.wire();
                    let version = keys
                        .set_key_version_state(SetKeyVersionStateRequest {
                            name: key_name(&name),
                            state: state as i32,
                            reason,
                        })
                        .await
                        .map_err(status)?
                        .into_inner();
                    outln!("{} is now {}", version.name, state.as_str_name());
                }
            }
        }
        Command::Envelope(command) => envelope::run(&cli.connection, command).await?,
        Command::Drift => lifecycle::drift(&cli.connection).await?,
        Command::Ceremony(command) => ceremony::run(&cli.connection, command).await?,
        Command::Sign(args) => {
            let (input, _) = input_of(&args.input)?;
            let mut signing = SigningServiceClient::new(channel(&cli.connection).await?);
            let crc = match &input {
                Some(sign_request::Input::Digest(d)) => match &d.digest {
                    Some(
                        digest::Digest::Sha256(b)
                        | digest::Digest::Sha384(b)
                        | digest::Digest::Sha512(b),
                    ) => crc32c::crc32c(b),
                    None => 0,
                },
                Some(sign_request::Input::Data(d)) => crc32c::crc32c(d),
                None => 0,
            };
            let response = signing
                .sign(SignRequest {
                    name: key_name(&args.input.name),
                    input,
                    encoding: encoding(args.input.format),
                    input_crc32c: Some(crc),
                    request_id: 0,
                })
                .await
                .map_err(status)?
                .into_inner();
            if crc32c::crc32c(&response.signature) != response.signature_crc32c {
                return Err("the signature was corrupted in transit (CRC32C mismatch)".into());
            }
            match args.out {
                Some(path) => {
                    std::fs::write(&path, &response.signature)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    outln!(
                        "signed with {}; {}-byte signature written to {}",
                        response.name,
                        response.signature.len(),
                        path.display()
                    );
                }
                None => outln!("{}  {}", response.name, hex::encode(&response.signature)),
            }
        }
        Command::Verify(args) => {
            let (_, input) = input_of(&args.input)?;
            let signature = std::fs::read(&args.signature)
                .map_err(|e| format!("{}: {e}", args.signature.display()))?;
            let mut signing = SigningServiceClient::new(channel(&cli.connection).await?);
            let response = signing
                .verify(VerifyRequest {
                    name: key_name(&args.input.name),
                    input,
                    signature,
                    encoding: encoding(args.input.format),
                })
                .await
                .map_err(status)?
                .into_inner();
            if response.valid {
                outln!("valid signature by {}", response.name);
            } else {
                return Err(format!("INVALID signature for {}", response.name));
            }
        }
        Command::Officer(OfficerCommand::Keygen { officer_id, out }) => {
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
            let (key, sealed) = OfficerKey::generate(&officer_id, &passphrase)?;
            let json = serde_json::to_string_pretty(&sealed).map_err(|e| e.to_string())?;
            write_private(&out, json.as_bytes())?;
            outln!("officer key for {officer_id} sealed in {}", out.display());
            outln!(
                "public key (give this to the enrollment): {}",
                hex::encode(key.public_key())
            );
        }
        Command::Officer(OfficerCommand::List) => {
            let mut operations = OperationServiceClient::new(channel(&cli.connection).await?);
            let list = operations
                .list_officers(ListOfficersRequest {})
                .await
                .map_err(status)?
                .into_inner();
            outln!(
                "{} officers; officer-set and default policy changes need {} approvals",
                list.officers.len(),
                list.admin_required
            );
            for officer in list.officers {
                outln!(
                    "  {}  principal {}  key {}",
                    officer.officer_id,
                    officer.principal,
                    hex::encode(officer.public_key)
                );
            }
        }
        Command::Officer(OfficerCommand::Enroll {
            officer_id,
            principal,
            public_key,
        }) => {
            let spec = operation_spec::Spec::AddOfficer(OfficerSpec {
                officer_id,
                principal,
                public_key: hex::decode(public_key.trim())
                    .map_err(|e| format!("--public-key is not hex: {e}"))?,
            });
            submit(&cli.connection, spec).await?;
        }
        Command::Officer(OfficerCommand::Remove { officer_id }) => {
            let spec = operation_spec::Spec::RemoveOfficer(OfficerSpec {
                officer_id,
                ..Default::default()
            });
            submit(&cli.connection, spec).await?;
        }
        Command::Request(command) => submit(&cli.connection, request_spec(command)?).await?,
        Command::Pending => {
            let mut operations = OperationServiceClient::new(channel(&cli.connection).await?);
            let list = operations
                .list_operations(ListOperationsRequest {
                    state: OperationState::Pending as i32,
                })
                .await
                .map_err(status)?
                .into_inner();
            if list.operations.is_empty() {
                outln!("nothing is waiting for approval");
            }
            for operation in list.operations {
                print_operation(&operation);
            }
        }
        Command::Show {
            operation,
            signature_out,
        } => {
            let mut operations = OperationServiceClient::new(channel(&cli.connection).await?);
            let operation = operations
                .get_operation(GetOperationRequest {
                    name: operation_name(&operation),
                })
                .await
                .map_err(status)?
                .into_inner();
            print_operation(&operation);
            if let (Some(path), Some(signature)) = (signature_out, &operation.signature) {
                if crc32c::crc32c(&signature.signature) != signature.signature_crc32c {
                    return Err("the signature was corrupted in transit (CRC32C mismatch)".into());
                }
                std::fs::write(&path, &signature.signature)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                outln!(
                    "signature by {} written to {}",
                    signature.name,
                    path.display()
                );
            }
        }
        Command::Approve(args) => vote(&cli.connection, args, true).await?,
        Command::Deny(args) => vote(&cli.connection, args, false).await?,
        Command::Audit(AuditCommand::Export { out, key_out }) => {
            let mut audit = AuditServiceClient::new(channel(&cli.connection).await?);
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
            std::fs::write(&out, text).map_err(|e| format!("{}: {e}", out.display()))?;
            outln!(
                "exported {records} records and the signed head to {}",
                out.display()
            );
            if let (Some(path), Some(pem)) = (key_out, key_pem) {
                std::fs::write(&path, pem).map_err(|e| format!("{}: {e}", path.display()))?;
                outln!(
                    "wrote the audit public key to {} (compare its fingerprint with the one published at setup)",
                    path.display()
                );
            }
        }
        Command::Audit(AuditCommand::Verify { file, audit_key }) => {
            let text = read_text(&file)?;
            let pem = read_text(&audit_key)?;
            let spki = pem_to_der(&pem)?;
            let report = verify_export(&text, &spki)
                .map_err(|e| format!("the audit log does NOT verify: {e}"))?;
            outln!(
                "audit log verifies: {} records, {} signed checkpoints, signed head at record {}",
                report.records,
                report.checkpoints,
                report.last_seq
            );
            outln!(
                "audit key SHA-256 {} (it must match the audit_key_sha256 custodyd published at setup)",
                hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&spki))
            );
        }
        Command::Audit(AuditCommand::VerifyServer) => {
            let mut audit = AuditServiceClient::new(channel(&cli.connection).await?);
            let report = audit
                .verify_audit(VerifyAuditRequest {})
                .await
                .map_err(status)?
                .into_inner();
            if report.valid {
                outln!(
                    "custodyd's audit chain verifies: {} records, {} checkpoints",
                    report.records,
                    report.checkpoints
                );
            } else {
                return Err(format!(
                    "custodyd's audit chain is broken at record {}: {}",
                    report.first_bad_seq, report.problem
                ));
            }
        }
    }
    Ok(())
}

fn operation_name(operation: &str) -> String {
    if operation.starts_with("operations/") {
        operation.to_string()
    } else {
        format!("operations/{operation}")
    }
}

fn print_operation(operation: &Operation) {
    let state = OperationState::try_from(operation.state).map_or("?", |s| s.as_str_name());
    out!("{}", operation.rendering);
    outln!("  state: {state}");
    for vote in &operation.approvals {
        outln!("  approved by {}", vote.officer_id);
    }
    for vote in &operation.denials {
        outln!("  DENIED by {}", vote.officer_id);
    }
    if let Some(signature) = &operation.signature {
        outln!(
            "  signature by {}: {}",
            signature.name,
            hex::encode(&signature.signature)
        );
    }
    if !operation.error.is_empty() {
        outln!("  error: {}", operation.error);
    }
}

fn request_spec(command: RequestCommand) -> Result<operation_spec::Spec, String> {
    Ok(match command {
        RequestCommand::Sign {
            name,
            digest: hex_digest,
            hash,
        } => {
            let bytes =
                hex::decode(hex_digest.trim()).map_err(|e| format!("--digest is not hex: {e}"))?;
            let digest = Digest {
                digest: Some(match hash {
                    HashArg::Sha256 => digest::Digest::Sha256(bytes),
                    HashArg::Sha384 => digest::Digest::Sha384(bytes),
                    HashArg::Sha512 => digest::Digest::Sha512(bytes),
                }),
            };
            operation_spec::Spec::Sign(SignSpec {
                name: key_name(&name),
                digest: Some(digest),
                encoding: 0,
            })
        }
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
            } as i32,
            officers,
            required,
        }),
    })
}

/// Requests an operation and says how officers approve it.
async fn submit(connection: &Connection, spec: operation_spec::Spec) -> Result<(), String> {
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
        operation.name
    );
    Ok(())
}

async fn vote(connection: &Connection, args: VoteArgs, approve: bool) -> Result<(), String> {
    let sealed = sealed_officer_key(&args.key_file)?;
    let mut operations = OperationServiceClient::new(channel(connection).await?);
    let operation = operations
        .get_operation(GetOperationRequest {
            name: operation_name(&args.operation),
        })
        .await
        .map_err(status)?
        .into_inner();
    print_operation(&operation);
    let digest: [u8; 32] = operation
        .digest
        .clone()
        .try_into()
        .map_err(|_| "the operation's digest is not 32 bytes")?;
    let verb = if approve { "APPROVE" } else { "DENY" };
    if !args.yes {
        let expected = &hex::encode(digest)[..8];
        out!(
            "to {verb} as officer {}, type the first 8 characters of the digest to sign: ",
            sealed.officer_id
        );
        std::io::Write::flush(&mut std::io::stdout()).map_err(|e| e.to_string())?;
        let mut typed = String::new();
        std::io::stdin()
            .read_line(&mut typed)
            .map_err(|e| e.to_string())?;
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
        name: operation.name.clone(),
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
    outln!("{verb}D by {} ; the operation now:", key.officer_id());
    print_operation(&result);
    Ok(())
}

/// The DER inside a `PUBLIC KEY` PEM.
fn pem_to_der(pem: &str) -> Result<Vec<u8>, String> {
    use p256::pkcs8::DecodePublicKey;
    use p256::pkcs8::EncodePublicKey;
    let key = p256::ecdsa::VerifyingKey::from_public_key_pem(pem)
        .map_err(|e| format!("audit key: not an EC P-256 public key PEM: {e}"))?;
    Ok(key
        .to_public_key_der()
        .map_err(|e| e.to_string())?
        .as_bytes()
        .to_vec())
}
