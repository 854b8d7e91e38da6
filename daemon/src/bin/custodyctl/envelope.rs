//! `custodyctl encrypt|decrypt|data-key|rewrap`: envelope encryption with an
//! AES_256_GCM key. Ciphertexts are files of custody's self-describing
//! format; associated data is given as a string with `--aad`.

use std::path::PathBuf;

use clap::Subcommand;
use custody_proto::v1::envelope_service_client::EnvelopeServiceClient;
use custody_proto::v1::{DecryptRequest, EncryptRequest, GenerateDataKeyRequest, RewrapRequest};
use zeroize::Zeroizing;

use crate::Connection;
use crate::shared::{channel, key_name, read_bytes, shown, status, write_private};

#[derive(Subcommand)]
pub(crate) enum EnvelopeCommand {
    /// Encrypt a file (at most 64 KiB) under the key's primary version.
    Encrypt {
        /// keys/{key_id} or just the key id.
        name: String,
        /// The plaintext file.
        #[arg(long = "in")]
        input: PathBuf,
        /// The ciphertext file to write.
        #[arg(long)]
        out: PathBuf,
        /// Associated data, needed again to decrypt.
        #[arg(long, default_value = "")]
        aad: String,
    },
    /// Decrypt a ciphertext (or unwrap a data key) into a new file (mode 0600).
    Decrypt {
        /// keys/{key_id} or just the key id.
        name: String,
        /// The ciphertext file.
        #[arg(long = "in")]
        input: PathBuf,
        /// The plaintext file to write.
        #[arg(long)]
        out: PathBuf,
        /// The associated data it was made with.
        #[arg(long, default_value = "")]
        aad: String,
    },
    /// Generate a 256-bit data key: its wrapped form and the key itself.
    DataKey {
        /// keys/{key_id} or just the key id.
        name: String,
        /// Where to write the wrapped data key (store this).
        #[arg(long)]
        wrapped_out: PathBuf,
        /// Where to write the plaintext data key (mode 0600; use, then delete).
        #[arg(long)]
        key_out: PathBuf,
        /// Associated data bound to the wrapped key.
        #[arg(long, default_value = "")]
        aad: String,
    },
    /// Re-encrypt a ciphertext under the key's primary version, in place
    /// unless --out is given. The plaintext never leaves custodyd.
    Rewrap {
        /// keys/{key_id} or just the key id.
        name: String,
        /// The ciphertext file (repeat for a bulk rewrap, each replaced in
        /// place, with a progress bar on a terminal).
        #[arg(long = "in", required = true)]
        inputs: Vec<PathBuf>,
        /// Where to write the new ciphertext (default: replace --in; only
        /// with one --in).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The associated data it was made with.
        #[arg(long, default_value = "")]
        aad: String,
    },
}

/// Writes through a temporary file, synced, and a rename, with the
/// directory synced after: a rewrap in place never leaves a half-written or
/// lost ciphertext where the old one was, even across a crash.
fn write(path: &PathBuf, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let mut temporary = path.clone().into_os_string();
    temporary.push(".partial");
    let temporary = PathBuf::from(temporary);
    let failed = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut file = std::fs::File::create(&temporary).map_err(failed)?;
    file.write_all(bytes).map_err(failed)?;
    file.sync_all().map_err(failed)?;
    std::fs::rename(&temporary, path).map_err(failed)?;
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::File::open(directory)
        .and_then(|d| d.sync_all())
        .map_err(failed)
}

pub(crate) async fn run(connection: &Connection, command: EnvelopeCommand) -> Result<(), String> {
    let mut envelope = EnvelopeServiceClient::new(channel(connection).await?);
    match command {
        EnvelopeCommand::Encrypt {
            name,
            input,
            out,
            aad,
        } => {
            let plaintext = Zeroizing::new(read_bytes(&input)?);
            let response = envelope
                .encrypt(EncryptRequest {
                    name: key_name(&name),
                    plaintext: plaintext.to_vec(),
                    associated_data: aad.into_bytes(),
                })
                .await
                .map_err(status)?
                .into_inner();
            write(&out, &response.ciphertext)?;
            outln!(
                "encrypted under {} into {}",
                shown(&response.name),
                out.display()
            );
        }
        EnvelopeCommand::Decrypt {
            name,
            input,
            out,
            aad,
        } => {
            let response = envelope
                .decrypt(DecryptRequest {
                    name: key_name(&name),
                    ciphertext: read_bytes(&input)?,
                    associated_data: aad.into_bytes(),
                })
                .await
                .map_err(status)?
                .into_inner();
            let plaintext = Zeroizing::new(response.plaintext);
            write_private(&out, &plaintext)?;
            outln!(
                "decrypted with {} into {} ({} bytes)",
                shown(&response.name),
                out.display(),
                plaintext.len()
            );
        }
        EnvelopeCommand::DataKey {
            name,
            wrapped_out,
            key_out,
            aad,
        } => {
            let response = envelope
                .generate_data_key(GenerateDataKeyRequest {
                    name: key_name(&name),
                    associated_data: aad.into_bytes(),
                })
                .await
                .map_err(status)?
                .into_inner();
            let data_key = Zeroizing::new(response.plaintext);
            write_private(&key_out, &data_key)?;
            write(&wrapped_out, &response.wrapped)?;
            outln!(
                "data key wrapped under {} in {}; the key itself in {}",
                shown(&response.name),
                wrapped_out.display(),
                key_out.display()
            );
        }
        EnvelopeCommand::Rewrap {
            name,
            inputs,
            out,
            aad,
        } => {
            if out.is_some() && inputs.len() != 1 {
                return Err("--out goes with one --in; several are each replaced in place".into());
            }
            let bar = crate::progress::bar(inputs.len() as u64, "files rewrapped");
            for input in inputs {
                let response = envelope
                    .rewrap(RewrapRequest {
                        name: key_name(&name),
                        ciphertext: read_bytes(&input)?,
                        associated_data: aad.clone().into_bytes(),
                    })
                    .await
                    .map_err(|e| format!("{}: {}", input.display(), status(e)))?
                    .into_inner();
                let out = out.clone().unwrap_or(input);
                write(&out, &response.ciphertext)?;
                bar.suspend(|| {
                    outln!(
                        "rewrapped from {} to {} into {}",
                        shown(&response.source_name),
                        shown(&response.name),
                        out.display()
                    )
                });
                bar.inc(1);
            }
            bar.finish_and_clear();
        }
    }
    Ok(())
}
