//! `custodyctl keys ...`: create, list, show and rotate keys, print a public
//! key, change a version's state; the lifecycle subcommands (`update`,
//! `cancel-destroy`, `legal-hold`) are in `lifecycle.rs`. Also how a key is
//! printed, which `lifecycle.rs` shares.

use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};
use custody_core::algorithms::KeyAlgorithm;
use custody_proto::v1::key_service_client::KeyServiceClient;
use custody_proto::v1::{
    CreateKeyRequest, GetKeyRequest, GetPublicKeyRequest, Key, KeyVersionState, ListKeysRequest,
    RotateKeyRequest, SetKeyVersionStateRequest,
};

use crate::Connection;
use crate::lifecycle;
use crate::shared::{channel, check_crc, json, key_name, print_json, shown, status, write_file};

#[derive(Subcommand)]
pub(crate) enum KeysCommand {
    /// Create a key (generated in the HSM).
    Create {
        /// Key id: lower-case letters, digits, '-'.
        key_id: String,
        /// Algorithm, e.g. EC_SIGN_P256_SHA256 or ec_sign_p256_sha256 (see
        /// docs/api.md).
        #[arg(long, value_enum)]
        algorithm: AlgorithmArg,
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
        /// keys/{key_id}[/versions/{version}] or just the key id.
        name: String,
        /// Write the PEM to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Change a version's state. Marking the primary version compromised
    /// rotates the key and records a revocation notice.
    SetState {
        /// keys/{key_id}/versions/{version}.
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

/// A key algorithm as typed on the command line: its API name, in any case
/// (clap lists the names in the help and in completions).
#[derive(Clone, Copy)]
pub(crate) struct AlgorithmArg(pub(crate) KeyAlgorithm);

impl ValueEnum for AlgorithmArg {
    fn value_variants<'a>() -> &'a [Self] {
        static ALL: std::sync::LazyLock<Vec<AlgorithmArg>> =
            std::sync::LazyLock::new(|| KeyAlgorithm::ALL.into_iter().map(AlgorithmArg).collect());
        &ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.0.api_name()))
    }
}

/// A version state as typed on the command line (also by
/// `request set-state`).
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum StateArg {
    Active,
    Suspended,
    Deactivated,
    Compromised,
}

impl StateArg {
    pub(crate) fn wire(self) -> KeyVersionState {
        match self {
            StateArg::Active => KeyVersionState::Active,
            StateArg::Suspended => KeyVersionState::Suspended,
            StateArg::Deactivated => KeyVersionState::Deactivated,
            StateArg::Compromised => KeyVersionState::Compromised,
        }
    }
}

pub(crate) async fn run(connection: &Connection, command: KeysCommand) -> Result<(), String> {
    let mut keys = KeyServiceClient::new(channel(connection).await?);
    match command {
        KeysCommand::Create {
            key_id,
            algorithm,
            signers,
            cryptoperiod,
            backup_exportable,
        } => {
            let AlgorithmArg(algorithm) = algorithm;
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
            let mut listed = Vec::new();
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
                    if json() {
                        listed.push(key_json(key));
                    } else {
                        print_key(key);
                    }
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            if json() {
                print_json(&serde_json::json!({ "keys": listed }));
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
            check_crc(public.pem.as_bytes(), public.pem_crc32c, "public key")?;
            match out {
                Some(path) => {
                    write_file(&path, &public.pem)?;
                    outln!(
                        "wrote the public key of {} to {}",
                        shown(&public.name),
                        path.display()
                    );
                }
                None if json() => print_json(&serde_json::json!({
                    "name": public.name,
                    "pem": public.pem,
                })),
                None => {
                    // PEM lines, each shown as it is and nothing else.
                    for line in public.pem.lines() {
                        outln!("{}", shown(line));
                    }
                }
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
            outln!("{} is now {}", shown(&version.name), state.as_str_name());
        }
    }
    Ok(())
}

/// A key as JSON: what [`print_key`] prints, in fields.
pub(crate) fn key_json(key: &Key) -> serde_json::Value {
    let algorithm =
        custody_proto::v1::Algorithm::try_from(key.algorithm).map_or("?", |a| a.as_str_name());
    let versions: Vec<serde_json::Value> = key
        .versions
        .iter()
        .map(|version| {
            serde_json::json!({
                "name": version.name,
                "state": KeyVersionState::try_from(version.state).map_or("?", |s| s.as_str_name()),
                "check_value": version.check_value,
                "protect_until": version.protect_until.as_ref().map(lifecycle::time_text),
                "destroy_time": version.destroy_time.as_ref().map(lifecycle::time_text),
                "legal_hold": version.legal_hold,
            })
        })
        .collect();
    let policies: Vec<serde_json::Value> = key
        .policies
        .iter()
        .map(|policy| {
            serde_json::json!({
                "operation": policy.operation,
                "required": policy.required,
                "officers": policy.officers,
            })
        })
        .collect();
    serde_json::json!({
        "name": key.name,
        "algorithm": algorithm,
        "primary_version": key.primary_version,
        "min_version": key.min_version,
        "allowed_signers": key.allowed_signers,
        "cryptoperiod_seconds": key.cryptoperiod.as_ref().map(|p| p.seconds),
        "policies": policies,
        "versions": versions,
    })
}

/// Prints a key: as text, or as JSON with `--output json`.
pub(crate) fn print_key(key: &Key) {
    if json() {
        print_json(&key_json(key));
        return;
    }
    let algorithm =
        custody_proto::v1::Algorithm::try_from(key.algorithm).map_or("?", |a| a.as_str_name());
    outln!(
        "{}  {}  primary v{}  signers: {}",
        shown(&key.name),
        algorithm,
        key.primary_version,
        shown(&key.allowed_signers.join(", "))
    );
    if let Some(period) = &key.cryptoperiod {
        outln!("  cryptoperiod {} s", period.seconds);
    }
    if key.min_version > 1 {
        outln!("  min version {}", key.min_version);
    }
    for policy in &key.policies {
        outln!(
            "  policy {}: {} of {}: {}",
            shown(&policy.operation),
            policy.required,
            policy.officers.len(),
            shown(&policy.officers.join(", "))
        );
    }
    for version in &key.versions {
        let state = KeyVersionState::try_from(version.state).map_or("?", |s| s.as_str_name());
        let mut notes = Vec::new();
        if !version.check_value.is_empty() {
            notes.push(format!("KCV {}", shown(&version.check_value)));
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
            outln!("  {}  {}", shown(&version.name), state);
        } else {
            outln!(
                "  {}  {}  {}",
                shown(&version.name),
                state,
                notes.join("  ")
            );
        }
    }
}
