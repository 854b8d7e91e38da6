//! custodyctl: the command-line client of custodyd.
//!
//! Connection options come from flags or the environment: `--server`
//! (`CUSTODY_SERVER`), `--ca` (`CUSTODY_CA`), `--cert` (`CUSTODY_CERT`),
//! `--key` (`CUSTODY_KEY`), else from a named profile of the config file
//! (`--profile`, `profile.rs`). `dev-pki`, `audit verify` and `ceremony check`
//! work offline.
//!
//! This file holds the top-level command, the global options and the
//! dispatch to the command groups, one file each: `keys.rs` (with
//! `lifecycle.rs` for cryptoperiods, destruction and legal holds),
//! `signing.rs`, `audit.rs`, `officers.rs`, `operations.rs` (requests and
//! approvals), `envelope.rs`, `drift.rs`, `health.rs`, `ceremony.rs` and `devpki.rs`.
//! `shared.rs` holds what they all use: the connection, printing, files,
//! the officer key and the exit status.

// First, so that its `out!` and `outln!` macros reach every group.
#[macro_use]
mod shared;

mod audit;
mod ceremony;
mod devpki;
mod docs;
mod drift;
mod envelope;
mod health;
mod keys;
mod lifecycle;
mod officers;
mod operations;
mod profile;
mod progress;
mod signing;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args as ClapArgs, CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "custodyctl",
    version,
    about = "Client of custodyd, the HSM-backed signing and key-custody service"
)]
struct Cli {
    #[command(flatten)]
    connection: Connection,
    /// How read commands print: text for people, or JSON for scripts
    /// (keys list/show/public-key, officer list, pending, show, drift,
    /// audit verify/verify-server, ceremony status/list).
    #[arg(long, value_enum, default_value = "text", global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(ClapArgs)]
struct Connection {
    /// custodyd's address [default: the profile's, else
    /// https://localhost:7443].
    #[arg(long, env = "CUSTODY_SERVER", global = true)]
    server: Option<String>,
    /// CA certificate that issued custodyd's certificate (PEM).
    #[arg(long, env = "CUSTODY_CA", global = true)]
    ca: Option<PathBuf>,
    /// Your client certificate (PEM).
    #[arg(long, env = "CUSTODY_CERT", global = true)]
    cert: Option<PathBuf>,
    /// Your client key (PEM).
    #[arg(long, env = "CUSTODY_KEY", global = true)]
    key: Option<PathBuf>,
    /// A named profile of the config file: server, CA, certificate and key
    /// in one name. Flags and environment variables win over it.
    #[arg(long, env = "CUSTODY_PROFILE", global = true)]
    profile: Option<String>,
    /// The config file of profiles [default:
    /// $XDG_CONFIG_HOME/custody/custodyctl.toml].
    #[arg(long, env = "CUSTODY_CONFIG", global = true)]
    config: Option<PathBuf>,
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
    /// Whether custodyd serves: readiness (custody.v1.SigningService) or,
    /// with --service "", liveness; exits 1 unless SERVING.
    Health(health::HealthArgs),
    /// Key ceremonies, backups, restores and DR drills.
    #[command(subcommand)]
    Ceremony(ceremony::CeremonyCommand),
    /// Make a development CA, server and client certificates (offline).
    DevPki(devpki::DevPkiArgs),
    /// Print the shell completion script (offline).
    Completions(docs::CompletionsArgs),
    /// Print the man page, or write every command's page (offline).
    Man(docs::ManArgs),
}

/// The command line: [`Cli`] with every value chosen from a list
/// (algorithms, hash functions, states, operation kinds) matched in any
/// case.
fn command() -> clap::Command {
    fn ignore_case(command: clap::Command) -> clap::Command {
        command
            .mut_args(|arg| {
                if arg.get_action().takes_values() && !arg.get_possible_values().is_empty() {
                    arg.ignore_case(true)
                } else {
                    arg
                }
            })
            .mut_subcommands(ignore_case)
    }
    ignore_case(Cli::command())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let matches = command().get_matches();
    let Cli {
        connection,
        output,
        command,
    } = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut self::command()).exit());
    let connection = &connection;
    shared::set_json(output == Output::Json);
    shared::exit_code(match command {
        Command::Keys(command) => keys::run(connection, command).await,
        Command::Signing(command) => signing::run(connection, command).await,
        Command::Audit(command) => audit::run(connection, command).await,
        Command::Officer(command) => officers::run(connection, command).await,
        Command::Operations(command) => operations::run(connection, command).await,
        Command::Envelope(command) => envelope::run(connection, command).await,
        Command::Drift => drift::run(connection).await,
        Command::Health(args) => health::run(connection, args).await,
        Command::Ceremony(command) => ceremony::run(connection, command).await,
        Command::DevPki(args) => devpki::run(args),
        Command::Completions(args) => docs::completions(&args),
        Command::Man(args) => docs::man(&args),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use clap::FromArgMatches;

    use super::{Cli, Command, command};

    /// Every command and subcommand, with its path (`custodyctl keys get`).
    fn every_command() -> Vec<(String, clap::Command)> {
        let mut found = Vec::new();
        let mut todo = vec![(String::from("custodyctl"), command())];
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
        command().debug_assert();
    }

    fn parse(line: &[&str]) -> Result<Cli, clap::Error> {
        let matches = command().try_get_matches_from(line)?;
        Cli::from_arg_matches(&matches)
    }

    /// Values chosen from a list are matched in any case, and every such
    /// argument of every command says so.
    #[test]
    fn values_from_a_list_are_matched_in_any_case() {
        let cli = parse(&[
            "custodyctl",
            "keys",
            "create",
            "k",
            "--algorithm",
            "ec_sign_ed25519",
        ])
        .unwrap();
        let Command::Keys(crate::keys::KeysCommand::Create { algorithm, .. }) = cli.command else {
            panic!("not keys create");
        };
        assert_eq!(
            algorithm.0,
            custody_core::algorithms::KeyAlgorithm::EcSignEd25519
        );
        for line in [
            &[
                "custodyctl",
                "sign",
                "k",
                "--digest",
                "00",
                "--hash",
                "SHA384",
            ][..],
            &[
                "custodyctl",
                "keys",
                "set-state",
                "keys/k/versions/1",
                "Suspended",
            ],
            &[
                "custodyctl",
                "request",
                "set-policy",
                "k",
                "--operation",
                "Destroy-Version",
                "--required",
                "1",
            ],
        ] {
            parse(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        }
        assert!(
            parse(&[
                "custodyctl",
                "keys",
                "create",
                "k",
                "--algorithm",
                "EC_SIGN_P999"
            ])
            .is_err()
        );
        for (path, command) in every_command() {
            for arg in command.get_arguments() {
                if arg.get_action().takes_values() && !arg.get_possible_values().is_empty() {
                    assert!(arg.is_ignore_case_set(), "{path} --{}", arg.get_id());
                }
            }
        }
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

    /// `--output json` is JSON a script can parse, with the fields the text
    /// shows; hidden characters in server text are `\uXXXX` escapes (still
    /// JSON, inert on a terminal); a ceremony's backup bundle is not in it.
    #[test]
    fn json_output_parses_is_inert_and_carries_no_bundle() {
        use custody_proto::v1::{Ceremony, Key, KeyVersion};
        let key = Key {
            name: "keys/issuing".into(),
            algorithm: custody_proto::v1::Algorithm::EcSignP256Sha256 as i32,
            primary_version: 2,
            allowed_signers: vec!["ca-issuing\u{202e}gnp.exe".into()],
            versions: vec![KeyVersion {
                name: "keys/issuing/versions/2".into(),
                state: custody_proto::v1::KeyVersionState::Active as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = crate::shared::json_text(&crate::keys::key_json(&key));
        assert!(
            !text
                .chars()
                .any(|c| c != '\n' && custody_core::text::is_hidden(c)),
            "{text}"
        );
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["name"], "keys/issuing");
        assert_eq!(parsed["algorithm"], "EC_SIGN_P256_SHA256");
        assert_eq!(parsed["primary_version"], 2);
        assert_eq!(parsed["allowed_signers"][0], "ca-issuing\u{202e}gnp.exe");
        assert_eq!(parsed["versions"][0]["state"], "ACTIVE");

        let ceremony = Ceremony {
            name: "ceremonies/kek-1".into(),
            backup_bundle: "BUNDLE-CONTENTS-WRAPPED-KEYS".into(),
            certificate_pem: "-----BEGIN CERTIFICATE-----".into(),
            ..Default::default()
        };
        let text = crate::shared::json_text(&crate::ceremony::ceremony_json(&ceremony));
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["has_backup_bundle"], true);
        assert!(!text.contains("BUNDLE-CONTENTS"), "{text}");
    }

    /// Completions for every shell, and the man pages of every command,
    /// render and name custodyctl's commands.
    #[test]
    fn completions_and_man_pages_render() {
        use clap::ValueEnum;
        for shell in clap_complete::Shell::value_variants() {
            let script = String::from_utf8(crate::docs::completion_script(*shell)).unwrap();
            assert!(script.contains("custodyctl"), "{shell}");
            assert!(
                script.contains("public-key"),
                "{shell} lacks keys public-key"
            );
        }
        let page = String::from_utf8(crate::docs::page(command()).unwrap()).unwrap();
        assert!(
            page.starts_with(".ie") || page.contains(".TH custodyctl"),
            "{page}"
        );
        assert!(page.contains("\\-\\-profile"), "{page}");
        let dir = tempfile::tempdir().unwrap();
        crate::docs::pages_to(dir.path()).unwrap();
        for (path, _) in every_command() {
            if path.ends_with(" help") {
                continue;
            }
            let name = path.replace(' ', "-");
            let file = dir.path().join(format!("{name}.1"));
            let page = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert!(page.contains(&format!(".TH {name}")), "{path}");
        }
    }
}
