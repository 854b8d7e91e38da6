//! `custodyctl ceremony ...` and `custodyctl backup`: key ceremonies as
//! officers and custodians run them, one step per command, each on the
//! officer's own terminal with their own certificate and officer key.
//!
//! `check` reads a script offline so officers can review it before the day.
//! Every other step fetches the ceremony first and refuses to go on at any
//! mismatch: the script the server runs must be the file this officer
//! reviewed (same digest), the fingerprint the server reports must be the
//! SHA-256 of the public key it sends, and a share must pass its checksum
//! before it is written down or sent. `verify-transcript` works offline.
//! Those checks, which take nothing on the server's word, are in
//! `ceremony/review.rs`.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use custody_core::ceremonies::{confirmation_message, presence_message};
use custody_core::ceremony::components;
use custody_core::ceremony::script::Kind;
use custody_core::ceremony::shares::Share;
use custody_proto::v1::ceremony_service_client::CeremonyServiceClient;
use custody_proto::v1::operation_service_client::OperationServiceClient;
use custody_proto::v1::{
    AbortCeremonyRequest, Ceremony, CeremonySignature, CeremonyState, CollectShareRequest,
    GetCeremonyRequest, GetOperationRequest, GetTranscriptRequest, ListCeremoniesRequest,
    OperationState, StartCeremonyRequest, SubmitSecretRequest, submit_secret_request,
};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use zeroize::Zeroizing;

use self::review::{check, checked_fingerprint, reviewed, same_script, verify_transcript};
use crate::Connection;
use crate::shared::{
    ask, channel, full_name, json, officer_key, print_json, read_bytes, read_text, shown, status,
    write_file, write_private,
};

mod review;

