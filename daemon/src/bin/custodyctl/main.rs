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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every command and subcommand, with its path (`custodyctl keys get`).
    fn every_command() -> Vec<(String, clap::Command)> {
        let mut found = Vec::new();
        let mut todo = vec![(String::from("custodyctl"), Cli::command())];
        while let Some((path, command)) = todo.pop() {
            for sub in command.get_subcommands() {
                todo.push((format!("{path} {}", sub.get_name()), sub.clone()));
            }
            found.push((path, command));
        }
        found
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// clap reads `{n}` in help text as a line break: `keys/{key_id}/versions/{n}`
    /// printed as `keys/{key_id}/versions/` and a broken line.
    #[test]
    fn every_commands_help_renders_its_text_whole() {
        let mut broken = Vec::new();
        for (path, mut command) in every_command() {
            let rendered = command.render_long_help().to_string();
            assert!(!rendered.is_empty(), "{path} has no help");
            let texts = command
                .get_arguments()
                .filter_map(|arg| arg.get_help().map(ToString::to_string))
                .chain(command.get_about().map(ToString::to_string));
            for text in texts {
                if text.contains("{n}") {
                    broken.push(format!("{path}: {text}"));
                }
            }
        }
        assert!(
            broken.is_empty(),
            "help text clap breaks:\n{}",
            broken.join("\n")
        );
    }
}
