//! custodyctl: the command-line client of custodyd.
//!
//! Connection options come from flags or the environment: `--server`
//! (`CUSTODY_SERVER`), `--ca` (`CUSTODY_CA`), `--cert` (`CUSTODY_CERT`),
//! `--key` (`CUSTODY_KEY`). `dev-pki`, `audit verify` and `ceremony check`
//! work offline.
//!
//! This file holds the top-level command, the global options and the
//! dispatch to the command groups, one file each: `keys.rs` (with
//! `lifecycle.rs` for cryptoperiods, destruction and legal holds),
//! `signing.rs`, `audit.rs`, `officers.rs`, `operations.rs` (requests and
//! approvals), `envelope.rs`, `drift.rs`, `ceremony.rs` and `devpki.rs`.
//! `shared.rs` holds what they all use: the connection, printing, files,
//! the officer key and the exit status.

// First, so that its `out!` and `outln!` macros reach every group.
#[macro_use]
mod shared;

mod audit;
mod ceremony;
mod devpki;
mod drift;
mod envelope;
mod keys;
mod lifecycle;
mod officers;
mod operations;
mod signing;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args as ClapArgs, Parser, Subcommand};

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

// Flattened groups list their commands where the group stands, so the order
// of the variants is the order `--help` shows.
#[derive(Subcommand)]
enum Command {
    /// Manage keys.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// `sign` and `verify`.
    #[command(flatten)]
    Signing(signing::SigningCommand),
    /// Export and verify the audit log.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Officers: make a key, list who is enrolled.
    #[command(subcommand)]
    Officer(officers::OfficerCommand),
    /// `request`, `pending`, `show`, `approve` and `deny`.
    #[command(flatten)]
    Operations(operations::OperationCommand),
    /// Envelope encryption with an AES_256_GCM key.
    #[command(flatten)]
    Envelope(envelope::EnvelopeCommand),
    /// Compare the registry with the objects the HSM holds; exits 1 on drift.
    Drift,
    /// Key ceremonies, backups, restores and DR drills.
    #[command(subcommand)]
    Ceremony(ceremony::CeremonyCommand),
    /// Make a development CA, server and client certificates (offline).
    DevPki(devpki::DevPkiArgs),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let Cli {
        connection,
        command,
    } = Cli::parse();
    let connection = &connection;
    shared::exit_code(match command {
        Command::Keys(command) => keys::run(connection, command).await,
        Command::Signing(command) => signing::run(connection, command).await,
        Command::Audit(command) => audit::run(connection, command).await,
        Command::Officer(command) => officers::run(connection, command).await,
        Command::Operations(command) => operations::run(connection, command).await,
        Command::Envelope(command) => envelope::run(connection, command).await,
        Command::Drift => drift::run(connection).await,
        Command::Ceremony(command) => ceremony::run(connection, command).await,
        Command::DevPki(args) => devpki::run(args),
    })
}