#[derive(Subcommand)]
pub(crate) enum CeremonyCommand {
    /// Check a ceremony script (offline): print its summary, digest and plan.
    /// For a restore, also check the bundle file against its bundle_sha256.
    Check {
        /// The script (TOML).
        file: PathBuf,
    },
    /// Open a ceremony from a reviewed script (and, for a restore, the
    /// bundle it names).
    Start {
        /// The script (TOML).
        file: PathBuf,
        /// The PKCS#10 CSR file (PEM or DER) an intermediate script names
        /// by `[intermediate] csr_sha256`, sent as it is: custodyd refuses
        /// it unless its SHA-256 is the script's.
        #[arg(long)]
        csr: Option<PathBuf>,
        /// The CA certificate file (PEM or DER) a cross-sign script names
        /// by `[cross_sign] certificate_sha256`, sent as it is: custodyd
        /// refuses it unless its SHA-256 is the script's.
        #[arg(long)]
        certificate: Option<PathBuf>,
    },
    /// Show a ceremony: its steps, what it waits for, the fingerprint.
    Status {
        /// ceremonies/{id} or the id.
        ceremony: String,
        /// Write the certificate (PEM) of a root-key or intermediate
        /// ceremony, or the CRL (PEM) of a crl ceremony, here.
        #[arg(long, visible_alias = "crl-out")]
        certificate_out: Option<PathBuf>,
        /// Write the backup bundle a KEK ceremony made here.
        #[arg(long)]
        bundle_out: Option<PathBuf>,
    },
    /// List ceremonies, newest first.
    List,
    /// Sign in as an officer of the quorum. Refused unless the server runs
    /// exactly the script you reviewed.
    SignIn {
        /// ceremonies/{id} or the id.
        ceremony: String,
        /// The script you reviewed.
        #[arg(long)]
        script: PathBuf,
        /// Your sealed officer key file.
        #[arg(long, env = "CUSTODY_OFFICER_KEY")]
        key_file: PathBuf,
    },
    /// Collect your own backup share (KEK ceremony) into a new file that
    /// only you can read.
    CollectShare {
        /// ceremonies/{id} or the id.
        ceremony: String,
        /// Your sealed officer key file.
        #[arg(long, env = "CUSTODY_OFFICER_KEY")]
        key_file: PathBuf,
        /// Where to write the share (created, mode 0600; must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Enter your key component (KEK ceremony, components mode). Asked for
    /// without echo unless --component-file is given.
    SubmitComponent {
        /// ceremonies/{id} or the id.
        ceremony: String,
        /// Your sealed officer key file.
        #[arg(long, env = "CUSTODY_OFFICER_KEY")]
        key_file: PathBuf,
        /// A file holding the component (64 hex digits).
        #[arg(long)]
        component_file: Option<PathBuf>,
        /// The check value on your component sheet (6 hex digits).
        #[arg(long)]
        kcv: String,
    },
    /// Submit your backup share (restore or drill).
    SubmitShare {
        /// ceremonies/{id} or the id.
        ceremony: String,
        /// Your sealed officer key file.
        #[arg(long, env = "CUSTODY_OFFICER_KEY")]
        key_file: PathBuf,
        /// The file holding your share.
        #[arg(long)]
        share_file: PathBuf,
    },
    /// Confirm the new key's fingerprint after it was read aloud.
    Confirm {
        /// ceremonies/{id} or the id.
        ceremony: String,
        /// The script you reviewed.
        #[arg(long)]
        script: PathBuf,
        /// Your sealed officer key file.
        #[arg(long, env = "CUSTODY_OFFICER_KEY")]
        key_file: PathBuf,
        /// The fingerprint read aloud, hex (spaces allowed); without it you
        /// are asked to type its last 8 hex digits.
        #[arg(long)]
        expect_fingerprint: Option<String>,
    },
    /// Stop an unfinished ceremony; whatever it made is destroyed.
    Abort {
        /// ceremonies/{id} or the id.
        ceremony: String,
        /// Why.
        #[arg(long)]
        reason: String,
    },
    /// Save a ceremony's transcript: DIR/{id}.md, DIR/{id}.json and the
    /// audit key, DIR/audit-key.pem.
    Transcript {
        /// ceremonies/{id} or the id.
        ceremony: String,
        /// Directory to write to.
        #[arg(long)]
        out_dir: PathBuf,
    },
    /// Verify a transcript offline against the audit key.
    VerifyTranscript {
        /// The transcript JSON.
        file: PathBuf,
        /// The audit key's public key (PEM).
        #[arg(long)]
        audit_key: PathBuf,
    },
    /// Write the backup bundle an approved CREATE_BACKUP operation made
    /// (`custodyctl request backup`, then the administrative quorum's
    /// approvals).
    Backup {
        /// operations/{id} or just the id, of the succeeded CREATE_BACKUP.
        #[arg(long)]
        operation: String,
        /// Where to write the bundle (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
}

pub(crate) async fn run(connection: &Connection, command: CeremonyCommand) -> Result<(), String> {
    match command {
        CeremonyCommand::Check { file } => {
            check(&file).map_err(|error| format!("{}: {error}", file.display()))
        }
        CeremonyCommand::VerifyTranscript { file, audit_key } => {
            verify_transcript(&file, &audit_key)
        }
        command => online(connection, command).await,
    }
}

fn name(id: &str) -> String {
    full_name("ceremonies/", id)
}

/// Refuses a file that exists: what is written there must not replace
/// anything.
fn new_file(path: &Path) -> Result<(), String> {
    if path.exists() {
        return Err(format!("{} exists: choose a new file", path.display()));
    }
    Ok(())
}

async fn fetch(
    client: &mut CeremonyServiceClient<Channel>,
    ceremony: &str,
) -> Result<Ceremony, String> {
    client
        .get_ceremony(GetCeremonyRequest {
            name: name(ceremony),
        })
        .await
        .map_err(status)
        .map(tonic::Response::into_inner)
}

async fn online(connection: &Connection, command: CeremonyCommand) -> Result<(), String> {
    let mut client = CeremonyServiceClient::new(channel(connection).await?);
    match command {
        CeremonyCommand::Check { .. } | CeremonyCommand::VerifyTranscript { .. } => Ok(()),
        CeremonyCommand::Start {
            file,
            csr,
            certificate,
        } => {
            let (script, text) = reviewed(&file)?;
            let csr = match (script.kind(), csr) {
                (
                    Kind::Intermediate {
                        csr_sha256: Some(_),
                        ..
                    },
                    Some(path),
                ) => read_bytes(&path)?,
                (
                    Kind::Intermediate {
                        csr_sha256: Some(_),
                        ..
                    },
                    None,
                ) => {
                    return Err(
                        "the script certifies a CSR (intermediate.csr_sha256): give its file with --csr"
                            .into(),
                    );
                }
                (_, Some(_)) => {
                    return Err("--csr is for an intermediate script with csr_sha256".into());
                }
                (_, None) => Vec::new(),
            };
            let certificate = match (script.kind(), certificate) {
                (
                    Kind::Intermediate {
                        certificate_sha256: Some(_),
                        ..
                    },
                    Some(path),
                ) => read_bytes(&path)?,
                (
                    Kind::Intermediate {
                        certificate_sha256: Some(_),
                        ..
                    },
                    None,
                ) => {
                    return Err(
                        "the script cross-signs a certificate (cross_sign.certificate_sha256): give its file with --certificate"
                            .into(),
                    );
                }
                (_, Some(_)) => {
                    return Err("--certificate is for a cross-sign script".into());
                }
                (_, None) => Vec::new(),
            };
            let bundle = match script.kind() {
                Kind::Restore { bundle, .. } => {
                    read_text(&file.parent().unwrap_or(Path::new("")).join(bundle))?
                }
                _ => String::new(),
            };
            let ceremony = client
                .start_ceremony(StartCeremonyRequest {
                    script: text,
                    bundle,
                    csr,
                    certificate,
                })
                .await
                .map_err(status)?
                .into_inner();
            print_ceremony(&ceremony);
            outln!("");
            outln!("plan:");
            for line in script.plan() {
                outln!("  {line}");
            }
            Ok(())
        }
        CeremonyCommand::Status {
            ceremony,
            certificate_out,
            bundle_out,
        } => {
            let ceremony = fetch(&mut client, &ceremony).await?;
            print_ceremony(&ceremony);
            for (path, contents, what) in [
                (
                    certificate_out,
                    &ceremony.certificate_pem,
                    if ceremony.kind == "crl" {
                        "CRL"
                    } else {
                        "certificate"
                    },
                ),
                (bundle_out, &ceremony.backup_bundle, "backup bundle"),
            ] {
                let Some(path) = path else { continue };
                if contents.is_empty() {
                    return Err(format!("{} has no {what}", shown(&ceremony.name)));
                }
                write_file(&path, contents)?;
                if !json() {
                    outln!("wrote the {what} to {}", path.display());
                }
            }
            Ok(())
        }
        CeremonyCommand::List => {
            let list = client
                .list_ceremonies(ListCeremoniesRequest {})
                .await
                .map_err(status)?
                .into_inner();
            if json() {
                let ceremonies: Vec<serde_json::Value> =
                    list.ceremonies.iter().map(ceremony_json).collect();
                print_json(&serde_json::json!({ "ceremonies": ceremonies }));
                return Ok(());
            }
            for ceremony in &list.ceremonies {
                outln!(
                    "{}  {}  {}",
                    shown(&ceremony.name),
                    shown(&ceremony.kind),
                    state_name(ceremony.state)
                );
            }
            Ok(())
        }
        CeremonyCommand::SignIn {
            ceremony,
            script,
            key_file,
        } => {
            let (script, _) = reviewed(&script)?;
            let current = fetch(&mut client, &ceremony).await?;
            same_script(&current, &script)?;
            let key = officer_key(&key_file)?;
            let signature = key.sign(&presence_message(&script.digest())).to_vec();
            let after = client
                .sign_in(CeremonySignature {
                    name: current.name.clone(),
                    officer_id: key.officer_id().into(),
                    signature,
                })
                .await
                .map_err(status)?
                .into_inner();
            outln!("{} signed in to {}", key.officer_id(), shown(&after.name));
            print_ceremony(&after);
            Ok(())
        }
        CeremonyCommand::CollectShare {
            ceremony,
            key_file,
            out,
        } => {
            new_file(&out)?;
            let key = officer_key(&key_file)?;
            let response = client
                .collect_share(CollectShareRequest {
                    name: name(&ceremony),
                    officer_id: key.officer_id().into(),
                })
                .await
                .map_err(status)?
                .into_inner();
            let text = if response.sealed_share.is_empty() {
                Zeroizing::new(response.share.clone())
            } else {
                let opened = key.open_sealed(&response.sealed_share)?;
                Zeroizing::new(
                    String::from_utf8(opened.to_vec())
                        .map_err(|_| "the sealed share is not text")?,
                )
            };
            // Its checksum must hold before anyone writes it down.
            let share =
                Share::parse(&text).map_err(|e| format!("the share received is damaged: {e}"))?;
            write_private(&out, format!("{}\n", text.as_str()).as_bytes())?;
            outln!(
                "share {} of set {} written to {} (mode 0600); backup KEK check value {}",
                share.index(),
                share.set_id(),
                out.display(),
                shown(&response.backup_kek_kcv)
            );
            outln!("keep it offline; it is shown nowhere else");
            Ok(())
        }
        CeremonyCommand::SubmitComponent {
            ceremony,
            key_file,
            component_file,
            kcv,
        } => {
            let typed = match component_file {
                Some(path) => Zeroizing::new(read_text(&path)?),
                None => Zeroizing::new(
                    rpassword::prompt_password("your component (64 hex digits, not shown): ")
                        .map_err(|e| format!("reading the component: {e}"))?,
                ),
            };
            let value = components::parse_component(&typed)?;
            let computed = hex::encode(components::kcv(&value));
            if !computed.eq_ignore_ascii_case(kcv.trim()) {
                return Err(format!(
                    "MISMATCH: the component you entered has check value {computed}, your sheet says {}: nothing was sent",
                    kcv.trim()
                ));
            }
            outln!("component check value {computed} matches your sheet");
            let key = officer_key(&key_file)?;
            let after = client
                .submit_secret(SubmitSecretRequest {
                    name: name(&ceremony),
                    officer_id: key.officer_id().into(),
                    secret: Some(submit_secret_request::Secret::ComponentHex(hex::encode(
                        value.as_slice(),
                    ))),
                    expected_kcv: computed,
                })
                .await
                .map_err(status)?
                .into_inner();
            print_ceremony(&after);
            Ok(())
        }
        CeremonyCommand::SubmitShare {
            ceremony,
            key_file,
            share_file,
        } => {
            let text = Zeroizing::new(read_text(&share_file)?);
            let share = Share::parse(&text)
                .map_err(|e| format!("{}: {e}: nothing was sent", share_file.display()))?;
            let key = officer_key(&key_file)?;
            // The last share starts the restore or drill, which custodyd
            // runs before it answers.
            let waiting = crate::progress::spinner(
                "submitting the share; custodyd restores or drills once the last one is in",
            );
            let after = client
                .submit_secret(SubmitSecretRequest {
                    name: name(&ceremony),
                    officer_id: key.officer_id().into(),
                    secret: Some(submit_secret_request::Secret::Share(
                        share.to_text().to_string(),
                    )),
                    expected_kcv: String::new(),
                })
                .await
                .map_err(status);
            waiting.finish_and_clear();
            let after = after?.into_inner();
            outln!("{} submitted share {}", key.officer_id(), share.index());
            print_ceremony(&after);
            Ok(())
        }
        CeremonyCommand::Confirm {
            ceremony,
            script,
            key_file,
            expect_fingerprint,
        } => {
            let (script, _) = reviewed(&script)?;
            let current = fetch(&mut client, &ceremony).await?;
            same_script(&current, &script)?;
            let fingerprint = checked_fingerprint(&current)?;
            if !current.tbs_der.is_empty() {
                if current.kind == "key-destruction" {
                    outln!(
                        "the destruction manifest (nothing is destroyed before every officer confirms it):"
                    );
                } else {
                    outln!(
                        "the {} the HSM will sign (TBS):",
                        if current.kind == "crl" {
                            "CRL"
                        } else {
                            "certificate"
                        }
                    );
                }
                for line in &current.tbs_summary {
                    outln!("  {}", shown(line));
                }
                outln!("TBS SHA-256:");
            }
            outln!("fingerprint: {}", fingerprint.hex_groups());
            if let Some(words) = fingerprint.words() {
                outln!("words:       {words}");
            }
            let read_aloud: String = match expect_fingerprint {
                Some(text) => text,
                None => ask(format_args!(
                    "type the last 8 hex digits (a KCV: all 6) of the fingerprint that was read aloud: "
                ))?,
            };
            let read_aloud: String = read_aloud
                .chars()
                .filter(char::is_ascii_hexdigit)
                .collect::<String>()
                .to_lowercase();
            let actual = fingerprint.hex();
            // At least the last 8 hex digits (all 6 of a KCV).
            if read_aloud.len() < actual.len().min(8) || !actual.ends_with(&read_aloud) {
                return Err(format!(
                    "MISMATCH: the fingerprint read aloud ({read_aloud}) is not this key's ({actual}): nothing was confirmed"
                ));
            }
            let key = officer_key(&key_file)?;
            let signature = key
                .sign(&confirmation_message(&script.digest(), fingerprint.bytes()))
                .to_vec();
            let after = client
                .confirm(CeremonySignature {
                    name: current.name.clone(),
                    officer_id: key.officer_id().into(),
                    signature,
                })
                .await
                .map_err(status)?
                .into_inner();
            outln!("{} confirmed the fingerprint", key.officer_id());
            print_ceremony(&after);
            Ok(())
        }
        CeremonyCommand::Abort { ceremony, reason } => {
            let after = client
                .abort_ceremony(AbortCeremonyRequest {
                    name: name(&ceremony),
                    reason,
                })
                .await
                .map_err(status)?
                .into_inner();
            print_ceremony(&after);
            Ok(())
        }
        CeremonyCommand::Transcript { ceremony, out_dir } => {
            let transcript = client
                .get_transcript(GetTranscriptRequest {
                    name: name(&ceremony),
                })
                .await
                .map_err(status)?
                .into_inner();
            // Owner only: transcripts and bundles land here (0600 each).
            std::os::unix::fs::DirBuilderExt::mode(
                std::fs::DirBuilder::new().recursive(true),
                0o700,
            )
            .create(&out_dir)
            .map_err(|e| format!("{}: {e}", out_dir.display()))?;
            let id = name(&ceremony)
                .trim_start_matches("ceremonies/")
                .to_string();
            for (file, contents) in [
                (format!("{id}.md"), &transcript.markdown),
                (format!("{id}.json"), &transcript.json),
                ("audit-key.pem".to_string(), &transcript.audit_key_pem),
            ] {
                let path = out_dir.join(&file);
                write_file(&path, contents)?;
                outln!("wrote {}", path.display());
            }
            Ok(())
        }
        CeremonyCommand::Backup { operation, out } => {
            new_file(&out)?;
            let mut operations = OperationServiceClient::new(channel(connection).await?);
            let waiting = crate::progress::spinner("fetching the backup bundle");
            let operation = operations
                .get_operation(GetOperationRequest {
                    name: full_name("operations/", &operation),
                })
                .await
                .map_err(status);
            waiting.finish_and_clear();
            let operation = operation?.into_inner();
            if operation.backup_bundle.is_empty() {
                return Err(format!(
                    "{} holds no backup bundle: it must be a CREATE_BACKUP operation the quorum approved (state {})",
                    shown(&operation.name),
                    OperationState::try_from(operation.state).map_or("?", |s| s.as_str_name())
                ));
            }
            write_file(&out, &operation.backup_bundle)?;
            outln!(
                "backup of {} key versions written to {} (sha256 {})",
                operation.backup_keys,
                out.display(),
                hex::encode(Sha256::digest(operation.backup_bundle.as_bytes()))
            );
            Ok(())
        }
    }
}

fn state_name(state: i32) -> &'static str {
    CeremonyState::try_from(state)
        .map(|s| s.as_str_name())
        .unwrap_or("UNKNOWN")
}

/// A ceremony as JSON: its progress and outcome. The backup bundle and the
/// root certificate are left out (`--bundle-out`, `--certificate-out` write
/// them to files): only whether there is one.
pub(crate) fn ceremony_json(ceremony: &Ceremony) -> serde_json::Value {
    let steps: Vec<serde_json::Value> = ceremony
        .steps
        .iter()
        .map(|step| serde_json::json!({ "name": step.name, "done": step.done }))
        .collect();
    let components: Vec<serde_json::Value> = ceremony
        .components
        .iter()
        .map(|c| serde_json::json!({ "custodian": c.custodian, "kcv": c.kcv }))
        .collect();
    serde_json::json!({
        "name": ceremony.name,
        "kind": ceremony.kind,
        "state": state_name(ceremony.state),
        "steps": steps,
        "waiting_for": ceremony.waiting_for,
        "present": ceremony.present,
        "confirmed": ceremony.confirmed,
        "fingerprint": ceremony.fingerprint.as_ref().map(|f| serde_json::json!({
            "hex": f.hex,
            "words": f.words,
        })),
        "key": ceremony.key,
        "components": components,
        "shares_collected": ceremony.shares_collected,
        "shares_submitted": ceremony.shares_submitted,
        "shares_needed": ceremony.shares_needed,
        "has_certificate": !ceremony.certificate_pem.is_empty(),
        "has_backup_bundle": !ceremony.backup_bundle.is_empty(),
        "restore": ceremony.restore.as_ref().map(|r| serde_json::json!({
            "drill": r.drill,
            "keys": r.keys,
            "verified": r.verified,
            "rto_ms": r.rto_ms,
            "scratch_objects_destroyed": r.scratch_objects_destroyed,
            "suspended_keys": r.suspended_keys,
        })),
        "error": ceremony.error,
        "transcript_head": ceremony.transcript_head,
    })
}

fn print_ceremony(ceremony: &Ceremony) {
    if json() {
        print_json(&ceremony_json(ceremony));
        return;
    }
    outln!(
        "{} ({}): {}",
        shown(&ceremony.name),
        shown(&ceremony.kind),
        state_name(ceremony.state)
    );
    let done = ceremony.steps.iter().filter(|s| s.done).count();
    outln!("  progress: {done} of {} steps", ceremony.steps.len());
    for step in &ceremony.steps {
        outln!(
            "    [{}] {}",
            if step.done { "x" } else { " " },
            shown(&step.name)
        );
    }
    if !ceremony.waiting_for.is_empty() {
        outln!("  waiting for: {}", shown(&ceremony.waiting_for));
    }
    if let Some(fingerprint) = &ceremony.fingerprint {
        outln!("  fingerprint: {}", shown(&fingerprint.hex));
        if !fingerprint.words.is_empty() {
            outln!("  words:       {}", shown(&fingerprint.words));
        }
    }
    if !ceremony.key.is_empty() {
        outln!("  key: {}", shown(&ceremony.key));
    }
    for component in &ceremony.components {
        outln!(
            "  component from {}: check value {}",
            shown(&component.custodian),
            shown(&component.kcv)
        );
    }
    if let Some(restore) = &ceremony.restore {
        outln!(
            "  {}: {} of {} keys verified; RTO {} ms{}",
            if restore.drill { "drill" } else { "restore" },
            restore.verified,
            restore.keys,
            restore.rto_ms,
            if restore.drill {
                format!(
                    "; {} scratch objects destroyed",
                    restore.scratch_objects_destroyed
                )
            } else {
                String::new()
            }
        );
        for key in &restore.suspended_keys {
            outln!(
                "  {key} restored with every active version SUSPENDED: see the transcript for why"
            );
        }
    }
    if !ceremony.error.is_empty() {
        outln!("  error: {}", shown(&ceremony.error));
    }
    if !ceremony.transcript_head.is_empty() && ceremony.state == CeremonyState::Completed as i32 {
        outln!("  transcript head: {}", shown(&ceremony.transcript_head));
    }
}
